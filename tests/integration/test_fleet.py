"""The controller and agents over real gRPC (in-process, FakeHypervisor): API behaviour and errors."""

from __future__ import annotations

import asyncio

import grpc
import grpc.aio
import pytest
from clonebox.agent.v1 import agent_pb2
from clonebox.controller.v1 import host_service_pb2, operation_service_pb2, vm_service_pb2
from clonebox.type.v1 import host_pb2, vm_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from sqlalchemy import text

from clonebox_core.model import Resources
from tests.integration.conftest import Fleet, eventually

pytestmark = pytest.mark.integration

SMALL = Resources(vcpus=4, memory_mib=4096, disk_mib=100_000)


def spec(name: str, memory: int = 512, vcpus: int = 1) -> vm_pb2.VmSpec:
    return vm_pb2.VmSpec(
        name=name,
        vcpus=vcpus,
        memory_mib=memory,
        disks=[vm_pb2.DiskSpec(name="root", size_mib=1024)],
        labels={"app": "web"},
    )


def error_info(exc: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(exc)
    assert status is not None, "no google.rpc.Status on the wire"
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    raise AssertionError("no ErrorInfo detail")


async def create(fleet: Fleet, s: vm_pb2.VmSpec, request_id: str = "", host: str = "") -> vm_pb2.Vm:
    resp = await fleet.vms.CreateVm(vm_service_pb2.CreateVmRequest(spec=s, request_id=request_id, host=host))
    op = (await fleet.ops.WaitOperation(operation_service_pb2.WaitOperationRequest(id=resp.operation.id))).operation
    assert op.done, op
    assert not op.HasField("error"), op.error
    return op.result.vm


async def test_create_get_list_delete(fleet: Fleet) -> None:
    await fleet.add_agent("h1", SMALL)
    vm = await create(fleet, spec("web-1"), request_id="r1")
    assert vm.host == "h1"
    assert vm.state == vm_pb2.VM_STATE_RUNNING

    got = (await fleet.vms.GetVm(vm_service_pb2.GetVmRequest(name="web-1"))).vm
    assert got.spec.memory_mib == 512 and got.spec.labels["app"] == "web"

    listed = (await fleet.vms.ListVms(vm_service_pb2.ListVmsRequest(labels={"app": "web"}))).vms
    assert [v.name for v in listed] == ["web-1"]

    host = (await fleet.hosts.GetHost(host_service_pb2.GetHostRequest(name="h1"))).host
    assert host.allocated.memory_mib == 512 and host.vm_count == 1

    resp = await fleet.vms.DeleteVm(vm_service_pb2.DeleteVmRequest(name="web-1", request_id="d1"))
    op = (await fleet.ops.WaitOperation(operation_service_pb2.WaitOperationRequest(id=resp.operation.id))).operation
    assert op.done and not op.HasField("error")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await fleet.vms.GetVm(vm_service_pb2.GetVmRequest(name="web-1"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(err.value).reason == "VM_NOT_FOUND"
    assert "web-1" not in [d.name for d in await fleet.fakes["h1"].list()]
    host = (await fleet.hosts.GetHost(host_service_pb2.GetHostRequest(name="h1"))).host
    assert host.allocated.memory_mib == 0


async def test_a_create_records_the_agents_revision_of_its_answer(fleet: Fleet) -> None:
    agent = await fleet.add_agent("h1", SMALL)
    await create(fleet, spec("web-1"))
    with fleet.controller.store.engine.connect() as conn:
        recorded = conn.execute(text("SELECT agent_epoch, agent_sequence FROM vms WHERE name = 'web-1'")).one()
    # the answer came after the fake's "defined" and "started": the two events are at or below it
    events = agent.service.events
    assert recorded[0] == events.epoch and 2 <= recorded[1] <= events.revision.sequence, (recorded, events.revision)


async def test_retry_with_same_request_id_creates_once(fleet: Fleet) -> None:
    await fleet.add_agent("h1", SMALL)
    req = vm_service_pb2.CreateVmRequest(spec=spec("once"), request_id="same-id")
    first, second = await asyncio.gather(fleet.vms.CreateVm(req), fleet.vms.CreateVm(req))
    assert first.operation.id == second.operation.id
    await fleet.ops.WaitOperation(operation_service_pb2.WaitOperationRequest(id=first.operation.id))
    third = await fleet.vms.CreateVm(req)
    assert third.operation.id == first.operation.id
    assert fleet.fakes["h1"].calls["create"] == 1


@pytest.mark.parametrize(
    ("mutate", "code", "reason", "field"),
    [
        (lambda s: setattr(s, "name", "Bad_Name"), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_NAME", "spec.name"),
        (lambda s: setattr(s, "memory_mib", 0), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD", "spec.memory_mib"),
        (lambda s: setattr(s, "vcpus", 100000), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD", "spec.vcpus"),
        (
            lambda s: s.disks[0].CopyFrom(vm_pb2.DiskSpec(name="root", base_image="../../etc/shadow")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_FIELD",
            "spec.disks[0].base_image",
        ),
    ],
)
async def test_bad_spec_is_rejected_with_field(fleet: Fleet, mutate, code, reason, field) -> None:  # type: ignore[no-untyped-def]
    await fleet.add_agent("h1", SMALL)
    s = spec("x1")
    mutate(s)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await fleet.vms.CreateVm(vm_service_pb2.CreateVmRequest(spec=s))
    assert err.value.code() == code
    info = error_info(err.value)
    assert (info.reason, info.metadata["field"]) == (reason, field)
    assert "Traceback" not in (err.value.details() or "")
    assert (await fleet.vms.ListVms(vm_service_pb2.ListVmsRequest())).vms == []


async def test_duplicate_name_unknown_host_and_no_room(fleet: Fleet) -> None:
    await fleet.add_agent("h1", SMALL)
    await create(fleet, spec("dup"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await fleet.vms.CreateVm(vm_service_pb2.CreateVmRequest(spec=spec("dup", memory=256)))
    assert (err.value.code(), error_info(err.value).reason) == (grpc.StatusCode.ALREADY_EXISTS, "VM_ALREADY_EXISTS")

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await fleet.vms.CreateVm(vm_service_pb2.CreateVmRequest(spec=spec("x2"), host="nope"))
    assert (err.value.code(), error_info(err.value).reason) == (grpc.StatusCode.NOT_FOUND, "HOST_NOT_FOUND")

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await fleet.vms.CreateVm(vm_service_pb2.CreateVmRequest(spec=spec("huge", memory=64 * 1024)))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_info(err.value).reason == "NO_HOST_FITS"


async def test_agent_failure_fails_operation_and_frees_room(fleet: Fleet) -> None:
    await fleet.add_agent("h1", SMALL)
    fleet.fakes["h1"].faults.fail_on["create"] = RuntimeError("disk exploded")
    resp = await fleet.vms.CreateVm(vm_service_pb2.CreateVmRequest(spec=spec("boom")))
    op = (await fleet.ops.WaitOperation(operation_service_pb2.WaitOperationRequest(id=resp.operation.id))).operation
    assert op.done and op.HasField("error")
    # an unexpected agent exception is INTERNAL with a generic message, never UNKNOWN or a traceback
    assert op.error.code == grpc.StatusCode.INTERNAL.value[0]
    assert "disk exploded" not in op.error.message and "Traceback" not in op.error.message
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await fleet.vms.GetVm(vm_service_pb2.GetVmRequest(name="boom"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    host = (await fleet.hosts.GetHost(host_service_pb2.GetHostRequest(name="h1"))).host
    assert host.allocated.memory_mib == 0


async def test_agent_direct_errors_and_unknown_never(fleet: Fleet) -> None:
    await fleet.add_agent("h1", SMALL)
    stub, ch = fleet.agent_stub("h1")
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetVm(agent_pb2.GetVmRequest(name="ghost"))
        assert (err.value.code(), error_info(err.value).reason) == (grpc.StatusCode.NOT_FOUND, "VM_NOT_FOUND")
        fleet.fakes["h1"].faults.fail_on["get"] = ValueError("secret internals")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetVm(agent_pb2.GetVmRequest(name="ghost"))
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert "secret internals" not in (err.value.details() or "")
    finally:
        await ch.close()


async def test_health_and_reflection_on_both_daemons(fleet: Fleet) -> None:
    await fleet.add_agent("h1", SMALL)
    _stub, agent_ch = fleet.agent_stub("h1")
    for channel, service in [
        (fleet.user_channel("viewer"), "clonebox.controller.v1.VmService"),
        (agent_ch, "clonebox.agent.v1.AgentService"),
    ]:
        async with channel as ch:
            health = health_pb2_grpc.HealthStub(ch)
            resp = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
            refl = reflection_pb2_grpc.ServerReflectionStub(ch)

            async def one() -> reflection_pb2.ServerReflectionRequest:
                yield reflection_pb2.ServerReflectionRequest(list_services="")

            names = []
            async for r in refl.ServerReflectionInfo(one()):
                names = [s.name for s in r.list_services_response.service]
            assert service in names


async def test_pagination_and_filters(fleet: Fleet) -> None:
    await fleet.add_agent("h1", Resources(64, 64 * 1024, 10**7))
    for i in range(7):
        await create(fleet, spec(f"vm-{i}", memory=64))
    seen: list[str] = []
    token = ""
    while True:
        page = await fleet.vms.ListVms(vm_service_pb2.ListVmsRequest(page_size=3, page_token=token))
        assert len(page.vms) <= 3
        seen += [v.name for v in page.vms]
        token = page.next_page_token
        if not token:
            break
    assert seen == [f"vm-{i}" for i in range(7)]

    # The agent's events of a create (defined, then started) may reach the controller after the
    # operation recorded RUNNING; the older one is applied for a moment, and the newer one puts it back
    # (docs/operations.md, Host lifecycle, "Known limit").
    async def all_running() -> bool:
        running = await fleet.vms.ListVms(vm_service_pb2.ListVmsRequest(state=vm_pb2.VM_STATE_RUNNING, host="h1"))
        return len(running.vms) == 7

    await eventually(all_running, what="the 7 VMs listed as running on h1")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await fleet.vms.ListVms(vm_service_pb2.ListVmsRequest(page_size=5000))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_concurrent_creates_never_overcommit(fleet: Fleet) -> None:
    small = Resources(vcpus=4, memory_mib=2048, disk_mib=100_000)
    await fleet.add_agent("h1", small)
    await fleet.add_agent("h2", small)
    reqs = [
        fleet.vms.CreateVm(vm_service_pb2.CreateVmRequest(spec=spec(f"c-{i}", memory=512), request_id=f"c-{i}"))
        for i in range(20)
    ]
    results = await asyncio.gather(*reqs, return_exceptions=True)
    ok = [r for r in results if not isinstance(r, BaseException)]
    failed = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(ok) + len(failed) == 20
    assert all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in failed)
    assert len(ok) == 8  # 2 hosts x 2048 MiB / 512 MiB
    for r in ok:
        await fleet.ops.WaitOperation(operation_service_pb2.WaitOperationRequest(id=r.operation.id))
    hosts = (await fleet.hosts.ListHosts(host_service_pb2.ListHostsRequest())).hosts
    for h in hosts:
        assert h.allocated.memory_mib <= h.allocatable.memory_mib
        assert h.allocated.vcpus <= h.allocatable.vcpus
    assert sum([len(await f.list()) for f in fleet.fakes.values()]) == 8


async def test_cordon_uncordon_drain(fleet: Fleet) -> None:
    await fleet.add_agent("h1", SMALL)
    await create(fleet, spec("d1"))
    await fleet.hosts.CordonHost(host_service_pb2.CordonHostRequest(name="h1"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await fleet.vms.CreateVm(vm_service_pb2.CreateVmRequest(spec=spec("d2")))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    await fleet.hosts.UncordonHost(host_service_pb2.UncordonHostRequest(name="h1"))
    await create(fleet, spec("d2"))
    drained = await fleet.hosts.DrainHost(host_service_pb2.DrainHostRequest(name="h1", request_id="drain-1"))
    assert sorted(drained.stopped_vms) == ["d1", "d2"]
    assert drained.host.cordoned
    vms = (await fleet.vms.ListVms(vm_service_pb2.ListVmsRequest())).vms
    assert {v.state for v in vms} == {vm_pb2.VM_STATE_STOPPED}


async def test_stop_graceful_then_forced(fleet: Fleet) -> None:
    await fleet.add_agent("h1", SMALL, stop_timeout_seconds=1)
    await create(fleet, spec("g1"))
    resp = await fleet.vms.StopVm(vm_service_pb2.StopVmRequest(name="g1", request_id="s1"))
    op = (await fleet.ops.WaitOperation(operation_service_pb2.WaitOperationRequest(id=resp.operation.id))).operation
    assert op.result.vm.state == vm_pb2.VM_STATE_STOPPED
    stub, ch = fleet.agent_stub("h1")
    try:
        await stub.StartVm(agent_pb2.StartVmRequest(name="g1", request_id="st1"))
        fleet.fakes["h1"].ignore_shutdown = True
        out = await stub.StopVm(agent_pb2.StopVmRequest(name="g1", request_id="s2", timeout_seconds=1))
        assert out.forced and out.vm.state == vm_pb2.VM_STATE_STOPPED
        # a retry of the same request answers from the journal: still forced, nothing done twice
        again = await stub.StopVm(agent_pb2.StopVmRequest(name="g1", request_id="s2", timeout_seconds=1))
        assert again.forced
    finally:
        await ch.close()


async def test_unreachable_host_comes_back(fleet: Fleet) -> None:
    await fleet.add_agent("h1", SMALL)
    await fleet.stop_agent("h1")

    async def state() -> int:
        return (await fleet.hosts.GetHost(host_service_pb2.GetHostRequest(name="h1"))).host.state

    await eventually(lambda: _eq(state(), host_pb2.HOST_STATE_UNREACHABLE), what="host unreachable")
    await fleet.add_agent("h1", SMALL)
    assert await state() == host_pb2.HOST_STATE_READY


async def _eq(value, expected) -> bool:  # type: ignore[no-untyped-def]
    return (await value) == expected


async def test_agent_restart_behind_the_back_converges(fleet: Fleet) -> None:
    await fleet.add_agent("h1", SMALL)
    for n in ("keep", "destroyed", "undefined"):
        await create(fleet, spec(n))
    fake = fleet.fakes["h1"]
    await fleet.stop_agent("h1")  # the agent dies; the fake hypervisor (like libvirt) lives on
    fake.external_destroy("destroyed")
    # a running domain survives undefine as a transient one (as in libvirt); stop it first so it vanishes
    fake.external_destroy("undefined")
    fake.external_undefine("undefined")
    await fleet.add_agent("h1", SMALL, fake=fake)

    async def converged() -> bool:
        vms = {v.name: v for v in (await fleet.vms.ListVms(vm_service_pb2.ListVmsRequest())).vms}
        return (
            vms["keep"].state == vm_pb2.VM_STATE_RUNNING
            and vms["destroyed"].state == vm_pb2.VM_STATE_STOPPED
            and vms["undefined"].state == vm_pb2.VM_STATE_FAILED
        )

    try:
        await eventually(converged, what="fleet view to converge after agent restart")
    except AssertionError:
        vms = (await fleet.vms.ListVms(vm_service_pb2.ListVmsRequest())).vms
        raise AssertionError([(v.name, v.state, v.state_reason) for v in vms]) from None


async def test_stale_revision_is_expired(fleet: Fleet) -> None:
    await fleet.add_agent("h1", SMALL)
    stub, ch = fleet.agent_stub("h1")
    try:
        info = await stub.GetHostInfo(agent_pb2.GetHostInfoRequest())
        stale = agent_pb2.WatchVmsRequest()
        stale.after.epoch = info.revision.epoch - 1 if info.revision.epoch > 1 else info.revision.epoch + 7
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in stub.WatchVms(stale):
                pass
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_info(err.value).reason == "REVISION_EXPIRED"
    finally:
        await ch.close()


async def test_hypervisor_down_makes_host_not_serving(fleet: Fleet) -> None:
    await fleet.add_agent("h1", SMALL)
    fleet.fakes["h1"].set_serving(False, "libvirtd is not running")

    async def not_serving() -> bool:
        host = (await fleet.hosts.GetHost(host_service_pb2.GetHostRequest(name="h1"))).host
        return host.state == host_pb2.HOST_STATE_NOT_SERVING

    await eventually(not_serving, what="host NOT_SERVING")
    _stub, agent_ch = fleet.agent_stub("h1")
    async with agent_ch as ch:
        resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await fleet.vms.CreateVm(vm_service_pb2.CreateVmRequest(spec=spec("nope"), host="h1"))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(err.value).reason == "HOST_NOT_SERVING"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await fleet.vms.CreateVm(vm_service_pb2.CreateVmRequest(spec=spec("nope")))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "h1" in (err.value.details() or "")

    fleet.fakes["h1"].set_serving(True)

    async def ready() -> bool:
        host = (await fleet.hosts.GetHost(host_service_pb2.GetHostRequest(name="h1"))).host
        return host.state == host_pb2.HOST_STATE_READY

    await eventually(ready, what="host READY again")


async def test_fleet_watch_streams_changes_and_resumes(fleet: Fleet) -> None:
    await fleet.add_agent("h1", SMALL)
    seen: list[tuple[int, str, int, bool]] = []

    async def watch(after: int, until: int) -> None:
        call = fleet.vms.WatchVms(vm_service_pb2.WatchVmsRequest(after_revision=after))
        async for ev in call:
            seen.append((ev.revision, ev.vm.name, ev.vm.state, ev.deleted))
            if len(seen) >= until:
                call.cancel()
                return

    await create(fleet, spec("w1"))
    await asyncio.wait_for(watch(1, 1), 10)  # resume after revision 1: the later changes of w1 replay
    first = seen[-1]
    assert first[0] > 1 and first[1] == "w1"
    resp = await fleet.vms.DeleteVm(vm_service_pb2.DeleteVmRequest(name="w1", request_id="wd"))
    await fleet.ops.WaitOperation(operation_service_pb2.WaitOperationRequest(id=resp.operation.id))
    seen.clear()
    await asyncio.wait_for(watch(first[0], 1), 10)
    revisions = [r for r, *_ in seen]
    assert revisions == sorted(revisions) and revisions[0] > first[0]


async def test_watch_operation_reports_progress_until_done(fleet: Fleet) -> None:
    await fleet.add_agent("h1", SMALL)
    fleet.fakes["h1"].faults.delays["create"] = 0.5
    resp = await fleet.vms.CreateVm(vm_service_pb2.CreateVmRequest(spec=spec("slow"), request_id="slow"))
    states = [
        (m.operation.progress, m.operation.done)
        async for m in fleet.ops.WatchOperation(operation_service_pb2.WatchOperationRequest(id=resp.operation.id))
    ]
    assert states[-1][1], "the stream ends with the finished operation"
    assert any(not done for _, done in states), "progress before completion was streamed"
    progress = [p for p, _ in states]
    assert progress == sorted(progress)


async def test_vms_made_on_a_host_directly_are_adopted_from_their_events(fleet: Fleet) -> None:
    await fleet.add_agent("h1", SMALL)
    await create(fleet, spec("known"))
    # made on the agent itself, not through the controller: the fleet learns of them only from the
    # host's events, and a burst of them is reconciled by a listing of the host
    stub, ch = fleet.agent_stub("h1")
    try:
        for n in ("direct-1", "direct-2", "direct-3"):
            await stub.CreateVm(agent_pb2.CreateVmRequest(spec=spec(n, memory=64), request_id=f"r-{n}", start=True))
    finally:
        await ch.close()

    async def adopted() -> bool:
        vms = {v.name: v for v in (await fleet.vms.ListVms(vm_service_pb2.ListVmsRequest())).vms}
        return all(vms.get(n) is not None and vms[n].host == "h1" for n in ("direct-1", "direct-2", "direct-3"))

    await eventually(adopted, what="the VMs made on h1 directly to be adopted")
    got = (await fleet.vms.GetVm(vm_service_pb2.GetVmRequest(name="direct-2"))).vm
    assert got.state == vm_pb2.VM_STATE_RUNNING
    assert (await fleet.vms.GetVm(vm_service_pb2.GetVmRequest(name="known"))).vm.host == "h1"


async def test_a_host_vm_shadowed_by_a_fleet_name_is_adopted_when_the_name_is_released(fleet: Fleet) -> None:
    await fleet.add_agent("h1", SMALL)
    await fleet.add_agent("h2", SMALL)
    await create(fleet, spec("dup"), request_id="dup-fleet", host="h2")
    # the same name made directly on h1 (as a controller would): the fleet keeps its first placement
    stub, ch = fleet.agent_stub("h1")
    try:
        await stub.CreateVm(agent_pb2.CreateVmRequest(spec=spec("dup"), request_id="dup-h1", start=False))
    finally:
        await ch.close()
    got = (await fleet.vms.GetVm(vm_service_pb2.GetVmRequest(name="dup"))).vm
    assert got.host == "h2"
    op = (await fleet.vms.DeleteVm(vm_service_pb2.DeleteVmRequest(name="dup", request_id="dup-del"))).operation
    done = (await fleet.ops.WaitOperation(operation_service_pb2.WaitOperationRequest(id=op.id))).operation
    assert done.done and not done.HasField("error"), done

    # h1's VM has no event to report (it stays stopped): the release alone makes the fleet adopt it
    async def adopted() -> bool:
        try:
            vm = (await fleet.vms.GetVm(vm_service_pb2.GetVmRequest(name="dup"))).vm
        except grpc.aio.AioRpcError:
            return False
        return vm.host == "h1" and vm.state == vm_pb2.VM_STATE_STOPPED

    await eventually(adopted, what="h1's dup adopted by the fleet")
