"""nomic-bert as llama.cpp's converter writes it (architecture "nomic-bert": nomic-embed-text v1 and v1.5, what
Ollama's nomic-embed-text is): BERT (models/bert.py) with rotary positions and a SwiGLU MLP, and no biases.

    x = LayerNorm(token + token_type[0])                          no learned positions
    x = LayerNorm(x + Wo · Attention(RoPE(Wq x), RoPE(Wk x), Wv x))  q|k|v one fused matrix; RoPE in GPT-NeoX's halves
    x = LayerNorm(x + W2 · (silu(Wgate x) * Wup x))               post-norm; no projection has a bias

Pooled as the file says (`pooling_type`: mean for nomic-embed-text). The task prefixes nomic-embed-text was trained
with ("search_query: ", "search_document: ") are part of the text the user sends: nothing here adds them.
Tensor names are llama.cpp's (LLM_ARCH_NOMIC_BERT: attn_qkv, ffn_gate for the HF model's fc12, ffn_up for its fc11);
its graph is src/models/bert.cpp, RoPE NeoX-style with `rope.freq_base` (the HF config's rotary_emb_base).
"""

from dataclasses import dataclass, replace
from typing import Any

from duskpool.models.bert import Bert, BertConfig

BLOCK = {"qkv": "attn_qkv", "o": "attn_output", "attn_norm": "attn_output_norm",
         "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down", "out_norm": "layer_output_norm"}


@dataclass
class NomicBertConfig(BertConfig):
    rope_theta: float | None = 10000.0  # llama.cpp's default; files say theirs (nomic-embed-text: 1000)
    activation: str = "silu"
    biases: bool = False

    @classmethod
    def from_gguf(cls, meta: dict[str, Any]) -> "NomicBertConfig":
        config = super().from_gguf(meta)  # the same keys, under "nomic-bert."
        return replace(config, rope_theta=float(meta.get("nomic-bert.rope.freq_base", config.rope_theta)))


class NomicBert(Bert):
    config_class = NomicBertConfig
    block_tensors = BLOCK
