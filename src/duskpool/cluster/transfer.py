"""Weight transfer, both ends of `Node.LoadSpan`.

    gateway: the span's manifest (every tensor's name, sha256, type, shape, size)  -->  node
    node:    the sha256 of the tensors its TensorStore lacks, and of each the bytes  -->  gateway
             it holds already (a transfer cut short left them)
    gateway: the rest of those tensors' bytes, in chunks, one tensor after another  -->  node
    node:    each tensor written to its store whole and checked against its hash; then "ready"

A tensor is named by its content, so a node that restarts, or serves a second model sharing tensors with
the first, is sent nothing it already holds; a link that breaks midway costs only the chunks in flight.
"""

import json
import os
import queue
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple

import grpc

from duskpool.cluster.proto import duskpool_pb2 as pb
from duskpool.cluster.proto import duskpool_pb2_grpc as pb_grpc
from duskpool.cluster.route import Span
from duskpool.models import tensors_for
from duskpool.weights.gguf import GGUFFile
from duskpool.weights.progress import Progress
from duskpool.weights.store import (
    DamagedTensor,
    PartialTensor,
    StoredModel,
    TensorStore,
    config_metadata,
    model_hash,
    tensor_hashes,
)

# 256 KiB a message. Bigger is slower: each copy of a chunk lands in freshly mapped memory (glibc maps blocks
# that big anew: a page fault per 4 KiB) and no longer in cache. Measured with benchmarks/transfer.py on the
# 16-CPU GPU machine: 256 KiB 0.64-0.67 GB/s, 1 MiB 0.58-0.63, 4 MiB 0.39-0.45, 16 MiB a third of 1 MiB here.
CHUNK_BYTES = 256 * 2**10


class Missing(NamedTuple):
    """A tensor a node lacks: its size, and the bytes of it the node holds from a transfer cut short."""
    nbytes: int
    held: int = 0


# --- the gateway's end ------------------------------------------------------------------------------
class WeightSender:
    """A model file's spans as the gateway sends them: a manifest per span, and the tensors a node asks for."""

    def __init__(self, file: GGUFFile, spans: list[Span], progress: bool = True, chunk_bytes: int = CHUNK_BYTES):
        hashes = tensor_hashes(file)  # sha256 of every tensor, remembered per file
        self.file, self.progress, self.chunk_bytes = file, progress, chunk_bytes
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

    def _pieces(self, name: str, start: int) -> Iterator[tuple[int, bytes]]:
        """(offset, bytes) of tensor `name` from byte `start` on, in chunks; from a GGUF file each read on its
        own (no copy of the whole tensor, nor of each slice of it)."""
        info = self.file.tensors[name]
        if not isinstance(self.file, GGUFFile):
            data = self.file.read_bytes(name)
            yield from ((o, data[o:o + self.chunk_bytes]) for o in range(start, info.nbytes, self.chunk_bytes))
            return
        with open(self.file.path, "rb") as f:
            for offset in range(start, info.nbytes, self.chunk_bytes):
                piece = os.pread(f.fileno(), min(self.chunk_bytes, info.nbytes - offset), info.offset + offset)
                if not piece:
                    raise OSError(f"{self.file.path} ends inside tensor {name}")
                yield offset, piece

    def send(self, stub: pb_grpc.NodeStub, address: str, span: Span) -> None:
        """Make the node at `address` serve `span`, streaming only the tensors its store lacks (of one it holds
        in part, the rest). Raises grpc.RpcError when it cannot (gone, out of memory, a tensor damaged on the way)."""
        manifest = self.manifests[span]
        names_by_hash = {e.sha256: e.name for e in manifest.tensors}
        missing: queue.SimpleQueue = queue.SimpleQueue()  # the node's first reply, for the request stream

        def requests() -> Iterator[pb.LoadSpanRequest]:
            yield pb.LoadSpanRequest(manifest=manifest)
            wanted = missing.get()
            total = sum(self.file.tensors[names_by_hash[sha]].nbytes - held for sha, held in wanted)
            bar = Progress(f"weights -> {address} layers [{span[0]}, {span[1]})", total, self.progress and total > 0)
            for sha, held in wanted:
                for offset, piece in self._pieces(names_by_hash[sha], held):
                    request = pb.LoadSpanRequest()  # fields set one by one: a TensorChunk passed whole is copied slowly
                    request.chunk.sha256, request.chunk.offset, request.chunk.data = sha, offset, piece
                    yield request
                    self.bytes_sent += len(piece)
                    bar.advance(len(piece))
            bar.close()

        for reply in stub.LoadSpan(requests()):
            if not reply.ready:
                held = list(reply.held)
                if len(held) != len(reply.missing):  # a node from before resuming says nothing: each tensor whole
                    held = [0] * len(reply.missing)
                missing.put(list(zip(reply.missing, held, strict=True)))


# --- the node's end ---------------------------------------------------------------------------------
def read_manifest(requests: Iterator[pb.LoadSpanRequest], context: grpc.ServicerContext) -> pb.SpanManifest:
    first = next(requests, None)
    if first is None or not first.HasField("manifest"):
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "LoadSpan must start with the span's manifest")
    return first.manifest


def lacking(manifest: pb.SpanManifest, store: TensorStore) -> dict[str, Missing]:
    """The tensors of `manifest` that `store` lacks, or holds damaged (each cached one is hashed), by sha256."""
    return {t.sha256: Missing(t.nbytes, store.partial_bytes(t.sha256, t.nbytes))
            for t in manifest.tensors if not store.verified(t.sha256, t.nbytes)}


def missing_reply(wanted: dict[str, Missing]) -> pb.LoadSpanReply:
    """The node's first reply: what to send."""
    return pb.LoadSpanReply(missing=list(wanted), held=[m.held for m in wanted.values()])


def receive(requests: Iterator[pb.LoadSpanRequest], wanted: dict[str, Missing], store: TensorStore,
            context: grpc.ServicerContext, on_bytes: Callable[[int], None]) -> int:
    """Write the streamed tensors into `store`, each checked against its hash; the bytes received.

    One thread hashes a chunk and another writes it while this one takes the next off the stream. A stream that
    ends early or breaks leaves the tensor it was in as a partial file, whose bytes the next transfer does not
    send again."""
    expected, received = dict(wanted), 0
    tensor: PartialTensor | None = None
    pending: list[Future] = []  # the last chunk's hash and write: at most one chunk waits, whatever the span

    def done() -> None:
        for future in pending:
            future.result()
        pending.clear()

    try:
        with ThreadPoolExecutor(1, "tensor-hash") as hasher, ThreadPoolExecutor(1, "tensor-write") as writer:
            for request in requests:
                chunk = request.chunk
                done()
                if tensor is None:
                    if chunk.sha256 not in expected:
                        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unrequested tensor {chunk.sha256[:12]}")
                    tensor = store.receive(chunk.sha256, *expected.pop(chunk.sha256))
                elif chunk.sha256 != tensor.sha256:
                    raise DamagedTensor(f"tensor {tensor.sha256[:12]} arrived short")
                data = chunk.data
                pending += [hasher.submit(tensor.hash, data), writer.submit(tensor.write, chunk.offset, data)]
                received += len(data)
                on_bytes(len(data))
                if chunk.offset + len(data) >= tensor.nbytes:  # its last bytes: checked and kept at once
                    done()
                    tensor.finish()
                    tensor.close()
                    tensor = None
    except DamagedTensor as e:
        context.abort(grpc.StatusCode.DATA_LOSS, str(e))
    finally:
        if tensor is not None:
            tensor.close()  # after the executors have finished its last chunk: the .part's length is what arrived
    if expected or tensor is not None:
        context.abort(grpc.StatusCode.DATA_LOSS, f"{len(expected) + (tensor is not None)} tensors never arrived whole")
    return received


def stored_model(store: TensorStore, manifest: pb.SpanManifest) -> StoredModel:
    """The span's tensors, as the node's store holds them, ready for `backends.load_span`."""
    return StoredModel(store, json.loads(manifest.metadata_json),
                       {t.name: StoredModel.info(t.name, t.qtype, list(t.shape), t.nbytes) for t in manifest.tensors},
                       {t.name: t.sha256 for t in manifest.tensors})
