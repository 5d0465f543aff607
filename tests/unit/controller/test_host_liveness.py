"""The host sweep: silent hosts become unreachable, but not because the controller itself stalled.

A real SQLite store; the agent side is a fake gateway (named so) whose listing never answers, since
these tests are about heartbeats only. Times are short but every wait is bounded and nothing asserts
on how long anything took.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from clonebox_controller.app.hosts import HostRegistry
from clonebox_controller.store import Store
from clonebox_core.changes import ChangeFeed
from clonebox_core.model import HostState, HypervisorInfo, Resources

TIMEOUT = 0.4  # heartbeat timeout of these tests; the sweep runs every 0.2 s


class FakeSilentGateway:
    """A fake AgentGateway: its clients' listings never answer (the sync task just waits)."""

    def client(self, name: str, address: str) -> Any:
        return self

    def reconnect(self, name: str) -> None:
        """Nothing to dial afresh: no channel."""

    async def list_vms(self) -> Any:
        await asyncio.Event().wait()


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[tuple[HostRegistry, Store]]:
    with Store.open(f"sqlite:///{tmp_path / 'fleet.db'}") as store:
        r = Resources(2, 2048, 10_000)
        store.upsert_host_registration("h1", "h1:7000", r, r, HypervisorInfo(uri="test:///default"), 1)
        reg = HostRegistry(store, FakeSilentGateway(), ChangeFeed(), heartbeat_timeout=TIMEOUT, heartbeat_interval=0.2)  # type: ignore[arg-type]
        await reg.heartbeat("h1", True, "", 1)
        await reg.start()
        try:
            yield reg, store
        finally:
            await reg.close()


async def test_a_host_that_stops_sending_heartbeats_becomes_unreachable(
    registry: tuple[HostRegistry, Store],
) -> None:
    _reg, store = registry
    deadline = time.monotonic() + 10
    while store.get_host("h1").state is not HostState.UNREACHABLE:
        assert time.monotonic() < deadline, "h1 never became unreachable"
        await asyncio.sleep(0.05)


async def test_a_stalled_controller_does_not_judge_hosts_by_its_own_stall(
    registry: tuple[HostRegistry, Store], caplog: pytest.LogCaptureFixture
) -> None:
    reg, store = registry
    caplog.set_level(logging.INFO, logger="clonebox_controller.app.hosts")
    for _ in range(3):
        # the event loop is blocked longer than the heartbeat timeout (a CPU burst); the agent's
        # heartbeat sent meanwhile is read only after the sweep's own timer has fired
        time.sleep(TIMEOUT * 1.5)  # noqa: ASYNC251 - blocking the loop is the point
        await asyncio.sleep(0)
        await reg.heartbeat("h1", True, "", 1)
        await asyncio.sleep(0.05)
    assert "missed its heartbeats" not in caplog.text
    assert "sweep woke" in caplog.text  # the sweep noticed the stall and waited for the next round
    assert store.get_host("h1").state is HostState.READY
