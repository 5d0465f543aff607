"""
``clonebox health``: the health of the fleet's VMs as their agents' probes find it.

``check`` runs a VM's checks now (exit 1 when a run failed), ``list`` shows current states, ``history``
shows stored transitions, actions and a per-check summary of the minute aggregates, and ``watch``
follows ``HealthService.WatchHealth``: a table redrawn in place on a terminal, one JSON line per
update otherwise. A watch survives the controller going away: it reconnects with back-off
(``_FIRST_BACKOFF`` doubling to ``_MAX_BACKOFF``) and resumes after the last transition it saw, so
nothing is missed; when that resume point has expired (``REVISION_EXPIRED``) it starts again from a
fresh snapshot.
"""

from __future__ import annotations

import enum
import json
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import typer
from clonebox.controller.v1 import health_service_pb2 as hs_pb2
from clonebox.type.v1 import health_pb2
from rich.console import Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from clonebox_cli import output
from clonebox_cli.audit import parse_when
from clonebox_cli.client import ControllerClient
from clonebox_cli.context import Settings, settings
from clonebox_cli.errors import TlsHandshakeFailed, one_line
from clonebox_core.errors import CloneboxError, DeadlineExceeded, FailedPrecondition, InvalidArgument, Unavailable
from clonebox_core.health import HealthState, Sample
from clonebox_core.rpc.convert_health import result_from_proto, state_from_proto
from clonebox_core.units import parse_duration_ms

app = typer.Typer(
    help="Health of the fleet's VMs: run checks now, list and watch states, read the history.",
    no_args_is_help=True,
)

#: exit code of ``health check`` when a run failed (or had nothing to judge)
EXIT_CHECK_FAILED = 1
#: first pause before a watch reconnects; doubles up to ``_MAX_BACKOFF``
_FIRST_BACKOFF = 0.2
_MAX_BACKOFF = 5.0
#: the reason a watch's resume point is older than the controller's stored transitions
REVISION_EXPIRED = "REVISION_EXPIRED"
#: a stream that fails this close to the --timeout deadline failed because of it
_DEADLINE_SLACK = 0.5
#: how often the live table refreshes by itself (the SINCE column ages)
_REFRESH_PER_SECOND = 1.0


class StateChoice(enum.StrEnum):
    """``--state`` values (``clonebox.type.v1.HealthState`` without the prefix)."""

    unknown = "unknown"
    healthy = "healthy"
    degraded = "degraded"
    unhealthy = "unhealthy"

    def to_proto(self) -> health_pb2.HealthState.ValueType:
        """Return the API enum value."""
        return health_pb2.HealthState.Value(f"HEALTH_STATE_{self.value.upper()}")


VmArg = Annotated[str, typer.Argument(metavar="VM", help="VM name.")]
StatesOpt = Annotated[
    list[StateChoice] | None,
    typer.Option("--state", help="Only VMs in this overall state (repeatable)."),
]


# ------------------------------------------------------------------------------------------ rendering


def state_name(value: health_pb2.HealthState.ValueType) -> str:
    """``healthy``, ``degraded``, ``unhealthy`` or ``unknown`` (unset reads as unknown)."""
    return state_from_proto(value).value


def sample_name(result: health_pb2.ProbeResult) -> str:
    """``pass``, ``warn``, ``fail`` or ``no_data``."""
    return result_from_proto(result).sample.value


def _ms(us: float) -> str:
    return f"{us / 1000:.1f}"


def checks_compact(health: health_pb2.VmHealth) -> str:
    """Each check's state in one cell: ``web:healthy db:unhealthy(3)`` (failures in a row in brackets)."""
    parts = []
    for c in health.checks:
        text = f"{c.name}:{state_name(c.state)}"
        if c.consecutive_failures and state_from_proto(c.state) in (HealthState.DEGRADED, HealthState.UNHEALTHY):
            text += f"({c.consecutive_failures})"
        parts.append(text)
    return " ".join(parts) or "-"


def health_table(items: Iterable[health_pb2.VmHealth]) -> Table:
    """One row per VM: VM, HOST, STATE, SINCE, CHECKS."""
    table = output.make_table("VM", "HOST", "STATE", "SINCE", "CHECKS")
    for h in items:
        table.add_row(
            h.vm, h.host or "-", state_name(h.state), output.age(output.timestamp(h, "since")), checks_compact(h)
        )
    return table


def health_section(health: health_pb2.VmHealth) -> RenderableType:
    """The Health part of ``vm show``: overall state and since, then each check's state and last detail."""
    head = f"health: {state_name(health.state)}"
    since = output.timestamp(health, "since")
    if since is not None:
        head += f" since {output.when(since)}"
    if not health.checks:
        head += " (no checks have reported)"
        return Text(head)
    checks = Table.grid(padding=(0, 2))
    checks.add_column(overflow="fold")
    checks.add_column()
    checks.add_column(overflow="fold")
    for c in health.checks:
        state = state_name(c.state)
        if c.consecutive_failures and state != HealthState.HEALTHY:
            state += f" ({c.consecutive_failures} failed in a row)"
        detail = c.last.detail if c.HasField("last") else "not run yet"
        checks.add_row(f"  {c.name}" + ("" if c.critical else " (non-critical)"), state, detail or "-")
    return Group(Text(head), checks)


def health_dict(health: health_pb2.VmHealth) -> dict[str, Any]:
    """A VmHealth as JSON (the protobuf JSON mapping, like every other message the CLI prints)."""
    return output.message_dict(health)


def _states(values: Sequence[StateChoice] | None) -> list[health_pb2.HealthState.ValueType]:
    return [v.to_proto() for v in values or ()]


# ---------------------------------------------------------------------------------------------- check


def _passed(results: Iterable[health_pb2.ProbeResult]) -> bool:
    return all(result_from_proto(r).sample in (Sample.PASS, Sample.WARN) for r in results)


@app.command("check")
def check(
    ctx: typer.Context,
    *,
    vm: VmArg,
    probe: Annotated[str, typer.Option("--probe", metavar="NAME", help="Run only this check.")] = "",
) -> None:
    """
    Run a VM's health checks now, on its agent, and show what each run found.

    One row per run: the check, its sample (pass, warn, fail or no_data), the detail and how long the
    run took; then the VM's scheduled state, which these runs do not change.

    Exit code: 0 when every run passed or warned, 1 when any run failed or had nothing to judge
    (no_data); the usual error codes (3 not found, 9 unavailable, ...) otherwise.

    Examples:
      clonebox health check web-1
      clonebox health check web-1 --probe db || echo "db is failing"
      clonebox -o json health check web-1   (one JSON document: results, health, ok)
    """
    s = settings(ctx)
    client = s.client()
    response = client.call(client.health.CheckHealth, hs_pb2.CheckHealthRequest(name=vm, check=probe))
    ok = _passed(response.results)
    if s.json:
        output.emit_json({**output.message_dict(response), "ok": ok})
    else:
        table = output.make_table("CHECK", "SAMPLE", "DETAIL", "DURATION MS")
        for r in response.results:
            table.add_row(r.check, sample_name(r), r.detail or "-", _ms(r.duration_us))
        console = output.console()
        if response.results:
            console.print(table)
        else:
            console.print(f"no checks ran on {vm}" + (f" (no check named {probe})" if probe else ""))
        h = response.health
        since = output.timestamp(h, "since")
        line = f"scheduled: {state_name(h.state)}"
        line += f" since {output.when(since)}" if since is not None else ""
        console.print(f"{line} ({checks_compact(h)})")
    if not ok:
        raise typer.Exit(EXIT_CHECK_FAILED)


# ----------------------------------------------------------------------------------------------- list


@app.command("list")
def list_(
    ctx: typer.Context,
    *,
    vms: Annotated[
        list[str] | None, typer.Argument(metavar="VM", help="Only these VMs (default: all).", show_default=False)
    ] = None,
    state: StatesOpt = None,
) -> None:
    """
    List the current health of VMs, by name.

    One row per VM: its host, overall state and how long it has been in it, and each check's state
    (failures in a row in brackets: "web:healthy db:unhealthy(3)").

    Examples:
      clonebox health list
      clonebox health list --state unhealthy --state degraded
      clonebox -o json health list web-1 web-2   ({"health": [...]})
    """
    s = settings(ctx)
    client = s.client()
    request = hs_pb2.ListHealthRequest(names=vms or [], states=_states(state))
    response = client.call(client.health.ListHealth, request)
    items = sorted(response.health, key=lambda h: h.vm)
    if s.json:
        output.emit_json({"health": [health_dict(h) for h in items]})
    else:
        output.console().print(health_table(items))


# -------------------------------------------------------------------------------------------- history


@dataclass
class _CheckSummary:
    runs: int = 0
    passes: int = 0
    failures: int = 0
    duration_us_sum: int = 0
    duration_us_max: int = 0

    def as_dict(self, check: str) -> dict[str, Any]:
        mean = self.duration_us_sum / self.runs / 1000 if self.runs else 0.0
        return {
            "check": check,
            "runs": self.runs,
            "pass_percent": round(100 * self.passes / self.runs, 1) if self.runs else 0.0,
            "failures": self.failures,
            "mean_ms": round(mean, 1),
            "max_ms": round(self.duration_us_max / 1000, 1),
        }


def summarize(aggregates: Iterable[health_pb2.HealthAggregate]) -> list[dict[str, Any]]:
    """Per check over the period: runs, pass %, failures, mean and max run time in ms (from minute sums)."""
    found: dict[str, _CheckSummary] = {}
    for a in aggregates:
        s = found.setdefault(a.check, _CheckSummary())
        s.runs += a.passes + a.warnings + a.failures + a.no_data
        s.passes += a.passes
        s.failures += a.failures
        s.duration_us_sum += a.duration_us_sum
        s.duration_us_max = max(s.duration_us_max, a.duration_us_max)
    return [found[name].as_dict(name) for name in sorted(found)]


def _time(msg: Any, name: str = "time") -> str:
    when = output.timestamp(msg, name)
    return when.isoformat(timespec="seconds") if when is not None else "-"


@app.command("history")
def history(
    ctx: typer.Context,
    *,
    vm: VmArg,
    since: Annotated[
        str, typer.Option("--since", metavar="WHEN", help="From this long ago (30m, 24h, 7d) or an ISO 8601 time.")
    ] = "24h",
    probe: Annotated[
        str, typer.Option("--probe", metavar="NAME", help="Only this check (the VM's own transitions are left out).")
    ] = "",
    limit: Annotated[
        int, typer.Option("--limit", min=1, max=10_000, help="At most this many transitions (the newest).")
    ] = 1000,
) -> None:
    """
    Show a VM's health history: state changes, the actions its agent took, and a per-check summary.

    Transitions (oldest first) are changes of one check, or of the VM itself (shown as "(vm)"). The
    summary adds up the stored minute aggregates over the period: runs, pass %, failed runs, and the
    mean and longest run time.

    Examples:
      clonebox health history web-1
      clonebox health history web-1 --since 2h --probe db
      clonebox health history web-1 --since 2026-11-26T08:00:00Z --limit 50
      clonebox -o json health history web-1   (transitions, actions, aggregates, summary)
    """
    s = settings(ctx)
    start = parse_when(since, "--since")
    client = s.client()
    request = hs_pb2.GetHealthHistoryRequest(name=vm, check=probe, limit=limit)
    request.since.FromDatetime(start)
    response = client.call(client.health.GetHealthHistory, request)
    summary = summarize(response.aggregates)
    if s.json:
        output.emit_json(
            {
                "vm": vm,
                "since": start.isoformat(),
                "transitions": [output.message_dict(t) for t in response.transitions],
                "actions": [output.message_dict(a) for a in response.actions],
                "aggregates": [output.message_dict(a) for a in response.aggregates],
                "summary": summary,
            }
        )
        return
    console = output.console()
    console.print(f"health history of {vm} since {start.isoformat(timespec='seconds')}")
    console.print()
    transitions = output.make_table("TIME", "CHECK", "CHANGE", "DETAIL")
    for t in response.transitions:
        change = f"{state_name(t.from_state)} → {state_name(t.to_state)}"
        transitions.add_row(_time(t), t.check or "(vm)", change, t.detail or "-")
    console.print(f"transitions ({len(response.transitions)}):" if response.transitions else "transitions: none")
    if response.transitions:
        console.print(transitions)
    console.print()
    actions = output.make_table("TIME", "CHECK", "TRIGGER", "ACTION", "OUTCOME", "DETAIL")
    for a in response.actions:
        kind = health_pb2.CheckActionKind.Name(a.kind).removeprefix("CHECK_ACTION_KIND_").lower()
        actions.add_row(_time(a), a.check or "(vm)", a.trigger, kind, a.outcome, a.detail or "-")
    console.print(f"actions ({len(response.actions)}):" if response.actions else "actions: none")
    if response.actions:
        console.print(actions)
    console.print()
    table = output.make_table("CHECK", "RUNS", "PASS %", "FAILED", "MEAN MS", "MAX MS")
    for row in summary:
        table.add_row(
            row["check"],
            str(row["runs"]),
            f"{row['pass_percent']:.1f}",
            str(row["failures"]),
            f"{row['mean_ms']:.1f}",
            f"{row['max_ms']:.1f}",
        )
    console.print("runs per check:" if summary else "runs per check: none recorded")
    if summary:
        console.print(table)


# ---------------------------------------------------------------------------------------------- watch


def parse_timeout(value: str, option: str = "--timeout") -> float:
    """Seconds from ``30s``, ``500ms``, ``2m``, ``1h`` or a plain number of seconds (``1.5``)."""
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            seconds = parse_duration_ms(text) / 1000
        except ValueError as exc:
            raise InvalidArgument(f"{option}: {exc}", reason="INVALID_FIELD", metadata={"field": option}) from None
    if not seconds > 0:
        raise InvalidArgument(
            f"{option}: {value!r} must be more than 0", reason="INVALID_FIELD", metadata={"field": option}
        )
    return seconds


@dataclass
class WatchView:
    """What a watch knows: each VM's latest health and the last transition seq it saw."""

    states: frozenset[HealthState] = frozenset()
    rows: dict[str, health_pb2.VmHealth] = field(default_factory=dict)
    #: the highest transition seq seen: a reconnect resumes after it
    last_seq: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def apply(self, response: hs_pb2.WatchHealthResponse) -> None:
        """Take one message of the stream."""
        with self.lock:
            for t in response.transitions:
                self.last_seq = max(self.last_seq, t.seq)
            if not response.HasField("health"):
                return
            h = response.health
            shown = not self.states or state_from_proto(h.state) in self.states
            if response.removed or not shown:
                # gone, or (with --state) no longer in a state asked for
                self.rows.pop(h.vm, None)
            else:
                self.rows[h.vm] = h

    def render(self) -> RenderableType:
        """The table as it is now (safe to call from rich's refresh thread)."""
        with self.lock:
            items = [self.rows[name] for name in sorted(self.rows)]
            seq = self.last_seq
        caption = Text(f"{len(items)} VM(s), transition seq {seq} · Ctrl-C to stop", style="dim")
        return Group(health_table(items), caption)


def watch_line(response: hs_pb2.WatchHealthResponse) -> str:
    """One message as one JSON line: health (null when unset), transitions with their seq, removed, synced, seq."""
    data = output.message_dict(response)
    data.setdefault("health", None)
    return json.dumps(data, sort_keys=True)


@dataclass
class Follow:
    """
    Follows WatchHealth across reconnects and counts live updates.

    A live update is a message after the stream's ``synced`` marker, or a replayed transition on a
    resumed stream (a change that happened while the watch was away); snapshot messages only restate
    current health and are not counted.
    """

    client: ControllerClient
    names: list[str]
    states: list[health_pb2.HealthState.ValueType]
    view: WatchView
    on_message: Callable[[hs_pb2.WatchHealthResponse], None]
    notice: Callable[[str], None]
    count: int | None = None
    deadline: float | None = None
    #: live updates seen so far
    updates: int = 0
    #: a stream has delivered at least one message (from then on, losing the controller means reconnecting)
    connected: bool = False
    #: messages of the current stream
    received: int = 0

    def _remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def _stream(self, after_seq: int) -> bool:
        """Read one stream to its end; True when ``count`` live updates have been seen."""
        request = hs_pb2.WatchHealthRequest(names=self.names, states=self.states, after_seq=after_seq)
        synced = False
        self.received = 0
        for response in self.client.stream(self.client.health.WatchHealth, request, timeout=self._remaining()):
            self.received += 1
            self.connected = True
            carries = response.HasField("health") or len(response.transitions) > 0 or response.removed
            if synced:
                live = carries
            else:  # the snapshot, or (resuming) a transition that happened while we were away
                live = after_seq > 0 and not response.HasField("health") and len(response.transitions) > 0
            self.view.apply(response)
            self.on_message(response)
            synced = synced or response.synced
            if live:
                self.updates += 1
                if self.count is not None and self.updates >= self.count:
                    return True
        return False

    def run(self) -> bool:
        """Follow until ``count`` updates (True) or the deadline (False); raises what cannot be retried."""
        delay = _FIRST_BACKOFF
        while True:
            remaining = self._remaining()
            if remaining is not None and remaining <= 0:
                return False
            after_seq = self.view.last_seq
            try:
                if self._stream(after_seq):
                    return True
                reason = "the controller ended the watch"
            except DeadlineExceeded:
                if self.deadline is not None and time.monotonic() >= self.deadline - _DEADLINE_SLACK:
                    return False
                if not self.connected:
                    raise
                reason = "no answer in time"
            except FailedPrecondition as err:
                if err.reason == REVISION_EXPIRED and after_seq > 0:
                    self.notice(
                        f"resume point {after_seq} has expired on the controller: starting again from a fresh snapshot"
                    )
                    with self.view.lock:
                        self.view.last_seq = 0
                    continue
                if not self.received:
                    raise  # refused outright: not the overflow of a watch that was running
                reason = f"the controller dropped the watch: {one_line(err.message) or err.reason}"
            except TlsHandshakeFailed:
                raise
            except Unavailable as err:
                if not self.connected:
                    raise  # never reached: a wrong address is an error, not something to wait for
                reason = one_line(err.message) or err.reason
            if self.received:
                delay = _FIRST_BACKOFF  # the stream worked for a while: start the back-off again
            remaining = self._remaining()
            pause = delay if remaining is None else max(0.0, min(delay, remaining))
            self.notice(f"reconnecting… ({reason}; next try in {pause:.1f} s)")
            # a fresh channel dials at once (gRPC's own reconnect back-off could wait much longer)
            self.client.close()
            time.sleep(pause)
            delay = min(delay * 2, _MAX_BACKOFF)


def _notice(s: Settings) -> Callable[[str], None]:
    def notice(text: str) -> None:
        typer.echo(json.dumps({"notice": text}) if s.json else text, err=True)

    return notice


@app.command("watch")
def watch(
    ctx: typer.Context,
    *,
    vms: Annotated[
        list[str] | None, typer.Argument(metavar="VM", help="Only these VMs (default: all).", show_default=False)
    ] = None,
    state: StatesOpt = None,
    count: Annotated[
        int | None, typer.Option("--count", min=1, help="Exit 0 after this many live updates (for scripts).")
    ] = None,
    timeout: Annotated[
        str | None,
        typer.Option(
            "--timeout",
            metavar="DURATION",
            help="Stop after this long (30s, 5m, 1h): exit 0, or 10 when --count updates have not all come.",
        ),
    ] = None,
) -> None:
    """
    Watch VMs' health change: the current state first, then every change as it happens.

    On a terminal a table (VM, host, state, since, each check's state, failures in a row in brackets:
    "web:healthy db:unhealthy(3)") is redrawn in place. Otherwise, and with -o json, each message is
    one JSON line: health, transitions (each with its seq), removed, synced (the snapshot is complete)
    and seq.

    When the controller goes away the watch reconnects by itself (back-off from 0.2 s to 5 s, a
    "reconnecting…" notice on stderr) and resumes after the last transition it saw; if that point
    has expired it starts again from a fresh snapshot. Ctrl-C stops it (exit 0).

    Examples:
      clonebox health watch
      clonebox health watch web-1 db-1 --state unhealthy
      clonebox -o json health watch --count 1 --timeout 5m   (wait for the next change)
    """
    s = settings(ctx)
    seconds = parse_timeout(timeout) if timeout is not None else None
    client = s.client()
    chosen = frozenset(HealthState(v.value) for v in state or ())
    view = WatchView(states=chosen)
    as_lines = s.json or not output.console().is_terminal
    live: Live | None = None

    def on_message(response: hs_pb2.WatchHealthResponse) -> None:
        if as_lines:
            typer.echo(watch_line(response))
        elif live is not None:
            live.refresh()

    follow = Follow(
        client=client,
        names=list(vms or ()),
        states=_states(state),
        view=view,
        on_message=on_message,
        notice=_notice(s),
        count=count,
        deadline=time.monotonic() + seconds if seconds is not None else None,
    )
    try:
        if as_lines:
            done = follow.run()
        else:
            with Live(
                console=output.console(),
                get_renderable=view.render,
                refresh_per_second=_REFRESH_PER_SECOND,
            ) as live:
                done = follow.run()
    except KeyboardInterrupt:
        return  # Ctrl-C is how a watch ends
    if count is not None and not done:
        raise DeadlineExceeded(
            f"watch: {follow.updates} of {count} updates arrived before the {timeout} timeout",
            reason="WATCH_TIMEOUT",
        )


# ------------------------------------------------------------------------------------- for vm show


def vm_health(client: ControllerClient, name: str) -> tuple[health_pb2.VmHealth | None, CloneboxError | None]:
    """
    A VM's health for ``vm show``, or why there is none.

    A controller without the HealthService (UNIMPLEMENTED) or one that cannot get it right now
    (UNAVAILABLE) gives ``(None, error)``; any other error is raised.
    """
    try:
        response = client.call(client.health.GetVmHealth, hs_pb2.GetVmHealthRequest(name=name), attempts=1)
    except TlsHandshakeFailed:
        raise
    except CloneboxError as err:
        if isinstance(err, Unavailable) or err.reason == "UNIMPLEMENTED":
            return None, err
        raise
    return response.health, None
