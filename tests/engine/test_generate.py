"""The generate loop on the bundled model: stop conditions, seeds, streaming, context bounds, logprobs, grammars."""

import json
import re
import threading
import time

import pytest
import torch

from duskpool.engine.generate import GenerationParams, GenerationStats, _StopText, generate
from duskpool.engine.grammar import GrammarError
from duskpool.engine.runner import LocalEngine
from duskpool.engine.sampling import SamplingParams
from duskpool.models import ContextOverflowError

QUESTION = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


@pytest.fixture(scope="module")
def engine(bundled_model) -> LocalEngine:
    return LocalEngine.load(bundled_model, context_length=512)


def answer(engine: LocalEngine, **params) -> tuple[str, GenerationStats]:
    stats = GenerationStats()
    return "".join(engine.chat(QUESTION, GenerationParams(**params), stats)), stats


def test_max_tokens_bounds_the_answer(engine):
    text, stats = answer(engine, max_tokens=12)
    assert stats.generated_tokens == 12 and stats.finish_reason == "length"
    prompt = engine.tokenizer.encode(engine.tokenizer.render_chat(QUESTION))
    assert stats.prompt_tokens == len(prompt)


def test_stop_string_cuts_the_text_before_it(engine):
    full, _ = answer(engine, max_tokens=40)
    words = full.split()
    stop = " ".join(words[5:7])
    text, stats = answer(engine, max_tokens=40, stop=["never-there", stop])
    assert stats.finish_reason == "stop" and stats.stop_string == stop
    assert text == full[: full.index(stop)]


def test_same_seed_same_text_other_seed_other_text(engine):
    def sampled(seed: int) -> str:
        return answer(engine, max_tokens=24, sampling=SamplingParams(temperature=1.0, seed=seed))[0]

    assert sampled(3) == sampled(3)
    assert sampled(3) != sampled(4)


def test_greedy_stops_at_the_end_token(engine):
    stats = GenerationStats()
    text = "".join(engine.chat([{"role": "user", "content": "What is the capital of France?"}],
                               GenerationParams(max_tokens=100), stats))
    assert "Paris" in text and stats.finish_reason == "stop" and stats.generated_tokens < 100


def test_prompt_longer_than_the_context_is_a_clear_error(engine):
    with pytest.raises(ContextOverflowError, match="context holds 512"):
        "".join(engine.generate(list(range(100, 700)), GenerationParams(max_tokens=4)))


def test_logprobs_of_greedy_tokens_are_the_log_softmax_of_the_logits(engine):
    prompt = engine.tokenizer.encode(engine.tokenizer.render_chat(QUESTION))
    pieces = list(engine.generate(prompt, GenerationParams(max_tokens=8, logprobs=3)))
    tokens = [t for piece in pieces for t in piece.tokens]
    assert len(tokens) == 8
    assert engine.tokenizer.decode([t.token for t in tokens]) == "".join(pieces)
    session = engine.open_session(len(prompt) + 8)
    try:
        step, position = prompt, 0
        for t in tokens:
            reference = torch.log_softmax(session.forward(step, position).double(), 0)
            assert t.token == int(reference.argmax()) and t.top[0][0] == t.token
            assert abs(t.logprob - float(reference[t.token])) < 1e-4
            assert [i for i, _ in t.top] == reference.topk(3).indices.tolist()
            position += len(step)
            step = [t.token]
    finally:
        session.close()


def test_a_grammar_holds_the_answer_token_by_token(engine):
    stats = GenerationStats()
    grammar = engine.vocabulary.regex(r"(yes|no), because [a-z ]{1,30}\.")
    text = "".join(engine.chat([{"role": "user", "content": "Is the sea salty?"}],
                               GenerationParams(max_tokens=40, grammar=grammar), stats))
    assert re.fullmatch(r"(yes|no), because [a-z ]{1,30}\.", text), text
    assert stats.finish_reason == "stop" and stats.masks == stats.generated_tokens > 0 and stats.mask_seconds > 0

    schema = {"type": "object", "properties": {"colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                                                          "minItems": 1, "maxItems": 3}},
              "required": ["colors"], "additionalProperties": False}
    held = GenerationParams(max_tokens=40, grammar=engine.vocabulary.json_schema(schema))
    answer = "".join(engine.chat(QUESTION, held))
    assert set(json.loads(answer)) == {"colors"}


def test_a_schema_llguidance_cannot_use_is_a_grammar_error(engine):
    with pytest.raises(GrammarError, match="JSON schema"):
        engine.vocabulary.json_schema({"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}})
    with pytest.raises(GrammarError, match="regular expression"):
        engine.vocabulary.regex("[a-")


def test_stop_strings_are_bounded_in_count_and_length():
    with pytest.raises(ValueError, match="at most 16"):
        GenerationParams(stop=[f"s{i}" for i in range(250_000)])
    with pytest.raises(ValueError, match="longer than 256"):
        GenerationParams(stop=["x" * 257])


def test_stop_matching_scans_only_the_text_not_sent():
    """16 stop strings of 256 characters, each the text so far but for its end: the text held back stays under
    256 characters, and 10 000 tokens of it take about a second (matching the whole text each token took minutes)."""
    stops = [("ab" * 128)[:255] + chr(ord("A") + i) for i in range(16)]
    text, pieces, started = _StopText(stops), [], time.perf_counter()
    for _ in range(10_000):
        pieces.append(text.feed("ab")[0])
        assert len(text.held) < 256
    assert time.perf_counter() - started < 10.0
    piece, stopped = text.feed(stops[3][-2:] + "tail")  # "...bD": the fourth stop string completes
    assert stopped and text.hit == stops[3]
    assert "".join(pieces) + piece + text.flush() == ("ab" * 10_000 + stops[3][-2:])[:-len(stops[3])]
    # across pieces, and a partial match that does not complete is sent after all
    text = _StopText(["lo w", "xyz"])
    assert [text.feed(p) for p in ("he", "llo ", "xy", "a lo w")] == [("he", False), ("l", False), ("lo ", False),
                                                                       ("xya ", True)]
    assert text.hit == "lo w"


def test_a_cancelled_generation_ends_even_while_its_text_is_held_back(engine):
    """A stop string that the whole answer is a prefix of holds back every piece, so the consumer never gets a
    turn to stop the generator: the cancel flag ends it before the next token."""
    full, _ = answer(engine, max_tokens=40)
    prompt = engine.tokenizer.encode(engine.tokenizer.render_chat(QUESTION))
    cancel, calls = threading.Event(), 0
    session = engine.open_session(len(prompt) + 40)

    def forward(tokens, start):
        nonlocal calls
        calls += 1
        if calls == 4:  # the prompt, then three tokens: the client leaves
            cancel.set()
        return session.forward(tokens, start)

    stats = GenerationStats()
    params = GenerationParams(max_tokens=40, stop=[full[:200] + "\x00"], cancel=cancel)
    try:
        pieces = list(generate(forward, engine.tokenizer, prompt, params, len(prompt) + 40, stats))
    finally:
        session.close()
    assert stats.generated_tokens == 3 and calls == 4  # the fourth token never drawn
    assert "".join(pieces) == full[:len("".join(pieces))]
