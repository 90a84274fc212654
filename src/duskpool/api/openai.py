"""OpenAI's API: /v1/chat/completions, /v1/completions, /v1/models, as the official clients call them."""

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from duskpool.api.service import RequestError, Service, collect
from duskpool.engine.generate import GenerationParams, GenerationStats
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


class ChatRequest(Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None


class CompletionRequest(Sampling):
    prompt: str | list[str]
    max_tokens: int | None = 16  # OpenAI's default for the legacy endpoint


def _params(body: Sampling, max_tokens: int) -> GenerationParams:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return GenerationParams(max_tokens=max_tokens, stop=stop,
                            sampling=SamplingParams(temperature=body.temperature, top_p=body.top_p, seed=body.seed))


def _usage(stats: GenerationStats) -> dict:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.generated_tokens,
            "total_tokens": stats.prompt_tokens + stats.generated_tokens}


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def _respond(request: Request, body: Sampling, prompt: list[int], max_tokens: int | None, kind: str,
                   choice: Callable[[str, str | None], dict], delta: Callable[[str, bool], dict]):
    """Generate, then answer as one JSON object or as server-sent events; `choice` builds a whole answer's
    choice, `delta` a streamed piece's (its second argument: the first piece)."""
    service: Service = request.app.state.service
    service.check_model(body.model)
    budget = service.budget(prompt, max_tokens, strict=True)
    stats = GenerationStats()
    pieces = await service.start(prompt, _params(body, budget), f"openai {kind}", stats)
    head = {"id": f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": body.model, "system_fingerprint": f"duskpool-{service.model_name}"}
    if not body.stream:
        text = await collect(request, pieces)
        return head | {"choices": [choice(text, stats.finish_reason)], "usage": _usage(stats)}

    chunk_head = head | {"object": "chat.completion.chunk" if kind == "chat" else "text_completion"}

    async def events() -> AsyncIterator[str]:
        first = True
        try:
            async for piece in pieces:
                yield _sse(chunk_head | {"choices": [delta(piece, first) | {"finish_reason": None}]})
                first = False
        except Exception as e:  # noqa: BLE001 - the status line is long sent: the error goes in the stream
            yield _sse({"error": {"message": str(e), "type": "server_error", "code": "generation_failed"}})
            return
        yield _sse(chunk_head | {"choices": [delta("", first) | {"finish_reason": stats.finish_reason}]})
        if body.stream_options and body.stream_options.include_usage:
            yield _sse(chunk_head | {"choices": [], "usage": _usage(stats)})
        yield _sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.post("/chat/completions", responses=GENERATES)
async def chat_completions(request: Request, body: ChatRequest):
    service: Service = request.app.state.service
    service.check_model(body.model)
    prompt = service.chat_prompt([m.model_dump() for m in body.messages])
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens

    def choice(text: str, finish: str | None) -> dict:
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish}

    def delta(piece: str, first: bool) -> dict:
        return {"index": 0, "delta": ({"role": "assistant"} if first else {}) | {"content": piece}, "logprobs": None}

    return await _respond(request, body, prompt, max_tokens, "chat", choice, delta)


@router.post("/completions", responses=GENERATES)
async def completions(request: Request, body: CompletionRequest):
    service: Service = request.app.state.service
    service.check_model(body.model)
    if isinstance(body.prompt, list) and len(body.prompt) != 1:
        raise RequestError(400, "give one prompt per request", "invalid_request")
    text = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
    prompt = service.text_prompt(text)

    def choice(text: str, finish: str | None) -> dict:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

    def delta(piece: str, first: bool) -> dict:
        return {"index": 0, "text": piece, "logprobs": None}

    return await _respond(request, body, prompt, body.max_tokens, "completion", choice, delta)


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
