"""Reading GGUF files: metadata and tensors as gguf-py reads them, clear errors on bad files."""

import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch

from duskpool.backends import load_span
from duskpool.backends.cpu.quant import QuantTensor
from duskpool.weights.gguf import GGUFFile, ModelFileError
from tests.conftest import Q, write_tiny_llama


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q4_K, Q.Q6_K, Q.BF16], ids=lambda q: q.name)
def test_header_and_tensors_agree_with_gguf_py(tiny_llama, qtype):
    path = tiny_llama(qtype)
    ours, reference = GGUFFile(path), gguf.GGUFReader(path)
    assert ours.metadata["llama.block_count"] == 2 and ours.architecture == "llama"
    assert set(ours.tensors) == {t.name for t in reference.tensors}
    for t in reference.tensors:
        info = ours.tensors[t.name]
        assert (info.offset, info.nbytes, info.qtype) == (t.data_offset, t.n_bytes, t.tensor_type)
        read = ours.read(t.name)
        expected = torch.from_numpy(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).copy())
        got = QuantTensor.from_packed(read).dequantize()
        assert torch.equal(got, expected.reshape(got.shape).float()), t.name


def test_string_arrays_and_alignment(tmp_path):
    path = tmp_path / "meta.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_custom_alignment(64)
    w.add_array("tokenizer.ggml.tokens", ["a", "é", "🙂", ""])
    w.add_array("tokenizer.ggml.scores", [0.5, -1.0])
    w.add_bool("flag", True)
    w.add_tensor("x", np.arange(3, dtype=np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    file = GGUFFile(path)
    assert file.metadata["tokenizer.ggml.tokens"] == ["a", "é", "🙂", ""]
    assert file.metadata["tokenizer.ggml.scores"] == [0.5, -1.0] and file.metadata["flag"] is True
    assert file.tensors["x"].offset % 64 == 0 and file.read("x").data.view(np.float32).tolist() == [0.0, 1.0, 2.0]


def test_wrong_magic(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 this is a zip file" + bytes(100))
    with pytest.raises(ModelFileError, match="not a GGUF model file"):
        GGUFFile(path)


def test_missing_file(tmp_path):
    with pytest.raises(ModelFileError, match="not found"):
        GGUFFile(tmp_path / "nope.gguf")


@pytest.mark.parametrize("keep", [0.05, 0.5, 0.999])
def test_truncated_file(tiny_llama, keep):
    path = tiny_llama(Q.Q8_0)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ModelFileError, match="truncated"):
        GGUFFile(path)


def test_unsupported_quant_type_is_named_with_its_tensor(tmp_path, monkeypatch):
    path = write_tiny_llama(tmp_path / "m.gguf", Q.Q8_0)
    w = gguf.GGUFWriter(str(tmp_path / "iq2.gguf"), "llama")
    reader = gguf.GGUFReader(path)
    for field in reader.fields.values():
        if not field.name.startswith("GGUF.") and field.name != "general.architecture":
            w.add_key_value(field.name, field.contents(), field.types[0],
                            field.types[-1] if len(field.types) > 1 else None)
    for t in reader.tensors:
        if t.name == "blk.1.ffn_down.weight":  # one IQ2_XXS tensor of the right byte size, in the last layer
            w.add_tensor(t.name, np.zeros((256, 512 // 256 * 66), np.uint8), raw_dtype=Q.IQ2_XXS)
        else:
            w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    file = GGUFFile(tmp_path / "iq2.gguf")
    monkeypatch.setattr(GGUFFile, "read", lambda *_: pytest.fail("a tensor was read before the check"))
    with pytest.raises(ModelFileError, match="tensor blk.1.ffn_down.weight has quant type IQ2_XXS.*not support"):
        load_span(file)


def test_unsupported_architecture_is_named(tmp_path):
    path = write_tiny_llama(tmp_path / "m.gguf", Q.F16, architecture="mamba")
    with pytest.raises(ModelFileError, match="architecture 'mamba' is not supported"):
        load_span(GGUFFile(path))


PEAK_RSS = """
import re, resource, sys
from duskpool.weights.gguf import GGUFFile
from duskpool.backends import load_span
model = load_span(GGUFFile(sys.argv[1]))
if sys.platform == "linux":  # VmHWM starts afresh at exec; ru_maxrss would include the parent's pages
    print(int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024)
else:
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # bytes on macOS
"""


@pytest.mark.slow
def test_loading_the_bundled_model_stays_within_memory_budget(bundled_model):
    # a fresh process, so the peak is loading's alone; the budget is the issue's: 1.3 x file + 300 MB
    out = subprocess.run([sys.executable, "-c", PEAK_RSS, str(bundled_model)], capture_output=True, text=True,
                         check=True).stdout
    peak = int(out)
    budget = 1.3 * bundled_model.stat().st_size + 300e6
    assert peak <= budget, f"peak RSS {peak / 1e6:.0f} MB > budget {budget / 1e6:.0f} MB"
