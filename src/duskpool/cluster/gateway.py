"""The gateway: the one trusted process. It keeps the tokenizer, the embedding, the head and the privacy
prefix/suffix layers; plans which node holds which span; streams them their weights; and drives each
generation step over the route of nodes.

One decode step, in order:  RemoteSession.forward -> prefix layers -> Gateway.run_route
(ring: push to the first node, which pushes on; the last node delivers to GatewaySink.Forward)
-> suffix layers -> head -> logits.

When a node dies (its Health.Watch stream ends, or keepalive gives up on a cut link), the steps that were
on it fail with RouteError; RemoteSession._recover asks Gateway.recover for a route of live nodes (a
replica of each lost span, or a spare that loads it), re-prefills the session's token history there from
position 0, and returns the failed step's logits: the generate loop never notices.
"""

import dataclasses
import json
import queue
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, InvalidStateError
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from duskpool import backends
from duskpool.cluster import planner, wire
from duskpool.cluster.node import Pushers, open_channel, start_server
from duskpool.cluster.proto import duskpool_pb2 as pb
from duskpool.cluster.proto import duskpool_pb2_grpc as pb_grpc
from duskpool.engine.generate import PREFILL_CHUNK
from duskpool.engine.runner import DEFAULT_CONTEXT, Engine, load_tokenizer
from duskpool.models import ModelSpec, tensors_for
from duskpool.security import NodeIdentity, PoolState
from duskpool.weights.gguf import GGUFFile
from duskpool.weights.progress import Progress
from duskpool.weights.store import config_metadata, model_hash, tensor_hashes

CHUNK_BYTES = 4 * 2**20
REVOCATION_POLL_S = 5.0  # how soon nodes hear of a member revoked with `duskpool nodes revoke`
STEP_TIMEOUT_S = 300.0  # a step still unanswered after this is an error (dead nodes are noticed far sooner)
PROBE_TIMEOUT_S = 2.0  # a node that does not answer a health check this fast is counted as gone
REJOIN_POLL_S = 3.0  # how often a node counted gone is asked whether it is back (a Wi-Fi blip, a busy CPU)
REJOIN_GIVE_UP_S = 600.0  # after this long gone, an address is no longer asked

Span = tuple[int, int]  # layers [start, stop)


@dataclass(frozen=True)
class RouteStage:
    node_id: str
    address: str
    start: int
    stop: int


class RouteError(RuntimeError):
    """A step could not complete on the route (a node failed, vanished or refused)."""

    def __init__(self, message: str, route: tuple[RouteStage, ...] = ()):
        super().__init__(message)
        self.route = route  # the route the step ran on: where to look for a node that is gone


@dataclass(frozen=True)
class Death:
    """A node the gateway stopped counting on."""
    address: str
    node_id: str
    noticed: float  # time.monotonic() when the gateway noticed
    reason: str


@dataclass(frozen=True)
class Recovery:
    """A session moved to a new route mid-step."""
    error: str  # why its step failed
    seconds: float  # from the failure to the step's logits from the new route
    replayed_tokens: int  # the token history re-prefilled there
    route: tuple[RouteStage, ...]  # the route it moved to


class NodeClient:
    """The gateway's connection to one node, and what it last said about itself."""

    def __init__(self, address: str, identity: NodeIdentity | None, timeout: float = 10.0):
        self.address = address
        # its own connection: closing another gateway's channel to the same node must not touch this one
        self.channel = open_channel(address, identity, [("grpc.use_local_subchannel_pool", 1),
                                                        # a node back from a blip is seen within seconds
                                                        ("grpc.initial_reconnect_backoff_ms", 500),
                                                        ("grpc.max_reconnect_backoff_ms", 2000)])
        self.stub = pb_grpc.NodeStub(self.channel)
        started = time.perf_counter()
        try:
            self.info = self.stub.Info(pb.InfoRequest(), timeout=timeout, wait_for_ready=True)
        except grpc.RpcError as e:
            raise RouteError(f"cannot reach node {address}: {e.details()}") from None
        self.rtt_ms = (time.perf_counter() - started) * 1000

    def close(self) -> None:
        self.channel.close()


class GatewaySink(pb_grpc.NodeServicer):
    """Where the ring ends: the last node pushes its output (or any node its failure) here."""

    def __init__(self, gateway: "Gateway"):
        self.gateway = gateway

    def Forward(self, request_iterator, context) -> Iterator[pb.ForwardReply]:
        for request in request_iterator:
            self.gateway.deliver(request.session_id, request.step, request.hidden, request.error)
        yield from ()  # nothing to answer: results arrive here, they do not start here


def model_profile(spec: ModelSpec) -> planner.ModelProfile:
    # hidden states travel as float32
    return planner.ModelProfile(spec.name, spec.n_layers, spec.layer_bytes, spec.kv_bytes_per_token,
                                wire.DTYPE_BYTES["float32"] * spec.dim, spec.edge_bytes)


def node_profile(client: NodeClient, layer_bytes: int, even: bool = False) -> planner.NodeProfile:
    """`even`: all nodes count as equally fast (a local swarm, whose nodes share one CPU)."""
    info = client.info
    ms_per_layer = layer_bytes / info.matmul_bytes_per_ms if info.matmul_bytes_per_ms and not even else 1.0
    return planner.NodeProfile(info.node_id, info.memory_free, ms_per_layer, client.rtt_ms,
                               bandwidth_bytes_per_s=125e6)  # assume gigabit until measured


# The gateway as the planner sees it: it holds only the edges and the privacy layers, never middle ones.
GATEWAY_PROFILE = planner.NodeProfile("gateway", 2**62, 0.0, 0.0, 1e12)


def local_address_towards(address: str) -> str:
    """This machine's IP on the interface that reaches `address` (where nodes can reach us back)."""
    host = address.rsplit(":", 1)[0].strip("[]")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, 9))  # UDP connect sends nothing; it only picks the route
        return s.getsockname()[0]


def even_plan(plan: planner.Plan, node_ids: list[str]) -> planner.Plan:
    """`plan`'s prefix and suffix, with the layers between split as evenly as possible over all nodes."""
    start, stop, n = plan.prefix.stop, plan.suffix.start, len(node_ids)
    bounds = [start + (stop - start) * i // n for i in range(n + 1)]
    stages = tuple(planner.Stage(node_id, a, b) for node_id, a, b in zip(node_ids, bounds, bounds[1:], strict=False)
                   if b > a)
    return dataclasses.replace(plan, stages=stages, excluded=())


class Gateway(Engine):
    def __init__(self, model_path: str | Path, node_addresses: list[str], *, identity: NodeIdentity | None,
                 pool: PoolState | None = None, prefix: int = 1, suffix: int = 1, routing: str = "ring",
                 context_length: int | None = None, sessions: int = 4, even_split: bool = False,
                 replicas: int = 0, progress: bool = True):
        """`identity`: the gateway's certificate in the pool (None: plaintext, for debugging only).
        `pool`: the pool's state, when this gateway keeps it: revocations then reach the nodes.
        `replicas`: more copies of each span to load where memory allows, to fail over to when a node dies."""
        if routing not in ("ring", "star"):
            raise ValueError(f"routing must be 'ring' or 'star', not {routing!r}")
        if not node_addresses:
            raise ValueError("a gateway needs at least one node (--node HOST:PORT)")
        self.routing, self.progress, self.replicas = routing, progress, replicas
        self.file = GGUFFile(model_path)
        self.spec = backends.describe_model(self.file)
        self.backend = backends.DEFAULT  # what computes the gateway's own layers
        self.tokenizer = load_tokenizer(self.file)
        self.context_length = min(context_length or DEFAULT_CONTEXT, self.spec.context_length)
        self.weight_bytes_sent = 0
        self.hidden_bytes_sent = 0  # activations the gateway sent (prefix outputs; in star, every hop's input)
        self._pending: dict[tuple[str, int], tuple[Future, tuple[RouteStage, ...]]] = {}
        self._pending_lock = threading.Lock()
        self._broken: str | None = None  # why no route can serve: a span with no live holder and no room for it
        self._closing = False
        # Who holds what. `_lock` guards the route, the holders, the clients and the dead; it is held while
        # a route is rebuilt, so sessions that failed together wait for one rebuild.
        self._lock = threading.RLock()
        self._join_lock = threading.Lock()  # one node joins at a time
        self._dead: dict[str, str] = {}  # address -> why it is counted gone
        # address -> the spans it held when it stopped lending: alive, finishing its sessions, given no new ones
        self._draining: dict[str, list[Span]] = {}
        self.deaths: list[Death] = []
        self.recoveries: list[Recovery] = []

        self.identity, self.pool = identity, pool
        self.clients = [NodeClient(a, identity) for a in node_addresses]  # the live nodes
        self._client_at = {c.address: c for c in self.clients}  # every node ever known, by address
        self.model = model_profile(self.spec)
        self.plan_config = planner.PlanConfig(sessions=sessions, context=self.context_length,
                                              privacy_prefix=prefix, privacy_suffix=suffix)
        self._even = even_split  # a local swarm: its nodes share one CPU, so the speed model has nothing to choose
        self.plan = planner.plan(self.model, GATEWAY_PROFILE, [node_profile(c, self.model.layer_bytes)
                                                              for c in self.clients], self.plan_config)
        if even_split:
            self.plan = even_plan(self.plan, [c.info.node_id for c in self.clients])
        self.plan = planner.with_replicas(self.plan, self.model, self._profiles(), replicas, self.plan_config)
        address_of = {c.info.node_id: c.address for c in self.clients}
        self.spans: list[Span] = [(s.start, s.stop) for s in self.plan.stages]
        # span -> the live nodes holding it, its first route node first
        self.holders: dict[Span, list[str]] = {span: [] for span in self.spans}
        for s in self.plan.stages + self.plan.replicas:
            self.holders[(s.start, s.stop)].append(address_of[s.node_id])
        self.route = [RouteStage(s.node_id, address_of[s.node_id], s.start, s.stop) for s in self.plan.stages]

        self.prefix_model = backends.load_span(self.file, self.plan.prefix, embed=True, head=False)
        self.suffix_model = backends.load_span(self.file, self.plan.suffix, embed=False, head=True)

        listen = "127.0.0.1" if all(a.startswith(("127.", "localhost")) for a in node_addresses) else "0.0.0.0"
        is_revoked = pool.is_revoked if pool is not None else (lambda fingerprint: False)
        self._server, port = start_server(GatewaySink(self), listen, 0, identity, is_revoked)
        self.sink_address = f"{local_address_towards(node_addresses[0]) if listen != '127.0.0.1' else listen}:{port}"
        self._pushers = Pushers(identity, on_reply=self._on_reply, on_broken=self._on_broken)

        self.model_hash = self._manifests()
        for span, addresses in self.holders.items():
            for address in addresses:
                self._load(address, span)
        for client in self.clients:
            self._start_watch(client)
        if pool is not None and identity is not None:
            threading.Thread(target=self._push_revocations, daemon=True).start()
        threading.Thread(target=self._rejoin_returning, daemon=True, name="rejoin").start()

    def _profiles(self) -> list[planner.NodeProfile]:
        """The live nodes as the planner sees them (their memory as it was when they joined)."""
        return [node_profile(c, self.model.layer_bytes, even=self._even) for c in self._lent()]

    def _lent(self) -> list[NodeClient]:
        """The live nodes that take new sessions (not draining)."""
        return [c for c in self.clients if c.address not in self._draining]

    # --- weights ----------------------------------------------------------------------------------
    def _manifests(self) -> str:
        """The manifest of every span (what a node needs to load it); the model's hash."""
        hashes = tensor_hashes(self.file)
        digest = model_hash(self.file, hashes)
        metadata = json.dumps(config_metadata(self.file), default=str)
        self._manifest: dict[Span, pb.SpanManifest] = {}
        for start, stop in self.spans:
            wanted = tensors_for(self.file, range(start, stop), embed=False, head=False)
            entries = [pb.TensorEntry(name=n, sha256=hashes[n], qtype=int(self.file.tensors[n].qtype),
                                      shape=list(self.file.tensors[n].shape), nbytes=self.file.tensors[n].nbytes)
                       for n in wanted]
            self._manifest[(start, stop)] = pb.SpanManifest(model_hash=digest, start=start, stop=stop,
                                                            metadata_json=metadata, tensors=entries)
        return digest

    def _load(self, address: str, span: Span) -> None:
        """Make the node at `address` serve `span`, streaming only the tensors its cache lacks."""
        manifest = self._manifest[span]
        names_by_hash = {e.sha256: e.name for e in manifest.tensors}
        missing: queue.SimpleQueue = queue.SimpleQueue()

        def requests() -> Iterator[pb.LoadSpanRequest]:
            yield pb.LoadSpanRequest(manifest=manifest)
            hashes = missing.get()
            total = sum(self.file.tensors[names_by_hash[h]].nbytes for h in hashes)
            bar = Progress(f"weights -> {address} layers [{span[0]}, {span[1]})", total, self.progress and total > 0)
            for sha in hashes:
                data = self.file.read_bytes(names_by_hash[sha])
                for offset in range(0, len(data), CHUNK_BYTES):
                    piece = data[offset:offset + CHUNK_BYTES]
                    yield pb.LoadSpanRequest(chunk=pb.TensorChunk(sha256=sha, offset=offset, data=piece))
                    self.weight_bytes_sent += len(piece)
                    bar.advance(len(piece))
            bar.close()

        try:
            for reply in self._client_at[address].stub.LoadSpan(requests()):
                if not reply.ready:
                    missing.put(list(reply.missing))
        except grpc.RpcError as e:
            raise RouteError(f"node {address} could not load layers [{span[0]}, {span[1]}): {e.details()}") from None

    def _place(self, spans: list[Span], copies: int) -> list[tuple[str, Span]]:
        """Load `spans` where the planner says, until each has `copies` live holders or no node has room;
        the (address, span) pairs loaded. Loads run outside the lock (a caller may hold it)."""
        with self._lock:
            id_of = {c.info.node_id: c.address for c in self._lent()}
            held = {c.info.node_id: [span for span, holders in self.holders.items() if c.address in holders]
                    for c in self._lent()}
            added, _ = planner.replicate(self.model, self._profiles(), spans, held, copies, self.plan_config)
        placed = []
        for stage in added:
            address, span = id_of[stage.node_id], (stage.start, stage.stop)
            try:
                self._load(address, span)
            except RouteError:
                continue  # it died or ran out of room meanwhile: the span stays short of this copy
            with self._lock:
                if self._client_at[address] in self.clients and address not in self.holders[span]:
                    self.holders[span].append(address)
                    placed.append((address, span))
        return placed

    # --- the data path ----------------------------------------------------------------------------
    def run_route(self, session_id: str, step: int, position: int, context: int, hidden: torch.Tensor,
                  route: tuple[RouteStage, ...] | None = None) -> torch.Tensor:
        """hidden [T, dim] after the prefix -> hidden after the last node's layers, over `route` (the one
        that holds the session's KV caches; by default the current route)."""
        route = tuple(self.route) if route is None else route
        hops = [pb.Hop(address=s.address, start=s.start, stop=s.stop) for s in route]
        if self.routing == "ring":
            return self._step(session_id, step, position, context, hidden,
                              hops + [pb.Hop(address=self.sink_address)], route)
        for i, hop in enumerate(hops):  # star: every stage answers the gateway
            hidden = self._step(session_id, step * len(hops) + i, position, context, hidden, [hop], route[i:i + 1])
        return hidden

    def _step(self, session_id: str, step: int, position: int, context: int, hidden: torch.Tensor,
              hops: list[pb.Hop], route: tuple[RouteStage, ...]) -> torch.Tensor:
        if self._closing:
            raise RouteError("the gateway is closed")
        future: Future = Future()
        with self._pending_lock:
            self._pending[(session_id, step)] = (future, route)
        try:
            # after registering: a node found dead from now on fails the future; one found dead before, here
            gone = [s for s in route if not self.live(s)]
            if gone:
                raise RouteError(f"node {gone[0].node_id} at {gone[0].address} is gone "
                                 f"({self._dead.get(gone[0].address, 'restarted')})", route)
            request = pb.ForwardRequest(session_id=session_id, step=step, position=position, context=context,
                                        hidden=wire.to_wire(self.prefix_model, hidden), model_hash=self.model_hash,
                                        route=hops)
            self._pushers.get(hops[0].address).send(request)
            self.hidden_bytes_sent += len(request.hidden.data)
            return future.result(timeout=STEP_TIMEOUT_S)
        except FutureTimeout:
            raise RouteError(f"no answer from the route within {STEP_TIMEOUT_S:.0f} s", route) from None
        finally:
            with self._pending_lock:
                self._pending.pop((session_id, step), None)

    def deliver(self, session_id: str, step: int, hidden: pb.Hidden, error: str) -> None:
        with self._pending_lock:
            future, route = self._pending.get((session_id, step), (None, ()))
        if future is None:
            return
        if error:
            _settle(future, error=RouteError(error, route))
            return
        try:
            _settle(future, result=wire.from_wire(self.suffix_model, hidden, self.context_length))
        except ValueError as e:
            _settle(future, error=RouteError(f"bad hidden state from the route: {e}", route))

    def _on_reply(self, reply: pb.ForwardReply) -> None:
        self.deliver(reply.session_id, reply.step, reply.hidden, reply.error)

    def _on_broken(self, pusher, e: Exception) -> None:
        self._fail_through(pusher.address, f"lost the connection to node {pusher.address}")

    def _fail_through(self, address: str, reason: str) -> None:
        """Fail every step in flight whose route passes through `address`."""
        with self._pending_lock:
            pending = [(f, route) for f, route in self._pending.values() if any(s.address == address for s in route)]
        for future, route in pending:
            _settle(future, error=RouteError(reason, route))

    # --- faults -----------------------------------------------------------------------------------
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
        if not self._closing:
            self._mark_dead(client, reason)

    def _mark_dead(self, client: NodeClient, reason: str) -> None:
        """Stop counting on `client`'s node: fail its steps in flight, drop it from the holders and, if it
        was on the route, rebuild the route now (sessions that failed wait for that)."""
        address = client.address
        with self._lock:
            if client not in self.clients:
                return  # counted gone already
            self._dead[address] = reason
            self._draining.pop(address, None)
            self.clients = [c for c in self.clients if c is not client]
            for holders in self.holders.values():
                if address in holders:
                    holders.remove(address)
            self.deaths.append(Death(address, client.info.node_id, time.monotonic(), reason))
            on_route = any(s.address == address for s in self.route)
        self._fail_through(address, f"node {client.info.node_id} at {address} is gone ({reason})")
        if on_route:
            threading.Thread(target=self._reroute_quietly, daemon=True).start()

    def _set_lending(self, client: NodeClient, lent: bool) -> None:
        """A node stopped lending (its owner is back: it finishes its sessions, takes no new ones) or lends
        again. Draining, it leaves the holders, so new sessions get a route without it (its spans loaded
        elsewhere if no replica has them); lending again, it holds what it held before."""
        address = client.address
        with self._lock:
            if client not in self.clients or lent == (address not in self._draining):
                return
            if lent:
                for span in self._draining.pop(address):
                    if address not in self.holders[span]:
                        self.holders[span].append(address)
                if self._broken or not self._route_ok():
                    threading.Thread(target=self._reroute_quietly, daemon=True).start()
                return
            self._draining[address] = [span for span, holders in self.holders.items() if address in holders]
            for span in self._draining[address]:
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
                self._mark_dead(client, f"no answer to a health check ({e.code().name})")

        live = [c for c in self.clients if c.address in addresses]
        checks = [threading.Thread(target=check, args=(c,), daemon=True) for c in live]
        for t in checks:
            t.start()
        for t in checks:
            t.join()

    def live(self, stage: RouteStage) -> bool:
        """Whether the node `stage` names still runs (not one restarted at the same address since)."""
        client = self._client_at.get(stage.address)
        return client is not None and client in self.clients and client.info.node_id == stage.node_id

    def recover(self, failure: RouteError) -> None:
        """Make the route serve again after `failure`. Returns once the route's nodes are all live holders;
        raises `failure` itself when no node it ran through is gone (then it was no fault of the route's:
        a refused request, say), and a RouteError when some span has no live node and none can load it."""
        def usable(stage: RouteStage) -> bool:  # a draining node that gave up a session is no fault either
            return self.live(stage) and stage.address not in self._draining

        if all(usable(s) for s in failure.route):
            self._probe([s.address for s in failure.route])
        if all(usable(s) for s in failure.route):
            raise failure
        self._reroute()

    def _route_ok(self) -> bool:
        return all(self.live(s) and s.address in self.holders[(s.start, s.stop)] for s in self.route)

    def _reroute(self) -> None:
        """Rebuild the route from live holders: a span whose holders are all gone is loaded onto the node
        the planner picks (one with room, holding the fewest layers)."""
        with self._lock:
            if self._route_ok() and not self._broken:
                return
            orphans = [span for span in self.spans if not self.holders[span]]
            if orphans:
                self._place(orphans, 1)
            lost = [span for span in self.spans if not self.holders[span]]
            if lost:
                gone = "; ".join(f"{d.node_id} at {d.address}: {d.reason}" for d in self.deaths[-3:])
                self._broken = (f"layers {', '.join(f'[{a}, {b})' for a, b in lost)} have no live node and no node "
                                f"has room to load them (last gone: {gone})")
                raise RouteError(self._broken)
            current = {(s.start, s.stop): s.address for s in self.route}
            route, used = [], set()
            for span in self.spans:  # keep a live stage; else its first holder not on the route yet
                live = self.holders[span]
                address = current[span] if current[span] in live else ([a for a in live if a not in used] or live)[0]
                used.add(address)
                route.append(RouteStage(self._client_at[address].info.node_id, address, *span))
            self.route, self._broken = route, None

    def _reroute_quietly(self) -> None:
        try:
            self._reroute()
        except RouteError:
            pass  # `broken` says why; the next add_node tries again

    def add_node(self, address: str) -> list[Span]:
        """A node joins (or rejoins after a restart, at its new address): it loads copies of the spans that
        lack some (spares first, up to 1 + replicas copies each) and otherwise waits as a spare. Returns
        the spans it now holds. A route that could not be rebuilt without it is rebuilt."""
        client = NodeClient(address, self.identity)
        with self._lock:
            if self._client_at.get(address) in self.clients:  # known and live: nothing to do
                client.close()
                return [span for span, holders in self.holders.items() if address in holders]
            self._dead.pop(address, None)
            self._client_at[address] = client
            self.clients = self.clients + [client]
        self._start_watch(client)
        if self.pool is not None and self.identity is not None:
            _tell_revoked(client, self.pool.revoked_fingerprints())  # if it is gone, its watcher will notice
        with self._join_lock:
            placed = self._place(self.spans, 1 + self.replicas)
        if not self._route_ok() or self._broken:
            self._reroute_quietly()
        return [span for a, span in placed if a == address]

    def _rejoin_returning(self) -> None:
        """Take back a node counted gone that answers again at its address (its link came back, or it was only
        too busy to answer pings): it rejoins as any node does, holding what its cache has."""
        while not self._closing:
            time.sleep(REJOIN_POLL_S)
            now = time.monotonic()
            gone = {d.address: d.noticed for d in self.deaths}
            for address in [a for a in list(self._dead) if now - gone.get(a, now) < REJOIN_GIVE_UP_S]:
                if self._closing:
                    return
                try:
                    health_pb2_grpc.HealthStub(self._client_at[address].channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=1.0, wait_for_ready=True)
                    self.add_node(address)
                except (grpc.RpcError, RouteError):
                    continue  # still gone

    def _push_revocations(self) -> None:
        """Tell every node which certificates are revoked, now and whenever that changes."""
        told: set[str] | None = None
        while not self._closing:
            revoked = self.pool.revoked_fingerprints()
            if revoked != told:
                # a node that did not hear it is told again next round
                told = revoked if all([_tell_revoked(c, revoked) for c in self.clients]) else None
            time.sleep(REVOCATION_POLL_S)

    @property
    def broken(self) -> str | None:
        """Why no route can serve (a span lost every holder and no node can load it), or None while one can."""
        return self._broken

    def node_info(self, address: str, timeout: float = 2.0) -> pb.NodeInfo:
        return self._client_at[address].stub.Info(pb.InfoRequest(), timeout=timeout)

    # --- sessions ---------------------------------------------------------------------------------
    def open_session(self, capacity: int) -> "RemoteSession":
        return RemoteSession(self, capacity)

    def end_session(self, session_id: str) -> None:
        for client in self.clients:
            try:
                client.stub.EndSession(pb.EndSessionRequest(session_id=session_id), timeout=2)
            except grpc.RpcError:
                pass  # a node that is gone holds nothing anymore; idle sessions expire anyway

    def close(self) -> None:
        self._closing = True
        self._pushers.close()
        for client in self._client_at.values():
            client.close()
        self._server.stop(grace=0.5)


def _tell_revoked(client: NodeClient, fingerprints: set[str]) -> bool:
    """Send a node the revoked certificates' fingerprints; whether it heard them."""
    try:
        client.stub.SetRevoked(pb.RevokedList(fingerprints=sorted(fingerprints)), timeout=5)
        return True
    except grpc.RpcError:
        return False


def _settle(future: Future, result=None, error: Exception | None = None) -> None:
    """Resolve `future` unless something else did first (a reply and a failure report can race)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass


class RemoteSession:
    """One generation over the route. It keeps the tokens fed so far, so that when the route fails under a
    step it can move to a new route, re-prefill them there and answer the step as if nothing happened."""

    def __init__(self, gateway: Gateway, capacity: int):
        self.gateway, self.capacity = gateway, capacity
        self.id, self.step = uuid.uuid4().hex, 0
        self.route: tuple[RouteStage, ...] = tuple(gateway.route)  # where its KV caches are: it stays there
        self.history: list[int] = []  # the token at each position fed so far
        self.prefix_cache = gateway.prefix_model.new_cache(capacity)
        self.suffix_cache = gateway.suffix_model.new_cache(capacity)

    def forward(self, tokens: list[int], start: int) -> torch.Tensor:
        history = self.history[:start] + list(tokens)
        try:
            logits = self._forward(tokens, start)
        except RouteError as failure:
            logits = self._recover(history, failure)
        self.history = history
        return logits

    def _forward(self, tokens: list[int], start: int) -> torch.Tensor:
        g = self.gateway
        hidden = g.prefix_model.forward_span(g.prefix_model.embed(tokens), self.prefix_cache, start)
        self.step += 1
        hidden = g.run_route(self.id, self.step, start, self.capacity, hidden, self.route)
        hidden = g.suffix_model.forward_span(hidden, self.suffix_cache, start)
        return g.suffix_model.head(hidden[-1:])[0]

    def _recover(self, history: list[int], failure: RouteError) -> torch.Tensor:
        """Move to a live route and re-prefill `history` (everything fed before, and this step's tokens) there
        under a new session id, from position 0 through the gateway's own prefix and suffix caches too;
        the logits of its last position, which are this step's. Raises when the gateway cannot recover."""
        g, started, why = self.gateway, time.perf_counter(), str(failure)
        for _ in range(len(g._client_at) + 1):  # each round finds another node gone, or gives up
            g.recover(failure)
            old, self.id, self.step, self.route = self.id, uuid.uuid4().hex, 0, tuple(g.route)
            threading.Thread(target=g.end_session, args=(old,), daemon=True).start()
            self.prefix_cache.clear()
            self.suffix_cache.clear()
            try:
                for start in range(0, len(history), PREFILL_CHUNK):
                    logits = self._forward(history[start:start + PREFILL_CHUNK], start)
            except RouteError as again:
                failure = again
                continue
            g.recoveries.append(Recovery(why, time.perf_counter() - started, len(history), self.route))
            return logits
        raise failure

    def close(self) -> None:
        self.prefix_cache.clear()
        self.suffix_cache.clear()
        self.gateway.end_session(self.id)
