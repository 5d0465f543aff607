"""gRPC servicer of ``clonebox.agent.v1.AgentService``: converts messages and calls the use cases."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any, TypeAlias

from clonebox.agent.v1 import agent_pb2, agent_pb2_grpc

from clonebox_agent.app.console import ConsoleReader
from clonebox_agent.app.health import HealthMonitor
from clonebox_agent.app.service import AgentService
from clonebox_agent.app.snapshots import SnapshotManager
from clonebox_agent.grpc.convert import (
    answered_revision_to_proto,
    check_health_to_proto,
    event_to_proto,
    health_update_to_proto,
    host_info_to_proto,
    update_to_proto,
)
from clonebox_core.errors import FailedPrecondition, InvalidArgument
from clonebox_core.rpc import convert, convert_snapshot
from clonebox_core.secret import Secret
from clonebox_core.snapshots import ImagePart

#: grpcio ships no type stubs, so the servicer context is untyped
Ctx: TypeAlias = Any


class AgentServicer(agent_pb2_grpc.AgentServiceServicer):
    """Thin adapter from gRPC to ``AgentService``; errors are mapped by the shared interceptor."""

    def __init__(
        self,
        service: AgentService,
        health: HealthMonitor | None = None,
        snapshots: SnapshotManager | None = None,
        console: ConsoleReader | None = None,
    ) -> None:
        """
        Serve the RPCs; the optional parts answer FAILED_PRECONDITION when they are not given.

        ``health`` answers WatchHealth/CheckHealth, ``snapshots`` the snapshot RPCs, ``console`` ReadConsole.
        """
        self._svc = service
        self._health = health
        self._snapshots = snapshots
        self._console = console

    def _snaps(self) -> SnapshotManager:
        if self._snapshots is None:
            raise FailedPrecondition("this agent manages no snapshots", reason="SNAPSHOTS_DISABLED")
        return self._snapshots

    def _monitor(self) -> HealthMonitor:
        if self._health is None:
            raise FailedPrecondition("this agent runs no health checks", reason="HEALTH_DISABLED")
        return self._health

    async def GetHostInfo(self, request: agent_pb2.GetHostInfoRequest, context: Ctx) -> agent_pb2.GetHostInfoResponse:
        """See the proto."""
        return host_info_to_proto(await self._svc.host_info(), self._svc.events.revision)

    async def CreateVm(self, request: agent_pb2.CreateVmRequest, context: Ctx) -> agent_pb2.CreateVmResponse:
        """See the proto."""
        spec = convert.spec_from_proto(request.spec)
        if request.dry_run:
            plan = await self._svc.plan_create(spec, start=request.start)
            return agent_pb2.CreateVmResponse(plan=convert.plan_to_proto(plan))
        vm, revision = await self._svc.answer(
            await self._svc.create(spec, request_id=request.request_id, start=request.start)
        )
        return agent_pb2.CreateVmResponse(vm=convert.vm_to_proto(vm), revision=answered_revision_to_proto(revision))

    async def GetVm(self, request: agent_pb2.GetVmRequest, context: Ctx) -> agent_pb2.GetVmResponse:
        """See the proto."""
        return agent_pb2.GetVmResponse(vm=convert.vm_to_proto(await self._svc.get(request.name)))

    async def GetSshKey(self, request: agent_pb2.GetSshKeyRequest, context: Ctx) -> agent_pb2.GetSshKeyResponse:
        """See the proto."""
        vm = await self._svc.get(request.name)
        key = await self._svc.ssh_key(request.name, actor=request.actor)
        user = vm.spec.auth.user if vm.spec.auth is not None else ""
        # the one place the key is put on the wire (mTLS, to the controller only; the read is audited)
        return agent_pb2.GetSshKeyResponse(private_key=key.reveal(), user=user)

    async def ReadConsole(
        self, request: agent_pb2.ReadConsoleRequest, context: Ctx
    ) -> AsyncIterator[agent_pb2.ReadConsoleResponse]:
        """See the proto."""
        if self._console is None:
            raise FailedPrecondition("this agent reads no console logs", reason="CONSOLE_LOG_UNAVAILABLE")
        from_offset = request.from_offset if request.HasField("from_offset") else None
        chunks = self._console.read(
            request.name, tail_bytes=request.tail_bytes, follow=request.follow, from_offset=from_offset
        )
        try:
            async for chunk in chunks:
                yield agent_pb2.ReadConsoleResponse(data=chunk.data, offset=chunk.offset)
        finally:
            # a cancelled follow must close the log file now, not when the generator is collected
            await chunks.aclose()

    async def RotateSecret(
        self, request: agent_pb2.RotateSecretRequest, context: Ctx
    ) -> agent_pb2.RotateSecretResponse:
        """See the proto."""
        user, changed = await self._svc.rotate_secret(
            request.name,
            request_id=request.request_id,
            password_hash=Secret(request.password_hash),
            expire_password=request.expire_password,
            keys=tuple(request.ssh_authorized_keys),
            replace_keys=request.replace_keys,
        )
        return agent_pb2.RotateSecretResponse(user=user, changed=changed)

    async def ListVms(self, request: agent_pb2.ListVmsRequest, context: Ctx) -> agent_pb2.ListVmsResponse:
        """See the proto."""
        vms, revision = await self._svc.list_vms()
        return agent_pb2.ListVmsResponse(
            vms=[convert.vm_to_proto(v) for v in vms], revision=convert.revision_to_proto(revision)
        )

    async def StartVm(self, request: agent_pb2.StartVmRequest, context: Ctx) -> agent_pb2.StartVmResponse:
        """See the proto."""
        vm, revision = await self._svc.answer(await self._svc.start_vm(request.name, request_id=request.request_id))
        return agent_pb2.StartVmResponse(vm=convert.vm_to_proto(vm), revision=answered_revision_to_proto(revision))

    async def ListTransactions(
        self, request: agent_pb2.ListTransactionsRequest, context: Ctx
    ) -> agent_pb2.ListTransactionsResponse:
        """See the proto."""
        size = min(request.page_size or 100, 1000)
        found = await self._svc.transactions(include_committed=request.include_committed, limit=size)
        return agent_pb2.ListTransactionsResponse(transactions=[convert.transaction_to_proto(t) for t in found])

    async def Recover(self, request: agent_pb2.RecoverRequest, context: Ctx) -> agent_pb2.RecoverResponse:
        """See the proto."""
        rolled, orphans = await self._svc.recover(sweep=request.sweep)
        return agent_pb2.RecoverResponse(
            rolled_back=[convert.transaction_to_proto(t) for t in rolled],
            orphans=[convert.orphan_to_proto(o) for o in orphans],
        )

    async def StopVm(self, request: agent_pb2.StopVmRequest, context: Ctx) -> agent_pb2.StopVmResponse:
        """See the proto."""
        result = await self._svc.stop(
            request.name,
            request_id=request.request_id,
            timeout_seconds=request.timeout_seconds,
            force=request.force,
        )
        vm, revision = await self._svc.answer(result.vm)
        return agent_pb2.StopVmResponse(
            vm=convert.vm_to_proto(vm), forced=result.forced, revision=answered_revision_to_proto(revision)
        )

    async def UpdateVm(self, request: agent_pb2.UpdateVmRequest, context: Ctx) -> agent_pb2.UpdateVmResponse:
        """See the proto."""
        result = await self._svc.update(
            convert.spec_from_proto(request.spec),
            request_id=request.request_id,
            timeout_seconds=request.timeout_seconds,
            dry_run=request.dry_run,
        )
        if request.dry_run:
            return update_to_proto(result)
        vm, revision = await self._svc.answer(result.vm)
        return update_to_proto(dataclasses.replace(result, vm=vm, revision=revision))

    async def DeleteVm(self, request: agent_pb2.DeleteVmRequest, context: Ctx) -> agent_pb2.DeleteVmResponse:
        """See the proto."""
        removed = await self._svc.delete(
            request.name, request_id=request.request_id, with_snapshots=request.with_snapshots
        )
        return agent_pb2.DeleteVmResponse(removed_paths=removed)

    async def WatchVms(
        self, request: agent_pb2.WatchVmsRequest, context: Ctx
    ) -> AsyncIterator[agent_pb2.WatchVmsResponse]:
        """See the proto."""
        after = convert.revision_from_proto(request.after) if request.HasField("after") else None
        async for event in self._svc.watch(after):
            yield event_to_proto(event)

    async def WatchHealth(
        self, request: agent_pb2.WatchHealthRequest, context: Ctx
    ) -> AsyncIterator[agent_pb2.WatchHealthResponse]:
        """See the proto."""
        async for update in self._monitor().watch():
            yield health_update_to_proto(update)

    async def CheckHealth(self, request: agent_pb2.CheckHealthRequest, context: Ctx) -> agent_pb2.CheckHealthResponse:
        """See the proto."""
        results, health = await self._monitor().check_now(request.name, request.check)
        return check_health_to_proto(results, health)

    # ---- volumes ---------------------------------------------------------------------------------

    async def CreateVolume(
        self, request: agent_pb2.CreateVolumeRequest, context: Ctx
    ) -> agent_pb2.CreateVolumeResponse:
        """See the proto."""
        volume = await self._svc.create_volume(
            request.name,
            request.size_mib,
            shared=request.shared,
            labels=dict(request.labels),
            request_id=request.request_id,
        )
        return agent_pb2.CreateVolumeResponse(volume=convert.volume_to_proto(volume))

    async def DeleteVolume(
        self, request: agent_pb2.DeleteVolumeRequest, context: Ctx
    ) -> agent_pb2.DeleteVolumeResponse:
        """See the proto."""
        await self._svc.delete_volume(request.name, request_id=request.request_id)
        return agent_pb2.DeleteVolumeResponse()

    async def ListVolumes(self, request: agent_pb2.ListVolumesRequest, context: Ctx) -> agent_pb2.ListVolumesResponse:
        """See the proto."""
        volumes = await self._svc.list_volumes()
        return agent_pb2.ListVolumesResponse(volumes=[convert.volume_to_proto(v) for v in volumes])

    # ---- snapshots -------------------------------------------------------------------------------

    async def CreateSnapshot(
        self, request: agent_pb2.CreateSnapshotRequest, context: Ctx
    ) -> agent_pb2.CreateSnapshotResponse:
        """See the proto."""
        snap = await self._snaps().create(
            request.vm,
            name=request.name,
            description=request.description,
            tags=dict(request.tags),
            kind=convert_snapshot.kind_from_proto(request.kind),
            quiesce=request.quiesce,
            request_id=request.request_id,
            creator=request.creator,
        )
        return agent_pb2.CreateSnapshotResponse(snapshot=convert_snapshot.snapshot_to_proto(snap))

    async def ListSnapshots(
        self, request: agent_pb2.ListSnapshotsRequest, context: Ctx
    ) -> agent_pb2.ListSnapshotsResponse:
        """See the proto."""
        snaps = await self._snaps().list(request.vm)
        policy = await self._snaps().policy(request.vm)
        return agent_pb2.ListSnapshotsResponse(
            snapshots=[convert_snapshot.snapshot_to_proto(s) for s in snaps],
            policy=convert_snapshot.policy_to_proto(policy),
        )

    async def RestoreSnapshot(
        self, request: agent_pb2.RestoreSnapshotRequest, context: Ctx
    ) -> agent_pb2.RestoreSnapshotResponse:
        """See the proto."""
        vm, backup = await self._snaps().restore(
            request.vm,
            request.name,
            no_start=request.no_start,
            no_backup=request.no_backup,
            request_id=request.request_id,
            creator=request.creator,
        )
        out = agent_pb2.RestoreSnapshotResponse(vm=convert.vm_to_proto(vm))
        if backup is not None:
            out.backup.CopyFrom(convert_snapshot.snapshot_to_proto(backup))
        return out

    async def DeleteSnapshot(
        self, request: agent_pb2.DeleteSnapshotRequest, context: Ctx
    ) -> agent_pb2.DeleteSnapshotResponse:
        """See the proto."""
        deleted = await self._snaps().delete(
            request.vm, request.name, children=request.children, request_id=request.request_id
        )
        return agent_pb2.DeleteSnapshotResponse(deleted=deleted)

    async def SetSnapshotPolicy(
        self, request: agent_pb2.SetSnapshotPolicyRequest, context: Ctx
    ) -> agent_pb2.SetSnapshotPolicyResponse:
        """See the proto."""
        policy = await self._snaps().set_policy(
            request.vm, convert_snapshot.policy_from_proto(request.policy), request_id=request.request_id
        )
        return agent_pb2.SetSnapshotPolicyResponse(policy=convert_snapshot.policy_to_proto(policy))

    async def PruneSnapshots(
        self, request: agent_pb2.PruneSnapshotsRequest, context: Ctx
    ) -> agent_pb2.PruneSnapshotsResponse:
        """See the proto."""
        decisions = await self._snaps().prune(request.vm, dry_run=request.dry_run, request_id=request.request_id)
        return agent_pb2.PruneSnapshotsResponse(decisions=[convert_snapshot.decision_to_proto(d) for d in decisions])

    async def ExportSnapshot(
        self, request: agent_pb2.ExportSnapshotRequest, context: Ctx
    ) -> AsyncIterator[agent_pb2.ExportSnapshotResponse]:
        """See the proto."""
        parts = self._snaps().export(request.vm, request.name)
        try:
            async for part in parts:
                yield agent_pb2.ExportSnapshotResponse(part=convert_snapshot.part_to_proto(part))
        finally:
            # a cancelled RPC must remove the temporary images now, not when the generator is collected
            await parts.aclose()

    async def ImportSnapshot(
        self, request_iterator: AsyncIterator[agent_pb2.ImportSnapshotRequest], context: Ctx
    ) -> agent_pb2.ImportSnapshotResponse:
        """See the proto."""
        vm = await self._snaps().import_(_parts(request_iterator))
        return agent_pb2.ImportSnapshotResponse(vm=convert.vm_to_proto(vm))


async def _parts(requests: AsyncIterator[agent_pb2.ImportSnapshotRequest]) -> AsyncIterator[ImagePart]:
    """The import stream's parts as models; an empty part is refused."""
    async for request in requests:
        part = convert_snapshot.part_from_proto(request.part)
        if part is None:
            raise InvalidArgument("import: a message without a part", reason="IMPORT_BAD_PART")
        yield part
