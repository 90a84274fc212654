"""BERT as llama.cpp's converter writes it (architecture "bert": all-MiniLM, BGE, E5...): an encoder that embeds.

    x = LayerNorm(token + position + token_type[0])          (every input is "sentence A", as in llama.cpp)
    x = LayerNorm(x + Wo · Attention(Wq x, Wk x, Wv x))      attention bidirectional, no RoPE
    x = LayerNorm(x + W2 · gelu(W1 x))                       post-norm; every projection has a bias

No LM head: the final hidden states are pooled into an embedding (`pooling_type`: mean or [CLS]). Because every
position sees every other one, an input goes through a span whole, from position 0 (`Span.causal` is False).
Tensor names are llama.cpp's (src/llama-model.cpp, LLM_ARCH_BERT); its graph is src/models/bert.cpp, whose GELU is
ggml's tanh approximation where BERT's own is exact: we compute BERT's. nomic-bert (models/nomic_bert.py) is this
model with three choices made differently, each a field of `BertConfig`: rotary positions, a SwiGLU MLP, no biases.
"""

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from duskpool.models.base import Array, Batch, ModelSpec, Ops, Span
from duskpool.weights.gguf import ModelFileError, PackedTensor

TOKEN_EMBEDDING, POSITIONS, TOKEN_TYPES = "token_embd.weight", "position_embd.weight", "token_types.weight"
EMBEDDING_NORM = ("token_embd_norm.weight", "token_embd_norm.bias")
# our name for each weight of a block -> its GGUF name; each has a .weight and (the norms always) a .bias
BLOCK = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output", "attn_norm": "attn_output_norm",
         "up": "ffn_up", "down": "ffn_down", "out_norm": "layer_output_norm"}
NORMS = ("attn_norm", "out_norm")
POOLING = {1: "mean", 2: "cls", 3: "last"}  # llama.cpp's pooling_type; 0 (none) pools as mean, 4 (rank) is refused


@dataclass
class BertConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    ffn_dim: int
    norm_eps: float
    context_length: int  # an input is at most this long (the learned positions, or what it was trained on)
    pooling: str = "mean"
    # the choices a family close to BERT makes differently (nomic-bert's)
    rope_theta: float | None = None  # rotary positions (GPT-NeoX's halves) with this base instead of learned ones
    activation: str = "gelu"  # "silu": a SwiGLU MLP, down(silu(gate x) * up x)
    biases: bool = True  # every projection has one (the norms always do)

    @property
    def n_kv_heads(self) -> int:
        return self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_gguf(cls, meta: dict[str, Any]) -> "BertConfig":
        arch = meta.get("general.architecture", "bert")

        def get(key: str, default: Any = None) -> Any:
            value = meta.get(f"{arch}.{key}", default)
            if value is None:
                raise ModelFileError(f"model metadata lacks '{arch}.{key}'")
            return value

        pooling = int(get("pooling_type", 1))
        if pooling == 4:
            raise ModelFileError("this BERT is a reranker (pooling_type rank), which duskpool does not serve")
        # the converter writes no bert.vocab_size: a node, which is sent no vocabulary, holds no embedding either
        vocab_size = len(meta.get("tokenizer.ggml.tokens") or []) or int(meta.get(f"{arch}.vocab_size", 0))
        return cls(vocab_size=vocab_size, dim=get("embedding_length"), n_layers=get("block_count"),
                   n_heads=get("attention.head_count"), ffn_dim=get("feed_forward_length"),
                   norm_eps=float(get("attention.layer_norm_epsilon", 1e-12)), context_length=get("context_length"),
                   pooling=POOLING.get(pooling, "mean"))


def rope_frequencies(theta: float, head_dim: int) -> np.ndarray:
    """Angular frequency of each rotated pair [head_dim / 2]."""
    return 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)


class Block:
    def __init__(self, config: BertConfig, ops: Ops, w: dict[str, PackedTensor], rope_freqs: np.ndarray | None):
        self.config, self.ops, self.rope_freqs = config, ops, rope_freqs

        def linear(*names: str) -> Callable[[Array], Array]:  # one projection: these weights' outputs concatenated
            return ops.linear([w[n] for n in names], [w[f"{n}.bias"] for n in names] if config.biases else None)

        self.wqkv = linear("qkv") if "qkv" in w else linear("q", "k", "v")  # fused in the file, or not
        self.wo, self.down = linear("o"), linear("down")
        self.ffn_in = linear("up") if config.activation == "gelu" else linear("gate", "up")
        self.attn_norm = ops.vector(w["attn_norm"]), ops.vector(w["attn_norm.bias"])
        self.out_norm = ops.vector(w["out_norm"]), ops.vector(w["out_norm.bias"])

    def norm(self, x: Array, weight_bias: tuple[Array, Array]) -> Array:
        return self.ops.layer_norm(x, *weight_bias, self.config.norm_eps)

    def attention(self, x: Array, batch: Batch, layer: int) -> Array:
        c, T = self.config, x.shape[0]  # x: [T, dim]
        heads = self.wqkv(x).reshape(T, 3 * c.n_heads, c.head_dim)  # q | k | v heads of each token
        qk, v = heads[:, :2 * c.n_heads], heads[:, 2 * c.n_heads:]
        if self.rope_freqs is not None:
            qk = batch.rope(qk, self.rope_freqs, "halves")  # q and k heads rotate alike
        attended = batch.attention(layer, qk[:, :c.n_heads], qk[:, c.n_heads:], v, 1 / math.sqrt(c.head_dim), None,
                                   causal=False)
        return self.wo(attended.reshape(T, c.dim))

    def mlp(self, x: Array) -> Array:
        if self.config.activation == "gelu":
            return self.down(self.ops.activation(self.ffn_in(x), "gelu"))
        return self.down(self.ops.gated(self.ffn_in(x), self.config.activation))  # act(gate x) * up x

    def __call__(self, x: Array, batch: Batch, layer: int) -> Array:
        h = self.norm(x + self.attention(x, batch, layer), self.attn_norm)
        return self.norm(h + self.mlp(h), self.out_norm)


class Bert(Span):
    config_class = BertConfig
    block_tensors = BLOCK
    causal = False

    def __init__(self, spec: ModelSpec, config: BertConfig, layers: range, w: dict[str, PackedTensor], ops: Ops,
                 embed: bool, head: bool):
        super().__init__(spec, layers, ops, config.n_kv_heads, config.head_dim)
        self.config, self.pooling = config, config.pooling
        rope_freqs = None if config.rope_theta is None else rope_frequencies(config.rope_theta, config.head_dim)
        self.blocks = [Block(config, ops, self.block_weights(config, w, i), rope_freqs) for i in layers]
        if embed:
            self.tokens = ops.embedding(w[TOKEN_EMBEDDING])
            self.positions = ops.embedding(w[POSITIONS]) if config.rope_theta is None else None
            self.token_type = ops.embedding(w[TOKEN_TYPES]).rows([0]) if TOKEN_TYPES in w else None  # [1, dim]
            self.embedding_norm = ops.vector(w[EMBEDDING_NORM[0]]), ops.vector(w[EMBEDDING_NORM[1]])

    @classmethod
    def block_names(cls, config: BertConfig, layer: int) -> dict[str, str]:
        """Our name for each weight of block `layer` -> its tensor's name in the file."""
        names = {}
        for ours, theirs in cls.block_tensors.items():
            names[ours] = f"blk.{layer}.{theirs}.weight"
            if config.biases or ours in NORMS:
                names[f"{ours}.bias"] = f"blk.{layer}.{theirs}.bias"
        return names

    @classmethod
    def block_weights(cls, config: BertConfig, w: dict[str, PackedTensor], layer: int) -> dict[str, PackedTensor]:
        return {ours: w[theirs] for ours, theirs in cls.block_names(config, layer).items()}

    @classmethod
    def tensors_for(cls, config: BertConfig, layers: range, embed: bool, head: bool,
                    present: Iterable[str]) -> list[str]:
        wanted = [name for i in layers for name in cls.block_names(config, i).values()]
        if embed:
            wanted += [TOKEN_EMBEDDING, *EMBEDDING_NORM]
            wanted += [POSITIONS] if config.rope_theta is None else []  # rotary positions have no table
            # token types are optional in llama.cpp's loader; a file without them adds nothing there
            wanted += [TOKEN_TYPES] if TOKEN_TYPES in present else []
        return wanted  # no head: the last block's LayerNorm is the final one

    def embed(self, tokens: Sequence[int]) -> Array:
        # [T] -> [T, dim] at positions 0..T-1: an encoder's input always starts at 0
        if len(tokens) > self.config.context_length:
            raise ValueError(f"an input of {len(tokens)} tokens is longer than this model's "
                             f"{self.config.context_length} positions")
        x = self.tokens.rows(tokens)
        if self.positions is not None:
            x = x + self.positions.rows(list(range(len(tokens))))
        if self.token_type is not None:
            x = x + self.token_type
        return self.ops.layer_norm(x, *self.embedding_norm, self.config.norm_eps)

    def forward(self, hidden: Array, batch: Batch) -> Array:
        if any(s.start != 0 for s in batch.segments):
            raise ValueError("BERT sees its whole input at once: it cannot continue one from a later position")
        for layer, block in zip(self.layers, self.blocks, strict=True):
            hidden = block(hidden, batch, layer)
        return hidden

    def final_norm(self, hidden: Array) -> Array:
        return hidden  # each block ends in its LayerNorm: the last one's output is what embeddings pool

    def head(self, hidden: Array) -> Array:
        raise ValueError("BERT is an embedding model: it has no head to predict tokens with")
