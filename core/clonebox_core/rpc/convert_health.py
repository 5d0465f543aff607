"""Conversion between the health status models (``clonebox_core.health``) and ``clonebox.type.v1`` messages.

Probe *definitions* (part of a VM spec) convert in ``convert``; this module converts what probes find:
results, check and VM states, transitions, minute aggregates and action records.
"""

from __future__ import annotations

from datetime import UTC, datetime

from clonebox.type.v1 import health_pb2

from clonebox_core import health
from clonebox_core.rpc.convert import (
    _ACTION_FROM_PROTO,
    _ACTION_TO_PROTO,
    _CHECK_TYPE_FROM_PROTO,
    _CHECK_TYPE_TO_PROTO,
    ts_from_proto,
    ts_to_proto,
)

#: what an unset timestamp reads as (never sent by our own servers)
_EPOCH = datetime.fromtimestamp(0, UTC)
_STATE_TO_PROTO = {s: health_pb2.HealthState.Value(f"HEALTH_STATE_{s.name}") for s in health.HealthState}
_STATE_FROM_PROTO = {v: k for k, v in _STATE_TO_PROTO.items()}
_SAMPLE_TO_PROTO = {s: health_pb2.ProbeSample.Value(f"PROBE_SAMPLE_{s.name}") for s in health.Sample}
_SAMPLE_FROM_PROTO = {v: k for k, v in _SAMPLE_TO_PROTO.items()}


def state_to_proto(s: health.HealthState) -> health_pb2.HealthState.ValueType:
    """HealthState -> proto enum."""
    return _STATE_TO_PROTO[s]


def state_from_proto(v: health_pb2.HealthState.ValueType) -> health.HealthState:
    """Proto enum -> HealthState (UNSPECIFIED reads as UNKNOWN)."""
    return _STATE_FROM_PROTO.get(v, health.HealthState.UNKNOWN)


def result_to_proto(r: health.ProbeResult) -> health_pb2.ProbeResult:
    """ProbeResult -> proto."""
    return health_pb2.ProbeResult(
        check=r.check,
        sample=_SAMPLE_TO_PROTO[r.sample],
        detail=r.detail,
        time=ts_to_proto(r.time),
        duration_us=r.duration_us,
    )


def result_from_proto(m: health_pb2.ProbeResult) -> health.ProbeResult:
    """Proto -> ProbeResult."""
    time = ts_from_proto(m.time, m.HasField("time"))
    return health.ProbeResult(
        check=m.check,
        sample=_SAMPLE_FROM_PROTO.get(m.sample, health.Sample.NO_DATA),
        detail=m.detail,
        time=time if time is not None else _EPOCH,
        duration_us=m.duration_us,
    )


def check_to_proto(c: health.CheckStatus) -> health_pb2.CheckStatus:
    """CheckStatus -> proto."""
    return health_pb2.CheckStatus(
        name=c.name,
        type=_CHECK_TYPE_TO_PROTO[c.type],
        state=_STATE_TO_PROTO[c.state],
        critical=c.critical,
        consecutive_failures=c.consecutive_failures,
        consecutive_successes=c.consecutive_successes,
        last=None if c.last is None else result_to_proto(c.last),
        since=ts_to_proto(c.since),
        implicit=c.implicit,
    )


def check_from_proto(m: health_pb2.CheckStatus) -> health.CheckStatus:
    """Proto -> CheckStatus."""
    return health.CheckStatus(
        name=m.name,
        type=_CHECK_TYPE_FROM_PROTO.get(m.type, health.ProbeType.GUEST_AGENT),
        state=state_from_proto(m.state),
        critical=m.critical,
        consecutive_failures=m.consecutive_failures,
        consecutive_successes=m.consecutive_successes,
        last=result_from_proto(m.last) if m.HasField("last") else None,
        since=ts_from_proto(m.since, m.HasField("since")),
        implicit=m.implicit,
    )


def vm_health_to_proto(h: health.VmHealth) -> health_pb2.VmHealth:
    """VmHealth -> proto."""
    return health_pb2.VmHealth(
        vm=h.vm,
        host=h.host,
        state=_STATE_TO_PROTO[h.state],
        checks=[check_to_proto(c) for c in h.checks],
        since=ts_to_proto(h.since),
        updated=ts_to_proto(h.updated),
    )


def vm_health_from_proto(m: health_pb2.VmHealth) -> health.VmHealth:
    """Proto -> VmHealth."""
    return health.VmHealth(
        vm=m.vm,
        host=m.host,
        state=state_from_proto(m.state),
        checks=tuple(check_from_proto(c) for c in m.checks),
        since=ts_from_proto(m.since, m.HasField("since")),
        updated=ts_from_proto(m.updated, m.HasField("updated")),
    )


def transition_to_proto(t: health.Transition) -> health_pb2.HealthTransition:
    """Transition -> proto."""
    return health_pb2.HealthTransition(
        seq=t.seq,
        vm=t.vm,
        host=t.host,
        check=t.check,
        from_state=_STATE_TO_PROTO[t.from_state],
        to_state=_STATE_TO_PROTO[t.to_state],
        time=ts_to_proto(t.time),
        detail=t.detail,
    )


def transition_from_proto(m: health_pb2.HealthTransition) -> health.Transition:
    """Proto -> Transition."""
    time = ts_from_proto(m.time, m.HasField("time"))
    return health.Transition(
        vm=m.vm,
        host=m.host,
        check=m.check,
        from_state=state_from_proto(m.from_state),
        to_state=state_from_proto(m.to_state),
        time=time if time is not None else _EPOCH,
        detail=m.detail,
        seq=m.seq,
    )


def aggregate_to_proto(a: health.Aggregate) -> health_pb2.HealthAggregate:
    """Aggregate -> proto."""
    return health_pb2.HealthAggregate(
        vm=a.vm,
        check=a.check,
        minute=ts_to_proto(a.minute),
        passes=a.passes,
        warnings=a.warnings,
        failures=a.failures,
        no_data=a.no_data,
        duration_us_sum=a.duration_us_sum,
        duration_us_max=a.duration_us_max,
    )


def aggregate_from_proto(m: health_pb2.HealthAggregate) -> health.Aggregate:
    """Proto -> Aggregate."""
    minute = ts_from_proto(m.minute, m.HasField("minute"))
    return health.Aggregate(
        vm=m.vm,
        check=m.check,
        minute=minute if minute is not None else _EPOCH,
        passes=m.passes,
        warnings=m.warnings,
        failures=m.failures,
        no_data=m.no_data,
        duration_us_sum=m.duration_us_sum,
        duration_us_max=m.duration_us_max,
    )


def action_to_proto(a: health.ActionRecord) -> health_pb2.HealthActionRecord:
    """ActionRecord -> proto."""
    return health_pb2.HealthActionRecord(
        vm=a.vm,
        check=a.check,
        trigger=a.trigger,
        kind=_ACTION_TO_PROTO[a.kind],
        outcome=a.outcome,
        detail=a.detail,
        time=ts_to_proto(a.time),
    )


def action_from_proto(m: health_pb2.HealthActionRecord) -> health.ActionRecord:
    """Proto -> ActionRecord."""
    time = ts_from_proto(m.time, m.HasField("time"))
    return health.ActionRecord(
        vm=m.vm,
        check=m.check,
        trigger=m.trigger,
        kind=_ACTION_FROM_PROTO.get(m.kind, health.ActionKind.NONE),
        outcome=m.outcome,
        detail=m.detail,
        time=time if time is not None else _EPOCH,
    )
