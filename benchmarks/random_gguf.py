"""Llama-3-shaped GGUFs with random Q4_0 weights, written by gguf's writer: models of a real size for the
benchmarks, without downloading one. Their vocabulary is made up, so prompts are given as token ids, unless they
take a real model's tokenizer (`tokenizer=`): then text and chat go through them as through that model."""

from pathlib import Path

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType
SHAPES = {  # Llama-3's configs
    "8b": dict(dim=4096, layers=32, heads=32, kv_heads=8, ffn=14336, vocab=128256),
    "70b": dict(dim=8192, layers=80, heads=64, kv_heads=8, ffn=28672, vocab=128256),
    "1b": dict(dim=2048, layers=16, heads=32, kv_heads=8, ffn=8192, vocab=128256),  # Llama-3.2-1B
    "tiny": dict(dim=512, layers=4, heads=8, kv_heads=2, ffn=1024, vocab=2048),
}


def write_model(path: Path, dim: int, layers: int, heads: int, kv_heads: int, ffn: int, vocab: int,
                tokenizer: Path | None = None) -> Path:
    """A Llama-3-shaped GGUF with random Q4_0 matrices (every matrix a view of one random buffer: the writer
    holds them all until it writes). `tokenizer`: a GGUF whose tokenizer and chat template the model takes (and
    its vocabulary's size), so that text and chat go through it; else a made-up vocabulary of `vocab` tokens."""
    copied = tokenizer_fields(tokenizer) if tokenizer is not None else []
    if copied:
        vocab = next(len(val) for key, val, _, _ in copied if key == "tokenizer.ggml.tokens")
    rng = np.random.default_rng(0)
    largest = max(vocab, ffn) * max(dim, ffn) // 32 * 18
    noise = rng.integers(0, 256, largest, dtype=np.uint8)
    d = np.frombuffer(np.float16(0.004).tobytes(), np.uint8)  # |w| up to 0.03: activations stay finite
    noise.reshape(-1, 18)[:, :2] = d
    head_dim = dim // heads
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(8192)
    w.add_embedding_length(dim)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    if copied:
        for key, val, vtype, sub_type in copied:
            w.add_key_value(key, val, vtype, sub_type)
    else:  # a byte-level vocabulary of made-up tokens (no merges): enough for a gateway to load the file
        w.add_tokenizer_model("gpt2")
        w.add_token_list([f"t{i}" for i in range(vocab)])
        w.add_bos_token_id(0)
        w.add_eos_token_id(1)

    def matrix(name: str, rows: int, cols: int) -> None:
        w.add_tensor(name, noise[:rows * cols // 32 * 18].reshape(rows, cols // 32 * 18), raw_dtype=Q.Q4_0)

    ones = np.ones(dim, dtype=np.float32)
    matrix("token_embd.weight", vocab, dim)
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", ones)
        matrix(f"blk.{i}.attn_q.weight", dim, dim)
        matrix(f"blk.{i}.attn_k.weight", kv_heads * head_dim, dim)
        matrix(f"blk.{i}.attn_v.weight", kv_heads * head_dim, dim)
        matrix(f"blk.{i}.attn_output.weight", dim, dim)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", ones)
        matrix(f"blk.{i}.ffn_gate.weight", ffn, dim)
        matrix(f"blk.{i}.ffn_up.weight", ffn, dim)
        matrix(f"blk.{i}.ffn_down.weight", dim, ffn)
    w.add_tensor("output_norm.weight", ones)
    matrix("output.weight", vocab, dim)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tokenizer_fields(path: Path) -> list[tuple[str, object, gguf.GGUFValueType, gguf.GGUFValueType | None]]:
    """The tokenizer.* metadata of a GGUF (vocabulary, merges, special ids, chat template) as GGUFWriter takes it."""
    fields = []
    for key, field in gguf.GGUFReader(path).fields.items():
        if key.startswith("tokenizer."):
            vtype = gguf.GGUFValueType(field.types[0])
            sub_type = gguf.GGUFValueType(field.types[1]) if vtype == gguf.GGUFValueType.ARRAY else None
            fields.append((key, field.contents(), vtype, sub_type))
    return fields
