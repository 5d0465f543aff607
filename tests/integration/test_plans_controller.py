"""The controller's PlanService and plan engine through the real in-process fleet.

A real controller (SQLite store) and real agents on the fake hypervisor, over mTLS. Health gates use a
``file`` probe: the fake guest has the file once the test puts it in ``FakeHypervisor.guest_files``. A
failure is injected into one VM by giving it a base image the agent refuses (no image_dirs on a fake
host), so it fails at its create, on the agent, after the plan was accepted.

No test asserts on the clock: order is read from what the controller recorded (operations, run
snapshots of WatchPlan), and every wait is bounded so that a bug fails instead of hanging.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import stat
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
import grpc.aio
import pytest
from clonebox.controller.v1 import host_service_pb2, vm_service_pb2
from clonebox.controller.v1 import plan_service_pb2 as pb
from clonebox.controller.v1 import plan_service_pb2_grpc as pb_grpc
from clonebox.controller.v1 import snapshot_service_pb2 as spb
from clonebox.controller.v1 import snapshot_service_pb2_grpc as spb_grpc
from clonebox.type.v1 import plan_pb2, snapshot_pb2, vm_pb2
from google.protobuf import descriptor_pool

from clonebox_agent.adapters.common import Fault
from clonebox_agent.adapters.fake import FakeHypervisor
from clonebox_controller.app.plans import PlanEngine, PlanSettings
from clonebox_controller.app.vms import new_operation
from clonebox_controller.main import place_plan
from clonebox_core.audit.chain import AuditFilter
from clonebox_core.errors import FailedPrecondition, Internal
from clonebox_core.health import FileProbe, HealthState, Probe, ProbeType
from clonebox_core.model import DiskSpec, NetworkMode, NetworkSpec, Operation, Resources, VmSpec, VmState, Volume
from clonebox_core.plan import (
    LABEL_PLAN,
    ChangeKind,
    Condition,
    Dependency,
    FailurePolicy,
    Plan,
    PlanNetwork,
    PlanRun,
    PlanVm,
    PlanVolume,
    RunState,
    UpdatePolicy,
    VmRunState,
    dependents,
    vm_name,
)
from clonebox_core.planfile import load_plan_text
from clonebox_core.rpc.convert_plan import plan_from_proto, plan_to_proto, run_from_proto
from clonebox_core.rpc.server import aio_channel
from clonebox_core.snapshot_archive import read_archive
from tests.integration.conftest import TRUST_DOMAIN, Fleet, eventually
from tests.integration.test_fleet import create, error_info, spec
from tests.integration.test_security import PRINCIPALS, _call

pytestmark = pytest.mark.integration

ROOMY = Resources(vcpus=64, memory_mib=64 * 1024, disk_mib=1024 * 1024)
#: a bound on each wait (a bug fails the test instead of hanging it; never a speed assertion)
WAIT = 60.0
READY_FILE = "/run/ready"


# ---- building plans ----------------------------------------------------------------------------------


def ready_probe() -> Probe:
    """A file probe that passes once the guest has READY_FILE (the fake's guest_files)."""
    return Probe(
        "ready", ProbeType.FILE, interval_ms=500, timeout_ms=400, failure_threshold=1, file=FileProbe(READY_FILE)
    )


def service(
    plan: str,
    name: str,
    *deps: str | tuple[str, Condition],
    memory: int = 64,
    disk: int = 16,
    probe: bool = False,
    broken: bool = False,
    host: str = "",
) -> PlanVm:
    """One service; ``broken`` gives it a base image the fake agent refuses, so its create fails."""
    disks = (DiskSpec("root", base_image="missing/base.qcow2"),) if broken else (DiskSpec("root", size_mib=disk),)
    vm_spec = VmSpec(
        vm_name(plan, name),
        vcpus=1,
        memory_mib=memory,
        disks=disks,
        health_checks=(ready_probe(),) if probe else (),
    )
    depends = tuple(Dependency(d) if isinstance(d, str) else Dependency(*d) for d in deps)
    return PlanVm(name, vm_spec, depends, host)


def make_plan(
    name: str,
    vms: Sequence[PlanVm],
    *,
    max_parallel: int = 4,
    deadline_ms: int = 30_000,
    on_failure: FailurePolicy = FailurePolicy.ROLLBACK,
) -> Plan:
    return Plan(
        name,
        tuple(vms),
        update=UpdatePolicy(max_parallel=max_parallel, healthy_deadline_ms=deadline_ms),
        on_failure=on_failure,
    )


def stack(name: str = "stack", *, db_memory: int = 64, db_disk: int = 16) -> Plan:
    """db -> api (db healthy) -> web (api started)."""
    return make_plan(
        name,
        [
            service(name, "db", memory=db_memory, disk=db_disk, probe=True),
            service(name, "api", ("db", Condition.HEALTHY)),
            service(name, "web", "api"),
        ],
    )


def layered(name: str, *, depth: int = 5, width: int = 10, broken: str = "") -> Plan:
    """``depth`` levels of ``width`` services; each depends on two of the level before (started)."""
    vms = []
    for level in range(depth):
        for i in range(width):
            svc = f"l{level}-{i}"
            deps = () if level == 0 else (f"l{level - 1}-{i}", f"l{level - 1}-{(i + 1) % width}")
            vms.append(service(name, svc, *deps, memory=16, disk=1, broken=svc == broken))
    return make_plan(name, vms, max_parallel=8)


# ---- talking to the controller ---------------------------------------------------------------------


def stub(fleet: Fleet, channel: grpc.aio.Channel | None = None) -> pb_grpc.PlanServiceStub:
    return pb_grpc.PlanServiceStub(channel or fleet.channel)


async def apply(fleet: Fleet, plan: Plan, request_id: str = "", allow_replace: bool = False) -> PlanRun:
    resp = await stub(fleet).ApplyPlan(
        pb.ApplyPlanRequest(plan=plan_to_proto(plan), request_id=request_id, allow_replace=allow_replace)
    )
    return run_from_proto(resp.run)


async def watch(fleet: Fleet, run_id: str, after: int = 0) -> list[PlanRun]:
    """Every run snapshot WatchPlan sends until the run is done."""

    async def collect() -> list[PlanRun]:
        call = stub(fleet).WatchPlan(pb.WatchPlanRequest(run_id=run_id, after_version=after))
        return [run_from_proto(r.run) async for r in call]

    return await asyncio.wait_for(collect(), WAIT)


async def run_of(fleet: Fleet, plan: str) -> PlanRun:
    resp = await stub(fleet).GetPlan(pb.GetPlanRequest(name=plan))
    assert resp.HasField("last_run")
    return run_from_proto(resp.last_run)


def row(run: PlanRun, service_name: str) -> VmRunState:
    return next(v.state for v in run.vms if v.service == service_name)


async def vm_names(fleet: Fleet, plan: str = "") -> list[str]:
    labels = {LABEL_PLAN: plan} if plan else {}
    resp = await fleet.vms.ListVms(vm_service_pb2.ListVmsRequest(labels=labels, page_size=1000))
    return sorted(v.name for v in resp.vms)


def ops(fleet: Fleet, kind: str) -> list[str]:
    """Targets of the controller's operations of ``kind``, oldest first."""
    found = [o for o in fleet.controller.store.list_operations(limit=1000) if o.kind == kind]
    found.sort(key=lambda o: (o.create_time, o.id))
    return [o.target.removeprefix("vms/") for o in found]


async def on_hypervisor(fleet: Fleet, host: str) -> list[str]:
    """Names of the VMs the fake hypervisor of ``host`` has (what the fleet view should agree with)."""
    return sorted(r.spec.name for r in await fleet.fakes[host].list())


async def db_waiting(fleet: Fleet, plan: str) -> None:
    """Wait until the run of ``plan`` has made (or restarted) its ``db`` and waits for db's health gate."""

    async def waits() -> bool:
        return row(await run_of(fleet, plan), "db") is VmRunState.WAITING

    await eventually(waits, WAIT, f"db of plan {plan} waiting for its health check")


async def rpc_error(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call  # type: ignore[misc]
    return err.value


# ---- bring-up in order, behind a health gate --------------------------------------------------------


async def test_stack_comes_up_in_dependency_order_behind_a_health_gate(fleet: Fleet) -> None:
    await fleet.add_agent("h1", ROOMY)
    plan = stack()
    valid = await stub(fleet).ValidatePlan(pb.ValidatePlanRequest(plan=plan_to_proto(plan)))
    assert [list(level.services) for level in valid.levels] == [["db"], ["api"], ["web"]]
    assert [c.kind for c in valid.changes] == [plan_pb2.CHANGE_KIND_CREATE] * 3
    assert await vm_names(fleet) == []  # validation made nothing

    started = await apply(fleet, plan, request_id="up-1")
    assert started.state is RunState.RUNNING and started.revision == 1
    assert [v.service for v in started.vms] == ["db", "api", "web"]
    watcher = asyncio.create_task(watch(fleet, started.id))

    await db_waiting(fleet, "stack")
    # the gate holds: api is not created while db is not healthy
    run = await run_of(fleet, "stack")
    assert row(run, "api") is VmRunState.PENDING and "db to be healthy" in run.vms[1].step
    assert ops(fleet, "vm.create") == ["stack-db"]

    fleet.fakes["h1"].guest_files["stack-db"] = {READY_FILE}
    snapshots = await watcher
    final = snapshots[-1]
    assert final.state is RunState.SUCCEEDED, final
    assert [v.state for v in final.vms] == [VmRunState.READY] * 3
    assert all(v.created and v.host == "h1" for v in final.vms)
    assert ops(fleet, "vm.create") == ["stack-db", "stack-api", "stack-web"]
    # every snapshot: versions grow, and no service started before its dependency met its condition
    versions = [s.version for s in snapshots]
    assert versions == sorted(set(versions))
    for s in snapshots:
        if row(s, "api") is not VmRunState.PENDING:
            assert row(s, "db") is VmRunState.READY, s
        if row(s, "web") is not VmRunState.PENDING:
            assert row(s, "api") in (VmRunState.WAITING, VmRunState.READY), s
    assert [s.state for s in snapshots][-1] is RunState.SUCCEEDED
    assert all(s.state is RunState.RUNNING for s in snapshots[:-1])
    assert await vm_names(fleet, "stack") == ["stack-api", "stack-db", "stack-web"]

    got = await stub(fleet).GetPlan(pb.GetPlanRequest(name="stack"))
    assert got.plan.revision == 1 and got.plan.digest and got.last_run.id == started.id
    listed = await stub(fleet).ListPlans(pb.ListPlansRequest())
    assert [p.plan.name for p in listed.plans] == ["stack"]
    runs = await stub(fleet).ListPlanRuns(pb.ListPlanRunsRequest(name="stack"))
    assert [r.id for r in runs.runs] == [started.id]
    # a watch after the end sends the final state once (after_version 0) and nothing after it
    again = await watch(fleet, started.id)
    assert [r.version for r in again] == [final.version]
    assert await watch(fleet, started.id, after=final.version) == []


async def test_an_apply_holds_the_room_of_the_vms_it_has_not_reached(fleet: Fleet) -> None:
    # room for the plan's three 64 MiB VMs and 64 MiB more
    await fleet.add_agent("h1", Resources(vcpus=8, memory_mib=256, disk_mib=1024 * 1024))
    started = await apply(fleet, stack())
    watcher = asyncio.create_task(watch(fleet, started.id))

    await db_waiting(fleet, "stack")
    listed = await fleet.vms.ListVms(vm_service_pb2.ListVmsRequest(page_size=100))
    states = {v.name: (v.state, v.host) for v in listed.vms}
    # api and web are held on h1 before their turn: recorded pending, their room reserved
    assert states["stack-api"] == states["stack-web"] == (vm_pb2.VM_STATE_PENDING, "h1")
    # so a VM made meanwhile, which would fit beside db alone, cannot take their room
    err = await rpc_error(fleet.vms.CreateVm(vm_service_pb2.CreateVmRequest(spec=spec("outsider", memory=128))))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    fleet.fakes["h1"].guest_files["stack-db"] = {READY_FILE}
    final = (await watcher)[-1]
    assert final.state is RunState.SUCCEEDED, final.error
    assert all(v.created and v.host == "h1" for v in final.vms)
    assert ops(fleet, "vm.create") == ["stack-db", "stack-api", "stack-web"]


def with_volume(plan: Plan, service: str, size_mib: int) -> Plan:
    """``plan`` with ``service`` attaching the plan volume ``data`` of ``size_mib``."""
    return dataclasses.replace(
        plan,
        vms=tuple(dataclasses.replace(v, volumes=("data",)) if v.service == service else v for v in plan.vms),
        volumes=(PlanVolume("data", size_mib),),
    )


async def test_an_apply_holds_a_volume_users_room_and_the_volumes_disk(fleet: Fleet) -> None:
    # api attaches the plan volume "data" (1,000 MiB), which the run makes only when api's turn comes,
    # after db's health gate: until then both api's room and the volume's disk are held
    await fleet.add_agent("h1", Resources(vcpus=8, memory_mib=256, disk_mib=2000))
    started = await apply(fleet, with_volume(stack("vstack"), "api", 1000))
    watcher = asyncio.create_task(watch(fleet, started.id))
    await db_waiting(fleet, "vstack")
    assert "vstack-data" not in await volumes_on(fleet)  # not made yet
    listed = await fleet.vms.ListVms(vm_service_pb2.ListVmsRequest(page_size=100))
    states = {v.name: (v.state, v.host) for v in listed.vms}
    assert states["vstack-api"] == (vm_pb2.VM_STATE_PENDING, "h1")
    assert fleet.controller.store.get_host("h1").allocated.disk_mib == 3 * 16 + 1000
    # without api's hold a 128 MiB VM would fit beside db and web (64 + 64 + 128 of 256 MiB)
    err = await rpc_error(fleet.vms.CreateVm(vm_service_pb2.CreateVmRequest(spec=disk_spec("outsider", 16, 128))))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # without the volume's hold a 1,000 MiB disk would fit (48 + 1,000 of 2,000 MiB)
    err = await rpc_error(fleet.vms.CreateVm(vm_service_pb2.CreateVmRequest(spec=disk_spec("outsider", 1000))))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    fleet.fakes["h1"].guest_files["vstack-db"] = {READY_FILE}
    final = (await watcher)[-1]
    assert final.state is RunState.SUCCEEDED, final.error
    assert (await volumes_on(fleet))["vstack-data"][1].vms == ("vstack-api",)
    assert ops(fleet, "vm.create") == ["vstack-db", "vstack-api", "vstack-web"]
    assert fleet.controller.store.get_host("h1").allocated.disk_mib == 3 * 16 + 1000  # taken over, not counted twice


async def test_a_failed_run_frees_the_disk_held_for_a_volume_it_never_made(fleet: Fleet) -> None:
    await fleet.add_agent("h1", Resources(vcpus=8, memory_mib=1024, disk_mib=2000))
    plan = dataclasses.replace(with_volume(stack("fstack"), "api", 1000), update=UpdatePolicy(healthy_deadline_ms=1000))
    started = await apply(fleet, plan)
    final = (await watch(fleet, started.id))[-1]  # db never gets healthy: rolled back before api
    assert final.state is RunState.ROLLED_BACK, final
    assert "fstack-data" not in await volumes_on(fleet)
    assert fleet.controller.store.get_host("h1").allocated == Resources()


def replacing_web(name: str, *, db_memory: int = 64, web_disk: int = 16, deadline_ms: int = 30_000) -> Plan:
    """db (health-gated) -> api (db healthy) -> web, with db's memory and web's disk as given."""
    return make_plan(
        name,
        [
            service(name, "db", memory=db_memory, probe=True),
            service(name, "api", ("db", Condition.HEALTHY)),
            service(name, "web", "api", disk=web_disk),
        ],
        deadline_ms=deadline_ms,
    )


def disk_spec(name: str, disk_mib: int, memory_mib: int = 16) -> vm_pb2.VmSpec:
    """A 1-vCPU VM with one blank disk of ``disk_mib``."""
    return vm_pb2.VmSpec(
        name=name, vcpus=1, memory_mib=memory_mib, disks=[vm_pb2.DiskSpec(name="root", size_mib=disk_mib)]
    )


async def test_an_apply_holds_the_room_a_replaced_vm_grows_into(fleet: Fleet) -> None:
    await fleet.add_agent("h1", Resources(vcpus=8, memory_mib=1024, disk_mib=1100))
    fleet.fakes["h1"].guest_files["rstack-db"] = {READY_FILE}
    await _up(fleet, replacing_web("rstack"))  # 3 x 16 MiB of disk
    # db restarts with more memory and must be healthy again before web is replaced by one with 600 MiB
    fleet.fakes["h1"].guest_files["rstack-db"] = set()
    started = await apply(fleet, replacing_web("rstack", db_memory=128, web_disk=600), allow_replace=True)
    watcher = asyncio.create_task(watch(fleet, started.id))

    await db_waiting(fleet, "rstack")
    # web's room already covers its successor's disk, although web itself is not replaced yet
    assert fleet.controller.store.get_host("h1").allocated.disk_mib == 16 + 16 + 600
    assert [r.spec.disks[0].size_mib for r in await fleet.fakes["h1"].list() if r.spec.name == "rstack-web"] == [16]
    # without that hold a VM with a 500 MiB disk would fit (1,100 - 48)
    err = await rpc_error(fleet.vms.CreateVm(vm_service_pb2.CreateVmRequest(spec=disk_spec("outsider", 500))))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    fleet.fakes["h1"].guest_files["rstack-db"] = {READY_FILE}
    final = (await watcher)[-1]
    assert final.state is RunState.SUCCEEDED, final.error
    assert row(final, "web") is VmRunState.READY and final.vms[2].change is ChangeKind.REPLACE
    assert [r.spec.disks[0].size_mib for r in await fleet.fakes["h1"].list() if r.spec.name == "rstack-web"] == [600]
    assert fleet.controller.store.get_host("h1").allocated.disk_mib == 16 + 16 + 600  # the successor's, once


async def test_a_run_that_fails_before_its_replace_gives_the_grown_room_back(fleet: Fleet) -> None:
    await fleet.add_agent("h1", Resources(vcpus=8, memory_mib=1024, disk_mib=1100))
    fleet.fakes["h1"].guest_files["fstack-db"] = {READY_FILE}
    await _up(fleet, replacing_web("fstack"))
    fleet.fakes["h1"].guest_files["fstack-db"] = set()  # db never gets healthy again: web is never reached
    plan = replacing_web("fstack", db_memory=128, web_disk=600, deadline_ms=1500)
    final = (await watch(fleet, (await apply(fleet, plan, allow_replace=True)).id))[-1]
    assert final.state is RunState.ROLLED_BACK, final
    assert row(final, "web") is VmRunState.SKIPPED
    assert fleet.controller.store.get_host("h1").allocated.disk_mib == 3 * 16
    assert await vm_names(fleet) == ["fstack-api", "fstack-db", "fstack-web"]  # the old web is kept


async def test_a_delete_resumed_after_its_replace_hold_was_recorded_leaves_the_hold(fleet: Fleet) -> None:
    # the controller died after a replace's delete released the old VM (its room now held for the
    # successor) and before the delete's end: the resumed delete deletes again (a no-op at the agent),
    # and its release holds the room again instead of freeing it
    await fleet.add_agent("h1", ROOMY)
    fleet.fakes["h1"].guest_files["kstack-db"] = {READY_FILE}
    await _up(fleet, replacing_web("kstack"))
    store = fleet.controller.store
    successor = dataclasses.replace(store.get_vm("kstack-web").spec, disks=(DiskSpec("root", size_mib=600),))
    run = PlanRun("run-k", "kstack", 1, "up", RunState.RUNNING)
    store.create_run(run, owner="another-controller", lease_seconds=3600, hold_replaced=[(successor, None)])
    op, _created = store.begin_operation(new_operation("vm.delete", "vms/kstack-web", "r-del", {"host": "h1"}))
    await fleet.fakes["h1"].delete("kstack-web")
    store.release_vm("kstack-web")  # the delete's release: the room is held for the successor now
    await fleet.controller.vms.resume()

    async def done() -> bool:
        return store.get_operation(op.id).done

    await eventually(done, WAIT, "the resumed delete to end")
    assert store.get_operation(op.id).error_code == ""
    held = store.get_vm("kstack-web")
    assert (held.state, held.state_reason) == (VmState.PENDING, "held for plan kstack (run run-k)")
    assert fleet.controller.store.get_host("h1").allocated.disk_mib == 16 + 16 + 600


async def test_vms_held_on_a_host_cordoned_during_the_run_are_made_elsewhere(fleet: Fleet) -> None:
    await fleet.add_agent("h1", ROOMY)
    started = await apply(fleet, stack("moved"))  # h1 is the only host: all three are held there
    watcher = asyncio.create_task(watch(fleet, started.id))

    await db_waiting(fleet, "moved")
    await fleet.add_agent("h2", ROOMY)
    await fleet.hosts.CordonHost(host_service_pb2.CordonHostRequest(name="h1"))
    fleet.fakes["h1"].guest_files["moved-db"] = {READY_FILE}
    final = (await watcher)[-1]
    assert final.state is RunState.SUCCEEDED, final.error
    assert {v.service: v.host for v in final.vms} == {"db": "h1", "api": "h2", "web": "h2"}
    assert sorted(r.spec.name for r in await fleet.fakes["h2"].list()) == ["moved-api", "moved-web"]
    # the holds on h1 were given up, not left behind: h1 has only db's reservation
    assert [v.name for v in fleet.controller.store.vms_on_host("h1")] == ["moved-db"]


async def test_a_run_is_woken_by_the_changes_it_waits_for_not_by_its_poll(fleet: Fleet) -> None:
    # with the poll an hour away, only the store's announcements (operation done, VM running, health
    # healthy) can move the run: each gate opens when its change is committed
    engine = fleet.controller.plans
    engine.settings = dataclasses.replace(engine.settings, poll_seconds=3600)
    await fleet.add_agent("h1", ROOMY)
    started = await apply(fleet, stack("woken"))
    watcher = asyncio.create_task(watch(fleet, started.id))

    await db_waiting(fleet, "woken")
    fleet.fakes["h1"].guest_files["woken-db"] = {READY_FILE}
    final = (await asyncio.wait_for(watcher, WAIT))[-1]
    assert final.state is RunState.SUCCEEDED, final.error
    assert [v.state for v in final.vms] == [VmRunState.READY] * 3
    assert fleet.controller.changes.watched() == 0  # every watch was let go


async def test_unhealthy_dependency_fails_naming_the_probe_and_rolls_back(fleet: Fleet) -> None:
    await fleet.add_agent("h1", ROOMY)
    plan = dataclasses.replace(stack(), update=UpdatePolicy(healthy_deadline_ms=2000))
    started = await apply(fleet, plan)
    final = (await watch(fleet, started.id))[-1]
    assert final.state is RunState.ROLLED_BACK, final
    db = final.vms[0]
    assert db.state is VmRunState.DELETED and db.failed_probe == "ready"
    assert "stack-db" in final.error and "ready" in final.error
    assert [row(final, s) for s in ("api", "web")] == [VmRunState.SKIPPED, VmRunState.SKIPPED]
    assert await vm_names(fleet) == []


async def test_leave_policy_keeps_what_was_made(fleet: Fleet) -> None:
    await fleet.add_agent("h1", ROOMY)
    plan = make_plan(
        "keep",
        [service("keep", "a"), service("keep", "b", "a", broken=True), service("keep", "c", "b")],
        on_failure=FailurePolicy.LEAVE,
    )
    final = (await watch(fleet, (await apply(fleet, plan)).id))[-1]
    assert final.state is RunState.FAILED
    assert [v.state for v in final.vms] == [VmRunState.READY, VmRunState.FAILED, VmRunState.SKIPPED]
    assert "keep-b" in final.error
    assert await vm_names(fleet) == ["keep-a"]


# ---- 50 VMs, a failure at each level ----------------------------------------------------------------


@pytest.mark.parametrize("level", range(5))
async def test_fifty_vm_plan_rolls_back_a_failure_at_any_level(fleet: Fleet, level: int) -> None:
    await fleet.add_agent("h1", ROOMY)
    broken = f"l{level}-3"
    plan = layered("big", broken=broken)
    started = await apply(fleet, plan)
    assert len(started.vms) == 50
    snapshots = await watch(fleet, started.id)
    final = snapshots[-1]
    assert final.state is RunState.ROLLED_BACK, final.error
    assert "big-" + broken in final.error
    failed = [v for v in final.vms if v.error]
    assert [v.service for v in failed] == [broken]
    # nothing of the plan is left, and exactly what was created was deleted
    assert await vm_names(fleet) == []
    assert await on_hypervisor(fleet, "h1") == []
    # a delete may be tried again (a host that missed heartbeats), never a VM the run did not create
    assert sorted(set(ops(fleet, "vm.delete"))) == sorted(v.vm for v in final.vms if v.created and v.service != broken)
    assert all(v.state in (VmRunState.DELETED, VmRunState.SKIPPED) for v in final.vms)
    # the broken VM's dependents never started (nor did anything else still waiting when it failed)
    assert all(row(final, s) is VmRunState.SKIPPED for s in dependents(plan, broken))
    assert not any(v.created for v in final.vms if v.state is VmRunState.SKIPPED)
    # (a watch may not show ROLLING_BACK: a rollback shorter than plans.watch_min_interval_seconds is
    # coalesced into the version that ends it)
    assert all(s.state in (RunState.RUNNING, RunState.ROLLING_BACK) for s in snapshots[:-1])
    creates = ops(fleet, "vm.create")
    assert len(creates) == len(set(creates))


# ---- refused before anything is made ----------------------------------------------------------------


def cyclic() -> Plan:
    return make_plan("cyc", [service("cyc", "a", "c"), service("cyc", "b", "a"), service("cyc", "c", "b")])


def unknown_dependency() -> Plan:
    return make_plan("unk", [service("unk", "a"), service("unk", "b", "nope")])


def too_big() -> Plan:
    # 3 x 3 GiB on a host with 8 GiB: each fits alone, the whole plan does not
    return make_plan("big", [service("big", f"s{i}", memory=3 * 1024) for i in range(3)])


@pytest.mark.parametrize(
    ("build", "code", "reason", "named"),
    [
        (cyclic, grpc.StatusCode.INVALID_ARGUMENT, "PLAN_CYCLE", "a -> c -> b -> a"),
        (unknown_dependency, grpc.StatusCode.INVALID_ARGUMENT, "PLAN_UNKNOWN_DEPENDENCY", "'nope'"),
        (too_big, grpc.StatusCode.RESOURCE_EXHAUSTED, "PLAN_CAPACITY_EXCEEDED", "big-s2"),
    ],
)
async def test_invalid_plans_are_rejected_with_nothing_created(
    fleet: Fleet, build: object, code: grpc.StatusCode, reason: str, named: str
) -> None:
    await fleet.add_agent("h1", Resources(vcpus=8, memory_mib=8 * 1024, disk_mib=100_000))
    plan: Plan = build()  # type: ignore[operator]
    for call in (
        stub(fleet).ValidatePlan(pb.ValidatePlanRequest(plan=plan_to_proto(plan))),
        stub(fleet).ApplyPlan(pb.ApplyPlanRequest(plan=plan_to_proto(plan), request_id="r")),
    ):
        err = await rpc_error(call)
        assert err.code() == code and error_info(err).reason == reason, err.details()
        assert named in (err.details() or "")
    assert await vm_names(fleet) == [] and ops(fleet, "vm.create") == []
    # not even a revision was stored
    err = await rpc_error(stub(fleet).GetPlan(pb.GetPlanRequest(name=plan.name)))
    assert err.code() == grpc.StatusCode.NOT_FOUND


async def test_a_vm_name_taken_outside_the_plan_is_refused(fleet: Fleet) -> None:
    await fleet.add_agent("h1", ROOMY)
    await create(fleet, spec("stack-api"))
    err = await rpc_error(stub(fleet).ApplyPlan(pb.ApplyPlanRequest(plan=plan_to_proto(stack()))))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS and "stack-api" in (err.details() or "")
    assert ops(fleet, "vm.create") == ["stack-api"]


async def test_unknown_host_hint_is_refused(fleet: Fleet) -> None:
    await fleet.add_agent("h1", ROOMY)
    plan = make_plan("hint", [service("hint", "a", host="nowhere")])
    err = await rpc_error(stub(fleet).ValidatePlan(pb.ValidatePlanRequest(plan=plan_to_proto(plan))))
    assert err.code() == grpc.StatusCode.NOT_FOUND and error_info(err).reason == "HOST_NOT_FOUND"
    assert "nowhere" in (err.details() or "")


# ---- re-apply, replace, idempotency, concurrency -----------------------------------------------------


async def _up(fleet: Fleet, plan: Plan, **kw: object) -> PlanRun:
    run = await apply(fleet, plan, **kw)  # type: ignore[arg-type]
    final = (await watch(fleet, run.id))[-1]
    assert final.state is RunState.SUCCEEDED, final.error
    return final


def ungated(name: str = "stack", *, db_memory: int = 64, db_disk: int = 16) -> Plan:
    """db -> api -> web, started gates only."""
    return make_plan(
        name,
        [
            service(name, "db", memory=db_memory, disk=db_disk),
            service(name, "api", "db"),
            service(name, "web", "api"),
        ],
    )


async def test_a_plans_creates_are_followed_through_their_tasks_not_store_reads(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    await fleet.add_agent("h1", ROOMY)
    store = fleet.controller.store
    reads: Counter[str] = Counter()
    real = store.get_operation

    def counted(op_id: str) -> Operation:
        reads[op_id] += 1
        return real(op_id)

    monkeypatch.setattr(store, "get_operation", counted)
    final = await _up(fleet, ungated())
    assert [v.state for v in final.vms] == [VmRunState.READY] * 3 and all(v.created for v in final.vms)
    # each create's end comes from the task that ran it in this controller: no store read of the operation
    # on the way from one level to the next (a plan's critical path, docs/benchmarks.md)
    assert sum(reads.values()) == 0, reads


async def test_reapplying_the_same_plan_changes_nothing(fleet: Fleet) -> None:
    await fleet.add_agent("h1", ROOMY)
    first = await _up(fleet, ungated())
    diff = await stub(fleet).DiffPlan(pb.DiffPlanRequest(plan=plan_to_proto(ungated())))
    assert diff.current_revision == 1
    assert [c.kind for c in diff.changes] == [plan_pb2.CHANGE_KIND_NONE] * 3
    second = await _up(fleet, ungated())
    assert second.id != first.id and second.revision == 1
    assert [v.change for v in second.vms] == [ChangeKind.NONE] * 3
    assert not any(v.created for v in second.vms)
    assert ops(fleet, "vm.create") == ["stack-db", "stack-api", "stack-web"]


async def test_replace_needs_allow_replace(fleet: Fleet) -> None:
    await fleet.add_agent("h1", ROOMY)
    await _up(fleet, ungated())
    bigger_disk = ungated(db_disk=32)
    diff = await stub(fleet).DiffPlan(pb.DiffPlanRequest(plan=plan_to_proto(bigger_disk)))
    assert next((c.service, c.kind, list(c.fields)) for c in diff.changes) == (
        "db",
        plan_pb2.CHANGE_KIND_REPLACE,
        ["disks"],
    )
    err = await rpc_error(stub(fleet).ApplyPlan(pb.ApplyPlanRequest(plan=plan_to_proto(bigger_disk))))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(err).reason == "PLAN_REPLACE_NOT_ALLOWED"
    assert "stack-db" in (err.details() or "") and "disks" in (err.details() or "")
    assert ops(fleet, "vm.delete") == []
    assert (await stub(fleet).GetPlan(pb.GetPlanRequest(name="stack"))).plan.revision == 1

    final = await _up(fleet, bigger_disk, allow_replace=True)
    assert final.revision == 2
    assert [(v.service, v.change, v.created) for v in final.vms] == [
        ("db", ChangeKind.REPLACE, True),
        ("api", ChangeKind.NONE, False),
        ("web", ChangeKind.NONE, False),
    ]
    assert ops(fleet, "vm.delete") == ["stack-db"]
    vm = (await fleet.vms.GetVm(vm_service_pb2.GetVmRequest(name="stack-db"))).vm
    assert vm.spec.disks[0].size_mib == 32

    # the old VM was exported first, to a file only the controller reads, that imports as a VM again
    backup = fleet.tmp / "plan-backups" / "stack" / "stack-db" / f"{final.id}.cbsnap"
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    assert stat.S_IMODE(backup.parent.stat().st_mode) == 0o700
    assert not list(backup.parent.glob("*.partial"))
    with backup.open("rb") as f:
        parts = list(read_archive(f))
    assert parts[0].header.spec.name == "stack-db" and parts[0].header.spec.disks[0].size_mib == 16
    events = fleet.controller.store.list_audit(AuditFilter(action="plan.backup"))
    assert [e.event.details["file"] for e in events] == [str(backup)]
    # the backup's snapshot went with the old VM: the new one has none
    assert not list((await snapshot_stub(fleet).ListSnapshots(spb.ListSnapshotsRequest(vm="stack-db"))).snapshots)
    restored = (await snapshot_stub(fleet).ImportSnapshot(_import(parts, "stack-db-before"))).vm
    assert restored.name == "stack-db-before" and restored.spec.disks[0].size_mib == 16


async def _import(parts: list[snapshot_pb2.SnapshotImagePart], name: str) -> AsyncIterator[spb.ImportSnapshotRequest]:
    for part in parts:
        p = snapshot_pb2.SnapshotImagePart()
        p.CopyFrom(part)
        if p.WhichOneof("part") == "header":
            p.header.spec.name = name
            p.header.request_id = f"restore-{name}"
        yield spb.ImportSnapshotRequest(part=p)


def snapshot_stub(fleet: Fleet) -> spb_grpc.SnapshotServiceStub:
    return spb_grpc.SnapshotServiceStub(fleet.channel)


@pytest.mark.parametrize("where", ["file", "agent"])
async def test_a_replace_whose_backup_fails_keeps_the_old_vm(fleet: Fleet, where: str) -> None:
    faults = {"export_disks": Internal("injected: export failed")} if where == "agent" else {}
    await fleet.add_agent("h1", ROOMY, fake=FakeHypervisor(host_name="h1", capacity=ROOMY, fail_on=faults))
    await _up(fleet, ungated())
    if where == "file":  # a file where the backup folder would be: the export cannot be written
        (fleet.tmp / "plan-backups").write_text("not a folder")
    run = await apply(fleet, ungated(db_disk=32), allow_replace=True)
    final = (await watch(fleet, run.id))[-1]
    assert final.state is RunState.ROLLED_BACK, final
    assert "backup before replacing stack-db failed" in final.vms[0].error and "old VM is kept" in final.vms[0].error
    assert ops(fleet, "vm.delete") == []
    vm = (await fleet.vms.GetVm(vm_service_pb2.GetVmRequest(name="stack-db"))).vm
    assert vm.spec.disks[0].size_mib == 16
    assert not list((await snapshot_stub(fleet).ListSnapshots(spb.ListSnapshotsRequest(vm="stack-db"))).snapshots)


async def test_a_memory_change_restarts_the_vm_and_keeps_it(fleet: Fleet) -> None:
    await fleet.add_agent("h1", ROOMY)
    await _up(fleet, ungated())
    before = {r.spec.name: r.uuid for r in await fleet.fakes["h1"].list()}
    more_memory = ungated(db_memory=128)
    diff = await stub(fleet).DiffPlan(pb.DiffPlanRequest(plan=plan_to_proto(more_memory)))
    assert [(c.vm, c.kind, list(c.fields)) for c in diff.changes[:1]] == [
        (
            "stack-db",
            plan_pb2.CHANGE_KIND_RESTART,
            ["memory_mib"],
        )
    ]
    # no --allow-replace needed: the disks stay
    final = await _up(fleet, more_memory)
    assert [(v.service, v.change, v.created, v.state) for v in final.vms] == [
        ("db", ChangeKind.RESTART, False, VmRunState.READY),
        ("api", ChangeKind.NONE, False, VmRunState.READY),
        ("web", ChangeKind.NONE, False, VmRunState.READY),
    ]
    assert ops(fleet, "vm.update") == ["stack-db"]
    assert ops(fleet, "vm.delete") == [] and ops(fleet, "vm.create") == ["stack-db", "stack-api", "stack-web"]
    after = {r.spec.name: r for r in await fleet.fakes["h1"].list()}
    assert after["stack-db"].uuid == before["stack-db"] and after["stack-db"].spec.memory_mib == 128
    vm = (await fleet.vms.GetVm(vm_service_pb2.GetVmRequest(name="stack-db"))).vm
    assert vm.spec.memory_mib == 128
    # applied again: nothing left to change
    again = await _up(fleet, more_memory)
    assert [v.change for v in again.vms] == [ChangeKind.NONE] * 3


async def test_after_a_restart_only_fresh_health_opens_the_gate(fleet: Fleet) -> None:
    await fleet.add_agent("h1", ROOMY)
    fleet.fakes["h1"].guest_files["stack-db"] = {READY_FILE}
    await _up(fleet, stack())
    final = await _up(fleet, stack(db_memory=128))
    assert (final.vms[0].service, final.vms[0].change) == ("db", ChangeKind.RESTART)
    update = next(o for o in fleet.controller.store.list_operations(limit=100) if o.kind == "vm.update")
    transitions, _aggregates, _actions = await fleet.controller.health.history(
        "stack-db", update.create_time, check="", limit=100
    )
    assert update.create_time is not None
    fresh = [
        t for t in transitions if t.check == "" and t.to_state is HealthState.HEALTHY and t.time >= update.create_time
    ]
    assert fresh, transitions  # the restart took db through UNKNOWN and back to HEALTHY
    db = final.vms[0]
    assert db.update_time is not None and db.update_time >= fresh[0].time


async def test_a_restart_growth_must_fit_on_the_vms_host(fleet: Fleet) -> None:
    await fleet.add_agent("h1", Resources(vcpus=8, memory_mib=512, disk_mib=1024 * 1024))
    await fleet.add_agent("h2", ROOMY)
    await _up(fleet, make_plan("solo", [service("solo", "db", memory=256, host="h1")]))
    grown = make_plan("solo", [service("solo", "db", memory=1024, host="h1")])
    err = await rpc_error(stub(fleet).ApplyPlan(pb.ApplyPlanRequest(plan=plan_to_proto(grown))))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_info(err).reason == "PLAN_CAPACITY_EXCEEDED" and "solo-db" in (err.details() or "")
    assert ops(fleet, "vm.update") == []
    vm = (await fleet.vms.GetVm(vm_service_pb2.GetVmRequest(name="solo-db"))).vm
    assert vm.spec.memory_mib == 256 and vm.host == "h1"


def reverting(plan: Plan, auto_revert: bool = True) -> Plan:
    return dataclasses.replace(plan, update=dataclasses.replace(plan.update, auto_revert=auto_revert))


def with_broken_api(plan: Plan) -> Plan:
    """``plan`` whose api VM must be replaced by one whose create fails on the agent."""
    broken = service(plan.name, "api", "db", broken=True)
    return dataclasses.replace(plan, vms=tuple(broken if v.service == "api" else v for v in plan.vms))


async def engine_done_with(fleet: Fleet, run_id: str) -> None:
    """Wait until the engine's task for the run has ended (after its end, a revert would have been started)."""

    async def gone() -> bool:
        return run_id not in fleet.controller.plans.running()

    await eventually(gone, timeout=WAIT, what=f"the engine to be done with run {run_id}")


async def revert_run(fleet: Fleet, plan: str) -> PlanRun:
    """The revert run (revision 3) that follows a failed second apply of ``plan``, once every run is done."""

    async def reverted() -> bool:
        runs = (await stub(fleet).ListPlanRuns(pb.ListPlanRunsRequest(name=plan))).runs
        return len(runs) == 3 and all(run_from_proto(r).done for r in runs)

    await eventually(reverted, timeout=WAIT, what="the revert run to finish")
    runs = [run_from_proto(r) for r in (await stub(fleet).ListPlanRuns(pb.ListPlanRunsRequest(name=plan))).runs]
    return next(r for r in runs if r.revision == 3)


async def test_auto_revert_reapplies_the_revision_before_a_failed_one(fleet: Fleet) -> None:
    await fleet.add_agent("h1", ROOMY)
    good = reverting(ungated())
    await _up(fleet, good)
    failed_start = await apply(fleet, with_broken_api(good), allow_replace=True)
    failed = (await watch(fleet, failed_start.id))[-1]
    assert failed.state is RunState.ROLLED_BACK and failed.revision == 2, failed.error
    # the replace deleted the old api; the revert run (revision 3: revision 1's content) brings it back
    revert = await revert_run(fleet, "stack")
    assert revert.state is RunState.SUCCEEDED, revert.error
    assert revert.request_id == f"auto-revert/{failed.id}"
    assert {v.service: v.change for v in revert.vms} == {
        "db": ChangeKind.NONE,
        "api": ChangeKind.CREATE,
        "web": ChangeKind.NONE,
    }
    assert await vm_names(fleet) == ["stack-api", "stack-db", "stack-web"]
    api = (await fleet.vms.GetVm(vm_service_pb2.GetVmRequest(name="stack-api"))).vm
    assert not api.spec.disks[0].base_image  # revision 1's api, not the broken one
    # the revert re-made api from the backup the failed run took before replacing it (disks and all),
    # not from scratch: one import, and no create after the failed run's
    backup = fleet.tmp / "plan-backups" / "stack" / "stack-api" / f"{failed.id}.cbsnap"
    assert backup.is_file()
    assert ops(fleet, "snapshot.import") == ["stack-api"]
    assert ops(fleet, "vm.create").count("stack-api") == 2  # revision 1's and the failed run's
    assert api.state == vm_pb2.VM_STATE_RUNNING
    assert next(v for v in revert.vms if v.service == "api").step == "ready"
    current = plan_from_proto((await stub(fleet).GetPlan(pb.GetPlanRequest(name="stack"))).plan)
    assert current.revision == 3 and current.digest == fleet.controller.store.get_plan("stack", 1).digest


async def test_a_revert_whose_backup_is_damaged_fails_and_keeps_the_file(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    await fleet.add_agent("h1", ROOMY)
    good = reverting(ungated())
    await _up(fleet, good)
    real = PlanEngine._revert_if_asked

    async def later(self: PlanEngine, run_id: str, plan: Plan) -> None:
        return None  # the revert is started below, once the backup is damaged

    monkeypatch.setattr(PlanEngine, "_revert_if_asked", later)
    failed = (await watch(fleet, (await apply(fleet, with_broken_api(good), allow_replace=True)).id))[-1]
    assert failed.state is RunState.ROLLED_BACK
    await engine_done_with(fleet, failed.id)
    backup = fleet.tmp / "plan-backups" / "stack" / "stack-api" / f"{failed.id}.cbsnap"
    backup.write_bytes(b"not an archive")
    monkeypatch.setattr(PlanEngine, "_revert_if_asked", real)
    assert await fleet.controller.plans.revert_missed() == ["stack"]
    runs = [run_from_proto(r) for r in (await stub(fleet).ListPlanRuns(pb.ListPlanRunsRequest(name="stack"))).runs]
    revert = next(r for r in runs if r.revision == 3)
    final = (await watch(fleet, revert.id))[-1]
    assert final.state is RunState.ROLLED_BACK
    api = next(v for v in final.vms if v.service == "api")
    assert "restoring stack-api from its backup" in api.error and "the file is kept" in api.error, api.error
    assert backup.read_bytes() == b"not an archive"
    assert ops(fleet, "snapshot.import") == []


async def test_only_the_newest_backups_are_kept(fleet: Fleet) -> None:
    await fleet.add_agent("h1", ROOMY)
    fleet.controller.plans.settings = dataclasses.replace(fleet.controller.plans.settings, backup_keep=2)
    runs = [await _up(fleet, ungated(db_disk=16))]
    for size in (32, 48, 64):
        runs.append(await _up(fleet, ungated(db_disk=size), allow_replace=True))
    folder = fleet.tmp / "plan-backups" / "stack" / "stack-db"
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{r.id}.cbsnap" for r in runs[-2:])


async def test_a_revert_the_controller_died_before_is_started_by_the_next_start(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    await fleet.add_agent("h1", ROOMY)
    good = reverting(ungated())
    await _up(fleet, good)
    engine = fleet.controller.plans
    real = PlanEngine._revert_if_asked

    async def died_first(self: PlanEngine, run_id: str, plan: Plan) -> None:
        return None  # the process ended between the failed run's end and its revert

    monkeypatch.setattr(PlanEngine, "_revert_if_asked", died_first)
    failed = (await watch(fleet, (await apply(fleet, with_broken_api(good), allow_replace=True)).id))[-1]
    assert failed.state is RunState.ROLLED_BACK
    await engine_done_with(fleet, failed.id)
    assert len((await stub(fleet).ListPlanRuns(pb.ListPlanRunsRequest(name="stack"))).runs) == 2

    monkeypatch.setattr(PlanEngine, "_revert_if_asked", real)
    assert await engine.revert_missed() == ["stack"]  # what the next controller's start does
    assert await engine.revert_missed() == []  # the revert is the last run now: not made twice
    runs = [run_from_proto(r) for r in (await stub(fleet).ListPlanRuns(pb.ListPlanRunsRequest(name="stack"))).runs]
    revert = next(r for r in runs if r.request_id == f"auto-revert/{failed.id}")
    assert (await watch(fleet, revert.id))[-1].state is RunState.SUCCEEDED
    assert await vm_names(fleet) == ["stack-api", "stack-db", "stack-web"]


async def test_without_auto_revert_a_failed_apply_stays_failed(fleet: Fleet) -> None:
    await fleet.add_agent("h1", ROOMY)
    good = reverting(ungated(), auto_revert=False)
    await _up(fleet, good)
    failed_start = await apply(fleet, with_broken_api(good), allow_replace=True)
    failed = (await watch(fleet, failed_start.id))[-1]
    assert failed.state is RunState.ROLLED_BACK
    await engine_done_with(fleet, failed.id)
    runs = (await stub(fleet).ListPlanRuns(pb.ListPlanRunsRequest(name="stack"))).runs
    assert len(runs) == 2 and "stack-api" not in await vm_names(fleet)


async def test_a_failed_first_revision_has_nothing_to_revert_to(fleet: Fleet) -> None:
    await fleet.add_agent("h1", ROOMY)
    first = await apply(fleet, reverting(with_broken_api(ungated())))
    assert (await watch(fleet, first.id))[-1].state is RunState.ROLLED_BACK
    await engine_done_with(fleet, first.id)
    assert len((await stub(fleet).ListPlanRuns(pb.ListPlanRunsRequest(name="stack"))).runs) == 1


async def test_apply_is_idempotent_by_request_id(fleet: Fleet) -> None:
    await fleet.add_agent("h1", ROOMY)
    first = await apply(fleet, ungated(), request_id="same")
    again = await apply(fleet, ungated(), request_id="same")
    assert again.id == first.id
    final = (await watch(fleet, first.id))[-1]
    assert final.state is RunState.SUCCEEDED
    after = await apply(fleet, ungated(), request_id="same")
    assert after.id == first.id and after.done
    runs = await stub(fleet).ListPlanRuns(pb.ListPlanRunsRequest(name="stack"))
    assert [r.id for r in runs.runs] == [first.id]
    assert ops(fleet, "vm.create") == ["stack-db", "stack-api", "stack-web"]


async def test_a_second_apply_while_one_runs_is_aborted(fleet: Fleet) -> None:
    await fleet.add_agent("h1", ROOMY)
    first = await apply(fleet, stack())  # waits at db's health gate until the file appears

    async def waiting() -> bool:
        return row(await run_of(fleet, "stack"), "db") is VmRunState.WAITING

    await eventually(waiting, WAIT, "db waiting for its health")
    err = await rpc_error(stub(fleet).ApplyPlan(pb.ApplyPlanRequest(plan=plan_to_proto(stack()), request_id="2nd")))
    assert err.code() == grpc.StatusCode.ABORTED and error_info(err).reason == "PLAN_RUN_IN_PROGRESS"
    assert first.id in (err.details() or "")
    err = await rpc_error(stub(fleet).DestroyPlan(pb.DestroyPlanRequest(name="stack", request_id="d")))
    assert err.code() == grpc.StatusCode.ABORTED
    fleet.fakes["h1"].guest_files["stack-db"] = {READY_FILE}
    assert (await watch(fleet, first.id))[-1].state is RunState.SUCCEEDED


# ---- destroy ----------------------------------------------------------------------------------------


async def test_destroy_deletes_in_reverse_dependency_order(fleet: Fleet) -> None:
    await fleet.add_agent("h1", ROOMY)
    await _up(fleet, ungated())
    resp = await stub(fleet).DestroyPlan(pb.DestroyPlanRequest(name="stack", request_id="down-1"))
    down = run_from_proto(resp.run)
    assert down.action == "down" and [v.service for v in down.vms] == ["web", "api", "db"]
    again = run_from_proto(
        (await stub(fleet).DestroyPlan(pb.DestroyPlanRequest(name="stack", request_id="down-1"))).run
    )
    assert again.id == down.id
    snapshots = await watch(fleet, down.id)
    assert snapshots[-1].state is RunState.SUCCEEDED, snapshots[-1].error
    assert ops(fleet, "vm.delete") == ["stack-web", "stack-api", "stack-db"]
    for s in snapshots:
        if row(s, "db") is not VmRunState.PENDING:
            assert row(s, "api") is VmRunState.DELETED, s
        if row(s, "api") is not VmRunState.PENDING:
            assert row(s, "web") is VmRunState.DELETED, s
    assert await vm_names(fleet) == []
    assert list((await stub(fleet).ListPlans(pb.ListPlansRequest())).plans) == []
    # nothing left: a second destroy succeeds at once
    empty = run_from_proto((await stub(fleet).DestroyPlan(pb.DestroyPlanRequest(name="stack", request_id="x"))).run)
    assert empty.state is RunState.SUCCEEDED and empty.vms == ()
    err = await rpc_error(stub(fleet).DestroyPlan(pb.DestroyPlanRequest(name="nosuch")))
    assert err.code() == grpc.StatusCode.NOT_FOUND and error_info(err).reason == "PLAN_NOT_FOUND"


async def test_down_waits_for_an_unreachable_host_to_come_back(fleet: Fleet) -> None:
    """A host that is unreachable when its VMs are deleted is retried, not given up (the CI flake)."""
    await fleet.add_agent("h1", ROOMY)
    await _up(fleet, ungated())
    fake = fleet.fakes["h1"]
    await fleet.stop_agent("h1")  # the agent goes away; the fake hypervisor (like libvirt) keeps the VMs

    async def unreachable() -> bool:
        return fleet.controller.store.get_host("h1").state.name == "UNREACHABLE"

    await eventually(unreachable, timeout=WAIT, what="h1 unreachable")
    resp = await stub(fleet).DestroyPlan(pb.DestroyPlanRequest(name="stack", request_id="down-while-away"))
    down = run_from_proto(resp.run)

    async def retrying() -> bool:
        run = fleet.controller.store.get_run(down.id)
        return any(v.step.startswith("host unreachable, deleting again") for v in run.vms)

    await eventually(retrying, timeout=WAIT, what="a delete waiting for h1")
    assert not fleet.controller.store.get_run(down.id).done
    await fleet.add_agent("h1", ROOMY, fake=fake)
    final = (await watch(fleet, down.id))[-1]
    assert final.state is RunState.SUCCEEDED, final.error
    assert await vm_names(fleet) == [] and await on_hypervisor(fleet, "h1") == []
    # each retry was an operation of its own; the first try of web failed on the unreachable host
    failed = [
        o
        for o in fleet.controller.store.list_operations(limit=1000)
        if o.kind == "vm.delete" and o.error_reason == "HOST_UNREACHABLE"
    ]
    assert failed and all(o.request_id.startswith(f"plan-run/{down.id}/") for o in failed)


async def test_down_gives_up_on_an_unreachable_host_after_the_retry_time(fleet: Fleet) -> None:
    await fleet.add_agent("h1", ROOMY)
    await _up(fleet, ungated())
    await fleet.stop_agent("h1")

    async def unreachable() -> bool:
        return fleet.controller.store.get_host("h1").state.name == "UNREACHABLE"

    await eventually(unreachable, timeout=WAIT, what="h1 unreachable")
    fleet.controller.plans.settings = dataclasses.replace(fleet.controller.plans.settings, unreachable_retry_seconds=0)
    resp = await stub(fleet).DestroyPlan(pb.DestroyPlanRequest(name="stack", request_id="down-gives-up"))
    final = (await watch(fleet, run_from_proto(resp.run).id))[-1]
    assert final.state is RunState.FAILED
    assert "stack-web" in final.error and "unreachable" in final.error
    # web could not go, so what web depends on is kept (never deleted under a running dependent)
    assert row(final, "web") is VmRunState.FAILED
    assert row(final, "api") is VmRunState.SKIPPED and row(final, "db") is VmRunState.SKIPPED
    assert await vm_names(fleet) == ["stack-api", "stack-db", "stack-web"]


# ---- plan networks -------------------------------------------------------------------------------------


def networked(name: str = "net", *, hint: dict[str, str] | None = None) -> Plan:
    """db -> api on the plan's default network (as the plan file makes every service by default)."""
    hint = hint or {}
    vms = [
        dataclasses.replace(service(name, "db", host=hint.get("db", "")), network="default"),
        dataclasses.replace(service(name, "api", "db", host=hint.get("api", "")), network="default"),
    ]
    return dataclasses.replace(make_plan(name, vms), networks=(PlanNetwork("default"),))


async def stored_specs(fleet: Fleet, plan: str) -> dict[str, NetworkSpec]:
    resp = await stub(fleet).GetPlan(pb.GetPlanRequest(name=plan))
    stored = plan_from_proto(resp.plan)
    return {v.service: v.spec.network for v in stored.vms}


async def test_a_plan_network_puts_its_vms_on_one_host_with_fixed_addresses(fleet: Fleet) -> None:
    await fleet.add_agent("h1", ROOMY)
    await fleet.add_agent("h2", ROOMY)
    first = await _up(fleet, networked())
    assert len({v.host for v in first.vms}) == 1  # two roomy hosts, yet one host for the network
    nets = await stored_specs(fleet, "net")
    subnet = ipaddress.IPv4Network(nets["db"].subnet)
    assert {n.libvirt_network for n in nets.values()} == {"cb-net"}
    assert {n.mode for n in nets.values()} == {NetworkMode.MANAGED}
    assert {ipaddress.IPv4Address(n.address) for n in nets.values()} <= set(subnet.hosts())
    assert nets["db"].address != nets["api"].address and nets["db"].dns_names == ("db", "net-db")
    host = first.vms[0].host
    on_host = {r.spec.name: r.spec.network for r in await fleet.fakes[host].list()}
    assert on_host == {"net-db": nets["db"], "net-api": nets["api"]}  # what the agent was asked to make
    # the same plan again: same subnet, same addresses, no new revision, nothing to do
    again = await _up(fleet, networked())
    assert again.revision == first.revision and [v.change for v in again.vms] == [ChangeKind.NONE] * 2
    assert await stored_specs(fleet, "net") == nets
    # another plan gets a subnet of its own
    await _up(fleet, networked("other"))
    theirs = ipaddress.IPv4Network((await stored_specs(fleet, "other"))["db"].subnet)
    assert not theirs.overlaps(subnet)


async def test_a_plan_network_follows_a_hint_and_refuses_two_hosts(fleet: Fleet) -> None:
    await fleet.add_agent("h1", ROOMY)
    await fleet.add_agent("h2", ROOMY)
    err = await rpc_error(apply(fleet, networked(hint={"db": "h1", "api": "h2"})))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and error_info(err).reason == "PLAN_INVALID"
    assert "live on one host" in (err.details() or "")
    assert await vm_names(fleet) == [] and list((await stub(fleet).ListPlans(pb.ListPlansRequest())).plans) == []
    done = await _up(fleet, networked(hint={"api": "h2"}))
    assert {v.host for v in done.vms} == {"h2"}


async def test_an_unknown_plan_network_is_refused_before_anything_is_made(fleet: Fleet) -> None:
    await fleet.add_agent("h1", ROOMY)
    bad = dataclasses.replace(networked(), networks=(PlanNetwork("front"),))
    err = await rpc_error(apply(fleet, bad))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and error_info(err).reason == "PLAN_UNKNOWN_NETWORK"
    assert error_info(err).metadata["field"] == "vms.db.networks"
    assert await vm_names(fleet) == []


# ---- resume after the engine stops mid-run ----------------------------------------------------------


async def test_a_run_stopped_mid_way_is_resumed_without_duplicates(fleet: Fleet) -> None:
    await fleet.add_agent("h1", ROOMY)
    fleet.fakes["h1"].faults.delays["create"] = 0.3  # slow creates, so the stop lands mid-run
    plan = make_plan(
        "res",
        [service("res", f"a{i}") for i in range(4)] + [service("res", f"b{i}", f"a{i}") for i in range(4)],
        max_parallel=2,
    )
    started = await apply(fleet, plan)
    old = fleet.controller.plans

    async def some_made() -> bool:
        run = await run_of(fleet, "res")
        return sum(v.state is VmRunState.READY for v in run.vms) >= 2

    await eventually(some_made, WAIT, "two VMs ready")
    await old.close()
    stopped = fleet.controller.store.get_run(started.id)
    assert stopped.state is RunState.RUNNING and not all(v.state is VmRunState.READY for v in stopped.vms)

    ctl = fleet.controller
    new = PlanEngine(ctl.store, ctl.vms, ctl.health, place_plan, PlanSettings(lease_seconds=5, poll_seconds=0.05))
    await new.start()
    try:
        assert started.id in new.running()

        async def done() -> bool:
            return ctl.store.get_run(started.id).done

        await eventually(done, WAIT, "the resumed run to finish")
        final = ctl.store.get_run(started.id)
        assert final.state is RunState.SUCCEEDED, final.error
        creates = Counter(ops(fleet, "vm.create"))
        assert sorted(creates) == sorted(v.vm for v in final.vms) and set(creates.values()) == {1}
        assert fleet.fakes["h1"].calls["create"] == 8
    finally:
        await new.close()


# ---- creates accepted while they wait for a slot -----------------------------------------------------


async def test_a_create_waiting_for_a_slot_is_accepted_before_the_slot_frees(fleet: Fleet) -> None:
    await fleet.add_agent("h1", ROOMY)
    fake = fleet.fakes["h1"]
    fake.faults.delays["create"] = 2.0  # the first create holds the only slot a while
    plan = make_plan("ahead", [service("ahead", s) for s in ("a", "b", "c")], max_parallel=1)
    started = await apply(fleet, plan)

    async def a_on_the_agent() -> bool:
        return fake.calls["create"] == 1

    async def b_accepted() -> bool:
        return "ahead-b" in ops(fleet, "vm.create")

    await eventually(a_on_the_agent, WAIT, "a's create on the agent")
    await eventually(b_accepted, WAIT, "b's create accepted")
    # accepted while a's create is still on the agent (a is not made yet): b's operation is recorded and
    # its VM creating, and the agent has not been asked for it. c, next but one, waits unaccepted.
    assert await on_hypervisor(fleet, "h1") == []
    assert fake.calls["create"] == 1
    assert sorted(ops(fleet, "vm.create")) == ["ahead-a", "ahead-b"]  # b's acceptance may commit first
    assert fleet.controller.store.get_vm("ahead-b").state is VmState.CREATING
    final = (await watch(fleet, started.id))[-1]
    assert final.state is RunState.SUCCEEDED, final.error
    assert sorted(ops(fleet, "vm.create")) == ["ahead-a", "ahead-b", "ahead-c"]
    assert fake.calls["create"] == 3
    assert await on_hypervisor(fleet, "h1") == ["ahead-a", "ahead-b", "ahead-c"]


async def test_a_failure_ends_a_create_accepted_ahead_of_its_slot_without_making_it(fleet: Fleet) -> None:
    await fleet.add_agent("h1", ROOMY)
    fake = fleet.fakes["h1"]
    # a is refused after the first second on the agent; the others take 1.5 s more
    fake.faults.delays["create"] = 1.0
    fake.faults.delays["create:disks"] = 1.5
    names = ("a", "s", "b", "c")
    services = [service("abort", n, broken=n == "a") for n in names]
    started = await apply(fleet, make_plan("abort", services, max_parallel=2))
    final = (await watch(fleet, started.id))[-1]
    assert final.state is RunState.ROLLED_BACK, final
    # a and s take the two slots, b and c are accepted meanwhile. a fails first, and b takes its slot
    # before the failure is recorded (made, then rolled back, as without accepting ahead). When s is
    # made, the run is failing: c's accepted create ends without asking the agent.
    rows = {v.service: v for v in final.vms}
    assert (rows["s"].state, rows["b"].state) == (VmRunState.DELETED, VmRunState.DELETED)
    c = rows["c"]
    assert c.state is VmRunState.SKIPPED and not c.created and c.step == "not waited for: abort-a failed"
    (op,) = [o for o in fleet.controller.store.list_operations(limit=100) if o.target == "vms/abort-c"]
    assert op.done and op.error_reason == "PLAN_STOPPED" and op.error_message == "not started: abort-a failed"
    assert fake.calls["create"] == 3
    assert await vm_names(fleet, "abort") == []
    assert fleet.controller.store.get_host("h1").allocated == Resources()


# ---- authorization ----------------------------------------------------------------------------------


async def test_plan_service_policy_for_every_principal(fleet: Fleet) -> None:
    from clonebox_core.security.policy import POLICY

    await fleet.add_agent("h1", ROOMY)
    svc = descriptor_pool.Default().FindServiceByName("clonebox.controller.v1.PlanService")
    mismatches = []
    for kind, role in PRINCIPALS:
        principal = role or kind
        transport = fleet.pki.transport(kind, f"walk-{principal}", role)
        channel = aio_channel(fleet.controller.address, transport, f"controller.{TRUST_DOMAIN}")
        try:
            for m in svc.methods:
                method = f"/{svc.full_name}/{m.name}"
                code = await _call(channel, method, m)
                allowed = principal in POLICY[method]
                denied = code == grpc.StatusCode.PERMISSION_DENIED
                if allowed == denied or code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL):
                    mismatches.append((principal, method, code.name))
        finally:
            await channel.close()
    assert mismatches == []


async def test_moving_a_live_network_to_another_subnet_is_refused_until_down(fleet: Fleet) -> None:
    await fleet.add_agent("h1", ROOMY)
    pinned = dataclasses.replace(networked(), networks=(PlanNetwork("default", "10.213.40.0/24"),))
    moved = dataclasses.replace(networked(), networks=(PlanNetwork("default", "10.213.41.0/24"),))
    await _up(fleet, pinned)
    err = await rpc_error(apply(fleet, moved))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(err).reason == "PLAN_NETWORK_SUBNET_CHANGE"
    assert "clonebox down net" in (err.details() or "")
    got = await stub(fleet).GetPlan(pb.GetPlanRequest(name="net"))
    assert got.plan.revision == 1  # no revision was stored, no run started
    assert ops(fleet, "vm.delete") == []
    down = run_from_proto((await stub(fleet).DestroyPlan(pb.DestroyPlanRequest(name="net"))).run)
    assert (await watch(fleet, down.id))[-1].state is RunState.SUCCEEDED
    final = await _up(fleet, moved)
    assert {(await stored_specs(fleet, "net"))["db"].subnet} == {"10.213.41.0/24"}
    assert final.state is RunState.SUCCEEDED


# ---- plan volumes -----------------------------------------------------------------------------------


def with_volumes(name: str = "vols", *, data_mib: int = 64, db_disk: int = 16, broken_web: bool = False) -> Plan:
    """db (single-writer volume ``data``) -> api, web (both on the shared volume ``cache``); no plan network."""
    vms = [
        dataclasses.replace(service(name, "db", disk=db_disk), volumes=("data",)),
        dataclasses.replace(service(name, "api", "db"), volumes=("cache",)),
        dataclasses.replace(service(name, "web", "db", broken=broken_web), volumes=("cache",)),
    ]
    volumes = (PlanVolume("data", data_mib), PlanVolume("cache", 32, shared=True))
    return dataclasses.replace(make_plan(name, vms), volumes=volumes)


async def volumes_on(fleet: Fleet) -> dict[str, tuple[str, Volume]]:
    """Every agent volume of the fleet: name -> (host, the volume as its agent lists it)."""
    found: dict[str, tuple[str, Volume]] = {}
    for host, fake in fleet.fakes.items():
        for vol in await fake.list_volumes():
            found[vol.name] = (host, vol)
    return found


async def down(fleet: Fleet, name: str, *, with_volumes: bool = False) -> PlanRun:
    resp = await stub(fleet).DestroyPlan(pb.DestroyPlanRequest(name=name, with_volumes=with_volumes))
    return (await watch(fleet, resp.run.id))[-1]


async def test_plan_volumes_are_made_on_their_users_host_and_attached(fleet: Fleet) -> None:
    await fleet.add_agent("h1", ROOMY)
    await fleet.add_agent("h2", ROOMY)
    diff = await stub(fleet).DiffPlan(pb.DiffPlanRequest(plan=plan_to_proto(with_volumes())))
    assert [(v.name, v.kind, list(v.services)) for v in diff.volumes] == [
        ("data", plan_pb2.VOLUME_CHANGE_KIND_CREATE, ["db"]),
        ("cache", plan_pb2.VOLUME_CHANGE_KIND_CREATE, ["api", "web"]),
    ]
    assert await volumes_on(fleet) == {}  # a diff makes nothing
    run = await _up(fleet, with_volumes())
    hosts = {v.service: v.host for v in run.vms}
    assert hosts["api"] == hosts["web"]  # two roomy hosts, yet the users of one volume share a host
    vols = await volumes_on(fleet)
    assert set(vols) == {"vols-data", "vols-cache"}
    data_host, data = vols["vols-data"]
    cache_host, cache = vols["vols-cache"]
    assert (data_host, data.size_mib, data.shared, data.vms) == (hosts["db"], 64, False, ("vols-db",))
    assert (cache_host, cache.size_mib, cache.shared, cache.vms) == (hosts["api"], 32, True, ("vols-api", "vols-web"))
    assert data.label_dict() == {LABEL_PLAN: "vols", "clonebox.volume": "data"}
    # the VM specs the agent was asked for attach them as disks vol-<volume>
    on_host = {r.spec.name: r.spec.disks for r in await fleet.fakes[hosts["api"]].list()}
    assert on_host["vols-web"][-1] == DiskSpec("vol-cache", volume="vols-cache")
    # the revision records where each volume lives; the same plan again changes nothing
    stored = plan_from_proto((await stub(fleet).GetPlan(pb.GetPlanRequest(name="vols"))).plan)
    assert {v.name: v.host for v in stored.volumes} == {"data": hosts["db"], "cache": hosts["api"]}
    again = await stub(fleet).DiffPlan(pb.DiffPlanRequest(plan=plan_to_proto(with_volumes())))
    assert [c.kind for c in again.changes] == [plan_pb2.CHANGE_KIND_NONE] * 3
    assert [v.kind for v in again.volumes] == [plan_pb2.VOLUME_CHANGE_KIND_KEEP] * 2
    assert (await _up(fleet, with_volumes())).revision == run.revision


async def test_a_replace_backs_up_the_vms_own_disks_and_keeps_the_volume(fleet: Fleet) -> None:
    await fleet.add_agent("h1", ROOMY)
    await _up(fleet, with_volumes())
    before = (await volumes_on(fleet))["vols-data"][1]
    old_uuid = (await fleet.vms.GetVm(vm_service_pb2.GetVmRequest(name="vols-db"))).vm.uuid
    run = await apply(fleet, with_volumes(db_disk=32), allow_replace=True)
    snapshots = await watch(fleet, run.id)
    final = snapshots[-1]
    assert final.state is RunState.SUCCEEDED, final.error
    assert next(v for v in final.vms if v.service == "db").change is ChangeKind.REPLACE
    # the backup holds the VM's own disk; the volume is not in it (it keeps its data on the host)
    backup = fleet.tmp / "plan-backups" / "vols" / "vols-db" / f"{run.id}.cbsnap"
    (taken,) = fleet.controller.store.list_audit(AuditFilter(action="plan.backup"))
    assert taken.event.outcome == "succeeded" and taken.event.details["file"] == str(backup)
    with backup.open("rb") as f:
        header = next(read_archive(f)).header
    assert [d.name for d in header.disks] == ["root"]
    assert [d.volume for d in header.spec.disks] == ["", "vols-data"]
    new = (await fleet.vms.GetVm(vm_service_pb2.GetVmRequest(name="vols-db"))).vm
    assert new.uuid != old_uuid and new.spec.disks[0].size_mib == 32
    after = (await volumes_on(fleet))["vols-data"][1]
    # the same volume (made once: its creation time is kept), now attached by the new VM
    assert after.create_time == before.create_time and after.vms == ("vols-db",)


async def test_a_revert_re_makes_a_vm_with_volumes_from_its_backup_and_attaches_them(fleet: Fleet) -> None:
    await fleet.add_agent("h1", ROOMY)
    good = reverting(with_volumes())
    await _up(fleet, good)
    before = (await volumes_on(fleet))["vols-data"][1]
    broken_db = dataclasses.replace(service("vols", "db", broken=True), volumes=("data",))
    bad = dataclasses.replace(good, vms=tuple(broken_db if v.service == "db" else v for v in good.vms))
    failed_start = await apply(fleet, bad, allow_replace=True)
    failed = (await watch(fleet, failed_start.id))[-1]
    assert failed.state is RunState.ROLLED_BACK, failed.error
    revert = await revert_run(fleet, "vols")
    assert revert.state is RunState.SUCCEEDED, revert.error
    # db came back from the failed run's backup (its own disk), with the same volume attached again
    assert ops(fleet, "snapshot.import") == ["vols-db"]
    db = (await fleet.vms.GetVm(vm_service_pb2.GetVmRequest(name="vols-db"))).vm
    assert db.state == vm_pb2.VM_STATE_RUNNING and not db.spec.disks[0].base_image
    assert [d.volume for d in db.spec.disks] == ["", "vols-data"]
    after = (await volumes_on(fleet))["vols-data"][1]
    assert after.create_time == before.create_time and after.vms == ("vols-db",)


async def test_a_rollback_keeps_the_volumes(fleet: Fleet) -> None:
    await fleet.add_agent("h1", ROOMY)
    run = await apply(fleet, with_volumes(broken_web=True))
    final = (await watch(fleet, run.id))[-1]
    assert final.state is RunState.ROLLED_BACK, final
    assert await vm_names(fleet, "vols") == []
    vols = await volumes_on(fleet)
    assert set(vols) == {"vols-data", "vols-cache"} and all(v.vms == () for _h, v in vols.values())


async def test_down_keeps_the_volumes_and_down_with_volumes_deletes_them(fleet: Fleet) -> None:
    await fleet.add_agent("h1", ROOMY)
    await fleet.add_agent("h2", ROOMY)
    first = await _up(fleet, with_volumes())
    made = await volumes_on(fleet)
    kept = await down(fleet, "vols")
    assert kept.state is RunState.SUCCEEDED, kept.error
    assert await vm_names(fleet) == []
    left = await volumes_on(fleet)
    assert set(left) == set(made) and all(v.vms == () for _h, v in left.values())
    # up again: the same volumes, on the hosts they live on, attached again (their data with them)
    second = await _up(fleet, with_volumes())
    assert {v.service: v.host for v in second.vms} == {v.service: v.host for v in first.vms}
    again = await volumes_on(fleet)
    assert {n: (h, v.create_time) for n, (h, v) in again.items()} == {
        n: (h, v.create_time) for n, (h, v) in made.items()
    }
    assert again["vols-data"][1].vms == ("vols-db",)
    gone = await down(fleet, "vols", with_volumes=True)
    assert gone.state is RunState.SUCCEEDED, gone.error
    assert await vm_names(fleet) == [] and await volumes_on(fleet) == {}
    assert list((await stub(fleet).ListPlans(pb.ListPlansRequest())).plans) == []
    # nothing left at all: another down --volumes succeeds (a volume already gone counts as deleted)
    assert (await down(fleet, "vols", with_volumes=True)).state is RunState.SUCCEEDED
    # and after down --volumes, the next up is free to place the volumes anywhere again
    third = await _up(fleet, with_volumes())
    assert third.state is RunState.SUCCEEDED


async def test_down_with_volumes_of_a_plan_without_vms_still_deletes_them(fleet: Fleet) -> None:
    await fleet.add_agent("h1", ROOMY)
    await _up(fleet, with_volumes())
    await down(fleet, "vols")
    assert set(await volumes_on(fleet)) == {"vols-data", "vols-cache"}
    gone = await down(fleet, "vols", with_volumes=True)
    assert gone.state is RunState.SUCCEEDED and gone.vms == ()
    assert await volumes_on(fleet) == {}


async def test_a_volume_of_another_size_fails_its_step_with_the_agents_reason(fleet: Fleet) -> None:
    await fleet.add_agent("h1", ROOMY)
    await _up(fleet, with_volumes())
    await down(fleet, "vols")  # the volumes stay, with 64 MiB
    bigger = with_volumes(data_mib=128)
    diff = await stub(fleet).DiffPlan(pb.DiffPlanRequest(plan=plan_to_proto(bigger)))
    data = next(v for v in diff.volumes if v.name == "data")
    assert data.kind == plan_pb2.VOLUME_CHANGE_KIND_DIFFERENT and "size_mib 64" in data.detail
    run = await apply(fleet, bigger)
    final = (await watch(fleet, run.id))[-1]
    assert final.state is RunState.ROLLED_BACK, final
    db = next(v for v in final.vms if v.service == "db")
    assert "volume vols-data exists with size_mib 64, not 128" in db.error  # the agent's words
    assert "changing a volume's size or sharing is not supported" in db.error
    assert await vm_names(fleet) == []
    assert (await volumes_on(fleet))["vols-data"][1].size_mib == 64  # never touched


async def test_a_hint_away_from_a_volumes_host_is_refused(fleet: Fleet) -> None:
    await fleet.add_agent("h1", ROOMY)
    await fleet.add_agent("h2", ROOMY)
    run = await _up(fleet, with_volumes())
    db_host = next(v.host for v in run.vms if v.service == "db")
    other = "h2" if db_host == "h1" else "h1"
    await down(fleet, "vols")
    hinted = with_volumes()
    hinted = dataclasses.replace(
        hinted, vms=tuple(dataclasses.replace(v, host=other) if v.service == "db" else v for v in hinted.vms)
    )
    err = await rpc_error(apply(fleet, hinted))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and error_info(err).reason == "PLAN_INVALID"
    assert f"its volumes are on {db_host}" in (err.details() or "")
    assert error_info(err).metadata["field"] == "vms.db.host"


async def test_plan_volume_mistakes_are_refused_before_anything_is_made(fleet: Fleet) -> None:
    await fleet.add_agent("h1", ROOMY)
    shared_twice = dataclasses.replace(with_volumes(), volumes=(PlanVolume("data", 64), PlanVolume("cache", 32)))
    err = await rpc_error(apply(fleet, shared_twice))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and error_info(err).reason == "PLAN_VOLUME_NOT_SHARED"
    assert "used by api, web" in (err.details() or "")
    unknown = dataclasses.replace(with_volumes(), volumes=(PlanVolume("data", 64),))
    err = await rpc_error(apply(fleet, unknown))
    assert error_info(err).reason == "PLAN_UNKNOWN_VOLUME" and error_info(err).metadata["field"] == "vms.api.volumes"
    assert await vm_names(fleet) == [] and await volumes_on(fleet) == {}


async def test_a_volume_that_does_not_fit_refuses_the_plan_before_anything_is_made(fleet: Fleet) -> None:
    # the three VMs' disks (16 MiB each) fit in 2,000 MiB; with a 4,000 MiB volume the plan does not
    await fleet.add_agent("h1", Resources(vcpus=8, memory_mib=8 * 1024, disk_mib=2_000))
    big = with_volumes(data_mib=4_000)
    err = await rpc_error(apply(fleet, big))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and error_info(err).reason == "PLAN_CAPACITY_EXCEEDED"
    assert "volume vols-data" in error_info(err).metadata["vms"] and "vols-db" not in error_info(err).metadata["vms"]
    assert await vm_names(fleet) == [] and await volumes_on(fleet) == {} and ops(fleet, "vm.create") == []
    # the same plan with a volume that fits goes through, and its volume is made
    await _up(fleet, with_volumes(data_mib=64))
    assert sorted(await volumes_on(fleet)) == ["vols-cache", "vols-data"]


async def test_a_plans_volumes_keep_their_disk_from_later_vms_until_deleted(fleet: Fleet) -> None:
    # 2,000 MiB of disk: the plan's VMs take 48, its volumes 1,500 + 32
    await fleet.add_agent("h1", Resources(vcpus=8, memory_mib=8 * 1024, disk_mib=2_000))
    await _up(fleet, with_volumes(data_mib=1_500))
    h1 = (await fleet.hosts.ListHosts(host_service_pb2.ListHostsRequest())).hosts[0]
    assert h1.allocated.disk_mib == 3 * 16 + 1_500 + 32
    # a VM that would fit in the disk the volumes are not using is refused: the volumes hold it
    late = vm_pb2.VmSpec(name="late", vcpus=1, memory_mib=512, disks=[vm_pb2.DiskSpec(name="root", size_mib=1_000)])
    err = await rpc_error(create(fleet, late))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and error_info(err).reason == "NO_HOST_FITS"
    # down keeps the volumes (and their room); down --volumes frees it
    assert (await down(fleet, "vols")).state is RunState.SUCCEEDED
    assert (await rpc_error(create(fleet, late))).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (await down(fleet, "vols", with_volumes=True)).state is RunState.SUCCEEDED
    assert (await create(fleet, late)).host == "h1"
    # a volume the agent refuses to make gives its reservation back
    full = FailedPrecondition("the pool's file system is full", reason="POOL_FULL")
    fleet.fakes["h1"].faults.fail_on["create_volume"] = Fault(full, times=1)
    run = await apply(fleet, with_volumes(data_mib=100))
    failed = (await watch(fleet, run.id))[-1]
    assert failed.state is RunState.ROLLED_BACK and "the pool's file system is full" in failed.error
    h1 = (await fleet.hosts.ListHosts(host_service_pb2.ListHostsRequest())).hosts[0]
    assert h1.allocated.disk_mib == 1_000  # only "late"


async def test_a_volume_made_without_a_reservation_is_counted_once_its_host_connects(
    fleet: Fleet, tmp_path: Path
) -> None:
    capacity = Resources(vcpus=8, memory_mib=8 * 1024, disk_mib=2_000)
    # storage of its own: the fake's files outlive its agent's restarts, as a host's do
    fake = FakeHypervisor(host_name="h1", capacity=capacity, storage_dir=tmp_path / "h1-storage")
    await fleet.add_agent("h1", capacity, fake)
    # made on the host, not through this controller: as a volume made before migration 0006 was
    await fleet.fakes["h1"].create_volume("old-data", 1_500)
    await fleet.stop_agent("h1")
    await fleet.add_agent("h1", capacity)

    async def counted() -> bool:
        hosts = (await fleet.hosts.ListHosts(host_service_pb2.ListHostsRequest())).hosts
        return hosts[0].allocated.disk_mib == 1_500

    await eventually(counted, WAIT, "the listed volume to be counted")
    late = vm_pb2.VmSpec(name="late", vcpus=1, memory_mib=512, disks=[vm_pb2.DiskSpec(name="root", size_mib=1_000)])
    err = await rpc_error(create(fleet, late))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and error_info(err).reason == "NO_HOST_FITS"
    # connecting again adopts nothing twice; deleting the volume through the controller frees its room
    await fleet.stop_agent("h1")
    await fleet.add_agent("h1", capacity)
    await eventually(counted, WAIT, "the host to be counted again")
    assert await fleet.controller.vms.delete_volume("h1", "old-data", "drop-old-data")
    assert (await create(fleet, late)).host == "h1"


async def test_a_host_whose_volumes_cannot_be_listed_still_syncs_its_vms(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeHypervisor(host_name="h1", capacity=ROOMY)
    fake.faults.fail_on["list_volumes"] = Fault(Internal("the volume folder cannot be read"), times=1)
    await fleet.add_agent("h1", ROOMY, fake)
    await create(fleet, spec("web", memory=64))

    async def running() -> bool:
        got = await fleet.vms.GetVm(vm_service_pb2.GetVmRequest(name="web"))
        return got.vm.state == vm_pb2.VM_STATE_RUNNING

    await eventually(running, WAIT, "web to run")
    assert "h1: its volumes are not counted until it connects again" in caplog.text
    assert "the volume folder cannot be read" in caplog.text


async def test_a_volume_mount_from_the_plan_file_reaches_the_agent(fleet: Fleet, tmp_path: Path) -> None:
    await fleet.add_agent("h1", ROOMY)
    text = (
        "version: 1\nname: mnt\ndefaults:\n  memory: 64MiB\n  disks: [{name: root, size: 16MiB}]\n"
        "volumes:\n  data: {size: 64MiB}\nvms:\n  db:\n    volumes: ['data:/var/lib/db']\n"
    )
    plan = load_plan_text(text, "mnt.yaml", tmp_path)
    await _up(fleet, plan)
    (record,) = await fleet.fakes["h1"].list()
    assert record.spec.disks[-1] == DiskSpec("vol-data", volume="mnt-data")
    assert record.spec.cloud_init is not None
    user_data = record.spec.cloud_init.user_data.reveal()
    assert "/dev/disk/by-id/virtio-vol-mnt-data" in user_data and "/var/lib/db" in user_data
    assert (await volumes_on(fleet))["mnt-data"][1].vms == ("mnt-db",)


async def test_down_with_volumes_fails_naming_a_volume_another_vm_holds(fleet: Fleet) -> None:
    await fleet.add_agent("h1", ROOMY)
    await _up(fleet, with_volumes())
    await down(fleet, "vols")
    intruder = spec("intruder", memory=64)
    intruder.disks.append(vm_pb2.DiskSpec(name="stolen", volume="vols-data"))
    await create(fleet, intruder, host="h1")  # a VM outside the plan attaches the plan's volume
    failed = await down(fleet, "vols", with_volumes=True)
    assert failed.state is RunState.FAILED
    assert "not every volume: volume vols-data on host h1:" in failed.error and "intruder" in failed.error
    assert "clonebox down vols --volumes' again" in failed.error
    assert set(await volumes_on(fleet)) == {"vols-data"}  # the other one went
    await fleet.vms.DeleteVm(vm_service_pb2.DeleteVmRequest(name="intruder"))

    async def intruder_gone() -> bool:
        return (await volumes_on(fleet))["vols-data"][1].vms == ()

    await eventually(intruder_gone, WAIT, "the intruder to let go of vols-data")
    done = await down(fleet, "vols", with_volumes=True)
    assert done.state is RunState.SUCCEEDED, done.error
    assert await volumes_on(fleet) == {}
