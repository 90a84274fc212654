"""Lend this machine only while its owner is away: per-OS probes, a lend policy and its state machine, and the
service files that keep a node running. Standard library only.

    state = LendState.initial(time.time())
    every few seconds: state = step(state, probe(), time.time(), in_flight, policy)
    while state.lending is not Lending.UNAVAILABLE: hold a SleepAssertion (a Mac stays awake under its requests)
"""

from duskpool.idle.awake import SleepAssertion
from duskpool.idle.policy import Lending, LendPolicy, LendState, Window, parse_duration, parse_window, step
from duskpool.idle.probes import MachineState, performance_cores, probe

__all__ = ["LendPolicy", "LendState", "Lending", "MachineState", "SleepAssertion", "Window", "parse_duration",
           "parse_window", "performance_cores", "probe", "step"]
