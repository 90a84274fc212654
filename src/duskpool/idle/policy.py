"""When this machine is lent to the pool: a policy (from flags) and a pure state machine over probe readings.

    available --(owner back / unplugged / low battery / hot / lid shut on battery / outside schedule)--> draining
                                                                                         (requests in flight)
    available --(same, nothing in flight)--------------------------------------> unavailable
    draining  --(in_flight == 0, or drain_timeout_s passed: hand sessions off)--> unavailable
    draining, unavailable --(conditions held for settle_s)----------------------> available

Leaving is immediate: any input resets the idle time, so the next step hands the machine back. Coming back is
slow on purpose: the owner must be away idle_after_s, the battery must be battery_hysteresis above the minimum,
the CPU temp_hysteresis_c below the limit, and all of it must hold settle_s, so a value sitting on a threshold
does not flap the node in and out of the pool. No clocks inside: the caller passes `now` (seconds since epoch).

The owner can be there without touching anything: watching a film or presenting (an app keeps the display on),
or at another machine driving this one by Screen Sharing (its input does not reach HIDIdleTime). Those count as
input while they last, so the owner must then be away idle_after_s after the film ends, as after a keystroke.
"""

import math
import re
from dataclasses import dataclass, field, replace
from datetime import datetime, time
from enum import StrEnum

from duskpool.idle.probes import MachineState

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
DAY_GROUPS = {"daily": range(7), "weekdays": range(5), "weekends": range(5, 7)}
UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_duration(text: str) -> float:
    """Seconds in "90s", "5m", "1h30m", "2h", "1.5h", "1d" or a bare number of seconds ("300")."""
    s = text.strip().lower()
    if not s:
        raise ValueError("empty duration: expected e.g. 90s, 5m, 1h30m")
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return float(s)
    parts = re.findall(r"(\d+(?:\.\d+)?)([dhms])", s)
    if "".join(n + u for n, u in parts) != s:
        raise ValueError(f"bad duration {text!r}: expected a number with units d, h, m, s, e.g. 90s, 5m, 1h30m")
    units = [u for _, u in parts]
    if units != sorted(set(units), key="dhms".index):
        raise ValueError(f"bad duration {text!r}: units must appear once each, largest first (1h30m, not 30m1h)")
    return sum(float(n) * UNITS[u] for n, u in parts)


def format_duration(seconds: float) -> str:
    """Short human form for reasons: "3 s", "7 min", "2 h 5 min"."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    h, m = divmod(round(seconds / 60), 60)
    return f"{h} h {m} min" if m else f"{h} h"


@dataclass(frozen=True)
class Window:
    """Days and a time of day when lending is allowed. start > end runs overnight into the next day, and counts
    for the day it starts on: "fri 22:00-07:00" includes Saturday 03:00. start == end is the whole day."""
    days: frozenset[int]  # 0 = Monday
    start: time
    end: time

    def contains(self, dt: datetime) -> bool:
        t, day, yesterday = dt.time(), dt.weekday(), (dt.weekday() - 1) % 7
        if self.start == self.end:
            return day in self.days
        if self.start < self.end:
            return day in self.days and self.start <= t < self.end
        return (day in self.days and t >= self.start) or (yesterday in self.days and t < self.end)

    def __str__(self) -> str:
        return f"{_format_days(self.days)} {self.start:%H:%M}-{'24:00' if self.end == time(0) else f'{self.end:%H:%M}'}"


def _format_days(days: frozenset[int]) -> str:
    """The shortest spelling parse_window reads back: "daily", "mon-fri", "mon,wed,fri"."""
    if len(days) == 7:
        return "daily"
    runs: list[list[int]] = []
    for d in sorted(days):
        if runs and runs[-1][-1] == d - 1:
            runs[-1].append(d)
        else:
            runs.append([d])
    return ",".join(DAYS[r[0]] if len(r) == 1 else f"{DAYS[r[0]]}-{DAYS[r[-1]]}" for r in runs)


def _parse_time(text: str, spec: str) -> time:
    m = re.fullmatch(r"(\d{1,2}):(\d\d)", text)
    if not m or int(m.group(1)) > 24 or int(m.group(2)) > 59 or (int(m.group(1)) == 24 and int(m.group(2))):
        raise ValueError(f"bad time {text!r} in window {spec!r}: expected HH:MM, 00:00 to 24:00")
    return time(int(m.group(1)) % 24, int(m.group(2)))


def _parse_days(text: str, spec: str) -> frozenset[int]:
    days: set[int] = set()
    for part in text.split(","):
        if part in DAY_GROUPS:
            days.update(DAY_GROUPS[part])
            continue
        ends = part.split("-")
        if len(ends) > 2 or any(e not in DAYS for e in ends):
            raise ValueError(f"bad days {part!r} in window {spec!r}: expected e.g. mon-fri, sat,sun, daily, weekends")
        a, b = DAYS.index(ends[0]), DAYS.index(ends[-1])
        days.update((a + i) % 7 for i in range((b - a) % 7 + 1))  # fri-mon wraps over the weekend
    return frozenset(days)


def parse_window(spec: str) -> Window:
    """"mon-fri 22:00-07:00", "sat,sun 00:00-24:00", "daily 09:00-17:00", or just "22:00-07:00" (every day)."""
    words = spec.strip().lower().split()
    if len(words) not in (1, 2) or not re.fullmatch(r"[\d:]+-[\d:]+", words[-1]):
        raise ValueError(f"bad window {spec!r}: expected [days] HH:MM-HH:MM, e.g. 'mon-fri 22:00-07:00'")
    start, end = (_parse_time(t, spec) for t in words[-1].split("-"))
    days = _parse_days(words[0], spec) if len(words) == 2 else frozenset(range(7))
    return Window(days, start, end)


@dataclass(frozen=True)
class LendPolicy:
    lend: str = "idle"  # "idle": when the owner is away and the checks pass; "always": dedicated machine; "never"
    idle_after_s: float = 300.0  # the owner must have been away this long
    require_ac: bool = False
    min_battery: float | None = None  # %, checked only on battery power
    battery_hysteresis: float = 5.0  # lend again only at min_battery + this
    max_temp_c: float | None = 95.0  # hottest thermal zone (Linux)
    temp_hysteresis_c: float = 10.0  # lend again only at max_temp_c - this
    min_cpu_speed: int | None = 70  # macOS CPU_Speed_Limit %: below it the Mac is throttling for heat
    require_display_asleep: bool = False  # also wait for the display to sleep (someone may be watching a film)
    windows: tuple[Window, ...] = field(default_factory=tuple)  # lend only inside one of these; () = any time
    settle_s: float = 30.0  # conditions must hold this long before lending again
    drain_timeout_s: float | None = 120.0  # then in-flight sessions are handed off; None = wait for them

    def __post_init__(self):
        if self.lend not in ("idle", "always", "never"):
            raise ValueError(f"lend must be idle, always or never, not {self.lend!r}")
        if self.min_battery is not None and not 0 <= self.min_battery <= 100:
            raise ValueError(f"min_battery must be a percentage 0-100, not {self.min_battery}")
        if min(self.idle_after_s, self.settle_s, self.battery_hysteresis, self.temp_hysteresis_c) < 0:
            raise ValueError("durations and hysteresis must not be negative")


class Lending(StrEnum):
    AVAILABLE = "available"  # takes new sessions
    DRAINING = "draining"  # takes none, finishes those in flight
    UNAVAILABLE = "unavailable"  # the owner has the machine


@dataclass(frozen=True)
class LendState:
    lending: Lending
    since: float  # when `lending` last changed
    reason: str  # for Info and the dashboard: "idle 7 min", "user active 3 s ago", "battery 42% < 50%"
    ok_since: float | None = None  # while not available: since when every condition has held
    drain_timed_out: bool = False  # set on the step draining ended by timeout: hand the in-flight sessions off
    present_at: float | None = None  # the last step that saw the owner present without input (film, Screen Sharing)

    @classmethod
    def initial(cls, now: float) -> "LendState":
        return cls(Lending.UNAVAILABLE, now, "starting")


def presence(machine: MachineState) -> str | None:
    """Why the owner is there though no input arrives, or None: a Screen Sharing session, an app keeping the display
    on (a video player, a call, a slideshow)."""
    if machine.remote_session:
        return "someone on this Mac by Screen Sharing"
    if machine.display_kept_on_by:
        return "display kept on by " + ", ".join(machine.display_kept_on_by)
    return None


def blockers(machine: MachineState, policy: LendPolicy, now: float, lending: bool,
             present_at: float | None = None) -> list[str]:
    """Why the machine must not be lent now, as reasons ([] = lend). `lending` picks the thresholds:
    a lent machine is kept down to min_battery and up to max_temp_c; one not lent waits for the hysteresis.
    `present_at` is the last time the owner was seen present without input: it counts as their last input."""
    out = []
    if policy.windows and not any(w.contains(datetime.fromtimestamp(now)) for w in policy.windows):
        out.append("outside schedule " + "; ".join(map(str, policy.windows)))
    idle = machine.idle_seconds
    if present_at is not None and idle is not None:
        idle = min(idle, max(0.0, now - present_at))
    if (here := presence(machine)) is not None:
        out.append(here)
    elif idle is None:
        out.append("idle time unknown")
    elif idle < policy.idle_after_s:
        out.append("user active now" if idle < 1 else f"user active {format_duration(idle)} ago")
    if policy.require_display_asleep and machine.display_asleep is False:
        out.append("display awake")
    if policy.require_ac and machine.on_ac is False:
        out.append("on battery")
    if machine.lid_closed and machine.on_ac is False:  # macOS sleeps it whatever we hold: never lend it
        out.append("lid closed on battery")
    if policy.min_battery is not None and machine.on_ac is False and machine.battery_percent is not None:
        need = policy.min_battery + (0 if lending else policy.battery_hysteresis)
        if machine.battery_percent < need:
            out.append(f"battery {machine.battery_percent:.0f}% < {need:.0f}%")
    if policy.max_temp_c is not None and machine.temp_c is not None:
        limit = policy.max_temp_c - (0 if lending else policy.temp_hysteresis_c)
        if machine.temp_c > limit:
            out.append(f"CPU at {machine.temp_c:.0f} C" + ("" if lending else f", waiting for {limit:.0f} C"))
    if policy.min_cpu_speed is not None and machine.cpu_speed_limit is not None:
        if machine.cpu_speed_limit < policy.min_cpu_speed:
            out.append(f"CPU throttled to {machine.cpu_speed_limit}% for heat")
    if machine.thermal_warning:
        out.append(f"thermal warning level {machine.thermal_warning}")
    if machine.performance_warning:
        out.append(f"performance warning level {machine.performance_warning} (throttled for heat)")
    return out


def _lend_reason(machine: MachineState) -> str:
    idle = machine.idle_seconds
    return "no local user" if idle is None or math.isinf(idle) else f"idle {format_duration(idle)}"


def step(state: LendState, machine: MachineState, now: float, in_flight: int, policy: LendPolicy) -> LendState:
    """The next lending state, from the last one, a fresh probe and the number of requests in flight."""
    present_at = now if presence(machine) is not None else state.present_at
    return replace(_step(state, machine, now, in_flight, policy, present_at), present_at=present_at)


def _step(state: LendState, machine: MachineState, now: float, in_flight: int, policy: LendPolicy,
          present_at: float | None) -> LendState:
    if policy.lend == "always":
        return LendState(Lending.AVAILABLE, state.since if state.lending is Lending.AVAILABLE else now, "lend always")
    lent = state.lending is Lending.AVAILABLE
    reasons = ["lending off"] if policy.lend == "never" else blockers(machine, policy, now, lent, present_at)
    why = "; ".join(reasons)

    if lent:
        if not reasons:
            return replace(state, reason=_lend_reason(machine))
        if in_flight > 0:
            return LendState(Lending.DRAINING, now, f"{why}; finishing {in_flight} in flight")
        return LendState(Lending.UNAVAILABLE, now, why)

    ok_since = None if reasons else (state.ok_since if state.ok_since is not None else now)
    if ok_since is not None and now - ok_since >= policy.settle_s:
        return LendState(Lending.AVAILABLE, now, _lend_reason(machine))
    if ok_since is not None:
        why = f"conditions met, lending in {format_duration(policy.settle_s - (now - ok_since))}"
    if state.lending is Lending.DRAINING:
        if in_flight == 0:
            return LendState(Lending.UNAVAILABLE, now, why, ok_since)
        if policy.drain_timeout_s is not None and now - state.since >= policy.drain_timeout_s:
            return LendState(Lending.UNAVAILABLE, now, f"drain timed out with {in_flight} in flight; {why}",
                             ok_since, drain_timed_out=True)
        return replace(state, reason=f"{why}; finishing {in_flight} in flight", ok_since=ok_since)
    return replace(state, reason=why, ok_since=ok_since, drain_timed_out=False)
