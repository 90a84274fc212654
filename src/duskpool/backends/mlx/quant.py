"""GGUF quant blocks -> MLX affine groups, converted once at load; the linear layers and the embedding over them.

MLX's quantized matmul reads a weight as groups of 32 values w = scale * code + bias, with `bits`-bit codes
packed little-endian into uint32 words and one scale and one bias per group. The GGUF formats map onto that:

| GGUF  | bits | scale        | bias          | against gguf-py's dequantize (float32)                       |
|-------|------|--------------|---------------|--------------------------------------------------------------|
| Q4_0  | 4    | d            | -8 d          | exact                                                        |
| Q4_1  | 4    | d            | m             | exact                                                        |
| Q5_0  | 5    | d            | -16 d         | exact                                                        |
| Q5_1  | 5    | d            | m             | exact                                                        |
| Q8_0  | 8    | d            | -128 d        | exact (code = q + 128)                                        |
| Q4_K  | 4    | d * sc       | -dmin * m     | codes exact; scale and bias rounded to float16 (see below)   |
| Q5_K  | 5    | d * sc       | -dmin * m     | codes exact; scale and bias rounded to float16               |
| Q6_K  | 6    | d * sc of the group's larger half | -32 scale | nearest: the smaller half's codes re-rounded |

Scales and biases are stored as float16 (what keeps a Q4 weight within 1.11x of its file bytes; float32 would
be 1.33x). d, m and their multiples by 8, 16 or 128 are float16 values, so the legacy formats stay exact;
a K-quant's d * sc (a float16 times a 6-bit integer) needs up to 17 significant bits, one float16 rounding
(relative error <= 2^-11 per scale) away: the codes are exact, and with float32 scales (`scale_dtype`) the
conversion reproduces gguf-py bit for bit. Q6_K's 16-value sub-blocks have a scale each and MLX's smallest
group is 32, so a group takes the larger of its two scales and the smaller half's values are rounded to it.
"""

import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from duskpool.weights.affine import Affine
from duskpool.weights.gguf import PackedTensor

Q = GGMLQuantizationType
GROUP = 32  # values per MLX group
BITS = {Q.Q4_0: 4, Q.Q4_1: 4, Q.Q5_0: 5, Q.Q5_1: 5, Q.Q8_0: 8, Q.Q4_K: 4, Q.Q5_K: 5, Q.Q6_K: 6}
EXACT = (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0)  # exact with float16 scales
DENSE = {Q.F32: mx.float32, Q.F16: mx.float16, Q.BF16: mx.bfloat16}
SUPPORTED_TYPES = (*DENSE, *BITS)
CHUNK_BYTES = 64 << 20  # file bytes converted per step: bounds the temporaries of a load

# On a GPU (Metal, CUDA) a projection takes its input in its weight's own type (float16 for the quantized ones:
# anything else makes mx.quantized_matmul copy the scales on every call) and the cache holds float16. MLX's CPU
# kernels accumulate float16 products in float16 (1% errors at 1024 inputs), so on the CPU everything is float32
# (quantized_matmul widens the scales per call: the CPU is where CI runs MLX, not where it is fast).
COMPUTE = mx.float16 if mx.default_device().type == mx.gpu else mx.float32


def input_type(weight: mx.Dtype) -> mx.Dtype:
    return mx.float32 if COMPUTE == mx.float32 else weight


# The residual stream's type: hidden states between layers, norms' weights (set before a load).
RESIDUAL = mx.float32

# MLX evaluates from one thread at a time here: a node's gRPC threads each build and run their steps
EVAL_LOCK = threading.RLock()


def evaluate(*arrays: mx.array) -> None:
    with EVAL_LOCK:
        mx.eval(*arrays)


# --- GGUF blocks -> (codes, scale, bias) ---------------------------------------------------------------------
def _f16(two_bytes: mx.array) -> mx.array:
    """float32 values of little-endian float16 fields [n, 2] (uint8)."""
    bits = two_bytes[:, 0].astype(mx.uint16) | (two_bytes[:, 1].astype(mx.uint16) << 8)
    return bits.view(mx.float16).astype(mx.float32)


def _nibbles(qs: mx.array) -> mx.array:
    """[n, 16k] bytes -> [n, k, 32] 4-bit values: each 16-byte run is 16 low nibbles, then 16 high ones."""
    n = qs.shape[0]
    qs = qs.reshape(n, -1, 1, 16)
    return mx.concatenate([qs & 15, qs >> 4], axis=2).reshape(n, -1, 32)


def _k_scales(scales: mx.array) -> tuple[mx.array, mx.array]:
    """The eight 6-bit scales and mins [n, 8] packed in a K-quant's 12 bytes (gguf-py's Q4_K.get_scale_min)."""
    d, m, m_d = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = mx.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=1)
    mins = mx.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=1)
    return sc.astype(mx.float32), mins.astype(mx.float32)


def _qh_bits(qh: mx.array, shifts: int) -> mx.array:
    """[n, bytes] -> [n, shifts, bytes]: bit s of each byte (s = 0..shifts-1)."""
    return (qh[:, None, :] >> mx.arange(shifts, dtype=mx.uint8)[None, :, None]) & 1


def codes_and_groups(blocks: mx.array, qtype: Q) -> tuple[mx.array, mx.array, mx.array]:
    """GGUF blocks [n, block_bytes] (uint8) -> codes [n * groups, 32] (uint8), scale and bias [n * groups]
    (float32) such that scale * code + bias is each value (for Q6_K: the nearest such value)."""
    n = blocks.shape[0]
    if qtype in (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1):
        d = _f16(blocks[:, 0:2])
        has_min = qtype in (Q.Q4_1, Q.Q5_1)
        m = _f16(blocks[:, 2:4]) if has_min else None
        at = 4 if has_min else 2
        codes = _nibbles(blocks[:, -16:]).reshape(n, 32)
        if qtype in (Q.Q5_0, Q.Q5_1):  # the fifth bit of value j is bit j of a little-endian uint32
            codes = codes | (_qh_bits(blocks[:, at:at + 4], 8).transpose(0, 2, 1).reshape(n, 32) << 4)
        offset = 8 if qtype == Q.Q4_0 else 16
        return codes, d, m if has_min else -offset * d
    if qtype == Q.Q8_0:
        d = _f16(blocks[:, 0:2])
        return blocks[:, 2:] ^ 0x80, d, -128 * d  # int8 q as the code q + 128
    if qtype in (Q.Q4_K, Q.Q5_K):
        d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
        sc, mins = _k_scales(blocks[:, 4:16])
        if qtype == Q.Q4_K:
            codes = _two_runs(blocks[:, 16:144])
        else:  # the fifth bit of sub-block g's value j is bit g of qh[j]
            codes = _two_runs(blocks[:, 48:176]) | (_qh_bits(blocks[:, 16:48], 8) << 4)
        scale, bias = d[:, None] * sc, -(dmin[:, None] * mins)
        return codes.reshape(-1, 32), scale.reshape(-1), bias.reshape(-1)
    if qtype == Q.Q6_K:
        return _q6_k(blocks)
    raise ValueError(f"{qtype.name} has no MLX affine form")


def _two_runs(qs: mx.array) -> mx.array:
    """A K-quant's 128 bytes of 4-bit values -> [n, 8, 32]: sub-block 2c is the low nibbles of bytes 32c..32c+31,
    sub-block 2c + 1 their high nibbles."""
    n = qs.shape[0]
    qs = qs.reshape(n, 4, 1, 32)
    return mx.concatenate([qs & 15, qs >> 4], axis=2).reshape(n, 8, 32)


def _q6_k(blocks: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    n = blocks.shape[0]
    ql, qh = blocks[:, 0:128], blocks[:, 128:192]
    sub_scales = blocks[:, 192:208].view(mx.int8).astype(mx.float32)  # [n, 16], one per 16 values
    d = _f16(blocks[:, 208:210])
    low = ql.reshape(n, 2, 1, 64)
    low = mx.concatenate([low & 15, low >> 4], axis=2).reshape(n, 2, 4, 32)  # [half, quarter, 32]
    high = (qh.reshape(n, 2, 1, 32) >> (2 * mx.arange(4, dtype=mx.uint8))[None, None, :, None]) & 3
    q = (low | (high << 4)).astype(mx.float32).reshape(n, 16, 16) - 32  # q in [-32, 31]
    step = d[:, None] * sub_scales  # [n, 16]
    values = (step[:, :, None] * q).reshape(-1, 32)  # gguf-py's float32 values, a group per row
    pair = step.reshape(-1, 2)
    # the group's scale is its larger half's (sign and all), so that half's codes stay q; the other half rounds
    scale = mx.where(mx.abs(pair[:, 0]) >= mx.abs(pair[:, 1]), pair[:, 0], pair[:, 1])
    scale = scale.astype(mx.float16).astype(mx.float32)  # as stored
    codes = mx.round(values / mx.where(scale == 0, 1, scale)[:, None]) + 32
    return mx.clip(codes, 0, 63).astype(mx.uint8), scale, -32 * scale


def pack(codes: mx.array, bits: int) -> mx.array:
    """codes [n, 32] (uint8, < 2^bits) -> [n, bits] uint32 words: the codes as one little-endian bit stream."""
    n = codes.shape[0]
    if bits == 8:
        return codes.view(mx.uint32)
    if bits == 4:
        pairs = codes.reshape(n, 16, 2)
        return (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).view(mx.uint32)
    # eight codes are `bits` whole bytes: each run of eight is summed into one uint64 and cut into its bytes
    runs = (codes.astype(mx.uint64).reshape(n, 4, 8) << (bits * mx.arange(8, dtype=mx.uint64))).sum(axis=2)
    stream = (runs[:, :, None] >> (8 * mx.arange(bits, dtype=mx.uint64))) & 0xFF  # [n, 4, bits] bytes
    return stream.astype(mx.uint8).reshape(n, 4 * bits).view(mx.uint32)


@dataclass
class Quantized:
    """A weight [rows, cols] as MLX affine groups: y = x @ W.T through mx.quantized_matmul."""

    w: mx.array  # uint32 [rows, cols * bits / 32]
    scales: mx.array  # [rows, cols / group_size]: float16 (float32 where a legacy format's d does not fit; an MLX
    biases: mx.array  # folder's own type, bfloat16 often)
    bits: int
    group_size: int = GROUP  # 32 for a converted GGUF weight; an MLX folder's own (64 usually)

    @property
    def shape(self) -> tuple[int, int]:
        return self.w.shape[0], self.w.shape[1] * 32 // self.bits

    @property
    def nbytes(self) -> int:
        return self.w.nbytes + self.scales.nbytes + self.biases.nbytes

    def __call__(self, x: mx.array) -> mx.array:
        x = x.astype(input_type(self.scales.dtype))
        return mx.quantized_matmul(x, self.w, self.scales, self.biases, transpose=True, group_size=self.group_size,
                                   bits=self.bits)

    def rows(self, index: mx.array) -> mx.array:
        """float32 W[index], dequantized with float32 scales (so exact wherever the conversion is)."""
        return mx.dequantize(self.w[index], self.scales[index].astype(mx.float32),
                             self.biases[index].astype(mx.float32), group_size=self.group_size, bits=self.bits)

    def dequantize(self) -> mx.array:
        return self.rows(mx.arange(self.shape[0]))

    def arrays(self) -> list[mx.array]:
        return [self.w, self.scales, self.biases]

    def same_form(self, other: "Quantized") -> bool:
        return (self.bits, self.group_size, self.scales.dtype, self.shape[1]) == (
            other.bits, other.group_size, other.scales.dtype, other.shape[1])

    @staticmethod
    def concatenate(parts: "Sequence[Quantized]") -> "Quantized":
        return Quantized(*(mx.concatenate([getattr(p, f) for p in parts]) for f in ("w", "scales", "biases")),
                         parts[0].bits, parts[0].group_size)


@dataclass
class Dense:
    """A weight [rows, cols] kept in its file's float type (F32, F16, BF16)."""

    w: mx.array

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.w.shape)

    @property
    def nbytes(self) -> int:
        return self.w.nbytes

    def __call__(self, x: mx.array) -> mx.array:
        return x.astype(input_type(self.w.dtype)) @ self.w.T

    def rows(self, index: mx.array) -> mx.array:
        return self.w[index].astype(mx.float32)

    def dequantize(self) -> mx.array:
        return self.w.astype(mx.float32)

    def arrays(self) -> list[mx.array]:
        return [self.w]

    def same_form(self, other: "Dense") -> bool:
        return self.w.dtype == other.w.dtype and self.shape[1] == other.shape[1]

    @staticmethod
    def concatenate(parts: "Sequence[Dense]") -> "Dense":
        return Dense(mx.concatenate([p.w for p in parts]))


Weight = Quantized | Dense


def _matrix_shape(tensor: PackedTensor) -> tuple[int, int]:
    shape = tensor.shape
    return (1, shape[0]) if len(shape) == 1 else (shape[0], int(np.prod(shape[1:])))


def convert(tensor: PackedTensor, scale_dtype: mx.Dtype = mx.float16) -> Weight:
    """A GGUF tensor as MLX computes with it (a vector is one row); converted on MLX's default device, a chunk
    of rows at a time, into buffers allocated once."""
    rows, cols = _matrix_shape(tensor)
    if isinstance(tensor.qtype, Affine):
        return _as_stored(tensor)
    if tensor.qtype in DENSE:
        dtype = DENSE[tensor.qtype]
        raw = tensor.data.view({mx.float32: np.float32, mx.float16: np.float16, mx.bfloat16: np.uint16}[dtype])
        w = mx.array(raw.reshape(rows, cols))
        w = w.view(mx.bfloat16) if dtype == mx.bfloat16 else w
        evaluate(w)
        return Dense(w)
    if tensor.qtype not in BITS:
        raise ValueError(f"quant type {tensor.qtype.name} is not supported by the MLX backend")
    bits = BITS[tensor.qtype]
    block_size, block_bytes = GGML_QUANT_SIZES[tensor.qtype]
    blocks = tensor.data.reshape(rows, cols // block_size, block_bytes)
    groups = cols // GROUP
    w = mx.zeros((rows, groups * bits), dtype=mx.uint32)
    scales = mx.zeros((rows, groups), dtype=mx.float32 if scale_dtype == mx.float32 else mx.float16)
    biases = mx.zeros_like(scales)
    exact16 = True
    step = max(1, CHUNK_BYTES // max(1, blocks[0].nbytes))
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        chunk = mx.array(blocks[start:stop].reshape(-1, block_bytes))
        codes, scale, bias = codes_and_groups(chunk, tensor.qtype)
        w[start:stop] = pack(codes, bits).reshape(stop - start, groups * bits)
        scale, bias = scale.reshape(stop - start, groups), bias.reshape(stop - start, groups)
        scales[start:stop], biases[start:stop] = scale.astype(scales.dtype), bias.astype(biases.dtype)
        if tensor.qtype in EXACT and scales.dtype == mx.float16:  # d too large for float16 (|d| > 511 for Q8_0)
            fits = mx.all(scales[start:stop].astype(mx.float32) == scale) & mx.all(
                biases[start:stop].astype(mx.float32) == bias)
            evaluate(w, scales, biases, fits)
            exact16 = exact16 and fits.item()
        else:
            evaluate(w, scales, biases)
    if not exact16:  # rare enough to pay for twice
        return convert(tensor, mx.float32)
    return Quantized(w, scales, biases, bits)


def _as_stored(tensor: PackedTensor) -> Quantized:
    """An MLX folder's packed weight: already MLX's format, kept as it is."""
    affine: Affine = tensor.qtype
    rows, cols = tensor.shape
    w, scales, biases = affine.split(tensor.data, rows, cols)
    dtype = DENSE[affine.scale_type]
    scales, biases = (mx.array(a).view(dtype) if dtype == mx.bfloat16 else mx.array(a) for a in (scales, biases))
    weight = Quantized(mx.array(w.view(np.uint32)), scales, biases, affine.bits, affine.group_size)
    evaluate(*weight.arrays())
    return weight


_converted: dict[int, tuple[weakref.ref, weakref.ref]] = {}  # id(file bytes) -> (those bytes, their weight)


def convert_once(tensor: PackedTensor) -> Weight:
    """`convert`, once per tensor while its weight lives: a head tied to the embedding shares its table."""
    key = id(tensor.data)
    data_ref, weight_ref = _converted.get(key, (None, None))
    weight = weight_ref() if data_ref is not None and data_ref() is tensor.data else None
    if weight is None:
        weight = convert(tensor)
        for dead in [k for k, (d, w) in _converted.items() if d() is None or w() is None]:
            del _converted[dead]
        _converted[key] = (weakref.ref(tensor.data), weakref.ref(weight))
    return weight


def reference(tensor: PackedTensor) -> np.ndarray:
    """gguf-py's float32 values of a tensor [rows, cols]: what the conversion is checked against."""
    rows, cols = _matrix_shape(tensor)
    if isinstance(tensor.qtype, Affine):
        return tensor.qtype.dequantize(tensor.data, rows, cols)
    if tensor.qtype == Q.F32:
        return tensor.data.view(np.float32).reshape(rows, cols)
    return np.asarray(gguf_dequantize(tensor.data.reshape(rows, -1), tensor.qtype), dtype=np.float32)


class Linear:
    """y = x @ W.T (+ b) over one or more weights whose outputs are concatenated (fused q|k|v, gate|up).

    Parts of the same form are joined into one weight at load, so a fused projection is one matmul; a
    mixed checkpoint (Q4_K_M's Q6_K value weights) keeps one matmul per form. Each part takes and gives
    `input_type` of its weight's type (float16 for quantized weights on a GPU, float32 on the CPU).
    """

    def __init__(self, parts: list[Weight], bias: mx.array | None = None):
        self.bias = bias  # float32 [out_features], or None
        self.parts: list[Weight] = []
        run: list[Weight] = []
        for part in parts:
            if run and (type(run[-1]) is not type(part) or not run[-1].same_form(part)):
                self.parts.append(run[0] if len(run) == 1 else type(run[0]).concatenate(run))
                run = []
            run.append(part)
        self.parts.append(run[0] if len(run) == 1 else type(run[0]).concatenate(run))
        evaluate(*[a for p in self.parts for a in p.arrays()])
        self.in_features = parts[0].shape[1]
        self.out_features = sum(p.shape[0] for p in self.parts)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def __call__(self, x: mx.array) -> mx.array:
        # x: [..., in_features] -> [..., out_features]
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)
        outs = [part(x) for part in self.parts]
        y = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=-1)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)


class Embedding:
    """Rows of a (quantized) table as float32 hidden states."""

    def __init__(self, table: Weight):
        self.table = table

    def rows(self, tokens: Sequence[int]) -> mx.array:
        return self.table.rows(mx.array(np.asarray(tokens, dtype=np.int32).reshape(-1))).astype(RESIDUAL)
