"""``clonebox up`` / ``down`` of examples/stack (db -> api -> web) on real libvirt, controller and agent processes.

The plan file is the example's, renamed for this run (its VMs carry the fleet's host prefix, so a
failed run's leftovers are cleaned up with the fleet). api's health check runs ``wget http://<db VM>/``
inside api through qemu-ga: it passes only when the guest resolves the bare service name ``db`` through
the DNS of the plan's own network (libvirt network ``cb-<plan>``, made with the first VM, removed with
the last).

Order is asserted on the run's own sequence of versions (``up -o json`` prints one run per version),
never on the clock.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from clonebox_core.snapshot_archive import read_archive
from tests.e2e.guestagent import guest_sh
from tests.realfleet import RealFleet, running_fleet

pytestmark = [pytest.mark.e2e, pytest.mark.libvirt]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "stack" / "clonebox-compose.yaml"


@pytest.fixture(scope="module")
def fleet() -> Iterator[RealFleet]:
    with running_fleet() as f:
        yield f


def plan_file(fleet: RealFleet, name: str, *, broken_api: bool = False) -> Path:
    """The example under another plan name; with ``broken_api`` api's check can never pass."""
    text = EXAMPLE.read_text().replace("stack-", f"{name}-")
    doc: dict[str, Any] = yaml.safe_load(text)
    doc["name"] = name
    del doc["networks"]  # the controller picks a free subnet: the example's pinned one may be a dev fleet's
    if broken_api:
        doc["vms"]["api"]["health_checks"] = [
            {"name": "never", "type": "command", "interval": "2s", "timeout": "1s", "command": {"argv": ["false"]}}
        ]
        # per VM: db must still turn healthy within it (~15 s under TCG, twice that on a loaded machine);
        # api fails at it, naming its check (unhealthy once its guest runs)
        doc["update"]["healthy_deadline"] = "35s"
    path = fleet.root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def edited(path: Path, **changes: dict[str, Any]) -> Path:
    """A copy of the plan file ``path`` with each service's keys changed (nested dicts merged one level)."""
    doc: dict[str, Any] = yaml.safe_load(path.read_text())
    for service, keys in changes.items():
        vm = doc["vms"][service]
        for key, value in keys.items():
            vm[key] = {**vm.get(key, {}), **value} if isinstance(value, dict) else value
    out = path.with_name(f"{path.stem}-{'-'.join(changes)}.yaml")
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


def run_versions(stdout: str) -> list[dict[str, Any]]:
    """Every run version ``up``/``down -o json`` printed, in order."""
    return [json.loads(line) for line in stdout.splitlines() if line.strip().startswith("{")]


def first_version(runs: list[dict[str, Any]], service: str, states: set[str]) -> int:
    """The index of the first printed version in which ``service`` is in one of ``states``."""
    for i, run in enumerate(runs):
        for vm in run.get("vms", []):
            if vm["service"] == service and vm.get("state") in states:
                return i
    raise AssertionError(f"{service} never reached {states}: {runs[-1] if runs else 'no output'}")


def state_in(run: dict[str, Any], service: str) -> str:
    return str(next(vm for vm in run["vms"] if vm["service"] == service).get("state", ""))


def network_exists(name: str) -> bool:
    listed = subprocess.run(
        ["virsh", "-c", "qemu:///system", "net-list", "--all", "--name"], capture_output=True, text=True, check=True
    )
    return name in listed.stdout.split()


def fleet_vms(fleet: RealFleet) -> dict[str, str]:
    return {v["name"]: v.get("state", "") for v in fleet.cli_json("vm", "list")["vms"]}


STARTED = {"PLAN_VM_STATE_CREATING", "PLAN_VM_STATE_WAITING", "PLAN_VM_STATE_READY"}


def test_up_in_dependency_order_behind_health_gates_then_down(fleet: RealFleet) -> None:
    name = f"{fleet.host}-st"
    vms = {s: f"{name}-{s}" for s in ("db", "api", "web")}
    path = plan_file(fleet, name)
    try:
        up = fleet.cli("-o", "json", "up", "-f", str(path), timeout=600)
        runs = run_versions(up.stdout)
        final = runs[-1]
        assert final["state"] == "PLAN_RUN_STATE_SUCCEEDED", final
        assert {v["service"]: v["state"] for v in final["vms"]} == dict.fromkeys(vms, "PLAN_VM_STATE_READY")
        # each one started only once what it needs was healthy: in the first version that shows it started,
        # its dependency is already ready (one version may carry both changes)
        for dependency, dependent in (("db", "api"), ("api", "web")):
            seen = runs[first_version(runs, dependent, STARTED)]
            assert state_in(seen, dependency) == "PLAN_VM_STATE_READY", seen

        # api reached db by its service name (what its health check did), and so can we from inside api;
        # every VM has the fixed address the controller gave it on the plan's subnet
        for who in ("db", vms["db"]):
            code, out, _err = guest_sh(f"cb-{vms['api']}", f"wget -q -O - http://{who}/")
            assert code == 0 and vms["db"].encode() in out, (who, code, out)
        plan = fleet.cli_json("plan", "show", name)["plan"]
        subnet = ipaddress.IPv4Network(plan["networks"][0]["subnet"])
        fixed = {v["service"]: v["spec"]["network"]["address"] for v in plan["vms"]}
        assert len(set(fixed.values())) == 3 and all(ipaddress.IPv4Address(a) in subnet for a in fixed.values())
        assert network_exists(f"cb-{name}")
        health = {h["vm"]: h for h in fleet.cli_json("health", "list")["health"] if h["vm"] in vms.values()}
        assert {h["state"] for h in health.values()} == {"HEALTH_STATE_HEALTHY"}, health
        ps = {row["vm"]: row for row in fleet.cli_json("ps", name)["vms"]}
        assert set(ps) == set(vms.values()) and {r["state"] for r in ps.values()} == {"running"}, ps

        # the same file again: the same revision, nothing created
        again = run_versions(fleet.cli("-o", "json", "up", "-f", str(path), timeout=300).stdout)[-1]
        assert again["state"] == "PLAN_RUN_STATE_SUCCEEDED" and again["revision"] == final["revision"], again
        assert {v.get("change", "CHANGE_KIND_NONE") for v in again["vms"]} == {"CHANGE_KIND_NONE"}, again
        history = fleet.cli_json("plan", "history", name)["runs"]
        assert [r["action"] for r in history] == ["up", "up"]

        # more memory for db: the same VM restarted with it (no --allow-replace), not a new one
        db_uuid = fleet.cli_json("vm", "show", vms["db"])["uuid"]
        _code, boot_before, _ = guest_sh(f"cb-{vms['db']}", "cat /proc/sys/kernel/random/boot_id")
        bigger = edited(path, db={"memory": "160MiB"})
        resized = run_versions(fleet.cli("-o", "json", "up", "-f", str(bigger), timeout=600).stdout)[-1]
        assert resized["state"] == "PLAN_RUN_STATE_SUCCEEDED", resized
        changes = {v["service"]: v.get("change", "CHANGE_KIND_NONE") for v in resized["vms"]}
        assert changes == {"db": "CHANGE_KIND_RESTART", "api": "CHANGE_KIND_NONE", "web": "CHANGE_KIND_NONE"}
        assert fleet.cli_json("vm", "show", vms["db"])["uuid"] == db_uuid
        _code, boot_after, _ = guest_sh(f"cb-{vms['db']}", "cat /proc/sys/kernel/random/boot_id")
        assert boot_after.strip() and boot_after != boot_before  # the guest was restarted
        dominfo = subprocess.run(
            ["virsh", "-c", "qemu:///system", "dumpxml", "--inactive", f"cb-{vms['db']}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "<memory unit='KiB'>163840</memory>" in dominfo

        # a new kernel command line for web is a replace: the old web is exported to a backup file first
        cmdline = f"console=ttyS0 clonebox.hostname={vms['web']}"
        replaced_file = edited(bigger, web={"kernel_boot": {"cmdline": cmdline}})
        replaced = run_versions(
            fleet.cli("-o", "json", "up", "-f", str(replaced_file), "--allow-replace", timeout=600).stdout
        )[-1]
        assert replaced["state"] == "PLAN_RUN_STATE_SUCCEEDED", replaced
        web_row = next(v for v in replaced["vms"] if v["service"] == "web")
        assert web_row["change"] == "CHANGE_KIND_REPLACE" and web_row["created"], web_row
        backup = fleet.root / "controller-host" / "plan-backups" / name / vms["web"] / f"{replaced['id']}.cbsnap"
        assert backup.stat().st_size > 0 and oct(backup.stat().st_mode & 0o777) == "0o600"
        assert not fleet.cli_json("snapshot", "list", vms["web"])["snapshots"]

        down = run_versions(fleet.cli("-o", "json", "down", name, timeout=600).stdout)
        assert down[-1]["state"] == "PLAN_RUN_STATE_SUCCEEDED", down[-1]
        # reverse order: a VM goes only after everything that depends on it is gone
        deleted = {"PLAN_VM_STATE_DELETED"}
        deleting = {"PLAN_VM_STATE_DELETING", "PLAN_VM_STATE_DELETED"}
        for dependent, dependency in (("web", "api"), ("api", "db")):
            seen = down[first_version(down, dependency, deleting)]
            assert state_in(seen, dependent) in deleted, seen
        assert not set(vms.values()) & set(fleet_vms(fleet))
        assert not network_exists(f"cb-{name}")  # removed with its last VM
    finally:
        fleet.cli("down", name, "--with-snapshots", check=False, timeout=600)


def test_a_vm_that_never_turns_healthy_rolls_the_stack_back(fleet: RealFleet) -> None:
    name = f"{fleet.host}-br"
    path = plan_file(fleet, name, broken_api=True)
    try:
        r = fleet.cli("up", "-f", str(path), check=False, timeout=600)
        assert r.returncode != 0, r.stdout
        assert "Traceback" not in r.stderr + r.stdout
        # the failure names the VM and the probe that failed
        assert f"{name}-api" in r.stderr and "never" in r.stderr, r.stderr
        runs = fleet.cli_json("plan", "history", name)["runs"]
        assert runs[0]["state"] == "PLAN_RUN_STATE_ROLLED_BACK", runs[0]
        by_service = {v["service"]: v for v in runs[0]["vms"]}
        assert by_service["web"]["state"] == "PLAN_VM_STATE_SKIPPED", by_service
        assert by_service["api"]["failed_probe"] == "never", by_service
        # nothing of the stack is left, its network neither
        assert not {n for n in fleet_vms(fleet) if n.startswith(f"{name}-")}
        assert not network_exists(f"cb-{name}")
    finally:
        fleet.cli("down", name, "--with-snapshots", check=False, timeout=600)


def test_a_volume_keeps_its_data_through_a_replace_and_a_down(fleet: RealFleet) -> None:
    # one service of the example with a plan volume: what a guest writes to it outlives its VM
    name = f"{fleet.host}-vo"
    doc: dict[str, Any] = yaml.safe_load(plan_file(fleet, name).read_text())
    doc["vms"] = {"db": doc["vms"]["db"]}
    doc["vms"]["db"]["volumes"] = ["data"]
    doc["volumes"] = {"data": {"size": "16MiB"}}
    path = fleet.root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    domain = f"cb-{name}-db"
    marker = "volume-kept-42"
    # the example's own data disk is vda; the volume comes after the VM's own disks, with its serial
    device = "/dev/vdb"
    try:
        first = run_versions(fleet.cli("-o", "json", "up", "-f", str(path), timeout=600).stdout)[-1]
        assert first["state"] == "PLAN_RUN_STATE_SUCCEEDED", first
        _code, serial, _ = guest_sh(domain, "cat /sys/block/vdb/serial")
        assert serial.decode().strip() == f"vol-{name}-data"[:20], serial
        code, _out, err = guest_sh(domain, f"printf {marker} | dd of={device} bs=512 conv=sync 2>/dev/null && sync")
        assert code == 0, err

        # a replace makes a new VM that attaches the same volume; the old VM's own disks go to a backup
        # first (a disk-only snapshot of the running VM that leaves the volume out, then its export)
        cmdline = f"console=ttyS0 clonebox.hostname={name}-db-2"
        replaced_file = edited(path, db={"kernel_boot": {"cmdline": cmdline}})
        replaced = run_versions(
            fleet.cli("-o", "json", "up", "-f", str(replaced_file), "--allow-replace", timeout=600).stdout
        )[-1]
        assert replaced["state"] == "PLAN_RUN_STATE_SUCCEEDED", replaced
        assert next(v for v in replaced["vms"] if v["service"] == "db")["change"] == "CHANGE_KIND_REPLACE"
        backup = fleet.root / "controller-host" / "plan-backups" / name / f"{name}-db" / f"{replaced['id']}.cbsnap"
        with backup.open("rb") as f:
            header = next(read_archive(f)).header
        own = [d.name for d in header.spec.disks if not d.volume]
        assert own and [d.name for d in header.disks] == own, header.disks
        assert [d.volume for d in header.spec.disks if d.volume] == [f"{name}-data"]
        _code, got, _ = guest_sh(domain, f"dd if={device} bs=512 count=1 2>/dev/null | head -c {len(marker)}")
        assert got.decode() == marker

        # down keeps the volume: the next up attaches it again, data and all
        down = run_versions(fleet.cli("-o", "json", "down", name, timeout=600).stdout)[-1]
        assert down["state"] == "PLAN_RUN_STATE_SUCCEEDED", down
        assert f"{name}-db" not in fleet_vms(fleet)
        assert [p.name for p in fleet.root.rglob(f"vol.{name}-data.*")] == [f"vol.{name}-data.qcow2"]
        again = run_versions(fleet.cli("-o", "json", "up", "-f", str(replaced_file), timeout=600).stdout)[-1]
        assert again["state"] == "PLAN_RUN_STATE_SUCCEEDED", again
        _code, got, _ = guest_sh(domain, f"dd if={device} bs=512 count=1 2>/dev/null | head -c {len(marker)}")
        assert got.decode() == marker

        # down --volumes removes it too
        gone = run_versions(fleet.cli("-o", "json", "down", name, "--volumes", timeout=600).stdout)[-1]
        assert gone["state"] == "PLAN_RUN_STATE_SUCCEEDED", gone
        assert not list(fleet.root.rglob(f"vol.{name}-data.*"))
    finally:
        fleet.cli("down", name, "--with-snapshots", "--volumes", check=False, timeout=600)
