"""Where duskpool keeps its files on this machine. Standard library only.

    cache_dir(): what can be fetched or rebuilt again (received weights, tensor hashes, compiled kernels)
        macOS  ~/Library/Caches/duskpool                (Time Machine does not back it up)
        other  $XDG_CACHE_HOME/duskpool, else ~/.cache/duskpool
    state_dir(): what must not be lost (the pool's CA and members, a node's certificate)
        macOS  ~/Library/Application Support/duskpool
        other  $XDG_STATE_HOME/duskpool, else ~/.local/state/duskpool

An XDG variable set to an absolute path wins on every OS: whoever sets it wants the files there, and tests set it to
keep out of the real home. The state directory answers, in this order: $DUSKPOOL_HOME (as the CLI has read it all
along); ~/.duskpool if it exists (the state directory before this module, kept so that an upgrade does not lose an
existing pool's CA); $XDG_STATE_HOME/duskpool; the OS default. Nothing here creates a directory: the caller does,
with the mode it needs.
"""

import os
import platform
from collections.abc import Mapping
from pathlib import Path

APP = "duskpool"
LEGACY_STATE = ".duskpool"  # ~/.duskpool: the state directory before there was a per-OS default


def _xdg(env: Mapping[str, str], name: str) -> Path | None:
    """An XDG base directory from the environment; relative ones are invalid and ignored, as the spec says."""
    value = os.path.expanduser(env.get(name, ""))
    return Path(value) if os.path.isabs(value) else None


def cache_dir(*, system: str | None = None, env: Mapping[str, str] | None = None, home: Path | None = None) -> Path:
    """duskpool's cache directory for this OS (`system`, `env` and `home` are for tests)."""
    system, env, home = system or platform.system(), os.environ if env is None else env, home or Path.home()
    if (xdg := _xdg(env, "XDG_CACHE_HOME")) is not None:
        return xdg / APP
    if system == "Darwin":
        return home / "Library" / "Caches" / APP
    return home / ".cache" / APP


def state_dir(*, system: str | None = None, env: Mapping[str, str] | None = None, home: Path | None = None) -> Path:
    """duskpool's state directory for this OS: the pool lives in state_dir()/pool, a node's identity in
    state_dir()/node (`system`, `env` and `home` are for tests)."""
    system, env, home = system or platform.system(), os.environ if env is None else env, home or Path.home()
    if env.get("DUSKPOOL_HOME"):
        return Path(os.path.expanduser(env["DUSKPOOL_HOME"]))
    if (home / LEGACY_STATE).is_dir():
        return home / LEGACY_STATE
    if (xdg := _xdg(env, "XDG_STATE_HOME")) is not None:
        return xdg / APP
    if system == "Darwin":
        return home / "Library" / "Application Support" / APP
    return home / ".local" / "state" / APP
