"""Where caches and state go on each OS, and which overrides win."""

from pathlib import Path

import pytest

from duskpool.paths import cache_dir, state_dir

HOME = Path("/Users/ada")


@pytest.mark.parametrize("system, cache, state", [
    ("Darwin", "/Users/ada/Library/Caches/duskpool", "/Users/ada/Library/Application Support/duskpool"),
    ("Linux", "/Users/ada/.cache/duskpool", "/Users/ada/.local/state/duskpool"),
    ("FreeBSD", "/Users/ada/.cache/duskpool", "/Users/ada/.local/state/duskpool"),
])
def test_defaults_per_os(system, cache, state):
    assert cache_dir(system=system, env={}, home=HOME) == Path(cache)
    assert state_dir(system=system, env={}, home=HOME) == Path(state)


@pytest.mark.parametrize("system", ["Darwin", "Linux"])
def test_xdg_set_to_an_absolute_path_wins_on_every_os(system):
    env = {"XDG_CACHE_HOME": "/tmp/c", "XDG_STATE_HOME": "/tmp/s"}
    assert cache_dir(system=system, env=env, home=HOME) == Path("/tmp/c/duskpool")
    assert state_dir(system=system, env=env, home=HOME) == Path("/tmp/s/duskpool")


def test_relative_or_empty_xdg_is_ignored():
    env = {"XDG_CACHE_HOME": "cache", "XDG_STATE_HOME": ""}
    assert cache_dir(system="Linux", env=env, home=HOME) == HOME / ".cache/duskpool"
    assert state_dir(system="Linux", env=env, home=HOME) == HOME / ".local/state/duskpool"


def test_tilde_in_xdg_is_expanded():
    assert cache_dir(system="Linux", env={"XDG_CACHE_HOME": "~/c"}, home=HOME) == Path("~/c").expanduser() / "duskpool"


def test_duskpool_home_wins_for_state_only():
    env = {"DUSKPOOL_HOME": "/srv/pool", "XDG_STATE_HOME": "/tmp/s"}
    assert state_dir(system="Darwin", env=env, home=HOME) == Path("/srv/pool")
    assert cache_dir(system="Darwin", env=env, home=HOME) == HOME / "Library/Caches/duskpool"


@pytest.mark.parametrize("system", ["Darwin", "Linux"])
def test_an_existing_dot_duskpool_keeps_its_pool(tmp_path, system):
    """A pool made by an earlier version lives in ~/.duskpool: an upgrade must not start a new, empty one."""
    assert state_dir(system=system, env={"XDG_STATE_HOME": "/tmp/s"}, home=tmp_path) == Path("/tmp/s/duskpool")
    (tmp_path / ".duskpool").mkdir()
    assert state_dir(system=system, env={"XDG_STATE_HOME": "/tmp/s"}, home=tmp_path) == tmp_path / ".duskpool"
    assert state_dir(system=system, env={"DUSKPOOL_HOME": "/srv/p"}, home=tmp_path) == Path("/srv/p")


def test_this_machine():
    assert cache_dir().name == "duskpool" and isinstance(state_dir(), Path)
