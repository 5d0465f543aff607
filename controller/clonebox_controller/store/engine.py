"""
Engine construction and schema migration for the fleet store.

Two backends are supported and tested with the same suite:

* ``sqlite:///path`` - the embedded default. WAL lets readers run beside the single writer,
  ``foreign_keys`` is off by default in SQLite and must be switched on per connection, and
  ``busy_timeout`` makes a writer wait for the lock instead of failing at once. pysqlite's own
  transaction handling is switched off (it neither begins on SELECT nor lets us choose the BEGIN
  flavour); SQLAlchemy emits ``BEGIN`` itself, and ``BEGIN IMMEDIATE`` for write transactions so
  that two writers serialise at the start instead of deadlocking on a read-to-write upgrade.
* ``postgresql+psycopg://...`` - production and HA. Writers lock rows with ``SELECT ... FOR UPDATE``.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.pool import ConnectionPoolEntry

#: Connection execution option that marks a write transaction (SQLite: ``BEGIN IMMEDIATE``).
WRITE_OPTION = "clonebox_write"

#: How long a SQLite writer waits for the database lock before giving up.
SQLITE_BUSY_TIMEOUT_MS = 30_000

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

_ALEMBIC_LOCK = threading.Lock()


def create_store_engine(url: str, *, echo: bool = False, **kwargs: Any) -> Engine:
    """Create an Engine for ``url`` with the per-backend settings the store relies on."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database in (None, "", ":memory:"):
            # each pooled connection would get its own empty in-memory database
            raise ValueError("the fleet store needs a SQLite file, not an in-memory database")
        # a fresh install points at a state directory that may not exist yet
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(parsed, echo=echo, **kwargs)
        _configure_sqlite(engine)
        return engine
    if parsed.drivername == "postgresql":
        # plain postgresql:// means psycopg2 to SQLAlchemy, which we do not ship; psycopg 3 we do
        parsed = parsed.set(drivername="postgresql+psycopg")
    # pool_pre_ping: a controller outlives database restarts and failovers
    return create_engine(parsed, echo=echo, pool_pre_ping=True, **kwargs)


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: sqlite3.Connection, _record: ConnectionPoolEntry) -> None:
        # None = pysqlite never emits BEGIN/COMMIT on its own; the "begin" hook below does it
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            # busy_timeout first: switching to WAL needs a lock another process may hold
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA foreign_keys = ON")
            # NORMAL is durable in WAL mode except for the last commits on power loss, and agents
            # re-report everything they run on reconnect, so the store can afford it
            cursor.execute("PRAGMA synchronous = NORMAL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        if conn.get_execution_options().get(WRITE_OPTION):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")


def alembic_config() -> Config:
    """Build an alembic Config pointing at the packaged migrations (no ``alembic.ini`` needed)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    # "os": split version_locations on os.pathsep, so paths with spaces work
    cfg.set_main_option("path_separator", "os")
    cfg.set_main_option("version_locations", str(MIGRATIONS_DIR / "versions"))
    return cfg


def upgrade_to_head(engine: Engine) -> None:
    """
    Apply every pending migration; a no-op on an up-to-date database.

    Safe to call from several processes at once: on SQLite the migration runs in a ``BEGIN
    IMMEDIATE`` transaction, on PostgreSQL ``env.py`` takes a transaction-level advisory lock before
    it reads the current version, so a second process waits and then finds nothing to do.
    """
    cfg = alembic_config()
    # alembic's ``context``/``op`` proxies are process-global, so two threads must not migrate at
    # once; this lock is about that library limitation only - processes are serialised by the
    # database as described above
    with _ALEMBIC_LOCK, engine.connect() as conn:
        conn.execution_options(**{WRITE_OPTION: True})
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
        # env.py commits its own transaction; this covers an implicit one alembic may leave open
        if conn.in_transaction():
            conn.commit()


def current_revision(engine: Engine) -> str | None:
    """Return the alembic revision the database is at (None when never migrated)."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()
