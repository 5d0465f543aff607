"""SIGKILL of the agent in the middle of a snapshot export, import and restore, on real processes and libvirt.

One fleet (controller + agent as processes, qemu:///system) and two running tiny guests serve the module:
one with an internal snapshot ``s1``, one with an external (``--disk-only --quiesce``) ``s1``; each holds
the marker ``one`` on ``/data`` while the live disk says ``two``. Each case restarts the agent with
``CLONEBOX_FAULT_INJECTION=STEP=kill`` (``agent/clonebox_agent/faultinject.py``) in that agent's
environment alone, runs the CLI, and checks:

- the agent died at the step, and the CLI came back with an error while it was still down (no hang);
- what the crash left is visible before the restart (a temporary export folder, imported volumes, a
  defined domain), and gone after it: no temporary export/import folders, no half-defined VM, no
  volume of the VM that nothing references, no open journal transaction, the reservation released;
- a restore was either done or rolled back, and the VM is usable: it runs (or starts), the guest reads
  its marker, and the same restore without a fault then brings ``one`` back.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.guestagent import GUEST_AGENT_SECONDS, GuestAgentError, eventually, guest_sh
from tests.realfleet import RealFleet, running_fleet

pytestmark = [pytest.mark.e2e, pytest.mark.libvirt]

FAULT_ENV = "CLONEBOX_FAULT_INJECTION"
MARKER = "/data/marker"
#: how long the CLI may take to report the failure once the agent is dead
CLI_SECONDS = 120.0


@pytest.fixture(scope="module")
def fleet() -> Iterator[RealFleet]:
    with running_fleet() as f:
        yield f


# ---- the guest -------------------------------------------------------------------------------------


def dom(vm: str) -> str:
    """The agent names domains cb-<vm>."""
    return f"cb-{vm}"


def sh(vm: str, script: str) -> str:
    code, out, err = guest_sh(dom(vm), script)
    assert code == 0, f"{script!r} in {vm}: exit {code}: {err!r}"
    return out.decode()


def until_data(vm: str) -> None:
    """qemu-ga answers and the guest's /init has mounted the data disk."""

    def settled() -> bool:
        try:
            return guest_sh(dom(vm), "test -e /run/data-settled")[0] == 0
        except (GuestAgentError, AssertionError):
            return False

    eventually(settled, GUEST_AGENT_SECONDS, f"qemu-ga of {vm} answering and /data mounted", interval=1.0)


def write_marker(vm: str, text: str) -> None:
    sh(vm, f"echo {text} > {MARKER} && sync")


def read_marker(vm: str) -> str:
    def read() -> str | None:
        try:
            return sh(vm, f"cat {MARKER}").strip() or None
        except (GuestAgentError, AssertionError):
            return None

    return eventually(read, GUEST_AGENT_SECONDS, f"{MARKER} readable in {vm}", interval=1.0)


# ---- the host ----------------------------------------------------------------------------------------


def virsh(*args: str) -> str:
    r = subprocess.run(["virsh", "-c", "qemu:///system", *args], capture_output=True, text=True, check=False)
    assert r.returncode == 0, f"virsh {' '.join(args)}: {r.stderr}"
    return r.stdout


def domains() -> set[str]:
    return set(virsh("list", "--all", "--name").split())


def domstate(vm: str) -> str:
    return virsh("domstate", dom(vm)).strip()


def files_of(fleet: RealFleet, vm: str) -> list[str]:
    """What the agent made for ``vm`` in its storage dir: pool volumes cb-<vm>.* and the folder vms/cb-<vm>."""
    pool, vms = fleet.storage_dir / "pool", fleet.storage_dir / "vms"
    found = [str(p) for p in pool.iterdir() if p.name.startswith(f"{dom(vm)}.")] if pool.is_dir() else []
    if (vms / dom(vm)).exists():
        found.append(str(vms / dom(vm)))
    return sorted(found)


def chain(path: str) -> set[str]:
    """``path`` and every file under it in its backing chain."""
    r = subprocess.run(
        ["qemu-img", "info", "-U", "--backing-chain", "--output=json", path],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return {str(Path(i["filename"]).resolve()) for i in json.loads(r.stdout)}


def sources(xml: ET.Element) -> list[str]:
    """The file of every disk and cdrom of a domain definition."""
    return [s.get("file", "") for s in xml.findall("./devices/disk/source") if s.get("file")]


def unreferenced(fleet: RealFleet, vm: str) -> list[str]:
    """Pool volumes of ``vm`` that neither its definition nor any of its snapshots needs.

    Needed: the backing chains of the domain's disks, and of the disks each snapshot's saved definition
    names (an external snapshot's frozen files). The overlay a snapshot once made for the *then* running
    disk is not needed by it, so a leaked old overlay is found.
    """
    needed: set[str] = set()
    roots = sources(ET.fromstring(virsh("dumpxml", "--inactive", dom(vm))))
    for name in virsh("snapshot-list", dom(vm), "--name").split():
        saved = ET.fromstring(virsh("snapshot-dumpxml", dom(vm), name)).find("domain")
        assert saved is not None, f"snapshot {name} of {vm} keeps no definition"
        roots += sources(saved)
    for root in roots:
        needed |= chain(root)
    pool = fleet.storage_dir / "pool"
    return sorted(p for p in files_of(fleet, vm) if Path(p).parent == pool and str(Path(p).resolve()) not in needed)


def open_txns(fleet: RealFleet) -> list[tuple[str, str]]:
    """(kind, target) of every open transaction in the agent's journal."""
    with sqlite3.connect(fleet.root / "agent-host" / "state" / "journal.db", timeout=10) as db:
        return [(str(k), str(t)) for k, t in db.execute("SELECT kind, target FROM txns WHERE state='open'")]


def fleet_vms(fleet: RealFleet) -> dict[str, str]:
    return fleet.vm_states()


def snapshot_names(fleet: RealFleet, vm: str) -> set[str]:
    return {s["name"] for s in fleet.cli_json("snapshot", "list", vm)["snapshots"]}


# ---- driving the agent -------------------------------------------------------------------------------


def wait_host_ready(fleet: RealFleet, timeout: float = 60) -> None:
    eventually(fleet.host_ready, timeout, f"host {fleet.host} READY", interval=0.2)


#: pids of agents started with a fault injection
FAULTY: set[int] = set()


def restart_agent(fleet: RealFleet, fault: str = "") -> None:
    """SIGKILL the agent (if it runs) and start it with ``fault`` as its only fault injection."""
    if "agent" in fleet.procs:
        fleet.kill_agent()
    fleet.start_agent(extra_env={FAULT_ENV: fault})
    if fault:
        FAULTY.add(fleet.procs["agent"].pid)
    wait_host_ready(fleet)


def agent_sane(fleet: RealFleet) -> bool:
    """An agent runs, without a fault injection."""
    agent = fleet.procs.get("agent")
    return agent is not None and agent.poll() is None and agent.pid not in FAULTY


@pytest.fixture(autouse=True)
def sane_agent_after(fleet: RealFleet) -> Iterator[None]:
    """Whatever a case did (or where it failed), the next one starts with an agent without faults."""
    yield
    if not agent_sane(fleet):
        restart_agent(fleet)


def killed_during(fleet: RealFleet, step: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``clonebox ARGS`` against an agent that SIGKILLs itself at ``step``; what the CLI did.

    The CLI must have answered while the agent is still dead: it reports the failure, it does not wait.
    """
    restart_agent(fleet, f"{step}=kill")
    agent = fleet.procs["agent"]
    tls = str(fleet.root / "user" / "tls")
    cmd = [sys.executable, "-m", "clonebox_cli.main", "--controller", fleet.controller, "--tls-dir", tls, *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=fleet.env)
    try:
        # the agent dies at the step; a CLI that ends first means the call never got there
        eventually(lambda: agent.poll() is not None or proc.poll() is not None, 300, f"the agent dying at {step}")
        if agent.poll() is None:
            out, err = proc.communicate()
            raise AssertionError(f"the agent never reached {step}: clonebox exited {proc.returncode}: {err}{out}")
        assert agent.returncode == -signal.SIGKILL, f"the agent ended with {agent.returncode}, not at {step}"
        try:
            out, err = proc.communicate(timeout=CLI_SECONDS)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"clonebox {' '.join(args)} still waiting {CLI_SECONDS:g} s after the agent died"
            ) from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def clean_error(r: subprocess.CompletedProcess[str]) -> str:
    """The CLI failed with one ``error:`` line and no traceback; that line."""
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert lines, r.stderr
    # the controller answered; what failed was its agent: not a TLS problem of this client
    assert "certificate" not in lines[-1], lines[-1]
    return lines[-1]


def ensure_running(fleet: RealFleet, vm: str) -> None:
    """Start ``vm`` when it is not running (once the controller has seen it stopped); wait for /data."""
    if domstate(vm) != "running":
        eventually(
            lambda: fleet_vms(fleet).get(vm) == "VM_STATE_STOPPED",
            60,
            f"the controller seeing {vm} stopped",
            interval=0.5,
        )
        fleet.cli("vm", "start", vm)
    until_data(vm)


# ---- the VMs -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Vms:
    internal: str
    external: str
    #: a plain export of the internal VM's s1
    export: Path
    work: Path


@pytest.fixture(scope="module")
def vms(fleet: RealFleet) -> Iterator[Vms]:
    internal, external = f"{fleet.host}-i", f"{fleet.host}-e"
    work = fleet.root / "work"
    work.mkdir(mode=0o755)
    try:
        for vm in (internal, external):
            fleet.cli("vm", "create", "-f", str(fleet.spec_file(vm)), "--wait")
        for vm, flags in ((internal, ()), (external, ("--disk-only", "--quiesce"))):
            until_data(vm)
            write_marker(vm, "one")
            fleet.cli("snapshot", "create", vm, "s1", *flags)
            write_marker(vm, "two")
        export = work / "internal-s1.cbsnap"
        fleet.cli("snapshot", "export", internal, "s1", "-o", str(export))
        yield Vms(internal, external, export, work)
    finally:
        if not agent_sane(fleet):
            restart_agent(fleet)
        for vm in (internal, external):
            fleet.cli("vm", "delete", vm, "--with-snapshots", "--wait", check=False)


# ---- export ----------------------------------------------------------------------------------------


def test_sigkill_during_export(fleet: RealFleet, vms: Vms) -> None:
    out = vms.work / "killed.cbsnap"
    partial = Path(f"{out}.partial")
    exports = fleet.storage_dir / "exports"
    r = killed_during(fleet, "export:disks", "snapshot", "export", vms.internal, "s1", "-o", str(out))
    assert not out.exists() and not partial.exists(), "the CLI kept a file of a failed export"
    assert list(exports.iterdir()), "the crash should have left the export's temporary folder"

    restart_agent(fleet)
    assert list(exports.iterdir()) == []
    assert open_txns(fleet) == []
    assert domstate(vms.internal) == "running"
    assert unreferenced(fleet, vms.internal) == []
    # nothing stuck: the same export now completes
    fleet.cli("snapshot", "export", vms.internal, "s1", "-o", str(out))
    assert out.is_file() and not partial.exists()
    out.unlink()
    # the CLI came back with an error of its own, no traceback
    clean_error(r)


# ---- import ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("step", ["import:disks", "import:define"])
def test_sigkill_during_import(fleet: RealFleet, vms: Vms, step: str) -> None:
    new = f"{fleet.host}-imp-{step.split(':')[1]}"
    imports = fleet.storage_dir / "imports"
    r = killed_during(fleet, step, "snapshot", "import", str(vms.export), "--as", new)
    # what the crash left: the moved-in volume (and at import:define the domain), the open transaction
    assert any(p.endswith(f"{dom(new)}.data.qcow2") for p in files_of(fleet, new)), files_of(fleet, new)
    assert (dom(new) in domains()) == (step == "import:define")
    assert open_txns(fleet) == [("snapshot.import", new)]
    assert list(imports.iterdir()), "the crash should have left the import's temporary folder"

    restart_agent(fleet)
    assert dom(new) not in domains()
    assert files_of(fleet, new) == []
    assert list(imports.iterdir()) == []
    assert open_txns(fleet) == []
    eventually(lambda: new not in fleet_vms(fleet), 60, f"the reservation of {new} released", interval=0.5)

    # the name is free again and the same file imports once
    made = fleet.cli_json("snapshot", "import", str(vms.export), "--as", new)
    assert (made["name"], made["state"]) == (new, "VM_STATE_STOPPED"), made
    assert [v for v in domains() if v == dom(new)] == [dom(new)]
    fleet.cli("vm", "delete", new, "--wait")
    assert files_of(fleet, new) == []
    # the CLI came back with an error of its own, no traceback
    clean_error(r)


# ---- restore ---------------------------------------------------------------------------------------

#: (which VM, where the agent dies, what the guest reads afterwards). Taking the backup (its commit) and
#: the revert before its commit point are rolled back: the backup goes, the disks and the running VM come
#: back. At the commit point (``revert:retire``) and after it (``restore:commit``, before the journal
#: records the outcome) recovery finishes the restore instead: the guest reads the snapshot's marker.
#: (internal snapshot:commit and external revert:stopped passed too; they repeat paths the cases below take
#: and the fake-hypervisor tests in tests/unit/agent/test_snapshots_manager.py cover, and CI time is dear)
RESTORE_CASES = [
    ("external", "snapshot:commit", "two"),
    ("external", "revert:swapped", "two"),
    ("external", "revert:retire", "one"),
    ("internal", "restore:commit", "one"),
    ("external", "restore:commit", "one"),
]


@pytest.mark.parametrize(("kind", "step", "marker"), RESTORE_CASES)
def test_sigkill_during_restore(fleet: RealFleet, vms: Vms, kind: str, step: str, marker: str) -> None:
    vm = vms.internal if kind == "internal" else vms.external
    # the backup's own kill point takes one; the revert's are about the revert alone
    flags = ("--yes",) if step == "snapshot:commit" else ("--yes", "--no-backup")
    ensure_running(fleet, vm)
    write_marker(vm, "two")
    before = snapshot_names(fleet, vm)

    r = killed_during(fleet, step, "snapshot", "restore", vm, "s1", *flags)

    restart_agent(fleet)
    assert open_txns(fleet) == []
    assert dom(vm) in domains()
    assert unreferenced(fleet, vm) == [], "volumes of the VM that nothing needs"
    # at snapshot:commit the backup the crash left uncommitted is taken back; the others take none
    assert snapshot_names(fleet, vm) == before
    # rolled back or finished, the VM runs as it did before the restore
    assert domstate(vm) == "running"
    until_data(vm)
    assert read_marker(vm) == marker
    if kind == "external" and marker == "one":
        current = [s["name"] for s in fleet.cli_json("snapshot", "list", vm)["snapshots"] if s.get("current")]
        assert current == ["s1"], current

    # and the restore, asked again without a fault, is done
    fleet.cli("snapshot", "restore", vm, "s1", *flags)
    if kind == "external":
        fleet.cli("vm", "stop", vm, "--force")
        fleet.cli("vm", "start", vm)
    until_data(vm)
    assert read_marker(vm) == "one"
    assert open_txns(fleet) == []
    assert unreferenced(fleet, vm) == []
    # the CLI came back with an error of its own, no traceback
    clean_error(r)
