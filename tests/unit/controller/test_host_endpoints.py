"""HostRegistry.client: a host's endpoint is read from the store at most once a second, and never kept stale.

A real SQLite store wrapped by a counting fake (named so), announcing its commits on a real ChangeFeed
as the controller's does; the agent side is a fake gateway that hands out the endpoint it was asked
for. The sweep is not started, so only the calls made here change hosts.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from clonebox_controller.app.hosts import HostRegistry
from clonebox_controller.store import Store
from clonebox_core.changes import ChangeFeed
from clonebox_core.errors import FailedPrecondition
from clonebox_core.model import HostEndpoint, HostState, HypervisorInfo, Resources

R = Resources(2, 2048, 10_000)
HV = HypervisorInfo(uri="test:///default")


class FakeGateway:
    """A fake AgentGateway whose clients are just the (host, address) they were made for."""

    def __init__(self) -> None:
        #: the hosts asked to be dialled afresh, in order
        self.reconnected: list[str] = []

    def client(self, name: str, address: str) -> Any:
        return (name, address)

    def reconnect(self, name: str) -> None:
        self.reconnected.append(name)


class CountingStore:
    """A fake around the real store: counts endpoint reads and can hold one until the test lets it go."""

    def __init__(self, store: Store, feed: ChangeFeed) -> None:
        self._store = store
        self.feed = feed
        self.reads = 0
        self.hold: threading.Event | None = None
        self.holding = threading.Event()

    def get_host_endpoint(self, name: str) -> HostEndpoint:
        self.reads += 1
        endpoint = self._store.get_host_endpoint(name)
        if self.hold is not None:
            self.holding.set()
            assert self.hold.wait(10), "the test never let the read go"
        return endpoint

    def set_host_state(self, name: str, state: HostState, reason: str = "") -> Any:
        if self.hold is not None:
            self.holding.set()
            assert self.hold.wait(10), "the test never let the write go"
        return self._store.set_host_state(name, state, reason)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[tuple[CountingStore, Store]]:
    feed = ChangeFeed()
    with Store.open(f"sqlite:///{tmp_path / 'fleet.db'}", on_change=feed.publish_threadsafe) as store:
        store.upsert_host_registration("h1", "h1:7000", R, R, HV, 1)
        yield CountingStore(store, feed), store


def registry(counting: CountingStore, gateway: FakeGateway | None = None) -> HostRegistry:
    """A registry on the counting store, with the store's announcements delivered on this loop."""
    counting.feed.bind(asyncio.get_running_loop())
    fake: Any = counting
    return HostRegistry(fake, gateway or FakeGateway(), counting.feed, heartbeat_timeout=30, heartbeat_interval=10)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def connected(counting: CountingStore) -> AsyncIterator[tuple[HostRegistry, int]]:
    """A registry with h1's agent connected (and its session id), h1's endpoint read once; closed after."""
    reg = registry(counting)
    _host, session = await reg.register("h1", "h1:7000", R, R, HV, 1)
    try:
        assert await reg.client("h1") == ("h1", "h1:7000")
        yield reg, session
    finally:
        await reg.close()


async def assert_unreachable(reg: HostRegistry) -> None:
    """The next call for h1 is refused: its endpoint says UNREACHABLE."""
    with pytest.raises(FailedPrecondition) as err:
        await reg.client("h1")
    assert err.value.reason == "HOST_UNREACHABLE"


async def test_calls_within_a_second_read_the_endpoint_once(stores: tuple[CountingStore, Store]) -> None:
    counting, _store = stores
    reg = registry(counting)
    clients = [await reg.client("h1") for _ in range(5)]
    assert clients == [("h1", "h1:7000")] * 5
    assert counting.reads == 1


async def test_a_disconnect_is_seen_by_the_next_call(stores: tuple[CountingStore, Store]) -> None:
    counting, _store = stores
    async with connected(counting) as (reg, session):
        await reg.disconnected("h1", session)
        await assert_unreachable(reg)
        # a new registration at another address is used at once
        await reg.register("h1", "h1:7001", R, R, HV, 2)
        assert await reg.client("h1") == ("h1", "h1:7001")


async def test_every_registration_dials_its_agent_afresh(stores: tuple[CountingStore, Store]) -> None:
    counting, _store = stores
    gateway = FakeGateway()
    reg = registry(counting, gateway)
    try:
        _host, session = await reg.register("h1", "h1:7000", R, R, HV, 1)
        assert gateway.reconnected == ["h1"]
        # a heartbeat of the live session is the same agent: its channel is kept
        await reg.heartbeat("h1", True, "", session)
        assert gateway.reconnected == ["h1"]
        # the agent restarted: its new session dials it afresh
        await reg.disconnected("h1", session)
        await reg.register("h1", "h1:7000", R, R, HV, 2)
        assert gateway.reconnected == ["h1", "h1"]
    finally:
        await reg.close()


async def test_a_read_that_overlaps_a_change_is_not_kept(stores: tuple[CountingStore, Store]) -> None:
    counting, store = stores
    reg = registry(counting)
    counting.hold = threading.Event()
    # the read sees READY; while it is under way the host becomes unreachable
    reading = asyncio.create_task(reg.client("h1"))
    assert await asyncio.to_thread(counting.holding.wait, 10)
    store.set_host_state("h1", HostState.UNREACHABLE)  # announced on the loop, not applied yet
    counting.hold.set()
    assert await reading == ("h1", "h1:7000")  # that call was made before the change
    counting.hold = None
    await assert_unreachable(reg)
    assert counting.reads == 2


async def test_a_disconnect_cancelled_during_its_write_still_forgets_the_endpoint(
    stores: tuple[CountingStore, Store],
) -> None:
    # the Connect stream's handler runs disconnected() as it ends, and grpc may cancel it right then
    counting, store = stores
    async with connected(counting) as (reg, session):
        counting.hold = threading.Event()
        ending = asyncio.create_task(reg.disconnected("h1", session))
        assert await asyncio.to_thread(counting.holding.wait, 10)
        ending.cancel()
        await asyncio.sleep(0.05)  # the cancel is delivered while the write is held
        counting.hold.set()
        with pytest.raises(asyncio.CancelledError):
            await ending
        assert store.get_host("h1").state is HostState.UNREACHABLE
        counting.hold = None
        await assert_unreachable(reg)


async def test_any_committed_change_of_a_host_drops_its_endpoint(stores: tuple[CountingStore, Store]) -> None:
    # a writer that is not the registry (another use case, an operator's command) changes the host
    counting, store = stores
    reg = registry(counting)
    assert await reg.client("h1") == ("h1", "h1:7000")
    await asyncio.to_thread(store.set_cordoned, "h1", True)
    assert await reg.client("h1") == ("h1", "h1:7000")
    assert counting.reads == 2
    await asyncio.to_thread(store.set_host_state, "h1", HostState.UNREACHABLE)
    await assert_unreachable(reg)
    assert counting.reads == 3


async def test_a_heartbeat_that_changes_nothing_keeps_the_endpoint(stores: tuple[CountingStore, Store]) -> None:
    counting, _store = stores
    async with connected(counting) as (reg, session):
        await reg.heartbeat("h1", True, "", session)
        assert await reg.client("h1") == ("h1", "h1:7000")
        assert counting.reads == 1
        # a heartbeat that changes the state is announced
        await reg.heartbeat("h1", False, "libvirtd is down", session)
        await reg.client("h1")
        assert counting.reads == 2
