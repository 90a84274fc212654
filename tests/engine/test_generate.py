"""The generate loop on the bundled model: stop conditions, seeds, streaming, context bounds, logprobs, grammars."""

import json
import re

import pytest
import torch

from duskpool.engine.generate import GenerationParams, GenerationStats
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
