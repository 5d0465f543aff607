"""In-process fleet: a real controller and real agents (FakeHypervisor) on 127.0.0.1:0 over gRPC with mTLS.

Every process gets its own TLS folder from one throwaway CA, as on separate hosts.
"""

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
from clonebox_core.rpc.server import Transport, aio_channel
from clonebox_core.rpc.tls import TlsFiles
from clonebox_core.security.identity import make_identity
from clonebox_core.security.pki import CertificateAuthority, cert_pem, key_pem, write_private, write_public

TRUST_DOMAIN = "clonebox.test"


class FleetPki:
    """A throwaway CA and helpers to give each process its own TLS folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca = CertificateAuthority.init(root / "ca", TRUST_DOMAIN)

    def folder(self, kind: str, name: str, role: str | None = None, seconds: int = 3600, file_name: str = "") -> Path:
        """Issue a certificate into ``root/tls/<kind>-<name>[-role]`` and return the folder."""
        issued = self.ca.issue(make_identity(TRUST_DOMAIN, kind, name, role), seconds=seconds)
        assert issued.key is not None
        folder = self.root / "tls" / "-".join(filter(None, [kind, name, role]))
        stem = file_name or kind
        write_public(folder / "ca.crt", self.ca.cert_pem)
        write_public(folder / f"{stem}.crt", cert_pem(issued.cert))
        write_private(folder / f"{stem}.key", key_pem(issued.key))
        return folder

    def transport(self, kind: str, name: str, role: str | None = None, seconds: int = 3600) -> Transport:
        """A client transport for a fresh certificate of that identity."""
        return Transport(TlsFiles.in_folder(self.folder(kind, name, role, seconds), kind))


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
    """A controller, its agents, and client stubs (the stubs speak as an admin user)."""

    tmp: Path
    pki: FleetPki
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

    def user_channel(self, role: str, name: str = "tester") -> grpc.aio.Channel:
        """A channel to the controller as a user with ``role``."""
        return aio_channel(
            self.controller.address, self.pki.transport("user", name, role), f"controller.{TRUST_DOMAIN}"
        )

    def agent_stub(
        self, name: str, as_kind: str = "controller", as_name: str = "ctl", role: str | None = None
    ) -> tuple[agent_pb2_grpc.AgentServiceStub, grpc.aio.Channel]:
        """A stub calling agent ``name`` directly, by default with a controller certificate."""
        transport = self.pki.transport(as_kind, as_name, role)
        ch = aio_channel(self.agents[name].address, transport, f"{name}.agent.{TRUST_DOMAIN}")
        return agent_pb2_grpc.AgentServiceStub(ch), ch

    async def add_agent(self, name: str, capacity: Resources, fake: FakeHypervisor | None = None, **kw: Any) -> Agent:
        fake = fake or self.fakes.get(name) or FakeHypervisor(host_name=name, capacity=capacity)
        self.fakes[name] = fake
        seconds = kw.pop("cert_seconds", 3600)
        tls_dir = kw.pop("tls_dir", None) or self.pki.folder("agent", name, seconds=seconds)
        cfg = AgentConfig(
            name=name,
            listen="127.0.0.1:0",
            controller=self.controller.address,
            tls_dir=str(tls_dir),
            hypervisor="fake",
            state_dir=str(self.tmp / f"agent-{name}"),
            storage_dir=str(self.tmp / f"agent-{name}" / "storage"),
            reserve={"vcpus": 0, "memory_mib": 0, "disk_mib": 0},
            heartbeat_interval_seconds=0.2,
            metrics_listen=kw.pop("metrics_listen", "127.0.0.1:0"),  # never the default port: tests run in parallel
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
    pki = FleetPki(tmp_path / "pki")
    cfg = ControllerConfig(
        listen="127.0.0.1:0",
        tls_dir=str(pki.folder("controller", "ctl")),
        ca_dir=str(tmp_path / "pki" / "ca"),
        enroll_listen="127.0.0.1:0",
        metrics_listen="127.0.0.1:0",
        database_url=f"sqlite:///{tmp_path / 'fleet.db'}",
        heartbeat_timeout_seconds=1.0,
        heartbeat_interval_seconds=0.2,
        stop_timeout_seconds=5,
    )
    controller = Controller(cfg)
    await controller.start()
    admin = pki.transport("user", "admin", "admin")
    channel = aio_channel(controller.address, admin, f"controller.{TRUST_DOMAIN}")
    f = Fleet(tmp_path, pki, controller, channel)
    try:
        yield f
    finally:
        for name in list(f.agents):
            await f.stop_agent(name)
        await channel.close()
        await controller.stop()
