"""``VmService.ReadVmConsole`` through the real controller and agent over mTLS, on the fake's real log files."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import grpc.aio
import pytest
from clonebox.agent.v1 import agent_pb2
from clonebox.controller.v1 import host_service_pb2, operation_service_pb2, vm_service_pb2, vm_service_pb2_grpc
from clonebox.type.v1 import audit_pb2, host_pb2

from clonebox_core.model import Resources
from tests.integration.conftest import TRUST_DOMAIN, Fleet, eventually
from tests.integration.test_audit import records
from tests.integration.test_fleet import create, error_info, spec
from tests.unit.agent.test_console import append, open_fds_on

pytestmark = pytest.mark.integration

SMALL = Resources(vcpus=4, memory_mib=4096, disk_mib=100_000)
BOOTED = b"fake console: booted\n"  # what the fake hypervisor writes when it starts a VM
ADMIN = f"spiffe://{TRUST_DOMAIN}/user/admin/admin"
BOUND = 15.0  # seconds any single wait may take


def log_file(fleet: Fleet, host: str, vm: str) -> Path:
    path = fleet.fakes[host].console_log_path(vm)
    assert path is not None
    return Path(path)


def request(name: str, tail_bytes: int = 0, follow: bool = False) -> vm_service_pb2.ReadVmConsoleRequest:
    return vm_service_pb2.ReadVmConsoleRequest(name=name, tail_bytes=tail_bytes, follow=follow)


async def read_all(stub: vm_service_pb2_grpc.VmServiceStub, name: str, **kw: object) -> list[tuple[int, bytes]]:
    call = stub.ReadVmConsole(request(name, **kw), timeout=BOUND)  # type: ignore[arg-type]
    return [(m.offset, m.data) async for m in call]


async def console_reads(fleet: Fleet, vm: str) -> list[audit_pb2.AuditEvent]:
    return [r.event for r in await records(fleet, action="vm.console_read") if r.event.resource == f"vms/{vm}"]


async def test_reading_a_vms_log_returns_what_its_guest_wrote_and_is_audited_once(fleet: Fleet) -> None:
    await fleet.add_agent("h1", SMALL)
    await create(fleet, spec("web-1"))
    assert await read_all(fleet.vms, "web-1") == [(0, BOOTED)]

    # a log of several messages (64 KiB each) is still one read, one record
    noise = bytes(range(256)) * 800
    append(log_file(fleet, "h1", "web-1"), noise)()
    got = await read_all(fleet.vms, "web-1", tail_bytes=1024 * 1024)
    assert len(got) >= 3 and got[0][0] == 0
    assert b"".join(d for _o, d in got) == BOOTED + noise
    assert [o for o, _d in got] == [sum(len(d) for _o, d in got[:i]) for i in range(len(got))]

    events = await console_reads(fleet, "web-1")
    assert len(events) == 2, events
    second, first = events  # newest first
    assert (first.actor, first.origin, first.outcome) == (ADMIN, "controller", audit_pb2.AUDIT_OUTCOME_SUCCEEDED)
    assert dict(first.details) == {"host": "h1", "tail_bytes": "0", "follow": "False"}
    assert dict(second.details)["tail_bytes"] == str(1024 * 1024)


async def test_follow_receives_what_is_appended_and_ends_when_the_vm_is_deleted(fleet: Fleet) -> None:
    await fleet.add_agent("h1", SMALL)
    await create(fleet, spec("web-1"))
    log = log_file(fleet, "h1", "web-1")
    call = fleet.vms.ReadVmConsole(request("web-1", follow=True), timeout=60)
    messages = aiter(call)
    first = await asyncio.wait_for(anext(messages), BOUND)
    assert (first.offset, first.data) == (0, BOOTED)

    append(log, b"login: \x1b[31mroot\n")()
    later = await asyncio.wait_for(anext(messages), BOUND)
    assert (later.offset, later.data) == (len(BOOTED), b"login: \x1b[31mroot\n")  # bytes as they are

    op = (await fleet.vms.DeleteVm(vm_service_pb2.DeleteVmRequest(name="web-1", request_id="d1"))).operation
    await fleet.ops.WaitOperation(operation_service_pb2.WaitOperationRequest(id=op.id))
    rest = await asyncio.wait_for(_drain(messages), BOUND)  # the stream ends by itself, without an error
    assert rest == []
    assert await call.code() == grpc.StatusCode.OK

    (event,) = await console_reads(fleet, "web-1")
    assert dict(event.details)["follow"] == "True"


async def _drain(messages: object) -> list[object]:
    return [m async for m in messages]  # type: ignore[attr-defined]


async def test_a_client_that_stops_following_closes_the_agents_log_file(fleet: Fleet) -> None:
    await fleet.add_agent("h1", SMALL)
    await create(fleet, spec("web-1"))
    log = log_file(fleet, "h1", "web-1")
    call = fleet.vms.ReadVmConsole(request("web-1", follow=True), timeout=60)
    await asyncio.wait_for(anext(aiter(call)), BOUND)
    assert open_fds_on(log) == 1  # the agent holds it open while it follows
    call.cancel()

    async def closed() -> bool:
        return open_fds_on(log) == 0

    await eventually(closed, BOUND, "the agent closing the log after the client went away")


async def test_unknown_vm_is_not_found_and_not_audited(fleet: Fleet) -> None:
    await fleet.add_agent("h1", SMALL)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await read_all(fleet.vms, "ghost")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(err.value).reason == "VM_NOT_FOUND"
    assert await console_reads(fleet, "ghost") == []


async def test_a_negative_tail_is_refused_by_the_agent_and_not_audited(fleet: Fleet) -> None:
    await fleet.add_agent("h1", SMALL)
    await create(fleet, spec("web-1"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await read_all(fleet.vms, "web-1", tail_bytes=-1)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tail_bytes" in (err.value.details() or "")
    assert await console_reads(fleet, "web-1") == []


async def test_viewers_are_denied_operators_may_read(fleet: Fleet) -> None:
    await fleet.add_agent("h1", SMALL)
    await create(fleet, spec("web-1"))
    viewer = vm_service_pb2_grpc.VmServiceStub(fleet.user_channel("viewer", "vic"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await read_all(viewer, "web-1")
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert await console_reads(fleet, "web-1") == []

    operator = vm_service_pb2_grpc.VmServiceStub(fleet.user_channel("operator", "olga"))
    assert await read_all(operator, "web-1") == [(0, BOOTED)]
    (event,) = await console_reads(fleet, "web-1")
    assert event.actor == f"spiffe://{TRUST_DOMAIN}/user/operator/olga"


async def test_the_agent_serves_the_console_to_the_controller_only(fleet: Fleet) -> None:
    await fleet.add_agent("h1", SMALL)
    await create(fleet, spec("web-1"))
    req = agent_pb2.ReadConsoleRequest(name="web-1")
    as_admin, ch = fleet.agent_stub("h1", as_kind="user", as_name="admin", role="admin")
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            _ = [m async for m in as_admin.ReadConsole(req, timeout=BOUND)]
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await ch.close()
    as_controller, ch = fleet.agent_stub("h1")
    try:
        assert [(m.offset, m.data) async for m in as_controller.ReadConsole(req, timeout=BOUND)] == [(0, BOOTED)]
    finally:
        await ch.close()


async def test_a_vm_on_an_unreachable_host_says_so(fleet: Fleet) -> None:
    await fleet.add_agent("h1", SMALL)
    await create(fleet, spec("web-1"))
    await fleet.stop_agent("h1")

    async def unreachable() -> bool:
        host = (await fleet.hosts.GetHost(host_service_pb2.GetHostRequest(name="h1"))).host
        return host.state == host_pb2.HOST_STATE_UNREACHABLE

    await eventually(unreachable, BOUND, "host h1 unreachable")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await read_all(fleet.vms, "web-1")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(err.value).reason == "HOST_UNREACHABLE"
    assert await console_reads(fleet, "web-1") == []
