"""What the machine is doing now: how long its owner has been away, whether they are there anyway (a film, a
presentation, a Screen Sharing session), its power source, battery, lid and heat.

Each source is read by a pure parser over the text a real tool prints (or a sysfs tree under a root we
are given), so the tests run on recorded outputs; `probe()` is the one place that runs commands.

macOS: `ioreg -c IOHIDSystem -r -d 1` (HIDIdleTime, ns since the last keyboard/mouse/trackpad input),
       `pmset -g batt` (power source, battery %), `pmset -g therm` (CPU_Speed_Limit on Intel; thermal and
       performance warning levels, the only heat signal Apple silicon prints),
       `pmset -g assertions` (apps keeping the display on: a video player, a call, a presentation),
       `netstat -anW -p tcp` (a Screen Sharing / VNC session: a connection to local port 5900),
       `ioreg -r -k AppleClamshellState -d 1` (the lid of a laptop),
       `ioreg -n IODisplayWrangler -r -d 1` (display power state, Intel Macs only: Apple silicon has no wrangler).
Linux: logind sessions through `loginctl` (IdleHint / IdleSinceHint of local seat sessions),
       /sys/class/power_supply (Mains/USB online, Battery capacity), /sys/class/thermal (millidegrees C).

Unknown stays None; nothing here raises on a missing tool, a timeout or an odd output.
"""

import math
import os
import platform
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

NO_LOCAL_USER = math.inf  # idle_seconds of a machine nobody sits at (headless server, login screen only)


@dataclass(frozen=True)
class MachineState:
    idle_seconds: float | None = None  # since the last local input; inf = no local user; None = unknown
    on_ac: bool | None = None  # a machine without any battery counts as on AC; a Mac on a UPS's battery does not
    battery_percent: float | None = None  # the battery powering it: None = none (a desktop on mains)
    temp_c: float | None = None  # hottest thermal zone (Linux); macOS exposes none without root
    cpu_speed_limit: int | None = None  # macOS `pmset -g therm` CPU_Speed_Limit, % (100 = not throttled; Intel)
    thermal_warning: int | None = None  # macOS thermal warning level (0 = none; 5 danger, 10 critical, 100+ platform)
    display_asleep: bool | None = None  # macOS only; None where it cannot be told
    performance_warning: int | None = None  # macOS performance warning level (0 = none, 100 = warning)
    display_kept_on_by: tuple[str, ...] | None = None  # macOS apps holding the display on (IINA, zoom.us); () none
    remote_session: bool | None = None  # macOS: someone is on this Mac by Screen Sharing / VNC
    lid_closed: bool | None = None  # macOS laptops; None on desktops


# ---------------------------------------------------------------- macOS


def parse_hid_idle(text: str) -> float | None:
    """Seconds since the last HID input, from `ioreg -c IOHIDSystem [-r -d 1]`: the first `"HIDIdleTime" = <ns>`.

    Only the property line matches (`= ` with spaces); a dict entry would print as `"HIDIdleTime"=<ns>`.
    """
    m = re.search(r'"HIDIdleTime" = (\d+)', text)
    return int(m.group(1)) / 1e9 if m else None


# one power source of `pmset -g batt`, as pmset.m prints it: " -NAME (id=N)\tP%; state..." (id absent before 10.12)
POWER_SOURCE = re.compile(r"^ -(.*?) ?(?:\(id=\d+\))?\t(\d+)%;", re.M)


def parse_pmset_batt(text: str) -> tuple[bool | None, float | None]:
    """(on AC, battery %) from `pmset -g batt`. Desktops print no battery line: (True, None).

    'AC Power' is AC; 'Battery Power' and 'UPS Power' (the mains is out) are not. The percentage is the internal
    battery's; a desktop running on a UPS's battery reports the UPS's, since that is what it is running down. A UPS
    on a healthy mains (its line says 100%; charging) is not a battery of this Mac.
    """
    source = re.search(r"Now drawing from '([^']+)'", text)
    on_ac = None if source is None else source.group(1) == "AC Power"
    sources = {name.strip(): float(p) for name, p in POWER_SOURCE.findall(text)}
    internal = [p for name, p in sources.items() if name.startswith("InternalBattery")]
    if internal:
        return on_ac, internal[0]
    if source is not None and source.group(1) == "UPS Power" and sources:
        return on_ac, next(iter(sources.values()))
    return on_ac, None


UNKNOWN_LEVEL = 255  # kIOPMThermalLevelUnknown: IOPM.h; powerd treats it as "no warning"


def _warning_level(text: str, what: str) -> int | None:
    """The level pmset.m's show_{thermal,performance}_warning_level printed, 0 for its "Note: No ... recorded"."""
    levels = [int(n) for n in re.findall(rf"^(?:.* )?{what} Warning Level = (\d+)\s*$", text, re.M)]
    levels = [n for n in levels if n != UNKNOWN_LEVEL]
    if levels:
        return max(levels)
    return 0 if re.search(rf"^Note: No {what.lower()} warning level has been recorded", text, re.M) else None


def parse_pmset_therm(text: str) -> tuple[int | None, int | None, int | None]:
    """(CPU_Speed_Limit %, thermal warning level, performance warning level) from `pmset -g therm`.

    pmset prints three blocks (PowerManagement pmset/pmset.m, show_thermal_warning_level and its two neighbours):
    "Thermal Warning Level = N" and "Performance Warning Level = N", each after the date they were read at
    ("2024-07-02 15:41:27 +0200 "), or "Note: No thermal/performance warning level has been recorded"; then a
    "CPU Power notify" block with CPU_Speed_Limit (below 100 = throttled for heat), which Apple silicon never
    prints. There the warning levels are the only signal of heat. Level 255 means unknown and counts as none read.
    """
    speed = re.search(r"CPU_Speed_Limit\s*=\s*(\d+)", text)
    return (int(speed.group(1)) if speed else None, _warning_level(text, "Thermal"),
            _warning_level(text, "Performance"))


def parse_display_wrangler(text: str) -> bool | None:
    """Whether the display is dimmed or asleep, from `ioreg -n IODisplayWrangler -r -d 1`.

    Its IOPowerManagement CurrentPowerState is MaxPowerState (4) while the display is on, lower when dimmed (3)
    or asleep (1). Chosen over `pmset -g powerstate` because ioreg's format is the same one parse_hid_idle reads.
    Absent (no output) on Macs without the wrangler (all of Apple silicon): None.
    """
    current = re.search(r'"CurrentPowerState"=(\d+)', text)
    if current is None:
        return None
    top = re.search(r'"MaxPowerState"=(\d+)', text)
    return int(current.group(1)) < (int(top.group(1)) if top else 4)


@dataclass(frozen=True)
class Assertion:
    """One line of `pmset -g assertions` under "Listed by owning process"."""
    pid: int
    process: str
    kind: str  # PreventUserIdleDisplaySleep, PreventUserIdleSystemSleep, UserIsActive...
    name: str
    timed_out: bool = False


# pmset.m show_assertions_individually: "   pid %d(%s): [0x%016llx] %s%s named: \"%s\" %s %s\n"
#   (pid, process, unique id, "HH:MM:SS " age or nothing, type, name, "(timed out)" or "", "(Suspended)" or "")
ASSERTION = re.compile(r'^\s*pid (\d+)\((.*)\): \[0x[0-9a-fA-F]+\] (?:\d+:\d\d:\d\d )?(\w+) named: "(.*)$', re.M)
# the display stays on for these: what a video player, a video call or a slideshow holds while the owner watches
# (NoDisplaySleepAssertion is the name macOS before 10.9 printed, e.g. ControlPlane's in dustinrue/ControlPlane#348)
DISPLAY_ON = frozenset({"PreventUserIdleDisplaySleep", "NoDisplaySleepAssertion"})
POWERD_DISPLAY_ON = "Powerd - Prevent sleep while display is on"  # held by powerd exactly while a display is lit


def parse_pmset_assertions(text: str) -> list[Assertion]:
    """Every assertion a process holds, from `pmset -g assertions`; the system-wide totals above are skipped."""
    out = []
    for pid, process, kind, rest in ASSERTION.findall(text):
        rest = rest.rstrip()
        suspended, rest = rest.endswith("(Suspended)"), rest.removesuffix("(Suspended)").rstrip()
        timed_out, rest = rest.endswith("(timed out)"), rest.removesuffix("(timed out)").rstrip()
        out.append(Assertion(int(pid), process, kind, rest.removesuffix('"'), timed_out or suspended))
    return out


def display_kept_on_by(assertions: list[Assertion], own_pid: int | None = None) -> tuple[str, ...]:
    """The processes keeping the display on: someone is watching, presenting or in a call, input or not."""
    return tuple(sorted({a.process for a in assertions
                         if a.kind in DISPLAY_ON and not a.timed_out and a.pid != own_pid}))


def display_lit_per_powerd(assertions: list[Assertion]) -> bool:
    """Whether powerd holds its "while display is on" assertion: on a Mac without a display wrangler (Apple
    silicon), the one sign in pmset that a display is lit. Its absence proves nothing on older macOS."""
    return any(a.process == "powerd" and a.name == POWERD_DISPLAY_ON and not a.timed_out for a in assertions)


SCREEN_SHARING_PORT = 5900  # Screen Sharing, Remote Management and any VNC server listen here


def parse_screen_sharing(text: str) -> bool:
    """Whether `netstat -anW -p tcp` shows a connection into this Mac's port 5900: someone is looking at the screen
    and maybe typing from another machine, which HIDIdleTime does not count as input.

    netstat.tproj/inet.c prints "Proto Recv-Q Send-Q Local-Address Foreign-Address (state)" with the port after the
    last dot of an address ("192.168.1.20.5900", "fe80::1%en0.5900"); -W keeps IPv6 addresses whole, -n numeric.
    Only the local side counts: this Mac watching another one's screen is its owner at work anyway.
    """
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 6 and words[0].startswith("tcp") and words[5] == "ESTABLISHED":
            if words[3].rpartition(".")[2] == str(SCREEN_SHARING_PORT):
                return True
    return False


def parse_clamshell(text: str) -> bool | None:
    """Whether a laptop's lid is closed, from `ioreg -r -k AppleClamshellState -d 1` (IOPMrootDomain's property).
    Desktops have no clamshell: the command prints nothing, None."""
    m = re.search(r'"AppleClamshellState" = (Yes|No)', text)
    return None if m is None else m.group(1) == "Yes"


def parse_sysctl_int(text: str) -> int | None:
    """The number `sysctl -n NAME` prints, or None (the name does not exist on this Mac: it prints nothing)."""
    text = text.strip()
    return int(text) if text.isdigit() else None


# ---------------------------------------------------------------- Linux


def parse_loginctl_sessions(text: str) -> list[str]:
    """Session ids from `loginctl list-sessions --no-legend` (the first column, whatever the systemd version)."""
    return [line.split()[0] for line in text.splitlines() if line.strip()]


def parse_loginctl_show(text: str) -> list[dict[str, str]]:
    """One dict per session from `loginctl show-session ID... -p ...` (key=value blocks split by blank lines)."""
    sessions, current = [], {}
    for line in text.splitlines() + [""]:
        if not line.strip():
            if current:
                sessions.append(current)
            current = {}
        elif "=" in line:
            key, value = line.split("=", 1)
            current[key.strip()] = value.strip()
    return sessions


def is_local_user_session(session: dict[str, str]) -> bool:
    """A person at this machine's keyboard: a user session, not remote (ssh), on a seat or a local display/tty.

    Greeters (the login screen), the per-user manager and background sessions (cron) are nobody at the desk.
    """
    if session.get("Class", "user") != "user" or session.get("Remote") == "yes":
        return False
    return bool(session.get("Seat")) or session.get("Type") in ("x11", "wayland", "mir", "tty")


def logind_idle_seconds(sessions: list[dict[str, str]], now: float) -> float:
    """Seconds the local user has been idle: the least idle local session; NO_LOCAL_USER when there is none.

    logind's IdleHint is set by the desktop (GNOME after its own idle delay, 5 min by default) or by tty atime,
    so this counts from when the desktop declared idle: a lower bound on the time since the last input.
    """
    idle = NO_LOCAL_USER
    for s in filter(is_local_user_session, sessions):
        if s.get("IdleHint") != "yes":
            return 0.0
        since_us = int(s.get("IdleSinceHint") or 0)
        idle = min(idle, max(0.0, now - since_us / 1e6) if since_us > 0 else NO_LOCAL_USER)
    return idle


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):  # sysfs answers ENODATA/EIO for sensors that are off
        return None


def read_power_supply(root: Path = Path("/")) -> tuple[bool | None, float | None]:
    """(on AC, battery %) from root/sys/class/power_supply.

    AC: any Mains/USB supply online. Without such supplies, a Discharging battery means not on AC. No system
    battery at all (desktop, server, VM): on AC, battery None. Device batteries (a mouse: scope=Device) are
    skipped; several system batteries (BAT0 + BAT1) are averaged.
    """
    supplies = root / "sys/class/power_supply"
    mains, batteries, discharging = [], [], False
    for d in sorted(supplies.iterdir()) if supplies.is_dir() else []:
        kind = _read(d / "type")
        if _read(d / "scope") == "Device":
            continue
        if kind == "Battery":
            capacity = _read(d / "capacity")
            if capacity and capacity.isdigit():
                batteries.append(float(capacity))
            discharging |= _read(d / "status") == "Discharging"
        elif kind in ("Mains", "USB", "USB_C", "USB_PD", "USB_PD_DRP", "Wireless"):
            mains.append(_read(d / "online") == "1")
    if mains:
        on_ac = any(mains)
    elif batteries:
        on_ac = not discharging
    else:
        on_ac = True
    return on_ac, sum(batteries) / len(batteries) if batteries else None


def read_thermal_zones(root: Path = Path("/")) -> dict[str, float]:
    """{zone type: °C} from root/sys/class/thermal/thermal_zone*/{type,temp}; unreadable or absurd zones skipped."""
    temps: dict[str, float] = {}
    zones = root / "sys/class/thermal"
    for d in sorted(zones.glob("thermal_zone*")) if zones.is_dir() else []:
        raw = _read(d / "temp")
        try:
            c = int(raw or "") / 1000
        except ValueError:
            continue
        if 0 < c < 150:  # firmware reports 0, -273 or 255 °C for sensors that are not there
            name = _read(d / "type") or d.name
            temps[name] = max(c, temps.get(name, c))
    return temps


# ---------------------------------------------------------------- probe


def run_command(args: list[str], timeout: float = 2.0) -> str | None:
    """stdout of a command, or None if it is missing, fails or hangs (pmset can stall while the Mac wakes)."""
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


Runner = Callable[[list[str]], str | None]


MAC_COMMANDS = {  # what probe_macos runs, by what it reads
    # -r -d 1: print only the IOHIDSystem node, not the whole registry tree that plain `ioreg -c` prints
    "hid": ["ioreg", "-c", "IOHIDSystem", "-r", "-d", "1"],
    "batt": ["pmset", "-g", "batt"],
    "therm": ["pmset", "-g", "therm"],
    "assertions": ["pmset", "-g", "assertions"],
    "netstat": ["netstat", "-anW", "-p", "tcp"],
    "clamshell": ["ioreg", "-r", "-k", "AppleClamshellState", "-d", "1"],
    "display": ["ioreg", "-n", "IODisplayWrangler", "-r", "-d", "1"],
}


def probe_macos(run: Runner = run_command, own_pid: int | None = None) -> MachineState:
    """The Mac's state; `own_pid` (this process) is left out of the display assertions."""
    out = {key: run(args) for key, args in MAC_COMMANDS.items()}
    on_ac, percent = parse_pmset_batt(out["batt"] or "")
    speed, thermal, performance = parse_pmset_therm(out["therm"] or "")
    assertions = None if out["assertions"] is None else parse_pmset_assertions(out["assertions"])
    display_asleep = parse_display_wrangler(out["display"] or "")
    if display_asleep is None and assertions and display_lit_per_powerd(assertions):
        display_asleep = False
    return MachineState(
        idle_seconds=parse_hid_idle(out["hid"] or ""), on_ac=on_ac, battery_percent=percent,
        cpu_speed_limit=speed, thermal_warning=thermal, performance_warning=performance,
        display_asleep=display_asleep,
        display_kept_on_by=None if assertions is None else display_kept_on_by(assertions, own_pid),
        remote_session=None if out["netstat"] is None else parse_screen_sharing(out["netstat"]),
        lid_closed=parse_clamshell(out["clamshell"] or ""))


SESSION_PROPS = ["Id", "Remote", "Seat", "Type", "Class", "IdleHint", "IdleSinceHint"]


def probe_linux(now: float, run: Runner = run_command, root: Path = Path("/")) -> MachineState:
    """Idle from logind; where logind cannot answer (no systemd, a container) nobody is at the machine."""
    idle = NO_LOCAL_USER
    ids = parse_loginctl_sessions(run(["loginctl", "list-sessions", "--no-legend"]) or "")
    if ids:
        props = [a for p in SESSION_PROPS for a in ("-p", p)]
        shown = run(["loginctl", "show-session", *ids, *props])
        idle = logind_idle_seconds(parse_loginctl_show(shown or ""), now)
    on_ac, percent = read_power_supply(root)
    temps = read_thermal_zones(root)
    return MachineState(idle_seconds=idle, on_ac=on_ac, battery_percent=percent,
                        temp_c=max(temps.values()) if temps else None)


def probe(now: float | None = None, *, system: str | None = None, run: Runner = run_command,
          root: Path = Path("/")) -> MachineState:
    """The machine's state now, for the running OS (or `system`, for tests). Never raises: unknowns are None.

    A Linux machine without a local seat session reports idle_seconds = inf (no local user), so a headless
    server lends; a Mac whose HIDIdleTime cannot be read reports None, which the policy treats as not idle.
    """
    now = time.time() if now is None else now
    system = system or platform.system()
    try:
        if system == "Darwin":
            return probe_macos(run, os.getpid())
        if system == "Linux":
            return probe_linux(now, run, root)
    except Exception:  # a probe must never take the node down; an odd output means "unknown"
        pass
    return MachineState()


def performance_cores(*, system: str | None = None, run: Runner = run_command) -> int:
    """How many threads compute should use: the performance cores of an Apple silicon Mac
    (`sysctl hw.perflevel0.physicalcpu`; the efficiency cores would only slow the slowest thread of a matmul down),
    the physical cores of an Intel Mac (hw.physicalcpu: two hyperthreads share one core's vector units), and
    elsewhere the CPUs this process may run on (its affinity, which a container or taskset narrows), at least 1."""
    if (system or platform.system()) == "Darwin":
        for name in ("hw.perflevel0.physicalcpu", "hw.physicalcpu"):
            n = parse_sysctl_int(run(["sysctl", "-n", name]) or "")
            if n:
                return n
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1
