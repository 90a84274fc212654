"""Speculative decoding by prompt lookup: the same greedy tokens, fewer passes, no trace of a rejected draft."""

import pytest
import torch

from duskpool.engine.generate import GenerationParams, GenerationStats
from duskpool.engine.runner import LocalEngine, drafting_pays
from duskpool.engine.sampling import SamplingParams
from duskpool.engine.speculative import lookup

REPEAT = ("Repeat this text exactly: The quick brown fox jumps over the lazy dog while the cat sleeps on the warm "
          "windowsill and the rain falls softly on the old stone roof.")


@pytest.fixture(scope="module")
def engine(bundled_model):
    return LocalEngine.load(bundled_model)


def test_lookup_drafts_what_followed_the_latest_earlier_occurrence():
    assert lookup([1, 2, 3, 4, 5, 9, 2, 3], k=3) == [4, 5, 9]
    assert lookup([1, 2, 3, 7, 1, 2, 3, 8, 1, 2, 3], k=2) == [8, 1]  # the latest occurrence wins
    assert lookup([1, 2, 3, 4], k=3) == []  # no earlier occurrence of the tail
    assert lookup([5, 6, 9, 5, 6], k=4) == [9, 5, 6]  # stops at the end of the context


def test_drafting_pays_while_at_most_half_the_stages_are_busy():
    assert [drafting_pays(g, 4) for g in (1, 2, 3, 4)] == [True, True, False, False]  # as measured on 4 stages
    assert [drafting_pays(g, 1) for g in (1, 2)] == [True, False]  # one process: its single stage is the route


def answer(engine, text: str, speculative: bool, max_tokens: int = 40) -> tuple[str, GenerationStats]:
    stats = GenerationStats()
    params = GenerationParams(max_tokens=max_tokens, sampling=SamplingParams(temperature=0.0), speculative=speculative)
    return "".join(engine.chat([{"role": "user", "content": text}], params, stats)), stats


@pytest.mark.parametrize("text", [REPEAT, "What is the capital of France? Answer in one sentence."])
def test_greedy_tokens_are_the_same_with_and_without_drafts(engine, text):
    plain, _ = answer(engine, text, speculative=False)
    drafted, stats = answer(engine, text, speculative=True)
    assert drafted == plain
    if text is REPEAT:
        assert stats.accepted_tokens > 0, f"no draft accepted on a repeat prompt ({stats.drafted_tokens} drafted)"


def test_a_rejected_draft_leaves_no_trace_in_the_cache(engine):
    session = engine.open_session(32)
    try:
        session.forward([1, 2, 3, 4], 0)
        assert session.verify([5, 6, 7, 8], 4).shape[0] == 4  # token 5 and three drafts, at positions 4..7
        assert session.cache.k[:, :, 7].abs().sum() > 0
        session.forward([9], 5)  # draft 6 accepted, 7 rejected: the next step starts at position 5
        assert torch.all(session.cache.k[:, :, 6:] == 0) and torch.all(session.cache.v[:, :, 6:] == 0)
    finally:
        session.close()


def test_drafts_stop_at_the_sessions_capacity(engine):
    plain, _ = answer(engine, REPEAT, speculative=False, max_tokens=12)
    drafted, stats = answer(engine, REPEAT, speculative=True, max_tokens=12)  # the last drafts would overflow
    assert drafted == plain and stats.generated_tokens == 12
