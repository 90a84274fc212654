"""Four hosts in network namespaces, one node each, the gateway in the root namespace."""

import pytest

from duskpool.cluster.gateway import Gateway
from duskpool.cluster.swarm import LocalSwarm
from duskpool.engine.runner import LocalEngine
from tests.cluster.netns import Hosts, unavailable_reason
from tests.cluster.test_pipeline import PROMPTS, chat_prompt, greedy_tokens

pytestmark = pytest.mark.slow


def test_four_hosts_give_the_single_process_tokens(tmp_path, bundled_model):
    reason = unavailable_reason()
    if reason:
        print(f"skipping: {reason}")
        pytest.skip(reason)
    local = LocalEngine.load(bundled_model)
    with Hosts(4) as hosts:
        print(f"links: {hosts.link}")
        with LocalSwarm(4, cache_root=tmp_path, hosts=[hosts.address(i) for i in range(4)],
                        prefixes=[hosts.exec_prefix(i) for i in range(4)]) as swarm:
            gateway = Gateway.start(bundled_model, swarm.addresses,
                                    identity=swarm.gateway_identity, even_split=True, progress=False)
            try:
                assert gateway.sink_address.startswith(hosts.subnet), "nodes must reach the gateway over the bridge"
                assert len(gateway.route) == 4
                for text in PROMPTS[:3]:
                    prompt = chat_prompt(local, text)
                    assert greedy_tokens(gateway, prompt, 16) == greedy_tokens(local, prompt, 16), text
            finally:
                gateway.close()
