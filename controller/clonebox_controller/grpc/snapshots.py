"""SnapshotService: take, list, restore, delete, prune, export and import VM snapshots over gRPC.

A thin adapter from gRPC to ``SnapshotManager``; the stream parts of ExportSnapshot and ImportSnapshot
pass through as the messages they are (no copy of image data beyond gRPC's own).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, TypeAlias

from clonebox.controller.v1 import snapshot_service_pb2 as pb
from clonebox.controller.v1 import snapshot_service_pb2_grpc as pb_grpc
from clonebox.type.v1 import snapshot_pb2

from clonebox_controller.app.snapshots import ImportHeader, SnapshotManager
from clonebox_core.errors import invalid_field
from clonebox_core.rpc import convert
from clonebox_core.rpc.convert_snapshot import (
    decision_to_proto,
    kind_from_proto,
    policy_from_proto,
    policy_to_proto,
    snapshot_to_proto,
)
from clonebox_core.snapshot_archive import archive_vm_spec
from clonebox_core.snapshots import SnapshotKind

Ctx: TypeAlias = Any

#: tags one snapshot may carry
MAX_TAGS = 64


def _kind(value: snapshot_pb2.SnapshotKind.ValueType) -> SnapshotKind | None:
    """None lets the agent choose; a number this build does not know is refused, not guessed."""
    kind = kind_from_proto(value)
    if kind is None and value != snapshot_pb2.SNAPSHOT_KIND_UNSPECIFIED:
        raise invalid_field("kind", f"{value} is not a snapshot kind (internal, external)")
    return kind


class SnapshotServicer(pb_grpc.SnapshotServiceServicer):
    """See ``snapshot_service.proto``; every call goes to the agent of the VM's host."""

    def __init__(self, snapshots: SnapshotManager) -> None:
        self._snapshots = snapshots

    async def CreateSnapshot(self, request: pb.CreateSnapshotRequest, context: Ctx) -> pb.CreateSnapshotResponse:
        """See the proto."""
        if len(request.tags) > MAX_TAGS:
            raise invalid_field("tags", f"at most {MAX_TAGS} tags")
        snap = await self._snapshots.create(
            request.vm,
            request.name,
            description=request.description,
            tags=dict(request.tags),
            kind=_kind(request.kind),
            quiesce=request.quiesce,
            request_id=request.request_id,
        )
        return pb.CreateSnapshotResponse(snapshot=snapshot_to_proto(snap))

    async def ListSnapshots(self, request: pb.ListSnapshotsRequest, context: Ctx) -> pb.ListSnapshotsResponse:
        """See the proto."""
        snaps, policy = await self._snapshots.list_snapshots(request.vm)
        return pb.ListSnapshotsResponse(snapshots=[snapshot_to_proto(s) for s in snaps], policy=policy_to_proto(policy))

    async def RestoreSnapshot(self, request: pb.RestoreSnapshotRequest, context: Ctx) -> pb.RestoreSnapshotResponse:
        """See the proto."""
        vm, backup = await self._snapshots.restore(
            request.vm,
            request.name,
            no_start=request.no_start,
            no_backup=request.no_backup,
            request_id=request.request_id,
        )
        out = pb.RestoreSnapshotResponse(vm=convert.vm_to_proto(vm))
        if backup is not None:
            out.backup.CopyFrom(snapshot_to_proto(backup))
        return out

    async def DeleteSnapshot(self, request: pb.DeleteSnapshotRequest, context: Ctx) -> pb.DeleteSnapshotResponse:
        """See the proto."""
        deleted = await self._snapshots.delete(
            request.vm, request.name, children=request.children, request_id=request.request_id
        )
        return pb.DeleteSnapshotResponse(deleted=deleted)

    async def SetSnapshotPolicy(
        self, request: pb.SetSnapshotPolicyRequest, context: Ctx
    ) -> pb.SetSnapshotPolicyResponse:
        """See the proto."""
        policy = await self._snapshots.set_policy(request.vm, policy_from_proto(request.policy), request.request_id)
        return pb.SetSnapshotPolicyResponse(policy=policy_to_proto(policy))

    async def PruneSnapshots(self, request: pb.PruneSnapshotsRequest, context: Ctx) -> pb.PruneSnapshotsResponse:
        """See the proto."""
        decisions = await self._snapshots.prune(request.vm, dry_run=request.dry_run, request_id=request.request_id)
        return pb.PruneSnapshotsResponse(decisions=[decision_to_proto(d) for d in decisions])

    async def ExportSnapshot(
        self, request: pb.ExportSnapshotRequest, context: Ctx
    ) -> AsyncIterator[pb.ExportSnapshotResponse]:
        """See the proto: each part is written before the next is read from the agent."""
        async for part in self._snapshots.export(request.vm, request.name):
            assert isinstance(part, snapshot_pb2.SnapshotImagePart)
            yield pb.ExportSnapshotResponse(part=part)

    async def ImportSnapshot(
        self, request_iterator: AsyncIterator[pb.ImportSnapshotRequest], context: Ctx
    ) -> pb.ImportSnapshotResponse:
        """See the proto: the header is read here (to place the VM), the rest is pumped to the agent."""
        messages = aiter(request_iterator)
        try:
            first = await anext(messages)
        except StopAsyncIteration:
            raise invalid_field("part", "empty import stream: the first message must be the header") from None
        spec = archive_vm_spec(first.part)
        header = first.part.header

        async def rest() -> AsyncIterator[snapshot_pb2.SnapshotImagePart]:
            async for message in messages:
                yield message.part

        vm = await self._snapshots.import_(
            ImportHeader(spec=spec, host=header.host, request_id=header.request_id), first.part, rest()
        )
        return pb.ImportSnapshotResponse(vm=convert.vm_to_proto(vm))
