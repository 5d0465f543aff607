"""``UpdateVm`` on every adapter: the agent's update use case over the fake, libvirt's test driver and real QEMU.

Each test runs ``AgentService.update`` (with a real journal) on the harness's adapter, so the same
semantics are held to the same checks everywhere: labels and health checks change in place (the guest is
not touched), vCPUs and memory take a graceful restart of a running VM (a stopped one is only redefined),
anything else is refused with ``VM_UPDATE_NEEDS_REPLACE``, bad values are refused naming the field, and a
retry with the same request id or a dry run changes nothing. What the domain really has is read from the
hypervisor itself (``virDomainGetInfo`` through a libvirt connection of the test's own; the fake's
``domain_resources``), never only from the spec the agent keeps.
"""

from __future__ import annotations

import asyncio
import json
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import libvirt
import pytest

from clonebox_agent.adapters.common import Fault, MemoryStepLog
from clonebox_agent.adapters.fake import BOOT_ID_PATH
from clonebox_agent.app.events import VmEventType
from clonebox_agent.app.service import AgentService
from clonebox_agent.journal.store import Journal, TxnState
from clonebox_agent.ports import Capability
from clonebox_core.errors import FailedPrecondition, Internal, InvalidArgument, NotFound
from clonebox_core.health import FileProbe, Probe, ProbeType
from clonebox_core.model import CloudInit, DiskSpec, Resources, Revision, StepState, VmSpec, VmState
from clonebox_core.plan import ChangeKind

if TYPE_CHECKING:
    from conftest import Harness

#: a health check every adapter takes (it runs inside the guest; nothing here runs it)
CHECK = Probe("ready", ProbeType.FILE, interval_ms=5000, timeout_ms=1000, file=FileProbe("/run/ready"))


@pytest.fixture
async def svc(h: Harness, tmp_path: Path) -> AsyncIterator[AgentService]:
    """The agent's use cases on the harness's adapter (not started: the harness owns the adapter's events)."""
    journal = Journal(tmp_path / "journal.db")
    service = AgentService("h1", h.hv, journal, reserve=Resources(), stop_timeout_seconds=30)
    yield service
    journal.close()


# ---- reading the hypervisor directly ---------------------------------------------------------------


def _libvirt_domain(h: Harness, vm: str) -> Any:
    uri = "test:///default" if h.kind == "libvirt-test" else "qemu:///system"
    conn = libvirt.open(uri)  # the test driver shares its state with the adapter's open connection
    h.cleanups.append(conn.close)
    return conn.lookupByName(h.hv.domain_name(vm))


def resources(h: Harness, vm: str) -> tuple[int, int]:
    """(vCPUs, MiB) the domain has: of the running guest while it runs (``virsh dominfo``), else defined."""
    if h.kind == "fake":
        found: tuple[int, int] = h.hv.domain_resources(vm)
        return found
    info = _libvirt_domain(h, vm).info()
    return int(info[3]), int(info[1]) // 1024


def domain_id(h: Harness, vm: str) -> int:
    """libvirt's id of the running domain (a new QEMU process gets a new one); the fake's boot counter."""
    if h.kind == "fake":
        index: int = h.hv._domains[vm].index
        return index
    return int(_libvirt_domain(h, vm).ID())


def persistent_xml(h: Harness, vm: str) -> ET.Element:
    return ET.fromstring(_libvirt_domain(h, vm).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))


async def boot_id(h: Harness, vm: str) -> str:
    """The guest kernel's boot id, read through qemu-ga (waits for qemu-ga on a real guest)."""

    async def read() -> bytes | None:
        try:
            return await h.hv.guest_file_read(vm, BOOT_ID_PATH, 64)
        except FailedPrecondition:
            return None

    found: bytes = await h.wait_until(read, 180 if h.real else 5, f"the boot id of {vm}")
    return found.decode().strip()


def kept(spec: VmSpec, **new: Any) -> VmSpec:
    """``spec`` with the four updatable fields changed: what an update must leave as the VM's spec."""
    return replace(spec, **new)


def events_of(svc: AgentService, vm: str) -> list[tuple[VmEventType, str, VmSpec]]:
    return [(e.type, e.reason, e.vm.spec) for e in list(svc.events._ring) if e.vm.name == vm]


def txns(svc: AgentService) -> list[tuple[str, str, TxnState, list[str]]]:
    return [
        (t.kind, t.target, t.state, [s.name for s in t.steps])
        for t in svc.journal.txns(limit=100)
        if t.kind == "vm.update"
    ]


# ---- in place ----------------------------------------------------------------------------------------


async def test_labels_and_health_checks_change_in_place(h: Harness, svc: AgentService) -> None:
    spec = h.spec(labels=(("app", "web"),))
    created = await h.hv.create(spec, start=True)
    before_id = domain_id(h, spec.name)
    new = replace(spec, labels=(("app", "web"), ("tier", "front")), health_checks=(CHECK,))

    result = await svc.update(new, request_id="r1")

    assert (result.kind, result.fields, result.restarted, result.forced) == (
        ChangeKind.IN_PLACE,
        ("health_checks", "labels"),
        False,
        False,
    )
    expected = kept(spec, labels=new.labels, health_checks=(CHECK,))
    record = await h.hv.get(spec.name)
    assert (record.uuid, record.state, record.spec) == (created.uuid, VmState.RUNNING, expected)
    assert (await h.hv.list())[0].spec == expected
    assert result.vm.spec == expected and result.vm.state == VmState.RUNNING
    # the guest was not touched: the same running domain, with what it booted with
    assert domain_id(h, spec.name) == before_id
    assert resources(h, spec.name) == (1, 64)
    if h.kind != "fake":
        # in the persistent definition too, so it survives the next boot
        assert ET.tostring(persistent_xml(h, spec.name)).count(b"tier") == 1
    # the change is an event carrying the new spec (WatchVms; the health monitor takes its checks from it)
    assert events_of(svc, spec.name) == [(VmEventType.MODIFIED, "updated", expected)]
    assert txns(svc) == [("vm.update", spec.name, TxnState.COMMITTED, ["redefine"])]
    audit = [e for e in svc.journal.pending_events() if e.action == "vm.update"]
    assert len(audit) == 1 and audit[0].details["change"] == "in_place"


async def test_an_equal_spec_is_no_change(h: Harness, svc: AgentService) -> None:
    spec = h.spec(health_checks=(CHECK,))
    await h.hv.create(spec, start=True)
    before_id = domain_id(h, spec.name)
    result = await svc.update(spec, request_id="r1")
    assert (result.kind, result.fields, result.restarted) == (ChangeKind.NONE, (), False)
    assert result.vm.spec == spec and domain_id(h, spec.name) == before_id
    assert txns(svc) == [] and events_of(svc, spec.name) == []


async def test_secret_fields_and_everything_else_stay_as_kept(h: Harness, svc: AgentService) -> None:
    """The VM keeps its own spec (secret fields as the digests it stored) with only the four fields new."""
    spec = h.spec(cloud_init=CloudInit(user_data="#cloud-config\nruncmd: [echo secret]\n"))
    await h.hv.create(spec, start=False)
    before = (await h.hv.get(spec.name)).spec
    stored_before = stored_spec_text(h, spec.name)
    # a request as the controller sends it: the secret in full (the agent may keep only its digest)
    result = await svc.update(replace(spec, labels=(("a", "b"),), memory_mib=96), request_id="")
    assert (result.kind, result.fields) == (ChangeKind.RESTART, ("labels", "memory_mib"))
    assert (await h.hv.get(spec.name)).spec == replace(before, labels=(("a", "b"),), memory_mib=96)
    if h.kind != "fake":
        # what libvirt keeps: the same document, byte for byte, but for the two keys that changed
        stored_after = stored_spec_text(h, spec.name)
        doc_before, doc_after = json.loads(stored_before), json.loads(stored_after)
        assert doc_after["spec"]["labels"] == [["a", "b"]] and doc_after["spec"]["memory_mib"] == 96
        doc_before["spec"].update(labels=[["a", "b"]], memory_mib=96)
        assert json.dumps(doc_before, sort_keys=True, separators=(",", ":")) == stored_after
        user_data = doc_after["spec"]["cloud_init"]["user_data"]
        assert user_data.startswith("sha256:") and "secret" not in stored_after


def stored_spec_text(h: Harness, vm: str) -> str:
    """The ``cb:spec`` document in the persistent definition, as libvirt returns it ("" on the fake)."""
    if h.kind == "fake":
        return ""
    found = persistent_xml(h, vm).find("./metadata/{https://clonebox.dev/xmlns/agent/1}owner")
    assert found is not None
    text = next(c.text for c in found if c.tag.endswith("spec"))
    assert text
    return text


# ---- restart -----------------------------------------------------------------------------------------


async def test_vcpus_and_memory_restart_a_running_vm(h: Harness, svc: AgentService) -> None:
    spec = h.spec(labels=(("app", "db"),))
    created = await h.hv.create(spec, start=True)
    assert resources(h, spec.name) == (1, 64)
    before_id = domain_id(h, spec.name)
    disks_before = [d.get("file") for d in persistent_xml(h, spec.name).iter("source")] if h.kind != "fake" else []
    volumes_before = (await h.hv.inventory()).volumes

    # 1 s: the real QEMU of h.spec() sits in SeaBIOS, which ignores ACPI: the restart forces it off
    result = await svc.update(replace(spec, vcpus=2, memory_mib=96), request_id="r1", timeout_seconds=1)

    assert (result.kind, result.fields, result.restarted) == (ChangeKind.RESTART, ("memory_mib", "vcpus"), True)
    assert result.forced == h.real
    record = await h.hv.get(spec.name)
    assert (record.uuid, record.state) == (created.uuid, VmState.RUNNING)
    assert record.spec == kept(spec, vcpus=2, memory_mib=96)
    # the running guest has the new values: a new boot (a new QEMU process on libvirt)
    assert resources(h, spec.name) == (2, 96)
    assert domain_id(h, spec.name) != before_id
    # disks stay: the same volumes, the same files in the definition
    assert (await h.hv.inventory()).volumes == volumes_before
    if h.kind != "fake":
        assert [d.get("file") for d in persistent_xml(h, spec.name).iter("source")] == disks_before
    assert txns(svc) == [("vm.update", spec.name, TxnState.COMMITTED, ["stop", "redefine", "retire"])]
    assert events_of(svc, spec.name)[-1] == (VmEventType.MODIFIED, "updated", record.spec)


async def test_vcpus_and_memory_of_a_stopped_vm_are_only_redefined(h: Harness, svc: AgentService) -> None:
    spec = h.spec()
    created = await h.hv.create(spec, start=False)
    result = await svc.update(replace(spec, vcpus=2, memory_mib=128), request_id="r1")
    assert (result.kind, result.restarted, result.forced) == (ChangeKind.RESTART, False, False)
    record = await h.hv.get(spec.name)
    assert (record.uuid, record.state, record.spec) == (
        created.uuid,
        VmState.STOPPED,
        kept(spec, vcpus=2, memory_mib=128),
    )
    assert resources(h, spec.name) == (2, 128)
    assert txns(svc) == [("vm.update", spec.name, TxnState.COMMITTED, ["redefine"])]
    # it boots with them
    await h.hv.start(spec.name)
    assert resources(h, spec.name) == (2, 128)


@pytest.mark.requires(Capability.GUEST_AGENT, Capability.ACPI_SHUTDOWN)
async def test_a_real_guest_keeps_its_boot_in_place_and_its_disk_data_through_a_restart(
    h: Harness, svc: AgentService
) -> None:
    spec = h.guest_spec()
    await h.hv.create(spec, start=True)
    first_boot = await boot_id(h, spec.name)
    if h.real:
        # the guest's /init has mounted the data disk; a line written there and synced
        await h.wait_until(
            lambda: _guest_ok(h, spec.name, "test -e /run/data-settled"), 120, "/data mounted in the guest"
        )
        assert await _guest_ok(h, spec.name, "echo kept-through-the-update > /data/marker && sync")
    else:
        h.hv.disk_state[spec.name] = "kept-through-the-update"

    in_place = await svc.update(replace(spec, labels=(("stage", "one"),), health_checks=(CHECK,)), request_id="a")
    assert (in_place.kind, in_place.restarted) == (ChangeKind.IN_PLACE, False)
    assert await boot_id(h, spec.name) == first_boot, "an in-place update rebooted the guest"

    restart = await svc.update(
        replace(spec, labels=(("stage", "one"),), health_checks=(CHECK,), memory_mib=160),
        request_id="b",
        timeout_seconds=90,
    )
    # qemu-ga (or ACPI) shut the guest down cleanly: nothing was forced
    assert (restart.kind, restart.restarted, restart.forced) == (ChangeKind.RESTART, True, False)
    assert resources(h, spec.name) == (1, 160)
    assert await boot_id(h, spec.name) != first_boot
    if h.real:
        await h.wait_until(
            lambda: _guest_ok(h, spec.name, "test -e /run/data-settled"), 120, "/data mounted after the restart"
        )
        result = await h.hv.guest_exec(spec.name, ["/bin/cat", "/data/marker"])
        assert result.stdout.decode().strip() == "kept-through-the-update"
    else:
        assert h.hv.disk_state[spec.name] == "kept-through-the-update"


async def _guest_ok(h: Harness, vm: str, script: str) -> bool:
    try:
        return (await h.hv.guest_exec(vm, ["/bin/sh", "-c", script], timeout=30)).exit_code == 0
    except FailedPrecondition:
        return False


# ---- refusals ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("change", ["disks", "cloud_init", "labels+disks"])
async def test_a_change_that_needs_a_replace_is_refused_and_changes_nothing(
    h: Harness, svc: AgentService, change: str
) -> None:
    spec = h.spec()
    created = await h.hv.create(spec, start=True)
    before_id = domain_id(h, spec.name)
    new = {
        "disks": replace(spec, disks=(*spec.disks, DiskSpec("data", size_mib=8))),
        "cloud_init": replace(spec, cloud_init=CloudInit(user_data="#cloud-config\n")),
        "labels+disks": replace(spec, labels=(("a", "b"),), vcpus=2, disks=(DiskSpec("root", size_mib=32),)),
    }[change]
    for dry_run in (True, False):
        with pytest.raises(FailedPrecondition) as err:
            await svc.update(new, request_id="r1", dry_run=dry_run)
        assert err.value.reason == "VM_UPDATE_NEEDS_REPLACE"
        replaced = change.rsplit("+", maxsplit=1)[-1]
        assert replaced in err.value.message
        assert "cannot change without re-creating the VM" in err.value.message
        # only the fields at fault: labels and vcpus alone would not need a new VM
        expected_fields = {"disks": "disks", "cloud_init": "cloud_init", "labels+disks": "disks"}
        assert err.value.metadata == {"vm": spec.name, "fields": expected_fields[change]}
    record = await h.hv.get(spec.name)
    assert (record.uuid, record.state, record.spec) == (created.uuid, VmState.RUNNING, spec)
    assert domain_id(h, spec.name) == before_id and resources(h, spec.name) == (1, 64)
    assert svc.journal.txns() == [] and events_of(svc, spec.name) == []
    # refused is not an answer to remember: the same request id works for a valid update afterwards
    assert (await svc.update(replace(spec, labels=(("a", "b"),)), request_id="r1")).kind == ChangeKind.IN_PLACE


#: a value out of its fixed range is refused by the spec's validation before the adapter is asked anything:
#: real QEMU would repeat what the test driver shows (the same domain, not restarted), so it runs only the
#: cases judged against the host's real size
_NOT_ON_QEMU = pytest.mark.not_on("libvirt-qemu")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        pytest.param({"vcpus": 0}, "spec.vcpus", marks=_NOT_ON_QEMU),
        pytest.param({"memory_mib": 8}, "spec.memory_mib", marks=_NOT_ON_QEMU),
        pytest.param({"labels": (("Bad Key", "x"),)}, "spec.labels", marks=_NOT_ON_QEMU),
        pytest.param(
            {"health_checks": (replace(CHECK, interval_ms=10),)}, "spec.health_checks[0].interval", marks=_NOT_ON_QEMU
        ),
        ("beyond-host-cpus", "spec.vcpus"),
        ("beyond-host-memory", "spec.memory_mib"),
    ],
)
async def test_invalid_values_are_refused_naming_the_field(
    h: Harness, svc: AgentService, change: Any, field: str
) -> None:
    spec = h.spec()
    created = await h.hv.create(spec, start=True)
    before_id = domain_id(h, spec.name)
    capacity = (await h.hv.host_info()).capacity
    beyond_host = isinstance(change, str)
    if change == "beyond-host-cpus":
        change = {"vcpus": capacity.vcpus + 1}
    elif change == "beyond-host-memory":
        change = {"memory_mib": capacity.memory_mib + 1}
    for dry_run in (True, False):
        with pytest.raises(InvalidArgument) as err:
            await svc.update(replace(spec, **change), request_id="r1", dry_run=dry_run)
        assert err.value.metadata.get("field") == field, err.value.message
        assert err.value.message.startswith(field)
        # beyond the host: a clear word about this host's size (not a range, not a libvirt error)
        assert ("than host h1 has" in err.value.message) == beyond_host, err.value.message
    record = await h.hv.get(spec.name)
    assert (record.uuid, record.state, record.spec) == (created.uuid, VmState.RUNNING, spec)
    assert domain_id(h, spec.name) == before_id and resources(h, spec.name) == (1, 64)
    assert svc.journal.txns() == []


async def test_an_unknown_vm_is_not_found(h: Harness, svc: AgentService) -> None:
    for dry_run in (True, False):
        with pytest.raises(NotFound) as err:
            await svc.update(h.spec(), request_id="r1", dry_run=dry_run)
        assert err.value.reason == "VM_NOT_FOUND"
    assert svc.journal.txns() == []


# ---- idempotency, dry run ----------------------------------------------------------------------------


async def test_a_retry_with_the_same_request_id_does_nothing_twice(h: Harness, svc: AgentService) -> None:
    spec = h.spec()
    await h.hv.create(spec, start=True)
    new = replace(spec, vcpus=2)
    first = await svc.update(new, request_id="r1", timeout_seconds=1)
    assert (first.kind, first.restarted) == (ChangeKind.RESTART, True)
    booted = domain_id(h, spec.name)
    events = len(events_of(svc, spec.name))

    again = await svc.update(new, request_id="r1", timeout_seconds=1)
    # the same answer, and nothing done: no restart, no transaction, no event
    assert (again.kind, again.fields, again.restarted, again.forced) == (
        first.kind,
        first.fields,
        first.restarted,
        first.forced,
    )
    assert again.vm.spec == first.vm.spec and again.vm.state == VmState.RUNNING
    assert domain_id(h, spec.name) == booted
    assert len(txns(svc)) == 1 and len(events_of(svc, spec.name)) == events
    # another request id with the same spec: nothing differs any more
    other = await svc.update(new, request_id="r2")
    assert (other.kind, other.restarted) == (ChangeKind.NONE, False) and domain_id(h, spec.name) == booted
    # a request id used for another VM's change is refused
    with pytest.raises(InvalidArgument) as err:
        await svc.update(replace(new, name="another-vm"), request_id="r1")
    assert err.value.reason == "REQUEST_ID_REUSED"


async def test_a_dry_run_changes_nothing(h: Harness, svc: AgentService) -> None:
    spec = h.spec()
    await h.hv.create(spec, start=True)
    before_id = domain_id(h, spec.name)
    new = replace(spec, vcpus=2, labels=(("a", "b"),))
    result = await svc.update(new, request_id="r1", dry_run=True)
    assert (result.kind, result.fields, result.restarted) == (ChangeKind.RESTART, ("labels", "vcpus"), False)
    assert result.vm.spec == spec
    assert (await h.hv.get(spec.name)).spec == spec
    assert domain_id(h, spec.name) == before_id and resources(h, spec.name) == (1, 64)
    assert svc.journal.txns() == [] and events_of(svc, spec.name) == []
    # a dry run records no answer: the request id still does the change
    assert (await svc.update(new, request_id="r1", timeout_seconds=1)).restarted


# ---- serialized with other changes --------------------------------------------------------------------


async def test_an_update_waits_for_another_change_of_the_vm(h: Harness, svc: AgentService) -> None:
    spec = h.spec()
    await h.hv.create(spec, start=True)
    lock = svc.vm_lock(spec.name)
    await lock.acquire()  # another change of the VM (a snapshot restore, a stop) holds it
    update = asyncio.create_task(svc.update(replace(spec, labels=(("a", "b"),)), request_id="r1"))
    await asyncio.sleep(0.3)
    assert not update.done() and (await h.hv.get(spec.name)).spec == spec
    lock.release()
    assert (await update).kind == ChangeKind.IN_PLACE
    assert (await h.hv.get(spec.name)).spec.labels == (("a", "b"),)


# ---- the step of the adapter --------------------------------------------------------------------------


async def test_the_adapter_step_records_its_identity_and_undo_puts_the_old_values_back(h: Harness) -> None:
    spec = h.spec(labels=(("a", "1"),))
    await h.hv.create(spec, start=False)
    log = MemoryStepLog()
    record = await h.hv.update(spec.name, replace(spec, labels=(("a", "2"),), vcpus=2), steps=log)
    assert record.spec == replace(spec, labels=(("a", "2"),), vcpus=2)
    [step] = log.steps()
    assert (step.name, step.state, step.undo["kind"]) == ("redefine", StepState.DONE, "definition")
    assert step.identity is not None and step.identity["uuid"] == record.uuid
    assert await h.hv.undo_step(step.undo, step.identity) != ""
    assert (await h.hv.get(spec.name)).spec == spec and resources(h, spec.name) == (1, 64)
    # undone once: the domain no longer has the step's values, so a second undo leaves it alone
    assert await h.hv.undo_step(step.undo, step.identity) == ""
    # a domain running on the new vCPUs (restarted on the new definition) keeps them
    log = MemoryStepLog()
    await h.hv.update(spec.name, replace(spec, vcpus=2), steps=log)
    await h.hv.start(spec.name)
    [step] = log.steps()
    assert await h.hv.undo_step(step.undo, step.identity) == ""
    assert (await h.hv.get(spec.name)).spec.vcpus == 2 and resources(h, spec.name) == (2, 64)


async def test_the_revision_of_the_update_event_follows_the_lifecycle(h: Harness, svc: AgentService) -> None:
    spec = h.spec()
    await h.hv.create(spec, start=False)
    start = svc.events.revision
    await svc.update(replace(spec, labels=(("a", "b"),)), request_id="")
    watch = svc.watch(Revision(start.epoch, start.sequence))
    event = await asyncio.wait_for(anext(watch), 5)
    assert (event.type, event.vm.spec.labels, event.reason) == (VmEventType.MODIFIED, (("a", "b"),), "updated")
    await watch.aclose()


async def test_a_failure_after_the_redefine_puts_the_old_values_back(h: Harness) -> None:
    spec = h.spec(labels=(("a", "1"),))
    await h.hv.create(spec, start=False)
    h.hv.faults.fail_on["update:redefined"] = Fault(Internal("injected", reason="INJECTED_FAULT"))
    log = MemoryStepLog()
    log.planned("caller-step", {"kind": "folder", "path": "/nonexistent"})  # another step of the caller's
    with pytest.raises(Internal):
        await h.hv.update(spec.name, replace(spec, labels=(("a", "2"),), vcpus=2, memory_mib=96), steps=log)
    assert (await h.hv.get(spec.name)).spec == spec and resources(h, spec.name) == (1, 64)
    # its own step undone; the caller's left for the caller
    assert [(s.name, s.state) for s in log.steps()] == [
        ("caller-step", StepState.PLANNED),
        ("redefine", StepState.UNDONE),
    ]
    if h.kind != "fake":
        assert domxml_resources(persistent_xml(h, spec.name)) == (1, 64)


def domxml_resources(root: ET.Element) -> tuple[int, int]:
    vcpu, memory = root.find("vcpu"), root.find("memory")
    assert vcpu is not None and memory is not None and vcpu.text and memory.text
    assert memory.get("unit") == "KiB"
    return int(vcpu.text), int(memory.text) // 1024
