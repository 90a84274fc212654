"""Qwen2 and Qwen2.5: Llama with a bias on the q, k and v projections, and RoPE over split halves.

llama.cpp stores Qwen's q/k rows as Hugging Face has them (it permutes only Llama's), so element i of a head
rotates with element i + head_dim / 2 (GPT-NeoX's pairing). Nothing else differs from models/llama.py.
"""

from dataclasses import dataclass

from duskpool.models.llama import Llama, LlamaConfig


@dataclass
class Qwen2Config(LlamaConfig):
    rope_pairing: str = "halves"
    qkv_bias: bool = True


class Qwen2(Llama):
    config_class = Qwen2Config
