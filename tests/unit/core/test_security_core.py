"""Identities, the CA, join tokens and the per-peer concurrency limit (no network)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clonebox_core import errors
from clonebox_core.rpc.auth import Authorizer
from clonebox_core.rpc.tls import key_matches
from clonebox_core.security.identity import Identity, Kind, UserRole, make_identity, parse_spiffe_id
from clonebox_core.security.jointoken import JoinToken
from clonebox_core.security.pki import CertificateAuthority, cert_pem, key_pem, make_csr, new_key


def test_spiffe_ids_round_trip() -> None:
    for ident in (
        make_identity("clonebox.test", "agent", "h1"),
        make_identity("clonebox.test", "controller", "ctl"),
        make_identity("clonebox.test", "user", "alice", "operator"),
    ):
        assert parse_spiffe_id(ident.spiffe_id) == ident


@given(st.text(max_size=120))
def test_parse_never_accepts_junk_as_an_identity(uri: str) -> None:
    try:
        ident = parse_spiffe_id(uri)
    except errors.Unauthenticated:
        return
    assert uri == ident.spiffe_id


@pytest.mark.parametrize(
    ("kind", "name", "role"), [("root", "x", None), ("user", "x", "god"), ("agent", "Bad_Name", None)]
)
def test_bad_identity_parts_are_refused(kind: str, name: str, role: str | None) -> None:
    with pytest.raises(errors.InvalidArgument):
        make_identity("clonebox.test", kind, name, role)


def test_ca_files_and_issued_identity(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca", "clonebox.test")
    assert stat.S_IMODE((tmp_path / "ca" / "ca.key").stat().st_mode) == 0o600
    with pytest.raises(errors.FailedPrecondition):
        CertificateAuthority.init(tmp_path / "ca", "clonebox.test")
    issued = ca.issue(make_identity("clonebox.test", "user", "bob", "viewer"), seconds=60)
    assert issued.identity.role == UserRole.VIEWER and issued.identity.kind == Kind.USER
    assert issued.key is not None and key_matches(cert_pem(issued.cert), key_pem(issued.key))
    other = new_key()
    assert not key_matches(cert_pem(issued.cert), key_pem(other))
    with pytest.raises(errors.InvalidArgument):
        ca.issue(make_identity("elsewhere.test", "agent", "h1"))
    # a CSR proves only key possession: the CA decides the identity
    cert = ca.sign_csr(make_csr(other, "admin"), make_identity("clonebox.test", "agent", "h2"), seconds=60)
    assert cert.serial_number in [c.serial_number for c in ca.issued()]
    with pytest.raises(errors.InvalidArgument):
        ca.sign_csr(b"not a csr", make_identity("clonebox.test", "agent", "h2"), seconds=60)


def test_join_token_round_trip_and_junk(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca", "clonebox.test")
    token = JoinToken("id1", "secret", "h1", "127.0.0.1:7102", ca.cert_pem)
    assert JoinToken.decode(token.encode()) == token
    for junk in ("", "cbj1.", "cbj1.!!!", "xyz." + token.encode()[5:], token.encode()[:-10]):
        with pytest.raises(errors.InvalidArgument):
            JoinToken.decode(junk)


def test_per_peer_concurrency_limit() -> None:
    auth = Authorizer("clonebox.test", max_concurrent_per_peer=2)
    peer = Identity("clonebox.test", Kind.USER, "u", UserRole.ADMIN)
    with auth.slot(peer), auth.slot(peer):
        with pytest.raises(errors.ResourceExhausted) as err, auth.slot(peer):
            pass
        assert err.value.reason == "TOO_MANY_CONCURRENT_CALLS"
        with auth.slot(Identity("clonebox.test", Kind.USER, "v", UserRole.ADMIN)):
            pass  # another peer is not affected
    with auth.slot(peer):
        pass  # slots are given back


def test_log_lines_name_the_caller() -> None:
    import json
    import logging

    from clonebox_core.security.identity import CALLER
    from clonebox_core.telemetry.logging import make_formatter

    record = logging.LogRecord("x", logging.INFO, __file__, 1, "created %s", ("vm",), None)
    fmt = make_formatter("test", as_json=True)
    assert "actor" not in json.loads(fmt.format(record))
    token = CALLER.set(make_identity("clonebox.test", "user", "alice", "operator"))
    try:
        line = json.loads(fmt.format(record))
    finally:
        CALLER.reset(token)
    assert line["actor"] == "spiffe://clonebox.test/user/operator/alice" and line["event"] == "created vm"
