"""Ordered, resumable history of VM lifecycle events with revisions (epoch, sequence).

The history lives in memory; the epoch is persisted by the journal and changes on every agent start,
so a watcher holding a revision from before a restart is told REVISION_EXPIRED and re-lists instead of
silently missing events. The same happens when its sequence has been evicted from the ring.
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from clonebox_core.errors import FailedPrecondition
from clonebox_core.model import Revision, Vm


class VmEventType(enum.Enum):
    """Kind of change (mirrors ``clonebox.agent.v1.VmEventType``)."""

    ADDED = 1
    MODIFIED = 2
    DELETED = 3


@dataclass(frozen=True)
class VmEvent:
    """One change of one VM."""

    revision: Revision
    type: VmEventType
    vm: Vm
    reason: str = ""


def revision_expired(message: str) -> FailedPrecondition:
    """The error a watcher gets when it must re-list."""
    return FailedPrecondition(message, reason="REVISION_EXPIRED")


class EventLog:
    """Ring buffer of events plus live fan-out to watchers."""

    def __init__(self, epoch: int, capacity: int) -> None:
        self.epoch = epoch
        self._seq = 0
        self._ring: deque[VmEvent] = deque(maxlen=capacity)
        self._watchers: set[asyncio.Queue[VmEvent | None]] = set()

    @property
    def revision(self) -> Revision:
        """Revision of the newest event (sequence 0 before the first)."""
        return Revision(self.epoch, self._seq)

    def append(self, type_: VmEventType, vm: Vm, reason: str = "") -> VmEvent:
        """Record an event and hand it to every watcher; call on the event loop thread."""
        self._seq += 1
        event = VmEvent(Revision(self.epoch, self._seq), type_, vm, reason)
        self._ring.append(event)
        for q in self._watchers:
            q.put_nowait(event)
        return event

    def close(self) -> None:
        """End every watch."""
        for q in self._watchers:
            q.put_nowait(None)

    async def watch(self, after: Revision | None) -> AsyncIterator[VmEvent]:
        """Events after ``after`` (or from now), then live ones, until closed."""
        queue: asyncio.Queue[VmEvent | None] = asyncio.Queue()
        # register before reading the backlog so nothing falls between the two
        self._watchers.add(queue)
        try:
            last = self._seq
            if after is not None:
                if after.epoch != self.epoch:
                    raise revision_expired(
                        f"revision epoch {after.epoch} is not the agent's current epoch {self.epoch}: re-list"
                    )
                oldest = self._ring[0].revision.sequence if self._ring else self._seq + 1
                if after.sequence > self._seq or (after.sequence < oldest - 1 and after.sequence < self._seq):
                    raise revision_expired(
                        f"revision {after.epoch}/{after.sequence} is no longer in the event history: re-list"
                    )
                last = after.sequence
                for event in list(self._ring):
                    if event.revision.sequence > last:
                        last = event.revision.sequence
                        yield event
            while True:
                item = await queue.get()
                if item is None:
                    return
                if item.revision.sequence > last:
                    last = item.revision.sequence
                    yield item
        finally:
            self._watchers.discard(queue)
