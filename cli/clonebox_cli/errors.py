"""
The one place that turns an error into what the user sees: a one-line message and an exit code.

Every command raises ``clonebox_core.errors`` classes (the client maps RPC failures back to them); the
root command catches them here. No traceback ever reaches the terminal: an unexpected exception is a
bug in the CLI, reported as one line with exit code 12 (set ``CLONEBOX_DEBUG=1`` for the traceback).

Exit codes (``EXIT_CODES``; a subclass inherits its nearest listed class's code):

==== ==================================================================================================
0    success
1    generic failure (not used by CloneBox errors)
2    invalid argument or usage error (typer's own usage errors use 2 as well)
3    not found
4    already exists
5    failed precondition (also: this client's TLS files are missing)
6    resource exhausted (no host or quota has room)
7    permission denied (the certificate's role may not do this)
8    unauthenticated (for example a revoked certificate)
9    unavailable: the controller cannot be reached
10   deadline exceeded
11   aborted
12   internal error, or a bug in the CLI
13   TLS handshake failed: the controller rejected this client's certificate (missing, from another
     CA, expired) or this client could not verify the controller's; gRPC reports both as UNAVAILABLE,
     but unlike 9 retrying will not help
130  interrupted (Ctrl-C)
==== ==================================================================================================
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


class TlsHandshakeFailed(Unavailable):
    """The TLS handshake with the controller failed (gRPC says UNAVAILABLE; no server code ran).

    Raised by the client only, never sent on the wire: ``message`` already names the address and the
    reason (``ADDR rejected this client's certificate: REASON``).
    """

    default_reason = "TLS_HANDSHAKE_FAILED"


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
    TlsHandshakeFailed: 13,
}
#: usage errors (unknown option, missing argument) are reported by typer with this code
EXIT_USAGE = 2
#: an error class the table does not know, or a bug in the CLI
EXIT_INTERNAL = 12
#: the TLS handshake failed (a rejected client certificate, an unverifiable controller)
EXIT_TLS = 13
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


#: what to do next, for reasons where the server's message alone leaves the user guessing
HINTS: dict[str, str] = {
    "SNAPSHOT_BLOCKED_BY_SHARED_FOLDER": "the VM has shared folders, so QEMU cannot save its memory: "
    "take a disk-only snapshot with --disk-only --quiesce (shared folder contents are never in a snapshot)",
    "VM_HAS_SNAPSHOTS": "delete them with 'clonebox snapshot delete VM NAME', or delete the VM together with "
    "them: 'clonebox vm delete NAME --with-snapshots' (add --keep-export FILE to keep the newest as a file)",
    "SNAPSHOT_NOT_FOUND": "list the VM's snapshots with 'clonebox snapshot list VM'",
    "ARCHIVE_NEEDS_PASSPHRASE": "pass --passphrase REF (e.g. env:VAR or file:PATH) naming the export's passphrase",
    "ARCHIVE_WRONG_KEY": "check what the --passphrase reference points at",
    "ARCHIVE_NOT_ENCRYPTED": "leave out --passphrase",
    "SNAPSHOT_ALREADY_EXISTS": "snapshot names are unique per VM: pick another name, or leave it out",
}
#: the hint for every ``ARCHIVE_*`` reason not in HINTS (problems with an export file)
ARCHIVE_HINT = "the file is not a complete, intact CloneBox export: nothing was imported; export the snapshot again"


def hint_for(reason: str) -> str:
    """The hint printed after an error with ``reason`` ("" when there is none)."""
    if reason in HINTS:
        return HINTS[reason]
    if reason.startswith("ARCHIVE_"):
        return ARCHIVE_HINT
    return ""


def report(err: CloneboxError) -> int:
    """Print ``err`` as one line on stderr (with a hint for some reasons) and return its exit code."""
    line = f"error: {one_line(err.message) or err.reason}"
    hint = hint_for(err.reason)
    if hint:
        line += f" (hint: {hint})"
    typer.echo(line, err=True)
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
