"""The agent's use cases: VM lifecycle with idempotency, graceful stop, and the event history.

Transport-free: the gRPC servicer converts messages and calls these methods; the hypervisor adapter
does the libvirt work. Mutations of one VM are serialized by a per-name lock (one agent per host, so a
process-local lock is correct here); outcomes are journalled by request id so retries never repeat work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from clonebox_agent.app.events import EventLog, VmEvent, VmEventType
from clonebox_agent.app.keystore import KeyStore
from clonebox_agent.app.probes import ScriptPolicy, check_script_probes
from clonebox_agent.app.recovery import Recovery, Rollback
from clonebox_agent.journal.store import Journal, JournalStepLog, TxnState
from clonebox_agent.ports import (
    DomainRecord,
    EventKind,
    Hypervisor,
    HypervisorEvent,
    commit_point_undo,
    stopped_undo,
)
from clonebox_core import specjson
from clonebox_core.audit.event import SYSTEM_ACTOR, AuditEvent, Outcome, new_event
from clonebox_core.errors import (
    AlreadyExists,
    CloneboxError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    invalid_field,
)
from clonebox_core.model import (
    CreatePlan,
    HostInfo,
    Orphan,
    Resources,
    Revision,
    Transaction,
    TransactionState,
    Vm,
    VmSpec,
    VmState,
    Volume,
)
from clonebox_core.names import check_dns_label
from clonebox_core.plan import ChangeKind, UpdateResult, classify, needs_replace_error
from clonebox_core.secret import Secret
from clonebox_core.secrets.providers import SecretRef, secret_access_event
from clonebox_core.validate import PASSWORD_HASH, PUBLIC_KEY, validate_resolved, validate_spec, validate_volume

log = logging.getLogger(__name__)

_POLL_SECONDS = 0.25
#: how long an answer waits for the hypervisor events delivered before it to be logged
_SETTLE_SECONDS = 1.0


@dataclass(frozen=True)
class StopResult:
    """Outcome of a stop."""

    vm: Vm
    forced: bool


#: the states in which a VM is off: a stop leaves it alone, an update only redefines it
_OFF = (VmState.STOPPED, VmState.CRASHED)


def _audit_details(outcome: dict[str, object]) -> dict[str, object]:
    details: dict[str, object] = {}
    if "kind" in outcome:
        details["change"] = outcome["kind"]
    changed_fields = outcome.get("fields")
    if isinstance(changed_fields, list):
        details["fields"] = ",".join(str(f) for f in changed_fields)
    if "restarted" in outcome:
        details["restarted"] = outcome["restarted"]
    if "forced" in outcome:
        details["forced"] = outcome["forced"]
    removed = outcome.get("removed")
    if isinstance(removed, list):
        details["removed_files"] = len(removed)
    snapshots = outcome.get("snapshots")
    if isinstance(snapshots, list):
        details["snapshots"] = ", ".join(str(s) for s in snapshots)
    return details


_NO_SECRET = Secret("")
#: replaces the user's authorized_keys with standard input, atomically; "$1" is the user. POSIX sh and
#: awk only (busybox guests have no getent)
_SET_KEYS = """set -eu
u="$1"
home=$(awk -F: -v u="$u" '$1 == u { print $6 }' /etc/passwd)
[ -n "$home" ] || { echo "no user $u in /etc/passwd" >&2; exit 3; }
umask 077
mkdir -p "$home/.ssh"
cat > "$home/.ssh/authorized_keys.clonebox-new"
chown "$u" "$home/.ssh" "$home/.ssh/authorized_keys.clonebox-new"
chmod 700 "$home/.ssh"
chmod 600 "$home/.ssh/authorized_keys.clonebox-new"
mv -f "$home/.ssh/authorized_keys.clonebox-new" "$home/.ssh/authorized_keys"
"""

#: marks cloud-init's current instance as kept whatever datasource the next boot finds (no-op without it)
_KEEP_INSTANCE = "[ ! -d /var/lib/cloud/instance ] || touch /var/lib/cloud/instance/manual-clean"

#: cloud-init writes this when every stage has run (``cloud-init status --wait`` waits for it)
CLOUD_INIT_DONE = "/run/cloud-init/result.json"


def _detaches_seed(spec: VmSpec) -> bool:
    return spec.cloud_init is not None and spec.cloud_init.detach_seed_after_boot


def _describe(exc: BaseException) -> str:
    if isinstance(exc, CloneboxError):
        return f"{exc.code} {exc.reason}: {exc.message}"
    return f"{type(exc).__name__}: {exc}"


def _update_outcome(kind: ChangeKind, fields: tuple[str, ...], restarted: bool, forced: bool) -> dict[str, object]:
    """What the journal keeps of an update's answer (a retry with its request id gets it back)."""
    return {"kind": kind.value, "fields": list(fields), "restarted": restarted, "forced": forced}


class AgentService:
    """VM lifecycle on one host."""

    def __init__(
        self,
        host_name: str,
        hypervisor: Hypervisor,
        journal: Journal,
        *,
        reserve: Resources,
        stop_timeout_seconds: int,
        event_history: int = 10_000,
        cpu_allocation_ratio: float = 1.0,
        step_hook: Callable[[str], None] | None = None,
        keys: KeyStore | None = None,
        seed_poll_seconds: float = 5.0,
        scripts: ScriptPolicy | None = None,
    ) -> None:
        """
        ``step_hook`` sees the service's own named steps (``create:commit``); fault tests use it.

        ``keys`` keeps the SSH key pairs generated for version-2 specs that name no key (without it,
        such a spec is refused). ``scripts`` says which host executables ``script`` health checks may
        name (without it, the agent has no ``probe_scripts_dir`` and such checks are refused).
        """
        self._scripts = scripts
        self._step_hook = step_hook
        self._keys = keys
        #: VMs whose seed goes once cloud-init reports done (``cloud_init.detach_seed_after_boot``)
        self._seed_pending: set[str] = set()
        self._seed_poll = seed_poll_seconds
        self._seed_wake = asyncio.Event()
        self._seed_task: asyncio.Task[None] | None = None
        self.recovery = Recovery(journal, hypervisor, host_name)
        #: what recovery rolled back when this service started
        self.recovered: list[Rollback] = []
        self.host_name = host_name
        self._hv = hypervisor
        self._journal = journal
        self._reserve = reserve
        self._stop_timeout = stop_timeout_seconds
        self._cpu_ratio = cpu_allocation_ratio
        self.events = EventLog(journal.next_epoch(), event_history)
        self._locks: dict[str, asyncio.Lock] = {}
        #: serializes volume creates and deletes (the adapters check attachments against VM creates)
        self._volume_lock = asyncio.Lock()
        self._known: dict[str, Vm] = {}
        self._event_queue: asyncio.Queue[HypervisorEvent] = asyncio.Queue()
        self._event_task: asyncio.Task[None] | None = None
        #: creates and updates that outlive a cancelled caller (strong references: asyncio keeps only weak ones)
        self._background: set[asyncio.Task[Any]] = set()

    # ---- lifecycle of the service itself -------------------------------------------------------

    async def start(self) -> None:
        """Connect the hypervisor, learn the current VMs, and start consuming its events."""
        await self._hv.open(self._event_queue.put_nowait)
        try:
            # before anything is served: transactions a crash cut short are rolled back first
            self.recovered = await self.recovery.roll_back_open()
            for record in await self._hv.list():
                self._known[record.name] = self._to_vm(record)
                if _detaches_seed(record.spec):
                    self._seed_pending.add(record.name)  # detach_seed is a no-op once it is gone
            if self._keys is not None:
                # keys of creates a crash cut short (rolled back above) or of VMs deleted behind our back
                for path in await asyncio.to_thread(self._keys.sweep, list(self._known)):
                    log.info("removed generated SSH key of a VM that does not exist: %s", path)
        except CloneboxError as exc:
            # the agent still starts (and reports NOT_SERVING) when libvirt is down
            log.warning("initial listing failed: %s", exc)
        self._event_task = asyncio.create_task(self._consume_events(), name="hypervisor-events")
        self._seed_task = asyncio.create_task(self._watch_seeds(), name="seed-detach")

    async def close(self) -> None:
        """Let running creates finish (bounded), stop consuming events, end watches and disconnect."""
        if self._background:
            # what does not finish in time is rolled back by recovery at the next start
            await asyncio.wait(set(self._background), timeout=30)
        for task in (self._event_task, self._seed_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self.events.close()
        await self._hv.close()

    # ---- queries -------------------------------------------------------------------------------

    async def host_info(self) -> HostInfo:
        """Host capacity and hypervisor; allocatable is capacity (vCPUs times the ratio) minus the reserve."""
        info = await self._hv.host_info()
        offered = Resources(
            int(info.capacity.vcpus * self._cpu_ratio), info.capacity.memory_mib, info.capacity.disk_mib
        )
        room = offered - self._reserve
        allocatable = Resources(max(room.vcpus, 0), max(room.memory_mib, 0), max(room.disk_mib, 0))
        return replace(info, name=self.host_name, allocatable=allocatable)

    async def get(self, name: str) -> Vm:
        """One VM, with guest addresses when it runs."""
        check_dns_label("name", name)
        record = await self._hv.get(name)
        if record.state == VmState.RUNNING and not record.addresses:
            record = replace(record, addresses=await self._hv.addresses(name))
        vm = self._to_vm(record)
        self._known[name] = vm
        return vm

    async def list_vms(self) -> tuple[list[Vm], Revision]:
        """Every VM the agent owns (one bulk call) and the revision it is consistent with."""
        revision = self.events.revision
        vms = [self._to_vm(r) for r in await self._hv.list()]
        for vm in vms:
            self._known[vm.name] = vm
        return vms, revision

    async def answer(self, vm: Vm) -> tuple[Vm, Revision | None]:
        """
        What an answer about a change of ``vm`` carries: the VM as the hypervisor has it now, and a revision.

        The revision is taken once every hypervisor event delivered so far is in the log, and the VM's
        state is read from the hypervisor after that, so the answer is at least as new as every event
        up to the revision: a watcher that recorded the answer may skip those
        (``CreateVmResponse.revision`` and the like). Events logged later have later revisions and
        are news, in the order the hypervisor delivered them. The wait is bounded: a consumer that is
        not running (the service starting or closing) must not hold the answer. No revision when the
        VM is gone by then: its events must all still count.
        """
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event_queue.join(), _SETTLE_SECONDS)
        revision = self.events.revision
        try:
            now = await self._hv.get(vm.name)
        except NotFound:
            return vm, None
        addresses = vm.addresses if now.state is VmState.RUNNING else ()
        return replace(vm, state=now.state, state_reason=now.state_reason, addresses=addresses), revision

    def watch(self, after: Revision | None) -> AsyncIterator[VmEvent]:
        """Lifecycle events after ``after``; REVISION_EXPIRED when it is too old or from another epoch."""
        return self.events.watch(after)

    # ---- mutations -----------------------------------------------------------------------------

    async def create(self, spec: VmSpec, *, request_id: str, start: bool = True) -> Vm:
        """Create (and start) a VM. A retry with the same request id, or the same name and spec, returns it.

        Once started, a create runs to its end (commit or rollback) even if the caller goes away: a
        cancelled RPC must never leave a VM made behind a "rolled back" record. The retry finds it.
        """
        self._check_spec(spec)
        task = asyncio.create_task(self._create_locked(spec, request_id, start), name=f"create-{spec.name}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return await asyncio.shield(task)

    def _check_spec(self, spec: VmSpec) -> None:
        """The checks of a spec that need this agent's settings and files, before anything is made."""
        validate_resolved(spec)
        # a script check names an executable of this host: it must exist now, not fail at every run
        check_script_probes(self._scripts, spec.health_checks)

    async def _create_locked(self, spec: VmSpec, request_id: str, start: bool) -> Vm:
        async with self._lock(spec.name):
            if request_id and await self._replay(request_id, "create", spec.name) is not None:
                return await self.get(spec.name)
            try:
                existing = await self._hv.get(spec.name)
            except NotFound:
                existing = None
            if existing is not None:
                if not specjson.matches_at_rest(existing.spec, spec):
                    raise AlreadyExists(
                        f"VM {spec.name!r} exists on host {self.host_name} with a different spec",
                        reason="VM_ALREADY_EXISTS",
                    )
                vm = self._to_vm(existing)
                await self._remember(request_id, "create", spec.name, {})
            else:
                vm = self._to_vm(await self._create_transaction(spec, request_id, start))
            self._known[vm.name] = vm
            if _detaches_seed(spec):
                self._seed_pending.add(vm.name)
                self._seed_wake.set()
            return vm

    async def _create_transaction(self, spec: VmSpec, request_id: str, start: bool) -> DomainRecord:
        """Create as a journaled transaction: committed with the request's outcome, or rolled back."""
        txn_id = uuid.uuid4().hex
        await asyncio.to_thread(self._journal.begin_txn, txn_id, "vm.create", spec.name, request_id)
        steps = JournalStepLog(self._journal, txn_id)
        public_key = await self._generate_key(spec)
        try:
            record = await self._hv.create(spec, start=start, steps=steps, ssh_public_key=public_key)
        except BaseException as exc:
            # the adapter has undone its steps already; the transaction keeps the error
            await self._drop_key(spec.name, public_key)
            await asyncio.to_thread(self._journal.finish_txn, txn_id, TxnState.ROLLED_BACK, _describe(exc))
            raise
        try:
            if self._step_hook is not None:
                self._step_hook("create:commit")
            event = self._event("create", spec.name, request_id, {"transaction": txn_id})
            outcome: tuple[str, str, str, dict[str, object]] = (request_id, "create", spec.name, {})
            await asyncio.to_thread(self._journal.finish_txn, txn_id, TxnState.COMMITTED, outcome=outcome, audit=event)
        except BaseException as exc:
            # made, but not on record: take it all back rather than leave a VM no record explains
            await self.recovery.roll_back(txn_id, error=_describe(exc))
            await self._drop_key(spec.name, public_key)
            raise
        return record

    async def _generate_key(self, spec: VmSpec) -> str:
        """The public key of a new per-VM key pair when ``spec`` names no key ('' otherwise)."""
        if spec.auth is None or not spec.auth.needs_generated_key:
            return ""
        if self._keys is None:
            raise FailedPrecondition(
                f"VM {spec.name}: its spec names no SSH key and this agent keeps no generated keys",
                reason="SSH_KEY_STORE_MISSING",
                metadata={"vm": spec.name},
            )
        return await asyncio.to_thread(self._keys.generate, spec.name)

    async def _drop_key(self, name: str, public_key: str) -> None:
        if public_key and self._keys is not None:
            await asyncio.to_thread(self._keys.remove, name)

    async def ssh_key(self, name: str, *, actor: str = "") -> Secret:
        """
        The private key generated for ``name``; each read is a ``secret.access`` audit event.

        The event is in the journal outbox before the key is returned: a read that cannot be audited
        does not happen.
        """
        check_dns_label("name", name)
        if self._keys is None:
            raise NotFound(f"VM {name} has no generated SSH key", reason="SSH_KEY_NOT_FOUND", metadata={"vm": name})
        key = await asyncio.to_thread(self._keys.read, name)
        event = secret_access_event(
            SecretRef("generated-ssh-key", name),
            provider="agent-keystore",
            resource=f"hosts/{self.host_name}/vms/{name}",
            actor=actor or None,
            origin=f"agent/{self.host_name}",
        )
        await asyncio.to_thread(self._journal.add_events, [event])
        return key

    async def plan_create(self, spec: VmSpec, *, start: bool = True) -> CreatePlan:
        """The steps and domain XML a create of ``spec`` would use, after the same checks; nothing is made."""
        self._check_spec(spec)
        plan = await self._hv.plan_create(spec, start=start)
        return replace(plan, host=self.host_name)

    async def start_vm(self, name: str, *, request_id: str, actor: str | None = None) -> Vm:
        """Start a stopped VM; a running one is returned as it is (``actor``: who, outside an RPC)."""
        check_dns_label("name", name)
        async with self._lock(name):
            vm = self._to_vm(await self._hv.start(name))
            await self._remember(request_id, "start", name, {}, actor=actor)
            return vm

    async def stop(
        self, name: str, *, request_id: str, timeout_seconds: int = 0, force: bool = False, actor: str | None = None
    ) -> StopResult:
        """Graceful shutdown, forced off after the timeout (or at once with ``force``; ``actor`` as in start_vm)."""
        check_dns_label("name", name)
        timeout = timeout_seconds or self._stop_timeout
        async with self._lock(name):
            if request_id and (done := await self._replay(request_id, "stop", name)) is not None:
                return StopResult(await self.get(name), bool(done.get("forced")))
            forced = await self._power_off(name, timeout, force=force)
            vm = self._to_vm(await self._hv.get(name))
            await self._remember(request_id, "stop", name, {"forced": forced}, actor=actor)
            return StopResult(vm, forced)

    async def _power_off(self, name: str, timeout: float, *, force: bool = False) -> bool:
        """Turn VM ``name`` off: ACPI/guest-agent shutdown, forced off after ``timeout`` s (at once with ``force``).

        The one stop logic (``stop`` and the restart of an update). True when it was forced; a VM that is off
        already is left alone. The caller holds the VM's lock.
        """
        record = await self._hv.get(name)
        if record.state in _OFF:
            return False
        if not force:
            await self._hv.shutdown(name)
            if await self._wait_stopped(name, timeout):
                return False
            log.info("vm %s ignored shutdown for %ss; forcing off", name, timeout)
        await self._hv.destroy(name)
        return True

    async def update(
        self, spec: VmSpec, *, request_id: str, timeout_seconds: int = 0, dry_run: bool = False
    ) -> UpdateResult:
        """Change VM ``spec.name`` to ``spec`` without re-creating it; what it took.

        The VM's kept spec is compared with ``spec`` (``clonebox_core.plan.classify``):

        - NONE: the VM is returned as it is (an equal spec is a no-op);
        - IN_PLACE (labels, health checks): only the kept spec changes, the guest is not touched;
        - RESTART (vCPUs, memory): the definition is changed; a running VM is shut down gracefully (ACPI or
          qemu-ga, forced off after ``timeout_seconds``, 0: the agent's stop timeout; the same logic as
          ``stop``) and started again (``restarted``, ``forced``), a stopped one only redefined;
        - REPLACE (anything else): FailedPrecondition ``VM_UPDATE_NEEDS_REPLACE`` naming the fields; nothing
          changes.

        The spec the VM keeps afterwards is its current one with only labels, health checks, vCPUs and
        memory taken from ``spec`` (``ports.UPDATE_FIELDS``): stored secrets and digests, disks, addresses
        and everything else stay as they were. The new values are validated as a create validates them
        (InvalidArgument naming the field); vCPUs or memory beyond this host's are refused the same way.
        ``dry_run``: classify and validate only. Idempotent under ``request_id`` (a retry returns the
        recorded answer and does nothing) and under an equal spec. Holds the VM's lock, so it is serialized
        with every other change of the VM (a snapshot restore included). A change ends with a ``MODIFIED``
        VM event carrying the new spec (``WatchVms``, the health monitor's checks).

        A change is a journaled transaction ``vm.update``; once started it runs to its end (commit or
        rollback) even if the caller goes away. Its steps, and what recovery does after a crash at each
        point (the VM ends with the old or the new definition, running again if it ran before):

        1. ``stop`` (only when a RESTART finds the VM running), recorded before the shutdown (its undo
           starts the domain again only if it is stopped): a crash while it shuts down or after it is off
           -> started again on the old definition. A guest still in the middle of its shutdown when the
           restarted agent recovers finishes it and stays off (nothing can tell that it would).
        2. ``redefine`` (the adapter, see ``Hypervisor.update``): a crash after it -> the old values are put
           back (and the VM started again by step 1's undo).
        3. the start, then ``retire``, the commit point: a crash after it -> recovery finishes the
           transaction (the VM runs on the new definition). Between the start and ``retire`` the rollback
           keeps the new definition the guest already runs on (``redefine``'s undo leaves it).
        4. the commit with the request's outcome and its ``vm.update`` audit event (one SQLite transaction).

        After a crash the request's outcome is not recorded: a retry with the same request id runs again
        and finds either the old spec (and does the change) or the new one (kind NONE). An error (not a
        crash) rolls back the same way: e.g. a VM that does not start with the new values is put back on
        the old ones and started again, and the error is raised.
        """
        # auth is compared by classify on its public parts and never changed by an update; its hash may
        # come as the digest the agent keeps, which is not a hash a create would take
        validate_spec(replace(spec, auth=None))
        check_script_probes(self._scripts, spec.health_checks)
        if dry_run:
            async with self._lock(spec.name):
                record = await self._hv.get(spec.name)
                kind, fields = await self._classify_update(record, spec)
                return UpdateResult(await self.get(spec.name), kind, fields)
        task = asyncio.create_task(
            self._update_locked(spec, request_id, timeout_seconds or self._stop_timeout), name=f"update-{spec.name}"
        )
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return await asyncio.shield(task)

    async def _update_locked(self, spec: VmSpec, request_id: str, timeout: float) -> UpdateResult:
        name = spec.name
        async with self._lock(name):
            if request_id and (done := await self._replay(request_id, "update", name)) is not None:
                fields_before = done.get("fields", [])
                return UpdateResult(
                    await self.get(name),
                    ChangeKind(str(done.get("kind", ChangeKind.NONE.value))),
                    tuple(str(f) for f in fields_before) if isinstance(fields_before, list) else (),
                    bool(done.get("restarted")),
                    bool(done.get("forced")),
                )
            record = await self._hv.get(name)
            kind, fields = await self._classify_update(record, spec)
            if kind is ChangeKind.NONE:
                await self._remember(request_id, "update", name, _update_outcome(kind, fields, False, False))
                return UpdateResult(await self.get(name), kind, fields)
            restarted, forced = await self._update_transaction(record, spec, kind, fields, request_id, timeout)
            vm = await self.get(name)
            # the same kind of event a lifecycle change makes: watchers (the controller's fleet view) and the
            # health monitor (which runs the checks of the spec it sees) take the new spec from it
            self.events.append(VmEventType.MODIFIED, vm, "updated")
            return UpdateResult(vm, kind, fields, restarted, forced)

    async def _classify_update(self, record: DomainRecord, spec: VmSpec) -> tuple[ChangeKind, tuple[str, ...]]:
        """What changing ``record`` to ``spec`` takes; REPLACE and values beyond this host are refused."""
        kind, fields = classify(record.spec, spec)
        if kind is ChangeKind.REPLACE:
            raise needs_replace_error(spec.name, fields)
        if kind is ChangeKind.RESTART:
            info = await self._hv.host_info()
            cpus, memory = info.capacity.vcpus, info.capacity.memory_mib
            if "vcpus" in fields and cpus and spec.vcpus > cpus:
                raise invalid_field(
                    "spec.vcpus", f"{spec.vcpus} vCPUs is more than host {self.host_name} has ({cpus} CPUs)"
                )
            if "memory_mib" in fields and memory and spec.memory_mib > memory:
                raise invalid_field(
                    "spec.memory_mib",
                    f"{spec.memory_mib} MiB is more memory than host {self.host_name} has ({memory} MiB)",
                )
        return kind, fields

    async def _update_transaction(
        self,
        record: DomainRecord,
        spec: VmSpec,
        kind: ChangeKind,
        fields: tuple[str, ...],
        request_id: str,
        timeout: float,
    ) -> tuple[bool, bool]:
        """The journaled change of ``update`` (see its steps there); (restarted, forced)."""
        name = record.name
        txn_id = uuid.uuid4().hex
        await asyncio.to_thread(self._journal.begin_txn, txn_id, "vm.update", name, request_id)
        steps = JournalStepLog(self._journal, txn_id)
        restart = kind is ChangeKind.RESTART and record.state not in _OFF
        forced = False
        try:
            if restart:
                n = await asyncio.to_thread(steps.planned, "stop", stopped_undo(self._hv.domain_name(name)))
                # before it acts: the undo starts only a stopped domain, so a crash mid-shutdown is undone too
                await asyncio.to_thread(steps.made, n, {"uuid": record.uuid})
                forced = await self._power_off(name, timeout)
                self._hook("update:stopped")
            await self._hv.update(name, spec, steps=steps)
            if restart:
                await self._hv.start(name)
                self._hook("update:started")
                n = await asyncio.to_thread(steps.planned, "retire", commit_point_undo(name))
                await asyncio.to_thread(steps.made, n, {"uuid": record.uuid})
            self._hook("update:commit")
            outcome = _update_outcome(kind, fields, restart, forced)
            details = {**_audit_details(outcome), "transaction": txn_id}
            event = self._event("update", name, request_id, details)
            await asyncio.to_thread(
                self._journal.finish_txn,
                txn_id,
                TxnState.COMMITTED,
                outcome=(request_id, "update", name, outcome),
                audit=event,
            )
        except BaseException as exc:
            # before the commit point the old definition comes back (and a stopped VM starts again); past it
            # recovery finishes the transaction
            await self.recovery.roll_back(txn_id, error=_describe(exc))
            raise
        return restart, forced

    def _hook(self, step: str) -> None:
        if self._step_hook is not None:
            self._step_hook(step)

    async def delete(self, name: str, *, request_id: str, with_snapshots: bool = False) -> list[str]:
        """Delete a VM and every file made for it. Deleting a VM that is already gone is a success.

        A VM with snapshots is refused (FailedPrecondition ``VM_HAS_SNAPSHOTS``) unless ``with_snapshots``:
        snapshots are often the only copy of an earlier state, so losing them takes an explicit yes.
        """
        # names become paths in the adapters: never let one climb out of the storage folder
        check_dns_label("name", name)
        async with self._lock(name):
            if request_id and (done := await self._replay(request_id, "delete", name)) is not None:
                removed_before = done.get("removed", [])
                return [str(p) for p in removed_before] if isinstance(removed_before, list) else []
            try:
                snapshots = [s.name for s in await self._hv.list_snapshots(name)]
            except NotFound:
                snapshots = []
            if snapshots and not with_snapshots:
                shown = ", ".join(snapshots[:5]) + (", ..." if len(snapshots) > 5 else "")
                raise FailedPrecondition(
                    f"VM {name} has {len(snapshots)} snapshot(s) ({shown}): delete them with the VM "
                    "(--with-snapshots), or export the one to keep first (--keep-export)",
                    reason="VM_HAS_SNAPSHOTS",
                    metadata={"vm": name, "snapshots": str(len(snapshots))},
                )
            try:
                # the adapter's delete drops the snapshots (and their metadata) with the domain
                removed = await self._hv.delete(name)
            except NotFound:
                if not request_id:
                    raise
                removed = []
            if self._keys is not None and (key_path := await asyncio.to_thread(self._keys.remove, name)):
                removed.append(key_path)
            self._seed_pending.discard(name)
            outcome: dict[str, object] = {"removed": removed}
            if snapshots:
                outcome["snapshots"] = snapshots
            event = self._event("delete", name, request_id, _audit_details(outcome))
            # the journal's snapshot rows and policy go in the same transaction as the outcome
            await asyncio.to_thread(
                self._journal.record, request_id, "delete", name, outcome, event, forget_snapshots=(name, None)
            )
            return removed

    # ---- volumes -------------------------------------------------------------------------------

    async def create_volume(
        self, name: str, size_mib: int, *, shared: bool = False, labels: dict[str, str] | None = None, request_id: str
    ) -> Volume:
        """Make volume ``name`` (see ``Hypervisor.create_volume``: idempotent by name, size and shared flag).

        A retry with the same request id returns the volume as it is now. Audited as ``volume.create``.
        """
        items = tuple(sorted((labels or {}).items()))
        validate_volume(name, size_mib, items)
        async with self._volume_lock:
            if request_id and await self._replay(request_id, "create_volume", name) is not None:
                found = [v for v in await self._hv.list_volumes() if v.name == name]
                if found:
                    return found[0]
            volume = await self._hv.create_volume(name, size_mib, shared=shared, labels=dict(items))
            details: dict[str, object] = {"size_mib": size_mib, "shared": shared}
            event = self._volume_event("create", name, request_id, details)
            await asyncio.to_thread(self._journal.record, request_id, "create_volume", name, {}, event)
            return volume

    async def delete_volume(self, name: str, *, request_id: str) -> list[str]:
        """Remove volume ``name`` and its data (VOLUME_IN_USE while a VM attaches it); audited as ``volume.delete``.

        NotFound ``VOLUME_NOT_FOUND`` when there is none, also for a retry of a delete that was done: callers
        treat it as done.
        """
        check_dns_label("name", name)
        async with self._volume_lock:
            if request_id and (done := await self._replay(request_id, "delete_volume", name)) is not None:
                removed_before = done.get("removed", [])
                return [str(p) for p in removed_before] if isinstance(removed_before, list) else []
            removed = await self._hv.delete_volume(name)
            event = self._volume_event("delete", name, request_id, {"removed_files": len(removed)})
            outcome: dict[str, object] = {"removed": removed}
            await asyncio.to_thread(self._journal.record, request_id, "delete_volume", name, outcome, event)
            return removed

    async def list_volumes(self) -> list[Volume]:
        """The volumes of this host, by name, each with the VMs attaching it."""
        return await self._hv.list_volumes()

    def _volume_event(self, method: str, name: str, request_id: str, details: dict[str, object]) -> AuditEvent:
        return new_event(
            f"volume.{method}",
            f"hosts/{self.host_name}/volumes/{name}",
            Outcome.SUCCEEDED,
            request_id=request_id,
            origin=f"agent/{self.host_name}",
            details=details,
        )

    def vm_lock(self, name: str) -> asyncio.Lock:
        """The lock that serializes changes of VM ``name`` (snapshot use cases share it with lifecycle ones)."""
        return self._lock(name)

    @property
    def journal(self) -> Journal:
        """The agent's journal (the snapshot use cases keep their records in it too)."""
        return self._journal

    # ---- recovery ------------------------------------------------------------------------------

    async def transactions(self, *, include_committed: bool = False, limit: int = 100) -> list[Transaction]:
        """Recent journaled transactions, newest first (open and rolled back unless committed are asked for)."""
        found = await asyncio.to_thread(self._journal.txns, limit=limit if include_committed else 10_000)
        kept = [t for t in found if include_committed or t.state != TransactionState.COMMITTED][:limit]
        return [replace(t, host=self.host_name) for t in kept]

    async def recover(self, *, sweep: bool) -> tuple[list[Transaction], list[Orphan]]:
        """Roll back open transactions not in progress, then report (or with ``sweep`` remove) orphans.

        Transactions of VMs whose lock is held are running right now, not interrupted: they are left.
        """
        busy = {name for name, lock in self._locks.items() if lock.locked()}
        rolled: list[Transaction] = []
        for txn in await asyncio.to_thread(self._journal.txns, state=TransactionState.OPEN, limit=10_000):
            if txn.target in busy:
                continue
            async with self._lock(txn.target):
                if await self.recovery.roll_back(txn.id) is not None:
                    done = await asyncio.to_thread(self._journal.txn, txn.id)
                    if done is not None:
                        rolled.append(replace(done, host=self.host_name))
        report = await self.recovery.sweep(remove=sweep)
        orphans = [
            Orphan(self.host_name, vm, tuple(report.removed.get(vm, paths)), vm in report.removed)
            for vm, paths in sorted(report.orphans.items())
        ]
        return rolled, orphans

    # ---- secret rotation -----------------------------------------------------------------------

    async def rotate_secret(
        self,
        name: str,
        *,
        request_id: str,
        password_hash: Secret = _NO_SECRET,
        expire_password: bool = False,
        keys: tuple[str, ...] = (),
        replace_keys: bool = False,
    ) -> tuple[str, list[str]]:
        """
        Set a new password hash and/or key set for the VM's login user, inside the running guest.

        Through qemu-ga: ``chpasswd -e`` reads ``user:HASH`` on its standard input (never a command
        line, which other guest processes can read), ``passwd --expire`` for a one-time password, and
        the user's ``authorized_keys`` is replaced atomically. Returns the user and what changed.
        """
        check_dns_label("name", name)
        hash_text = password_hash.reveal()
        if hash_text and not PASSWORD_HASH.fullmatch(hash_text):
            raise invalid_field("password_hash", "is not a SHA-512-crypt hash ($6$...): send a hash, never a password")
        for i, line in enumerate(keys):
            if not PUBLIC_KEY.fullmatch(line):
                raise invalid_field(f"ssh_authorized_keys[{i}]", "is not an OpenSSH public key line")
        if not hash_text and not replace_keys:
            raise invalid_field("password_hash", "nothing to rotate: give a password hash or a key set")
        if expire_password and not hash_text:
            raise invalid_field("expire_password", "expires the new password: give password_hash too")
        async with self._lock(name):
            if request_id and (done := await self._replay(request_id, "rotate_secret", name)) is not None:
                changed_before = done.get("changed", [])
                return str(done.get("user", "")), [str(c) for c in changed_before] if isinstance(
                    changed_before, list
                ) else []
            record = await self._hv.get(name)
            auth = record.spec.auth
            if auth is None:
                raise FailedPrecondition(
                    f"VM {name} has no login user managed by clonebox (a version 1 spec): nothing to rotate",
                    reason="NO_MANAGED_LOGIN",
                    metadata={"vm": name},
                )
            changed: list[str] = []
            if hash_text:
                await self._guest_run(
                    name, ["chpasswd", "-e"], f"{auth.user}:{hash_text}\n".encode(), "set the password"
                )
                if expire_password:
                    await self._guest_run(name, ["passwd", "--expire", auth.user], b"", "expire the password")
                changed.append("password")
            if replace_keys:
                stdin = "".join(f"{line}\n" for line in keys).encode()
                await self._guest_run(
                    name, ["/bin/sh", "-c", _SET_KEYS, "clonebox-rotate", auth.user], stdin, "set the keys"
                )
                changed.append("keys")
            await self._remember(request_id, "rotate_secret", name, {"user": auth.user, "changed": changed})
            return auth.user, changed

    async def _guest_run(self, name: str, argv: list[str], stdin: bytes, what: str) -> None:
        result = await self._hv.guest_exec(name, argv, stdin=stdin, timeout=60)
        if result.exit_code != 0:
            # stderr of these tools names users and lines, never what they read; keep it short anyway
            detail = result.stderr.decode(errors="replace").strip().splitlines()[:1]
            raise FailedPrecondition(
                f"VM {name}: could not {what} in the guest ({argv[0]} exited {result.exit_code}"
                + (f": {detail[0][:200]}" if detail else "")
                + ")",
                reason="GUEST_COMMAND_FAILED",
                metadata={"vm": name},
            )

    # ---- health ------------------------------------------------------------------------------

    async def record_health_action(
        self, name: str, check: str, trigger: str, kind: str, outcome: str, detail: str
    ) -> None:
        """Audit an action the health monitor took or held back (``vm.health_action``, actor ``system``).

        ``detail`` is the monitor's own text (never a command's output).
        """
        result = {"done": Outcome.SUCCEEDED, "failed": Outcome.FAILED}.get(outcome, Outcome.REJECTED)
        details: dict[str, object] = {
            "check": check,
            "trigger": trigger,
            "kind": kind,
            "outcome": outcome,
            "detail": detail,
        }
        event = self._event("health_action", name, "", details, outcome=result, actor=SYSTEM_ACTOR)
        await asyncio.to_thread(self._journal.add_events, [event])

    # ---- the cloud-init seed -------------------------------------------------------------------

    async def _watch_seeds(self) -> None:
        """Detach and delete seeds of ``detach_seed_after_boot`` VMs once their guest says cloud-init is done."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._seed_wake.wait(), timeout=self._seed_poll)
            self._seed_wake.clear()
            for name in sorted(self._seed_pending):
                try:
                    await self.detach_seed_when_done(name)
                except CloneboxError as exc:
                    log.info("seed of %s not detached yet: %s", name, exc.message)
                except Exception:
                    log.exception("seed watcher: unexpected error for %s", name)

    async def detach_seed_when_done(self, name: str) -> list[str] | None:
        """
        Detach ``name``'s seed if its guest reports cloud-init done.

        Returns the removed paths, or None when cloud-init is not done yet (or the guest agent does
        not answer: the watcher asks again).
        """
        async with self._lock(name):
            if name not in self._seed_pending:
                return None
            try:
                done = await self._hv.guest_file_exists(name, CLOUD_INIT_DONE)
            except NotFound:
                self._seed_pending.discard(name)
                return None
            except FailedPrecondition:
                return None  # not running, or qemu-ga not up yet
            if not done:
                return None
            # without the seed, cloud-init's next boot would fall back to its None datasource and treat
            # the VM as a new instance (new host keys, the distro's default user): keep this instance
            kept = await self._hv.guest_exec(name, ["/bin/sh", "-c", _KEEP_INSTANCE], timeout=30)
            if kept.exit_code != 0:
                log.warning("seed of %s kept: could not mark cloud-init's instance (exit %s)", name, kept.exit_code)
                return None
            removed = await self._hv.detach_seed(name)
            event = self._event("seed_detach", name, "", {"removed": removed})
            await asyncio.to_thread(self._journal.add_events, [event])
            self._seed_pending.discard(name)
            log.info("cloud-init done on %s: seed detached and deleted (%s)", name, ", ".join(removed) or "none left")
            return removed

    # ---- internals -----------------------------------------------------------------------------

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def replay(self, request_id: str, method: str, target: str) -> dict[str, object] | None:
        """The recorded outcome of ``request_id`` (None when new); REQUEST_ID_REUSED for another change."""
        return await self._replay(request_id, method, target)

    async def _replay(self, request_id: str, method: str, target: str) -> dict[str, object] | None:
        # the journal is synchronous SQLite (fsync on write): keep it off the event loop
        found = await asyncio.to_thread(self._journal.outcome, request_id)
        if found is None:
            return None
        m, t, outcome = found
        if (m, t) != (method, target):
            raise InvalidArgument(
                f"request_id {request_id!r} was already used for {m} of {t!r}",
                reason="REQUEST_ID_REUSED",
                metadata={"field": "request_id"},
            )
        return outcome

    def _event(
        self,
        method: str,
        target: str,
        request_id: str,
        details: dict[str, object],
        *,
        outcome: Outcome = Outcome.SUCCEEDED,
        actor: str | None = None,
    ) -> AuditEvent:
        return new_event(
            f"vm.{method}",
            f"hosts/{self.host_name}/vms/{target}",
            outcome,
            request_id=request_id,
            origin=f"agent/{self.host_name}",
            details=details,
            actor=actor,
        )

    async def _remember(
        self, request_id: str, method: str, target: str, outcome: dict[str, object], *, actor: str | None = None
    ) -> None:
        # the outcome and its audit event are one journal transaction: if the event cannot be
        # written, the call fails (the change is retried under the same request id)
        event = self._event(method, target, request_id, _audit_details(outcome), actor=actor)
        await asyncio.to_thread(self._journal.record, request_id, method, target, outcome, event)

    async def _wait_stopped(self, name: str, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if (await self._hv.get(name)).state in (VmState.STOPPED, VmState.CRASHED):
                return True
            await asyncio.sleep(_POLL_SECONDS)
        return False

    def _to_vm(self, record: DomainRecord) -> Vm:
        return Vm(
            name=record.name,
            host=self.host_name,
            state=record.state,
            spec=record.spec,
            uuid=record.uuid,
            addresses=record.addresses,
            create_time=record.create_time,
            update_time=datetime.now(UTC),
            state_reason=record.state_reason,
        )

    async def _consume_events(self) -> None:
        # one consumer keeps the order libvirt delivered events in
        while True:
            ev = await self._event_queue.get()
            try:
                self._apply_event(ev, await self._lookup(ev))
            except Exception:
                log.exception("dropping hypervisor event %s", ev)
            finally:
                self._event_queue.task_done()

    async def _lookup(self, ev: HypervisorEvent) -> Vm | None:
        known = self._known.get(ev.name)
        if known is not None or ev.kind == EventKind.UNDEFINED:
            return known
        try:
            return self._to_vm(await self._hv.get(ev.name))
        except NotFound:
            return None

    def _apply_event(self, ev: HypervisorEvent, vm: Vm | None) -> None:
        if vm is None:
            return
        now = datetime.now(UTC)
        if ev.kind == EventKind.UNDEFINED:
            self._known.pop(ev.name, None)
            self.events.append(VmEventType.DELETED, replace(vm, update_time=now), ev.detail or "undefined")
            return
        state = ev.state or vm.state
        # addresses belong to a running guest only
        addresses = vm.addresses if state == VmState.RUNNING else ()
        # the event's detail is the new state's reason ("shutdown", "destroyed", "crashed"); a definition's
        # ("added") says nothing about why the VM is stopped, so the known reason stays
        reason = ev.detail if ev.detail and ev.kind != EventKind.DEFINED else vm.state_reason
        updated = replace(vm, state=state, state_reason=reason, update_time=now, addresses=addresses)
        self._known[ev.name] = updated
        kind = VmEventType.ADDED if ev.kind == EventKind.DEFINED else VmEventType.MODIFIED
        self.events.append(kind, updated, ev.detail or ev.kind.value)
