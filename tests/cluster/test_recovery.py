"""Nodes that vanish mid-generation: the gateway moves the session to a live route, re-prefills its history
there and goes on; the client sees the same tokens, no gap, no duplicate."""

import subprocess
import threading
import time

import pytest

from duskpool.cluster.gateway import Gateway, RouteError
from duskpool.cluster.swarm import LocalSwarm
from tests.cluster.chaos import PROMPTS, answer, chat_prompt, compare, fault_free, greedy, run_chaos
from tests.cluster.netns import Hosts, unavailable_reason

pytestmark = pytest.mark.slow

STORY = "Write a long poem about the sea."


def kill_at_step(kill: callable, step: int) -> tuple[callable, list[float]]:
    """An on_step callback that, once `step` steps are done, has another thread call `kill` at once (so it
    lands while the next step is in flight); the kill times."""
    killed: list[float] = []
    due = threading.Event()

    def killer() -> None:
        due.wait()
        killed.append(time.monotonic())
        kill()

    threading.Thread(target=killer, daemon=True).start()
    return (lambda n: due.set() if n >= step else None), killed


def assert_same_answer(got, want) -> str:
    outcome = compare(got, want)
    assert outcome in ("identical", "near tie"), f"{outcome}: got {got.tokens} ({got.error}), want {want.tokens}"
    return outcome


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    with LocalSwarm(3, cache_root=tmp_path_factory.mktemp("swarm")) as swarm:
        yield swarm


@pytest.mark.parametrize("routing", ["ring", "star"])
def test_a_node_killed_mid_generation_fails_over_to_its_replica_and_rejoins(swarm, bundled_model, routing):
    gateway = Gateway.start(bundled_model, swarm.addresses, identity=swarm.gateway_identity, even_split=True,
                            replicas=1, routing=routing, progress=False)
    try:
        assert all(len(holders) == 2 for holders in gateway.holders.values()), gateway.holders
        prompt, params = chat_prompt(gateway, STORY), greedy(48)
        want = answer(gateway, prompt, params)
        assert want.error is None and len(want.tokens) == 48

        victim = gateway.route[1]  # a middle span: both its neighbours hold streams to it
        i = swarm.addresses.index(victim.address)
        weights_before = gateway.weight_bytes_sent
        on_step, killed = kill_at_step(lambda: swarm.kill(i), 12)
        got = answer(gateway, prompt, params, on_step)

        outcome = assert_same_answer(got, want)
        [death] = gateway.deaths
        [recovery] = gateway.recoveries
        print(f"{routing}: kill -9 of {victim.address} (layers [{victim.start}, {victim.stop})): noticed after "
              f"{(death.noticed - killed[0]) * 1000:.0f} ms, the session moved and re-prefilled "
              f"{recovery.replayed_tokens} tokens in {recovery.seconds * 1000:.0f} ms; answer {outcome}")
        assert death.address == victim.address and death.noticed - killed[0] < 2.0
        assert victim.address not in {s.address for s in gateway.route}
        assert gateway.weight_bytes_sent == weights_before, "failing over to a replica must not stream weights"
        assert gateway.broken is None

        # restarted (same cache dir and identity, new port), it joins again and takes back both spans it had
        held = sorted(span for span, holders in gateway.holders.items() if victim.address in holders)
        assert held == [], "a dead node holds nothing"
        address = swarm.restart(i)
        assert len(gateway.add_node(address)) == 2
        assert all(len(holders) == 2 for holders in gateway.holders.values()), gateway.holders
        assert gateway.weight_bytes_sent == weights_before, "its cache still had the tensors"
        assert_same_answer(answer(gateway, prompt, params), want)
    finally:
        gateway.close()


def test_a_step_a_node_refuses_is_an_error_not_a_recovery(swarm, bundled_model):
    gateway = Gateway.start(bundled_model, swarm.addresses, identity=swarm.gateway_identity, even_split=True,
                            replicas=1, progress=False)
    try:
        session = gateway.open_session(64)
        session.forward(chat_prompt(gateway, "Hi"), 0)
        with pytest.raises(RouteError, match="skips ahead"):
            session.forward([42], 60)  # positions never written: every node refuses it
        assert gateway.deaths == [] and gateway.recoveries == []
        session.close()
    finally:
        gateway.close()


def test_a_spare_node_loads_the_span_of_a_killed_node(tmp_path, bundled_model):
    with LocalSwarm(4, cache_root=tmp_path) as swarm:
        gateway = Gateway.start(bundled_model, swarm.addresses[:3], identity=swarm.gateway_identity, even_split=True,
                                progress=False)
        try:
            assert gateway.add_node(swarm.addresses[3]) == [], "with every span held, a new node is a spare"
            prompt, params = chat_prompt(gateway, STORY), greedy(32)
            want = answer(gateway, prompt, params)
            victim = gateway.route[1]
            weights_before = gateway.weight_bytes_sent
            on_step, killed = kill_at_step(lambda: swarm.kill(swarm.addresses.index(victim.address)), 8)
            got = answer(gateway, prompt, params, on_step)

            outcome = assert_same_answer(got, want)
            [recovery] = gateway.recoveries
            print(f"the spare loaded layers [{victim.start}, {victim.stop}) "
                  f"({(gateway.weight_bytes_sent - weights_before) / 1e6:.1f} MB) and the session re-prefilled "
                  f"{recovery.replayed_tokens} tokens: {recovery.seconds * 1000:.0f} ms; answer {outcome}")
            assert gateway.route[1].address == swarm.addresses[3]
            assert gateway.weight_bytes_sent - weights_before > 15e6  # the span's 9 layers went to the spare
        finally:
            gateway.close()


def test_a_node_cut_off_the_network_is_noticed_within_2_s_and_failed_over(tmp_path, bundled_model):
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    with Hosts(3) as hosts, LocalSwarm(3, cache_root=tmp_path, hosts=[hosts.address(i) for i in range(3)],
                                       prefixes=[hosts.exec_prefix(i) for i in range(3)]) as swarm:
        gateway = Gateway.start(bundled_model, swarm.addresses, identity=swarm.gateway_identity, even_split=True,
                                replicas=1, progress=False)
        try:
            prompt, params = chat_prompt(gateway, STORY), greedy(32)
            want = answer(gateway, prompt, params)
            victim = gateway.route[1]
            link = f"{hosts.tag}v{swarm.addresses.index(victim.address)}"  # its veth on the bridge

            def cut() -> None:
                subprocess.run(["ip", "link", "set", link, "down"], check=True)

            on_step, cut_at = kill_at_step(cut, 8)
            got = answer(gateway, prompt, params, on_step)

            outcome = assert_same_answer(got, want)
            [death] = gateway.deaths
            print(f"link of {victim.address} down: noticed after {(death.noticed - cut_at[0]) * 1000:.0f} ms "
                  f"({death.reason}); recovered in {gateway.recoveries[0].seconds * 1000:.0f} ms; answer {outcome}")
            assert death.address == victim.address and death.noticed - cut_at[0] < 2.5
        finally:
            gateway.close()


def test_chaos_5_nodes_8_streams_20_kills(tmp_path, bundled_model):
    """CI-sized chaos: one replica per span, 8 concurrent greedy streams, 20 kill -9 at random moments (each
    killed node restarted and added back) -> no failed request, no gap or duplicate, the fault-free texts."""
    with LocalSwarm(5, cache_root=tmp_path) as swarm:
        gateway = Gateway.start(bundled_model, swarm.addresses, identity=swarm.gateway_identity, even_split=True,
                                replicas=1, progress=False)
        try:
            prompts, params = [chat_prompt(gateway, text) for text in PROMPTS], greedy(24)
            references = fault_free(gateway, prompts, params)
            report = run_chaos(swarm, gateway, prompts, references, params, streams=8, kills=20, seed=7)
            print(report.summary())
            assert len(report.kills) == 20 and report.requests >= 16
            assert report.failed == 0
            assert report.outcomes.get("gap", 0) == 0 and report.outcomes.get("duplicate", 0) == 0
            assert set(report.outcomes) <= {"identical", "near tie"}, report.outcomes
            assert len(report.detection) == 20 and max(report.detection) < 2.0
        finally:
            gateway.close()
