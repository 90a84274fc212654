"""A node: serves spans of layers over gRPC, one KV cache per session, passing outputs down the route.

A request's path through a node is `Forward`: check the message, run the span (`_run`), then `_pass_on`
its output: to the next stage of its route (ring), or after the last stage to the gateway's sink, as a
Result. A failure goes to the sink as a Result too. Weights arrive through `LoadSpan` (cluster/transfer.py).
"""

import json
import platform
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
import psutil
from grpc_health.v1 import health, health_pb2

from duskpool import __version__, backends
from duskpool.cluster import transfer, wire
from duskpool.cluster.proto import duskpool_pb2 as pb
from duskpool.cluster.proto import duskpool_pb2_grpc as pb_grpc
from duskpool.cluster.transport import NotAMember, Pusher, Pushers, deliver_stream, forward_stream, start_server
from duskpool.engine.batcher import Batcher, Job
from duskpool.idle import Lending, LendPolicy, LendState, MachineState, SleepAssertion, probe, step
from duskpool.models import KVCache, SpanModel
from duskpool.security import (
    GATEWAY_NAME,
    NODE_NAME,
    JoinError,
    JoinRefused,
    NodeIdentity,
    expected_name,
    expiry_warning,
    member_id_of,
    peer_certificate,
    peer_fingerprint,
    peer_is_gateway,
    peer_member_id,
    renew,
    renewal_due,
    save_identity,
    signed_by,
)
from duskpool.weights import local
from duskpool.weights.progress import Progress
from duskpool.weights.store import TensorStore, atomic_file

SESSION_IDLE_SECONDS = 600  # a session nobody ended is freed after this long unused
MAX_CONTEXT = 131072
MAX_SESSIONS = 1024  # live sessions per node, a bound on bookkeeping: the lent memory for their KV caches decides
MAX_SESSIONS_PER_PEER = 512  # so that one sender cannot take them all
MAX_ROUTE = 64  # stages in one request's route
LEND_POLL_S = 2.0  # how often the node looks whether its owner is back


class ShortOfMemory(ValueError):
    """This node lacks the memory a step needs (a KV cache): the gateway hears it was claimed in vain."""


@dataclass
class Session:
    peer: str  # who opened it (certificate fingerprint, or address without TLS): sessions are counted per peer
    context: int
    senders: dict[tuple[str, int, int], str] = field(default_factory=dict)  # per span: the only peer it hears
    caches: dict[tuple[str, int, int], KVCache] = field(default_factory=dict)
    filled: dict[tuple[str, int, int], int] = field(default_factory=dict)  # positions written, per span
    last_used: float = field(default_factory=time.monotonic)


class NodeService(pb_grpc.NodeServicer):
    def __init__(self, cache_dir: Path, memory_limit: int | None = None, node_id: str | None = None,
                 identity: NodeIdentity | None = None, policy: LendPolicy | None = None,
                 backend_name: str = backends.DEFAULT, identity_dir: Path | None = None, models: tuple[Path, ...] = ()):
        total = psutil.virtual_memory().total
        if memory_limit is not None and memory_limit > total:  # the node's own claim, checked against the OS
            raise ValueError(f"a memory limit of {memory_limit / 2**30:.1f} GiB is more than this machine has "
                             f"({total / 2**30:.1f} GiB)")
        self.backend = backends.backend(backend_name)
        self.store = TensorStore(cache_dir)
        self.store.remove_stale_partials()  # transfers cut short too long ago: none will resume them
        self.models = models  # directories of model files this machine has: spans are read from them when they can
        self.configured_policy = self.policy = policy or LendPolicy(lend="always")
        # lent from the start; the first probe takes it back at once if the owner is there
        self.lend_state = LendState(Lending.AVAILABLE, time.time(), "starting")
        self.health = health.HealthServicer()  # SERVING while lent: the gateway watches it
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.memory_limit = memory_limit
        self.node_id = node_id or f"{platform.node()}-{uuid.uuid4().hex[:6]}"
        self.awake = SleepAssertion(f"duskpool node {self.node_id}: serving the pool")  # held while lent
        self._told_awake_error: str | None = None
        self.spans: dict[tuple[str, int, int], SpanModel] = {}
        self.span_bytes: dict[tuple[str, int, int], int] = {}
        self.span_manifests: dict[tuple[str, int, int], pb.SpanManifest] = {}  # what each span was loaded from
        self.sessions: dict[str, Session] = {}
        self.ms_per_layer = 0.0
        self.weight_bytes_received = 0  # total over the node's life: a warm cache keeps it at 0
        self.matmul_bytes_per_ms = self.backend.matmul_bytes_per_ms()
        self._lock = threading.Lock()  # spans and sessions
        self._compute = threading.Lock()  # one forward at a time: the kernels use every core already
        self.batcher = Batcher(f"node {self.node_id}", lock=self._compute)  # the steps waiting here, batched
        self.identity = identity
        self.identity_dir = identity_dir  # where a renewed certificate is saved (None: kept in memory only)
        self._renewing = threading.Lock()
        # certificate fingerprints the gateway said are revoked, kept across restarts
        self.revoked_path = cache_dir / "revoked.json"
        self.revoked: frozenset[str] = _read_revoked(self.revoked_path)
        # what the gateway said a route may name: member id at each address, and its sinks (SetMembers)
        self.members: dict[str, int] = {}
        self.sinks: frozenset[str] = frozenset()
        self.member_id = (member_id_of(identity.certificate) or 0) if identity is not None else None  # ours
        # the certificate of the gateway that named the members (its key signs session grants), and the sessions
        # opened here with a grant, until that grant expires: a grant opens its session once
        self.gateway_certificate: bytes | None = None
        self.gateway_fingerprint: str | None = None
        self._granted: dict[str, float] = {}
        # a stream to each next node, and one to each gateway's sink, each checking the certificate it reaches
        self._next_nodes = Pushers(identity, forward_stream, on_broken=self._on_next_node_lost, name_at=self._name_at)
        self._sinks = Pushers(identity, deliver_stream, name_at=self._sink_name_at)

    # --- Info -------------------------------------------------------------------------------------
    def Info(self, request: pb.InfoRequest, context) -> pb.NodeInfo:
        with self._lock:
            kv = self._kv_bytes()
            spans = [pb.SpanInfo(model_hash=h, start=a, stop=b) for h, a, b in self.spans]
            n_sessions = len(self.sessions)
        return pb.NodeInfo(version=__version__, node_id=self.node_id, backend=self.backend.NAME,
                           device=self.backend.device(),
                           memory_total=psutil.virtual_memory().total, memory_free=self.free_bytes(),
                           matmul_bytes_per_ms=self.matmul_bytes_per_ms, ms_per_layer=self.ms_per_layer,
                           spans=spans, sessions=n_sessions, kv_bytes=kv, lending=self.lend_state.lending.value,
                           lending_reason=self.lend_state.reason, batch_sessions=self.batcher.mean_sessions(),
                           busy=self.batcher.busy())

    def _kv_bytes(self) -> int:
        # snapshots: Info and LoadSpan ask without the lock while Forward opens and ends sessions
        return sum(c.nbytes for s in list(self.sessions.values()) for c in list(s.caches.values()))

    def free_bytes(self) -> int:
        """What this node may still lend: never more than the OS says is available, nor past its limit."""
        used = sum(self.span_bytes.values()) + self._kv_bytes()
        available = psutil.virtual_memory().available
        if self.memory_limit is not None:
            available = min(available, self.memory_limit - used)
        return max(0, available)

    # --- LoadSpan ---------------------------------------------------------------------------------
    def LoadSpan(self, request_iterator: Iterator[pb.LoadSpanRequest], context) -> Iterator[pb.LoadSpanReply]:
        """The span's manifest in, the tensors the store lacks out, then those tensors in: the span serves.
        Only the gateway loads spans, and a span once loaded is never replaced: the same manifest again is
        answered at once (nothing to send), another one for the same layers of the same model refused."""
        self._require_gateway(context, "load spans")
        manifest = transfer.read_manifest(request_iterator, context)
        span_bytes = sum(t.nbytes for t in manifest.tensors)
        key = (manifest.model_hash, manifest.start, manifest.stop)
        if key in self.spans:
            self._check_same_span(key, manifest, context)
            yield pb.LoadSpanReply(missing=[])
            yield pb.LoadSpanReply(ready=True, received_bytes=0, ms_per_layer=self.ms_per_layer)
            return
        if span_bytes > self.free_bytes():
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"span needs {span_bytes / 1e9:.2f} GB, this node has {self.free_bytes() / 1e9:.2f} GB free")
        wanted, from_disk = transfer.lacking(manifest, self.store), 0  # each cached tensor hashed once, here
        if self.models and wanted:
            lacking = [local.Wanted(t.name, t.sha256, t.nbytes) for t in manifest.tensors if t.sha256 in wanted]
            from_disk = local.copy_from_local(self.store, lacking, local.model_paths(self.models))
            wanted = {sha256: m for sha256, m in wanted.items() if not self.store.has(sha256)}  # kept: checked whole
        yield transfer.missing_reply(wanted)
        bar = Progress(f"weights <- layers [{manifest.start}, {manifest.stop})",
                       sum(m.nbytes - m.held for m in wanted.values()), bool(wanted))
        received = transfer.receive(request_iterator, wanted, self.store, context, bar.advance)
        bar.close()
        self.weight_bytes_received += received
        model = backends.load_span(transfer.stored_model(self.store, manifest), range(manifest.start, manifest.stop),
                                   embed=False, head=False, backend_name=self.backend.NAME)
        with self._lock:
            if key in self.spans:  # loaded meanwhile by another call
                self._check_same_span(key, manifest, context)
            self.spans[key] = model
            self.span_bytes[key] = span_bytes
            self.span_manifests[key] = manifest
        with self._compute:
            self.ms_per_layer = model.ms_per_layer()
        print(f"duskpool node: serving layers [{manifest.start}, {manifest.stop}) of model "
              f"{manifest.model_hash[:12]} ({received / 1e6:.1f} MB received, "
              f"{f'{from_disk / 1e6:.1f} MB read from this machine, ' if from_disk else ''}"
              f"{self.ms_per_layer:.2f} ms/layer)",
              file=sys.stderr, flush=True)
        yield pb.LoadSpanReply(ready=True, received_bytes=received, ms_per_layer=self.ms_per_layer)

    def _check_same_span(self, key: tuple[str, int, int], manifest: pb.SpanManifest, context) -> None:
        if self.span_manifests.get(key) != manifest:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"layers [{key[1]}, {key[2]}) of model {key[0][:12]} are loaded here already, with other "
                          "tensors: a loaded span is never replaced")

    def _require_gateway(self, context, what: str) -> None:
        """Abort the call unless the pool's gateway makes it (any member may send hidden states, not commands)."""
        if self.identity is not None and not peer_is_gateway(context):
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"only the gateway may {what}")

    # --- Forward ----------------------------------------------------------------------------------
    def Forward(self, request_iterator: Iterator[pb.ForwardRequest], context) -> Iterator[pb.Result]:
        """Every message is checked against its session before any compute; a bad one gets an error Result
        (its own, not the stream's: one stream carries many sessions) and the node goes on serving. Results
        go to the request's sink; only a request whose route or sink cannot be trusted is answered here."""
        peer = peer_fingerprint(context) or context.peer()
        member = peer_member_id(context)
        for request in request_iterator:
            if peer in self.revoked:  # revoked while its stream was open: checked per message
                context.abort(grpc.StatusCode.PERMISSION_DENIED, "certificate revoked")
            try:
                check_route(request)
                self._check_members(request)
            except ValueError as e:  # never sent along a route it cannot trust: back to the sender
                yield pb.Result(session_id=request.session_id, step=request.step, error=f"node {self.node_id}: {e}")
                continue
            try:
                self._run(request, peer, member)  # checked here, computed in the next batch, passed on from there
            except Exception as e:  # the gateway hears about it; the node keeps serving
                self._fail(request, f"node {self.node_id}: {e}", short_of_memory=isinstance(e, ShortOfMemory))

    def _run(self, request: pb.ForwardRequest, peer: str, member: int | None = None) -> None:
        """Check the step against its session and hand it to the batcher: it runs in the next forward of its
        span with every other session's step waiting here, then `_pass_on`s (or `_fail`s). `peer` is the
        sender's certificate fingerprint, `member` the member id it names."""
        if not 0 < len(request.session_id) <= 64:
            raise ValueError("the session id must be 1..64 characters")
        stage = request.route[0]
        key = (request.model_hash, stage.start, stage.stop)
        model = self.spans.get(key)
        if model is None:
            raise ValueError(f"layers [{stage.start}, {stage.stop}) of model {request.model_hash[:12]} "
                             "are not loaded here")
        if not 0 < request.context <= min(MAX_CONTEXT, model.spec.context_length):
            raise ValueError(f"context {request.context} is out of range 1..{model.spec.context_length}")
        hidden = wire.from_wire(model, request.hidden, request.context)
        end = request.position + hidden.shape[0]
        if end > request.context:
            raise ValueError(f"positions {request.position}..{end} are past the session's context of {request.context}")
        # a grant is checked (a signature: 0.1 ms) only for the first step of a session not open here
        opening = request.position == 0 and request.session_id not in self.sessions
        grant_expires = self._check_grant(request, peer, member) if opening else None
        with self._lock:
            session = self.sessions.get(request.session_id)
            if session is None:
                session = self._open_session(request, peer, grant_expires)
            # each span of a session hears from one sender, the first: the gateway, or the route's node before it
            sender = session.senders.setdefault(key, peer)
            if self.identity is not None and peer != sender:
                raise ValueError(f"session {request.session_id[:12]} belongs to another sender")
            if session.context != request.context:
                raise ValueError(f"session {request.session_id[:12]} has a context of {session.context}, "
                                 f"not {request.context}")
            filled = session.filled.get(key, 0)
            if request.position > filled:  # a gap would attend over positions never written
                raise ValueError(f"position {request.position} skips ahead: session {request.session_id[:12]} "
                                 f"holds {filled} positions of layers [{stage.start}, {stage.stop})")
            cache = session.caches.get(key)
            if cache is None:
                self._check_memory(model.cache_bytes(request.context))
                cache = session.caches[key] = model.new_cache(request.context)
            if request.position < filled:  # a step taken back (a rejected speculative draft): none of it stays
                cache.truncate(request.position)
            session.filled[key] = request.position
            session.last_used = time.monotonic()

        def done(job: Job, error: Exception | None) -> None:
            if error is not None:
                self._fail(request, f"node {self.node_id}: {error}")
                return
            session.filled[key] = end
            self._pass_on(request, wire.to_wire(model, job.output, request.hidden.dtype), job.group)

        self.batcher.submit(Job(model, cache, request.position, hidden, done, batch=request.batch, group=request.group))

    def _check_members(self, request: pb.ForwardRequest) -> None:
        """Over TLS a route names only members the gateway told this node of, and a sink of that gateway."""
        if self.identity is None:
            return
        for stage in request.route[1:]:
            if stage.address not in self.members:
                raise NotAMember(f"the route names {stage.address[:60]}, where no pool member is known")
        if self._sink_name_at(request.sink) is None:
            raise NotAMember(f"the sink {request.sink[:60]} is not a gateway of the pool")

    def _name_at(self, address: str) -> str | None:
        """The name the certificate at `address` must carry: its member's (None: no member is known there)."""
        if self.identity is None:
            return NODE_NAME
        member_id = self.members.get(address)
        return None if member_id is None else expected_name(member_id)

    def _sink_name_at(self, address: str) -> str | None:
        return GATEWAY_NAME if self.identity is None or address in self.sinks else None

    def _open_session(self, request: pb.ForwardRequest, peer: str, grant_expires: float | None = None) -> Session:
        """Under self._lock: a new session, if the message may open one (over TLS: with the gateway's grant,
        checked by `_check_grant`, that opened nothing here before) and there is room."""
        if request.position != 0:
            raise ValueError(f"unknown or expired session {request.session_id[:12]} (a session starts at position 0)")
        if self.identity is not None:
            if grant_expires is None:
                raise ValueError(f"session {request.session_id[:12]} has no grant: only the gateway opens sessions")
            if request.session_id in self._granted:
                raise ValueError(f"session {request.session_id[:12]} was opened here before: a grant opens it once")
        if self.lend_state.lending is not Lending.AVAILABLE:
            raise ValueError(f"this machine is not lent now ({self.lend_state.reason}); it takes no new sessions")
        if len(self.sessions) >= MAX_SESSIONS:
            raise ValueError(f"this node serves {MAX_SESSIONS} sessions already; retry later")
        if sum(s.peer == peer for s in self.sessions.values()) >= MAX_SESSIONS_PER_PEER:
            raise ValueError(f"this sender has {MAX_SESSIONS_PER_PEER} sessions open here already")
        session = self.sessions[request.session_id] = Session(peer, request.context)
        if grant_expires is not None:
            self._granted[request.session_id] = grant_expires
        return session

    def _check_grant(self, request: pb.ForwardRequest, peer: str, member: int | None) -> float | None:
        """Over TLS, whether the gateway lets `request` open its session here; raises ValueError if not, else
        returns when the grant expires (None without TLS). The grant, signed with the key of the gateway that named
        the members, must be for this session, model and context, unexpired, and name the step's route with this
        node at its stage; the sender must be the one the grant puts before that stage: the gateway for the
        first, else the member at the stage before. So no member can take a node's lent memory for a session of
        its own, nor open the gateway's session at a node from anywhere but the hop before it."""
        if self.identity is None:
            return None
        sid = request.session_id[:12]
        if not request.grant:
            raise ValueError(f"session {sid} has no grant: only the gateway opens sessions")
        if self.gateway_certificate is None or not signed_by(self.gateway_certificate, request.grant,
                                                             request.grant_signature):
            raise ValueError(f"the grant for session {sid} is not signed by the pool's gateway")
        grant = pb.SessionGrant.FromString(request.grant)
        if (grant.session_id, grant.model_hash, grant.context) != (request.session_id, request.model_hash,
                                                                   request.context):
            raise ValueError(f"the grant is for another session, model or context than session {sid}'s")
        if grant.expires < time.time():
            raise ValueError(f"the grant for session {sid} expired (or this machine's clock is ahead of the "
                             "gateway's)")
        place = len(grant.route) - len(request.route)  # this stage's index in the granted route
        if (place < 0 or list(grant.route[place:]) != list(request.route)
                or self.members.get(request.route[0].address) != self.member_id):
            raise ValueError(f"the grant for session {sid} names another route, or another node at this stage")
        if place == 0 and peer != self.gateway_fingerprint:
            raise ValueError(f"session {sid} opens at this stage only from the gateway")
        if place > 0 and (member or 0) != self.members.get(grant.route[place - 1].address):  # 0: before ids
            raise ValueError(f"session {sid} opens at this stage only from the node of the stage before it")
        return grant.expires

    def _check_memory(self, needed: int) -> None:
        free = self.free_bytes()
        if needed > free:
            raise ShortOfMemory(f"a KV cache for this context needs {needed / 2**20:.0f} MiB; this node has "
                             f"{free / 2**20:.0f} MiB to lend")

    def _pass_on(self, request: pb.ForwardRequest, hidden: pb.Hidden, group: int) -> None:
        """The output of this stage, computed with `group` sessions: on to the next node of the route, or after the
        last stage to the sink."""
        if len(request.route) > 1:
            nxt = pb.ForwardRequest(session_id=request.session_id, step=request.step, position=request.position,
                                    context=request.context, hidden=hidden, model_hash=request.model_hash,
                                    route=request.route[1:], sink=request.sink, grant=request.grant,
                                    grant_signature=request.grant_signature, batch=request.batch, group=group)
            try:
                self._next_nodes.get(request.route[1].address).send(nxt)
            except NotAMember as e:  # the gateway dropped that member since the step was checked
                self._fail(request, f"node {self.node_id}: {e}")
        else:
            self._to_sink(request, pb.Result(session_id=request.session_id, step=request.step, hidden=hidden,
                                             group=group))

    def _fail(self, request: pb.ForwardRequest, error: str, short_of_memory: bool = False) -> None:
        """Tell the gateway (the request's sink) that this step failed here."""
        self._to_sink(request, pb.Result(session_id=request.session_id, step=request.step, error=error,
                                         short_of_memory=short_of_memory))

    def _to_sink(self, request: pb.ForwardRequest, result: pb.Result) -> None:
        try:
            self._sinks.get(request.sink).send(result)
        except NotAMember:  # checked when the step came in; a sink dropped since then hears nothing
            pass

    def _on_next_node_lost(self, pusher: Pusher, e: Exception) -> None:
        self._fail(pusher.last_sent, f"node {self.node_id} lost the next node {pusher.address}: {_reason(e)}")

    # --- sessions ---------------------------------------------------------------------------------
    def EndSession(self, request: pb.EndSessionRequest, context) -> pb.EndSessionReply:
        self._require_gateway(context, "end sessions")
        return pb.EndSessionReply(existed=self.end_session(request.session_id))

    def end_session(self, session_id: str) -> bool:
        with self._lock:
            session = self.sessions.pop(session_id, None)
        if session is None:
            return False
        for cache in session.caches.values():
            cache.clear()  # nothing of the session outlives it
            self.batcher.forget(cache)
        return True

    def SetMembers(self, request: pb.MemberList, context) -> pb.MembersReply:
        """The members a route may name and the sinks a result may go to; pushers to anything else are closed."""
        self._require_gateway(context, "name the pool's members")
        self.gateway_certificate = peer_certificate(context)  # its key signs the grants that open sessions
        self.gateway_fingerprint = peer_fingerprint(context)
        self.members = {m.address: m.member_id for m in request.members}
        self.sinks = frozenset(request.sinks)
        self._next_nodes.sweep()
        self._sinks.sweep()
        threading.Thread(target=self.renew_if_due, daemon=True, name="renew").start()  # a sink is known now
        return pb.MembersReply()

    def renew_if_due(self) -> bool:
        """Renew this node's certificate at a gateway sink once a third of its life is left (or it names no member
        id); whether it was renewed. New connections, both ways, use the new one; it is saved to identity_dir."""
        identity = self.identity
        if identity is None or not self.sinks or not self._renewing.acquire(blocking=False):
            return False
        try:
            if not renewal_due(identity.certificate) and member_id_of(identity.certificate) is not None:
                return False
            for sink in sorted(self.sinks):
                try:
                    renewed = renew(sink, identity)
                except (JoinError, JoinRefused) as e:  # this sink's gateway does not keep the pool, or refuses
                    print(f"duskpool node: certificate renewal at {sink} failed: {e}", file=sys.stderr, flush=True)
                    continue
                if self.identity_dir is not None:
                    save_identity(renewed, self.identity_dir)
                self.identity = self._next_nodes.identity = self._sinks.identity = renewed
                expires = renewed.certificate.not_valid_after_utc.strftime("%Y-%m-%d")
                print(f"duskpool node: certificate renewed at {sink}, valid until {expires}", file=sys.stderr,
                      flush=True)
                return True
            return False
        finally:
            self._renewing.release()

    def SetRevoked(self, request: pb.RevokedList, context) -> pb.RevokedReply:
        self._require_gateway(context, "revoke members")
        self.revoked = frozenset(request.fingerprints)
        with atomic_file(self.revoked_path) as f:
            f.write(json.dumps(sorted(self.revoked)).encode())
        return pb.RevokedReply()

    def update_lending(self, machine: MachineState, now: float) -> LendState:
        """One step of the lending state machine; on a change, tell the gateway through the health status.
        Draining keeps the sessions in flight; once it times out they are ended (the gateway re-routes them)."""
        with self._lock:
            in_flight = len(self.sessions)
        old, new = self.lend_state, step(self.lend_state, machine, now, in_flight, self.policy)
        self.lend_state = new
        if new.lending is Lending.UNAVAILABLE:
            self.awake.release()
        elif not self.awake.acquire() and self.awake.error != self._told_awake_error:  # a Mac may sleep mid-request
            self._told_awake_error = self.awake.error
            print(f"duskpool node: cannot keep this machine awake while lent: {self.awake.error}", file=sys.stderr)
        if new.lending is not old.lending:
            status = "SERVING" if new.lending is Lending.AVAILABLE else "NOT_SERVING"
            self.health.set("", getattr(health_pb2.HealthCheckResponse, status))
            print(f"duskpool node: {new.lending.value} ({new.reason})", file=sys.stderr, flush=True)
        if new.drain_timed_out:
            for session_id in list(self.sessions):
                self.end_session(session_id)
        return new

    def watch_lending(self, stop: threading.Event) -> None:
        while not stop.wait(LEND_POLL_S if self.lend_state.reason != "starting" else 0):
            self.update_lending(self._probe(), time.time())

    def _probe(self) -> MachineState:
        return probe() if self.policy.lend == "idle" else MachineState()  # "always"/"never" look at nothing

    def hand_back(self, wanted: bool) -> None:
        """The owner wants the machine now (`kill -USR1`: drain, lend no more), or lends it again (`-USR2`)."""
        self.policy = replace(self.configured_policy, lend="never") if wanted else self.configured_policy
        self.update_lending(self._probe(), time.time())

    def reap_idle_sessions(self, idle_seconds: float = SESSION_IDLE_SECONDS) -> None:
        now = time.monotonic()
        with self._lock:
            idle = [sid for sid, s in self.sessions.items() if now - s.last_used > idle_seconds]
        for sid in idle:
            self.end_session(sid)
        wall = time.time()
        with self._lock:
            self._granted = {sid: expires for sid, expires in self._granted.items() if expires > wall}
        self._next_nodes.sweep()
        self._sinks.sweep()

    def close(self) -> None:
        self.batcher.close()
        self.awake.release()
        self._next_nodes.close()
        self._sinks.close()


def _read_revoked(path: Path) -> frozenset[str]:
    """The revoked fingerprints a node kept; a list it cannot read is an error, not an empty list."""
    if not path.exists():
        return frozenset()
    try:
        return frozenset(json.loads(path.read_text()))
    except (ValueError, TypeError) as e:
        raise RuntimeError(f"{path} is damaged ({e}); remove it, then the gateway sends the list again") from None


def check_route(request: pb.ForwardRequest) -> None:
    """A route the node may act on: 1..MAX_ROUTE stages, each after the first at a HOST:PORT, and a sink at one."""
    route = request.route
    if not 0 < len(route) <= MAX_ROUTE:
        raise ValueError(f"the route has {len(route)} stages; 1..{MAX_ROUTE} are allowed")
    for address in [stage.address for stage in route[1:]] + [request.sink]:
        host, sep, port = address.rpartition(":")
        if not sep or not host or len(address) > 255 or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"route address {address[:40]!r} is not HOST:PORT")


def valid_route(request: pb.ForwardRequest) -> bool:
    """Whether the node acts on `request`'s route: sends its output and any failure on to the sink, not back."""
    try:
        check_route(request)
        return True
    except ValueError:
        return False


def _reason(e: Exception) -> str:
    return e.details() if isinstance(e, grpc.RpcError) and hasattr(e, "details") else str(e)


def serve(host: str, port: int, cache_dir: Path, identity: NodeIdentity | None, memory_limit: int | None = None,
          announce: bool = True, policy: LendPolicy | None = None, backend_name: str = backends.DEFAULT,
          identity_dir: Path | None = None, models: tuple[Path, ...] = ()) -> None:
    """Run a node until interrupted; prints 'listening on HOST:PORT' once ready (the swarm waits for it)."""
    service = NodeService(cache_dir, memory_limit, identity=identity, policy=policy, backend_name=backend_name,
                          identity_dir=identity_dir, models=models)
    if identity is not None and (warning := expiry_warning(identity.certificate)):
        print(f"duskpool node: warning: {warning}", file=sys.stderr, flush=True)
    server, bound = start_server(service, host, port, identity, lambda fp: fp in service.revoked)
    stop_watching = threading.Event()
    threading.Thread(target=service.watch_lending, args=(stop_watching,), daemon=True).start()
    signal.signal(signal.SIGUSR1, lambda *_: service.hand_back(True))
    signal.signal(signal.SIGUSR2, lambda *_: service.hand_back(False))
    print(f"duskpool node {service.node_id} listening on {host}:{bound}", flush=True)
    announcement = None
    if announce:
        from duskpool.cluster.discovery import Announcement

        addresses = None if host in ("0.0.0.0", "") else [host]
        announcement = Announcement(service.node_id, bound, addresses, __version__)
    try:
        while server.wait_for_termination(timeout=30):  # True means it timed out: still serving
            service.reap_idle_sessions()
            service.store.remove_stale_partials()
            service.renew_if_due()
    finally:
        stop_watching.set()
        if announcement is not None:
            announcement.close()
        service.close()
        server.stop(grace=1)
