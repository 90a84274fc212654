"""Hidden states <-> protobuf bytes: the one place tensors meet the wire."""

import torch

from duskpool.cluster.proto import duskpool_pb2 as pb

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def to_wire(hidden: torch.Tensor, dtype: str = "float32") -> pb.Hidden:
    # hidden: [tokens, dim]; bytes are little-endian (every platform duskpool runs on is)
    data = hidden.to(DTYPES[dtype]).contiguous().view(torch.uint8).numpy().tobytes()
    return pb.Hidden(shape=list(hidden.shape), dtype=dtype, data=data)


def from_wire(message: pb.Hidden, dim: int, max_tokens: int) -> torch.Tensor:
    """The float32 [tokens, dim] tensor in `message`, after checking it is what it claims to be."""
    if message.dtype not in DTYPES:
        raise ValueError(f"hidden state dtype {message.dtype!r} is not one of {', '.join(DTYPES)}")
    if len(message.shape) != 2 or message.shape[1] != dim or not 0 < message.shape[0] <= max_tokens:
        raise ValueError(f"hidden state shape {list(message.shape)} is not [1..{max_tokens}, {dim}]")
    dtype = DTYPES[message.dtype]
    expected = message.shape[0] * dim * dtype.itemsize
    data = message.data
    if len(data) != expected:
        raise ValueError(f"hidden state has {len(data)} bytes; its shape and dtype need {expected}")
    hidden = torch.frombuffer(bytearray(data), dtype=dtype).view(message.shape[0], dim)
    if dtype != torch.float32:
        hidden = hidden.float()
    if not hidden.isfinite().all():
        raise ValueError("hidden state contains NaN or Inf")
    return hidden
