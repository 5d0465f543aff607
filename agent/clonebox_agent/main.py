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
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import grpc.aio
from clonebox.agent.v1 import agent_pb2, agent_pb2_grpc
from clonebox.controller.v1 import host_service_pb2, host_service_pb2_grpc

from clonebox_agent import faultinject
from clonebox_agent.app.console import ConsoleReader
from clonebox_agent.app.health import HealthMonitor, HealthSettings
from clonebox_agent.app.keystore import KeyStore
from clonebox_agent.app.probes import ScriptPolicy, ScriptRunner
from clonebox_agent.app.service import AgentService
from clonebox_agent.app.snapshots import SnapshotManager, SnapshotSettings
from clonebox_agent.config import AgentConfig
from clonebox_agent.credentials import enroll, renew_forever
from clonebox_agent.grpc.audit import AgentAuditObserver
from clonebox_agent.grpc.servicer import AgentServicer
from clonebox_agent.journal.store import Journal
from clonebox_agent.ports import Hypervisor
from clonebox_core.audit.chain import Head
from clonebox_core.config import load_config
from clonebox_core.errors import CloneboxError, InvalidArgument
from clonebox_core.model import Resources, VmState
from clonebox_core.names import check_dns_label
from clonebox_core.rpc import convert, convert_audit
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
from clonebox_core.telemetry.logging import setup_logging
from clonebox_core.telemetry.metrics import Metrics
from clonebox_core.telemetry.metrics_server import (
    MetricsServer,
    check_metrics_listen,
    rpc_method_paths,
    start_metrics_server,
)
from clonebox_core.telemetry.tracing import init_tracing, shutdown_tracing

#: audit events per Connect message (the controller refuses larger batches)
MAX_AUDIT_BATCH = 100

log = logging.getLogger("clonebox_agent")

SERVICE_NAME = agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name


def build_hypervisor(config: AgentConfig, step_hook: Callable[[str], None] | None = None) -> Hypervisor:
    """The adapter the config asks for (``step_hook``: the fault-injection hook, see ``faultinject``)."""
    if config.hypervisor == "fake":
        from clonebox_agent.adapters.fake import FakeHypervisor

        return FakeHypervisor(
            host_name=config.name,
            storage_dir=config.storage_dir,
            image_dirs=config.image_dirs,
            shared_roots=config.shared_roots,
            step_hook=step_hook,
            probe_network=config.fake_probe_network,
        )
    from clonebox_agent.adapters.libvirt import LibvirtHypervisor

    return LibvirtHypervisor(
        uri=config.libvirt_uri,
        storage_dir=Path(config.storage_dir),
        image_dirs=[Path(p) for p in config.image_dirs],
        shared_roots=config.shared_roots,
        domain_type=config.domain_type,
        # several agents may share one libvirtd (tests, benchmarks, dev): each lists only its own domains
        owner=config.name,
        step_hook=step_hook,
    )


class Agent:
    """A running agent: gRPC server, use cases, and the session with the controller."""

    def __init__(self, config: AgentConfig, hypervisor: Hypervisor | None = None) -> None:
        check_dns_label("name", config.name)
        check_metrics_listen(config.metrics_listen, config.insecure)
        self.config = config
        self._needs_enrolment = bool(
            config.join_token and config.tls_dir and not TlsFiles.in_folder(Path(config.tls_dir), "agent").exists()
        )
        # until enrolment has produced the files, the transport is built in start()
        self.transport = Transport(None, insecure=True) if self._needs_enrolment else self._load_transport()
        self.trust_domain = trust_domain_of(self.transport)
        self.metrics = Metrics()
        self.journal = Journal(
            Path(config.state_dir) / "journal.db",
            on_audit_append=lambda seconds: self.metrics.observe_audit_append("outbox", seconds),
        )
        self._revoked = self.journal.revoked()
        #: ids of forwarded audit events not yet acknowledged (one batch in flight per session)
        self._audit_in_flight: set[str] = set()
        step_hook = faultinject.hook_from_env()
        hv = hypervisor if hypervisor is not None else build_hypervisor(config, step_hook)
        # script checks run host executables: only from a root-owned folder, refused when none is set
        scripts = ScriptPolicy(config.probe_scripts_dir) if config.probe_scripts_dir else None
        self.service = AgentService(
            config.name,
            hv,
            self.journal,
            reserve=Resources(config.reserve.vcpus, config.reserve.memory_mib, config.reserve.disk_mib),
            stop_timeout_seconds=config.stop_timeout_seconds,
            event_history=config.event_history,
            cpu_allocation_ratio=config.cpu_allocation_ratio,
            step_hook=step_hook,
            keys=KeyStore(Path(config.state_dir) / "ssh-keys"),
            seed_poll_seconds=config.seed_poll_seconds,
            scripts=scripts,
        )
        self.snapshots = SnapshotManager(
            self.service,
            hv,
            SnapshotSettings(
                storage_dir=config.storage_dir,
                prune_interval_seconds=config.snapshot_prune_interval_seconds,
                max_import_virtual_bytes=config.max_import_virtual_bytes,
            ),
            step_hook=step_hook,
        )
        self.console = ConsoleReader(hv)
        self.health = HealthMonitor(
            self.service,
            hv,
            settings=HealthSettings(
                probe_concurrency=config.probe_concurrency,
                restart_backoff_seconds=config.health_restart_backoff_seconds,
                max_restarts=config.health_max_restarts,
                restart_window_seconds=config.health_restart_window_seconds,
            ),
            scripts=ScriptRunner(scripts, config.probe_user) if scripts is not None else None,
        )
        self.metrics.track_vms(self._vm_counts)
        self.metrics_server: MetricsServer | None = None
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
        await self.snapshots.start()
        await self.health.start()
        authorizer = Authorizer(self.trust_domain, self._is_revoked) if self.trust_domain else None
        self.server = await start_server(
            self.config.listen,
            [
                (
                    agent_pb2_grpc.add_AgentServiceServicer_to_server,
                    AgentServicer(self.service, self.health, self.snapshots, self.console),
                    SERVICE_NAME,
                )
            ],
            self.transport,
            authorizer,
            observers=[
                self.metrics.rpc_observer(rpc_method_paths([SERVICE_NAME])),
                AgentAuditObserver(self.journal, self.config.name),
            ],
        )
        if self.config.metrics_listen:
            self.metrics_server = start_metrics_server(
                self.config.metrics_listen,
                self.metrics.registry,
                self.transport,
                is_revoked=lambda serial: format(serial, "x") in self._revoked,
            )
        await self._refresh_serving()
        if self.config.controller:
            self._session = asyncio.create_task(self._controller_session(), name="controller-session")
            if self.transport.tls is not None:
                self._renewal = asyncio.create_task(
                    renew_forever(self.transport, self.config.controller), name="renewal"
                )
        else:
            # standalone: no heartbeat refreshes grpc.health, so a loop of its own does
            self._session = asyncio.create_task(self._follow_serving(), name="serving")
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
        if self.metrics_server is not None:
            await self.metrics_server.aclose()
        await self.health.close()
        await self.snapshots.close()
        await self.service.close()
        self.journal.close()

    def _vm_counts(self) -> Counter[VmState]:
        # clonebox_vms{state}: the agent's last known view (kept current by lifecycle events), not a
        # libvirt call per scrape. Runs on the scrape thread: list() copies the values under the GIL.
        return Counter(vm.state for vm in list(self.service._known.values()))

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

    async def _follow_serving(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_interval_seconds)
            try:
                await self._refresh_serving()
            except Exception:
                log.exception("could not refresh the serving status")

    async def _messages(self) -> AsyncIterator[host_service_pb2.ConnectRequest]:
        info = await self.service.host_info()
        registration = host_service_pb2.Registration(
            name=info.name,
            address=self.address,
            capacity=convert.resources_to_proto(info.capacity),
            allocatable=convert.resources_to_proto(info.allocatable),
            hypervisor=convert.hypervisor_to_proto(info.hypervisor),
            revision=convert.revision_to_proto(self.service.events.revision),
        )
        witness = await asyncio.to_thread(self.journal.audit_witness)
        if witness is not None:
            registration.audit_head.CopyFrom(convert_audit.head_to_pb(Head(*witness)))
        yield host_service_pb2.ConnectRequest(registration=registration)
        self._audit_in_flight = set()
        while True:
            batch = await self._outbox_batch()
            if batch is not None:
                yield batch
            await asyncio.sleep(self.config.heartbeat_interval_seconds)
            serving, reason = await self._refresh_serving()
            yield host_service_pb2.ConnectRequest(
                heartbeat=host_service_pb2.Heartbeat(serving=serving, not_serving_reason=reason)
            )

    async def _outbox_batch(self) -> host_service_pb2.ConnectRequest | None:
        """The next outbox events to forward, unless a batch is still waiting for its acknowledgement."""
        if self._audit_in_flight:
            return None
        events = await asyncio.to_thread(self.journal.pending_events, MAX_AUDIT_BATCH)
        if not events:
            return None
        self._audit_in_flight = {e.id for e in events}
        batch = host_service_pb2.AuditBatch(events=[convert_audit.event_to_pb(e) for e in events])
        return host_service_pb2.ConnectRequest(audit=batch)

    async def _on_session_reply(self, resp: host_service_pb2.ConnectResponse) -> None:
        self._apply_revocations(set(resp.revoked_serials))
        if resp.acked_audit_event_ids:
            acked = list(resp.acked_audit_event_ids)
            await asyncio.to_thread(self.journal.ack_events, acked)
            self._audit_in_flight.difference_update(acked)
        head = convert_audit.head_from_pb(resp.audit_head) if resp.HasField("audit_head") else None
        if head is not None and head.seq > 0:
            await asyncio.to_thread(self.journal.set_audit_witness, head.seq, head.mac)

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
                    await self._on_session_reply(resp)
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
        setup_logging("clonebox-agent", config.log_level, config.log_levels)
        init_tracing("clonebox-agent", config.tracing)
        try:
            asyncio.run(serve(config))
        finally:
            shutdown_tracing(timeout=5.0)
    except CloneboxError as exc:
        sys.stderr.write(f"clonebox-agent: {exc}\n")
        sys.exit(2)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    run()
