"""Secret references, the resolver, and the env / file / age providers (real files, real age keys)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pyrage  # type: ignore[import-untyped]
import pytest

from clonebox_core.audit.event import AuditEvent, Outcome
from clonebox_core.errors import FailedPrecondition, InvalidArgument
from clonebox_core.secret import Secret
from clonebox_core.secrets import (
    AgeProvider,
    EnvProvider,
    FileProvider,
    SecretProvider,
    SecretRef,
    SecretResolver,
    secret_access_event,
)
from tests.unit.secrets.leaks import assert_hidden

pytestmark = pytest.mark.unit

CANARY = "CANARY-6b1f-s3cr3t-value"


def no_canary(*things: object) -> None:
    """None of ``things`` shows the canary in str, repr, args or metadata."""
    assert_hidden((CANARY,), *things)


def write(path: Path, data: str | bytes, mode: int = 0o600) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    os.chmod(path, mode)
    return path


def resolver(tmp_path: Path, *extra: SecretProvider, environ: dict[str, str] | None = None) -> SecretResolver:
    return SecretResolver([EnvProvider(environ or {}), FileProvider(base_dir=tmp_path), *extra])


# --- references ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "scheme", "location", "key"),
    [
        ("env:DB_PASSWORD", "env", "DB_PASSWORD", None),
        ("file:/run/secrets/pw", "file", "/run/secrets/pw", None),
        ("file:relative/pw.txt", "file", "relative/pw.txt", None),
        ("age:/etc/clonebox/pw.age", "age", "/etc/clonebox/pw.age", None),
        ("sops:secrets.yaml#db.password", "sops", "secrets.yaml", "db.password"),
        ("vault:secret/clonebox/web#password", "vault", "secret/clonebox/web", "password"),
        ("file:C:with:colons", "file", "C:with:colons", None),
    ],
)
def test_parse_reference(text: str, scheme: str, location: str, key: str | None) -> None:
    ref = SecretRef.parse(text)
    assert (ref.scheme, ref.location, ref.key) == (scheme, location, key)
    assert str(ref) == text
    assert SecretRef.parse(str(ref)) == ref


@pytest.mark.parametrize(
    "text",
    [
        "",
        CANARY,  # a literal password where a reference belongs
        f"{CANARY}:x",  # not a lower-case scheme
        f"pw:{CANARY}\n",  # control character
        "env:",
        f"env:{CANARY}#",
        "x" * 5000,
    ],
)
def test_bad_reference_is_invalid_and_not_echoed(text: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        SecretRef.parse(text, field="spec.auth.password")
    assert info.value.metadata["field"] == "spec.auth.password"
    assert info.value.message.startswith("spec.auth.password: ")
    no_canary(info.value)


def test_unknown_scheme_names_field_and_known_schemes_not_the_text(tmp_path: Path) -> None:
    # "canary:..." parses (a lower-case scheme), but the scheme could be part of a typed password
    with pytest.raises(InvalidArgument) as info:
        resolver(tmp_path).resolve("canary:6b1f-s3cr3t", field="spec.auth.password")
    err = info.value
    assert err.reason == "UNKNOWN_SECRET_PROVIDER"
    assert err.metadata["field"] == "spec.auth.password"
    assert "known providers: env, file" in err.message
    assert "canary" not in err.message and "6b1f" not in err.message


@pytest.mark.parametrize("text", ["sops:secrets.yaml#db.password", "vault:secret/web#password"])
def test_known_scheme_without_provider_says_not_configured(tmp_path: Path, text: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        resolver(tmp_path).resolve(text)
    scheme = text.partition(":")[0]
    assert f"no provider for '{scheme}:' secret references is configured here" in info.value.message
    assert "configured providers: env, file" in info.value.message
    assert info.value.reason == "UNKNOWN_SECRET_PROVIDER"


def test_register_twice_is_refused() -> None:
    res = SecretResolver([EnvProvider({})])
    with pytest.raises(ValueError, match="registered already"):
        res.register(EnvProvider({}))
    assert res.schemes == ("env",)


# --- env -----------------------------------------------------------------------------------------


def test_env_happy_path(tmp_path: Path) -> None:
    value = resolver(tmp_path, environ={"VM_PASSWORD": CANARY}).resolve("env:VM_PASSWORD")
    assert isinstance(value, Secret)
    assert value.reveal() == CANARY
    no_canary(value)


def test_env_uses_process_environment_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLONEBOX_TEST_SECRET", CANARY)
    assert EnvProvider().get(SecretRef.parse("env:CLONEBOX_TEST_SECRET")).reveal() == CANARY


def test_env_missing_variable(tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition) as info:
        resolver(tmp_path).resolve("env:NOT_SET_ANYWHERE", field="spec.auth.password")
    err = info.value
    assert err.reason == "SECRET_NOT_FOUND"
    assert "NOT_SET_ANYWHERE is not set" in err.message and "export NOT_SET_ANYWHERE=" in err.message
    assert err.metadata["field"] == "spec.auth.password"
    assert err.metadata["ref"] == "env:NOT_SET_ANYWHERE"


@pytest.mark.parametrize("text", ["env:1BAD", "env:has-dash", "env:VAR#key"])
def test_env_bad_reference(tmp_path: Path, text: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        resolver(tmp_path, environ={"VAR": CANARY}).resolve(text, field="f")
    assert info.value.metadata["field"] == "f"
    no_canary(info.value)


def test_empty_value_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition) as info:
        resolver(tmp_path, environ={"EMPTY": ""}).resolve("env:EMPTY")
    assert info.value.reason == "SECRET_EMPTY"


# --- file ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (f"{CANARY}\n", CANARY),
        (f"{CANARY}\r\n", CANARY),
        (f"{CANARY}\n\n", f"{CANARY}\n"),  # only one newline is stripped
        (CANARY, CANARY),
        (f"  {CANARY} ", f"  {CANARY} "),  # spaces are part of the value
    ],
)
def test_file_happy_path_strips_one_newline(tmp_path: Path, content: str, expected: str) -> None:
    path = write(tmp_path / "pw", content)
    assert resolver(tmp_path).resolve(f"file:{path}").reveal() == expected


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_file_private_modes_accepted(tmp_path: Path, mode: int) -> None:
    path = write(tmp_path / "pw", CANARY, mode)
    assert FileProvider().get(SecretRef.parse(f"file:{path}")).reveal() == CANARY


def test_file_relative_to_base_dir(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "pw", CANARY)
    assert resolver(tmp_path).resolve("file:sub/pw").reveal() == CANARY


def test_file_tilde_is_the_home_of_the_requester(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # what clonebox config migrate writes: file:~/.config/clonebox/secrets/NAME.password
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home" / "secrets").mkdir(parents=True)
    write(tmp_path / "home" / "secrets" / "vm.password", CANARY)
    assert resolver(tmp_path / "elsewhere").resolve("file:~/secrets/vm.password").reveal() == CANARY
    # only a leading "~/" is special: "x~/y" is a relative path under the base folder
    with pytest.raises(FailedPrecondition):
        resolver(tmp_path).resolve("file:x~/secrets/vm.password")


@pytest.mark.parametrize(
    "mode",
    [0o644, 0o604, 0o640, 0o660, 0o620, 0o602, 0o610],
    ids=[
        "world-readable",
        "other-readable",
        "group-readable",
        "group-rw",
        "group-writable",
        "other-writable",
        "group-exec",
    ],
)
def test_file_accessible_by_group_or_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = write(tmp_path / "pw", CANARY, mode)
    with pytest.raises(FailedPrecondition) as info:
        resolver(tmp_path).resolve(f"file:{path}", field="spec.auth.password")
    err = info.value
    assert err.reason == "SECRET_FILE_INSECURE"
    assert f"chmod 600 {path}" in err.message
    assert str(path) in err.message and f"{mode:04o}" in err.message
    assert err.metadata["path"] == str(path)
    no_canary(err)


def test_file_missing(tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition) as info:
        resolver(tmp_path).resolve(f"file:{tmp_path}/nope")
    assert info.value.reason == "SECRET_NOT_FOUND"
    assert f"{tmp_path}/nope does not exist" in info.value.message


def test_file_directory_and_fifo_are_refused(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir(mode=0o700)
    os.mkfifo(tmp_path / "fifo", 0o600)
    for name in ("dir", "fifo"):
        with pytest.raises(FailedPrecondition, match="not a regular file"):
            resolver(tmp_path).resolve(f"file:{name}")


def test_file_symlink_checks_the_target(tmp_path: Path) -> None:
    private = write(tmp_path / "private", CANARY, 0o600)
    public = write(tmp_path / "public", CANARY, 0o644)
    (tmp_path / "to-private").symlink_to(private)
    (tmp_path / "to-public").symlink_to(public)
    assert resolver(tmp_path).resolve("file:to-private").reveal() == CANARY
    with pytest.raises(FailedPrecondition) as info:
        resolver(tmp_path).resolve("file:to-public")
    assert info.value.reason == "SECRET_FILE_INSECURE"


def test_file_too_large(tmp_path: Path) -> None:
    path = write(tmp_path / "big", "x" * 100)
    with pytest.raises(FailedPrecondition, match="larger than 10 bytes"):
        FileProvider(max_bytes=10).get(SecretRef.parse(f"file:{path}"))


def test_file_not_utf8_is_refused_without_echo(tmp_path: Path) -> None:
    path = write(tmp_path / "bin", CANARY.encode() + b"\xff\xfe")
    with pytest.raises(FailedPrecondition, match="not UTF-8") as info:
        resolver(tmp_path).resolve(f"file:{path}")
    no_canary(info.value)
    assert info.value.__cause__ is not None  # the resolver chains the provider's clean error ...
    assert info.value.__cause__.__cause__ is None  # ... which dropped the UnicodeDecodeError (holds the bytes)
    assert info.value.__cause__.__suppress_context__


def test_file_unreadable_by_this_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # tests may run as root, who reads any file: the open() refusal is simulated, the mapping is real
    path = write(tmp_path / "pw", CANARY, 0o000)

    def refuse(*args: object, **kwargs: object) -> int:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(FailedPrecondition, match="cannot be read by this process") as info:
        resolver(tmp_path).resolve(f"file:{path}")
    assert info.value.reason == "SECRET_UNREADABLE"


def test_file_takes_no_key(tmp_path: Path) -> None:
    write(tmp_path / "pw", CANARY)
    with pytest.raises(InvalidArgument, match="take no '#key'"):
        resolver(tmp_path).resolve("file:pw#field")


# --- age -----------------------------------------------------------------------------------------


def age_identity_file(path: Path, identity: object, mode: int = 0o600) -> Path:
    """An identity file as ``age-keygen`` writes it (comments, then the key)."""
    public = identity.to_public()  # type: ignore[attr-defined]
    return write(path, f"# created: 2024-01-01T00:00:00Z\n# public key: {public}\n{identity}\n", mode)


@pytest.fixture
def age_setup(tmp_path: Path) -> tuple[Path, object]:
    identity = pyrage.x25519.Identity.generate()
    return age_identity_file(tmp_path / "key.txt", identity), identity


def encrypt(path: Path, plaintext: str, recipient: object, *, armored: bool = False) -> Path:
    path.write_bytes(pyrage.encrypt(plaintext.encode(), [recipient], armored=armored))
    os.chmod(path, 0o644)  # ciphertext needs no private mode
    return path


@pytest.mark.parametrize("armored", [False, True], ids=["binary", "armored"])
def test_age_happy_path(tmp_path: Path, age_setup: tuple[Path, object], armored: bool) -> None:
    key_file, identity = age_setup
    age_file = encrypt(tmp_path / "pw.age", f"{CANARY}\n", identity.to_public(), armored=armored)  # type: ignore[attr-defined]
    provider = AgeProvider(key_file, base_dir=tmp_path)
    assert provider.recipients == (str(identity.to_public()),)  # type: ignore[attr-defined]
    res = resolver(tmp_path, provider)
    assert res.resolve(f"age:{age_file}").reveal() == CANARY
    assert res.resolve("age:pw.age").reveal() == CANARY
    assert res.schemes == ("age", "env", "file")
    no_canary(provider, res)
    assert str(identity) not in repr(provider)


def test_age_identity_file_with_several_keys(tmp_path: Path) -> None:
    first, second = pyrage.x25519.Identity.generate(), pyrage.x25519.Identity.generate()
    key_file = write(tmp_path / "keys.txt", f"{first}\n\n# second\n{second}\n")
    age_file = encrypt(tmp_path / "pw.age", CANARY, second.to_public())
    assert AgeProvider(key_file).get(SecretRef.parse(f"age:{age_file}")).reveal() == CANARY


@pytest.mark.parametrize("mode", [0o644, 0o640])
def test_age_identity_file_must_be_private(tmp_path: Path, mode: int) -> None:
    key_file = age_identity_file(tmp_path / "key.txt", pyrage.x25519.Identity.generate(), mode)
    with pytest.raises(FailedPrecondition) as info:
        AgeProvider(key_file)
    assert info.value.reason == "SECRET_FILE_INSECURE"
    assert f"chmod 600 {key_file}" in info.value.message


def test_age_identity_file_missing(tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition, match=r"age identity file .* does not exist"):
        AgeProvider(tmp_path / "nope.txt")


@pytest.mark.parametrize(
    "content",
    [
        "AGE-SECRET-KEY-1" + "Q" * 58 + "\n",  # right prefix, bad Bech32
        "not a key at all\n",
        "-----BEGIN OPENSSH PRIVATE KEY-----\n",
    ],
    ids=["bad-bech32", "garbage", "ssh-key"],
)
def test_age_bad_identity(tmp_path: Path, content: str) -> None:
    key_file = write(tmp_path / "key.txt", "# comment\n" + content)
    with pytest.raises(FailedPrecondition) as info:
        AgeProvider(key_file)
    err = info.value
    assert err.reason == "AGE_IDENTITY_INVALID"
    assert "line 2" in err.message
    assert content.strip() not in err.message and content.strip() not in repr(err.metadata)


def test_age_identity_file_without_identity(tmp_path: Path) -> None:
    key_file = write(tmp_path / "key.txt", "# only a comment\n\n")
    with pytest.raises(FailedPrecondition, match="holds no identity") as info:
        AgeProvider(key_file)
    assert info.value.reason == "AGE_IDENTITY_INVALID"


def test_age_wrong_key(tmp_path: Path, age_setup: tuple[Path, object]) -> None:
    key_file, identity = age_setup
    other = pyrage.x25519.Identity.generate()
    age_file = encrypt(tmp_path / "pw.age", CANARY, other.to_public())
    with pytest.raises(FailedPrecondition) as info:
        resolver(tmp_path, AgeProvider(key_file)).resolve(f"age:{age_file}", field="spec.auth.password")
    err = info.value
    assert err.reason == "SECRET_DECRYPT_FAILED"
    assert "not encrypted to the configured identity" in err.message
    assert f"age -r {identity.to_public()}" in err.message  # type: ignore[attr-defined]
    assert err.metadata["ref"] == f"age:{age_file}"
    no_canary(err)
    assert str(identity) not in err.message


@pytest.mark.parametrize("damage", ["flip-body", "truncate", "not-age"])
def test_age_corrupted_file(tmp_path: Path, age_setup: tuple[Path, object], damage: str) -> None:
    key_file, identity = age_setup
    age_file = encrypt(tmp_path / "pw.age", CANARY * 4, identity.to_public())  # type: ignore[attr-defined]
    data = age_file.read_bytes()
    if damage == "flip-body":
        data = data[:-10] + bytes(b ^ 0xFF for b in data[-10:])
    elif damage == "truncate":
        data = data[: len(data) - 20]
    else:
        data = b"this is not an age file\n"
    age_file.write_bytes(data)
    with pytest.raises(FailedPrecondition) as info:
        AgeProvider(key_file).get(SecretRef.parse(f"age:{age_file}"))
    assert info.value.reason == "SECRET_DECRYPT_FAILED"
    assert "corrupted or not an age file" in info.value.message
    no_canary(info.value)


def test_age_missing_file(tmp_path: Path, age_setup: tuple[Path, object]) -> None:
    key_file, _ = age_setup
    with pytest.raises(FailedPrecondition) as info:
        AgeProvider(key_file).get(SecretRef.parse(f"age:{tmp_path}/nope.age"))
    assert info.value.reason == "SECRET_NOT_FOUND"


# --- audit ---------------------------------------------------------------------------------------


def test_on_access_called_once_per_successful_access(tmp_path: Path) -> None:
    calls: list[tuple[SecretRef, str]] = []
    res = SecretResolver(
        [EnvProvider({"PW": CANARY}), FileProvider(base_dir=tmp_path)],
        on_access=lambda ref, provider: calls.append((ref, provider.name)),
    )
    write(tmp_path / "pw", CANARY)
    res.resolve("env:PW")
    res.resolve(SecretRef.parse("file:pw"))
    with pytest.raises(FailedPrecondition):
        res.resolve("env:MISSING")
    with pytest.raises(InvalidArgument):
        res.resolve("nope:x")
    assert [(str(r), p) for r, p in calls] == [("env:PW", "env"), ("file:pw", "file")]


def test_secret_access_event_names_the_reference_never_the_value(
    tmp_path: Path, age_setup: tuple[Path, object]
) -> None:
    key_file, identity = age_setup
    encrypt(tmp_path / "pw.age", CANARY, identity.to_public())  # type: ignore[attr-defined]
    events: list[AuditEvent] = []

    def hook(ref: SecretRef, provider: SecretProvider) -> None:
        events.append(secret_access_event(ref, provider=provider.name, origin="agent/h1"))

    res = SecretResolver([AgeProvider(key_file, base_dir=tmp_path)], on_access=hook)
    value = res.resolve("age:pw.age")
    assert value.reveal() == CANARY
    (event,) = events
    assert event.action == "secret.access"
    assert event.resource == "secrets/age:pw.age"
    assert event.outcome is Outcome.SUCCEEDED
    assert event.origin == "agent/h1"
    assert event.details == {"ref": "age:pw.age", "scheme": "age", "provider": "age"}
    no_canary(event)
    assert CANARY not in event.dumps()


def test_secret_access_event_options_and_secret_details_dropped() -> None:
    ref = SecretRef.parse("env:PW")
    event = secret_access_event(
        ref,
        resource="vms/web",
        outcome=Outcome.REJECTED,
        reason="SECRET_NOT_FOUND",
        details={"vm": "web", "oops": Secret(CANARY)},
    )
    assert event.resource == "vms/web" and event.outcome is Outcome.REJECTED
    assert event.details == {"vm": "web", "ref": "env:PW", "scheme": "env", "provider": "env"}
    assert CANARY not in event.dumps()
    with pytest.raises(TypeError):
        secret_access_event("env:PW")  # type: ignore[arg-type]


def test_nothing_shows_the_canary(tmp_path: Path, age_setup: tuple[Path, object]) -> None:
    key_file, identity = age_setup
    write(tmp_path / "pw", CANARY)
    encrypt(tmp_path / "pw.age", CANARY, identity.to_public())  # type: ignore[attr-defined]
    providers: list[SecretProvider] = [
        EnvProvider({"PW": CANARY}),
        FileProvider(base_dir=tmp_path),
        AgeProvider(key_file, base_dir=tmp_path),
    ]
    res = SecretResolver(providers)
    values = [res.resolve(r) for r in ("env:PW", "file:pw", "age:pw.age")]
    assert [v.reveal() for v in values] == [CANARY] * 3
    no_canary(res, *providers, *values, *(SecretRef.parse(r) for r in ("env:PW", "file:pw", "age:pw.age")))
    assert stat.S_IMODE((tmp_path / "pw").stat().st_mode) == 0o600
