"""Anthropic's Messages API with the official `anthropic` client: the same greedy text as OpenAI's chat for
the same request, its streaming events, stop sequences, usage, errors in its shape, and `x-api-key`."""

import anthropic
import httpx
import openai
import pytest

from duskpool.api.server import key_checker
from duskpool.api.service import Service
from duskpool.weights.catalog import BUNDLED_NAME
from tests.api.conftest import TOOL_MODEL, live_server

pytestmark = pytest.mark.slow

SYSTEM = "You are a terse assistant."
QUESTION = [{"role": "user", "content": "Name three colors of the rainbow."}]
GREEDY = {"extra_body": {"temperature": 0}}  # the client no longer sends sampling parameters; the API takes them


@pytest.fixture(scope="module")
def claude(base_url):
    return anthropic.Anthropic(base_url=base_url, api_key="unused-on-loopback", max_retries=0, timeout=60)


def test_messages_text_equals_openai_chat_text(claude, base_url):
    message = claude.messages.create(model=BUNDLED_NAME, max_tokens=24, system=SYSTEM, messages=QUESTION, **GREEDY)
    chat = openai.OpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0).chat.completions.create(
        model=BUNDLED_NAME, max_tokens=24, temperature=0, messages=[{"role": "system", "content": SYSTEM}] + QUESTION)
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].text == chat.choices[0].message.content
    assert message.usage.input_tokens == chat.usage.prompt_tokens
    assert message.usage.output_tokens == chat.usage.completion_tokens
    assert message.stop_reason == {"length": "max_tokens", "stop": "end_turn"}[chat.choices[0].finish_reason]

    with claude.messages.stream(model=BUNDLED_NAME, max_tokens=24, system=SYSTEM, messages=QUESTION,
                                **GREEDY) as stream:
        events = [e.type for e in stream]
        streamed = stream.get_final_message()
    assert streamed.content[0].text == message.content[0].text and streamed.usage.output_tokens == 24 or \
        streamed.stop_reason == "end_turn"
    assert events[0] == "message_start" and events[-1] == "message_stop"
    assert {"content_block_start", "content_block_delta", "content_block_stop", "message_delta"} <= set(events)


def test_stop_sequences_and_token_counting(claude):
    whole = claude.messages.create(model=BUNDLED_NAME, max_tokens=40, messages=QUESTION, **GREEDY).content[0].text
    stop = whole.split()[2]
    cut = claude.messages.create(model=BUNDLED_NAME, max_tokens=40, messages=QUESTION,
                                 stop_sequences=["never-said", stop], **GREEDY)
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    assert cut.content[0].text == whole[:whole.index(stop)]
    counted = claude.messages.count_tokens(model=BUNDLED_NAME, messages=QUESTION)
    assert counted.input_tokens == cut.usage.input_tokens


def test_errors_come_in_anthropics_shape(claude, base_url):
    with pytest.raises(anthropic.NotFoundError) as e:
        claude.messages.create(model="claude-opus-4", max_tokens=4, messages=QUESTION)
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "not_found_error"
    for body in ({"model": BUNDLED_NAME, "messages": QUESTION},  # no max_tokens
                 {"model": BUNDLED_NAME, "max_tokens": 4, "messages": [{"role": "user", "content": [
                     {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": ""}}]}]}):
        answer = httpx.post(f"{base_url}/v1/messages", json=body, timeout=60)
        assert answer.status_code == 400, answer.text
        assert answer.json()["type"] == "error" and answer.json()["error"]["type"] == "invalid_request_error"


def test_x_api_key_is_accepted_as_the_key(tool_engine, tool_model):
    service = Service(tool_engine, TOOL_MODEL, tool_model)
    with live_server(service, check_key=key_checker(["s3cret"])) as url:
        ask = {"model": TOOL_MODEL, "max_tokens": 2, "messages": QUESTION}
        assert anthropic.Anthropic(base_url=url, api_key="s3cret", max_retries=0).messages.create(**ask).content
        with pytest.raises(anthropic.AuthenticationError) as e:
            anthropic.Anthropic(base_url=url, api_key="wrong", max_retries=0).messages.create(**ask)
        assert e.value.body["error"]["type"] == "authentication_error"
        assert httpx.get(f"{url}/v1/models", headers={"x-api-key": "s3cret"}).status_code == 200
    service.close()
