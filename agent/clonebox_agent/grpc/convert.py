"""Agent-side conversion between use-case results and ``clonebox.agent.v1`` messages."""

from __future__ import annotations

from clonebox.agent.v1 import agent_pb2
from clonebox.type.v1 import resources_pb2

from clonebox_agent.app.events import VmEvent
from clonebox_agent.app.health import HealthUpdate
from clonebox_core.health import ProbeResult, VmHealth
from clonebox_core.model import HostInfo, Revision
from clonebox_core.plan import UpdateResult
from clonebox_core.rpc import convert, convert_health
from clonebox_core.rpc.convert_plan import change_kind_to_proto


def answered_revision_to_proto(revision: Revision | None) -> resources_pb2.Revision | None:
    """The revision of an answer about a change (None: the field stays unset)."""
    return convert.revision_to_proto(revision) if revision is not None else None


def host_info_to_proto(info: HostInfo, revision: Revision) -> agent_pb2.GetHostInfoResponse:
    """HostInfo -> GetHostInfoResponse."""
    return agent_pb2.GetHostInfoResponse(
        name=info.name,
        capacity=convert.resources_to_proto(info.capacity),
        allocatable=convert.resources_to_proto(info.allocatable),
        hypervisor=convert.hypervisor_to_proto(info.hypervisor),
        revision=convert.revision_to_proto(revision),
        serving=info.serving,
        not_serving_reason=info.not_serving_reason,
    )


def event_to_proto(event: VmEvent) -> agent_pb2.WatchVmsResponse:
    """VmEvent -> WatchVmsResponse."""
    return agent_pb2.WatchVmsResponse(
        revision=convert.revision_to_proto(event.revision),
        type=event.type.value,  # type: ignore[arg-type]  # enums share numbers by construction
        vm=convert.vm_to_proto(event.vm),
        reason=event.reason,
    )


def health_update_to_proto(update: HealthUpdate) -> agent_pb2.WatchHealthResponse:
    """HealthUpdate -> WatchHealthResponse (the ``synced`` marker carries no health)."""
    msg = agent_pb2.WatchHealthResponse(
        transitions=[convert_health.transition_to_proto(t) for t in update.transitions],
        aggregates=[convert_health.aggregate_to_proto(a) for a in update.aggregates],
        actions=[convert_health.action_to_proto(a) for a in update.actions],
        removed=update.removed,
        synced=update.synced,
    )
    if update.health is not None:
        msg.health.CopyFrom(convert_health.vm_health_to_proto(update.health))
    return msg


def check_health_to_proto(results: list[ProbeResult], health: VmHealth) -> agent_pb2.CheckHealthResponse:
    """CheckHealth results -> CheckHealthResponse."""
    return agent_pb2.CheckHealthResponse(
        results=[convert_health.result_to_proto(r) for r in results],
        health=convert_health.vm_health_to_proto(health),
    )


def update_to_proto(result: UpdateResult) -> agent_pb2.UpdateVmResponse:
    """UpdateResult -> UpdateVmResponse (the VM's spec redacted, as every ``Vm`` sent out)."""
    return agent_pb2.UpdateVmResponse(
        vm=convert.vm_to_proto(result.vm),
        kind=change_kind_to_proto(result.kind),
        fields=list(result.fields),
        restarted=result.restarted,
        forced=result.forced,
        revision=answered_revision_to_proto(result.revision),
    )
