"""Faults at every named step of a VM create, on real processes and real libvirt (docs/reliability.md).

One fleet (controller + agent as processes, qemu:///system) serves the whole module; each case restarts
only the agent, with ``CLONEBOX_FAULT_INJECTION`` in that agent's environment alone:

- ``STEP=error``: the create fails with the injected fault and nothing of the VM remains; the controller
  does not act twice on the same request id; the agent, asked again with the request id the controller
  used (its operation id), creates the VM exactly once.
- ``STEP=kill``: the agent dies at the step while the user waits on the operation; the crash leaves
  the transaction open and exactly that step's work on the host; the restarted agent rolls it back
  before it serves (a ``recovery.rollback`` audit record reaches the controller), then the controller's
  retry of the same operation (its id is the agent's request id) creates the VM exactly once and the
  user's ``vm create --wait`` succeeds.
- the controller SIGKILLed while it waits on a create: restarted, it resumes the operation, which ends
  with exactly one domain.
- volumes whose step never recorded its identity survive recovery and are found and removed by the sweep.
- a file already standing at the overlay's path survives a failed create byte for byte.

Recovery times (agent start -> serving, and -> clean) are printed at the end of the module (``-s``).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from clonebox.agent.v1 import agent_pb2, agent_pb2_grpc
from clonebox.controller.v1 import audit_service_pb2, host_service_pb2, operation_service_pb2, vm_service_pb2

from clonebox_agent.app.recovery import INTERRUPTED
from clonebox_cli.audit import record_dict
from clonebox_cli.client import ControllerClient
from clonebox_cli.output import message_dict
from clonebox_core.rpc import convert
from clonebox_core.rpc.server import Transport, sync_channel
from clonebox_core.rpc.tls import TlsFiles
from clonebox_core.spec import load_spec_file
from tests.realfleet import IMAGES, RealFleet, running_fleet, wait_serving

pytestmark = [pytest.mark.e2e, pytest.mark.libvirt]

FAULT_ENV = "CLONEBOX_FAULT_INJECTION"
STEPS = ("create:folder", "create:disks", "create:seed", "create:define", "create:start", "create:commit")
USER_DATA = "#cloud-config\nhostname: faulty\n"

#: (case, agent start -> serving s, agent start -> clean s), printed at the end of the module
TIMINGS: list[tuple[str, float, float]] = []


@pytest.fixture(scope="module")
def fleet() -> Iterator[RealFleet]:
    with running_fleet() as f:
        yield f
    if TIMINGS:
        print("\nrecovery after a SIGKILL of the agent (agent process start ->):")
        print(f"{'case':<34} {'serving s':>10} {'clean s':>8}")
        for case, serving, clean in TIMINGS:
            print(f"{case:<34} {serving:>10.2f} {clean:>8.2f}")


# ---- observing the host ------------------------------------------------------------------------


def domains(fleet: RealFleet, vm: str) -> list[str]:
    """Libvirt domains (any state) of ``vm`` (the agent names them cb-<vm>)."""
    r = subprocess.run(
        ["virsh", "-c", "qemu:///system", "list", "--all", "--name"], capture_output=True, text=True, check=True
    )
    return [d for d in r.stdout.split() if d == f"cb-{vm}"]


def domain_state(vm: str) -> str:
    r = subprocess.run(
        ["virsh", "-c", "qemu:///system", "domstate", f"cb-{vm}"], capture_output=True, text=True, check=True
    )
    return r.stdout.strip()


def files_of(fleet: RealFleet, vm: str) -> list[str]:
    """Everything under the agent's storage dir made for ``vm``: pool volumes and its vms/ folder."""
    found: list[str] = []
    pool, vms = fleet.storage_dir / "pool", fleet.storage_dir / "vms"
    if pool.is_dir():
        found += [str(p) for p in pool.iterdir() if p.name.startswith(f"cb-{vm}.")]
    if (vms / f"cb-{vm}").exists():
        found.append(str(vms / f"cb-{vm}"))
    return sorted(found)


def journal(fleet: RealFleet) -> sqlite3.Connection:
    return sqlite3.connect(fleet.root / "agent-host" / "state" / "journal.db", timeout=10)


def open_txns(fleet: RealFleet) -> int:
    with journal(fleet) as db:
        return int(db.execute("SELECT count(*) FROM txns WHERE state='open'").fetchone()[0])


def txns_of(fleet: RealFleet, vm: str) -> list[tuple[str, str, str, str]]:
    """(id, request_id, state, error) of every transaction on ``vm``, oldest first."""
    with journal(fleet) as db:
        rows = db.execute(
            "SELECT id, request_id, state, error FROM txns WHERE target=? ORDER BY created_at, rowid", (vm,)
        ).fetchall()
    return [(str(a), str(b), str(c), str(d)) for a, b, c, d in rows]


def steps_of(fleet: RealFleet, txn_id: str) -> list[tuple[str, str]]:
    with journal(fleet) as db:
        rows = db.execute("SELECT name, state FROM txn_steps WHERE txn_id=? ORDER BY n", (txn_id,)).fetchall()
    return [(str(a), str(b)) for a, b in rows]


def is_clean(fleet: RealFleet, vm: str) -> bool:
    return not domains(fleet, vm) and not files_of(fleet, vm) and open_txns(fleet) == 0


def assert_clean(fleet: RealFleet, vm: str) -> None:
    assert domains(fleet, vm) == []
    assert files_of(fleet, vm) == []
    assert open_txns(fleet) == 0


# ---- driving the fleet -------------------------------------------------------------------------


def restart_agent(fleet: RealFleet, fault: str = "", watch_vm: str = "") -> tuple[float, float]:
    """(Re)start the agent, with ``fault`` as its only fault injection; (start->serving, start->clean) s.

    With ``watch_vm``, a thread polls from the agent's start until nothing of that VM remains.
    """
    if "agent" in fleet.procs:
        fleet.kill_agent()
    clean_at: list[float] = []
    stop = threading.Event()
    started = time.monotonic()

    def poll() -> None:
        while not stop.is_set():
            if is_clean(fleet, watch_vm):
                clean_at.append(time.monotonic())
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=poll, daemon=True) if watch_vm else None
    if watcher is not None:
        watcher.start()
    fleet.start_agent(extra_env={FAULT_ENV: fault} if fault else {FAULT_ENV: ""})
    serving = time.monotonic() - started
    if watcher is not None:
        watcher.join(timeout=60)
        stop.set()
    wait_host_ready(fleet)
    return serving, (clean_at[0] - started if clean_at else float("nan"))


def controller(fleet: RealFleet) -> ControllerClient:
    """The controller's API in this process (what ``clonebox -o json`` prints, without a process per query)."""
    return ControllerClient(fleet.controller, Transport(TlsFiles.in_folder(fleet.root / "user" / "tls", "user")))


def wait_host_ready(fleet: RealFleet, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    client = controller(fleet)
    while time.monotonic() < deadline:
        reply = client.call(client.hosts.ListHosts, host_service_pb2.ListHostsRequest())
        hosts = [message_dict(h) for h in reply.hosts]
        if any(h["name"] == fleet.host and h.get("state") == "HOST_STATE_READY" for h in hosts):
            return
        time.sleep(0.3)
    raise AssertionError(f"host {fleet.host} not READY after {timeout}s")


def spec_for(fleet: RealFleet, vm: str) -> Path:
    """A spec with a disk and cloud-init user-data: every step of a create happens."""
    return fleet.spec_file(vm, cloud_init={"user_data": USER_DATA})


def cli_create(fleet: RealFleet, vm: str, request_id: str) -> subprocess.CompletedProcess[str]:
    return fleet.cli(
        "-o", "json", "vm", "create", "-f", str(spec_for(fleet, vm)), "--wait", "--request-id", request_id, check=False
    )


def operation(fleet: RealFleet, request_id: str) -> dict[str, Any]:
    client = controller(fleet)
    reply = client.call(client.operations.ListOperations, operation_service_pb2.ListOperationsRequest(page_size=1000))
    ops = [message_dict(o) for o in reply.operations if o.request_id == request_id]
    assert len(ops) == 1, ops
    return dict(ops[0])


def agent_create(fleet: RealFleet, vm: str, request_id: str) -> agent_pb2.CreateVmResponse:
    """CreateVm straight to the agent with the controller's certificate, as the controller sends it."""
    spec = load_spec_file(str(spec_for(fleet, vm)))
    tls = TlsFiles.in_folder(fleet.root / "controller-host" / "tls", "controller")
    with sync_channel(fleet.agent, Transport(tls), f"{fleet.host}.agent.e2e.test") as ch:
        stub = agent_pb2_grpc.AgentServiceStub(ch)
        req = agent_pb2.CreateVmRequest(spec=convert.spec_to_proto(spec), request_id=request_id, start=True)
        reply: agent_pb2.CreateVmResponse = stub.CreateVm(req, timeout=300)
        return reply


def fleet_vms(fleet: RealFleet, vm: str) -> list[dict[str, Any]]:
    client = controller(fleet)
    reply = client.call(client.vms.ListVms, vm_service_pb2.ListVmsRequest(page_size=1000))
    return [message_dict(v) for v in reply.vms if v.name == vm]


def wait_fleet_running(fleet: RealFleet, vm: str, timeout: float = 30) -> list[dict[str, Any]]:
    """The controller adopts what the agent reports; the VMs named ``vm`` once one runs (or at timeout)."""
    deadline = time.monotonic() + timeout
    seen = fleet_vms(fleet, vm)
    while time.monotonic() < deadline and not any(v.get("state") == "VM_STATE_RUNNING" for v in seen):
        time.sleep(0.3)
        seen = fleet_vms(fleet, vm)
    return seen


def rollback_records(fleet: RealFleet, vm: str, timeout: float = 30) -> list[dict[str, Any]]:
    """``recovery.rollback`` audit records of ``vm`` on the controller (forwarded from the agent's outbox)."""
    deadline = time.monotonic() + timeout
    while True:
        client = controller(fleet)
        query = audit_service_pb2.AuditFilter(action="recovery.rollback", resource=f"hosts/{fleet.host}/vms/{vm}")
        reply = client.call(client.audit.ListAuditEvents, audit_service_pb2.ListAuditEventsRequest(filter=query))
        records = [record_dict(r) for r in reply.records]
        mine = [r for r in records if str(r.get("resource", "")).endswith(f"/vms/{vm}")]
        if mine or time.monotonic() >= deadline:
            return mine
        time.sleep(0.5)


def retry_exactly_once(fleet: RealFleet, vm: str, request_id: str, first: subprocess.CompletedProcess[str]) -> None:
    """After a failed create: the same request id is not acted on twice by the controller; the agent,
    asked twice with the controller's request id (the operation id), makes exactly one VM."""
    op = operation(fleet, request_id)
    again = cli_create(fleet, vm, request_id)
    assert again.returncode == first.returncode != 0
    assert operation(fleet, request_id)["id"] == op["id"]
    assert domains(fleet, vm) == [], "the controller ran a finished operation again"

    made = agent_create(fleet, vm, op["id"])
    replayed = agent_create(fleet, vm, op["id"])
    assert made.vm.uuid and replayed.vm.uuid == made.vm.uuid
    assert domains(fleet, vm) == [f"cb-{vm}"]
    assert domain_state(vm) == "running"
    committed = [t for t in txns_of(fleet, vm) if t[2] == "committed"]
    assert [t[1] for t in committed] == [op["id"]]
    assert open_txns(fleet) == 0
    seen = wait_fleet_running(fleet, vm)
    assert [(v["name"], v.get("state"), v.get("uuid")) for v in seen] == [(vm, "VM_STATE_RUNNING", made.vm.uuid)]

    fleet.cli("vm", "delete", vm, "--wait")
    assert_clean(fleet, vm)


# ---- the cases ---------------------------------------------------------------------------------


@pytest.mark.parametrize("step", STEPS)
def test_error_at_step(fleet: RealFleet, step: str) -> None:
    vm = f"{fleet.host}-err-{step.split(':')[1]}"
    request_id = f"err-{step}"
    restart_agent(fleet, f"{step}=error")

    first = cli_create(fleet, vm, request_id)
    assert first.returncode != 0
    assert f"injected fault at {step}" in first.stderr
    op = operation(fleet, request_id)
    assert op["done"] and op["error"]["details"][0]["reason"] == "INJECTED_FAULT"
    # the adapter (or, at create:commit, the service) undid every step before answering
    assert_clean(fleet, vm)
    [txn] = txns_of(fleet, vm)
    assert txn[1:3] == (op["id"], "rolled_back") and "INJECTED_FAULT" in txn[3]
    assert all(state == "undone" for _name, state in steps_of(fleet, txn[0])), steps_of(fleet, txn[0])
    assert fleet_vms(fleet, vm) == []  # the reservation is released
    if step == "create:commit":
        # made by libvirt but not on record: taken back by the recovery path, which audits it
        [record] = rollback_records(fleet, vm)
        assert record["outcome"] == "succeeded", record

    restart_agent(fleet)
    retry_exactly_once(fleet, vm, request_id, first)


#: what each step has left on the host when the agent dies there (before recovery)
LEFT_AT_KILL = {
    "create:folder": ("folder",),
    "create:disks": ("folder", "disk"),
    "create:seed": ("folder", "disk", "seed"),
    "create:define": ("folder", "disk", "seed", "domain"),
    "create:start": ("folder", "disk", "seed", "domain", "running"),
    "create:commit": ("folder", "disk", "seed", "domain", "running"),
}


def left_behind(fleet: RealFleet, vm: str) -> tuple[str, ...]:
    files = files_of(fleet, vm)
    found = []
    if any(f.endswith(f"/vms/cb-{vm}") for f in files):
        found.append("folder")
    if any(f.endswith(".data.qcow2") for f in files):
        found.append("disk")
    if any(f.endswith(".cidata.iso") for f in files):
        found.append("seed")
    if domains(fleet, vm):
        found.append("domain")
        if domain_state(vm) == "running":
            found.append("running")
    return tuple(found)


def cli_create_in_background(fleet: RealFleet, vm: str, request_id: str) -> subprocess.Popen[str]:
    tls = str(fleet.root / "user" / "tls")
    cmd = [sys.executable, "-m", "clonebox_cli.main", "--controller", fleet.controller, "--tls-dir", tls]
    cmd += ["-o", "json", "vm", "create", "-f", str(spec_for(fleet, vm)), "--wait", "--request-id", request_id]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=fleet.env)


@pytest.mark.parametrize("step", STEPS)
def test_sigkill_at_step(fleet: RealFleet, step: str) -> None:
    vm = f"{fleet.host}-kill-{step.split(':')[1]}"
    request_id = f"kill-{step}"
    restart_agent(fleet, f"{step}=kill")
    agent = fleet.procs["agent"]
    waiting = cli_create_in_background(fleet, vm, request_id)  # the user waits on the operation throughout
    assert agent.wait(timeout=60) == -signal.SIGKILL
    # the crash left the transaction open and the step's work on the host
    [txn] = txns_of(fleet, vm)
    assert txn[2] == "open"
    assert left_behind(fleet, vm) == LEFT_AT_KILL[step]

    # the agent comes back: it rolls back before serving, then the controller's retry of the same
    # operation (same request id: the operation id) creates the VM, exactly once
    serving, clean = restart_agent(fleet, watch_vm=vm)
    TIMINGS.append((f"kill at {step}", serving, clean))
    out, err = waiting.communicate(timeout=300)
    assert waiting.returncode == 0, err
    created = json.loads(out)
    op = operation(fleet, request_id)
    assert op["done"] and "error" not in op, op
    rolled, committed = sorted(txns_of(fleet, vm), key=lambda t: t[2] != "rolled_back")
    assert rolled[1:] == (txn[1], "rolled_back", INTERRUPTED)
    assert committed[1:3] == (op["id"], "committed") and txn[1] == op["id"]
    [record] = rollback_records(fleet, vm)
    assert record["outcome"] == "succeeded" and record["request_id"] == txn[1], record
    assert domains(fleet, vm) == [f"cb-{vm}"] and domain_state(vm) == "running"
    seen = wait_fleet_running(fleet, vm)
    assert [(v["name"], v.get("uuid")) for v in seen] == [(vm, created["uuid"])]
    assert open_txns(fleet) == 0

    fleet.cli("vm", "delete", vm, "--wait")
    assert_clean(fleet, vm)


def test_controller_killed_while_waiting_on_create(fleet: RealFleet) -> None:
    vm = f"{fleet.host}-ctl"
    request_id = "ctl-kill"
    restart_agent(fleet)
    waiting = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "clonebox_cli.main",
            "--controller",
            fleet.controller,
            "--tls-dir",
            str(fleet.root / "user" / "tls"),
            "vm",
            "create",
            "-f",
            str(spec_for(fleet, vm)),
            "--wait",
            "--request-id",
            request_id,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=fleet.env,
    )
    try:
        # kill the controller as soon as the agent is inside the create's transaction
        deadline = time.monotonic() + 60
        while not any(t[2] == "open" for t in txns_of(fleet, vm)):
            assert time.monotonic() < deadline, "the agent never started the create"
            time.sleep(0.02)
        controller = fleet.procs.pop("controller")
        controller.kill()
        controller.wait()
    finally:
        waiting.wait(timeout=120)
    with sqlite3.connect(fleet.root / "controller-host" / "fleet.db") as db:
        [(done,)] = db.execute("SELECT done FROM operations WHERE request_id=?", (request_id,)).fetchall()
    assert not done, "the operation had already finished when the controller was killed"

    log = fleet.root / "controller.log"
    with log.open("ab") as out:
        fleet.procs["controller"] = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "clonebox_controller.main",
                "--config",
                str(fleet.root / "controller-host" / "controller.yaml"),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=fleet.env,
            start_new_session=True,
        )
    wait_serving(fleet.controller, log, TlsFiles.in_folder(fleet.root / "user" / "tls", "user"), "controller.e2e.test")
    deadline = time.monotonic() + 120
    op = operation(fleet, request_id)
    while not op["done"] and time.monotonic() < deadline:
        time.sleep(0.3)
        op = operation(fleet, request_id)
    assert op["done"] and "error" not in op, op
    wait_host_ready(fleet)  # the agent's session dials the new controller in again
    assert domains(fleet, vm) == [f"cb-{vm}"]
    assert domain_state(vm) == "running"
    assert [v["uuid"] for v in fleet_vms(fleet, vm)] == [op["result"]["vm"]["uuid"]]
    assert open_txns(fleet) == 0
    print(f"\ncontroller killed mid-create: agent transactions {[t[2:] for t in txns_of(fleet, vm)]}")
    wait_host_ready(fleet)  # on a loaded machine the new session may still be settling
    deleted = fleet.cli("vm", "delete", vm, "--wait", check=False)
    if deleted.returncode != 0:
        # the clean-up, not what is tested: a heartbeat late on a loaded machine can leave the host
        # unreachable for a moment after the restart (seen once in CI); the delete is refused then
        assert "unreachable" in deleted.stderr, deleted.stderr
        wait_host_ready(fleet)
        fleet.cli("vm", "delete", vm, "--wait")
    assert_clean(fleet, vm)


SWEEP = textwrap.dedent(
    """
    import asyncio, json, sys
    from pathlib import Path
    from clonebox_agent.adapters.libvirt import LibvirtHypervisor
    from clonebox_agent.app.recovery import Recovery
    from clonebox_agent.journal.store import Journal

    async def main(storage, state, host, images, remove):
        hv = LibvirtHypervisor("qemu:///system", storage, [images], domain_type="qemu", owner=host)
        await hv.open(lambda _event: None)
        try:
            report = await Recovery(Journal(Path(state) / "journal.db"), hv, host).sweep(remove)
        finally:
            await hv.close()
        print(json.dumps({"orphans": report.orphans, "removed": report.removed}))

    asyncio.run(main(*sys.argv[1:5], sys.argv[5] == "remove"))
    """
)


def sweep(fleet: RealFleet, remove: bool) -> dict[str, dict[str, list[str]]]:
    """``Recovery.sweep`` of the fleet's agent, run in a process of its own."""
    state = fleet.root / "agent-host" / "state"
    args = [str(fleet.storage_dir), str(state), fleet.host, str(IMAGES), "remove" if remove else "list"]
    r = subprocess.run(
        [sys.executable, "-c", SWEEP, *args], capture_output=True, text=True, env=fleet.env, timeout=120, check=False
    )
    assert r.returncode == 0, r.stderr
    return dict(json.loads(r.stdout.strip().splitlines()[-1]))


def test_unrecorded_volumes_are_left_to_the_sweep(fleet: RealFleet) -> None:
    vm = f"{fleet.host}-sweep"
    # asked directly (as the controller would), so no controller operation retries it afterwards
    restart_agent(fleet, "create:seed=kill")
    agent = fleet.procs["agent"]
    with pytest.raises(grpc.RpcError):
        agent_create(fleet, vm, "sweep")  # the agent dies mid-call
    assert agent.wait(timeout=60) == -signal.SIGKILL
    [txn] = txns_of(fleet, vm)
    # a crash after libvirt made the volumes but before their identity was recorded: the journal
    # only knows they were planned
    with journal(fleet) as db:
        db.execute(
            "UPDATE txn_steps SET state='planned', identity=NULL WHERE txn_id=? AND name IN ('disk:data', 'seed')",
            (txn[0],),
        )
    volumes = sorted(f for f in files_of(fleet, vm) if "/pool/" in f)
    assert [os.path.basename(v) for v in volumes] == [f"cb-{vm}.cidata.iso", f"cb-{vm}.data.qcow2"]

    restart_agent(fleet)
    # recovery removed only what it could prove it made (the folder); unrecorded volumes stay
    assert domains(fleet, vm) == []
    assert files_of(fleet, vm) == volumes
    assert open_txns(fleet) == 0

    listed = sweep(fleet, remove=False)
    # each volume is reported once, by its pool name (its marked file is the same leftover)
    assert sorted(listed["orphans"][vm]) == sorted(os.path.basename(v) for v in volumes), listed
    assert listed["removed"] == {}
    assert files_of(fleet, vm) == volumes

    removed = sweep(fleet, remove=True)
    assert sorted(removed["removed"][vm]) == volumes
    assert files_of(fleet, vm) == []
    assert vm not in sweep(fleet, remove=False)["orphans"]


def test_file_at_overlay_path_survives_failed_create(fleet: RealFleet) -> None:
    vm = f"{fleet.host}-squat"
    restart_agent(fleet)
    pool = fleet.storage_dir / "pool"
    pool.mkdir(parents=True, exist_ok=True)
    squatter = pool / f"cb-{vm}.data.qcow2"
    content = os.urandom(4096)
    squatter.write_bytes(content)
    before = os.stat(squatter)

    r = cli_create(fleet, vm, "squat")
    assert r.returncode != 0
    assert "already exists" in r.stderr, r.stderr
    assert squatter.read_bytes() == content
    after = os.stat(squatter)
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns, before.st_size)
    assert files_of(fleet, vm) == [str(squatter)]
    assert domains(fleet, vm) == []
    assert open_txns(fleet) == 0
    assert fleet_vms(fleet, vm) == []
    squatter.unlink()
