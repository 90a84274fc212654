"""The pool's trust: its CA, member certificates, join tokens, API keys, and mutual TLS for gRPC.

Imports only the standard library, cryptography and grpc (layer `security` in DESIGN.md).
"""

from duskpool.security.certs import GATEWAY_NAME, NODE_NAME, NodeIdentity, fingerprint, load_identity, save_identity
from duskpool.security.join import CAMismatch, JoinError, add_join_service, join, split_join_arg, start_join_server
from duskpool.security.pool import JoinRefused, JoinToken, LocalPool, Member, PoolState, local_pool, parse_token
from duskpool.security.tls import (
    GATEWAY_CHANNEL_OPTIONS,
    NODE_CHANNEL_OPTIONS,
    RevocationInterceptor,
    channel_credentials,
    peer_fingerprint,
    peer_is_gateway,
    server_credentials,
    server_fingerprint,
)

__all__ = [
    "CAMismatch", "GATEWAY_CHANNEL_OPTIONS", "GATEWAY_NAME", "JoinError", "JoinRefused", "JoinToken", "LocalPool",
    "Member", "NODE_CHANNEL_OPTIONS", "NODE_NAME", "NodeIdentity", "PoolState", "RevocationInterceptor",
    "add_join_service", "channel_credentials", "fingerprint", "join", "load_identity", "local_pool", "parse_token",
    "peer_fingerprint", "peer_is_gateway", "save_identity", "server_credentials", "server_fingerprint",
    "split_join_arg", "start_join_server",
]
