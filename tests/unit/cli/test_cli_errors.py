"""Error mapping: one line on stderr, one exit code per error class, never a traceback."""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from clonebox.type.v1 import operation_pb2
from grpc_status import rpc_status
from typer.testing import CliRunner

from clonebox_cli import errors, main, operation, output
from clonebox_cli.client import ControllerClient
from clonebox_cli.main import app
from clonebox_core import errors as core_errors
from clonebox_core.rpc.server import Transport
from clonebox_core.rpc.status import to_status_proto
from clonebox_core.rpc.tls import TlsFiles

if TYPE_CHECKING:
    from .conftest import FakeController

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"

EXPECTED = {
    core_errors.InvalidArgument: 2,
    core_errors.NotFound: 3,
    core_errors.AlreadyExists: 4,
    core_errors.FailedPrecondition: 5,
    core_errors.ResourceExhausted: 6,
    core_errors.PermissionDenied: 7,
    core_errors.Unauthenticated: 8,
    core_errors.Unavailable: 9,
    core_errors.DeadlineExceeded: 10,
    core_errors.Aborted: 11,
    core_errors.Internal: 12,
    errors.TlsHandshakeFailed: 13,
}


def test_every_error_class_has_its_exit_code() -> None:
    # every core class, plus the CLI's own: a failed TLS handshake (an Unavailable that retrying won't fix)
    assert set(errors.EXIT_CODES) == {*core_errors.ERROR_CLASSES, errors.TlsHandshakeFailed}
    assert errors.EXIT_CODES == EXPECTED
    assert errors.exit_code(errors.TlsHandshakeFailed("x")) == errors.EXIT_TLS == 13
    assert len(set(errors.EXIT_CODES.values())) == len(errors.EXIT_CODES)  # one code per class
    assert errors.exit_code(core_errors.CloneboxError("x")) == 12
    assert errors.exit_code(KeyboardInterrupt()) == 130

    class SubNotFound(core_errors.NotFound):
        pass

    assert errors.exit_code(SubNotFound("x")) == 3


@pytest.mark.parametrize(("cls", "code"), sorted(EXPECTED.items(), key=lambda kv: kv[1]))
def test_each_class_raised_by_a_command_exits_with_its_code(
    cls: type[core_errors.CloneboxError], code: int, monkeypatch: pytest.MonkeyPatch, runner: CliRunner
) -> None:
    def boom(*_: Any, **__: Any) -> None:
        raise cls("it went\nwrong", reason="TEST")

    monkeypatch.setattr("clonebox_cli.specinput.load_for_create", boom)
    result = runner.invoke(app, ["vm", "validate", "-f", "x.yaml"])
    assert result.exit_code == code
    assert result.stderr == "error: it went wrong\n"
    assert result.stdout == ""


def test_an_unexpected_exception_is_one_line_and_exit_12(monkeypatch: pytest.MonkeyPatch, runner: CliRunner) -> None:
    def boom(*_: Any, **__: Any) -> None:
        raise RuntimeError("kaput")

    monkeypatch.setattr("clonebox_cli.specinput.load_for_create", boom)
    result = runner.invoke(app, ["vm", "validate", "-f", "x.yaml"])
    assert result.exit_code == 12
    assert result.stderr.strip() == (
        "error: internal error in the clonebox CLI: RuntimeError: kaput (set CLONEBOX_DEBUG=1 for the traceback)"
    )
    assert "Traceback" not in result.output


def test_clonebox_debug_shows_the_traceback(monkeypatch: pytest.MonkeyPatch, runner: CliRunner) -> None:
    def boom(*_: Any, **__: Any) -> None:
        raise RuntimeError("kaput")

    monkeypatch.setattr("clonebox_cli.specinput.load_for_create", boom)
    monkeypatch.setenv("CLONEBOX_DEBUG", "1")
    result = runner.invoke(app, ["vm", "validate", "-f", "x.yaml"])
    assert result.exit_code == 12 and "Traceback" in result.stderr


def test_ctrl_c_while_waiting_exits_130_with_a_hint(
    monkeypatch: pytest.MonkeyPatch, runner: CliRunner, fake_controller: FakeController
) -> None:
    def interrupted(*_: Any, **__: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(operation.ControllerClient, "stream", interrupted)
    result = runner.invoke(
        app, ["--controller", fake_controller.address, "vm", "create", "-f", str(EXAMPLES / "tiny-a.yaml")]
    )
    assert result.exit_code == 130
    assert "interrupted; operation op-1 goes on: follow it with 'clonebox operation wait op-1'" in result.stderr


def test_usage_errors_exit_2(runner: CliRunner) -> None:
    assert runner.invoke(app, ["vm", "frobnicate"]).exit_code == 2
    assert runner.invoke(app, ["vm", "create"]).exit_code == 2  # -f is required
    assert runner.invoke(app, ["-o", "yaml", "host", "list"]).exit_code == 2


def test_version_and_help(runner: CliRunner) -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.startswith("clonebox ")
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for group in ("host", "vm", "operation", "pki", "dev"):
        assert group in result.stdout
    for option in ("--tls-dir", "--insecure", "CLONEBOX_TLS_DIR", "[default: recorded by 'clonebox dev up'"):
        assert option in result.stdout
    assert "--install-completion" in result.stdout


def test_run_entry_point_maps_exit_codes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["clonebox", "vm", "validate", "-f", str(tmp_path / "missing.yaml")])
    with pytest.raises(SystemExit) as info:
        main.run()
    assert info.value.code == 2
    monkeypatch.setattr(sys, "argv", ["clonebox", "vm", "validate", "-f", str(EXAMPLES / "tiny-a.yaml")])
    with pytest.raises(SystemExit) as info:
        main.run()
    assert info.value.code in (0, None)


def test_run_maps_a_keyboard_interrupt_outside_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*_: Any, **__: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(main, "app", interrupted)
    with pytest.raises(SystemExit) as info:
        main.run()
    assert info.value.code == 130


def test_one_line() -> None:
    assert errors.one_line("a\n  b\tc ") == "a b c"


# --------------------------------------------------------------------------------------------- output


def test_live_progress_display_runs_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_tty = io.StringIO()
    fake_tty.isatty = lambda: True  # type: ignore[method-assign]
    monkeypatch.setattr(sys, "stderr", fake_tty)
    op = operation_pb2.Operation(id="op-1", kind="vm.create", target="hosts/h/vms/v", step="placing", progress=10)
    with operation._Display() as display:
        assert display.live
        display.update(op)
        op.progress, op.done = 100, True
        display.update(op)


def test_plain_progress_prints_each_change_once(capsys: pytest.CaptureFixture[str]) -> None:
    op = operation_pb2.Operation(id="op-1", kind="vm.stop", target="hosts/h/vms/v", step="shutting down")
    with operation._Display() as display:
        display.update(op)
        display.update(op)
        op.progress = 50
        display.update(op)
    assert capsys.readouterr().err.splitlines() == [
        "[  0%] vm.stop hosts/h/vms/v: shutting down",
        "[ 50%] vm.stop hosts/h/vms/v: shutting down",
    ]


def test_operation_status_words() -> None:
    op = operation_pb2.Operation(progress=40)
    assert output.operation_status(op) == "running 40%"
    op.done = True
    assert output.operation_status(op) == "done"
    op.error.code = 5  # NOT_FOUND
    assert output.operation_status(op) == "failed: NOT_FOUND"


@pytest.mark.parametrize(
    ("mib", "text"),
    [(128, "128MiB"), (1024, "1GiB"), (15872, "15.5GiB"), (99 * 1024, "99GiB"), (3 * 1024**2, "3TiB")],
)
def test_human_size(mib: int, text: str) -> None:
    assert output.human_size(mib) == text


class _FailedCall(grpc.RpcError):
    """A failed call as grpc hands it to the CLI (code, details, trailing metadata); a fake of grpc's own."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing: tuple[tuple[str, Any], ...] = ()) -> None:
        self._code, self._details, self._trailing = code, details, trailing

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, Any], ...]:
        return self._trailing


def _client() -> ControllerClient:
    tls = TlsFiles(Path("/nonexistent/ca.crt"), Path("/nonexistent/user.crt"), Path("/nonexistent/user.key"))
    return ControllerClient("127.0.0.1:7443", Transport(tls))


def test_an_unreachable_agent_forwarded_by_the_controller_is_not_a_certificate_problem() -> None:
    # the controller answered with its own status: one of its agents went away ("Socket closed")
    forwarded = core_errors.Unavailable("cannot reach agent h1 at 10.0.0.2:7444: Socket closed", reason="UNREACHABLE")
    status = rpc_status.to_status(to_status_proto(forwarded))
    call = _FailedCall(status.code, status.details, tuple(status.trailing_metadata))
    err = _client().translate(call)
    assert isinstance(err, core_errors.Unavailable) and err.message == forwarded.message
    assert "certificate" not in err.message and "cannot reach controller" not in err.message


def test_a_connection_closed_before_any_answer_is_still_a_rejected_certificate() -> None:
    err = _client().translate(_FailedCall(grpc.StatusCode.UNAVAILABLE, "Socket closed"))
    assert "rejected this client's certificate" in err.message
    err = _client().translate(_FailedCall(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses"))
    assert isinstance(err, core_errors.Unavailable) and "cannot reach controller at 127.0.0.1:7443" in err.message
