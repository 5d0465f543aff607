"""Alembic environment: runs migrations on the connection the store hands over.

Only the online mode is supported: the store always migrates a live database, through the
connection in ``config.attributes["connection"]`` (so SQLite's per-connection settings apply).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, text

from clonebox_controller.store.tables import Base

#: arbitrary constant key of the PostgreSQL advisory lock that serialises concurrent upgrades
_MIGRATION_LOCK_KEY = 0x636C6F6E65626F78  # "clonebox"


def _run(connection: Connection) -> None:
    is_sqlite = connection.dialect.name == "sqlite"
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        # SQLite's DDL is transactional once pysqlite stops committing behind our back (engine.py),
        # so a failed migration rolls back instead of leaving half a schema
        transactional_ddl=True,
        # SQLite cannot ALTER most things; batch mode rebuilds tables instead
        render_as_batch=is_sqlite,
        compare_type=True,
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            # held until commit; a concurrent upgrader blocks here, then sees the new version
            connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK_KEY})
        context.run_migrations()


def _main() -> None:
    if context.is_offline_mode():
        raise RuntimeError("offline (--sql) migrations are not supported by the fleet store")
    connection = context.config.attributes.get("connection")
    if not isinstance(connection, Connection):
        raise RuntimeError("run migrations through clonebox_controller.store.engine.upgrade_to_head")
    _run(connection)


_main()
