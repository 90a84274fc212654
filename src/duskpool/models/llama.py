"""Llama as in the papers: RMSNorm, rotary positions, grouped-query attention, SwiGLU.

Also serves Mistral and the many models converted to Llama's GGUF layout (SmolLM, TinyLlama...).
Activations are float32 [tokens, dim]; weights stay in their GGUF quant blocks (weights.quant).
"""

import math
from dataclasses import dataclass
from typing import Any

import torch

from duskpool.models.cache import KVCache
from duskpool.models.ops import apply_rope_, attention, rms_norm, rotations, silu_mul
from duskpool.weights import names
from duskpool.weights.gguf import GGUFFile, ModelFileError
from duskpool.weights.quant import Linear, QuantTensor


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

    @classmethod
    def from_gguf(cls, meta: dict[str, Any]) -> "LlamaConfig":
        arch = meta.get("general.architecture")
        if arch not in names.LLAMA_ARCHITECTURES:
            raise ModelFileError(f"model architecture '{arch}' is not supported "
                                 f"(supported: {', '.join(names.LLAMA_ARCHITECTURES)})")

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
            head_dim=get("rope.dimension_count", dim // n_heads), ffn_dim=get("feed_forward_length"),
            norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)), context_length=get("context_length", 4096),
            rope_linear_factor=factor if scaling == "linear" else 1.0, rope_llama3=llama3,
        )


def rope_frequencies(config: LlamaConfig, factors: torch.Tensor | None = None) -> torch.Tensor:
    """Angular frequency of each rotated pair [head_dim / 2]; `factors` divide them (rope_freqs tensor)."""
    d = config.head_dim
    freqs = 1.0 / config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    if config.rope_llama3 is not None:
        factor, low, high, original = config.rope_llama3
        wavelen = 2 * math.pi / freqs
        smooth = ((original / wavelen - low) / (high - low)).clamp(0, 1)
        # long wavelengths slow down by `factor`, short ones stay, a smooth blend in between
        freqs = (1 - smooth) * freqs / factor + smooth * freqs
    if factors is not None:
        freqs = freqs / factors.double()
    return freqs / config.rope_linear_factor


class Attention:
    def __init__(self, config: LlamaConfig, wqkv: Linear, wo: Linear):
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.wqkv, self.wo = wqkv, wo

    def __call__(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: KVCache, layer: int,
                 start: int) -> torch.Tensor:
        T, H, Hk, d = x.shape[0], self.n_heads, self.n_kv_heads, self.head_dim
        heads = self.wqkv(x).view(T, H + 2 * Hk, d)  # q | k | v heads of each token
        apply_rope_(heads[:, :H + Hk], *rope)  # q and k heads rotate alike
        q, k, v = heads.split([H, Hk, Hk], dim=1)
        keys, values = cache.update(layer, start, k.transpose(0, 1), v.transpose(0, 1))
        return self.wo(attention(q, keys, values, start).reshape(T, H * d))


class MLP:
    def __init__(self, w_gate_up: Linear, w_down: Linear):
        self.w_gate_up, self.w_down = w_gate_up, w_down

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(silu_mul(self.w_gate_up(x)))


class Block:
    def __init__(self, config: LlamaConfig, w: dict[str, QuantTensor | torch.Tensor]):
        self.eps = config.norm_eps
        self.attn_norm, self.ffn_norm = w["attn_norm"], w["ffn_norm"]
        self.attention = Attention(config, Linear([w["wq"], w["wk"], w["wv"]]), Linear([w["wo"]]))
        self.mlp = MLP(Linear([w["w_gate"], w["w_up"]]), Linear([w["w_down"]]))

    def __call__(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: KVCache, layer: int,
                 start: int) -> torch.Tensor:
        h = x + self.attention(rms_norm(x, self.attn_norm, self.eps), rope, cache, layer, start)
        return h + self.mlp(rms_norm(h, self.ffn_norm, self.eps))


class Llama:
    """The layers `layers` of a Llama model, plus the embedding and/or head when asked for.

    embed -> forward_span -> head are separate so each process of a pipeline holds only its part.
    """

    def __init__(self, config: LlamaConfig, layers: range, blocks: list[Block],
                 embedding: QuantTensor | None, norm: torch.Tensor | None, output: QuantTensor | None,
                 rope_factors: torch.Tensor | None = None):
        self.config, self.layers, self.blocks = config, layers, blocks
        self.embedding, self.norm = embedding, norm
        self.output = Linear([output]) if output is not None else None
        self.rope_freqs = rope_frequencies(config, rope_factors)

    @classmethod
    def from_gguf(cls, file: GGUFFile, layers: range | None = None, embed: bool = True,
                  head: bool = True) -> "Llama":
        config = LlamaConfig.from_gguf(file.metadata)
        layers = range(config.n_layers) if layers is None else layers
        if not (0 <= layers.start <= layers.stop <= config.n_layers and layers.step == 1):
            raise ValueError(f"layers {layers} are not a span of this model's {config.n_layers} layers")

        def read(name: str) -> QuantTensor | torch.Tensor:
            if name not in file.tensors:
                raise ModelFileError(f"{file.path} lacks tensor {name}")
            return file.read(name)

        blocks = [Block(config, {ours: read(theirs) for ours, theirs in names.llama_block(i).items()})
                  for i in layers]
        embedding = read(names.TOKEN_EMBEDDING) if embed or (head and names.OUTPUT not in file.tensors) \
            else None
        output = (read(names.OUTPUT) if names.OUTPUT in file.tensors else embedding) if head else None
        norm = read(names.OUTPUT_NORM) if head else None
        factors = read(names.ROPE_FREQS) if names.ROPE_FREQS in file.tensors else None
        return cls(config, layers, blocks, embedding if embed else None, norm, output, factors)

    def new_cache(self, capacity: int) -> KVCache:
        return KVCache(self.layers, self.config.n_kv_heads, self.config.head_dim, capacity)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        # tokens: [T] -> hidden [T, dim]
        return self.embedding.rows(tokens)

    def forward_span(self, hidden: torch.Tensor, cache: KVCache, positions: torch.Tensor,
                     layers: range | None = None) -> torch.Tensor:
        # hidden: [T, dim] for the consecutive positions `positions` [T]; layers default to all held
        layers = self.layers if layers is None else layers
        if layers.start < self.layers.start or layers.stop > self.layers.stop:
            raise ValueError(f"layers {layers} are not all held here (this holds {self.layers})")
        rope, start = rotations(positions, self.rope_freqs), int(positions[0])
        for i in layers:
            hidden = self.blocks[i - self.layers.start](hidden, rope, cache, i, start)
        return hidden

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [T, dim] -> logits [T, vocab]
        return self.output(rms_norm(hidden, self.norm, self.config.norm_eps))
