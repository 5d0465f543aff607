"""``clonebox volume``: list, create and delete agent volumes (disks on one host that outlive their VMs)."""

from __future__ import annotations

from typing import Annotated

import typer
from clonebox.controller.v1 import vm_service_pb2 as vms_pb2
from clonebox.type.v1 import vm_pb2
from rich.table import Table

from clonebox_cli import output
from clonebox_cli.context import settings
from clonebox_cli.vm import RequestIdOpt, new_request_id, parse_labels
from clonebox_core.errors import InvalidArgument
from clonebox_core.plan import LABEL_PLAN
from clonebox_core.units import parse_size

app = typer.Typer(
    help="Agent volumes: disks on one host that outlive the VMs attaching them (a disk names one with 'volume:').",
    no_args_is_help=True,
)

NameArg = Annotated[str, typer.Argument(metavar="NAME", help="Volume name (a DNS label).")]
HostOpt = Annotated[str, typer.Option("--host", metavar="HOST", help="The host the volume lives on.")]


def volume_table(volumes: list[vm_pb2.Volume]) -> Table:
    """One row per volume: HOST, NAME, SIZE, SHARED, USED BY, PLAN, AGE."""
    table = output.make_table("HOST", "NAME", "SIZE", "SHARED", "USED BY", "PLAN", "AGE")
    for v in volumes:
        table.add_row(
            v.host,
            v.name,
            output.human_size(v.size_mib),
            "yes" if v.shared else "no",
            ", ".join(v.vms) or "-",
            v.labels.get(LABEL_PLAN, "") or "-",
            output.age(output.timestamp(v, "create_time")),
        )
    return table


@app.command("list")
def list_(
    ctx: typer.Context,
    *,
    host: Annotated[str, typer.Option("--host", metavar="HOST", help="Only this host's volumes.")] = "",
) -> None:
    """
    List the volumes of every host, with the VMs attaching each and the plan that made it.

    A host that cannot be asked is named on stderr (and in "host_errors" with -o json); the others are
    still listed, and the exit code is 0 only when every host answered.
    """
    s = settings(ctx)
    client = s.client()
    response = client.call(client.vms.ListVolumes, vms_pb2.ListVolumesRequest(host=host))
    volumes = list(response.volumes)
    errors = dict(sorted(response.host_errors.items()))
    if s.json:
        output.emit_json({"volumes": [output.message_dict(v) for v in volumes], "host_errors": errors})
    else:
        if volumes:
            output.console().print(volume_table(volumes))
        else:
            typer.echo("no volumes")
        for name, why in errors.items():
            typer.echo(f"host {name} was not asked: {why}", err=True)
    if errors:
        raise typer.Exit(1)


@app.command("create")
def create(
    ctx: typer.Context,
    *,
    name: NameArg,
    host: HostOpt,
    size: Annotated[str, typer.Option("--size", metavar="SIZE", help="Virtual size: 512MiB, 1GiB, ...")],
    shared: Annotated[
        bool, typer.Option("--shared", help="Several VMs may attach it at once (a raw file, no host cache).")
    ] = False,
    label: Annotated[
        list[str] | None, typer.Option("--label", "-l", metavar="KEY=VALUE", help="A label (repeatable).")
    ] = None,
    request_id: RequestIdOpt = None,
) -> None:
    """
    Make a volume on HOST; its disk is reserved there first.

    A VM attaches it with a disk that names it ('volume: NAME'), on the same host. Making a volume that
    exists with the same size and sharing changes nothing; another size or sharing is refused.
    """
    s = settings(ctx)
    try:
        size_mib = parse_size(size)
    except ValueError as err:
        raise InvalidArgument(f"--size: {err}", reason="INVALID_FLAG") from None
    request = vms_pb2.CreateVolumeRequest(
        host=host,
        name=name,
        size_mib=size_mib,
        shared=shared,
        labels=parse_labels(label),
        request_id=new_request_id(request_id),
    )
    client = s.client()
    volume = client.call(client.vms.CreateVolume, request).volume
    if s.json:
        output.emit_json(output.message_dict(volume))
    else:
        what = "shared" if volume.shared else "single-writer"
        typer.echo(f"volume {volume.name} on host {volume.host}: {output.human_size(volume.size_mib)}, {what}")


@app.command("delete")
def delete(ctx: typer.Context, *, name: NameArg, host: HostOpt, request_id: RequestIdOpt = None) -> None:
    """
    Delete a volume and its data (no prompt, so scripts can use it), and free its disk.

    Refused while a VM attaches it: delete that VM first. A volume a plan made comes back empty on the
    plan's next 'up'; 'clonebox down PLAN --volumes' removes a plan's volumes with its VMs.
    """
    s = settings(ctx)
    client = s.client()
    request = vms_pb2.DeleteVolumeRequest(host=host, name=name, request_id=new_request_id(request_id))
    client.call(client.vms.DeleteVolume, request)
    if s.json:
        output.emit_json({"volume": name, "host": host, "deleted": True})
    else:
        typer.echo(f"volume {name} on host {host} deleted")
