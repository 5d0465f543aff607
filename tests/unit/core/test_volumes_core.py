"""Volume disks and volumes in core: validation, wire conversion, the at-rest JSON form."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from clonebox_core import specjson
from clonebox_core.errors import InvalidArgument
from clonebox_core.model import DiskSpec, VmSpec, Volume
from clonebox_core.rpc import convert
from clonebox_core.validate import validate_spec, validate_volume


def _spec(*disks: DiskSpec) -> VmSpec:
    return VmSpec(name="web", disks=(DiskSpec("root", size_mib=16), *disks))


def test_a_volume_disk_is_valid_without_base_or_size() -> None:
    spec = _spec(DiskSpec("data", volume="db"), DiskSpec("logs", volume="logs-1"))
    assert validate_spec(spec) is spec
    # a volume disk reserves nothing of its own: the volume exists already
    assert spec.resources().disk_mib == 16


@pytest.mark.parametrize(
    ("disk", "field"),
    [
        (DiskSpec("data", base_image="base.qcow2", volume="db"), "spec.disks[1].base_image"),
        (DiskSpec("data", size_mib=8, volume="db"), "spec.disks[1].size_mib"),
        (DiskSpec("data", volume="Not_A_Label"), "spec.disks[1].volume"),
        (DiskSpec("data", volume="x" * 64), "spec.disks[1].volume"),
        (DiskSpec("bad name", volume="db"), "spec.disks[1].name"),
    ],
)
def test_a_bad_volume_disk_names_the_field(disk: DiskSpec, field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        validate_spec(_spec(disk))
    assert err.value.metadata["field"] == field


def test_one_volume_twice_in_a_vm_is_refused() -> None:
    with pytest.raises(InvalidArgument) as err:
        validate_spec(_spec(DiskSpec("a", volume="db"), DiskSpec("b", volume="db")))
    assert err.value.metadata["field"] == "spec.disks[2].volume"


@pytest.mark.parametrize(
    ("name", "size", "labels", "field"),
    [
        ("db", 0, (), "size_mib"),
        ("db", -1, (), "size_mib"),
        ("db", 64 * 1024 * 1024 + 1, (), "size_mib"),
        ("-db", 8, (), "name"),
        ("db", 8, (("Bad Key", "v"),), "labels"),
        ("db", 8, (("k", "bad value"),), "labels.k"),
    ],
)
def test_validate_volume_names_the_field(name: str, size: int, labels: tuple[tuple[str, str], ...], field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        validate_volume(name, size, labels)
    assert err.value.metadata["field"] == field


def test_validate_volume_accepts_a_good_one() -> None:
    validate_volume("db-1", 1, (("app", "db"),))


def test_volume_disks_cross_the_wire() -> None:
    spec = _spec(DiskSpec("data", volume="db"))
    assert convert.spec_from_proto(convert.spec_to_proto(spec)) == spec
    assert convert.spec_to_proto(spec).disks[1].volume == "db"


def test_volumes_cross_the_wire() -> None:
    volume = Volume("db", 8, True, (("a", "1"), ("b", "2")), ("api", "web"), datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
    assert convert.volume_from_proto(convert.volume_to_proto(volume)) == volume
    bare = Volume("db", 8)
    msg = convert.volume_to_proto(bare)
    assert not msg.HasField("create_time")
    assert convert.volume_from_proto(msg) == bare


def test_the_at_rest_form_names_a_volume_only_when_there_is_one() -> None:
    plain = _spec()
    # specs without volumes keep their at-rest form (and every digest of it) byte for byte
    assert "volume" not in specjson.spec_to_dict(plain, secrets="digest")["disks"][0]
    with_volume = _spec(DiskSpec("data", volume="db"))
    data = specjson.spec_to_dict(with_volume, secrets="digest")
    assert data["disks"][1] == {"name": "data", "base_image": "", "size_mib": 0, "volume": "db"}
    assert specjson.spec_from_dict(data) == with_volume
