"""MLX's packed weights (weights/affine.py) as something the C kernels run, converted once at load.

- 4-bit (mlx-community's usual form) -> Q4_1: a Q4_1 block is 32 values = d * q + m, the same affine form, so a
  group of 64 becomes two blocks sharing its scale and bias. The codes are exact; scale and bias are rounded to
  float16 (exact for float16 ones, and for bfloat16 ones whose magnitude is 6e-5 or more). Memory: 5 bits per
  weight (4.5 in an MLX group-64 file: 1.11x).
- other widths (2, 3, 5, 6, 8) -> F32, the dequantized values, exact (4 bytes per weight: 3.8x an 8-bit file).
  No GGUF type holds 8-bit codes with a bias (Q8_0 has none), and F16 rounds them enough to change a greedy token.
"""

import numpy as np
from gguf import GGMLQuantizationType

from duskpool.weights.affine import Affine
from duskpool.weights.gguf import PackedTensor

Q = GGMLQuantizationType
CHUNK_VALUES = 1 << 22  # values converted per step: bounds the temporaries of a load


def to_ggml(tensor: PackedTensor) -> PackedTensor:
    """A packed MLX weight as Q4_1 (4-bit) or F32 (the other widths)."""
    affine: Affine = tensor.qtype
    rows, cols = tensor.shape
    w, scales, biases = affine.split(tensor.data, rows, cols)
    step = max(1, CHUNK_VALUES // cols)
    out = []
    for start in range(0, rows, step):
        part = slice(start, start + step)
        if affine.bits == 4:
            out.append(_q4_1(affine, w[part], scales[part], biases[part], cols))
        else:
            values = affine.dequantize(affine.join(w[part], scales[part], biases[part]), w[part].shape[0], cols)
            out.append(values.view(np.uint8).reshape(-1))
    return PackedTensor(np.concatenate(out), Q.Q4_1 if affine.bits == 4 else Q.F32, (rows, cols))


def _q4_1(affine: Affine, w: np.ndarray, scales: np.ndarray, biases: np.ndarray, cols: int) -> np.ndarray:
    n, blocks = w.shape[0], cols // 32
    codes = affine.codes(w, cols).reshape(n, blocks, 2, 16)
    qs = codes[:, :, 0] | (codes[:, :, 1] << 4)  # value j in the low nibble of byte j, value j + 16 in its high one

    def per_block(raw: np.ndarray) -> np.ndarray:
        halves = np.repeat(affine.floats(raw), affine.group_size // 32, axis=1).astype(np.float16)
        return halves.view(np.uint8).reshape(n, blocks, 2)

    return np.concatenate([per_block(scales), per_block(biases), qs], axis=2).reshape(-1)  # d, m, qs[16]
