"""The Hypervisor contract: one suite, run against the fake, libvirt's test driver and real QEMU.

Each test gets ``h`` (see conftest): a fresh, opened adapter with its own storage and names, and a
teardown that fails the test if anything the adapter owns is left behind.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import replace
from typing import TYPE_CHECKING

import pytest

from clonebox_agent.adapters.common import CREATE_STEPS, OWNER_XATTR, Fault, owner_of
from clonebox_agent.adapters.seediso import read_seed_iso
from clonebox_agent.ports import Capability, DomainStats, EventKind
from clonebox_core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from clonebox_core.model import (
    CloudInit,
    DiskSpec,
    KernelBoot,
    NetworkMode,
    NetworkSpec,
    SharedFolder,
    VmSpec,
    VmState,
)

if TYPE_CHECKING:
    from conftest import Harness


def _owned_paths(root: str, vm: str) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for entry in [*dirnames, *filenames]:
            path = os.path.join(dirpath, entry)
            if owner_of(path) == vm:
                found.append(path)
    return found


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _full_spec(h: Harness) -> VmSpec:
    """A spec using every feature: overlays on qcow2 and raw bases, a blank disk, seed, share, labels."""
    return h.spec(
        disks=(
            DiskSpec("root", base_image="base.qcow2"),
            DiskSpec("raw", base_image=os.path.join(h.files.images, "base.raw"), size_mib=8),
            DiskSpec("data", size_mib=16),
        ),
        network=NetworkSpec(mode=NetworkMode.LIBVIRT, libvirt_network="default"),
        shared_folders=(SharedFolder(h.files.share, "share0", read_only=True),),
        cloud_init=CloudInit(user_data="#cloud-config\nruncmd: [echo hi]\n", network_config="version: 2\n"),
        labels=(("app", "web"), ("tier", "front")),
    )


# ---- create, get, list --------------------------------------------------------------------------


async def test_create_get_list(h: Harness) -> None:
    spec = h.spec()
    created = await h.hv.create(spec, start=False)
    assert created.name == spec.name
    assert created.state == VmState.STOPPED
    assert created.spec == spec
    assert created.uuid
    got = await h.hv.get(spec.name)
    assert (got.name, got.uuid, got.state, got.spec) == (created.name, created.uuid, created.state, spec)
    listed = await h.hv.list()
    # only what this adapter owns: the test driver's own "test" domain and other runs are not listed
    assert [r.name for r in listed] == [spec.name]
    assert listed[0].spec == spec


async def test_create_started_is_running(h: Harness) -> None:
    spec = h.spec()
    record = await h.hv.create(spec, start=True)
    assert record.state == VmState.RUNNING
    assert (await h.hv.get(spec.name)).state == VmState.RUNNING
    assert record.create_time is not None


async def test_full_spec_round_trips(h: Harness) -> None:
    spec = _full_spec(h)
    if not h.real:
        spec = replace(spec, kernel_boot=KernelBoot(kernel="vmlinuz", cmdline="console=ttyS0 a=<&>'\""))
    record = await h.hv.create(spec, start=True)
    assert record.state == VmState.RUNNING
    assert record.spec == spec
    assert (await h.hv.get(spec.name)).spec == spec
    assert (await h.hv.list())[0].spec == spec


async def test_create_twice_already_exists(h: Harness) -> None:
    spec = h.spec()
    first = await h.hv.create(spec, start=False)
    before = await h.hv.inventory()
    with pytest.raises(AlreadyExists) as err:
        await h.hv.create(replace(spec, memory_mib=96), start=True)
    assert err.value.reason == "VM_ALREADY_EXISTS"
    assert await h.hv.inventory() == before
    again = await h.hv.get(spec.name)
    assert (again.uuid, again.spec, again.state) == (first.uuid, spec, VmState.STOPPED)


@pytest.mark.parametrize(
    "method",
    ["get", "start", "shutdown", "destroy", "delete", "addresses", "guest_ping", "guest_filesystems", "probe_targets"],
)
async def test_unknown_vm_not_found(h: Harness, method: str) -> None:
    with pytest.raises(NotFound) as err:
        await getattr(h.hv, method)("no-such-vm")
    assert err.value.reason == "VM_NOT_FOUND"


# ---- lifecycle ----------------------------------------------------------------------------------


async def test_start_stop_destroy(h: Harness) -> None:
    spec = h.spec()
    await h.hv.create(spec, start=False)
    assert (await h.hv.start(spec.name)).state == VmState.RUNNING
    # a running domain is left alone
    assert (await h.hv.start(spec.name)).state == VmState.RUNNING
    await h.hv.destroy(spec.name)
    assert (await h.hv.get(spec.name)).state == VmState.STOPPED
    # a stopped one too
    await h.hv.destroy(spec.name)
    await h.hv.shutdown(spec.name)
    assert (await h.hv.get(spec.name)).state == VmState.STOPPED
    assert (await h.hv.start(spec.name)).state == VmState.RUNNING


async def test_shutdown_request_returns_without_waiting(h: Harness) -> None:
    spec = h.spec()
    await h.hv.create(spec, start=True)
    started = time.monotonic()
    # on real QEMU this guest (SeaBIOS, no qemu-ga) cannot honour it: the request still returns at once
    await h.hv.shutdown(spec.name)
    assert time.monotonic() - started < 5


@pytest.mark.requires(Capability.GUEST_AGENT, Capability.ACPI_SHUTDOWN)
async def test_guest_answers_then_honours_shutdown(h: Harness) -> None:
    """One boot of a real guest (on QEMU: the test guest kit) for both guest-side features."""
    spec = h.guest_spec(network=NetworkSpec(mode=NetworkMode.LIBVIRT, libvirt_network="default"))
    await h.hv.create(spec, start=True)

    async def agent_addresses() -> tuple[object, ...]:
        found = await h.hv.addresses(spec.name)
        return tuple(a for a in found if a.source == "agent")

    # any address qemu-ga reports will do (IPv6 link-local comes before the DHCP lease)
    found = await h.wait_until(agent_addresses, 120 if h.real else 5, "an address from the guest agent")
    for addr in found:
        assert not addr.address.startswith("127.") and addr.address != "::1"
        assert addr.interface != "lo"
    if h.real:
        # shutdown presses before the guest's acpid runs are lost, as on real hardware
        await h.wait_until(lambda: h.console_says(spec.name, b"READY"), 90, "guest READY")
    await h.hv.shutdown(spec.name)
    ev = await h.wait_event(spec.name, EventKind.STOPPED, within=60)
    assert ev.state == VmState.STOPPED
    assert (await h.hv.get(spec.name)).state == VmState.STOPPED
    assert await h.hv.addresses(spec.name) == ()


async def test_guest_calls_on_a_stopped_vm_fail_and_it_has_no_probe_targets(h: Harness) -> None:
    spec = h.spec(network=NetworkSpec(mode=NetworkMode.LIBVIRT, libvirt_network="default"))
    await h.hv.create(spec, start=False)
    for call in (
        h.hv.guest_ping(spec.name),
        h.hv.guest_file_read(spec.name, "/etc/hostname", 64),
        h.hv.guest_filesystems(spec.name),
    ):
        with pytest.raises(FailedPrecondition) as err:
            await call
        assert err.value.reason == "GUEST_AGENT_UNAVAILABLE"
    assert await h.hv.probe_targets(spec.name) == ()


@pytest.mark.requires(Capability.GUEST_AGENT)
async def test_guest_agent_health_calls(h: Harness) -> None:
    spec = h.guest_spec()
    await h.hv.create(spec, start=True)

    async def pings() -> bool:
        try:
            await h.hv.guest_ping(spec.name)
        except FailedPrecondition:
            return False
        return True

    await h.wait_until(pings, 120 if h.real else 5, "the guest agent to answer guest-ping")
    assert await h.hv.guest_file_read(spec.name, "/no/such/file-of-the-contract", 64) is None
    filesystems = await h.hv.guest_filesystems(spec.name)
    assert isinstance(filesystems, tuple)
    for fs in filesystems:
        assert fs.mountpoint and 0 <= fs.used_bytes <= fs.total_bytes
    # network mode none: nothing that probes could reach
    assert await h.hv.probe_targets(spec.name) == ()


# ---- delete and cleanup -------------------------------------------------------------------------


async def test_delete_leaves_nothing_behind(h: Harness) -> None:
    spec = _full_spec(h)
    await h.hv.create(spec, start=True)
    made = (await h.hv.inventory()).for_vm(spec.name, h.hv.domain_name(spec.name))
    assert made.domains and len(made.volumes) == 4  # three disks and the seed
    removed = await h.hv.delete(spec.name)
    assert removed
    with pytest.raises(NotFound):
        await h.hv.get(spec.name)
    assert (await h.hv.inventory()).for_vm(spec.name, h.hv.domain_name(spec.name)).is_empty()
    if Capability.HOST_FILES in h.capabilities:
        assert _owned_paths(h.storage_dir, spec.name) == []
        assert not await asyncio.to_thread(lambda: [p for p in removed if os.path.exists(p)])
        assert any(p.endswith(".cidata.iso") for p in removed)
        assert any(p.endswith("console.log") for p in removed)
    # nothing blocks making it again
    await h.hv.create(spec, start=False)


@pytest.mark.parametrize(
    ("base_image", "error", "reason"),
    [
        ("/etc/hostname", InvalidArgument, "IMAGE_OUTSIDE_IMAGE_DIRS"),
        ("escape.qcow2", InvalidArgument, "IMAGE_OUTSIDE_IMAGE_DIRS"),  # a symlink inside pointing outside
        ("missing.qcow2", FailedPrecondition, "IMAGE_NOT_FOUND"),  # pre-flight: this host lacks it
    ],
)
async def test_create_rejects_bad_base_image_and_makes_nothing(
    h: Harness, base_image: str, error: type[Exception], reason: str
) -> None:
    before = await h.hv.inventory()
    spec = h.spec(disks=(DiskSpec("root", base_image="base.qcow2"), DiskSpec("bad", base_image=base_image)))
    with pytest.raises(error) as err:
        await h.hv.create(spec, start=True)
    assert err.value.reason == reason
    assert err.value.metadata["field"] == "spec.disks[1].base_image"
    assert await h.hv.inventory() == before


async def test_create_rejects_kernel_outside_image_dirs(h: Harness) -> None:
    spec = h.spec(kernel_boot=KernelBoot(kernel=os.path.join(h.files.outside, "secret.img")))
    with pytest.raises(InvalidArgument) as err:
        await h.hv.create(spec, start=True)
    assert (err.value.reason, err.value.metadata["field"]) == ("IMAGE_OUTSIDE_IMAGE_DIRS", "spec.kernel_boot.kernel")
    spec = h.spec(kernel_boot=KernelBoot(kernel="vmlinuz", initrd="no-initrd.img"))
    with pytest.raises(FailedPrecondition) as err:
        await h.hv.create(spec, start=True)
    assert (err.value.reason, err.value.metadata["field"]) == ("IMAGE_NOT_FOUND", "spec.kernel_boot.initrd")
    assert (await h.hv.inventory()).is_empty()


@pytest.mark.parametrize("step", CREATE_STEPS)
async def test_failure_at_any_create_step_removes_everything(h: Harness, step: str) -> None:
    spec = replace(_full_spec(h), shared_folders=())
    h.hv.faults.fail_on[step] = Fault(Unavailable("injected", reason="INJECTED"))
    with pytest.raises(Unavailable) as err:
        await h.hv.create(spec, start=True)
    assert err.value.reason == "INJECTED"
    assert (await h.hv.inventory()).is_empty()
    with pytest.raises(NotFound):
        await h.hv.get(spec.name)
    if Capability.HOST_FILES in h.capabilities:
        assert _owned_paths(h.storage_dir, spec.name) == []
    # the fault fired once; the same create now works
    assert (await h.hv.create(spec, start=False)).spec == spec


async def test_start_failure_during_create_removes_everything(h: Harness) -> None:
    spec = h.arrange_start_failure(replace(_full_spec(h), shared_folders=()))
    with pytest.raises(FailedPrecondition) as err:
        await h.hv.create(spec, start=True)
    assert err.value.reason == "DOMAIN_START_FAILED"
    assert spec.name in err.value.message
    if h.kind != "libvirt-test":
        # libvirt's own words reach the caller
        assert spec.network.libvirt_network in err.value.message
    assert (await h.hv.inventory()).is_empty()
    with pytest.raises(NotFound):
        await h.hv.get(spec.name)


async def test_start_failure_of_a_defined_vm_keeps_it(h: Harness) -> None:
    spec = h.arrange_start_failure(h.spec())
    await h.hv.create(spec, start=False)
    with pytest.raises(FailedPrecondition) as err:
        await h.hv.start(spec.name)
    assert err.value.reason == "DOMAIN_START_FAILED"
    assert (await h.hv.get(spec.name)).state == VmState.STOPPED


# ---- events -------------------------------------------------------------------------------------


@pytest.mark.requires(Capability.EVENTS)
async def test_events_for_start_stop_undefine(h: Harness) -> None:
    spec = h.spec()
    await h.hv.create(spec, start=True)
    assert (await h.wait_event(spec.name, EventKind.DEFINED)).state == VmState.STOPPED
    assert (await h.wait_event(spec.name, EventKind.STARTED)).state == VmState.RUNNING
    await h.hv.destroy(spec.name)
    assert (await h.wait_event(spec.name, EventKind.STOPPED)).state == VmState.STOPPED
    await h.hv.delete(spec.name)
    assert (await h.wait_event(spec.name, EventKind.UNDEFINED)).state is None
    # nothing about domains this adapter does not own
    assert {ev.name for ev in h.events} == {spec.name}


# ---- bulk listing and host ----------------------------------------------------------------------


async def test_list_is_one_bulk_call(h: Harness) -> None:
    names = []
    for count in (1, 3):
        while len(names) < count:
            spec = h.spec()
            await h.hv.create(spec, start=False)
            names.append(spec.name)
        await h.hv.list()  # learn ownership of new domains once
        h.hv.calls.clear()
        listed = await h.hv.list()
        assert sorted(r.name for r in listed) == sorted(names)
        assert sum(h.hv.calls.values()) == 1, dict(h.hv.calls)


async def test_domain_stats_are_one_bulk_call_for_running_vms(h: Harness) -> None:
    running = []
    for _ in range(2):
        spec = h.spec()
        await h.hv.create(spec, start=True)
        running.append(spec.name)
    stopped = h.spec()
    await h.hv.create(stopped, start=False)
    if h.kind == "fake":
        # the fake reports scripted counters; those of a stopped VM must not come back
        for n, name in enumerate([*running, stopped.name]):
            h.hv.domain_counters[name] = DomainStats(name, time.monotonic(), 1, 10**9 * (n + 1), 65536, 32768)
    await h.hv.list()  # learn ownership of new domains once
    await h.hv.domain_stats()
    h.hv.calls.clear()
    stats = await h.hv.domain_stats()
    assert sum(h.hv.calls.values()) == 1, dict(h.hv.calls)
    assert isinstance(stats, dict)
    # a hypervisor without statistics (the test driver) has no data, never data about other VMs
    assert set(stats) <= set(running)
    if Capability.REAL_STATS in h.capabilities:
        assert set(stats) == set(running)
        for name, sample in stats.items():
            assert sample.name == name and sample.vcpus == 1
            assert sample.cpu_time_ns is not None and sample.cpu_time_ns >= 0
        later = await h.hv.domain_stats()
        assert all(later[n].sampled_at >= stats[n].sampled_at for n in running)
    await h.hv.destroy(running[0])
    assert running[0] not in await h.hv.domain_stats()


async def test_host_info(h: Harness) -> None:
    info = await h.hv.host_info()
    assert info.serving
    assert info.capacity.vcpus > 0 and info.capacity.memory_mib > 0 and info.capacity.disk_mib > 0
    assert info.allocatable.fits_in(info.capacity)
    assert set(info.hypervisor.capabilities) == {c.value for c in h.capabilities}
    assert info.hypervisor.domain_type in ("qemu", "kvm")
    assert info.hypervisor.domain_type_reason


# ---- files on the host --------------------------------------------------------------------------


@pytest.mark.requires(Capability.HOST_FILES)
async def test_every_file_made_carries_the_owner_mark(h: Harness) -> None:
    spec = _full_spec(h)
    await h.hv.create(spec, start=True)
    inventory = (await h.hv.inventory()).for_vm(spec.name, h.hv.domain_name(spec.name))
    paths = {p for p, _owner in inventory.files}
    assert len([p for p in paths if p.endswith(".qcow2")]) == 3
    assert any(p.endswith("console.log") for p in paths)
    seed = next(p for p in paths if p.endswith(".cidata.iso"))
    assert os.getxattr(seed, OWNER_XATTR) == spec.name.encode()
    files = read_seed_iso(await asyncio.to_thread(_read, seed))
    assert files["volume_id"] == b"cidata"
    assert files["user-data"] == spec.cloud_init.user_data.reveal().encode()  # type: ignore[union-attr]
    assert files["network-config"] == b"version: 2\n"
    assert b"local-hostname: " + spec.name.encode() in files["meta-data"]


async def test_concurrent_creates_of_one_name_make_one_vm(h: Harness) -> None:
    spec = h.spec()
    results = await asyncio.gather(*(h.hv.create(spec, start=False) for _ in range(3)), return_exceptions=True)
    made = [r for r in results if not isinstance(r, BaseException)]
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(made) == 1, results
    assert all(isinstance(e, AlreadyExists) for e in errors), errors
    inventory = (await h.hv.inventory()).for_vm(spec.name, h.hv.domain_name(spec.name))
    assert len(inventory.volumes) == 1


async def test_plan_create_shows_the_steps_and_makes_nothing(h: Harness) -> None:
    secret = "plan-canary-5e1f"
    spec = h.spec(cloud_init=CloudInit(user_data=f"#cloud-config\npassword: {secret}\n"))
    before = await h.hv.inventory()
    plan = await h.hv.plan_create(spec, start=True)
    assert await h.hv.inventory() == before
    names = [step.split(":", 1)[0] for step in plan.steps]
    assert [n for n in names if n != "folder"] == ["disk", "seed", "define", "start", "commit"]
    assert secret not in "\n".join(plan.steps) + plan.domain_xml
    if plan.domain_xml:  # the libvirt adapters show the XML they would define
        assert f"<name>{h.hv.domain_name(spec.name)}</name>" in plan.domain_xml
    # the same pre-flight as a create: an existing name is refused
    await h.hv.create(spec, start=False)
    with pytest.raises(AlreadyExists):
        await h.hv.plan_create(spec, start=True)
    await h.hv.delete(spec.name)
