"""Identities carried in certificates as SPIFFE-style URI SANs.

``spiffe://<trust-domain>/controller/<name>``, ``spiffe://<trust-domain>/agent/<host>`` and
``spiffe://<trust-domain>/user/<role>/<name>`` (role: viewer, operator, admin). The caller of the
RPC being served is kept in a context variable so every use case, log line and audit event can name it.
"""

from __future__ import annotations

import contextvars
import enum
import re
from dataclasses import dataclass

from clonebox_core.errors import InvalidArgument, Unauthenticated
from clonebox_core.names import check_dns_label

_TRUST_DOMAIN = re.compile(r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?")


class Kind(enum.StrEnum):
    """What a certificate stands for."""

    CONTROLLER = "controller"
    AGENT = "agent"
    USER = "user"


class UserRole(enum.StrEnum):
    """User roles, each including the rights of the ones before it."""

    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"


@dataclass(frozen=True)
class Identity:
    """A verified caller (or the subject of a certificate to issue)."""

    trust_domain: str
    kind: Kind
    name: str
    role: UserRole | None = None
    #: certificate serial number, for revocation checks (0 when not from a certificate)
    serial: int = 0

    def __post_init__(self) -> None:
        if (self.kind == Kind.USER) != (self.role is not None):
            raise InvalidArgument("a user identity needs a role; other identities have none", reason="INVALID_IDENTITY")

    @property
    def spiffe_id(self) -> str:
        """The URI SAN."""
        if self.kind == Kind.USER:
            assert self.role is not None
            return f"spiffe://{self.trust_domain}/user/{self.role}/{self.name}"
        return f"spiffe://{self.trust_domain}/{self.kind}/{self.name}"

    @property
    def principal(self) -> str:
        """The policy principal: controller, agent, or the user's role."""
        return str(self.role) if self.role is not None else str(self.kind)

    def __str__(self) -> str:
        return self.spiffe_id


def make_identity(trust_domain: str, kind: str, name: str, role: str | None = None) -> Identity:
    """Validate the parts and build an Identity (InvalidArgument naming the bad part)."""
    if not _TRUST_DOMAIN.fullmatch(trust_domain):
        raise InvalidArgument(f"trust domain {trust_domain!r} is not a DNS name", reason="INVALID_IDENTITY")
    try:
        k = Kind(kind)
    except ValueError:
        raise InvalidArgument(
            f"role {kind!r}: use controller, agent or user", reason="INVALID_IDENTITY", metadata={"field": "role"}
        ) from None
    check_dns_label("name", name)
    r: UserRole | None = None
    if k == Kind.USER:
        try:
            r = UserRole(role or "viewer")
        except ValueError:
            raise InvalidArgument(
                f"user role {role!r}: use viewer, operator or admin",
                reason="INVALID_IDENTITY",
                metadata={"field": "user_role"},
            ) from None
    return Identity(trust_domain, k, name, r)


def parse_spiffe_id(uri: str, serial: int = 0) -> Identity:
    """The Identity a URI SAN names; Unauthenticated when it is not one of ours."""
    prefix = "spiffe://"
    if not uri.startswith(prefix):
        raise Unauthenticated("certificate carries no CloneBox identity", reason="NO_IDENTITY")
    domain, _, path = uri[len(prefix) :].partition("/")
    parts = path.split("/")
    try:
        if len(parts) == 2 and parts[0] in (Kind.CONTROLLER, Kind.AGENT):
            ident = make_identity(domain, parts[0], parts[1])
        elif len(parts) == 3 and parts[0] == Kind.USER:
            ident = make_identity(domain, parts[0], parts[2], parts[1])
        else:
            raise InvalidArgument("bad path", reason="INVALID_IDENTITY")
    except InvalidArgument:
        raise Unauthenticated("certificate carries a malformed CloneBox identity", reason="NO_IDENTITY") from None
    return Identity(ident.trust_domain, ident.kind, ident.name, ident.role, serial)


#: the verified caller of the RPC being served (None outside RPCs and on plaintext loopback)
CALLER: contextvars.ContextVar[Identity | None] = contextvars.ContextVar("clonebox_caller", default=None)


def current_caller() -> Identity | None:
    """Who is calling, for use cases, logs and audit."""
    return CALLER.get()
