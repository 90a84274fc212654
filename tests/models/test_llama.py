"""The Llama model against transformers' implementation of the same GGUF files."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from duskpool.backends import load_span
from duskpool.models import ContextOverflowError
from duskpool.weights.gguf import GGUFFile
from tests.conftest import Q

ALL_TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K,
             Q.IQ4_NL, Q.IQ4_XS]


def reference_model(path: Path):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                             dtype=torch.float32).eval()


def logits(model, tokens: list[int]) -> torch.Tensor:
    cache = model.new_cache(len(tokens))
    return model.head(model.forward_span(model.embed(tokens), cache, 0))


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda q: q.name)
def test_tiny_model_matches_transformers_in_every_quant_type(tiny_llama, qtype):
    path = tiny_llama(qtype, tied=qtype not in (Q.Q4_0, Q.Q5_K))
    ours = logits(load_span(GGUFFile(path)), tokens := [3, 17, 200, 45, 9, 100, 7, 300, 511, 0])
    with torch.no_grad():
        theirs = reference_model(path)(torch.tensor([tokens])).logits[0]
    assert F.cosine_similarity(ours, theirs, dim=-1).min() > 0.99999
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max().item())


def test_decode_steps_equal_one_prefill(tiny_llama):
    model = load_span(GGUFFile(tiny_llama(Q.Q4_1)))
    tokens = [5, 6, 7, 8, 9, 10, 11, 12, 13]
    cache = model.new_cache(16)
    steps = [model.head(model.forward_span(model.embed([t]), cache, i))
             for i, t in enumerate(tokens)]
    torch.testing.assert_close(torch.cat(steps), logits(model, tokens), rtol=1e-4, atol=1e-4)


def test_cache_overflow_is_a_clear_error(tiny_llama):
    model = load_span(GGUFFile(tiny_llama(Q.F16)))
    cache = model.new_cache(4)
    with pytest.raises(ContextOverflowError, match="context of 4 tokens"):
        model.forward_span(model.embed(range(5)), cache, 0)


def test_a_span_loads_only_its_layers(tiny_llama):
    file = GGUFFile(tiny_llama(Q.Q8_0, layers=4))
    middle = load_span(file, layers=range(1, 3), embed=False, head=False)
    assert len(middle.blocks) == 2 and middle.embedding is None and middle.output is None


def test_llama3_rope_scaling_matches_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from duskpool.models.llama import LlamaConfig, rope_frequencies

    config = LlamaConfig(vocab_size=1, dim=2048, n_layers=1, n_heads=32, n_kv_heads=8, head_dim=64, ffn_dim=1,
                         norm_eps=1e-5, rope_theta=500000.0, context_length=131072,
                         rope_llama3=(32.0, 1.0, 4.0, 8192))
    hf = transformers.LlamaConfig(hidden_size=2048, num_attention_heads=32, max_position_embeddings=131072,
                                  rope_theta=500000.0, rope_scaling={
                                      "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    torch.testing.assert_close(torch.from_numpy(rope_frequencies(config)).float(), expected.float(), rtol=1e-6, atol=0)


# --- the bundled model (SmolLM2-135M-Instruct, Q4_1) -------------------------------------------------

PROMPTS = [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "The quick brown fox jumps over the lazy dog. The quick brown",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Die Hauptstadt von Deutschland ist",
    "1, 2, 3, 5, 8, 13, 21,",
]


@pytest.fixture(scope="module")
def bundled(bundled_model):
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(bundled_model.parent, gguf_file=bundled_model.name)
    return load_span(GGUFFile(bundled_model)), reference_model(bundled_model), tokenizer


@pytest.mark.slow
@pytest.mark.parametrize("prompt", PROMPTS)
def test_bundled_model_logits_and_greedy_text_match_transformers(bundled, prompt):
    ours, theirs, tokenizer = bundled
    tokens = tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        reference = theirs(torch.tensor([tokens])).logits[0, -1]
    assert F.cosine_similarity(logits(ours, tokens)[-1], reference, dim=0) >= 0.999

    steps = 64
    with torch.no_grad():
        expected = theirs.generate(torch.tensor([tokens]), max_new_tokens=steps, min_new_tokens=steps,
                                   do_sample=False)[0, len(tokens):].tolist()
    cache, got, position, step_input = ours.new_cache(len(tokens) + steps), [], 0, tokens
    for _ in range(steps):
        next_logits = ours.head(ours.forward_span(ours.embed(step_input), cache, position)[-1:])[0]
        got.append(int(next_logits.argmax()))
        position += len(step_input)
        step_input = [got[-1]]
    if got != expected:  # allowed only where the reference itself is at a near-tie
        i = next(i for i, (a, b) in enumerate(zip(got, expected, strict=True)) if a != b)
        with torch.no_grad():
            at = theirs(torch.tensor([tokens + expected[:i]])).logits[0, -1]
        margin = (at[expected[i]] - at[got[i]]).item()
        assert margin < 1e-3, f"diverged at token {i}: reference prefers {expected[i]} by {margin:.4f}"


@pytest.mark.slow
def test_spans_compose_bit_identically(bundled_model):
    file = GGUFFile(bundled_model)
    whole = load_span(file)
    spans = [load_span(file, layers=range(a, b), embed=False, head=False) for a, b in [(0, 10), (10, 20), (20, 30)]]
    assert [len(s.blocks) for s in spans] == [10, 10, 10]
    caches_whole = whole.new_cache(32)
    caches = [s.new_cache(32) for s in spans]
    for tokens, start in [([1, 504, 3458, 282, 4649, 314, 253, 1789], 0), ([28], 8), ([30], 9)]:
        hidden = whole.embed(tokens)
        expected = whole.forward_span(hidden, caches_whole, start)
        for span, cache in zip(spans, caches, strict=True):
            hidden = span.forward_span(hidden, cache, start)
        assert torch.equal(hidden, expected)
