"""The CloneBox PKI: an EC P-256 issuing CA and short-lived leaf certificates with SPIFFE-style URI SANs.

The CA lives in one folder held by the controller (``ca.key`` mode 0600, ``ca.crt``, ``issued/``).
Leaves for daemons also carry a DNS name the peers verify instead of an IP address
(``controller.<trust-domain>``, ``<host>.agent.<trust-domain>``), so a certificate is bound to the
role and host it was issued for wherever the process runs.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from clonebox_core.errors import FailedPrecondition, InvalidArgument, NotFound
from clonebox_core.security.identity import Identity, Kind, parse_spiffe_id

CA_KEY = "ca.key"
CA_CERT = "ca.crt"
ISSUED = "issued"
DEFAULT_DAYS = 30
MAX_SECONDS = 10 * 366 * 24 * 3600


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def server_name(identity: Identity) -> str:
    """The DNS name a peer verifies when it dials this daemon (not a resolvable name)."""
    if identity.kind == Kind.CONTROLLER:
        return f"controller.{identity.trust_domain}"
    if identity.kind == Kind.AGENT:
        return f"{identity.name}.agent.{identity.trust_domain}"
    raise InvalidArgument("users do not serve", reason="INVALID_IDENTITY")


def new_key() -> ec.EllipticCurvePrivateKey:
    """A fresh EC P-256 key."""
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """PKCS#8 PEM, unencrypted (files are 0600)."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    """PEM of a certificate."""
    return cert.public_bytes(serialization.Encoding.PEM)


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 fingerprint, hex."""
    return cert.fingerprint(hashes.SHA256()).hex()


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` readable by its owner only, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_public(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (0644), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def identity_of(cert: x509.Certificate) -> Identity:
    """The CloneBox identity in a certificate's URI SAN."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        sans = x509.SubjectAlternativeName([])
    uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        return parse_spiffe_id("", cert.serial_number)
    return parse_spiffe_id(uris[0], cert.serial_number)


@dataclass(frozen=True)
class IssuedCert:
    """A leaf certificate and, when the CA made the key, its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey | None

    @property
    def identity(self) -> Identity:
        """Identity in the certificate."""
        return identity_of(self.cert)


class CertificateAuthority:
    """The issuing CA in a folder."""

    def __init__(self, folder: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        self.folder = folder
        self._key = key
        self.cert = cert
        self.trust_domain = identity_of_ca(cert)

    @classmethod
    def init(cls, folder: Path, trust_domain: str, *, days: int = 3650) -> CertificateAuthority:
        """Create a new CA in ``folder``; FailedPrecondition when one exists already."""
        if (folder / CA_KEY).exists():
            raise FailedPrecondition(f"a CA exists already in {folder}", reason="CA_EXISTS")
        key = new_key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"CloneBox CA {trust_domain}")])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        folder.mkdir(parents=True, exist_ok=True)
        os.chmod(folder, 0o700)
        write_private(folder / CA_KEY, key_pem(key))
        write_public(folder / CA_CERT, cert_pem(cert))
        return cls(folder, key, cert)

    @classmethod
    def load(cls, folder: Path) -> CertificateAuthority:
        """Load the CA from ``folder`` (NotFound with the fix when there is none)."""
        try:
            key = serialization.load_pem_private_key((folder / CA_KEY).read_bytes(), None)
            cert = x509.load_pem_x509_certificate((folder / CA_CERT).read_bytes())
        except FileNotFoundError:
            raise NotFound(f"no CA in {folder}: run 'clonebox pki init'", reason="CA_NOT_FOUND") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise FailedPrecondition(f"{folder / CA_KEY} is not an EC key", reason="CA_INVALID")
        return cls(folder, key, cert)

    @property
    def cert_pem(self) -> bytes:
        """The CA certificate (the trust anchor every peer needs)."""
        return cert_pem(self.cert)

    def issue(
        self,
        identity: Identity,
        *,
        seconds: int = DEFAULT_DAYS * 86400,
        public_key: ec.EllipticCurvePublicKey | None = None,
        extra_hosts: tuple[str, ...] = (),
    ) -> IssuedCert:
        """Issue a leaf for ``identity`` (a new key unless ``public_key`` comes from a CSR)."""
        if identity.trust_domain != self.trust_domain:
            raise InvalidArgument(
                f"identity {identity} is outside trust domain {self.trust_domain}", reason="WRONG_TRUST_DOMAIN"
            )
        if not 1 <= seconds <= MAX_SECONDS:
            raise InvalidArgument("lifetime: use 1 second .. 10 years", reason="INVALID_LIFETIME")
        key = None if public_key is not None else new_key()
        pub = public_key if public_key is not None else key.public_key()  # type: ignore[union-attr]
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.spiffe_id)]
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if identity.kind != Kind.USER:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
            sans.append(x509.DNSName(server_name(identity)))
            for host in ("localhost", *extra_hosts):
                try:
                    sans.append(x509.IPAddress(ipaddress.ip_address(host)))
                except ValueError:
                    sans.append(x509.DNSName(host))
            sans += [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(ipaddress.ip_address("::1"))]
        now = _now()
        # a minute of slack for clocks that disagree a little; the lifetime counts from now
        not_after = now + dt.timedelta(seconds=seconds)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.name)]))
            .issuer_name(self.cert.subject)
            .public_key(pub)
            .serial_number(x509.random_serial_number())
            .not_valid_before(min(now - dt.timedelta(minutes=1), not_after - dt.timedelta(seconds=seconds)))
            .not_valid_after(min(not_after, self.cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.SubjectAlternativeName(_unique(sans)), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        write_public(self.folder / ISSUED / f"{cert.serial_number:x}.crt", cert_pem(cert))
        return IssuedCert(cert, key)

    def sign_csr(self, csr_pem: bytes, identity: Identity, *, seconds: int) -> x509.Certificate:
        """Issue a leaf for ``identity`` to the key in a CSR (the CSR's own names are ignored)."""
        return self.issue(identity, seconds=seconds, public_key=csr_public_key(csr_pem)).cert

    def issued(self) -> list[x509.Certificate]:
        """Every certificate this CA issued, oldest first."""
        folder = self.folder / ISSUED
        if not folder.is_dir():
            return []
        certs = [x509.load_pem_x509_certificate(p.read_bytes()) for p in folder.glob("*.crt")]
        return sorted(certs, key=lambda c: c.not_valid_before_utc)


def identity_of_ca(cert: x509.Certificate) -> str:
    """Trust domain of a CA certificate."""
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    uri = sans.get_values_for_type(x509.UniformResourceIdentifier)[0]
    return uri.removeprefix("spiffe://").rstrip("/")


def csr_public_key(csr_pem: bytes) -> ec.EllipticCurvePublicKey:
    """The P-256 key of a well-formed, self-signed CSR (InvalidArgument ``INVALID_CSR`` otherwise)."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
        valid = csr.is_signature_valid
        pub = csr.public_key()
    except (ValueError, TypeError):
        raise InvalidArgument("csr: not a PEM certificate request", reason="INVALID_CSR") from None
    if not valid:
        raise InvalidArgument("csr: signature does not match its key", reason="INVALID_CSR")
    if not isinstance(pub, ec.EllipticCurvePublicKey) or not isinstance(pub.curve, ec.SECP256R1):
        raise InvalidArgument("csr: the key must be EC P-256", reason="INVALID_CSR")
    return pub


def make_csr(key: ec.EllipticCurvePrivateKey, name: str) -> bytes:
    """A PEM CSR for ``key`` (the CA decides the identity; the CSR proves key possession)."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def _unique(names: list[x509.GeneralName]) -> list[x509.GeneralName]:
    seen: list[x509.GeneralName] = []
    for n in names:
        if n not in seen:
            seen.append(n)
    return seen


def ca_fingerprint_of_pem(pem: bytes) -> str:
    """SHA-256 over the DER of a PEM certificate."""
    return hashlib.sha256(x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)).hexdigest()
