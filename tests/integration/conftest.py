"""In-process fleet: a real controller and real agents (FakeHypervisor) on 127.0.0.1:0 over gRPC."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from clonebox.agent.v1 import agent_pb2_grpc
from clonebox.controller.v1 import (
    host_service_pb2,
    host_service_pb2_grpc,
    operation_service_pb2_grpc,
    vm_service_pb2_grpc,
)
from clonebox.type.v1 import host_pb2

from clonebox_agent.adapters.fake import FakeHypervisor
from clonebox_agent.config import AgentConfig
from clonebox_agent.main import Agent
from clonebox_controller.config import ControllerConfig
from clonebox_controller.main import Controller
from clonebox_core.model import Resources


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 15.0, what: str = "condition") -> None:
    """Poll ``check`` until it is true; fail with ``what`` after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@dataclass
class Fleet:
    """A controller, its agents, and client stubs."""

    tmp: Path
    controller: Controller
    channel: grpc.aio.Channel
    agents: dict[str, Agent] = field(default_factory=dict)
    fakes: dict[str, FakeHypervisor] = field(default_factory=dict)

    @property
    def hosts(self) -> host_service_pb2_grpc.HostServiceStub:
        return host_service_pb2_grpc.HostServiceStub(self.channel)

    @property
    def vms(self) -> vm_service_pb2_grpc.VmServiceStub:
        return vm_service_pb2_grpc.VmServiceStub(self.channel)

    @property
    def ops(self) -> operation_service_pb2_grpc.OperationServiceStub:
        return operation_service_pb2_grpc.OperationServiceStub(self.channel)

    def agent_stub(self, name: str) -> tuple[agent_pb2_grpc.AgentServiceStub, grpc.aio.Channel]:
        ch = grpc.aio.insecure_channel(self.agents[name].address)
        return agent_pb2_grpc.AgentServiceStub(ch), ch

    async def add_agent(self, name: str, capacity: Resources, fake: FakeHypervisor | None = None, **kw: Any) -> Agent:
        fake = fake or self.fakes.get(name) or FakeHypervisor(host_name=name, capacity=capacity)
        self.fakes[name] = fake
        cfg = AgentConfig(
            name=name,
            listen="127.0.0.1:0",
            controller=self.controller.address,
            hypervisor="fake",
            state_dir=str(self.tmp / f"agent-{name}"),
            storage_dir=str(self.tmp / f"agent-{name}" / "storage"),
            reserve={"vcpus": 0, "memory_mib": 0, "disk_mib": 0},
            heartbeat_interval_seconds=0.2,
            stop_timeout_seconds=kw.pop("stop_timeout_seconds", 5),
            **kw,
        )
        agent = Agent(cfg, hypervisor=fake)
        await agent.start()
        self.agents[name] = agent

        async def ready() -> bool:
            resp = await self.hosts.ListHosts(host_service_pb2.ListHostsRequest())
            return any(h.name == name and h.state == host_pb2.HOST_STATE_READY for h in resp.hosts)

        await eventually(ready, what=f"host {name} READY")
        return agent

    async def stop_agent(self, name: str) -> None:
        await self.agents.pop(name).stop()


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    cfg = ControllerConfig(
        listen="127.0.0.1:0",
        database_url=f"sqlite:///{tmp_path / 'fleet.db'}",
        heartbeat_timeout_seconds=1.0,
        heartbeat_interval_seconds=0.2,
        stop_timeout_seconds=5,
    )
    controller = Controller(cfg)
    await controller.start()
    channel = grpc.aio.insecure_channel(controller.address)
    f = Fleet(tmp_path, controller, channel)
    try:
        yield f
    finally:
        for name in list(f.agents):
            await f.stop_agent(name)
        await channel.close()
        await controller.stop()
