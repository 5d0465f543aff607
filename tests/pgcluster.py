"""A throwaway PostgreSQL cluster (initdb + pg_ctl on a free loopback port), for tests and benchmarks.

One implementation for both: the store tests run it with durability off (speed), the audit benchmark
with the server's defaults (every commit waits for its WAL fsync, as in production).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg


def bindir() -> Path | None:
    """Directory with ``initdb`` and ``pg_ctl`` (``CLONEBOX_PG_BINDIR`` overrides)."""
    override = os.environ.get("CLONEBOX_PG_BINDIR")
    candidates = [override] if override else []
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for candidate in candidates:
        if candidate and (Path(candidate) / "initdb").exists() and (Path(candidate) / "pg_ctl").exists():
            return Path(candidate)
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb and shutil.which("pg_ctl") else None


def missing() -> str:
    """Why a cluster cannot be started here ("" when it can)."""
    if bindir() is None:
        return "PostgreSQL server binaries (initdb, pg_ctl) not found: install postgresql"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser: cannot start PostgreSQL as 'postgres'"
    return ""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def cluster(database: str, *, durable: bool) -> Iterator[str]:
    """Start a cluster, create ``database``, yield its SQLAlchemy URL; stop and remove it afterwards.

    ``durable=False`` turns fsync, synchronous_commit and full-page writes off. RuntimeError when the
    cluster cannot start (``missing()`` says why beforehand).
    """
    why = missing()
    found = bindir()
    if why or found is None:
        raise RuntimeError(f"cannot start PostgreSQL: {why}")
    # PostgreSQL refuses to run as root: run the server binaries as the postgres user
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    # not pytest's tmp_path: its parent is private to root and postgres could not enter it
    base = Path(tempfile.mkdtemp(prefix="clonebox-pg-"))
    data, sockets, log = base / "data", base / "sock", base / "server.log"
    sockets.mkdir()
    if as_user:
        shutil.chown(base, "postgres", "postgres")
        shutil.chown(sockets, "postgres", "postgres")
    port = _free_port()
    options = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={sockets} -c max_connections=300"
    if not durable:
        options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    initdb = [str(found / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"]
    started = False
    try:
        try:
            subprocess.run([*as_user, *initdb, *([] if durable else ["--no-sync"])], check=True, capture_output=True)
            started = True
            ctl = [str(found / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60", "start"]
            subprocess.run([*as_user, *ctl], check=True, capture_output=True, timeout=90)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            details = (exc.stderr or b"").decode(errors="replace")
            if log.exists():
                details += log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"could not start the PostgreSQL cluster: {details}") from exc
        with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{database}"')
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/{database}"
    finally:
        if started:
            subprocess.run(
                [*as_user, str(found / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                check=False,
                capture_output=True,
                timeout=90,
            )
        shutil.rmtree(base, ignore_errors=True)


def worker_database(url: str, worker: str) -> str:
    """``url`` (a SQLAlchemy URL of a database) with the database renamed ``<name>_<worker>``, created if missing.

    For pytest-xdist: tests that empty their database must not share it with another worker.
    """
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    name = f"{parsed.database or 'postgres'}_{worker}"
    dsn = parsed.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
            with contextlib.suppress(psycopg.errors.DuplicateDatabase):  # another run made it meanwhile
                conn.execute(f'CREATE DATABASE "{name}"')
    return parsed.set(database=name).render_as_string(hide_password=False)
