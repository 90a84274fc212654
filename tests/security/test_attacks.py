"""Attacks on a real local pool over mutual TLS, by a member holding an ordinary certificate of the pool
(made here, as `duskpool join` would give one): each is refused, and the pool's answers stay what they were."""

import dataclasses
import hashlib
import socket
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from queue import Empty, SimpleQueue

import grpc
import psutil
import pytest
import torch

from duskpool.cluster import membership, wire
from duskpool.cluster.gateway import Gateway, RemoteSession, RouteError
from duskpool.cluster.membership import REJOIN_POLL_S
from duskpool.cluster.node import NodeService
from duskpool.cluster.planner import layer_memory
from duskpool.cluster.proto import duskpool_pb2 as pb
from duskpool.cluster.proto import duskpool_pb2_grpc as pb_grpc
from duskpool.cluster.transport import open_channel, start_server
from duskpool.engine.runner import LocalEngine
from duskpool.security import (
    JoinError,
    JoinRefused,
    NodeIdentity,
    expiry_warning,
    fingerprint,
    load_identity,
    local_pool,
    member_id_of,
    renew,
    server_certificate,
    sign,
)
from tests.api.conftest import write_tiny_chat_llama
from tests.conftest import RecordingSink, greedy_tokens, wait_for

pytestmark = pytest.mark.slow

PROMPT = "Name a fruit."
STEPS = 6


class Pool:
    """Two in-process nodes serving over mTLS, a gateway over them, and an attacker's member certificate."""

    def __init__(self, root: Path, model: Path):
        self.root = root
        self.local = local_pool(2, root=root / "pool", address=None)
        self.attacker: NodeIdentity = self.local.pool.issue_identity("mallory")
        self.nodes = [NodeService(root / f"node-{i}", identity=identity)
                      for i, identity in enumerate(self.local.nodes)]
        self.servers = [start_server(node, "127.0.0.1", 0, node.identity, lambda fp, n=node: fp in n.revoked)
                        for node in self.nodes]
        self.addresses = [f"127.0.0.1:{port}" for _, port in self.servers]
        self.gateway = Gateway.start(model, self.addresses, identity=self.local.gateway, pool=self.local.pool,
                                     context_length=128, even_split=True, progress=False)
        self.prompt = self.gateway.tokenizer.encode(
            self.gateway.tokenizer.render_chat([{"role": "user", "content": PROMPT}]))
        self.answer = self.greedy()

    def greedy(self, attack: Callable[[RemoteSession], None] | None = None) -> list[int]:
        """STEPS greedy tokens of PROMPT; `attack(session)` runs after the second step, mid-generation."""
        session = self.gateway.open_session(len(self.prompt) + STEPS)
        try:
            tokens, position, step_input = [], 0, self.prompt
            for i in range(STEPS):
                logits = session.forward(step_input, position)
                position += len(step_input)
                tokens.append(int(torch.argmax(logits)))
                step_input = tokens[-1:]
                if i == 1 and attack is not None:
                    attack(session)
            return tokens
        finally:
            session.close()

    def node_at(self, address: str) -> NodeService:
        return self.nodes[self.addresses.index(address)]

    def stub(self, address: str, identity: NodeIdentity) -> pb_grpc.NodeStub:
        return pb_grpc.NodeStub(open_channel(address, identity))

    def close(self) -> None:
        self.gateway.close()
        for (server, _), node in zip(self.servers, self.nodes, strict=True):
            server.stop(grace=0)
            node.close()
        self.local.close()


@pytest.fixture(scope="module")
def pool(tmp_path_factory, bundled_model) -> Iterator[Pool]:
    pool = Pool(tmp_path_factory.mktemp("attacks"), bundled_model)
    yield pool
    pool.close()


def denied(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code()


# --- authority: only the gateway commands a node ------------------------------------------------------
def test_a_member_cannot_load_a_span(pool):
    """The real manifest with one tensor zeroed, sent by a member: refused before anything is read."""
    address = pool.addresses[0]
    span = pool.gateway.route[0].span
    manifest = pb.SpanManifest()
    manifest.CopyFrom(pool.gateway.weights.manifests[span])
    entry = manifest.tensors[0]
    zeros = bytes(entry.nbytes)
    entry.sha256 = hashlib.sha256(zeros).hexdigest()

    def requests():
        yield pb.LoadSpanRequest(manifest=manifest)
        yield pb.LoadSpanRequest(chunk=pb.TensorChunk(sha256=entry.sha256, offset=0, data=zeros))

    stub = pool.stub(address, pool.attacker)
    assert denied(lambda: list(stub.LoadSpan(requests(), timeout=30))) == grpc.StatusCode.PERMISSION_DENIED
    assert pool.greedy() == pool.answer


def test_a_loaded_span_is_never_replaced_in_place(pool):
    """Even the gateway's certificate cannot swap the tensors of a span a node serves; the same manifest is
    answered at once (nothing to send), a different one refused."""
    address = pool.addresses[0]
    span = pool.gateway.route[0].span
    real = pool.gateway.weights.manifests[span]
    stub = pool.stub(address, pool.local.gateway)
    replies = list(stub.LoadSpan(iter([pb.LoadSpanRequest(manifest=real)]), timeout=30))
    assert [list(r.missing) for r in replies if not r.ready] == [[]] and replies[-1].ready

    changed = pb.SpanManifest()
    changed.CopyFrom(real)
    changed.tensors[0].sha256 = hashlib.sha256(b"other").hexdigest()
    code = denied(lambda: list(stub.LoadSpan(iter([pb.LoadSpanRequest(manifest=changed)]), timeout=30)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert pool.greedy() == pool.answer


def test_a_member_cannot_end_another_session(pool):
    def end(session: RemoteSession) -> None:
        for address in pool.addresses:
            stub = pool.stub(address, pool.attacker)
            code = denied(lambda s=stub: s.EndSession(pb.EndSessionRequest(session_id=session.id), timeout=5))
            assert code == grpc.StatusCode.PERMISSION_DENIED
        assert all(session.id in node.sessions for node in pool.nodes)

    assert pool.greedy(end) == pool.answer
    assert not pool.gateway.recoveries  # the session was never cut off


def test_a_member_cannot_write_into_or_read_from_another_session(pool):
    """Knowing a live session's id, a member sends its own hidden state at position 0 (to overwrite the KV
    cache), with its own sink (to read the output) or with the gateway's: each node refuses, and the session's
    answer is unchanged. Its own sink is no gateway's: the node answers the attacker and dials nothing."""
    sink = RecordingSink()  # the attacker's own sink
    sink_server, port = start_server(sink, "127.0.0.1", 0, pool.attacker, lambda fp: False)

    def overwrite(session: RemoteSession) -> None:
        for stage in session.route:
            for to in (f"127.0.0.1:{port}", pool.gateway.sink_address):
                hidden = wire.to_wire(pool.gateway.prefix_model, torch.randn(len(pool.prompt), pool.gateway.spec.dim))
                request = pb.ForwardRequest(session_id=session.id, step=99, position=0, context=session.capacity,
                                            hidden=hidden, model_hash=pool.gateway.model_hash,
                                            route=wire.stages_to_wire((stage,)), sink=to)
                replies = list(pool.stub(stage.address, pool.attacker).Forward(iter([request]), timeout=10))
                if to != pool.gateway.sink_address:
                    assert [r.error for r in replies] == [f"node {pool.node_at(stage.address).node_id}: the sink {to} "
                                                          "is not a gateway of the pool"]
        # the refusals that went to the gateway's sink: "another sender", for a step it does not wait for
        assert wait_for(lambda: all(session.id in n.sessions for n in pool.nodes))

    try:
        assert pool.greedy(overwrite) == pool.answer
        with pytest.raises(Empty):
            sink.delivered.get(timeout=0.2)
    finally:
        sink_server.stop(grace=0)
    assert not pool.gateway.recoveries


def first_step(pool: Pool, sender: NodeIdentity, place: int, session_id: str, grant: bytes = b"",
               signature: bytes = b"", context: int = 128) -> pb.Result:
    """`sender` sends the node at stage `place` of the gateway's route the first step (position 0) of `session_id`,
    going on along the route to the gateway's sink; what the sink gets for it (the node's refusal, or its output)."""
    route = tuple(pool.gateway.route)[place:]
    hidden = wire.to_wire(pool.gateway.prefix_model, torch.zeros(1, pool.gateway.spec.dim))
    request = pb.ForwardRequest(session_id=session_id, step=1, position=0, context=context, hidden=hidden,
                                model_hash=pool.gateway.model_hash, route=wire.stages_to_wire(route),
                                sink=pool.gateway.sink_address, grant=grant, grant_signature=signature)
    future = pool.gateway.sink.expect(session_id, 1, route)
    try:
        assert list(pool.stub(route[0].address, sender).Forward(iter([request]), timeout=10)) == []
        try:
            return future.result(timeout=30)
        except RouteError as e:
            return pb.Result(error=str(e))
    finally:
        pool.gateway.sink.forget(session_id, 1)


def test_only_the_gateway_opens_a_session(pool):
    """A member sends each node the first step of a session of its own (a fresh id, position 0): with no grant, with
    one it signed itself, with the gateway's grant for another session, context or route, with an expired one, and
    with the gateway's real grant but not from the hop before the stage (the gateway for the first, the first node
    for the second).
    Each is refused before any memory is taken. The gateway's grant opens its session once: sent again after the
    session ended, it is refused. The gateway's own sessions open as before and answer the same."""
    gateway, route = pool.gateway, tuple(pool.gateway.route)
    kv_before = [node._kv_bytes() for node in pool.nodes]

    def grant(session_id: str, stages=route, context: int = 128) -> tuple[bytes, bytes]:
        data = gateway.grant(session_id, context, stages)
        return data, sign(pool.local.gateway, data)

    forged = gateway.grant("m2", 128, route)
    expired = pb.SessionGrant(session_id="m8", model_hash=gateway.model_hash, context=128,
                              route=wire.stages_to_wire(route), expires=time.time() - 1).SerializeToString()
    attempts = [  # (stage, session id, grant, signature): what the node says
        (0, "m1", b"", b"", "no grant: only the gateway opens sessions"),
        (0, "m2", forged, sign(pool.attacker, forged), "not signed by the pool's gateway"),
        (0, "m3", *grant("another"), "for another session, model or context"),
        (0, "m4", *grant("m4", context=64), "for another session, model or context"),
        (1, "m5", *grant("m5", route[:1]), "names another route, or another node at this stage"),
        (0, "m6", *grant("m6"), "opens at this stage only from the gateway"),
        (1, "m7", *grant("m7"), "opens at this stage only from the node of the stage before it"),
        (0, "m8", expired, sign(pool.local.gateway, expired), "expired"),
    ]
    for place, session_id, data, signature, refusal in attempts:
        result = first_step(pool, pool.attacker, place, session_id, data, signature)
        assert refusal in result.error, (refusal, result)
        assert all(session_id not in node.sessions for node in pool.nodes)
    assert [node._kv_bytes() for node in pool.nodes] == kv_before

    once = grant("once")
    assert first_step(pool, pool.local.gateway, 0, "once", *once).HasField("hidden")
    gateway.end_session("once")
    again = first_step(pool, pool.local.gateway, 0, "once", *once)
    assert "was opened here before: a grant opens it once" in again.error
    assert pool.greedy() == pool.answer


def test_the_sink_takes_a_hidden_state_only_from_the_steps_last_node(pool):
    """A member not on the route, and a node of the route that is not its last, deliver a forged hidden state
    for a step in flight: the step does not take it; the last node's own delivery it takes."""
    gateway = pool.gateway
    route = tuple(gateway.route)
    forged = pb.Result(session_id="in-flight", step=1,
                       hidden=wire.to_wire(gateway.prefix_model, torch.zeros(1, gateway.spec.dim)))
    future = gateway.sink.expect("in-flight", 1, route)
    try:
        for identity in (pool.attacker, pool.local.nodes[0]):
            with open_channel(gateway.sink_address, identity) as channel:
                pb_grpc.SinkStub(channel).Deliver(iter([forged]), timeout=5)
        assert not future.done() and gateway.sink.refused >= 2
        with open_channel(gateway.sink_address, pool.local.nodes[1]) as channel:  # the route's last node
            pb_grpc.SinkStub(channel).Deliver(iter([forged]), timeout=5)
        assert future.result(timeout=5).hidden.data == forged.hidden.data
    finally:
        gateway.sink.forget("in-flight", 1)
    assert pool.greedy() == pool.answer


# --- routes name members only; a node dials nothing else, and closes what it no longer uses ------------------
def test_a_route_may_name_only_members_and_unused_pushers_close(pool):
    """A member sends node 0 a step whose route goes on to an address no member holds (a port on this machine, or
    a host of the LAN to probe): refused on the attacker's own stream, and nothing is dialled there. A node's
    streams to its next hops close once unused; the next step opens them again and answers the same."""
    node = pool.nodes[0]
    stage = pool.gateway.route[0]
    hidden = wire.to_wire(pool.gateway.prefix_model, torch.zeros(1, pool.gateway.spec.dim))
    for address in ("127.0.0.1:9", "192.0.2.7:7070"):
        request = pb.ForwardRequest(session_id="probe", step=1, position=0, context=8, hidden=hidden,
                                    model_hash=pool.gateway.model_hash,
                                    route=wire.stages_to_wire((stage, dataclasses.replace(stage, address=address))),
                                    sink=pool.gateway.sink_address)
        [reply] = list(pool.stub(stage.address, pool.attacker).Forward(iter([request]), timeout=10))
        assert f"the route names {address}, where no pool member is known" in reply.error, reply
        assert address not in node._next_nodes.addresses
    assert "probe" not in node.sessions
    assert pool.greedy() == pool.answer
    assert pool.addresses[1] in node._next_nodes.addresses
    node._next_nodes.IDLE_S = 0.2
    try:
        time.sleep(0.3)
        node._next_nodes.sweep()
        assert node._next_nodes.addresses == []
        assert pool.greedy() == pool.answer
    finally:
        del node._next_nodes.IDLE_S


# --- revocation: a revoked member is out at once, and stays out -------------------------------------
def test_a_revoked_members_open_stream_is_cut_and_a_restarted_node_remembers(pool, tmp_path):
    """A member opens a Forward stream before it is revoked; the next message after the gateway's push is
    refused on that same stream. The node kept the list: started again from its directory, it refuses too."""
    node = pool.nodes[0]
    outbox: SimpleQueue = SimpleQueue()
    replies = pool.stub(pool.addresses[0], pool.attacker).Forward(iter(outbox.get, None), timeout=30)
    outbox.put(pb.ForwardRequest(session_id="x"))  # no route: answered on the stream, to its sender
    assert "route" in next(replies).error
    pool.local.pool.revoke(pool.attacker.member_id)
    try:
        assert wait_for(lambda: pool.attacker.fingerprint in node.revoked, timeout=5)
        outbox.put(pb.ForwardRequest(session_id="x"))
        with pytest.raises(grpc.RpcError) as e:
            next(replies)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        outbox.put(None)
    restarted = NodeService(pool.root / "node-0")
    try:
        assert pool.attacker.fingerprint in restarted.revoked
    finally:
        restarted.close()
    assert pool.greedy() == pool.answer


def test_a_revoked_node_leaves_the_route_at_once_and_its_session_moves(pool):
    """Runs last: it takes a node out of the module's pool. Revoked mid-generation, the node leaves the route
    and the holders within the gateway's poll; the session moves to the other node and answers the same."""
    revoked = pool.addresses[1]

    def revoke(session: RemoteSession) -> None:
        assert any(s.address == revoked for s in session.route)
        pool.local.pool.revoke(pool.local.nodes[1].member_id)
        assert wait_for(lambda: all(s.address != revoked for s in pool.gateway.route), timeout=5)
        assert all(revoked not in holders for holders in pool.gateway.holders.values())

    assert pool.greedy(revoke) == pool.answer
    assert pool.gateway.recoveries and revoked not in {s.address for s in pool.gateway.recoveries[-1].route}
    with pytest.raises(RouteError):
        pool.gateway.add_node(revoked)  # it cannot come back by rejoining


# --- the disk: a node's cache is checked, not trusted ---------------------------------------------------
def test_a_tensor_damaged_on_a_nodes_disk_is_fetched_again(tmp_path):
    """A byte flipped in a node's cached tensor: the restarted node's LoadSpan hashes its cache, asks for that
    tensor again, and answers as before (only its existence was checked: the damage loaded silently)."""
    model = write_tiny_chat_llama(tmp_path / "tiny.gguf")
    with local_pool(1, root=tmp_path / "pool", address=None) as local:
        def run() -> tuple[list[int], int]:
            node = NodeService(tmp_path / "node", identity=local.nodes[0])
            server, port = start_server(node, "127.0.0.1", 0, local.nodes[0], lambda fp: False)
            gateway = Gateway.start(model, [f"127.0.0.1:{port}"], identity=local.gateway, context_length=64, prefix=0,
                                    progress=False)
            try:
                return greedy_tokens(gateway, [5, 6, 7, 8], 8), gateway.weight_bytes_sent
            finally:
                gateway.close()
                server.stop(grace=0)
                node.close()

        answer, sent = run()
        assert sent > 0
        tensors = sorted((tmp_path / "node" / "tensors").rglob("*"), key=lambda p: p.stat().st_size)
        damaged = tensors[-1]
        data = bytearray(damaged.read_bytes())
        data[len(data) // 2] ^= 0x40
        damaged.write_bytes(bytes(data))
        again, resent = run()
        assert resent == len(data) and again == answer



# --- identity: a certificate names its member; the gateway pins the member at each address --------------------
def start_node(root: Path, identity: NodeIdentity, port: int = 0, cls: type[NodeService] = NodeService,
               **kwargs) -> tuple[NodeService, grpc.Server, str]:
    node = cls(root, identity=identity, **kwargs)
    server, bound = start_server(node, "127.0.0.1", port, identity, lambda fp: fp in node.revoked)
    return node, server, f"127.0.0.1:{bound}"


def test_another_member_at_a_nodes_address_is_refused(tmp_path, bundled_model):
    """Node 1 stops and another member (with an ordinary certificate of the pool) takes its address: the gateway's
    channels there check node 1's member name, so no handshake with it completes; asked to take the address back,
    the gateway refuses it. The session moves to node 0 and answers the same; the impostor saw nothing."""
    local = local_pool(2, root=tmp_path / "pool", address=None)
    mallory = local.pool.issue_identity("mallory")
    nodes = [start_node(tmp_path / f"node-{i}", identity) for i, identity in enumerate(local.nodes)]
    gateway = Gateway.start(bundled_model, [a for _, _, a in nodes], identity=local.gateway, pool=local.pool,
                            context_length=128, even_split=True, progress=False)
    impostor = None
    try:
        answer = greedy_tokens(gateway, [5, 6, 7, 8], STEPS)
        _, server, address = nodes[1]
        assert gateway.members.member_at(address) == local.nodes[1].member_id
        server.stop(grace=0)
        impostor = start_node(tmp_path / "impostor", mallory, port=int(address.rsplit(":", 1)[1]))
        assert wait_for(lambda: address in gateway.members.gone, timeout=10)
        assert greedy_tokens(gateway, [5, 6, 7, 8], STEPS) == answer
        with pytest.raises(RouteError, match=f"member {mallory.member_id}, not that of member "
                                             f"{local.nodes[1].member_id}"):
            gateway.add_node(address)
        time.sleep(REJOIN_POLL_S + 1)  # the gateway's own rejoin poll does not take it either
        assert address in gateway.members.gone
        assert not impostor[0].spans and not impostor[0].sessions
    finally:
        gateway.close()
        for node, server, _ in nodes + ([impostor] if impostor else []):
            server.stop(grace=0)
            node.close()
        local.close()


class SlowNode(NodeService):
    """A node that claims its machine's real speed and then takes 0.3 s over every step."""

    def _pass_on(self, request: pb.ForwardRequest, hidden: pb.Hidden, group: int) -> None:
        time.sleep(0.3)
        super()._pass_on(request, hidden, group)


def test_a_node_slower_than_it_claims_is_planned_around(tmp_path, bundled_model):
    """The gateway times a step through each node: the one far slower than its claimed speed counts at its measured
    speed, its span is loaded on the other node and the route leaves it; the answers are the pool's."""
    with local_pool(2, root=tmp_path / "pool", address=None) as local:
        nodes = [start_node(tmp_path / "node-0", local.nodes[0]),
                 start_node(tmp_path / "node-1", local.nodes[1], cls=SlowNode)]
        slow = nodes[1][2]
        gateway = Gateway.start(bundled_model, [a for _, _, a in nodes], identity=local.gateway, pool=local.pool,
                                context_length=128, even_split=True, progress=False)
        try:
            assert set(gateway.members.slow) == {slow}
            assert all(s.address != slow for s in gateway.route), gateway.route
            assert nodes[0][0].spans.keys() >= {(gateway.model_hash, s.start, s.stop) for s in gateway.route}
            started = time.monotonic()
            tokens = greedy_tokens(gateway, [5, 6, 7, 8], STEPS)
            assert time.monotonic() - started < STEPS * 0.3  # no step waited on the slow node
        finally:
            gateway.close()
            for node, server, _ in nodes:
                server.stop(grace=0)
                node.close()
    with local_pool(1, root=tmp_path / "pool-1", address=None) as local:  # the same model on one honest node
        node, server, address = start_node(tmp_path / "honest", local.nodes[0])
        gateway = Gateway.start(bundled_model, [address], identity=local.gateway, context_length=128,
                                even_split=True, progress=False)
        try:
            assert greedy_tokens(gateway, [5, 6, 7, 8], STEPS) == tokens
        finally:
            gateway.close()
            server.stop(grace=0)
            node.close()


class ShortNode(NodeService):
    """A node that claims a terabyte to lend. `refuses`: it has no memory for a span; else, once `owner_took` is set,
    none for a KV cache (as if its owner's programs had taken what it lends)."""

    refuses = False
    owner_took = False

    def Info(self, request: pb.InfoRequest, context) -> pb.NodeInfo:
        info = super().Info(request, context)
        info.memory_free = info.memory_total = 2**40
        return info

    def free_bytes(self) -> int:
        return 0 if self.refuses or self.owner_took else super().free_bytes()


def test_a_node_short_of_the_memory_it_claims_is_planned_around(tmp_path):
    """A node's own limit is checked against the machine at start. A node that claims a terabyte but refuses its span
    for memory: the gateway starts anyway, the span on the other node. One that loads its span but then refuses a
    session's KV cache: the session moves to the other node (which gets a copy of the span) and answers the same.
    Either way the node counts from then on as lending only what its spans take."""
    with pytest.raises(ValueError, match="more than this machine has"):
        NodeService(tmp_path / "greedy", memory_limit=2 * psutil.virtual_memory().total)
    model = write_tiny_chat_llama(tmp_path / "tiny.gguf", layers=6)
    answer = greedy_tokens(LocalEngine.load(model), [5, 6, 7, 8], STEPS)
    with local_pool(2, root=tmp_path / "pool", address=None) as local:
        for refuses in (True, False):
            nodes = [start_node(tmp_path / f"{refuses}-0", local.nodes[0]),
                     start_node(tmp_path / f"{refuses}-1", local.nodes[1], cls=ShortNode)]
            short, short_node = nodes[1][2], nodes[1][0]
            short_node.refuses = refuses
            gateway = Gateway.start(model, [a for _, _, a in nodes], identity=local.gateway, pool=local.pool,
                                    context_length=64, even_split=True, progress=False)
            try:
                assert bool(short_node.spans) is not refuses
                short_node.owner_took = True
                assert greedy_tokens(gateway, [5, 6, 7, 8], STEPS) == answer
                assert set(gateway.members.short) == {short}
                assert gateway.members.short[short] == sum(b - a for a, b in gateway.members.spans
                                                           if short in gateway.holders[(a, b)]) * layer_memory(
                    gateway.members.model, gateway.members.config)
                assert all(s.address != short for s in gateway.route), gateway.route
                assert bool(gateway.recoveries) is not refuses  # the session that met the KV refusal moved
                assert not short_node.sessions
            finally:
                gateway.close()
                for node, server, _ in nodes:
                    server.stop(grace=0)
                    node.close()


def test_an_aging_certificate_renews_itself_and_an_unreachable_node_is_skipped(tmp_path, bundled_model, capsys,
                                                                               monkeypatch):
    """A node whose certificate has a sixth of its life left warns at start and, once a gateway that keeps the pool
    names its sink, renews over mutual TLS: same member, a full lifetime, saved, and served to the next handshake
    without a restart. The old certificate cannot renew again, and a revoked member's every certificate is
    refused. The gateway also named an address where nothing answers (an mDNS announcement of a machine gone to
    sleep): skipped with a warning, not fatal."""
    monkeypatch.setattr(membership, "CONNECT_TIMEOUT_S", 1.0)
    with local_pool(0, root=tmp_path / "pool", address=None) as local:
        aging = local.pool.issue_identity("aging", valid_from=datetime.now(UTC) - timedelta(days=25))
        assert "expires at" in expiry_warning(aging.certificate)
        node, server, address = start_node(tmp_path / "node", aging, identity_dir=tmp_path / "identity")
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))
            nowhere = f"127.0.0.1:{closed.getsockname()[1]}"
        gateway = Gateway.start(bundled_model, [nowhere, address], identity=local.gateway, pool=local.pool,
                                context_length=128, progress=False)
        try:
            assert f"skipping a node: cannot reach node {nowhere}" in capsys.readouterr().err
            assert [s.address for s in gateway.route] == [address]
            answer = greedy_tokens(gateway, [5, 6, 7, 8], STEPS)
            assert wait_for(lambda: node.identity is not aging, timeout=10)
            renewed = node.identity
            assert member_id_of(renewed.certificate) == aging.member_id == renewed.member_id
            assert renewed.certificate.not_valid_after_utc - datetime.now(UTC) > timedelta(days=29)
            assert load_identity(tmp_path / "identity") == renewed
            assert fingerprint(server_certificate(address, local.gateway)) == renewed.fingerprint
            assert greedy_tokens(gateway, [5, 6, 7, 8], STEPS) == answer
            with pytest.raises(JoinRefused, match="not a member's current one"):
                renew(gateway.sink_address, aging)  # the old certificate, presented again
            local.pool.revoke(aging.member_id)
            assert {aging.fingerprint, renewed.fingerprint} <= local.pool.revoked_fingerprints()
            with pytest.raises((JoinRefused, JoinError)):
                renew(gateway.sink_address, renewed)
        finally:
            gateway.close()
            server.stop(grace=0)
            node.close()
