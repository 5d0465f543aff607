"""SSH public keys for a VM spec's ``auth.ssh_keys``, resolved on the CLI's machine.

Each entry of ``auth.ssh_keys`` names a *key source*::

    github:USER                    the keys GitHub publishes at https://github.com/USER.keys
    gitlab:USER                    the keys GitLab publishes at https://gitlab.com/USER.keys
    ssh-ed25519 AAAA... [comment]  one key, inline (any supported type)
    file:PATH or a bare path       a file of keys, one a line (``#`` comments and blank lines skipped)

A bare path must look like one (it contains ``/``, starts with ``~`` or ends with ``.pub``), so a
typo such as ``alice`` for ``github:alice`` is an error rather than a missing file. ``~`` is expanded;
relative paths are relative to ``base_dir`` (the spec file's folder).

What comes out is a list of normalised OpenSSH public key lines (``TYPE BASE64 [COMMENT]``, single
spaces, no control characters), deduplicated by type and key data. Accepted types: ``ssh-ed25519``,
``ecdsa-sha2-nistp256/384/521``, ``sk-ssh-ed25519@openssh.com``, ``sk-ecdsa-sha2-nistp256@openssh.com``
and ``ssh-rsa`` of at least 2048 bits. Every key is loaded with ``cryptography``, so a line whose key
data is corrupt, truncated or of another type than it claims is refused.

Refused on purpose:

- private keys given by mistake (``-----BEGIN OPENSSH PRIVATE KEY-----``, PEM, PuTTY, a bare
  ``openssh-key-v1`` body): the error says so and never shows the text;
- ``authorized_keys`` lines with options (``command=...``, ``from=...``): plain keys only, since what
  the options would mean in the guest is not this layer's decision;
- DSA keys and certificates.

:class:`KeyFetcher` downloads ``{base}/{user}.keys`` over HTTPS (plain HTTP only to a loopback base
URL, for tests), at most 64 KiB, and caches the validated keys per provider, base URL and user (files
0600 in a 0700 folder, written atomically). A cached copy younger than ``max_age`` is used without any
network access. When the download fails (offline, timeout, TLS failure, server error, an answer that is
not a key list such as a captive portal's page), a cached copy of any age is used with a warning;
without one the error (Unavailable, ``SSH_KEYS_UNREACHABLE``) names the URL and suggests giving the key
inline or from a file. Definite answers are not papered over by the cache: an unknown user (HTTP 404)
and a user with no keys are errors.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import enum
import hashlib
import http.client
import ipaddress
import json
import os
import re
import socket
import ssl
import stat
import tempfile
import time
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from clonebox_core.errors import (
    AlreadyExists,
    CloneboxError,
    FailedPrecondition,
    InvalidArgument,
    Unavailable,
    invalid_field,
)
from clonebox_core.secret import Secret
from clonebox_core.secrets.providers import REASON_NOT_FOUND as REASON_SECRET_NOT_FOUND
from clonebox_core.secrets.providers import read_bounded_file

#: the key types accepted, in the order error messages list them
KEY_TYPES = (
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
    "ssh-rsa",
)
#: the smallest RSA modulus accepted, in bits
MIN_RSA_BITS = 2048
#: a key line longer than this is refused (a 16384-bit RSA key needs under 3000 characters)
MAX_KEY_LINE_CHARS = 16 * 1024
#: a key file, and a downloaded key list, larger than this is refused
MAX_KEYS_BYTES = 64 * 1024
#: the default download deadline, in seconds
DEFAULT_TIMEOUT = 5.0
#: a cached key list younger than this is used without asking the network
DEFAULT_MAX_AGE = timedelta(hours=24)
GITHUB_BASE_URL = "https://github.com"
GITLAB_BASE_URL = "https://gitlab.com"
#: the network providers, by the prefix of their key sources
PROVIDERS = ("github", "gitlab")

# error reasons (stable, machine-readable)
REASON_INVALID = "SSH_KEY_INVALID"
REASON_TYPE_UNSUPPORTED = "SSH_KEY_TYPE_UNSUPPORTED"
REASON_TOO_WEAK = "SSH_KEY_TOO_WEAK"
REASON_IS_PRIVATE = "SSH_KEY_IS_PRIVATE"
REASON_HAS_OPTIONS = "SSH_KEY_HAS_OPTIONS"
REASON_SOURCE_INVALID = "SSH_KEY_SOURCE_INVALID"
REASON_FILE_NOT_FOUND = "SSH_KEY_FILE_NOT_FOUND"
REASON_FILE_UNREADABLE = "SSH_KEY_FILE_UNREADABLE"
REASON_FILE_EXISTS = "SSH_KEY_FILE_EXISTS"
REASON_UNREACHABLE = "SSH_KEYS_UNREACHABLE"
REASON_BAD_RESPONSE = "SSH_KEYS_BAD_RESPONSE"
REASON_USER_NOT_FOUND = "SSH_KEYS_USER_NOT_FOUND"
REASON_NONE = "SSH_KEYS_NONE"
REASON_BASE_URL = "SSH_KEYS_BASE_URL_INVALID"

_CACHE_FORMAT = 1
_MAX_CACHE_BYTES = 4 * MAX_KEYS_BYTES
_USER_AGENT = "clonebox-ssh-keys"
_ECDSA_CURVES = {
    "ecdsa-sha2-nistp256": b"nistp256",
    "ecdsa-sha2-nistp384": b"nistp384",
    "ecdsa-sha2-nistp521": b"nistp521",
    "sk-ecdsa-sha2-nistp256@openssh.com": b"nistp256",
}
_BASE64_RE = re.compile(r"[A-Za-z0-9+/]+={0,2}")
# something shaped like a key type, so it may be named in an error (a random word is not echoed)
_TYPE_LIKE_RE = re.compile(r"[a-z0-9][a-z0-9.@-]{0,63}")
# GitHub: letters, digits and hyphens, no hyphen first or last, at most 39 characters
_GITHUB_USER_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,37}[A-Za-z0-9])?")
# GitLab: letters, digits, '_', '-', '.'; not starting with '-' or '.'; at most 255 characters
_GITLAB_USER_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}")
_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]{0,31}):")
# the base64 of "openssh-key-v1\0", how the body of an OpenSSH private key starts
_OPENSSH_PRIVATE_BODY = "b3BlbnNzaC1rZXktdjE"
_PRIVATE_MARKERS = ("PRIVATE KEY-----", "PuTTY-User-Key-File-", "AGE-SECRET-KEY-1")
_GENERATE_HINT = "generate a new key with: ssh-keygen -t ed25519"

#: returns the current time (timezone-aware); injected by tests
Clock = Callable[[], datetime]


def _utc_now() -> datetime:
    return datetime.now(UTC)


# --- one key line --------------------------------------------------------------------------------


class _KeyProblem(Exception):
    """Why a text is not an acceptable key; turned into an error naming a field by the caller."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class _Key:
    key_type: str
    data: str  # canonical base64
    comment: str

    @property
    def line(self) -> str:
        return f"{self.key_type} {self.data}" + (f" {self.comment}" if self.comment else "")


def _looks_private(text: str) -> bool:
    """Whether ``text`` holds private key material (checked before anything else parses it)."""
    stripped = text.lstrip()
    return any(marker in text for marker in _PRIVATE_MARKERS) or stripped.startswith(_OPENSSH_PRIVATE_BODY)


def _private_problem() -> _KeyProblem:
    return _KeyProblem(
        REASON_IS_PRIVATE,
        "this is a private key (its text is not shown); give the public key instead: the content of the "
        ".pub file beside it, or the output of ssh-keygen -y -f PRIVATE_KEY_FILE",
    )


def _read_string(data: bytes, offset: int) -> tuple[bytes, int]:
    """One SSH wire-format string (uint32 length, bytes) at ``offset``, and the offset after it."""
    if offset + 4 > len(data):
        raise _KeyProblem(REASON_INVALID, "the key data is truncated")
    end = offset + 4 + int.from_bytes(data[offset : offset + 4], "big")
    if end > len(data):
        raise _KeyProblem(REASON_INVALID, "the key data is truncated")
    return data[offset + 4 : end], end


def _clean_comment(text: str) -> str:
    """``text`` without control and format characters (bidi overrides too), with single spaces."""
    kept = "".join(" " if ch.isspace() else ch for ch in text if unicodedata.category(ch) not in ("Cc", "Cf"))
    return " ".join(kept.split())


def _parse_key(text: str) -> _Key:
    """The key on one line of ``text`` (_KeyProblem when it is not an acceptable public key)."""
    text = text.strip()
    if not text:
        raise _KeyProblem(REASON_INVALID, "empty; expected an OpenSSH public key (TYPE BASE64 [COMMENT])")
    if _looks_private(text):
        raise _private_problem()
    if "\n" in text or "\r" in text:
        raise _KeyProblem(REASON_INVALID, "holds more than one line; give one key per entry")
    if len(text) > MAX_KEY_LINE_CHARS:
        raise _KeyProblem(REASON_INVALID, f"longer than {MAX_KEY_LINE_CHARS} characters")
    if text.startswith("---- BEGIN SSH2 PUBLIC KEY"):
        raise _KeyProblem(
            REASON_INVALID,
            "an RFC 4716 (SSH2) public key; convert it to OpenSSH format with: ssh-keygen -i -f FILE",
        )
    parts = text.split(maxsplit=2)
    key_type = parts[0]
    if key_type not in KEY_TYPES:
        if any(token in KEY_TYPES for token in text.split()[1:]):
            raise _KeyProblem(
                REASON_HAS_OPTIONS,
                "starts with authorized_keys options (such as command=, from=, no-pty); give the plain key "
                "(TYPE BASE64 [COMMENT]) without options",
            )
        known = ", ".join(KEY_TYPES)
        if key_type in ("ssh-dss", "ssh-dsa"):
            raise _KeyProblem(
                REASON_TYPE_UNSUPPORTED, f"DSA keys are insecure and disabled in OpenSSH; {_GENERATE_HINT}"
            )
        if "-cert-" in key_type:
            raise _KeyProblem(REASON_TYPE_UNSUPPORTED, f"SSH certificates are not accepted, only plain keys ({known})")
        if _TYPE_LIKE_RE.fullmatch(key_type) and "-" in key_type:
            raise _KeyProblem(REASON_TYPE_UNSUPPORTED, f"unsupported key type {key_type!r}; supported: {known}")
        raise _KeyProblem(
            REASON_INVALID, f"not an OpenSSH public key (expected TYPE BASE64 [COMMENT], TYPE one of {known})"
        )
    if len(parts) < 2:
        raise _KeyProblem(REASON_INVALID, f"no key data after {key_type!r}")
    if not _BASE64_RE.fullmatch(parts[1]):
        raise _KeyProblem(REASON_INVALID, "the key data is not base64")
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except binascii.Error:
        raise _KeyProblem(REASON_INVALID, "the key data is not valid base64") from None
    embedded, offset = _read_string(blob, 0)
    if embedded != key_type.encode():
        shown = embedded[:64].decode("ascii", "replace")
        raise _KeyProblem(REASON_INVALID, f"the line says {key_type!r} but its key data is a {shown!r} key")
    curve = _ECDSA_CURVES.get(key_type)
    if curve is not None and _read_string(blob, offset)[0] != curve:
        raise _KeyProblem(REASON_INVALID, f"the key data is not on the curve {key_type!r} names")
    data = base64.b64encode(blob).decode("ascii")
    try:
        public_key = serialization.load_ssh_public_key(f"{key_type} {data}".encode("ascii"))
    except (ValueError, UnsupportedAlgorithm):
        raise _KeyProblem(REASON_INVALID, "the key data is corrupt") from None
    if isinstance(public_key, rsa.RSAPublicKey) and public_key.key_size < MIN_RSA_BITS:
        raise _KeyProblem(
            REASON_TOO_WEAK,
            f"RSA key of {public_key.key_size} bits; at least {MIN_RSA_BITS} are needed ({_GENERATE_HINT})",
        )
    return _Key(key_type, data, _clean_comment(parts[2]) if len(parts) > 2 else "")


def parse_public_key(line: str, *, field: str) -> str:
    """The normalised form of the OpenSSH public key ``line`` (``TYPE BASE64 [COMMENT]``).

    Normalised: single spaces, canonical base64, the comment kept but without control characters.
    InvalidArgument naming ``field`` (``metadata['field']``) when the line is not an acceptable key:
    reasons ``SSH_KEY_INVALID``, ``SSH_KEY_TYPE_UNSUPPORTED``, ``SSH_KEY_TOO_WEAK`` (RSA under 2048
    bits), ``SSH_KEY_HAS_OPTIONS`` (an ``authorized_keys`` line with options) and ``SSH_KEY_IS_PRIVATE``
    (a private key, whose text the error never shows).
    """
    if not isinstance(line, str):
        raise invalid_field(field, f"expected a string, got {type(line).__name__}", reason=REASON_INVALID)
    try:
        return _parse_key(line).line
    except _KeyProblem as problem:
        raise invalid_field(field, problem.message, reason=problem.reason) from None


def key_identity(line: str) -> tuple[str, str]:
    """``(TYPE, BASE64)`` of a normalised key line: two lines with the same identity are the same key."""
    key_type, data, *_ = line.split(" ", 2)
    return key_type, data


def key_fingerprint(line: str) -> str:
    """The ``SHA256:...`` fingerprint of a key line, as ``ssh-keygen -l`` prints it."""
    _, data = key_identity(line)
    digest = hashlib.sha256(base64.b64decode(data)).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


# --- results -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResolvedKeys:
    """Public key lines (normalised, deduplicated, in order) and warnings for the user."""

    keys: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


def _merge(parts: Iterable[ResolvedKeys]) -> ResolvedKeys:
    keys: dict[tuple[str, str], str] = {}
    warnings: dict[str, None] = {}
    for part in parts:
        for key in part.keys:
            keys.setdefault(key_identity(key), key)
        warnings.update(dict.fromkeys(part.warnings))
    return ResolvedKeys(tuple(keys.values()), tuple(warnings))


# --- the network providers -----------------------------------------------------------------------


class _NotFound(Exception):
    pass


class _Failed(Exception):
    """The download failed in a way a cached copy may stand in for."""

    def __init__(self, why: str, *, reason: str = REASON_UNREACHABLE) -> None:
        super().__init__(why)
        self.why = why
        self.reason = reason


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_base_url(url: str, field: str) -> str:
    """``url`` without a trailing ``/``; InvalidArgument unless HTTPS (or HTTP to a loopback address)."""
    parts = urllib.parse.urlsplit(url)
    plain_loopback = parts.scheme == "http" and _is_loopback(parts.hostname)
    if parts.scheme != "https" and not plain_loopback:
        raise invalid_field(field, "must be an https:// URL", reason=REASON_BASE_URL)
    if not parts.hostname or parts.username is not None or parts.password is not None:
        raise invalid_field(field, "must name a host and no user or password", reason=REASON_BASE_URL)
    if parts.query or parts.fragment:
        raise invalid_field(field, "must have no query or fragment", reason=REASON_BASE_URL)
    return url.rstrip("/")


def _user_problem(provider: str, user: str) -> str | None:
    """Why ``user`` is not a valid user name on ``provider`` (None if it is)."""
    if provider == "github":
        if not _GITHUB_USER_RE.fullmatch(user):
            return "not a GitHub user name (letters, digits and single hyphens, at most 39 characters)"
        return None
    if not _GITLAB_USER_RE.fullmatch(user) or user.endswith((".", ".git", ".atom")):
        return "not a GitLab user name (letters, digits, '_', '-' and '.', at most 255 characters)"
    return None


class _SafeRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects to HTTPS only (and to loopback HTTP when the base URL is loopback HTTP)."""

    def __init__(self, *, allow_loopback_http: bool) -> None:
        self._allow_loopback_http = allow_loopback_http

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: Any,
        code: int,
        msg: str,
        headers: Any,
        newurl: str,
    ) -> urllib.request.Request | None:
        parts = urllib.parse.urlsplit(newurl)
        if parts.scheme != "https" and not (
            self._allow_loopback_http and parts.scheme == "http" and _is_loopback(parts.hostname)
        ):
            raise urllib.error.URLError(f"refused a redirect to a non-HTTPS URL ({parts.scheme}://{parts.netloc})")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _describe(exc: BaseException, timeout: float) -> str:
    """A short, human description of why a download failed."""
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        inner = exc.reason
        if isinstance(inner, BaseException):
            return _describe(inner, timeout)
        return str(inner)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate verification failed ({exc.verify_message})"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed ({exc.reason or exc})"
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return f"the host name cannot be resolved ({exc.strerror})"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[:1].lower() + exc.strerror[1:]
    return type(exc).__name__


def _age_text(age: timedelta) -> str:
    seconds = max(0, int(age.total_seconds()))
    if seconds < 120:
        return f"{seconds} seconds"
    if seconds < 2 * 3600:
        return f"{seconds // 60} minutes"
    if seconds < 2 * 86400:
        return f"{seconds // 3600} hours"
    return f"{seconds // 86400} days"


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/clonebox/ssh-keys`` (``~/.cache/clonebox/ssh-keys``)."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".cache"
    return root / "clonebox" / "ssh-keys"


@dataclass(frozen=True)
class _Cached:
    keys: tuple[str, ...]
    skipped: tuple[str, ...]
    fetched_at: datetime


class KeyFetcher:
    """Fetches (and caches) the public keys GitHub and GitLab publish for a user.

    ``timeout`` bounds each download as a whole (seconds). ``ssl_context`` replaces the default
    (system trust store) context, for a private GitLab's CA. ``clock`` returns the current time
    (timezone-aware); the cache's age is measured with it.
    """

    def __init__(
        self,
        *,
        github_base_url: str = GITHUB_BASE_URL,
        gitlab_base_url: str = GITLAB_BASE_URL,
        timeout: float = DEFAULT_TIMEOUT,
        cache_dir: Path | None = None,
        max_age: timedelta = DEFAULT_MAX_AGE,
        ssl_context: ssl.SSLContext | None = None,
        clock: Clock = _utc_now,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self._bases = {
            "github": _check_base_url(github_base_url, "github_base_url"),
            "gitlab": _check_base_url(gitlab_base_url, "gitlab_base_url"),
        }
        self._timeout = timeout
        self._cache_dir = cache_dir if cache_dir is not None else default_cache_dir()
        self._max_age = max_age
        self._ssl_context = ssl_context
        self._clock = clock

    def __repr__(self) -> str:
        return f"KeyFetcher(github={self._bases['github']!r}, gitlab={self._bases['gitlab']!r})"

    def url(self, provider: str, user: str) -> str:
        """The URL of ``user``'s key list on ``provider`` (``github`` or ``gitlab``)."""
        return f"{self._base(provider)}/{urllib.parse.quote(user, safe='')}.keys"

    def fetch(self, provider: str, user: str) -> ResolvedKeys:
        """The public keys ``provider`` (``github`` or ``gitlab``) publishes for ``user``.

        Errors: InvalidArgument ``SSH_KEY_SOURCE_INVALID`` (not a user name), ``SSH_KEYS_USER_NOT_FOUND``
        (HTTP 404), ``SSH_KEYS_NONE`` (no usable key); Unavailable ``SSH_KEYS_UNREACHABLE`` or
        ``SSH_KEYS_BAD_RESPONSE`` when the download fails and nothing is cached. Keys of a type this
        module does not accept (or RSA keys under 2048 bits) are skipped with a warning.
        """
        base = self._base(provider)
        problem = _user_problem(provider, user)
        if problem is not None:
            raise InvalidArgument(f"{provider}:{user[:64]!r}: {problem}", reason=REASON_SOURCE_INVALID)
        url = self.url(provider, user)
        source = f"{provider}:{user}"
        cache_path = self._cache_path(provider, base, user)
        cached = self._read_cache(cache_path, provider, base, user)
        now = self._clock()
        if cached is not None and timedelta(0) <= now - cached.fetched_at <= self._max_age:
            return ResolvedKeys(cached.keys, cached.skipped)
        try:
            keys, skipped = self._parse_body(self._download(url), source)
        except _NotFound:
            raise InvalidArgument(
                f"{source}: {url} answered 404: there is no such {_title(provider)} user",
                reason=REASON_USER_NOT_FOUND,
                metadata={"url": url, "user": user},
            ) from None
        except _Failed as exc:
            if cached is not None:
                stale = (
                    f"{source}: cannot fetch {url} ({exc.why}); using the keys cached "
                    f"{_age_text(now - cached.fetched_at)} ago"
                )
                return ResolvedKeys(cached.keys, (*cached.skipped, stale))
            hint = "are you offline?" if exc.reason == REASON_UNREACHABLE else "a proxy or captive portal?"
            raise Unavailable(
                f"{source}: cannot fetch {url} ({exc.why}; {hint}); nothing is cached. Give the key inline "
                "(the content of ~/.ssh/id_ed25519.pub) or from a file (file:~/.ssh/id_ed25519.pub) instead",
                reason=exc.reason,
                metadata={"url": url, "user": user},
            ) from None
        if not keys:
            why = f" ({'; '.join(skipped)})" if skipped else ""
            raise InvalidArgument(
                f"{source}: {_title(provider)} user {user} has no usable SSH key at {url}{why}; add one to "
                "the account or give the key inline or from a file",
                reason=REASON_NONE,
                metadata={"url": url, "user": user},
            )
        warning = self._write_cache(
            cache_path,
            {
                "format": _CACHE_FORMAT,
                "provider": provider,
                "base_url": base,
                "user": user,
                "url": url,
                "fetched_at": now.isoformat(),
                "keys": list(keys),
                "skipped": list(skipped),
            },
        )
        return ResolvedKeys(keys, (*skipped, *((warning,) if warning else ())))

    # -- helpers --

    def _base(self, provider: str) -> str:
        try:
            return self._bases[provider]
        except KeyError:
            raise ValueError(f"unknown key provider {provider!r}; known: {', '.join(PROVIDERS)}") from None

    def _opener(self, url: str) -> urllib.request.OpenerDirector:
        parts = urllib.parse.urlsplit(url)
        loopback_http = parts.scheme == "http" and _is_loopback(parts.hostname)
        context = self._ssl_context if self._ssl_context is not None else ssl.create_default_context()
        handlers: list[urllib.request.BaseHandler] = [
            urllib.request.HTTPSHandler(context=context),
            _SafeRedirects(allow_loopback_http=loopback_http),
        ]
        if _is_loopback(parts.hostname):
            handlers.append(urllib.request.ProxyHandler({}))  # never send loopback traffic to a proxy
        return urllib.request.build_opener(*handlers)

    def _download(self, url: str) -> bytes:
        """The body at ``url`` (200), _NotFound (404) or _Failed (anything else)."""
        request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT, "Accept": "text/plain"})
        deadline = time.monotonic() + self._timeout
        try:
            with cast(http.client.HTTPResponse, self._opener(url).open(request, timeout=self._timeout)) as resp:
                length = resp.headers.get("Content-Length")
                if length is not None and length.isdigit() and int(length) > MAX_KEYS_BYTES:
                    raise _Failed(f"the answer is larger than {MAX_KEYS_BYTES} bytes", reason=REASON_BAD_RESPONSE)
                chunks: list[bytes] = []
                size = 0
                while size <= MAX_KEYS_BYTES:
                    if time.monotonic() > deadline:
                        raise _Failed(f"no complete answer within {self._timeout:g} s")
                    chunk = resp.read(min(16 * 1024, MAX_KEYS_BYTES + 1 - size))
                    if not chunk:
                        break
                    chunks.append(chunk)
                    size += len(chunk)
                if size > MAX_KEYS_BYTES:
                    raise _Failed(f"the answer is larger than {MAX_KEYS_BYTES} bytes", reason=REASON_BAD_RESPONSE)
                return b"".join(chunks)
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code == 404:
                raise _NotFound from None
            raise _Failed(f"HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
            raise _Failed(_describe(exc, self._timeout)) from None

    @staticmethod
    def _parse_body(body: bytes, source: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The keys in a downloaded key list and warnings for the ones skipped; _Failed if it is not one."""
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise _Failed("the answer is not UTF-8 text", reason=REASON_BAD_RESPONSE) from None
        keys: dict[tuple[str, str], str] = {}
        skipped: list[str] = []
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            try:
                key = _parse_key(line)
            except _KeyProblem as problem:
                if problem.reason in (REASON_TYPE_UNSUPPORTED, REASON_TOO_WEAK):
                    skipped.append(f"{source}: skipped key {number}: {problem.message}")
                    continue
                raise _Failed(
                    f"line {number} of the answer is not an OpenSSH public key", reason=REASON_BAD_RESPONSE
                ) from None
            keys.setdefault((key.key_type, key.data), key.line)
        return tuple(keys.values()), tuple(skipped)

    def _cache_path(self, provider: str, base: str, user: str) -> Path:
        # user names are case-insensitive on both providers
        digest = hashlib.sha256(f"{provider}\0{base}\0{user.lower()}".encode()).hexdigest()[:32]
        return self._cache_dir / f"{provider}-{digest}.json"

    @staticmethod
    def _read_cache(path: Path, provider: str, base: str, user: str) -> _Cached | None:
        """The cached keys at ``path`` if the file is ours, intact and for this user (else None)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            # a cache others can write could put their keys into our VMs
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
                return None
            if st.st_size > _MAX_CACHE_BYTES:
                return None
            with os.fdopen(os.dup(fd), "rb") as f:
                doc = json.loads(f.read(_MAX_CACHE_BYTES + 1))
            if not (
                isinstance(doc, dict)
                and doc.get("format") == _CACHE_FORMAT
                and doc.get("provider") == provider
                and doc.get("base_url") == base
                and isinstance(doc.get("user"), str)
                and doc["user"].lower() == user.lower()
                and isinstance(doc.get("keys"), list)
                and isinstance(doc.get("skipped"), list)
                and isinstance(doc.get("fetched_at"), str)
            ):
                return None
            fetched_at = datetime.fromisoformat(doc["fetched_at"])
            if fetched_at.tzinfo is None:
                return None
            keys = tuple(_parse_key(k).line for k in doc["keys"] if isinstance(k, str))
            if not keys or len(keys) != len(doc["keys"]):
                return None
            skipped = tuple(s for s in doc["skipped"] if isinstance(s, str))
            return _Cached(keys, skipped, fetched_at)
        except (OSError, ValueError, _KeyProblem):
            return None
        finally:
            os.close(fd)

    def _write_cache(self, path: Path, doc: dict[str, object]) -> str | None:
        """Write ``doc`` to ``path`` atomically (0600, folder 0700); a warning when it cannot be."""
        folder = path.parent
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = os.lstat(folder)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
                return f"not caching SSH keys: {folder} is not a folder owned by this user"
            if stat.S_IMODE(st.st_mode) != 0o700:
                os.chmod(folder, 0o700)
            fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=folder)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(doc, f, indent=1)
                    f.write("\n")
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            _fsync_dir(folder)
        except OSError as exc:
            return f"not caching SSH keys in {folder}: {exc.strerror or exc}"
        return None


def _title(provider: str) -> str:
    return {"github": "GitHub", "gitlab": "GitLab"}.get(provider, provider)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- key sources ---------------------------------------------------------------------------------


class KeySourceKind(enum.StrEnum):
    """Where the keys of one ``auth.ssh_keys`` entry come from."""

    GITHUB = "github"
    GITLAB = "gitlab"
    INLINE = "inline"
    FILE = "file"


_SOURCE_HINT = (
    "expected github:USER, gitlab:USER, an OpenSSH public key (ssh-ed25519 AAAA...), "
    "file:PATH or a path such as ~/.ssh/id_ed25519.pub"
)


@dataclass(frozen=True)
class KeySource:
    """One parsed ``auth.ssh_keys`` entry.

    ``value`` is the user name (``github``, ``gitlab``), the normalised key line (``inline``) or the
    absolute path (``file``).
    """

    kind: KeySourceKind
    value: str

    def __str__(self) -> str:
        if self.kind is KeySourceKind.INLINE:
            return f"{self.value.split(' ', 1)[0]} {key_fingerprint(self.value)}"
        return f"{self.kind.value}:{self.value}"

    @classmethod
    def parse(cls, entry: str, *, base_dir: Path | None = None, field: str = "auth.ssh_keys") -> KeySource:
        """The source ``entry`` names; InvalidArgument naming ``field`` when it names none.

        Relative paths are resolved against ``base_dir`` (default: the working directory). An inline
        key is validated here (:func:`parse_public_key`); files and users are read by :meth:`load`.
        """
        if not isinstance(entry, str):
            raise invalid_field(field, f"expected a string, got {type(entry).__name__}", reason=REASON_SOURCE_INVALID)
        text = entry.strip()
        if not text:
            raise invalid_field(field, f"empty; {_SOURCE_HINT}", reason=REASON_SOURCE_INVALID)
        if _looks_private(text):
            problem = _private_problem()
            raise invalid_field(field, problem.message, reason=problem.reason)
        scheme_match = _SCHEME_RE.match(text)
        scheme = scheme_match.group(1).lower() if scheme_match else ""
        if scheme in PROVIDERS:
            user = text[len(scheme) + 1 :]
            problem_text = _user_problem(scheme, user)
            if problem_text is not None:
                shown = repr(user) if len(user) <= 64 and user.isprintable() else "(not shown)"
                raise invalid_field(field, f"{shown} is {problem_text}", reason=REASON_SOURCE_INVALID)
            return cls(KeySourceKind(scheme), user)
        if scheme == "file":
            return cls(KeySourceKind.FILE, str(_source_path(text[5:], base_dir, field)))
        first = text.split(maxsplit=1)[0]
        tokens = text.split()
        # one word starting with ssh- may be a path (ssh-keys/id.pub); a type and more words are a key
        looks_like_key = first in KEY_TYPES or (
            len(tokens) > 1
            and (any(token in KEY_TYPES for token in tokens) or first.startswith(("ssh-", "ecdsa-", "sk-")))
        )
        if looks_like_key:
            return cls(KeySourceKind.INLINE, parse_public_key(text, field=field))
        if scheme_match:  # https://..., gh:alice; a path with a colon can be written file:PATH
            raise invalid_field(
                field, f"unknown key source {scheme + ':'!r}; {_SOURCE_HINT}", reason=REASON_SOURCE_INVALID
            )
        if text.startswith(("/", "~", ".")) or "/" in text or text.endswith(".pub"):
            return cls(KeySourceKind.FILE, str(_source_path(text, base_dir, field)))
        # not echoed: it is no key, no path and no user, and might be something pasted by mistake
        raise invalid_field(
            field,
            f"not a key source (a bare word is neither a user nor a path: write github:NAME for a GitHub user, "
            f"./NAME for a file); {_SOURCE_HINT}",
            reason=REASON_SOURCE_INVALID,
        )

    def load(self, *, fetcher: KeyFetcher, field: str = "auth.ssh_keys") -> ResolvedKeys:
        """The keys this source names; errors name ``field``."""
        if self.kind is KeySourceKind.INLINE:
            return ResolvedKeys((self.value,))
        if self.kind is KeySourceKind.FILE:
            return ResolvedKeys(read_key_file(Path(self.value), field=field))
        try:
            return fetcher.fetch(self.kind.value, self.value)
        except CloneboxError as exc:
            raise type(exc)(
                f"{field}: {exc.message}", reason=exc.reason, metadata={**exc.metadata, "field": field}
            ) from exc


def _source_path(text: str, base_dir: Path | None, field: str) -> Path:
    if not text:
        raise invalid_field(field, "'file:' names no path", reason=REASON_SOURCE_INVALID)
    if "\0" in text:
        raise invalid_field(field, "the path contains a NUL character", reason=REASON_SOURCE_INVALID)
    expanded = os.path.expanduser(text)
    if expanded.startswith("~"):
        raise invalid_field(field, f"cannot expand {text.split('/', 1)[0]!r} in the path", reason=REASON_SOURCE_INVALID)
    path = Path(expanded)
    if not path.is_absolute():
        path = (base_dir if base_dir is not None else Path.cwd()) / path
    return Path(os.path.normpath(path))


def read_key_file(path: Path, *, field: str = "auth.ssh_keys") -> tuple[str, ...]:
    """The keys in the file ``path``: one a line, ``#`` comments and blank lines skipped.

    The file must be a regular file of at most 64 KiB holding at least one key; every other line must
    be an acceptable public key (:func:`parse_public_key`; errors name ``field``, the path and the
    line number). A private key is refused without showing it.
    """
    meta = {"field": field, "path": str(path)}
    text = _read_text(path, field)
    if _looks_private(text):
        sibling = path.with_name(path.name + ".pub")
        hint = f"; did you mean {sibling}?" if sibling.is_file() else ""
        raise InvalidArgument(
            f"{field}: {path} is a private key (its content is not shown); give the public key "
            f"(the .pub file, or the output of ssh-keygen -y -f {path}){hint}",
            reason=REASON_IS_PRIVATE,
            metadata=meta,
        )
    keys: dict[tuple[str, str], str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            key = _parse_key(line)
        except _KeyProblem as problem:
            raise InvalidArgument(
                f"{field}: {path}, line {number}: {problem.message}",
                reason=problem.reason,
                metadata={**meta, "line": str(number)},
            ) from None
        keys.setdefault((key.key_type, key.data), key.line)
    if not keys:
        raise InvalidArgument(f"{field}: {path} holds no SSH public key", reason=REASON_NONE, metadata=meta)
    return tuple(keys.values())


def _read_text(path: Path, field: str) -> str:
    meta = {"field": field, "path": str(path)}
    try:
        data = read_bounded_file(path, what=f"{field}: key file", max_bytes=MAX_KEYS_BYTES)
    except FailedPrecondition as exc:
        # the one reader of bounded files; key files keep their own reasons (missing vs unreadable)
        reason = REASON_FILE_NOT_FOUND if exc.reason == REASON_SECRET_NOT_FOUND else REASON_FILE_UNREADABLE
        raise FailedPrecondition(exc.message, reason=reason, metadata=meta) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        # ``from None``: the exception carries the bytes (which could be key material)
        raise FailedPrecondition(
            f"{field}: key file {path} is not UTF-8 text", reason=REASON_FILE_UNREADABLE, metadata=meta
        ) from None


def resolve_ssh_keys(
    entries: Sequence[str],
    *,
    fetcher: KeyFetcher,
    base_dir: Path | None,
    field: str = "auth.ssh_keys",
) -> ResolvedKeys:
    """The public keys all ``entries`` name, deduplicated by type and key data, in order.

    Each error names its entry (``auth.ssh_keys[2]``, in ``metadata['field']`` too). A network user
    named twice is fetched once.
    """
    if isinstance(entries, str):
        raise TypeError("entries is a sequence of key sources, not one string")
    parts: list[ResolvedKeys] = []
    fetched: dict[tuple[KeySourceKind, str], ResolvedKeys] = {}
    for index, entry in enumerate(entries):
        entry_field = f"{field}[{index}]"
        source = KeySource.parse(entry, base_dir=base_dir, field=entry_field)
        memo_key = (source.kind, source.value.lower())
        if source.kind in (KeySourceKind.GITHUB, KeySourceKind.GITLAB) and memo_key in fetched:
            parts.append(fetched[memo_key])
            continue
        part = source.load(fetcher=fetcher, field=entry_field)
        fetched[memo_key] = part
        parts.append(part)
    return _merge(parts)


# --- generated key pairs -------------------------------------------------------------------------


def generate_ed25519_keypair(comment: str) -> tuple[Secret, str]:
    """A new ed25519 key pair: the private key (OpenSSH format, unencrypted) and the public key line.

    ``comment`` ends the public line (control characters removed); the private key carries none.
    """
    private_key = Ed25519PrivateKey.generate()
    private_text = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    ).decode("ascii")
    public = private_key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    cleaned = _clean_comment(comment)
    line = public.decode("ascii") + (f" {cleaned}" if cleaned else "")
    return Secret(private_text), line


def write_private_key(path: Path, key: Secret) -> None:
    """Create ``path`` (mode 0600) holding ``key``; never overwrites and never follows a symlink.

    A missing parent folder is created with mode 0700. The file is fsynced (and the folder), and removed
    again if writing fails. AlreadyExists ``SSH_KEY_FILE_EXISTS`` when anything is at ``path``.
    """
    if not isinstance(key, Secret):
        raise TypeError("write_private_key takes the key as a Secret")
    data = key.reveal().encode("utf-8")
    if not data.endswith(b"\n"):
        data += b"\n"
    folder = path.parent
    if not folder.exists():
        folder.mkdir(mode=0o700, parents=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise AlreadyExists(
            f"{path} exists already; not overwriting a key file (move it away or choose another path)",
            reason=REASON_FILE_EXISTS,
            metadata={"path": str(path)},
        ) from None
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)
    _fsync_dir(folder)
