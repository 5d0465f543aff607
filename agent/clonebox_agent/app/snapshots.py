"""Snapshot use cases of the agent: create, list, restore, delete, retention, export and import.

Transport-free like ``service``: the gRPC servicer converts messages, the hypervisor adapter does the
libvirt work, and the journal keeps what the hypervisor cannot (description, tags, creator, policies).

- Every change of a VM's snapshots holds the VM's lock from ``AgentService`` (``vm_lock``), so a restore
  cannot race a stop or a delete of the same VM.
- A create is a journaled transaction like a VM create: the adapter records the snapshot as a step
  before and after it acts; the commit, the request's outcome, the snapshot's metadata and its audit
  event are one SQLite transaction, and a crash in between is rolled back by recovery at the next start.
- Mutations are idempotent by request id (the outcome is replayed) and audited through the journal's
  outbox (``snapshot.*`` actions).
- Export and import work in temporary folders under ``<storage_dir>/exports`` and ``<storage_dir>/imports``
  that are removed when the stream ends in any way; a SIGKILL leftover is removed by ``start``.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from clonebox_agent.app.service import AgentService
from clonebox_agent.journal.store import JournalStepLog, SnapshotMeta, TxnState
from clonebox_agent.ports import Hypervisor, SnapshotRecord
from clonebox_core.audit.event import SYSTEM_ACTOR, AuditEvent, Outcome, current_actor, new_event
from clonebox_core.errors import (
    AlreadyExists,
    CloneboxError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    invalid_field,
)
from clonebox_core.model import Vm, VmState
from clonebox_core.names import check_dns_label
from clonebox_core.snapshots import (
    CHUNK_BYTES,
    MAX_TAG_CHARS,
    MAX_TAGS,
    ImageChunk,
    ImageDisk,
    ImageHeader,
    ImagePart,
    ImageTrailer,
    PruneDecision,
    Snapshot,
    SnapshotKind,
    SnapshotPolicy,
    check_image_disks,
    check_policy,
    decide_retention,
)

log = logging.getLogger(__name__)

#: characters of a snapshot's description, at most
MAX_DESCRIPTION_CHARS = 4096
EXPORTS_SUBDIR = "exports"
IMPORTS_SUBDIR = "imports"
_QCOW2_MAGIC = b"QFI\xfb"
#: qcow2 v3 incompatible feature bit 2: the guest data lives in an external data file
_QCOW2_EXTERNAL_DATA = 1 << 2


@dataclass(frozen=True)
class SnapshotSettings:
    """The agent's snapshot settings (from ``AgentConfig``)."""

    storage_dir: str
    prune_interval_seconds: float = 3600.0
    max_import_virtual_bytes: int = 1 << 40
    qemu_img: str = "qemu-img"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, CloneboxError):
        return f"{exc.code} {exc.reason}: {exc.message}"
    return f"{type(exc).__name__}: {exc}"


def _refused(reason: str, message: str) -> InvalidArgument:
    return InvalidArgument(f"import refused: {message}", reason=reason)


def _check_tags(tags: Mapping[str, str]) -> None:
    if len(tags) > MAX_TAGS:
        raise invalid_field("tags", f"at most {MAX_TAGS} tags (got {len(tags)})")
    for key, value in tags.items():
        if not key or len(key) > MAX_TAG_CHARS or len(value) > MAX_TAG_CHARS:
            raise invalid_field("tags", f"keys of 1-{MAX_TAG_CHARS} characters, values of at most {MAX_TAG_CHARS}")


class SnapshotManager:
    """Snapshot use cases of one agent, composed with its ``AgentService`` (locks, journal, recovery)."""

    def __init__(
        self,
        service: AgentService,
        hypervisor: Hypervisor,
        settings: SnapshotSettings,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        step_hook: Callable[[str], None] | None = None,
    ) -> None:
        """``clock`` names snapshots and drives retention; ``step_hook`` sees ``snapshot:commit`` (fault tests)."""
        self._svc = service
        self._hv = hypervisor
        self._journal = service.journal
        self._settings = settings
        self._clock = clock
        self._step_hook = step_hook
        self._host = service.host_name
        self._prune_task: asyncio.Task[None] | None = None

    @property
    def exports_dir(self) -> str:
        """Parent of the export temporary folders."""
        return os.path.join(self._settings.storage_dir, EXPORTS_SUBDIR)

    @property
    def imports_dir(self) -> str:
        """Parent of the import temporary folders."""
        return os.path.join(self._settings.storage_dir, IMPORTS_SUBDIR)

    # ---- lifecycle -------------------------------------------------------------------------------

    async def start(self, *, scheduler: bool = True) -> None:
        """Empty the export/import folders (leftovers of a killed agent) and start the prune scheduler."""
        for folder in (self.exports_dir, self.imports_dir):
            await asyncio.to_thread(shutil.rmtree, folder, True)
            await asyncio.to_thread(os.makedirs, folder, 0o700, True)
        if scheduler:
            self._prune_task = asyncio.create_task(self._prune_forever(), name="snapshot-prune")

    async def close(self) -> None:
        """Stop the scheduler."""
        if self._prune_task is not None:
            self._prune_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._prune_task
            self._prune_task = None

    # ---- create / list -----------------------------------------------------------------------------

    async def create(
        self,
        vm: str,
        *,
        name: str = "",
        description: str = "",
        tags: Mapping[str, str] | None = None,
        kind: SnapshotKind | None = None,
        quiesce: bool = False,
        request_id: str = "",
        creator: str = "",
    ) -> Snapshot:
        """Take a snapshot (default name ``snap-YYYYMMDD-HHMMSS`` UTC). Idempotent by request id.

        The default kind is internal, and disk-only (external) for a VM that attaches agent volumes: only
        that kind leaves the volumes out (``VM_HAS_VOLUMES``).
        """
        check_dns_label("vm", vm)
        name = name or self._clock().astimezone(UTC).strftime("snap-%Y%m%d-%H%M%S")
        check_dns_label("name", name)
        if len(description) > MAX_DESCRIPTION_CHARS:
            raise invalid_field("description", f"at most {MAX_DESCRIPTION_CHARS} characters")
        tags = dict(tags or {})
        _check_tags(tags)
        async with self._svc.vm_lock(vm):
            if request_id and (done := await self._replay(request_id, "snapshot_create", vm)) is not None:
                return await self._one(vm, str(done.get("snapshot", "")))
            meta = SnapshotMeta(vm, name, description, tags, creator or current_actor(), False, "", quiesce)
            if kind is None:
                spec = (await self._hv.get(vm)).spec  # NotFound VM_NOT_FOUND, as the snapshot would say
                kind = SnapshotKind.EXTERNAL if len(spec.own_disks) < len(spec.disks) else SnapshotKind.INTERNAL
            return await self._create_locked(vm, name, kind, quiesce, request_id, meta)

    async def _create_locked(
        self, vm: str, name: str, kind: SnapshotKind, quiesce: bool, request_id: str, meta: SnapshotMeta
    ) -> Snapshot:
        """The create transaction (the caller holds the VM's lock)."""
        txn_id = uuid.uuid4().hex
        await asyncio.to_thread(self._journal.begin_txn, txn_id, "snapshot.create", vm, request_id)
        steps = JournalStepLog(self._journal, txn_id)
        try:
            record = await self._hv.create_snapshot(vm, name, kind=kind, quiesce=quiesce, steps=steps)
        except BaseException as exc:
            # the adapter has undone its steps already; the transaction keeps the error
            await asyncio.to_thread(self._journal.finish_txn, txn_id, TxnState.ROLLED_BACK, _describe(exc))
            raise
        try:
            if self._step_hook is not None:
                self._step_hook("snapshot:commit")
            details = {"transaction": txn_id, "kind": kind.value, "automatic": meta.automatic, "reason": meta.reason}
            event = self._event("snapshot.create", vm, name, request_id, details, actor=meta.creator or None)
            outcome: tuple[str, str, str, dict[str, object]] = (request_id, "snapshot_create", vm, {"snapshot": name})
            await asyncio.to_thread(
                self._journal.finish_txn, txn_id, TxnState.COMMITTED, outcome=outcome, audit=event, snapshot=meta
            )
        except BaseException as exc:
            # taken, but not on record: take it back rather than keep a snapshot no record explains
            await self._svc.recovery.roll_back(txn_id, error=_describe(exc))
            raise
        return self._merge(vm, [record], {name: meta})[0]

    async def list(self, vm: str) -> builtins.list[Snapshot]:
        """The VM's snapshots, oldest first, with the journal's metadata and each one's children.

        Metadata of snapshots the hypervisor no longer has (deleted behind the agent's back) is not shown.
        """
        check_dns_label("vm", vm)
        records = await self._hv.list_snapshots(vm)
        meta = await asyncio.to_thread(self._journal.snapshot_meta, vm)
        return self._merge(vm, records, meta)

    async def policy(self, vm: str) -> SnapshotPolicy:
        """The VM's retention policy (empty when none is set)."""
        check_dns_label("vm", vm)
        return await asyncio.to_thread(self._journal.snapshot_policy, vm)

    async def _one(self, vm: str, name: str) -> Snapshot:
        for snap in await self.list(vm):
            if snap.name == name:
                return snap
        raise NotFound(
            f"VM {vm} has no snapshot {name}", reason="SNAPSHOT_NOT_FOUND", metadata={"vm": vm, "snapshot": name}
        )

    @staticmethod
    def _merge(
        vm: str, records: builtins.list[SnapshotRecord], meta: Mapping[str, SnapshotMeta]
    ) -> builtins.list[Snapshot]:
        children: dict[str, list[str]] = {}
        ordered = sorted(enumerate(records), key=lambda ir: (ir[1].create_time, ir[0]))
        for _, r in ordered:
            if r.parent:
                children.setdefault(r.parent, []).append(r.name)
        out: builtins.list[Snapshot] = []
        for _, r in ordered:
            m = meta.get(r.name)
            out.append(
                Snapshot(
                    name=r.name,
                    vm=vm,
                    kind=r.kind,
                    create_time=r.create_time,
                    vm_state=r.vm_state,
                    has_memory=r.has_memory,
                    quiesced=m.quiesced if m else False,
                    description=m.description if m else "",
                    tags=dict(m.tags) if m else {},
                    size_bytes=r.size_bytes,
                    parent=r.parent,
                    children=tuple(children.get(r.name, ())),
                    current=r.current,
                    creator=m.creator if m else "",
                    automatic=m.automatic if m else False,
                    reason=m.reason if m else "",
                )
            )
        return out

    # ---- restore / delete --------------------------------------------------------------------------

    async def restore(
        self,
        vm: str,
        name: str,
        *,
        no_start: bool = False,
        no_backup: bool = False,
        request_id: str = "",
        creator: str = "",
    ) -> tuple[Vm, Snapshot | None]:
        """Return ``vm`` to snapshot ``name``; first a backup snapshot of the current state unless ``no_backup``.

        A running VM runs again afterwards unless ``no_start``; a stopped one stays stopped. Returns the
        VM and the backup (None without one).
        """
        check_dns_label("vm", vm)
        check_dns_label("name", name)
        async with self._svc.vm_lock(vm):
            if request_id and (done := await self._replay(request_id, "snapshot_restore", vm)) is not None:
                before = str(done.get("backup", ""))
                return await self._svc.get(vm), (await self._one(vm, before) if before else None)
            record = await self._hv.get(vm)
            existing = {s.name: s.kind for s in await self._hv.list_snapshots(vm)}
            if name not in existing:
                raise NotFound(
                    f"VM {vm} has no snapshot {name}",
                    reason="SNAPSHOT_NOT_FOUND",
                    metadata={"vm": vm, "snapshot": name},
                )
            running = record.state in (VmState.RUNNING, VmState.PAUSED)
            backup: Snapshot | None = None
            if not no_backup:
                backup = await self._backup(vm, name, running and bool(record.spec.shared_folders), existing)
            start = running and not no_start
            txn_id = uuid.uuid4().hex
            await asyncio.to_thread(self._journal.begin_txn, txn_id, "snapshot.restore", vm, request_id)
            try:
                await self._hv.revert_snapshot(vm, name, start=start, steps=JournalStepLog(self._journal, txn_id))
                if self._step_hook is not None:
                    self._step_hook("restore:commit")
                outcome: dict[str, object] = {"snapshot": name, "backup": backup.name if backup else ""}
                details = {"transaction": txn_id, "backup": outcome["backup"], "started": start}
                event = self._event("snapshot.restore", vm, name, request_id, details, actor=creator or None)
                await asyncio.to_thread(
                    self._journal.finish_txn,
                    txn_id,
                    TxnState.COMMITTED,
                    outcome=(request_id, "snapshot_restore", vm, outcome),
                    audit=event,
                )
            except BaseException as exc:
                # before the commit point the adapter has put the disks back; past it recovery finishes it
                await self._svc.recovery.roll_back(txn_id, error=_describe(exc))
                raise
            return await self._svc.get(vm), backup

    async def _backup(self, vm: str, name: str, running_shared: bool, existing: dict[str, SnapshotKind]) -> Snapshot:
        """The automatic snapshot taken before a restore: of the kind the VM's snapshots already have.

        A VM's snapshots are all one kind (``SNAPSHOT_KIND_CONFLICT``). An internal backup of a running VM
        with shared folders is impossible (QEMU cannot save its memory): refused with what to do instead.
        """
        kind = existing[name]
        if kind == SnapshotKind.INTERNAL and running_shared:
            raise FailedPrecondition(
                f"VM {vm} is running with shared folders and its snapshots are internal: QEMU cannot save "
                "its memory for the backup; restore with --no-backup, or stop the VM first",
                reason="SNAPSHOT_BLOCKED_BY_SHARED_FOLDER",
                metadata={"vm": vm, "snapshot": name},
            )
        backup_name = self._free_name("pre-restore", set(existing))
        meta = SnapshotMeta(vm, backup_name, "", {}, SYSTEM_ACTOR, True, f"before restore of {name}")
        return await self._create_locked(vm, backup_name, kind, False, "", meta)

    def _free_name(self, prefix: str, taken: set[str]) -> str:
        base = self._clock().astimezone(UTC).strftime(f"{prefix}-%Y%m%d-%H%M%S")
        name, n = base, 1
        while name in taken:  # two restores in one second
            n += 1
            name = f"{base}-{n}"
        return name

    async def delete(self, vm: str, name: str, *, children: bool = False, request_id: str = "") -> builtins.list[str]:
        """Delete snapshot ``name`` (with its descendants when ``children``); the deleted names."""
        check_dns_label("vm", vm)
        check_dns_label("name", name)
        async with self._svc.vm_lock(vm):
            if request_id and (done := await self._replay(request_id, "snapshot_delete", vm)) is not None:
                deleted = done.get("deleted", [])
                return [str(d) for d in deleted] if isinstance(deleted, list) else []
            deleted = await self._hv.delete_snapshot(vm, name, children=children)
            event = self._event(
                "snapshot.delete", vm, name, request_id, {"deleted": ", ".join(deleted), "children": children}
            )
            await asyncio.to_thread(
                self._journal.record,
                request_id,
                "snapshot_delete",
                vm,
                {"deleted": deleted},
                event,
                forget_snapshots=(vm, deleted),
            )
            return deleted

    # ---- retention ---------------------------------------------------------------------------------

    async def set_policy(self, vm: str, policy: SnapshotPolicy, *, request_id: str = "") -> SnapshotPolicy:
        """Validate and store ``vm``'s retention policy (all zero removes it); the policy in force."""
        check_dns_label("vm", vm)
        check_policy(policy)
        async with self._svc.vm_lock(vm):
            if request_id and await self._replay(request_id, "snapshot_policy", vm) is not None:
                return await asyncio.to_thread(self._journal.snapshot_policy, vm)
            await self._hv.get(vm)  # NotFound for a VM that does not exist
            details = {k: v for k, v in vars(policy).items() if v}
            event = self._event("snapshot.policy", vm, "", request_id, details)
            await asyncio.to_thread(self._journal.set_snapshot_policy, vm, policy, request_id, event)
            return policy

    async def prune(
        self, vm: str, *, dry_run: bool = False, request_id: str = "", actor: str | None = None
    ) -> builtins.list[PruneDecision]:
        """Apply ``vm``'s policy now (``dry_run``: only decide); one decision per snapshot, newest first."""
        check_dns_label("vm", vm)
        async with self._svc.vm_lock(vm):
            if (
                not dry_run
                and request_id
                and (done := await self._replay(request_id, "snapshot_prune", vm)) is not None
            ):
                raw = done.get("decisions", [])
                return [PruneDecision(str(d[0]), bool(d[1]), str(d[2])) for d in raw] if isinstance(raw, list) else []
            policy = await asyncio.to_thread(self._journal.snapshot_policy, vm)
            decisions = decide_retention(await self.list(vm), policy, self._clock())
            if dry_run:
                return decisions
            deleted: builtins.list[str] = []
            failed: builtins.list[str] = []
            for d in decisions:
                if d.keep:
                    continue
                try:
                    # one at a time: children of a pruned snapshot move up to its parent and stay
                    deleted += await self._hv.delete_snapshot(vm, d.name, children=False)
                except NotFound:
                    continue  # gone already
                except CloneboxError as exc:
                    log.warning("prune of %s: could not delete snapshot %s: %s", vm, d.name, exc)
                    failed.append(d.name)
            outcome = {"decisions": [[d.name, d.keep, d.reason] for d in decisions]}
            details = {"deleted": ", ".join(deleted), "failed": ", ".join(failed)}
            event = self._event(
                "snapshot.prune",
                vm,
                "",
                request_id,
                details,
                actor=actor,
                outcome=Outcome.PARTLY_FAILED if failed else Outcome.SUCCEEDED,
            )
            await asyncio.to_thread(
                self._journal.record,
                request_id,
                "snapshot_prune",
                vm,
                outcome,
                event,
                forget_snapshots=(vm, deleted),
            )
            if failed:
                raise FailedPrecondition(
                    f"prune of VM {vm}: could not delete {', '.join(failed)} (see the agent's log)",
                    reason="SNAPSHOT_PRUNE_INCOMPLETE",
                    metadata={"vm": vm},
                )
            return decisions

    async def prune_all(self) -> dict[str, builtins.list[str]]:
        """One scheduler pass: apply every VM's policy (actor ``system``); deleted names by VM."""
        done: dict[str, builtins.list[str]] = {}
        for vm in await asyncio.to_thread(self._journal.snapshot_policies):
            try:
                decisions = await self.prune(vm, actor=SYSTEM_ACTOR)
            except NotFound:
                continue  # the VM is gone; its policy went with the delete
            except CloneboxError as exc:
                log.warning("scheduled prune of %s failed: %s", vm, exc)
                continue
            done[vm] = [d.name for d in decisions if not d.keep]
        return done

    async def _prune_forever(self) -> None:
        while True:
            await asyncio.sleep(self._settings.prune_interval_seconds)
            try:
                await self.prune_all()
            except Exception:
                log.exception("scheduled snapshot prune failed")

    # ---- export ------------------------------------------------------------------------------------

    async def export(self, vm: str, name: str) -> AsyncGenerator[ImagePart, None]:
        """Stream snapshot ``name`` of ``vm``: header, chunks of at most 1 MiB, trailer with SHA-256 per disk.

        The disks are flattened into a temporary folder under ``exports/`` (under the VM's lock, so a
        restore or delete cannot change them meanwhile), then read a chunk at a time; the folder is
        removed when the stream ends, also when the consumer goes away.
        """
        check_dns_label("vm", vm)
        check_dns_label("name", name)
        workdir = await asyncio.to_thread(tempfile.mkdtemp, prefix=f"{vm}-", dir=self.exports_dir)
        finished = False
        try:
            async with self._svc.vm_lock(vm):
                record = await self._hv.get(vm)
                snapshot = await self._one(vm, name)
                images = await self._hv.export_disks(vm, name, workdir)
            disks = tuple(ImageDisk(i.disk, i.virtual_size_bytes, i.image_bytes) for i in images)
            yield ImageHeader(snapshot, record.spec, disks)
            digests: builtins.list[str] = []
            for index, image in enumerate(images):
                digest = hashlib.sha256()
                with open(image.path, "rb") as f:  # noqa: ASYNC230  (reads go through the executor below)
                    offset = 0
                    while data := await asyncio.to_thread(f.read, CHUNK_BYTES):
                        digest.update(data)
                        yield ImageChunk(index, offset, data)
                        offset += len(data)
                digests.append(digest.hexdigest())
            event = self._event("snapshot.export", vm, name, "", {"disks": len(images)})
            await asyncio.to_thread(self._journal.add_events, [event])
            finished = True
            yield ImageTrailer(tuple(digests))
        finally:
            # synchronous on purpose: this also runs when the consumer went away (GeneratorExit)
            shutil.rmtree(workdir, ignore_errors=True)
            if not finished:
                log.info("export of %s/%s ended before its trailer; temporary files removed", vm, name)

    # ---- import ------------------------------------------------------------------------------------

    async def import_(self, parts: AsyncIterator[ImagePart]) -> Vm:
        """Make a stopped VM from an export stream; nothing remains unless every check passes.

        Checks: header first; spec name a free DNS label; chunks contiguous; every image complete; SHA-256
        as in the trailer; each file a qcow2 without backing file or external data file, of the header's
        virtual size and at most ``max_import_virtual_bytes``. Idempotent by the header's request id.
        """
        first = await anext(aiter(parts), None)
        if not isinstance(first, ImageHeader):
            raise InvalidArgument("import: the first part must be the header", reason="IMPORT_NO_HEADER")
        header = first
        spec = header.spec
        check_dns_label("spec.name", spec.name)
        check_image_disks([d.name for d in header.disks], spec)
        if header.request_id and await self._replay(header.request_id, "snapshot_import", spec.name) is not None:
            return await self._svc.get(spec.name)
        with contextlib.suppress(NotFound):
            await self._hv.get(spec.name)
            raise AlreadyExists(f"VM {spec.name} already exists", reason="VM_ALREADY_EXISTS")
        # made inline (one mkdir), not in a thread: a cancellation while awaiting the thread would leave the
        # folder made and this function gone before its try, so nothing would remove it
        workdir = tempfile.mkdtemp(prefix=f"{spec.name}-", dir=self.imports_dir)
        try:
            paths = await self._receive(header, parts, workdir)
            for disk, path in zip(header.disks, paths, strict=True):
                await self._check_image(disk, path)
            async with self._svc.vm_lock(spec.name):
                return await self._import_transaction(
                    header, dict(zip([d.name for d in header.disks], paths, strict=True))
                )
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    async def _receive(self, header: ImageHeader, parts: AsyncIterator[ImagePart], workdir: str) -> builtins.list[str]:
        """Write the chunks into one file per disk; check sizes and digests against header and trailer."""
        paths = [os.path.join(workdir, f"{i}.qcow2") for i in range(len(header.disks))]
        written = [0] * len(paths)
        digests = [hashlib.sha256() for _ in paths]
        files = [open(p, "xb") for p in paths]  # noqa: SIM115, ASYNC230  (closed below; tiny opens)
        trailer: ImageTrailer | None = None
        try:
            async for part in parts:
                if isinstance(part, ImageTrailer):
                    trailer = part
                    break
                if not isinstance(part, ImageChunk):
                    raise _refused("IMPORT_BAD_PART", "a second header in the stream")
                if not 0 <= part.disk < len(paths):
                    raise _refused("IMPORT_BAD_PART", f"chunk for disk {part.disk}, the header has {len(paths)}")
                if part.offset != written[part.disk]:
                    raise _refused(
                        "IMPORT_NOT_CONTIGUOUS",
                        f"disk {part.disk}: chunk at offset {part.offset}, expected {written[part.disk]}",
                    )
                if len(part.data) > CHUNK_BYTES:
                    raise _refused("IMPORT_BAD_PART", f"a chunk of {len(part.data)} bytes (at most {CHUNK_BYTES})")
                if written[part.disk] + len(part.data) > header.disks[part.disk].image_bytes:
                    raise _refused("IMPORT_TOO_LARGE", f"disk {part.disk} is longer than the header says")
                await asyncio.to_thread(files[part.disk].write, part.data)
                digests[part.disk].update(part.data)
                written[part.disk] += len(part.data)
        finally:
            for f in files:
                f.close()
        if trailer is None:
            raise _refused("IMPORT_TRUNCATED", "the stream ended before its trailer")
        for i, disk in enumerate(header.disks):
            if written[i] != disk.image_bytes:
                raise _refused("IMPORT_TRUNCATED", f"disk {disk.name}: {written[i]} of {disk.image_bytes} bytes")
        if list(trailer.sha256) != [d.hexdigest() for d in digests]:
            raise _refused("IMPORT_DIGEST_MISMATCH", "the SHA-256 of the received images differs from the trailer's")
        return paths

    async def _check_image(self, disk: ImageDisk, path: str) -> None:
        """Refuse anything but a self-contained qcow2 of the announced size.

        The header is parsed first, so a backing file or external data file is refused before ``qemu-img``
        ever opens the image (which would open those host files); ``qemu-img info`` then confirms.
        """
        with open(path, "rb") as f:  # noqa: ASYNC230  (one 104-byte read)
            head = f.read(104)
        if len(head) < 72 or head[:4] != _QCOW2_MAGIC:
            raise _refused("IMPORT_NOT_QCOW2", f"disk {disk.name} is not a qcow2 image")
        version, backing_offset = struct.unpack(">IQ", head[4:16])
        if backing_offset:
            raise _refused("IMPORT_BACKING_FILE", f"disk {disk.name} names a backing file")
        if version >= 3 and len(head) >= 80 and struct.unpack(">Q", head[72:80])[0] & _QCOW2_EXTERNAL_DATA:
            raise _refused("IMPORT_DATA_FILE", f"disk {disk.name} keeps its data in an external file")
        (virtual,) = struct.unpack(">Q", head[24:32])
        if virtual > self._settings.max_import_virtual_bytes:
            raise _refused(
                "IMPORT_TOO_LARGE",
                f"disk {disk.name} has a virtual size of {virtual} bytes, more than the "
                f"{self._settings.max_import_virtual_bytes} this agent accepts",
            )
        info = await self._qemu_info(disk, path)
        if info.get("format") != "qcow2":
            raise _refused("IMPORT_NOT_QCOW2", f"disk {disk.name} is {info.get('format')!r}, not qcow2")
        if info.get("backing-filename") or info.get("full-backing-filename"):
            raise _refused("IMPORT_BACKING_FILE", f"disk {disk.name} names a backing file")
        specific = info.get("format-specific")
        data = specific.get("data") if isinstance(specific, dict) else None
        if isinstance(data, dict) and data.get("data-file"):
            raise _refused("IMPORT_DATA_FILE", f"disk {disk.name} keeps its data in an external file")
        size = info.get("virtual-size")
        if not isinstance(size, int) or size > self._settings.max_import_virtual_bytes:
            raise _refused("IMPORT_TOO_LARGE", f"disk {disk.name}: virtual size {size} over the agent's limit")
        if size != disk.virtual_size_bytes:
            raise _refused(
                "IMPORT_SIZE_MISMATCH", f"disk {disk.name}: virtual size {size}, header says {disk.virtual_size_bytes}"
            )

    async def _qemu_info(self, disk: ImageDisk, path: str) -> dict[str, object]:
        proc = await asyncio.create_subprocess_exec(
            self._settings.qemu_img,
            "info",
            "--output=json",
            path,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, _err = await proc.communicate()
        try:
            info = json.loads(out) if proc.returncode == 0 else None
        except ValueError:
            info = None
        if not isinstance(info, dict):
            raise _refused("IMPORT_NOT_QCOW2", f"disk {disk.name}: qemu-img cannot read it")
        return info

    async def _import_transaction(self, header: ImageHeader, images: dict[str, str]) -> Vm:
        spec = header.spec
        txn_id = uuid.uuid4().hex
        await asyncio.to_thread(self._journal.begin_txn, txn_id, "snapshot.import", spec.name, header.request_id)
        steps = JournalStepLog(self._journal, txn_id)
        try:
            record = await self._hv.import_disks(spec, images, steps=steps)
        except BaseException as exc:
            await asyncio.to_thread(self._journal.finish_txn, txn_id, TxnState.ROLLED_BACK, _describe(exc))
            raise
        try:
            source = header.snapshot.name if header.snapshot is not None else ""
            origin_vm = header.snapshot.vm if header.snapshot is not None else ""
            details = {"transaction": txn_id, "from_snapshot": f"{origin_vm}/{source}", "disks": len(images)}
            event = self._event("snapshot.import", spec.name, "", header.request_id, details)
            outcome: tuple[str, str, str, dict[str, object]] = (header.request_id, "snapshot_import", spec.name, {})
            await asyncio.to_thread(self._journal.finish_txn, txn_id, TxnState.COMMITTED, outcome=outcome, audit=event)
        except BaseException as exc:
            await self._svc.recovery.roll_back(txn_id, error=_describe(exc))
            raise
        return await self._svc.get(record.name)

    # ---- internals ---------------------------------------------------------------------------------

    async def _replay(self, request_id: str, method: str, target: str) -> dict[str, object] | None:
        # one request-id rule for every mutation of the agent: the service's
        return await self._svc.replay(request_id, method, target)

    def _event(
        self,
        action: str,
        vm: str,
        snapshot: str,
        request_id: str,
        details: Mapping[str, object],
        *,
        actor: str | None = None,
        outcome: Outcome = Outcome.SUCCEEDED,
    ) -> AuditEvent:
        resource = f"hosts/{self._host}/vms/{vm}" + (f"/snapshots/{snapshot}" if snapshot else "")
        return new_event(
            action,
            resource,
            outcome,
            request_id=request_id,
            origin=f"agent/{self._host}",
            details=details,
            actor=actor,
        )
