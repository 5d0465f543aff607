"""Plan, change and run messages: round trips, unset fields read as defaults, redaction."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import pytest
from clonebox.type.v1 import plan_pb2

from clonebox_core import health
from clonebox_core.model import Auth, AuthMethod, CloudInit, KernelBoot, VmSpec
from clonebox_core.plan import (
    DEFAULT_HEALTHY_DEADLINE_MS,
    DEFAULT_MAX_PARALLEL,
    ChangeKind,
    Condition,
    Dependency,
    FailurePolicy,
    Plan,
    PlanRun,
    PlanVm,
    RunState,
    UpdatePolicy,
    VmChange,
    VmRunState,
    VmStatus,
)
from clonebox_core.rpc import convert
from clonebox_core.rpc.convert_plan import (
    change_from_proto,
    change_to_proto,
    plan_from_proto,
    plan_to_proto,
    run_from_proto,
    run_to_proto,
    status_from_proto,
    status_to_proto,
)
from clonebox_core.secret import Secret

pytestmark = pytest.mark.unit

T0 = datetime(2025, 3, 4, 5, 6, 7, 123000, tzinfo=UTC)
HASH = "$6$saltsalt$" + "a" * 86
SPEC = VmSpec(
    "stack-db",
    vcpus=2,
    memory_mib=256,
    kernel_boot=KernelBoot("testguest/vmlinux", cmdline="quiet"),
    cloud_init=CloudInit(Secret("#cloud-config\nruncmd: [echo secret-42]\n")),
    labels=(("clonebox.plan", "stack"), ("clonebox.service", "db")),
    auth=Auth(user="dev", method=AuthMethod.PASSWORD, password="env:PW", password_hash=Secret(HASH)),
    health_checks=(health.Probe("port", health.ProbeType.TCP, tcp=health.TcpProbe(5432)),),
)
PLAN = Plan(
    "stack",
    (
        PlanVm("db", SPEC, host="h1"),
        PlanVm(
            "api",
            dataclasses.replace(SPEC, name="stack-api", auth=None, cloud_init=None),
            (Dependency("db", Condition.HEALTHY), Dependency("job", Condition.COMPLETED)),
        ),
        PlanVm("job", dataclasses.replace(SPEC, name="stack-job", auth=None), (Dependency("db"),)),
    ),
    UpdatePolicy(max_parallel=8, min_healthy_time_ms=5000, healthy_deadline_ms=60_000, auto_revert=True),
    FailurePolicy.LEAVE,
    source="stack/clonebox-compose.yaml",
    revision=7,
    digest="f" * 64,
    create_time=T0,
)


def wire(message: plan_pb2.Plan) -> plan_pb2.Plan:
    """Through bytes, as a peer would read it."""
    return plan_pb2.Plan.FromString(message.SerializeToString())


def test_plan_round_trip() -> None:
    assert plan_from_proto(wire(plan_to_proto(PLAN))) == PLAN


def test_plan_with_defaults_round_trips() -> None:
    plan = Plan("stack", (PlanVm("db", dataclasses.replace(SPEC, auth=None, cloud_init=None)),))
    assert plan_from_proto(wire(plan_to_proto(plan))) == plan


def test_specs_go_through_the_spec_converter_and_redact() -> None:
    m = plan_to_proto(PLAN, redact=True)
    assert m.vms[0].spec == convert.spec_to_proto(SPEC, redact=True)
    assert "secret-42" not in str(m) and HASH not in str(m)
    assert m.vms[0].spec.cloud_init.user_data == convert.REDACTED
    # unredacted, the apply request carries what the agent needs
    full = plan_to_proto(PLAN)
    assert "secret-42" in full.vms[0].spec.cloud_init.user_data
    assert full.vms[0].spec.auth.password_hash == HASH


def test_unset_fields_read_as_the_model_defaults() -> None:
    m = plan_pb2.Plan(
        name="stack",
        vms=[
            plan_pb2.PlanVm(
                service="api",
                spec=convert.spec_to_proto(dataclasses.replace(SPEC, name="stack-api")),
                depends_on=[plan_pb2.Dependency(service="db")],  # condition UNSPECIFIED
            )
        ],
    )
    plan = plan_from_proto(m)
    assert plan.vms[0].depends_on == (Dependency("db", Condition.STARTED),)
    assert plan.on_failure is FailurePolicy.ROLLBACK
    assert plan.update == UpdatePolicy()
    assert plan.update.max_parallel == DEFAULT_MAX_PARALLEL
    assert plan.update.healthy_deadline_ms == DEFAULT_HEALTHY_DEADLINE_MS
    assert plan.create_time is None and plan.revision == 0
    # zeros inside a set update block are defaults too; the other fields are kept
    m.update.CopyFrom(plan_pb2.UpdatePolicy(min_healthy_time_ms=3000, auto_revert=True))
    assert plan_from_proto(m).update == UpdatePolicy(min_healthy_time_ms=3000, auto_revert=True)


@pytest.mark.parametrize("kind", list(ChangeKind))
def test_change_round_trip(kind: ChangeKind) -> None:
    change = VmChange("db", "stack-db", kind, ("memory_mib", "vcpus"))
    m = change_to_proto(change)
    assert m.kind == plan_pb2.ChangeKind.Value(f"CHANGE_KIND_{kind.name}")
    assert change_from_proto(plan_pb2.VmChange.FromString(m.SerializeToString())) == change


def test_unspecified_change_is_none() -> None:
    assert change_from_proto(plan_pb2.VmChange(service="db", vm="stack-db")).kind is ChangeKind.NONE


@pytest.mark.parametrize("state", list(VmRunState))
def test_status_round_trip(state: VmRunState) -> None:
    status = VmStatus("db", "stack-db", state, "waiting for health", "boom", "port", "h1", ChangeKind.REPLACE, True, T0)
    assert status_from_proto(plan_pb2.PlanVmStatus.FromString(status_to_proto(status).SerializeToString())) == status


def test_unset_status_fields_read_as_defaults() -> None:
    assert status_from_proto(plan_pb2.PlanVmStatus(service="db", vm="stack-db")) == VmStatus("db", "stack-db")


@pytest.mark.parametrize("state", list(RunState))
def test_run_round_trip(state: RunState) -> None:
    run = PlanRun(
        id="run-1",
        plan="stack",
        revision=7,
        action="up",
        state=state,
        vms=(VmStatus("db", "stack-db", VmRunState.READY, created=True), VmStatus("api", "stack-api")),
        error="api failed",
        request_id="req-1",
        create_time=T0,
        update_time=T0,
        version=12,
    )
    m = run_to_proto(run)
    assert m.done is state.done
    assert run_from_proto(plan_pb2.PlanRun.FromString(m.SerializeToString())) == run


def test_run_options_stay_on_the_server() -> None:
    run = PlanRun("run-1", "stack", 1, "down", RunState.RUNNING, options={"with_snapshots": True})
    back = run_from_proto(run_to_proto(run))
    assert back.options == {}
    assert dataclasses.replace(back, options=run.options) == run


def test_unspecified_run_state_is_running() -> None:
    run = run_from_proto(plan_pb2.PlanRun(id="r", plan="stack"))
    assert run.state is RunState.RUNNING and not run.done and run.create_time is None


def test_a_time_no_calendar_has_is_an_invalid_argument_naming_the_field() -> None:
    # found by the RPC fuzzer: a client's create_time out of range was an INTERNAL error
    from clonebox.type.v1 import plan_pb2

    from clonebox_core.errors import InvalidArgument
    from clonebox_core.rpc.convert_plan import plan_from_proto

    for seconds, nanos in ((-(2**63), 0), (2**63 - 2, 0), (0, 2**31 - 2)):
        m = plan_pb2.Plan(name="stack")
        m.create_time.seconds, m.create_time.nanos = seconds, nanos
        with pytest.raises(InvalidArgument) as err:
            plan_from_proto(m)
        assert err.value.metadata["field"] == "plan.create_time"
