"""End to end on real libvirt: CLI -> controller -> agent -> QEMU guest -> deleted, nothing left."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.realfleet import RealFleet, running_fleet

pytestmark = [pytest.mark.e2e, pytest.mark.libvirt]


@pytest.fixture(scope="module")
def real_fleet() -> Iterator[RealFleet]:
    """One fleet for the module: every test uses its own VM names and deletes what it made."""
    with running_fleet() as fleet:
        yield fleet


def owned_files(storage_dir: str) -> list[str]:
    """Files under ``storage_dir`` carrying the agent's ownership mark."""
    found = []
    for dirpath, _dirs, files in os.walk(storage_dir):
        for f in files:
            path = os.path.join(dirpath, f)
            try:
                os.getxattr(path, "user.clonebox.owner")
            except OSError:
                continue
            found.append(path)
    return found


def virsh(*args: str) -> str:
    return subprocess.run(["virsh", "-c", "qemu:///system", *args], capture_output=True, text=True, check=True).stdout


def test_tiny_guest_lifecycle(real_fleet: RealFleet) -> None:
    name = f"{real_fleet.host}-a"
    created = real_fleet.cli_json("vm", "create", "-f", str(real_fleet.spec_file(name)), "--wait")
    assert created["state"] == "VM_STATE_RUNNING"
    assert created["host"] == real_fleet.host
    assert f"cb-{name}" in virsh("list", "--name").split()
    assert owned_files(str(real_fleet.storage_dir)), "the overlay must carry the ownership xattr"

    # the guest agent answers: the VM reports addresses that qemu-ga inside the guest gave
    deadline = time.monotonic() + 90
    vm = {}
    while time.monotonic() < deadline:
        vm = real_fleet.cli_json("vm", "show", name)
        if any(a.get("source") == "agent" for a in vm.get("addresses", [])):
            break
        time.sleep(1)
    assert any(a.get("source") == "agent" for a in vm.get("addresses", [])), vm
    # the host picked TCG because KVM guests cannot run here
    host = real_fleet.cli_json("host", "show", real_fleet.host)
    assert host["hypervisor"]["domain_type"] in ("qemu", "kvm")

    stopped = real_fleet.cli_json("vm", "stop", name, "--wait")
    assert stopped["state"] == "VM_STATE_STOPPED"
    assert stopped["state_reason"] == "shutdown", "the guest powered itself off (not forced)"
    ops = real_fleet.cli_json("operation", "list")
    assert ops, "operations are listed"

    real_fleet.cli("vm", "delete", name, "--wait")
    missing = real_fleet.cli("vm", "show", name, check=False)
    assert missing.returncode == 3, missing.stderr
    assert f"cb-{name}" not in virsh("list", "--all", "--name").split()
    assert owned_files(str(real_fleet.storage_dir)) == []
    vols = subprocess.run(
        [
            "bash",
            "-c",
            "virsh -c qemu:///system pool-list --name | grep clonebox | while read p; do "
            "virsh -c qemu:///system vol-list $p --details | grep -F " + name + "; done",
        ],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    assert vols.strip() == ""


def test_forced_stop_when_guest_ignores_acpi(real_fleet: RealFleet) -> None:
    name = f"{real_fleet.host}-b"
    spec = real_fleet.spec_file(
        name,
        kernel_boot={
            "kernel": "testguest/vmlinux",
            "initrd": "testguest/initrd.img",
            "cmdline": "console=ttyS0 quiet clonebox.ignore_shutdown=1",
        },
    )
    real_fleet.cli_json("vm", "create", "-f", str(spec), "--wait")
    assert f"cb-{name}" in virsh("list", "--name").split()
    time.sleep(5)  # let the guest reach /init so it really is ignoring the button
    stopped = real_fleet.cli_json("vm", "stop", name, "--grace", "5", "--wait")
    assert stopped["state"] == "VM_STATE_STOPPED"
    assert stopped["state_reason"] == "destroyed", "the agent forced it off after the grace period"
    real_fleet.cli("vm", "delete", name, "--wait")
    assert f"cb-{name}" not in virsh("list", "--all", "--name").split()


def test_bad_input_is_one_line_and_creates_nothing(real_fleet: RealFleet) -> None:
    bad = real_fleet.root / "bad.yaml"
    bad.write_text("version: 1\nname: ok-name\nvcpus: 1\nmemroy: 128MiB\n")
    r = real_fleet.cli("vm", "create", "-f", str(bad), check=False)
    assert r.returncode == 2
    assert "memroy" in r.stderr and ":4" in r.stderr and "Traceback" not in r.stderr

    outside = real_fleet.spec_file(f"{real_fleet.host}-c", disks=[{"name": "d", "base_image": "/etc/passwd"}])
    r = real_fleet.cli("vm", "create", "-f", str(outside), "--wait", check=False)
    assert r.returncode == 2, r.stderr
    assert "image" in r.stderr.lower()
    assert f"cb-{real_fleet.host}-c" not in virsh("list", "--all", "--name").split()
    assert owned_files(str(real_fleet.storage_dir)) == []
    r = real_fleet.cli("vm", "show", f"{real_fleet.host}-c", check=False)
    assert r.returncode == 3
