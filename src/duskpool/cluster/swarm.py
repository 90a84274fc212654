"""A local swarm: N node processes on loopback, for trying duskpool on one machine and for tests."""

import ctypes
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from duskpool.security import NodeIdentity, local_pool
from duskpool.weights.store import default_cache_dir

READY = re.compile(r"listening on (\S+:\d+)")
PR_SET_PDEATHSIG = 1  # linux/prctl.h
PARENT_DIED = signal.SIGRTMIN + 1 if sys.platform == "linux" else None  # what the kernel sends a node; see exit_with
PARENT_POLL_S = 0.5


class LocalSwarm:
    """Starts `n` `duskpool node` processes and stops them on close (or `with`).

    By default they listen on 127.0.0.1; `hosts[i]` and a command `prefixes[i]` (such as
    `ip netns exec NS`) run node i elsewhere, as the multi-host tests do. The swarm makes a throwaway
    pool (a CA, certificates for the nodes and for `gateway_identity`), so its links are mutual TLS like
    any pool's; `insecure=True` runs them in plaintext instead (debugging only).

    The nodes end with this process however it ends, SIGKILL included (`duskpool node --exit-with`).
    """

    def __init__(self, n: int, cache_root: Path | None = None, threads: int | None = None,
                 start_timeout: float = 120.0, hosts: list[str] | None = None,
                 prefixes: list[list[str]] | None = None, insecure: bool = False, backend: str = "auto"):
        if n < 1:
            raise ValueError("a swarm needs at least one node")
        self.pool = None if insecure else local_pool(n, address=None)
        self.gateway_identity: NodeIdentity | None = None if insecure else self.pool.gateway
        self.hosts = hosts or ["127.0.0.1"] * n
        self.threads, self.backend = threads, backend
        self.prefixes = prefixes or [[] for _ in range(n)]
        self.cache_root = cache_root or default_cache_dir() / "swarm"
        self.processes: list[subprocess.Popen] = []
        self.addresses: list[str] = []
        try:
            for i in range(n):
                self.processes.append(self._start(i, threads))
            self.addresses = [self._wait_ready(p, start_timeout) for p in self.processes]
        except BaseException:
            self.close()
            raise

    def _start(self, i: int, threads: int | None) -> subprocess.Popen:
        args = [*self.prefixes[i], sys.executable, "-m", "duskpool.cli.main", "node", "--host", self.hosts[i],
                "--port", "0", "--cache-dir", str(self.cache_root / f"node-{i}"), "--no-announce",
                "--lend", "always",  # the user started these nodes on their own machine, for now
                "--exit-with", str(os.getpid())]
        args += ["--identity", str(self.pool.node_dirs[i])] if self.pool is not None else ["--insecure"]
        if threads:
            args += ["--threads", str(threads)]
        args += ["--backend", self.backend]
        return subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=os.environ.copy())

    @staticmethod
    def _wait_ready(process: subprocess.Popen, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                raise RuntimeError(f"node process {process.pid} exited with code {process.wait()} before it was ready")
            match = READY.search(line)
            if match:
                # keep draining its stdout so the node never blocks on a full pipe
                threading.Thread(target=process.stdout.read, daemon=True).start()
                return match.group(1)
        raise RuntimeError(f"node process {process.pid} was not ready within {timeout:.0f} s")

    def restart(self, i: int, threads: int | None = None) -> str:
        """Start node i again (same cache dir and identity) after it stopped; its new address."""
        self.processes[i] = self._start(i, threads or self.threads)
        self.addresses[i] = self._wait_ready(self.processes[i], 120.0)
        return self.addresses[i]

    def kill(self, i: int) -> None:
        """Kill node i at once (SIGKILL, as a crash or a pulled plug would) and reap it."""
        self.processes[i].kill()
        self.processes[i].wait()

    def close(self) -> None:
        for p in self.processes:
            if p.poll() is None:
                p.terminate()
        for p in self.processes:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self.pool is not None:
            self.pool.close()

    def __enter__(self) -> "LocalSwarm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def exit_with(pid: int) -> None:
    """End this process (a swarm's node) with SIGTERM once process `pid` (its swarm) is gone, however it ended.

    A thread looks twice a second, on every OS. On Linux the kernel also tells at once (PR_SET_PDEATHSIG); it
    tells when the *thread* that started this process ends too, so the signal's handler looks before it ends.
    """
    try:
        parent = psutil.Process(pid)
    except psutil.NoSuchProcess:
        parent = None

    def gone() -> bool:
        try:
            return parent is None or not parent.is_running() or parent.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    def end() -> None:
        os.kill(os.getpid(), signal.SIGTERM)

    def watch() -> None:
        while not gone():
            time.sleep(PARENT_POLL_S)
        end()

    def parent_died(*_) -> None:
        if gone():
            end()

    if PARENT_DIED is not None and os.getppid() == pid:
        signal.signal(PARENT_DIED, parent_died)
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(PARENT_DIED))
    threading.Thread(target=watch, name="exit-with", daemon=True).start()  # also sees a swarm gone before prctl
