"""
SQLAlchemy ORM tables of the controller's fleet store.

The schema is owned by the alembic migrations in ``migrations/versions``; these classes describe the
same schema for queries (a test compares the two so they cannot drift). Nothing outside the store
package imports this module: the store hands out core model dataclasses only.

Conventions:

* enums are stored by *name* in short strings, not as native enums, so adding a member is a code
  change rather than an ``ALTER TYPE`` migration;
* times are timezone-aware UTC on the Python side (:class:`UtcDateTime`);
* structured values (specs, addresses, hypervisor info) are JSON (JSONB on PostgreSQL).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

#: explicit constraint names, so later migrations can drop/alter them by name on every backend
NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

#: the ``id`` of the single row of :class:`FleetRevisionRow`
FLEET_REVISION_ROW_ID = 1

NAME_LENGTH = 63  # DNS label (clonebox_core.names)


class UtcDateTime(TypeDecorator[datetime]):
    """
    A timezone-aware UTC datetime on every backend.

    PostgreSQL stores ``timestamptz``; SQLite has no time zone support, so values are normalised to
    UTC and stored naive, and read back with ``tzinfo=UTC``. Naive datetimes are refused on the way
    in: guessing their zone is how off-by-hours bugs start.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Normalise to UTC (naive on SQLite); refuse naive input."""
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the store only accepts aware datetimes")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Return an aware UTC datetime whatever the backend stored."""
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


#: JSON everywhere, JSONB on PostgreSQL (binary, indexable, no duplicate-key surprises)
Json = JSON().with_variant(JSONB(), "postgresql")


class Base(DeclarativeBase):
    """Declarative base carrying the naming convention."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UtcDateTime()}


class HostRow(Base):
    """A registered agent host."""

    __tablename__ = "hosts"

    name: Mapped[str] = mapped_column(String(NAME_LENGTH), primary_key=True)
    address: Mapped[str] = mapped_column(String(255))
    capacity_vcpus: Mapped[int] = mapped_column(Integer)
    capacity_memory_mib: Mapped[int] = mapped_column(BigInteger)
    capacity_disk_mib: Mapped[int] = mapped_column(BigInteger)
    allocatable_vcpus: Mapped[int] = mapped_column(Integer)
    allocatable_memory_mib: Mapped[int] = mapped_column(BigInteger)
    allocatable_disk_mib: Mapped[int] = mapped_column(BigInteger)
    hypervisor: Mapped[dict[str, Any]] = mapped_column(Json)
    #: HostState member name
    state: Mapped[str] = mapped_column(String(16))
    #: why the host is NOT_SERVING / UNREACHABLE (free text, for operators)
    state_reason: Mapped[str] = mapped_column(Text, default="")
    cordoned: Mapped[bool] = mapped_column(Boolean, default=False)
    registered_time: Mapped[datetime]
    last_heartbeat: Mapped[datetime | None]
    #: the agent's event-history epoch (changes when its journal is recreated)
    agent_epoch: Mapped[int] = mapped_column(BigInteger, default=0)
    #: last agent event sequence the controller consumed within ``agent_epoch``
    agent_sequence: Mapped[int] = mapped_column(BigInteger, default=0)


class VmRow(Base):
    """A VM the fleet knows, with the resources reserved for it on its host."""

    __tablename__ = "vms"
    __table_args__ = (
        # list_vms(host=...) pages by name within a host
        Index("ix_vms_host_name", "host", "name"),
    )

    #: fleet-unique: the same name cannot exist on two hosts
    name: Mapped[str] = mapped_column(String(NAME_LENGTH), primary_key=True)
    #: RESTRICT: a host cannot be removed while the store still places VMs on it
    host: Mapped[str | None] = mapped_column(String(NAME_LENGTH), ForeignKey("hosts.name", ondelete="RESTRICT"))
    #: VmState member name
    state: Mapped[str] = mapped_column(String(16), index=True)
    spec: Mapped[dict[str, Any]] = mapped_column(Json)
    uuid: Mapped[str] = mapped_column(String(36), default="")
    addresses: Mapped[list[dict[str, Any]]] = mapped_column(Json)
    reserved_vcpus: Mapped[int] = mapped_column(Integer)
    reserved_memory_mib: Mapped[int] = mapped_column(BigInteger)
    reserved_disk_mib: Mapped[int] = mapped_column(BigInteger)
    create_time: Mapped[datetime]
    update_time: Mapped[datetime]
    state_reason: Mapped[str] = mapped_column(Text, default="")
    #: fleet revision of the last change to this row (WatchVms resumes from it)
    revision: Mapped[int] = mapped_column(BigInteger, index=True)
    #: the host's agent's event revision of the newest report recorded here (an operation's answer or
    #: an event); an event of that epoch with a sequence at or below it is older news (NULL: none yet)
    agent_epoch: Mapped[int | None] = mapped_column(BigInteger)
    agent_sequence: Mapped[int | None] = mapped_column(BigInteger)
    #: the plan run that holds this VM's room (grown to what its replacement needs) for the VM that
    #: replaces it (``Store.create_run``'s ``hold_replaced``); NULL: no run does
    held_for: Mapped[str | None] = mapped_column(String(64), default=None)


class VolumeReservationRow(Base):
    """Disk reserved on a host for one of its agent's volumes: placement counts it as it counts VMs' disks."""

    __tablename__ = "volume_reservations"

    host: Mapped[str] = mapped_column(
        String(NAME_LENGTH), ForeignKey("hosts.name", ondelete="CASCADE"), primary_key=True
    )
    name: Mapped[str] = mapped_column(String(NAME_LENGTH), primary_key=True)
    size_mib: Mapped[int] = mapped_column(BigInteger)
    create_time: Mapped[datetime]
    #: the plan run that reserved the disk at apply for a volume it will make (``Store.create_run``);
    #: NULL once the volume's create took the reservation over, or for any other volume
    held_by: Mapped[str | None] = mapped_column(String(64), default=None)


class VmLabelRow(Base):
    """One label of a VM, denormalised out of the spec so label filters run in SQL."""

    __tablename__ = "vm_labels"
    __table_args__ = (Index("ix_vm_labels_key_value", "key", "value"),)

    vm_name: Mapped[str] = mapped_column(
        String(NAME_LENGTH), ForeignKey("vms.name", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    value: Mapped[str] = mapped_column(String(255))


class VmChangeRow(Base):
    """A tombstone: the last state of a deleted VM, kept briefly so watchers see the delete."""

    __tablename__ = "vm_changes"

    revision: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    vm_name: Mapped[str] = mapped_column(String(NAME_LENGTH))
    vm: Mapped[dict[str, Any]] = mapped_column(Json)
    deleted: Mapped[bool] = mapped_column(Boolean)
    change_time: Mapped[datetime]


class OperationRow(Base):
    """A long-running operation."""

    __tablename__ = "operations"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(255))
    #: the VM the operation acts on, parsed from ``target`` (reconcile must not fail a VM that an
    #: unfinished operation is still creating or deleting)
    vm_name: Mapped[str | None] = mapped_column(String(NAME_LENGTH), index=True)
    #: NULL when the client sent none: UNIQUE allows many NULLs on both backends
    request_id: Mapped[str | None] = mapped_column(String(128), unique=True)
    step: Mapped[str] = mapped_column(String(255), default="")
    progress: Mapped[int] = mapped_column(Integer, default=0)
    done: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    error_code: Mapped[str] = mapped_column(String(64), default="")
    error_reason: Mapped[str] = mapped_column(String(128), default="")
    error_message: Mapped[str] = mapped_column(Text, default="")
    error_metadata: Mapped[dict[str, Any]] = mapped_column(Json)
    result_vm: Mapped[dict[str, Any] | None] = mapped_column(Json)
    #: string inputs the operation needs to run or resume (Operation.params)
    params: Mapped[dict[str, Any]] = mapped_column(Json)
    create_time: Mapped[datetime] = mapped_column(index=True)
    update_time: Mapped[datetime]


class FleetRevisionRow(Base):
    """
    The single-row, controller-wide revision counter behind WatchVms.

    Every VM change takes the next value while holding this row's lock until commit, so revisions
    become visible in the order they were assigned: a watcher that has seen revision N never later
    finds a committed change numbered below N.
    """

    __tablename__ = "fleet_revision"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    value: Mapped[int] = mapped_column(BigInteger)
    #: highest revision whose tombstone was pruned; watches from below it must relist
    compacted: Mapped[int] = mapped_column(BigInteger)


class RevokedCertRow(Base):
    """A revoked certificate; the deny list every daemon enforces."""

    __tablename__ = "revoked_certificates"

    #: serial number, lowercase hex (serials are up to 159 bits: no integer column holds them)
    serial: Mapped[str] = mapped_column(String(64), primary_key=True)
    identity: Mapped[str] = mapped_column(String(255))
    revoked_time: Mapped[datetime]


class JoinTokenRow(Base):
    """A one-time, expiring token that lets a new host enrol and receive its certificate."""

    __tablename__ = "join_tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    #: SHA-256 of the secret half: the database never holds a usable token
    secret_sha256: Mapped[str] = mapped_column(String(64))
    host: Mapped[str] = mapped_column(String(NAME_LENGTH))
    expire_time: Mapped[datetime]
    used_time: Mapped[datetime | None]


class AuditEventRow(Base):
    """One record of the audit hash chain (see clonebox_core.audit.chain)."""

    __tablename__ = "audit_events"

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    #: the event's own id: forwarded agent events are de-duplicated on it
    event_id: Mapped[str] = mapped_column(String(64), unique=True)
    time: Mapped[datetime] = mapped_column(index=True)
    actor: Mapped[str] = mapped_column(Text, index=True)
    action: Mapped[str] = mapped_column(String(64), index=True)
    resource: Mapped[str] = mapped_column(Text, index=True)
    outcome: Mapped[str] = mapped_column(String(16))
    request_id: Mapped[str] = mapped_column(Text)
    trace_id: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str] = mapped_column(Text)
    origin: Mapped[str] = mapped_column(String(80))
    details: Mapped[dict[str, Any]] = mapped_column(Json)
    key_id: Mapped[str] = mapped_column(String(64))
    prev_mac: Mapped[str] = mapped_column(String(64))
    mac: Mapped[str] = mapped_column(String(64))


#: the ``id`` of the single rows of :class:`AuditHeadRow` and :class:`AuditAnchorRow`
AUDIT_ROW_ID = 1


class AuditHeadRow(Base):
    """The chain head. Appends lock this row (PostgreSQL) or the database (SQLite) until commit."""

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    seq: Mapped[int] = mapped_column(BigInteger)
    mac: Mapped[str] = mapped_column(String(64))


class AuditAnchorRow(Base):
    """Where the chain in the database starts: genesis, or the last record of an archived segment."""

    __tablename__ = "audit_anchor"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    seq: Mapped[int] = mapped_column(BigInteger)
    mac: Mapped[str] = mapped_column(String(64))
    key_id: Mapped[str] = mapped_column(String(64))
    #: HMAC over (seq, mac) with key_id, so a forged anchor cannot hide removed records ("" = genesis)
    seal: Mapped[str] = mapped_column(String(64))
    archived_time: Mapped[datetime | None]


class AuditWitnessRow(Base):
    """The last chain head an agent reported holding (a copy of the head outside the controller)."""

    __tablename__ = "audit_witnesses"

    source: Mapped[str] = mapped_column(String(128), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    mac: Mapped[str] = mapped_column(String(64))
    report_time: Mapped[datetime]


# ------------------------------------------------------------------------------------------ health

#: BIGINT on PostgreSQL; SQLite only auto-numbers an ``INTEGER PRIMARY KEY`` (the rowid)
AutoBigInteger = BigInteger().with_variant(Integer(), "sqlite")


class HealthCurrentRow(Base):
    """The latest reported health of one VM (the whole ``VmHealth`` as a JSON document)."""

    __tablename__ = "health_current"

    vm: Mapped[str] = mapped_column(String(NAME_LENGTH), primary_key=True)
    host: Mapped[str] = mapped_column(String(NAME_LENGTH), index=True)
    #: HealthState member name (the document has it too; this column is for filters)
    state: Mapped[str] = mapped_column(String(16))
    document: Mapped[dict[str, Any]] = mapped_column(Json)
    updated_at: Mapped[datetime]


class HealthTransitionRow(Base):
    """
    A change of state of a probe, or of a whole VM (``check`` empty).

    ``seq`` orders transitions for resumable watches. ``AUTOINCREMENT`` on SQLite so a number is never
    handed out twice; pruning also always keeps the newest row, so the retained rows are one
    contiguous range of seq and "older than the oldest kept" means "possibly pruned".
    """

    __tablename__ = "health_transitions"
    __table_args__ = (
        Index("ix_health_transitions_vm_time", "vm", "time"),
        {"sqlite_autoincrement": True},
    )

    seq: Mapped[int] = mapped_column(AutoBigInteger, primary_key=True, autoincrement=True)
    vm: Mapped[str] = mapped_column(String(NAME_LENGTH))
    host: Mapped[str] = mapped_column(String(NAME_LENGTH))
    check: Mapped[str] = mapped_column(String(NAME_LENGTH))
    #: HealthState member names
    from_state: Mapped[str] = mapped_column(String(16))
    to_state: Mapped[str] = mapped_column(String(16))
    time: Mapped[datetime] = mapped_column(index=True)
    detail: Mapped[str] = mapped_column(Text)


class HealthMinuteRow(Base):
    """One closed minute of runs of one probe; the same key arriving again replaces the row."""

    __tablename__ = "health_minutes"

    vm: Mapped[str] = mapped_column(String(NAME_LENGTH), primary_key=True)
    check: Mapped[str] = mapped_column(String(NAME_LENGTH), primary_key=True)
    minute: Mapped[datetime] = mapped_column(primary_key=True, index=True)
    passes: Mapped[int] = mapped_column(Integer)
    warnings: Mapped[int] = mapped_column(Integer)
    failures: Mapped[int] = mapped_column(Integer)
    no_data: Mapped[int] = mapped_column(Integer)
    duration_us_sum: Mapped[int] = mapped_column(BigInteger)
    duration_us_max: Mapped[int] = mapped_column(BigInteger)


class HealthActionRow(Base):
    """An ``on_failure``/``on_recovery`` action an agent took (or held back)."""

    __tablename__ = "health_actions"
    __table_args__ = (
        Index("ix_health_actions_vm_time", "vm", "time"),
        # an agent that re-sends an action after a reconnect must not record it twice
        UniqueConstraint("vm", "check", "trigger", "time", name="uq_health_actions_vm_check_trigger_time"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(AutoBigInteger, primary_key=True, autoincrement=True)
    vm: Mapped[str] = mapped_column(String(NAME_LENGTH))
    check: Mapped[str] = mapped_column(String(NAME_LENGTH))
    #: "on_failure" | "on_recovery"
    trigger: Mapped[str] = mapped_column(String(16))
    #: ActionKind member name
    kind: Mapped[str] = mapped_column(String(16))
    #: "done" | "failed" | "suppressed"
    outcome: Mapped[str] = mapped_column(String(16))
    detail: Mapped[str] = mapped_column(Text)
    time: Mapped[datetime] = mapped_column(index=True)


# ------------------------------------------------------------------------------------------- plans


class PlanRow(Base):
    """A plan: which of its revisions is current, and whether it was destroyed."""

    __tablename__ = "plans"

    name: Mapped[str] = mapped_column(String(NAME_LENGTH), primary_key=True)
    current_revision: Mapped[int] = mapped_column(Integer)
    #: a finished destroy hides the plan from listings; revisions and runs stay for history
    destroyed: Mapped[bool] = mapped_column(Boolean, default=False)
    update_time: Mapped[datetime]


class PlanRevisionRow(Base):
    """One stored revision of a plan (``body`` is ``clonebox_core.plan.plan_to_dict``)."""

    __tablename__ = "plan_revisions"

    plan: Mapped[str] = mapped_column(String(NAME_LENGTH), ForeignKey("plans.name"), primary_key=True)
    revision: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    #: ``clonebox_core.plan.plan_digest``: an apply of an unchanged plan adds no revision
    digest: Mapped[str] = mapped_column(String(128))
    source: Mapped[str] = mapped_column(Text)
    body: Mapped[dict[str, Any]] = mapped_column(Json)
    create_time: Mapped[datetime]


class PlanRunRow(Base):
    """One apply ("up") or destroy ("down") of a plan, leased by the controller that executes it."""

    __tablename__ = "plan_runs"
    __table_args__ = (
        # list_runs / latest_run: a plan's runs newest first
        Index("ix_plan_runs_plan_create_time", "plan", "create_time"),
        # a retried request finds its run; NULL (no request id) may repeat on both backends
        UniqueConstraint("plan", "request_id", name="uq_plan_runs_plan_request_id"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    plan: Mapped[str] = mapped_column(String(NAME_LENGTH), ForeignKey("plans.name"))
    revision: Mapped[int] = mapped_column(Integer)
    #: "up" | "down"
    action: Mapped[str] = mapped_column(String(16))
    #: RunState member name
    state: Mapped[str] = mapped_column(String(16), index=True)
    error: Mapped[str] = mapped_column(Text, default="")
    #: NULL when the client sent none
    request_id: Mapped[str | None] = mapped_column(String(128))
    #: PlanRun.options (allow_replace, with_snapshots)
    options: Mapped[dict[str, Any]] = mapped_column(Json)
    #: grows by one with every change (watchers compare it)
    version: Mapped[int] = mapped_column(BigInteger)
    #: the controller executing the run, until ``lease_until`` (NULL: free to claim)
    owner: Mapped[str | None] = mapped_column(String(255))
    lease_until: Mapped[datetime | None]
    create_time: Mapped[datetime]
    update_time: Mapped[datetime]


class PlanRunVmRow(Base):
    """One VM's progress in a run; ``position`` keeps the order the run was created with."""

    __tablename__ = "plan_run_vms"

    run_id: Mapped[str] = mapped_column(String(64), ForeignKey("plan_runs.id", ondelete="CASCADE"), primary_key=True)
    service: Mapped[str] = mapped_column(String(NAME_LENGTH), primary_key=True)
    position: Mapped[int] = mapped_column(Integer)
    vm: Mapped[str] = mapped_column(String(NAME_LENGTH))
    #: VmRunState member name
    state: Mapped[str] = mapped_column(String(16))
    step: Mapped[str] = mapped_column(Text, default="")
    error: Mapped[str] = mapped_column(Text, default="")
    failed_probe: Mapped[str] = mapped_column(Text, default="")
    host: Mapped[str] = mapped_column(String(NAME_LENGTH), default="")
    #: ChangeKind member name
    change: Mapped[str] = mapped_column(String(16))
    #: this run created the VM (a rollback removes exactly these)
    created: Mapped[bool] = mapped_column(Boolean, default=False)
    update_time: Mapped[datetime]
