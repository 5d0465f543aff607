"""Fixtures of the store tests: a throwaway PostgreSQL cluster, database URLs for both backends.

``postgres_server`` is written to be reusable by other suites (it belongs in ``tests/conftest.py``):
it starts a private PostgreSQL cluster for the test session - ``initdb`` into a temporary directory,
``pg_ctl start`` on a free loopback port with the unix socket inside that directory - and removes it
afterwards. Set ``CLONEBOX_TEST_PG_URL`` (a SQLAlchemy URL such as
``postgresql+psycopg://user:pw@host/db``) to use an existing server instead; tests then reset the
``public`` schema of that database, so point it at a database you can throw away. When no server
binaries are found the PostgreSQL tests skip with the reason (CI installs them).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import make_url

from tests import pgcluster

PG_URL_ENV = "CLONEBOX_TEST_PG_URL"
#: newest migration; bump with every new file in store/migrations/versions
HEAD_REVISION = "0008"


@dataclass
class PostgresServer:
    """A PostgreSQL server the tests may use: ``url`` names one database on it."""

    url: str

    def libpq_dsn(self) -> str:
        """The URL as a plain libpq connection string (for psycopg directly)."""
        return make_url(self.url).set(drivername="postgresql").render_as_string(hide_password=False)

    def reset(self) -> None:
        """Empty the database: drop and recreate the ``public`` schema."""
        with psycopg.connect(self.libpq_dsn(), autocommit=True) as conn:
            conn.execute("DROP SCHEMA IF EXISTS public CASCADE")
            conn.execute("CREATE SCHEMA public")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the session (private throwaway cluster unless CLONEBOX_TEST_PG_URL)."""
    if url := os.environ.get(PG_URL_ENV):
        yield PostgresServer(url)
        return
    if why := pgcluster.missing():
        pytest.skip(f"{why}, or set {PG_URL_ENV} to a throwaway database")
    # speed over durability: the cluster is deleted after the session
    with pgcluster.cluster("clonebox_test", durable=False) as url:
        yield PostgresServer(url)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database on each backend: a SQLite file, or the PostgreSQL test database reset."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fleet.db'}"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    server.reset()
    return server.url


def migrate_to(store_url: str, revision: str, *, down: bool = False) -> set[str]:
    """Upgrade (or with ``down`` downgrade) the store at ``store_url`` to ``revision``; its tables then."""
    from alembic import command
    from sqlalchemy import inspect

    from clonebox_controller.store.engine import alembic_config, create_store_engine, current_revision

    cfg = alembic_config()
    engine = create_store_engine(store_url)
    try:
        with engine.connect() as conn:
            cfg.attributes["connection"] = conn
            (command.downgrade if down else command.upgrade)(cfg, revision)
            conn.commit()
        assert current_revision(engine) == revision
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def add_host_row(store_url: str, name: str, disk_mib: int = 10_000) -> None:
    """
    Put host ``name`` into a database migrated to an older revision, as the code of that time would.

    A plain insert into ``hosts`` (its columns have not changed since revision 0001): today's ``Store``
    reads tables of later revisions (a host's allocation counts volume reservations), so it cannot
    write an older database.
    """
    from datetime import UTC, datetime

    from sqlalchemy import insert

    from clonebox_controller.store.engine import create_store_engine
    from clonebox_controller.store.tables import HostRow

    now = datetime.now(UTC)
    engine = create_store_engine(store_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                insert(HostRow.__table__).values(  # type: ignore[arg-type]
                    name=name,
                    address=f"{name}:7000",
                    capacity_vcpus=2,
                    capacity_memory_mib=2048,
                    capacity_disk_mib=disk_mib,
                    allocatable_vcpus=2,
                    allocatable_memory_mib=2048,
                    allocatable_disk_mib=disk_mib,
                    hypervisor={"uri": "test:///default"},
                    state="READY",
                    state_reason="",
                    cordoned=False,
                    registered_time=now,
                    last_heartbeat=now,
                    agent_epoch=1,
                    agent_sequence=0,
                )
            )
    finally:
        engine.dispose()
