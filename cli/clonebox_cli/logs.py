r"""
``clonebox logs VM``: a VM's serial console log, read through the controller from the VM's agent.

The bytes are the guest's own, so what reaches a terminal is made safe first: on a terminal, anything
that is not printable text, a newline or a tab is shown escaped (``\x1b``, ``\r``, ``\u202e``; bytes
that are not UTF-8 as ``\xNN``; a CR before a LF, the serial line ending, is dropped), so a guest cannot
move the cursor, retitle the window or hide text. Written to a pipe or a file the bytes pass unchanged.
With ``-o json`` each piece is one JSON line ``{"data": ..., "offset": ...}`` (data decoded as UTF-8,
undecodable bytes replaced).

Reading a console is for operators and admins, and every read is an audit event (``vm.console_read``).

``-f`` survives a broken stream (the controller or the VM's agent restarting, a network blip): when a
working follow fails with UNAVAILABLE, DEADLINE_EXCEEDED or FAILED_PRECONDITION ``HOST_UNREACHABLE``,
one note goes to stderr, the CLI backs off (``FIRST_BACKOFF`` doubling to ``MAX_BACKOFF``) and asks
again with ``from_offset`` = the last piece's offset + its length, so no byte is lost or printed twice.
It stops when the VM is gone (the stream ends, or the resumed read is NOT_FOUND: a note, exit 0), on
Ctrl-C (exit 0, as before), and gives up with the last error after ``RECONNECT_FOR`` seconds without a
working connection. The first request's errors are reported at once, as without ``-f``: a wrong
address or a VM on a host that is down is an error, not something to wait for.
"""

from __future__ import annotations

import codecs
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

import typer
from clonebox.controller.v1 import vm_service_pb2 as vms_pb2

from clonebox_cli.client import ControllerClient
from clonebox_cli.context import Settings, settings
from clonebox_cli.errors import TlsHandshakeFailed
from clonebox_core.errors import CloneboxError, DeadlineExceeded, FailedPrecondition, NotFound, Unavailable

#: the most history one request returns (the agent cuts a larger request to this)
MAX_TAIL_BYTES = 1024 * 1024
#: first pause before a broken follow asks again; doubles up to MAX_BACKOFF
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 5.0
#: a follow gives up after this many seconds without a working connection
RECONNECT_FOR = 300.0
#: a stream that stayed open this long worked, even if the guest printed nothing (a quiet console sends no
#: message, so this is the only sign that the controller and the agent accepted the read)
SETTLED_SECONDS = 30.0
#: the controller's reason while the VM's agent is not connected (restarting, or its host is down)
HOST_UNREACHABLE = "HOST_UNREACHABLE"

# looked up at call time, so tests can drive the back-off without waiting
_pause: Callable[[float], None] = time.sleep
_now: Callable[[], float] = time.monotonic


class TerminalEscaper:
    """Turns console bytes into text that is safe to show on a terminal; keeps state across pieces."""

    def __init__(self) -> None:
        # a character split between two pieces is decoded whole; bytes that are not UTF-8 become \xNN
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="backslashreplace")
        self._cr = False

    def feed(self, data: bytes, *, final: bool = False) -> str:
        """The escaped text of ``data``; ``final`` flushes what an unfinished piece held back."""
        out: list[str] = []
        for ch in self._decoder.decode(data, final):
            if self._cr:
                self._cr = False
                if ch == "\n":
                    out.append(ch)  # CR LF: the serial console's line end
                    continue
                out.append("\\r")
            if ch == "\r":
                self._cr = True
            elif ch in "\n\t" or ch.isprintable():
                out.append(ch)
            else:
                out.append(ascii(ch)[1:-1])  # \x1b, \x7f, \x9b, \u202e ...
        if final and self._cr:
            self._cr = False
            out.append("\\r")
        return "".join(out)


class _Writer:
    """Writes each piece as it comes: escaped on a terminal, raw to a pipe or file, JSON lines with -o json."""

    def __init__(self, s: Settings) -> None:
        self.json = s.json
        self.escaper = TerminalEscaper() if not s.json and sys.stdout.isatty() else None

    def write(self, response: vms_pb2.ReadVmConsoleResponse) -> None:
        if self.json:
            text = response.data.decode("utf-8", errors="replace")
            typer.echo(json.dumps({"data": text, "offset": response.offset}, sort_keys=True))
        elif self.escaper is not None:
            self._text(self.escaper.feed(response.data))
        else:
            self._bytes(response.data)

    def close(self) -> None:
        if self.escaper is not None:
            self._text(self.escaper.feed(b"", final=True))

    def _text(self, text: str) -> None:
        # a terminal that cannot show a character gets it escaped too, never an encoding error
        self._bytes(text.encode(sys.stdout.encoding or "utf-8", errors="backslashreplace"))

    @staticmethod
    def _bytes(data: bytes) -> None:
        if data:
            sys.stdout.flush()
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()


def retryable(err: CloneboxError) -> bool:
    """True for the failures a follow rides out: the controller, the agent or the network going away."""
    if isinstance(err, TlsHandshakeFailed):
        return False  # this client's certificate was refused: asking again will not help
    if isinstance(err, (Unavailable, DeadlineExceeded)):
        return True
    return isinstance(err, FailedPrecondition) and err.reason == HOST_UNREACHABLE


@dataclass
class Follower:
    """Follows ReadVmConsole across broken streams, resuming at the next byte not yet written."""

    client: ControllerClient
    name: str
    tail: int
    write: Callable[[vms_pb2.ReadVmConsoleResponse], None]
    notice: Callable[[str], None]
    sleep: Callable[[float], None]
    clock: Callable[[], float]
    reconnect_for: float = RECONNECT_FOR
    #: the offset of the next byte to ask for (None until a stream worked: the first asks for the tail)
    next_offset: int | None = None

    def run(self) -> None:
        """Follow until the VM is gone; raise what cannot be ridden out (KeyboardInterrupt passes through)."""
        delay = FIRST_BACKOFF
        outage: float | None = None  # when the current run of failed attempts began
        while True:
            request = vms_pb2.ReadVmConsoleRequest(
                name=self.name, tail_bytes=self.tail, follow=True, from_offset=self.next_offset
            )
            started = self.clock()
            pieces = 0
            try:
                for response in self.client.stream(self.client.vms.ReadVmConsole, request, timeout=None):
                    if pieces == 0 and self.next_offset is not None and response.offset != self.next_offset:
                        self.notice(
                            f"logs: the console log is shorter than offset {self.next_offset} (replaced while "
                            "reconnecting): reading the new log from its start"
                        )
                    pieces += 1
                    self.write(response)
                    self.next_offset = response.offset + len(response.data)
                return  # the controller ended the follow: the VM was deleted
            except CloneboxError as err:
                settled = pieces > 0 or self.clock() - started >= SETTLED_SECONDS
                if settled:
                    outage, delay = None, FIRST_BACKOFF
                    if self.next_offset is None:
                        self.next_offset = 0  # a quiet follow that worked read an empty log: all of it is new
                first = self.next_offset is None
                if isinstance(err, NotFound) and not first:
                    self.notice(f"logs: VM {self.name} is gone; stopping")
                    return
                if first or not retryable(err):
                    raise
                if outage is None:
                    outage = self.clock()
                    self.notice(f"logs: connection lost ({err.reason or type(err).__name__}); reconnecting")
                elif self.clock() - outage >= self.reconnect_for:
                    self.notice(f"logs: no working connection for {self.reconnect_for:.0f} s; giving up")
                    raise
            # a fresh channel dials at once (gRPC's own reconnect back-off could wait much longer)
            self.client.reconnect()
            self.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF)


def _notice(s: Settings) -> Callable[[str], None]:
    def notice(text: str) -> None:
        typer.echo(json.dumps({"notice": text}) if s.json else text, err=True)

    return notice


def logs(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="VM", help="VM name.")],
    *,
    follow: Annotated[
        bool,
        typer.Option(
            "--follow",
            "-f",
            help="Keep printing what the guest writes next; a broken stream is resumed (Ctrl-C stops, exit 0).",
        ),
    ] = False,
    tail: Annotated[
        int,
        typer.Option(
            "--tail",
            metavar="BYTES",
            min=0,
            max=MAX_TAIL_BYTES,
            help="Start this many bytes before the end of the log (at most 1 MiB); 0: the default, 64 KiB.",
        ),
    ] = 0,
) -> None:
    """
    Print a VM's serial console log (its last 64 KiB, or --tail BYTES), then with -f what follows.

    On a terminal, control characters from the guest are shown escaped; piped, the bytes pass unchanged.
    Operators and admins only; every read is audited (vm.console_read).

    With -f a broken stream (controller or agent restarting, network blip) is resumed where it broke,
    after one "connection lost" note on stderr: no byte is lost or printed twice. The follow ends when
    the VM is deleted (exit 0), and gives up after 5 minutes without a working connection.

    Examples:
      clonebox logs web-1
      clonebox logs web-1 -f --tail 4096
      clonebox logs web-1 > web-1.console.log
    """
    s = settings(ctx)
    client = s.client()
    writer = _Writer(s)
    try:
        if follow:
            follower = Follower(client, name, tail, writer.write, _notice(s), _pause, _now, RECONNECT_FOR)
            follower.run()
        else:
            request = vms_pb2.ReadVmConsoleRequest(name=name, tail_bytes=tail)
            for response in client.stream(client.vms.ReadVmConsole, request, timeout=client.timeout):
                writer.write(response)
    except KeyboardInterrupt:
        if not follow:
            raise
        # Ctrl-C is how a follow ends
    finally:
        writer.close()
