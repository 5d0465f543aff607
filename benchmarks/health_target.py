"""
The VMs' services for ``bench_health``: one process answering on every fake VM's loopback address.

An agent with ``fake_probe_network: 127.77.0.0/16`` probes each running VM at its own address in that
network. This process listens on a range of those addresses, on one HTTP port and one TCP port (one
listening socket per address per port):

- HTTP: any request gets ``HTTP/1.0 200 OK`` with the body ``ok``, then the connection is closed;
- TCP: a connection is accepted and closed at once.

It is controlled by lines on stdin and answers each with one line on stdout:

- ``down ADDR``: close ADDR's HTTP listener (new connections are refused from then on), answers
  ``down ADDR MONO WALL``: ``time.monotonic()`` and ``time.time()`` right after the socket was closed
  (CLOCK_MONOTONIC is shared by the processes of one machine, so the caller can compare);
- ``up ADDR``: listen again, answers ``up ADDR MONO WALL`` the same way;
- ``stats``: answers ``stats HTTP_REQUESTS TCP_CONNECTIONS`` (counted since the start);
- ``quit`` (or the end of stdin, e.g. when the benchmark died): exit.

The first line it prints is ``ready HTTP_PORT TCP_PORT ADDRESSES`` once every listener is up; an
error is ``error MESSAGE``. Ports 0 (the default) pick a free port on the first address and use it on
every other one. Only loopback addresses are accepted: nothing here is reachable from elsewhere.

    python benchmarks/health_target.py --network 127.77.0.0/16 --first 2 --count 1000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import signal
import sys
import time

RESPONSE = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
#: a probe's request fits in far less; anything longer is answered all the same
MAX_REQUEST = 16 * 1024
#: pending connections per listener: probes come in bursts when their schedules line up
BACKLOG = 128


class Counters:
    """Requests served, for ``stats``."""

    http = 0
    tcp = 0


class HttpServe(asyncio.Protocol):
    """Answer one HTTP request with 200 "ok" and close (what the agent's HTTP/1.0 probe expects)."""

    def __init__(self, counters: Counters) -> None:
        """Count into ``counters``."""
        self.counters = counters
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Remember the transport."""
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        """Answer once the request head is complete."""
        self.buffer += data
        if self.transport is not None and (b"\r\n\r\n" in self.buffer or len(self.buffer) > MAX_REQUEST):
            self.counters.http += 1
            self.transport.write(RESPONSE)
            self.transport.close()
            self.transport = None


class TcpServe(asyncio.Protocol):
    """Accept and close: the TCP probe only connects."""

    def __init__(self, counters: Counters) -> None:
        """Count into ``counters``."""
        self.counters = counters

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Count and close."""
        self.counters.tcp += 1
        transport.close()


class Target:
    """Every listener, by address, and the control commands."""

    def __init__(self, addresses: list[str], http_port: int, tcp_port: int) -> None:
        """Listen on ``addresses`` (not yet: see :meth:`start`)."""
        self.addresses = addresses
        self.http_port = http_port
        self.tcp_port = tcp_port
        self.counters = Counters()
        self.http: dict[str, asyncio.Server] = {}
        self.tcp: dict[str, asyncio.Server] = {}

    async def _listen(self, address: str, port: int, http: bool) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        counters = self.counters
        factory = (lambda: HttpServe(counters)) if http else (lambda: TcpServe(counters))
        return await loop.create_server(factory, address, port, backlog=BACKLOG, reuse_address=True)

    async def start(self) -> None:
        """Listen everywhere; a port of 0 is chosen on the first address and used on the rest."""
        first = self.addresses[0]
        for http in (True, False):
            port = self.http_port if http else self.tcp_port
            server = await self._listen(first, port, http)
            port = server.sockets[0].getsockname()[1]
            servers = self.http if http else self.tcp
            servers[first] = server
            for address in self.addresses[1:]:
                servers[address] = await self._listen(address, port, http)
            if http:
                self.http_port = port
            else:
                self.tcp_port = port

    async def command(self, line: str) -> str:
        """One control line -> its answer."""
        words = line.split()
        if not words:
            return "error empty command"
        verb, args = words[0], words[1:]
        if verb == "stats":
            return f"stats {self.counters.http} {self.counters.tcp}"
        if verb in ("down", "up") and len(args) == 1:
            address = args[0]
            if address not in self.tcp:
                return f"error {address} is not one of this target's addresses"
            if verb == "down":
                server = self.http.pop(address, None)
                if server is None:
                    return f"error {address} is already down"
                # closes the listening socket at once: connects from now on are refused (RST)
                server.close()
            else:
                if address in self.http:
                    return f"error {address} is already up"
                self.http[address] = await self._listen(address, self.http_port, True)
            return f"{verb} {address} {time.monotonic():.6f} {time.time():.6f}"
        return f"error unknown command {line.strip()!r}"

    def close(self) -> None:
        """Close every listener."""
        for server in (*self.http.values(), *self.tcp.values()):
            server.close()


def _addresses(network: str, first: int, count: int) -> list[str]:
    net = ipaddress.IPv4Network(network)
    if not net.is_loopback:
        raise ValueError(f"{network} is not a loopback network: this target listens on 127.0.0.0/8 only")
    if first < 1 or first + count > net.num_addresses - 1:
        raise ValueError(f"addresses {first}..{first + count - 1} do not fit in {network}")
    return [str(net[i]) for i in range(first, first + count)]


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


async def _serve(args: argparse.Namespace) -> int:
    target = Target(_addresses(args.network, args.first, args.count), args.http_port, args.tcp_port)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await target.start()
    except OSError as exc:
        target.close()
        _say(f"error cannot listen: {exc}")
        return 1
    _say(f"ready {target.http_port} {target.tcp_port} {len(target.addresses)}")
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def control() -> None:
        while line := (await reader.readline()).decode():
            if line.strip() == "quit":
                return
            _say(await target.command(line))

    task = asyncio.create_task(control())
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (task, stopper):
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
        target.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the target until ``quit``, the end of stdin, SIGTERM or SIGINT."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--network", default="127.77.0.0/16", help="the agent's fake_probe_network")
    p.add_argument("--first", type=int, default=2, help="offset of the first address in the network")
    p.add_argument("--count", type=int, default=1000, help="how many consecutive addresses to listen on")
    p.add_argument("--http-port", type=int, default=0)
    p.add_argument("--tcp-port", type=int, default=0)
    args = p.parse_args(argv)
    try:
        return asyncio.run(_serve(args))
    except ValueError as exc:
        _say(f"error {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
