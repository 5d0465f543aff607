"""OpenTelemetry tracing of every process: one SDK TracerProvider, OTLP/gRPC export only when configured.

``init_tracing(service)`` installs the global SDK TracerProvider (always: span and trace ids exist for log
correlation even when nothing is exported) and, when an endpoint is configured, a batch processor with the
OTLP/gRPC exporter. The standard environment variables apply:

- ``OTEL_SDK_DISABLED=true``: no spans at all (non-recording, no ids);
- ``OTEL_SERVICE_NAME`` / ``OTEL_RESOURCE_ATTRIBUTES``: override the service name and add attributes;
- ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_ENDPOINT``: turn export on (or the
  ``tracing.otlp_endpoint`` config key); ``OTEL_EXPORTER_OTLP_[TRACES_]INSECURE``, ``_HEADERS``,
  ``_CERTIFICATE``, ``_TIMEOUT``, ``_COMPRESSION`` configure the exporter; ``OTEL_TRACES_EXPORTER=none``
  turns export off whatever else is set;
- ``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG``: the sampler (default parentbased_always_on);
- ``OTEL_BSP_*``: batch processor sizes and delays; ``OTEL_PROPAGATORS``: W3C tracecontext by default.

gRPC servers and channels get the instrumentation's interceptors in ``clonebox_core.rpc.server``; calls to
``grpc.health.v1.Health`` and server reflection are not traced (:data:`UNTRACED_SERVICES`).

This module imports no grpc: the libvirt adapter and use cases may use it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from importlib import metadata
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from pydantic import BaseModel, ConfigDict

from clonebox_core.secret import MASK, Secret

if TYPE_CHECKING:
    from clonebox_core.rpc.status import CallRecord

log = logging.getLogger(__name__)

#: gRPC services whose calls are never traced (probes and tooling would drown the real traces)
UNTRACED_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.")

_ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")

# the provider init_tracing installed in this process (a list: no ``global`` statement needed)
_installed: list[TracerProvider] = []


class TracingConfig(BaseModel):
    """The ``tracing:`` section of a daemon's config (the OTEL_* environment variables apply too)."""

    model_config = ConfigDict(extra="forbid")
    #: OTLP/gRPC collector, e.g. ``http://otel-collector:4317``; "" = OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT or none
    otlp_endpoint: str = ""
    #: plaintext to the collector (default: from the endpoint's scheme / OTEL_EXPORTER_OTLP_INSECURE)
    otlp_insecure: bool | None = None


def export_endpoint(configured: str = "") -> str:
    """Where spans go: the configured endpoint, else the OTLP environment variables; "" for nowhere."""
    if os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return ""
    if configured:
        return configured
    for var in _ENDPOINT_VARS:
        value = os.environ.get(var, "").strip()
        if value:
            return value
    return ""


def build_resource(service: str) -> Resource:
    """``service.name`` = ``service`` unless OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES name one."""
    resource = Resource.create({})
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        own: dict[str, str] = {SERVICE_NAME: service}
        with contextlib.suppress(metadata.PackageNotFoundError):  # a bare checkout has no version
            own[SERVICE_VERSION] = metadata.version("clonebox")
        resource = resource.merge(Resource(own))
    return resource


def init_tracing(
    service: str,
    config: TracingConfig | None = None,
    *,
    exporter: SpanExporter | None = None,
    set_global: bool = True,
) -> TracerProvider:
    """Build the process's TracerProvider (and make it the global one when ``set_global``).

    ``config`` is the daemon's ``tracing:`` section (its endpoint wins over the environment's);
    ``exporter`` replaces the OTLP exporter (tests, benchmarks).
    """
    provider = TracerProvider(resource=build_resource(service), shutdown_on_exit=False)
    if exporter is None:
        config = config or TracingConfig()
        endpoint = export_endpoint(config.otlp_endpoint)
        if endpoint:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter(endpoint=endpoint, insecure=config.otlp_insecure)
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    if set_global:
        if _installed:
            # OpenTelemetry's global provider can be set once per process (the CLI's in-process tests
            # run many commands): keep the first
            return _installed[0]
        trace.set_tracer_provider(provider)
        _installed.append(provider)
    return provider


def flush_tracing(timeout: float = 3.0, provider: TracerProvider | None = None) -> bool:
    """Export what is buffered, waiting at most ``timeout`` seconds; True when it finished."""
    return _bounded(timeout, provider, shutdown=False)


def shutdown_tracing(timeout: float = 5.0, provider: TracerProvider | None = None) -> bool:
    """Export what is buffered and stop, waiting at most ``timeout`` seconds; True when it finished.

    The SDK's own flush and shutdown wait for the exporter (up to its timeout and retries, longer when
    the collector is down), so they run on a daemon thread that the process does not wait for beyond
    ``timeout``.
    """
    return _bounded(timeout, provider, shutdown=True)


def _bounded(timeout: float, provider: TracerProvider | None, *, shutdown: bool) -> bool:
    target = provider or (_installed[0] if _installed else None)
    if target is None:
        return True

    def finish() -> None:
        try:
            target.force_flush()
            if shutdown:
                target.shutdown()
        except Exception:  # exporting is best effort; never fail a command or a shutdown on it
            log.warning("exporting spans failed", exc_info=True)

    worker = threading.Thread(target=finish, name="otel-flush", daemon=True)
    worker.start()
    worker.join(timeout)
    return not worker.is_alive()


def span_ids(span: Span | None = None) -> tuple[str, str] | None:
    """(trace id, span id) in hex of ``span`` (default: the current one), or None outside a valid span."""
    ctx = (span or trace.get_current_span()).get_span_context()
    if not ctx.is_valid:
        return None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


def safe_attributes(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """Span attributes with every Secret masked (the SDK would drop them; this records the mask)."""
    return {k: MASK if isinstance(v, Secret) else v for k, v in attributes.items()}


@contextmanager
def client_span(tracer: trace.Tracer, name: str, attributes: Mapping[str, Any] | None = None) -> Iterator[Span]:
    """A CLIENT span around a call to another system (libvirt, ...); exceptions mark it as failed."""
    with tracer.start_as_current_span(name, kind=SpanKind.CLIENT, attributes=safe_attributes(attributes or {})) as span:
        yield span


class TracingObserver:
    """A ``CallObserver`` for the guard: the server span gets the outcome and who called.

    The instrumentation's aio server interceptor sees only ``context.abort``; the guard aborts with a
    full status (``abort_with_status``), so the code, the CloneBox reason and the caller are put on the
    span here, while it is still the current span.
    """

    async def call_finished(self, record: CallRecord) -> None:
        """Annotate the current (server) span with ``record``."""
        span = trace.get_current_span()
        if not span.is_recording():
            return
        if record.caller is not None:
            span.set_attribute("enduser.id", record.caller.spiffe_id)
        if record.code != "OK":
            span.set_attribute("rpc.grpc.status_code", _GRPC_CODES.get(record.code, 2))
            span.set_attribute("clonebox.error.reason", record.reason)
            span.set_status(Status(StatusCode.ERROR, f"{record.code} {record.reason}"))


#: gRPC status code numbers by name (rpc.grpc.status_code is numeric)
_GRPC_CODES = {
    "OK": 0,
    "CANCELLED": 1,
    "UNKNOWN": 2,
    "INVALID_ARGUMENT": 3,
    "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5,
    "ALREADY_EXISTS": 6,
    "PERMISSION_DENIED": 7,
    "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9,
    "ABORTED": 10,
    "OUT_OF_RANGE": 11,
    "UNIMPLEMENTED": 12,
    "INTERNAL": 13,
    "UNAVAILABLE": 14,
    "DATA_LOSS": 15,
    "UNAUTHENTICATED": 16,
}


def start_stream_span(method: str, metadata: Iterable[tuple[str, Any]]) -> Span | None:
    """Open the server span of a streamed-response call and make it current for the call's task.

    Returns None for untraced services (health, reflection). The context is attached and never
    detached: the call's task ends with the call, and detaching after a ``yield`` fails when gRPC
    closes the stream from another context (a client cancelling a watch). The caller ends the span.
    """
    full = method.lstrip("/")
    service, _, name = full.rpartition("/")
    if service.startswith(UNTRACED_SERVICES):
        return None
    parent = propagate.extract({k: v for k, v in metadata if isinstance(v, str)})
    span = trace.get_tracer("clonebox_core.rpc").start_span(
        full,
        context=parent,
        kind=SpanKind.SERVER,
        attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
    )
    otel_context.attach(trace.set_span_in_context(span, parent))
    return span
