"""``VmService.ReadVmConsole`` through the real controller and agent over mTLS, on the fake's real log files.

The resume tests restart the VM's agent on the same fake hypervisor (its VMs and log files stay), as an
agent restart on a real host keeps its domains and virtlogd's files.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import grpc
import grpc.aio
import pytest
from clonebox.agent.v1 import agent_pb2
from clonebox.controller.v1 import host_service_pb2, operation_service_pb2, vm_service_pb2, vm_service_pb2_grpc
from clonebox.type.v1 import audit_pb2, host_pb2
from typer.testing import CliRunner

from clonebox_agent.adapters.fake import FakeHypervisor
from clonebox_cli import logs as logs_module
from clonebox_cli.main import app
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


def request(
    name: str, tail_bytes: int = 0, follow: bool = False, from_offset: int | None = None
) -> vm_service_pb2.ReadVmConsoleRequest:
    return vm_service_pb2.ReadVmConsoleRequest(name=name, tail_bytes=tail_bytes, follow=follow, from_offset=from_offset)


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


# ---- resuming at an offset --------------------------------------------------------------------------


async def test_from_offset_is_passed_on_to_the_agent_and_recorded_in_the_audit_event(fleet: Fleet) -> None:
    await fleet.add_agent("h1", SMALL)
    await create(fleet, spec("web-1"))
    append(log_file(fleet, "h1", "web-1"), b"second line\n")()
    assert await read_all(fleet.vms, "web-1", from_offset=8) == [(8, BOOTED[8:] + b"second line\n")]
    assert await read_all(fleet.vms, "web-1", from_offset=len(BOOTED)) == [(len(BOOTED), b"second line\n")]
    # beyond the end: not the log the client was reading, so all of this one
    assert await read_all(fleet.vms, "web-1", from_offset=10_000) == [(0, BOOTED + b"second line\n")]
    # at the very end: an empty read, audited all the same (the agent accepted it)
    assert await read_all(fleet.vms, "web-1", from_offset=len(BOOTED) + 12) == []

    events = await console_reads(fleet, "web-1")
    assert [dict(e.details).get("from_offset") for e in reversed(events)] == ["8", "21", "10000", "33"]
    assert dict(events[0].details) == {"host": "h1", "tail_bytes": "0", "follow": "False", "from_offset": "33"}


async def test_a_negative_from_offset_is_refused_by_the_agent_and_not_audited(fleet: Fleet) -> None:
    await fleet.add_agent("h1", SMALL)
    await create(fleet, spec("web-1"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await read_all(fleet.vms, "web-1", from_offset=-1, follow=True)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "from_offset" in (err.value.details() or "")
    assert await console_reads(fleet, "web-1") == []


async def _add_host_whose_files_outlive_its_agent(fleet: Fleet, host: str) -> None:
    """An agent on a fake with its own storage folder (a fake that made its own removes it when the agent stops)."""
    fake = FakeHypervisor(host_name=host, capacity=SMALL, storage_dir=fleet.tmp / f"{host}-storage")
    await fleet.add_agent(host, SMALL, fake=fake)


async def _restart_agent(fleet: Fleet, host: str, while_away: Callable[[], None]) -> None:
    """Stop the agent, wait until the controller calls its host unreachable, start it again on the same fake."""
    fake = fleet.fakes[host]
    await fleet.stop_agent(host)
    while_away()

    async def unreachable() -> bool:
        got = (await fleet.hosts.GetHost(host_service_pb2.GetHostRequest(name=host))).host
        return got.state == host_pb2.HOST_STATE_UNREACHABLE

    await eventually(unreachable, BOUND, f"host {host} unreachable")
    # a resume while the agent is away is refused the way the CLI rides out
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await read_all(fleet.vms, "web-1", follow=True, from_offset=0)
    assert (err.value.code(), error_info(err.value).reason) == (grpc.StatusCode.FAILED_PRECONDITION, "HOST_UNREACHABLE")
    await fleet.add_agent(host, SMALL, fake=fake)


async def test_a_follow_broken_by_an_agent_restart_resumes_at_its_offset_without_loss_or_repeat(
    fleet: Fleet,
) -> None:
    await _add_host_whose_files_outlive_its_agent(fleet, "h1")
    await create(fleet, spec("web-1"))
    log = log_file(fleet, "h1", "web-1")
    call = fleet.vms.ReadVmConsole(request("web-1", follow=True), timeout=60)
    messages = aiter(call)
    got = [await asyncio.wait_for(anext(messages), BOUND)]
    append(log, b"before the restart\n")()
    got.append(await asyncio.wait_for(anext(messages), BOUND))

    # the guest goes on writing while the agent is away (virtlogd keeps the file)
    restart = asyncio.create_task(_restart_agent(fleet, "h1", append(log, b"while the agent was away\n")))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await asyncio.wait_for(_drain(messages), BOUND)
    assert (err.value.code(), error_info(err.value).reason) == (grpc.StatusCode.UNAVAILABLE, "AGENT_UNREACHABLE")
    await asyncio.wait_for(restart, 4 * BOUND)

    resume_at = got[-1].offset + len(got[-1].data)
    call = fleet.vms.ReadVmConsole(request("web-1", follow=True, from_offset=resume_at), timeout=60)
    messages = aiter(call)
    got.append(await asyncio.wait_for(anext(messages), BOUND))
    append(log, b"after\n")()
    got.append(await asyncio.wait_for(anext(messages), BOUND))
    call.cancel()

    data = b"".join(m.data for m in got)
    assert data == BOOTED + b"before the restart\n" + b"while the agent was away\n" + b"after\n"
    assert data == log.read_bytes()  # every byte exactly once
    assert [m.offset for m in got] == [sum(len(m.data) for m in got[:i]) for i in range(len(got))]

    resumed, first = await console_reads(fleet, "web-1")  # newest first; the refused attempt is not a read
    assert "from_offset" not in dict(first.details)
    assert dict(resumed.details) == {"host": "h1", "tail_bytes": "0", "follow": "True", "from_offset": str(resume_at)}


async def test_the_cli_follow_rides_out_an_agent_restart_and_prints_every_byte_once(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a CLI thread left behind by a failing test gives up soon instead of outliving it by 5 minutes
    monkeypatch.setattr(logs_module, "RECONNECT_FOR", 4 * BOUND)
    await _add_host_whose_files_outlive_its_agent(fleet, "h1")
    await create(fleet, spec("web-1"))
    log = log_file(fleet, "h1", "web-1")
    tls = fleet.pki.folder("user", "console-admin", "admin", file_name="user")
    argv = ["--controller", fleet.controller.address, "--tls-dir", str(tls), "logs", "web-1", "-f"]
    cli = asyncio.create_task(asyncio.to_thread(CliRunner().invoke, app, argv))

    async def reads(n: int) -> bool:
        return len(await console_reads(fleet, "web-1")) >= n

    await eventually(lambda: reads(1), BOUND, "the CLI reading the console")  # audited before bytes pass
    await _restart_agent(fleet, "h1", append(log, b"while the agent was away\n"))
    await eventually(lambda: reads(2), 4 * BOUND, "the CLI resuming the read")
    append(log, b"after the restart\n")()
    # deleting the VM ends the follow; what was written before is still sent
    op = (await fleet.vms.DeleteVm(vm_service_pb2.DeleteVmRequest(name="web-1", request_id="d1"))).operation
    await fleet.ops.WaitOperation(operation_service_pb2.WaitOperationRequest(id=op.id))
    result = await asyncio.wait_for(cli, 4 * BOUND)

    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert result.stdout_bytes == BOOTED + b"while the agent was away\n" + b"after the restart\n"
    assert result.stderr.splitlines() == ["logs: connection lost (AGENT_UNREACHABLE); reconnecting"]
    resumed, _first = await console_reads(fleet, "web-1")
    assert dict(resumed.details)["from_offset"] == str(len(BOOTED))
