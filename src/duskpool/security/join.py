"""Joining the pool: a node trades a join token and a CSR for a certificate, over gRPC.

Where: a small gRPC server of its own (`start_join_server`) with server-only TLS, because the node has
no client certificate yet and the pool's mTLS servers require one. Service "duskpool.v1.Join", method
"Join", JSON bytes both ways (no .proto): {"token", "csr", "name", "address"} -> {"cert", "member_id"}.
The join server presents the gateway's certificate followed by the CA certificate.

How the node pins the CA from the token (a man in the middle with another CA, or with the pool's own
public CA certificate but no key signed by it, gets neither the token secret nor a CSR):
  1. An unverified TLS handshake (stdlib ssl, ALPN h2, nothing sent) reads the server's chain. The node
     keeps the chain's certificate whose sha256 equals the token's fingerprint, or stops (CAMismatch).
  2. Only then it opens the gRPC channel with that CA as the sole root and GATEWAY_NAME as the
     name to check: the handshake succeeds only if the server holds a key the pinned CA certified for the
     gateway. The secret and CSR travel only on this channel.
  3. The certificate it gets back must be signed by the pinned CA and hold the node's own public key.
The node's private key never leaves it.
"""

import hashlib
import json
import logging
import socket
import ssl
from concurrent import futures
from typing import Any

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from duskpool.security.certs import NodeIdentity, key_pem, make_csr, new_key
from duskpool.security.pool import JoinRefused, PoolState, parse_token
from duskpool.security.tls import GATEWAY_CHANNEL_OPTIONS

log = logging.getLogger("duskpool.security")

SERVICE = "duskpool.v1.Join"
METHOD = f"/{SERVICE}/Join"
MAX_JOIN_MESSAGE = 64 * 1024  # a CSR and a certificate are ~1 KB; nothing bigger has a reason to arrive


class JoinError(Exception):
    """Joining failed on the node's side: gateway unreachable, not the token's pool, or a bad answer."""


class CAMismatch(JoinError):
    """The server's CA is not the one the token pins: another pool, or someone in between."""


class JoinServerUnreachable(JoinError):
    """Nothing answered TLS at the join server's address: not up yet, or the wrong address (a retry may help)."""


def decode_message(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:  # {}, not None (which gRPC answers with INTERNAL): the handler says INVALID_ARGUMENT
        return {}


def encode_message(message: dict) -> bytes:
    return json.dumps(message).encode()


def add_join_service(server: grpc.Server, pool: PoolState) -> None:
    """Serve Join on `server`; each refusal is logged (by PoolState) and answered with its reason."""

    def handle(request: Any, context: grpc.ServicerContext) -> dict:
        if not isinstance(request, dict) or not all(isinstance(request.get(k), str) for k in ("token", "csr", "name")):
            log.warning("join from %s refused: malformed request", context.peer())
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "join request must be JSON with string token, csr, name")
        address = request.get("address")
        if address is not None and not isinstance(address, str):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "join request address must be a string")
        try:
            cert, member_id = pool.redeem_token(request["token"], request["csr"].encode(), request["name"], address)
        except JoinRefused as e:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, e.reason)
        except ValueError as e:
            log.warning("join from %s refused: %s", context.peer(), e)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return {"cert": cert.decode(), "member_id": member_id}

    handler = grpc.unary_unary_rpc_method_handler(handle, request_deserializer=decode_message,
                                                  response_serializer=encode_message)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Join": handler}),))


def start_join_server(pool: PoolState, host: str = "0.0.0.0", port: int = 0,
                      identity: NodeIdentity | None = None) -> tuple[grpc.Server, int]:
    """Start the join server (server-only TLS with the gateway's certificate); returns it and its port."""
    identity = identity or pool.gateway_identity()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                         options=[("grpc.max_receive_message_length", MAX_JOIN_MESSAGE)])
    add_join_service(server, pool)
    # the chain carries the CA so that a joining node can find the certificate its token pins
    credentials = grpc.ssl_server_credentials([(identity.key_pem, identity.cert_pem + identity.ca_pem)],
                                              require_client_auth=False)
    bound = server.add_secure_port(f"{host}:{port}", credentials)
    if bound == 0:
        raise OSError(f"could not listen on {host}:{port} for joins")
    server.start()
    log.info("join server listening on %s:%d (pool CA %s)", host, bound, pool.ca_fingerprint)
    return server, bound


def split_join_arg(text: str) -> tuple[str, str]:
    """'TOKEN@host:port' (the CLI's --join) -> (token text, gateway address)."""
    token, sep, address = text.rpartition("@")
    if not sep or not token or ":" not in address:
        raise ValueError(f"expected TOKEN@host:port, got {text[:20]!r}…")
    return token, address


def _host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected host:port, got {address!r}")
    return host.strip("[]"), int(port)


def fetch_pinned_ca(address: str, ca_fingerprint: str, timeout: float = 10.0) -> bytes:
    """The CA certificate (PEM) in the chain `address` presents whose sha256 is `ca_fingerprint`.

    The handshake is unverified on purpose: the pin, not the network, decides what is trusted.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])  # gRPC servers expect it
    try:
        with socket.create_connection(_host_port(address), timeout=timeout) as raw, \
                context.wrap_socket(raw) as tls:
            # public since Python 3.13; the same method on the C object before that
            chain = tls.get_unverified_chain() if hasattr(tls, "get_unverified_chain") \
                else tls._sslobj.get_unverified_chain()  # type: ignore[union-attr]
    except (OSError, ssl.SSLError) as e:
        raise JoinServerUnreachable(f"could not reach the join server at {address}: {e}") from None
    ders = [c if isinstance(c, bytes) else c.public_bytes(ssl._ssl.ENCODING_DER) for c in chain or []]
    for der in ders:
        if hashlib.sha256(der).hexdigest() == ca_fingerprint:
            return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
    seen = ", ".join(hashlib.sha256(d).hexdigest()[:16] for d in ders) or "none"
    raise CAMismatch(f"{address} is not the pool this token is for: the token pins CA {ca_fingerprint[:16]}…, "
                     f"the server presented {seen}; check the address, or someone is intercepting the connection")


def join(token_text: str, gateway: str, name: str, node_address: str | None = None,
         timeout: float = 10.0) -> NodeIdentity:
    """Join the pool at `gateway` (host:port of its join server) as `name`; the identity to save.

    Raises ValueError (malformed token), JoinServerUnreachable, CAMismatch, JoinRefused (the gateway's reason)
    or JoinError.
    """
    token = parse_token(token_text)
    ca_pem = fetch_pinned_ca(gateway, token.ca_fingerprint, timeout)
    key = new_key()
    request = {"token": token.secret, "csr": make_csr(key, name).decode(), "name": name, "address": node_address}
    credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    with grpc.secure_channel(gateway, credentials, options=GATEWAY_CHANNEL_OPTIONS) as channel:
        call = channel.unary_unary(METHOD, request_serializer=encode_message, response_deserializer=decode_message)
        try:  # not wait_for_ready: a handshake the pin refuses fails at once, with its reason
            reply = call(request, timeout=timeout)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.PERMISSION_DENIED:
                raise JoinRefused(e.details()) from None
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                raise JoinError(f"no TLS connection to {gateway}: the server there does not hold a gateway "
                                f"certificate from the token's pool, or it went away ({e.details()})") from None
            raise JoinError(f"join at {gateway} failed: {e.code().name}: {e.details()}") from None
    try:
        cert_pem = reply["cert"].encode()
        cert = x509.load_pem_x509_certificate(cert_pem)
        cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_pem))
        member_id = int(reply["member_id"])
    except (TypeError, KeyError, ValueError, InvalidSignature) as e:
        raise JoinError(f"the gateway's answer is not a certificate from the pool's CA: {e!r}") from None
    if cert.public_key() != key.public_key():
        raise JoinError("the gateway's certificate is not for this node's key")
    log.info("joined the pool at %s as member %d (%s)", gateway, member_id, name)
    return NodeIdentity(cert_pem, key_pem(key), ca_pem, member_id)
