"""Qwen3: Llama with RoPE over split halves and an RMSNorm over each query and key head before it is rotated.

The head size is the file's `qwen3.attention.key_length` (128), not dim / heads. No bias on q, k, v.
"""

from dataclasses import dataclass

import numpy as np

from duskpool.models import llama
from duskpool.models.base import Array, Batch, Ops
from duskpool.models.llama import Llama, LlamaConfig
from duskpool.weights.gguf import PackedTensor


@dataclass
class Qwen3Config(LlamaConfig):
    rope_pairing: str = "halves"


class Attention(llama.Attention):
    """Grouped-query attention whose q and k heads are each RMS-normalized, then rotated."""

    def __init__(self, config: LlamaConfig, ops: Ops, w: dict[str, PackedTensor]):
        super().__init__(config, ops, w)
        self.q_norm, self.k_norm = ops.vector(w["q_norm"]), ops.vector(w["k_norm"])  # [head_dim] each

    def head_norm(self, heads: Array, weight: Array) -> Array:
        T, n, d = heads.shape  # every head of every token normalized alone
        return self.ops.rms_norm(heads.reshape(T * n, d), weight, self.config.norm_eps).reshape(T, n, d)

    def __call__(self, x: Array, batch: Batch, layer: int, rope_freqs: np.ndarray) -> Array:
        c, T = self.config, x.shape[0]
        H, Hk = c.n_heads, c.n_kv_heads
        heads = self.wqkv(x).reshape(T, H + 2 * Hk, c.head_dim)  # q | k | v heads of each token
        q = batch.rope(self.head_norm(heads[:, :H], self.q_norm), rope_freqs, c.rope_pairing)
        k = batch.rope(self.head_norm(heads[:, H:H + Hk], self.k_norm), rope_freqs, c.rope_pairing)
        out = batch.attention(layer, q, k, heads[:, H + Hk:], c.attention_scale, c.sliding_window)
        return self.wo(out.reshape(T, H * c.head_dim))


class Block(llama.Block):
    attention_class = Attention


class Qwen3(Llama):
    config_class = Qwen3Config
    block_class = Block
    block_tensors = {**llama.BLOCK, "q_norm": "attn_q_norm", "k_norm": "attn_k_norm"}
