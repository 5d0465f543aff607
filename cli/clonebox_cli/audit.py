"""
``clonebox audit``: list, show, watch, export, verify and archive the tamper-evident audit log.

``verify`` exits 1 and names the first bad record when the chain was modified, cut, reordered,
extended by a forger or truncated. ``archive`` writes a verified segment to a file (fsynced) before it
asks the controller to drop it, so a crash in between loses nothing: the records are still in the
database and the same command can run again.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from clonebox.controller.v1 import audit_service_pb2 as audit_pb2
from clonebox.type.v1 import audit_pb2 as audit_type_pb2

from clonebox_cli import output
from clonebox_cli.context import settings
from clonebox_core.audit.event import Outcome
from clonebox_core.errors import InvalidArgument
from clonebox_core.units import parse_duration_ms

app = typer.Typer(
    help="The tamper-evident audit log: who changed what, and proof nobody edited it.", no_args_is_help=True
)

#: exit code of ``audit verify`` when the chain is not intact
EXIT_CHAIN_BROKEN = 1


def parse_when(value: str, option: str, now: datetime | None = None) -> datetime:
    """``2h`` / ``30m`` / ``7d`` (that long ago) or an ISO 8601 time (UTC when no zone is given)."""
    text = value.strip()
    if text[-1:] in "smhdw" and text[:1].isdigit():
        try:
            return (now or datetime.now(UTC)) - timedelta(milliseconds=parse_duration_ms(text))
        except ValueError:
            pass  # not a duration after all: the ISO parse below gives the error
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidArgument(
            f"{option}: {value!r} is neither a duration like 30m, 2h, 7d nor an ISO 8601 time "
            "like 2026-11-26T10:00:00Z",
            reason="INVALID_TIME",
            metadata={"field": option},
        ) from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _outcome(value: str) -> audit_type_pb2.AuditOutcome.ValueType:
    if not value:
        return audit_type_pb2.AUDIT_OUTCOME_UNSPECIFIED
    try:
        name = Outcome(value.lower()).name
    except ValueError:
        raise InvalidArgument(
            f"--outcome: {value!r} is not one of {', '.join(o.value for o in Outcome)}",
            reason="INVALID_FIELD",
            metadata={"field": "outcome"},
        ) from None
    return audit_type_pb2.AuditOutcome.Value(f"AUDIT_OUTCOME_{name}")


def _filter(
    since: str | None, until: str | None, actor: str, action: str, resource: str, outcome: str
) -> audit_pb2.AuditFilter:
    f = audit_pb2.AuditFilter(actor=actor, action=action, resource=resource, outcome=_outcome(outcome))
    if since:
        f.since.FromDatetime(parse_when(since, "--since"))
    if until:
        f.until.FromDatetime(parse_when(until, "--until"))
    return f


def record_dict(record: audit_type_pb2.AuditRecord) -> dict[str, Any]:
    """A record as flat JSON: the event's fields plus seq, key id and MACs (one shape for every output)."""
    event = output.message_dict(record.event)
    event["outcome"] = event["outcome"].removeprefix("AUDIT_OUTCOME_").lower()
    return {"seq": record.seq, **event, "key_id": record.key_id, "prev_mac": record.prev_mac, "mac": record.mac}


def _table(records: list[audit_type_pb2.AuditRecord]) -> Any:
    table = output.make_table("SEQ", "TIME", "ACTOR", "ACTION", "RESOURCE", "OUTCOME", "REASON")
    for r in records:
        d = record_dict(r)
        table.add_row(str(r.seq), d["time"], d["actor"], d["action"], d["resource"], d["outcome"], d["reason"])
    return table


ActorOpt = Annotated[
    str, typer.Option("--actor", help="Only this actor (a SPIFFE id such as spiffe://TD/user/admin/alice).")
]
ActionOpt = Annotated[str, typer.Option("--action", help="Only this action, such as vm.create.")]
ResourceOpt = Annotated[str, typer.Option("--resource", help="Only this resource, such as vms/web.")]
OutcomeOpt = Annotated[
    str, typer.Option("--outcome", help="Only this outcome: accepted, succeeded, rejected, failed, partly_failed.")
]


@app.command("list")
def list_(
    ctx: typer.Context,
    *,
    since: Annotated[
        str | None, typer.Option("--since", help="Only records since: 2h, 30m, 7d or an ISO time.")
    ] = None,
    until: Annotated[
        str | None, typer.Option("--until", help="Only records before: 2h, 30m, 7d or an ISO time.")
    ] = None,
    actor: ActorOpt = "",
    action: ActionOpt = "",
    resource: ResourceOpt = "",
    outcome: OutcomeOpt = "",
    limit: Annotated[int, typer.Option("--limit", min=1, max=100_000, help="At most this many, newest first.")] = 100,
) -> None:
    """List audit records, newest first."""
    s = settings(ctx)
    client = s.client()
    query = _filter(since, until, actor, action, resource, outcome)
    records: list[audit_type_pb2.AuditRecord] = []
    token = ""
    while len(records) < limit:
        request = audit_pb2.ListAuditEventsRequest(
            filter=query, page_size=min(1000, limit - len(records)), page_token=token
        )
        response = client.call(client.audit.ListAuditEvents, request)
        records += response.records
        token = response.next_page_token
        if not token:
            break
    if s.json:
        output.emit_json({"records": [record_dict(r) for r in records]})
    else:
        output.console().print(_table(records))


@app.command("show")
def show(ctx: typer.Context, *, event_id: Annotated[str, typer.Argument(metavar="ID", help="Event id.")]) -> None:
    """Show one audit record with its chain fields."""
    s = settings(ctx)
    client = s.client()
    record = client.call(client.audit.GetAuditEvent, audit_pb2.GetAuditEventRequest(id=event_id)).record
    if s.json:
        output.emit_json(record_dict(record))
        return
    d = record_dict(record)
    details = d.pop("details", {}) or {}
    table = output.make_table("FIELD", "VALUE")
    for key, value in d.items():
        table.add_row(key, str(value))
    for key, value in sorted(details.items()):
        table.add_row(f"details.{key}", str(value))
    output.console().print(table)


@app.command("watch")
def watch(
    ctx: typer.Context,
    *,
    actor: ActorOpt = "",
    action: ActionOpt = "",
    resource: ResourceOpt = "",
    outcome: OutcomeOpt = "",
    after: Annotated[
        int, typer.Option("--after", min=0, help="Start after this sequence number (0: only new records).")
    ] = 0,
) -> None:
    """Print audit records as they are written (one JSON object per line with -o json); Ctrl-C stops."""
    s = settings(ctx)
    client = s.client()
    request = audit_pb2.WatchAuditRequest(filter=_filter(None, None, actor, action, resource, outcome), after_seq=after)
    for response in client.stream(client.audit.WatchAudit, request):
        d = record_dict(response.record)
        if s.json:
            typer.echo(json.dumps(d, sort_keys=True), nl=True)
        else:
            typer.echo(
                f"{d['seq']:>8} {d['time']} {d['actor']} {d['action']} {d['resource']} {d['outcome']} {d['reason']}"
            )


def _export(ctx: typer.Context, before: datetime | None) -> tuple[dict[str, Any], list[audit_type_pb2.AuditRecord]]:
    client = settings(ctx).client()
    request = audit_pb2.ExportAuditRequest()
    if before is not None:
        request.before.FromDatetime(before)
    start: dict[str, Any] = {"seq": 0, "mac": "00" * 32}
    records: list[audit_type_pb2.AuditRecord] = []
    for response in client.stream(client.audit.ExportAudit, request):
        if response.HasField("start"):
            start = {"seq": response.start.seq, "mac": response.start.mac}
        records.append(response.record)
    return start, records


def _write_atomically(path: Path, lines: Iterator[str]) -> None:
    # a partial export must never look like a complete one: write beside, fsync, then rename
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            for line in lines:
                fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _lines(fmt: str, start: dict[str, Any], records: list[audit_type_pb2.AuditRecord]) -> Iterator[str]:
    if fmt == "json":
        yield json.dumps({"start": start, "records": [record_dict(r) for r in records]}, indent=2, sort_keys=True)
        yield "\n"
        return
    yield json.dumps({"start": start}, sort_keys=True) + "\n"
    for r in records:
        yield json.dumps(record_dict(r), sort_keys=True) + "\n"


FormatOpt = Annotated[str, typer.Option("--format", help="jsonl (a start line, then one record per line) or json.")]
OutFileOpt = Annotated[Path, typer.Option("-o", "--out", help="File to write (replaced atomically).")]


def _check_format(fmt: str) -> None:
    if fmt not in ("jsonl", "json"):
        raise InvalidArgument(
            f"--format: {fmt!r} is not jsonl or json", reason="INVALID_FIELD", metadata={"field": "format"}
        )


@app.command("export")
def export(
    ctx: typer.Context,
    *,
    out: OutFileOpt,
    fmt: FormatOpt = "jsonl",
    before: Annotated[str | None, typer.Option("--before", help="Only records before: 2h, 7d or an ISO time.")] = None,
) -> None:
    """Write the audit records (verified by the controller on the way) to a file."""
    _check_format(fmt)
    start, records = _export(ctx, parse_when(before, "--before") if before else None)
    _write_atomically(out, _lines(fmt, start, records))
    _report(
        ctx,
        {
            "file": str(out),
            "records": len(records),
            "first_seq": records[0].seq if records else 0,
            "last_seq": records[-1].seq if records else 0,
        },
        f"wrote {len(records)} records to {out}",
    )


@app.command("archive")
def archive(
    ctx: typer.Context,
    *,
    before: Annotated[str, typer.Option("--before", help="Archive records before: 30d, 2h or an ISO time.")],
    out: OutFileOpt,
    fmt: FormatOpt = "jsonl",
) -> None:
    """Move records before a time into a verified file, and anchor the chain so the rest still verifies."""
    _check_format(fmt)
    start, records = _export(ctx, parse_when(before, "--before"))
    if not records:
        _report(ctx, {"file": "", "records": 0, "removed": 0}, "nothing to archive before that time")
        return
    _write_atomically(out, _lines(fmt, start, records))
    last = records[-1]
    client = settings(ctx).client()
    request = audit_pb2.ArchiveAuditRequest(
        through=audit_type_pb2.AuditHead(seq=last.seq, mac=last.mac), request_id=uuid.uuid4().hex
    )
    response = client.call(client.audit.ArchiveAudit, request)
    _report(
        ctx,
        {"file": str(out), "records": len(records), "removed": response.removed, "anchor_seq": response.anchor.seq},
        f"archived records {records[0].seq}..{last.seq} to {out}; {response.removed} removed from the database",
    )


@app.command("verify")
def verify(ctx: typer.Context) -> None:
    """Check every record's MAC, the archive anchor and the head witnesses; exit 1 naming the first bad record."""
    s = settings(ctx)
    client = s.client()
    r = client.call(client.audit.VerifyAudit, audit_pb2.VerifyAuditRequest(), timeout=600)
    if s.json:
        output.emit_json(output.message_dict(r))
    elif r.ok:
        witnesses = ", ".join(r.witnesses) or "none"
        typer.echo(f"audit chain intact: {r.checked} records ({r.first_seq}..{r.last_seq}); witnesses: {witnesses}")
    else:
        which = f" (event {r.bad_event_id})" if r.bad_event_id else ""
        typer.echo(f"audit chain BROKEN at record {r.bad_seq}{which}: {r.problem}", err=True)
    if not r.ok:
        raise typer.Exit(EXIT_CHAIN_BROKEN)


def _report(ctx: typer.Context, data: dict[str, Any], text: str) -> None:
    if settings(ctx).json:
        output.emit_json(data)
    else:
        typer.echo(text)
