"""The store's grouped counts behind the ``clonebox_vms`` and ``clonebox_hosts`` gauges, on both backends."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from clonebox_controller.store import Store
from clonebox_core.model import HostState, HypervisorInfo, Operation, Resources, VmSpec, VmState

HYPERVISOR = HypervisorInfo(uri="test:///default", libvirt_version="9.0.0", capabilities=())


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    with Store.open(store_url) as s:
        yield s


def _register(store: Store, name: str) -> None:
    r = Resources(8, 8192, 100_000)
    store.upsert_host_registration(name, f"{name}.example:7000", r, r, HYPERVISOR, 1)


def _reserve(store: Store, name: str, host: str) -> None:
    op = Operation(id=f"op-{name}", kind="vm.create", target=f"vms/{name}", request_id="")
    _op, vm = store.reserve_vm(VmSpec(name, vcpus=1, memory_mib=256), host, op)
    assert vm is not None


def test_counts_of_an_empty_store(store: Store) -> None:
    assert store.count_hosts_by_state() == {}
    assert store.count_vms_by_state() == {}


def test_counts_group_by_state(store: Store) -> None:
    for name in ("h1", "h2", "h3"):
        _register(store, name)
    store.heartbeat("h2", serving=False, reason="libvirtd down")
    store.set_host_state("h3", HostState.UNREACHABLE, "no heartbeat")
    assert store.count_hosts_by_state() == {
        HostState.READY: 1,
        HostState.NOT_SERVING: 1,
        HostState.UNREACHABLE: 1,
    }

    for name in ("a", "b", "c", "d"):
        _reserve(store, name, "h1")
    store.update_vm_observed("a", VmState.RUNNING)
    store.update_vm_observed("b", VmState.RUNNING)
    store.update_vm_observed("c", VmState.STOPPED)
    counts = store.count_vms_by_state()
    assert counts[VmState.RUNNING] == 2
    assert counts[VmState.STOPPED] == 1
    assert sum(counts.values()) == 4  # "d" is still in its reserved state
    assert counts == {state: n for state, n in counts.items() if n > 0}

    store.release_vm("a")
    after = store.count_vms_by_state()
    assert after.get(VmState.RUNNING) == 1
    assert sum(after.values()) == 3
