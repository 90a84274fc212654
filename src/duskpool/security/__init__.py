"""The pool's trust: its CA, member certificates, join tokens, API keys, and mutual TLS for gRPC.

Imports only the standard library, cryptography and grpc (layer `security` in DESIGN.md).
"""

from duskpool.security.certs import (
    GATEWAY_NAME,
    NODE_NAME,
    NodeIdentity,
    expected_name,
    expiry_warning,
    fingerprint,
    load_identity,
    member_id_of,
    member_name,
    renewal_due,
    save_identity,
    sign,
    signed_by,
)
from duskpool.security.join import CAMismatch, JoinError, add_join_service, join, split_join_arg, start_join_server
from duskpool.security.pool import JoinRefused, JoinToken, LocalPool, Member, PoolState, local_pool, parse_token
from duskpool.security.renew import add_renew_service, renew
from duskpool.security.tls import (
    GATEWAY_CHANNEL_OPTIONS,
    NODE_CHANNEL_OPTIONS,
    RevocationInterceptor,
    channel_credentials,
    name_options,
    peer_certificate,
    peer_fingerprint,
    peer_is_gateway,
    peer_member,
    peer_member_id,
    renewing_server_credentials,
    server_certificate,
    server_credentials,
)

__all__ = [
    "CAMismatch", "GATEWAY_CHANNEL_OPTIONS", "GATEWAY_NAME", "JoinError", "JoinRefused", "JoinToken", "LocalPool",
    "Member", "NODE_CHANNEL_OPTIONS", "NODE_NAME", "NodeIdentity", "PoolState", "RevocationInterceptor",
    "add_join_service", "add_renew_service", "channel_credentials", "expected_name", "expiry_warning", "fingerprint",
    "join", "load_identity", "local_pool", "member_id_of", "member_name", "name_options", "parse_token",
    "peer_certificate", "peer_fingerprint", "peer_is_gateway", "peer_member", "peer_member_id", "renew", "renewal_due",
    "renewing_server_credentials", "save_identity", "sign", "signed_by",
    "server_certificate", "server_credentials", "split_join_arg", "start_join_server",
]
