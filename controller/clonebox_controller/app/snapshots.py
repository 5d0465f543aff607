"""Snapshot use cases of the controller: each call goes to the agent of the VM's host.

Snapshots live on the host with the VM's disks, so the agent is their only record: the controller
keeps no snapshot state. It finds the VM's host in the fleet store (NotFound VM_NOT_FOUND for a name
the fleet does not know), forwards the call with the caller's identity as ``creator`` and the client's
request id (the agent is idempotent by it), passes the agent's errors through unchanged, and records
each successful change in the audit chain (refused and failed calls are recorded by the guard's
observer).

An import makes a new VM, so it goes through placement like CreateVm: the VM is reserved (PENDING,
resources held) together with a ``snapshot.import`` operation in one store transaction, the stream is
pumped to the chosen agent, and on any failure (the agent's refusal, a bad archive, the client going
away) the reservation is released. On success the reserved record *is* the VM: the agent's WatchVms
event for it finds the record on the same host and only updates it, so nothing is counted twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from clonebox_controller.app.hosts import HostRegistry
from clonebox_controller.app.ports import AgentClient, FleetStore, ImagePart
from clonebox_controller.app.uncancelled import to_thread_uncancelled
from clonebox_controller.app.vms import new_operation
from clonebox_core.audit.event import Outcome, current_actor, new_event
from clonebox_core.errors import CLASS_BY_CODE, Aborted, AlreadyExists, CloneboxError, Internal, NotFound
from clonebox_core.model import Operation, Vm, VmSpec, VmState
from clonebox_core.names import check_dns_label
from clonebox_core.snapshots import PruneDecision, Snapshot, SnapshotKind, SnapshotPolicy

log = logging.getLogger(__name__)

#: the operation kind (and audit action) of an import
IMPORT_KIND = "snapshot.import"


@dataclass(frozen=True)
class ImportHeader:
    """What the controller reads from an import stream's header: the VM to make and where."""

    spec: VmSpec
    #: host asked for ("" lets placement choose)
    host: str = ""
    #: the client's request id ("" for none)
    request_id: str = ""


def _resource(vm: str, snapshot: str = "") -> str:
    return f"vms/{vm}/snapshots/{snapshot}" if snapshot else f"vms/{vm}/snapshots"


class SnapshotManager:
    """Forwards snapshot calls to agents; imports go through placement and a reservation."""

    def __init__(self, store: FleetStore, hosts: HostRegistry) -> None:
        self._store = store
        self._hosts = hosts

    async def _agent(self, vm: str) -> tuple[AgentClient, Vm]:
        """The client of the agent that has ``vm``, and the fleet's record of it."""
        check_dns_label("vm", vm)
        record = await asyncio.to_thread(self._store.get_vm, vm)  # NotFound VM_NOT_FOUND
        return await self._hosts.client(record.host), record

    async def _record(self, action: str, resource: str, request_id: str, **details: object) -> None:
        event = new_event(action, resource, Outcome.SUCCEEDED, request_id=request_id, details=details)
        await asyncio.to_thread(self._store.append_audit, [event])

    # ---- forwarded calls -------------------------------------------------------------------------

    async def create(
        self,
        vm: str,
        name: str,
        *,
        description: str,
        tags: dict[str, str],
        kind: SnapshotKind | None,
        quiesce: bool,
        request_id: str,
    ) -> Snapshot:
        """Take a snapshot of ``vm`` (idempotent by request id on the agent)."""
        if name:
            check_dns_label("name", name)
        client, record = await self._agent(vm)
        snap = await client.create_snapshot(
            vm,
            name,
            description=description,
            tags=tags,
            kind=kind,
            quiesce=quiesce,
            request_id=request_id,
            creator=current_actor(),
        )
        await self._record(
            "snapshot.create", _resource(vm, snap.name), request_id, host=record.host, kind=snap.kind.value
        )
        return snap

    async def list_snapshots(self, vm: str) -> tuple[list[Snapshot], SnapshotPolicy]:
        """A VM's snapshots, oldest first, and its retention policy."""
        client, _ = await self._agent(vm)
        return await client.list_snapshots(vm)

    async def restore(
        self, vm: str, name: str, *, no_start: bool, no_backup: bool, request_id: str
    ) -> tuple[Vm, Snapshot | None]:
        """Return ``vm`` to snapshot ``name``; the VM afterwards and the backup taken first (if any)."""
        check_dns_label("name", name)
        client, record = await self._agent(vm)
        after, backup = await client.restore_snapshot(
            vm, name, no_start=no_start, no_backup=no_backup, request_id=request_id, creator=current_actor()
        )
        # the restore may have stopped or started the VM: record it now rather than wait for the event
        stored = await asyncio.to_thread(
            self._store.update_vm_observed, vm, after.state, after.uuid, after.addresses, after.state_reason
        )
        await self._record(
            "snapshot.restore",
            _resource(vm, name),
            request_id,
            host=record.host,
            backup=backup.name if backup is not None else "",
        )
        return stored or after, backup

    async def delete(self, vm: str, name: str, *, children: bool, request_id: str) -> list[str]:
        """Delete snapshot ``name`` (and its descendants with ``children``); the names deleted."""
        check_dns_label("name", name)
        client, record = await self._agent(vm)
        deleted = await client.delete_snapshot(vm, name, children=children, request_id=request_id)
        await self._record(
            "snapshot.delete", _resource(vm, name), request_id, host=record.host, deleted=",".join(deleted)
        )
        return deleted

    async def set_policy(self, vm: str, policy: SnapshotPolicy, request_id: str) -> SnapshotPolicy:
        """Set ``vm``'s retention policy; the policy in force."""
        client, record = await self._agent(vm)
        result = await client.set_snapshot_policy(vm, policy, request_id)
        await self._record("snapshot.policy", _resource(vm), request_id, host=record.host)
        return result

    async def prune(self, vm: str, *, dry_run: bool, request_id: str) -> list[PruneDecision]:
        """Apply ``vm``'s retention policy now (or, with ``dry_run``, only say what it would delete)."""
        client, record = await self._agent(vm)
        decisions = await client.prune_snapshots(vm, dry_run=dry_run, request_id=request_id)
        if not dry_run:
            deleted = [d.name for d in decisions if not d.keep]
            await self._record("snapshot.prune", _resource(vm), request_id, host=record.host, deleted=",".join(deleted))
        return decisions

    async def export(self, vm: str, name: str) -> AsyncIterator[ImagePart]:
        """
        The parts of an export of ``vm`` at snapshot ``name``, as the agent streams them.

        One part at a time: the caller's writes pace the agent's reads (gRPC flow control), so a slow
        client never makes the controller buffer an image. The export is audited (it reads disk
        contents) once the agent has accepted it, i.e. when the first part arrives.
        """
        check_dns_label("name", name)
        client, record = await self._agent(vm)
        recorded = False
        async for part in client.export_snapshot(vm, name):
            if not recorded:
                await self._record("snapshot.export", _resource(vm, name), "", host=record.host)
                recorded = True
            yield part

    # ---- import ----------------------------------------------------------------------------------

    async def import_(self, header: ImportHeader, first: ImagePart, rest: AsyncIterator[ImagePart]) -> Vm:
        """
        Place and make a stopped VM from an import stream whose header (``first``) says ``header``.

        The name must be free in the fleet (AlreadyExists VM_ALREADY_EXISTS); placement errors are
        CreateVm's. A retry with the same request id returns the first attempt's VM (or its error).
        """
        spec = header.spec
        check_dns_label("spec.name", spec.name)
        if header.host:
            check_dns_label("host", header.host)
        op = new_operation(IMPORT_KIND, f"vms/{spec.name}", header.request_id, {"host": header.host})
        accepted = new_event(
            IMPORT_KIND,
            op.target,
            Outcome.ACCEPTED,
            request_id=header.request_id,
            details={"operation": op.id, "host": header.host},
        )
        (stored, reserved), cancelled = await to_thread_uncancelled(
            self._store.reserve_vm, spec, header.host or None, op, [accepted]
        )
        if stored.id != op.id:
            if cancelled:
                raise asyncio.CancelledError
            return self._replayed(stored, reserved)
        assert reserved is not None  # a fresh reservation always has its record
        if cancelled:
            # the client went away while the name was being reserved: nothing will come, release it
            await self._abandon(stored, spec.name, _as_error(asyncio.CancelledError()))
            raise asyncio.CancelledError
        # from here the VM holds a reservation: every way out records the VM or releases it
        try:
            step = f"importing on host {reserved.host}"
            await asyncio.to_thread(lambda: self._store.update_operation(op.id, step, 20, vm_state=VmState.CREATING))
            host = await asyncio.to_thread(self._store.get_host_endpoint, reserved.host)
            # the agent's request id is the operation id, as for CreateVm: a resumed or retried
            # import can never make the VM twice
            made = await self._hosts.client_for(host).import_snapshot(first, op.id, rest)
        except BaseException as exc:
            err = _as_error(exc)
            # shielded: when the client went away this task is being cancelled, and the release
            # must still happen
            await asyncio.shield(self._abandon(stored, spec.name, err))
            raise
        done = new_event(
            IMPORT_KIND,
            op.target,
            Outcome.SUCCEEDED,
            request_id=header.request_id,
            details={"operation": op.id, "host": reserved.host},
        )
        # the host's report of the VM is recorded with the end, in one transaction (as VmManager does)
        finished = await asyncio.to_thread(lambda: self._store.finish_operation(op.id, None, done, observed=made))
        return finished.result_vm or made

    def _replayed(self, op: Operation, vm: Vm | None) -> Vm:
        """The answer to a retried import: the first attempt's VM, or its error."""
        if not op.done:
            raise Aborted(
                f"an import with request id {op.request_id!r} is still running (operation {op.id}); "
                "wait for it, or retry with a new request id",
                reason="IMPORT_IN_PROGRESS",
                metadata={"operation": op.id},
            )
        if op.error_code:
            cls = CLASS_BY_CODE.get(op.error_code, Internal)
            raise cls(op.error_message, reason=op.error_reason, metadata=op.error_metadata)
        found = vm or op.result_vm
        if found is None:
            raise AlreadyExists(
                f"request id {op.request_id!r} imported {op.target}, which has since been deleted; "
                "use a new request id",
                reason="REQUEST_ID_REUSED",
                metadata={"operation": op.id},
            )
        return found

    async def _abandon(self, op: Operation, name: str, err: CloneboxError) -> None:
        """Release a failed import's reservation and record the failure."""
        log.warning("import of %s failed: %s", name, err)
        with contextlib.suppress(NotFound):
            await asyncio.to_thread(self._store.release_vm, name)
        # the agent's import is all-or-nothing; should it have made the VM after all (an answer lost
        # on the way), the host's next listing adopts it
        await self._hosts.adopt_released(name)
        failed = new_event(
            IMPORT_KIND,
            op.target,
            Outcome.FAILED,
            request_id=op.request_id,
            reason=err.reason,
            details={"operation": op.id, "error": err.message},
        )
        await asyncio.to_thread(self._store.finish_operation, op.id, err, failed)


def _as_error(exc: BaseException) -> CloneboxError:
    """The error an abandoned import's operation records."""
    if isinstance(exc, CloneboxError):
        return exc
    if isinstance(exc, asyncio.CancelledError):
        return Aborted("import abandoned: the client went away; nothing was kept", reason="IMPORT_CANCELLED")
    return Internal(f"import failed: {type(exc).__name__}: {exc}")
