"""The tool-call parser on text as models write it, fed whole and in every split: the same calls and text."""

import json

import pytest

from duskpool.api.tools import (
    LLAMA3,
    MISTRAL,
    TAGGED,
    Answer,
    CallArgs,
    CallParser,
    CallStart,
    Text,
    takes_tools,
    tool_format,
)
from tests.api.conftest import TOOL_TEMPLATE


def parse(fmt, text: str, chunk: int | None = None) -> Answer:
    parser, answer = CallParser(fmt), Answer()
    size = chunk or len(text) or 1
    for i in range(0, len(text), size):
        answer.add(parser.feed(text[i:i + size]))
    answer.add(parser.finish())
    return answer


TAGGED_TEXT = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "when": {"day": 2}}}'
               '\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')


@pytest.mark.parametrize("chunk", [None, 1, 2, 3, 5, 7, 13])
def test_tagged_calls_reassemble_in_any_split(chunk):
    answer = parse(TAGGED, TAGGED_TEXT, chunk)
    assert answer.text.strip() == "Let me check."
    assert [(c.name, json.loads(c.arguments), c.parsed) for c in answer.calls] == [
        ("get_weather", {"city": "Paris", "when": {"day": 2}}, {"city": "Paris", "when": {"day": 2}}),
        ("get_time", {}, {})]
    assert len({c.id for c in answer.calls}) == 2
    assert answer.calls[0].arguments == '{"city": "Paris", "when": {"day": 2}}', "the JSON text as the model wrote it"


def test_tagged_arguments_stream_before_the_call_ends():
    parser = CallParser(TAGGED)
    events = parser.feed('<tool_call>\n{"name": "f", "arguments": {"a": "long text')
    assert isinstance(events[0], CallStart) and events[0].name == "f"
    assert "".join(e.json for e in events if isinstance(e, CallArgs)) == '{"a": "long text'
    held = parser.feed('"}}\n</tool_')  # the call's own brace and a partial tag are held back until known
    assert "".join(e.json for e in held if isinstance(e, CallArgs)) == '"'
    assert parser.feed("call>")[-1].arguments == {"a": "long text"}


def test_text_that_only_looks_like_a_tag_is_text():
    assert parse(TAGGED, "a <tool_cal b < c", 1).text == "a <tool_cal b < c"
    broken = parse(TAGGED, "<tool_call>not json</tool_call> after", 3)
    assert broken.calls == [] and broken.text == "<tool_call>not json</tool_call> after"


def test_a_call_whose_keys_come_in_another_order_is_still_a_call():
    answer = parse(TAGGED, '<tool_call>{"arguments": {"x": 1}, "name": "g"}</tool_call>', 4)
    assert [(c.name, c.parsed) for c in answer.calls] == [("g", {"x": 1})]


def test_an_unclosed_call_at_the_end_is_completed():
    answer = parse(TAGGED, '<tool_call>\n{"name": "f", "arguments": {"x": [1, 2]}}', 5)
    assert [(c.name, c.parsed) for c in answer.calls] == [("f", {"x": [1, 2]})]


@pytest.mark.parametrize("fmt, text, calls", [
    (LLAMA3, '{"name": "get_weather", "parameters": {"city": "Lima"}}', [("get_weather", {"city": "Lima"})]),
    (MISTRAL, '[{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"y": 2}}]', [("a", {}), ("b", {"y": 2})]),
    (LLAMA3, "The weather is fine.", []),
    (LLAMA3, '{"not": "a call"}', []),
])
def test_bare_json_calls(fmt, text, calls):
    answer = parse(fmt, text, 4)
    assert [(c.name, c.parsed) for c in answer.calls] == calls
    assert answer.text == ("" if calls else text)


def test_text_goes_out_as_it_comes_when_it_is_no_call():
    parser = CallParser(LLAMA3)
    assert parser.feed("Hello") == [Text("Hello")]


def test_templates_that_take_tools_are_known_by_their_variables():
    assert takes_tools(TOOL_TEMPLATE) and tool_format(TOOL_TEMPLATE) is TAGGED
    chatml = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    assert not takes_tools(chatml) and tool_format(chatml) is None and tool_format(None) is None
    llama3 = "{% if tools %}{{ tools | tojson }}{% endif %}<|start_header_id|>{{ '<|python_tag|>' }}"
    assert tool_format(llama3) is LLAMA3
    assert tool_format("{% for t in tools %}[AVAILABLE_TOOLS]{% endfor %}[TOOL_CALLS]") is MISTRAL
