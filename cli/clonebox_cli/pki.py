"""
``clonebox pki``: the fleet's certificate authority and certificates.

``init`` and ``issue`` work on the CA folder directly (whoever holds it issues; that is the controller's
machine): ``init`` makes an EC P-256 CA (``ca.key`` mode 0600, ``ca.crt``), ``issue`` writes a TLS folder
(``ca.crt``, ``ROLE.crt``, ``ROLE.key`` mode 0600) whose certificate names a SPIFFE-style identity in its
URI SAN: ``spiffe://TD/controller/NAME``, ``spiffe://TD/agent/HOST`` or ``spiffe://TD/user/ROLE/NAME``.
``list`` and ``revoke`` ask the controller (PkiService, admin certificate needed): revocation goes on the
deny list that the controller and every agent enforce.

The default CA folder is ``/var/lib/clonebox/controller/pki`` as root, else ``$XDG_DATA_HOME/clonebox/pki``
(``CLONEBOX_CA_DIR`` overrides both).
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from clonebox.controller.v1 import pki_service_pb2

from clonebox_cli import output
from clonebox_cli.context import settings
from clonebox_core.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from clonebox_core.security.identity import Kind, make_identity
from clonebox_core.security.pki import (
    DEFAULT_DAYS,
    CertificateAuthority,
    cert_pem,
    fingerprint,
    key_pem,
    server_name,
    write_private,
    write_public,
)

app = typer.Typer(help="The fleet's certificate authority and certificates (mTLS).", no_args_is_help=True)

ROOT_CA_DIR = "/var/lib/clonebox/controller/pki"
DEFAULT_TRUST_DOMAIN = "clonebox.local"


def _running_as_root() -> bool:
    return os.geteuid() == 0


def default_ca_dir() -> Path:
    """Where ``pki init`` puts the CA unless told otherwise."""
    if _running_as_root():
        return Path(ROOT_CA_DIR)
    value = os.environ.get("XDG_DATA_HOME", "")
    base = Path(value) if value and os.path.isabs(value) else Path.home() / ".local" / "share"
    return base / "clonebox" / "pki"


CaDirOption = Annotated[
    Path | None,
    typer.Option(
        "--ca-dir",
        envvar="CLONEBOX_CA_DIR",
        metavar="DIR",
        help=f"The CA folder \\[default: {ROOT_CA_DIR} as root, else $XDG_DATA_HOME/clonebox/pki]",
        show_default=False,
    ),
]


def _utc(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).isoformat(timespec="seconds")


@app.command("init")
def init(
    ctx: typer.Context,
    *,
    ca_dir: CaDirOption = None,
    trust_domain: Annotated[
        str, typer.Option("--trust-domain", metavar="TD", help="DNS-style name of the fleet, in every identity.")
    ] = DEFAULT_TRUST_DOMAIN,
    days: Annotated[int, typer.Option("--days", min=1, max=3660, help="Lifetime of the CA certificate.")] = 3650,
) -> None:
    """Create the issuing CA (EC P-256; ca.key readable by its owner only). The controller holds it."""
    s = settings(ctx)
    folder = (ca_dir or default_ca_dir()).absolute()
    ca = CertificateAuthority.init(folder, trust_domain, days=days)
    info = {
        "ca_dir": str(folder),
        "trust_domain": ca.trust_domain,
        "fingerprint": fingerprint(ca.cert),
        "not_after": _utc(ca.cert.not_valid_after_utc),
    }
    if s.json:
        output.emit_json(info)
        return
    typer.echo(f"created CA of trust domain {ca.trust_domain} in {folder} (ca.key 0600, ca.crt)")
    typer.echo(f"fingerprint sha256:{info['fingerprint']}, valid until {info['not_after']}")
    typer.echo("next: 'clonebox pki issue --role controller --name NAME --out DIR', then set tls_dir: DIR and")
    typer.echo(f"ca_dir: {folder} in the controller's config")


def _lifetime(days: int | None, seconds: int | None) -> int:
    if days is not None and seconds is not None:
        raise typer.BadParameter("give --days or --seconds, not both", param_hint="--seconds")
    if seconds is not None:
        return seconds
    return (days if days is not None else DEFAULT_DAYS) * 86400


def _usage_hint(kind: Kind, out: Path) -> str:
    if kind == Kind.USER:
        return f"use it with: clonebox --tls-dir {out} ... (or export CLONEBOX_TLS_DIR={out})"
    return f"use it with: tls_dir: {out} in the {kind}'s config"


@app.command("issue")
def issue(
    ctx: typer.Context,
    *,
    role: Annotated[str, typer.Option("--role", metavar="ROLE", help="controller, agent or user.")],
    name: Annotated[
        str, typer.Option("--name", metavar="NAME", help="Controller name, the agent's host name, or the user name.")
    ],
    user_role: Annotated[
        str | None,
        typer.Option(
            "--user-role", metavar="ROLE", help="For --role user: viewer, operator or admin \\[default: viewer]"
        ),
    ] = None,
    days: Annotated[
        int | None, typer.Option("--days", min=1, max=3660, help=f"Lifetime in days \\[default: {DEFAULT_DAYS}]")
    ] = None,
    seconds: Annotated[
        int | None, typer.Option("--seconds", min=1, help="Lifetime in seconds (instead of --days).")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", metavar="DIR", help="Folder to write into \\[default: ./NAME-tls]", show_default=False),
    ] = None,
    ca_dir: CaDirOption = None,
    hosts: Annotated[
        list[str] | None,
        typer.Option(
            "--host",
            metavar="NAME_OR_IP",
            help="Extra DNS name or IP the controller or agent is dialled at (repeatable).",
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace certificate files that exist in --out.")] = False,
) -> None:
    """
    Issue a certificate from the local CA folder; writes ca.crt, ROLE.crt and ROLE.key (0600) into --out.

    The identity is a SPIFFE-style URI SAN; controller and agent certificates also carry the DNS name peers
    verify (controller.TD, HOST.agent.TD). Run it where the CA is (the controller's machine).
    """
    s = settings(ctx)
    if user_role is not None and role != Kind.USER:
        raise typer.BadParameter("only for --role user", param_hint="--user-role")
    if hosts and role == Kind.USER:
        raise typer.BadParameter("users do not serve: only for --role controller or agent", param_hint="--host")
    lifetime = _lifetime(days, seconds)
    ca = CertificateAuthority.load((ca_dir or default_ca_dir()).absolute())
    identity = make_identity(ca.trust_domain, role, name, user_role)
    folder = (out or Path(f"{name}-tls")).absolute()
    files = {"ca": folder / "ca.crt", "cert": folder / f"{identity.kind}.crt", "key": folder / f"{identity.kind}.key"}
    existing = [p.name for p in (files["cert"], files["key"]) if p.exists()]
    if existing and not force:
        raise AlreadyExists(
            f"{folder} already holds {', '.join(existing)}: choose another --out, or pass --force to replace them",
            reason="TLS_FILES_EXIST",
        )
    for extra in hosts or []:
        if not extra or any(c.isspace() for c in extra):
            raise InvalidArgument(f"--host {extra!r}: not a DNS name or IP address", reason="INVALID_HOST")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o700)
    except OSError as exc:
        raise FailedPrecondition(f"cannot create {folder}: {exc.strerror}", reason="TLS_DIR") from None
    issued = ca.issue(identity, seconds=lifetime, extra_hosts=tuple(hosts or ()))
    assert issued.key is not None
    write_public(files["ca"], ca.cert_pem)
    write_private(files["key"], key_pem(issued.key))
    write_public(files["cert"], cert_pem(issued.cert))
    cert = issued.cert
    info: dict[str, Any] = {
        "identity": identity.spiffe_id,
        "serial": f"{cert.serial_number:x}",
        "not_before": _utc(cert.not_valid_before_utc),
        "not_after": _utc(cert.not_valid_after_utc),
        "out": str(folder),
        "files": {k: str(v) for k, v in files.items()},
    }
    if identity.kind != Kind.USER:
        info["server_name"] = server_name(identity)
    if s.json:
        output.emit_json(info)
        return
    typer.echo(f"issued {identity.spiffe_id} (serial {info['serial']}, valid until {info['not_after']})")
    typer.echo(f"wrote {folder}: ca.crt, {files['cert'].name}, {files['key'].name} (0600)")
    typer.echo(_usage_hint(identity.kind, folder))


def _status(cert: pki_service_pb2.Certificate, now: dt.datetime) -> str:
    if cert.revoked:
        return "revoked"
    if cert.HasField("not_after") and cert.not_after.ToDatetime(tzinfo=dt.UTC) <= now:
        return "expired"
    return "valid"


@app.command("list")
def list_(
    ctx: typer.Context,
    *,
    name: Annotated[str | None, typer.Option("--name", help="Only certificates of this host or user name.")] = None,
) -> None:
    """List the certificates the controller's CA issued, oldest first (admin)."""
    s = settings(ctx)
    client = s.client()
    response = client.call(client.pki.ListCertificates, pki_service_pb2.ListCertificatesRequest(name=name or ""))
    certs = list(response.certificates)
    if s.json:
        output.emit_json({"certificates": [output.message_dict(c) for c in certs]})
        return
    now = dt.datetime.now(dt.UTC)
    table = output.make_table("SERIAL", "IDENTITY", "NOT AFTER", "STATUS")
    for cert in certs:
        table.add_row(cert.serial, cert.identity, _utc(cert.not_after.ToDatetime(tzinfo=dt.UTC)), _status(cert, now))
    output.console().print(table)


@app.command("revoke")
def revoke(
    ctx: typer.Context,
    *,
    name: Annotated[
        str | None, typer.Argument(metavar="[NAME]", help="Revoke every certificate of this host or user name.")
    ] = None,
    serial: Annotated[str | None, typer.Option("--serial", metavar="S", help="Revoke only this serial (hex).")] = None,
) -> None:
    """Put certificates on the deny list that the controller and every agent enforce (admin)."""
    s = settings(ctx)
    if bool(name) == bool(serial):
        raise typer.BadParameter("give a NAME or --serial S (one of them)", param_hint="NAME / --serial")
    client = s.client()
    request = pki_service_pb2.RevokeCertificateRequest(name=name or "", serial=serial or "")
    revoked = list(client.call(client.pki.RevokeCertificate, request).revoked)
    if s.json:
        output.emit_json({"revoked": [output.message_dict(c) for c in revoked]})
        return
    for cert in revoked:
        typer.echo(f"revoked {cert.serial} {cert.identity}")
