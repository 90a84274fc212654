"""Renewing a member's certificate before it expires, over the pool's mutual TLS.

The gateway that keeps the pool serves "duskpool.v1.Authority/Renew" on its sink's server (mutual TLS, revocation
checked per call), JSON bytes both ways like Join: {"csr"} -> {"cert", "member_id"}. The caller is whoever the
handshake proved it to be: a member's current, unrevoked certificate gets a new one for the same member id
(a new key, a full lifetime); nothing in the request can name another member.
"""

import logging
from typing import Any

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from duskpool.security.certs import NodeIdentity, key_pem, make_csr, member_id_of, new_key
from duskpool.security.join import JoinError, decode_message, encode_message
from duskpool.security.pool import JoinRefused, PoolState
from duskpool.security.tls import GATEWAY_CHANNEL_OPTIONS, channel_credentials, peer_fingerprint

log = logging.getLogger("duskpool.security")

SERVICE = "duskpool.v1.Authority"
METHOD = f"/{SERVICE}/Renew"


def add_renew_service(server: grpc.Server, pool: PoolState) -> None:
    """Serve Renew on `server`, which must be a mutual TLS server of the pool (the caller is its certificate)."""

    def handle(request: Any, context: grpc.ServicerContext) -> dict:
        presented = peer_fingerprint(context)
        if presented is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "renewal needs the member's current certificate")
        if not isinstance(request, dict) or not isinstance(request.get("csr"), str):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "renewal request must be JSON with a string csr")
        try:
            cert, member_id = pool.renew(presented, request["csr"].encode())
        except JoinRefused as e:
            log.warning("renewal from %s refused: %s", context.peer(), e.reason)
            context.abort(grpc.StatusCode.PERMISSION_DENIED, e.reason)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return {"cert": cert.decode(), "member_id": member_id}

    handler = grpc.unary_unary_rpc_method_handler(handle, request_deserializer=decode_message,
                                                  response_serializer=encode_message)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Renew": handler}),))


def renew(address: str, identity: NodeIdentity, timeout: float = 10.0) -> NodeIdentity:
    """A new identity for this member from the gateway at `address` (its sink: HOST:PORT), which must show the
    gateway's certificate. Raises JoinRefused (revoked, superseded) or JoinError."""
    key = new_key()
    credentials = channel_credentials(identity.cert_pem, identity.key_pem, identity.ca_pem)
    with grpc.secure_channel(address, credentials, options=GATEWAY_CHANNEL_OPTIONS) as ch:
        call = ch.unary_unary(METHOD, request_serializer=encode_message, response_deserializer=decode_message)
        try:
            reply = call({"csr": make_csr(key, "renewal").decode()}, timeout=timeout)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.PERMISSION_DENIED:
                raise JoinRefused(e.details()) from None
            raise JoinError(f"renewal at {address} failed: {e.code().name}: {e.details()}") from None
    try:
        cert_pem = reply["cert"].encode()
        cert = x509.load_pem_x509_certificate(cert_pem)
        cert.verify_directly_issued_by(x509.load_pem_x509_certificate(identity.ca_pem))
    except (TypeError, KeyError, ValueError, InvalidSignature) as e:
        raise JoinError(f"the gateway's answer is not a certificate from the pool's CA: {e!r}") from None
    if cert.public_key() != key.public_key() or member_id_of(cert) != identity.member_id:
        raise JoinError("the renewed certificate is not for this member's new key")
    return NodeIdentity(cert_pem, key_pem(key), identity.ca_pem, identity.member_id)
