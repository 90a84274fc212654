import os
import time

import pytest

from duskpool.weights.store import ORPHAN_AGE_S, atomic_file


def test_atomic_file_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "revoked.json"
    with atomic_file(target) as f:
        f.write(b"[1]")
        assert not target.exists()
    assert target.read_bytes() == b"[1]"
    with pytest.raises(RuntimeError), atomic_file(target) as f:
        f.write(b"[1, 2]")
        raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"[1]" and os.listdir(tmp_path) == ["revoked.json"]


def test_a_temporary_file_a_killed_writer_left_goes_with_the_next_write(tmp_path):
    target = tmp_path / "hashes.json"
    names = (".hashes.json.1.tmp", ".hashes.json.2.tmp", ".other.json.3.tmp")
    orphan, young, other = (tmp_path / name for name in names)
    for path in (orphan, young, other):
        path.write_bytes(b"half written")
    for path in (orphan, other):
        os.utime(path, (time.time() - ORPHAN_AGE_S - 1,) * 2)
    with atomic_file(target) as f:
        assert os.path.basename(f.name).startswith(".hashes.json.") and f.name.endswith(".tmp")
        f.write(b"{}")
    # the old one of this target is gone; a young one may be another writer's, another target's is not ours
    assert sorted(os.listdir(tmp_path)) == [".hashes.json.2.tmp", ".other.json.3.tmp", "hashes.json"]
