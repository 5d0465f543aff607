"""``clonebox logs VM`` against the in-process fake controller (its VmService answers ReadVmConsole here).

Piped output is checked through CliRunner; the terminal path and Ctrl-C run the real CLI as a process
(on a pseudo-terminal, and with SIGINT), because that is where isatty() and signals are real.
"""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
import tty
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from clonebox.controller.v1 import vm_service_pb2
from typer.testing import CliRunner, Result

from clonebox_cli.logs import TerminalEscaper
from clonebox_cli.main import app
from clonebox_core.errors import NotFound, PermissionDenied

from .conftest import FakeController, FakeFleet, FakeVmService, ThrowawayPki, abort, make_host, serve_fake

BOUND = 30.0  # seconds a CLI process may take before the test fails

# what a guest may put on its console: colours, a bell, a lone CR, bidi override, non-UTF-8 bytes, CR LF ends
PIECES = [
    b"boot ok\r",
    b"\nred \x1b[31malert\x1b[0m\r\ncaf\xc3",  # the pieces split a CR LF and a UTF-8 character
    b"\xa9 \xe2\x9c\x93\n",
    b"\xff\xfe bad\nbell\x07 tab\tend\rX\n",
    "rtl \u202e txt\x9b\n".encode(),
]
RAW = b"".join(PIECES)
SHOWN = (
    "boot ok\nred \\x1b[31malert\\x1b[0m\ncaf\u00e9 \u2713\n"
    "\\xff\\xfe bad\nbell\\x07 tab\tend\\rX\nrtl \\u202e txt\\x9b\n"
)


@dataclass
class Consoles:
    """The fake controller and what its ReadVmConsole serves: pieces by VM, or an error."""

    fc: FakeController
    pieces: dict[str, list[bytes]] = field(default_factory=dict)
    errors: dict[str, Any] = field(default_factory=dict)


@pytest.fixture
def consoles(test_pki: ThrowawayPki, monkeypatch: pytest.MonkeyPatch) -> Iterator[Consoles]:
    fleet = FakeFleet()
    fleet.hosts["local"] = make_host("local")
    fleet.add_vm("web")
    holder: list[Consoles] = []

    def read_vm_console(self: FakeVmService, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        self.fleet.record("ReadVmConsole", request)
        c = holder[0]
        if request.name in c.errors:
            abort(context, c.errors[request.name])
        if request.name not in c.pieces:
            abort(context, NotFound(f"VM {request.name} not found", reason="VM_NOT_FOUND"))
        offset = 0
        for data in c.pieces[request.name]:
            yield vm_service_pb2.ReadVmConsoleResponse(data=data, offset=offset)
            offset += len(data)
        while request.follow and context.is_active():
            time.sleep(0.02)  # a follow stays open until the client goes away

    monkeypatch.setattr(FakeVmService, "ReadVmConsole", read_vm_console, raising=False)
    server, port = serve_fake(fleet, test_pki)
    try:
        holder.append(Consoles(FakeController(f"127.0.0.1:{port}", fleet, test_pki, test_pki.root / "user")))
        holder[0].pieces["web"] = list(PIECES)
        yield holder[0]
    finally:
        server.stop(0)


def cli(runner: CliRunner, c: Consoles, *args: str) -> Result:
    result = runner.invoke(app, ["--controller", c.fc.address, *args])
    assert "Traceback" not in result.output
    return result


def process(c: Consoles, *args: str, **kw: Any) -> subprocess.Popen[bytes]:
    """The real CLI as a process (the runner fixture's environment: TLS folder, private XDG dirs)."""
    cmd = [sys.executable, "-m", "clonebox_cli.main", "--controller", c.fc.address, *args]
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)


# ---- output ------------------------------------------------------------------------------------------


def test_piped_output_is_the_guests_bytes_unchanged(runner: CliRunner, consoles: Consoles) -> None:
    r = cli(runner, consoles, "logs", "web")
    assert r.exit_code == 0, r.output
    assert r.stdout_bytes == RAW
    (req,) = consoles.fc.fleet.calls("ReadVmConsole")
    assert (req.name, req.tail_bytes, req.follow) == ("web", 0, False)


def test_tail_is_passed_on(runner: CliRunner, consoles: Consoles) -> None:
    r = cli(runner, consoles, "logs", "web", "--tail", "4096")
    assert r.exit_code == 0, r.output
    (req,) = consoles.fc.fleet.calls("ReadVmConsole")
    assert req.tail_bytes == 4096


def test_json_is_one_line_per_piece_with_its_offset(runner: CliRunner, consoles: Consoles) -> None:
    consoles.pieces["web"] = [b"line one\n", b"\x1b[1mbold\x1b[0m \xff\n"]
    r = cli(runner, consoles, "-o", "json", "logs", "web")
    assert r.exit_code == 0, r.output
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert lines == [
        {"offset": 0, "data": "line one\n"},
        {"offset": 9, "data": "\x1b[1mbold\x1b[0m \ufffd\n"},  # JSON escapes ESC itself; bad bytes are replaced
    ]
    assert "\x1b" not in r.stdout  # the raw ESC never reaches the output, only \u001b


def test_a_terminal_gets_control_characters_escaped(runner: CliRunner, consoles: Consoles) -> None:
    master, slave = pty.openpty()
    tty.setraw(slave)  # the line discipline must not rewrite what the CLI wrote (LF -> CR LF)
    try:
        proc = process(consoles, "logs", "web", stdout=slave)
        os.close(slave)
        slave = -1
        out, err = _pty_output(master, proc)
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert proc.returncode == 0, err
    assert out.decode() == SHOWN
    assert b"\x1b" not in out and b"\x07" not in out and b"\r" not in out


def _pty_output(master: int, proc: subprocess.Popen[bytes]) -> tuple[bytes, str]:
    chunks: list[bytes] = []
    deadline = time.monotonic() + BOUND
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.1)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the process closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    else:
        proc.kill()
        raise AssertionError("the CLI did not finish")
    proc.wait(BOUND)
    assert proc.stderr is not None
    return b"".join(chunks), proc.stderr.read().decode()


@pytest.mark.parametrize(
    ("pieces", "shown"),
    [
        ([b"a\r", b"\nb"], "a\nb"),  # CR LF split between pieces is one line end
        ([b"a\r", b"b"], "a\\rb"),  # a lone CR would let the guest overwrite the line
        ([b"x\r"], "x\\r"),  # a CR at the very end is shown when the stream ends
        ([b"\xe2\x9c", b"\x93"], "\u2713"),  # a character split between pieces
        ([b"\xe2\x9c"], "\\xe2\\x9c"),  # cut short at the end: the bytes, escaped
        ([b"\x1b]0;owned\x07"], "\\x1b]0;owned\\x07"),  # a window-title sequence
        ([b"\x00\x7f\xc2\x9b"], "\\x00\\x7f\\x9b"),  # NUL, DEL, C1 CSI
        (["\u202eevil\u2028".encode()], "\\u202eevil\\u2028"),  # bidi override, line separator
        ([b"plain text\ttab\n"], "plain text\ttab\n"),
    ],
)
def test_escaper(pieces: list[bytes], shown: str) -> None:
    escaper = TerminalEscaper()
    text = "".join(escaper.feed(p) for p in pieces) + escaper.feed(b"", final=True)
    assert text == shown


# ---- Ctrl-C and errors -----------------------------------------------------------------------------


def test_ctrl_c_ends_a_follow_quietly_with_exit_0(runner: CliRunner, consoles: Consoles) -> None:
    consoles.pieces["web"] = [b"first\n"]
    proc = process(consoles, "logs", "web", "-f", stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], BOUND)
        assert ready, "no output from the follow"
        assert proc.stdout.read1(100) == b"first\n"
        proc.send_signal(signal.SIGINT)
        code = proc.wait(BOUND)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.stderr is not None
    assert (code, proc.stderr.read()) == (0, b"")
    (req,) = consoles.fc.fleet.calls("ReadVmConsole")
    assert req.follow


@pytest.mark.parametrize(
    ("vm", "error", "code", "says"),
    [
        ("ghost", None, 3, "not found"),
        ("web", PermissionDenied("user viewer may not call ReadVmConsole", reason="ROLE_NOT_ALLOWED"), 7, "may not"),
    ],
)
def test_errors_are_one_line_with_the_usual_exit_code(
    runner: CliRunner, consoles: Consoles, vm: str, error: Any, code: int, says: str
) -> None:
    if error is not None:
        consoles.errors[vm] = error
    r = cli(runner, consoles, "logs", vm)
    assert r.exit_code == code, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], r.stderr
    assert r.stdout == ""


@pytest.mark.parametrize("tail", ["-1", "1048577", "lots"])
def test_a_bad_tail_is_a_usage_error(runner: CliRunner, consoles: Consoles, tail: str) -> None:
    r = cli(runner, consoles, "logs", "web", "--tail", tail)
    assert r.exit_code == 2, r.output
    assert consoles.fc.fleet.calls("ReadVmConsole") == []
