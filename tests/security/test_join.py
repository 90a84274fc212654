"""Joining over real sockets: the token admits once, the node pins the CA from the token, refusals say why."""

import json
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from duskpool.security import (
    CAMismatch,
    JoinError,
    JoinRefused,
    NodeIdentity,
    PoolState,
    join,
    load_identity,
    save_identity,
    split_join_arg,
    start_join_server,
)
from tests.security.test_tls import call, start_echo

TIMEOUT = 3.0


@pytest.fixture
def pool(tmp_path: Path) -> PoolState:
    return PoolState(tmp_path / "pool").init()


@pytest.fixture
def gateway(pool: PoolState) -> Iterator[str]:
    server, port = start_join_server(pool, "127.0.0.1", 0)
    yield f"127.0.0.1:{port}"
    server.stop(0)


def test_a_node_joins_and_then_talks_mtls_with_members(pool: PoolState, gateway: str, tmp_path: Path) -> None:
    identity = join(pool.issue_token().text, gateway, "laptop", "127.0.0.1:7070", timeout=TIMEOUT)
    save_identity(identity, tmp_path / "node")
    assert (tmp_path / "node" / "node.key").stat().st_mode & 0o777 == 0o600
    identity = load_identity(tmp_path / "node")
    assert identity.ca_pem == pool.ca_pem
    assert [(m.id, m.name, m.address) for m in pool.members() if m.role == "node"] == [
        (identity.member_id, "laptop", "127.0.0.1:7070")]
    server, address = start_echo(pool.issue_identity("peer"), pool.is_revoked)
    try:
        assert call(address, identity) == b"hi from " + identity.fingerprint.encode()
    finally:
        server.stop(0)


def test_a_reused_token_is_refused_and_the_gateway_logs_why(pool: PoolState, gateway: str,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    token = pool.issue_token().text
    join(token, gateway, "first", timeout=TIMEOUT)
    with caplog.at_level(logging.WARNING, logger="duskpool.security"), \
            pytest.raises(JoinRefused, match="already used .* single-use, make a new one with `duskpool token`"):
        join(token, gateway, "second", timeout=TIMEOUT)
    assert "join refused for 'second'" in caplog.text and "already used" in caplog.text


def test_an_expired_token_is_refused(pool: PoolState, gateway: str, caplog: pytest.LogCaptureFixture) -> None:
    token = pool.issue_token(ttl_s=0.01).text
    time.sleep(0.05)
    with caplog.at_level(logging.WARNING, logger="duskpool.security"), \
            pytest.raises(JoinRefused, match="join token expired at .* make a new one"):
        join(token, gateway, "late", timeout=TIMEOUT)
    assert "expired" in caplog.text


def test_an_unknown_token_is_refused(pool: PoolState, gateway: str) -> None:
    forged = f"dp1.{'A' * 43}.{pool.ca_fingerprint}"
    with pytest.raises(JoinRefused, match="unknown join token"):
        join(forged, gateway, "forger", timeout=TIMEOUT)


def test_a_gateway_of_another_pool_is_not_trusted(pool: PoolState, tmp_path: Path) -> None:
    other = PoolState(tmp_path / "other").init()
    server, port = start_join_server(other, "127.0.0.1", 0)
    try:
        with pytest.raises(CAMismatch, match="not the pool this token is for"):
            join(pool.issue_token().text, f"127.0.0.1:{port}", "node", timeout=TIMEOUT)
    finally:
        server.stop(0)
    assert [m.role for m in other.members()] == ["gateway"]  # it never saw a CSR


def test_a_man_in_the_middle_showing_our_ca_without_its_key_gets_nothing(pool: PoolState, gateway: str,
                                                                         tmp_path: Path) -> None:
    # the impostor's chain ends in our real (public) CA certificate, but its own leaf is signed by another CA
    other = PoolState(tmp_path / "other").init()
    fake = other.issue_gateway_identity()
    impostor = NodeIdentity(fake.cert_pem, fake.key_pem, pool.ca_pem, 0)
    server, port = start_join_server(other, "127.0.0.1", 0, identity=impostor)
    token = pool.issue_token().text
    try:
        with pytest.raises(JoinError, match="does not hold a gateway certificate from the token's pool"):
            join(token, f"127.0.0.1:{port}", "node", timeout=TIMEOUT)
    finally:
        server.stop(0)
    assert [m.role for m in other.members()] == ["gateway"]  # the token never reached it ...
    assert join(token, gateway, "node", timeout=TIMEOUT).member_id  # ... so it still works at the real gateway


def test_a_member_certificate_cannot_pose_as_the_join_server(pool: PoolState, gateway: str) -> None:
    """A node's certificate lacks the gateway name, so a member cannot collect other nodes' tokens."""
    node = pool.issue_identity("node-a")
    server, port = start_join_server(pool, "127.0.0.1", 0, identity=node)
    try:
        with pytest.raises(JoinError, match="does not hold a gateway certificate"):
            join(pool.issue_token().text, f"127.0.0.1:{port}", "victim", timeout=TIMEOUT)
    finally:
        server.stop(0)


def test_malformed_join_requests_get_invalid_argument(pool: PoolState, gateway: str) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=pool.ca_pem)
    options = [("grpc.ssl_target_name_override", "duskpool-gateway")]
    with grpc.secure_channel(gateway, credentials, options=options) as channel:
        raw = channel.unary_unary("/duskpool.v1.Join/Join")
        for body, message in [(b"{not json", "must be JSON"), (b'{"token": 1}', "must be JSON"),
                              (json.dumps({"token": pool.issue_token().secret, "csr": "x", "name": "n"}).encode(),
                               "not a PEM CSR")]:
            with pytest.raises(grpc.RpcError) as e:
                raw(body, timeout=TIMEOUT)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in e.value.details()


def test_an_unreachable_gateway_is_a_join_error(pool: PoolState) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        with pytest.raises(JoinError, match="could not reach the join server"):
            join(pool.issue_token().text, f"127.0.0.1:{port}", "node", timeout=TIMEOUT)


def test_join_argument_splits_at_the_last_at_sign() -> None:
    assert split_join_arg("dp1.s.f@10.0.0.2:7000") == ("dp1.s.f", "10.0.0.2:7000")
    with pytest.raises(ValueError, match="TOKEN@host:port"):
        split_join_arg("dp1.s.f")
