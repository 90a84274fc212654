"""Hidden states and route stages <-> protobuf: the one place they meet the wire. A hidden state's bytes are
the backend's own (`SpanModel.hidden_to_bytes`), the same for every backend, so one route can mix them."""

from duskpool.cluster.proto import duskpool_pb2 as pb
from duskpool.cluster.route import RouteStage
from duskpool.models import SpanModel

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def to_wire(model: SpanModel, hidden, dtype: str = "float32") -> pb.Hidden:
    # hidden: [tokens, dim]; bytes are little-endian (every platform duskpool runs on is)
    return pb.Hidden(shape=[hidden.shape[0], model.spec.dim], dtype=dtype, data=model.hidden_to_bytes(hidden, dtype))


def from_wire(model: SpanModel, message: pb.Hidden, max_tokens: int):
    """The hidden state [tokens, dim] in `message`, after checking it is what it claims to be."""
    dim = model.spec.dim
    if message.dtype not in DTYPE_BYTES:
        raise ValueError(f"hidden state dtype {message.dtype!r} is not one of {', '.join(DTYPE_BYTES)}")
    if len(message.shape) != 2 or message.shape[1] != dim or not 0 < message.shape[0] <= max_tokens:
        raise ValueError(f"hidden state shape {list(message.shape)} is not [1..{max_tokens}, {dim}]")
    expected = message.shape[0] * dim * DTYPE_BYTES[message.dtype]
    if len(message.data) != expected:
        raise ValueError(f"hidden state has {len(message.data)} bytes; its shape and dtype need {expected}")
    return model.hidden_from_bytes(message.data, message.shape[0], message.dtype)


def stages_to_wire(stages: tuple[RouteStage, ...]) -> list[pb.Stage]:
    return [pb.Stage(address=s.address, start=s.start, stop=s.stop) for s in stages]
