"""Metrics of one daemon (clonebox_core.telemetry): the RPC observer, state gauges, timings, the endpoint."""

from __future__ import annotations

import contextlib
import http.client
import ssl
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from clonebox.agent.v1 import agent_pb2

from clonebox_core.errors import FailedPrecondition, InvalidArgument
from clonebox_core.model import HostState, VmState
from clonebox_core.rpc.server import Transport
from clonebox_core.rpc.status import CallRecord
from clonebox_core.rpc.tls import TlsFiles, install
from clonebox_core.security.identity import make_identity
from clonebox_core.security.pki import CertificateAuthority, cert_pem, key_pem, write_private, write_public
from clonebox_core.telemetry.metrics import MAX_LABEL_VALUES, OTHER, Metrics, parse_samples
from clonebox_core.telemetry.metrics_server import (
    ReloadingContext,
    rpc_method_paths,
    start_metrics_server,
)

AGENT_SERVICE = agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name
CREATE = f"/{AGENT_SERVICE}/CreateVm"
GET = f"/{AGENT_SERVICE}/GetVm"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def record(method: str, code: str = "OK", seconds: float = 0.01) -> CallRecord:
    return CallRecord(method=method, caller=None, code=code, reason="", seconds=seconds, request=None)


# ------------------------------------------------------------------------------------ RPC observer


def test_rpc_method_paths_are_the_served_services_plus_health_and_reflection() -> None:
    paths = rpc_method_paths([AGENT_SERVICE])
    assert CREATE in paths and GET in paths
    assert HEALTH_CHECK in paths
    assert "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo" in paths
    assert len(paths) == len(set(paths))
    assert not any("VmService" in p for p in paths)  # only what this daemon serves


async def test_observer_counts_calls_by_method_and_code() -> None:
    metrics = Metrics()
    observer = metrics.rpc_observer(rpc_method_paths([AGENT_SERVICE]))
    for _ in range(3):
        await observer.call_finished(record(CREATE, "OK", 0.02))
    await observer.call_finished(record(CREATE, "ALREADY_EXISTS", 0.003))
    await observer.call_finished(record(HEALTH_CHECK, "OK", 0.0005))

    labels = {"service": AGENT_SERVICE, "method": "CreateVm"}
    assert sample(metrics, "clonebox_rpc_requests_total", **labels, code="OK") == 3
    assert sample(metrics, "clonebox_rpc_requests_total", **labels, code="ALREADY_EXISTS") == 1
    assert sample(metrics, "clonebox_rpc_requests_total", **labels, code="NOT_FOUND") is None
    assert (
        sample(metrics, "clonebox_rpc_requests_total", service="grpc.health.v1.Health", method="Check", code="OK") == 1
    )
    # the histogram saw every call of the method, whatever its code
    assert sample(metrics, "clonebox_rpc_duration_seconds_count", **labels) == 4
    total = sample(metrics, "clonebox_rpc_duration_seconds_sum", **labels)
    assert total is not None and total == pytest.approx(3 * 0.02 + 0.003)
    assert sample(metrics, "clonebox_rpc_duration_seconds_bucket", **labels, le="0.005") == 1
    assert sample(metrics, "clonebox_rpc_duration_seconds_bucket", **labels, le="+Inf") == 4


async def test_unknown_methods_and_codes_keep_labels_bounded() -> None:
    metrics = Metrics()
    observer = metrics.rpc_observer(rpc_method_paths([AGENT_SERVICE]))
    for i in range(50):
        await observer.call_finished(record(f"/evil.Service/Method{i}", "OK"))
    await observer.call_finished(record(f"/{AGENT_SERVICE}/NoSuchMethod", "OK"))
    await observer.call_finished(record("not a path", "OK"))
    await observer.call_finished(record(GET, "SOMETHING_ELSE"))

    assert sample(metrics, "clonebox_rpc_requests_total", service=OTHER, method=OTHER, code="OK") == 52
    assert sample(metrics, "clonebox_rpc_requests_total", service=AGENT_SERVICE, method="GetVm", code="UNKNOWN") == 1
    services = {labels["service"] for name, labels, _ in parse_samples(metrics.render().decode()) if "rpc" in name}
    assert services == {OTHER, AGENT_SERVICE}
    assert observer.methods == frozenset(rpc_method_paths([AGENT_SERVICE]))


# ------------------------------------------------------------------------------------ gauges and timings


def test_state_gauges_come_from_the_source_at_scrape_time() -> None:
    metrics = Metrics()
    vms: Counter[VmState] = Counter({VmState.RUNNING: 2, VmState.STOPPED: 1})
    hosts = {HostState.READY: 3, HostState.UNSPECIFIED: 1}
    metrics.track_vms(lambda: vms)
    metrics.track_hosts(lambda: hosts)

    assert sample(metrics, "clonebox_vms", state="RUNNING") == 2
    assert sample(metrics, "clonebox_vms", state="STOPPED") == 1
    assert sample(metrics, "clonebox_vms", state="CRASHED") == 0  # every state is there, zero when empty
    assert sample(metrics, "clonebox_vms", state="UNSPECIFIED") is None
    assert sample(metrics, "clonebox_vms", state=OTHER) is None
    assert sample(metrics, "clonebox_hosts", state="READY") == 3
    assert sample(metrics, "clonebox_hosts", state="UNREACHABLE") == 0
    assert sample(metrics, "clonebox_hosts", state=OTHER) == 1  # a state outside the reported set

    vms[VmState.RUNNING] -= 1
    vms[VmState.DELETING] += 1
    assert sample(metrics, "clonebox_vms", state="RUNNING") == 1
    assert sample(metrics, "clonebox_vms", state="DELETING") == 1


def test_a_failing_source_leaves_its_gauge_out_not_the_scrape() -> None:
    metrics = Metrics()

    def broken() -> dict[VmState, int]:
        raise RuntimeError("database is down")

    metrics.track_vms(broken)
    metrics.track_hosts(lambda: {HostState.READY: 1})
    names = {name for name, _labels, _value in parse_samples(metrics.render().decode())}
    assert "clonebox_hosts" in names and "clonebox_vms" not in names


def test_operation_and_audit_timings() -> None:
    metrics = Metrics()
    metrics.observe_operation("vm.create", "OK", 12.5)
    metrics.observe_operation("vm.create", "FAILED_PRECONDITION", 0.3)
    metrics.observe_audit_append("sqlite", 0.002)
    metrics.observe_audit_append("sqlite", 0.004)

    op = {"kind": "vm.create"}
    assert sample(metrics, "clonebox_operation_duration_seconds_count", **op, outcome="OK") == 1
    assert sample(metrics, "clonebox_operation_duration_seconds_sum", **op, outcome="OK") == 12.5
    assert sample(metrics, "clonebox_operation_duration_seconds_count", **op, outcome="FAILED_PRECONDITION") == 1
    assert sample(metrics, "clonebox_audit_append_seconds_count", store="sqlite") == 2
    assert sample(metrics, "clonebox_audit_append_seconds_bucket", store="sqlite", le="0.0025") == 1


def test_free_labels_stay_bounded() -> None:
    metrics = Metrics()
    for i in range(MAX_LABEL_VALUES + 10):
        metrics.observe_operation(f"kind{i}", "OK", 1.0)
    metrics.observe_audit_append("has spaces {and} braces", 0.001)
    kinds = {
        labels["kind"]
        for name, labels, _ in parse_samples(metrics.render().decode())
        if name == "clonebox_operation_duration_seconds_count"
    }
    assert len(kinds) == MAX_LABEL_VALUES + 1 and OTHER in kinds
    assert sample(metrics, "clonebox_operation_duration_seconds_count", kind=OTHER, outcome="OK") == 10
    assert sample(metrics, "clonebox_audit_append_seconds_count", store=OTHER) == 1


def test_each_metrics_has_its_own_registry() -> None:
    a, b = Metrics(), Metrics()  # two daemons in one process: no duplicate-name clash
    a.observe_operation("vm.create", "OK", 1.0)
    assert sample(b, "clonebox_operation_duration_seconds_count", kind="vm.create", outcome="OK") is None


# ------------------------------------------------------------------------------------ the endpoint


def test_plaintext_endpoint_serves_on_loopback_and_stops() -> None:
    metrics = Metrics()
    metrics.observe_operation("vm.create", "OK", 1.0)
    server = start_metrics_server("127.0.0.1:0", metrics.registry, Transport(None, insecure=True))
    try:
        assert server.url == f"http://127.0.0.1:{server.port}/metrics"
        with urllib.request.urlopen(server.url, timeout=10) as resp:
            body = resp.read().decode()
        assert 'clonebox_operation_duration_seconds_count{kind="vm.create",outcome="OK"} 1.0' in body
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/other", timeout=10)
        assert err.value.code == 404
    finally:
        server.stop()
    server.stop()  # idempotent
    with pytest.raises(OSError):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        conn.request("GET", "/metrics")
        conn.getresponse()


def test_plaintext_endpoint_is_refused_off_loopback() -> None:
    with pytest.raises(InvalidArgument) as err:
        start_metrics_server("0.0.0.0:0", Metrics().registry, Transport(None, insecure=True))
    assert err.value.reason == "PLAINTEXT_NOT_LOOPBACK"
    assert "metrics_listen" in str(err.value) and "loopback" in str(err.value)


def test_bind_failure_is_a_clear_error() -> None:
    metrics = Metrics()
    first = start_metrics_server("127.0.0.1:0", metrics.registry, Transport(None, insecure=True))
    try:
        with pytest.raises(InvalidArgument) as err:
            start_metrics_server(f"127.0.0.1:{first.port}", metrics.registry, Transport(None, insecure=True))
        assert err.value.reason == "BIND_FAILED"
    finally:
        first.stop()


# ------------------------------------------------------------------------------------ TLS reloading


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _issue_into(ca: CertificateAuthority, folder: Path) -> TlsFiles:
    issued = ca.issue(make_identity("metrics.test", "controller", "ctl"), seconds=3600)
    assert issued.key is not None
    tls = TlsFiles.in_folder(folder, "controller")
    install(tls, key_pem(issued.key), cert_pem(issued.cert), ca.cert_pem)
    return tls


def _served_cert(ctx: ssl.SSLContext) -> bytes:
    # the certificate a context presents, seen by a client doing a handshake in memory
    server_in, server_out, client_in, client_out = (ssl.MemoryBIO() for _ in range(4))
    server = ctx.wrap_bio(server_in, server_out, server_side=True)
    client_ctx = ssl.create_default_context()
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    client = client_ctx.wrap_bio(client_in, client_out, server_hostname="x")
    for _ in range(10):
        for end in (client, server):
            with contextlib.suppress(ssl.SSLWantReadError, ssl.SSLError):
                end.do_handshake()
        server_in.write(client_out.read())
        client_in.write(server_out.read())
        try:
            cert = client.getpeercert(binary_form=True)
        except ValueError:  # handshake not done yet
            continue
        if cert:
            return cert
    raise AssertionError("no certificate presented")


def test_reloading_context_follows_renewed_files_at_most_once_a_second(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca", "metrics.test")
    tls = _issue_into(ca, tmp_path / "tls")
    clock = Clock()
    contexts = ReloadingContext(tls, clock=clock)
    first = contexts.current()
    first_cert = _served_cert(first)

    _issue_into(ca, tmp_path / "tls")  # renewed in place
    clock.now += 0.5
    assert contexts.current() is first  # not looked at yet
    clock.now += 0.6
    renewed = contexts.current()
    assert renewed is not first
    assert _served_cert(renewed) != first_cert
    assert ssl.DER_cert_to_PEM_cert(_served_cert(renewed)).encode() == tls.cert.read_bytes()

    # half-way through a renewal (a new key, the old certificate): keep serving the previous pair
    other = ca.issue(make_identity("metrics.test", "controller", "ctl"), seconds=3600)
    assert other.key is not None
    write_private(tls.key, key_pem(other.key))
    clock.now += 1.1
    assert contexts.current() is renewed
    write_public(tls.cert, cert_pem(other.cert))
    clock.now += 1.1
    assert contexts.current() is not renewed


def test_missing_tls_files_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition) as err:
        ReloadingContext(TlsFiles.in_folder(tmp_path, "agent"))
    assert err.value.reason == "TLS_FILE_MISSING"
