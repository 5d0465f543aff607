"""``clonebox health`` and the Health part of ``vm show``, against the in-process fake controller."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeAlias

import pytest
from clonebox.controller.v1 import health_service_pb2 as hs_pb2
from clonebox.type.v1 import health_pb2
from rich.console import Console
from typer.testing import CliRunner, Result

from clonebox_cli import health as health_module
from clonebox_cli.main import app
from clonebox_core.errors import FailedPrecondition, Unavailable
from clonebox_core.health import HealthState

from .conftest import HOLD, FakeFleet, serve_fake

if TYPE_CHECKING:
    from .conftest import FakeController, ThrowawayPki

State: TypeAlias = health_pb2.HealthState.ValueType
HEALTHY = health_pb2.HEALTH_STATE_HEALTHY
DEGRADED = health_pb2.HEALTH_STATE_DEGRADED
UNHEALTHY = health_pb2.HEALTH_STATE_UNHEALTHY
UNKNOWN = health_pb2.HEALTH_STATE_UNKNOWN
T0 = datetime(2026, 11, 26, 10, 0, tzinfo=UTC)


def cli(runner: CliRunner, fc: FakeController, *args: str) -> Result:
    return runner.invoke(app, ["--controller", fc.address, *args])


def error_line(result: Result) -> str:
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[-1]


def ts(msg: Any, name: str, when: datetime) -> None:
    getattr(msg, name).FromDatetime(when)


def check(
    name: str, state: State, failures: int = 0, detail: str = "", critical: bool = True
) -> health_pb2.CheckStatus:
    c = health_pb2.CheckStatus(
        name=name,
        type=health_pb2.HEALTH_CHECK_TYPE_HTTP,
        state=state,
        critical=critical,
        consecutive_failures=failures,
    )
    if detail:
        c.last.CopyFrom(
            result(name, health_pb2.PROBE_SAMPLE_PASS if state == HEALTHY else health_pb2.PROBE_SAMPLE_FAIL, detail)
        )
    return c


def vm_health(vm: str, state: State, *checks: health_pb2.CheckStatus) -> health_pb2.VmHealth:
    h = health_pb2.VmHealth(vm=vm, host="local", state=state, checks=checks)
    ts(h, "since", datetime.now(UTC) - timedelta(minutes=5))
    return h


def result(
    name: str, sample: health_pb2.ProbeSample.ValueType, detail: str, duration_us: int = 12_300
) -> health_pb2.ProbeResult:
    r = health_pb2.ProbeResult(check=name, sample=sample, detail=detail, duration_us=duration_us)
    ts(r, "time", T0)
    return r


def transition(
    seq: int, vm: str = "web", chk: str = "db", old: State = HEALTHY, new: State = UNHEALTHY, detail: str = ""
) -> Any:
    t = health_pb2.HealthTransition(
        seq=seq,
        vm=vm,
        host="local",
        check=chk,
        from_state=old,
        to_state=new,
        detail=detail,
    )
    ts(t, "time", T0 + timedelta(seconds=seq))
    return t


def snapshot(h: health_pb2.VmHealth) -> hs_pb2.WatchHealthResponse:
    return hs_pb2.WatchHealthResponse(health=h)


def synced(seq: int) -> hs_pb2.WatchHealthResponse:
    return hs_pb2.WatchHealthResponse(synced=True, seq=seq)


def update(h: health_pb2.VmHealth, *ts_: health_pb2.HealthTransition) -> hs_pb2.WatchHealthResponse:
    return hs_pb2.WatchHealthResponse(health=h, transitions=ts_, seq=max((t.seq for t in ts_), default=0))


def replay(t: health_pb2.HealthTransition) -> hs_pb2.WatchHealthResponse:
    return hs_pb2.WatchHealthResponse(transitions=[t], seq=t.seq)


def json_lines(result: Result) -> list[dict[str, Any]]:
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


@pytest.fixture
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(health_module, "_FIRST_BACKOFF", 0.01)


WEB_OK = vm_health("web", HEALTHY, check("http", HEALTHY, detail="HTTP 200"), check("db", HEALTHY, detail="ok"))


def web_sick() -> health_pb2.VmHealth:
    """Made per test: its ``since`` is five minutes before *now*, whenever the test runs."""
    return vm_health(
        "web", UNHEALTHY, check("http", HEALTHY, detail="HTTP 200"), check("db", UNHEALTHY, 3, "connection refused")
    )


# ---------------------------------------------------------------------------------------------- check


def test_check_table_exits_1_when_a_run_failed(runner: CliRunner, fake_controller: FakeController) -> None:
    fleet = fake_controller.fleet
    fleet.health["web"] = web_sick()
    fleet.check_results["web"] = [
        result("http", health_pb2.PROBE_SAMPLE_PASS, "HTTP 200", 12_300),
        result("db", health_pb2.PROBE_SAMPLE_FAIL, "connection refused", 2_000_000),
    ]
    out = cli(runner, fake_controller, "health", "check", "web")
    assert out.exit_code == 1, out.output
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["CHECK", "SAMPLE", "DETAIL", "DURATION", "MS"]
    assert lines[1].split() == ["http", "pass", "HTTP", "200", "12.3"]
    assert lines[2].split() == ["db", "fail", "connection", "refused", "2000.0"]
    assert "scheduled: unhealthy since" in out.stdout and "(http:healthy db:unhealthy(3))" in out.stdout
    assert out.stderr == ""
    (request,) = fleet.calls("CheckHealth")
    assert (request.name, request.check) == ("web", "")


def test_check_json_is_one_document_and_keeps_the_exit_code(runner: CliRunner, fake_controller: FakeController) -> None:
    fleet = fake_controller.fleet
    fleet.health["web"] = web_sick()
    fleet.check_results["web"] = [
        result("http", health_pb2.PROBE_SAMPLE_PASS, "HTTP 200"),
        result("db", health_pb2.PROBE_SAMPLE_FAIL, "connection refused"),
    ]
    out = cli(runner, fake_controller, "-o", "json", "health", "check", "web")
    assert out.exit_code == 1
    data = json.loads(out.stdout)
    assert data["ok"] is False
    assert [(r["check"], r["sample"]) for r in data["results"]] == [
        ("http", "PROBE_SAMPLE_PASS"),
        ("db", "PROBE_SAMPLE_FAIL"),
    ]
    assert data["health"]["state"] == "HEALTH_STATE_UNHEALTHY"
    assert data["results"][0]["duration_us"] == 12_300


def test_check_passes_and_warns_exit_0_and_probe_selects_one(
    runner: CliRunner, fake_controller: FakeController
) -> None:
    fleet = fake_controller.fleet
    fleet.health["web"] = WEB_OK
    fleet.check_results["web"] = [
        result("http", health_pb2.PROBE_SAMPLE_PASS, "HTTP 200"),
        result("load", health_pb2.PROBE_SAMPLE_WARN, "cpu 85%"),
        result("db", health_pb2.PROBE_SAMPLE_FAIL, "connection refused"),
    ]
    out = cli(runner, fake_controller, "-o", "json", "health", "check", "web", "--probe", "load")
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["ok"] is True
    assert fleet.calls("CheckHealth")[0].check == "load"


def test_check_no_data_is_not_a_pass(runner: CliRunner, fake_controller: FakeController) -> None:
    fake_controller.fleet.check_results["web"] = [result("load", health_pb2.PROBE_SAMPLE_NO_DATA, "no statistics")]
    out = cli(runner, fake_controller, "health", "check", "web")
    assert out.exit_code == 1
    assert "no_data" in out.stdout


def test_check_unknown_vm_exits_3(runner: CliRunner, fake_controller: FakeController) -> None:
    out = cli(runner, fake_controller, "health", "check", "ghost")
    assert out.exit_code == 3
    assert error_line(out) == "error: vm ghost not found"


# ----------------------------------------------------------------------------------------------- list


def test_list_table_json_and_state_filter(runner: CliRunner, fake_controller: FakeController) -> None:
    fleet = fake_controller.fleet
    fleet.health["web"] = web_sick()
    fleet.health["api"] = vm_health("api", HEALTHY, check("http", HEALTHY))
    out = cli(runner, fake_controller, "health", "list")
    assert out.exit_code == 0, out.output
    rows = [line.split() for line in out.stdout.splitlines()]
    assert rows[0] == ["VM", "HOST", "STATE", "SINCE", "CHECKS"]
    assert rows[1] == ["api", "local", "healthy", "5m", "http:healthy"]
    assert rows[2] == ["web", "local", "unhealthy", "5m", "http:healthy", "db:unhealthy(3)"]

    data = json.loads(cli(runner, fake_controller, "-o", "json", "health", "list", "--state", "unhealthy").stdout)
    assert [h["vm"] for h in data["health"]] == ["web"]
    assert data["health"][0]["checks"][1]["consecutive_failures"] == 3
    request = fleet.calls("ListHealth")[-1]
    assert list(request.states) == [UNHEALTHY] and list(request.names) == []

    cli(runner, fake_controller, "health", "list", "api", "--state", "healthy", "--state", "degraded")
    request = fleet.calls("ListHealth")[-1]
    assert list(request.names) == ["api"] and list(request.states) == [HEALTHY, DEGRADED]


def test_list_bad_state_is_a_usage_error(runner: CliRunner, fake_controller: FakeController) -> None:
    out = cli(runner, fake_controller, "health", "list", "--state", "sick")
    assert out.exit_code == 2
    assert fake_controller.fleet.calls("ListHealth") == []


# -------------------------------------------------------------------------------------------- history


def _history() -> hs_pb2.GetHealthHistoryResponse:
    aggregates = []
    for minute, (passes, failures, total_us, max_us) in enumerate([(6, 0, 60_000, 20_000), (3, 3, 120_000, 50_000)]):
        a = health_pb2.HealthAggregate(
            vm="web",
            check="db",
            passes=passes,
            failures=failures,
            duration_us_sum=total_us,
            duration_us_max=max_us,
        )
        ts(a, "minute", T0 + timedelta(minutes=minute))
        aggregates.append(a)
    action = health_pb2.HealthActionRecord(
        vm="web",
        check="db",
        trigger="on_failure",
        kind=health_pb2.CHECK_ACTION_KIND_RESTART,
        outcome="done",
        detail="restarted",
    )
    ts(action, "time", T0 + timedelta(minutes=2))
    return hs_pb2.GetHealthHistoryResponse(
        transitions=[
            transition(1, detail="connection refused"),
            transition(2, chk="", old=HEALTHY, new=UNHEALTHY, detail="db is unhealthy"),
        ],
        aggregates=aggregates,
        actions=[action],
    )


def test_history_table(runner: CliRunner, fake_controller: FakeController) -> None:
    fake_controller.fleet.histories["web"] = _history()
    out = cli(runner, fake_controller, "health", "history", "web", "--probe", "db", "--limit", "50")
    assert out.exit_code == 0, out.output
    text = out.stdout
    assert "2026-11-26T10:00:01+00:00  db     healthy → unhealthy  connection refused" in text
    assert "(vm)   healthy → unhealthy  db is unhealthy" in text
    assert "on_failure  restart  done     restarted" in text
    # 12 runs, 9 passes, 3 failures, 180 ms over 12 runs, longest 50 ms
    summary = next(line for line in text.splitlines() if line.startswith("db ") and "75.0" in line)
    assert summary.split() == ["db", "12", "75.0", "3", "15.0", "50.0"]
    (request,) = fake_controller.fleet.calls("GetHealthHistory")
    assert (request.name, request.check, request.limit) == ("web", "db", 50)


def test_history_json_and_since(runner: CliRunner, fake_controller: FakeController) -> None:
    fake_controller.fleet.histories["web"] = _history()
    before = datetime.now(UTC)
    data = json.loads(cli(runner, fake_controller, "-o", "json", "health", "history", "web", "--since", "2h").stdout)
    after = datetime.now(UTC)
    assert [t["seq"] for t in data["transitions"]] == [1, 2]
    assert data["actions"][0]["kind"] == "CHECK_ACTION_KIND_RESTART"
    assert len(data["aggregates"]) == 2
    assert data["summary"] == [
        {"check": "db", "runs": 12, "pass_percent": 75.0, "failures": 3, "mean_ms": 15.0, "max_ms": 50.0}
    ]
    since = fake_controller.fleet.calls("GetHealthHistory")[0].since.ToDatetime(tzinfo=UTC)
    assert before - timedelta(hours=2, seconds=1) <= since <= after - timedelta(hours=2) + timedelta(seconds=1)

    cli(runner, fake_controller, "health", "history", "web", "--since", "2026-11-26T08:00:00Z")
    since = fake_controller.fleet.calls("GetHealthHistory")[1].since.ToDatetime(tzinfo=UTC)
    assert since == datetime(2026, 11, 26, 8, 0, tzinfo=UTC)
    # the default is the last 24 hours
    cli(runner, fake_controller, "health", "history", "web")
    since = fake_controller.fleet.calls("GetHealthHistory")[2].since.ToDatetime(tzinfo=UTC)
    assert timedelta(hours=23) < datetime.now(UTC) - since < timedelta(hours=25)


def test_history_bad_since_names_the_option(runner: CliRunner, fake_controller: FakeController) -> None:
    out = cli(runner, fake_controller, "health", "history", "web", "--since", "yesterday")
    assert out.exit_code == 2
    line = error_line(out)
    assert line.startswith("error: --since: 'yesterday' is neither a duration like 30m")
    assert fake_controller.fleet.calls("GetHealthHistory") == []


def test_history_empty(runner: CliRunner, fake_controller: FakeController) -> None:
    out = cli(runner, fake_controller, "health", "history", "web")
    assert out.exit_code == 0
    assert "transitions: none" in out.stdout and "actions: none" in out.stdout
    assert "runs per check: none recorded" in out.stdout


# ------------------------------------------------------------------------------------------- vm show


def test_vm_show_has_a_health_section(runner: CliRunner, fake_controller: FakeController) -> None:
    fake_controller.fleet.health["web"] = web_sick()
    out = cli(runner, fake_controller, "vm", "show", "web")
    assert out.exit_code == 0, out.output
    assert "health: unhealthy since" in out.stdout
    rows = [line.split() for line in out.stdout.splitlines()]
    assert ["http", "healthy", "HTTP", "200"] in rows
    assert ["db", "unhealthy", "(3", "failed", "in", "a", "row)", "connection", "refused"] in rows
    data = json.loads(cli(runner, fake_controller, "-o", "json", "vm", "show", "web").stdout)
    assert data["name"] == "web"
    assert data["health"]["state"] == "HEALTH_STATE_UNHEALTHY"
    assert [c["name"] for c in data["health"]["checks"]] == ["http", "db"]


def test_vm_show_without_reports_yet(runner: CliRunner, fake_controller: FakeController) -> None:
    out = cli(runner, fake_controller, "vm", "show", "web")
    assert out.exit_code == 0
    assert "health: unknown (no checks have reported)" in out.stdout


def test_vm_show_when_the_controller_has_no_health_service(runner: CliRunner, fake_controller: FakeController) -> None:
    fake_controller.fleet.health_unimplemented = True
    out = cli(runner, fake_controller, "vm", "show", "web")
    assert out.exit_code == 0, out.output
    assert "10.0.0.5/24" in out.stdout
    assert out.stdout.rstrip().endswith("health: unavailable (UNIMPLEMENTED)")
    data = json.loads(cli(runner, fake_controller, "-o", "json", "vm", "show", "web").stdout)
    assert data["name"] == "web" and data["health"]["unavailable"] == "UNIMPLEMENTED"


def test_vm_show_when_health_is_unavailable(runner: CliRunner, fake_controller: FakeController) -> None:
    fake_controller.fleet.health_error = Unavailable("agent of host local is unreachable", reason="AGENT_UNREACHABLE")
    out = cli(runner, fake_controller, "vm", "show", "web")
    assert out.exit_code == 0, out.output
    assert "health: unavailable (AGENT_UNREACHABLE)" in out.stdout
    assert len(fake_controller.fleet.calls("GetVmHealth")) == 1  # asked once: vm show stays quick


def test_vm_show_other_health_errors_fail_the_command(runner: CliRunner, fake_controller: FakeController) -> None:
    fake_controller.fleet.health_error = FailedPrecondition("broken", reason="SOMETHING")
    out = cli(runner, fake_controller, "vm", "show", "web")
    assert out.exit_code == 5
    assert error_line(out) == "error: broken"


def test_vm_show_spec_does_not_ask_for_health(runner: CliRunner, fake_controller: FakeController) -> None:
    assert cli(runner, fake_controller, "vm", "show", "web", "--spec").exit_code == 0
    assert fake_controller.fleet.calls("GetVmHealth") == []


# ---------------------------------------------------------------------------------------------- watch


def test_watch_snapshot_then_updates_as_json_lines(runner: CliRunner, fake_controller: FakeController) -> None:
    fleet = fake_controller.fleet
    fleet.watch_sessions = [
        [
            snapshot(WEB_OK),
            snapshot(vm_health("api", HEALTHY)),
            synced(4),
            update(web_sick(), transition(5), transition(6, chk="")),
            update(WEB_OK, transition(7, old=UNHEALTHY, new=HEALTHY)),
            update(web_sick(), transition(8)),  # not read: --count 2
            HOLD,
        ]
    ]
    out = cli(
        runner, fake_controller, "-o", "json", "health", "watch", "web", "api", "--count", "2", "--state", "healthy"
    )
    assert out.exit_code == 0, out.output
    lines = json_lines(out)
    assert len(lines) == 5
    assert [line["health"]["vm"] for line in lines[:2]] == ["web", "api"]
    assert lines[2] == {"health": None, "removed": False, "seq": 4, "synced": True, "transitions": []}
    assert [t["seq"] for t in lines[3]["transitions"]] == [5, 6]
    assert lines[3]["transitions"][1]["check"] == ""
    assert lines[4]["health"]["state"] == "HEALTH_STATE_HEALTHY"
    (request,) = fleet.calls("WatchHealth")
    assert list(request.names) == ["web", "api"] and list(request.states) == [HEALTHY]
    assert request.after_seq == 0


def test_watch_table_mode_on_a_pipe_prints_json_lines(runner: CliRunner, fake_controller: FakeController) -> None:
    fake_controller.fleet.watch_sessions = [[snapshot(WEB_OK), synced(0), update(web_sick(), transition(1))]]
    out = cli(runner, fake_controller, "health", "watch", "--count", "1")
    assert out.exit_code == 0, out.output
    assert [line["seq"] for line in json_lines(out)] == [0, 0, 1]


def test_watch_on_a_terminal_redraws_a_table(
    runner: CliRunner, fake_controller: FakeController, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich: treat the captured stdout as a terminal
    fake_controller.fleet.watch_sessions = [
        [snapshot(WEB_OK), snapshot(vm_health("api", HEALTHY)), synced(0), update(web_sick(), transition(1))]
    ]
    out = cli(runner, fake_controller, "health", "watch", "--count", "1")
    assert out.exit_code == 0, out.output
    assert "\x1b[" in out.stdout  # cursor movement: redrawn in place
    final = out.stdout.rsplit("VM ", 1)[1]  # the last drawing
    assert "web" in final and "http:healthy db:unhealthy(3)" in final and "api" in final
    assert "{" not in out.stdout  # no JSON lines


def test_watch_view_drops_vms_that_leave_the_chosen_states() -> None:
    view = health_module.WatchView(states=frozenset({HealthState.UNHEALTHY}))
    view.apply(snapshot(web_sick()))
    view.apply(update(vm_health("api", UNHEALTHY), transition(3, vm="api")))
    view.apply(update(WEB_OK, transition(4, old=UNHEALTHY, new=HEALTHY)))
    view.apply(hs_pb2.WatchHealthResponse(health=vm_health("gone", UNHEALTHY), removed=True))
    assert list(view.rows) == ["api"] and view.last_seq == 4
    console = Console(record=True, width=120)
    console.print(view.render())
    text = console.export_text()
    assert "api" in text and "web" not in text and "transition seq 4" in text


def test_watch_reconnects_after_a_controller_restart_and_resumes_after_the_last_seq(
    runner: CliRunner, test_pki: ThrowawayPki, monkeypatch: pytest.MonkeyPatch, fast_backoff: None
) -> None:
    fleet = FakeFleet()
    fleet.add_vm("web")
    fleet.watch_sessions = [
        [snapshot(WEB_OK), synced(4), update(web_sick(), transition(7)), HOLD],
        [snapshot(web_sick()), replay(transition(8, chk="http")), synced(8), update(WEB_OK, transition(9))],
    ]
    server, port = serve_fake(fleet, test_pki)
    servers = [server]
    seen = threading.Event()
    printed = health_module.watch_line

    def spy(response: hs_pb2.WatchHealthResponse) -> str:
        if any(t.seq == 7 for t in response.transitions):
            seen.set()
        return printed(response)

    monkeypatch.setattr(health_module, "watch_line", spy)

    def restart() -> None:
        if seen.wait(60):  # the CLI has taken transition 7: take the controller away and bring it back
            server.stop(0).wait()
            servers.append(serve_fake(fleet, test_pki, port=port)[0])

    thread = threading.Thread(target=restart, daemon=True)
    thread.start()
    try:
        args = ["--controller", f"127.0.0.1:{port}", "-o", "json", "health", "watch", "--count", "3"]
        out = runner.invoke(app, [*args, "--timeout", "60s"])
    finally:
        thread.join(10)
        for s in servers:
            s.stop(0)
    assert out.exit_code == 0, out.output
    assert [r.after_seq for r in fleet.calls("WatchHealth")] == [0, 7]
    notices = [json.loads(line)["notice"] for line in out.stderr.splitlines()]
    assert notices and all(n.startswith("reconnecting… (") for n in notices)
    seqs = [t["seq"] for line in json_lines(out) for t in line["transitions"]]
    assert seqs == [7, 8, 9]


def test_watch_revision_expired_starts_again_from_a_snapshot(
    runner: CliRunner, fake_controller: FakeController, fast_backoff: None
) -> None:
    fleet = fake_controller.fleet
    fleet.watch_sessions = [
        [snapshot(WEB_OK), synced(4), update(web_sick(), transition(5))],  # then the stream ends
        [FailedPrecondition("seq 5 is older than the stored transitions", reason="REVISION_EXPIRED")],
        [snapshot(web_sick()), synced(12), update(WEB_OK, transition(12, old=UNHEALTHY, new=HEALTHY))],
    ]
    out = cli(runner, fake_controller, "health", "watch", "--count", "2")
    assert out.exit_code == 0, out.output
    assert [r.after_seq for r in fleet.calls("WatchHealth")] == [0, 5, 0]
    assert "reconnecting… (the controller ended the watch" in out.stderr
    assert "resume point 5 has expired on the controller: starting again from a fresh snapshot" in out.stderr


def test_watch_queue_overflow_resumes_after_the_last_seq(
    runner: CliRunner, fake_controller: FakeController, fast_backoff: None
) -> None:
    fleet = fake_controller.fleet
    overflow = FailedPrecondition("watch queue overflowed: reading too slowly", reason="WATCH_QUEUE_OVERFLOW")
    fleet.watch_sessions = [
        [snapshot(WEB_OK), synced(2), update(web_sick(), transition(3)), overflow],
        [snapshot(web_sick()), replay(transition(4)), synced(5), update(WEB_OK, transition(6))],
    ]
    out = cli(runner, fake_controller, "health", "watch", "--count", "3")
    assert out.exit_code == 0, out.output
    assert [r.after_seq for r in fleet.calls("WatchHealth")] == [0, 3]
    assert "the controller dropped the watch: watch queue overflowed" in out.stderr


def test_watch_refused_at_once_is_an_error(runner: CliRunner, fake_controller: FakeController) -> None:
    fake_controller.fleet.watch_sessions = [[FailedPrecondition("not now", reason="NOT_READY")]]
    out = cli(runner, fake_controller, "health", "watch")
    assert out.exit_code == 5
    assert error_line(out) == "error: not now"


def test_watch_unreachable_controller_exits_9(runner: CliRunner, test_pki: ThrowawayPki) -> None:
    from .test_cli_commands import closed_port

    address = f"127.0.0.1:{closed_port()}"
    out = runner.invoke(app, ["--controller", address, "health", "watch"])
    assert out.exit_code == 9
    assert f"cannot reach controller at {address}" in error_line(out)


def test_watch_timeout(runner: CliRunner, fake_controller: FakeController) -> None:
    fake_controller.fleet.watch_sessions = [[snapshot(WEB_OK), synced(0), HOLD], [snapshot(WEB_OK), synced(0), HOLD]]
    out = cli(runner, fake_controller, "health", "watch", "--timeout", "300ms")
    assert out.exit_code == 0, out.output
    out = cli(runner, fake_controller, "health", "watch", "--timeout", "300ms", "--count", "1")
    assert out.exit_code == 10
    assert error_line(out) == "error: watch: 0 of 1 updates arrived before the 300ms timeout"


def test_watch_bad_timeout_names_the_option(runner: CliRunner, fake_controller: FakeController) -> None:
    out = cli(runner, fake_controller, "health", "watch", "--timeout", "soon")
    assert out.exit_code == 2
    assert error_line(out).startswith("error: --timeout: 'soon' is not a duration")
    assert fake_controller.fleet.calls("WatchHealth") == []


def test_watch_ctrl_c_exits_0(
    runner: CliRunner, fake_controller: FakeController, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_controller.fleet.watch_sessions = [[snapshot(WEB_OK), synced(0), update(web_sick(), transition(1)), HOLD]]

    def interrupt(response: hs_pb2.WatchHealthResponse) -> str:
        if response.transitions:
            raise KeyboardInterrupt
        return "{}"

    monkeypatch.setattr(health_module, "watch_line", interrupt)
    out = cli(runner, fake_controller, "health", "watch")
    assert out.exit_code == 0, out.output
    assert out.stderr == ""
