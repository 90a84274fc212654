"""Start the node at login and keep it running: a launchd agent (macOS) or a systemd user unit (Linux).

A user service, not a system one: the idle probes need the owner's login session (HIDIdleTime, logind seat), and
no root is needed to install it. The node itself decides when to lend; the service only keeps it alive.
"""

import os
import platform
import plistlib
import re
import shlex
import subprocess
from collections.abc import Callable
from pathlib import Path

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


def launchd_plist(exe_args: list[str], *, log_dir: Path, label: str = LABEL, process_type: str = "Standard") -> str:
    """A launchd agent that starts at login and restarts the node if it fails.

    ProcessType defaults to Standard, not Background: launchd confines Background jobs to background QoS, which on
    Apple silicon means the efficiency cores only and throttled I/O, a several-fold slowdown of inference while
    the machine is lent. Nice keeps it below the owner's apps instead; the lend policy hands the machine back.
    """
    _check_args(exe_args)
    return plistlib.dumps({
        "Label": label,
        "ProgramArguments": list(exe_args),
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


def _call(run: Callable[..., subprocess.CompletedProcess], args: list[str], dry_run: bool, check: bool = True) -> bool:
    """Run one command, echoing it. A missing tool is a ServiceError; a failure too, unless check is False."""
    print(("would run: " if dry_run else "$ ") + shlex.join(args))
    if dry_run:
        return True
    try:
        done = run(args, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise ServiceError(MISSING.get(args[0], f"{args[0]} not found")) from e
    if done.returncode != 0:
        msg = f"{shlex.join(args)} failed with exit {done.returncode}: {(done.stderr or done.stdout or '').strip()}"
        if check:
            raise ServiceError(msg)
        print("  (ignored) " + msg)
    return done.returncode == 0


def install(exe_args: list[str], *, system: str | None = None, home: Path | None = None,
            run: Callable[..., subprocess.CompletedProcess] = subprocess.run, dry_run: bool = False,
            label: str = LABEL, uid: int | None = None) -> Path:
    """Write the service file for this OS and load it, so the node runs now and at every login; returns its path.

    Reinstalling replaces the file and reloads the service, so new flags take effect.
    """
    system, home = system or platform.system(), home or Path.home()
    path = service_path(system, home, label)
    if system == "Darwin":
        log_dir = home / "Library/Logs/duskpool"
        text = launchd_plist(exe_args, log_dir=log_dir, label=label)
    else:
        log_dir = None
        text = systemd_unit(exe_args)
    existed = path.exists()
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
        if existed:  # a loaded agent keeps its old arguments until booted out
            _call(run, ["launchctl", "bootout", f"{domain}/{label}"], dry_run, check=False)
        _call(run, ["launchctl", "bootstrap", domain, str(path)], dry_run)
        print(f"the node starts at every login; logs in {log_dir / 'node.log'}")
    else:
        _call(run, ["systemctl", "--user", "daemon-reload"], dry_run)
        _call(run, ["systemctl", "--user", "enable", UNIT], dry_run)
        _call(run, ["systemctl", "--user", "restart", UNIT], dry_run)  # = enable --now, and reloads a reinstall
        print(f"logs: journalctl --user -u {UNIT}; to keep the node running while you are logged out "
              f"(a headless machine): loginctl enable-linger {os.environ.get('USER', '$USER')}")
    return path


def uninstall(*, system: str | None = None, home: Path | None = None,
              run: Callable[..., subprocess.CompletedProcess] = subprocess.run, dry_run: bool = False,
              label: str = LABEL, uid: int | None = None) -> Path:
    """Stop the service and remove its file; returns the path it had. Not installed is not an error."""
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
    if system != "Darwin":
        _call(run, ["systemctl", "--user", "daemon-reload"], dry_run)
    return path
