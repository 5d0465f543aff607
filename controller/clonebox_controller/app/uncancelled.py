"""Store writes that a cancelled caller must not cut in half."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def to_thread_uncancelled(fn: Callable[..., T], /, *args: Any) -> tuple[T, bool]:
    """Run ``fn(*args)`` in a worker thread to its end; its result and whether the caller was cancelled meanwhile.

    A cancelled ``asyncio.to_thread`` returns at once while the thread still commits, so the caller
    never learns what was written (a reservation nobody releases). Here the caller gets the result and
    handles it (release, or hand it on) before it re-raises ``asyncio.CancelledError`` itself.
    """
    task = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    cancelled = False
    while True:
        try:
            return await asyncio.shield(task), cancelled
        except asyncio.CancelledError:
            if task.cancelled():
                raise
            cancelled = True
