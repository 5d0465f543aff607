"""Agent journal: the event epoch, the outcome of every mutation by request id, and the audit outbox.

SQLite with ``synchronous=FULL`` so that an answered request survives a kill -9: a retry after a crash
finds its outcome instead of doing the work twice. Audit events wait in the outbox, written in the
same transaction as the change they record, until the controller acknowledges them (at least once,
de-duplicated by event id on the controller).

Transactions: every change that makes several artifacts records each step with how to undo it before
it acts and what it made right after (``txns``/``txn_steps``); a transaction ends committed (in the
same SQLite transaction as its request's outcome) or rolled back with its error. Unfinished ones are
rolled back when the agent starts (``clonebox_agent.app.recovery``).

Snapshots: the hypervisor keeps the snapshots themselves; the journal keeps what it cannot (description,
tags, creator, automatic + reason) in ``snapshot_meta``, written in the same SQLite transaction that
commits the snapshot's create, and each VM's retention policy in ``snapshot_policies``. New tables are
added with ``CREATE TABLE IF NOT EXISTS``, so an older journal gains them when it is opened.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from clonebox_agent.ports import TxnStep
from clonebox_core.audit.event import AuditEvent
from clonebox_core.model import StepState, Transaction, TransactionState
from clonebox_core.snapshots import SnapshotPolicy

_TXN_COLUMNS = "id, kind, target, request_id, state, error, created_at, finished_at"


#: the journal's transactions are the core model's (they travel to the controller and the CLI)
TxnState = TransactionState
Txn = Transaction


@dataclass(frozen=True)
class SnapshotMeta:
    """What the journal knows about a snapshot beyond what the hypervisor keeps."""

    vm: str
    name: str
    description: str = ""
    tags: Mapping[str, str] = field(default_factory=dict)
    creator: str = ""
    automatic: bool = False
    reason: str = ""
    quiesced: bool = False


def _time(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text.replace("Z", "+00:00")) if text else None


class JournalStepLog:
    """The ``StepLog`` of one journaled transaction: every call is durable when it returns."""

    def __init__(self, journal: Journal, txn_id: str) -> None:
        self._journal = journal
        self.txn_id = txn_id

    def planned(self, name: str, undo: Mapping[str, str]) -> int:
        """See ``StepLog``."""
        return self._journal.plan_step(self.txn_id, name, undo)

    def made(self, n: int, identity: Mapping[str, str]) -> None:
        """See ``StepLog``."""
        self._journal.step_made(self.txn_id, n, identity)

    def undone(self, n: int, ok: bool) -> None:
        """See ``StepLog``."""
        self._journal.step_undone(self.txn_id, n, ok)

    def steps(self) -> list[TxnStep]:
        """See ``StepLog``."""
        txn = self._journal.txn(self.txn_id)
        return list(txn.steps) if txn is not None else []


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS revoked (serial TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS requests (
  request_id TEXT PRIMARY KEY,
  method TEXT NOT NULL,
  target TEXT NOT NULL,
  outcome TEXT NOT NULL,
  created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now'))
);
CREATE TABLE IF NOT EXISTS txns (
  id TEXT PRIMARY KEY,
  kind TEXT NOT NULL,
  target TEXT NOT NULL,
  request_id TEXT NOT NULL,
  state TEXT NOT NULL,
  error TEXT NOT NULL DEFAULT '',
  created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')),
  finished_at TEXT
);
CREATE INDEX IF NOT EXISTS txns_state ON txns(state);
CREATE TABLE IF NOT EXISTS txn_steps (
  txn_id TEXT NOT NULL REFERENCES txns(id),
  n INTEGER NOT NULL,
  name TEXT NOT NULL,
  undo TEXT NOT NULL,
  identity TEXT,
  state TEXT NOT NULL,
  PRIMARY KEY (txn_id, n)
);
CREATE TABLE IF NOT EXISTS snapshot_meta (
  vm TEXT NOT NULL,
  name TEXT NOT NULL,
  description TEXT NOT NULL DEFAULT '',
  tags TEXT NOT NULL DEFAULT '{}',
  creator TEXT NOT NULL DEFAULT '',
  automatic INTEGER NOT NULL DEFAULT 0,
  reason TEXT NOT NULL DEFAULT '',
  quiesced INTEGER NOT NULL DEFAULT 0,
  created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')),
  PRIMARY KEY (vm, name)
);
CREATE TABLE IF NOT EXISTS snapshot_policies (
  vm TEXT PRIMARY KEY,
  policy TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_outbox (
  n INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT NOT NULL UNIQUE,
  event TEXT NOT NULL
);
"""


class Journal:
    """Small synchronous SQLite journal; calls are short and guarded by one lock."""

    def __init__(self, path: Path, on_audit_append: Callable[[float], None] | None = None) -> None:
        """Open (or create) the journal at ``path``; ``on_audit_append`` hears each outbox write's seconds."""
        self._on_audit_append = on_audit_append
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def next_epoch(self) -> int:
        """Start a new event epoch: persisted, strictly greater than every earlier one."""
        with self._write():
            row = self._db.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()
            epoch = int(row[0]) + 1 if row else 1
            self._db.execute(
                "INSERT INTO meta(key, value) VALUES('epoch', ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                (str(epoch),),
            )
            return epoch

    def outcome(self, request_id: str) -> tuple[str, str, dict[str, Any]] | None:
        """(method, target, outcome) recorded for ``request_id``, if any."""
        with self._lock:
            row = self._db.execute(
                "SELECT method, target, outcome FROM requests WHERE request_id=?", (request_id,)
            ).fetchone()
        if row is None:
            return None
        return str(row[0]), str(row[1]), json.loads(row[2])

    def record(
        self,
        request_id: str,
        method: str,
        target: str,
        outcome: dict[str, Any],
        audit: AuditEvent | None = None,
        *,
        forget_snapshots: tuple[str, Sequence[str] | None] | None = None,
    ) -> None:
        """Remember that ``request_id`` finished with ``outcome`` (first record wins), with its audit event.

        Both land in one transaction: an answered request always has its event in the outbox.
        ``forget_snapshots`` = (vm, names) drops those snapshots' metadata in the same transaction (names
        None: every snapshot of the VM, and its policy).
        """
        started = time.perf_counter()
        with self._write():
            if forget_snapshots is not None:
                self._forget_snapshots(*forget_snapshots)
            if request_id:
                self._db.execute(
                    "INSERT OR IGNORE INTO requests(request_id, method, target, outcome) VALUES(?,?,?,?)",
                    (request_id, method, target, json.dumps(outcome)),
                )
            if audit is not None:
                self._add_event(audit)
        if audit is not None:
            self._appended(started)

    def _add_event(self, event: AuditEvent) -> None:
        self._db.execute("INSERT OR IGNORE INTO audit_outbox(id, event) VALUES(?, ?)", (event.id, event.dumps()))

    def add_events(self, events: list[AuditEvent]) -> None:
        """Put events in the outbox (durably) on their own."""
        started = time.perf_counter()
        with self._write():
            for event in events:
                self._add_event(event)
        self._appended(started)

    def _appended(self, started: float) -> None:
        if self._on_audit_append is not None:
            self._on_audit_append(time.perf_counter() - started)

    def pending_events(self, limit: int = 100) -> list[AuditEvent]:
        """The oldest events not yet acknowledged by the controller."""
        with self._lock:
            rows = self._db.execute("SELECT event FROM audit_outbox ORDER BY n LIMIT ?", (limit,)).fetchall()
        return [AuditEvent.from_json(json.loads(r[0])) for r in rows]

    def ack_events(self, ids: list[str]) -> None:
        """Drop events the controller has durably chained."""
        with self._lock:
            self._db.executemany("DELETE FROM audit_outbox WHERE id=?", [(i,) for i in ids])

    def audit_witness(self) -> tuple[int, bytes] | None:
        """The last audit chain head the controller sent (this host's witness copy)."""
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key='audit_head'").fetchone()
        if row is None:
            return None
        seq, _, mac = str(row[0]).partition(" ")
        return int(seq), bytes.fromhex(mac)

    def set_audit_witness(self, seq: int, mac: bytes) -> None:
        """Keep the newest audit head (older ones never replace a newer one)."""
        current = self.audit_witness()
        if current is not None and current[0] >= seq:
            return
        with self._lock:
            self._db.execute(
                "INSERT INTO meta(key, value) VALUES('audit_head', ?) "
                "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                (f"{seq} {mac.hex()}",),
            )

    def revoked(self) -> set[str]:
        """Serials (hex) of revoked certificates, as last pushed by the controller."""
        with self._lock:
            return {str(r[0]) for r in self._db.execute("SELECT serial FROM revoked")}

    def set_revoked(self, serials: set[str]) -> None:
        """Replace the deny list (it survives restarts, so a revoked identity stays refused offline)."""
        with self._write():
            self._db.execute("DELETE FROM revoked")
            self._db.executemany("INSERT INTO revoked(serial) VALUES(?)", [(s,) for s in sorted(serials)])

    # ---- transactions ------------------------------------------------------------------------------

    def begin_txn(self, txn_id: str, kind: str, target: str, request_id: str) -> None:
        """Open transaction ``txn_id`` (durable when this returns)."""
        with self._lock:
            self._db.execute(
                "INSERT INTO txns(id, kind, target, request_id, state) VALUES(?,?,?,?,?)",
                (txn_id, kind, target, request_id, TxnState.OPEN),
            )

    def plan_step(self, txn_id: str, name: str, undo: Mapping[str, str]) -> int:
        """Record the next step of ``txn_id`` with how to undo it; its number."""
        with self._write():
            row = self._db.execute("SELECT COALESCE(MAX(n), 0) + 1 FROM txn_steps WHERE txn_id=?", (txn_id,))
            n = int(row.fetchone()[0])
            self._db.execute(
                "INSERT INTO txn_steps(txn_id, n, name, undo, state) VALUES(?,?,?,?,?)",
                (txn_id, n, name, json.dumps(dict(undo), sort_keys=True), StepState.PLANNED),
            )
        return n

    def step_made(self, txn_id: str, n: int, identity: Mapping[str, str]) -> None:
        """Record what step ``n`` made."""
        with self._lock:
            self._db.execute(
                "UPDATE txn_steps SET identity=?, state=? WHERE txn_id=? AND n=?",
                (json.dumps(dict(identity), sort_keys=True), StepState.DONE, txn_id, n),
            )

    def step_undone(self, txn_id: str, n: int, ok: bool) -> None:
        """Record the rollback of step ``n``."""
        with self._lock:
            self._db.execute(
                "UPDATE txn_steps SET state=? WHERE txn_id=? AND n=?",
                (StepState.UNDONE if ok else StepState.UNDO_FAILED, txn_id, n),
            )

    def finish_txn(
        self,
        txn_id: str,
        state: TxnState,
        error: str = "",
        *,
        outcome: tuple[str, str, str, dict[str, Any]] | None = None,
        audit: AuditEvent | None = None,
        snapshot: SnapshotMeta | None = None,
    ) -> None:
        """End ``txn_id`` as committed or rolled back, with the request's outcome and audit event, atomically.

        ``outcome`` is ``(request_id, method, target, outcome)``: a committed create and the answer a
        retry gets are one SQLite transaction, so a crash never separates them. ``snapshot``: the
        metadata of the snapshot a committed ``snapshot.create`` took, in the same transaction.
        """
        started = time.perf_counter()
        with self._write():
            if snapshot is not None:
                self._db.execute(
                    "INSERT OR REPLACE INTO snapshot_meta(vm, name, description, tags, creator, automatic, reason, "
                    "quiesced) VALUES(?,?,?,?,?,?,?,?)",
                    (
                        snapshot.vm,
                        snapshot.name,
                        snapshot.description,
                        json.dumps(dict(snapshot.tags), sort_keys=True),
                        snapshot.creator,
                        int(snapshot.automatic),
                        snapshot.reason,
                        int(snapshot.quiesced),
                    ),
                )
            self._db.execute(
                "UPDATE txns SET state=?, error=?, finished_at=strftime('%Y-%m-%dT%H:%M:%fZ','now') WHERE id=?",
                (state, error, txn_id),
            )
            if outcome is not None and outcome[0]:
                request_id, method, target, result = outcome
                self._db.execute(
                    "INSERT OR IGNORE INTO requests(request_id, method, target, outcome) VALUES(?,?,?,?)",
                    (request_id, method, target, json.dumps(result)),
                )
            if audit is not None:
                self._add_event(audit)
        if audit is not None:
            self._appended(started)

    def txn(self, txn_id: str) -> Txn | None:
        """One transaction with its steps."""
        with self._lock:
            row = self._db.execute(f"SELECT {_TXN_COLUMNS} FROM txns WHERE id=?", (txn_id,)).fetchone()
            return None if row is None else self._txn(row)

    def txns(self, *, state: TxnState | None = None, limit: int = 100) -> list[Txn]:
        """Transactions, newest first (only those in ``state`` when given)."""
        where, args = ("WHERE state=?", (state,)) if state is not None else ("", ())
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_TXN_COLUMNS} FROM txns {where} ORDER BY created_at DESC, rowid DESC LIMIT ?",
                (*args, limit),
            ).fetchall()
            return [self._txn(r) for r in rows]

    def _txn(self, row: tuple[Any, ...]) -> Txn:
        steps = [
            TxnStep(
                n=int(n),
                name=str(name),
                undo=json.loads(undo),
                identity=json.loads(identity) if identity else None,
                state=StepState(state),
            )
            for n, name, undo, identity, state in self._db.execute(
                "SELECT n, name, undo, identity, state FROM txn_steps WHERE txn_id=? ORDER BY n", (row[0],)
            )
        ]
        return Txn(
            id=str(row[0]),
            kind=str(row[1]),
            target=str(row[2]),
            request_id=str(row[3]),
            state=TxnState(row[4]),
            error=str(row[5]),
            created=_time(row[6]),
            finished=_time(row[7]),
            steps=tuple(steps),
        )

    # ---- snapshots -------------------------------------------------------------------------------

    def snapshot_meta(self, vm: str) -> dict[str, SnapshotMeta]:
        """The journal's metadata of ``vm``'s snapshots, by name."""
        with self._lock:
            rows = self._db.execute(
                "SELECT name, description, tags, creator, automatic, reason, quiesced FROM snapshot_meta WHERE vm=?",
                (vm,),
            ).fetchall()
        return {
            str(r[0]): SnapshotMeta(
                vm, str(r[0]), str(r[1]), json.loads(r[2]), str(r[3]), bool(r[4]), str(r[5]), bool(r[6])
            )
            for r in rows
        }

    def forget_snapshots(self, vm: str, names: Sequence[str] | None = None) -> None:
        """Drop the metadata of ``names`` (None: every snapshot of ``vm``, and its retention policy)."""
        with self._write():
            self._forget_snapshots(vm, names)

    def _forget_snapshots(self, vm: str, names: Sequence[str] | None) -> None:
        if names is None:
            self._db.execute("DELETE FROM snapshot_meta WHERE vm=?", (vm,))
            self._db.execute("DELETE FROM snapshot_policies WHERE vm=?", (vm,))
        else:
            self._db.executemany("DELETE FROM snapshot_meta WHERE vm=? AND name=?", [(vm, n) for n in names])

    def snapshot_policy(self, vm: str) -> SnapshotPolicy:
        """``vm``'s retention policy (an empty one when none is set)."""
        with self._lock:
            row = self._db.execute("SELECT policy FROM snapshot_policies WHERE vm=?", (vm,)).fetchone()
        return SnapshotPolicy(**json.loads(row[0])) if row else SnapshotPolicy()

    def snapshot_policies(self) -> dict[str, SnapshotPolicy]:
        """Every VM's retention policy that is not empty, by VM."""
        with self._lock:
            rows = self._db.execute("SELECT vm, policy FROM snapshot_policies ORDER BY vm").fetchall()
        return {str(r[0]): SnapshotPolicy(**json.loads(r[1])) for r in rows}

    def set_snapshot_policy(
        self, vm: str, policy: SnapshotPolicy, request_id: str = "", audit: AuditEvent | None = None
    ) -> None:
        """Store ``vm``'s policy (an empty one removes it) with the request's outcome and audit event."""
        started = time.perf_counter()
        with self._write():
            if policy.empty:
                self._db.execute("DELETE FROM snapshot_policies WHERE vm=?", (vm,))
            else:
                self._db.execute(
                    "INSERT INTO snapshot_policies(vm, policy) VALUES(?, ?) "
                    "ON CONFLICT(vm) DO UPDATE SET policy=excluded.policy",
                    (vm, json.dumps(asdict(policy), sort_keys=True)),
                )
            if request_id:
                self._db.execute(
                    "INSERT OR IGNORE INTO requests(request_id, method, target, outcome) VALUES(?,?,?,?)",
                    (request_id, "snapshot_policy", vm, json.dumps(asdict(policy))),
                )
            if audit is not None:
                self._add_event(audit)
        if audit is not None:
            self._appended(started)

    @contextlib.contextmanager
    def _write(self) -> Iterator[None]:
        """One write transaction (``BEGIN IMMEDIATE`` … COMMIT, or ROLLBACK on any error) under the lock."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()
