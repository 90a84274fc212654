"""Hostile input on a node's Forward stream: ≥ 10 000 generated messages (hypothesis) against a real node
process over mutual TLS. Every message is answered (an error or a valid result), the node never crashes,
its RSS stays flat, and a well-formed session interleaved throughout still gets the right tokens. The messages
come over the gateway's own certificate, and the well-formed ones carry its grant for their session (a member's
first step of a session is refused before anything else: tests/security/test_attacks.py).

The model is a tiny random-weight one (a real GGUF file with a tokenizer and a chat template, 6 layers of width
64): every check on a message is the same as for the bundled model, and the quarter that are well formed cost
microseconds of compute instead of 28 layers of SmolLM2 on one thread (which made this test take minutes)."""

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from queue import Empty, SimpleQueue

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from duskpool.cluster import wire
from duskpool.cluster.gateway import Gateway
from duskpool.cluster.node import valid_route
from duskpool.cluster.proto import duskpool_pb2 as pb
from duskpool.cluster.proto import duskpool_pb2_grpc as pb_grpc
from duskpool.cluster.transport import open_channel, start_server
from duskpool.engine.runner import LocalEngine
from duskpool.security import local_pool, sign
from tests.api.conftest import write_tiny_chat_llama
from tests.conftest import RecordingSink

pytestmark = pytest.mark.slow

MESSAGES = 10_000


def rss_bytes(pid: int) -> int:
    return int(re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text()).group(1)) * 1024


def hidden_messages(span_dims: int) -> st.SearchStrategy[pb.Hidden]:
    # every strategy is built once, here: one built inside `build` would be built and validated anew at each draw
    # (3 ms a message, half the time of the whole fuzz)
    dtypes = st.sampled_from(["float32", "float16", "bfloat16", "float64", "int8", "", "float32\x00"])
    token_counts = st.sampled_from([0, 1, 1, 2, 5, 300, 2**31])
    shapes = st.one_of(st.just("tokens x span"), st.lists(st.integers(0, 2**32 - 1), max_size=4))
    sizes = st.one_of(st.just("exact"), st.integers(0, 4 * span_dims * 2), st.just("one short"))
    kinds = st.sampled_from(["random", "normal", "nan", "inf", "zeros"])
    patterns = st.binary(min_size=64, max_size=64)

    @st.composite
    def build(draw) -> pb.Hidden:
        dtype = draw(dtypes)
        tokens = draw(token_counts)
        shape = draw(shapes)
        shape = [tokens, span_dims] if shape == "tokens x span" else shape
        itemsize = {"float32": 4, "float16": 2, "bfloat16": 2}.get(dtype, 4)
        exact = shape[0] * shape[1] * itemsize if len(shape) == 2 and shape[0] * shape[1] < 10**6 else 0
        size = draw(sizes)
        size = {"exact": exact, "one short": max(exact - 1, 0)}.get(size, size)
        kind = draw(kinds)
        if kind == "random":  # 64 random bytes, repeated
            data = (draw(patterns) * (size // 64 + 1))[:size]
        else:
            values = {"normal": torch.randn(size // 4 + 1), "zeros": torch.zeros(size // 4 + 1),
                      "nan": torch.full((size // 4 + 1,), float("nan")),
                      "inf": torch.full((size // 4 + 1,), float("inf"))}[kind]
            data = values.numpy().tobytes()[:size]
        return pb.Hidden(shape=shape, dtype=dtype, data=data)

    return build()


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    with local_pool(2, root=tmp_path_factory.mktemp("pool"), address=None) as pool:
        yield pool


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_tiny_chat_llama(tmp_path_factory.mktemp("model") / "tiny-chat.gguf", layers=6)


@pytest.fixture(scope="module")
def node(pool, tmp_path_factory):
    """One node process, lending little memory: a flood of sessions must hit the limit, not the machine (its
    span of the tiny model is 0.6 MB, a session's KV cache at a context of 256 0.26 MB)."""
    process = subprocess.Popen([sys.executable, "-m", "duskpool.cli.main", "node", "--host", "127.0.0.1",
                                "--port", "0", "--no-announce", "--threads", "1", "--memory-limit", "4M",
                                "--lend", "always", "--cache-dir", str(tmp_path_factory.mktemp("cache")),
                                "--identity", str(pool.node_dirs[0]), "--exit-with", str(os.getpid())],
                               stdout=subprocess.PIPE, text=True)  # a test run cut short leaves no node behind
    address = re.search(r"listening on (\S+)", process.stdout.readline()).group(1)
    threading.Thread(target=process.stdout.read, daemon=True).start()
    yield process, address
    process.terminate()
    process.wait(10)


def test_ten_thousand_hostile_messages(node, pool, model):
    process, address = node
    gateway = Gateway.start(model, [address], identity=pool.gateway, context_length=256, sessions=1,
                            even_split=True, progress=False)
    hop, dim = gateway.route[0], gateway.prefix_model.spec.dim
    sink = RecordingSink()  # the gateway's end, stood in for: a second sink of the gateway's, told to the node
    sink_server, sink_port = start_server(sink, "127.0.0.1", 0, pool.gateway, lambda fp: False)
    sink_address = f"127.0.0.1:{sink_port}"
    # the members a route may name: the node, and two where nobody listens (a next node it cannot reach)
    members = {address: pool.nodes[0].member_id, "127.0.0.1:1": 0, "[::1]:1": 0}
    sinks = {gateway.sink_address, sink_address}
    gateway.members.clients[0].stub.SetMembers(pb.MemberList(
        sinks=sorted(sinks), members=[pb.MemberAddress(address=a, member_id=m) for a, m in members.items()]))

    # the well-formed session: greedy tokens through the node, fed one step per 100 hostile messages
    local = LocalEngine.load(model)
    prompt = local.tokenizer.encode(local.tokenizer.render_chat([{"role": "user", "content": "Name a fruit."}]))
    expected, session_local = [], local.open_session(len(prompt) + 120)
    logits = session_local.forward(prompt, 0)
    for _ in range(100):
        expected.append(int(torch.argmax(logits)))
        logits = session_local.forward(expected[-1:], len(prompt) + len(expected) - 1)
    good = gateway.open_session(len(prompt) + 120)
    got = [int(torch.argmax(good.forward(prompt, 0)))]

    outbox: SimpleQueue = SimpleQueue()
    channel = open_channel(address, pool.gateway)
    replies = pb_grpc.NodeStub(channel).Forward(iter(outbox.get, None))
    counts = {"sent": 0, "error": 0, "result": 0}
    text = st.characters(blacklist_categories=("Cs",))  # protobuf strings are UTF-8: no lone surrogates
    session_ids = st.one_of(st.sampled_from(["s1", "s2", "s3"]), st.text(text, max_size=80))
    no_colon = st.text(st.characters(blacklist_characters=":", blacklist_categories=("Cs",)), max_size=30)

    def reply_for(step: int, to_sink: bool, request=None) -> pb.Result:
        if not to_sink:
            reply = next(replies)
            assert reply.step == step
            return reply
        try:
            delivered = sink.delivered.get(timeout=30)
        except Empty:
            raise AssertionError(f"no answer at the sink for message {step}: {request}"[:2000]) from None
        assert delivered.step == step
        return delivered

    @settings(max_examples=MESSAGES, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(session_id=session_ids, position=st.one_of(st.integers(0, 3), st.integers(0, 2**32 - 1)),
           context=st.one_of(st.sampled_from([64, 256]), st.integers(0, 2**32 - 1)),
           hidden=hidden_messages(dim),
           model_hash=st.one_of(st.just(gateway.model_hash), st.text(text, max_size=70)),
           start=st.one_of(st.just(hop.start), st.integers(0, 2**32 - 1)),
           stop=st.one_of(st.just(hop.stop), st.integers(0, 2**32 - 1)),
           next_node=st.sampled_from([False, False, True]), sink=st.sampled_from(["ours", "ours", "ours", "bad"]),
           well_formed=st.integers(0, 3), tokens=st.integers(1, 8),
           # a next node that is garbage, or a port nobody listens on (no name lookups: CI has no DNS)
           bad_address=st.one_of(no_colon,
                                 st.sampled_from(["127.0.0.1:1", "[::1]:1", "127.0.0.1:0", "127.0.0.1:99999"])),
           # a sink that is not HOST:PORT (one that is, but where nobody listens, would take the answer away)
           bad_sink=st.one_of(no_colon, st.sampled_from(["127.0.0.1:0", "127.0.0.1:99999", ":1", "127.0.0.1:"])))
    def fuzz(session_id, position, context, hidden, model_hash, start, stop, next_node, sink, bad_address, bad_sink,
             well_formed, tokens):
        step = counts["sent"]
        if well_formed == 0:  # a quarter are valid, so that the compute path runs under fire too
            session_id, context, model_hash, start, stop = "s1", 256, gateway.model_hash, hop.start, hop.stop
            position, hidden = 0, wire.to_wire(gateway.prefix_model, torch.randn(tokens, dim), "float16")
        route = [pb.Stage(address=address, start=start, stop=stop)]
        if next_node:
            route.append(pb.Stage(address=bad_address))
        request = pb.ForwardRequest(session_id=session_id, step=step, position=position, context=context,
                                    hidden=hidden, model_hash=model_hash, route=route,
                                    sink=sink_address if sink == "ours" else bad_sink)
        if well_formed == 0:
            request.grant = pb.SessionGrant(session_id="s1", model_hash=gateway.model_hash, context=256, route=route,
                                            expires=time.time() + 300).SerializeToString()
            request.grant_signature = sign(pool.gateway, request.grant)
        outbox.put(request)
        counts["sent"] += 1
        # a route it cannot trust, or one naming a non-member or a sink of no gateway, is answered to us here
        to_sink = valid_route(request) and request.sink in sinks and all(s.address in members for s in route[1:])
        answer = reply_for(step, to_sink, request)
        if answer.error:
            counts["error"] += 1
            assert f"node {gateway.members.clients[0].info.node_id}" in answer.error
        else:
            counts["result"] += 1
            out = wire.from_wire(gateway.suffix_model, answer.hidden, context)  # a finite [T, dim] state
            assert out.shape[0] == hidden.shape[0]
        if step % 100 == 99 and len(got) < len(expected):  # the well-formed session goes on meanwhile
            got.append(int(torch.argmax(good.forward(got[-1:], len(prompt) + len(got) - 1))))
        if step == 500:
            counts["rss_after_warmup"] = rss_bytes(process.pid)

    started = time.monotonic()
    try:
        while counts["sent"] < MESSAGES:
            fuzz()
        elapsed = time.monotonic() - started
        assert process.poll() is None, "the node died"
        while len(got) < len(expected):
            got.append(int(torch.argmax(good.forward(got[-1:], len(prompt) + len(got) - 1))))
        assert got == expected  # the good session never noticed the flood
        for sid in ["s1", "s2", "s3"]:
            gateway.end_session(sid)
        growth = rss_bytes(process.pid) - counts["rss_after_warmup"]
        print(f"{counts['sent']} messages in {elapsed:.0f} s: {counts['error']} errors, {counts['result']} results; "
              f"node RSS growth after warm-up {growth / 2**20:.1f} MiB")
        assert growth < 50 * 2**20
        assert counts["error"] > 0 and counts["result"] > 0  # both paths were exercised
    finally:
        outbox.put(None)
        good.close()
        channel.close()
        sink_server.stop(grace=0)
        gateway.close()
