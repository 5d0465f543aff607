r"""
``clonebox logs VM``: a VM's serial console log, read through the controller from the VM's agent.

The bytes are the guest's own, so what reaches a terminal is made safe first: on a terminal, anything
that is not printable text, a newline or a tab is shown escaped (``\x1b``, ``\r``, ``\u202e``; bytes
that are not UTF-8 as ``\xNN``; a CR before a LF, the serial line ending, is dropped), so a guest cannot
move the cursor, retitle the window or hide text. Written to a pipe or a file the bytes pass unchanged.
With ``-o json`` each piece is one JSON line ``{"data": ..., "offset": ...}`` (data decoded as UTF-8,
undecodable bytes replaced).

Reading a console is for operators and admins, and every read is an audit event (``vm.console_read``).
"""

from __future__ import annotations

import codecs
import json
import sys
from typing import Annotated

import typer
from clonebox.controller.v1 import vm_service_pb2 as vms_pb2

from clonebox_cli.context import Settings, settings

#: the most history one request returns (the agent cuts a larger request to this)
MAX_TAIL_BYTES = 1024 * 1024


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


def logs(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="VM", help="VM name.")],
    *,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing what the guest writes next (Ctrl-C stops, exit 0).")
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

    Examples:
      clonebox logs web-1
      clonebox logs web-1 -f --tail 4096
      clonebox logs web-1 > web-1.console.log
    """
    s = settings(ctx)
    client = s.client()
    request = vms_pb2.ReadVmConsoleRequest(name=name, tail_bytes=tail, follow=follow)
    writer = _Writer(s)
    try:
        for response in client.stream(client.vms.ReadVmConsole, request, timeout=None if follow else client.timeout):
            writer.write(response)
    except KeyboardInterrupt:
        if not follow:
            raise
        # Ctrl-C is how a follow ends
    finally:
        writer.close()
