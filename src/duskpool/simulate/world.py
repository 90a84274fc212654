"""The simulated office: nodes that owners use and leave, a gateway that plans, admits, routes, drains and recovers,
and requests, in simulated time (simpy). Every decision is the project's own code, called as the gateway calls it:

    where spans go          planner.first_plan (plan + with_replicas), planner.replicate (orphans and joins)
    the route               route.rebuild / orphans / held_by, as Membership.reroute, _mark_gone, _set_lending
    when a node lends       idle.policy.step on the machine's simulated probe (owner, power, lid, battery)
    admission               cluster.admission.kv_capacity / admits, over the route's lent memory (api/service.py)
    what one forward takes  engine.batcher.select / chunk_rows / micro_batch (decode steps, prompt rows within
                            128, at most one micro-batch: the route's sessions cut into one per stage of the ring)
    recovery                a session on a route with a node gone takes the rebuilt route and re-prefills its
                            whole history there (gateway.RemoteSession._recover), chunked like any prompt

What is modelled rather than run: the time things take. A forward of `rows` rows over `n` layers costs
n × max(weight bytes + KV read / the node's matmul bytes per ms, rows × FLOPs / its FLOP rate) + a fixed overhead
(the planner's own speed model at batch 1); a hop costs half a round trip drawn from the node's link plus the
hidden state's bytes over it; weights stream at the slower of the gateway's and the node's links (layers a node has
cached on disk are read back instead). A route carries up to one micro-batch per stage at once, each a lane here;
a machine computes one forward at a time, so the lanes overlap as far as its free time between the others' forwards
allows; two routes that share a node queue for it.
"""

import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import simpy

from duskpool.cluster import admission, planner
from duskpool.cluster.route import Span, held_by, orphans, rebuild, take_loaded
from duskpool.engine.batcher import PREFILL_ROWS, chunk_rows, micro_batch, select
from duskpool.idle.policy import Lending, LendPolicy, LendState, step
from duskpool.idle.probes import MachineState
from duskpool.simulate.fleet import FORWARD_OVERHEAD_MS, HOUR, Day, Link, Machine

PROCESS_DEATH_DETECT_S = 0.05  # Health.Watch ends as the process does
LINK_LOSS_DETECT_S = (1.0, 2.0)  # a cut link or a sleeping laptop: keepalive gives up within 1-2 s
REJOIN_POLL_S = 3.0  # membership.REJOIN_POLL_S: a node back at its address is noticed on the next poll
DISK_BYTES_PER_S = 2e9  # a node reads layers it has cached back from its SSD


class InvariantViolated(AssertionError):
    pass


@dataclass(frozen=True)
class Info:
    """What a node says about itself in `Info`: the planner's inputs (planner.node_profile reads these)."""
    node_id: str
    memory_free: int
    matmul_bytes_per_ms: float
    backend: str
    device: str


@dataclass(eq=False)
class SimNode:
    id: str
    machine: Machine
    link: Link
    policy: LendPolicy
    days: list[Day] = field(default_factory=list)
    overhead_ms: float | None = None  # per forward; None: the backend's (fleet.FORWARD_OVERHEAD_MS)
    head_ms: float | None = None  # the gateway's LM head on one row, as measured; None: its bytes over the bandwidth
    # state
    awake: bool = False  # its process runs and the gateway counts it (a sleeping or crashed one does not)
    owner_busy: bool = False
    last_input: float = -math.inf  # when the owner last used it
    lend: LendState = field(default_factory=lambda: LendState(Lending.UNAVAILABLE, 0.0, "starting"))
    plugged: bool = True
    battery: float = 100.0  # % at battery_t
    battery_t: float = 0.0
    cached: set = field(default_factory=set)  # layers in its tensor store on disk
    busy: list = field(default_factory=list)  # (start, end) of the forwards it has ahead, in order of start
    busy_s: float = 0.0
    wake: int = 0  # policy wake-ups carry this; a newer one makes older ones stale
    profile: planner.NodeProfile | None = None  # as the gateway saw it when it joined

    @property
    def info(self) -> Info:
        return Info(self.id, self.machine.lent_bytes, self.machine.matmul_bytes_per_ms, self.machine.backend,
                    self.machine.name)

    @property
    def rtt_ms(self) -> float:
        return self.link.rtt_ms

    @property
    def laptop(self) -> bool:
        return self.machine.form == "laptop"

    def forward_ms(self, layers: int, layer_bytes: int, rows: int, kv_bytes: int, flops: float) -> float:
        """One forward of `rows` rows over `layers` layers: weights and KV streamed, or rows computed, the slower."""
        streamed = (layer_bytes + kv_bytes) / self.machine.matmul_bytes_per_ms
        computed = rows * flops / self.machine.flops_per_ms
        overhead = FORWARD_OVERHEAD_MS[self.machine.backend] if self.overhead_ms is None else self.overhead_ms
        return overhead + layers * max(streamed, computed)


@dataclass(frozen=True)
class Request:
    arrival: float
    prompt: int
    answer: int  # tokens it will generate (its end token comes then)


@dataclass(eq=False)
class Session:
    """A generation as the gateway's RemoteSession holds it, and the batcher's view of its pending step."""
    request: Request
    kv_tokens: int
    route: tuple = ()
    model: object = None  # the pipeline it runs on (batcher.select batches a span's jobs: one route here)
    rows: int = 0  # rows of its pending step
    computed: int = 0
    generated: int = 0
    first_token: float | None = None
    last_token: float = 0.0
    failed_at: float | None = None  # its last step failed then; cleared by the step's token (recovery time)
    recovering: bool = False  # moving to a new route now
    done: bool = False

    @property
    def cache(self) -> "Session":  # one KV cache per session (batcher.select takes each session once)
        return self

    @property
    def context(self) -> int:
        return self.request.prompt + self.generated


@dataclass
class Options:
    """What the gateway runs with (the CLI's defaults) and what the simulation records."""
    config: planner.PlanConfig = field(default_factory=lambda: planner.PlanConfig(privacy_prefix=2, privacy_suffix=1))
    replicas: int = 0
    even: bool = False  # split evenly, as `duskpool swarm` does (its nodes share one CPU)
    max_tokens: int | None = 1024  # what each request asks for; None: nothing, it reserves the whole context
    max_queue: int = 512
    queue_timeout_s: float = 120.0
    sample_s: float = 60.0
    check: bool = True  # assert the invariants after every change of membership
    progress: Callable[[str], None] | None = None


class Pipeline:
    """The sessions on one route and the micro-batches travelling it: up to one per stage of the ring (the gateway and
    each node), each a lane taking what the batcher's rule gives it."""

    def __init__(self, world: "World", route: tuple):
        self.world, self.route = world, route
        self.nodes = [world.nodes[node_id] for _, node_id in route]
        self.waiting: deque[Session] = deque()
        self.in_round: dict[simpy.Process, list[Session]] = {}  # each lane's micro-batch on its way
        self.lanes: list[simpy.Process] = []
        self.dead = False

    def submit(self, session: Session) -> None:
        session.model = self
        self.waiting.append(session)
        if len(self.lanes) < self.stages:  # a lane that finds nothing left when it starts ends at once
            self.lanes.append(self.world.env.process(self._lane()))

    def _lane(self):
        world, lane = self.world, self.world.env.active_process
        while self.waiting and not self.dead:
            batch = micro_batch(len(self.sessions()), self.stages)
            taken, self.waiting = select(self.waiting, PREFILL_ROWS, batch)
            chunks = chunk_rows(taken, PREFILL_ROWS)
            self.in_round[lane] = taken
            try:
                yield world.env.timeout(world.round_time(self, taken, chunks))
            except simpy.Interrupt:
                return  # a node of the route is gone: World._gone hands its sessions to recovery
            for session, n in zip(taken, chunks, strict=True):
                if self.dead:  # a token just handed out ended a drain: the rest of the batch moves
                    break
                session.computed += n
                if session.computed == session.rows:
                    world.token(session)
                elif not session.done:
                    self.waiting.appendleft(session)  # a prompt's next chunk keeps its place
            del self.in_round[lane]
        self.lanes.remove(lane)

    @property
    def stages(self) -> int:
        return len(self.route) + 1  # the gateway's own layers are a stage of the ring too (Gateway.stages)

    def sessions(self) -> list[Session]:
        return [s for taken in self.in_round.values() for s in taken] + list(self.waiting)


class Histogram:
    """Counts in 1% buckets of a log scale: percentiles of millions of samples in constant memory."""
    STEP = math.log(1.01)

    def __init__(self):
        self.counts: dict[int, int] = {}
        self.n = 0

    def add(self, x: float, n: int = 1) -> None:
        b = math.floor(math.log(max(x, 1e-6)) / self.STEP)
        self.counts[b] = self.counts.get(b, 0) + n
        self.n += n

    def quantile(self, q: float) -> float | None:
        if not self.n:
            return None
        seen, rank = 0, q * (self.n - 1)
        for b in sorted(self.counts):
            seen += self.counts[b]
            if seen > rank:
                return math.exp((b + 0.5) * self.STEP)
        return None


@dataclass
class Sample:
    t: float
    lent: int
    awake: int
    route_stages: int
    active: int
    queued: int
    tokens: int  # generated since the last sample
    replans: int
    weight_bytes: int


class World:
    def __init__(self, model: planner.ModelProfile, flops: float, gateway: SimNode, nodes: list[SimNode],
                 requests: list[Request], horizon: float, seed: int, options: Options, start: float = 0.0):
        self.model, self.flops, self.gateway, self.options = model, flops, gateway, options
        self.nodes = {n.id: n for n in nodes}
        self.requests, self.horizon, self.start = requests, horizon, start
        self.env = simpy.Environment(initial_time=start)
        self.net = random.Random(f"{seed}:net")
        self.faults = random.Random(f"{seed}:faults")
        # the gateway's membership, as cluster/membership.py keeps it
        self.spans: list[Span] = []
        self.holders: dict[Span, list[str]] = {}
        self.route: tuple = ()
        self.live: dict[str, SimNode] = {}  # counted on (its process runs), in the order they joined
        self.draining: dict[str, list[Span]] = {}
        self.broken: str | None = None
        self.lock = simpy.Resource(self.env, 1)  # Membership._lock, held through a reroute and its loads
        self.join_lock = simpy.Resource(self.env, 1)
        self.repairs = 0  # reroutes and joins under way (a span may be uncovered meanwhile)
        self.pipelines: dict[tuple, Pipeline] = {}
        # the admission queue (api/service.py)
        self.queue: deque[tuple[Session, float]] = deque()
        self.reserved = 0
        self.active: list[Session] = []
        # what is recorded
        self.plan: planner.Plan | None = None
        self.completed = 0
        self.lost: dict[str, int] = {}
        self.tokens = self._tokens_at_sample = 0
        self.ttft, self.token_latency, self.recovery = Histogram(), Histogram(), Histogram()
        self.replans = self.placements = self.weight_bytes = self.first_load_bytes = 0
        self.deaths = self.drains = self.drain_timeouts = 0
        self.samples: list[Sample] = []
        self.invariant_checks = 0

    # --- time ------------------------------------------------------------------------------------------------
    def at(self, when: float, fn: Callable, *args) -> None:
        """Call fn(*args) at simulated time `when` (now, if it is past)."""
        event = self.env.timeout(max(0.0, when - self.env.now))
        event.callbacks.append(lambda _: fn(*args))

    def run(self) -> None:
        for node in self.nodes.values():
            self._schedule_owner(node)
        self._first_plan()
        self.env.process(self._arrivals())
        self.env.process(self._sampler())
        self.env.run(until=self.start + self.horizon)
        self._account()

    # --- the owners, their machines and the lending policy -------------------------------------------------
    def _schedule_owner(self, node: SimNode) -> None:
        """The owner's days as events; at the start, a node whose owner is away counts as lent for a while already
        (the simulation begins in the middle of the pool's life, not at its first boot)."""
        t0 = self.start
        busy = sorted(iv for day in node.days for iv in day.busy)
        awake = _merge(sorted(iv for day in node.days for iv in day.awake))
        for a, b in busy:
            if b <= t0:
                node.last_input = max(node.last_input, b)
            elif a <= t0:
                node.owner_busy = True
            else:
                self.at(a, self._owner, node, True)
            if b > t0:
                self.at(b, self._owner, node, False)
        for a, b in awake:
            if a <= t0 < b:
                node.awake = True
            elif a > t0:
                self.at(a, self._wake_up, node)
            if t0 < b < self.start + self.horizon:
                self.at(b, self._sleep, node, "its owner took it away (asleep)")
        day = self._day(node, t0)
        node.plugged = day.plugged if day else True
        node.battery, node.battery_t = self.faults.uniform(50, 100), t0
        if node.awake:
            machine = self._machine(node, t0)
            ready = step(LendState(Lending.AVAILABLE, t0 - 3600, "lent"), machine, t0, 0, node.policy)
            lent = ready.lending is Lending.AVAILABLE
            node.lend = ready if lent else LendState(Lending.UNAVAILABLE, t0, ready.reason)
            if node.lend.lending is not Lending.AVAILABLE:
                self._policy_wakeups(node)
        rate = 1 / (HOUR * (1000.0 if node.machine.form == "server" else 500.0))  # crashes: panics, OOM kills, updates
        self.at(t0 + self.faults.expovariate(rate), self._crash, node, rate)
        if node.link.kind == "wifi":
            blip = 1 / (8 * HOUR)
            self.at(t0 + self.faults.expovariate(blip), self._blip, node, blip)

    def _day(self, node: SimNode, t: float) -> Day | None:
        index = int((t - self.start) // (24 * HOUR))
        return node.days[index] if 0 <= index < len(node.days) else None

    def _machine(self, node: SimNode, now: float) -> MachineState:
        """The probe a node would read now (idle/probes.py's MachineState)."""
        idle = 0.0 if node.owner_busy else now - node.last_input
        if not node.laptop:
            return MachineState(idle_seconds=idle, on_ac=True)
        return MachineState(idle_seconds=idle, on_ac=node.plugged, battery_percent=self._battery(node, now),
                            lid_closed=False)

    def _battery(self, node: SimNode, now: float) -> float:
        """Charging at 40%/h on its charger; on battery 8%/h, 25%/h while it holds a span and serves."""
        serving = node.lend.lending is Lending.AVAILABLE and bool(held_by(self.holders, node.id))
        rate = 40.0 if node.plugged else (-25.0 if serving else -8.0)
        level = min(100.0, max(0.0, node.battery + rate * (now - node.battery_t) / HOUR))
        node.battery, node.battery_t = level, now
        return level

    def _owner(self, node: SimNode, busy: bool) -> None:
        node.owner_busy = busy
        if not busy:
            node.last_input = self.env.now
        elif (day := self._day(node, self.env.now)) is not None:
            node.plugged = day.plugged
        self._step_policy(node)

    def _step_policy(self, node: SimNode) -> None:
        """idle.policy.step on a fresh probe, as NodeService.update_lending does; a change reaches the gateway as the
        node's health status (SERVING or not), and a drain that timed out ends the node's sessions."""
        if not node.awake:
            return
        now = self.env.now
        old = node.lend
        node.lend = step(old, self._machine(node, now), now, self._in_flight(node), node.policy)
        if node.lend.drain_timed_out and not old.drain_timed_out:
            self.drain_timeouts += 1
            self._end_sessions_on(node, f"node {node.id} drained too long (its owner is back)")
        was, lent = old.lending is Lending.AVAILABLE, node.lend.lending is Lending.AVAILABLE
        if was != lent and node.id in self.live:
            self._set_lending(node, lent)
        self._policy_wakeups(node)

    def _policy_wakeups(self, node: SimNode) -> None:
        """When the policy could decide otherwise with no new input: the owner away long enough, conditions held
        settle_s, a drain timing out, a battery reaching its floor. (The real node steps every 2 s.)"""
        node.wake += 1
        now, state, policy = self.env.now, node.lend, node.policy
        times = []
        if state.lending is not Lending.AVAILABLE and not node.owner_busy:
            times.append(node.last_input + policy.idle_after_s)
            times.append(max(now, node.last_input + policy.idle_after_s) + policy.settle_s)
            if state.ok_since is not None:
                times.append(state.ok_since + policy.settle_s)
        if state.lending is Lending.DRAINING and policy.drain_timeout_s is not None:
            times.append(state.since + policy.drain_timeout_s)
        if node.laptop and not node.plugged and policy.min_battery is not None:
            times.append(now + 600.0)  # follow the battery down (or up) every 10 min
        for t in sorted({t for t in times if t >= now}):
            self.at(t + 1e-3, self._wakeup, node, node.wake)

    def _wakeup(self, node: SimNode, wake: int) -> None:
        if wake == node.wake:
            self._step_policy(node)

    def _in_flight(self, node: SimNode) -> int:
        return sum(1 for s in self.active if any(node_id == node.id for _, node_id in s.route))

    # --- a node's process: it wakes, sleeps, crashes ---------------------------------------------------------
    def _wake_up(self, node: SimNode) -> None:
        if node.awake:
            return
        node.awake = True
        node.lend = LendState(Lending.UNAVAILABLE, self.env.now, "starting")
        self._step_policy(node)
        self.at(self.env.now + REJOIN_POLL_S * self.faults.random(), self._join, node)

    def _sleep(self, node: SimNode, reason: str) -> None:
        if not node.awake:
            return
        node.awake = False
        self._gone(node, reason, self.faults.uniform(*LINK_LOSS_DETECT_S))

    def _crash(self, node: SimNode, rate: float) -> None:
        if node.awake:
            node.awake = False
            self._gone(node, "its process crashed", PROCESS_DEATH_DETECT_S)
            back = self.env.now + self.faults.uniform(20, 180)  # launchd / systemd restarts it
            self.at(back, self._restart, node)
        self.at(self.env.now + self.faults.expovariate(rate), self._crash, node, rate)

    def _restart(self, node: SimNode) -> None:
        if any(a <= self.env.now < b for day in node.days for a, b in day.awake):
            self._wake_up(node)

    def _blip(self, node: SimNode, rate: float) -> None:
        if node.awake:
            node.awake = False
            self._gone(node, "its Wi-Fi dropped", self.faults.uniform(*LINK_LOSS_DETECT_S))
            self.at(self.env.now + self.faults.uniform(3, 60), self._restart, node)
        self.at(self.env.now + self.faults.expovariate(rate), self._blip, node, rate)

    def _gone(self, node: SimNode, reason: str, detect_s: float) -> None:
        """The node stops answering: the batch on any route through it never comes back; the gateway notices
        after `detect_s`. Its memory is lost, its disk cache is not."""
        for pipeline in [p for p in self.pipelines.values() if node in p.nodes]:
            self._stop_pipeline(pipeline)
            self.at(self.env.now + detect_s, self._fail_sessions, pipeline.sessions(), f"node {node.id}: {reason}")
        self.at(self.env.now + detect_s, self._mark_gone, node)

    # --- membership (cluster/membership.py), decisions by route.py and the planner -------------------------
    def _first_plan(self) -> None:
        """Gateway.start: plan over the nodes lent now (planner.first_plan), load the spans, serve."""
        lent = [n for n in self.nodes.values() if n.awake and n.lend.lending is Lending.AVAILABLE]
        self.plan = planner.first_plan(self.model, lent, self.options.config, self.options.even, self.options.replicas)
        self.spans = [(s.start, s.stop) for s in self.plan.stages]
        self.holders = {span: [] for span in self.spans}
        for s in self.plan.stages + self.plan.replicas:
            self.holders[(s.start, s.stop)].append(s.node_id)
            self._count_load(self.nodes[s.node_id], (s.start, s.stop))  # streamed before serving starts
        self.route = tuple(((s.start, s.stop), s.node_id) for s in self.plan.stages)
        self.first_load_bytes = self.weight_bytes
        self.live = {n.id: n for n in self.nodes.values() if n.awake}  # the others join as they wake
        for node in self.live.values():
            if node.lend.lending is not Lending.AVAILABLE:
                self.draining[node.id] = []  # its health status says NOT_SERVING: it takes nothing yet
            node.profile = planner.node_profile(node, self.model.layer_bytes, self.options.even)
        self.check()

    def _lent(self) -> list[SimNode]:
        return [n for n in self.live.values() if n.id not in self.draining]

    def _route_ok(self) -> bool:
        return bool(self.route) and all(node_id in self.live and node_id in self.holders[span]
                                        for span, node_id in self.route)

    def _mark_gone(self, node: SimNode) -> None:
        """Membership._mark_gone: drop it from the holders; if it was on the route, rebuild the route."""
        if node.id not in self.live:
            return
        self.deaths += 1
        del self.live[node.id]
        self.draining.pop(node.id, None)
        for span in held_by(self.holders, node.id):
            self.holders[span].remove(node.id)
        if any(node_id == node.id for _, node_id in self.route):
            self._repair(self._reroute())
        self.check()

    def _set_lending(self, node: SimNode, lent: bool) -> None:
        """Membership._set_lending: a draining node leaves the holders (new sessions take a route without it);
        lending again, it holds what it held before."""
        if lent == (node.id not in self.draining):
            return
        if lent:
            for span in self.draining.pop(node.id):
                if node.id not in self.holders[span]:
                    self.holders[span].append(node.id)
            if self.broken or not self._route_ok():
                self._repair(self._reroute())
        else:
            self.drains += 1
            self.draining[node.id] = held_by(self.holders, node.id)
            for span in self.draining[node.id]:
                self.holders[span].remove(node.id)
            if any(node_id == node.id for _, node_id in self.route):
                self._repair(self._reroute())
        self.check()
        self._admit()

    def _join(self, node: SimNode) -> None:
        """Membership.add_node: a node (back) at its address joins; its first health status says whether it lends."""
        if not node.awake or node.id in self.live:
            return
        node.profile = planner.node_profile(node, self.model.layer_bytes, self.options.even)
        self.live[node.id] = node
        if node.lend.lending is not Lending.AVAILABLE:
            self.draining[node.id] = []
        self._repair(self._add_node(node))

    def _add_node(self, node: SimNode):
        with self.join_lock.request() as turn:
            yield turn
            yield from self._place(self.spans, 1 + self.options.replicas)
        if not self._route_ok() or self.broken:
            yield from self._reroute()

    def _repair(self, work) -> None:
        """Run a reroute or a join; the invariants allow an uncovered span only while one is under way."""
        self.repairs += 1  # at once: the process starts on the next event

        def run():
            try:
                yield from work
            finally:
                self.repairs -= 1
                self.check()
                self._admit()
        self.env.process(run())

    def _place(self, spans: list[Span], copies: int):
        """Membership._place: planner.replicate picks the nodes; each loads its span (only what its cache lacks)."""
        lent = self._lent()
        held = {n.id: held_by(self.holders, n.id) for n in lent}
        added, _ = planner.replicate(self.model, [n.profile for n in lent], spans, held, copies, self.options.config)
        for stage in added:
            node, span = self.nodes[stage.node_id], (stage.start, stage.stop)
            yield self.env.timeout(self._count_load(node, span))
            if node.id in self.live and take_loaded(self.holders, self.draining, node.id, span):
                self.placements += 1

    def _count_load(self, node: SimNode, span: Span) -> float:
        """Seconds to load `span` onto `node`: new layers over the network, cached ones from its disk."""
        layers = range(*span)
        new = [i for i in layers if i not in node.cached]
        node.cached.update(layers)
        self.weight_bytes += len(new) * self.model.layer_bytes
        link = min(self.gateway.link.bandwidth_bytes_per_s, node.link.bandwidth_bytes_per_s)
        return (len(new) / link + (len(layers) - len(new)) / DISK_BYTES_PER_S) * self.model.layer_bytes

    def _reroute(self):
        """Membership.reroute: under the lock; orphan spans are placed (loads and all) before the route is rebuilt."""
        with self.lock.request() as turn:
            yield turn
            if self._route_ok() and not self.broken:
                return
            if missing := orphans(self.spans, self.holders):
                yield from self._place(missing, 1)
            if lost := orphans(self.spans, self.holders):
                self.broken = f"layers {', '.join(f'[{a}, {b})' for a, b in lost)} have no live node with room"
                return
            self.route = tuple(rebuild(self.spans, self.holders, {span: node_id for span, node_id in self.route}))
            self.broken = None
            self.replans += 1

    # --- requests: admission, sessions, tokens, recovery -----------------------------------------------------
    def _arrivals(self):
        for request in self.requests:
            if request.arrival >= self.start + self.horizon:
                return
            yield self.env.timeout(request.arrival - self.env.now)
            context = self.options.config.context  # api/service.py: prompt + max_tokens, else the whole context
            kv = context if self.options.max_tokens is None else min(context, request.prompt + self.options.max_tokens)
            session = Session(request, kv)
            if len(self.queue) >= self.options.max_queue:
                self._lose(session, "429: the admission queue is full")
                continue
            self.queue.append((session, self.env.now + self.options.queue_timeout_s))
            self.at(self.env.now + self.options.queue_timeout_s, self._expire, session)
            self._admit()

    def _capacity(self) -> int:
        """api/service.py kv_capacity: each route stage's lent memory (free + its caches) over its layers."""
        stages = []
        for span, node_id in self.route:
            node = self.nodes[node_id]
            weights = sum(b - a for a, b in held_by(self.holders, node_id)) * self.model.layer_bytes
            stages.append((node.machine.lent_bytes - weights, span[1] - span[0]))
        return admission.kv_capacity(stages, self.model.kv_bytes_per_token)

    def _admit(self) -> None:
        while self.queue and admission.admits(self.reserved, self.queue[0][0].kv_tokens, self._capacity(),
                                              len(self.active)):
            session, _ = self.queue.popleft()
            self.reserved += session.kv_tokens
            self.active.append(session)
            self._start(session, self.route)

    def _expire(self, session: Session) -> None:
        for i, (queued, _) in enumerate(self.queue):
            if queued is session:
                del self.queue[i]
                self._lose(session, "503: no room freed within the queue timeout")
                return

    def _usable(self, route: tuple) -> bool:
        """Every stage's node live and lending (a draining one refuses new sessions)."""
        return bool(route) and all(node_id in self.live and self.nodes[node_id].awake
                                   and self.nodes[node_id].lend.lending is Lending.AVAILABLE for _, node_id in route)

    def _start(self, session: Session, route: tuple) -> None:
        if not self._usable(route):
            self.env.process(self._recover(session, "the route is not usable"))
            return
        session.route = route
        session.rows, session.computed = session.context, 0
        self._pipeline(route).submit(session)

    def _pipeline(self, route: tuple) -> Pipeline:
        pipeline = self.pipelines.get(route)
        if pipeline is None or pipeline.dead:
            pipeline = self.pipelines[route] = Pipeline(self, route)
        return pipeline

    def token(self, session: Session) -> None:
        """A step's logits came back: a token for the client."""
        now = self.env.now
        if session.failed_at is not None:
            self.recovery.add(now - session.failed_at)
            session.failed_at = None
        if session.first_token is None:
            session.first_token = now
            self.ttft.add(now - session.request.arrival)
        else:
            self.token_latency.add(now - session.last_token)
        session.last_token = now
        session.generated += 1
        self.tokens += 1
        if session.generated >= session.request.answer:
            self.completed += 1
            self._end(session)
            return
        session.rows, session.computed = 1, 0
        if not session.recovering:
            session.model.submit(session)

    def _end(self, session: Session) -> None:
        session.done = True
        self.active.remove(session)
        self.reserved -= session.kv_tokens
        for _, node_id in session.route:  # a draining node may now be empty
            node = self.nodes[node_id]
            if node.lend.lending is Lending.DRAINING:
                self._step_policy(node)
        self._admit()

    def _lose(self, session: Session, reason: str) -> None:
        self.lost[reason] = self.lost.get(reason, 0) + 1
        if session in self.active:
            self._end(session)

    def _stop_pipeline(self, pipeline: Pipeline) -> None:
        pipeline.dead = True
        for lane in pipeline.lanes:
            if lane.is_alive and lane is not self.env.active_process:
                lane.interrupt()
        if self.pipelines.get(pipeline.route) is pipeline:
            del self.pipelines[pipeline.route]

    def _end_sessions_on(self, node: SimNode, why: str) -> None:
        """The node ended its sessions (a drain that timed out): their steps fail, and they move."""
        for pipeline in [p for p in self.pipelines.values() if node in p.nodes]:
            self._stop_pipeline(pipeline)
            self._fail_sessions(pipeline.sessions(), why)

    def _fail_sessions(self, sessions: list[Session], why: str) -> None:
        for session in sessions:
            if not session.done and not session.recovering:
                session.recovering = True
                self.env.process(self._recover(session, why))

    def _recover(self, session: Session, why: str):
        """RemoteSession._recover: Membership.recover (rebuild the route unless the failure was the request's),
        then re-prefill the session's whole history on the new route; each round finds another node gone or gives
        up. The client sees a pause, not an error."""
        session.recovering = True
        if session.failed_at is None:
            session.failed_at = self.env.now
        for _ in range(len(self.nodes) + 1):
            if self._usable(session.route) and session.route == self.route:
                break
            done = self.env.process(self._reroute())
            self.repairs += 1
            try:
                yield done
            finally:
                self.repairs -= 1
            if self.broken:
                self._lose(session, "the route is broken: a span has no live node with room")
                return
            if self._usable(self.route):
                session.route = self.route
                break
            why = "a node of the rebuilt route refused the session (it is not lent)"
        else:
            self._lose(session, f"recovery gave up: {why}")
            return
        session.recovering = False
        if session.done:
            return
        # the failed step's history (prompt and every token fed so far) goes through again, as one long prompt
        session.rows, session.computed = session.context, 0
        self._pipeline(session.route).submit(session)

    # --- the data path's time --------------------------------------------------------------------------------
    def round_time(self, pipeline: Pipeline, taken: list[Session], chunks: list[int]) -> float:
        """Seconds for one batch through the route: the gateway's prefix, each hop and stage, the hop back, the
        suffix and the head. Each machine is busy while it computes; a batch waits for one busy with another."""
        rows = sum(chunks)
        kv = sum(s.context for s in taken) * self.model.kv_bytes_per_token  # per layer: attention reads every key
        heads = sum(1 for s, n in zip(taken, chunks, strict=True) if s.computed + n == s.rows)
        plan, model = self.plan, self.model
        t = self._compute(self.gateway, len(plan.prefix), rows, kv, self.env.now)
        hidden = rows * model.hidden_bytes_per_token
        for (span, _), node in zip(pipeline.route, pipeline.nodes, strict=True):
            t += node.link.hop_ms(self.net, hidden) / 1000
            t = self._compute(node, span[1] - span[0], rows, kv, t)
        t += self.gateway.link.hop_ms(self.net, hidden) / 1000
        t = self._compute(self.gateway, len(plan.suffix), rows, kv, t)
        return t + self._head_ms(heads) / 1000 - self.env.now

    def _head_ms(self, rows: int) -> float:
        gateway, head = self.gateway, self.model.edge_bytes / 2  # the LM head is about half the edges
        if gateway.head_ms is not None:
            return gateway.head_ms * max(1, rows)
        return head / gateway.machine.matmul_bytes_per_ms + rows * 2 * head * 8 / 4.85 / gateway.machine.flops_per_ms

    def _compute(self, node: SimNode, layers: int, rows: int, kv: int, t: float) -> float:
        """When a forward reaching `node` at t ends: it starts in the first gap from t on between the forwards the
        node has ahead (another lane's, booked earlier, may come later than this one: the gateway's suffix)."""
        if layers == 0:
            return t
        seconds = node.forward_ms(layers, self.model.layer_bytes, rows, kv, self.flops) / 1000
        node.busy = [(a, b) for a, b in node.busy if b > self.env.now]
        start, at = t, len(node.busy)
        for i, (a, b) in enumerate(node.busy):
            if start + seconds <= a:
                at = i
                break
            start = max(start, b)
        node.busy.insert(at, (start, start + seconds))
        node.busy_s += seconds
        return start + seconds

    # --- what is recorded, and the invariants ----------------------------------------------------------------
    def _sampler(self):
        while True:
            yield self.env.timeout(self.options.sample_s)
            self.samples.append(Sample(self.env.now, len(self._lent()), len(self.live), len(self.route),
                                       len(self.active), len(self.queue), self.tokens - self._tokens_at_sample,
                                       self.replans, self.weight_bytes))
            self._tokens_at_sample = self.tokens
            self.check()
            if self.options.progress and len(self.samples) % max(1, int(HOUR / self.options.sample_s)) == 0:
                self.options.progress(f"{(self.env.now - self.start) / HOUR:.0f}/{self.horizon / HOUR:.0f} h "
                                      f"simulated: {self.tokens} tokens, {self.completed} requests done, "
                                      f"{len(self._lent())} nodes lent")

    def check(self) -> None:
        """No span uncovered while a lent node has room for it (unless a reroute or join is placing it now);
        the route runs through live holders unless broken or being rebuilt."""
        if not self.options.check:
            return
        self.invariant_checks += 1
        if self.repairs or self.lock.count or self.join_lock.count:
            return
        per_layer = planner.layer_memory(self.model, self.options.config)
        for span in orphans(self.spans, self.holders):
            room = [n.id for n in self._lent()
                    if (sum(b - a for a, b in held_by(self.holders, n.id)) + span[1] - span[0]) * per_layer
                    <= planner.usable_bytes(n.profile, self.options.config)]
            if room:
                raise InvariantViolated(f"t={self.env.now:.1f}: layers {span} have no holder though {room[:3]} have "
                                        "room and no reroute or join is under way")
        if not self.broken and self.spans and not self._route_ok():
            raise InvariantViolated(f"t={self.env.now:.1f}: the route {self.route} runs through a node that is gone "
                                    "or holds its span no longer, and it is neither broken nor being rebuilt")

    def _account(self) -> None:
        """Every request that arrived is completed, lost with a reason, or still running or queued at the end."""
        arrived = sum(1 for r in self.requests if r.arrival < self.start + self.horizon)
        unfinished = len(self.active) + len(self.queue)
        if arrived != self.completed + sum(self.lost.values()) + unfinished:
            raise InvariantViolated(f"{arrived} requests arrived but {self.completed} completed, "
                                    f"{sum(self.lost.values())} lost with a reason and {unfinished} unfinished")
        self.unfinished = unfinished
        self.arrived = arrived


def _merge(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Touching or overlapping intervals as one (a desktop awake day after day is awake throughout)."""
    out: list[tuple[float, float]] = []
    for a, b in intervals:
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out
