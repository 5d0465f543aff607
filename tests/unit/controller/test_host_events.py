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


class CountingReads:
    """A fake around the real store: counts ``get_vm`` reads, passes everything on."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.reads = 0

    def get_vm(self, name: str) -> Vm:
        self.reads += 1
        return self._store.get_vm(name)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


@pytest.fixture
async def owned(tmp_path: Path) -> AsyncIterator[tuple[Store, HostRegistry, CountingReads]]:
    """As ``announced``, with the registry's reads of VM records counted; ``web`` is being created."""
    feed = ChangeFeed()
    feed.bind(asyncio.get_running_loop())
    with Store.open(f"sqlite:///{tmp_path / 'owned.db'}", on_change=feed.publish_threadsafe) as store:
        store.upsert_host_registration("h1", "h1:7000", R, R, HV, 1)
        creating(store)
        counting = CountingReads(store)
        reg = HostRegistry(counting, FakeGateway(), feed, heartbeat_timeout=30, heartbeat_interval=10)  # type: ignore[arg-type]
        try:
            yield store, reg, counting
        finally:
            await reg.close()


async def settle(reg: HostRegistry) -> None:
    """Let the registry's retries of held events run their course on the loop."""
    for _ in range(50):
        if not reg._retries:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("held events still being retried")


async def test_an_owned_vms_events_are_held_without_a_read_and_dropped_when_the_answer_covers_them(
    owned: tuple[Store, HostRegistry, CountingReads],
) -> None:
    store, reg, counting = owned
    reg.own("web")
    # the agent's "defined" and "started" come just before its answer
    await reg._apply("h1", report(VmState.STOPPED), deleted=False, revision=Revision(1, 1))
    await reg._apply("h1", report(VmState.RUNNING), deleted=False, revision=Revision(1, 2))
    store.finish_operation("op-1", observed=report(VmState.RUNNING), revision=Revision(1, 2))
    await asyncio.sleep(0.05)  # the end's announcement reaches the registry: still owned, still held
    assert reg._held
    reg.disown("web", Revision(1, 2))
    await settle(reg)
    assert counting.reads == 0 and not reg._held
    assert store.get_vm("web").state is VmState.RUNNING


@pytest.mark.parametrize(
    ("event", "answered", "disowned", "recorded"),
    [
        # the guest crashed right after the agent answered at 1/2: news the answer does not have
        ((VmState.CRASHED, Revision(1, 3)), (VmState.RUNNING, Revision(1, 2)), Revision(1, 2), VmState.CRASHED),
        # the operation failed without an answer: nothing in memory says what the agent did, the store decides
        ((VmState.RUNNING, Revision(1, 2)), (VmState.STOPPED, Revision(1, 1)), None, VmState.RUNNING),
    ],
)
async def test_an_owned_vms_event_the_answer_does_not_cover_is_recorded_the_stores_way_at_its_end(
    owned: tuple[Store, HostRegistry, CountingReads],
    event: tuple[VmState, Revision],
    answered: tuple[VmState, Revision],
    disowned: Revision | None,
    recorded: VmState,
) -> None:
    store, reg, counting = owned
    reg.own("web")
    await reg._apply("h1", report(event[0]), deleted=False, revision=event[1])
    store.finish_operation("op-1", observed=report(answered[0]), revision=answered[1])
    reg.disown("web", disowned)
    await settle(reg)
    assert store.get_vm("web").state is recorded and counting.reads == 1


async def test_a_vm_owned_twice_holds_its_events_until_both_operations_end(
    owned: tuple[Store, HostRegistry, CountingReads],
) -> None:
    store, reg, counting = owned
    reg.own("web")
    reg.own("web")
    await reg._apply("h1", report(VmState.CRASHED), deleted=False, revision=Revision(1, 3))
    store.finish_operation("op-1", observed=report(VmState.RUNNING), revision=Revision(1, 2))
    reg.disown("web", Revision(1, 2))
    await settle(reg)
    assert reg._held and counting.reads == 0 and store.get_vm("web").state is VmState.RUNNING
    reg.disown("web", Revision(1, 2))
    await settle(reg)
    assert not reg._held and store.get_vm("web").state is VmState.CRASHED
