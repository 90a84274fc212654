"""MLX's packed weights (weights/affine.py) as something the C kernels run, converted once at load.

- 4-bit (mlx-community's usual form) -> Q4_1: a Q4_1 block is 32 values = d * q + m, the same affine form, so a
  group of 64 becomes two blocks sharing its scale and bias. The codes are exact; scale and bias are rounded to
  float16 (exact for float16 ones, and for bfloat16 ones whose magnitude is 6e-5 or more). Memory: 5 bits per
  weight (4.5 in an MLX group-64 file: 1.11x).
- other widths (2, 3, 5, 6, 8) -> Q8_0 plus a bias per group: a code q of `bits` bits is the int8 q - 2^(bits-1),
  so value = scale * (q - 2^(bits-1)) + (bias + 2^(bits-1) * scale): Q8_0's d * q, and a float32 bias per group
  that the matmul adds as (x summed over each group) @ bias.T (quant.py, `group_bias`), 1/group_size of its work.
  No GGUF type holds codes with a bias beside Q8_0 (which has none); dequantizing to F16 instead rounds enough to
  change a greedy token. Codes exact, scales rounded to float16 as above. Memory: 9 bits per weight at group 64
  (8.5 in an 8-bit file: 1.06x; 3.5 in a 3-bit one: 2.6x).
"""

import numpy as np
from gguf import GGMLQuantizationType

from duskpool.weights.affine import Affine
from duskpool.weights.gguf import PackedTensor

Q = GGMLQuantizationType
CHUNK_VALUES = 1 << 22  # values converted per step: bounds the temporaries of a load


def to_ggml(tensor: PackedTensor) -> tuple[PackedTensor, np.ndarray | None]:
    """A packed MLX weight as Q4_1 (4-bit), or as Q8_0 and its bias per group (float32 [rows, groups])."""
    affine: Affine = tensor.qtype
    rows, cols = tensor.shape
    w, scales, biases = affine.split(tensor.data, rows, cols)
    step = max(1, CHUNK_VALUES // cols)
    if affine.bits == 4:
        blocks = [_q4_1(affine, w[at:at + step], scales[at:at + step], biases[at:at + step], cols)
                  for at in range(0, rows, step)]
        return PackedTensor(np.concatenate(blocks), Q.Q4_1, (rows, cols)), None
    blocks = [_q8_0(affine, w[at:at + step], scales[at:at + step], cols) for at in range(0, rows, step)]
    # with the scale as Q8_0 holds it (float16), so value = d * q + bias exactly where q = 0: a group of zeros
    # (MLX packs one as code 0, scale -1e-7, bias 0) stays zeros, as a padding token's embedding must
    offset = float(1 << (affine.bits - 1))
    bias = affine.floats(biases) + offset * affine.floats(scales).astype(np.float16).astype(np.float32)
    return PackedTensor(np.concatenate(blocks), Q.Q8_0, (rows, cols)), np.ascontiguousarray(bias, dtype=np.float32)


def _q4_1(affine: Affine, w: np.ndarray, scales: np.ndarray, biases: np.ndarray, cols: int) -> np.ndarray:
    n, blocks = w.shape[0], cols // 32
    codes = affine.codes(w, cols).reshape(n, blocks, 2, 16)
    qs = codes[:, :, 0] | (codes[:, :, 1] << 4)  # value j in the low nibble of byte j, value j + 16 in its high one

    def per_block(raw: np.ndarray) -> np.ndarray:
        halves = np.repeat(affine.floats(raw), affine.group_size // 32, axis=1).astype(np.float16)
        return halves.view(np.uint8).reshape(n, blocks, 2)

    return np.concatenate([per_block(scales), per_block(biases), qs], axis=2).reshape(-1)  # d, m, qs[16]


def _q8_0(affine: Affine, w: np.ndarray, scales: np.ndarray, cols: int) -> np.ndarray:
    n, blocks = w.shape[0], cols // 32
    codes = affine.codes(w, cols).astype(np.int16) - (1 << (affine.bits - 1))
    qs = codes.astype(np.int8).view(np.uint8).reshape(n, blocks, 32)
    d = np.repeat(affine.floats(scales), affine.group_size // 32, axis=1).astype(np.float16)
    return np.concatenate([d.view(np.uint8).reshape(n, blocks, 2), qs], axis=2).reshape(-1)  # d, qs[32]
