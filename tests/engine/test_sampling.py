"""Sampling filters on hand-made distributions where the right answer is known."""

import math

import pytest
import torch

from duskpool.engine.sampling import Sampler, SamplingParams, logprobs


def draws(probs: list[float], n: int = 4000, context: list[int] | None = None, **params) -> torch.Tensor:
    logits = torch.tensor([math.log(p) for p in probs])
    sampler = Sampler(SamplingParams(seed=0, **params))
    return torch.bincount(torch.tensor([sampler(logits, context or []) for _ in range(n)]),
                          minlength=len(probs)).float() / n


def test_greedy_is_argmax():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert Sampler(SamplingParams())(logits, []) == 1


def test_temperature_one_follows_the_distribution():
    probs = [0.5, 0.3, 0.2]
    assert torch.allclose(draws(probs, temperature=1.0), torch.tensor(probs), atol=0.03)


def test_top_k_keeps_the_k_most_likely():
    freq = draws([0.4, 0.3, 0.2, 0.1], temperature=1.0, top_k=2)
    assert freq[2] == freq[3] == 0 and abs(freq[0] - 4 / 7) < 0.03


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    freq = draws([0.5, 0.3, 0.15, 0.05], temperature=1.0, top_p=0.7)
    assert freq[2] == freq[3] == 0 and abs(freq[0] - 0.5 / 0.8) < 0.03


def test_min_p_drops_tokens_below_a_fraction_of_the_top():
    freq = draws([0.6, 0.3, 0.1], temperature=1.0, min_p=0.2)  # cut-off 0.12
    assert freq[2] == 0 and abs(freq[0] - 2 / 3) < 0.03


def test_repetition_penalty_discourages_seen_tokens():
    logits = torch.tensor([2.0, 1.9, -1.0])
    assert Sampler(SamplingParams(repetition_penalty=1.2))(logits, [0]) == 1
    assert Sampler(SamplingParams(repetition_penalty=1.2))(logits, [2]) == 0


def test_same_seed_same_tokens_different_seed_different_tokens():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(1))

    def run(seed: int) -> list[int]:
        sampler = Sampler(SamplingParams(temperature=1.5, seed=seed))
        return [sampler(logits, []) for _ in range(50)]

    assert run(7) == run(7) and run(7) != run(8)


@pytest.mark.parametrize("bad", [{"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"min_p": 2},
                                 {"top_k": -3}, {"repetition_penalty": 0}])
def test_bad_parameters_are_rejected(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_a_mask_leaves_only_the_allowed_tokens():
    logits = torch.tensor([5.0, 1.0, 0.5, 0.2, 3.0])
    allowed = torch.tensor([False, True, False, True])  # shorter than the logits: the rest is not allowed
    sampler = Sampler(SamplingParams(temperature=1.0, seed=0))
    assert {sampler(logits, [], allowed) for _ in range(200)} == {1, 3}
    assert Sampler(SamplingParams())(logits, [], allowed) == 1


def test_logprobs_are_the_log_softmax_of_the_adjusted_logits():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    sampler = Sampler(SamplingParams(repetition_penalty=2.0))
    adjusted = sampler.adjust(logits, [0], torch.tensor([True, True, True, False]))
    chosen, top = logprobs(adjusted, 1, 3)
    expected = torch.log_softmax(torch.tensor([1.0, 1.0, 0.0]).double(), 0)
    assert chosen == pytest.approx(float(expected[1]))
    assert [t for t, _ in top] in ([0, 1, 2], [1, 0, 2]) and top[2][1] == pytest.approx(float(expected[2]))
    assert len(logprobs(adjusted, 1, 4)[1]) == 3, "a masked token is no alternative"
