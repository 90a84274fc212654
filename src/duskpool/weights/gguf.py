"""Reading GGUF files (llama.cpp's format, what Ollama and LM Studio store).

The header (metadata and tensor table) is parsed here directly: the `gguf` package's reader maps
and indexes the whole file, which costs seconds and hundreds of MB on a model that should load in
a fraction of that. Tensor bytes are read with plain file reads, one tensor at a time, so a process
that holds a span of layers never touches the other layers' bytes.
"""

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# GGUF value types -> struct format (scalars); 8 = string, 9 = array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class ModelFileError(Exception):
    """A model file that cannot be used; the message says why in one line."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # torch order: (rows, cols) for matrices
    offset: int  # absolute byte offset in the file
    nbytes: int


@dataclass(frozen=True)
class PackedTensor:
    """A tensor's bytes exactly as stored (quant blocks, or plain floats): what a backend packs for itself."""

    data: np.ndarray  # uint8 [nbytes]
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # torch order: (rows, cols) for matrices


class _Header:
    """A cursor over the header bytes; raises ModelFileError when the header runs past the file."""

    def __init__(self, buf: mmap.mmap, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.buf):
            raise ModelFileError(f"{self.path} is truncated: its header runs past the end of the file")
        view = memoryview(self.buf)[self.pos:self.pos + n]
        self.pos += n
        return view

    def scalar(self, fmt: str) -> Any:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return bytes(self.take(self.scalar("Q"))).decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.scalar("I"), self.scalar("Q")
            if etype in _SCALARS and etype != 7:  # numeric arrays in one read
                dtype = np.dtype("<" + _SCALARS[etype])
                return np.frombuffer(self.take(count * dtype.itemsize), dtype=dtype).tolist()
            return [self.value(etype) for _ in range(count)]
        raise ModelFileError(f"{self.path} is damaged: unknown metadata value type {vtype}")


class GGUFFile:
    """A GGUF file's metadata and tensor table; tensors are read on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFileError(f"model file not found: {self.path}")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise ModelFileError(f"{self.path} is not a GGUF model file (it does not start with 'GGUF')")
            if size < 24:
                raise ModelFileError(f"{self.path} is truncated: {size} bytes is too short for a GGUF header")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                header = _Header(buf, self.path)
                self._parse(header, size)
                del header

    def _parse(self, h: _Header, size: int) -> None:
        h.take(4)
        version = h.scalar("I")
        if version not in (2, 3):
            raise ModelFileError(f"{self.path}: GGUF version {version} is not supported (only 2 and 3)")
        n_tensors, n_kv = h.scalar("Q"), h.scalar("Q")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = h.string()
            self.metadata[key] = h.value(h.scalar("I"))
        raw = []
        for _ in range(n_tensors):
            name = h.string()
            dims = [h.scalar("Q") for _ in range(h.scalar("I"))]
            raw.append((name, dims, h.scalar("I"), h.scalar("Q")))
        alignment = int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        data_start = -(-h.pos // alignment) * alignment
        self.tensors: dict[str, TensorInfo] = {}
        for name, dims, qtype, offset in raw:
            try:
                qtype = GGMLQuantizationType(qtype)
            except ValueError:
                raise ModelFileError(f"{self.path}: tensor {name} has unknown quant type {qtype}") from None
            block_size, block_bytes = GGML_QUANT_SIZES[qtype]
            count = int(np.prod(dims))
            info = TensorInfo(name, qtype, tuple(reversed(dims)), data_start + offset,
                              count // block_size * block_bytes)
            if info.offset + info.nbytes > size:
                raise ModelFileError(f"{self.path} is truncated: tensor {name} ends at byte "
                                     f"{info.offset + info.nbytes}, the file has {size}")
            self.tensors[name] = info

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "<missing>"))

    def read(self, name: str) -> PackedTensor:
        info = self.tensors[name]
        data = np.empty(info.nbytes, dtype=np.uint8)
        with open(self.path, "rb") as f:
            f.seek(info.offset)
            if f.readinto(data) != info.nbytes:
                raise ModelFileError(f"{self.path} is truncated inside tensor {name}")
        return PackedTensor(data, info.qtype, info.shape)

    def read_bytes(self, name: str) -> bytes:
        """A tensor's bytes exactly as stored (what nodes receive and cache)."""
        info = self.tensors[name]
        with open(self.path, "rb") as f:
            f.seek(info.offset)
            return f.read(info.nbytes)
