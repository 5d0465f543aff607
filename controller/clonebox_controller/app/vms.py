"""VM use cases of the controller: placement-backed create, start, stop, delete as operations.

Every mutation records an Operation in the same store transaction that reserves or claims what it
needs, then runs in the background. The request id sent to the agent is the operation id, so a retry
after a network blip or a controller restart never does the work twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import TypeVar

from clonebox_controller.app.hosts import HostRegistry
from clonebox_controller.app.ports import AgentClient, AgentConsoleChunk, FleetStore
from clonebox_controller.app.uncancelled import to_thread_uncancelled
from clonebox_core.audit.event import SYSTEM_ACTOR, AuditEvent, Outcome, current_actor, new_event
from clonebox_core.errors import Aborted, CloneboxError, FailedPrecondition, Internal, NotFound, Unavailable
from clonebox_core.model import CreatePlan, Operation, Revision, Vm, VmSpec, VmState, Volume
from clonebox_core.names import check_dns_label
from clonebox_core.plan import ChangeKind, classify, needs_replace_error, updated_spec
from clonebox_core.secret import Secret
from clonebox_core.secrets.providers import SecretRef, secret_access_event
from clonebox_core.security.identity import current_caller
from clonebox_core.validate import validate_resolved, validate_volume

log = logging.getLogger(__name__)

T = TypeVar("T")

#: longest pause between two attempts to reach an agent that is down
_MAX_RETRY_DELAY = 5.0


@dataclasses.dataclass(frozen=True)
class _Outcome:
    """
    How an operation's work ended, recorded with the operation's end in one transaction.

    ``observed``: the VM as its host reported it last (its state, uuid, addresses and reason are
    recorded, and the VM as stored is the operation's result); ``step``: the operation's last step;
    ``revision``: the agent's event revision when it answered, so that its events about the change,
    if they arrive after this, are not taken for news (``Store.finish_operation``).
    """

    observed: Vm | None = None
    step: str | None = None
    revision: Revision | None = None


#: a create's first step, recorded with its reservation (``{host}``: the host chosen)
_CREATING_STEP = "creating on host {host}"
#: operations whose VM's agent events wait for their end (``HostRegistry.own``): the ones whose record
#: says so too (creating, deleting), for any controller's events
_OWNING = frozenset({"vm.create", "vm.delete"})


def new_operation(kind: str, target: str, request_id: str, params: dict[str, str] | None = None) -> Operation:
    """A fresh, not yet stored operation."""
    now = datetime.now(UTC)
    return Operation(
        id=uuid.uuid4().hex[:16],
        kind=kind,
        target=target,
        request_id=request_id,
        step="queued",
        create_time=now,
        update_time=now,
        params=params or {},
    )


def _accepted(op: Operation, **details: str) -> AuditEvent:
    """The audit event of an operation being recorded (its end is a second event)."""
    return new_event(
        op.kind,
        op.target,
        Outcome.ACCEPTED,
        request_id=op.request_id,
        details={"operation": op.id, **{k: v for k, v in details.items() if v}},
    )


class VmManager:
    """Fleet-wide VM lifecycle."""

    def __init__(
        self,
        store: FleetStore,
        hosts: HostRegistry,
        *,
        stop_timeout_seconds: int,
        observe_operation: Callable[[str, str, float], None] | None = None,
        agent_retry_seconds: float = 60.0,
    ) -> None:
        """``observe_operation(kind, outcome, seconds)`` hears how long each finished operation took.

        ``agent_retry_seconds``: how long an operation keeps retrying an agent that cannot be reached
        (an agent restarting after a crash rolls back first, then answers the retry).
        """
        self._agent_retry_seconds = agent_retry_seconds
        self._store = store
        self._observe_operation = observe_operation
        self._hosts = hosts
        self._stop_timeout = stop_timeout_seconds
        self._tasks: dict[str, asyncio.Task[Operation]] = {}

    async def resume(self) -> None:
        """Continue operations a previous controller process left unfinished."""
        for op in await asyncio.to_thread(self._store.unfinished_operations):
            log.info("resuming operation %s (%s %s)", op.id, op.kind, op.target)
            # the process that accepted it is gone: its end is attributed to the system
            self._spawn(op, SYSTEM_ACTOR)

    async def close(self) -> None:
        """Cancel running operation tasks (they resume on the next start)."""
        for t in self._tasks.values():
            t.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    # ---- queries -----------------------------------------------------------------------------

    async def ssh_key(self, name: str) -> tuple[Secret, str, str]:
        """
        The private key the VM's agent generated for it, its guest user and host.

        The agent records the read (``secret.access``, naming the caller) before it answers.
        """
        check_dns_label("name", name)
        vm = await asyncio.to_thread(self._store.get_vm, name)
        caller = current_caller()
        key, user = await (await self._hosts.client(vm.host)).get_ssh_key(name, caller.spiffe_id if caller else "")
        return key, user, vm.host

    async def read_console(
        self, name: str, tail_bytes: int, follow: bool, from_offset: int | None = None
    ) -> AsyncGenerator[AgentConsoleChunk, None]:
        """
        The VM's serial console log from its agent: its last ``tail_bytes``, then with ``follow`` what follows.

        ``tail_bytes`` 0 means the agent's default; ``from_offset`` (a client resuming a broken stream) starts at
        that byte instead (the agent checks it: negative is INVALID_ARGUMENT, beyond the end starts at 0). A
        follow lasts until the caller stops or the VM is deleted. A guest may print its secrets there, so each
        read is one ``vm.console_read`` audit event naming the caller, appended once the agent has accepted the
        read (its first piece, or the end of an empty log) and before any byte is passed on: a read that cannot
        be audited does not happen. A resumed read is a new read, audited again with ``from_offset`` in its
        details.
        """
        check_dns_label("name", name)
        vm = await asyncio.to_thread(self._store.get_vm, name)  # NotFound VM_NOT_FOUND
        client = await self._hosts.client(vm.host)  # FailedPrecondition HOST_UNREACHABLE
        audit = new_event(
            "vm.console_read",
            f"vms/{name}",
            Outcome.SUCCEEDED,
            details={"host": vm.host, "tail_bytes": tail_bytes, "follow": follow}
            | ({} if from_offset is None else {"from_offset": from_offset}),
        )
        audited = False
        async for chunk in client.read_console(name, tail_bytes, follow, from_offset):
            if not audited:
                await asyncio.to_thread(self._store.append_audit, [audit])
                audited = True
            yield chunk
        if not audited:
            await asyncio.to_thread(self._store.append_audit, [audit])

    async def rotate_secret(
        self,
        name: str,
        request_id: str,
        *,
        password_hash: Secret,
        expire: bool,
        keys: tuple[str, ...],
        replace_keys: bool,
        secret_refs: tuple[str, ...],
    ) -> tuple[str, list[str], str]:
        """
        Rotate the VM's login secrets in the guest, then record the new auth.

        The new hash and keys are stored with the ``vm.rotate_secret`` and ``secret.access`` audit
        events in one transaction. Returns the user, what changed and the host. A retry with the same
        request id does not act twice on the agent.
        """
        check_dns_label("name", name)
        refs = [SecretRef.parse(text, field=f"secret_refs[{i}]") for i, text in enumerate(secret_refs)]
        vm = await asyncio.to_thread(self._store.get_vm, name)
        if vm.spec.auth is None:
            raise FailedPrecondition(
                f"VM {name} has no login user managed by clonebox (a version 1 spec): nothing to rotate",
                reason="NO_MANAGED_LOGIN",
                metadata={"vm": name},
            )
        host = await asyncio.to_thread(self._store.get_host_endpoint, vm.host)
        accesses = [
            secret_access_event(ref, resource=f"vms/{name}", request_id=request_id, details=_BY_CLIENT) for ref in refs
        ]
        try:
            user, changed = await self._hosts.client_for(host).rotate_secret(
                name, request_id, password_hash, expire, keys, replace_keys
            )
        except CloneboxError:
            # the client read the secret whether or not the guest took it (the refusal itself is
            # recorded by the guard's observer)
            if accesses:
                await asyncio.to_thread(self._store.append_audit, accesses)
            raise
        auth = vm.spec.auth
        if "password" in changed:
            auth = dataclasses.replace(auth, password_hash=password_hash, secret_refs=tuple(secret_refs))
        if "keys" in changed:
            auth = dataclasses.replace(auth, ssh_authorized_keys=keys)
        events = [
            new_event(
                "vm.rotate_secret",
                f"vms/{name}",
                Outcome.SUCCEEDED,
                request_id=request_id,
                details={"host": vm.host, "user": user, "changed": ",".join(changed), "expire": expire},
            ),
            *accesses,
        ]
        await asyncio.to_thread(self._store.update_vm_auth, name, auth, events)
        return user, changed, vm.host

    async def get(self, name: str, *, live: bool = True) -> Vm:
        """A VM; with ``live`` its addresses and state are refreshed from its agent when reachable."""
        check_dns_label("name", name)
        vm = await asyncio.to_thread(self._store.get_vm, name)
        if not live or vm.state in (VmState.PENDING, VmState.CREATING, VmState.DELETING):
            return vm
        try:
            fresh = await (await self._hosts.client(vm.host)).get_vm(name)
        except CloneboxError:
            return vm  # the stored view is still the best answer
        if fresh.observed() == vm.observed():
            return vm  # nothing changed: no write (a read must not cost a write transaction)
        updated = await asyncio.to_thread(self._store.update_vm_observed, name, *fresh.observed())
        return updated or vm

    async def list_vms(
        self,
        host: str | None,
        state: VmState | None,
        labels: dict[str, str],
        page_size: int,
        page_token: str,
    ) -> tuple[list[Vm], str]:
        """A page of VMs from the store."""
        return await asyncio.to_thread(self._store.list_vms, host, state, labels, page_size, page_token)

    # ---- volumes (disks on one host that outlive their VMs; plans make them, so do users) --------

    async def create_volume(
        self,
        host: str,
        name: str,
        size_mib: int,
        shared: bool,
        labels: dict[str, str],
        request_id: str,
        *,
        holder: str = "",
    ) -> Volume:
        """
        Make agent volume ``name`` on ``host`` (idempotent: an equal volume is returned as it is).

        Its disk is reserved on the host first (ResourceExhausted HOST_CAPACITY_EXCEEDED when it does not
        fit), or taken over from plan run ``holder``'s hold, and freed again when the agent makes nothing.
        FailedPrecondition VOLUME_EXISTS_DIFFERENT (the agent's) when it exists with another size or shared
        flag; HOST_UNREACHABLE; an unreachable agent is retried like an operation's call. Audited here
        (``volume.create``, naming the caller) and by the agent.
        """
        check_dns_label("host", host)
        validate_volume(name, size_mib, labels.items())
        client = await self._hosts.client(host)
        reserved = await asyncio.to_thread(lambda: self._store.reserve_volume(host, name, size_mib, holder=holder))
        try:
            made = await self._agent_call(client, lambda c: c.create_volume(name, size_mib, shared, labels, request_id))
        except CloneboxError:
            # the agent's create is all-or-nothing (a half-made volume is invisible, a retry replaces it);
            # a cancelled call keeps the reservation: the agent may still make the volume
            if reserved:
                await asyncio.to_thread(self._store.release_volume, host, name)
            raise
        await self._audit_volume(
            "volume.create", name, request_id, {"host": host, "size_mib": size_mib, "shared": shared}
        )
        return made

    async def delete_volume(self, host: str, name: str, request_id: str) -> bool:
        """
        Remove agent volume ``name`` on ``host`` and its data, and free its disk; False when there was none.

        FailedPrecondition VOLUME_IN_USE (the agent's) while a VM definition attaches it. Audited here
        (``volume.delete``) and by the agent.
        """
        check_dns_label("host", host)
        check_dns_label("name", name)
        client = await self._hosts.client(host)
        async with self._hosts.volume_lock(host):
            try:
                await self._agent_call(client, lambda c: c.delete_volume(name, request_id))
            except NotFound:
                await asyncio.to_thread(self._store.release_volume, host, name)
                return False
            await asyncio.to_thread(self._store.release_volume, host, name)
        await self._audit_volume("volume.delete", name, request_id, {"host": host})
        return True

    async def _audit_volume(self, action: str, name: str, request_id: str, details: Mapping[str, object]) -> None:
        event = new_event(action, f"volumes/{name}", Outcome.SUCCEEDED, request_id=request_id, details=details)
        await asyncio.to_thread(self._store.append_audit, [event])

    async def list_volumes(self, host: str) -> list[Volume]:
        """The volumes of ``host`` (one attempt: a question, not a mutation)."""
        return await (await self._hosts.client(host)).list_volumes()

    async def list_fleet_volumes(self, host: str = "") -> tuple[list[tuple[str, Volume]], dict[str, str]]:
        """
        The volumes of every host (or of ``host``), as (host, volume) by host then name, and the hosts not asked.

        Hosts are asked at once, each once; one that cannot be asked is in the second result (host -> why).
        NotFound HOST_NOT_FOUND for an unknown ``host``.
        """
        if host:
            check_dns_label("host", host)
            names = [(await asyncio.to_thread(self._store.get_host, host)).name]
        else:
            names = [h.name for h in await asyncio.to_thread(self._store.list_hosts)]

        async def ask(name: str) -> list[Volume] | CloneboxError:
            try:
                return await self.list_volumes(name)
            except CloneboxError as err:
                return err

        answers = await asyncio.gather(*(ask(n) for n in names))
        found: list[tuple[str, Volume]] = []
        errors: dict[str, str] = {}
        for name, answer in zip(names, answers, strict=True):
            if isinstance(answer, CloneboxError):
                errors[name] = answer.message
            else:
                found.extend((name, v) for v in sorted(answer, key=lambda v: v.name))
        return found, errors

    # ---- mutations ---------------------------------------------------------------------------

    async def plan_create(self, spec: VmSpec, host: str | None) -> CreatePlan:
        """What a create would do: validation, placement and the agent's steps and XML; nothing reserved or made."""
        validate_resolved(spec)
        if host:
            check_dns_label("host", host)
        chosen = await asyncio.to_thread(self._store.place, spec, host or None)
        # a dry run is a question: one attempt, no waiting for an agent that is down
        return await (await self._hosts.client(chosen)).plan_create(spec)

    async def create(
        self, spec: VmSpec, host: str | None, request_id: str, *, gate: asyncio.Future[None] | None = None
    ) -> tuple[Operation, Vm | None]:
        """
        Reserve room on a host and create the VM there; the operation and the VM as recorded then.

        The VM is None when a retried request's VM is gone meanwhile (the operation says why).

        The references the client resolved for the request (``auth.secret_refs``) are recorded as
        ``secret.access`` events, by the caller, in the same transaction as the acceptance.

        ``gate``: the agent is asked only once it is done (a plan's create accepted while it waits for a
        free slot); an error set on it fails the operation and frees the room, with nothing made. A
        controller restarted meanwhile resumes the operation without its gate.
        """
        validate_resolved(spec)
        if host:
            check_dns_label("host", host)
        op = new_operation("vm.create", f"vms/{spec.name}", request_id)
        events = [_accepted(op, host=host or ""), *_secret_accesses(spec, request_id)]
        (stored, vm), cancelled = await to_thread_uncancelled(
            lambda: self._store.reserve_vm(spec, host or None, op, events, creating_step=_CREATING_STEP)
        )
        if stored.id == op.id:
            # accepted: the create goes on even when the client went away meanwhile (a retry finds it)
            self._spawn(stored, reserved=vm, gate=gate)
        if cancelled:
            raise asyncio.CancelledError
        return stored, vm

    async def start(self, name: str, request_id: str) -> Operation:
        """Start a VM."""
        return await self._begin("vm.start", name, request_id)

    async def stop(self, name: str, request_id: str, timeout_seconds: int, force: bool) -> Operation:
        """Stop a VM gracefully, forced after the timeout."""
        params = {"timeout_seconds": str(timeout_seconds or self._stop_timeout), "force": "1" if force else ""}
        return await self._begin("vm.stop", name, request_id, params)

    async def update(
        self, spec: VmSpec, request_id: str, timeout_seconds: int = 0, *, dry_run: bool = False
    ) -> tuple[Operation | None, ChangeKind, tuple[str, ...]]:
        """
        Change a VM to ``spec`` on its host without re-creating it; returns the operation and what it takes.

        Labels and health checks change in place; vCPUs and memory by redefining the domain and, when
        the VM runs, a graceful restart (forced after ``timeout_seconds``); disks stay. Only those
        fields are taken from ``spec`` (:func:`clonebox_core.plan.updated_spec`). Refused before
        anything is recorded: any other difference (FailedPrecondition VM_UPDATE_NEEDS_REPLACE naming
        the fields), growth the host has no room for (ResourceExhausted HOST_CAPACITY_EXCEEDED).
        ``dry_run`` only classifies (the operation is then None). An equal spec still records an
        operation, which changes nothing, so a caller can always wait on what it gets.
        """
        check_dns_label("name", spec.name)
        validate_resolved(spec)
        current = await asyncio.to_thread(self._store.get_vm, spec.name)
        kind, fields = classify(current.spec, spec)
        if kind is ChangeKind.REPLACE:
            raise needs_replace_error(spec.name, fields)
        if dry_run:
            return None, kind, fields
        params = {"timeout_seconds": str(timeout_seconds or self._stop_timeout)}
        op = new_operation("vm.update", f"vms/{spec.name}", request_id, params)
        merged = updated_spec(current.spec, spec)
        event = _accepted(op, change=kind.value, fields=",".join(fields))
        (stored, _vm), cancelled = await to_thread_uncancelled(self._store.reserve_update, merged, op, event)
        if stored.id == op.id:
            self._spawn(stored)
        if cancelled:
            raise asyncio.CancelledError
        return stored, kind, fields

    async def delete(self, name: str, request_id: str, with_snapshots: bool = False) -> Operation:
        """
        Delete a VM and free its reservation; with ``with_snapshots`` its snapshots go too.

        A VM that has snapshots is refused at once (FailedPrecondition VM_HAS_SNAPSHOTS) unless
        ``with_snapshots``, so the user learns before an operation is recorded; the agent checks
        again when it deletes (the snapshots may appear in between).
        """
        check_dns_label("name", name)
        vm = await asyncio.to_thread(self._store.get_vm, name)  # NotFound before an operation is recorded
        if not with_snapshots:
            await self._refuse_if_snapshots(vm)
        # the host tells a later listing of that host that this VM is going (FleetStore.reconcile_host)
        params = {"with_snapshots": "1" if with_snapshots else "", "host": vm.host}
        return await self._begin("vm.delete", name, request_id, params, found=True)

    async def _refuse_if_snapshots(self, vm: Vm) -> None:
        name = vm.name
        try:
            snapshots, _policy = await (await self._hosts.client(vm.host)).list_snapshots(name)
        except CloneboxError:
            return  # no answer (agent down, VM not made yet, an older agent): the agent decides
        if snapshots:
            raise FailedPrecondition(
                f"VM {name} has {len(snapshots)} snapshot(s); delete them first, or delete the VM with its "
                "snapshots (clonebox vm delete --with-snapshots)",
                reason="VM_HAS_SNAPSHOTS",
                metadata={"vm": name, "snapshots": str(len(snapshots))},
            )

    # ---- internals ---------------------------------------------------------------------------

    async def _begin(
        self, kind: str, name: str, request_id: str, params: dict[str, str] | None = None, *, found: bool = False
    ) -> Operation:
        """Record operation ``kind`` on VM ``name`` and run it; ``found``: the caller has just read the VM."""
        check_dns_label("name", name)
        if not found:
            await asyncio.to_thread(self._store.get_vm, name)  # NotFound before an operation is recorded
        op = new_operation(kind, f"vms/{name}", request_id, params)
        stored, created = await asyncio.to_thread(self._store.begin_operation, op, _accepted(op))
        if created:
            self._spawn(stored)
        return stored

    def _spawn(
        self,
        op: Operation,
        actor: str | None = None,
        *,
        reserved: Vm | None = None,
        gate: asyncio.Future[None] | None = None,
    ) -> None:
        """Run ``op`` in a task; ``reserved``: the VM record a create's reservation returned (spares a read)."""
        if op.id in self._tasks:
            return
        task = asyncio.create_task(self._run(op, actor or current_actor(), reserved, gate), name=f"op-{op.id}")
        self._tasks[op.id] = task
        task.add_done_callback(lambda _t: self._tasks.pop(op.id, None))

    async def finished_here(self, op_id: str) -> Operation | None:
        """
        The operation once done, when this process runs it; None when it does not (or its task ended unfinished).

        A waiter in this process gets the finished operation from the task that finished it, without reading
        the store; operations other controllers run are waited for through the store (``wait_done``).
        """
        task = self._tasks.get(op_id)
        if task is None:
            return None
        try:
            # shielded: a waiter that goes away must not cancel the operation
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
            return None  # the operation's task was cancelled (the manager is closing): it resumes later
        except Exception:
            return None  # it crashed before its end was stored: the store knows what is true

    async def _finish(self, op: Operation, actor: str, ended: _Outcome, err: CloneboxError | None) -> Operation:
        outcome = Outcome.SUCCEEDED if err is None else Outcome.FAILED
        event = new_event(
            op.kind,
            op.target,
            outcome,
            request_id=op.request_id,
            reason="" if err is None else err.reason,
            details={"operation": op.id, **({} if err is None else {"error": err.message})},
            actor=actor,
        )
        finished = await asyncio.to_thread(
            lambda: self._store.finish_operation(
                op.id, err, event, observed=ended.observed, step=ended.step, revision=ended.revision
            )
        )
        if self._observe_operation is not None:
            self._observe_operation(
                op.kind, str(outcome), (datetime.now(UTC) - (op.create_time or datetime.now(UTC))).total_seconds()
            )
        return finished

    async def _run(
        self, op: Operation, actor: str, reserved: Vm | None = None, gate: asyncio.Future[None] | None = None
    ) -> Operation:
        name = op.target.removeprefix("vms/")
        runners: dict[str, Callable[[Operation, str], Awaitable[_Outcome]]] = {
            "vm.create": lambda o, n: self._do_create(o, n, reserved, gate),
            "vm.start": self._do_start,
            "vm.stop": self._do_stop,
            "vm.delete": self._do_delete,
            "vm.update": self._do_update,
            # an import's stream died with the controller process; see what the agent kept
            "snapshot.import": self._do_import_interrupted,
        }
        owns = op.kind in _OWNING
        if owns:
            self._hosts.own(name)
        recorded: Revision | None = None
        try:
            ended = await runners[op.kind](op, name)
            finished = await self._finish(op, actor, ended, None)
            recorded = ended.revision
            return finished
        except asyncio.CancelledError:
            raise
        except CloneboxError as err:
            log.warning("operation %s (%s %s) failed: %s", op.id, op.kind, name, err)
            return await self._finish(op, actor, _Outcome(), err)
        except Exception as exc:
            log.exception("operation %s crashed", op.id)
            return await self._finish(op, actor, _Outcome(), Internal(f"operation crashed: {exc}"))
        finally:
            if owns:
                self._hosts.disown(name, recorded)

    async def _step(self, op: Operation, step: str, progress: int, vm_state: VmState | None = None) -> None:
        """Record a step; ``vm_state``: the state the VM enters with it, in the same transaction."""
        await asyncio.to_thread(lambda: self._store.update_operation(op.id, step, progress, vm_state=vm_state))

    async def _agent_call(self, client: AgentClient, call: Callable[[AgentClient], Awaitable[T]]) -> T:
        """``call(client)``, tried again while the agent cannot be reached (``agent_retry_seconds``)."""
        # retries are safe: every agent mutation carries the operation id as its request id
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._agent_retry_seconds
        delay = 0.5
        while True:
            try:
                return await call(client)
            except Unavailable:
                if loop.time() + delay > deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, _MAX_RETRY_DELAY)
                # an agent back in a new session is dialled on a new channel (HostRegistry.register); the
                # old one may wait out a long connect back-off. Unreachable meanwhile: the old one is tried.
                with contextlib.suppress(FailedPrecondition):
                    client = await self._hosts.client(client.host)

    async def _do_create(
        self, op: Operation, name: str, reserved: Vm | None = None, gate: asyncio.Future[None] | None = None
    ) -> _Outcome:
        vm = reserved if reserved is not None else await asyncio.to_thread(self._store.get_vm, name)
        if vm.state is VmState.PENDING:
            # reserved without its first step (a create accepted by an older controller, resumed here)
            await self._step(op, _CREATING_STEP.format(host=vm.host), 20, VmState.CREATING)
        try:
            if gate is not None:
                await asyncio.shield(gate)  # the gate's owner may go away; its answer still comes
            client = await self._hosts.client(vm.host)
            created, revision = await self._agent_call(client, lambda c: c.create_vm(vm.spec, op.id))
        except CloneboxError:
            # the agent's create is all-or-nothing, so freeing the reservation leaves nothing behind
            await asyncio.to_thread(self._store.release_vm, name)
            await self._hosts.adopt_released(name)
            raise
        self._hosts.refresh_addresses(created)
        step = created.state.name.lower()
        return _Outcome(observed=dataclasses.replace(created, state_reason=""), step=step, revision=revision)

    async def _do_start(self, op: Operation, name: str) -> _Outcome:
        vm = await asyncio.to_thread(self._store.get_vm, name)
        client = await self._hosts.client(vm.host)
        await self._step(op, f"starting on host {vm.host}", 30)
        started, revision = await self._agent_call(client, lambda c: c.start_vm(name, op.id))
        self._hosts.refresh_addresses(started)
        return _Outcome(observed=dataclasses.replace(started, state_reason=""), revision=revision)

    async def _do_stop(self, op: Operation, name: str) -> _Outcome:
        vm = await asyncio.to_thread(self._store.get_vm, name)
        client = await self._hosts.client(vm.host)
        timeout = int(op.params.get("timeout_seconds") or self._stop_timeout)
        force = bool(op.params.get("force"))
        step = f"stopping (graceful for {timeout}s, then forced)" if not force else "forcing off"
        await self._step(op, step, 30, VmState.STOPPING)
        stopped, revision = await self._agent_call(client, lambda c: c.stop_vm(name, op.id, timeout, force))
        return _Outcome(observed=dataclasses.replace(stopped, addresses=()), revision=revision)

    async def _do_update(self, op: Operation, name: str) -> _Outcome:
        vm = await asyncio.to_thread(self._store.get_vm, name)
        client = await self._hosts.client(vm.host)
        timeout = int(op.params.get("timeout_seconds") or self._stop_timeout)
        await self._step(op, f"updating on host {vm.host}", 30)
        try:
            result = await self._agent_call(client, lambda c: c.update_vm(vm.spec, op.id, timeout))
        except CloneboxError:
            # the agent's update is all-or-nothing: the VM kept its old spec, so the record does too
            previous = op.params.get("previous_spec")
            if previous:
                await asyncio.to_thread(self._store.restore_spec, name, previous)
            raise
        self._hosts.refresh_addresses(result.vm)
        step = "restarted" if result.restarted else "updated"
        return _Outcome(observed=result.vm, step=step, revision=result.revision)

    async def _do_delete(self, op: Operation, name: str) -> _Outcome:
        try:
            vm = await asyncio.to_thread(self._store.get_vm, name)
        except NotFound:
            return _Outcome()  # a resumed delete whose release already committed
        client = await self._hosts.client(vm.host)
        await self._step(op, f"deleting on host {vm.host}", 30, VmState.DELETING)
        with_snapshots = bool(op.params.get("with_snapshots"))
        try:
            await self._agent_call(client, lambda c: c.delete_vm(name, op.id, with_snapshots))
        except FailedPrecondition:
            # refused before anything was removed (e.g. VM_HAS_SNAPSHOTS): the VM is as it was, and a
            # DELETING record would hide its events from the fleet view
            await asyncio.to_thread(self._store.update_vm_observed, name, vm.state, None, None, vm.state_reason)
            raise
        await asyncio.to_thread(self._store.release_vm, name)
        await self._hosts.adopt_released(name, deleted_on=vm.host)
        return _Outcome()

    async def _do_import_interrupted(self, op: Operation, name: str) -> _Outcome:
        """
        Finish an import whose controller process ended mid-stream.

        The stream to the agent ended with the process, so the agent either committed the VM before
        that or kept nothing: record the VM, or release the reservation.
        """
        try:
            vm = await asyncio.to_thread(self._store.get_vm, name)
        except NotFound:
            raise Aborted(f"import of {name} was interrupted; nothing was kept", reason="IMPORT_INTERRUPTED") from None
        client = await self._hosts.client(vm.host)
        try:
            found = await self._agent_call(client, lambda c: c.get_vm(name))
        except NotFound:
            await asyncio.to_thread(self._store.release_vm, name)
            await self._hosts.adopt_released(name)
            raise Aborted(
                f"import of {name} was interrupted by a controller restart; nothing was kept (import it again)",
                reason="IMPORT_INTERRUPTED",
            ) from None
        return _Outcome(observed=found)

    async def drain(self, host: str, request_id: str, wait_seconds: float = 600.0) -> list[str]:
        """Cordon ``host`` and stop every VM running on it; returns the names stopped."""
        check_dns_label("name", host)
        accepted = new_event("host.drain", f"hosts/{host}", Outcome.ACCEPTED, request_id=request_id)
        await asyncio.to_thread(self._store.set_cordoned, host, True, accepted)
        running = [v for v in await asyncio.to_thread(self._store.vms_on_host, host) if v.state == VmState.RUNNING]
        ops = [await self.stop(v.name, f"{request_id}/{v.name}" if request_id else "", 0, False) for v in running]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_seconds
        failed: list[str] = []
        for started in ops:
            op = started
            while not op.done and loop.time() < deadline:
                await asyncio.sleep(0.2)
                op = await asyncio.to_thread(self._store.get_operation, op.id)
            if op.error_code or not op.done:
                log.warning("drain of %s: %s failed: %s", host, op.target, op.error_message or "timed out")
                failed.append(op.target.removeprefix("vms/"))
        outcome = (
            Outcome.SUCCEEDED if not failed else Outcome.PARTLY_FAILED if len(failed) < len(ops) else Outcome.FAILED
        )
        done = new_event(
            "host.drain",
            f"hosts/{host}",
            outcome,
            request_id=request_id,
            details={"stopped": len(ops) - len(failed), "failed": ",".join(failed)},
        )
        await asyncio.to_thread(self._store.append_audit, [done])
        return [v.name for v in running]


#: secret.access events the controller records: the client resolved the reference on its machine
_BY_CLIENT = {"resolved_by": "client"}


def _secret_accesses(spec: VmSpec, request_id: str) -> list[AuditEvent]:
    """One ``secret.access`` event per reference the client resolved for ``spec`` (names, never values)."""
    if spec.auth is None:
        return []
    events = []
    for i, text in enumerate(spec.auth.secret_refs):
        ref = SecretRef.parse(text, field=f"spec.auth.secret_refs[{i}]")
        events.append(secret_access_event(ref, resource=f"vms/{spec.name}", request_id=request_id, details=_BY_CLIENT))
    return events
