"""OpenAI's API: /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models, as the official clients
call them: with logprobs, structured output (`response_format`) and tools."""

import base64
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from duskpool.api.service import RequestError, Service, collect, embedding_list
from duskpool.api.tools import (
    Answer,
    Call,
    CallArgs,
    CallParser,
    CallStart,
    Event,
    Text,
    ToolFormat,
    call_grammar,
    template_call,
)
from duskpool.engine.generate import GenerationParams, GenerationStats, TokenLogprob
from duskpool.engine.grammar import Grammar, Vocabulary
from duskpool.engine.sampling import SamplingParams

SEED = Field(None, ge=-(2**63), lt=2**63)


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: str | None
    param: str | None = None


class OpenAIError(BaseModel):
    """What every error under /v1 looks like (as the server's `error_response` writes it)."""

    error: ErrorDetail


router = APIRouter(prefix="/v1", responses={
    "4XX": {"model": OpenAIError, "description": "a request the server cannot serve as asked"}})
GENERATES = {  # what the generating endpoints add to the document
    200: {"content": {"text/event-stream": {}},
          "description": "a JSON object, or with `stream`, server-sent events ending in `data: [DONE]`"},
    503: {"model": OpenAIError, "description": "the pool cannot serve now (a node is lost, or no slot freed in time)"}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="the JSON Schema the answer must meet")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """`text`, `json_object` (any JSON object) or `json_schema`: the answer is held to it token by token."""

    model_config = ConfigDict(extra="allow")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionDef


class FunctionName(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionName


class FunctionCall(BaseModel):
    name: str
    arguments: str = ""


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Sampling(BaseModel):
    """What chat and text completions share. Unknown fields are accepted and ignored, as OpenAI-compatible
    servers do (clients send many we have no use for)."""

    model_config = ConfigDict(extra="allow")
    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = SEED
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1, description="only one choice per request")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class ChatRequest(Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(Sampling):
    prompt: str | list[str]
    max_tokens: int | None = 16  # OpenAI's default for the legacy endpoint
    logprobs: int | None = Field(None, ge=0, le=5)


def _params(body: Sampling, max_tokens: int, logprobs: int | None = None,
            grammar: Grammar | None = None) -> GenerationParams:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return GenerationParams(max_tokens=max_tokens, stop=stop, logprobs=logprobs, grammar=grammar,
                            sampling=SamplingParams(temperature=body.temperature, top_p=body.top_p, seed=body.seed))


def _usage(stats: GenerationStats) -> dict:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.generated_tokens,
            "total_tokens": stats.prompt_tokens + stats.generated_tokens}


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def token_text(vocabulary: Vocabulary, token: int) -> tuple[str, bytes]:
    """A token as OpenAI shows it: its text, or `bytes:\\x..` for part of a character; and its bytes."""
    raw = vocabulary.token_bytes(token)
    try:
        return raw.decode(), raw
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), raw


def _logprob(value: float) -> float:
    return max(value, -9999.0)  # OpenAI's "very unlikely"; JSON has no -inf


def chat_logprobs(vocabulary: Vocabulary, tokens: Iterable[TokenLogprob]) -> dict:
    def entry(token: int, logprob: float) -> dict:
        text, raw = token_text(vocabulary, token)
        return {"token": text, "logprob": _logprob(logprob), "bytes": list(raw)}

    return {"content": [entry(t.token, t.logprob) | {"top_logprobs": [entry(i, lp) for i, lp in t.top]}
                        for t in tokens], "refusal": None}


def _completion_logprobs(vocabulary: Vocabulary, tokens: Iterable[TokenLogprob], offset: int) -> dict:
    result = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for t in tokens:
        text = token_text(vocabulary, t.token)[0]
        result["tokens"].append(text)
        result["token_logprobs"].append(_logprob(t.logprob))
        result["top_logprobs"].append({token_text(vocabulary, i)[0]: _logprob(lp) for i, lp in t.top})
        result["text_offset"].append(offset)
        offset += len(text)
    return result


def _events(parser: CallParser | None, piece: str) -> list[Event]:
    tokens = getattr(piece, "tokens", ())
    return parser.feed(piece, tokens) if parser is not None else [Text(piece, tokens)]


def _tool_call(call: Call) -> dict:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def _finish(stats: GenerationStats, calls: bool) -> str:
    return "tool_calls" if calls else stats.finish_reason


async def _respond(request: Request, body: Sampling, prompt: list[int], max_tokens: int | None, kind: str,
                   logprobs: int | None = None, grammar: Grammar | None = None, parser: CallParser | None = None):
    """Generate, then answer as one JSON object or as server-sent events (chat or text completions)."""
    service: Service = request.app.state.service
    service.check_model(body.model)
    budget = service.budget(prompt, max_tokens, strict=True)
    vocabulary = await service.vocabulary() if logprobs is not None else None
    stats = GenerationStats()
    pieces = await service.start(prompt, _params(body, budget, logprobs, grammar), f"openai {kind}", stats)
    chat = kind == "chat"
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": body.model, "system_fingerprint": f"duskpool-{service.model_name}"}

    def logprobs_of(tokens: Iterable[TokenLogprob], offset: int = 0) -> dict | None:
        if vocabulary is None:
            return None
        return chat_logprobs(vocabulary, tokens) if chat else _completion_logprobs(vocabulary, tokens, offset)

    if not body.stream:
        answer = Answer()
        whole = await collect(request, pieces)
        answer.add(_events(parser, whole) + (parser.finish() if parser is not None else []))
        finish = _finish(stats, bool(answer.calls))
        if chat:
            message = {"role": "assistant", "content": answer.text if answer.text or not answer.calls else None}
            if answer.calls:
                message["tool_calls"] = [_tool_call(c) for c in answer.calls]
            choice = {"index": 0, "message": message, "logprobs": logprobs_of(answer.tokens), "finish_reason": finish}
        else:
            choice = {"index": 0, "text": answer.text, "logprobs": logprobs_of(answer.tokens), "finish_reason": finish}
        return head | {"choices": [choice], "usage": _usage(stats)}

    chunk_head = head | {"object": "chat.completion.chunk" if chat else "text_completion"}

    def chunk(delta: dict, first: bool, logprobs: dict | None = None, finish: str | None = None) -> str:
        if chat:
            choice = {"index": 0, "delta": ({"role": "assistant"} if first else {}) | delta, "logprobs": logprobs}
        else:
            choice = {"index": 0, "text": delta.get("content", ""), "logprobs": logprobs}
        return _sse(chunk_head | {"choices": [choice | {"finish_reason": finish}]})

    sent = {"any": False, "calls": False, "offset": 0}

    def chunks(events: list[Event]) -> Iterator[str]:
        for event in events:
            first = not sent["any"]
            if isinstance(event, Text):
                yield chunk({"content": event.text}, first, logprobs_of(event.tokens, sent["offset"]))
                sent["offset"] += len(event.text)
            elif isinstance(event, CallStart):
                sent["calls"] = True
                yield chunk({"tool_calls": [{"index": event.index, "id": event.id, "type": "function",
                                             "function": {"name": event.name, "arguments": ""}}]}, first)
            elif isinstance(event, CallArgs):
                yield chunk({"tool_calls": [{"index": event.index, "function": {"arguments": event.json}}]}, first)
            else:
                continue
            sent["any"] = True

    async def events() -> AsyncIterator[str]:
        try:
            async for piece in pieces:
                for line in chunks(_events(parser, piece)):
                    yield line
            for line in chunks(parser.finish() if parser is not None else []):
                yield line
        except Exception as e:  # noqa: BLE001 - the status line is long sent: the error goes in the stream
            yield _sse({"error": {"message": str(e), "type": "server_error", "code": "generation_failed"}})
            return
        yield chunk({"content": ""}, not sent["any"], finish=_finish(stats, sent["calls"]))
        if body.stream_options and body.stream_options.include_usage:
            yield _sse(chunk_head | {"choices": [], "usage": _usage(stats)})
        yield _sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _template_messages(messages: list[ChatMessage]) -> list[dict]:
    """OpenAI's messages as chat templates read them: calls' arguments as objects, a tool result with the
    name of the function that made it, `developer` as `system`."""
    names: dict[str, str] = {}
    flat = []
    for m in messages:
        message = m.model_dump(exclude_none=True, exclude={"tool_calls"}) | {"content": m.content}
        if m.role == "developer":
            message["role"] = "system"
        if m.tool_calls:
            message["tool_calls"] = [template_call(c.function.name, c.function.arguments) | {"id": c.id}
                                     for c in m.tool_calls]
            names |= {c.id: c.function.name for c in m.tool_calls if c.id}
        if m.role == "tool" and m.name is None and m.tool_call_id in names:
            message["name"] = names[m.tool_call_id]
        flat.append(message)
    return flat


def _grammar_of(body: ChatRequest, fmt: ToolFormat | None) -> Callable[[Vocabulary], Grammar] | None:
    """What the answer is held to: a required call of the tools, or the response format."""
    choice = body.tool_choice
    if body.tools and fmt is not None and (choice == "required" or isinstance(choice, NamedToolChoice)):
        tools = [t.model_dump(exclude_none=True) for t in body.tools]
        if isinstance(choice, NamedToolChoice):
            tools = [t for t in tools if t["function"]["name"] == choice.function.name]
            if not tools:
                raise RequestError(400, f"tool_choice names {choice.function.name!r}, which is not among the tools",
                                   "invalid_request")
        return lambda vocabulary: call_grammar(vocabulary, fmt, tools)
    extra = body.model_extra or {}
    if isinstance(extra.get("guided_regex"), str):  # vLLM's names for a regular expression or a Lark grammar
        return lambda vocabulary: vocabulary.regex(extra["guided_regex"])
    if isinstance(extra.get("guided_grammar"), str):
        return lambda vocabulary: vocabulary.lark(extra["guided_grammar"])
    form = body.response_format
    if form is None or form.type == "text":
        return None
    if form.type == "json_object":
        return lambda vocabulary: vocabulary.json_object()
    if form.json_schema is None or form.json_schema.schema_ is None:
        raise RequestError(400, "response_format json_schema needs json_schema.schema", "invalid_request")
    return lambda vocabulary: vocabulary.json_schema(form.json_schema.schema_)


@router.post("/chat/completions", responses=GENERATES)
async def chat_completions(request: Request, body: ChatRequest):
    service: Service = request.app.state.service
    service.check_model(body.model)
    if body.top_logprobs is not None and not body.logprobs:
        raise RequestError(400, "top_logprobs needs logprobs: true", "invalid_request")
    tools = body.tools if body.tools and body.tool_choice != "none" else None
    fmt = service.tool_format() if tools else None
    prompt = service.chat_prompt(_template_messages(body.messages),
                                 [t.model_dump(exclude_none=True) for t in tools] if tools else None)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    build = _grammar_of(body, fmt)
    grammar = await service.grammar(build) if build is not None else None
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    parser = CallParser(fmt) if fmt is not None else None
    return await _respond(request, body, prompt, max_tokens, "chat", logprobs, grammar, parser)


@router.post("/completions", responses=GENERATES)
async def completions(request: Request, body: CompletionRequest):
    service: Service = request.app.state.service
    service.check_model(body.model)
    if isinstance(body.prompt, list) and len(body.prompt) != 1:
        raise RequestError(400, "give one prompt per request", "invalid_request")
    text = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
    prompt = service.text_prompt(text)
    return await _respond(request, body, prompt, body.max_tokens, "completion", body.logprobs)


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    input: str | list[str] | list[list[int]] | list[int] = Field(
        ..., description="a text, a list of texts, or token ids (a list, or a list of lists)")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)


@router.post("/embeddings")
async def embeddings(request: Request, body: EmbeddingRequest):
    """The mean-pooled final hidden state of each input, unit length (as `llama.cpp --embeddings`)."""
    service: Service = request.app.state.service
    service.check_model(body.model)
    given = body.input
    if isinstance(given, str) or (given and all(isinstance(t, int) for t in given)):
        given = [given]
    if not given:
        raise RequestError(400, "input must not be empty", "invalid_request")
    inputs = [service.embedding_tokens(text, truncate=False) for text in given]
    data = []
    for i, vector in enumerate(await service.embed(inputs)):
        values = embedding_list(vector, body.dimensions)
        encoded = (base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode()
                   if body.encoding_format == "base64" else values)
        data.append({"object": "embedding", "index": i, "embedding": encoded})
    tokens = sum(len(t) for t in inputs)
    return {"object": "list", "data": data, "model": body.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _model(service: Service) -> dict:
    return {"id": service.model_name, "object": "model", "created": int(service.model_path.stat().st_mtime),
            "owned_by": "duskpool"}


@router.get("/models")
async def models(request: Request):
    return {"object": "list", "data": [_model(request.app.state.service)]}


@router.get("/models/{model:path}")
async def model(request: Request, model: str):
    service: Service = request.app.state.service
    service.check_model(model)
    return _model(service)
