"""Several hosts on one Linux machine: network namespaces on a bridge, LAN-like links (needs root and `ip`)."""

import os
import shutil
import subprocess
from dataclasses import dataclass, field


def unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "multi-host tests need root (network namespaces)"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "multi-host tests need the `ip` and `tc` commands (iproute2)"
    return None


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True)


@dataclass
class Hosts:
    """`n` namespaces 10.N.0.11.. on bridge 10.N.0.1 (the root namespace, where the gateway runs)."""

    n: int
    delay_ms: float = 2.0
    rate: str = "1gbit"
    tag: str = field(default_factory=lambda: f"dp{os.getpid() % 10000}")
    link: str = ""  # what the links really emulate, for the report

    @property
    def subnet(self) -> str:
        return f"10.{100 + os.getpid() % 100}.0"

    @property
    def bridge(self) -> str:
        return f"{self.tag}br"

    def namespace(self, i: int) -> str:
        return f"{self.tag}ns{i}"

    def address(self, i: int) -> str:
        return f"{self.subnet}.{11 + i}"

    def exec_prefix(self, i: int) -> list[str]:
        return ["ip", "netns", "exec", self.namespace(i)]

    def __enter__(self) -> "Hosts":
        try:
            self._check(_run("ip", "link", "add", self.bridge, "type", "bridge"))
            self._check(_run("ip", "addr", "add", f"{self.subnet}.1/24", "dev", self.bridge))
            self._check(_run("ip", "link", "set", self.bridge, "up"))
            for i in range(self.n):
                ns, veth = self.namespace(i), f"{self.tag}v{i}"
                self._check(_run("ip", "netns", "add", ns))
                self._check(_run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns))
                self._check(_run("ip", "link", "set", veth, "master", self.bridge, "up"))
                self._check(_run(*self.exec_prefix(i), "ip", "addr", "add", f"{self.address(i)}/24", "dev", "eth0"))
                self._check(_run(*self.exec_prefix(i), "ip", "link", "set", "eth0", "up"))
                self._check(_run(*self.exec_prefix(i), "ip", "link", "set", "lo", "up"))
                self.link = self._shape(i)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _shape(self, i: int) -> str:
        """netem delay + rate on the host's link; kernels without netem get the rate alone (tbf)."""
        netem = _run(*self.exec_prefix(i), "tc", "qdisc", "add", "dev", "eth0", "root", "netem",
                     "delay", f"{self.delay_ms}ms", "rate", self.rate)
        if netem.returncode == 0:
            return f"netem delay {self.delay_ms} ms, rate {self.rate}"
        self._check(_run(*self.exec_prefix(i), "tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", self.rate,
                         "burst", "256kbit", "latency", "50ms"))
        return f"rate {self.rate} (tbf); no delay: this kernel has no netem ({netem.stderr.strip()})"

    @staticmethod
    def _check(done: subprocess.CompletedProcess) -> None:
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(done.args)}: {done.stderr.strip()}")

    def __exit__(self, *exc) -> None:
        for i in range(self.n):
            _run("ip", "netns", "del", self.namespace(i))
        _run("ip", "link", "del", self.bridge)
