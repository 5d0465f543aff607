"""The one place gRPC servers and channels are built, so that mTLS is one change here.

Plaintext is allowed only on loopback addresses for now; anything else is refused with a clear error.
Every server gets the error interceptor, ``grpc.health.v1`` and server reflection.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from clonebox_core.errors import InvalidArgument
from clonebox_core.rpc.status import ErrorInterceptor

#: keep idle streams (agent sessions, watches) alive through NATs and detect dead peers
_KEEPALIVE_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
]


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


def require_loopback(address: str) -> None:
    """Plaintext gRPC is only allowed on loopback until mTLS lands."""
    host, _ = split_host_port(address)
    if not is_loopback(host):
        raise InvalidArgument(
            f"address {address!r}: plaintext gRPC is only allowed on loopback "
            "(127.0.0.1, [::1], localhost) until mTLS is configured",
            reason="PLAINTEXT_NOT_LOOPBACK",
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


async def start_server(
    address: str,
    registrations: Sequence[tuple[Callable[[Any, grpc.aio.Server], None], Any, str]],
) -> ServerHandle:
    """Build, bind and start an aio server.

    ``registrations`` holds ``(add_XServicer_to_server, servicer, full_service_name)`` triples.
    Binding ``host:0`` picks a free port, reported in the handle.
    """
    require_loopback(address)
    server = grpc.aio.server(interceptors=[ErrorInterceptor()], options=_KEEPALIVE_OPTIONS)
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
    port = server.add_insecure_port(address)
    if port == 0:
        raise InvalidArgument(f"cannot bind {address}", reason="BIND_FAILED")
    await server.start()
    handle = ServerHandle(server=server, port=port, health=health_servicer, service_names=names)
    await handle.set_serving(True)
    return handle


def aio_channel(target: str) -> grpc.aio.Channel:
    """An asyncio client channel to ``target`` (daemon to daemon)."""
    require_loopback(target)
    return grpc.aio.insecure_channel(target, options=_KEEPALIVE_OPTIONS)


def sync_channel(target: str) -> grpc.Channel:
    """A blocking client channel to ``target`` (the CLI)."""
    require_loopback(target)
    return grpc.insecure_channel(target, options=_KEEPALIVE_OPTIONS)
