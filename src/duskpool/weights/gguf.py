"""Reading GGUF files (llama.cpp's format, what Ollama and LM Studio store).

Metadata and the tensor table come from the `gguf` package's reader; tensor bytes are read with
plain file reads, one tensor at a time, so loading never maps the whole file into memory.
"""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType

from duskpool.weights.quant import SUPPORTED_TYPES, QuantTensor

GGUF_MAGIC = b"GGUF"


class ModelFileError(Exception):
    """A model file that cannot be used; the message says why in one line."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # torch order: (rows, cols) for matrices
    offset: int  # absolute byte offset in the file
    nbytes: int


class GGUFFile:
    """A GGUF file's metadata and tensor table; tensors are read on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFileError(f"model file not found: {self.path}")
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise ModelFileError(f"{self.path} is not a GGUF file (starts with {magic!r}, expected b'GGUF')")
        try:
            reader = GGUFReader(self.path)
        except Exception as e:  # the reader raises bare ValueError/IndexError on damage
            raise ModelFileError(f"{self.path} is a damaged GGUF file: {e}") from None
        self.metadata: dict[str, Any] = {name: _field_value(field) for name, field in reader.fields.items()}
        size = self.path.stat().st_size
        self.tensors: dict[str, TensorInfo] = {}
        for t in reader.tensors:
            info = TensorInfo(t.name, GGMLQuantizationType(t.tensor_type),
                              tuple(int(d) for d in reversed(t.shape.tolist())),
                              int(t.data_offset), int(t.n_bytes))
            if info.offset + info.nbytes > size:
                raise ModelFileError(f"{self.path} is truncated: tensor {t.name} ends at byte "
                                     f"{info.offset + info.nbytes}, the file has {size}")
            self.tensors[t.name] = info
        del reader  # drops the file mapping

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "<missing>"))

    def read(self, name: str) -> QuantTensor | torch.Tensor:
        """A matrix as a QuantTensor (still quantized); a vector as a float32 tensor."""
        info = self.tensors[name]
        if info.qtype not in SUPPORTED_TYPES:
            raise ModelFileError(f"{self.path}: tensor {name} has quant type {info.qtype.name}, which duskpool "
                                 f"does not support (supported: {', '.join(t.name for t in SUPPORTED_TYPES)})")
        data = torch.empty(info.nbytes, dtype=torch.uint8)
        with open(self.path, "rb") as f:
            f.seek(info.offset)
            if f.readinto(data.numpy()) != info.nbytes:
                raise ModelFileError(f"{self.path} is truncated inside tensor {name}")
        if len(info.shape) == 1:
            if info.qtype != GGMLQuantizationType.F32:
                return QuantTensor(data.view(1, -1), info.qtype, (1, info.shape[0])).dequantize()[0]
            return data.view(torch.float32)
        rows, cols = info.shape[0], int(np.prod(info.shape[1:]))
        block_size, block_bytes = GGML_QUANT_SIZES[info.qtype]
        return QuantTensor(data.view(rows, cols // block_size * block_bytes), info.qtype, (rows, cols))


def _field_value(field) -> Any:
    if field.types and field.types[0] == GGUFValueType.ARRAY and len(field.types) > 1 \
            and field.types[1] == GGUFValueType.STRING:
        return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
    return field.contents()
