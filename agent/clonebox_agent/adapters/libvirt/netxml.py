"""
Managed network XML built from typed models with ElementTree, and network XML read back.

A managed network (``NetworkMode.MANAGED``) is a NAT network on its own bridge (``common.bridge_name``),
the host on the subnet's first address, DHCP over the guest addresses. It carries the ownership mark in
``<metadata>``: ``<cb:network agent="OWNER" subnet="CIDR"/>`` in the domains' namespace. libvirt 9.0 keeps
a network's ``<metadata>`` as it was defined (``virNetworkSetMetadata`` arrived only in 9.7, so the mark
is written once, at define time); a network without the mark, or with another agent's, is never changed.

The VMs' host entries go in with ``virNetworkUpdate`` as the XML fragments built here; nothing formats
user input into XML text.
"""

from __future__ import annotations

import ipaddress
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from clonebox_agent.adapters.common import DhcpHost, DnsHost, NetworkState, dhcp_range, host_address
from clonebox_agent.adapters.libvirt.domxml import NAMESPACE

#: the ownership mark's element in a network's ``<metadata>``
MARK_TAG = f"{{{NAMESPACE}}}network"


@dataclass(frozen=True)
class NetworkConfig:
    """Everything a managed network's XML says."""

    name: str
    subnet: str
    bridge: str
    owner: str


def build_network(cfg: NetworkConfig) -> ET.Element:
    """Build the ``<network>`` element of a managed network."""
    subnet = ipaddress.IPv4Network(cfg.subnet)
    root = ET.Element("network")
    ET.SubElement(root, "name").text = cfg.name
    ET.SubElement(ET.SubElement(root, "metadata"), MARK_TAG, {"agent": cfg.owner, "subnet": str(subnet)})
    ET.SubElement(root, "forward", {"mode": "nat"})
    ET.SubElement(root, "bridge", {"name": cfg.bridge, "stp": "on", "delay": "0"})
    ip = ET.SubElement(root, "ip", {"address": str(host_address(cfg.subnet)), "prefix": str(subnet.prefixlen)})
    first, last = dhcp_range(cfg.subnet)
    ET.SubElement(ET.SubElement(ip, "dhcp"), "range", {"start": str(first), "end": str(last)})
    return root


def network_xml(cfg: NetworkConfig) -> str:
    """Network XML text for ``cfg``."""
    return ET.tostring(build_network(cfg), encoding="unicode")


def dhcp_host_xml(host: DhcpHost) -> str:
    """The ``<host>`` of ``virNetworkUpdate``'s IP_DHCP_HOST section."""
    attrs = {"mac": host.mac}
    if host.name:
        attrs["name"] = host.name
    attrs["ip"] = host.ip
    return ET.tostring(ET.Element("host", attrs), encoding="unicode")


def dns_host_xml(host: DnsHost) -> str:
    """The ``<host>`` of ``virNetworkUpdate``'s DNS_HOST section."""
    el = ET.Element("host", {"ip": host.ip})
    for name in host.names:
        ET.SubElement(el, "hostname").text = name
    return ET.tostring(el, encoding="unicode")


def parse_network(xml_text: str, *, active: bool) -> NetworkState:
    """What a network's XML says: owner mark, IPv4 subnet, bridge, DHCP and DNS host entries."""
    root = ET.fromstring(xml_text)
    mark = root.find(f"./metadata/{MARK_TAG}")
    bridge = root.find("bridge")
    subnet = ""
    dhcp: list[DhcpHost] = []
    for ip in root.findall("ip"):
        if ip.get("family", "ipv4") != "ipv4" or not ip.get("address"):
            continue
        prefix = ip.get("prefix") or ip.get("netmask") or "24"
        try:
            subnet = str(ipaddress.IPv4Interface(f"{ip.get('address')}/{prefix}").network)
        except ValueError:
            continue
        for host in ip.findall("./dhcp/host"):
            dhcp.append(DhcpHost(host.get("mac", ""), host.get("ip", ""), host.get("name", "")))
        break
    dns = [
        DnsHost(host.get("ip", ""), tuple(h.text or "" for h in host.findall("hostname")))
        for host in root.findall("./dns/host")
    ]
    return NetworkState(
        name=root.findtext("name") or "",
        uuid=root.findtext("uuid") or "",
        owner=mark.get("agent") if mark is not None else None,
        subnet=subnet,
        bridge=bridge.get("name", "") if bridge is not None else "",
        active=active,
        dhcp_hosts=tuple(dhcp),
        dns_hosts=tuple(dns),
    )


def interfaces_by_network(domain_xml: str) -> dict[str, tuple[str, ...]]:
    """MAC addresses of a domain's ``type="network"`` interfaces, by network ("" when none is set)."""
    root = ET.fromstring(domain_xml)
    out: dict[str, list[str]] = {}
    for iface in root.findall("./devices/interface"):
        if iface.get("type") != "network":
            continue
        source = iface.find("source")
        network = source.get("network") if source is not None else None
        if not network:
            continue
        mac = iface.find("mac")
        out.setdefault(network, []).append(mac.get("address", "").lower() if mac is not None else "")
    return {k: tuple(v) for k, v in out.items()}
