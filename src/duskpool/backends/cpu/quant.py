"""Quantized weights kept as their GGUF blocks, with matmul and row lookup on them (the C kernels in native/)."""

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from duskpool.backends.cpu import affine, native
from duskpool.weights.affine import Affine
from duskpool.weights.gguf import PackedTensor

Q = GGMLQuantizationType
SUPPORTED_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K,
                   Q.IQ4_NL, Q.IQ4_XS)  # and MLX's packed weights (weights.affine.Affine), converted at load


@dataclass
class QuantTensor:
    """A weight [rows, cols] held as the GGUF blocks it was stored in: no bf16 copy is ever kept."""

    data: torch.Tensor  # uint8 [rows, row_bytes], the file's bytes
    qtype: GGMLQuantizationType
    shape: tuple[int, int]  # (rows, cols) = (out_features, in_features)
    # float32 [rows, groups]: added to every value of its group of cols; what an MLX weight converted to Q8_0 has
    # beyond Q8_0's d * q (affine.py)
    group_bias: torch.Tensor | None = None

    def __post_init__(self) -> None:
        block_size, block_bytes = GGML_QUANT_SIZES[self.qtype]
        rows, cols = self.shape
        assert cols % block_size == 0 and self.data.shape == (rows, cols // block_size * block_bytes)

    @property
    def nbytes(self) -> int:
        return self.data.numel() + (0 if self.group_bias is None else self.group_bias.numel() * 4)

    @classmethod
    def from_packed(cls, tensor: PackedTensor) -> "QuantTensor":
        """A weight as its file stored it; a vector is one row."""
        bias = None
        if isinstance(tensor.qtype, Affine):
            tensor, bias = affine.to_ggml(tensor)
        shape = tensor.shape
        rows, cols = (1, shape[0]) if len(shape) == 1 else (shape[0], int(np.prod(shape[1:])))
        return cls(torch.from_numpy(tensor.data).view(rows, -1), tensor.qtype, (rows, cols),
                   None if bias is None else torch.from_numpy(bias))

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Dequantized rows W[index]: float32 [len(index), cols] (an embedding lookup)."""
        index = index.reshape(-1).to(torch.int64).contiguous()
        lib = native.library()
        if lib is None:
            out = self._dequantize_numpy(self.data[index])
        else:
            out = torch.empty(index.numel(), self.shape[1], dtype=torch.float32)
            lib.dp_dequantize_rows(self.qtype, self.data.data_ptr(), self.data.shape[1], index.data_ptr(),
                                   index.numel(), self.shape[1], out.data_ptr())
        if self.group_bias is not None:
            out += self.group_bias[index].repeat_interleave(self.shape[1] // self.group_bias.shape[1], dim=1)
        return out

    def dequantize(self) -> torch.Tensor:
        """The whole weight as float32 [rows, cols]."""
        return self.rows(torch.arange(self.shape[0]))

    def matmul_into(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """out[m, :] = x[m, :] @ W.T for float32 x [M, cols]; out may be a column slice of a wider buffer.

        Any M goes to the C kernels (native/matmul.c), prompts too: from a few rows their gemm decodes each
        weight row once and keeps pace with BLAS over the dequantized weight (which first writes the whole
        weight as float32, and whose OpenMP threads, on a machine others share, wait for one another)."""
        lib = native.library()
        if lib is None:
            out.copy_(x @ self.dequantize().t())
            return
        lib.dp_matmul(self.qtype, self.data.data_ptr(), self.data.shape[1], 0, self.shape[0], self.shape[1],
                      x.data_ptr(), x.shape[0], out.data_ptr(), out.stride(0))
        if self.group_bias is not None:  # sum_g bias[r, g] * (the sum of x over group g)
            out += x.view(x.shape[0], self.group_bias.shape[1], -1).sum(-1) @ self.group_bias.t()

    def _dequantize_numpy(self, blocks: torch.Tensor) -> torch.Tensor:
        if self.qtype == Q.F32:
            return blocks.contiguous().view(torch.float32).clone()
        values = gguf_dequantize(blocks.numpy(), self.qtype)
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))


def _same_groups(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and a.shape[1] == b.shape[1])


class Linear:
    """y = x @ W.T (+ b) over one or more weights whose outputs are concatenated (fused q|k|v, gate|up).

    Parts of the same quant type are joined into one weight at load, so a fused projection costs one
    kernel call; a mixed-type checkpoint (e.g. Q4_K_M's Q6_K value weights) keeps one call per type.
    """

    def __init__(self, parts: list[QuantTensor], bias: torch.Tensor | None = None):
        self.bias = bias  # float32 [out_features], or None
        self.parts: list[QuantTensor] = []
        for part in parts:
            last = self.parts[-1] if self.parts else None
            if last is not None and last.qtype == part.qtype and last.shape[1] == part.shape[1] and _same_groups(
                    last.group_bias, part.group_bias):
                bias = None if part.group_bias is None else torch.cat([last.group_bias, part.group_bias])
                self.parts[-1] = QuantTensor(torch.cat([last.data, part.data]), part.qtype,
                                             (last.shape[0] + part.shape[0], part.shape[1]), bias)
            else:
                self.parts.append(part)
        self.in_features = parts[0].shape[1]
        self.out_features = sum(p.shape[0] for p in self.parts)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in_features] float32 -> [..., out_features]
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features).contiguous()
        out = torch.empty(x.shape[0], self.out_features, dtype=torch.float32)
        start = 0
        for part in self.parts:
            part.matmul_into(x, out[:, start:start + part.shape[0]])
            start += part.shape[0]
        if self.bias is not None:
            out += self.bias
        return out.view(*lead, self.out_features)
