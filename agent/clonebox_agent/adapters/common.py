"""
Pieces both hypervisor adapters share, so the fake and libvirt cannot drift apart.

- the naming scheme of everything an adapter makes (domain, volumes, seed ISO, per-VM folder);
- the ownership mark put on every file (the ``user.clonebox.owner`` extended attribute);
- scripted faults and delays at named steps (the fake's ``fail_on``/``delays``; the libvirt adapter
  takes the same mapping so contract and fault tests can break both at the same step);
- ``Inventory``: what an adapter has made, for leak checks and garbage collection;
- managed networks (``NetworkMode.MANAGED``): their names, host entries, the checks and errors both
  adapters apply (the libvirt adapter keeps them in libvirt networks, the fake in memory).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import grp
import hashlib
import ipaddress
import json
import logging
import os
import secrets
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from clonebox_agent.ports import NETWORK_ORPHAN_PREFIX, UPDATE_FIELDS, Capability, StepLog, TxnStep
from clonebox_core import specjson
from clonebox_core.errors import FailedPrecondition, InvalidArgument, NotFound, invalid_field
from clonebox_core.model import NetworkMode, NetworkSpec, StepState, VmSpec
from clonebox_core.secret import MASK, Secret
from clonebox_core.snapshots import SnapshotKind
from clonebox_core.validate import guest_range

_log = logging.getLogger(__name__)

MIB = 1024 * 1024

#: what real QEMU on a local libvirtd declares (and so, by default, the fake)
QEMU_CAPABILITIES: frozenset[Capability] = frozenset(Capability)
#: libvirt's test driver: in-memory domains that emit events; no guest, ACPI, streams, stats or files
TEST_DRIVER_CAPABILITIES: frozenset[Capability] = frozenset({Capability.EVENTS})

#: extended attribute carrying the owning VM's name on every file and volume an adapter makes
OWNER_XATTR = "user.clonebox.owner"

#: sub-folder of ``storage_dir`` that is the storage pool (flat: one file per volume)
POOL_SUBDIR = "pool"
#: sub-folder of ``storage_dir`` holding one folder per VM (console log); kept out of the pool
#: because a libvirt dir pool lists sub-folders as volumes
VMS_SUBDIR = "vms"

#: named steps of ``create`` at which a fault can be scripted; each runs after that stage is done
#: (``create:start`` only when asked to start; ``create:network`` also when the VM has no managed network)
CREATE_STEPS = ("create:validated", "create:disks", "create:seed", "create:network", "create:define", "create:start")
#: named steps of ``delete`` (``delete:network``: the VM's host entries, and its managed network if it was
#: the last VM on it, are gone)
DELETE_STEPS = ("delete:destroyed", "delete:network", "delete:undefined", "delete:volumes")


#: sub-folder of ``storage_dir`` holding the metadata of agent volumes (``NAME.json``); kept out of the pool
VOLUMES_SUBDIR = "volumes"
#: pool files of agent volumes (``CreateVolume``) start with this. It is no DNS label and no domain name
#: prefix, so a volume file never looks like a VM's disk (``volume_prefix``) to delete or the orphan sweep
AGENT_VOLUME_PREFIX = "vol."
#: prefix of an agent volume's disk serial: the guest finds it as /dev/disk/by-id/virtio-vol-NAME
VOLUME_SERIAL_PREFIX = "vol-"


def agent_volume_file(name: str, shared: bool) -> str:
    """Pool file of agent volume ``name``: qcow2 for one writer, raw when shared (QEMU shares only raw)."""
    return f"{AGENT_VOLUME_PREFIX}{name}.{'raw' if shared else 'qcow2'}"


def agent_volume_files(name: str) -> tuple[str, str]:
    """Both pool files agent volume ``name`` may have (a half-made one has no metadata saying which)."""
    return agent_volume_file(name, False), agent_volume_file(name, True)


def is_agent_volume_file(filename: str) -> bool:
    """Whether a pool file name is an agent volume's (never a VM's disk, never an orphan)."""
    return filename.startswith(AGENT_VOLUME_PREFIX)


def volume_serial(name: str) -> str:
    """The disk serial of agent volume ``name`` (QEMU hands a virtio guest its first 20 characters)."""
    return VOLUME_SERIAL_PREFIX + name


def check_name_prefix(name_prefix: str) -> None:
    """ValueError for a domain name prefix under which agent volume files would look like a VM's disks."""
    if not name_prefix or AGENT_VOLUME_PREFIX.startswith(name_prefix) or name_prefix.startswith(AGENT_VOLUME_PREFIX):
        raise ValueError(f"name_prefix {name_prefix!r} must not be empty nor overlap {AGENT_VOLUME_PREFIX!r}")


def volume_name(domain: str, disk: str) -> str:
    """Pool volume of one disk. '.' cannot occur in a DNS label, so ``{domain}.`` is an unambiguous prefix."""
    return f"{domain}.{disk}.qcow2"


def seed_volume_name(domain: str) -> str:
    """Pool volume of the cloud-init NoCloud seed ISO."""
    return f"{domain}.cidata.iso"


def volume_prefix(domain: str) -> str:
    """Every volume made for ``domain`` starts with this."""
    return f"{domain}."


def vm_dir(storage_dir: str, domain: str) -> str:
    """Per-VM folder (console log); refuses a domain name that would lead outside ``storage_dir/vms``."""
    if not domain or "/" in domain or domain in (".", "..") or "\x00" in domain:
        # the use cases validate names first; this keeps a bug there from reaching rmtree
        raise InvalidArgument(f"name: {domain[:64]!r} is not a VM name", reason="INVALID_NAME")
    return os.path.join(storage_dir, VMS_SUBDIR, domain)


def console_log_path(storage_dir: str, domain: str) -> str:
    """Where a VM's serial console log is kept (virtlogd writes it; ``ReadConsole`` reads it)."""
    return os.path.join(vm_dir(storage_dir, domain), "console.log")


#: the group QEMU runs as on Debian (libvirt's qemu.conf default there)
QEMU_GROUP = "libvirt-qemu"


def restrict_to_qemu(path: str) -> None:
    """
    Make ``path`` a 0710 root:libvirt-qemu folder.

    QEMU's user can reach files inside (which libvirt hands to it per domain) but cannot list it;
    nobody else can enter. Where the group does not exist (QEMU under another name), or the agent is
    not root and so cannot change the folder's group, the folder is 0711 (enter, never list).
    """
    try:
        gid = grp.getgrnam(QEMU_GROUP).gr_gid
    except KeyError:
        os.chmod(path, 0o711)
        return
    if os.geteuid() != 0:
        # only root can hand the folder to QEMU's group: without it, enter-only is the private best
        os.chmod(path, 0o711)
        return
    os.chown(path, 0, gid)
    os.chmod(path, 0o710)


def pool_dir(storage_dir: str) -> str:
    """Folder of the adapter's storage pool."""
    return os.path.join(storage_dir, POOL_SUBDIR)


def mark_owned(path: str, vm: str) -> None:
    """Put the ownership mark on ``path`` (file or folder)."""
    os.setxattr(path, OWNER_XATTR, vm.encode(), follow_symlinks=False)


def owner_of(path: str) -> str | None:
    """Return the VM that owns ``path`` by its mark, or None when unmarked or gone."""
    try:
        return os.getxattr(path, OWNER_XATTR, follow_symlinks=False).decode()
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOENT, errno.ENOTSUP, errno.EOPNOTSUPP):
            return None
        raise


@dataclass(frozen=True)
class Fault:
    """A scripted failure: raise ``error`` the next ``times`` times the step is reached (None: always)."""

    error: BaseException
    times: int | None = 1


#: a step hook sees every named step (``create:disks``...) before faults apply; fault tests use it to
#: kill the process at a precise point
StepHook = Callable[[str], None]


@dataclass
class Faults:
    """
    Scripted faults and delays at named steps.

    Steps are method names such as ``create`` or stages such as ``create:disks``. A bare exception in
    ``fail_on`` is raised every time; wrap it in ``Fault`` to raise it a limited number of times.
    """

    fail_on: dict[str, BaseException | Fault] = field(default_factory=dict)
    delays: dict[str, float] = field(default_factory=dict)
    hook: StepHook | None = None

    @classmethod
    def of(
        cls,
        fail_on: Mapping[str, BaseException | Fault] | None,
        delays: Mapping[str, float] | None,
        hook: StepHook | None = None,
    ) -> Faults:
        """Build from optional constructor arguments."""
        return cls(dict(fail_on or {}), dict(delays or {}), hook)

    def pending_delay(self, step: str) -> float:
        """Seconds to wait at ``step`` (0 when none)."""
        return self.delays.get(step, 0.0)

    def check(self, step: str) -> None:
        """Run the hook and raise the scripted fault of ``step``, if any (no delay: see ``pending_delay``)."""
        if self.hook is not None:
            self.hook(step)
        entry = self.fail_on.get(step)
        if entry is None:
            return
        if isinstance(entry, Fault):
            if entry.times is not None:
                if entry.times <= 1:
                    del self.fail_on[step]
                else:
                    self.fail_on[step] = Fault(entry.error, entry.times - 1)
            raise entry.error
        raise entry

    def check_blocking(self, step: str) -> None:
        """``check`` preceded by the step's delay, for code that runs in a worker thread."""
        delay = self.pending_delay(step)
        if delay > 0:
            time.sleep(delay)
        self.check(step)


@dataclass(frozen=True)
class Inventory:
    """
    What an adapter owns right now: domains, pool volumes, and marked files under its storage dir.

    ``files`` pairs each marked path with the VM named in its mark. Leak checks compare inventories;
    crash recovery can delete what no VM accounts for.
    """

    domains: tuple[str, ...] = ()
    volumes: tuple[str, ...] = ()
    files: tuple[tuple[str, str], ...] = ()
    #: managed networks this adapter made (shared by the VMs on them, so never part of ``for_vm``)
    networks: tuple[str, ...] = ()
    #: agent volumes (``create_volume``) by name, their metadata or their pool file: they outlive VMs, so
    #: they are never part of ``for_vm`` and never orphans
    agent_volumes: tuple[str, ...] = ()

    def for_vm(self, vm: str, domain: str) -> Inventory:
        """Return the part that belongs to one VM (domain by name, volumes by prefix, files by mark)."""
        return Inventory(
            tuple(d for d in self.domains if d == domain),
            tuple(v for v in self.volumes if v.startswith(volume_prefix(domain)) and not is_agent_volume_file(v)),
            tuple(f for f in self.files if f[1] == vm),
        )

    def is_empty(self) -> bool:
        """Tell whether nothing is owned."""
        return not (self.domains or self.volumes or self.files or self.networks or self.agent_volumes)

    def orphans(self, prefix: str, keep: Iterable[str] = ()) -> dict[str, list[str]]:
        """Volumes and marked files of VMs that have no domain (and are not in ``keep``), by VM name.

        ``prefix`` is the adapter's domain name prefix. A volume belongs to the VM its name starts with
        (``{prefix}{vm}.``); a file to the VM its mark names.
        """
        live = {d.removeprefix(prefix) for d in self.domains if d.startswith(prefix)} | set(keep)
        out: dict[str, list[str]] = {}
        for volume in self.volumes:
            if is_agent_volume_file(volume):
                continue  # an agent volume outlives every VM: never a leftover
            vm = volume.removeprefix(prefix).split(".", 1)[0]
            if volume.startswith(prefix) and vm not in live:
                out.setdefault(vm, []).append(volume)
        for path, vm in self.files:
            # a volume's file is the same leftover as the volume: name it once
            if vm not in live and os.path.basename(path) not in out.get(vm, []):
                out.setdefault(vm, []).append(path)
        return out


def marked_files(root: str) -> tuple[tuple[str, str], ...]:
    """(path, owner) of every marked path under ``root``."""
    out: list[tuple[str, str]] = []
    if not os.path.isdir(root):
        return ()
    for dirpath, dirnames, filenames in os.walk(root):
        for entry in [*dirnames, *filenames]:
            path = os.path.join(dirpath, entry)
            owner = owner_of(path)
            if owner is not None:
                out.append((path, owner))
    return tuple(sorted(out))


#: a random value written on each file or folder a step makes: inode numbers are reused once a file is
#: deleted, so (device, inode) alone could match a newer file at the same path
NONCE_XATTR = "user.clonebox.nonce"


def stamp_identity(path: str) -> dict[str, str]:
    """Give what a step just made at ``path`` a fresh identity, and return it."""
    os.setxattr(path, NONCE_XATTR, uuid.uuid4().hex.encode(), follow_symlinks=False)
    return file_identity(path)


def file_identity(path: str) -> dict[str, str]:
    """The identity of the file or folder at ``path`` ({} when there is none)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return {}
    try:
        nonce = os.getxattr(path, NONCE_XATTR, follow_symlinks=False).decode()
    except OSError:
        nonce = ""
    return {"dev": str(st.st_dev), "inode": str(st.st_ino), "nonce": nonce}


def undo_folder(path: str, identity: Mapping[str, str]) -> str:
    """Remove the folder a step made, if it is still that folder; what was removed ("" if nothing)."""
    if file_identity(path) != dict(identity):
        return ""
    shutil.rmtree(path, ignore_errors=True)
    return path


class MemoryStepLog:
    """A ``StepLog`` kept in memory: rollback after an error without a journal (tests, direct adapter use)."""

    def __init__(self) -> None:
        self._steps: list[TxnStep] = []

    def planned(self, name: str, undo: Mapping[str, str]) -> int:
        """See ``StepLog``."""
        self._steps.append(TxnStep(len(self._steps) + 1, name, dict(undo), None, StepState.PLANNED))
        return len(self._steps)

    def made(self, n: int, identity: Mapping[str, str]) -> None:
        """See ``StepLog``."""
        self._steps[n - 1] = dataclasses.replace(self._steps[n - 1], identity=dict(identity), state=StepState.DONE)

    def undone(self, n: int, ok: bool) -> None:
        """See ``StepLog``."""
        state = StepState.UNDONE if ok else StepState.UNDO_FAILED
        self._steps[n - 1] = dataclasses.replace(self._steps[n - 1], state=state)

    def steps(self) -> list[TxnStep]:
        """See ``StepLog``."""
        return list(self._steps)


def roll_back(log: StepLog, undo: Callable[[Mapping[str, str], Mapping[str, str] | None], str], vm: str) -> list[str]:
    """Undo the steps of ``log`` in reverse order (blocking); what was removed.

    A step that was only planned made nothing (its action raised); an undo that raises is recorded as
    failed and the others still run, so one stuck artifact never keeps the rest behind.
    """
    removed: list[str] = []
    for step in reversed(log.steps()):
        if step.state not in (StepState.PLANNED, StepState.DONE):
            continue
        try:
            what = undo(step.undo, step.identity) if step.state == StepState.DONE else ""
        except Exception:
            _log.exception("rollback of step %s of %s failed", step.name, vm)
            log.undone(step.n, False)
            continue
        if what:
            removed.append(what)
        log.undone(step.n, True)
    return removed


def check_room(folder: str, need_bytes: int, vm: str, *, volume: str = "") -> None:
    """Pre-flight: FailedPrecondition POOL_FULL unless ``folder``'s file system has ``need_bytes`` free.

    Disks are thin (qcow2), but a VM may fill them: the room checked is their full virtual size, so a
    host never accepts VMs that cannot all grow to the size they were promised.
    """
    try:
        st = os.statvfs(folder)
    except FileNotFoundError:
        return  # the pool folder is made on first use; its parent file system is checked then
    free = st.f_bavail * st.f_frsize
    if free < need_bytes and volume:
        raise FailedPrecondition(
            f"volume {volume} needs {need_bytes // MIB} MiB but the storage pool at {folder} has "
            f"{free // MIB} MiB free; free space or give the volume a smaller size",
            reason="POOL_FULL",
            metadata={"volume": volume, "need_mib": str(need_bytes // MIB), "free_mib": str(free // MIB)},
        )
    if free < need_bytes:
        raise FailedPrecondition(
            f"VM {vm} needs {need_bytes // MIB} MiB for its disks but the storage pool at {folder} has "
            f"{free // MIB} MiB free; free space or give the disks smaller sizes",
            reason="POOL_FULL",
            metadata={"vm": vm, "need_mib": str(need_bytes // MIB), "free_mib": str(free // MIB)},
        )


def redacted_spec(spec: VmSpec) -> VmSpec:
    """``spec`` with its user-data masked: what a dry run may show (the XML's metadata carries the spec)."""
    if spec.cloud_init is None or not spec.cloud_init.user_data:
        return spec
    return dataclasses.replace(spec, cloud_init=dataclasses.replace(spec.cloud_init, user_data=Secret(MASK)))


# ---- updates (``Hypervisor.update``) -----------------------------------------------------------------

#: the one step of an update, and the undo kind that puts a domain's previous four values back
UPDATE_STEP = "redefine"
DEFINITION_UNDO = "definition"
#: the named step of ``update`` at which a fault can be scripted: the new values are in the definition
UPDATE_REDEFINED = "update:redefined"


def update_fields(spec: VmSpec) -> dict[str, Any]:
    """The ``UPDATE_FIELDS`` of ``spec`` in the JSON form a spec has at rest (none of them is secret).

    ``health_checks`` is absent when there are none, as ``specjson`` writes it.
    """
    data = specjson.spec_to_dict(spec, secrets="digest")
    return {k: data[k] for k in UPDATE_FIELDS if k in data}


def fields_text(fields: Mapping[str, Any]) -> str:
    """One stable text of ``update_fields`` (for step records: the undo's and the identity's)."""
    return json.dumps(dict(fields), sort_keys=True, separators=(",", ":"))


def patch_fields(data: Mapping[str, Any], fields: Mapping[str, Any]) -> dict[str, Any]:
    """A spec's JSON form (``specjson``) with its ``UPDATE_FIELDS`` replaced by ``fields``; the rest as it is."""
    out = dict(data)
    for key in UPDATE_FIELDS:
        if key in fields:
            out[key] = fields[key]
        else:
            out.pop(key, None)
    return out


def with_fields(spec: VmSpec, fields: Mapping[str, Any]) -> VmSpec:
    """``spec`` with its four updatable fields from ``fields`` (``update_fields`` form); every other field kept."""
    parsed = specjson.spec_from_dict(patch_fields(specjson.spec_to_dict(spec, secrets="digest"), fields))
    return dataclasses.replace(
        spec,
        health_checks=parsed.health_checks,
        labels=parsed.labels,
        memory_mib=parsed.memory_mib,
        vcpus=parsed.vcpus,
    )


def definition_undo(vm: str, domain: str, old: Mapping[str, Any]) -> dict[str, str]:
    """The undo record of an update's ``redefine`` step: the previous four values of ``vm``."""
    return {"kind": DEFINITION_UNDO, "vm": vm, "name": domain, "fields": fields_text(old)}


def resources_of(fields: Mapping[str, Any]) -> tuple[int, int]:
    """(vCPUs, MiB) of an ``update_fields`` mapping."""
    return int(fields["vcpus"]), int(fields["memory_mib"])


def check_snapshot_kind(vm: str, snapshot: str, kind: SnapshotKind, existing: Iterable[SnapshotKind]) -> None:
    """FailedPrecondition SNAPSHOT_KIND_CONFLICT unless ``kind`` is the kind of the VM's ``existing`` snapshots.

    An internal snapshot lives in the file that was active when it was taken; once overlays move the
    active file, libvirt 9.0 can no longer revert one (and merging would destroy it).
    """
    kinds = set(existing)
    if kinds and kind not in kinds:
        raise FailedPrecondition(
            f"VM {vm} has {kinds.pop().value} snapshots: it cannot also take {kind.value} ones; delete them first",
            reason="SNAPSHOT_KIND_CONFLICT",
            metadata={"vm": vm, "snapshot": snapshot},
        )


# ---- managed networks -------------------------------------------------------------------------
#
# A VM whose spec says ``network.mode: MANAGED`` is attached to a libvirt network that the adapter makes
# for it (a plan's VMs share one): NAT, a bridge named after the network, the host on the subnet's first
# address, DHCP on the subnet. Each VM adds a DHCP host entry (its MAC -> its fixed address, named after
# its first DNS name) and a DNS host entry (its address -> all its DNS names); the network goes with the
# last VM on it. Only networks carrying this adapter's ownership mark are ever changed or removed.

#: prefix of the bridge of a managed network ("virbr" is libvirt's own)
BRIDGE_PREFIX = "cbr-"
#: Linux interface names are at most 15 characters
MAX_BRIDGE_NAME = 15


def bridge_name(network: str) -> str:
    """The bridge of managed network ``network``: ``cbr-`` + 8 hex digits of a hash of its name (12 characters)."""
    return BRIDGE_PREFIX + hashlib.sha256(network.encode()).hexdigest()[:8]


def new_mac() -> str:
    """A random MAC address in QEMU's ``52:54:00`` range, for a VM's interface on a managed network."""
    return "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))


@dataclass(frozen=True)
class DhcpHost:
    """A DHCP host entry of a network: the interface with ``mac`` always gets ``ip`` (and host name ``name``)."""

    mac: str
    ip: str
    name: str = ""


@dataclass(frozen=True)
class DnsHost:
    """A DNS host entry of a network: its DNS answers each of ``names`` with ``ip``."""

    ip: str
    names: tuple[str, ...]


@dataclass(frozen=True)
class NetworkState:
    """A network as the managed-network code sees it (libvirt's network XML, or the fake's memory).

    ``owner`` is the ownership mark (None: none, so not made by CloneBox); ``subnet`` the IPv4 subnet of
    the host side in CIDR form ("" when the network has no IPv4 address).
    """

    name: str
    uuid: str
    owner: str | None
    subnet: str
    bridge: str
    active: bool
    dhcp_hosts: tuple[DhcpHost, ...] = ()
    dns_hosts: tuple[DnsHost, ...] = ()


def managed_network(spec: VmSpec) -> NetworkSpec | None:
    """The VM's managed network attachment (None unless its network mode is MANAGED)."""
    return spec.network if spec.network.mode is NetworkMode.MANAGED else None


def host_address(subnet: str) -> ipaddress.IPv4Address:
    """The host side's address on a managed network: the subnet's first address."""
    return ipaddress.IPv4Network(subnet).network_address + 1


def dhcp_range(subnet: str) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]:
    """The guest addresses of a subnet (``validate.guest_range``), served by DHCP."""
    return guest_range(ipaddress.IPv4Network(subnet))


def host_entries(net: NetworkSpec, mac: str) -> tuple[DhcpHost, DnsHost | None]:
    """The DHCP host entry (and DNS host entry, when the VM has DNS names) of a VM with interface ``mac``."""
    dhcp = DhcpHost(mac, net.address, net.dns_names[0] if net.dns_names else "")
    dns = DnsHost(net.address, tuple(net.dns_names)) if net.dns_names else None
    return dhcp, dns


def network_orphan_key(network: str) -> str:
    """How ``orphans`` names a managed network without VMs (':' never occurs in a VM name)."""
    return NETWORK_ORPHAN_PREFIX + network


def network_not_managed(network: str, vm: str) -> FailedPrecondition:
    """A network of that name exists but carries no ownership mark of this adapter."""
    return FailedPrecondition(
        f"libvirt network {network} exists but was not made by this CloneBox agent, so VM {vm} cannot use it "
        f"as its managed network: give the plan's network another name, or remove {network} "
        f"(virsh net-destroy {network}; virsh net-undefine {network})",
        reason="NETWORK_NOT_MANAGED",
        metadata={"vm": vm, "network": network},
    )


def network_subnet_conflict(network: str, existing: str, wanted: str, vm: str) -> FailedPrecondition:
    """A managed network of that name exists with another subnet."""
    return FailedPrecondition(
        f"managed network {network} exists with subnet {existing or '(none)'}, but VM {vm} asks for subnet "
        f"{wanted}: give it the network's subnet {existing}, or another network name",
        reason="NETWORK_SUBNET_CONFLICT",
        metadata={"vm": vm, "network": network, "subnet": wanted, "existing_subnet": existing},
    )


def network_subnet_in_use(network: str, subnet: str, holder: str, vm: str) -> FailedPrecondition:
    """The subnet of a new managed network overlaps a route this host already has."""
    return FailedPrecondition(
        f"subnet {subnet} of managed network {network} (VM {vm}) is already in use on this host ({holder}): "
        "choose another subnet for the network",
        reason="NETWORK_SUBNET_IN_USE",
        metadata={"vm": vm, "network": network, "subnet": subnet},
    )


def check_existing_network(state: NetworkState, net: NetworkSpec, owner: str, vm: str) -> None:
    """Refuse a network: NETWORK_NOT_MANAGED without ``owner``'s mark, NETWORK_SUBNET_CONFLICT on another subnet."""
    if state.owner != owner:
        raise network_not_managed(state.name, vm)
    wanted = ipaddress.IPv4Network(net.subnet)
    if not state.subnet or ipaddress.IPv4Network(state.subnet) != wanted:
        raise network_subnet_conflict(state.name, state.subnet, str(wanted), vm)


#: an IPv4 route of this host: (destination, interface)
Route = tuple[ipaddress.IPv4Network, str]


def host_routes(path: str = "/proc/net/route") -> list[Route]:
    """IPv4 routes of this host from ``/proc/net/route`` (hexadecimal, little-endian); [] when unreadable."""
    try:
        with open(path, encoding="ascii") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return []
    routes: list[Route] = []
    for line in lines:
        fields = line.split()
        if len(fields) < 8:
            continue
        try:
            dest = ipaddress.IPv4Address(int(fields[1], 16).to_bytes(4, "little"))
            mask = ipaddress.IPv4Address(int(fields[7], 16).to_bytes(4, "little"))
            routes.append((ipaddress.IPv4Network(f"{dest}/{mask}", strict=False), fields[0]))
        except ValueError:
            continue
    return routes


def overlapping_route(subnet: str, routes: Iterable[Route]) -> Route | None:
    """The first route (other than a default route) whose destination overlaps ``subnet``."""
    net = ipaddress.IPv4Network(subnet)
    for dest, iface in routes:
        if dest.prefixlen and dest.overlaps(net):
            return dest, iface
    return None


def entries_to_replace(
    state: NetworkState, dhcp: DhcpHost, dns: DnsHost | None, live_macs: Iterable[str], vm: str
) -> tuple[list[DhcpHost], list[DnsHost]]:
    """Which entries of ``state`` must go before ``dhcp``/``dns`` can be added; raises when a live one is in the way.

    An entry is live when its MAC (a DNS entry: its address's DHCP entry's MAC) is on an interface of a
    defined domain. Entries that clash (same MAC, address or name) but are not live were left by a create
    that a crash cut short between the entry and its journal record: they are replaced. A live clash is
    FailedPrecondition NETWORK_ADDRESS_IN_USE or NETWORK_NAME_IN_USE, naming the address or name.
    Callers hold the network's lock, so no create of another VM is between its entry and its domain.
    """
    live = {m.lower() for m in live_macs}
    live_ips = {h.ip for h in state.dhcp_hosts if h.mac.lower() in live}
    stale_dhcp: list[DhcpHost] = []
    for h in state.dhcp_hosts:
        same_mac = h.mac.lower() == dhcp.mac.lower()
        same_name = bool(dhcp.name) and h.name == dhcp.name
        if not (same_mac or h.ip == dhcp.ip or same_name):
            continue
        if h.mac.lower() in live:
            if h.ip == dhcp.ip or same_mac:
                raise _address_in_use(state.name, dhcp.ip, vm)
            raise _name_in_use(state.name, dhcp.name, vm)
        stale_dhcp.append(h)
    stale_dns: list[DnsHost] = []
    wanted = set(dns.names) if dns is not None else set()
    for d in state.dns_hosts:
        shared = sorted(wanted & set(d.names))
        if not (d.ip == dhcp.ip or shared):
            continue
        if d.ip in live_ips:
            if d.ip == dhcp.ip:
                raise _address_in_use(state.name, dhcp.ip, vm)
            raise _name_in_use(state.name, shared[0], vm)
        stale_dns.append(d)
    return stale_dhcp, stale_dns


def _address_in_use(network: str, address: str, vm: str) -> FailedPrecondition:
    return _in_use(network, vm, "address", address, "give it a free address of the subnet")


def _name_in_use(network: str, name: str, vm: str) -> FailedPrecondition:
    return _in_use(network, vm, "name", name, "give it another name")


def _in_use(network: str, vm: str, what: str, value: str, fix: str) -> FailedPrecondition:
    label = "address" if what == "address" else "DNS name"
    return FailedPrecondition(
        f"{label} {value} on managed network {network} belongs to another VM, so VM {vm} cannot have it: {fix}",
        reason=f"NETWORK_{what.upper()}_IN_USE",
        metadata={"vm": vm, "network": network, what: value},
    )


def host_entry_undo(net: NetworkSpec, mac: str) -> dict[str, str]:
    """How step ``network-host`` of a VM with interface ``mac`` is undone (the same record in both adapters)."""
    return {
        "kind": "network-host",
        "network": net.libvirt_network,
        "mac": mac,
        "address": net.address,
        "names": json.dumps(list(net.dns_names)),
    }


def describe_network(state: NetworkState) -> str:
    """How a managed network appears in orphan reports and removal lists."""
    return f"libvirt network {state.name} (bridge {state.bridge}, subnet {state.subnet or 'none'})"


def entries_to_drop(
    state: NetworkState, macs: Iterable[str], address: str, others_live: Iterable[str]
) -> tuple[list[DhcpHost], list[DnsHost]]:
    """The host entries of a VM (interfaces ``macs``, fixed ``address``) to remove from ``state``.

    Its DHCP entries by MAC, and any other entry for ``address`` whose MAC is on no other domain (a
    leftover); its DNS entry for ``address`` unless that address now belongs to another live VM (an entry
    whose MAC is in ``others_live``), so a late undo never takes a newer VM's name away.
    """
    mine = {m.lower() for m in macs}
    others = {m.lower() for m in others_live}
    dhcp = [h for h in state.dhcp_hosts if h.mac.lower() in mine or (h.ip == address and h.mac.lower() not in others)]
    held = any(h.ip == address and h.mac.lower() in others for h in state.dhcp_hosts)
    dns = [] if held else [d for d in state.dns_hosts if d.ip == address]
    return dhcp, dns


# ---- agent volumes (``Hypervisor.create_volume``) ------------------------------------------------------
#
# A volume is a pool file (``agent_volume_file``) plus a metadata file ``storage_dir/volumes/NAME.json``
# (size, shared, labels, creation time). The metadata is written last, atomically (a temporary file,
# fsync, rename, fsync of the folder), and removed first: a volume file without metadata is a half-made
# (or half-deleted) volume, invisible to ``list_volumes``; a create of that name replaces it and a delete
# removes it. Both adapters keep volumes this way, so an agent restart finds them.


@dataclass(frozen=True)
class VolumeMeta:
    """What a volume's metadata file records."""

    name: str
    size_mib: int
    shared: bool
    labels: tuple[tuple[str, str], ...]
    created: datetime


class VolumeStore:
    """The metadata files of agent volumes in one folder (made on first write)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def _path(self, name: str) -> str:
        if not name or "/" in name or name.startswith(".") or "\x00" in name:
            raise InvalidArgument(f"name: {name[:64]!r} is not a volume name", reason="INVALID_NAME")
        return os.path.join(self.folder, f"{name}.json")

    def read(self, name: str) -> VolumeMeta | None:
        """The metadata of volume ``name`` (None: none, or unreadable, which the agent never writes)."""
        try:
            with open(self._path(name), encoding="utf-8") as f:
                data = json.load(f)
            return VolumeMeta(
                name=str(data["name"]),
                size_mib=int(data["size_mib"]),
                shared=bool(data["shared"]),
                labels=tuple(sorted((str(k), str(v)) for k, v in dict(data.get("labels") or {}).items())),
                created=datetime.fromisoformat(str(data["created"])),
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            _log.warning("volume metadata %s is unreadable: the volume is not listed", self._path(name))
            return None

    def names(self) -> list[str]:
        """Names of the volumes that have a metadata file, sorted."""
        try:
            entries = os.listdir(self.folder)
        except FileNotFoundError:
            return []
        return sorted(e[: -len(".json")] for e in entries if e.endswith(".json") and not e.startswith("."))

    def all(self) -> list[VolumeMeta]:
        """Every readable volume's metadata, by name."""
        return [m for n in self.names() if (m := self.read(n)) is not None]

    def write(self, meta: VolumeMeta) -> None:
        """Write ``meta`` atomically and durably (the last step of a create: the volume exists from here)."""
        os.makedirs(self.folder, mode=0o700, exist_ok=True)
        path = self._path(meta.name)
        doc = {
            "name": meta.name,
            "size_mib": meta.size_mib,
            "shared": meta.shared,
            "labels": dict(meta.labels),
            "created": meta.created.isoformat(),
        }
        tmp = os.path.join(self.folder, f".{meta.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(tmp, "x", encoding="utf-8") as f:
                json.dump(doc, f, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        _fsync_dir(self.folder)

    def remove(self, name: str) -> bool:
        """Remove volume ``name``'s metadata durably (the first step of a delete); whether there was any."""
        try:
            os.unlink(self._path(name))
        except FileNotFoundError:
            return False
        _fsync_dir(self.folder)
        return True


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def volume_not_found(name: str, field: str = "name") -> NotFound:
    """NotFound VOLUME_NOT_FOUND naming the request field that named it."""
    return NotFound(
        f"volume {name} not found on this host: create it first (CreateVolume)",
        reason="VOLUME_NOT_FOUND",
        metadata={"volume": name, "field": field},
    )


def volume_in_use(name: str, vms: Iterable[str], wanted_by: str = "") -> FailedPrecondition:
    """FailedPrecondition VOLUME_IN_USE: attached by the definitions of ``vms``."""
    users = sorted(vms)
    shown = ", ".join(users)
    if wanted_by:
        message = (
            f"volume {name} is attached to VM {shown} and is not shared, so VM {wanted_by} cannot attach it too: "
            "delete that VM first, or use a shared volume"
        )
    else:
        message = f"volume {name} is attached to VM(s) {shown}: delete or replace them first"
    return FailedPrecondition(message, reason="VOLUME_IN_USE", metadata={"volume": name, "vms": shown})


def check_new_volume(existing: VolumeMeta, size_mib: int, shared: bool) -> None:
    """FailedPrecondition VOLUME_EXISTS_DIFFERENT when ``existing`` has another size or shared flag."""
    for name, have, want in (("size_mib", existing.size_mib, size_mib), ("shared", existing.shared, shared)):
        if have != want:
            raise FailedPrecondition(
                f"volume {existing.name} exists with {name} {str(have).lower()}, not {str(want).lower()}: "
                "give the same value, or delete the volume first (its data goes with it)",
                reason="VOLUME_EXISTS_DIFFERENT",
                metadata={"volume": existing.name, "field": name},
            )


def volume_users(records: Iterable[Any], name: str) -> tuple[str, ...]:
    """Names of the domains (``DomainRecord``-like: ``name``, ``spec``) whose spec attaches volume ``name``."""
    return tuple(sorted(r.name for r in records if any(d.volume == name for d in r.spec.disks)))


def check_import_images(spec: VmSpec, images: Mapping[str, str]) -> None:
    """InvalidArgument naming ``images`` unless they name exactly the spec's own disks (an import attaches volumes)."""
    own = spec.own_disks
    if set(images) != {d.name for d in own}:
        raise invalid_field("images", f"must name exactly the spec's own disks ({len(own)}; volumes are attached)")


def refuse_internal_with_volumes(spec: VmSpec, snapshot: str, kind: SnapshotKind) -> None:
    """FailedPrecondition VM_HAS_VOLUMES for an internal snapshot of a VM that attaches agent volumes.

    A VM's snapshots hold its own disks only; the volumes keep their data as it is (as Incus leaves custom
    volumes out of instance snapshots). QEMU saves an internal snapshot into every qcow2 disk it has, a
    volume too, so only a disk-only (external) snapshot can leave the volumes out.
    """
    names = [d.volume for d in spec.disks if d.volume]
    if names and kind == SnapshotKind.INTERNAL:
        raise FailedPrecondition(
            f"VM {spec.name} attaches volume(s) {', '.join(names)}: its snapshots cover its own disks only, and an "
            "internal snapshot would be saved into the volumes too; take a disk-only snapshot (--disk-only)",
            reason="VM_HAS_VOLUMES",
            metadata={"vm": spec.name, "snapshot": snapshot, "volumes": ", ".join(names)},
        )
