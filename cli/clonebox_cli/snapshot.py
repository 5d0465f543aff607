"""
``clonebox snapshot``: take, list, show, restore, delete, prune, export and import VM snapshots.

Every call goes through the controller to the agent of the VM's host (snapshots live with the disks).
Mutations carry a request id (a fresh uuid4 unless ``--request-id`` is given), so a retry never acts
twice.

Export files (format: ``clonebox_core.snapshot_archive``) are written to ``FILE.partial`` and renamed to
``FILE`` only once the whole stream arrived and checked out, so a ``FILE`` is always complete; on any
error the partial file is removed. ``--encrypt --passphrase REF`` encrypts it; REF is a secret reference
(``env:VAR``, ``file:PATH``, ``age:``, ``sops:``, ``vault:``) resolved on this machine, never sent.
An import reads the file as it sends it; if the file turns out damaged part-way (a bad chunk, a wrong
passphrase, a missing end), the stream is cancelled and the agent keeps nothing.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from clonebox.controller.v1 import snapshot_service_pb2 as ss_pb2
from clonebox.type.v1 import snapshot_pb2
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TextColumn, TransferSpeedColumn
from rich.tree import Tree

from clonebox_cli import output
from clonebox_cli.client import ControllerClient
from clonebox_cli.context import Settings, settings
from clonebox_core.errors import AlreadyExists, InvalidArgument, NotFound
from clonebox_core.model import VmState
from clonebox_core.units import format_duration_ms, format_size, parse_duration_ms, parse_size

if TYPE_CHECKING:
    from clonebox_core.secret import Secret

app = typer.Typer(
    help="VM snapshots: take, list, restore, delete, prune by policy, export to a file and import.",
    no_args_is_help=True,
)

_MIB = 1024 * 1024

VmArg = Annotated[str, typer.Argument(metavar="VM", help="VM name.")]
SnapArg = Annotated[str, typer.Argument(metavar="NAME", help="Snapshot name.")]
RequestIdOpt = Annotated[
    str | None,
    typer.Option(
        "--request-id", help="Idempotency key; a retry with the same id never acts twice. Default: a new uuid4."
    ),
]
PassphraseOpt = Annotated[
    str | None,
    typer.Option(
        "--passphrase",
        metavar="REF",
        help="Secret reference of the passphrase (env:VAR, file:PATH, age:..., sops:..., vault:...); never a literal.",
    ),
]


def interactive() -> bool:
    """Whether a person can answer a prompt (stdin is a terminal); scripts are never asked."""
    return sys.stdin.isatty()


def _request_id(given: str | None) -> str:
    if given is not None and not given.strip():
        raise InvalidArgument("--request-id must not be empty", reason="INVALID_REQUEST_ID")
    return given or str(uuid.uuid4())


# ------------------------------------------------------------------------------------------ rendering


def human_bytes(n: int) -> str:
    """Round a byte count for tables: ``512B``, ``3.4KiB``, ``1.2GiB`` (exact counts are in JSON)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            text = f"{value:.1f}".removesuffix(".0") if unit != "B" else str(int(value))
            return f"{text}{unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def kind_name(value: snapshot_pb2.SnapshotKind.ValueType) -> str:
    """``internal``, ``external`` or ``-``."""
    return {snapshot_pb2.SNAPSHOT_KIND_INTERNAL: "internal", snapshot_pb2.SNAPSHOT_KIND_EXTERNAL: "external"}.get(
        value, "-"
    )


def _vm_state(value: int) -> str:
    try:
        return VmState(value).name.lower()
    except ValueError:
        return "-"


def _contents(s: snapshot_pb2.Snapshot) -> str:
    """What the snapshot holds: ``disks+memory``, ``disks (quiesced)``..."""
    text = "disks+memory" if s.has_memory else "disks"
    return text + (" (quiesced)" if s.quiesced else "")


def _created(s: snapshot_pb2.Snapshot) -> str:
    return output.age(output.timestamp(s, "create_time"))


def snapshot_table(snaps: Sequence[snapshot_pb2.Snapshot]) -> Any:
    """One row per snapshot, oldest first; the VM's disks descend from the one marked ``*``."""
    table = output.make_table(
        "", "NAME", "PARENT", "KIND", "HOLDS", "VM STATE", "SIZE", "AGE", "CREATOR", "DESCRIPTION"
    )
    for s in snaps:
        table.add_row(
            "*" if s.current else "",
            s.name,
            s.parent or "-",
            kind_name(s.kind),
            _contents(s),
            _vm_state(s.vm_state),
            human_bytes(s.size_bytes),
            _created(s),
            s.creator or "-",
            s.description or (f"({s.reason})" if s.automatic and s.reason else "-"),
        )
    return table


def _tree_label(s: snapshot_pb2.Snapshot) -> str:
    label = f"[bold]{s.name}[/bold]" if s.current else s.name
    label += f"  {kind_name(s.kind)}, {_contents(s)}, {human_bytes(s.size_bytes)}, {_created(s)} ago"
    if s.automatic:
        label += f", automatic ({s.reason})" if s.reason else ", automatic"
    if s.current:
        label += "  [green]<- current[/green]"
    return label


def snapshot_tree(vm: str, snaps: Sequence[snapshot_pb2.Snapshot]) -> Tree:
    """The VM's snapshots as their tree (children under their parent, oldest first)."""
    by_name = {s.name: s for s in snaps}
    tree = Tree(f"vm {vm}" + ("" if snaps else " (no snapshots)"))
    children: dict[str, list[snapshot_pb2.Snapshot]] = {}
    roots: list[snapshot_pb2.Snapshot] = []
    for s in snaps:
        if s.parent and s.parent in by_name:
            children.setdefault(s.parent, []).append(s)
        else:
            roots.append(s)  # a root, or a child whose parent is gone: shown at the top, never lost

    def add(node: Tree, s: snapshot_pb2.Snapshot, seen: set[str]) -> None:
        branch = node.add(_tree_label(s))
        seen.add(s.name)
        for child in children.get(s.name, []):
            if child.name not in seen:  # a cycle from a broken agent must not loop forever
                add(branch, child, seen)

    seen: set[str] = set()
    for root in roots:
        add(tree, root, seen)
    return tree


def snapshot_details(s: snapshot_pb2.Snapshot) -> Any:
    """Every field of one snapshot."""
    grid = output.make_table("", "")
    grid.show_header = False
    rows = [
        ("Name", s.name),
        ("VM", s.vm),
        ("Kind", kind_name(s.kind)),
        ("Holds", _contents(s)),
        ("VM state", _vm_state(s.vm_state)),
        ("Size", f"{human_bytes(s.size_bytes)} ({s.size_bytes} bytes)"),
        ("Created", output.when(output.timestamp(s, "create_time"))),
        ("Creator", s.creator or "-"),
        ("Automatic", f"yes ({s.reason})" if s.automatic else "no"),
        ("Parent", s.parent or "-"),
        ("Children", ", ".join(s.children) or "-"),
        ("Current", "yes (the VM's disks descend from it)" if s.current else "no"),
        ("Description", s.description or "-"),
        ("Tags", ",".join(f"{k}={v}" for k, v in sorted(s.tags.items())) or "-"),
    ]
    for key, value in rows:
        grid.add_row(f"[bold]{key}[/bold]", value)
    return grid


def policy_lines(p: snapshot_pb2.SnapshotPolicy) -> list[str]:
    """The rules in force, one per line (``none`` when every rule is off)."""
    lines = [
        f"{label} {value}"
        for label, value in (
            ("keep-last", p.keep_last),
            ("keep-hourly", p.keep_hourly),
            ("keep-daily", p.keep_daily),
            ("keep-weekly", p.keep_weekly),
        )
        if value
    ]
    if p.max_age_seconds:
        lines.append(f"max-age {format_duration_ms(p.max_age_seconds * 1000)}")
    if p.max_total_bytes:
        size = p.max_total_bytes
        lines.append(f"max-total-size {format_size(size // _MIB) if size % _MIB == 0 else f'{size} bytes'}")
    return lines or ["none (every snapshot is kept)"]


# ------------------------------------------------------------------------------------------ progress


class ByteProgress:
    """A byte progress bar on stderr when it is a terminal; silent otherwise (stdout stays parseable)."""

    def __init__(self, description: str) -> None:
        self._description = description
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def __enter__(self) -> ByteProgress:
        if sys.stderr.isatty():
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(binary_units=True),
                TransferSpeedColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task(self._description, total=None)
        return self

    def total(self, n: int) -> None:
        """The number of bytes expected."""
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, total=n or None)

    def advance(self, n: int) -> None:
        """``n`` more bytes went through."""
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, n)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()


def _counted(
    parts: Iterable[snapshot_pb2.SnapshotImagePart], bar: ByteProgress
) -> Iterator[snapshot_pb2.SnapshotImagePart]:
    for part in parts:
        which = part.WhichOneof("part")
        if which == "header":
            bar.total(sum(d.image_bytes for d in part.header.disks))
        elif which == "chunk":
            bar.advance(len(part.chunk.data))
        yield part


# ------------------------------------------------------------------------------------------- secrets


def resolve_passphrase(ref: str, option: str = "--passphrase") -> bytes:
    """The passphrase a secret reference names, read on this machine (the reference is never a literal)."""
    from clonebox_core.secrets.providers import SecretRef, default_resolver

    parsed = SecretRef.parse(ref, field=option)
    value: Secret = default_resolver(os.environ, base_dir=Path.cwd()).resolve(parsed, field=option)
    return value.reveal().encode("utf-8")


# ------------------------------------------------------------------------------------------ commands


@app.command("create")
def create(
    ctx: typer.Context,
    vm: VmArg,
    name: Annotated[str, typer.Argument(metavar="[NAME]", help="Snapshot name (default: one from the time).")] = "",
    *,
    description: Annotated[str, typer.Option("--description", "-d", metavar="TEXT", help="Free text.")] = "",
    tag: Annotated[list[str] | None, typer.Option("--tag", metavar="KEY=VALUE", help="A label (repeatable).")] = None,
    disk_only: Annotated[
        bool,
        typer.Option(
            "--disk-only", help="External disk-only snapshot (no memory); the only kind for VMs with shared folders."
        ),
    ] = False,
    quiesce: Annotated[
        bool, typer.Option("--quiesce", help="Freeze the guest's filesystems through qemu-ga (with --disk-only).")
    ] = False,
    request_id: RequestIdOpt = None,
) -> None:
    """
    Take a snapshot of a VM.

    By default an internal snapshot, with the guest's memory when the VM runs (a restore returns to
    that very instant). A VM with shared folders cannot have its memory saved: use --disk-only
    --quiesce. Shared folder contents are never part of a snapshot, and neither are volumes: a VM
    with volumes takes disk-only snapshots.
    """
    s = settings(ctx)
    if quiesce and not disk_only:
        raise InvalidArgument("--quiesce applies to disk-only snapshots: add --disk-only", reason="INVALID_FLAG")
    tags: dict[str, str] = {}
    for item in tag or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{item!r}: use KEY=VALUE", param_hint="--tag")
        tags[key] = value
    client = s.client()
    request = ss_pb2.CreateSnapshotRequest(
        vm=vm,
        name=name,
        description=description,
        tags=tags,
        kind=snapshot_pb2.SNAPSHOT_KIND_EXTERNAL if disk_only else snapshot_pb2.SNAPSHOT_KIND_UNSPECIFIED,
        quiesce=quiesce,
        request_id=_request_id(request_id),
    )
    # a memory snapshot of a big guest takes a while
    snap = client.call(client.snapshots.CreateSnapshot, request, timeout=3600).snapshot
    if s.json:
        output.emit_json(output.message_dict(snap))
        return
    typer.echo(
        f"snapshot {snap.name} of vm {vm} taken ({kind_name(snap.kind)}, {_contents(snap)}, "
        f"{human_bytes(snap.size_bytes)})"
    )


def list_snapshots(client: ControllerClient, vm: str) -> ss_pb2.ListSnapshotsResponse:
    """ListSnapshots: a VM's snapshots, oldest first, and its retention policy."""
    response: ss_pb2.ListSnapshotsResponse = client.call(
        client.snapshots.ListSnapshots, ss_pb2.ListSnapshotsRequest(vm=vm)
    )
    return response


@app.command("list")
def list_(
    ctx: typer.Context,
    vm: VmArg,
    *,
    tree: Annotated[bool, typer.Option("--tree", help="Draw the snapshots as their tree.")] = False,
) -> None:
    """List a VM's snapshots, oldest first (* marks the one the VM's disks descend from)."""
    s = settings(ctx)
    response = list_snapshots(s.client(), vm)
    if s.json:
        output.emit_json(
            {
                "vm": vm,
                "snapshots": [output.message_dict(x) for x in response.snapshots],
                "policy": output.message_dict(response.policy),
            }
        )
        return
    console = output.console()
    if tree:
        console.print(snapshot_tree(vm, response.snapshots))
    elif response.snapshots:
        console.print(snapshot_table(response.snapshots))
    else:
        console.print(f"vm {vm} has no snapshots")


def find_snapshot(response: ss_pb2.ListSnapshotsResponse, vm: str, name: str) -> snapshot_pb2.Snapshot:
    """The snapshot ``name`` in a listing; NotFound SNAPSHOT_NOT_FOUND as the agent would say."""
    for snap in response.snapshots:
        if snap.name == name:
            return snap
    raise NotFound(f"vm {vm} has no snapshot {name!r}", reason="SNAPSHOT_NOT_FOUND", metadata={"vm": vm, "name": name})


@app.command("show")
def show(ctx: typer.Context, vm: VmArg, name: SnapArg) -> None:
    """Show one snapshot."""
    s = settings(ctx)
    snap = find_snapshot(list_snapshots(s.client(), vm), vm, name)
    if s.json:
        output.emit_json(output.message_dict(snap))
        return
    output.console().print(snapshot_details(snap))


@app.command("restore")
def restore(
    ctx: typer.Context,
    vm: VmArg,
    name: SnapArg,
    *,
    no_start: Annotated[bool, typer.Option("--no-start", help="Leave the VM stopped afterwards.")] = False,
    no_backup: Annotated[
        bool, typer.Option("--no-backup", help="Take no backup snapshot of the current state first.")
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    request_id: RequestIdOpt = None,
) -> None:
    """
    Return a VM to a snapshot.

    The current state is first saved as an automatic backup snapshot (unless --no-backup), so a
    restore can be undone. On a terminal it asks for confirmation unless --yes.
    """
    s = settings(ctx)
    if not yes and interactive():
        lost = "its current state will be lost" if no_backup else "its current state is kept as a backup snapshot"
        typer.confirm(f"restore vm {vm} to snapshot {name}? ({lost})", abort=True, err=True)
    client = s.client()
    request = ss_pb2.RestoreSnapshotRequest(
        vm=vm, name=name, no_start=no_start, no_backup=no_backup, request_id=_request_id(request_id)
    )
    response = client.call(client.snapshots.RestoreSnapshot, request, timeout=3600)
    if s.json:
        output.emit_json(output.message_dict(response))
        return
    line = f"vm {vm} restored to snapshot {name} (now {_vm_state(response.vm.state)})"
    if response.HasField("backup"):
        line += f"; the previous state is snapshot {response.backup.name}"
    typer.echo(line)


@app.command("delete")
def delete(
    ctx: typer.Context,
    vm: VmArg,
    name: SnapArg,
    *,
    children: Annotated[bool, typer.Option("--children", help="Also delete its descendants.")] = False,
    request_id: RequestIdOpt = None,
) -> None:
    """Delete a snapshot (its children are re-parented), or it and its descendants with --children."""
    s = settings(ctx)
    client = s.client()
    request = ss_pb2.DeleteSnapshotRequest(vm=vm, name=name, children=children, request_id=_request_id(request_id))
    response = client.call(client.snapshots.DeleteSnapshot, request, timeout=3600)
    if s.json:
        output.emit_json({"vm": vm, "deleted": list(response.deleted)})
        return
    typer.echo(f"deleted from vm {vm}: {', '.join(response.deleted) or 'nothing'}")


@app.command("prune")
def prune(
    ctx: typer.Context,
    vm: VmArg,
    *,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only show what the policy would delete.")] = False,
    request_id: RequestIdOpt = None,
) -> None:
    """Apply the VM's retention policy now: a table of what is kept and deleted, with the rule that decided."""
    s = settings(ctx)
    client = s.client()
    request = ss_pb2.PruneSnapshotsRequest(vm=vm, dry_run=dry_run, request_id=_request_id(request_id))
    response = client.call(client.snapshots.PruneSnapshots, request, timeout=3600)
    if s.json:
        output.emit_json(
            {"vm": vm, "dry_run": dry_run, "decisions": [output.message_dict(d) for d in response.decisions]}
        )
        return
    table = output.make_table("NAME", "ACTION", "REASON")
    for d in response.decisions:
        action = "keep" if d.keep else ("would delete" if dry_run else "deleted")
        table.add_row(d.name, action, d.reason or "-")
    console = output.console()
    if response.decisions:
        console.print(table)
    deleted = sum(1 for d in response.decisions if not d.keep)
    verb = "would delete" if dry_run else "deleted"
    console.print(f"{verb} {deleted} of {len(response.decisions)} snapshot(s) of vm {vm}")


def _duration_seconds(text: str) -> int:
    try:
        return parse_duration_ms(text) // 1000
    except ValueError as exc:
        raise InvalidArgument(f"--max-age: {exc}", reason="INVALID_FLAG", metadata={"field": "--max-age"}) from None


def _size_bytes(text: str) -> int:
    try:
        return parse_size(text) * _MIB
    except ValueError as exc:
        raise InvalidArgument(
            f"--max-total-size: {exc}", reason="INVALID_FLAG", metadata={"field": "--max-total-size"}
        ) from None


@app.command("policy")
def policy(
    ctx: typer.Context,
    vm: VmArg,
    *,
    keep_last: Annotated[int | None, typer.Option("--keep-last", min=0, metavar="N", help="Keep the newest N.")] = None,
    keep_hourly: Annotated[
        int | None,
        typer.Option("--keep-hourly", min=0, metavar="N", help="Keep the newest of each of the last N hours."),
    ] = None,
    keep_daily: Annotated[
        int | None, typer.Option("--keep-daily", min=0, metavar="N", help="Keep the newest of each of the last N days.")
    ] = None,
    keep_weekly: Annotated[
        int | None,
        typer.Option("--keep-weekly", min=0, metavar="N", help="Keep the newest of each of the last N weeks."),
    ] = None,
    max_age: Annotated[
        str | None,
        typer.Option("--max-age", metavar="DURATION", help="Delete snapshots older than this (30d, 12h; 0s: off)."),
    ] = None,
    max_total_size: Annotated[
        str | None,
        typer.Option(
            "--max-total-size", metavar="SIZE", help="Delete the oldest while all hold more than this (20GiB; 0: off)."
        ),
    ] = None,
    clear: Annotated[bool, typer.Option("--clear", help="Turn every rule off (keep everything).")] = False,
    request_id: RequestIdOpt = None,
) -> None:
    """
    Show a VM's retention policy, or change it.

    Without options it shows the policy. Options change only the rules they name (0 turns a rule off);
    --clear turns them all off first. The agent applies the policy on its schedule; 'snapshot prune'
    applies it now. Keep rules win over max-age and max-total-size.
    """
    s = settings(ctx)
    client = s.client()
    given = {
        "keep_last": keep_last,
        "keep_hourly": keep_hourly,
        "keep_daily": keep_daily,
        "keep_weekly": keep_weekly,
        "max_age_seconds": None if max_age is None else _duration_seconds(max_age),
        "max_total_bytes": None if max_total_size is None else _size_bytes(max_total_size),
    }
    changes = {k: v for k, v in given.items() if v is not None}
    if not changes and not clear:
        current = list_snapshots(client, vm).policy
        if s.json:
            output.emit_json({"vm": vm, "policy": output.message_dict(current)})
        else:
            typer.echo(f"retention policy of vm {vm}:")
            for line in policy_lines(current):
                typer.echo(f"  {line}")
        return
    new = snapshot_pb2.SnapshotPolicy() if clear else list_snapshots(client, vm).policy
    for key, value in changes.items():
        setattr(new, key, value)
    request = ss_pb2.SetSnapshotPolicyRequest(vm=vm, policy=new, request_id=_request_id(request_id))
    result = client.call(client.snapshots.SetSnapshotPolicy, request).policy
    if s.json:
        output.emit_json({"vm": vm, "policy": output.message_dict(result)})
        return
    typer.echo(f"retention policy of vm {vm} set:")
    for line in policy_lines(result):
        typer.echo(f"  {line}")


# ------------------------------------------------------------------------------------- export/import


@dataclass(frozen=True)
class Exported:
    """What an export wrote."""

    file: str
    vm: str
    snapshot: str
    encrypted: bool
    chunks: int
    plaintext_bytes: int
    file_bytes: int
    sha256: str

    def as_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return dict(self.__dict__)


def partial_path(out: Path) -> Path:
    """Where an export to ``out`` is written until it is complete."""
    from clonebox_core.snapshot_archive import PARTIAL_SUFFIX

    return out.with_name(out.name + PARTIAL_SUFFIX)


def export_to_file(
    client: ControllerClient, vm: str, name: str, out: Path, *, passphrase: bytes | None, force: bool
) -> Exported:
    """
    Stream snapshot ``name`` of ``vm`` into the archive file ``out`` (see the module doc).

    Refuses (AlreadyExists FILE_EXISTS) to replace an existing ``out`` unless ``force``. The file is
    written as ``out.partial``, fsynced, then renamed; on any error (or Ctrl-C) the partial file is
    removed and ``out`` is untouched.
    """
    from clonebox_core.snapshot_archive import write_archive_file

    if out.exists() and not force:
        raise AlreadyExists(
            f"{out} exists: pass --force to overwrite it", reason="FILE_EXISTS", metadata={"file": str(out)}
        )
    if out.is_dir():
        raise InvalidArgument(f"{out} is a directory: give a file name", reason="INVALID_FLAG")
    request = ss_pb2.ExportSnapshotRequest(vm=vm, name=name)
    with ByteProgress(f"export {vm}/{name}") as bar:
        parts = (r.part for r in client.stream(client.snapshots.ExportSnapshot, request))
        summary = write_archive_file(out, _counted(parts, bar), passphrase=passphrase)
    return Exported(
        file=str(out),
        vm=vm,
        snapshot=name,
        encrypted=passphrase is not None,
        chunks=summary.chunks,
        plaintext_bytes=summary.plaintext_bytes,
        file_bytes=summary.file_bytes,
        sha256=summary.sha256,
    )


def print_exported(s: Settings, done: Exported) -> None:
    """Say what an export wrote (JSON: the summary)."""
    if s.json:
        output.emit_json(done.as_dict())
        return
    typer.echo(
        f"exported snapshot {done.snapshot} of vm {done.vm} to {done.file} "
        f"({human_bytes(done.file_bytes)}{', encrypted' if done.encrypted else ''}; sha256 {done.sha256})"
    )


@app.command("export")
def export(
    ctx: typer.Context,
    vm: VmArg,
    name: SnapArg,
    *,
    out: Annotated[str, typer.Option("--output-file", "-o", metavar="FILE", help="The export file to write.")],
    encrypt: Annotated[bool, typer.Option("--encrypt", help="Encrypt the file (needs --passphrase).")] = False,
    passphrase: PassphraseOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite FILE if it exists.")] = False,
) -> None:
    """
    Export a VM's disks at a snapshot, flattened, with the VM's spec, to a file.

    The file is complete or absent: it is written as FILE.partial and renamed at the end. Import it
    with 'clonebox snapshot import FILE' (on any host of any fleet).
    """
    s = settings(ctx)
    if encrypt and passphrase is None:
        raise InvalidArgument("--encrypt needs --passphrase REF (e.g. env:VAR or file:PATH)", reason="INVALID_FLAG")
    if passphrase is not None and not encrypt:
        raise InvalidArgument("--passphrase is for --encrypt: add --encrypt", reason="INVALID_FLAG")
    secret = resolve_passphrase(passphrase) if passphrase is not None else None
    print_exported(s, export_to_file(s.client(), vm, name, Path(out), passphrase=secret, force=force))


def _import_requests(
    parts: Iterable[snapshot_pb2.SnapshotImagePart], *, as_name: str, host: str, request_id: str
) -> Iterator[ss_pb2.ImportSnapshotRequest]:
    for part in parts:
        if part.WhichOneof("part") == "header":
            if as_name:
                part.header.spec.name = as_name
            part.header.host = host
            part.header.request_id = request_id
        yield ss_pb2.ImportSnapshotRequest(part=part)


@app.command("import")
def import_(
    ctx: typer.Context,
    file: Annotated[str, typer.Argument(metavar="FILE", help="An export file.")],
    *,
    as_name: Annotated[
        str, typer.Option("--as", metavar="NAME", help="Name of the new VM (default: the exported VM's).")
    ] = "",
    host: Annotated[str, typer.Option("--host", help="Place it on this host (default: the controller chooses).")] = "",
    passphrase: PassphraseOpt = None,
    request_id: RequestIdOpt = None,
) -> None:
    """
    Make a new, stopped VM from an export file.

    The VM's name must be free in the fleet (--as picks another). The file is read and checked as it is
    sent; if it turns out damaged, or the passphrase is wrong, the import is cancelled and nothing is kept.
    """
    from clonebox_core.snapshot_archive import read_archive

    s = settings(ctx)
    path = Path(file)
    secret = resolve_passphrase(passphrase) if passphrase is not None else None
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below, after the stream that reads it
    except FileNotFoundError:
        raise InvalidArgument(f"{file}: no such file", reason="INVALID_FLAG") from None
    except OSError as exc:
        raise InvalidArgument(f"{file}: cannot read: {exc.strerror}", reason="INVALID_FLAG") from None
    with f:
        client = s.client()
        with ByteProgress(f"import {path.name}") as bar:
            requests = _import_requests(
                _counted(read_archive(f, passphrase=secret), bar),
                as_name=as_name,
                host=host,
                request_id=_request_id(request_id),
            )
            response: ss_pb2.ImportSnapshotResponse = client.send_stream(client.snapshots.ImportSnapshot, requests)
    vm = response.vm
    if s.json:
        output.emit_json(output.message_dict(vm))
        return
    typer.echo(
        f"imported vm {vm.name} on host {vm.host or '-'} ({_vm_state(vm.state)}); "
        f"start it with 'clonebox vm start {vm.name}'"
    )


def newest_snapshot(response: ss_pb2.ListSnapshotsResponse) -> snapshot_pb2.Snapshot | None:
    """The most recently taken snapshot of a listing (None when there is none)."""
    snaps = list(response.snapshots)
    if not snaps:
        return None
    return max(snaps, key=lambda x: (x.create_time.seconds, x.create_time.nanos))
