"""The endpoint Prometheus scrapes: one daemon's registry over HTTPS with client certificates.

Trust is the same as the daemon's gRPC port: the server presents the daemon's own certificate and
requires a client certificate issued by the fleet CA (``TlsFiles``: ca, cert, key). A scraper without
one, or with one from another CA, fails in the TLS handshake and never reaches the handler.
Certificates are renewed in place on disk (``tls.install``): at most once a second a new connection
compares the files' stamp and, when it moved, builds a new ``SSLContext`` (keeping the old one while a
renewal is half-written), so renewed files are served without a restart. With ``insecure`` the
endpoint speaks plain HTTP and, like plaintext gRPC, only on loopback.

The server runs on its own threads (an accept thread plus one per connection; the TLS handshake
happens on the connection's thread, so a stalled client blocks nobody), never on the asyncio event
loop; collectors therefore run on a scrape thread too. ``stop()`` ends it (daemon shutdown, tests).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from http.server import ThreadingHTTPServer
from typing import Any
from urllib.parse import urlparse

from cryptography import x509
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import MetricsHandler

from clonebox_core.errors import FailedPrecondition, InvalidArgument
from clonebox_core.rpc.server import Transport, require_loopback, split_host_port
from clonebox_core.rpc.tls import TlsFiles

log = logging.getLogger(__name__)

#: the standard services every daemon's gRPC server carries (see ``rpc.server.start_server``)
STANDARD_SERVICES = (health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)

#: a client has this long to finish the TLS handshake
HANDSHAKE_TIMEOUT_SECONDS = 10.0
#: and this long between bytes of its request once connected
REQUEST_TIMEOUT_SECONDS = 30.0
#: how often, at most, the TLS files are looked at for a renewal
RELOAD_INTERVAL_SECONDS = 1.0

METRICS_PATH = "/metrics"


def rpc_method_paths(service_names: Iterable[str]) -> list[str]:
    """Every ``/pkg.Service/Method`` path of ``service_names`` plus the standard health and reflection services.

    Feed it to ``Metrics.rpc_observer`` so RPC labels are exactly the methods a daemon serves.
    """
    pool = descriptor_pool.Default()
    paths: list[str] = []
    for name in dict.fromkeys([*service_names, *STANDARD_SERVICES]):
        service = pool.FindServiceByName(name)
        paths += [f"/{service.full_name}/{method.name}" for method in service.methods]
    return paths


def require_loopback_metrics(address: str) -> None:
    """Plaintext (``insecure``) metrics are allowed on loopback only, like plaintext gRPC."""
    require_loopback(address, field="metrics_listen", what="metrics (insecure)")


def check_metrics_listen(address: str, insecure: bool) -> None:
    """Fail early (before anything starts) on a malformed ``metrics_listen`` or plaintext off loopback."""
    if not address:
        return
    try:
        split_host_port(address)
    except InvalidArgument as exc:
        raise InvalidArgument(
            f"metrics_listen: {exc}", reason="INVALID_ADDRESS", metadata={"field": "metrics_listen"}
        ) from None
    if insecure:
        require_loopback_metrics(address)


def server_context(tls: TlsFiles) -> ssl.SSLContext:
    """A TLS server context presenting the daemon's certificate and requiring one from the fleet CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(tls.ca))
    ctx.load_cert_chain(certfile=str(tls.cert), keyfile=str(tls.key))
    return ctx


class ReloadingContext:
    """The current ``SSLContext`` for ``tls``, rebuilt when the files change (checked at most once a second).

    A failed rebuild (a renewal half-written: the key replaced but not yet the certificate) keeps the
    previous context and tries again at the next check.
    """

    def __init__(
        self,
        tls: TlsFiles,
        interval: float = RELOAD_INTERVAL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._tls = tls
        self._interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        stamp = tls.stamp()
        tls.load()  # FailedPrecondition naming a missing file
        try:
            self._context = server_context(tls)
        except (ssl.SSLError, OSError) as exc:
            raise FailedPrecondition(
                f"metrics endpoint: cannot use the TLS files in {tls.cert.parent}: {exc}",
                reason="TLS_FILE_INVALID",
            ) from exc
        self._stamp = stamp
        self._checked = clock()

    def current(self) -> ssl.SSLContext:
        """The context for a new connection."""
        with self._lock:
            now = self._clock()
            if now - self._checked < self._interval:
                return self._context
            self._checked = now
            stamp = self._tls.stamp()
            if stamp != self._stamp:
                try:
                    self._context = server_context(self._tls)
                except (ssl.SSLError, OSError) as exc:
                    log.info("metrics endpoint: TLS files changing (%s); keeping the previous ones", exc)
                else:
                    self._stamp = stamp
                    log.info("metrics endpoint: loaded renewed TLS files from %s", self._tls.cert.parent)
            return self._context


class _Handler(MetricsHandler):
    """Serves the registry at /metrics (and /), 404 elsewhere; logs nothing per request."""

    timeout = REQUEST_TIMEOUT_SECONDS

    def do_GET(self) -> None:
        """Answer a scrape."""
        if urlparse(self.path).path not in (METRICS_PATH, "/"):
            self.send_error(404, f"metrics are at {METRICS_PATH}")
            return
        super().do_GET()


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], family: socket.AddressFamily, handler: type[_Handler]) -> None:
        self.address_family = family
        self.contexts: ReloadingContext | None = None
        #: the deny list, by certificate serial: a revoked scraper is refused like on the gRPC ports
        self.is_revoked: Callable[[int], bool] | None = None
        super().__init__(address, handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind would resolve the host's FQDN (a DNS lookup) for nothing
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(self.server_address)
        self.server_address = self.socket.getsockname()
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])

    def get_request(self) -> tuple[Any, Any]:
        sock, addr = self.socket.accept()
        if self.contexts is None:
            return sock, addr
        sock.settimeout(HANDSHAKE_TIMEOUT_SECONDS)
        # no handshake here: it happens on the connection's own thread (process_request_thread)
        return self.contexts.current().wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
            try:
                request.do_handshake()
            except OSError as exc:  # ssl.SSLError included: no, foreign or expired client certificate
                log.debug("metrics endpoint: TLS handshake with %s failed: %s", client_address, exc)
                self.shutdown_request(request)
                return
            if self.is_revoked is not None and self._revoked_peer(request):
                log.warning("metrics endpoint: refused %s: its certificate is revoked", client_address)
                self.shutdown_request(request)
                return
        super().process_request_thread(request, client_address)

    def _revoked_peer(self, request: ssl.SSLSocket) -> bool:
        der = request.getpeercert(binary_form=True)
        if der is None or self.is_revoked is None:
            return False
        return self.is_revoked(x509.load_der_x509_certificate(der).serial_number)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("metrics endpoint: request from %s failed", client_address, exc_info=True)


class MetricsServer:
    """A running metrics endpoint: its bound port and how to stop it."""

    def __init__(self, httpd: _HttpServer, thread: threading.Thread, scheme: str) -> None:
        self._httpd = httpd
        self._thread = thread
        self.scheme = scheme
        self._stopped = False

    @property
    def port(self) -> int:
        """The bound port (useful with ``HOST:0``)."""
        return int(self._httpd.server_address[1])

    @property
    def host(self) -> str:
        """The bound host."""
        return str(self._httpd.server_address[0])

    @property
    def url(self) -> str:
        """Where to scrape."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{METRICS_PATH}"

    def stop(self) -> None:
        """Stop accepting connections and close the socket (blocks up to a poll interval)."""
        if self._stopped:
            return
        self._stopped = True
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    async def aclose(self) -> None:
        """``stop()`` off the event loop."""
        await asyncio.to_thread(self.stop)


def _bind_address(host: str, port: int) -> tuple[socket.AddressFamily, tuple[str, int]]:
    if not host:
        return socket.AF_INET, ("0.0.0.0", port)  # HOST:PORT with an empty host: every IPv4 address
    family, _type, _proto, _name, sockaddr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    return family, (str(sockaddr[0]), port)


def start_metrics_server(
    address: str,
    registry: CollectorRegistry,
    transport: Transport,
    is_revoked: Callable[[int], bool] | None = None,
) -> MetricsServer:
    """Serve ``registry`` on ``address`` (``HOST:PORT``; port 0 picks one): HTTPS with mTLS, or loopback HTTP.

    Uses the daemon's own transport: its TLS files, or ``insecure`` (then only loopback is accepted).
    ``is_revoked(serial)`` is the daemon's deny list: a scraper whose certificate is on it is refused.
    """
    host, port = split_host_port(address)
    contexts: ReloadingContext | None = None
    if transport.tls is None:
        require_loopback_metrics(address)
    else:
        contexts = ReloadingContext(transport.tls)
    handler = type("MetricsRequestHandler", (_Handler,), {"registry": registry})
    try:
        family, bind_to = _bind_address(host, port)
        httpd = _HttpServer(bind_to, family, handler)
    except OSError as exc:
        raise InvalidArgument(
            f"metrics_listen: cannot bind {address}: {exc.strerror or exc}",
            reason="BIND_FAILED",
            metadata={"field": "metrics_listen"},
        ) from None
    httpd.contexts = contexts
    httpd.is_revoked = is_revoked
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.2}, name=f"metrics-{httpd.server_address[1]}"
    )
    thread.daemon = True
    thread.start()
    server = MetricsServer(httpd, thread, "https" if contexts is not None else "http")
    log.info("metrics at %s", server.url)
    return server
