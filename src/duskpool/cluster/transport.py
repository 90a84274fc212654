"""gRPC between pool members: channels and servers (mutual TLS, keepalive, message size), and the Pushers that
keep one long-lived stream open to each peer a process sends to (and close it once unused).

Two kinds of stream carry a step: `Node.Forward` (ForwardRequests, to the next node of a route) and
`Sink.Deliver` (Results, to the gateway). Both are opened by a Pusher, whose `send` only queues.
"""

import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from duskpool.cluster.proto import duskpool_pb2 as pb
from duskpool.cluster.proto import duskpool_pb2_grpc as pb_grpc
from duskpool.security import (
    NODE_NAME,
    NodeIdentity,
    RevocationInterceptor,
    channel_credentials,
    name_options,
    renewing_server_credentials,
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


def open_channel(address: str, identity: NodeIdentity | None, options: list | None = None,
                 name: str = NODE_NAME) -> grpc.Channel:
    """A channel to a pool member: mutual TLS under the pool's CA, or plaintext when `identity` is None
    (--insecure, for debugging only). The server's certificate must carry DNS name `name`: NODE_NAME (any
    member), `member_name(id)` (that member alone) or GATEWAY_NAME."""
    options = GRPC_OPTIONS + (options or [])
    if identity is None:
        return grpc.insecure_channel(address, options=options)
    credentials = channel_credentials(identity.cert_pem, identity.key_pem, identity.ca_pem)
    return grpc.secure_channel(address, credentials, options=options + name_options(name))


def start_server(service: pb_grpc.NodeServicer | pb_grpc.SinkServicer, host: str, port: int,
                 identity: NodeIdentity | None, is_revoked: Callable[[str], bool],
                 add_services: Callable[[grpc.Server], None] | None = None) -> tuple[grpc.Server, int]:
    """A gRPC server for `service` (a node's, or the gateway's sink) plus the standard health service (the
    service's own `health`, if it has one) and whatever `add_services` adds; returns it and its bound port.

    With an identity, only members of its pool get in (mutual TLS), and not once revoked. A service with an
    `identity` of its own (a node, whose certificate renews) is served with that one as it changes."""
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
    if add_services is not None:
        add_services(server)
    if identity is None:
        bound = server.add_insecure_port(f"{host}:{port}")
    else:
        current = getattr(service, "identity", None) and (lambda: service.identity)
        credentials = renewing_server_credentials(current or (lambda: identity))
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
                 on_reply: Callable[[pb.Result], None], on_broken: Callable[["Pusher", Exception], None],
                 name: str = NODE_NAME):
        self.address = address
        self.channel = open_channel(address, identity, name=name)
        self.last_used = time.monotonic()
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.broken = False
        self.last_sent: pb.ForwardRequest | pb.Result | None = None
        self._error: grpc.RpcError | None = None
        self._lock = threading.Lock()  # a failure is reported once: by the reader, or by a send that comes after
        self.name = name
        self._stream = stream(self.channel)
        self._on_reply, self._on_broken = on_reply, on_broken
        threading.Thread(target=self._read, daemon=True, name=f"pusher-{address}").start()

    def send(self, message: pb.ForwardRequest | pb.Result) -> None:
        with self._lock:
            self.last_sent, self.last_used = message, time.monotonic()
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


class NotAMember(ValueError):
    """An address no pool member is known at: nothing is dialled there."""


class Pushers:
    """The Pusher to each address, replaced when its stream breaks and closed once unused for IDLE_S.

    `name_at(address)` is the name the peer's certificate must carry there (see open_channel), or None where no
    member is known: then nothing is dialled (NotAMember). `identity` may be replaced (a renewed certificate):
    new streams present the new one."""

    IDLE_S = 60.0

    def __init__(self, identity: NodeIdentity | None, stream: Stream, on_reply: Callable[[pb.Result], None] = ignore,
                 on_broken: Callable[[Pusher, Exception], None] = ignore,
                 name_at: Callable[[str], str | None] = lambda address: NODE_NAME):
        self.identity, self.stream, self.name_at = identity, stream, name_at
        self._by_address: dict[str, Pusher] = {}
        self._lock = threading.Lock()
        self._on_reply, self._on_broken = on_reply, on_broken
        self._swept = time.monotonic()

    def get(self, address: str) -> Pusher:
        name = self.name_at(address)
        if name is None:
            raise NotAMember(f"no pool member is known at {address[:60]}")
        with self._lock:
            self._sweep()
            pusher = self._by_address.get(address)
            if pusher is not None and pusher.name != name:  # another member there now: not the stream to it
                pusher.close()
                pusher = None
            if pusher is None or pusher.broken:
                pusher = self._by_address[address] = Pusher(address, self.identity, self.stream, self._on_reply,
                                                            self._on_broken, name)
            return pusher

    @property
    def addresses(self) -> list[str]:
        with self._lock:
            return list(self._by_address)

    def sweep(self) -> None:
        """Close the pushers unused for IDLE_S, and those to an address no member is known at any more."""
        with self._lock:
            self._swept = -1e9
            self._sweep()

    def _sweep(self) -> None:
        """`sweep`, under the lock, at most once a second."""
        now = time.monotonic()
        if now - self._swept < min(1.0, self.IDLE_S):
            return
        self._swept = now
        for address, pusher in list(self._by_address.items()):
            if now - pusher.last_used > self.IDLE_S or self.name_at(address) is None:
                pusher.close()
                del self._by_address[address]

    def close(self) -> None:
        with self._lock:
            for pusher in self._by_address.values():
                pusher.close()
            self._by_address.clear()
