"""SIGKILL of the agent at every named step of an ``UpdateVm`` restart, on real processes, libvirt and QEMU.

One fleet (controller + agent as processes, qemu:///system) and one running tiny guest serve the module;
the guest holds a marker on its data disk. Each case restarts the agent with
``CLONEBOX_FAULT_INJECTION=STEP=kill`` (``agent/clonebox_agent/faultinject.py``), sends ``UpdateVm`` (more
memory) straight to the agent with the controller's certificate, as the controller does, and checks:

- the agent died at the step and the call failed (UNAVAILABLE), it did not hang;
- restarted, the agent's recovery left no open transaction and ONE definition: the running guest
  (``virsh dominfo``), the persistent definition and the spec the agent keeps all say the old memory
  (before the commit point) or all say the new one (once the guest runs on it), and the VM runs again;
- the guest's data disk still holds the marker;
- the same request, sent again without a fault, ends with the new memory, once.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, replace

import grpc
import pytest
from clonebox.agent.v1 import agent_pb2, agent_pb2_grpc
from clonebox.type.v1 import plan_pb2

from clonebox_core.model import VmSpec
from clonebox_core.rpc import convert
from clonebox_core.rpc.server import Transport, sync_channel
from clonebox_core.rpc.tls import TlsFiles
from clonebox_core.spec import load_spec_file
from tests.e2e.guestagent import GUEST_AGENT_SECONDS, GuestAgentError, eventually, guest_sh
from tests.realfleet import RealFleet, running_fleet

pytestmark = [pytest.mark.e2e, pytest.mark.libvirt]

FAULT_ENV = "CLONEBOX_FAULT_INJECTION"
NS = "https://clonebox.dev/xmlns/agent/1"
MARKER = "/data/update-marker"

#: where the agent dies -> whether the VM ends on the new memory. Before the guest runs on the new
#: definition recovery puts the old one back and starts the VM on it; once it runs on the new one
#: (update:started, between the start and the commit point) the new one stays; past the commit point
#: (update:commit) recovery finishes the transaction
CASES = [
    ("update:stopped", False),
    ("update:redefined", False),
    ("update:started", True),
    ("update:commit", True),
]


@pytest.fixture(scope="module")
def fleet() -> Iterator[RealFleet]:
    with running_fleet() as f:
        yield f


@dataclass
class Guest:
    spec: VmSpec

    @property
    def domain(self) -> str:
        return f"cb-{self.spec.name}"


def virsh(*args: str) -> str:
    r = subprocess.run(["virsh", "-c", "qemu:///system", *args], capture_output=True, text=True, check=False)
    assert r.returncode == 0, f"virsh {' '.join(args)}: {r.stderr}"
    return r.stdout


def stub_call(fleet: RealFleet, method: str, request: object, timeout: float = 300) -> object:
    tls = TlsFiles.in_folder(fleet.root / "controller-host" / "tls", "controller")
    with sync_channel(fleet.agent, Transport(tls), f"{fleet.host}.agent.e2e.test") as ch:
        return getattr(agent_pb2_grpc.AgentServiceStub(ch), method)(request, timeout=timeout)


def update_request(spec: VmSpec, request_id: str) -> agent_pb2.UpdateVmRequest:
    return agent_pb2.UpdateVmRequest(spec=convert.spec_to_proto(spec), request_id=request_id, timeout_seconds=60)


def restart_agent(fleet: RealFleet, fault: str = "") -> None:
    if "agent" in fleet.procs:
        fleet.kill_agent()
    fleet.start_agent(extra_env={FAULT_ENV: fault})


def until_data(guest: Guest) -> None:
    def settled() -> bool:
        try:
            return guest_sh(guest.domain, "test -e /run/data-settled")[0] == 0
        except (GuestAgentError, AssertionError):
            return False

    eventually(settled, GUEST_AGENT_SECONDS, f"qemu-ga of {guest.domain} answering and /data mounted", interval=1.0)


def read_marker(guest: Guest) -> str:
    until_data(guest)
    code, out, err = guest_sh(guest.domain, f"cat {MARKER}")
    assert code == 0, err
    return out.decode().strip()


def memory_everywhere(fleet: RealFleet, guest: Guest) -> tuple[int, int, int, int]:
    """(running guest, persistent definition, libvirt metadata, the agent's answer) memory, MiB."""
    info = dict(line.split(":", 1) for line in virsh("dominfo", guest.domain).splitlines() if ":" in line)
    live = int(info["Max memory"].split()[0]) // 1024
    inactive = ET.fromstring(virsh("dumpxml", "--inactive", guest.domain))
    memory = inactive.find("memory")
    assert memory is not None and memory.text and memory.get("unit") == "KiB"
    owner = inactive.find(f"./metadata/{{{NS}}}owner")
    assert owner is not None
    spec_text = next(c.text for c in owner if c.tag.endswith("spec"))
    kept = json.loads(spec_text or "{}")["spec"]["memory_mib"]
    got = stub_call(fleet, "GetVm", agent_pb2.GetVmRequest(name=guest.spec.name))
    return live, int(memory.text) // 1024, int(kept), int(got.vm.spec.memory_mib)  # type: ignore[attr-defined]


def open_txns(fleet: RealFleet) -> list[tuple[str, str]]:
    with sqlite3.connect(fleet.root / "agent-host" / "state" / "journal.db", timeout=10) as db:
        return [(str(k), str(s)) for k, s in db.execute("SELECT kind, state FROM txns WHERE state='open'")]


def last_update_txn(fleet: RealFleet) -> tuple[str, list[str]]:
    with sqlite3.connect(fleet.root / "agent-host" / "state" / "journal.db", timeout=10) as db:
        row = db.execute(
            "SELECT id, state FROM txns WHERE kind='vm.update' ORDER BY created_at DESC, rowid DESC"
        ).fetchone()
        steps = [str(r[0]) for r in db.execute("SELECT name FROM txn_steps WHERE txn_id=? ORDER BY n", (row[0],))]
    return str(row[1]), steps


@pytest.fixture(scope="module")
def guest(fleet: RealFleet) -> Iterator[Guest]:
    spec = load_spec_file(str(fleet.spec_file(f"{fleet.host}-upd")))
    stub_call(
        fleet, "CreateVm", agent_pb2.CreateVmRequest(spec=convert.spec_to_proto(spec), request_id="c1", start=True)
    )
    g = Guest(spec)
    until_data(g)
    code, _, err = guest_sh(g.domain, f"echo survives > {MARKER} && sync")
    assert code == 0, err
    try:
        yield g
    finally:
        if fleet.procs.get("agent") is None or fleet.procs["agent"].poll() is not None:
            restart_agent(fleet)
        stub_call(fleet, "DeleteVm", agent_pb2.DeleteVmRequest(name=spec.name, request_id="d1"))


@pytest.mark.parametrize(("step", "ends_new"), CASES)
def test_sigkill_during_a_restart_update(fleet: RealFleet, guest: Guest, step: str, ends_new: bool) -> None:
    before = memory_everywhere(fleet, guest)
    old = before[0]
    assert before == (old, old, old, old)
    new_spec = replace(guest.spec, memory_mib=old + 32)
    request_id = f"u-{step}"
    until_data(guest)  # qemu-ga answers: the shutdown is a graceful one

    restart_agent(fleet, f"{step}=kill")
    agent = fleet.procs["agent"]
    failure: list[BaseException] = []

    def call() -> None:
        try:
            stub_call(fleet, "UpdateVm", update_request(new_spec, request_id))
        except BaseException as exc:  # the RPC must fail: the agent dies under it
            failure.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    eventually(lambda: agent.poll() is not None, 300, f"the agent dying at {step}", interval=0.2)
    assert agent.returncode == -signal.SIGKILL, f"the agent ended with {agent.returncode}, not at {step}"
    caller.join(120)
    assert not caller.is_alive(), "UpdateVm still waiting after the agent died"
    assert failure and isinstance(failure[0], grpc.RpcError), failure
    assert failure[0].code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]

    restart_agent(fleet)  # recovery runs before the agent serves
    assert open_txns(fleet) == []
    state, steps = last_update_txn(fleet)
    assert state == ("committed" if step == "update:commit" else "rolled_back"), (state, steps)
    eventually(lambda: virsh("domstate", guest.domain).strip() == "running", 120, f"{guest.domain} running")
    expected = old + 32 if ends_new else old
    assert memory_everywhere(fleet, guest) == (expected, expected, expected, expected)
    assert read_marker(guest) == "survives"

    # the same request again: done once, whatever recovery left
    reply = stub_call(fleet, "UpdateVm", update_request(new_spec, request_id))
    assert reply.kind == (plan_pb2.CHANGE_KIND_NONE if ends_new else plan_pb2.CHANGE_KIND_RESTART)  # type: ignore[attr-defined]
    assert memory_everywhere(fleet, guest) == (old + 32,) * 4
    assert virsh("domstate", guest.domain).strip() == "running"
    assert read_marker(guest) == "survives"
    guest.spec = new_spec
