"""The snapshot part of the Hypervisor contract: the fake, libvirt's test driver and real QEMU alike.

What a snapshot holds is checked from inside a real guest by tests/e2e/test_snapshot_adapter_real.py;
here the tree (parent, current), the start flag of a revert, names and errors, the files
``export_disks`` writes and what ``import_disks`` defines.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from dataclasses import replace
from typing import TYPE_CHECKING

import pytest

from clonebox_agent.adapters.common import Fault, MemoryStepLog
from clonebox_agent.ports import Capability
from clonebox_core.errors import AlreadyExists, FailedPrecondition, Internal, NotFound
from clonebox_core.model import SharedFolder, StepState, VmState
from clonebox_core.snapshots import SnapshotKind

if TYPE_CHECKING:
    from conftest import Harness

INTERNAL = SnapshotKind.INTERNAL
EXTERNAL = SnapshotKind.EXTERNAL


async def _names(h: Harness, vm: str) -> list[str]:
    return [s.name for s in await h.hv.list_snapshots(vm)]


def _image_info(path: str) -> dict[str, object]:
    out = subprocess.run(["qemu-img", "info", "--output", "json", path], capture_output=True, text=True, check=True)
    info: dict[str, object] = json.loads(out.stdout)
    return info


def _existing(paths: list[str]) -> list[str]:
    return [p for p in paths if os.path.exists(p)]


# ---- create and list ----------------------------------------------------------------------------


async def test_snapshots_form_a_tree_with_one_current(h: Harness) -> None:
    spec = h.spec()
    await h.hv.create(spec, start=False)
    assert await h.hv.list_snapshots(spec.name) == []
    first = await h.hv.create_snapshot(spec.name, "s1", kind=INTERNAL)
    assert (first.name, first.kind, first.parent, first.current) == ("s1", INTERNAL, "", True)
    assert (first.vm_state, first.has_memory) == (VmState.STOPPED, False)
    await h.hv.create_snapshot(spec.name, "s2", kind=INTERNAL)
    listed = await h.hv.list_snapshots(spec.name)
    assert [(s.name, s.parent, s.current) for s in listed] == [("s1", "", False), ("s2", "s1", True)]
    assert listed[0].create_time <= listed[1].create_time
    assert all(s.kind == INTERNAL for s in listed)


async def test_snapshot_of_a_running_vm_saves_its_memory(h: Harness) -> None:
    spec = h.spec()
    await h.hv.create(spec, start=True)
    snap = await h.hv.create_snapshot(spec.name, "live", kind=INTERNAL)
    assert (snap.vm_state, snap.has_memory) == (VmState.RUNNING, True)
    assert (await h.hv.get(spec.name)).state == VmState.RUNNING
    assert [s.has_memory for s in await h.hv.list_snapshots(spec.name)] == [True]


async def test_a_taken_name_already_exists(h: Harness) -> None:
    spec = h.spec()
    await h.hv.create(spec, start=False)
    await h.hv.create_snapshot(spec.name, "s1", kind=INTERNAL)
    with pytest.raises(AlreadyExists) as err:
        await h.hv.create_snapshot(spec.name, "s1", kind=INTERNAL)
    assert err.value.reason == "SNAPSHOT_ALREADY_EXISTS"
    assert await _names(h, spec.name) == ["s1"]


async def test_unknown_vm_and_unknown_snapshot(h: Harness) -> None:
    with pytest.raises(NotFound) as err:
        await h.hv.create_snapshot("no-such-vm", "s1", kind=INTERNAL)
    assert err.value.reason == "VM_NOT_FOUND"
    with pytest.raises(NotFound) as err:
        await h.hv.list_snapshots("no-such-vm")
    assert err.value.reason == "VM_NOT_FOUND"
    spec = h.spec()
    await h.hv.create(spec, start=False)
    with pytest.raises(NotFound) as err:
        await h.hv.revert_snapshot(spec.name, "nope", start=False)
    assert err.value.reason == "SNAPSHOT_NOT_FOUND"
    assert err.value.metadata.get("snapshot") == "nope"
    with pytest.raises(NotFound) as err:
        await h.hv.delete_snapshot(spec.name, "nope")
    assert err.value.reason == "SNAPSHOT_NOT_FOUND"
    with tempfile.TemporaryDirectory(dir=h.files.root) as work, pytest.raises(NotFound) as err:
        await h.hv.export_disks(spec.name, "nope", work)
    assert err.value.reason == "SNAPSHOT_NOT_FOUND"


async def test_memory_snapshot_of_a_vm_with_a_shared_folder_is_refused(h: Harness) -> None:
    spec = h.spec(shared_folders=(SharedFolder(h.files.share, "share0", read_only=True),))
    await h.hv.create(spec, start=True)
    with pytest.raises(FailedPrecondition) as err:
        await h.hv.create_snapshot(spec.name, "mem", kind=INTERNAL)
    assert err.value.reason == "SNAPSHOT_BLOCKED_BY_SHARED_FOLDER"
    assert "--disk-only" in err.value.message
    assert await _names(h, spec.name) == []
    # stopped, there is no memory to save: a disk snapshot is fine
    await h.hv.destroy(spec.name)
    await h.hv.create_snapshot(spec.name, "disk", kind=INTERNAL)


async def test_a_failure_after_the_snapshot_removes_it(h: Harness) -> None:
    spec = h.spec()
    await h.hv.create(spec, start=False)
    h.hv.faults.fail_on["snapshot:taken"] = Fault(Internal("injected"))
    log = MemoryStepLog()
    with pytest.raises(Internal):
        await h.hv.create_snapshot(spec.name, "s1", kind=INTERNAL, steps=log)
    assert await _names(h, spec.name) == []
    assert [s.name for s in log.steps()] == ["snapshot:s1"]
    assert log.steps()[0].state == StepState.UNDONE


# ---- revert -------------------------------------------------------------------------------------


async def test_revert_of_a_disk_snapshot_honours_start(h: Harness) -> None:
    spec = h.spec()
    await h.hv.create(spec, start=False)
    await h.hv.create_snapshot(spec.name, "s1", kind=INTERNAL)
    await h.hv.create_snapshot(spec.name, "s2", kind=INTERNAL)
    await h.hv.start(spec.name)
    await h.hv.revert_snapshot(spec.name, "s1", start=False)
    assert (await h.hv.get(spec.name)).state == VmState.STOPPED
    assert [s.name for s in await h.hv.list_snapshots(spec.name) if s.current] == ["s1"]
    await h.hv.revert_snapshot(spec.name, "s2", start=True)
    assert (await h.hv.get(spec.name)).state == VmState.RUNNING
    assert [s.name for s in await h.hv.list_snapshots(spec.name) if s.current] == ["s2"]
    # a snapshot taken now descends from the one reverted to
    await h.hv.revert_snapshot(spec.name, "s1", start=False)
    s3 = await h.hv.create_snapshot(spec.name, "s3", kind=INTERNAL)
    assert s3.parent == "s1"


async def test_revert_of_a_memory_snapshot_honours_start(h: Harness) -> None:
    spec = h.spec()
    await h.hv.create(spec, start=True)
    await h.hv.create_snapshot(spec.name, "live", kind=INTERNAL)
    await h.hv.revert_snapshot(spec.name, "live", start=False)
    assert (await h.hv.get(spec.name)).state == VmState.STOPPED
    await h.hv.revert_snapshot(spec.name, "live", start=True)
    assert (await h.hv.get(spec.name)).state == VmState.RUNNING
    await h.hv.revert_snapshot(spec.name, "live", start=True)
    assert (await h.hv.get(spec.name)).state == VmState.RUNNING


# ---- delete -------------------------------------------------------------------------------------


async def test_delete_one_moves_its_children_up_and_delete_children_takes_the_subtree(h: Harness) -> None:
    spec = h.spec()
    await h.hv.create(spec, start=False)
    for name in ("s1", "s2", "s3"):
        await h.hv.create_snapshot(spec.name, name, kind=INTERNAL)
    assert await h.hv.delete_snapshot(spec.name, "s2") == ["s2"]
    listed = await h.hv.list_snapshots(spec.name)
    assert [(s.name, s.parent) for s in listed] == [("s1", ""), ("s3", "s1")]
    assert await h.hv.delete_snapshot(spec.name, "s1", children=True) == ["s1", "s3"]
    assert await h.hv.list_snapshots(spec.name) == []


async def test_deleting_a_vm_deletes_its_snapshots(h: Harness) -> None:
    spec = h.spec()
    await h.hv.create(spec, start=True)
    await h.hv.create_snapshot(spec.name, "s1", kind=INTERNAL)
    await h.hv.delete(spec.name)
    with pytest.raises(NotFound):
        await h.hv.list_snapshots(spec.name)
    # the name is free again, without old snapshots
    await h.hv.create(replace(spec), start=False)
    assert await h.hv.list_snapshots(spec.name) == []


# ---- export and import --------------------------------------------------------------------------


@pytest.mark.requires(Capability.HOST_FILES)
async def test_export_writes_standalone_qcow2_files(h: Harness) -> None:
    spec = h.guest_spec()
    await h.hv.create(spec, start=False)
    await h.hv.create_snapshot(spec.name, "s1", kind=INTERNAL)
    with tempfile.TemporaryDirectory(dir=h.files.root) as work:
        images = await h.hv.export_disks(spec.name, "s1", work)
        assert [i.disk for i in images] == [d.name for d in spec.disks]
        for image in images:
            assert os.path.dirname(image.path) == work
            info = _image_info(image.path)
            assert info["format"] == "qcow2"
            assert "backing-filename" not in info
            assert info["virtual-size"] == image.virtual_size_bytes > 0
            assert image.image_bytes == os.stat(image.path).st_size


@pytest.mark.requires(Capability.HOST_FILES)
async def test_import_defines_a_stopped_vm_on_the_exported_disks(h: Harness) -> None:
    spec = h.guest_spec()
    await h.hv.create(spec, start=False)
    await h.hv.create_snapshot(spec.name, "s1", kind=INTERNAL)
    with tempfile.TemporaryDirectory(dir=h.files.root) as work:
        images = await h.hv.export_disks(spec.name, "s1", work)
        copy = replace(spec, name=h.name())
        log = MemoryStepLog()
        record = await h.hv.import_disks(copy, {i.disk: i.path for i in images}, steps=log)
        assert (record.name, record.state, record.spec) == (copy.name, VmState.STOPPED, copy)
        assert not _existing([i.path for i in images]), "the images are moved into the pool"
    assert {"define", *(f"disk:{d.name}" for d in spec.disks)} <= {s.name for s in log.steps()}
    assert (await h.hv.get(copy.name)).state == VmState.STOPPED
    assert await h.hv.list_snapshots(copy.name) == []
    inventory = (await h.hv.inventory()).for_vm(copy.name, h.hv.domain_name(copy.name))
    assert len(inventory.volumes) == len(spec.disks)
    with pytest.raises(AlreadyExists):
        await h.hv.import_disks(copy, {}, steps=None)


# ---- external (disk-only) snapshots ------------------------------------------------------------


@pytest.mark.requires(Capability.HOST_FILES)
async def test_external_snapshots_revert_and_delete(h: Harness) -> None:
    spec = h.spec()
    await h.hv.create(spec, start=False)
    e1 = await h.hv.create_snapshot(spec.name, "e1", kind=EXTERNAL)
    assert (e1.kind, e1.has_memory, e1.current) == (EXTERNAL, False, True)
    await h.hv.create_snapshot(spec.name, "e2", kind=EXTERNAL)
    await h.hv.revert_snapshot(spec.name, "e1", start=True)
    assert (await h.hv.get(spec.name)).state == VmState.RUNNING
    assert [(s.name, s.current) for s in await h.hv.list_snapshots(spec.name)] == [("e1", True), ("e2", False)]
    await h.hv.revert_snapshot(spec.name, "e2", start=False)
    assert (await h.hv.get(spec.name)).state == VmState.STOPPED
    assert await h.hv.delete_snapshot(spec.name, "e1", children=True) == ["e1", "e2"]
    assert await h.hv.list_snapshots(spec.name) == []
    await h.hv.start(spec.name)
    assert (await h.hv.get(spec.name)).state == VmState.RUNNING


async def test_a_vms_snapshots_are_all_one_kind(h: Harness) -> None:
    spec = h.spec()
    await h.hv.create(spec, start=False)
    await h.hv.create_snapshot(spec.name, "s1", kind=INTERNAL)
    with pytest.raises(FailedPrecondition) as err:
        await h.hv.create_snapshot(spec.name, "e1", kind=EXTERNAL)
    assert err.value.reason == "SNAPSHOT_KIND_CONFLICT" and "internal" in err.value.message
    assert await _names(h, spec.name) == ["s1"]


@pytest.mark.requires(Capability.HOST_FILES)
async def test_an_external_revert_is_stepped_and_a_failure_puts_everything_back(h: Harness) -> None:
    spec = h.spec()
    await h.hv.create(spec, start=True)
    await h.hv.create_snapshot(spec.name, "e1", kind=EXTERNAL)
    await h.hv.create_snapshot(spec.name, "e2", kind=EXTERNAL)
    volumes = (await h.hv.inventory()).volumes
    h.hv.faults.fail_on["revert:swapped"] = Fault(Internal("injected"))
    log = MemoryStepLog()
    with pytest.raises(Internal):
        await h.hv.revert_snapshot(spec.name, "e1", start=True, steps=log)
    # the disks, the current snapshot, the files and the running state are as they were
    assert (await h.hv.get(spec.name)).state == VmState.RUNNING
    assert [(s.name, s.current) for s in await h.hv.list_snapshots(spec.name)] == [("e1", False), ("e2", True)]
    assert (await h.hv.inventory()).volumes == volumes
    assert {"stop", "swap"} <= {s.name for s in log.steps()}
    assert all(s.state == StepState.UNDONE for s in log.steps())
    # without the fault it is done, and the commit point is its last step
    log = MemoryStepLog()
    await h.hv.revert_snapshot(spec.name, "e1", start=True, steps=log)
    assert log.steps()[-1].name == "retire" and all(s.state == StepState.DONE for s in log.steps())
    assert (await h.hv.get(spec.name)).state == VmState.RUNNING
    assert [(s.name, s.current) for s in await h.hv.list_snapshots(spec.name)] == [("e1", True), ("e2", False)]
    # one overlay replaced by another: the superseded one is gone, e2's frozen file stays
    assert len((await h.hv.inventory()).volumes) == len(volumes)


@pytest.mark.requires(Capability.HOST_FILES)
async def test_deleting_a_middle_external_snapshot_of_a_stopped_vm_rebases_its_children(h: Harness) -> None:
    # e1's frozen file has e2's frozen file above it (not the active one): the stopped-VM rebase path
    spec = h.spec()
    await h.hv.create(spec, start=False)
    await h.hv.create_snapshot(spec.name, "e1", kind=EXTERNAL)
    await h.hv.create_snapshot(spec.name, "e2", kind=EXTERNAL)
    volumes = (await h.hv.inventory()).volumes
    assert await h.hv.delete_snapshot(spec.name, "e1") == ["e1"]
    listed = await h.hv.list_snapshots(spec.name)
    assert [(s.name, s.parent) for s in listed] == [("e2", "")]
    # a delete makes nothing; on libvirt e1's frozen image went into e2's and is gone (the fake has no files)
    after = set((await h.hv.inventory()).volumes)
    assert after <= set(volumes)
    assert len(after) == len(volumes) - (1 if h.kind.startswith("libvirt") else 0)
    # and the rest still forms a chain that boots
    await h.hv.revert_snapshot(spec.name, "e2", start=True)
    assert (await h.hv.get(spec.name)).state == VmState.RUNNING
