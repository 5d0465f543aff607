"""
Baseline of ``bench_getvm``: a bare grpcio aio server with one generic handler that echoes bytes.

No interceptors, no health or reflection, no protobuf: the cheapest unary RPC grpcio's asyncio server
can answer. ``python benchmarks/echo_server.py 127.0.0.1:PORT`` serves until SIGTERM; ``start_echo``
does the same in the caller's event loop.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import grpc
import grpc.aio

SERVICE = "clonebox.bench.v1.Echo"
METHOD = f"/{SERVICE}/Echo"


async def _echo(request: bytes, _context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    return request


async def start_echo(address: str) -> tuple[grpc.aio.Server, int]:
    """Start the echo server on ``address`` (port 0 picks one); returns it and its port."""
    if not address.startswith(("127.", "[::1]", "localhost")):
        raise ValueError("the echo server listens on loopback only")
    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(_echo)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(address)
    await server.start()
    return server, port


async def _serve(address: str) -> None:
    server, _port = await start_echo(address)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0.5)


if __name__ == "__main__":
    asyncio.run(_serve(sys.argv[1]))
