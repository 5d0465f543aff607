"""RecoveryService: agents' journaled transactions, rollback of interrupted ones, and the orphan sweep."""

from __future__ import annotations

from typing import Any, TypeAlias

from clonebox.controller.v1 import recovery_service_pb2, recovery_service_pb2_grpc

from clonebox_controller.app.recovery import RecoveryManager
from clonebox_core.errors import InvalidArgument
from clonebox_core.rpc import convert

Ctx: TypeAlias = Any


class RecoveryServicer(recovery_service_pb2_grpc.RecoveryServiceServicer):
    """Thin adapter from gRPC to ``RecoveryManager``."""

    def __init__(self, recovery: RecoveryManager) -> None:
        self._recovery = recovery

    async def ListRecoveries(
        self, request: recovery_service_pb2.ListRecoveriesRequest, context: Ctx
    ) -> recovery_service_pb2.ListRecoveriesResponse:
        """See the proto."""
        size = request.page_size or 100
        if size > 1000:
            raise InvalidArgument("page_size: at most 1000", reason="INVALID_FIELD", metadata={"field": "page_size"})
        found, unreachable = await self._recovery.list(request.host, request.include_committed, size)
        return recovery_service_pb2.ListRecoveriesResponse(
            transactions=[convert.transaction_to_proto(t) for t in found], unreachable=unreachable
        )

    async def GetRecovery(
        self, request: recovery_service_pb2.GetRecoveryRequest, context: Ctx
    ) -> recovery_service_pb2.GetRecoveryResponse:
        """See the proto."""
        if not request.id:
            raise InvalidArgument("id: give a transaction id", reason="INVALID_FIELD", metadata={"field": "id"})
        txn = await self._recovery.get(request.host, request.id)
        return recovery_service_pb2.GetRecoveryResponse(transaction=convert.transaction_to_proto(txn))

    async def RunRecovery(
        self, request: recovery_service_pb2.RunRecoveryRequest, context: Ctx
    ) -> recovery_service_pb2.RunRecoveryResponse:
        """See the proto."""
        run = await self._recovery.run(request.host, request.sweep, request.request_id)
        return recovery_service_pb2.RunRecoveryResponse(
            rolled_back=[convert.transaction_to_proto(t) for t in run.rolled_back],
            orphans=[convert.orphan_to_proto(o) for o in run.orphans],
            unreachable=run.unreachable,
        )
