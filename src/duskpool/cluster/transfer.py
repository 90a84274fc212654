"""Weight transfer, both ends of `Node.LoadSpan`.

    gateway: the span's manifest (every tensor's name, sha256, type, shape, size)  -->  node
    node:    the sha256 of the tensors its TensorStore lacks                         -->  gateway
    gateway: those tensors' bytes, in chunks, one tensor after another               -->  node
    node:    each tensor written to its store whole and checked against its hash; then "ready"

A tensor is named by its content, so a node that restarts, or serves a second model sharing tensors with
the first, is sent nothing it already holds.
"""

import itertools
import json
import queue
from collections.abc import Callable, Iterator

import grpc

from duskpool.cluster.proto import duskpool_pb2 as pb
from duskpool.cluster.proto import duskpool_pb2_grpc as pb_grpc
from duskpool.cluster.route import Span
from duskpool.models import tensors_for
from duskpool.weights.gguf import GGUFFile
from duskpool.weights.progress import Progress
from duskpool.weights.store import (
    DamagedTensor,
    StoredModel,
    TensorStore,
    config_metadata,
    model_hash,
    tensor_hashes,
)

CHUNK_BYTES = 4 * 2**20


# --- the gateway's end ------------------------------------------------------------------------------
class WeightSender:
    """A model file's spans as the gateway sends them: a manifest per span, and the tensors a node asks for."""

    def __init__(self, file: GGUFFile, spans: list[Span], progress: bool = True):
        hashes = tensor_hashes(file)  # sha256 of every tensor, remembered per file
        self.file, self.progress = file, progress
        self.model_hash = model_hash(file, hashes)
        metadata = json.dumps(config_metadata(file), default=str)
        self.manifests = {span: self._manifest(span, hashes, metadata) for span in spans}
        self.bytes_sent = 0  # over the gateway's life: a node whose cache is warm is sent nothing

    def _manifest(self, span: Span, hashes: dict[str, str], metadata: str) -> pb.SpanManifest:
        wanted = tensors_for(self.file, range(*span), embed=False, head=False)
        tensors = self.file.tensors
        entries = [pb.TensorEntry(name=n, sha256=hashes[n], qtype=int(tensors[n].qtype), shape=list(tensors[n].shape),
                                  nbytes=tensors[n].nbytes) for n in wanted]
        return pb.SpanManifest(model_hash=self.model_hash, start=span[0], stop=span[1], metadata_json=metadata,
                               tensors=entries)

    def send(self, stub: pb_grpc.NodeStub, address: str, span: Span) -> None:
        """Make the node at `address` serve `span`, streaming only the tensors its store lacks.
        Raises grpc.RpcError when it cannot (gone, out of memory, a tensor damaged on the way)."""
        manifest = self.manifests[span]
        names_by_hash = {e.sha256: e.name for e in manifest.tensors}
        missing: queue.SimpleQueue = queue.SimpleQueue()  # the node's first reply, for the request stream

        def requests() -> Iterator[pb.LoadSpanRequest]:
            yield pb.LoadSpanRequest(manifest=manifest)
            hashes = missing.get()
            total = sum(self.file.tensors[names_by_hash[h]].nbytes for h in hashes)
            bar = Progress(f"weights -> {address} layers [{span[0]}, {span[1]})", total, self.progress and total > 0)
            for sha in hashes:
                data = self.file.read_bytes(names_by_hash[sha])
                for offset in range(0, len(data), CHUNK_BYTES):
                    piece = data[offset:offset + CHUNK_BYTES]
                    yield pb.LoadSpanRequest(chunk=pb.TensorChunk(sha256=sha, offset=offset, data=piece))
                    self.bytes_sent += len(piece)
                    bar.advance(len(piece))
            bar.close()

        for reply in stub.LoadSpan(requests()):
            if not reply.ready:
                missing.put(list(reply.missing))


# --- the node's end ---------------------------------------------------------------------------------
def read_manifest(requests: Iterator[pb.LoadSpanRequest], context: grpc.ServicerContext) -> pb.SpanManifest:
    first = next(requests, None)
    if first is None or not first.HasField("manifest"):
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "LoadSpan must start with the span's manifest")
    return first.manifest


def lacking(manifest: pb.SpanManifest, store: TensorStore) -> dict[str, int]:
    """The tensors of `manifest` that `store` lacks, or holds damaged (each cached one is hashed): sha256 -> bytes."""
    return {t.sha256: t.nbytes for t in manifest.tensors if not store.verified(t.sha256, t.nbytes)}


def receive(requests: Iterator[pb.LoadSpanRequest], wanted: dict[str, int], store: TensorStore,
            context: grpc.ServicerContext, on_bytes: Callable[[int], None]) -> int:
    """Write the streamed tensors into `store`, each checked against its hash; the bytes received."""
    expected, received = dict(wanted), 0

    def counted(chunks: Iterator[pb.TensorChunk]) -> Iterator[bytes]:
        nonlocal received
        for chunk in chunks:
            received += len(chunk.data)
            on_bytes(len(chunk.data))
            yield chunk.data

    for sha, chunks in itertools.groupby((r.chunk for r in requests), key=lambda c: c.sha256):
        if sha not in expected:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unrequested tensor {sha[:12]}")
        try:
            store.add(sha, counted(chunks), expected.pop(sha))
        except DamagedTensor as e:
            context.abort(grpc.StatusCode.DATA_LOSS, str(e))
    if expected:
        context.abort(grpc.StatusCode.DATA_LOSS, f"{len(expected)} tensors never arrived")
    return received


def stored_model(store: TensorStore, manifest: pb.SpanManifest) -> StoredModel:
    """The span's tensors, as the node's store holds them, ready for `backends.load_span`."""
    return StoredModel(store, json.loads(manifest.metadata_json),
                       {t.name: StoredModel.info(t.name, t.qtype, list(t.shape), t.nbytes) for t in manifest.tensors},
                       {t.name: t.sha256 for t in manifest.tensors})
