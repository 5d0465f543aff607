"""The libvirt adapter's snapshots against a real tiny guest on qemu:///system: what a revert brings back.

A marker file on the guest's data disk (``/data``, ext4 on vda) is written and synced through qemu-ga,
snapshotted, changed, and read back after the revert. External snapshots are read after a cold boot, so
the guest's memory cannot hide a wrong disk.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import pytest

from clonebox_agent.adapters.libvirt import LibvirtHypervisor
from clonebox_core.errors import FailedPrecondition
from clonebox_core.model import DiskSpec, KernelBoot, NetworkMode, NetworkSpec, SharedFolder, VmSpec, VmState
from clonebox_core.snapshots import SnapshotKind
from tests.realfleet import GUEST, libvirt_reason

pytestmark = [pytest.mark.e2e, pytest.mark.libvirt]

#: QEMU (libvirt-qemu) must be able to traverse it: never under /root
RUN_ROOT = "/var/lib/clonebox"
MARKER = "/data/snapshot-marker"
#: qemu-ga of the TCG guest answers within ~20 s; a loaded machine needs more
AGENT_SECONDS = 180.0


@dataclass
class Env:
    hv: LibvirtHypervisor
    root: str
    share: str


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    why = libvirt_reason()
    if why:
        pytest.skip(why)
    os.makedirs(RUN_ROOT, mode=0o755, exist_ok=True)
    root = tempfile.mkdtemp(prefix="e2e-snap-", dir=RUN_ROOT)
    os.chmod(root, 0o755)  # mkdtemp's 0700 would lock QEMU out
    share = os.path.join(root, "share")
    os.makedirs(share, mode=0o755)
    tag = uuid.uuid4().hex[:6]
    hv = LibvirtHypervisor(
        "qemu:///system",
        os.path.join(root, "storage"),
        [str(GUEST)],
        shared_roots=[share],  # the daemon shares nothing outside the folders it is told about
        domain_type="qemu",
        owner=f"e2e-snap-{tag}",
        pool_name=f"clonebox-e2e-snap-{tag}",
    )
    await hv.open(lambda _ev: None)
    try:
        yield Env(hv, root, share)
    finally:
        try:
            for record in await hv.list():
                await hv.delete(record.name)
            await hv.remove_pool()
        finally:
            await hv.close()
            shutil.rmtree(root, ignore_errors=True)


def _spec(shared_folders: tuple[SharedFolder, ...] = ()) -> VmSpec:
    name = f"snap-{uuid.uuid4().hex[:6]}"
    spec = VmSpec(
        name=name,
        vcpus=1,
        memory_mib=128,
        disks=(DiskSpec("root", base_image=str(GUEST / "data.qcow2")),),
        kernel_boot=KernelBoot(
            kernel=str(GUEST / "vmlinux"),
            initrd=str(GUEST / "initrd.img"),
            cmdline=f"console=ttyS0 quiet clonebox.hostname={name}",
        ),
        network=NetworkSpec(mode=NetworkMode.NONE),
    )
    return replace(spec, shared_folders=shared_folders)


async def _until_data(hv: LibvirtHypervisor, vm: str) -> None:
    """Wait until qemu-ga answers and /init has mounted the data disk."""
    deadline = time.monotonic() + AGENT_SECONDS
    while time.monotonic() < deadline:
        try:
            if await hv.guest_file_exists(vm, "/run/data-settled"):
                return
        except FailedPrecondition:
            pass
        await asyncio.sleep(0.5)
    raise AssertionError(f"{vm}: qemu-ga and /data not ready within {AGENT_SECONDS:g} s")


async def _write(hv: LibvirtHypervisor, vm: str, text: str) -> None:
    result = await hv.guest_exec(vm, ["/bin/sh", "-c", f"echo {text} > {MARKER} && sync"])
    assert result.exit_code == 0, result


async def _read(hv: LibvirtHypervisor, vm: str) -> bytes | None:
    return await hv.guest_file_read(vm, MARKER, 256)


def _pool_file(env: Env, vm: str, disk: str = "root") -> str:
    return os.path.join(env.root, "storage", "pool", f"{env.hv.domain_name(vm)}.{disk}.qcow2")


async def _same_disk(a: str, b: str) -> str:
    """What ``qemu-img compare`` says when the two images' guest-visible contents differ ("" when equal)."""

    def run() -> str:
        # -U: the second image may be open in a running QEMU (as a frozen backing file)
        done = subprocess.run(["qemu-img", "compare", "-U", a, b], capture_output=True, text=True, check=False)
        return "" if done.returncode == 0 else done.stdout + done.stderr

    return await asyncio.to_thread(run)


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


async def test_internal_snapshot_with_memory_brings_the_disk_back_and_exports_it(env: Env) -> None:
    hv = env.hv
    spec = _spec()
    vm = spec.name
    await hv.create(spec, start=True)
    await _until_data(hv, vm)
    await _write(hv, vm, "one")
    snap = await hv.create_snapshot(vm, "s1", kind=SnapshotKind.INTERNAL)
    assert snap.has_memory and snap.vm_state == VmState.RUNNING
    await _write(hv, vm, "two")
    assert await _read(hv, vm) == b"two\n"

    await hv.revert_snapshot(vm, "s1", start=True)
    assert (await hv.get(vm)).state == VmState.RUNNING
    await _until_data(hv, vm)
    assert await _read(hv, vm) == b"one\n"

    # stopped at s1, the disk's current state is s1's: the export must equal it byte for byte
    await hv.revert_snapshot(vm, "s1", start=False)
    assert (await hv.get(vm)).state == VmState.STOPPED
    with tempfile.TemporaryDirectory(dir=env.root) as work:
        (image,) = await hv.export_disks(vm, "s1", work)
        assert await _same_disk(image.path, _pool_file(env, vm)) == ""
        # the import boots, and the guest sees the snapshot's data
        copy = _spec()
        await hv.import_disks(copy, {"root": image.path})
    await hv.start(copy.name)
    await _until_data(hv, copy.name)
    assert await _read(hv, copy.name) == b"one\n"


async def test_external_snapshot_revert_survives_a_cold_boot_and_delete_merges(env: Env) -> None:
    hv = env.hv
    base_digest = _sha256(str(GUEST / "data.qcow2"))
    spec = _spec()
    vm = spec.name
    await hv.create(spec, start=True)
    await _until_data(hv, vm)
    await _write(hv, vm, "one")
    snap = await hv.create_snapshot(vm, "e1", kind=SnapshotKind.EXTERNAL, quiesce=True)
    assert (snap.kind, snap.has_memory) == (SnapshotKind.EXTERNAL, False)
    await _write(hv, vm, "two")

    await hv.revert_snapshot(vm, "e1", start=True)
    await hv.destroy(vm)
    await hv.start(vm)
    await _until_data(hv, vm)
    assert await _read(hv, vm) == b"one\n"

    # the frozen file is the disk at e1: the export equals it
    with tempfile.TemporaryDirectory(dir=env.root) as work:
        (image,) = await hv.export_disks(vm, "e1", work)
        assert await _same_disk(image.path, _pool_file(env, vm)) == ""

    # deleting the snapshot of a running VM commits the overlay down: the newest data stays
    await _write(hv, vm, "three")
    assert await hv.delete_snapshot(vm, "e1") == ["e1"]
    assert await hv.list_snapshots(vm) == []
    await hv.destroy(vm)
    await hv.start(vm)
    await _until_data(hv, vm)
    assert await _read(hv, vm) == b"three\n"
    pool = os.path.join(env.root, "storage", "pool")
    assert sorted(os.listdir(pool)) == [f"{hv.domain_name(vm)}.root.qcow2"], "merged overlays are removed"
    assert _sha256(str(GUEST / "data.qcow2")) == base_digest, "the shared base image was written"


async def test_a_vm_with_a_9p_share_takes_disk_only_snapshots(env: Env) -> None:
    hv = env.hv
    spec = _spec(shared_folders=(SharedFolder(env.share, "share0"),))
    vm = spec.name
    await hv.create(spec, start=True)
    await _until_data(hv, vm)
    with pytest.raises(FailedPrecondition) as err:
        await hv.create_snapshot(vm, "mem", kind=SnapshotKind.INTERNAL)
    assert err.value.reason == "SNAPSHOT_BLOCKED_BY_SHARED_FOLDER"
    assert "--disk-only --quiesce" in err.value.message
    await _write(hv, vm, "one")
    await hv.create_snapshot(vm, "disk", kind=SnapshotKind.EXTERNAL, quiesce=True)
    await _write(hv, vm, "two")
    await hv.revert_snapshot(vm, "disk", start=True)
    await _until_data(hv, vm)
    assert await _read(hv, vm) == b"one\n"
