"""Secret providers, references and password hashing (issue 6, step 5: the library slice).

Nothing here is wired into VM creation yet; see ``docs/secrets.md``.
"""

from __future__ import annotations

from clonebox_core.secrets.passwords import one_time_password, sha512_crypt
from clonebox_core.secrets.providers import (
    AgeProvider,
    EnvProvider,
    FileProvider,
    SecretProvider,
    SecretRef,
    SecretResolver,
    SopsProvider,
    UnconfiguredProvider,
    VaultProvider,
    default_resolver,
    secret_access_event,
)

__all__ = [
    "AgeProvider",
    "EnvProvider",
    "FileProvider",
    "SecretProvider",
    "SecretRef",
    "SecretResolver",
    "SopsProvider",
    "UnconfiguredProvider",
    "VaultProvider",
    "default_resolver",
    "one_time_password",
    "secret_access_event",
    "sha512_crypt",
]
