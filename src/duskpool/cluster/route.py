"""A route: the nodes a step runs through, one stage each, between the gateway's prefix and suffix layers.

`RouteStage` is the gateway's own record of a stage; `wire.stages_to_wire` is the one place it becomes the
protocol's `Stage` (which leaves out the node id: a node is reached by its address).
"""

from dataclasses import dataclass

Span = tuple[int, int]  # layers [start, stop)


@dataclass(frozen=True)
class RouteStage:
    node_id: str
    address: str
    start: int
    stop: int  # the node runs layers [start, stop)

    @property
    def span(self) -> Span:
        return self.start, self.stop


class RouteError(RuntimeError):
    """A step could not complete on the route (a node failed, vanished or refused)."""

    def __init__(self, message: str, route: tuple[RouteStage, ...] = (), short: str | None = None):
        super().__init__(message)
        self.route = route  # the route the step ran on: where to look for a node that is gone
        self.short = short  # the address of a node that lacked memory it claimed to lend (None: no such node)


# --- which node runs each span: pure decisions over the holders, which cluster/membership.py keeps and the simulator
# (simulate/) drives alike. `holders`: span -> the addresses of the live nodes that hold it, its route node first.
def held_by(holders: dict[Span, list[str]], address: str) -> list[Span]:
    """The spans the node at `address` holds."""
    return [span for span, addresses in holders.items() if address in addresses]


def orphans(spans: list[Span], holders: dict[Span, list[str]]) -> list[Span]:
    """The spans no live node holds: they must be loaded somewhere before a route can run."""
    return [span for span in spans if not holders[span]]


def rebuild(spans: list[Span], holders: dict[Span, list[str]], current: dict[Span, str]) -> list[tuple[Span, str]]:
    """The route as (span, address), every span held: keep a span's current node while it holds it (its sessions'
    KV stays useful), else take its first holder not on the route yet (a node runs one stage if it can)."""
    route, used = [], set()
    for span in spans:
        live = holders[span]
        address = current.get(span) if current.get(span) in live else ([a for a in live if a not in used] or live)[0]
        used.add(address)
        route.append((span, address))
    return route


def take_loaded(holders: dict[Span, list[str]], draining: dict[str, list[Span]], address: str, span: Span) -> bool:
    """The node at `address` finished loading `span`: it holds it now (True), or, if it stopped lending during the load
    (its owner came back; a span takes minutes over Wi-Fi), once it lends again. A draining node put among the holders
    would be put on the route, and refuse every new session there."""
    if address in draining:
        if span not in draining[address]:
            draining[address].append(span)
        return False
    if address in holders[span]:
        return False
    holders[span].append(address)
    return True
