"""Who is calling, and may they: certificate identity, revocation, policy, per-peer concurrency.

Identity comes from the verified client certificate; the policy table decides; each peer gets a bounded
number of concurrent unary calls.

TLS has already verified the chain (a missing, foreign or expired certificate never reaches here: the
handshake fails). This layer turns the certificate into an Identity, refuses revoked ones
(UNAUTHENTICATED ``CERT_REVOKED``) and calls the policy (PERMISSION_DENIED).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from cryptography import x509

from clonebox_core.errors import ResourceExhausted, Unauthenticated
from clonebox_core.security.identity import Identity
from clonebox_core.security.pki import identity_of
from clonebox_core.security.policy import authorize

_CACHE_MAX = 1024


class Authorizer:
    """Authentication and authorization of calls on a TLS server."""

    def __init__(
        self,
        trust_domain: str,
        is_revoked: Callable[[Identity], bool] = lambda _identity: False,
        *,
        max_concurrent_per_peer: int = 64,
    ) -> None:
        self.trust_domain = trust_domain
        self.is_revoked = is_revoked
        self.max_concurrent_per_peer = max_concurrent_per_peer
        self._cache: collections.OrderedDict[bytes, Identity] = collections.OrderedDict()
        self._in_flight: collections.Counter[str] = collections.Counter()

    def authenticate(self, context: Any) -> Identity:
        """Identity of the verified peer certificate of ``context``."""
        pems = context.auth_context().get("x509_pem_cert") or []
        if not pems:
            raise Unauthenticated("no client certificate", reason="NO_CLIENT_CERTIFICATE")
        pem = pems[0]
        identity = self._cache.get(pem)
        if identity is None:
            identity = identity_of(x509.load_pem_x509_certificate(pem))
            self._cache[pem] = identity
            if len(self._cache) > _CACHE_MAX:
                self._cache.popitem(last=False)
        if identity.trust_domain != self.trust_domain:
            raise Unauthenticated(f"identity {identity} is from another trust domain", reason="WRONG_TRUST_DOMAIN")
        if self.is_revoked(identity):
            raise Unauthenticated(f"the certificate of {identity} is revoked", reason="CERT_REVOKED")
        return identity

    def check(self, method: str, context: Any) -> Identity:
        """Authenticate and authorize one call."""
        identity = self.authenticate(context)
        authorize(method, identity)
        return identity

    @contextmanager
    def slot(self, identity: Identity) -> Iterator[None]:
        """Hold one of the peer's concurrent-call slots (RESOURCE_EXHAUSTED when none is free)."""
        key = identity.spiffe_id
        if self._in_flight[key] >= self.max_concurrent_per_peer:
            raise ResourceExhausted(
                f"{identity} has {self.max_concurrent_per_peer} calls in flight; retry later",
                reason="TOO_MANY_CONCURRENT_CALLS",
            )
        self._in_flight[key] += 1
        try:
            yield
        finally:
            self._in_flight[key] -= 1
            if not self._in_flight[key]:
                del self._in_flight[key]
