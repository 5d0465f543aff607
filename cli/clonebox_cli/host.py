"""``clonebox host``: add (enrol) a host, list hosts, show one, cordon, uncordon and drain."""

from __future__ import annotations

import shlex
import uuid
from datetime import UTC
from typing import Annotated, Any

import typer
from clonebox.controller.v1 import host_service_pb2 as hosts_pb2
from clonebox.type.v1 import host_pb2

from clonebox_cli import output
from clonebox_cli.context import Settings, settings
from clonebox_core.rpc.server import is_loopback

app = typer.Typer(help="Hypervisor hosts (one agent each).", no_args_is_help=True)

NameArg = Annotated[str, typer.Argument(metavar="NAME", help="Host name.")]

#: where the agent's config usually lives on a host (deploy/systemd)
AGENT_CONFIG = "/etc/clonebox/agent.yaml"
#: where an enrolled agent keeps its certificate (beside its default state_dir)
AGENT_TLS_DIR = "/var/lib/clonebox/agent/tls"


def _print_host(s: Settings, host: host_pb2.Host) -> None:
    if s.json:
        output.emit_json(output.message_dict(host))
    else:
        output.console().print(output.host_details(host))


def join_instructions(host: str, token: str, controller: str) -> dict[str, Any]:
    """How to start the agent on the new host with ``token``: its environment, a command line, a config."""
    config = {"name": host, "controller": controller, "tls_dir": AGENT_TLS_DIR, "join_token": token}
    env = {f"CLONEBOX_AGENT_{key.upper()}": value for key, value in config.items()}
    command = " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), "clonebox-agent", "--config", AGENT_CONFIG])
    return {"agent_env": env, "agent_command": command, "agent_config": config}


@app.command("add")
def add(
    ctx: typer.Context,
    *,
    name: Annotated[str, typer.Argument(metavar="HOST", help="Name of the new host (a DNS label).")],
    ttl: Annotated[
        int, typer.Option("--ttl", min=60, max=7 * 86400, help="Seconds the join token stays valid (60 .. 604800).")
    ] = 3600,
) -> None:
    """
    Print a one-time, expiring join token for a new host, and the agent command to run there.

    The agent on HOST presents the token on the controller's enrolment port, receives its certificate
    (into its tls_dir) and registers. The token works once and carries the CA certificate, so HOST needs
    nothing else. Needs an admin certificate.
    """
    s = settings(ctx)
    client = s.client()
    response = client.call(client.hosts.CreateJoinToken, hosts_pb2.CreateJoinTokenRequest(host=name, ttl_seconds=ttl))
    expires = response.expire_time.ToDatetime(tzinfo=UTC).isoformat(timespec="seconds")
    steps = join_instructions(name, response.token, s.controller)
    if s.json:
        output.emit_json({"host": name, "token": response.token, "expire_time": expires, **steps})
        return
    typer.echo(f"join token for host {name} (works once, expires {expires}):")
    typer.echo(response.token)
    typer.echo("")
    typer.echo(f"on {name}, start the agent with it:")
    typer.echo(f"  {steps['agent_command']}")
    typer.echo(f"or put these lines in {AGENT_CONFIG} and run 'clonebox-agent --config {AGENT_CONFIG}':")
    for key, value in steps["agent_config"].items():
        typer.echo(f"  {key}: {value}")
    host_part = s.controller.rpartition(":")[0].strip("[]")
    if is_loopback(host_part):
        typer.echo(f"(controller: {s.controller} is this CLI's loopback address: use one that {name} can reach)")


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
