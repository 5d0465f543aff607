"""``UpdateVm`` on the fake: the journaled restart under crashes and errors, the health monitor, the RPC.

Crashes are modelled as what a SIGKILL leaves: at a named step the hook copies the journal (every step
record is durable when written) and the fake's domains (what libvirt would still have); the call then
runs on, and the test puts the copied world back and starts a new service on it, whose recovery runs as
at an agent start. The same steps are killed for real, on libvirt and QEMU, in tests/fault/test_update_kill.py.
"""

from __future__ import annotations

import asyncio
import copy
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from clonebox.agent.v1 import agent_pb2, agent_pb2_grpc
from clonebox.type.v1 import plan_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from clonebox_agent.adapters.common import Fault
from clonebox_agent.adapters.fake import FakeHypervisor
from clonebox_agent.app.service import AgentService
from clonebox_agent.config import AgentConfig
from clonebox_agent.journal.store import Journal, TxnState
from clonebox_agent.main import Agent
from clonebox_core import errors
from clonebox_core.health import FileProbe, Probe, ProbeType
from clonebox_core.model import Auth, AuthMethod, CloudInit, DiskSpec, Resources, VmSpec, VmState
from clonebox_core.plan import ChangeKind
from clonebox_core.rpc import convert
from clonebox_core.rpc.server import Transport, aio_channel
from tests.unit.agent.conftest import EnvFactory

CHECK = Probe("ready", ProbeType.FILE, interval_ms=5000, timeout_ms=1000, file=FileProbe("/run/ready"))
SPEC = VmSpec(name="web", vcpus=1, memory_mib=128, disks=(DiskSpec("root", size_mib=16),), labels=(("app", "web"),))
BIGGER = replace(SPEC, vcpus=2, memory_mib=256)
#: the named steps of an update, in order (update:redefined is the adapter's; the others the service's)
RESTART_STEPS = ["update:stopped", "update:redefined", "update:started", "update:commit"]


class Crash:
    """A step hook that saves what a SIGKILL at ``at`` would leave: the journal file and the fake's domains."""

    def __init__(self, fake: FakeHypervisor, journal: Path, copy_to: Path) -> None:
        self.fake = fake
        self.journal = journal
        self.copy_to = copy_to
        self.at = ""
        self.seen: list[str] = []
        self.domains: dict[str, Any] | None = None

    def __call__(self, step: str) -> None:
        self.seen.append(step)
        if step != self.at or self.domains is not None:
            return
        with sqlite3.connect(self.journal) as src, sqlite3.connect(self.copy_to) as dst:
            src.backup(dst)
        self.domains = copy.deepcopy(self.fake._domains)

    def restore(self) -> None:
        """The host as the crash left it (the journal copy is what the restarted agent opens)."""
        assert self.domains is not None, f"the update never reached {self.at}"
        self.fake._domains = self.domains


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[tuple[FakeHypervisor, AgentService, Crash]]:
    fake = FakeHypervisor(host_name="h", storage_dir=tmp_path / "storage", shutdown_delay=0.01)
    crash = Crash(fake, tmp_path / "journal.db", tmp_path / "crashed.db")
    fake.faults.hook = crash
    svc = AgentService(
        "h", fake, Journal(tmp_path / "journal.db"), reserve=Resources(), stop_timeout_seconds=5, step_hook=crash
    )
    await svc.start()
    yield fake, svc, crash
    await svc.close()


async def restarted(fake: FakeHypervisor, crash: Crash, old: AgentService) -> AgentService:
    """The agent started again after the crash: the host as it was left, the journal copy; recovery runs."""
    await old.close()
    crash.restore()
    crash.at = "never"
    svc = AgentService("h", fake, Journal(crash.copy_to), reserve=Resources(), stop_timeout_seconds=5)
    await svc.start()
    return svc


def boot_of(fake: FakeHypervisor, vm: str) -> str:
    return fake._domains[vm].boot_id


# ---- the journaled transaction ------------------------------------------------------------------------


async def test_a_restart_is_one_committed_transaction_with_every_step(
    world: tuple[FakeHypervisor, AgentService, Crash],
) -> None:
    fake, svc, crash = world
    await svc.create(SPEC, request_id="c1")
    boot = boot_of(fake, "web")
    result = await svc.update(BIGGER, request_id="u1")
    assert (result.kind, result.fields, result.restarted, result.forced) == (
        ChangeKind.RESTART,
        ("memory_mib", "vcpus"),
        True,
        False,
    )
    assert [s for s in crash.seen if s.startswith("update:")] == RESTART_STEPS
    txn = next(t for t in svc.journal.txns() if t.kind == "vm.update")
    assert (txn.target, txn.request_id, txn.state) == ("web", "u1", TxnState.COMMITTED)
    assert [(s.name, s.undo["kind"]) for s in txn.steps] == [
        ("stop", "stopped"),
        ("redefine", "definition"),
        ("retire", "retire"),
    ]
    assert fake.domain_resources("web") == (2, 256) and boot_of(fake, "web") != boot
    # the graceful shutdown went to the guest (no destroy)
    assert fake.calls["shutdown"] == 1 and fake.calls["destroy"] == 0
    [event] = [e for e in svc.journal.pending_events() if e.action == "vm.update"]
    assert event.details == {
        "change": "restart",
        "fields": "memory_mib,vcpus",
        "restarted": "True",
        "forced": "False",
        "transaction": txn.id,
    }
    assert event.request_id == "u1" and event.resource == "hosts/h/vms/web"


async def test_a_guest_that_ignores_the_shutdown_is_forced_after_the_timeout(
    world: tuple[FakeHypervisor, AgentService, Crash],
) -> None:
    fake, svc, _crash = world
    await svc.create(SPEC, request_id="")
    fake.ignore_shutdown = True
    result = await svc.update(BIGGER, request_id="u1", timeout_seconds=1)
    assert (result.restarted, result.forced) == (True, True)
    assert fake.calls["destroy"] == 1 and result.vm.state == VmState.RUNNING
    # the same stop logic as StopVm: 0 means the agent's own stop timeout
    fake.ignore_shutdown = False
    assert (await svc.update(replace(BIGGER, vcpus=3), request_id="u2")).forced is False


#: where the agent dies during the restart of a running VM -> what recovery leaves: (vCPUs, the txn state)
#: before the commit point the old definition comes back and the VM runs again on it; once the VM runs
#: on the new one it stays (update:started: rolled back, but the definition it boots is kept); past the
#: commit point (update:commit) recovery finishes the transaction
CRASHES = [
    ("update:stopped", 1, TxnState.ROLLED_BACK),
    ("update:redefined", 1, TxnState.ROLLED_BACK),
    ("update:started", 2, TxnState.ROLLED_BACK),
    ("update:commit", 2, TxnState.COMMITTED),
]


@pytest.mark.parametrize(("step", "vcpus", "state"), CRASHES)
async def test_a_crash_during_the_restart_leaves_one_definition_and_the_vm_running(
    world: tuple[FakeHypervisor, AgentService, Crash], step: str, vcpus: int, state: TxnState
) -> None:
    fake, svc, crash = world
    await svc.create(SPEC, request_id="c1")
    crash.at = step
    await svc.update(BIGGER, request_id="u1")

    svc = await restarted(fake, crash, svc)
    try:
        txn = next(t for t in svc.journal.txns() if t.kind == "vm.update")
        assert txn.state == state and txn.id in [r.txn_id for r in svc.recovered]
        vm = await svc.get("web")
        # one definition, kept spec and domain alike, and running again as before
        assert vm.state == VmState.RUNNING
        expected = SPEC if vcpus == 1 else BIGGER
        assert (vm.spec.vcpus, vm.spec.memory_mib) == (expected.vcpus, expected.memory_mib)
        assert fake.domain_resources("web") == (expected.vcpus, expected.memory_mib)
        assert vm.spec == expected
        action = "recovery.rollforward" if state == TxnState.COMMITTED else "recovery.rollback"
        assert [e.action for e in svc.journal.pending_events() if e.action.startswith("recovery.")] == [action]
        # the request's answer was never recorded: the retry finishes the job, once
        again = await svc.update(BIGGER, request_id="u1")
        assert again.kind == (ChangeKind.RESTART if vcpus == 1 else ChangeKind.NONE)
        assert fake.domain_resources("web") == (2, 256) and (await svc.get("web")).state == VmState.RUNNING
        assert [t.state for t in svc.journal.txns() if t.state == TxnState.OPEN] == []
    finally:
        await svc.close()


async def test_a_crash_mid_update_of_a_stopped_vm_leaves_it_stopped(
    world: tuple[FakeHypervisor, AgentService, Crash],
) -> None:
    fake, svc, crash = world
    await svc.create(SPEC, request_id="c1", start=False)
    crash.at = "update:redefined"
    result = await svc.update(BIGGER, request_id="u1")
    assert (result.restarted, result.vm.state) == (False, VmState.STOPPED)
    assert [s for s in crash.seen if s.startswith("update:")] == ["update:redefined", "update:commit"]

    svc = await restarted(fake, crash, svc)
    try:
        vm = await svc.get("web")
        assert (vm.state, vm.spec) == (VmState.STOPPED, SPEC)
        assert fake.domain_resources("web") == (1, 128)
    finally:
        await svc.close()


async def test_a_crash_before_an_in_place_commit_puts_the_old_labels_back_without_touching_the_guest(
    world: tuple[FakeHypervisor, AgentService, Crash],
) -> None:
    fake, svc, crash = world
    await svc.create(SPEC, request_id="c1")
    boot = boot_of(fake, "web")
    crash.at = "update:commit"
    await svc.update(replace(SPEC, labels=(("app", "api"),), health_checks=(CHECK,)), request_id="u1")
    svc = await restarted(fake, crash, svc)
    try:
        vm = await svc.get("web")
        assert (vm.state, vm.spec) == (VmState.RUNNING, SPEC)
        assert boot_of(fake, "web") == boot, "recovery of an in-place update restarted the guest"
    finally:
        await svc.close()


# ---- errors (no crash): rolled back at once ------------------------------------------------------------


async def test_a_vm_that_does_not_start_on_the_new_values_runs_again_on_the_old_ones(
    world: tuple[FakeHypervisor, AgentService, Crash],
) -> None:
    fake, svc, _crash = world
    await svc.create(SPEC, request_id="c1")
    failed = errors.FailedPrecondition("VM web failed to start: injected", reason="DOMAIN_START_FAILED")
    fake.faults.fail_on["start"] = Fault(failed, times=1)
    with pytest.raises(errors.FailedPrecondition) as err:
        await svc.update(BIGGER, request_id="u1")
    assert err.value.reason == "DOMAIN_START_FAILED"
    vm = await svc.get("web")
    assert (vm.state, vm.spec) == (VmState.RUNNING, SPEC)
    assert fake.domain_resources("web") == (1, 128)
    txn = next(t for t in svc.journal.txns() if t.kind == "vm.update")
    assert txn.state == TxnState.ROLLED_BACK and "DOMAIN_START_FAILED" in txn.error
    # no answer was recorded for the request id: the retry does it
    assert (await svc.update(BIGGER, request_id="u1")).restarted
    assert fake.domain_resources("web") == (2, 256)


@pytest.mark.parametrize("fault", ["update", "update:redefined", "shutdown"])
async def test_an_error_at_a_step_leaves_the_old_definition_running(
    world: tuple[FakeHypervisor, AgentService, Crash], fault: str
) -> None:
    fake, svc, _crash = world
    await svc.create(SPEC, request_id="c1")
    fake.faults.fail_on[fault] = Fault(errors.Internal("injected", reason="INJECTED_FAULT"), times=1)
    with pytest.raises(errors.Internal):
        await svc.update(BIGGER, request_id="u1")
    vm = await svc.get("web")
    assert (vm.state, vm.spec) == (VmState.RUNNING, SPEC) and fake.domain_resources("web") == (1, 128)
    assert [t.state for t in svc.journal.txns() if t.kind == "vm.update"] == [TxnState.ROLLED_BACK]
    assert [e for e in svc.events._ring if e.reason == "updated"] == []


async def test_an_update_waits_for_a_stop_of_the_vm(
    world: tuple[FakeHypervisor, AgentService, Crash],
) -> None:
    """A stop (as a snapshot restore) holds the VM's lock: the update waits; both complete, in order."""
    fake, svc, _crash = world
    await svc.create(SPEC, request_id="c1")
    fake.faults.delays["shutdown"] = 0.3
    stop = asyncio.create_task(svc.stop("web", request_id="s1"))
    await asyncio.sleep(0.05)
    update = asyncio.create_task(svc.update(BIGGER, request_id="u1"))
    await stop
    assert not update.done()
    result = await update
    # the stop came first: the update found the VM stopped and only redefined it
    assert (result.kind, result.restarted, result.vm.state) == (ChangeKind.RESTART, False, VmState.STOPPED)


# ---- secrets: kept, never re-digested ------------------------------------------------------------------


async def test_the_kept_spec_keeps_its_secrets_and_takes_only_the_four_fields(
    world: tuple[FakeHypervisor, AgentService, Crash],
) -> None:
    fake, svc, _crash = world
    secret = "$6$salt$" + "x" * 86
    spec = replace(
        SPEC,
        cloud_init=CloudInit(user_data="#cloud-config\nhostname: hunter2\n"),
        auth=Auth(user="dev", method=AuthMethod.PASSWORD, password_hash=secret),  # type: ignore[arg-type]
    )
    await svc.create(spec, request_id="c1")
    # the request carries a new hash of the same password (a new salt): no change to auth
    request = replace(
        spec,
        labels=(("app", "api"),),
        auth=replace(spec.auth, password_hash="$6$other$" + "y" * 86),  # type: ignore[arg-type]
    )
    result = await svc.update(request, request_id="u1")
    assert (result.kind, result.fields) == (ChangeKind.IN_PLACE, ("labels",))
    kept = (await fake.get("web")).spec
    assert kept == replace(spec, labels=(("app", "api"),))
    assert kept.auth is not None and kept.auth.password_hash.reveal() == secret


# ---- the health monitor and the event stream ------------------------------------------------------------


async def test_the_health_monitor_runs_the_new_checks_after_an_update(env_factory: EnvFactory) -> None:
    env = await env_factory(follow=True)
    await env.svc.create(env.spec("web", CHECK), request_id="", start=True)
    await env.mon.synced()

    async def checks() -> list[str]:
        for _ in range(100):
            found = [c.name for c in env.mon.health("web").checks]
            if found != ["ready"]:
                return found
            await asyncio.sleep(0.02)
        return ["ready"]

    assert [c.name for c in env.mon.health("web").checks] == ["ready"]
    other = Probe("alive", ProbeType.FILE, interval_ms=5000, timeout_ms=1000, file=FileProbe("/run/alive"))
    vm = (await env.svc.get("web")).spec
    await env.svc.update(replace(vm, health_checks=(other,)), request_id="u1")
    assert await checks() == ["alive"]


async def test_watchers_see_the_updated_spec(world: tuple[FakeHypervisor, AgentService, Crash]) -> None:
    _fake, svc, _crash = world
    await svc.create(SPEC, request_id="c1")
    revision = svc.events.revision
    await svc.update(replace(SPEC, labels=(("app", "api"),)), request_id="u1")
    watch = svc.watch(revision)
    seen = []
    async with asyncio.timeout(5):
        async for event in watch:
            seen.append(event)
            if event.reason == "updated":
                break
    assert seen[-1].vm.spec.labels == (("app", "api"),) and seen[-1].vm.state == VmState.RUNNING


# ---- the RPC ----------------------------------------------------------------------------------------------


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[tuple[Agent, FakeHypervisor]]:
    fake = FakeHypervisor(host_name="h", storage_dir=tmp_path / "storage", shutdown_delay=0.01)
    cfg = AgentConfig(
        name="h",
        listen="127.0.0.1:0",
        controller="",
        insecure=True,
        hypervisor="fake",
        state_dir=str(tmp_path / "state"),
        storage_dir=str(tmp_path / "storage"),
        metrics_listen="",
        heartbeat_interval_seconds=0.05,
        reserve={"vcpus": 0, "memory_mib": 0, "disk_mib": 0},
    )
    a = Agent(cfg, hypervisor=fake)
    await a.start()
    yield a, fake
    await a.stop()


def _reason(err: grpc.aio.AioRpcError) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    status = rpc_status.from_call(err)
    assert status is not None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            detail.Unpack(info)
            return err.code(), info.reason, dict(info.metadata)
    return err.code(), "", {}


async def test_update_vm_rpc(agent: tuple[Agent, FakeHypervisor]) -> None:
    a, fake = agent
    await a.service.create(SPEC, request_id="")
    async with aio_channel(a.address, Transport(insecure=True)) as ch:
        stub = agent_pb2_grpc.AgentServiceStub(ch)

        def req(spec: VmSpec, **kw: Any) -> agent_pb2.UpdateVmRequest:
            return agent_pb2.UpdateVmRequest(spec=convert.spec_to_proto(spec), **kw)

        dry = await stub.UpdateVm(req(BIGGER, dry_run=True, request_id="d1"))
        assert (dry.kind, list(dry.fields), dry.restarted) == (
            plan_pb2.CHANGE_KIND_RESTART,
            ["memory_mib", "vcpus"],
            False,
        )
        assert dry.vm.spec.vcpus == 1 and fake.domain_resources("web") == (1, 128)

        done = await stub.UpdateVm(req(BIGGER, request_id="u1", timeout_seconds=2))
        assert (done.kind, done.restarted, done.forced) == (plan_pb2.CHANGE_KIND_RESTART, True, False)
        assert (done.vm.spec.vcpus, done.vm.spec.memory_mib, done.vm.name) == (2, 256, "web")
        assert fake.domain_resources("web") == (2, 256)
        again = await stub.UpdateVm(req(BIGGER, request_id="u1"))
        assert (again.kind, again.restarted) == (plan_pb2.CHANGE_KIND_RESTART, True)
        assert fake.calls["update"] == 1

        labels = await stub.UpdateVm(req(replace(BIGGER, labels=(("app", "x"),)), request_id="u2"))
        assert (labels.kind, list(labels.fields), labels.restarted) == (
            plan_pb2.CHANGE_KIND_IN_PLACE,
            ["labels"],
            False,
        )
        same = await stub.UpdateVm(req(replace(BIGGER, labels=(("app", "x"),)), request_id="u3"))
        assert same.kind == plan_pb2.CHANGE_KIND_NONE

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.UpdateVm(
                req(replace(BIGGER, labels=(("app", "x"),), disks=(DiskSpec("root", size_mib=64),)), request_id="u4")
            )
        code, reason, metadata = _reason(err.value)
        assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "VM_UPDATE_NEEDS_REPLACE")
        assert metadata == {"vm": "web", "fields": "disks"}
        assert "disks" in (err.value.details() or "")

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.UpdateVm(req(replace(BIGGER, memory_mib=4), request_id="u5"))
        code, reason, metadata = _reason(err.value)
        assert (code, metadata.get("field")) == (grpc.StatusCode.INVALID_ARGUMENT, "spec.memory_mib")

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.UpdateVm(req(replace(SPEC, name="nope"), request_id="u6"))
        code, reason, _ = _reason(err.value)
        assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "VM_NOT_FOUND")

    # every attempt is audited as vm.update: the successes with their outcome, the refusals by the guard
    events = [e for e in a.journal.pending_events() if e.action == "vm.update"]
    by_request = {e.request_id: (e.outcome.value, e.reason) for e in events}
    assert by_request["u1"][0] == "succeeded" and by_request["u2"][0] == "succeeded"
    assert by_request["u4"] == ("rejected", "VM_UPDATE_NEEDS_REPLACE")
    assert by_request["u5"][0] == "rejected" and by_request["u6"] == ("rejected", "VM_NOT_FOUND")
    assert "d1" not in by_request, "a dry run changes nothing and is no change to audit"
    assert len([e for e in events if e.request_id == "u1"]) == 1
