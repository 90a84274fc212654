"""benchmarks/families.py: transformers is given the file's own tensors, and the table says what was measured."""

import gguf
from benchmarks.families import header, row, without_vocabulary

from duskpool.weights.gguf import GGUFFile
from tests.api.conftest import write_tiny_chat_llama
from tests.conftest import write_tiny_llama


def test_the_copy_without_the_vocabulary_has_every_tensor_byte_for_byte_and_every_other_key(tmp_path):
    for path in (write_tiny_chat_llama(tmp_path / "chat.gguf"),
                 write_tiny_llama(tmp_path / "q4k.gguf", gguf.GGMLQuantizationType.Q4_K)):
        original, copy = GGUFFile(path), GGUFFile(without_vocabulary(path, tmp_path / "copy.gguf"))
        assert copy.metadata == {k: v for k, v in original.metadata.items() if not k.startswith("tokenizer.")}
        assert copy.tensors.keys() == original.tensors.keys()
        for name, info in original.tensors.items():
            assert (copy.tensors[name].qtype, copy.tensors[name].shape) == (info.qtype, info.shape), name
            assert copy.read_bytes(name) == original.read_bytes(name), f"{name}'s bytes differ"


def test_a_row_has_a_cell_per_column_and_says_where_greedy_tokens_parted():
    columns = header([2, 1]).splitlines()[0].count("|")
    figures = {"decode_tok_s": 50.0, "prefill_tok_s": 200.0}
    speed = {t: {"duskpool": figures, "llama.cpp": {"decode_tok_s": 100.0, "prefill_tok_s": 100.0}} for t in (2, 1)}
    measured = {"family": "qwen3", "type": "Q2_K", "tensor_types": "80% Q2_K, 20% Q6_K", "file_mb": 30.0,
                "agreement": {"cosine": 0.9999991, "max_abs_diff": 2e-5, "max_abs_logit": 6.0,
                              "greedy": [{"step": 17, "margin": 0.0031}]},
                "speed": speed}
    cells = [c.strip() for c in row(measured, [2, 1]).strip("|").split("|")]
    assert row(measured, [2, 1]).count("|") == columns
    assert cells[4:] == ["0.999999", "2.0e-05 of 6.0", "0/1 (step 17, margin 0.0031)",
                         "50 / 100", "0.50x", "2.00x", "50 / 100", "0.50x", "2.00x"]
    refused = {"family": "gemma3", "type": "IQ4_XS", "error": "llama.cpp could not quantize to IQ4_XS"}
    assert row(refused, [2, 1]).count("|") == columns
