"""Recovery through the controller (in-process fleet, fake hypervisor with real files): list, show, run, sweep."""

from __future__ import annotations

import asyncio
import json

import grpc
import grpc.aio
import pytest
from clonebox.controller.v1 import audit_service_pb2, audit_service_pb2_grpc
from clonebox.controller.v1 import recovery_service_pb2 as rec_pb2
from clonebox.controller.v1 import recovery_service_pb2_grpc as rec_grpc
from clonebox.type.v1 import recovery_pb2
from typer.testing import CliRunner

from clonebox_cli.main import app
from clonebox_core.model import Resources
from tests.integration.conftest import Fleet
from tests.integration.test_fleet import create, spec

pytestmark = pytest.mark.integration

SMALL = Resources(vcpus=4, memory_mib=4096, disk_mib=100_000)


async def _interrupt_a_create(fleet: Fleet) -> str:
    """Leave what a crash in the middle of a create leaves: an open transaction and its artifacts."""
    await create(fleet, spec("web-1"), request_id="r-web")
    journal = fleet.agents["h1"].journal
    [txn] = [t for t in journal.txns() if t.target == "web-1"]
    with journal._lock:
        journal._db.execute("UPDATE txns SET state='open' WHERE id=?", (txn.id,))
    return txn.id


async def test_run_rolls_back_an_interrupted_create_and_sweeps_orphans(fleet: Fleet) -> None:
    await fleet.add_agent("h1", SMALL)
    txn_id = await _interrupt_a_create(fleet)
    fake = fleet.fakes["h1"]
    fake._make_volume("cb-ghost.root.qcow2", "ghost", b"left by a crash before its step was recorded")
    stub = rec_grpc.RecoveryServiceStub(fleet.channel)

    listed = await stub.ListRecoveries(rec_pb2.ListRecoveriesRequest(host="h1"))
    assert [(t.id, t.state) for t in listed.transactions] == [(txn_id, recovery_pb2.TRANSACTION_STATE_OPEN)]
    shown = (await stub.GetRecovery(rec_pb2.GetRecoveryRequest(host="h1", id=txn_id))).transaction
    assert [s.name for s in shown.steps] == ["folder", "disk:root", "define", "start"]
    assert all(s.identity for s in shown.steps)

    report = await stub.RunRecovery(rec_pb2.RunRecoveryRequest(host="h1", request_id="rec-1"))
    assert [t.id for t in report.rolled_back] == [txn_id]
    assert report.rolled_back[0].state == recovery_pb2.TRANSACTION_STATE_ROLLED_BACK
    assert [(o.vm, o.removed) for o in report.orphans] == [("ghost", False)]
    assert "web-1" not in [d.name for d in await fake.list()]

    swept = await stub.RunRecovery(rec_pb2.RunRecoveryRequest(host="h1", sweep=True, request_id="rec-2"))
    assert [(o.vm, o.removed) for o in swept.orphans] == [("ghost", True)] and not swept.rolled_back
    assert (await fake.inventory()).is_empty()
    again = await stub.RunRecovery(rec_pb2.RunRecoveryRequest(host="h1", sweep=True, request_id="rec-3"))
    assert not again.rolled_back and not again.orphans

    # every clean-up is on record: the agent's own events (forwarded) and the controller's runs
    audit = audit_service_pb2_grpc.AuditServiceStub(fleet.channel)

    async def actions() -> set[str]:
        resp = await audit.ListAuditEvents(audit_service_pb2.ListAuditEventsRequest(page_size=1000))
        return {r.event.action for r in resp.records}

    for _ in range(100):
        if {"recovery.rollback", "recovery.sweep", "recovery.run"} <= await actions():
            break
        await asyncio.sleep(0.1)
    assert {"recovery.rollback", "recovery.sweep", "recovery.run"} <= await actions()


async def test_errors_and_permissions(fleet: Fleet) -> None:
    await fleet.add_agent("h1", SMALL)
    stub = rec_grpc.RecoveryServiceStub(fleet.channel)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetRecovery(rec_pb2.GetRecoveryRequest(host="h1", id="nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ListRecoveries(rec_pb2.ListRecoveriesRequest(host="Bad_Host"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    viewer = fleet.user_channel("viewer", "vic")
    try:
        vstub = rec_grpc.RecoveryServiceStub(viewer)
        await vstub.ListRecoveries(rec_pb2.ListRecoveriesRequest())  # viewers may look
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await vstub.RunRecovery(rec_pb2.RunRecoveryRequest(sweep=True))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await viewer.close()


async def test_cli_list_show_run(fleet: Fleet) -> None:
    await fleet.add_agent("h1", SMALL)
    txn_id = await _interrupt_a_create(fleet)
    tls = fleet.pki.folder("user", "rec-admin", "admin", file_name="user")
    runner = CliRunner()

    async def cli(*args: str) -> tuple[int, str, str]:
        argv = ["--controller", fleet.controller.address, "--tls-dir", str(tls), *args]
        result = await asyncio.to_thread(runner.invoke, app, argv)
        return result.exit_code, result.stdout, result.stderr

    code, out, err = await cli("-o", "json", "recover", "list")
    assert code == 0, err
    assert [(t["id"], t["state"]) for t in json.loads(out)["transactions"]] == [(txn_id, "open")]
    code, out, _ = await cli("recover", "show", txn_id, "--host", "h1")
    assert code == 0 and "vm.create of web-1 on h1: open" in out and "define" in out
    code, out, _ = await cli("recover", "run")
    assert code == 0 and f"rolled back vm.create of web-1 on h1 ({txn_id})" in out
    code, out, _ = await cli("recover", "run", "--sweep")
    assert code == 0 and "nothing to recover" in out
    code, out, _ = await cli("-o", "json", "recover", "list", "--all")
    states = {t["id"]: t["state"] for t in json.loads(out)["transactions"]}
    assert states[txn_id] == "rolled_back"

    spec_file = fleet.tmp / "dry.yaml"
    spec_file.write_text("version: 1\nname: dry-1\nmemory: 64MiB\ndisks:\n  - name: root\n    size: 16MiB\n")
    code, out, err = await cli("vm", "create", "-f", str(spec_file), "--dry-run")
    assert code == 0, err
    assert "dry run: nothing was reserved or made. On host h1" in out and "disk:root" in out
    code, out, _ = await cli("-o", "json", "vm", "list")
    assert "dry-1" not in [v["name"] for v in json.loads(out)["vms"]]


async def test_dry_run_places_and_plans_but_reserves_and_makes_nothing(fleet: Fleet) -> None:
    from clonebox.controller.v1 import host_service_pb2, vm_service_pb2

    await fleet.add_agent("h1", SMALL)
    resp = await fleet.vms.CreateVm(vm_service_pb2.CreateVmRequest(spec=spec("dry-1"), dry_run=True))
    assert not resp.HasField("operation") and resp.plan.host == "h1"
    assert [s.split(":", 1)[0] for s in resp.plan.steps] == ["folder", "disk", "define", "start", "commit"]
    listed = await fleet.vms.ListVms(vm_service_pb2.ListVmsRequest())
    assert list(listed.vms) == []
    host = (await fleet.hosts.GetHost(host_service_pb2.GetHostRequest(name="h1"))).host
    assert host.allocated.memory_mib == 0 and (await fleet.fakes["h1"].inventory()).is_empty()
    # the same checks as a real create: too big for any host is refused before anything
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await fleet.vms.CreateVm(vm_service_pb2.CreateVmRequest(spec=spec("dry-2", memory=1 << 20), dry_run=True))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
