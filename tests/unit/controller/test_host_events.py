"""HostRegistry applies an agent's VM events to the store, except while an operation owns the VM's state.

A real SQLite store; the agent side is a fake gateway (named so) that is never called here: the events
are handed to the registry's event handler directly, as ``_sync`` does for each one it receives.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from clonebox_controller.app.hosts import HostRegistry
from clonebox_controller.store import Store
from clonebox_core.changes import ChangeFeed
from clonebox_core.model import HypervisorInfo, Operation, Resources, Revision, Vm, VmSpec, VmState

R = Resources(8, 8192, 100_000)
HV = HypervisorInfo(uri="test:///default")


class FakeGateway:
    """A fake AgentGateway: these tests never reach an agent."""

    def client(self, name: str, address: str) -> Any:
        raise AssertionError(f"no agent call expected (host {name} at {address})")

    def reconnect(self, name: str) -> None:
        """Nothing to dial afresh: no channel."""


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


async def test_an_event_that_arrives_after_its_operations_answer_is_not_applied(store: Store) -> None:
    reg = HostRegistry(store, FakeGateway(), ChangeFeed(), heartbeat_timeout=30, heartbeat_interval=10)  # type: ignore[arg-type]
    try:
        creating(store)
        # the agent answered the create at its revision 1/2, after its events "defined" (1/1) and
        # "started" (1/2); the watch stream delivers them after the answer was recorded
        store.finish_operation("op-1", observed=report(VmState.RUNNING), revision=Revision(1, 2))
        await reg._apply("h1", report(VmState.STOPPED), deleted=False, revision=Revision(1, 1))
        await reg._apply("h1", report(VmState.RUNNING), deleted=False, revision=Revision(1, 2))
        assert store.get_vm("web").state is VmState.RUNNING
        # news after the answer is applied: the guest shut down
        await reg._apply("h1", report(VmState.STOPPED), deleted=False, revision=Revision(1, 3))
        assert store.get_vm("web").state is VmState.STOPPED
        # an "undefined" the agent sent before that (of an earlier VM of this name), late, fails nothing
        await reg._apply("h1", report(VmState.STOPPED), deleted=True, revision=Revision(1, 1))
        assert store.get_vm("web").state is VmState.STOPPED
    finally:
        await reg.close()


@pytest.fixture
async def announced(tmp_path: Path) -> AsyncIterator[tuple[Store, HostRegistry]]:
    """A store that announces its commits to the registry's change feed, as the controller wires them."""
    feed = ChangeFeed()
    feed.bind(asyncio.get_running_loop())
    with Store.open(f"sqlite:///{tmp_path / 'announced.db'}", on_change=feed.publish_threadsafe) as store:
        store.upsert_host_registration("h1", "h1:7000", R, R, HV, 1)
        reg = HostRegistry(store, FakeGateway(), feed, heartbeat_timeout=30, heartbeat_interval=10)  # type: ignore[arg-type]
        try:
            yield store, reg
        finally:
            await reg.close()


async def test_an_event_that_came_during_the_operation_after_its_answer_is_applied_at_its_end(
    announced: tuple[Store, HostRegistry],
) -> None:
    store, reg = announced
    creating(store)
    # the agent answered at 1/2; the guest crashed right after (1/3), and that event came before the
    # controller recorded the answer: held, not lost
    await reg._apply("h1", report(VmState.STOPPED), deleted=False, revision=Revision(1, 1))
    await reg._apply("h1", report(VmState.CRASHED), deleted=False, revision=Revision(1, 3))
    assert store.get_vm("web").state is VmState.CREATING
    store.finish_operation("op-1", observed=report(VmState.RUNNING), revision=Revision(1, 2))
    for _ in range(100):  # the retry runs on the loop once the end is announced
        if store.get_vm("web").state is VmState.CRASHED:
            break
        await asyncio.sleep(0.02)
    assert store.get_vm("web").state is VmState.CRASHED


async def test_a_held_event_the_answer_covers_is_dropped_at_the_operations_end(
    announced: tuple[Store, HostRegistry],
) -> None:
    store, reg = announced
    creating(store)
    await reg._apply("h1", report(VmState.STOPPED), deleted=False, revision=Revision(1, 1))
    store.finish_operation("op-1", observed=report(VmState.RUNNING), revision=Revision(1, 2))
    for _ in range(20):  # give the retry its turns on the loop
        await asyncio.sleep(0.02)
    assert store.get_vm("web").state is VmState.RUNNING and not reg._held and not reg._retries


async def test_a_held_event_of_an_agent_killed_during_the_create_is_dropped_at_its_end(
    announced: tuple[Store, HostRegistry],
) -> None:
    store, reg = announced
    creating(store)
    # the first try's domain started (epoch 1), then the agent was killed; the event was held
    first_try = Vm(name="web", host="h1", state=VmState.RUNNING, spec=VmSpec(name="web"), uuid="uuid-first-try")
    await reg._apply("h1", first_try, deleted=False, revision=Revision(1, 3))
    # the restarted agent (epoch 2) rolled the first try back and made the VM again: that is the answer
    store.upsert_host_registration("h1", "h1:7000", R, R, HV, 2)
    store.finish_operation("op-1", observed=report(VmState.RUNNING), revision=Revision(2, 2))
    for _ in range(20):  # give the retry its turns on the loop
        await asyncio.sleep(0.02)
    assert store.get_vm("web").uuid == "uuid-web" and not reg._held and not reg._retries
