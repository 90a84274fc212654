"""The pool's state on disk: CA, tokens stored hashed, certificates it signs, members, revocation, API keys."""

import hashlib
import ipaddress
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from duskpool.security import JoinRefused, NodeIdentity, PoolState, load_identity, parse_token, save_identity
from duskpool.security.certs import make_csr, new_key


@pytest.fixture
def pool(tmp_path: Path) -> PoolState:
    return PoolState(tmp_path / "pool").init()


def test_init_makes_a_ca_whose_key_only_the_owner_can_read(pool: PoolState) -> None:
    assert pool.key_path.stat().st_mode & 0o777 == 0o600
    assert pool.state_dir.stat().st_mode & 0o777 == 0o700
    ca = x509.load_pem_x509_certificate(pool.cert_path.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert ca.not_valid_after_utc - ca.not_valid_before_utc > timedelta(days=3649)
    assert pool.ca_fingerprint == hashlib.sha256(ca.public_bytes(serialization.Encoding.DER)).hexdigest()


def test_init_refuses_an_existing_pool_and_reopens_it_when_asked(pool: PoolState) -> None:
    with pytest.raises(FileExistsError, match="already exists"):
        PoolState(pool.state_dir).init()
    assert PoolState(pool.state_dir).init(exist_ok=True).ca_fingerprint == pool.ca_fingerprint
    assert PoolState(pool.state_dir).ca_fingerprint == pool.ca_fingerprint


def test_a_missing_pool_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="duskpool init"):
        PoolState(tmp_path / "nothing").issue_token()


def test_token_text_round_trips_and_carries_the_ca_fingerprint(pool: PoolState) -> None:
    token = pool.issue_token()
    assert token.text.startswith("dp1.") and len(token.text) == 112
    parsed = parse_token(f"  {token.text}\n")
    assert (parsed.secret, parsed.ca_fingerprint) == (token.secret, pool.ca_fingerprint)
    assert token.secret not in repr(token)


@pytest.mark.parametrize("text, message", [
    ("hello", "not a duskpool join token"),
    ("dp2.abc.def", "not a duskpool join token"),
    ("dp1." + "a" * 42 + "." + "0" * 64, "secret is malformed"),
    ("dp1." + "a" * 43 + "." + "0" * 63, "fingerprint is malformed"),
    ("dp1." + "a" * 43 + "." + "g" * 64, "fingerprint is malformed"),
])
def test_malformed_tokens_are_named_as_such(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_token(text)


def test_tokens_and_api_keys_are_stored_hashed_only(pool: PoolState) -> None:
    token = pool.issue_token()
    key = pool.create_api_key()
    db = pool.db_path.read_bytes()
    assert token.secret.encode() not in db and key.encode() not in db
    assert hashlib.sha256(token.secret.encode()).hexdigest().encode() in db


def test_redeemed_certificate_is_a_member_certificate_for_the_csr_key(pool: PoolState) -> None:
    key = new_key()
    cert_pem, member_id = pool.redeem_token(pool.issue_token().secret, make_csr(key, "mac-mini"), "mac-mini",
                                            "192.168.1.7:7070")
    cert = x509.load_pem_x509_certificate(cert_pem)
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(pool.ca_pem))
    assert cert.public_key() == key.public_key()
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH}
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["duskpool-node", f"{member_id}.member.duskpool"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("192.168.1.7")]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert timedelta(days=29) < cert.not_valid_after_utc - datetime.now(UTC) <= timedelta(days=30)
    [member] = pool.members()
    assert (member.id, member.name, member.address, member.revoked) == (member_id, "mac-mini", "192.168.1.7:7070",
                                                                        False)


def test_token_is_single_use_and_expires(pool: PoolState) -> None:
    token = pool.issue_token()
    pool.redeem_token(token.secret, make_csr(new_key(), "a"), "a")
    with pytest.raises(JoinRefused, match="already used"):
        pool.redeem_token(token.secret, make_csr(new_key(), "b"), "b")
    expired = pool.issue_token(ttl_s=0.01)
    time.sleep(0.05)
    with pytest.raises(JoinRefused, match="expired"):
        pool.redeem_token(expired.secret, make_csr(new_key(), "c"), "c")
    with pytest.raises(JoinRefused, match="unknown join token"):
        pool.redeem_token("x" * 43, make_csr(new_key(), "d"), "d")
    assert [m.name for m in pool.members()] == ["a"]


def test_a_bad_csr_or_name_does_not_spend_the_token(pool: PoolState) -> None:
    token = pool.issue_token()
    with pytest.raises(ValueError, match="not a PEM CSR"):
        pool.redeem_token(token.secret, b"garbage", "a")
    with pytest.raises(ValueError, match="not allowed"):
        pool.redeem_token(token.secret, make_csr(new_key(), "a"), "../etc/passwd")
    pool.redeem_token(token.secret, make_csr(new_key(), "a"), "a")


def test_one_token_admits_one_of_many_racing_nodes(pool: PoolState) -> None:
    token = pool.issue_token()
    csrs = [make_csr(new_key(), f"n{i}") for i in range(6)]
    outcomes: list[str] = []

    def redeem(i: int) -> None:
        try:
            pool.redeem_token(token.secret, csrs[i], f"n{i}")
            outcomes.append("in")
        except JoinRefused:
            outcomes.append("refused")

    threads = [threading.Thread(target=redeem, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["in"] + ["refused"] * 5
    assert len(pool.members()) == 1


def test_revocation_by_fingerprint_or_serial(pool: PoolState) -> None:
    a, b = pool.issue_identity("a"), pool.issue_identity("b")
    serial = x509.load_pem_x509_certificate(a.cert_pem).serial_number
    assert not pool.is_revoked(a.fingerprint)
    revoked = pool.revoke(a.member_id)
    assert revoked.revoked and revoked.name == "a"
    assert pool.is_revoked(a.fingerprint) and pool.is_revoked(serial) and pool.is_revoked(format(serial, "X"))
    assert not pool.is_revoked(b.fingerprint)
    assert pool.revoked_fingerprints() == {a.fingerprint}
    assert [m.name for m in pool.members(include_revoked=False)] == ["b"]
    assert pool.revoke(a.member_id).revoked_at == revoked.revoked_at  # revoking twice keeps the first time
    with pytest.raises(KeyError, match="no member with id 99"):
        pool.revoke(99)


def test_gateway_identity_is_kept_and_reissued_once_revoked(pool: PoolState) -> None:
    gateway = pool.gateway_identity()
    assert pool.gateway_identity() == gateway
    san = x509.load_pem_x509_certificate(gateway.cert_pem).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"duskpool-node", "duskpool-gateway",
                                                          f"{gateway.member_id}.member.duskpool"}
    pool.revoke(gateway.member_id)
    assert pool.gateway_identity().fingerprint != gateway.fingerprint


def test_api_keys(pool: PoolState) -> None:
    assert not pool.check_api_key("anything")  # no keys yet
    first, second = pool.create_api_key(), pool.create_api_key()
    assert first.startswith("dpk_") and first != second
    assert pool.check_api_key(first) and pool.check_api_key(second)
    assert not pool.check_api_key(first[:-1] + ("A" if first[-1] != "A" else "B"))
    assert not pool.check_api_key("")


def test_identity_files_keep_the_key_private(pool: PoolState, tmp_path: Path) -> None:
    identity = pool.issue_identity("a")
    save_identity(identity, tmp_path / "id")
    assert (tmp_path / "id" / "node.key").stat().st_mode & 0o777 == 0o600
    assert load_identity(tmp_path / "id") == identity
    save_identity(NodeIdentity(identity.cert_pem, identity.key_pem, identity.ca_pem, 7), tmp_path / "id")  # rejoin
    assert load_identity(tmp_path / "id").member_id == 7
    (tmp_path / "id" / "node.key").chmod(0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        load_identity(tmp_path / "id")
    with pytest.raises(FileNotFoundError, match="join the pool first"):
        load_identity(tmp_path / "empty")
