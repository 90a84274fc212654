"""The gateway: the one trusted process. It keeps the tokenizer, the embedding, the head and the privacy
prefix/suffix layers; plans which node holds which span; streams them their weights; and drives each
generation step over the route of nodes.

One decode step, in order:  RemoteSession.forward -> prefix layers -> Gateway.run_route
(ring: push to the first node, which pushes on; the last node delivers to GatewaySink.Forward)
-> suffix layers -> head -> logits.
"""

import dataclasses
import json
import queue
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from duskpool.cluster import planner, wire
from duskpool.cluster.node import Pushers, open_channel, start_server
from duskpool.cluster.proto import duskpool_pb2 as pb
from duskpool.cluster.proto import duskpool_pb2_grpc as pb_grpc
from duskpool.engine.runner import DEFAULT_CONTEXT, Engine, load_tokenizer
from duskpool.models import LlamaConfig, load_model
from duskpool.security import NodeIdentity, PoolState
from duskpool.weights import names
from duskpool.weights.gguf import GGUFFile
from duskpool.weights.progress import Progress
from duskpool.weights.store import config_metadata, model_hash, tensor_hashes

CHUNK_BYTES = 4 * 2**20
REVOCATION_POLL_S = 5.0  # how soon nodes hear of a member revoked with `duskpool nodes revoke`
STEP_TIMEOUT_S = 300.0  # a step still unanswered after this is an error (dead nodes are noticed far sooner)


class RouteError(RuntimeError):
    """A step could not complete on the route (a node failed, vanished or refused)."""


@dataclass(frozen=True)
class RouteStage:
    node_id: str
    address: str
    start: int
    stop: int


class NodeClient:
    """The gateway's connection to one node, and what it last said about itself."""

    def __init__(self, address: str, identity: NodeIdentity | None, timeout: float = 10.0):
        self.address = address
        # its own connection: closing another gateway's channel to the same node must not touch this one
        self.channel = open_channel(address, identity, [("grpc.use_local_subchannel_pool", 1)])
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


def model_profile(file: GGUFFile, config: LlamaConfig) -> planner.ModelProfile:
    layer_bytes = sum(file.tensors[n].nbytes for n in names.llama_block(0).values())
    edges = [names.TOKEN_EMBEDDING, names.OUTPUT, names.OUTPUT_NORM]
    edge_bytes = sum(file.tensors[n].nbytes for n in edges if n in file.tensors)
    return planner.ModelProfile.from_sizes(file.path.name, config.n_layers, layer_bytes, edge_bytes, config.dim,
                                           config.n_kv_heads, config.head_dim, kv_dtype_bytes=4)


def node_profile(client: NodeClient, layer_bytes: int) -> planner.NodeProfile:
    info = client.info
    ms_per_layer = layer_bytes / info.matmul_bytes_per_ms if info.matmul_bytes_per_ms else 1.0
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
                 progress: bool = True):
        """`identity`: the gateway's certificate in the pool (None: plaintext, for debugging only).
        `pool`: the pool's state, when this gateway keeps it: revocations then reach the nodes."""
        if routing not in ("ring", "star"):
            raise ValueError(f"routing must be 'ring' or 'star', not {routing!r}")
        if not node_addresses:
            raise ValueError("a gateway needs at least one node (--node HOST:PORT)")
        self.routing, self.progress = routing, progress
        self.file = GGUFFile(model_path)
        self.config = LlamaConfig.from_gguf(self.file.metadata)
        self.tokenizer = load_tokenizer(self.file)
        self.context_length = min(context_length or DEFAULT_CONTEXT, self.config.context_length)
        self.weight_bytes_sent = 0
        self.hidden_bytes_sent = 0  # activations the gateway sent (prefix outputs; in star, every hop's input)
        self._pending: dict[tuple[str, int], Future] = {}
        self._pending_lock = threading.Lock()
        self._broken: str | None = None  # why the route cannot serve, once a node on it is gone
        self._closing = False

        self.identity, self.pool = identity, pool
        self.clients = [NodeClient(a, identity) for a in node_addresses]
        self._client_at = {c.address: c for c in self.clients}
        profile = model_profile(self.file, self.config)
        config = planner.PlanConfig(sessions=sessions, context=self.context_length, privacy_prefix=prefix,
                                    privacy_suffix=suffix)
        profiles = [node_profile(c, profile.layer_bytes) for c in self.clients]
        self.plan = planner.plan(profile, GATEWAY_PROFILE, profiles, config)
        if even_split:  # a local swarm: its nodes share one CPU, so the speed model has nothing to choose
            self.plan = even_plan(self.plan, [c.info.node_id for c in self.clients])
        by_id = {c.info.node_id: c for c in self.clients}
        self.route = [RouteStage(s.node_id, by_id[s.node_id].address, s.start, s.stop) for s in self.plan.stages]

        self.prefix_model = load_model(self.file, self.plan.prefix, embed=True, head=False)
        self.suffix_model = load_model(self.file, self.plan.suffix, embed=False, head=True)

        listen = "127.0.0.1" if all(a.startswith(("127.", "localhost")) for a in node_addresses) else "0.0.0.0"
        is_revoked = pool.is_revoked if pool is not None else (lambda fingerprint: False)
        self._server, port = start_server(GatewaySink(self), listen, 0, identity, is_revoked)
        self.sink_address = f"{local_address_towards(node_addresses[0]) if listen != '127.0.0.1' else listen}:{port}"
        self._pushers = Pushers(identity, on_reply=self._on_reply, on_broken=self._on_broken)

        self.model_hash = self._load_spans()
        self._watchers = [threading.Thread(target=self._watch, args=(stage,), daemon=True) for stage in self.route]
        if pool is not None and identity is not None:
            self._watchers.append(threading.Thread(target=self._push_revocations, daemon=True))
        for watcher in self._watchers:
            watcher.start()

    # --- weights ----------------------------------------------------------------------------------
    def _load_spans(self) -> str:
        hashes = tensor_hashes(self.file)
        digest = model_hash(self.file, hashes)
        metadata = json.dumps(config_metadata(self.file), default=str)
        for stage in self.route:
            wanted = [n for i in range(stage.start, stage.stop) for n in names.llama_block(i).values()]
            if names.ROPE_FREQS in self.file.tensors:
                wanted.append(names.ROPE_FREQS)
            entries = [pb.TensorEntry(name=n, sha256=hashes[n], qtype=int(self.file.tensors[n].qtype),
                                      shape=list(self.file.tensors[n].shape), nbytes=self.file.tensors[n].nbytes)
                       for n in wanted]
            manifest = pb.SpanManifest(model_hash=digest, start=stage.start, stop=stage.stop,
                                       metadata_json=metadata, tensors=entries)
            self._send_span(stage, manifest, {e.sha256: e.name for e in entries})
        return digest

    def _send_span(self, stage: RouteStage, manifest: pb.SpanManifest, names_by_hash: dict[str, str]) -> None:
        missing: queue.SimpleQueue = queue.SimpleQueue()

        def requests() -> Iterator[pb.LoadSpanRequest]:
            yield pb.LoadSpanRequest(manifest=manifest)
            hashes = missing.get()
            total = sum(self.file.tensors[names_by_hash[h]].nbytes for h in hashes)
            bar = Progress(f"weights -> {stage.address} layers [{stage.start}, {stage.stop})", total,
                            self.progress and total > 0)
            for sha in hashes:
                data = self.file.read_bytes(names_by_hash[sha])
                for offset in range(0, len(data), CHUNK_BYTES):
                    piece = data[offset:offset + CHUNK_BYTES]
                    yield pb.LoadSpanRequest(chunk=pb.TensorChunk(sha256=sha, offset=offset, data=piece))
                    self.weight_bytes_sent += len(piece)
                    bar.advance(len(piece))
            bar.close()

        client = self._client_at[stage.address]
        try:
            for reply in client.stub.LoadSpan(requests()):
                if not reply.ready:
                    missing.put(list(reply.missing))
        except grpc.RpcError as e:
            raise RouteError(f"node {stage.address} could not load layers [{stage.start}, {stage.stop}): "
                             f"{e.details()}") from None

    # --- the data path ----------------------------------------------------------------------------
    def run_route(self, session_id: str, step: int, position: int, context: int,
                  hidden: torch.Tensor) -> torch.Tensor:
        """hidden [T, dim] after the prefix -> hidden after the last node's layers."""
        hops = [pb.Hop(address=s.address, start=s.start, stop=s.stop) for s in self.route]
        if self.routing == "ring":
            return self._step(session_id, step, position, context, hidden,
                              hops + [pb.Hop(address=self.sink_address)])
        for i, hop in enumerate(hops):  # star: every stage answers the gateway
            hidden = self._step(session_id, step * len(hops) + i, position, context, hidden, [hop])
        return hidden

    def _step(self, session_id: str, step: int, position: int, context: int, hidden: torch.Tensor,
              route: list[pb.Hop]) -> torch.Tensor:
        if self._broken:
            raise RouteError(self._broken)
        future: Future = Future()
        with self._pending_lock:
            self._pending[(session_id, step)] = future
        request = pb.ForwardRequest(session_id=session_id, step=step, position=position, context=context,
                                    hidden=wire.to_wire(hidden), model_hash=self.model_hash, route=route)
        self._pushers.get(route[0].address).send(request)
        self.hidden_bytes_sent += len(request.hidden.data)
        try:
            return future.result(timeout=STEP_TIMEOUT_S)
        except FutureTimeout:
            raise RouteError(f"no answer from the route within {STEP_TIMEOUT_S:.0f} s") from None
        finally:
            with self._pending_lock:
                self._pending.pop((session_id, step), None)

    def deliver(self, session_id: str, step: int, hidden: pb.Hidden, error: str) -> None:
        with self._pending_lock:
            future = self._pending.get((session_id, step))
        if future is None or future.done():
            return
        if error:
            future.set_exception(RouteError(error))
            return
        try:
            future.set_result(wire.from_wire(hidden, self.config.dim, self.context_length))
        except ValueError as e:
            future.set_exception(RouteError(f"bad hidden state from the route: {e}"))

    def _on_reply(self, reply: pb.ForwardReply) -> None:
        self.deliver(reply.session_id, reply.step, reply.hidden, reply.error)

    def _on_broken(self, pusher, e: Exception) -> None:
        self._fail_all(f"lost the connection to node {pusher.address}")

    def _fail_all(self, reason: str) -> None:
        with self._pending_lock:
            pending = list(self._pending.values())
        for future in pending:
            if not future.done():
                future.set_exception(RouteError(reason))

    def _watch(self, stage: RouteStage) -> None:
        """Health.Watch stays open while the node lives: its end means the node is gone."""
        client = self._client_at[stage.address]
        reason = "its health stream ended"
        try:
            for _ in health_pb2_grpc.HealthStub(client.channel).Watch(health_pb2.HealthCheckRequest()):
                pass
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.CANCELLED and self._closing:
                return
            reason = f"{e.code().name}: {e.details()}"
        self._broken = (f"node {stage.node_id} at {stage.address} (layers [{stage.start}, {stage.stop})) is gone "
                        f"({reason})")
        self._fail_all(self._broken)

    def _push_revocations(self) -> None:
        """Tell every node which certificates are revoked, now and whenever that changes."""
        told: set[str] | None = None
        while not self._closing:
            revoked = self.pool.revoked_fingerprints()
            if revoked != told:
                for client in self.clients:
                    try:
                        client.stub.SetRevoked(pb.RevokedList(fingerprints=sorted(revoked)), timeout=5)
                    except grpc.RpcError:
                        revoked = None  # try this node again next round
                told = revoked
            time.sleep(REVOCATION_POLL_S)

    @property
    def broken(self) -> str | None:
        """Why the route can no longer serve (a node on it is gone), or None while it can."""
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
        for client in self.clients:
            client.close()
        self._server.stop(grace=0.5)


class RemoteSession:
    def __init__(self, gateway: Gateway, capacity: int):
        self.gateway, self.capacity = gateway, capacity
        self.id, self.step = uuid.uuid4().hex, 0
        self.prefix_cache = gateway.prefix_model.new_cache(capacity)
        self.suffix_cache = gateway.suffix_model.new_cache(capacity)

    def forward(self, tokens: list[int], start: int) -> torch.Tensor:
        g, positions = self.gateway, torch.arange(start, start + len(tokens))
        hidden = g.prefix_model.forward_span(g.prefix_model.embed(torch.tensor(tokens)), self.prefix_cache, positions)
        self.step += 1
        hidden = g.run_route(self.id, self.step, start, self.capacity, hidden)
        hidden = g.suffix_model.forward_span(hidden, self.suffix_cache, positions)
        return g.suffix_model.head(hidden[-1:])[0]

    def close(self) -> None:
        self.prefix_cache.clear()
        self.suffix_cache.clear()
        self.gateway.end_session(self.id)
