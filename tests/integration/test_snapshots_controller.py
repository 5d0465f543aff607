"""The controller's SnapshotService through the real in-process fleet (controller + agents, fake hypervisor, mTLS)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest
from clonebox.controller.v1 import (
    host_service_pb2,
    operation_service_pb2,
    vm_service_pb2,
)
from clonebox.controller.v1 import snapshot_service_pb2 as pb
from clonebox.controller.v1 import snapshot_service_pb2_grpc as pb_grpc
from clonebox.type.v1 import snapshot_pb2, vm_pb2

from clonebox_core.model import Resources
from tests.integration.conftest import Fleet, eventually
from tests.integration.test_fleet import create, error_info, spec

pytestmark = pytest.mark.integration

ROOMY = Resources(vcpus=8, memory_mib=8192, disk_mib=100 * 1024)


def stub(fleet: Fleet, channel: grpc.aio.Channel | None = None) -> pb_grpc.SnapshotServiceStub:
    return pb_grpc.SnapshotServiceStub(channel or fleet.channel)


async def names(fleet: Fleet, vm: str) -> list[str]:
    resp = await stub(fleet).ListSnapshots(pb.ListSnapshotsRequest(vm=vm))
    return [s.name for s in resp.snapshots]


async def host_allocated_memory(fleet: Fleet, host: str) -> int:
    h = (await fleet.hosts.GetHost(host_service_pb2.GetHostRequest(name=host))).host
    return int(h.allocated.memory_mib)


async def test_create_list_restore_delete_prune(fleet: Fleet) -> None:
    await fleet.add_agent("h1", ROOMY)
    await create(fleet, spec("web-1"))
    s = stub(fleet)
    made = (
        await s.CreateSnapshot(
            pb.CreateSnapshotRequest(vm="web-1", name="base", description="first", tags={"k": "v"}, request_id="c1")
        )
    ).snapshot
    assert made.name == "base" and made.vm == "web-1" and made.tags["k"] == "v"
    # the controller passes the caller's identity as the creator
    assert made.creator.startswith("spiffe://") and "admin" in made.creator
    # idempotent by request id: the same request does not make a second snapshot
    again = (
        await s.CreateSnapshot(
            pb.CreateSnapshotRequest(vm="web-1", name="base", description="first", tags={"k": "v"}, request_id="c1")
        )
    ).snapshot
    assert again.name == "base"
    await s.CreateSnapshot(pb.CreateSnapshotRequest(vm="web-1", name="second", request_id="c2"))
    listed = await s.ListSnapshots(pb.ListSnapshotsRequest(vm="web-1"))
    assert [x.name for x in listed.snapshots] == ["base", "second"]
    assert [x.name for x in listed.snapshots if x.current] == ["second"]

    restored = await s.RestoreSnapshot(pb.RestoreSnapshotRequest(vm="web-1", name="base", request_id="r1"))
    assert restored.vm.name == "web-1"
    assert restored.HasField("backup") and restored.backup.automatic
    after = await s.ListSnapshots(pb.ListSnapshotsRequest(vm="web-1"))
    assert [x.name for x in after.snapshots if x.current] == ["base"]

    deleted = await s.DeleteSnapshot(pb.DeleteSnapshotRequest(vm="web-1", name="second", request_id="d1"))
    assert list(deleted.deleted) == ["second"]

    policy = await s.SetSnapshotPolicy(
        pb.SetSnapshotPolicyRequest(vm="web-1", policy=snapshot_pb2.SnapshotPolicy(keep_last=1), request_id="p1")
    )
    assert policy.policy.keep_last == 1
    dry = await s.PruneSnapshots(pb.PruneSnapshotsRequest(vm="web-1", dry_run=True, request_id="pr0"))
    kept = [d.name for d in dry.decisions if d.keep]
    # a dry run deletes nothing and judges every snapshot (the current one is always kept)
    assert sorted(d.name for d in dry.decisions) == sorted(await names(fleet, "web-1"))
    assert "base" in kept and all(d.reason for d in dry.decisions)
    done = await s.PruneSnapshots(pb.PruneSnapshotsRequest(vm="web-1", request_id="pr1"))
    assert [d.name for d in done.decisions if d.keep] == kept
    assert sorted(await names(fleet, "web-1")) == sorted(kept)


async def test_unknown_vm_is_not_found(fleet: Fleet) -> None:
    await fleet.add_agent("h1", ROOMY)
    s = stub(fleet)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.ListSnapshots(pb.ListSnapshotsRequest(vm="nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(err.value).reason == "VM_NOT_FOUND"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.CreateSnapshot(pb.CreateSnapshotRequest(vm="nope", name="x", request_id="c"))
    assert error_info(err.value).reason == "VM_NOT_FOUND"


async def test_agent_errors_pass_through(fleet: Fleet) -> None:
    await fleet.add_agent("h1", ROOMY)
    await create(fleet, spec("web-1"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub(fleet).RestoreSnapshot(pb.RestoreSnapshotRequest(vm="web-1", name="missing", request_id="r"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(err.value).reason == "SNAPSHOT_NOT_FOUND"


async def test_viewer_may_list_but_not_create(fleet: Fleet) -> None:
    await fleet.add_agent("h1", ROOMY)
    await create(fleet, spec("web-1"))
    channel = fleet.user_channel("viewer", "val")
    try:
        s = stub(fleet, channel)
        assert (await s.ListSnapshots(pb.ListSnapshotsRequest(vm="web-1"))).snapshots == []
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.CreateSnapshot(pb.CreateSnapshotRequest(vm="web-1", name="x", request_id="c"))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await channel.close()
    assert await names(fleet, "web-1") == []


async def _delete(fleet: Fleet, name: str, with_snapshots: bool) -> None:
    resp = await fleet.vms.DeleteVm(
        vm_service_pb2.DeleteVmRequest(name=name, request_id=f"del-{with_snapshots}", with_snapshots=with_snapshots)
    )
    op = (await fleet.ops.WaitOperation(operation_service_pb2.WaitOperationRequest(id=resp.operation.id))).operation
    assert op.done and not op.HasField("error"), op.error


async def test_delete_vm_with_snapshots_needs_the_flag(fleet: Fleet) -> None:
    await fleet.add_agent("h1", ROOMY)
    await create(fleet, spec("web-1"))
    await stub(fleet).CreateSnapshot(pb.CreateSnapshotRequest(vm="web-1", name="base", request_id="c1"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await fleet.vms.DeleteVm(vm_service_pb2.DeleteVmRequest(name="web-1", request_id="d0"))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(err.value).reason == "VM_HAS_SNAPSHOTS"
    vm = (await fleet.vms.GetVm(vm_service_pb2.GetVmRequest(name="web-1"))).vm
    assert vm.state == vm_pb2.VM_STATE_RUNNING  # untouched
    await _delete(fleet, "web-1", with_snapshots=True)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await fleet.vms.GetVm(vm_service_pb2.GetVmRequest(name="web-1"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def _export(fleet: Fleet, vm: str, name: str) -> list[snapshot_pb2.SnapshotImagePart]:
    return [r.part async for r in stub(fleet).ExportSnapshot(pb.ExportSnapshotRequest(vm=vm, name=name))]


async def _requests(
    parts: list[snapshot_pb2.SnapshotImagePart], rename: str = "", request_id: str = "i1"
) -> AsyncIterator[pb.ImportSnapshotRequest]:
    for part in parts:
        p = snapshot_pb2.SnapshotImagePart()
        p.CopyFrom(part)
        if p.WhichOneof("part") == "header":
            if rename:
                p.header.spec.name = rename
            p.header.request_id = request_id
        yield pb.ImportSnapshotRequest(part=p)


async def test_export_then_import_as_another_name(fleet: Fleet) -> None:
    await fleet.add_agent("h1", ROOMY)
    await create(fleet, spec("web-1", memory=512))
    await stub(fleet).CreateSnapshot(pb.CreateSnapshotRequest(vm="web-1", name="base", request_id="c1"))
    parts = await _export(fleet, "web-1", "base")
    assert parts[0].WhichOneof("part") == "header" and parts[-1].WhichOneof("part") == "trailer"
    assert parts[0].header.spec.name == "web-1"
    before = await host_allocated_memory(fleet, "h1")

    # the name is taken: refused before anything reaches an agent
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub(fleet).ImportSnapshot(_requests(parts, request_id="i0"))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert await host_allocated_memory(fleet, "h1") == before

    made = (await stub(fleet).ImportSnapshot(_requests(parts, rename="web-2"))).vm
    assert made.name == "web-2" and made.host == "h1"
    assert made.state == vm_pb2.VM_STATE_STOPPED
    # one reservation for the new VM: its WatchVms event updates the record, it does not add another
    assert await host_allocated_memory(fleet, "h1") == before + 512

    async def listed_stopped() -> bool:
        vm = (await fleet.vms.GetVm(vm_service_pb2.GetVmRequest(name="web-2"))).vm
        return bool(vm.state == vm_pb2.VM_STATE_STOPPED)

    await eventually(listed_stopped, what="web-2 stopped in the fleet view")
    h = (await fleet.hosts.GetHost(host_service_pb2.GetHostRequest(name="h1"))).host
    assert h.vm_count == 2 and h.allocated.memory_mib == before + 512


async def test_an_import_whose_disks_do_not_match_its_spec_is_refused_before_an_operation(fleet: Fleet) -> None:
    await fleet.add_agent("h1", ROOMY)
    await create(fleet, spec("web-1"))
    await stub(fleet).CreateSnapshot(pb.CreateSnapshotRequest(vm="web-1", name="base", request_id="c1"))
    parts = await _export(fleet, "web-1", "base")
    header = snapshot_pb2.SnapshotImagePart()
    header.CopyFrom(parts[0])
    header.header.disks[0].name = "not-a-disk-of-the-spec"
    operations_before = len(fleet.controller.store.list_operations(limit=1000))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub(fleet).ImportSnapshot(_requests([header, *parts[1:]], rename="web-4", request_id="id"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(err.value).metadata["field"] == "disks"
    # no operation was recorded, nothing was placed
    assert len(fleet.controller.store.list_operations(limit=1000)) == operations_before
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await fleet.vms.GetVm(vm_service_pb2.GetVmRequest(name="web-4"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_failed_import_releases_the_reservation(fleet: Fleet) -> None:
    await fleet.add_agent("h1", ROOMY)
    await create(fleet, spec("web-1"))
    await stub(fleet).CreateSnapshot(pb.CreateSnapshotRequest(vm="web-1", name="base", request_id="c1"))
    parts = await _export(fleet, "web-1", "base")
    before = await host_allocated_memory(fleet, "h1")
    # a trailer whose digests do not match what was sent: the agent refuses, keeps nothing
    broken = list(parts)
    bad = snapshot_pb2.SnapshotImagePart()
    bad.trailer.sha256.extend(["0" * 64 for _ in broken[-1].trailer.sha256])
    broken[-1] = bad
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub(fleet).ImportSnapshot(_requests(broken, rename="web-3", request_id="ib"))
    assert err.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DATA_LOSS)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await fleet.vms.GetVm(vm_service_pb2.GetVmRequest(name="web-3"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert await host_allocated_memory(fleet, "h1") == before
    # the name is free again: a good import of it works
    made = (await stub(fleet).ImportSnapshot(_requests(parts, rename="web-3", request_id="ig"))).vm
    assert made.name == "web-3"
