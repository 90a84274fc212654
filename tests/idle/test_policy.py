"""The lend policy on timelines: owner leaves and returns, unplugs, the battery runs down, the CPU heats up."""

from dataclasses import replace
from datetime import datetime

import pytest

from duskpool.idle.policy import (
    Lending,
    LendPolicy,
    LendState,
    Window,
    blockers,
    format_duration,
    parse_duration,
    parse_window,
    step,
)
from duskpool.idle.probes import MachineState, probe
from tests.idle.test_probes import mac_runner

A, D, U = Lending.AVAILABLE, Lending.DRAINING, Lending.UNAVAILABLE
T0 = 1_700_000_000.0
IDLE = LendPolicy()  # idle 5 min, settle 30 s, drain timeout 120 s


def away(seconds: float, **kw) -> MachineState:
    """A machine whose owner has been away `seconds`, on AC unless told otherwise."""
    return MachineState(**{"idle_seconds": seconds, "on_ac": True, **kw})


def lent(now: float = T0) -> LendState:
    return LendState(A, now, "idle 10 min")


def run(policy: LendPolicy, events: list[tuple[float, MachineState, int]], state: LendState | None = None):
    """Feed (now, machine, in_flight) readings through step(); the state after each."""
    state = state or LendState.initial(events[0][0])
    states = []
    for now, machine, in_flight in events:
        state = step(state, machine, now, in_flight, policy)
        states.append(state)
    return states


def first(states: list[LendState], lending: Lending) -> LendState:
    return next(s for s in states if s.lending is lending)


def transitions(states: list[LendState]) -> list[Lending]:
    return [s.lending for i, s in enumerate(states) if i == 0 or s.lending is not states[i - 1].lending]


# ---------------------------------------------------------------- the owner leaves and comes back


def test_idle_five_minutes_then_settle_makes_available():
    """The owner leaves at T0; probed every 10 s. Idle 5 min + 30 s settle -> lent at T0 + 330."""
    states = run(IDLE, [(T0 + t, away(t), 0) for t in range(0, 600, 10)])
    assert states[0] == LendState(U, T0, "user active now")
    assert states[29].reason == "user active 5 min ago"  # T0 + 290
    assert first(states, A).since == T0 + 330
    assert first(states, A).reason == "idle 6 min"
    assert transitions(states) == [U, A]


def test_without_settle_available_at_exactly_idle_after():
    states = run(replace(IDLE, settle_s=0), [(T0 + t, away(t), 0) for t in range(0, 400, 10)])
    assert first(states, A).since == T0 + 300


def test_user_returns_mid_request_drains_then_hands_back():
    p = IDLE
    s1 = step(lent(), away(1), T0 + 1, 2, p)
    assert (s1.lending, s1.since, s1.reason) == (D, T0 + 1, "user active 1 s ago; finishing 2 in flight")
    s2 = step(s1, away(3), T0 + 3, 1, p)
    assert (s2.lending, s2.since, s2.reason) == (D, T0 + 1, "user active 3 s ago; finishing 1 in flight")
    s3 = step(s2, away(0), T0 + 5, 0, p)
    assert (s3.lending, s3.since, s3.reason) == (U, T0 + 5, "user active now")
    # owner leaves again at T0 + 60: back in the pool 5 min + 30 s later, not before
    states = run(p, [(T0 + 60 + t, away(t), 0) for t in range(0, 400, 5)], s3)
    assert first(states, A).since == T0 + 60 + 330


def test_activity_with_nothing_in_flight_hands_back_at_once():
    assert step(lent(), away(0.4), T0, 0, IDLE) == LendState(U, T0, "user active now")


def test_owner_touching_the_mouse_during_a_drain_restarts_the_wait():
    """Draining because the owner came back; they leave again: the 5 min of idle start over, no flap back."""
    p = replace(IDLE, drain_timeout_s=None)
    states = run(p, [(T0 + t, away(t), 1) for t in range(0, 330, 10)], step(lent(), away(0), T0, 1, p))
    assert all(s.lending is D for s in states)
    assert states[-1].reason == "conditions met, lending in 10 s; finishing 1 in flight"


def test_idle_unknown_is_not_lent():
    s = step(LendState.initial(T0), MachineState(), T0, 0, IDLE)
    assert (s.lending, s.reason) == (U, "idle time unknown")


def test_no_local_user_lends_with_that_reason():
    states = run(IDLE, [(T0 + t, away(float("inf")), 0) for t in (0, 30)])
    assert (states[-1].lending, states[-1].reason) == (A, "no local user")


def test_display_must_sleep_when_asked():
    p = replace(IDLE, require_display_asleep=True, settle_s=0)
    assert step(LendState.initial(T0), away(600, display_asleep=False), T0, 0, p).reason == "display awake"
    assert step(LendState.initial(T0), away(600, display_asleep=True), T0, 0, p).lending is A
    assert step(LendState.initial(T0), away(600), T0, 0, p).lending is A  # no wrangler: not a reason to refuse


# ---------------------------------------------------------------- power


def test_unplug_with_require_ac_drains_and_replug_settles_back():
    p = replace(IDLE, require_ac=True)
    s = step(lent(), away(900, on_ac=False, battery_percent=90), T0, 1, p)
    assert (s.lending, s.reason) == (D, "on battery; finishing 1 in flight")
    states = run(p, [(T0 + t, away(900 + t), 1) for t in range(5, 60, 5)], s)  # plugged back in at T0 + 5
    assert transitions(states) == [D, A]
    assert first(states, A).since == T0 + 35


def test_unplug_without_require_ac_keeps_lending():
    assert step(lent(), away(900, on_ac=False, battery_percent=90), T0, 1, IDLE).lending is A


def test_low_battery_does_not_flap_at_the_threshold():
    """Min 50% on battery: lent down to 50%, handed back at 49%, lent again only at 55% (and after settle)."""
    p = replace(IDLE, min_battery=50)
    percents = [55, 52, 50, 49, 50, 49, 50, 51, 52, 54, 53, 54, 55, 55, 56, 56, 57]
    states = run(p, [(T0 + 10 * i, away(900, on_ac=False, battery_percent=b), 0) for i, b in enumerate(percents)],
                 lent())
    assert [s.lending for s in states] == [A] * 3 + [U] * 12 + [A] * 2
    assert states[3].reason == "battery 49% < 50%"
    assert states[9].reason == "battery 54% < 55%"
    assert states[12].reason == "conditions met, lending in 30 s"


def test_min_battery_applies_on_battery_only():
    p = replace(IDLE, min_battery=50, settle_s=0)
    assert step(LendState.initial(T0), away(900, on_ac=True, battery_percent=20), T0, 0, p).lending is A


def test_macbook_fixture_on_battery_below_minimum():
    machine = probe(T0, system="Darwin", run=mac_runner("macbook_battery"))
    s = step(LendState.initial(T0), machine, T0, 0, replace(IDLE, min_battery=50))
    assert (s.lending, s.reason) == (U, "battery 42% < 55%")
    s = step(lent(), machine, T0, 0, replace(IDLE, min_battery=50))
    assert (s.lending, s.reason) == (U, "battery 42% < 50%")


# ---------------------------------------------------------------- heat


def test_hot_cpu_hands_back_and_cools_below_the_hysteresis():
    p = IDLE  # 95 C, back at 85 C
    temps = [80, 94, 96, 93, 90, 86, 85, 84, 84, 84, 84]
    states = run(p, [(T0 + 10 * i, away(900, temp_c=c), 0) for i, c in enumerate(temps)], lent())
    assert [s.lending for s in states] == [A, A] + [U] * 7 + [A] * 2
    assert states[2].reason == "CPU at 96 C"
    assert states[4].reason == "CPU at 90 C, waiting for 85 C"


def test_hot_mac_fixture_is_throttled():
    machine = probe(T0, system="Darwin", run=mac_runner("mac_hot"))
    s = step(lent(), machine, T0, 3, IDLE)
    assert (s.lending, s.reason) == (D, "CPU throttled to 60% for heat; finishing 3 in flight")


def test_mac_thermal_warning_is_a_reason():
    assert blockers(away(900, thermal_warning=2), IDLE, T0, lending=True) == ["thermal warning level 2"]


def test_every_reason_is_listed():
    hot_unplugged = away(3, on_ac=False, battery_percent=10, temp_c=99, cpu_speed_limit=50)
    p = replace(IDLE, require_ac=True, min_battery=20)
    assert blockers(hot_unplugged, p, T0, lending=True) == [
        "user active 3 s ago", "on battery", "battery 10% < 20%", "CPU at 99 C", "CPU throttled to 50% for heat"]


def test_apple_silicon_heat_is_seen():
    """A fanless Air prints no CPU_Speed_Limit: its warning levels are the signal (fixture: air_hot, lid open)."""
    machine = replace(probe(T0, system="Darwin", run=mac_runner("air_hot")), lid_closed=False)
    s = step(lent(), machine, T0, 2, IDLE)
    assert (s.lending, s.reason) == (D, "thermal warning level 5; performance warning level 100 (throttled for heat); "
                                        "finishing 2 in flight")


def test_cool_apple_silicon_lends():
    machine = replace(probe(T0, system="Darwin", run=mac_runner("air_hot")), lid_closed=False, thermal_warning=0,
                      performance_warning=0)
    assert blockers(machine, IDLE, T0, lending=False) == []


# ---------------------------------------------------------------- the lid


def test_lid_closed_on_battery_is_never_lent():
    machine = probe(T0, system="Darwin", run=mac_runner("air_hot"))
    assert "lid closed on battery" in blockers(machine, LendPolicy(lend="idle", max_temp_c=None), T0, lending=False)
    assert step(lent(), away(900, lid_closed=True, on_ac=False), T0, 1, IDLE).lending is D


def test_lid_closed_on_ac_lends():
    """Clamshell mode (lid shut, external display, on power) keeps a Mac awake: it may be lent."""
    assert blockers(away(900, lid_closed=True, on_ac=True), IDLE, T0, lending=False) == []


# ---------------------------------------------------------------- the owner is there without touching anything


def film(seconds_idle: float, *players: str) -> MachineState:
    return away(seconds_idle, display_kept_on_by=players)


def test_a_film_holds_the_machine_and_its_end_counts_as_input():
    """The owner starts a film at T0 and touches nothing for 40 min; it ends at T0 + 30 min. HIDIdleTime passed
    idle_after long before: the display assertion is what says they are there. Lent 5 min + 30 s after the last
    probe that saw it (T0 + 1790)."""
    events = [(T0 + t, film(t, "IINA") if t < 1800 else away(t), 0) for t in range(0, 2400, 10)]
    states = run(IDLE, events)
    assert states[60].reason == "display kept on by IINA"  # 10 min in: HID idle alone would have lent it
    assert transitions(states) == [U, A]
    assert first(states, A).since == T0 + 1790 + 300 + 30
    assert states[181].reason == "user active 20 s ago"  # T0 + 1810


def test_a_film_starting_while_lent_drains():
    s = step(lent(), film(900, "QuickTime Player"), T0, 1, IDLE)
    assert (s.lending, s.reason) == (D, "display kept on by QuickTime Player; finishing 1 in flight")


def test_screen_sharing_counts_as_the_owner_at_the_machine():
    s = step(lent(), away(3600, remote_session=True), T0, 0, IDLE)
    assert (s.lending, s.reason) == (U, "someone on this Mac by Screen Sharing")
    later = step(s, away(3660, remote_session=False), T0 + 60, 0, IDLE)  # they hung up a minute later
    assert (later.lending, later.reason) == (U, "user active 60 s ago")


def test_macbook_fixture_watching_a_film():
    machine = replace(probe(T0, system="Darwin", run=mac_runner("macbook_ac")), idle_seconds=3600)
    assert blockers(machine, IDLE, T0, lending=True) == ["display kept on by IINA"]


def test_mac_mini_fixture_driven_by_screen_sharing():
    machine = probe(T0, system="Darwin", run=mac_runner("mac_mini"))  # HID idle an hour
    assert blockers(machine, IDLE, T0, lending=True) == ["someone on this Mac by Screen Sharing"]


# ---------------------------------------------------------------- drain timeout, always, never


def test_drain_timeout_hands_sessions_off_once():
    start = step(lent(), away(0), T0, 3, IDLE)
    states = run(IDLE, [(T0 + t, away(t), 3) for t in range(10, 160, 10)], start)
    ended = first(states, U)
    assert ended.since == T0 + 120 and ended.drain_timed_out
    assert ended.reason == "drain timed out with 3 in flight; user active 2 min ago"
    assert not any(s.drain_timed_out for s in states[states.index(ended) + 1:])


def test_no_drain_timeout_waits_for_the_requests():
    states = run(replace(IDLE, drain_timeout_s=None), [(T0 + t, away(0), 1) for t in range(0, 3600, 60)], lent())
    assert all(s.lending is D for s in states)


def test_lend_always_never_leaves_available():
    p = LendPolicy(lend="always", require_ac=True, min_battery=50)
    worst = [MachineState(), away(0, on_ac=False, battery_percent=5, temp_c=110, cpu_speed_limit=20)]
    states = run(p, [(T0 + i, worst[i % 2], i % 3) for i in range(20)])
    assert all(s == LendState(A, T0, "lend always") for s in states)


def test_lend_never_drains_a_lent_machine():
    p = LendPolicy(lend="never")
    s = step(lent(), away(900), T0, 1, p)
    assert (s.lending, s.reason) == (D, "lending off; finishing 1 in flight")
    states = run(p, [(T0 + t, away(900 + t), 0) for t in range(1, 600, 30)], s)
    assert all(x.lending is U and x.reason == "lending off" for x in states)


def test_policy_rejects_nonsense():
    with pytest.raises(ValueError, match="lend must be idle, always or never"):
        LendPolicy(lend="sometimes")
    with pytest.raises(ValueError, match="min_battery must be a percentage"):
        LendPolicy(min_battery=150)
    with pytest.raises(ValueError, match="must not be negative"):
        LendPolicy(idle_after_s=-1)


# ---------------------------------------------------------------- schedule windows


def at(*args: int) -> datetime:
    return datetime(*args)  # 2024-06-03 is a Monday


@pytest.mark.parametrize("when, inside", [
    (at(2024, 6, 3, 23, 0), True),  # Mon night
    (at(2024, 6, 4, 3, 0), True),  # Tue early: Monday night's window
    (at(2024, 6, 8, 3, 0), True),  # Sat early: Friday night's window
    (at(2024, 6, 3, 3, 0), False),  # Mon early: Sunday night is not in mon-fri
    (at(2024, 6, 7, 12, 0), False),  # Fri noon
    (at(2024, 6, 8, 22, 30), False),  # Sat night
    (at(2024, 6, 4, 7, 0), False),  # the end is exclusive
    (at(2024, 6, 4, 22, 0), True),  # the start is inclusive
])
def test_overnight_window(when, inside):
    assert parse_window("mon-fri 22:00-07:00").contains(when) is inside


def test_window_forms():
    assert parse_window("mon-fri 22:00-07:00") == Window(frozenset(range(5)), *map(datetime.time, (
        at(1, 1, 1, 22, 0), at(1, 1, 1, 7, 0))))
    weekend = parse_window("sat,sun 00:00-24:00")
    assert weekend.contains(at(2024, 6, 8, 0, 0)) and weekend.contains(at(2024, 6, 9, 23, 59))
    assert not weekend.contains(at(2024, 6, 10, 0, 0))
    assert parse_window("22:00-07:00").days == frozenset(range(7)) == parse_window("daily 01:00-02:00").days
    assert parse_window("fri-mon 09:00-17:00").days == {4, 5, 6, 0}
    assert parse_window("weekends 10:00-12:00").days == {5, 6}
    assert parse_window("mon,wed-fri 09:00-17:00").days == {0, 2, 3, 4}
    assert parse_window("Mon-Fri 18:00-24:00").contains(at(2024, 6, 3, 23, 59))


@pytest.mark.parametrize("spec", ["mon-fri 22:00-07:00", "sat-sun 00:00-24:00", "daily 09:30-17:00",
                                  "mon,wed-fri 18:00-24:00"])
def test_window_prints_what_it_parses(spec):
    assert str(parse_window(spec)) == spec
    assert parse_window(str(parse_window(spec))) == parse_window(spec)


@pytest.mark.parametrize("spec, message", [
    ("mon-fri", "expected \\[days\\] HH:MM-HH:MM"),
    ("", "expected \\[days\\] HH:MM-HH:MM"),
    ("funday 10:00-11:00", "bad days 'funday'"),
    ("mon-tue-wed 10:00-11:00", "bad days 'mon-tue-wed'"),
    ("mon 25:00-26:00", "bad time '25:00'"),
    ("mon 24:30-01:00", "bad time '24:30'"),
    ("mon 9-17", "bad time '9'"),
    ("mon fri 09:00-17:00", "expected \\[days\\] HH:MM-HH:MM"),
])
def test_window_errors_say_what_is_wrong(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_window(spec)


def test_schedule_gates_lending():
    p = replace(IDLE, windows=(parse_window("mon-fri 22:00-07:00"),), settle_s=0)
    monday_noon, monday_night = at(2024, 6, 3, 12, 0).timestamp(), at(2024, 6, 3, 23, 0).timestamp()
    s = step(LendState.initial(monday_noon), away(3600), monday_noon, 0, p)
    assert (s.lending, s.reason) == (U, "outside schedule mon-fri 22:00-07:00")
    assert step(s, away(3600), monday_night, 0, p).lending is A
    tuesday_seven = at(2024, 6, 4, 7, 0).timestamp()
    s = step(LendState(A, monday_night, "idle 1 h"), away(9 * 3600), tuesday_seven, 1, p)
    assert (s.lending, s.reason) == (D, "outside schedule mon-fri 22:00-07:00; finishing 1 in flight")


# ---------------------------------------------------------------- durations


@pytest.mark.parametrize("text, seconds", [("5m", 300), ("90s", 90), ("1h30m", 5400), ("2h", 7200), ("300", 300),
                                           ("1.5h", 5400), ("1d", 86400), (" 10M ", 600), ("1h0m5s", 3605),
                                           ("0s", 0)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text, message", [
    ("", "empty duration"),
    ("5x", "bad duration '5x': expected a number with units"),
    ("m5", "bad duration 'm5'"),
    ("-5m", "bad duration '-5m'"),
    ("5 m", "bad duration '5 m'"),
    ("30m1h", "largest first"),
    ("5m5m", "units must appear once each"),
    ("five minutes", "bad duration"),
])
def test_parse_duration_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_duration(text)


@pytest.mark.parametrize("seconds, text", [(3, "3 s"), (89, "89 s"), (420, "7 min"), (7500, "2 h 5 min"),
                                           (7200, "2 h")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text
