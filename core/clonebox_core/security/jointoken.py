"""Join tokens: how a new host proves it may enrol, and how it learns to trust the controller.

``cbj1.<base64url(zlib(json))>`` carrying the token id, the secret, the host it enrols, the enrolment
address and the CA certificate (so the new host verifies the controller without any prior setup).
The controller stores only the SHA-256 of the secret, and a token works once.
"""

from __future__ import annotations

import base64
import json
import zlib
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from clonebox_core.errors import InvalidArgument

TOKEN_PREFIX = "cbj1."


@dataclass(frozen=True)
class JoinToken:
    """The parts of a join token."""

    token_id: str
    secret: str
    host: str
    enroll_address: str
    ca_pem: bytes

    def encode(self) -> str:
        """The printable token (carries the CA so the new host can verify the controller)."""
        der = x509.load_pem_x509_certificate(self.ca_pem).public_bytes(serialization.Encoding.DER)
        body = {"i": self.token_id, "s": self.secret, "h": self.host, "a": self.enroll_address}
        body["ca"] = base64.b64encode(der).decode()
        packed = zlib.compress(json.dumps(body, separators=(",", ":")).encode(), 9)
        return TOKEN_PREFIX + base64.urlsafe_b64encode(packed).decode().rstrip("=")

    @classmethod
    def decode(cls, token: str) -> JoinToken:
        """Parse a printable token (InvalidArgument when it is not one)."""
        try:
            if not token.startswith(TOKEN_PREFIX) or len(token) > 8192:
                raise ValueError("prefix")
            raw = token[len(TOKEN_PREFIX) :]
            packed = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
            body = json.loads(zlib.decompressobj().decompress(packed, 65536))
            der = base64.b64decode(body["ca"])
            ca_pem = x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
            return cls(str(body["i"]), str(body["s"]), str(body["h"]), str(body["a"]), ca_pem)
        except (ValueError, KeyError, TypeError, zlib.error):
            raise InvalidArgument(
                "join token is malformed: copy it exactly as 'clonebox host add' printed it",
                reason="JOIN_TOKEN_MALFORMED",
                metadata={"field": "join_token"},
            ) from None
