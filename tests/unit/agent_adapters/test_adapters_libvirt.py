"""LibvirtHypervisor behaviour beyond the contract: errors, reconnects, ownership, real overlays."""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import uuid
from collections.abc import AsyncIterator

import pytest

from clonebox_agent.adapters.common import QEMU_CAPABILITIES, TEST_DRIVER_CAPABILITIES
from clonebox_agent.adapters.libvirt import LibvirtHypervisor, capabilities_for
from clonebox_agent.adapters.libvirt.errors import is_connection_error, to_clonebox
from clonebox_agent.adapters.libvirt.events import lifecycle, vm_state
from clonebox_agent.ports import Capability, EventKind, HypervisorEvent
from clonebox_core.errors import NotFound, Unavailable
from clonebox_core.model import CloudInit, DiskSpec, NetworkMode, NetworkSpec, VmSpec, VmState

# libvirt's numeric event/state codes (the test must not import libvirt)
EV_DEFINED, EV_STOPPED, EV_SHUTDOWN = 0, 5, 6
DETAIL_UPDATED, DETAIL_CRASHED = 1, 2
STATE_RUNNING, STATE_SHUTOFF = 1, 5


def test_capabilities_by_uri() -> None:
    assert capabilities_for("test:///default") == TEST_DRIVER_CAPABILITIES
    assert capabilities_for("qemu:///system") == QEMU_CAPABILITIES
    remote = capabilities_for("qemu+ssh://host/system")
    assert Capability.HOST_FILES not in remote and Capability.GUEST_AGENT in remote


def test_event_and_state_mapping() -> None:
    assert lifecycle(EV_DEFINED, DETAIL_UPDATED) is None  # a config change is no lifecycle change
    assert lifecycle(EV_SHUTDOWN, 0) is None  # "guest is shutting down": STOPPED follows
    assert lifecycle(EV_STOPPED, DETAIL_CRASHED) == (EventKind.CRASHED, VmState.CRASHED, "crashed")
    assert lifecycle(EV_STOPPED, 1) == (EventKind.STOPPED, VmState.STOPPED, "destroyed")
    assert vm_state(STATE_RUNNING, 1) == (VmState.RUNNING, "booted")
    assert vm_state(STATE_SHUTOFF, 3) == (VmState.CRASHED, "crashed")
    assert vm_state(STATE_SHUTOFF, 2) == (VmState.STOPPED, "destroyed")


@pytest.fixture
async def test_driver() -> AsyncIterator[tuple[LibvirtHypervisor, list[HypervisorEvent]]]:
    storage = tempfile.mkdtemp(prefix="clonebox-unit-")
    hv = LibvirtHypervisor(
        "test:///default",
        storage,
        [storage],
        owner=f"unit-{uuid.uuid4().hex[:6]}",
        pool_name=f"clonebox-unit-{uuid.uuid4().hex[:6]}",
    )
    events: list[HypervisorEvent] = []
    await hv.open(events.append)
    yield hv, events
    for r in await hv.list():
        await hv.delete(r.name)
    await hv.remove_pool()
    await hv.close()
    os.rmdir(storage)


SPEC = VmSpec(name="u1", memory_mib=64, disks=(DiskSpec("root", size_mib=8),), network=NetworkSpec(NetworkMode.NONE))


async def test_libvirt_errors_map_to_core_errors(test_driver: tuple[LibvirtHypervisor, list[HypervisorEvent]]) -> None:
    hv, _ = test_driver
    conn = await hv._run(hv._conn.get)
    try:
        await asyncio.to_thread(conn.lookupByName, "cb-absent")
    except Exception as exc:
        mapped = to_clonebox(exc, uri=hv.uri, vm="absent")
        assert isinstance(mapped, NotFound) and mapped.reason == "VM_NOT_FOUND"
        assert not is_connection_error(exc)
    else:
        raise AssertionError("lookup of an absent domain succeeded")


async def test_unreachable_libvirtd_is_not_serving_and_unavailable(tmp_path: object) -> None:
    hv = LibvirtHypervisor("qemu+unix:///system?socket=/nonexistent/libvirt.sock", "/tmp/x", [], pool_name="clonebox-x")
    await hv.open(lambda _ev: None)  # does not raise: the agent starts and reports NOT_SERVING
    info = await hv.host_info()
    assert not info.serving and "nonexistent" in info.not_serving_reason
    with pytest.raises(Unavailable) as err:
        await hv.list()
    assert err.value.reason == "HYPERVISOR_UNAVAILABLE"
    await hv.close()


async def test_reconnects_after_the_connection_dies(
    test_driver: tuple[LibvirtHypervisor, list[HypervisorEvent]],
) -> None:
    hv, events = test_driver
    before = hv._conn.generation
    # what a libvirtd restart does to us: the connection is gone
    await asyncio.to_thread(hv._conn.current.unwrapped.close)
    assert await hv.list() == []
    assert hv._conn.generation == before + 1
    # events were registered again on the new connection
    await hv.create(SPEC, start=True)
    for _ in range(100):
        if any(e.kind == EventKind.STARTED for e in events):
            break
        await asyncio.sleep(0.02)
    assert [e.kind for e in events] == [EventKind.DEFINED, EventKind.STARTED]


async def test_foreign_domains_are_invisible_and_untouched(
    test_driver: tuple[LibvirtHypervisor, list[HypervisorEvent]],
) -> None:
    hv, events = test_driver
    conn = await hv._run(hv._conn.get)
    xml = "<domain type='test'><name>cb-foreign</name><memory>65536</memory><os><type>hvm</type></os></domain>"
    foreign = await asyncio.to_thread(conn.defineXML, xml)
    other = LibvirtHypervisor("test:///default", hv.storage_dir, [], owner="someone-else", pool_name=hv.pool_name)
    await other.open(lambda _ev: None)
    try:
        await hv.create(SPEC, start=False)
        assert [r.name for r in await hv.list()] == ["u1"]
        assert await other.list() == []  # another owner on the same libvirtd
        for call in (hv.get, hv.delete, hv.start):
            with pytest.raises(NotFound):
                await call("foreign")
        assert await asyncio.to_thread(foreign.isActive) == 0  # still there, not started
        await asyncio.sleep(0.05)
        assert {e.name for e in events} == {"u1"}
    finally:
        await asyncio.to_thread(foreign.undefine)
        await other.close()


@pytest.mark.libvirt
async def test_real_overlay_seed_and_files(qemu_dir: str) -> None:
    images = os.path.join(qemu_dir, "images")
    os.makedirs(images, mode=0o755)
    base = os.path.join(images, "base.qcow2")
    await _run("qemu-img", "create", "-q", "-f", "qcow2", base, "24M")
    hv = LibvirtHypervisor(
        "qemu:///system",
        os.path.join(qemu_dir, "s"),
        [images],
        domain_type="qemu",
        owner="unit-real",
        pool_name=f"clonebox-unit-{uuid.uuid4().hex[:6]}",
    )
    await hv.open(lambda _ev: None)
    try:
        spec = VmSpec(
            name=f"u-{uuid.uuid4().hex[:6]}",
            memory_mib=64,
            disks=(DiskSpec("root", base_image="base.qcow2", size_mib=32),),
            network=NetworkSpec(NetworkMode.NONE),
            cloud_init=CloudInit(user_data="#cloud-config\n"),
        )
        await hv.create(spec, start=True)
        domain = hv.domain_name(spec.name)
        overlay = os.path.join(qemu_dir, "s", "pool", f"{domain}.root.qcow2")
        info = json.loads(await _run("qemu-img", "info", "-U", "--output=json", overlay))
        assert info["format"] == "qcow2"
        assert info["backing-filename"] == base
        assert info["virtual-size"] == 32 * 1024 * 1024  # size_mib larger than the base wins
        dumped = await _run("virsh", "-c", "qemu:///system", "dumpxml", domain)
        assert "<domain type='qemu'" in dumped
        assert f"{domain}.cidata.iso" in dumped
        removed = await hv.delete(spec.name)
        assert overlay in removed
        assert not await asyncio.to_thread(os.path.exists, overlay)
    finally:
        await hv.remove_pool()
        await hv.close()


async def _run(*argv: str) -> str:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    assert proc.returncode == 0, argv
    return out.decode()
