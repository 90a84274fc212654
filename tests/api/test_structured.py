"""Structured output on the bundled model through a 3-node swarm: the answer is held to a JSON schema token by
token at the gateway, so it always parses and validates (unless max_tokens cuts it: finish_reason "length")."""

import json
from typing import Literal

import httpx
import ollama
import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field

from duskpool.weights.catalog import BUNDLED_NAME

pytestmark = pytest.mark.slow


class Review(BaseModel):
    model_config = ConfigDict(extra="forbid")
    subject: str = Field(max_length=24)
    sentiment: Literal["positive", "negative", "neutral"]
    stars: int = Field(ge=1, le=5)


PROMPTS = [
    "The pizza was cold and the waiter ignored us.", "Best concert of my life, the band was amazing!",
    "The hotel room was clean but small.", "This phone's battery dies before lunch.",
    "A gentle, beautifully shot film about a lighthouse.", "The bus was late again, third time this week.",
    "My new running shoes are light and comfortable.", "The museum's new wing is stunning.",
    "The soup was fine, nothing special.", "Customer support solved my problem in five minutes.",
    "The book's ending made no sense at all.", "Fresh bread, friendly baker, fair prices.",
    "The laptop fan is loud but it is fast.", "Our flight was cancelled with no explanation.",
    "The park is quiet in the mornings.", "This coffee tastes burnt.",
    "The new bridge cut my commute in half.", "The game's story is dull but the music is great.",
    "The dentist was gentle and kind.", "The paint started peeling after a month.",
]


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused-on-loopback", max_retries=0, timeout=120)


def test_json_schema_answers_parse_into_the_model_for_20_prompts(client):
    answers = []
    for prompt in PROMPTS:
        completion = client.chat.completions.parse(
            model=BUNDLED_NAME, response_format=Review, temperature=0, max_tokens=60,
            messages=[{"role": "user", "content": f"Review this as JSON: {prompt}"}])
        choice = completion.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        assert isinstance(choice.message.parsed, Review), choice.message.content
        answers.append(choice.message.parsed)
    assert len({a.subject for a in answers}) > 5, "the prompts were not read"


def test_streamed_json_schema_and_json_mode_parse(client):
    schema = {"name": "review", "schema": Review.model_json_schema()}
    chunks = client.chat.completions.create(
        model=BUNDLED_NAME, temperature=0, max_tokens=60, stream=True,
        response_format={"type": "json_schema", "json_schema": schema},
        messages=[{"role": "user", "content": f"Review this as JSON: {PROMPTS[0]}"}])
    Review.model_validate_json("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))
    mode = client.chat.completions.create(
        model=BUNDLED_NAME, temperature=0, max_tokens=200, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "Describe a cat as a JSON object with two keys."}]).choices[0]
    if mode.finish_reason == "stop":
        assert isinstance(json.loads(mode.message.content), dict)
    else:  # cut by max_tokens: still the start of one object
        assert mode.message.content.startswith("{")


def test_ollama_format_schema_and_json(base_url):
    client = ollama.Client(host=base_url, timeout=120)
    options = {"temperature": 0, "num_predict": 60, "repeat_penalty": 1.0}
    chat = client.chat(model=BUNDLED_NAME, format=Review.model_json_schema(), options=options,
                       messages=[{"role": "user", "content": f"Review this as JSON: {PROMPTS[1]}"}])
    assert chat.done_reason == "stop"
    Review.model_validate_json(chat.message.content)
    parts = list(client.generate(model=BUNDLED_NAME, prompt=f"Review this as JSON: {PROMPTS[2]}", stream=True,
                                 format=Review.model_json_schema(), options=options))
    Review.model_validate_json("".join(p.response for p in parts))


def test_a_schema_that_cannot_be_used_is_a_400_and_the_mask_cost_is_measured(base_url):
    ask = {"model": BUNDLED_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    bad = httpx.post(f"{base_url}/v1/chat/completions", timeout=60, json=ask | {
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}})
    assert bad.status_code == 400 and "schema" in bad.json()["error"]["message"]
    missing = httpx.post(f"{base_url}/v1/chat/completions", timeout=60,
                         json=ask | {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}})
    assert missing.status_code == 400
    metrics = httpx.get(f"{base_url}/metrics", timeout=60).text
    count = next(line for line in metrics.splitlines() if line.startswith("duskpool_grammar_mask_seconds_count"))
    assert float(count.split()[-1]) > 0
