"""A real OTLP/gRPC trace receiver (``TraceService/Export``) on 127.0.0.1 for e2e tests.

Shared by ``test_tracing.py`` (the span tree of one trace) and ``test_secrets_real.py`` (no secret in any
span): the daemons' and the CLI's spans are exported to it and read back.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

SERVER, CLIENT = 2, 3  # opentelemetry.proto.trace.v1.Span.SpanKind


@dataclass(frozen=True)
class Span:
    service: str
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    kind: int
    attributes: dict[str, Any] = field(hash=False, compare=False)
    status_message: str = ""


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Collects every ExportTraceServiceRequest it is sent."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self._lock = threading.Lock()

    def Export(self, request: Any, context: Any) -> Any:
        with self._lock:
            self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[Span]:
        with self._lock:
            requests = list(self.requests)
        out = []
        for request in requests:
            for rs in request.resource_spans:
                resource = {a.key: a.value.string_value for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        out.append(
                            Span(
                                resource.get("service.name", ""),
                                s.trace_id.hex(),
                                s.span_id.hex(),
                                s.parent_span_id.hex(),
                                s.name,
                                s.kind,
                                {a.key: _value(a.value) for a in s.attributes},
                                s.status.message,
                            )
                        )
        return out

    def raw(self) -> bytes:
        """Every request as received (serialized): names, attributes, events, links, resources."""
        with self._lock:
            return b"".join(r.SerializeToString() for r in self.requests)


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


@contextmanager
def otlp_receiver() -> Iterator[tuple[Receiver, int]]:
    """A receiver serving on 127.0.0.1 (a free port) and that port, stopped at the end."""
    collector = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield collector, port
    finally:
        server.stop(0)


def otlp_env(port: int) -> dict[str, str]:
    """Environment that makes the daemons and the CLI export their spans to the receiver on ``port``."""
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "200",  # daemons send their spans within 0.2 s
    }
