"""SHA-512-crypt against the specification's vectors and openssl; one-time passwords."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from clonebox_core.errors import InvalidArgument
from clonebox_core.secret import Secret
from clonebox_core.secrets.passwords import (
    CRYPT_ALPHABET,
    OTP_ALPHABET,
    one_time_password,
    random_salt,
    sha512_crypt,
)

pytestmark = pytest.mark.unit

# vectors from https://www.akkadia.org/drepper/SHA-crypt.txt (SHA-512 section); salts longer than 16
# characters are truncated by the specification, so the truncated salt is passed here
SPEC_VECTORS = [
    (
        "Hello world!",
        "saltstring",
        None,
        "$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI68u4OTLiBFdcbYEdFCoEOfaS35inz1",
    ),
    (
        "Hello world!",
        "saltstringsaltst",
        10000,
        "$6$rounds=10000$saltstringsaltst$OW1/O6BYHV6BcXZu8QVeXbDWra3Oeqh0sbHbbMCVNSnCM/UrjmM0Dp8vOuZeHBy/YTBmSK6H9qs/y3RnOaw5v.",
    ),
    (
        "This is just a test",
        "toolongsaltstrin",
        5000,
        "$6$rounds=5000$toolongsaltstrin$lQ8jolhgVRVhY4b5pZKaysCLi0QBxGoNeKQzQ3glMhwllF7oGDZxUhx1yxdYcz/e1JSbq3y6JMxxl8audkUEm0",
    ),
    (
        "a very much longer text to encrypt.  This one even stretches over morethan one line.",
        "anotherlongsalts",
        1400,
        "$6$rounds=1400$anotherlongsalts$POfYwTEok97VWcjxIiSOjiykti.o/pQs.wPvMxQ6Fm7I6IoYN3CmLs66x9t0oSwbtEW7o7UmJEiDwGqd8p4ur1",
    ),
    (
        "we have a short salt string but not a short password",
        "short",
        77777,
        "$6$rounds=77777$short$WuQyW2YR.hBNpjjRhpYD/ifIw05xdfeEyQoMxIXbkvr0gge1a1x3yRULJ5CCaUeOxFmtlcGZelFl5CxtgfiAc0",
    ),
    (
        "a short string",
        "asaltof16chars..",
        123456,
        "$6$rounds=123456$asaltof16chars..$BtCwjqMJGx5hrJhZywWvt0RLE8uZ4oPwcelCjmw2kSYu.Ec6ycULevoBK25fs2xXgMNrCzIMVcgEJAstJeonj1",
    ),
]


@pytest.mark.parametrize(("password", "salt", "rounds", "expected"), SPEC_VECTORS)
def test_sha512_crypt_matches_the_specification_vectors(
    password: str, salt: str, rounds: int | None, expected: str
) -> None:
    assert sha512_crypt(Secret(password), salt, rounds=rounds) == expected


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
# openssl prints "<NULL>" for an empty line on stdin, so the empty password is not compared here
@pytest.mark.parametrize("password", ["Hello world!", "ünïcödé pässwörd", "x" * 64, "y" * 150, "a$b:c d"])
def test_sha512_crypt_matches_openssl(password: str) -> None:
    salt = random_salt()
    proc = subprocess.run(
        ["openssl", "passwd", "-6", "-salt", salt, "-stdin"],
        input=password.encode() + b"\n",
        capture_output=True,
        check=True,
    )
    assert sha512_crypt(Secret(password), salt) == proc.stdout.decode().strip()


def test_sha512_crypt_random_salt_shape_and_uniqueness() -> None:
    pw = Secret("same password")
    first, second = sha512_crypt(pw), sha512_crypt(pw)
    assert first != second
    for hashed in (first, second):
        m = re.fullmatch(r"\$6\$([./0-9A-Za-z]{16})\$([./0-9A-Za-z]{86})", hashed)
        assert m is not None, hashed
    assert all(c in CRYPT_ALPHABET for c in random_salt())
    assert len(random_salt()) == 16


def test_sha512_crypt_explicit_default_rounds_are_written() -> None:
    assert sha512_crypt(Secret("pw"), "abc", rounds=5000).startswith("$6$rounds=5000$abc$")
    # same digest as the implicit default
    assert (
        sha512_crypt(Secret("pw"), "abc", rounds=5000).rsplit("$", 1)[1]
        == sha512_crypt(Secret("pw"), "abc").rsplit("$", 1)[1]
    )


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"salt": ""}, "salt"),
        ({"salt": "has$dollar"}, "salt"),
        ({"salt": "seventeen-chars-x"}, "salt"),
        ({"salt": "abc", "rounds": 999}, "rounds"),
        ({"salt": "abc", "rounds": 1_000_000_000}, "rounds"),
    ],
)
def test_sha512_crypt_rejects_bad_parameters(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        sha512_crypt(Secret("pw"), **kwargs)  # type: ignore[arg-type]
    assert info.value.metadata["field"] == field


def test_sha512_crypt_rejects_nul_without_echoing_the_password() -> None:
    with pytest.raises(InvalidArgument) as info:
        sha512_crypt(Secret("canary-\0-value"))
    assert "canary" not in str(info.value) and "canary" not in repr(info.value)


def test_sha512_crypt_takes_only_a_secret() -> None:
    with pytest.raises(TypeError):
        sha512_crypt("plain")  # type: ignore[arg-type]


def test_one_time_password_shape() -> None:
    otp = one_time_password()
    assert isinstance(otp, Secret)
    assert str(otp) == "***" and "***" in repr(otp)
    value = otp.reveal()
    assert re.fullmatch(r"[^-]{4}(-[^-]{4}){4}", value), value
    raw = value.replace("-", "")
    assert len(raw) == 20
    assert set(raw) <= set(OTP_ALPHABET)
    assert not set(raw) & set("0O1lIio")
    longer = one_time_password(22).reveal().replace("-", "")
    assert len(longer) == 22


def test_one_time_password_is_random() -> None:
    values = {one_time_password().reveal() for _ in range(50)}
    assert len(values) == 50
    # every alphabet character shows up across many draws (a fixed or narrow generator would not)
    seen = set("".join(values).replace("-", ""))
    assert len(seen) > len(OTP_ALPHABET) * 0.9


def test_one_time_password_minimum_length() -> None:
    with pytest.raises(InvalidArgument):
        one_time_password(15)
