"""Journaled create transactions, rollback at every step, crash recovery and the orphan sweep (fake adapter)."""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from clonebox_agent.adapters import common
from clonebox_agent.adapters.fake import FakeHypervisor
from clonebox_agent.app.service import AgentService
from clonebox_agent.faultinject import hook_from_env, parse
from clonebox_agent.journal.store import Journal, TxnState
from clonebox_core import errors
from clonebox_core.model import CloudInit, DiskSpec, Resources, StepState, VmSpec

SPEC = VmSpec(
    name="web",
    vcpus=1,
    memory_mib=128,
    disks=(DiskSpec("root", size_mib=16), DiskSpec("data", size_mib=8)),
    cloud_init=CloudInit(user_data="#cloud-config\n"),
)
#: every named step of a create, in order; create:commit is the agent's own (after libvirt, before the journal)
STEPS = ["create:folder", "create:disks", "create:seed", "create:define", "create:start", "create:commit"]


class Hook:
    """A step hook that raises at one named step, once."""

    def __init__(self) -> None:
        self.fail_at = ""
        self.seen: list[str] = []

    def __call__(self, step: str) -> None:
        self.seen.append(step)
        if step == self.fail_at:
            self.fail_at = ""
            raise errors.Internal(f"injected at {step}", reason="INJECTED_FAULT")


async def make(tmp_path: Path, fake: FakeHypervisor, hook: Hook | None = None) -> AgentService:
    svc = AgentService(
        "h",
        fake,
        Journal(tmp_path / "journal.db"),
        reserve=Resources(),
        stop_timeout_seconds=1,
        step_hook=hook,
    )
    await svc.start()
    return svc


@pytest.fixture
def hook() -> Hook:
    return Hook()


@pytest.fixture
async def fake(tmp_path: Path, hook: Hook) -> AsyncIterator[FakeHypervisor]:
    f = FakeHypervisor(host_name="h", storage_dir=tmp_path / "storage", step_hook=hook)
    yield f
    await f.close()


async def test_a_create_is_one_committed_transaction(tmp_path: Path, fake: FakeHypervisor, hook: Hook) -> None:
    svc = await make(tmp_path, fake, hook)
    await svc.create(SPEC, request_id="r1")
    [txn] = svc._journal.txns()
    assert (txn.kind, txn.target, txn.request_id, txn.state) == ("vm.create", "web", "r1", TxnState.COMMITTED)
    assert [s.name for s in txn.steps] == ["folder", "disk:root", "disk:data", "seed", "define", "start"]
    assert all(s.state == StepState.DONE and s.identity for s in txn.steps)
    assert [s for s in STEPS if s in hook.seen] == STEPS
    # the committed create and its answer are one record: a retry replays it
    again = await svc.create(SPEC, request_id="r1")
    assert again.name == "web" and len(svc._journal.txns()) == 1
    await svc.close()


@pytest.mark.parametrize("step", STEPS)
async def test_an_error_at_any_step_leaves_nothing_and_a_retry_completes_once(
    tmp_path: Path, fake: FakeHypervisor, hook: Hook, step: str
) -> None:
    svc = await make(tmp_path, fake, hook)
    hook.fail_at = step
    with pytest.raises(errors.Internal):
        await svc.create(SPEC, request_id="r1")
    assert (await fake.inventory()).is_empty()
    [txn] = svc._journal.txns()
    assert txn.state == TxnState.ROLLED_BACK and "INJECTED_FAULT" in txn.error
    assert all(s.state == StepState.UNDONE for s in txn.steps)
    vm = await svc.create(SPEC, request_id="r1")
    assert vm.name == "web" and fake.calls["create"] == 2
    assert [t.state for t in svc._journal.txns()] == [TxnState.COMMITTED, TxnState.ROLLED_BACK]
    await svc.close()


def _reopen(db: Path, txn_id: str) -> None:
    """What a SIGKILL between libvirt and the journal's commit leaves: the transaction still open."""
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE txns SET state='open' WHERE id=?", (txn_id,))
        conn.execute("DELETE FROM requests")


async def test_recovery_at_start_rolls_back_an_interrupted_create(tmp_path: Path, fake: FakeHypervisor) -> None:
    svc = await make(tmp_path, fake)
    await svc.create(SPEC, request_id="r1")
    [txn] = svc._journal.txns()
    await svc.close()
    _reopen(tmp_path / "journal.db", txn.id)

    restarted = await make(tmp_path, fake)  # the same host: libvirt kept what was made
    assert [r.txn_id for r in restarted.recovered] == [txn.id]
    assert {"cb-web"} <= set(restarted.recovered[0].removed)
    assert (await fake.inventory()).is_empty()
    [after] = restarted._journal.txns()
    assert after.state == TxnState.ROLLED_BACK and "interrupted" in after.error
    events = [e for e in restarted._journal.pending_events() if e.action == "recovery.rollback"]
    assert len(events) == 1 and events[0].actor == "system" and events[0].details["transaction"] == txn.id
    # the retry after the crash creates the VM exactly once
    await restarted.create(SPEC, request_id="r1")
    assert [d.name for d in await fake.list()] == ["web"]
    await restarted.close()


async def test_recovery_never_removes_what_the_transaction_did_not_make(tmp_path: Path, fake: FakeHypervisor) -> None:
    svc = await make(tmp_path, fake)
    await svc.create(SPEC, request_id="r1")
    [txn] = svc._journal.txns()
    await svc.close()
    # after the crash someone deleted the VM and another create of the same name made new artifacts
    await fake.delete("web")
    other = await fake.create(SPEC, start=True)
    _reopen(tmp_path / "journal.db", txn.id)

    restarted = await make(tmp_path, fake)
    assert restarted.recovered[0].removed == ()
    assert (await fake.get("web")).uuid == other.uuid  # identities differ: nothing touched
    assert not (await fake.inventory()).is_empty()
    await restarted.close()


async def test_a_step_that_never_recorded_its_artifact_is_left_to_the_sweep(
    tmp_path: Path, fake: FakeHypervisor
) -> None:
    svc = await make(tmp_path, fake)
    # a crash right after a disk was written but before its step was marked done: simulate the file
    journal = svc._journal
    journal.begin_txn("t-crash", "vm.create", "ghost", "r9")
    n = journal.plan_step("t-crash", "disk:root", {"kind": "volume", "name": "cb-ghost.root.qcow2"})
    fake._make_volume("cb-ghost.root.qcow2", "ghost", b"half written")
    assert n == 1
    await svc.close()

    restarted = await make(tmp_path, fake)
    assert restarted.recovered[0].removed == ()
    report = await restarted.recovery.sweep(remove=False)
    assert list(report.orphans) == ["ghost"] and report.removed == {}
    assert any(p.endswith("cb-ghost.root.qcow2") for p in report.orphans["ghost"])
    swept = await restarted.recovery.sweep(remove=True)
    assert list(swept.removed) == ["ghost"]
    assert (await fake.inventory()).is_empty()
    assert [e.action for e in restarted._journal.pending_events()][-1] == "recovery.sweep"
    await restarted.close()


async def test_a_file_already_at_an_overlay_path_survives_a_failed_create(tmp_path: Path, fake: FakeHypervisor) -> None:
    svc = await make(tmp_path, fake)
    pool, squatter = _squat(Path(common.pool_dir(str(fake.storage_dir))))
    fake._volumes["cb-web.data.qcow2"] = str(squatter)  # known to the pool, as libvirt would after a refresh
    with pytest.raises(errors.AlreadyExists):
        await svc.create(SPEC, request_id="r1")
    assert _read(squatter) == b"precious"
    assert not _exists(pool / "cb-web.root.qcow2")  # what the create made is gone
    [txn] = svc._journal.txns()
    assert txn.state == TxnState.ROLLED_BACK
    assert [s.name for s in txn.steps] == ["folder", "disk:root", "disk:data"]
    assert txn.steps[-1].identity is None  # never made, so never undone
    await svc.close()


def _squat(pool: Path) -> tuple[Path, Path]:
    pool.mkdir(parents=True, exist_ok=True)
    squatter = pool / "cb-web.data.qcow2"
    squatter.write_bytes(b"precious")
    return pool, squatter


def _read(path: Path) -> bytes:
    return path.read_bytes()


def _exists(path: Path) -> bool:
    return os.path.exists(path)


def test_fault_injection_is_inert_unless_set() -> None:
    assert hook_from_env({}) is None
    assert hook_from_env({"CLONEBOX_FAULT_INJECTION": ""}) is None
    assert parse("create:disks=kill, create:seed=error") == {"create:disks": "kill", "create:seed": "error"}
    with pytest.raises(errors.InvalidArgument, match="CLONEBOX_FAULT_INJECTION"):
        parse("create:disks=explode")
    hook = hook_from_env({"CLONEBOX_FAULT_INJECTION": "create:seed=error"})
    assert hook is not None
    hook("create:disks")  # other steps pass
    with pytest.raises(errors.Internal):
        hook("create:seed")


def test_journal_keeps_steps_in_order_with_their_undo(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db")
    j.begin_txn("t1", "vm.create", "a", "")
    a = j.plan_step("t1", "folder", {"kind": "folder", "path": "/x"})
    b = j.plan_step("t1", "define", {"kind": "domain", "name": "cb-a"})
    j.step_made("t1", a, {"inode": "7"})
    txn = j.txn("t1")
    assert txn is not None and [(s.n, s.state) for s in txn.steps] == [(1, StepState.DONE), (2, StepState.PLANNED)]
    assert txn.steps[0].undo == {"kind": "folder", "path": "/x"} and json.dumps(txn.steps[0].identity)
    assert b == 2 and [t.id for t in j.txns(state=TxnState.OPEN)] == ["t1"]
    j.close()


async def test_preflight_refuses_a_vm_the_pool_cannot_hold_and_makes_nothing(
    tmp_path: Path, fake: FakeHypervisor
) -> None:
    svc = await make(tmp_path, fake)
    await svc.create(VmSpec(name="small", disks=(DiskSpec("root", size_mib=1),)), request_id="r0")  # pool exists
    huge = VmSpec(name="huge", disks=(DiskSpec("root", size_mib=60 * 2**20),))  # 60 TiB: valid, but no room
    before = await fake.inventory()
    with pytest.raises(errors.FailedPrecondition) as err:
        await svc.create(huge, request_id="r1")
    assert err.value.reason == "POOL_FULL" and "free space" in err.value.message
    assert await fake.inventory() == before
    [rolled, _committed] = svc._journal.txns()
    assert rolled.state == TxnState.ROLLED_BACK and rolled.steps == () and "POOL_FULL" in rolled.error
    await svc.close()
