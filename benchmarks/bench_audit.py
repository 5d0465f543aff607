"""
Audit appends per second on SQLite and on PostgreSQL: ``Store.append_audit`` against plain inserts.

Each append is one event in its own transaction, as the controller writes them. Timed per backend:

- **baseline**: the same row shape written without the chain. A plain table ``bench_audit_plain``
  with the columns, types and indexes of ``audit_events`` lives in the same database. Each event is
  one transaction on the store's engine, opened as the store opens its write transactions (SQLite:
  ``BEGIN IMMEDIATE``), with one ``INSERT``. ``seq`` comes from a client-side counter and the MAC
  columns hold fixed 64-character strings. Nothing is computed, the ``audit_head`` row is not read
  or locked, and no head file is written.
- **chained**: ``Store.append_audit([event])`` with a keyring and no head file. That is the head
  row (``SELECT ... FOR UPDATE`` on PostgreSQL), the duplicate-id check, the HMAC-SHA256, the insert
  and the head update.
- **chained + head file**: the same through a second ``Store`` whose ``HeadFile`` appends and
  fsyncs one line after every commit.
- **4 threads**: the baseline and the chained append (no head file), with the events split over 4
  threads that start together. Chained appends serialise on the database (SQLite's write lock,
  PostgreSQL's head-row lock); plain inserts serialise only on SQLite.

Events are made before the clock starts. Every case runs in rounds that are interleaved with the
other cases, after a warm-up. The rate is events / seconds over all rounds (the spread of the
per-round rates is shown too), and latencies are per append. At the end the chain must hold every
chained append and verify, and the plain table must hold every baseline row.

SQLite is a file in a temporary folder with the store's own settings: WAL and ``synchronous =
NORMAL``, so commits are not fsynced. PostgreSQL is a private throwaway cluster, made with
``initdb`` in a temporary folder and started by ``pg_ctl`` on a free loopback port, with its unix
socket in that folder. It keeps the server defaults (``fsync = on``, ``synchronous_commit = on``:
every commit waits for a WAL flush) and is reached over TCP on 127.0.0.1, as a controller would
reach it. When no PostgreSQL server binaries are found only SQLite runs, and a note says why.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import BenchResult, Options, Ratio, Table, percentile

from tests import pgcluster

THREADS = 4
WARMUP = 20
#: no case may take longer than this in total (the loops stop early and say so)
MAX_CASE_SECONDS = 300.0

BASELINE = "baseline (plain insert)"
CHAINED = "chained"
HEADFILE = "chained + head file"
BASELINE_MT = f"baseline, {THREADS} threads"
CHAINED_MT = f"chained, {THREADS} threads"
CASES = (BASELINE, CHAINED, HEADFILE, BASELINE_MT, CHAINED_MT)


# ---- a private PostgreSQL cluster ----------------------------------------------------------------


def _pg_missing() -> str:
    """Why a private PostgreSQL cluster cannot be started here ("" when it can)."""
    return pgcluster.missing()


def _postgres() -> contextlib.AbstractContextManager[str]:
    """A throwaway cluster with the server's default durability (every commit waits for its fsync)."""
    return pgcluster.cluster("clonebox_bench", durable=True)


# ---- the plain table and the events --------------------------------------------------------------


def _plain_table(metadata: Any) -> Any:
    """``bench_audit_plain``: the columns, types, unique key and indexes of ``audit_events``."""
    from sqlalchemy import Column, Index, Table, UniqueConstraint

    from clonebox_controller.store.tables import AuditEventRow

    source = AuditEventRow.__table__
    columns = [
        Column(c.name, c.type, primary_key=c.primary_key, nullable=c.nullable, autoincrement=False)
        for c in source.columns
    ]
    table = Table("bench_audit_plain", metadata, *columns, UniqueConstraint("event_id", name="uq_bench_plain_event"))
    for name in ("time", "actor", "action", "resource"):
        Index(f"ix_bench_audit_plain_{name}", table.c[name])
    return table


def _events(n: int, tag: str) -> list[Any]:
    """``n`` realistic events (a VM create by a user, with a request id and a detail or two)."""
    from clonebox_core.audit.event import Outcome, new_event

    return [
        new_event(
            "vm.create",
            f"hosts/host-{i % 7}/vms/{tag}-{i:06d}",
            Outcome.SUCCEEDED,
            actor="spiffe://bench.test/user/alice",
            request_id=uuid.uuid4().hex,
            details={"host": f"host-{i % 7}", "image": "debian-12"},
        )
        for i in range(n)
    ]


def _row(event: Any, seq: int, key_id: str) -> dict[str, Any]:
    return {
        "seq": seq,
        "event_id": event.id,
        "time": event.time,
        "actor": event.actor,
        "action": event.action,
        "resource": event.resource,
        "outcome": str(event.outcome),
        "request_id": event.request_id,
        "trace_id": event.trace_id,
        "reason": event.reason,
        "origin": event.origin,
        "details": dict(event.details),
        "key_id": key_id,
        "prev_mac": "0" * 64,
        "mac": "f" * 64,
    }


# ---- one backend ---------------------------------------------------------------------------------


@dataclass
class _Case:
    """What one case measured over all its rounds."""

    events: int = 0
    seconds: float = 0.0
    round_rates: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    stopped_early: bool = False

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


def _serial(append: Callable[[Any], None], events: Sequence[Any], case: _Case) -> None:
    lat: list[float] = []
    t0 = time.perf_counter()
    for ev in events:
        t = time.perf_counter()
        append(ev)
        lat.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - t0
    case.events += len(events)
    case.seconds += elapsed
    case.round_rates.append(len(events) / elapsed)
    case.latencies += lat


def _threaded(append: Callable[[Any], None], events: Sequence[Any], case: _Case) -> None:
    shares = [events[i::THREADS] for i in range(THREADS)]
    lats: list[list[float]] = [[] for _ in range(THREADS)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(THREADS + 1)

    def worker(k: int) -> None:
        barrier.wait()
        try:
            for ev in shares[k]:
                t = time.perf_counter()
                append(ev)
                lats[k].append(time.perf_counter() - t)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,), name=f"bench-audit-{k}") for k in range(THREADS)]
    for th in threads:
        th.start()
    barrier.wait()
    t0 = time.perf_counter()
    for th in threads:
        th.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise errors[0]
    case.events += len(events)
    case.seconds += elapsed
    case.round_rates.append(len(events) / elapsed)
    for lat in lats:
        case.latencies += lat


def _measure_backend(url: str, folder: Path, per_case: int, rounds: int) -> tuple[dict[str, _Case], dict[str, Any]]:
    """Run every case on ``url``; (cases by name, facts about the backend)."""
    from sqlalchemy import MetaData, func, select, text
    from sqlalchemy.orm import Session

    from clonebox_controller.store.engine import WRITE_OPTION
    from clonebox_controller.store.store import Store
    from clonebox_core.audit.chain import AuditFilter, Keyring, verify
    from clonebox_core.audit.headfile import HeadFile

    keyring = Keyring({"bench-1": os.urandom(32)}, "bench-1")
    head_file = HeadFile(folder / "audit.head")
    plain_store = Store.open(url, audit_keyring=keyring)
    file_store = Store.open(url, audit_keyring=keyring, audit_head_file=head_file, migrate=False)
    facts: dict[str, Any] = {"dialect": plain_store.engine.dialect.name}
    try:
        engine = plain_store.engine
        metadata = MetaData()
        plain = _plain_table(metadata)
        metadata.create_all(engine)
        insert = plain.insert()
        seqs = itertools.count(1)
        write_opts = {WRITE_OPTION: True}

        def baseline(ev: Any) -> None:
            # one write transaction opened exactly as Store._run opens its own, one INSERT
            with Session(engine) as session, session.begin():
                session.connection(execution_options=write_opts)
                session.execute(insert, _row(ev, next(seqs), keyring.current))

        def chained(ev: Any) -> None:
            plain_store.append_audit([ev])

        def with_file(ev: Any) -> None:
            file_store.append_audit([ev])

        runs: dict[str, tuple[Callable[[Any], None], Callable[[Callable[[Any], None], Sequence[Any], _Case], None]]] = {
            BASELINE: (baseline, _serial),
            CHAINED: (chained, _serial),
            HEADFILE: (with_file, _serial),
            BASELINE_MT: (baseline, _threaded),
            CHAINED_MT: (chained, _threaded),
        }
        for name, (append, _how) in runs.items():
            for ev in _events(WARMUP, f"warm-{name.split()[0]}"):
                append(ev)
        warm_chained = 3 * WARMUP  # chained, head file, chained 4 threads
        warm_plain = 2 * WARMUP

        cases = {name: _Case() for name in CASES}
        chunk = max(THREADS, per_case // rounds)
        for r in range(rounds):
            for name, (append, how) in runs.items():
                case = cases[name]
                if case.seconds > MAX_CASE_SECONDS:
                    case.stopped_early = True
                    continue
                how(append, _events(chunk, f"r{r}-{CASES.index(name)}"), case)

        # sanity: every append landed, and the chain verifies (head row and head file as witnesses)
        chained_total = warm_chained + sum(cases[n].events for n in (CHAINED, HEADFILE, CHAINED_MT))
        plain_total = warm_plain + sum(cases[n].events for n in (BASELINE, BASELINE_MT))
        state = plain_store.audit_chain_state()
        records = []
        after = 0
        while True:
            page = plain_store.list_audit(AuditFilter(after_seq=after, limit=1000))
            if not page:
                break
            records += page
            after = page[-1].seq
        report = verify(records, keyring, stored_head=state.head)
        with engine.connect() as conn:
            rows = conn.execute(select(func.count()).select_from(plain)).scalar_one()
            if facts["dialect"] == "postgresql":
                facts["server"] = conn.execute(text("SHOW server_version")).scalar_one()
                facts["fsync"] = conn.execute(text("SHOW fsync")).scalar_one()
                facts["synchronous_commit"] = conn.execute(text("SHOW synchronous_commit")).scalar_one()
            else:
                facts["server"] = "SQLite " + str(conn.exec_driver_sql("select sqlite_version()").scalar_one())
                facts["journal_mode"] = conn.exec_driver_sql("PRAGMA journal_mode").scalar_one()
                facts["synchronous"] = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}.get(
                    int(conn.exec_driver_sql("PRAGMA synchronous").scalar_one()), "?"
                )
        problems = []
        if state.head.seq != chained_total:
            problems.append(f"chain head at {state.head.seq}, expected {chained_total}")
        if not report.ok or report.checked != chained_total:
            problems.append(f"chain verification: ok={report.ok} checked={report.checked} {report.problem}")
        if rows != plain_total:
            problems.append(f"plain table holds {rows} rows, expected {plain_total}")
        head_lines = len(head_file.path.read_text().splitlines()) if head_file.path.exists() else 0
        if head_lines != WARMUP + cases[HEADFILE].events:
            problems.append(f"head file holds {head_lines} lines, expected {WARMUP + cases[HEADFILE].events}")
        if problems:
            raise RuntimeError(f"{facts['dialect']}: " + "; ".join(problems))
        facts["chain_records_verified"] = report.checked
        facts["plain_rows"] = rows
        facts["head_file_lines"] = head_lines
        return cases, facts
    finally:
        file_store.close()
        plain_store.close()


# ---- report --------------------------------------------------------------------------------------


def _disk_of(path: Path) -> str:
    """Filesystem, device and (when the kernel says) whether it is rotational, for ``path``."""
    try:
        out = subprocess.run(
            ["df", "--output=source,fstype", str(path)], capture_output=True, text=True, timeout=10, check=True
        ).stdout.split("\n")[1]
        source, fstype = out.split()
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        return "unknown"
    dev = Path(source).name
    rota = Path(f"/sys/block/{dev}/queue/rotational")
    kind = ""
    with contextlib.suppress(OSError):
        kind = ", reports rotational" if rota.read_text().strip() == "1" else ", reports non-rotational"
    return f"{source} ({fstype}{kind})"


def _fmt_rate(x: float) -> str:
    return f"{x:,.0f}"


def _lat_ms(values: list[float], q: float) -> str:
    return f"{percentile(values, q) * 1000:.2f}" if values else "-"


def run(opts: Options) -> BenchResult:
    """Run the audit append benchmark on SQLite, and on PostgreSQL when its binaries are installed."""
    per_case = 300 if opts.quick else 2000
    rounds = 3 if opts.quick else 4
    result = BenchResult("audit", "audit appends per second (one event per transaction) vs plain inserts")
    folder = Path(tempfile.mkdtemp(prefix="clonebox-bench-audit-"))
    backends: dict[str, tuple[dict[str, _Case], dict[str, Any]]] = {}
    try:
        sqlite_dir = folder / "sqlite"
        sqlite_dir.mkdir()
        backends["SQLite"] = _measure_backend(f"sqlite:///{sqlite_dir / 'fleet.db'}", sqlite_dir, per_case, rounds)
        pg_dir = folder / "postgresql"
        pg_dir.mkdir()
        if missing := _pg_missing():
            print(f"note: PostgreSQL not measured, SQLite only: {missing}", flush=True)
            result.notes.append(f"PostgreSQL not measured: {missing} (install postgresql, or set CLONEBOX_PG_BINDIR)")
        else:
            with _postgres() as url:
                backends["PostgreSQL"] = _measure_backend(url, pg_dir, per_case, rounds)
        disk = _disk_of(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    table = Table(
        f"{per_case} events per case in {rounds} interleaved rounds after {WARMUP} warm-up appends; "
        "one event per transaction",
        ["backend", "case", "events", "appends/s", "per-round spread", "p50 ms", "p99 ms", "this / baseline"],
    )
    data: dict[str, Any] = {"events_per_case": per_case, "rounds": rounds, "threads": THREADS, "disk": disk}
    for backend, (cases, facts) in backends.items():
        base = cases[BASELINE].rate
        base_mt = cases[BASELINE_MT].rate
        for name in CASES:
            c = cases[name]
            ref = base_mt if name == CHAINED_MT else base
            spread = f"{min(c.round_rates):,.0f}-{max(c.round_rates):,.0f}" if c.round_rates else "-"
            table.rows.append(
                [
                    backend,
                    name + (" (stopped early)" if c.stopped_early else ""),
                    str(c.events),
                    _fmt_rate(c.rate),
                    spread,
                    _lat_ms(c.latencies, 50),
                    _lat_ms(c.latencies, 99),
                    "-" if name in (BASELINE, BASELINE_MT) else f"{c.rate / ref:.3f}" if ref else "-",
                ]
            )
        result.ratios.append(Ratio(f"{backend}: chained / baseline (appends/s)", cases[CHAINED].rate / base, ">= 0.33"))
        result.ratios.append(
            Ratio(f"{backend}: chained + head file / baseline (appends/s)", cases[HEADFILE].rate / base, ">= 0.1")
        )
        result.ratios.append(
            Ratio(
                f"{backend}: chained, {THREADS} threads / baseline, {THREADS} threads (appends/s)",
                cases[CHAINED_MT].rate / base_mt,
                ">= 0.33",
            )
        )
        result.ratios.append(
            Ratio(
                f"{backend}: chained, {THREADS} threads / chained, 1 thread (appends/s)",
                cases[CHAINED_MT].rate / cases[CHAINED].rate,
                ">= 0.8",
            )
        )
        settings = ", ".join(f"{k} {v}" for k, v in facts.items() if k not in ("dialect", "server"))
        result.notes.append(f"{backend}: {facts.get('server', '?')}; {settings}")
        data[backend] = {
            "facts": facts,
            "cases": {
                name: {
                    "events": c.events,
                    "seconds": round(c.seconds, 4),
                    "appends_per_second": round(c.rate, 1),
                    "round_rates": [round(x, 1) for x in c.round_rates],
                    "p50_ms": round(percentile(c.latencies, 50) * 1000, 4),
                    "p99_ms": round(percentile(c.latencies, 99) * 1000, 4),
                    "stopped_early": c.stopped_early,
                }
                for name, c in cases.items()
            },
        }
    result.tables.append(table)
    result.notes.append(
        "baseline = one transaction per event (opened as the store opens write transactions) with one INSERT of "
        "the same row into a plain table with the columns and indexes of audit_events; no MAC, no head-row read "
        "or lock, no head file"
    )
    result.notes.append(f"SQLite file, PostgreSQL data directory and head files on {disk}")
    result.notes.append(
        "SQLite runs with the store's synchronous = NORMAL (WAL: commits are not fsynced); PostgreSQL with the "
        "server defaults (every commit waits for a WAL fsync), so the backends' absolute figures are not like "
        "for like; the ratios are within one backend"
    )
    result.notes.append(
        f"the {THREADS}-thread rows are compared with the {THREADS}-thread baseline; the goals are this "
        "benchmark's own starting points, not figures from DESIGN.md"
    )
    result.data = data
    return result
