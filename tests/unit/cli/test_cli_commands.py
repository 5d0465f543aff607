"""The clonebox CLI against an in-process fake controller: exit codes, JSON, messages, request ids."""

from __future__ import annotations

import json
import socket
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from clonebox.type.v1 import vm_pb2
from typer.testing import CliRunner, Result

from clonebox_cli import client as client_module
from clonebox_cli.client import ControllerClient
from clonebox_cli.main import app
from clonebox_core.spec import load_spec_text

if TYPE_CHECKING:
    from .conftest import FakeController, ThrowawayPki

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
TINY_A = str(EXAMPLES / "tiny-a.yaml")


def cli(runner: CliRunner, fc: FakeController | None, *args: str, input: str | None = None) -> Result:
    prefix = ["--controller", fc.address] if fc is not None else []
    return runner.invoke(app, [*prefix, *args], input=input)


def as_json(result: Result) -> Any:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def error_line(result: Result) -> str:
    """The error: exactly one line, the last on stderr (progress lines may come before it)."""
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], f"one error line expected: {result.stderr!r}"
    assert "Traceback" not in result.output
    return errors[0]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------------------------- hosts


def test_host_list_json_has_stable_keys(runner: CliRunner, fake_controller: FakeController) -> None:
    data = as_json(cli(runner, fake_controller, "-o", "json", "host", "list"))
    (host,) = data["hosts"]
    assert host["name"] == "local"
    assert host["state"] == "HOST_STATE_READY"
    assert host["cordoned"] is False  # defaults are printed, not omitted
    assert host["capacity"]["memory_mib"] == 16384  # 64-bit ints are numbers
    assert host["allocated"]["vcpus"] == 1


def test_host_list_table(runner: CliRunner, fake_controller: FakeController) -> None:
    result = cli(runner, fake_controller, "host", "list")
    assert result.exit_code == 0, result.output
    assert "NAME" in result.stdout and "local" in result.stdout and "ready" in result.stdout
    assert "128MiB/15.5GiB" in result.stdout


def test_host_show(runner: CliRunner, fake_controller: FakeController) -> None:
    result = cli(runner, fake_controller, "host", "show", "local")
    assert result.exit_code == 0, result.output
    assert "test:///default" in result.stdout
    assert as_json(cli(runner, fake_controller, "-o", "json", "host", "show", "local"))["name"] == "local"


def test_host_not_found_exits_3(runner: CliRunner, fake_controller: FakeController) -> None:
    result = cli(runner, fake_controller, "host", "show", "nope")
    assert result.exit_code == 3
    assert error_line(result) == "error: host nope not found"


def test_cordon_uncordon_drain(runner: CliRunner, fake_controller: FakeController) -> None:
    result = cli(runner, fake_controller, "host", "cordon", "local")
    assert result.exit_code == 0 and "cordoned" in result.stdout
    assert as_json(cli(runner, fake_controller, "-o", "json", "host", "uncordon", "local"))["cordoned"] is False
    result = cli(runner, fake_controller, "host", "drain", "local", "--request-id", "drain-1")
    assert result.exit_code == 0, result.output
    assert "VMs stopped: web" in result.stdout
    assert fake_controller.fleet.calls("DrainHost")[0].request_id == "drain-1"
    data = as_json(cli(runner, fake_controller, "-o", "json", "host", "drain", "local"))
    assert data["host"]["cordoned"] is True and data["stopped_vms"] == []
    uuid.UUID(fake_controller.fleet.calls("DrainHost")[1].request_id)  # generated when not given


# --------------------------------------------------------------------------------------------- vm create


def test_create_waits_shows_progress_and_prints_the_vm(runner: CliRunner, fake_controller: FakeController) -> None:
    result = cli(runner, fake_controller, "-o", "json", "vm", "create", "-f", TINY_A)
    vm = as_json(result)
    assert vm["name"] == "tiny-a" and vm["state"] == "VM_STATE_RUNNING"
    # progress goes to stderr, one line per step with the percent, so stdout stays valid JSON
    for step, pct in [("placing", 10), ("creating disks", 40), ("starting", 90)]:
        assert f"[{pct:3d}%] vm.create hosts/local/vms/tiny-a: {step}" in result.stderr
    (request,) = fake_controller.fleet.calls("CreateVm")
    assert uuid.UUID(request.request_id).version == 4
    assert request.spec.memory_mib == 128 and request.spec.kernel_boot.kernel == "testguest/vmlinux"
    assert request.spec.disks[0].base_image == "testguest/data.qcow2"
    assert dict(request.spec.labels) == {"app": "demo"}
    assert request.host == ""


def test_create_table_output(runner: CliRunner, fake_controller: FakeController) -> None:
    result = cli(runner, fake_controller, "vm", "create", "-f", TINY_A, "--host", "local")
    assert result.exit_code == 0, result.output
    assert "tiny-a" in result.stdout and "running" in result.stdout and "128MiB" in result.stdout
    assert fake_controller.fleet.calls("CreateVm")[0].host == "local"


def test_create_passes_the_given_request_id_and_a_retry_returns_the_same_operation(
    runner: CliRunner, fake_controller: FakeController
) -> None:
    first = as_json(
        cli(
            runner,
            fake_controller,
            "-o",
            "json",
            "vm",
            "create",
            "-f",
            TINY_A,
            "--no-wait",
            "--request-id",
            "req-42",
        )
    )
    second = as_json(
        cli(
            runner,
            fake_controller,
            "-o",
            "json",
            "vm",
            "create",
            "-f",
            TINY_A,
            "--no-wait",
            "--request-id",
            "req-42",
        )
    )
    assert first["id"] == second["id"]
    assert [r.request_id for r in fake_controller.fleet.calls("CreateVm")] == ["req-42", "req-42"]


def test_create_no_wait(runner: CliRunner, fake_controller: FakeController) -> None:
    op = as_json(cli(runner, fake_controller, "-o", "json", "vm", "create", "-f", TINY_A, "--no-wait"))
    assert op["kind"] == "vm.create" and op["done"] is False and op["target"] == "hosts/local/vms/tiny-a"
    result = cli(runner, fake_controller, "vm", "create", "-f", str(EXAMPLES / "tiny-b.yaml"), "--no-wait")
    assert result.exit_code == 0
    assert "clonebox operation wait op-2" in result.stdout
    assert not fake_controller.fleet.calls("WatchOperation")


def test_create_from_stdin(runner: CliRunner, fake_controller: FakeController) -> None:
    text = (EXAMPLES / "tiny-a.yaml").read_text().replace("tiny-a", "from-stdin")
    vm = as_json(cli(runner, fake_controller, "-o", "json", "vm", "create", "-f", "-", input=text))
    assert vm["name"] == "from-stdin"


def test_create_failed_operation_exits_with_its_class_code(
    runner: CliRunner, fake_controller: FakeController, tmp_path: Path
) -> None:
    spec = tmp_path / "fail.yaml"
    spec.write_text((EXAMPLES / "tiny-a.yaml").read_text().replace("tiny-a", "fail-a"))
    result = cli(runner, fake_controller, "vm", "create", "-f", str(spec))
    assert result.exit_code == 6  # ResourceExhausted
    # the server's message had a newline; the CLI still prints one line
    assert error_line(result) == (
        "error: vm.create hosts/local/vms/fail-a failed: no host has room for 1 vCPU, 128 MiB best: local"
    )


def test_create_on_a_not_serving_host_shows_the_message(runner: CliRunner, fake_controller: FakeController) -> None:
    result = cli(runner, fake_controller, "vm", "create", "-f", TINY_A, "--host", "sick")
    assert result.exit_code == 5
    assert error_line(result) == "error: host sick is NOT_SERVING: libvirt does not answer"


def test_create_wait_timeout_exits_10(runner: CliRunner, fake_controller: FakeController, tmp_path: Path) -> None:
    spec = tmp_path / "slow.yaml"
    spec.write_text((EXAMPLES / "tiny-a.yaml").read_text().replace("tiny-a", "slow-a"))
    result = cli(runner, fake_controller, "vm", "create", "-f", str(spec), "--timeout", "0.5")
    assert result.exit_code == 10
    line = error_line(result)
    assert "operation op-1 (vm.create hosts/local/vms/slow-a) is still running after 0.5 s" in line
    assert "clonebox operation wait op-1" in line


def test_bad_spec_exits_2_with_the_line_and_makes_no_call(
    runner: CliRunner, fake_controller: FakeController, tmp_path: Path
) -> None:
    spec = tmp_path / "tiny.yaml"
    spec.write_text((EXAMPLES / "tiny-a.yaml").read_text().replace("memory: 128MiB", "memory: 0MiB"))
    result = cli(runner, fake_controller, "vm", "create", "-f", str(spec))
    assert result.exit_code == 2
    assert error_line(result) == f"error: {spec}:6: memory: '0MiB' must be at least 16 MiB"
    assert fake_controller.fleet.requests == []


def test_missing_spec_file_exits_2(runner: CliRunner, tmp_path: Path) -> None:
    result = cli(runner, None, "vm", "create", "-f", str(tmp_path / "nope.yaml"))
    assert result.exit_code == 2
    assert "nope.yaml: no such file" in error_line(result)


def test_validate_works_offline(runner: CliRunner) -> None:
    result = cli(runner, None, "vm", "validate", "-f", TINY_A)
    assert result.exit_code == 0
    assert "ok: vm tiny-a (1 vCPU, 128MiB, 1 disk)" in result.stdout
    data = json.loads(cli(runner, None, "-o", "json", "vm", "validate", "-f", TINY_A).stdout)
    assert data["memory_mib"] == 128 and data["network"]["mode"] == "NETWORK_MODE_LIBVIRT"


# ----------------------------------------------------------------------------------- vm list and show


def test_vm_list_filters_and_pages(runner: CliRunner, fake_controller: FakeController) -> None:
    for name in ("a1", "a2", "a3"):
        fake_controller.fleet.add_vm(name, labels={"app": "demo"})
    fake_controller.fleet.add_vm("other", labels={"app": "x"})
    data = as_json(
        cli(
            runner,
            fake_controller,
            "-o",
            "json",
            "vm",
            "list",
            "--label",
            "app=demo",
            "--limit",
            "2",
            "--all",
            "--host",
            "local",
            "--state",
            "running",
        )
    )
    assert [vm["name"] for vm in data["vms"]] == ["a1", "a2", "a3", "web"]
    assert data["next_page_token"] == ""
    requests = fake_controller.fleet.calls("ListVms")
    assert len(requests) == 2 and requests[1].page_token == "2"
    assert requests[0].host == "local" and requests[0].state == vm_pb2.VM_STATE_RUNNING
    assert dict(requests[0].labels) == {"app": "demo"} and requests[0].page_size == 2


def test_vm_list_one_page_hints_at_more(runner: CliRunner, fake_controller: FakeController) -> None:
    fake_controller.fleet.add_vm("zz")
    result = cli(runner, fake_controller, "vm", "list", "--limit", "1")
    assert result.exit_code == 0
    assert "web" in result.stdout and "zz" not in result.stdout
    assert "--page-token 1" in result.stderr


def test_vm_list_says_held_for_a_vm_whose_room_a_run_holds(runner: CliRunner, fake_controller: FakeController) -> None:
    fake_controller.fleet.add_vm("shop-db", state=vm_pb2.VM_STATE_PENDING).state_reason = "held for plan shop (run r1)"
    fake_controller.fleet.add_vm("solo", state=vm_pb2.VM_STATE_PENDING)
    result = cli(runner, fake_controller, "vm", "list")
    assert result.exit_code == 0, result.output
    states = {line.split()[0]: line.split()[2] for line in result.stdout.splitlines()[1:]}
    assert (states["shop-db"], states["solo"], states["web"]) == ("held", "pending", "running")


def test_vm_list_bad_label_is_a_usage_error(runner: CliRunner, fake_controller: FakeController) -> None:
    result = cli(runner, fake_controller, "vm", "list", "--label", "novalue")
    assert result.exit_code == 2
    assert "KEY=VALUE" in result.output


def test_vm_show(runner: CliRunner, fake_controller: FakeController) -> None:
    result = cli(runner, fake_controller, "vm", "show", "web")
    assert result.exit_code == 0
    assert "10.0.0.5/24" in result.stdout and "app=demo" in result.stdout
    vm = as_json(cli(runner, fake_controller, "-o", "json", "vm", "show", "web"))
    assert vm["spec"]["memory_mib"] == 128 and vm["addresses"][0]["address"] == "10.0.0.5"


def test_vm_show_spec_is_a_loadable_spec_file(runner: CliRunner, fake_controller: FakeController) -> None:
    as_json(cli(runner, fake_controller, "-o", "json", "vm", "create", "-f", TINY_A))
    result = cli(runner, fake_controller, "vm", "show", "tiny-a", "--spec")
    assert result.exit_code == 0
    spec = load_spec_text(result.stdout, "exported.yaml")
    assert spec.name == "tiny-a" and spec.memory_mib == 128


def test_vm_not_found_exits_3(runner: CliRunner, fake_controller: FakeController) -> None:
    result = cli(runner, fake_controller, "vm", "show", "ghost")
    assert result.exit_code == 3
    assert error_line(result) == "error: vm ghost not found"
    assert cli(runner, fake_controller, "vm", "delete", "ghost").exit_code == 3


# ---------------------------------------------------------------------------------- start, stop, delete


def test_stop_passes_grace_force_and_request_id(runner: CliRunner, fake_controller: FakeController) -> None:
    result = cli(runner, fake_controller, "vm", "stop", "web", "--grace", "5", "--force", "--request-id", "r1")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "vm web is stopped on local"
    (request,) = fake_controller.fleet.calls("StopVm")
    assert (request.timeout_seconds, request.force, request.request_id) == (5, True, "r1")


def test_start_json_prints_the_vm(runner: CliRunner, fake_controller: FakeController) -> None:
    vm = as_json(cli(runner, fake_controller, "-o", "json", "vm", "start", "web"))
    assert vm["state"] == "VM_STATE_RUNNING"
    uuid.UUID(fake_controller.fleet.calls("StartVm")[0].request_id)


def test_start_no_wait(runner: CliRunner, fake_controller: FakeController) -> None:
    op = as_json(cli(runner, fake_controller, "-o", "json", "vm", "start", "web", "--no-wait"))
    assert op["kind"] == "vm.start"


def test_delete(runner: CliRunner, fake_controller: FakeController) -> None:
    result = cli(runner, fake_controller, "vm", "delete", "web")
    assert result.exit_code == 0
    assert result.stdout.strip() == "vm web deleted"
    assert "web" not in fake_controller.fleet.vms


# ---------------------------------------------------------------------------------------------- update


def _edited(tmp_path: Path, old: str, new: str) -> str:
    spec = tmp_path / "tiny-a.yaml"
    spec.write_text((EXAMPLES / "tiny-a.yaml").read_text().replace(old, new))
    return str(spec)


def test_update_restarts_with_more_memory(runner: CliRunner, fake_controller: FakeController, tmp_path: Path) -> None:
    assert cli(runner, fake_controller, "vm", "create", "-f", TINY_A).exit_code == 0
    edited = _edited(tmp_path, "memory: 128MiB", "memory: 256MiB")
    result = cli(runner, fake_controller, "vm", "update", "-f", edited, "--grace", "7", "--request-id", "u1")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == (
        "vm tiny-a updated with a restart (graceful shutdown, then start; disks kept) (memory_mib); "
        "it is running on local"
    )
    (request,) = fake_controller.fleet.calls("UpdateVm")
    assert (request.spec.memory_mib, request.timeout_seconds, request.request_id, request.dry_run) == (
        256,
        7,
        "u1",
        False,
    )


def test_update_dry_run_json_says_what_and_starts_nothing(
    runner: CliRunner, fake_controller: FakeController, tmp_path: Path
) -> None:
    assert cli(runner, fake_controller, "vm", "create", "-f", TINY_A).exit_code == 0
    edited = _edited(tmp_path, "app: demo", "app: other")
    doc = as_json(cli(runner, fake_controller, "-o", "json", "vm", "update", "-f", edited, "--dry-run"))
    assert doc == {"vm": "tiny-a", "change": "in_place", "fields": ["labels"]}
    assert [o.kind for o in fake_controller.fleet.operations.values()] == ["vm.create"]


def test_update_that_needs_a_new_vm_names_the_field(
    runner: CliRunner, fake_controller: FakeController, tmp_path: Path
) -> None:
    assert cli(runner, fake_controller, "vm", "create", "-f", TINY_A).exit_code == 0
    edited = _edited(tmp_path, "cmdline: console=ttyS0 quiet", "cmdline: console=ttyS0")
    result = cli(runner, fake_controller, "vm", "update", "-f", edited)
    assert result.exit_code == 5  # FailedPrecondition
    line = error_line(result)
    assert "kernel_boot cannot change without re-creating the VM" in line and "--allow-replace" in line


def test_empty_request_id_is_refused(runner: CliRunner, fake_controller: FakeController) -> None:
    result = cli(runner, fake_controller, "vm", "start", "web", "--request-id", " ")
    assert result.exit_code == 2
    assert fake_controller.fleet.calls("StartVm") == []


# ------------------------------------------------------------------------------------------ operations


def test_operation_show_wait_list(runner: CliRunner, fake_controller: FakeController, tmp_path: Path) -> None:
    op = as_json(cli(runner, fake_controller, "-o", "json", "vm", "create", "-f", TINY_A, "--no-wait"))
    shown = as_json(cli(runner, fake_controller, "-o", "json", "operation", "show", op["id"]))
    assert shown["id"] == op["id"] and shown["done"] is False
    waited = cli(runner, fake_controller, "-o", "json", "operation", "wait", f"operations/{op['id']}")
    data = as_json(waited)
    assert data["done"] is True and data["result"]["vm"]["name"] == "tiny-a"
    assert "[ 40%]" in waited.stderr
    listed = as_json(cli(runner, fake_controller, "-o", "json", "operation", "list", "--limit", "5"))
    assert [o["id"] for o in listed["operations"]] == [op["id"]]
    table = cli(runner, fake_controller, "operation", "list")
    assert "vm.create" in table.stdout and "done" in table.stdout


def test_operation_wait_on_a_failed_operation_prints_it_and_exits_with_its_code(
    runner: CliRunner, fake_controller: FakeController, tmp_path: Path
) -> None:
    spec = tmp_path / "fail.yaml"
    spec.write_text((EXAMPLES / "tiny-a.yaml").read_text().replace("tiny-a", "fail-b"))
    op = as_json(cli(runner, fake_controller, "-o", "json", "vm", "create", "-f", str(spec), "--no-wait"))
    result = cli(runner, fake_controller, "-o", "json", "operation", "wait", op["id"])
    assert result.exit_code == 6
    data = json.loads(result.stdout)
    assert data["error"]["message"].startswith("no host has room")
    assert "failed: no host has room" in result.stderr


def test_operation_not_found(runner: CliRunner, fake_controller: FakeController) -> None:
    result = cli(runner, fake_controller, "operation", "show", "op-999")
    assert result.exit_code == 3
    assert error_line(result) == "error: operation op-999 not found"


# --------------------------------------------------------------------------------- reaching the controller


def test_unreachable_controller_exits_9_and_names_the_address(runner: CliRunner, test_pki: ThrowawayPki) -> None:
    address = f"127.0.0.1:{closed_port()}"
    result = runner.invoke(app, ["--controller", address, "vm", "list"])
    assert result.exit_code == 9
    line = error_line(result)
    assert f"cannot reach controller at {address}" in line
    assert "clonebox dev up" in line


def test_controller_from_the_environment(runner: CliRunner, fake_controller: FakeController) -> None:
    result = runner.invoke(app, ["-o", "json", "host", "list"], env={"CLONEBOX_CONTROLLER": fake_controller.address})
    assert json.loads(result.stdout)["hosts"][0]["name"] == "local"


def test_default_controller_is_the_one_dev_up_recorded(
    runner: CliRunner, fake_controller: FakeController, tmp_path: Path
) -> None:
    state = tmp_path / "state" / "clonebox" / "dev"
    state.mkdir(parents=True)
    (state / "dev.json").write_text(json.dumps({"controller": {"address": fake_controller.address}}))
    result = runner.invoke(app, ["-o", "json", "host", "list"])
    assert json.loads(result.stdout)["hosts"][0]["name"] == "local"


def test_default_controller_without_state(
    runner: CliRunner, test_pki: ThrowawayPki, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_module, "_FIRST_BACKOFF", 0.0)
    result = runner.invoke(app, ["vm", "list"])
    # a developer may have a controller running on the default port (with another CA: 13)
    assert result.exit_code in (0, 9, 13)
    if result.exit_code != 0:
        assert "127.0.0.1:7100" in result.stderr


def test_non_loopback_plaintext_is_refused(runner: CliRunner) -> None:
    result = runner.invoke(app, ["--insecure", "--controller", "192.0.2.1:7100", "host", "list"])
    assert result.exit_code == 2
    assert "only allowed on loopback" in error_line(result)


def test_unreachable_calls_are_retried_with_the_same_request(
    runner: CliRunner, fake_controller: FakeController, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CreateVm that never reached the controller is sent again, with the same request_id."""
    sent: list[Any] = []
    original = ControllerClient.call

    def flaky(self: ControllerClient, method: Any, request: Any, **kw: Any) -> Any:
        def first_fails(req: Any, timeout: float | None = None) -> Any:
            sent.append(req.request_id)
            if len(sent) == 1:
                raise _Unreachable()
            return method(req, timeout=timeout)

        return original(self, first_fails, request, **kw)

    class _Unreachable(grpc.RpcError):  # type: ignore[misc]
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.UNAVAILABLE

        def details(self) -> str:
            return "connection refused"

        def trailing_metadata(self) -> tuple[()]:
            return ()

    monkeypatch.setattr(ControllerClient, "call", flaky)
    monkeypatch.setattr("clonebox_cli.client._FIRST_BACKOFF", 0.0)
    result = cli(runner, fake_controller, "-o", "json", "vm", "create", "-f", TINY_A, "--no-wait")
    assert result.exit_code == 0, result.output
    assert len(sent) == 2 and sent[0] == sent[1]
