"""What a web page, or a client that never finishes its request, can do to a server on loopback without a key:
nothing. A page's request (any Origin of its own, a text/plain or form body, a name its DNS points here) is
refused before it reaches the model; a slow request head or body loses its connection; the answers to a
well-formed request stay what they were."""

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
import uvicorn

from duskpool.api import server
from duskpool.api.server import TimedH11Protocol, create_app
from tests.api.conftest import TOOL_MODEL

BODY = {"model": TOOL_MODEL, "prompt": "Hello", "stream": False, "options": {"num_predict": 4, "temperature": 0}}


@contextmanager
def timed_server(service, check_key=None) -> Iterator[str]:
    """`service` on 127.0.0.1 as `duskpool serve` runs it (TimedH11Protocol); yields its base URL."""
    srv = uvicorn.Server(uvicorn.Config(create_app(service, check_key), host="127.0.0.1", port=0,
                                        log_level="warning", http=TimedH11Protocol))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{srv.servers[0].sockets[0].getsockname()[1]}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def url(tool_engine, tool_model):
    from duskpool.api.service import Service

    service = Service(tool_engine, TOOL_MODEL, tool_model)
    with timed_server(service) as url:
        yield url
    service.close()


def test_a_web_page_cannot_use_a_keyless_server(url):
    with httpx.Client(base_url=url, timeout=60) as http:
        answer = http.post("/api/generate", json=BODY)
        assert answer.status_code == 200, answer.text
        page = "http://attacker.example"
        # a page's form or text/plain POST needs no preflight, so the browser sends it: refused
        for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
            refused = http.post("/api/generate", content=httpx.Request("POST", "/", json=BODY).content,
                                headers={"content-type": content_type, "origin": page})
            assert refused.status_code == 403, refused.text
            refused = http.post("/api/generate", content=httpx.Request("POST", "/", json=BODY).content,
                                headers={"content-type": content_type})
            assert refused.status_code == 415 and "application/json" in refused.json()["error"]
        # another page's Origin, even with a JSON label (a fetch the browser would preflight, and still send)
        assert http.post("/v1/completions", json={"model": TOOL_MODEL, "prompt": "Hi", "max_tokens": 2},
                         headers={"origin": page}).status_code == 403
        assert http.post("/api/generate", json=BODY, headers={"origin": "null"}).status_code == 403
        # DNS rebinding: the page's own name, pointed at 127.0.0.1, reads the dashboard's state
        port = url.rsplit(":", 1)[1]
        for path in ("/dashboard/state", "/metrics", "/api/tags"):
            refused = http.get(path, headers={"host": f"attacker.example:{port}"})
            assert refused.status_code == 403 and "Host" in refused.json()["error"], path
        # the server's own page and its own names still work, and answer the same
        assert http.get("/dashboard/state", headers={"host": f"localhost:{port}"}).status_code == 200
        assert http.post("/api/generate", json=BODY, headers={"origin": url}).json()["response"] == \
            answer.json()["response"]
        assert http.post("/api/generate", content=httpx.Request("POST", "/", json=BODY).content).json()[
            "response"] == answer.json()["response"]  # curl without a label: no Origin, read as JSON


def test_a_slow_request_head_or_body_loses_its_connection(url, monkeypatch):
    monkeypatch.setattr(server, "HEADER_TIMEOUT_S", 0.5)
    monkeypatch.setattr(server, "BODY_TIMEOUT_S", 0.5)
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as slow:  # slowloris: the head never ends
        slow.sendall(b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: ")
        started = time.monotonic()
        assert slow.recv(1024) == b""  # closed by the server
        assert time.monotonic() - started < 3
    with socket.create_connection((host, int(port)), timeout=5) as slow:  # the body never ends
        slow.sendall(b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"model\": ")
        reply = slow.recv(4096)
        assert reply.startswith(b"HTTP/1.1 408"), reply[:80]
    with httpx.Client(base_url=url, timeout=60) as http:
        assert http.post("/api/generate", json=BODY).status_code == 200


def test_a_flood_of_stop_strings_is_refused_at_once(url):
    """250 000 stop strings fit under the 4 MiB body limit; they made one request 20x slower and slowed the
    others: now a 400, before any token."""
    with httpx.Client(base_url=url, timeout=60) as http:
        started = time.monotonic()
        refused = http.post("/v1/completions", json={"model": TOOL_MODEL, "prompt": "Hi", "max_tokens": 4,
                                                     "stop": [f"s{i}" for i in range(250_000)]})
        assert refused.status_code == 400 and "at most 16" in refused.json()["error"]["message"]
        assert time.monotonic() - started < 10
        refused = http.post("/api/generate", json={**BODY, "options": {**BODY["options"], "stop": ["x" * 300]}})
        assert refused.status_code == 400 and "longer than 256" in refused.json()["error"]
        assert http.post("/api/generate", json=BODY).status_code == 200


def test_the_dashboard_never_takes_a_key_in_its_url(tool_engine, tool_model):
    """A key in a URL lands in logs, history and Referer headers: `?key=` is refused; the dashboard trades the key,
    sent once in a header, for an HttpOnly SameSite=Strict cookie its own GETs carry (EventSource sends no headers),
    and that cookie opens nothing but the dashboard's reads."""
    from duskpool.api.server import KEY_COOKIE, key_checker
    from duskpool.api.service import Service

    service = Service(tool_engine, TOOL_MODEL, tool_model)
    key = "dpk_dashboard"
    try:
        with timed_server(service, key_checker([key])) as url, httpx.Client(base_url=url, timeout=60) as http:
            assert http.get("/").status_code == 200  # the page itself
            assert http.get(f"/dashboard/state?key={key}").status_code == 401
            assert http.get(f"/dashboard/events?key={key}").status_code == 401
            assert http.post("/dashboard/login", json={}, headers={"authorization": "Bearer wrong"}).status_code == 401
            login = http.post("/dashboard/login", json={}, headers={"authorization": f"Bearer {key}"})
            assert login.status_code == 204
            cookie = login.headers["set-cookie"]
            assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/dashboard/" in cookie, cookie
            assert http.cookies.get(KEY_COOKIE) == key
            assert http.get("/dashboard/state").status_code == 200
            # the cookie is the dashboard's only: not a key for the API, nor for a POST
            assert http.post("/api/generate", json=BODY, headers={"cookie": f"{KEY_COOKIE}={key}"}).status_code == 401
            assert http.get("/api/tags", headers={"cookie": f"{KEY_COOKIE}={key}"}).status_code == 401
    finally:
        service.close()
