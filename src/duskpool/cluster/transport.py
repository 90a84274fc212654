"""gRPC between pool members: channels and servers (mutual TLS, keepalive, message size), and the Pushers that
keep one long-lived stream open to each peer a process sends to.

Two kinds of stream carry a step: `Node.Forward` (ForwardRequests, to the next node of a route) and
`Sink.Deliver` (Results, to the gateway). Both are opened by a Pusher, whose `send` only queues.
"""

import queue
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from duskpool.cluster.proto import duskpool_pb2 as pb
from duskpool.cluster.proto import duskpool_pb2_grpc as pb_grpc
from duskpool.security import (
    NODE_CHANNEL_OPTIONS,
    NodeIdentity,
    RevocationInterceptor,
    channel_credentials,
    server_credentials,
)

MAX_MESSAGE_BYTES = 64 * 2**20  # a chunk of weights or a long prompt's hidden states
# Keepalive: every link is pinged each second, even idle, and dropped when a ping goes unanswered for a second,
# so a peer cut off the network (or frozen) is noticed in about 2 s; a dead process closes its sockets at once.
# (gRPC core enforces the answer's deadline through ping_timeout_ms, not keepalive_timeout_ms: grpc/grpc#39239)
KEEPALIVE_OPTIONS = [("grpc.keepalive_time_ms", 1000), ("grpc.keepalive_timeout_ms", 1000),
                     ("grpc.http2.ping_timeout_ms", 1000), ("grpc.keepalive_permit_without_calls", 1),
                     ("grpc.http2.max_pings_without_data", 0)]
GRPC_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)] + KEEPALIVE_OPTIONS
# servers must accept pings that often (by default they allow one per 5 minutes without data, then hang up)
# so_reuseport off: by default a second server binds a port that a first one holds, and steals half its calls
SERVER_OPTIONS = GRPC_OPTIONS + [("grpc.so_reuseport", 0), ("grpc.http2.min_ping_interval_without_data_ms", 500),
                                 ("grpc.http2.max_ping_strikes", 0)]

# what start_server registers, by the servicer's base class
_ADD_SERVICER = {pb_grpc.NodeServicer: pb_grpc.add_NodeServicer_to_server,
                 pb_grpc.SinkServicer: pb_grpc.add_SinkServicer_to_server}


def open_channel(address: str, identity: NodeIdentity | None, options: list | None = None) -> grpc.Channel:
    """A channel to a pool member: mutual TLS under the pool's CA, or plaintext when `identity` is None
    (--insecure, for debugging only)."""
    options = GRPC_OPTIONS + (options or [])
    if identity is None:
        return grpc.insecure_channel(address, options=options)
    credentials = channel_credentials(identity.cert_pem, identity.key_pem, identity.ca_pem)
    return grpc.secure_channel(address, credentials, options=options + NODE_CHANNEL_OPTIONS)


def start_server(service: pb_grpc.NodeServicer | pb_grpc.SinkServicer, host: str, port: int,
                 identity: NodeIdentity | None, is_revoked: Callable[[str], bool]) -> tuple[grpc.Server, int]:
    """A gRPC server for `service` (a node's, or the gateway's sink) plus the standard health service (the
    service's own `health`, if it has one); returns it and its bound port.

    With an identity, only members of its pool get in (mutual TLS), and not once revoked."""
    interceptors = [RevocationInterceptor(is_revoked)] if identity is not None else []
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32), options=SERVER_OPTIONS,
                         interceptors=interceptors)
    for servicer, add in _ADD_SERVICER.items():
        if isinstance(service, servicer):
            add(service, server)
    health_service = getattr(service, "health", None)
    if health_service is None:
        health_service = health.HealthServicer()
        health_service.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_service, server)
    if identity is None:
        bound = server.add_insecure_port(f"{host}:{port}")
    else:
        credentials = server_credentials(identity.cert_pem, identity.key_pem, identity.ca_pem)
        bound = server.add_secure_port(f"{host}:{port}", credentials)
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    server.start()
    return server, bound


def local_address_towards(address: str) -> str:
    """This machine's IP on the interface that reaches `address` (where nodes can reach us back)."""
    host = address.rsplit(":", 1)[0].strip("[]")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, 9))  # UDP connect sends nothing; it only picks the route
        return s.getsockname()[0]


# How a Pusher opens its stream on a channel: a function that takes the outgoing messages and returns the replies.
Stream = Callable[[grpc.Channel], Callable[[Iterator], Iterator]]


def forward_stream(channel: grpc.Channel) -> Callable[[Iterator[pb.ForwardRequest]], Iterator[pb.Result]]:
    """Node.Forward: ForwardRequests to a node, which answers only those whose route or sink it cannot trust."""
    return pb_grpc.NodeStub(channel).Forward


def deliver_stream(channel: grpc.Channel) -> Callable[[Iterator[pb.Result]], Iterator]:
    """Sink.Deliver: Results to the gateway, which answers nothing; the call returns when the stream ends."""
    deliver = pb_grpc.SinkStub(channel).Deliver

    def stream(results: Iterator[pb.Result]) -> Iterator:
        deliver(results)
        return iter(())
    return stream


def ignore(*args) -> None:
    pass


class Pusher:
    """One long-lived stream to a peer. `send` only queues, so compute never waits on the network."""

    def __init__(self, address: str, identity: NodeIdentity | None, stream: Stream,
                 on_reply: Callable[[pb.Result], None], on_broken: Callable[["Pusher", Exception], None]):
        self.address = address
        self.channel = open_channel(address, identity)
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.broken = False
        self.last_sent: pb.ForwardRequest | pb.Result | None = None
        self._error: grpc.RpcError | None = None
        self._lock = threading.Lock()  # a failure is reported once: by the reader, or by a send that comes after
        self._stream = stream(self.channel)
        self._on_reply, self._on_broken = on_reply, on_broken
        threading.Thread(target=self._read, daemon=True, name=f"pusher-{address}").start()

    def send(self, message: pb.ForwardRequest | pb.Result) -> None:
        with self._lock:
            self.last_sent = message
            if not self.broken:
                self.outbox.put(message)
                return
        self._on_broken(self, self._error)  # the stream died before this message could go

    def _read(self) -> None:
        try:
            for reply in self._stream(iter(self.outbox.get, None)):
                self._on_reply(reply)
        except grpc.RpcError as e:
            with self._lock:
                self.broken, self._error, last = True, e, self.last_sent
            if e.code() != grpc.StatusCode.CANCELLED and last is not None:
                self._on_broken(self, e)

    def close(self) -> None:
        self.outbox.put(None)
        self.channel.close()


class Pushers:
    """The Pusher to each address, replaced when its stream breaks."""

    def __init__(self, identity: NodeIdentity | None, stream: Stream, on_reply: Callable[[pb.Result], None] = ignore,
                 on_broken: Callable[[Pusher, Exception], None] = ignore):
        self.identity, self.stream = identity, stream
        self._by_address: dict[str, Pusher] = {}
        self._lock = threading.Lock()
        self._on_reply, self._on_broken = on_reply, on_broken

    def get(self, address: str) -> Pusher:
        with self._lock:
            pusher = self._by_address.get(address)
            if pusher is None or pusher.broken:
                pusher = self._by_address[address] = Pusher(address, self.identity, self.stream, self._on_reply,
                                                            self._on_broken)
            return pusher

    def close(self) -> None:
        with self._lock:
            for pusher in self._by_address.values():
                pusher.close()
            self._by_address.clear()
