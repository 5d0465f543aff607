"""WatchHealth and CheckHealth through the agent's real gRPC server (plaintext loopback, fake hypervisor),
and the agent's own grpc.health.v1 status following the hypervisor."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
from clonebox.agent.v1 import agent_pb2, agent_pb2_grpc
from clonebox.type.v1 import health_pb2 as type_health_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from clonebox_agent.adapters.fake import FakeHypervisor
from clonebox_agent.config import AgentConfig
from clonebox_agent.main import Agent
from clonebox_core.health import FileProbe, Probe, ProbeType
from clonebox_core.model import DiskSpec, VmSpec
from clonebox_core.rpc.server import Transport, aio_channel


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[tuple[Agent, FakeHypervisor]]:
    fake = FakeHypervisor(host_name="h")
    cfg = AgentConfig(
        name="h",
        listen="127.0.0.1:0",
        controller="",
        insecure=True,
        hypervisor="fake",
        state_dir=str(tmp_path / "state"),
        storage_dir=str(tmp_path / "storage"),
        metrics_listen="",
        heartbeat_interval_seconds=0.05,
        reserve={"vcpus": 0, "memory_mib": 0, "disk_mib": 0},
    )
    a = Agent(cfg, hypervisor=fake)
    await a.start()
    yield a, fake
    await a.stop()


def _error_info(exc: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(exc)
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    raise AssertionError("no ErrorInfo")


async def test_watch_and_check_health_over_grpc(agent: tuple[Agent, FakeHypervisor]) -> None:
    a, _ = agent
    checks = (
        Probe("ga", ProbeType.GUEST_AGENT, interval_ms=500, timeout_ms=400),
        Probe("ready", ProbeType.FILE, interval_ms=500, timeout_ms=400, critical=False, file=FileProbe("/run/ready")),
    )
    spec = VmSpec(name="web", memory_mib=128, disks=(DiskSpec("root", size_mib=16),), health_checks=checks)
    await a.service.create(spec, request_id="")
    await a.health.refresh()
    async with aio_channel(a.address, Transport(insecure=True)) as ch:
        stub = agent_pb2_grpc.AgentServiceStub(ch)
        stream = stub.WatchHealth(agent_pb2.WatchHealthRequest())
        first = await stream.read()
        assert first.health.vm == "web" and first.health.host == "h"
        assert [c.name for c in first.health.checks] == ["ga", "ready"]
        assert (await stream.read()).synced

        async def until_healthy_ga() -> agent_pb2.WatchHealthResponse:
            while True:
                msg: agent_pb2.WatchHealthResponse = await stream.read()
                if any(t.check == "ga" and t.to_state == type_health_pb2.HEALTH_STATE_HEALTHY for t in msg.transitions):
                    return msg

        live = await asyncio.wait_for(until_healthy_ga(), 30)
        assert live.health.vm == "web"
        stream.cancel()

        resp = await stub.CheckHealth(agent_pb2.CheckHealthRequest(name="web", check="ready"))
        assert [(r.check, r.sample, r.detail) for r in resp.results] == [
            ("ready", type_health_pb2.PROBE_SAMPLE_FAIL, "no such file: /run/ready")
        ]
        assert resp.health.vm == "web"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.CheckHealth(agent_pb2.CheckHealthRequest(name="web", check="nope"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert _error_info(err.value).reason == "CHECK_NOT_FOUND"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.CheckHealth(agent_pb2.CheckHealthRequest(name="ghost"))
        assert _error_info(err.value).reason == "VM_NOT_FOUND"


async def test_grpc_health_status_follows_the_hypervisor(agent: tuple[Agent, FakeHypervisor]) -> None:
    a, fake = agent
    async with aio_channel(a.address, Transport(insecure=True)) as ch:
        health = health_pb2_grpc.HealthStub(ch)

        async def status_becomes(want: int) -> None:
            for _ in range(600):
                if (await health.Check(health_pb2.HealthCheckRequest())).status == want:
                    return
                await asyncio.sleep(0.05)
            raise AssertionError(f"grpc.health never became {want}")

        await status_becomes(health_pb2.HealthCheckResponse.SERVING)
        fake.set_serving(False, "libvirtd is not running")
        await status_becomes(health_pb2.HealthCheckResponse.NOT_SERVING)
        fake.set_serving(True)
        await status_becomes(health_pb2.HealthCheckResponse.SERVING)
