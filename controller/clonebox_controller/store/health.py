"""Health storage: current health per VM, transitions numbered by ``seq``, minute aggregates, actions.

Only what is worth keeping is stored: each VM's current health (one row, replaced), every transition,
closed per-minute aggregates and actions. Individual probe samples are not.

Ordering of ``seq``: watchers resume "after seq N", so a transition must never become visible with a
seq below one a reader has already seen. On SQLite every write transaction starts with ``BEGIN
IMMEDIATE`` (one writer at a time); on PostgreSQL a transaction that inserts transitions first takes a
transaction-level advisory lock, so seqs commit in the order they are assigned, whichever controller
process writes them.

Every function runs inside the caller's session (one transaction, see ``Store._run``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import datetime
from typing import cast

from sqlalchemy import ColumnElement, Insert, Table, bindparam, delete, func, insert, or_, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from clonebox_core.health import ActionKind, ActionRecord, Aggregate, HealthState, Transition, VmHealth

from . import codec
from .tables import HealthActionRow, HealthCurrentRow, HealthMinuteRow, HealthTransitionRow

#: arbitrary constant key of the PostgreSQL advisory lock that orders transition inserts
_TRANSITION_LOCK_KEY = 0x636C6F6E_68656C74  # "clonhelt"
#: history answers are bounded whatever the window: ~1 MiB of aggregates, and as many actions as transitions
MAX_HISTORY_AGGREGATES = 20_000
MAX_HISTORY_ACTIONS = 10_000


# Core statements on the session's connection for the writes every agent health update makes: the ORM's
# bulk-insert and unit-of-work handling cost more than the statements (docs/benchmarks.md, Plans)
_CURRENT = cast(Table, HealthCurrentRow.__table__)
_TRANSITIONS = cast(Table, HealthTransitionRow.__table__)
_INSERT_TRANSITIONS = insert(_TRANSITIONS).returning(_TRANSITIONS.c.seq, sort_by_parameter_order=True)
_CURRENT_STATE_FOR_UPDATE = select(_CURRENT.c.state).where(_CURRENT.c.vm == bindparam("vm")).with_for_update()
_INSERT_CURRENT = insert(_CURRENT)
_UPDATE_CURRENT = update(_CURRENT).where(_CURRENT.c.vm == bindparam("b_vm"))


def _lock_transitions(session: Session) -> None:
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _TRANSITION_LOCK_KEY})


def _upsert(session: Session, table: type[HealthMinuteRow] | type[HealthActionRow]) -> Insert:
    """A dialect INSERT that supports ``ON CONFLICT`` (both backends have it)."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


def _transition_model(row: HealthTransitionRow) -> Transition:
    return Transition(
        vm=row.vm,
        host=row.host,
        check=row.check,
        from_state=HealthState[row.from_state],
        to_state=HealthState[row.to_state],
        time=row.time,
        detail=row.detail,
        seq=row.seq,
    )


def _current_model(row: HealthCurrentRow) -> VmHealth:
    return codec.vm_health_from_json(row.document, row.updated_at)


def _insert_transitions(session: Session, transitions: Sequence[Transition]) -> list[Transition]:
    if not transitions:
        return []
    rows = [
        {
            "vm": t.vm,
            "host": t.host,
            "check": t.check,
            "from_state": t.from_state.name,
            "to_state": t.to_state.name,
            "time": t.time,
            "detail": t.detail,
        }
        for t in transitions
    ]
    seqs = session.connection().execute(_INSERT_TRANSITIONS, rows).scalars()
    return [dataclasses.replace(t, seq=int(seq)) for t, seq in zip(transitions, seqs, strict=True)]


def apply_update(
    session: Session,
    host: str,
    health: VmHealth | None,
    transitions: Sequence[Transition],
    aggregates: Sequence[Aggregate],
    actions: Sequence[ActionRecord],
    removed: Sequence[str],
    now: datetime,
) -> list[Transition]:
    """Store one agent update; the stored transitions with their seq, oldest first.

    When ``health`` changes the VM's state and ``transitions`` carry no VM-level transition to that
    state (a snapshot after a reconnect carries none), one is added, so every change of a VM's state
    is a transition that watchers can resume across.
    """
    _lock_transitions(session)
    pending = [dataclasses.replace(t, host=host) for t in transitions]
    if health is not None:
        health = dataclasses.replace(health, host=host)
        conn = session.connection()
        stored_state = conn.execute(_CURRENT_STATE_FOR_UPDATE, {"vm": health.vm}).scalar_one_or_none()
        before = HealthState[stored_state] if stored_state is not None else HealthState.UNKNOWN
        explained = any(t.vm == health.vm and not t.check and t.to_state is health.state for t in pending)
        if health.state is not before and not explained:
            pending.append(
                Transition(
                    vm=health.vm,
                    host=host,
                    check="",
                    from_state=before,
                    to_state=health.state,
                    time=health.updated or now,
                    detail="first report" if stored_state is None else f"as reported by host {host}",
                )
            )
        values = {
            "host": host,
            "state": health.state.name,
            "document": codec.vm_health_to_json(health),
            "updated_at": now,
        }
        if stored_state is None:
            conn.execute(_INSERT_CURRENT, {"vm": health.vm, **values})
        else:
            conn.execute(_UPDATE_CURRENT, {"b_vm": health.vm, **values})
    if removed:
        # only the host that runs the VM may drop its health (a moved VM's old host says "removed")
        session.execute(
            delete(HealthCurrentRow).where(HealthCurrentRow.vm.in_(list(removed)), HealthCurrentRow.host == host)
        )
    stored = _insert_transitions(session, pending)
    if aggregates:
        stmt = _upsert(session, HealthMinuteRow)
        # a minute that arrives again (the agent re-sends after a reconnect) replaces the row
        session.execute(
            stmt.on_conflict_do_update(  # type: ignore[attr-defined]  # both dialects' Insert have it
                index_elements=["vm", "check", "minute"],
                set_={
                    c: getattr(stmt.excluded, c)  # type: ignore[attr-defined]
                    for c in (
                        "passes",
                        "warnings",
                        "failures",
                        "no_data",
                        "duration_us_sum",
                        "duration_us_max",
                    )
                },
            ),
            [
                {
                    "vm": a.vm,
                    "check": a.check,
                    "minute": a.minute,
                    "passes": a.passes,
                    "warnings": a.warnings,
                    "failures": a.failures,
                    "no_data": a.no_data,
                    "duration_us_sum": a.duration_us_sum,
                    "duration_us_max": a.duration_us_max,
                }
                for a in aggregates
            ],
        )
    if actions:
        session.execute(
            _upsert(session, HealthActionRow).on_conflict_do_nothing(  # type: ignore[attr-defined]
                index_elements=["vm", "check", "trigger", "time"]
            ),
            [
                {
                    "vm": a.vm,
                    "check": a.check,
                    "trigger": a.trigger,
                    "kind": a.kind.name,
                    "outcome": a.outcome,
                    "detail": a.detail,
                    "time": a.time,
                }
                for a in actions
            ],
        )
    return stored


def mark_unknown(session: Session, host: str, detail: str, now: datetime) -> list[tuple[VmHealth, Transition | None]]:
    """Every VM of ``host`` and each of its checks becomes UNKNOWN.

    Returns, per VM that changed, its new health and its VM-level transition (None when the VM was
    UNKNOWN already and only checks changed).
    """
    _lock_transitions(session)
    changed: list[VmHealth] = []
    pending: list[Transition] = []
    rows = session.execute(
        select(HealthCurrentRow).where(HealthCurrentRow.host == host).order_by(HealthCurrentRow.vm).with_for_update()
    ).scalars()
    for row in rows:
        health = _current_model(row)
        if health.state is HealthState.UNKNOWN and all(c.state is HealthState.UNKNOWN for c in health.checks):
            continue
        checks = tuple(
            c if c.state is HealthState.UNKNOWN else dataclasses.replace(c, state=HealthState.UNKNOWN, since=now)
            for c in health.checks
        )
        was_known = health.state is not HealthState.UNKNOWN
        after = dataclasses.replace(
            health, state=HealthState.UNKNOWN, checks=checks, since=now if was_known else health.since, updated=now
        )
        row.state, row.document, row.updated_at = after.state.name, codec.vm_health_to_json(after), now
        changed.append(after)
        if was_known:
            pending.append(Transition(health.vm, host, "", health.state, HealthState.UNKNOWN, now, detail))
    by_vm = {t.vm: t for t in _insert_transitions(session, pending)}
    return [(after, by_vm.get(after.vm)) for after in changed]


def get_current(session: Session, vm: str) -> VmHealth | None:
    """The current health of ``vm`` (None before any report)."""
    row = session.get(HealthCurrentRow, vm)
    return None if row is None else _current_model(row)


def list_current(
    session: Session,
    names: Sequence[str] | None = None,
    states: Sequence[HealthState] | None = None,
    host: str | None = None,
) -> list[VmHealth]:
    """Current health by VM name; each filter applies when given (an empty sequence matches nothing)."""
    query = select(HealthCurrentRow).order_by(HealthCurrentRow.vm)
    if names is not None:
        query = query.where(HealthCurrentRow.vm.in_(list(names)))
    if states is not None:
        query = query.where(HealthCurrentRow.state.in_([s.name for s in states]))
    if host is not None:
        query = query.where(HealthCurrentRow.host == host)
    return [_current_model(r) for r in session.execute(query).scalars()]


def _state_filter(states: Sequence[HealthState]) -> ColumnElement[bool]:
    wanted = [s.name for s in states]
    return or_(HealthTransitionRow.from_state.in_(wanted), HealthTransitionRow.to_state.in_(wanted))


def transitions_after(
    session: Session,
    seq: int,
    names: Sequence[str] | None = None,
    states: Sequence[HealthState] | None = None,
    limit: int = 1000,
) -> list[Transition]:
    """Transitions with a greater seq, oldest first, at most ``limit`` (``states`` matches from or to)."""
    query = select(HealthTransitionRow).where(HealthTransitionRow.seq > seq)
    if names is not None:
        query = query.where(HealthTransitionRow.vm.in_(list(names)))
    if states is not None:
        query = query.where(_state_filter(states))
    rows = session.execute(query.order_by(HealthTransitionRow.seq).limit(limit)).scalars()
    return [_transition_model(r) for r in rows]


def max_seq(session: Session) -> int:
    """The highest stored transition seq (0 when none was ever stored)."""
    return int(session.execute(select(func.coalesce(func.max(HealthTransitionRow.seq), 0))).scalar_one())


def min_seq(session: Session) -> int:
    """The lowest transition seq still stored (0 when none was ever stored)."""
    return int(session.execute(select(func.coalesce(func.min(HealthTransitionRow.seq), 0))).scalar_one())


def history(
    session: Session, vm: str, since: datetime, check: str, limit: int
) -> tuple[list[Transition], list[Aggregate], list[ActionRecord]]:
    """Transitions (the newest ``limit``), minute aggregates and actions of ``vm`` from ``since``, oldest first.

    ``check`` "" means every check (and the VM's own transitions).
    """
    t_query = select(HealthTransitionRow).where(HealthTransitionRow.vm == vm, HealthTransitionRow.time >= since)
    m_query = select(HealthMinuteRow).where(HealthMinuteRow.vm == vm, HealthMinuteRow.minute >= since)
    a_query = select(HealthActionRow).where(HealthActionRow.vm == vm, HealthActionRow.time >= since)
    if check:
        t_query = t_query.where(HealthTransitionRow.check == check)
        m_query = m_query.where(HealthMinuteRow.check == check)
        a_query = a_query.where(HealthActionRow.check == check)
    # newest first under the limit, then turned around: a long history keeps its recent end
    transitions = [
        _transition_model(r)
        for r in session.execute(t_query.order_by(HealthTransitionRow.seq.desc()).limit(limit)).scalars()
    ]
    aggregates = [
        Aggregate(
            vm=r.vm,
            check=r.check,
            minute=r.minute,
            passes=r.passes,
            warnings=r.warnings,
            failures=r.failures,
            no_data=r.no_data,
            duration_us_sum=r.duration_us_sum,
            duration_us_max=r.duration_us_max,
        )
        for r in session.execute(
            m_query.order_by(HealthMinuteRow.minute.desc(), HealthMinuteRow.check).limit(MAX_HISTORY_AGGREGATES)
        ).scalars()
    ]
    actions = [
        ActionRecord(
            vm=r.vm,
            check=r.check,
            trigger=r.trigger,
            kind=ActionKind[r.kind],
            outcome=r.outcome,
            detail=r.detail,
            time=r.time,
        )
        for r in session.execute(
            a_query.order_by(HealthActionRow.time.desc(), HealthActionRow.id.desc()).limit(MAX_HISTORY_ACTIONS)
        ).scalars()
    ]
    transitions.reverse()
    aggregates.reverse()
    actions.reverse()
    return transitions, aggregates, actions


def prune(
    session: Session, transitions_before: datetime, minutes_before: datetime, actions_before: datetime
) -> tuple[int, int, int]:
    """Drop transitions, minute aggregates and actions older than their cut-offs; how many of each.

    Transitions are cut by seq, not row by row: everything up to the newest seq older than the cut-off
    goes, and the newest transition always stays. So the retained transitions are one contiguous range
    and a resume point below it is known to be lost (REVISION_EXPIRED), never silently incomplete.
    """
    _lock_transitions(session)
    cut = session.execute(
        select(func.max(HealthTransitionRow.seq)).where(HealthTransitionRow.time < transitions_before)
    ).scalar_one_or_none()
    t_removed = 0
    if cut is not None:
        cut = min(int(cut), max_seq(session) - 1)
        result = session.execute(delete(HealthTransitionRow).where(HealthTransitionRow.seq <= cut))
        t_removed = int(getattr(result, "rowcount", 0) or 0)
    m_result = session.execute(delete(HealthMinuteRow).where(HealthMinuteRow.minute < minutes_before))
    a_result = session.execute(delete(HealthActionRow).where(HealthActionRow.time < actions_before))
    return (
        t_removed,
        int(getattr(m_result, "rowcount", 0) or 0),
        int(getattr(a_result, "rowcount", 0) or 0),
    )
