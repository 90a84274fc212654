"""Start the node at login and keep it running: a launchd agent (macOS) or a systemd user unit (Linux).

A user service, not a system one: the idle probes need the owner's login session (HIDIdleTime, logind seat), and
no root is needed to install it. The node itself decides when to lend; the service only keeps it alive.

On macOS the agent runs the node through "duskpool node.app" (idle/macapp.py), the identity macOS 15 needs to let
an agent onto the local network; `install` says what its user must approve. Reinstalling waits until launchd has
let go of the old agent before loading the new one, and retries a bootstrap that launchd answers with error 5.
"""

import os
import platform
import plistlib
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from duskpool.idle import macapp

LABEL = "dev.duskpool.node"
UNIT = "duskpool-node.service"
NICE = 10  # below the owner's apps, should a request still be finishing when they come back


class ServiceError(RuntimeError):
    pass


def _check_args(exe_args: list[str]) -> None:
    if not exe_args or not os.path.isabs(exe_args[0]):
        raise ValueError(f"exe_args must start with an absolute path to the executable, got {exe_args[:1]}")
    if any(c in a for a in exe_args for c in "\n\r\0"):
        raise ValueError("service arguments cannot contain newlines or NUL bytes")


def launchd_plist(exe_args: list[str], *, log_dir: Path, label: str = LABEL, process_type: str = "Standard",
                  launcher: Path | None = None) -> str:
    """A launchd agent that starts at login and restarts the node if it fails; through `launcher` (the executable
    of duskpool node.app) when given, with the app named in AssociatedBundleIdentifiers so that System Settings
    shows the background item as duskpool node.

    ProcessType defaults to Standard, not Background: launchd confines Background jobs to background QoS, which on
    Apple silicon means the efficiency cores only and throttled I/O, a several-fold slowdown of inference while
    the machine is lent. Nice keeps it below the owner's apps instead; the lend policy hands the machine back.
    """
    _check_args(exe_args)
    app = {"AssociatedBundleIdentifiers": [macapp.BUNDLE_ID]} if launcher is not None else {}
    return plistlib.dumps({
        "Label": label,
        "ProgramArguments": ([str(launcher)] if launcher is not None else []) + list(exe_args),
        **app,
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False},  # restart after a crash or error exit, like Restart=on-failure
        "ProcessType": process_type,
        "Nice": NICE,
        "EnvironmentVariables": {"PYTHONUNBUFFERED": "1"},  # log lines reach the file as they happen
        "StandardOutPath": str(log_dir / "node.log"),
        "StandardErrorPath": str(log_dir / "node.log"),
    }).decode()


def systemd_quote(arg: str, executable: bool = False) -> str:
    """One ExecStart word: double-quoted with C escapes when needed, % specifiers escaped as %%, and $ as $$
    (systemd expands $VAR in arguments but not in the executable path)."""
    arg = arg.replace("%", "%%")
    if not executable:
        arg = arg.replace("$", "$$")
    if arg and re.fullmatch(r"[\w@%+=:,./$-]+", arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def systemd_unit(exe_args: list[str], description: str = "duskpool node: lends this machine to the pool while idle",
                 ) -> str:
    """A systemd user unit that starts with the user's manager and restarts the node if it fails.

    After=network-online.target is kept for readers and for system-manager copies of the unit; a user manager
    cannot see that target, so the node retries its connections anyway.
    """
    _check_args(exe_args)
    exec_start = " ".join([systemd_quote(exe_args[0], executable=True), *map(systemd_quote, exe_args[1:])])
    return (f"[Unit]\nDescription={description}\nAfter=network-online.target\n\n"
            f"[Service]\nType=simple\nExecStart={exec_start}\nEnvironment=PYTHONUNBUFFERED=1\n"
            f"Restart=on-failure\nRestartSec=5\nNice={NICE}\n\n"
            f"[Install]\nWantedBy=default.target\n")


def service_path(system: str, home: Path, label: str = LABEL) -> Path:
    if system == "Darwin":
        return home / "Library/LaunchAgents" / f"{label}.plist"
    if system == "Linux":
        return home / ".config/systemd/user" / UNIT
    raise ServiceError(f"duskpool service supports macOS (launchd) and Linux (systemd), not {system}")


MISSING = {
    "launchctl": "launchctl not found: launchd agents need macOS",
    "systemctl": "systemctl not found: this system does not run systemd; start the node another way "
                 "(a login item, cron @reboot)",
}


Runner = Callable[..., subprocess.CompletedProcess]


def _run(run: Runner, args: list[str]) -> subprocess.CompletedProcess:
    """Run one command quietly; a missing tool is a ServiceError."""
    try:
        return run(args, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise ServiceError(MISSING.get(args[0], f"{args[0]} not found")) from e


def _failed(args: list[str], done: subprocess.CompletedProcess) -> str:
    return f"{shlex.join(args)} failed with exit {done.returncode}: {(done.stderr or done.stdout or '').strip()}"


def _call(run: Runner, args: list[str], dry_run: bool, check: bool = True) -> bool:
    """Run one command, echoing it. A missing tool is a ServiceError; a failure too, unless check is False."""
    print(("would run: " if dry_run else "$ ") + shlex.join(args))
    if dry_run:
        return True
    done = _run(run, args)
    if done.returncode != 0:
        if check:
            raise ServiceError(_failed(args, done))
        print("  (ignored) " + _failed(args, done))
    return done.returncode == 0


BOOTOUT_POLLS = 40  # launchctl print every 0.25 s: wait at most 10 s for launchd to let go of the old agent
BOOTSTRAP_TRIES = 5  # bootstrap once, then retry after 0.5, 1, 2 and 4 s
EIO = 5  # what `launchctl bootstrap` exits with ("Bootstrap failed: 5: Input/output error") while launchd still
#          holds the label: the old agent is shutting down, or was never booted out


def _loaded(run: Runner, target: str) -> bool:
    """Whether launchd holds a service (`launchctl print` exits 0), running or on its way out."""
    return _run(run, ["launchctl", "print", target]).returncode == 0


def _load_agent(run: Runner, domain: str, label: str, path: Path, dry_run: bool,
                sleep: Callable[[float], None]) -> None:
    """Load the agent at `path`, replacing one loaded under the same label.

    `bootout` returns before launchd has torn the old agent down (it waits for the process to exit), and a
    bootstrap in that window fails with 5. So: boot the old one out, wait until launchd no longer knows it (at most
    10 s), then bootstrap, retrying a 5 a few times with a growing pause; any other failure, or 5 to the end, is a
    ServiceError that says what to do.
    """
    target, bootstrap = f"{domain}/{label}", ["launchctl", "bootstrap", domain, str(path)]
    if dry_run:
        print(f"would run: launchctl bootout {target}  (if launchd holds it; then wait until it is gone)")
        print("would run: " + shlex.join(bootstrap))
        return
    if _loaded(run, target):
        _call(run, ["launchctl", "bootout", target], dry_run=False, check=False)
        for _ in range(BOOTOUT_POLLS):
            if not _loaded(run, target):
                break
            sleep(0.25)
        else:
            print(f"  launchd still holds {target} after {BOOTOUT_POLLS / 4:.0f} s; loading the new agent anyway")
    pause = 0.5
    for attempt in range(1, BOOTSTRAP_TRIES + 1):
        print("$ " + shlex.join(bootstrap))
        done = _run(run, bootstrap)
        if done.returncode == 0:
            if attempt > 1:
                print(f"  loaded on try {attempt}")
            return
        if done.returncode != EIO:
            raise ServiceError(_failed(bootstrap, done))
        if attempt == BOOTSTRAP_TRIES:
            raise ServiceError(f"{_failed(bootstrap, done)} ({BOOTSTRAP_TRIES} tries): launchd still holds {target}. "
                               f"Run `launchctl bootout {target}`, wait a few seconds and install again, or log out "
                               f"and back in.")
        print(f"  launchd still holds {target} (exit 5, Input/output error): the old agent is still going away; "
              f"trying again in {pause:g} s")
        sleep(pause)
        pause *= 2


def local_network_note(target: str) -> str:
    """What a Mac's user must approve for the node to work, and where to find it later."""
    return (f'macOS 15 and later ask before a program reaches other machines on your network. When the node first '
            f'does, macOS asks whether "{macapp.APP_NAME}" may "find and connect to devices on your local network": '
            f'choose Allow. Without it the node cannot reach the gateway or the other nodes (connections fail with '
            f'"No route to host").\n'
            f'Missed it, or chose Don\'t Allow: System Settings > Privacy & Security > Local Network, turn on '
            f'"{macapp.APP_NAME}", then restart the node: launchctl kickstart -k {target}\n'
            f'macOS may also say "Background Items Added": keep {macapp.APP_NAME} allowed in System Settings > '
            f'General > Login Items & Extensions, or it will not start at login.')


def install(exe_args: list[str], *, system: str | None = None, home: Path | None = None, run: Runner = subprocess.run,
            dry_run: bool = False, label: str = LABEL, uid: int | None = None,
            sleep: Callable[[float], None] = time.sleep) -> Path:
    """Write the service file for this OS and load it, so the node runs now and at every login; returns its path.

    Reinstalling replaces the file and reloads the service, so new flags take effect.
    """
    system, home = system or platform.system(), home or Path.home()
    path = service_path(system, home, label)
    if system == "Darwin":
        log_dir, app = home / "Library/Logs/duskpool", macapp.app_path(home)
        if dry_run:
            print(f"would build {app}: Info.plist, the launcher compiled by cc, an ad hoc signature")
        else:
            try:
                macapp.build_app(app, run)
            except macapp.AppBuildError as e:
                raise ServiceError(f"cannot build {app}: {e}") from None
            print(f"built {app}")
        launcher = macapp.executable(app)
        text = launchd_plist(exe_args, log_dir=log_dir, label=label, launcher=launcher)
    else:
        log_dir = None
        text = systemd_unit(exe_args)
    if dry_run:
        print(f"would write {path}:\n{text}")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        if log_dir:
            log_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")
    if system == "Darwin":
        domain = f"gui/{os.getuid() if uid is None else uid}"
        _load_agent(run, domain, label, path, dry_run, sleep)
        print(f"the node starts at every login; logs in {log_dir / 'node.log'}")
        print(local_network_note(f"{domain}/{label}"))
    else:
        _call(run, ["systemctl", "--user", "daemon-reload"], dry_run)
        _call(run, ["systemctl", "--user", "enable", UNIT], dry_run)
        _call(run, ["systemctl", "--user", "restart", UNIT], dry_run)  # = enable --now, and reloads a reinstall
        print(f"logs: journalctl --user -u {UNIT}; to keep the node running while you are logged out "
              f"(a headless machine): loginctl enable-linger {os.environ.get('USER', '$USER')}")
    return path


def uninstall(*, system: str | None = None, home: Path | None = None, run: Runner = subprocess.run,
              dry_run: bool = False, label: str = LABEL, uid: int | None = None) -> Path:
    """Stop the service and remove its file (and on macOS the node's app); returns the path it had. Not installed
    is not an error. macOS keeps the app's line in the Local Network settings: that is its owner's to remove."""
    system, home = system or platform.system(), home or Path.home()
    path = service_path(system, home, label)
    if system == "Darwin":
        _call(run, ["launchctl", "bootout", f"gui/{os.getuid() if uid is None else uid}/{label}"], dry_run,
              check=False)
    else:
        _call(run, ["systemctl", "--user", "disable", "--now", UNIT], dry_run, check=False)
    if not path.exists():
        print(f"{path} is not there: nothing to remove")
    elif dry_run:
        print(f"would remove {path}")
    else:
        path.unlink()
        print(f"removed {path}")
    if system == "Darwin" and macapp.app_path(home).exists():
        if dry_run:
            print(f"would remove {macapp.app_path(home)}")
        else:
            shutil.rmtree(macapp.app_path(home))
            print(f"removed {macapp.app_path(home)}")
    if system != "Darwin":
        _call(run, ["systemctl", "--user", "daemon-reload"], dry_run)
    return path
