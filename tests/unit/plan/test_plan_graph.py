"""The plan model's graph and checks: levels, cycles, dependents, and everything check_plan refuses."""

from __future__ import annotations

import dataclasses

import pytest

from clonebox_core import health
from clonebox_core.errors import InvalidArgument
from clonebox_core.model import KernelBoot, VmSpec
from clonebox_core.plan import (
    MAX_PLAN_VMS,
    PLAN_CYCLE,
    PLAN_INVALID,
    PLAN_NO_HEALTH_CHECK,
    PLAN_UNKNOWN_DEPENDENCY,
    Condition,
    Dependency,
    Plan,
    PlanVm,
    UpdatePolicy,
    check_plan,
    dependents,
    levels,
    vm_name,
)

pytestmark = pytest.mark.unit

PROBE = health.Probe("port", health.ProbeType.TCP, tcp=health.TcpProbe(5432))


def spec(plan: str, service: str, *, checks: bool = False) -> VmSpec:
    return VmSpec(
        vm_name(plan, service), kernel_boot=KernelBoot("testguest/vmlinux"), health_checks=(PROBE,) if checks else ()
    )


def make(graph: dict[str, list[str] | dict[str, Condition]], name: str = "stack", **kw: object) -> Plan:
    """A plan from {service: [deps]} or {service: {dep: condition}}; every service has a health check."""
    vms = []
    for service, deps in graph.items():
        edges = (
            tuple(Dependency(d, c) for d, c in deps.items())
            if isinstance(deps, dict)
            else tuple(Dependency(d) for d in deps)
        )
        vms.append(PlanVm(service, spec(name, service, checks=True), edges))
    return Plan(name, tuple(vms), **kw)  # type: ignore[arg-type]


def refused(plan: Plan, reason: str = PLAN_INVALID, *, check: bool = True) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        (check_plan if check else levels)(plan)
    assert info.value.reason == reason, info.value.message
    return info.value


# ------------------------------------------------------------------------------------------- levels


def test_vm_name_joins_plan_and_service() -> None:
    assert vm_name("stack", "db") == "stack-db"


def test_levels_follow_dependencies_and_keep_file_order_inside_a_level() -> None:
    plan = make({"web": ["api"], "cache": [], "api": ["db", "cache"], "db": [], "worker": ["db"]})
    assert levels(plan) == [["cache", "db"], ["api", "worker"], ["web"]]
    assert check_plan(plan) == levels(plan)


def test_a_service_waits_for_its_deepest_dependency() -> None:
    # web depends on db (level 0) and api (level 1): it belongs after api, not next to it
    plan = make({"db": [], "api": ["db"], "web": ["db", "api"]})
    assert levels(plan) == [["db"], ["api"], ["web"]]


def test_unknown_dependency_names_the_service_the_name_and_the_known_services() -> None:
    err = refused(make({"db": [], "api": ["dbx"]}), PLAN_UNKNOWN_DEPENDENCY, check=False)
    assert err.metadata == {"field": "vms.api.depends_on"}
    assert "api depends on 'dbx'" in err.message
    assert "(services: db, api)" in err.message


def test_a_cycle_is_named_as_a_path() -> None:
    err = refused(make({"db": [], "api": ["web"], "web": ["api"]}), PLAN_CYCLE, check=False)
    assert "dependency cycle: api -> web -> api" in err.message
    assert err.metadata["field"] == "vms.api.depends_on"


def test_a_longer_cycle_behind_a_service_outside_it() -> None:
    # 'front' waits on the cycle but is not part of it: the path shows only the cycle
    err = refused(make({"front": ["a"], "a": ["b"], "b": ["c"], "c": ["a"]}), PLAN_CYCLE, check=False)
    assert "dependency cycle: a -> b -> c -> a" in err.message
    assert err.metadata["field"] == "vms.a.depends_on"


def test_a_self_dependency_is_a_cycle() -> None:
    err = refused(make({"db": ["db"]}), PLAN_CYCLE, check=False)
    assert "dependency cycle: db -> db" in err.message


def test_a_dependency_listed_twice_is_refused() -> None:
    err = refused(make({"db": [], "api": ["db", "db"]}), PLAN_INVALID, check=False)
    assert err.metadata["field"] == "vms.api.depends_on"
    assert "'db' is listed more than once" in err.message


def test_dependents_are_transitive() -> None:
    plan = make({"db": [], "cache": [], "api": ["db"], "web": ["api"], "worker": ["db", "cache"], "cron": []})
    assert dependents(plan, "db") == {"api", "web", "worker"}
    assert dependents(plan, "api") == {"web"}
    assert dependents(plan, "web") == set()
    assert dependents(plan, "nope") == set()


# --------------------------------------------------------------------------------------- check_plan


def test_plan_name_must_be_a_dns_label() -> None:
    plan = make({"db": []}, name="Stack_1")
    plan = dataclasses.replace(plan, vms=(PlanVm("db", spec("Stack_1", "db")),))
    err = refused(plan)
    assert err.metadata["field"] == "name"
    assert "'Stack_1' is not a DNS label" in err.message


def test_service_names_must_be_dns_labels() -> None:
    err = refused(Plan("stack", (PlanVm("my_db", spec("stack", "my_db")),)))
    assert err.metadata["field"] == "vms.my_db"
    assert "'my_db' is not a DNS label" in err.message


def test_a_vm_name_too_long_says_which_service_and_by_how_much() -> None:
    service = "s" * 60  # "stack-" + 60 = 66 characters: 3 too many
    err = refused(Plan("stack", (PlanVm(service, spec("stack", service)),)))
    assert err.metadata["field"] == f"vms.{service}"
    assert "66 characters, 3 more than a DNS label allows (63)" in err.message
    assert "by 3" in err.message


def test_services_are_unique() -> None:
    err = refused(Plan("stack", (PlanVm("db", spec("stack", "db")), PlanVm("db", spec("stack", "db")))))
    assert err.metadata["field"] == "vms.db"
    assert "defined twice" in err.message


def test_a_plan_has_one_to_max_vms() -> None:
    assert refused(Plan("stack", ())).metadata["field"] == "vms"
    many = tuple(PlanVm(f"s{i}", spec("stack", f"s{i}")) for i in range(MAX_PLAN_VMS + 1))
    err = refused(Plan("stack", many))
    assert err.metadata["field"] == "vms"
    assert f"at most {MAX_PLAN_VMS}" in err.message
    assert len(check_plan(Plan("stack", many[:MAX_PLAN_VMS]))[0]) == MAX_PLAN_VMS


def test_each_spec_is_named_plan_dash_service() -> None:
    err = refused(Plan("stack", (PlanVm("db", spec("other", "db")),)))
    assert err.metadata["field"] == "vms.db.spec.name"
    assert "'other-db' must be 'stack-db'" in err.message


def test_placement_host_must_be_a_dns_label() -> None:
    err = refused(Plan("stack", (PlanVm("db", spec("stack", "db"), host="Host 1"),)))
    assert err.metadata["field"] == "vms.db.host"


@pytest.mark.parametrize(
    ("update", "field", "text"),
    [
        (UpdatePolicy(max_parallel=0), "update.max_parallel", "0 is out of range: use 1..64"),
        (UpdatePolicy(max_parallel=65), "update.max_parallel", "65 is out of range"),
        (UpdatePolicy(healthy_deadline_ms=999), "update.healthy_deadline_ms", "use 1s .. 24h"),
        (UpdatePolicy(healthy_deadline_ms=24 * 3600 * 1000 + 1), "update.healthy_deadline_ms", "out of range"),
        (UpdatePolicy(min_healthy_time_ms=-1), "update.min_healthy_time_ms", "must not be negative"),
        (
            UpdatePolicy(min_healthy_time_ms=60_000, healthy_deadline_ms=60_000),
            "update.min_healthy_time_ms",
            "1m must be shorter than healthy_deadline (1m)",
        ),
    ],
)
def test_update_policy_bounds(update: UpdatePolicy, field: str, text: str) -> None:
    err = refused(make({"db": []}, update=update))
    assert err.metadata["field"] == field
    assert text in err.message


def test_update_policy_extremes_are_accepted() -> None:
    for update in (
        UpdatePolicy(max_parallel=1, healthy_deadline_ms=1000),
        UpdatePolicy(max_parallel=64, min_healthy_time_ms=0, healthy_deadline_ms=24 * 3600 * 1000),
    ):
        check_plan(make({"db": []}, update=update))


def test_waiting_for_health_needs_a_health_check() -> None:
    plan = Plan(
        "stack",
        (
            PlanVm("db", spec("stack", "db")),
            PlanVm("api", spec("stack", "api"), (Dependency("db", Condition.HEALTHY),)),
        ),
    )
    err = refused(plan, PLAN_NO_HEALTH_CHECK)
    assert err.metadata["field"] == "vms.api.depends_on"
    assert "api waits for db to be healthy, but db has no health_checks: add one, or use condition: started" in (
        err.message
    )
    # started and completed need no health check
    for condition in (Condition.STARTED, Condition.COMPLETED):
        ok = dataclasses.replace(
            plan, vms=(plan.vms[0], dataclasses.replace(plan.vms[1], depends_on=(Dependency("db", condition),)))
        )
        assert check_plan(ok) == [["db"], ["api"]]


def test_check_plan_reports_graph_errors_too() -> None:
    refused(make({"db": [], "api": ["nope"]}), PLAN_UNKNOWN_DEPENDENCY)
    refused(make({"a": ["b"], "b": ["a"]}), PLAN_CYCLE)
