"""Snapshots end to end on real libvirt: ``clonebox snapshot …`` -> controller -> agent -> QEMU, tiny guest.

What a snapshot holds is checked from inside the guest, never through the agent: a marker file on the
guest's data disk (``/data``, ext4 on vda) is written and ``sync``ed through qemu-ga
(``virsh qemu-agent-command``), snapshotted, changed, and read back after the restore. An external
snapshot is read back after a cold reboot (power off, start), so the guest's memory cannot hide a wrong
disk. Export files are opened here with ``read_archive`` and compared with the imported VM's volume by
``qemu-img compare``; bad files are made by hand (``write_archive``, frames cut or swapped as
``docs/snapshot-archive.md`` lays them out) and each refusal must leave nothing behind.

One fleet (with a shared root, for the 9p VM) and four VMs serve the module: an internal one (restore,
export/import, retention, delete), an external one, one with a shared folder (memory refused, external
restore), and the imported copy. The external one also serves ``clonebox logs`` (its serial console).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import struct
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from clonebox.type.v1 import snapshot_pb2

from clonebox_core.snapshot_archive import MAGIC, read_archive, write_archive
from tests.e2e.guestagent import GUEST_AGENT_SECONDS, GuestAgentError, eventually, guest_sh
from tests.realfleet import RealFleet, running_fleet

pytestmark = [pytest.mark.e2e, pytest.mark.libvirt]

MARKER = "/data/marker"
PASS_VAR = "CLONEBOX_E2E_SNAPSHOT_PASSPHRASE"
PASSPHRASE = "correct horse battery staple"
#: releases and clean-ups that follow a refused import happen after the CLI has its answer
SETTLE_SECONDS = 60.0


@dataclass
class Suite:
    fleet: RealFleet
    share: Path
    #: export files and hand-made archives (under /var/lib so that nothing needs special access)
    work: Path


@pytest.fixture(scope="module")
def suite() -> Iterator[Suite]:
    # shared folders must lie under the agent's shared_roots, where QEMU (libvirt-qemu) can read them
    base = Path("/var/lib/clonebox/test") / f"snapshots-{uuid.uuid4().hex[:8]}"
    share, work = base / "share", base / "work"
    for d in (base, share, work):
        d.mkdir(parents=True, mode=0o755, exist_ok=True)
        os.chmod(d, 0o755)
    try:
        with running_fleet(agent_extra={"shared_roots": [str(share)]}) as fleet:
            fleet.env[PASS_VAR] = PASSPHRASE  # the CLI resolves --passphrase env:... on this machine
            yield Suite(fleet, share, work)
    finally:
        shutil.rmtree(base, ignore_errors=True)


# ---- the guest, from the test's side -----------------------------------------------------------


def dom(vm: str) -> str:
    """The agent names domains cb-<vm>."""
    return f"cb-{vm}"


def until_data(vm: str) -> None:
    """Wait until qemu-ga answers and the guest's /init has mounted the data disk."""

    def settled() -> bool:
        try:
            return guest_sh(dom(vm), "test -e /run/data-settled")[0] == 0
        except (GuestAgentError, AssertionError):
            return False

    eventually(settled, GUEST_AGENT_SECONDS, f"qemu-ga of {vm} answering and /data mounted", interval=1.0)


def sh(vm: str, script: str) -> str:
    code, out, err = guest_sh(dom(vm), script)
    assert code == 0, f"{script!r} in {vm}: exit {code}: {err!r}"
    return out.decode()


def write_marker(vm: str, text: str) -> None:
    sh(vm, f"echo {text} > {MARKER} && sync")


def read_marker(vm: str) -> str:
    """The marker as the guest reads it (qemu-ga may need a moment after a restore of memory)."""

    def read() -> str | None:
        try:
            return sh(vm, f"cat {MARKER}").strip() or None
        except (GuestAgentError, AssertionError):
            return None

    return eventually(read, GUEST_AGENT_SECONDS, f"{MARKER} readable in {vm}", interval=1.0)


def cold_reboot(fleet: RealFleet, vm: str) -> None:
    """Power off (no guest shutdown, no memory kept) and boot again."""
    fleet.cli("vm", "stop", vm, "--force")
    assert virsh("domstate", dom(vm)).strip() == "shut off"
    fleet.cli("vm", "start", vm)
    until_data(vm)


# ---- the host, from the test's side ------------------------------------------------------------


def virsh(*args: str, check: bool = True) -> str:
    r = subprocess.run(["virsh", "-c", "qemu:///system", *args], capture_output=True, text=True, check=False)
    if check and r.returncode != 0:
        raise AssertionError(f"virsh {' '.join(args)}: {r.stderr}")
    return r.stdout


def domains(fleet: RealFleet | None = None) -> set[str]:
    """Libvirt's domains (with ``fleet``: only that fleet's, other suites may share this libvirtd)."""
    found = set(virsh("list", "--all", "--name").split())
    return {d for d in found if d.startswith(dom(f"{fleet.host}-"))} if fleet is not None else found


def disk_sources(vm: str) -> list[str]:
    """Files of the domain's disks (persistent definition), in target order."""
    out = virsh("domblklist", dom(vm), "--inactive", "--details")
    return [cols[3] for line in out.splitlines() if len(cols := line.split()) == 4 and cols[1] == "disk"]


def image_info(path: str) -> dict[str, Any]:
    r = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", path], capture_output=True, text=True, check=True, timeout=60
    )
    return dict(json.loads(r.stdout))


def qemu_img_compare(a: str, b: str) -> str:
    """What ``qemu-img compare`` says when the guest-visible contents differ ("" when equal)."""
    r = subprocess.run(["qemu-img", "compare", "-U", a, b], capture_output=True, text=True, check=False, timeout=300)
    return "" if r.returncode == 0 else r.stdout + r.stderr


def storage_listing(fleet: RealFleet) -> set[str]:
    """Every file and folder under the agent's storage dir (relative paths)."""
    return {str(p.relative_to(fleet.storage_dir)) for p in fleet.storage_dir.rglob("*")}


def files_of(fleet: RealFleet, vm: str) -> list[str]:
    """What the agent made for ``vm`` in its storage dir: pool volumes cb-<vm>.* and the folder vms/cb-<vm>."""
    pool, vms = fleet.storage_dir / "pool", fleet.storage_dir / "vms"
    found = [str(p) for p in pool.iterdir() if p.name.startswith(f"{dom(vm)}.")] if pool.is_dir() else []
    if (vms / dom(vm)).exists():
        found.append(str(vms / dom(vm)))
    return sorted(found)


def journal_rows(fleet: RealFleet, sql: str, *args: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(fleet.root / "agent-host" / "state" / "journal.db", timeout=10) as db:
        return list(db.execute(sql, args).fetchall())


def fleet_vms(fleet: RealFleet) -> set[str]:
    return {v["name"] for v in fleet.cli_json("vm", "list")["vms"]}


def snaps(fleet: RealFleet, vm: str) -> list[dict[str, Any]]:
    return list(fleet.cli_json("snapshot", "list", vm)["snapshots"])


def names(fleet: RealFleet, vm: str) -> list[str]:
    return [s["name"] for s in snaps(fleet, vm)]


def clean_error(r: subprocess.CompletedProcess[str]) -> str:
    """The CLI failed with one ``error:`` line and no traceback; that line."""
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert lines, r.stderr
    return lines[-1]


def operation_by_request(fleet: RealFleet, request_id: str) -> dict[str, Any] | None:
    ops = fleet.cli_json("operation", "list", "--limit", "1000")["operations"]
    found = [o for o in ops if o.get("request_id") == request_id]
    return dict(found[0]) if found else None


# ---- VMs -----------------------------------------------------------------------------------------


def make_vm(fleet: RealFleet, vm: str, **extra: Any) -> str:
    fleet.cli("vm", "create", "-f", str(fleet.spec_file(vm, **extra)), "--wait")
    until_data(vm)
    return vm


@pytest.fixture(scope="module")
def internal_vm(suite: Suite) -> Iterator[str]:
    """A running VM for internal snapshots (restore with memory, export, retention, delete)."""
    vm = f"{suite.fleet.host}-int"
    try:
        yield make_vm(suite.fleet, vm)
    finally:
        suite.fleet.cli("vm", "delete", vm, "--with-snapshots", "--wait", check=False)


@pytest.fixture(scope="module")
def plain_vm(suite: Suite) -> Iterator[str]:
    """A running VM without shared folders, for external snapshots."""
    vm = f"{suite.fleet.host}-ext"
    try:
        yield make_vm(suite.fleet, vm)
    finally:
        suite.fleet.cli("vm", "delete", vm, "--with-snapshots", "--wait", check=False)


@pytest.fixture(scope="module")
def shared_vm(suite: Suite) -> Iterator[str]:
    """A running VM with a 9p shared folder: disk-only snapshots only."""
    vm = f"{suite.fleet.host}-shr"
    try:
        yield make_vm(suite.fleet, vm, shared_folders=[{"host_path": str(suite.share), "tag": "share0"}])
    finally:
        suite.fleet.cli("vm", "delete", vm, "--with-snapshots", "--wait", check=False)


# ---- 1. internal snapshot with memory ------------------------------------------------------------


def test_internal_snapshot_restore_brings_the_marker_back_with_a_backup(suite: Suite, internal_vm: str) -> None:
    fleet, vm = suite.fleet, internal_vm
    write_marker(vm, "one")
    taken = fleet.cli_json("snapshot", "create", vm, "s1", "--description", "marker one")
    assert (taken["name"], taken["kind"], taken["has_memory"]) == ("s1", "SNAPSHOT_KIND_INTERNAL", True), taken
    write_marker(vm, "two")
    assert read_marker(vm) == "two"

    done = fleet.cli_json("snapshot", "restore", vm, "s1", "--yes")
    assert done["vm"]["state"] == "VM_STATE_RUNNING", done
    backup = done["backup"]["name"]
    assert backup.startswith("pre-restore-"), done
    assert virsh("domstate", dom(vm)).strip() == "running"
    assert read_marker(vm) == "one"

    listed = {s["name"]: s for s in snaps(fleet, vm)}
    assert set(listed) == {"s1", backup}, listed
    assert listed[backup]["automatic"] and "s1" in listed[backup]["reason"], listed[backup]
    assert listed[backup]["parent"] == "s1", listed[backup]
    assert listed["s1"]["current"] and not listed[backup]["current"], listed
    assert listed["s1"]["description"] == "marker one"

    # the tree: the backup hangs under s1, s1 under the VM
    tree = fleet.cli("snapshot", "list", vm, "--tree").stdout.splitlines()
    (s1_line,) = [line for line in tree if " s1 " in f"{line} " and backup not in line]
    (backup_line,) = [line for line in tree if backup in line]
    assert tree[0].startswith(f"vm {vm}"), tree
    indent = len(s1_line) - len(s1_line.lstrip(" │├└─"))
    assert len(backup_line) - len(backup_line.lstrip(" │├└─")) > indent, tree
    assert tree.index(backup_line) > tree.index(s1_line), tree
    assert "current" in s1_line and "automatic" in backup_line, tree


# ---- 6. shared folder: no memory snapshot ----------------------------------------------------------


def test_memory_snapshot_of_a_vm_with_a_shared_folder_is_refused(suite: Suite, shared_vm: str) -> None:
    fleet, vm = suite.fleet, shared_vm
    before = storage_listing(fleet)
    r = fleet.cli("snapshot", "create", vm, "mem", check=False)
    line = clean_error(r)
    assert r.returncode == 5, r.stderr  # FAILED_PRECONDITION
    # the hint is chosen by the reason SNAPSHOT_BLOCKED_BY_SHARED_FOLDER
    assert "hint: the VM has shared folders" in line, line
    assert "--disk-only --quiesce" in line, line
    assert names(fleet, vm) == []
    assert storage_listing(fleet) == before
    assert virsh("domstate", dom(vm)).strip() == "running"


# ---- 2. external, quiesced ---------------------------------------------------------------------


@pytest.mark.parametrize("which", ["plain_vm", "shared_vm"])
def test_external_snapshot_restore_survives_a_cold_reboot(
    suite: Suite, request: pytest.FixtureRequest, which: str
) -> None:
    """On a VM without shared folders (the usual case) and on the 9p one, whose only kind this is."""
    fleet, vm = suite.fleet, str(request.getfixturevalue(which))
    write_marker(vm, "one")
    taken = fleet.cli_json("snapshot", "create", vm, "e1", "--disk-only", "--quiesce")
    assert (taken["kind"], taken["has_memory"], taken["quiesced"]) == ("SNAPSHOT_KIND_EXTERNAL", False, True), taken
    write_marker(vm, "two")

    done = fleet.cli_json("snapshot", "restore", vm, "e1", "--yes")
    assert done["vm"]["state"] == "VM_STATE_RUNNING", done
    backup = done["backup"]
    assert backup["name"].startswith("pre-restore-") and backup["kind"] == "SNAPSHOT_KIND_EXTERNAL", backup
    cold_reboot(fleet, vm)
    assert read_marker(vm) == "one"

    listed = {s["name"]: s for s in snaps(fleet, vm)}
    assert set(listed) == {"e1", backup["name"]}, listed
    assert all(s["kind"] == "SNAPSHOT_KIND_EXTERNAL" for s in listed.values()), listed
    assert listed["e1"]["current"], listed
    # the VM's disk is a fresh overlay on e1's frozen file, never the shared base image itself
    (source,) = disk_sources(vm)
    assert source.startswith(str(fleet.storage_dir / "pool")), source


# ---- 4. export -> import -----------------------------------------------------------------------


@dataclass(frozen=True)
class Export:
    path: Path
    vm: str
    snapshot: str
    marker: str
    noise_sha256: str


@pytest.fixture(scope="module")
def export(suite: Suite, internal_vm: str) -> Export:
    """An encrypted export of a snapshot holding a marker and 4 MiB of noise (so the file has several chunks)."""
    fleet, vm = suite.fleet, internal_vm
    sh(vm, "head -c 4194304 /dev/urandom > /data/noise && sync")
    noise = sh(vm, "sha256sum /data/noise").split()[0]
    write_marker(vm, "exported")
    fleet.cli_json("snapshot", "create", vm, "x1")
    write_marker(vm, "after-export")
    out = suite.work / "x1.cbsnap"
    done = fleet.cli_json(
        "snapshot", "export", vm, "x1", "-o", str(out), "--encrypt", "--passphrase", f"env:{PASS_VAR}"
    )
    assert done["encrypted"] and done["file"] == str(out), done
    assert out.is_file() and not Path(f"{out}.partial").exists()
    assert hashlib.sha256(out.read_bytes()).hexdigest() == done["sha256"]
    assert out.read_bytes()[: len(MAGIC)] == MAGIC
    # the secret never reaches the file in the clear
    assert PASSPHRASE.encode() not in out.read_bytes()
    return Export(out, vm, "x1", "exported", noise)


def unpack(path: Path, into: Path, passphrase: str | None) -> tuple[snapshot_pb2.SnapshotImageHeader, list[Path]]:
    """The header and each disk's image of an export file, decrypted here (the test's own reading)."""
    header: snapshot_pb2.SnapshotImageHeader | None = None
    files: list[Path] = []
    with open(path, "rb") as f:
        secret = passphrase.encode() if passphrase is not None else None
        for part in read_archive(f, passphrase=secret):
            which = part.WhichOneof("part")
            if which == "header":
                header = part.header
                files = [into / f"{d.name}.qcow2" for d in header.disks]
                for p in files:
                    p.write_bytes(b"")
            elif which == "chunk":
                with open(files[part.chunk.disk], "r+b") as img:
                    img.seek(part.chunk.offset)
                    img.write(part.chunk.data)
    assert header is not None
    return header, files


def test_export_import_round_trip(suite: Suite, export: Export) -> None:
    fleet = suite.fleet
    new = f"{fleet.host}-imp"
    header, (exported_disk,) = unpack(export.path, suite.work, PASSPHRASE)
    assert (header.snapshot.name, header.snapshot.vm) == (export.snapshot, export.vm)
    assert [d.name for d in header.disks] == ["data"]
    # flattened: the file needs no base image wherever it is imported
    assert "backing-filename" not in image_info(str(exported_disk))

    made = fleet.cli_json("snapshot", "import", str(export.path), "--as", new, "--passphrase", f"env:{PASS_VAR}")
    try:
        assert (made["name"], made["state"]) == (new, "VM_STATE_STOPPED"), made
        assert new in fleet_vms(fleet)
        (volume,) = disk_sources(new)
        assert volume.startswith(str(fleet.storage_dir / "pool")), volume
        info = image_info(volume)
        assert info["format"] == "qcow2" and "backing-filename" not in info, info
        assert info["virtual-size"] == header.disks[0].virtual_size_bytes
        assert qemu_img_compare(str(exported_disk), volume) == ""

        # and the guest sees the snapshot's data
        fleet.cli("vm", "start", new)
        until_data(new)
        assert read_marker(new) == export.marker
        assert sh(new, "sha256sum /data/noise").split()[0] == export.noise_sha256
    finally:
        fleet.cli("vm", "delete", new, "--wait", check=False)
    assert dom(new) not in domains()
    assert files_of(fleet, new) == []


# ---- 5. bad files are refused and leave nothing ---------------------------------------------------


def frames(data: bytes) -> list[tuple[int, int, int]]:
    """(offset, flag, total length) of each frame of an archive (``docs/snapshot-archive.md``)."""
    assert data[: len(MAGIC)] == MAGIC
    (preamble,) = struct.unpack(">I", data[8:12])
    pos, found = 12 + preamble, []
    while pos < len(data):
        flag, length = struct.unpack(">BI", data[pos : pos + 5])
        found.append((pos, flag, 5 + length))
        pos += 5 + length
    assert pos == len(data)
    return found


def truncated(export: Export, work: Path) -> Path:
    data = export.path.read_bytes()
    out = work / "truncated.cbsnap"
    out.write_bytes(data[: len(data) // 2])
    return out


def swapped(export: Export, work: Path) -> Path:
    data = export.path.read_bytes()
    full = [(off, n) for off, flag, n in frames(data) if flag == 0]
    assert len(full) >= 3, f"the export has {len(full)} full chunks; the swap needs 3"
    # the 2nd and 3rd: the header (in the 1st) is already on its way to the agent when the damage shows
    (a, na), (b, nb) = full[1], full[2]
    assert na == nb
    out = work / "swapped.cbsnap"
    out.write_bytes(data[:a] + data[b : b + nb] + data[a + na : b] + data[a : a + na] + data[b + nb :])
    return out


def hand_made(export: Export, work: Path, name: str, options: list[str], size: str = "") -> Path:
    """A plain archive with the export's header (a valid spec) around an image made by ``qemu-img create``."""
    image = work / f"{name}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *options, str(image), *filter(None, [size])], check=True)
    header, _files = unpack(export.path, work, PASSPHRASE)
    content = image.read_bytes()
    header.disks[0].image_bytes = len(content)
    # the size the image claims: the agent reads it from the qcow2 header itself
    (virtual,) = struct.unpack(">Q", content[24:32])
    header.disks[0].virtual_size_bytes = virtual
    parts = [snapshot_pb2.SnapshotImagePart(header=header)]
    for offset in range(0, len(content), 1 << 20):
        chunk = snapshot_pb2.SnapshotImageChunk(disk=0, offset=offset, data=content[offset : offset + (1 << 20)])
        parts.append(snapshot_pb2.SnapshotImagePart(chunk=chunk))
    trailer = snapshot_pb2.SnapshotImageTrailer(sha256=[hashlib.sha256(content).hexdigest()])
    parts.append(snapshot_pb2.SnapshotImagePart(trailer=trailer))
    out = work / f"{name}.cbsnap"
    with open(out, "wb") as f:
        write_archive(f, parts)
    return out


def backing_file(export: Export, work: Path) -> Path:
    return hand_made(export, work, "backing", ["-b", "/etc/hostname", "-F", "raw"])


def ten_tib(export: Export, work: Path) -> Path:
    return hand_made(export, work, "huge", [], "10T")


#: case -> (how the file is made, encrypted?, words of the message, agent's reason or "" when the CLI refuses)
BAD_FILES: dict[str, tuple[Callable[[Export, Path], Path], bool, str, str]] = {
    "truncated": (truncated, True, "cut short", ""),
    "swapped": (swapped, True, "damaged or was altered", ""),
    "backing-file": (backing_file, False, "names a backing file", "IMPORT_BACKING_FILE"),
    "10-tib": (ten_tib, False, "virtual size", "IMPORT_TOO_LARGE"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_a_bad_export_file_is_refused_and_leaves_nothing(suite: Suite, export: Export, case: str) -> None:
    fleet = suite.fleet
    make, encrypted, words, reason = BAD_FILES[case]
    work = suite.work / case
    work.mkdir(exist_ok=True)
    bad = make(export, work)
    new = f"{fleet.host}-bad-{case}"[:63]
    request_id = f"bad-{case}-{uuid.uuid4().hex[:6]}"
    vms_before, domains_before, storage_before = fleet_vms(fleet), domains(fleet), storage_listing(fleet)

    args = ["snapshot", "import", str(bad), "--as", new, "--request-id", request_id]
    r = fleet.cli(*args, *(["--passphrase", f"env:{PASS_VAR}"] if encrypted else []), check=False)
    line = clean_error(r)
    assert r.returncode == 2, r.stderr  # INVALID_ARGUMENT
    assert words in line, line
    if reason:
        # refused by the agent: the controller's import operation failed with that reason
        op = eventually(
            lambda: o if (o := operation_by_request(fleet, request_id)) and o.get("done") else None,
            SETTLE_SECONDS,
            f"import operation {request_id} done",
        )
        assert reason in json.dumps(op.get("error", {})), op
    else:
        assert "hint: the file is not a complete, intact CloneBox export" in line, line

    # nothing created, nothing left: not in the fleet, not in libvirt, no file in the agent's storage
    eventually(lambda: fleet_vms(fleet) == vms_before, SETTLE_SECONDS, f"{new} released by the controller")
    assert domains(fleet) == domains_before
    eventually(lambda: storage_listing(fleet) == storage_before, SETTLE_SECONDS, "the agent's storage as before")
    assert list((fleet.storage_dir / "imports").iterdir()) == []
    assert not [p for p in (*suite.work.rglob("*.partial"), *fleet.storage_dir.rglob("*.partial"))]


# ---- 3. retention ------------------------------------------------------------------------------------


def test_retention_keep_last_prunes_exactly_the_older_ones(suite: Suite, internal_vm: str) -> None:
    fleet, vm = suite.fleet, internal_vm
    mine = [f"ret-{i}" for i in range(1, 5)]
    for name in mine:
        fleet.cli_json("snapshot", "create", vm, name)
        time.sleep(1.1)  # snapshot times have whole seconds: one second apart, the order is the taking order
    before = names(fleet, vm)
    assert before[-4:] == mine, before
    # the two newest stay (ret-4 is also the current one); every other snapshot of the VM goes
    doomed = sorted(set(before) - {"ret-3", "ret-4"})

    policy = fleet.cli_json("snapshot", "policy", vm, "--keep-last", "2")["policy"]
    assert policy["keep_last"] == 2, policy
    dry = fleet.cli_json("snapshot", "prune", vm, "--dry-run")
    assert dry["dry_run"] is True
    assert sorted(d["name"] for d in dry["decisions"] if not d["keep"]) == doomed, dry
    assert sorted(d["name"] for d in dry["decisions"] if d["keep"]) == ["ret-3", "ret-4"], dry
    assert names(fleet, vm) == before, "a dry run deleted something"
    # the human form says the same
    table = fleet.cli("snapshot", "prune", vm, "--dry-run").stdout
    assert f"would delete {len(doomed)} of {len(before)}" in table, table

    done = fleet.cli_json("snapshot", "prune", vm)
    assert sorted(d["name"] for d in done["decisions"] if not d["keep"]) == doomed, done
    assert names(fleet, vm) == ["ret-3", "ret-4"]
    # pruned internal snapshots are gone from libvirt too
    assert sorted(virsh("snapshot-list", dom(vm), "--name").split()) == ["ret-3", "ret-4"]
    assert virsh("domstate", dom(vm)).strip() == "running"


# ---- 7. deleting a VM with snapshots -----------------------------------------------------------------


def test_vm_delete_refuses_snapshots_and_with_snapshots_leaves_nothing(suite: Suite, internal_vm: str) -> None:
    fleet, vm = suite.fleet, internal_vm
    if not names(fleet, vm):
        fleet.cli_json("snapshot", "create", vm, "last")
    kept = names(fleet, vm)

    r = fleet.cli("vm", "delete", vm, "--wait", check=False)
    line = clean_error(r)
    assert r.returncode == 5, r.stderr  # FAILED_PRECONDITION VM_HAS_SNAPSHOTS: its hint names the way out
    assert "--with-snapshots" in line, line
    assert names(fleet, vm) == kept
    assert vm in fleet_vms(fleet) and virsh("domstate", dom(vm)).strip() == "running"

    fleet.cli("vm", "delete", vm, "--with-snapshots", "--wait")
    assert vm not in fleet_vms(fleet)
    assert dom(vm) not in domains()
    assert files_of(fleet, vm) == []
    libvirt_meta = Path(f"/var/lib/libvirt/qemu/snapshot/{dom(vm)}")
    assert not libvirt_meta.exists() or not any(libvirt_meta.iterdir()), "libvirt's snapshot metadata remains"
    assert journal_rows(fleet, "SELECT name FROM snapshot_meta WHERE vm=?", vm) == []
    assert journal_rows(fleet, "SELECT vm FROM snapshot_policies WHERE vm=?", vm) == []
    assert list((fleet.storage_dir / "exports").iterdir()) == []


# ---- 8. the serial console ---------------------------------------------------------------------------


def test_logs_show_what_the_guest_printed_on_its_serial_console(suite: Suite, plain_vm: str) -> None:
    # the tiny guest's /init marks each stage on ttyS0 (deploy/testguest/guest/init), virtlogd keeps it in
    # the VM's console.log, the agent reads it, the controller passes it on; piped, the bytes are the guest's
    r = suite.fleet.cli("logs", plain_vm, "--tail", str(1024 * 1024))
    assert "CLONEBOX-TESTGUEST INIT uptime=" in r.stdout, r.stdout[-2000:]
    records = suite.fleet.cli_json("audit", "list", "--action", "vm.console_read")["records"]
    assert any(rec["resource"] == f"vms/{plain_vm}" for rec in records), records
