"""
``clonebox vm``: create VMs from spec files, list, show, start, stop, update and delete them.

Mutations carry a ``request_id`` (a fresh uuid4 unless ``--request-id`` is given); the client retries an
RPC that never reached the controller with the same id, and re-running a command with the same
``--request-id`` returns the first run's operation instead of acting twice.
"""

from __future__ import annotations

import enum
import json
import sys
import uuid
from pathlib import Path
from typing import Annotated, Any

import typer
from clonebox.controller.v1 import vm_service_pb2 as vms_pb2
from clonebox.type.v1 import operation_pb2, vm_pb2

from clonebox_cli import output
from clonebox_cli.client import ControllerClient
from clonebox_cli.context import Settings, settings
from clonebox_cli.health import health_dict, health_section, vm_health
from clonebox_cli.operation import TimeoutOpt, print_started, wait_and_check
from clonebox_core.errors import FailedPrecondition, InvalidArgument
from clonebox_core.model import VmSpec
from clonebox_core.rpc.convert import spec_to_proto, vm_from_proto
from clonebox_core.rpc.convert_plan import change_kind_from_proto
from clonebox_core.secret import Secret
from clonebox_core.units import format_size

app = typer.Typer(help="Create and manage VMs.", no_args_is_help=True)


class StateChoice(enum.StrEnum):
    """``--state`` values (``clonebox.type.v1.VmState`` without the prefix)."""

    pending = "pending"
    creating = "creating"
    running = "running"
    paused = "paused"
    stopping = "stopping"
    stopped = "stopped"
    crashed = "crashed"
    deleting = "deleting"
    failed = "failed"

    def to_proto(self) -> vm_pb2.VmState.ValueType:
        """Return the API enum value."""
        return vm_pb2.VmState.Value(f"VM_STATE_{self.value.upper()}")


def parse_labels(values: list[str] | None) -> dict[str, str]:
    """``--label KEY=VALUE`` options as a dict (a malformed one is a usage error naming ``--label``)."""
    labels: dict[str, str] = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{item!r}: use KEY=VALUE", param_hint="--label")
        labels[key] = value
    return labels


def _warn(s: Settings, warnings: tuple[str, ...]) -> None:
    for text in warnings:
        # stderr, so that -o json keeps stdout one document
        typer.echo(json.dumps({"warning": text}) if s.json else f"warning: {text}", err=True)


def new_request_id(given: str | None) -> str:
    """The ``--request-id`` given, or a new uuid4; an empty one is refused."""
    if given is not None and not given.strip():
        raise InvalidArgument("--request-id must not be empty", reason="INVALID_REQUEST_ID")
    return given or str(uuid.uuid4())


def _print_vm(s: Settings, vm: vm_pb2.Vm) -> None:
    if s.json:
        output.emit_json(output.message_dict(vm))
    else:
        output.console().print(output.vm_details(vm))


def _final_vm(client: ControllerClient, op: operation_pb2.Operation, name: str) -> vm_pb2.Vm:
    """Return the VM an operation left behind: its result, or asked for when the result is empty."""
    if op.result.HasField("vm"):
        return op.result.vm
    response: vms_pb2.GetVmResponse = client.call(client.vms.GetVm, vms_pb2.GetVmRequest(name=name))
    return response.vm


WaitOpt = Annotated[bool, typer.Option("--wait/--no-wait", help="Wait for the operation and show its progress.")]
RequestIdOpt = Annotated[
    str | None,
    typer.Option(
        "--request-id",
        help="Idempotency key; a retry with the same id never acts twice. Default: a new uuid4.",
    ),
]
NameArg = Annotated[str, typer.Argument(metavar="NAME", help="VM name.")]
GraceOpt = Annotated[
    int,
    typer.Option("--grace", min=0, max=3600, help="Seconds of graceful shutdown before forcing (0: default)."),
]
ImageOpt = Annotated[
    str | None,
    typer.Option("--image", metavar="NAME", help="CloneBox v1 files: base image (in the agent's image folders)."),
]
DropOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--drop",
        metavar="SETTING",
        help="CloneBox v1 files: drop a setting that cannot be honoured "
        "(gui, network_mode, paths, app_data_paths; repeatable).",
    ),
]


@app.command("create")
def create(
    ctx: typer.Context,
    *,
    file: Annotated[str, typer.Option("--file", "-f", metavar="SPEC.yaml", help="VM spec file ('-' for stdin).")],
    host: Annotated[
        str, typer.Option("--host", help="Place on this host instead of letting the controller choose.")
    ] = "",
    wait: WaitOpt = True,
    timeout: TimeoutOpt = None,
    request_id: RequestIdOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the steps and the domain XML; reserve and make nothing.")
    ] = False,
    image: ImageOpt = None,
    drop: DropOpt = None,
) -> None:
    """
    Create a VM from a spec file (see examples/), or from a CloneBox v1 .clonebox.yaml (migrated in memory).

    SSH keys and the password reference are resolved here, on this machine; the request carries only
    public keys and a password hash. A one-time password is printed once, after the VM is created.
    """
    from clonebox_cli.specinput import load_for_create, prepare

    s = settings(ctx)
    # before any RPC: a bad file is reported with its line number, offline
    loaded = load_for_create(file, image=image, drop=frozenset(drop or ()))
    prepared = prepare(loaded)
    _warn(s, prepared.warnings)
    spec = prepared.spec
    client = s.client()
    request = vms_pb2.CreateVmRequest(
        spec=spec_to_proto(spec), host=host, request_id=new_request_id(request_id), dry_run=dry_run
    )
    response = client.call(client.vms.CreateVm, request)
    if dry_run:
        _print_plan(s.json, response.plan)
        return
    op = response.operation
    otp = prepared.one_time_password
    if not wait:
        if s.json and otp is not None:
            # one JSON document on stdout: the operation, and the password shown this once
            output.emit_json({**output.message_dict(op), "one_time_password": otp.reveal()})
            return
        print_started(op, s.json)
        _show_one_time_password(s, spec, otp)
        return
    op = wait_and_check(client, op, timeout)
    vm = _final_vm(client, op, spec.name)
    if s.json and otp is not None:
        # shown once, to the requester only: it is stored nowhere (the VM has only its hash)
        output.emit_json({**output.message_dict(vm), "one_time_password": otp.reveal()})
        return
    _print_vm(s, vm)
    _show_one_time_password(s, spec, otp)


def _show_one_time_password(s: Settings, spec: VmSpec, otp: Secret | None) -> None:
    """The one-time password, once, on stderr (table output; JSON output carries it in its document)."""
    if otp is None or spec.auth is None:
        return
    typer.echo(
        f"one-time password for {spec.auth.user}@{spec.name}: {otp.reveal()}\n"
        "  shown only now and stored nowhere; the first login must set a new password",
        err=True,
    )


def _print_plan(as_json: bool, plan: Any) -> None:
    if as_json:
        output.emit_json(output.message_dict(plan))
        return
    typer.echo(f"dry run: nothing was reserved or made. On host {plan.host} the create would:")
    for i, step in enumerate(plan.steps, 1):
        typer.echo(f"  {i}. {step}")
    if plan.domain_xml:
        typer.echo("\ndomain XML:")
        typer.echo(plan.domain_xml)


@app.command("validate")
def validate(
    ctx: typer.Context,
    *,
    file: Annotated[str, typer.Option("--file", "-f", metavar="SPEC.yaml", help="VM spec file ('-' for stdin).")],
) -> None:
    """Check a spec file without contacting the controller; prints the spec as the controller would get it."""
    from clonebox_cli.specinput import load_for_create

    s = settings(ctx)
    loaded = load_for_create(file)
    _warn(s, loaded.warnings)
    spec = loaded.spec
    if s.json:
        output.emit_json(output.message_dict(spec_to_proto(spec)))
        return
    disks = f"{len(spec.disks)} disk{'s' if len(spec.disks) != 1 else ''}"
    typer.echo(f"{file}: ok: vm {spec.name} ({spec.vcpus} vCPU, {format_size(spec.memory_mib)}, {disks})")


@app.command("list")
def list_(
    ctx: typer.Context,
    *,
    host: Annotated[str, typer.Option("--host", help="Only VMs on this host.")] = "",
    state: Annotated[StateChoice | None, typer.Option("--state", help="Only VMs in this state.")] = None,
    label: Annotated[
        list[str] | None,
        typer.Option("--label", "-l", metavar="KEY=VALUE", help="Only VMs with this label (repeatable)."),
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000, help="VMs per page.")] = 100,
    page_token: Annotated[str, typer.Option("--page-token", help="Continue from a previous page.")] = "",
    all_pages: Annotated[bool, typer.Option("--all", help="Fetch every page.")] = False,
) -> None:
    """List VMs across the fleet, ordered by name."""
    s = settings(ctx)
    client = s.client()
    request = vms_pb2.ListVmsRequest(
        host=host,
        state=state.to_proto() if state is not None else vm_pb2.VM_STATE_UNSPECIFIED,
        labels=parse_labels(label),
        page_size=limit,
        page_token=page_token,
    )
    vms: list[vm_pb2.Vm] = []
    while True:
        response = client.call(client.vms.ListVms, request)
        vms.extend(response.vms)
        if not (all_pages and response.next_page_token):
            break
        request.page_token = response.next_page_token
    next_token = response.next_page_token
    if s.json:
        output.emit_json({"vms": [output.message_dict(vm) for vm in vms], "next_page_token": next_token})
        return
    output.console().print(output.vm_table(vms))
    if next_token:
        typer.echo(f"more VMs: use --all, or --page-token {next_token}", err=True)


@app.command("show")
def show(
    ctx: typer.Context,
    *,
    name: NameArg,
    as_spec: Annotated[bool, typer.Option("--spec", help="Print the VM's spec as a spec file instead.")] = False,
) -> None:
    """
    Show one VM, with its health (overall state, since when, each check's state and last detail).

    When the controller cannot report health (an older controller without the HealthService, or the
    health is unavailable right now) the VM is still shown, with "health: unavailable (REASON)"; in
    -o json the "health" key then holds {"unavailable": REASON, "message": ...} instead of the health.
    """
    s = settings(ctx)
    client = s.client()
    vm = client.call(client.vms.GetVm, vms_pb2.GetVmRequest(name=name)).vm
    if as_spec:
        from clonebox_core.spec import dump_spec

        typer.echo(dump_spec(vm_from_proto(vm).spec), nl=False)
        return
    found, problem = vm_health(client, name)
    if s.json:
        shown: dict[str, Any] = (
            health_dict(found)
            if found is not None
            else {"unavailable": problem.reason if problem else "", "message": problem.message if problem else ""}
        )
        output.emit_json({**output.message_dict(vm), "health": shown})
        return
    console = output.console()
    console.print(output.vm_details(vm))
    if found is not None:
        console.print(health_section(found))
    else:
        console.print(f"health: unavailable ({problem.reason if problem else 'UNKNOWN'})")


def _finish_power(
    *,
    s: Settings,
    client: ControllerClient,
    op: operation_pb2.Operation,
    name: str,
    wait: bool,
    timeout: float | None,
) -> None:
    if not wait:
        print_started(op, s.json)
        return
    op = wait_and_check(client, op, timeout)
    vm = _final_vm(client, op, name)
    if s.json:
        output.emit_json(output.message_dict(vm))
    else:
        typer.echo(f"vm {vm.name} is {vm_from_proto(vm).state.name.lower()} on {vm.host or '-'}")


@app.command("start")
def start(
    ctx: typer.Context,
    *,
    name: NameArg,
    wait: WaitOpt = True,
    timeout: TimeoutOpt = None,
    request_id: RequestIdOpt = None,
) -> None:
    """Start a stopped VM."""
    s = settings(ctx)
    client = s.client()
    request = vms_pb2.StartVmRequest(name=name, request_id=new_request_id(request_id))
    op = client.call(client.vms.StartVm, request).operation
    _finish_power(s=s, client=client, op=op, name=name, wait=wait, timeout=timeout)


@app.command("stop")
def stop(
    ctx: typer.Context,
    *,
    name: NameArg,
    wait: WaitOpt = True,
    timeout: TimeoutOpt = None,
    grace: GraceOpt = 0,
    force: Annotated[bool, typer.Option("--force", help="Power off at once, skipping the graceful shutdown.")] = False,
    request_id: RequestIdOpt = None,
) -> None:
    """Stop a VM: ACPI shutdown, forced off after the grace period."""
    s = settings(ctx)
    client = s.client()
    request = vms_pb2.StopVmRequest(
        name=name, request_id=new_request_id(request_id), timeout_seconds=grace, force=force
    )
    op = client.call(client.vms.StopVm, request).operation
    _finish_power(s=s, client=client, op=op, name=name, wait=wait, timeout=timeout)


_UPDATE_WORDS = {
    "none": "nothing (no difference)",
    "in_place": "in place (the guest is not touched)",
    "restart": "with a restart (graceful shutdown, then start; disks kept)",
}


@app.command("update")
def update(
    ctx: typer.Context,
    *,
    file: Annotated[str, typer.Option("--file", "-f", metavar="SPEC.yaml", help="VM spec file ('-' for stdin).")],
    wait: WaitOpt = True,
    timeout: TimeoutOpt = None,
    grace: GraceOpt = 0,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what the update would take; change nothing.")] = False,
    request_id: RequestIdOpt = None,
) -> None:
    """
    Change an existing VM to its edited spec file without re-creating it; its disks stay.

    Labels and health checks change in place; vCPUs and memory with a restart when the VM runs. Any
    other change is refused (VM_UPDATE_NEEDS_REPLACE, naming the fields): that takes a new VM.
    """
    from clonebox_cli.specinput import load_for_create, prepare

    s = settings(ctx)
    prepared = prepare(load_for_create(file, image=None, drop=frozenset()))
    _warn(s, prepared.warnings)
    spec = prepared.spec
    client = s.client()
    request = vms_pb2.UpdateVmRequest(
        spec=spec_to_proto(spec), request_id=new_request_id(request_id), timeout_seconds=grace, dry_run=dry_run
    )
    response = client.call(client.vms.UpdateVm, request)
    kind = change_kind_from_proto(response.kind).value
    how = _UPDATE_WORDS.get(kind, kind) + (f" ({', '.join(response.fields)})" if response.fields else "")
    if dry_run:
        if s.json:
            output.emit_json({"vm": spec.name, "change": kind, "fields": list(response.fields)})
        else:
            typer.echo(f"dry run: vm {spec.name} would change {how}; nothing was done")
        return
    op = response.operation
    if not wait:
        print_started(op, s.json)
        return
    op = wait_and_check(client, op, timeout)
    vm = _final_vm(client, op, spec.name)
    if s.json:
        output.emit_json({**output.message_dict(vm), "change": kind, "fields": list(response.fields)})
    else:
        typer.echo(f"vm {vm.name} updated {how}; it is {vm_from_proto(vm).state.name.lower()} on {vm.host or '-'}")


@app.command("delete")
def delete(
    ctx: typer.Context,
    *,
    name: NameArg,
    wait: WaitOpt = True,
    timeout: TimeoutOpt = None,
    request_id: RequestIdOpt = None,
    with_snapshots: Annotated[
        bool,
        typer.Option(
            "--with-snapshots", help="Also delete the VM's snapshots (a VM with snapshots is refused without)."
        ),
    ] = False,
    keep_export: Annotated[
        str | None,
        typer.Option(
            "--keep-export",
            metavar="FILE",
            help="First export the VM's newest snapshot to FILE (unencrypted), then delete with its snapshots.",
        ),
    ] = None,
) -> None:
    """
    Delete a VM and everything made for it (no prompt, so scripts can use it).

    A VM that has snapshots is refused unless --with-snapshots. --keep-export FILE keeps something:
    it exports the VM's newest snapshot (not the state since then: take a snapshot first if that
    matters) to FILE exactly like 'clonebox snapshot export', and deletes the VM with its snapshots
    only once FILE is complete. Bring it back with 'clonebox snapshot import FILE'.
    """
    s = settings(ctx)
    client = s.client()
    if keep_export is not None:
        from clonebox_cli.snapshot import export_to_file, list_snapshots, newest_snapshot

        newest = newest_snapshot(list_snapshots(client, name))
        if newest is None:
            raise FailedPrecondition(
                f"vm {name} has no snapshot to export: take one first ('clonebox snapshot create {name}'), "
                "or delete without --keep-export",
                reason="NO_SNAPSHOT_TO_EXPORT",
            )
        done = export_to_file(client, name, newest.name, Path(keep_export), passphrase=None, force=False)
        typer.echo(f"exported snapshot {newest.name} of vm {name} to {done.file} (sha256 {done.sha256})", err=True)
        with_snapshots = True
    request = vms_pb2.DeleteVmRequest(name=name, request_id=new_request_id(request_id), with_snapshots=with_snapshots)
    op = client.call(client.vms.DeleteVm, request).operation
    if not wait:
        print_started(op, s.json)
        return
    op = wait_and_check(client, op, timeout)
    if s.json:
        output.emit_json(output.message_dict(op))
    else:
        typer.echo(f"vm {name} deleted")


@app.command("ssh-key")
def ssh_key(
    ctx: typer.Context,
    name: NameArg,
    *,
    out: Annotated[
        str | None,
        typer.Option("--output-file", "-O", metavar="FILE", help="Write the key to FILE (0600), not stdout."),
    ] = None,
) -> None:
    """Print the private SSH key the agent generated for a VM (operators; every read is audited)."""
    s = settings(ctx)
    client = s.client()
    response: vms_pb2.GetVmSshKeyResponse = client.call(client.vms.GetVmSshKey, vms_pb2.GetVmSshKeyRequest(name=name))
    if out is not None:
        from clonebox_core.secrets.sshkeys import write_private_key

        write_private_key(Path(out), Secret(response.private_key))
        if s.json:
            output.emit_json({"vm": name, "user": response.user, "host": response.host, "file": out})
        else:
            typer.echo(f"wrote {out} (0600): ssh -i {out} {response.user}@<address of {name}>", err=True)
        return
    if s.json:
        output.emit_json(
            {"vm": name, "user": response.user, "host": response.host, "private_key": response.private_key}
        )
        return
    sys.stdout.write(response.private_key)
