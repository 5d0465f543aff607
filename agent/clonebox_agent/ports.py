"""Ports of the agent: what the use cases need from the outside world.

Three adapters implement ``Hypervisor`` under one contract test suite (tests/contract): the scriptable
fake (``adapters.fake``), libvirt's ``test:///default`` driver and real ``qemu:///system`` (both
``adapters.libvirt``). The use cases (``app``) never import libvirt.
"""

from __future__ import annotations

import builtins
import enum
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from clonebox_core.model import CreatePlan, HostInfo, IpAddress, TransactionStep, VmSpec, VmState, Volume
from clonebox_core.plan import UPDATABLE_FIELDS
from clonebox_core.snapshots import SnapshotKind


class Capability(enum.StrEnum):
    """Optional features an adapter may declare; contract tests run per declared capability."""

    #: qemu-ga inside the guest answers (guest shutdown, guest addresses)
    GUEST_AGENT = "guest-agent"
    #: ACPI power-button shutdown reaches a guest that honours it
    ACPI_SHUTDOWN = "acpi-shutdown"
    #: real CPU/memory/disk statistics
    REAL_STATS = "real-stats"
    #: storage volume upload/download streams
    VOLUME_STREAMS = "volume-streams"
    #: files on the host filesystem (overlays, seed ISOs) with ownership xattrs
    HOST_FILES = "host-files"
    #: lifecycle events delivered by the hypervisor
    EVENTS = "events"


class EventKind(enum.StrEnum):
    """What happened to a domain."""

    DEFINED = "defined"
    STARTED = "started"
    STOPPED = "stopped"
    SUSPENDED = "suspended"
    RESUMED = "resumed"
    CRASHED = "crashed"
    UNDEFINED = "undefined"


@dataclass(frozen=True)
class DomainRecord:
    """A domain the agent owns, as the hypervisor reports it."""

    name: str
    uuid: str
    state: VmState
    spec: VmSpec
    create_time: datetime | None = None
    state_reason: str = ""
    addresses: tuple[IpAddress, ...] = ()


@dataclass(frozen=True)
class HypervisorEvent:
    """A lifecycle event; ``state`` is the state after the event (None for UNDEFINED)."""

    name: str
    kind: EventKind
    state: VmState | None
    detail: str = ""


EventSink = Callable[[HypervisorEvent], None]


@dataclass(frozen=True)
class GuestExecResult:
    """What a program run inside the guest (through qemu-ga) returned."""

    exit_code: int
    stdout: bytes = b""
    stderr: bytes = b""


@dataclass(frozen=True)
class DomainStats:
    """One running domain's counters from the bulk statistics call (None: the hypervisor has no such figure).

    CPU use is a rate: the health runner divides the ``cpu_time_ns`` difference of two samples by the
    ``sampled_at`` difference (seconds, monotonic) and ``vcpus``. Memory use inside the guest needs the
    balloon driver's statistics: ``(memory_available_kib - memory_unused_kib) / memory_available_kib``.
    """

    name: str
    sampled_at: float
    vcpus: int
    cpu_time_ns: int | None = None
    memory_available_kib: int | None = None
    memory_unused_kib: int | None = None


@dataclass(frozen=True)
class GuestFilesystem:
    """A mounted filesystem inside the guest, as qemu-ga reports it."""

    mountpoint: str
    fstype: str
    used_bytes: int
    total_bytes: int


@dataclass(frozen=True)
class ProbeTarget:
    """An address of a VM that probe traffic may go to, and the host interface it goes through.

    Only addresses inside the subnet of an active libvirt network the VM is attached to, whose bridge is
    up on this host, are targets: probe traffic never leaves the machine. ``interface`` is that bridge
    (the probe socket is bound to it); the fake adapter's loopback targets have ``interface == ""``.
    """

    address: str
    interface: str


@dataclass(frozen=True)
class SnapshotRecord:
    """A snapshot as the hypervisor keeps it (the agent adds description, tags, creator from its journal)."""

    name: str
    kind: SnapshotKind
    create_time: datetime
    vm_state: VmState
    has_memory: bool
    parent: str
    current: bool
    size_bytes: int = 0


@dataclass(frozen=True)
class DiskImage:
    """A flattened, self-contained qcow2 image of one disk (no backing file), in a file the caller removes."""

    disk: str
    path: str
    virtual_size_bytes: int
    image_bytes: int


#: how ``Hypervisor.orphans`` names a managed network that no VM uses any more (``network:cb-shop``);
#: ``Hypervisor.delete`` of such a name removes that network
NETWORK_ORPHAN_PREFIX = "network:"

#: steps and their states are part of the core model (they travel to the controller and the CLI)
TxnStep = TransactionStep

#: the spec fields ``Hypervisor.update`` takes from a new spec (model names, sorted); every other field of
#: a VM's kept spec stays as it is. Labels and health checks change in place, vCPUs and memory at the
#: domain's next start (``clonebox_core.plan.classify``: IN_PLACE and RESTART)
UPDATE_FIELDS = tuple(sorted(UPDATABLE_FIELDS))


def stopped_undo(domain: str) -> dict[str, str]:
    """The undo record of a step that stops domain ``domain``: start it again if it is still stopped.

    Its identity is ``{"uuid": ...}``; the undo starts only that domain and only when it is stopped, so
    the step may record its identity before it acts (a crash while the guest shuts down is then undone
    too). Every adapter's ``undo_step`` knows it.
    """
    return {"kind": "stopped", "name": domain}


def commit_point_undo(vm: str) -> dict[str, str]:
    """The undo record of a transaction's commit point (``recovery.COMMIT_POINT``) that supersedes no file.

    Recovery finishes a transaction that recorded it instead of undoing it; finishing removes nothing.
    """
    return {"kind": "retire", "vm": vm, "paths": "[]"}


class StepLog(Protocol):
    """Where an adapter records each step of a multi-artifact change, before and after it acts.

    Calls are synchronous (adapters call them from their worker threads) and durable when they
    return: ``planned`` before the step acts, ``made`` right after, with the identity (inode, volume
    key, domain UUID) that undo checks, so that undo never removes something it did not make.
    """

    def planned(self, name: str, undo: Mapping[str, str]) -> int:
        """Record step ``name`` with how to undo it; returns its number."""
        ...

    def made(self, n: int, identity: Mapping[str, str]) -> None:
        """Record what step ``n`` made."""
        ...

    def undone(self, n: int, ok: bool) -> None:
        """Record that step ``n`` was rolled back (``ok``) or that its undo failed."""
        ...

    def steps(self) -> list[TxnStep]:
        """Every step recorded so far, in order."""
        ...


class Hypervisor(Protocol):
    """Everything the agent's use cases need from a hypervisor.

    All methods are coroutines that never block the event loop. Errors are ``clonebox_core.errors``
    classes: ``NotFound(reason="VM_NOT_FOUND")``, ``AlreadyExists(reason="VM_ALREADY_EXISTS")``,
    ``InvalidArgument`` naming the field, ``Unavailable(reason="HYPERVISOR_UNAVAILABLE")`` when the
    hypervisor cannot be reached.
    """

    @property
    def capabilities(self) -> frozenset[Capability]:
        """Features this adapter supports."""
        ...

    async def open(self, sink: EventSink) -> None:
        """Connect, and deliver lifecycle events to ``sink`` on the calling event loop from now on."""
        ...

    async def close(self) -> None:
        """Disconnect and stop delivering events."""
        ...

    async def host_info(self) -> HostInfo:
        """Capacity and hypervisor details; ``serving=False`` (not an exception) when it is down."""
        ...

    async def create(
        self, spec: VmSpec, *, start: bool, steps: StepLog | None = None, ssh_public_key: str = ""
    ) -> DomainRecord:
        """Make disks, seed ISO and domain, and start it when asked.

        ``ssh_public_key`` is the public half of the per-VM key the agent generated for a version-2 spec
        that names no key; it goes into the rendered user-data (never into the domain's metadata).

        Every artifact is a step recorded in ``steps`` (an in-memory log when None) before and after it
        is made. All or nothing: on any failure the recorded steps are undone in reverse order (with
        ``undo_step``) before the error is raised. Raises AlreadyExists when a domain of that name exists.

        A disk with ``volume`` set attaches that agent volume instead of making one (NotFound
        ``VOLUME_NOT_FOUND`` naming ``spec.disks[i].volume`` when there is none; FailedPrecondition
        ``VOLUME_IN_USE`` naming the VM when another defined domain attaches a volume that is not shared).
        The disk gets serial ``vol-NAME``; a shared volume is raw, without host cache, ``<shareable/>``.
        Volumes are never steps: a rollback and ``delete`` leave them.

        A MANAGED network attachment makes the network when it is missing (step ``network-define``) and
        adds the VM's DHCP and DNS host entries (step ``network-host``), before the domain is defined.
        FailedPrecondition ``NETWORK_NOT_MANAGED`` (a network of that name not made by this adapter),
        ``NETWORK_SUBNET_CONFLICT`` (it has another subnet), ``NETWORK_SUBNET_IN_USE`` (the subnet
        overlaps a route of the host), ``NETWORK_ADDRESS_IN_USE``/``NETWORK_NAME_IN_USE`` (another VM on
        it has the address or a DNS name).
        """
        ...

    async def plan_create(self, spec: VmSpec, *, start: bool) -> CreatePlan:
        """What ``create`` would do (steps and domain XML), with the same checks; nothing is made."""
        ...

    async def orphans(self, keep: Iterable[str] = ()) -> dict[str, builtins.list[str]]:
        """Owned volumes and files of VMs without a domain (except those in ``keep``), by VM name.

        Such leftovers come from a crash between making files and defining the domain; ``delete(vm)``
        removes them. A managed network the adapter made that no domain is attached to any more is
        listed under ``NETWORK_ORPHAN_PREFIX + network`` (its description as the one entry);
        ``delete`` of that key removes the network if it is still unused.
        """
        ...

    async def undo_step(self, undo: Mapping[str, str], identity: Mapping[str, str] | None) -> str:
        """Remove what one recorded step made, only if it is still the same artifact.

        Returns what was removed ("" when nothing was: already gone, never made, or replaced by
        something else, which is left alone). Used by rollback after an error and by crash recovery.
        """
        ...

    def console_log_path(self, vm: str) -> str | None:
        """Where ``vm``'s serial console log is kept on this host (None: this hypervisor keeps none)."""
        ...

    def domain_name(self, vm: str) -> str:
        """The hypervisor's name of VM ``vm`` (``cb-web``): what step undo records name (``stopped_undo``)."""
        ...

    async def get(self, name: str) -> DomainRecord:
        """One owned domain (NotFound when absent or not ours)."""
        ...

    async def list(self) -> list[DomainRecord]:
        """All owned domains, with one bulk call."""
        ...

    async def start(self, name: str) -> DomainRecord:
        """Start a defined domain; a running one is left alone."""
        ...

    async def update(self, name: str, spec: VmSpec, *, steps: StepLog | None = None) -> DomainRecord:
        """Give VM ``name`` the labels, health checks, vCPUs and memory of ``spec`` (``UPDATE_FIELDS``); nothing else.

        The VM's kept spec (what ``get``/``list`` return) becomes its current one with exactly those four
        fields taken from ``spec``: every other field, secret digests included, stays as it was, byte for
        byte (the caller has checked with ``clonebox_core.plan.classify`` that nothing else differs; the
        other fields of ``spec`` are ignored). The guest is never touched:

        - labels and health checks live only in the kept spec (libvirt: the domain's metadata, in the
          persistent definition and, when the domain runs, in the live one too);
        - vCPUs and memory change the persistent definition (libvirt: the domain is redefined from its
          own inactive XML, so disks, MAC addresses, NVRAM and snapshots stay); a running domain keeps
          the ones it booted with until it next starts (the caller restarts it when it should).

        One step ``redefine`` in ``steps`` (an in-memory log when None). Its undo puts the previous four
        values back; its identity (the domain UUID and the four new values) is recorded *before* it acts,
        because the undo checks that the domain still has exactly those values and a crash during the
        call must be undone too. The undo leaves a domain that already runs on the new vCPUs/memory (it
        was restarted on the new definition: putting the old one back would make the kept spec lie about
        the running guest). On a failure the adapter undoes its own step before raising (the other steps
        of ``steps`` are the caller's). NotFound ``VM_NOT_FOUND``; emits no lifecycle event.
        """
        ...

    async def shutdown(self, name: str) -> None:
        """Ask the guest to power off (guest agent or ACPI); returns without waiting."""
        ...

    async def destroy(self, name: str) -> None:
        """Force the domain off; a stopped one is left alone."""
        ...

    async def delete(self, name: str) -> builtins.list[str]:
        """Force off, undefine, and remove every file and volume made for it; returns removed paths.

        Agent volumes it attaches (``DiskSpec.volume``) are detached with the definition and kept.

        A VM on a managed network loses its DHCP and DNS host entries, and the network goes when no
        other domain is attached to it (only networks the adapter made). Idempotent under retry.
        """
        ...

    async def addresses(self, name: str) -> tuple[IpAddress, ...]:
        """Guest addresses (guest agent first, then DHCP leases); empty when unknown."""
        ...

    async def guest_exec(
        self, name: str, argv: Sequence[str], *, stdin: bytes = b"", timeout: float = 30.0
    ) -> GuestExecResult:
        """
        Run ``argv`` inside the guest through qemu-ga and wait for it (at most ``timeout`` seconds).

        FailedPrecondition ``GUEST_AGENT_UNAVAILABLE`` when the VM is not running or its agent does not
        answer; DeadlineExceeded ``GUEST_EXEC_TIMEOUT`` when the program outlives ``timeout``.
        """
        ...

    async def guest_file_exists(self, name: str, path: str) -> bool:
        """Whether ``path`` exists in the guest (qemu-ga guest-file-open); errors as ``guest_exec``."""
        ...

    async def guest_ping(self, name: str) -> None:
        """qemu-ga answers ``guest-ping``; FailedPrecondition ``GUEST_AGENT_UNAVAILABLE`` when it does not."""
        ...

    async def guest_file_read(self, name: str, path: str, max_bytes: int) -> bytes | None:
        """The first ``max_bytes`` of a guest file (None when it does not exist); errors as ``guest_exec``."""
        ...

    async def guest_filesystems(self, name: str) -> tuple[GuestFilesystem, ...]:
        """Mounted filesystems with their use (qemu-ga ``guest-get-fsinfo``); errors as ``guest_exec``."""
        ...

    async def domain_stats(self) -> dict[str, DomainStats]:
        """Counters of every running owned domain, by name, from ONE bulk call (never a call per VM).

        A hypervisor without statistics (libvirt's test driver) returns an empty mapping: resource
        probes then have no data.
        """
        ...

    async def probe_targets(self, name: str) -> tuple[ProbeTarget, ...]:
        """The VM's addresses that probes may reach (see ``ProbeTarget``); empty when none is known."""
        ...

    # ---- snapshots ------------------------------------------------------------------------------

    async def create_snapshot(
        self, name: str, snapshot: str, *, kind: SnapshotKind, quiesce: bool = False, steps: StepLog | None = None
    ) -> SnapshotRecord:
        """Take snapshot ``snapshot`` of VM ``name``.

        INTERNAL: disks (and memory when running) inside the qcow2 files. EXTERNAL: disk-only overlays,
        guest filesystems frozen through qemu-ga when ``quiesce`` (FailedPrecondition
        ``GUEST_AGENT_UNAVAILABLE`` when it does not answer). A memory snapshot of a VM with a 9p or
        virtiofs share is refused with FailedPrecondition ``SNAPSHOT_BLOCKED_BY_SHARED_FOLDER``;
        AlreadyExists ``SNAPSHOT_ALREADY_EXISTS`` for a taken name. Files it makes are steps in ``steps``.
        Snapshots hold a VM's own disks only: an EXTERNAL snapshot leaves the agent volumes a VM attaches
        out, an INTERNAL one of such a VM is refused with FailedPrecondition ``VM_HAS_VOLUMES``.
        """
        ...

    async def list_snapshots(self, name: str) -> builtins.list[SnapshotRecord]:
        """The VM's snapshots, oldest first."""
        ...

    async def revert_snapshot(self, name: str, snapshot: str, *, start: bool, steps: StepLog | None = None) -> None:
        """Return the VM's disks (and memory, for an internal snapshot with memory) to ``snapshot``.

        The VM runs afterwards when ``start`` and is stopped otherwise. External snapshots are restored by
        the adapter itself where libvirt cannot (before 9.9): stop, a new overlay on the snapshot's image,
        swap it into the persistent definition, start; the old overlay is removed only at the end. A
        shared base image is never written. NotFound ``SNAPSHOT_NOT_FOUND`` for an unknown name.
        """
        ...

    async def delete_snapshot(self, name: str, snapshot: str, *, children: bool = False) -> builtins.list[str]:
        """Delete ``snapshot`` (and its descendants when ``children``); returns the deleted names.

        Deleting an external snapshot merges its overlay into its image (the data stays in the VM).
        """
        ...

    async def export_disks(self, name: str, snapshot: str, workdir: str) -> builtins.list[DiskImage]:
        """Each disk of the VM as it was at ``snapshot``, flattened into a standalone qcow2 in ``workdir``.

        The agent volumes a VM attaches are not its disks and not part of an export.
        """
        ...

    async def import_disks(
        self, spec: VmSpec, images: Mapping[str, str], *, steps: StepLog | None = None
    ) -> DomainRecord:
        """Define a stopped VM from ``spec`` whose disks are the checked qcow2 files ``images`` (by disk name).

        The files are moved into the agent's storage (they must have no backing file and no external data
        file; the caller checked). ``images`` names the spec's own disks; the agent volumes its other disks
        name are attached, with the checks of ``create``. All or nothing like ``create``.
        """
        ...

    # ---- volumes ----------------------------------------------------------------------------------

    async def create_volume(
        self, name: str, size_mib: int, *, shared: bool = False, labels: Mapping[str, str] | None = None
    ) -> Volume:
        """Make agent volume ``name``: a disk VMs attach by name (``DiskSpec.volume``) that outlives them.

        A qcow2 file in the adapter's pool (raw when ``shared``: QEMU lets several guests write only a raw
        file without host cache), and its metadata, written last, atomically, beside the pool (it survives
        an agent restart). Idempotent: a volume of that name with the same size and shared flag is returned
        with its labels replaced; another size or flag is FailedPrecondition ``VOLUME_EXISTS_DIFFERENT``
        naming the field. A half-made volume (a file without metadata, after a crash) is replaced.
        """
        ...

    async def delete_volume(self, name: str) -> builtins.list[str]:
        """Remove volume ``name`` (metadata first, then its file); the removed paths.

        FailedPrecondition ``VOLUME_IN_USE`` while a defined domain attaches it (naming the VMs); NotFound
        ``VOLUME_NOT_FOUND`` when there is no such volume (a half-made one's file is removed all the same).
        """
        ...

    async def list_volumes(self) -> builtins.list[Volume]:
        """Every volume with metadata, by name, with the VMs whose definitions attach it (``Volume.vms``)."""
        ...

    async def detach_seed(self, name: str) -> builtins.list[str]:
        """
        Take the cloud-init seed away.

        Ejected from the running domain, removed from its persistent definition, its volume deleted.
        Returns the removed paths (empty when there was no seed).
        """
        ...
