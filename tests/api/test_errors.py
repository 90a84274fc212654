"""Bad requests with raw httpx: each gets the right status in its API's error shape, and the server stays
healthy. Also back-pressure (429 + Retry-After) and API keys."""

import json
import threading

import httpx
import pytest

from duskpool.api.server import check_bind, key_checker
from duskpool.api.service import Service
from duskpool.engine.runner import LocalEngine
from duskpool.weights.catalog import BUNDLED_NAME
from tests.api.conftest import live_server

pytestmark = pytest.mark.slow

CHAT = "/v1/chat/completions"


def chat_body(**over) -> dict:
    return {"model": BUNDLED_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "temperature": 0} | over


def openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code"} and error["message"]
    if code:
        assert error["code"] == code
    return error


@pytest.fixture(scope="module")
def http(base_url):
    with httpx.Client(base_url=base_url, timeout=60) as client:
        yield client


def test_bad_requests_get_openai_errors(http, service):
    openai_error(http.post(CHAT, content=b'{"model": "x", "messages": [', headers={"content-type": "application/json"}),
                 400, "invalid_request")
    openai_error(http.post(CHAT, json=chat_body(model="no-such-model")), 404, "model_not_found")
    openai_error(http.post(CHAT, json=chat_body(max_tokens=-5)), 400)
    openai_error(http.post(CHAT, json=chat_body(max_tokens=10**12)), 400, "context_length_exceeded")
    openai_error(http.post(CHAT, json=chat_body(temperature=-1)), 400)
    openai_error(http.post(CHAT, json=chat_body(messages="not a list")), 400)
    openai_error(http.post(CHAT, json=chat_body(messages=[])), 400)
    too_long = "hello " * (service.engine.context_length + 10)
    openai_error(http.post(CHAT, json=chat_body(messages=[{"role": "user", "content": too_long}])),
                 400, "context_length_exceeded")
    openai_error(http.post("/v1/completions", content=b"x" * 10_000_000), 413, "request_too_large")
    # a 10 MB body sent in chunks, with no length declared up front
    chunks = (b"y" * 1_000_000 for _ in range(10))
    openai_error(http.post("/v1/completions", content=chunks), 413, "request_too_large")

    assert http.get("/health").json()["status"] == "ok"
    ok = http.post(CHAT, json=chat_body())
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"]


def test_bad_requests_get_ollama_errors(http):
    for body, status in [(b"{nope", 400), (json.dumps({"model": "nope:1b", "prompt": "hi"}).encode(), 404),
                         (json.dumps({"model": BUNDLED_NAME, "prompt": "hi",
                                      "options": {"temperature": -2}}).encode(), 400)]:
        response = http.post("/api/generate", content=body)
        assert response.status_code == status and isinstance(response.json()["error"], str), response.text
    assert http.post("/api/chat", content=b"z" * 10_000_000).status_code == 413
    assert http.get("/api/version").json()["version"]


def test_what_fuzzing_found_is_answered_properly(http):
    """Requests that once got a 500: found by schemathesis (test_fuzz.py: top_p near 0) and by hand around it."""
    # a temperature, top_p or repetition penalty near 0 once broke the sampler (nan or all-zero probabilities)
    for extreme in ({"temperature": 5e-324}, {"temperature": 1e-40}, {"top_p": 5e-324}):
        answer = http.post(CHAT, json=chat_body(**{"temperature": 1.0} | extreme))
        assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"], answer.text
    answer = http.post("/api/generate", json={"model": BUNDLED_NAME, "prompt": "hi", "stream": False,
                                              "options": {"repeat_penalty": 5e-324, "num_predict": 4}})
    assert answer.status_code == 200 and answer.json()["response"], answer.text
    # a text content part whose text is not a string
    openai_error(http.post(CHAT, json=chat_body(messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}])),
                 400, "invalid_request")
    # half a surrogate pair: valid JSON, not valid text (json.dumps escapes it as \ud800)
    half = "\ud800 hi"
    openai_error(http.post(CHAT, content=json.dumps(chat_body(messages=[{"role": "user", "content": half}]))),
                 400, "invalid_request")
    openai_error(http.post("/v1/completions", content=json.dumps({"model": BUNDLED_NAME, "prompt": half})), 400)
    answer = http.post("/api/generate", content=json.dumps({"model": BUNDLED_NAME, "prompt": half, "stream": False}))
    assert answer.status_code == 400 and "Unicode" in answer.json()["error"], answer.text
    assert http.get("/health").json()["status"] == "ok"


@pytest.fixture(scope="module")
def local_engine(bundled_model):
    return LocalEngine.load(bundled_model, 512)


def test_a_full_queue_answers_429_with_retry_after(local_engine, bundled_model):
    service = Service(local_engine, BUNDLED_NAME, bundled_model, max_active=1, max_queue=1)
    with live_server(service) as url, httpx.Client(base_url=url, timeout=60) as http:
        body = chat_body(max_tokens=200, stream=True)
        started = threading.Event()

        def hold(results: list) -> None:
            with http.stream("POST", CHAT, json=body) as r:
                started.set()
                results.append((r.status_code, "".join(r.iter_text())))

        first, second = [], []
        holder = threading.Thread(target=hold, args=(first,))
        holder.start()
        assert started.wait(30)
        queued = threading.Thread(target=lambda: second.append(http.post(CHAT, json=chat_body())))
        queued.start()  # takes the one queue place
        while service._waiting == 0 and queued.is_alive():
            threading.Event().wait(0.01)
        refused = http.post(CHAT, json=chat_body())
        error = openai_error(refused, 429, "overloaded")
        assert int(refused.headers["retry-after"]) >= 1 and "busy" in error["message"]
        holder.join(60)
        queued.join(60)
        assert first[0][0] == 200 and first[0][1].rstrip().endswith("data: [DONE]")
        assert second[0].status_code == 200  # the queued one was served once the slot freed
    service.close()


def test_api_keys(local_engine, bundled_model):
    with pytest.raises(ValueError, match="API key"):
        check_bind("0.0.0.0", keyed=False)
    check_bind("127.0.0.1", keyed=False)
    check_bind("0.0.0.0", keyed=True)
    service = Service(local_engine, BUNDLED_NAME, bundled_model)
    with live_server(service, check_key=key_checker(["s3cret", "other"])) as url:
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        openai_error(httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"}), 401, "invalid_api_key")
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(f"{url}/api/tags", headers={"Authorization": "Bearer other"}).status_code == 200
        # a key in a URL is never taken (it ends up in logs and history): the dashboard trades it in a header
        assert httpx.get(f"{url}/dashboard/state?key=s3cret").status_code == 401
        assert httpx.get(f"{url}/dashboard/state", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(f"{url}/metrics").status_code == 401
    service.close()
