"""A node's sessions. Its lending state drives what it accepts: available -> draining (owner back, requests in
flight finish, no new session starts) -> unavailable -> available again, told to the gateway by the health
status. An ended session leaves nothing behind."""

import pytest
import torch
from grpc_health.v1 import health_pb2

from duskpool.backends.cpu.cache import KVCache
from duskpool.cluster.node import NodeService, Session
from duskpool.cluster.proto import duskpool_pb2 as pb
from duskpool.idle import Lending, LendPolicy, MachineState

AWAY = MachineState(idle_seconds=3600, on_ac=True)
BACK = MachineState(idle_seconds=0.5, on_ac=True)


def health_status(node: NodeService) -> int:
    return node.health.Check(health_pb2.HealthCheckRequest(), None).status


def new_session_refusal(node: NodeService) -> str | None:
    try:
        node._open_session(pb.ForwardRequest(session_id="new", position=0, context=64), "peer")
    except ValueError as e:
        return str(e)
    node.sessions.pop("new")
    return None


@pytest.fixture
def node(tmp_path):
    return NodeService(tmp_path, policy=LendPolicy(idle_after_s=300, settle_s=30, drain_timeout_s=120))


def test_owner_returns_mid_request_then_leaves_again(node):
    t = 1000.0
    assert node.update_lending(AWAY, t).lending is Lending.AVAILABLE
    assert new_session_refusal(node) is None
    node.sessions["a"] = Session("peer", 64)
    node.sessions["b"] = Session("peer", 64)

    state = node.update_lending(BACK, t + 2)
    assert state.lending is Lending.DRAINING and "2 in flight" in state.reason
    assert health_status(node) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert "not lent" in new_session_refusal(node)
    assert node.Info(pb.InfoRequest(), None).lending == "draining"
    assert set(node.sessions) == {"a", "b"}  # in flight: left to finish

    node.end_session("a")
    node.end_session("b")
    assert node.update_lending(BACK, t + 4).lending is Lending.UNAVAILABLE

    assert node.update_lending(AWAY, t + 10).lending is Lending.UNAVAILABLE  # not yet: it must settle
    state = node.update_lending(AWAY, t + 45)
    assert state.lending is Lending.AVAILABLE
    assert health_status(node) == health_pb2.HealthCheckResponse.SERVING
    assert new_session_refusal(node) is None


def test_a_drain_that_times_out_ends_the_sessions_for_the_gateway_to_move(node):
    t = 1000.0
    node.update_lending(AWAY, t)
    node.sessions["stuck"] = Session("peer", 64)
    assert node.update_lending(BACK, t + 1).lending is Lending.DRAINING
    assert node.update_lending(BACK, t + 60).lending is Lending.DRAINING
    state = node.update_lending(BACK, t + 200)
    assert state.drain_timed_out and not node.sessions


def test_lend_always_ignores_the_owner(tmp_path):
    node = NodeService(tmp_path, policy=LendPolicy(lend="always"))
    node.sessions["x"] = Session("peer", 64)
    assert node.update_lending(BACK, 1.0).lending is Lending.AVAILABLE
    assert new_session_refusal(node) is None


def test_the_owner_takes_the_machine_back_by_hand(tmp_path):
    node = NodeService(tmp_path, policy=LendPolicy(lend="always"))
    node.sessions["x"] = Session("peer", 64)
    node.hand_back(True)  # what `kill -USR1` on a node does
    assert node.lend_state.lending is Lending.DRAINING and "lending off" in node.lend_state.reason
    node.end_session("x")
    node.hand_back(False)  # `kill -USR2`: lent again
    assert node.lend_state.lending is Lending.AVAILABLE


def test_an_ended_session_leaves_nothing_in_memory(tmp_path):
    """KV buffers are zeroed when a session ends (by its gateway, by idling out, or by a drain timeout)."""
    node = NodeService(tmp_path)
    cache = KVCache(range(0, 2), 2, 8, 16)
    cache.k.normal_()
    cache.v.normal_()
    node.sessions["s"] = Session("peer", 16, caches={("m", 0, 2): cache})
    assert node.end_session("s") and "s" not in node.sessions
    assert torch.count_nonzero(cache.k) == 0 and torch.count_nonzero(cache.v) == 0


class RecordedAssertion:
    """Stands in for the Mac's sleep assertion (tests/idle/test_awake.py checks the real IOKit calls)."""

    error = None

    def __init__(self):
        self.held = False

    def acquire(self) -> bool:
        self.held = True
        return True

    def release(self) -> None:
        self.held = False


def test_the_machine_is_kept_awake_while_lent_and_let_sleep_once_handed_back(node):
    node.awake = RecordedAssertion()
    t = 1000.0
    node.update_lending(AWAY, t)
    assert node.awake.held, "lent: the machine must not idle-sleep under a request"
    node.sessions["a"] = Session("peer", 64)
    assert node.update_lending(BACK, t + 2).lending is Lending.DRAINING and node.awake.held  # finishing its work
    node.end_session("a")
    assert node.update_lending(BACK, t + 4).lending is Lending.UNAVAILABLE and not node.awake.held
    node.update_lending(AWAY, t + 10)
    assert node.update_lending(AWAY, t + 45).lending is Lending.AVAILABLE and node.awake.held
    node.close()
    assert not node.awake.held
