"""The probes on recorded outputs of ioreg, pmset, loginctl and sysfs trees, and probe() on this machine."""

import math
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import pytest

from duskpool.idle.probes import (
    MAC_COMMANDS,
    NO_LOCAL_USER,
    Assertion,
    MachineState,
    display_kept_on_by,
    display_lit_per_powerd,
    logind_idle_seconds,
    parse_clamshell,
    parse_display_wrangler,
    parse_hid_idle,
    parse_loginctl_sessions,
    parse_loginctl_show,
    parse_pmset_assertions,
    parse_pmset_batt,
    parse_pmset_therm,
    parse_screen_sharing,
    parse_sysctl_int,
    performance_cores,
    probe,
    read_power_supply,
    read_thermal_zones,
)

FIX = Path(__file__).parent / "fixtures"  # where each file comes from: fixtures/SOURCES.md
NOW = 1718035200.0  # the loginctl fixtures were "recorded" at this instant
MAC_FILES = {  # what probe_macos reads -> the file in a machine's folder holding what that command printed
    "hid": "ioreg_hid.txt", "batt": "pmset_batt.txt", "therm": "pmset_therm.txt",
    "assertions": "pmset_assertions.txt", "netstat": "netstat.txt", "clamshell": "ioreg_clamshell.txt",
    "display": "ioreg_display.txt",
}


def read(name: str) -> str:
    return (FIX / name).read_text()


def mac(name: str) -> str:
    """One capture from fixtures/mac (sources in fixtures/SOURCES.md)."""
    return read(f"mac/{name}")


def mac_runner(machine: str, **replaced: str | None):
    """The commands probe() runs on a Mac, answered from fixtures/<machine>/; `replaced` answers some by key instead
    (None: the command failed)."""
    files = {tuple(args): key for key, args in MAC_COMMANDS.items()}

    def run(args: list[str]) -> str | None:
        key = files[tuple(args)]
        return replaced[key] if key in replaced else read(f"{machine}/{MAC_FILES[key]}")
    return run


def linux_runner(loginctl: str | None):
    """loginctl as recorded in fixtures/<loginctl>/, or absent (None: the command fails, as without logind)."""
    def run(args: list[str]) -> str | None:
        if loginctl is None:
            return None
        assert args[0] == "loginctl"
        if args[1] == "list-sessions":
            return read(f"{loginctl}/list_sessions.txt")
        assert args[1:5] == ["show-session", "3", "c1", "7"], args
        return read(f"{loginctl}/show_session.txt")
    return run


# ---------------------------------------------------------------- macOS parsers


@pytest.mark.parametrize("machine, idle_s", [("macbook_battery", 420.318), ("macbook_ac", 2.505),
                                             ("mac_mini", 3600.913), ("mac_hot", 600.045)])
def test_hid_idle_is_nanoseconds(machine, idle_s):
    assert parse_hid_idle(read(f"{machine}/ioreg_hid.txt")) == pytest.approx(idle_s, abs=1e-3)


def test_hid_idle_takes_the_first_property_in_the_full_tree():
    assert parse_hid_idle(read("ioreg_hid_tree.txt")) == pytest.approx(0.0813, abs=1e-4)


def test_hid_idle_missing():
    assert parse_hid_idle("") is None
    assert parse_hid_idle('"HIDParameters" = {"HIDIdleTime"=5}') is None


@pytest.mark.parametrize("capture, on_ac, percent", [
    ("batt_battery.txt", False, 95.0),
    ("batt_no_estimate_2017.txt", False, 90.0),  # before 10.12: no "(id=...)", a space before the tab
    ("batt_ac_not_charging_2017.txt", True, 88.0),
    ("batt_charging_2017.txt", True, 91.0),
    ("batt_desktop.txt", True, None),  # an iMac: no battery line at all
    ("batt_desktop_ups_on_mains.txt", True, None),  # a UPS on healthy mains is not this Mac's battery
    ("batt_desktop_ups_power.txt", False, 87.0),  # the mains is out: the Mac runs the UPS down
])
def test_pmset_batt_captures(capture, on_ac, percent):
    assert parse_pmset_batt(mac(capture)) == (on_ac, percent)


@pytest.mark.parametrize("machine, on_ac, percent", [("macbook_battery", False, 42.0), ("macbook_ac", True, 87.0),
                                                     ("mac_mini", True, None), ("mac_hot", True, 100.0)])
def test_pmset_batt_machines(machine, on_ac, percent):
    assert parse_pmset_batt(read(f"{machine}/pmset_batt.txt")) == (on_ac, percent)


def test_pmset_batt_nothing_read():
    assert parse_pmset_batt("") == (None, None)


@pytest.mark.parametrize("capture, expected", [
    ("therm_apple_silicon_quiet.txt", (None, 0, 0)),  # M1 Pro: three notes, no number anywhere
    ("therm_apple_silicon_hot.txt", (None, 5, 100)),  # the only heat signal Apple silicon prints
    ("therm_unknown_level.txt", (None, None, 0)),  # 255 = kIOPMThermalLevelUnknown: not a warning
    ("therm_intel_throttled.txt", (28, None, None)),  # the notify block alone, as thermlog printed it
    ("therm_intel_cool.txt", (100, None, None)),
])
def test_pmset_therm_captures(capture, expected):
    assert parse_pmset_therm(mac(capture)) == expected


def test_pmset_therm_machines():
    assert parse_pmset_therm(read("mac_hot/pmset_therm.txt")) == (60, 0, 0)
    assert parse_pmset_therm(read("macbook_battery/pmset_therm.txt")) == (None, 0, 0)
    assert parse_pmset_therm("") == (None, None, None)


def test_pmset_therm_error_lines_are_unknown():
    """pmset.m prints these when IOKit fails; neither is a level."""
    text = ("Error:Failed to get thermal warning level with error code 0xe00002c2\n"
            "Error: Failed to get performance warning level with error code 0xe00002c2\n")
    assert parse_pmset_therm(text) == (None, None, None)


def test_pmset_therm_old_wording_is_not_a_level():
    """What this parser used to look for ("set to") is not what pmset prints; a line like it must not count."""
    assert parse_pmset_therm("Thermal warning level set to 2.\n") == (None, None, None)


@pytest.mark.parametrize("machine, asleep", [("macbook_battery", True), ("macbook_ac", False), ("mac_mini", True),
                                             ("mac_hot", None)])
def test_display_wrangler(machine, asleep):
    assert parse_display_wrangler(read(f"{machine}/ioreg_display.txt")) is asleep


def test_display_dimmed_counts_as_asleep():
    assert parse_display_wrangler('"IOPowerManagement" = {"MaxPowerState"=4,"CurrentPowerState"=3}') is True


def test_assertions_parse_every_field():
    got = parse_pmset_assertions(mac("assertions_iina_playing.txt"))
    assert [(a.pid, a.process, a.kind) for a in got] == [
        (73465, "IINA", "NoDisplaySleepAssertion"), (375, "useractivityd", "PreventUserIdleSystemSleep"),
        (117, "hidd", "UserIsActive"), (211, "coreaudiod", "PreventUserIdleSystemSleep")]
    assert got[0] == Assertion(73465, "IINA", "NoDisplaySleepAssertion", "IINA is playing video")
    # the trailing spaces pmset prints after the closing quote ("%s %s" of two empty flags) are not in the name
    chrome = parse_pmset_assertions(mac("assertions_chrome_audio.txt"))[1]
    assert (chrome.process, chrome.name) == ("Google Chrome", "Playing audio")


def test_assertion_flags():
    line = '   pid 9(x): [0x0000000000000001] 00:00:01 PreventUserIdleDisplaySleep named: "a "quoted" b" (timed out) \n'
    assert parse_pmset_assertions(line) == [Assertion(9, "x", "PreventUserIdleDisplaySleep", 'a "quoted" b', True)]
    line = '   pid 9(Foo (Bar)): [0x0000000000000001] PreventUserIdleDisplaySleep named: "n"  (Suspended)\n'
    assert parse_pmset_assertions(line) == [Assertion(9, "Foo (Bar)", "PreventUserIdleDisplaySleep", "n", True)]


@pytest.mark.parametrize("capture, held_by", [
    ("assertions_iina_playing.txt", ("IINA",)),  # a video player: the owner is watching
    ("assertions_coreaudiod_display.txt", ("coreaudiod",)),  # held on behalf of an app playing to a display
    ("assertions_controlplane_legacy.txt", ("ControlPlane",)),  # the type's pre-10.9 name
    ("assertions_chrome_audio.txt", ()),  # audio alone keeps the system, not the display, awake
    ("assertions_caffeinate_display_lit.txt", ()),
    ("assertions_time_machine.txt", ()),
])
def test_display_kept_on_by(capture, held_by):
    assert display_kept_on_by(parse_pmset_assertions(mac(capture))) == held_by


def test_display_kept_on_leaves_out_this_process_and_timed_out_ones():
    assertions = parse_pmset_assertions(mac("assertions_iina_playing.txt"))
    assert display_kept_on_by(assertions, own_pid=73465) == ()
    timed_out = [Assertion(5, "Keynote", "PreventUserIdleDisplaySleep", "Playing", timed_out=True)]
    assert display_kept_on_by(timed_out) == ()


def test_powerd_says_when_a_display_is_lit():
    assert display_lit_per_powerd(parse_pmset_assertions(mac("assertions_caffeinate_display_lit.txt"))) is True
    assert display_lit_per_powerd(parse_pmset_assertions(mac("assertions_time_machine.txt"))) is False


@pytest.mark.parametrize("capture, sharing", [("netstat_screen_sharing.txt", True),
                                              ("netstat_screen_sharing_v6.txt", True),
                                              ("netstat_quiet.txt", False)])  # listening, closing, or going out
def test_screen_sharing(capture, sharing):
    assert parse_screen_sharing(mac(capture)) is sharing


def test_screen_sharing_nothing_read():
    assert parse_screen_sharing("") is False


def test_clamshell():
    closed = mac("clamshell_closed.txt")
    assert parse_clamshell(closed) is True
    assert parse_clamshell(closed.replace('"AppleClamshellState" = Yes', '"AppleClamshellState" = No')) is False
    assert parse_clamshell("") is None  # a desktop: ioreg finds no such key and prints nothing


def test_sysctl_int():
    assert parse_sysctl_int("8\n") == 8
    assert parse_sysctl_int("") is None  # sysctl -n of an unknown name prints nothing (and fails)


@pytest.mark.parametrize("machine, expected", [
    ("macbook_battery", MachineState(420.318, False, 42.0, None, None, 0, True, 0, (), False, False)),
    ("macbook_ac", MachineState(2.505, True, 87.0, None, None, 0, False, 0, ("IINA",), False, False)),
    ("mac_mini", MachineState(3600.913, True, None, None, 100, 0, True, 0, (), True, None)),
    ("mac_hot", MachineState(600.045, True, 100.0, None, 60, 0, None, 0, (), False, False)),
    ("air_hot", MachineState(600.045, False, 95.0, None, None, 5, None, 100, (), False, True)),
])
def test_probe_macos_end_to_end(machine, expected):
    got = probe(NOW, system="Darwin", run=mac_runner(machine))
    assert got.idle_seconds == pytest.approx(expected.idle_seconds, abs=1e-3)
    assert got == replace(expected, idle_seconds=got.idle_seconds)


def test_probe_macos_apple_silicon_display_lit_per_powerd():
    """No wrangler (Apple silicon): powerd's "while display is on" assertion says the display is lit."""
    run = mac_runner("air_hot", assertions=mac("assertions_caffeinate_display_lit.txt"))
    assert probe(NOW, system="Darwin", run=run).display_asleep is False
    assert probe(NOW, system="Darwin", run=mac_runner("air_hot")).display_asleep is None


def test_probe_macos_without_tools_is_all_unknown():
    assert probe(NOW, system="Darwin", run=lambda args: None) == MachineState()


def test_probe_macos_leaves_its_own_assertions_out():
    """A display assertion held by this very process (it holds none, but if it did) is not its owner watching."""
    line = f'   pid {os.getpid()}(python3): [0x0000000000000001] 00:00:01 PreventUserIdleDisplaySleep named: "x"\n'
    assert probe(NOW, system="Darwin", run=mac_runner("mac_hot", assertions=line)).display_kept_on_by == ()


def test_performance_cores_on_a_mac():
    answers = {"hw.perflevel0.physicalcpu": "4\n", "hw.physicalcpu": "10\n"}
    assert performance_cores(system="Darwin", run=lambda args: answers.get(args[-1])) == 4  # M1 Pro 8P+2E -> P only
    intel = {"hw.physicalcpu": "6\n"}  # Intel Macs have no perflevels: the physical cores, not the hyperthreads
    assert performance_cores(system="Darwin", run=lambda args: intel.get(args[-1])) == 6


def test_performance_cores_elsewhere_and_on_failure():
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert performance_cores(system="Linux") == allowed
    assert performance_cores(system="Darwin", run=lambda args: None) == allowed
    assert performance_cores() >= 1


# ---------------------------------------------------------------- Linux parsers


def test_loginctl_sessions_first_column_any_version():
    assert parse_loginctl_sessions(read("loginctl_idle/list_sessions.txt")) == ["3", "c1", "7"]
    v256 = "      2 1000 bob seat0 1843 user    tty2 no   -\n     13 1000 bob -     5120 manager -    no   -\n"
    assert parse_loginctl_sessions(v256) == ["2", "13"]
    assert parse_loginctl_sessions("") == []


def test_loginctl_show_blocks():
    sessions = parse_loginctl_show(read("loginctl_idle/show_session.txt"))
    assert [s["Id"] for s in sessions] == ["3", "c1", "7"]
    assert sessions[0] == {"Id": "3", "Seat": "seat0", "Remote": "no", "Type": "wayland", "Class": "user",
                           "IdleHint": "yes", "IdleSinceHint": "1718034780000000"}


def test_logind_idle_counts_the_local_seat_session_only():
    """Alice's Wayland session has been idle 7 min; the greeter and her ssh session (both 'active') don't count."""
    sessions = parse_loginctl_show(read("loginctl_idle/show_session.txt"))
    assert logind_idle_seconds(sessions, NOW) == pytest.approx(420.0)


def test_logind_active_session_is_zero_idle():
    assert logind_idle_seconds(parse_loginctl_show(read("loginctl_active/show_session.txt")), NOW) == 0.0


def test_logind_without_local_sessions_means_no_local_user():
    ssh_only = parse_loginctl_show("Id=7\nRemote=yes\nType=tty\nClass=user\nIdleHint=no\nIdleSinceHint=0\n")
    assert logind_idle_seconds(ssh_only, NOW) == NO_LOCAL_USER
    manager = parse_loginctl_show("Id=13\nRemote=no\nType=unspecified\nClass=manager\nIdleHint=no\n")
    assert logind_idle_seconds(manager, NOW) == NO_LOCAL_USER
    assert logind_idle_seconds([], NOW) == NO_LOCAL_USER


def test_power_supply_laptop_on_battery_ignores_the_mouse():
    assert read_power_supply(FIX / "linux_laptop") == (False, 64.0)


def test_power_supply_laptop_plugged_in(tmp_path):
    shutil.copytree(FIX / "linux_laptop", tmp_path, dirs_exist_ok=True)
    (tmp_path / "sys/class/power_supply/AC/online").write_text("1\n")
    (tmp_path / "sys/class/power_supply/BAT0/status").write_text("Charging\n")
    assert read_power_supply(tmp_path) == (True, 64.0)


def test_power_supply_battery_without_ac_entry_uses_its_status(tmp_path):
    shutil.copytree(FIX / "linux_laptop/sys/class/power_supply/BAT0", tmp_path / "sys/class/power_supply/BAT0")
    assert read_power_supply(tmp_path) == (False, 64.0)


def test_power_supply_server_has_no_battery_and_counts_as_ac():
    assert read_power_supply(FIX / "linux_server") == (True, None)


def test_thermal_zones_skip_unreadable_sensors():
    assert read_thermal_zones(FIX / "linux_laptop") == {"acpitz": 48.0, "x86_pkg_temp": 67.0,
                                                        "INT3400 Thermal": 20.0}
    assert read_thermal_zones(FIX / "linux_server") == {"acpitz": 27.8, "x86_pkg_temp": 58.0}
    assert read_thermal_zones(FIX / "nowhere") == {}


def test_probe_linux_laptop_idle():
    got = probe(NOW, system="Linux", run=linux_runner("loginctl_idle"), root=FIX / "linux_laptop")
    assert got == MachineState(idle_seconds=420.0, on_ac=False, battery_percent=64.0, temp_c=67.0)


def test_probe_linux_laptop_active():
    got = probe(NOW, system="Linux", run=linux_runner("loginctl_active"), root=FIX / "linux_laptop")
    assert got.idle_seconds == 0.0


def test_probe_headless_server_without_logind_is_idle():
    got = probe(NOW, system="Linux", run=linux_runner(None), root=FIX / "linux_server")
    assert got == MachineState(idle_seconds=math.inf, on_ac=True, battery_percent=None, temp_c=58.0)


def test_probe_unknown_os_is_all_unknown():
    assert probe(NOW, system="Windows") == MachineState()


def test_probe_this_machine_does_not_raise():
    t = time.perf_counter()
    state = probe()
    assert isinstance(state, MachineState)
    assert time.perf_counter() - t < 10  # each command is bounded by its timeout
