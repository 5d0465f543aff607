"""SIGKILL of the controller in the middle of a plan run, on real processes (the agent on the fake hypervisor).

The controller and the agent run as processes (``tests.realfleet``); the agent uses the in-memory fake
hypervisor, so no guest boots. The plan is a chain of services, each waiting for the one before to
be healthy (a ``guest_agent`` probe with an initial delay, so every step takes a moment). Once two of
them are ready the controller is SIGKILLed and started again on the same database: the killed
process never released its lease, so the new one takes the run over when the lease (3 s here) runs
out, and resumes it from the stored rows. The run must succeed with every VM created exactly once:
one ``vm.create`` operation per VM, none failed (the fake refuses a second VM of the same name).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator

import grpc
import pytest
from clonebox.controller.v1 import (
    operation_service_pb2,
    operation_service_pb2_grpc,
    vm_service_pb2,
    vm_service_pb2_grpc,
)
from clonebox.controller.v1 import plan_service_pb2 as pb
from clonebox.controller.v1 import plan_service_pb2_grpc as pb_grpc
from clonebox.type.v1 import plan_pb2

from clonebox_core.health import Probe, ProbeType
from clonebox_core.model import DiskSpec, VmSpec
from clonebox_core.plan import LABEL_PLAN, Condition, Dependency, Plan, PlanVm, UpdatePolicy, vm_name
from clonebox_core.rpc.convert_plan import plan_to_proto
from clonebox_core.rpc.server import Transport, sync_channel
from clonebox_core.rpc.tls import TlsFiles
from tests.realfleet import RealFleet, running_fleet

pytestmark = [pytest.mark.e2e, pytest.mark.libvirt]

#: a bound on each wait, so that a bug fails the test instead of hanging it
WAIT = 120.0
LEASE_SECONDS = 3
SERVICES = 6


@pytest.fixture
def fleet() -> Iterator[RealFleet]:
    env = {
        "CLONEBOX_CONTROLLER_PLANS__LEASE_SECONDS": str(LEASE_SECONDS),
        "CLONEBOX_CONTROLLER_PLANS__POLL_SECONDS": "0.1",
    }
    with running_fleet(extra_env=env, agent_extra={"hypervisor": "fake"}) as f:
        yield f


def chain(name: str) -> Plan:
    probe = Probe("ga", ProbeType.GUEST_AGENT, interval_ms=500, timeout_ms=400, initial_delay_ms=1000)
    vms = []
    for i in range(SERVICES):
        service = f"s{i}"
        disks = (DiskSpec("root", size_mib=8),)
        spec = VmSpec(vm_name(name, service), memory_mib=32, disks=disks, health_checks=(probe,))
        deps = (Dependency(f"s{i - 1}", Condition.HEALTHY),) if i else ()
        vms.append(PlanVm(service, spec, deps))
    return Plan(name, tuple(vms), update=UpdatePolicy(max_parallel=2, healthy_deadline_ms=60_000))


def channel(fleet: RealFleet) -> grpc.Channel:
    """A channel to the controller as the fleet's admin user."""
    tls = TlsFiles.in_folder(fleet.root / "user" / "tls", "user")
    return sync_channel(fleet.controller, Transport(tls), "controller.e2e.test")


def last_run(fleet: RealFleet) -> plan_pb2.PlanRun:
    with channel(fleet) as ch:
        resp: pb.GetPlanResponse = pb_grpc.PlanServiceStub(ch).GetPlan(pb.GetPlanRequest(name="kill"))
        return resp.last_run


def wait_for(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except grpc.RpcError:
            pass  # the controller is restarting: ask again
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_controller_sigkill_mid_run_resumes_without_duplicates(fleet: RealFleet) -> None:
    with channel(fleet) as ch:
        request = pb.ApplyPlanRequest(plan=plan_to_proto(chain("kill")), request_id="up")
        run = pb_grpc.PlanServiceStub(ch).ApplyPlan(request).run

    def ready_count() -> int:
        return sum(v.state == plan_pb2.PLAN_VM_STATE_READY for v in last_run(fleet).vms)

    wait_for(lambda: ready_count() >= 2, "two services ready")
    assert ready_count() < SERVICES, "the run finished before the kill: make each step slower"
    fleet.restart_controller()

    wait_for(lambda: last_run(fleet).done, "the resumed run to finish")
    final = last_run(fleet)
    assert final.id == run.id
    assert final.state == plan_pb2.PLAN_RUN_STATE_SUCCEEDED, final.error
    assert [v.state for v in final.vms] == [plan_pb2.PLAN_VM_STATE_READY] * SERVICES

    with channel(fleet) as ch:
        ops = operation_service_pb2_grpc.OperationServiceStub(ch)
        listed = ops.ListOperations(operation_service_pb2.ListOperationsRequest(page_size=1000)).operations
        labelled = vm_service_pb2.ListVmsRequest(labels={LABEL_PLAN: "kill"})
        names = [v.name for v in vm_service_pb2_grpc.VmServiceStub(ch).ListVms(labelled).vms]
    creates = [o for o in listed if o.kind == "vm.create"]
    assert all(o.done and not o.HasField("error") for o in creates), [o.error for o in creates]
    counts = Counter(o.target for o in creates)
    assert sorted(counts) == sorted(f"vms/kill-s{i}" for i in range(SERVICES)) and set(counts.values()) == {1}
    assert sorted(names) == [f"kill-s{i}" for i in range(SERVICES)]
