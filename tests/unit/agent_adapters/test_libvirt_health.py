"""The libvirt adapter's health-probe methods where no guest is needed: parsing, filtering, the test driver."""

from __future__ import annotations

import asyncio
import os
import tempfile
import uuid
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from clonebox_agent.adapters.libvirt import LibvirtHypervisor, domxml, health
from clonebox_agent.ports import Capability, DomainStats, GuestFilesystem, ProbeTarget
from clonebox_core.errors import FailedPrecondition, NotFound, Unavailable
from clonebox_core.model import DiskSpec, IpAddress, NetworkMode, NetworkSpec, VmSpec

# /sys/class/net/<dev>/flags as the kernel writes them: IFF_UP|IFF_BROADCAST|IFF_MULTICAST, and without IFF_UP
FLAGS_UP = "0x1003\n"
FLAGS_DOWN = "0x1002\n"

DEFAULT_NET = """
<network>
  <name>default</name>
  <forward mode='nat'/>
  <bridge name='virbr0' stp='on' delay='0'/>
  <ip address='192.168.122.1' netmask='255.255.255.0'>
    <dhcp><range start='192.168.122.2' end='192.168.122.254'/></dhcp>
  </ip>
  <ip family='ipv6' address='fd00:cb::1' prefix='64'/>
</network>
"""
OTHER_NET = """
<network>
  <name>lab</name>
  <bridge name='virbr7'/>
  <ip address='10.77.0.1' prefix='24'/>
</network>
"""


def _sysfs(root: Path, **bridges: str) -> str:
    for name, flags in bridges.items():
        (root / "class" / "net" / name).mkdir(parents=True)
        (root / "class" / "net" / name / "flags").write_text(flags)
    return str(root)


# ---- probe targets: the pure filter ---------------------------------------------------------------


def test_probe_targets_keep_only_addresses_in_an_up_bridge_subnet(tmp_path: Path) -> None:
    sysfs = _sysfs(tmp_path, virbr0=FLAGS_UP, virbr7=FLAGS_UP)
    addresses = [
        "192.168.122.57",  # in default's IPv4 subnet
        "fe80::5054:ff:fe12:3456",  # link-local: in no network's subnet
        "fd00:cb::57",  # in default's IPv6 subnet
        "10.77.0.9",  # in lab's subnet
        "203.0.113.5",  # would follow the default route: never a target
        "192.168.122.1",  # the host's own address on the bridge, not the guest
        "192.168.122.57",  # reported twice (agent and lease): once
        "not-an-ip",
    ]
    targets = health.probe_targets(addresses, [DEFAULT_NET, OTHER_NET], sysfs)
    assert targets == (
        ProbeTarget("192.168.122.57", "virbr0"),
        ProbeTarget("fd00:cb::57", "virbr0"),
        ProbeTarget("10.77.0.9", "virbr7"),
    )


def test_probe_targets_need_the_bridge_up_on_this_host(tmp_path: Path) -> None:
    sysfs = _sysfs(tmp_path, virbr0=FLAGS_DOWN)
    # down, and absent (virbr7 is not in sysfs at all): nothing to probe through
    assert health.probe_targets(["192.168.122.57", "10.77.0.9"], [DEFAULT_NET, OTHER_NET], sysfs) == ()
    (tmp_path / "class" / "net" / "virbr0" / "flags").write_text(FLAGS_UP)
    assert health.probe_targets(["192.168.122.57", "10.77.0.9"], [DEFAULT_NET, OTHER_NET], sysfs) == (
        ProbeTarget("192.168.122.57", "virbr0"),
    )


def test_probe_targets_without_networks_or_addresses(tmp_path: Path) -> None:
    sysfs = _sysfs(tmp_path, virbr0=FLAGS_UP)
    assert health.probe_targets(["192.168.122.57"], [], sysfs) == ()
    assert health.probe_targets([], [DEFAULT_NET], sysfs) == ()
    # an isolated network with no address of its own has no subnet to check against
    no_ip = "<network><name>x</name><bridge name='virbr0'/></network>"
    assert health.probe_targets(["192.168.122.57"], [no_ip], sysfs) == ()


def test_bridge_names_never_leave_class_net(tmp_path: Path) -> None:
    sysfs = _sysfs(tmp_path, virbr0=FLAGS_UP)
    (tmp_path / "flags").write_text(FLAGS_UP)
    assert health.bridge_is_up("virbr0", sysfs)
    for bad in ("", ".", "..", "../..", "virbr0/../.."):
        assert not health.bridge_is_up(bad, sysfs)
    (tmp_path / "class" / "net" / "garbled").mkdir()
    (tmp_path / "class" / "net" / "garbled" / "flags").write_text("up\n")
    assert not health.bridge_is_up("garbled", sysfs)


def test_network_subnets_netmask_and_prefix() -> None:
    net = health.network_subnets(DEFAULT_NET)
    assert net is not None
    assert net.bridge == "virbr0"
    assert [str(s) for s in net.subnets] == ["192.168.122.0/24", "fd00:cb::/64"]
    assert net.host_addresses == {"192.168.122.1", "fd00:cb::1"}
    assert health.network_subnets("<network><name>x</name><ip address='10.0.0.1' prefix='8'/></network>") is None


def test_attached_networks_are_the_network_interfaces_only() -> None:
    xml = """
    <domain><devices>
      <interface type='network'><source network='default' bridge='virbr0'/></interface>
      <interface type='bridge'><source bridge='br0'/></interface>
      <interface type='network'><source network='lab'/></interface>
      <interface type='network'><source network='default'/></interface>
    </devices></domain>
    """
    assert health.attached_networks(xml) == ("default", "lab")
    assert health.attached_networks("<domain><devices/></domain>") == ()


# ---- fsinfo and statistics parsing ----------------------------------------------------------------


def test_fsinfo_parsing_skips_filesystems_without_figures() -> None:
    answer = [
        {
            "name": "vda",
            "mountpoint": "/data",
            "type": "ext4",
            "used-bytes": 1_048_576,
            "total-bytes": 60_000_000,
            "disk": [{"bus-type": "virtio", "dev": "/dev/vda"}],
        },
        {"name": "rootfs", "mountpoint": "/", "type": "rootfs", "disk": []},  # statvfs gave nothing
        {"name": "tmpfs", "mountpoint": "/run", "type": "tmpfs", "used-bytes": 0, "total-bytes": 10_485_760},
        "garbage",
    ]
    assert health.filesystems_from_fsinfo(answer) == (
        GuestFilesystem("/data", "ext4", 1_048_576, 60_000_000),
        GuestFilesystem("/run", "tmpfs", 0, 10_485_760),
    )
    assert health.filesystems_from_fsinfo(None) == ()
    assert health.filesystems_from_fsinfo([]) == ()


def test_domain_stats_from_a_bulk_record() -> None:
    record = {
        "state.state": 1,
        "state.reason": 1,
        "cpu.time": 123_456_789,
        "vcpu.current": 2,
        "vcpu.maximum": 2,
        "balloon.current": 131072,
        "balloon.available": 120_000,
        "balloon.unused": 80_000,
    }
    assert health.has_statistics(record)
    assert health.domain_stats_from("web", record, 12.5, 1) == DomainStats("web", 12.5, 2, 123_456_789, 120_000, 80_000)
    # before the guest's balloon driver reports, and a driver with no vCPU group: the spec's count
    early = {"state.state": 1, "cpu.time": 5}
    assert health.domain_stats_from("web", early, 1.0, 3) == DomainStats("web", 1.0, 3, 5, None, None)
    assert not health.has_statistics({"state.state": 1, "state.reason": 0})


def test_domains_get_a_polled_balloon() -> None:
    spec = VmSpec(name="b", disks=(DiskSpec("root", size_mib=8),), network=NetworkSpec(NetworkMode.NONE))
    cfg = domxml.DomainConfig(
        name="cb-b",
        uuid=str(uuid.uuid4()),
        domain_type="qemu",
        vcpus=1,
        memory_mib=64,
        owner=domxml.OwnerMetadata("a", "b", spec),
    )
    balloon = ET.fromstring(domxml.domain_xml(cfg)).find("devices/memballoon")
    assert balloon is not None and balloon.get("model") == "virtio"
    stats = balloon.find("stats")
    assert stats is not None and int(stats.get("period", "0")) > 0


# ---- the adapter on libvirt's test driver -----------------------------------------------------------


SPEC = VmSpec(
    name="h1",
    memory_mib=64,
    disks=(DiskSpec("root", size_mib=8),),
    network=NetworkSpec(NetworkMode.LIBVIRT, "default"),
)


@pytest.fixture
async def test_driver() -> AsyncIterator[LibvirtHypervisor]:
    storage = tempfile.mkdtemp(prefix="clonebox-unit-")
    hv = LibvirtHypervisor(
        "test:///default",
        storage,
        [storage],
        owner=f"unit-{uuid.uuid4().hex[:6]}",
        pool_name=f"clonebox-unit-{uuid.uuid4().hex[:6]}",
    )
    await hv.open(lambda _ev: None)
    yield hv
    for r in await hv.list():
        await hv.delete(r.name)
    await hv.remove_pool()
    await hv.close()
    os.rmdir(storage)


async def test_test_driver_has_no_statistics(test_driver: LibvirtHypervisor) -> None:
    hv = test_driver
    await hv.create(SPEC, start=True)
    await hv.list()  # learn ownership once
    hv.calls.clear()
    assert await hv.domain_stats() == {}
    assert await hv.domain_stats() == {}
    assert dict(hv.calls) == {"getAllDomainStats": 2}


async def test_unsupported_statistics_call_is_no_data(
    test_driver: LibvirtHypervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    hv = test_driver
    conn = await hv._run(hv._conn.get)
    try:
        # a call the test driver does not implement: a real VIR_ERR_NO_SUPPORT to replay
        await asyncio.to_thread(conn.getMemoryStats, -1)
    except Exception as exc:
        unsupported = exc
    else:
        pytest.skip("this libvirt's test driver implements virNodeGetMemoryStats")

    class NoStats:
        def getAllDomainStats(self, *_args: Any) -> Any:
            raise unsupported

    monkeypatch.setattr(hv._conn, "get", NoStats)
    assert await hv.domain_stats() == {}


async def test_domain_stats_of_an_unreachable_libvirtd_is_unavailable() -> None:
    hv = LibvirtHypervisor("qemu+unix:///system?socket=/nonexistent/libvirt.sock", "/tmp/x", [], pool_name="clonebox-x")
    await hv.open(lambda _ev: None)
    try:
        with pytest.raises(Unavailable) as err:
            await hv.domain_stats()
        assert err.value.reason == "HYPERVISOR_UNAVAILABLE"
    finally:
        await hv.close()


async def test_guest_methods_on_the_test_driver(test_driver: LibvirtHypervisor) -> None:
    hv = test_driver
    await hv.create(SPEC, start=True)
    # running, but no guest agent to answer: the same error as guest_exec
    for call in (hv.guest_ping("h1"), hv.guest_filesystems("h1"), hv.guest_file_read("h1", "/etc/hostname", 64)):
        with pytest.raises(FailedPrecondition) as err:
            await call
        assert err.value.reason == "GUEST_AGENT_UNAVAILABLE"
    # its guests' addresses and networks are make-believe: never a probe target
    assert await hv.probe_targets("h1") == ()
    with pytest.raises(NotFound):
        await hv.probe_targets("absent")
    with pytest.raises(ValueError, match="max_bytes"):
        await hv.guest_file_read("h1", "/etc/hostname", -1)


# ---- probe_targets: the adapter's glue around the filter --------------------------------------------


class _Net:
    def __init__(self, xml: str, active: bool) -> None:
        self.xml, self.active = xml, active

    def isActive(self) -> bool:
        return self.active

    def XMLDesc(self, _flags: int) -> str:
        return self.xml


class _Dom:
    def __init__(self, xml: str, active: bool = True) -> None:
        self.xml, self.active = xml, active

    def isActive(self) -> bool:
        return self.active

    def XMLDesc(self, _flags: int) -> str:
        return self.xml


async def test_probe_targets_use_only_active_attached_networks(
    test_driver: LibvirtHypervisor, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    hv = test_driver
    hv.sysfs_root = _sysfs(tmp_path, virbr0=FLAGS_UP, virbr7=FLAGS_UP)
    # as on a local qemu:///system: the bridges in sysfs are libvirtd's
    monkeypatch.setattr(hv, "_caps", hv.capabilities | {Capability.HOST_FILES})
    dom_xml = """<domain><devices>
      <interface type='network'><source network='default'/></interface>
      <interface type='network'><source network='lab'/></interface>
    </devices></domain>"""
    nets = {"default": _Net(DEFAULT_NET, True), "lab": _Net(OTHER_NET, False)}
    looked_up: list[str] = []

    class Conn:
        def networkLookupByName(self, name: str) -> _Net:
            looked_up.append(name)
            return nets[name]

    dom = _Dom(dom_xml)
    monkeypatch.setattr(hv, "_owned_domain", lambda _vm: (dom, None))
    monkeypatch.setattr(hv._conn, "get", Conn)
    addresses = (
        IpAddress("eth0", "192.168.122.57", 24, "agent"),
        IpAddress("eth1", "10.77.0.9", 24, "agent"),  # lab is inactive
        IpAddress("eth2", "198.51.100.4", 24, "agent"),
    )
    monkeypatch.setattr(hv, "_domain_addresses", lambda _dom, _vm: addresses)
    assert await hv.probe_targets("h1") == (ProbeTarget("192.168.122.57", "virbr0"),)
    assert looked_up == ["default", "lab"]
    nets["lab"].active = True
    assert await hv.probe_targets("h1") == (
        ProbeTarget("192.168.122.57", "virbr0"),
        ProbeTarget("10.77.0.9", "virbr7"),
    )
    dom.active = False
    assert await hv.probe_targets("h1") == ()
    # network mode none: no network interface, no addresses asked for
    monkeypatch.setattr(hv, "_owned_domain", lambda _vm: (_Dom("<domain><devices/></domain>"), None))
    monkeypatch.setattr(hv, "_domain_addresses", lambda _dom, _vm: pytest.fail("addresses asked for"))
    assert await hv.probe_targets("h1") == ()
