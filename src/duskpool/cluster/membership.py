"""Membership: the gateway's view of its nodes. Which live, which drain (their owner is back), which hold each
span, and the route through them.

A node is counted gone when its Health.Watch stream ends (the process died; keepalive gives up on a cut link
within ~2 s) or when it does not answer a probe after a step failed on it. Its spans fall back to their other
holders; a span that lost every holder is loaded onto the node the planner picks; the route is rebuilt from
live holders (`reroute`). A node that answers again at its address, or joins anew (`add_node`), takes spans
that lack copies. A node whose owner comes back (its health turns NOT_SERVING) drains: it finishes its
sessions, takes no new ones, and leaves the route until it lends again.

Identity: the gateway learns which member's certificate answers at each address when it first reaches it, and
from then on talks there only to that member (its channels check the member's name in every handshake); a node
that comes back at that address with another member's certificate is refused. A node's claimed speed is checked
against a timed step through it (`check_claims`): one much slower than it claims counts at its measured speed,
and its spans get copies on other nodes, which the route prefers. Its claimed memory is checked when it is used: a
node that refuses a span, or a session's KV cache, for lack of memory counts from then on as lending only what its
spans take (`lower_claim`), and is planned around the same way.
"""

import dataclasses
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from duskpool.cluster import planner
from duskpool.cluster.planner import GATEWAY_PROFILE, even_plan, first_plan, node_profile  # noqa: F401
from duskpool.cluster.proto import duskpool_pb2 as pb
from duskpool.cluster.proto import duskpool_pb2_grpc as pb_grpc
from duskpool.cluster.route import RouteError, RouteStage, Span, held_by, orphans, rebuild, take_loaded
from duskpool.cluster.transfer import WeightSender
from duskpool.cluster.transport import open_channel
from duskpool.cluster.wire import DTYPE_BYTES
from duskpool.models import ModelSpec
from duskpool.security import (
    NodeIdentity,
    PoolState,
    expected_name,
    fingerprint,
    member_id_of,
    member_name,
    server_certificate,
)

REVOCATION_POLL_S = 1.0  # how soon nodes hear of a member revoked with `duskpool nodes revoke` (one SQLite read)
PROBE_TIMEOUT_S = 2.0  # a node that does not answer a health check this fast is counted as gone
REJOIN_POLL_S = 3.0  # how often a node counted gone is asked whether it is back (a Wi-Fi blip, a busy CPU)
REJOIN_GIVE_UP_S = 600.0  # after this long gone, an address is no longer asked
# A node whose timed step takes more than SLOW_FACTOR × its claimed time per layer + SLOW_SLACK_MS is slower than
# it claims (the slack absorbs a busy machine's and Python's noise on a small span)
SLOW_FACTOR, SLOW_SLACK_MS = 4.0, 5.0
CONNECT_TIMEOUT_S = 10.0  # a node named at start (--node, mDNS) that does not answer this fast is skipped
LOCAL_SUBCHANNELS = [("grpc.use_local_subchannel_pool", 1),  # closing another gateway's channel leaves this one
                     ("grpc.initial_reconnect_backoff_ms", 500),  # a node back from a blip is seen within seconds
                     ("grpc.max_reconnect_backoff_ms", 2000)]


class NodeClient:
    """The gateway's connection to one node, pinned to the member whose certificate answered there first (or to
    `expected`, the member learned at that address before), and what it last said about itself."""

    def __init__(self, address: str, identity: NodeIdentity | None, timeout: float = 10.0,
                 expected: int | str | None = None):
        self.address = address
        self.fingerprint: str | None = None  # of the certificate it serves with, which is also the one it sends with
        self.member: int | str | None = None  # its member id (a fingerprint for a certificate from before ids)
        # its own connection: closing another gateway's channel to the same node must not touch this one
        self.channel = open_channel(address, identity, LOCAL_SUBCHANNELS)
        try:
            started = time.perf_counter()
            self.info = self._info(timeout)  # waits until the node is up
            self.rtt_ms = (time.perf_counter() - started) * 1000
            if identity is not None:
                cert = server_certificate(address, identity)
                self.fingerprint, self.member = fingerprint(cert), member_id_of(cert) or fingerprint(cert)
                if expected is not None and self.member != expected:
                    raise RouteError(f"node {address} shows the certificate of member {self.member}, not that of "
                                     f"member {expected}, which served there before")
                if isinstance(self.member, int):  # from now on, only this member's certificate completes a handshake
                    self.channel.close()
                    self.channel = open_channel(address, identity, LOCAL_SUBCHANNELS, name=member_name(self.member))
                    self.info = self._info(timeout)
        except OSError as e:
            self.channel.close()
            raise RouteError(f"cannot reach node {address}: {e}") from None
        except RouteError:
            self.channel.close()
            raise

    def _info(self, timeout: float) -> pb.NodeInfo:
        self.stub = pb_grpc.NodeStub(self.channel)
        try:
            return self.stub.Info(pb.InfoRequest(), timeout=timeout, wait_for_ready=True)
        except grpc.RpcError as e:
            raise RouteError(f"cannot reach node {self.address}: {e.details()}") from None

    @property
    def tls_name(self) -> str:
        """The name its certificate must carry (see transport.open_channel)."""
        return expected_name(self.member)

    def close(self) -> None:
        self.channel.close()


def connect(addresses: list[str], identity: NodeIdentity | None) -> list[NodeClient]:
    """A client for each node that answers within CONNECT_TIMEOUT_S (all asked at once); one that does not (an
    mDNS announcement of a machine that went to sleep, a typo) is skipped with a warning. Raises RouteError when
    none answers."""
    def reach(address: str) -> NodeClient | RouteError:
        try:
            return NodeClient(address, identity, CONNECT_TIMEOUT_S)
        except RouteError as e:
            return e

    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(reach, dict.fromkeys(addresses)))
    clients = [a for a in answers if isinstance(a, NodeClient)]
    failures = [str(a) for a in answers if isinstance(a, RouteError)]
    for failure in failures:
        print(f"duskpool: warning: skipping a node: {failure}", file=sys.stderr, flush=True)
    if not clients:
        raise RouteError("no node answered: " + "; ".join(failures))
    return clients


@dataclass(frozen=True)
class Death:
    """A node the gateway stopped counting on."""
    address: str
    node_id: str
    noticed: float  # time.monotonic() when the gateway noticed
    reason: str


# --- the planner's inputs ---------------------------------------------------------------------------
def model_profile(spec: ModelSpec) -> planner.ModelProfile:
    # hidden states travel as float32
    return planner.ModelProfile(spec.name, spec.n_layers, spec.layer_bytes, spec.kv_bytes_per_token,
                                DTYPE_BYTES["float32"] * spec.dim, spec.edge_bytes)


# node_profile, GATEWAY_PROFILE, even_plan and first_plan live in planner.py (pure; the simulator calls them too)


# --- the members ------------------------------------------------------------------------------------
class Membership:
    """Who holds what, kept current as nodes die, drain, come back and join.

    `on_gone(address, reason)` is told when a node stops being counted on, to fail the steps in flight on it.
    Building one does no network I/O; `load` streams the plan's spans to their nodes, `start` begins watching."""

    def __init__(self, clients: list[NodeClient], plan: planner.Plan, model: planner.ModelProfile,
                 config: planner.PlanConfig, weights: WeightSender, on_gone: Callable[[str, str], None], *,
                 identity: NodeIdentity | None, pool: PoolState | None, even: bool, replicas: int,
                 sink_address: str | None = None):
        self.model, self.config, self.weights, self._on_gone = model, config, weights, on_gone
        self.identity, self.pool, self.even, self.replicas = identity, pool, even, replicas
        self.sink_address = sink_address  # the gateway's sink: nodes send results nowhere else
        self.clients = list(clients)  # the live nodes
        self.client_at = {c.address: c for c in clients}  # every node ever known, by address
        self.pinned = {c.address: c.member for c in clients}  # the member learned at each address, kept for good
        self.slow: dict[str, float] = {}  # address -> ms per layer measured, for nodes slower than they claim
        self.short: dict[str, int] = {}  # address -> bytes it counts as lending, for nodes short of what they claim
        self.gone: dict[str, str] = {}  # address -> why it is counted gone
        # address -> the spans it held when it stopped lending: alive, finishing its sessions, given no new ones
        self.draining: dict[str, list[Span]] = {}
        self.deaths: list[Death] = []
        self.broken: str | None = None  # why no route can serve: a span with no live holder and no room for it
        self.closing = False
        # `_lock` guards the route, the holders, the clients and the gone; it is held while a route is rebuilt,
        # so sessions that failed together wait for one rebuild
        self._lock = threading.RLock()
        self._join_lock = threading.Lock()  # one node joins at a time

        address_of = {c.info.node_id: c.address for c in clients}
        self.spans: list[Span] = [(s.start, s.stop) for s in plan.stages]
        # span -> the live nodes holding it, its first route node first
        self.holders: dict[Span, list[str]] = {span: [] for span in self.spans}
        for s in plan.stages + plan.replicas:
            self.holders[(s.start, s.stop)].append(address_of[s.node_id])
        self.route = [RouteStage(s.node_id, address_of[s.node_id], s.start, s.stop) for s in plan.stages]

    def load(self) -> None:
        """Tell every node who the members are, then stream every holder its span (only the tensors its cache
        lacks). A node that refuses its span for memory it claimed leaves the plan: the span goes elsewhere."""
        self.tell_members()
        refused = False
        for span, addresses in self.holders.items():
            for address in list(addresses):
                try:
                    self._load(address, span)
                except RouteError as e:
                    if e.short is None:
                        raise
                    addresses.remove(address)
                    self.lower_claim(address, f"refused layers [{span[0]}, {span[1]}) for memory")
                    refused = True
        if refused:  # raises when no node can take a refused span
            self.reroute()

    def start(self) -> None:
        """Watch every node; push revocations (when this gateway keeps the pool); take back returning nodes."""
        for client in self.clients:
            self._start_watch(client)
        if self.pool is not None and self.identity is not None:
            threading.Thread(target=self._push_revocations, daemon=True).start()
        threading.Thread(target=self._rejoin_returning, daemon=True, name="rejoin").start()

    def _profiles(self) -> list[planner.NodeProfile]:
        """The live nodes as the planner sees them (their memory as it was when they joined)."""
        # a node caught slower than it claims counts at its measured speed, local swarm or not; one caught short of
        # memory, as lending what it holds
        return [dataclasses.replace(p, ms_per_layer=max(p.ms_per_layer, self.slow.get(c.address, 0.0)),
                                    free_bytes=min(p.free_bytes, self.short.get(c.address, p.free_bytes)))
                for c in self._lent() for p in [node_profile(c, self.model.layer_bytes, even=self.even)]]

    def doubtful(self, address: str) -> bool:
        """Whether the node at `address` was caught doing less than it claims: slower, or short of memory."""
        return address in self.slow or address in self.short

    def _lent(self) -> list[NodeClient]:
        """The live nodes that take new sessions (not draining)."""
        return [c for c in self.clients if c.address not in self.draining]

    def _load(self, address: str, span: Span) -> None:
        try:
            self.weights.send(self.client_at[address].stub, address, span)
        except grpc.RpcError as e:
            short = address if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else None
            raise RouteError(f"node {address} could not load layers [{span[0]}, {span[1]}): {e.details()}",
                             short=short) from None

    def _place(self, spans: list[Span], copies: int) -> list[tuple[str, Span]]:
        """Load `spans` where the planner says, until each has `copies` live holders or no node has room;
        the (address, span) pairs loaded. Loads run outside the lock (a caller may hold it)."""
        with self._lock:
            id_of = {c.info.node_id: c.address for c in self._lent()}
            held = {c.info.node_id: held_by(self.holders, c.address) for c in self._lent()}
            added, _ = planner.replicate(self.model, self._profiles(), spans, held, copies, self.config)
        placed = []
        for stage in added:
            address, span = id_of[stage.node_id], (stage.start, stage.stop)
            try:
                self._load(address, span)
            except RouteError as e:  # it died or ran out of room meanwhile: the span stays short of this copy
                if e.short is not None:
                    self.lower_claim(address, f"refused layers [{span[0]}, {span[1]}) for memory")
                continue
            with self._lock:
                if self.client_at[address] in self.clients and take_loaded(self.holders, self.draining, address, span):
                    placed.append((address, span))
        return placed

    # --- a node's life ----------------------------------------------------------------------------
    def _start_watch(self, client: NodeClient) -> None:
        threading.Thread(target=self._watch, args=(client,), daemon=True, name=f"watch-{client.address}").start()

    def _watch(self, client: NodeClient) -> None:
        """Health.Watch stays open while the node lives (keepalive pings it every second): its end means the
        node is gone. While it lives, its status says whether it lends itself (SERVING) or drains."""
        reason = "its health stream ended"
        serving = health_pb2.HealthCheckResponse.SERVING
        try:
            for status in health_pb2_grpc.HealthStub(client.channel).Watch(health_pb2.HealthCheckRequest()):
                self._set_lending(client, status.status == serving)
        except grpc.RpcError as e:
            reason = f"{e.code().name}: {e.details()}"
        if not self.closing:
            self._mark_gone(client, reason)

    def _mark_gone(self, client: NodeClient, reason: str) -> None:
        """Stop counting on `client`'s node: fail its steps in flight, drop it from the holders and, if it
        was on the route, rebuild the route now (sessions that failed wait for that)."""
        address = client.address
        with self._lock:
            if client not in self.clients:
                return  # counted gone already
            self.gone[address] = reason
            self.draining.pop(address, None)
            self.clients = [c for c in self.clients if c is not client]
            for holders in self.holders.values():
                if address in holders:
                    holders.remove(address)
            self.deaths.append(Death(address, client.info.node_id, time.monotonic(), reason))
            on_route = any(s.address == address for s in self.route)
        self._on_gone(address, f"node {client.info.node_id} at {address} is gone ({reason})")
        if on_route:
            threading.Thread(target=self._reroute_quietly, daemon=True).start()

    def _set_lending(self, client: NodeClient, lent: bool) -> None:
        """A node stopped lending (its owner is back: it finishes its sessions, takes no new ones) or lends
        again. Draining, it leaves the holders, so new sessions get a route without it (its spans loaded
        elsewhere if no replica has them); lending again, it holds what it held before."""
        address = client.address
        with self._lock:
            if client not in self.clients or lent == (address not in self.draining):
                return
            if lent:
                for span in self.draining.pop(address):
                    if address not in self.holders[span]:
                        self.holders[span].append(address)
                if self.broken or not self._route_ok():
                    threading.Thread(target=self._reroute_quietly, daemon=True).start()
                return
            self.draining[address] = held_by(self.holders, address)
            for span in self.draining[address]:
                self.holders[span].remove(address)
            on_route = any(s.address == address for s in self.route)
        if on_route:
            threading.Thread(target=self._reroute_quietly, daemon=True).start()

    def _probe(self, addresses: list[str]) -> None:
        """Health-check the nodes at `addresses` at once; count those that do not answer as gone."""
        def check(client: NodeClient) -> None:
            try:
                health_pb2_grpc.HealthStub(client.channel).Check(health_pb2.HealthCheckRequest(),
                                                                 timeout=PROBE_TIMEOUT_S)
            except grpc.RpcError as e:
                self._mark_gone(client, f"no answer to a health check ({e.code().name})")

        live = [c for c in self.clients if c.address in addresses]
        checks = [threading.Thread(target=check, args=(c,), daemon=True) for c in live]
        for t in checks:
            t.start()
        for t in checks:
            t.join()

    def live(self, stage: RouteStage) -> bool:
        """Whether the node `stage` names still runs (not one restarted at the same address since)."""
        client = self.client_at.get(stage.address)
        return client is not None and client in self.clients and client.info.node_id == stage.node_id

    # --- the route --------------------------------------------------------------------------------
    def recover(self, failure: RouteError) -> None:
        """Make the route serve again after `failure`. Returns once the route's nodes are all live holders;
        raises `failure` itself when no node it ran through is gone (then it was no fault of the route's:
        a refused request, say), and a RouteError when some span has no live node and none can load it."""
        def usable(stage: RouteStage) -> bool:  # a draining node that gave up a session is no fault either
            return self.live(stage) and stage.address not in self.draining

        if failure.short is not None:  # a node lacked the memory it claimed: the route leaves it, if it can
            self.lower_claim(failure.short, "refused a session's KV cache for memory")
            if any(s.address == failure.short for s in self.route):
                raise failure
            return
        if all(usable(s) for s in failure.route):
            self._probe([s.address for s in failure.route])
        if all(usable(s) for s in failure.route):
            raise failure
        self.reroute()

    def _doubtful_on_route(self) -> bool:
        """Whether a node caught doing less than it claims is on the route while another holder of its span lives."""
        return any(self.doubtful(s.address) and any(not self.doubtful(a) for a in self.holders[s.span])
                   for s in self.route)

    def _route_ok(self) -> bool:
        return all(self.live(s) and s.address in self.holders[s.span] for s in self.route)

    def reroute(self) -> None:
        """Rebuild the route from live holders: a span whose holders are all gone is loaded onto the node
        the planner picks (one with room, holding the fewest layers)."""
        with self._lock:
            if self._route_ok() and not self.broken and not self._doubtful_on_route():
                return
            if missing := orphans(self.spans, self.holders):
                self._place(missing, 1)
            lost = orphans(self.spans, self.holders)
            if lost:
                gone = "; ".join(f"{d.node_id} at {d.address}: {d.reason}" for d in self.deaths[-3:])
                self.broken = (f"layers {', '.join(f'[{a}, {b})' for a, b in lost)} have no live node and no node "
                               f"has room to load them (last gone: {gone})")
                raise RouteError(self.broken)
            # a node doing less than it claims goes last among a span's holders, and leaves the route if another
            # holds it
            holders = {span: [a for a in live if not self.doubtful(a)] or live for span, live in self.holders.items()}
            current = {s.span: s.address for s in self.route if not self.doubtful(s.address)}
            self.route = [RouteStage(self.client_at[address].info.node_id, address, *span)
                          for span, address in rebuild(self.spans, holders, current)]
            self.broken = None

    def _reroute_quietly(self) -> None:
        try:
            self.reroute()
        except RouteError:
            pass  # `broken` says why; the next add_node tries again

    # --- joining ----------------------------------------------------------------------------------
    def add_node(self, address: str) -> list[Span]:
        """A node joins (or rejoins after a restart, at its new address): it loads copies of the spans that
        lack some (spares first, up to 1 + replicas copies each) and otherwise waits as a spare. Returns
        the spans it now holds. A route that could not be rebuilt without it is rebuilt. Refused: a node whose
        certificate is revoked, or not that of the member learned at its address."""
        client = NodeClient(address, self.identity, expected=self.pinned.get(address))
        if self.pool is not None and client.fingerprint is not None and self.pool.is_revoked(client.fingerprint):
            client.close()
            raise RouteError(f"node {address} shows a revoked certificate")
        with self._lock:
            if self.client_at.get(address) in self.clients:  # known and live: nothing to do
                client.close()
                return held_by(self.holders, address)
            self.gone.pop(address, None)
            self.client_at[address] = client
            self.pinned[address] = client.member
            self.clients = self.clients + [client]
        self._start_watch(client)
        if self.pool is not None and self.identity is not None:
            _tell_revoked(client, self.pool.revoked_fingerprints())  # if it is gone, its watcher will notice
        self.tell_members()  # before any route names it
        with self._join_lock:
            placed = self._place(self.spans, 1 + self.replicas)
        if not self._route_ok() or self.broken:
            self._reroute_quietly()
        return [span for a, span in placed if a == address]

    def _rejoin_returning(self) -> None:
        """Take back a node counted gone that answers again at its address (its link came back, or it was only
        too busy to answer pings): it rejoins as any node does, holding what its cache has."""
        while not self.closing:
            time.sleep(REJOIN_POLL_S)
            now = time.monotonic()
            noticed = {d.address: d.noticed for d in self.deaths}
            for address in [a for a in list(self.gone) if now - noticed.get(a, now) < REJOIN_GIVE_UP_S]:
                if self.closing:
                    return
                try:
                    health_pb2_grpc.HealthStub(self.client_at[address].channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=1.0, wait_for_ready=True)
                    self.add_node(address)
                except (grpc.RpcError, RouteError):
                    continue  # still gone

    def _push_revocations(self) -> None:
        """Tell every node which certificates are revoked, now and whenever that changes; a revoked node leaves
        the holders and the route at once (its steps in flight fail, and their sessions move)."""
        told: set[str] | None = None
        while not self.closing:
            revoked = self.pool.revoked_fingerprints()
            if revoked != told:
                for client in [c for c in self.clients if c.fingerprint in revoked]:
                    self._mark_gone(client, "its certificate was revoked")
                    self.tell_members()  # no route may name it now
                # a node that did not hear it is told again next round
                told = revoked if all([_tell_revoked(c, revoked) for c in self.clients]) else None
            time.sleep(REVOCATION_POLL_S)

    def member_at(self, address: str) -> int | str | None:
        """The member the gateway knows at `address` (None: unknown, or no TLS)."""
        client = self.client_at.get(address)
        return client.member if client is not None else None

    def name_at(self, address: str) -> str | None:
        """The name the certificate at `address` must carry (see transport.Pushers): its member's."""
        client = self.client_at.get(address)
        return client.tls_name if client is not None else None

    def tell_members(self) -> None:
        """Tell every live node which members a route may name (and where) and where this gateway's sink is."""
        if self.identity is None:
            return
        members = pb.MemberList(sinks=[self.sink_address] if self.sink_address else [], members=[
            pb.MemberAddress(address=c.address, member_id=c.member if isinstance(c.member, int) else 0)
            for c in self.clients])
        for client in self.clients:
            try:
                client.stub.SetMembers(members, timeout=5)
            except grpc.RpcError:
                pass  # gone: its watcher will notice

    def check_claims(self, time_stage: Callable[[RouteStage], float]) -> list[str]:
        """Time one step through each holder of each span alone (`time_stage`: ms, the gateway's own step) and
        compare with what the node claims. A node much slower than it claims counts at its measured speed from
        now on: its spans get copies on other nodes where they fit, and the route prefers those. Returns the
        addresses caught."""
        with self._lock:
            stages = [RouteStage(self.client_at[a].info.node_id, a, *span)
                      for span, holders in self.holders.items() for a in holders]
        caught = []
        for stage in stages:
            client = self.client_at[stage.address]
            claimed = planner.claimed_ms_per_layer(client.info.matmul_bytes_per_ms, self.model.layer_bytes)
            try:
                measured = max(0.0, time_stage(stage) - client.rtt_ms) / (stage.stop - stage.start)
            except RouteError as e:  # gone (its watcher will notice), or short of memory for the step's KV cache
                if e.short is not None:
                    self.lower_claim(e.short, "refused a session's KV cache for memory")
                continue
            if measured > SLOW_FACTOR * claimed + SLOW_SLACK_MS:
                self.slow[stage.address] = max(measured, self.slow.get(stage.address, 0.0))
                caught.append(stage.address)
                print(f"duskpool: node {stage.node_id} at {stage.address} claims {claimed:.2f} ms per layer but took "
                      f"{measured:.2f}: it counts as that slow, its layers get copies elsewhere", file=sys.stderr,
                      flush=True)
        if caught:
            self._copy_from_doubtful()
        return caught

    def lower_claim(self, address: str, what: str) -> None:
        """The node at `address` `what` (refused a span or a KV cache for lack of memory) that it claimed to lend:
        from now on it counts as lending only what its spans take, so no span more goes there; its spans get a copy
        elsewhere where it is their only sound holder, and the route prefers the copies."""
        with self._lock:
            layers = sum(b - a for a, b in held_by(self.holders, address))
            self.short[address] = layers * planner.layer_memory(self.model, self.config)
            node_id = self.client_at[address].info.node_id
        print(f"duskpool: node {node_id} at {address} {what} it claimed to lend: it is given no layers beyond the "
              f"{layers} it holds, and they get copies elsewhere", file=sys.stderr, flush=True)
        self._copy_from_doubtful()

    def _copy_from_doubtful(self) -> None:
        """One more copy of each span whose holders were all caught doing less than they claim, where one fits;
        then the route is rebuilt, preferring the copies."""
        with self._lock:
            copies = {span: len(holders) + 1 for span, holders in self.holders.items()
                      if all(self.doubtful(a) for a in holders)}
        for span, n in copies.items():
            self._place([span], n)
        self._reroute_quietly()

    def node_info(self, address: str, timeout: float = 2.0) -> pb.NodeInfo:
        return self.client_at[address].stub.Info(pb.InfoRequest(), timeout=timeout)

    def end_session(self, session_id: str) -> None:
        """Free the session's KV caches on every live node."""
        for client in self.clients:
            try:
                client.stub.EndSession(pb.EndSessionRequest(session_id=session_id), timeout=2)
            except grpc.RpcError:
                pass  # a node that is gone holds nothing anymore; idle sessions expire anyway

    def close(self) -> None:
        self.closing = True
        for client in self.client_at.values():
            client.close()


def _tell_revoked(client: NodeClient, fingerprints: set[str]) -> bool:
    """Send a node the revoked certificates' fingerprints; whether it heard them."""
    try:
        client.stub.SetRevoked(pb.RevokedList(fingerprints=sorted(fingerprints)), timeout=5)
        return True
    except grpc.RpcError:
        return False
