"""The audit API (AuditService) and the guard observer that records refused and failed mutations."""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, TypeAlias

from clonebox.controller.v1 import audit_service_pb2, audit_service_pb2_grpc
from google.protobuf import timestamp_pb2

from clonebox_controller.app.audit import AuditLog
from clonebox_core.audit.chain import AuditFilter
from clonebox_core.audit.event import failed_call_event
from clonebox_core.errors import InvalidArgument
from clonebox_core.rpc import convert_audit
from clonebox_core.rpc.status import CallRecord
from clonebox_core.security.policy import audit_action

Ctx: TypeAlias = Any

MAX_PAGE = 1000
#: sequence numbers are 64-bit signed integers in the database
MAX_SEQ = 2**63 - 1

#: which request field names the resource of each kind of action
_RESOURCE_FIELDS: dict[str, tuple[str, str]] = {
    "vm": ("vms", "name"),
    # snapshot requests name their VM in ``vm`` (an import's stream has no single request to read)
    "snapshot": ("vms", "vm"),
    "host": ("hosts", "name"),
    # volume requests name the volume in ``name`` (its host in ``host``, kept in the details)
    "volume": ("volumes", "name"),
    # DestroyPlan names the plan in ``name``; ApplyPlan carries it in ``plan.name`` (see resource_of)
    "plan": ("plans", "name"),
    "certificate": ("certificates", "serial"),
    "audit": ("audit", ""),
}


def resource_of(action: str, request: Any) -> str:
    """The resource name an attempted ``action`` with ``request`` was about ("" when unknown)."""
    kind = action.split(".", 1)[0]
    collection, field = _RESOURCE_FIELDS.get(kind, ("", ""))
    if not collection:
        return ""
    if not field:
        return collection
    value = ""
    for name in (field, "host", "serial", "name"):
        value = str(getattr(request, name, "") or "")
        if value:
            break
    if not value and kind == "vm" and request is not None and "spec" in request.DESCRIPTOR.fields_by_name:
        value = request.spec.name
    if not value and kind == "plan" and request is not None and "plan" in request.DESCRIPTOR.fields_by_name:
        value = request.plan.name
    return f"{collection}/{value[:128]}" if value else collection


class AuditCallObserver:
    """Records every mutation the guard saw fail (refused by policy, invalid, or failed in the handler).

    Accepted and successful mutations are recorded by the use cases themselves, in the same database
    transaction as the change; this catches the attempts that never got that far.
    """

    def __init__(self, audit: AuditLog) -> None:
        self._audit = audit

    async def call_finished(self, record: CallRecord) -> None:
        """See ``clonebox_core.rpc.status.CallObserver``."""
        action = audit_action(record.method)
        if action is None or record.code == "OK":
            return
        resource = resource_of(action, record.request)
        event = failed_call_event(action, resource, record.code, record.reason, record.request, "controller")
        await self._audit.record([event])


def _time(ts: timestamp_pb2.Timestamp, field: str) -> datetime:
    try:
        return ts.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError, OSError):
        raise InvalidArgument(
            f"{field}: not a valid time (years 1..9999)", reason="INVALID_FIELD", metadata={"field": field}
        ) from None


def _filter(msg: audit_service_pb2.AuditFilter) -> AuditFilter:
    outcome = convert_audit.outcome_from_pb(msg.outcome)
    return AuditFilter(
        since=_time(msg.since, "filter.since") if msg.HasField("since") else None,
        until=_time(msg.until, "filter.until") if msg.HasField("until") else None,
        actor=msg.actor,
        action=msg.action,
        resource=msg.resource,
        outcome=str(outcome) if outcome is not None else "",
    )


def _encode_token(seq: int) -> str:
    return base64.urlsafe_b64encode(f"audit:{seq}".encode()).decode()


def _decode_token(token: str) -> int:
    try:
        text = base64.urlsafe_b64decode(token.encode()).decode()
        prefix, _, seq = text.partition(":")
        if prefix == "audit" and seq.isdigit() and int(seq) <= MAX_SEQ and _encode_token(int(seq)) == token:
            return int(seq)
    except (ValueError, UnicodeDecodeError):
        pass
    raise InvalidArgument(
        "page_token: not a token returned by a previous call",
        reason="INVALID_PAGE_TOKEN",
        metadata={"field": "page_token"},
    )


class AuditServicer(audit_service_pb2_grpc.AuditServiceServicer):
    """Reads, watches, verifies, exports and archives the audit chain."""

    def __init__(self, audit: AuditLog) -> None:
        self._audit = audit

    async def ListAuditEvents(
        self, request: audit_service_pb2.ListAuditEventsRequest, context: Ctx
    ) -> audit_service_pb2.ListAuditEventsResponse:
        """See the proto."""
        size = request.page_size or 100
        if size > MAX_PAGE:
            raise InvalidArgument(f"page_size: at most {MAX_PAGE}", reason="INVALID_FIELD")
        before = _decode_token(request.page_token) if request.page_token else 0
        query = _filter(request.filter)
        records = await self._audit.query(
            dataclasses.replace(query, after_seq=before, limit=size + 1, newest_first=True)
        )
        more = len(records) > size
        records = records[:size]
        return audit_service_pb2.ListAuditEventsResponse(
            records=[convert_audit.record_to_pb(r) for r in records],
            next_page_token=_encode_token(records[-1].seq) if more and records else "",
        )

    async def GetAuditEvent(
        self, request: audit_service_pb2.GetAuditEventRequest, context: Ctx
    ) -> audit_service_pb2.GetAuditEventResponse:
        """See the proto."""
        if not request.id:
            raise InvalidArgument("id: give an audit event id", reason="INVALID_FIELD", metadata={"field": "id"})
        record = await self._audit.get(request.id)
        return audit_service_pb2.GetAuditEventResponse(record=convert_audit.record_to_pb(record))

    async def WatchAudit(
        self, request: audit_service_pb2.WatchAuditRequest, context: Ctx
    ) -> AsyncIterator[audit_service_pb2.WatchAuditResponse]:
        """See the proto."""
        if request.after_seq > MAX_SEQ:
            raise InvalidArgument(
                f"after_seq: at most {MAX_SEQ}", reason="INVALID_FIELD", metadata={"field": "after_seq"}
            )
        async for record in self._audit.watch(_filter(request.filter), request.after_seq):
            yield audit_service_pb2.WatchAuditResponse(record=convert_audit.record_to_pb(record))

    async def VerifyAudit(
        self, request: audit_service_pb2.VerifyAuditRequest, context: Ctx
    ) -> audit_service_pb2.VerifyAuditResponse:
        """See the proto."""
        result = await self._audit.verify()
        r = result.report
        return audit_service_pb2.VerifyAuditResponse(
            ok=r.ok,
            checked=r.checked,
            first_seq=r.first_seq,
            last_seq=r.last_seq,
            bad_seq=r.bad_seq,
            bad_event_id=r.bad_id,
            problem=r.problem,
            witnesses=list(result.witnesses),
        )

    async def ExportAudit(
        self, request: audit_service_pb2.ExportAuditRequest, context: Ctx
    ) -> AsyncIterator[audit_service_pb2.ExportAuditResponse]:
        """See the proto."""
        before = _time(request.before, "before") if request.HasField("before") else None
        start, records = await self._audit.export(before)
        first = True
        for record in records:
            msg = audit_service_pb2.ExportAuditResponse(record=convert_audit.record_to_pb(record))
            if first:
                msg.start.CopyFrom(convert_audit.head_to_pb(start))
                first = False
            yield msg

    async def ArchiveAudit(
        self, request: audit_service_pb2.ArchiveAuditRequest, context: Ctx
    ) -> audit_service_pb2.ArchiveAuditResponse:
        """See the proto."""
        through = convert_audit.head_from_pb(request.through)
        if through is None:
            raise InvalidArgument("through: give the seq and MAC of the last exported record", reason="INVALID_FIELD")
        removed = await self._audit.archive(through, request.request_id)
        return audit_service_pb2.ArchiveAuditResponse(removed=removed, anchor=convert_audit.head_to_pb(through))
