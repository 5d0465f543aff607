"""
``clonebox recover``: agents' journaled transactions, rollback of interrupted ones, and the orphan sweep.

Agents roll back transactions a crash cut short when they start; ``recover run`` does it on demand and
lists leftovers of VMs that have no domain (``--sweep`` removes them). Every clean-up is an audit event.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

import typer
from clonebox.controller.v1 import recovery_service_pb2 as rec_pb2
from clonebox.type.v1 import recovery_pb2

from clonebox_cli import output
from clonebox_cli.context import settings

app = typer.Typer(help="Crash recovery: journaled transactions, rollback and the orphan sweep.", no_args_is_help=True)

HostOpt = Annotated[str, typer.Option("--host", help="Only this host (default: every reachable host).")]


def _state(txn: recovery_pb2.Transaction) -> str:
    return recovery_pb2.TransactionState.Name(txn.state).removeprefix("TRANSACTION_STATE_").lower()


def _txn_dict(txn: recovery_pb2.Transaction) -> dict[str, Any]:
    data = output.message_dict(txn)
    data["state"] = _state(txn)
    return data


def _warn_unreachable(unreachable: Any) -> None:
    for host, why in sorted(dict(unreachable).items()):
        typer.echo(f"warning: host {host} not asked: {why}", err=True)


@app.command("list")
def list_(
    ctx: typer.Context,
    *,
    host: HostOpt = "",
    all_: Annotated[bool, typer.Option("--all", help="Include committed transactions.")] = False,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000, help="At most this many per host.")] = 100,
) -> None:
    """Transactions on agents: open (in progress or interrupted) and rolled back, newest first."""
    s = settings(ctx)
    client = s.client()
    request = rec_pb2.ListRecoveriesRequest(host=host, include_committed=all_, page_size=limit)
    resp = client.call(client.recovery.ListRecoveries, request)
    if s.json:
        output.emit_json(
            {"transactions": [_txn_dict(t) for t in resp.transactions], "unreachable": dict(resp.unreachable)}
        )
        return
    table = output.make_table("HOST", "ID", "KIND", "TARGET", "STATE", "STARTED", "ERROR")
    for t in resp.transactions:
        started = t.create_time.ToDatetime().isoformat(timespec="seconds") if t.HasField("create_time") else ""
        table.add_row(t.host, t.id, t.kind, t.target, _state(t), started, t.error)
    output.console().print(table)
    _warn_unreachable(resp.unreachable)


@app.command("show")
def show(
    ctx: typer.Context,
    *,
    txn_id: Annotated[str, typer.Argument(metavar="ID", help="Transaction id.")],
    host: Annotated[str, typer.Option("--host", help="Host whose journal holds it.")],
) -> None:
    """One transaction with its steps: how each is undone and what it made."""
    s = settings(ctx)
    client = s.client()
    txn = client.call(client.recovery.GetRecovery, rec_pb2.GetRecoveryRequest(host=host, id=txn_id)).transaction
    if s.json:
        output.emit_json(_txn_dict(txn))
        return
    typer.echo(f"{txn.kind} of {txn.target} on {txn.host}: {_state(txn)}" + (f" ({txn.error})" if txn.error else ""))
    table = output.make_table("#", "STEP", "STATE", "UNDO", "MADE")
    for step in txn.steps:
        undo = " ".join(f"{k}={v}" for k, v in sorted(step.undo.items()))
        made = " ".join(f"{k}={v}" for k, v in sorted(step.identity.items())) or "-"
        table.add_row(str(step.n), step.name, step.state, undo, made)
    output.console().print(table)


@app.command("run")
def run(
    ctx: typer.Context,
    *,
    host: HostOpt = "",
    sweep: Annotated[bool, typer.Option("--sweep", help="Also remove leftovers of VMs that have no domain.")] = False,
) -> None:
    """Roll back interrupted transactions now and report leftovers (``--sweep`` removes them)."""
    s = settings(ctx)
    client = s.client()
    request = rec_pb2.RunRecoveryRequest(host=host, sweep=sweep, request_id=uuid.uuid4().hex)
    resp = client.call(client.recovery.RunRecovery, request, timeout=600)
    if s.json:
        output.emit_json(
            {
                "rolled_back": [_txn_dict(t) for t in resp.rolled_back],
                "orphans": [output.message_dict(o) for o in resp.orphans],
                "unreachable": dict(resp.unreachable),
            }
        )
        return
    for t in resp.rolled_back:
        typer.echo(f"rolled back {t.kind} of {t.target} on {t.host} ({t.id})")
    for o in resp.orphans:
        verb = "removed" if o.removed else "found (run with --sweep to remove)"
        typer.echo(f"orphan of VM {o.vm} on {o.host} {verb}: {', '.join(o.paths)}")
    if not resp.rolled_back and not resp.orphans:
        typer.echo("nothing to recover")
    _warn_unreachable(resp.unreachable)
