"""Agent-side conversion between use-case results and ``clonebox.agent.v1`` messages."""

from __future__ import annotations

from clonebox.agent.v1 import agent_pb2

from clonebox_agent.app.events import VmEvent
from clonebox_core.model import HostInfo, Revision
from clonebox_core.rpc import convert


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
