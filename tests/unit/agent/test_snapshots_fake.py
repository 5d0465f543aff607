"""The fake hypervisor's snapshots: tree, kinds, refusals, revert, delete, export and import."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from clonebox_agent.adapters import common
from clonebox_agent.adapters.common import Fault
from clonebox_agent.adapters.fake import FakeHypervisor
from clonebox_agent.ports import Capability
from clonebox_core.errors import AlreadyExists, FailedPrecondition, Internal, InvalidArgument, NotFound
from clonebox_core.model import DiskSpec, SharedFolder, VmSpec, VmState
from clonebox_core.snapshots import SnapshotKind

INTERNAL, EXTERNAL = SnapshotKind.INTERNAL, SnapshotKind.EXTERNAL


def _qcow2_info(path: str) -> tuple[dict[str, object], int]:
    return json.loads(subprocess.check_output(["qemu-img", "info", "--output=json", path])), os.path.getsize(path)


def _exists(path: str) -> bool:
    return os.path.exists(path)


def spec(name: str = "web", *, shared: Path | None = None, disks: int = 1) -> VmSpec:
    return VmSpec(
        name=name,
        vcpus=1,
        memory_mib=128,
        disks=tuple(DiskSpec(f"d{i}", size_mib=16) for i in range(disks)),
        shared_folders=(SharedFolder(str(shared), "share0"),) if shared is not None else (),
    )


@pytest.fixture
async def fake(tmp_path: Path) -> AsyncIterator[FakeHypervisor]:
    f = FakeHypervisor(host_name="h", storage_dir=tmp_path / "s", shared_roots=[str(tmp_path)])
    await f.open(lambda e: None)
    yield f
    await f.close()


async def test_tree_parent_is_current_and_current_moves(fake: FakeHypervisor) -> None:
    await fake.create(spec(), start=True)
    a = await fake.create_snapshot("web", "a", kind=INTERNAL)
    b = await fake.create_snapshot("web", "b", kind=INTERNAL)
    assert (a.parent, b.parent, a.has_memory, a.vm_state) == ("", "a", True, VmState.RUNNING)
    await fake.revert_snapshot("web", "a", start=True)
    c = await fake.create_snapshot("web", "c", kind=INTERNAL)
    assert c.parent == "a" and c.has_memory
    listed = await fake.list_snapshots("web")
    assert [(s.name, s.parent, s.current) for s in listed] == [("a", "", False), ("b", "a", False), ("c", "a", True)]


async def test_stopped_internal_has_no_memory(fake: FakeHypervisor) -> None:
    await fake.create(spec(), start=False)
    snap = await fake.create_snapshot("web", "a", kind=INTERNAL)
    assert not snap.has_memory and snap.vm_state == VmState.STOPPED


async def test_refusals(fake: FakeHypervisor, tmp_path: Path) -> None:
    await fake.create(spec("shared", shared=tmp_path), start=True)
    with pytest.raises(FailedPrecondition) as info:
        await fake.create_snapshot("shared", "a", kind=INTERNAL)
    assert info.value.reason == "SNAPSHOT_BLOCKED_BY_SHARED_FOLDER" and "--disk-only --quiesce" in info.value.message
    # disk-only works, quiesced through the guest agent
    await fake.create_snapshot("shared", "a", kind=EXTERNAL, quiesce=True)
    with pytest.raises(AlreadyExists) as exists:
        await fake.create_snapshot("shared", "a", kind=EXTERNAL)
    assert exists.value.reason == "SNAPSHOT_ALREADY_EXISTS"
    fake.guest_agent_down.add("shared")
    with pytest.raises(FailedPrecondition) as ga:
        await fake.create_snapshot("shared", "b", kind=EXTERNAL, quiesce=True)
    assert ga.value.reason == "GUEST_AGENT_UNAVAILABLE"
    with pytest.raises(NotFound) as nf:
        await fake.revert_snapshot("shared", "zz", start=False)
    assert nf.value.reason == "SNAPSHOT_NOT_FOUND"
    with pytest.raises(NotFound):
        await fake.delete_snapshot("shared", "zz")
    with pytest.raises(NotFound) as vm:
        await fake.list_snapshots("nope")
    assert vm.value.reason == "VM_NOT_FOUND"
    # a stopped VM with a share takes internal snapshots (no memory to save), once its external ones are gone
    await fake.destroy("shared")
    await fake.delete_snapshot("shared", "a")
    with pytest.raises(InvalidArgument):
        await fake.create_snapshot("shared", "b", kind=INTERNAL, quiesce=True)
    await fake.create_snapshot("shared", "c", kind=INTERNAL)


async def test_quiesce_needs_guest_agent_capability(tmp_path: Path) -> None:
    f = FakeHypervisor(capabilities=frozenset({Capability.HOST_FILES}), storage_dir=tmp_path / "s")
    await f.create(spec(), start=True)
    with pytest.raises(FailedPrecondition):
        await f.create_snapshot("web", "a", kind=EXTERNAL, quiesce=True)
    await f.close()


async def test_revert_restores_disk_state_and_honours_start(fake: FakeHypervisor) -> None:
    await fake.create(spec(), start=True)
    fake.disk_state["web"] = "v1"
    await fake.create_snapshot("web", "a", kind=INTERNAL)
    fake.disk_state["web"] = "v2"
    await fake.revert_snapshot("web", "a", start=False)
    assert fake.disk_state["web"] == "v1" and (await fake.get("web")).state == VmState.STOPPED
    fake.disk_state["web"] = "v3"
    await fake.revert_snapshot("web", "a", start=True)
    assert fake.disk_state["web"] == "v1" and (await fake.get("web")).state == VmState.RUNNING


async def test_delete_one_reparents_children_and_subtree(fake: FakeHypervisor) -> None:
    await fake.create(spec(), start=False)
    for name in ("a", "b", "c"):
        await fake.create_snapshot("web", name, kind=INTERNAL)
    assert await fake.delete_snapshot("web", "b") == ["b"]
    assert [(s.name, s.parent) for s in await fake.list_snapshots("web")] == [("a", ""), ("c", "a")]
    await fake.revert_snapshot("web", "a", start=False)
    await fake.create_snapshot("web", "d", kind=INTERNAL)
    assert await fake.delete_snapshot("web", "a", children=True) == ["a", "c", "d"]
    assert await fake.list_snapshots("web") == []
    e = await fake.create_snapshot("web", "e", kind=INTERNAL)
    assert e.parent == ""  # the current snapshot went with the subtree


async def test_delete_vm_drops_snapshots(fake: FakeHypervisor) -> None:
    await fake.create(spec(), start=False)
    await fake.create_snapshot("web", "a", kind=INTERNAL)
    await fake.delete("web")
    await fake.create(spec(), start=False)
    assert await fake.list_snapshots("web") == []


async def test_scripted_faults_and_rollback(fake: FakeHypervisor) -> None:
    await fake.create(spec(), start=False)
    fake.faults.fail_on["create_snapshot"] = Fault(Internal("boom"))
    with pytest.raises(Internal):
        await fake.create_snapshot("web", "a", kind=INTERNAL)
    fake.faults.fail_on["snapshot:taken"] = Fault(Internal("late"))
    log = common.MemoryStepLog()
    with pytest.raises(Internal):
        await fake.create_snapshot("web", "a", kind=INTERNAL, steps=log)
    assert await fake.list_snapshots("web") == []
    assert [s.state.value for s in log.steps()] == ["undone"]


async def test_export_writes_real_qcow2_and_import_defines_stopped_vm(fake: FakeHypervisor, tmp_path: Path) -> None:
    await fake.create(spec(disks=2), start=True)
    await fake.create_snapshot("web", "a", kind=INTERNAL)
    work = tmp_path / "work"
    work.mkdir()
    images = await fake.export_disks("web", "a", str(work))
    assert [i.disk for i in images] == ["d0", "d1"]
    for image in images:
        info, size = _qcow2_info(image.path)
        assert info["format"] == "qcow2" and info["virtual-size"] == image.virtual_size_bytes == 16 * 2**20
        assert image.image_bytes == size
    record = await fake.import_disks(spec("copy", disks=2), {i.disk: i.path for i in images})
    assert record.state == VmState.STOPPED and not any(_exists(i.path) for i in images)
    with pytest.raises(AlreadyExists):
        await fake.import_disks(spec("copy", disks=2), {})
    await fake.delete("copy")
    assert not any(v.startswith("cb-copy") for v in (await fake.inventory()).volumes)
