"""Exact reproductions of the open bugs the fuzzer found (see known_bugs.py).

Each test asserts the correct behaviour and is a strict xfail while the bug is open: a fix makes it
pass unexpectedly, which fails the run until the entry and its xfail are removed.
"""

from __future__ import annotations

from pathlib import Path

import grpc.aio
import pytest
from clonebox.agent.v1 import agent_pb2
from clonebox.controller.v1 import host_service_pb2, host_service_pb2_grpc, vm_service_pb2
from clonebox.type.v1 import vm_pb2

from clonebox_core.model import Resources
from tests.fuzz.harness import Finding, FuzzHarness
from tests.fuzz.known_bugs import KNOWN_BUGS, KnownBug
from tests.fuzz.strategies import RPCS
from tests.integration import conftest as fleet_conftest
from tests.integration.conftest import Fleet, eventually

pytestmark = pytest.mark.fuzz

RPC_BY_NAME = {r.name: r for r in RPCS}


_REPLAYS = [b for b in KNOWN_BUGS if b.repro is not None]

# only defined while bugs are open: an empty parameter set would be a skipped test
if _REPLAYS:

    @pytest.mark.parametrize(
        "bug",
        [
            pytest.param(b, id=b.key, marks=pytest.mark.xfail(strict=True, raises=Finding, reason=b.reason))
            for b in _REPLAYS
        ],
    )
    async def test_known_bug_repro(fleet: Fleet, tmp_path: Path, bug: KnownBug) -> None:
        harness = FuzzHarness(fleet, tmp_path)
        await harness.start()
        try:
            rpc = RPC_BY_NAME[bug.rpc]
            assert await harness.endpoints.locate(rpc)
            repro = bug.repro(harness.pools) if callable(bug.repro) else bug.repro
            await harness.exercise(rpc, [repro], harness.endpoints.principals(rpc)[0], tolerate_known=False)
        finally:
            await harness.close()


# regression: a second Connect session of the same agent that ends used to stop the live session's sync
async def test_an_ended_duplicate_session_does_not_stop_the_fleet_view(fleet: Fleet) -> None:
    await fleet.add_agent("h1", Resources(vcpus=8, memory_mib=8192, disk_mib=100_000))
    pki = getattr(fleet, "pki", None)
    if pki is not None:
        from clonebox_core.rpc.server import aio_channel

        trust_domain = fleet_conftest.TRUST_DOMAIN
        channel = aio_channel(fleet.controller.address, pki.transport("agent", "h1"), f"controller.{trust_domain}")
    else:
        channel = grpc.aio.insecure_channel(fleet.controller.address)
    try:
        registration = host_service_pb2.Registration(name="h1", address=fleet.agents["h1"].address)
        call = host_service_pb2_grpc.HostServiceStub(channel).Connect(
            iter([host_service_pb2.ConnectRequest(registration=registration)]), timeout=10
        )
        async for _ in call:
            pass
    finally:
        await channel.close()
    # the agent's own session is still open; a VM made on the host must reach the fleet view
    stub, agent_channel = fleet.agent_stub("h1")
    try:
        spec = vm_pb2.VmSpec(name="direct-1", vcpus=1, memory_mib=64, disks=[vm_pb2.DiskSpec(name="root", size_mib=8)])
        await stub.CreateVm(agent_pb2.CreateVmRequest(spec=spec, start=True))
    finally:
        await agent_channel.close()

    async def adopted() -> bool:
        try:
            await fleet.vms.GetVm(vm_service_pb2.GetVmRequest(name="direct-1"))
        except grpc.aio.AioRpcError:
            return False
        return True

    await eventually(adopted, timeout=5, what="the controller to see direct-1")
