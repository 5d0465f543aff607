"""A managed network attachment (NetworkMode.MANAGED): validation, and the round trips through JSON and protobuf."""

from __future__ import annotations

import dataclasses

import pytest

from clonebox_core.errors import InvalidArgument
from clonebox_core.model import KernelBoot, NetworkMode, NetworkSpec, VmSpec
from clonebox_core.rpc.convert import spec_from_proto, spec_to_proto
from clonebox_core.specjson import spec_from_dict, spec_to_dict
from clonebox_core.validate import validate_spec

GOOD = NetworkSpec(NetworkMode.MANAGED, "cb-shop", "10.213.7.0/24", "10.213.7.10", ("db", "shop-db"))


def vm(network: NetworkSpec) -> VmSpec:
    return VmSpec("shop-db", kernel_boot=KernelBoot("/boot/vmlinuz"), network=network)


def test_a_good_attachment_passes_and_round_trips() -> None:
    spec = validate_spec(vm(GOOD))
    assert spec_from_proto(spec_to_proto(spec)).network == GOOD
    assert spec_from_dict(spec_to_dict(spec, secrets="keep")).network == GOOD


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"libvirt_network": "default"}, "spec.network.libvirt_network", "cb-"),
        ({"libvirt_network": "cb-Shop"}, "spec.network.libvirt_network", "cb-"),
        ({"subnet": "10.213.7.0"}, "spec.network.subnet", "/16 to /29"),  # a host address: a /32
        ({"subnet": "not a subnet"}, "spec.network.subnet", "CIDR"),
        ({"subnet": "8.8.8.0/24", "address": "8.8.8.10"}, "spec.network.subnet", "private"),
        ({"subnet": "10.0.0.0/8", "address": "10.0.0.10"}, "spec.network.subnet", "/16 to /29"),
        ({"address": "10.213.8.10"}, "spec.network.address", "10.213.7.2 .. 10.213.7.254"),
        ({"address": "10.213.7.1"}, "spec.network.address", "the first is the host's"),
        ({"address": "10.213.7.255"}, "spec.network.address", "not a guest address"),
        ({"address": "db"}, "spec.network.address", "not an IPv4 address"),
        ({"dns_names": ("Db_1",)}, "spec.network.dns_names[0]", ""),
        ({"dns_names": tuple(f"n{i}" for i in range(17))}, "spec.network.dns_names", "at most 16"),
    ],
)
def test_bad_attachments_name_the_field(change: dict[str, object], field: str, words: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        validate_spec(vm(dataclasses.replace(GOOD, **change)))  # type: ignore[arg-type]
    assert err.value.metadata["field"] == field
    assert words in err.value.message


@pytest.mark.parametrize("mode", [NetworkMode.LIBVIRT, NetworkMode.NONE])
def test_other_modes_refuse_managed_fields(mode: NetworkMode) -> None:
    with pytest.raises(InvalidArgument) as err:
        validate_spec(vm(NetworkSpec(mode, "default", subnet="10.213.7.0/24")))
    assert err.value.metadata["field"] == "spec.network.subnet" and "MANAGED" in err.value.message
