"""MLX's affine group quantization as a tensor type, beside GGUF's quant types.

What `mlx_lm.convert -q` writes and the mlx-community repos store: a weight [rows, cols] as `<name>.weight`
(uint32 [rows, cols * bits / 32]: each row's `bits`-bit codes as one little-endian bit stream), `<name>.scales`
and `<name>.biases` ([rows, cols / group_size], the model's float type); value = scale * code + bias per group.

A `PackedTensor` of this type holds the three arrays' bytes one after the other (weight, scales, biases), so it
is hashed, sent to a node and cached like any other tensor. On the wire its type is `int(affine)`, a number
above every GGML type's.
"""

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType

Q = GGMLQuantizationType
CODE_BASE = 1 << 16  # GGML's types are small numbers; ours start here
SCALE_TYPES = (Q.F32, Q.F16, Q.BF16)
SCALE_NUMPY = {Q.F32: np.float32, Q.F16: np.float16, Q.BF16: np.uint16}  # numpy has no bfloat16: raw bits


@dataclass(frozen=True)
class Affine:
    bits: int  # 2, 3, 4, 5, 6 or 8
    group_size: int  # 32, 64 or 128
    scale_type: GGMLQuantizationType  # of the scales and biases: F16, BF16 or F32

    @property
    def name(self) -> str:
        return f"MLX_Q{self.bits}_G{self.group_size}_{self.scale_type.name}"

    def __int__(self) -> int:
        return (CODE_BASE | SCALE_TYPES.index(self.scale_type) << 12 | self.group_size.bit_length() << 4
                | self.bits)

    @classmethod
    def from_int(cls, code: int) -> "Affine":
        return cls(code & 0xF, 1 << ((code >> 4 & 0xFF) - 1), SCALE_TYPES[code >> 12 & 0xF])

    def sizes(self, rows: int, cols: int) -> tuple[int, int]:
        """Bytes of the packed codes and of the scales (the biases are as many)."""
        scale_bytes = np.dtype(SCALE_NUMPY[self.scale_type]).itemsize
        return rows * cols * self.bits // 8, rows * cols // self.group_size * scale_bytes

    def nbytes(self, rows: int, cols: int) -> int:
        w, s = self.sizes(rows, cols)
        return w + 2 * s

    def split(self, data: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A tensor's bytes -> codes (uint8 [rows, cols * bits / 8]), scales and biases (raw [rows, groups])."""
        w, s = self.sizes(rows, cols)
        raw = SCALE_NUMPY[self.scale_type]
        return (data[:w].reshape(rows, -1), data[w:w + s].view(raw).reshape(rows, -1),
                data[w + s:w + 2 * s].view(raw).reshape(rows, -1))

    def join(self, w: np.ndarray, scales: np.ndarray, biases: np.ndarray) -> np.ndarray:
        return np.concatenate([np.ascontiguousarray(a).view(np.uint8).reshape(-1) for a in (w, scales, biases)])

    def codes(self, w: np.ndarray, cols: int) -> np.ndarray:
        """Packed rows (uint8 [n, cols * bits / 8]) -> each value's code (uint8 [n, cols])."""
        n = w.shape[0]
        if self.bits == 8:
            return w.copy()
        if self.bits == 4:
            return np.stack([w & 15, w >> 4], axis=-1).reshape(n, cols)
        stream = np.unpackbits(w, axis=1, bitorder="little").reshape(n, cols, self.bits)
        return (stream << np.arange(self.bits, dtype=np.uint8)).sum(axis=2, dtype=np.uint8)

    def floats(self, raw: np.ndarray) -> np.ndarray:
        """Scales or biases as float32."""
        return bf16_floats(raw) if self.scale_type == Q.BF16 else raw.astype(np.float32)

    def dequantize(self, data: np.ndarray, rows: int, cols: int) -> np.ndarray:
        """float32 [rows, cols]: scale * code + bias, each value."""
        w, scales, biases = self.split(data, rows, cols)
        codes = self.codes(w, cols).reshape(rows, -1, self.group_size).astype(np.float32)
        values = codes * self.floats(scales)[:, :, None] + self.floats(biases)[:, :, None]
        return values.reshape(rows, cols)


def bf16_floats(bits: np.ndarray) -> np.ndarray:
    """bfloat16 values (their bits, as uint16) as float32: the upper half of a float32's bits."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def qtype_of(code: int) -> "GGMLQuantizationType | Affine":
    """A tensor type as the wire carries it (`int(qtype)`)."""
    return Affine.from_int(code) if code >= CODE_BASE else GGMLQuantizationType(code)
