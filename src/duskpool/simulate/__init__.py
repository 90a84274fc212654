"""`duskpool simulate`: the project's own planner, admission, routing, drain and recovery on a simulated office
of thousands of machines over a day (fleet.py: the machines and their owners; world.py: the simulation).

This package sits above cluster/: it imports the decisions (planner, route, admission, the batcher's selection,
the lending policy) and never the reverse.
"""

import math
import random
from dataclasses import dataclass

from duskpool.cluster import planner
from duskpool.idle.policy import LendPolicy
from duskpool.simulate.fleet import (
    HOUR,
    MACHINES,
    SHAPES,
    diurnal_demand,
    draw_lengths,
    draw_link,
    flops_per_row,
    laptop_policy,
    owner_day,
)
from duskpool.simulate.report import Report, report
from duskpool.simulate.world import Options, Request, SimNode, World

GATEWAY_MACHINE = "Mac mini M4 Pro 64GB"  # the trusted machine: wired, always on


@dataclass(frozen=True)
class Config:
    nodes: int = 50
    hours: float = 1.0
    shape: str = "70b-q4"
    seed: int = 0
    start_hour: float = 0.0  # the clock at the start (0: midnight, the start of a working day)
    requests_per_hour: float | None = None  # at the day's peak; None: one per node (a person asks once an hour)
    replicas: int = 0
    max_tokens: int | None = 1024  # what clients ask for; None: nothing, so a request reserves the whole context

    def validate(self) -> None:
        if self.nodes < 1:
            raise ValueError(f"--nodes must be at least 1, not {self.nodes}")
        if not self.hours > 0 or math.isinf(self.hours):
            raise ValueError(f"--hours must be a positive number, not {self.hours}")
        if self.shape not in SHAPES:
            raise ValueError(f"unknown --model-shape {self.shape!r}: choose one of {', '.join(SHAPES)}")
        if self.requests_per_hour is not None and self.requests_per_hour < 0:
            raise ValueError("--requests-per-hour must not be negative")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"--max-tokens must be at least 1, not {self.max_tokens}")
        if self.replicas < 0:
            raise ValueError(f"--replicas must be >= 0, not {self.replicas}")
        if not 0 <= self.start_hour < 24:
            raise ValueError(f"--start-hour must be in [0, 24), not {self.start_hour}")


def fleet(config: Config) -> tuple[SimNode, list[SimNode]]:
    """The gateway and `config.nodes` machines drawn from the office mix, each with its owner's days."""
    rng = random.Random(f"{config.seed}:fleet")
    by_name = {m.name: m for m in MACHINES}
    gateway = SimNode("gateway", by_name[GATEWAY_MACHINE], draw_link(rng, wifi=False), LendPolicy(lend="always"))
    days = math.ceil((config.start_hour + config.hours) / 24)
    nodes = []
    for i in range(config.nodes):
        machine = rng.choices(MACHINES, weights=[m.share for m in MACHINES])[0]
        wifi = machine.form == "laptop"
        policy = (LendPolicy(lend="always") if machine.form == "server"
                  else laptop_policy(rng) if machine.form == "laptop" else LendPolicy())
        owner = random.Random(f"{config.seed}:owner:{i}")
        node = SimNode(f"node-{i:04d}", machine, draw_link(rng, wifi), policy,
                       [owner_day(owner, machine.form, d * 24 * HOUR) for d in range(days)])
        nodes.append(node)
    return gateway, nodes


def requests(config: Config) -> list[Request]:
    """A Poisson process whose rate follows the working day (thinned from the peak rate)."""
    rng = random.Random(f"{config.seed}:requests")
    peak = (config.nodes if config.requests_per_hour is None else config.requests_per_hour) / HOUR
    start, end = config.start_hour * HOUR, (config.start_hour + config.hours) * HOUR
    out, t = [], start
    while peak > 0 and (t := t + rng.expovariate(peak)) < end:
        accept = rng.random() < diurnal_demand(t)
        prompt, answer = draw_lengths(rng)
        if accept:
            out.append(Request(t, prompt, answer))
    return out


def simulate(config: Config, progress=None, check: bool = True) -> tuple[Report, World]:
    """Run the simulation `config` describes; its report (and the world, for the plot and the tests)."""
    config.validate()
    shape = SHAPES[config.shape]
    model = shape.profile()
    gateway, nodes = fleet(config)
    options = Options(replicas=config.replicas, check=check, progress=progress, max_tokens=config.max_tokens)
    world = World(model, flops_per_row(model, shape.bits_per_weight), gateway, nodes, requests(config),
                  config.hours * HOUR, config.seed, options, start=config.start_hour * HOUR)
    try:
        world.run()
    except planner.ModelDoesNotFit as e:
        raise ValueError(f"the simulated pool cannot hold {config.shape} at the start: {e}") from None
    return report(world, config), world


__all__ = ["Config", "Report", "simulate"]
