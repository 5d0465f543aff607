"""Audit events: who tried to change what, when, and what actually happened."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from clonebox_core.security.identity import current_caller
from clonebox_core.telemetry.tracing import span_ids

#: actor of changes nobody asked for over an RPC (recovery, the operation runner after a restart)
SYSTEM_ACTOR = "system"
#: actor of calls on a plaintext (loopback, unauthenticated) server
ANONYMOUS_ACTOR = "anonymous"

#: details are short, flat strings; larger values are cut so one event cannot bloat the chain
MAX_DETAIL_CHARS = 512
MAX_DETAILS = 32


class Outcome(StrEnum):
    """What became of an attempted change."""

    ACCEPTED = "accepted"  # a long-running operation was recorded; its end is a second event
    SUCCEEDED = "succeeded"
    REJECTED = "rejected"  # refused before anything changed (auth, validation, preconditions)
    FAILED = "failed"
    PARTLY_FAILED = "partly_failed"


#: status codes that mean "refused before acting"; any other error is a failure
_REJECTING_CODES = frozenset(
    {
        "INVALID_ARGUMENT",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "UNAUTHENTICATED",
        "FAILED_PRECONDITION",
        "RESOURCE_EXHAUSTED",
        "OUT_OF_RANGE",
        "ABORTED",
    }
)


def outcome_of_code(code: str) -> Outcome:
    """The outcome of a call that ended with gRPC status ``code`` (a name such as "NOT_FOUND")."""
    if code == "OK":
        return Outcome.SUCCEEDED
    return Outcome.REJECTED if code in _REJECTING_CODES else Outcome.FAILED


@dataclass(frozen=True)
class AuditEvent:
    """One audit record before it joins a chain.

    ``origin`` names the daemon that wrote it ("controller" or "agent/HOST"); ``details`` never hold
    secret values: callers pass redacted forms only.
    """

    id: str
    time: datetime
    actor: str
    action: str
    resource: str
    outcome: Outcome
    request_id: str = ""
    trace_id: str = ""
    reason: str = ""
    origin: str = "controller"
    details: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (times in ISO 8601 UTC)."""
        return {
            "id": self.id,
            "time": self.time.astimezone(UTC).isoformat(timespec="microseconds"),
            "actor": self.actor,
            "action": self.action,
            "resource": self.resource,
            "outcome": str(self.outcome),
            "request_id": self.request_id,
            "trace_id": self.trace_id,
            "reason": self.reason,
            "origin": self.origin,
            "details": dict(sorted(self.details.items())),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AuditEvent:
        """The event ``to_json`` produced (ValueError on malformed input)."""
        try:
            details = data.get("details") or {}
            if not isinstance(details, Mapping):
                raise ValueError("details must be an object")
            return cls(
                id=str(data["id"]),
                time=datetime.fromisoformat(str(data["time"])).astimezone(UTC),
                actor=str(data["actor"]),
                action=str(data["action"]),
                resource=str(data["resource"]),
                outcome=Outcome(str(data["outcome"])),
                request_id=str(data.get("request_id", "")),
                trace_id=str(data.get("trace_id", "")),
                reason=str(data.get("reason", "")),
                origin=str(data.get("origin", "controller")),
                details={str(k): str(v) for k, v in details.items()},
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed audit event: {exc}") from exc

    def dumps(self) -> str:
        """Compact JSON text of the event."""
        return json.dumps(self.to_json(), separators=(",", ":"), ensure_ascii=False)

    def with_origin(self, origin: str) -> AuditEvent:
        """A copy written by ``origin``."""
        return replace(self, origin=origin)


def current_trace_id() -> str:
    """Hex trace id of the active span ("" outside traces)."""
    ids = span_ids()
    return ids[0] if ids else ""


def current_actor() -> str:
    """The caller of the RPC being served, as a SPIFFE id; anonymous on plaintext; system outside RPCs."""
    caller = current_caller()
    return caller.spiffe_id if caller is not None else ANONYMOUS_ACTOR


def _clean_details(details: Mapping[str, object] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in list((details or {}).items())[:MAX_DETAILS]:
        text = str(value)  # a Secret renders redacted here
        out[str(key)[:64]] = text if len(text) <= MAX_DETAIL_CHARS else text[: MAX_DETAIL_CHARS - 1] + "…"
    return out


def new_event(
    action: str,
    resource: str,
    outcome: Outcome,
    *,
    request_id: str = "",
    reason: str = "",
    details: Mapping[str, object] | None = None,
    actor: str | None = None,
    origin: str = "controller",
    now: datetime | None = None,
) -> AuditEvent:
    """An event attributed to the current caller and trace (override ``actor`` outside RPCs)."""
    return AuditEvent(
        id=uuid.uuid4().hex,
        time=(now or datetime.now(UTC)).astimezone(UTC),
        actor=actor if actor is not None else current_actor(),
        action=action,
        resource=resource,
        outcome=outcome,
        request_id=request_id,
        trace_id=current_trace_id(),
        reason=reason,
        origin=origin,
        details=_clean_details(details),
    )


def failed_call_event(action: str, resource: str, code: str, reason: str, request: object, origin: str) -> AuditEvent:
    """The record of a mutation call that ended with gRPC status ``code`` (rejected or failed)."""
    return new_event(
        action,
        resource,
        outcome_of_code(code),
        request_id=str(getattr(request, "request_id", "") or "")[:128],
        reason=reason or code,
        origin=origin,
        details={"code": code},
    )
