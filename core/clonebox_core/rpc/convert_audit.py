"""Conversions between the audit model (clonebox_core.audit) and its protobuf messages."""

from __future__ import annotations

from datetime import UTC

from clonebox.type.v1 import audit_pb2
from google.protobuf import timestamp_pb2

from clonebox_core.audit.chain import ChainRecord, Head
from clonebox_core.audit.event import AuditEvent, Outcome

_OUTCOME_TO_PB = {
    Outcome.ACCEPTED: audit_pb2.AUDIT_OUTCOME_ACCEPTED,
    Outcome.SUCCEEDED: audit_pb2.AUDIT_OUTCOME_SUCCEEDED,
    Outcome.REJECTED: audit_pb2.AUDIT_OUTCOME_REJECTED,
    Outcome.FAILED: audit_pb2.AUDIT_OUTCOME_FAILED,
    Outcome.PARTLY_FAILED: audit_pb2.AUDIT_OUTCOME_PARTLY_FAILED,
}
_OUTCOME_FROM_PB = {v: k for k, v in _OUTCOME_TO_PB.items()}


def outcome_to_pb(outcome: Outcome) -> audit_pb2.AuditOutcome.ValueType:
    """The proto enum value of ``outcome``."""
    return _OUTCOME_TO_PB[outcome]


def outcome_from_pb(value: audit_pb2.AuditOutcome.ValueType) -> Outcome | None:
    """The outcome of a proto enum value (None for UNSPECIFIED or unknown values)."""
    return _OUTCOME_FROM_PB.get(value)


def event_to_pb(event: AuditEvent) -> audit_pb2.AuditEvent:
    """``AuditEvent`` -> message."""
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(event.time.astimezone(UTC))
    return audit_pb2.AuditEvent(
        id=event.id,
        time=ts,
        actor=event.actor,
        action=event.action,
        resource=event.resource,
        outcome=outcome_to_pb(event.outcome),
        request_id=event.request_id,
        trace_id=event.trace_id,
        reason=event.reason,
        origin=event.origin,
        details=dict(event.details),
    )


def event_from_pb(msg: audit_pb2.AuditEvent) -> AuditEvent:
    """Message -> ``AuditEvent`` (ValueError for an event without id, action or outcome)."""
    outcome = outcome_from_pb(msg.outcome)
    if not msg.id or not msg.action or outcome is None:
        raise ValueError("audit event needs an id, an action and an outcome")
    try:
        when = msg.time.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError, OSError):
        raise ValueError("audit event time is out of range") from None
    return AuditEvent(
        id=msg.id,
        time=when,
        actor=msg.actor,
        action=msg.action,
        resource=msg.resource,
        outcome=outcome,
        request_id=msg.request_id,
        trace_id=msg.trace_id,
        reason=msg.reason,
        origin=msg.origin,
        details=dict(msg.details),
    )


def record_to_pb(record: ChainRecord) -> audit_pb2.AuditRecord:
    """``ChainRecord`` -> message."""
    return audit_pb2.AuditRecord(
        seq=record.seq,
        event=event_to_pb(record.event),
        key_id=record.key_id,
        prev_mac=record.prev_mac.hex(),
        mac=record.mac.hex(),
    )


def record_from_pb(msg: audit_pb2.AuditRecord) -> ChainRecord:
    """Message -> ``ChainRecord``."""
    return ChainRecord(
        msg.seq, msg.key_id, bytes.fromhex(msg.prev_mac), bytes.fromhex(msg.mac), event_from_pb(msg.event)
    )


def head_to_pb(head: Head) -> audit_pb2.AuditHead:
    """``Head`` -> message."""
    return audit_pb2.AuditHead(seq=head.seq, mac=head.mac.hex())


def head_from_pb(msg: audit_pb2.AuditHead) -> Head | None:
    """Message -> ``Head`` (None when unset or malformed)."""
    try:
        mac = bytes.fromhex(msg.mac)
    except ValueError:
        return None
    # sequence numbers are 64-bit signed in the database
    return Head(msg.seq, mac) if len(mac) == 32 and msg.seq < 2**63 else None
