"""The snapshot RPCs through the agent's real gRPC server (plaintext loopback, fake hypervisor)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
from clonebox.agent.v1 import agent_pb2, agent_pb2_grpc
from clonebox.type.v1 import snapshot_pb2

from clonebox_agent.adapters.fake import FakeHypervisor
from clonebox_agent.config import AgentConfig
from clonebox_agent.main import Agent
from clonebox_core.model import Auth, AuthMethod, CloudInit, DiskSpec, VmSpec
from clonebox_core.rpc.server import Transport, aio_channel


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


def test_config_validates_snapshot_settings() -> None:
    assert AgentConfig(name="h").snapshot_prune_interval_seconds == 3600
    assert AgentConfig(name="h").max_import_virtual_bytes == 1 << 40
    with pytest.raises(ValueError, match="snapshot_prune_interval_seconds"):
        AgentConfig(name="h", snapshot_prune_interval_seconds=0)
    with pytest.raises(ValueError, match="max_import_virtual_bytes"):
        AgentConfig(name="h", max_import_virtual_bytes=0)


async def test_snapshot_rpcs_round_trip(agent: tuple[Agent, FakeHypervisor]) -> None:
    a, fake = agent
    secret = "$6$salt$" + "x" * 86
    spec = VmSpec(
        name="web",
        memory_mib=128,
        disks=(DiskSpec("root", size_mib=16),),
        cloud_init=CloudInit(user_data="#cloud-config\nhostname: hunter2\n"),
        auth=Auth(user="dev", method=AuthMethod.PASSWORD, password_hash=secret),  # type: ignore[arg-type]
    )
    await a.service.create(spec, request_id="")
    fake.disk_state["web"] = "v1"
    async with aio_channel(a.address, Transport(insecure=True)) as ch:
        stub = agent_pb2_grpc.AgentServiceStub(ch)
        made = await stub.CreateSnapshot(
            agent_pb2.CreateSnapshotRequest(vm="web", name="base", tags={"k": "v"}, creator="alice", request_id="c1")
        )
        assert made.snapshot.name == "base" and made.snapshot.kind == snapshot_pb2.SNAPSHOT_KIND_INTERNAL
        assert made.snapshot.creator == "alice" and made.snapshot.has_memory
        fake.disk_state["web"] = "v2"
        restored = await stub.RestoreSnapshot(agent_pb2.RestoreSnapshotRequest(vm="web", name="base"))
        assert restored.backup.automatic and fake.disk_state["web"] == "v1"
        await stub.SetSnapshotPolicy(
            agent_pb2.SetSnapshotPolicyRequest(vm="web", policy=snapshot_pb2.SnapshotPolicy(keep_last=5))
        )
        listed = await stub.ListSnapshots(agent_pb2.ListSnapshotsRequest(vm="web"))
        assert [s.name for s in listed.snapshots] == ["base", restored.backup.name] and listed.policy.keep_last == 5
        pruned = await stub.PruneSnapshots(agent_pb2.PruneSnapshotsRequest(vm="web", dry_run=True))
        assert all(d.keep for d in pruned.decisions)

        parts = [r.part async for r in stub.ExportSnapshot(agent_pb2.ExportSnapshotRequest(vm="web", name="base"))]
        header = parts[0].header
        assert header.snapshot.name == "base" and parts[-1].HasField("trailer")
        # secrets never leave in an export
        assert header.spec.auth.password_hash != secret and "hunter2" not in header.spec.cloud_init.user_data
        assert not os.listdir(os.path.join(a.config.storage_dir, "exports"))

        header.spec.name = "copy"
        header.request_id = "imp-1"

        async def requests() -> AsyncIterator[agent_pb2.ImportSnapshotRequest]:
            for p in parts:
                yield agent_pb2.ImportSnapshotRequest(part=p)

        imported = await stub.ImportSnapshot(requests())
        assert imported.vm.name == "copy" and not imported.vm.spec.HasField("cloud_init")
        assert not imported.vm.spec.auth.password_hash

        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.DeleteVm(agent_pb2.DeleteVmRequest(name="web"))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        deleted = await stub.DeleteSnapshot(agent_pb2.DeleteSnapshotRequest(vm="web", name="base", children=True))
        assert list(deleted.deleted) == ["base", restored.backup.name]
        await stub.DeleteVm(agent_pb2.DeleteVmRequest(name="web"))


async def test_cancelled_export_removes_its_files(agent: tuple[Agent, FakeHypervisor]) -> None:
    a, _ = agent
    await a.service.create(VmSpec(name="web", memory_mib=128, disks=(DiskSpec("root", size_mib=16),)), request_id="")
    await a.snapshots.create("web", name="base")
    async with aio_channel(a.address, Transport(insecure=True)) as ch:
        stub = agent_pb2_grpc.AgentServiceStub(ch)
        call = stub.ExportSnapshot(agent_pb2.ExportSnapshotRequest(vm="web", name="base"))
        first = await call.read()
        assert first.part.HasField("header")
        call.cancel()
    exports = os.path.join(a.config.storage_dir, "exports")
    for _ in range(100):
        if not os.listdir(exports):
            break
        await asyncio.sleep(0.02)
    assert not os.listdir(exports)
