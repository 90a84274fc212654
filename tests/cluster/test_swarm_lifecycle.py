"""A `duskpool swarm` leaves no node behind, whether it is stopped (SIGTERM) or killed (SIGKILL)."""

import os
import re
import signal
import socket
import subprocess
import sys
import threading

import psutil
import pytest

from tests.conftest import wait_for


def start_swarm(tmp_path) -> tuple[subprocess.Popen, list[str]]:
    """`duskpool swarm --nodes 2` serving the bundled model on a free port; the process and its stderr lines."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "DUSKPOOL_HOME": str(tmp_path / "home")}
    env.pop("DUSKPOOL_API_KEY", None)
    swarm = subprocess.Popen([sys.executable, "-m", "duskpool.cli.main", "swarm", "--nodes", "2", "--threads", "1",
                              "--port", "0"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(swarm.stderr), daemon=True).start()
    up = wait_for(lambda: swarm.poll() is not None or any("duskpool: serving " in line for line in lines), 180)
    if not up or swarm.poll() is not None:
        swarm.kill()
        raise AssertionError(f"the swarm did not serve (exit code {swarm.wait()}):\n{''.join(lines)}")
    return swarm, lines


def listening_ports(process: psutil.Process) -> set[int]:
    return {c.laddr.port for c in process.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}


def running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # connections left in TIME_WAIT do not count
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_stopped_or_killed_swarm_leaves_no_node_behind(tmp_path, how):
    swarm, lines = start_swarm(tmp_path)
    nodes = psutil.Process(swarm.pid).children(recursive=True)
    try:
        http_port = int(re.search(r"duskpool: serving .* at http://127\.0\.0\.1:(\d+)", "".join(lines)).group(1))
        node_ports = set().union(*(listening_ports(node) for node in nodes))
        assert len(nodes) == 2 and len(node_ports) == 2, f"{nodes} listening on {node_ports}"
        ports = node_ports | {http_port}
        assert not any(port_is_free(port) for port in ports)

        swarm.send_signal(how)
        assert wait_for(lambda: not any(map(running, nodes)) and all(map(port_is_free, ports)), timeout=5), (
            f"5 s after {how.name}: still running {[n.pid for n in nodes if running(n)]}, "
            f"ports taken {[p for p in ports if not port_is_free(p)]}")
        code = swarm.wait(timeout=10)
        assert code == (143 if how == signal.SIGTERM else -signal.SIGKILL), "".join(lines)
    finally:
        for process in [*nodes, psutil.Process(swarm.pid)] if swarm.poll() is None else nodes:
            if running(process):
                process.kill()
        swarm.wait(timeout=10)
