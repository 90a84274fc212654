from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SpanInfo(_message.Message):
    __slots__ = ("model_hash", "start", "stop")
    MODEL_HASH_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    model_hash: str
    start: int
    stop: int
    def __init__(self, model_hash: _Optional[str] = ..., start: _Optional[int] = ..., stop: _Optional[int] = ...) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("version", "node_id", "backend", "device", "memory_total", "memory_free", "matmul_bytes_per_ms", "ms_per_layer", "spans", "sessions", "kv_bytes", "lending", "lending_reason", "batch_sessions", "busy")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FREE_FIELD_NUMBER: _ClassVar[int]
    MATMUL_BYTES_PER_MS_FIELD_NUMBER: _ClassVar[int]
    MS_PER_LAYER_FIELD_NUMBER: _ClassVar[int]
    SPANS_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    LENDING_FIELD_NUMBER: _ClassVar[int]
    LENDING_REASON_FIELD_NUMBER: _ClassVar[int]
    BATCH_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    BUSY_FIELD_NUMBER: _ClassVar[int]
    version: str
    node_id: str
    backend: str
    device: str
    memory_total: int
    memory_free: int
    matmul_bytes_per_ms: float
    ms_per_layer: float
    spans: _containers.RepeatedCompositeFieldContainer[SpanInfo]
    sessions: int
    kv_bytes: int
    lending: str
    lending_reason: str
    batch_sessions: float
    busy: float
    def __init__(self, version: _Optional[str] = ..., node_id: _Optional[str] = ..., backend: _Optional[str] = ..., device: _Optional[str] = ..., memory_total: _Optional[int] = ..., memory_free: _Optional[int] = ..., matmul_bytes_per_ms: _Optional[float] = ..., ms_per_layer: _Optional[float] = ..., spans: _Optional[_Iterable[_Union[SpanInfo, _Mapping]]] = ..., sessions: _Optional[int] = ..., kv_bytes: _Optional[int] = ..., lending: _Optional[str] = ..., lending_reason: _Optional[str] = ..., batch_sessions: _Optional[float] = ..., busy: _Optional[float] = ...) -> None: ...

class TensorEntry(_message.Message):
    __slots__ = ("name", "sha256", "qtype", "shape", "nbytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    QTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    sha256: str
    qtype: int
    shape: _containers.RepeatedScalarFieldContainer[int]
    nbytes: int
    def __init__(self, name: _Optional[str] = ..., sha256: _Optional[str] = ..., qtype: _Optional[int] = ..., shape: _Optional[_Iterable[int]] = ..., nbytes: _Optional[int] = ...) -> None: ...

class SpanManifest(_message.Message):
    __slots__ = ("model_hash", "start", "stop", "metadata_json", "tensors")
    MODEL_HASH_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    model_hash: str
    start: int
    stop: int
    metadata_json: str
    tensors: _containers.RepeatedCompositeFieldContainer[TensorEntry]
    def __init__(self, model_hash: _Optional[str] = ..., start: _Optional[int] = ..., stop: _Optional[int] = ..., metadata_json: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[TensorEntry, _Mapping]]] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("sha256", "offset", "data")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    offset: int
    data: bytes
    def __init__(self, sha256: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class LoadSpanRequest(_message.Message):
    __slots__ = ("manifest", "chunk")
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    manifest: SpanManifest
    chunk: TensorChunk
    def __init__(self, manifest: _Optional[_Union[SpanManifest, _Mapping]] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ...) -> None: ...

class LoadSpanReply(_message.Message):
    __slots__ = ("missing", "ready", "received_bytes", "ms_per_layer", "held")
    MISSING_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MS_PER_LAYER_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    missing: _containers.RepeatedScalarFieldContainer[str]
    ready: bool
    received_bytes: int
    ms_per_layer: float
    held: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, missing: _Optional[_Iterable[str]] = ..., ready: _Optional[bool] = ..., received_bytes: _Optional[int] = ..., ms_per_layer: _Optional[float] = ..., held: _Optional[_Iterable[int]] = ...) -> None: ...

class Hidden(_message.Message):
    __slots__ = ("shape", "dtype", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class Stage(_message.Message):
    __slots__ = ("address", "start", "stop")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    address: str
    start: int
    stop: int
    def __init__(self, address: _Optional[str] = ..., start: _Optional[int] = ..., stop: _Optional[int] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("session_id", "step", "position", "context", "hidden", "model_hash", "route", "sink", "grant", "grant_signature", "batch", "group")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    MODEL_HASH_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    SINK_FIELD_NUMBER: _ClassVar[int]
    GRANT_FIELD_NUMBER: _ClassVar[int]
    GRANT_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step: int
    position: int
    context: int
    hidden: Hidden
    model_hash: str
    route: _containers.RepeatedCompositeFieldContainer[Stage]
    sink: str
    grant: bytes
    grant_signature: bytes
    batch: int
    group: int
    def __init__(self, session_id: _Optional[str] = ..., step: _Optional[int] = ..., position: _Optional[int] = ..., context: _Optional[int] = ..., hidden: _Optional[_Union[Hidden, _Mapping]] = ..., model_hash: _Optional[str] = ..., route: _Optional[_Iterable[_Union[Stage, _Mapping]]] = ..., sink: _Optional[str] = ..., grant: _Optional[bytes] = ..., grant_signature: _Optional[bytes] = ..., batch: _Optional[int] = ..., group: _Optional[int] = ...) -> None: ...

class SessionGrant(_message.Message):
    __slots__ = ("session_id", "model_hash", "context", "route", "expires")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_HASH_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    model_hash: str
    context: int
    route: _containers.RepeatedCompositeFieldContainer[Stage]
    expires: float
    def __init__(self, session_id: _Optional[str] = ..., model_hash: _Optional[str] = ..., context: _Optional[int] = ..., route: _Optional[_Iterable[_Union[Stage, _Mapping]]] = ..., expires: _Optional[float] = ...) -> None: ...

class Result(_message.Message):
    __slots__ = ("session_id", "step", "hidden", "error", "short_of_memory", "group")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SHORT_OF_MEMORY_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step: int
    hidden: Hidden
    error: str
    short_of_memory: bool
    group: int
    def __init__(self, session_id: _Optional[str] = ..., step: _Optional[int] = ..., hidden: _Optional[_Union[Hidden, _Mapping]] = ..., error: _Optional[str] = ..., short_of_memory: _Optional[bool] = ..., group: _Optional[int] = ...) -> None: ...

class Delivered(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EndSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class EndSessionReply(_message.Message):
    __slots__ = ("existed",)
    EXISTED_FIELD_NUMBER: _ClassVar[int]
    existed: bool
    def __init__(self, existed: _Optional[bool] = ...) -> None: ...

class RevokedList(_message.Message):
    __slots__ = ("fingerprints",)
    FINGERPRINTS_FIELD_NUMBER: _ClassVar[int]
    fingerprints: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, fingerprints: _Optional[_Iterable[str]] = ...) -> None: ...

class RevokedReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MemberAddress(_message.Message):
    __slots__ = ("address", "member_id")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MEMBER_ID_FIELD_NUMBER: _ClassVar[int]
    address: str
    member_id: int
    def __init__(self, address: _Optional[str] = ..., member_id: _Optional[int] = ...) -> None: ...

class MemberList(_message.Message):
    __slots__ = ("members", "sinks")
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    SINKS_FIELD_NUMBER: _ClassVar[int]
    members: _containers.RepeatedCompositeFieldContainer[MemberAddress]
    sinks: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, members: _Optional[_Iterable[_Union[MemberAddress, _Mapping]]] = ..., sinks: _Optional[_Iterable[str]] = ...) -> None: ...

class MembersReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
