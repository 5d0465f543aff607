"""Tracing through the one place servers and channels are built: parents across hops, logs, exclusions.

Real gRPC servers on 127.0.0.1:0 (plaintext, loopback), built by ``start_server`` with the guard, and
channels from ``aio_channel``/``sync_channel``; spans go to an in-memory exporter on the process's
global TracerProvider (the one ``init_tracing`` installs).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any, cast

import grpc
import grpc.aio
import pytest
from clonebox.controller.v1 import vm_service_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from clonebox_core.errors import NotFound
from clonebox_core.rpc.server import ServerHandle, Transport, aio_channel, start_server, sync_channel
from clonebox_core.telemetry.logging import make_formatter
from clonebox_core.telemetry.tracing import export_endpoint, init_tracing, shutdown_tracing, span_ids
from tests.conftest import memory_span_exporter

pytestmark = pytest.mark.unit

INSECURE = Transport(None, insecure=True)
Req = vm_service_pb2.GetVmRequest


@pytest.fixture(scope="module")
def exporter() -> Iterator[InMemorySpanExporter]:
    memory = cast(InMemorySpanExporter, memory_span_exporter())
    yield memory
    memory.shutdown()


@pytest.fixture
def spans(exporter: InMemorySpanExporter) -> InMemorySpanExporter:
    exporter.clear()
    return exporter


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(make_formatter("test", as_json=True))
    root, level = logging.getLogger(), logging.getLogger().level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def _echo_service(name: str, behavior: Any) -> tuple[Any, None, str]:
    def add(_servicer: None, server: grpc.aio.Server) -> None:
        handler = grpc.unary_unary_rpc_method_handler(
            behavior, request_deserializer=Req.FromString, response_serializer=Req.SerializeToString
        )
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, {"Echo": handler}),))

    return add, None, name


def _call(channel: Any, service: str) -> Any:
    return channel.unary_unary(
        f"/{service}/Echo", request_serializer=Req.SerializeToString, response_deserializer=Req.FromString
    )


@pytest.fixture
async def two_hops() -> AsyncIterator[tuple[ServerHandle, ServerHandle]]:
    """Server A (test.Front) calls server B (test.Back) over an aio channel, as the controller calls agents."""
    back_log = logging.getLogger("test.back")

    async def back(request: Any, _context: Any) -> Any:
        back_log.info("back handled %s", request.name)
        if request.name == "missing":
            raise NotFound("no such thing", reason="THING_NOT_FOUND")
        if request.name == "crash":
            raise RuntimeError("unexpected")
        return request

    b = await start_server("127.0.0.1:0", [_echo_service("test.Back", back)], INSECURE)
    channel = aio_channel(f"127.0.0.1:{b.port}", INSECURE)

    async def front(request: Any, _context: Any) -> Any:
        # work in a task started by the call (VmManager._spawn style) stays in the call's trace
        async def later() -> Any:
            return await _call(channel, "test.Back")(request, timeout=10)

        return await asyncio.create_task(later())

    a = await start_server("127.0.0.1:0", [_echo_service("test.Front", front)], INSECURE)
    try:
        yield a, b
    finally:
        await channel.close()
        await a.stop(0)
        await b.stop(0)


def _by_name(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, (name, [s.name for s in spans])
    return found[0]


def _parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


async def test_context_flows_client_to_server_to_server(
    two_hops: tuple[ServerHandle, ServerHandle], spans: InMemorySpanExporter, log_lines: io.StringIO
) -> None:
    a, _b = two_hops
    tracer = trace.get_tracer("test")
    async with aio_channel(f"127.0.0.1:{a.port}", INSECURE) as ch:
        with tracer.start_as_current_span("root") as root:
            await _call(ch, "test.Front")(Req(name="web"), timeout=10)
    got = spans.get_finished_spans()
    root_s = _by_name(got, "root")
    kinds = {(s.name, s.kind) for s in got}
    assert ("/test.Front/Echo", SpanKind.CLIENT) in kinds and ("/test.Front/Echo", SpanKind.SERVER) in kinds
    front_client = next(s for s in got if s.name == "/test.Front/Echo" and s.kind == SpanKind.CLIENT)
    front_server = next(s for s in got if s.name == "/test.Front/Echo" and s.kind == SpanKind.SERVER)
    back_client = next(s for s in got if s.name == "/test.Back/Echo" and s.kind == SpanKind.CLIENT)
    back_server = next(s for s in got if s.name == "/test.Back/Echo" and s.kind == SpanKind.SERVER)
    assert {s.context.trace_id for s in got} == {root.get_span_context().trace_id}
    assert _parent_id(front_client) == root_s.context.span_id
    assert _parent_id(front_server) == front_client.context.span_id
    assert front_server.parent is not None and front_server.parent.is_remote
    assert _parent_id(back_client) == front_server.context.span_id  # made in a task the call started
    assert _parent_id(back_server) == back_client.context.span_id
    assert back_server.attributes is not None and back_server.attributes["clonebox.resource"] == "web"
    # the handler's log line carries the ids of the server span it ran in
    (line,) = [json.loads(x) for x in log_lines.getvalue().splitlines() if "back handled" in x]
    assert line["trace_id"] == format(root.get_span_context().trace_id, "032x")
    assert line["span_id"] == format(back_server.context.span_id, "016x")
    assert line["resource"] == "web"


async def test_guard_runs_inside_the_server_span(
    two_hops: tuple[ServerHandle, ServerHandle], spans: InMemorySpanExporter, log_lines: io.StringIO
) -> None:
    _a, b = two_hops
    async with aio_channel(f"127.0.0.1:{b.port}", INSECURE) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await _call(ch, "test.Back")(Req(name="missing"), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as crash:
            await _call(ch, "test.Back")(Req(name="crash"), timeout=10)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND and crash.value.code() == grpc.StatusCode.INTERNAL
    # a server span ends when the server's side of the call ends, which can be just after the client
    # already has the status
    for _ in range(500):
        servers = [s for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER]
        if len(servers) >= 2:
            break
        await asyncio.sleep(0.01)
    assert len(servers) == 2
    not_found, internal = servers
    for span, code in ((not_found, 5), (internal, 13)):
        assert span.status.status_code == StatusCode.ERROR
        assert span.attributes is not None and span.attributes["rpc.grpc.status_code"] == code
    assert not_found.attributes is not None and not_found.attributes["clonebox.error.reason"] == "THING_NOT_FOUND"
    # the guard's own log line (the traceback of an unexpected error) is inside the server span
    (line,) = [json.loads(x) for x in log_lines.getvalue().splitlines() if "unexpected error in" in x]
    assert line["span_id"] == format(internal.context.span_id, "016x") and "RuntimeError" in line["exception"]


async def test_blocking_channel_carries_context(
    two_hops: tuple[ServerHandle, ServerHandle], spans: InMemorySpanExporter
) -> None:
    _a, b = two_hops
    tracer = trace.get_tracer("test")

    def cli_command() -> None:
        with sync_channel(f"127.0.0.1:{b.port}", INSECURE) as ch, tracer.start_as_current_span("clonebox vm show"):
            _call(ch, "test.Back")(Req(name="web"), timeout=10)

    await asyncio.to_thread(cli_command)
    got = spans.get_finished_spans()
    root = _by_name(got, "clonebox vm show")
    client = next(s for s in got if s.kind == SpanKind.CLIENT)
    server = next(s for s in got if s.kind == SpanKind.SERVER)
    assert _parent_id(client) == root.context.span_id and _parent_id(server) == client.context.span_id
    assert server.context.trace_id == root.context.trace_id


async def test_health_checks_are_not_traced(
    two_hops: tuple[ServerHandle, ServerHandle], spans: InMemorySpanExporter
) -> None:
    a, _b = two_hops
    tracer = trace.get_tracer("test")
    async with aio_channel(f"127.0.0.1:{a.port}", INSECURE) as ch:
        with tracer.start_as_current_span("probe"):
            reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert [s.name for s in spans.get_finished_spans()] == ["probe"]


def test_reflection_and_health_are_filtered_out() -> None:
    from clonebox_core.rpc.server import _traced

    class Details:
        def __init__(self, method: str) -> None:
            self.method = method

    assert not _traced(Details("/grpc.health.v1.Health/Check"))
    assert not _traced(Details("/grpc.health.v1.Health/Watch"))
    assert not _traced(Details("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"))
    assert not _traced(Details("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"))
    assert _traced(Details("/clonebox.controller.v1.VmService/GetVm"))

    class ClientDetails:  # aio client calls may carry the method as bytes (grpc issue 31092)
        def __init__(self, method: bytes) -> None:
            self.method = method

    class SyncClientInfo:  # sync client interceptors see full_method
        def __init__(self, full_method: str) -> None:
            self.full_method = full_method

    assert not _traced(ClientDetails(b"/grpc.health.v1.Health/Check"))
    assert _traced(ClientDetails(b"/clonebox.agent.v1.AgentService/CreateVm"))
    assert not _traced(SyncClientInfo("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"))
    assert _traced(SyncClientInfo("/clonebox.controller.v1.VmService/GetVm"))
    # a service whose name merely contains an untraced one is traced
    assert _traced(Details("/my.grpc.health.v1.Health/Check"))


def test_export_only_when_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_TRACES_EXPORTER"):
        monkeypatch.delenv(var, raising=False)
    assert export_endpoint() == ""
    assert export_endpoint("http://cfg:4317") == "http://cfg:4317"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://all:4317")
    assert export_endpoint() == "http://all:4317"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://traces:4317")
    assert export_endpoint() == "http://traces:4317"
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert export_endpoint("http://cfg:4317") == ""


def test_private_provider_honours_service_and_sdk_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(var, raising=False)
    memory = InMemorySpanExporter()
    provider = init_tracing("clonebox-x", exporter=memory, set_global=False)
    assert provider.resource.attributes["service.name"] == "clonebox-x"
    with provider.get_tracer("t").start_as_current_span("s") as span:
        assert span_ids() is not None
    assert shutdown_tracing(5.0, provider)
    assert [s.name for s in memory.get_finished_spans()] == ["s"] and span_ids(span) is not None
    assert span_ids() is None  # outside any span

    monkeypatch.setenv("OTEL_SERVICE_NAME", "renamed")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=lab")
    renamed = init_tracing("clonebox-x", set_global=False)
    assert renamed.resource.attributes["service.name"] == "renamed"
    assert renamed.resource.attributes["deployment.environment"] == "lab"

    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    disabled = init_tracing("clonebox-x", set_global=False)
    with disabled.get_tracer("t").start_as_current_span("s") as off:
        assert not off.is_recording() and span_ids() is None


@pytest.mark.parametrize("output", ["table", "json"])
def test_cli_prints_the_trace_id_even_when_the_command_fails(output: str, tmp_path: Any) -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "CLONEBOX_"))}
    env["XDG_CONFIG_HOME"] = str(tmp_path)  # no dev fleet recorded, no user certificate
    args = ["--controller", "127.0.0.1:1", "--insecure", "--trace", "-o", output, "host", "list"]
    r = subprocess.run(
        [sys.executable, "-m", "clonebox_cli.main", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert r.returncode == 9, r.stderr  # unavailable
    if output == "json":
        (line,) = [x for x in r.stderr.splitlines() if x.startswith('{"trace_id"')]
        trace_id = json.loads(line)["trace_id"]
    else:
        (line,) = [x for x in r.stderr.splitlines() if x.startswith("trace id: ")]
        trace_id = line.removeprefix("trace id: ")
    assert len(trace_id) == 32 and int(trace_id, 16) != 0
