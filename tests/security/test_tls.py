"""Mutual TLS between members over real sockets: who gets in and who is refused, with a tiny echo service."""

import logging
from collections.abc import Callable, Iterator
from concurrent import futures
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from duskpool.security import (
    NODE_CHANNEL_OPTIONS,
    NODE_NAME,
    NodeIdentity,
    PoolState,
    RevocationInterceptor,
    channel_credentials,
    expected_name,
    local_pool,
    member_name,
    peer_fingerprint,
    server_credentials,
)

TIMEOUT = 3.0


def start_echo(identity: NodeIdentity, is_revoked: Callable[[str], bool] = lambda fp: False) -> tuple[grpc.Server, str]:
    """An mTLS server with /test.Echo/Echo (answers the caller's fingerprint) and /test.Echo/Stream (3 echoes)."""

    def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
        return request + b" from " + (peer_fingerprint(context) or "nobody").encode()

    def stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield from (request for _ in range(3))

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), interceptors=[RevocationInterceptor(is_revoked)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", {
        "Echo": grpc.unary_unary_rpc_method_handler(echo),
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
    }),))
    port = server.add_secure_port("127.0.0.1:0", server_credentials(identity.cert_pem, identity.key_pem,
                                                                      identity.ca_pem))
    server.start()
    return server, f"127.0.0.1:{port}"


def call(address: str, identity: NodeIdentity | None, method: str = "Echo") -> bytes:
    """One call as `identity` (None: plaintext); raises grpc.RpcError when refused."""
    if identity is None:
        channel = grpc.insecure_channel(address)
    else:
        credentials = channel_credentials(identity.cert_pem, identity.key_pem, identity.ca_pem)
        channel = grpc.secure_channel(address, credentials, options=NODE_CHANNEL_OPTIONS)
    with channel:
        if method == "Stream":
            return b"".join(channel.unary_stream("/test.Echo/Stream")(b"hi", timeout=TIMEOUT))
        return channel.unary_unary("/test.Echo/Echo")(b"hi", timeout=TIMEOUT)


def server_log(capfd: pytest.CaptureFixture) -> str:
    """What gRPC core wrote to stderr: TLS refusals happen in the handshake, before any Python code, and gRPC
    logs their reason there ("Handshake failed with error ...", INFO, shown at the default GRPC_VERBOSITY)."""
    return capfd.readouterr().err


@pytest.fixture
def pool(tmp_path: Path) -> PoolState:
    return PoolState(tmp_path / "pool").init()


@pytest.fixture
def server(pool: PoolState) -> Iterator[str]:
    srv, address = start_echo(pool.issue_identity("server", "127.0.0.1"), pool.is_revoked)
    yield address
    srv.stop(0)


def refused(address: str, identity: NodeIdentity | None, method: str = "Echo") -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        call(address, identity, method)
    return e.value


def test_a_channel_checks_the_members_own_name_once_its_id_is_known() -> None:
    assert expected_name(7) == member_name(7) == "7.member.duskpool"
    for unknown in (None, 0, "a-fingerprint"):  # no id yet, or a certificate from before member ids
        assert expected_name(unknown) == NODE_NAME


def test_member_connects_and_is_known_by_its_fingerprint(pool: PoolState, server: str) -> None:
    member = pool.issue_identity("node-a", "127.0.0.1")
    assert call(server, member) == b"hi from " + member.fingerprint.encode()
    assert call(server, member, "Stream") == b"hihihi"


def test_gateway_certificate_works_as_a_member(pool: PoolState, server: str) -> None:
    assert call(server, pool.gateway_identity()).startswith(b"hi from ")


def test_peer_from_another_ca_is_rejected(pool: PoolState, server: str, tmp_path: Path,
                                          capfd: pytest.CaptureFixture) -> None:
    # the stranger trusts our (public) CA certificate, so the refusal is the server's
    other = PoolState(tmp_path / "other").init().issue_identity("stranger")
    stranger = NodeIdentity(other.cert_pem, other.key_pem, pool.ca_pem, member_id=0)
    assert refused(server, stranger).code() == grpc.StatusCode.UNAVAILABLE
    assert "CERTIFICATE_VERIFY_FAILED" in server_log(capfd)


def test_server_from_another_ca_is_rejected_by_a_member(pool: PoolState, tmp_path: Path) -> None:
    srv, address = start_echo(PoolState(tmp_path / "other").init().issue_identity("impostor"))
    try:
        assert refused(address, pool.issue_identity("node-a")).code() == grpc.StatusCode.UNAVAILABLE
    finally:
        srv.stop(0)


def test_expired_client_certificate_is_rejected(pool: PoolState, server: str, capfd: pytest.CaptureFixture) -> None:
    expired = pool.issue_identity("old", valid_from=datetime.now(UTC) - timedelta(days=2), valid_days=1)
    assert refused(server, expired).code() == grpc.StatusCode.UNAVAILABLE
    assert "certificate has expired" in server_log(capfd)


def test_expired_server_certificate_is_rejected(pool: PoolState) -> None:
    srv, address = start_echo(pool.issue_identity("old", valid_from=datetime.now(UTC) - timedelta(days=2),
                                                  valid_days=1))
    try:
        assert refused(address, pool.issue_identity("node-a")).code() == grpc.StatusCode.UNAVAILABLE
    finally:
        srv.stop(0)


def test_revoked_member_is_denied_and_the_reason_logged(pool: PoolState, server: str,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    member = pool.issue_identity("node-a")
    other = pool.issue_identity("node-b")
    assert call(server, member)
    pool.revoke(member.member_id)
    with caplog.at_level(logging.WARNING, logger="duskpool.security"):
        for method in ("Echo", "Stream"):
            error = refused(server, member, method)
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED, method
            assert error.details() == "certificate revoked"
    assert f"certificate {member.fingerprint} is revoked" in caplog.text
    assert "/test.Echo/Stream" in caplog.text
    assert call(server, other)  # the others keep working


def test_broken_revocation_check_fails_closed(pool: PoolState) -> None:
    def broken(fp: str) -> bool:
        raise RuntimeError("database is gone")

    srv, address = start_echo(pool.issue_identity("server"), broken)
    try:
        assert refused(address, pool.issue_identity("node-a")).code() == grpc.StatusCode.UNAVAILABLE
    finally:
        srv.stop(0)


def test_plaintext_client_is_rejected(server: str, capfd: pytest.CaptureFixture) -> None:
    assert refused(server, None).code() == grpc.StatusCode.UNAVAILABLE
    assert "WRONG_VERSION_NUMBER" in server_log(capfd)


def test_client_without_certificate_is_rejected(pool: PoolState, server: str) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=pool.ca_pem)
    with grpc.secure_channel(server, credentials, options=NODE_CHANNEL_OPTIONS) as channel:
        with pytest.raises(grpc.RpcError) as e:
            channel.unary_unary("/test.Echo/Echo")(b"hi", timeout=TIMEOUT)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_local_pool_sets_up_mtls_for_a_swarm_by_itself(tmp_path: Path) -> None:
    with local_pool(2) as local:
        root = local.root
        srv, address = start_echo(local.nodes[0], local.pool.is_revoked)
        try:
            assert call(address, local.nodes[1]) and call(address, local.gateway)
        finally:
            srv.stop(0)
        assert [m.name for m in local.pool.members()] == ["gateway", "node-0", "node-1"]
        assert (local.node_dirs[1] / "node.key").stat().st_mode & 0o777 == 0o600
    assert not root.exists()
