"""``clonebox up``, ``down``, ``ps`` and ``clonebox plan …`` against the in-process fake controller."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from clonebox.type.v1 import health_pb2, plan_pb2, vm_pb2
from rich.console import Console
from typer.testing import CliRunner, Result

from clonebox_cli import plan as plan_module
from clonebox_cli.main import app
from clonebox_core.plan import (
    ChangeKind,
    PlanRun,
    RunState,
    VmChange,
    VmRunState,
    VmStatus,
    VolumeChange,
    VolumeChangeKind,
)

from .conftest import FAIL_ERROR, FAIL_PROBE, FakeFleet, FakeHealthService, make_host, make_snapshot, serve_fake

if TYPE_CHECKING:
    from .conftest import FakeController, ThrowawayPki

# two tiny VMs: api waits for db to be healthy; nothing here is booted (the controller is a fake)
STACK = """\
version: 1
name: stack
defaults:
  vcpus: 1
  memory: 128MiB
  kernel_boot: {kernel: testguest/vmlinux, initrd: testguest/initrd.img}
  network: {mode: none}
vms:
  db:
    health_checks: [{name: port, type: tcp, tcp: {port: 5432}}]
  api:
    depends_on: {db: {condition: healthy}}
    placement: {host: local}
update: {max_parallel: 2, healthy_deadline: 4m}
on_failure: rollback
"""

# api fails its health gate (the fake fails every service named fail-*)
FAILING = STACK.replace("  api:", "  fail-api:")


def cli(runner: CliRunner, fc: FakeController, *args: str) -> Result:
    return runner.invoke(app, ["--controller", fc.address, *args])


def error_line(result: Result) -> str:
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[-1]


def write(tmp_path: Path, text: str = STACK, name: str = "clonebox-compose.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def json_lines(result: Result) -> list[dict[str, Any]]:
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def up(runner: CliRunner, fc: FakeController, file: str, *args: str) -> Result:
    result = cli(runner, fc, "up", "-f", file, *args)
    assert "Traceback" not in result.output
    return result


@pytest.fixture
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plan_module, "_FIRST_BACKOFF", 0.01)


# ---------------------------------------------------------------------------------------------------- up


def test_up_follows_the_run_one_line_per_change(
    runner: CliRunner, fake_controller: FakeController, tmp_path: Path
) -> None:
    file = write(tmp_path)
    r = up(runner, fake_controller, file)
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines() == [
        "run run-1: up of plan stack revision 1: running",
        "db stack-db: pending (waiting)",
        "api stack-api: pending (waiting)",
        "db stack-db: creating (creating) on local",
        "db stack-db: waiting (waiting for health checks) on local",
        "db stack-db: ready on local",
        "api stack-api: creating (creating) on local",
        "api stack-api: waiting (waiting for health checks) on local",
        "api stack-api: ready on local",
        "run run-1: up of plan stack revision 1: succeeded",
        "plan stack is up: 2 VM(s) ready (run run-1, revision 1)",
    ]
    (req,) = fake_controller.fleet.calls("ApplyPlan")
    assert req.plan.name == "stack" and not req.allow_replace and req.request_id
    assert [(v.service, v.spec.name) for v in req.plan.vms] == [("db", "stack-db"), ("api", "stack-api")]
    assert req.plan.vms[1].depends_on[0].service == "db"
    assert req.plan.vms[1].depends_on[0].condition == plan_pb2.DEPENDENCY_CONDITION_HEALTHY
    assert req.plan.vms[1].host == "local" and req.plan.update.max_parallel == 2
    assert dict(req.plan.vms[0].spec.labels) == {"clonebox.plan": "stack", "clonebox.service": "db"}
    # the watch asks only for what comes after the version ApplyPlan returned
    (watch,) = fake_controller.fleet.calls("WatchPlan")
    assert watch.run_id == "run-1" and watch.after_version == 1
    assert {"stack-db", "stack-api"} <= set(fake_controller.fleet.vms)


def test_up_json_is_one_object_per_run_version(
    runner: CliRunner, fake_controller: FakeController, tmp_path: Path
) -> None:
    r = cli(runner, fake_controller, "-o", "json", "up", "-f", write(tmp_path))
    assert r.exit_code == 0, r.output
    docs = json_lines(r)
    versions = [d["version"] for d in docs]
    assert versions == list(range(1, len(docs) + 1)) and len(docs) == 8
    assert docs[0]["state"] == "PLAN_RUN_STATE_RUNNING" and docs[0]["id"] == "run-1"
    assert docs[-1]["state"] == "PLAN_RUN_STATE_SUCCEEDED" and docs[-1]["done"] is True
    assert [v["state"] for v in docs[-1]["vms"]] == ["PLAN_VM_STATE_READY", "PLAN_VM_STATE_READY"]


def test_up_rolled_back_exits_1_naming_vm_and_probe(
    runner: CliRunner, fake_controller: FakeController, tmp_path: Path
) -> None:
    r = up(runner, fake_controller, write(tmp_path, FAILING))
    assert r.exit_code == plan_module.EXIT_RUN_FAILED == 1
    assert error_line(r) == (
        "error: up of plan stack rolled back (run run-1): vm stack-fail-api (service fail-api) "
        f"failed health check {FAIL_PROBE!r}: {FAIL_ERROR}"
    )
    out = r.stdout.splitlines()
    assert f"fail-api stack-fail-api: failed (health check {FAIL_PROBE!r} failed: {FAIL_ERROR}) on local" in out
    assert "run run-1: up of plan stack revision 1: rolling back: vm stack-fail-api failed" in out
    # the rollback removes what the run created, dependents first; the failed VM keeps saying why
    gone = f"fail-api stack-fail-api: deleted (health check {FAIL_PROBE!r} failed: {FAIL_ERROR}) on local"
    assert out.index(gone) < out.index("db stack-db: deleted on local")
    assert out[-1] == "run run-1: up of plan stack revision 1: rolled back: vm stack-fail-api failed"
    assert "stack-db" not in fake_controller.fleet.vms


def test_up_failed_with_leave_policy_says_what_is_left(
    runner: CliRunner, fake_controller: FakeController, tmp_path: Path
) -> None:
    r = up(runner, fake_controller, write(tmp_path, FAILING.replace("on_failure: rollback", "on_failure: leave")))
    assert r.exit_code == 1
    line = error_line(r)
    assert line.startswith("error: up of plan stack failed (run run-1): vm stack-fail-api (service fail-api)")
    assert "'clonebox ps stack'" in line and "'clonebox down stack'" in line
    assert fake_controller.fleet.calls("ApplyPlan")[0].plan.on_failure == plan_pb2.FAILURE_POLICY_LEAVE


def test_up_json_failure_still_exits_1(runner: CliRunner, fake_controller: FakeController, tmp_path: Path) -> None:
    r = cli(runner, fake_controller, "-o", "json", "up", "-f", write(tmp_path, FAILING))
    assert r.exit_code == 1
    assert json_lines(r)[-1]["state"] == "PLAN_RUN_STATE_ROLLED_BACK"
    assert "stack-fail-api" in error_line(r) and FAIL_PROBE in error_line(r)


def test_up_dry_run_applies_nothing(runner: CliRunner, fake_controller: FakeController, tmp_path: Path) -> None:
    r = up(runner, fake_controller, write(tmp_path), "--dry-run")
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("dry run: nothing was applied. plan stack (current revision -):")
    assert "level 0: db\nlevel 1: api\n" in r.stdout
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines() if line.startswith(("db ", "api "))}
    assert rows["db"][:3] == ["db", "stack-db", "create"] and rows["api"][:3] == ["api", "stack-api", "create"]
    assert "2 to create" in r.stdout
    fleet = fake_controller.fleet
    assert fleet.calls("ApplyPlan") == [] and fleet.plans == {}
    assert len(fleet.calls("ValidatePlan")) == 1 and len(fleet.calls("DiffPlan")) == 1
    j = cli(runner, fake_controller, "-o", "json", "up", "-f", write(tmp_path), "--dry-run")
    doc = json.loads(j.stdout)
    assert doc["dry_run"] is True and doc["levels"] == [["db"], ["api"]] and doc["current_revision"] == 0
    assert [c["kind"] for c in doc["changes"]] == ["CHANGE_KIND_CREATE", "CHANGE_KIND_CREATE"]
    assert fleet.calls("ApplyPlan") == []


def test_up_replace_needs_allow_replace(runner: CliRunner, fake_controller: FakeController, tmp_path: Path) -> None:
    assert up(runner, fake_controller, write(tmp_path)).exit_code == 0
    changed = STACK.replace("  network: {mode: none}", "  network: {mode: libvirt, libvirt_network: default}")
    file = write(tmp_path, changed)
    dry = up(runner, fake_controller, file, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "(current revision 1)" in dry.stdout and "replace" in dry.stdout and "network" in dry.stdout
    assert "it needs 'clonebox up --allow-replace'" in dry.stdout
    refused = up(runner, fake_controller, file)
    assert refused.exit_code == 5 and "allow_replace" in error_line(refused)
    allowed = up(runner, fake_controller, file, "--allow-replace")
    assert allowed.exit_code == 0, allowed.output
    assert fake_controller.fleet.calls("ApplyPlan")[-1].allow_replace


def test_up_detach_prints_the_run_and_how_to_watch(
    runner: CliRunner, fake_controller: FakeController, tmp_path: Path
) -> None:
    r = up(runner, fake_controller, write(tmp_path), "--detach")
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == (
        "run run-1 started: up of plan stack revision 1; watch it with 'clonebox plan watch stack --run run-1'"
    )
    assert fake_controller.fleet.calls("WatchPlan") == []
    j = cli(runner, fake_controller, "-o", "json", "up", "-f", write(tmp_path), "-d")
    doc = json.loads(j.stdout)
    assert doc["id"] == "run-2" and doc["action"] == "up" and doc["state"] == "PLAN_RUN_STATE_RUNNING"
    # the detached run is followed later, to its end
    w = cli(runner, fake_controller, "plan", "watch", "stack", "--run", "run-1")
    assert w.exit_code == 0, w.output
    assert w.stdout.splitlines()[-1] == "plan stack is up: 2 VM(s) ready (run run-1, revision 1)"
    assert fake_controller.fleet.calls("WatchPlan")[0].run_id == "run-1"


def test_missing_default_file_names_the_path(
    runner: CliRunner, fake_controller: FakeController, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    r = cli(runner, fake_controller, "up")
    assert r.exit_code == 2
    assert f"error: clonebox-compose.yaml: no such file in {tmp_path}" in error_line(r)
    missing = cli(runner, fake_controller, "up", "-f", "elsewhere/stack.yaml")
    assert missing.exit_code == 2 and "error: elsewhere/stack.yaml: no such file" in error_line(missing)
    assert fake_controller.fleet.requests == []


def test_default_file_in_the_current_folder(
    runner: CliRunner, fake_controller: FakeController, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path)
    monkeypatch.chdir(tmp_path)
    r = cli(runner, fake_controller, "up", "--detach")
    assert r.exit_code == 0, r.output
    assert fake_controller.fleet.calls("ApplyPlan")[0].plan.name == "stack"


def test_invalid_file_is_reported_with_its_line(
    runner: CliRunner, fake_controller: FakeController, tmp_path: Path
) -> None:
    bad = STACK.replace("    depends_on: {db: {condition: healthy}}", "    depends_on: {dbx: {condition: healthy}}")
    file = write(tmp_path, bad)
    r = up(runner, fake_controller, file)
    assert r.exit_code == 2
    line = error_line(r)
    # "FILE:LINE: path: message", as the plan file reader says it
    assert line.startswith(f"error: {file}:12: vms.api.depends_on") and "dbx" in line
    assert fake_controller.fleet.requests == []


def test_request_id_is_reused_across_retries(
    runner: CliRunner, fake_controller: FakeController, tmp_path: Path
) -> None:
    fake_controller.fleet.plan_unreachable = 2  # the first two attempts never reach the controller
    r = up(runner, fake_controller, write(tmp_path))
    assert r.exit_code == 0, r.output
    attempts = fake_controller.fleet.calls("ApplyPlan")
    assert len(attempts) == 3
    assert len({a.request_id for a in attempts}) == 1 and attempts[0].request_id
    assert len(fake_controller.fleet.plan_runs) == 1
    # an explicit id is sent as given; the same id again returns the same run, never a second one
    again = up(runner, fake_controller, write(tmp_path), "--request-id", attempts[0].request_id, "--detach")
    assert again.exit_code == 0 and "run run-1 " in again.stdout
    assert len(fake_controller.fleet.plan_runs) == 1


def test_watch_reconnects_and_resumes_after_the_last_version(
    runner: CliRunner, fake_controller: FakeController, tmp_path: Path, fast_backoff: None
) -> None:
    fake_controller.fleet.plan_watch_cuts = [3]  # the first watch breaks after three versions
    r = up(runner, fake_controller, write(tmp_path))
    assert r.exit_code == 0, r.output
    assert "reconnecting…" in r.stderr
    first, second = fake_controller.fleet.calls("WatchPlan")
    assert first.after_version == 1 and second.after_version == 4 and second.run_id == "run-1"
    lines = r.stdout.splitlines()
    assert len(lines) == len(set(lines)) == 11  # every change once: nothing lost, nothing repeated
    assert lines[-1] == "plan stack is up: 2 VM(s) ready (run run-1, revision 1)"


def test_resolves_specs_like_vm_create(runner: CliRunner, fake_controller: FakeController, tmp_path: Path) -> None:
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl tester@laptop"
    (tmp_path / "id.pub").write_text(key + "\n")
    text = STACK.replace(
        "    health_checks: [{name: port, type: tcp, tcp: {port: 5432}}]",
        "    health_checks: [{name: port, type: tcp, tcp: {port: 5432}}]\n"
        "    auth: {user: ops, method: both, ssh_keys: [./id.pub], password: env:STACK_PW}",
    )
    text = text.replace(
        "    placement: {host: local}",
        "    placement: {host: local}\n    auth: {user: ops, method: one_time_password}",
    )
    file = write(tmp_path, text)
    r = runner.invoke(
        app, ["--controller", fake_controller.address, "up", "-f", file, "-d"], env={"STACK_PW": "s3cret-pw"}
    )
    assert r.exit_code == 0, r.output
    (req,) = fake_controller.fleet.calls("ApplyPlan")
    db, api = (v.spec.auth for v in req.plan.vms)
    # keys and the password reference are resolved here (relative to the plan file); the request has a hash
    assert list(db.ssh_authorized_keys) == [key] and db.password_hash.startswith("$6$")
    assert list(db.secret_refs) == ["env:STACK_PW"] and "s3cret-pw" not in str(req)
    assert api.password_hash.startswith("$6$")
    # the one-time password is shown once, on stderr
    assert "one-time password for ops@stack-api: " in r.stderr
    assert "shown only now" in r.stderr


def test_a_secret_that_cannot_be_resolved_names_the_service(
    runner: CliRunner, fake_controller: FakeController, tmp_path: Path
) -> None:
    text = STACK.replace(
        "    placement: {host: local}",
        "    placement: {host: local}\n    auth: {user: ops, method: password, password: env:NOT_SET_ANYWHERE}",
    )
    r = up(runner, fake_controller, write(tmp_path, text))
    assert r.exit_code != 0
    assert error_line(r).startswith("error: service api: ") and "NOT_SET_ANYWHERE" in error_line(r)
    assert fake_controller.fleet.calls("ApplyPlan") == []


# -------------------------------------------------------------------------------------------------- down


def test_down_by_name_and_by_file(runner: CliRunner, fake_controller: FakeController, tmp_path: Path) -> None:
    file = write(tmp_path)
    assert up(runner, fake_controller, file).exit_code == 0
    r = cli(runner, fake_controller, "down", "stack")
    assert r.exit_code == 0, r.output
    # reverse dependency order: api is gone before db goes
    assert r.stdout.splitlines() == [
        "run run-2: down of plan stack revision 1: running",
        "api stack-api: pending (waiting)",
        "db stack-db: pending (waiting)",
        "api stack-api: deleting (deleting)",
        "api stack-api: deleted",
        "db stack-db: deleting (deleting)",
        "db stack-db: deleted",
        "run run-2: down of plan stack revision 1: succeeded",
        "plan stack is down: 2 VM(s) removed (run run-2)",
    ]
    (req,) = fake_controller.fleet.calls("DestroyPlan")
    assert req.name == "stack" and not req.with_snapshots and req.request_id
    assert "stack-db" not in fake_controller.fleet.vms
    assert up(runner, fake_controller, file).exit_code == 0
    j = cli(runner, fake_controller, "-o", "json", "down", "-f", file, "--detach")
    assert j.exit_code == 0, j.output
    assert json.loads(j.stdout)["action"] == "down"
    assert fake_controller.fleet.calls("DestroyPlan")[-1].name == "stack"


def test_down_with_snapshots(runner: CliRunner, fake_controller: FakeController, tmp_path: Path) -> None:
    assert up(runner, fake_controller, write(tmp_path)).exit_code == 0
    fake_controller.fleet.snapshots["stack-db"] = [make_snapshot("stack-db", "before")]
    refused = cli(runner, fake_controller, "down", "stack")
    assert refused.exit_code == 1
    assert "vm stack-db (service db) failed: vm stack-db has 1 snapshot(s)" in error_line(refused)
    ok = cli(runner, fake_controller, "down", "stack", "--with-snapshots")
    assert ok.exit_code == 0, ok.output
    assert fake_controller.fleet.calls("DestroyPlan")[-1].with_snapshots


def test_down_name_and_file_together_is_a_usage_error(
    runner: CliRunner, fake_controller: FakeController, tmp_path: Path
) -> None:
    r = cli(runner, fake_controller, "down", "stack", "-f", write(tmp_path))
    assert r.exit_code == 2 and "not both" in error_line(r)
    unknown = cli(runner, fake_controller, "down", "nope")
    assert unknown.exit_code == 3 and "plan nope not found" in error_line(unknown)


VOLUMES = STACK.replace(
    "vms:\n  db:\n",
    "volumes:\n  data: {size: 1GiB}\n  cache: {size: 64MiB, shared: true}\nvms:\n  db:\n    volumes: [data, cache]\n",
).replace("  api:\n", "  api:\n    volumes: [cache]\n")


def test_up_sends_the_plans_volumes(runner: CliRunner, fake_controller: FakeController, tmp_path: Path) -> None:
    assert up(runner, fake_controller, write(tmp_path, VOLUMES)).exit_code == 0
    (req,) = fake_controller.fleet.calls("ApplyPlan")
    assert [(v.name, v.size_mib, v.shared) for v in req.plan.volumes] == [("data", 1024, False), ("cache", 64, True)]
    assert [list(v.volumes) for v in req.plan.vms] == [["data", "cache"], ["cache"]]


def test_down_keeps_volumes_and_says_so(runner: CliRunner, fake_controller: FakeController, tmp_path: Path) -> None:
    assert up(runner, fake_controller, write(tmp_path, VOLUMES)).exit_code == 0
    r = cli(runner, fake_controller, "down", "stack")
    assert r.exit_code == 0, r.output
    assert not fake_controller.fleet.calls("DestroyPlan")[-1].with_volumes
    assert r.stdout.splitlines()[-2:] == [
        "plan stack is down: 2 VM(s) removed (run run-2)",
        "volumes kept with their data: data, cache; the next 'clonebox up' attaches them again "
        "('clonebox down stack --volumes' deletes them)",
    ]


@pytest.mark.parametrize("flag", ["--volumes", "-v"])
def test_down_volumes_asks_for_the_volumes_to_go(
    runner: CliRunner, fake_controller: FakeController, tmp_path: Path, flag: str
) -> None:
    assert up(runner, fake_controller, write(tmp_path, VOLUMES)).exit_code == 0
    r = cli(runner, fake_controller, "down", "stack", flag)
    assert r.exit_code == 0, r.output
    assert fake_controller.fleet.calls("DestroyPlan")[-1].with_volumes
    assert r.stdout.splitlines()[-1] == "volumes deleted with their data: data, cache"


def test_down_of_a_plan_without_volumes_says_nothing_about_them(
    runner: CliRunner, fake_controller: FakeController, tmp_path: Path
) -> None:
    assert up(runner, fake_controller, write(tmp_path)).exit_code == 0
    r = cli(runner, fake_controller, "down", "stack", "--volumes")
    assert r.exit_code == 0, r.output
    assert "volume" not in r.stdout


def test_plan_show_lists_the_volumes(runner: CliRunner, fake_controller: FakeController, tmp_path: Path) -> None:
    assert up(runner, fake_controller, write(tmp_path, VOLUMES)).exit_code == 0
    r = runner.invoke(app, ["--controller", fake_controller.address, "plan", "show", "stack"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    rows = [line.split() for line in r.stdout.splitlines()]
    assert ["VOLUME", "SIZE", "SHARED", "HOST", "USED", "BY"] in rows
    assert ["data", "1GiB", "no", "-", "db"] in rows and ["cache", "64MiB", "yes", "-", "db,", "api"] in rows


def test_down_help_explains_volumes(runner: CliRunner) -> None:
    r = runner.invoke(app, ["down", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    assert "--volumes" in r.stdout and "Without it the volumes are kept" in r.stdout


def test_volume_changes_render_with_the_way_out() -> None:
    changes = [
        VolumeChange(
            "data", "stack-data", "h1", 1024, False, VolumeChangeKind.DIFFERENT, "it has size_mib 512", ("db",)
        ),
        VolumeChange("cache", "stack-cache", "h1", 64, True, VolumeChangeKind.CREATE, "", ("db", "api")),
    ]
    console = Console(file=io.StringIO(), width=200)
    console.print(plan_module.volumes_table(changes))
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "different: the run fails (it has size_mib 512)" in text and "db, api" in text and "1GiB" in text
    summary = plan_module.volumes_summary(changes)
    assert summary.startswith("volumes: 1 to create, 1 different") and "clonebox down NAME --volumes" in summary


# ---------------------------------------------------------------------------------------- plan validate


def test_validate_offline_asks_nobody(runner: CliRunner, fake_controller: FakeController, tmp_path: Path) -> None:
    file = write(tmp_path)
    r = cli(runner, fake_controller, "plan", "validate", "-f", file, "--offline")
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines()[:3] == [f"{file}: ok: plan stack, 2 VMs in 2 levels", "level 0: db", "level 1: api"]
    j = cli(runner, fake_controller, "-o", "json", "plan", "validate", "-f", file, "--offline")
    assert json.loads(j.stdout) == {
        "plan": "stack",
        "file": file,
        "valid": True,
        "offline": True,
        "levels": [["db"], ["api"]],
        "changes": None,
        "volumes": None,
    }
    assert fake_controller.fleet.requests == []


def test_validate_offline_rejects_a_cycle(runner: CliRunner, fake_controller: FakeController, tmp_path: Path) -> None:
    cyclic = STACK.replace(
        "    health_checks: [{name: port, type: tcp, tcp: {port: 5432}}]",
        "    health_checks: [{name: port, type: tcp, tcp: {port: 5432}}]\n    depends_on: [api]",
    )
    r = cli(runner, fake_controller, "plan", "validate", "--offline", "-f", write(tmp_path, cyclic))
    assert r.exit_code == 2 and "dependency cycle" in error_line(r)
    assert fake_controller.fleet.requests == []


def test_validate_online(runner: CliRunner, fake_controller: FakeController, tmp_path: Path) -> None:
    file = write(tmp_path)
    r = cli(runner, fake_controller, "plan", "validate", "-f", file)
    assert r.exit_code == 0, r.output
    assert "level 0: db\nlevel 1: api\n" in r.stdout and "2 to create" in r.stdout
    (req,) = fake_controller.fleet.calls("ValidatePlan")
    assert req.plan.name == "stack" and len(req.plan.vms) == 2
    doc = json.loads(cli(runner, fake_controller, "-o", "json", "plan", "validate", "-f", file).stdout)
    assert doc["offline"] is False and doc["levels"] == [["db"], ["api"]]
    assert [(c["service"], c["kind"]) for c in doc["changes"]] == [
        ("db", "CHANGE_KIND_CREATE"),
        ("api", "CHANGE_KIND_CREATE"),
    ]


def test_validate_online_plan_that_does_not_fit(
    runner: CliRunner, fake_controller: FakeController, tmp_path: Path
) -> None:
    r = cli(runner, fake_controller, "plan", "validate", "-f", write(tmp_path, STACK.replace("128MiB", "12GiB")))
    assert r.exit_code == 6 and "nothing was created" in error_line(r)


# -------------------------------------------------------------------------------------------- plan diff


def test_diff_classifies_each_vm(runner: CliRunner, fake_controller: FakeController, tmp_path: Path) -> None:
    assert up(runner, fake_controller, write(tmp_path)).exit_code == 0
    file = write(tmp_path, STACK.replace("    placement: {host: local}", "    placement: {host: local}\n    vcpus: 2"))
    r = cli(runner, fake_controller, "plan", "diff", "-f", file)
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0] == "plan stack compared to revision 1:"
    assert lines[1].split() == ["SERVICE", "VM", "CHANGE", "FIELDS"]
    assert lines[2].split() == ["db", "stack-db", "none", "-"]
    assert lines[3].split() == ["api", "stack-api", "restart", "vcpus"]
    assert "1 to restart, 1 unchanged" in r.stdout and "--allow-replace" not in r.stdout
    doc = json.loads(cli(runner, fake_controller, "-o", "json", "plan", "diff", "-f", file).stdout)
    assert doc["plan"] == "stack" and doc["current_revision"] == 1
    assert doc["changes"][1] == {
        "service": "api",
        "vm": "stack-api",
        "kind": "CHANGE_KIND_RESTART",
        "fields": ["vcpus"],
    }
    assert fake_controller.fleet.calls("DiffPlan")[0].plan.vms[1].spec.vcpus == 2


def test_diff_before_anything_was_applied(runner: CliRunner, fake_controller: FakeController, tmp_path: Path) -> None:
    r = cli(runner, fake_controller, "plan", "diff", "-f", write(tmp_path))
    assert r.exit_code == 0 and r.stdout.startswith("plan stack compared to nothing applied yet:")


# ------------------------------------------------------------------------------- plan show/list/history


def test_show(runner: CliRunner, fake_controller: FakeController, tmp_path: Path) -> None:
    assert up(runner, fake_controller, write(tmp_path)).exit_code == 0
    r = cli(runner, fake_controller, "plan", "show", "stack")
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert "Revision    1 (sha256:" in out and "2 at a time, healthy deadline 4m" in out
    assert "On failure  roll back" in out
    assert "run-1: up revision 1, succeeded, started 2026-11-26T10:00:00+00:00, took 7s" in out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith(("db ", "api "))}
    assert rows["api"].split()[:5] == ["api", "stack-api", "db", "(healthy)", "local"]
    assert rows["db"].split()[:4] == ["db", "stack-db", "-", "-"] and rows["db"].split()[-1] == "port"
    doc = json.loads(cli(runner, fake_controller, "-o", "json", "plan", "show", "stack").stdout)
    assert doc["plan"]["revision"] == 1 and doc["last_run"]["state"] == "PLAN_RUN_STATE_SUCCEEDED"
    missing = cli(runner, fake_controller, "plan", "show", "nope")
    assert missing.exit_code == 3 and "plan nope not found" in error_line(missing)


def test_list(runner: CliRunner, fake_controller: FakeController, tmp_path: Path) -> None:
    empty = cli(runner, fake_controller, "plan", "list")
    assert empty.exit_code == 0 and "no plans" in empty.stdout
    assert up(runner, fake_controller, write(tmp_path, FAILING)).exit_code == 1
    r = cli(runner, fake_controller, "plan", "list")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["NAME", "REVISION", "VMS", "LAST", "RUN", "STATE", "UPDATED"]
    assert lines[1].split()[:7] == ["stack", "1", "2", "up", "run-1", "rolled", "back"]
    doc = json.loads(cli(runner, fake_controller, "-o", "json", "plan", "list").stdout)
    assert [p["plan"]["name"] for p in doc["plans"]] == ["stack"]
    assert doc["plans"][0]["last_run"]["state"] == "PLAN_RUN_STATE_ROLLED_BACK"


def test_history(runner: CliRunner, fake_controller: FakeController, tmp_path: Path) -> None:
    assert up(runner, fake_controller, write(tmp_path, FAILING)).exit_code == 1
    assert up(runner, fake_controller, write(tmp_path)).exit_code == 0
    r = cli(runner, fake_controller, "plan", "history", "stack")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["ID", "ACTION", "REVISION", "STATE", "STARTED", "DURATION", "ERROR"]
    assert lines[1].split() == ["run-2", "up", "2", "succeeded", "2026-11-26T10:00:00+00:00", "7s", "-"]
    assert lines[2].split()[:4] == ["run-1", "up", "1", "rolled"]
    assert lines[2].endswith("vm stack-fail-api failed")
    assert fake_controller.fleet.calls("ListPlanRuns")[0].limit == 20
    doc = json.loads(cli(runner, fake_controller, "-o", "json", "plan", "history", "stack", "--limit", "1").stdout)
    assert doc["plan"] == "stack" and [x["id"] for x in doc["runs"]] == ["run-2"]
    assert fake_controller.fleet.calls("ListPlanRuns")[-1].limit == 1


# --------------------------------------------------------------------------------------------------- ps


def test_ps(runner: CliRunner, fake_controller: FakeController, tmp_path: Path) -> None:
    assert up(runner, fake_controller, write(tmp_path)).exit_code == 0
    fleet = fake_controller.fleet
    fleet.health["stack-db"] = health_pb2.VmHealth(vm="stack-db", host="local", state=health_pb2.HEALTH_STATE_HEALTHY)
    fleet.vms["stack-api"].state = vm_pb2.VM_STATE_STOPPED
    # a guest agent may list a link-local IPv6 address first: the column shows the IPv4 one
    fleet.vms["stack-db"].addresses.insert(
        0, vm_pb2.IpAddress(interface="eth0", address="fe80::1", prefix=64, source="agent")
    )
    r = cli(runner, fake_controller, "ps")
    assert r.exit_code == 0, r.output
    lines = [line.split() for line in r.stdout.splitlines()]
    assert lines == [
        ["PLAN", "SERVICE", "VM", "STATE", "HEALTH", "HOST", "ADDRESS"],
        ["stack", "api", "stack-api", "stopped", "-", "local", "10.0.0.5"],
        ["stack", "db", "stack-db", "running", "healthy", "local", "10.0.0.5"],
    ]
    # the VMs of a plan are found by its label; the VM outside any plan ('web') is not shown
    (listed,) = fleet.calls("ListVms")
    assert dict(listed.labels) == {"clonebox.plan": "stack"}
    assert sorted(fleet.calls("ListHealth")[0].names) == ["stack-api", "stack-db"]
    doc = json.loads(cli(runner, fake_controller, "-o", "json", "ps", "stack").stdout)
    assert doc["vms"][1] == {
        "plan": "stack",
        "service": "db",
        "vm": "stack-db",
        "state": "running",
        "health": "healthy",
        "host": "local",
        "addresses": ["fe80::1", "10.0.0.5"],
    }


def test_ps_says_held_for_a_vm_whose_room_a_run_holds(
    runner: CliRunner, fake_controller: FakeController, tmp_path: Path
) -> None:
    assert up(runner, fake_controller, write(tmp_path)).exit_code == 0
    fleet = fake_controller.fleet
    fleet.vms["stack-api"].state = vm_pb2.VM_STATE_PENDING
    fleet.vms["stack-api"].state_reason = "held for plan stack (run r1)"
    fleet.vms["stack-db"].state = vm_pb2.VM_STATE_PENDING  # pending for another reason: said as it is
    r = cli(runner, fake_controller, "ps")
    assert r.exit_code == 0, r.output
    assert [line.split()[2:4] for line in r.stdout.splitlines()[1:]] == [["stack-api", "held"], ["stack-db", "pending"]]
    doc = json.loads(cli(runner, fake_controller, "-o", "json", "ps", "stack").stdout)
    assert [(v["vm"], v["state"]) for v in doc["vms"]] == [("stack-api", "held"), ("stack-db", "pending")]


def test_ps_unknown_plan_and_no_plans(runner: CliRunner, fake_controller: FakeController) -> None:
    missing = cli(runner, fake_controller, "ps", "nope")
    assert missing.exit_code == 3 and "plan nope not found" in error_line(missing)
    empty = cli(runner, fake_controller, "ps")
    assert empty.exit_code == 0 and empty.stdout == "no plan has any VMs (bring a plan up with 'clonebox up')\n"
    assert json.loads(cli(runner, fake_controller, "-o", "json", "ps").stdout) == {"vms": []}


def test_ps_without_health_service(
    runner: CliRunner, test_pki: ThrowawayPki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unimplemented(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        self.fleet.record("ListHealth", request)
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")  # a controller without health

    # a server of its own: gRPC binds the servicer's methods when the server starts
    monkeypatch.setattr(FakeHealthService, "ListHealth", unimplemented)
    fleet = FakeFleet(hosts={"local": make_host("local")})
    server, port = serve_fake(fleet, test_pki)
    try:
        args = ["--controller", f"127.0.0.1:{port}"]
        assert runner.invoke(app, [*args, "up", "-f", write(tmp_path)]).exit_code == 0
        r = runner.invoke(app, [*args, "ps", "stack"])
    finally:
        server.stop(0)
    assert r.exit_code == 0, r.output
    rows = [line.split() for line in r.stdout.splitlines()[1:]]
    assert [(row[2], row[4]) for row in rows] == [("stack-api", "unavailable"), ("stack-db", "unavailable")]
    assert fleet.calls("ListHealth")


# ------------------------------------------------------------------------------------------ plan watch


def test_plan_watch_latest_run(runner: CliRunner, fake_controller: FakeController, tmp_path: Path) -> None:
    assert up(runner, fake_controller, write(tmp_path, FAILING), "--detach").exit_code == 0
    r = cli(runner, fake_controller, "plan", "watch", "stack")
    assert r.exit_code == 1
    assert "vm stack-fail-api (service fail-api) failed health check" in error_line(r)
    (req,) = fake_controller.fleet.calls("WatchPlan")
    assert req.plan == "stack" and req.run_id == "" and req.after_version == 0
    # a finished run is shown at once
    done = cli(runner, fake_controller, "plan", "watch", "stack")
    assert done.exit_code == 1 and done.stdout.splitlines()[0].endswith("rolled back: vm stack-fail-api failed")


def test_plan_watch_never_reached_is_an_error(runner: CliRunner, tmp_path: Path, test_pki: Any) -> None:
    r = runner.invoke(app, ["--controller", "127.0.0.1:1", "plan", "watch", "stack"])
    assert r.exit_code == 9 and "cannot reach controller" in error_line(r)


# ------------------------------------------------------------------------------------------- live view


def test_live_view_renders_a_row_per_vm() -> None:
    run = PlanRun(
        id="run-1",
        plan="stack",
        revision=2,
        action="up",
        state=RunState.RUNNING,
        vms=(
            VmStatus("db", "stack-db", VmRunState.READY, host="h1"),
            VmStatus("api", "stack-api", VmRunState.FAILED, error="refused", failed_probe="http", host="h2"),
            VmStatus("web", "stack-web", VmRunState.PENDING),
        ),
    )
    view = plan_module.RunView()
    console = Console(file=io.StringIO(), width=160)
    console.print(view.render())
    assert "waiting for the run" in console.file.getvalue()  # type: ignore[attr-defined]
    view.set(run)
    console = Console(file=io.StringIO(), width=160)
    console.print(view.render())
    lines = console.file.getvalue().splitlines()  # type: ignore[attr-defined]
    assert lines[0] == "run run-1: up of plan stack revision 2: running"
    assert lines[1].split() == ["SERVICE", "VM", "STATE", "STEP", "/", "ERROR", "HOST"]
    assert lines[2].split() == ["db", "stack-db", "ready", "-", "h1"]
    assert " ".join(lines[3].split()) == "api stack-api failed health check 'http' failed: refused h2"
    assert lines[4].split() == ["web", "stack-web", "pending", "-", "-"]
    assert "1/3 VM(s) done · Ctrl-C stops watching" in lines[5]


def test_up_on_a_terminal_redraws_a_table(
    runner: CliRunner, fake_controller: FakeController, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    screen = io.StringIO()
    monkeypatch.setattr(
        "clonebox_cli.output.console", lambda: Console(file=screen, force_terminal=True, width=120, highlight=False)
    )
    r = up(runner, fake_controller, write(tmp_path, FAILING))
    assert r.exit_code == 1
    drawn = screen.getvalue()
    assert "\x1b[" in drawn  # drawn in place with terminal control codes, not printed line by line
    assert r.stdout.count("db stack-db:") == 0  # no per-change lines on a terminal
    # the last drawing is the final run: each VM's row, the failed one with its probe and error
    final = drawn[drawn.rindex("run run-1: up") :]
    assert "rolled back" in final and f"health check {FAIL_PROBE!r} failed" in final and "2/2 VM(s) done" in final
    assert "stack-fail-api" in error_line(r)


def test_watch_gives_up_when_the_controller_stays_away(
    runner: CliRunner, fake_controller: FakeController, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(plan_module, "_FIRST_BACKOFF", 0.01)
    monkeypatch.setattr(plan_module, "_MAX_BACKOFF", 0.02)
    monkeypatch.setattr(plan_module, "_GIVE_UP_AFTER", 0.3)
    fake_controller.fleet.plan_watch_cuts = [0] * 1000  # every watch breaks before it sends anything
    r = up(runner, fake_controller, write(tmp_path))
    assert r.exit_code == 9
    line = error_line(r)
    assert "lost the controller" in line and "'clonebox plan watch stack --run run-1'" in line
    assert r.stderr.count("reconnecting…") >= 2


def test_changes_summary_words() -> None:
    changes = [
        VmChange("a", "p-a", ChangeKind.IN_PLACE, ("labels",)),
        VmChange("b", "p-b", ChangeKind.REPLACE, ("disks",)),
        VmChange("c", "p-c", ChangeKind.REMOVE),
    ]
    text = plan_module.changes_summary(changes)
    assert text.startswith("1 to change in place, 1 to replace, 1 to remove\n")
    assert "--allow-replace" in text
    assert [plan_module.change_word(k) for k in ChangeKind] == [
        "none",
        "create",
        "in place",
        "restart",
        "replace",
        "remove",
    ]


def test_a_stream_lost_before_its_first_message_after_a_reconnect_is_an_outage(
    runner: CliRunner, fake_controller: FakeController, tmp_path: Path, fast_backoff: None
) -> None:
    # the second watch ends at once ("connection reset"): the controller was reached before, so this is an
    # outage to ride out, not a rejected certificate (the client keeps knowing that across reconnects)
    fake_controller.fleet.plan_watch_cuts = [3, 0]
    r = up(runner, fake_controller, write(tmp_path))
    assert r.exit_code == 0, r.output
    assert "certificate" not in r.stderr and r.stderr.count("reconnecting…") == 2
    assert [c.after_version for c in fake_controller.fleet.calls("WatchPlan")] == [1, 4, 4]
    assert fake_controller.fleet.calls("GetPlan") == []  # no extra call per reconnect
