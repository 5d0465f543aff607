"""
The CLI's own TLS material: where it lives, checking it before use, explaining a failed handshake, renewal.

The CLI authenticates to the controller with a user certificate in a folder (``--tls-dir``,
``CLONEBOX_TLS_DIR``; default: the folder ``clonebox dev up`` made, else ``$XDG_CONFIG_HOME/clonebox/tls``)
holding ``ca.crt``, ``user.crt`` and ``user.key``. Plaintext (``--insecure``) is for loopback only.

A failed handshake reaches the client as UNAVAILABLE with no status details. What grpcio 1.85 says:

* the controller refuses this client's certificate (none, another CA's, expired): with TLS 1.3 the client
  finishes its side of the handshake before the server checks the certificate, so the client sees only
  ``Socket closed``, exactly what a plaintext client sees against a TLS server. The reason is therefore
  worked out from the local files (expired? issued by the CA in ``ca.crt``?).
* this client cannot verify the controller: ``Tls handshake failed (TSI_PROTOCOL_FAILURE): ...
  CERTIFICATE_VERIFY_FAILED``, ``... WRONG_VERSION_NUMBER`` (a plaintext server), or ``Hostname
  Verification Check failed`` (a certificate for another name).

Renewal: at two thirds of its lifetime the user certificate is renewed before the command's first call
(``PkiService.RenewCertificate`` with a CSR for a fresh key), under a lock so that concurrent commands
renew once; the new key and certificate replace the old ones atomically (key first, then certificate).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from clonebox.controller.v1 import pki_service_pb2
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import NameOID

from clonebox_cli.errors import TlsHandshakeFailed
from clonebox_core.errors import CloneboxError, FailedPrecondition, InvalidArgument
from clonebox_core.rpc.server import Transport
from clonebox_core.rpc.tls import TlsFiles, key_matches
from clonebox_core.security.pki import cert_pem, identity_of, key_pem, make_csr, new_key, write_private, write_public

#: the CLI's files in its TLS folder: ca.crt, user.crt, user.key
USER_FILE = "user"
#: how the fix for missing files is spelled in messages
ISSUE_HINT = "clonebox pki issue --role user --name NAME --user-role admin --out DIR"
#: a key and certificate that do not match yet may be a renewal in progress: re-read for this long
_MISMATCH_WAIT_SECONDS = 1.0

#: sends a renewal request to the controller (``PkiService.RenewCertificate``)
RenewCall = Callable[[pki_service_pb2.RenewCertificateRequest], pki_service_pb2.RenewCertificateResponse]

#: what gRPC says when the client could not complete (or verify) the handshake
_TLS_WORDS = ("handshake", "ssl_error", "tsi_", "certificate", "hostname verification", "wrong_version_number")
#: what gRPC says when the server hung up on the handshake (it rejected the client's certificate)
_CLOSED_WORDS = ("socket closed", "connection reset", "end of tcp stream")


def _xdg(variable: str, fallback: str) -> Path:
    value = os.environ.get(variable, "")
    return Path(value) if value and os.path.isabs(value) else Path.home() / fallback


def default_tls_dir() -> Path:
    """``$XDG_CONFIG_HOME/clonebox/tls`` (``~/.config/clonebox/tls``)."""
    return _xdg("XDG_CONFIG_HOME", ".config") / "clonebox" / "tls"


def user_files(tls_dir: str | Path) -> TlsFiles:
    """The CLI's three files in ``tls_dir``."""
    return TlsFiles.in_folder(Path(tls_dir), USER_FILE)


def _when(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def load_transport(tls_dir: str, insecure: bool) -> Transport:
    """
    The transport for talking to the controller: plaintext when asked, else mTLS with checked files.

    Every problem is one line naming the folder and the fix (FailedPrecondition): missing files, files
    that are not PEM, a certificate without a CloneBox identity, a key that does not match.
    """
    if insecure:
        return Transport(None, insecure=True)
    folder = Path(tls_dir)
    tls = user_files(folder)
    missing = [p.name for p in (tls.ca, tls.cert, tls.key) if not p.exists()]
    if missing:
        raise FailedPrecondition(
            f"no client certificate in {folder} (missing {', '.join(missing)}): run 'clonebox dev up' for a "
            f"local fleet, or have the CA holder run '{ISSUE_HINT}' and pass --tls-dir DIR (or set "
            "CLONEBOX_TLS_DIR); --insecure speaks plaintext to a loopback controller",
            reason="TLS_FILES_MISSING",
            metadata={"tls_dir": str(folder)},
        )
    deadline = time.monotonic() + _MISMATCH_WAIT_SECONDS
    while True:
        try:
            ca, cert, key = tls.load()
            x509.load_pem_x509_certificate(ca)
            identity_of(x509.load_pem_x509_certificate(cert))
        except CloneboxError as err:
            raise FailedPrecondition(
                f"{tls.cert}: {err.message} (issue a new one: '{ISSUE_HINT}')", reason="TLS_FILES_INVALID"
            ) from None
        except (OSError, ValueError) as exc:
            raise FailedPrecondition(
                f"cannot read the TLS files in {folder}: {exc} (issue new ones: '{ISSUE_HINT}')",
                reason="TLS_FILES_INVALID",
            ) from None
        if key_matches(cert, key):
            return Transport(tls)
        if time.monotonic() >= deadline:  # not a renewal by another command in progress
            raise FailedPrecondition(
                f"{tls.key} is not the key of {tls.cert} (issue a new pair: '{ISSUE_HINT}')",
                reason="TLS_FILES_INVALID",
            )
        time.sleep(0.05)


# ------------------------------------------------------------------------------------ failed handshakes


@dataclass(frozen=True)
class Peer:
    """What a handshake was attempted with: an address, our files (None: no certificate), the name."""

    address: str
    tls: TlsFiles | None
    server_name: str = ""
    #: the client spoke plaintext (``--insecure``)
    plaintext: bool = False


def handshake_failure(details: str, peer: Peer) -> TlsHandshakeFailed | None:
    """
    Recognise a failed TLS handshake in the details of an UNAVAILABLE call; None for anything else.

    Call it only for calls that never reached the server (no status details): a connection closed after
    a successful call is an ordinary outage.
    """
    low = details.lower()
    if any(word in low for word in _TLS_WORDS):
        return TlsHandshakeFailed(
            f"cannot verify the controller at {peer.address}: {_server_problem(low, details, peer)}",
            metadata={"address": peer.address},
        )
    if not any(word in low for word in _CLOSED_WORDS):
        return None
    return TlsHandshakeFailed(
        f"{peer.address} rejected this client's certificate: {_client_problem(peer)}",
        metadata={"address": peer.address},
    )


def _server_problem(low: str, details: str, peer: Peer) -> str:
    ca = peer.tls.ca if peer.tls is not None else Path("ca.crt")
    if "wrong_version_number" in low:
        return "it does not speak TLS (a controller started with insecure: true? pass --insecure, loopback only)"
    if "hostname verification" in low:
        return f"its certificate is not for {peer.server_name or 'the expected name'} (another trust domain?)"
    if "expired" in low:
        return "its certificate has expired"
    if "certificate_verify_failed" in low or "issuer" in low:
        return f"its certificate was not issued by the CA in {ca} (is it another fleet's controller?)"
    return f"TLS handshake failed: {details}"


def _client_problem(peer: Peer) -> str:
    if peer.tls is None:
        if peer.plaintext:
            return "none was presented (--insecure speaks plaintext, and this controller requires mTLS)"
        return "none was presented"
    tls = peer.tls
    try:
        ca_pem, pem, _key = tls.load()
        ca = x509.load_pem_x509_certificate(ca_pem)
        cert = x509.load_pem_x509_certificate(pem)
    except (CloneboxError, OSError, ValueError) as exc:
        return f"the files in {tls.cert.parent} cannot be read ({exc})"
    now = dt.datetime.now(dt.UTC)
    fix = f"issue a new one: '{ISSUE_HINT}', or run 'clonebox dev up' for the local fleet"
    if now >= cert.not_valid_after_utc:
        return f"{tls.cert} expired at {_when(cert.not_valid_after_utc)} ({fix})"
    if now < cert.not_valid_before_utc:
        return f"{tls.cert} is not valid before {_when(cert.not_valid_before_utc)} (check this machine's clock)"
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return (
            f"{tls.cert} was issued by {_issuer(cert, ca)}, not by the CA in {tls.ca} that the controller uses ({fix})"
        )
    try:
        who = str(identity_of(cert))
    except CloneboxError:
        who = str(tls.cert)
    return (
        f"it does not accept {who} (serial {cert.serial_number:x}): it trusts another CA than {tls.ca}, "
        "or its clock disagrees with the certificate's validity"
    )


def _issuer(cert: x509.Certificate, ca: x509.Certificate) -> str:
    names = cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        return "another CA"
    if cert.issuer == ca.subject:  # every CloneBox CA of a trust domain has the same name
        return f"another CA named '{names[0].value!s}'"
    return f"'{names[0].value!s}'"


# -------------------------------------------------------------------------------------------- renewal


def renewal_due(tls: TlsFiles, now: dt.datetime | None = None) -> bool:
    """True from two thirds of the certificate's lifetime until it expires (after that only a new one helps)."""
    now = now or dt.datetime.now(dt.UTC)
    cert = tls.certificate()
    return tls.renew_at() <= now < cert.not_valid_after_utc


@contextmanager
def _renewal_lock(tls: TlsFiles) -> Iterator[None]:
    path = tls.cert.with_name(f".{tls.cert.stem}.renew.lock")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def install(tls: TlsFiles, key: bytes, cert: bytes, ca: bytes | None = None) -> None:
    """
    Replace the files with a new pair: written beside under names of this process, then renamed.

    The key goes first: a reader that sees a new key with the old certificate finds that they do not
    match and reads again (``load_transport``), and a TLS server with dynamic credentials keeps the old
    pair until both are new.
    """
    if not key_matches(cert, key):
        raise InvalidArgument("the new certificate is not for the new key", reason="RENEWAL_MISMATCH")
    suffix = f".{os.getpid()}.new"
    staged: list[tuple[Path, Path]] = []
    if ca is not None:
        staged.append((tls.ca.with_name(tls.ca.name + suffix), tls.ca))
        write_public(staged[-1][0], ca)
    staged.append((tls.key.with_name(tls.key.name + suffix), tls.key))
    write_private(staged[-1][0], key)
    staged.append((tls.cert.with_name(tls.cert.name + suffix), tls.cert))
    write_public(staged[-1][0], cert)
    for tmp, final in staged:
        os.replace(tmp, final)


def renew(tls: TlsFiles, call_renew: RenewCall) -> x509.Certificate | None:
    """
    Renew the certificate in ``tls`` when it is due; return the new certificate, or None when not due.

    ``call_renew`` sends the CSR to the controller and returns the response. Another command may renew at
    the same time: the lock makes it wait, and it then finds nothing due.
    """
    if not renewal_due(tls):
        return None
    with _renewal_lock(tls):
        if not renewal_due(tls):  # renewed by a command that held the lock before us
            return None
        old = identity_of(tls.certificate())
        key = new_key()
        response = call_renew(pki_service_pb2.RenewCertificateRequest(csr_pem=make_csr(key, old.name).decode()))
        new_pem = response.certificate_pem.encode()
        cert = x509.load_pem_x509_certificate(new_pem)
        if identity_of(cert).spiffe_id != old.spiffe_id:
            raise InvalidArgument(
                f"the controller renewed {identity_of(cert)} instead of {old}", reason="RENEWAL_MISMATCH"
            )
        ca = response.ca_pem.encode() if response.ca_pem else None
        if ca is not None and ca == tls.ca.read_bytes():
            ca = None
        install(tls, key_pem(key), cert_pem(cert), ca)
        return cert
