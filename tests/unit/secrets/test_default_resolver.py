"""``default_resolver``: all five providers from one environment (real age keys, real sops, the FAKE Vault)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pyrage  # type: ignore[import-untyped]
import pytest

from clonebox_core.errors import FailedPrecondition
from clonebox_core.secrets import SecretProvider, SecretRef, default_resolver
from tests.unit.secrets.fake_vault import FakeVault
from tests.unit.secrets.test_sops import key_file, sops_encrypt, write

pytestmark = pytest.mark.unit

CANARY = "CANARY-51ee-default-value"
TOKEN = "hvs.CANARY-default-token"


@pytest.fixture
def vault() -> Iterator[FakeVault]:
    fake = FakeVault()
    fake.put("apps/web", {"password": f"{CANARY}-vault"})
    fake.add_token(TOKEN)
    with fake:
        yield fake


@pytest.fixture
def identity(tmp_path: Path) -> tuple[Path, str]:
    ident = pyrage.x25519.Identity.generate()
    recipient = str(ident.to_public())
    keys = key_file(tmp_path / "keys.txt", ident)
    age_file = tmp_path / "pw.age"
    age_file.write_bytes(pyrage.encrypt(f"{CANARY}-age\n".encode(), [ident.to_public()]))
    sops_encrypt(write(tmp_path / "plain.yaml", f"db:\n  password: {CANARY}-sops\n"), tmp_path / "s.yaml", recipient)
    write(tmp_path / "pw", f"{CANARY}-file\n")
    return keys, recipient


REFS = {
    "env:PW": f"{CANARY}-env",
    "file:pw": f"{CANARY}-file",
    "age:pw.age": f"{CANARY}-age",
    "sops:s.yaml#db.password": f"{CANARY}-sops",
    "vault:secret/apps/web#password": f"{CANARY}-vault",
}


@pytest.mark.parametrize("key_variable", ["CLONEBOX_AGE_IDENTITY_FILE", "SOPS_AGE_KEY_FILE"])
def test_all_five_from_one_environment(
    tmp_path: Path, identity: tuple[Path, str], vault: FakeVault, key_variable: str
) -> None:
    keys, _ = identity
    environ = {
        "PW": f"{CANARY}-env",
        "HOME": str(tmp_path),
        "PATH": os.defpath,
        key_variable: str(keys),  # one age key serves age: and sops:
        "VAULT_ADDR": vault.addr,
        "VAULT_TOKEN": TOKEN,
    }
    accessed: list[tuple[str, str]] = []

    def hook(ref: SecretRef, provider: SecretProvider) -> None:
        accessed.append((str(ref), provider.name))

    resolver = default_resolver(environ, on_access=hook, base_dir=tmp_path)
    assert resolver.schemes == ("age", "env", "file", "sops", "vault")
    for ref, expected in REFS.items():
        assert resolver.resolve(ref).reveal() == expected
    assert accessed == [(ref, ref.partition(":")[0]) for ref in REFS]
    assert CANARY not in repr(resolver)


def test_unconfigured_providers_fail_alone_with_the_fix(tmp_path: Path, identity: tuple[Path, str]) -> None:
    resolver = default_resolver({"PW": f"{CANARY}-env", "HOME": str(tmp_path)}, base_dir=tmp_path)
    assert resolver.schemes == ("age", "env", "file", "sops", "vault")
    assert resolver.resolve("env:PW").reveal() == f"{CANARY}-env"
    assert resolver.resolve("file:pw").reveal() == f"{CANARY}-file"
    with pytest.raises(FailedPrecondition) as info:
        resolver.resolve("age:pw.age", field="spec.auth.password")
    assert info.value.reason == "AGE_IDENTITY_INVALID"
    assert "set CLONEBOX_AGE_IDENTITY_FILE" in info.value.message
    assert info.value.metadata["field"] == "spec.auth.password"
    with pytest.raises(FailedPrecondition) as info:
        resolver.resolve("vault:secret/apps/web#password")
    assert info.value.reason == "VAULT_CONFIG_INVALID"
    assert "need VAULT_ADDR" in info.value.message
    with pytest.raises(FailedPrecondition) as info:
        resolver.resolve("sops:s.yaml#db.password")
    assert info.value.reason == "SECRET_DECRYPT_FAILED"
    assert "no age key configured" in info.value.message
    # the same error each time, not one exception object re-raised with a growing traceback
    with pytest.raises(FailedPrecondition) as again:
        resolver.resolve("vault:secret/apps/web#password")
    assert again.value is not info.value


def test_bad_age_identity_fails_age_only(tmp_path: Path, identity: tuple[Path, str], vault: FakeVault) -> None:
    keys, _ = identity
    os.chmod(keys, 0o644)
    environ = {"CLONEBOX_AGE_IDENTITY_FILE": str(keys), "VAULT_ADDR": vault.addr, "VAULT_TOKEN": TOKEN}
    resolver = default_resolver(environ, base_dir=tmp_path)
    with pytest.raises(FailedPrecondition) as info:
        resolver.resolve("age:pw.age")
    assert info.value.reason == "SECRET_FILE_INSECURE"
    assert resolver.resolve("vault:secret/apps/web#password").reveal() == f"{CANARY}-vault"


def test_vault_misconfiguration_fails_vault_only(tmp_path: Path) -> None:
    environ = {"PW": "x", "VAULT_ADDR": "http://vault.example.com:8200", "VAULT_TOKEN": TOKEN}
    resolver = default_resolver(environ, base_dir=tmp_path)
    assert resolver.resolve("env:PW").reveal() == "x"
    with pytest.raises(FailedPrecondition) as info:
        resolver.resolve("vault:secret/apps/web#password")
    assert info.value.reason == "VAULT_PLAINTEXT_NOT_LOOPBACK"
    assert TOKEN not in str(info.value)


def test_explicit_identity_and_process_environment(
    tmp_path: Path, identity: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    keys, _ = identity
    monkeypatch.setenv("CLONEBOX_TEST_PW", f"{CANARY}-env")
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("SOPS_AGE_KEY_FILE", "SOPS_AGE_KEY", "CLONEBOX_AGE_IDENTITY_FILE", "VAULT_ADDR"):
        monkeypatch.delenv(name, raising=False)
    resolver = default_resolver(base_dir=tmp_path, age_identity_file=keys)
    assert resolver.resolve("env:CLONEBOX_TEST_PW").reveal() == f"{CANARY}-env"
    assert resolver.resolve("age:pw.age").reveal() == f"{CANARY}-age"
    assert resolver.resolve("sops:s.yaml#db.password").reveal() == f"{CANARY}-sops"
