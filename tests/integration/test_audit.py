"""The audit log over real gRPC with mTLS (in-process controller and agents): who did what, refused or not."""

from __future__ import annotations

import asyncio
import socket

import grpc
import grpc.aio
import pytest
from clonebox.agent.v1 import agent_pb2
from clonebox.controller.v1 import (
    audit_service_pb2,
    audit_service_pb2_grpc,
    host_service_pb2,
    vm_service_pb2,
    vm_service_pb2_grpc,
)
from clonebox.type.v1 import audit_pb2, vm_pb2
from prometheus_client import generate_latest

from clonebox_agent.main import Agent
from clonebox_controller.main import Controller
from clonebox_core.model import Resources
from tests.integration.conftest import TRUST_DOMAIN, Fleet, eventually
from tests.integration.test_fleet import create, spec

pytestmark = pytest.mark.integration

SMALL = Resources(vcpus=4, memory_mib=4096, disk_mib=100_000)
ADMIN = f"spiffe://{TRUST_DOMAIN}/user/admin/admin"


def audit_stub(fleet: Fleet, channel: grpc.aio.Channel | None = None) -> audit_service_pb2_grpc.AuditServiceStub:
    return audit_service_pb2_grpc.AuditServiceStub(channel or fleet.channel)


async def records(fleet: Fleet, **filters: object) -> list[audit_pb2.AuditRecord]:
    request = audit_service_pb2.ListAuditEventsRequest(filter=audit_service_pb2.AuditFilter(**filters), page_size=1000)
    return list((await audit_stub(fleet).ListAuditEvents(request)).records)


def outcomes(recs: list[audit_pb2.AuditRecord]) -> list[tuple[str, str, str, int]]:
    return sorted((r.event.origin, r.event.action, r.event.resource, r.event.outcome) for r in recs)


async def test_a_create_is_recorded_by_controller_and_agent_with_the_caller(fleet: Fleet) -> None:
    await fleet.add_agent("h1", SMALL)
    await create(fleet, spec("web-1"), request_id="req-web-1")

    async def agent_event_arrived() -> bool:
        return any(r.event.origin == "agent/h1" for r in await records(fleet, action="vm.create"))

    await eventually(agent_event_arrived, what="the agent's vm.create event forwarded to the controller")
    recs = await records(fleet, action="vm.create")
    assert outcomes(recs) == [
        ("agent/h1", "vm.create", "hosts/h1/vms/web-1", audit_pb2.AUDIT_OUTCOME_SUCCEEDED),
        ("controller", "vm.create", "vms/web-1", audit_pb2.AUDIT_OUTCOME_ACCEPTED),
        ("controller", "vm.create", "vms/web-1", audit_pb2.AUDIT_OUTCOME_SUCCEEDED),
    ]
    by_origin = {(r.event.origin, r.event.outcome): r.event for r in recs}
    accepted = by_origin[("controller", audit_pb2.AUDIT_OUTCOME_ACCEPTED)]
    assert accepted.actor == ADMIN and accepted.request_id == "req-web-1"
    assert accepted.details["operation"]
    # the operation's end is attributed to whoever started it; the agent's record names the controller
    assert by_origin[("controller", audit_pb2.AUDIT_OUTCOME_SUCCEEDED)].actor == ADMIN
    agent_side = by_origin[("agent/h1", audit_pb2.AUDIT_OUTCOME_SUCCEEDED)]
    assert agent_side.actor == f"spiffe://{TRUST_DOMAIN}/controller/ctl"
    one = (await audit_stub(fleet).GetAuditEvent(audit_service_pb2.GetAuditEventRequest(id=accepted.id))).record
    assert one.event == accepted and len(one.mac) == 64
    verdict = await audit_stub(fleet).VerifyAudit(audit_service_pb2.VerifyAuditRequest())
    assert verdict.ok and verdict.checked >= 3 and "the head file" in verdict.witnesses
    # audit write latency is measured on both sides
    controller_metrics = generate_latest(fleet.controller.metrics.registry).decode()
    agent_metrics = generate_latest(fleet.agents["h1"].metrics.registry).decode()
    assert _count(controller_metrics, 'clonebox_audit_append_seconds_count{store="sql"}') >= 2
    assert _count(agent_metrics, 'clonebox_audit_append_seconds_count{store="outbox"}') >= 1


def _count(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{series} not exported")


async def test_refused_and_invalid_mutations_are_recorded_with_their_reason(fleet: Fleet) -> None:
    await fleet.add_agent("h1", SMALL)
    await create(fleet, spec("web-1"))
    viewer = fleet.user_channel("viewer", "vic")
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await vm_service_pb2_grpc.VmServiceStub(viewer).DeleteVm(
                vm_service_pb2.DeleteVmRequest(name="web-1", request_id="del-by-viewer")
            )
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await viewer.close()
    with pytest.raises(grpc.aio.AioRpcError):
        await fleet.vms.CreateVm(vm_service_pb2.CreateVmRequest(spec=vm_pb2.VmSpec(name="Bad_Name"), request_id="bad"))

    denied = await records(fleet, action="vm.delete")
    assert len(denied) == 1
    ev = denied[0].event
    assert ev.actor == f"spiffe://{TRUST_DOMAIN}/user/viewer/vic"
    assert (ev.resource, ev.outcome, ev.reason, ev.request_id) == (
        "vms/web-1",
        audit_pb2.AUDIT_OUTCOME_REJECTED,
        "ROLE_NOT_ALLOWED",
        "del-by-viewer",
    )
    rejected = await records(fleet, outcome=audit_pb2.AUDIT_OUTCOME_REJECTED, action="vm.create")
    assert [(r.event.resource, r.event.actor, r.event.details["code"]) for r in rejected] == [
        ("vms/Bad_Name", ADMIN, "INVALID_ARGUMENT")
    ]
    # reads are not audited
    assert await records(fleet, action="vm.get") == []


async def test_filters_pages_and_watch(fleet: Fleet) -> None:
    await fleet.add_agent("h1", SMALL)
    for name in ("h-a", "h-b", "h-c"):
        await fleet.hosts.CordonHost(host_service_pb2.CordonHostRequest(name="h1"))
        await fleet.hosts.UncordonHost(host_service_pb2.UncordonHostRequest(name="h1"))
        del name
    first = await audit_stub(fleet).ListAuditEvents(
        audit_service_pb2.ListAuditEventsRequest(filter=audit_service_pb2.AuditFilter(resource="hosts/h1"), page_size=4)
    )
    assert len(first.records) == 4 and first.next_page_token
    second = await audit_stub(fleet).ListAuditEvents(
        audit_service_pb2.ListAuditEventsRequest(
            filter=audit_service_pb2.AuditFilter(resource="hosts/h1"), page_size=4, page_token=first.next_page_token
        )
    )
    seqs = [r.seq for r in [*first.records, *second.records]]
    assert len(seqs) == 6 and seqs == sorted(seqs, reverse=True)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await audit_stub(fleet).ListAuditEvents(audit_service_pb2.ListAuditEventsRequest(page_token="nope"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    watch = audit_stub(fleet).WatchAudit(
        audit_service_pb2.WatchAuditRequest(filter=audit_service_pb2.AuditFilter(action="host.cordon"))
    )
    got: asyncio.Future[audit_pb2.AuditRecord] = asyncio.get_running_loop().create_future()

    async def read() -> None:
        async for resp in watch:
            got.set_result(resp.record)
            return

    reader = asyncio.create_task(read())
    await asyncio.sleep(0.3)  # the watch starts at the current head: only new records arrive
    await fleet.hosts.UncordonHost(host_service_pb2.UncordonHostRequest(name="h1"))
    await fleet.hosts.CordonHost(host_service_pb2.CordonHostRequest(name="h1"))
    record = await asyncio.wait_for(got, 10)
    assert record.event.action == "host.cordon" and record.seq > max(seqs)
    watch.cancel()
    await asyncio.gather(reader, return_exceptions=True)


async def test_viewers_read_but_only_admins_archive(fleet: Fleet) -> None:
    viewer = fleet.user_channel("viewer", "vic")
    try:
        stub = audit_stub(fleet, viewer)
        assert (await stub.VerifyAudit(audit_service_pb2.VerifyAuditRequest())).ok
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ArchiveAudit(
                audit_service_pb2.ArchiveAuditRequest(through=audit_pb2.AuditHead(seq=1, mac="00" * 32))
            )
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await viewer.close()
    # the refused archive is itself on record
    assert [r.event.outcome for r in await records(fleet, action="audit.archive")] == [audit_pb2.AUDIT_OUTCOME_REJECTED]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_an_agent_restarted_while_the_controller_is_down_delivers_its_outbox_once(fleet: Fleet) -> None:
    # the controller must come back on the address the agent dials
    await fleet.controller.stop()
    port = _free_port()
    config = fleet.controller.config.model_copy(update={"listen": f"127.0.0.1:{port}"})
    controller = Controller(config)
    await controller.start()
    fleet.controller = controller
    await fleet.channel.close()
    from clonebox_core.rpc.server import aio_channel

    fleet.channel = aio_channel(
        controller.address, fleet.pki.transport("user", "admin", "admin"), f"controller.{TRUST_DOMAIN}"
    )
    agent = await fleet.add_agent("h1", SMALL)

    await controller.stop()  # the controller goes away...
    stub, ch = fleet.agent_stub("h1")
    try:
        # ...while the agent keeps doing what it is asked (here: directly, as a controller would)
        await stub.CreateVm(agent_pb2.CreateVmRequest(spec=spec("offline-1"), request_id="offline-req"))
        await stub.DeleteVm(agent_pb2.DeleteVmRequest(name="offline-1", request_id="offline-del"))
    finally:
        await ch.close()
    pending = [e.action for e in agent.journal.pending_events()]
    assert pending == ["vm.create", "vm.delete"]

    # the agent restarts (same journal) while the controller is still down
    cfg = agent.config
    await fleet.stop_agent("h1")
    restarted = Agent(cfg, hypervisor=fleet.fakes["h1"])
    await restarted.start()
    fleet.agents["h1"] = restarted
    assert [e.action for e in restarted.journal.pending_events()] == ["vm.create", "vm.delete"]

    back = Controller(config)  # same store, same port
    await back.start()
    fleet.controller = back

    async def delivered() -> bool:
        return not restarted.journal.pending_events()

    await eventually(delivered, timeout=20, what="the outbox to drain into the controller's chain")
    recs = await records(fleet, resource="hosts/h1/vms/offline-1")
    assert sorted((r.event.action, r.event.request_id) for r in recs) == [
        ("vm.create", "offline-req"),
        ("vm.delete", "offline-del"),
    ]
    # the agent now holds a witness of the head, and the whole chain verifies against it
    witness = restarted.journal.audit_witness()
    assert witness is not None and witness[0] >= max(r.seq for r in recs)
    verdict = await audit_stub(fleet).VerifyAudit(audit_service_pb2.VerifyAuditRequest())
    assert verdict.ok, verdict.problem


def test_forwarded_batches_are_checked_event_by_event() -> None:
    from clonebox.controller.v1 import host_service_pb2
    from google.protobuf import timestamp_pb2

    from clonebox_controller.grpc.servicers import MAX_AUDIT_BATCH, _agent_events

    now = timestamp_pb2.Timestamp()
    now.GetCurrentTime()
    good = audit_pb2.AuditEvent(
        id="e1", time=now, action="vm.delete", resource="hosts/h1/vms/a", outcome=audit_pb2.AUDIT_OUTCOME_SUCCEEDED
    )
    bad = audit_pb2.AuditEvent(id="e2", action="vm.delete", outcome=99)  # an outcome that does not exist
    long_id = audit_pb2.AuditEvent(id="x" * 65, action="vm.start", outcome=audit_pb2.AUDIT_OUTCOME_SUCCEEDED)
    events, acks = _agent_events("h1", host_service_pb2.AuditBatch(events=[good, bad, long_id]))
    assert acks == ["e1", "e2", "x" * 65]  # nothing comes back forever...
    assert events[0].id == "e1" and events[0].action == "vm.delete"
    # ...and nothing malformed is dropped silently: it is replaced by a record saying so
    assert [(e.action, e.reason, e.details["event_id"]) for e in events[1:]] == [
        ("audit.malformed_event", "INVALID_AUDIT_EVENT", "e2"),
        ("audit.malformed_event", "INVALID_AUDIT_EVENT", "x" * 64),
    ]
    many = host_service_pb2.AuditBatch(events=[good] * (MAX_AUDIT_BATCH + 5))
    assert len(_agent_events("h1", many)[1]) == MAX_AUDIT_BATCH
