"""A family runs on MLX unchanged: its spans compute what the CPU backend's compute, the bundled model's greedy
tokens are the CPU backend's, and a span's weights stay packed."""

import gc

import pytest
import torch

mx = pytest.importorskip("mlx.core")

from duskpool import backends  # noqa: E402
from duskpool.backends import load_span  # noqa: E402
from duskpool.weights.gguf import GGUFFile  # noqa: E402
from tests.conftest import Q  # noqa: E402

TOKENS = [3, 17, 200, 45, 9, 100, 7, 300, 511, 0]


def steps(model, tokens: list[int], more: list[int]) -> torch.Tensor:
    """Logits of a prefill of `tokens`, then of one decode step per token of `more`."""
    cache = model.new_cache(len(tokens) + len(more))
    out = [model.head(model.forward_span(model.embed(tokens), cache, 0))]
    for i, token in enumerate(more):
        out.append(model.head(model.forward_span(model.embed([token]), cache, len(tokens) + i)))
    return torch.cat(out)


# Q4_K/Q5_K scales are rounded to float16 (2^-11); Q6_K is the nearest 6-bit form (its random tiny blocks have
# scales far more uneven than a real file's, so its bound only says the model is the same model)
TOLERANCE = {Q.Q4_K: 2e-3, Q.Q5_K: 2e-3, Q.Q6_K: 0.1}


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K,
                                   Q.Q6_K], ids=lambda q: q.name)
def test_a_span_computes_what_the_cpu_backend_computes(tiny_llama, qtype):
    file = GGUFFile(tiny_llama(qtype, tied=qtype != Q.Q6_K))
    ours = steps(load_span(file, backend_name="mlx"), TOKENS, [5, 511])
    theirs = steps(load_span(file, backend_name="cpu"), TOKENS, [5, 511])
    tolerance = TOLERANCE.get(qtype, 1e-4)  # float32 on MLX's CPU, as on ours
    torch.testing.assert_close(ours, theirs, rtol=tolerance, atol=tolerance * theirs.abs().max().item())


def test_spans_chain_like_the_whole_model(tiny_llama):
    file = GGUFFile(tiny_llama(Q.Q4_0, layers=4))
    whole = steps(load_span(file, backend_name="mlx"), TOKENS, [5])
    first = load_span(file, range(0, 1), embed=True, head=False, backend_name="cpu")
    middle = load_span(file, range(1, 3), embed=False, head=False, backend_name="mlx")
    last = load_span(file, range(3, 4), embed=False, head=True, backend_name="cpu")
    caches = [m.new_cache(len(TOKENS) + 1) for m in (first, middle, last)]

    def step(tokens: list[int], start: int) -> torch.Tensor:
        hidden = first.forward_span(first.embed(tokens), caches[0], start)
        for model, cache in ((middle, caches[1]), (last, caches[2])):  # over the wire, in float32
            hidden = model.hidden_from_bytes(first.hidden_to_bytes(hidden, "float32") if model is middle
                                             else middle.hidden_to_bytes(hidden, "float32"), len(tokens), "float32")
            hidden = model.forward_span(hidden, cache, start)
        return last.head(hidden)

    chained = torch.cat([step(TOKENS, 0), step([5], len(TOKENS))])
    torch.testing.assert_close(chained, whole, rtol=1e-4, atol=1e-4 * whole.abs().max().item())


def greedy(model, prompt: list[int], steps: int = 32) -> list[int]:
    cache, tokens, position, step_input = model.new_cache(len(prompt) + steps), [], 0, prompt
    for _ in range(steps):
        logits = model.head(model.forward_span(model.embed(step_input), cache, position))
        position += len(step_input)
        tokens.append(int(torch.argmax(logits[-1])))
        step_input = tokens[-1:]
    return tokens


@pytest.mark.slow
def test_the_bundled_models_greedy_tokens_are_the_cpu_backends(bundled_model):
    file = GGUFFile(bundled_model)
    prompt = [1, 504, 3458, 282, 4195, 30, 1423, 314, 253, 1345]
    assert greedy(load_span(file, backend_name="mlx"), prompt) == greedy(load_span(file, backend_name="cpu"), prompt)


@pytest.mark.slow
def test_gemma_3s_greedy_tokens_are_the_cpu_backends(gemma_model):
    """Gemma 3 270M Q4_K_M: Q5_0 and Q8_0 exact, Q4_K with float16 scales, Q6_K to the nearest 6-bit groups."""
    file = GGUFFile(gemma_model)
    prompt = [2, 105, 2364, 107, 6974, 496, 6354, 236761, 106, 107, 105, 4368, 107]
    assert greedy(load_span(file, backend_name="mlx"), prompt) == greedy(load_span(file, backend_name="cpu"), prompt)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q8_0, Q.Q4_K, Q.Q6_K], ids=lambda q: q.name)
def test_a_spans_resident_memory_stays_near_its_file_bytes(tiny_llama, qtype):
    file = GGUFFile(tiny_llama(qtype, layers=4, dim=512, ffn=1024))
    layers = range(1, 4)
    names = [n for n in file.tensors if n.startswith(tuple(f"blk.{i}." for i in layers))]
    in_file = sum(file.tensors[n].nbytes for n in names)
    gc.collect()
    mx.clear_cache()
    before = mx.get_active_memory()
    span = load_span(file, layers, embed=False, head=False, backend_name="mlx")
    gc.collect()
    resident = mx.get_active_memory() - before
    assert resident <= 1.15 * in_file, f"{resident} bytes resident for {in_file} in the file"
    del span


def test_pick():
    assert backends.pick("cpu") == "cpu"
    assert backends.pick("mlx") == "mlx"
    expected = "mlx" if backends.backend("mlx").available() else "cpu"  # here: no Metal, no CUDA
    assert backends.pick("auto") == expected
    with pytest.raises(ValueError, match="not one of"):
        backends.pick("tpu")
