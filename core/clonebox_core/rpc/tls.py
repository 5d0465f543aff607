"""mTLS material for servers and channels, re-read from disk when it changes.

Servers use gRPC's dynamic credentials: each new handshake asks whether the files changed, so a
renewed certificate is served without a restart. Channels are built from the current files; owners of
long-lived channels compare ``TlsFiles.stamp()`` and rebuild when it moved.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from clonebox_core.errors import FailedPrecondition
from clonebox_core.security.identity import Identity
from clonebox_core.security.pki import identity_of, write_private, write_public


@dataclass(frozen=True)
class TlsFiles:
    """Where a process finds the CA certificate, its own certificate and its key."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def in_folder(cls, folder: Path, name: str) -> TlsFiles:
        """``folder/ca.crt``, ``folder/NAME.crt``, ``folder/NAME.key``."""
        return cls(folder / "ca.crt", folder / f"{name}.crt", folder / f"{name}.key")

    def load(self) -> tuple[bytes, bytes, bytes]:
        """(ca, cert, key) PEM bytes; FailedPrecondition naming the missing file."""
        out = []
        for path in (self.ca, self.cert, self.key):
            try:
                out.append(path.read_bytes())
            except FileNotFoundError:
                raise FailedPrecondition(
                    f"TLS file {path} is missing: issue one with 'clonebox pki issue' or enrol with a join token",
                    reason="TLS_FILE_MISSING",
                ) from None
        return out[0], out[1], out[2]

    def stamp(self) -> tuple[int, ...]:
        """Changes whenever any of the files is replaced."""
        stamps: list[int] = []
        for path in (self.ca, self.cert, self.key):
            try:
                st = os.stat(path)
                stamps += [st.st_ino, st.st_mtime_ns]
            except FileNotFoundError:
                stamps += [0, 0]
        return tuple(stamps)

    def certificate(self) -> x509.Certificate:
        """The current leaf certificate."""
        return x509.load_pem_x509_certificate(self.load()[1])

    def identity(self) -> Identity:
        """Identity in the current certificate."""
        return identity_of(self.certificate())

    def renew_at(self) -> dt.datetime:
        """Two thirds into the current certificate's lifetime."""
        cert = self.certificate()
        start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
        return start + (end - start) * 2 / 3

    def exists(self) -> bool:
        """True when all three files are there."""
        return all(p.exists() for p in (self.ca, self.cert, self.key))


def key_matches(cert_pem: bytes, key_pem: bytes) -> bool:
    """True when ``key_pem`` is the private key of the certificate."""
    try:
        key = serialization.load_pem_private_key(key_pem, None)
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        return False
    raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return bool(key.public_key().public_bytes(*raw) == cert.public_key().public_bytes(*raw))


def server_credentials(tls: TlsFiles) -> grpc.ServerCredentials:
    """Server credentials that require a client certificate from our CA and follow file changes."""
    ca, cert, key = tls.load()
    seen = {"stamp": tls.stamp()}

    def fetch() -> Any:
        stamp = tls.stamp()
        if stamp == seen["stamp"]:
            return None
        try:
            new_ca, new_cert, new_key = tls.load()
        except FailedPrecondition:
            return None  # a renewal in progress: keep serving the old pair
        if not key_matches(new_cert, new_key):
            return None  # between the key and the certificate being replaced: try at the next handshake
        seen["stamp"] = stamp
        return grpc.ssl_server_certificate_configuration([(new_key, new_cert)], root_certificates=new_ca)

    initial = grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)
    return grpc.dynamic_ssl_server_credentials(initial, fetch, require_client_authentication=True)


def channel_credentials(tls: TlsFiles) -> grpc.ChannelCredentials:
    """Client credentials: trust our CA, present our certificate."""
    ca, cert, key = tls.load()
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def server_only_credentials(tls: TlsFiles) -> grpc.ServerCredentials:
    """TLS without client certificates, for the enrolment port (the join token authenticates)."""
    _ca, cert, key = tls.load()
    return grpc.ssl_server_credentials([(key, cert)], require_client_auth=False)


def install(tls: TlsFiles, key_bytes: bytes, cert_bytes: bytes, ca_bytes: bytes) -> None:
    """Write a new key, certificate and CA into place (each file atomically, the key first)."""
    tls.key.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_public(tls.ca, ca_bytes)
    write_private(tls.key.with_name(tls.key.name + ".next"), key_bytes)
    write_public(tls.cert.with_name(tls.cert.name + ".next"), cert_bytes)
    os.replace(tls.key.with_name(tls.key.name + ".next"), tls.key)
    os.replace(tls.cert.with_name(tls.cert.name + ".next"), tls.cert)
