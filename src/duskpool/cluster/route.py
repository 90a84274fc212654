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

    def __init__(self, message: str, route: tuple[RouteStage, ...] = ()):
        super().__init__(message)
        self.route = route  # the route the step ran on: where to look for a node that is gone
