"""Composition root of the controller: ``Controller(config)`` wires store, agent gateway, use cases, gRPC.

``clonebox-controller --config FILE`` runs it until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from clonebox.controller.v1 import (
    audit_service_pb2,
    audit_service_pb2_grpc,
    health_service_pb2,
    health_service_pb2_grpc,
    host_service_pb2,
    host_service_pb2_grpc,
    operation_service_pb2,
    operation_service_pb2_grpc,
    pki_service_pb2,
    pki_service_pb2_grpc,
    plan_service_pb2,
    plan_service_pb2_grpc,
    recovery_service_pb2,
    recovery_service_pb2_grpc,
    snapshot_service_pb2,
    snapshot_service_pb2_grpc,
    vm_service_pb2,
    vm_service_pb2_grpc,
)

from clonebox_controller.agents.pool import GrpcAgentGateway
from clonebox_controller.app.audit import AuditLog
from clonebox_controller.app.health import HealthHub, HealthSettings
from clonebox_controller.app.hosts import HostRegistry
from clonebox_controller.app.operations import OperationQueries
from clonebox_controller.app.pki import PkiManager
from clonebox_controller.app.plans import PlacementNeed, PlanEngine, PlanSettings
from clonebox_controller.app.recovery import RecoveryManager
from clonebox_controller.app.snapshots import SnapshotManager
from clonebox_controller.app.vms import VmManager
from clonebox_controller.config import ControllerConfig, plan_backup_dir
from clonebox_controller.grpc.audit import AuditCallObserver, AuditServicer
from clonebox_controller.grpc.health import HealthServicer
from clonebox_controller.grpc.plans import PlanServicer
from clonebox_controller.grpc.recovery import RecoveryServicer
from clonebox_controller.grpc.servicers import (
    EnrollmentServicer,
    HostServicer,
    OperationServicer,
    PkiServicer,
    VmServicer,
)
from clonebox_controller.grpc.snapshots import SnapshotServicer
from clonebox_controller.store import Store, placement
from clonebox_core.audit.chain import Keyring, ensure_key_file
from clonebox_core.audit.headfile import HeadFile
from clonebox_core.changes import ChangeFeed
from clonebox_core.config import load_config
from clonebox_core.errors import CloneboxError
from clonebox_core.model import Host
from clonebox_core.rpc.auth import Authorizer
from clonebox_core.rpc.server import (
    ServerHandle,
    make_transport,
    split_host_port,
    start_server,
    trust_domain_of,
)
from clonebox_core.rpc.tls import TlsFiles, install
from clonebox_core.security.pki import CertificateAuthority, cert_pem, key_pem
from clonebox_core.telemetry.logging import setup_logging
from clonebox_core.telemetry.metrics import Metrics
from clonebox_core.telemetry.metrics_server import (
    MetricsServer,
    check_metrics_listen,
    rpc_method_paths,
    start_metrics_server,
)
from clonebox_core.telemetry.tracing import init_tracing, shutdown_tracing

log = logging.getLogger("clonebox_controller")


def _service(module: object, name: str) -> str:
    return module.DESCRIPTOR.services_by_name[name].full_name  # type: ignore[attr-defined, no-any-return]


def audit_setup(config: ControllerConfig) -> tuple[Keyring, HeadFile]:
    """The audit keyring and head file the configuration names (a key is created on first start if none is)."""
    audit = config.audit
    if audit.keys:
        keyring = Keyring.from_key_files(audit.keys, audit.current_key or sorted(audit.keys)[-1])
        default_dir = Path(next(iter(audit.keys.values()))).parent
    else:
        default_dir = _state_dir(config.database_url)
        key_path = Path(audit.key_file) if audit.key_file else default_dir / "audit.key"
        keyring = Keyring({"k1": ensure_key_file(key_path)}, "k1")
        default_dir = key_path.parent
    head_path = Path(audit.head_file) if audit.head_file else default_dir / "audit-head.log"
    return keyring, HeadFile(head_path)


def _state_dir(database_url: str) -> Path:
    prefix = "sqlite:///"
    if database_url.startswith(prefix) and database_url[len(prefix) :] not in ("", ":memory:"):
        return Path(database_url[len(prefix) :]).parent
    return Path.cwd()


def place_plan(hosts: Sequence[Host], needs: Sequence[PlacementNeed]) -> list[tuple[str, CloneboxError]]:
    """
    Place every VM of a plan on a snapshot of ``hosts`` with the store's placement policy, reserving as it goes.

    The plan engine's all-or-nothing capacity check: the VMs that do not fit, each with the error
    placement gives for it (the real placement happens again, VM by VM, when the run creates them).
    """
    candidates = {h.name: placement.Candidate(h.name, h.state, h.cordoned, h.allocatable, h.allocated) for h in hosts}
    problems: list[tuple[str, CloneboxError]] = []
    for need in needs:
        try:
            if need.host:
                chosen = placement.check_named(candidates.get(need.host), need.host, need.resources)
            else:
                chosen = placement.choose(list(candidates.values()), need.resources)
        except CloneboxError as err:
            problems.append((need.vm, err))
            continue
        c = candidates[chosen]
        candidates[chosen] = dataclasses.replace(c, reserved=c.reserved + need.resources)
    return problems


class Controller:
    """A running controller."""

    def __init__(self, config: ControllerConfig) -> None:
        self.config = config
        self.transport = make_transport(config.tls_dir, "controller", config.insecure)
        self.trust_domain = trust_domain_of(self.transport)
        check_metrics_listen(config.metrics_listen, config.insecure)
        self.metrics = Metrics()
        keyring, head_file = audit_setup(config)
        # the store announces committed VM, operation and health changes; waiters wake on them
        self.changes = ChangeFeed()
        self.store = Store.open(
            config.database_url,
            audit_keyring=keyring,
            audit_head_file=head_file,
            on_audit_append=lambda seconds: self.metrics.observe_audit_append("sql", seconds),
            on_change=self.changes.publish_threadsafe,
        )
        self.audit = AuditLog(self.store, keyring, head_file.latest)
        # gauges computed at scrape time (on the scrape thread) with one grouped query each
        self.metrics.track_vms(self.store.count_vms_by_state)
        self.metrics.track_hosts(self.store.count_hosts_by_state)
        self.metrics_server: MetricsServer | None = None
        self.gateway = GrpcAgentGateway(self.transport, self.trust_domain)
        self.pki: PkiManager | None = None
        if config.ca_dir:
            self.pki = PkiManager(
                self.store,
                CertificateAuthority.load(Path(config.ca_dir)),
                enroll_address=config.enroll_listen,
                leaf_seconds=config.certificate_seconds,
            )
        self.enroll_server: ServerHandle | None = None
        self._renewal: asyncio.Task[None] | None = None
        self.hosts = HostRegistry(
            self.store,
            self.gateway,
            self.changes,
            heartbeat_timeout=config.heartbeat_timeout_seconds,
            heartbeat_interval=config.heartbeat_interval_seconds,
        )
        self.vms = VmManager(
            self.store,
            self.hosts,
            stop_timeout_seconds=config.stop_timeout_seconds,
            observe_operation=self.metrics.observe_operation,
            agent_retry_seconds=config.agent_retry_seconds,
        )
        self.operations = OperationQueries(self.store, self.changes)
        self.recovery = RecoveryManager(self.store, self.hosts)
        self.snapshots = SnapshotManager(self.store, self.hosts)
        hc = config.health
        # follows every agent session the registry reports (it registers itself as a listener)
        self.health = HealthHub(
            self.store,
            self.store,
            self.hosts,
            HealthSettings(
                transition_retention=timedelta(days=hc.transition_retention_days),
                minute_retention=timedelta(days=hc.minute_retention_days),
                action_retention=timedelta(days=hc.action_retention_days),
                prune_interval_seconds=hc.prune_interval_seconds,
                unreachable_check_seconds=max(config.heartbeat_timeout_seconds, 1.0),
                watch_queue=hc.watch_queue,
            ),
        )
        pc = config.plans
        self.plans = PlanEngine(
            self.store,
            self.vms,
            self.health,
            place_plan,
            PlanSettings(
                lease_seconds=pc.lease_seconds,
                poll_seconds=pc.poll_seconds,
                watch_poll_seconds=pc.watch_poll_seconds,
                watch_min_interval_seconds=pc.watch_min_interval_seconds,
                unreachable_retry_seconds=pc.unreachable_retry_seconds,
                backup_dir=plan_backup_dir(config),
                backup_keep=pc.backup_keep,
            ),
            snapshots=self.snapshots,
            changes=self.changes,
        )
        self.server: ServerHandle | None = None

    @property
    def address(self) -> str:
        """Address clients reach the controller at."""
        assert self.server is not None
        host, _ = split_host_port(self.config.listen)
        return f"{host}:{self.server.port}"

    async def start(self) -> None:
        """Start serving and resume unfinished operations."""
        self.changes.bind(asyncio.get_running_loop())
        await self.hosts.start()
        await self.health.start()
        authorizer = None
        if self.transport.tls is not None:
            authorizer = Authorizer(self.trust_domain, self.pki.is_revoked if self.pki else lambda _i: False)
        if self.pki is not None:
            await self.pki.start()
        rpc_metrics = self.metrics.rpc_observer(
            rpc_method_paths(
                [
                    _service(host_service_pb2, "HostService"),
                    _service(pki_service_pb2, "PkiService"),
                    _service(vm_service_pb2, "VmService"),
                    _service(operation_service_pb2, "OperationService"),
                    _service(audit_service_pb2, "AuditService"),
                    _service(recovery_service_pb2, "RecoveryService"),
                    _service(health_service_pb2, "HealthService"),
                    _service(snapshot_service_pb2, "SnapshotService"),
                    _service(plan_service_pb2, "PlanService"),
                    _service(pki_service_pb2, "EnrollmentService"),
                ]
            )
        )
        audit_observer = AuditCallObserver(self.audit)
        self.server = await start_server(
            self.config.listen,
            [
                (
                    host_service_pb2_grpc.add_HostServiceServicer_to_server,
                    HostServicer(self.hosts, self.store, self.vms, self.pki, self.audit),
                    _service(host_service_pb2, "HostService"),
                ),
                (
                    pki_service_pb2_grpc.add_PkiServiceServicer_to_server,
                    PkiServicer(self.pki),
                    _service(pki_service_pb2, "PkiService"),
                ),
                (
                    vm_service_pb2_grpc.add_VmServiceServicer_to_server,
                    VmServicer(self.vms, self.store),
                    _service(vm_service_pb2, "VmService"),
                ),
                (
                    operation_service_pb2_grpc.add_OperationServiceServicer_to_server,
                    OperationServicer(self.operations),
                    _service(operation_service_pb2, "OperationService"),
                ),
                (
                    audit_service_pb2_grpc.add_AuditServiceServicer_to_server,
                    AuditServicer(self.audit),
                    _service(audit_service_pb2, "AuditService"),
                ),
                (
                    recovery_service_pb2_grpc.add_RecoveryServiceServicer_to_server,
                    RecoveryServicer(self.recovery),
                    _service(recovery_service_pb2, "RecoveryService"),
                ),
                (
                    health_service_pb2_grpc.add_HealthServiceServicer_to_server,
                    HealthServicer(self.health),
                    _service(health_service_pb2, "HealthService"),
                ),
                (
                    snapshot_service_pb2_grpc.add_SnapshotServiceServicer_to_server,
                    SnapshotServicer(self.snapshots),
                    _service(snapshot_service_pb2, "SnapshotService"),
                ),
                (
                    plan_service_pb2_grpc.add_PlanServiceServicer_to_server,
                    PlanServicer(self.plans),
                    _service(plan_service_pb2, "PlanService"),
                ),
            ],
            self.transport,
            authorizer,
            observers=[rpc_metrics, audit_observer],
        )
        if self.pki is not None and self.config.enroll_listen and self.transport.tls is not None:
            self.enroll_server = await start_server(
                self.config.enroll_listen,
                [
                    (
                        pki_service_pb2_grpc.add_EnrollmentServiceServicer_to_server,
                        EnrollmentServicer(self.pki),
                        _service(pki_service_pb2, "EnrollmentService"),
                    )
                ],
                self.transport,
                client_auth=False,
                observers=[rpc_metrics, audit_observer],
            )
            # tokens carry the bound address (the config may ask for port 0)
            enroll_host, _ = split_host_port(self.config.enroll_listen)
            self.pki.enroll_address = self.config.enroll_advertise or f"{enroll_host}:{self.enroll_server.port}"
        if self.pki is not None and self.transport.tls is not None:
            self._renewal = asyncio.create_task(self._renew_own_certificate(self.transport.tls), name="renewal")
        if self.config.metrics_listen:
            pki = self.pki
            self.metrics_server = start_metrics_server(
                self.config.metrics_listen,
                self.metrics.registry,
                self.transport,
                is_revoked=(lambda serial: format(serial, "x") in pki.revoked) if pki is not None else None,
            )
        await self.vms.resume()
        # after the operations resume: a resumed run replays its VM operations by request id
        await self.plans.start()
        log.info("controller listening on %s", self.address)

    async def _renew_own_certificate(self, tls: TlsFiles) -> None:
        # the controller holds the CA, so it renews itself at two thirds of the lifetime, no RPC needed
        assert self.pki is not None
        while True:
            delay = (tls.renew_at() - datetime.now(UTC)).total_seconds()
            await asyncio.sleep(max(delay, 1.0))
            me = tls.identity()
            issued = self.pki.ca.issue(me, seconds=self.config.certificate_seconds)
            assert issued.key is not None
            install(tls, key_pem(issued.key), cert_pem(issued.cert), self.pki.ca.cert_pem)
            log.info("renewed the controller certificate (serial %x)", issued.cert.serial_number)

    async def stop(self) -> None:
        """Stop serving and background work."""
        # runs stop first (they would start new VM operations) and release their leases: they resume on
        # the next start, here or on another controller
        await self.plans.close()
        # first: the sessions the server ends below are the controller's doing, not unreachable agents
        await self.health.close()
        if self._renewal is not None:
            self._renewal.cancel()
            await asyncio.gather(self._renewal, return_exceptions=True)
        if self.enroll_server is not None:
            await self.enroll_server.stop()
        if self.pki is not None:
            await self.pki.close()
        if self.server is not None:
            await self.server.stop()
        if self.metrics_server is not None:
            await self.metrics_server.aclose()
        await self.vms.close()
        await self.hosts.close()
        await self.gateway.close()
        self.store.close()


async def serve(config: ControllerConfig) -> None:
    """Run a controller until a termination signal."""
    controller = Controller(config)
    await controller.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await controller.stop()


def run(argv: list[str] | None = None) -> None:
    """Entry point of ``clonebox-controller``."""
    parser = argparse.ArgumentParser(prog="clonebox-controller", description="CloneBox controller (fleet state)")
    parser.add_argument("--config", help="YAML config file (environment CLONEBOX_CONTROLLER_* overrides it)")
    args = parser.parse_args(argv)
    try:
        config = load_config(ControllerConfig, args.config, "CLONEBOX_CONTROLLER_")
        setup_logging("clonebox-controller", config.log_level, config.log_levels)
        init_tracing("clonebox-controller", config.tracing)
        try:
            asyncio.run(serve(config))
        finally:
            shutdown_tracing(timeout=5.0)
    except CloneboxError as exc:
        sys.stderr.write(f"clonebox-controller: {exc}\n")
        sys.exit(2)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    run()
