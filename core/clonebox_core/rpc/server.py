"""The one place gRPC servers and channels are built.

Every server and channel uses mTLS with the fleet's CA, except when ``insecure`` is asked for
explicitly, which is allowed only on loopback addresses. Every server gets the guard interceptor
(authentication, the policy table, error mapping), ``grpc.health.v1`` and server reflection.

Tracing: every server has OpenTelemetry's aio server interceptor *outside* the guard (so the guard's log
lines and observers run inside the server span, whose parent comes from the caller's W3C ``traceparent``
metadata), and every channel has the matching client interceptors, which put the current context into
that metadata. Health checks and reflection are not traced (``UNTRACED_SERVICES``).
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor, client_interceptor
from opentelemetry.instrumentation.grpc.grpcext import intercept_channel

from clonebox_core.errors import InvalidArgument
from clonebox_core.rpc.auth import Authorizer
from clonebox_core.rpc.status import CallObserver, ErrorInterceptor
from clonebox_core.rpc.tls import TlsFiles, channel_credentials, server_credentials, server_only_credentials
from clonebox_core.telemetry.tracing import UNTRACED_SERVICES, TracingObserver

#: the largest message either side accepts; per-RPC request limits are tighter (see status.py)
MAX_MESSAGE_BYTES = 8 * 1024 * 1024

#: keep idle streams (agent sessions, watches) alive through NATs and detect dead peers
_KEEPALIVE_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
]


@functools.lru_cache(maxsize=1024)
def _traced_method(method: str) -> bool:
    service = method.lstrip("/").rpartition("/")[0]
    return not service.startswith(UNTRACED_SERVICES)


def _traced(details: Any) -> bool:
    """
    Which calls get spans: everything but health checks and reflection.

    Both interceptors run it on every call, client and server side; OpenTelemetry's own filters split
    the method name anew each time (a few per cent of an agent's CPU per create), so the answer is kept
    per method name. Server calls name the method in ``method``, aio client calls too (bytes in some
    grpc versions), sync client calls in ``full_method``.
    """
    method = getattr(details, "method", None)
    if method is None:
        method = getattr(details, "full_method", "")
    return _traced_method(method.decode() if isinstance(method, bytes) else str(method))


def _aio_client_interceptors() -> list[Any]:
    # the global TracerProvider, looked up per span (init_tracing may run after a channel is built).
    # Client-streaming calls (only the agent's long-lived Connect session) are left out: the
    # instrumentation wraps the request iterator in a generator that gRPC abandons while it runs
    # when the server ends the call early, and asyncio then logs errors; a session-long span says
    # nothing anyway.
    streaming = (grpc.aio.StreamUnaryClientInterceptor, grpc.aio.StreamStreamClientInterceptor)
    return [
        i
        for i in aio_client_interceptors(filter_=_traced)  # type: ignore[no-untyped-call]
        if not isinstance(i, streaming)
    ]


def _server_interceptor() -> Any:
    return _TracingInterceptor()


class _TracingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpcio has no stubs
    """Server spans: OpenTelemetry's interceptor for unary responses; the guard opens them for streams.

    The instrumentation attaches the span's context around a streaming handler's ``yield`` and detaches
    it when the generator closes; a client that cancels a stream makes gRPC close the generator from
    another context, the detach fails and OpenTelemetry logs an error on every cancelled watch. The
    guard (``rpc/status.py``) therefore opens the span of a streamed response itself, in the generator
    it already runs, and never detaches a context across a ``yield``.
    """

    def __init__(self) -> None:
        self._otel = aio_server_interceptor(filter_=_traced)  # type: ignore[no-untyped-call]

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """Trace the call unless it is a health check or reflection."""
        handler = await continuation(handler_call_details)
        if handler is None or not _traced(handler_call_details):
            return handler
        if handler.unary_stream or handler.stream_stream:
            return handler

        async def known(_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
            return handler

        return await self._otel.intercept_service(known, handler_call_details)


def split_host_port(address: str) -> tuple[str, int]:
    """``"127.0.0.1:7000"`` / ``"[::1]:7000"`` -> (host, port); a clear error otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise InvalidArgument(f"address {address!r} must be HOST:PORT", reason="INVALID_ADDRESS")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    """True for localhost and loopback IPs."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_loopback(address: str, *, field: str = "address", what: str = "gRPC (--insecure)") -> None:
    """Plaintext (``insecure``) is allowed on loopback only: gRPC, and the metrics endpoint (``what``)."""
    host, _ = split_host_port(address)
    if not is_loopback(host):
        raise InvalidArgument(
            f"{field} {address!r}: plaintext {what} is only allowed on loopback "
            "(127.0.0.1, [::1], localhost); configure TLS files for anything else",
            reason="PLAINTEXT_NOT_LOOPBACK",
            metadata={"field": field} if field != "address" else {},
        )


@dataclass(frozen=True)
class Transport:
    """How a process talks: mTLS with its files, or explicitly insecure on loopback."""

    tls: TlsFiles | None = None
    insecure: bool = False

    def __post_init__(self) -> None:
        if self.tls is None and not self.insecure:
            raise InvalidArgument(
                "no TLS files configured: give ca/cert/key (see 'clonebox pki') or ask for insecure "
                "loopback-only plaintext explicitly",
                reason="TLS_REQUIRED",
            )


@dataclass
class ServerHandle:
    """A started server: its bound port, the health servicer, and how to stop it."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    service_names: list[str] = field(default_factory=list)

    async def set_serving(self, serving: bool) -> None:
        """Set every registered service (and the overall "" entry) to SERVING or NOT_SERVING."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    async def stop(self, grace: float = 2.0) -> None:
        """Stop accepting calls and end running ones after ``grace`` seconds."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


def make_transport(tls_dir: str, file_name: str, insecure: bool) -> Transport:
    """The transport a daemon or the CLI configured: ``tls_dir/{ca.crt,NAME.crt,NAME.key}`` or insecure."""
    if insecure:
        return Transport(None, insecure=True)
    if not tls_dir:
        raise InvalidArgument(
            "tls_dir: no TLS folder configured; point it at a folder with ca.crt and the certificate "
            "('clonebox pki issue'), or set insecure for loopback-only plaintext",
            reason="TLS_REQUIRED",
            metadata={"field": "tls_dir"},
        )
    return Transport(TlsFiles.in_folder(Path(tls_dir), file_name))


def trust_domain_of(transport: Transport) -> str:
    """Trust domain of the process's own certificate ("" when insecure)."""
    return transport.tls.identity().trust_domain if transport.tls is not None else ""


async def start_server(
    address: str,
    registrations: Sequence[tuple[Callable[[Any, grpc.aio.Server], None], Any, str]],
    transport: Transport,
    authorizer: Authorizer | None = None,
    *,
    client_auth: bool = True,
    observers: Sequence[CallObserver] = (),
) -> ServerHandle:
    """Build, bind and start an aio server.

    ``registrations`` holds ``(add_XServicer_to_server, servicer, full_service_name)`` triples.
    Binding ``host:0`` picks a free port, reported in the handle. With TLS, ``authorizer`` decides who
    may call what (one is built from the certificate's trust domain when none is given). ``observers``
    hear about every finished call (metrics, audit).
    """
    if transport.tls is None:
        require_loopback(address)
        authorizer = None
    elif not client_auth:
        authorizer = None  # the enrolment port: the join token authenticates, inside the RPC
    elif authorizer is None:
        authorizer = Authorizer(transport.tls.identity().trust_domain)
    # the first interceptor is the outermost: the span exists before the guard runs and ends after it
    guard = ErrorInterceptor(authorizer, [*observers, TracingObserver()])
    server = grpc.aio.server(interceptors=[_server_interceptor(), guard], options=_KEEPALIVE_OPTIONS)
    names: list[str] = []
    for add, servicer, name in registrations:
        add(servicer, server)
        names.append(name)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server,
    )
    if transport.tls is None:
        port = server.add_insecure_port(address)
    elif client_auth:
        port = server.add_secure_port(address, server_credentials(transport.tls))
    else:
        port = server.add_secure_port(address, server_only_credentials(transport.tls))
    if port == 0:
        raise InvalidArgument(f"cannot bind {address}", reason="BIND_FAILED")
    await server.start()
    handle = ServerHandle(server=server, port=port, health=health_servicer, service_names=names)
    await handle.set_serving(True)
    return handle


def _name_override(server_name: str | None) -> list[tuple[str, Any]]:
    # peers verify the role-bound DNS name in the certificate, not whatever address they dialled
    return [("grpc.ssl_target_name_override", server_name)] if server_name else []


#: a daemon's channel gets connections of its own: channels to one address otherwise share them, and with
#: them their connect back-off, so a channel dialled afresh to a restarted peer would still wait it out
_OWN_CONNECTIONS: list[tuple[str, Any]] = [("grpc.use_local_subchannel_pool", 1)]


def aio_channel(target: str, transport: Transport, server_name: str | None = None) -> grpc.aio.Channel:
    """An asyncio client channel to ``target`` (daemon to daemon), verifying ``server_name``."""
    if transport.tls is None:
        require_loopback(target)
        return grpc.aio.insecure_channel(
            target, options=_KEEPALIVE_OPTIONS + _OWN_CONNECTIONS, interceptors=_aio_client_interceptors()
        )
    return grpc.aio.secure_channel(
        target,
        channel_credentials(transport.tls),
        options=_KEEPALIVE_OPTIONS + _OWN_CONNECTIONS + _name_override(server_name),
        interceptors=_aio_client_interceptors(),
    )


def bootstrap_channel(target: str, ca_pem: bytes, server_name: str) -> grpc.aio.Channel:
    """A channel that verifies the server against ``ca_pem`` and presents no certificate.

    Used once by a new host to enrol (it has a join token and the CA, not yet a certificate).
    """
    creds = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    return grpc.aio.secure_channel(
        target, creds, options=_KEEPALIVE_OPTIONS + _name_override(server_name), interceptors=_aio_client_interceptors()
    )


def sync_channel(target: str, transport: Transport, server_name: str | None = None) -> grpc.Channel:
    """A blocking client channel to ``target`` (the CLI), verifying ``server_name``."""
    if transport.tls is None:
        require_loopback(target)
        channel = grpc.insecure_channel(target, options=_KEEPALIVE_OPTIONS)
    else:
        channel = grpc.secure_channel(
            target, channel_credentials(transport.tls), options=_KEEPALIVE_OPTIONS + _name_override(server_name)
        )
    interceptor = client_interceptor(filter_=_traced)  # type: ignore[no-untyped-call]
    traced: grpc.Channel = intercept_channel(channel, interceptor)  # type: ignore[no-untyped-call]
    return traced
