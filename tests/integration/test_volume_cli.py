"""``clonebox volume`` and the controller's volume RPCs against a real in-process controller and fake agents."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import grpc.aio
import pytest
from clonebox.controller.v1 import operation_service_pb2, vm_service_pb2
from clonebox.controller.v1 import vm_service_pb2_grpc as vms_grpc

from clonebox_core.audit.chain import AuditFilter
from clonebox_core.model import Resources
from tests.integration.conftest import Fleet
from tests.integration.test_audit_cli import Cli
from tests.integration.test_fleet import error_info

pytestmark = pytest.mark.integration

ROOM = Resources(vcpus=8, memory_mib=8192, disk_mib=10_000)


async def delete_vm(fleet: Fleet, name: str) -> None:
    resp = await fleet.vms.DeleteVm(vm_service_pb2.DeleteVmRequest(name=name))
    done = await fleet.ops.WaitOperation(operation_service_pb2.WaitOperationRequest(id=resp.operation.id))
    assert done.operation.done and not done.operation.HasField("error"), done.operation


@pytest.fixture
async def cli(fleet: Fleet) -> Cli:
    await fleet.add_agent("h1", ROOM)
    await fleet.add_agent("h2", ROOM)
    return Cli(fleet)


async def test_create_list_attach_and_delete(cli: Cli, tmp_path: Path) -> None:
    fleet = cli.fleet
    code, out, err = await cli(
        "-o", "json", "volume", "create", "data", "--host", "h2", "--size", "1GiB", "-l", "app=db"
    )
    assert code == 0, err
    made = json.loads(out)
    assert (made["host"], made["name"], made["size_mib"], made["labels"]) == ("h2", "data", 1024, {"app": "db"})
    # its disk is counted on its host at once
    assert fleet.controller.store.get_host("h2").allocated.disk_mib == 1024
    # the same again changes nothing; another size is refused with the agent's reason
    code, _, err = await cli("volume", "create", "data", "--host", "h2", "--size", "1024MiB")
    assert code == 0, err
    code, _, err = await cli("volume", "create", "data", "--host", "h2", "--size", "2GiB")
    assert code != 0 and "exists with size_mib 1024, not 2048" in err and "Traceback" not in err
    assert fleet.controller.store.get_host("h2").allocated.disk_mib == 1024

    # a VM spec file attaches it by name; placement puts the VM on the volume's host (h2), though h1,
    # with more room free now, is where a VM without volumes would go
    spec_file = tmp_path / "db.yaml"
    spec_file.write_text(
        "version: 1\nname: db\nmemory: 512MiB\ndisks:\n  - {name: root, size: 1GiB}\n  - {name: data, volume: data}\n"
    )
    code, _, err = await cli("vm", "create", "-f", str(spec_file), "--wait")
    assert code == 0, err
    assert fleet.controller.store.get_vm("db").host == "h2"
    code, out, err = await cli("-o", "json", "volume", "list")
    assert code == 0, err
    listed = json.loads(out)
    assert listed["host_errors"] == {}
    assert [(v["host"], v["name"], v.get("vms")) for v in listed["volumes"]] == [("h2", "data", ["db"])]
    code, out, _ = await cli("volume", "list", "--host", "h1")
    assert code == 0 and "no volumes" in out
    code, out, _ = await cli("volume", "list")
    assert code == 0 and "data" in out and "db" in out and "1GiB" in out

    # in use: refused, named, nothing freed
    code, _, err = await cli("volume", "delete", "data", "--host", "h2")
    assert code != 0 and "attached to VM(s) db" in err and "Traceback" not in err
    assert fleet.controller.store.get_host("h2").allocated.disk_mib == 1024 + 1024  # the VM's root disk too
    await delete_vm(fleet, "db")
    code, out, err = await cli("volume", "delete", "data", "--host", "h2")
    assert code == 0 and "deleted" in out, err
    assert fleet.controller.store.get_host("h2").allocated.disk_mib == 0
    # gone: a second delete is NOT_FOUND, naming the host
    code, _, err = await cli("volume", "delete", "data", "--host", "h2")
    assert code == 3 and "not found on host h2" in err
    # the controller's audit log names who made and deleted it
    events = fleet.controller.store.list_audit(AuditFilter(resource="volumes/data"))
    done = sorted((e.event.action, e.event.outcome) for e in events if e.event.outcome == "succeeded")
    assert done == [("volume.create", "succeeded"), ("volume.create", "succeeded"), ("volume.delete", "succeeded")]
    assert all(e.event.actor.endswith("audit-admin") for e in events if e.event.outcome == "succeeded")


async def test_bad_input_is_refused_before_anything_is_made(cli: Cli) -> None:
    fleet = cli.fleet
    code, _, err = await cli("volume", "create", "data", "--host", "h1", "--size", "1GB")
    assert code != 0 and "--size" in err and "ambiguous" in err
    code, _, err = await cli("volume", "create", "Bad_Name", "--host", "h1", "--size", "8MiB")
    assert code != 0 and "name" in err
    code, _, err = await cli("volume", "create", "data", "--host", "nowhere", "--size", "8MiB")
    assert code == 3 and "nowhere" in err
    code, _, err = await cli("volume", "create", "data", "--host", "h1", "--size", "100GiB")
    assert code != 0 and "host 'h1' has no room for volume 'data'" in err
    with pytest.raises(grpc.aio.AioRpcError) as no_host:
        await fleet.vms.CreateVolume(vm_service_pb2.CreateVolumeRequest(name="data", size_mib=8))
    assert no_host.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(no_host.value).metadata["field"] == "host"
    assert fleet.controller.store.get_host("h1").allocated.disk_mib == 0
    assert await fleet.fakes["h1"].list_volumes() == []


async def test_a_host_that_cannot_be_asked_is_named_and_the_others_listed(cli: Cli) -> None:
    fleet = cli.fleet
    code, _, err = await cli("volume", "create", "data", "--host", "h1", "--size", "8MiB")
    assert code == 0, err
    await fleet.stop_agent("h2")
    code, out, err = await cli("-o", "json", "volume", "list")
    assert code == 1
    listed = json.loads(out)
    assert [v["name"] for v in listed["volumes"]] == ["data"]
    assert list(listed["host_errors"]) == ["h2"]


async def test_viewers_list_volumes_but_cannot_make_or_delete_them(cli: Cli) -> None:
    fleet = cli.fleet
    channel = fleet.user_channel("viewer")
    try:
        stub = vms_grpc.VmServiceStub(channel)
        await stub.ListVolumes(vm_service_pb2.ListVolumesRequest())
        for call in (
            stub.CreateVolume(vm_service_pb2.CreateVolumeRequest(host="h1", name="data", size_mib=8)),
            stub.DeleteVolume(vm_service_pb2.DeleteVolumeRequest(host="h1", name="data")),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await call
            assert denied.value.code() is grpc.StatusCode.PERMISSION_DENIED
    finally:
        await channel.close()
    assert await fleet.fakes["h1"].list_volumes() == []
