"""What the machine is doing now: how long its owner has been away, its power source, battery and heat.

Each source is read by a pure parser over the text a real tool prints (or a sysfs tree under a root we
are given), so the tests run on recorded outputs; `probe()` is the one place that runs commands.

macOS: `ioreg -c IOHIDSystem -r -d 1` (HIDIdleTime, ns since the last keyboard/mouse/trackpad input),
       `pmset -g batt` (power source, battery %), `pmset -g therm` (CPU_Speed_Limit, warning levels),
       `ioreg -n IODisplayWrangler -r -d 1` (display power state: below its maximum = dimmed or asleep).
Linux: logind sessions through `loginctl` (IdleHint / IdleSinceHint of local seat sessions),
       /sys/class/power_supply (Mains/USB online, Battery capacity), /sys/class/thermal (millidegrees C).

Unknown stays None; nothing here raises on a missing tool, a timeout or an odd output.
"""

import math
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
    on_ac: bool | None = None  # a machine without any battery counts as on AC
    battery_percent: float | None = None  # None = no battery
    temp_c: float | None = None  # hottest thermal zone (Linux); macOS exposes none without root
    cpu_speed_limit: int | None = None  # macOS `pmset -g therm` CPU_Speed_Limit, % (100 = not throttled)
    thermal_warning: int | None = None  # macOS thermal/performance warning level (0 = none recorded)
    display_asleep: bool | None = None  # macOS only; None where the display wrangler is absent


# ---------------------------------------------------------------- macOS


def parse_hid_idle(text: str) -> float | None:
    """Seconds since the last HID input, from `ioreg -c IOHIDSystem [-r -d 1]`: the first `"HIDIdleTime" = <ns>`.

    Only the property line matches (`= ` with spaces); a dict entry would print as `"HIDIdleTime"=<ns>`.
    """
    m = re.search(r'"HIDIdleTime" = (\d+)', text)
    return int(m.group(1)) / 1e9 if m else None


def parse_pmset_batt(text: str) -> tuple[bool | None, float | None]:
    """(on AC, battery %) from `pmset -g batt`. Desktops print no battery line: (True, None).

    'AC Power' is AC; 'Battery Power' and 'UPS Power' (the mains is out) are not.
    """
    source = re.search(r"Now drawing from '([^']+)'", text)
    on_ac = None if source is None else source.group(1) == "AC Power"
    percent = re.search(r"-InternalBattery-\d+.*?\t(\d+)%", text)
    return on_ac, float(percent.group(1)) if percent else None


def parse_pmset_therm(text: str) -> tuple[int | None, int | None]:
    """(CPU_Speed_Limit %, warning level) from `pmset -g therm`.

    Apple silicon prints only notes ("No thermal warning level has been recorded"): (None, 0). Intel Macs add a
    "CPU Power notify" block with CPU_Speed_Limit (below 100 = throttled for heat). When macOS records a warning
    it prints "Thermal warning level set to N." (or "Performance warning level set to N."); we keep the highest.
    """
    speed = re.search(r"CPU_Speed_Limit\s*=\s*(\d+)", text)
    levels = [int(n) for n in re.findall(r"(?:thermal|performance) warning level set to (\d+)", text, re.I)]
    if levels:
        warning = max(levels)
    elif re.search(r"No thermal warning level has been recorded", text):
        warning = 0
    else:
        warning = None
    return int(speed.group(1)) if speed else None, warning


def parse_display_wrangler(text: str) -> bool | None:
    """Whether the display is dimmed or asleep, from `ioreg -n IODisplayWrangler -r -d 1`.

    Its IOPowerManagement CurrentPowerState is MaxPowerState (4) while the display is on, lower when dimmed (3)
    or asleep (1). Chosen over `pmset -g powerstate` because ioreg's format is the same one parse_hid_idle reads.
    Absent (no output) on Macs without the wrangler: None.
    """
    current = re.search(r'"CurrentPowerState"=(\d+)', text)
    if current is None:
        return None
    top = re.search(r'"MaxPowerState"=(\d+)', text)
    return int(current.group(1)) < (int(top.group(1)) if top else 4)


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


def probe_macos(run: Runner = run_command) -> MachineState:
    on_ac, percent = parse_pmset_batt(run(["pmset", "-g", "batt"]) or "")
    speed, warning = parse_pmset_therm(run(["pmset", "-g", "therm"]) or "")
    return MachineState(
        # -r -d 1: print only the IOHIDSystem node, not the whole registry tree that plain `ioreg -c` prints
        idle_seconds=parse_hid_idle(run(["ioreg", "-c", "IOHIDSystem", "-r", "-d", "1"]) or ""),
        on_ac=on_ac, battery_percent=percent, cpu_speed_limit=speed, thermal_warning=warning,
        display_asleep=parse_display_wrangler(run(["ioreg", "-n", "IODisplayWrangler", "-r", "-d", "1"]) or ""))


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
            return probe_macos(run)
        if system == "Linux":
            return probe_linux(now, run, root)
    except Exception:  # a probe must never take the node down; an odd output means "unknown"
        pass
    return MachineState()
