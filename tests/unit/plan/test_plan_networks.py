"""Plan networks in the model: subnets and addresses the controller gives, kept across re-applies."""

from __future__ import annotations

import dataclasses
import ipaddress

import pytest

from clonebox_core.errors import FailedPrecondition, InvalidArgument
from clonebox_core.model import KernelBoot, NetworkMode, NetworkSpec, VmSpec
from clonebox_core.plan import (
    PLAN_SUBNET_POOL,
    Plan,
    PlanNetwork,
    PlanVm,
    check_plan,
    check_subnet_changes,
    materialize_networks,
    network_name,
    plan_digest,
    plan_from_dict,
    plan_to_dict,
)
from clonebox_core.rpc.convert_plan import plan_from_proto, plan_to_proto
from clonebox_core.validate import validate_spec


def plan(*services: str, networks: tuple[PlanNetwork, ...] = (PlanNetwork("default"),), net: str = "default") -> Plan:
    return Plan(
        "shop",
        tuple(PlanVm(s, VmSpec(f"shop-{s}", kernel_boot=KernelBoot("/k")), network=net) for s in services),
        networks=networks,
    )


def addresses(p: Plan) -> dict[str, str]:
    return {v.service: v.spec.network.address for v in p.vms}


def test_a_network_gets_a_pool_subnet_and_each_vm_an_address_and_dns_names() -> None:
    done = materialize_networks(plan("db", "api"), None, [])
    subnet = ipaddress.IPv4Network(done.networks[0].subnet)
    assert subnet.subnet_of(PLAN_SUBNET_POOL) and subnet.prefixlen == 24
    db = done.vm("db").spec.network
    assert db.mode is NetworkMode.MANAGED and db.libvirt_network == "cb-shop" == network_name("shop", "default")
    assert db.subnet == str(subnet) and db.dns_names == ("db", "shop-db")
    # the host has the first address; guests from the second on, no two the same
    assert addresses(done) == {"db": str(subnet.network_address + 2), "api": str(subnet.network_address + 3)}
    for v in done.vms:
        validate_spec(v.spec)  # what the agent will be asked for is a valid managed attachment
    check_plan(done)


def test_reapplying_keeps_subnet_and_addresses_so_nothing_changes() -> None:
    first = materialize_networks(plan("db", "api"), None, [])
    again = materialize_networks(plan("db", "api"), first, [])
    assert again == first and plan_digest(again) == plan_digest(first)
    # a new service takes a free address; a removed one frees its own; the others keep theirs
    grown = materialize_networks(plan("cache", "api"), first, [])
    assert grown.vm("api").spec.network.address == first.vm("api").spec.network.address
    assert grown.vm("cache").spec.network.address == first.vm("db").spec.network.address


def test_subnets_avoid_other_plans_and_a_given_subnet_wins() -> None:
    first = materialize_networks(plan("db"), None, [])
    taken = ipaddress.IPv4Network(first.networks[0].subnet)
    other = materialize_networks(plan("db"), None, [taken])
    assert not ipaddress.IPv4Network(other.networks[0].subnet).overlaps(taken)
    given = plan("db", networks=(PlanNetwork("default", "192.168.77.0/28"),))
    done = materialize_networks(given, first, [])
    assert done.networks[0].subnet == "192.168.77.0/28" and addresses(done) == {"db": "192.168.77.2"}


def test_a_full_subnet_and_a_full_pool_are_errors_naming_the_network() -> None:
    tiny = plan(*(f"s{i}" for i in range(6)), networks=(PlanNetwork("default", "10.9.9.0/29"),))
    with pytest.raises(InvalidArgument) as err:
        materialize_networks(tiny, None, [])  # a /29 has 5 guest addresses
    assert err.value.reason == "PLAN_NETWORK_FULL" and err.value.metadata["field"] == "networks.default.subnet"
    with pytest.raises(InvalidArgument) as err:
        materialize_networks(plan("db"), None, [PLAN_SUBNET_POOL])
    assert err.value.reason == "PLAN_NETWORK_FULL" and "give this network a subnet" in err.value.message


def test_vms_without_a_plan_network_are_untouched() -> None:
    p = dataclasses.replace(plan("db"), vms=(PlanVm("db", VmSpec("shop-db", kernel_boot=KernelBoot("/k"))),))
    done = materialize_networks(p, None, [])
    assert done.vm("db").spec.network == NetworkSpec()


def test_networks_survive_the_store_and_the_wire() -> None:
    done = materialize_networks(plan("db", "api"), None, [])
    assert plan_from_dict(plan_to_dict(done, secrets="keep")) == done
    assert plan_from_proto(plan_to_proto(done)) == done


@pytest.mark.parametrize(
    ("p", "field", "reason"),
    [
        (plan("db", net="back"), "vms.db.networks", "PLAN_UNKNOWN_NETWORK"),
        (plan("db", networks=(PlanNetwork("default"), PlanNetwork("default"))), "networks.default", "PLAN_INVALID"),
        (plan("db", networks=(PlanNetwork("Front"),), net="Front"), "networks.Front", "PLAN_INVALID"),
        (plan("db", networks=(PlanNetwork("default", "8.8.8.0/24"),)), "networks.default.subnet", "PLAN_INVALID"),
    ],
)
def test_check_plan_refuses_bad_networks(p: Plan, field: str, reason: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        check_plan(p)
    assert (err.value.metadata["field"], err.value.reason) == (field, reason)


def test_moving_a_live_network_to_another_subnet_is_refused_before_anything() -> None:
    first = materialize_networks(plan("db", "api", networks=(PlanNetwork("default", "10.213.5.0/24"),)), None, [])
    moved = materialize_networks(plan("db", "api", networks=(PlanNetwork("default", "10.213.6.0/24"),)), first, [])
    with pytest.raises(FailedPrecondition) as err:
        check_subnet_changes(moved, first, {"shop-db", "shop-api"})
    assert err.value.reason == "PLAN_NETWORK_SUBNET_CHANGE"
    assert err.value.metadata["field"] == "networks.default.subnet"
    assert err.value.metadata["vms"] == "shop-api,shop-db"
    assert "clonebox down shop" in err.value.message and "10.213.5.0/24" in err.value.message
    # only while its VMs exist: after a down, the same move is fine; so is keeping the subnet
    check_subnet_changes(moved, first, set())
    check_subnet_changes(materialize_networks(plan("db", "api"), first, []), first, {"shop-db", "shop-api"})
    check_subnet_changes(moved, None, {"shop-db"})
