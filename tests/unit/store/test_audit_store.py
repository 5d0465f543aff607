"""The audit chain in the fleet store, on SQLite and PostgreSQL: appends, tampering, concurrency, archive."""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from clonebox_controller.app.audit import AuditLog
from clonebox_controller.store import Store
from clonebox_core.audit.chain import AuditFilter, Head, Keyring
from clonebox_core.audit.event import Outcome, new_event
from clonebox_core.audit.headfile import HeadFile
from clonebox_core.errors import FailedPrecondition, NotFound
from clonebox_core.model import HypervisorInfo, Resources

KEY = bytes(range(32))


def keyring() -> Keyring:
    return Keyring({"k1": KEY}, "k1")


def event(n: int, actor: str = "spiffe://t/user/admin/alice") -> object:
    return new_event("vm.create", f"vms/vm{n}", Outcome.ACCEPTED, request_id=f"r{n}", actor=actor, details={"n": n})


@pytest.fixture
def head_file(tmp_path: Path) -> HeadFile:
    return HeadFile(tmp_path / "audit-head.log")


@pytest.fixture
def store(store_url: str, head_file: HeadFile) -> Iterator[Store]:
    with Store.open(store_url, audit_keyring=keyring(), audit_head_file=head_file) as s:
        yield s


def filled(store: Store, n: int = 10) -> None:
    for i in range(1, n + 1):
        store.append_audit([event(i)])  # type: ignore[list-item]


async def verify(store: Store, head_file: HeadFile | None = None):  # type: ignore[no-untyped-def]
    log = AuditLog(store, store.audit_keyring, head_file.latest if head_file else lambda: None)
    return (await log.verify()).report


def sql(store: Store, statement: str) -> None:
    with store.engine.begin() as conn:
        conn.execute(text(statement))


async def test_appends_form_a_chain_that_verifies(store: Store, head_file: HeadFile) -> None:
    filled(store)
    records = store.list_audit(AuditFilter(limit=100))
    assert [r.seq for r in records] == list(range(1, 11))
    assert records[0].event.resource == "vms/vm1" and records[0].event.details == {"n": "1"}
    assert all(b.prev_mac == a.mac for a, b in itertools.pairwise(records))
    report = await verify(store, head_file)
    assert report.ok and report.checked == 10 and report.last_seq == 10
    assert head_file.latest() == Head(10, records[-1].mac)


async def test_duplicate_event_ids_are_appended_once(store: Store) -> None:
    ev = event(1)
    store.append_audit([ev, ev])  # type: ignore[list-item]
    store.append_audit([ev])  # type: ignore[list-item]
    assert len(store.list_audit(AuditFilter())) == 1


async def test_a_modified_field_is_named(store: Store) -> None:
    filled(store)
    sql(store, "UPDATE audit_events SET actor = 'spiffe://t/user/admin/mallory' WHERE seq = 4")
    report = await verify(store)
    assert not report.ok and report.bad_seq == 4 and "MAC" in report.problem
    assert report.bad_id == store.list_audit(AuditFilter(after_seq=3, limit=1))[0].event.id


async def test_a_deleted_row_is_named(store: Store) -> None:
    filled(store)
    sql(store, "DELETE FROM audit_events WHERE seq = 6")
    report = await verify(store)
    assert not report.ok and report.bad_seq == 6 and "missing" in report.problem


async def test_swapped_rows_are_named(store: Store) -> None:
    filled(store)
    sql(store, "UPDATE audit_events SET seq = 1000 WHERE seq = 3")
    sql(store, "UPDATE audit_events SET seq = 3 WHERE seq = 7")
    sql(store, "UPDATE audit_events SET seq = 7 WHERE seq = 1000")
    report = await verify(store)
    assert not report.ok and report.bad_seq == 3


async def test_an_inserted_row_is_named(store: Store) -> None:
    filled(store)
    # make room at 5 by moving 5..10 up one, then copy record 4 into the gap (a forger has no key)
    sql(store, "UPDATE audit_events SET seq = seq + 100 WHERE seq >= 5")
    sql(store, "UPDATE audit_events SET seq = seq - 99 WHERE seq >= 105")
    sql(
        store,
        "INSERT INTO audit_events (seq, event_id, time, actor, action, resource, outcome, request_id, trace_id, "
        "reason, origin, details, key_id, prev_mac, mac) SELECT 5, 'forged', time, actor, 'vm.delete', resource, "
        "outcome, request_id, trace_id, reason, origin, details, key_id, mac, mac FROM audit_events WHERE seq = 4",
    )
    report = await verify(store)
    assert not report.ok and report.bad_seq == 5 and report.bad_id == "forged"


async def test_a_dropped_tail_is_caught_by_the_head_row(store: Store) -> None:
    filled(store)
    sql(store, "DELETE FROM audit_events WHERE seq > 8")
    report = await verify(store)
    assert not report.ok and report.bad_seq == 9 and "head row" in report.problem


async def test_a_dropped_tail_with_an_older_head_restored_is_caught_by_the_head_file(
    store: Store, head_file: HeadFile
) -> None:
    filled(store)
    mac8 = store.list_audit(AuditFilter(after_seq=7, limit=1))[0].mac
    sql(store, "DELETE FROM audit_events WHERE seq > 8")
    sql(store, f"UPDATE audit_head SET seq = 8, mac = '{mac8.hex()}'")
    assert (await verify(store)).ok  # the database alone is consistent again...
    report = await verify(store, head_file)  # ...but the head kept beside the controller is not
    assert not report.ok and report.bad_seq == 9 and "head file" in report.problem


async def test_an_agent_witness_catches_a_rewritten_tail(store: Store) -> None:
    filled(store)
    last = store.list_audit(AuditFilter(after_seq=9, limit=1))[0]
    store.record_audit_witness("h1", Head(last.seq, last.mac))
    mac8 = store.list_audit(AuditFilter(after_seq=7, limit=1))[0].mac
    sql(store, "DELETE FROM audit_events WHERE seq > 8")
    sql(store, f"UPDATE audit_head SET seq = 8, mac = '{mac8.hex()}'")
    report = await verify(store)
    assert not report.ok and "agent h1" in report.problem


async def test_archive_keeps_the_rest_verifiable_and_a_forged_anchor_is_caught(store: Store) -> None:
    filled(store)
    log = AuditLog(store, store.audit_keyring)
    start, records = await log.export()
    assert start.seq == 0 and len(records) == 10
    through = records[4]
    removed = await log.archive(Head(through.seq, through.mac), request_id="arch-1")
    assert removed == 5
    left = store.list_audit(AuditFilter(limit=100))
    assert [r.seq for r in left] == [6, 7, 8, 9, 10, 11]
    assert left[-1].event.action == "audit.archive"
    report = (await log.verify()).report
    assert report.ok and report.first_seq == 6 and report.last_seq == 11
    # archiving the same segment twice is refused, not repeated
    with pytest.raises(FailedPrecondition):
        await log.archive(Head(through.seq, through.mac))
    sql(store, "UPDATE audit_anchor SET seq = 4")
    report = (await log.verify()).report
    assert not report.ok and "anchor" in report.problem


async def test_export_refuses_a_broken_chain(store: Store) -> None:
    filled(store, 3)
    sql(store, "UPDATE audit_events SET reason = 'x' WHERE seq = 2")
    with pytest.raises(FailedPrecondition) as err:
        await AuditLog(store, store.audit_keyring).export()
    assert err.value.reason == "AUDIT_CHAIN_BROKEN"


def test_a_failed_mutation_writes_no_event(store: Store) -> None:
    with pytest.raises(NotFound):
        store.set_cordoned("nope", True, new_event("host.cordon", "hosts/nope", Outcome.SUCCEEDED))
    assert store.list_audit(AuditFilter()) == []


def test_a_mutation_whose_event_cannot_be_written_does_not_happen(store: Store) -> None:
    r = Resources(4, 4096, 10240)
    store.upsert_host_registration("h1", "h1.example:7000", r, r, HypervisorInfo(uri="test:///default"), 1)
    # the chain's head row is gone: no event can be appended, so the cordon must not commit
    sql(store, "DELETE FROM audit_head")
    with pytest.raises(Exception, match=r"audit_head|NoResultFound|No row"):
        store.set_cordoned("h1", True, new_event("host.cordon", "hosts/h1", Outcome.SUCCEEDED))
    assert store.get_host("h1").cordoned is False


WRITERS = 4
PER_WRITER = 1000

#: one controller-like process: its own engine, four threads appending one event per transaction
_WRITER = """
import sys, threading
from clonebox_controller.store import Store
from clonebox_core.audit.chain import Keyring
from clonebox_core.audit.event import Outcome, new_event

url, key_hex, tag, writers, per_writer = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
with Store.open(url, audit_keyring=Keyring({"k1": bytes.fromhex(key_hex)}, "k1"), migrate=False) as s:
    def write(w):
        for i in range(per_writer):
            s.append_audit([new_event("vm.start", f"vms/{tag}-{w}", Outcome.SUCCEEDED, actor=f"{tag}/{w}/{i}")])
    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
"""


def test_two_processes_with_four_writers_each_leave_one_intact_chain(store: Store) -> None:
    url = store.engine.url.render_as_string(hide_password=False)
    args = [url, KEY.hex()]
    procs = [
        subprocess.Popen([sys.executable, "-c", _WRITER, *args, f"p{n}", str(WRITERS), str(PER_WRITER)])
        for n in range(2)
    ]
    assert [p.wait(600) for p in procs] == [0, 0]
    report = asyncio.run(verify(store))
    assert report.ok, report.problem
    assert report.checked == 2 * WRITERS * PER_WRITER
    actors = {r.event.actor for r in store.list_audit(AuditFilter(limit=100_000))}
    assert len(actors) == 2 * WRITERS * PER_WRITER
