"""The pool's authority, kept by the gateway: its CA, members, join tokens and API keys.

State dir layout (the dir itself is 0700):
    ca.key   the CA's private key, PEM, mode 0600 (created with O_EXCL, never rewritten)
    ca.crt   the CA certificate, PEM; its sha256 (DER) is the fingerprint join tokens carry
    pool.db  SQLite: members, tokens (sha256 of the secret only), api_keys (sha256 only)

Join token text (112 characters, safe in a shell and in `TOKEN@host:port`):
    dp1.<secret>.<ca fingerprint>
    dp1          format version
    secret       32 random bytes, base64url without padding (43 characters)
    fingerprint  sha256 hex (64 characters) of the CA certificate's DER; the node pins it
"""

import hashlib
import hmac
import ipaddress
import logging
import re
import secrets
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from duskpool.security.certs import (
    GATEWAY_NAME,
    NODE_NAME,
    NodeIdentity,
    cert_pem,
    fingerprint,
    key_pem,
    load_identity,
    make_csr,
    member_name,
    new_key,
    renewal_due,
    save_identity,
    write_private,
)

log = logging.getLogger("duskpool.security")

CA_VALID_DAYS = 3650
MEMBER_VALID_DAYS = 30.0
CLOCK_SKEW = timedelta(minutes=5)  # certificates start a little in the past so a slow clock still accepts them
TOKEN_PREFIX = "dp1"
TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{43}$")
FINGERPRINT_RE = re.compile(r"^[0-9a-f]{64}$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
API_KEY_PREFIX = "dpk_"

SCHEMA = """
CREATE TABLE IF NOT EXISTS members (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    role TEXT NOT NULL,            -- 'node' or 'gateway'
    serial TEXT NOT NULL UNIQUE,   -- its current certificate's serial, lowercase hex
    fingerprint TEXT NOT NULL UNIQUE,  -- and fingerprint (older ones are in `certificates`)
    address TEXT,
    joined_at REAL NOT NULL,       -- unix seconds
    revoked_at REAL
);
CREATE TABLE IF NOT EXISTS tokens (
    hash TEXT PRIMARY KEY,         -- sha256 hex of the secret; the secret itself is never stored
    expires_at REAL NOT NULL,
    used_at REAL
);
CREATE TABLE IF NOT EXISTS certificates (  -- every certificate issued, a member's renewals too
    fingerprint TEXT PRIMARY KEY,
    serial TEXT NOT NULL,
    member_id INTEGER NOT NULL REFERENCES members(id),
    expires_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS api_keys (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    hash TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL
);
"""


class JoinRefused(Exception):
    """The gateway will not admit this node; `reason` says why in words a user can act on."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class JoinToken:
    secret: str
    ca_fingerprint: str
    expires_at: float | None = None  # known to the issuer only; the text form does not carry it

    @property
    def text(self) -> str:
        return f"{TOKEN_PREFIX}.{self.secret}.{self.ca_fingerprint}"

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:  # keep the secret out of logs and tracebacks
        return f"JoinToken(ca_fingerprint={self.ca_fingerprint[:16]}…, expires_at={self.expires_at})"


def parse_token(text: str) -> JoinToken:
    """Check a token's form (not its validity: only the gateway knows that) and split it."""
    parts = text.strip().split(".")
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
        raise ValueError(f"not a duskpool join token: expected {TOKEN_PREFIX}.<secret>.<ca fingerprint> "
                         "(run `duskpool token` on the gateway)")
    _, secret, fp = parts
    if not TOKEN_RE.match(secret):
        raise ValueError("join token secret is malformed: expected 43 base64url characters (was it cut short?)")
    fp = fp.lower()
    if not FINGERPRINT_RE.match(fp):
        raise ValueError("join token CA fingerprint is malformed: expected 64 hex characters (was it cut short?)")
    return JoinToken(secret, fp)


@dataclass(frozen=True)
class Member:
    id: int
    name: str
    role: str
    serial: str
    fingerprint: str
    address: str | None
    joined_at: float
    revoked_at: float | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _ip_of(address: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP in 'IP', 'IP:port' or '[IPv6]:port'; None for a host name (nodes are checked by NODE_NAME)."""
    if not address:
        return None
    host = address
    if host.startswith("["):
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


class PoolState:
    """The pool in `state_dir`. `init()` creates it; every other method expects it to exist.

    Each call opens its own SQLite connection, so one PoolState may serve gRPC handler threads.
    """

    def __init__(self, state_dir: Path):
        self.state_dir = Path(state_dir)
        self.key_path = self.state_dir / "ca.key"
        self.cert_path = self.state_dir / "ca.crt"
        self.db_path = self.state_dir / "pool.db"
        self._ca_cert: x509.Certificate | None = None
        self._ca_key: ec.EllipticCurvePrivateKey | None = None
        self._schema_ready = False

    @property
    def exists(self) -> bool:
        return self.key_path.exists()

    def init(self, exist_ok: bool = False) -> "PoolState":
        """Create the CA and the database. An existing pool is an error unless `exist_ok` (then it is opened)."""
        if self.exists:
            if exist_ok:
                return self
            raise FileExistsError(f"a pool already exists in {self.state_dir} (CA {self.ca_fingerprint}); "
                                  "remove the directory to start a new pool, which makes every member rejoin")
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = new_key()
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "duskpool"),
                          x509.NameAttribute(NameOID.COMMON_NAME, f"duskpool pool CA {secrets.token_hex(4)}")])
        now = datetime.now(UTC)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - CLOCK_SKEW).not_valid_after(now + timedelta(days=CA_VALID_DAYS))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                             crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256()))
        write_private(self.key_path, key_pem(key))
        self.cert_path.write_bytes(cert_pem(cert))
        with self._db():
            pass
        self._ca_cert, self._ca_key = cert, key
        log.info("created pool CA %s in %s", self.ca_fingerprint, self.state_dir)
        return self

    def _ca(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        if self._ca_cert is None or self._ca_key is None:
            if not self.exists:
                raise FileNotFoundError(f"no pool in {self.state_dir}: run `duskpool init` first")
            self._ca_cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
            key = serialization.load_pem_private_key(self.key_path.read_bytes(), password=None)
            assert isinstance(key, ec.EllipticCurvePrivateKey)
            self._ca_key = key
        return self._ca_cert, self._ca_key

    @property
    def ca_pem(self) -> bytes:
        return cert_pem(self._ca()[0])

    @property
    def ca_fingerprint(self) -> str:
        return fingerprint(self._ca()[0])

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        """One connection in autocommit mode; callers that need atomicity say BEGIN IMMEDIATE themselves."""
        if not self.exists:
            raise FileNotFoundError(f"no pool in {self.state_dir}: run `duskpool init` first")
        conn = sqlite3.connect(self.db_path, timeout=10.0, isolation_level=None)
        try:
            if not self._schema_ready:
                conn.executescript(SCHEMA)
                self._schema_ready = True
            yield conn
        finally:
            conn.close()

    # --- join tokens ---

    def issue_token(self, ttl_s: float = 600.0) -> JoinToken:
        """A single-use token valid for `ttl_s` seconds; only its hash is stored."""
        if ttl_s <= 0:
            raise ValueError(f"token lifetime must be positive, got {ttl_s}")
        secret = secrets.token_urlsafe(32)
        expires_at = time.time() + ttl_s
        with self._db() as db:
            db.execute("INSERT INTO tokens (hash, expires_at) VALUES (?, ?)", (_sha256(secret), expires_at))
        return JoinToken(secret, self.ca_fingerprint, expires_at)

    def redeem_token(self, secret: str, csr_pem: bytes, name: str,
                     address: str | None = None) -> tuple[bytes, int]:
        """Spend a token on a CSR: the node's certificate (PEM) and its member id.

        Raises JoinRefused for an unknown, expired or used token, ValueError for a bad CSR or name.
        The token is marked used in the same transaction that records the member, so two nodes racing
        with one token cannot both get in, and a failure leaves the token unspent.
        """
        csr = self._check_csr(csr_pem)
        _check_name(name)
        if address is not None and len(address) > 255:
            raise ValueError("member address is longer than 255 characters")
        now = time.time()
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute("SELECT expires_at, used_at FROM tokens WHERE hash = ?", (_sha256(secret),)).fetchone()
                if row is None:
                    raise JoinRefused("unknown join token: it was not issued by this pool (make one with "
                                      "`duskpool token` on the gateway)")
                expires_at, used_at = row
                if used_at is not None:
                    raise JoinRefused(f"join token was already used at {_when(used_at)}; tokens are single-use, "
                                      "make a new one with `duskpool token`")
                if expires_at <= now:
                    raise JoinRefused(f"join token expired at {_when(expires_at)}; make a new one with "
                                      "`duskpool token`")
                db.execute("UPDATE tokens SET used_at = ? WHERE hash = ?", (now, _sha256(secret)))
                cert, member_id = self._issue(db, csr.public_key(), name, address, "node", datetime.now(UTC),
                                              MEMBER_VALID_DAYS)
                db.execute("COMMIT")
            except BaseException as e:
                db.execute("ROLLBACK")
                if isinstance(e, JoinRefused):
                    log.warning("join refused for %r from %s: %s", name, address, e.reason)
                raise
        log.info("member %d %r joined from %s (certificate %s)", member_id, name, address, fingerprint(cert)[:16])
        return cert_pem(cert), member_id

    @staticmethod
    def _check_csr(csr_pem: bytes) -> x509.CertificateSigningRequest:
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as e:
            raise ValueError(f"certificate request is not a PEM CSR: {e}") from None
        if not csr.is_signature_valid:
            raise ValueError("certificate request signature does not verify")
        key = csr.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
            raise ValueError("certificate request must carry an EC P-256 public key")
        return csr

    # --- certificates without a token (the gateway's own, the local swarm's) ---

    def issue_identity(self, name: str, address: str | None = None, *, role: str = "node",
                       valid_from: datetime | None = None, valid_days: float = MEMBER_VALID_DAYS) -> NodeIdentity:
        """Make a key here and sign it: for the gateway itself and for nodes this process starts (local swarm).

        `valid_from`/`valid_days` exist so tests can make expired certificates.
        """
        if role not in ("node", "gateway"):
            raise ValueError(f"role must be 'node' or 'gateway', got {role!r}")
        _check_name(name)
        key = new_key()
        with self._db() as db, _transaction(db):
            cert, member_id = self._issue(db, key.public_key(), name, address, role, valid_from or datetime.now(UTC),
                                          valid_days)
        return NodeIdentity(cert_pem(cert), key_pem(key), self.ca_pem, member_id)

    def renew(self, presented: str, csr_pem: bytes) -> tuple[bytes, int]:
        """A new certificate for the member whose current certificate has fingerprint `presented` (the one it
        showed in a mutual TLS handshake), for the key of `csr_pem`: same member id, name and role, a full
        lifetime from now. Raises JoinRefused for an unknown, superseded or revoked certificate."""
        csr = self._check_csr(csr_pem)
        with self._db() as db, _transaction(db):
            row = db.execute("SELECT id, name, role, address, revoked_at FROM members WHERE fingerprint = ?",
                             (presented,)).fetchone()
            if row is None:
                raise JoinRefused("this certificate is not a member's current one (renewed already, or unknown)")
            member_id, name, role, address, revoked_at = row
            if revoked_at is not None:
                raise JoinRefused(f"member {member_id} is revoked")
            cert, _ = self._issue(db, csr.public_key(), name, address, role, datetime.now(UTC), MEMBER_VALID_DAYS,
                                  member_id)
        log.info("renewed member %d %r's certificate (%s)", member_id, name, fingerprint(cert)[:16])
        return cert_pem(cert), member_id

    def issue_gateway_identity(self, address: str | None = None) -> NodeIdentity:
        """The gateway's certificate: a member like the nodes, plus the GATEWAY_NAME SAN the join client checks."""
        return self.issue_identity("gateway", address, role="gateway")

    def gateway_identity(self, address: str | None = None) -> NodeIdentity:
        """The gateway's identity, kept in state_dir/gateway; issued when missing or revoked, renewed (same member,
        a new key) once a third of its life is left."""
        directory = self.state_dir / "gateway"
        if (directory / "node.crt").exists():
            identity = load_identity(directory)
            if not self.is_revoked(identity.fingerprint):
                if not renewal_due(identity.certificate):
                    return identity
                key = new_key()
                cert, _ = self.renew(identity.fingerprint, make_csr(key, "gateway"))
                renewed = NodeIdentity(cert, key_pem(key), self.ca_pem, identity.member_id)
                save_identity(renewed, directory)
                return renewed
        identity = self.issue_gateway_identity(address)
        save_identity(identity, directory)
        return identity

    def _issue(self, db: sqlite3.Connection, public_key: ec.EllipticCurvePublicKey, name: str, address: str | None,
               role: str, valid_from: datetime, valid_days: float,
               member_id: int | None = None) -> tuple[x509.Certificate, int]:
        """Sign and record a certificate for a new member, or for `member_id` (a renewal); inside the caller's
        transaction. A new member's row comes first: its certificate carries the id the row gets."""
        serial = x509.random_serial_number()
        if member_id is None:
            cur = db.execute("INSERT INTO members (name, role, serial, fingerprint, address, joined_at) "
                             "VALUES (?, ?, ?, ?, ?, ?)",
                             (name, role, format(serial, "x"), f"pending-{serial:x}", address, time.time()))
            assert cur.lastrowid is not None
            member_id = cur.lastrowid
        cert = self._sign(public_key, name, address, role, valid_from, valid_days, member_id, serial)
        db.execute("UPDATE members SET serial = ?, fingerprint = ? WHERE id = ?",
                   (format(serial, "x"), fingerprint(cert), member_id))
        db.execute("INSERT INTO certificates (fingerprint, serial, member_id, expires_at) VALUES (?, ?, ?, ?)",
                   (fingerprint(cert), format(serial, "x"), member_id, cert.not_valid_after_utc.timestamp()))
        return cert, member_id

    def _sign(self, public_key: ec.EllipticCurvePublicKey, name: str, address: str | None, role: str,
              valid_from: datetime, valid_days: float, member_id: int, serial: int) -> x509.Certificate:
        ca_cert, ca_key = self._ca()
        sans: list[x509.GeneralName] = [x509.DNSName(NODE_NAME), x509.DNSName(member_name(member_id))]
        if role == "gateway":
            sans.append(x509.DNSName(GATEWAY_NAME))
        ip = _ip_of(address)
        if ip is not None:
            sans.append(x509.IPAddress(ip))
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "duskpool"),
                             x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                             x509.NameAttribute(NameOID.COMMON_NAME, name)])
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_cert.subject).public_key(public_key)
                .serial_number(serial)
                .not_valid_before(valid_from - CLOCK_SKEW).not_valid_after(valid_from + timedelta(days=valid_days))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                             crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH,
                                                      ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
                .sign(ca_key, hashes.SHA256()))

    # --- members and revocation ---

    def members(self, include_revoked: bool = True) -> list[Member]:
        query = "SELECT id, name, role, serial, fingerprint, address, joined_at, revoked_at FROM members"
        if not include_revoked:
            query += " WHERE revoked_at IS NULL"
        with self._db() as db:
            return [Member(*row) for row in db.execute(query + " ORDER BY id")]

    def revoke(self, member_id: int) -> Member:
        """End a member: from now on its certificate is refused wherever the revocation list reaches."""
        with self._db() as db:
            db.execute("UPDATE members SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                       (time.time(), member_id))
            row = db.execute("SELECT id, name, role, serial, fingerprint, address, joined_at, revoked_at "
                             "FROM members WHERE id = ?", (member_id,)).fetchone()
        if row is None:
            raise KeyError(f"no member with id {member_id} (see `duskpool nodes`)")
        member = Member(*row)
        log.warning("revoked member %d %r (certificate %s)", member.id, member.name, member.fingerprint[:16])
        return member

    def is_revoked(self, cert_id: str | int) -> bool:
        """True if the certificate with this fingerprint (sha256 hex) or serial (int or hex) was revoked."""
        key = format(cert_id, "x") if isinstance(cert_id, int) else cert_id.lower()
        with self._db() as db:  # a revoked member's every certificate: the renewed ones have not expired yet
            row = db.execute("SELECT 1 FROM members WHERE revoked_at IS NOT NULL AND (fingerprint = ? OR serial = ? "
                             "OR id IN (SELECT member_id FROM certificates WHERE fingerprint = ? OR serial = ?))",
                             (key, key, key, key)).fetchone()
        return row is not None

    def revoked_fingerprints(self) -> set[str]:
        """Every revoked certificate's fingerprint: what nodes need to refuse revoked peers themselves."""
        with self._db() as db:
            return {fp for (fp,) in db.execute(
                "SELECT fingerprint FROM members WHERE revoked_at IS NOT NULL UNION SELECT c.fingerprint "
                "FROM certificates c JOIN members m ON m.id = c.member_id WHERE m.revoked_at IS NOT NULL")}

    # --- API keys ---

    def create_api_key(self) -> str:
        """A new key for the HTTP API; shown once, only its sha256 is kept."""
        key = API_KEY_PREFIX + secrets.token_urlsafe(32)
        with self._db() as db:
            db.execute("INSERT INTO api_keys (hash, created_at) VALUES (?, ?)", (_sha256(key), time.time()))
        return key

    def has_api_keys(self) -> bool:
        with self._db() as db:
            return db.execute("SELECT 1 FROM api_keys LIMIT 1").fetchone() is not None

    def check_api_key(self, key: str) -> bool:
        """Constant-time against every stored hash (no early exit, so timing says nothing about which matched)."""
        candidate = _sha256(key)
        with self._db() as db:
            hashes_ = [h for (h,) in db.execute("SELECT hash FROM api_keys")]
        ok = False
        for stored in hashes_:
            ok |= hmac.compare_digest(stored, candidate)
        return ok


@contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _check_name(name: str) -> None:
    if not NAME_RE.match(name):
        raise ValueError(f"member name {name!r} is not allowed: use 1-63 letters, digits, '.', '_' or '-'")


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


@dataclass
class LocalPool:
    """A throwaway pool for a local swarm: the gateway's and each node's identity, saved under `root`."""
    pool: PoolState
    gateway: NodeIdentity
    nodes: list[NodeIdentity]
    root: Path
    gateway_dir: Path
    node_dirs: list[Path] = field(default_factory=list)
    owns_root: bool = False

    def close(self) -> None:
        if self.owns_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "LocalPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def local_pool(n_nodes: int, root: Path | None = None, address: str | None = "127.0.0.1") -> LocalPool:
    """Create a pool in `root` (a fresh temp dir if None, removed on close) and certificates for n nodes.

    No token round-trip: this process holds the CA. Layout: root/pool (the CA), root/gateway and
    root/node-<i> (identities for `load_identity`).
    """
    owns_root = root is None
    root = Path(tempfile.mkdtemp(prefix="duskpool-pool-")) if root is None else Path(root)
    pool = PoolState(root / "pool").init()
    gateway = pool.issue_gateway_identity(address)
    save_identity(gateway, root / "gateway")
    nodes, dirs = [], []
    for i in range(n_nodes):
        identity = pool.issue_identity(f"node-{i}", address)
        save_identity(identity, root / f"node-{i}")
        nodes.append(identity)
        dirs.append(root / f"node-{i}")
    return LocalPool(pool, gateway, nodes, root, root / "gateway", dirs, owns_root)
