"""The store announces committed changes of watched records (``on_change``), and nothing else."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta

import pytest

from clonebox_controller.store import Store
from clonebox_core.changes import ChangeKey, health_key, host_key, operation_done_key, operation_key, vm_key
from clonebox_core.errors import NotFound
from clonebox_core.health import HealthState
from clonebox_core.model import HostState, Operation, VmState
from tests.unit.store.test_health_store import health
from tests.unit.store.test_store import create_op, register, spec


class Heard:
    """Every batch ``on_change`` was called with."""

    def __init__(self) -> None:
        self.batches: list[set[ChangeKey]] = []

    def __call__(self, keys: Iterable[ChangeKey]) -> None:
        self.batches.append(set(keys))

    def take(self) -> set[ChangeKey]:
        out = set().union(*self.batches) if self.batches else set()
        self.batches.clear()
        return out


@pytest.fixture
def heard() -> Heard:
    return Heard()


@pytest.fixture
def store(store_url: str, heard: Heard) -> Iterator[Store]:
    with Store.open(store_url, on_change=heard) as s:
        yield s


def test_a_vm_s_life_is_announced_under_its_key(store: Store, heard: Heard) -> None:
    register(store, "h1")
    assert heard.take() == {host_key("h1")}
    store.reserve_vm(spec("web"), None, create_op("web"))
    assert heard.take() == {vm_key("web")}
    store.update_vm_observed("web", VmState.RUNNING, "uuid-1", (), "")
    assert heard.take() == {vm_key("web")}
    store.update_vm_observed("web", VmState.RUNNING, "uuid-1", (), "")
    assert heard.take() == set()  # nothing changed: no revision, no announcement
    store.release_vm("web")
    assert heard.take() == {vm_key("web")}


def test_an_operation_s_progress_and_end_are_announced(store: Store, heard: Heard) -> None:
    register(store, "h1")
    store.reserve_vm(spec("web"), None, create_op("web"))
    heard.take()
    op = Operation(id="op-stop", kind="vm.stop", target="vms/web")
    store.begin_operation(op)
    store.update_operation("op-stop", "stopping", 50)
    assert heard.take() == {operation_key("op-stop")}
    store.finish_operation("op-stop")
    # the end has a key of its own, so a wait for it is not woken by every step
    assert heard.take() == {operation_key("op-stop"), operation_done_key("op-stop")}


def test_health_updates_are_announced_per_vm(store: Store, heard: Heard) -> None:
    register(store, "h1")
    heard.take()
    store.apply_health_update("h1", health("web", HealthState.HEALTHY))
    assert heard.take() == {health_key("web")}
    store.mark_health_unknown("h1", "agent went away")
    assert heard.take() == {health_key("web")}


def test_a_transaction_that_fails_announces_nothing(store: Store, heard: Heard) -> None:
    with pytest.raises(NotFound):
        store.update_operation("op-missing", "x", 1)
    assert heard.take() == set()
    assert store.update_vm_observed("ghost", VmState.RUNNING) is None
    assert heard.take() == set()


def test_the_host_endpoint_is_its_address_and_state(store: Store) -> None:
    register(store, "h1")
    endpoint = store.get_host_endpoint("h1")
    assert (endpoint.name, endpoint.address, endpoint.state) == ("h1", "h1.example:7000", HostState.READY)
    store.set_host_state("h1", HostState.UNREACHABLE)
    assert store.get_host_endpoint("h1").state is HostState.UNREACHABLE
    with pytest.raises(NotFound) as exc:
        store.get_host_endpoint("nope")
    assert exc.value.reason == "HOST_NOT_FOUND"


def test_every_change_of_a_host_s_record_is_announced(store: Store, heard: Heard) -> None:
    # the controller drops a host's cached endpoint on these (HostRegistry.client)
    register(store, "h1")
    register(store, "h2")
    assert heard.take() == {host_key("h1"), host_key("h2")}
    store.heartbeat("h1")
    assert heard.take() == set()  # READY again: nothing changed
    store.heartbeat("h1", serving=False, reason="libvirtd down")
    assert heard.take() == {host_key("h1")}
    store.set_host_state("h1", HostState.UNREACHABLE)
    assert heard.take() == {host_key("h1")}
    store.set_cordoned("h2", True)
    assert heard.take() == {host_key("h2")}
    marked = store.mark_unreachable_older_than(datetime.now(UTC) + timedelta(seconds=1))
    assert marked == ["h2"] and heard.take() == {host_key("h2")}
    assert store.mark_unreachable_older_than(datetime.now(UTC) + timedelta(seconds=1)) == []
    assert heard.take() == set()
    store.remove_host("h1")
    assert heard.take() == {host_key("h1")}
    with pytest.raises(NotFound):
        store.set_host_state("h1", HostState.READY)
    assert heard.take() == set()  # a failed write announces nothing
