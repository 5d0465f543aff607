"""
``LibvirtHypervisor``: the ``Hypervisor`` port on libvirt (``qemu:///system`` or ``test:///default``).

Layout of what it makes (``storage_dir`` must be traversable by the QEMU user, so never under /root)::

    storage_dir/pool/                 libvirt dir pool "clonebox-..." (flat: one file per volume)
        cb-web.root.qcow2             qcow2 overlay on a base image, or a blank qcow2
        cb-web.cidata.iso             cloud-init NoCloud seed (when the spec has cloud_init)
    storage_dir/vms/cb-web/           per-VM folder
        console.log                   serial console log (virtlogd)

Every file and folder carries ``user.clonebox.owner=<vm>``; the domain carries ``<cb:owner>`` metadata.
A VM on a managed network (``NetworkMode.MANAGED``) shares a libvirt network ``cb-...`` carrying
``<cb:network agent=...>`` metadata with the other VMs on it: made with the first of them, removed with
the last (``networks.ManagedNetworks``; its XML in ``netxml``).

Every libvirt call runs on the adapter's own thread pool, never on the event loop (``_run``, the one
place; in a copy of the caller's context, so libvirt spans and log lines belong to the RPC that caused
them). Each public method is one worker-thread function, so a cancelled caller cannot interrupt a
create half way: the worker finishes or rolls back on its own.
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import contextlib
import contextvars
import dataclasses
import errno
import functools
import hashlib
import ipaddress
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import urlsplit

import libvirt
import libvirt_qemu

from clonebox_agent.adapters import common
from clonebox_agent.adapters.common import (
    QEMU_CAPABILITIES,
    TEST_DRIVER_CAPABILITIES,
    Fault,
    Faults,
    Inventory,
    StepHook,
)
from clonebox_agent.adapters.images import ResolvedSpec, image_info, resolve_spec
from clonebox_agent.adapters.libvirt import domxml, health, netxml, snapshots
from clonebox_agent.adapters.libvirt.connection import Connection, ensure_event_loop, traced_call
from clonebox_agent.adapters.libvirt.errors import (
    is_code,
    is_connection_error,
    is_unsupported,
    message_of,
    start_failed,
    to_clonebox,
)
from clonebox_agent.adapters.libvirt.events import lifecycle, vm_state
from clonebox_agent.adapters.libvirt.kvmprobe import choose_domain_type
from clonebox_agent.adapters.libvirt.networks import ManagedNetworks
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
    CloneboxError,
    DeadlineExceeded,
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
    ShareDriver,
    StepState,
    VmSpec,
    VmState,
    Volume,
)
from clonebox_core.names import check_dns_label
from clonebox_core.snapshots import SnapshotKind
from clonebox_core.validate import validate_volume

log = logging.getLogger(__name__)

T = TypeVar("T")
MiB = 1024 * 1024


_UNDEFINE_FLAGS = (
    libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
    | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
    | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
    | getattr(libvirt, "VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA", 0)
)
#: what every driver with snapshots accepts (the test driver rejects the NVRAM and checkpoint flags)
_UNDEFINE_FLAGS_MINIMAL = libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
_SEED_TARGET = "hdc"
#: what resource probes need, for every running domain in one ``getAllDomainStats`` call
_STATS_GROUPS = (
    libvirt.VIR_DOMAIN_STATS_STATE
    | libvirt.VIR_DOMAIN_STATS_CPU_TOTAL
    | libvirt.VIR_DOMAIN_STATS_BALLOON
    | libvirt.VIR_DOMAIN_STATS_VCPU
)
#: qemu-ga's answer travels base64-encoded in one libvirt RPC message (a few MiB at most): read in chunks
_GUEST_READ_CHUNK = 1024 * 1024


class _GuestFileMissing(Exception):
    """guest-file-open said the file does not exist."""


def capabilities_for(uri: str) -> frozenset[Capability]:
    """Return what an adapter on ``uri`` can do: all on local QEMU; remote QEMU lacks host files."""
    parts = urlsplit(uri)
    scheme = parts.scheme
    if scheme.startswith("test"):
        return TEST_DRIVER_CAPABILITIES
    if scheme in ("qemu", "qemu+unix") and not parts.hostname:
        return QEMU_CAPABILITIES
    if scheme.startswith("qemu"):
        return QEMU_CAPABILITIES - {Capability.HOST_FILES}
    return frozenset({Capability.EVENTS})


class LibvirtHypervisor:
    """
    The ``Hypervisor`` port on libvirt. Construct, ``await open(sink)``, use, ``await close()``.

    ``uri``: ``qemu:///system`` in production, ``test:///default`` for fast tests.
    ``storage_dir``: where pool volumes and per-VM folders live (created when missing).
    ``image_dirs``: the only folders base images, kernels and initrds may come from.
    ``shared_roots``: the only folders shared folders may lie in (None: anywhere; the agent passes its
    configured list, empty by default, so a daemon shares nothing until the operator says where).
    ``domain_type``: ``auto`` (KVM only when a probe guest runs under it), ``kvm`` or ``qemu`` (TCG).
    ``name_prefix``: prepended to VM names to form libvirt domain names (keeps ours apart in virsh).
    ``owner``: recorded in each domain's metadata; only domains with this owner are listed, so several
    agents (or test runs) can share one libvirtd.
    ``pool_name``: the storage pool (must start with ``clonebox-``; default derived from storage_dir).
    ``reserve``: subtracted from capacity to give allocatable.
    ``fail_on``/``delays``/``step_hook``: scripted faults at named steps (see ``adapters.common``).
    """

    def __init__(
        self,
        uri: str,
        storage_dir: str | os.PathLike[str],
        image_dirs: Sequence[str | os.PathLike[str]],
        *,
        shared_roots: Sequence[str | os.PathLike[str]] | None = None,
        domain_type: str = "auto",
        name_prefix: str = "cb-",
        owner: str = "clonebox",
        pool_name: str | None = None,
        host_name: str | None = None,
        reserve: Resources = Resources(),
        fail_on: Mapping[str, BaseException | Fault] | None = None,
        delays: Mapping[str, float] | None = None,
        step_hook: StepHook | None = None,
        max_workers: int = 8,
        kvm_probe_timeout: float = 5.0,
    ) -> None:
        if domain_type not in ("auto", "kvm", "qemu"):
            raise ValueError(f"domain_type must be auto, kvm or qemu, not {domain_type!r}")
        self.uri = uri
        self.storage_dir = os.path.abspath(storage_dir)
        self.image_dirs = tuple(os.path.abspath(d) for d in image_dirs)
        self.shared_roots = None if shared_roots is None else tuple(os.path.abspath(d) for d in shared_roots)
        common.check_name_prefix(name_prefix)
        self.name_prefix = name_prefix
        self.owner = owner
        self.pool_name = pool_name or "clonebox-" + _slug(self.storage_dir)
        if not self.pool_name.startswith("clonebox-"):
            raise ValueError("pool_name must start with 'clonebox-' (ownership by name)")
        self.reserve = reserve
        self.faults = Faults.of(fail_on, delays, step_hook)
        self._caps = capabilities_for(uri)
        self._host_name = host_name
        self._requested_type = domain_type
        self._domain_type: str | None = None
        self._domain_type_reason = ""
        self._probe_timeout = kvm_probe_timeout
        #: libvirt API calls by name (read by tests and metrics)
        self.calls: Counter[str] = Counter()
        self._conn = Connection(uri, self.calls, self._on_connect)
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="libvirt")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sink: EventSink | None = None
        self._callback_id: int | None = None
        # domain names known to be ours: events of other domains are dropped without a libvirt call
        self._owned: set[str] = set()
        # ownership metadata by domain UUID (None: not ours); a domain's metadata never changes
        self._meta: dict[str, domxml.OwnerMetadata | None] = {}
        self._meta_lock = threading.Lock()
        #: metadata of agent volumes (``create_volume``), beside the pool
        self.volume_store = common.VolumeStore(os.path.join(self.storage_dir, common.VOLUMES_SUBDIR))
        # held by volume creates and deletes, and by a VM create from its volume check through its define
        self._volume_lock = threading.Lock()
        # names being created by this adapter: a concurrent create of one fails fast, touching nothing
        self._creating: set[str] = set()
        self._creating_lock = threading.Lock()
        self._raw_events: asyncio.Queue[tuple[str, int, int]] | None = None
        self._event_task: asyncio.Task[None] | None = None
        #: where ``probe_targets`` reads whether a bridge is up (``<root>/class/net/<bridge>/flags``)
        self.sysfs_root = "/sys"
        # "this driver has no statistics" is logged once, not on every resource probe
        self._no_stats_logged = False
        #: managed networks; subnets this host already routes are refused only where libvirtd is local
        self.network_manager = ManagedNetworks(
            owner, check_routes=Capability.HOST_FILES in self._caps, error=self._error
        )

    # ---- Hypervisor port -----------------------------------------------------------------------

    @property
    def capabilities(self) -> frozenset[Capability]:
        """Features this adapter supports (depends on the URI)."""
        return self._caps

    @property
    def domain_type(self) -> tuple[str | None, str]:
        """(domain type, reason); the type is None until the first successful connection."""
        return self._domain_type, self._domain_type_reason

    async def open(self, sink: EventSink) -> None:
        """Connect (a libvirtd that is down is not an error: calls reconnect) and start events."""
        self._loop = asyncio.get_running_loop()
        self._sink = sink
        self._raw_events = asyncio.Queue()
        self._event_task = asyncio.create_task(self._pump_events(), name="libvirt-events")
        ensure_event_loop()
        try:
            await self._run(self._conn.get)
        except Unavailable as exc:
            log.warning("libvirt is not reachable yet (%s); will retry on each call", exc)

    async def close(self) -> None:
        """Stop events and disconnect."""
        self._sink = None
        if self._event_task is not None:
            self._event_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._event_task
            self._event_task = None
        await self._run(self._close_sync)
        self._executor.shutdown(wait=False)

    async def host_info(self) -> HostInfo:
        """Capacity (host CPUs and memory, pool size) and hypervisor details; never raises when down."""
        return await self._run(self._host_info_sync)

    async def create(
        self, spec: VmSpec, *, start: bool, steps: StepLog | None = None, ssh_public_key: str = ""
    ) -> DomainRecord:
        """Make folder, disks, seed ISO and domain, start it when asked; every step logged; all or nothing."""
        await self._checkpoint("create")
        return await self._run(self._create_sync, spec, start, steps or common.MemoryStepLog(), ssh_public_key)

    async def undo_step(self, undo: Mapping[str, str], identity: Mapping[str, str] | None) -> str:
        """See ``Hypervisor.undo_step``."""
        return await self._run(self._undo_sync, undo, identity)

    async def get(self, name: str) -> DomainRecord:
        """One owned domain."""
        await self._checkpoint("get")
        return await self._run(self._get_sync, name)

    async def list(self) -> builtins.list[DomainRecord]:
        """All owned domains: one ``getAllDomainStats`` call (metadata cached per domain UUID)."""
        await self._checkpoint("list")
        return await self._run(self._list_sync)

    async def start(self, name: str) -> DomainRecord:
        """Start a defined domain (a running one is left alone); DOMAIN_START_FAILED on failure."""
        await self._checkpoint("start")
        return await self._run(self._start_sync, name)

    async def shutdown(self, name: str) -> None:
        """Guest-agent shutdown when qemu-ga is connected, else ACPI power button; does not wait."""
        await self._checkpoint("shutdown")
        await self._run(self._shutdown_sync, name)

    async def destroy(self, name: str) -> None:
        """Force off (a stopped domain is left alone)."""
        await self._checkpoint("destroy")
        await self._run(self._destroy_sync, name)

    async def update(self, name: str, spec: VmSpec, *, steps: StepLog | None = None) -> DomainRecord:
        """See ``Hypervisor.update``: metadata (persistent, and live when it runs); ``defineXML`` for vCPUs/memory."""
        await self._checkpoint("update")
        return await self._run(self._update_sync, name, spec, steps or common.MemoryStepLog())

    async def delete(self, name: str) -> builtins.list[str]:
        """
        Force off, undefine, remove volumes, seed, log and folder; returns the removed paths.

        Also removes leftovers of a VM whose domain is already gone (a crash during create); NotFound
        only when there was nothing at all.
        """
        await self._checkpoint("delete")
        return await self._run(self._delete_sync, name)

    async def addresses(self, name: str) -> tuple[IpAddress, ...]:
        """Addresses from qemu-ga, else DHCP leases; loopback skipped; empty when unknown."""
        await self._checkpoint("addresses")
        return await self._run(self._addresses_sync, name)

    async def guest_exec(
        self, name: str, argv: Sequence[str], *, stdin: bytes = b"", timeout: float = 30.0
    ) -> GuestExecResult:
        """See ``Hypervisor.guest_exec`` (guest-exec, then guest-exec-status until it exits)."""
        await self._checkpoint("guest_exec")
        return await self._run(self._guest_exec_sync, name, tuple(argv), stdin, timeout)

    async def guest_file_exists(self, name: str, path: str) -> bool:
        """See ``Hypervisor.guest_file_exists``."""
        await self._checkpoint("guest_file_exists")
        return await self._run(self._guest_file_exists_sync, name, path)

    async def guest_ping(self, name: str) -> None:
        """See ``Hypervisor.guest_ping`` (qemu-ga ``guest-ping``)."""
        await self._checkpoint("guest_ping")
        await self._run(self._guest_ping_sync, name)

    async def guest_file_read(self, name: str, path: str, max_bytes: int) -> bytes | None:
        """See ``Hypervisor.guest_file_read`` (guest-file-open, -read until ``max_bytes`` or EOF, -close)."""
        if max_bytes < 0:
            raise ValueError("max_bytes must not be negative")
        await self._checkpoint("guest_file_read")
        return await self._run(self._guest_file_read_sync, name, path, max_bytes)

    async def guest_filesystems(self, name: str) -> tuple[GuestFilesystem, ...]:
        """See ``Hypervisor.guest_filesystems`` (qemu-ga ``guest-get-fsinfo``)."""
        await self._checkpoint("guest_filesystems")
        return await self._run(self._guest_filesystems_sync, name)

    async def domain_stats(self) -> dict[str, DomainStats]:
        """See ``Hypervisor.domain_stats``: one ``getAllDomainStats`` call for every running domain.

        Empty on a driver without statistics (the test driver): it either rejects the call or answers
        with the state group only.
        """
        await self._checkpoint("domain_stats")
        return await self._run(self._domain_stats_sync)

    async def probe_targets(self, name: str) -> tuple[ProbeTarget, ...]:
        """See ``Hypervisor.probe_targets``: addresses in an active attached network whose bridge is up.

        Empty unless libvirtd runs on this host: the bridges are checked in this host's sysfs, which
        says nothing about a remote host's bridges or the test driver's make-believe networks.
        """
        await self._checkpoint("probe_targets")
        return await self._run(self._probe_targets_sync, name)

    async def detach_seed(self, name: str) -> builtins.list[str]:
        """See ``Hypervisor.detach_seed``."""
        await self._checkpoint("detach_seed")
        return await self._run(self._detach_seed_sync, name)

    async def create_snapshot(
        self, name: str, snapshot: str, *, kind: SnapshotKind, quiesce: bool = False, steps: StepLog | None = None
    ) -> SnapshotRecord:
        """See ``Hypervisor.create_snapshot`` (step ``snapshot:NAME``, and ``overlay:DISK`` when external)."""
        await self._checkpoint("create_snapshot")
        log = steps or common.MemoryStepLog()
        return await self._run(self._create_snapshot_sync, name, snapshot, kind, quiesce, log)

    async def list_snapshots(self, name: str) -> builtins.list[SnapshotRecord]:
        """See ``Hypervisor.list_snapshots`` (oldest first; a parent before its children)."""
        await self._checkpoint("list_snapshots")
        return await self._run(self._list_snapshots_sync, name)

    async def revert_snapshot(self, name: str, snapshot: str, *, start: bool, steps: StepLog | None = None) -> None:
        """See ``Hypervisor.revert_snapshot`` (external: a journaled overlay swap, since libvirt 9.0 cannot)."""
        await self._checkpoint("revert_snapshot")
        await self._run(self._revert_snapshot_sync, name, snapshot, start, steps or common.MemoryStepLog())

    async def delete_snapshot(self, name: str, snapshot: str, *, children: bool = False) -> builtins.list[str]:
        """See ``Hypervisor.delete_snapshot``; returns the deleted names, the snapshot first."""
        await self._checkpoint("delete_snapshot")
        return await self._run(self._delete_snapshot_sync, name, snapshot, children)

    async def export_disks(self, name: str, snapshot: str, workdir: str) -> builtins.list[DiskImage]:
        """See ``Hypervisor.export_disks`` (``qemu-img convert``: the source images are only read)."""
        await self._checkpoint("export_disks")
        return await self._run(self._export_disks_sync, name, snapshot, workdir)

    async def import_disks(
        self, spec: VmSpec, images: Mapping[str, str], *, steps: StepLog | None = None
    ) -> DomainRecord:
        """See ``Hypervisor.import_disks`` (folder, one volume per image, the domain: steps like ``create``)."""
        await self._checkpoint("import_disks")
        return await self._run(self._import_disks_sync, spec, dict(images), steps or common.MemoryStepLog())

    async def create_volume(
        self, name: str, size_mib: int, *, shared: bool = False, labels: Mapping[str, str] | None = None
    ) -> Volume:
        """See ``Hypervisor.create_volume`` (a pool volume, then its metadata; named step ``create_volume:file``)."""
        await self._checkpoint("create_volume")
        items = tuple(sorted((labels or {}).items()))
        validate_volume(name, size_mib, items)
        return await self._run(self._create_volume_sync, name, size_mib, shared, items)

    async def delete_volume(self, name: str) -> builtins.list[str]:
        """See ``Hypervisor.delete_volume``."""
        await self._checkpoint("delete_volume")
        check_dns_label("name", name)
        return await self._run(self._delete_volume_sync, name)

    async def list_volumes(self) -> builtins.list[Volume]:
        """See ``Hypervisor.list_volumes`` (one domain listing for the attachments)."""
        await self._checkpoint("list_volumes")
        return await self._run(self._list_volumes_sync)

    # ---- beyond the port -----------------------------------------------------------------------

    async def orphans(self, keep: Iterable[str] = ()) -> dict[str, builtins.list[str]]:
        """See ``Hypervisor.orphans`` (managed networks no domain is attached to are listed too)."""
        inventory = await self._run(self._inventory_sync)
        found = inventory.orphans(self.name_prefix, keep)
        found.update(await self._run(lambda: self.network_manager.orphans(self._conn.get())))
        return found

    async def inventory(self) -> Inventory:
        """Everything this adapter owns: domains, volumes in its pool, marked files in storage_dir, managed networks."""
        return await self._run(self._inventory_sync)

    async def network_state(self, name: str) -> common.NetworkState | None:
        """What libvirt network ``name`` says (owner mark, subnet, host entries); None when there is none."""

        def read() -> common.NetworkState | None:
            found = self.network_manager.state(self._conn.get(), name)
            return found[1] if found is not None else None

        return await self._run(read)

    async def remove_pool(self) -> None:
        """Stop and undefine the (empty) storage pool; for uninstall and test teardown."""
        await self._run(self._remove_pool_sync)

    def console_log_path(self, vm: str) -> str | None:
        """Where ``vm``'s serial console log is (None without host files: the test driver)."""
        if Capability.HOST_FILES not in self._caps:
            return None
        return common.console_log_path(self.storage_dir, self.domain_name(vm))

    def domain_name(self, vm: str) -> str:
        """Libvirt domain name of VM ``vm``."""
        return self.name_prefix + vm

    # ---- plumbing ------------------------------------------------------------------------------

    async def _checkpoint(self, step: str) -> None:
        delay = self.faults.pending_delay(step)
        if delay > 0:
            await asyncio.sleep(delay)
        self.faults.check(step)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            # in a copy of the caller's context: libvirt spans are children of the RPC's span, and log
            # lines of the worker carry the call's trace id, request id and actor
            context = contextvars.copy_context()
            return await loop.run_in_executor(self._executor, functools.partial(context.run, fn, *args))
        except CloneboxError:
            raise
        except libvirt.libvirtError as exc:
            if is_connection_error(exc):
                self._conn.drop()
            raise to_clonebox(exc, uri=self.uri) from None

    def _error(self, exc: BaseException, vm: str | None = None, action: str = "") -> CloneboxError:
        if is_connection_error(exc):
            self._conn.drop()
        return to_clonebox(exc, uri=self.uri, vm=vm, action=action)

    def _vm_name(self, domain: str) -> str:
        return domain[len(self.name_prefix) :]

    def _on_connect(self, conn: Any) -> None:
        """(Re)connected: pool, domain type, and event registration (which die with the old link)."""
        if Capability.HOST_FILES in self._caps:
            for d in (self.storage_dir, common.pool_dir(self.storage_dir), self._vms_dir()):
                os.makedirs(d, mode=0o755, exist_ok=True)
        self._ensure_pool(conn)
        if self._domain_type is None:
            self._domain_type, self._domain_type_reason = self._choose_type(conn)
            log.info("domain type %s: %s", self._domain_type, self._domain_type_reason)
        if self._sink is not None:
            # the opaque generation lets a callback left on an old connection be recognised and ignored
            self._callback_id = conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, self._conn.generation
            )

    def _choose_type(self, conn: Any) -> tuple[str, str]:
        if self._caps == TEST_DRIVER_CAPABILITIES and self._requested_type == "auto":
            return "qemu", "libvirt test driver: no guest runs, nothing to probe"
        if Capability.HOST_FILES not in self._caps and self._requested_type == "auto":
            return "qemu", "remote libvirt: the KVM probe needs local files; set domain_type"
        return choose_domain_type(
            conn.unwrapped,
            self._requested_type,
            os.path.join(self.storage_dir, "probe"),
            timeout=self._probe_timeout,
        )

    def _close_sync(self) -> None:
        conn = self._conn.current
        if conn is not None and self._callback_id is not None:
            with contextlib.suppress(libvirt.libvirtError):
                conn.domainEventDeregisterAny(self._callback_id)
        self._callback_id = None
        self._conn.drop()

    def _vms_dir(self) -> str:
        return os.path.join(self.storage_dir, common.VMS_SUBDIR)

    def _step(self, step: str) -> None:
        self.faults.check_blocking(step)

    # ---- storage -------------------------------------------------------------------------------

    def _ensure_pool(self, conn: Any) -> Any:
        path = common.pool_dir(self.storage_dir)
        try:
            pool = conn.storagePoolLookupByName(self.pool_name)
        except libvirt.libvirtError as exc:
            if not is_code(exc, "VIR_ERR_NO_STORAGE_POOL"):
                raise
            root = ET.Element("pool", {"type": "dir"})
            ET.SubElement(root, "name").text = self.pool_name
            target = ET.SubElement(root, "target")
            ET.SubElement(target, "path").text = path
            perms = ET.SubElement(target, "permissions")
            ET.SubElement(perms, "mode").text = "0755"
            pool = conn.storagePoolDefineXML(ET.tostring(root, encoding="unicode"), 0)
        existing = ET.fromstring(pool.XMLDesc(0)).findtext("./target/path")
        if existing is not None and os.path.normpath(existing) != path:
            raise FailedPrecondition(
                f"storage pool {self.pool_name} points at {existing}, not {path}: "
                "choose another pool_name or storage_dir",
                reason="STORAGE_POOL_MISMATCH",
            )
        if not pool.isActive():
            pool.create(0)
        if Capability.HOST_FILES in self._caps:
            common.restrict_to_qemu(path)
        # the test driver keeps no autostart state
        with contextlib.suppress(libvirt.libvirtError):
            pool.setAutostart(1)
        return pool

    def _pool(self, conn: Any) -> Any:
        try:
            pool = conn.storagePoolLookupByName(self.pool_name)
            if pool.isActive():
                return pool
        except libvirt.libvirtError as exc:
            if not is_code(exc, "VIR_ERR_NO_STORAGE_POOL"):
                raise
        # someone stopped or removed it behind our back
        return self._ensure_pool(conn)

    def _volume_xml(
        self, name: str, capacity: int, fmt: str, backing: tuple[str, str] | None, *, private: bool = False
    ) -> str:
        vol = ET.Element("volume")
        ET.SubElement(vol, "name").text = name
        ET.SubElement(vol, "capacity", {"unit": "bytes"}).text = str(capacity)
        target = ET.SubElement(vol, "target")
        ET.SubElement(target, "format", {"type": fmt})
        if private:
            # root-only; libvirt's DAC driver hands it to QEMU's user for as long as the domain runs
            perms = ET.SubElement(target, "permissions")
            ET.SubElement(perms, "mode").text = "0600"
            ET.SubElement(perms, "owner").text = "0"
            ET.SubElement(perms, "group").text = "0"
        if backing is not None:
            store = ET.SubElement(vol, "backingStore")
            ET.SubElement(store, "path").text = backing[0]
            ET.SubElement(store, "format", {"type": backing[1]})
        return ET.tostring(vol, encoding="unicode")

    def _mark(self, path: str, vm: str) -> None:
        if Capability.HOST_FILES in self._caps:
            common.mark_owned(path, vm)

    def _make_disk(self, pool: Any, domain: str, vm: str, index: int, resolved: ResolvedSpec) -> Any:
        disk = resolved.spec.disks[index]
        base = resolved.base_images[index]
        capacity = disk.size_mib * MiB
        backing = None
        if base is not None:
            info = image_info(base)
            # an overlay is never smaller than its base; a bigger size_mib lets the guest grow into it
            capacity = max(capacity, info.virtual_size)
            backing = (base, info.format)
        name = common.volume_name(domain, disk.name)
        xml = self._volume_xml(name, capacity, "qcow2", backing)
        return self._create_volume(pool, name, xml, vm, f"create disk {disk.name} of")

    def _create_volume(self, pool: Any, name: str, xml: str, vm: str, action: str) -> Any:
        try:
            return pool.createXML(xml, 0)
        except libvirt.libvirtError as exc:
            error = self._error(exc, vm, action)
        # drivers differ in the code they use for "exists" (the test driver says OPERATION_FAILED)
        try:
            pool.storageVolLookupByName(name)
        except libvirt.libvirtError:
            raise error from None
        raise AlreadyExists(
            f"{action} {vm}: volume {name} already exists", reason="VOLUME_ALREADY_EXISTS", metadata={"vm": vm}
        )

    def _make_seed(self, conn: Any, pool: Any, domain: str, vm: str, data: bytes) -> Any:
        name = common.seed_volume_name(domain)
        xml = self._volume_xml(name, len(data), "raw", None, private=True)
        vol = self._create_volume(pool, name, xml, vm, "create seed ISO of")
        try:
            if Capability.VOLUME_STREAMS in self._caps:
                # upload through libvirt: also works when libvirtd is on another host
                stream = conn.newStream(0)
                try:
                    vol.upload(stream, 0, len(data), 0)
                    view = memoryview(data)
                    while view:
                        sent = stream.send(bytes(view[: 256 * 1024]))
                        view = view[sent:]
                    stream.finish()
                except BaseException:
                    with contextlib.suppress(libvirt.libvirtError):
                        stream.abort()
                    raise
        except BaseException:
            self._delete_volume(vol)
            raise
        return vol

    def _delete_volume(self, vol: Any) -> str | None:
        try:
            path = str(vol.path())
            vol.delete(0)
            return path
        except libvirt.libvirtError as exc:
            if is_code(exc, "VIR_ERR_NO_STORAGE_VOL"):
                return None
            raise

    # ---- agent volumes -------------------------------------------------------------------------

    def _create_volume_sync(
        self, name: str, size_mib: int, shared: bool, labels: tuple[tuple[str, str], ...]
    ) -> Volume:
        with self._volume_lock:
            existing = self.volume_store.read(name)
            if existing is not None:
                common.check_new_volume(existing, size_mib, shared)
                meta = dataclasses.replace(existing, labels=labels)
                if meta != existing:
                    self.volume_store.write(meta)
                return self._volume_model(meta, self._list_sync())
            conn = self._conn.get()
            pool = self._pool(conn)
            # a half-made volume (its file without metadata: a create cut short) is replaced
            self._remove_volume_files(pool, name)
            if Capability.HOST_FILES in self._caps:
                common.check_room(common.pool_dir(self.storage_dir), size_mib * MiB, "", volume=name)
            file = common.agent_volume_file(name, shared)
            xml = self._volume_xml(file, size_mib * MiB, "raw" if shared else "qcow2", None)
            # libvirt's errors come back as CloneboxError (AlreadyExists for a foreign file of that name)
            self._create_volume(pool, file, xml, name, "create the file of volume")
            self._step("create_volume:file")
            meta = common.VolumeMeta(name, size_mib, shared, labels, datetime.now(UTC).replace(microsecond=0))
            self.volume_store.write(meta)
            return self._volume_model(meta, self._list_sync())

    def _delete_volume_sync(self, name: str) -> builtins.list[str]:
        with self._volume_lock:
            conn = self._conn.get()
            if self.volume_store.read(name) is None:
                self._remove_volume_files(self._pool(conn), name)
                raise common.volume_not_found(name)
            users = common.volume_users(self._list_sync(), name)
            if users:
                raise common.volume_in_use(name, users)
            # metadata first: from here the volume is gone; a crash before the file goes leaves a half-made one
            self.volume_store.remove(name)
            removed = [os.path.join(self.volume_store.folder, f"{name}.json")]
            return removed + self._remove_volume_files(self._pool(conn), name)

    def _list_volumes_sync(self) -> builtins.list[Volume]:
        metas = self.volume_store.all()
        records = self._list_sync() if metas else []
        return [self._volume_model(m, records) for m in metas]

    @staticmethod
    def _volume_model(meta: common.VolumeMeta, records: Iterable[DomainRecord]) -> Volume:
        return Volume(
            meta.name, meta.size_mib, meta.shared, meta.labels, common.volume_users(records, meta.name), meta.created
        )

    def _remove_volume_files(self, pool: Any, name: str) -> builtins.list[str]:
        removed = []
        for file in common.agent_volume_files(name):
            try:
                vol = pool.storageVolLookupByName(file)
            except libvirt.libvirtError as exc:
                if is_code(exc, "VIR_ERR_NO_STORAGE_VOL"):
                    continue
                raise self._error(exc, action=f"look up the file of volume {name}") from None
            try:
                gone = self._delete_volume(vol)
            except libvirt.libvirtError as exc:
                raise self._error(exc, action=f"delete the file of volume {name}") from None
            if gone is not None:
                removed.append(gone)
        return removed

    def _attached_volumes(self, conn: Any, spec: VmSpec) -> dict[int, domxml.Disk]:
        """The disks of the agent volumes ``spec`` attaches, by disk index; the checks of ``create``.

        NotFound VOLUME_NOT_FOUND (naming ``spec.disks[i].volume``) for a volume without metadata or file,
        FailedPrecondition VOLUME_IN_USE when another domain attaches a volume that is not shared.
        """
        wanted = [(i, d) for i, d in enumerate(spec.disks) if d.volume]
        if not wanted:
            return {}
        records = self._list_sync()
        pool = self._pool(conn)
        out: dict[int, domxml.Disk] = {}
        for i, disk in wanted:
            field = f"spec.disks[{i}].volume"
            meta = self.volume_store.read(disk.volume)
            if meta is None:
                raise common.volume_not_found(disk.volume, field)
            try:
                path = str(pool.storageVolLookupByName(common.agent_volume_file(disk.volume, meta.shared)).path())
            except libvirt.libvirtError as exc:
                if is_code(exc, "VIR_ERR_NO_STORAGE_VOL"):
                    raise common.volume_not_found(disk.volume, field) from None
                raise self._error(exc, spec.name, f"look up volume {disk.volume} for") from None
            others = [u for u in common.volume_users(records, disk.volume) if u != spec.name]
            if others and not meta.shared:
                raise common.volume_in_use(disk.volume, others, wanted_by=spec.name)
            out[i] = domxml.Disk(
                path,
                domxml.virtio_target(i),
                format="raw" if meta.shared else "qcow2",
                serial=common.volume_serial(disk.volume),
                shareable=meta.shared,
            )
        return out

    # ---- create --------------------------------------------------------------------------------

    def _create_sync(self, spec: VmSpec, start: bool, log: StepLog, ssh_public_key: str = "") -> DomainRecord:
        resolved = resolve_spec(spec, self.image_dirs, self.shared_roots)
        self._step("create:validated")
        with self._creating_lock:
            if spec.name in self._creating:
                raise AlreadyExists(
                    f"VM {spec.name} already exists (being created)",
                    reason="VM_ALREADY_EXISTS",
                    metadata={"vm": spec.name},
                )
            self._creating.add(spec.name)
        try:
            return self._create_claimed(resolved, start, log, ssh_public_key)
        finally:
            with self._creating_lock:
                self._creating.discard(spec.name)

    def _create_claimed(self, resolved: ResolvedSpec, start: bool, log: StepLog, ssh_public_key: str) -> DomainRecord:
        spec = resolved.spec
        domain = self.domain_name(spec.name)
        conn = self._conn.get()
        try:
            conn.lookupByName(domain)
        except libvirt.libvirtError as exc:
            if not is_code(exc, "VIR_ERR_NO_DOMAIN"):
                raise self._error(exc, spec.name, "look up") from None
        else:
            raise AlreadyExists(
                f"VM {spec.name} already exists", reason="VM_ALREADY_EXISTS", metadata={"vm": spec.name}
            )
        if Capability.HOST_FILES in self._caps:
            common.check_room(common.pool_dir(self.storage_dir), self._disk_bytes(resolved), spec.name)
        managed = common.managed_network(spec)
        if managed is not None:
            try:
                self.network_manager.preflight(conn, managed, spec.name)
            except libvirt.libvirtError as exc:
                raise self._error(exc, spec.name, f"look up network {managed.libvirt_network} for") from None
        self._attached_volumes(conn, spec)
        # known before libvirt can report its first event
        self._owned.add(domain)
        try:
            return self._create_steps(conn, resolved, domain, start, log, ssh_public_key)
        except BaseException as exc:
            common.roll_back(log, self._undo_sync, spec.name)
            if isinstance(exc, libvirt.libvirtError):
                raise self._error(exc, spec.name, "create") from None
            raise

    def _create_steps(
        self, conn: Any, resolved: ResolvedSpec, domain: str, start: bool, log: StepLog, ssh_public_key: str
    ) -> DomainRecord:
        spec = resolved.spec
        vm = spec.name
        host_files = Capability.HOST_FILES in self._caps
        console_log = None
        if host_files:
            folder = common.vm_dir(self.storage_dir, domain)
            n = log.planned("folder", {"kind": "folder", "path": folder})
            try:
                os.makedirs(folder, mode=0o755)
            except FileExistsError:
                # a concurrent create of the same name got here first (or a crash left it: the sweep or
                # delete cleans it); the folder is not ours to remove
                raise AlreadyExists(
                    f"VM {vm} already exists (its folder {folder} does)",
                    reason="VM_ALREADY_EXISTS",
                    metadata={"vm": vm},
                ) from None
            log.made(n, common.stamp_identity(folder))
            self._mark(folder, vm)
            console_log = common.console_log_path(self.storage_dir, domain)
        self._step("create:folder")

        pool = self._pool(conn)
        disks: builtins.list[domxml.Disk] = []
        for i, disk in enumerate(spec.disks):
            if disk.volume:
                # an agent volume is attached, never made (nor undone): its disk is filled in at the define
                disks.append(domxml.Disk("", domxml.virtio_target(i)))
                continue
            name = common.volume_name(domain, disk.name)
            n = log.planned(f"disk:{disk.name}", {"kind": "volume", "name": name})
            vol = self._make_disk(pool, domain, vm, i, resolved)
            path = str(vol.path())
            log.made(n, self._volume_identity(vol, path, stamp=True))
            self._mark(path, vm)
            disks.append(domxml.Disk(path, domxml.virtio_target(i)))
        self._step("create:disks")

        vm_uuid = str(uuidlib.uuid4())
        if spec.has_seed:
            seed = seed_cloud_init(spec, ssh_public_key=ssh_public_key)
            data = build_seed_iso(seed, instance_id=f"iid-{vm_uuid}", hostname=vm)
            n = log.planned("seed", {"kind": "volume", "name": common.seed_volume_name(domain)})
            vol = self._make_seed(conn, pool, domain, vm, data)
            path = str(vol.path())
            log.made(n, self._volume_identity(vol, path, stamp=True))
            self._mark(path, vm)
            disks.append(domxml.Disk(path, _SEED_TARGET, format="raw", cdrom=True))
        self._step("create:seed")

        managed = common.managed_network(spec)
        mac: str | None = None
        # held until the domain is defined: under it, an entry whose MAC is on no domain is a leftover
        lock = self.network_manager.lock(managed.libvirt_network) if managed is not None else contextlib.nullcontext()
        with lock:
            if managed is not None:
                mac = common.new_mac()
                network = self.network_manager.ensure(conn, managed, vm, log)
                self.network_manager.add_host(conn, network, managed, vm, mac, log)
            self._step("create:network")

            # checked again under the lock and through the define: no volume create, delete or other VM's
            # attach is between the check and the domain that attaches it
            with self._volume_lock:
                volumes = self._attached_volumes(conn, spec)
                disks = [volumes.get(i, d) for i, d in enumerate(disks)]
                cfg = self._domain_config(resolved, domain, vm_uuid, disks, console_log, mac=mac)
                dom = self._define(conn, cfg, vm, log)
            self._step("create:define")

        if start:
            # destroy before undefine on rollback (undo runs in reverse)
            n = log.planned("start", {"kind": "running", "name": domain})
            try:
                dom.create()
            except libvirt.libvirtError as exc:
                raise start_failed(exc, uri=self.uri, vm=vm) from None
            log.made(n, {"uuid": vm_uuid})
            self._mark_console_log(domain, vm)
            self._step("create:start")
        state, reason = dom.state()
        return self._record(dom, cfg.owner, state, reason)

    def _define(self, conn: Any, cfg: domxml.DomainConfig, vm: str, log: StepLog) -> Any:
        """Define the domain of ``cfg`` as step ``define`` (its undo: destroy + undefine); the new domain."""
        n = log.planned("define", {"kind": "domain", "name": cfg.name})
        try:
            dom = conn.defineXML(domxml.domain_xml(cfg))
        except libvirt.libvirtError as exc:
            raise self._error(exc, vm, "define") from None
        log.made(n, {"uuid": cfg.uuid})
        with self._meta_lock:
            self._meta[cfg.uuid] = cfg.owner
        return dom

    def _domain_config(
        self,
        resolved: ResolvedSpec,
        domain: str,
        vm_uuid: str,
        disks: Sequence[domxml.Disk],
        console_log: str | None,
        *,
        mac: str | None = None,
    ) -> domxml.DomainConfig:
        """The one description of the domain a create defines (and a dry run shows)."""
        spec = resolved.spec
        return domxml.DomainConfig(
            name=domain,
            uuid=vm_uuid,
            domain_type=self._domain_type or "qemu",
            vcpus=spec.vcpus,
            memory_mib=spec.memory_mib,
            owner=domxml.OwnerMetadata(
                agent=self.owner, vm=spec.name, spec=spec, created=datetime.now(UTC).replace(microsecond=0)
            ),
            disks=tuple(disks),
            kernel=resolved.kernel,
            initrd=resolved.initrd,
            cmdline=spec.kernel_boot.cmdline if spec.kernel_boot is not None else "",
            network=spec.network.libvirt_network if spec.network.mode != NetworkMode.NONE else None,
            mac=mac,
            filesystems=tuple(
                domxml.Filesystem(src, sf.tag, sf.read_only, virtiofs=sf.driver is ShareDriver.VIRTIOFS)
                for src, sf in zip(resolved.shared_folders, spec.shared_folders, strict=True)
            ),
            console_log=console_log,
        )

    async def plan_create(self, spec: VmSpec, *, start: bool) -> CreatePlan:
        """See ``Hypervisor.plan_create``."""
        return await self._run(self._plan_sync, spec, start)

    def _plan_sync(self, spec: VmSpec, start: bool) -> CreatePlan:
        # the same resolution and pre-flight as a create; user-data never appears in what is shown
        resolved = resolve_spec(common.redacted_spec(spec), self.image_dirs, self.shared_roots)
        domain = self.domain_name(spec.name)
        conn = self._conn.get()
        try:
            conn.lookupByName(domain)
        except libvirt.libvirtError as exc:
            if not is_code(exc, "VIR_ERR_NO_DOMAIN"):
                raise self._error(exc, spec.name, "look up") from None
        else:
            raise AlreadyExists(
                f"VM {spec.name} already exists", reason="VM_ALREADY_EXISTS", metadata={"vm": spec.name}
            )
        host_files = Capability.HOST_FILES in self._caps
        if host_files:
            common.check_room(common.pool_dir(self.storage_dir), self._disk_bytes(resolved), spec.name)
        pool_path = common.pool_dir(self.storage_dir)
        steps: builtins.list[str] = []
        console_log = None
        if host_files:
            folder = common.vm_dir(self.storage_dir, domain)
            steps.append(f"folder: make {folder}")
            console_log = common.console_log_path(self.storage_dir, domain)
        disks: builtins.list[domxml.Disk] = []
        volumes = self._attached_volumes(conn, spec)
        for i, (disk, base) in enumerate(zip(spec.disks, resolved.base_images, strict=True)):
            if disk.volume:
                attached = volumes[i]
                what = "shared raw" if attached.shareable else "qcow2"
                steps.append(f"disk:{disk.name}: attach volume {disk.volume} ({what}, {attached.path}; kept on delete)")
                disks.append(attached)
                continue
            path = os.path.join(pool_path, common.volume_name(domain, disk.name))
            what = f"qcow2 overlay on {base}" if base else f"blank qcow2 of {disk.size_mib} MiB"
            steps.append(f"disk:{disk.name}: make volume {path} ({what})")
            disks.append(domxml.Disk(path, domxml.virtio_target(i)))
        if spec.has_seed:
            path = os.path.join(pool_path, common.seed_volume_name(domain))
            steps.append(f"seed: make the cloud-init NoCloud ISO {path}")
            disks.append(domxml.Disk(path, _SEED_TARGET, format="raw", cdrom=True))
        managed = common.managed_network(spec)
        mac: str | None = None
        if managed is not None:
            try:
                self.network_manager.preflight(conn, managed, spec.name)
                exists = self.network_manager.exists(conn, managed.libvirt_network)
            except libvirt.libvirtError as exc:
                raise self._error(exc, spec.name, f"look up network {managed.libvirt_network} for") from None
            if not exists:
                steps.append(self.network_manager.describe_define(managed))
            mac = common.new_mac()
            steps.append(_describe_host_entries(managed, mac))
        steps.append(f"define: define domain {domain} (XML below)")
        if start:
            steps.append(f"start: start {domain}")
        steps.append("commit: record the transaction and the request's outcome in the journal")
        cfg = self._domain_config(resolved, domain, str(uuidlib.uuid4()), disks, console_log, mac=mac)
        return CreatePlan(tuple(steps), domxml.domain_xml(cfg))

    @staticmethod
    def _disk_bytes(resolved: ResolvedSpec) -> int:
        """Virtual size of every disk the VM gets (an overlay is never smaller than its base)."""
        total = 0
        for disk, base in zip(resolved.spec.disks, resolved.base_images, strict=True):
            total += max(disk.size_mib * MiB, image_info(base).virtual_size if base is not None else 0)
        return total

    def _volume_identity(self, vol: Any, path: str, *, stamp: bool = False) -> dict[str, str]:
        identity = {"key": str(vol.key())}
        if Capability.HOST_FILES in self._caps:
            # a dir pool's key is the path: the file's own identity tells a replaced file from ours
            identity.update(common.stamp_identity(path) if stamp else common.file_identity(path))
        return identity

    def _undo_sync(self, undo: Mapping[str, str], identity: Mapping[str, str] | None) -> str:
        """Remove what one step made if it is still the same artifact; what was removed ("" if nothing)."""
        if identity is None:
            return ""
        kind = undo.get("kind")
        if kind == "folder":
            return common.undo_folder(undo["path"], identity)
        conn = self._conn.get()
        if kind == "volume":
            try:
                vol = self._pool(conn).storageVolLookupByName(undo["name"])
            except libvirt.libvirtError as exc:
                if is_code(exc, "VIR_ERR_NO_STORAGE_VOL"):
                    return ""
                raise
            path = str(vol.path())
            if self._volume_identity(vol, path) != dict(identity):
                return ""
            return self._delete_volume(vol) or ""
        if kind in ("domain", "running"):
            try:
                dom = conn.lookupByName(undo["name"])
            except libvirt.libvirtError as exc:
                if is_code(exc, "VIR_ERR_NO_DOMAIN"):
                    return ""
                raise
            if str(dom.UUIDString()) != identity.get("uuid"):
                return ""
            self._destroy_quietly(dom)
            if kind == "running":
                return f"{undo['name']} (stopped)"
            self._undefine_quietly(dom)
            with self._meta_lock:
                self._meta.pop(identity["uuid"], None)
            return undo["name"]
        if kind == "snapshot":
            return self._undo_snapshot(undo, identity)
        if kind == "disk-sources":
            return self._undo_sources(undo, identity)
        if kind == "stopped":
            return self._undo_stop(undo, identity)
        if kind == common.DEFINITION_UNDO:
            return self._undo_definition(undo, identity)
        if kind == "retire":
            # the commit point of a revert: undoing it means finishing it
            return self._retire(undo["vm"], json.loads(undo["paths"]))
        if kind == "network":
            return self.network_manager.undo_define(conn, undo, identity)
        if kind == "network-host":
            return self.network_manager.undo_host(conn, undo, identity)
        raise ValueError(f"unknown undo kind {kind!r}")

    def _mark_console_log(self, domain: str, vm: str) -> None:
        # virtlogd creates the log when the domain starts, so it is marked after each start
        if Capability.HOST_FILES in self._caps:
            log_path = common.console_log_path(self.storage_dir, domain)
            if os.path.exists(log_path):
                self._mark(log_path, vm)

    def _undefine_quietly(self, dom: Any) -> None:
        try:
            self._undefine(dom)
        except libvirt.libvirtError as exc:
            if not is_code(exc, "VIR_ERR_NO_DOMAIN"):
                raise

    def _destroy_quietly(self, dom: Any) -> None:
        try:
            if dom.isActive():
                dom.destroy()
        except libvirt.libvirtError as exc:
            if not (is_code(exc, "VIR_ERR_NO_DOMAIN") or is_code(exc, "VIR_ERR_OPERATION_INVALID")):
                raise

    def _undefine(self, dom: Any) -> None:
        try:
            dom.undefineFlags(_UNDEFINE_FLAGS)
        except libvirt.libvirtError as exc:
            # drivers without NVRAM/checkpoint support reject the flags; snapshot metadata must still go
            # (plain undefine refuses a domain that has snapshots)
            if is_code(exc, "VIR_ERR_NO_SUPPORT") or is_code(exc, "VIR_ERR_INVALID_ARG"):
                dom.undefineFlags(_UNDEFINE_FLAGS_MINIMAL)
            else:
                raise

    # ---- queries -------------------------------------------------------------------------------

    def _owner_meta(self, dom: Any) -> domxml.OwnerMetadata | None:
        key = str(dom.UUIDString())
        with self._meta_lock:
            if key in self._meta:
                return self._meta[key]
        try:
            text = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, domxml.NAMESPACE, 0)
            meta = domxml.parse_owner(text)
        except libvirt.libvirtError as exc:
            if is_code(exc, "VIR_ERR_NO_DOMAIN_METADATA"):
                meta = None
            elif is_code(exc, "VIR_ERR_NO_DOMAIN"):
                return None
            else:
                raise
        except (ET.ParseError, ValueError, KeyError, TypeError):
            log.warning("domain %s has unreadable clonebox metadata; ignoring it", dom.name())
            meta = None
        if meta is not None and meta.agent != self.owner:
            meta = None
        with self._meta_lock:
            self._meta[key] = meta
        if meta is not None:
            self._owned.add(str(dom.name()))
        return meta

    def _owned_domain(self, vm: str) -> tuple[Any, domxml.OwnerMetadata]:
        conn = self._conn.get()
        try:
            dom = conn.lookupByName(self.domain_name(vm))
        except libvirt.libvirtError as exc:
            raise self._error(exc, vm, "look up") from None
        meta = self._owner_meta(dom)
        if meta is None:
            raise NotFound(f"VM {vm} not found", reason="VM_NOT_FOUND", metadata={"vm": vm})
        return dom, meta

    def _record(self, dom: Any, meta: domxml.OwnerMetadata, state: int, reason: int) -> DomainRecord:
        vm_state_, word = vm_state(state, reason)
        return DomainRecord(
            name=meta.vm,
            uuid=str(dom.UUIDString()),
            state=vm_state_,
            spec=meta.spec,
            create_time=meta.created,
            state_reason=word,
        )

    def _get_sync(self, vm: str) -> DomainRecord:
        dom, meta = self._owned_domain(vm)
        try:
            state, reason = dom.state()
        except libvirt.libvirtError as exc:
            raise self._error(exc, vm, "get") from None
        return self._record(dom, meta, state, reason)

    def _list_sync(self) -> builtins.list[DomainRecord]:
        conn = self._conn.get()
        out = []
        for dom, stats in conn.getAllDomainStats(libvirt.VIR_DOMAIN_STATS_STATE, 0):
            if not str(dom.name()).startswith(self.name_prefix):
                continue
            meta = self._owner_meta(dom)
            if meta is None:
                continue
            out.append(self._record(dom, meta, int(stats.get("state.state", 0)), int(stats.get("state.reason", 0))))
        out.sort(key=lambda r: r.name)
        return out

    def _inventory_sync(self) -> Inventory:
        conn = self._conn.get()
        domains = tuple(self.domain_name(r.name) for r in self._list_sync())
        pool = self._pool(conn)
        volumes = tuple(sorted(str(v.name()) for v in pool.listAllVolumes(0)))
        files: tuple[tuple[str, str], ...] = ()
        if Capability.HOST_FILES in self._caps:
            files = common.marked_files(self.storage_dir)
        networks = tuple(s.name for s in self.network_manager.owned(conn))
        return Inventory(domains, volumes, files, networks, tuple(self.volume_store.names()))

    def _host_info_sync(self) -> HostInfo:
        caps = tuple(sorted(c.value for c in self._caps))
        try:
            conn = self._conn.get()
            info = conn.getInfo()
            pool_capacity = int(self._pool(conn).info()[1])
            hostname = self._host_name or str(conn.getHostname())
            lib_version = _version(conn.getLibVersion())
            hv_version = _version(conn.getVersion())
            cpu_model = ET.fromstring(conn.getCapabilities()).findtext("./host/cpu/model") or str(info[0])
        except (CloneboxError, libvirt.libvirtError) as exc:
            if isinstance(exc, libvirt.libvirtError) and is_connection_error(exc):
                self._conn.drop()
            return HostInfo(
                name=self._host_name or socket.gethostname(),
                capacity=Resources(),
                allocatable=Resources(),
                hypervisor=HypervisorInfo(
                    uri=self.uri,
                    domain_type=self._domain_type or "",
                    domain_type_reason=self._domain_type_reason,
                    capabilities=caps,
                ),
                serving=False,
                not_serving_reason=message_of(exc) if not isinstance(exc, CloneboxError) else exc.message,
            )
        capacity = Resources(vcpus=int(info[2]), memory_mib=int(info[1]), disk_mib=pool_capacity // MiB)
        room = capacity - self.reserve
        return HostInfo(
            name=hostname,
            capacity=capacity,
            allocatable=Resources(max(room.vcpus, 0), max(room.memory_mib, 0), max(room.disk_mib, 0)),
            hypervisor=HypervisorInfo(
                uri=self.uri,
                libvirt_version=lib_version,
                hypervisor_version=hv_version,
                domain_type=self._domain_type or "",
                domain_type_reason=self._domain_type_reason,
                capabilities=caps,
                cpu_model=cpu_model,
            ),
        )

    # ---- lifecycle -----------------------------------------------------------------------------

    def _start_sync(self, vm: str) -> DomainRecord:
        dom, meta = self._owned_domain(vm)
        try:
            if not dom.isActive():
                try:
                    dom.create()
                except libvirt.libvirtError as exc:
                    # it may have been started concurrently: that is what the caller wanted
                    if not (is_code(exc, "VIR_ERR_OPERATION_INVALID") and dom.isActive()):
                        raise start_failed(exc, uri=self.uri, vm=vm) from None
                self._mark_console_log(self.domain_name(vm), vm)
            state, reason = dom.state()
        except libvirt.libvirtError as exc:
            raise self._error(exc, vm, "start") from None
        return self._record(dom, meta, state, reason)

    def _shutdown_sync(self, vm: str) -> None:
        dom, _meta = self._owned_domain(vm)
        try:
            if not dom.isActive():
                return
            if Capability.GUEST_AGENT in self._caps and domxml.agent_connected(dom.XMLDesc(0)):
                try:
                    dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT)
                    return
                except libvirt.libvirtError as exc:
                    if is_connection_error(exc):
                        raise
                    log.info("guest agent shutdown of %s failed (%s); using ACPI", vm, message_of(exc))
            if Capability.ACPI_SHUTDOWN in self._caps:
                dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
            else:
                dom.shutdown()
        except libvirt.libvirtError as exc:
            if is_code(exc, "VIR_ERR_OPERATION_INVALID") and not _active(dom):
                return  # it stopped meanwhile
            raise self._error(exc, vm, "shut down") from None

    def _destroy_sync(self, vm: str) -> None:
        dom, _meta = self._owned_domain(vm)
        try:
            self._destroy_quietly(dom)
        except libvirt.libvirtError as exc:
            raise self._error(exc, vm, "destroy") from None

    def _update_sync(self, vm: str, spec: VmSpec, steps: StepLog) -> DomainRecord:
        dom, _meta = self._owned_domain(vm)
        try:
            if not dom.isPersistent():
                raise FailedPrecondition(
                    f"VM {vm} has no persistent definition (it was undefined behind the agent's back): "
                    "nothing to update; delete it",
                    reason="VM_NOT_PERSISTENT",
                    metadata={"vm": vm},
                )
            current = self._persistent_owner(dom, vm)[0]
        except libvirt.libvirtError as exc:
            raise self._error(exc, vm, "look up") from None
        old = common.update_fields(current.spec)
        # one round trip through the at-rest form, so that the identity compares equal to what is read back
        new = common.update_fields(common.with_fields(current.spec, common.update_fields(spec)))
        n = steps.planned(common.UPDATE_STEP, common.definition_undo(vm, self.domain_name(vm), old))
        # before it acts (see the port): the undo checks that the domain has exactly these values
        steps.made(n, {"uuid": str(dom.UUIDString()), "fields": common.fields_text(new)})
        try:
            self._apply_fields(dom, vm, new)
            self._step(common.UPDATE_REDEFINED)
        except BaseException as exc:
            for step in steps.steps():  # only this method's own step: the others are the caller's
                if step.n == n and step.state == StepState.DONE:
                    try:
                        self._undo_sync(step.undo, step.identity)
                        steps.undone(n, True)
                    except Exception:
                        log.exception("undo of the update of %s failed", vm)
                        steps.undone(n, False)
            if isinstance(exc, libvirt.libvirtError):
                raise self._error(exc, vm, "update") from None
            raise
        return self._get_sync(vm)

    def _persistent_owner(self, dom: Any, vm: str) -> tuple[domxml.OwnerMetadata, str, str]:
        """The persistent definition's ownership metadata, its ``cb:spec`` text and the inactive XML itself."""
        xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE)
        meta = domxml.parse_owner(xml)
        text = domxml.spec_text(xml)
        if meta is None or text is None or meta.agent != self.owner:
            raise NotFound(f"VM {vm} not found", reason="VM_NOT_FOUND", metadata={"vm": vm})
        return meta, text, xml

    def _apply_fields(self, dom: Any, vm: str, fields: Mapping[str, Any]) -> None:
        """Write the four updatable values into the domain.

        ``cb:spec`` changes in those keys only and, if they differ, ``<vcpu>``/``<memory>`` of the persistent
        definition (redefined from its own inactive XML). The live definition of a running domain gets the
        new metadata only: its vCPUs and memory change when it next starts.
        """
        meta, text, inactive = self._persistent_owner(dom, vm)
        new_text = domxml.patch_spec_text(text, fields)
        new_meta = dataclasses.replace(meta, spec=domxml.spec_from_json(new_text))
        vcpus, memory_mib = common.resources_of(fields)
        active = bool(dom.isActive())
        flags = libvirt.VIR_DOMAIN_AFFECT_LIVE if active else 0
        if domxml.resources(inactive) != (vcpus, memory_mib):
            owner = domxml.owner_element(new_meta, new_text)
            self._conn.get().defineXML(domxml.with_definition(inactive, vcpus, memory_mib, owner))
        else:
            flags |= libvirt.VIR_DOMAIN_AFFECT_CONFIG
        if flags:
            dom.setMetadata(
                libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                domxml.owner_metadata_xml(new_meta, new_text),
                domxml.NS_PREFIX,
                domxml.NAMESPACE,
                flags,
            )
        key = str(dom.UUIDString())
        with self._meta_lock:
            cached = self._meta.get(key)
            # the cache keeps the form it had (a domain this process defined: the spec as given), changed in
            # the same four fields, so that ``get`` answers alike before and after an update
            self._meta[key] = (
                new_meta
                if cached is None
                else dataclasses.replace(cached, spec=common.with_fields(cached.spec, fields))
            )

    def _undo_definition(self, undo: Mapping[str, str], identity: Mapping[str, str]) -> str:
        """Put a domain's previous four values back, if it still has those the step gave it.

        Left alone: another domain of the name, values changed since, and a domain running on the new
        vCPUs/memory (it was restarted on the new definition, see ``Hypervisor.update``).
        """
        try:
            dom = self._conn.get().lookupByName(undo["name"])
        except libvirt.libvirtError as exc:
            if is_code(exc, "VIR_ERR_NO_DOMAIN"):
                return ""
            raise
        if str(dom.UUIDString()) != identity.get("uuid"):
            return ""
        try:
            meta = self._persistent_owner(dom, undo["vm"])[0]
        except NotFound:
            return ""
        new = json.loads(identity.get("fields", "{}"))
        if common.update_fields(meta.spec) != new:
            return ""
        old = json.loads(undo["fields"])
        resources = common.resources_of(new)
        if dom.isActive() and resources != common.resources_of(old):
            info = dom.info()  # state, max memory KiB, memory KiB, vCPUs, CPU time: of the running guest
            if (int(info[3]), int(info[1]) // 1024) == resources:
                return ""
        self._apply_fields(dom, undo["vm"], old)
        return f"{undo['name']} (definition back to its previous labels, health checks, vCPUs and memory)"

    def _delete_sync(self, vm: str) -> builtins.list[str]:
        if vm.startswith(NETWORK_ORPHAN_PREFIX):
            # an orphan the sweep found: a managed network no domain uses any more
            return self.network_manager.remove_orphan(self._conn.get(), vm.removeprefix(NETWORK_ORPHAN_PREFIX))
        domain = self.domain_name(vm)
        conn = self._conn.get()
        removed: builtins.list[str] = []
        dom: Any = None
        meta: domxml.OwnerMetadata | None = None
        try:
            dom, meta = self._owned_domain(vm)
        except NotFound:
            # no domain (or not ours): still clean leftovers carrying our naming and marks below
            try:
                conn.lookupByName(domain)
                raise NotFound(f"VM {vm} not found", reason="VM_NOT_FOUND", metadata={"vm": vm}) from None
            except libvirt.libvirtError as exc:
                if not is_code(exc, "VIR_ERR_NO_DOMAIN"):
                    raise self._error(exc, vm, "delete") from None
        try:
            if dom is not None:
                self._destroy_quietly(dom)
                self._step("delete:destroyed")
                managed = common.managed_network(meta.spec) if meta is not None else None
                # held through the undefine: a concurrent delete of another VM on it must see this one gone
                lock = self.network_manager.lock(managed.libvirt_network) if managed else contextlib.nullcontext()
                with lock:
                    # before undefine: a retry after a crash still finds the domain, and with it the network
                    if managed is not None:
                        removed += self._release_network(conn, dom, managed, vm)
                    self._step("delete:network")
                    self._undefine_quietly(dom)
                self._step("delete:undefined")
            removed += self._delete_volumes(conn, domain, vm)
            self._step("delete:volumes")
        except libvirt.libvirtError as exc:
            raise self._error(exc, vm, "delete") from None
        removed += self._delete_folder(domain, vm)
        if dom is None and not removed:
            raise NotFound(f"VM {vm} not found", reason="VM_NOT_FOUND", metadata={"vm": vm})
        return removed

    def _release_network(self, conn: Any, dom: Any, managed: NetworkSpec, vm: str) -> builtins.list[str]:
        """The VM's host entries on its managed network, and the network if no other domain uses it."""
        try:
            macs = netxml.interfaces_by_network(dom.XMLDesc(0)).get(managed.libvirt_network, ())
        except libvirt.libvirtError as exc:
            if not is_code(exc, "VIR_ERR_NO_DOMAIN"):
                raise
            macs = ()
        return self.network_manager.release(conn, managed, str(dom.name()), macs, vm)

    def _delete_volumes(self, conn: Any, domain: str, vm: str) -> builtins.list[str]:
        removed = []
        prefix = common.volume_prefix(domain)
        for vol in self._pool(conn).listAllVolumes(0):
            if not str(vol.name()).startswith(prefix) or common.is_agent_volume_file(str(vol.name())):
                continue
            path = str(vol.path())
            owner = common.owner_of(path) if Capability.HOST_FILES in self._caps else None
            if owner is not None and owner != vm:
                log.warning("volume %s is marked for %s, not %s: left alone", path, owner, vm)
                continue
            gone = self._delete_volume(vol)
            if gone is not None:
                removed.append(gone)
        return removed

    def _delete_folder(self, domain: str, vm: str) -> builtins.list[str]:
        if Capability.HOST_FILES not in self._caps:
            return []
        folder = common.vm_dir(self.storage_dir, domain)
        if not os.path.isdir(folder):
            return []
        if common.owner_of(folder) not in (vm, None):
            log.warning("folder %s is marked for another VM: left alone", folder)
            return []
        removed = [os.path.join(dp, f) for dp, _dn, fns in os.walk(folder) for f in fns]
        shutil.rmtree(folder)
        return [*removed, folder]

    def _remove_pool_sync(self) -> None:
        conn = self._conn.get()
        try:
            pool = conn.storagePoolLookupByName(self.pool_name)
        except libvirt.libvirtError as exc:
            if is_code(exc, "VIR_ERR_NO_STORAGE_POOL"):
                return
            raise
        if pool.isActive():
            pool.destroy()
        pool.undefine()

    # ---- snapshots -----------------------------------------------------------------------------

    def _snapshot_not_found(self, vm: str, snapshot: str) -> NotFound:
        return NotFound(
            f"VM {vm} has no snapshot {snapshot}",
            reason="SNAPSHOT_NOT_FOUND",
            metadata={"vm": vm, "snapshot": snapshot},
        )

    def _find_snapshot(self, dom: Any, vm: str, snapshot: str) -> tuple[Any, snapshots.SnapshotInfo]:
        """The libvirt snapshot and what its XML says; NotFound SNAPSHOT_NOT_FOUND when there is none."""
        try:
            snap = dom.snapshotLookupByName(snapshot, 0)
            return snap, snapshots.parse_snapshot(snap.getXMLDesc(0))
        except libvirt.libvirtError as exc:
            if is_code(exc, "VIR_ERR_NO_DOMAIN_SNAPSHOT"):
                raise self._snapshot_not_found(vm, snapshot) from None
            raise self._error(exc, vm, f"look up snapshot {snapshot} of") from None

    def _all_snapshots(self, dom: Any, vm: str) -> dict[str, tuple[Any, snapshots.SnapshotInfo]]:
        try:
            return {str(s.getName()): (s, snapshots.parse_snapshot(s.getXMLDesc(0))) for s in dom.listAllSnapshots(0)}
        except libvirt.libvirtError as exc:
            raise self._error(exc, vm, "list the snapshots of") from None

    def _current_snapshot(self, dom: Any) -> str:
        try:
            return str(dom.snapshotCurrent(0).getName())
        except libvirt.libvirtError as exc:
            if is_code(exc, "VIR_ERR_NO_DOMAIN_SNAPSHOT"):
                return ""
            raise

    def _domain_disks(self, dom: Any, *, live: bool) -> builtins.list[snapshots.DomainDisk]:
        return snapshots.domain_disks(dom.XMLDesc(0 if live else libvirt.VIR_DOMAIN_XML_INACTIVE))

    @staticmethod
    def _disk_names(meta: domxml.OwnerMetadata) -> dict[str, str]:
        """Spec disk name by target device: ``create`` gives the i-th disk the i-th virtio target."""
        return {domxml.virtio_target(i): d.name for i, d in enumerate(meta.spec.disks)}

    @staticmethod
    def _own_disk_names(meta: domxml.OwnerMetadata) -> dict[str, str]:
        """``_disk_names`` without the disks that attach agent volumes (not the VM's: no snapshot holds them)."""
        return {domxml.virtio_target(i): d.name for i, d in enumerate(meta.spec.disks) if not d.volume}

    def _snapshot_record(
        self, info: snapshots.SnapshotInfo, current: str, disks: Sequence[snapshots.DomainDisk]
    ) -> SnapshotRecord:
        return SnapshotRecord(
            name=info.name,
            kind=info.kind,
            create_time=info.create_time,
            vm_state=info.vm_state,
            has_memory=info.has_memory,
            parent=info.parent,
            current=info.name == current,
            size_bytes=self._snapshot_size(info, disks),
        )

    def _snapshot_size(self, info: snapshots.SnapshotInfo, disks: Sequence[snapshots.DomainDisk]) -> int:
        """Approximate bytes a snapshot holds: its saved memory (internal) or its frozen files (external)."""
        if Capability.HOST_FILES not in self._caps:
            return 0
        try:
            if info.kind == SnapshotKind.EXTERNAL:
                return sum(snapshots.allocated_bytes(path) for path in info.frozen.values())
            return sum(
                snapshots.internal_snapshot_sizes(d.source).get(info.name, 0) for d in snapshots.snapshot_disks(disks)
            )
        except CloneboxError:
            return 0  # a size is a hint: an unreadable image must not hide the snapshot

    def _create_snapshot_sync(
        self, vm: str, snapshot: str, kind: SnapshotKind, quiesce: bool, log: StepLog
    ) -> SnapshotRecord:
        check_dns_label("snapshot", snapshot)
        if quiesce and kind != SnapshotKind.EXTERNAL:
            # libvirt freezes guest filesystems only for disk-only snapshots
            raise invalid_field("quiesce", "only for disk-only (external) snapshots")
        dom, meta = self._owned_domain(vm)
        common.refuse_internal_with_volumes(meta.spec, snapshot, kind)
        try:
            live = bool(dom.isActive())
            xml = dom.XMLDesc(0 if live else libvirt.VIR_DOMAIN_XML_INACTIVE)
        except libvirt.libvirtError as exc:
            raise self._error(exc, vm, "snapshot") from None
        existing = self._all_snapshots(dom, vm)
        if snapshot in existing:
            raise AlreadyExists(
                f"VM {vm} already has a snapshot {snapshot}",
                reason="SNAPSHOT_ALREADY_EXISTS",
                metadata={"vm": vm, "snapshot": snapshot},
            )
        common.check_snapshot_kind(vm, snapshot, kind, (info.kind for _snap, info in existing.values()))
        disks = snapshots.domain_disks(xml)
        if kind == SnapshotKind.INTERNAL:
            if live and snapshots.has_filesystem_share(xml):
                # QEMU refuses to migrate (save) a guest with a 9p/virtiofs export mounted; checked here so
                # the answer does not depend on whether the guest mounted the share yet
                raise FailedPrecondition(
                    f"VM {vm} is running with shared folders: QEMU cannot save its memory; take a disk-only "
                    "snapshot instead (--disk-only --quiesce), or stop the VM first",
                    reason="SNAPSHOT_BLOCKED_BY_SHARED_FOLDER",
                    metadata={"vm": vm, "snapshot": snapshot},
                )
            sxml = snapshots.internal_snapshot_xml(snapshot, disks, memory=live)
            return self._take_snapshot(dom, vm, snapshot, sxml, 0, log, disks)
        if Capability.HOST_FILES not in self._caps:
            raise FailedPrecondition(
                f"external snapshots need the hypervisor's files on this host ({self.uri})",
                reason="HYPERVISOR_UNSUPPORTED",
                metadata={"vm": vm},
            )
        flags = (
            libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
            | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT
            | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
        )
        if quiesce:
            if not live:
                raise FailedPrecondition(
                    f"VM {vm} is not running: its filesystems cannot be quiesced",
                    reason="GUEST_AGENT_UNAVAILABLE",
                    metadata={"vm": vm},
                )
            # ask qemu-ga first: a silent agent fails here, before any overlay is made
            self._agent_command(dom, vm, "guest-ping", {}, timeout=5)
            flags |= libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_QUIESCE
        try:
            return self._external_snapshot(dom, meta, vm, snapshot, disks, flags, log)
        except BaseException:
            common.roll_back(log, self._undo_sync, vm)
            raise

    def _take_snapshot(
        self,
        dom: Any,
        vm: str,
        snapshot: str,
        sxml: str,
        flags: int,
        log: StepLog,
        disks: Sequence[snapshots.DomainDisk],
    ) -> SnapshotRecord:
        """``snapshotCreateXML`` as one step; rolled back when a later scripted step fails."""
        n = log.planned(f"snapshot:{snapshot}", {"kind": "snapshot", "vm": vm, "name": snapshot})
        try:
            snap = dom.snapshotCreateXML(sxml, flags)
            info = snapshots.parse_snapshot(snap.getXMLDesc(0))
            log.made(n, {"uuid": str(dom.UUIDString()), "created": info.created_epoch})
        except libvirt.libvirtError as exc:
            if flags & libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_QUIESCE and (
                is_code(exc, "VIR_ERR_AGENT_UNRESPONSIVE") or "agent" in message_of(exc).lower()
            ):
                raise FailedPrecondition(
                    f"VM {vm}: the guest agent could not freeze the filesystems: {message_of(exc)}",
                    reason="GUEST_AGENT_UNAVAILABLE",
                    metadata={"vm": vm},
                ) from None
            if is_code(exc, "VIR_ERR_OPERATION_FAILED") and "already exists" in message_of(exc):
                raise AlreadyExists(
                    f"VM {vm} already has a snapshot {snapshot}",
                    reason="SNAPSHOT_ALREADY_EXISTS",
                    metadata={"vm": vm, "snapshot": snapshot},
                ) from None
            raise self._error(exc, vm, f"take snapshot {snapshot} of") from None
        try:
            self._step("snapshot:taken")
        except BaseException:
            common.roll_back(log, self._undo_sync, vm)
            raise
        return self._snapshot_record(info, snapshot, disks)

    def _list_snapshots_sync(self, vm: str) -> builtins.list[SnapshotRecord]:
        dom, _meta = self._owned_domain(vm)
        found = self._all_snapshots(dom, vm)
        try:
            current = self._current_snapshot(dom)
            disks = self._domain_disks(dom, live=False)
        except libvirt.libvirtError as exc:
            raise self._error(exc, vm, "list the snapshots of") from None
        infos = snapshots.order_oldest_first([info for _snap, info in found.values()])
        return [self._snapshot_record(info, current, disks) for info in infos]

    def _revert_snapshot_sync(self, vm: str, snapshot: str, start: bool, log: StepLog) -> None:
        dom, meta = self._owned_domain(vm)
        snap, info = self._find_snapshot(dom, vm, snapshot)
        if info.kind == SnapshotKind.EXTERNAL:
            self._revert_external(dom, meta, vm, snap, info, start, log)
            return
        # RUNNING boots a disk-only snapshot or resumes a memory one; a memory snapshot reverted for a
        # stopped VM is loaded paused (the guest never runs a cycle on the restored disks) and then ended
        if start:
            flags = libvirt.VIR_DOMAIN_SNAPSHOT_REVERT_RUNNING
        elif info.has_memory:
            flags = libvirt.VIR_DOMAIN_SNAPSHOT_REVERT_PAUSED
        else:
            flags = 0
        try:
            try:
                dom.revertToSnapshot(snap, flags)
            except libvirt.libvirtError as exc:
                if not is_code(exc, "VIR_ERR_SNAPSHOT_REVERT_RISKY"):
                    raise
                # e.g. a running VM back to a snapshot whose config differs: the caller asked for it
                dom.revertToSnapshot(snap, flags | libvirt.VIR_DOMAIN_SNAPSHOT_REVERT_FORCE)
            if not start:
                self._destroy_quietly(dom)
            elif not dom.isActive():
                # libvirt's test driver ends a domain reverted to a shut-off snapshot despite RUNNING
                try:
                    dom.create()
                except libvirt.libvirtError as exc:
                    raise start_failed(exc, uri=self.uri, vm=vm) from None
            elif dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
                dom.resume()
        except libvirt.libvirtError as exc:
            raise self._error(exc, vm, f"revert to snapshot {snapshot}:") from None
        # one libvirt call, nothing to undo or to remove: the commit point says it was done
        n = log.planned("retire", {"kind": "retire", "vm": vm, "paths": "[]"})
        log.made(n, {"uuid": str(dom.UUIDString())})
        if start:
            self._mark_console_log(self.domain_name(vm), vm)

    def _delete_snapshot_sync(self, vm: str, snapshot: str, children: bool) -> builtins.list[str]:
        dom, meta = self._owned_domain(vm)
        snap, info = self._find_snapshot(dom, vm, snapshot)
        doomed = [snapshot]
        if children:
            try:
                below = [
                    snapshots.parse_snapshot(c.getXMLDesc(0))
                    for c in snap.listAllChildren(libvirt.VIR_DOMAIN_SNAPSHOT_LIST_DESCENDANTS)
                ]
            except libvirt.libvirtError as exc:
                raise self._error(exc, vm, f"list the children of snapshot {snapshot} of") from None
            doomed += [i.name for i in snapshots.order_oldest_first(below)]
        if info.kind == SnapshotKind.EXTERNAL:
            # leaves first: each merge sees the chain as the snapshots above it left it
            for name in reversed(doomed):
                victim, victim_info = self._find_snapshot(dom, vm, name)
                self._delete_external(dom, meta, vm, victim, victim_info)
            return doomed
        try:
            snap.delete(libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_CHILDREN if children else 0)
        except libvirt.libvirtError as exc:
            if is_code(exc, "VIR_ERR_NO_DOMAIN_SNAPSHOT"):
                raise self._snapshot_not_found(vm, snapshot) from None
            raise self._error(exc, vm, f"delete snapshot {snapshot} of") from None
        return doomed

    def _export_disks_sync(self, vm: str, snapshot: str, workdir: str) -> builtins.list[DiskImage]:
        dom, meta = self._owned_domain(vm)
        _snap, info = self._find_snapshot(dom, vm, snapshot)
        if Capability.HOST_FILES not in self._caps:
            raise FailedPrecondition(
                f"exporting disks needs the hypervisor's files on this host ({self.uri})",
                reason="HYPERVISOR_UNSUPPORTED",
                metadata={"vm": vm},
            )
        try:
            live = bool(dom.isActive())
            disks = {d.target: d for d in snapshots.snapshot_disks(self._domain_disks(dom, live=live))}
        except libvirt.libvirtError as exc:
            raise self._error(exc, vm, "export") from None
        out: builtins.list[DiskImage] = []
        try:
            for target, disk_name in self._own_disk_names(meta).items():
                disk = disks.get(target)
                if disk is None:
                    continue
                dest = os.path.join(workdir, f"{disk_name}.qcow2")
                if info.kind == SnapshotKind.EXTERNAL:
                    # the frozen file holds the disk as it was; converting it flattens its backing chain
                    source = info.frozen.get(target)
                    if source is None:
                        continue
                    snapshots.convert_flat(source, dest)
                else:
                    snapshots.convert_flat(disk.source, dest, snapshot=snapshot)
                written = snapshots.image_json(dest, force_share=False)
                out.append(DiskImage(disk_name, dest, int(written["virtual-size"]), os.stat(dest).st_size))
            self._step("export:disks")
        except BaseException:
            for image in out:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(image.path)
            raise
        return out

    # ---- import --------------------------------------------------------------------------------

    def _import_disks_sync(self, spec: VmSpec, images: dict[str, str], log: StepLog) -> DomainRecord:
        if Capability.HOST_FILES not in self._caps:
            raise FailedPrecondition(
                f"importing disks needs the hypervisor's files on this host ({self.uri})",
                reason="HYPERVISOR_UNSUPPORTED",
                metadata={"vm": spec.name},
            )
        # a taken name is refused before the files are looked at (and again once the name is claimed)
        conn = self._refuse_existing(spec.name)
        common.check_import_images(spec, images)
        # the volumes the spec attaches must be there and free before any file moves (checked again at the define)
        self._attached_volumes(conn, spec)
        sizes: dict[str, int] = {}
        for disk_name, path in images.items():
            # the caller checked the files; checked again because QEMU would follow a backing file anywhere
            found = snapshots.image_json(path, force_share=False)
            if found.get("format") != "qcow2" or found.get("backing-filename") or found.get("data-file"):
                raise invalid_field(
                    f"images.{disk_name}", "must be a standalone qcow2 (no backing or external data file)"
                )
            sizes[disk_name] = int(found["virtual-size"])
        # the disks are the given files, so a base image of the spec need not exist on this host; the
        # kernel, initrd and shared folders are still resolved and checked like a create's
        local = dataclasses.replace(
            spec,
            disks=tuple(
                d if d.volume else dataclasses.replace(d, base_image="", size_mib=max(1, -(-sizes[d.name] // MiB)))
                for d in spec.disks
            ),
        )
        resolved = dataclasses.replace(resolve_spec(local, self.image_dirs, self.shared_roots), spec=spec)
        with self._creating_lock:
            if spec.name in self._creating:
                raise AlreadyExists(
                    f"VM {spec.name} already exists (being created)",
                    reason="VM_ALREADY_EXISTS",
                    metadata={"vm": spec.name},
                )
            self._creating.add(spec.name)
        try:
            domain = self.domain_name(spec.name)
            conn = self._refuse_existing(spec.name)
            self._owned.add(domain)
            try:
                return self._import_steps(conn, resolved, domain, images, log)
            except BaseException as exc:
                common.roll_back(log, self._undo_sync, spec.name)
                if isinstance(exc, libvirt.libvirtError):
                    raise self._error(exc, spec.name, "import") from None
                raise
        finally:
            with self._creating_lock:
                self._creating.discard(spec.name)

    def _refuse_existing(self, vm: str) -> Any:
        """AlreadyExists VM_ALREADY_EXISTS when a domain of that name exists; the connection otherwise."""
        conn = self._conn.get()
        try:
            conn.lookupByName(self.domain_name(vm))
        except libvirt.libvirtError as exc:
            if not is_code(exc, "VIR_ERR_NO_DOMAIN"):
                raise self._error(exc, vm, "look up") from None
            return conn
        raise AlreadyExists(f"VM {vm} already exists", reason="VM_ALREADY_EXISTS", metadata={"vm": vm})

    def _import_steps(
        self, conn: Any, resolved: ResolvedSpec, domain: str, images: Mapping[str, str], log: StepLog
    ) -> DomainRecord:
        spec = resolved.spec
        vm = spec.name
        folder = common.vm_dir(self.storage_dir, domain)
        n = log.planned("folder", {"kind": "folder", "path": folder})
        try:
            os.makedirs(folder, mode=0o755)
        except FileExistsError:
            raise AlreadyExists(
                f"VM {vm} already exists (its folder {folder} does)", reason="VM_ALREADY_EXISTS", metadata={"vm": vm}
            ) from None
        log.made(n, common.stamp_identity(folder))
        self._mark(folder, vm)
        pool = self._pool(conn)
        disks: builtins.list[domxml.Disk] = []
        for i, disk in enumerate(spec.disks):
            if disk.volume:
                # attached, never made (nor undone): filled in at the define, as a create does
                disks.append(domxml.Disk("", domxml.virtio_target(i)))
                continue
            name = common.volume_name(domain, disk.name)
            n = log.planned(f"disk:{disk.name}", {"kind": "volume", "name": name})
            path = os.path.join(common.pool_dir(self.storage_dir), name)
            _adopt_file(images[disk.name], path)
            identity = common.stamp_identity(path)
            try:
                pool.refresh(0)
                vol = pool.storageVolLookupByName(name)
            except libvirt.libvirtError:
                # the file is ours: undo must still find it, by its file identity
                log.made(n, {"key": path, **identity})
                raise
            log.made(n, {"key": str(vol.key()), **identity})
            self._mark(path, vm)
            disks.append(domxml.Disk(path, domxml.virtio_target(i)))
        self._step("import:disks")
        vm_uuid = str(uuidlib.uuid4())
        with self._volume_lock:
            volumes = self._attached_volumes(conn, spec)
            disks = [volumes.get(i, d) for i, d in enumerate(disks)]
            cfg = self._domain_config(
                resolved, domain, vm_uuid, disks, common.console_log_path(self.storage_dir, domain)
            )
            dom = self._define(conn, cfg, vm, log)
        self._step("import:define")
        state, reason = dom.state()
        return self._record(dom, cfg.owner, state, reason)

    # ---- external snapshots --------------------------------------------------------------------

    def _new_overlay(self, pool: Any, domain: str, vm: str, disk: str, tag: str, backing: str, log: StepLog) -> str:
        """A qcow2 overlay volume on ``backing`` (one step ``overlay:DISK``); its path."""
        name = f"{common.volume_prefix(domain)}{disk}.{tag}-{uuidlib.uuid4().hex[:6]}.qcow2"
        capacity = int(snapshots.image_json(backing)["virtual-size"])
        n = log.planned(f"overlay:{disk}", {"kind": "volume", "name": name})
        xml = self._volume_xml(name, capacity, "qcow2", (backing, "qcow2"))
        vol = self._create_volume(pool, name, xml, vm, f"create an overlay of disk {disk} of")
        path = str(vol.path())
        log.made(n, self._volume_identity(vol, path, stamp=True))
        self._mark(path, vm)
        return path

    def _external_snapshot(
        self,
        dom: Any,
        meta: domxml.OwnerMetadata,
        vm: str,
        snapshot: str,
        disks: Sequence[snapshots.DomainDisk],
        flags: int,
        log: StepLog,
    ) -> SnapshotRecord:
        """Overlays made by us (marked, stepped), then libvirt switches the disks onto them (REUSE_EXT)."""
        domain = self.domain_name(vm)
        names = self._own_disk_names(meta)
        pool = self._pool(self._conn.get())
        overlays: dict[str, str] = {}
        frozen: dict[str, str] = {}
        for disk in snapshots.snapshot_disks(disks):
            if disk.target not in names:
                continue  # an agent volume: left out (snapshot='no'), it keeps writing to its own file
            overlays[disk.target] = self._new_overlay(pool, domain, vm, names[disk.target], snapshot, disk.source, log)
            frozen[disk.target] = disk.source
        sxml = snapshots.external_snapshot_xml(snapshot, disks, overlays, frozen)
        return self._take_snapshot(dom, vm, snapshot, sxml, flags, log, disks)

    def _frozen_elsewhere(self, dom: Any, vm: str, skip: str) -> set[str]:
        """Files frozen by snapshots other than ``skip``: they hold those snapshots and are never dropped."""
        return {
            path
            for name, (_snap, info) in self._all_snapshots(dom, vm).items()
            if name != skip
            for path in info.frozen.values()
        }

    def _drop_overlay(self, path: str, vm: str) -> str | None:
        """Delete a file the adapter made for ``vm`` in its pool; anything else is left alone."""
        pool_path = common.pool_dir(self.storage_dir)
        if os.path.dirname(os.path.abspath(path)) != pool_path or common.owner_of(path) != vm:
            log.warning("%s is not an overlay of %s in the pool: left alone", path, vm)
            return None
        try:
            vol = self._pool(self._conn.get()).storageVolLookupByName(os.path.basename(path))
        except libvirt.libvirtError as exc:
            if is_code(exc, "VIR_ERR_NO_STORAGE_VOL"):
                return None
            raise
        return self._delete_volume(vol)

    def _redefine_sources(self, dom: Any, sources: Mapping[str, str]) -> None:
        """Point disks (by target) of the persistent definition at other files."""
        xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        self._conn.get().defineXML(snapshots.with_disk_sources(xml, sources))

    def _revert_external(
        self,
        dom: Any,
        meta: domxml.OwnerMetadata,
        vm: str,
        snap: Any,
        info: snapshots.SnapshotInfo,
        start: bool,
        journal: StepLog,
    ) -> None:
        """Libvirt 9.0 cannot revert an external snapshot: stop, new overlays on the frozen files, swap, start.

        Steps: ``stop`` (undo: start again), ``overlay:DISK`` (undo: delete), ``swap`` (undo: the old files
        and the old current snapshot back), then ``retire``, the commit point: from there the revert is
        done, and the superseded overlays are removed (by recovery too, which rolls a transaction with a
        ``retire`` step forward). Before it a rollback puts everything back, except the guest's memory.
        """
        domain = self.domain_name(vm)
        names = self._disk_names(meta)
        try:
            if dom.isActive():
                n = journal.planned("stop", {"kind": "stopped", "name": domain})
                self._destroy_quietly(dom)
                journal.made(n, {"uuid": str(dom.UUIDString())})
            self._step("revert:stopped")
            old = {d.target: d.source for d in self._domain_disks(dom, live=False) if d.target in info.frozen}
            pool = self._pool(self._conn.get())
            new: dict[str, str] = {}
            for target, frozen in sorted(info.frozen.items()):
                new[target] = self._new_overlay(pool, domain, vm, names.get(target, target), info.name, frozen, journal)
            undo = {
                "kind": "disk-sources",
                "vm": vm,
                "name": domain,
                "sources": json.dumps(old, sort_keys=True),
                "current": self._current_snapshot(dom),
            }
            n = journal.planned("swap", undo)
            self._redefine_sources(dom, new)
            # libvirt's notion of the current snapshot moves too: a new snapshot's parent is this one
            self._make_current(dom, snap)
            journal.made(n, {"uuid": str(dom.UUIDString()), "sources": json.dumps(new, sort_keys=True)})
            self._step("revert:swapped")
            if start:
                try:
                    dom.create()
                except libvirt.libvirtError as exc:
                    raise start_failed(exc, uri=self.uri, vm=vm) from None
                self._mark_console_log(domain, vm)
            keep = self._frozen_elsewhere(dom, vm, "") | set(new.values())
            superseded = sorted(p for p in old.values() if p not in keep)
            n = journal.planned("retire", {"kind": "retire", "vm": vm, "paths": json.dumps(superseded)})
            journal.made(n, {"uuid": str(dom.UUIDString())})
        except BaseException as exc:
            common.roll_back(journal, self._undo_sync, vm)
            if isinstance(exc, libvirt.libvirtError):
                raise self._error(exc, vm, f"revert to snapshot {info.name}:") from None
            raise
        self._step("revert:retire")
        self._retire(vm, superseded)

    @staticmethod
    def _make_current(dom: Any, snap: Any) -> None:
        dom.snapshotCreateXML(
            snap.getXMLDesc(0),
            libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_CURRENT,
        )

    def _retire(self, vm: str, paths: Sequence[str]) -> str:
        """Remove the overlays a revert superseded, except any that the domain or a snapshot uses again."""
        if not paths:
            return ""
        try:
            dom, _meta = self._owned_domain(vm)
        except NotFound:
            return ""
        used = self._frozen_elsewhere(dom, vm, "") | {d.source for d in self._domain_disks(dom, live=False)}
        removed = []
        for path in paths:
            if path in used:
                continue
            try:
                if self._drop_overlay(path, vm):
                    removed.append(path)
            except libvirt.libvirtError:
                # the revert is done; a leftover overlay is removed with the VM
                log.warning("could not remove the old overlay %s of %s", path, vm, exc_info=True)
        return ", ".join(removed)

    def _delete_external(
        self, dom: Any, meta: domxml.OwnerMetadata, vm: str, snap: Any, info: snapshots.SnapshotInfo
    ) -> None:
        """Merge one external snapshot's frozen files away, then drop its libvirt metadata.

        For each disk, the frozen file ``I`` either has only the active file above it (merged down into
        ``I``: ``qemu-img commit`` stopped, an active ``blockCommit`` + pivot running), nothing above it
        (deleted), or other snapshots' files above it (their chains get ``I``'s data with a safe
        ``qemu-img rebase``, then ``I`` goes; only while the VM is stopped, since a running QEMU holds
        them). A file in the image dirs (a shared base) is never written: frozen files are always ours.
        """
        try:
            live = bool(dom.isActive())
            active = {d.target: d.source for d in self._domain_disks(dom, live=live)}
        except libvirt.libvirtError as exc:
            raise self._error(exc, vm, f"delete snapshot {info.name} of") from None
        others = self._all_snapshots(dom, vm)
        others.pop(info.name, None)
        for target, image in sorted(info.frozen.items()):
            if self._in_image_dirs(image):
                raise Internal(f"snapshot {info.name} of {vm} names a shared image {image}: left alone")
            candidates = {active.get(target, "")} | {
                o.frozen[target] for _s, o in others.values() if target in o.frozen
            }
            children = sorted(c for c in candidates if c and c != image and snapshots.backing_of(c) == image)
            current = active.get(target, "")
            try:
                if children == [current]:
                    self._commit_active(dom, vm, target, current, image, live)
                    self._drop_overlay(current, vm)
                elif not children:
                    if image != current:
                        self._drop_overlay(image, vm)
                else:
                    if live:
                        raise FailedPrecondition(
                            f"snapshot {info.name} of VM {vm} holds data later snapshots need: stop the VM to "
                            "delete it, or delete the later snapshots first",
                            reason="SNAPSHOT_IN_USE",
                            metadata={"vm": vm, "snapshot": info.name},
                        )
                    below = snapshots.backing_of(image)
                    for child in children:
                        fmt = snapshots.image_json(below)["format"] if below else "qcow2"
                        snapshots.qemu_img("rebase", "-q", "-f", "qcow2", "-F", str(fmt), "-b", below, child)
                    self._drop_overlay(image, vm)
            except libvirt.libvirtError as exc:
                raise self._error(exc, vm, f"merge snapshot {info.name} of") from None
        try:
            snap.delete(libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY)
        except libvirt.libvirtError as exc:
            raise self._error(exc, vm, f"delete snapshot {info.name} of") from None

    def _commit_active(self, dom: Any, vm: str, target: str, top: str, base: str, live: bool) -> None:
        """Merge the active file ``top`` into its backing ``base`` and make ``base`` the disk's file."""
        if not live:
            snapshots.qemu_img("commit", "-q", "-f", "qcow2", top)
            self._redefine_sources(dom, {target: base})
            return
        # always with an explicit base: a commit without one would write the deepest (shared) image
        dom.blockCommit(target, base, top, 0, libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE)
        deadline = time.monotonic() + 3600
        while True:
            try:
                dom.blockJobAbort(target, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
                break
            except libvirt.libvirtError as exc:
                # the job is not ready (not yet mirrored) until its first pass is done
                if time.monotonic() > deadline or (
                    not is_code(exc, "VIR_ERR_BLOCK_COPY_ACTIVE") and not (is_code(exc, "VIR_ERR_OPERATION_INVALID"))
                ):
                    raise
                time.sleep(0.1)
        while dom.blockJobInfo(target, 0):
            time.sleep(0.05)
        # libvirt updates the live chain; the persistent definition must name the merged file too
        self._redefine_sources(dom, {target: base})

    def _in_image_dirs(self, path: str) -> bool:
        real = os.path.realpath(path)
        return any(os.path.commonpath([real, os.path.realpath(d)]) == os.path.realpath(d) for d in self.image_dirs)

    def _undo_snapshot(self, undo: Mapping[str, str], identity: Mapping[str, str]) -> str:
        """Delete the snapshot a step took, if it is still that one (same domain, same creation time)."""
        vm = undo["vm"]
        try:
            dom = self._conn.get().lookupByName(self.domain_name(vm))
        except libvirt.libvirtError as exc:
            if is_code(exc, "VIR_ERR_NO_DOMAIN"):
                return ""
            raise
        if str(dom.UUIDString()) != identity.get("uuid"):
            return ""
        meta = self._owner_meta(dom)
        if meta is None:
            return ""
        try:
            snap, info = self._find_snapshot(dom, vm, undo["name"])
        except NotFound:
            return ""
        if info.created_epoch != identity.get("created"):
            return ""
        if info.kind == SnapshotKind.EXTERNAL:
            self._delete_external(dom, meta, vm, snap, info)
        else:
            snap.delete(0)
        return f"snapshot {vm}/{undo['name']}"

    def _undo_sources(self, undo: Mapping[str, str], identity: Mapping[str, str]) -> str:
        """Point the disks back at the files they had, if they still have the ones the step gave them."""
        try:
            dom = self._conn.get().lookupByName(undo["name"])
        except libvirt.libvirtError as exc:
            if is_code(exc, "VIR_ERR_NO_DOMAIN"):
                return ""
            raise
        if str(dom.UUIDString()) != identity.get("uuid"):
            return ""
        new = json.loads(identity.get("sources", "{}"))
        now = {d.target: d.source for d in self._domain_disks(dom, live=False)}
        if any(now.get(t) != p for t, p in new.items()):
            return ""
        self._destroy_quietly(dom)
        self._redefine_sources(dom, json.loads(undo["sources"]))
        if undo.get("current"):
            try:
                self._make_current(dom, dom.snapshotLookupByName(undo["current"], 0))
            except libvirt.libvirtError:
                log.warning("could not make %s current again for %s", undo["current"], undo["name"], exc_info=True)
        return f"{undo['name']} (disks back on their files)"

    def _undo_stop(self, undo: Mapping[str, str], identity: Mapping[str, str]) -> str:
        """Start a domain a step stopped, if it is still that domain and still stopped."""
        try:
            dom = self._conn.get().lookupByName(undo["name"])
        except libvirt.libvirtError as exc:
            if is_code(exc, "VIR_ERR_NO_DOMAIN"):
                return ""
            raise
        if str(dom.UUIDString()) != identity.get("uuid") or dom.isActive():
            return ""
        dom.create()
        return f"{undo['name']} (started again)"

    # ---- guest agent ---------------------------------------------------------------------------

    def _agent_command(self, dom: Any, vm: str, command: str, arguments: Mapping[str, Any], timeout: int = 10) -> Any:
        """One qemu-ga command; its ``return`` value. Errors name the VM, never the arguments (stdin)."""
        raw = getattr(dom, "unwrapped", dom)
        text = json.dumps({"execute": command, "arguments": dict(arguments)})
        try:
            answer = traced_call(
                "virDomain", raw, "qemuAgentCommand", libvirt_qemu.qemuAgentCommand, raw, text, timeout, 0
            )
        except libvirt.libvirtError as exc:
            if is_connection_error(exc):
                raise self._error(exc, vm, command) from None
            message = message_of(exc)
            if command == "guest-file-open" and ("No such file" in message or "error code 2" in message):
                raise _GuestFileMissing from None
            raise FailedPrecondition(
                f"VM {vm}: the guest agent did not answer {command}: {message}",
                reason="GUEST_AGENT_UNAVAILABLE",
                metadata={"vm": vm},
            ) from None
        return json.loads(answer).get("return")

    def _running_domain(self, vm: str) -> Any:
        dom, _meta = self._owned_domain(vm)
        try:
            active = dom.isActive()
        except libvirt.libvirtError as exc:
            raise self._error(exc, vm, "look up") from None
        if not active:
            raise FailedPrecondition(
                f"VM {vm} is not running: its guest agent cannot be reached", reason="GUEST_AGENT_UNAVAILABLE"
            )
        return dom

    def _guest_exec_sync(self, vm: str, argv: tuple[str, ...], stdin: bytes, timeout: float) -> GuestExecResult:
        if not argv:
            raise ValueError("guest_exec needs a program")
        dom = self._running_domain(vm)
        arguments: dict[str, Any] = {"path": argv[0], "arg": list(argv[1:]), "capture-output": True}
        if stdin:
            arguments["input-data"] = base64.b64encode(stdin).decode()
        try:
            pid = self._agent_command(dom, vm, "guest-exec", arguments)["pid"]
        except FailedPrecondition as exc:
            if "Failed to execute child process" not in exc.message:
                raise
            # qemu-ga answered: the program is not there. A shell would say exit 127, so do we
            return GuestExecResult(127, b"", f"{argv[0]}: not found in the guest".encode())
        deadline = time.monotonic() + timeout
        delay = 0.02
        while True:
            status = self._agent_command(dom, vm, "guest-exec-status", {"pid": pid})
            if status.get("exited"):
                return GuestExecResult(
                    int(status.get("exitcode", -int(status.get("signal", 0)) or 0)),
                    base64.b64decode(status.get("out-data", "")),
                    base64.b64decode(status.get("err-data", "")),
                )
            if time.monotonic() >= deadline:
                raise DeadlineExceeded(
                    f"VM {vm}: {argv[0]} did not finish within {timeout:g} s",
                    reason="GUEST_EXEC_TIMEOUT",
                    metadata={"vm": vm},
                )
            # polling qemu-ga is how guest-exec reports an end; back off to a tenth of a second
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    def _guest_file_exists_sync(self, vm: str, path: str) -> bool:
        dom = self._running_domain(vm)
        try:
            handle = self._agent_command(dom, vm, "guest-file-open", {"path": path, "mode": "r"})
        except _GuestFileMissing:
            return False
        self._agent_command(dom, vm, "guest-file-close", {"handle": handle})
        return True

    def _guest_ping_sync(self, vm: str) -> None:
        dom = self._running_domain(vm)
        self._agent_command(dom, vm, "guest-ping", {})

    def _guest_file_read_sync(self, vm: str, path: str, max_bytes: int) -> bytes | None:
        dom = self._running_domain(vm)
        try:
            handle = self._agent_command(dom, vm, "guest-file-open", {"path": path, "mode": "r"})
        except _GuestFileMissing:
            return None
        try:
            data = self._guest_read_handle(dom, vm, handle, max_bytes)
        except BaseException:
            # qemu-ga keeps at most a few open handles: close this one, but report the read's failure
            # rather than the close's (a dead agent fails both)
            with contextlib.suppress(CloneboxError):
                self._agent_command(dom, vm, "guest-file-close", {"handle": handle})
            raise
        self._agent_command(dom, vm, "guest-file-close", {"handle": handle})
        return data

    def _guest_read_handle(self, dom: Any, vm: str, handle: int, max_bytes: int) -> bytes:
        chunks: builtins.list[bytes] = []
        left = max_bytes
        while left > 0:
            answer = self._agent_command(
                dom, vm, "guest-file-read", {"handle": handle, "count": min(left, _GUEST_READ_CHUNK)}
            )
            data = base64.b64decode(answer.get("buf-b64", ""))
            chunks.append(data[:left])
            left -= len(data)
            if answer.get("eof") or not data:
                break
        return b"".join(chunks)

    def _guest_filesystems_sync(self, vm: str) -> tuple[GuestFilesystem, ...]:
        dom = self._running_domain(vm)
        return health.filesystems_from_fsinfo(self._agent_command(dom, vm, "guest-get-fsinfo", {}))

    def _detach_seed_sync(self, vm: str) -> builtins.list[str]:
        domain = self.domain_name(vm)
        dom, _meta = self._owned_domain(vm)
        conn = self._conn.get()
        try:
            vol = self._pool(conn).storageVolLookupByName(common.seed_volume_name(domain))
            seed = str(vol.path())
        except libvirt.libvirtError as exc:
            if is_code(exc, "VIR_ERR_NO_STORAGE_VOL"):
                return []
            raise self._error(exc, vm, "look up the seed of") from None
        try:
            if dom.isActive() and seed in domxml.disk_sources(dom.XMLDesc(0)):
                # IDE cdroms cannot be unplugged from a running guest: eject the medium instead
                dom.updateDeviceFlags(domxml.cdrom_xml(None, _SEED_TARGET), libvirt.VIR_DOMAIN_AFFECT_LIVE)
            if seed in domxml.disk_sources(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)):
                dom.detachDeviceFlags(domxml.cdrom_xml(seed, _SEED_TARGET), libvirt.VIR_DOMAIN_AFFECT_CONFIG)
        except libvirt.libvirtError as exc:
            raise self._error(exc, vm, "detach the seed of") from None
        gone = self._delete_volume(vol)
        return [gone] if gone is not None else []

    def _addresses_sync(self, vm: str) -> tuple[IpAddress, ...]:
        dom, _meta = self._owned_domain(vm)
        if not _active(dom):
            return ()
        return self._domain_addresses(dom, vm)

    def _domain_addresses(self, dom: Any, vm: str) -> tuple[IpAddress, ...]:
        """Addresses of a running domain: qemu-ga's when it answers, else the DHCP leases."""
        sources: builtins.list[tuple[int, str]] = []
        if Capability.GUEST_AGENT in self._caps:
            sources.append((libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT, "agent"))
        sources.append((libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE, "lease"))
        for src, label in sources:
            try:
                ifaces = dom.interfaceAddresses(src, 0)
            except libvirt.libvirtError as exc:
                if is_connection_error(exc):
                    raise self._error(exc, vm, "addresses of") from None
                continue  # qemu-ga not running, or no lease source: try the next
            found = _addresses(ifaces or {}, label)
            if found:
                return found
        return ()

    # ---- health probes -------------------------------------------------------------------------

    def _domain_stats_sync(self) -> dict[str, DomainStats]:
        conn = self._conn.get()
        try:
            records = conn.getAllDomainStats(_STATS_GROUPS, libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE)
        except libvirt.libvirtError as exc:
            if not is_unsupported(exc):
                raise  # mapped by _run (a lost connection becomes HYPERVISOR_UNAVAILABLE)
            self._no_statistics(message_of(exc))
            return {}
        sampled_at = time.monotonic()
        out: dict[str, DomainStats] = {}
        for dom, stats in records:
            if not str(dom.name()).startswith(self.name_prefix):
                continue
            meta = self._owner_meta(dom)
            if meta is None:
                continue
            # ACTIVE also covers paused domains, whose counters stand still: not "running"
            state, _word = vm_state(int(stats.get("state.state", 0)), int(stats.get("state.reason", 0)))
            if state != VmState.RUNNING:
                continue
            if not health.has_statistics(stats):
                self._no_statistics("it reports no CPU or vCPU figures")
                continue
            out[meta.vm] = health.domain_stats_from(meta.vm, stats, sampled_at, meta.spec.vcpus)
        return out

    def _no_statistics(self, why: str) -> None:
        if not self._no_stats_logged:
            self._no_stats_logged = True
            log.debug("libvirt at %s has no domain statistics (%s): resource probes get no data", self.uri, why)

    def _probe_targets_sync(self, vm: str) -> tuple[ProbeTarget, ...]:
        dom, _meta = self._owned_domain(vm)
        if Capability.HOST_FILES not in self._caps or not _active(dom):
            return ()
        try:
            networks = health.attached_networks(dom.XMLDesc(0))
        except libvirt.libvirtError as exc:
            if is_code(exc, "VIR_ERR_NO_DOMAIN"):
                return ()  # removed meanwhile
            raise self._error(exc, vm, "read the interfaces of") from None
        if not networks:
            return ()
        addresses = self._domain_addresses(dom, vm)
        if not addresses:
            return ()
        conn = self._conn.get()
        active_xmls: builtins.list[str] = []
        for network in networks:
            try:
                net = conn.networkLookupByName(network)
                if net.isActive():
                    active_xmls.append(str(net.XMLDesc(0)))
            except libvirt.libvirtError as exc:
                if is_code(exc, "VIR_ERR_NO_NETWORK"):
                    continue  # undefined since the VM started: nothing of it can be reached
                raise self._error(exc, vm, f"look up network {network} of") from None
        return health.probe_targets((a.address for a in addresses), active_xmls, self.sysfs_root)

    # ---- events --------------------------------------------------------------------------------

    def _on_lifecycle(self, _conn: Any, dom: Any, event: int, detail: int, generation: object) -> None:
        # libvirt's event thread: no libvirt calls here, just hand over to the asyncio loop
        if generation != self._conn.generation:
            return  # registered on a connection we have since replaced
        name = str(dom.name())
        loop, queue = self._loop, self._raw_events
        if loop is None or queue is None or not name.startswith(self.name_prefix):
            return
        # loop closed
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(queue.put_nowait, (name, event, detail))

    async def _pump_events(self) -> None:
        # one consumer keeps libvirt's order even when an ownership lookup has to wait
        assert self._raw_events is not None
        while True:
            domain, event, detail = await self._raw_events.get()
            mapped = lifecycle(event, detail)
            if mapped is None:
                continue
            kind, state, word = mapped
            if domain not in self._owned and kind != EventKind.UNDEFINED:
                try:
                    await self._run(self._get_sync, self._vm_name(domain))
                except CloneboxError:
                    continue
            if domain not in self._owned:
                continue
            sink = self._sink
            if sink is not None:
                try:
                    sink(HypervisorEvent(self._vm_name(domain), kind, state, word))
                except Exception:
                    log.exception("event sink failed")


def _active(dom: Any) -> bool:
    try:
        return bool(dom.isActive())
    except libvirt.libvirtError:
        return False


def _addresses(ifaces: Mapping[str, Any], source: str) -> tuple[IpAddress, ...]:
    out: list[IpAddress] = []
    for iface, data in sorted(ifaces.items()):
        if iface == "lo":
            continue
        for addr in (data or {}).get("addrs") or ():
            text = str(addr.get("addr", ""))
            try:
                ip = ipaddress.ip_address(text)
            except ValueError:
                continue
            if ip.is_loopback:
                continue
            out.append(IpAddress(iface, text, int(addr.get("prefix", 0)), source))
    return tuple(out)


def _adopt_file(source: str, dest: str) -> None:
    """Move ``source`` to ``dest`` (never over an existing file), root-only like the pool's volumes.

    A hard link then unlink is a move that cannot replace ``dest``; across file systems the copy goes to
    a temporary name in the destination folder first, so ``dest`` never exists half written.
    """
    try:
        os.link(source, dest)
    except FileExistsError:
        raise AlreadyExists(f"volume {os.path.basename(dest)} already exists", reason="VOLUME_ALREADY_EXISTS") from None
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        tmp = f"{dest}.{uuidlib.uuid4().hex[:8]}.part"
        try:
            shutil.copyfile(source, tmp)
            os.link(tmp, dest)
        except FileExistsError:
            raise AlreadyExists(
                f"volume {os.path.basename(dest)} already exists", reason="VOLUME_ALREADY_EXISTS"
            ) from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    if os.geteuid() == 0:
        os.chown(dest, 0, 0)
    os.chmod(dest, 0o600)
    os.unlink(source)


def _describe_host_entries(net: NetworkSpec, mac: str) -> str:
    """A dry run's step for the host entries of a VM on a managed network."""
    dhcp, dns = common.host_entries(net, mac)
    what = f"DHCP host {dhcp.mac} -> {dhcp.ip}" + (f" named {dhcp.name}" if dhcp.name else "")
    if dns is not None:
        what += f" and DNS host {dns.ip} -> {', '.join(dns.names)}"
    return f"network-host: add {what} to network {net.libvirt_network}"


def _version(number: int) -> str:
    major, rest = divmod(int(number), 1_000_000)
    minor, micro = divmod(rest, 1000)
    return f"{major}.{minor}.{micro}"


def _slug(path: str) -> str:
    return hashlib.sha256(path.encode()).hexdigest()[:10]
