"""
The libvirt side of managed networks: define and start, the VMs' host entries, release, orphans.

Blocking: ``LibvirtHypervisor`` calls these on its worker threads, with its (counted, traced) connection.
Everything that changes one network holds that network's re-entrant lock (``lock``): a create holds it
from its network steps until its domain is defined, so under the lock every host entry whose MAC is on no
defined domain is a leftover, and a network no domain is attached to is unused. Only networks carrying
this adapter's ownership mark (``netxml``) are ever changed or removed.

Journal steps (undo kinds): ``network-define`` (``network``: destroy and undefine the network, only if it
is still the one the step defined and no domain is attached to it) and ``network-host`` (``network-host``:
remove the VM's DHCP and DNS host entries).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import libvirt

from clonebox_agent.adapters import common
from clonebox_agent.adapters.common import DhcpHost, DnsHost, NetworkState
from clonebox_agent.adapters.libvirt import netxml
from clonebox_agent.adapters.libvirt.errors import is_code, message_of
from clonebox_agent.ports import StepLog
from clonebox_core.errors import CloneboxError
from clonebox_core.model import NetworkSpec
from clonebox_core.validate import MANAGED_NETWORK_PREFIX

log = logging.getLogger(__name__)

#: host entries change the running network and its persistent definition alike
_LIVE_AND_CONFIG = libvirt.VIR_NETWORK_UPDATE_AFFECT_LIVE | libvirt.VIR_NETWORK_UPDATE_AFFECT_CONFIG
#: what libvirt says when a network's subnet is already routed through another interface (at start)
_IN_USE = "Network is already in use"

#: maps a libvirtError while doing ``action`` for ``vm`` to a CloneBox error (the adapter's ``_error``)
ErrorMapper = Callable[[BaseException, str | None, str], CloneboxError]


class ManagedNetworks:
    """Managed networks of one adapter (``owner``); ``check_routes``: refuse subnets this host routes already."""

    def __init__(self, owner: str, *, check_routes: bool, error: ErrorMapper) -> None:
        self.owner = owner
        self.check_routes = check_routes
        #: where this host's IPv4 routes are read (tests point it elsewhere)
        self.routes_file = "/proc/net/route"
        self._error = error
        self._locks: dict[str, threading.RLock] = {}
        self._guard = threading.Lock()

    def lock(self, network: str) -> threading.RLock:
        """The lock that serializes every change of ``network`` (re-entrant: an undo inside a create takes it again)."""
        with self._guard:
            return self._locks.setdefault(network, threading.RLock())

    # ---- reading ------------------------------------------------------------------------------

    def state(self, conn: Any, name: str) -> tuple[Any, NetworkState] | None:
        """The network ``name`` and what its XML says (None when there is none)."""
        try:
            network = conn.networkLookupByName(name)
            return network, netxml.parse_network(network.XMLDesc(0), active=bool(network.isActive()))
        except libvirt.libvirtError as exc:
            if is_code(exc, "VIR_ERR_NO_NETWORK"):
                return None
            raise

    def users(self, conn: Any) -> dict[str, dict[str, tuple[str, ...]]]:
        """Every defined domain (anyone's) with interfaces on a network: network -> domain -> MACs."""
        out: dict[str, dict[str, tuple[str, ...]]] = {}
        for dom in conn.listAllDomains(0):
            try:
                xml = dom.XMLDesc(0)
            except libvirt.libvirtError as exc:
                if is_code(exc, "VIR_ERR_NO_DOMAIN"):
                    continue  # undefined meanwhile
                raise
            for network, macs in netxml.interfaces_by_network(xml).items():
                out.setdefault(network, {})[str(dom.name())] = macs
        return out

    def owned(self, conn: Any) -> list[NetworkState]:
        """The managed networks carrying this adapter's mark, by name."""
        found: list[NetworkState] = []
        for network in conn.listAllNetworks(0):
            name = str(network.name())
            if not name.startswith(MANAGED_NETWORK_PREFIX):
                continue
            try:
                state = netxml.parse_network(network.XMLDesc(0), active=bool(network.isActive()))
            except libvirt.libvirtError as exc:
                if is_code(exc, "VIR_ERR_NO_NETWORK"):
                    continue
                raise
            if state.owner == self.owner:
                found.append(state)
        return sorted(found, key=lambda s: s.name)

    # ---- create -------------------------------------------------------------------------------

    def preflight(self, conn: Any, net: NetworkSpec, vm: str) -> None:
        """The refusals of a create, before anything is made (``ensure`` checks again under the lock)."""
        found = self.state(conn, net.libvirt_network)
        if found is not None:
            _network, state = found
            common.check_existing_network(state, net, self.owner, vm)
            if state.active:
                return
            self._check_routes(net, vm, skip=state.bridge)
            return
        self._check_routes(net, vm)

    def describe_define(self, net: NetworkSpec) -> str:
        """What ``ensure`` does for a network that does not exist yet (a dry run's step)."""
        first, last = common.dhcp_range(net.subnet)
        return (
            f"network-define: define, start and autostart libvirt network {net.libvirt_network} (NAT, bridge "
            f"{common.bridge_name(net.libvirt_network)}, host {common.host_address(net.subnet)}, "
            f"DHCP {first}-{last})"
        )

    def exists(self, conn: Any, name: str) -> bool:
        """Whether a network of that name exists."""
        return self.state(conn, name) is not None

    def ensure(self, conn: Any, net: NetworkSpec, vm: str, steps: StepLog) -> Any:
        """The VM's network, active: defined (step ``network-define``), started and set to autostart when missing.

        The caller holds ``lock(net.libvirt_network)``.
        """
        name = net.libvirt_network
        found = self.state(conn, name)
        if found is not None:
            network, state = found
            common.check_existing_network(state, net, self.owner, vm)
            if not state.active:
                self._check_routes(net, vm, skip=state.bridge)
                self._start(network, net, vm)
            return network
        self._check_routes(net, vm)
        cfg = netxml.NetworkConfig(name, str(ipaddress.IPv4Network(net.subnet)), common.bridge_name(name), self.owner)
        n = steps.planned("network-define", {"kind": "network", "name": name})
        try:
            network = conn.networkDefineXML(netxml.network_xml(cfg))
        except libvirt.libvirtError as exc:
            raise self._error(exc, vm, f"define network {name} for") from None
        steps.made(n, {"uuid": str(network.UUIDString())})
        self._start(network, net, vm)
        # the test driver keeps no autostart state; a host without it still works until its next boot
        with contextlib.suppress(libvirt.libvirtError):
            network.setAutostart(1)
        return network

    def add_host(self, conn: Any, network: Any, net: NetworkSpec, vm: str, mac: str, steps: StepLog) -> None:
        """Add the VM's DHCP and DNS host entries, live and persistent (step ``network-host``).

        The caller holds the network's lock. Leftover entries in the way are replaced; a live VM's are
        refused (NETWORK_ADDRESS_IN_USE, NETWORK_NAME_IN_USE).
        """
        name = net.libvirt_network
        state = netxml.parse_network(network.XMLDesc(0), active=bool(network.isActive()))
        dhcp, dns = common.host_entries(net, mac)
        live = {m for macs in self.users(conn).get(name, {}).values() for m in macs}
        stale_dhcp, stale_dns = common.entries_to_replace(state, dhcp, dns, live, vm)
        for entry in [*stale_dhcp, *stale_dns]:
            log.warning("network %s: replacing the leftover host entry %s", name, entry)
        self._drop(network, state, vm, stale_dhcp, stale_dns)
        n = steps.planned("network-host", common.host_entry_undo(net, mac))
        self._update(network, state.active, vm, libvirt.VIR_NETWORK_SECTION_IP_DHCP_HOST, netxml.dhcp_host_xml(dhcp))
        # recorded once the first entry is in: undo removes whichever of the two exist
        steps.made(n, {"uuid": state.uuid})
        if dns is not None:
            self._update(network, state.active, vm, libvirt.VIR_NETWORK_SECTION_DNS_HOST, netxml.dns_host_xml(dns))

    # ---- delete, undo, orphans ----------------------------------------------------------------

    def release(self, conn: Any, net: NetworkSpec, domain: str, macs: Iterable[str], vm: str) -> list[str]:
        """Remove the host entries of ``domain`` (a VM being deleted), and the network when no other domain uses it.

        Idempotent: entries or network already gone are fine. A network without this adapter's mark is
        never touched. Returns what was removed.
        """
        name = net.libvirt_network
        with self.lock(name):
            found = self.state(conn, name)
            if found is None:
                return []
            network, state = found
            if state.owner != self.owner:
                return []
            others = {d: m for d, m in self.users(conn).get(name, {}).items() if d != domain}
            others_live = {m for ms in others.values() for m in ms}
            dhcp, dns = common.entries_to_drop(state, macs, net.address, others_live)
            removed = self._drop(network, state, vm, dhcp, dns)
            if not others:
                removed.append(self._remove(network, state))
            return removed

    def undo_define(self, conn: Any, undo: Mapping[str, str], identity: Mapping[str, str]) -> str:
        """Undo of ``network-define``: destroy and undefine the network if it is that one and unused."""
        with self.lock(undo["name"]):
            found = self._same(conn, undo["name"], identity)
            if found is None or self.users(conn).get(undo["name"]):
                return ""  # gone, replaced, or another VM joined it since: it stays for them
            return self._remove(*found)

    def undo_host(self, conn: Any, undo: Mapping[str, str], identity: Mapping[str, str]) -> str:
        """Undo of ``network-host``: remove the VM's DHCP and DNS host entries if the network is still that one."""
        with self.lock(undo["network"]):
            found = self._same(conn, undo["network"], identity)
            if found is None:
                return ""
            network, state = found
            # the domain of this step is undone before it (reverse order): every attached one is another VM's
            others_live = {m for ms in self.users(conn).get(state.name, {}).values() for m in ms}
            dhcp, dns = common.entries_to_drop(state, [undo["mac"]], undo["address"], others_live)
            return ", ".join(self._drop(network, state, "", dhcp, dns))

    def _same(self, conn: Any, name: str, identity: Mapping[str, str]) -> tuple[Any, NetworkState] | None:
        """The network ``name`` if it is still the one a step recorded (its UUID) and carries this adapter's mark."""
        found = self.state(conn, name)
        if found is None or found[1].uuid != identity.get("uuid") or found[1].owner != self.owner:
            return None
        return found

    def orphans(self, conn: Any) -> dict[str, list[str]]:
        """Managed networks of this adapter that no domain is attached to, by ``common.network_orphan_key``."""
        out: dict[str, list[str]] = {}
        users = self.users(conn)
        for state in self.owned(conn):
            if users.get(state.name):
                continue
            lock = self.lock(state.name)
            if not lock.acquire(blocking=False):
                continue  # a create or delete is changing it right now
            try:
                # again under the lock: a create may have defined its domain since the first look
                if not self.users(conn).get(state.name) and self.state(conn, state.name) is not None:
                    out[common.network_orphan_key(state.name)] = [common.describe_network(state)]
            finally:
                lock.release()
        return out

    def remove_orphan(self, conn: Any, name: str) -> list[str]:
        """Remove managed network ``name`` if it is this adapter's and no domain is attached to it."""
        with self.lock(name):
            found = self.state(conn, name)
            if found is None:
                return []
            network, state = found
            if state.owner != self.owner or self.users(conn).get(name):
                return []
            return [self._remove(network, state)]

    # ---- plumbing -----------------------------------------------------------------------------

    def _check_routes(self, net: NetworkSpec, vm: str, *, skip: str = "") -> None:
        if not self.check_routes:
            return
        routes = [r for r in common.host_routes(self.routes_file) if not skip or r[1] != skip]
        hit = common.overlapping_route(net.subnet, routes)
        if hit is not None:
            raise common.network_subnet_in_use(
                net.libvirt_network, net.subnet, f"route {hit[0]} on interface {hit[1]}", vm
            )

    def _start(self, network: Any, net: NetworkSpec, vm: str) -> None:
        try:
            network.create()
        except libvirt.libvirtError as exc:
            if is_code(exc, "VIR_ERR_OPERATION_INVALID") and network.isActive():
                return  # started meanwhile
            if _IN_USE in message_of(exc):
                raise common.network_subnet_in_use(net.libvirt_network, net.subnet, message_of(exc), vm) from None
            raise self._error(exc, vm, f"start network {net.libvirt_network} for") from None

    def _update(self, network: Any, active: bool, vm: str, section: int, xml: str, *, delete: bool = False) -> None:
        command = libvirt.VIR_NETWORK_UPDATE_COMMAND_DELETE if delete else libvirt.VIR_NETWORK_UPDATE_COMMAND_ADD_LAST
        flags = _LIVE_AND_CONFIG if active else libvirt.VIR_NETWORK_UPDATE_AFFECT_CONFIG
        try:
            network.update(command, section, -1, xml, flags)
        except libvirt.libvirtError as exc:
            what = "remove a host entry from" if delete else "add a host entry to"
            raise self._error(exc, vm or None, f"{what} network {network.name()}{' for' if vm else ''}") from None

    def _drop(
        self, network: Any, state: NetworkState, vm: str, dhcp: Iterable[DhcpHost], dns: Iterable[DnsHost]
    ) -> list[str]:
        removed: list[str] = []
        for h in dhcp:
            xml = netxml.dhcp_host_xml(h)
            self._update(network, state.active, vm, libvirt.VIR_NETWORK_SECTION_IP_DHCP_HOST, xml, delete=True)
            removed.append(f"DHCP host {h.mac} -> {h.ip} of network {state.name}")
        for d in dns:
            xml = netxml.dns_host_xml(d)
            self._update(network, state.active, vm, libvirt.VIR_NETWORK_SECTION_DNS_HOST, xml, delete=True)
            removed.append(f"DNS host {d.ip} ({', '.join(d.names)}) of network {state.name}")
        return removed

    @staticmethod
    def _remove(network: Any, state: NetworkState) -> str:
        try:
            if network.isActive():
                network.destroy()
        except libvirt.libvirtError as exc:
            if not (is_code(exc, "VIR_ERR_NO_NETWORK") or is_code(exc, "VIR_ERR_OPERATION_INVALID")):
                raise
        try:
            network.undefine()
        except libvirt.libvirtError as exc:
            if not is_code(exc, "VIR_ERR_NO_NETWORK"):
                raise
        return common.describe_network(state)
