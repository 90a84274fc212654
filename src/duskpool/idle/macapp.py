"""The small app the launchd agent runs the node through, so that macOS lets the node onto the local network.

macOS 15 asks its user before a program reaches devices on the local network (Apple's TN3179, "Understanding local
network privacy"). Exempt are launchd daemons, programs running as root, and tools run from Terminal or over SSH
with their children; a launchd *agent* is not. An agent that runs a bare python has no bundle to carry the question
(NSLocalNetworkUsageDescription) nor an identity to record the answer under: nothing is asked, and its connections
to LAN peers and its mDNS fail with EHOSTUNREACH, while the same node started from Terminal works.

So the agent runs the executable of "duskpool node.app": a launcher in C (LAUNCHER_C, built here with the Command
Line Tools' cc, signed ad hoc) that starts the node as its child and waits for it. macOS attributes a child's use of
the network to the process responsible for it, the app, as it attributes a command run from Terminal to Terminal;
the app asks once, and System Settings > Privacy & Security > Local Network lists "duskpool node". A launch daemon
would need no question but root to install, and would run the node outside its owner's session.

A rebuilt launcher is a new binary, which macOS may ask about again: build_app leaves a bundle built from the same
sources as it is.
"""

import hashlib
import os
import plistlib
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

BUNDLE_ID = "dev.duskpool.node"
APP_NAME = "duskpool node"  # what the Local Network list and the question show
EXECUTABLE = "duskpool-node"
USAGE = ("duskpool lends this Mac to your own pool of computers while you are away: the node exchanges model "
         "layers and activations with your gateway and the other nodes on your network, and announces itself "
         "there by Bonjour.")
BONJOUR_SERVICE = "_duskpool._tcp"  # cluster/discovery.py SERVICE_TYPE, as Info.plist spells a service type

LAUNCHER_C = r"""/* duskpool node: the executable of "duskpool node.app".
 * Runs PROGRAM [ARGUMENT...] as its child, waits, and exits as the child did. macOS counts the child's use of the
 * local network as this app's, which asks the user for it (TN3179); started by launchd, a bare python would be
 * refused without a question. The signals launchd and the owner send (TERM, INT, HUP, QUIT, USR1, USR2) go on to
 * the child. */
#include <errno.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;
static volatile pid_t child = 0;
static const int forwarded[] = {SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2};

static void forward(int sig) {
    if (child > 0)
        kill(child, sig);
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s PROGRAM [ARGUMENT...]\n", argv[0]);
        return 2;
    }
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = forward;
    sigemptyset(&action.sa_mask);
    sigset_t blocked, before;
    sigemptyset(&blocked);
    for (size_t i = 0; i < sizeof forwarded / sizeof *forwarded; i++) {
        sigaction(forwarded[i], &action, NULL);
        sigaddset(&blocked, forwarded[i]);
    }
    /* held back until `child` is known, then delivered to it; the child starts with the mask we had */
    sigprocmask(SIG_BLOCK, &blocked, &before);
    posix_spawnattr_t attributes;
    posix_spawnattr_init(&attributes);
    posix_spawnattr_setsigmask(&attributes, &before);
    posix_spawnattr_setflags(&attributes, POSIX_SPAWN_SETSIGMASK);
    pid_t pid;
    int error = posix_spawn(&pid, argv[1], NULL, &attributes, argv + 1, environ);
    posix_spawnattr_destroy(&attributes);
    if (error != 0) {
        fprintf(stderr, "duskpool node: cannot start %s: %s\n", argv[1], strerror(error));
        return 127;
    }
    child = pid;
    sigprocmask(SIG_SETMASK, &before, NULL);
    int status;
    while (waitpid(pid, &status, 0) < 0) {
        if (errno != EINTR) {
            perror("duskpool node: waitpid");
            return 1;
        }
    }
    if (WIFSIGNALED(status)) { /* end the same way, so launchd sees what the node did */
        signal(WTERMSIG(status), SIG_DFL);
        raise(WTERMSIG(status));
        return 128 + WTERMSIG(status);
    }
    return WEXITSTATUS(status);
}
"""


class AppBuildError(RuntimeError):
    pass


def app_path(home: Path) -> Path:
    return home / "Library" / "Application Support" / "duskpool" / f"{APP_NAME}.app"


def executable(app: Path) -> Path:
    return app / "Contents" / "MacOS" / EXECUTABLE


def info_plist() -> dict:
    return {
        "CFBundleIdentifier": BUNDLE_ID,
        "CFBundleName": APP_NAME,
        "CFBundleDisplayName": APP_NAME,
        "CFBundleExecutable": EXECUTABLE,
        "CFBundlePackageType": "APPL",
        "CFBundleInfoDictionaryVersion": "6.0",
        "CFBundleShortVersionString": "1.0",
        "CFBundleVersion": "1",
        "LSMinimumSystemVersion": "11.0",
        "LSUIElement": True,  # no Dock icon, no menu: nothing to show
        "NSLocalNetworkUsageDescription": USAGE,
        "NSBonjourServices": [BONJOUR_SERVICE],
    }


def build_id() -> str:
    """What the bundle is built from: a bundle with the same id is not rebuilt."""
    return hashlib.sha256(LAUNCHER_C.encode() + plistlib.dumps(info_plist())).hexdigest()[:16]


def _tool(run: Callable[..., subprocess.CompletedProcess], args: list[str], what: str) -> None:
    try:
        done = run(args, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise AppBuildError(f"{args[0]} not found: {what}") from e
    if done.returncode != 0:
        raise AppBuildError(f"{' '.join(args[:1])} failed with exit {done.returncode}: "
                            f"{(done.stderr or done.stdout or '').strip()}; {what}")


def build_app(app: Path, run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> Path:
    """Make `app` (or leave it, if built from the same sources) and return its executable: Info.plist, the launcher
    compiled from LAUNCHER_C (its source kept in Contents/Resources for whoever wants to read what runs), and an ad
    hoc signature that seals both under the identifier BUNDLE_ID."""
    stamp = app / "Contents" / "Resources" / "build-id"
    if executable(app).is_file() and stamp.is_file() and stamp.read_text().strip() == build_id():
        return executable(app)
    staging = app.with_name(f".building-{os.getpid()}-{app.name}")  # still *.app: codesign signs it as a bundle
    shutil.rmtree(staging, ignore_errors=True)
    try:
        (staging / "Contents" / "MacOS").mkdir(parents=True)
        (staging / "Contents" / "Resources").mkdir()
        (staging / "Contents" / "Info.plist").write_bytes(plistlib.dumps(info_plist()))
        source = staging / "Contents" / "Resources" / "launcher.c"
        source.write_text(LAUNCHER_C)
        compiler = os.environ.get("CC") or "cc"
        _tool(run, [compiler, "-O2", "-Wall", "-o", str(executable(staging)), str(source)],
              "the node's launcher is compiled with the Command Line Tools (install them: xcode-select --install)")
        if not executable(staging).is_file():
            raise AppBuildError(f"{compiler} made no {executable(staging)}")
        (staging / "Contents" / "Resources" / "build-id").write_text(build_id() + "\n")
        _tool(run, ["codesign", "--force", "--sign", "-", "--identifier", BUNDLE_ID, str(staging)],
              "macOS runs only signed code on Apple silicon, and asks about the local network by signature")
        shutil.rmtree(app, ignore_errors=True)
        staging.rename(app)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return executable(app)
