"""A batch of sessions computes what each session computes alone: every family, on the CPU and MLX backends.

Three sessions with prompts of different lengths decode side by side: one `forward_batch` per step, each
session at its own position over its own cache, a prompt chunk beside the others' decode steps. Each must give
the logits it gives alone (the rows meet only in the projections, whose kernels may round them differently).
"""

import importlib.util
from concurrent.futures import Future

import pytest
import torch

from duskpool.backends import load_span
from duskpool.engine.batcher import Batcher, Job
from duskpool.models.base import Segment
from duskpool.weights.gguf import GGUFFile
from tests.models.test_families import QUANT_TYPES, families, tiny_model, write_gguf

PROMPTS = [[3, 17, 200, 45, 9, 100, 7, 300, 511, 0, 64, 128], [5, 6], [42, 43, 44, 45, 46, 47, 48]]
STEPS = 6
NEEDS_MLX = pytest.mark.skipif(importlib.util.find_spec("mlx") is None, reason="MLX is not installed")


def alone(model, prompt: list[int], tokens: list[int]) -> list[torch.Tensor]:
    """Logits of the prompt's last position, then of each of `tokens` fed one by one."""
    cache = model.new_cache(len(prompt) + len(tokens))
    out = [model.head(model.forward_span(model.embed(prompt), cache, 0)[-1:])[0]]
    for i, token in enumerate(tokens):
        out.append(model.head(model.forward_span(model.embed([token]), cache, len(prompt) + i))[0])
    return out


@pytest.mark.parametrize(("name", "backend"), [("mistral", "cpu"), ("qwen2", "cpu"), ("qwen3", "cpu"),
                                               ("gemma3", "cpu"), pytest.param("gemma3", "mlx", marks=NEEDS_MLX)])
def test_a_batch_of_sessions_computes_what_each_computes_alone(name, backend, tmp_path):
    path = write_gguf(tiny_model(name), families()[name], QUANT_TYPES[0], tmp_path / f"{name}.gguf")
    model = load_span(GGUFFile(path), backend_name=backend)
    tokens = [[11, 12, 13, 14, 15, 16], [21, 22, 23, 24, 25, 26], [31, 32, 33, 34, 35, 36]]
    expected = [alone(model, p, t) for p, t in zip(PROMPTS, tokens, strict=False)]

    caches = [model.new_cache(len(p) + STEPS) for p in PROMPTS]
    # step 0: the first two prompts together; step 1: their first tokens beside the third prompt (joining)
    got: list[list[torch.Tensor]] = [[], [], []]
    feeds = {0: [(0, PROMPTS[0], 0), (1, PROMPTS[1], 0)]}
    for step in range(STEPS + 1):
        rows = feeds.get(step) or []
        if step >= 1:
            rows = [(s, [tokens[s][step - 1]], len(PROMPTS[s]) + step - 1) for s in (0, 1)]
            if step == 1:
                rows.append((2, PROMPTS[2], 0))
            else:
                rows.append((2, [tokens[2][step - 2]], len(PROMPTS[2]) + step - 2))
        hidden = model.ops.concat([model.embed(ids) for _, ids, _ in rows])
        out = model.forward_batch(hidden, [Segment(caches[s], start, len(ids)) for s, ids, start in rows])
        last, first = [], 0
        for _, ids, _ in rows:
            first += len(ids)
            last.append(out[first - 1:first])
        for (s, _, _), logits in zip(rows, model.head(model.ops.concat(last)), strict=False):
            got[s].append(logits)
    for s in range(3):
        n = len(got[s])
        for i, (ours, theirs) in enumerate(zip(got[s], expected[s][:n], strict=False)):
            assert torch.allclose(ours, theirs, atol=2e-3, rtol=1e-3), \
                f"{name} on {backend}: session {s} step {i} differs batched by {(ours - theirs).abs().max():.2e}"


def test_the_batcher_prefills_a_long_prompt_in_chunks_between_decode_steps(bundled_model):
    model = load_span(GGUFFile(bundled_model))
    prompt = list(range(10, 300))
    expected = alone(model, prompt, [])[0]
    short = model.new_cache(8)
    batcher = Batcher(prefill_rows=64)
    try:
        long_cache = model.new_cache(len(prompt))
        future: Future = Future()
        batcher.submit(Job(model, long_cache, 0, model.embed(prompt),
                           lambda job, e: future.set_exception(e) if e else future.set_result(job.output),
                           logits=1))
        for position in range(6):  # decode steps of another session, while the long prompt goes through
            batcher.run(model, short, position, model.embed([position + 1]), logits=1)
        logits = future.result(timeout=60)[0]
    finally:
        batcher.close()
    sessions = [r.sessions for r in batcher.recent]
    assert max(r.rows for r in batcher.recent) <= 64 + 1, "a forward carried more prompt rows than the budget"
    assert 2 in sessions, f"the long prompt never shared a forward with the decode steps: {sessions}"
    assert torch.allclose(logits, expected, atol=2e-3), f"chunked prefill differs by {(logits - expected).abs().max()}"
