"""Plan storage: revisions of multi-VM plans, their runs with each VM's progress, and run leases.

Revisions. A plan row holds the number of its current revision; saving adds current + 1. Two
controllers saving the same plan at once must not take the same number, so a save first locks the
plan row. On PostgreSQL it inserts the row if missing (``INSERT ... ON CONFLICT DO NOTHING``: a second
inserter of the same new name waits on the unique index, then does nothing) and then takes ``SELECT
... FOR UPDATE`` on it, so the second saver reads the first one's committed revision. On SQLite every
write transaction starts with ``BEGIN IMMEDIATE`` (one writer at a time), and the same statements
need no further locking. Creating a run takes the same plan-row lock, which makes "at most one
unfinished run per plan" and "one run per request id" hold across controllers.

Bodies keep spec secret fields (cloud-init user-data, a password *hash*: the CLI sends no password)
whole, as VM specs kept for operations do: a run resumed by another controller creates its VMs from
the stored revision, and a digest cannot boot a guest. Readers never see them: the gRPC layer sends
plans redacted.

Destroyed plans. A finished destroy marks the plan destroyed: listings leave it out, but its revisions
and runs stay and :func:`get_plan` still returns it (the engine and ``clonebox`` show a destroyed
plan's history). Saving it again makes it current again, as a new revision.

Leases. A run is executed by the controller holding its lease (``owner`` until ``lease_until``).
:func:`claim_runs` locks claimable runs with ``SELECT ... FOR UPDATE`` in id order and leases them;
on PostgreSQL a second claimer waits for the first one's row locks, then re-evaluates its WHERE clause
against the committed rows and so skips what the first took. It waits rather than skipping locked
rows (``SKIP LOCKED``) so that an owner renewing its leases never misses a run it is busy updating;
locking in id order keeps two claimers from deadlocking.

Lock order on PostgreSQL (these transactions take neither the fleet revision nor host rows): the plan
row, then run rows, then the audit chain head (appended by the caller last).

Every function runs inside the caller's session (one transaction, see ``Store._run``); the caller
passes "now" from the store's clock.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import ColumnElement, Connection, Insert, Row, Table, bindparam, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from clonebox_core.errors import Aborted, AlreadyExists, NotFound
from clonebox_core.plan import (
    ChangeKind,
    Plan,
    PlanRun,
    RunState,
    VmRunState,
    VmStatus,
    plan_digest,
    plan_from_dict,
    plan_to_dict,
)

from .tables import PlanRevisionRow, PlanRow, PlanRunRow, PlanRunVmRow

#: run states a new run of the same plan has to wait for, and that claim_runs hands out
UNFINISHED_STATES: tuple[str, ...] = tuple(s.name for s in RunState if not s.done)
#: list_runs never answers with more runs than this
MAX_LIST_RUNS = 1000


def _insert(session: Session) -> Insert:
    """A dialect INSERT into ``plans`` that supports ``ON CONFLICT`` (both backends have it)."""
    if session.get_bind().dialect.name == "postgresql":
        return postgresql.insert(PlanRow)
    return sqlite.insert(PlanRow)


def _plan_not_found(name: str, revision: int = 0) -> NotFound:
    if revision:
        return NotFound(
            f"plan {name!r} has no revision {revision}",
            reason="PLAN_NOT_FOUND",
            metadata={"plan": name, "revision": str(revision)},
        )
    return NotFound(f"plan {name!r} does not exist", reason="PLAN_NOT_FOUND", metadata={"plan": name})


# ------------------------------------------------------------------------------------ revisions


def encode_plan(plan: Plan) -> tuple[Plan, dict[str, Any], str]:
    """``plan`` without the fields the store sets, its stored body and its digest.

    The store-set fields are cleared first, so a plan read back from the store and saved again has
    the digest of its content, whatever revision it was read as. Called before the transaction opens:
    encoding 500 VM specs need not hold the write lock.
    """
    bare = dataclasses.replace(plan, revision=0, digest="", create_time=None)
    return bare, plan_to_dict(bare, secrets="keep"), plan_digest(bare)


def _plan_model(row: PlanRevisionRow) -> Plan:
    decoded = plan_from_dict(row.body)
    return dataclasses.replace(
        decoded, source=row.source, revision=row.revision, digest=row.digest, create_time=row.create_time
    )


def save_revision(session: Session, plan: Plan, body: dict[str, Any], digest: str, now: datetime) -> tuple[Plan, bool]:
    """Store ``plan`` (encoded by :func:`encode_plan`) as its next revision unless nothing changed.

    Returns ``plan`` with revision, digest and create_time of the revision that is now current (and
    that revision's source when nothing changed), and whether a revision was added. Its specs keep
    the caller's secret values; the stored body has them as digests. Nothing is written when the plan
    is current (not destroyed) and its current revision has ``digest``.
    """
    # make sure the row exists so there is something to lock; a no-op for a known plan
    session.execute(
        _insert(session)
        .values(name=plan.name, current_revision=0, destroyed=False, update_time=now)
        .on_conflict_do_nothing(index_elements=["name"])  # type: ignore[attr-defined]  # both dialects have it
    )
    row = session.get(PlanRow, plan.name, with_for_update=True)
    assert row is not None  # inserted above, and plans are never deleted
    if row.current_revision and not row.destroyed:
        current = session.get(PlanRevisionRow, (plan.name, row.current_revision))
        if current is not None and current.digest == digest:
            # the digest leaves ``source`` out: a plan file changed only in comments adds no revision
            same = dataclasses.replace(
                plan, source=current.source, revision=current.revision, digest=digest, create_time=current.create_time
            )
            return same, False
    revision = row.current_revision + 1
    stored = PlanRevisionRow(
        plan=plan.name, revision=revision, digest=digest, source=plan.source, body=body, create_time=now
    )
    session.add(stored)
    row.current_revision, row.destroyed, row.update_time = revision, False, now
    session.flush()
    return dataclasses.replace(plan, revision=revision, digest=digest, create_time=now), True


def get_plan(session: Session, name: str, revision: int = 0) -> Plan:
    """The current revision (``revision`` 0) or the given one; a destroyed plan is returned too.

    NotFound PLAN_NOT_FOUND names the plan, and the revision when one was asked for.
    """
    row = session.get(PlanRow, name)
    if row is None or not row.current_revision:
        raise _plan_not_found(name)
    stored = session.get(PlanRevisionRow, (name, revision or row.current_revision))
    if stored is None:
        raise _plan_not_found(name, revision)
    return _plan_model(stored)


def list_plans(session: Session, include_destroyed: bool = False) -> list[Plan]:
    """The current revision of every plan, by name; destroyed plans only when asked."""
    query = (
        select(PlanRevisionRow)
        .join(PlanRow, (PlanRow.name == PlanRevisionRow.plan) & (PlanRow.current_revision == PlanRevisionRow.revision))
        .order_by(PlanRow.name)
    )
    if not include_destroyed:
        query = query.where(PlanRow.destroyed.is_(False))
    return [_plan_model(r) for r in session.execute(query).scalars()]


def is_destroyed(session: Session, name: str) -> bool:
    """Whether plan ``name`` is marked destroyed; NotFound PLAN_NOT_FOUND."""
    row = session.get(PlanRow, name)
    if row is None or not row.current_revision:
        raise _plan_not_found(name)
    return row.destroyed


def mark_destroyed(session: Session, name: str, destroyed: bool, now: datetime) -> None:
    """Mark plan ``name`` destroyed (or not); NotFound PLAN_NOT_FOUND."""
    row = session.get(PlanRow, name, with_for_update=True)
    if row is None or not row.current_revision:
        raise _plan_not_found(name)
    if row.destroyed != destroyed:
        row.destroyed, row.update_time = destroyed, now


# ----------------------------------------------------------------------------------------- runs


def _vm_model(row: PlanRunVmRow | Row[Any]) -> VmStatus:
    return VmStatus(
        service=row.service,
        vm=row.vm,
        state=VmRunState[row.state],
        step=row.step,
        error=row.error,
        failed_probe=row.failed_probe,
        host=row.host,
        change=ChangeKind[row.change],
        created=row.created,
        update_time=row.update_time,
    )


def _vm_values(status: VmStatus, now: datetime) -> dict[str, Any]:
    """The columns of a VM row that a status sets (all but the keys and the position)."""
    return {
        "vm": status.vm,
        "state": status.state.name,
        "step": status.step,
        "error": status.error,
        "failed_probe": status.failed_probe,
        "host": status.host,
        "change": status.change.name,
        "created": status.created,
        "update_time": now,
    }


def _fill_vm(row: PlanRunVmRow, status: VmStatus, now: datetime) -> None:
    for key, value in _vm_values(status, now).items():
        setattr(row, key, value)


def _run_model(row: PlanRunRow | Row[Any], vms: Iterable[PlanRunVmRow | Row[Any]]) -> PlanRun:
    return PlanRun(
        id=row.id,
        plan=row.plan,
        revision=row.revision,
        action=row.action,
        state=RunState[row.state],
        vms=tuple(_vm_model(v) for v in vms),
        error=row.error,
        request_id=row.request_id or "",
        create_time=row.create_time,
        update_time=row.update_time,
        version=row.version,
        options={str(k): bool(v) for k, v in (row.options or {}).items()},
    )


# A run's VM rows are read and written with Core statements, not ORM objects: the engine writes a
# run's rows every time a VM moves and WatchPlan reads the whole run as often, so for a 50-VM plan the
# ORM's per-object cost was most of the controller's CPU per VM (docs/benchmarks.md, Plans).
_RUN_TABLE = cast(Table, PlanRunRow.__table__)
_RUN_VM_TABLE = cast(Table, PlanRunVmRow.__table__)
_RUN_BY_ID = select(_RUN_TABLE).where(_RUN_TABLE.c.id == bindparam("id"))
_RUN_VM_POSITIONS = select(_RUN_VM_TABLE.c.service, _RUN_VM_TABLE.c.position).where(
    _RUN_VM_TABLE.c.run_id == bindparam("run_id")
)
_INSERT_RUN_VM = insert(_RUN_VM_TABLE)
_UPDATE_RUN_VM = update(_RUN_VM_TABLE).where(
    _RUN_VM_TABLE.c.run_id == bindparam("b_run_id"), _RUN_VM_TABLE.c.service == bindparam("b_service")
)
# the SET clause is version + 1 and the parameters given besides b_id (update_time, state, error)
_BUMP_RUN = (
    update(_RUN_TABLE)
    .where(_RUN_TABLE.c.id == bindparam("b_id"))
    .values(version=_RUN_TABLE.c.version + 1)
    .returning(_RUN_TABLE.c.version)
)


def _vm_rows(db: Session | Connection, run_ids: Sequence[str]) -> dict[str, list[Row[Any]]]:
    """The VM rows of each run, in the order the run was created with."""
    out: dict[str, list[Row[Any]]] = {run_id: [] for run_id in run_ids}
    if run_ids:
        query = (
            select(_RUN_VM_TABLE)
            .where(_RUN_VM_TABLE.c.run_id.in_(list(run_ids)))
            .order_by(_RUN_VM_TABLE.c.run_id, _RUN_VM_TABLE.c.position)
        )
        conn = db.connection() if isinstance(db, Session) else db
        for vm in conn.execute(query):
            out[vm.run_id].append(vm)
    return out


def _run_models(session: Session, rows: Sequence[PlanRunRow]) -> list[PlanRun]:
    vms = _vm_rows(session, [r.id for r in rows])
    return [_run_model(r, vms[r.id]) for r in rows]


def _run_row(session: Session, run_id: str, *, lock: bool = False) -> PlanRunRow:
    row = session.get(PlanRunRow, run_id, with_for_update=lock)
    if row is None:
        raise _run_not_found(run_id)
    return row


def _run_not_found(run_id: str) -> NotFound:
    return NotFound(f"plan run {run_id!r} does not exist", reason="PLAN_RUN_NOT_FOUND", metadata={"run": run_id})


def create_run(
    session: Session, run: PlanRun, now: datetime, owner: str = "", lease_until: datetime | None = None
) -> tuple[PlanRun, bool]:
    """Insert ``run`` with its VM rows (version 1) and True; see ``Store.create_run``.

    The run's create/update times are ``now`` and its VM rows' update times too; ``owner`` (with
    ``lease_until``) leases it to the creating controller at once, so no other controller's
    :func:`claim_runs` can take it in between.
    """
    plan = session.get(PlanRow, run.plan, with_for_update=True)
    if plan is None or not plan.current_revision:
        raise _plan_not_found(run.plan)
    if run.request_id:
        existing = session.execute(
            select(PlanRunRow).where(PlanRunRow.plan == run.plan, PlanRunRow.request_id == run.request_id)
        ).scalar_one_or_none()
        if existing is not None:
            return _run_models(session, [existing])[0], False
    busy = session.execute(
        select(PlanRunRow.id, PlanRunRow.action)
        .where(PlanRunRow.plan == run.plan, PlanRunRow.state.in_(UNFINISHED_STATES))
        .order_by(PlanRunRow.create_time, PlanRunRow.id)
        .limit(1)
    ).first()
    if busy is not None:
        other, action = busy
        raise Aborted(
            f"plan {run.plan!r} already has a run in progress ({action}, run {other}): "
            "wait for it to finish, or watch it, then try again",
            reason="PLAN_RUN_IN_PROGRESS",
            metadata={"plan": run.plan, "run": other},
        )
    if session.get(PlanRunRow, run.id) is not None:
        raise AlreadyExists(
            f"plan run {run.id!r} already exists", reason="PLAN_RUN_ALREADY_EXISTS", metadata={"run": run.id}
        )
    row = PlanRunRow(
        id=run.id,
        plan=run.plan,
        revision=run.revision,
        action=run.action,
        state=run.state.name,
        error=run.error,
        request_id=run.request_id or None,
        options=dict(run.options),
        version=1,
        owner=owner or None,
        lease_until=lease_until if owner else None,
        create_time=now,
        update_time=now,
    )
    session.add(row)
    # the run row first: its VM rows reference it
    session.flush()
    vms: list[PlanRunVmRow] = []
    for position, status in enumerate(run.vms):
        vm = PlanRunVmRow(run_id=run.id, service=status.service, position=position)
        _fill_vm(vm, status, now)
        vms.append(vm)
    session.add_all(vms)
    session.flush()
    return _run_model(row, vms), True


def update_run(
    session: Session,
    run_id: str,
    state: RunState | None,
    error: str | None,
    vms: Sequence[VmStatus],
    now: datetime,
) -> int:
    """Change state/error when given and upsert ``vms`` by service; the new version (+ 1). NotFound PLAN_RUN_NOT_FOUND.

    A service the run has no row for yet is appended after the existing ones; existing rows keep
    their position. Each upserted row's update time is ``now``.
    """
    # Core, not the ORM: a run's engine writes this for nearly every step of every VM; the run's row is
    # updated (and so locked) first, as the ORM's SELECT ... FOR UPDATE of it did
    conn = session.connection()
    changes: dict[str, Any] = {"update_time": now}
    if state is not None:
        changes["state"] = state.name
    if error is not None:
        changes["error"] = error
    version = conn.execute(_BUMP_RUN, {"b_id": run_id, **changes}).scalar_one_or_none()
    if version is None:
        raise _run_not_found(run_id)
    if vms:
        positions = {row.service: row.position for row in conn.execute(_RUN_VM_POSITIONS, {"run_id": run_id})}
        position = max(positions.values(), default=-1) + 1
        added: list[dict[str, Any]] = []
        changed: list[dict[str, Any]] = []
        for status in vms:
            values = _vm_values(status, now)
            if status.service in positions:
                changed.append({"b_run_id": run_id, "b_service": status.service, **values})
            else:
                added.append({"run_id": run_id, "service": status.service, "position": position, **values})
                positions[status.service] = position
                position += 1
        # inserts first: a service given twice in one call is inserted, then updated to its last status
        if added:
            conn.execute(_INSERT_RUN_VM, added)
        if changed:
            conn.execute(_UPDATE_RUN_VM, changed)
    return int(version)


def get_run(conn: Connection, run_id: str) -> PlanRun:
    """A run with its VMs; NotFound PLAN_RUN_NOT_FOUND (Core statements only: see ``_vm_rows``)."""
    row = conn.execute(_RUN_BY_ID, {"id": run_id}).one_or_none()
    if row is None:
        raise _run_not_found(run_id)
    return _run_model(row, _vm_rows(conn, [run_id])[run_id])


def list_runs(session: Session, plan: str, limit: int) -> list[PlanRun]:
    """A plan's runs, newest first, at most ``limit`` (1..MAX_LIST_RUNS); none for an unknown plan."""
    rows = (
        session.execute(
            select(PlanRunRow)
            .where(PlanRunRow.plan == plan)
            .order_by(PlanRunRow.create_time.desc(), PlanRunRow.id.desc())
            .limit(min(max(1, limit), MAX_LIST_RUNS))
        )
        .scalars()
        .all()
    )
    return _run_models(session, rows)


def _claimable(owner: str, now: datetime) -> ColumnElement[bool]:
    # free (never leased, or released), expired, or the caller's own (a renewal)
    return PlanRunRow.state.in_(UNFINISHED_STATES) & or_(
        PlanRunRow.owner.is_(None),
        PlanRunRow.lease_until.is_(None),
        PlanRunRow.lease_until < now,
        PlanRunRow.owner == owner,
    )


def claim_runs(session: Session, owner: str, now: datetime, lease_until: datetime) -> list[PlanRun]:
    """Lease every claimable unfinished run to ``owner`` until ``lease_until``; them, oldest first."""
    rows = (
        session.execute(select(PlanRunRow).where(_claimable(owner, now)).order_by(PlanRunRow.id).with_for_update())
        .scalars()
        .all()
    )
    for row in rows:
        row.owner, row.lease_until = owner, lease_until
    session.flush()
    ordered = sorted(rows, key=lambda r: (r.create_time, r.id))
    return _run_models(session, ordered)


def release_run(session: Session, run_id: str, owner: str) -> bool:
    """Drop ``owner``'s lease of ``run_id``; False when ``owner`` did not hold it (or no such run)."""
    result = session.execute(
        update(PlanRunRow)
        .where(PlanRunRow.id == run_id, PlanRunRow.owner == owner)
        .values(owner=None, lease_until=None)
        .execution_options(synchronize_session=False)
    )
    return bool(getattr(result, "rowcount", 0))


def run_lease(session: Session, run_id: str) -> tuple[str, datetime | None]:
    """``(owner, lease_until)`` of a run (owner "" when free); NotFound PLAN_RUN_NOT_FOUND."""
    row = _run_row(session, run_id)
    return row.owner or "", row.lease_until
