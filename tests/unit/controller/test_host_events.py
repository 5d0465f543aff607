"""HostRegistry applies an agent's VM events to the store, except while an operation owns the VM's state.

A real SQLite store; the agent side is a fake gateway (named so) that is never called here: the events
are handed to the registry's event handler directly, as ``_sync`` does for each one it receives.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from clonebox_controller.app.hosts import HostRegistry
from clonebox_controller.store import Store
from clonebox_core.changes import ChangeFeed
from clonebox_core.model import HypervisorInfo, Operation, Resources, Vm, VmSpec, VmState

R = Resources(8, 8192, 100_000)
HV = HypervisorInfo(uri="test:///default")


class FakeGateway:
    """A fake AgentGateway: these tests never reach an agent."""

    def client(self, name: str, address: str) -> Any:
        raise AssertionError(f"no agent call expected (host {name} at {address})")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(f"sqlite:///{tmp_path / 'fleet.db'}") as store:
        store.upsert_host_registration("h1", "h1:7000", R, R, HV, 1)
        yield store


def report(state: VmState) -> Vm:
    """The VM ``web`` as the agent of h1 reports it (stopped without addresses, as libvirt does)."""
    return Vm(name="web", host="h1", state=state, spec=VmSpec(name="web"), uuid="uuid-web")


def creating(store: Store) -> None:
    store.reserve_vm(VmSpec(name="web"), "h1", Operation(id="op-1", kind="vm.create", target="vms/web"))
    store.update_operation("op-1", "creating on host h1", 20, vm_state=VmState.CREATING)


async def test_events_about_a_vm_being_created_wait_for_its_operation(store: Store) -> None:
    reg = HostRegistry(store, FakeGateway(), ChangeFeed(), heartbeat_timeout=30, heartbeat_interval=10)  # type: ignore[arg-type]
    try:
        creating(store)
        # libvirt defines the domain (stopped), then starts it: neither may race the create's result
        await reg._apply("h1", report(VmState.STOPPED), deleted=False)
        await reg._apply("h1", report(VmState.RUNNING), deleted=False)
        assert store.get_vm("web").state is VmState.CREATING
        store.finish_operation("op-1", observed=report(VmState.RUNNING))
        assert store.get_vm("web").state is VmState.RUNNING
        # once the operation has ended, the agent's events are the news again
        await reg._apply("h1", report(VmState.STOPPED), deleted=False)
        stopped = store.get_vm("web")
        assert (stopped.state, stopped.uuid) == (VmState.STOPPED, "uuid-web")
    finally:
        await reg.close()


async def test_a_vm_that_vanishes_while_it_is_created_is_left_to_the_create(store: Store) -> None:
    reg = HostRegistry(store, FakeGateway(), ChangeFeed(), heartbeat_timeout=30, heartbeat_interval=10)  # type: ignore[arg-type]
    try:
        creating(store)
        await reg._apply("h1", report(VmState.RUNNING), deleted=True)
        assert store.get_vm("web").state is VmState.CREATING
        store.finish_operation("op-1", observed=report(VmState.RUNNING))
        await reg._apply("h1", report(VmState.RUNNING), deleted=True)
        gone = store.get_vm("web")
        assert (gone.state, gone.state_reason) == (VmState.FAILED, "vanished from host")
    finally:
        await reg.close()
