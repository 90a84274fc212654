"""Ollama's API: /api/chat, /api/generate (NDJSON streams), /api/tags, /api/ps, /api/show, /api/version,
with Ollama's field names, defaults and nanosecond timings, so its clients and tools work unchanged."""

import hashlib
import json
import math
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from duskpool import __version__
from duskpool.api.service import Service, collect
from duskpool.engine.generate import GenerationParams, GenerationStats
from duskpool.engine.sampling import SamplingParams
from duskpool.weights.catalog import quant_from_filename
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


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str = ""


class Base(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    stream: bool = True
    options: Options | None = None


class ChatRequest(Base):
    messages: list[Message] = []


class GenerateRequest(Base):
    prompt: str = ""
    system: str | None = None
    raw: bool = False


class ShowRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    name: str | None = None  # what older clients send


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _params(options: Options | None, budget: int) -> GenerationParams:
    o = options or Options()
    sampling = SamplingParams(temperature=o.temperature, top_k=o.top_k, top_p=o.top_p, min_p=o.min_p,
                              repetition_penalty=o.repeat_penalty, seed=o.seed)
    return GenerationParams(max_tokens=budget, stop=list(o.stop or []), sampling=sampling)


def _timings(stats: GenerationStats, total_s: float) -> dict:
    return {"done_reason": stats.finish_reason, "total_duration": int(total_s * NS), "load_duration": 0,
            "prompt_eval_count": stats.prompt_tokens, "prompt_eval_duration": int(stats.prefill_seconds * NS),
            "eval_count": stats.generated_tokens, "eval_duration": int(stats.decode_seconds * NS)}


async def _respond(request: Request, body: Base, prompt: list[int], wrap) -> Any:
    """Generate, then answer as one JSON object or NDJSON lines; `wrap(text)` gives a line's payload."""
    service: Service = request.app.state.service
    num_predict = body.options.num_predict if body.options else None
    budget = service.budget(prompt, num_predict if num_predict is not None and num_predict >= 0 else None,
                            strict=False)
    stats, started = GenerationStats(), datetime.now(UTC)
    pieces = await service.start(prompt, _params(body.options, budget), f"ollama {request.url.path}", stats)

    def line(text: str, done: bool) -> dict:
        end = _timings(stats, (datetime.now(UTC) - started).total_seconds()) if done else {}
        return {"model": body.model, "created_at": _now()} | wrap(text) | {"done": done} | end

    if not body.stream:
        return line(await collect(request, pieces), True)

    async def lines() -> AsyncIterator[str]:
        try:
            async for piece in pieces:
                yield json.dumps(line(piece, False)) + "\n"
        except Exception as e:  # noqa: BLE001 - the status line is long sent: the error goes in the stream
            yield json.dumps({"error": str(e)}) + "\n"
            return
        yield json.dumps(line("", True)) + "\n"

    return StreamingResponse(lines(), media_type="application/x-ndjson")


@router.post("/chat", responses=GENERATES)
async def chat(request: Request, body: ChatRequest):
    service: Service = request.app.state.service
    service.check_model(body.model)
    if not body.messages:  # Ollama loads the model and answers at once
        return {"model": body.model, "created_at": _now(), "message": {"role": "assistant", "content": ""},
                "done_reason": "load", "done": True}
    prompt = service.chat_prompt([m.model_dump() for m in body.messages])
    return await _respond(request, body, prompt, lambda text: {"message": {"role": "assistant", "content": text}})


@router.post("/generate", responses=GENERATES)
async def generate(request: Request, body: GenerateRequest):
    service: Service = request.app.state.service
    service.check_model(body.model)
    if not body.prompt:
        return {"model": body.model, "created_at": _now(), "response": "", "done_reason": "load", "done": True}
    if body.raw:  # the prompt as given, no template
        prompt = service.text_prompt(body.prompt)
    else:
        system = [{"role": "system", "content": body.system}] if body.system else []
        prompt = service.chat_prompt(system + [{"role": "user", "content": body.prompt}])
    return await _respond(request, body, prompt, lambda text: {"response": text})


@cache
def _describe(path: Path) -> tuple[dict, dict]:
    """(Ollama's `details`, `model_info`) from the GGUF header; cached, as the file does not change."""
    file = GGUFFile(path)
    params = sum(math.prod(t.shape) for t in file.tensors.values())
    size = f"{params / 1e9:.1f}B" if params >= 1e9 else f"{params / 1e6:.0f}M"
    arch = file.architecture
    details = {"parent_model": "", "format": "gguf", "family": arch, "families": [arch], "parameter_size": size,
               "quantization_level": quant_from_filename(path.name) or ""}
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
    template = GGUFFile(service.model_path).metadata.get("tokenizer.chat_template", "")
    entry = _entry(service)
    return {"modelfile": f"FROM {service.model_path}\n", "parameters": "", "template": template,
            "details": details, "model_info": info, "capabilities": ["completion"],
            "modified_at": entry["modified_at"]}


@router.get("/version")
async def version():
    return {"version": __version__}
