"""
``FakeHypervisor``: a scriptable, in-memory stand-in for libvirt + QEMU.

It is a first-class adapter, held to the same contract tests as ``LibvirtHypervisor`` on
``test:///default`` and ``qemu:///system``, so tests of the use cases can rely on it behaving like the
real thing: the same validation and errors, the same naming and ownership marks, real files (placeholder
overlays, a real seed ISO, a console log) under ``storage_dir``, and lifecycle events delivered on the
event loop after the call that caused them, as libvirt's event thread would.

Scripting:

- ``fail_on={"create:disks": Unavailable(...)}``: raise at a method's entry (``"create"``) or at a named
  step (``adapters.common.CREATE_STEPS``); every time, or ``Fault(exc, times=1)`` for once;
- ``delays={"start": 0.5}``: sleep at a method's entry or a step;
- ``ignore_shutdown=True``: the guest ignores ACPI and the guest agent (only destroy stops it);
- ``external_destroy/undefine/crash``, ``guest_poweroff``: changes made behind the agent's back;
- ``set_network(name, active)``, ``set_serving(False, reason)``: a missing network, libvirtd down;
- managed networks (``NetworkMode.MANAGED``): made with the first VM on one and removed with the last, with
  each VM's DHCP and DNS host entries, the same steps, checks and errors as the libvirt adapter. Fake
  state, read-only: ``managed_networks`` (name -> ``common.NetworkState``); a network added with
  ``set_network`` carries no ownership mark (NETWORK_NOT_MANAGED); ``host_routes`` are the fake host's
  routes (a new network's subnet overlapping one, or an active managed network's, is NETWORK_SUBNET_IN_USE);
- health probes: ``guest_agent_down`` (qemu-ga does not answer), ``guest_file_contents`` (guest files and
  their bytes), ``guest_fs`` (``guest_filesystems``), ``domain_counters`` (``domain_stats``) and
  ``probe_addresses`` (``probe_targets``: loopback addresses of a test server, no bridge);
  ``probe_network`` (the agent's ``fake_probe_network``) gives every running VM without
  ``probe_addresses`` one loopback address of its own, ``network[index + 1]`` (for benchmarks).
- snapshots: a tree per VM (the parent of a new snapshot is the current one; create and revert move
  ``current``); ``disk_state[vm]`` is a token standing for the disks' contents: tests set it, snapshots
  save it and a revert puts the saved one back, so a use-case test can see that a restore restored.
  ``export_disks`` writes a real (empty) qcow2 per disk with ``qemu-img``; ``import_disks`` defines a
  stopped VM on the given files (moved into the pool). Named steps: ``snapshot:taken``,
  ``import:disks``, ``import:define``.
- updates (``update``): the kept spec takes the new labels, health checks, vCPUs and memory; a running
  domain keeps the vCPUs and memory it booted with until it boots again (``domain_resources``, as
  libvirt's ``virDomainGetInfo``); every boot gives the guest a new boot id (``BOOT_ID_PATH``). Named
  step: ``update:redefined``.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
import ipaddress
import json
import os
import secrets
import shutil
import tempfile
import uuid as uuidlib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from clonebox_agent.adapters import common
from clonebox_agent.adapters.common import (
    QEMU_CAPABILITIES,
    DhcpHost,
    DnsHost,
    Fault,
    Faults,
    Inventory,
    NetworkState,
    StepHook,
)
from clonebox_agent.adapters.images import resolve_spec
from clonebox_agent.adapters.seediso import build_seed_iso, seed_cloud_init
from clonebox_agent.ports import (
    NETWORK_ORPHAN_PREFIX,
    Capability,
    DiskImage,
    DomainRecord,
    DomainStats,
    EventKind,
    EventSink,
    GuestExecResult,
    GuestFilesystem,
    HypervisorEvent,
    ProbeTarget,
    SnapshotRecord,
    StepLog,
)
from clonebox_core.errors import (
    AlreadyExists,
    FailedPrecondition,
    Internal,
    NotFound,
    Unavailable,
    invalid_field,
)
from clonebox_core.model import (
    CreatePlan,
    HostInfo,
    HypervisorInfo,
    IpAddress,
    NetworkMode,
    NetworkSpec,
    Resources,
    StepState,
    VmSpec,
    VmState,
    Volume,
)
from clonebox_core.names import check_dns_label
from clonebox_core.snapshots import SnapshotKind
from clonebox_core.validate import validate_volume

#: qemu-img, for the real qcow2 files of ``export_disks``
QEMU_IMG = "qemu-img"
#: a Linux guest's boot id: the fake's guests answer a new one after every boot (``guest_file_read``)
BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"


@dataclass
class _Snap:
    """One snapshot of the fake: its place in the tree and the disk contents (token) it saved."""

    name: str
    kind: SnapshotKind
    created: datetime
    vm_state: VmState
    has_memory: bool
    parent: str
    disk_state: str
    size_bytes: int
    #: identity for undo: a snapshot re-made under the same name is not the one a step recorded
    nonce: str


@dataclass
class _Domain:
    vm: str
    uuid: str
    spec: VmSpec
    created: datetime
    state: VmState = VmState.STOPPED
    reason: str = "unknown"
    persistent: bool = True
    console_log: str | None = None
    index: int = 0
    shutdown_pending: bool = field(default=False)
    #: the interface's MAC on a managed network ("" otherwise)
    mac: str = ""
    #: (vCPUs, MiB) the domain last booted with: what a running guest has (an update changes only ``spec``)
    booted: tuple[int, int] | None = None
    #: the guest kernel's boot id (``BOOT_ID_PATH``): new at every boot
    boot_id: str = ""


class FakeHypervisor:
    """
    In-memory ``Hypervisor`` with scripted faults, delays and external changes.

    ``capabilities`` defaults to exactly what real QEMU declares. Without ``storage_dir`` the fake makes
    a private temporary folder on first use (removed by ``close``), so ``HOST_FILES`` stays true.
    """

    def __init__(
        self,
        *,
        host_name: str = "fake-host",
        capacity: Resources = Resources(vcpus=8, memory_mib=16384, disk_mib=102400),
        reserve: Resources = Resources(),
        capabilities: frozenset[Capability] | None = None,
        storage_dir: str | os.PathLike[str] | None = None,
        image_dirs: Sequence[str | os.PathLike[str]] = (),
        shared_roots: Sequence[str | os.PathLike[str]] | None = None,
        name_prefix: str = "cb-",
        networks: Mapping[str, bool] | None = None,
        fail_on: Mapping[str, BaseException | Fault] | None = None,
        delays: Mapping[str, float] | None = None,
        step_hook: StepHook | None = None,
        ignore_shutdown: bool = False,
        shutdown_delay: float = 0.05,
        domain_type: str = "qemu",
        probe_network: str = "",
    ) -> None:
        """``probe_network``: a loopback IPv4 network such as ``127.77.0.0/16`` (see ``probe_targets``)."""
        self.host_name = host_name
        self.capacity = capacity
        self.reserve = reserve
        self._caps = QEMU_CAPABILITIES if capabilities is None else frozenset(capabilities)
        self._storage_dir = os.path.abspath(storage_dir) if storage_dir else None
        self._own_storage = storage_dir is None
        self.image_dirs = tuple(os.path.abspath(d) for d in image_dirs)
        self.shared_roots = None if shared_roots is None else tuple(os.path.abspath(d) for d in shared_roots)
        common.check_name_prefix(name_prefix)
        self.name_prefix = name_prefix
        #: libvirt networks by name -> active (managed ones too)
        self.networks: dict[str, bool] = dict(networks) if networks is not None else {"default": True}
        #: the ownership mark of the managed networks this fake makes (as the libvirt adapter's ``owner``)
        self.owner = "clonebox"
        #: the fake host's IPv4 routes (destination, interface): a new managed network may not overlap one
        self.host_routes: builtins.list[common.Route] = []
        # managed networks by name (``active`` lives in ``networks``); one lock each, as in the libvirt adapter
        self._managed: dict[str, NetworkState] = {}
        self._net_locks: dict[str, asyncio.Lock] = {}
        self.faults = Faults.of(fail_on, delays, step_hook)
        #: when True, shutdown requests are ignored like a guest without ACPI handling
        self.ignore_shutdown = ignore_shutdown
        self.shutdown_delay = shutdown_delay
        self.domain_type = domain_type
        #: calls by method name (``list`` is one call however many domains there are)
        self.calls: Counter[str] = Counter()
        self._domains: dict[str, _Domain] = {}
        self._volumes: dict[str, str] = {}  # volume name -> path
        #: pool files of agent volumes without host files (with them, the pool folder is the truth)
        self._agent_files: set[str] = set()
        self._creating: set[str] = set()
        self._sink: EventSink | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._serving = True
        self._not_serving_reason = ""
        self._counter = 0
        #: files that exist inside each guest, by VM name (``guest_file_exists``); tests add to it
        self.guest_files: dict[str, set[str]] = {}
        #: every guest_exec as (vm, argv, stdin)
        self.guest_execs: builtins.list[tuple[str, tuple[str, ...], bytes]] = []
        #: answers guest_exec (default: exit 0, no output)
        self.guest_exec_handler: Callable[[str, tuple[str, ...], bytes], GuestExecResult] | None = None
        #: VMs whose qemu-ga does not answer (guest_ping and the other guest calls fail)
        self.guest_agent_down: set[str] = set()
        #: guest file contents by VM name and path (``guest_file_read``; ``guest_files`` read as b"")
        self.guest_file_contents: dict[str, dict[str, bytes]] = {}
        #: mounted guest filesystems by VM name (``guest_filesystems``)
        self.guest_fs: dict[str, tuple[GuestFilesystem, ...]] = {}
        #: counters by VM name (``domain_stats`` returns those of running domains)
        self.domain_counters: dict[str, DomainStats] = {}
        #: a token for each VM's disk contents: tests set it; snapshots save it and revert restores it
        self.disk_state: dict[str, str] = {}
        #: snapshots by VM, oldest first (dicts keep insertion order), and each VM's current snapshot
        self._snapshots: dict[str, dict[str, _Snap]] = {}
        self._current: dict[str, str] = {}
        #: probe addresses by VM name (``probe_targets``, while running; no bridge, so no interface)
        self.probe_addresses: dict[str, tuple[str, ...]] = {}
        #: VMs not in ``probe_addresses`` probe at ``network[index + 1]`` of this network (None: no address)
        self.probe_network = ipaddress.IPv4Network(probe_network) if probe_network else None
        if self.probe_network is not None and not self.probe_network.is_loopback:
            # probe traffic of the fake must never leave the machine
            raise ValueError(f"probe_network {probe_network} is not a loopback network (127.0.0.0/8)")

    # ---- scripting -----------------------------------------------------------------------------

    @property
    def storage_dir(self) -> str:
        """Where the fake's files live (made on first use when none was given)."""
        if self._storage_dir is None:
            self._storage_dir = tempfile.mkdtemp(prefix="clonebox-fake-")
        return self._storage_dir

    def set_serving(self, serving: bool, reason: str = "libvirtd is not running") -> None:
        """Simulate libvirtd going away (every call raises Unavailable) and coming back."""
        self._serving = serving
        self._not_serving_reason = "" if serving else reason

    def set_network(self, name: str, active: bool | None) -> None:
        """Add (without an ownership mark), (de)activate (``active`` bool) or remove (``None``) a libvirt network."""
        if active is None:
            self.networks.pop(name, None)
            self._managed.pop(name, None)
        else:
            self.networks[name] = active

    @property
    def managed_networks(self) -> dict[str, NetworkState]:
        """Fake state: the managed networks this fake made, by name (a copy; ``active`` as in ``networks``)."""
        return {
            name: dataclasses.replace(state, active=self.networks.get(name, False))
            for name, state in sorted(self._managed.items())
        }

    def external_destroy(self, name: str) -> None:
        """Simulate someone running ``virsh destroy``."""
        dom = self._domain(name)
        if dom.state != VmState.STOPPED:
            self._stop(dom, VmState.STOPPED, "destroyed", EventKind.STOPPED)

    def external_undefine(self, name: str) -> None:
        """Simulate ``virsh undefine``: a running domain lives on as a transient one until it stops."""
        dom = self._domain(name)
        if dom.state in (VmState.RUNNING, VmState.PAUSED):
            dom.persistent = False
        else:
            del self._domains[dom.vm]
        self._emit(dom.vm, EventKind.UNDEFINED, None, "removed")

    def external_crash(self, name: str) -> None:
        """Simulate a crash of the guest (or QEMU)."""
        dom = self._domain(name)
        if dom.state != VmState.STOPPED:
            self._stop(dom, VmState.CRASHED, "crashed", EventKind.CRASHED)

    def guest_poweroff(self, name: str) -> None:
        """Simulate the guest powering itself off."""
        dom = self._domain(name)
        if dom.state != VmState.STOPPED:
            self._stop(dom, VmState.STOPPED, "shutdown", EventKind.STOPPED)

    # ---- Hypervisor port -----------------------------------------------------------------------

    @property
    def capabilities(self) -> frozenset[Capability]:
        """Declared features (default: the same as real QEMU)."""
        return self._caps

    async def open(self, sink: EventSink) -> None:
        """Remember the sink; events go to it on this event loop from now on."""
        self._loop = asyncio.get_running_loop()
        self._sink = sink
        if Capability.HOST_FILES in self._caps:
            for d in (common.pool_dir(self.storage_dir), os.path.join(self.storage_dir, common.VMS_SUBDIR)):
                os.makedirs(d, mode=0o755, exist_ok=True)

    async def close(self) -> None:
        """Stop delivering events; remove the private storage folder if the fake made one."""
        self._sink = None
        if self._own_storage and self._storage_dir is not None:
            shutil.rmtree(self._storage_dir, ignore_errors=True)
            self._storage_dir = None

    async def host_info(self) -> HostInfo:
        """Report the configured capacity; ``serving=False`` while ``set_serving(False)``."""
        self.calls["host_info"] += 1
        caps = tuple(sorted(c.value for c in self._caps))
        hv = HypervisorInfo(
            uri="fake:///",
            libvirt_version="0.0.0",
            hypervisor_version="0.0.0",
            domain_type=self.domain_type,
            domain_type_reason="fake hypervisor",
            capabilities=caps,
            cpu_model="fake",
        )
        if not self._serving:
            return HostInfo(self.host_name, Resources(), Resources(), hv, False, self._not_serving_reason)
        room = self.capacity - self.reserve
        allocatable = Resources(max(room.vcpus, 0), max(room.memory_mib, 0), max(room.disk_mib, 0))
        return HostInfo(self.host_name, self.capacity, allocatable, hv)

    async def create(
        self, spec: VmSpec, *, start: bool, steps: StepLog | None = None, ssh_public_key: str = ""
    ) -> DomainRecord:
        """Validate, make files, define, start; every step logged; all removed again on any failure."""
        await self._enter("create")
        resolved = resolve_spec(spec, self.image_dirs, self.shared_roots)
        await self._step("create:validated")
        if spec.name in self._domains or spec.name in self._creating:
            raise AlreadyExists(
                f"VM {spec.name} already exists", reason="VM_ALREADY_EXISTS", metadata={"vm": spec.name}
            )
        if self._host_files:
            need = sum(d.size_mib for d in spec.disks) * common.MIB
            common.check_room(common.pool_dir(self.storage_dir), need, spec.name)
        managed = common.managed_network(spec)
        if managed is not None:
            self._network_preflight(managed, spec.name)
        self._check_volumes(spec)
        domain = self.name_prefix + spec.name
        log = steps or common.MemoryStepLog()
        # claimed before the first await, so a concurrent create of the name fails fast and touches nothing
        self._creating.add(spec.name)
        try:
            if self._host_files:
                folder = common.vm_dir(self.storage_dir, domain)
                n = log.planned("folder", {"kind": "folder", "path": folder})
                os.makedirs(folder, mode=0o755)
                log.made(n, common.stamp_identity(folder))
                common.mark_owned(folder, spec.name)
            await self._step("create:folder")
            for disk, base in zip(spec.disks, resolved.base_images, strict=True):
                if disk.volume:
                    continue  # an agent volume is attached, never made (nor undone)
                content = f"fake qcow2 overlay on {base}\n" if base else f"fake blank qcow2 {disk.size_mib} MiB\n"
                name = common.volume_name(domain, disk.name)
                n = log.planned(f"disk:{disk.name}", {"kind": "volume", "name": name})
                log.made(n, self._make_volume(name, spec.name, content.encode()))
            await self._step("create:disks")
            vm_uuid = str(uuidlib.uuid4())
            if spec.has_seed:
                seed = seed_cloud_init(spec, ssh_public_key=ssh_public_key)
                iso = build_seed_iso(seed, instance_id=f"iid-{vm_uuid}", hostname=spec.name)
                name = common.seed_volume_name(domain)
                n = log.planned("seed", {"kind": "volume", "name": name})
                log.made(n, self._make_volume(name, spec.name, iso))
            await self._step("create:seed")
            mac = ""
            # held until the domain is defined, as in the libvirt adapter
            lock = self._net_lock(managed.libvirt_network) if managed is not None else contextlib.nullcontext()
            async with lock:
                if managed is not None:
                    mac = common.new_mac()
                    self._ensure_network(managed, spec.name, log)
                    self._add_host(managed, spec.name, mac, log)
                await self._step("create:network")
                self._counter += 1
                dom = _Domain(
                    spec.name,
                    vm_uuid,
                    spec,
                    datetime.now(UTC).replace(microsecond=0),
                    index=self._counter,
                    console_log=(common.console_log_path(self.storage_dir, domain) if self._host_files else None),
                    mac=mac,
                )
                n = log.planned("define", {"kind": "domain", "name": domain})
                # again right before the define (no await in between): a volume may have been deleted, or
                # attached by another create, since the first check
                self._check_volumes(spec)
                self._domains[spec.name] = dom
                self._emit(spec.name, EventKind.DEFINED, VmState.STOPPED, "added")
                log.made(n, {"uuid": vm_uuid})
                await self._step("create:define")
            if start:
                n = log.planned("start", {"kind": "running", "name": domain})
                self._boot(dom)
                log.made(n, {"uuid": vm_uuid})
                await self._step("create:start")
        except BaseException:
            common.roll_back(log, self._undo_sync, spec.name)
            raise
        finally:
            self._creating.discard(spec.name)
        return self._record(dom)

    async def get(self, name: str) -> DomainRecord:
        """One domain; NotFound when absent."""
        await self._enter("get")
        return self._record(self._domain(name))

    async def list(self) -> builtins.list[DomainRecord]:
        """All domains (one call)."""
        await self._enter("list")
        return [self._record(d) for d in sorted(self._domains.values(), key=lambda d: d.vm)]

    async def start(self, name: str) -> DomainRecord:
        """Boot a stopped domain; DOMAIN_START_FAILED when its network is missing or inactive."""
        await self._enter("start")
        dom = self._domain(name)
        if dom.state not in (VmState.RUNNING, VmState.PAUSED):
            self._boot(dom)
        return self._record(dom)

    async def shutdown(self, name: str) -> None:
        """Ask the guest; unless it ignores requests it stops ``shutdown_delay`` s later."""
        await self._enter("shutdown")
        dom = self._domain(name)
        if dom.state != VmState.RUNNING or self.ignore_shutdown or dom.shutdown_pending:
            return
        dom.shutdown_pending = True
        loop = asyncio.get_running_loop()
        booted = dom.uuid, dom.index

        def finish() -> None:
            dom.shutdown_pending = False
            # only the same, still running boot of the same domain
            if self._domains.get(dom.vm) is dom and (dom.uuid, dom.index) == booted and dom.state == VmState.RUNNING:
                self._stop(dom, VmState.STOPPED, "shutdown", EventKind.STOPPED)

        loop.call_later(self.shutdown_delay, finish)

    async def destroy(self, name: str) -> None:
        """Force off."""
        await self._enter("destroy")
        self._force_off(self._domain(name))

    async def update(self, name: str, spec: VmSpec, *, steps: StepLog | None = None) -> DomainRecord:
        """See ``Hypervisor.update``: the kept spec takes the four fields; a running boot keeps its resources.

        Step ``redefine`` (identity recorded before it acts, as the port says); fault at ``update:redefined``.
        """
        await self._enter("update")
        dom = self._domain(name)
        log = steps or common.MemoryStepLog()
        old = common.update_fields(dom.spec)
        # one round trip through the at-rest form, as the libvirt adapter's metadata makes it
        new = common.update_fields(common.with_fields(dom.spec, common.update_fields(spec)))
        n = log.planned(common.UPDATE_STEP, common.definition_undo(name, self.domain_name(name), old))
        # before it acts (see the port): the undo checks that the domain has exactly these values
        log.made(n, {"uuid": dom.uuid, "fields": common.fields_text(new)})
        try:
            dom.spec = common.with_fields(dom.spec, new)
            await self._step(common.UPDATE_REDEFINED)
        except BaseException:
            # only this method's own step: the others in ``steps`` are the caller's
            for step in log.steps():
                if step.n == n and step.state == StepState.DONE:
                    self._undo_sync(step.undo, step.identity)
                    log.undone(n, True)
            raise
        return self._record(dom)

    def domain_resources(self, name: str) -> tuple[int, int]:
        """Fake state: (vCPUs, MiB) the domain has, as libvirt's ``virDomainGetInfo`` reports them.

        Those of its running boot while it runs, else those of its (persistent) definition.
        """
        dom = self._domain(name)
        if dom.state != VmState.STOPPED and dom.booted is not None:
            return dom.booted
        return dom.spec.vcpus, dom.spec.memory_mib

    async def delete(self, name: str) -> builtins.list[str]:
        """Force off, undefine, remove volumes and files; also cleans leftovers without a domain."""
        await self._enter("delete")
        if not self._serving:
            raise self._unavailable()
        if name.startswith(NETWORK_ORPHAN_PREFIX):
            # an orphan the sweep found: a managed network no domain uses any more
            return self._remove_orphan_network(name.removeprefix(NETWORK_ORPHAN_PREFIX))
        domain = self.name_prefix + name
        dom = self._domains.get(name)
        released: builtins.list[str] = []
        if dom is not None:
            self._force_off(dom)
            await self._step("delete:destroyed")
            managed = common.managed_network(dom.spec)
            # held through the undefine: a concurrent delete of another VM on it must see this one gone
            lock = self._net_lock(managed.libvirt_network) if managed is not None else contextlib.nullcontext()
            async with lock:
                # before undefine: a retry after a failure still finds the domain, and with it the network
                released = self._release_network(dom)
                await self._step("delete:network")
                if dom.vm in self._domains:
                    self._undefine(dom)
            await self._step("delete:undefined")
        removed = released + [
            p
            for v in list(self._volumes)
            if v.startswith(common.volume_prefix(domain))
            for p in [self._delete_volume(v)]
            if p
        ]
        await self._step("delete:volumes")
        removed += self._remove_folder(domain)
        # snapshot metadata lives with the domain (libvirt refuses to undefine a domain that has
        # snapshots unless told to drop their metadata; delete always does)
        had_snapshots = bool(self._snapshots.pop(name, None))
        self._current.pop(name, None)
        self.disk_state.pop(name, None)
        if dom is None and not removed and not had_snapshots:
            raise NotFound(f"VM {name} not found", reason="VM_NOT_FOUND", metadata={"vm": name})
        return removed

    async def addresses(self, name: str) -> tuple[IpAddress, ...]:
        """Return a TEST-NET-1 (192.0.2.0/24, never routed) address while running on a network."""
        await self._enter("addresses")
        dom = self._domain(name)
        if dom.state != VmState.RUNNING or dom.spec.network.mode == NetworkMode.NONE:
            return ()
        source = "agent" if Capability.GUEST_AGENT in self._caps else "lease"
        managed = common.managed_network(dom.spec)
        if managed is not None:
            # its DHCP host entry's address
            return (IpAddress("eth0", managed.address, ipaddress.IPv4Network(managed.subnet).prefixlen, source),)
        return (IpAddress("eth0", f"192.0.2.{10 + dom.index % 240}", 24, source),)

    def _guest(self, name: str) -> _Domain:
        dom = self._domain(name)
        if dom.state != VmState.RUNNING or Capability.GUEST_AGENT not in self._caps:
            raise FailedPrecondition(
                f"VM {name} is not running: its guest agent cannot be reached", reason="GUEST_AGENT_UNAVAILABLE"
            )
        if name in self.guest_agent_down:
            raise FailedPrecondition(f"the guest agent of VM {name} does not answer", reason="GUEST_AGENT_UNAVAILABLE")
        return dom

    async def guest_exec(
        self, name: str, argv: Sequence[str], *, stdin: bytes = b"", timeout: float = 30.0
    ) -> GuestExecResult:
        """See ``Hypervisor.guest_exec``: recorded in ``guest_execs``, answered by ``guest_exec_handler``."""
        await self._enter("guest_exec")
        self._guest(name)
        call = (name, tuple(argv), stdin)
        self.guest_execs.append(call)
        return self.guest_exec_handler(*call) if self.guest_exec_handler is not None else GuestExecResult(0)

    async def guest_file_exists(self, name: str, path: str) -> bool:
        """See ``Hypervisor.guest_file_exists`` (the files in ``guest_files``)."""
        await self._enter("guest_file_exists")
        self._guest(name)
        return path in self.guest_files.get(name, set())

    async def guest_ping(self, name: str) -> None:
        """See ``Hypervisor.guest_ping`` (fails for VMs in ``guest_agent_down``)."""
        await self._enter("guest_ping")
        self._guest(name)

    async def guest_file_read(self, name: str, path: str, max_bytes: int) -> bytes | None:
        """See ``Hypervisor.guest_file_read`` (``guest_file_contents``, the boot id, then ``guest_files`` as empty)."""
        await self._enter("guest_file_read")
        dom = self._guest(name)
        content = self.guest_file_contents.get(name, {}).get(path)
        if content is None and path == BOOT_ID_PATH:
            content = f"{dom.boot_id}\n".encode()
        if content is not None:
            return content[: max(max_bytes, 0)]
        return b"" if path in self.guest_files.get(name, set()) else None

    async def guest_filesystems(self, name: str) -> tuple[GuestFilesystem, ...]:
        """See ``Hypervisor.guest_filesystems`` (``guest_fs``)."""
        await self._enter("guest_filesystems")
        self._guest(name)
        return self.guest_fs.get(name, ())

    async def domain_stats(self) -> dict[str, DomainStats]:
        """See ``Hypervisor.domain_stats``: ``domain_counters`` of running domains; {} without REAL_STATS."""
        await self._enter("domain_stats")
        if Capability.REAL_STATS not in self._caps:
            return {}
        return {
            vm: stats
            for vm, stats in self.domain_counters.items()
            if (dom := self._domains.get(vm)) is not None and dom.state == VmState.RUNNING
        }

    async def probe_targets(self, name: str) -> tuple[ProbeTarget, ...]:
        """See ``Hypervisor.probe_targets``: the addresses while running (loopback: no interface).

        ``probe_addresses[name]`` when set; otherwise, with ``probe_network``, ``network[index + 1]``, where
        ``index`` is the domain's index (the fake counts every create and every boot: a create + start of
        the first VM gives index 2; a new boot gets a new index, so a restarted VM moves to a new address).
        An index past the network's last host address gives no address, never one another VM has.
        """
        await self._enter("probe_targets")
        dom = self._domain(name)
        if dom.state != VmState.RUNNING:
            return ()
        addresses = self.probe_addresses.get(name)
        if addresses is None and self.probe_network is not None:
            # + 1: the network address itself is never a VM's; the broadcast address neither
            offset = dom.index + 1
            last = self.probe_network.num_addresses - 2
            addresses = (str(self.probe_network[offset]),) if 0 < offset <= last else ()
        return tuple(ProbeTarget(addr, interface="") for addr in addresses or ())

    # ---- snapshots -----------------------------------------------------------------------------

    async def create_snapshot(
        self, name: str, snapshot: str, *, kind: SnapshotKind, quiesce: bool = False, steps: StepLog | None = None
    ) -> SnapshotRecord:
        """See ``Hypervisor.create_snapshot``: the same refusals as libvirt + QEMU, one step ``snapshot:NAME``."""
        await self._enter("create_snapshot")
        dom = self._domain(name)
        check_dns_label("snapshot", snapshot)
        common.refuse_internal_with_volumes(dom.spec, snapshot, kind)
        snaps = self._snapshots.setdefault(name, {})
        if snapshot in snaps:
            raise AlreadyExists(
                f"VM {name} already has a snapshot {snapshot}",
                reason="SNAPSHOT_ALREADY_EXISTS",
                metadata={"vm": name, "snapshot": snapshot},
            )
        common.check_snapshot_kind(name, snapshot, kind, (s.kind for s in snaps.values()))
        live = dom.state in (VmState.RUNNING, VmState.PAUSED)
        if kind == SnapshotKind.INTERNAL and live and dom.spec.shared_folders:
            # QEMU cannot save the memory of a guest with a 9p or virtiofs share
            raise FailedPrecondition(
                f"VM {name} is running with shared folders: QEMU cannot save its memory; take a disk-only "
                "snapshot instead (--disk-only --quiesce), or stop the VM first",
                reason="SNAPSHOT_BLOCKED_BY_SHARED_FOLDER",
                metadata={"vm": name},
            )
        if quiesce:
            if kind != SnapshotKind.EXTERNAL:
                # libvirt quiesces only disk-only snapshots
                raise invalid_field("quiesce", "only for disk-only (external) snapshots")
            self._guest(name)  # FailedPrecondition GUEST_AGENT_UNAVAILABLE: stopped, no qemu-ga, or silent
        has_memory = kind == SnapshotKind.INTERNAL and live
        disks = max(len(dom.spec.own_disks), 1) * common.MIB
        snap = _Snap(
            name=snapshot,
            kind=kind,
            created=datetime.now(UTC),
            vm_state=dom.state,
            has_memory=has_memory,
            parent=self._current.get(name, ""),
            disk_state=self.disk_state.get(name, ""),
            size_bytes=disks + (dom.spec.memory_mib * common.MIB if has_memory else 0),
            nonce=secrets.token_hex(8),
        )
        log = steps or common.MemoryStepLog()
        n = log.planned(f"snapshot:{snapshot}", {"kind": "snapshot", "vm": name, "name": snapshot})
        snaps[snapshot] = snap
        self._current[name] = snapshot
        log.made(n, {"nonce": snap.nonce})
        try:
            await self._step("snapshot:taken")
        except BaseException:
            common.roll_back(log, self._undo_sync, name)
            raise
        return self._snapshot_record(name, snap)

    async def list_snapshots(self, name: str) -> builtins.list[SnapshotRecord]:
        """See ``Hypervisor.list_snapshots`` (oldest first)."""
        await self._enter("list_snapshots")
        self._domain(name)
        return [self._snapshot_record(name, s) for s in self._snapshots.get(name, {}).values()]

    async def revert_snapshot(self, name: str, snapshot: str, *, start: bool, steps: StepLog | None = None) -> None:
        """See ``Hypervisor.revert_snapshot``: the disk token comes back; running afterwards only when ``start``.

        The same steps as libvirt's external revert: ``stop``, ``swap`` (the token and the current
        snapshot), ``retire`` (the commit point), with faults at ``revert:stopped`` and ``revert:swapped``.
        """
        await self._enter("revert_snapshot")
        dom = self._domain(name)
        snap = self._snapshot(name, snapshot)
        log = steps or common.MemoryStepLog()
        try:
            if dom.state != VmState.STOPPED:
                n = log.planned("stop", {"kind": "stopped", "name": self.name_prefix + name})
                self._force_off(dom)
                log.made(n, {"uuid": dom.uuid})
            await self._step("revert:stopped")
            undo = {
                "kind": "disk-state",
                "vm": name,
                "state": self.disk_state.get(name, ""),
                "current": self._current.get(name, ""),
            }
            n = log.planned("swap", undo)
            self.disk_state[name] = snap.disk_state
            self._current[name] = snapshot
            log.made(n, {"uuid": dom.uuid, "state": snap.disk_state})
            await self._step("revert:swapped")
            if start:
                self._boot(dom)
            n = log.planned("retire", {"kind": "retire", "vm": name, "paths": "[]"})
            log.made(n, {"uuid": dom.uuid})
        except BaseException:
            common.roll_back(log, self._undo_sync, name)
            raise

    async def delete_snapshot(self, name: str, snapshot: str, *, children: bool = False) -> builtins.list[str]:
        """See ``Hypervisor.delete_snapshot``: one (its children move up to its parent) or the whole subtree."""
        await self._enter("delete_snapshot")
        self._domain(name)
        self._snapshot(name, snapshot)
        doomed = [snapshot, *self._descendants(name, snapshot)] if children else [snapshot]
        snaps = self._snapshots[name]
        # the subtree is deleted leaves first, so the current snapshot climbs to the root's parent
        for victim in reversed(doomed):
            self._drop_snapshot(name, snaps[victim])
        return doomed

    async def export_disks(self, name: str, snapshot: str, workdir: str) -> builtins.list[DiskImage]:
        """See ``Hypervisor.export_disks``: an empty qcow2 of each own disk's size, made by ``qemu-img``."""
        await self._enter("export_disks")
        dom = self._domain(name)
        self._snapshot(name, snapshot)
        images: builtins.list[DiskImage] = []
        for disk in dom.spec.own_disks:
            # a disk on a base image takes its size from the image; the fake says 16 MiB
            size = (disk.size_mib or 16) * common.MIB
            path = os.path.join(workdir, f"{disk.name}.qcow2")
            await _qemu_img("create", "-q", "-f", "qcow2", path, str(size))
            stat = await asyncio.to_thread(os.stat, path)
            images.append(DiskImage(disk.name, path, size, stat.st_size))
        await self._step("export:disks")
        return images

    async def import_disks(
        self, spec: VmSpec, images: Mapping[str, str], *, steps: StepLog | None = None
    ) -> DomainRecord:
        """See ``Hypervisor.import_disks``: folder, one volume per moved image, a stopped domain; all or nothing."""
        await self._enter("import_disks")
        if spec.name in self._domains or spec.name in self._creating:
            raise AlreadyExists(
                f"VM {spec.name} already exists", reason="VM_ALREADY_EXISTS", metadata={"vm": spec.name}
            )
        common.check_import_images(spec, images)
        self._check_volumes(spec)
        domain = self.name_prefix + spec.name
        log = steps or common.MemoryStepLog()
        self._creating.add(spec.name)
        try:
            if self._host_files:
                folder = common.vm_dir(self.storage_dir, domain)
                n = log.planned("folder", {"kind": "folder", "path": folder})
                os.makedirs(folder, mode=0o755)
                log.made(n, common.stamp_identity(folder))
                common.mark_owned(folder, spec.name)
            for disk in spec.own_disks:
                volume = common.volume_name(domain, disk.name)
                n = log.planned(f"disk:{disk.name}", {"kind": "volume", "name": volume})
                log.made(n, self._adopt_volume(volume, spec.name, images[disk.name]))
            await self._step("import:disks")
            # checked again at the define, as a create does: a volume deleted or attached meanwhile
            self._check_volumes(spec)
            self._counter += 1
            dom = _Domain(spec.name, str(uuidlib.uuid4()), spec, datetime.now(UTC).replace(microsecond=0))
            dom.index = self._counter
            n = log.planned("define", {"kind": "domain", "name": domain})
            self._domains[spec.name] = dom
            self._emit(spec.name, EventKind.DEFINED, VmState.STOPPED, "added")
            log.made(n, {"uuid": dom.uuid})
            await self._step("import:define")
        except BaseException:
            common.roll_back(log, self._undo_sync, spec.name)
            raise
        finally:
            self._creating.discard(spec.name)
        return self._record(dom)

    def _snapshot(self, name: str, snapshot: str) -> _Snap:
        snap = self._snapshots.get(name, {}).get(snapshot)
        if snap is None:
            raise NotFound(
                f"VM {name} has no snapshot {snapshot}",
                reason="SNAPSHOT_NOT_FOUND",
                metadata={"vm": name, "snapshot": snapshot},
            )
        return snap

    def _snapshot_record(self, name: str, snap: _Snap) -> SnapshotRecord:
        return SnapshotRecord(
            name=snap.name,
            kind=snap.kind,
            create_time=snap.created,
            vm_state=snap.vm_state,
            has_memory=snap.has_memory,
            parent=snap.parent,
            current=self._current.get(name) == snap.name,
            size_bytes=snap.size_bytes,
        )

    def _descendants(self, name: str, snapshot: str) -> builtins.list[str]:
        """Descendants of ``snapshot``, oldest first."""
        found: set[str] = {snapshot}
        out: builtins.list[str] = []
        for s in self._snapshots.get(name, {}).values():  # parents are always older than their children
            if s.parent in found:
                found.add(s.name)
                out.append(s.name)
        return out

    def _drop_snapshot(self, name: str, snap: _Snap) -> None:
        """Remove one snapshot as libvirt does: its children move up to its parent, and so does current."""
        snaps = self._snapshots.get(name, {})
        snaps.pop(snap.name, None)
        for other in snaps.values():
            if other.parent == snap.name:
                other.parent = snap.parent
        if self._current.get(name) == snap.name:
            if snap.parent:
                self._current[name] = snap.parent
            else:
                self._current.pop(name, None)

    def _adopt_volume(self, name: str, vm: str, source: str) -> dict[str, str]:
        """Move the file ``source`` into the pool as volume ``name`` (owner-marked)."""
        if name in self._volumes:
            raise AlreadyExists(f"volume {name} already exists", reason="VOLUME_ALREADY_EXISTS", metadata={"vm": vm})
        if not self._host_files:
            self._volumes[name] = f"/fake/pool/{name}"
            return self._volume_identity(self._volumes[name], stamp=True)
        path = os.path.join(common.pool_dir(self.storage_dir), name)
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        if os.path.lexists(path):
            raise AlreadyExists(f"volume {name} already exists", reason="VOLUME_ALREADY_EXISTS", metadata={"vm": vm})
        shutil.move(source, path)
        common.mark_owned(path, vm)
        self._volumes[name] = path
        return self._volume_identity(path, stamp=True)

    async def detach_seed(self, name: str) -> builtins.list[str]:
        """See ``Hypervisor.detach_seed``."""
        await self._enter("detach_seed")
        self._domain(name)
        gone = self._delete_volume(common.seed_volume_name(self.domain_name(name)))
        return [gone] if gone is not None else []

    async def orphans(self, keep: Iterable[str] = ()) -> dict[str, builtins.list[str]]:
        """See ``Hypervisor.orphans`` (managed networks no domain is attached to are listed too)."""
        inventory = await self.inventory()
        found = inventory.orphans(self.name_prefix, keep)
        for name, state in self.managed_networks.items():
            lock = self._net_locks.get(name)
            if state.owner == self.owner and not self._users(name) and not (lock is not None and lock.locked()):
                found[common.network_orphan_key(name)] = [common.describe_network(state)]
        return found

    async def inventory(self) -> Inventory:
        """Domains, volumes, marked files and managed networks the fake owns."""
        files = common.marked_files(self.storage_dir) if self._host_files else ()
        agent_files = [f for f in self._agent_volume_files() if f not in self._volumes]
        return Inventory(
            tuple(self.name_prefix + n for n in sorted(self._domains)),
            tuple(sorted([*self._volumes, *agent_files])),
            files,
            tuple(n for n, s in sorted(self._managed.items()) if s.owner == self.owner),
            tuple(self._volume_store.names()),
        )

    # ---- agent volumes -------------------------------------------------------------------------

    async def create_volume(
        self, name: str, size_mib: int, *, shared: bool = False, labels: Mapping[str, str] | None = None
    ) -> Volume:
        """See ``Hypervisor.create_volume``: a placeholder file, then its metadata.

        Named step ``create_volume:file``: the file is made, its metadata not yet (a half-made volume).
        """
        await self._enter("create_volume")
        items = tuple(sorted((labels or {}).items()))
        validate_volume(name, size_mib, items)
        store = self._volume_store
        existing = store.read(name)
        if existing is not None:
            common.check_new_volume(existing, size_mib, shared)
            meta = dataclasses.replace(existing, labels=items)
            if meta != existing:
                store.write(meta)
            return self._volume_model(meta)
        # a half-made volume (file without metadata: a create cut short) is replaced
        for file in common.agent_volume_files(name):
            self._remove_agent_file(file)
        if self._host_files:
            common.check_room(common.pool_dir(self.storage_dir), size_mib * common.MIB, "", volume=name)
        file = common.agent_volume_file(name, shared)
        kind = "raw" if shared else "qcow2"
        self._make_agent_file(file, f"fake {kind} volume {size_mib} MiB\n".encode())
        await self._step("create_volume:file")
        meta = common.VolumeMeta(name, size_mib, shared, items, datetime.now(UTC).replace(microsecond=0))
        store.write(meta)
        return self._volume_model(meta)

    async def delete_volume(self, name: str) -> builtins.list[str]:
        """See ``Hypervisor.delete_volume``."""
        await self._enter("delete_volume")
        check_dns_label("name", name)
        store = self._volume_store
        if store.read(name) is None:
            for file in common.agent_volume_files(name):
                self._remove_agent_file(file)
            raise common.volume_not_found(name)
        users = common.volume_users(self._records(), name)
        if users:
            raise common.volume_in_use(name, users)
        store.remove(name)
        removed = [store.folder + f"/{name}.json"]
        for file in common.agent_volume_files(name):
            gone = self._remove_agent_file(file)
            if gone:
                removed.append(gone)
        return removed

    async def list_volumes(self) -> builtins.list[Volume]:
        """See ``Hypervisor.list_volumes``."""
        await self._enter("list_volumes")
        return [self._volume_model(m) for m in self._volume_store.all()]

    @property
    def _volume_store(self) -> common.VolumeStore:
        return common.VolumeStore(os.path.join(self.storage_dir, common.VOLUMES_SUBDIR))

    def _volume_model(self, meta: common.VolumeMeta) -> Volume:
        return Volume(
            meta.name,
            meta.size_mib,
            meta.shared,
            meta.labels,
            common.volume_users(self._records(), meta.name),
            meta.created,
        )

    def agent_volume_path(self, name: str) -> str | None:
        """Fake state: the file of volume ``name`` (None: no such volume)."""
        meta = self._volume_store.read(name)
        if meta is None:
            return None
        file = common.agent_volume_file(name, meta.shared)
        return os.path.join(common.pool_dir(self.storage_dir), file) if self._host_files else f"/fake/pool/{file}"

    def _agent_volume_files(self) -> builtins.list[str]:
        if not self._host_files:
            return sorted(self._agent_files)
        try:
            return sorted(f for f in os.listdir(common.pool_dir(self.storage_dir)) if common.is_agent_volume_file(f))
        except FileNotFoundError:
            return []

    def _make_agent_file(self, file: str, content: bytes) -> None:
        if not self._host_files:
            self._agent_files.add(file)
            return
        path = os.path.join(common.pool_dir(self.storage_dir), file)
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        with open(path, "xb") as f:
            f.write(content)

    def _remove_agent_file(self, file: str) -> str | None:
        if not self._host_files:
            if file in self._agent_files:
                self._agent_files.discard(file)
                return f"/fake/pool/{file}"
            return None
        path = os.path.join(common.pool_dir(self.storage_dir), file)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return None
        return path

    def _records(self) -> builtins.list[DomainRecord]:
        return [self._record(d) for d in self._domains.values()]

    def _check_volumes(self, spec: VmSpec) -> None:
        """Every volume the spec attaches exists, and one that is not shared is attached by no other domain."""
        store = self._volume_store
        for i, disk in enumerate(spec.disks):
            if not disk.volume:
                continue
            meta = store.read(disk.volume)
            if meta is None:
                raise common.volume_not_found(disk.volume, f"spec.disks[{i}].volume")
            others = [u for u in common.volume_users(self._records(), disk.volume) if u != spec.name]
            if others and not meta.shared:
                raise common.volume_in_use(disk.volume, others, wanted_by=spec.name)

    def console_log_path(self, vm: str) -> str | None:
        """Where ``vm``'s serial console log is (None without host files)."""
        return common.console_log_path(self.storage_dir, self.domain_name(vm)) if self._host_files else None

    def domain_name(self, vm: str) -> str:
        """Hypervisor-side name of ``vm``."""
        return self.name_prefix + vm

    # ---- internals -----------------------------------------------------------------------------

    @property
    def _host_files(self) -> bool:
        return Capability.HOST_FILES in self._caps

    def _unavailable(self) -> Unavailable:
        return Unavailable(
            f"fake hypervisor is unavailable: {self._not_serving_reason}", reason="HYPERVISOR_UNAVAILABLE"
        )

    async def _enter(self, method: str) -> None:
        self.calls[method] += 1
        await self._step(method)
        if not self._serving:
            raise self._unavailable()

    async def _step(self, step: str) -> None:
        delay = self.faults.pending_delay(step)
        if delay > 0:
            await asyncio.sleep(delay)
        self.faults.check(step)

    def _domain(self, name: str) -> _Domain:
        dom = self._domains.get(name)
        if dom is None:
            raise NotFound(f"VM {name} not found", reason="VM_NOT_FOUND", metadata={"vm": name})
        return dom

    def _record(self, dom: _Domain) -> DomainRecord:
        return DomainRecord(
            name=dom.vm,
            uuid=dom.uuid,
            state=dom.state,
            spec=dom.spec,
            create_time=dom.created,
            state_reason=dom.reason,
        )

    def _remove_folder(self, domain: str) -> builtins.list[str]:
        folder = common.vm_dir(self.storage_dir, domain)
        if not self._host_files or not os.path.isdir(folder):
            return []
        removed = [os.path.join(dp, f) for dp, _dn, fns in os.walk(folder) for f in fns]
        shutil.rmtree(folder)
        return [*removed, folder]

    async def plan_create(self, spec: VmSpec, *, start: bool) -> CreatePlan:
        """See ``Hypervisor.plan_create`` (the fake has no domain XML to show)."""
        await self._enter("plan_create")
        resolve_spec(spec, self.image_dirs, self.shared_roots)
        if spec.name in self._domains:
            raise AlreadyExists(
                f"VM {spec.name} already exists", reason="VM_ALREADY_EXISTS", metadata={"vm": spec.name}
            )
        domain = self.name_prefix + spec.name
        steps = ["folder: make its folder"] if self._host_files else []
        self._check_volumes(spec)
        steps += [
            f"disk:{d.name}: attach volume {d.volume} (kept when the VM is deleted)"
            if d.volume
            else f"disk:{d.name}: make volume {common.volume_name(domain, d.name)}"
            for d in spec.disks
        ]
        if spec.has_seed:
            steps.append(f"seed: make volume {common.seed_volume_name(domain)}")
        managed = common.managed_network(spec)
        if managed is not None:
            self._network_preflight(managed, spec.name)
            if managed.libvirt_network not in self.networks:
                steps.append(f"network-define: define, start and autostart network {managed.libvirt_network}")
            steps.append(f"network-host: add the DHCP and DNS host entries of {managed.address}")
        steps.append(f"define: define domain {domain}")
        if start:
            steps.append(f"start: start {domain}")
        steps.append("commit: record the transaction and the request's outcome in the journal")
        return CreatePlan(tuple(steps), "")

    async def undo_step(self, undo: Mapping[str, str], identity: Mapping[str, str] | None) -> str:
        """See ``Hypervisor.undo_step``."""
        await self._enter("undo_step")
        return self._undo_sync(undo, identity)

    def _undo_sync(self, undo: Mapping[str, str], identity: Mapping[str, str] | None) -> str:
        if identity is None:
            return ""
        kind = undo.get("kind")
        if kind == "folder":
            return common.undo_folder(undo["path"], identity)
        if kind == "volume":
            found = self._volumes.get(undo["name"])
            if found is None or self._volume_identity(found) != dict(identity):
                return ""
            return self._delete_volume(undo["name"]) or ""
        if kind == "snapshot":
            snaps = self._snapshots.get(undo["vm"], {})
            snap = snaps.get(undo["name"])
            if snap is None or snap.nonce != identity.get("nonce"):
                return ""
            self._drop_snapshot(undo["vm"], snap)
            return f"snapshot {undo['vm']}/{undo['name']}"
        if kind in ("domain", "running"):
            vm = undo["name"].removeprefix(self.name_prefix)
            dom = self._domains.get(vm)
            if dom is None or dom.uuid != identity.get("uuid"):
                return ""
            self._force_off(dom)
            if kind == "running":
                return f"{undo['name']} (stopped)"
            self._undefine(dom)
            return undo["name"]
        if kind == "stopped":
            dom = self._domains.get(undo["name"].removeprefix(self.name_prefix))
            if dom is None or dom.uuid != identity.get("uuid") or dom.state != VmState.STOPPED:
                return ""
            self._boot(dom)
            return f"{undo['name']} (started again)"
        if kind == "disk-state":
            vm = undo["vm"]
            dom = self._domains.get(vm)
            if dom is None or dom.uuid != identity.get("uuid") or self.disk_state.get(vm, "") != identity.get("state"):
                return ""
            self._force_off(dom)
            self.disk_state[vm] = undo["state"]
            if undo["current"] and undo["current"] in self._snapshots.get(vm, {}):
                self._current[vm] = undo["current"]
            return f"{self.name_prefix}{vm} (disks back on their files)"
        if kind == "retire":
            return ""  # the fake's disks are tokens: a revert supersedes no file
        if kind == common.DEFINITION_UNDO:
            return self._undo_definition(undo, identity)
        if kind == "network":
            state = self._managed.get(undo["name"])
            if state is None or state.uuid != identity.get("uuid") or self._users(state.name):
                return ""
            return self._remove_network(state)
        if kind == "network-host":
            state = self._managed.get(undo["network"])
            if state is None or state.uuid != identity.get("uuid"):
                return ""
            # the domain of this step is undone before it (reverse order): every attached one is another VM's
            others = {m for macs in self._users(state.name).values() for m in macs}
            dhcp, dns = common.entries_to_drop(state, [undo["mac"]], undo["address"], others)
            return ", ".join(self._drop_entries(state.name, dhcp, dns))
        raise ValueError(f"unknown undo kind {kind!r}")

    def _undo_definition(self, undo: Mapping[str, str], identity: Mapping[str, str]) -> str:
        """Put a domain's previous four values back, if it still has those the step gave it.

        Left alone: another domain of the name, values changed since, and a domain running on the new
        vCPUs/memory (it was restarted on the new definition, see ``Hypervisor.update``).
        """
        dom = self._domains.get(undo["vm"])
        if dom is None or dom.uuid != identity.get("uuid"):
            return ""
        new = json.loads(identity.get("fields", "{}"))
        if common.update_fields(dom.spec) != new:
            return ""
        old = json.loads(undo["fields"])
        resources = common.resources_of(new)
        if dom.state != VmState.STOPPED and resources != common.resources_of(old) and dom.booted == resources:
            return ""
        dom.spec = common.with_fields(dom.spec, old)
        return f"{undo['name']} (definition back to its previous labels, health checks, vCPUs and memory)"

    def _volume_identity(self, path: str, *, stamp: bool = False) -> dict[str, str]:
        if not self._host_files:
            return {"key": path}
        return {"key": path, **(common.stamp_identity(path) if stamp else common.file_identity(path))}

    def _make_volume(self, name: str, vm: str, content: bytes) -> dict[str, str]:
        if name in self._volumes:
            raise AlreadyExists(f"volume {name} already exists", reason="VOLUME_ALREADY_EXISTS", metadata={"vm": vm})
        path = os.path.join(common.pool_dir(self.storage_dir), name) if self._host_files else f"/fake/pool/{name}"
        if self._host_files:
            os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
            with open(path, "xb") as f:
                f.write(content)
            common.mark_owned(path, vm)
        self._volumes[name] = path
        return self._volume_identity(path, stamp=True)

    def _delete_volume(self, name: str) -> str | None:
        path = self._volumes.pop(name, None)
        if path is not None and self._host_files:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        return path

    def _boot(self, dom: _Domain) -> None:
        spec = dom.spec
        if spec.network.mode != NetworkMode.NONE:
            net = spec.network.libvirt_network
            active = self.networks.get(net)
            # the messages libvirt gives for the same failures
            if active is None:
                raise self._start_failed(dom, f"Network not found: no network with matching name '{net}'")
            if not active:
                raise self._start_failed(dom, f"Requested operation is not valid: network '{net}' is not active")
        dom.state = VmState.RUNNING
        dom.reason = "booted"
        dom.booted = (spec.vcpus, spec.memory_mib)
        dom.boot_id = str(uuidlib.uuid4())
        self._counter += 1
        dom.index = self._counter
        if dom.console_log is not None:
            with open(dom.console_log, "ab") as f:
                f.write(b"fake console: booted\n")
            common.mark_owned(dom.console_log, dom.vm)
        self._emit(dom.vm, EventKind.STARTED, VmState.RUNNING, "booted")

    @staticmethod
    def _start_failed(dom: _Domain, message: str) -> FailedPrecondition:
        return FailedPrecondition(
            f"VM {dom.vm} failed to start: {message}", reason="DOMAIN_START_FAILED", metadata={"vm": dom.vm}
        )

    # ---- managed networks ----------------------------------------------------------------------

    async def network_state(self, name: str) -> NetworkState | None:
        """Fake state: network ``name`` as the libvirt adapter's ``network_state`` reports it (None: none)."""
        return self._existing_network(name)

    def _net_lock(self, name: str) -> asyncio.Lock:
        return self._net_locks.setdefault(name, asyncio.Lock())

    def _users(self, network: str) -> dict[str, tuple[str, ...]]:
        """Domains attached to ``network``: VM -> MACs (as the libvirt adapter reads domain XML)."""
        return {
            d.vm: (d.mac,)
            for d in self._domains.values()
            if d.spec.network.mode != NetworkMode.NONE and d.spec.network.libvirt_network == network
        }

    def _existing_network(self, name: str) -> NetworkState | None:
        """The network ``name`` as the checks see it (one added by ``set_network`` has no mark and no subnet)."""
        if name not in self.networks:
            return None
        state = self._managed.get(name) or NetworkState(name, "", None, "", "", False)
        return dataclasses.replace(state, active=self.networks[name])

    def _check_routes(self, net: NetworkSpec, vm: str) -> None:
        routes = list(self.host_routes) + [
            (ipaddress.IPv4Network(s.subnet), s.bridge)
            for s in self._managed.values()
            if s.name != net.libvirt_network and s.subnet and self.networks.get(s.name)
        ]
        hit = common.overlapping_route(net.subnet, routes)
        if hit is not None:
            raise common.network_subnet_in_use(
                net.libvirt_network, net.subnet, f"route {hit[0]} on interface {hit[1]}", vm
            )

    def _network_preflight(self, net: NetworkSpec, vm: str) -> None:
        state = self._existing_network(net.libvirt_network)
        if state is not None:
            common.check_existing_network(state, net, self.owner, vm)
        if state is None or not state.active:
            self._check_routes(net, vm)

    def _ensure_network(self, net: NetworkSpec, vm: str, log: StepLog) -> None:
        name = net.libvirt_network
        state = self._existing_network(name)
        if state is not None:
            common.check_existing_network(state, net, self.owner, vm)
            if not state.active:
                self._check_routes(net, vm)
                self.networks[name] = True
            return
        self._check_routes(net, vm)
        n = log.planned("network-define", {"kind": "network", "name": name})
        subnet = str(ipaddress.IPv4Network(net.subnet))
        state = NetworkState(name, str(uuidlib.uuid4()), self.owner, subnet, common.bridge_name(name), True)
        self._managed[name] = state
        self.networks[name] = True
        log.made(n, {"uuid": state.uuid})

    def _add_host(self, net: NetworkSpec, vm: str, mac: str, log: StepLog) -> None:
        name = net.libvirt_network
        state = self._managed[name]
        dhcp, dns = common.host_entries(net, mac)
        live = {m for macs in self._users(name).values() for m in macs}
        stale_dhcp, stale_dns = common.entries_to_replace(state, dhcp, dns, live, vm)
        self._drop_entries(name, stale_dhcp, stale_dns)
        n = log.planned("network-host", common.host_entry_undo(net, mac))
        state = self._managed[name]
        dns_hosts = (*state.dns_hosts, dns) if dns is not None else state.dns_hosts
        self._managed[name] = dataclasses.replace(state, dhcp_hosts=(*state.dhcp_hosts, dhcp), dns_hosts=dns_hosts)
        log.made(n, {"uuid": state.uuid})

    def _drop_entries(self, name: str, dhcp: Iterable[DhcpHost], dns: Iterable[DnsHost]) -> builtins.list[str]:
        state = self._managed[name]
        gone_dhcp, gone_dns = list(dhcp), list(dns)
        self._managed[name] = dataclasses.replace(
            state,
            dhcp_hosts=tuple(h for h in state.dhcp_hosts if h not in gone_dhcp),
            dns_hosts=tuple(d for d in state.dns_hosts if d not in gone_dns),
        )
        return [f"DHCP host {h.mac} -> {h.ip} of network {name}" for h in gone_dhcp] + [
            f"DNS host {d.ip} ({', '.join(d.names)}) of network {name}" for d in gone_dns
        ]

    def _remove_network(self, state: NetworkState) -> str:
        self._managed.pop(state.name, None)
        self.networks.pop(state.name, None)
        return common.describe_network(state)

    def _release_network(self, dom: _Domain) -> builtins.list[str]:
        """The VM's host entries, and its managed network when no other domain is attached (idempotent)."""
        managed = common.managed_network(dom.spec)
        if managed is None:
            return []
        state = self._managed.get(managed.libvirt_network)
        if state is None or state.owner != self.owner:
            return []
        others = {vm: macs for vm, macs in self._users(state.name).items() if vm != dom.vm}
        others_live = {m for macs in others.values() for m in macs}
        dhcp, dns = common.entries_to_drop(state, [dom.mac], managed.address, others_live)
        removed = self._drop_entries(state.name, dhcp, dns)
        if not others:
            removed.append(self._remove_network(self._managed[state.name]))
        return removed

    def _remove_orphan_network(self, name: str) -> builtins.list[str]:
        state = self._managed.get(name)
        lock = self._net_locks.get(name)
        if state is None or state.owner != self.owner or self._users(name) or (lock is not None and lock.locked()):
            return []
        return [self._remove_network(state)]

    def _force_off(self, dom: _Domain) -> None:
        if dom.state != VmState.STOPPED:
            self._stop(dom, VmState.STOPPED, "destroyed", EventKind.STOPPED)

    def _stop(self, dom: _Domain, state: VmState, reason: str, kind: EventKind) -> None:
        dom.state = state
        dom.reason = reason
        dom.shutdown_pending = False
        self._emit(dom.vm, kind, state, reason)
        if not dom.persistent:
            # a transient domain vanishes when it stops
            self._domains.pop(dom.vm, None)

    def _undefine(self, dom: _Domain) -> None:
        if self._domains.get(dom.vm) is dom:
            if dom.state in (VmState.RUNNING, VmState.PAUSED):
                dom.persistent = False
            else:
                del self._domains[dom.vm]
            self._emit(dom.vm, EventKind.UNDEFINED, None, "removed")

    def _emit(self, name: str, kind: EventKind, state: VmState | None, detail: str) -> None:
        sink, loop = self._sink, self._loop
        if sink is None or loop is None or Capability.EVENTS not in self._caps:
            return
        event = HypervisorEvent(name, kind, state, detail)
        # after the call that caused it returns, on the loop: as libvirt's event thread delivers them
        loop.call_soon_threadsafe(sink, event)


async def _qemu_img(*args: str) -> None:
    """Run ``qemu-img`` (Internal with its error output when it fails)."""
    proc = await asyncio.create_subprocess_exec(
        QEMU_IMG, *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise Internal(f"qemu-img {args[0]} failed: {err.decode(errors='replace').strip()[:300]}")
