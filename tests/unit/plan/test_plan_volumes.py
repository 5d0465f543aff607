"""Plan volumes in the model: checks, the disks the controller adds, and the stored and wire forms."""

from __future__ import annotations

import dataclasses

import pytest

from clonebox_core.errors import InvalidArgument
from clonebox_core.model import DiskSpec, KernelBoot, VmSpec
from clonebox_core.plan import (
    PLAN_INVALID,
    PLAN_UNKNOWN_VOLUME,
    PLAN_VOLUME_NOT_SHARED,
    Plan,
    PlanVm,
    PlanVolume,
    VolumeChange,
    VolumeChangeKind,
    attach_volumes,
    check_plan,
    plan_digest,
    plan_from_dict,
    plan_to_dict,
    volume_disk_name,
    volume_name,
)
from clonebox_core.rpc.convert_plan import (
    plan_from_proto,
    plan_to_proto,
    volume_change_from_proto,
    volume_change_to_proto,
)
from clonebox_core.validate import validate_spec

pytestmark = pytest.mark.unit


def plan(uses: dict[str, tuple[str, ...]], volumes: tuple[PlanVolume, ...]) -> Plan:
    vms = tuple(PlanVm(s, VmSpec(f"shop-{s}", kernel_boot=KernelBoot("/k")), volumes=v) for s, v in uses.items())
    return Plan("shop", vms, volumes=volumes)


DATA = PlanVolume("data", 1024)
CACHE = PlanVolume("cache", 256, shared=True)


def test_attach_volumes_adds_one_disk_per_volume_and_is_idempotent() -> None:
    p = plan({"db": ("data", "cache"), "api": ("cache",), "web": ()}, (DATA, CACHE))
    check_plan(p)
    attached = attach_volumes(p)
    assert attached.vm("db").spec.disks == (
        DiskSpec("vol-data", volume="shop-data"),
        DiskSpec("vol-cache", volume="shop-cache"),
    )
    assert attached.vm("api").spec.disks == (DiskSpec("vol-cache", volume="shop-cache"),)
    assert attached.vm("web").spec.disks == ()
    assert attach_volumes(attached) == attached  # a stored revision goes through unchanged
    check_plan(attached)
    for v in attached.vms:
        validate_spec(v.spec)
    assert volume_name("shop", "data") == "shop-data"
    assert volume_disk_name("x" * 63) == ("vol-" + "x" * 63)[:63]
    assert not volume_disk_name("ab-" + "c" * 60 + "-d").endswith("-")


@pytest.mark.parametrize(
    ("uses", "volumes", "reason", "field"),
    [
        ({"db": ("nope",)}, (DATA,), PLAN_UNKNOWN_VOLUME, "vms.db.volumes"),
        ({"db": ("data",), "api": ("data",)}, (DATA,), PLAN_VOLUME_NOT_SHARED, "vms.api.volumes"),
        ({"db": ("data", "data")}, (DATA,), PLAN_INVALID, "vms.db.volumes"),
        ({"db": ()}, (DATA, DATA), PLAN_INVALID, "volumes.data"),
        ({"db": ()}, (PlanVolume("data", 0),), PLAN_INVALID, "volumes.data.size_mib"),
        ({"db": ()}, (PlanVolume("Data", 1),), PLAN_INVALID, "volumes.Data"),
        ({"db": ()}, (PlanVolume("d" * 60, 1),), PLAN_INVALID, "volumes." + "d" * 60),
    ],
)
def test_check_plan_refuses_bad_volumes(
    uses: dict[str, tuple[str, ...]], volumes: tuple[PlanVolume, ...], reason: str, field: str
) -> None:
    with pytest.raises(InvalidArgument) as info:
        check_plan(plan(uses, volumes))
    assert info.value.reason == reason, info.value.message
    assert info.value.metadata["field"] == field


def test_a_spec_may_attach_only_its_own_plan_volumes() -> None:
    p = plan({"db": ("data",), "api": ()}, (DATA,))
    sneaky = dataclasses.replace(
        p.vm("api"), spec=dataclasses.replace(p.vm("api").spec, disks=(DiskSpec("x", volume="other-plan-data"),))
    )
    with pytest.raises(InvalidArgument) as info:
        check_plan(dataclasses.replace(p, vms=(p.vm("db"), sneaky)))
    assert info.value.metadata["field"] == "vms.api.spec.disks[0].volume"


def test_volumes_survive_the_store_and_the_wire_and_count_in_the_digest() -> None:
    p = attach_volumes(plan({"db": ("data",), "api": ("cache",)}, (dataclasses.replace(DATA, host="h1"), CACHE)))
    assert plan_from_dict(plan_to_dict(p)) == p
    assert plan_from_proto(plan_to_proto(p)) == p
    bigger = dataclasses.replace(p, volumes=(dataclasses.replace(DATA, host="h1", size_mib=2048), CACHE))
    assert plan_digest(bigger) != plan_digest(p)
    unshared = dataclasses.replace(p, volumes=(dataclasses.replace(DATA, host="h1"), PlanVolume("cache", 256)))
    assert plan_digest(unshared) != plan_digest(p)


def test_a_plan_without_volumes_keeps_its_stored_form() -> None:
    p = plan({"db": ()}, ())
    stored = plan_to_dict(p)
    assert "volumes" not in stored and all("volumes" not in v for v in stored["vms"])


def test_volume_change_round_trip() -> None:
    c = VolumeChange("data", "shop-data", "h1", 1024, False, VolumeChangeKind.DIFFERENT, "it has 512", ("db",))
    assert volume_change_from_proto(volume_change_to_proto(c)) == c
