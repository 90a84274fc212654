"""A node: serves spans of layers over gRPC, one KV cache per session, pushing outputs down the route.

A request's path through a node is `Forward`: check the message, run the span, then push the output
to the next hop of its route (ring) or answer the sender (star).
"""

import hashlib
import json
import os
import platform
import queue
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
import psutil
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from duskpool import __version__, backends
from duskpool.cluster import wire
from duskpool.cluster.proto import duskpool_pb2 as pb
from duskpool.cluster.proto import duskpool_pb2_grpc as pb_grpc
from duskpool.idle import Lending, LendPolicy, LendState, MachineState, probe, step
from duskpool.models import KVCache, SpanModel
from duskpool.security import (
    NODE_CHANNEL_OPTIONS,
    NodeIdentity,
    RevocationInterceptor,
    channel_credentials,
    peer_fingerprint,
    peer_is_gateway,
    server_credentials,
)
from duskpool.weights.progress import Progress
from duskpool.weights.store import StoredModel, TensorStore

MAX_MESSAGE_BYTES = 64 * 2**20  # a chunk of weights or a long prompt's hidden states
# Keepalive: every link is pinged each second, even idle, and dropped when a ping goes unanswered for a second,
# so a peer cut off the network (or frozen) is noticed in about 2 s; a dead process closes its sockets at once.
# (gRPC core enforces the answer's deadline through ping_timeout_ms, not keepalive_timeout_ms: grpc/grpc#39239)
KEEPALIVE_OPTIONS = [("grpc.keepalive_time_ms", 1000), ("grpc.keepalive_timeout_ms", 1000),
                     ("grpc.http2.ping_timeout_ms", 1000), ("grpc.keepalive_permit_without_calls", 1),
                     ("grpc.http2.max_pings_without_data", 0)]
GRPC_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)] + KEEPALIVE_OPTIONS
# servers must accept pings that often (by default they allow one per 5 minutes without data, then hang up)
SERVER_OPTIONS = GRPC_OPTIONS + [("grpc.http2.min_ping_interval_without_data_ms", 500),
                                 ("grpc.http2.max_ping_strikes", 0)]
SESSION_IDLE_SECONDS = 600  # a session nobody ended is freed after this long unused
MAX_CONTEXT = 131072
MAX_SESSIONS = 64  # live sessions per node: each holds a KV cache
MAX_SESSIONS_PER_PEER = 32  # so that one sender cannot take them all
MAX_ROUTE = 64  # hops in one request's route
LEND_POLL_S = 2.0  # how often the node looks whether its owner is back


def open_channel(address: str, identity: NodeIdentity | None, options: list | None = None) -> grpc.Channel:
    """A channel to a pool member: mutual TLS under the pool's CA, or plaintext when `identity` is None
    (--insecure, for debugging only)."""
    options = GRPC_OPTIONS + (options or [])
    if identity is None:
        return grpc.insecure_channel(address, options=options)
    credentials = channel_credentials(identity.cert_pem, identity.key_pem, identity.ca_pem)
    return grpc.secure_channel(address, credentials, options=options + NODE_CHANNEL_OPTIONS)


class Pusher:
    """One long-lived Forward stream to a peer. `send` only queues, so compute never waits on the network."""

    def __init__(self, address: str, identity: NodeIdentity | None, on_reply: Callable[[pb.ForwardReply], None],
                 on_broken: Callable[["Pusher", Exception], None]):
        self.address = address
        self.channel = open_channel(address, identity)
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.broken = False
        self.last_sent: pb.ForwardRequest | None = None
        self._error: grpc.RpcError | None = None
        self._lock = threading.Lock()  # a failure is reported once: by the reader, or by a send that comes after
        self._replies = pb_grpc.NodeStub(self.channel).Forward(iter(self.outbox.get, None))
        self._on_reply, self._on_broken = on_reply, on_broken
        threading.Thread(target=self._read, daemon=True, name=f"pusher-{address}").start()

    def send(self, request: pb.ForwardRequest) -> None:
        with self._lock:
            self.last_sent = request
            if not self.broken:
                self.outbox.put(request)
                return
        self._on_broken(self, self._error)  # the stream died before this request could go

    def _read(self) -> None:
        try:
            for reply in self._replies:
                self._on_reply(reply)
        except grpc.RpcError as e:
            with self._lock:
                self.broken, self._error, last = True, e, self.last_sent
            if e.code() != grpc.StatusCode.CANCELLED and last is not None:
                self._on_broken(self, e)

    def close(self) -> None:
        self.outbox.put(None)
        self.channel.close()


class Pushers:
    """The Pusher to each address, replaced when its stream breaks."""

    def __init__(self, identity: NodeIdentity | None, on_reply: Callable[[pb.ForwardReply], None],
                 on_broken: Callable[[Pusher, Exception], None]):
        self.identity = identity
        self._by_address: dict[str, Pusher] = {}
        self._lock = threading.Lock()
        self._on_reply, self._on_broken = on_reply, on_broken

    def get(self, address: str) -> Pusher:
        with self._lock:
            pusher = self._by_address.get(address)
            if pusher is None or pusher.broken:
                pusher = self._by_address[address] = Pusher(address, self.identity, self._on_reply, self._on_broken)
            return pusher

    def close(self) -> None:
        with self._lock:
            for pusher in self._by_address.values():
                pusher.close()
            self._by_address.clear()


@dataclass
class Session:
    peer: str  # who opened it (certificate fingerprint, or address without TLS): sessions are counted per peer
    context: int
    caches: dict[tuple[str, int, int], KVCache] = field(default_factory=dict)
    filled: dict[tuple[str, int, int], int] = field(default_factory=dict)  # positions written, per span
    last_used: float = field(default_factory=time.monotonic)


class NodeService(pb_grpc.NodeServicer):
    def __init__(self, cache_dir: Path, memory_limit: int | None = None, node_id: str | None = None,
                 identity: NodeIdentity | None = None, policy: LendPolicy | None = None,
                 backend_name: str = backends.DEFAULT):
        self.backend = backends.backend(backend_name)
        self.store = TensorStore(cache_dir)
        self.configured_policy = self.policy = policy or LendPolicy(lend="always")
        # lent from the start; the first probe takes it back at once if the owner is there
        self.lend_state = LendState(Lending.AVAILABLE, time.time(), "starting")
        self.health = health.HealthServicer()  # SERVING while lent: the gateway watches it
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.memory_limit = memory_limit
        self.node_id = node_id or f"{platform.node()}-{uuid.uuid4().hex[:6]}"
        self.spans: dict[tuple[str, int, int], SpanModel] = {}
        self.span_bytes: dict[tuple[str, int, int], int] = {}
        self.sessions: dict[str, Session] = {}
        self.ms_per_layer = 0.0
        self.weight_bytes_received = 0  # total over the node's life: a warm cache keeps it at 0
        self.matmul_bytes_per_ms = self.backend.matmul_bytes_per_ms()
        self._lock = threading.Lock()  # spans and sessions
        self._compute = threading.Lock()  # one forward at a time: the kernels use every core already
        self.identity = identity
        self.revoked: frozenset[str] = frozenset()  # certificate fingerprints the gateway said are revoked
        self._pushers = Pushers(identity, on_reply=self._on_downstream_reply, on_broken=self._on_downstream_broken)

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
                           lending_reason=self.lend_state.reason)

    def _kv_bytes(self) -> int:
        # snapshots: Info and LoadSpan ask without the lock while Forward opens and ends sessions
        return sum(c.nbytes for s in list(self.sessions.values()) for c in list(s.caches.values()))

    def free_bytes(self) -> int:
        used = sum(self.span_bytes.values()) + self._kv_bytes()
        available = psutil.virtual_memory().available
        if self.memory_limit is not None:
            available = min(available, self.memory_limit - used)
        return max(0, available)

    # --- LoadSpan ---------------------------------------------------------------------------------
    def LoadSpan(self, request_iterator: Iterator[pb.LoadSpanRequest], context) -> Iterator[pb.LoadSpanReply]:
        first = next(request_iterator, None)
        if first is None or not first.HasField("manifest"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "LoadSpan must start with the span's manifest")
        manifest = first.manifest
        span_bytes = sum(t.nbytes for t in manifest.tensors)
        key = (manifest.model_hash, manifest.start, manifest.stop)
        if key not in self.spans and self.memory_limit is not None and span_bytes > self.free_bytes():
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"span needs {span_bytes / 1e9:.2f} GB, this node has {self.free_bytes() / 1e9:.2f} GB free")
        wanted = {t.sha256: t.nbytes for t in manifest.tensors if not self.store.has(t.sha256)}
        yield pb.LoadSpanReply(missing=list(wanted))
        bar = Progress(f"weights <- layers [{manifest.start}, {manifest.stop})", sum(wanted.values()),
                       bool(wanted))
        received = self._receive(request_iterator, wanted, context, bar)
        bar.close()
        stored = StoredModel(self.store, json.loads(manifest.metadata_json),
                             {t.name: StoredModel.info(t.name, t.qtype, list(t.shape), t.nbytes)
                              for t in manifest.tensors},
                             {t.name: t.sha256 for t in manifest.tensors})
        model = backends.load_span(stored, range(manifest.start, manifest.stop), embed=False, head=False,
                                   backend_name=self.backend.NAME)
        with self._lock:
            self.spans[key] = model
            self.span_bytes[key] = span_bytes
        with self._compute:
            self.ms_per_layer = model.ms_per_layer()
        print(f"duskpool node: serving layers [{manifest.start}, {manifest.stop}) of model "
              f"{manifest.model_hash[:12]} ({received / 1e6:.1f} MB received, {self.ms_per_layer:.2f} ms/layer)",
              file=sys.stderr, flush=True)
        yield pb.LoadSpanReply(ready=True, received_bytes=received, ms_per_layer=self.ms_per_layer)

    def _receive(self, requests: Iterator[pb.LoadSpanRequest], wanted: dict[str, int], context,
                 bar: Progress) -> int:
        """Write the streamed tensors into the store, each checked against its hash; bytes received."""
        received, current, digest, tmp = 0, None, None, None
        try:
            for request in requests:
                chunk = request.chunk
                if chunk.sha256 not in wanted:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unrequested tensor {chunk.sha256[:12]}")
                if chunk.sha256 != current:
                    current, digest = chunk.sha256, hashlib.sha256()
                    tmp = tempfile.NamedTemporaryFile(dir=self.store.root, delete=False)
                tmp.write(chunk.data)
                digest.update(chunk.data)
                received += len(chunk.data)
                self.weight_bytes_received += len(chunk.data)
                bar.advance(len(chunk.data))
                if tmp.tell() == wanted[current]:
                    tmp.close()
                    if digest.hexdigest() != current:
                        os.unlink(tmp.name)
                        context.abort(grpc.StatusCode.DATA_LOSS, f"tensor {current[:12]} arrived damaged")
                    target = self.store.path(current)
                    target.parent.mkdir(exist_ok=True)
                    os.replace(tmp.name, target)
                    tmp = None
        finally:
            if tmp is not None:
                tmp.close()
                os.unlink(tmp.name)
        missing = [h for h in wanted if not self.store.has(h)]
        if missing:
            context.abort(grpc.StatusCode.DATA_LOSS, f"{len(missing)} tensors never arrived")
        return received

    # --- Forward ----------------------------------------------------------------------------------
    def Forward(self, request_iterator: Iterator[pb.ForwardRequest], context) -> Iterator[pb.ForwardReply]:
        """Every message is checked against its session before any compute; a bad one gets an error reply
        (its own, not the stream's: one stream carries many sessions) and the node goes on serving."""
        peer = peer_fingerprint(context) or context.peer()
        for request in request_iterator:
            try:
                _check_route(request.route)
                hidden = self._run(request, peer)  # a Hidden message, ready for the next hop
            except Exception as e:  # the sender (or the gateway) hears about it; the node keeps serving
                error = f"node {self.node_id}: {e}"
                if len(request.route) > 1 and valid_route(request.route):
                    self._report(request, error)
                else:
                    yield pb.ForwardReply(session_id=request.session_id, step=request.step, error=error)
                continue
            if len(request.route) > 1:  # ring: straight on to the next hop
                nxt = pb.ForwardRequest(session_id=request.session_id, step=request.step,
                                        position=request.position, context=request.context,
                                        hidden=hidden, model_hash=request.model_hash, route=request.route[1:])
                self._pushers.get(request.route[1].address).send(nxt)
            else:  # star: back to the sender
                yield pb.ForwardReply(session_id=request.session_id, step=request.step, hidden=hidden)

    def _run(self, request: pb.ForwardRequest, peer: str) -> pb.Hidden:
        if not 0 < len(request.session_id) <= 64:
            raise ValueError("the session id must be 1..64 characters")
        hop = request.route[0]
        key = (request.model_hash, hop.start, hop.stop)
        model = self.spans.get(key)
        if model is None:
            raise ValueError(f"layers [{hop.start}, {hop.stop}) of model {request.model_hash[:12]} are not loaded here")
        if not 0 < request.context <= min(MAX_CONTEXT, model.spec.context_length):
            raise ValueError(f"context {request.context} is out of range 1..{model.spec.context_length}")
        hidden = wire.from_wire(model, request.hidden, request.context)
        end = request.position + hidden.shape[0]
        if end > request.context:
            raise ValueError(f"positions {request.position}..{end} are past the session's context of {request.context}")
        with self._lock:
            session = self.sessions.get(request.session_id)
            if session is None:
                session = self._open_session(request, peer)
            if session.context != request.context:
                raise ValueError(f"session {request.session_id[:12]} has a context of {session.context}, "
                                 f"not {request.context}")
            filled = session.filled.get(key, 0)
            if request.position > filled:  # a gap would attend over positions never written
                raise ValueError(f"position {request.position} skips ahead: session {request.session_id[:12]} "
                                 f"holds {filled} positions of layers [{hop.start}, {hop.stop})")
            cache = session.caches.get(key)
            if cache is None:
                self._check_memory(model.cache_bytes(request.context))
                cache = session.caches[key] = model.new_cache(request.context)
            session.last_used = time.monotonic()
        with self._compute:
            hidden = model.forward_span(hidden, cache, request.position)
        session.filled[key] = max(filled, end)
        return wire.to_wire(model, hidden, request.hidden.dtype)

    def _open_session(self, request: pb.ForwardRequest, peer: str) -> Session:
        """Under self._lock: a new session, if the message may open one and there is room."""
        if request.position != 0:
            raise ValueError(f"unknown or expired session {request.session_id[:12]} (a session starts at position 0)")
        if self.lend_state.lending is not Lending.AVAILABLE:
            raise ValueError(f"this machine is not lent now ({self.lend_state.reason}); it takes no new sessions")
        if len(self.sessions) >= MAX_SESSIONS:
            raise ValueError(f"this node serves {MAX_SESSIONS} sessions already; retry later")
        if sum(s.peer == peer for s in self.sessions.values()) >= MAX_SESSIONS_PER_PEER:
            raise ValueError(f"this sender has {MAX_SESSIONS_PER_PEER} sessions open here already")
        session = self.sessions[request.session_id] = Session(peer, request.context)
        return session

    def _check_memory(self, needed: int) -> None:
        free = self.free_bytes()
        if needed > free:
            raise ValueError(f"a KV cache for this context needs {needed / 2**20:.0f} MiB; this node has "
                             f"{free / 2**20:.0f} MiB to lend")

    def _report(self, request: pb.ForwardRequest, error: str) -> None:
        """Tell the gateway (the ring's last hop) that this step failed here."""
        gateway = request.route[-1].address
        self._pushers.get(gateway).send(pb.ForwardRequest(session_id=request.session_id, step=request.step,
                                                          error=error, route=request.route[-1:]))

    def _on_downstream_reply(self, reply: pb.ForwardReply) -> None:
        pass  # in a ring the next hop answers the gateway, not us

    def _on_downstream_broken(self, pusher: Pusher, e: Exception) -> None:
        if pusher.last_sent is not None and pusher.last_sent.route:
            last = pusher.last_sent
            if len(last.route) > 1 or last.route[0].stop > 0:  # the broken peer was not the gateway itself
                self._report(last, f"node {self.node_id} lost the next hop {pusher.address}: {_reason(e)}")

    # --- sessions ---------------------------------------------------------------------------------
    def EndSession(self, request: pb.EndSessionRequest, context) -> pb.EndSessionReply:
        return pb.EndSessionReply(existed=self.end_session(request.session_id))

    def end_session(self, session_id: str) -> bool:
        with self._lock:
            session = self.sessions.pop(session_id, None)
        if session is None:
            return False
        for cache in session.caches.values():
            cache.clear()  # nothing of the session outlives it
        return True

    def SetRevoked(self, request: pb.RevokedList, context) -> pb.RevokedReply:
        if self.identity is not None and not peer_is_gateway(context):
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "only the gateway may revoke members")
        self.revoked = frozenset(request.fingerprints)
        return pb.RevokedReply()

    def update_lending(self, machine: MachineState, now: float) -> LendState:
        """One step of the lending state machine; on a change, tell the gateway through the health status.
        Draining keeps the sessions in flight; once it times out they are ended (the gateway re-routes them)."""
        with self._lock:
            in_flight = len(self.sessions)
        old, new = self.lend_state, step(self.lend_state, machine, now, in_flight, self.policy)
        self.lend_state = new
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

    def close(self) -> None:
        self._pushers.close()


def _check_route(route) -> None:
    """A route the node may act on: 1..MAX_ROUTE hops, each after the first at a HOST:PORT."""
    if not 0 < len(route) <= MAX_ROUTE:
        raise ValueError(f"the route has {len(route)} hops; 1..{MAX_ROUTE} are allowed")
    for hop in route[1:]:
        host, sep, port = hop.address.rpartition(":")
        if not sep or not host or len(hop.address) > 255 or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"route address {hop.address[:40]!r} is not HOST:PORT")


def valid_route(route) -> bool:
    """Whether a failure may be reported along the route (to its last hop), or only to the sender."""
    try:
        _check_route(route)
        return True
    except ValueError:
        return False


def _reason(e: Exception) -> str:
    return e.details() if isinstance(e, grpc.RpcError) and hasattr(e, "details") else str(e)


def start_server(service: pb_grpc.NodeServicer, host: str, port: int, identity: NodeIdentity | None,
                 is_revoked: Callable[[str], bool]) -> tuple[grpc.Server, int]:
    """A gRPC server for `service` plus the standard health service (the service's own `health`, if it
    has one); returns it and its bound port.

    With an identity, only members of its pool get in (mutual TLS), and not once revoked."""
    interceptors = [RevocationInterceptor(is_revoked)] if identity is not None else []
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32), options=SERVER_OPTIONS,
                         interceptors=interceptors)
    pb_grpc.add_NodeServicer_to_server(service, server)
    health_service = getattr(service, "health", None)
    if health_service is None:
        health_service = health.HealthServicer()
        health_service.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_service, server)
    if identity is None:
        bound = server.add_insecure_port(f"{host}:{port}")
    else:
        credentials = server_credentials(identity.cert_pem, identity.key_pem, identity.ca_pem)
        bound = server.add_secure_port(f"{host}:{port}", credentials)
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    server.start()
    return server, bound


def serve(host: str, port: int, cache_dir: Path, identity: NodeIdentity | None, memory_limit: int | None = None,
          announce: bool = True, policy: LendPolicy | None = None) -> None:
    """Run a node until interrupted; prints 'listening on HOST:PORT' once ready (the swarm waits for it)."""
    service = NodeService(cache_dir, memory_limit, identity=identity, policy=policy)
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
    finally:
        stop_watching.set()
        if announcement is not None:
            announcement.close()
        service.close()
        server.stop(grace=1)
