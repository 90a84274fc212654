"""A node counted gone that answers again (a frozen process, a link back up) rejoins by itself."""

import os
import signal

import pytest

from duskpool.cluster.gateway import Gateway
from duskpool.cluster.swarm import LocalSwarm
from tests.cluster.chaos import answer, chat_prompt, compare, greedy
from tests.conftest import wait_for

pytestmark = pytest.mark.slow



def test_a_frozen_node_is_counted_gone_then_rejoins_when_it_thaws(tmp_path, bundled_model):
    with LocalSwarm(3, cache_root=tmp_path) as swarm:
        gateway = Gateway.start(bundled_model, swarm.addresses, identity=swarm.gateway_identity, even_split=True,
                                replicas=1, progress=False)
        try:
            prompt, params = chat_prompt(gateway, "Name three rivers."), greedy(24)
            want = answer(gateway, prompt, params)
            victim = gateway.route[1]
            pid = swarm.processes[swarm.addresses.index(victim.address)].pid
            holds = {span for span, holders in gateway.holders.items() if victim.address in holders}
            os.kill(pid, signal.SIGSTOP)  # alive, but answers nothing: keepalive pings time out
            try:
                assert wait_for(lambda: victim.address in gateway.members.gone, 10), "the frozen node was not noticed"
                assert compare(answer(gateway, prompt, params), want) == "identical"  # served by the replicas
            finally:
                os.kill(pid, signal.SIGCONT)
            assert wait_for(lambda: victim.address not in gateway.members.gone, 20), "it did not rejoin"
            assert wait_for(lambda: {span for span, holders in gateway.holders.items()
                                     if victim.address in holders} == holds, 20)
            assert compare(answer(gateway, prompt, params), want) == "identical"
        finally:
            gateway.close()
