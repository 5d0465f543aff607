"""Secret references and the providers that resolve them.

A *reference* names where a secret lives, never the secret itself::

    env:NAME                   an environment variable of the resolving process
    file:PATH                  a file only its owner may read (mode 0600 or 0400)
    age:PATH                   a whole file encrypted with age, decrypted with the configured identity

Reserved for the next slices (parsed, but no provider is registered yet, so resolving them fails with a
clear error): ``sops:PATH#dotted.key`` and ``vault:MOUNT/PATH#field``.

Syntax: ``SCHEME:LOCATION[#KEY]``. ``SCHEME`` is lower case (``[a-z][a-z0-9-]*``); ``LOCATION`` is
everything up to the first ``#``; ``KEY`` (after ``#``) selects a field inside a structured secret and
is accepted only by schemes that use one (none of the three above). A ``#`` therefore cannot appear in a
path. Relative paths are resolved against the provider's ``base_dir`` (by default the working directory).

Safety rules kept by everything here:

- no error message, ``repr`` or audit event carries a secret value; values are returned as
  :class:`~clonebox_core.secret.Secret` only;
- an *unparseable* reference is never echoed back, because a user who typed a literal password where a
  reference belongs would otherwise see it in the error (and so would every log that records the error);
- the resolver calls ``on_access(ref, provider)`` after each successful access, and
  :func:`secret_access_event` turns it into a ``secret.access`` audit event naming the reference.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from clonebox_core.audit.event import AuditEvent, Outcome, new_event
from clonebox_core.errors import CloneboxError, FailedPrecondition, InvalidArgument, invalid_field
from clonebox_core.secret import Secret

#: the audit action of every secret access
SECRET_ACCESS_ACTION = "secret.access"
#: schemes documented as coming next; resolving them says so instead of "unknown"
PLANNED_SCHEMES = ("sops", "vault")
#: a reference longer than this is refused (paths and Vault paths stay far below)
MAX_REF_CHARS = 4096
#: a plain secret file larger than this is refused (passwords and keys are small)
MAX_SECRET_FILE_BYTES = 64 * 1024
#: an age-encrypted file larger than this is refused
MAX_AGE_FILE_BYTES = 1024 * 1024

_SCHEME_RE = re.compile(r"[a-z][a-z0-9-]{0,31}")
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_AGE_IDENTITY_PREFIX = "AGE-SECRET-KEY-1"

# error reasons (stable, machine-readable)
REASON_INVALID_REF = "INVALID_SECRET_REF"
REASON_UNKNOWN_SCHEME = "UNKNOWN_SECRET_PROVIDER"
REASON_NOT_FOUND = "SECRET_NOT_FOUND"
REASON_INSECURE_FILE = "SECRET_FILE_INSECURE"
REASON_UNREADABLE = "SECRET_UNREADABLE"
REASON_EMPTY = "SECRET_EMPTY"
REASON_IDENTITY = "AGE_IDENTITY_INVALID"
REASON_DECRYPT = "SECRET_DECRYPT_FAILED"


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
            if parsed.scheme in PLANNED_SCHEMES:
                message = f"'{parsed.scheme}:' secret references are not supported yet; known providers: {known}"
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
    path = Path(location)
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
