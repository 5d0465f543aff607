"""
In-process wake-ups for code that waits on stored records (an operation to finish, a VM to change).

The fleet store is the truth, and it may be shared by several controller processes, so a waiter
always re-reads the store and always waits with a timeout: a change another process made is seen at
the next read. Within one process, though, the store announces each committed change of a watched
record here, and a waiter wakes at once instead of at its next poll. That is what makes a plan's
dependents start as soon as their dependencies are ready without every waiter reading the store
several times a second.

The store calls :meth:`ChangeFeed.publish_threadsafe` from its worker threads after a commit; waiters
run on the event loop::

    with feed.watch(operation_key(op_id)) as change:
        op = await asyncio.to_thread(store.get_operation, op_id)  # read after watching: nothing is missed
        if not op.done:
            await change.wait(timeout)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple


class ChangeKey(NamedTuple):
    """One watched record: its kind and its name."""

    kind: str
    name: str


#: the kind of ``vm_key``
VM_KIND = "vm"


def vm_key(name: str) -> ChangeKey:
    """The key of a VM's stored record (its state, addresses, spec; announced also when it is released)."""
    return ChangeKey(VM_KIND, name)


def operation_key(op_id: str) -> ChangeKey:
    """The key of an operation's stored record (its step, progress, and its end)."""
    return ChangeKey("operation", op_id)


def operation_done_key(op_id: str) -> ChangeKey:
    """The key announced only when an operation ends (a wait for its end need not wake at every step)."""
    return ChangeKey("operation-done", op_id)


def health_key(vm: str) -> ChangeKey:
    """The key of a VM's current health."""
    return ChangeKey("health", vm)


#: the kind of :func:`host_key` (for :meth:`ChangeFeed.subscribe`)
HOST_KIND = "host"


def host_key(name: str) -> ChangeKey:
    """The key of a host's record: its address, state and cordon (a heartbeat that changes nothing is silent)."""
    return ChangeKey(HOST_KIND, name)


class Change:
    """A registration made by :meth:`ChangeFeed.watch`: wait until one of its keys changed."""

    def __init__(self, future: asyncio.Future[None]) -> None:
        self._future = future

    @property
    def happened(self) -> bool:
        """True once a watched key changed (since the watch began)."""
        return self._future.done()

    async def wait(self, timeout: float) -> bool:
        """Wait until a watched key changes or ``timeout`` seconds pass; True when it changed."""
        if not self._future.done() and timeout > 0:
            await asyncio.wait({self._future}, timeout=timeout)
        return self._future.done()


class ChangeFeed:
    """Announcements of committed changes to watched records, within one process (see the module doc)."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: dict[ChangeKey, set[asyncio.Future[None]]] = {}
        self._subscribers: dict[str, list[Callable[[ChangeKey], None]]] = {}

    def subscribe(self, kind: str, callback: Callable[[ChangeKey], None]) -> None:
        """
        Call ``callback`` on the event loop with every key of ``kind`` announced from now on.

        For caches of stored records: the announcement of a commit runs before the task that made the
        commit resumes, so its next read of the cache misses. ``callback`` must not raise or block.
        """
        self._subscribers.setdefault(kind, []).append(callback)

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Deliver announcements made from other threads on ``loop`` (before that, they are dropped)."""
        self._loop = loop

    def publish_threadsafe(self, keys: Iterable[ChangeKey]) -> None:
        """Announce ``keys`` from any thread (the store's workers, after their commit)."""
        loop = self._loop
        found = tuple(keys)
        if loop is None or not found:
            return
        # a closed loop means the process is stopping: nobody is left to wake
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self.publish, found)

    def publish(self, keys: Iterable[ChangeKey]) -> None:
        """Announce ``keys`` on the event loop: every watch of one of them wakes."""
        for key in keys:
            for callback in self._subscribers.get(key.kind, ()):
                callback(key)
            for future in self._waiters.get(key, ()):
                if not future.done():
                    future.set_result(None)

    @contextlib.contextmanager
    def watch(self, *keys: ChangeKey) -> Iterator[Change]:
        """
        Watch ``keys`` for the duration of the block (on the event loop).

        Read the store inside the block, after the watch began, so that a change committed between
        the read and the wait is not missed.
        """
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        for key in keys:
            self._waiters.setdefault(key, set()).add(future)
        try:
            yield Change(future)
        finally:
            for key in keys:
                waiting = self._waiters.get(key)
                if waiting is not None:
                    waiting.discard(future)
                    if not waiting:
                        del self._waiters[key]

    def watched(self) -> int:
        """How many keys have a waiter now (for tests and metrics: it must return to 0)."""
        return len(self._waiters)
