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
