"""The launchd agent and the systemd user unit: generated into a temporary home, validated by the real tools where
this machine has them, and installed / uninstalled with a stand-in for subprocess.run that records commands."""

import configparser
import os
import plistlib
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from duskpool.idle.service import (
    LABEL,
    UNIT,
    ServiceError,
    install,
    launchd_plist,
    systemd_quote,
    systemd_unit,
    uninstall,
)

NODE = [sys.executable, "-m", "duskpool", "node", "--idle-after", "5m"]
# arguments that break naive quoting: spaces, quotes, a backslash, systemd's % specifiers and $ expansion
AWKWARD = ["--name", "Ada's MacBook Pro", 'say "hi"', "back\\slash", "50%", "$HOME", "%h", ""]


class Recorder:
    """Stands in for subprocess.run: records each command and answers rc 0, or as told."""

    def __init__(self, fail: dict[str, int] | None = None, missing: bool = False):
        self.calls: list[list[str]] = []
        self.fail, self.missing = fail or {}, missing

    def __call__(self, args: list[str], **kwargs) -> subprocess.CompletedProcess:
        self.calls.append(list(args))
        if self.missing:
            raise FileNotFoundError(2, "No such file or directory", args[0])
        rc = next((rc for word, rc in self.fail.items() if word in args), 0)
        return subprocess.CompletedProcess(args, rc, "", "Boot-out failed: 3: No such process" if rc else "")


def unit_sections(text: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)  # strict: a key twice is an error
    parser.optionxform = str
    parser.read_string(text)
    return parser


def systemd_words(exec_start: str) -> list[str]:
    """ExecStart split back the way systemd does for what systemd_quote writes: quotes and C escapes, %% and $$."""
    words = shlex.split(exec_start)
    return [words[0].replace("%%", "%")] + [w.replace("%%", "%").replace("$$", "$") for w in words[1:]]


# ---------------------------------------------------------------- launchd


def test_plist_parses_back():
    text = launchd_plist(NODE + AWKWARD, log_dir=Path("/Users/ada/Library/Logs/duskpool"))
    plist = plistlib.loads(text.encode())
    assert plist == {
        "Label": "dev.duskpool.node",
        "ProgramArguments": NODE + AWKWARD,
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False},
        "ProcessType": "Standard",
        "Nice": 10,
        "EnvironmentVariables": {"PYTHONUNBUFFERED": "1"},
        "StandardOutPath": "/Users/ada/Library/Logs/duskpool/node.log",
        "StandardErrorPath": "/Users/ada/Library/Logs/duskpool/node.log",
    }
    assert text.startswith('<?xml version="1.0" encoding="UTF-8"?>\n<!DOCTYPE plist')


def test_plist_passes_plutil(tmp_path):
    if shutil.which("plutil") is None:
        pytest.skip("plutil is macOS-only; the plist was checked by parsing it back with plistlib")
    path = tmp_path / f"{LABEL}.plist"
    path.write_text(launchd_plist(NODE + AWKWARD, log_dir=tmp_path))
    done = subprocess.run(["plutil", "-lint", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_executable_must_be_an_absolute_path():
    with pytest.raises(ValueError, match="absolute path"):
        launchd_plist(["duskpool", "node"], log_dir=Path("/tmp"))
    with pytest.raises(ValueError, match="absolute path"):
        systemd_unit([])
    with pytest.raises(ValueError, match="newlines"):
        systemd_unit([sys.executable, "a\nb"])


# ---------------------------------------------------------------- systemd


def test_unit_sections_and_keys():
    unit = unit_sections(systemd_unit(NODE))
    assert unit.sections() == ["Unit", "Service", "Install"]
    assert unit["Unit"]["After"] == "network-online.target"
    assert unit["Unit"]["Description"].startswith("duskpool node")
    service = unit["Service"]
    assert (service["Restart"], service["Nice"], service["Type"]) == ("on-failure", "10", "simple")
    assert systemd_words(service["ExecStart"]) == NODE
    assert unit["Install"]["WantedBy"] == "default.target"


def test_exec_start_quotes_awkward_arguments():
    exec_start = unit_sections(systemd_unit(NODE + AWKWARD))["Service"]["ExecStart"]
    assert systemd_words(exec_start) == NODE + AWKWARD
    assert '"$$HOME"' not in exec_start and "$$HOME" in exec_start and "%%h" in exec_start


@pytest.mark.parametrize("arg, word", [("node", "node"), ("--idle-after=5m", "--idle-after=5m"),
                                       ("a b", '"a b"'), ("", '""'), ('x"y', '"x\\"y"'), ("a\\b", '"a\\\\b"'),
                                       ("50%", "50%%"), ("$PATH", "$$PATH"), ("a;b", '"a;b"')])
def test_systemd_quote(arg, word):
    assert systemd_quote(arg) == word


def test_systemd_quote_leaves_dollar_in_the_executable():
    assert systemd_quote("/opt/py$1/bin/python", executable=True) == "/opt/py$1/bin/python"


def systemd_analyze(tmp_path: Path, unit_text: str) -> subprocess.CompletedProcess:
    runtime = tmp_path / "runtime"  # the user manager it simulates wants a runtime dir, which CI may lack
    runtime.mkdir(mode=0o700, exist_ok=True)
    path = tmp_path / UNIT
    path.write_text(unit_text)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}
    return subprocess.run(["systemd-analyze", "verify", "--user", str(path)], capture_output=True, text=True,
                          env=env, timeout=30)


@pytest.fixture
def verify(tmp_path):
    """systemd-analyze verify --user, if this machine can run it at all (checked on a minimal good unit)."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed; the unit was checked with configparser")
    probe = systemd_analyze(tmp_path, f"[Unit]\nDescription=x\n[Service]\nExecStart={sys.executable} -V\n")
    if probe.returncode != 0 or probe.stderr.strip():
        pytest.skip(f"systemd-analyze cannot verify units here: {probe.stderr.strip()}")
    return lambda text: systemd_analyze(tmp_path, text)


def test_unit_passes_systemd_analyze(verify):
    done = verify(systemd_unit(NODE + AWKWARD))
    assert (done.returncode, done.stderr.strip()) == (0, "")


def test_systemd_analyze_reads_our_quoting_of_a_path_with_spaces_percent_and_dollar(tmp_path, verify):
    """verify fails when the executable does not exist, so this proves systemd unquotes argv[0] as we meant."""
    exe = tmp_path / "my apps 100%" / "py$thon"
    exe.parent.mkdir()
    exe.symlink_to(sys.executable)
    done = verify(systemd_unit([str(exe), *NODE[1:], *AWKWARD]))
    assert (done.returncode, done.stderr.strip()) == (0, "")


def test_systemd_analyze_does_catch_a_broken_unit(verify):
    done = verify(systemd_unit(["/nonexistent/duskpool", "node"]))
    assert "/nonexistent/duskpool" in done.stderr


# ---------------------------------------------------------------- install / uninstall


def test_install_macos(tmp_path, capsys):
    run = Recorder()
    path = install(NODE, system="Darwin", home=tmp_path, run=run, uid=501)
    assert path == tmp_path / "Library/LaunchAgents/dev.duskpool.node.plist"
    assert plistlib.loads(path.read_bytes())["ProgramArguments"] == NODE
    assert (tmp_path / "Library/Logs/duskpool").is_dir()
    assert run.calls == [["launchctl", "bootstrap", "gui/501", str(path)]]
    assert f"wrote {path}" in capsys.readouterr().out


def test_reinstall_macos_boots_out_the_old_agent_first(tmp_path):
    install(NODE, system="Darwin", home=tmp_path, run=Recorder(), uid=501)
    run = Recorder()
    path = install(NODE + ["--require-ac"], system="Darwin", home=tmp_path, run=run, uid=501)
    assert run.calls == [["launchctl", "bootout", "gui/501/dev.duskpool.node"],
                         ["launchctl", "bootstrap", "gui/501", str(path)]]
    assert plistlib.loads(path.read_bytes())["ProgramArguments"][-1] == "--require-ac"


def test_install_linux(tmp_path, capsys):
    run = Recorder()
    path = install(NODE, system="Linux", home=tmp_path, run=run)
    assert path == tmp_path / ".config/systemd/user/duskpool-node.service"
    assert systemd_words(unit_sections(path.read_text())["Service"]["ExecStart"]) == NODE
    assert run.calls == [["systemctl", "--user", "daemon-reload"], ["systemctl", "--user", "enable", UNIT],
                         ["systemctl", "--user", "restart", UNIT]]
    out = capsys.readouterr().out
    assert "$ systemctl --user daemon-reload" in out and "loginctl enable-linger" in out


@pytest.mark.parametrize("system", ["Darwin", "Linux"])
def test_dry_run_writes_and_runs_nothing(tmp_path, capsys, system):
    run = Recorder(missing=True)  # would raise if called
    path = install(NODE, system=system, home=tmp_path, run=run, dry_run=True, uid=501)
    assert not path.exists() and run.calls == [] and not any(tmp_path.iterdir())
    out = capsys.readouterr().out
    assert f"would write {path}" in out and "would run: " in out
    uninstall(system=system, home=tmp_path, run=run, dry_run=True, uid=501)
    assert run.calls == []


@pytest.mark.parametrize("system, message", [("Darwin", "launchctl not found: launchd agents need macOS"),
                                             ("Linux", "systemctl not found: this system does not run systemd")])
def test_missing_tool_is_a_clear_error(tmp_path, system, message):
    with pytest.raises(ServiceError, match=message):
        install(NODE, system=system, home=tmp_path, run=Recorder(missing=True), uid=501)


def test_failing_command_reports_its_output(tmp_path):
    with pytest.raises(ServiceError, match="launchctl bootstrap gui/501 .* failed with exit 5: Boot-out failed"):
        install(NODE, system="Darwin", home=tmp_path, run=Recorder(fail={"bootstrap": 5}), uid=501)


def test_unsupported_system(tmp_path):
    with pytest.raises(ServiceError, match="supports macOS .launchd. and Linux .systemd., not Windows"):
        install(NODE, system="Windows", home=tmp_path, run=Recorder())


def test_uninstall_macos(tmp_path, capsys):
    path = install(NODE, system="Darwin", home=tmp_path, run=Recorder(), uid=501)
    run = Recorder()
    assert uninstall(system="Darwin", home=tmp_path, run=run, uid=501) == path
    assert not path.exists()
    assert run.calls == [["launchctl", "bootout", "gui/501/dev.duskpool.node"]]
    assert f"removed {path}" in capsys.readouterr().out


def test_uninstall_when_not_installed_is_not_an_error(tmp_path, capsys):
    run = Recorder(fail={"bootout": 3})
    uninstall(system="Darwin", home=tmp_path, run=run, uid=501)
    out = capsys.readouterr().out
    assert "(ignored)" in out and "nothing to remove" in out


def test_uninstall_linux(tmp_path):
    path = install(NODE, system="Linux", home=tmp_path, run=Recorder())
    run = Recorder()
    uninstall(system="Linux", home=tmp_path, run=run)
    assert not path.exists()
    assert run.calls == [["systemctl", "--user", "disable", "--now", UNIT], ["systemctl", "--user", "daemon-reload"]]
