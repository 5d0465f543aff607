"""Agent volumes on every adapter: disks that outlive the VMs attaching them (``DiskSpec.volume``).

The same checks run on the fake, libvirt's test driver and real QEMU: create/list/delete, idempotent
create, attach and detach with the VM, single-writer and shared volumes, refusals (in use, not found,
internal snapshots), disk-only snapshots, exports and imports that leave the volumes out, a restart of
the adapter, and a half-made volume. What a domain really attaches is read from libvirt itself (its XML
through a connection of the test's own), not from the kept spec. On real QEMU the data test writes
bytes into the volume on the host (``qemu-io``, while no VM runs) and reads them back after two VMs
attached it and were deleted.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import libvirt
import pytest

from clonebox_agent.adapters.common import Fault, file_identity
from clonebox_agent.adapters.fake import FakeHypervisor
from clonebox_agent.adapters.libvirt import LibvirtHypervisor
from clonebox_agent.ports import Capability
from clonebox_core.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from clonebox_core.model import DiskSpec, VmSpec, VmState
from clonebox_core.snapshots import SnapshotKind

if TYPE_CHECKING:
    from conftest import Harness

MIB = 1024 * 1024


def _with_volume(h: Harness, volume: str, **overrides: Any) -> VmSpec:
    """A small VM whose second disk is agent volume ``volume``."""
    return h.spec(disks=(DiskSpec("root", size_mib=16), DiskSpec("data", volume=volume)), **overrides)


def _domain_xml(h: Harness, vm: str) -> ET.Element | None:
    """The VM's live domain XML as libvirt has it (None on the fake)."""
    if h.kind == "fake":
        return None
    uri = "test:///default" if h.kind == "libvirt-test" else "qemu:///system"
    conn = libvirt.open(uri)  # the test driver shares its state with the adapter's open connection
    try:
        return ET.fromstring(conn.lookupByName(h.hv.domain_name(vm)).XMLDesc(0))
    finally:
        conn.close()


def _volume_disk(root: ET.Element, serial: str) -> ET.Element:
    found = [d for d in root.findall("./devices/disk") if d.findtext("serial") == serial]
    assert len(found) == 1, ET.tostring(root, encoding="unicode")
    return found[0]


def _disk_source(root: ET.Element, target: str) -> str:
    """The source file of the domain's disk on ``target`` ("" when it has none)."""
    for disk in root.findall("./devices/disk"):
        t, src = disk.find("target"), disk.find("source")
        if t is not None and t.get("dev") == target:
            return src.get("file", "") if src is not None else ""
    raise AssertionError(f"no disk on {target}: {ET.tostring(root, encoding='unicode')}")


async def _volume_path(h: Harness, name: str) -> str | None:
    """The pool file of volume ``name`` (None without one)."""
    if isinstance(h.hv, FakeHypervisor):
        return h.hv.agent_volume_path(name)
    inventory = await h.hv.inventory()
    files = [v for v in inventory.volumes if v.startswith(f"vol.{name}.")]
    return os.path.join(h.storage_dir, "pool", files[0]) if files else None


async def _cleanup_volumes(h: Harness) -> None:
    for record in await h.hv.list():
        await h.hv.delete(record.name)
    for volume in await h.hv.list_volumes():
        await h.hv.delete_volume(volume.name)


# ---- create, list, delete ----------------------------------------------------------------------------


async def test_create_list_delete(h: Harness) -> None:
    made = await h.hv.create_volume("data", 8, labels={"app": "db"})
    assert (made.name, made.size_mib, made.shared, made.labels, made.vms) == ("data", 8, False, (("app", "db"),), ())
    assert made.create_time is not None
    shared = await h.hv.create_volume("scratch", 4, shared=True)
    listed = await h.hv.list_volumes()
    assert [(v.name, v.size_mib, v.shared) for v in listed] == [("data", 8, False), ("scratch", 4, True)]
    assert listed[1] == shared
    # a volume is never a VM's leftover
    assert await h.hv.orphans() == {}
    removed = await h.hv.delete_volume("data")
    assert any(p.endswith("data.json") for p in removed)
    assert [v.name for v in await h.hv.list_volumes()] == ["scratch"]
    with pytest.raises(NotFound) as err:
        await h.hv.delete_volume("data")
    assert err.value.reason == "VOLUME_NOT_FOUND"
    await h.hv.delete_volume("scratch")
    assert (await h.hv.inventory()).is_empty()


@pytest.mark.requires(Capability.HOST_FILES)
async def test_files_are_qcow2_or_raw_of_the_size(h: Harness) -> None:
    await h.hv.create_volume("one", 8)
    await h.hv.create_volume("many", 4, shared=True)
    try:
        one, many = await _volume_path(h, "one"), await _volume_path(h, "many")
        assert one is not None and one.endswith("vol.one.qcow2")
        assert many is not None and many.endswith("vol.many.raw")
        if h.real:
            info = _qemu_img_info(one)
            assert '"format": "qcow2"' in info.stdout and f'"virtual-size": {8 * MIB}' in info.stdout
            assert os.stat(many).st_size == 4 * MIB
    finally:
        await _cleanup_volumes(h)


async def test_create_is_idempotent_and_refuses_a_different_volume(h: Harness) -> None:
    first = await h.hv.create_volume("data", 8, labels={"a": "1"})
    again = await h.hv.create_volume("data", 8, labels={"b": "2"})
    assert (again.create_time, again.labels) == (first.create_time, (("b", "2"),))
    path = await _volume_path(h, "data")
    for kwargs, field in (({"size_mib": 16}, "size_mib"), ({"shared": True}, "shared")):
        args = {"size_mib": 8, **kwargs}
        with pytest.raises(FailedPrecondition) as err:
            await h.hv.create_volume("data", args.pop("size_mib"), **args)
        assert err.value.reason == "VOLUME_EXISTS_DIFFERENT"
        assert err.value.metadata["field"] == field
    assert [(v.size_mib, v.shared, v.labels) for v in await h.hv.list_volumes()] == [(8, False, (("b", "2"),))]
    assert await _volume_path(h, "data") == path
    await h.hv.delete_volume("data")


@pytest.mark.requires(Capability.HOST_FILES)
async def test_a_volume_larger_than_the_pool_is_refused(h: Harness) -> None:
    with pytest.raises(FailedPrecondition) as err:
        await h.hv.create_volume("huge", 64 * 1024 * 1024)  # 64 TiB: the validation's maximum
    assert (err.value.reason, err.value.metadata["volume"]) == ("POOL_FULL", "huge")
    assert (await h.hv.inventory()).is_empty()


@pytest.mark.parametrize(
    ("name", "size", "field"),
    [("data", 0, "size_mib"), ("Data_1", 8, "name"), ("", 8, "name"), ("../x", 8, "name")],
)
async def test_bad_arguments_name_the_field(h: Harness, name: str, size: int, field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        await h.hv.create_volume(name, size)
    assert err.value.metadata["field"] == field
    assert await h.hv.list_volumes() == []
    assert (await h.hv.inventory()).is_empty()


# ---- attaching -------------------------------------------------------------------------------------


async def test_a_volume_outlives_the_vm_and_attaches_to_the_next(h: Harness) -> None:
    await h.hv.create_volume("data", 8)
    path = await _volume_path(h, "data")
    before = file_identity(path) if path and Capability.HOST_FILES in h.capabilities else None
    spec = _with_volume(h, "data")
    record = await h.hv.create(spec, start=False)
    assert record.spec == spec
    assert [v.vms for v in await h.hv.list_volumes()] == [(spec.name,)]
    root = _domain_xml(h, spec.name)
    if root is not None:
        disk = _volume_disk(root, "vol-data")
        assert disk.find("source").get("file") == path  # type: ignore[union-attr]
        assert disk.find("driver").get("type") == "qcow2"  # type: ignore[union-attr]
        assert disk.find("shareable") is None
    removed = await h.hv.delete(spec.name)
    assert path not in removed
    [kept] = await h.hv.list_volumes()
    assert (kept.name, kept.vms) == ("data", ())
    assert await _volume_path(h, "data") == path
    if before is not None:
        assert file_identity(path) == before  # the same file, untouched  # type: ignore[arg-type]
    assert await h.hv.orphans() == {}
    nxt = _with_volume(h, "data")
    await h.hv.create(nxt, start=False)
    assert [v.vms for v in await h.hv.list_volumes()] == [(nxt.name,)]
    await _cleanup_volumes(h)


async def test_attaching_a_missing_volume_is_not_found_and_makes_nothing(h: Harness) -> None:
    before = await h.hv.inventory()
    spec = _with_volume(h, "nope")
    with pytest.raises(NotFound) as err:
        await h.hv.create(spec, start=False)
    assert err.value.reason == "VOLUME_NOT_FOUND"
    assert err.value.metadata["field"] == "spec.disks[1].volume"
    with pytest.raises(NotFound):
        await h.hv.plan_create(spec, start=False)
    assert await h.hv.inventory() == before
    assert await h.hv.list() == []


async def test_a_volume_gone_before_the_define_rolls_the_create_back(h: Harness) -> None:
    """The attach is checked again right before the define: a create that lost its volume undoes its steps."""
    await h.hv.create_volume("data", 8)
    spec = _with_volume(h, "data")
    store = h.hv._volume_store if isinstance(h.hv, FakeHypervisor) else h.hv.volume_store

    def hook(step: str) -> None:
        if step == "create:network":
            store.remove("data")  # what a DeleteVolume between the first check and the define does first

    h.hv.faults.hook = hook
    with pytest.raises(NotFound) as err:
        await h.hv.create(spec, start=False)
    h.hv.faults.hook = None
    assert (err.value.reason, err.value.metadata["field"]) == ("VOLUME_NOT_FOUND", "spec.disks[1].volume")
    assert await h.hv.list() == []
    # what is left is the volume's file without metadata: a delete removes it
    with pytest.raises(NotFound):
        await h.hv.delete_volume("data")
    assert (await h.hv.inventory()).is_empty()


async def test_a_single_writer_volume_is_in_use_by_its_vm(h: Harness) -> None:
    await h.hv.create_volume("data", 8)
    first = _with_volume(h, "data")
    await h.hv.create(first, start=False)
    before = await h.hv.inventory()
    second = _with_volume(h, "data")
    with pytest.raises(FailedPrecondition) as err:
        await h.hv.create(second, start=False)
    assert err.value.reason == "VOLUME_IN_USE"
    assert err.value.metadata["vms"] == first.name
    assert first.name in err.value.message
    with pytest.raises(FailedPrecondition):
        await h.hv.plan_create(second, start=False)
    assert await h.hv.inventory() == before
    await _cleanup_volumes(h)


async def test_concurrent_creates_attach_a_single_writer_volume_once(h: Harness) -> None:
    await h.hv.create_volume("data", 8)
    specs = [_with_volume(h, "data") for _ in range(3)]
    results = await asyncio.gather(*(h.hv.create(s, start=False) for s in specs), return_exceptions=True)
    won = [s.name for s, r in zip(specs, results, strict=True) if not isinstance(r, BaseException)]
    lost = [r for r in results if isinstance(r, BaseException)]
    assert len(won) == 1, results
    assert all(isinstance(r, FailedPrecondition) and r.reason == "VOLUME_IN_USE" for r in lost), lost
    assert [r.name for r in await h.hv.list()] == won
    assert [v.vms for v in await h.hv.list_volumes()] == [tuple(won)]
    # the losers left nothing behind (their steps were rolled back)
    assert await h.hv.orphans() == {}
    await _cleanup_volumes(h)


async def test_a_create_racing_a_volume_delete_ends_one_way_or_the_other(h: Harness) -> None:
    await h.hv.create_volume("data", 8)
    spec = _with_volume(h, "data")
    made, deleted = await asyncio.gather(
        h.hv.create(spec, start=False), h.hv.delete_volume("data"), return_exceptions=True
    )
    if isinstance(made, BaseException):
        # the delete won: the create found no volume and undid its steps
        assert isinstance(made, NotFound) and made.reason == "VOLUME_NOT_FOUND", made
        assert not isinstance(deleted, BaseException)
        assert await h.hv.list() == [] and await h.hv.list_volumes() == []
    else:
        # the create won: the delete was refused, the volume is attached
        assert isinstance(deleted, FailedPrecondition) and deleted.reason == "VOLUME_IN_USE", deleted
        assert [v.vms for v in await h.hv.list_volumes()] == [(spec.name,)]
    await _cleanup_volumes(h)
    assert (await h.hv.inventory()).is_empty()


async def test_a_shared_volume_attaches_to_several_vms(h: Harness) -> None:
    await h.hv.create_volume("shared", 4, shared=True)
    a, b = _with_volume(h, "shared"), _with_volume(h, "shared")
    # on real QEMU both guests run at once: QEMU takes a shared raw file without host cache from both
    await h.hv.create(a, start=True)
    await h.hv.create(b, start=True)
    assert (await h.hv.get(b.name)).state == VmState.RUNNING
    assert [v.vms for v in await h.hv.list_volumes()] == [tuple(sorted((a.name, b.name)))]
    path = await _volume_path(h, "shared")
    for vm in (a.name, b.name):
        root = _domain_xml(h, vm)
        if root is not None:
            disk = _volume_disk(root, "vol-shared")
            assert disk.find("shareable") is not None
            driver = disk.find("driver")
            assert driver is not None and (driver.get("type"), driver.get("cache")) == ("raw", "none")
            assert disk.find("source").get("file") == path  # type: ignore[union-attr]
    with pytest.raises(FailedPrecondition) as err:
        await h.hv.delete_volume("shared")
    assert err.value.reason == "VOLUME_IN_USE"
    assert err.value.metadata["vms"] == ", ".join(sorted((a.name, b.name)))
    await h.hv.delete(a.name)
    with pytest.raises(FailedPrecondition):
        await h.hv.delete_volume("shared")
    await h.hv.delete(b.name)
    await h.hv.delete_volume("shared")
    assert (await h.hv.inventory()).is_empty()


async def test_delete_volume_is_refused_while_a_stopped_vm_attaches_it(h: Harness) -> None:
    await h.hv.create_volume("data", 8)
    spec = _with_volume(h, "data")
    await h.hv.create(spec, start=False)
    with pytest.raises(FailedPrecondition) as err:
        await h.hv.delete_volume("data")
    assert (err.value.reason, err.value.metadata["vms"]) == ("VOLUME_IN_USE", spec.name)
    assert [v.name for v in await h.hv.list_volumes()] == ["data"]
    await _cleanup_volumes(h)


async def test_plan_create_shows_the_volume_and_makes_nothing(h: Harness) -> None:
    await h.hv.create_volume("data", 8)
    before = await h.hv.inventory()
    spec = _with_volume(h, "data")
    plan = await h.hv.plan_create(spec, start=True)
    assert any(s.startswith("disk:data: attach volume data") for s in plan.steps)
    if h.kind != "fake":
        disk = _volume_disk(ET.fromstring(plan.domain_xml), "vol-data")
        assert disk.find("driver").get("type") == "qcow2"  # type: ignore[union-attr]
    assert await h.hv.inventory() == before
    await h.hv.delete_volume("data")


async def test_update_keeps_the_volume_attached(h: Harness) -> None:
    await h.hv.create_volume("data", 8)
    spec = _with_volume(h, "data")
    await h.hv.create(spec, start=False)
    updated = await h.hv.update(spec.name, replace(spec, memory_mib=96, labels=(("x", "y"),)))
    assert updated.spec.disks == spec.disks
    assert updated.spec.memory_mib == 96
    root = _domain_xml(h, spec.name)
    if root is not None:
        _volume_disk(root, "vol-data")
        assert root.findtext("memory") == str(96 * 1024)
    assert [v.vms for v in await h.hv.list_volumes()] == [(spec.name,)]
    await _cleanup_volumes(h)


# ---- snapshots and exports hold a VM's own disks only -------------------------------------------------


async def test_snapshots_exports_and_imports_of_a_vm_with_volumes_leave_the_volumes_out(
    h: Harness, tmp_path: Any
) -> None:
    await h.hv.create_volume("data", 8)
    spec = _with_volume(h, "data")
    # running: the snapshot switches a live disk onto an overlay and leaves the live volume disk alone
    await h.hv.create(spec, start=True)
    volume_file = await _volume_path(h, "data")
    # QEMU would save an internal snapshot into the volume too
    with pytest.raises(FailedPrecondition) as err:
        await h.hv.create_snapshot(spec.name, "s1", kind=SnapshotKind.INTERNAL)
    assert err.value.reason == "VM_HAS_VOLUMES"
    assert "data" in err.value.message and "--disk-only" in err.value.message
    assert await h.hv.list_snapshots(spec.name) == []
    if Capability.HOST_FILES not in h.capabilities:
        # libvirt's test driver: disk-only snapshots (and so exports and imports) need the hypervisor's files
        with pytest.raises(FailedPrecondition) as unsupported:
            await h.hv.create_snapshot(spec.name, "s1", kind=SnapshotKind.EXTERNAL)
        assert unsupported.value.reason == "HYPERVISOR_UNSUPPORTED"
        assert await h.hv.list_snapshots(spec.name) == []
        await _cleanup_volumes(h)
        return

    before = _domain_xml(h, spec.name)
    await h.hv.create_snapshot(spec.name, "s1", kind=SnapshotKind.EXTERNAL)
    after = _domain_xml(h, spec.name)
    if before is not None and after is not None:
        # the VM's own disk moved onto an overlay; the volume disk still writes to the volume's file
        assert _disk_source(after, "vda") != _disk_source(before, "vda")
        assert _disk_source(after, "vdb") == _disk_source(before, "vdb") == volume_file
    # a revert returns the VM's own disk and leaves the volume attached as it is
    await h.hv.revert_snapshot(spec.name, "s1", start=True)
    reverted = _domain_xml(h, spec.name)
    if reverted is not None:
        assert _disk_source(reverted, "vdb") == volume_file
    assert (await h.hv.get(spec.name)).spec.disks == spec.disks
    out = tmp_path / "out"
    out.mkdir()
    images = await h.hv.export_disks(spec.name, "s1", str(out))
    assert [i.disk for i in images] == ["root"]
    assert sorted(p.name for p in out.iterdir()) == ["root.qcow2"]
    await h.hv.delete_snapshot(spec.name, "s1")
    await h.hv.delete(spec.name)  # keeps the volume
    assert await _volume_path(h, "data") == volume_file

    # an import attaches the volumes the spec names: a missing one is refused before any file moves
    missing = replace(spec, disks=(spec.disks[0], DiskSpec("data", volume="nope")))
    with pytest.raises(NotFound) as gone:
        await h.hv.import_disks(missing, {"root": images[0].path})
    assert gone.value.reason == "VOLUME_NOT_FOUND" and gone.value.metadata["field"] == "spec.disks[1].volume"
    assert sorted(p.name for p in out.iterdir()) == ["root.qcow2"] and await h.hv.list() == []
    # images of the volume's disk are not the VM's: named, they are refused
    with pytest.raises(InvalidArgument) as extra:
        await h.hv.import_disks(spec, {"root": images[0].path, "data": images[0].path})
    assert "own disks" in extra.value.message

    made = await h.hv.import_disks(spec, {"root": images[0].path})
    assert made.spec.disks == spec.disks and made.state is VmState.STOPPED
    root = _domain_xml(h, spec.name)
    if root is not None:
        assert _volume_disk(root, "vol-data") is not None and _disk_source(root, "vdb") == volume_file
    assert [v.vms for v in await h.hv.list_volumes()] == [(spec.name,)]
    await _cleanup_volumes(h)


# ---- restarts and crashes ------------------------------------------------------------------------------


def _same_adapter_again(h: Harness) -> Any:
    """A second adapter on the same storage, owner and pool: what the agent has after a restart."""
    hv = h.hv
    if isinstance(hv, FakeHypervisor):
        return FakeHypervisor(storage_dir=h.storage_dir, image_dirs=hv.image_dirs)
    assert isinstance(hv, LibvirtHypervisor)
    return LibvirtHypervisor(
        hv.uri, h.storage_dir, hv.image_dirs, owner=hv.owner, pool_name=hv.pool_name, domain_type="qemu"
    )


async def test_volumes_survive_a_restart(h: Harness) -> None:
    made = await h.hv.create_volume("data", 8, shared=True, labels={"k": "v"})
    spec = _with_volume(h, "data")
    await h.hv.create(spec, start=False)
    again = _same_adapter_again(h)
    await again.open(lambda _ev: None)
    try:
        listed = await again.list_volumes()
        if isinstance(again, FakeHypervisor):
            # the fake keeps its domains in memory: a new one knows no VM, its volumes come from disk
            assert listed == [replace(made, vms=())]
        else:
            assert listed == [replace(made, vms=(spec.name,))]
        assert (await again.create_volume("data", 8, shared=True, labels={"k": "v"})).create_time == made.create_time
    finally:
        await again.close()
    await _cleanup_volumes(h)


async def test_a_half_made_volume_is_invisible_and_replaced(h: Harness) -> None:
    h.hv.faults.fail_on["create_volume:file"] = Fault(Unavailable("cut short", reason="TEST"))
    with pytest.raises(Unavailable):
        await h.hv.create_volume("data", 8)
    # the file is there, its metadata is not: no volume
    inventory = await h.hv.inventory()
    assert [v for v in inventory.volumes if v.startswith("vol.data.")] == ["vol.data.qcow2"]
    assert inventory.agent_volumes == ()
    assert await h.hv.list_volumes() == []
    assert await h.hv.orphans() == {}
    with pytest.raises(NotFound):
        await h.hv.create(_with_volume(h, "data"), start=False)
    # a retry (here as shared: the leftover's format does not matter) replaces it
    made = await h.hv.create_volume("data", 4, shared=True)
    assert (made.size_mib, made.shared) == (4, True)
    assert [v for v in (await h.hv.inventory()).volumes if v.startswith("vol.data.")] == ["vol.data.raw"]
    await h.hv.delete_volume("data")
    # a delete of a half-made volume removes its file and answers NOT_FOUND (done)
    h.hv.faults.fail_on["create_volume:file"] = Fault(Unavailable("cut short", reason="TEST"))
    with pytest.raises(Unavailable):
        await h.hv.create_volume("data", 8)
    with pytest.raises(NotFound) as err:
        await h.hv.delete_volume("data")
    assert err.value.reason == "VOLUME_NOT_FOUND"
    assert (await h.hv.inventory()).is_empty()


# ---- real data (real QEMU) -----------------------------------------------------------------------------


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _qemu_img_info(path: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", "info", "--output=json", path], capture_output=True, text=True, check=True)


def _qemu_io(path: str, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", command, path], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.requires(Capability.HOST_FILES)
async def test_data_written_to_a_volume_survives_its_vms(h: Harness) -> None:
    """Bytes in the volume stay through two VMs that attached it (real QEMU: written with qemu-io, no VM running)."""
    await h.hv.create_volume("data", 8)
    path = await _volume_path(h, "data")
    assert path is not None
    if h.real:
        written = _qemu_io(path, "write -P 0x5a 64k 64k")
        assert written.returncode == 0, written.stderr
    before = _read(path)
    first = _with_volume(h, "data")
    await h.hv.create(first, start=True)  # QEMU opens the file (and relabels it) while the guest runs
    assert (await h.hv.get(first.name)).state == VmState.RUNNING
    await h.hv.delete(first.name)
    second = _with_volume(h, "data")
    await h.hv.create(second, start=True)
    await h.hv.delete(second.name)
    if h.real:
        read = _qemu_io(path, "read -P 0x5a 64k 64k")
        assert read.returncode == 0 and "verification failed" not in read.stdout, read.stdout + read.stderr
    else:
        assert _read(path) == before
    await h.hv.delete_volume("data")


async def _guest(h: Harness, vm: str, script: str) -> str:
    result = await h.hv.guest_exec(vm, ["/bin/sh", "-c", script], timeout=30)
    assert result.exit_code == 0, result.stderr.decode(errors="replace")
    return result.stdout.decode(errors="replace").strip()


async def _guest_up(h: Harness, vm: str) -> bool:
    try:
        await h.hv.guest_ping(vm)
    except FailedPrecondition:
        return False
    return True


@pytest.mark.requires(Capability.GUEST_AGENT)
async def test_a_guest_finds_the_volume_by_serial_and_its_data_reaches_the_next_guest(h: Harness) -> None:
    """Written inside one guest (real QEMU: the test guest's busybox through qemu-ga), read inside the next."""
    await h.hv.create_volume("data", 8)
    first = h.guest_spec()
    first = replace(first, disks=(*first.disks, DiskSpec("vol", volume="data")))
    await h.hv.create(first, start=True)
    if not h.real:
        # the fake has no guest block devices: what it shows is the attachment, kept across VMs
        await h.hv.delete(first.name)
        second = replace(h.guest_spec(), disks=first.disks)
        await h.hv.create(second, start=True)
        assert [v.vms for v in await h.hv.list_volumes()] == [(second.name,)]
        await _cleanup_volumes(h)
        return
    await h.wait_until(lambda: _guest_up(h, first.name), 120, "qemu-ga of the first guest")
    # the root disk is vda, the volume vdb; the guest sees its serial (by-id links need udev, which it lacks)
    assert await _guest(h, first.name, "cat /sys/block/vdb/serial") == "vol-data"
    await _guest(h, first.name, "printf volume-kept-42 | dd of=/dev/vdb bs=512 conv=sync 2>/dev/null && sync")
    await h.hv.delete(first.name)
    second = replace(h.guest_spec(), disks=first.disks)
    await h.hv.create(second, start=True)
    await h.wait_until(lambda: _guest_up(h, second.name), 120, "qemu-ga of the second guest")
    assert await _guest(h, second.name, "dd if=/dev/vdb bs=512 count=1 2>/dev/null | head -c 14") == "volume-kept-42"
    await _cleanup_volumes(h)
