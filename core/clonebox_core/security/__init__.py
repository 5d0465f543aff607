"""Security: PKI, SPIFFE-style identities, the authorization policy."""
