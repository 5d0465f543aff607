"""Password hashing for cloud-init and one-time passwords.

:func:`sha512_crypt` implements SHA-512-crypt (``$6$``), Ulrich Drepper's "Unix crypt using SHA-256
and SHA-512" (https://www.akkadia.org/drepper/SHA-crypt.txt), with :mod:`hashlib` only: cloud-init's
``passwd`` / ``hashed_passwd`` take such hashes, and Python's ``crypt`` module is deprecated (PEP 594,
removed in 3.13). The tests check it against the specification's vectors and ``openssl passwd -6``.
"""

from __future__ import annotations

import hashlib
import re
import secrets

from clonebox_core.errors import invalid_field
from clonebox_core.secret import Secret

#: the crypt(3) base-64 alphabet (also the alphabet of salts)
CRYPT_ALPHABET = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
SALT_CHARS = 16
DEFAULT_ROUNDS = 5000
MIN_ROUNDS = 1000
MAX_ROUNDS = 999_999_999

#: one-time-password alphabet: no 0/O/o, 1/l/I/i (easy to misread or mistype)
OTP_ALPHABET = "23456789abcdefghjkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ"
OTP_MIN_CHARS = 16
OTP_GROUP = 4

_SALT_RE = re.compile(r"[./0-9A-Za-z]{1,16}")

# the byte order of the final encoding (the specification's table for SHA-512)
_PERMUTATION = (
    (0, 21, 42),
    (22, 43, 1),
    (44, 2, 23),
    (3, 24, 45),
    (25, 46, 4),
    (47, 5, 26),
    (6, 27, 48),
    (28, 49, 7),
    (50, 8, 29),
    (9, 30, 51),
    (31, 52, 10),
    (53, 11, 32),
    (12, 33, 54),
    (34, 55, 13),
    (56, 14, 35),
    (15, 36, 57),
    (37, 58, 16),
    (59, 17, 38),
    (18, 39, 60),
    (40, 61, 19),
    (62, 20, 41),
)


def random_salt() -> str:
    """16 characters of the crypt alphabet, from :mod:`secrets` (96 bits)."""
    return "".join(secrets.choice(CRYPT_ALPHABET) for _ in range(SALT_CHARS))


def sha512_crypt(password: Secret, salt: str | None = None, *, rounds: int | None = None) -> str:
    """The SHA-512-crypt hash of ``password``: ``$6$SALT$HASH``, or ``$6$rounds=N$SALT$HASH``.

    ``salt``: 1-16 characters of ``[./0-9A-Za-z]``; random (16 characters) when omitted.
    ``rounds``: 1000-999999999; when omitted the default 5000 is used and not written into the hash,
    when given it is written even if it is 5000 (as the specification does).
    """
    if not isinstance(password, Secret):
        raise TypeError("sha512_crypt takes a Secret")
    value = password.reveal()
    if "\0" in value:
        # crypt(3) would silently cut the password at the NUL; the value itself is not echoed
        raise invalid_field("password", "must not contain a NUL character")
    if salt is None:
        salt = random_salt()
    elif not _SALT_RE.fullmatch(salt):
        raise invalid_field("salt", "must be 1 to 16 characters of [./0-9A-Za-z]")
    if rounds is not None and (isinstance(rounds, bool) or not MIN_ROUNDS <= rounds <= MAX_ROUNDS):
        raise invalid_field("rounds", f"must be between {MIN_ROUNDS} and {MAX_ROUNDS}")
    digest = _sha512_crypt_digest(value.encode("utf-8"), salt.encode("ascii"), rounds or DEFAULT_ROUNDS)
    prefix = "$6$" if rounds is None else f"$6$rounds={rounds}$"
    return f"{prefix}{salt}${_encode(digest)}"


def _sha512_crypt_digest(p: bytes, s: bytes, rounds: int) -> bytes:
    """Steps 1-21 of the specification: the 64-byte result before encoding."""
    n = len(p)
    # digest B (steps 4-8)
    b = hashlib.sha512(p + s + p).digest()
    # digest A (steps 1-3, 9-12)
    a = hashlib.sha512(p + s)
    for _ in range(n // 64):
        a.update(b)
    a.update(b[: n % 64])
    i = n
    while i > 0:
        a.update(b if i & 1 else p)
        i >>= 1
    a_digest = a.digest()
    # byte sequence P (steps 13-16)
    dp = hashlib.sha512(p * n).digest()
    p_seq = (dp * (n // 64 + 1))[:n]
    # byte sequence S (steps 17-20)
    ds = hashlib.sha512(s * (16 + a_digest[0])).digest()
    s_seq = (ds * (len(s) // 64 + 1))[: len(s)]
    # the rounds (step 21)
    c = a_digest
    for r in range(rounds):
        h = hashlib.sha512(p_seq if r & 1 else c)
        if r % 3:
            h.update(s_seq)
        if r % 7:
            h.update(p_seq)
        h.update(c if r & 1 else p_seq)
        c = h.digest()
    return c


def _encode(digest: bytes) -> str:
    """Step 22: crypt's base-64 of the permuted digest (86 characters)."""
    out: list[str] = []

    def b64(b2: int, b1: int, b0: int, chars: int) -> None:
        w = (b2 << 16) | (b1 << 8) | b0
        for _ in range(chars):
            out.append(CRYPT_ALPHABET[w & 0x3F])
            w >>= 6

    for x, y, z in _PERMUTATION:
        b64(digest[x], digest[y], digest[z], 4)
    b64(0, 0, digest[63], 2)
    return "".join(out)


def one_time_password(chars: int = 20) -> Secret:
    """A random password of ``chars`` (at least 16) unambiguous characters, grouped by 4 with dashes.

    The default (20 characters of a 55-character alphabet) carries about 115 bits of entropy; the
    dashes are for reading it aloud or typing it, and part of the password.
    """
    if isinstance(chars, bool) or chars < OTP_MIN_CHARS:
        raise invalid_field("chars", f"a one-time password has at least {OTP_MIN_CHARS} characters")
    raw = "".join(secrets.choice(OTP_ALPHABET) for _ in range(chars))
    return Secret("-".join(raw[i : i + OTP_GROUP] for i in range(0, chars, OTP_GROUP)))
