"""Ports of the controller's use cases: the fleet store and the gateway to agents.

The store adapter lives in ``clonebox_controller.store`` (SQLAlchemy), the agent gateway in
``clonebox_controller.agents`` (gRPC); ``main.py`` wires them. Store methods are synchronous and are
called through ``asyncio.to_thread``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Protocol

from clonebox_core.audit.chain import AuditFilter, ChainRecord, ChainState, Head
from clonebox_core.audit.event import AuditEvent
from clonebox_core.errors import CloneboxError
from clonebox_core.health import ActionRecord, Aggregate, HealthState, ProbeResult, Transition, VmHealth
from clonebox_core.model import (
    Auth,
    CreatePlan,
    Host,
    HostEndpoint,
    HostState,
    HypervisorInfo,
    IpAddress,
    Operation,
    Orphan,
    Resources,
    Revision,
    Transaction,
    Vm,
    VmSpec,
    VmState,
    Volume,
)
from clonebox_core.plan import Plan, PlanRun, RunState, UpdateResult, VmStatus
from clonebox_core.secret import Secret
from clonebox_core.snapshots import PruneDecision, Snapshot, SnapshotKind, SnapshotPolicy

#: one message of an export or import stream (header, chunk or trailer). Use cases never look inside:
#: they pass parts between the gRPC adapters unchanged (no copy of image data, no protobuf import here)
ImagePart = object


class FleetStore(Protocol):
    """Durable fleet state. Concurrency control is the database's, never an in-process lock."""

    def upsert_host_registration(
        self,
        name: str,
        address: str,
        capacity: Resources,
        allocatable: Resources,
        hypervisor: HypervisorInfo,
        epoch: int,
    ) -> Host: ...
    def heartbeat(self, name: str, serving: bool, reason: str) -> Host: ...
    def mark_unreachable_older_than(self, cutoff: datetime) -> list[str]: ...
    def set_host_state(self, name: str, state: HostState, reason: str = "") -> Host: ...
    def set_cordoned(self, name: str, cordoned: bool, audit: AuditEvent | None = None) -> Host: ...
    def get_host(self, name: str) -> Host: ...
    def get_host_endpoint(self, name: str) -> HostEndpoint: ...
    def list_hosts(self) -> list[Host]: ...
    def set_agent_revision(self, name: str, epoch: int, sequence: int) -> None: ...
    def place(self, spec: VmSpec, host: str | None) -> str: ...
    def reserve_vm(
        self,
        spec: VmSpec,
        host: str | None,
        op: Operation,
        audit: AuditEvent | Sequence[AuditEvent] | None = None,
        *,
        creating_step: str = "",
    ) -> tuple[Operation, Vm | None]: ...
    def reserve_update(
        self, spec: VmSpec, op: Operation, audit: AuditEvent | Sequence[AuditEvent] | None = None
    ) -> tuple[Operation, Vm | None]: ...
    def restore_spec(self, name: str, previous: str) -> Vm | None: ...
    def begin_operation(self, op: Operation, audit: AuditEvent | None = None) -> tuple[Operation, bool]: ...
    def get_vm(self, name: str) -> Vm: ...
    def find_operation_by_request_id(self, request_id: str) -> Operation | None: ...
    def update_vm_auth(self, name: str, auth: Auth, audit: Sequence[AuditEvent]) -> Vm: ...
    def list_vms(
        self,
        host: str | None = None,
        state: VmState | None = None,
        labels: dict[str, str] | None = None,
        page_size: int = 100,
        page_token: str = "",
    ) -> tuple[list[Vm], str]: ...
    def update_vm_observed(
        self,
        name: str,
        state: VmState,
        uuid: str | None = None,
        addresses: Sequence[IpAddress] | None = None,
        state_reason: str | None = None,
        *,
        agent_revision: Revision | None = None,
    ) -> Vm | None: ...
    def release_vm(self, name: str) -> None: ...
    def reserve_volume(self, host: str, name: str, size_mib: int, *, holder: str = "") -> bool: ...
    def release_volume(self, host: str, name: str) -> bool: ...
    def adopt_volumes(self, host: str, listed: Sequence[tuple[str, int]]) -> list[str]: ...
    def vms_on_host(self, host: str) -> list[Vm]: ...
    def changes_since(self, revision: int, limit: int = 500) -> list[tuple[int, Vm, bool]]: ...
    def current_revision(self) -> int: ...
    def get_operation(self, op_id: str) -> Operation: ...
    def update_operation(
        self, op_id: str, step: str | None = None, progress: int | None = None, *, vm_state: VmState | None = None
    ) -> Operation: ...
    def finish_operation(
        self,
        op_id: str,
        error: CloneboxError | None = None,
        audit: AuditEvent | None = None,
        *,
        observed: Vm | None = None,
        step: str | None = None,
        revision: Revision | None = None,
    ) -> Operation: ...
    def list_operations(self, limit: int = 50, only_running: bool = False) -> list[Operation]: ...
    def unfinished_operations(self) -> list[Operation]: ...
    def reconcile_host(self, host: str, observed: list[Vm], listed_at: datetime | None = None) -> list[str]: ...
    def revoke_certificate(self, serial: str, identity: str, audit: AuditEvent | None = None) -> bool: ...
    def revoked_serials(self) -> set[str]: ...
    def create_join_token(
        self, token_id: str, secret_sha256: str, host: str, expire_time: datetime, audit: AuditEvent | None = None
    ) -> None: ...
    def consume_join_token(self, token_id: str, secret_sha256: str, audit: AuditEvent | None = None) -> str: ...
    def append_audit(self, events: Sequence[AuditEvent]) -> Head: ...
    def list_audit(self, query: AuditFilter) -> list[ChainRecord]: ...
    def get_audit(self, event_id: str) -> ChainRecord: ...
    def audit_chain_state(self) -> ChainState: ...
    def archive_audit(self, through: Head, audit: AuditEvent | None = None) -> int: ...
    def record_audit_witness(self, source: str, head: Head) -> None: ...


class HealthStore(Protocol):
    """Stored health: current health per VM, transitions by seq, minute aggregates, actions (see the Store)."""

    def apply_health_update(
        self,
        host: str,
        health: VmHealth | None,
        transitions: Sequence[Transition] = (),
        aggregates: Sequence[Aggregate] = (),
        actions: Sequence[ActionRecord] = (),
        removed: Sequence[str] = (),
        *,
        placed_on_host: str = "",
    ) -> list[Transition] | None: ...
    def mark_health_unknown(self, host: str, detail: str) -> list[tuple[VmHealth, Transition | None]]: ...
    def get_health(self, vm: str) -> VmHealth | None: ...
    def list_health(
        self,
        names: Sequence[str] | None = None,
        states: Sequence[HealthState] | None = None,
        host: str | None = None,
    ) -> list[VmHealth]: ...
    def health_snapshot(
        self, names: Sequence[str] | None = None, states: Sequence[HealthState] | None = None
    ) -> tuple[list[VmHealth], int]: ...
    def health_transitions_after(
        self,
        seq: int,
        names: Sequence[str] | None = None,
        states: Sequence[HealthState] | None = None,
        limit: int = 1000,
    ) -> list[Transition]: ...
    def health_history(
        self, vm: str, since: datetime, check: str = "", limit: int = 1000
    ) -> tuple[list[Transition], list[Aggregate], list[ActionRecord]]: ...
    def health_seq_range(self) -> tuple[int, int]: ...
    def prune_health(
        self, transitions_before: datetime, minutes_before: datetime, actions_before: datetime
    ) -> tuple[int, int, int]: ...


class PlanStore(Protocol):
    """Plan revisions and runs (``clonebox_controller.store``). Concurrency control is the database's.

    Errors: NotFound ``PLAN_NOT_FOUND`` / ``PLAN_RUN_NOT_FOUND``; Aborted ``PLAN_RUN_IN_PROGRESS`` when a
    run is created while another run of the same plan is not done.
    """

    def save_plan_revision(self, plan: Plan, audit: AuditEvent | None = None) -> tuple[Plan, bool]:
        """Store ``plan`` as its next revision unless its digest equals the current one's.

        Returns the stored plan (revision, digest, create_time set) and whether a revision was added
        (nothing is written for an equal digest). A destroyed plan becomes current again.
        """
        ...

    def get_plan(self, name: str, revision: int = 0) -> Plan:
        """The current revision (or ``revision``) of a plan; NotFound PLAN_NOT_FOUND."""
        ...

    def list_plans(self, include_destroyed: bool = False) -> list[Plan]:
        """Current revisions of every plan, by name."""
        ...

    def mark_plan_destroyed(self, name: str, destroyed: bool = True) -> None:
        """After a finished destroy the plan is listed no more (its revisions and runs are kept)."""
        ...

    def create_run(
        self,
        run: PlanRun,
        audit: AuditEvent | None = None,
        *,
        owner: str = "",
        lease_seconds: float = 0.0,
        hold: Sequence[tuple[VmSpec, str | None]] = (),
        hold_volumes: Sequence[tuple[str, str, int]] = (),
        hold_replaced: Sequence[tuple[VmSpec, str | None]] = (),
    ) -> tuple[PlanRun, bool]:
        """Insert ``run`` (with its VM rows) and True; with ``owner`` it is leased to it in the same transaction.

        With a request id already used for this plan: the existing run and False. Aborted
        PLAN_RUN_IN_PROGRESS when another run of the plan is not done. ``hold``: VMs the run will create,
        placed and reserved (PENDING) in the same transaction; ``hold_volumes``: ``(host, name, size_mib)``
        of the volumes it will make, their disk reserved first; ``hold_replaced``: the VMs that replace
        existing ones, whose room grows to cover both when it fits; a placement error refuses the run.
        """
        ...

    def release_held(self, names: Sequence[str], run_id: str = "") -> list[str]:
        """Free the VMs of ``names`` (and ``run_id``'s volume reservations) a run holds and has not begun to make."""
        ...

    def update_run(
        self,
        run_id: str,
        *,
        state: RunState | None = None,
        error: str | None = None,
        vms: Sequence[VmStatus] = (),
        audit: AuditEvent | None = None,
    ) -> int:
        """Change a run's state/error and replace the rows of ``vms`` (by service); the new version, one transaction."""
        ...

    def get_run(self, run_id: str) -> PlanRun:
        """A run; NotFound PLAN_RUN_NOT_FOUND."""
        ...

    def list_runs(self, plan: str, limit: int = 50) -> list[PlanRun]:
        """A plan's runs, newest first."""
        ...

    def latest_run(self, plan: str) -> PlanRun | None:
        """A plan's newest run."""
        ...

    def claim_runs(self, owner: str, lease_seconds: float) -> list[PlanRun]:
        """Unfinished runs whose lease is free, expired or already ``owner``'s, now leased to ``owner``.

        A controller calls it at start and then periodically (renewing its own leases): a run whose
        controller died is taken over once its lease expires, and never by two controllers at once.
        """
        ...

    def release_run(self, run_id: str, owner: str) -> None:
        """Give up ``owner``'s lease (at shutdown, so another controller may resume it at once)."""
        ...


class AgentHealthUpdate(Protocol):
    """One message of an agent's WatchHealth stream."""

    @property
    def health(self) -> VmHealth | None:
        """The VM's health after the update (None only on the ``synced`` marker)."""
        ...

    @property
    def transitions(self) -> Sequence[Transition]:
        """State changes that led to it, oldest first."""
        ...

    @property
    def aggregates(self) -> Sequence[Aggregate]:
        """Closed minutes of runs."""
        ...

    @property
    def actions(self) -> Sequence[ActionRecord]:
        """Actions taken."""
        ...

    @property
    def removed(self) -> bool:
        """The VM is gone."""
        ...

    @property
    def synced(self) -> bool:
        """The initial snapshot is complete."""
        ...


class AgentEvent(Protocol):
    """One lifecycle event from an agent."""

    @property
    def revision(self) -> Revision:
        """Agent revision of the event."""
        ...

    @property
    def deleted(self) -> bool:
        """True when the VM is gone."""
        ...

    @property
    def vm(self) -> Vm:
        """The VM after the change."""
        ...


class AgentConsoleChunk(Protocol):
    """One piece of a VM's serial console log from its agent."""

    @property
    def data(self) -> bytes:
        """Raw bytes the guest wrote."""
        ...

    @property
    def offset(self) -> int:
        """Offset of the first byte in the log file."""
        ...


class AgentClient(Protocol):
    """The calls the controller makes to one agent; errors are ``clonebox_core.errors`` classes."""

    #: the host whose agent this client calls
    host: str

    async def create_vm(self, spec: VmSpec, request_id: str) -> tuple[Vm, Revision | None]: ...
    async def plan_create(self, spec: VmSpec) -> CreatePlan: ...
    async def get_vm(self, name: str) -> Vm: ...
    async def get_ssh_key(self, name: str, actor: str) -> tuple[Secret, str]: ...
    def read_console(
        self, name: str, tail_bytes: int, follow: bool, from_offset: int | None = None
    ) -> AsyncIterator[AgentConsoleChunk]: ...
    async def rotate_secret(
        self, name: str, request_id: str, password_hash: Secret, expire: bool, keys: tuple[str, ...], replace_keys: bool
    ) -> tuple[str, list[str]]: ...
    async def list_vms(self) -> tuple[list[Vm], Revision]: ...
    async def start_vm(self, name: str, request_id: str) -> tuple[Vm, Revision | None]: ...
    async def stop_vm(
        self, name: str, request_id: str, timeout_seconds: int, force: bool
    ) -> tuple[Vm, Revision | None]: ...
    async def update_vm(self, spec: VmSpec, request_id: str, timeout_seconds: int) -> UpdateResult: ...
    async def delete_vm(self, name: str, request_id: str, with_snapshots: bool = False) -> list[str]: ...
    def watch_vms(self, after: Revision | None) -> AsyncIterator[AgentEvent]: ...
    async def list_transactions(self, include_committed: bool, limit: int) -> list[Transaction]: ...
    async def recover(self, sweep: bool, request_id: str) -> tuple[list[Transaction], list[Orphan]]: ...
    def watch_health(self) -> AsyncIterator[AgentHealthUpdate]: ...
    async def check_health(self, name: str, check: str) -> tuple[list[ProbeResult], VmHealth | None]: ...
    async def create_snapshot(
        self,
        vm: str,
        name: str,
        *,
        description: str,
        tags: dict[str, str],
        kind: SnapshotKind | None,
        quiesce: bool,
        request_id: str,
        creator: str,
    ) -> Snapshot: ...
    async def list_snapshots(self, vm: str) -> tuple[list[Snapshot], SnapshotPolicy]: ...
    async def restore_snapshot(
        self, vm: str, name: str, *, no_start: bool, no_backup: bool, request_id: str, creator: str
    ) -> tuple[Vm, Snapshot | None]: ...
    async def delete_snapshot(self, vm: str, name: str, *, children: bool, request_id: str) -> list[str]: ...
    async def set_snapshot_policy(self, vm: str, policy: SnapshotPolicy, request_id: str) -> SnapshotPolicy: ...
    async def prune_snapshots(self, vm: str, *, dry_run: bool, request_id: str) -> list[PruneDecision]: ...
    def export_snapshot(self, vm: str, name: str) -> AsyncIterator[ImagePart]: ...
    async def import_snapshot(self, header: ImagePart, request_id: str, rest: AsyncIterator[ImagePart]) -> Vm:
        """Send ``header`` (its request id replaced, its host cleared), then ``rest``; the VM made.

        If ``rest`` raises, the call is cancelled (the agent keeps nothing) and that error is raised.
        """
        ...

    async def create_volume(
        self, name: str, size_mib: int, shared: bool, labels: dict[str, str], request_id: str
    ) -> Volume:
        """CreateVolume: idempotent by name, size and shared flag (FailedPrecondition VOLUME_EXISTS_DIFFERENT)."""
        ...

    async def delete_volume(self, name: str, request_id: str) -> None:
        """DeleteVolume (NotFound VOLUME_NOT_FOUND when there is none; FailedPrecondition VOLUME_IN_USE)."""
        ...

    async def list_volumes(self) -> list[Volume]:
        """ListVolumes: the host's volumes, each with the VMs attaching it."""
        ...

    async def close(self) -> None: ...


class AgentGateway(Protocol):
    """Builds clients for agents by address."""

    def client(self, host: str, address: str) -> AgentClient: ...

    def reconnect(self, host: str) -> None:
        """Make the next client of ``host`` dial afresh (its agent has just connected a new session)."""
        ...
