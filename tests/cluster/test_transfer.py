"""Weight transfer: what a node is told about the model, and a transfer cut midway that resumes where it stopped."""

import fcntl
import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from duskpool.cluster.gateway import Gateway
from duskpool.cluster.node import NodeService
from duskpool.cluster.proto import duskpool_pb2 as pb
from duskpool.cluster.proto import duskpool_pb2_grpc as pb_grpc
from duskpool.cluster.transfer import WeightSender
from duskpool.cluster.transport import open_channel, start_server
from duskpool.engine.runner import LocalEngine
from duskpool.weights.gguf import GGUFFile
from duskpool.weights.store import PARTIAL_KEEP_S, TensorStore, config_metadata
from tests.api.conftest import write_tiny_chat_llama
from tests.conftest import greedy_tokens, wait_for

SPAN = (0, 1)  # what a gateway with no private prefix (and one private last layer) gives its one node
CHUNK = 4096  # small chunks, so that the tiny model's tensors take several each


def test_nodes_get_the_family_and_its_shape_but_no_names_and_no_tokenizer(bundled_model):
    file = GGUFFile(bundled_model)
    assert file.metadata.get("general.name") and "tokenizer.ggml.tokens" in file.metadata  # there to be withheld
    sent = json.loads(WeightSender(file, [(1, 10)], progress=False).manifests[(1, 10)].metadata_json)
    assert sent == json.loads(json.dumps(config_metadata(file), default=str))
    assert sent["general.architecture"] == "llama" and sent["llama.block_count"] == 30
    withheld = [k for k in sent if k.startswith(("tokenizer.", "general.")) and k != "general.architecture"]
    assert not withheld


def held_bytes(node: NodeService) -> int:
    """The bytes of tensors in the node's store, whole or in part."""
    return sum(p.stat().st_size for p in node.store.root.rglob("*") if p.is_file())


class BrokenLink:
    """A NodeStub whose channel closes once the node holds `held` bytes: a link lost in the middle of a tensor
    (sending stops after the chunk that makes them up, and the node has taken them off the stream)."""

    def __init__(self, node: NodeService, held: int):
        self.channel = open_channel(node.address, None)
        self.stub, self.node, self.held = pb_grpc.NodeStub(self.channel), node, held

    def LoadSpan(self, requests):
        def cut():
            sent = 0
            for request in requests:
                yield request
                sent += len(request.chunk.data)
                if sent == self.held:
                    assert wait_for(lambda: held_bytes(self.node) == self.held)
                    self.channel.close()
                    return
        return self.stub.LoadSpan(cut())


@pytest.fixture
def node(tmp_path):
    node = NodeService(tmp_path / "node")
    server, port = start_server(node, "127.0.0.1", 0, None, lambda fp: False)
    node.address = f"127.0.0.1:{port}"
    yield node
    server.stop(grace=0)
    node.close()


def unlocked(path: Path) -> bool:
    """Whether no transfer holds the partial tensor at `path` (the node's receive of the cut stream has ended)."""
    with open(path, "rb") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True


def cut_transfer(sender: WeightSender, node: NodeService) -> tuple[int, Path]:
    """Send SPAN to `node` over a link lost halfway through the first tensor of a few chunks; (the bytes the node
    holds then, the file of the tensor it holds in part)."""
    tensors, held = sender.manifests[SPAN].tensors, 0
    assert len({t.sha256 for t in tensors}) == len(tensors)  # each sent once, in this order
    for tensor in tensors:
        chunks = -(-tensor.nbytes // CHUNK)
        if chunks >= 4:
            held += chunks // 2 * CHUNK
            break
        held += tensor.nbytes
    with pytest.raises(grpc.RpcError):
        sender.send(BrokenLink(node, held), node.address, SPAN)
    parts = list(node.store.root.rglob("*.part"))
    assert len(parts) == 1, "the link was lost inside a tensor: that one is kept in part"
    assert wait_for(lambda: unlocked(parts[0]))
    assert held_bytes(node) == held
    return held, parts[0]


def test_a_transfer_cut_midway_sends_only_the_missing_bytes_the_second_time(tmp_path, node):
    model = write_tiny_chat_llama(tmp_path / "tiny.gguf")
    sender = WeightSender(GGUFFile(model), [SPAN], progress=False, chunk_bytes=CHUNK)
    total = sum(t.nbytes for t in sender.manifests[SPAN].tensors)
    held, part = cut_transfer(sender, node)
    assert 0 < part.stat().st_size and held < total

    sent_before = sender.bytes_sent
    sender.send(pb_grpc.NodeStub(open_channel(node.address, None)), node.address, SPAN)
    assert node.weight_bytes_received == total - held, "received again what the node held"
    assert sender.bytes_sent - sent_before == total - held, "sent again what the node held"
    assert not part.exists()

    gateway = Gateway.start(model, [node.address], identity=None, context_length=64, prefix=0, progress=False)
    try:
        assert [(s.start, s.stop) for s in gateway.route] == [SPAN]
        assert gateway.weight_bytes_sent == 0  # the span that loaded is the one the two transfers made
        assert greedy_tokens(gateway, [5, 6, 7, 8], 8) == greedy_tokens(LocalEngine.load(model), [5, 6, 7, 8], 8)
    finally:
        gateway.close()


def test_a_partial_tensor_damaged_on_disk_fails_its_hash_and_is_sent_whole_again(tmp_path, node):
    model = write_tiny_chat_llama(tmp_path / "tiny.gguf")
    sender = WeightSender(GGUFFile(model), [SPAN], progress=False, chunk_bytes=CHUNK)
    total = sum(t.nbytes for t in sender.manifests[SPAN].tensors)
    _, part = cut_transfer(sender, node)
    with open(part, "r+b") as f:  # a flipped bit in the bytes the resumed transfer will not send again
        f.seek(part.stat().st_size // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x10]))

    stub = pb_grpc.NodeStub(open_channel(node.address, None))
    with pytest.raises(grpc.RpcError) as failed:
        sender.send(stub, node.address, SPAN)
    assert failed.value.code() == grpc.StatusCode.DATA_LOSS and not part.exists()
    whole = held_bytes(node)  # the tensors before it
    sender.send(stub, node.address, SPAN)
    assert node.weight_bytes_received == total - whole  # the damaged tensor whole, and those after it
    nbytes = next(t.nbytes for t in sender.manifests[SPAN].tensors if t.sha256 == part.stem)
    assert node.store.verified(part.stem, nbytes)


def test_a_tensor_stored_by_another_transfer_while_this_one_waited_is_left_as_it_is(tmp_path):
    """Two spans share a tensor and load at once: the second transfer waits for the first's lock on the partial
    file, then finds the tensor stored; what it receives is dropped, not written over the stored copy."""
    store, data = TensorStore(tmp_path), os.urandom(5000)
    sha = hashlib.sha256(data).hexdigest()
    with ThreadPoolExecutor(1) as other:
        first = store.receive(sha, len(data), 0)
        second = other.submit(store.receive, sha, len(data), 0)
        assert not wait_for(second.done, timeout=0.5), "the second transfer should wait for the first"
        first.hash(data)
        first.write(0, data)
        first.finish()
        first.close()
        with second.result(timeout=10) as late:
            late.hash(bytes(len(data)))
            late.write(0, bytes(len(data)))
            late.finish()
    assert store.verified(sha, len(data)) and not store.partial_path(sha).exists()


def test_a_partial_tensor_left_too_long_is_removed_and_the_tensor_sent_whole(tmp_path, node):
    """A transfer cut midway leaves a partial tensor; no transfer comes back for it within PARTIAL_KEEP_S. The node,
    started again on its cache, removes it (one a transfer holds stays, however old); the gateway then sends that
    tensor whole, and the pool answers as the model does alone. A partial younger than the bound stays."""
    model = write_tiny_chat_llama(tmp_path / "tiny.gguf")
    sender = WeightSender(GGUFFile(model), [SPAN], progress=False, chunk_bytes=CHUNK)
    _, part = cut_transfer(sender, node)
    assert not node.store.remove_stale_partials() and part.exists()  # young: kept

    stale = time.time() - PARTIAL_KEEP_S - 60
    os.utime(part, (stale, stale))
    with open(part, "rb") as held:  # a transfer still holds it: kept
        fcntl.flock(held, fcntl.LOCK_EX)
        assert not node.store.remove_stale_partials() and part.exists()
    restarted = NodeService(tmp_path / "node")
    server, port = start_server(restarted, "127.0.0.1", 0, None, lambda fp: False)
    gateway = None
    try:
        assert not part.exists() and not list(restarted.store.root.rglob("*.part"))
        whole = held_bytes(restarted)  # the tensors before the cut one
        gateway = Gateway.start(model, [f"127.0.0.1:{port}"], identity=None, context_length=64, prefix=0,
                                progress=False)
        total = sum(t.nbytes for t in sender.manifests[SPAN].tensors)
        assert gateway.weight_bytes_sent == total - whole  # the cut tensor whole, and those after it
        assert greedy_tokens(gateway, [5, 6, 7, 8], 8) == greedy_tokens(LocalEngine.load(model), [5, 6, 7, 8], 8)
    finally:
        if gateway is not None:
            gateway.close()
        server.stop(grace=0)
        restarted.close()


def test_a_tensor_sent_longer_than_its_manifest_says_is_refused_at_its_size(tmp_path, node):
    """The manifest says 1 000 bytes; 20 MB come, in 1 MiB chunks: the node refuses the span at the first chunk that
    overruns the tensor, and nothing past its 1 000 bytes is written (20 MB were before)."""
    data = os.urandom(1000)
    sha = hashlib.sha256(data).hexdigest()
    manifest = pb.SpanManifest(model_hash="m", start=0, stop=1, metadata_json="{}",
                               tensors=[pb.TensorEntry(name="blk.0.attn_q.weight", sha256=sha, qtype=0, shape=[250],
                                                       nbytes=len(data))])
    flood = data + os.urandom(20 * 10**6 - len(data))

    def requests():
        yield pb.LoadSpanRequest(manifest=manifest)
        for offset in range(0, len(flood), 2**20):
            yield pb.LoadSpanRequest(chunk=pb.TensorChunk(sha256=sha, offset=offset, data=flood[offset:offset + 2**20]))

    stub = pb_grpc.NodeStub(open_channel(node.address, None))
    with pytest.raises(grpc.RpcError) as refused:
        list(stub.LoadSpan(requests(), timeout=30))
    assert refused.value.code() == grpc.StatusCode.DATA_LOSS and "longer than its 1000 bytes" in refused.value.details()
    assert held_bytes(node) <= len(data) and not node.store.has(sha) and not node.spans
