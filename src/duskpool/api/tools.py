"""Tools: their definitions go to the model through its chat template, when the template takes them, and
the calls the model writes are parsed out of its text as it streams.

Two ways of writing a call cover the common templates:
- tagged (Qwen 2.5/3, Hermes, SmolLM3): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, as
  many as it makes, anywhere in the answer;
- bare JSON (Llama 3.1+, whose `<|python_tag|>` is a control token, and Mistral, whose `[TOOL_CALLS]` is one:
  both are dropped from the text): the whole answer is `{"name": ..., "parameters": {...}}` or a list of them.

Each API turns the parser's events into its own stream: OpenAI's `tool_calls` deltas (the arguments' JSON
in fragments), Ollama's `message.tool_calls` (each call whole, once it is complete), Anthropic's `tool_use`
blocks (`input_json_delta` fragments).
"""

import json
import re
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import jinja2
import jinja2.meta
from jinja2.ext import loopcontrols

from duskpool.engine.generate import TokenLogprob
from duskpool.engine.grammar import JSON_OPTIONS, Grammar, Vocabulary


@dataclass(frozen=True)
class ToolFormat:
    name: str
    open: str  # what starts a call in the text ("" for bare JSON: the whole answer is the call)
    close: str
    arguments: str  # the key the template gives the arguments under


TAGGED = ToolFormat("tagged", "<tool_call>", "</tool_call>", "arguments")
LLAMA3 = ToolFormat("llama3", "", "", "parameters")
MISTRAL = ToolFormat("mistral", "", "", "arguments")


def takes_tools(template: str | None) -> bool:
    """Whether a chat template reads a `tools` variable (as transformers passes tool definitions)."""
    if not template:
        return False
    try:
        ast = jinja2.Environment(extensions=[loopcontrols]).parse(template)
    except jinja2.TemplateError:  # a tag of its own ({% generation %}): read the text instead
        return re.search(r"\btools\b", template) is not None
    return "tools" in jinja2.meta.find_undeclared_variables(ast)


def tool_format(template: str | None) -> ToolFormat | None:
    """How the model a template belongs to writes its calls; None when the template takes no tools."""
    if not takes_tools(template):
        return None
    if "<tool_call>" in template:
        return TAGGED
    if "[TOOL_CALLS]" in template:
        return MISTRAL
    return LLAMA3


def template_call(name: str, arguments: Any) -> dict:
    """A call in an assistant message as chat templates read it (transformers' shape: arguments as an object)."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            pass  # left as text: the template shows it as it is
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def call_grammar(vocabulary: Vocabulary, fmt: ToolFormat, tools: list[dict]) -> Grammar:
    """Text that is exactly one call of one of `tools` (OpenAI's shape), its arguments valid under the tool's
    schema: what a required call (tool_choice "required" or a named function) is held to."""
    def one(tool: dict) -> dict:
        function = tool.get("function", {})
        return {"type": "object", "properties": {"name": {"const": function.get("name", "")},
                                                 fmt.arguments: function.get("parameters") or {"type": "object"}},
                "required": ["name", fmt.arguments], "additionalProperties": False}

    schemas = [one(t) for t in tools]
    schema = json.dumps((schemas[0] if len(schemas) == 1 else {"anyOf": schemas}) | {"x-guidance": JSON_OPTIONS})
    if fmt is TAGGED:
        body = f'{vocabulary.literal(fmt.open)} "\\n" %json {schema} "\\n" {vocabulary.literal(fmt.close)}'
    elif fmt is MISTRAL:
        marker = vocabulary.literal("[TOOL_CALLS]")
        body = (marker if marker.startswith("<[") else "") + f' "[" %json {schema} "]"'
    else:
        body = f"%json {schema}"
    return vocabulary.lark(f"start: {body}\n")


# --- the model's text -> events ---------------------------------------------------------------------
@dataclass
class Text:
    text: str
    tokens: tuple[TokenLogprob, ...] = ()


@dataclass
class CallStart:
    index: int
    id: str
    name: str


@dataclass
class CallArgs:
    index: int
    json: str  # the next fragment of the arguments' JSON text


@dataclass
class CallEnd:
    index: int
    arguments: Any  # the arguments parsed (None when the model's JSON does not parse)


Event = Text | CallStart | CallArgs | CallEnd
HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')


def _held(text: str, marker: str) -> int:
    """How many characters at the end of `text` could begin `marker`."""
    return max((n for n in range(1, len(marker)) if text.endswith(marker[:n])), default=0)


def _as_calls(value: Any) -> list[tuple[str, Any]] | None:
    """[(name, arguments)] when `value` is a call or a list of calls, else None."""
    values = value if isinstance(value, list) else [value]
    calls = []
    for v in values:
        if not (isinstance(v, dict) and isinstance(v.get("name"), str)):
            return None
        arguments = v.get("arguments", v.get("parameters", {}))
        calls.append((v["name"], arguments))
    return calls or None


@dataclass
class CallParser:
    """Feeds the answer's text through, turning calls into events; `feed` and `finish` return what is ready.

    A tagged call streams its arguments as they come: everything after `"arguments": ` except what could
    still be the closing brace of the call's object or the closing tag."""

    fmt: ToolFormat
    new_id: Callable[[], str] = field(default=lambda: f"call_{uuid.uuid4().hex[:24]}")
    calls: int = 0
    _state: str = "text"  # text | head (in a tag, before the arguments) | args | bare (the answer may be JSON)
    _buffer: str = ""
    _sent: int = 0  # of the arguments, in the args state
    _decided: bool = False  # bare JSON: whether the answer's first character has been seen

    def feed(self, text: str, tokens: tuple[TokenLogprob, ...] = ()) -> list[Event]:
        self._buffer += text
        events = self._bare(final=False) if not self.fmt.open else self._tagged(final=False)
        if tokens:  # a token's logprob goes with text when there is any; a call's tokens have none to go with
            texts = [e for e in events if isinstance(e, Text)]
            if texts:
                texts[0].tokens = tokens
        return events

    def finish(self) -> list[Event]:
        return self._bare(final=True) if not self.fmt.open else self._tagged(final=True)

    def _start(self, name: str) -> CallStart:
        self.calls += 1
        return CallStart(self.calls - 1, self.new_id(), name)

    def _whole(self, calls: list[tuple[str, Any]]) -> list[Event]:
        events: list[Event] = []
        for name, arguments in calls:
            start = self._start(name)
            events += [start, CallArgs(start.index, json.dumps(arguments, ensure_ascii=False)),
                       CallEnd(start.index, arguments)]
        return events

    def _bare(self, final: bool) -> list[Event]:
        if not self._decided:
            stripped = self._buffer.lstrip()
            if not stripped:
                return [Text(self._buffer)] if final and self._buffer else []
            self._decided, self._state = True, "bare" if stripped[0] in "{[" else "text"
        if self._state == "text":
            text, self._buffer = self._buffer, ""
            return [Text(text)] if text else []
        if not final:
            return []
        text, self._buffer = self._buffer, ""
        try:
            calls = _as_calls(json.loads(text))
        except json.JSONDecodeError:
            calls = None
        return self._whole(calls) if calls else [Text(text)]

    def _tagged(self, final: bool) -> list[Event]:
        open_, close = self.fmt.open, self.fmt.close
        events: list[Event] = []
        while True:
            if self._state == "text":
                at = self._buffer.find(open_)
                if at < 0:
                    cut = len(self._buffer) - (0 if final else _held(self._buffer, open_))
                    text, self._buffer = self._buffer[:cut], self._buffer[cut:]
                    return events + ([Text(text)] if text else [])
                if at:
                    events.append(Text(self._buffer[:at]))
                self._buffer, self._state = self._buffer[at + len(open_):], "head"
            elif self._state == "head":
                end = self._buffer.find(close)
                head = HEAD.match(self._buffer)
                # the head is taken once the arguments have begun (so the space before them is not theirs)
                if head and head.end() < len(self._buffer) and (end < 0 or head.end() <= end):
                    events.append(self._start(json.loads(f'"{head.group(1)}"')))
                    self._buffer, self._sent, self._state = self._buffer[head.end():], 0, "args"
                elif end >= 0 or final:  # no streamable head: the block parsed whole, or kept as text
                    block = self._buffer[:end] if end >= 0 else self._buffer
                    self._buffer = self._buffer[end + len(close):] if end >= 0 else ""
                    self._state = "text"
                    try:
                        calls = _as_calls(json.loads(block))
                    except json.JSONDecodeError:
                        calls = None
                    events += self._whole(calls) if calls else [Text(open_ + block + (close if end >= 0 else ""))]
                    if end < 0:
                        return events
                else:
                    return events
            else:  # args
                end = self._buffer.find(close)
                if end < 0 and not final:
                    args = self._buffer
                    safe = len(args) - _held(args, close)
                    safe = len(args[:safe].rstrip().rstrip("}").rstrip())  # maybe the call object's own brace
                    safe = max(safe, self._sent)
                    if safe > self._sent:
                        events.append(CallArgs(self.calls - 1, args[self._sent:safe]))
                        self._sent = safe
                    return events
                args = self._buffer[:end] if end >= 0 else self._buffer
                self._buffer = self._buffer[end + len(close):] if end >= 0 else ""
                raw = args.rstrip()
                raw = raw[:-1].rstrip() if raw.endswith("}") else raw  # the call object's closing brace
                if len(raw) > self._sent:
                    events.append(CallArgs(self.calls - 1, raw[self._sent:]))
                try:
                    arguments = json.loads(raw)
                except json.JSONDecodeError:
                    arguments = None
                events.append(CallEnd(self.calls - 1, arguments))
                self._state = "text"
                if end < 0:
                    return events


@dataclass
class Call:
    id: str
    name: str
    arguments: str  # the JSON text, as streamed
    parsed: Any = None


@dataclass
class Answer:
    """A whole answer, gathered from the events: its text, its tokens' logprobs and its calls."""

    text: str = ""
    tokens: list[TokenLogprob] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)

    def add(self, events: Iterable[Event]) -> None:
        for e in events:
            if isinstance(e, Text):
                self.text += e.text
                self.tokens += e.tokens
            elif isinstance(e, CallStart):
                self.calls.append(Call(e.id, e.name, ""))
            elif isinstance(e, CallArgs):
                self.calls[e.index].arguments += e.json
            else:
                self.calls[e.index].parsed = e.arguments


__all__ = ["LLAMA3", "MISTRAL", "TAGGED", "Answer", "Call", "CallArgs", "CallEnd", "CallParser", "CallStart",
           "Event", "Text", "ToolFormat", "call_grammar", "takes_tools", "template_call", "tool_format"]
