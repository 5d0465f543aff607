"""HealthService: the fleet's VM health (current, watched, run now, history) over gRPC."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeAlias

from clonebox.controller.v1 import health_service_pb2 as pb
from clonebox.controller.v1 import health_service_pb2_grpc as pb_grpc
from clonebox.type.v1 import health_pb2
from google.protobuf import timestamp_pb2

from clonebox_controller.app.health import HealthEvent, HealthHub
from clonebox_core.errors import invalid_field
from clonebox_core.health import HealthState
from clonebox_core.names import check_dns_label
from clonebox_core.rpc import convert_health

Ctx: TypeAlias = Any

#: transitions a history answer holds by default, and at most
DEFAULT_HISTORY_LIMIT = 1000
MAX_HISTORY_LIMIT = 10_000
#: VMs one request may name
MAX_NAMES = 1000
#: seqs are 64-bit signed integers in the database
MAX_SEQ = 2**63 - 1
#: how far ahead of this controller's clock a client's ``since`` may be (clocks drift)
CLOCK_SKEW = timedelta(seconds=60)
#: history window when the request gives no ``since``
DEFAULT_HISTORY_WINDOW = timedelta(hours=24)

_STATES = {convert_health.state_to_proto(s): s for s in HealthState}


def _names(values: Sequence[str], field: str = "names") -> list[str]:
    if len(values) > MAX_NAMES:
        raise invalid_field(field, f"at most {MAX_NAMES} VM names")
    return [check_dns_label(f"{field}[{i}]", v) for i, v in enumerate(values)]


def _states(values: Sequence[health_pb2.HealthState.ValueType]) -> list[HealthState]:
    out: list[HealthState] = []
    for i, v in enumerate(values):
        state = _STATES.get(v)
        if state is None:
            raise invalid_field(f"states[{i}]", f"{v} is not a health state (unknown, healthy, degraded, unhealthy)")
        out.append(state)
    return out


def _check_name(value: str) -> str:
    return check_dns_label("check", value) if value else ""


def _since(ts: timestamp_pb2.Timestamp, present: bool, now: datetime) -> datetime:
    if not present:
        return now - DEFAULT_HISTORY_WINDOW
    try:
        since = ts.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError, OSError):
        raise invalid_field("since", "not a valid time (years 1..9999)") from None
    if since > now + CLOCK_SKEW:
        raise invalid_field("since", f"{since.isoformat()} is in the future")
    return since


def _event_to_proto(event: HealthEvent) -> pb.WatchHealthResponse:
    msg = pb.WatchHealthResponse(
        transitions=[convert_health.transition_to_proto(t) for t in event.transitions],
        removed=event.removed,
        synced=event.synced,
        seq=event.seq,
    )
    if event.health is not None:
        msg.health.CopyFrom(convert_health.vm_health_to_proto(event.health))
    return msg


class HealthServicer(pb_grpc.HealthServiceServicer):
    """Thin adapter from gRPC to ``HealthHub``; errors are mapped by the shared interceptor."""

    def __init__(self, hub: HealthHub) -> None:
        self._hub = hub

    async def GetVmHealth(self, request: pb.GetVmHealthRequest, context: Ctx) -> pb.GetVmHealthResponse:
        """See the proto."""
        check_dns_label("name", request.name)
        health = await self._hub.get(request.name)
        return pb.GetVmHealthResponse(health=convert_health.vm_health_to_proto(health))

    async def ListHealth(self, request: pb.ListHealthRequest, context: Ctx) -> pb.ListHealthResponse:
        """See the proto."""
        found = await self._hub.list_health(_names(request.names), _states(request.states))
        return pb.ListHealthResponse(health=[convert_health.vm_health_to_proto(h) for h in found])

    async def WatchHealth(self, request: pb.WatchHealthRequest, context: Ctx) -> AsyncIterator[pb.WatchHealthResponse]:
        """See the proto.

        Each message's ``seq`` is the highest transition seq up to which this stream is complete:
        watching again with ``after_seq`` set to the last one received loses nothing.
        """
        names, states = _names(request.names), _states(request.states)
        if request.after_seq > MAX_SEQ:
            raise invalid_field("after_seq", f"at most {MAX_SEQ}")
        async for event in self._hub.watch(names, states, request.after_seq):
            yield _event_to_proto(event)

    async def CheckHealth(self, request: pb.CheckHealthRequest, context: Ctx) -> pb.CheckHealthResponse:
        """See the proto."""
        check_dns_label("name", request.name)
        results, health = await self._hub.check(request.name, _check_name(request.check))
        return pb.CheckHealthResponse(
            results=[convert_health.result_to_proto(r) for r in results],
            health=convert_health.vm_health_to_proto(health),
        )

    async def GetHealthHistory(self, request: pb.GetHealthHistoryRequest, context: Ctx) -> pb.GetHealthHistoryResponse:
        """See the proto."""
        check_dns_label("name", request.name)
        check = _check_name(request.check)
        limit = request.limit or DEFAULT_HISTORY_LIMIT
        if limit > MAX_HISTORY_LIMIT:
            raise invalid_field("limit", f"{request.limit} is above the maximum {MAX_HISTORY_LIMIT}")
        since = _since(request.since, request.HasField("since"), datetime.now(UTC))
        transitions, aggregates, actions = await self._hub.history(request.name, since, check, limit)
        return pb.GetHealthHistoryResponse(
            transitions=[convert_health.transition_to_proto(t) for t in transitions],
            aggregates=[convert_health.aggregate_to_proto(a) for a in aggregates],
            actions=[convert_health.action_to_proto(a) for a in actions],
        )
