"""What applying a plan changes (classify, diff), the plan's digest, and its stored JSON form."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime

import pytest

from clonebox_core import health
from clonebox_core.model import (
    Auth,
    AuthMethod,
    CloudInit,
    DiskSpec,
    KernelBoot,
    NetworkSpec,
    Provision,
    SharedFolder,
    VmSpec,
)
from clonebox_core.plan import (
    ChangeKind,
    Condition,
    Dependency,
    FailurePolicy,
    Plan,
    PlanVm,
    UpdatePolicy,
    VmChange,
    classify,
    diff,
    needs_replace_error,
    plan_digest,
    plan_from_dict,
    plan_to_dict,
    updated_spec,
)
from clonebox_core.secret import Secret
from clonebox_core.secrets.passwords import sha512_crypt
from clonebox_core.specjson import spec_from_dict, spec_to_dict

pytestmark = pytest.mark.unit

PROBE = health.Probe("port", health.ProbeType.TCP, tcp=health.TcpProbe(5432))
BASE = VmSpec(
    "stack-db",
    vcpus=1,
    memory_mib=128,
    kernel_boot=KernelBoot("testguest/vmlinux"),
    cloud_init=CloudInit(Secret("#cloud-config\nruncmd: [echo token-123]\n")),
    labels=(("clonebox.plan", "stack"), ("clonebox.service", "db")),
    auth=Auth(
        user="dev",
        method=AuthMethod.BOTH,
        ssh_keys=("github:octocat",),
        password="env:VM_PASSWORD",
        ssh_authorized_keys=("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA me@host",),
        password_hash=Secret(sha512_crypt(Secret("pw"))),
        secret_refs=("env:VM_PASSWORD",),
    ),
)


def at_rest(spec: VmSpec) -> VmSpec:
    """The spec as an agent's domain metadata keeps it: secret fields as sha256 digests."""
    return spec_from_dict(spec_to_dict(spec, secrets="digest"))


# ----------------------------------------------------------------------------------------- classify


def test_no_difference_is_none() -> None:
    assert classify(BASE, BASE) == (ChangeKind.NONE, ())


def test_a_digest_at_rest_matches_the_value() -> None:
    stored = at_rest(BASE)
    assert stored.cloud_init is not None and stored.cloud_init.user_data.reveal().startswith("sha256:")
    assert classify(stored, BASE) == (ChangeKind.NONE, ())
    # and the other way round: a stored plan revision (digests) against a VM kept whole
    assert classify(BASE, stored) == (ChangeKind.NONE, ())


def test_a_password_resolved_again_is_no_change() -> None:
    # a new random salt: a different hash for the same password behind the same reference
    again = dataclasses.replace(
        BASE, auth=dataclasses.replace(BASE.auth, password_hash=Secret(sha512_crypt(Secret("pw"))))
    )  # type: ignore[arg-type]
    assert again.auth != BASE.auth
    assert classify(BASE, again) == (ChangeKind.NONE, ())
    assert classify(at_rest(BASE), again) == (ChangeKind.NONE, ())


@pytest.mark.parametrize(
    ("change", "kind", "fields"),
    [
        ({"labels": (*BASE.labels, ("tier", "db"))}, ChangeKind.IN_PLACE, ("labels",)),
        ({"health_checks": (PROBE,)}, ChangeKind.IN_PLACE, ("health_checks",)),
        ({"labels": (), "health_checks": (PROBE,)}, ChangeKind.IN_PLACE, ("health_checks", "labels")),
        ({"vcpus": 2}, ChangeKind.RESTART, ("vcpus",)),
        ({"memory_mib": 256, "labels": ()}, ChangeKind.RESTART, ("labels", "memory_mib")),
        ({"disks": (DiskSpec("data", size_mib=10),)}, ChangeKind.REPLACE, ("disks",)),
        ({"kernel_boot": KernelBoot("testguest/vmlinux", cmdline="quiet")}, ChangeKind.REPLACE, ("kernel_boot",)),
        ({"network": NetworkSpec(libvirt_network="other")}, ChangeKind.REPLACE, ("network",)),
        ({"shared_folders": (SharedFolder("/srv/x", "x"),)}, ChangeKind.REPLACE, ("shared_folders",)),
        (
            {"cloud_init": CloudInit(Secret("#cloud-config\nruncmd: [echo other]\n"))},
            ChangeKind.REPLACE,
            ("cloud_init",),
        ),
        ({"provision": Provision(packages=("git",))}, ChangeKind.REPLACE, ("provision",)),
        (
            {"vcpus": 4, "memory_mib": 512, "disks": (DiskSpec("d", size_mib=1),)},
            ChangeKind.REPLACE,
            ("disks", "memory_mib", "vcpus"),
        ),
    ],
)
def test_kinds_of_change(change: dict[str, object], kind: ChangeKind, fields: tuple[str, ...]) -> None:
    new = dataclasses.replace(BASE, **change)  # type: ignore[arg-type]
    assert classify(BASE, new) == (kind, fields)
    assert classify(at_rest(BASE), new) == (kind, fields)


@pytest.mark.parametrize(
    "auth_change",
    [
        {"user": "ops"},
        {"method": AuthMethod.PASSWORD, "ssh_keys": (), "ssh_authorized_keys": ()},
        {"ssh_keys": ("github:someone",)},
        {"ssh_authorized_keys": ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB other@host",)},
        {"password": "file:/run/pw", "secret_refs": ("file:/run/pw",)},
    ],
)
def test_public_parts_of_auth_replace(auth_change: dict[str, object]) -> None:
    new = dataclasses.replace(BASE, auth=dataclasses.replace(BASE.auth, **auth_change))  # type: ignore[arg-type]
    assert classify(BASE, new) == (ChangeKind.REPLACE, ("auth",))


def test_adding_or_removing_auth_replaces() -> None:
    assert classify(BASE, dataclasses.replace(BASE, auth=None)) == (ChangeKind.REPLACE, ("auth",))


# --------------------------------------------------------------------------------------------- diff


def test_an_update_takes_only_the_updatable_fields_and_keeps_secrets_at_rest() -> None:
    current = at_rest(BASE)
    new = dataclasses.replace(
        BASE,
        vcpus=2,
        memory_mib=256,
        labels=(("app", "db"),),
        health_checks=(PROBE,),
        cloud_init=CloudInit(Secret("#cloud-config\nruncmd: [echo other]\n")),
    )
    kept = updated_spec(current, new)
    assert (kept.vcpus, kept.memory_mib, kept.labels, kept.health_checks) == (2, 256, (("app", "db"),), (PROBE,))
    # everything else is the current spec's, the digests of its secrets included
    assert spec_to_dict(
        dataclasses.replace(kept, vcpus=1, memory_mib=128, labels=BASE.labels, health_checks=()), secrets="keep"
    ) == spec_to_dict(current, secrets="keep")
    assert kept.cloud_init == current.cloud_init


def test_needs_replace_names_only_the_fields_at_fault() -> None:
    err = needs_replace_error("stack-db", ("disks", "labels", "memory_mib", "network"))
    assert err.reason == "VM_UPDATE_NEEDS_REPLACE"
    assert err.metadata == {"vm": "stack-db", "fields": "disks,network"}
    assert err.message.startswith("VM stack-db: disks, network cannot change without re-creating the VM")


def vm(service: str, *deps: str, **change: object) -> PlanVm:
    spec = dataclasses.replace(BASE, name=f"stack-{service}", auth=None, cloud_init=None, **change)  # type: ignore[arg-type]
    return PlanVm(service, spec, tuple(Dependency(d) for d in deps))


def test_diff_first_plan_creates_everything_in_level_order() -> None:
    new = Plan("stack", (vm("web", "api"), vm("api", "db"), vm("db")))
    assert diff(None, new, {}) == [
        VmChange("db", "stack-db", ChangeKind.CREATE),
        VmChange("api", "stack-api", ChangeKind.CREATE),
        VmChange("web", "stack-web", ChangeKind.CREATE),
    ]


def test_diff_classifies_existing_vms_and_removes_dropped_services_dependents_first() -> None:
    current = Plan("stack", (vm("db"), vm("cache"), vm("api", "db"), vm("web", "api"), vm("old", "api")))
    new = Plan("stack", (vm("db", vcpus=2), vm("api", "db"), vm("search", "db")))
    existing = {v.spec.name: v.spec for v in current.vms if v.service != "cache"}  # cache is gone already
    assert diff(current, new, existing) == [
        VmChange("db", "stack-db", ChangeKind.RESTART, ("vcpus",)),
        VmChange("api", "stack-api", ChangeKind.NONE),
        VmChange("search", "stack-search", ChangeKind.CREATE),
        # current's levels: [db, cache], [api], [web, old]; reversed, only those that exist and left
        VmChange("old", "stack-old", ChangeKind.REMOVE),
        VmChange("web", "stack-web", ChangeKind.REMOVE),
    ]


def test_diff_recreates_a_vm_that_vanished() -> None:
    current = Plan("stack", (vm("db"),))
    assert diff(current, current, {}) == [VmChange("db", "stack-db", ChangeKind.CREATE)]


# ------------------------------------------------------------------------------------ digest & JSON


def full_plan() -> Plan:
    return Plan(
        "stack",
        (
            PlanVm("db", dataclasses.replace(BASE, health_checks=(PROBE,)), host="h1"),
            PlanVm(
                "api",
                dataclasses.replace(BASE, name="stack-api", auth=None),
                (Dependency("db", Condition.HEALTHY), Dependency("cache", Condition.COMPLETED)),
            ),
            PlanVm("cache", dataclasses.replace(BASE, name="stack-cache", auth=None, cloud_init=None)),
        ),
        UpdatePolicy(max_parallel=2, min_healthy_time_ms=10_000, healthy_deadline_ms=120_000, auto_revert=True),
        FailurePolicy.LEAVE,
        source="stack/clonebox-compose.yaml",
        revision=3,
        digest="abc",
        create_time=datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC),
    )


def test_digest_ignores_where_and_when_and_the_password_salt() -> None:
    plan = full_plan()
    digest = plan_digest(plan)
    assert len(digest) == 64 and int(digest, 16) >= 0
    same = dataclasses.replace(plan, source="other.yaml", revision=9, digest="x", create_time=None)
    assert plan_digest(same) == digest
    db = plan.vms[0]
    salted = dataclasses.replace(
        db.spec, auth=dataclasses.replace(db.spec.auth, password_hash=Secret(sha512_crypt(Secret("pw"))))
    )  # type: ignore[arg-type]
    assert plan_digest(dataclasses.replace(plan, vms=(dataclasses.replace(db, spec=salted), *plan.vms[1:]))) == digest


@pytest.mark.parametrize(
    "change",
    [
        lambda p: dataclasses.replace(p, name="other"),
        lambda p: dataclasses.replace(p, on_failure=FailurePolicy.ROLLBACK),
        lambda p: dataclasses.replace(p, update=UpdatePolicy()),
        lambda p: dataclasses.replace(p, vms=p.vms[::-1]),
        lambda p: dataclasses.replace(p, vms=(dataclasses.replace(p.vms[0], host=""), *p.vms[1:])),
        lambda p: dataclasses.replace(
            p, vms=(p.vms[0], dataclasses.replace(p.vms[1], depends_on=p.vms[1].depends_on[:1]), p.vms[2])
        ),
        # a secret value changes the digest (through its sha256), without being in the digest input
        lambda p: dataclasses.replace(
            p,
            vms=(
                dataclasses.replace(
                    p.vms[0], spec=dataclasses.replace(p.vms[0].spec, cloud_init=CloudInit(Secret("#cloud-config\n")))
                ),
                *p.vms[1:],
            ),
        ),
    ],
)
def test_digest_changes_with_what_the_plan_does(change: object) -> None:
    plan = full_plan()
    assert plan_digest(change(plan)) != plan_digest(plan)  # type: ignore[operator]


def test_dict_round_trip_keeps_everything_with_secrets_kept() -> None:
    plan = full_plan()
    data = json.loads(json.dumps(plan_to_dict(plan, secrets="keep")))
    assert plan_from_dict(data) == plan


def test_dict_default_form_holds_digests_only() -> None:
    plan = full_plan()
    data = json.loads(json.dumps(plan_to_dict(plan)))
    text = json.dumps(data)
    assert "token-123" not in text and "$6$" not in text
    back = plan_from_dict(data)
    assert back.vms[0].spec.cloud_init is not None
    assert back.vms[0].spec.cloud_init.user_data.reveal().startswith("sha256:")
    # everything else survives, and the digest form still classifies as unchanged
    assert dataclasses.replace(back, vms=()) == dataclasses.replace(plan, vms=())
    assert [v.depends_on for v in back.vms] == [v.depends_on for v in plan.vms]
    assert all(classify(b.spec, p.spec) == (ChangeKind.NONE, ()) for b, p in zip(back.vms, plan.vms, strict=True))
    assert plan_digest(back) == plan_digest(plan)


def test_dict_decoding_is_lenient_about_missing_keys() -> None:
    spec = spec_to_dict(vm("db").spec, secrets="keep")
    plan = plan_from_dict({"name": "stack", "vms": [{"service": "db", "spec": spec}]})
    assert plan == Plan("stack", (vm("db"),))
