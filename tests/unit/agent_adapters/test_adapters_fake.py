"""What only the fake can do: scripted faults, delays, a guest ignoring ACPI, external changes."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from clonebox_agent.adapters.common import QEMU_CAPABILITIES, Fault
from clonebox_agent.adapters.fake import FakeHypervisor
from clonebox_agent.adapters.libvirt import capabilities_for
from clonebox_agent.ports import EventKind, HypervisorEvent
from clonebox_core.errors import AlreadyExists, Unavailable
from clonebox_core.model import DiskSpec, VmSpec, VmState

SPEC = VmSpec(name="vm1", memory_mib=64, disks=(DiskSpec("root", size_mib=8),))


async def _opened(**kwargs: object) -> tuple[FakeHypervisor, list[HypervisorEvent]]:
    hv = FakeHypervisor(**kwargs)  # type: ignore[arg-type]
    events: list[HypervisorEvent] = []
    await hv.open(events.append)
    return hv, events


async def test_declares_what_real_qemu_declares() -> None:
    assert FakeHypervisor().capabilities == QEMU_CAPABILITIES == capabilities_for("qemu:///system")


async def test_private_storage_is_removed_on_close() -> None:
    hv, _ = await _opened()
    await hv.create(SPEC, start=True)
    folder = hv.storage_dir
    assert await asyncio.to_thread(os.path.isdir, folder)
    await hv.close()
    assert not await asyncio.to_thread(os.path.exists, folder)


async def test_events_arrive_after_the_call_on_the_loop(tmp_path: Path) -> None:
    hv, events = await _opened(storage_dir=str(tmp_path))
    await hv.create(SPEC, start=True)
    assert events == []  # like libvirt's event thread: never inside the call
    await asyncio.sleep(0)
    assert [e.kind for e in events] == [EventKind.DEFINED, EventKind.STARTED]


async def test_shutdown_honoured_after_a_delay_or_ignored(tmp_path: Path) -> None:
    hv, events = await _opened(storage_dir=str(tmp_path), shutdown_delay=0.05)
    await hv.create(SPEC, start=True)
    await hv.shutdown("vm1")
    assert (await hv.get("vm1")).state == VmState.RUNNING
    await asyncio.sleep(0.1)
    assert (await hv.get("vm1")).state == VmState.STOPPED
    assert events[-1] == HypervisorEvent("vm1", EventKind.STOPPED, VmState.STOPPED, "shutdown")

    hv.ignore_shutdown = True
    await hv.start("vm1")
    await hv.shutdown("vm1")
    await asyncio.sleep(0.1)
    assert (await hv.get("vm1")).state == VmState.RUNNING
    await hv.destroy("vm1")
    assert (await hv.get("vm1")).state == VmState.STOPPED


async def test_fail_once_and_always(tmp_path: Path) -> None:
    hv, _ = await _opened(storage_dir=str(tmp_path), fail_on={"get": Fault(Unavailable("once"), times=1)})
    await hv.create(SPEC, start=False)
    with pytest.raises(Unavailable):
        await hv.get("vm1")
    await hv.get("vm1")
    hv.faults.fail_on["list"] = Unavailable("always")
    for _ in range(2):
        with pytest.raises(Unavailable):
            await hv.list()


async def test_fail_after_disks_made_cleans_up(tmp_path: Path) -> None:
    hv, _ = await _opened(storage_dir=str(tmp_path), fail_on={"create:disks": Fault(OSError("disk full"))})
    with pytest.raises(OSError, match="disk full"):
        await hv.create(SPEC, start=True)
    assert (await hv.inventory()).is_empty()


async def test_delays(tmp_path: Path) -> None:
    hv, _ = await _opened(storage_dir=str(tmp_path), delays={"create": 0.2})
    loop = asyncio.get_running_loop()
    started = loop.time()
    await hv.create(SPEC, start=False)
    assert loop.time() - started >= 0.2


async def test_external_changes_emit_events(tmp_path: Path) -> None:
    hv, events = await _opened(storage_dir=str(tmp_path))
    await hv.create(SPEC, start=True)
    hv.external_destroy("vm1")
    hv.external_crash("vm1")  # already off: nothing
    await hv.start("vm1")
    hv.external_crash("vm1")
    await asyncio.sleep(0)
    assert (await hv.get("vm1")).state == VmState.CRASHED
    await hv.start("vm1")
    hv.external_undefine("vm1")  # running: lives on as a transient domain
    assert (await hv.get("vm1")).state == VmState.RUNNING
    hv.guest_poweroff("vm1")  # ... until it stops
    await asyncio.sleep(0)
    kinds = [e.kind for e in events]
    assert kinds == [
        EventKind.DEFINED,
        EventKind.STARTED,
        EventKind.STOPPED,
        EventKind.STARTED,
        EventKind.CRASHED,
        EventKind.STARTED,
        EventKind.UNDEFINED,
        EventKind.STOPPED,
    ]
    assert [r.name for r in await hv.list()] == []
    # its volumes are orphans now, as with libvirt; delete cleans them up
    assert await hv.delete("vm1")
    assert (await hv.inventory()).is_empty()


async def test_libvirtd_down(tmp_path: Path) -> None:
    hv, _ = await _opened(storage_dir=str(tmp_path))
    hv.set_serving(False, "libvirtd stopped")
    info = await hv.host_info()
    assert not info.serving and info.not_serving_reason == "libvirtd stopped"
    with pytest.raises(Unavailable) as err:
        await hv.list()
    assert err.value.reason == "HYPERVISOR_UNAVAILABLE"
    hv.set_serving(True)
    assert (await hv.host_info()).serving


async def test_concurrent_create_loses_cleanly(tmp_path: Path) -> None:
    hv, _ = await _opened(storage_dir=str(tmp_path), delays={"create:disks": 0.05})
    a, b = await asyncio.gather(hv.create(SPEC, start=False), hv.create(SPEC, start=False), return_exceptions=True)
    assert sum(isinstance(r, AlreadyExists) for r in (a, b)) == 1
    assert len((await hv.inventory()).volumes) == 1
