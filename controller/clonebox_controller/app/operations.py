"""
Operation queries: get, wait and watch.

Waiting re-reads the store, so it sees operations run by another controller sharing it; an operation
this process runs wakes its waiters at once (``ChangeFeed``), so the poll only paces the others.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator

from clonebox_controller.app.ports import FleetStore
from clonebox_core.changes import ChangeFeed, operation_done_key, operation_key
from clonebox_core.model import Operation

#: how often a wait re-reads an operation no announcement woke it for (one run by another controller)
_POLL_SECONDS = 0.5


class OperationQueries:
    """Reads of long-running operations."""

    def __init__(self, store: FleetStore, changes: ChangeFeed | None = None) -> None:
        """``changes``: the store's announcements; without them every wait polls."""
        self._store = store
        self._changes = changes or ChangeFeed()

    async def get(self, op_id: str) -> Operation:
        """One operation (NotFound OPERATION_NOT_FOUND)."""
        return await asyncio.to_thread(self._store.get_operation, op_id)

    async def list(self, limit: int, only_running: bool) -> list[Operation]:
        """Recent operations, newest first."""
        return await asyncio.to_thread(self._store.list_operations, limit, only_running)

    async def watch(self, op_id: str) -> AsyncIterator[Operation]:
        """Every distinct state of the operation until it is done."""
        last: tuple[str, int, bool] | None = None
        while True:
            with self._changes.watch(operation_key(op_id)) as change:
                op = await self.get(op_id)
                key = (op.step, op.progress, op.done)
                if key != last:
                    last = key
                    yield op
                if op.done:
                    return
                await change.wait(_POLL_SECONDS)

    async def wait(self, op_id: str, timeout: float) -> Operation:
        """The operation once done, or as it is when ``timeout`` passes."""
        return await wait_done(self._store, self._changes, op_id, poll_seconds=_POLL_SECONDS, timeout=timeout)


async def wait_done(
    store: FleetStore, changes: ChangeFeed, op_id: str, *, poll_seconds: float, timeout: float = math.inf
) -> Operation:
    """
    The operation once done, or as it is when ``timeout`` passes (NotFound OPERATION_NOT_FOUND).

    It wakes on the operation's end only (``operation_done_key``), not on each of its steps; the store
    is read again every ``poll_seconds`` for an operation another controller runs.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        with changes.watch(operation_done_key(op_id)) as change:
            op = await asyncio.to_thread(store.get_operation, op_id)
            if op.done or loop.time() >= deadline:
                return op
            await change.wait(min(poll_seconds, deadline - loop.time()))
