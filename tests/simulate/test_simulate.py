"""`duskpool simulate`: deterministic for a seed, fast enough for CI, its invariants checked throughout, and its CLI."""

import json
import time

import pytest

from duskpool.cli.main import main
from duskpool.cluster.planner import PlanConfig
from duskpool.cluster.route import take_loaded
from duskpool.idle.policy import LendPolicy
from duskpool.simulate import Config, simulate
from duskpool.simulate.fleet import HOUR, MACHINES, SHAPES, Day, Link, flops_per_row
from duskpool.simulate.world import InvariantViolated, Options, Request, SimNode, World

REQUIRED = ("tokens_per_s", "ttft_p50_s", "token_latency_p99_s", "completed_fraction")
STUDIO = next(m for m in MACHINES if m.name.startswith("Mac Studio M2 Ultra"))
LAN = Link("ethernet", 0.4, 0.0, 117e6)


def test_the_same_seed_gives_the_same_json_and_another_seed_another():
    config = Config(nodes=30, hours=0.5, start_hour=8.5, seed=3)  # people arriving: drains, joins, loads
    first, _ = simulate(config)
    again, _ = simulate(config)
    other, _ = simulate(Config(nodes=30, hours=0.5, start_hour=8.5, seed=4))
    assert json.dumps(first.to_dict()) == json.dumps(again.to_dict())
    assert first.to_dict() != other.to_dict()


def test_50_nodes_for_an_hour_of_the_morning_in_well_under_a_minute_with_every_request_accounted_for():
    started = time.monotonic()
    report, world = simulate(Config(nodes=50, hours=1, start_hour=8.5, seed=1))  # the churniest hour
    assert time.monotonic() - started < 30
    assert world.invariant_checks > 60  # every membership change and every sample
    assert report.drains > 0 and report.requests_arrived > 10
    # World._account raised otherwise; here it is spelled out
    assert report.requests_arrived == (report.requests_completed + sum(report.requests_lost.values())
                                       + report.requests_unfinished)
    assert all(isinstance(reason, str) and reason for reason in report.requests_lost)
    assert report.tokens_generated > 0 and report.ttft_p50_s is not None


def _world(n_nodes: int, requests: list[Request], hours: float = 1.0, replicas: int = 1) -> World:
    """Dedicated Mac Studios (always lent, no owner) on a LAN: the 8B model fits on any one."""
    day = Day((), ((0.0, 48 * HOUR),), True)
    nodes = [SimNode(f"studio-{i}", STUDIO, LAN, LendPolicy(lend="always"), [day, day]) for i in range(n_nodes)]
    gateway = SimNode("gateway", STUDIO, LAN, LendPolicy(lend="always"))
    model = SHAPES["8b-q4"].profile()
    options = Options(config=PlanConfig(privacy_prefix=2, privacy_suffix=1), replicas=replicas)
    return World(model, flops_per_row(model), gateway, nodes, requests, hours * HOUR, seed=0, options=options)


def test_a_route_node_that_dies_mid_generation_is_replaced_and_its_sessions_finish():
    requests = [Request(1.0 + i / 4, 200, 1000) for i in range(4)]  # ~10 ms a token: all generating at 5 s
    world = _world(3, requests)
    world.run  # noqa: B018 - set up by hand below, to kill a node at a known time
    for node in world.nodes.values():
        world._schedule_owner(node)
    world._first_plan()
    victim = world.nodes[world.route[0][1]]
    world.env.process(world._arrivals())
    world.env.process(world._sampler())
    world.at(5.0, world._crash, victim, 1e-12)  # one crash, never another
    world.env.run(until=HOUR)
    world._account()
    assert world.completed == 4 and not world.lost
    assert world.deaths >= 1 and world.replans >= 1 and world.recovery.n == 4
    assert all(node_id != victim.id or victim.awake for _, node_id in world.route)


def test_one_session_decodes_at_the_planners_predicted_speed_plus_the_gateways_own_layers():
    """At batch 1 a token costs what the planner predicts (its stages' layers and the hops into them) plus what the
    gateway's profile leaves out (membership.GATEWAY_PROFILE: 0 ms per layer, no link): its own layers and head, and
    the hop back into it."""
    world = _world(3, [Request(1.0, 16, 200)], replicas=0)
    exact = Link("ethernet", 0.4, 0.0, 125e6)  # the bandwidth the planner assumes, no jitter
    for node in [world.gateway, *world.nodes.values()]:
        node.link, node.overhead_ms = exact, 0.0
    world.run()
    gateway = world.gateway
    own = (gateway.forward_ms(3, world.model.layer_bytes, 1, 0, world.flops) + world._head_ms(1)
           + exact.rtt_ms / 2 + 1000 * world.model.hidden_bytes_per_token / exact.bandwidth_bytes_per_s)
    expected_s = (world.plan.predicted_ms_per_token + own) / 1000
    # the simulator also reads the session's KV at every layer (here under 1% of the weights' bytes); the
    # histogram's buckets are 1% wide
    assert world.token_latency.quantile(0.5) == pytest.approx(expected_s, rel=0.015)


@pytest.mark.parametrize(("sessions", "busy_at_once"), [(1, (0.5, 1.0)), (16, (2.0, 4.0))])
def test_a_routes_micro_batches_keep_its_machines_computing_side_by_side(sessions, busy_at_once):
    """16 generations on a route of 3 nodes and the gateway travel it as one micro-batch per stage
    (batcher.micro_batch), so on average more than two of the 4 machines compute at once; one generation keeps
    at most one busy at a time (one batch at a time could never do more than that)."""
    world = _world(3, [Request(1.0, 64, 1000) for _ in range(sessions)], hours=10 / 3600, replicas=0)
    world.options.even = True  # a stage on each node
    world.run()
    assert len(world.route) == 3 and world.tokens > 0
    machines = [world.gateway, *world.nodes.values()]
    low, high = busy_at_once
    assert low < sum(m.busy_s for m in machines) / (10.0 - 1.0) <= high


def test_the_invariant_checker_catches_a_span_left_uncovered_while_a_node_has_room():
    world = _world(3, [])
    for node in world.nodes.values():
        world._schedule_owner(node)
    world._first_plan()
    world.check()  # fine as planned
    span = world.spans[0]
    world.holders[span].clear()  # as if a node were dropped without the reroute the gateway does
    with pytest.raises(InvariantViolated, match="no holder though"):
        world.check()


def test_a_node_that_stops_lending_while_it_loads_a_span_holds_it_only_once_it_lends_again():
    holders = {(2, 10): ["a"]}
    draining = {"b": []}
    assert not take_loaded(holders, draining, "b", (2, 10))  # its owner came back during the load
    assert holders == {(2, 10): ["a"]} and draining == {"b": [(2, 10)]}
    assert take_loaded(holders, {}, "c", (2, 10)) and holders[(2, 10)] == ["a", "c"]
    assert not take_loaded(holders, {}, "c", (2, 10))  # already a holder


def test_the_cli_prints_one_json_object_with_the_required_keys(capsys):
    assert main(["simulate", "--nodes", "20", "--hours", "0.25", "--start-hour", "10", "--json", "--seed", "2"]) == 0
    out = capsys.readouterr()
    report = json.loads(out.out)
    for key in REQUIRED:
        assert key in report, key
    assert 0 <= report["completed_fraction"] <= 1
    assert "done in" in out.err  # progress and timing go to stderr, not into the JSON


@pytest.mark.parametrize("argv, message", [
    (["--nodes", "0"], "--nodes must be at least 1"),
    (["--model-shape", "7b-fp16"], "unknown --model-shape '7b-fp16': choose one of 8b-q4"),
    (["--hours", "-1"], "--hours must be a positive number"),
])
def test_bad_input_exits_non_zero_and_says_why(capsys, argv, message):
    assert main(["simulate", *argv]) != 0
    assert message in capsys.readouterr().err
