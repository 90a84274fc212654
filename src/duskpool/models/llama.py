"""Llama as in the papers: RMSNorm, rotary positions, grouped-query attention, SwiGLU.

Also serves Mistral and the many models converted to Llama's GGUF layout (SmolLM, TinyLlama...).
Written against a backend's `ops` (models/base.py); weights stay in their GGUF quant blocks.
"""

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from duskpool.models.base import Array, Batch, ModelSpec, Ops, Span
from duskpool.weights.gguf import ModelFileError, PackedTensor

TOKEN_EMBEDDING = "token_embd.weight"
OUTPUT_NORM = "output_norm.weight"
OUTPUT = "output.weight"  # absent when the head is tied to the token embedding
ROPE_FREQS = "rope_freqs.weight"  # llama3-style per-frequency scaling factors, when present
BLOCK = {"attn_norm": "attn_norm", "wq": "attn_q", "wk": "attn_k", "wv": "attn_v", "wo": "attn_output",
         "ffn_norm": "ffn_norm", "w_gate": "ffn_gate", "w_up": "ffn_up", "w_down": "ffn_down"}


@dataclass
class LlamaConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    norm_eps: float
    rope_theta: float
    context_length: int
    rope_linear_factor: float = 1.0  # positions are divided by it ("linear" RoPE scaling)
    # llama3-style scaling: (factor, low_freq_factor, high_freq_factor, original_context_length)
    rope_llama3: tuple[float, float, float, int] | None = None
    # the choices a family close to Llama makes differently (each an op's parameter)
    rope_pairing: str = "adjacent"  # llama.cpp stores Llama's q/k rows so that rotated pairs are adjacent
    activation: str = "silu"
    sliding_window: int | None = None
    qkv_bias: bool = False

    @property
    def attention_scale(self) -> float:
        return 1 / math.sqrt(self.head_dim)

    def layer(self, index: int) -> "LlamaConfig":
        """The choices of layer `index` (a family whose layers differ, like Gemma 3's, overrides this)."""
        return self

    @classmethod
    def from_gguf(cls, meta: dict[str, Any]) -> "LlamaConfig":
        arch = meta.get("general.architecture")

        def get(key: str, default: Any = None) -> Any:
            value = meta.get(f"{arch}.{key}", default)
            if value is None:
                raise ModelFileError(f"model metadata lacks '{arch}.{key}'")
            return value

        dim, n_heads = get("embedding_length"), get("attention.head_count")
        scaling = meta.get(f"{arch}.rope.scaling.type", "none")
        factor = float(meta.get(f"{arch}.rope.scaling.factor", 1.0))
        llama3 = None
        if scaling == "llama3":
            llama3 = (factor, float(get("rope.scaling.low_freq_factor", 1.0)),
                      float(get("rope.scaling.high_freq_factor", 4.0)),
                      int(get("rope.scaling.original_context_length", 8192)))
        elif scaling not in ("none", "linear"):
            raise ModelFileError(f"RoPE scaling '{scaling}' is not supported (supported: linear, llama3)")
        return cls(
            vocab_size=len(meta["tokenizer.ggml.tokens"]) if "tokenizer.ggml.tokens" in meta
            else get("vocab_size"),
            dim=dim, n_layers=get("block_count"), n_heads=n_heads,
            n_kv_heads=get("attention.head_count_kv", n_heads),
            head_dim=get("attention.key_length", get("rope.dimension_count", dim // n_heads)),
            ffn_dim=get("feed_forward_length"),
            norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)), context_length=get("context_length", 4096),
            rope_linear_factor=factor if scaling == "linear" else 1.0, rope_llama3=llama3,
            sliding_window=meta.get(f"{arch}.attention.sliding_window") or None,  # when the file says so
        )


def rope_frequencies(config: LlamaConfig, factors: np.ndarray | None = None) -> np.ndarray:
    """Angular frequency of each rotated pair [head_dim / 2]; `factors` divide them (rope_freqs tensor)."""
    d = config.head_dim
    freqs = 1.0 / config.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    if config.rope_llama3 is not None:
        factor, low, high, original = config.rope_llama3
        wavelen = 2 * math.pi / freqs
        smooth = np.clip((original / wavelen - low) / (high - low), 0, 1)
        # long wavelengths slow down by `factor`, short ones stay, a smooth blend in between
        freqs = (1 - smooth) * freqs / factor + smooth * freqs
    if factors is not None:
        freqs = freqs / factors.astype(np.float64)
    return freqs / config.rope_linear_factor


class Attention:
    def __init__(self, config: LlamaConfig, ops: Ops, w: dict[str, PackedTensor]):
        self.config, self.ops = config, ops
        bias = [w["bq"], w["bk"], w["bv"]] if config.qkv_bias else None
        self.wqkv, self.wo = ops.linear([w["wq"], w["wk"], w["wv"]], bias), ops.linear([w["wo"]])

    def __call__(self, x: Array, batch: Batch, layer: int, rope_freqs: np.ndarray) -> Array:
        c, T = self.config, x.shape[0]  # x: [T, dim], the rows of every session in the batch
        H, Hk = c.n_heads, c.n_kv_heads
        heads = self.wqkv(x).reshape(T, H + 2 * Hk, c.head_dim)  # q | k | v heads of each token
        qk = batch.rope(heads[:, :H + Hk], rope_freqs, c.rope_pairing)  # q and k heads rotate alike
        out = batch.attention(layer, qk[:, :H], qk[:, H:], heads[:, H + Hk:], c.attention_scale, c.sliding_window)
        return self.wo(out.reshape(T, H * c.head_dim))


class MLP:
    def __init__(self, config: LlamaConfig, ops: Ops, w: dict[str, PackedTensor]):
        self.ops, self.activation = ops, config.activation
        self.w_gate_up, self.w_down = ops.linear([w["w_gate"], w["w_up"]]), ops.linear([w["w_down"]])

    def __call__(self, x: Array) -> Array:
        return self.w_down(self.ops.gated(self.w_gate_up(x), self.activation))


class Block:
    attention_class = Attention

    def __init__(self, config: LlamaConfig, ops: Ops, w: dict[str, PackedTensor]):
        self.ops, self.eps = ops, config.norm_eps
        self.attn_norm, self.ffn_norm = ops.vector(w["attn_norm"]), ops.vector(w["ffn_norm"])
        self.attention, self.mlp = self.attention_class(config, ops, w), MLP(config, ops, w)

    def __call__(self, x: Array, batch: Batch, layer: int, rope_freqs: np.ndarray) -> Array:
        h = x + self.attention(self.ops.rms_norm(x, self.attn_norm, self.eps), batch, layer, rope_freqs)
        return h + self.mlp(self.ops.rms_norm(h, self.ffn_norm, self.eps))


class Llama(Span):
    """The layers `layers` of a Llama model, plus the embedding and/or head when asked for.

    embed -> forward_span -> head are separate so each process of a pipeline holds only its part.
    """

    config_class = LlamaConfig
    block_class = Block
    block_tensors = BLOCK  # our name for each weight of a block -> its GGUF name

    def __init__(self, spec: ModelSpec, config: LlamaConfig, layers: range, w: dict[str, PackedTensor], ops: Ops,
                 embed: bool, head: bool):
        super().__init__(spec, layers, ops, config.n_kv_heads, config.head_dim)
        self.config = config
        self.blocks = [self.block_class(config.layer(i), ops, self.block_weights(w, i)) for i in layers]
        self.embedding = ops.embedding(w[TOKEN_EMBEDDING]) if embed else None
        self.norm = ops.vector(w[OUTPUT_NORM]) if head else None
        self.output = ops.linear([w[OUTPUT] if OUTPUT in w else w[TOKEN_EMBEDDING]]) if head else None
        factors = w[ROPE_FREQS].data.view(np.float32) if ROPE_FREQS in w else None
        self.rope_freqs = rope_frequencies(config, factors)

    @classmethod
    def block_weights(cls, w: dict[str, PackedTensor], layer: int) -> dict[str, PackedTensor]:
        """Our name for each weight of block `layer` (biases, where the file has them, as b*)."""
        ours = {name: w[f"blk.{layer}.{theirs}.weight"] for name, theirs in cls.block_tensors.items()}
        for name in ("q", "k", "v"):
            if f"blk.{layer}.attn_{name}.bias" in w:
                ours[f"b{name}"] = w[f"blk.{layer}.attn_{name}.bias"]
        return ours

    @classmethod
    def tensors_for(cls, config: LlamaConfig, layers: range, embed: bool, head: bool,
                    present: Iterable[str]) -> list[str]:
        present = set(present)
        wanted = [f"blk.{i}.{theirs}.weight" for i in layers for theirs in cls.block_tensors.values()]
        if config.qkv_bias:
            wanted += [f"blk.{i}.attn_{x}.bias" for i in layers for x in "qkv"]
        if embed or (head and OUTPUT not in present):
            wanted.append(TOKEN_EMBEDDING)
        if head:
            wanted += [OUTPUT_NORM] + ([OUTPUT] if OUTPUT in present else [])
        return wanted + ([ROPE_FREQS] if ROPE_FREQS in present else [])

    def embed(self, tokens: Sequence[int]) -> Array:
        return self.embedding.rows(tokens)  # [T] -> [T, dim]

    def forward(self, hidden: Array, batch: Batch) -> Array:
        # hidden: [T, dim], each session's rows at its own positions (models/base.py Batch)
        for layer, block in zip(self.layers, self.blocks, strict=True):
            hidden = block(hidden, batch, layer, self.rope_freqs)
        return hidden

    def final_norm(self, hidden: Array) -> Array:
        return self.ops.rms_norm(hidden, self.norm, self.config.norm_eps)

    def head(self, hidden: Array) -> Array:
        # hidden: [T, dim] -> logits [T, vocab]
        return self.ops.logits(self.output(self.final_norm(hidden)))
