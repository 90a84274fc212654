"""What the HTTP layer drives: one engine (in-process or a gateway over nodes), an admission queue in
front of it, the metrics and the live picture the dashboard shows.

Each admitted generation runs in its own thread (the engine is synchronous) and hands its text to the
event loop piece by piece. A client that goes away sets the generation's `cancelled` flag; the thread
stops at the next piece and closing the generator frees the session's KV cache on every node.
"""

import asyncio
import math
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import prometheus_client as prom
import psutil
import torch

from duskpool import __version__
from duskpool.api.tools import ToolFormat, tool_format
from duskpool.cluster import admission
from duskpool.cluster.gateway import Gateway
from duskpool.engine.generate import GenerationParams, GenerationStats, Piece
from duskpool.engine.grammar import Grammar, Vocabulary
from duskpool.engine.runner import Engine
from duskpool.engine.tokenizer import render_chat_with_tools
from duskpool.weights.folder import model_size

NODE_POLL_S = 2.0  # how often the dashboard's view of the nodes is refreshed


class RequestError(Exception):
    """A request the pool cannot serve as asked: the HTTP layer answers `status` in its API's error shape."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class Overloaded(Exception):
    """Every slot is busy and the queue is full (429), or a request waited too long for a slot (503)."""

    def __init__(self, message: str, retry_after: int, status: int = 429):
        super().__init__(message)
        self.retry_after, self.status = retry_after, status


@dataclass
class Generation:
    """One live request, as the dashboard lists it."""

    id: str
    endpoint: str
    stats: GenerationStats
    started: float = field(default_factory=time.monotonic)
    first_piece_at: float | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    kv_tokens: int = 0  # the positions its KV caches are sized for: reserved from the pool's memory


class Metrics:
    """The Prometheus series, in a registry of their own (several servers may live in one process)."""

    def __init__(self) -> None:
        self.registry = r = prom.CollectorRegistry()
        self.tokens = prom.Counter("duskpool_generated_tokens", "tokens generated", registry=r)
        self.prompt_tokens = prom.Counter("duskpool_prompt_tokens", "prompt tokens processed", registry=r)
        self.ttft = prom.Histogram("duskpool_time_to_first_token_seconds", "admission to first text", registry=r,
                                   buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60))
        self.token_latency = prom.Histogram("duskpool_time_per_output_token_seconds",
                                            "each generated token's own time (a token accepted from a speculative "
                                            "draft takes next to none)", registry=r,
                                            buckets=(0.001, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 1, 3))
        self.batch_sessions = prom.Gauge("duskpool_batch_sessions", "sessions per forward at a stage, mean of the "
                                         "last forwards", ["stage"], registry=r)
        self.busy = prom.Gauge("duskpool_stage_busy_ratio", "fraction of the last seconds a stage spent computing",
                               ["stage"], registry=r)
        self.drafted = prom.Counter("duskpool_speculative_drafted_tokens", "draft tokens verified", registry=r)
        self.accepted = prom.Counter("duskpool_speculative_accepted_tokens", "draft tokens accepted", registry=r)
        self.kv_reserved = prom.Gauge("duskpool_kv_reserved_tokens", "KV positions admitted sessions reserve",
                                      registry=r)
        self.kv_capacity = prom.Gauge("duskpool_kv_capacity_tokens", "KV positions the lent memory holds (the "
                                      "least of every stage)", registry=r)
        self.stage_latency = prom.Gauge("duskpool_stage_seconds_per_token", "a stage's measured compute per token",
                                        ["node", "span"], registry=r)
        self.active = prom.Gauge("duskpool_active_sessions", "generations running now", registry=r)
        self.queued = prom.Gauge("duskpool_queue_depth", "requests waiting for a slot", registry=r)
        self.nodes = prom.Gauge("duskpool_nodes", "nodes on the route, by health", ["health"], registry=r)
        self.weight_bytes = prom.Gauge("duskpool_weight_bytes_sent", "weight bytes streamed to nodes", registry=r)
        self.hidden_bytes = prom.Gauge("duskpool_hidden_bytes_sent", "hidden-state bytes sent by the gateway",
                                       registry=r)
        self.mask_latency = prom.Histogram("duskpool_grammar_mask_seconds",
                                           "computing a structured-output token mask, per generated token", registry=r,
                                           buckets=(1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1))
        self.embedded = prom.Counter("duskpool_embedded_inputs", "texts embedded", registry=r)


@dataclass
class NodeView:
    """A node as the dashboard shows it: what it last said in Info, and whether it still answers."""

    node_id: str
    address: str
    span: tuple[int, int]
    backend: str = ""
    device: str = ""
    memory_total: int = 0
    memory_free: int = 0
    kv_bytes: int = 0
    sessions: int = 0
    ms_per_layer: float = 0.0
    lending: str = "available"
    health: str = "unknown"
    batch_sessions: float = 0.0  # sessions per forward at this stage, mean of its last forwards
    busy: float = 0.0  # fraction of the last seconds it spent computing

    @property
    def stage(self) -> tuple[str, str, tuple[int, int]]:
        return self.node_id, self.address, self.span


async def _prepend(first: str | None, rest: AsyncIterator[str]) -> AsyncIterator[str]:
    try:
        if first is not None:
            yield first
            async for piece in rest:
                yield piece
    finally:
        await rest.aclose()


def _route_views(gateway: Gateway) -> list[NodeView]:
    """A fresh (not yet polled) view of each stage of the gateway's current route."""
    return [NodeView(s.node_id, s.address, (s.start, s.stop)) for s in gateway.route]


def _template_message(message: dict) -> dict:
    """A message as chat templates read it: text content, and tool calls and results (transformers' keys)."""
    flat = {"role": message.get("role", "user"), "content": _text(message.get("content"))}
    return flat | {k: message[k] for k in ("tool_calls", "tool_call_id", "name") if message.get(k) is not None}


def _text(content) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):  # OpenAI's content parts: only text is understood here
        texts = [part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text"]
        if len(texts) != len(content):
            raise RequestError(400, "only text content parts are supported", "invalid_request")
        if not all(isinstance(text, str) for text in texts):
            raise RequestError(400, "a text content part's `text` must be a string", "invalid_request")
        return "".join(texts)
    raise RequestError(400, "message content must be a string or a list of text parts", "invalid_request")


class Service:
    def __init__(self, engine: Engine, model_name: str, model_path: Path, *, max_active: int | None = None,
                 max_queue: int = 512, queue_timeout_s: float = 120.0):
        """`max_active`: at most this many generations at once (None: as many as the lent memory holds KV for);
        `max_queue`: requests that may wait (Ollama's default, 512); more get 429, one waiting too long 503."""
        if (max_active is not None and max_active < 1) or max_queue < 0:
            raise ValueError("max_active must be >= 1 and max_queue >= 0")
        self.engine, self.model_name, self.model_path = engine, model_name, model_path
        self.model_size = model_size(model_path)  # a file, or a folder's weights
        self.max_active, self.max_queue, self.queue_timeout_s = max_active, max_queue, queue_timeout_s
        self.metrics = Metrics()
        self.started = time.time()
        self.generations: dict[str, Generation] = {}
        self.total_requests = self.total_tokens = 0
        self._recent: deque[tuple[float, int]] = deque(maxlen=512)  # (when, tokens) for the pool's tok/s
        self._durations: deque[float] = deque(maxlen=32)  # of finished requests, for Retry-After
        self._room: asyncio.Condition | None = None  # made on the server's loop; notified when a session ends
        self._waiting = 0
        self._reserved = 0  # KV positions the admitted generations reserve
        self._admitting = 0  # admitted, not yet listed in generations (or embedding)
        # an in-process engine's one stage lends what was available when the service started
        self.lent_memory = psutil.virtual_memory().available
        self.nodes = self._initial_nodes()
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll_nodes, daemon=True)
        self._poller.start()

    @property
    def gateway(self) -> Gateway | None:
        return self.engine if isinstance(self.engine, Gateway) else None

    def names(self) -> set[str]:
        """What a request may call the model: its name, its file name, or the file's stem."""
        return {self.model_name, self.model_path.name, self.model_path.stem}

    def check_model(self, name: str | None) -> None:
        if name and name not in self.names():
            raise RequestError(404, f"model {name!r} not found; this server has {self.model_name!r}",
                               "model_not_found")

    def chat_prompt(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """The chat template applied to messages whose content may be a string or a list of text parts, and
        to tool definitions (OpenAI's shape) when there are any."""
        self.check_generates()
        if not messages:
            raise RequestError(400, "messages must not be empty", "invalid_request")
        flat = [_template_message(m) for m in messages]
        if tools:
            self.tool_format()
        tokenizer = self.engine.tokenizer
        if tokenizer.chat_template is None:
            raise RequestError(400, f"{self.model_name} has no chat template (a base model): it completes raw text "
                                    "only, through /v1/completions or /api/generate", "invalid_request")
        try:
            text = render_chat_with_tools(tokenizer, flat, tools) if tools else tokenizer.render_chat(flat)
        except Exception as e:  # noqa: BLE001 - a template may reject an order of roles
            raise RequestError(400, f"the model's chat template rejected the messages: {e}", "invalid_request") from e
        return self.text_prompt(text)

    def check_generates(self) -> None:
        """A 400 naming the model when it cannot generate: an embedding model (BERT) only embeds."""
        if not self.engine.causal:
            raise RequestError(400, f"{self.model_name} is an embedding model: it cannot generate text or chat; "
                               "ask /v1/embeddings or /api/embed", "model_cannot_generate")

    def tool_format(self) -> ToolFormat:
        """How the model writes tool calls; a 400 naming it when its template takes no tools (as Ollama says)."""
        self.check_generates()
        fmt = tool_format(self.engine.tokenizer.chat_template)
        if fmt is None:
            raise RequestError(400, f"{self.model_name} does not support tools (its chat template takes none)",
                               "tools_unsupported")
        return fmt

    async def vocabulary(self) -> Vocabulary:
        """The engine's vocabulary for structured output and logprobs; built off the loop the first time."""
        return await asyncio.to_thread(lambda: self.engine.vocabulary)

    async def grammar(self, build: Callable[[Vocabulary], Grammar]) -> Grammar:
        """`build(vocabulary)`, off the loop (compiling a large schema takes a while); a bad one is a 400."""
        vocabulary = await self.vocabulary()
        return await asyncio.to_thread(build, vocabulary)

    def text_prompt(self, text: str) -> list[int]:
        try:
            text.encode()
        except UnicodeEncodeError:  # JSON can escape half a surrogate pair (\ud800); the tokenizer takes no such text
            raise RequestError(400, "the prompt is not valid Unicode (it holds a lone surrogate)",
                               "invalid_request") from None
        return self.engine.tokenizer.encode(text, add_special=True)

    def budget(self, prompt: list[int], max_tokens: int | None, strict: bool) -> int:
        """How many tokens to generate at most. `strict` (OpenAI) refuses a request that cannot fit, as
        OpenAI does; otherwise (Ollama) generation just stops when the context is full."""
        self.check_generates()
        context = self.engine.context_length
        if not prompt:
            raise RequestError(400, "the prompt is empty", "invalid_request")
        room = context - len(prompt)
        if room < 1:
            raise RequestError(400, f"the prompt has {len(prompt)} tokens; this model's context holds {context}",
                               "context_length_exceeded")
        if max_tokens is None:
            return room
        if max_tokens < 1:
            raise RequestError(400, f"max_tokens must be at least 1, not {max_tokens}", "invalid_request")
        if strict and max_tokens > room:
            raise RequestError(400, f"this model's context holds {context} tokens; you asked for {max_tokens} "
                               f"tokens after a prompt of {len(prompt)}", "context_length_exceeded")
        return min(max_tokens, room)

    # --- admission ------------------------------------------------------------------------------
    def _retry_after(self) -> int:
        typical = sum(self._durations) / len(self._durations) if self._durations else 5.0
        return max(1, math.ceil(typical * (self._waiting + 1) / max(1, len(self.generations))))

    def kv_capacity(self) -> int:
        """KV positions the pool's lent memory holds: the least over the stages, each holding its layers' keys
        and values for every session (a node's free memory plus what its caches hold now, as it last said)."""
        if self.gateway is None:
            stages = [(self.lent_memory, self.engine.spec.n_layers)]
        else:
            stages = [(v.memory_free + v.kv_bytes, v.span[1] - v.span[0]) for v in self.nodes if v.memory_total]
        return admission.kv_capacity(stages, self.engine.spec.kv_bytes_per_token)

    def _fits(self, kv_tokens: int) -> bool:
        return admission.admits(self._reserved, kv_tokens, self.kv_capacity(), len(self.generations) + self._admitting,
                                self.max_active)

    def _reserve(self, kv_tokens: int) -> None:
        self._reserved += kv_tokens
        self._admitting += 1  # until its Generation is listed
        self.metrics.kv_reserved.set(self._reserved)

    async def _admit(self, kv_tokens: int = 1) -> None:
        """Wait until the lent memory holds this generation's KV beside the others' (and a slot is free, with
        max_active), then reserve it. Past max_queue waiting: 429; after queue_timeout_s: 503."""
        if self._room is None:
            self._room = asyncio.Condition()
        if self._waiting == 0 and self._fits(kv_tokens):  # no one ahead of it: in at once
            self._reserve(kv_tokens)
            return
        if self._waiting >= self.max_queue:
            raise Overloaded(f"every slot is busy ({len(self.generations)} generations hold the lent memory) and "
                             f"{self._waiting} requests are queued; retry later", self._retry_after())
        self._waiting += 1
        self.metrics.queued.set(self._waiting)
        try:
            async with self._room:
                await asyncio.wait_for(self._room.wait_for(lambda: self._fits(kv_tokens)), self.queue_timeout_s)
                self._reserve(kv_tokens)
        except TimeoutError:
            raise Overloaded(f"no slot freed within {self.queue_timeout_s:.0f} s; the pool is saturated",
                             self._retry_after(), status=503) from None
        finally:
            self._waiting -= 1
            self.metrics.queued.set(self._waiting)

    # --- generation -----------------------------------------------------------------------------
    async def generate(self, prompt: list[int], params: GenerationParams, endpoint: str,
                       stats: GenerationStats) -> AsyncIterator[str]:
        """The answer's text, piece by piece. Raises Overloaded before any text when the pool is full.

        Leaving the iteration early (the client went away) stops the generation and frees its session.
        """
        arrived = time.monotonic()
        kv_tokens = min(self.engine.context_length, len(prompt) + params.max_tokens)
        await self._admit(kv_tokens)
        loop, pieces = asyncio.get_running_loop(), asyncio.Queue()
        generation = Generation(uuid.uuid4().hex[:12], endpoint, stats, kv_tokens=kv_tokens)
        self.generations[generation.id] = generation
        self._admitting -= 1
        self.metrics.active.set(len(self.generations))
        done = object()

        def put(item) -> None:
            try:
                loop.call_soon_threadsafe(pieces.put_nowait, item)
            except RuntimeError:
                pass  # the loop is gone (server shutting down): nobody is listening

        def work() -> None:
            try:
                params.cancel = generation.cancelled  # seen every token, even while text is held back
                answer = self.engine.generate(prompt, params, stats)
                try:
                    for piece in answer:
                        put(piece)
                        if generation.cancelled.is_set():
                            break
                finally:
                    answer.close()  # frees the session's KV, here and on every node
                put(done)
            except Exception as e:  # noqa: BLE001 - handed to the request, which reports it
                put(e)
            finally:
                try:
                    loop.call_soon_threadsafe(self._finish, generation)
                except RuntimeError:
                    pass  # the loop is gone

        threading.Thread(target=work, name=f"generation-{generation.id}", daemon=True).start()
        self.total_requests += 1
        try:
            while (item := await pieces.get()) is not done:
                if isinstance(item, Exception):
                    raise item
                if generation.first_piece_at is None:
                    generation.first_piece_at = time.monotonic()
                    self.metrics.ttft.observe(generation.first_piece_at - arrived)  # queueing included
                yield item
        finally:
            generation.cancelled.set()  # a no-op when it ended by itself

    async def _notify_room(self) -> None:
        async with self._room:
            self._room.notify_all()

    async def start(self, prompt: list[int], params: GenerationParams, endpoint: str,
                    stats: GenerationStats) -> AsyncIterator[str]:
        """`generate`, with admission and the first piece already awaited: a refusal or a failure before any
        text raises here, while the HTTP layer can still answer with a status code."""
        pieces = self.generate(prompt, params, endpoint, stats)
        try:
            first = await anext(pieces, None)
        except BaseException:
            await pieces.aclose()
            raise
        return _prepend(first, pieces)

    def _finish(self, generation: Generation) -> None:
        """On the loop: the generation's thread has ended; free its slot and count it."""
        stats = generation.stats
        self.generations.pop(generation.id, None)
        self._reserved -= generation.kv_tokens
        self.metrics.kv_reserved.set(self._reserved)
        asyncio.ensure_future(self._notify_room())
        self._durations.append(time.monotonic() - generation.started)
        self.metrics.active.set(len(self.generations))
        self.metrics.tokens.inc(stats.generated_tokens)
        self.metrics.prompt_tokens.inc(stats.prompt_tokens)
        for seconds in stats.token_seconds[1:]:  # the first token's time is its TTFT
            self.metrics.token_latency.observe(seconds)
        self.metrics.drafted.inc(stats.drafted_tokens)
        self.metrics.accepted.inc(stats.accepted_tokens)
        if stats.masks:
            for _ in range(stats.masks):
                self.metrics.mask_latency.observe(stats.mask_seconds / stats.masks)
        self.total_tokens += stats.generated_tokens
        self._recent.append((time.monotonic(), stats.generated_tokens))

    # --- embeddings -----------------------------------------------------------------------------
    def embedding_tokens(self, text: str | list[int], truncate: bool) -> list[int]:
        """The ids to embed: a text's, or ids given as they are; cut to the context when `truncate`."""
        if isinstance(text, str):
            tokens = self.text_prompt(text)
        else:
            vocab = self.engine.tokenizer.vocab_size
            if any(not 0 <= t < vocab for t in text):
                raise RequestError(400, f"token ids must be in [0, {vocab})", "invalid_request")
            tokens = list(text)
        if not tokens:
            raise RequestError(400, "an input to embed is empty", "invalid_request")
        context = self.engine.context_length
        if len(tokens) > context:
            if not truncate:
                raise RequestError(400, f"an input has {len(tokens)} tokens; this model's context holds {context}",
                                   "context_length_exceeded")
            tokens = tokens[:context]
        return tokens

    async def embed(self, inputs: list[list[int]]) -> list[torch.Tensor]:
        """One unit vector per input (the engine's mean-pooled final hidden state), computed in a slot."""
        kv_tokens = max(len(t) for t in inputs) if inputs else 1
        await self._admit(kv_tokens)
        try:
            vectors = await asyncio.to_thread(lambda: [self.engine.embed(tokens) for tokens in inputs])
        finally:
            self._admitting -= 1
            self._reserved -= kv_tokens
            await self._notify_room()
        self.total_requests += 1
        self.metrics.embedded.inc(len(inputs))
        self.metrics.prompt_tokens.inc(sum(len(t) for t in inputs))
        return vectors

    # --- the dashboard's picture ----------------------------------------------------------------
    def _initial_nodes(self) -> list[NodeView]:
        gateway = self.gateway
        if gateway is None:  # the whole model in this process
            return [NodeView("this machine", "in-process", (0, self.engine.spec.n_layers), backend=self.engine.backend,
                             health="ok")]
        return _route_views(gateway)

    def _poll_nodes(self) -> None:
        while not self._stop.wait(0 if self.nodes[0].health == "unknown" else NODE_POLL_S):
            gateway = self.gateway
            if gateway is None:
                self._poll_self()
                continue
            views = _route_views(gateway)
            if [v.stage for v in views] != [v.stage for v in self.nodes]:
                self.nodes = views  # the route changed: a node was lost or drained, others took its span
            for view in self.nodes:
                try:
                    info = gateway.node_info(view.address, timeout=NODE_POLL_S)
                except Exception as e:  # noqa: BLE001 - an unreachable node is shown, not raised
                    view.health = f"unreachable ({type(e).__name__})"
                    continue
                view.backend, view.device = info.backend, info.device
                view.memory_total, view.memory_free = info.memory_total, info.memory_free
                view.kv_bytes, view.sessions, view.ms_per_layer = info.kv_bytes, info.sessions, info.ms_per_layer
                view.batch_sessions, view.busy = info.batch_sessions, info.busy
                view.lending = f"{info.lending} ({info.lending_reason})" if info.lending else "available"
                view.health = "ok" if not gateway.broken else "route broken"
            self._update_gauges()

    def _poll_self(self) -> None:
        memory = psutil.virtual_memory()
        view = self.nodes[0]
        view.memory_total, view.memory_free, view.sessions = memory.total, memory.available, len(self.generations)
        self._update_gauges()

    def _update_gauges(self) -> None:
        health: dict[str, int] = {}
        for view in self.nodes:
            key = "ok" if view.health == "ok" else "down"
            health[key] = health.get(key, 0) + 1
            start, stop = view.span
            self.metrics.stage_latency.labels(view.node_id, f"{start}-{stop}").set(
                view.ms_per_layer * (stop - start) / 1000)
            self.metrics.batch_sessions.labels(view.node_id).set(view.batch_sessions)
            self.metrics.busy.labels(view.node_id).set(view.busy)
        for key in ("ok", "down"):
            self.metrics.nodes.labels(key).set(health.get(key, 0))
        gateway = self.gateway
        if gateway is not None:
            self.metrics.weight_bytes.set(gateway.weight_bytes_sent)
            self.metrics.batch_sessions.labels("gateway").set(gateway.batcher.mean_sessions())
            self.metrics.busy.labels("gateway").set(gateway.batcher.busy())
            self.metrics.kv_capacity.set(self.kv_capacity())
            self.metrics.hidden_bytes.set(gateway.hidden_bytes_sent)

    def tokens_per_second(self, window_s: float = 10.0) -> float:
        now = time.monotonic()
        recent = sum(n for when, n in self._recent if now - when <= window_s)
        live = sum(g.stats.generated_tokens for g in self.generations.values())
        return (recent + live) / window_s if (recent + live) else 0.0

    def snapshot(self) -> dict:
        """Everything the dashboard draws, as JSON-ready data."""
        now = time.monotonic()
        gateway = self.gateway
        placement = []
        if gateway is not None:
            plan = gateway.plan
            placement = ([{"where": "gateway", "start": plan.prefix.start, "stop": plan.prefix.stop}]
                         + [{"where": s.node_id, "start": s.start, "stop": s.stop} for s in gateway.route]
                         + [{"where": "gateway", "start": plan.suffix.start, "stop": plan.suffix.stop}])
        else:
            placement = [{"where": "this machine", "start": 0, "stop": self.nodes[0].span[1]}]
        sessions = []
        for g in list(self.generations.values()):
            elapsed = now - g.started
            sessions.append({"id": g.id, "endpoint": g.endpoint, "prompt_tokens": g.stats.prompt_tokens,
                             "generated_tokens": g.stats.generated_tokens, "seconds": round(elapsed, 1),
                             "tokens_per_second": round(g.stats.generated_tokens / elapsed, 1) if elapsed else 0})
        return {
            "version": __version__, "model": self.model_name, "context": self.engine.context_length,
            "routing": gateway.routing if gateway else "in-process",
            "nodes": [vars(v) | {"span": list(v.span)} for v in self.nodes],
            "placement": placement, "sessions": sessions,
            "totals": {"requests": self.total_requests,
                       "tokens": self.total_tokens + sum(g["generated_tokens"] for g in sessions),
                       "tokens_per_second": round(self.tokens_per_second(), 1), "active": len(self.generations),
                       "queued": self._waiting, "uptime_s": round(time.time() - self.started),
                       "weight_bytes_sent": gateway.weight_bytes_sent if gateway else 0,
                       "hidden_bytes_sent": gateway.hidden_bytes_sent if gateway else 0},
        }

    def close(self) -> None:
        self._stop.set()


def embedding_list(vector: torch.Tensor, dimensions: int | None) -> list[float]:
    """A unit vector as a list, cut to its first `dimensions` and scaled back to unit length."""
    if dimensions is not None:
        if dimensions > vector.shape[0]:
            raise RequestError(400, f"dimensions must be at most {vector.shape[0]}, this model's", "invalid_request")
        vector = vector[:dimensions]
        vector = vector / vector.norm().clamp_min(1e-12)
    return vector.tolist()


async def collect(request, pieces: AsyncIterator[str], poll_s: float = 0.25) -> Piece:
    """The whole answer (with its tokens' logprobs, when asked for), for a non-streaming request; a client
    that hangs up (`request.is_disconnected()`) stops the generation just as a streaming one does."""
    async def join() -> Piece:
        parts = [piece async for piece in pieces]
        return Piece("".join(parts), tuple(t for p in parts for t in getattr(p, "tokens", ())))

    task = asyncio.create_task(join())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise asyncio.CancelledError("the client went away")
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait({task})  # let it unwind out of the generator before closing that
        await pieces.aclose()
