"""PlanService: validate, diff, apply and destroy multi-VM plans, read them and watch their runs over gRPC.

A thin adapter from gRPC to ``PlanEngine``. Plans sent back to readers are redacted (secret spec fields
become digests), as ``Vm.spec`` is.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, TypeAlias

from clonebox.controller.v1 import plan_service_pb2 as pb
from clonebox.controller.v1 import plan_service_pb2_grpc as pb_grpc

from clonebox_controller.app.plans import PlanEngine
from clonebox_core.errors import invalid_field
from clonebox_core.names import check_dns_label
from clonebox_core.plan import Plan, PlanRun
from clonebox_core.rpc.convert_plan import (
    change_to_proto,
    plan_from_proto,
    plan_to_proto,
    run_to_proto,
    volume_change_to_proto,
)

Ctx: TypeAlias = Any

#: runs one ListPlanRuns answers with, by default and at most
DEFAULT_RUNS = 50
MAX_RUNS = 1000


def _plan(request: pb.ValidatePlanRequest | pb.DiffPlanRequest | pb.ApplyPlanRequest) -> Plan:
    if not request.HasField("plan"):
        raise invalid_field("plan", "no plan given: send the plan (clonebox reads it from clonebox-compose.yaml)")
    return plan_from_proto(request.plan)


def _entry(plan: Plan, run: PlanRun | None) -> pb.GetPlanResponse:
    out = pb.GetPlanResponse(plan=plan_to_proto(plan, redact=True))
    if run is not None:
        out.last_run.CopyFrom(run_to_proto(run))
    return out


class PlanServicer(pb_grpc.PlanServiceServicer):
    """See ``plan_service.proto``."""

    def __init__(self, plans: PlanEngine) -> None:
        self._plans = plans

    async def ValidatePlan(self, request: pb.ValidatePlanRequest, context: Ctx) -> pb.ValidatePlanResponse:
        """See the proto."""
        v = await self._plans.validate(_plan(request))
        return pb.ValidatePlanResponse(
            levels=[pb.PlanLevel(services=level) for level in v.levels],
            changes=[change_to_proto(c) for c in v.changes],
            volumes=[volume_change_to_proto(c) for c in v.volumes],
        )

    async def DiffPlan(self, request: pb.DiffPlanRequest, context: Ctx) -> pb.DiffPlanResponse:
        """See the proto."""
        changes, revision, volumes = await self._plans.diff(_plan(request))
        return pb.DiffPlanResponse(
            changes=[change_to_proto(c) for c in changes],
            current_revision=revision,
            volumes=[volume_change_to_proto(c) for c in volumes],
        )

    async def ApplyPlan(self, request: pb.ApplyPlanRequest, context: Ctx) -> pb.ApplyPlanResponse:
        """See the proto."""
        run = await self._plans.apply(_plan(request), request.allow_replace, request.request_id)
        return pb.ApplyPlanResponse(run=run_to_proto(run))

    async def DestroyPlan(self, request: pb.DestroyPlanRequest, context: Ctx) -> pb.DestroyPlanResponse:
        """See the proto."""
        run = await self._plans.destroy(
            request.name, request.with_snapshots, request.request_id, with_volumes=request.with_volumes
        )
        return pb.DestroyPlanResponse(run=run_to_proto(run))

    async def GetPlan(self, request: pb.GetPlanRequest, context: Ctx) -> pb.GetPlanResponse:
        """See the proto."""
        plan, run = await self._plans.get(request.name)
        return _entry(plan, run)

    async def ListPlans(self, request: pb.ListPlansRequest, context: Ctx) -> pb.ListPlansResponse:
        """See the proto."""
        return pb.ListPlansResponse(plans=[_entry(p, r) for p, r in await self._plans.list_plans()])

    async def ListPlanRuns(self, request: pb.ListPlanRunsRequest, context: Ctx) -> pb.ListPlanRunsResponse:
        """See the proto."""
        if request.limit > MAX_RUNS:
            raise invalid_field("limit", f"{request.limit} is above the maximum {MAX_RUNS}")
        runs = await self._plans.runs(request.name, request.limit or DEFAULT_RUNS)
        return pb.ListPlanRunsResponse(runs=[run_to_proto(r) for r in runs])

    async def WatchPlan(self, request: pb.WatchPlanRequest, context: Ctx) -> AsyncIterator[pb.WatchPlanResponse]:
        """See the proto."""
        if not request.run_id and not request.plan:
            raise invalid_field("run_id", "name a run (run_id) or a plan (plan) to watch its latest run")
        if request.run_id and len(request.run_id) > 64:
            raise invalid_field("run_id", "at most 64 characters")
        if request.plan:
            check_dns_label("plan", request.plan)
        async for run in self._plans.watch(request.run_id, request.plan, request.after_version):
            yield pb.WatchPlanResponse(run=run_to_proto(run))
