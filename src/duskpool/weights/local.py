"""Model files a node already has: the tensors of a span it is sent are read from them, matched by name, size
and content hash, instead of streamed from the gateway (`duskpool node --models DIR`)."""

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from duskpool.weights.folder import is_model_folder, open_model
from duskpool.weights.gguf import ModelFileError
from duskpool.weights.store import TensorStore


@dataclass(frozen=True)
class Wanted:
    """One tensor of a span, as its manifest names it."""
    name: str
    sha256: str
    nbytes: int


def model_paths(directories: Iterable[Path]) -> Iterator[Path]:
    """The GGUF files and model folders under each directory (a directory may itself be a model folder)."""
    for directory in directories:
        if is_model_folder(directory):
            yield directory
            continue
        for path in sorted(directory.rglob("*")):
            if path.is_file() and path.suffix == ".gguf" or path.is_dir() and is_model_folder(path):
                yield path


def copy_from_local(store: TensorStore, tensors: list[Wanted], paths: Iterable[Path]) -> int:
    """Put into `store` each of `tensors` it lacks that a model file in `paths` holds: the bytes read from disk.

    A candidate is only read when a file has a tensor of that name and size, and only kept when its bytes hash to
    the name the manifest gives (a different quantization or version of the model is simply not used)."""
    wanted = {t.sha256: t for t in tensors if not store.verified(t.sha256, t.nbytes)}
    taken = 0
    for path in paths:
        if not wanted:
            break
        try:
            file = open_model(path)
        except (ModelFileError, OSError, ValueError):  # not a model we read: nothing to take from it
            continue
        for sha256, tensor in list(wanted.items()):
            info = file.tensors.get(tensor.name)
            if info is None or info.nbytes != tensor.nbytes:
                continue
            data = file.read_bytes(tensor.name)
            if hashlib.sha256(data).hexdigest() != sha256:
                continue
            with store.receive(sha256, tensor.nbytes, 0) as part:
                part.hash(data)
                part.write(0, data)
                part.finish()
            del wanted[sha256]
            taken += tensor.nbytes
    return taken
