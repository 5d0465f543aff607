"""
The controller client: stubs on one channel, every failure mapped to a CloneboxError.

The CLI talks to the controller only, over mTLS (``Transport`` with the user's certificate; the
controller is verified as ``controller.<trust-domain>``) or, with ``--insecure``, plaintext on loopback.
Each unary call has a deadline, and a call that never reached the controller (connection refused,
reset) is retried a few times with the *same* request, so a mutation's ``request_id`` makes the retry
safe: the controller returns the first attempt's operation. A failed TLS handshake is not retried: it
becomes ``TlsHandshakeFailed`` (exit 13) with the reason (see ``clonebox_cli.credentials``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Any, TypeVar

import grpc
from clonebox.controller.v1 import (
    audit_service_pb2_grpc,
    health_service_pb2_grpc,
    host_service_pb2_grpc,
    operation_service_pb2_grpc,
    pki_service_pb2_grpc,
    plan_service_pb2_grpc,
    recovery_service_pb2_grpc,
    snapshot_service_pb2_grpc,
    vm_service_pb2_grpc,
)
from grpc_status import rpc_status

from clonebox_cli.credentials import Peer, handshake_failure
from clonebox_core.errors import CloneboxError, Unavailable
from clonebox_core.rpc.server import Transport, sync_channel, trust_domain_of
from clonebox_core.rpc.status import error_from_rpc

Req = TypeVar("Req")
Resp = TypeVar("Resp")

#: default deadline of a unary call, in seconds
DEFAULT_TIMEOUT = 30.0
#: attempts for a call that could not reach the controller at all
DEFAULT_ATTEMPTS = 3
#: pause before the 2nd, 3rd... attempt (doubles each time)
_FIRST_BACKOFF = 0.2
#: the reason error_from_rpc gives a call that carried no ErrorInfo and failed with UNAVAILABLE
_UNREACHABLE = "UNREACHABLE"


def controller_server_name(transport: Transport) -> str | None:
    """The DNS name the controller's certificate must carry (None for plaintext)."""
    domain = trust_domain_of(transport)
    return f"controller.{domain}" if domain else None


class ControllerClient:
    """A blocking client of the controller's services (Host, Vm, Operation, Pki, Audit, Recovery, Health, Snapshot)."""

    def __init__(
        self,
        address: str,
        transport: Transport,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        attempts: int = DEFAULT_ATTEMPTS,
        server_name: str | None = None,
    ) -> None:
        self.address = address
        self.transport = transport
        self.timeout = timeout
        self.attempts = max(1, attempts)
        #: the name verified in the controller's certificate (default: ``controller.<our trust domain>``)
        self.server_name = server_name
        self._channel: grpc.Channel | None = None
        self._hosts: Any = None
        self._vms: Any = None
        self._operations: Any = None
        self._pki: Any = None
        self._audit: Any = None
        self._recovery: Any = None
        self._health: Any = None
        self._snapshots: Any = None
        self._plans: Any = None
        #: a call on this client reached the server (later connection losses are outages, not handshakes)
        self._reached = False

    # The channel is made on first use so that commands which never call the controller (dev, a
    # failing spec file) cannot fail on a bad --controller value. The credentials are read from the
    # files at that moment: close() after a renewal, and the next call dials with the new pair.
    def _ensure(self) -> grpc.Channel:
        if self._channel is None:
            if self.server_name is None and self.transport.tls is not None:
                self.server_name = controller_server_name(self.transport)
            self._channel = sync_channel(self.address, self.transport, self.server_name)
        return self._channel

    @property
    def hosts(self) -> host_service_pb2_grpc.HostServiceStub:
        """HostService stub."""
        if self._hosts is None:
            self._hosts = host_service_pb2_grpc.HostServiceStub(self._ensure())
        return self._hosts  # type: ignore[no-any-return]

    @property
    def vms(self) -> vm_service_pb2_grpc.VmServiceStub:
        """VmService stub."""
        if self._vms is None:
            self._vms = vm_service_pb2_grpc.VmServiceStub(self._ensure())
        return self._vms  # type: ignore[no-any-return]

    @property
    def operations(self) -> operation_service_pb2_grpc.OperationServiceStub:
        """OperationService stub."""
        if self._operations is None:
            self._operations = operation_service_pb2_grpc.OperationServiceStub(self._ensure())
        return self._operations  # type: ignore[no-any-return]

    @property
    def pki(self) -> pki_service_pb2_grpc.PkiServiceStub:
        """PkiService stub."""
        if self._pki is None:
            self._pki = pki_service_pb2_grpc.PkiServiceStub(self._ensure())
        return self._pki  # type: ignore[no-any-return]

    @property
    def audit(self) -> audit_service_pb2_grpc.AuditServiceStub:
        """AuditService stub."""
        if self._audit is None:
            self._audit = audit_service_pb2_grpc.AuditServiceStub(self._ensure())
        return self._audit  # type: ignore[no-any-return]

    @property
    def recovery(self) -> recovery_service_pb2_grpc.RecoveryServiceStub:
        """RecoveryService stub."""
        if self._recovery is None:
            self._recovery = recovery_service_pb2_grpc.RecoveryServiceStub(self._ensure())
        return self._recovery  # type: ignore[no-any-return]

    @property
    def health(self) -> health_service_pb2_grpc.HealthServiceStub:
        """HealthService stub."""
        if self._health is None:
            self._health = health_service_pb2_grpc.HealthServiceStub(self._ensure())
        return self._health  # type: ignore[no-any-return]

    @property
    def snapshots(self) -> snapshot_service_pb2_grpc.SnapshotServiceStub:
        """SnapshotService stub."""
        if self._snapshots is None:
            self._snapshots = snapshot_service_pb2_grpc.SnapshotServiceStub(self._ensure())
        return self._snapshots  # type: ignore[no-any-return]

    @property
    def plans(self) -> plan_service_pb2_grpc.PlanServiceStub:
        """PlanService stub."""
        if self._plans is None:
            self._plans = plan_service_pb2_grpc.PlanServiceStub(self._ensure())
        return self._plans  # type: ignore[no-any-return]

    def translate(self, exc: grpc.RpcError) -> CloneboxError:
        """Map a failed call to its CloneboxError; say what to do when the controller is unreachable."""
        err = error_from_rpc(exc, target=self.address)
        # only a call that never got a CloneBox status failed on the way to the controller; an UNREACHABLE
        # with a status is the controller's own answer (one of its agents went away)
        if isinstance(err, Unavailable) and err.reason == _UNREACHABLE and rpc_status.from_call(exc) is None:
            details = exc.details() if hasattr(exc, "details") else str(exc)
            details = details or ""
            if not self._reached:
                peer = Peer(self.address, self.transport.tls, self.server_name or "", self.transport.tls is None)
                rejected = handshake_failure(details, peer)
                if rejected is not None:
                    return rejected
            return Unavailable(
                f"cannot reach controller at {self.address}: {details} "
                "(is it running? try 'clonebox dev up', or pass --controller ADDR)",
                reason=_UNREACHABLE,
                metadata={"address": self.address},
            )
        return err

    def call(
        self,
        method: Callable[..., Resp],
        request: Req,
        *,
        timeout: float | None = None,
        attempts: int | None = None,
    ) -> Resp:
        """Invoke a unary ``method`` with ``request``; retry only when the controller was not reached."""
        delay = _FIRST_BACKOFF
        attempts = max(1, attempts or self.attempts)
        for attempt in range(1, attempts + 1):
            try:
                response = method(request, timeout=timeout or self.timeout)
                self._reached = True
                return response
            except grpc.RpcError as exc:
                err = self.translate(exc)
                if not isinstance(err, Unavailable):
                    self._reached = True  # the server answered (with an error)
                if not (isinstance(err, Unavailable) and err.reason == _UNREACHABLE) or attempt == attempts:
                    raise err from None
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")  # pragma: no cover - the loop always returns or raises

    def stream(
        self,
        method: Callable[..., Iterator[Resp]],
        request: Req,
        *,
        timeout: float | None = None,
    ) -> Iterator[Resp]:
        """Iterate a server-streaming ``method``; a failure mid-stream is raised as a CloneboxError."""
        responses = method(request, timeout=timeout)
        try:
            for response in responses:
                self._reached = True
                yield response
        except grpc.RpcError as exc:
            raise self.translate(exc) from None
        finally:
            # a consumer that stops early (done, Ctrl-C) must not leave the call open on the server
            cancel = getattr(responses, "cancel", None)
            if cancel is not None:
                cancel()

    def send_stream(self, method: Any, requests: Iterable[Req], *, timeout: float | None = None) -> Any:
        """
        Call a client-streaming ``method`` with ``requests`` (read lazily, as gRPC sends them).

        Never retried: the requests are consumed. When iterating ``requests`` raises, the call is
        *cancelled* - not half-closed - so the server discards what it received instead of judging a
        stream that merely ended early; that exception is then raised here.
        """
        failure: list[BaseException] = []
        holder: list[Any] = []

        def guarded() -> Iterator[Req]:
            try:
                yield from requests
            except Exception as exc:  # raised again below, on the caller's thread
                failure.append(exc)
                # cancel before this generator returns: returning would half-close the stream
                deadline = time.monotonic() + 5.0
                while not holder and time.monotonic() < deadline:
                    time.sleep(0.001)  # the caller is storing the future this very moment
                if holder:
                    holder[0].cancel()

        future = method.future(guarded(), timeout=timeout)
        holder.append(future)
        if failure:  # the iterator failed before the future existed
            future.cancel()
        try:
            response = future.result()
        except grpc.FutureCancelledError:
            if failure:
                raise failure[0] from None
            raise
        except grpc.RpcError as exc:
            if failure:
                raise failure[0] from None
            raise self.translate(exc) from None
        except BaseException:
            future.cancel()  # Ctrl-C: the server must not keep a half-sent import
            raise
        self._reached = True
        return response

    def reconnect(self) -> None:
        """Drop the channel so the next call dials at once, with the same credentials.

        Unlike ``close()`` it keeps knowing that this client reached the controller: a stream lost
        after that (a quiet watch whose connection dropped) is an outage, never a rejected certificate.
        """
        reached = self._reached
        self.close()
        self._reached = reached

    def close(self) -> None:
        """Close the channel (idempotent); the next call dials again, as a first call (after a renewal)."""
        if self._channel is not None:
            self._channel.close()
            self._channel = None
            self._hosts = self._vms = self._operations = self._pki = self._audit = self._recovery = None
            self._health = self._snapshots = None
            self._plans = None
            self._reached = False

    def __enter__(self) -> ControllerClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
