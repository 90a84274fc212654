"""nomic-bert (arch "nomic-bert", what Ollama's nomic-embed-text is) against the HF model's equations in plain torch
(tests/tiny_bert.py `reference_nomic_embedding`) and against llama.cpp's own embeddings of the same file. The tiny
random model is written to GGUF as llama.cpp's converter writes nomic-embed-text; its weights are large enough that
attention, and so RoPE, moves the embedding (a wrong pairing or no rotation falls below 0.9)."""

import importlib.util

import numpy as np
import pytest
import torch

from duskpool.backends import load_span
from duskpool.engine.runner import LocalEngine, load_tokenizer
from duskpool.models.base import Segment
from duskpool.models.nomic_bert import NomicBert, NomicBertConfig
from duskpool.weights.gguf import GGUFFile
from tests.models.test_bert import assert_embeds_whole_and_in_spans, cosine, hidden_states
from tests.tiny_bert import Q, reference_nomic_embedding, write_tiny_nomic_bert

NEEDS_MLX = pytest.mark.skipif(importlib.util.find_spec("mlx") is None, reason="MLX is not installed")
TEXTS = ["The lighthouse keeper climbed the stairs.", "Paris", "What will the weather be in Paris?",
         "search_query: Café naïve ÜBER-cool, 12345 tide-pools!!"]  # the task prefix is the user's text, as any


@pytest.fixture(scope="module")
def nomic(tmp_path_factory):
    return write_tiny_nomic_bert(tmp_path_factory.mktemp("nomic"))


@pytest.mark.parametrize("backend", ["cpu", pytest.param("mlx", marks=NEEDS_MLX)])
@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.Q8_0], ids=lambda q: q.name)
def test_nomic_bert_embeds_as_the_hf_model_does_whole_and_in_spans(tmp_path, nomic, qtype, backend):
    path = write_tiny_nomic_bert(tmp_path, qtype).path if qtype != Q.F32 else nomic.path
    file = GGUFFile(path)
    whole = assert_embeds_whole_and_in_spans(file, backend, TEXTS, lambda t: nomic.tokenizer(t)["input_ids"],
                                             lambda tokens: reference_nomic_embedding(nomic, tokens),
                                             f"{qtype.name} {backend}")
    assert type(whole) is NomicBert and not whole.causal and whole.pooling == "mean"
    assert whole.config.rope_theta == 1000.0 and "position_embd.weight" not in file.tensors


def test_positions_reach_the_embedding(nomic):
    """Mean pooling forgets order: only RoPE tells these apart, so the agreement above is RoPE's too."""
    span = load_span(GGUFFile(nomic.path))
    tokens = nomic.tokenizer(TEXTS[2])["input_ids"]
    forward, backward = (hidden_states([span], t).double().mean(0) for t in (tokens, tokens[::-1]))
    assert cosine(forward, backward) < 0.99


def test_the_engine_embeds_with_the_files_vocabulary(nomic):
    engine = LocalEngine.load(nomic.path)
    assert engine.pooling == "mean" and not engine.causal
    for text in TEXTS:
        tokens = engine.tokenizer.encode(text)
        assert tokens == nomic.tokenizer(text)["input_ids"], text
        assert cosine(engine.embed(tokens), reference_nomic_embedding(nomic, tokens)) >= 0.999
    assert load_tokenizer(GGUFFile(nomic.path)).chat_template is None


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.Q8_0], ids=lambda q: q.name)
def test_llama_cpp_embeds_the_same_file_alike(tmp_path, nomic, qtype):
    import llama_cpp

    path = write_tiny_nomic_bert(tmp_path, qtype).path if qtype != Q.F32 else nomic.path
    theirs = llama_cpp.Llama(str(path), embedding=True, n_ctx=128, verbose=False)
    ours = load_span(GGUFFile(path))
    for text in TEXTS:
        tokens = nomic.tokenizer(text)["input_ids"]
        assert theirs.tokenize(text.encode()) == tokens, f"llama.cpp tokenizes {text!r} otherwise"
        embedding = torch.tensor(theirs.embed(text))  # mean-pooled, as the file says
        assert cosine(hidden_states([ours], tokens).double().mean(0), embedding) >= 0.999, f"{qtype.name}: {text!r}"
        assert cosine(embedding, reference_nomic_embedding(nomic, tokens)) >= 0.999


def test_the_rope_base_is_the_files():
    meta = {"general.architecture": "nomic-bert", "nomic-bert.embedding_length": 64, "nomic-bert.block_count": 2,
            "nomic-bert.attention.head_count": 4, "nomic-bert.feed_forward_length": 128,
            "nomic-bert.context_length": 2048, "nomic-bert.pooling_type": 1, "nomic-bert.rope.freq_base": 1000.0}
    config = NomicBertConfig.from_gguf(meta)
    assert (config.rope_theta, config.activation, config.biases, config.context_length) == (1000.0, "silu", False, 2048)
    del meta["nomic-bert.rope.freq_base"]
    assert NomicBertConfig.from_gguf(meta).rope_theta == 10000.0  # llama.cpp's default


@pytest.mark.parametrize("backend", ["cpu", pytest.param("mlx", marks=NEEDS_MLX)])
def test_two_inputs_in_one_forward_embed_as_each_alone(nomic, backend):
    """A stage's batch of several sessions: each is rotated from its own position 0 and attends only to itself."""
    span = load_span(GGUFFile(nomic.path), backend_name=backend)
    a, b = (nomic.tokenizer(text)["input_ids"] for text in TEXTS[:2])
    segments = [Segment(span.new_cache(len(t)), 0, len(t)) for t in (a, b)]
    together = span.forward_batch(span.ops.concat([span.embed(a), span.embed(b)]), segments)
    data = np.frombuffer(span.hidden_to_bytes(together, "float32"), dtype="<f4").reshape(len(a) + len(b), -1)
    alone = torch.cat([hidden_states([span], a), hidden_states([span], b)])
    assert torch.allclose(torch.from_numpy(data.copy()), alone, atol=1e-5)
