"""The libvirt adapter's health-probe methods against a real tiny guest on qemu:///system."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import shutil
import subprocess
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from clonebox_agent.adapters.libvirt import LibvirtHypervisor
from clonebox_agent.ports import ProbeTarget
from clonebox_core.errors import FailedPrecondition
from clonebox_core.model import DiskSpec, KernelBoot, NetworkMode, NetworkSpec, VmSpec
from tests.realfleet import GUEST, libvirt_reason

pytestmark = [pytest.mark.e2e, pytest.mark.libvirt]

T = TypeVar("T")

#: QEMU (libvirt-qemu) must be able to traverse it: never under /root
RUN_ROOT = "/var/lib/clonebox"


def _virsh(*args: str) -> str:
    return subprocess.run(["virsh", "-c", "qemu:///system", *args], capture_output=True, text=True, check=True).stdout


def _default_network() -> tuple[str, list[ipaddress.IPv4Network | ipaddress.IPv6Network]]:
    root = ET.fromstring(_virsh("net-dumpxml", "default"))
    bridge = root.find("bridge")
    assert bridge is not None
    subnets = [
        ipaddress.ip_interface(f"{ip.get('address')}/{ip.get('prefix') or ip.get('netmask')}").network
        for ip in root.findall("ip")
    ]
    return bridge.get("name", ""), subnets


async def _until(what: str, within: float, probe: Callable[[], Awaitable[T]]) -> T:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        result = await probe()
        if result:
            return result
        await asyncio.sleep(0.5)
    raise AssertionError(f"timed out after {within}s waiting for {what}")


async def test_health_methods_on_a_real_guest() -> None:
    why = libvirt_reason()
    if why:
        pytest.skip(why)
    os.makedirs(RUN_ROOT, mode=0o755, exist_ok=True)
    root = tempfile.mkdtemp(prefix="e2e-health-", dir=RUN_ROOT)
    os.chmod(root, 0o755)  # mkdtemp's 0700 would lock QEMU out
    hv = LibvirtHypervisor(
        "qemu:///system",
        os.path.join(root, "storage"),
        [str(GUEST)],
        domain_type="qemu",
        owner=f"e2e-health-{uuid.uuid4().hex[:6]}",
        pool_name=f"clonebox-e2e-{uuid.uuid4().hex[:6]}",
    )
    name = f"health-{uuid.uuid4().hex[:6]}"
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
        network=NetworkSpec(mode=NetworkMode.LIBVIRT, libvirt_network="default"),
    )
    await hv.open(lambda _ev: None)
    try:
        await hv.create(spec, start=True)

        async def pings() -> bool:
            try:
                await hv.guest_ping(name)
            except FailedPrecondition:
                return False
            return True

        await _until("qemu-ga to answer guest-ping", 120, pings)

        stats = (await hv.domain_stats())[name]
        assert stats.vcpus == 1
        assert stats.cpu_time_ns is not None and stats.cpu_time_ns > 0

        assert await hv.guest_file_read(name, "/etc/hostname", 4096) == f"{name}\n".encode()
        assert await hv.guest_file_read(name, "/etc/hostname", 3) == name[:3].encode()
        assert await hv.guest_file_read(name, "/no/such/file", 64) is None
        for fs in await hv.guest_filesystems(name):
            assert fs.mountpoint and 0 <= fs.used_bytes <= fs.total_bytes

        bridge, subnets = await asyncio.to_thread(_default_network)

        async def targets() -> tuple[ProbeTarget, ...]:
            return await hv.probe_targets(name)

        found = await _until("a probe target (DHCP lease on the default network)", 120, targets)
        for target in found:
            assert target.interface == bridge
            assert any(ipaddress.ip_address(target.address) in s for s in subnets), (target, subnets)

        live = await asyncio.to_thread(_virsh, "dumpxml", hv.domain_name(name))
        stats_el = ET.fromstring(live).find("devices/memballoon/stats")
        assert stats_el is not None and int(stats_el.get("period", "0")) > 0
        # the balloon driver reports guest memory only if the guest kernel has virtio_balloon loaded
        balloon = await hv.guest_file_exists(name, "/sys/bus/virtio/drivers/virtio_balloon")

        async def memory() -> int | None:
            return (await hv.domain_stats())[name].memory_available_kib

        if balloon:
            await _until("balloon statistics (memory available)", 15, memory)
        else:
            await asyncio.sleep(6)  # one stats period: the figure must stay absent, not be made up
            assert await memory() is None
    finally:
        try:
            for record in await hv.list():
                await hv.delete(record.name)
            await hv.remove_pool()
        finally:
            await hv.close()
            shutil.rmtree(root, ignore_errors=True)
