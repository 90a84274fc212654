"""Content hashes of tensors, and the content-addressed cache where nodes keep received weights.

A tensor is named by the sha256 of its bytes as a node receives them (a GGUF file's as stored; a model folder's as
weights/folder.py reads them), so a node that restarts, or serves a second model sharing tensors with the first,
finds them already cached.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from duskpool import paths
from duskpool.weights.affine import qtype_of
from duskpool.weights.folder import ModelFolder
from duskpool.weights.gguf import GGUFFile, ModelFileError, PackedTensor, TensorInfo

HASH_CACHE_VERSION = 1
# a transfer cut short is resumed within this long, or its partial tensor is removed (a node that starts, and
# each half minute while it serves): nothing else counts its bytes, and no transfer may ever come back for it
PARTIAL_KEEP_S = 24 * 3600.0
ORPHAN_AGE_S = 3600.0  # an atomic_file write takes milliseconds: a temporary file this old lost its writer


def default_cache_dir() -> Path:
    return paths.cache_dir()


def config_metadata(file: GGUFFile | ModelFolder) -> dict[str, Any]:
    """The metadata a node needs to run layers: the family and its shape. Not the tokenizer (it stays home), nor
    the file's names and descriptions (general.*: they would tell a node which public model to fit an inverter
    of its hidden states against); only general.architecture, which picks the family's code."""
    return {k: v for k, v in file.metadata.items()
            if not k.startswith(("tokenizer.", "general.")) or k == "general.architecture"}


def _signature(path: Path) -> str:
    """What changes when a model file, or any file of a model folder, does: path, size and mtime of each."""
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return "|".join(f"{p.resolve()}|{p.stat().st_size}|{p.stat().st_mtime_ns}" for p in files)


def tensor_hashes(file: GGUFFile | ModelFolder, cache_dir: Path | None = None) -> dict[str, str]:
    """sha256 of every tensor, remembered per (path, size, mtime) of each file so a model is hashed once."""
    key = hashlib.sha256(_signature(file.path).encode()).hexdigest()[:24]
    memo = (cache_dir or default_cache_dir()) / "hashes" / f"{key}.json"
    if memo.exists():
        saved = json.loads(memo.read_text())
        if saved.get("version") == HASH_CACHE_VERSION:
            return saved["tensors"]
    hashes = {name: hashlib.sha256(file.read_bytes(name)).hexdigest() for name in file.tensors}
    with atomic_file(memo) as f:
        f.write(json.dumps({"version": HASH_CACHE_VERSION, "tensors": hashes}).encode())
    return hashes


def model_hash(file: GGUFFile | ModelFolder, hashes: dict[str, str]) -> str:
    """One name for a model's weights and configuration."""
    digest = hashlib.sha256(json.dumps(config_metadata(file), sort_keys=True, default=str).encode())
    for name in sorted(hashes):
        digest.update(f"{name}={hashes[name]};".encode())
    return digest.hexdigest()


class DamagedTensor(ValueError):
    """Bytes that arrived for a tensor are not the tensor its hash names."""


class TensorStore:
    """A directory of tensors named by their sha256; a tensor is added whole and checked, or not at all."""

    def __init__(self, root: Path):
        self.root = root / "tensors"
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a sha256: {sha256!r}")
        return self.root / sha256[:2] / sha256

    def has(self, sha256: str) -> bool:
        return self.path(sha256).exists()

    def verified(self, sha256: str, nbytes: int) -> bool:
        """Whether the store holds this tensor intact: `nbytes` long and hashing to `sha256`. One that does not
        (a flipped bit on disk, a file cut short) is removed, so that it is fetched again."""
        path = self.path(sha256)
        try:
            if path.stat().st_size == nbytes:
                digest = hashlib.sha256()
                with open(path, "rb") as f:
                    while chunk := f.read(2**20):
                        digest.update(chunk)
                if digest.hexdigest() == sha256:
                    return True
        except FileNotFoundError:
            return False
        path.unlink(missing_ok=True)
        return False

    def partial_path(self, sha256: str) -> Path:
        return self.path(sha256).with_suffix(".part")

    def partial_bytes(self, sha256: str, nbytes: int) -> int:
        """The bytes of this tensor that a transfer cut short left here: a new one need send only the rest."""
        try:
            size = self.partial_path(sha256).stat().st_size
        except FileNotFoundError:
            return 0
        return size if size < nbytes else 0  # a whole one that is still .part failed its hash: start over

    def remove_stale_partials(self, older_than_s: float = PARTIAL_KEEP_S) -> list[Path]:
        """Remove the partial tensors that no transfer has written to for `older_than_s`; one a transfer holds (its
        lock) stays. The ones removed: a later transfer of such a tensor sends it whole."""
        cutoff, removed = time.time() - older_than_s, []
        for path in self.root.glob("*/*.part"):
            try:
                if path.stat().st_mtime > cutoff:
                    continue
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:  # finished or removed meanwhile
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if os.stat(path).st_ino == os.fstat(fd).st_ino:  # still the file we locked (see _open_locked)
                    path.unlink()
                    removed.append(path)
            except (BlockingIOError, FileNotFoundError):  # a transfer holds it, or finished it
                pass
            finally:
                os.close(fd)
        return removed

    def receive(self, sha256: str, nbytes: int, start: int) -> "PartialTensor":
        """The tensor to write from byte `start` on (its first `start` bytes are here from an earlier transfer)."""
        return PartialTensor(self, sha256, nbytes, start)


class PartialTensor:
    """A tensor arriving in order into `<sha256>.part`, written and hashed as it comes (`write` and `hash`, each
    called in order), moved into the store once whole and checked. Cut short (a broken link, a killed node), the
    file stays: its length is the bytes that arrived. Close it in every case (`with`)."""

    def __init__(self, store: TensorStore, sha256: str, nbytes: int, start: int):
        self.target, self.path = store.path(sha256), store.partial_path(sha256)
        self.sha256, self.nbytes, self.size = sha256, nbytes, start
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.fd = self._open_locked()
        try:
            # a transfer of the same tensor for another span finished it while this one waited for the lock:
            # this one's bytes are taken off the stream and dropped, the store's copy stays
            self.stored_meanwhile = self.target.exists()
            if self.stored_meanwhile:
                self.path.unlink()  # the empty file just made: a transfer after this one opens its own
                return
            if os.fstat(self.fd).st_size < start:
                raise DamagedTensor(f"tensor {sha256[:12]}: fewer than the {start} bytes said held are here")
            os.ftruncate(self.fd, start)
            self.digest = hashlib.sha256()
            for offset in range(0, start, 2**24):  # the earlier transfer's bytes, checked with the rest at the end
                self.digest.update(os.pread(self.fd, min(2**24, start - offset), offset))
        except BaseException:
            os.close(self.fd)
            raise

    def _open_locked(self) -> int:
        """The .part file, open and locked. Another transfer of the same tensor holds the lock until it is done,
        and may have moved the file into the store by then: the path is opened anew until the lock is on it."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)

    def hash(self, data: bytes) -> None:
        """Take the bytes that follow those hashed so far into the tensor's hash (on a thread of its own, beside
        `write`'s: hashlib and pwrite release the GIL, and each costs about what the other does)."""
        if not self.stored_meanwhile:
            self.digest.update(data)

    def write(self, offset: int, data: bytes) -> None:
        """Bytes `offset`.. of the tensor; they must follow the bytes written so far."""
        if offset != self.size:
            raise DamagedTensor(f"tensor {self.sha256[:12]}: bytes at {offset} arrived where {self.size} was due")
        if self.size + len(data) > self.nbytes:
            raise DamagedTensor(f"tensor {self.sha256[:12]} arrived longer than its {self.nbytes} bytes")
        view, done = memoryview(data), 0
        while done < len(data) and not self.stored_meanwhile:
            done += os.pwrite(self.fd, view[done:], offset + done)
        self.size += len(data)

    def finish(self) -> None:
        """Move the tensor into the store; raise DamagedTensor (keeping nothing) unless it is whole and hashes
        to its name."""
        if self.stored_meanwhile:
            return
        if self.size != self.nbytes or self.digest.hexdigest() != self.sha256:
            self.path.unlink(missing_ok=True)
            raise DamagedTensor(f"tensor {self.sha256[:12]} arrived damaged")
        os.replace(self.path, self.target)

    def close(self) -> None:
        os.close(self.fd)  # and with it the lock

    def __enter__(self) -> "PartialTensor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class StoredModel:
    """A model's tensors as held in a TensorStore: reads like a GGUFFile to the model loaders."""

    store: TensorStore
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]  # offsets unused: each tensor is its own file
    hashes: dict[str, str]

    @property
    def path(self) -> str:
        return f"cached model ({self.store.root})"

    def read(self, name: str) -> PackedTensor:
        info = self.tensors[name]
        path = self.store.path(self.hashes[name])
        data = np.empty(info.nbytes, dtype=np.uint8)
        with open(path, "rb") as f:
            if f.readinto(data) != info.nbytes:
                raise ModelFileError(f"cached tensor {path} is damaged")
        return PackedTensor(data, info.qtype, info.shape)

    @staticmethod
    def info(name: str, qtype: int, shape: list[int], nbytes: int) -> TensorInfo:
        return TensorInfo(name, qtype_of(qtype), tuple(shape), 0, nbytes)


@contextlib.contextmanager
def atomic_file(target: Path) -> Iterator[IO[bytes]]:
    """A file to write that appears at `target` whole when the block ends, or not at all if it raises. A process
    killed mid-write leaves its temporary file behind; the next write of the same target removes it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}."
    for orphan in target.parent.glob(f"{prefix}*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            if orphan.stat().st_mtime < time.time() - ORPHAN_AGE_S:  # a younger one may be another writer's
                orphan.unlink()
    tmp = tempfile.NamedTemporaryFile(dir=target.parent, prefix=prefix, suffix=".tmp", delete=False)
    try:
        with tmp:
            yield tmp
        os.replace(tmp.name, target)
    except BaseException:
        os.unlink(tmp.name)
        raise
