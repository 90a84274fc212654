"""mDNS: a node announced in one network namespace is found by a gateway browsing from another."""

import subprocess
import sys

import pytest

from duskpool.cluster.discovery import browse
from duskpool.cluster.swarm import READY
from tests.cluster.netns import Hosts, unavailable_reason

pytestmark = pytest.mark.slow


def test_a_node_on_the_lan_is_found_by_browsing(tmp_path):
    reason = unavailable_reason()
    if reason:
        print(f"skipping: {reason}")
        pytest.skip(reason)
    with Hosts(1) as hosts:
        node = subprocess.Popen([*hosts.exec_prefix(0), sys.executable, "-m", "duskpool.cli.main", "node",
                                 "--host", hosts.address(0), "--port", "0", "--cache-dir", str(tmp_path), "--insecure"],
                                stdout=subprocess.PIPE, text=True)
        try:
            address = READY.search(node.stdout.readline()).group(1)
            assert address in browse(timeout=3.0, interfaces=[f"{hosts.subnet}.1"])
        finally:
            node.terminate()
            node.wait(10)
