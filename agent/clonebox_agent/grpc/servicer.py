"""gRPC servicer of ``clonebox.agent.v1.AgentService``: converts messages and calls the use cases."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, TypeAlias

from clonebox.agent.v1 import agent_pb2, agent_pb2_grpc

from clonebox_agent.app.health import HealthMonitor
from clonebox_agent.app.service import AgentService
from clonebox_agent.grpc.convert import (
    check_health_to_proto,
    event_to_proto,
    health_update_to_proto,
    host_info_to_proto,
)
from clonebox_core.errors import FailedPrecondition
from clonebox_core.rpc import convert
from clonebox_core.secret import Secret

#: grpcio ships no type stubs, so the servicer context is untyped
Ctx: TypeAlias = Any


class AgentServicer(agent_pb2_grpc.AgentServiceServicer):
    """Thin adapter from gRPC to ``AgentService``; errors are mapped by the shared interceptor."""

    def __init__(self, service: AgentService, health: HealthMonitor | None = None) -> None:
        """``health`` answers WatchHealth and CheckHealth (without it they fail with FAILED_PRECONDITION)."""
        self._svc = service
        self._health = health

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
        vm = await self._svc.create(spec, request_id=request.request_id, start=request.start)
        return agent_pb2.CreateVmResponse(vm=convert.vm_to_proto(vm))

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
        vm = await self._svc.start_vm(request.name, request_id=request.request_id)
        return agent_pb2.StartVmResponse(vm=convert.vm_to_proto(vm))

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
        return agent_pb2.StopVmResponse(vm=convert.vm_to_proto(result.vm), forced=result.forced)

    async def DeleteVm(self, request: agent_pb2.DeleteVmRequest, context: Ctx) -> agent_pb2.DeleteVmResponse:
        """See the proto."""
        removed = await self._svc.delete(request.name, request_id=request.request_id)
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
