"""
The controller client: stubs on one channel, every failure mapped to a CloneboxError.

The CLI talks to the controller only. Each unary call has a deadline, and a call that never reached the
controller (connection refused, reset) is retried a few times with the *same* request, so a mutation's
``request_id`` makes the retry safe: the controller returns the first attempt's operation.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, TypeVar

import grpc
from clonebox.controller.v1 import (
    host_service_pb2_grpc,
    operation_service_pb2_grpc,
    vm_service_pb2_grpc,
)

from clonebox_core.errors import CloneboxError, Unavailable
from clonebox_core.rpc.server import sync_channel
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


class ControllerClient:
    """A blocking client of the controller's Host, Vm and Operation services."""

    def __init__(self, address: str, *, timeout: float = DEFAULT_TIMEOUT, attempts: int = DEFAULT_ATTEMPTS) -> None:
        self.address = address
        self.timeout = timeout
        self.attempts = max(1, attempts)
        self._channel: grpc.Channel | None = None
        self._hosts: Any = None
        self._vms: Any = None
        self._operations: Any = None

    # The channel is made on first use so that commands which never call the controller (dev, a
    # failing spec file) cannot fail on a bad --controller value.
    def _ensure(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = sync_channel(self.address)
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

    def translate(self, exc: grpc.RpcError) -> CloneboxError:
        """Map a failed call to its CloneboxError; say what to do when the controller is unreachable."""
        err = error_from_rpc(exc, target=self.address)
        if isinstance(err, Unavailable) and err.reason == _UNREACHABLE:
            details = exc.details() if hasattr(exc, "details") else str(exc)
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
    ) -> Resp:
        """Invoke a unary ``method`` with ``request``; retry only when the controller was not reached."""
        delay = _FIRST_BACKOFF
        for attempt in range(1, self.attempts + 1):
            try:
                return method(request, timeout=timeout or self.timeout)
            except grpc.RpcError as exc:
                err = self.translate(exc)
                if not (isinstance(err, Unavailable) and err.reason == _UNREACHABLE) or attempt == self.attempts:
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
            yield from responses
        except grpc.RpcError as exc:
            raise self.translate(exc) from None
        finally:
            # a consumer that stops early (done, Ctrl-C) must not leave the call open on the server
            cancel = getattr(responses, "cancel", None)
            if cancel is not None:
                cancel()

    def close(self) -> None:
        """Close the channel (idempotent)."""
        if self._channel is not None:
            self._channel.close()
            self._channel = None
            self._hosts = self._vms = self._operations = None

    def __enter__(self) -> ControllerClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
