"""
Pure helpers behind the libvirt adapter's health-probe methods.

They make no libvirt calls, so unit tests feed them the JSON, statistics and XML libvirt would return
(and a fake sysfs folder).

Probe traffic must never leave the machine: ``probe_targets`` keeps only guest addresses inside the
subnet of an active libvirt network whose bridge is up on this host, so a packet to one of them goes
out of that bridge and nowhere else (an address outside every such subnet would follow the host's
default route).
"""

from __future__ import annotations

import ipaddress
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from clonebox_agent.ports import DomainStats, GuestFilesystem, ProbeTarget

#: IFF_UP in <linux/if.h>: the interface is administratively up
IFF_UP = 0x1

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class NetworkSubnets:
    """What a libvirt network's XML says about where its guests live."""

    bridge: str
    subnets: tuple[IpNetwork, ...]
    #: the host's own addresses on the bridge: traffic to them would probe the host, not a guest
    host_addresses: frozenset[str]


def filesystems_from_fsinfo(answer: Any) -> tuple[GuestFilesystem, ...]:
    """Parse qemu-ga's ``guest-get-fsinfo`` return value; entries without their use are left out.

    qemu-ga omits ``used-bytes``/``total-bytes`` where statvfs failed or means nothing (older agents,
    some pseudo filesystems): a filesystem without figures cannot be judged, so it is not reported.
    """
    out: list[GuestFilesystem] = []
    for entry in answer if isinstance(answer, list) else ():
        if not isinstance(entry, Mapping):
            continue
        used, total = entry.get("used-bytes"), entry.get("total-bytes")
        if not isinstance(used, int) or not isinstance(total, int):
            continue
        out.append(GuestFilesystem(str(entry.get("mountpoint", "")), str(entry.get("type", "")), used, total))
    return tuple(out)


def _int_or_none(value: Any) -> int | None:
    return int(value) if isinstance(value, int) else None


def has_statistics(stats: Mapping[str, Any]) -> bool:
    """Tell whether a bulk-statistics record has more than the state group.

    Drivers without statistics (libvirt 9.0's test driver) silently drop the groups they lack instead
    of failing the call, so an active domain reporting no CPU time and no vCPU count means "no data".
    """
    return "cpu.time" in stats or "vcpu.current" in stats


def domain_stats_from(name: str, stats: Mapping[str, Any], sampled_at: float, vcpus: int) -> DomainStats:
    """Build ``DomainStats`` from one ``getAllDomainStats`` record; ``vcpus`` when it has no count."""
    current = _int_or_none(stats.get("vcpu.current"))
    return DomainStats(
        name=name,
        sampled_at=sampled_at,
        vcpus=current if current is not None and current > 0 else vcpus,
        cpu_time_ns=_int_or_none(stats.get("cpu.time")),
        memory_available_kib=_int_or_none(stats.get("balloon.available")),
        memory_unused_kib=_int_or_none(stats.get("balloon.unused")),
    )


def attached_networks(domain_xml: str) -> tuple[str, ...]:
    """Names of the libvirt networks the domain's ``type="network"`` interfaces use, in order."""
    root = ET.fromstring(domain_xml)
    names: list[str] = []
    for iface in root.findall("./devices/interface"):
        if iface.get("type") != "network":
            continue
        source = iface.find("source")
        name = source.get("network") if source is not None else None
        if name and name not in names:
            names.append(name)
    return tuple(names)


def network_subnets(network_xml: str) -> NetworkSubnets | None:
    """Bridge and subnets of a libvirt network's XML; None when it has no bridge or no address."""
    root = ET.fromstring(network_xml)
    bridge_el = root.find("bridge")
    bridge = bridge_el.get("name", "") if bridge_el is not None else ""
    subnets: list[IpNetwork] = []
    hosts: set[str] = set()
    for ip in root.findall("ip"):
        address = ip.get("address")
        mask = ip.get("prefix") or ip.get("netmask")
        if not address or not mask:
            continue
        try:
            iface = ipaddress.ip_interface(f"{address}/{mask}")
        except ValueError:
            continue
        subnets.append(iface.network)
        hosts.add(str(iface.ip))
    if not bridge or not subnets:
        return None
    return NetworkSubnets(bridge, tuple(subnets), frozenset(hosts))


def bridge_is_up(bridge: str, sysfs_root: str) -> bool:
    """Tell whether ``bridge`` exists on this host and is administratively up (sysfs ``flags``)."""
    # the name comes from libvirt, but it becomes a path: never let it climb out of class/net
    if not bridge or "/" in bridge or bridge in (".", ".."):
        return False
    try:
        with open(os.path.join(sysfs_root, "class", "net", bridge, "flags"), encoding="ascii") as f:
            flags = int(f.read().strip(), 16)
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return False
    return bool(flags & IFF_UP)


def probe_targets(
    addresses: Iterable[str], active_network_xmls: Iterable[str], sysfs_root: str
) -> tuple[ProbeTarget, ...]:
    """The addresses that lie in a subnet of one of the (active) networks whose bridge is up.

    ``active_network_xmls``: XML of the active networks the VM is attached to. Each address appears
    at most once, in the order given, with the bridge of the first network that contains it.
    """
    usable: list[NetworkSubnets] = []
    for xml in active_network_xmls:
        net = network_subnets(xml)
        if net is not None and bridge_is_up(net.bridge, sysfs_root):
            usable.append(net)
    out: list[ProbeTarget] = []
    seen: set[str] = set()
    for text in addresses:
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            continue
        key = str(ip)
        if key in seen:
            continue
        for net in usable:
            if key not in net.host_addresses and any(ip in subnet for subnet in net.subnets):
                out.append(ProbeTarget(key, net.bridge))
                seen.add(key)
                break
    return tuple(out)
