"""The gateway's HTTP face: OpenAI, Ollama and Anthropic APIs, the live dashboard at /, Prometheus /metrics.

Errors come in the shape of the API that was called: Anthropic's `{"type": "error", "error": {"type",
"message"}}` under /v1/messages, OpenAI's `{"error": {"message", "type", "code"}}` elsewhere under /v1,
Ollama's `{"error": "..."}` elsewhere.
"""

import asyncio
import hmac
import ipaddress
import json
from collections.abc import Callable
from importlib.resources import files

import h11
import prometheus_client as prom
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from duskpool import __version__
from duskpool.api import DEFAULT_PORT, anthropic, ollama, openai
from duskpool.api.service import Overloaded, RequestError, Service
from duskpool.cluster.gateway import RouteError
from duskpool.engine.runner import EmbeddingsUnsupported
from duskpool.models import ContextOverflowError

MAX_BODY_BYTES = 4 * 2**20  # far above any prompt a context holds
HEADER_TIMEOUT_S = 10.0  # a request's head must arrive within this
BODY_TIMEOUT_S = 30.0  # and its body (4 MiB at most) within this
DASHBOARD_PERIOD_S = 1.0
KEY_COOKIE = "duskpool_key"  # set by POST /dashboard/login (which needs the key in a header) for the dashboard's
# EventSource, which cannot send headers; HttpOnly and SameSite=Strict, so no script and no other site sends it
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error",
               415: "invalid_request_error", 429: "rate_limit_error", 503: "server_error"}
ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                   404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}


def error_response(request: Request, status: int, message: str, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    if request.url.path.startswith("/v1/messages"):
        body = {"type": "error", "error": {"type": ANTHROPIC_TYPES.get(status, "api_error"), "message": message}}
    elif request.url.path.startswith("/v1"):
        body = {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "code": code,
                          "param": None}}
    else:
        body = {"error": message}
    return JSONResponse(body, status_code=status, headers=headers)


def header_key(request: Request) -> tuple[str, str]:
    """The scheme and key a request presents: `Authorization: <scheme> <key>`, else Anthropic's `x-api-key`."""
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if not key and request.headers.get("x-api-key"):
        scheme, key = "bearer", request.headers["x-api-key"]
    return scheme, key


class Gatekeeper:
    """In front of the app (plain ASGI, so that a client's disconnect still reaches the handlers):
    - with `check_key`, every request but the dashboard page needs `Authorization: Bearer KEY` (or
      `x-api-key: KEY`, as Anthropic's clients send it); the dashboard's own GETs may show the cookie its login
      set instead. A key in a URL is never read (URLs end up in logs, history and Referer headers);
    - without, a request must name this server in `Host` (an IP address or localhost, never a name a web page's
      DNS could point here: DNS rebinding) and come from no other web page's `Origin`: 403 (as Ollama's fix of
      CVE-2024-28224);
    - a body must be labelled application/json (a web page can send text/plain or a form without asking
      first), or carry no label and no `Origin` (curl, scripts): 415;
    - the whole body is read first, within BODY_TIMEOUT_S (408), and one over `limit` bytes is refused with
      413, whether or not the client declared its length."""

    def __init__(self, app, check_key: Callable[[str], bool] | None, limit: int = MAX_BODY_BYTES):
        self.app, self.check_key, self.limit = app, check_key, limit

    def _refusal(self, request: Request) -> tuple[int, str] | None:
        """Why a request must not reach the app: a status and a message, or None."""
        host = request.headers.get("host", "")
        origin = request.headers.get("origin")
        if self.check_key is None:
            if not own_host(host):
                return 403, f"Host {host[:80]!r} is not this server's address (use an IP address or localhost)"
            if origin is not None and origin.partition("://")[2].lower() != host.lower():
                return 403, f"requests from the web page at {origin[:80]!r} are refused"
        if request.method in ("GET", "HEAD", "OPTIONS"):
            return None
        media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media != "application/json" and (media or origin is not None):
            return 415, "the body must be JSON, labelled Content-Type: application/json"
        return None

    def _authorized(self, request: Request) -> bool:
        if self.check_key is None or request.url.path == "/":
            return True
        scheme, key = header_key(request)
        if request.url.path.startswith("/dashboard/") and request.method == "GET" and not key:
            scheme, key = "bearer", request.cookies.get(KEY_COOKIE, "")  # EventSource cannot send headers
        return scheme.lower() == "bearer" and self.check_key(key.strip())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if not self._authorized(Request(scope)):
            response = error_response(Request(scope), 401, "missing or wrong API key (send Authorization: Bearer "
                                      "KEY, or x-api-key: KEY)", "invalid_api_key", {"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        refusal = self._refusal(Request(scope))
        if refusal is not None:
            return await error_response(Request(scope), refusal[0], refusal[1], "refused")(scope, receive, send)
        scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"content-type"] + \
            [(b"content-type", b"application/json")]  # an unlabelled body is read as JSON too
        declared = dict(scope["headers"]).get(b"content-length")
        too_large = declared is not None and declared.isdigit() and int(declared) > self.limit
        body, more = bytearray(), not too_large
        deadline = asyncio.get_running_loop().time() + BODY_TIMEOUT_S
        while more:
            try:
                message = await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
            except TimeoutError:
                response = error_response(Request(scope), 408, f"the body did not arrive within {BODY_TIMEOUT_S:.0f} s",
                                          "request_timeout", {"Connection": "close"})
                return await response(scope, receive, send)
            if message["type"] != "http.request":
                return  # the client left before it finished sending
            body += message.get("body", b"")
            more = message.get("more_body", False)
            too_large = len(body) > self.limit
            more = more and not too_large
        if too_large:
            response = error_response(Request(scope), 413, f"the request body is over {self.limit // 2**20} MiB",
                                      "request_too_large", {"Connection": "close"})
            return await response(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # from here on: only the disconnect, when it comes
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)


def own_host(host: str) -> bool:
    """Whether a `Host` header names this server as only its own user would: an IP address, or localhost."""
    name = host.rpartition("]")[0].lstrip("[") if host.startswith("[") else host.rpartition(":")[0] or host
    if name.lower() == "localhost" or name.lower().endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


class TimedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1, plus: a connection that has not sent a whole request head within HEADER_TIMEOUT_S of
    opening (or of its last answer) is closed, so a client sending its headers a byte at a time (slowloris)
    holds no connection for long."""

    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_timer()

    def connection_lost(self, exc) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(HEADER_TIMEOUT_S, self._head_late)

    def _head_late(self) -> None:
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def create_app(service: Service, check_key: Callable[[str], bool] | None = None) -> FastAPI:
    """The ASGI app. With `check_key`, every request but the dashboard's page itself needs
    `Authorization: Bearer KEY` for which it returns True."""
    app = FastAPI(title="duskpool", version=__version__,
                  description="OpenAI- and Ollama-compatible API over a pool of machines")
    app.state.service = service
    app.include_router(openai.router)
    app.include_router(ollama.router)
    app.include_router(anthropic.router)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, e: RequestError):
        return error_response(request, e.status, e.message, e.code)

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, e: Overloaded):
        return error_response(request, e.status, str(e), "overloaded", {"Retry-After": str(e.retry_after)})

    @app.exception_handler(RouteError)
    async def route_error(request: Request, e: RouteError):
        return error_response(request, 503, f"the pool cannot serve right now: {e}", "pool_unavailable",
                              {"Retry-After": "5"})

    @app.exception_handler(ContextOverflowError)
    async def context_overflow(request: Request, e: ContextOverflowError):
        return error_response(request, 400, str(e), "context_length_exceeded")

    @app.exception_handler(EmbeddingsUnsupported)
    async def no_embeddings(request: Request, e: EmbeddingsUnsupported):
        return error_response(request, 501, str(e), "embeddings_unsupported")

    @app.exception_handler(ValueError)
    async def bad_value(request: Request, e: ValueError):
        return error_response(request, 400, str(e), "invalid_request")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = "the body is not valid JSON" if first.get("type") == "json_invalid" else \
            f"{where or 'body'}: {first.get('msg', 'invalid')}"
        return error_response(request, 400, message, "invalid_request")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        return error_response(request, e.status_code, str(e.detail), None, e.headers)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def dashboard():
        return files("duskpool.api").joinpath("static/dashboard.html").read_text()

    @app.post("/dashboard/login", include_in_schema=False, status_code=204)
    async def login(request: Request):
        """Reached only with the key in a header (the Gatekeeper checked it): the dashboard's cookie."""
        _, key = header_key(request)
        response = Response(status_code=204)
        if key:
            response.set_cookie(KEY_COOKIE, key.strip(), httponly=True, samesite="strict", path="/dashboard/")
        return response

    @app.get("/dashboard/state")
    async def state(request: Request):
        return request.app.state.service.snapshot()

    @app.get("/dashboard/events", include_in_schema=False)
    async def events(request: Request):
        async def stream():
            while not await request.is_disconnected():
                yield f"data: {json.dumps(service.snapshot())}\n\n"
                await asyncio.sleep(DASHBOARD_PERIOD_S)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/metrics", include_in_schema=False)
    async def metrics():
        return Response(prom.generate_latest(service.metrics.registry), media_type=prom.CONTENT_TYPE_LATEST)

    @app.get("/health", responses={503: {"description": "the pool cannot serve: `reason` says why"}})
    async def health():
        gateway = service.gateway
        broken = gateway.broken if gateway is not None else None
        return JSONResponse({"status": "unavailable" if broken else "ok", "reason": broken},
                            status_code=503 if broken else 200)

    return Gatekeeper(app, check_key)


def check_bind(host: str, keyed: bool) -> None:
    """Off loopback, an API key is required: anyone on the network could otherwise use the pool."""
    if not is_loopback(host) and not keyed:
        raise ValueError(f"serving on {host} (not loopback) needs an API key: make one with `duskpool key create` "
                         "or pass --api-key-file PATH (or set DUSKPOOL_API_KEY); or serve on 127.0.0.1")


def key_checker(api_keys: list[str]) -> Callable[[str], bool] | None:
    if not api_keys:
        return None
    encoded = [k.encode() for k in api_keys]
    # compare with every key, in constant time for each, so timing does not tell which matched
    return lambda given: sum(hmac.compare_digest(given.encode(), k) for k in encoded) > 0


def serve(service: Service, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
          check_key: Callable[[str], bool] | None = None,
          on_ready: Callable[[str], None] | None = None) -> None:
    """Serve until interrupted."""
    check_bind(host, check_key is not None)
    app = create_app(service, check_key)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=3,
                            http=TimedH11Protocol)
    server = uvicorn.Server(config)
    if on_ready is not None:
        shown = f"[{host}]" if ":" in host else host
        original = server.startup

        async def startup(sockets=None):
            await original(sockets)
            if server.started:
                on_ready(f"http://{shown}:{server.servers[0].sockets[0].getsockname()[1]}")

        server.startup = startup
    server.run()
