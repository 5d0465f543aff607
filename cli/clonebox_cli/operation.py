"""
``clonebox operation``: show, wait for and list long-running operations.

``follow`` is also how ``vm create/start/stop/delete --wait`` wait: it watches the operation
(``WatchOperation``), shows its step and percent on stderr, reconnects if the stream breaks, and stops
at ``--timeout`` with DeadlineExceeded (the operation itself keeps running on the controller).
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import Annotated

import typer
from clonebox.controller.v1 import operation_service_pb2 as ops_pb2
from clonebox.type.v1 import operation_pb2
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)

from clonebox_cli import output
from clonebox_cli.client import ControllerClient
from clonebox_cli.context import settings
from clonebox_core.errors import DeadlineExceeded, Unavailable
from clonebox_core.rpc.convert import operation_error

app = typer.Typer(help="Long-running operations (create, start, stop, delete, drain).", no_args_is_help=True)

#: times a broken watch stream is re-opened before giving up
_RECONNECTS = 5


def _op_id(value: str) -> str:
    """Accept both ``ID`` and the resource name ``operations/ID``."""
    return value.removeprefix("operations/")


class _Display:
    """Progress on stderr: a live bar on a terminal, one plain line per change otherwise."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.live = enabled and sys.stderr.isatty()
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._last: tuple[str, int] | None = None

    def __enter__(self) -> _Display:
        if self.live:
            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                TaskProgressColumn(),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task("waiting", total=100)
        return self

    def update(self, op: operation_pb2.Operation) -> None:
        """Show the operation's current step and percent."""
        if not self.enabled:
            return
        step = op.step or "waiting"
        if op.done:
            step = f"failed at step {op.step!r}" if op.HasField("error") else "done"
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=op.progress, description=f"{op.kind} {op.target}: {step}")
        elif (step, op.progress) != self._last:
            typer.echo(f"[{op.progress:3d}%] {op.kind} {op.target}: {step}", err=True)
        self._last = (step, op.progress)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._progress is not None:
            self._progress.stop()


def follow(
    client: ControllerClient,
    op: operation_pb2.Operation,
    *,
    timeout: float | None = None,
    progress: bool = True,
) -> operation_pb2.Operation:
    """
    Watch ``op`` until it is done and return its final state (failed or not).

    Raises DeadlineExceeded when ``timeout`` seconds pass first, and the client's errors when the
    controller cannot be reached even after reconnecting.
    """
    deadline = time.monotonic() + timeout if timeout else None
    reconnects = 0
    try:
        with _Display(progress) as display:
            display.update(op)
            while not op.done:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise _still_running(op, timeout)
                try:
                    request = ops_pb2.WatchOperationRequest(id=op.id)
                    for response in client.stream(client.operations.WatchOperation, request, timeout=remaining):
                        op = response.operation
                        display.update(op)
                        if op.done:
                            break
                    else:
                        # the stream ended without a final state (controller restarting): ask directly
                        got = client.call(client.operations.GetOperation, ops_pb2.GetOperationRequest(id=op.id))
                        op = got.operation
                        display.update(op)
                except DeadlineExceeded:
                    raise _still_running(op, timeout) from None
                except Unavailable:
                    reconnects += 1
                    if reconnects > _RECONNECTS:
                        raise
                    time.sleep(min(0.2 * 2**reconnects, 3.0))
    except KeyboardInterrupt:
        typer.echo(
            f"interrupted; operation {op.id} goes on: follow it with 'clonebox operation wait {op.id}'",
            err=True,
        )
        raise
    return op


def _still_running(op: operation_pb2.Operation, timeout: float | None) -> DeadlineExceeded:
    return DeadlineExceeded(
        f"operation {op.id} ({op.kind} {op.target}) is still running after {timeout:g} s "
        f"at step {op.step or '-'!r}; keep waiting with 'clonebox operation wait {op.id}'",
        reason="WAIT_TIMEOUT",
        metadata={"operation": op.id},
    )


def raise_if_failed(op: operation_pb2.Operation) -> None:
    """Raise the error a finished operation carries, prefixed with what the operation was doing."""
    err = operation_error(op)
    if err is not None:
        raise type(err)(f"{op.kind} {op.target} failed: {err.message}", reason=err.reason, metadata=err.metadata)


def wait_and_check(
    client: ControllerClient, op: operation_pb2.Operation, timeout: float | None
) -> operation_pb2.Operation:
    """``follow`` then ``raise_if_failed``: the common path of ``--wait``."""
    op = follow(client, op, timeout=timeout)
    raise_if_failed(op)
    return op


def print_started(op: operation_pb2.Operation, as_json: bool) -> None:
    """Report an operation that was started but not waited for."""
    if as_json:
        output.emit_json(output.message_dict(op))
        return
    typer.echo(f"{op.kind} {op.target}: operation {op.id} started; follow it with 'clonebox operation wait {op.id}'")


# ------------------------------------------------------------------------------------------- commands

TimeoutOpt = Annotated[
    float | None,
    typer.Option("--timeout", min=0.1, help="Give up waiting after this many seconds (exit code 10)."),
]


@app.command("show")
def show(ctx: typer.Context, *, op_id: Annotated[str, typer.Argument(metavar="ID", help="Operation id.")]) -> None:
    """Show one operation."""
    s = settings(ctx)
    client = s.client()
    op = client.call(client.operations.GetOperation, ops_pb2.GetOperationRequest(id=_op_id(op_id))).operation
    if s.json:
        output.emit_json(output.message_dict(op))
    else:
        output.console().print(output.operation_details(op))


@app.command("wait")
def wait(
    ctx: typer.Context,
    *,
    op_id: Annotated[str, typer.Argument(metavar="ID", help="Operation id.")],
    timeout: TimeoutOpt = None,
) -> None:
    """Wait for an operation to finish; exit with its error's code (0 when it succeeded)."""
    s = settings(ctx)
    client = s.client()
    op = client.call(client.operations.GetOperation, ops_pb2.GetOperationRequest(id=_op_id(op_id))).operation
    op = follow(client, op, timeout=timeout)
    if s.json:
        output.emit_json(output.message_dict(op))
    elif operation_error(op) is None:
        output.console().print(output.operation_details(op))
    raise_if_failed(op)


@app.command("list")
def list_(
    ctx: typer.Context,
    *,
    running: Annotated[bool, typer.Option("--running", help="Only operations not yet done.")] = False,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000, help="At most this many, newest first.")] = 50,
) -> None:
    """List recent operations, newest first."""
    s = settings(ctx)
    client = s.client()
    request = ops_pb2.ListOperationsRequest(page_size=limit, only_running=running)
    ops = list(client.call(client.operations.ListOperations, request).operations)
    if s.json:
        output.emit_json({"operations": [output.message_dict(op) for op in ops]})
    else:
        output.console().print(output.operation_table(ops))


__all__ = ["app", "follow", "print_started", "raise_if_failed", "wait_and_check"]
