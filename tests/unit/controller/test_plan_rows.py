"""A run's rows saved without waiting (progress only) still reach the store, in order, and survive a failed write."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import Any

import pytest

from clonebox_controller.app.plans import PlanEngine, PlanSettings, _Execution
from clonebox_core.errors import Unavailable
from clonebox_core.model import DiskSpec, VmSpec
from clonebox_core.plan import Plan, PlanRun, PlanVm, RunState, UpdatePolicy, VmRunState, VmStatus

WAIT = 10.0


class FakeRunStore:
    """A fake of the store's ``update_run``: records each write's rows; ``fail`` makes the next writes fail."""

    def __init__(self) -> None:
        self.writes: list[list[tuple[str, VmRunState, str]]] = []
        self.fail = 0
        #: set: the next write blocks until the test releases it (``entered`` says it is blocked)
        self.hold = threading.Event()
        self.entered = threading.Event()
        self.release = threading.Event()

    def update_run(
        self,
        run_id: str,
        *,
        state: RunState | None = None,
        error: str | None = None,
        vms: Sequence[VmStatus] = (),
        audit: object = None,
    ) -> int:
        if self.hold.is_set():
            self.hold.clear()
            self.entered.set()
            assert self.release.wait(WAIT)
        if self.fail:
            self.fail -= 1
            raise Unavailable("database is down", reason="STORE_UNAVAILABLE")
        self.writes.append([(r.service, r.state, r.step) for r in vms])
        return len(self.writes)


def execution(store: FakeRunStore) -> _Execution:
    # only the run's rows are written here: the VM manager, health reader and placer are never called
    none: Any = None
    engine = PlanEngine(store, none, none, none, PlanSettings())  # type: ignore[arg-type]
    vms = tuple(PlanVm(s, VmSpec(f"p-{s}", 1, 64, (DiskSpec("root", size_mib=16),))) for s in ("db", "web"))
    plan = Plan("p", vms, update=UpdatePolicy(max_parallel=2))
    run = PlanRun("run-1", "p", 1, "up", RunState.RUNNING, vms=tuple(VmStatus(v.service, v.spec.name) for v in vms))
    return _Execution(engine, run, plan, "user:test")


async def settled(ex: _Execution) -> None:
    if ex.flusher is not None:
        await asyncio.wait_for(asyncio.gather(ex.flusher, return_exceptions=True), WAIT)


async def test_rows_saved_while_a_background_write_is_in_flight_go_out_in_the_next_one() -> None:
    store = FakeRunStore()
    ex = execution(store)
    store.hold.set()
    await ex._save("db", wait=False, state=VmRunState.CREATING, step="creating")
    assert await asyncio.to_thread(store.entered.wait, WAIT)
    await ex._save("db", wait=False, step="creating on host h1")
    await ex._save("web", wait=False, state=VmRunState.CREATING, step="creating")
    assert store.writes == []  # nothing waited for the write in flight
    store.release.set()
    await settled(ex)
    assert store.writes == [
        [("db", VmRunState.CREATING, "creating")],
        [("db", VmRunState.CREATING, "creating on host h1"), ("web", VmRunState.CREATING, "creating")],
    ]
    assert not ex.pending


async def test_a_failed_background_write_keeps_its_rows_for_the_next_write() -> None:
    store = FakeRunStore()
    ex = execution(store)
    store.fail = 1
    await ex._save("db", wait=False, state=VmRunState.CREATING, step="creating")
    await settled(ex)
    assert store.writes == [] and ex.pending["db"].step == "creating"
    # the next awaited write takes the row that was not written, with its own
    await ex._save("web", state=VmRunState.CREATING, step="creating")
    assert sorted(store.writes[0]) == [
        ("db", VmRunState.CREATING, "creating"),
        ("web", VmRunState.CREATING, "creating"),
    ]
    assert not ex.pending


async def test_a_newer_row_is_not_replaced_by_the_failed_write_of_an_older_one() -> None:
    store = FakeRunStore()
    ex = execution(store)
    store.fail = 1
    store.hold.set()
    await ex._save("db", wait=False, state=VmRunState.CREATING, step="creating")
    await ex._save("db", wait=False, state=VmRunState.WAITING, step="created")  # while the failing write runs
    store.release.set()
    await settled(ex)
    assert ex.pending["db"].state is VmRunState.WAITING
    await ex._finish_run(RunState.SUCCEEDED)
    assert store.writes[-1] == [("db", VmRunState.WAITING, "created")]


async def test_an_awaited_save_raises_when_its_write_fails() -> None:
    store = FakeRunStore()
    ex = execution(store)
    store.fail = 1
    with pytest.raises(Unavailable):
        await ex._save("db", state=VmRunState.READY, step="ready")
    assert ex.pending["db"].state is VmRunState.READY  # written by the next write
