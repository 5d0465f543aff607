"""The Vault KV v2 provider against a FAKE Vault server (tests/unit/secrets/fake_vault.py).

No real Vault can be installed here (not in Debian, no PyPI server), so these tests run against a fake
that replays the documented KV v2 and AppRole HTTP protocol on 127.0.0.1. What they check is the client:
URLs, headers, token handling, TLS verification, and the errors, which never carry a token or a value.
"""

from __future__ import annotations

import os
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from clonebox_core.errors import (
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from clonebox_core.secrets import SecretRef, SecretResolver, VaultProvider
from clonebox_core.security.identity import Identity, Kind
from clonebox_core.security.pki import CertificateAuthority, cert_pem, key_pem
from tests.unit.secrets.fake_vault import FakeVault
from tests.unit.secrets.leaks import assert_hidden

pytestmark = pytest.mark.unit

CANARY = "CANARY-7c2e-vault-value"
TOKEN = "hvs.CANARY-TOKEN-0123456789abcdef"
ROLE_ID = "CANARY-ROLE-ID-5f1d"
SECRET_ID = "CANARY-SECRET-ID-9a8b"
MARKERS = (CANARY, TOKEN, ROLE_ID, SECRET_ID)


def no_canary(*things: object) -> None:
    """None of ``things`` shows a value, token, role id or secret id in str, repr, args or metadata."""
    assert_hidden(MARKERS, *things)


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def vault() -> Iterator[FakeVault]:
    fake = FakeVault()
    fake.put("apps/web", {"password": CANARY, "user": "web", "port": 5432, "nested": {"x": CANARY}, "none": None})
    fake.add_token(TOKEN)
    with fake:
        yield fake


def resolve(provider: VaultProvider, ref: str) -> str:
    return SecretResolver([provider]).resolve(ref, field="spec.auth.password").reveal()


def gets(fake: FakeVault) -> list[str]:
    return [r.path for r in fake.requests if r.method == "GET"]


def logins(fake: FakeVault) -> list[str]:
    return [r.path for r in fake.requests if r.method == "POST"]


# --- token ---------------------------------------------------------------------------------------


def test_token_reads_the_field(vault: FakeVault) -> None:
    provider = VaultProvider(vault.addr, token=TOKEN)
    assert resolve(provider, "vault:secret/apps/web#password") == CANARY
    assert resolve(provider, "vault:secret/apps/web#user") == "web"
    (request, _) = vault.requests
    assert request.method == "GET"
    assert request.path == "/v1/secret/data/apps/web"
    assert request.headers["x-vault-token"] == TOKEN
    assert "x-vault-namespace" not in request.headers
    assert repr(provider) == f"VaultProvider(addr={vault.addr!r}, auth='token')"
    no_canary(provider)


def test_path_segments_are_quoted(vault: FakeVault) -> None:
    vault.put("apps/we b?x", {"password": CANARY})
    assert resolve(VaultProvider(vault.addr, token=TOKEN), "vault:secret/apps/we b?x#password") == CANARY
    assert vault.requests[-1].path == "/v1/secret/data/apps/we%20b%3Fx"


def test_namespace_header(vault: FakeVault) -> None:
    vault.namespace = "team-a"
    assert (
        resolve(VaultProvider(vault.addr, token=TOKEN, namespace="team-a"), "vault:secret/apps/web#password") == CANARY
    )
    assert vault.requests[-1].headers["x-vault-namespace"] == "team-a"
    with pytest.raises(FailedPrecondition) as info:  # without the header the path is not there
        resolve(VaultProvider(vault.addr, token=TOKEN), "vault:secret/apps/web#password")
    assert info.value.reason == "SECRET_NOT_FOUND"


def test_proxy_variables_are_ignored(vault: FakeVault, monkeypatch: pytest.MonkeyPatch) -> None:
    # a proxy would see the token: the provider talks to VAULT_ADDR directly
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    assert resolve(VaultProvider(vault.addr, token=TOKEN), "vault:secret/apps/web#password") == CANARY


def test_token_file_is_read_before_each_request(vault: FakeVault, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("hvs.old-token\n")
    os.chmod(token_file, 0o600)
    vault.add_token("hvs.old-token")
    provider = VaultProvider(vault.addr, token_file=token_file)
    assert resolve(provider, "vault:secret/apps/web#password") == CANARY
    token_file.write_text(TOKEN + "\n")  # rotated by a Vault agent
    vault.tokens.pop("hvs.old-token")
    assert resolve(provider, "vault:secret/apps/web#password") == CANARY
    assert [r.headers["x-vault-token"] for r in vault.requests] == ["hvs.old-token", TOKEN]


def test_token_file_must_be_private(vault: FakeVault, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    os.chmod(token_file, 0o644)
    with pytest.raises(FailedPrecondition) as info:
        resolve(VaultProvider(vault.addr, token_file=token_file), "vault:secret/apps/web#password")
    assert info.value.reason == "SECRET_FILE_INSECURE"
    assert f"chmod 600 {token_file}" in info.value.message
    no_canary(info.value)
    assert vault.requests == []


def test_forbidden_path_with_token(vault: FakeVault) -> None:
    vault.add_token(TOKEN, {"secret/apps/other"})
    with pytest.raises(PermissionDenied) as info:
        resolve(VaultProvider(vault.addr, token=TOKEN), "vault:secret/apps/web#password")
    err = info.value
    assert err.reason == "VAULT_PERMISSION_DENIED"
    assert "denied reading secret/apps/web (403: 1 error occurred: * permission denied)" in err.message
    assert "'read' on secret/data/apps/web" in err.message
    assert err.metadata["ref"] == "vault:secret/apps/web#password"
    assert len(gets(vault)) == 1  # a static token is not retried
    no_canary(err)


def test_unknown_token(vault: FakeVault) -> None:
    with pytest.raises(PermissionDenied) as info:
        resolve(VaultProvider(vault.addr, token="hvs.not-a-known-token"), "vault:secret/apps/web#password")
    assert info.value.reason == "VAULT_PERMISSION_DENIED"
    assert "hvs.not-a-known-token" not in info.value.message


@pytest.mark.parametrize("token", [f"{TOKEN}\n", f"x\r\nX-Evil: {TOKEN}", "", " "])
def test_token_unfit_for_a_header_is_refused_without_echo(vault: FakeVault, token: str) -> None:
    with pytest.raises(FailedPrecondition) as info:
        VaultProvider(vault.addr, token=token)
    assert info.value.reason == "VAULT_CONFIG_INVALID"
    no_canary(info.value)


# --- AppRole -------------------------------------------------------------------------------------


@pytest.fixture
def approle(vault: FakeVault) -> tuple[FakeVault, Clock, VaultProvider]:
    vault.add_approle(ROLE_ID, SECRET_ID)
    vault.lease_duration = 60
    clock = Clock()
    return vault, clock, VaultProvider(vault.addr, role_id=ROLE_ID, secret_id=SECRET_ID, clock=clock)


def test_approle_login_then_token_reused(approle: tuple[FakeVault, Clock, VaultProvider]) -> None:
    vault, clock, provider = approle
    assert resolve(provider, "vault:secret/apps/web#password") == CANARY
    clock.now += 30  # well within the 60 s lease
    assert resolve(provider, "vault:secret/apps/web#user") == "web"
    assert logins(vault) == ["/v1/auth/approle/login"]
    assert vault.logins == provider.logins == 1
    login, first, second = vault.requests
    assert login.body == {"role_id": ROLE_ID, "secret_id": SECRET_ID}
    assert login.headers["content-type"] == "application/json"
    assert "x-vault-token" not in login.headers
    issued = first.headers["x-vault-token"]
    assert issued.startswith("hvs.") and issued in vault.tokens
    assert second.headers["x-vault-token"] == issued
    assert repr(provider) == f"VaultProvider(addr={vault.addr!r}, auth='approle')"
    no_canary(provider)


def test_approle_logs_in_again_when_the_lease_runs_out(approle: tuple[FakeVault, Clock, VaultProvider]) -> None:
    vault, clock, provider = approle
    resolve(provider, "vault:secret/apps/web#password")
    clock.now += 55  # inside the renewal margin (the last tenth of the lease, at most 10 s)
    assert resolve(provider, "vault:secret/apps/web#password") == CANARY
    assert provider.logins == 2
    assert len(gets(vault)) == 2  # logged in before reading: no 403 first
    first, second = (r.headers["x-vault-token"] for r in vault.requests if r.method == "GET")
    assert first != second


def test_approle_just_before_the_margin_reuses(approle: tuple[FakeVault, Clock, VaultProvider]) -> None:
    _, clock, provider = approle
    resolve(provider, "vault:secret/apps/web#password")
    clock.now += 53.9
    resolve(provider, "vault:secret/apps/web#password")
    assert provider.logins == 1


def test_approle_logs_in_again_after_403(approle: tuple[FakeVault, Clock, VaultProvider]) -> None:
    vault, _, provider = approle
    resolve(provider, "vault:secret/apps/web#password")
    vault.revoke_all()  # revoked server-side before its lease ran out
    assert resolve(provider, "vault:secret/apps/web#password") == CANARY
    assert provider.logins == vault.logins == 2
    assert len(gets(vault)) == 3  # read, 403, login, read again


def test_approle_fresh_token_denied_is_final(vault: FakeVault) -> None:
    vault.add_approle(ROLE_ID, SECRET_ID, {"secret/apps/other"})
    provider = VaultProvider(vault.addr, role_id=ROLE_ID, secret_id=SECRET_ID, clock=Clock())
    with pytest.raises(PermissionDenied) as info:
        resolve(provider, "vault:secret/apps/web#password")
    assert info.value.reason == "VAULT_PERMISSION_DENIED"
    assert provider.logins == 1 and len(gets(vault)) == 1  # no login loop
    with pytest.raises(PermissionDenied):  # with the kept token: one more login, then final
        resolve(provider, "vault:secret/apps/web#password")
    assert provider.logins == 2 and len(gets(vault)) == 3
    no_canary(info.value)


def test_approle_lease_zero_never_expires(approle: tuple[FakeVault, Clock, VaultProvider]) -> None:
    vault, clock, provider = approle
    vault.lease_duration = 0
    resolve(provider, "vault:secret/apps/web#password")
    clock.now += 10**9
    resolve(provider, "vault:secret/apps/web#password")
    assert provider.logins == 1


@pytest.mark.parametrize("which", ["secret_id", "role_id"])
def test_approle_wrong_credentials(vault: FakeVault, which: str) -> None:
    vault.add_approle(ROLE_ID, SECRET_ID)
    creds = {"role_id": ROLE_ID, "secret_id": SECRET_ID}
    creds[which] = f"{creds[which]}-wrong"
    with pytest.raises(Unauthenticated) as info:
        provider = VaultProvider(vault.addr, role_id=creds["role_id"], secret_id=creds["secret_id"], clock=Clock())
        resolve(provider, "vault:secret/apps/web#password")
    err = info.value
    assert err.reason == "VAULT_LOGIN_FAILED"
    assert "refused the AppRole login at auth/approle/login (400: invalid role or secret ID)" in err.message
    assert "VAULT_ROLE_ID and VAULT_SECRET_ID" in err.message
    assert gets(vault) == []
    no_canary(err)


def test_approle_custom_mount(vault: FakeVault) -> None:
    vault.add_approle(ROLE_ID, SECRET_ID, mount="ci/approle")
    provider = VaultProvider(vault.addr, role_id=ROLE_ID, secret_id=SECRET_ID, approle_mount="ci/approle")
    assert resolve(provider, "vault:secret/apps/web#password") == CANARY
    assert logins(vault) == ["/v1/auth/ci/approle/login"]


# --- answers that are not the value --------------------------------------------------------------


def test_secret_not_found_names_the_ref(vault: FakeVault) -> None:
    with pytest.raises(FailedPrecondition) as info:
        resolve(VaultProvider(vault.addr, token=TOKEN), "vault:secret/apps/nope#password")
    err = info.value
    assert err.reason == "SECRET_NOT_FOUND"
    assert "Vault secret secret/apps/nope does not exist" in err.message
    assert err.metadata["ref"] == "vault:secret/apps/nope#password"
    assert err.metadata["field"] == "spec.auth.password"
    no_canary(err)


def test_deleted_newest_version(vault: FakeVault) -> None:
    vault.mounts["secret"]["apps/web"].deleted = True
    with pytest.raises(
        FailedPrecondition, match=r"newest version of Vault secret secret/apps/web .* was deleted"
    ) as info:
        resolve(VaultProvider(vault.addr, token=TOKEN), "vault:secret/apps/web#password")
    assert info.value.reason == "SECRET_NOT_FOUND"
    no_canary(info.value)


def test_unknown_mount(vault: FakeVault) -> None:
    with pytest.raises(FailedPrecondition, match="no secrets engine mounted at kv") as info:
        resolve(VaultProvider(vault.addr, token=TOKEN), "vault:kv/apps/web#password")
    assert info.value.reason == "SECRET_NOT_FOUND"


def test_missing_key_names_it_and_the_keys_there(vault: FakeVault) -> None:
    with pytest.raises(FailedPrecondition) as info:
        resolve(VaultProvider(vault.addr, token=TOKEN), "vault:secret/apps/web#passwd")
    err = info.value
    assert err.reason == "SECRET_KEY_NOT_FOUND"
    assert "has no key passwd (keys at the top level: nested, none, password, port, user)" in err.message
    assert err.metadata["key"] == "passwd"
    no_canary(err)


@pytest.mark.parametrize(("key", "kind"), [("port", "a number"), ("nested", "a mapping"), ("none", "null")])
def test_non_string_value(vault: FakeVault, key: str, kind: str) -> None:
    with pytest.raises(FailedPrecondition) as info:
        resolve(VaultProvider(vault.addr, token=TOKEN), f"vault:secret/apps/web#{key}")
    err = info.value
    assert err.reason == "SECRET_NOT_A_STRING"
    assert f"key {key} holds {kind}, not a string" in err.message
    assert "5432" not in err.message
    no_canary(err)


def test_empty_value_is_refused(vault: FakeVault) -> None:
    vault.put("apps/empty", {"password": ""})
    with pytest.raises(FailedPrecondition) as info:
        resolve(VaultProvider(vault.addr, token=TOKEN), "vault:secret/apps/empty#password")
    assert info.value.reason == "SECRET_EMPTY"


@pytest.mark.parametrize(
    "ref", ["vault:secret/apps/web", "vault:secret#password", "vault:secret/../sys/x#k", "vault:secret//web#k"]
)
def test_bad_vault_reference(vault: FakeVault, ref: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        resolve(VaultProvider(vault.addr, token=TOKEN), ref)
    assert info.value.reason == "INVALID_SECRET_REF"
    assert vault.requests == []


def test_sealed_vault(vault: FakeVault) -> None:
    vault.sealed = True
    with pytest.raises(Unavailable) as info:
        resolve(VaultProvider(vault.addr, token=TOKEN), "vault:secret/apps/web#password")
    assert info.value.reason == "VAULT_ERROR"
    assert "answered 503 reading secret/apps/web: Vault is sealed" in info.value.message


def test_redirect_is_not_followed(vault: FakeVault) -> None:
    with FakeVault() as elsewhere:
        vault.redirect = elsewhere.addr
        with pytest.raises(FailedPrecondition) as info:
            resolve(VaultProvider(vault.addr, token=TOKEN), "vault:secret/apps/web#password")
        assert elsewhere.requests == []  # the token did not follow the redirect
    assert info.value.reason == "VAULT_ERROR"
    assert f"redirect (307) to {elsewhere.addr}/v1/secret/data/apps/web" in info.value.message
    no_canary(info.value)


# --- transport -----------------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_address_fails_fast() -> None:
    addr = f"http://127.0.0.1:{closed_port()}"
    started = time.monotonic()
    with pytest.raises(Unavailable) as info:
        resolve(VaultProvider(addr, token=TOKEN), "vault:secret/apps/web#password")
    assert time.monotonic() - started < 2
    err = info.value
    assert err.reason == "VAULT_UNREACHABLE"
    assert f"Vault at {addr} cannot be reached: connection refused" in err.message
    assert err.metadata["vault"] == addr
    no_canary(err)


def test_silent_server_times_out() -> None:
    with socket.socket() as listener:  # accepts connections (backlog) but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        addr = f"http://127.0.0.1:{listener.getsockname()[1]}"
        with pytest.raises(Unavailable) as info:
            resolve(VaultProvider(addr, token=TOKEN, timeout=0.2), "vault:secret/apps/web#password")
    assert info.value.reason == "VAULT_UNREACHABLE"
    assert "no answer within 0.2 s" in info.value.message
    no_canary(info.value)


@pytest.mark.parametrize(
    "addr",
    [
        "http://vault.example.com:8200",
        "http://10.0.0.5:8200",
        "http://[2001:db8::1]:8200",
        "http://127.0.0.1.example.com:8200",
        "http://0.0.0.0:8200",
    ],
)
def test_plain_http_only_to_loopback(addr: str) -> None:
    with pytest.raises(FailedPrecondition) as info:
        VaultProvider(addr, token=TOKEN)
    assert info.value.reason == "VAULT_PLAINTEXT_NOT_LOOPBACK"
    assert "use https" in info.value.message
    no_canary(info.value)


@pytest.mark.parametrize(
    "addr", ["http://127.0.0.1:8200", "http://127.0.0.2:8200/", "http://localhost:8200", "http://[::1]:8200"]
)
def test_plain_http_to_loopback_is_allowed(addr: str) -> None:
    assert VaultProvider(addr, token=TOKEN).addr == addr.rstrip("/")


@pytest.mark.parametrize(
    "addr",
    ["vault.example.com:8200", "ftp://vault.example.com", f"https://admin:{CANARY}@vault.example.com", "https://", ""],
)
def test_bad_address(addr: str) -> None:
    with pytest.raises(FailedPrecondition) as info:
        VaultProvider(addr, token=TOKEN)
    assert info.value.reason == "VAULT_CONFIG_INVALID"
    no_canary(info.value)


# --- TLS -----------------------------------------------------------------------------------------


def tls_vault(tmp_path: Path, name: str = "ca") -> tuple[FakeVault, Path]:
    """A fake Vault serving a certificate (127.0.0.1, localhost) issued by a throwaway CA; the CA file."""
    ca = CertificateAuthority.init(tmp_path / name, "vault.test")
    leaf = ca.issue(Identity("vault.test", Kind.CONTROLLER, "vault"), seconds=3600)
    assert leaf.key is not None
    (tmp_path / f"{name}-leaf.crt").write_bytes(cert_pem(leaf.cert))
    (tmp_path / f"{name}-leaf.key").write_bytes(key_pem(leaf.key))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / f"{name}-leaf.crt", tmp_path / f"{name}-leaf.key")
    fake = FakeVault(tls=context)
    fake.put("apps/web", {"password": CANARY})
    fake.add_token(TOKEN)
    return fake, tmp_path / name / "ca.crt"


def test_https_with_ca_file(tmp_path: Path) -> None:
    fake, ca_file = tls_vault(tmp_path)
    with fake:
        assert fake.addr.startswith("https://127.0.0.1:")
        assert (
            resolve(VaultProvider(fake.addr, token=TOKEN, ca_file=ca_file), "vault:secret/apps/web#password") == CANARY
        )
        localhost = fake.addr.replace("127.0.0.1", "localhost")
        assert (
            resolve(VaultProvider(localhost, token=TOKEN, ca_file=ca_file), "vault:secret/apps/web#password") == CANARY
        )


def test_https_untrusted_certificate(tmp_path: Path) -> None:
    fake, _ = tls_vault(tmp_path)
    _, other_ca = tls_vault(tmp_path, "other")
    with fake:
        for provider in (
            VaultProvider(fake.addr, token=TOKEN),
            VaultProvider(fake.addr, token=TOKEN, ca_file=other_ca),
        ):
            with pytest.raises(FailedPrecondition) as info:
                resolve(provider, "vault:secret/apps/web#password")
            err = info.value
            assert err.reason == "VAULT_TLS_FAILED"
            assert f"the TLS certificate of Vault at {fake.addr} is not trusted" in err.message
            assert "VAULT_CACERT" in err.message
            no_canary(err)
        assert fake.requests == []  # nothing was sent over the untrusted connection


def test_https_to_a_plain_http_server(vault: FakeVault, tmp_path: Path) -> None:
    _, ca_file = tls_vault(tmp_path)
    addr = vault.addr.replace("http://", "https://")
    with pytest.raises(FailedPrecondition) as info:
        resolve(VaultProvider(addr, token=TOKEN, ca_file=ca_file), "vault:secret/apps/web#password")
    assert info.value.reason == "VAULT_TLS_FAILED"
    no_canary(info.value)


@pytest.mark.parametrize("content", [None, b"not a certificate\n"], ids=["missing", "garbage"])
def test_bad_ca_file(tmp_path: Path, content: bytes | None) -> None:
    ca_file = tmp_path / "ca.crt"
    if content is not None:
        ca_file.write_bytes(content)
    with pytest.raises(FailedPrecondition) as info:
        VaultProvider("https://vault.example.com:8200", token=TOKEN, ca_file=ca_file)
    assert info.value.reason == "VAULT_CACERT_INVALID"
    assert str(ca_file) in info.value.message


# --- configuration -------------------------------------------------------------------------------


def test_from_environ(vault: FakeVault, tmp_path: Path) -> None:
    _, ca_file = tls_vault(tmp_path)
    vault.namespace = "team-a"
    environ = {
        "VAULT_ADDR": vault.addr,
        "VAULT_TOKEN": TOKEN,
        "VAULT_NAMESPACE": "team-a",
        "VAULT_CACERT": str(ca_file),  # loaded, unused over loopback http
        "VAULT_ROLE_ID": "",  # empty counts as unset
    }
    provider = VaultProvider.from_environ(environ)
    assert resolve(provider, "vault:secret/apps/web#password") == CANARY
    assert vault.requests[-1].headers["x-vault-namespace"] == "team-a"


def test_from_environ_approle(vault: FakeVault) -> None:
    vault.add_approle(ROLE_ID, SECRET_ID)
    environ = {"VAULT_ADDR": vault.addr, "VAULT_ROLE_ID": ROLE_ID, "VAULT_SECRET_ID": SECRET_ID}
    assert resolve(VaultProvider.from_environ(environ), "vault:secret/apps/web#password") == CANARY
    assert vault.logins == 1


def test_from_environ_uses_vault_token_helper_file(vault: FakeVault, tmp_path: Path) -> None:
    (tmp_path / ".vault-token").write_text(TOKEN)
    os.chmod(tmp_path / ".vault-token", 0o600)
    provider = VaultProvider.from_environ({"VAULT_ADDR": vault.addr, "HOME": str(tmp_path)})
    assert resolve(provider, "vault:secret/apps/web#password") == CANARY


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, "need VAULT_ADDR"),
        ({"VAULT_ADDR": "http://127.0.0.1:8200"}, "no credentials for Vault at http://127.0.0.1:8200"),
        (
            {"VAULT_ADDR": "http://127.0.0.1:8200", "VAULT_TOKEN": TOKEN, "VAULT_ROLE_ID": ROLE_ID},
            "both a token (VAULT_TOKEN) and AppRole credentials",
        ),
        ({"VAULT_ADDR": "http://127.0.0.1:8200", "VAULT_ROLE_ID": ROLE_ID}, "needs both a role id"),
        ({"VAULT_ADDR": "http://127.0.0.1:8200", "VAULT_SECRET_ID": SECRET_ID}, "needs both a role id"),
    ],
    ids=["no-addr", "no-credentials", "token-and-approle", "role-only", "secret-only"],
)
def test_from_environ_configuration_errors(environ: dict[str, str], expected: str) -> None:
    with pytest.raises(FailedPrecondition) as info:
        VaultProvider.from_environ(environ)
    assert info.value.reason == "VAULT_CONFIG_INVALID"
    assert expected in info.value.message
    no_canary(info.value)


def test_audit_hook_sees_the_reference_only(vault: FakeVault) -> None:
    seen: list[tuple[str, str]] = []
    resolver = SecretResolver(
        [VaultProvider(vault.addr, token=TOKEN)], on_access=lambda ref, p: seen.append((str(ref), p.name))
    )
    value = resolver.resolve(SecretRef.parse("vault:secret/apps/web#password"))
    assert value.reveal() == CANARY
    assert seen == [("vault:secret/apps/web#password", "vault")]
    no_canary(value, resolver)
