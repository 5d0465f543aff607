"""Snapshot use cases on the fake: create/list/restore/delete, idempotency, audit, the delete-VM rule,
retention (prune and its scheduler), export and import with every refusal."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sqlite3
import subprocess
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from clonebox_agent.adapters.common import Fault
from clonebox_agent.adapters.fake import FakeHypervisor
from clonebox_agent.app.service import AgentService
from clonebox_agent.app.snapshots import SnapshotManager, SnapshotSettings
from clonebox_agent.journal.store import Journal, JournalStepLog, TxnState
from clonebox_core.audit.event import AuditEvent
from clonebox_core.errors import (
    AlreadyExists,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
)
from clonebox_core.model import DiskSpec, Resources, SharedFolder, VmSpec, VmState
from clonebox_core.snapshots import (
    ImageChunk,
    ImageDisk,
    ImageHeader,
    ImagePart,
    ImageTrailer,
    SnapshotKind,
    SnapshotPolicy,
)


class Clock:
    """A settable clock: snapshot names and retention use it."""

    def __init__(self) -> None:
        self.now = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def tick(self, seconds: float = 1.0) -> None:
        self.now += timedelta(seconds=seconds)


@dataclass
class Env:
    fake: FakeHypervisor
    svc: AgentService
    mgr: SnapshotManager
    journal: Journal
    clock: Clock
    storage: Path

    def events(self, action: str) -> list[AuditEvent]:
        return [e for e in self.journal.pending_events(10_000) if e.action == action]

    def temp_files(self) -> list[str]:
        return [
            os.path.join(dp, f)
            for sub in ("exports", "imports")
            for dp, _dn, fns in os.walk(self.storage / sub)
            for f in fns
        ] + [d for sub in ("exports", "imports") for d in os.listdir(self.storage / sub)]


def spec(name: str = "web", *, shared: Path | None = None, disks: int = 1) -> VmSpec:
    return VmSpec(
        name=name,
        vcpus=1,
        memory_mib=128,
        disks=tuple(DiskSpec(f"d{i}", size_mib=16) for i in range(disks)),
        shared_folders=(SharedFolder(str(shared), "share0"),) if shared is not None else (),
    )


async def make_env(tmp: Path, **settings: int) -> Env:
    storage = tmp / "storage"
    fake = FakeHypervisor(host_name="h", storage_dir=storage, shared_roots=[str(tmp)], shutdown_delay=0.01)
    journal = Journal(tmp / "journal.db")
    svc = AgentService("h", fake, journal, reserve=Resources(0, 0, 0), stop_timeout_seconds=1)
    await svc.start()
    clock = Clock()
    mgr = SnapshotManager(svc, fake, SnapshotSettings(storage_dir=str(storage), **settings), clock=clock)
    await mgr.start(scheduler=False)
    return Env(fake, svc, mgr, journal, clock, storage)


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    e = await make_env(tmp_path)
    yield e
    await e.mgr.close()
    await e.svc.close()
    e.journal.close()


async def vm(env: Env, name: str = "web", *, start: bool = True, **kw: object) -> None:
    await env.svc.create(spec(name, **kw), request_id="", start=start)  # type: ignore[arg-type]


# ---- create / list ---------------------------------------------------------------------------------


async def test_create_defaults_metadata_and_tree(env: Env) -> None:
    await vm(env)
    a = await env.mgr.create("web", description="first", tags={"env": "dev"}, creator="spiffe://x/user/alice")
    assert a.name == "snap-20300101-120000" and a.kind == SnapshotKind.INTERNAL and a.has_memory
    assert (a.description, dict(a.tags), a.creator, a.current) == (
        "first",
        {"env": "dev"},
        "spiffe://x/user/alice",
        True,
    )
    env.clock.tick()
    b = await env.mgr.create("web", name="b")
    listed = await env.mgr.list("web")
    assert [s.name for s in listed] == [a.name, "b"]
    assert listed[0].children == ("b",) and listed[1].parent == a.name and listed[1].current
    assert listed[0].description == "first" and b.creator  # the caller (anonymous outside an RPC)
    [txn, *_] = env.journal.txns()
    assert (txn.kind, txn.state, [s.name for s in txn.steps]) == ("snapshot.create", TxnState.COMMITTED, ["snapshot:b"])
    [ev] = [e for e in env.events("snapshot.create") if e.resource.endswith("/snapshots/b")]
    assert ev.resource == "hosts/h/vms/web/snapshots/b" and ev.outcome == "succeeded"


async def test_create_validation_names_the_field(env: Env) -> None:
    await vm(env)
    cases: list[tuple[dict[str, object], str]] = [
        ({"name": "Bad_Name"}, "name"),
        ({"tags": {f"k{i}": "v" for i in range(33)}}, "tags"),
        ({"tags": {"k": "v" * 257}}, "tags"),
        ({"description": "x" * 5000}, "description"),
    ]
    for kw, field in cases:
        with pytest.raises(InvalidArgument) as info:
            await env.mgr.create("web", **kw)  # type: ignore[arg-type]
        assert info.value.metadata["field"] == field
    with pytest.raises(InvalidArgument):
        await env.mgr.create("Web")
    await env.mgr.create("web", name="ok", tags={f"k{i}": "v" * 256 for i in range(32)})


async def test_create_is_idempotent_by_request_id(env: Env) -> None:
    await vm(env)
    a = await env.mgr.create("web", name="a", request_id="r1")
    again = await env.mgr.create("web", name="a", request_id="r1")
    assert again.name == a.name and len(await env.mgr.list("web")) == 1
    assert len(env.events("snapshot.create")) == 1
    with pytest.raises(AlreadyExists) as info:
        await env.mgr.create("web", name="a", request_id="r2")
    assert info.value.reason == "SNAPSHOT_ALREADY_EXISTS"
    [failed] = [t for t in env.journal.txns() if t.request_id == "r2"]
    assert failed.state == TxnState.ROLLED_BACK


async def test_shared_folder_refusal_and_disk_only(env: Env, tmp_path: Path) -> None:
    await vm(env, shared=tmp_path)
    with pytest.raises(FailedPrecondition) as info:
        await env.mgr.create("web", name="a")
    assert info.value.reason == "SNAPSHOT_BLOCKED_BY_SHARED_FOLDER" and "--disk-only --quiesce" in info.value.message
    snap = await env.mgr.create("web", name="a", kind=SnapshotKind.EXTERNAL, quiesce=True)
    assert snap.quiesced and not snap.has_memory


async def test_commit_failure_rolls_the_snapshot_back(tmp_path: Path) -> None:
    env = await make_env(tmp_path)
    await vm(env)
    seen: list[str] = []

    def hook(step: str) -> None:
        seen.append(step)
        raise Internal("journal gone", reason="INJECTED_FAULT")

    env.mgr._step_hook = hook
    with pytest.raises(Internal):
        await env.mgr.create("web", name="a", request_id="r1")
    assert seen == ["snapshot:commit"] and await env.mgr.list("web") == []
    [txn, *_] = env.journal.txns()
    assert txn.state == TxnState.ROLLED_BACK and [s.state.value for s in txn.steps] == ["undone"]
    assert env.events("recovery.rollback")
    await env.svc.close()
    env.journal.close()


async def test_crash_mid_create_is_rolled_back_at_start(tmp_path: Path) -> None:
    env = await make_env(tmp_path)
    await vm(env)
    # the journal says the step was done but the transaction never finished: a crash
    txn_id = "t-crash"
    env.journal.begin_txn(txn_id, "snapshot.create", "web", "r9")
    await env.fake.create_snapshot("web", "half", kind=SnapshotKind.INTERNAL, steps=JournalStepLog(env.journal, txn_id))
    assert [s.name for s in await env.mgr.list("web")] == ["half"]
    rolled = await env.svc.recovery.roll_back_open()
    assert [r.txn_id for r in rolled] == [txn_id] and await env.mgr.list("web") == []
    await env.svc.close()
    env.journal.close()


# ---- restore -------------------------------------------------------------------------------------


async def test_restore_restores_disks_keeps_running_and_takes_a_backup(env: Env) -> None:
    await vm(env)
    env.fake.disk_state["web"] = "v1"
    await env.mgr.create("web", name="base")
    env.fake.disk_state["web"] = "v2"
    env.clock.tick(60)
    restored, backup = await env.mgr.restore("web", "base", request_id="r1", creator="alice")
    assert env.fake.disk_state["web"] == "v1" and restored.state == VmState.RUNNING
    assert backup is not None and backup.name == "pre-restore-20300101-120100"
    assert backup.automatic and backup.reason == "before restore of base" and backup.creator == "system"
    # the backup holds v2: restoring it gives the pre-restore state back
    await env.mgr.restore("web", backup.name, no_backup=True)
    assert env.fake.disk_state["web"] == "v2"
    [ev, *_] = env.events("snapshot.restore")
    assert (
        ev.resource == "hosts/h/vms/web/snapshots/base" and ev.actor == "alice" and ev.details["backup"] == backup.name
    )
    # retry: same answer, nothing done again
    _, again_backup = await env.mgr.restore("web", "base", request_id="r1")
    assert again_backup is not None and again_backup.name == backup.name and env.fake.disk_state["web"] == "v2"


async def test_restore_no_backup_no_start_and_stopped_vm(env: Env) -> None:
    await vm(env)
    await env.mgr.create("web", name="base")
    restored, backup = await env.mgr.restore("web", "base", no_backup=True, no_start=True)
    assert backup is None and restored.state == VmState.STOPPED
    assert [s.name for s in await env.mgr.list("web")] == ["base"]
    restored, _ = await env.mgr.restore("web", "base", no_backup=True)
    assert restored.state == VmState.STOPPED  # a stopped VM stays stopped


async def test_restore_unknown_snapshot_takes_no_backup(env: Env) -> None:
    await vm(env)
    with pytest.raises(NotFound) as info:
        await env.mgr.restore("web", "nope")
    assert info.value.reason == "SNAPSHOT_NOT_FOUND" and await env.mgr.list("web") == []


async def test_restore_backup_of_running_vm_with_share_is_disk_only(env: Env, tmp_path: Path) -> None:
    await vm(env, shared=tmp_path)
    await env.mgr.create("web", name="base", kind=SnapshotKind.EXTERNAL)
    _, backup = await env.mgr.restore("web", "base")
    assert backup is not None and backup.kind == SnapshotKind.EXTERNAL


async def test_restore_backup_takes_the_kind_of_the_vms_snapshots(env: Env) -> None:
    # a VM without shared folders whose snapshots are external: an internal backup would be a kind conflict
    await vm(env)
    await env.mgr.create("web", name="base", kind=SnapshotKind.EXTERNAL)
    _, backup = await env.mgr.restore("web", "base")
    assert backup is not None and backup.kind == SnapshotKind.EXTERNAL
    # and one with internal snapshots keeps internal ones
    await vm(env, "db")
    await env.mgr.create("db", name="base")
    _, backup = await env.mgr.restore("db", "base")
    assert backup is not None and backup.kind == SnapshotKind.INTERNAL and backup.has_memory


async def test_restore_refuses_an_impossible_backup_and_changes_nothing(env: Env, tmp_path: Path) -> None:
    # internal snapshots taken while stopped; running with a shared folder QEMU cannot save the memory
    await vm(env, start=False, shared=tmp_path)
    env.fake.disk_state["web"] = "v1"
    await env.mgr.create("web", name="base")
    env.fake.disk_state["web"] = "v2"
    await env.svc.start_vm("web", request_id="")
    with pytest.raises(FailedPrecondition) as info:
        await env.mgr.restore("web", "base")
    assert info.value.reason == "SNAPSHOT_BLOCKED_BY_SHARED_FOLDER" and "--no-backup" in info.value.message
    assert env.fake.disk_state["web"] == "v2" and [s.name for s in await env.mgr.list("web")] == ["base"]
    assert (await env.svc.get("web")).state == VmState.RUNNING
    # without a backup it restores
    restored, backup = await env.mgr.restore("web", "base", no_backup=True)
    assert backup is None and env.fake.disk_state["web"] == "v1" and restored.state == VmState.RUNNING


async def test_restore_is_a_journaled_transaction_with_a_commit_point(env: Env) -> None:
    await vm(env)
    await env.mgr.create("web", name="base")
    await env.mgr.restore("web", "base", no_backup=True, request_id="r1")
    txn = next(t for t in env.journal.txns() if t.kind == "snapshot.restore")
    assert txn.state == TxnState.COMMITTED and txn.request_id == "r1"
    assert [s.name for s in txn.steps] == ["stop", "swap", "retire"]
    assert env.events("snapshot.restore")[0].details["transaction"] == txn.id


async def test_a_failed_revert_is_rolled_back_and_the_vm_runs_again(env: Env) -> None:
    await vm(env)
    env.fake.disk_state["web"] = "v1"
    await env.mgr.create("web", name="base")
    await env.mgr.create("web", name="later")
    env.fake.disk_state["web"] = "v2"
    env.fake.faults.fail_on["revert:swapped"] = Fault(Internal("injected"))
    with pytest.raises(Internal):
        await env.mgr.restore("web", "base", no_backup=True)
    assert env.fake.disk_state["web"] == "v2" and (await env.svc.get("web")).state == VmState.RUNNING
    assert [s.name for s in await env.mgr.list("web") if s.current] == ["later"]
    txn = next(t for t in env.journal.txns() if t.kind == "snapshot.restore")
    assert txn.state == TxnState.ROLLED_BACK and "injected" in txn.error
    assert all(s.state.value == "undone" for s in txn.steps) and not env.events("snapshot.restore")


def _cut_short(db: Path, txn_id: str, *, drop_from: str = "") -> None:
    """What a SIGKILL leaves: the transaction open; with ``drop_from`` the steps from that one on never ran."""
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE txns SET state='open' WHERE id=?", (txn_id,))
        if drop_from:
            (n,) = conn.execute("SELECT n FROM txn_steps WHERE txn_id=? AND name=?", (txn_id, drop_from)).fetchone()
            conn.execute("DELETE FROM txn_steps WHERE txn_id=? AND n>=?", (txn_id, n))


async def test_recovery_undoes_a_restore_cut_short_before_its_commit_point(env: Env, tmp_path: Path) -> None:
    await vm(env)
    env.fake.disk_state["web"] = "v1"
    await env.mgr.create("web", name="base")
    await env.mgr.create("web", name="later")
    env.fake.disk_state["web"] = "v2"
    txn_id = "t-restore"
    env.journal.begin_txn(txn_id, "snapshot.restore", "web", "r9")
    await env.fake.revert_snapshot("web", "base", start=False, steps=JournalStepLog(env.journal, txn_id))
    _cut_short(tmp_path / "journal.db", txn_id, drop_from="retire")  # killed after the swap, stopped
    [rolled] = await env.svc.recovery.roll_back_open()
    assert rolled.txn_id == txn_id and not rolled.forward
    assert env.fake.disk_state["web"] == "v2" and (await env.svc.get("web")).state == VmState.RUNNING
    assert [s.name for s in await env.mgr.list("web") if s.current] == ["later"]
    assert env.journal.txn(txn_id).state == TxnState.ROLLED_BACK  # type: ignore[union-attr]
    assert env.events("recovery.rollback")


async def test_recovery_finishes_a_restore_cut_short_after_its_commit_point(env: Env, tmp_path: Path) -> None:
    await vm(env)
    env.fake.disk_state["web"] = "v1"
    await env.mgr.create("web", name="base")
    env.fake.disk_state["web"] = "v2"
    txn_id = "t-restore"
    env.journal.begin_txn(txn_id, "snapshot.restore", "web", "r9")
    await env.fake.revert_snapshot("web", "base", start=True, steps=JournalStepLog(env.journal, txn_id))
    _cut_short(tmp_path / "journal.db", txn_id)  # killed between the commit point and the journal's commit
    [done] = await env.svc.recovery.roll_back_open()
    assert done.txn_id == txn_id and done.forward
    assert env.fake.disk_state["web"] == "v1" and (await env.svc.get("web")).state == VmState.RUNNING
    assert env.journal.txn(txn_id).state == TxnState.COMMITTED  # type: ignore[union-attr]
    [ev] = env.events("recovery.rollforward")
    assert ev.details["transaction"] == txn_id and ev.request_id == "r9" and ev.actor == "system"
    assert not env.events("recovery.rollback")


async def test_restore_holds_the_vm_lock(env: Env) -> None:
    await vm(env)
    await env.mgr.create("web", name="base")
    env.fake.faults.delays["revert_snapshot"] = 0.2
    restore = asyncio.create_task(env.mgr.restore("web", "base", no_backup=True))
    await asyncio.sleep(0.05)
    delete = asyncio.create_task(env.svc.delete("web", request_id="", with_snapshots=True))
    await asyncio.sleep(0.05)
    assert not delete.done()  # waits for the restore
    await restore
    await delete
    with pytest.raises(NotFound):
        await env.fake.get("web")


# ---- delete ----------------------------------------------------------------------------------------


async def test_delete_one_and_subtree_with_audit_and_metadata(env: Env) -> None:
    await vm(env, start=False)
    for n in ("a", "b", "c"):
        await env.mgr.create("web", name=n, description=n)
    assert await env.mgr.delete("web", "c", request_id="d1") == ["c"]
    assert await env.mgr.delete("web", "c", request_id="d1") == ["c"]  # replayed
    assert await env.mgr.delete("web", "a", children=True) == ["a", "b"]
    assert await env.mgr.list("web") == [] and env.journal.snapshot_meta("web") == {}
    assert [e.details["deleted"] for e in env.events("snapshot.delete")] == ["c", "a, b"]


async def test_metadata_of_snapshots_gone_behind_our_back_is_not_shown(env: Env) -> None:
    await vm(env, start=False)
    await env.mgr.create("web", name="a", description="x")
    await env.fake.delete_snapshot("web", "a")  # like virsh snapshot-delete
    await env.fake.create_snapshot("web", "a", kind=SnapshotKind.INTERNAL)
    [a] = await env.mgr.list("web")
    assert a.description == "x"  # same name: the metadata still matches by name
    await env.fake.delete_snapshot("web", "a")
    assert await env.mgr.list("web") == []


# ---- delete VM ---------------------------------------------------------------------------------------


async def test_delete_vm_refused_with_snapshots_then_allowed(env: Env) -> None:
    await vm(env)
    await env.mgr.create("web", name="a", description="d")
    await env.mgr.set_policy("web", SnapshotPolicy(keep_last=2))
    with pytest.raises(FailedPrecondition) as info:
        await env.svc.delete("web", request_id="x1")
    assert info.value.reason == "VM_HAS_SNAPSHOTS"
    assert "--with-snapshots" in info.value.message and "--keep-export" in info.value.message
    assert (await env.fake.get("web")).state == VmState.RUNNING
    await env.svc.delete("web", request_id="x2", with_snapshots=True)
    assert env.journal.snapshot_meta("web") == {} and env.journal.snapshot_policies() == {}
    [ev] = [e for e in env.events("vm.delete") if e.request_id == "x2"]
    assert ev.details["snapshots"] == "a"
    # a new VM of that name starts with no snapshots
    await vm(env)
    assert await env.mgr.list("web") == []


async def test_delete_vm_without_snapshots_needs_no_flag(env: Env) -> None:
    await vm(env)
    await env.svc.delete("web", request_id="")


# ---- policy and prune ----------------------------------------------------------------------------------


async def _aged(env: Env, names: Iterable[str], step_hours: float) -> None:
    for name in names:
        await env.mgr.create("web", name=name)
        env.clock.tick(step_hours * 3600)


async def test_policy_validation_and_storage(env: Env) -> None:
    await vm(env)
    with pytest.raises(InvalidArgument) as info:
        await env.mgr.set_policy("web", SnapshotPolicy(keep_last=1001))
    assert info.value.metadata["field"] == "policy.keep_last"
    with pytest.raises(NotFound):
        await env.mgr.set_policy("ghost", SnapshotPolicy(keep_last=1))
    await env.mgr.set_policy("web", SnapshotPolicy(keep_last=3), request_id="p1")
    assert await env.mgr.policy("web") == SnapshotPolicy(keep_last=3)
    assert env.events("snapshot.policy")[0].details == {"keep_last": "3"}
    await env.mgr.set_policy("web", SnapshotPolicy())
    assert await env.mgr.policy("web") == SnapshotPolicy() and env.journal.snapshot_policies() == {}


async def test_prune_dry_run_then_real(env: Env) -> None:
    await vm(env, start=False)
    await _aged(env, ["a", "b", "c", "d"], 1)
    # the newest (d) is current, a-c its ancestors: move current to an older branch point first
    await env.mgr.restore("web", "a", no_backup=True)
    await env.mgr.set_policy("web", SnapshotPolicy(keep_last=1))
    dry = await env.mgr.prune("web", dry_run=True)
    assert {d.name: d.keep for d in dry} == {"d": True, "c": False, "b": False, "a": True}
    assert len(await env.mgr.list("web")) == 4 and not env.events("snapshot.prune")
    real = await env.mgr.prune("web", request_id="p1")
    assert real == dry and [s.name for s in await env.mgr.list("web")] == ["a", "d"]
    [ev] = env.events("snapshot.prune")
    assert ev.details["deleted"] == "c, b" and ev.request_id == "p1"
    assert await env.mgr.prune("web", request_id="p1") == real  # replayed


async def test_empty_policy_prunes_nothing(env: Env) -> None:
    await vm(env, start=False)
    await _aged(env, ["a", "b"], 1000)
    decisions = await env.mgr.prune("web")
    assert all(d.keep for d in decisions) and len(await env.mgr.list("web")) == 2


async def test_scheduler_applies_each_policy_as_system(tmp_path: Path) -> None:
    env = await make_env(tmp_path)
    await vm(env, "web", start=False)
    await vm(env, "other", start=False)
    await _aged(env, ["a", "b", "c"], 1)
    await env.mgr.restore("web", "a", no_backup=True)
    await env.mgr.set_policy("web", SnapshotPolicy(keep_last=1))
    await env.mgr.create("other", name="o1")
    env.mgr._settings = replace(env.mgr._settings, prune_interval_seconds=0.05)
    await env.mgr.start()
    for _ in range(100):
        if env.events("snapshot.prune"):
            break
        await asyncio.sleep(0.02)
    await env.mgr.close()
    [ev, *_] = env.events("snapshot.prune")
    assert ev.actor == "system" and ev.details["deleted"] == "b"
    assert [s.name for s in await env.mgr.list("web")] == ["a", "c"]
    assert [s.name for s in await env.mgr.list("other")] == ["o1"]  # no policy, untouched
    await env.svc.close()
    env.journal.close()


# ---- export --------------------------------------------------------------------------------------


async def collect(parts: AsyncIterator[ImagePart]) -> list[ImagePart]:
    return [p async for p in parts]


async def test_export_stream_is_well_formed(env: Env) -> None:
    await vm(env, disks=2)
    await env.mgr.create("web", name="a", description="keep me")
    parts = await collect(env.mgr.export("web", "a"))
    header, *chunks, trailer = parts
    assert isinstance(header, ImageHeader) and isinstance(trailer, ImageTrailer)
    assert header.snapshot is not None and header.snapshot.description == "keep me"
    assert [d.name for d in header.disks] == ["d0", "d1"] and header.spec.name == "web"
    data: dict[int, bytes] = {0: b"", 1: b""}
    for c in chunks:
        assert isinstance(c, ImageChunk) and c.offset == len(data[c.disk]) and len(c.data) <= 1 << 20
        data[c.disk] += c.data
    assert [len(data[i]) for i in (0, 1)] == [d.image_bytes for d in header.disks]
    assert list(trailer.sha256) == [hashlib.sha256(data[i]).hexdigest() for i in (0, 1)]
    assert env.temp_files() == [] and env.events("snapshot.export")


async def test_export_cancelled_mid_stream_leaves_nothing(env: Env) -> None:
    await vm(env)
    await env.mgr.create("web", name="a")
    stream = env.mgr.export("web", "a")
    first = await anext(stream)
    assert isinstance(first, ImageHeader) and env.temp_files()
    await stream.aclose()
    assert env.temp_files() == [] and not env.events("snapshot.export")


async def test_export_unknown_snapshot(env: Env) -> None:
    await vm(env)
    with pytest.raises(NotFound):
        await collect(env.mgr.export("web", "nope"))
    assert env.temp_files() == []


async def test_start_sweeps_leftover_temp_folders(env: Env) -> None:
    (env.storage / "exports" / "web-left").mkdir()
    (env.storage / "exports" / "web-left" / "d0.qcow2").write_bytes(b"x")
    await env.mgr.start(scheduler=False)
    assert env.temp_files() == []


# ---- import --------------------------------------------------------------------------------------


async def stream(parts: Iterable[ImagePart]) -> AsyncIterator[ImagePart]:
    for p in parts:
        yield p


async def exported(env: Env, disks: int = 1) -> list[ImagePart]:
    await vm(env, disks=disks)
    await env.mgr.create("web", name="a")
    return await collect(env.mgr.export("web", "a"))


def renamed(parts: list[ImagePart], name: str, request_id: str = "") -> list[ImagePart]:
    header = parts[0]
    assert isinstance(header, ImageHeader)
    return [replace(header, spec=replace(header.spec, name=name), request_id=request_id), *parts[1:]]


async def assert_nothing_made(env: Env, name: str) -> None:
    with pytest.raises(NotFound):
        await env.fake.get(name)
    assert env.temp_files() == []
    assert not any(v.startswith(f"cb-{name}.") for v in (await env.fake.inventory()).volumes)


async def test_import_round_trip_is_idempotent(env: Env) -> None:
    parts = renamed(await exported(env, disks=2), "copy", request_id="imp-1")
    made = await env.mgr.import_(stream(parts))
    assert made.name == "copy" and made.state == VmState.STOPPED and [d.name for d in made.spec.disks] == ["d0", "d1"]
    again = await env.mgr.import_(stream(parts))
    assert again.uuid == made.uuid and env.temp_files() == []
    [ev] = env.events("snapshot.import")
    assert ev.resource == "hosts/h/vms/copy" and ev.request_id == "imp-1"
    [txn] = [t for t in env.journal.txns() if t.kind == "snapshot.import"]
    assert txn.state == TxnState.COMMITTED


async def test_import_refuses_a_taken_name_and_a_missing_header(env: Env) -> None:
    parts = await exported(env)
    with pytest.raises(AlreadyExists):
        await env.mgr.import_(stream(parts))
    with pytest.raises(InvalidArgument) as info:
        await env.mgr.import_(stream(parts[1:]))
    assert info.value.reason == "IMPORT_NO_HEADER"
    with pytest.raises(InvalidArgument):
        await env.mgr.import_(stream(renamed(parts, "Bad_Name")))
    assert env.temp_files() == []


async def test_import_truncated_stream(env: Env) -> None:
    parts = renamed(await exported(env), "copy")
    with pytest.raises(InvalidArgument) as info:
        await env.mgr.import_(stream(parts[:-1]))  # no trailer: the client went away
    assert info.value.reason == "IMPORT_TRUNCATED"
    await assert_nothing_made(env, "copy")
    with pytest.raises(InvalidArgument) as short:
        await env.mgr.import_(stream([parts[0], parts[-1]]))  # no chunks
    assert short.value.reason == "IMPORT_TRUNCATED"
    await assert_nothing_made(env, "copy")


async def test_import_cancelled_stream_leaves_nothing(env: Env) -> None:
    parts = renamed(await exported(env), "copy")

    async def cancelled() -> AsyncIterator[ImagePart]:
        yield parts[0]
        yield parts[1]
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await env.mgr.import_(cancelled())
    await assert_nothing_made(env, "copy")


async def test_import_non_contiguous_and_digest_mismatch(env: Env) -> None:
    parts = renamed(await exported(env), "copy")
    chunk = parts[1]
    assert isinstance(chunk, ImageChunk)
    with pytest.raises(InvalidArgument) as gap:
        await env.mgr.import_(stream([parts[0], replace(chunk, offset=chunk.offset + 1), *parts[2:]]))
    assert gap.value.reason == "IMPORT_NOT_CONTIGUOUS"
    await assert_nothing_made(env, "copy")
    flipped = bytes([chunk.data[0] ^ 1]) + chunk.data[1:]
    with pytest.raises(InvalidArgument) as bad:
        await env.mgr.import_(stream([parts[0], replace(chunk, data=flipped), *parts[2:]]))
    assert bad.value.reason == "IMPORT_DIGEST_MISMATCH"
    await assert_nothing_made(env, "copy")


def image_stream(path: Path, name: str, virtual: int) -> list[ImagePart]:
    """A one-disk import stream of the file at ``path`` (its digest right, so only the content checks refuse)."""
    data = path.read_bytes()
    header = ImageHeader(
        snapshot=None,
        spec=VmSpec(name=name, vcpus=1, memory_mib=128, disks=(DiskSpec("d0", size_mib=16),)),
        disks=(ImageDisk("d0", virtual, len(data)),),
    )
    chunks: list[ImagePart] = [ImageChunk(0, o, data[o : o + (1 << 20)]) for o in range(0, len(data), 1 << 20)]
    return [header, *chunks, ImageTrailer((hashlib.sha256(data).hexdigest(),))]


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *args], check=True)


@pytest.mark.parametrize(
    ("make", "virtual", "reason"),
    [
        (lambda d: qemu_img("-b", "/etc/hostname", "-F", "raw", str(d / "x.qcow2")), 0, "IMPORT_BACKING_FILE"),
        (
            lambda d: qemu_img("-o", f"data_file={d / 'x.raw'}", str(d / "x.qcow2"), "16M"),
            16 << 20,
            "IMPORT_DATA_FILE",
        ),
        (lambda d: qemu_img(str(d / "x.qcow2"), "10T"), 10 << 40, "IMPORT_TOO_LARGE"),
        (lambda d: (d / "x.qcow2").write_bytes(b"\0" * 4096), 16 << 20, "IMPORT_NOT_QCOW2"),
        (lambda d: qemu_img(str(d / "x.qcow2"), "32M"), 16 << 20, "IMPORT_SIZE_MISMATCH"),
    ],
)
async def test_import_refuses_unsafe_images(env: Env, tmp_path: Path, make: object, virtual: int, reason: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    make(src)  # type: ignore[operator]
    parts = image_stream(src / "x.qcow2", "evil", virtual)
    with pytest.raises(InvalidArgument) as info:
        await env.mgr.import_(stream(parts))
    assert info.value.reason == reason
    await assert_nothing_made(env, "evil")
    assert not [t for t in env.journal.txns() if t.kind == "snapshot.import"]


async def test_import_of_a_good_handmade_image(env: Env, tmp_path: Path) -> None:
    qemu_img(str(tmp_path / "x.qcow2"), "16M")
    made = await env.mgr.import_(stream(image_stream(tmp_path / "x.qcow2", "hand", 16 << 20)))
    assert made.state == VmState.STOPPED and env.temp_files() == []


async def test_import_adapter_failure_is_rolled_back(env: Env) -> None:
    parts = renamed(await exported(env), "copy")
    env.fake.faults.fail_on["import:define"] = Fault(Internal("boom"))
    with pytest.raises(Internal):
        await env.mgr.import_(stream(parts))
    await assert_nothing_made(env, "copy")
    [txn] = [t for t in env.journal.txns() if t.kind == "snapshot.import"]
    assert txn.state == TxnState.ROLLED_BACK
