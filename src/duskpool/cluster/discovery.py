"""Finding nodes on the LAN: nodes announce `_duskpool._tcp.local.` by mDNS, gateways browse for it."""

import socket
import time

from zeroconf import ServiceBrowser, ServiceInfo, Zeroconf

SERVICE_TYPE = "_duskpool._tcp.local."


class Announcement:
    """This node, announced on the LAN until `close`."""

    def __init__(self, node_id: str, port: int, addresses: list[str] | None = None, version: str = ""):
        self.zeroconf = Zeroconf()
        addresses = addresses or _lan_addresses()
        self.info = ServiceInfo(SERVICE_TYPE, f"{node_id}.{SERVICE_TYPE}", port=port,
                                addresses=[socket.inet_aton(a) for a in addresses],
                                properties={"node_id": node_id, "version": version})
        self.zeroconf.register_service(self.info)

    def close(self) -> None:
        self.zeroconf.unregister_service(self.info)
        self.zeroconf.close()


def browse(timeout: float = 3.0, interfaces: list[str] | None = None) -> list[str]:
    """HOST:PORT of every node that answers within `timeout` seconds, sorted."""
    zeroconf = Zeroconf(interfaces=interfaces) if interfaces else Zeroconf()
    found: set[str] = set()

    class Listener:
        def add_service(self, zc: Zeroconf, type_: str, name: str) -> None:
            info = zc.get_service_info(type_, name, timeout=int(timeout * 1000))
            if info is not None:
                found.update(f"{a}:{info.port}" for a in info.parsed_addresses())

        def update_service(self, zc: Zeroconf, type_: str, name: str) -> None:
            self.add_service(zc, type_, name)

        def remove_service(self, zc: Zeroconf, type_: str, name: str) -> None:
            pass

    browser = ServiceBrowser(zeroconf, SERVICE_TYPE, Listener())
    time.sleep(timeout)
    browser.cancel()
    zeroconf.close()
    return sorted(found)


def _lan_addresses() -> list[str]:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # TEST-NET address: picks the default route, sends nothing
            return [s.getsockname()[0]]
    except OSError:
        return ["127.0.0.1"]
