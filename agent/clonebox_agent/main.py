"""Composition root of the agent: ``build_agent(config)`` wires adapters, journal, use cases and gRPC.

``clonebox-agent --config FILE`` runs it until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
from clonebox.agent.v1 import agent_pb2, agent_pb2_grpc
from clonebox.controller.v1 import host_service_pb2, host_service_pb2_grpc

from clonebox_agent.app.service import AgentService
from clonebox_agent.config import AgentConfig
from clonebox_agent.credentials import enroll, renew_forever
from clonebox_agent.grpc.servicer import AgentServicer
from clonebox_agent.journal.store import Journal
from clonebox_agent.ports import Hypervisor
from clonebox_core.config import load_config
from clonebox_core.errors import CloneboxError, InvalidArgument
from clonebox_core.logs import setup_logging
from clonebox_core.model import Resources
from clonebox_core.names import check_dns_label
from clonebox_core.rpc import convert
from clonebox_core.rpc.auth import Authorizer
from clonebox_core.rpc.server import (
    ServerHandle,
    Transport,
    aio_channel,
    make_transport,
    split_host_port,
    start_server,
    trust_domain_of,
)
from clonebox_core.rpc.tls import TlsFiles
from clonebox_core.security.identity import Identity, Kind

log = logging.getLogger("clonebox_agent")

SERVICE_NAME = agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name


def build_hypervisor(config: AgentConfig) -> Hypervisor:
    """The adapter the config asks for."""
    if config.hypervisor == "fake":
        from clonebox_agent.adapters.fake import FakeHypervisor

        return FakeHypervisor(host_name=config.name, storage_dir=config.storage_dir, image_dirs=config.image_dirs)
    from clonebox_agent.adapters.libvirt import LibvirtHypervisor

    return LibvirtHypervisor(
        uri=config.libvirt_uri,
        storage_dir=Path(config.storage_dir),
        image_dirs=[Path(p) for p in config.image_dirs],
        domain_type=config.domain_type,
        # several agents may share one libvirtd (tests, benchmarks, dev): each lists only its own domains
        owner=config.name,
    )


class Agent:
    """A running agent: gRPC server, use cases, and the session with the controller."""

    def __init__(self, config: AgentConfig, hypervisor: Hypervisor | None = None) -> None:
        check_dns_label("name", config.name)
        self.config = config
        self._needs_enrolment = bool(
            config.join_token and config.tls_dir and not TlsFiles.in_folder(Path(config.tls_dir), "agent").exists()
        )
        # until enrolment has produced the files, the transport is built in start()
        self.transport = Transport(None, insecure=True) if self._needs_enrolment else self._load_transport()
        self.trust_domain = trust_domain_of(self.transport)
        self.journal = Journal(Path(config.state_dir) / "journal.db")
        self._revoked = self.journal.revoked()
        self.service = AgentService(
            config.name,
            hypervisor if hypervisor is not None else build_hypervisor(config),
            self.journal,
            reserve=Resources(config.reserve.vcpus, config.reserve.memory_mib, config.reserve.disk_mib),
            stop_timeout_seconds=config.stop_timeout_seconds,
            event_history=config.event_history,
            cpu_allocation_ratio=config.cpu_allocation_ratio,
        )
        self.server: ServerHandle | None = None
        self._session: asyncio.Task[None] | None = None
        self._renewal: asyncio.Task[None] | None = None
        self._serving = True

    @property
    def address(self) -> str:
        """Address the agent is reachable at (listen host with the bound port)."""
        assert self.server is not None
        host, _ = split_host_port(self.config.listen)
        return self.config.advertise or f"{host}:{self.server.port}"

    def _load_transport(self) -> Transport:
        config = self.config
        transport = make_transport(config.tls_dir, "agent", config.insecure)
        if transport.tls is not None:
            me = transport.tls.identity()
            if me.kind != Kind.AGENT or me.name != config.name:
                raise InvalidArgument(
                    f"name: the certificate in {config.tls_dir} is for {me}, not agent {config.name}",
                    reason="AGENT_NAME_MISMATCH",
                    metadata={"field": "name"},
                )
        return transport

    async def start(self) -> None:
        """Enrol if needed, then start the use cases, the gRPC server and the controller session."""
        if self._needs_enrolment:
            await enroll(Path(self.config.tls_dir), self.config.name, self.config.join_token)
            self.transport = self._load_transport()
            self.trust_domain = trust_domain_of(self.transport)
            self._needs_enrolment = False
        await self.service.start()
        authorizer = Authorizer(self.trust_domain, self._is_revoked) if self.trust_domain else None
        self.server = await start_server(
            self.config.listen,
            [(agent_pb2_grpc.add_AgentServiceServicer_to_server, AgentServicer(self.service), SERVICE_NAME)],
            self.transport,
            authorizer,
        )
        await self._refresh_serving()
        if self.config.controller:
            self._session = asyncio.create_task(self._controller_session(), name="controller-session")
            if self.transport.tls is not None:
                self._renewal = asyncio.create_task(
                    renew_forever(self.transport, self.config.controller), name="renewal"
                )
        log.info("agent %s listening on %s", self.config.name, self.address)

    async def stop(self) -> None:
        """Stop everything, in reverse order."""
        if self._renewal is not None:
            self._renewal.cancel()
            await asyncio.gather(self._renewal, return_exceptions=True)
        if self._session is not None:
            self._session.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._session
        if self.server is not None:
            await self.server.stop()
        await self.service.close()
        self.journal.close()

    def _is_revoked(self, identity: Identity) -> bool:
        return f"{identity.serial:x}" in self._revoked

    def _apply_revocations(self, serials: set[str]) -> None:
        if serials != self._revoked:
            self.journal.set_revoked(serials)
            self._revoked = serials
            log.info("deny list updated: %d revoked certificates", len(serials))

    async def _refresh_serving(self) -> tuple[bool, str]:
        info = await self.service.host_info()
        if info.serving != self._serving and self.server is not None:
            log.warning("hypervisor serving=%s %s", info.serving, info.not_serving_reason)
        self._serving = info.serving
        if self.server is not None:
            await self.server.set_serving(info.serving)
        return info.serving, info.not_serving_reason

    async def _messages(self) -> AsyncIterator[host_service_pb2.ConnectRequest]:
        info = await self.service.host_info()
        yield host_service_pb2.ConnectRequest(
            registration=host_service_pb2.Registration(
                name=info.name,
                address=self.address,
                capacity=convert.resources_to_proto(info.capacity),
                allocatable=convert.resources_to_proto(info.allocatable),
                hypervisor=convert.hypervisor_to_proto(info.hypervisor),
                revision=convert.revision_to_proto(self.service.events.revision),
            )
        )
        while True:
            await asyncio.sleep(self.config.heartbeat_interval_seconds)
            serving, reason = await self._refresh_serving()
            yield host_service_pb2.ConnectRequest(
                heartbeat=host_service_pb2.Heartbeat(serving=serving, not_serving_reason=reason)
            )

    async def _controller_session(self) -> None:
        # reconnect forever with capped backoff: the controller may restart or be upgraded
        backoff = 0.5
        while True:
            channel = aio_channel(
                self.config.controller, self.transport, f"controller.{self.trust_domain}" if self.trust_domain else None
            )
            try:
                stub = host_service_pb2_grpc.HostServiceStub(channel)
                async for resp in stub.Connect(self._messages()):
                    backoff = 0.5
                    self._apply_revocations(set(resp.revoked_serials))
            except grpc.aio.AioRpcError as exc:
                log.warning("controller session to %s ended: %s", self.config.controller, exc.details())
            finally:
                await channel.close()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)


async def serve(config: AgentConfig) -> None:
    """Run an agent until a termination signal."""
    agent = Agent(config)
    await agent.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await agent.stop()


def run(argv: list[str] | None = None) -> None:
    """Entry point of ``clonebox-agent``."""
    parser = argparse.ArgumentParser(prog="clonebox-agent", description="CloneBox agent (one per hypervisor host)")
    parser.add_argument("--config", help="YAML config file (environment CLONEBOX_AGENT_* overrides it)")
    args = parser.parse_args(argv)
    try:
        config = load_config(AgentConfig, args.config, "CLONEBOX_AGENT_")
        setup_logging("clonebox-agent", config.log_level)
        asyncio.run(serve(config))
    except CloneboxError as exc:
        print(f"clonebox-agent: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    run()
