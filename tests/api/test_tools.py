"""Tools with the official clients: through a template that takes them, on a tiny random-weight model whose
calls are forced by the tool's schema (a required call is held to it token by token); and a scripted model
that chooses to call, for what each API makes of a call the model writes freely."""

import json
from typing import Literal

import anthropic
import ollama
import openai
import pytest
import torch
from pydantic import BaseModel, Field

from duskpool.api.service import Service
from duskpool.api.tools import template_call
from duskpool.engine.runner import LocalEngine
from duskpool.engine.tokenizer import render_chat_with_tools
from duskpool.weights.catalog import BUNDLED_NAME
from tests.api.conftest import TOOL_MODEL, live_server

pytestmark = pytest.mark.slow


class WeatherArgs(BaseModel):
    model_config = {"extra": "forbid"}
    city: Literal["Paris", "Tokyo", "Lima"]
    days: int = Field(ge=1, le=7)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather forecast for a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "enum": ["Paris", "Tokyo", "Lima"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "days"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Lima"]}},
                   "required": ["city"], "additionalProperties": False}}}
QUESTION = [{"role": "user", "content": "What will the weather be in Paris?"}]
GREEDY = {"temperature": 0, "max_tokens": 100}


@pytest.fixture(scope="module")
def client(tool_url):
    return openai.OpenAI(base_url=f"{tool_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def claude(tool_url):
    return anthropic.Anthropic(base_url=tool_url, api_key="unused", max_retries=0, timeout=120)


def test_a_required_call_round_trips_call_result_answer(client, tool_engine):
    first = client.chat.completions.create(model=TOOL_MODEL, messages=QUESTION, tools=[WEATHER, CLOCK],
                                           tool_choice="required", **GREEDY)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name in ("get_weather", "get_time")
    if call.function.name == "get_weather":
        WeatherArgs.model_validate_json(call.function.arguments)  # the schema held the random model to it
    else:
        assert json.loads(call.function.arguments)["city"] in ("Paris", "Lima")

    result = '{"forecast": "sunny", "high_c": 24}'
    conversation = QUESTION + [choice.message.model_dump(exclude_none=True),
                               {"role": "tool", "tool_call_id": call.id, "content": result}]
    second = client.chat.completions.create(model=TOOL_MODEL, messages=conversation, tools=[WEATHER, CLOCK],
                                            temperature=0, max_tokens=8)
    # the call and its result went back through the template
    tokenizer = tool_engine.tokenizer
    name, arguments = call.function.name, call.function.arguments
    rendered = render_chat_with_tools(tokenizer, QUESTION + [
        {"role": "assistant", "content": "", "tool_calls": [template_call(name, arguments)]},
        {"role": "tool", "content": result, "name": name}], [WEATHER, CLOCK])
    assert second.usage.prompt_tokens == len(tokenizer.encode(rendered)) > first.usage.prompt_tokens
    assert second.choices[0].finish_reason in ("stop", "length") and second.choices[0].message.content is not None


def test_a_named_call_streams_and_reassembles(client):
    named = {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    whole = client.chat.completions.create(model=TOOL_MODEL, messages=QUESTION, tools=[WEATHER, CLOCK], **named,
                                           **GREEDY).choices[0].message.tool_calls[0]
    chunks = list(client.chat.completions.create(model=TOOL_MODEL, messages=QUESTION, tools=[WEATHER, CLOCK],
                                                 stream=True, **named, **GREEDY))
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].id == whole.id.replace(whole.id, deltas[0].id) and deltas[0].function.name == "get_weather"
    assert len(deltas) > 2, "the arguments came in one piece, not streamed"
    assert "".join(d.function.arguments or "" for d in deltas) == whole.function.arguments
    assert WeatherArgs.model_validate_json(whole.function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # the client's own accumulator
    with client.chat.completions.stream(model=TOOL_MODEL, messages=QUESTION, tools=[WEATHER, CLOCK], **named,
                                        **GREEDY) as stream:
        final = stream.get_final_completion().choices[0].message.tool_calls[0]
    assert (final.function.name, final.function.arguments) == (whole.function.name, whole.function.arguments)


def test_anthropic_tool_use_round_trips_and_streams(claude):
    tools = [{"name": "get_weather", "description": "The weather forecast for a city",
              "input_schema": WEATHER["function"]["parameters"]}]
    ask = {"model": TOOL_MODEL, "max_tokens": 100, "tools": tools, "messages": QUESTION,
           "tool_choice": {"type": "tool", "name": "get_weather"}, "extra_body": {"temperature": 0}}
    message = claude.messages.create(**ask)
    assert message.stop_reason == "tool_use" and message.usage.output_tokens > 0
    [use] = [b for b in message.content if b.type == "tool_use"]
    assert use.id.startswith("toolu_") and use.name == "get_weather"
    WeatherArgs.model_validate(use.input)
    with claude.messages.stream(**ask) as stream:
        kinds = [e.type for e in stream]
        streamed = stream.get_final_message()
    assert "content_block_start" in kinds and kinds.count("input_json") > 2
    assert [(b.name, b.input) for b in streamed.content if b.type == "tool_use"] == [(use.name, use.input)]

    answer = claude.messages.create(**(ask | {"tool_choice": {"type": "auto"}, "max_tokens": 8, "messages": QUESTION + [
        {"role": "assistant", "content": [b.model_dump() for b in message.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny, 24 C"}]}]}))
    assert answer.usage.input_tokens > message.usage.input_tokens
    assert answer.stop_reason in ("end_turn", "max_tokens")


class ScriptedSession:
    """Logits that make the script's next token the likeliest at every decode step."""

    def __init__(self, ids: list[int], vocab: int):
        self.ids, self.vocab, self.step = ids, vocab, 0

    def forward(self, tokens: list[int], start: int) -> torch.Tensor:
        if len(tokens) == 1:  # a decode step, fed the script's last token (prefill chunks come longer here)
            self.step += 1
        logits = torch.zeros(self.vocab)
        logits[self.ids[min(self.step, len(self.ids) - 1)]] = 10.0
        return logits

    def close(self) -> None:
        pass


class ScriptedEngine(LocalEngine):
    """The tiny model's tokenizer and template, saying `script` whatever it is asked."""

    script = ""

    def open_session(self, capacity: int) -> ScriptedSession:
        return ScriptedSession(self.tokenizer.encode(self.script, add_special=False) + [self.tokenizer.eos_id],
                               self.spec.vocab_size)


@pytest.fixture(scope="module")
def scripted(tool_engine, tool_model):
    engine = ScriptedEngine(tool_engine.model, tool_engine.tokenizer, tool_engine.context_length)
    service = Service(engine, TOOL_MODEL, tool_model)
    with live_server(service) as url:
        yield engine, url
    service.close()


CALLS = ('I will look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima", "days": 2}}\n</tool_call>\n'
         '<tool_call>\n{"name": "get_time", "arguments": {"city": "Lima"}}\n</tool_call>')


def test_ollama_tool_calls_whole_in_the_message_and_in_the_stream(scripted):
    engine, url = scripted
    engine.script = CALLS
    client = ollama.Client(host=url, timeout=60)
    whole = client.chat(model=TOOL_MODEL, messages=QUESTION, tools=[WEATHER, CLOCK], options={"temperature": 0})
    calls = [(c.function.name, dict(c.function.arguments)) for c in whole.message.tool_calls]
    assert calls == [("get_weather", {"city": "Lima", "days": 2}), ("get_time", {"city": "Lima"})]
    assert whole.message.content.strip() == "I will look." and whole.done
    parts = list(client.chat(model=TOOL_MODEL, messages=QUESTION, tools=[WEATHER, CLOCK], stream=True))
    streamed = [(c.function.name, dict(c.function.arguments)) for p in parts for c in (p.message.tool_calls or [])]
    assert streamed == calls and "".join(p.message.content for p in parts) == whole.message.content

    engine.script = "Sunny in Lima."
    conversation = QUESTION + [{"role": "assistant", "content": "", "tool_calls": whole.message.tool_calls},
                               {"role": "tool", "content": '{"forecast": "sunny"}', "tool_name": "get_weather"}]
    answer = client.chat(model=TOOL_MODEL, messages=conversation, tools=[WEATHER, CLOCK])
    assert answer.message.content == "Sunny in Lima." and not answer.message.tool_calls
    assert answer.prompt_eval_count > whole.prompt_eval_count
    assert "tools" in client.show(TOOL_MODEL).capabilities


def test_openai_auto_parses_calls_the_model_chose_to_make(scripted):
    engine, url = scripted
    engine.script = CALLS
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    whole = client.chat.completions.create(model=TOOL_MODEL, messages=QUESTION, tools=[WEATHER, CLOCK], temperature=0)
    message = whole.choices[0].message
    assert message.content.strip() == "I will look." and whole.choices[0].finish_reason == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == [
        ("get_weather", {"city": "Lima", "days": 2}), ("get_time", {"city": "Lima"})]
    chunks = list(client.chat.completions.create(model=TOOL_MODEL, messages=QUESTION, tools=[WEATHER, CLOCK],
                                                 temperature=0, stream=True))
    by_index: dict[int, str] = {}
    for d in (d for c in chunks for d in (c.choices[0].delta.tool_calls or [])):
        by_index[d.index] = by_index.get(d.index, "") + (d.function.arguments or "")
    assert [by_index[i] for i in sorted(by_index)] == [c.function.arguments for c in message.tool_calls]


def test_a_model_whose_template_takes_no_tools_is_a_400_naming_it(base_url):
    ask = {"model": BUNDLED_NAME, "messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(openai.BadRequestError, match=BUNDLED_NAME):
        openai.OpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0).chat.completions.create(
            **ask, tools=[WEATHER])
    with pytest.raises(ollama.ResponseError, match="does not support tools") as e:
        ollama.Client(host=base_url).chat(**ask, tools=[WEATHER])
    assert e.value.status_code == 400 and BUNDLED_NAME in str(e.value)
    with pytest.raises(anthropic.BadRequestError, match=BUNDLED_NAME) as e:
        anthropic.Anthropic(base_url=base_url, api_key="x", max_retries=0).messages.create(
            **ask, max_tokens=4, tools=[{"name": "f", "input_schema": {"type": "object"}}])
    assert e.value.body["error"]["type"] == "invalid_request_error"
