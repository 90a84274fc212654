"""The gateway: the one trusted process. It keeps the tokenizer, the embedding, the head and the privacy
prefix/suffix layers, and drives each generation step over a route of nodes.

One decode step, each hop a function to read in order:
    RemoteSession.forward -> prefix layers -> Gateway.run_route -> Gateway._step (a ForwardRequest to the
    route's first node) -> NodeService.Forward, which runs its span and `_pass_on`s the output to the next
    node's Forward ... -> the last node sends a Result to Sink.Deliver -> Sink.deliver wakes `_step`
    -> suffix layers -> head -> logits.
Ring routing sends the step along the whole route at once; star routing sends it to one stage at a time,
each answering the sink. Either way, every step's outcome (hidden state or error) arrives at the sink.

Who holds what, and what happens when a node dies or drains, is cluster/membership.py; streaming the nodes
their weights, cluster/transfer.py. When a step fails because a node is gone, RemoteSession._recover asks
for a route of live nodes, re-prefills the session's token history there from position 0 and returns the
failed step's logits: the generate loop never notices. An embedding takes the same path and stops before the head:
RemoteSession.final_hidden returns the suffix's output after the final norm (nothing new crosses the wire).
"""

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, InvalidStateError
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch

from duskpool import backends
from duskpool.cluster import planner, wire
from duskpool.cluster.membership import Death, Membership, NodeClient, connect, first_plan, model_profile
from duskpool.cluster.proto import duskpool_pb2 as pb
from duskpool.cluster.proto import duskpool_pb2_grpc as pb_grpc
from duskpool.cluster.route import RouteError, RouteStage, Span
from duskpool.cluster.transfer import WeightSender
from duskpool.cluster.transport import Pushers, forward_stream, local_address_towards, start_server
from duskpool.engine.batcher import Batcher, micro_batch
from duskpool.engine.generate import PREFILL_CHUNK
from duskpool.engine.runner import DEFAULT_CONTEXT, Engine, as_torch, load_tokenizer
from duskpool.engine.tokenizer import Tokenizer
from duskpool.models import ModelSpec, SpanModel
from duskpool.security import NodeIdentity, PoolState, add_renew_service, peer_member, sign
from duskpool.weights.folder import open_model

STEP_TIMEOUT_S = 300.0  # a step still unanswered after this is an error (dead nodes are noticed far sooner)
GRANT_TTL_S = STEP_TIMEOUT_S  # a session's first step reaches every node of its route within this, or fails

__all__ = ["Gateway", "RemoteSession", "Recovery", "RouteError", "RouteStage", "Sink"]


@dataclass(frozen=True)
class Recovery:
    """A session moved to a new route mid-step."""
    error: str  # why its step failed
    seconds: float  # from the failure to the step's logits from the new route
    replayed_tokens: int  # the token history re-prefilled there
    route: tuple[RouteStage, ...]  # the route it moved to


class Sink(pb_grpc.SinkServicer):
    """Where every step ends: nodes deliver its Result here (the last node its hidden state, any node its
    failure), and the step waiting for it wakes. Over TLS a Result counts only from a node of its step's route:
    a hidden state from the last one, an error from any (`member_at` says which member is where)."""

    def __init__(self):
        self._pending: dict[tuple[str, int], tuple[Future, tuple[RouteStage, ...]]] = {}
        self._lock = threading.Lock()
        self.member_at: Callable[[str], int | str | None] = lambda address: None
        self.refused = 0  # Results from a sender not on their step's route

    def Deliver(self, request_iterator: Iterator[pb.Result], context) -> pb.Delivered:
        sender = peer_member(context)  # None without TLS
        for result in request_iterator:
            self.deliver(result, sender)
        return pb.Delivered()

    def expect(self, session_id: str, step: int, stages: tuple[RouteStage, ...]) -> Future:
        """A future for the step's Result with its hidden state (or its RouteError); `stages` are the nodes it goes
        through."""
        future: Future = Future()
        with self._lock:
            self._pending[(session_id, step)] = (future, stages)
        return future

    def forget(self, session_id: str, step: int) -> None:
        with self._lock:
            self._pending.pop((session_id, step), None)

    def deliver(self, result: pb.Result, sender: str | None = None) -> None:
        """`sender`: the member that sent it (None: a reply on the gateway's own stream)."""
        with self._lock:
            future, stages = self._pending.get((result.session_id, result.step), (None, ()))
        if future is None:
            return  # a step that gave up already (timed out, or failed through a node gone)
        if sender is not None:
            allowed = stages[-1:] if result.HasField("hidden") else stages
            if sender not in [self.member_at(s.address) for s in allowed]:
                self.refused += 1
                return
        if result.HasField("hidden"):
            _settle(future, result=result)
            return
        short = None
        if result.short_of_memory and sender is not None:  # the node it came from lacked memory (no TLS: nobody)
            short = next((s.address for s in stages if self.member_at(s.address) == sender), None)
        _settle(future, error=RouteError(result.error or "the route sent an empty result", stages, short))

    def fail_through(self, address: str, reason: str) -> None:
        """Fail every step in flight whose route passes through `address`."""
        with self._lock:
            pending = [(f, stages) for f, stages in self._pending.values() if any(s.address == address for s in stages)]
        for future, stages in pending:
            _settle(future, error=RouteError(reason, stages))


def _settle(future: Future, result=None, error: Exception | None = None) -> None:
    """Resolve `future` unless something else did first (a result and a failure can race)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass


class Gateway(Engine):
    """Made by `Gateway.start`, which does the network I/O; `__init__` only puts the parts together."""

    def __init__(self, *, spec: ModelSpec, tokenizer: Tokenizer, context_length: int, plan: planner.Plan,
                 members: Membership, weights: WeightSender, prefix_model: SpanModel, suffix_model: SpanModel,
                 sink: Sink, sink_server: grpc.Server, sink_address: str, identity: NodeIdentity | None,
                 routing: str, backend: str):
        self.spec, self.tokenizer, self.context_length, self.plan = spec, tokenizer, context_length, plan
        self.backend = backend  # what computes the gateway's own layers
        self.causal, self.pooling = prefix_model.causal, prefix_model.pooling  # the model's, as every span's
        self.members, self.weights = members, weights
        self.prefix_model, self.suffix_model = prefix_model, suffix_model
        self.sink, self.sink_address, self._sink_server = sink, sink_address, sink_server
        self.routing = routing
        self.identity = identity  # its key signs the grants that open sessions on nodes
        self.model_hash = weights.model_hash
        self.hidden_bytes_sent = 0  # activations the gateway sent (prefix outputs; in star, every stage's input)
        self.recoveries: list[Recovery] = []
        self._closing = False
        self.batcher = Batcher("gateway")  # the prefix and suffix steps of every session, batched
        self._open: set[RemoteSession] = set()  # the sessions not yet closed: what the micro-batches are cut from
        self._open_lock = threading.Lock()
        # a stream to each route's first node (in star, to every node); a node that refuses a request as malformed
        # answers on it, so those answers go to the sink too
        self._pushers = Pushers(identity, forward_stream, on_reply=sink.deliver, on_broken=self._on_broken,
                                name_at=members.name_at)

    @classmethod
    def start(cls, model_path: str | Path, node_addresses: list[str], *, identity: NodeIdentity | None,
              pool: PoolState | None = None, prefix: int = 1, suffix: int = 1, routing: str = "ring",
              context_length: int | None = None, sessions: int = 4, even_split: bool = False, replicas: int = 0,
              progress: bool = True, backend_name: str = backends.DEFAULT) -> "Gateway":
        """Connect to the nodes, plan which holds which span, load the gateway's own layers, open its sink,
        stream every node its span's weights and start watching the nodes.

        `identity`: the gateway's certificate in the pool (None: plaintext, for debugging only).
        `pool`: the pool's state, when this gateway keeps it: revocations then reach the nodes.
        `even_split`: split the layers evenly (a local swarm, whose nodes share one CPU).
        `replicas`: more copies of each span to load where memory allows, to fail over to when a node dies.
        `backend_name`: what computes the gateway's own layers."""
        if routing not in ("ring", "star"):
            raise ValueError(f"routing must be 'ring' or 'star', not {routing!r}")
        if not node_addresses:
            raise ValueError("a gateway needs at least one node (--node HOST:PORT)")
        file = open_model(model_path)  # a .gguf file or a model folder
        spec, tokenizer = backends.describe_model(file, backend_name), load_tokenizer(file)
        context_length = min(context_length or DEFAULT_CONTEXT, spec.context_length)
        model = model_profile(spec)
        config = planner.PlanConfig(sessions=sessions, context=context_length, privacy_prefix=prefix,
                                    privacy_suffix=suffix)
        clients: list[NodeClient] = []
        try:
            clients = connect(node_addresses, identity)  # one that does not answer is skipped, with a warning
            plan = first_plan(model, clients, config, even_split, replicas)
            weights = WeightSender(file, [(s.start, s.stop) for s in plan.stages], progress)
            prefix_model = backends.load_span(file, plan.prefix, embed=True, head=False, backend_name=backend_name)
            suffix_model = backends.load_span(file, plan.suffix, embed=False, head=True, backend_name=backend_name)
            sink = Sink()
            local = all(a.startswith(("127.", "localhost")) for a in node_addresses)
            listen = "127.0.0.1" if local else "0.0.0.0"
            sink_host = listen if local else local_address_towards(node_addresses[0])  # where nodes reach us
            is_revoked = pool.is_revoked if pool is not None else (lambda fingerprint: False)
            renewals = (lambda server: add_renew_service(server, pool)) if pool is not None else None
            sink_server, port = start_server(sink, listen, 0, identity, is_revoked, renewals)
        except BaseException:
            for client in clients:
                client.close()
            raise
        members = Membership(clients, plan, model, config, weights, on_gone=sink.fail_through, identity=identity,
                             pool=pool, even=even_split, replicas=replicas, sink_address=f"{sink_host}:{port}")
        sink.member_at = members.member_at
        gateway = cls(spec=spec, tokenizer=tokenizer, context_length=context_length, plan=plan,
                      members=members, weights=weights, prefix_model=prefix_model, suffix_model=suffix_model,
                      sink=sink, sink_server=sink_server, sink_address=f"{sink_host}:{port}", identity=identity,
                      routing=routing, backend=backend_name)
        try:
            members.load()
            members.start()
            members.check_claims(gateway.time_stage)
        except BaseException:
            gateway.close()
            raise
        return gateway

    # --- the data path ----------------------------------------------------------------------------
    def run_route(self, session_id: str, step: int, position: int, context: int, hidden: torch.Tensor,
                  stages: tuple[RouteStage, ...] | None = None, batch: int = 0,
                  group: int = 0) -> tuple[torch.Tensor, int]:
        """hidden [T, dim] after the prefix -> hidden after the last node's layers, over `stages` (the route
        that holds the session's KV caches; by default the current route), and the sessions the last node computed
        it with. `batch`: the micro-batch; `group`: the sessions the prefix computed it with (batcher.Job.group)."""
        stages = tuple(self.route) if stages is None else stages
        if self.routing == "ring":
            return self._step(session_id, step, position, context, hidden, stages, batch, group)
        for stage in stages:  # star: every stage's output comes back to the gateway, which sends it to the next
            hidden, group = self._step(session_id, step, position, context, hidden, (stage,), batch, group)
        return hidden, group

    @property
    def stages(self) -> int:
        return len(self.route) + 1  # the gateway's own layers are a stage of the ring too

    def micro_batch_for(self, stages: tuple[RouteStage, ...]) -> int:
        """Sessions per forward at each stage of a ring of `stages` and the gateway (batcher.micro_batch)."""
        return micro_batch(len(self._open), len(stages) + 1)

    def _step(self, session_id: str, step: int, position: int, context: int, hidden: torch.Tensor,
              stages: tuple[RouteStage, ...], batch: int = 0, group: int = 0) -> tuple[torch.Tensor, int]:
        """Send `hidden` through `stages`, node to node; the last one's output, from the sink, and its group."""
        if self._closing:
            raise RouteError("the gateway is closed")
        future = self.sink.expect(session_id, step, stages)
        try:
            # after expecting: a node found gone from now on fails the future; one found gone before, here
            gone = [s for s in stages if not self.members.live(s)]
            if gone:
                raise RouteError(f"node {gone[0].node_id} at {gone[0].address} is gone "
                                 f"({self.members.gone.get(gone[0].address, 'restarted')})", stages)
            request = pb.ForwardRequest(session_id=session_id, step=step, position=position, context=context,
                                        hidden=wire.to_wire(self.prefix_model, hidden), model_hash=self.model_hash,
                                        route=wire.stages_to_wire(stages), sink=self.sink_address, batch=batch,
                                        group=group)
            if position == 0 and self.identity is not None:  # a session's first step: the nodes may open it
                request.grant = self.grant(session_id, context, stages)
                request.grant_signature = sign(self.identity, request.grant)
            self._pushers.get(stages[0].address).send(request)
            self.hidden_bytes_sent += len(request.hidden.data)
            result = future.result(timeout=STEP_TIMEOUT_S)
        except FutureTimeout:
            raise RouteError(f"no answer from the route within {STEP_TIMEOUT_S:.0f} s", stages) from None
        finally:
            self.sink.forget(session_id, step)
        try:
            return wire.from_wire(self.suffix_model, result.hidden, self.context_length), result.group
        except ValueError as e:
            raise RouteError(f"bad hidden state from the route: {e}", stages) from None

    def grant(self, session_id: str, context: int, stages: tuple[RouteStage, ...]) -> bytes:
        """The SessionGrant that lets the nodes of `stages` open the session, each from the hop before it."""
        return pb.SessionGrant(session_id=session_id, model_hash=self.model_hash, context=context,
                               route=wire.stages_to_wire(stages),
                               expires=time.time() + GRANT_TTL_S).SerializeToString()

    def time_stage(self, stage: RouteStage, tries: int = 3) -> float:
        """Milliseconds one token takes through `stage` alone (the best of `tries`): what the node actually does."""
        best = float("inf")
        session_id = f"timing-{uuid.uuid4().hex}"
        hidden = self.prefix_model.hidden_from_bytes(bytes(4 * self.spec.dim), 1, "float32")  # in its backend's arrays
        try:
            for step in range(tries):
                started = time.perf_counter()
                position = step if self.causal else 0  # an encoder's input always starts at 0
                self._step(session_id, step + 1, position, tries, hidden, (stage,))
                best = min(best, (time.perf_counter() - started) * 1000)
        finally:
            self.members.end_session(session_id)
        return best

    def _on_broken(self, pusher, e: Exception) -> None:
        self.sink.fail_through(pusher.address, f"lost the connection to node {pusher.address}")

    # --- the nodes (cluster/membership.py) --------------------------------------------------------
    @property
    def route(self) -> list[RouteStage]:
        """The route new sessions take."""
        return self.members.route

    @property
    def holders(self) -> dict[Span, list[str]]:
        """Each span's live holders (addresses), its route node first."""
        return self.members.holders

    @property
    def deaths(self) -> list[Death]:
        return self.members.deaths

    @property
    def broken(self) -> str | None:
        """Why no route can serve (a span lost every holder and no node can load it), or None while one can."""
        return self.members.broken

    @property
    def weight_bytes_sent(self) -> int:
        return self.weights.bytes_sent

    def add_node(self, address: str) -> list[Span]:
        return self.members.add_node(address)

    def node_info(self, address: str, timeout: float = 2.0) -> pb.NodeInfo:
        return self.members.node_info(address, timeout)

    def recover(self, failure: RouteError) -> None:
        self.members.recover(failure)

    # --- sessions ---------------------------------------------------------------------------------
    def open_session(self, capacity: int) -> "RemoteSession":
        session = RemoteSession(self, capacity)
        with self._open_lock:
            self._open.add(session)
        return session

    def close_session(self, session: "RemoteSession") -> None:
        with self._open_lock:
            self._open.discard(session)
        self.end_session(session.id)

    def end_session(self, session_id: str) -> None:
        """Free the session's KV caches on the nodes."""
        self.members.end_session(session_id)

    def close(self) -> None:
        self._closing = True
        self.members.close()
        self._pushers.close()
        self._sink_server.stop(grace=0.5)
        self.batcher.close()


class RemoteSession:
    """One generation over the route. It keeps the tokens fed so far, so that when the route fails under a
    step it can move to a new route, re-prefill them there and answer the step as if nothing happened."""

    def __init__(self, gateway: Gateway, capacity: int):
        self.gateway, self.capacity = gateway, capacity
        self.id, self.step = uuid.uuid4().hex, 0
        self.route: tuple[RouteStage, ...] = tuple(gateway.route)  # where its KV caches are: it stays there
        self.history: list[int] = []  # the token at each position fed so far
        self.filled = 0  # positions the gateway's own caches hold
        self.group = 0  # the sessions its last step's suffix was computed with: its next prefix waits for them
        self.prefix_cache = gateway.prefix_model.new_cache(capacity)
        self.suffix_cache = gateway.suffix_model.new_cache(capacity)

    def forward(self, tokens: list[int], start: int) -> torch.Tensor:
        return self.verify(tokens, start, rows=1)

    def verify(self, tokens: list[int], start: int, rows: int | None = None) -> torch.Tensor:
        """Logits [T, vocab] of every position of `tokens` (a speculative pass through the route), or with
        rows=1 the last one's [vocab]."""
        rows = rows or len(tokens)
        history = self.history[:start] + list(tokens)
        try:
            logits = self._forward(tokens, start, rows)
        except RouteError as failure:
            logits = self._recover(history, failure, rows)
        self.history = history
        return logits

    def final_hidden(self, tokens: list[int], start: int) -> torch.Tensor:
        """The hidden states [T, dim] of `tokens` after the model's final norm (what embeddings pool): the same trip
        through the route as a step, its suffix output kept instead of turned into logits."""
        history = self.history[:start] + list(tokens)
        try:
            hidden = self._forward(tokens, start, logits=0)
        except RouteError as failure:
            hidden = self._recover(history, failure, len(tokens), hidden=True)
        self.history = history
        suffix = self.gateway.suffix_model
        return as_torch(suffix, suffix.final_norm(hidden))

    def _forward(self, tokens: list[int], start: int, logits: int = 1) -> torch.Tensor:
        """Logits [logits, vocab] of the last rows (the last one's [vocab] when logits == 1; with logits=0 the
        hidden states of every row, before the final norm). The gateway's own spans run in its batcher, with the
        steps of every other session at them."""
        g = self.gateway
        if start < self.filled:  # a step taken back (a rejected speculative draft): none of it stays
            self.prefix_cache.truncate(start)
            self.suffix_cache.truncate(start)
        self.filled = start
        batch = g.micro_batch_for(self.route)
        prefix = g.batcher.run(g.prefix_model, self.prefix_cache, start, g.prefix_model.embed(tokens), batch=batch,
                               group=self.group)
        self.step += 1
        hidden, group = g.run_route(self.id, self.step, start, self.capacity, prefix.output, self.route, batch,
                                    prefix.group)
        suffix = g.batcher.run(g.suffix_model, self.suffix_cache, start, hidden, logits=logits, batch=batch,
                               group=group)
        self.filled, self.group = start + len(tokens), suffix.group
        return suffix.output[0] if logits == 1 else suffix.output

    def _recover(self, history: list[int], failure: RouteError, rows: int = 1, hidden: bool = False) -> torch.Tensor:
        """Move to a live route and re-prefill `history` (everything fed before, and this step's tokens) there
        under a new session id, from position 0 through the gateway's own prefix and suffix caches too;
        the logits of its last `rows` positions, which are this step's (`hidden`: their hidden states instead).
        Raises when the gateway cannot recover."""
        g, started, why = self.gateway, time.perf_counter(), str(failure)
        for _ in range(len(g.members.client_at) + 1):  # each round finds another node gone, or gives up
            g.recover(failure)
            old, self.id, self.step, self.route = self.id, uuid.uuid4().hex, 0, tuple(g.route)
            threading.Thread(target=g.end_session, args=(old,), daemon=True).start()
            self.prefix_cache.clear()
            self.suffix_cache.clear()
            self.filled = self.group = 0
            try:
                whole = rows > 1 or hidden  # the step's rows come back as one: all their logits, or hidden states
                cut = len(history) - rows if whole else len(history)
                for start in range(0, cut, PREFILL_CHUNK):
                    logits = self._forward(history[start:min(start + PREFILL_CHUNK, cut)], start)
                if whole:
                    logits = self._forward(history[cut:], cut, 0 if hidden else rows)
            except RouteError as again:
                failure = again
                continue
            g.recoveries.append(Recovery(why, time.perf_counter() - started, len(history), self.route))
            return logits
        raise failure

    def close(self) -> None:
        for cache in (self.prefix_cache, self.suffix_cache):
            cache.clear()
            self.gateway.batcher.forget(cache)
        self.gateway.close_session(self)
