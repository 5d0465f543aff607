"""Agent journal: the event epoch, the outcome of every mutation by request id, and the audit outbox.

SQLite with ``synchronous=FULL`` so that an answered request survives a kill -9: a retry after a crash
finds its outcome instead of doing the work twice. Audit events wait in the outbox, written in the
same transaction as the change they record, until the controller acknowledges them (at least once,
de-duplicated by event id on the controller). Later steps add in-flight transactions here.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clonebox_core.audit.event import AuditEvent

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
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            row = self._db.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()
            epoch = int(row[0]) + 1 if row else 1
            self._db.execute(
                "INSERT INTO meta(key, value) VALUES('epoch', ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                (str(epoch),),
            )
            self._db.execute("COMMIT")
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
        self, request_id: str, method: str, target: str, outcome: dict[str, Any], audit: AuditEvent | None = None
    ) -> None:
        """Remember that ``request_id`` finished with ``outcome`` (first record wins), with its audit event.

        Both land in one transaction: an answered request always has its event in the outbox.
        """
        started = time.perf_counter()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if request_id:
                    self._db.execute(
                        "INSERT OR IGNORE INTO requests(request_id, method, target, outcome) VALUES(?,?,?,?)",
                        (request_id, method, target, json.dumps(outcome)),
                    )
                if audit is not None:
                    self._add_event(audit)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        if audit is not None:
            self._appended(started)

    def _add_event(self, event: AuditEvent) -> None:
        self._db.execute("INSERT OR IGNORE INTO audit_outbox(id, event) VALUES(?, ?)", (event.id, event.dumps()))

    def add_events(self, events: list[AuditEvent]) -> None:
        """Put events in the outbox (durably) on their own."""
        started = time.perf_counter()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for event in events:
                    self._add_event(event)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
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
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM revoked")
            self._db.executemany("INSERT INTO revoked(serial) VALUES(?)", [(s,) for s in sorted(serials)])
            self._db.execute("COMMIT")

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()
