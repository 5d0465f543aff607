"""Managed networks: the network XML and host entries built from typed models, network XML read back, the
shared checks of both adapters (``adapters.common``), and the libvirt adapter's route checks."""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import uuid
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from clonebox_agent.adapters import common
from clonebox_agent.adapters.common import DhcpHost, DnsHost, NetworkState
from clonebox_agent.adapters.libvirt import LibvirtHypervisor, domxml, netxml
from clonebox_core.errors import FailedPrecondition
from clonebox_core.model import DiskSpec, NetworkMode, NetworkSpec, VmSpec

NS = {"cb": domxml.NAMESPACE}
CFG = netxml.NetworkConfig("cb-shop", "10.213.7.0/24", "cbr-0123abcd", "agent-a")
NET = NetworkSpec(NetworkMode.MANAGED, "cb-shop", "10.213.7.0/24", "10.213.7.10", ("db", "shop-db"))

#: what libvirt 9.0 gives back for a managed network with one VM on it (virsh net-dumpxml)
LIVE_XML = """<network>
  <name>cb-shop</name>
  <uuid>57cb8c02-d9e3-4a4a-9236-b7107542702c</uuid>
  <metadata>
    <cb:network xmlns:cb="https://clonebox.dev/xmlns/agent/1" agent="agent-a" subnet="10.213.7.0/24"/>
  </metadata>
  <forward mode='nat'><nat><port start='1024' end='65535'/></nat></forward>
  <bridge name='cbr-0123abcd' stp='on' delay='0'/>
  <mac address='52:54:00:f6:35:a9'/>
  <dns>
    <host ip='10.213.7.10'><hostname>db</hostname><hostname>shop-db</hostname></host>
  </dns>
  <ip address='10.213.7.1' prefix='24'>
    <dhcp>
      <range start='10.213.7.2' end='10.213.7.254'/>
      <host mac='52:54:00:11:22:33' name='db' ip='10.213.7.10'/>
    </dhcp>
  </ip>
  <ip family='ipv6' address='fd00::1' prefix='64'/>
</network>"""


# ---- network XML -------------------------------------------------------------------------------


def test_network_xml_is_a_nat_network_on_its_bridge_with_dhcp_over_the_guest_addresses() -> None:
    root = ET.fromstring(netxml.network_xml(CFG))
    assert root.tag == "network" and root.findtext("name") == "cb-shop"
    assert root.find("uuid") is None  # libvirt picks it
    assert root.find("forward").get("mode") == "nat"  # type: ignore[union-attr]
    assert root.find("bridge").attrib == {"name": "cbr-0123abcd", "stp": "on", "delay": "0"}  # type: ignore[union-attr]
    ip = root.find("ip")
    assert ip is not None and ip.attrib == {"address": "10.213.7.1", "prefix": "24"}
    assert ip.find("dhcp/range").attrib == {"start": "10.213.7.2", "end": "10.213.7.254"}  # type: ignore[union-attr]
    assert ip.find("dhcp/host") is None  # entries come with each VM
    mark = root.find("metadata/cb:network", NS)
    assert mark is not None and mark.attrib == {"agent": "agent-a", "subnet": "10.213.7.0/24"}


def test_a_small_subnet_serves_exactly_its_guest_addresses() -> None:
    root = ET.fromstring(netxml.network_xml(netxml.NetworkConfig("cb-x", "10.0.0.8/29", "cbr-1", "a")))
    assert root.find("ip").attrib == {"address": "10.0.0.9", "prefix": "29"}  # type: ignore[union-attr]
    assert root.find("ip/dhcp/range").attrib == {"start": "10.0.0.10", "end": "10.0.0.14"}  # type: ignore[union-attr]


def test_what_is_built_reads_back() -> None:
    state = netxml.parse_network(netxml.network_xml(CFG), active=False)
    assert state == NetworkState("cb-shop", "", "agent-a", "10.213.7.0/24", "cbr-0123abcd", False)


def test_libvirts_network_xml_reads_as_owner_subnet_bridge_and_entries() -> None:
    state = netxml.parse_network(LIVE_XML, active=True)
    assert (state.name, state.uuid, state.owner, state.subnet, state.bridge, state.active) == (
        "cb-shop",
        "57cb8c02-d9e3-4a4a-9236-b7107542702c",
        "agent-a",
        "10.213.7.0/24",
        "cbr-0123abcd",
        True,
    )
    assert state.dhcp_hosts == (DhcpHost("52:54:00:11:22:33", "10.213.7.10", "db"),)
    assert state.dns_hosts == (DnsHost("10.213.7.10", ("db", "shop-db")),)


def test_a_network_without_the_mark_has_no_owner_and_a_netmask_is_understood() -> None:
    xml = "<network><name>cb-shop</name><ip address='192.168.5.1' netmask='255.255.255.0'/></network>"
    state = netxml.parse_network(xml, active=True)
    assert (state.owner, state.subnet, state.bridge, state.dhcp_hosts) == (None, "192.168.5.0/24", "", ())
    # a mark in some other namespace is not ours either
    other = LIVE_XML.replace("https://clonebox.dev/xmlns/agent/1", "https://example.org/not-clonebox")
    assert netxml.parse_network(other, active=True).owner is None


def test_host_entries_are_the_update_fragments_libvirt_expects() -> None:
    dhcp, dns = common.host_entries(NET, "52:54:00:aa:bb:cc")
    assert netxml.dhcp_host_xml(dhcp) == '<host mac="52:54:00:aa:bb:cc" name="db" ip="10.213.7.10" />'
    assert (
        netxml.dns_host_xml(dns) == '<host ip="10.213.7.10"><hostname>db</hostname><hostname>shop-db</hostname></host>'
    )  # type: ignore[arg-type]
    nameless = NetworkSpec(NetworkMode.MANAGED, "cb-shop", "10.213.7.0/24", "10.213.7.11")
    dhcp, dns = common.host_entries(nameless, "52:54:00:aa:bb:cd")
    assert dns is None and netxml.dhcp_host_xml(dhcp) == '<host mac="52:54:00:aa:bb:cd" ip="10.213.7.11" />'


def test_values_are_escaped_not_interpreted() -> None:
    # names are DNS labels by validation; the builders still never format text into XML
    text = netxml.dns_host_xml(DnsHost("10.0.0.2", ("a'b\"<c>&",)))
    assert ET.fromstring(text).findtext("hostname") == "a'b\"<c>&"


def test_the_domain_gets_the_mac_its_dhcp_entry_names_and_it_reads_back_by_network() -> None:
    spec = VmSpec("db", disks=(DiskSpec("root", size_mib=8),), network=NET)
    cfg = domxml.DomainConfig(
        name="cb-db",
        uuid="8d4a3f1e-0000-4000-8000-000000000001",
        domain_type="qemu",
        vcpus=1,
        memory_mib=64,
        owner=domxml.OwnerMetadata("agent-a", "db", spec, datetime(2026, 1, 2, tzinfo=UTC)),
        network="cb-shop",
        mac="52:54:00:aa:bb:cc",
    )
    xml = domxml.domain_xml(cfg)
    iface = ET.fromstring(xml).find("devices/interface")
    assert iface is not None and iface.find("mac").get("address") == "52:54:00:aa:bb:cc"  # type: ignore[union-attr]
    assert netxml.interfaces_by_network(xml) == {"cb-shop": ("52:54:00:aa:bb:cc",)}
    # without a MAC libvirt picks one; nothing attached, nothing listed
    no_mac = ET.fromstring(domxml.domain_xml(dataclasses.replace(cfg, mac=None)))
    assert no_mac.find("devices/interface/source") is not None and no_mac.find("devices/interface/mac") is None
    assert netxml.interfaces_by_network(domxml.domain_xml(dataclasses.replace(cfg, network=None))) == {}


# ---- shared rules ------------------------------------------------------------------------------


def test_bridge_names_fit_a_linux_interface_name_and_differ_by_network() -> None:
    longest = "cb-" + "x" * 40
    assert len(common.bridge_name(longest)) <= common.MAX_BRIDGE_NAME
    assert common.bridge_name("cb-shop") == common.bridge_name("cb-shop")
    assert common.bridge_name("cb-shop").startswith("cbr-")
    assert len({common.bridge_name(f"cb-plan-{i}") for i in range(1000)}) == 1000


def test_macs_are_random_in_qemus_range() -> None:
    macs = {common.new_mac() for _ in range(200)}
    assert len(macs) == 200
    for mac in macs:
        assert mac.startswith("52:54:00:") and len(mac) == 17 and mac == mac.lower()


def _state(**overrides: object) -> NetworkState:
    base: dict[str, object] = {
        "name": "cb-shop",
        "uuid": "u",
        "owner": "agent-a",
        "subnet": "10.213.7.0/24",
        "bridge": "cbr-0123abcd",
        "active": True,
        "dhcp_hosts": (DhcpHost("52:54:00:00:00:01", "10.213.7.10", "db"),),
        "dns_hosts": (DnsHost("10.213.7.10", ("db", "shop-db")),),
    }
    base.update(overrides)
    return NetworkState(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("state", "reason", "words"),
    [
        (_state(owner=None), "NETWORK_NOT_MANAGED", ["cb-shop", "not made by"]),
        (_state(owner="agent-b"), "NETWORK_NOT_MANAGED", ["cb-shop"]),
        (_state(subnet="10.213.8.0/24"), "NETWORK_SUBNET_CONFLICT", ["10.213.8.0/24", "10.213.7.0/24"]),
        (_state(subnet=""), "NETWORK_SUBNET_CONFLICT", ["(none)", "10.213.7.0/24"]),
    ],
)
def test_an_existing_network_is_refused_unless_ours_with_the_same_subnet(
    state: NetworkState, reason: str, words: list[str]
) -> None:
    with pytest.raises(FailedPrecondition) as err:
        common.check_existing_network(state, NET, "agent-a", "shop-db")
    assert err.value.reason == reason and err.value.metadata["network"] == "cb-shop"
    for word in words:
        assert word in err.value.message
    common.check_existing_network(_state(), NET, "agent-a", "shop-db")  # ours, same subnet: fine


def test_entries_in_the_way_are_replaced_when_left_over_and_refused_when_live() -> None:
    new_dhcp, new_dns = common.host_entries(NET, "52:54:00:00:00:02")
    # the VM that had 10.213.7.10 is gone (its MAC is on no domain): its entries are leftovers
    stale = common.entries_to_replace(_state(), new_dhcp, new_dns, live_macs=[], vm="shop-db")
    assert stale == ([DhcpHost("52:54:00:00:00:01", "10.213.7.10", "db")], [DnsHost("10.213.7.10", ("db", "shop-db"))])
    with pytest.raises(FailedPrecondition) as err:
        common.entries_to_replace(_state(), new_dhcp, new_dns, live_macs=["52:54:00:00:00:01"], vm="shop-db")
    assert err.value.reason == "NETWORK_ADDRESS_IN_USE" and "10.213.7.10" in err.value.message
    # another address, but a DNS name the live VM has
    other = NetworkSpec(NetworkMode.MANAGED, "cb-shop", "10.213.7.0/24", "10.213.7.11", ("api", "shop-db"))
    dhcp, dns = common.host_entries(other, "52:54:00:00:00:03")
    with pytest.raises(FailedPrecondition) as err:
        common.entries_to_replace(_state(), dhcp, dns, live_macs=["52:54:00:00:00:01"], vm="shop-api")
    assert err.value.reason == "NETWORK_NAME_IN_USE" and "shop-db" in err.value.message
    # nothing in common: nothing to replace
    free = NetworkSpec(NetworkMode.MANAGED, "cb-shop", "10.213.7.0/24", "10.213.7.12", ("web",))
    dhcp, dns = common.host_entries(free, "52:54:00:00:00:04")
    assert common.entries_to_replace(_state(), dhcp, dns, live_macs=["52:54:00:00:00:01"], vm="web") == ([], [])


def test_dropping_a_vms_entries_never_takes_a_newer_vms_address_or_name() -> None:
    mine = "52:54:00:00:00:01"
    # its own entries, found by MAC; the DNS entry of its address with them
    assert common.entries_to_drop(_state(), [mine], "10.213.7.10", others_live=[]) == (
        [DhcpHost(mine, "10.213.7.10", "db")],
        [DnsHost("10.213.7.10", ("db", "shop-db"))],
    )
    # a late undo of an old create: the address now belongs to a live VM with another MAC: kept
    newer = _state(dhcp_hosts=(DhcpHost("52:54:00:00:00:09", "10.213.7.10", "db"),))
    assert common.entries_to_drop(newer, [mine], "10.213.7.10", others_live=["52:54:00:00:00:09"]) == ([], [])
    # already gone: nothing to do (a retried delete)
    assert common.entries_to_drop(_state(dhcp_hosts=(), dns_hosts=()), [mine], "10.213.7.10", []) == ([], [])


def test_host_routes_are_read_from_proc_net_route(tmp_path: Path) -> None:
    table = tmp_path / "route"
    table.write_text(
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
        "eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
        "eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
        "virbr0\t007AA8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
        "garbage\n"
    )
    routes = common.host_routes(str(table))
    assert routes == [
        (ipaddress.IPv4Network("0.0.0.0/0"), "eth0"),
        (ipaddress.IPv4Network("192.0.2.0/24"), "eth0"),
        (ipaddress.IPv4Network("192.168.122.0/24"), "virbr0"),
    ]
    # the default route overlaps everything and is no reason to refuse
    assert common.overlapping_route("10.213.7.0/24", routes) is None
    assert common.overlapping_route("192.168.122.128/25", routes) == (
        ipaddress.IPv4Network("192.168.122.0/24"),
        "virbr0",
    )
    assert common.overlapping_route("192.168.0.0/16", routes) == (ipaddress.IPv4Network("192.168.122.0/24"), "virbr0")
    assert common.host_routes(str(tmp_path / "missing")) == []


# ---- the libvirt adapter's route checks ----------------------------------------------------------

ROUTE_HEADER = "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\n"


@contextlib.asynccontextmanager
async def managed_networks_on(uri: str, storage: str, routes_file: str | None) -> AsyncIterator[LibvirtHypervisor]:
    """An opened adapter whose route check reads ``routes_file`` (None: no route check of its own).

    Leaves the libvirt it found: deletes its VMs (their networks with them) and fails if anything stays.
    """
    tag = uuid.uuid4().hex[:6]
    hv = LibvirtHypervisor(
        uri, storage, [storage], domain_type="qemu", owner=f"unit-{tag}", pool_name=f"clonebox-unit-{tag}"
    )
    hv.network_manager.check_routes = routes_file is not None
    hv.network_manager.routes_file = routes_file or "/nonexistent"
    await hv.open(lambda _ev: None)
    try:
        yield hv
    finally:
        for r in await hv.list():
            await hv.delete(r.name)
        left = await hv.inventory()
        await hv.remove_pool()
        await hv.close()
    assert left.is_empty(), left


def _vm(vm: str, network: str, subnet: ipaddress.IPv4Network, host: int) -> VmSpec:
    net = NetworkSpec(NetworkMode.MANAGED, network, str(subnet), str(subnet[host]), (vm,))
    return VmSpec(vm, memory_mib=64, disks=(DiskSpec("root", size_mib=8),), network=net)


async def test_a_subnet_a_host_route_overlaps_is_refused_before_anything_is_made(tmp_path: Path) -> None:
    """The test driver has no host network, so this adapter's route check is pointed at a table of the test's."""
    table = tmp_path / "route"
    table.write_text(ROUTE_HEADER + "br9\t0000A8C0\t0\t1\t0\t0\t0\t0000FFFF\n")  # 192.168.0.0/16 on br9
    async with managed_networks_on("test:///default", str(tmp_path / "storage"), str(table)) as hv:
        name = f"cb-unit-{uuid.uuid4().hex[:6]}"
        spec = _vm("u1", name, ipaddress.IPv4Network("192.168.7.0/24"), 10)
        for attempt in (hv.plan_create(spec, start=True), hv.create(spec, start=True)):
            with pytest.raises(FailedPrecondition) as err:
                await attempt
            assert err.value.reason == "NETWORK_SUBNET_IN_USE"
            assert "192.168.7.0/24" in err.value.message and "192.168.0.0/16 on interface br9" in err.value.message
            assert "choose another subnet" in err.value.message
        assert (await hv.inventory()).is_empty()
        assert await hv.network_state(name) is None
        # with the route gone, the same create works
        table.write_text(ROUTE_HEADER)
        await hv.create(spec, start=True)
        state = await hv.network_state(name)
        assert state is not None and state.dhcp_hosts[0].ip == "192.168.7.10"


@pytest.mark.libvirt
async def test_libvirts_own_in_use_check_is_reported_as_subnet_in_use(qemu_dir: str) -> None:
    """Where the adapter cannot see the routes (a remote libvirtd), libvirt's refusal at network start counts."""
    routes = [dest for dest, _iface in common.host_routes() if dest.prefixlen]
    blocks = ipaddress.IPv4Network("172.24.0.0/14").subnets(new_prefix=24)
    subnet = next(b for b in blocks if not any(b.overlaps(r) for r in routes))
    first, second = (f"cb-unit-{uuid.uuid4().hex[:6]}" for _ in range(2))
    async with managed_networks_on("qemu:///system", qemu_dir, None) as hv:
        await hv.create(_vm("u1", first, subnet, 10), start=False)  # its network is up: libvirt routes the subnet
        before = await hv.inventory()
        with pytest.raises(FailedPrecondition) as err:
            await hv.create(_vm("u2", second, subnet, 11), start=False)
        assert err.value.reason == "NETWORK_SUBNET_IN_USE"
        assert str(subnet) in err.value.message and common.bridge_name(first) in err.value.message
        assert await hv.inventory() == before
        assert await hv.network_state(second) is None
