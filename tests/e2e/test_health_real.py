"""Health probes end to end on real libvirt: the tiny guest's busybox httpd, qemu-ga, QEMU statistics.

CLI -> controller -> agent -> probes of a real QEMU guest, and back: the agent's WatchHealth stream, the
controller's store and WatchHealth, ``clonebox health watch|check|history`` and ``vm show``. The tiny
guest's /init starts ``httpd -p 80 -h /www``; the tests stop and start it from inside the guest through
qemu-ga (``virsh qemu-agent-command``, not through the agent) and follow what the probes make of it.
Thresholds are asserted on the sequence of results the stream reports, never on the clock.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.guestagent import GUEST_AGENT_SECONDS, eventually, guest_sh, wait_guest_agent
from tests.realfleet import RealFleet, running_fleet

pytestmark = [pytest.mark.e2e, pytest.mark.libvirt]

#: the probes run every second; a state needs a few runs, a boot under TCG some more
STATE_SECONDS = 90.0
SCRIPT = "vm-named"


@pytest.fixture(scope="module")
def fleet() -> Iterator[RealFleet]:
    # probe_scripts_dir must be root-owned and writable by root only (the agent refuses anything else)
    scripts = Path("/var/lib/clonebox/test") / f"probes-{uuid.uuid4().hex[:8]}"
    scripts.mkdir(parents=True, mode=0o755)
    os.chmod(scripts, 0o755)
    script = scripts / SCRIPT
    # passes when the agent gave the VM's name and address and nothing secret in the environment
    script.write_text(
        '#!/bin/sh\n[ -n "$CLONEBOX_VM" ] && [ -n "$CLONEBOX_VM_ADDRESS" ] || exit 3\n'
        'env | grep -qi -e secret -e password -e token && exit 4\necho "ok $CLONEBOX_VM"\n'
    )
    os.chmod(script, 0o755)
    try:
        with running_fleet(agent_extra={"probe_scripts_dir": str(scripts)}) as f:
            yield f
    finally:
        shutil.rmtree(scripts, ignore_errors=True)


@dataclass
class Watch:
    """``clonebox -o json health watch`` running in the background; every JSON line it printed."""

    proc: subprocess.Popen[str]
    lines: list[dict[str, Any]] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)

    def transitions(self, vm: str, check: str) -> list[tuple[dict[str, Any], dict[str, Any] | None]]:
        """Each transition of ``check`` of ``vm`` seen so far, with the health of the update that carried it."""
        found = []
        for line in list(self.lines):
            for t in line.get("transitions", []):
                if t.get("vm") == vm and t.get("check", "") == check:
                    found.append((t, line.get("health")))
        return found


def start_watch(fleet: RealFleet, *vms: str) -> Watch:
    tls = str(fleet.root / "user" / "tls")
    cmd = [sys.executable, "-m", "clonebox_cli.main", "--controller", fleet.controller, "--tls-dir", tls]
    proc = subprocess.Popen(
        [*cmd, "-o", "json", "health", "watch", *vms],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=fleet.env,
    )
    watch = Watch(proc)

    def pump_out() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            watch.lines.append(json.loads(line))

    def pump_err() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            watch.stderr.append(line)

    threading.Thread(target=pump_out, daemon=True).start()
    threading.Thread(target=pump_err, daemon=True).start()
    return watch


def check_of(fleet: RealFleet, vm: str, name: str) -> dict[str, Any]:
    health = fleet.cli_json("vm", "show", vm)["health"]
    for check in health.get("checks", []):
        if check["name"] == name:
            return dict(check)
    raise AssertionError(f"no check {name} in {health}")


def wait_check(fleet: RealFleet, vm: str, name: str, state: str) -> dict[str, Any]:
    want = f"HEALTH_STATE_{state.upper()}"
    return eventually(
        lambda: c if (c := check_of(fleet, vm, name)).get("state") == want else None,
        STATE_SECONDS,
        f"check {name} of {vm} {state}",
        interval=0.5,
    )


def probe(name: str, type_: str, **settings: Any) -> dict[str, Any]:
    return {"name": name, "type": type_, "interval": "1s", "timeout": "800ms", **settings}


def test_probes_follow_a_real_guest(fleet: RealFleet) -> None:
    vm = f"{fleet.host}-h"
    domain = f"cb-{vm}"
    checks = [
        probe("web", "http", failure_threshold=3, http={"port": 80, "path": "/index.html", "body_regex": "CloneBox"}),
        probe("closed", "tcp", failure_threshold=2, critical=False, tcp={"port": 81}),
        probe("hostname", "command", command={"argv": ["cat", "/etc/hostname"], "output_regex": "^testguest"}),
        probe("ga", "guest_agent", interval="2s"),
        probe("ext", "script", interval="2s", script={"name": SCRIPT}),
        probe(
            "load",
            "resource",
            interval="2s",
            critical=False,
            resource={"cpu": {"warn": 99, "critical": 100}, "memory": {"warn": 99, "critical": 100}},
        ),
        probe("marker", "file", critical=False, file={"path": "/www/index.html", "regex": "<!DOCTYPE"}),
    ]
    spec = fleet.spec_file(vm, version=2, health_checks=checks)
    fleet.cli("vm", "create", "-f", str(spec), "--wait")
    watch = start_watch(fleet, vm)
    try:
        wait_guest_agent(domain)
        web = wait_check(fleet, vm, "web", "healthy")
        assert web["last"]["sample"] == "PROBE_SAMPLE_PASS", web

        # every other kind of probe, on the real guest
        for name in ("hostname", "ga", "ext", "marker"):
            assert wait_check(fleet, vm, name, "healthy")
        closed = wait_check(fleet, vm, "closed", "unhealthy")
        # the stored result is the one that made it unhealthy, which may predate the guest's address
        # (the agent sends a check's results on its transitions); a run now reaches the guest's port
        detail = closed["last"]["detail"]
        assert "refused" in detail or detail == "no address on an up libvirt bridge", closed["last"]
        now = fleet.cli("-o", "json", "health", "check", vm, "--probe", "closed", check=False)
        assert now.returncode == 1, now.stderr  # a failed run
        (result,) = json.loads(now.stdout)["results"]
        assert result["sample"] == "PROBE_SAMPLE_FAIL" and "refused" in result["detail"], result
        # QEMU's statistics (balloon period 5 s): real figures, far below the 99 % warning
        load = wait_check(fleet, vm, "load", "healthy")
        assert "cpu" in load["last"]["detail"] and "memory" in load["last"]["detail"], load
        # a non-critical unhealthy check (closed) makes the VM degraded, not unhealthy
        shown = fleet.cli_json("vm", "show", vm)["health"]
        assert shown["state"] == "HEALTH_STATE_DEGRADED", shown

        # stop the web server inside the guest: unhealthy exactly at the 3rd consecutive failure
        before = len(watch.transitions(vm, "web"))
        code, _out, err = guest_sh(domain, "killall httpd")
        assert code == 0, err
        wait_check(fleet, vm, "web", "unhealthy")
        eventually(
            lambda: len(watch.transitions(vm, "web")) >= before + 2,
            30,
            f"web transitions in the watch (exit {watch.proc.poll()}, {len(watch.lines)} lines, {watch.stderr[-5:]})",
        )
        seen = watch.transitions(vm, "web")[before:]
        path = [(t["from_state"], t["to_state"]) for t, _h in seen]
        assert path[:2] == [
            ("HEALTH_STATE_HEALTHY", "HEALTH_STATE_DEGRADED"),
            ("HEALTH_STATE_DEGRADED", "HEALTH_STATE_UNHEALTHY"),
        ], path
        failures = [
            next(c for c in (h or {}).get("checks", []) if c["name"] == "web").get("consecutive_failures", 0)
            for _t, h in seen[:2]
        ]
        assert failures == [1, 3], failures
        assert fleet.cli_json("vm", "show", vm)["health"]["state"] == "HEALTH_STATE_UNHEALTHY"

        # run now: the web probe fails (exit 1), the hostname probe passes (exit 0)
        now = fleet.cli("-o", "json", "health", "check", vm, "--probe", "web", check=False)
        assert now.returncode == 1, now.stderr
        assert json.loads(now.stdout)["results"][0]["sample"] == "PROBE_SAMPLE_FAIL"
        assert fleet.cli_json("health", "check", vm, "--probe", "hostname")["results"][0]["sample"] == (
            "PROBE_SAMPLE_PASS"
        )

        # start it again: healthy again
        code, _out, err = guest_sh(domain, "httpd -p 80 -h /www")
        assert code == 0, err
        wait_check(fleet, vm, "web", "healthy")

        # the watch survives a controller restart: it reconnects and sees the next change
        fleet.restart_controller()
        before = len(watch.transitions(vm, "web"))
        code, _out, err = guest_sh(domain, "killall httpd")
        assert code == 0, err
        eventually(
            lambda: any(t["to_state"] == "HEALTH_STATE_UNHEALTHY" for t, _h in watch.transitions(vm, "web")[before:]),
            STATE_SECONDS,
            "web unhealthy in the watch after the controller restart",
        )
        assert watch.proc.poll() is None, "".join(watch.stderr)
        assert any("reconnect" in line for line in watch.stderr), watch.stderr

        history = fleet.cli_json("health", "history", vm, "--probe", "web", "--since", "1h")
        to_states = [t["to_state"] for t in history["transitions"]]
        assert to_states.count("HEALTH_STATE_UNHEALTHY") >= 2, to_states
        assert "HEALTH_STATE_HEALTHY" in to_states, to_states
    finally:
        watch.proc.terminate()
        watch.proc.wait(10)
        fleet.cli("vm", "delete", vm, "--wait", check=False)


def test_restart_action_restarts_the_vm_and_is_audited(fleet: RealFleet) -> None:
    vm = f"{fleet.host}-r"
    domain = f"cb-{vm}"
    checks = [probe("web", "http", failure_threshold=2, http={"port": 80}, on_failure={"action": "restart"})]
    fleet.cli("vm", "create", "-f", str(fleet.spec_file(vm, version=2, health_checks=checks)), "--wait")
    try:
        wait_guest_agent(domain)
        wait_check(fleet, vm, "web", "healthy")
        code, boot_before, _err = guest_sh(domain, "cat /proc/sys/kernel/random/boot_id")
        assert code == 0 and boot_before.strip()
        # the guest's /init starts httpd on every boot: a restart is what brings the check back
        guest_sh(domain, "killall httpd")

        def restart_audited() -> list[dict[str, Any]] | None:
            records = fleet.cli_json("audit", "list", "--action", "vm.health_action", "--limit", "100")["records"]
            done = [r for r in records if vm in json.dumps(r) and "restart" in json.dumps(r)]
            return done or None

        records = eventually(restart_audited, STATE_SECONDS, "a vm.health_action audit record of the restart")
        assert any("done" in json.dumps(r) for r in records), records
        wait_guest_agent(domain)
        wait_check(fleet, vm, "web", "healthy")
        code, boot_after, _err = guest_sh(domain, "cat /proc/sys/kernel/random/boot_id")
        assert code == 0
        assert boot_after.strip() != boot_before.strip(), "the guest booted again"
        history = fleet.cli_json("health", "history", vm, "--since", "1h")
        assert any(a["kind"] == "CHECK_ACTION_KIND_RESTART" for a in history["actions"]), history
    finally:
        fleet.cli("vm", "delete", vm, "--wait", check=False)


@pytest.mark.parametrize(
    ("check", "field"),
    [
        (probe("meta", "http", http={"port": 80, "path": "http://169.254.169.254/latest"}), "http.path"),
        (probe("host", "tcp", tcp={"port": 22, "host": "10.0.0.1"}), "tcp"),
        (probe("escape", "script", script={"name": "../../../bin/sh"}), "script.name"),
        (probe("missing", "script", script={"name": "not-in-the-dir"}), "script.name"),
    ],
)
def test_probes_aimed_elsewhere_are_refused(fleet: RealFleet, check: dict[str, Any], field: str) -> None:
    vm = f"{fleet.host}-x{uuid.uuid4().hex[:4]}"
    spec = fleet.spec_file(vm, version=2, health_checks=[check])
    r = fleet.cli("vm", "create", "-f", str(spec), "--wait", check=False)
    assert r.returncode != 0, r.stdout
    assert field in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert fleet.cli("vm", "show", vm, check=False).returncode == 3, "nothing was created"


def test_guest_agent_probe_by_default(fleet: RealFleet) -> None:
    vm = f"{fleet.host}-d"
    fleet.cli("vm", "create", "-f", str(fleet.spec_file(vm, version=2)), "--wait")
    try:
        wait_guest_agent(f"cb-{vm}")
        check = eventually(
            lambda: next(
                (
                    c
                    for c in fleet.cli_json("vm", "show", vm)["health"].get("checks", [])
                    if c.get("implicit") and c.get("state") == "HEALTH_STATE_HEALTHY"
                ),
                None,
            ),
            GUEST_AGENT_SECONDS,
            "the implicit guest_agent check healthy",
        )
        assert check["type"] == "HEALTH_CHECK_TYPE_GUEST_AGENT", check
    finally:
        fleet.cli("vm", "delete", vm, "--wait", check=False)
