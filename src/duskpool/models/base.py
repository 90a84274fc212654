"""What families, backends and the layers above agree on.

- `ModelSpec`: a model as the engine, the cluster and the API see it: no family, no backend.
- `Ops`: what a family is written with. A backend (backends/cpu, later MLX) implements them over its own
  arrays; a family file calls only these, so one family file runs on every backend. Each op takes its
  variants as parameters (RoPE pairing, attention scale and window, activation, projection bias), so a
  family that differs from Llama in one choice sets a config field instead of forking a kernel.
- `SpanModel`: the contract the engine and the cluster drive. `Span` implements it for every family
  from the family's `embed`, `forward` and `head`; the rest (caches, wire bytes, the speed probe)
  is the backend's.
- `Batch`: the sessions one forward computes together (continuous batching). Their rows go through every
  projection and MLP as one matrix; `Batch` is the one place a family meets what each session has of its
  own: its positions (RoPE) and its KV cache (attention). A family hands it q, k, v and gets the attention
  back, so a family file never loops over sessions; the backend's `Sessions` computes that part, one session
  at a time (`EachSession`) or all at once (the CPU backend's).
"""

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from gguf import GGMLQuantizationType

from duskpool.weights.gguf import PackedTensor

Array = Any  # a backend's array type: torch.Tensor on the CPU backend, mx.array on MLX


class ContextOverflowError(ValueError):
    """A session asked for more positions than its cache was sized for."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    architecture: str
    n_layers: int
    dim: int  # hidden size: a hidden state is [tokens, dim]
    vocab_size: int
    context_length: int  # the longest context the model was trained for
    kv_bytes_per_token: int  # K and V of one layer for one token, as the backend stores them
    layer_bytes: int  # the largest layer's weights, as stored (weights stay packed in memory)
    edge_bytes: int  # embedding + final norm + head: held by the gateway only


class KVCache(Protocol):
    """One session's keys and values for the layers a span holds, allocated once."""

    nbytes: int

    def update(self, layer: int, start: int, k: Array, v: Array) -> tuple[Array, Array]:
        """Store k, v [T, kv_heads, head_dim] at positions start..start+T; all keys, values so far."""

    def clear(self) -> None:
        """Zero the buffers, so nothing of the session outlives it."""

    def truncate(self, length: int) -> None:
        """Zero positions length.. (a rejected speculative draft leaves no trace)."""


class Embedding(Protocol):
    def rows(self, tokens: Sequence[int]) -> Array:
        """Hidden states [T, dim] of the tokens."""


class Ops(Protocol):
    """The operations a family is written with. Arrays are float32 [tokens, ...]."""

    SUPPORTED_TYPES: tuple[GGMLQuantizationType, ...]  # quant types the backend computes with
    KV_VALUE_BYTES: int  # bytes per cached key or value element

    # weights, at load: they stay packed
    def linear(self, parts: list[PackedTensor], bias: list[PackedTensor] | None = None) -> Callable[[Array], Array]:
        """y = x @ W.T (+ b) over weights whose outputs are concatenated (fused q|k|v, gate|up)."""

    def vector(self, tensor: PackedTensor) -> Array:
        """A norm's weight (float32 [n])."""

    def embedding(self, tensor: PackedTensor) -> Embedding: ...

    # per step
    def rms_norm(self, x: Array, weight: Array, eps: float) -> Array: ...

    def layer_norm(self, x: Array, weight: Array, bias: Array, eps: float) -> Array:
        """LayerNorm over the last axis (BERT's): (x - mean) / std * weight + bias."""

    def rotations(self, start: int, tokens: int, freqs: np.ndarray) -> Any:
        """The angles of positions start..start+tokens for each rotated pair (freqs: float64 [rotated / 2])."""

    def rope(self, heads: Array, rotations: Any, pairing: str) -> Array:
        """heads [T, n, head_dim] rotated, maybe in place. `pairing`: "adjacent" (llama.cpp's layout for
        Llama) or "halves" (element i with i + rotated/2, GPT-NeoX's)."""

    def attention(self, q: Array, keys: Array, values: Array, start: int, scale: float,
                  window: int | None = None, causal: bool = True) -> Array:
        """Causal grouped-query attention of q [T, H, d] at positions start.. over a cache's keys and
        values; `window`: each query sees only the last `window` positions; `causal=False`: every query sees
        every key (an encoder's). Returns [T, H, d]."""

    def gated(self, gate_up: Array, activation: str) -> Array:
        """act(gate) * up for gate_up [T, 2F] = [gate | up]; `activation`: "silu" or "gelu_tanh"."""

    def activation(self, x: Array, name: str) -> Array:
        """act(x) elementwise, for an MLP without a gate: "gelu" (exact, erf: BERT's) or "gelu_tanh"."""

    def concat(self, parts: list[Array]) -> Array:
        """The arrays one after the other along their first axis (the rows of a batch's sessions)."""

    def sessions(self, segments: "Sequence[Segment]") -> "Sessions":
        """RoPE and attention for a forward of several sessions (`Batch`): `EachSession`, or what the backend does
        for all of them at once."""

    def evaluate(self, *arrays: Array) -> None:
        """Compute the arrays now, on this thread. An array crosses threads only computed: MLX builds a graph
        lazily, on streams that belong to the thread that built it (since MLX 0.31.2)."""

    # what the backend owns
    def new_cache(self, layers: range, n_kv_heads: int, head_dim: int, capacity: int) -> KVCache: ...

    def to_bytes(self, hidden: Array, dtype: str) -> bytes:
        """Little-endian bytes of hidden [T, dim] in `dtype` ("float32" | "float16" | "bfloat16")."""

    def from_bytes(self, data: bytes, tokens: int, dim: int, dtype: str) -> Array:
        """The hidden state [tokens, dim] the bytes hold; ValueError if it is not finite."""

    def logits(self, x: Array) -> torch.Tensor:
        """float32 logits as the sampler takes them."""


class SpanModel(Protocol):
    """Layers `layers` of a model, and its embedding and head where this process holds them."""

    spec: ModelSpec
    layers: range
    causal: bool  # False: an encoder (BERT), whose positions all see each other: an input passes a span whole,
    #               from position 0, and there is no next token to predict (no head to generate with)
    pooling: str  # how an embedding pools the final hidden states: "mean", "cls" (the first) or "last"

    def embed(self, tokens: Sequence[int]) -> Array: ...

    def forward_span(self, hidden: Array, cache: KVCache, start: int) -> Array:
        """hidden [T, dim] at positions start..start+T through every layer held."""

    def final_norm(self, hidden: Array) -> Array:
        """The norm the head applies before its projection (the states embeddings are pooled from)."""

    def head(self, hidden: Array) -> torch.Tensor:
        """hidden [T, dim] -> logits [T, vocab]."""

    def new_cache(self, capacity: int) -> KVCache: ...

    def cache_bytes(self, capacity: int) -> int:
        """What new_cache(capacity) will hold, before it is allocated."""

    def hidden_to_bytes(self, hidden: Array, dtype: str) -> bytes: ...

    def hidden_from_bytes(self, data: bytes, tokens: int, dtype: str) -> Array: ...

    def ms_per_layer(self) -> float:
        """Measured time of one decode step through one layer (the planner's speed estimate)."""


@dataclass(frozen=True)
class Segment:
    """One session's rows of a batch: positions start..start+length, attending over its own `cache`."""
    cache: KVCache
    start: int
    length: int


class Sessions(Protocol):
    """What each session of a batch has of its own: its positions (RoPE) and its KV cache (attention). The rows
    are the sessions' one after the other, in the order of their segments."""

    def rope(self, heads: Array, freqs: np.ndarray, pairing: str) -> Array:
        """heads [rows, n, head_dim], each session's rotated by its own positions (see Ops.rope)."""

    def attention(self, layer: int, q: Array, k: Array, v: Array, scale: float, window: int | None,
                  causal: bool = True) -> Array:
        """Each session's k, v [T, Hk, d] stored in its cache, then its queries q [T, H, d] attend over the keys and
        values it holds (Ops.attention). Returns [rows, H, d]."""


class EachSession:
    """`Sessions` one session at a time, with Ops.rope, Ops.attention and each cache's update."""

    def __init__(self, ops: Ops, segments: Sequence[Segment]):
        self.ops, self.segments = ops, list(segments)
        self._rotations: dict[int, list[Any]] = {}  # per RoPE frequency table (Gemma 3 has two), per session

    def split(self, x: Array) -> list[Array]:
        """x [rows, ...] -> each session's rows."""
        parts, first = [], 0
        for segment in self.segments:
            parts.append(x[first:first + segment.length])
            first += segment.length
        return parts

    def rope(self, heads: Array, freqs: np.ndarray, pairing: str) -> Array:
        rotations = self._rotations.get(id(freqs))
        if rotations is None:
            rotations = self._rotations[id(freqs)] = [self.ops.rotations(s.start, s.length, freqs)
                                                      for s in self.segments]
        if len(self.segments) == 1:
            return self.ops.rope(heads, rotations[0], pairing)
        parts = zip(self.split(heads), rotations, strict=True)
        return self.ops.concat([self.ops.rope(part, r, pairing) for part, r in parts])

    def attention(self, layer: int, q: Array, k: Array, v: Array, scale: float, window: int | None,
                  causal: bool = True) -> Array:
        out = []
        parts = zip(self.segments, self.split(q), self.split(k), self.split(v), strict=True)
        for segment, q_part, k_part, v_part in parts:
            keys, values = segment.cache.update(layer, segment.start, k_part, v_part)
            out.append(self.ops.attention(q_part, keys, values, segment.start, scale, window, causal))
        return out[0] if len(out) == 1 else self.ops.concat(out)


class Batch:
    """The sessions of one forward: their rows concatenated [rows, ...] in the order of `segments`.

    Everything row-wise (projections, norms, the MLP) runs over all rows at once; `rope` and `attention` are
    where each session has its own positions and KV cache. One session goes through Ops' own per-session ops;
    several through the backend's `Ops.sessions`, which may compute them all in one call."""

    def __init__(self, ops: Ops, segments: Sequence[Segment]):
        self.ops, self.segments = ops, list(segments)
        self.rows = sum(s.length for s in self.segments)
        self.sessions = EachSession(ops, self.segments) if len(self.segments) == 1 else ops.sessions(self.segments)

    def rope(self, heads: Array, freqs: np.ndarray, pairing: str) -> Array:
        """heads [rows, n, head_dim], each session's rotated by its own positions (see Ops.rope)."""
        return self.sessions.rope(heads, freqs, pairing)

    def attention(self, layer: int, q: Array, k: Array, v: Array, scale: float, window: int | None,
                  causal: bool = True) -> Array:
        """Each session's k, v [T, Hk, d] stored in its cache, then its queries q [T, H, d] attend over the
        keys and values it holds (Ops.attention). Returns [rows, H, d]."""
        return self.sessions.attention(layer, q, k, v, scale, window, causal)


class Span:
    """`SpanModel` for any family: a family subclasses it and writes `__init__`, `embed`, `forward`
    and `head` against `self.ops`; its class methods name its config and its tensors."""

    config_class: ClassVar[type]
    causal = True  # a decoder: each position sees those before it
    pooling = "mean"  # what llama.cpp's --embeddings does with a generative model

    def __init__(self, spec: ModelSpec, layers: range, ops: Ops, n_kv_heads: int, head_dim: int):
        self.spec, self.layers, self.ops = spec, layers, ops
        self.n_kv_heads, self.head_dim = n_kv_heads, head_dim

    @classmethod
    def config_from_gguf(cls, metadata: dict[str, Any]) -> Any:
        return cls.config_class.from_gguf(metadata)

    @classmethod
    def tensors_for(cls, config: Any, layers: range, embed: bool, head: bool, present: Iterable[str]) -> list[str]:
        """The tensors a span of `layers` (with the embedding and/or head) reads; `present`: the file's."""
        raise NotImplementedError

    def forward(self, hidden: Array, batch: Batch) -> Array:
        """hidden [batch.rows, dim] through every layer held (the family's)."""
        raise NotImplementedError

    def forward_span(self, hidden: Array, cache: KVCache, start: int) -> Array:
        return self.forward(hidden, Batch(self.ops, [Segment(cache, start, hidden.shape[0])]))

    def forward_batch(self, hidden: Array, segments: Sequence[Segment]) -> Array:
        return self.forward(hidden, Batch(self.ops, segments))

    def new_cache(self, capacity: int) -> KVCache:
        return self.ops.new_cache(self.layers, self.n_kv_heads, self.head_dim, capacity)

    def cache_bytes(self, capacity: int) -> int:
        return 2 * len(self.layers) * self.n_kv_heads * self.head_dim * capacity * self.ops.KV_VALUE_BYTES

    def hidden_to_bytes(self, hidden: Array, dtype: str) -> bytes:
        return self.ops.to_bytes(hidden, dtype)

    def hidden_from_bytes(self, data: bytes, tokens: int, dtype: str) -> Array:
        return self.ops.from_bytes(data, tokens, self.spec.dim, dtype)

    def ms_per_layer(self) -> float:
        if not self.layers:
            return 0.0
        cache = self.new_cache(8)
        noise = (np.random.default_rng(0).standard_normal(self.spec.dim) * 0.1).astype(np.float32)
        hidden = self.hidden_from_bytes(noise.tobytes(), 1, "float32")
        timings = []
        for position in range(6):
            started = time.perf_counter()
            at = position if self.causal else 0  # an encoder's input always starts at 0
            self.hidden_to_bytes(self.forward_span(hidden, cache, at), "float32")  # waits for a lazy backend
            timings.append(time.perf_counter() - started)
        cache.clear()
        return sorted(timings[1:])[2] * 1000 / len(self.layers)  # the median of the warm steps
