"""VmService.UpdateVm through the real in-process fleet (controller on SQLite, agents on the fake hypervisor).

What the controller adds to the agent's update: the change is classified and refused before anything
is recorded, growth is checked against the VM's host, the record (spec, labels, reservation) follows
the update, a failed update puts the record back, and the operation is idempotent by request id.
"""

from __future__ import annotations

import grpc
import grpc.aio
import pytest
from clonebox.agent.v1 import agent_pb2
from clonebox.controller.v1 import host_service_pb2, operation_service_pb2, vm_service_pb2
from clonebox.type.v1 import operation_pb2, plan_pb2, vm_pb2

from clonebox_agent.adapters.fake import FakeHypervisor
from clonebox_core.errors import Internal
from tests.integration.conftest import Fleet
from tests.integration.test_fleet import SMALL, create, error_info, spec
from tests.integration.test_plans_controller import rpc_error

pytestmark = pytest.mark.integration


async def update(
    fleet: Fleet, s: vm_pb2.VmSpec, request_id: str = "", dry_run: bool = False
) -> vm_service_pb2.UpdateVmResponse:
    return await fleet.vms.UpdateVm(vm_service_pb2.UpdateVmRequest(spec=s, request_id=request_id, dry_run=dry_run))


async def finished(fleet: Fleet, op_id: str) -> operation_pb2.Operation:
    resp = await fleet.ops.WaitOperation(operation_service_pb2.WaitOperationRequest(id=op_id))
    assert resp.operation.done, resp.operation
    return resp.operation


def updates(fleet: Fleet) -> list[str]:
    return [o.target for o in fleet.controller.store.list_operations(limit=1000) if o.kind == "vm.update"]


async def on_agent(fleet: Fleet, name: str) -> vm_pb2.Vm:
    stub, channel = fleet.agent_stub("h1")
    try:
        return (await stub.GetVm(agent_pb2.GetVmRequest(name=name))).vm
    finally:
        await channel.close()


async def test_more_memory_and_vcpus_restart_the_same_vm(fleet: Fleet) -> None:
    await fleet.add_agent("h1", SMALL)
    before = await create(fleet, spec("web-1", memory=512))
    resp = await update(fleet, spec("web-1", memory=1024, vcpus=2), request_id="u1")
    assert resp.kind == plan_pb2.CHANGE_KIND_RESTART
    assert list(resp.fields) == ["memory_mib", "vcpus"]
    op = await finished(fleet, resp.operation.id)
    assert not op.HasField("error"), op.error
    assert op.result.vm.state == vm_pb2.VM_STATE_RUNNING
    # the same VM (same domain, same disks), now with the new size on the agent and in the record
    agent_vm = await on_agent(fleet, "web-1")
    assert agent_vm.uuid == before.uuid
    assert (agent_vm.spec.memory_mib, agent_vm.spec.vcpus) == (1024, 2)
    got = (await fleet.vms.GetVm(vm_service_pb2.GetVmRequest(name="web-1"))).vm
    assert (got.spec.memory_mib, got.spec.vcpus) == (1024, 2)
    host = (await fleet.hosts.GetHost(host_service_pb2.GetHostRequest(name="h1"))).host
    assert (host.allocated.memory_mib, host.allocated.vcpus) == (1024, 2)
    assert updates(fleet) == ["vms/web-1"]
    assert not [o for o in fleet.controller.store.list_operations(limit=100) if o.kind == "vm.delete"]


async def test_labels_change_in_place_and_listing_follows(fleet: Fleet) -> None:
    await fleet.add_agent("h1", SMALL)
    await create(fleet, spec("web-1"))
    relabelled = spec("web-1")
    relabelled.labels.clear()
    relabelled.labels["app"] = "api"
    resp = await update(fleet, relabelled)
    assert resp.kind == plan_pb2.CHANGE_KIND_IN_PLACE and list(resp.fields) == ["labels"]
    op = await finished(fleet, resp.operation.id)
    assert not op.HasField("error"), op.error
    by_new = await fleet.vms.ListVms(vm_service_pb2.ListVmsRequest(labels={"app": "api"}))
    by_old = await fleet.vms.ListVms(vm_service_pb2.ListVmsRequest(labels={"app": "web"}))
    assert [v.name for v in by_new.vms] == ["web-1"] and list(by_old.vms) == []
    assert dict((await on_agent(fleet, "web-1")).spec.labels) == {"app": "api"}


async def test_a_change_only_a_new_vm_can_make_is_refused_before_anything(fleet: Fleet) -> None:
    await fleet.add_agent("h1", SMALL)
    await create(fleet, spec("web-1"))
    bigger_disk = spec("web-1", memory=1024)
    bigger_disk.disks[0].size_mib = 2048
    err = await rpc_error(update(fleet, bigger_disk))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    info = error_info(err)
    assert info.reason == "VM_UPDATE_NEEDS_REPLACE" and info.metadata["fields"] == "disks"
    assert "disks" in (err.details() or "") and "memory_mib" not in info.metadata["fields"]
    assert updates(fleet) == []
    got = (await fleet.vms.GetVm(vm_service_pb2.GetVmRequest(name="web-1"))).vm
    assert (got.spec.memory_mib, got.spec.disks[0].size_mib) == (512, 1024)


async def test_growth_the_host_has_no_room_for_is_refused(fleet: Fleet) -> None:
    await fleet.add_agent("h1", SMALL)  # 4096 MiB
    await create(fleet, spec("web-1", memory=1024))
    await create(fleet, spec("web-2", memory=2048))
    err = await rpc_error(update(fleet, spec("web-1", memory=3072)))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_info(err).reason == "HOST_CAPACITY_EXCEEDED"
    assert "h1" in (err.details() or "") and "web-1" in (err.details() or "")
    host = (await fleet.hosts.GetHost(host_service_pb2.GetHostRequest(name="h1"))).host
    assert host.allocated.memory_mib == 3072
    assert updates(fleet) == []
    # what fits in the room left (the VM's own reservation counts as room) is accepted
    op = await finished(fleet, (await update(fleet, spec("web-1", memory=2048))).operation.id)
    assert not op.HasField("error"), op.error
    host = (await fleet.hosts.GetHost(host_service_pb2.GetHostRequest(name="h1"))).host
    assert host.allocated.memory_mib == 4096


async def test_retry_with_the_same_request_id_acts_once(fleet: Fleet) -> None:
    await fleet.add_agent("h1", SMALL)
    await create(fleet, spec("web-1"))
    first = await update(fleet, spec("web-1", memory=1024), request_id="same")
    again = await update(fleet, spec("web-1", memory=1024), request_id="same")
    assert again.operation.id == first.operation.id
    await finished(fleet, first.operation.id)
    assert updates(fleet) == ["vms/web-1"]
    reused = await rpc_error(fleet.vms.StopVm(vm_service_pb2.StopVmRequest(name="web-1", request_id="same")))
    assert error_info(reused).reason == "REQUEST_ID_REUSED"


async def test_dry_run_says_what_and_changes_nothing(fleet: Fleet) -> None:
    await fleet.add_agent("h1", SMALL)
    await create(fleet, spec("web-1"))
    resp = await update(fleet, spec("web-1", memory=1024), dry_run=True)
    assert resp.kind == plan_pb2.CHANGE_KIND_RESTART and list(resp.fields) == ["memory_mib"]
    assert not resp.HasField("operation")
    assert updates(fleet) == []
    assert (await on_agent(fleet, "web-1")).spec.memory_mib == 512
    same = await update(fleet, spec("web-1"), dry_run=True)
    assert same.kind == plan_pb2.CHANGE_KIND_NONE and list(same.fields) == []


async def test_unknown_vm_and_bad_values_are_clear_errors(fleet: Fleet) -> None:
    await fleet.add_agent("h1", SMALL)
    await create(fleet, spec("web-1"))
    missing = await rpc_error(update(fleet, spec("nope")))
    assert missing.code() == grpc.StatusCode.NOT_FOUND
    zero = await rpc_error(update(fleet, spec("web-1", vcpus=0)))
    assert zero.code() == grpc.StatusCode.INVALID_ARGUMENT and "vcpus" in (zero.details() or "")
    assert updates(fleet) == []


async def test_a_failed_update_puts_the_record_back(fleet: Fleet) -> None:
    fake = FakeHypervisor(host_name="h1", capacity=SMALL, fail_on={UPDATE_FAULT: Internal("injected: redefine failed")})
    await fleet.add_agent("h1", SMALL, fake=fake)
    await create(fleet, spec("web-1", memory=512))
    resp = await update(fleet, spec("web-1", memory=1024))
    op = await finished(fleet, resp.operation.id)
    assert op.HasField("error") and "injected" in op.error.message
    got = (await fleet.vms.GetVm(vm_service_pb2.GetVmRequest(name="web-1"))).vm
    assert got.spec.memory_mib == 512
    host = (await fleet.hosts.GetHost(host_service_pb2.GetHostRequest(name="h1"))).host
    assert host.allocated.memory_mib == 512
    assert (await on_agent(fleet, "web-1")).spec.memory_mib == 512


#: the fake hypervisor's fault point of a redefine (see FakeHypervisor)
UPDATE_FAULT = "update"
