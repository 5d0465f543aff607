"""``to_thread_uncancelled``: a store write finishes and its result reaches a caller that was cancelled meanwhile."""

from __future__ import annotations

import asyncio
import threading

import pytest

from clonebox_controller.app.uncancelled import to_thread_uncancelled


async def test_the_result_of_a_finished_write_reaches_a_cancelled_caller() -> None:
    entered, release = threading.Event(), threading.Event()
    written: list[str] = []

    def write(name: str) -> str:
        entered.set()
        release.wait(10)
        written.append(name)
        return f"reserved {name}"

    seen: list[tuple[str, bool]] = []

    async def caller() -> None:
        result, cancelled = await to_thread_uncancelled(write, "web")
        seen.append((result, cancelled))
        if cancelled:
            raise asyncio.CancelledError

    task = asyncio.create_task(caller())
    await asyncio.to_thread(entered.wait, 10)
    task.cancel()
    await asyncio.sleep(0.05)
    assert not task.done()  # still waiting for the write: it cannot be abandoned half-way
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert written == ["web"] and seen == [("reserved web", True)]


async def test_without_a_cancel_it_is_a_plain_call_and_errors_pass_through() -> None:
    assert await to_thread_uncancelled(lambda a, b: a + b, 2, 3) == (5, False)

    def fail() -> None:
        raise ValueError("store said no")

    with pytest.raises(ValueError, match="store said no"):
        await to_thread_uncancelled(fail)
