"""``clonebox snapshot`` (and ``vm delete --with-snapshots/--keep-export``) against the in-process fake controller."""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from clonebox.type.v1 import snapshot_pb2
from typer.testing import CliRunner, Result

from clonebox_cli.main import app
from clonebox_core.errors import InvalidArgument, Unavailable
from clonebox_core.snapshot_archive import read_archive

from .conftest import FakeImport, make_snapshot

if TYPE_CHECKING:
    from .conftest import FakeController

GIB = 1024**3


def cli(runner: CliRunner, fc: FakeController, *args: str) -> Result:
    return runner.invoke(app, ["--controller", fc.address, *args])


def error_line(result: Result) -> str:
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[-1]


def seed(fc: FakeController) -> None:
    """web: base -> second (current); base -> other branch."""
    fc.fleet.snapshots["web"] = [
        make_snapshot(
            "web", "base", size=2 * GIB + GIB // 2, description="clean install", children=["second", "other"]
        ),
        make_snapshot("web", "second", "base", current=True, size=512 * 1024),
        make_snapshot("web", "other", "base", size=100),
    ]


def imports(fc: FakeController, count: int = 1) -> list[FakeImport]:
    deadline = time.monotonic() + 5
    while len(fc.fleet.imports) < count and time.monotonic() < deadline:
        time.sleep(0.02)  # the server thread records an import after the client has its answer
    return fc.fleet.imports


# ---------------------------------------------------------------------------------------------- create


def test_create_table_and_request(runner: CliRunner, fake_controller: FakeController) -> None:
    r = cli(runner, fake_controller, "snapshot", "create", "web", "base", "-d", "before upgrade", "--tag", "a=b")
    assert r.exit_code == 0, r.output
    assert "snapshot base of vm web taken (internal, disks+memory" in r.stdout
    (req,) = fake_controller.fleet.calls("CreateSnapshot")
    assert req.vm == "web" and req.name == "base" and req.description == "before upgrade"
    assert dict(req.tags) == {"a": "b"} and req.kind == snapshot_pb2.SNAPSHOT_KIND_UNSPECIFIED and req.request_id


def test_create_json_disk_only(runner: CliRunner, fake_controller: FakeController) -> None:
    fake_controller.fleet.add_vm("shared-1")
    r = cli(runner, fake_controller, "-o", "json", "snapshot", "create", "shared-1", "--disk-only", "--quiesce")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["kind"] == "SNAPSHOT_KIND_EXTERNAL" and doc["quiesced"] is True and doc["has_memory"] is False
    (req,) = fake_controller.fleet.calls("CreateSnapshot")
    assert req.kind == snapshot_pb2.SNAPSHOT_KIND_EXTERNAL and req.quiesce


def test_shared_folder_refusal_hints_disk_only(runner: CliRunner, fake_controller: FakeController) -> None:
    fake_controller.fleet.add_vm("shared-1")
    r = cli(runner, fake_controller, "snapshot", "create", "shared-1", "s1")
    assert r.exit_code == 5
    line = error_line(r)
    assert "shared folders" in line and "--disk-only --quiesce" in line


def test_quiesce_needs_disk_only(runner: CliRunner, fake_controller: FakeController) -> None:
    r = cli(runner, fake_controller, "snapshot", "create", "web", "--quiesce")
    assert r.exit_code == 2 and "--disk-only" in error_line(r)
    assert fake_controller.fleet.calls("CreateSnapshot") == []


def test_unknown_vm_is_exit_3(runner: CliRunner, fake_controller: FakeController) -> None:
    r = cli(runner, fake_controller, "snapshot", "list", "nope")
    assert r.exit_code == 3 and "nope" in error_line(r)


# ------------------------------------------------------------------------------------------ list/show


def test_list_table_marks_current_and_humanizes(runner: CliRunner, fake_controller: FakeController) -> None:
    seed(fake_controller)
    r = cli(runner, fake_controller, "snapshot", "list", "web")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert "NAME" in lines[0] and "SIZE" in lines[0]
    row = {line.split()[0] if not line.startswith("*") else line.split()[1]: line for line in lines[1:]}
    assert row["second"].startswith("*") and not row["base"].startswith("*")
    assert "2.5GiB" in row["base"] and "512KiB" in row["second"] and "100B" in row["other"]
    assert "clean install" in row["base"]


def test_list_tree(runner: CliRunner, fake_controller: FakeController) -> None:
    seed(fake_controller)
    r = cli(runner, fake_controller, "snapshot", "list", "web", "--tree")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0] == "vm web"
    base = next(i for i, line in enumerate(lines) if "base" in line)
    second = next(i for i, line in enumerate(lines) if "second" in line)
    other = next(i for i, line in enumerate(lines) if "other" in line)
    # children are drawn under (and indented deeper than) their parent
    indent = [len(lines[i]) - len(lines[i].lstrip("│├└─ ")) for i in (base, second, other)]
    assert base < second < other and indent[1] > indent[0] and indent[2] == indent[1]
    assert "<- current" in lines[second] and "<- current" not in lines[base]


def test_list_json(runner: CliRunner, fake_controller: FakeController) -> None:
    seed(fake_controller)
    fake_controller.fleet.policies["web"] = snapshot_pb2.SnapshotPolicy(keep_last=3)
    r = cli(runner, fake_controller, "-o", "json", "snapshot", "list", "web")
    doc = json.loads(r.stdout)
    assert [s["name"] for s in doc["snapshots"]] == ["base", "second", "other"]
    assert doc["snapshots"][0]["size_bytes"] == 2 * GIB + GIB // 2 and doc["policy"]["keep_last"] == 3


def test_list_empty(runner: CliRunner, fake_controller: FakeController) -> None:
    r = cli(runner, fake_controller, "snapshot", "list", "web")
    assert r.exit_code == 0 and "no snapshots" in r.stdout


def test_show(runner: CliRunner, fake_controller: FakeController) -> None:
    seed(fake_controller)
    r = cli(runner, fake_controller, "snapshot", "show", "web", "base")
    assert r.exit_code == 0, r.output
    assert "clean install" in r.stdout and "second, other" in r.stdout and "2.5GiB" in r.stdout
    j = cli(runner, fake_controller, "-o", "json", "snapshot", "show", "web", "second")
    assert json.loads(j.stdout)["parent"] == "base"
    missing = cli(runner, fake_controller, "snapshot", "show", "web", "nope")
    assert missing.exit_code == 3 and "snapshot list" in error_line(missing)


# ------------------------------------------------------------------------------------ restore/delete


def test_restore(runner: CliRunner, fake_controller: FakeController) -> None:
    seed(fake_controller)
    # not a terminal: no prompt
    r = cli(runner, fake_controller, "snapshot", "restore", "web", "base", "--no-start")
    assert r.exit_code == 0, r.output
    assert "vm web restored to snapshot base (now stopped)" in r.stdout and "pre-restore-3" in r.stdout
    (req,) = fake_controller.fleet.calls("RestoreSnapshot")
    assert req.no_start and not req.no_backup and req.request_id
    j = cli(runner, fake_controller, "-o", "json", "snapshot", "restore", "web", "second", "--no-backup", "--yes")
    doc = json.loads(j.stdout)
    assert (doc["vm"]["name"] == "web" and "backup" not in doc) or not doc.get("backup", {}).get("name")


def test_restore_asks_on_a_terminal(
    runner: CliRunner, fake_controller: FakeController, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed(fake_controller)
    monkeypatch.setattr("clonebox_cli.snapshot.interactive", lambda: True)
    r = runner.invoke(app, ["--controller", fake_controller.address, "snapshot", "restore", "web", "base"], input="n\n")
    assert r.exit_code != 0 and fake_controller.fleet.calls("RestoreSnapshot") == []


def test_delete_children(runner: CliRunner, fake_controller: FakeController) -> None:
    seed(fake_controller)
    r = cli(runner, fake_controller, "snapshot", "delete", "web", "base", "--children")
    assert r.exit_code == 0 and "base, second, other" in r.stdout
    seed(fake_controller)
    j = cli(runner, fake_controller, "-o", "json", "snapshot", "delete", "web", "other")
    assert json.loads(j.stdout) == {"vm": "web", "deleted": ["other"]}


# ------------------------------------------------------------------------------------- prune/policy


def test_prune_dry_run_table_and_json(runner: CliRunner, fake_controller: FakeController) -> None:
    seed(fake_controller)
    fake_controller.fleet.policies["web"] = snapshot_pb2.SnapshotPolicy(keep_last=1)
    r = cli(runner, fake_controller, "snapshot", "prune", "web", "--dry-run")
    assert r.exit_code == 0, r.output
    rows = {line.split()[0]: line for line in r.stdout.splitlines()[1:] if line.strip()}
    assert "would delete" in rows["base"] and "keep" in rows["other"] and "keep_last 1" in rows["other"]
    assert "would delete 1 of 3" in r.stdout
    assert len(fake_controller.fleet.snapshots["web"]) == 3
    j = cli(runner, fake_controller, "-o", "json", "snapshot", "prune", "web")
    doc = json.loads(j.stdout)
    assert doc["dry_run"] is False and [d["name"] for d in doc["decisions"] if not d["keep"]] == ["base"]


def test_policy_show_and_set(runner: CliRunner, fake_controller: FakeController) -> None:
    r = cli(runner, fake_controller, "snapshot", "policy", "web")
    assert r.exit_code == 0 and "none" in r.stdout
    fake_controller.fleet.policies["web"] = snapshot_pb2.SnapshotPolicy(keep_daily=7)
    s = cli(runner, fake_controller, "snapshot", "policy", "web", "--keep-last", "5", "--max-age", "30d",
            "--max-total-size", "20GiB")  # fmt: skip
    assert s.exit_code == 0, s.output
    (req,) = fake_controller.fleet.calls("SetSnapshotPolicy")
    # rules not named keep their values
    assert req.policy.keep_last == 5 and req.policy.keep_daily == 7
    assert req.policy.max_age_seconds == 30 * 86400 and req.policy.max_total_bytes == 20 * GIB
    assert "max-age 30d" in s.stdout and "max-total-size 20GiB" in s.stdout and "keep-daily 7" in s.stdout
    j = cli(runner, fake_controller, "-o", "json", "snapshot", "policy", "web")
    assert json.loads(j.stdout)["policy"]["max_total_bytes"] == 20 * GIB
    c = cli(runner, fake_controller, "-o", "json", "snapshot", "policy", "web", "--clear")
    assert json.loads(c.stdout)["policy"]["keep_last"] == 0
    bad = cli(runner, fake_controller, "snapshot", "policy", "web", "--max-age", "thirty days")
    assert bad.exit_code == 2 and "--max-age" in error_line(bad)


# ----------------------------------------------------------------------------------------- export


def test_export_writes_a_readable_archive(runner: CliRunner, fake_controller: FakeController, tmp_path: Path) -> None:
    seed(fake_controller)
    out = tmp_path / "web.cbx"
    r = cli(runner, fake_controller, "-o", "json", "snapshot", "export", "web", "base", "-o", str(out))
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["file"] == str(out) and doc["encrypted"] is False and doc["file_bytes"] == out.stat().st_size
    assert not (tmp_path / "web.cbx.partial").exists()
    with out.open("rb") as f:
        parts = list(read_archive(f))
    assert parts[0].header.snapshot.name == "base" and parts[-1].WhichOneof("part") == "trailer"
    assert (
        b"".join(p.chunk.data for p in parts if p.WhichOneof("part") == "chunk") == fake_controller.fleet.export_image
    )


def test_export_encrypted_with_env_passphrase(
    runner: CliRunner, fake_controller: FakeController, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed(fake_controller)
    monkeypatch.setenv("EXPORT_PASS", "correct horse battery staple")
    out = tmp_path / "web.cbx"
    r = cli(runner, fake_controller, "snapshot", "export", "web", "base", "-o", str(out), "--encrypt",
            "--passphrase", "env:EXPORT_PASS")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "encrypted" in r.stdout and "correct horse" not in r.output
    with out.open("rb") as f, pytest.raises(InvalidArgument):
        read_archive(f)
    with out.open("rb") as f:
        parts = list(read_archive(f, passphrase=b"correct horse battery staple"))
    assert parts[0].header.snapshot.name == "base"
    # --encrypt without a passphrase, and a missing variable, are refused before any file is made
    other = tmp_path / "other.cbx"
    assert (
        cli(runner, fake_controller, "snapshot", "export", "web", "base", "-o", str(other), "--encrypt").exit_code == 2
    )
    missing = cli(runner, fake_controller, "snapshot", "export", "web", "base", "-o", str(other), "--encrypt",
                  "--passphrase", "env:NOPE_NOT_SET")  # fmt: skip
    assert missing.exit_code != 0 and not other.exists()


def test_export_refuses_to_overwrite(runner: CliRunner, fake_controller: FakeController, tmp_path: Path) -> None:
    seed(fake_controller)
    out = tmp_path / "web.cbx"
    out.write_bytes(b"precious")
    r = cli(runner, fake_controller, "snapshot", "export", "web", "base", "-o", str(out))
    assert r.exit_code == 4 and "--force" in error_line(r)
    assert out.read_bytes() == b"precious" and fake_controller.fleet.calls("ExportSnapshot") == []
    forced = cli(runner, fake_controller, "snapshot", "export", "web", "base", "-o", str(out), "--force")
    assert forced.exit_code == 0 and out.read_bytes() != b"precious"


def test_export_failure_removes_the_partial_file(
    runner: CliRunner, fake_controller: FakeController, tmp_path: Path
) -> None:
    seed(fake_controller)
    fake_controller.fleet.export_error = Unavailable("agent h1 went away", reason="AGENT_UNREACHABLE")
    out = tmp_path / "web.cbx"
    r = cli(runner, fake_controller, "snapshot", "export", "web", "base", "-o", str(out))
    assert r.exit_code == 9 and "went away" in error_line(r)
    assert sorted(os.listdir(tmp_path)) == [p for p in sorted(os.listdir(tmp_path)) if not p.startswith("web.cbx")]


# ----------------------------------------------------------------------------------------- import


def _export(runner: CliRunner, fc: FakeController, out: Path, *extra: str) -> None:
    r = cli(runner, fc, "snapshot", "export", "web", "base", "-o", str(out), *extra)
    assert r.exit_code == 0, r.output


def test_import_sends_every_part_with_as(runner: CliRunner, fake_controller: FakeController, tmp_path: Path) -> None:
    seed(fake_controller)
    out = tmp_path / "web.cbx"
    _export(runner, fake_controller, out)
    r = cli(runner, fake_controller, "snapshot", "import", str(out), "--as", "web-copy", "--host", "local")
    assert r.exit_code == 0, r.output
    assert "imported vm web-copy on host local (stopped)" in r.stdout
    (got,) = imports(fake_controller)
    assert got.saw_trailer and not got.aborted
    header = got.parts[0].header
    assert header.spec.name == "web-copy" and header.host == "local" and header.request_id
    data = b"".join(p.chunk.data for p in got.parts if p.WhichOneof("part") == "chunk")
    assert data == fake_controller.fleet.export_image
    j = cli(runner, fake_controller, "-o", "json", "snapshot", "import", str(out), "--as", "web-3")
    assert json.loads(j.stdout)["name"] == "web-3"


def test_import_encrypted_needs_the_passphrase(
    runner: CliRunner, fake_controller: FakeController, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed(fake_controller)
    monkeypatch.setenv("EXPORT_PASS", "pw-1")
    out = tmp_path / "web.cbx"
    _export(runner, fake_controller, out, "--encrypt", "--passphrase", "env:EXPORT_PASS")
    r = cli(runner, fake_controller, "snapshot", "import", str(out), "--as", "w2")
    assert r.exit_code == 2 and "--passphrase" in error_line(r)
    assert fake_controller.fleet.imports == []
    ok = cli(runner, fake_controller, "snapshot", "import", str(out), "--as", "w2", "--passphrase", "env:EXPORT_PASS")
    assert ok.exit_code == 0, ok.output


def test_import_of_a_corrupted_file_cancels_the_stream(
    runner: CliRunner, fake_controller: FakeController, tmp_path: Path
) -> None:
    seed(fake_controller)
    # incompressible, several frames: the damage is found part-way, after parts were sent
    fake_controller.fleet.export_image = os.urandom(3 * 1024 * 1024 + 17)
    out = tmp_path / "web.cbx"
    _export(runner, fake_controller, out)
    raw = bytearray(out.read_bytes())
    raw[len(raw) * 3 // 4] ^= 0xFF
    out.write_bytes(bytes(raw))
    r = cli(runner, fake_controller, "snapshot", "import", str(out), "--as", "web-bad")
    assert r.exit_code == 2
    assert "nothing was imported" in error_line(r)
    (got,) = imports(fake_controller)
    assert not got.saw_trailer and got.aborted
    assert "web-bad" not in fake_controller.fleet.vms


def test_import_missing_file(runner: CliRunner, fake_controller: FakeController, tmp_path: Path) -> None:
    r = cli(runner, fake_controller, "snapshot", "import", str(tmp_path / "nope.cbx"))
    assert r.exit_code == 2 and "no such file" in error_line(r)


def test_import_not_an_archive(runner: CliRunner, fake_controller: FakeController, tmp_path: Path) -> None:
    junk = tmp_path / "junk.cbx"
    junk.write_bytes(io.BytesIO(b"not a snapshot at all" * 10).getvalue())
    r = cli(runner, fake_controller, "snapshot", "import", str(junk))
    assert r.exit_code == 2 and "hint:" in error_line(r)
    assert fake_controller.fleet.imports == []


# -------------------------------------------------------------------------------------- vm delete


def test_vm_delete_with_snapshots(runner: CliRunner, fake_controller: FakeController) -> None:
    r = cli(runner, fake_controller, "vm", "delete", "web", "--with-snapshots")
    assert r.exit_code == 0, r.output
    (req,) = fake_controller.fleet.calls("DeleteVm")
    assert req.with_snapshots


def test_vm_delete_keep_export(runner: CliRunner, fake_controller: FakeController, tmp_path: Path) -> None:
    seed(fake_controller)
    out = tmp_path / "last.cbx"
    r = cli(runner, fake_controller, "vm", "delete", "web", "--keep-export", str(out))
    assert r.exit_code == 0, r.output
    (exp,) = fake_controller.fleet.calls("ExportSnapshot")
    assert exp.name == "other"  # the newest snapshot
    (req,) = fake_controller.fleet.calls("DeleteVm")
    assert req.with_snapshots
    with out.open("rb") as f:
        parts = list(read_archive(f))
    assert parts[0].header.snapshot.name == "other"


def test_vm_delete_keep_export_failure_keeps_the_vm(
    runner: CliRunner, fake_controller: FakeController, tmp_path: Path
) -> None:
    seed(fake_controller)
    fake_controller.fleet.export_error = Unavailable("agent h1 went away", reason="AGENT_UNREACHABLE")
    r = cli(runner, fake_controller, "vm", "delete", "web", "--keep-export", str(tmp_path / "last.cbx"))
    assert r.exit_code == 9
    assert fake_controller.fleet.calls("DeleteVm") == [] and "web" in fake_controller.fleet.vms
    assert list(tmp_path.iterdir()) == [] or all(not p.name.startswith("last") for p in tmp_path.iterdir())
