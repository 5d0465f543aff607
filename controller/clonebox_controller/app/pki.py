"""Certificates of the fleet: listing, revocation (the deny list), renewal, join tokens and enrolment.

The CA folder is held by the controller. The deny list lives in the store, so every controller replica
enforces it, and it is pushed to agents on their session after every heartbeat.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from clonebox_controller.app.ports import FleetStore
from clonebox_core.audit.event import Outcome, new_event
from clonebox_core.errors import InvalidArgument, NotFound, PermissionDenied, Unauthenticated
from clonebox_core.names import check_dns_label
from clonebox_core.security.identity import Identity, Kind, make_identity
from clonebox_core.security.jointoken import JoinToken
from clonebox_core.security.pki import CertificateAuthority, cert_pem, csr_public_key, identity_of

log = logging.getLogger(__name__)

_REFRESH_SECONDS = 1.0


@dataclass(frozen=True)
class CertInfo:
    """One issued certificate as the API shows it."""

    serial: str
    identity: str
    not_before: datetime
    not_after: datetime
    revoked: bool


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class PkiManager:
    """Certificates, the deny list and enrolment."""

    def __init__(self, store: FleetStore, ca: CertificateAuthority, *, enroll_address: str, leaf_seconds: int) -> None:
        self._store = store
        self.ca = ca
        self.enroll_address = enroll_address
        self.leaf_seconds = leaf_seconds
        self.revoked: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Load the deny list and keep it fresh (other replicas may revoke too)."""
        self.revoked = await asyncio.to_thread(self._store.revoked_serials)
        self._task = asyncio.create_task(self._refresh(), name="deny-list")

    async def close(self) -> None:
        """Stop refreshing."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def is_revoked(self, identity: Identity) -> bool:
        """True when the identity's certificate is on the deny list."""
        return f"{identity.serial:x}" in self.revoked

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(_REFRESH_SECONDS)
            try:
                self.revoked = await asyncio.to_thread(self._store.revoked_serials)
            except Exception:
                log.exception("cannot refresh the deny list")

    def list_certificates(self, name: str = "") -> list[CertInfo]:
        """Issued certificates, oldest first."""
        out = []
        for cert in self.ca.issued():
            ident = identity_of(cert)
            if name and ident.name != name:
                continue
            serial = f"{cert.serial_number:x}"
            out.append(
                CertInfo(
                    serial, ident.spiffe_id, cert.not_valid_before_utc, cert.not_valid_after_utc, serial in self.revoked
                )
            )
        return out

    async def revoke(self, name: str, serial: str) -> list[CertInfo]:
        """Revoke every certificate of ``name``, or the one with ``serial``."""
        if bool(name) == bool(serial):
            raise InvalidArgument("give a name or a serial", reason="INVALID_FIELD", metadata={"field": "name"})
        if name:
            check_dns_label("name", name)
        serial = serial.lower().removeprefix("0x")
        targets = [c for c in self.list_certificates(name) if not serial or c.serial == serial]
        if not targets:
            raise NotFound(f"no certificate for {name or serial}", reason="CERTIFICATE_NOT_FOUND")
        for cert in targets:
            event = new_event(
                "certificate.revoke",
                f"certificates/{cert.serial}",
                Outcome.SUCCEEDED,
                details={"identity": cert.identity},
            )
            await asyncio.to_thread(self._store.revoke_certificate, cert.serial, cert.identity, event)
            self.revoked.add(cert.serial)
            log.warning("revoked certificate %s of %s", cert.serial, cert.identity)
        return [CertInfo(c.serial, c.identity, c.not_before, c.not_after, True) for c in targets]

    async def renew(self, caller: Identity, csr_pem: bytes) -> bytes:
        """A new certificate for the caller's own identity (never another one); audited before it is returned."""
        if self.is_revoked(caller):
            raise Unauthenticated("a revoked certificate cannot be renewed", reason="CERT_REVOKED")
        same = Identity(caller.trust_domain, caller.kind, caller.name, caller.role)
        cert = self.ca.sign_csr(csr_pem, same, seconds=self.leaf_seconds)
        serial = format(cert.serial_number, "x")
        event = new_event(
            "certificate.renew", f"certificates/{serial}", Outcome.SUCCEEDED, details={"identity": same.spiffe_id}
        )
        # the certificate is handed out only once its issuance is on record
        await asyncio.to_thread(self._store.append_audit, [event])
        return cert_pem(cert)

    async def create_join_token(self, host: str, ttl_seconds: int) -> tuple[str, datetime]:
        """A one-time token that enrols ``host``; only its hash is stored."""
        check_dns_label("host", host)
        if not self.enroll_address:
            raise InvalidArgument(
                "this controller has no enrolment port: set enroll_listen in its config",
                reason="ENROLLMENT_DISABLED",
            )
        ttl = ttl_seconds or 3600
        if not 60 <= ttl <= 7 * 86400:
            raise InvalidArgument("ttl_seconds: use 60 .. 604800", reason="INVALID_FIELD")
        token = JoinToken(secrets.token_hex(8), secrets.token_urlsafe(24), host, self.enroll_address, self.ca.cert_pem)
        expires = datetime.now(UTC) + timedelta(seconds=ttl)
        event = new_event(
            "host.join_token.create",
            f"hosts/{host}",
            Outcome.SUCCEEDED,
            details={"token_id": token.token_id, "expire_time": expires.isoformat()},
        )
        await asyncio.to_thread(
            self._store.create_join_token, token.token_id, _sha256(token.secret), host, expires, event
        )
        return token.encode(), expires

    async def enroll(self, token_text: str, host: str, csr_pem: bytes) -> bytes:
        """Exchange a join token for the host's agent certificate."""
        token = JoinToken.decode(token_text)
        check_dns_label("host", host)
        if token.host != host:
            raise PermissionDenied(f"the join token was made for {token.host}, not {host}", reason="JOIN_TOKEN_HOST")
        # a bad CSR must not spend the one-time token: check it before consuming
        public_key = csr_public_key(csr_pem)
        event = new_event("host.enroll", f"hosts/{host}", Outcome.SUCCEEDED, actor=f"join-token/{token.token_id}")
        made_for = await asyncio.to_thread(self._store.consume_join_token, token.token_id, _sha256(token.secret), event)
        identity = make_identity(self.ca.trust_domain, Kind.AGENT, made_for)
        log.info("host %s enrolled", made_for)
        return cert_pem(self.ca.issue(identity, seconds=self.leaf_seconds, public_key=public_key).cert)
