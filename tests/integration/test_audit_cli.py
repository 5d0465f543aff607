"""``clonebox audit`` against a real in-process controller over mTLS (the CLI runs in a thread)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from clonebox.controller.v1 import host_service_pb2
from typer.testing import CliRunner

from clonebox_cli.main import app
from clonebox_core.model import Resources
from tests.integration.conftest import Fleet

pytestmark = pytest.mark.integration

SMALL = Resources(vcpus=4, memory_mib=4096, disk_mib=100_000)


class Cli:
    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.tls = fleet.pki.folder("user", "audit-admin", "admin", file_name="user")
        self.runner = CliRunner()

    async def __call__(self, *args: str) -> tuple[int, str, str]:
        argv = ["--controller", self.fleet.controller.address, "--tls-dir", str(self.tls), *args]
        result = await asyncio.to_thread(self.runner.invoke, app, argv)
        return result.exit_code, result.stdout, result.stderr


@pytest.fixture
async def cli(fleet: Fleet) -> Cli:
    await fleet.add_agent("h1", SMALL)
    for _ in range(3):
        await fleet.hosts.CordonHost(host_service_pb2.CordonHostRequest(name="h1"))
        await fleet.hosts.UncordonHost(host_service_pb2.UncordonHostRequest(name="h1"))
    return Cli(fleet)


async def test_list_show_and_filters(cli: Cli) -> None:
    code, out, err = await cli("-o", "json", "audit", "list", "--action", "host.cordon", "--since", "1h")
    assert code == 0, err
    records = json.loads(out)["records"]
    assert [r["action"] for r in records] == ["host.cordon"] * 3
    assert records[0]["seq"] > records[-1]["seq"] and records[0]["outcome"] == "succeeded"
    code, out, _ = await cli("-o", "json", "audit", "show", records[0]["id"])
    assert code == 0 and json.loads(out)["mac"] == records[0]["mac"]
    code, out, _ = await cli("audit", "list", "--resource", "hosts/h1", "--limit", "2")
    assert code == 0 and out.count("hosts/h1") == 2
    code, _, err = await cli("audit", "list", "--since", "banana")
    assert code == 2 and "--since" in err
    code, _, err = await cli("audit", "list", "--outcome", "maybe")
    assert code == 2 and "--outcome" in err
    code, _, err = await cli("audit", "show", "no-such-event")
    assert code == 3 and "not found" in err


async def test_verify_passes_then_names_the_first_modified_record(cli: Cli) -> None:
    code, out, err = await cli("audit", "verify")
    assert code == 0 and "intact" in out, err
    db = cli.fleet.tmp / "fleet.db"
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE audit_events SET resource = 'hosts/other' WHERE seq = 3")
        event_id = conn.execute("SELECT event_id FROM audit_events WHERE seq = 3").fetchone()[0]
    code, out, err = await cli("audit", "verify")
    assert code == 1
    assert "record 3" in err and event_id in err
    code, out, _ = await cli("-o", "json", "audit", "verify")
    assert code == 1 and json.loads(out)["bad_seq"] == 3


async def test_export_and_archive_leave_a_verifiable_rest(cli: Cli, tmp_path: Path) -> None:
    out_file = tmp_path / "all.jsonl"
    code, out, err = await cli("audit", "export", "--format", "jsonl", "-o", str(out_file))
    assert code == 0, err
    lines = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert lines[0] == {"start": {"seq": 0, "mac": "00" * 32}}
    assert [r["seq"] for r in lines[1:]] == list(range(1, len(lines)))
    json_file = tmp_path / "all.json"
    code, _, _ = await cli("audit", "export", "--format", "json", "-o", str(json_file))
    assert code == 0 and len(json.loads(json_file.read_text())["records"]) == len(lines) - 1

    later = (datetime.now(UTC) + timedelta(minutes=1)).isoformat()
    archive = tmp_path / "archive.jsonl"
    code, out, err = await cli("-o", "json", "audit", "archive", "--before", later, "-o", str(archive))
    assert code == 0, err
    summary = json.loads(out)
    assert summary["removed"] == summary["records"] == len(archive.read_text().splitlines()) - 1 > 0
    code, out, err = await cli("audit", "verify")
    assert code == 0, err
    code, out, _ = await cli("-o", "json", "audit", "list")
    remaining = json.loads(out)["records"]
    assert [r["action"] for r in remaining] == ["audit.archive"]
    assert remaining[0]["seq"] == summary["anchor_seq"] + 1
    # nothing older is left to archive, and saying so is not an error
    code, out, _ = await cli("audit", "archive", "--before", "1h", "-o", str(tmp_path / "none.jsonl"))
    assert code == 0 and "nothing to archive" in out
