"""A node whose owner comes back drains: its requests in flight finish on it, new ones go elsewhere, and it
rejoins when lent again. The owner's return is `kill -USR1` (the same path the idle probe takes)."""

import os
import signal
import threading

import pytest

from duskpool.cluster.gateway import Gateway
from duskpool.cluster.swarm import LocalSwarm
from tests.cluster.chaos import PROMPTS, answer, chat_prompt, compare, fault_free, greedy
from tests.conftest import wait_for

pytestmark = pytest.mark.slow



def test_a_draining_node_finishes_its_three_requests_new_ones_go_elsewhere_it_rejoins(tmp_path, bundled_model):
    with LocalSwarm(3, cache_root=tmp_path) as swarm:
        gateway = Gateway.start(bundled_model, swarm.addresses, identity=swarm.gateway_identity, even_split=True,
                                replicas=1, progress=False)
        try:
            params = greedy(40)
            prompts = [chat_prompt(gateway, p) for p in PROMPTS[:3]]
            want = fault_free(gateway, prompts, params)
            victim = gateway.route[1]
            pid = swarm.processes[swarm.addresses.index(victim.address)].pid
            weights_before = gateway.weight_bytes_sent

            # three requests in flight; the owner comes back once each has made a few steps
            started = threading.Barrier(4)
            got = [None] * 3

            def run(i: int) -> None:
                got[i] = answer(gateway, prompts[i], params,
                                on_step=lambda n: started.wait() if n == 5 else None)

            threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
            for t in threads:
                t.start()
            started.wait()
            os.kill(pid, signal.SIGUSR1)
            assert wait_for(lambda: victim.address in gateway.members.draining), "the gateway did not hear of the drain"
            assert gateway.node_info(victim.address).lending == "draining"
            for t in threads:
                t.join(120)
            assert [compare(g, w) for g, w in zip(got, want, strict=True)] == ["identical"] * 3
            assert not gateway.recoveries  # they finished on the draining node, not by moving

            # new requests: a route without it (its span came from the replica: no weights sent)
            assert wait_for(lambda: victim.address not in [s.address for s in gateway.route])
            assert victim.address not in [a for holders in gateway.holders.values() for a in holders]
            session_route = gateway.open_session(64).route
            assert victim.address not in [s.address for s in session_route]
            assert compare(answer(gateway, prompts[0], params), want[0]) == "identical"
            assert gateway.weight_bytes_sent == weights_before
            assert wait_for(lambda: gateway.node_info(victim.address).lending == "unavailable")

            os.kill(pid, signal.SIGUSR2)  # lent again
            assert wait_for(lambda: victim.address not in gateway.members.draining)
            assert any(victim.address in holders for holders in gateway.holders.values())
            assert gateway.node_info(victim.address).lending == "available"
        finally:
            gateway.close()
