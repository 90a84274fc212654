"""Ollama's API: /api/chat, /api/generate (NDJSON streams), /api/embed, /api/embeddings, /api/tags, /api/ps,
/api/show, /api/version, with Ollama's field names, defaults and nanosecond timings, so its clients and tools
work unchanged: `format` (JSON or a JSON schema), `tools`, `logprobs`."""

import hashlib
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from duskpool import __version__
from duskpool.api.service import Service, collect, embedding_list
from duskpool.api.tools import Answer, CallEnd, CallParser, CallStart, Event, Text, takes_tools, template_call
from duskpool.engine.generate import GenerationParams, GenerationStats, TokenLogprob
from duskpool.engine.grammar import Grammar, Vocabulary
from duskpool.engine.sampling import SamplingParams
from duskpool.weights.catalog import folder_quant, quant_from_filename
from duskpool.weights.folder import open_model
from duskpool.weights.gguf import GGUFFile

NS = 1_000_000_000


class OllamaError(BaseModel):
    """What every error under /api looks like (as the server's `error_response` writes it)."""

    error: str


router = APIRouter(prefix="/api", responses={
    "4XX": {"model": OllamaError, "description": "a request the server cannot serve as asked"}})
GENERATES = {  # what the generating endpoints add to the document
    200: {"content": {"application/x-ndjson": {}},
          "description": "a JSON object, or with `stream` (the default) NDJSON, the last line with `done: true`"},
    503: {"model": OllamaError, "description": "the pool cannot serve now (a node is lost, or no slot freed in time)"}}


class Options(BaseModel):
    """Ollama's runtime options, with Ollama's defaults; the ones duskpool has no use for are ignored."""

    model_config = ConfigDict(extra="allow")
    temperature: float = Field(0.8, ge=0)
    top_k: int = Field(40, ge=0)
    top_p: float = Field(0.9, gt=0, le=1)
    min_p: float = Field(0.0, ge=0, le=1)
    repeat_penalty: float = Field(1.1, gt=0)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    num_predict: int | None = None  # -1: until the context is full
    stop: list[str] | None = None


class ToolCallFunction(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    arguments: dict[str, Any] = {}


class ToolCall(BaseModel):
    function: ToolCallFunction


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str = ""
    tool_calls: list[ToolCall] | None = None
    tool_name: str | None = None


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ToolDef(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str = "function"
    function: FunctionDef


class Base(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    stream: bool = True
    options: Options | None = None
    format: Literal["", "json"] | dict[str, Any] | None = Field(
        None, description='"json" for any JSON object, or a JSON schema the answer must meet')
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class ChatRequest(Base):
    messages: list[Message] = []
    tools: list[ToolDef] | None = None


class GenerateRequest(Base):
    prompt: str = ""
    system: str | None = None
    raw: bool = False


class EmbedRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    input: str | list[str] = Field(..., description="a text or a list of texts")
    truncate: bool = Field(True, description="cut an input longer than the context (else it is an error)")
    dimensions: int | None = Field(None, ge=1, description="keep the first n dimensions (scaled to unit length)")
    options: Options | None = None


class EmbeddingsRequest(BaseModel):
    """The older endpoint: one text, under `prompt`."""

    model_config = ConfigDict(extra="allow")
    model: str
    prompt: str = ""
    options: Options | None = None


class ShowRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    name: str | None = None  # what older clients send


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _params(options: Options | None, budget: int, logprobs: int | None = None,
            grammar: Grammar | None = None) -> GenerationParams:
    o = options or Options()
    sampling = SamplingParams(temperature=o.temperature, top_k=o.top_k, top_p=o.top_p, min_p=o.min_p,
                              repetition_penalty=o.repeat_penalty, seed=o.seed)
    return GenerationParams(max_tokens=budget, stop=list(o.stop or []), sampling=sampling, logprobs=logprobs,
                            grammar=grammar)


def _format_grammar(form: str | dict | None) -> Callable[[Vocabulary], Grammar] | None:
    if not form:
        return None
    if form == "json":
        return lambda vocabulary: vocabulary.json_object()
    return lambda vocabulary: vocabulary.json_schema(form)


def _logprobs(vocabulary: Vocabulary, tokens: Iterable[TokenLogprob]) -> list[dict]:
    """Ollama's `logprobs`: each token's text, log-probability and bytes, and its most likely alternatives."""
    def entry(token: int, logprob: float) -> dict:
        raw = vocabulary.token_bytes(token)
        return {"token": raw.decode(errors="replace"), "logprob": max(logprob, -9999.0), "bytes": list(raw)}

    return [entry(t.token, t.logprob) | {"top_logprobs": [entry(i, lp) for i, lp in t.top]} for t in tokens]


def _tool_call(index: int, name: str, arguments: Any) -> dict:
    return {"function": {"index": index, "name": name, "arguments": arguments if isinstance(arguments, dict) else {}}}


def _timings(stats: GenerationStats, total_s: float) -> dict:
    return {"done_reason": stats.finish_reason, "total_duration": int(total_s * NS), "load_duration": 0,
            "prompt_eval_count": stats.prompt_tokens, "prompt_eval_duration": int(stats.prefill_seconds * NS),
            "eval_count": stats.generated_tokens, "eval_duration": int(stats.decode_seconds * NS)}


async def _respond(request: Request, body: Base, prompt: list[int], wrap: Callable[[str, list[dict]], dict],
                   parser: CallParser | None = None, build: Callable[[Vocabulary], Grammar] | None = None) -> Any:
    """Generate, then answer as one JSON object or NDJSON lines; `wrap(text, tool_calls)` gives a line's payload."""
    service: Service = request.app.state.service
    num_predict = body.options.num_predict if body.options else None
    budget = service.budget(prompt, num_predict if num_predict is not None and num_predict >= 0 else None,
                            strict=False)
    build = build or _format_grammar(body.format)
    grammar = await service.grammar(build) if build is not None else None
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    vocabulary = await service.vocabulary() if logprobs is not None else None
    stats, started = GenerationStats(), datetime.now(UTC)
    pieces = await service.start(prompt, _params(body.options, budget, logprobs, grammar),
                                 f"ollama {request.url.path}", stats)

    def line(text: str, calls: list[dict], tokens: Iterable[TokenLogprob], done: bool) -> dict:
        end = _timings(stats, (datetime.now(UTC) - started).total_seconds()) if done else {}
        extra = {"logprobs": _logprobs(vocabulary, tokens)} if vocabulary is not None else {}
        return {"model": body.model, "created_at": _now()} | wrap(text, calls) | extra | {"done": done} | end

    def events(piece: str) -> list[Event]:
        tokens = getattr(piece, "tokens", ())
        return parser.feed(piece, tokens) if parser is not None else [Text(piece, tokens)]

    if not body.stream:
        answer = Answer()
        answer.add(events(await collect(request, pieces)) + (parser.finish() if parser is not None else []))
        calls = [_tool_call(i, c.name, c.parsed) for i, c in enumerate(answer.calls)]
        return line(answer.text, calls, answer.tokens, True)

    names: dict[int, str] = {}

    def lines(events: list[Event]) -> Iterable[str]:
        """A line per text, and one per call once it is complete (Ollama sends each call whole)."""
        for event in events:
            if isinstance(event, Text):
                yield json.dumps(line(event.text, [], event.tokens, False)) + "\n"
            elif isinstance(event, CallEnd):
                call = _tool_call(event.index, names[event.index], event.arguments)
                yield json.dumps(line("", [call], (), False)) + "\n"
            elif isinstance(event, CallStart):
                names[event.index] = event.name

    async def stream() -> AsyncIterator[str]:
        try:
            async for piece in pieces:
                for text in lines(events(piece)):
                    yield text
            for text in lines(parser.finish() if parser is not None else []):
                yield text
        except Exception as e:  # noqa: BLE001 - the status line is long sent: the error goes in the stream
            yield json.dumps({"error": str(e)}) + "\n"
            return
        yield json.dumps(line("", [], (), True)) + "\n"

    return StreamingResponse(stream(), media_type="application/x-ndjson")


def _template_messages(messages: list[Message]) -> list[dict]:
    """Ollama's messages as chat templates read them (a tool result's `tool_name` as `name`)."""
    flat = []
    for m in messages:
        message = {"role": m.role, "content": m.content}
        if m.tool_calls:
            message["tool_calls"] = [template_call(c.function.name, c.function.arguments) for c in m.tool_calls]
        if m.tool_name:
            message["name"] = m.tool_name
        flat.append(message)
    return flat


@router.post("/chat", responses=GENERATES)
async def chat(request: Request, body: ChatRequest):
    service: Service = request.app.state.service
    service.check_model(body.model)
    if not body.messages:  # Ollama loads the model and answers at once
        return {"model": body.model, "created_at": _now(), "message": {"role": "assistant", "content": ""},
                "done_reason": "load", "done": True}
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
    parser = CallParser(service.tool_format(), new_id=lambda: f"call_{uuid.uuid4().hex[:8]}") if tools else None
    prompt = service.chat_prompt(_template_messages(body.messages), tools)

    def wrap(text: str, calls: list[dict]) -> dict:
        return {"message": {"role": "assistant", "content": text} | ({"tool_calls": calls} if calls else {})}

    return await _respond(request, body, prompt, wrap, parser)


@router.post("/generate", responses=GENERATES)
async def generate(request: Request, body: GenerateRequest):
    service: Service = request.app.state.service
    service.check_model(body.model)
    if not body.prompt:
        return {"model": body.model, "created_at": _now(), "response": "", "done_reason": "load", "done": True}
    if body.raw or service.engine.tokenizer.chat_template is None:  # the prompt as given (as Ollama does for a
        prompt = service.text_prompt(body.prompt)                     # base model, whose template is the prompt)
    else:
        system = [{"role": "system", "content": body.system}] if body.system else []
        prompt = service.chat_prompt(system + [{"role": "user", "content": body.prompt}])
    return await _respond(request, body, prompt, lambda text, calls: {"response": text})


@router.post("/embed")
async def embed(request: Request, body: EmbedRequest):
    """The mean-pooled final hidden state of each input, unit length (as `llama.cpp --embeddings`)."""
    service: Service = request.app.state.service
    service.check_model(body.model)
    texts = [body.input] if isinstance(body.input, str) else body.input
    started = time.perf_counter()
    inputs = [service.embedding_tokens(text, body.truncate) for text in texts]
    vectors = await service.embed(inputs) if inputs else []
    return {"model": body.model, "embeddings": [embedding_list(v, body.dimensions) for v in vectors],
            "total_duration": int((time.perf_counter() - started) * NS), "load_duration": 0,
            "prompt_eval_count": sum(len(t) for t in inputs)}


@router.post("/embeddings")
async def embeddings(request: Request, body: EmbeddingsRequest):
    """The older form of /api/embed: one text; an empty one gets an empty embedding (as Ollama answers)."""
    service: Service = request.app.state.service
    service.check_model(body.model)
    if not body.prompt:
        return {"embedding": []}
    vectors = await service.embed([service.embedding_tokens(body.prompt, truncate=True)])
    return {"embedding": embedding_list(vectors[0], None)}


@cache
def _describe(path: Path) -> tuple[dict, dict]:
    """(Ollama's `details`, `model_info`) from the GGUF header or the folder's config.json; cached, as the file does
    not change."""
    file = open_model(path)
    params = sum(math.prod(t.shape) for t in file.tensors.values())
    size = f"{params / 1e9:.1f}B" if params >= 1e9 else f"{params / 1e6:.0f}M"
    arch = file.architecture
    details = {"parent_model": "", "format": "gguf" if isinstance(file, GGUFFile) else "safetensors",
               "family": arch, "families": [arch], "parameter_size": size,
               "quantization_level": (folder_quant(path) if path.is_dir() else quant_from_filename(path.name)) or ""}
    info = {k: v for k, v in file.metadata.items()
            if isinstance(v, str | int | float | bool) and not k.startswith("tokenizer.")}
    return details, info | {"general.parameter_count": params}


def _digest(service: Service) -> str:
    """Ollama's store names blobs by their sha256; elsewhere a stable id of the file (hashing a large
    model on every listing would be slow)."""
    name = service.model_path.name
    if name.startswith("sha256-"):
        return name.removeprefix("sha256-")
    stat = service.model_path.stat()
    return hashlib.sha256(f"{service.model_path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()


def _entry(service: Service) -> dict:
    details, _ = _describe(service.model_path)
    modified = datetime.fromtimestamp(service.model_path.stat().st_mtime, UTC).isoformat().replace("+00:00", "Z")
    return {"name": service.model_name, "model": service.model_name, "modified_at": modified,
            "size": service.model_size, "digest": _digest(service), "details": details}


@router.get("/tags")
async def tags(request: Request):
    return {"models": [_entry(request.app.state.service)]}


@router.get("/ps")
async def ps(request: Request):
    expires = (datetime.now(UTC) + timedelta(days=365)).isoformat().replace("+00:00", "Z")
    service: Service = request.app.state.service
    return {"models": [_entry(service) | {"expires_at": expires, "size_vram": 0,
                                          "context_length": service.engine.context_length}]}


@router.post("/show")
async def show(request: Request, body: ShowRequest):
    service: Service = request.app.state.service
    service.check_model(body.model or body.name or service.model_name)
    details, info = _describe(service.model_path)
    template = (service.engine.tokenizer.chat_template if service.model_path.is_dir()  # a folder's tokenizer_config
                else GGUFFile(service.model_path).metadata.get("tokenizer.chat_template")) or ""
    entry = _entry(service)
    return {"modelfile": f"FROM {service.model_path}\n", "parameters": "", "template": template,
            "details": details, "model_info": info,
            "capabilities": ["completion"] + (["tools"] if takes_tools(service.engine.tokenizer.chat_template) else [])
            if service.engine.causal else ["embedding"],  # what Ollama says of an embedding model (all-minilm)
            "modified_at": entry["modified_at"]}


@router.get("/version")
async def version():
    return {"version": __version__}
