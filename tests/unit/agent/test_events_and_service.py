"""Agent use cases on the fake hypervisor: event history, idempotency by request id, graceful stop."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from clonebox_agent.adapters.fake import FakeHypervisor
from clonebox_agent.app.events import EventLog, VmEventType
from clonebox_agent.app.service import AgentService
from clonebox_agent.journal.store import Journal
from clonebox_core import errors
from clonebox_core.model import DiskSpec, Resources, Revision, Vm, VmSpec, VmState


def vm(name: str) -> Vm:
    return Vm(name=name, host="h", state=VmState.RUNNING, spec=VmSpec(name=name))


async def test_watch_resumes_after_revision_and_sees_live_events() -> None:
    log = EventLog(epoch=3, capacity=100)
    for i in range(3):
        log.append(VmEventType.ADDED, vm(f"v{i}"))
    seen: list[int] = []

    async def consume() -> None:
        async for ev in log.watch(Revision(3, 1)):
            seen.append(ev.revision.sequence)
            if ev.revision.sequence == 5:
                return

    task = asyncio.create_task(consume())
    await asyncio.sleep(0)
    log.append(VmEventType.MODIFIED, vm("v0"))
    log.append(VmEventType.DELETED, vm("v1"))
    await asyncio.wait_for(task, 2)
    assert seen == [2, 3, 4, 5]


@pytest.mark.parametrize("after", [Revision(2, 0), Revision(3, 99)])
async def test_watch_from_other_epoch_or_future_is_expired(after: Revision) -> None:
    log = EventLog(epoch=3, capacity=100)
    log.append(VmEventType.ADDED, vm("a"))
    with pytest.raises(errors.FailedPrecondition) as err:
        async for _ in log.watch(after):
            pass
    assert err.value.reason == "REVISION_EXPIRED"


async def test_watch_from_evicted_sequence_is_expired() -> None:
    log = EventLog(epoch=1, capacity=2)
    for i in range(5):
        log.append(VmEventType.ADDED, vm(f"v{i}"))
    with pytest.raises(errors.FailedPrecondition):
        async for _ in log.watch(Revision(1, 1)):
            pass


def test_epoch_grows_across_restarts(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db")
    first = j.next_epoch()
    j.close()
    j2 = Journal(tmp_path / "j.db")
    assert j2.next_epoch() == first + 1
    j2.close()


@pytest.fixture
async def service(tmp_path: Path):  # type: ignore[no-untyped-def]
    fake = FakeHypervisor(host_name="h", shutdown_delay=0.05)
    svc = AgentService("h", fake, Journal(tmp_path / "j.db"), reserve=Resources(1, 512, 0), stop_timeout_seconds=1)
    await svc.start()
    yield svc, fake
    await svc.close()


SPEC = VmSpec(name="web", vcpus=1, memory_mib=128, disks=(DiskSpec("root", size_mib=16),))


async def test_create_is_idempotent_by_request_id_and_by_spec(service) -> None:  # type: ignore[no-untyped-def]
    svc, fake = service
    a = await svc.create(SPEC, request_id="r1")
    b = await svc.create(SPEC, request_id="r1")
    c = await svc.create(SPEC, request_id="r2")  # same name, same spec: the same VM
    assert a.uuid == b.uuid == c.uuid
    assert fake.calls["create"] == 1
    with pytest.raises(errors.AlreadyExists) as err:
        await svc.create(VmSpec(name="web", memory_mib=256, disks=SPEC.disks), request_id="r3")
    assert err.value.reason == "VM_ALREADY_EXISTS"


async def test_request_id_reused_for_another_vm_is_rejected(service) -> None:  # type: ignore[no-untyped-def]
    svc, _ = service
    await svc.create(SPEC, request_id="r1")
    with pytest.raises(errors.InvalidArgument) as err:
        await svc.delete("other", request_id="r1")
    assert err.value.reason == "REQUEST_ID_REUSED"


async def test_stop_graceful_and_forced(service) -> None:  # type: ignore[no-untyped-def]
    svc, fake = service
    await svc.create(SPEC, request_id="c")
    graceful = await svc.stop("web", request_id="s1")
    assert graceful.vm.state == VmState.STOPPED and not graceful.forced
    await svc.start_vm("web", request_id="st")
    fake.ignore_shutdown = True
    forced = await svc.stop("web", request_id="s2", timeout_seconds=1)
    assert forced.vm.state == VmState.STOPPED and forced.forced


async def test_delete_retry_and_events(service) -> None:  # type: ignore[no-untyped-def]
    svc, _ = service
    start = svc.events.revision
    await svc.create(SPEC, request_id="c")
    assert await svc.delete("web", request_id="d")
    assert await svc.delete("web", request_id="d")  # replayed from the journal, not re-done
    with pytest.raises(errors.NotFound):
        await svc.delete("web", request_id="")

    kinds = []

    async def consume() -> None:
        async for ev in svc.watch(start):
            kinds.append(ev.type)
            if ev.type == VmEventType.DELETED:
                return

    await asyncio.wait_for(consume(), 5)
    assert kinds[0] == VmEventType.ADDED and kinds[-1] == VmEventType.DELETED


async def test_host_info_subtracts_reserve(service) -> None:  # type: ignore[no-untyped-def]
    svc, fake = service
    info = await svc.host_info()
    assert info.allocatable.memory_mib == fake.capacity.memory_mib - 512
    assert info.name == "h"


async def test_an_answer_carries_a_revision_no_earlier_than_the_events_of_its_change(tmp_path: Path) -> None:
    # the event consumer looks a new VM up on the hypervisor: slowed down, it lags behind the create
    fake = FakeHypervisor(host_name="h", delays={"get": 0.3})
    svc = AgentService("h", fake, Journal(tmp_path / "j.db"), reserve=Resources(1, 512, 0), stop_timeout_seconds=1)
    await svc.start()
    try:
        made = await svc.create(SPEC, request_id="c")
        vm, answered = await svc.answer(made)
        assert answered is not None and vm.state is VmState.RUNNING
        events = []
        stream = svc.events.watch(Revision(answered.epoch, 0))
        while True:
            try:
                events.append(await asyncio.wait_for(anext(stream), 1.0))
            except TimeoutError:
                break
        await stream.aclose()
        about_web = [(e.type, e.vm.state, e.revision.sequence) for e in events if e.vm.name == "web"]
        # the hypervisor's "defined" and "started" of the create are both logged, at or before the answer
        assert [(t, s) for t, s, _ in about_web] == [
            (VmEventType.ADDED, VmState.STOPPED),
            (VmEventType.MODIFIED, VmState.RUNNING),
        ]
        assert all(seq <= answered.sequence for *_, seq in about_web), (about_web, answered)
    finally:
        await svc.close()


async def test_an_answer_reports_the_vm_as_of_its_revision_not_as_the_change_left_it(service) -> None:  # type: ignore[no-untyped-def]
    svc, fake = service
    made = await svc.create(SPEC, request_id="c")
    assert made.state is VmState.RUNNING
    # the guest crashes right after the create; its event is delivered, not yet logged
    fake.external_crash("web")
    vm, answered = await svc.answer(made)
    # the crash is at or below the answer's revision, so the answer must say so: a watcher that
    # recorded "running" would skip the crash event and never learn of it
    assert answered is not None and answered.sequence == svc.events.revision.sequence
    assert vm.state is VmState.CRASHED
    # a VM undefined meanwhile: no revision, so that every event about it still counts
    fake.external_undefine("web")
    gone, none = await svc.answer(made)
    assert (gone, none) == (made, None)


async def test_an_answer_keeps_the_hypervisors_reason_for_the_state(service) -> None:  # type: ignore[no-untyped-def]
    svc, _fake = service
    await svc.create(SPEC, request_id="c")
    stopped = await svc.stop("web", request_id="s")
    vm, answered = await svc.answer(stopped.vm)
    # the reason is the hypervisor's for the state now, not the one the VM booted with
    assert answered is not None
    assert (vm.state, vm.state_reason) == (stopped.vm.state, stopped.vm.state_reason) == (VmState.STOPPED, "shutdown")


async def test_an_event_carries_the_reason_for_the_state_it_reports(service) -> None:  # type: ignore[no-untyped-def]
    svc, fake = service
    made = await svc.create(SPEC, request_id="c")
    answered = svc.events.revision
    # the guest powers itself off: only its event tells the agent, no operation re-reads the VM
    fake.guest_poweroff("web")
    await svc.answer(made)  # drains the event queue into the log
    stream = svc.events.watch(answered)
    stopped = await asyncio.wait_for(anext(stream), 1.0)
    await stream.aclose()
    # the reason is the event's, not the "booted" the VM was created with
    assert (stopped.vm.state, stopped.vm.state_reason) == (VmState.STOPPED, "shutdown")
    assert made.state_reason != "shutdown"
