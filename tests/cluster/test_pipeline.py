"""A real swarm of node processes on loopback against the single-process engine."""

import threading
import time

import pytest

from duskpool.cluster.gateway import Gateway, RouteError
from duskpool.cluster.swarm import LocalSwarm
from duskpool.engine.runner import LocalEngine
from tests.conftest import greedy_tokens

pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers.",
           "Explain recursion to a child.", "Translate 'good morning' into Spanish."]


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    with LocalSwarm(3, cache_root=tmp_path_factory.mktemp("swarm")) as swarm:
        yield swarm


@pytest.fixture(scope="module")
def local(bundled_model):
    return LocalEngine.load(bundled_model)


def chat_prompt(engine, text: str) -> list[int]:
    return engine.tokenizer.encode(engine.tokenizer.render_chat([{"role": "user", "content": text}]))


@pytest.mark.parametrize("routing", ["ring", "star"])
def test_three_nodes_give_the_single_process_tokens(swarm, local, bundled_model, routing):
    gateway = Gateway.start(bundled_model, swarm.addresses,
                            identity=swarm.gateway_identity, routing=routing, even_split=True, progress=False)
    try:
        assert [(s.start, s.stop) for s in gateway.route] == [(1, 10), (10, 19), (19, 29)]
        for text in PROMPTS:
            prompt = chat_prompt(local, text)
            assert greedy_tokens(gateway, prompt, 24) == greedy_tokens(local, prompt, 24), text
    finally:
        gateway.close()


def test_a_restarted_node_loads_its_span_from_cache(tmp_path, bundled_model):
    with LocalSwarm(1, cache_root=tmp_path) as swarm:
        gateway = Gateway.start(bundled_model, swarm.addresses, identity=swarm.gateway_identity, progress=False)
        first = gateway.weight_bytes_sent
        prompt = chat_prompt(gateway, "Hi")
        before = greedy_tokens(gateway, prompt, 8)
        gateway.close()
        assert first > 50e6  # 28 layers of the 98 MB model went over the wire

        swarm.processes[0].terminate()
        swarm.processes[0].wait(10)
        swarm.restart(0)
        gateway = Gateway.start(bundled_model, swarm.addresses, identity=swarm.gateway_identity, progress=False)
        try:
            assert gateway.weight_bytes_sent == 0
            assert greedy_tokens(gateway, prompt, 8) == before
        finally:
            gateway.close()


def test_the_last_node_killed_mid_request_is_a_clear_error_within_5_s(tmp_path, bundled_model):
    """With no node left to move to, recovery gives up at once (tests/cluster/test_recovery.py: with some left)."""
    with LocalSwarm(1, cache_root=tmp_path) as swarm:
        gateway = Gateway.start(bundled_model, swarm.addresses,
                                identity=swarm.gateway_identity, even_split=True, progress=False)
        try:
            session = gateway.open_session(4000)
            prompt = chat_prompt(gateway, "Tell me a very long story.")
            session.forward(prompt, 0)
            killed_at: list[float] = []

            def kill() -> None:
                time.sleep(0.5)
                killed_at.append(time.monotonic())
                swarm.processes[0].kill()

            threading.Thread(target=kill).start()
            with pytest.raises(RouteError, match="127.0.0.1") as failure:
                for position in range(len(prompt), 3900):
                    session.forward([42], position)
            assert time.monotonic() - killed_at[0] < 5, "the error took too long"
            assert "no live node" in str(failure.value) and "gone" in str(failure.value), str(failure.value)
            assert gateway.broken == str(failure.value)
        finally:
            gateway.close()
