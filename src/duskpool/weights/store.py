"""Content hashes of tensors, and the content-addressed cache where nodes keep received weights.

A tensor is named by the sha256 of its bytes as stored in the GGUF file, so a node that restarts,
or serves a second model sharing tensors with the first, finds them already cached.
"""

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from gguf import GGMLQuantizationType

from duskpool import paths
from duskpool.weights.gguf import GGUFFile, ModelFileError, PackedTensor, TensorInfo

HASH_CACHE_VERSION = 1


def default_cache_dir() -> Path:
    return paths.cache_dir()


def config_metadata(file: GGUFFile) -> dict[str, Any]:
    """The metadata a node needs to run layers: the family and its shape. Not the tokenizer (it stays home), nor
    the file's names and descriptions (general.*: they would tell a node which public model to fit an inverter
    of its hidden states against); only general.architecture, which picks the family's code."""
    return {k: v for k, v in file.metadata.items()
            if not k.startswith(("tokenizer.", "general.")) or k == "general.architecture"}


def tensor_hashes(file: GGUFFile, cache_dir: Path | None = None) -> dict[str, str]:
    """sha256 of every tensor, remembered per (path, size, mtime) so a model is hashed once."""
    stat = file.path.stat()
    key = hashlib.sha256(f"{file.path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:24]
    memo = (cache_dir or default_cache_dir()) / "hashes" / f"{key}.json"
    if memo.exists():
        saved = json.loads(memo.read_text())
        if saved.get("version") == HASH_CACHE_VERSION:
            return saved["tensors"]
    hashes = {}
    with open(file.path, "rb") as f:
        for name, info in file.tensors.items():
            f.seek(info.offset)
            hashes[name] = hashlib.sha256(f.read(info.nbytes)).hexdigest()
    with atomic_file(memo) as f:
        f.write(json.dumps({"version": HASH_CACHE_VERSION, "tensors": hashes}).encode())
    return hashes


def model_hash(file: GGUFFile, hashes: dict[str, str]) -> str:
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

    def add(self, sha256: str, pieces: Iterable[bytes], nbytes: int) -> None:
        """Store the tensor whose bytes arrive as `pieces`; raise DamagedTensor (keeping nothing) unless they are
        `nbytes` long and hash to `sha256`."""
        digest, size = hashlib.sha256(), 0
        with atomic_file(self.path(sha256)) as f:
            for piece in pieces:
                size += len(piece)
                if size > nbytes:
                    raise DamagedTensor(f"tensor {sha256[:12]} arrived longer than its {nbytes} bytes")
                digest.update(piece)
                f.write(piece)
            if size != nbytes or digest.hexdigest() != sha256:
                raise DamagedTensor(f"tensor {sha256[:12]} arrived damaged")


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
        return TensorInfo(name, GGMLQuantizationType(qtype), tuple(shape), 0, nbytes)


@contextmanager
def atomic_file(target: Path) -> Iterator[IO[bytes]]:
    """A file to write that appears at `target` whole when the block ends, or not at all if it raises."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.NamedTemporaryFile(dir=target.parent, delete=False)
    try:
        with tmp:
            yield tmp
        os.replace(tmp.name, target)
    except BaseException:
        os.unlink(tmp.name)
        raise
