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

from clonebox_cli import logs as logs_module
from clonebox_cli.errors import TlsHandshakeFailed
from clonebox_cli.logs import RECONNECT_FOR, SETTLED_SECONDS, TerminalEscaper, retryable
from clonebox_cli.main import app
from clonebox_core.errors import (
    CloneboxError,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    NotFound,
    PermissionDenied,
    Unavailable,
)

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
class Break:
    """
    How one ReadVmConsole call ends: after sending ``after`` pieces, with ``error``.

    Before the error: ``elapsed`` seconds pass on the test clock (the stream was open that long), ``append``
    is added to the log and ``replace`` (when set) replaces the log, as the guest or a re-made VM would.
    """

    after: int
    error: Any
    append: list[bytes] = field(default_factory=list)
    replace: list[bytes] | None = None
    elapsed: float = 0.0


@dataclass
class Clock:
    """The follow's clock and back-off sleep: time passes only when the CLI sleeps (or a Break says so)."""

    now: float = 1000.0
    sleeps: list[float] = field(default_factory=list)
    interrupt_after: int | None = None

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        if self.interrupt_after is not None and len(self.sleeps) >= self.interrupt_after:
            raise KeyboardInterrupt
        self.sleeps.append(seconds)
        self.now += seconds


@dataclass
class Consoles:
    """
    The fake controller and what its ReadVmConsole serves: pieces by VM, or an error.

    Like the agent, a call starts ``tail_bytes`` (default 64 KiB) before the end, or at ``from_offset``
    (0 when beyond the end), and sends the log piece by piece with each piece's offset. ``breaks`` scripts
    the calls in order (one entry per call; calls past the script are not broken); ``ends`` makes a follow
    end by itself once it has sent everything (the VM was deleted).
    """

    fc: FakeController
    pieces: dict[str, list[bytes]] = field(default_factory=dict)
    errors: dict[str, Any] = field(default_factory=dict)
    breaks: list[Break | None] = field(default_factory=list)
    ends: bool = False
    served: int = 0
    clock: Clock = field(default_factory=Clock)

    def broke(self, name: str, brk: Break) -> None:
        """What happens between the last piece sent and the error."""
        self.clock.now += brk.elapsed
        if brk.replace is not None:
            self.pieces[name] = list(brk.replace)
        self.pieces.setdefault(name, []).extend(brk.append)


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
        brk = c.breaks[c.served] if c.served < len(c.breaks) else None
        c.served += 1
        if brk is not None and brk.after == 0:
            c.broke(request.name, brk)
            abort(context, brk.error)
        if request.name not in c.pieces:
            abort(context, NotFound(f"VM {request.name} not found", reason="VM_NOT_FOUND"))
        for sent, (offset, data) in enumerate(_serve(c.pieces[request.name], request), start=1):
            yield vm_service_pb2.ReadVmConsoleResponse(data=data, offset=offset)
            if brk is not None and sent == brk.after:
                c.broke(request.name, brk)  # the guest goes on writing while the client is away
                abort(context, brk.error)
        while request.follow and not c.ends and context.is_active():
            time.sleep(0.02)  # a follow stays open until the client goes away

    monkeypatch.setattr(FakeVmService, "ReadVmConsole", read_vm_console, raising=False)
    server, port = serve_fake(fleet, test_pki)
    try:
        holder.append(Consoles(FakeController(f"127.0.0.1:{port}", fleet, test_pki, test_pki.root / "user")))
        holder[0].pieces["web"] = list(PIECES)
        # in-process runs back off on the test's clock (processes, below, use the real one)
        monkeypatch.setattr(logs_module, "_pause", holder[0].clock.sleep)
        monkeypatch.setattr(logs_module, "_now", holder[0].clock.monotonic)
        yield holder[0]
    finally:
        server.stop(0)


def _serve(pieces: list[bytes], request: Any) -> Iterator[tuple[int, bytes]]:
    """The log's pieces (offset, data) from where the request starts, the first one cut at that point."""
    size = sum(len(p) for p in pieces)
    if request.HasField("from_offset"):
        start = request.from_offset if request.from_offset <= size else 0
    else:
        start = max(0, size - (request.tail_bytes or 64 * 1024))
    offset = 0
    for data in pieces:
        end = offset + len(data)
        if end > start:
            cut = max(0, start - offset)
            yield offset + cut, data[cut:]
        offset = end


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


# ---- -f across broken streams ------------------------------------------------------------------------

AGENT_GONE = Unavailable("agent h1 at 127.0.0.1:1 went away", reason="AGENT_UNREACHABLE")
HOST_DOWN = FailedPrecondition("host h1 of VM web is unreachable", reason="HOST_UNREACHABLE")
SLOW = DeadlineExceeded("no answer in time", reason="DEADLINE_EXCEEDED")


def notes(r: Result) -> list[str]:
    return r.stderr.strip().splitlines()


def test_a_broken_follow_resumes_at_the_next_byte_and_prints_the_log_exactly_once(
    runner: CliRunner, consoles: Consoles
) -> None:
    seen = len(PIECES[0]) + len(PIECES[1])
    consoles.breaks = [
        Break(2, AGENT_GONE, append=[b"written while away\n"]),  # the agent restarts after two pieces
        Break(0, HOST_DOWN),  # its host is not connected yet
        Break(1, SLOW, append=[b"and more\n"]),  # back for one piece, then a deadline
    ]
    consoles.ends = True  # the fourth stream ends by itself once it has sent everything: the VM is deleted
    r = cli(runner, consoles, "logs", "web", "-f")
    assert r.exit_code == 0, r.output
    assert r.stdout_bytes == RAW + b"written while away\n" + b"and more\n"
    reqs = consoles.fc.fleet.calls("ReadVmConsole")
    assert [r.HasField("from_offset") for r in reqs] == [False, True, True, True]
    assert [r.from_offset for r in reqs[1:]] == [seen, seen, seen + len(PIECES[2])]
    assert all(r.follow and r.name == "web" for r in reqs)
    # one note per break (not per attempt), each naming why
    assert notes(r) == [
        "logs: connection lost (AGENT_UNREACHABLE); reconnecting",
        "logs: connection lost (DEADLINE_EXCEEDED); reconnecting",
    ]
    # 0.5 s, doubled while the outage lasts, and back to 0.5 s once a stream worked again
    assert consoles.clock.sleeps == [0.5, 1.0, 0.5]


def test_json_offsets_go_on_across_a_break(runner: CliRunner, consoles: Consoles) -> None:
    consoles.pieces["web"] = [b"one\n", b"two\n"]
    consoles.breaks = [Break(1, AGENT_GONE, append=[b"three\n"])]
    consoles.ends = True
    r = cli(runner, consoles, "-o", "json", "logs", "web", "-f")
    assert r.exit_code == 0, r.output
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert lines == [
        {"offset": 0, "data": "one\n"},
        {"offset": 4, "data": "two\n"},
        {"offset": 8, "data": "three\n"},
    ]
    (note,) = notes(r)
    assert json.loads(note) == {"notice": "logs: connection lost (AGENT_UNREACHABLE); reconnecting"}


def test_a_log_replaced_while_away_is_read_again_from_its_start_with_a_note(
    runner: CliRunner, consoles: Consoles
) -> None:
    consoles.breaks = [Break(3, AGENT_GONE, replace=[b"new vm\n"])]
    consoles.ends = True
    r = cli(runner, consoles, "logs", "web", "-f")
    assert r.exit_code == 0, r.output
    assert r.stdout_bytes == b"".join(PIECES[:3]) + b"new vm\n"
    assert consoles.fc.fleet.calls("ReadVmConsole")[1].from_offset == len(b"".join(PIECES[:3]))
    assert len(notes(r)) == 2 and "shorter than offset" in notes(r)[1], r.stderr


def test_a_vm_deleted_while_away_ends_the_follow_with_a_note_and_exit_0(runner: CliRunner, consoles: Consoles) -> None:
    consoles.breaks = [Break(2, AGENT_GONE), Break(0, NotFound("VM web not found", reason="VM_NOT_FOUND"))]
    r = cli(runner, consoles, "logs", "web", "-f")
    assert r.exit_code == 0, r.output
    assert r.stdout_bytes == PIECES[0] + PIECES[1]
    assert notes(r) == ["logs: connection lost (AGENT_UNREACHABLE); reconnecting", "logs: VM web is gone; stopping"]
    assert len(consoles.fc.fleet.calls("ReadVmConsole")) == 2


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (PermissionDenied("user viewer may not call ReadVmConsole", reason="ROLE_NOT_ALLOWED"), 7),
        (Internal("internal error", reason="INTERNAL"), 12),
        (FailedPrecondition("the console log cannot be read", reason="CONSOLE_LOG_UNREADABLE"), 5),
    ],
)
def test_a_follow_that_fails_for_good_is_reported_as_before_without_reconnecting(
    runner: CliRunner, consoles: Consoles, error: CloneboxError, code: int
) -> None:
    consoles.breaks = [Break(2, error)]
    r = cli(runner, consoles, "logs", "web", "-f")
    assert r.exit_code == code, r.output
    assert r.stdout_bytes == PIECES[0] + PIECES[1]
    (line,) = notes(r)
    assert line.startswith("error: ") and error.message in line
    assert len(consoles.fc.fleet.calls("ReadVmConsole")) == 1
    assert consoles.clock.sleeps == []


@pytest.mark.parametrize(("error", "code"), [(AGENT_GONE, 9), (HOST_DOWN, 5), (SLOW, 10)])
def test_the_first_requests_errors_are_reported_at_once_even_with_follow(
    runner: CliRunner, consoles: Consoles, error: CloneboxError, code: int
) -> None:
    consoles.breaks = [Break(0, error)]
    r = cli(runner, consoles, "logs", "web", "-f")
    assert r.exit_code == code, r.output
    (line,) = notes(r)
    assert line.startswith("error: ")
    assert len(consoles.fc.fleet.calls("ReadVmConsole")) == 1
    assert consoles.clock.sleeps == []


def test_a_quiet_follow_that_had_worked_resumes_from_0(runner: CliRunner, consoles: Consoles) -> None:
    # an empty log sends nothing; a stream that stayed open SETTLED_SECONDS had been accepted all the same
    consoles.pieces["web"] = []
    consoles.breaks = [Break(0, AGENT_GONE, elapsed=SETTLED_SECONDS, append=[b"first words\n"])]
    consoles.ends = True
    r = cli(runner, consoles, "logs", "web", "-f")
    assert r.exit_code == 0, r.output
    assert r.stdout_bytes == b"first words\n"
    second = consoles.fc.fleet.calls("ReadVmConsole")[1]
    assert second.HasField("from_offset") and second.from_offset == 0


def test_a_follow_gives_up_after_reconnect_for_seconds_without_a_working_connection(
    runner: CliRunner, consoles: Consoles
) -> None:
    consoles.breaks = [Break(2, AGENT_GONE), *[Break(0, HOST_DOWN)] * 200]
    r = cli(runner, consoles, "logs", "web", "-f")
    assert r.exit_code == 5, r.output  # the last error, with its usual exit code
    assert r.stdout_bytes == PIECES[0] + PIECES[1]
    lines = notes(r)
    assert lines[0] == "logs: connection lost (AGENT_UNREACHABLE); reconnecting"
    assert lines[1] == f"logs: no working connection for {RECONNECT_FOR:.0f} s; giving up"
    assert lines[2].startswith("error: ") and "unreachable" in lines[2]
    assert len(lines) == 3
    sleeps = consoles.clock.sleeps
    assert sleeps[:5] == [0.5, 1.0, 2.0, 4.0, 5.0] and max(sleeps) == 5.0
    assert sum(sleeps[:-1]) < RECONNECT_FOR <= sum(sleeps)  # gave up at the first failure past the bound
    assert len(consoles.fc.fleet.calls("ReadVmConsole")) == len(sleeps) + 1


def test_ctrl_c_while_reconnecting_ends_quietly_with_exit_0(runner: CliRunner, consoles: Consoles) -> None:
    consoles.breaks = [Break(2, AGENT_GONE), *[Break(0, HOST_DOWN)] * 10]
    consoles.clock.interrupt_after = 2
    r = cli(runner, consoles, "logs", "web", "-f")
    assert r.exit_code == 0, r.output
    assert r.stdout_bytes == PIECES[0] + PIECES[1]
    assert notes(r) == ["logs: connection lost (AGENT_UNREACHABLE); reconnecting"]


def test_without_follow_a_broken_stream_is_an_error_as_before(runner: CliRunner, consoles: Consoles) -> None:
    consoles.breaks = [Break(2, AGENT_GONE)]
    r = cli(runner, consoles, "logs", "web")
    assert r.exit_code == 9, r.output
    assert r.stdout_bytes == PIECES[0] + PIECES[1]
    (line,) = notes(r)
    assert line.startswith("error: ")
    (req,) = consoles.fc.fleet.calls("ReadVmConsole")
    assert not req.HasField("from_offset")


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (Unavailable("gone", reason="UNREACHABLE"), True),
        (AGENT_GONE, True),
        (SLOW, True),
        (HOST_DOWN, True),
        (TlsHandshakeFailed("rejected this client's certificate"), False),
        (FailedPrecondition("no console", reason="CONSOLE_LOG_UNAVAILABLE"), False),
        (NotFound("VM web not found", reason="VM_NOT_FOUND"), False),
        (PermissionDenied("no", reason="ROLE_NOT_ALLOWED"), False),
    ],
)
def test_what_a_follow_rides_out(error: CloneboxError, expected: bool) -> None:
    assert retryable(error) is expected
