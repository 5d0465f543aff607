"""
Operation queries: get, wait and watch.

Waiting re-reads the store, so it sees operations run by another controller sharing it; an operation
this process runs wakes its waiters at once (``ChangeFeed``), so the poll only paces the others.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from clonebox_controller.app.ports import FleetStore
from clonebox_core.changes import ChangeFeed, operation_key
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
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            with self._changes.watch(operation_key(op_id)) as change:
                op = await self.get(op_id)
                if op.done or loop.time() >= deadline:
                    return op
                await change.wait(min(_POLL_SECONDS, deadline - loop.time()))
