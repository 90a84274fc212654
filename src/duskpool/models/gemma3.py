"""Gemma 3: local sliding-window layers interleaved with global ones, each kind with its own RoPE base.

Otherwise Qwen3's attention (q and k heads RMS-normalized before RoPE over split halves) in a block that also
normalizes what attention and the MLP return, a GELU-tanh gate, embeddings scaled by sqrt(dim), and the head
tied to the embedding. What the GGUF leaves out is what llama.cpp assumes (src/llama-model.cpp, LLM_ARCH_GEMMA3):
- when the file has a sliding window, five local layers precede each global one (layer i is global when
  i % 6 == 5), and local layers rotate with base 10000 and no scaling; without one, every layer is global;
- the query scale is 1/sqrt(query_pre_attn_scalar), which is the head size, or dim / heads for the 27B model.
llama.cpp's converter has already added Gemma's 1 to every norm weight (Hugging Face computes x * (1 + w)).
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from duskpool.models import llama, qwen3
from duskpool.models.base import Array, Batch, ModelSpec, Ops
from duskpool.models.llama import Llama, LlamaConfig, rope_frequencies
from duskpool.weights.gguf import ModelFileError, PackedTensor

LOCAL_ROPE_THETA = 10000.0
PATTERN = 6  # of each 6 layers, the first 5 are local (sliding window) and the last global


@dataclass
class Gemma3Config(LlamaConfig):
    rope_pairing: str = "halves"
    activation: str = "gelu_tanh"
    query_pre_attn_scalar: float = 256.0

    @property
    def attention_scale(self) -> float:
        return self.query_pre_attn_scalar ** -0.5

    def is_local(self, layer: int) -> bool:
        return self.sliding_window is not None and layer % PATTERN < PATTERN - 1

    def local(self) -> "Gemma3Config":
        """A local layer's choices: the file's window, RoPE base 10000 and no scaling."""
        return replace(self, rope_theta=LOCAL_ROPE_THETA, rope_linear_factor=1.0, rope_llama3=None)

    def layer(self, index: int) -> "Gemma3Config":
        return self.local() if self.is_local(index) else replace(self, sliding_window=None)

    @classmethod
    def from_gguf(cls, meta: dict[str, Any]) -> "Gemma3Config":
        config = super().from_gguf(meta)
        if meta.get("gemma3.final_logit_softcapping"):
            raise ModelFileError("Gemma 3 with final logit soft-capping is not supported")
        config.query_pre_attn_scalar = config.dim / config.n_heads if config.n_layers == 62 else config.head_dim
        return config


class Block(llama.Block):
    attention_class = qwen3.Attention

    def __init__(self, config: LlamaConfig, ops: Ops, w: dict[str, PackedTensor]):
        super().__init__(config, ops, w)
        self.post_attn_norm, self.post_ffn_norm = ops.vector(w["post_attn_norm"]), ops.vector(w["post_ffn_norm"])

    def norm(self, x: Array, weight: Array) -> Array:
        return self.ops.rms_norm(x, weight, self.eps)

    def __call__(self, x: Array, batch: Batch, layer: int, rope_freqs: np.ndarray) -> Array:
        attended = self.attention(self.norm(x, self.attn_norm), batch, layer, rope_freqs)
        h = x + self.norm(attended, self.post_attn_norm)
        return h + self.norm(self.mlp(self.norm(h, self.ffn_norm)), self.post_ffn_norm)


class Gemma3(Llama):
    config_class = Gemma3Config
    block_class = Block
    block_tensors = {**qwen3.Qwen3.block_tensors, "post_attn_norm": "post_attention_norm",
                     "post_ffn_norm": "post_ffw_norm"}

    def __init__(self, spec: ModelSpec, config: Gemma3Config, layers: range, w: dict[str, PackedTensor], ops: Ops,
                 embed: bool, head: bool):
        super().__init__(spec, config, layers, w, ops, embed, head)
        self.embed_scale = math.sqrt(config.dim)
        self.local_rope_freqs = rope_frequencies(config.local())

    def embed(self, tokens: Sequence[int]) -> Array:
        return self.embedding.rows(tokens) * self.embed_scale  # [T] -> [T, dim]

    def forward(self, hidden: Array, batch: Batch) -> Array:
        # hidden: [T, dim]; what a layer does depends on its index in the whole model
        for layer, block in zip(self.layers, self.blocks, strict=True):
            freqs = self.local_rope_freqs if self.config.is_local(layer) else self.rope_freqs
            hidden = block(hidden, batch, layer, freqs)
        return hidden
