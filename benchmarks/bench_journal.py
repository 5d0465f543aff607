"""
The cost of the agent's journal on a VM create: the same create with and without it, on real libvirt.

In this process, one ``LibvirtHypervisor`` on ``qemu:///system`` (storage under
``/var/lib/clonebox/bench-journal-XXXXXX``, traversable by ``libvirt-qemu``; TCG) creates and starts
the tiny test guest with a data disk and cloud-init user-data, so that every step of a create runs
(folder, disk overlay, seed ISO, define, start). Interleaved (the order swaps each repetition, so
drift in machine load hits both alike), R times each (default 10, --quick 3), after one untimed
warm-up of each kind:

- without: ``hypervisor.create(spec, start=True, steps=MemoryStepLog())`` - the steps are kept in
  memory only (rollback after an error still works, a crash leaves no record);
- with: what ``AgentService`` does around the same call - ``Journal.begin_txn``, the create with a
  ``JournalStepLog`` (each step durably planned, with its undo, before it acts, and its identity
  recorded after), ``Journal.finish_txn`` committing the request's outcome and audit event.

Each VM is deleted afterwards (untimed). Journal writes are counted two ways: (1) every committed SQLite
write transaction of the journal's connection during the timed creates, from its statement trace
(``sqlite3.Connection.set_trace_callback``: each ``COMMIT`` and each write statement outside an
explicit transaction, since the journal runs in autocommit mode); (2) the ``fsync``/``fdatasync``
system calls of the same sequence of journal calls replayed without libvirt in a child process under
``strace -f -c`` (20 creates minus 0 creates, divided by 20). Every domain, volume, folder and pool made
here is removed in ``finally``, also after Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

from common import IMAGES, QEMU_URI, RUN_ROOT, BenchResult, Options, Ratio, Table, load_average, median, ms, spread

STRACE_CREATES = 20
USER_DATA = "#cloud-config\nhostname: bench\n"


def _unavailable() -> str | None:
    import importlib.util

    if shutil.which("virsh") is None:
        return "virsh not installed (deploy/dev/install-system.sh)"
    if importlib.util.find_spec("libvirt") is None:
        return "libvirt-python is not installed"
    r = subprocess.run(["virsh", "-c", QEMU_URI, "version"], capture_output=True, text=True, timeout=30, check=False)
    if r.returncode != 0:
        return f"libvirtd not reachable at {QEMU_URI}: {r.stderr.strip()} (deploy/dev/start-libvirt.sh)"
    for f in ("vmlinux", "initrd.img", "data.qcow2"):
        if not (IMAGES / "testguest" / f).exists():
            return f"test guest missing {IMAGES / 'testguest' / f} (bash deploy/testguest/build.sh)"
    return None


class WriteCounter:
    """Committed write transactions of one SQLite connection, from its statement trace."""

    def __init__(self) -> None:
        self.commits = 0
        self._in_txn = False

    def __call__(self, statement: str) -> None:
        word = statement.lstrip().split(None, 1)[0].upper() if statement.strip() else ""
        if word == "BEGIN":
            self._in_txn = True
        elif word in ("COMMIT", "END"):
            self._in_txn = False
            self.commits += 1
        elif word == "ROLLBACK":
            self._in_txn = False
        elif word in ("INSERT", "UPDATE", "DELETE", "REPLACE") and not self._in_txn:
            self.commits += 1  # autocommit: the statement is its own transaction


def _spec(name: str) -> Any:
    from clonebox_core.spec import load_spec_text

    text = textwrap.dedent(
        f"""
        version: 1
        name: {name}
        vcpus: 1
        memory: 128MiB
        kernel_boot: {{kernel: testguest/vmlinux, initrd: testguest/initrd.img, cmdline: "console=ttyS0 quiet"}}
        disks: [{{name: data, base_image: testguest/data.qcow2}}]
        network: {{mode: none}}
        cloud_init: {{user_data: "{USER_DATA.encode("unicode_escape").decode()}"}}
        labels: {{bench: journal}}
        """
    )
    return load_spec_text(text, f"<{name}>")


async def _create_without(hv: Any, spec: Any) -> float:
    from clonebox_agent.adapters.common import MemoryStepLog

    t0 = time.perf_counter()
    await hv.create(spec, start=True, steps=MemoryStepLog())
    return time.perf_counter() - t0


async def _create_with(hv: Any, journal: Any, spec: Any, host: str) -> tuple[float, float]:
    """One journaled create as ``AgentService._create_transaction`` runs it; (total s, journal s)."""
    from clonebox_agent.journal.store import JournalStepLog, TxnState
    from clonebox_core.audit.event import Outcome, new_event

    spent = [0.0]

    class TimedStepLog(JournalStepLog):
        def planned(self, name: str, undo: Any) -> int:
            t = time.perf_counter()
            try:
                return super().planned(name, undo)
            finally:
                spent[0] += time.perf_counter() - t

        def made(self, n: int, identity: Any) -> None:
            t = time.perf_counter()
            try:
                super().made(n, identity)
            finally:
                spent[0] += time.perf_counter() - t

    request_id = uuid.uuid4().hex
    txn_id = uuid.uuid4().hex
    t0 = time.perf_counter()
    await asyncio.to_thread(journal.begin_txn, txn_id, "vm.create", spec.name, request_id)
    spent[0] += time.perf_counter() - t0
    await hv.create(spec, start=True, steps=TimedStepLog(journal, txn_id))
    t1 = time.perf_counter()
    event = new_event(
        "vm.create",
        f"hosts/{host}/vms/{spec.name}",
        Outcome.SUCCEEDED,
        request_id=request_id,
        origin=f"agent/{host}",
        details={"transaction": txn_id},
    )
    outcome = (request_id, "create", spec.name, {})
    await asyncio.to_thread(journal.finish_txn, txn_id, TxnState.COMMITTED, outcome=outcome, audit=event)
    end = time.perf_counter()
    spent[0] += end - t1
    return end - t0, spent[0]


# the journal calls of one create with a folder, a disk, a seed ISO, define and start, without libvirt
_STRACE_SCRIPT = """
import sys, uuid
from pathlib import Path
from clonebox_agent.journal.store import Journal, TxnState
from clonebox_core.audit.event import Outcome, new_event

journal = Journal(Path(sys.argv[1]))
for _ in range(int(sys.argv[2])):
    txn, rid = uuid.uuid4().hex, uuid.uuid4().hex
    journal.begin_txn(txn, "vm.create", "vm", rid)
    for step in ("folder", "disk:data", "seed", "define", "start"):
        n = journal.plan_step(txn, step, {"kind": "x", "name": step})
        journal.step_made(txn, n, {"uuid": "u", "dev": "1", "inode": "2", "nonce": "n"})
    event = new_event("vm.create", "hosts/h/vms/vm", Outcome.SUCCEEDED, request_id=rid, origin="agent/h")
    journal.finish_txn(txn, TxnState.COMMITTED, outcome=(rid, "create", "vm", {}), audit=event)
journal.close()
"""


def _syncs_under_strace(folder: Path, creates: int) -> int | None:
    """fsync + fdatasync calls of a child doing the journal calls of ``creates`` creates (None: no strace)."""
    if shutil.which("strace") is None:
        return None
    db = folder / f"strace-{creates}.db"
    cmd = ["strace", "-f", "-c", "-e", "trace=fsync,fdatasync", sys.executable, "-c", _STRACE_SCRIPT]
    r = subprocess.run(
        [*cmd, str(db), str(creates)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if r.returncode != 0:
        return None
    calls = 0
    for line in r.stderr.splitlines():
        m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(fsync|fdatasync)\s*$", line)
        if m:
            calls += int(m.group(1))
    return calls


async def _bench(opts: Options, root: Path, tag: str, result: BenchResult) -> None:
    from clonebox_agent.adapters.libvirt import LibvirtHypervisor
    from clonebox_agent.journal.store import Journal

    reps = opts.repetitions or (3 if opts.quick else 10)
    hv = LibvirtHypervisor(QEMU_URI, root / "storage", [IMAGES], domain_type="qemu", owner=tag)
    await hv.open(lambda _event: None)
    journal = Journal(root / "state" / "journal.db")
    counter = WriteCounter()
    journal._db.set_trace_callback(counter)  # the journal's own connection: nothing else writes on it
    made: list[str] = []
    without: list[float] = []
    with_journal: list[float] = []
    journal_s: list[float] = []
    commits: list[int] = []
    try:

        async def one(kind: str, name: str, timed: bool) -> None:
            spec = _spec(name)
            made.append(name)
            if kind == "without":
                seconds = await _create_without(hv, spec)
                if timed:
                    without.append(seconds)
            else:
                before = counter.commits
                seconds, in_journal = await _create_with(hv, journal, spec, tag)
                if timed:
                    with_journal.append(seconds)
                    journal_s.append(in_journal)
                    commits.append(counter.commits - before)
            await hv.delete(name)
            made.remove(name)

        await one("without", f"{tag}-warm-a", timed=False)
        await one("with", f"{tag}-warm-b", timed=False)
        for i in range(reps):
            order = ("without", "with") if i % 2 == 0 else ("with", "without")
            for kind in order:
                await one(kind, f"{tag}-{kind}-{i}", timed=True)
    finally:
        for name in made:
            try:
                await hv.delete(name)
            except Exception as exc:  # keep cleaning up the others
                result.notes.append(f"cleanup of {name} failed: {exc}")
        try:
            await hv.remove_pool()
        finally:
            journal.close()
            await hv.close()

    base, journaled = median(without), median(with_journal)
    table = Table(
        f"create + start of the test guest (disk + cloud-init seed), {reps} runs each, median",
        ["kind", "median ms", "min-max s", "of which journal ms (median)", "journal writes per create"],
    )
    table.rows.append(["without journal (MemoryStepLog)", ms(base), spread(without), "-", "0"])
    per_create = sorted(set(commits))
    table.rows.append(
        [
            "with journal (begin_txn + JournalStepLog + finish_txn)",
            ms(journaled),
            spread(with_journal),
            ms(median(journal_s)),
            "/".join(str(c) for c in per_create),
        ]
    )
    result.tables.append(table)
    result.ratios.append(Ratio("create time with the journal / without", journaled / base, "<= 1.05"))
    folder = root / "strace"
    folder.mkdir()
    zero, many = _syncs_under_strace(folder, 0), _syncs_under_strace(folder, STRACE_CREATES)
    fsyncs = (many - zero) / STRACE_CREATES if zero is not None and many is not None else None
    result.notes.append(
        "journal writes: committed SQLite write transactions on the journal's connection during the timed "
        "creates (statement trace); each is one fsync of the WAL (synchronous=FULL)"
    )
    if fsyncs is not None:
        result.notes.append(
            f"fsync+fdatasync per create, measured under strace on the same journal calls without libvirt: {fsyncs:g}"
        )
    else:
        result.notes.append("strace not available (or not permitted): fsyncs counted from the statement trace only")
    result.data.update(
        {
            "repetitions": reps,
            "without_s": without,
            "with_s": with_journal,
            "journal_s": journal_s,
            "journal_writes_per_create": commits,
            "fsyncs_per_create_strace": fsyncs,
            "load_average": load_average(),
        }
    )


def run(opts: Options) -> BenchResult:
    """Run the journal-cost benchmark."""
    result = BenchResult("journal", "create with the agent's journal vs the same create without it")
    reason = _unavailable()
    if reason:
        result.skipped = reason
        return result
    tag = f"bench-journal-{uuid.uuid4().hex[:6]}"
    root = RUN_ROOT / tag
    root.mkdir(parents=True)
    os.chmod(root, 0o755)
    try:
        asyncio.run(_bench(opts, root, tag, result))
    finally:
        if not opts.keep:
            shutil.rmtree(root, ignore_errors=True)
    return result
