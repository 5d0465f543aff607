"""Audit chain storage: appends serialised by the database, queries, archive anchors, witnesses.

Appends never rely on an in-process lock: on SQLite every write transaction starts with
``BEGIN IMMEDIATE`` (the engine's write option), which serialises writers across processes; on
PostgreSQL the append takes ``SELECT ... FOR UPDATE`` on the single ``audit_head`` row, which every
appender must pass. So several controller processes can share one chain.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import ColumnElement, Table, bindparam, delete, insert, select, update
from sqlalchemy.orm import Session

from clonebox_core.audit.chain import AuditFilter, ChainRecord, ChainState, Head, Keyring, Witness, anchor_mac
from clonebox_core.audit.event import AuditEvent, Outcome

from .tables import AUDIT_ROW_ID, AuditAnchorRow, AuditEventRow, AuditHeadRow, AuditWitnessRow

#: session.info key under which an append leaves the new head for after-commit witnesses
HEAD_INFO_KEY = "clonebox_audit_head"


def _row_to_record(row: AuditEventRow) -> ChainRecord:
    event = AuditEvent(
        id=row.event_id,
        time=row.time,
        actor=row.actor,
        action=row.action,
        resource=row.resource,
        outcome=Outcome(row.outcome),
        request_id=row.request_id,
        trace_id=row.trace_id,
        reason=row.reason,
        origin=row.origin,
        details={str(k): str(v) for k, v in (row.details or {}).items()},
    )
    return ChainRecord(row.seq, row.key_id, bytes.fromhex(row.prev_mac), bytes.fromhex(row.mac), event)


# built once: appends are on every mutation's path, and building statements costs more than running them
_EVENTS: Table = AuditEventRow.__table__  # type: ignore[assignment]  # declarative tables are Tables
_HEAD: Table = AuditHeadRow.__table__  # type: ignore[assignment]
_HEAD_FOR_UPDATE = select(_HEAD.c.seq, _HEAD.c.mac).where(_HEAD.c.id == AUDIT_ROW_ID).with_for_update()
_PRESENT_IDS = select(_EVENTS.c.event_id).where(_EVENTS.c.event_id.in_(bindparam("ids", expanding=True)))
# most appends carry one event, and an expanding IN is compiled again for every execution
_PRESENT_ID = select(_EVENTS.c.event_id).where(_EVENTS.c.event_id == bindparam("id"))
_INSERT_EVENT = insert(_EVENTS)
_UPDATE_HEAD = (
    update(_HEAD).where(_HEAD.c.id == AUDIT_ROW_ID).values(seq=bindparam("new_seq"), mac=bindparam("new_mac"))
)


def append(session: Session, keyring: Keyring, events: Sequence[AuditEvent]) -> Head:
    """Append ``events`` (skipping ids already in the chain) inside the caller's transaction."""
    conn = session.connection()
    seq, mac_hex = conn.execute(_HEAD_FOR_UPDATE).one()
    head = Head(seq, bytes.fromhex(mac_hex))
    found = (
        conn.execute(_PRESENT_ID, {"id": events[0].id})
        if len(events) == 1
        else conn.execute(_PRESENT_IDS, {"ids": [e.id for e in events]})
    )
    present = set(found.scalars())
    rows: list[dict[str, object]] = []
    for event in events:
        if event.id in present:
            continue  # at-least-once delivery: a forwarded event arrives again after a lost ack
        present.add(event.id)
        next_seq = head.seq + 1
        mac = keyring.mac(head.mac, next_seq, event)
        rows.append(
            {
                "seq": next_seq,
                "event_id": event.id,
                "time": event.time,
                "actor": event.actor,
                "action": event.action,
                "resource": event.resource,
                "outcome": str(event.outcome),
                "request_id": event.request_id,
                "trace_id": event.trace_id,
                "reason": event.reason,
                "origin": event.origin,
                "details": dict(event.details),
                "key_id": keyring.current,
                "prev_mac": head.mac.hex(),
                "mac": mac.hex(),
            }
        )
        head = Head(next_seq, mac)
    if rows:
        conn.execute(_INSERT_EVENT, rows)
        conn.execute(_UPDATE_HEAD, {"new_seq": head.seq, "new_mac": head.mac.hex()})
        session.info[HEAD_INFO_KEY] = head
    return head


def _filters(f: AuditFilter) -> list[ColumnElement[bool]]:
    out: list[ColumnElement[bool]] = []
    if f.since is not None:
        out.append(AuditEventRow.time >= f.since)
    if f.until is not None:
        out.append(AuditEventRow.time < f.until)
    if f.actor:
        out.append(AuditEventRow.actor == f.actor)
    if f.action:
        out.append(AuditEventRow.action == f.action)
    if f.resource:
        out.append(AuditEventRow.resource == f.resource)
    if f.outcome:
        out.append(AuditEventRow.outcome == f.outcome)
    return out


def list_records(session: Session, f: AuditFilter) -> list[ChainRecord]:
    """Records matching ``f``, by sequence (ascending from ``after_seq``, or newest first)."""
    query = select(AuditEventRow).where(*_filters(f))
    if f.newest_first:
        if f.after_seq:
            query = query.where(AuditEventRow.seq < f.after_seq)
        query = query.order_by(AuditEventRow.seq.desc())
    else:
        query = query.where(AuditEventRow.seq > f.after_seq).order_by(AuditEventRow.seq)
    return [_row_to_record(r) for r in session.execute(query.limit(f.limit)).scalars()]


def get_record(session: Session, event_id: str) -> ChainRecord | None:
    """The record of ``event_id``."""
    row = session.execute(select(AuditEventRow).where(AuditEventRow.event_id == event_id)).scalar_one_or_none()
    return None if row is None else _row_to_record(row)


def chain_state(session: Session) -> ChainState:
    """The anchor, the head row and the witnesses."""
    anchor = session.execute(select(AuditAnchorRow).where(AuditAnchorRow.id == AUDIT_ROW_ID)).scalar_one()
    head = session.execute(select(AuditHeadRow).where(AuditHeadRow.id == AUDIT_ROW_ID)).scalar_one()
    witnesses = tuple(
        Witness(f"agent {w.source}", Head(w.seq, bytes.fromhex(w.mac)))
        for w in session.execute(select(AuditWitnessRow).order_by(AuditWitnessRow.source)).scalars()
    )
    return ChainState(
        anchor=Head(anchor.seq, bytes.fromhex(anchor.mac)),
        anchor_key_id=anchor.key_id,
        anchor_seal=bytes.fromhex(anchor.seal),
        head=Head(head.seq, bytes.fromhex(head.mac)),
        witnesses=witnesses,
    )


def archive(session: Session, keyring: Keyring, through: Head, now: datetime) -> int:
    """Drop records up to ``through`` (which must be in the chain) and anchor the chain there."""
    row = session.execute(select(AuditEventRow).where(AuditEventRow.seq == through.seq)).scalar_one_or_none()
    if row is None or bytes.fromhex(row.mac) != through.mac:
        raise LookupError(f"record {through.seq} with that MAC is not in the chain")
    # hold the head lock, so no append interleaves with moving the anchor
    session.execute(select(AuditHeadRow.seq).where(AuditHeadRow.id == AUDIT_ROW_ID).with_for_update())
    seal = anchor_mac(keyring.key(keyring.current) or b"", through.seq, through.mac)
    session.execute(
        update(AuditAnchorRow)
        .where(AuditAnchorRow.id == AUDIT_ROW_ID)
        .values(seq=through.seq, mac=through.mac.hex(), key_id=keyring.current, seal=seal.hex(), archived_time=now)
    )
    result = session.execute(delete(AuditEventRow).where(AuditEventRow.seq <= through.seq))
    return int(getattr(result, "rowcount", 0) or 0)


def record_witness(session: Session, source: str, head: Head, now: datetime) -> None:
    """Keep the head ``source`` (an agent) reports holding."""
    row = session.get(AuditWitnessRow, source)
    if row is None:
        session.add(AuditWitnessRow(source=source, seq=head.seq, mac=head.mac.hex(), report_time=now))
    elif head.seq >= row.seq:
        row.seq, row.mac, row.report_time = head.seq, head.mac.hex(), now
