"""``clonebox host``: list hosts, show one, cordon, uncordon and drain."""

from __future__ import annotations

import uuid
from typing import Annotated

import typer
from clonebox.controller.v1 import host_service_pb2 as hosts_pb2
from clonebox.type.v1 import host_pb2

from clonebox_cli import output
from clonebox_cli.context import Settings, settings

app = typer.Typer(help="Hypervisor hosts (one agent each).", no_args_is_help=True)

NameArg = Annotated[str, typer.Argument(metavar="NAME", help="Host name.")]


def _print_host(s: Settings, host: host_pb2.Host) -> None:
    if s.json:
        output.emit_json(output.message_dict(host))
    else:
        output.console().print(output.host_details(host))


@app.command("list")
def list_(ctx: typer.Context) -> None:
    """List hosts, ordered by name; resources read allocated/allocatable."""
    s = settings(ctx)
    client = s.client()
    hosts = list(client.call(client.hosts.ListHosts, hosts_pb2.ListHostsRequest()).hosts)
    if s.json:
        output.emit_json({"hosts": [output.message_dict(h) for h in hosts]})
    else:
        output.console().print(output.host_table(hosts))


@app.command("show")
def show(ctx: typer.Context, *, name: NameArg) -> None:
    """Show one host."""
    s = settings(ctx)
    client = s.client()
    _print_host(s, client.call(client.hosts.GetHost, hosts_pb2.GetHostRequest(name=name)).host)


@app.command("cordon")
def cordon(ctx: typer.Context, *, name: NameArg) -> None:
    """Stop placing new VMs on a host (its VMs keep running)."""
    s = settings(ctx)
    client = s.client()
    host = client.call(client.hosts.CordonHost, hosts_pb2.CordonHostRequest(name=name)).host
    if s.json:
        output.emit_json(output.message_dict(host))
    else:
        typer.echo(f"host {host.name} cordoned")


@app.command("uncordon")
def uncordon(ctx: typer.Context, *, name: NameArg) -> None:
    """Allow placing VMs on a host again."""
    s = settings(ctx)
    client = s.client()
    host = client.call(client.hosts.UncordonHost, hosts_pb2.UncordonHostRequest(name=name)).host
    if s.json:
        output.emit_json(output.message_dict(host))
    else:
        typer.echo(f"host {host.name} uncordoned")


@app.command("drain")
def drain(
    ctx: typer.Context,
    *,
    name: NameArg,
    request_id: Annotated[
        str | None, typer.Option("--request-id", help="Idempotency key (default: a new uuid4).")
    ] = None,
    timeout: Annotated[float, typer.Option("--timeout", min=1, help="Seconds to wait for the VMs to stop.")] = 600,
) -> None:
    """Cordon a host and stop its VMs."""
    s = settings(ctx)
    client = s.client()
    request = hosts_pb2.DrainHostRequest(name=name, request_id=request_id or str(uuid.uuid4()))
    # DrainHost answers only after the VMs are stopped, which takes longer than the usual deadline
    response = client.call(client.hosts.DrainHost, request, timeout=timeout)
    if s.json:
        output.emit_json(output.message_dict(response))
        return
    stopped = ", ".join(response.stopped_vms) or "none"
    typer.echo(f"host {response.host.name} drained (cordoned); VMs stopped: {stopped}")
