"""duskpool node.app: its Info.plist, and its launcher compiled by this machine's C compiler and run here. The
launcher is plain POSIX (posix_spawn, sigaction, waitpid), so Linux runs the same code a Mac does; what only a Mac
can show, that Local Network Privacy then asks for the app, is argued in idle/macapp.py, not tested."""

import os
import plistlib
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from duskpool.idle import macapp
from tests.conftest import wait_for

CC = os.environ.get("CC") or shutil.which("cc")
needs_cc = pytest.mark.skipif(CC is None, reason="no C compiler to build the launcher with")


@pytest.fixture(scope="module")
def launcher(tmp_path_factory) -> Path:
    if CC is None:
        pytest.skip("no C compiler to build the launcher with")
    d = tmp_path_factory.mktemp("launcher")
    (d / "launcher.c").write_text(macapp.LAUNCHER_C)
    done = subprocess.run([CC, "-O2", "-Wall", "-Werror", "-o", str(d / "duskpool-node"), str(d / "launcher.c")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return d / "duskpool-node"


def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_info_plist():
    info = macapp.info_plist()
    assert info["CFBundleIdentifier"] == "dev.duskpool.node" == macapp.BUNDLE_ID
    assert info["CFBundleExecutable"] == macapp.EXECUTABLE and info["CFBundlePackageType"] == "APPL"
    assert info["NSLocalNetworkUsageDescription"] == macapp.USAGE and "your network" in macapp.USAGE
    assert info["NSBonjourServices"] == ["_duskpool._tcp"] and info["LSUIElement"] is True
    discovery = (Path(macapp.__file__).parents[1] / "cluster" / "discovery.py").read_text()
    assert f'SERVICE_TYPE = "{macapp.BONJOUR_SERVICE}.local."' in discovery  # the type the node announces


@pytest.mark.skipif(shutil.which("plutil") is None, reason="plutil is macOS-only")
def test_info_plist_passes_plutil(tmp_path):
    (tmp_path / "Info.plist").write_bytes(plistlib.dumps(macapp.info_plist()))
    done = subprocess.run(["plutil", "-lint", str(tmp_path / "Info.plist")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def test_the_launcher_compiles_cleanly(launcher):
    assert os.access(launcher, os.X_OK)


def test_arguments_and_environment_reach_the_node_intact(launcher, tmp_path):
    awkward = ["Ada's MacBook Pro", 'say "hi"', "back\\slash", "50%", "$HOME", ""]
    code = "import json, os, sys; print(json.dumps([sys.argv[1:], os.environ['PYTHONUNBUFFERED']]))"
    done = subprocess.run([launcher, *py(code), *awkward], capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert (done.returncode, done.stdout.strip()) == (0, __import__("json").dumps([awkward, "1"]))


def test_the_node_is_its_child(launcher):
    """What Local Network Privacy keys on: the node runs as a child of the app's executable, not in its place."""
    proc = subprocess.Popen([launcher, *py("import os; print(os.getpid(), os.getppid())")], stdout=subprocess.PIPE,
                            text=True)
    node, parent = map(int, proc.communicate(timeout=30)[0].split())
    assert parent == proc.pid and node != proc.pid  # not exec'd in place


@pytest.mark.parametrize("code", [0, 1, 3, 78])
def test_exits_as_the_node_did(launcher, code):
    assert subprocess.run([launcher, *py(f"raise SystemExit({code})")]).returncode == code


def test_a_node_killed_by_a_signal_ends_the_launcher_the_same_way(launcher):
    """So that launchd's KeepAlive sees a crash as a crash."""
    done = subprocess.run([launcher, *py("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")])
    assert done.returncode == -signal.SIGSEGV


def test_a_missing_program_is_said(launcher):
    done = subprocess.run([launcher, "/nonexistent/python3"], capture_output=True, text=True)
    assert done.returncode == 127
    assert "duskpool node: cannot start /nonexistent/python3: No such file or directory" in done.stderr


def test_usage(launcher):
    done = subprocess.run([launcher], capture_output=True, text=True)
    assert done.returncode == 2 and "usage:" in done.stderr


NODE_LIKE = """
import os, signal, sys, time
seen = []
signal.signal(signal.SIGUSR1, lambda *a: seen.append("USR1"))
signal.signal(signal.SIGUSR2, lambda *a: seen.append("USR2"))
def stop(sig, frame):
    open(sys.argv[1], "w").write(" ".join(seen + ["TERM"]))
    raise SystemExit(0)
signal.signal(signal.SIGTERM, stop)
open(sys.argv[1], "w").write("ready")
while True:
    time.sleep(0.05)
"""


def test_signals_to_the_launcher_reach_the_node(launcher, tmp_path):
    """launchd stops a job with SIGTERM to the process it started, and the owner hands the machine back with
    `kill -USR1` to it: both go on to the node, which exits as it chooses."""
    out = tmp_path / "out"
    proc = subprocess.Popen([launcher, *py(NODE_LIKE), str(out)])
    try:
        assert wait_for(lambda: out.exists() and out.read_text() == "ready")
        for sig in (signal.SIGUSR1, signal.SIGUSR2):
            proc.send_signal(sig)
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
    assert out.read_text() == "USR1 USR2 TERM"


def test_sigterm_to_a_node_that_does_not_catch_it(launcher):
    proc = subprocess.Popen([launcher, *py("import time; print('up', flush=True); time.sleep(60)")],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "up"
        proc.terminate()
        assert proc.wait(timeout=10) == -signal.SIGTERM
    finally:
        proc.kill()


@needs_cc
def test_build_app_with_the_real_compiler(tmp_path, monkeypatch):
    """The whole bundle, compiled for real; codesign (macOS only) stood in for by a script that records it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if shutil.which("codesign") is None:
        (bin_dir / "codesign").write_text(f"#!/bin/sh\necho \"$*\" >> {tmp_path}/codesign.log\n")
        (bin_dir / "codesign").chmod(0o755)
        monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    app = tmp_path / "Application Support/duskpool/duskpool node.app"
    exe = macapp.build_app(app)
    assert exe == app / "Contents/MacOS/duskpool-node"
    assert plistlib.loads((app / "Contents/Info.plist").read_bytes()) == macapp.info_plist()
    assert (app / "Contents/Resources/build-id").read_text().strip() == macapp.build_id()
    assert subprocess.run([exe, *py("raise SystemExit(7)")]).returncode == 7
    before = exe.stat().st_mtime_ns
    assert macapp.build_app(app) == exe and exe.stat().st_mtime_ns == before  # same sources: left as it was
    (app / "Contents/Resources/build-id").write_text("older\n")
    macapp.build_app(app)
    assert (app / "Contents/Resources/build-id").read_text().strip() == macapp.build_id()
    if shutil.which("codesign") is not None and sys.platform == "darwin":
        done = subprocess.run(["codesign", "--verify", "--strict", str(app)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
