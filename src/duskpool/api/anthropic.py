"""Anthropic's Messages API: /v1/messages (and /v1/messages/count_tokens), as the official `anthropic` client
and coding agents call it: system prompts, stop sequences, tool use, usage, its streaming events, and errors
in its shape (`{"type": "error", "error": {"type", "message"}}`, written by the server's `error_response`).
The key may come as `x-api-key`, as Anthropic's clients send it."""

import json
import uuid
from collections.abc import AsyncIterator, Iterable
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from duskpool.api.service import RequestError, Service, collect
from duskpool.api.tools import (
    Answer,
    CallArgs,
    CallEnd,
    CallParser,
    CallStart,
    Event,
    Text,
    call_grammar,
    template_call,
)
from duskpool.engine.generate import GenerationParams, GenerationStats
from duskpool.engine.sampling import SamplingParams


class ErrorDetail(BaseModel):
    type: str
    message: str


class AnthropicError(BaseModel):
    """What every error under /v1/messages looks like."""

    type: Literal["error"] = "error"
    error: ErrorDetail


router = APIRouter(prefix="/v1", responses={
    "4XX": {"model": AnthropicError, "description": "a request the server cannot serve as asked"}})
GENERATES = {
    200: {"content": {"text/event-stream": {}},
          "description": "a message, or with `stream`, server-sent events from message_start to message_stop"},
    503: {"model": AnthropicError,
          "description": "the pool cannot serve now (a node is lost, or no slot freed in time)"}}


class TextBlock(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"] = "text"
    text: str


class Block(BaseModel):
    """A content block: text, tool_use (the assistant's call) or tool_result (the user's answer to one)."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None
    id: str | None = None
    name: str | None = None
    input: dict[str, Any] | None = None
    tool_use_id: str | None = None
    content: str | list[dict[str, Any]] | None = None
    is_error: bool | None = None


class MessageParam(BaseModel):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class ToolParam(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    description: str | None = None
    input_schema: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})


class ToolChoice(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None


class OutputFormat(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(..., alias="schema", description="the JSON Schema the answer must meet")


class OutputConfig(BaseModel):
    model_config = ConfigDict(extra="allow")
    format: OutputFormat | None = None


class MessagesRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int = Field(..., ge=1)
    messages: list[MessageParam]
    system: str | list[TextBlock] | None = None
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float = Field(1.0, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    tools: list[ToolParam] | None = None
    tool_choice: ToolChoice | None = None
    output_config: OutputConfig | None = None


class CountRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[MessageParam]
    system: str | list[TextBlock] | None = None
    tools: list[ToolParam] | None = None


def _result_text(content: str | list[dict] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if any(part.get("type") != "text" or not isinstance(part.get("text"), str) for part in content):
        raise RequestError(400, "only text is supported in a tool_result's content", "invalid_request")
    return "".join(part["text"] for part in content)


def _template_messages(body: MessagesRequest | CountRequest) -> list[dict]:
    """The conversation as chat templates read it: the system prompt first, tool_use blocks as the assistant's
    tool calls, each tool_result as a `tool` message."""
    system = body.system if isinstance(body.system, str) or body.system is None else \
        "".join(b.text for b in body.system)
    flat = [{"role": "system", "content": system}] if system else []
    names: dict[str, str] = {}
    for m in body.messages:
        if isinstance(m.content, str):
            flat.append({"role": m.role, "content": m.content})
            continue
        texts, calls, results = [], [], []
        for block in m.content:
            if block.type == "text" and isinstance(block.text, str):
                texts.append(block.text)
            elif block.type == "tool_use" and m.role == "assistant" and block.id and block.name:
                calls.append(template_call(block.name, block.input or {}) | {"id": block.id})
                names[block.id] = block.name
            elif block.type == "tool_result" and m.role == "user" and block.tool_use_id:
                results.append({"role": "tool", "content": _result_text(block.content),
                                "tool_call_id": block.tool_use_id} |
                               ({"name": names[block.tool_use_id]} if block.tool_use_id in names else {}))
            elif block.type not in ("thinking", "redacted_thinking"):
                raise RequestError(400, f"a {m.role} message cannot hold a {block.type!r} block here "
                                   "(text, tool_use and tool_result are supported)", "invalid_request")
        flat += results
        if texts or calls or not results:
            flat.append({"role": m.role, "content": "".join(texts)} | ({"tool_calls": calls} if calls else {}))
    return flat


def _tools(tools: list[ToolParam] | None) -> list[dict] | None:
    """Anthropic's tools in OpenAI's shape (what chat templates take)."""
    if not tools:
        return None
    return [{"type": "function", "function": {"name": t.name, "parameters": t.input_schema} |
             ({"description": t.description} if t.description else {})} for t in tools]


def _event(kind: str, data: dict) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind} | data)}\n\n"


def _stop_reason(stats: GenerationStats, calls: bool) -> str:
    if calls:
        return "tool_use"
    if stats.stop_string is not None:
        return "stop_sequence"
    return "max_tokens" if stats.finish_reason == "length" else "end_turn"


def _new_id() -> str:
    return f"toolu_{uuid.uuid4().hex[:24]}"


@router.post("/messages", responses=GENERATES)
async def messages(request: Request, body: MessagesRequest):
    service: Service = request.app.state.service
    service.check_model(body.model)
    if not body.messages:
        raise RequestError(400, "messages: at least one message is required", "invalid_request")
    choice = body.tool_choice.type if body.tool_choice else "auto"
    tools = _tools(body.tools) if choice != "none" else None
    fmt = service.tool_format() if tools else None
    prompt = service.chat_prompt(_template_messages(body), tools)
    grammar = None
    if tools and choice in ("any", "tool"):
        chosen = [t for t in tools if choice == "any" or t["function"]["name"] == body.tool_choice.name]
        if not chosen:
            raise RequestError(400, f"tool_choice names {body.tool_choice.name!r}, which is not among the tools",
                               "invalid_request")
        grammar = await service.grammar(lambda vocabulary: call_grammar(vocabulary, fmt, chosen))
    elif body.output_config is not None and body.output_config.format is not None:
        schema = body.output_config.format.schema_
        grammar = await service.grammar(lambda vocabulary: vocabulary.json_schema(schema))
    budget = service.budget(prompt, body.max_tokens, strict=False)
    sampling = SamplingParams(temperature=body.temperature, top_p=body.top_p or 1.0, top_k=body.top_k or 0)
    params = GenerationParams(max_tokens=budget, stop=list(body.stop_sequences or []), sampling=sampling,
                              grammar=grammar)
    stats = GenerationStats()
    pieces = await service.start(prompt, params, "anthropic messages", stats)
    parser = CallParser(fmt, new_id=_new_id) if fmt is not None else None
    message_id = f"msg_{uuid.uuid4().hex[:24]}"

    def events(piece: str) -> list[Event]:
        return parser.feed(piece) if parser is not None else [Text(piece)]

    def usage() -> dict:
        return {"input_tokens": stats.prompt_tokens, "output_tokens": stats.generated_tokens}

    if not body.stream:
        answer = Answer()
        answer.add(events(await collect(request, pieces)) + (parser.finish() if parser is not None else []))
        content = [{"type": "text", "text": answer.text}] if answer.text or not answer.calls else []
        content += [{"type": "tool_use", "id": c.id, "name": c.name,
                     "input": c.parsed if isinstance(c.parsed, dict) else {}} for c in answer.calls]
        return {"id": message_id, "type": "message", "role": "assistant", "model": body.model, "content": content,
                "stop_reason": _stop_reason(stats, bool(answer.calls)), "stop_sequence": stats.stop_string,
                "usage": usage()}

    blocks = {"open": None, "count": 0, "calls": False}  # the open block's kind, blocks so far

    def block_events(events: Iterable[Event]) -> Iterable[str]:
        for event in events:
            if isinstance(event, Text):
                if not event.text:
                    continue
                if blocks["open"] != "text":
                    yield from close_block()
                    yield _event("content_block_start", {"index": blocks["count"],
                                                         "content_block": {"type": "text", "text": ""}})
                    blocks["open"] = "text"
                yield _event("content_block_delta", {"index": blocks["count"],
                                                     "delta": {"type": "text_delta", "text": event.text}})
            elif isinstance(event, CallStart):
                yield from close_block()
                blocks["open"], blocks["calls"] = "tool_use", True
                yield _event("content_block_start", {"index": blocks["count"], "content_block": {
                    "type": "tool_use", "id": event.id, "name": event.name, "input": {}}})
            elif isinstance(event, CallArgs):
                yield _event("content_block_delta", {"index": blocks["count"],
                                                     "delta": {"type": "input_json_delta", "partial_json": event.json}})
            elif isinstance(event, CallEnd):
                yield from close_block()

    def close_block() -> Iterable[str]:
        if blocks["open"] is not None:
            yield _event("content_block_stop", {"index": blocks["count"]})
            blocks["open"] = None
            blocks["count"] += 1

    async def stream() -> AsyncIterator[str]:
        yield _event("message_start", {"message": {
            "id": message_id, "type": "message", "role": "assistant", "model": body.model, "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": stats.prompt_tokens, "output_tokens": 0}}})
        yield _event("ping", {})
        try:
            async for piece in pieces:
                for line in block_events(events(piece)):
                    yield line
            for line in block_events(parser.finish() if parser is not None else []):
                yield line
        except Exception as e:  # noqa: BLE001 - the status line is long sent: the error goes in the stream
            yield _event("error", {"error": {"type": "api_error", "message": str(e)}})
            return
        if blocks["count"] == 0 and blocks["open"] is None:  # an empty answer is still one (empty) text block
            yield _event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
            blocks["open"] = "text"
        for line in close_block():
            yield line
        yield _event("message_delta", {"delta": {"stop_reason": _stop_reason(stats, blocks["calls"]),
                                                 "stop_sequence": stats.stop_string},
                                       "usage": {"output_tokens": stats.generated_tokens}})
        yield _event("message_stop", {})

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.post("/messages/count_tokens")
async def count_tokens(request: Request, body: CountRequest):
    service: Service = request.app.state.service
    service.check_model(body.model)
    return {"input_tokens": len(service.chat_prompt(_template_messages(body), _tools(body.tools)))}
