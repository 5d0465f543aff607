"""
``clonebox up``, ``down``, ``ps`` and ``clonebox plan …``: multi-VM plans (``clonebox-compose.yaml``).

A plan file is read here (``clonebox_core.planfile``), and each VM's spec is resolved on this machine
exactly like ``vm create`` resolves a spec (``clonebox_cli.specinput.prepare``: SSH key sources become
public keys, a password reference becomes a hash, a one-time password is generated and shown once).
The controller's PlanService stores the plan as a revision and runs it; ``up`` and ``down`` follow the
run (``WatchPlan``) and show each VM's progress: a table redrawn in place on a terminal, one line per
change on a pipe, one JSON object per run version with ``-o json``. The watch survives the controller
going away: it reconnects with back-off (``_FIRST_BACKOFF`` doubling to ``_MAX_BACKOFF``) and resumes
after the last run version it saw; Ctrl-C stops following, not the run.

Mutations carry a request id made once per invocation (or ``--request-id``); the client retries a call
that never reached the controller with the same request, so a retry never starts a second run.

Exit codes: 0 when the run succeeded; ``EXIT_RUN_FAILED`` (1, "generic failure" in
``clonebox_cli.errors``, which no CloneBox error uses) when it ended failed or rolled back, with a last
line on stderr naming the VM, the health check that failed it and the error; otherwise the usual codes
of ``clonebox_cli.errors`` (2 for an invalid plan file, 3 for an unknown plan, 6 when the plan does not
fit the fleet, 9 when the controller cannot be reached, ...).
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from clonebox.controller.v1 import health_service_pb2 as hs_pb2
from clonebox.controller.v1 import plan_service_pb2 as ps_pb2
from clonebox.controller.v1 import vm_service_pb2 as vms_pb2
from clonebox.type.v1 import plan_pb2, vm_pb2
from rich.console import Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from clonebox_cli import output
from clonebox_cli.client import ControllerClient
from clonebox_cli.context import Settings, settings
from clonebox_cli.errors import TlsHandshakeFailed, one_line
from clonebox_core.errors import CloneboxError, DeadlineExceeded, InvalidArgument, Unavailable
from clonebox_core.model import VmState
from clonebox_core.plan import (
    LABEL_PLAN,
    LABEL_SERVICE,
    ChangeKind,
    FailurePolicy,
    Plan,
    PlanRun,
    RunState,
    VmChange,
    VmRunState,
    VmStatus,
    VolumeChange,
    VolumeChangeKind,
)
from clonebox_core.units import format_duration_ms

if TYPE_CHECKING:
    from clonebox_core.secret import Secret

app = typer.Typer(
    help="Multi-VM plans (clonebox-compose.yaml): validate, diff, show, list, history, watch. "
    "'clonebox up', 'down' and 'ps' apply, remove and list them.",
    no_args_is_help=True,
)

#: the plan file ``up``, ``down`` and ``plan …`` read when no -f is given (in the current folder)
DEFAULT_PLAN_FILE = "clonebox-compose.yaml"
#: exit code when a run ends FAILED or ROLLED_BACK (1 is "generic failure" in clonebox_cli.errors)
EXIT_RUN_FAILED = 1
#: first pause before a watch reconnects; doubles up to ``_MAX_BACKOFF``
_FIRST_BACKOFF = 0.2
_MAX_BACKOFF = 5.0
#: stop reconnecting after an outage this long: the run goes on, and the user is told how to follow it
_GIVE_UP_AFTER = 300.0
#: a watch stream open this long worked, even without a message (a VM may take minutes to boot)
_STEADY_STREAM = 10.0
#: how often the live table refreshes by itself (redraws also happen at once on every change)
_REFRESH_PER_SECOND = 2.0

FileOpt = Annotated[
    str | None,
    typer.Option(
        "--file",
        "-f",
        metavar="FILE",
        help=f"Plan file \\[default: {DEFAULT_PLAN_FILE} in the current folder]",
        show_default=False,
    ),
]
RequestIdOpt = Annotated[
    str | None,
    typer.Option(
        "--request-id", help="Idempotency key; a retry with the same id never starts a second run. Default: a uuid4."
    ),
]
DetachOpt = Annotated[
    bool, typer.Option("--detach", "-d", help="Start the run and return; print its id and how to watch it.")
]
NameArg = Annotated[str, typer.Argument(metavar="NAME", help="Plan name.")]


# ------------------------------------------------------------------------------------ plan files


def plan_path(file: str | None) -> Path:
    """The plan file to read: ``file``, else ``clonebox-compose.yaml`` here; an error names the path when absent."""
    path = Path(file if file is not None else DEFAULT_PLAN_FILE)
    if path.is_dir():
        raise InvalidArgument(f"{path}: is a directory, not a plan file", reason="PLAN_FILE_NOT_FOUND")
    if not path.exists():
        if file is None:
            message = (
                f"{DEFAULT_PLAN_FILE}: no such file in {Path.cwd()}: "
                "run this in the folder of your plan, or pass -f FILE (see examples/stack/)"
            )
        else:
            message = f"{file}: no such file: give the path of a plan file (clonebox-compose.yaml)"
        raise InvalidArgument(message, reason="PLAN_FILE_NOT_FOUND", metadata={"path": str(path)})
    return path


def load_plan(file: str | None) -> tuple[Plan, Path]:
    """Read and check the plan file; its errors (``FILE:LINE: path: message``) are raised as they are."""
    from clonebox_core.planfile import load_plan_file

    path = plan_path(file)
    return load_plan_file(path), path


@dataclass(frozen=True)
class ResolvedPlan:
    """A plan whose VM specs are ready to send, with what resolving them had to say."""

    plan: Plan
    #: (vm, user, password) of each VM whose spec asks for a one-time password: shown once, stored nowhere
    one_time_passwords: tuple[tuple[str, str, Secret], ...] = ()
    warnings: tuple[str, ...] = ()


def resolve_plan(plan: Plan, base_dir: Path) -> ResolvedPlan:
    """
    Resolve every VM spec of ``plan`` on this machine, exactly as ``vm create`` resolves a spec file.

    Relative key files and ``file:`` references are looked up from ``base_dir`` (the plan file's folder).
    An error names the service it came from.
    """
    from clonebox_cli.specinput import LoadedSpec, prepare

    vms = []
    passwords: list[tuple[str, str, Secret]] = []
    warnings: list[str] = []
    for vm in plan.vms:
        try:
            prepared = prepare(LoadedSpec(vm.spec, base_dir))
        except CloneboxError as err:
            # the resolver's message names the spec field; say which service's spec it was
            raise type(err)(f"service {vm.service}: {err.message}", reason=err.reason, metadata=err.metadata) from None
        warnings.extend(f"service {vm.service}: {text}" for text in prepared.warnings)
        auth = prepared.spec.auth
        if prepared.one_time_password is not None and auth is not None:
            passwords.append((prepared.spec.name, auth.user, prepared.one_time_password))
        vms.append(dataclasses.replace(vm, spec=prepared.spec))
    return ResolvedPlan(dataclasses.replace(plan, vms=tuple(vms)), tuple(passwords), tuple(warnings))


def _resolved_proto(s: Settings, plan: Plan, path: Path) -> tuple[plan_pb2.Plan, ResolvedPlan]:
    from clonebox_core.rpc.convert_plan import plan_to_proto

    resolved = resolve_plan(plan, path.resolve().parent)
    _warn(s, resolved.warnings)
    return plan_to_proto(resolved.plan), resolved


def _warn(s: Settings, warnings: Iterable[str]) -> None:
    for text in warnings:
        # stderr, so that -o json keeps stdout for the command's documents
        typer.echo(json.dumps({"warning": text}) if s.json else f"warning: {text}", err=True)


def _request_id(given: str | None) -> str:
    if given is not None and not given.strip():
        raise InvalidArgument("--request-id must not be empty", reason="INVALID_REQUEST_ID")
    return given or str(uuid.uuid4())


def _show_one_time_passwords(s: Settings, passwords: Sequence[tuple[str, str, Secret]]) -> None:
    """Each one-time password, once, on stderr (stdout stays the run's progress)."""
    for vm, user, password in passwords:
        if s.json:
            typer.echo(json.dumps({"vm": vm, "user": user, "one_time_password": password.reveal()}), err=True)
        else:
            typer.echo(
                f"one-time password for {user}@{vm}: {password.reveal()}\n"
                "  shown only now and stored nowhere; the first login must set a new password",
                err=True,
            )


# ------------------------------------------------------------------------------------------ rendering


def _words(value: str) -> str:
    """``rolled_back`` -> ``rolled back``: enum values as the tables spell them."""
    return value.replace("_", " ")


def change_word(kind: ChangeKind) -> str:
    """``none``, ``create``, ``in place``, ``restart``, ``replace`` or ``remove``."""
    return _words(kind.value)


def _changes(msgs: Iterable[plan_pb2.VmChange]) -> list[VmChange]:
    from clonebox_core.rpc.convert_plan import change_from_proto

    return [change_from_proto(m) for m in msgs]


def changes_table(changes: Sequence[VmChange]) -> Table:
    """One row per VM: SERVICE, VM, CHANGE, FIELDS."""
    table = output.make_table("SERVICE", "VM", "CHANGE", "FIELDS")
    for c in changes:
        table.add_row(c.service, c.vm, change_word(c.kind), ", ".join(c.fields) or "-")
    return table


def changes_summary(changes: Sequence[VmChange]) -> str:
    """``1 to create, 1 to replace, 2 unchanged``; replacing needs ``--allow-replace``, which this says."""
    counts = {kind: sum(1 for c in changes if c.kind is kind) for kind in ChangeKind}
    parts = [
        f"{counts[kind]} {label}"
        for kind, label in (
            (ChangeKind.CREATE, "to create"),
            (ChangeKind.IN_PLACE, "to change in place"),
            (ChangeKind.RESTART, "to restart"),
            (ChangeKind.REPLACE, "to replace"),
            (ChangeKind.REMOVE, "to remove"),
            (ChangeKind.NONE, "unchanged"),
        )
        if counts[kind]
    ]
    text = ", ".join(parts) or "no VMs"
    if counts[ChangeKind.REPLACE]:
        text += "\nreplace deletes and re-creates a VM (its disks are NOT kept): it needs 'clonebox up --allow-replace'"
    return text


def _print_changes(changes: Sequence[VmChange], volumes: Sequence[VolumeChange] = ()) -> None:
    console = output.console()
    if changes:
        console.print(changes_table(changes))
    console.print(changes_summary(changes))
    if volumes:
        console.print(volumes_table(volumes))
        console.print(volumes_summary(volumes))


def _volume_changes(msgs: Iterable[plan_pb2.VolumeChange]) -> list[VolumeChange]:
    from clonebox_core.rpc.convert_plan import volume_change_from_proto

    return [volume_change_from_proto(m) for m in msgs]


_VOLUME_WORDS = {
    VolumeChangeKind.CREATE: "create",
    VolumeChangeKind.KEEP: "keep (data kept)",
    VolumeChangeKind.DIFFERENT: "different: the run fails",
    VolumeChangeKind.UNKNOWN: "unknown",
}


def volumes_table(volumes: Sequence[VolumeChange]) -> Table:
    """One row per plan volume: VOLUME, AGENT VOLUME, HOST, SIZE, SHARED, USED BY, CHANGE (with why)."""
    table = output.make_table("VOLUME", "AGENT VOLUME", "HOST", "SIZE", "SHARED", "USED BY", "CHANGE")
    for v in volumes:
        change = _VOLUME_WORDS[v.kind] + (f" ({v.detail})" if v.detail else "")
        table.add_row(
            v.name,
            v.volume,
            v.host or "-",
            output.human_size(v.size_mib),
            "yes" if v.shared else "no",
            ", ".join(v.services) or "-",
            change,
        )
    return table


def volumes_summary(volumes: Sequence[VolumeChange]) -> str:
    """``volumes: 1 to create, 1 kept``; a different one is said to fail the run, with the way out."""
    counts = {kind: sum(1 for v in volumes if v.kind is kind) for kind in VolumeChangeKind}
    parts = [
        f"{counts[kind]} {label}"
        for kind, label in (
            (VolumeChangeKind.CREATE, "to create"),
            (VolumeChangeKind.KEEP, "kept"),
            (VolumeChangeKind.DIFFERENT, "different"),
            (VolumeChangeKind.UNKNOWN, "unknown"),
        )
        if counts[kind]
    ]
    text = "volumes: " + ", ".join(parts)
    if counts[VolumeChangeKind.DIFFERENT]:
        text += (
            "\na volume's size and sharing cannot change: keep them as they were, or delete the volume "
            "and its data first ('clonebox down NAME --volumes')"
        )
    return text


def _run(msg: plan_pb2.PlanRun) -> PlanRun:
    from clonebox_core.rpc.convert_plan import run_from_proto

    return run_from_proto(msg)


def vm_detail(v: VmStatus) -> str:
    """The STEP / ERROR cell: what the VM is doing, or why it failed (naming the health check)."""
    if v.state is VmRunState.FAILED or v.error:
        probe = f"health check {v.failed_probe!r} failed" if v.failed_probe else ""
        return ": ".join(part for part in (probe, one_line(v.error)) if part) or "failed"
    return v.step or "-"


def progress_table(run: PlanRun) -> Table:
    """The live view: SERVICE, VM, STATE, STEP / ERROR, HOST; one row per VM in dependency order."""
    table = output.make_table("SERVICE", "VM", "STATE", "STEP / ERROR", "HOST")
    for v in run.vms:
        table.add_row(v.service, v.vm, _words(v.state.value), vm_detail(v), v.host or "-")
    return table


def run_heading(run: PlanRun) -> str:
    """``run r-1: up of plan stack revision 2: running``."""
    text = f"run {run.id}: {run.action} of plan {run.plan} revision {run.revision}: {_words(run.state.value)}"
    return text + (f": {one_line(run.error)}" if run.error else "")


def vm_line(v: VmStatus) -> str:
    """One VM's status as one line: ``db stack-db: creating (defining domain) on local``."""
    detail = vm_detail(v)
    text = f"{v.service} {v.vm}: {_words(v.state.value)}"
    if detail != "-":
        text += f" ({detail})"
    return text + (f" on {v.host}" if v.host else "")


@dataclass
class LinePrinter:
    """Turns successive versions of a run into one line per change (for pipes and logs)."""

    #: what was last printed for each VM: a line is printed only when this changes
    seen: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    heading: str = ""

    def lines(self, run: PlanRun) -> list[str]:
        """The lines this version adds: the run's heading when it changed, each VM whose status changed."""
        out: list[str] = []
        heading = run_heading(run)
        first = not self.heading
        for v in run.vms:
            key = (v.state, v.step, v.error, v.failed_probe, v.host)
            if self.seen.get(v.vm) != key:
                self.seen[v.vm] = key
                out.append(vm_line(v))
        if heading != self.heading:
            self.heading = heading
            # the run's first line opens the log; later ones (rolling back, succeeded) follow the VM lines
            if first:
                out.insert(0, heading)
            else:
                out.append(heading)
        return out


@dataclass
class RunView:
    """The latest version of a run, drawn by rich's refresh thread."""

    run: PlanRun | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def set(self, run: PlanRun) -> None:
        """Show ``run`` from the next redraw on."""
        with self.lock:
            self.run = run

    def render(self) -> RenderableType:
        """The table as it is now."""
        with self.lock:
            run = self.run
        if run is None:
            return Text("waiting for the run…", style="dim")
        finished = sum(1 for v in run.vms if v.state in (VmRunState.READY, VmRunState.DELETED))
        caption = f"{finished}/{len(run.vms)} VM(s) done"
        if not run.done:
            caption += " · Ctrl-C stops watching; the run goes on"
        return Group(Text(run_heading(run)), progress_table(run), Text(caption, style="dim"))


def run_json(msg: plan_pb2.PlanRun) -> str:
    """One run version as one JSON line."""
    return json.dumps(output.message_dict(msg), sort_keys=True)


def failure_line(run: PlanRun) -> str:
    """
    Why a run did not succeed, as one line.

    The failed VMs, each with the health check that failed it and its error; when the policy left
    things as they were, what is left and how to clean it up.
    """
    parts = []
    for v in run.vms:
        # a rollback deletes the failed VM too: its status keeps the error and the probe, not the FAILED state
        if v.state is not VmRunState.FAILED and not (v.error or v.failed_probe):
            continue
        text = f"vm {v.vm} (service {v.service})"
        text += f" failed health check {v.failed_probe!r}" if v.failed_probe else " failed"
        if v.error:
            text += f": {one_line(v.error)}"
        parts.append(text)
    line = f"{run.action} of plan {run.plan} {_words(run.state.value)} (run {run.id})"
    if parts:
        line += ": " + "; ".join(parts)
    elif run.error:
        line += f": {one_line(run.error)}"
    if run.state is RunState.FAILED:
        line += f" (left for debugging: see 'clonebox ps {run.plan}', remove with 'clonebox down {run.plan}')"
    return line


def _duration(start: datetime | None, end: datetime | None) -> str:
    """``850ms``, ``42s``, ``3m05s``, ``1h02m`` (``-`` when unknown)."""
    if start is None:
        return "-"
    seconds = ((end or datetime.now(UTC)) - start).total_seconds()
    if seconds < 1:
        return f"{max(0, int(seconds * 1000))}ms"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def _iso(value: datetime | None) -> str:
    return value.isoformat(timespec="seconds") if value is not None else "-"


def run_duration(run: PlanRun) -> str:
    """How long the run took (so far, when it is still going)."""
    return _duration(run.create_time, run.update_time if run.done else None)


# --------------------------------------------------------------------------------------- following


@dataclass
class RunFollower:
    """
    Follows one run through WatchPlan until it is done, across reconnects.

    Each version reaches ``on_run`` once: a resumed stream asks only for versions after the last one
    seen, and anything older it still sends is skipped.
    """

    client: ControllerClient
    on_run: Callable[[plan_pb2.PlanRun], None]
    notice: Callable[[str], None]
    #: a call has reached the controller (after that, losing it means reconnecting, not failing)
    connected: bool = False
    last: plan_pb2.PlanRun | None = None

    def _take(self, msg: plan_pb2.PlanRun) -> None:
        last = self.last
        if last is not None and msg.id == last.id and msg.version <= last.version:
            return  # restated by a resumed stream
        self.last = msg
        self.on_run(msg)

    def follow(self, run: plan_pb2.PlanRun | None, *, plan: str = "", run_id: str = "") -> plan_pb2.PlanRun:
        """
        Follow a run until it is done and return its final version.

        The run is ``run`` (as the caller already has it), else the run ``run_id``, else ``plan``'s latest.
        """
        if run is not None:
            self._take(run)
        delay = _FIRST_BACKOFF
        #: when the current outage began (None: the last stream worked)
        failing_since: float | None = None
        while self.last is None or not self.last.done:
            last = self.last
            request = ps_pb2.WatchPlanRequest(
                run_id=last.id if last is not None else run_id,
                plan=last.plan if last is not None else plan,
                after_version=last.version if last is not None else 0,
            )
            received = 0
            opened = time.monotonic()
            try:
                for response in self.client.stream(self.client.plans.WatchPlan, request):
                    received += 1
                    self.connected = True
                    self._take(response.run)
                    if self.last is not None and self.last.done:
                        return self.last
                reason = "the controller ended the watch"
            except TlsHandshakeFailed:
                raise
            except (Unavailable, DeadlineExceeded) as err:
                if not self.connected:
                    raise  # never reached: a wrong address is an error, not something to wait for
                reason = one_line(err.message) or err.reason
            now = time.monotonic()
            if received or now - opened >= _STEADY_STREAM:
                # the stream worked (a quiet one is normal while a VM boots): an outage starts only now
                failing_since, delay = None, _FIRST_BACKOFF
            if failing_since is None:
                failing_since = now
            elif now - failing_since > _GIVE_UP_AFTER:
                where = f"run {last.id} of plan {last.plan}" if last is not None else f"plan {plan}"
                raise Unavailable(
                    f"lost the controller for {int(now - failing_since)} s while following {where} ({reason}); the "
                    f"run goes on there: follow it with {watch_hint(request.plan, request.run_id)}",
                    reason="WATCH_LOST",
                )
            self.notice(f"reconnecting… ({reason}; next try in {delay:.1f} s)")
            # a fresh channel dials at once (gRPC's own reconnect back-off could wait much longer)
            self.client.reconnect()
            time.sleep(delay)
            delay = min(delay * 2, _MAX_BACKOFF)
        return self.last


def watch_hint(plan: str, run_id: str = "") -> str:
    """The command that follows a run: ``'clonebox plan watch stack --run r-1'``."""
    return f"'clonebox plan watch {plan}" + (f" --run {run_id}'" if run_id else "'")


def _notice(s: Settings) -> Callable[[str], None]:
    def notice(text: str) -> None:
        typer.echo(json.dumps({"notice": text}) if s.json else text, err=True)

    return notice


def watch_run(
    s: Settings,
    client: ControllerClient,
    run: plan_pb2.PlanRun | None,
    *,
    plan: str,
    run_id: str = "",
    connected: bool,
) -> PlanRun:
    """
    Show a run's progress until it is done and return its final version.

    A table redrawn in place on a terminal; one line per change otherwise; one JSON object per run
    version with -o json. Ctrl-C stops watching (the run goes on) and says how to follow it again.
    """
    as_lines = s.json or not output.console().is_terminal
    printer = LinePrinter()
    view = RunView()
    live: Live | None = None

    def on_run(msg: plan_pb2.PlanRun) -> None:
        if s.json:
            typer.echo(run_json(msg))
            return
        converted = _run(msg)
        if as_lines:
            for line in printer.lines(converted):
                typer.echo(line)
        else:
            view.set(converted)
            if live is not None:
                live.refresh()

    follower = RunFollower(client, on_run, _notice(s), connected=connected)
    try:
        if as_lines:
            final = follower.follow(run, plan=plan, run_id=run_id)
        else:
            with Live(
                console=output.console(), get_renderable=view.render, refresh_per_second=_REFRESH_PER_SECOND
            ) as live:
                final = follower.follow(run, plan=plan, run_id=run_id)
    except KeyboardInterrupt:
        last = follower.last
        name, shown_id = (last.plan, last.id) if last is not None else (plan, run_id)
        typer.echo(f"stopped watching; the run goes on: follow it with {watch_hint(name, shown_id)}", err=True)
        raise
    return _run(final)


def finish(s: Settings, run: PlanRun) -> None:
    """Report how a followed run ended: a summary when it succeeded, else the failure line and exit 1."""
    if run.state is RunState.SUCCEEDED:
        if not s.json:
            count = len(run.vms)
            if run.action == "down":
                typer.echo(f"plan {run.plan} is down: {count} VM(s) removed (run {run.id})")
            else:
                typer.echo(f"plan {run.plan} is up: {count} VM(s) ready (run {run.id}, revision {run.revision})")
        return
    typer.echo(f"error: {failure_line(run)}", err=True)
    raise typer.Exit(EXIT_RUN_FAILED)


def _started(s: Settings, msg: plan_pb2.PlanRun) -> None:
    """Report a run that was started but not followed (--detach)."""
    if s.json:
        output.emit_json(output.message_dict(msg))
        return
    typer.echo(
        f"run {msg.id} started: {msg.action} of plan {msg.plan} revision {msg.revision}; "
        f"watch it with {watch_hint(msg.plan, msg.id)}"
    )


def _follow_or_detach(s: Settings, client: ControllerClient, msg: plan_pb2.PlanRun, detach: bool) -> None:
    if detach:
        _started(s, msg)
        return
    # the run's start reached the controller, so a lost watch is an outage to wait out
    finish(s, watch_run(s, client, msg, plan=msg.plan, connected=True))


# ------------------------------------------------------------------------------------------ up/down


def up(
    ctx: typer.Context,
    *,
    file: FileOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Check the plan and print what would change; apply nothing.")
    ] = False,
    detach: DetachOpt = False,
    allow_replace: Annotated[
        bool,
        typer.Option(
            "--allow-replace",
            help="Allow changes that delete and re-create VMs (disks, boot, network, cloud-init); the old VM's "
            "disks are not kept (export a snapshot first if you need them).",
        ),
    ] = False,
    request_id: RequestIdOpt = None,
) -> None:
    """
    Bring a plan up: create or update its VMs in dependency order, each behind its health gate.

    Reads clonebox-compose.yaml (or -f FILE), resolves each VM's SSH keys and password reference here,
    and asks the controller to apply it. Then follows the run: a table of each VM (service, VM, state,
    step or error, host) redrawn in place on a terminal; one line per change on a pipe; one JSON
    object per run version with -o json. Ctrl-C stops watching, not the run.

    Exit code: 0 when the run succeeded; 1 when it failed or was rolled back (the last line names the
    VM, the health check that failed and the error); 2 for an invalid plan file; 6 when the plan does
    not fit the fleet; the other codes of 'clonebox --help'.

    Examples:
      clonebox up
      clonebox up -f stack/clonebox-compose.yaml --dry-run
      clonebox up --detach && clonebox plan watch stack
    """
    s = settings(ctx)
    plan, path = load_plan(file)
    proto, resolved = _resolved_proto(s, plan, path)
    client = s.client()
    if dry_run:
        validated: ps_pb2.ValidatePlanResponse = client.call(
            client.plans.ValidatePlan, ps_pb2.ValidatePlanRequest(plan=proto)
        )
        diff: ps_pb2.DiffPlanResponse = client.call(client.plans.DiffPlan, ps_pb2.DiffPlanRequest(plan=proto))
        levels = [list(level.services) for level in validated.levels]
        if s.json:
            output.emit_json(
                {
                    "dry_run": True,
                    "plan": plan.name,
                    "levels": levels,
                    **output.message_dict(diff),
                }
            )
            return
        typer.echo(f"dry run: nothing was applied. plan {plan.name} (current revision {diff.current_revision or '-'}):")
        _print_levels(levels)
        _print_changes(_changes(diff.changes), _volume_changes(diff.volumes))
        return
    # one id per invocation: the client's retries send this same request, so they find the same run
    request = ps_pb2.ApplyPlanRequest(plan=proto, allow_replace=allow_replace, request_id=_request_id(request_id))
    response: ps_pb2.ApplyPlanResponse = client.call(client.plans.ApplyPlan, request)
    # shown now, not at the end: a long run may be left with Ctrl-C, and the VMs exist from here on
    _show_one_time_passwords(s, resolved.one_time_passwords)
    _follow_or_detach(s, client, response.run, detach)


def down(
    ctx: typer.Context,
    name: Annotated[
        str | None,
        typer.Argument(metavar="NAME", help="Plan name \\[default: the plan in -f FILE]", show_default=False),
    ] = None,
    *,
    file: FileOpt = None,
    with_snapshots: Annotated[
        bool,
        typer.Option("--with-snapshots", help="Also delete VMs that have snapshots, with their snapshots."),
    ] = False,
    volumes: Annotated[
        bool,
        typer.Option(
            "--volumes",
            "-v",
            help="Also delete the plan's volumes, and the data on them, once its VMs are gone. "
            "Without it the volumes are kept, and the next 'clonebox up' attaches them again.",
        ),
    ] = False,
    detach: DetachOpt = False,
    request_id: RequestIdOpt = None,
) -> None:
    """
    Take a plan down: delete its VMs in reverse dependency order.

    The plan is named, or read from -f FILE (default clonebox-compose.yaml here). Progress is shown
    as for 'clonebox up'. The plan's volumes (volumes: in the plan file) are kept, data and all, for
    the next 'clonebox up', unless --volumes deletes them after the VMs. Exit code: 0 when every VM
    (and with --volumes every volume) was removed, 1 when the run failed.

    Examples:
      clonebox down
      clonebox down stack --with-snapshots
      clonebox down stack --volumes
    """
    s = settings(ctx)
    if name is not None and file is not None:
        raise InvalidArgument("give a plan NAME or -f FILE, not both", reason="INVALID_FLAG")
    if name is None:
        name = load_plan(file)[0].name
    client = s.client()
    request = ps_pb2.DestroyPlanRequest(
        name=name, with_snapshots=with_snapshots, request_id=_request_id(request_id), with_volumes=volumes
    )
    response: ps_pb2.DestroyPlanResponse = client.call(client.plans.DestroyPlan, request)
    if detach:
        _started(s, response.run)
        return
    run = watch_run(s, client, response.run, plan=response.run.plan, connected=True)
    finish(s, run)  # exits 1 unless the run succeeded
    if not s.json:
        _say_volumes(client, name, deleted=volumes)


def _say_volumes(client: ControllerClient, name: str, *, deleted: bool) -> None:
    """After a down: which volumes were kept (and how to delete them), or deleted."""
    try:
        plan: ps_pb2.GetPlanResponse = client.call(client.plans.GetPlan, ps_pb2.GetPlanRequest(name=name))
    except CloneboxError:
        return  # the run's own result is what matters; the volumes are in 'clonebox plan show'
    names = [f"{v.name} ({name}-{v.name} on {v.host})" if v.host else v.name for v in plan.plan.volumes]
    if not names:
        return
    if deleted:
        typer.echo(f"volumes deleted with their data: {', '.join(names)}")
    else:
        typer.echo(
            f"volumes kept with their data: {', '.join(names)}; the next 'clonebox up' attaches them again "
            f"('clonebox down {name} --volumes' deletes them)"
        )


# ------------------------------------------------------------------------------------ plan commands


def _print_levels(levels: Sequence[Sequence[str]]) -> None:
    for i, services in enumerate(levels):
        typer.echo(f"level {i}: {', '.join(services)}")


@app.command("validate")
def validate(
    ctx: typer.Context,
    *,
    file: FileOpt = None,
    offline: Annotated[
        bool,
        typer.Option("--offline", help="Check the file here only (schema, names, dependencies); skip the controller."),
    ] = False,
) -> None:
    """
    Check a plan: the file here, then on the controller.

    Here: schema, names, dependency cycles, unknown dependencies. On the controller (unless --offline):
    the capacity of the whole plan, and what applying it would change.

    Prints the dependency levels ("level 0: db") and the changes. Exit code: 0 when valid, 2 for an
    invalid plan, 6 when the plan does not fit the fleet.
    """
    from clonebox_core.plan import check_plan

    s = settings(ctx)
    plan, path = load_plan(file)
    # the checks that need no fleet, here and first: a bad graph is reported without a round trip
    found = check_plan(plan)
    changes: list[VmChange] | None = None
    change_dicts: list[dict[str, Any]] | None = None
    volume_changes: list[VolumeChange] = []
    volume_dicts: list[dict[str, Any]] | None = None
    if not offline:
        proto, _ = _resolved_proto(s, plan, path)
        client = s.client()
        response: ps_pb2.ValidatePlanResponse = client.call(
            client.plans.ValidatePlan, ps_pb2.ValidatePlanRequest(plan=proto)
        )
        found = [list(level.services) for level in response.levels]
        changes = _changes(response.changes)
        volume_changes = _volume_changes(response.volumes)
        change_dicts = [output.message_dict(c) for c in response.changes]
        volume_dicts = [output.message_dict(v) for v in response.volumes]
    if s.json:
        output.emit_json(
            {
                "plan": plan.name,
                "file": str(path),
                "valid": True,
                "offline": offline,
                "levels": found,
                "changes": change_dicts,
                "volumes": volume_dicts,
            }
        )
        return
    vms = f"{len(plan.vms)} VM{'s' if len(plan.vms) != 1 else ''}"
    typer.echo(f"{path}: ok: plan {plan.name}, {vms} in {len(found)} level{'s' if len(found) != 1 else ''}")
    _print_levels(found)
    if changes is None:
        typer.echo("offline: capacity and changes were not checked (leave out --offline to ask the controller)")
    else:
        _print_changes(changes, volume_changes)


@app.command("diff")
def diff(ctx: typer.Context, *, file: FileOpt = None) -> None:
    """
    Show what 'clonebox up' would change, VM by VM: none, create, in place, restart, replace, remove.

    "in place" leaves the guest running (labels, health checks); "restart" stops and starts it (vCPUs,
    memory) and keeps its disks; "replace" deletes and re-creates it (disks, boot, network, cloud-init;
    the old disks are not kept), and needs 'clonebox up --allow-replace'.
    """
    s = settings(ctx)
    plan, path = load_plan(file)
    proto, _ = _resolved_proto(s, plan, path)
    client = s.client()
    response: ps_pb2.DiffPlanResponse = client.call(client.plans.DiffPlan, ps_pb2.DiffPlanRequest(plan=proto))
    if s.json:
        output.emit_json({"plan": plan.name, **output.message_dict(response)})
        return
    current = f"revision {response.current_revision}" if response.current_revision else "nothing applied yet"
    typer.echo(f"plan {plan.name} compared to {current}:")
    _print_changes(_changes(response.changes), _volume_changes(response.volumes))


def _conditions(deps: Iterable[Any]) -> str:
    return ", ".join(f"{d.service} ({d.condition.value})" for d in deps) or "-"


def _policy_text(plan: Plan) -> str:
    u = plan.update
    text = f"{u.max_parallel} at a time, healthy deadline {format_duration_ms(u.healthy_deadline_ms)}"
    if u.min_healthy_time_ms:
        text += f", healthy for {format_duration_ms(u.min_healthy_time_ms)} first"
    return text + (", auto-revert" if u.auto_revert else "")


def _last_run_text(run: PlanRun | None) -> str:
    if run is None:
        return "none"
    text = f"{run.id}: {run.action} revision {run.revision}, {_words(run.state.value)}"
    text += f", started {_iso(run.create_time)}, took {run_duration(run)}"
    return text + (f": {one_line(run.error)}" if run.error else "")


def plan_details(response: ps_pb2.GetPlanResponse) -> RenderableType:
    """A plan's current revision (services, dependencies with conditions, host hints, policies) and latest run."""
    from clonebox_core.rpc.convert_plan import plan_from_proto

    plan = plan_from_proto(response.plan)
    last = _run(response.last_run) if response.HasField("last_run") else None
    on_failure = "roll back" if plan.on_failure is FailurePolicy.ROLLBACK else "leave for debugging"
    rows = [
        ("Plan", plan.name),
        ("Revision", f"{plan.revision}" + (f" ({plan.digest[:19]}…)" if plan.digest else "")),
        ("Stored", output.when(plan.create_time)),
        ("Source", plan.source or "-"),
        ("Update", _policy_text(plan)),
        ("On failure", on_failure),
        ("Latest run", _last_run_text(last)),
    ]
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")
    for key, value in rows:
        grid.add_row(key, value)
    services = output.make_table("SERVICE", "VM", "DEPENDS ON", "HOST", "VCPUS", "MEMORY", "CHECKS")
    for vm in plan.vms:
        services.add_row(
            vm.service,
            vm.spec.name,
            _conditions(vm.depends_on),
            vm.host or "-",
            str(vm.spec.vcpus),
            output.human_size(vm.spec.memory_mib),
            ", ".join(p.name for p in vm.spec.health_checks) or "-",
        )
    if not plan.volumes:
        return Group(grid, Text(""), services)
    volumes = output.make_table("VOLUME", "SIZE", "SHARED", "HOST", "USED BY")
    for vol in plan.volumes:
        users = [v.service for v in plan.vms if vol.name in v.volumes]
        volumes.add_row(
            vol.name,
            output.human_size(vol.size_mib),
            "yes" if vol.shared else "no",
            vol.host or "-",
            ", ".join(users) or "-",
        )
    return Group(grid, Text(""), services, Text(""), volumes)


def _plan_dict(response: ps_pb2.GetPlanResponse) -> dict[str, Any]:
    data = output.message_dict(response)
    data.setdefault("last_run", None)  # a stable key: null when the plan never ran
    return data


@app.command("show")
def show(ctx: typer.Context, *, name: NameArg) -> None:
    """Show a plan's current revision (services, dependencies with conditions, host hints, policies) and latest run."""
    s = settings(ctx)
    client = s.client()
    response: ps_pb2.GetPlanResponse = client.call(client.plans.GetPlan, ps_pb2.GetPlanRequest(name=name))
    if s.json:
        output.emit_json(_plan_dict(response))
        return
    output.console().print(plan_details(response))


@app.command("list")
def list_(ctx: typer.Context) -> None:
    """List plans: revision, VMs, latest run and its state."""
    s = settings(ctx)
    client = s.client()
    response: ps_pb2.ListPlansResponse = client.call(client.plans.ListPlans, ps_pb2.ListPlansRequest())
    items = sorted(response.plans, key=lambda p: p.plan.name)
    if s.json:
        output.emit_json({"plans": [_plan_dict(p) for p in items]})
        return
    table = output.make_table("NAME", "REVISION", "VMS", "LAST RUN", "STATE", "UPDATED")
    for p in items:
        last = _run(p.last_run) if p.HasField("last_run") else None
        table.add_row(
            p.plan.name,
            str(p.plan.revision),
            str(len(p.plan.vms)),
            f"{last.action} {last.id}" if last else "-",
            _words(last.state.value) if last else "-",
            output.age(last.update_time if last else output.timestamp(p.plan, "create_time")),
        )
    if items:
        output.console().print(table)
    else:
        typer.echo("no plans (bring one up with 'clonebox up')")


@app.command("history")
def history(
    ctx: typer.Context,
    *,
    name: NameArg,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000, help="At most this many runs, newest first.")] = 20,
) -> None:
    """A plan's runs, newest first: id, action, revision, state, started, duration, error."""
    s = settings(ctx)
    client = s.client()
    request = ps_pb2.ListPlanRunsRequest(name=name, limit=limit)
    response: ps_pb2.ListPlanRunsResponse = client.call(client.plans.ListPlanRuns, request)
    if s.json:
        output.emit_json({"plan": name, "runs": [output.message_dict(r) for r in response.runs]})
        return
    table = output.make_table("ID", "ACTION", "REVISION", "STATE", "STARTED", "DURATION", "ERROR")
    for msg in response.runs:
        run = _run(msg)
        table.add_row(
            run.id,
            run.action,
            str(run.revision),
            _words(run.state.value),
            _iso(run.create_time),
            run_duration(run),
            one_line(run.error) or "-",
        )
    if response.runs:
        output.console().print(table)
    else:
        typer.echo(f"plan {name} has no runs")


@app.command("watch")
def watch(
    ctx: typer.Context,
    *,
    name: NameArg,
    run_id: Annotated[str, typer.Option("--run", metavar="ID", help="This run \\[default: the latest]")] = "",
) -> None:
    """
    Follow a plan's run (the latest unless --run) until it is done, with the view of 'clonebox up'.

    Exit code: 0 when it succeeded, 1 when it failed or was rolled back; a finished run is shown at once.
    """
    s = settings(ctx)
    client = s.client()
    # nothing has reached the controller yet: a wrong address fails at once instead of reconnecting
    finish(s, watch_run(s, client, None, plan=name, run_id=run_id, connected=False))


# ------------------------------------------------------------------------------------------------- ps


@dataclass(frozen=True)
class PsRow:
    """One VM of a plan as ``ps`` shows it."""

    plan: str
    service: str
    vm: vm_pb2.Vm
    health: str

    def as_dict(self) -> dict[str, Any]:
        """JSON form: plan, service, vm, state, health, host, addresses."""
        return {
            "plan": self.plan,
            "service": self.service,
            "vm": self.vm.name,
            "state": vm_state_word(self.vm),
            "health": self.health,
            "host": self.vm.host,
            "addresses": [a.address for a in self.vm.addresses],
        }


def vm_state_word(vm: vm_pb2.Vm) -> str:
    """``running``, ``stopped``, ... (``unspecified`` when unset); ``held``: see ``output.vm_state_word``."""
    return output.vm_state_word(VmState(vm.state), vm.state_reason)


def _plan_vms(client: ControllerClient, plan: str) -> list[vm_pb2.Vm]:
    """Every VM labelled as part of ``plan``, all pages."""
    request = vms_pb2.ListVmsRequest(labels={LABEL_PLAN: plan}, page_size=1000)
    found: list[vm_pb2.Vm] = []
    while True:
        response: vms_pb2.ListVmsResponse = client.call(client.vms.ListVms, request)
        found.extend(response.vms)
        if not response.next_page_token:
            return found
        request.page_token = response.next_page_token


def _health_states(client: ControllerClient, names: list[str]) -> dict[str, str] | None:
    """
    Overall health by VM name, in one call; None when the controller cannot report health.

    As in ``vm show``: a controller without the HealthService (UNIMPLEMENTED) or one that cannot get
    health right now (UNAVAILABLE) leaves the VMs shown with "unavailable"; other errors are raised.
    """
    from clonebox_cli.health import state_name

    if not names:
        return {}
    try:
        response = client.call(client.health.ListHealth, hs_pb2.ListHealthRequest(names=names), attempts=1)
    except TlsHandshakeFailed:
        raise
    except CloneboxError as err:
        if isinstance(err, Unavailable) or err.reason == "UNIMPLEMENTED":
            return None
        raise
    return {h.vm: state_name(h.state) for h in response.health}


def ps(
    ctx: typer.Context,
    plan: Annotated[
        str | None, typer.Argument(metavar="PLAN", help="Only this plan \\[default: every plan]", show_default=False)
    ] = None,
) -> None:
    """
    List the VMs of every plan (or of one): plan, service, VM, VM state, health, host, address.

    Health is "unavailable" when the controller cannot report it, "-" when no check has reported.
    """
    s = settings(ctx)
    client = s.client()
    if plan is not None:
        plans = [client.call(client.plans.GetPlan, ps_pb2.GetPlanRequest(name=plan))]
    else:
        listed: ps_pb2.ListPlansResponse = client.call(client.plans.ListPlans, ps_pb2.ListPlansRequest())
        plans = sorted(listed.plans, key=lambda p: p.plan.name)
    found: list[tuple[str, str, vm_pb2.Vm]] = []
    for p in plans:
        name = p.plan.name
        services = {v.spec.name: v.service for v in p.plan.vms}
        for vm in sorted(_plan_vms(client, name), key=lambda v: v.name):
            # a VM a newer revision dropped is not in the plan any more, but still carries its service label
            service = services.get(vm.name) or vm.spec.labels.get(LABEL_SERVICE) or vm.name.removeprefix(f"{name}-")
            found.append((name, service, vm))
    health = _health_states(client, [vm.name for _, _, vm in found])
    rows = [
        PsRow(name, service, vm, "unavailable" if health is None else health.get(vm.name, "-"))
        for name, service, vm in found
    ]
    if s.json:
        output.emit_json({"vms": [row.as_dict() for row in rows]})
        return
    console = output.console()
    if not rows:
        where = f"plan {plan} has no VMs" if plan is not None else "no plan has any VMs"
        typer.echo(f"{where} (bring a plan up with 'clonebox up')")
        return
    table = output.make_table("PLAN", "SERVICE", "VM", "STATE", "HEALTH", "HOST", "ADDRESS")
    for row in rows:
        # one column: the address a user connects to (IPv4 when there is one, not a link-local IPv6)
        addresses = [a.address for a in row.vm.addresses]
        address = next((a for a in addresses if ":" not in a), addresses[0] if addresses else "-")
        table.add_row(
            row.plan, row.service, row.vm.name, vm_state_word(row.vm), row.health, row.vm.host or "-", address
        )
    console.print(table)


__all__ = [
    "DEFAULT_PLAN_FILE",
    "EXIT_RUN_FAILED",
    "app",
    "down",
    "load_plan",
    "ps",
    "resolve_plan",
    "up",
]
