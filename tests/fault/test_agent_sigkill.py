"""SIGKILL the agent, change libvirt behind its back, restart: the fleet view converges."""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.realfleet import RealFleet

pytestmark = [pytest.mark.e2e, pytest.mark.libvirt]


def virsh(*args: str) -> None:
    subprocess.run(["virsh", "-c", "qemu:///system", *args], capture_output=True, text=True, check=True)


def states(fleet: RealFleet) -> dict[str, tuple[str, str]]:
    vms = fleet.cli_json("vm", "list")["vms"]
    return {v["name"]: (v.get("state", ""), v.get("state_reason", "")) for v in vms}


def test_agent_killed_and_domains_changed_behind_its_back(real_fleet: RealFleet) -> None:
    keep, destroyed, undefined = (f"{real_fleet.host}-{s}" for s in ("keep", "destroyed", "undefined"))
    for name in (keep, destroyed, undefined):
        real_fleet.cli_json("vm", "create", "-f", str(real_fleet.spec_file(name)), "--wait")

    real_fleet.kill_agent()
    # the agent names domains cb-<vm>
    virsh("destroy", f"cb-{destroyed}")
    virsh("destroy", f"cb-{undefined}")
    virsh("undefine", f"cb-{undefined}")
    real_fleet.start_agent()

    deadline = time.monotonic() + 60
    seen: dict[str, tuple[str, str]] = {}
    while time.monotonic() < deadline:
        seen = states(real_fleet)
        if (
            seen.get(keep, ("",))[0] == "VM_STATE_RUNNING"
            and seen.get(destroyed, ("",))[0] == "VM_STATE_STOPPED"
            and seen.get(undefined, ("",))[0] == "VM_STATE_FAILED"
        ):
            break
        time.sleep(0.5)
    assert seen[keep][0] == "VM_STATE_RUNNING", seen
    assert seen[destroyed][0] == "VM_STATE_STOPPED", seen
    assert seen[undefined] == ("VM_STATE_FAILED", "vanished from host"), seen

    # the vanished VM can still be deleted (its reservation is freed), and so can the rest
    for name in (keep, destroyed, undefined):
        real_fleet.cli("vm", "delete", name, "--wait")
    assert states(real_fleet) == {}
