"""GGUF tensor names of the Llama family (llama, mistral, and models converted to their layout)."""

LLAMA_ARCHITECTURES = ("llama", "mistral")

TOKEN_EMBEDDING = "token_embd.weight"
OUTPUT_NORM = "output_norm.weight"
OUTPUT = "output.weight"  # absent when the head is tied to the token embedding
ROPE_FREQS = "rope_freqs.weight"  # llama3-style per-frequency scaling factors, when present


def llama_block(layer: int) -> dict[str, str]:
    """Our name for each weight of one transformer block -> its GGUF name."""
    names = {
        "attn_norm": "attn_norm", "wq": "attn_q", "wk": "attn_k", "wv": "attn_v", "wo": "attn_output",
        "ffn_norm": "ffn_norm", "w_gate": "ffn_gate", "w_up": "ffn_up", "w_down": "ffn_down",
    }
    return {ours: f"blk.{layer}.{theirs}.weight" for ours, theirs in names.items()}
