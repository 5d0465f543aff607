"""
The one place that turns an error into what the user sees: a one-line message and an exit code.

Every command raises ``clonebox_core.errors`` classes (the client maps RPC failures back to them); the
root command catches them here. No traceback ever reaches the terminal: an unexpected exception is a
bug in the CLI, reported as one line with exit code 12 (set ``CLONEBOX_DEBUG=1`` for the traceback).
"""

from __future__ import annotations

import os
import traceback

import typer

from clonebox_core.errors import (
    Aborted,
    AlreadyExists,
    CloneboxError,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)

#: exit code of each error class; 1 is left to "generic failure" and 2 doubles as the usage-error code
EXIT_CODES: dict[type[CloneboxError], int] = {
    InvalidArgument: 2,
    NotFound: 3,
    AlreadyExists: 4,
    FailedPrecondition: 5,
    ResourceExhausted: 6,
    PermissionDenied: 7,
    Unauthenticated: 8,
    Unavailable: 9,
    DeadlineExceeded: 10,
    Aborted: 11,
    Internal: 12,
}
#: usage errors (unknown option, missing argument) are reported by typer with this code
EXIT_USAGE = 2
#: an error class the table does not know, or a bug in the CLI
EXIT_INTERNAL = 12
#: Ctrl-C, as shells report SIGINT (128 + 2)
EXIT_INTERRUPTED = 130


def exit_code(err: BaseException) -> int:
    """Return the exit code for ``err`` (the nearest class in the table wins: subclasses inherit)."""
    if isinstance(err, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    for cls in type(err).__mro__:
        if cls in EXIT_CODES:
            return EXIT_CODES[cls]
    return EXIT_INTERNAL


def one_line(text: str) -> str:
    """Collapse all whitespace (server messages may carry newlines) so an error is always one line."""
    return " ".join(text.split())


def report(err: CloneboxError) -> int:
    """Print ``err`` as one line on stderr and return its exit code."""
    typer.echo(f"error: {one_line(err.message) or err.reason}", err=True)
    return exit_code(err)


def report_unexpected(exc: BaseException) -> int:
    """Report a bug in the CLI without a traceback (unless CLONEBOX_DEBUG is set)."""
    if os.environ.get("CLONEBOX_DEBUG"):
        typer.echo("".join(traceback.format_exception(exc)), err=True)
    typer.echo(
        f"error: internal error in the clonebox CLI: {type(exc).__name__}: {one_line(str(exc))} "
        "(set CLONEBOX_DEBUG=1 for the traceback)",
        err=True,
    )
    return EXIT_INTERNAL
