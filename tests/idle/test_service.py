"""The launchd agent and the systemd user unit: generated into a temporary home, validated by the real tools where
this machine has them, and installed / uninstalled. systemd with a stand-in for subprocess.run that records
commands; launchd through the real subprocess.run against stand-in executables of launchctl, cc and codesign that
behave as macOS's do, down to the bootstrap launchd refuses with error 5 while an old agent is going away."""

import configparser
import os
import plistlib
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from duskpool.idle import macapp
from duskpool.idle.service import (
    BOOTSTRAP_TRIES,
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


def test_plist_runs_the_node_through_its_app():
    launcher = Path("/Users/ada/Library/Application Support/duskpool/duskpool node.app/Contents/MacOS/duskpool-node")
    plist = plistlib.loads(launchd_plist(NODE, log_dir=Path("/tmp"), launcher=launcher).encode())
    assert plist["ProgramArguments"] == [str(launcher)] + NODE
    assert plist["AssociatedBundleIdentifiers"] == ["dev.duskpool.node"]


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


# ---------------------------------------------------------------- launchd, against stand-ins for macOS's tools

LAUNCHCTL = r"""#!/bin/sh
# launchctl as macOS answers print, bootout and bootstrap, over a state directory:
#   loaded (the plist launchd holds), stopping (prints left before a booted-out agent is gone),
#   linger (the stopping a bootout starts), fail_bootstraps (bootstraps to refuse with 5 first).
s="$FAKE_LAUNCHD"
echo "$*" >> "$s/calls"
count() { cat "$s/$1" 2>/dev/null || echo 0; }
case "$1" in
print)
    if [ -e "$s/loaded" ]; then printf '%s = {\n\tstate = running\n}\n' "$2"; exit 0; fi
    n=$(count stopping)
    if [ "$n" -gt 0 ]; then echo $((n - 1)) > "$s/stopping"; printf '%s = {\n\tstate = exiting\n}\n' "$2"; exit 0; fi
    echo "Bad request." >&2
    echo "Could not find service \"${2##*/}\" in domain for user gui: 501" >&2
    exit 113;;
bootout)
    if [ -e "$s/loaded" ]; then rm "$s/loaded"; count linger > "$s/stopping"; exit 0; fi
    echo "Boot-out failed: 3: No such process" >&2
    exit 3;;
bootstrap)
    n=$(count fail_bootstraps)
    if [ "$n" -gt 0 ] || [ -e "$s/loaded" ] || [ "$(count stopping)" -gt 0 ]; then
        [ "$n" -gt 0 ] && echo $((n - 1)) > "$s/fail_bootstraps"
        echo "Bootstrap failed: 5: Input/output error" >&2
        echo "Try re-running the command as root for richer errors." >&2
        exit 5
    fi
    cp "$3" "$s/loaded"
    exit 0;;
esac
echo "Unrecognized subcommand: $1" >&2
exit 64
"""
CC = r"""#!/bin/sh
# cc: what the real one makes of launcher.c, as a script: run the arguments as a child and wait
echo "$*" >> "$FAKE_LAUNCHD/cc"
while [ $# -gt 0 ]; do [ "$1" = -o ] && out="$2"; shift; done
printf '#!/bin/sh\n"$@"\n' > "$out" && chmod +x "$out"
"""
CODESIGN = r"""#!/bin/sh
echo "$*" >> "$FAKE_LAUNCHD/codesign"
"""


class Launchd:
    """The stand-in tools on PATH, and what they were asked."""

    def __init__(self, root: Path):
        self.state = root / "launchd"
        self.state.mkdir()

    def set(self, **values: int) -> None:
        for name, value in values.items():
            (self.state / name).write_text(f"{value}\n")

    def log(self, tool: str = "calls") -> list[str]:
        path = self.state / tool
        return path.read_text().splitlines() if path.exists() else []

    @property
    def loaded(self) -> dict | None:
        path = self.state / "loaded"
        return plistlib.loads(path.read_bytes()) if path.exists() else None


@pytest.fixture
def launchd(tmp_path, monkeypatch) -> Launchd:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in {"launchctl": LAUNCHCTL, "cc": CC, "codesign": CODESIGN}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CC", raising=False)
    fake = Launchd(tmp_path)
    monkeypatch.setenv("FAKE_LAUNCHD", str(fake.state))
    return fake


def mac_install(home: Path, args: list[str] = NODE, sleeps: list | None = None) -> Path:
    return install(args, system="Darwin", home=home, uid=501,
                   sleep=(sleeps.append if sleeps is not None else lambda s: None))


TARGET = "gui/501/dev.duskpool.node"


def test_install_macos(tmp_path, launchd, capsys):
    home = tmp_path / "home"
    path = mac_install(home)
    app = home / "Library/Application Support/duskpool/duskpool node.app"
    assert path == home / "Library/LaunchAgents/dev.duskpool.node.plist"
    assert plistlib.loads(path.read_bytes())["ProgramArguments"] == [str(app / "Contents/MacOS/duskpool-node")] + NODE
    assert (home / "Library/Logs/duskpool").is_dir()
    assert launchd.log() == [f"print {TARGET}", f"bootstrap gui/501 {path}"]
    assert launchd.loaded["Label"] == "dev.duskpool.node"
    out = capsys.readouterr().out
    assert f"wrote {path}" in out and f"built {app}" in out


def test_install_macos_says_what_to_approve(tmp_path, launchd, capsys):
    mac_install(tmp_path / "home")
    out = capsys.readouterr().out
    assert '"duskpool node" may "find and connect to devices on your local network": choose Allow' in out
    assert "System Settings > Privacy & Security > Local Network" in out
    assert f"launchctl kickstart -k {TARGET}" in out
    assert "Login Items" in out


def test_the_app_is_built_once_and_signed(tmp_path, launchd):
    home = tmp_path / "home"
    mac_install(home)
    mac_install(home, NODE + ["--require-ac"])  # a reinstall with new flags: same launcher, same identity
    app = macapp.app_path(home)
    assert len(launchd.log("cc")) == 1
    assert launchd.log("codesign") == [f"--force --sign - --identifier dev.duskpool.node "
                                       f"{app.parent}/.building-{os.getpid()}-duskpool node.app"]
    info = plistlib.loads((app / "Contents/Info.plist").read_bytes())
    assert info["CFBundleIdentifier"] == "dev.duskpool.node" and info["CFBundleExecutable"] == "duskpool-node"
    assert info["NSLocalNetworkUsageDescription"] == macapp.USAGE and info["NSBonjourServices"] == ["_duskpool._tcp"]
    assert (app / "Contents/Resources/launcher.c").read_text() == macapp.LAUNCHER_C
    assert not list(app.parent.glob(".building-*"))


def test_reinstall_waits_until_launchd_lets_go_of_the_old_agent(tmp_path, launchd, capsys):
    """bootout returns while launchd still tears the old agent down: bootstrapping at once fails with 5. The
    install asks launchd until the old agent is gone, then loads the new one: one bootstrap, no failure."""
    home = tmp_path / "home"
    path = mac_install(home)
    launchd.set(linger=2)  # the old agent still shows in `launchctl print` twice after its bootout
    (launchd.state / "calls").unlink()
    sleeps: list[float] = []
    mac_install(home, NODE + ["--require-ac"], sleeps)
    assert launchd.log() == [f"print {TARGET}", f"bootout {TARGET}", f"print {TARGET}", f"print {TARGET}",
                             f"print {TARGET}", f"bootstrap gui/501 {path}"]
    assert sleeps == [0.25, 0.25]
    assert launchd.loaded["ProgramArguments"][-1] == "--require-ac"
    assert "(ignored)" not in capsys.readouterr().out


def test_a_bootstrap_refused_with_5_is_tried_again(tmp_path, launchd, capsys):
    """launchctl fails the first bootstrap with status 5 (launchd has not let go yet): wait, try again, say so."""
    launchd.set(fail_bootstraps=1)
    sleeps: list[float] = []
    path = mac_install(tmp_path / "home", sleeps=sleeps)
    assert launchd.log() == [f"print {TARGET}", f"bootstrap gui/501 {path}", f"bootstrap gui/501 {path}"]
    assert sleeps == [0.5] and launchd.loaded is not None
    out = capsys.readouterr().out
    assert f"launchd still holds {TARGET} (exit 5, Input/output error)" in out and "loaded on try 2" in out


def test_a_bootstrap_refused_with_5_every_time_gives_up_and_says_what_to_do(tmp_path, launchd):
    launchd.set(fail_bootstraps=99)
    sleeps: list[float] = []
    with pytest.raises(ServiceError) as e:
        mac_install(tmp_path / "home", sleeps=sleeps)
    assert sleeps == [0.5, 1, 2, 4]  # bounded: 7.5 s in all
    assert launchd.log().count(f"bootstrap gui/501 {tmp_path}/home/Library/LaunchAgents/dev.duskpool.node.plist") \
        == BOOTSTRAP_TRIES
    assert "failed with exit 5: Bootstrap failed: 5: Input/output error" in str(e.value)
    assert f"Run `launchctl bootout {TARGET}`, wait a few seconds and install again" in str(e.value)


def test_another_bootstrap_failure_is_not_retried(tmp_path, launchd, monkeypatch):
    launchctl = Path(os.environ["PATH"].split(os.pathsep)[0]) / "launchctl"
    launchctl.write_text(launchctl.read_text().replace("bootstrap)\n", "bootstrap)\n    echo 'Bootstrap failed: 78: "
                                                       "Function not implemented' >&2; exit 78\n", 1))
    with pytest.raises(ServiceError, match="exit 78: Bootstrap failed: 78: Function not implemented"):
        mac_install(tmp_path / "home")
    assert [c for c in launchd.log() if c.startswith("bootstrap")] == [
        f"bootstrap gui/501 {tmp_path}/home/Library/LaunchAgents/dev.duskpool.node.plist"]


def test_an_old_agent_that_never_goes_away_is_waited_for_10_seconds_then_replaced_anyway(tmp_path, launchd, capsys):
    home = tmp_path / "home"
    mac_install(home)
    launchd.set(linger=1000)
    sleeps: list[float] = []
    with pytest.raises(ServiceError):  # it is still there, so the bootstraps fail with 5 too
        mac_install(home, sleeps=sleeps)
    assert sleeps[:40] == [0.25] * 40 and sleeps[40:] == [0.5, 1, 2, 4]
    assert f"launchd still holds {TARGET} after 10 s; loading the new agent anyway" in capsys.readouterr().out


def test_an_agent_loaded_without_its_file_is_booted_out_too(tmp_path, launchd):
    """The plist was deleted by hand while the agent stayed loaded: install must not assume a fresh launchd."""
    home = tmp_path / "home"
    path = mac_install(home)
    path.unlink()
    (launchd.state / "calls").unlink()
    mac_install(home)
    assert launchd.log()[:2] == [f"print {TARGET}", f"bootout {TARGET}"]


def test_no_compiler_says_how_to_get_one(tmp_path, launchd):
    (Path(os.environ["PATH"].split(os.pathsep)[0]) / "cc").write_text("#!/bin/sh\n"
                                                                      "echo 'xcrun: error: invalid active developer "
                                                                      "path' >&2; exit 1\n")
    with pytest.raises(ServiceError, match="xcode-select --install"):
        mac_install(tmp_path / "home")
    assert launchd.log() == [] and not macapp.app_path(tmp_path / "home").exists()


def test_uninstall_macos(tmp_path, launchd, capsys):
    home = tmp_path / "home"
    path = mac_install(home)
    assert uninstall(system="Darwin", home=home, uid=501) == path
    assert not path.exists() and not macapp.app_path(home).exists()
    assert launchd.log()[-1] == f"bootout {TARGET}" and launchd.loaded is None
    out = capsys.readouterr().out
    assert f"removed {path}" in out and f"removed {macapp.app_path(home)}" in out


def test_uninstall_when_not_installed_is_not_an_error(tmp_path, launchd, capsys):
    uninstall(system="Darwin", home=tmp_path, uid=501)
    out = capsys.readouterr().out
    assert "(ignored)" in out and "No such process" in out and "nothing to remove" in out


# ---------------------------------------------------------------- systemd install, and what every OS shares


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


@pytest.mark.parametrize("system, message", [
    ("Darwin", "cc not found: the node's launcher is compiled with the Command Line Tools .install them: "
               "xcode-select --install."),
    ("Linux", "systemctl not found: this system does not run systemd")])
def test_missing_tool_is_a_clear_error(tmp_path, system, message):
    with pytest.raises(ServiceError, match=message):
        install(NODE, system=system, home=tmp_path, run=Recorder(missing=True), uid=501)


def test_unsupported_system(tmp_path):
    with pytest.raises(ServiceError, match="supports macOS .launchd. and Linux .systemd., not Windows"):
        install(NODE, system="Windows", home=tmp_path, run=Recorder())


def test_uninstall_linux(tmp_path):
    path = install(NODE, system="Linux", home=tmp_path, run=Recorder())
    run = Recorder()
    uninstall(system="Linux", home=tmp_path, run=run)
    assert not path.exists()
    assert run.calls == [["systemctl", "--user", "disable", "--now", UNIT], ["systemctl", "--user", "daemon-reload"]]
