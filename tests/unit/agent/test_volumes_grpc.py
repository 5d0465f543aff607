"""The volume RPCs through the agent's real gRPC server (plaintext loopback, fake hypervisor).

What the wire sees: the servicer's conversions, the guard's error mapping (status code + ErrorInfo reason
and metadata), request-id replay from the journal, and the audit records of successful and failed
volume mutations in the journal's outbox.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
from clonebox.agent.v1 import agent_pb2, agent_pb2_grpc
from clonebox.type.v1 import snapshot_pb2, vm_pb2

from clonebox_agent.adapters.fake import FakeHypervisor
from clonebox_agent.config import AgentConfig
from clonebox_agent.main import Agent
from clonebox_core.audit.event import Outcome
from clonebox_core.errors import CloneboxError
from clonebox_core.rpc.server import Transport, aio_channel
from clonebox_core.rpc.status import error_from_rpc


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[tuple[Agent, FakeHypervisor]]:
    fake = FakeHypervisor(host_name="h", storage_dir=tmp_path / "storage")
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


async def _refused(call: object) -> CloneboxError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call  # type: ignore[misc]
    return error_from_rpc(err.value)


def _vm_spec(name: str, volume: str) -> vm_pb2.VmSpec:
    return vm_pb2.VmSpec(
        name=name,
        vcpus=1,
        memory_mib=64,
        disks=[vm_pb2.DiskSpec(name="root", size_mib=16), vm_pb2.DiskSpec(name="data", volume=volume)],
        network=vm_pb2.NetworkSpec(mode=vm_pb2.NETWORK_MODE_NONE),
    )


async def _events(a: Agent, action: str) -> list[tuple[str, Outcome, str]]:
    found = await asyncio.to_thread(a.journal.pending_events, 1000)
    return [(e.resource, e.outcome, e.reason) for e in found if e.action == action]


async def test_volume_rpcs_round_trip(agent: tuple[Agent, FakeHypervisor]) -> None:
    a, _fake = agent
    async with aio_channel(a.address, Transport(insecure=True)) as ch:
        stub = agent_pb2_grpc.AgentServiceStub(ch)
        made = await stub.CreateVolume(
            agent_pb2.CreateVolumeRequest(name="db", size_mib=8, labels={"app": "db"}, request_id="v1")
        )
        assert (made.volume.name, made.volume.size_mib, made.volume.shared) == ("db", 8, False)
        assert dict(made.volume.labels) == {"app": "db"} and made.volume.HasField("create_time")
        # a retry with the request id answers the volume as it is; a create without one is idempotent too
        again = await stub.CreateVolume(agent_pb2.CreateVolumeRequest(name="db", size_mib=8, request_id="v1"))
        assert again.volume == made.volume
        relabelled = await stub.CreateVolume(agent_pb2.CreateVolumeRequest(name="db", size_mib=8, labels={"a": "b"}))
        assert dict(relabelled.volume.labels) == {"a": "b"}

        plan = await stub.CreateVm(agent_pb2.CreateVmRequest(spec=_vm_spec("web", "db"), dry_run=True))
        assert any(s.startswith("disk:data: attach volume db") for s in plan.plan.steps)
        assert [v.vms for v in (await stub.ListVolumes(agent_pb2.ListVolumesRequest())).volumes] == [[]]
        vm = await stub.CreateVm(agent_pb2.CreateVmRequest(spec=_vm_spec("web", "db"), request_id="c1"))
        assert vm.vm.spec.disks[1].volume == "db"
        listed = await stub.ListVolumes(agent_pb2.ListVolumesRequest())
        assert [(v.name, list(v.vms)) for v in listed.volumes] == [("db", ["web"])]
        await stub.DeleteVm(agent_pb2.DeleteVmRequest(name="web", request_id="x1"))
        # a volume no VM attaches is no leftover: the sweep neither reports nor removes it
        swept = await stub.Recover(agent_pb2.RecoverRequest(sweep=True))
        assert list(swept.orphans) == []
        listed = await stub.ListVolumes(agent_pb2.ListVolumesRequest())
        assert [(v.name, list(v.vms), dict(v.labels)) for v in listed.volumes] == [("db", [], {"a": "b"})]


async def test_errors_map_to_status_codes(agent: tuple[Agent, FakeHypervisor]) -> None:
    a, _fake = agent
    async with aio_channel(a.address, Transport(insecure=True)) as ch:
        stub = agent_pb2_grpc.AgentServiceStub(ch)
        bad = await _refused(stub.CreateVolume(agent_pb2.CreateVolumeRequest(name="db", size_mib=0)))
        assert (bad.code, bad.metadata.get("field")) == ("INVALID_ARGUMENT", "size_mib")
        bad = await _refused(stub.CreateVolume(agent_pb2.CreateVolumeRequest(name="Bad_Name", size_mib=8)))
        assert (bad.code, bad.metadata.get("field")) == ("INVALID_ARGUMENT", "name")
        bad = await _refused(
            stub.CreateVm(
                agent_pb2.CreateVmRequest(
                    spec=vm_pb2.VmSpec(
                        name="web",
                        vcpus=1,
                        memory_mib=64,
                        disks=[vm_pb2.DiskSpec(name="data", volume="db", size_mib=8)],
                    )
                )
            )
        )
        assert (bad.code, bad.metadata.get("field")) == ("INVALID_ARGUMENT", "spec.disks[0].size_mib")

        await stub.CreateVolume(agent_pb2.CreateVolumeRequest(name="db", size_mib=8))
        differs = await _refused(stub.CreateVolume(agent_pb2.CreateVolumeRequest(name="db", size_mib=8, shared=True)))
        assert (differs.code, differs.reason, differs.metadata.get("field")) == (
            "FAILED_PRECONDITION",
            "VOLUME_EXISTS_DIFFERENT",
            "shared",
        )
        missing = await _refused(stub.CreateVm(agent_pb2.CreateVmRequest(spec=_vm_spec("dry", "nope"), dry_run=True)))
        assert (missing.code, missing.reason, missing.metadata.get("field")) == (
            "NOT_FOUND",
            "VOLUME_NOT_FOUND",
            "spec.disks[1].volume",
        )

        await stub.CreateVm(agent_pb2.CreateVmRequest(spec=_vm_spec("web", "db")))
        busy = await _refused(stub.CreateVm(agent_pb2.CreateVmRequest(spec=_vm_spec("api", "db"))))
        assert (busy.code, busy.reason, busy.metadata.get("vms")) == ("FAILED_PRECONDITION", "VOLUME_IN_USE", "web")
        held = await _refused(stub.DeleteVolume(agent_pb2.DeleteVolumeRequest(name="db", request_id="d1")))
        assert (held.code, held.reason, held.metadata.get("vms")) == ("FAILED_PRECONDITION", "VOLUME_IN_USE", "web")
        snap = await _refused(
            stub.CreateSnapshot(
                agent_pb2.CreateSnapshotRequest(vm="web", name="s1", kind=snapshot_pb2.SNAPSHOT_KIND_INTERNAL)
            )
        )
        assert (snap.code, snap.reason) == ("FAILED_PRECONDITION", "VM_HAS_VOLUMES")
        # without a kind, a VM with volumes gets the kind that leaves them out
        taken = await stub.CreateSnapshot(agent_pb2.CreateSnapshotRequest(vm="web", name="s2"))
        assert taken.snapshot.kind == snapshot_pb2.SNAPSHOT_KIND_EXTERNAL
        await stub.DeleteSnapshot(agent_pb2.DeleteSnapshotRequest(vm="web", name="s2"))

        # deleting the VM keeps the volume; then it can go
        await stub.DeleteVm(agent_pb2.DeleteVmRequest(name="web", request_id="x1"))
        listed = await stub.ListVolumes(agent_pb2.ListVolumesRequest())
        assert [(v.name, list(v.vms)) for v in listed.volumes] == [("db", [])]
        await stub.DeleteVolume(agent_pb2.DeleteVolumeRequest(name="db", request_id="d2"))
        # a retry with the same request id is answered from the journal: done
        await stub.DeleteVolume(agent_pb2.DeleteVolumeRequest(name="db", request_id="d2"))
        gone = await _refused(stub.DeleteVolume(agent_pb2.DeleteVolumeRequest(name="db", request_id="d3")))
        assert (gone.code, gone.reason) == ("NOT_FOUND", "VOLUME_NOT_FOUND")
        reused = await _refused(
            stub.CreateVolume(agent_pb2.CreateVolumeRequest(name="db", size_mib=8, request_id="d2"))
        )
        assert (reused.code, reused.reason) == ("INVALID_ARGUMENT", "REQUEST_ID_REUSED")
        assert list((await stub.ListVolumes(agent_pb2.ListVolumesRequest())).volumes) == []

    # successes are recorded with their outcome, refusals by the guard's observer, both on the volume
    created = await _events(a, "volume.create")
    assert ("hosts/h/volumes/db", Outcome.SUCCEEDED, "") in created
    assert any(r == "hosts/h/volumes/db" and o != Outcome.SUCCEEDED for r, o, _ in created)
    deleted = await _events(a, "volume.delete")
    assert deleted.count(("hosts/h/volumes/db", Outcome.SUCCEEDED, "")) == 1
    refused = {reason for r, o, reason in deleted if r == "hosts/h/volumes/db" and o != Outcome.SUCCEEDED}
    assert refused == {"VOLUME_IN_USE", "VOLUME_NOT_FOUND"}
