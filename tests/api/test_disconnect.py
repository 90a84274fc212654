"""A client that hangs up mid-answer stops its generation and frees its KV cache on every node."""

import time

import httpx
import pytest

from duskpool.weights.catalog import BUNDLED_NAME
from tests.conftest import wait_for

pytestmark = pytest.mark.slow


def node_sessions(gateway) -> list[tuple[int, int]]:
    """(live sessions, KV bytes) as each node reports them in Info."""
    return [(info.sessions, info.kv_bytes) for info in (gateway.node_info(s.address) for s in gateway.route)]


def wait_until_freed(gateway, timeout: float = 5.0) -> list[tuple[int, int]]:
    deadline = time.monotonic() + timeout
    while (state := node_sessions(gateway)) != [(0, 0)] * len(gateway.route) and time.monotonic() < deadline:
        time.sleep(0.05)
    return state


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Tell me a very long story."}],
                              "stream": True}),
    ("/api/generate", {"prompt": "Tell me a very long story.", "stream": True}),
])
def test_disconnect_mid_stream_frees_kv_on_every_node(base_url, gateway, service, path, body):
    assert wait_until_freed(gateway) == [(0, 0)] * 3
    body = body | {"model": BUNDLED_NAME, "max_tokens": 2000, "options": {"num_predict": 2000}, "temperature": 0}
    with httpx.Client(base_url=base_url, timeout=60) as http, http.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        for _ in range(5):
            next(lines)
        during = node_sessions(gateway)
    # the connection is closed here, some 5 tokens into a 2000-token answer
    assert all(sessions == 1 and kv > 0 for sessions, kv in during), during
    assert wait_until_freed(gateway) == [(0, 0)] * 3
    assert wait_for(lambda: not service.generations, 5)
    assert service.total_tokens < 500  # it stopped, rather than running to the end unseen


def test_disconnect_of_a_non_streaming_request_frees_kv(base_url, gateway):
    body = {"model": BUNDLED_NAME, "messages": [{"role": "user", "content": "Tell me a very long story."}],
            "max_tokens": 2000, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=1.5)
    assert wait_until_freed(gateway) == [(0, 0)] * 3
