"""The probes on recorded outputs of ioreg, pmset, loginctl and sysfs trees, and probe() on this machine."""

import math
import shutil
import time
from dataclasses import replace
from pathlib import Path

import pytest

from duskpool.idle.probes import (
    NO_LOCAL_USER,
    MachineState,
    logind_idle_seconds,
    parse_display_wrangler,
    parse_hid_idle,
    parse_loginctl_sessions,
    parse_loginctl_show,
    parse_pmset_batt,
    parse_pmset_therm,
    probe,
    read_power_supply,
    read_thermal_zones,
)

FIX = Path(__file__).parent / "fixtures"
NOW = 1718035200.0  # the loginctl fixtures were "recorded" at this instant
MAC_FILES = {  # the command probe() runs -> the fixture file holding what it printed
    ("ioreg", "-c", "IOHIDSystem", "-r", "-d", "1"): "ioreg_hid.txt",
    ("pmset", "-g", "batt"): "pmset_batt.txt",
    ("pmset", "-g", "therm"): "pmset_therm.txt",
    ("ioreg", "-n", "IODisplayWrangler", "-r", "-d", "1"): "ioreg_display.txt",
}


def read(name: str) -> str:
    return (FIX / name).read_text()


def mac_runner(machine: str):
    return lambda args: read(f"{machine}/{MAC_FILES[tuple(args)]}")


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


@pytest.mark.parametrize("machine, on_ac, percent", [("macbook_battery", False, 42.0), ("macbook_ac", True, 87.0),
                                                     ("mac_mini", True, None), ("mac_hot", True, 100.0)])
def test_pmset_batt(machine, on_ac, percent):
    assert parse_pmset_batt(read(f"{machine}/pmset_batt.txt")) == (on_ac, percent)


def test_pmset_batt_variants():
    attached = "Now drawing from 'AC Power'\n -InternalBattery-0 (id=1)\t80%; AC attached; not charging present: true\n"
    assert parse_pmset_batt(attached) == (True, 80.0)
    ups = "Now drawing from 'UPS Power'\n -InternalBattery-0 (id=9)\t55%; discharging; (no estimate) present: true\n"
    assert parse_pmset_batt(ups) == (False, 55.0)
    assert parse_pmset_batt("") == (None, None)


@pytest.mark.parametrize("machine, speed, warning", [("macbook_battery", None, 0), ("mac_mini", 100, 0),
                                                     ("mac_hot", 60, 0)])
def test_pmset_therm(machine, speed, warning):
    assert parse_pmset_therm(read(f"{machine}/pmset_therm.txt")) == (speed, warning)


def test_pmset_therm_warning_levels():
    text = "Thermal warning level set to 2.\nPerformance warning level set to 1.\n"
    assert parse_pmset_therm(text) == (None, 2)
    assert parse_pmset_therm("Thermal warning level set to 0.\n") == (None, 0)
    assert parse_pmset_therm("") == (None, None)


@pytest.mark.parametrize("machine, asleep", [("macbook_battery", True), ("macbook_ac", False), ("mac_mini", True),
                                             ("mac_hot", None)])
def test_display_wrangler(machine, asleep):
    assert parse_display_wrangler(read(f"{machine}/ioreg_display.txt")) is asleep


def test_display_dimmed_counts_as_asleep():
    assert parse_display_wrangler('"IOPowerManagement" = {"MaxPowerState"=4,"CurrentPowerState"=3}') is True


@pytest.mark.parametrize("machine, expected", [
    ("macbook_battery", MachineState(420.318, False, 42.0, None, None, 0, True)),
    ("macbook_ac", MachineState(2.505, True, 87.0, None, None, 0, False)),
    ("mac_mini", MachineState(3600.913, True, None, None, 100, 0, True)),
    ("mac_hot", MachineState(600.045, True, 100.0, None, 60, 0, None)),
])
def test_probe_macos_end_to_end(machine, expected):
    got = probe(NOW, system="Darwin", run=mac_runner(machine))
    assert got.idle_seconds == pytest.approx(expected.idle_seconds, abs=1e-3)
    assert got == replace(expected, idle_seconds=got.idle_seconds)


def test_probe_macos_without_tools_is_all_unknown():
    assert probe(NOW, system="Darwin", run=lambda args: None) == MachineState()


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
