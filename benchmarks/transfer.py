"""Weights on the wire: a span's tensors from the gateway's WeightSender to a node's store, over mutual TLS on
loopback, in MB/s, beside a raw TLS socket copy of as many bytes measured in the same run (the ceiling).

    .venv/bin/python benchmarks/transfer.py [--mb 512] [--runs 3] [--json]

The node is a child process serving LoadSpan with the node's own receive path (transfer.lacking, transfer.receive,
the TensorStore) but not the span's load, which is compute, not transfer; its store is emptied before each run.
The raw copy's receiver only reads into a buffer, where the node also hashes and writes every byte: the ratio's 1.0
is a ceiling no node reaches. Beside each MB/s, the CPU seconds per GB of each end, which a loaded machine's
sharing changes less than the rate. The model is a random Llama-shaped Q4_K GGUF written once into a temp dir.
"""

import argparse
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.conftest

from tests.conftest import Q, write_tiny_llama  # noqa: E402

from duskpool.cluster import transfer  # noqa: E402
from duskpool.cluster.proto import duskpool_pb2 as pb  # noqa: E402
from duskpool.cluster.proto import duskpool_pb2_grpc as pb_grpc  # noqa: E402
from duskpool.cluster.transport import open_channel, start_server  # noqa: E402
from duskpool.security import load_identity, local_pool  # noqa: E402
from duskpool.weights.gguf import GGUFFile  # noqa: E402
from duskpool.weights.store import TensorStore  # noqa: E402

LAYER_MB = 33  # one layer of the model below: dim 2048, ffn 8192, Q4_K


class ReceiveOnly(pb_grpc.NodeServicer):
    """A node's LoadSpan up to the stored tensors (no span load)."""

    def __init__(self, root: Path):
        self.root = root

    def LoadSpan(self, request_iterator, context):
        store = TensorStore(self.root)
        manifest = transfer.read_manifest(request_iterator, context)
        wanted = transfer.lacking(manifest, store)
        yield transfer.missing_reply(wanted)
        received = transfer.receive(request_iterator, wanted, store, context, lambda n: None)
        yield pb.LoadSpanReply(ready=True, received_bytes=received)


def tls_context(identity_dir: Path, server: bool) -> ssl.SSLContext:
    """A context for the raw copy with the pool's certificates, mutual as gRPC's are."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    context.load_cert_chain(identity_dir / "node.crt", identity_dir / "node.key")
    context.load_verify_locations(identity_dir / "ca.crt")
    context.verify_mode, context.check_hostname = ssl.CERT_REQUIRED, False
    return context


def serve_node(identity_dir: Path, store_dir: Path) -> None:
    """The child: a LoadSpan server and a raw TLS sink; prints both ports, serves until killed."""
    identity = load_identity(identity_dir)
    # kept in a variable: a server that is garbage-collected stops
    server, port = start_server(ReceiveOnly(store_dir), "127.0.0.1", 0, identity, lambda fp: False)
    listener = socket.create_server(("127.0.0.1", 0))
    print(port, listener.getsockname()[1], flush=True)
    server_context = tls_context(identity_dir, server=True)
    buffer = memoryview(bytearray(4 * 2**20))
    while True:  # one raw copy per connection: a length, that many bytes read into a buffer, a byte back
        conn, _ = listener.accept()
        with server_context.wrap_socket(conn, server_side=True) as tls:
            left = int.from_bytes(tls.recv(8), "little")
            while left > 0:
                left -= tls.recv_into(buffer, min(left, len(buffer)))
            tls.sendall(b"k")


def raw_tls_copy(port: int, identity_dir: Path, data: memoryview) -> None:
    """Send `data` over one TLS connection, until the receiver has read it all."""
    client_context = tls_context(identity_dir, server=False)
    with socket.create_connection(("127.0.0.1", port)) as conn, client_context.wrap_socket(conn) as tls:
        tls.sendall(len(data).to_bytes(8, "little"))
        tls.sendall(data)
        tls.recv(1)


class Clock:
    """Wall time and the CPU time of this process and the node's, over one measurement."""

    def __init__(self, node: psutil.Process):
        self.processes = [psutil.Process(), node]

    def __enter__(self) -> "Clock":
        self.cpu = [sum(p.cpu_times()[:2]) for p in self.processes]
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.started
        now = [sum(p.cpu_times()[:2]) for p in self.processes]
        self.sender_cpu, self.node_cpu = now[0] - self.cpu[0], now[1] - self.cpu[1]

    def report(self, nbytes: int) -> str:
        """MB/s, and CPU seconds per GB at each end."""
        return (f"{nbytes / self.seconds / 1e6:6.0f} MB/s (CPU s/GB: sender {self.sender_cpu / nbytes * 1e9:4.2f},"
                f" node {self.node_cpu / nbytes * 1e9:4.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=512, help="about this many MB of weights in the span")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--chunk-kib", type=int, default=transfer.CHUNK_BYTES // 1024, help="bytes per message")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line, last")
    parser.add_argument("--serve-node", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_node:
        serve_node(*args.serve_node)
        return
    with tempfile.TemporaryDirectory(prefix="duskpool-transfer-") as tmp:
        root = Path(tmp)
        layers = max(1, round(args.mb / LAYER_MB))
        model = write_tiny_llama(root / "model.gguf", Q.Q4_K, layers=layers, dim=2048, heads=16, kv_heads=4,
                                 ffn=8192, vocab=256)
        local = local_pool(1, root=root / "pool", address=None)
        node = subprocess.Popen([sys.executable, __file__, "--serve-node", str(local.node_dirs[0]), str(root / "node")],
                                stdout=subprocess.PIPE, text=True)
        try:
            grpc_port, raw_port = map(int, node.stdout.readline().split())
            sender = transfer.WeightSender(GGUFFile(model), [(0, layers)], progress=False,
                                           chunk_bytes=args.chunk_kib * 1024)
            stub = pb_grpc.NodeStub(open_channel(f"127.0.0.1:{grpc_port}", local.gateway))
            data = memoryview(model.read_bytes())
            total = sum(t.nbytes for t in sender.manifests[(0, layers)].tensors)
            print(f"{layers} layers, {total / 1e6:.0f} MB of weights, loopback, mutual TLS, chunks of "
                  f"{args.chunk_kib} KiB; {psutil.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
            runs = []
            for run in range(args.runs):
                shutil.rmtree(root / "node", ignore_errors=True)  # every run to an empty store
                with Clock(psutil.Process(node.pid)) as raw:
                    raw_tls_copy(raw_port, local.gateway_dir, data)
                before = sender.bytes_sent
                with Clock(psutil.Process(node.pid)) as load:
                    sender.send(stub, "node", (0, layers))
                assert sender.bytes_sent - before == total, "the node's store was not empty"
                print(f"run {run + 1}: LoadSpan {load.report(total)}   raw TLS socket {raw.report(len(data))}   "
                      f"ratio {total / load.seconds / (len(data) / raw.seconds):.2f}", flush=True)
                runs.append({"mb_s": total / load.seconds / 1e6, "raw_mb_s": len(data) / raw.seconds / 1e6,
                             "sender_cpu_s_per_gb": load.sender_cpu / total * 1e9,
                             "node_cpu_s_per_gb": load.node_cpu / total * 1e9})
            if args.json:
                print(json.dumps({"mb": total / 1e6, "chunk_kib": args.chunk_kib, "runs": runs}))
        finally:
            node.kill()
            node.wait()


if __name__ == "__main__":
    main()
