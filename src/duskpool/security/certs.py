"""Keys, certificates and the identity files a node or gateway keeps.

Every key is EC P-256: small certificates, fast handshakes, supported by gRPC's BoringSSL everywhere.
A certificate's fingerprint is the sha256 hex of its DER bytes; it names a member and pins the CA.
"""

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

NODE_NAME = "duskpool-node"  # DNS SAN in every member certificate: the name checked before a member id is known
GATEWAY_NAME = "duskpool-gateway"  # DNS SAN only the gateway's certificate has; the join client checks it
MEMBER_SUFFIX = ".member.duskpool"  # DNS SAN "<id>.member.duskpool": the one member a certificate names


def member_name(member_id: int) -> str:
    """The DNS name only member `member_id`'s certificates carry: a channel that checks it is pinned to that member
    (nodes are dialled by IP, so channels check a name of ours: grpc.ssl_target_name_override)."""
    return f"{member_id}{MEMBER_SUFFIX}"


def expected_name(member: int | str | None) -> str:
    """The name a channel to `member` checks: its own `member_name` once its id is known, else NODE_NAME (any member:
    one whose certificate is from before member ids, known by its fingerprint, or as 0 in a member list)."""
    return member_name(member) if isinstance(member, int) and member else NODE_NAME


def member_id_of(cert: x509.Certificate | bytes) -> int | None:
    """The member id a certificate (object, PEM or DER) names in its SAN; None for one issued before ids were."""
    if isinstance(cert, bytes):
        pem = cert.startswith(b"-----")
        cert = x509.load_pem_x509_certificate(cert) if pem else x509.load_der_x509_certificate(cert)
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    ids = [n.removesuffix(MEMBER_SUFFIX) for n in names.get_values_for_type(x509.DNSName) if n.endswith(MEMBER_SUFFIX)]
    return int(ids[0]) if len(ids) == 1 and ids[0].isdigit() else None


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def fingerprint(cert: x509.Certificate | bytes) -> str:
    """sha256 hex of the DER encoding; accepts a certificate object or its PEM bytes."""
    if isinstance(cert, bytes):
        cert = x509.load_pem_x509_certificate(cert)
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


RENEW_AT_LIFE_LEFT = 1 / 3  # a certificate is renewed (and its holder warned) once this much of its life is left


def renewal_due(cert: x509.Certificate, now: datetime | None = None) -> bool:
    """Whether `cert` has less than RENEW_AT_LIFE_LEFT of its life left (or has expired)."""
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    return cert.not_valid_after_utc - (now or datetime.now(UTC)) < life * RENEW_AT_LIFE_LEFT


def expiry_warning(cert: x509.Certificate, now: datetime | None = None) -> str | None:
    """What to tell the user at start when `cert` is near its end (None while it is not)."""
    if not renewal_due(cert, now):
        return None
    left = cert.not_valid_after_utc - (now or datetime.now(UTC))
    when = cert.not_valid_after_utc.strftime("%Y-%m-%d %H:%M UTC")
    if left.total_seconds() <= 0:
        return f"this member's certificate expired at {when}: the pool refuses it; join again with a new token"
    return (f"this member's certificate expires at {when} (in {left.total_seconds() / 86400:.1f} days); it renews "
            "itself over the pool's mutual TLS once a gateway that keeps the pool is reached")


@functools.lru_cache(maxsize=8)
def _private_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    return serialization.load_pem_private_key(pem, password=None)


@functools.lru_cache(maxsize=64)
def _public_key(cert_pem: bytes) -> ec.EllipticCurvePublicKey:
    return x509.load_pem_x509_certificate(cert_pem).public_key()


def sign(identity: "NodeIdentity", data: bytes) -> bytes:
    """`data` signed with the identity's key (ECDSA P-256 over SHA-256): what the gateway's session grants carry."""
    return _private_key(identity.key_pem).sign(data, ec.ECDSA(hashes.SHA256()))


def signed_by(cert_pem: bytes, data: bytes, signature: bytes) -> bool:
    """Whether `signature` is `data` signed with the key of the certificate `cert_pem` (see `sign`)."""
    try:
        _public_key(cert_pem).verify(signature, data, ec.ECDSA(hashes.SHA256()))
        return True
    except InvalidSignature:
        return False


def make_csr(key: ec.EllipticCurvePrivateKey, name: str) -> bytes:
    """A CSR for `name`; the gateway decides everything else (SANs, usages, validity)."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    return x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256()).public_bytes(
        serialization.Encoding.PEM)


def write_private(path: Path, data: bytes) -> None:
    """Write a secret so that it is never readable by others, not even for an instant (created 0600).

    Refuses to overwrite: a key that exists is someone's identity. Callers replace one with `os.replace`.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


@dataclass(frozen=True)
class NodeIdentity:
    """What a member needs for mutual TLS: its certificate and key, and the pool's CA certificate (all PEM)."""
    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes
    member_id: int

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cert_pem)

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)

    def __repr__(self) -> str:  # never print the key
        return f"NodeIdentity(member_id={self.member_id}, fingerprint={self.fingerprint[:16]}…)"


IDENTITY_FILES = ("node.crt", "node.key", "ca.crt", "member.json")


def save_identity(identity: NodeIdentity, directory: Path) -> None:
    """Write the identity into `directory` (0700); the key file is 0600. Replaces an older identity."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_path = directory / "node.key"
    tmp = directory / "node.key.tmp"
    tmp.unlink(missing_ok=True)
    write_private(tmp, identity.key_pem)
    os.replace(tmp, key_path)
    (directory / "node.crt").write_bytes(identity.cert_pem)
    (directory / "ca.crt").write_bytes(identity.ca_pem)
    (directory / "member.json").write_text(json.dumps({"member_id": identity.member_id}) + "\n")


def load_identity(directory: Path) -> NodeIdentity:
    """Read what `save_identity` wrote; refuses a key file that others can read."""
    directory = Path(directory)
    missing = [n for n in IDENTITY_FILES if not (directory / n).exists()]
    if missing:
        raise FileNotFoundError(f"no node identity in {directory} (missing {', '.join(missing)}): join the pool first")
    key_path = directory / "node.key"
    mode = key_path.stat().st_mode & 0o777
    if mode & 0o077:
        raise PermissionError(f"{key_path} has mode {mode:o}; a private key must be 600 (chmod 600 {key_path})")
    return NodeIdentity(cert_pem=(directory / "node.crt").read_bytes(), key_pem=key_path.read_bytes(),
                        ca_pem=(directory / "ca.crt").read_bytes(),
                        member_id=int(json.loads((directory / "member.json").read_text())["member_id"]))
