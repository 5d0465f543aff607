"""
The controller's fleet store: hosts, VMs with their reservations, operations, the watch revision.

:class:`Store` is synchronous (the asyncio controller calls it through ``asyncio.to_thread``) and is
the only way the application layer reaches the database. Every method is one database transaction
and returns core model dataclasses, never ORM rows.

Concurrency comes from the database only, because several controller processes will share one
store: SQLite write transactions start with ``BEGIN IMMEDIATE`` (one writer at a time, decided at
BEGIN), PostgreSQL writers take row locks. Lock order on PostgreSQL, which every write transaction
follows to stay deadlock-free:

1. the ``fleet_revision`` row (every transaction that changes VMs takes it first; it also makes
   revisions commit in the order they were assigned, which WatchVms relies on),
2. host rows, in name order (``SELECT ... FOR UPDATE``),
3. VM and operation rows.

Plan transactions (``plans.py``) take none of those: the plan row, then run rows, then (when they
write an audit record) the ``audit_head`` row.

Deadlocks and serialization failures that happen anyway (for example with a foreign transaction)
are retried with jittered back-off.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hmac
import json
import logging
import os
import random
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Self, TypeVar, cast

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Row,
    Table,
    bindparam,
    delete,
    exists,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.sql.expression import Executable

from clonebox_core.audit.chain import AuditFilter, ChainRecord, ChainState, Head, Keyring
from clonebox_core.audit.event import AuditEvent
from clonebox_core.audit.headfile import HeadFile
from clonebox_core.changes import ChangeKey, health_key, host_key, operation_done_key, operation_key, vm_key
from clonebox_core.errors import (
    AlreadyExists,
    CloneboxError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
    invalid_field,
)
from clonebox_core.health import ActionRecord, Aggregate, HealthState, Transition, VmHealth
from clonebox_core.model import (
    Auth,
    Host,
    HostEndpoint,
    HostState,
    HypervisorInfo,
    IpAddress,
    Operation,
    Resources,
    Revision,
    Vm,
    VmSpec,
    VmState,
)
from clonebox_core.plan import (
    HELD_REASON_PREFIX,
    UPDATABLE_FIELDS,
    Plan,
    PlanRun,
    RunState,
    VmStatus,
    held_reason,
    is_held,
)

from . import audit as audit_store
from . import codec, placement
from . import health as health_store
from . import plans as plans_store
from .engine import WRITE_OPTION, create_store_engine, upgrade_to_head
from .tables import (
    FLEET_REVISION_ROW_ID,
    FleetRevisionRow,
    HostRow,
    JoinTokenRow,
    OperationRow,
    PlanRunRow,
    RevokedCertRow,
    VmChangeRow,
    VmLabelRow,
    VmRow,
    VolumeReservationRow,
)

_log = logging.getLogger(__name__)

T = TypeVar("T")
#: ``Session.info`` key of the records a transaction changed, announced after its commit (``on_change``)
_CHANGES_INFO_KEY = "clonebox_changes"

#: state_reason given to a VM the store has on a host but the host's agent no longer reports
VANISHED_REASON = "vanished from host"

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000

#: PostgreSQL SQLSTATEs worth retrying the whole transaction for
_RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})  # serialization_failure, deadlock_detected


#: one entry of the VM change feed: (revision, the VM as of that revision, deleted)
VmChange = tuple[int, Vm, bool]


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _vm_not_found(name: str) -> NotFound:
    return NotFound(f"VM {name!r} does not exist", reason="VM_NOT_FOUND", metadata={"vm": name})


def _operation_not_found(op_id: str) -> NotFound:
    return NotFound(f"operation {op_id!r} does not exist", reason="OPERATION_NOT_FOUND", metadata={"operation": op_id})


def _one(conn: Connection, statement: Executable, params: Mapping[str, Any], missing: NotFound) -> Row[Any]:
    """The one row ``statement`` selects; ``missing`` is raised when there is none."""
    row = conn.execute(statement, params).one_or_none()
    if row is None:
        raise missing
    return row


# the hot reads as Core statements (see Store._read); built once, so SQLAlchemy's compiled cache hits
_VM_TABLE = cast(Table, VmRow.__table__)
_VM_BY_NAME = select(_VM_TABLE).where(_VM_TABLE.c.name == bindparam("name"))
_OPERATION_TABLE = cast(Table, OperationRow.__table__)
_OPERATION_BY_ID = select(_OPERATION_TABLE).where(_OPERATION_TABLE.c.id == bindparam("id"))
_OPERATION_FOR_UPDATE = _OPERATION_BY_ID.with_for_update()
# no values(): the SET clause is the parameters given besides the b_ key, and the new row is returned
_UPDATE_OPERATION = (
    update(_OPERATION_TABLE).where(_OPERATION_TABLE.c.id == bindparam("b_id")).returning(*_OPERATION_TABLE.c)
)
_VM_HOST = select(_VM_TABLE.c.host).where(_VM_TABLE.c.name == bindparam("name"))
_VM_FOR_UPDATE = _VM_BY_NAME.with_for_update()
_FORGET_AGENT_REVISIONS = (
    update(_VM_TABLE)
    .where(_VM_TABLE.c.host == bindparam("b_host"), _VM_TABLE.c.agent_epoch > bindparam("b_epoch"))
    .values(agent_epoch=None, agent_sequence=None)
)
_UPDATE_VM = update(_VM_TABLE).where(_VM_TABLE.c.name == bindparam("b_name")).returning(*_VM_TABLE.c)
_HOST_TABLE = cast(Table, HostRow.__table__)
_REVISION_TABLE = cast(Table, FleetRevisionRow.__table__)
_LOCK_REVISION = select(_REVISION_TABLE.c.value).where(_REVISION_TABLE.c.id == FLEET_REVISION_ROW_ID).with_for_update()
_NEXT_REVISION = (
    update(_REVISION_TABLE)
    .where(_REVISION_TABLE.c.id == FLEET_REVISION_ROW_ID)
    .values(value=_REVISION_TABLE.c.value + 1)
    .returning(_REVISION_TABLE.c.value)
)
_HOST_ENDPOINT = select(_HOST_TABLE.c.address, _HOST_TABLE.c.state).where(_HOST_TABLE.c.name == bindparam("name"))
# the writes of a create and a delete (reserve_vm, begin_operation, release_vm), for the same reason
_VM_EXISTS = select(_VM_TABLE.c.name).where(_VM_TABLE.c.name == bindparam("name"))
#: a VM held for a plan run (``Store.create_run``): PENDING with this reason, no operation making it yet
_HELD_VM = select(_VM_TABLE).where(
    _VM_TABLE.c.name == bindparam("name"),
    _VM_TABLE.c.state == VmState.PENDING.name,
    _VM_TABLE.c.state_reason.startswith(HELD_REASON_PREFIX, autoescape=True),
    ~exists().where(_OPERATION_TABLE.c.vm_name == _VM_TABLE.c.name, _OPERATION_TABLE.c.done.is_(False)),
)
#: the VMs whose room a plan run holds for their successors (``Store.create_run``'s ``hold_replaced``)
_HELD_FOR_RUN = select(_VM_TABLE).where(_VM_TABLE.c.held_for == bindparam("run")).with_for_update()
_PLAN_RUN_TABLE = cast(Table, PlanRunRow.__table__)
#: the plan of a run that is not done (none: done, or no such run)
_UNFINISHED_RUN_PLAN = select(_PLAN_RUN_TABLE.c.plan).where(
    _PLAN_RUN_TABLE.c.id == bindparam("run"), _PLAN_RUN_TABLE.c.state.in_(plans_store.UNFINISHED_STATES)
)
_INSERT_VM = insert(_VM_TABLE).returning(*_VM_TABLE.c)
_DELETE_VM = delete(_VM_TABLE).where(_VM_TABLE.c.name == bindparam("name"))
_OPERATION_EXISTS = select(_OPERATION_TABLE.c.id).where(_OPERATION_TABLE.c.id == bindparam("id"))
_OPERATION_BY_REQUEST_ID = select(_OPERATION_TABLE).where(_OPERATION_TABLE.c.request_id == bindparam("request_id"))
_INSERT_OPERATION = insert(_OPERATION_TABLE).returning(*_OPERATION_TABLE.c)
_HOSTS = select(_HOST_TABLE).order_by(_HOST_TABLE.c.name)
_HOST_NAMED = _HOSTS.where(_HOST_TABLE.c.name == bindparam("host"))
#: (all hosts, one host) x (read, locked for placement)
_PLACEMENT_HOSTS = {
    (False, False): _HOSTS,
    (False, True): _HOSTS.with_for_update(),
    (True, False): _HOST_NAMED,
    (True, True): _HOST_NAMED.with_for_update(),
}
_ALLOCATIONS = (
    select(
        _VM_TABLE.c.host,
        func.coalesce(func.sum(_VM_TABLE.c.reserved_vcpus), 0),
        func.coalesce(func.sum(_VM_TABLE.c.reserved_memory_mib), 0),
        func.coalesce(func.sum(_VM_TABLE.c.reserved_disk_mib), 0),
        func.count(),
    )
    .where(_VM_TABLE.c.host.is_not(None))
    .group_by(_VM_TABLE.c.host)
)
_ALLOCATIONS_OF = _ALLOCATIONS.where(_VM_TABLE.c.host.in_(bindparam("hosts", expanding=True)))
_VOLUME_TABLE = cast(Table, VolumeReservationRow.__table__)
_VOLUME_DISK = select(_VOLUME_TABLE.c.host, func.sum(_VOLUME_TABLE.c.size_mib)).group_by(_VOLUME_TABLE.c.host)
_VOLUME_DISK_OF = _VOLUME_DISK.where(_VOLUME_TABLE.c.host.in_(bindparam("hosts", expanding=True)))
_VOLUME_RESERVED = select(_VOLUME_TABLE.c.size_mib).where(
    _VOLUME_TABLE.c.host == bindparam("host"), _VOLUME_TABLE.c.name == bindparam("name")
)
#: a volume reservation its holding run takes over (no row: not held by that run)
_CLAIM_VOLUME = (
    update(_VOLUME_TABLE)
    .where(
        _VOLUME_TABLE.c.host == bindparam("b_host"),
        _VOLUME_TABLE.c.name == bindparam("b_name"),
        _VOLUME_TABLE.c.held_by == bindparam("b_holder"),
    )
    .values(held_by=None)
)
_RELEASE_HELD_VOLUMES = delete(_VOLUME_TABLE).where(_VOLUME_TABLE.c.held_by == bindparam("run"))
_VOLUME_HOSTS = select(_VOLUME_TABLE.c.name, _VOLUME_TABLE.c.host).where(
    _VOLUME_TABLE.c.name.in_(bindparam("names", expanding=True))
)
_INSERT_VOLUME = insert(_VOLUME_TABLE)
_DELETE_VOLUME = delete(_VOLUME_TABLE).where(
    _VOLUME_TABLE.c.host == bindparam("host"), _VOLUME_TABLE.c.name == bindparam("name")
)
_LABEL_TABLE = cast(Table, VmLabelRow.__table__)
_DELETE_LABELS = delete(_LABEL_TABLE).where(_LABEL_TABLE.c.vm_name == bindparam("vm_name"))
_INSERT_LABELS = insert(_LABEL_TABLE)
_CHANGE_TABLE = cast(Table, VmChangeRow.__table__)
_INSERT_CHANGE = insert(_CHANGE_TABLE)


def _room(r: Resources) -> dict[str, int]:
    """The reservation columns of a VM row that reserves ``r``."""
    return {"reserved_vcpus": r.vcpus, "reserved_memory_mib": r.memory_mib, "reserved_disk_mib": r.disk_mib}


def _reserved(row: Row[Any] | VmRow) -> Resources:
    """The room a VM row reserves on its host."""
    return Resources(row.reserved_vcpus, row.reserved_memory_mib, row.reserved_disk_mib)


def _same_spec(stored: Mapping[str, Any], spec: VmSpec) -> bool:
    """Whether a spec column holds ``spec`` (decoded and encoded again: JSON keeps no tuples)."""
    return codec.spec_to_json(codec.spec_from_json(stored)) == codec.spec_to_json(spec)


def _vm_name_of_target(target: str) -> str | None:
    """Return the VM a resource name points at: ``hosts/h/vms/web`` or ``vms/web`` -> ``web``."""
    parts = target.split("/")
    for i, part in enumerate(parts[:-1]):
        if part == "vms" and parts[i + 1]:
            return parts[i + 1]
    return None


def encode_page_token(last_name: str) -> str:
    """Opaque keyset page token for the page after ``last_name``."""
    return base64.urlsafe_b64encode(last_name.encode()).decode().rstrip("=")


def decode_page_token(token: str) -> str:
    """Return the VM name a page token continues after; InvalidArgument for foreign tokens."""
    try:
        name = base64.b64decode(token + "=" * (-len(token) % 4), altchars=b"-_", validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        name = ""
    # a token is only valid if it is exactly what encode_page_token would have produced
    if not name or encode_page_token(name) != token:
        raise InvalidArgument(
            "page_token: not a token returned by a previous call",
            reason="INVALID_PAGE_TOKEN",
            metadata={"field": "page_token"},
        )
    return name


def _older_news(row: Row[Any], revision: Revision, *, answer: bool) -> bool:
    """
    Whether a report at the agent's ``revision`` is older than what ``row`` records.

    An event at the recorded revision is old (the answer that recorded it covered it); an operation's
    answer at the recorded revision is not: nothing happened on the agent since, and the operation's
    own steps (STOPPING, ...) must still end with what the agent says now. Epochs grow with every
    agent start, so a report of a lower epoch comes from an agent process that has ended: an event held
    while an operation ran, retried after the operation's answer from the restarted agent. (An agent
    whose journal was recreated starts again at a lower epoch; its registration clears the revisions
    recorded above it, see ``upsert_host_registration``.)
    """
    seen: int | None = row.agent_sequence
    if row.agent_epoch is None or seen is None:
        return False
    recorded = Revision(row.agent_epoch, seen)
    if answer and revision == recorded:
        return False
    return recorded.covers(revision)


def _is_retryable(exc: DBAPIError) -> bool:
    orig = exc.orig
    if getattr(orig, "sqlstate", None) in _RETRYABLE_SQLSTATES:
        return True
    # SQLite: the busy timeout ran out (another process held the write lock for that long)
    return isinstance(orig, sqlite3.OperationalError) and "locked" in str(orig)


class Store:
    """Fleet state of the controller. Thread-safe: each call runs in its own session/transaction."""

    def __init__(
        self,
        engine: Engine,
        *,
        clock: Callable[[], datetime] = _utcnow,
        tombstone_retention: int = 10_000,
        max_attempts: int = 8,
        audit_keyring: Keyring | None = None,
        audit_head_file: HeadFile | None = None,
        on_audit_append: Callable[[float], None] | None = None,
        on_change: Callable[[Iterable[ChangeKey]], None] | None = None,
    ) -> None:
        """
        Wrap an engine made by :func:`create_store_engine` whose schema is already at head.

        ``clock`` returns aware UTC "now" (tests inject a fake one); ``tombstone_retention`` is how
        many VM deletions watchers can catch up on before they must relist; ``max_attempts`` bounds
        retries of transactions that hit a deadlock, serialization failure or busy SQLite.

        ``audit_keyring`` signs audit records (without one a random per-process key is used, which
        suits tests only: the chain stops verifying after a restart); ``audit_head_file`` witnesses
        every new head outside the database; ``on_audit_append`` hears each appending transaction's
        seconds (metrics); ``on_change`` hears, after each commit and on the committing thread, the
        records it changed that waiters watch (VMs, operations, health: ``clonebox_core.changes``).
        """
        self._engine = engine
        self._on_change = on_change
        if audit_keyring is None:
            _log.warning("no audit key configured: using a random key for this process only")
            audit_keyring = Keyring({"ephemeral": os.urandom(32)}, "ephemeral")
        self.audit_keyring = audit_keyring
        self._audit_head_file = audit_head_file
        self._on_audit_append = on_audit_append
        self._clock = clock
        self._write_options: dict[str, Any] = {WRITE_OPTION: True}
        # Reads span several statements (changes_since reads live rows, then tombstones); under
        # PostgreSQL's default READ COMMITTED a commit between them could hide a revision below one
        # that is returned, and a watcher would skip it for good. A read-only REPEATABLE READ
        # transaction sees one snapshot and never fails to serialize. SQLite's read transactions
        # (deferred BEGIN in WAL mode) are snapshots already.
        self._read_options: dict[str, Any] = (
            {"isolation_level": "REPEATABLE READ"} if engine.dialect.name == "postgresql" else {}
        )
        self._tombstone_retention = tombstone_retention
        self._max_attempts = max_attempts

    @classmethod
    def open(
        cls,
        url: str,
        *,
        clock: Callable[[], datetime] = _utcnow,
        tombstone_retention: int = 10_000,
        migrate: bool = True,
        audit_keyring: Keyring | None = None,
        audit_head_file: HeadFile | None = None,
        on_audit_append: Callable[[float], None] | None = None,
        on_change: Callable[[Iterable[ChangeKey]], None] | None = None,
        **engine_kwargs: Any,
    ) -> Self:
        """Connect to ``url`` (``sqlite:///path`` or ``postgresql+psycopg://...``) and migrate to head."""
        engine = create_store_engine(url, **engine_kwargs)
        try:
            if migrate:
                upgrade_to_head(engine)
        except BaseException:
            engine.dispose()
            raise
        return cls(
            engine,
            clock=clock,
            tombstone_retention=tombstone_retention,
            audit_keyring=audit_keyring,
            audit_head_file=audit_head_file,
            on_audit_append=on_audit_append,
            on_change=on_change,
        )

    def close(self) -> None:
        """Release pooled connections."""
        self._engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @property
    def engine(self) -> Engine:
        """The underlying engine (for diagnostics and tests; the app layer must not use it)."""
        return self._engine

    # ------------------------------------------------------------------ transactions

    def _run(self, fn: Callable[[Session], T], *, write: bool, retry_integrity: bool = False) -> T:
        """
        Run ``fn`` in one transaction, retrying transient conflicts.

        ``retry_integrity`` retries once on a unique-key race (two controllers inserting the same
        new key); the second attempt sees the winner's row and takes the "exists" branch.
        """

        def attempt() -> T:
            started = time.perf_counter()
            with Session(self._engine, expire_on_commit=False) as session:
                with session.begin():
                    # must be the first use of the session: options apply when the connection is
                    # procured, before BEGIN is emitted
                    session.connection(execution_options=self._write_options if write else self._read_options)
                    result = fn(session)
                head = session.info.pop(audit_store.HEAD_INFO_KEY, None)
                changed = session.info.pop(_CHANGES_INFO_KEY, None)
            if head is not None:
                self._after_audit_commit(head, time.perf_counter() - started)
            if changed and self._on_change is not None:
                self._on_change(changed)
            return result

        return self._retrying(attempt, retry_integrity)

    def _read(self, fn: Callable[[Connection], T]) -> T:
        """
        Run the read-only ``fn`` in one transaction on a plain connection, retrying transient conflicts.

        For the reads the controller makes for every VM step (a VM, an operation, a host's endpoint, a
        plan run): Core statements on a connection cost about a fifth of the CPU of an ORM session
        (no unit of work, identity map or ORM compilation), and that CPU was most of a plan's
        overhead per VM (``docs/benchmarks.md``, Plans). The isolation is that of ``_run``'s reads.
        """

        def attempt() -> T:
            with self._engine.connect() as conn:
                conn.execution_options(**self._read_options)
                with conn.begin():
                    return fn(conn)

        return self._retrying(attempt, retry_integrity=False)

    def _retrying(self, attempt_once: Callable[[], T], retry_integrity: bool) -> T:
        attempt = 0
        integrity_retried = False
        while True:
            attempt += 1
            try:
                return attempt_once()
            except IntegrityError:
                if not retry_integrity or integrity_retried:
                    raise
                integrity_retried = True
            except DBAPIError as exc:
                if attempt >= self._max_attempts or not _is_retryable(exc):
                    raise
                _log.debug("retrying store transaction after %s (attempt %d)", exc.orig, attempt)
                time.sleep(random.uniform(0.005, 0.02) * attempt)

    def _after_audit_commit(self, head: Head, seconds: float) -> None:
        if self._on_audit_append is not None:
            self._on_audit_append(seconds)
        if self._audit_head_file is not None:
            try:
                self._audit_head_file.append(head)
            except OSError as exc:
                # the records are committed; a lagging witness only weakens truncation detection
                _log.error("cannot write the audit head file %s: %s", self._audit_head_file.path, exc)

    def _audit(self, session: Session, events: Sequence[AuditEvent] | AuditEvent | None) -> None:
        if events is None:
            return
        audit_store.append(session, self.audit_keyring, [events] if isinstance(events, AuditEvent) else events)

    def _now(self) -> datetime:
        now = self._clock()
        if now.tzinfo is None:
            raise ValueError("the store clock must return aware datetimes")
        return now.astimezone(UTC)

    @staticmethod
    def _lock_revision(session: Session) -> None:
        """Take the fleet_revision row lock (step 1 of the lock order; a no-op on SQLite)."""
        # on the connection, not through the ORM: every VM write does this and the next statement,
        # and the ORM's statement handling and autoflush cost more than the statements themselves
        session.connection().execute(_LOCK_REVISION)

    @staticmethod
    def _changed(session: Session, *keys: ChangeKey) -> None:
        """Announce ``keys`` once this transaction commits (``on_change``; a rollback announces nothing)."""
        session.info.setdefault(_CHANGES_INFO_KEY, set()).update(keys)

    def _vm_revision(self, session: Session, name: str) -> int:
        """The next fleet revision, for a change to VM ``name`` (announced after the commit)."""
        self._changed(session, vm_key(name))
        return self._next_revision(session)

    @staticmethod
    def _next_revision(session: Session) -> int:
        return int(session.connection().execute(_NEXT_REVISION).scalar_one())

    # ------------------------------------------------------------------ row <-> model

    @staticmethod
    def _vm_model(row: VmRow | Row[Any]) -> Vm:
        return Vm(
            name=row.name,
            host=row.host or "",
            state=VmState[row.state],
            spec=codec.spec_from_json(row.spec),
            uuid=row.uuid,
            addresses=codec.addresses_from_json(row.addresses),
            create_time=row.create_time,
            update_time=row.update_time,
            state_reason=row.state_reason,
        )

    @staticmethod
    def _op_model(row: OperationRow | Row[Any]) -> Operation:
        return Operation(
            id=row.id,
            kind=row.kind,
            target=row.target,
            request_id=row.request_id or "",
            step=row.step,
            progress=row.progress,
            done=row.done,
            error_code=row.error_code,
            error_reason=row.error_reason,
            error_message=row.error_message,
            error_metadata={str(k): str(v) for k, v in row.error_metadata.items()},
            result_vm=None if row.result_vm is None else codec.vm_from_json(row.result_vm),
            create_time=row.create_time,
            update_time=row.update_time,
            params={str(k): str(v) for k, v in row.params.items()},
        )

    @staticmethod
    def _allocations(conn: Connection, hosts: Iterable[str] | None = None) -> dict[str, tuple[Resources, int]]:
        """Per host: the sum of reservations of its VMs and volumes, and how many VMs it has."""
        names = None if hosts is None else {"hosts": list(hosts)}
        rows = conn.execute(_ALLOCATIONS) if names is None else conn.execute(_ALLOCATIONS_OF, names)
        out: dict[str, tuple[Resources, int]] = {}
        for host, vcpus, memory, disk, count in rows:
            if host is not None:
                out[host] = (Resources(int(vcpus), int(memory), int(disk)), int(count))
        volumes = conn.execute(_VOLUME_DISK) if names is None else conn.execute(_VOLUME_DISK_OF, names)
        for host, disk in volumes:
            held, count = out.get(host, (Resources(), 0))
            out[host] = (held + Resources(0, 0, int(disk)), count)
        return out

    def _free(self, conn: Connection, host: HostRow) -> Resources:
        """What ``host`` has left: what it offers less its VMs' and volumes' reservations."""
        return self._allocatable(host) - self._allocations(conn, [host.name]).get(host.name, (Resources(), 0))[0]

    @staticmethod
    def _host_model(row: HostRow, allocated: Resources, vm_count: int) -> Host:
        return Host(
            name=row.name,
            address=row.address,
            capacity=Resources(row.capacity_vcpus, row.capacity_memory_mib, row.capacity_disk_mib),
            allocatable=Store._allocatable(row),
            allocated=allocated,
            hypervisor=codec.hypervisor_from_json(row.hypervisor),
            state=HostState[row.state],
            cordoned=row.cordoned,
            last_heartbeat=row.last_heartbeat,
            vm_count=vm_count,
            agent_epoch=row.agent_epoch,
        )

    @staticmethod
    def _allocatable(row: HostRow | Row[Any]) -> Resources:
        return Resources(row.allocatable_vcpus, row.allocatable_memory_mib, row.allocatable_disk_mib)

    def _host_with_allocation(self, session: Session, row: HostRow) -> Host:
        allocated, count = self._allocations(session.connection(), [row.name]).get(row.name, (Resources(), 0))
        return self._host_model(row, allocated, count)

    @staticmethod
    def _host_row(session: Session, name: str, *, lock: bool = False) -> HostRow:
        query = select(HostRow).where(HostRow.name == name)
        if lock:
            query = query.with_for_update()
        row = session.execute(query).scalar_one_or_none()
        if row is None:
            raise NotFound(f"host {name!r} is not registered", reason="HOST_NOT_FOUND", metadata={"host": name})
        return row

    @staticmethod
    def _vm_row(session: Session, name: str, *, lock: bool = False) -> VmRow:
        query = select(VmRow).where(VmRow.name == name)
        if lock:
            query = query.with_for_update()
        row = session.execute(query).scalar_one_or_none()
        if row is None:
            raise _vm_not_found(name)
        return row

    @staticmethod
    def _set_labels(session: Session, vm_name: str, labels: Iterable[tuple[str, str]]) -> None:
        conn = session.connection()
        conn.execute(_DELETE_LABELS, {"vm_name": vm_name})
        rows = [{"vm_name": vm_name, "key": k, "value": v} for k, v in dict(labels).items()]
        if rows:
            conn.execute(_INSERT_LABELS, rows)

    # ------------------------------------------------------------------ hosts

    def upsert_host_registration(
        self,
        name: str,
        address: str,
        capacity: Resources,
        allocatable: Resources,
        hypervisor: HypervisorInfo,
        epoch: int,
    ) -> Host:
        """
        Record an agent's (re-)registration: the host becomes READY with a fresh heartbeat.

        Cordoning survives re-registration (it is the operator's decision, not the agent's). A new
        ``epoch`` means the agent's event history restarted, so the consumed sequence resets to 0.
        """

        def tx(session: Session) -> Host:
            now = self._now()
            row = session.execute(select(HostRow).where(HostRow.name == name).with_for_update()).scalar_one_or_none()
            if row is None:
                row = HostRow(
                    name=name,
                    cordoned=False,
                    registered_time=now,
                    agent_epoch=epoch,
                    agent_sequence=0,
                )
                session.add(row)
            elif row.agent_epoch != epoch:
                row.agent_epoch = epoch
                row.agent_sequence = 0
                # a lower epoch: the agent's journal was recreated; revisions recorded above it would
                # make every report of the new history look old (_older_news)
                session.execute(_FORGET_AGENT_REVISIONS, {"b_host": name, "b_epoch": epoch})
            row.address = address
            row.capacity_vcpus = capacity.vcpus
            row.capacity_memory_mib = capacity.memory_mib
            row.capacity_disk_mib = capacity.disk_mib
            row.allocatable_vcpus = allocatable.vcpus
            row.allocatable_memory_mib = allocatable.memory_mib
            row.allocatable_disk_mib = allocatable.disk_mib
            row.hypervisor = codec.hypervisor_to_json(hypervisor)
            row.state = HostState.READY.name
            row.state_reason = ""
            row.last_heartbeat = now
            session.flush()
            self._changed(session, host_key(name))
            return self._host_with_allocation(session, row)

        return self._run(tx, write=True, retry_integrity=True)

    def heartbeat(self, name: str, serving: bool = True, reason: str = "") -> Host:
        """Record a heartbeat: READY when ``serving``, else NOT_SERVING with ``reason``."""

        def tx(session: Session) -> Host:
            row = self._host_row(session, name, lock=True)
            row.last_heartbeat = self._now()
            state = (HostState.READY if serving else HostState.NOT_SERVING).name
            if row.state != state:
                self._changed(session, host_key(name))
            row.state = state
            row.state_reason = "" if serving else reason
            session.flush()
            return self._host_with_allocation(session, row)

        return self._run(tx, write=True)

    def mark_unreachable_older_than(self, cutoff: datetime) -> list[str]:
        """Mark hosts whose last heartbeat is before ``cutoff`` UNREACHABLE; return their names."""

        def tx(session: Session) -> list[str]:
            rows = session.execute(
                select(HostRow)
                .where(
                    HostRow.state != HostState.UNREACHABLE.name,
                    HostRow.last_heartbeat < cutoff,
                )
                .order_by(HostRow.name)
                .with_for_update()
            ).scalars()
            names = []
            for row in rows:
                row.state = HostState.UNREACHABLE.name
                last = row.last_heartbeat.isoformat() if row.last_heartbeat else "never"
                row.state_reason = f"no heartbeat since {last}"
                names.append(row.name)
            self._changed(session, *(host_key(n) for n in names))
            return names

        return self._run(tx, write=True)

    def set_host_state(self, name: str, state: HostState, reason: str = "") -> Host:
        """Set a host's state directly (e.g. UNREACHABLE when its agent's session ends)."""

        def tx(session: Session) -> Host:
            row = self._host_row(session, name, lock=True)
            row.state = state.name
            row.state_reason = reason
            session.flush()
            self._changed(session, host_key(name))
            return self._host_with_allocation(session, row)

        return self._run(tx, write=True)

    def set_cordoned(self, name: str, cordoned: bool, audit: AuditEvent | None = None) -> Host:
        """Cordon (no new placements) or uncordon a host; VMs already on it are untouched."""

        def tx(session: Session) -> Host:
            row = self._host_row(session, name, lock=True)
            row.cordoned = cordoned
            session.flush()
            self._changed(session, host_key(name))
            self._audit(session, audit)
            return self._host_with_allocation(session, row)

        return self._run(tx, write=True)

    def get_host(self, name: str) -> Host:
        """One host with its allocation; NotFound HOST_NOT_FOUND."""
        return self._run(lambda s: self._host_with_allocation(s, self._host_row(s, name)), write=False)

    def get_host_endpoint(self, name: str) -> HostEndpoint:
        """Where host ``name``'s agent listens and its state, without counting its VMs; NotFound HOST_NOT_FOUND."""

        def tx(conn: Connection) -> HostEndpoint:
            missing = NotFound(f"host {name!r} is not registered", reason="HOST_NOT_FOUND", metadata={"host": name})
            found = _one(conn, _HOST_ENDPOINT, {"name": name}, missing)
            return HostEndpoint(name, found.address, HostState[found.state])

        return self._read(tx)

    def list_hosts(self) -> list[Host]:
        """Every host, by name, with ``allocated`` = sum of its VMs' reservations and ``vm_count``."""

        def tx(session: Session) -> list[Host]:
            allocations = self._allocations(session.connection())
            rows = session.execute(select(HostRow).order_by(HostRow.name)).scalars()
            return [self._host_model(row, *allocations.get(row.name, (Resources(), 0))) for row in rows]

        return self._run(tx, write=False)

    def count_hosts_by_state(self) -> dict[HostState, int]:
        """How many hosts are in each state (one grouped query; states with no host are absent)."""

        def tx(session: Session) -> dict[HostState, int]:
            rows = session.execute(select(HostRow.state, func.count()).group_by(HostRow.state))
            return {HostState[state]: int(count) for state, count in rows}

        return self._run(tx, write=False)

    def count_vms_by_state(self) -> dict[VmState, int]:
        """How many VMs are in each state (one grouped query; states with no VM are absent)."""

        def tx(session: Session) -> dict[VmState, int]:
            rows = session.execute(select(VmRow.state, func.count()).group_by(VmRow.state))
            return {VmState[state]: int(count) for state, count in rows}

        return self._run(tx, write=False)

    def set_agent_revision(self, name: str, epoch: int, sequence: int) -> None:
        """Record the last agent event consumed, so a reconnect resumes after it."""

        def tx(session: Session) -> None:
            row = self._host_row(session, name, lock=True)
            row.agent_epoch = epoch
            row.agent_sequence = sequence

        self._run(tx, write=True)

    def agent_revision(self, name: str) -> Revision:
        """Return the last agent event consumed for host ``name``."""

        def tx(session: Session) -> Revision:
            row = self._host_row(session, name)
            return Revision(row.agent_epoch, row.agent_sequence)

        return self._run(tx, write=False)

    def remove_host(self, name: str) -> None:
        """Forget a host; FailedPrecondition HOST_HAS_VMS while the store places VMs on it."""

        def tx(session: Session) -> None:
            row = self._host_row(session, name, lock=True)
            count = session.execute(select(func.count()).select_from(VmRow).where(VmRow.host == name)).scalar_one()
            if count:
                raise FailedPrecondition(
                    f"host {name!r} still has {count} VM(s): delete or move them first",
                    reason="HOST_HAS_VMS",
                    metadata={"host": name},
                )
            session.delete(row)
            self._changed(session, host_key(name))

        self._run(tx, write=True)

    # ------------------------------------------------------------------ volumes

    def reserve_volume(self, host: str, name: str, size_mib: int, *, holder: str = "") -> bool:
        """
        Reserve ``size_mib`` of disk on ``host`` for its agent's volume ``name``; True when newly reserved.

        Placement counts the reservation as it counts a VM's disks, so a volume's room cannot be given to
        a VM. Idempotent: a volume reserved there already keeps its reservation (False; whether an
        existing volume matches is the agent's to say). ``holder``: the plan run making the volume; the
        reservation that run holds for it (:meth:`create_run`) becomes this create's (True, as if newly
        reserved: a failed create frees it). Errors: NotFound HOST_NOT_FOUND; ResourceExhausted
        HOST_CAPACITY_EXCEEDED when the host's free disk (what it offers less its VMs' and volumes'
        reservations) is smaller.
        """

        def tx(session: Session) -> bool:
            claim = {"b_host": host, "b_name": name, "b_holder": holder}
            if holder and session.connection().execute(_CLAIM_VOLUME, claim).rowcount > 0:
                return True
            return self._reserve_volume_row(session, host, name, size_mib)

        return self._run(tx, write=True, retry_integrity=True)

    def _reserve_volume_row(self, session: Session, host: str, name: str, size_mib: int, held_by: str = "") -> bool:
        """Reserve a volume's disk on ``host`` if it fits (see :meth:`reserve_volume`); False when reserved already."""
        row = self._host_row(session, host, lock=True)  # one placement at a time on this host
        conn = session.connection()
        if conn.execute(_VOLUME_RESERVED, {"host": host, "name": name}).first() is not None:
            return False
        need = Resources(0, 0, size_mib)
        free = self._free(conn, row)
        if not need.fits_in(free):
            raise ResourceExhausted(
                f"host {host!r} has no room for volume {name!r} ({size_mib} MiB): "
                f"{placement.shortfall(need, free)}; free disk on the host or make the volume smaller",
                reason="HOST_CAPACITY_EXCEEDED",
                metadata={"host": host, "volume": name},
            )
        conn.execute(
            _INSERT_VOLUME,
            {"host": host, "name": name, "size_mib": size_mib, "create_time": self._now(), "held_by": held_by or None},
        )
        return True

    def adopt_volumes(self, host: str, listed: Sequence[tuple[str, int]]) -> list[str]:
        """
        Reserve the disk of every volume ``(name, size_mib)`` the host's agent listed that holds none yet.

        For volumes made outside a reservation (before migration 0006, or through the agent's own API):
        they take their room on the host's disk whether or not it fits, so there is no capacity check.
        Never releases: a reservation whose volume is not listed may belong to a create still in flight
        (``reserve_volume`` comes before the agent's create), so only ``release_volume`` frees one.
        Returns the adopted names, sorted; NotFound HOST_NOT_FOUND.
        """

        def tx(session: Session) -> list[str]:
            self._host_row(session, host, lock=True)  # serialized with placements on this host
            conn = session.connection()
            held = set(conn.execute(select(_VOLUME_TABLE.c.name).where(_VOLUME_TABLE.c.host == host)).scalars())
            now = self._now()
            new = sorted((name, size) for name, size in dict(listed).items() if name not in held)
            for name, size in new:
                conn.execute(_INSERT_VOLUME, {"host": host, "name": name, "size_mib": size, "create_time": now})
            return [name for name, _size in new]

        return self._run(tx, write=True, retry_integrity=True)

    def release_volume(self, host: str, name: str) -> bool:
        """Free the disk reserved for volume ``name`` on ``host`` (the volume is gone); False when none was."""
        return self._run(
            lambda session: session.connection().execute(_DELETE_VOLUME, {"host": host, "name": name}).rowcount > 0,
            write=True,
        )

    # ------------------------------------------------------------------ placement

    def reserve_vm(
        self,
        spec: VmSpec,
        host: str | None,
        op: Operation,
        audit: AuditEvent | Sequence[AuditEvent] | None = None,
        *,
        creating_step: str = "",
    ) -> tuple[Operation, Vm | None]:
        """
        Place ``spec`` and record the VM (PENDING, resources reserved) and ``op``, atomically.

        ``host`` pins the VM to that host; None lets placement choose (see :mod:`.placement`).
        ``creating_step`` (a text with ``{host}``): the caller asks the chosen host for the VM next, so
        the VM is recorded CREATING and ``op`` at that step (progress 20) in this same transaction: a
        create's acceptance and its first step are one commit, not two.

        A VM of that name that a plan run holds (:meth:`create_run`) with the same spec, on ``host``
        when one is given, is not placed again: the create starts from its record and its room. If its
        host takes no new VMs since (cordoned, unreachable, not serving), the hold is given up and the
        VM placed as any other, in this transaction: elsewhere, or refused with the host's error when
        ``host`` names it (the hold is then kept, for the run to release).

        Idempotent on ``op.request_id``: when an operation with that request id exists, it is
        returned together with the VM's current record (None if the VM has since been deleted) and
        nothing is written; callers detect the replay by ``returned_op.id != op.id``. Reusing a
        request id for a different kind or target is AlreadyExists REQUEST_ID_REUSED.

        Errors: AlreadyExists VM_ALREADY_EXISTS; NotFound HOST_NOT_FOUND; FailedPrecondition
        HOST_CORDONED / HOST_UNREACHABLE / HOST_NOT_SERVING; ResourceExhausted
        HOST_CAPACITY_EXCEEDED (named host) or NO_HOST_FITS (with the reason per host).
        ``audit`` is appended to the audit chain in the same transaction (not on a replay).
        """

        def tx(session: Session) -> tuple[Operation, Vm | None]:
            # Core, not the ORM: every create runs this (see _read)
            conn = session.connection()
            now = self._now()
            held = conn.execute(_HELD_VM, {"name": spec.name}).one_or_none()
            if held is not None and held.held_for is not None:
                # the room of the VM this one replaces: taken with any spec that fits in it, on its host
                if host not in (None, held.host) or not spec.resources().fits_in(_reserved(held)):
                    self._delete_vm_row(session, held)
                    held = None
            elif held is not None and (host not in (None, held.host) or not _same_spec(held.spec, spec)):
                held = None  # not this create's: placing below refuses the name (VM_ALREADY_EXISTS)
            if held is not None and self._closed_host(conn, held.host) is not None:
                # cordoned or down since the apply: a hold keeps room, it does not bind the VM to a host
                # that takes no new VMs (no create would be accepted there now)
                self._delete_vm_row(session, held)
                held = None
            if held is not None:
                # held for a plan run (create_run): its room is reserved and its host chosen already
                claim: dict[str, Any] = {
                    "b_name": held.name,
                    "state": (VmState.CREATING if creating_step else VmState.PENDING).name,
                    "state_reason": "",
                    "update_time": now,
                    "revision": self._vm_revision(session, held.name),
                }
                if held.held_for is not None:
                    # a successor: its own spec and room (no more than was held), its own labels
                    claim |= {"spec": codec.spec_to_json(spec), **_room(spec.resources()), "held_for": None}
                    self._set_labels(session, spec.name, spec.labels)
                vm_row = conn.execute(_UPDATE_VM, claim).one()
            else:
                vm_row = self._hold_vm(session, spec, host, now, creating=bool(creating_step))
            stored_op = op
            if creating_step:
                stored_op = dataclasses.replace(op, step=creating_step.format(host=vm_row.host), progress=20)
            op_row = self._insert_operation(conn, stored_op, now, vm_name=spec.name)
            self._audit(session, audit)
            return self._op_model(op_row), self._vm_model(vm_row)

        return self._once_per_request(op, tx)

    def _hold_vm(
        self,
        session: Session,
        spec: VmSpec,
        host: str | None,
        now: datetime,
        *,
        creating: bool = False,
        reason: str = "",
    ) -> Row[Any]:
        """Place ``spec`` and record it PENDING (``creating``: CREATING) with its room reserved; the new row."""
        chosen = self._place(session.connection(), spec, host, lock=True)
        state = VmState.CREATING if creating else VmState.PENDING
        row = self._insert_vm_row(
            session, spec.name, chosen, state, codec.spec_to_json(spec), spec.resources(), now, reason
        )
        self._set_labels(session, spec.name, spec.labels)
        return row

    def _insert_vm_row(
        self,
        session: Session,
        name: str,
        host: str,
        state: VmState,
        spec: Mapping[str, Any],
        room: Resources,
        now: datetime,
        reason: str,
        held_for: str | None = None,
    ) -> Row[Any]:
        """Insert the row of a VM not made yet (no uuid, no address) that reserves ``room`` on ``host``."""
        return (
            session.connection()
            .execute(
                _INSERT_VM,
                {
                    "name": name,
                    "host": host,
                    "state": state.name,
                    "spec": spec,
                    "uuid": "",
                    "addresses": [],
                    **_room(room),
                    "create_time": now,
                    "update_time": now,
                    "state_reason": reason,
                    "revision": self._vm_revision(session, name),
                    "held_for": held_for,
                },
            )
            .one()
        )

    def reserve_update(
        self,
        spec: VmSpec,
        op: Operation,
        audit: AuditEvent | Sequence[AuditEvent] | None = None,
    ) -> tuple[Operation, Vm | None]:
        """
        Record ``spec`` as the new spec of the existing VM ``spec.name`` and ``op`` updating it, atomically.

        The reservation follows the spec. Growth (more vCPUs or memory than reserved) must fit in what
        the VM's host has free besides the VM itself: ResourceExhausted HOST_CAPACITY_EXCEEDED names
        the host and the shortfall. A shrink frees room at once. The previous values of the fields an
        update changes (:data:`clonebox_core.plan.UPDATABLE_FIELDS`, none of them secret: operations
        are readable by viewers) are kept in ``op.params["previous_spec"]`` so a failed update can put
        them back (:meth:`restore_spec`).

        Idempotent on ``op.request_id`` like :meth:`reserve_vm` (callers detect a replay by the id).
        Errors: NotFound VM_NOT_FOUND; AlreadyExists REQUEST_ID_REUSED.
        """

        def tx(session: Session) -> tuple[Operation, Vm | None]:
            row = self._vm_row(session, spec.name, lock=True)
            if row.host is None:
                raise FailedPrecondition(
                    f"VM {spec.name!r} has no host (it is being deleted); wait for it to go, or create it again",
                    reason="VM_NOT_PLACED",
                    metadata={"vm": spec.name},
                )
            host = row.host
            host_row = self._host_row(session, host, lock=True)
            need = spec.resources()
            held = _reserved(row)
            growth = Resources(max(0, need.vcpus - held.vcpus), max(0, need.memory_mib - held.memory_mib), 0)
            if growth != Resources():
                free = self._free(session.connection(), host_row)
                if not growth.fits_in(free):
                    raise ResourceExhausted(
                        f"host {host!r} has no room to grow VM {spec.name!r} to {placement.describe(need)}: "
                        f"{placement.shortfall(growth, free)}; free room on the host or ask for less",
                        reason="HOST_CAPACITY_EXCEEDED",
                        metadata={"host": host, "vm": spec.name},
                    )
            previous = json.dumps({k: v for k, v in row.spec.items() if k in UPDATABLE_FIELDS}, sort_keys=True)
            row.spec = codec.spec_to_json(spec)
            row.reserved_vcpus, row.reserved_memory_mib = need.vcpus, need.memory_mib
            row.update_time = self._now()
            row.revision = self._vm_revision(session, spec.name)
            self._set_labels(session, spec.name, spec.labels)
            session.flush()
            op_row = self._insert_operation(
                session.connection(),
                dataclasses.replace(op, params={**op.params, "previous_spec": previous}),
                self._now(),
                vm_name=spec.name,
            )
            self._audit(session, audit)
            return self._op_model(op_row), self._vm_model(row)

        return self._once_per_request(op, tx)

    def _once_per_request(
        self, op: Operation, body: Callable[[Session], tuple[Operation, Vm | None]]
    ) -> tuple[Operation, Vm | None]:
        """
        Run ``body`` in a write transaction under the revision lock, unless ``op.request_id`` was seen.

        A seen request id returns what it recorded (the operation and the VM's record now). It is
        looked up under the lock only: a read before it would make client retries (rare) cheaper at
        the cost of one more transaction for every first request (all of them).
        """

        def tx(session: Session) -> tuple[Operation, Vm | None]:
            self._lock_revision(session)
            if op.request_id:
                replay = self._replay(session, op)
                if replay is not None:
                    return replay
            return body(session)

        return self._run(tx, write=True, retry_integrity=True)

    def restore_spec(self, name: str, previous: str) -> Vm | None:
        """
        Put back the fields :meth:`reserve_update` replaced (the update failed), reservation included.

        ``previous`` is what it kept in the operation's params. None when the VM is gone meanwhile.
        """

        def tx(session: Session) -> Vm | None:
            self._lock_revision(session)
            row = session.get(VmRow, name, with_for_update=True)
            if row is None:
                return None
            kept = {k: v for k, v in row.spec.items() if k not in UPDATABLE_FIELDS}
            spec = codec.spec_from_json({**kept, **json.loads(previous)})
            need = spec.resources()
            row.spec = codec.spec_to_json(spec)
            row.reserved_vcpus, row.reserved_memory_mib = need.vcpus, need.memory_mib
            row.update_time = self._now()
            row.revision = self._vm_revision(session, name)
            self._set_labels(session, name, spec.labels)
            session.flush()
            return self._vm_model(row)

        return self._run(tx, write=True)

    def place(self, spec: VmSpec, host: str | None) -> str:
        """The host ``reserve_vm`` would choose now, reserving nothing (for dry runs); same errors."""
        return self._run(lambda session: self._place(session.connection(), spec, host, lock=False), write=False)

    def _place(self, conn: Connection, spec: VmSpec, host: str | None, *, lock: bool) -> str:
        if conn.execute(_VM_EXISTS, {"name": spec.name}).first() is not None:
            raise AlreadyExists(
                f"VM {spec.name!r} already exists",
                reason="VM_ALREADY_EXISTS",
                metadata={"vm": spec.name},
            )
        need = spec.resources()
        if host is None:
            host = self._volumes_host(conn, spec)
        rows = list(conn.execute(_PLACEMENT_HOSTS[host is not None, lock], {"host": host} if host is not None else {}))
        # read reservations only now, with the host rows locked, so they cannot change under us
        allocations = self._allocations(conn, [r.name for r in rows])
        candidates = [
            placement.Candidate(
                name=r.name,
                state=HostState[r.state],
                cordoned=r.cordoned,
                allocatable=self._allocatable(r),
                reserved=allocations.get(r.name, (Resources(), 0))[0],
            )
            for r in rows
        ]
        if host is not None:
            return placement.check_named(candidates[0] if candidates else None, host, need)
        return placement.choose(candidates, need)

    @staticmethod
    def _closed_host(conn: Connection, name: str) -> str | None:
        """Why host ``name`` takes no new VM (``placement.closed``; "not registered"), or None when it does."""
        row = conn.execute(_HOST_NAMED, {"host": name}).one_or_none()
        if row is None:
            return "not registered"
        return placement.closed(HostState[row.state], row.cordoned)

    @staticmethod
    def _volumes_host(conn: Connection, spec: VmSpec) -> str | None:
        """
        The host whose volumes ``spec`` attaches (None: it attaches none): a volume's data stays on its host.

        Where each volume is comes from the volume reservations (every volume made through the controller,
        and those adopted from a host's listing). NotFound VOLUME_NOT_FOUND for one on no host;
        FailedPrecondition VOLUMES_ON_DIFFERENT_HOSTS for volumes that no one host has; InvalidArgument
        naming ``host`` when a volume's name is on several hosts (the caller must say which).
        """
        wanted = {d.volume: i for i, d in enumerate(spec.disks) if d.volume}
        if not wanted:
            return None
        where: dict[str, list[str]] = {}
        for row in conn.execute(_VOLUME_HOSTS, {"names": sorted(wanted)}):
            where.setdefault(row.name, []).append(row.host)
        for name, i in wanted.items():
            if name not in where:
                raise NotFound(
                    f"volume {name} is on no host: create it first ('clonebox volume create {name} --host H')",
                    reason="VOLUME_NOT_FOUND",
                    metadata={"volume": name, "field": f"spec.disks[{i}].volume"},
                )
        ambiguous = {n: sorted(h) for n, h in where.items() if len(h) > 1}
        if ambiguous:
            name, on = next(iter(sorted(ambiguous.items())))
            raise invalid_field("host", f"volume {name} is on hosts {', '.join(on)}: say which (--host)")
        chosen = {where[n][0] for n in wanted}
        if len(chosen) > 1:
            spread = ", ".join(f"{n} on {where[n][0]}" for n in sorted(wanted))
            raise FailedPrecondition(
                f"VM {spec.name} attaches volumes on different hosts ({spread}): a VM runs on one host",
                reason="VOLUMES_ON_DIFFERENT_HOSTS",
                metadata={"vm": spec.name},
            )
        return chosen.pop()

    def _replay(self, session: Session, op: Operation) -> tuple[Operation, Vm | None] | None:
        conn = session.connection()
        existing = self._check_request_id(conn, op)
        if existing is None:
            return None
        vm_name = _vm_name_of_target(existing.target)
        vm_row = conn.execute(_VM_BY_NAME, {"name": vm_name}).one_or_none() if vm_name else None
        if vm_row is not None:
            return self._op_model(existing), self._vm_model(vm_row)
        model = self._op_model(existing)
        return model, model.result_vm

    def _check_request_id(self, conn: Connection, op: Operation) -> Row[Any] | None:
        """Return the operation already recorded for ``op.request_id``, if any (conflicts raise)."""
        if not op.request_id:
            return None
        existing = conn.execute(_OPERATION_BY_REQUEST_ID, {"request_id": op.request_id}).one_or_none()
        if existing is not None and (existing.kind != op.kind or existing.target != op.target):
            raise AlreadyExists(
                f"request id {op.request_id!r} was already used for {existing.kind} of "
                f"{existing.target}; use a new request id for a different request",
                reason="REQUEST_ID_REUSED",
                metadata={"request_id": op.request_id, "operation": existing.id},
            )
        return existing

    @staticmethod
    def _insert_operation(conn: Connection, op: Operation, now: datetime, *, vm_name: str | None) -> Row[Any]:
        """Insert ``op`` as a running operation; the new row."""
        return conn.execute(
            _INSERT_OPERATION,
            {
                "id": op.id,
                "kind": op.kind,
                "target": op.target,
                "vm_name": vm_name,
                "request_id": op.request_id or None,
                "step": op.step,
                "progress": op.progress,
                "done": False,
                "error_code": "",
                "error_reason": "",
                "error_message": "",
                "error_metadata": {},
                "result_vm": None,
                "params": dict(op.params),
                "create_time": now,
                "update_time": now,
            },
        ).one()

    # ------------------------------------------------------------------ VMs

    def get_vm(self, name: str) -> Vm:
        """One VM; NotFound VM_NOT_FOUND."""
        return self._read(lambda conn: self._vm_model(_one(conn, _VM_BY_NAME, {"name": name}, _vm_not_found(name))))

    def list_vms(
        self,
        host: str | None = None,
        state: VmState | None = None,
        labels: Mapping[str, str] | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
        page_token: str = "",
    ) -> tuple[list[Vm], str]:
        """
        VMs ordered by name, filtered (all filters must match), one page at a time.

        Returns the page and the token of the next page ("" on the last page). ``page_size`` <= 0
        means the default; it is capped at MAX_PAGE_SIZE. Pagination is keyset (by name), so pages
        stay consistent while VMs come and go.
        """
        size = DEFAULT_PAGE_SIZE if page_size <= 0 else min(page_size, MAX_PAGE_SIZE)
        after = decode_page_token(page_token) if page_token else None

        def tx(session: Session) -> tuple[list[Vm], str]:
            query = select(VmRow).order_by(VmRow.name).limit(size + 1)
            if after is not None:
                query = query.where(VmRow.name > after)
            if host is not None:
                query = query.where(VmRow.host == host)
            if state is not None:
                query = query.where(VmRow.state == state.name)
            for key, value in (labels or {}).items():
                query = query.where(self._has_label(key, value))
            rows = list(session.execute(query).scalars())
            more = len(rows) > size
            rows = rows[:size]
            token = encode_page_token(rows[-1].name) if more and rows else ""
            return [self._vm_model(r) for r in rows], token

        return self._run(tx, write=False)

    @staticmethod
    def _has_label(key: str, value: str) -> ColumnElement[bool]:
        return exists().where(VmLabelRow.vm_name == VmRow.name, VmLabelRow.key == key, VmLabelRow.value == value)

    def vms_on_host(self, host: str) -> list[Vm]:
        """Every VM the store places on ``host``, by name."""

        def tx(session: Session) -> list[Vm]:
            rows = session.execute(select(VmRow).where(VmRow.host == host).order_by(VmRow.name)).scalars()
            return [self._vm_model(r) for r in rows]

        return self._run(tx, write=False)

    def update_vm_observed(
        self,
        name: str,
        state: VmState,
        uuid: str | None = None,
        addresses: Sequence[IpAddress] | None = None,
        state_reason: str | None = None,
        *,
        agent_revision: Revision | None = None,
    ) -> Vm | None:
        """
        Record what the host reports about a VM and return it. None leaves a field as it is.

        Bumps the VM's revision only when something changed, so repeated identical reports do not
        wake every watcher. Returns None when the VM no longer exists: an observation racing a
        delete is moot, and the caller (often a background refresher) should not fail over it.

        ``agent_revision``: the agent's event revision of the report (an event's). A report of the
        epoch recorded with the VM whose sequence is not above the recorded one is older than what
        is recorded (an event that arrived after the answer of the operation it came from): it is
        not applied, and the VM is returned as stored.
        """

        def tx(session: Session) -> Vm | None:
            self._lock_revision(session)
            return self._observe(session, name, state, uuid, addresses, state_reason, agent_revision)

        return self._run(tx, write=True)

    def _observe(
        self,
        session: Session,
        name: str,
        state: VmState,
        uuid: str | None,
        addresses: Sequence[IpAddress] | None,
        state_reason: str | None,
        agent_revision: Revision | None = None,
        *,
        answer: bool = False,
    ) -> Vm | None:
        """
        The body of :meth:`update_vm_observed`, in the caller's transaction (revision lock taken).

        ``answer``: the report is an operation's answer, not an event (see ``_older_news``).
        """
        conn = session.connection()  # Core: this runs for nearly every agent event (see _read)
        row = conn.execute(_VM_FOR_UPDATE, {"name": name}).one_or_none()
        if row is None:
            return None
        if agent_revision is not None and _older_news(row, agent_revision, answer=answer):
            return self._vm_model(row)
        changes = self._observed_changes(row, state, uuid, addresses, state_reason)
        if agent_revision is not None and (row.agent_epoch, row.agent_sequence) != (
            agent_revision.epoch,
            agent_revision.sequence,
        ):
            changes["agent_epoch"] = agent_revision.epoch
            changes["agent_sequence"] = agent_revision.sequence
        if not changes:
            return self._vm_model(row)
        if changes.keys() - {"agent_epoch", "agent_sequence"}:
            # only what a watcher sees is a change of the VM; the agent's revision is bookkeeping
            changes["update_time"] = self._now()
            changes["revision"] = self._vm_revision(session, name)
        return self._vm_model(conn.execute(_UPDATE_VM, {"b_name": name, **changes}).one())

    @staticmethod
    def _observed_changes(
        row: VmRow | Row[Any],
        state: VmState,
        uuid: str | None,
        addresses: Sequence[IpAddress] | None,
        state_reason: str | None,
    ) -> dict[str, Any]:
        """The columns an observation changes (none: it repeats the stored state)."""
        changes: dict[str, Any] = {}
        if row.state != state.name:
            changes["state"] = state.name
        if uuid is not None and row.uuid != uuid:
            changes["uuid"] = uuid
        if addresses is not None:
            encoded = codec.addresses_to_json(addresses)
            if row.addresses != encoded:
                changes["addresses"] = encoded
        if state_reason is not None and row.state_reason != state_reason:
            changes["state_reason"] = state_reason
        return changes

    def _apply_observed(
        self,
        session: Session,
        row: VmRow,
        state: VmState,
        *,
        uuid: str | None,
        addresses: Sequence[IpAddress] | None,
        state_reason: str | None,
    ) -> bool:
        changes = self._observed_changes(row, state, uuid, addresses, state_reason)
        if not changes:
            return False
        for key, value in changes.items():
            setattr(row, key, value)
        row.update_time = self._now()
        row.revision = self._vm_revision(session, row.name)
        session.flush()
        return True

    def update_vm_auth(self, name: str, auth: Auth, audit: Sequence[AuditEvent]) -> Vm:
        """Replace a VM's recorded login (after a rotation), with its audit events in the same transaction."""

        def tx(session: Session) -> Vm:
            self._lock_revision(session)
            row = self._vm_row(session, name, lock=True)
            spec = dataclasses.replace(codec.spec_from_json(row.spec), auth=auth)
            row.spec = codec.spec_to_json(spec)
            row.update_time = self._now()
            row.revision = self._vm_revision(session, name)
            session.flush()
            self._audit(session, audit)
            return self._vm_model(row)

        return self._run(tx, write=True)

    def release_vm(self, name: str) -> None:
        """
        Delete a VM's record, freeing its reservation; watchers see a tombstone. NotFound VM_NOT_FOUND.

        A VM an unfinished plan run replaces (:meth:`create_run`'s ``hold_replaced``) leaves its room
        behind instead: a PENDING record of that name, held for the run, which the successor's create
        takes over.
        """

        def tx(session: Session) -> None:
            self._lock_revision(session)
            conn = session.connection()  # Core: every delete runs this (see _read)
            row = _one(conn, _VM_FOR_UPDATE, {"name": name}, _vm_not_found(name))
            plan = None
            if row.held_for is not None:
                plan = conn.execute(_UNFINISHED_RUN_PLAN, {"run": row.held_for}).scalar_one_or_none()
            self._delete_vm_row(session, row)
            if plan is not None:
                # a running plan run replaces this VM: the room stays, held for the successor
                self._hold_successor(session, row, held_reason(plan, row.held_for))
            self._prune_tombstones(session)

        return self._run(tx, write=True)

    def _hold_successor(self, session: Session, old: Row[Any], reason: str) -> None:
        """Record the successor of the deleted VM ``old``: PENDING on its host with its (grown) room, held."""
        state, room, now = VmState.PENDING, _reserved(old), self._now()
        self._insert_vm_row(session, old.name, old.host, state, old.spec, room, now, reason, old.held_for)

    def _hold_for_successor(self, session: Session, successor: VmSpec, pinned: str | None, run_id: str) -> None:
        """
        Grow the room of the VM ``successor`` replaces to what ``successor`` needs too, held for run ``run_id``.

        Nothing is held when there is no such VM, it has no host or not the ``pinned`` one, its host takes
        no new VMs, or the growth does not fit there: the successor is then placed when the run creates
        it, as any new VM.
        """
        conn = session.connection()
        name = successor.name
        row = conn.execute(_VM_FOR_UPDATE, {"name": name}).one_or_none()
        if row is None or row.host is None or pinned not in (None, row.host):
            return
        host = self._host_row(session, row.host, lock=True)
        if placement.closed(HostState[host.state], host.cordoned) is not None:
            return
        had, need = _reserved(row), successor.resources()
        grown = Resources(
            max(had.vcpus, need.vcpus), max(had.memory_mib, need.memory_mib), max(had.disk_mib, need.disk_mib)
        )
        free = self._free(conn, host)
        if not (grown - had).fits_in(free):
            return
        conn.execute(_UPDATE_VM, {"b_name": name, **_room(grown), "held_for": run_id}).one()

    def release_held(self, names: Sequence[str], run_id: str = "") -> list[str]:
        """
        Free the VMs of ``names`` that a plan run holds and has not started to create; the names freed.

        A held VM is PENDING, with the state reason of :func:`clonebox_core.plan.held_reason` and no
        unfinished operation (:meth:`create_run`); any other VM of these names (being created, made, or
        not there) is left as it is. ``run_id``: what else that run still holds is freed too: volume
        reservations (volumes it has not started to make), the room held for a replaced VM's successor
        after the old VM's deletion (the name is among those returned), and the growth of an old VM it
        has not replaced (back to its own spec's room). Idempotent.
        """

        def tx(session: Session) -> list[str]:
            self._lock_revision(session)
            conn = session.connection()
            freed: list[str] = []
            if run_id:
                conn.execute(_RELEASE_HELD_VOLUMES, {"run": run_id})
                for row in conn.execute(_HELD_FOR_RUN, {"run": run_id}).all():
                    if conn.execute(_HELD_VM, {"name": row.name}).first() is not None:
                        self._delete_vm_row(session, row)  # the successor's hold: its old VM is gone
                        freed.append(row.name)
                        continue
                    # the old VM is still there: its room back to what its own spec needs
                    own = codec.spec_from_json(row.spec).resources()
                    conn.execute(_UPDATE_VM, {"b_name": row.name, **_room(own), "held_for": None}).one()
            for name in names:
                if name in freed:
                    continue
                held = conn.execute(_HELD_VM.with_for_update(), {"name": name}).one_or_none()
                if held is not None:
                    self._delete_vm_row(session, held)
                    freed.append(name)
            if freed:
                self._prune_tombstones(session)
            return freed

        return self._run(tx, write=True)

    def _delete_vm_row(self, session: Session, row: Row[Any]) -> None:
        """Delete a VM's row (its reservation with it) and leave watchers a tombstone."""
        conn = session.connection()
        conn.execute(
            _INSERT_CHANGE,
            {
                "revision": self._vm_revision(session, row.name),
                "vm_name": row.name,
                "vm": codec.vm_to_json(self._vm_model(row)),
                "deleted": True,
                "change_time": self._now(),
            },
        )
        # labels go with the row (ON DELETE CASCADE)
        conn.execute(_DELETE_VM, {"name": row.name})

    def _prune_tombstones(self, session: Session) -> None:
        """Keep the newest ``tombstone_retention`` tombstones; remember what was dropped."""
        cut = session.execute(
            select(VmChangeRow.revision)
            .order_by(VmChangeRow.revision.desc())
            .offset(self._tombstone_retention)
            .limit(1)
        ).scalar_one_or_none()
        if cut is None:
            return
        session.execute(delete(VmChangeRow).where(VmChangeRow.revision <= cut))
        session.execute(
            update(FleetRevisionRow)
            .where(FleetRevisionRow.id == FLEET_REVISION_ROW_ID, FleetRevisionRow.compacted < cut)
            .values(compacted=cut)
        )

    def current_revision(self) -> int:
        """Return the newest fleet revision (list VMs, then watch with changes_since(this))."""
        return self._run(
            lambda s: int(
                s.execute(
                    select(FleetRevisionRow.value).where(FleetRevisionRow.id == FLEET_REVISION_ROW_ID)
                ).scalar_one()
            ),
            write=False,
        )

    def changes_since(self, revision: int, limit: int = 500) -> list[VmChange]:
        """
        VM changes after ``revision`` as ``(revision, vm, deleted)``, oldest first, at most ``limit``.

        Each live VM appears once with its latest state (intermediate states are not kept), each
        deletion as a tombstone. FailedPrecondition WATCH_REVISION_COMPACTED when tombstones after
        ``revision`` were pruned (relist and watch from :meth:`current_revision`), and
        WATCH_REVISION_AHEAD for a revision this store never issued.
        """

        def tx(session: Session) -> list[VmChange]:
            counter = session.execute(
                select(FleetRevisionRow).where(FleetRevisionRow.id == FLEET_REVISION_ROW_ID)
            ).scalar_one()
            if revision < counter.compacted:
                raise FailedPrecondition(
                    f"revision {revision} is too old (history starts at {counter.compacted}): "
                    "list again and watch from the new revision",
                    reason="WATCH_REVISION_COMPACTED",
                    metadata={"compacted": str(counter.compacted)},
                )
            if revision > counter.value:
                raise FailedPrecondition(
                    f"revision {revision} is ahead of this store ({counter.value})",
                    reason="WATCH_REVISION_AHEAD",
                    metadata={"current": str(counter.value)},
                )
            live = session.execute(
                select(VmRow).where(VmRow.revision > revision).order_by(VmRow.revision).limit(limit)
            ).scalars()
            dead = session.execute(
                select(VmChangeRow).where(VmChangeRow.revision > revision).order_by(VmChangeRow.revision).limit(limit)
            ).scalars()
            changes: list[VmChange] = [(r.revision, self._vm_model(r), False) for r in live]
            changes += [(t.revision, codec.vm_from_json(t.vm), True) for t in dead]
            changes.sort(key=lambda c: c[0])
            return changes[:limit]

        return self._run(tx, write=False)

    def reconcile_host(self, host: str, observed: list[Vm], listed_at: datetime | None = None) -> list[str]:
        """
        Align the store with a fresh, complete listing of ``host``'s VMs; return changed names.

        ``listed_at`` is when the listing was asked for: a VM in it whose delete operation (of the VM
        on this host) is still running or ended after that moment was deleted after the agent
        answered, and is not adopted again (otherwise two overlapping deletes on one host leave a
        ghost of one of them).

        * VMs in both: observed state, uuid, addresses and state reason are recorded.
        * VMs only the agent has: adopted (inserted with their spec's reservation) - the host runs
          them, so they consume capacity whether or not the controller created them. A name the
          store places on another host is left alone (logged): fleet names are unique and the
          other record may be an in-flight move.
        * VMs only the store has: FAILED with state_reason "vanished from host", unless an
          unfinished operation targets them (it is still creating or deleting the VM; the
          operation's outcome decides) or a plan run holds them (not made yet, see ``create_run``).
        """

        def tx(session: Session) -> list[str]:
            self._lock_revision(session)
            self._host_row(session, host)
            changed: list[str] = []
            known = {
                r.name: r for r in session.execute(select(VmRow).where(VmRow.host == host).with_for_update()).scalars()
            }
            seen = {vm.name: vm for vm in observed}
            elsewhere = {
                name: other
                for name, other in session.execute(
                    select(VmRow.name, VmRow.host).where(VmRow.name.in_([n for n in seen if n not in known]))
                )
            }
            busy = set(
                session.execute(
                    select(OperationRow.vm_name).where(
                        OperationRow.done.is_(False), OperationRow.vm_name.in_(list(known))
                    )
                ).scalars()
            )
            deleted_since: set[str] = set()
            if listed_at is not None:
                deleted_since = {
                    str(name)
                    for name, params in session.execute(
                        select(OperationRow.vm_name, OperationRow.params).where(
                            OperationRow.kind == "vm.delete",
                            OperationRow.error_code == "",
                            or_(OperationRow.done.is_(False), OperationRow.update_time >= listed_at),
                            OperationRow.vm_name.in_([n for n in seen if n not in known]),
                        )
                    )
                    # only a delete of the VM on this host: a same-named VM elsewhere may be waiting for the name
                    if name and (params or {}).get("host") == host
                }
            now = self._now()
            for name in sorted(seen):
                vm = seen[name]
                if name in known:
                    if self._apply_observed(
                        session,
                        known[name],
                        vm.state,
                        uuid=vm.uuid,
                        addresses=vm.addresses,
                        state_reason=vm.state_reason,
                    ):
                        changed.append(name)
                elif name in deleted_since:
                    _log.info("host %s listed VM %s before its delete ended: not adopted", host, name)
                elif name in elsewhere:
                    _log.warning(
                        "host %s reports VM %s that the store places on %s; left as is",
                        host,
                        name,
                        elsewhere[name],
                    )
                else:
                    need = vm.spec.resources()
                    session.add(
                        VmRow(
                            name=name,
                            host=host,
                            state=vm.state.name,
                            spec=codec.spec_to_json(vm.spec),
                            uuid=vm.uuid,
                            addresses=codec.addresses_to_json(vm.addresses),
                            reserved_vcpus=need.vcpus,
                            reserved_memory_mib=need.memory_mib,
                            reserved_disk_mib=need.disk_mib,
                            create_time=vm.create_time or now,
                            update_time=now,
                            state_reason=vm.state_reason,
                            revision=self._vm_revision(session, name),
                        )
                    )
                    session.flush()
                    self._set_labels(session, name, vm.spec.labels)
                    changed.append(name)
            for name in sorted(set(known) - set(seen)):
                held = known[name].state == VmState.PENDING.name and is_held(known[name].state_reason)
                if name in busy or held:
                    continue  # being made, or held for a plan run: not on the host yet
                if self._apply_observed(
                    session, known[name], VmState.FAILED, uuid=None, addresses=None, state_reason=VANISHED_REASON
                ):
                    changed.append(name)
            session.flush()
            return sorted(changed)

        return self._run(tx, write=True)

    # ------------------------------------------------------------------ operations

    def begin_operation(self, op: Operation, audit: AuditEvent | None = None) -> tuple[Operation, bool]:
        """
        Record a new running operation (for mutations other than VM creation).

        Returns the stored operation and True, or - idempotent on ``op.request_id`` like
        :meth:`reserve_vm` - the operation already recorded for that request and False.
        """

        def tx(session: Session) -> tuple[Operation, bool]:
            conn = session.connection()  # Core: every delete, start and stop runs this (see _read)
            existing = self._check_request_id(conn, op)
            if existing is not None:
                return self._op_model(existing), False
            if conn.execute(_OPERATION_EXISTS, {"id": op.id}).first() is not None:
                raise AlreadyExists(
                    f"operation {op.id!r} already exists",
                    reason="OPERATION_ALREADY_EXISTS",
                    metadata={"operation": op.id},
                )
            row = self._insert_operation(conn, op, self._now(), vm_name=_vm_name_of_target(op.target))
            self._audit(session, audit)
            return self._op_model(row), True

        return self._run(tx, write=True, retry_integrity=True)

    @staticmethod
    def _locked_operation(conn: Connection, op_id: str) -> Row[Any]:
        return _one(conn, _OPERATION_FOR_UPDATE, {"id": op_id}, _operation_not_found(op_id))

    def get_operation(self, op_id: str) -> Operation:
        """One operation; NotFound OPERATION_NOT_FOUND."""
        return self._read(
            lambda conn: self._op_model(_one(conn, _OPERATION_BY_ID, {"id": op_id}, _operation_not_found(op_id)))
        )

    def find_operation_by_request_id(self, request_id: str) -> Operation | None:
        """Return the operation recorded for a client request id, if any."""

        def tx(session: Session) -> Operation | None:
            row = session.execute(
                select(OperationRow).where(OperationRow.request_id == request_id)
            ).scalar_one_or_none()
            return None if row is None else self._op_model(row)

        return self._run(tx, write=False) if request_id else None

    def update_operation(
        self, op_id: str, step: str | None = None, progress: int | None = None, *, vm_state: VmState | None = None
    ) -> Operation:
        """
        Report progress of a running operation; FailedPrecondition OPERATION_DONE once finished.

        ``vm_state`` is the state the operation's VM enters with this step, recorded in the same
        transaction (one commit instead of two for each step a VM operation takes).
        """
        if progress is not None and not 0 <= progress <= 100:
            raise InvalidArgument(f"progress {progress} is not in 0..100", reason="INVALID_PROGRESS")

        def tx(session: Session) -> Operation:
            if vm_state is not None:
                self._lock_revision(session)  # the lock order: revision, operation, VM
            conn = session.connection()  # Core, as for update_vm_observed: every VM step reports progress
            row = self._locked_operation(conn, op_id)
            if row.done:
                raise FailedPrecondition(
                    f"operation {op_id!r} has already finished",
                    reason="OPERATION_DONE",
                    metadata={"operation": op_id},
                )
            changes: dict[str, Any] = {"update_time": self._now()}
            if step is not None:
                changes["step"] = step
            if progress is not None:
                changes["progress"] = progress
            self._changed(session, operation_key(op_id))
            updated = self._op_model(conn.execute(_UPDATE_OPERATION, {"b_id": op_id, **changes}).one())
            if vm_state is not None and row.vm_name:
                self._observe(session, row.vm_name, vm_state, None, None, "")
            return updated

        return self._run(tx, write=True)

    def finish_operation(
        self,
        op_id: str,
        error: CloneboxError | None = None,
        audit: AuditEvent | None = None,
        *,
        observed: Vm | None = None,
        step: str | None = None,
        revision: Revision | None = None,
    ) -> Operation:
        """
        Mark an operation done with its result (``observed``, below) or ``error``.

        Finishing an already finished operation returns it unchanged: after a controller restart a
        resumed worker may finish work that had in fact completed, and the first outcome stands.

        ``observed`` is the operation's VM as its host reported it at the end of the work: its state,
        uuid, addresses and state reason are recorded as :meth:`update_vm_observed` would, in the same
        transaction, and the result is the VM as stored then (``observed`` itself, when its record is
        gone; none without ``observed``). ``step`` is the operation's last step. ``revision`` is the
        agent's event revision of its answer: recorded with the VM, so that the agent's events about
        the work, if they arrive after this, are not applied over it (:meth:`update_vm_observed`).
        """

        def tx(session: Session) -> Operation:
            if observed is not None:
                self._lock_revision(session)  # the lock order: revision, operation, VM
            conn = session.connection()
            row = self._locked_operation(conn, op_id)
            if row.done:
                return self._op_model(row)
            changes: dict[str, Any] = {"done": True, "update_time": self._now()}
            if step is not None:
                changes["step"] = step
            result: Vm | None = None
            if observed is not None:
                result = (
                    self._observe(
                        session,
                        observed.name,
                        observed.state,
                        observed.uuid,
                        observed.addresses,
                        observed.state_reason,
                        revision,
                        answer=True,
                    )
                    or observed
                )
            if error is None:
                changes["progress"] = 100
                changes["result_vm"] = None if result is None else codec.vm_to_json(result)
            else:
                changes["error_code"] = error.code
                changes["error_reason"] = error.reason
                changes["error_message"] = error.message
                changes["error_metadata"] = dict(error.metadata)
            finished = self._op_model(conn.execute(_UPDATE_OPERATION, {"b_id": op_id, **changes}).one())
            self._audit(session, audit)
            self._changed(session, operation_key(op_id), operation_done_key(op_id))
            return finished

        return self._run(tx, write=True)

    def list_operations(self, limit: int = 50, only_running: bool = False) -> list[Operation]:
        """List operations, newest first."""

        def tx(session: Session) -> list[Operation]:
            query = (
                select(OperationRow)
                .order_by(OperationRow.create_time.desc(), OperationRow.id.desc())
                .limit(max(1, limit))
            )
            if only_running:
                query = query.where(OperationRow.done.is_(False))
            return [self._op_model(r) for r in session.execute(query).scalars()]

        return self._run(tx, write=False)

    def unfinished_operations(self) -> list[Operation]:
        """Every operation not done, oldest first (to resume after a controller restart)."""

        def tx(session: Session) -> list[Operation]:
            rows = session.execute(
                select(OperationRow)
                .where(OperationRow.done.is_(False))
                .order_by(OperationRow.create_time, OperationRow.id)
            ).scalars()
            return [self._op_model(r) for r in rows]

        return self._run(tx, write=False)

    def delete_finished_operations(self, finished_before: datetime) -> int:
        """Drop finished operations last updated before ``finished_before``; return how many."""

        def tx(session: Session) -> int:
            result = session.execute(
                delete(OperationRow).where(OperationRow.done.is_(True), OperationRow.update_time < finished_before)
            )
            return int(getattr(result, "rowcount", 0) or 0)

        return self._run(tx, write=True)

    # ---- security: deny list and join tokens ---------------------------------------------------

    def revoke_certificate(self, serial: str, identity: str, audit: AuditEvent | None = None) -> bool:
        """Add a certificate to the deny list; False when it was there already (idempotent)."""

        def tx(session: Session) -> bool:
            self._audit(session, audit)
            if session.get(RevokedCertRow, serial) is not None:
                return False
            session.add(RevokedCertRow(serial=serial, identity=identity, revoked_time=self._now()))
            return True

        return self._run(tx, write=True, retry_integrity=True)

    def revoked_serials(self) -> set[str]:
        """Every revoked serial (lowercase hex)."""

        def tx(session: Session) -> set[str]:
            return set(session.execute(select(RevokedCertRow.serial)).scalars())

        return self._run(tx, write=False)

    def create_join_token(
        self, token_id: str, secret_sha256: str, host: str, expire_time: datetime, audit: AuditEvent | None = None
    ) -> None:
        """Record a join token (only the secret's hash is stored)."""

        def tx(session: Session) -> None:
            session.add(JoinTokenRow(id=token_id, secret_sha256=secret_sha256, host=host, expire_time=expire_time))
            self._audit(session, audit)

        self._run(tx, write=True)

    def consume_join_token(self, token_id: str, secret_sha256: str, audit: AuditEvent | None = None) -> str:
        """Use a join token once; returns the host it was made for.

        Unauthenticated ``JOIN_TOKEN_INVALID`` for an unknown token or wrong secret, and
        FailedPrecondition ``JOIN_TOKEN_USED`` / ``JOIN_TOKEN_EXPIRED`` otherwise.
        """

        def tx(session: Session) -> str:
            row = session.get(JoinTokenRow, token_id, with_for_update=True)
            if row is None or not hmac.compare_digest(row.secret_sha256, secret_sha256):
                raise Unauthenticated("join token is not valid", reason="JOIN_TOKEN_INVALID")
            now = self._now()
            if row.used_time is not None:
                raise FailedPrecondition("join token was used already", reason="JOIN_TOKEN_USED")
            if row.expire_time <= now:
                raise FailedPrecondition("join token has expired", reason="JOIN_TOKEN_EXPIRED")
            row.used_time = now
            self._audit(session, audit)
            return row.host

        return self._run(tx, write=True)

    # ------------------------------------------------------------------ audit chain

    def append_audit(self, events: Sequence[AuditEvent]) -> Head:
        """Append events in their own transaction (ids already present are skipped); the new head."""
        return self._run(lambda s: audit_store.append(s, self.audit_keyring, events), write=True)

    def list_audit(self, query: AuditFilter) -> list[ChainRecord]:
        """Audit records matching ``query``."""
        return self._run(lambda s: audit_store.list_records(s, query), write=False)

    def get_audit(self, event_id: str) -> ChainRecord:
        """One audit record by event id (NotFound AUDIT_EVENT_NOT_FOUND)."""
        record = self._run(lambda s: audit_store.get_record(s, event_id), write=False)
        if record is None:
            raise NotFound(
                f"audit event {event_id!r} not found", reason="AUDIT_EVENT_NOT_FOUND", metadata={"id": event_id}
            )
        return record

    def audit_chain_state(self) -> ChainState:
        """Anchor, head row and agents' witnesses of the chain."""
        return self._run(audit_store.chain_state, write=False)

    def archive_audit(self, through: Head, audit: AuditEvent | None = None) -> int:
        """Remove records up to ``through`` and anchor the chain there; the number removed.

        FailedPrecondition AUDIT_ARCHIVE_STALE when that record (with that MAC) is not in the chain.
        """

        def tx(session: Session) -> int:
            try:
                removed = audit_store.archive(session, self.audit_keyring, through, self._now())
                self._audit(session, audit)
                return removed
            except LookupError as exc:
                raise FailedPrecondition(str(exc), reason="AUDIT_ARCHIVE_STALE") from None

        return self._run(tx, write=True)

    def record_audit_witness(self, source: str, head: Head) -> None:
        """Keep the chain head an agent reports holding."""
        self._run(lambda s: audit_store.record_witness(s, source, head, self._now()), write=True)

    # ------------------------------------------------------------------ health

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
    ) -> list[Transition] | None:
        """Store one update from ``host``'s agent in one transaction; the stored transitions with their seq.

        ``placed_on_host`` names the VM the update is about: when the fleet places that VM on another
        host, nothing is stored and the result is None (a VM the fleet does not know yet is stored, so
        an adopted VM has its health at once). Checked in the same transaction, not by a read before it.

        ``health`` replaces the VM's current health (its host and its transitions' host are set to
        ``host``: an agent speaks for its own host only); a change of the VM's state without a VM-level
        transition gets one. ``aggregates`` replace rows of the same (vm, check, minute); ``actions``
        already stored are skipped; ``removed`` names VMs whose current health is dropped (history stays).
        """

        def tx(session: Session) -> list[Transition] | None:
            if placed_on_host:
                placed = session.connection().execute(_VM_HOST, {"name": placed_on_host}).scalar_one_or_none()
                if placed and placed != host:
                    return None
            stored = health_store.apply_update(
                session, host, health, transitions, aggregates, actions, removed, self._now()
            )
            names = {t.vm for t in stored} | set(removed) | ({health.vm} if health is not None else set())
            self._changed(session, *(health_key(vm) for vm in names))
            return stored

        return self._run(tx, write=True)

    def mark_health_unknown(self, host: str, detail: str) -> list[tuple[VmHealth, Transition | None]]:
        """Every VM of ``host`` becomes UNKNOWN (with a VM-level transition carrying ``detail``)."""

        def tx(session: Session) -> list[tuple[VmHealth, Transition | None]]:
            marked = health_store.mark_unknown(session, host, detail, self._now())
            self._changed(session, *(health_key(h.vm) for h, _t in marked))
            return marked

        return self._run(tx, write=True)

    def get_health(self, vm: str) -> VmHealth | None:
        """The current health of ``vm`` (None before any report)."""
        return self._run(lambda s: health_store.get_current(s, vm), write=False)

    def list_health(
        self,
        names: Sequence[str] | None = None,
        states: Sequence[HealthState] | None = None,
        host: str | None = None,
    ) -> list[VmHealth]:
        """Current health by VM name, filtered by names, states and host when given."""
        return self._run(lambda s: health_store.list_current(s, names, states, host), write=False)

    def health_snapshot(
        self, names: Sequence[str] | None = None, states: Sequence[HealthState] | None = None
    ) -> tuple[list[VmHealth], int]:
        """Current health (filtered) and the highest transition seq, from one consistent read."""
        return self._run(lambda s: (health_store.list_current(s, names, states), health_store.max_seq(s)), write=False)

    def health_transitions_after(
        self,
        seq: int,
        names: Sequence[str] | None = None,
        states: Sequence[HealthState] | None = None,
        limit: int = 1000,
    ) -> list[Transition]:
        """Stored transitions with a seq above ``seq``, oldest first (``states`` matches from or to)."""
        return self._run(lambda s: health_store.transitions_after(s, seq, names, states, limit), write=False)

    def health_history(
        self, vm: str, since: datetime, check: str = "", limit: int = 1000
    ) -> tuple[list[Transition], list[Aggregate], list[ActionRecord]]:
        """Transitions (the newest ``limit``), minute aggregates and actions of ``vm`` since ``since``."""
        return self._run(lambda s: health_store.history(s, vm, since, check, limit), write=False)

    def health_seq_range(self) -> tuple[int, int]:
        """(lowest, highest) transition seq still stored; (0, 0) when none ever was."""
        return self._run(lambda s: (health_store.min_seq(s), health_store.max_seq(s)), write=False)

    def health_max_seq(self) -> int:
        """The highest stored transition seq (0 when none ever was)."""
        return self._run(health_store.max_seq, write=False)

    def health_min_retained_seq(self) -> int:
        """The lowest transition seq still stored (0 when none ever was)."""
        return self._run(health_store.min_seq, write=False)

    def prune_health(
        self, transitions_before: datetime, minutes_before: datetime, actions_before: datetime
    ) -> tuple[int, int, int]:
        """Drop transitions, minute aggregates and actions older than their cut-offs; how many of each.

        The newest transition always stays, so seq never restarts and resume points stay comparable.
        """
        return self._run(
            lambda s: health_store.prune(s, transitions_before, minutes_before, actions_before), write=True
        )

    # ------------------------------------------------------------------ plans

    def save_plan_revision(self, plan: Plan, audit: AuditEvent | None = None) -> tuple[Plan, bool]:
        """Store ``plan`` as its next revision unless its digest equals the current revision's.

        Returns ``plan`` with revision, digest and create_time of the revision now current, and whether
        one was added. An unchanged plan writes nothing (not even ``audit``); a destroyed plan saved
        again becomes current as a new revision. Revision numbers never repeat or skip, whichever
        controllers save at once (the plan row is locked, see ``plans.py``).
        """
        bare, body, digest = plans_store.encode_plan(plan)

        def tx(session: Session) -> tuple[Plan, bool]:
            stored, added = plans_store.save_revision(session, bare, body, digest, self._now())
            if added:
                self._audit(session, audit)
            return stored, added

        return self._run(tx, write=True)

    def get_plan(self, name: str, revision: int = 0) -> Plan:
        """The current revision (or ``revision``) of a plan; NotFound PLAN_NOT_FOUND.

        A destroyed plan is returned too (its history stays readable); :meth:`is_plan_destroyed` tells.
        """
        return self._run(lambda s: plans_store.get_plan(s, name, revision), write=False)

    def is_plan_destroyed(self, name: str) -> bool:
        """Whether a finished destroy marked the plan destroyed; NotFound PLAN_NOT_FOUND."""
        return self._run(lambda s: plans_store.is_destroyed(s, name), write=False)

    def list_plans(self, include_destroyed: bool = False) -> list[Plan]:
        """Current revisions of every plan, by name (destroyed ones only with ``include_destroyed``)."""
        return self._run(lambda s: plans_store.list_plans(s, include_destroyed), write=False)

    def mark_plan_destroyed(self, name: str, destroyed: bool = True) -> None:
        """After a finished destroy the plan is listed no more (its revisions and runs are kept)."""
        self._run(lambda s: plans_store.mark_destroyed(s, name, destroyed, self._now()), write=True)

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
        """Insert ``run`` (with its VM rows, version 1, times set to now) and True.

        ``hold``: the VMs the run will create, each ``(spec, host or None)``. They are placed and
        recorded PENDING with their room reserved in the same transaction, one after another, so the
        run cannot fail later for room a VM created meanwhile took. The run's create of each starts
        from its held record (:meth:`reserve_vm` with the same spec); :meth:`release_held` frees
        those it never creates. ``hold_volumes``: the agent volumes the run will make, each ``(host,
        name, size_mib)``, whose disk is reserved first, held by the run (a name reserved on that host
        already is left as it is); the run's :meth:`reserve_volume` with ``holder`` takes each over.
        ``hold_replaced``: the VMs that will replace existing ones of the same name, ``(spec, host or
        None)``; the old VM's room on its host (when that is ``host``) grows to what both need, when
        that fits (else nothing is held for it). When the run deletes the VM (:meth:`release_vm`) the
        room stays, held for the successor, whose create takes it over (:meth:`reserve_vm`). Any
        placement error refuses the whole run: nothing is written.

        With a request id already used for this plan: the existing run and False (no audit record).
        NotFound PLAN_NOT_FOUND for an unknown plan; Aborted PLAN_RUN_IN_PROGRESS (metadata ``plan``,
        ``run``) when another run of the plan is not done; AlreadyExists PLAN_RUN_ALREADY_EXISTS for a
        reused run id. ``owner`` (with ``lease_seconds`` > 0) leases the new run to the creating
        controller in the same transaction, so another controller's :meth:`claim_runs` cannot take it
        before the creator's first claim.
        """
        if owner and lease_seconds <= 0:
            raise ValueError("a run created with an owner needs a positive lease_seconds")

        def tx(session: Session) -> tuple[PlanRun, bool]:
            now = self._now()
            until = now + timedelta(seconds=lease_seconds) if owner else None
            stored, created = plans_store.create_run(session, run, now, owner, until)
            if created:
                if hold or hold_volumes or hold_replaced:
                    # before any host row, as every transaction that places does (PostgreSQL: no lock cycle)
                    self._lock_revision(session)
                for on, volume, size_mib in hold_volumes:
                    self._reserve_volume_row(session, on, volume, size_mib, held_by=run.id)
                for successor, pinned in hold_replaced:
                    self._hold_for_successor(session, successor, pinned, run.id)
                reason = held_reason(run.plan, run.id)
                for spec, host in hold:
                    self._hold_vm(session, spec, host, now, reason=reason)
                self._audit(session, audit)
            return stored, created

        return self._run(tx, write=True)

    def update_run(
        self,
        run_id: str,
        *,
        state: RunState | None = None,
        error: str | None = None,
        vms: Sequence[VmStatus] = (),
        audit: AuditEvent | None = None,
    ) -> int:
        """Change a run's state/error and upsert the rows of ``vms`` (by service); the new version, one transaction.

        New services are appended after the run's existing VMs, which keep their order. ``audit`` is
        written in the same transaction. NotFound PLAN_RUN_NOT_FOUND. It returns the version, not the
        run: the engine, which writes a run at every VM step, never needs the run back, and building
        a 50-VM run was half the cost of the write.
        """

        def tx(session: Session) -> int:
            version = plans_store.update_run(session, run_id, state, error, vms, self._now())
            self._audit(session, audit)
            return version

        return self._run(tx, write=True)

    def get_run(self, run_id: str) -> PlanRun:
        """A run with its VMs; NotFound PLAN_RUN_NOT_FOUND."""
        return self._read(lambda conn: plans_store.get_run(conn, run_id))

    def list_runs(self, plan: str, limit: int = 50) -> list[PlanRun]:
        """A plan's runs, newest first, at most ``limit`` (capped at 1000); empty for an unknown plan."""
        return self._run(lambda s: plans_store.list_runs(s, plan, limit), write=False)

    def latest_run(self, plan: str) -> PlanRun | None:
        """A plan's newest run (None when it has none)."""
        runs = self._run(lambda s: plans_store.list_runs(s, plan, 1), write=False)
        return runs[0] if runs else None

    def claim_runs(self, owner: str, lease_seconds: float) -> list[PlanRun]:
        """Unfinished runs whose lease is free, expired or already ``owner``'s, now leased to ``owner``.

        Oldest first. Renews ``owner``'s own leases; two controllers never get the same run (see
        ``plans.py``).
        """
        if not owner or lease_seconds <= 0:
            raise ValueError("claim_runs needs an owner and a positive lease_seconds")

        def tx(session: Session) -> list[PlanRun]:
            now = self._now()
            return plans_store.claim_runs(session, owner, now, now + timedelta(seconds=lease_seconds))

        return self._run(tx, write=True)

    def release_run(self, run_id: str, owner: str) -> None:
        """Give up ``owner``'s lease (at shutdown, so another controller may resume it at once).

        A no-op when ``owner`` does not hold it (taken over after expiry, or an unknown run).
        """
        self._run(lambda s: plans_store.release_run(s, run_id, owner), write=True)

    def plan_run_lease(self, run_id: str) -> tuple[str, datetime | None]:
        """``(owner, lease_until)`` of a run, owner "" when free (diagnostics); NotFound PLAN_RUN_NOT_FOUND."""
        return self._run(lambda s: plans_store.run_lease(s, run_id), write=False)
