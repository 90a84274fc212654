"""Mutual TLS for gRPC between pool members, and the per-call revocation check.

Every member certificate carries the DNS name NODE_NAME and its own `member_name(id)`; nodes are dialled by IP,
so channels override the name they check (`member_channel_options`): a channel to a known member checks that
member's name, so only its certificate completes the handshake. What authenticates a peer is the CA signature
(gRPC checks it in the handshake, both ways); what ends a member is revocation, which TLS cannot know about,
so servers add RevocationInterceptor.
"""

import functools
import logging
import socket
import ssl
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509

from duskpool.security.certs import GATEWAY_NAME, NODE_NAME, NodeIdentity, fingerprint, member_id_of, write_private

log = logging.getLogger("duskpool.security")

# pass these (plus your own) to grpc.secure_channel when dialling a member / the gateway's join port
NODE_CHANNEL_OPTIONS: list[tuple[str, Any]] = [("grpc.ssl_target_name_override", NODE_NAME)]
GATEWAY_CHANNEL_OPTIONS: list[tuple[str, Any]] = [("grpc.ssl_target_name_override", GATEWAY_NAME)]


def name_options(name: str) -> list[tuple[str, Any]]:
    """Channel options that make the handshake accept only a certificate carrying DNS name `name`
    (NODE_NAME: any member; GATEWAY_NAME: the gateway; member_name(id): that member)."""
    return [("grpc.ssl_target_name_override", name)]


def server_credentials(cert_pem: bytes, key_pem: bytes, ca_pem: bytes) -> grpc.ServerCredentials:
    """A server that only talks to clients holding a certificate from the pool's CA."""
    return grpc.ssl_server_credentials([(key_pem, cert_pem)], root_certificates=ca_pem, require_client_auth=True)


def renewing_server_credentials(identity: Callable[[], NodeIdentity]) -> grpc.ServerCredentials:
    """As `server_credentials`, but `identity()` is asked before each handshake, so a renewed certificate is served
    from the next connection on, without a restart."""
    def configuration(current: NodeIdentity) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(current.key_pem, current.cert_pem)], current.ca_pem)

    served = [identity()]

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        current = identity()
        if current is served[0]:
            return None
        served[0] = current
        return configuration(current)

    return grpc.dynamic_ssl_server_credentials(configuration(served[0]), fetch, require_client_authentication=True)


def channel_credentials(cert_pem: bytes, key_pem: bytes, ca_pem: bytes) -> grpc.ChannelCredentials:
    """A client that presents its certificate and only trusts servers certified by the pool's CA."""
    return grpc.ssl_channel_credentials(root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem)


def peer_certificate(context: grpc.ServicerContext) -> bytes | None:
    """The verified client certificate (PEM) of this call, or None on a connection without one."""
    certs = context.auth_context().get("x509_pem_cert")
    return certs[0] if certs else None


@functools.lru_cache(maxsize=1024)
def _fingerprint_of_pem(pem: bytes) -> str:
    return fingerprint(pem)


def peer_fingerprint(context: grpc.ServicerContext) -> str | None:
    """The peer's identity: sha256 hex of its certificate, as PoolState records it; None if it showed none."""
    pem = peer_certificate(context)
    return _fingerprint_of_pem(pem) if pem else None


@functools.lru_cache(maxsize=1024)
def _member_id_of_pem(pem: bytes) -> int | None:
    return member_id_of(pem)


def peer_member_id(context: grpc.ServicerContext) -> int | None:
    """The member id the peer's verified certificate names (None: none shown, or one from before ids)."""
    pem = peer_certificate(context)
    return _member_id_of_pem(pem) if pem else None


def peer_member(context: grpc.ServicerContext) -> int | str | None:
    """Who the peer is across its certificate's renewals: its member id, or for a certificate from before member
    ids its fingerprint; None without a certificate."""
    pem = peer_certificate(context)
    return (_member_id_of_pem(pem) or _fingerprint_of_pem(pem)) if pem else None


class RevocationInterceptor(grpc.ServerInterceptor):
    """Refuses every call from a revoked certificate with PERMISSION_DENIED, and logs why.

    An interceptor sees only the method name, not the peer, so it wraps the method's handler: the check
    runs in the handler's thread with the call's ServicerContext, before the servicer sees the request.
    Streams are checked when they open. `is_revoked` gets the peer's fingerprint; it is called on every
    call, so it should be cheap (a set lookup on nodes, PoolState.is_revoked on the gateway).
    """

    def __init__(self, is_revoked: Callable[[str], bool]):
        self.is_revoked = is_revoked

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
                          handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(self._checked(handler.unary_unary, method),
                                                       handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(self._checked(handler.unary_stream, method),
                                                        handler.request_deserializer, handler.response_serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(self._checked(handler.stream_unary, method),
                                                        handler.request_deserializer, handler.response_serializer)
        return grpc.stream_stream_rpc_method_handler(self._checked(handler.stream_stream, method),
                                                     handler.request_deserializer, handler.response_serializer)

    def _checked(self, behavior: Callable[[Any, grpc.ServicerContext], Any], method: str) -> Callable:
        def checked(request: Any, context: grpc.ServicerContext) -> Any:
            self.check(context, method)
            return behavior(request, context)
        return checked

    def check(self, context: grpc.ServicerContext, method: str = "") -> None:
        """Abort the call unless its peer shows a certificate that is not revoked."""
        fp = peer_fingerprint(context)
        if fp is None:
            log.warning("refused %s from %s: no client certificate", method, context.peer())
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "a client certificate from the pool is required")
        try:
            revoked = self.is_revoked(fp)
        except Exception:  # fail closed: a broken revocation list must not let a revoked member in
            log.exception("refused %s from %s: revocation check failed", method, context.peer())
            revoked = None
        if revoked is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "revocation check failed")
        if revoked:
            log.warning("refused %s from %s: certificate %s is revoked", method, context.peer(), fp)
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "certificate revoked")


def server_certificate(address: str, identity: NodeIdentity, timeout: float = 5.0) -> x509.Certificate:
    """The certificate the pool member at `address` (HOST:PORT) shows, verified against the pool's CA in a TLS
    handshake of our own (gRPC does not tell a client its server's certificate). `identity` is ours: members'
    servers want a client certificate."""
    host, _, port = address.rpartition(":")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cadata=identity.ca_pem.decode())
    context.set_alpn_protocols(["h2"])
    with tempfile.TemporaryDirectory(prefix="duskpool-tls-") as directory:  # ssl reads a key only from a file
        cert, key = Path(directory) / "cert.pem", Path(directory) / "key.pem"
        cert.write_bytes(identity.cert_pem)
        write_private(key, identity.key_pem)
        context.load_cert_chain(cert, key)
    with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as raw:
        with context.wrap_socket(raw, server_hostname=NODE_NAME) as tls:
            der = tls.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der)


def peer_is_gateway(context: grpc.ServicerContext) -> bool:
    """Whether this call's verified client certificate is the gateway's (only it carries GATEWAY_NAME)."""
    pem = peer_certificate(context)
    if pem is None:
        return False
    try:
        names = x509.load_pem_x509_certificate(pem).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except (ValueError, x509.ExtensionNotFound):
        return False
    return GATEWAY_NAME in names.value.get_values_for_type(x509.DNSName)
