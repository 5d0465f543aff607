"""Conversion between the plan models (``clonebox_core.plan``) and ``clonebox.type.v1`` messages.

Shared by the controller and the CLI, so both read a plan, a change and a run the same way. The enums
are mapped by table (the proto ones start with ``*_UNSPECIFIED``; an unspecified value reads as the
model's default), and the update policy's zeros read as the model's defaults, as the .proto says.
"""

from __future__ import annotations

from clonebox.type.v1 import plan_pb2

from clonebox_core.plan import (
    DEFAULT_HEALTHY_DEADLINE_MS,
    DEFAULT_MAX_PARALLEL,
    ChangeKind,
    Condition,
    Dependency,
    FailurePolicy,
    Plan,
    PlanNetwork,
    PlanRun,
    PlanVm,
    PlanVolume,
    RunState,
    UpdatePolicy,
    VmChange,
    VmRunState,
    VmStatus,
    VolumeChange,
    VolumeChangeKind,
)
from clonebox_core.rpc import convert

_CONDITION_TO_PROTO = {
    Condition.STARTED: plan_pb2.DEPENDENCY_CONDITION_STARTED,
    Condition.HEALTHY: plan_pb2.DEPENDENCY_CONDITION_HEALTHY,
    Condition.COMPLETED: plan_pb2.DEPENDENCY_CONDITION_COMPLETED,
}
_CONDITION_FROM_PROTO = {v: k for k, v in _CONDITION_TO_PROTO.items()}
_FAILURE_TO_PROTO = {
    FailurePolicy.ROLLBACK: plan_pb2.FAILURE_POLICY_ROLLBACK,
    FailurePolicy.LEAVE: plan_pb2.FAILURE_POLICY_LEAVE,
}
_FAILURE_FROM_PROTO = {v: k for k, v in _FAILURE_TO_PROTO.items()}
_CHANGE_TO_PROTO = {k: plan_pb2.ChangeKind.Value(f"CHANGE_KIND_{k.name}") for k in ChangeKind}
_CHANGE_FROM_PROTO = {v: k for k, v in _CHANGE_TO_PROTO.items()}
_RUN_STATE_TO_PROTO = {s: plan_pb2.PlanRunState.Value(f"PLAN_RUN_STATE_{s.name}") for s in RunState}
_RUN_STATE_FROM_PROTO = {v: k for k, v in _RUN_STATE_TO_PROTO.items()}
_VM_STATE_TO_PROTO = {s: plan_pb2.PlanVmState.Value(f"PLAN_VM_STATE_{s.name}") for s in VmRunState}
_VM_STATE_FROM_PROTO = {v: k for k, v in _VM_STATE_TO_PROTO.items()}
_VOLUME_CHANGE_TO_PROTO = {k: plan_pb2.VolumeChangeKind.Value(f"VOLUME_CHANGE_KIND_{k.name}") for k in VolumeChangeKind}
_VOLUME_CHANGE_FROM_PROTO = {v: k for k, v in _VOLUME_CHANGE_TO_PROTO.items()}


def condition_to_proto(c: Condition) -> plan_pb2.DependencyCondition.ValueType:
    """Condition -> proto enum."""
    return _CONDITION_TO_PROTO[c]


def condition_from_proto(value: plan_pb2.DependencyCondition.ValueType) -> Condition:
    """Proto enum -> Condition (UNSPECIFIED, or a value this build does not know, is STARTED)."""
    return _CONDITION_FROM_PROTO.get(value, Condition.STARTED)


def update_to_proto(u: UpdatePolicy) -> plan_pb2.UpdatePolicy:
    """UpdatePolicy -> proto."""
    return plan_pb2.UpdatePolicy(
        max_parallel=u.max_parallel,
        min_healthy_time_ms=u.min_healthy_time_ms,
        healthy_deadline_ms=u.healthy_deadline_ms,
        auto_revert=u.auto_revert,
    )


def update_from_proto(m: plan_pb2.UpdatePolicy) -> UpdatePolicy:
    """Proto -> UpdatePolicy; a zero max_parallel or healthy_deadline_ms is the model's default."""
    return UpdatePolicy(
        max_parallel=m.max_parallel or DEFAULT_MAX_PARALLEL,
        min_healthy_time_ms=m.min_healthy_time_ms,
        healthy_deadline_ms=m.healthy_deadline_ms or DEFAULT_HEALTHY_DEADLINE_MS,
        auto_revert=m.auto_revert,
    )


def plan_to_proto(plan: Plan, *, redact: bool = False) -> plan_pb2.Plan:
    """
    Plan -> proto.

    ``redact`` masks each spec's user-data and password hash (``convert.spec_to_proto``): a plan sent
    back to readers never carries them; only the apply request that needs them does.
    """
    return plan_pb2.Plan(
        name=plan.name,
        vms=[
            plan_pb2.PlanVm(
                service=v.service,
                spec=convert.spec_to_proto(v.spec, redact=redact),
                depends_on=[
                    plan_pb2.Dependency(service=d.service, condition=condition_to_proto(d.condition))
                    for d in v.depends_on
                ],
                host=v.host,
                network=v.network,
                volumes=list(v.volumes),
            )
            for v in plan.vms
        ],
        networks=[plan_pb2.PlanNetwork(name=n.name, subnet=n.subnet) for n in plan.networks],
        volumes=[
            plan_pb2.PlanVolume(name=v.name, size_mib=v.size_mib, shared=v.shared, host=v.host) for v in plan.volumes
        ],
        update=update_to_proto(plan.update),
        on_failure=_FAILURE_TO_PROTO[plan.on_failure],
        source=plan.source,
        revision=plan.revision,
        digest=plan.digest,
        create_time=convert.ts_to_proto(plan.create_time),
    )


def plan_from_proto(m: plan_pb2.Plan) -> Plan:
    """Proto -> Plan (no checks; see ``clonebox_core.plan.check_plan``); unset enums read as the defaults."""
    return Plan(
        name=m.name,
        vms=tuple(
            PlanVm(
                service=v.service,
                spec=convert.spec_from_proto(v.spec),
                depends_on=tuple(Dependency(d.service, condition_from_proto(d.condition)) for d in v.depends_on),
                host=v.host,
                network=v.network,
                volumes=tuple(v.volumes),
            )
            for v in m.vms
        ),
        networks=tuple(PlanNetwork(n.name, n.subnet) for n in m.networks),
        volumes=tuple(PlanVolume(v.name, v.size_mib, v.shared, v.host) for v in m.volumes),
        update=update_from_proto(m.update),
        on_failure=_FAILURE_FROM_PROTO.get(m.on_failure, FailurePolicy.ROLLBACK),
        source=m.source,
        revision=m.revision,
        digest=m.digest,
        create_time=convert.ts_from_proto(m.create_time, m.HasField("create_time"), "plan.create_time"),
    )


def change_kind_to_proto(k: ChangeKind) -> plan_pb2.ChangeKind.ValueType:
    """ChangeKind -> proto enum value."""
    return _CHANGE_TO_PROTO[k]


def change_kind_from_proto(v: int) -> ChangeKind:
    """Proto enum value -> ChangeKind (an unspecified or unknown value reads as NONE)."""
    return _CHANGE_FROM_PROTO.get(plan_pb2.ChangeKind.ValueType(v), ChangeKind.NONE)


def change_to_proto(c: VmChange) -> plan_pb2.VmChange:
    """VmChange -> proto."""
    return plan_pb2.VmChange(service=c.service, vm=c.vm, kind=change_kind_to_proto(c.kind), fields=list(c.fields))


def change_from_proto(m: plan_pb2.VmChange) -> VmChange:
    """Proto -> VmChange (an unspecified kind reads as NONE)."""
    return VmChange(m.service, m.vm, change_kind_from_proto(m.kind), tuple(m.fields))


def volume_change_to_proto(c: VolumeChange) -> plan_pb2.VolumeChange:
    """VolumeChange -> proto."""
    return plan_pb2.VolumeChange(
        name=c.name,
        volume=c.volume,
        host=c.host,
        size_mib=c.size_mib,
        shared=c.shared,
        kind=_VOLUME_CHANGE_TO_PROTO[c.kind],
        detail=c.detail,
        services=list(c.services),
    )


def volume_change_from_proto(m: plan_pb2.VolumeChange) -> VolumeChange:
    """Proto -> VolumeChange (an unspecified kind reads as UNKNOWN)."""
    return VolumeChange(
        name=m.name,
        volume=m.volume,
        host=m.host,
        size_mib=m.size_mib,
        shared=m.shared,
        kind=_VOLUME_CHANGE_FROM_PROTO.get(m.kind, VolumeChangeKind.UNKNOWN),
        detail=m.detail,
        services=tuple(m.services),
    )


def status_to_proto(s: VmStatus) -> plan_pb2.PlanVmStatus:
    """VmStatus -> proto."""
    return plan_pb2.PlanVmStatus(
        service=s.service,
        vm=s.vm,
        state=_VM_STATE_TO_PROTO[s.state],
        step=s.step,
        error=s.error,
        failed_probe=s.failed_probe,
        host=s.host,
        change=_CHANGE_TO_PROTO[s.change],
        created=s.created,
        update_time=convert.ts_to_proto(s.update_time),
    )


def status_from_proto(m: plan_pb2.PlanVmStatus) -> VmStatus:
    """Proto -> VmStatus (an unspecified state reads as PENDING, an unspecified change as NONE)."""
    return VmStatus(
        service=m.service,
        vm=m.vm,
        state=_VM_STATE_FROM_PROTO.get(m.state, VmRunState.PENDING),
        step=m.step,
        error=m.error,
        failed_probe=m.failed_probe,
        host=m.host,
        change=_CHANGE_FROM_PROTO.get(m.change, ChangeKind.NONE),
        created=m.created,
        update_time=convert.ts_from_proto(m.update_time, m.HasField("update_time")),
    )


def run_to_proto(run: PlanRun) -> plan_pb2.PlanRun:
    """PlanRun -> proto (``options`` stay on the server: the request that set them carries them)."""
    return plan_pb2.PlanRun(
        id=run.id,
        plan=run.plan,
        revision=run.revision,
        action=run.action,
        state=_RUN_STATE_TO_PROTO[run.state],
        vms=[status_to_proto(s) for s in run.vms],
        error=run.error,
        request_id=run.request_id,
        create_time=convert.ts_to_proto(run.create_time),
        update_time=convert.ts_to_proto(run.update_time),
        done=run.done,
        version=run.version,
    )


def run_from_proto(m: plan_pb2.PlanRun) -> PlanRun:
    """Proto -> PlanRun (an unspecified state reads as RUNNING; ``done`` follows from the state)."""
    return PlanRun(
        id=m.id,
        plan=m.plan,
        revision=m.revision,
        action=m.action,
        state=_RUN_STATE_FROM_PROTO.get(m.state, RunState.RUNNING),
        vms=tuple(status_from_proto(s) for s in m.vms),
        error=m.error,
        request_id=m.request_id,
        create_time=convert.ts_from_proto(m.create_time, m.HasField("create_time")),
        update_time=convert.ts_from_proto(m.update_time, m.HasField("update_time")),
        version=m.version,
    )
