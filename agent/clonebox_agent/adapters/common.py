"""
Pieces both hypervisor adapters share, so the fake and libvirt cannot drift apart.

- the naming scheme of everything an adapter makes (domain, volumes, seed ISO, per-VM folder);
- the ownership mark put on every file (the ``user.clonebox.owner`` extended attribute);
- scripted faults and delays at named steps (the fake's ``fail_on``/``delays``; the libvirt adapter
  takes the same mapping so contract and fault tests can break both at the same step);
- ``Inventory``: what an adapter has made, for leak checks and garbage collection.
"""

from __future__ import annotations

import dataclasses
import errno
import grp
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from clonebox_agent.ports import Capability, StepLog, TxnStep
from clonebox_core.errors import FailedPrecondition, InvalidArgument
from clonebox_core.model import StepState, VmSpec
from clonebox_core.secret import MASK, Secret
from clonebox_core.snapshots import SnapshotKind

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
#: (``create:start`` only when asked to start)
CREATE_STEPS = ("create:validated", "create:disks", "create:seed", "create:define", "create:start")
#: named steps of ``delete``
DELETE_STEPS = ("delete:destroyed", "delete:undefined", "delete:volumes")


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

    def for_vm(self, vm: str, domain: str) -> Inventory:
        """Return the part that belongs to one VM (domain by name, volumes by prefix, files by mark)."""
        return Inventory(
            tuple(d for d in self.domains if d == domain),
            tuple(v for v in self.volumes if v.startswith(volume_prefix(domain))),
            tuple(f for f in self.files if f[1] == vm),
        )

    def is_empty(self) -> bool:
        """Tell whether nothing is owned."""
        return not (self.domains or self.volumes or self.files)

    def orphans(self, prefix: str, keep: Iterable[str] = ()) -> dict[str, list[str]]:
        """Volumes and marked files of VMs that have no domain (and are not in ``keep``), by VM name.

        ``prefix`` is the adapter's domain name prefix. A volume belongs to the VM its name starts with
        (``{prefix}{vm}.``); a file to the VM its mark names.
        """
        live = {d.removeprefix(prefix) for d in self.domains if d.startswith(prefix)} | set(keep)
        out: dict[str, list[str]] = {}
        for volume in self.volumes:
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


def check_room(folder: str, need_bytes: int, vm: str) -> None:
    """Pre-flight: FailedPrecondition POOL_FULL unless ``folder``'s file system has ``need_bytes`` free.

    Disks are thin (qcow2), but a VM may fill them: the room checked is their full virtual size, so a
    host never accepts VMs that cannot all grow to the size they were promised.
    """
    try:
        st = os.statvfs(folder)
    except FileNotFoundError:
        return  # the pool folder is made on first use; its parent file system is checked then
    free = st.f_bavail * st.f_frsize
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
