"""VmManager.finished_here: a waiter in this process gets the finished operation from the task that ran it."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from clonebox_controller.app.vms import VmManager, new_operation
from clonebox_core.model import Operation

WAIT = 10.0


def manager() -> VmManager:
    # finished_here looks only at the manager's tasks: the store and the hosts are never called
    none: Any = None
    return VmManager(none, none, stop_timeout_seconds=1)


@dataclasses.dataclass
class Waiting:
    """An operation task of a manager, held at ``gate``, and a task waiting for it through ``finished_here``."""

    op: Operation
    gate: asyncio.Event
    task: asyncio.Task[Operation]
    waiter: asyncio.Task[Operation | None]


async def waiting() -> Waiting:
    mgr, gate = manager(), asyncio.Event()
    op = new_operation("vm.create", "vms/web", "r1")

    async def work() -> Operation:
        await gate.wait()
        return dataclasses.replace(op, done=True, progress=100)

    task = asyncio.create_task(work())
    mgr._tasks[op.id] = task
    waiter = asyncio.create_task(mgr.finished_here(op.id))
    await asyncio.sleep(0)  # the waiter is waiting now
    return Waiting(op, gate, task, waiter)


async def test_the_waiter_gets_the_operation_its_task_finished() -> None:
    w = await waiting()
    assert not w.waiter.done()
    w.gate.set()
    finished = await asyncio.wait_for(w.waiter, WAIT)
    assert finished is not None and finished.id == w.op.id and finished.done


async def test_an_operation_this_process_does_not_run_is_left_to_the_store() -> None:
    assert await manager().finished_here("elsewhere") is None


async def test_a_waiter_that_goes_away_does_not_cancel_the_operation() -> None:
    w = await waiting()
    w.waiter.cancel()
    await asyncio.gather(w.waiter, return_exceptions=True)
    assert w.waiter.cancelled() and not w.task.cancelled()
    w.gate.set()
    assert (await asyncio.wait_for(w.task, WAIT)).done


async def test_an_operation_whose_task_is_cancelled_is_left_to_the_store() -> None:
    w = await waiting()
    w.task.cancel()  # the manager closing: the operation resumes in the next process
    assert await asyncio.wait_for(w.waiter, WAIT) is None
