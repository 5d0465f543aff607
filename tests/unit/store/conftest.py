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

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import make_url

PG_URL_ENV = "CLONEBOX_TEST_PG_URL"


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


def _pg_bindir() -> Path | None:
    override = os.environ.get("CLONEBOX_PG_BINDIR")
    candidates = [override] if override else []
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for candidate in candidates:
        if candidate and (Path(candidate) / "initdb").exists() and (Path(candidate) / "pg_ctl").exists():
            return Path(candidate)
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the session (private throwaway cluster unless CLONEBOX_TEST_PG_URL)."""
    if url := os.environ.get(PG_URL_ENV):
        yield PostgresServer(url)
        return
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip(
            "PostgreSQL server binaries (initdb, pg_ctl) not found: install postgresql "
            f"or set {PG_URL_ENV} to a throwaway database"
        )
    # PostgreSQL refuses to run as root: run the server binaries as the postgres user
    as_user: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL as 'postgres'")
        as_user = ["runuser", "-u", "postgres", "--"]
    # not pytest's tmp_path: its parent is private to root and postgres could not enter it
    base = Path(tempfile.mkdtemp(prefix="clonebox-pg-"))
    data, sockets, log = base / "data", base / "sock", base / "server.log"
    sockets.mkdir()
    if as_user:
        shutil.chown(base, "postgres", "postgres")
        shutil.chown(sockets, "postgres", "postgres")
    port = _free_port()
    try:
        subprocess.run(
            [
                *as_user,
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
        )
        options = (
            f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={sockets} "
            # speed over durability: the cluster is deleted after the session
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300"
        )
        subprocess.run(
            [
                *as_user,
                str(bindir / "pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(log),
                "-o",
                options,
                "-w",
                "-t",
                "60",
                "start",
            ],
            check=True,
            capture_output=True,
        )
    except subprocess.CalledProcessError as exc:
        details = (exc.stderr or b"").decode(errors="replace")
        if log.exists():
            details += log.read_text(errors="replace")
        shutil.rmtree(base, ignore_errors=True)
        raise RuntimeError(f"could not start the test PostgreSQL cluster: {details}") from exc
    try:
        with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres", autocommit=True) as conn:
            conn.execute("CREATE DATABASE clonebox_test")
        yield PostgresServer(f"postgresql+psycopg://postgres@127.0.0.1:{port}/clonebox_test")
    finally:
        subprocess.run(
            [*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
            check=False,
            capture_output=True,
        )
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database on each backend: a SQLite file, or the PostgreSQL test database reset."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fleet.db'}"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    server.reset()
    return server.url
