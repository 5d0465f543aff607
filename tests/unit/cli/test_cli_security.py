"""The CLI over mTLS: its TLS folder, failed handshakes (exit 13), ``pki``, ``host add``, renewal.

The fake controller (conftest) serves mTLS with core's server credentials and a throwaway CA, so every
handshake here is a real one: no client certificate, one from another CA, an expired one.
"""

from __future__ import annotations

import datetime as dt
import json
import stat
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from clonebox.controller.v1 import host_service_pb2 as hosts_pb2
from clonebox.controller.v1 import host_service_pb2_grpc
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from typer.testing import CliRunner, Result

from clonebox_cli import credentials, errors
from clonebox_cli import pki as pki_cli
from clonebox_cli.main import app
from clonebox_core.errors import PermissionDenied
from clonebox_core.rpc.tls import TlsFiles, key_matches
from clonebox_core.security.jointoken import JoinToken
from clonebox_core.security.pki import CertificateAuthority, identity_of

from .conftest import FakeFleet, make_host, serve_fake

if TYPE_CHECKING:
    from .conftest import FakeController, ThrowawayPki


def cli(runner: CliRunner, fc: FakeController, *args: str) -> Result:
    return runner.invoke(app, ["--controller", fc.address, *args])


def error_line(result: Result) -> str:
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def san_uris(cert: x509.Certificate) -> list[str]:
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return list(sans.get_values_for_type(x509.UniformResourceIdentifier))


# ------------------------------------------------------------------------------------ failed handshakes


def test_a_certificate_from_another_ca_is_rejected_with_exit_13(
    runner: CliRunner, fake_controller: FakeController
) -> None:
    pki = fake_controller.pki
    # ca.crt is the fleet's (so the controller verifies), the certificate is another CA's
    folder = pki.folder("foreign", issuer=pki.other_ca())
    result = runner.invoke(app, ["--controller", fake_controller.address, "--tls-dir", str(folder), "host", "list"])
    assert result.exit_code == 13
    line = error_line(result)
    assert line.startswith(f"error: {fake_controller.address} rejected this client's certificate: ")
    assert f"was issued by another CA named 'CloneBox CA clonebox.local', not by the CA in {folder / 'ca.crt'}" in line
    assert fake_controller.fleet.requests == []  # no servicer ran


def test_an_expired_certificate_is_rejected_with_exit_13(runner: CliRunner, fake_controller: FakeController) -> None:
    folder = fake_controller.pki.folder("expired", seconds=1)
    time.sleep(1.5)
    result = runner.invoke(app, ["--controller", fake_controller.address, "--tls-dir", str(folder), "vm", "list"])
    assert result.exit_code == 13
    line = error_line(result)
    assert f"{fake_controller.address} rejected this client's certificate: {folder / 'user.crt'} expired at" in line
    assert "clonebox pki issue --role user" in line
    # an expired certificate is not renewed (only a new one helps), and nothing was retried as an outage
    assert "RenewCertificate" not in [m for m, _ in fake_controller.fleet.requests]


def test_no_client_certificate_fails_the_handshake(runner: CliRunner, fake_controller: FakeController) -> None:
    # a channel that trusts the CA but presents no certificate: what grpcio really reports
    creds = grpc.ssl_channel_credentials(root_certificates=fake_controller.pki.ca.cert_pem)
    channel = grpc.secure_channel(
        fake_controller.address, creds, options=[("grpc.ssl_target_name_override", "controller.clonebox.local")]
    )
    with channel, pytest.raises(grpc.RpcError) as info:
        host_service_pb2_grpc.HostServiceStub(channel).ListHosts(hosts_pb2.ListHostsRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    err = credentials.handshake_failure(info.value.details(), credentials.Peer(fake_controller.address, None))
    assert err is not None and errors.exit_code(err) == 13
    assert err.message == f"{fake_controller.address} rejected this client's certificate: none was presented"

    # the CLI's way of presenting none: --insecure (plaintext) against an mTLS controller
    result = runner.invoke(app, ["--insecure", "--controller", fake_controller.address, "host", "list"])
    assert result.exit_code == 13
    assert f"{fake_controller.address} rejected this client's certificate: none was presented" in error_line(result)
    assert "--insecure speaks plaintext" in result.stderr


def test_a_controller_of_another_ca_cannot_be_verified(runner: CliRunner, fake_controller: FakeController) -> None:
    pki = fake_controller.pki
    other = pki.other_ca()
    folder = pki.folder("other-fleet", issuer=other, trust=other)
    result = runner.invoke(app, ["--controller", fake_controller.address, "--tls-dir", str(folder), "host", "list"])
    assert result.exit_code == 13
    line = error_line(result)
    assert f"cannot verify the controller at {fake_controller.address}" in line
    assert f"not issued by the CA in {folder / 'ca.crt'}" in line


def test_a_plaintext_controller_is_not_tls(runner: CliRunner, test_pki: ThrowawayPki) -> None:
    fleet = FakeFleet()
    fleet.hosts["local"] = make_host("local")
    server, port = serve_fake(fleet, test_pki, tls=False)
    try:
        result = runner.invoke(app, ["--controller", f"127.0.0.1:{port}", "host", "list"])
        assert result.exit_code == 13
        assert "does not speak TLS" in error_line(result) and "--insecure" in result.stderr
        plain = runner.invoke(app, ["--insecure", "--controller", f"127.0.0.1:{port}", "-o", "json", "host", "list"])
        assert plain.exit_code == 0, plain.output
    finally:
        server.stop(0)


def test_handshake_words_and_plain_outages() -> None:
    peer = credentials.Peer("127.0.0.1:1", None)
    assert credentials.handshake_failure("failed to connect: Connection refused", peer) is None
    assert credentials.handshake_failure("Deadline Exceeded", peer) is None
    mismatch = credentials.handshake_failure("Custom verification ... Hostname Verification Check failed.", peer)
    assert mismatch is not None and "is not for" in mismatch.message


def test_missing_tls_files_name_the_folder_and_the_fix(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(app, ["host", "list"])
    assert result.exit_code == 5
    line = error_line(result)
    default = tmp_path / "config" / "clonebox" / "tls"
    assert f"no client certificate in {default} (missing ca.crt, user.crt, user.key)" in line
    assert "clonebox pki issue --role user" in line and "clonebox dev up" in line
    # commands that never call the controller need no certificate
    assert runner.invoke(app, ["pki", "--help"]).exit_code == 0


def test_a_key_that_does_not_match_is_refused(runner: CliRunner, test_pki: ThrowawayPki, tmp_path: Path) -> None:
    a, b = test_pki.folder("a"), test_pki.folder("b")
    (a / "user.key").write_bytes((b / "user.key").read_bytes())
    result = runner.invoke(app, ["--tls-dir", str(a), "host", "list"])
    assert result.exit_code == 5
    assert f"{a / 'user.key'} is not the key of {a / 'user.crt'}" in error_line(result)


def test_tls_dir_from_the_environment_and_the_flag(runner: CliRunner, fake_controller: FakeController) -> None:
    # conftest points CLONEBOX_TLS_DIR at the admin folder; --tls-dir wins over it
    assert cli(runner, fake_controller, "host", "list").exit_code == 0
    missing = fake_controller.pki.root / "nowhere"
    result = cli(runner, fake_controller, "--tls-dir", str(missing), "host", "list")
    assert result.exit_code == 5 and str(missing) in result.stderr


# ------------------------------------------------------------------------------------------------- pki


def test_pki_init_creates_a_private_p256_ca(runner: CliRunner, tmp_path: Path) -> None:
    folder = tmp_path / "ca"
    result = runner.invoke(app, ["-o", "json", "pki", "init", "--ca-dir", str(folder), "--trust-domain", "lab.example"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["trust_domain"] == "lab.example" and info["ca_dir"] == str(folder)
    assert mode(folder / "ca.key") == 0o600 and mode(folder) == 0o700
    ca = CertificateAuthority.load(folder)
    assert ca.cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    again = runner.invoke(app, ["pki", "init", "--ca-dir", str(folder)])
    assert again.exit_code == 5 and "a CA exists already" in error_line(again)


def test_pki_init_default_folder(runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pki_cli, "_running_as_root", lambda: True)
    assert pki_cli.default_ca_dir() == Path("/var/lib/clonebox/controller/pki")
    monkeypatch.setattr(pki_cli, "_running_as_root", lambda: False)
    result = runner.invoke(app, ["pki", "init"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "data" / "clonebox" / "pki" / "ca.key").exists()
    assert "clonebox.local" in result.stdout


def test_pki_issue_user_writes_a_tls_folder_with_a_private_key(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca_dir = tmp_path / "ca"
    assert runner.invoke(app, ["pki", "init", "--ca-dir", str(ca_dir)]).exit_code == 0
    monkeypatch.chdir(tmp_path)
    args = ["pki", "issue", "--ca-dir", str(ca_dir), "--role", "user", "--name", "alice", "--user-role", "operator"]
    result = runner.invoke(app, ["-o", "json", *args, "--days", "7"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    out = tmp_path / "alice-tls"  # the default --out
    assert info["out"] == str(out) and info["identity"] == "spiffe://clonebox.local/user/operator/alice"
    assert sorted(p.name for p in out.iterdir()) == ["ca.crt", "user.crt", "user.key"]
    assert mode(out / "user.key") == 0o600 and mode(out) == 0o700
    cert = x509.load_pem_x509_certificate((out / "user.crt").read_bytes())
    assert san_uris(cert) == ["spiffe://clonebox.local/user/operator/alice"]
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]  # users do not serve
    lifetime = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=6, hours=23) < lifetime <= dt.timedelta(days=7)
    assert key_matches((out / "user.crt").read_bytes(), (out / "user.key").read_bytes())
    assert (out / "ca.crt").read_bytes() == (ca_dir / "ca.crt").read_bytes()

    # the files exist now: replacing them needs --force
    again = runner.invoke(app, args)
    assert again.exit_code == 4 and "--force" in error_line(again)
    assert runner.invoke(app, [*args, "--force"]).exit_code == 0


def test_pki_issue_controller_carries_the_server_names(runner: CliRunner, tmp_path: Path) -> None:
    ca_dir, out = tmp_path / "ca", tmp_path / "ctl"
    assert runner.invoke(app, ["pki", "init", "--ca-dir", str(ca_dir), "--trust-domain", "lab.example"]).exit_code == 0
    issue = ["pki", "issue", "--ca-dir", str(ca_dir), "--role", "controller", "--name", "main", "--out", str(out)]
    result = runner.invoke(app, [*issue, "--host", "10.1.2.3", "--host", "ctl.lab.example", "--seconds", "600"])
    assert result.exit_code == 0, result.output
    assert "tls_dir:" in result.stdout
    cert = x509.load_pem_x509_certificate((out / "controller.crt").read_bytes())
    assert san_uris(cert) == ["spiffe://lab.example/controller/main"]
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"controller.lab.example", "ctl.lab.example"} <= set(sans.get_values_for_type(x509.DNSName))
    assert "10.1.2.3" in {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    assert mode(out / "controller.key") == 0o600
    lifetime = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(seconds=590) < lifetime <= dt.timedelta(seconds=600)


def test_pki_issue_refuses_bad_options(runner: CliRunner, tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    base = ["pki", "issue", "--ca-dir", str(ca_dir), "--out", str(tmp_path / "o")]
    missing = runner.invoke(app, [*base, "--role", "agent", "--name", "h1"])
    assert missing.exit_code == 3 and "clonebox pki init" in error_line(missing)
    assert runner.invoke(app, ["pki", "init", "--ca-dir", str(ca_dir)]).exit_code == 0
    assert runner.invoke(app, [*base, "--role", "agent", "--name", "h1", "--user-role", "admin"]).exit_code == 2
    assert runner.invoke(app, [*base, "--role", "user", "--name", "u", "--days", "1", "--seconds", "9"]).exit_code == 2
    assert runner.invoke(app, [*base, "--role", "user", "--name", "u", "--host", "10.0.0.1"]).exit_code == 2
    bad_role = runner.invoke(app, [*base, "--role", "root", "--name", "x"])
    assert bad_role.exit_code == 2 and "controller, agent or user" in error_line(bad_role)
    bad_name = runner.invoke(app, [*base, "--role", "agent", "--name", "Bad_Name"])
    assert bad_name.exit_code == 2
    bad_user_role = runner.invoke(app, [*base, "--role", "user", "--name", "u", "--user-role", "root"])
    assert bad_user_role.exit_code == 2 and "viewer, operator or admin" in error_line(bad_user_role)


def test_an_issued_user_certificate_talks_to_the_controller(
    runner: CliRunner, fake_controller: FakeController, tmp_path: Path
) -> None:
    ca_dir, out = fake_controller.pki.ca.folder, tmp_path / "bob"
    issue = ["pki", "issue", "--ca-dir", str(ca_dir), "--role", "user", "--name", "bob", "--out", str(out)]
    assert runner.invoke(app, issue).exit_code == 0
    result = cli(runner, fake_controller, "--tls-dir", str(out), "-o", "json", "host", "list")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["hosts"][0]["name"] == "local"


def test_pki_list_and_revoke(runner: CliRunner, fake_controller: FakeController) -> None:
    pki = fake_controller.pki
    pki.folder("h1-tls", "agent", "h1", None)
    listed = cli(runner, fake_controller, "-o", "json", "pki", "list", "--name", "h1")
    assert listed.exit_code == 0, listed.output
    (cert,) = json.loads(listed.stdout)["certificates"]
    assert cert["identity"] == "spiffe://clonebox.local/agent/h1" and cert["revoked"] is False

    table = cli(runner, fake_controller, "pki", "list")
    assert (
        table.exit_code == 0
        and "SERIAL" in table.stdout
        and "spiffe://clonebox.local/user/admin/tester" in table.stdout
    )

    revoked = cli(runner, fake_controller, "pki", "revoke", "h1")
    assert revoked.exit_code == 0, revoked.output
    assert revoked.stdout == f"revoked {cert['serial']} spiffe://clonebox.local/agent/h1\n"
    assert fake_controller.fleet.calls("RevokeCertificate")[0].name == "h1"
    assert "revoked" in cli(runner, fake_controller, "pki", "list", "--name", "h1").stdout

    by_serial = cli(runner, fake_controller, "-o", "json", "pki", "revoke", "--serial", cert["serial"])
    assert json.loads(by_serial.stdout)["revoked"][0]["serial"] == cert["serial"]
    assert cli(runner, fake_controller, "pki", "revoke").exit_code == 2  # neither
    assert cli(runner, fake_controller, "pki", "revoke", "h1", "--serial", "ab").exit_code == 2  # both
    unknown = cli(runner, fake_controller, "pki", "revoke", "nobody")
    assert unknown.exit_code == 3


# -------------------------------------------------------------------------------------------- host add


def test_host_add_prints_the_token_and_the_agent_command(runner: CliRunner, fake_controller: FakeController) -> None:
    result = cli(runner, fake_controller, "host", "add", "h2", "--ttl", "600")
    assert result.exit_code == 0, result.output
    (request,) = fake_controller.fleet.calls("CreateJoinToken")
    assert (request.host, request.ttl_seconds) == ("h2", 600)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("join token for host h2 (works once, expires ")
    token = lines[1]
    assert JoinToken.decode(token).host == "h2"
    command = next(line.strip() for line in lines if "clonebox-agent --config" in line and "=" in line)
    assert f"CLONEBOX_AGENT_JOIN_TOKEN={token}" in command and "CLONEBOX_AGENT_NAME=h2" in command
    assert command.endswith("clonebox-agent --config /etc/clonebox/agent.yaml")
    assert f"  join_token: {token}" in lines and "  name: h2" in lines
    assert "loopback address" in result.stdout  # the controller address must be one h2 can reach

    data = json.loads(cli(runner, fake_controller, "-o", "json", "host", "add", "h3").stdout)
    assert data["host"] == "h3" and data["token"].startswith("cbj1.")
    assert data["agent_env"]["CLONEBOX_AGENT_JOIN_TOKEN"] == data["token"]
    assert data["agent_config"] == {
        "name": "h3",
        "controller": fake_controller.address,
        "tls_dir": "/var/lib/clonebox/agent/tls",
        "join_token": data["token"],
    }
    expires = dt.datetime.fromisoformat(data["expire_time"])
    assert dt.timedelta(minutes=59) < expires - dt.datetime.now(dt.UTC) <= dt.timedelta(hours=1)
    assert cli(runner, fake_controller, "host", "add", "h4", "--ttl", "5").exit_code == 2


# --------------------------------------------------------------------------------------------- renewal


def test_a_certificate_past_two_thirds_is_renewed_before_the_command(
    runner: CliRunner, fake_controller: FakeController
) -> None:
    # issue() backdates by a minute: 20 s of lifetime left puts "now" past two thirds already
    folder = fake_controller.pki.folder("short", seconds=20)
    tls = TlsFiles.in_folder(folder, "user")
    old_cert, old_key = tls.cert.read_bytes(), tls.key.read_bytes()
    assert credentials.renewal_due(tls)

    result = cli(runner, fake_controller, "--tls-dir", str(folder), "-o", "json", "host", "list")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["hosts"][0]["name"] == "local"  # the command went on
    assert f"renewed the client certificate in {folder}" in result.stderr
    assert [m for m, _ in fake_controller.fleet.requests][:2] == ["RenewCertificate", "ListHosts"]

    new_cert, new_key = tls.cert.read_bytes(), tls.key.read_bytes()
    assert new_cert != old_cert and new_key != old_key  # a fresh key, not only a new certificate
    assert key_matches(new_cert, new_key) and mode(tls.key) == 0o600
    renewed, old = (identity_of(x509.load_pem_x509_certificate(pem)) for pem in (new_cert, old_cert))
    assert renewed.spiffe_id == old.spiffe_id and renewed.serial != old.serial
    assert not credentials.renewal_due(tls)
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == ["ca.crt", "user.crt", "user.key"]

    # not due any more: the next command does not renew
    again = cli(runner, fake_controller, "--tls-dir", str(folder), "host", "list")
    assert again.exit_code == 0 and "renewed" not in again.stderr
    assert len(fake_controller.fleet.calls("RenewCertificate")) == 1


def test_a_failed_renewal_is_a_warning_while_the_certificate_is_valid(
    runner: CliRunner, fake_controller: FakeController
) -> None:
    folder = fake_controller.pki.folder("short", seconds=20)
    before = (folder / "user.crt").read_bytes()
    fake_controller.fleet.renew_error = PermissionDenied("renewal is switched off", reason="TEST")
    result = cli(runner, fake_controller, "--tls-dir", str(folder), "host", "list")
    assert result.exit_code == 0, result.output
    assert "local" in result.stdout
    (warning,) = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert f"could not renew the client certificate in {folder}" in warning
    assert "renewal is switched off" in warning
    assert (folder / "user.crt").read_bytes() == before


def test_install_replaces_key_and_certificate_and_refuses_a_mismatch(test_pki: ThrowawayPki) -> None:
    a, b = test_pki.folder("a"), test_pki.folder("b")
    tls = TlsFiles.in_folder(a, "user")
    with pytest.raises(Exception, match="not for the new key"):
        credentials.install(tls, (b / "user.key").read_bytes(), (a / "user.crt").read_bytes())
    credentials.install(tls, (b / "user.key").read_bytes(), (b / "user.crt").read_bytes())
    assert tls.cert.read_bytes() == (b / "user.crt").read_bytes()
    assert mode(tls.key) == 0o600
    assert not [p for p in a.iterdir() if p.name.endswith(".new")]


def test_the_insecure_flag_from_the_environment(runner: CliRunner, test_pki: ThrowawayPki) -> None:
    fleet = FakeFleet()
    fleet.hosts["local"] = make_host("local")
    server, port = serve_fake(fleet, test_pki, tls=False)
    env: dict[str, Any] = {"CLONEBOX_INSECURE": "1", "CLONEBOX_TLS_DIR": None}
    try:
        result = runner.invoke(app, ["--controller", f"127.0.0.1:{port}", "host", "list"], env=env)
        assert result.exit_code == 0, result.output
    finally:
        server.stop(0)


def test_the_dev_folder_is_the_default_for_the_dev_controller(
    runner: CliRunner, fake_controller: FakeController, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CLONEBOX_TLS_DIR")
    state = tmp_path / "state" / "clonebox" / "dev"
    state.mkdir(parents=True)
    state_file = {"controller": {"address": fake_controller.address}, "tls": {"user": str(fake_controller.tls_dir)}}
    (state / "dev.json").write_text(json.dumps(state_file))
    assert runner.invoke(app, ["host", "list"]).exit_code == 0  # the recorded controller, the recorded folder
    # another controller: still the dev folder while the user has none of their own ...
    assert cli(runner, fake_controller, "host", "list").exit_code == 0
    # ... and their own once it exists (here from another CA: rejected, which shows which one was used)
    own = tmp_path / "config" / "clonebox" / "tls"
    other = fake_controller.pki.other_ca()
    foreign = fake_controller.pki.folder("x", issuer=other, trust=other)
    own.mkdir(parents=True)
    for name in ("ca.crt", "user.crt", "user.key"):
        (own / name).write_bytes((foreign / name).read_bytes())
    result = runner.invoke(
        app, ["--controller", f"localhost:{fake_controller.address.rpartition(':')[2]}", "host", "list"]
    )
    assert result.exit_code == 13 and str(own / "ca.crt") in result.stderr
