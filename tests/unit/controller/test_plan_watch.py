"""PlanEngine.watch: the versions of a burst go out as one, and the end of a run is never held back."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import pytest

from clonebox_controller.app.plans import PlanEngine, PlanSettings
from clonebox_core.plan import PlanRun, RunState

#: every wait of these tests is bounded, so a bug fails instead of hanging
WAIT = 10.0


class FakeRunStore:
    """A fake of the one store call a watch makes (``get_run``): a run the test changes by hand."""

    def __init__(self) -> None:
        self.run = PlanRun(id="run-1", plan="shop", revision=1, action="up", state=RunState.RUNNING, version=1)
        self.reads = 0

    def get_run(self, run_id: str) -> PlanRun:
        assert run_id == self.run.id
        self.reads += 1
        return self.run


def engine(store: FakeRunStore, min_interval: float) -> PlanEngine:
    # a watch uses only the store; the VM manager, health reader and placer are never called
    none: Any = None
    settings = PlanSettings(watch_poll_seconds=3600, watch_min_interval_seconds=min_interval)
    return PlanEngine(store, none, none, none, settings)


async def next_version(versions: AsyncIterator[PlanRun]) -> int:
    return (await asyncio.wait_for(anext(versions), WAIT)).version


def change(store: FakeRunStore, eng: PlanEngine, *, done: bool = False) -> None:
    """What the engine's write does: a new version of the run, then the announcement."""
    state = RunState.SUCCEEDED if done else store.run.state
    store.run = dataclasses.replace(store.run, version=store.run.version + 1, state=state)
    eng._notify(ended=done)


async def settled() -> None:
    # let the watch take the announcement and go back to waiting (a few loop turns and a thread hop)
    for _ in range(20):
        await asyncio.sleep(0.01)


async def test_versions_within_the_interval_are_coalesced_and_the_end_is_sent_at_once() -> None:
    store = FakeRunStore()
    eng = engine(store, min_interval=3600)
    versions = eng.watch("run-1")
    assert await next_version(versions) == 1
    for _ in range(3):
        change(store, eng)
        await settled()
    reads = store.reads
    change(store, eng, done=True)
    # versions 2-4 were never sent; the end came without waiting out the hour
    assert await next_version(versions) == 5
    assert store.reads == reads + 1
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(anext(versions), WAIT)


async def test_without_an_interval_every_version_is_sent() -> None:
    store = FakeRunStore()
    eng = engine(store, min_interval=0)
    versions = eng.watch("run-1")
    got = [await next_version(versions)]
    for _ in range(3):
        change(store, eng)
        got.append(await next_version(versions))
    change(store, eng, done=True)
    got.append(await next_version(versions))
    assert got == [1, 2, 3, 4, 5]
