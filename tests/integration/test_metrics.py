"""The Prometheus endpoints of a real controller and agent (in-process, mTLS from the fleet CA)."""

from __future__ import annotations

import asyncio
import http.client
import ssl
from pathlib import Path

import grpc.aio
import pytest
from clonebox.agent.v1 import agent_pb2
from clonebox.controller.v1 import operation_service_pb2, vm_service_pb2
from clonebox.type.v1 import vm_pb2
from cryptography import x509

from clonebox_controller.config import ControllerConfig
from clonebox_controller.main import Controller
from clonebox_core.errors import InvalidArgument
from clonebox_core.model import Resources
from clonebox_core.rpc.tls import TlsFiles
from clonebox_core.security.pki import identity_of
from clonebox_core.telemetry.metrics import parse_samples
from clonebox_core.telemetry.metrics_server import MetricsServer
from tests.integration.conftest import TRUST_DOMAIN, Fleet, FleetPki, eventually

pytestmark = pytest.mark.integration

SMALL = Resources(vcpus=4, memory_mib=4096, disk_mib=100_000)
VM_SERVICE = vm_service_pb2.DESCRIPTOR.services_by_name["VmService"].full_name
AGENT_SERVICE = agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name

#: what a failed mTLS handshake looks like to a client (TLS 1.3 reports it on the first read)
HANDSHAKE_FAILED = (ssl.SSLError, ConnectionError, http.client.RemoteDisconnected)


def _client_context(ca: Path, client: TlsFiles | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))  # verifies the endpoint's certificate and address
    if client is not None:
        ctx.load_cert_chain(str(client.cert), str(client.key))
    return ctx


def _get(server: MetricsServer, ctx: ssl.SSLContext) -> tuple[str, bytes]:
    """Scrape once: (body, the DER certificate the endpoint presented)."""
    conn = http.client.HTTPSConnection(server.host, server.port, context=ctx, timeout=10)
    try:
        conn.request("GET", "/metrics")
        assert isinstance(conn.sock, ssl.SSLSocket)
        presented = conn.sock.getpeercert(binary_form=True)
        assert presented is not None
        resp = conn.getresponse()
        body = resp.read().decode()
        assert resp.status == 200, body
        return body, presented
    finally:
        conn.close()


async def scrape(server: MetricsServer | None, ca: Path, client: TlsFiles | None) -> str:
    assert server is not None and server.scheme == "https"
    body, _cert = await asyncio.to_thread(_get, server, _client_context(ca, client))
    return body


def value(body: str, name: str, **labels: str) -> float:
    """The sample's value, 0 when the exposition does not have it."""
    for sample, sample_labels, v in parse_samples(body):
        if sample == name and all(sample_labels.get(k) == want for k, want in labels.items()):
            return v
    return 0.0


def user_tls(pki: FleetPki) -> TlsFiles:
    """A certificate from the fleet CA for a scraper (a read-only user here)."""
    return TlsFiles.in_folder(pki.folder("user", "prometheus", "viewer"), "user")


async def create_vm(fleet: Fleet, name: str) -> None:
    s = vm_pb2.VmSpec(name=name, vcpus=1, memory_mib=256, disks=[vm_pb2.DiskSpec(name="root", size_mib=512)])
    resp = await fleet.vms.CreateVm(vm_service_pb2.CreateVmRequest(spec=s, request_id=f"req-{name}"))
    op = (await fleet.ops.WaitOperation(operation_service_pb2.WaitOperationRequest(id=resp.operation.id))).operation
    assert op.done and not op.HasField("error"), op


async def test_rpc_counters_and_state_gauges_after_a_real_create(fleet: Fleet) -> None:
    agent = await fleet.add_agent("h1", SMALL)
    ca = fleet.pki.root / "ca" / "ca.crt"
    scraper = user_tls(fleet.pki)
    create_labels = {"service": VM_SERVICE, "method": "CreateVm", "code": "OK"}

    before = await scrape(fleet.controller.metrics_server, ca, scraper)
    assert value(before, "clonebox_hosts", state="READY") == 1
    assert value(before, "clonebox_vms", state="RUNNING") == 0
    await create_vm(fleet, "web-1")

    after = await scrape(fleet.controller.metrics_server, ca, scraper)
    assert value(after, "clonebox_rpc_requests_total", **create_labels) == (
        value(before, "clonebox_rpc_requests_total", **create_labels) + 1
    )
    assert value(after, "clonebox_rpc_duration_seconds_count", service=VM_SERVICE, method="CreateVm") >= 1
    assert value(after, "clonebox_hosts", state="READY") == 1
    assert value(after, "clonebox_hosts", state="UNREACHABLE") == 0
    assert value(after, "clonebox_vms", state="RUNNING") == 1
    # the operation id is the agent's request id: the controller called the agent's CreateVm once
    agent_body = await scrape(agent.metrics_server, ca, scraper)
    assert value(agent_body, "clonebox_rpc_requests_total", service=AGENT_SERVICE, method="CreateVm", code="OK") >= 1
    assert value(agent_body, "clonebox_vms", state="RUNNING") == 1

    # a failed call is counted under its code
    with pytest.raises(grpc.aio.AioRpcError):  # NOT_FOUND
        await fleet.vms.GetVm(vm_service_pb2.GetVmRequest(name="nope"))
    failed = await scrape(fleet.controller.metrics_server, ca, scraper)
    assert value(failed, "clonebox_rpc_requests_total", service=VM_SERVICE, method="GetVm", code="NOT_FOUND") == 1

    # the agent's gauge follows its own view (lifecycle events), no libvirt call per scrape
    resp = await fleet.vms.DeleteVm(vm_service_pb2.DeleteVmRequest(name="web-1", request_id="del-web-1"))
    await fleet.ops.WaitOperation(operation_service_pb2.WaitOperationRequest(id=resp.operation.id))

    async def gone() -> bool:
        body = await scrape(agent.metrics_server, ca, scraper)
        return value(body, "clonebox_vms", state="RUNNING") == 0

    await eventually(gone, what="the agent's clonebox_vms to drop the deleted VM")
    final = await scrape(fleet.controller.metrics_server, ca, scraper)
    assert value(final, "clonebox_vms", state="RUNNING") == 0


async def test_scrapers_need_a_certificate_from_the_fleet_ca(fleet: Fleet, tmp_path: Path) -> None:
    ca = fleet.pki.root / "ca" / "ca.crt"
    server = fleet.controller.metrics_server
    assert server is not None
    # no client certificate at all
    with pytest.raises(HANDSHAKE_FAILED):
        await asyncio.to_thread(_get, server, _client_context(ca, None))
    # a certificate from another CA (same trust domain name, different key): refused too
    foreign = FleetPki(tmp_path / "foreign")
    foreign_tls = TlsFiles.in_folder(foreign.folder("user", "prometheus", "viewer"), "user")
    with pytest.raises(HANDSHAKE_FAILED):
        await asyncio.to_thread(_get, server, _client_context(ca, foreign_tls))
    # plain HTTP on the TLS port gets nothing either
    with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
        await asyncio.to_thread(_plain_get, server)
    # and the endpoint still serves a proper scraper afterwards
    body = await scrape(server, ca, user_tls(fleet.pki))
    assert "clonebox_rpc_requests_total" in body


def _plain_get(server: MetricsServer) -> None:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        raise AssertionError(f"plaintext scrape answered {resp.status}")
    finally:
        conn.close()


async def test_renewed_certificate_is_served_without_a_restart(fleet: Fleet) -> None:
    ca = fleet.pki.root / "ca" / "ca.crt"
    scraper = _client_context(ca, user_tls(fleet.pki))
    server = fleet.controller.metrics_server
    assert server is not None and fleet.controller.transport.tls is not None
    own = fleet.controller.transport.tls
    _body, first = await asyncio.to_thread(_get, server, scraper)
    assert ssl.DER_cert_to_PEM_cert(first).encode() == own.cert.read_bytes()

    # renew in place: a new certificate and key into the controller's own TLS folder
    folder = fleet.pki.folder("controller", "ctl")
    assert folder == own.cert.parent
    renewed = own.cert.read_bytes()
    assert ssl.DER_cert_to_PEM_cert(first).encode() != renewed

    async def serves_renewed() -> bool:
        _b, presented = await asyncio.to_thread(_get, server, scraper)
        return ssl.DER_cert_to_PEM_cert(presented).encode() == renewed

    await eventually(serves_renewed, what="the metrics endpoint to present the renewed certificate")
    # a fresh scraper that trusts only the renewed leaf (not the CA) is served: the new pair is in use
    pinned = ssl.create_default_context(cadata=renewed.decode())
    pinned.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    pinned.load_cert_chain(str(user_tls(fleet.pki).cert), str(user_tls(fleet.pki).key))
    body, _cert = await asyncio.to_thread(_get, server, pinned)
    assert "clonebox_hosts" in body
    # while one that trusts only the old leaf no longer is
    stale = ssl.create_default_context(cadata=ssl.DER_cert_to_PEM_cert(first))
    stale.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    stale.load_cert_chain(str(user_tls(fleet.pki).cert), str(user_tls(fleet.pki).key))
    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncio.to_thread(_get, server, stale)


async def test_agent_endpoint_uses_the_agent_certificate(fleet: Fleet) -> None:
    agent = await fleet.add_agent("h2", SMALL)
    assert agent.metrics_server is not None
    ctx = _client_context(fleet.pki.root / "ca" / "ca.crt", user_tls(fleet.pki))
    body, presented = await asyncio.to_thread(_get, agent.metrics_server, ctx)
    assert agent.transport.tls is not None
    assert ssl.DER_cert_to_PEM_cert(presented).encode() == agent.transport.tls.cert.read_bytes()
    me = identity_of(x509.load_der_x509_certificate(presented))
    assert (me.kind.value, me.name, me.trust_domain) == ("agent", "h2", TRUST_DOMAIN)
    assert value(body, "clonebox_vms", state="RUNNING") == 0
    assert "clonebox_hosts" not in body  # hosts are the controller's business


async def test_insecure_controller_serves_plain_http_on_loopback_only(tmp_path: Path) -> None:
    base = {"listen": "127.0.0.1:0", "insecure": True, "database_url": f"sqlite:///{tmp_path / 'fleet.db'}"}
    with pytest.raises(InvalidArgument) as err:
        Controller(ControllerConfig(**base, metrics_listen="0.0.0.0:0"))
    assert err.value.reason == "PLAINTEXT_NOT_LOOPBACK"

    controller = Controller(ControllerConfig(**base, metrics_listen="127.0.0.1:0"))
    await controller.start()
    try:
        server = controller.metrics_server
        assert server is not None and server.scheme == "http"

        def get() -> str:
            conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
            try:
                conn.request("GET", "/metrics")
                return conn.getresponse().read().decode()
            finally:
                conn.close()

        body = await asyncio.to_thread(get)
        assert "clonebox_hosts" in body and "clonebox_rpc_requests_total" in body
    finally:
        await controller.stop()


async def test_metrics_can_be_disabled(tmp_path: Path) -> None:
    cfg = ControllerConfig(
        listen="127.0.0.1:0", insecure=True, metrics_listen="", database_url=f"sqlite:///{tmp_path / 'fleet.db'}"
    )
    controller = Controller(cfg)
    await controller.start()
    try:
        assert controller.metrics_server is None
    finally:
        await controller.stop()


async def test_a_revoked_scraper_is_refused(fleet: Fleet) -> None:
    from clonebox.controller.v1 import pki_service_pb2, pki_service_pb2_grpc

    ca = fleet.pki.root / "ca" / "ca.crt"
    server = fleet.controller.metrics_server
    assert server is not None
    scraper = TlsFiles.in_folder(fleet.pki.folder("user", "old-prometheus", "viewer"), "user")
    assert "clonebox_rpc_requests_total" in await scrape(server, ca, scraper)
    pki = pki_service_pb2_grpc.PkiServiceStub(fleet.channel)
    await pki.RevokeCertificate(pki_service_pb2.RevokeCertificateRequest(name="old-prometheus"))
    # the handshake completes (the CA signed it), then the endpoint drops the revoked peer
    with pytest.raises((*HANDSHAKE_FAILED, http.client.HTTPException, OSError)):
        await asyncio.to_thread(_get, server, _client_context(ca, scraper))
    assert "clonebox_rpc_requests_total" in await scrape(server, ca, user_tls(fleet.pki))
