"""
``clonebox secret rotate``: a new password and/or SSH key set for a VM's login user, set in the guest.

As at create, everything is resolved on this machine: the password reference is read through its
provider and only its SHA-512-crypt hash is sent; key sources become public key lines; a one-time
password is generated here, shown once and expired at first login.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Annotated

import typer
from clonebox.controller.v1 import vm_service_pb2 as vms_pb2

from clonebox_cli import output
from clonebox_cli.context import settings
from clonebox_cli.specinput import key_fetcher
from clonebox_core.errors import InvalidArgument
from clonebox_core.secret import Secret

app = typer.Typer(help="Rotate VM login secrets.", no_args_is_help=True)


@app.command("rotate")
def rotate(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="VM", help="VM name.")],
    *,
    password: Annotated[
        str | None,
        typer.Option("--password", metavar="REF", help="New password from a secret reference (env:, file:, ...)."),
    ] = None,
    one_time_password: Annotated[
        bool, typer.Option("--one-time-password", help="Generate a password, show it once, expire it at first login.")
    ] = False,
    ssh_key: Annotated[
        list[str] | None,
        typer.Option("--ssh-key", metavar="SOURCE", help="New key set: file, inline key, github:USER (repeatable)."),
    ] = None,
    request_id: Annotated[str | None, typer.Option("--request-id", help="Idempotency key.")] = None,
) -> None:
    """Set a new password and/or SSH key set for the VM's login user, through the guest agent."""
    from clonebox_core.secrets.passwords import one_time_password as new_otp
    from clonebox_core.secrets.passwords import sha512_crypt
    from clonebox_core.secrets.providers import SecretRef, default_resolver
    from clonebox_core.secrets.sshkeys import resolve_ssh_keys

    s = settings(ctx)
    if password is not None and one_time_password:
        raise InvalidArgument("give --password or --one-time-password, not both", reason="INVALID_FLAG")
    if password is None and not one_time_password and not ssh_key:
        raise InvalidArgument(
            "nothing to rotate: give --password REF, --one-time-password or --ssh-key SOURCE", reason="INVALID_FLAG"
        )
    request = vms_pb2.RotateVmSecretRequest(name=name, request_id=request_id or str(uuid.uuid4()))
    otp: Secret | None = None
    if password is not None:
        ref = SecretRef.parse(password, field="--password")
        request.password_hash = sha512_crypt(default_resolver(base_dir=Path.cwd()).resolve(ref, field="--password"))
        request.secret_refs.append(str(ref))
    elif one_time_password:
        otp = new_otp()
        request.password_hash = sha512_crypt(otp)
        request.expire_password = True
    if ssh_key:
        keys = resolve_ssh_keys(ssh_key, fetcher=key_fetcher(), base_dir=Path.cwd(), field="--ssh-key")
        for warning in keys.warnings:
            typer.echo(json.dumps({"warning": warning}) if s.json else f"warning: {warning}", err=True)
        request.ssh_authorized_keys.extend(keys.keys)
        request.replace_keys = True
    client = s.client()
    response: vms_pb2.RotateVmSecretResponse = client.call(client.vms.RotateVmSecret, request)
    doc: dict[str, object] = {
        "vm": name,
        "user": response.user,
        "host": response.host,
        "changed": list(response.changed),
    }
    if s.json:
        if otp is not None:
            doc["one_time_password"] = otp.reveal()  # shown once: stored nowhere
        output.emit_json(doc)
        return
    typer.echo(f"{name}: {' and '.join(response.changed)} of {response.user} rotated")
    if otp is not None:
        typer.echo(
            f"one-time password for {response.user}@{name}: {otp.reveal()}\n"
            "  shown only now and stored nowhere; the first login must set a new password",
            err=True,
        )
