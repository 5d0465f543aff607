"""Mapping between ``clonebox_core.errors`` and gRPC status with ``google.rpc.ErrorInfo``.

One server interceptor (``ErrorInterceptor``) turns every CloneboxError into its status code plus an
ErrorInfo detail, and every unexpected exception into INTERNAL with a generic message (the traceback is
logged, never sent). Clients turn an RPC error back into the same class with ``error_from_rpc``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import grpc.aio
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from clonebox_core.errors import (
    CLASS_BY_CODE,
    DOMAIN,
    CloneboxError,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    Unavailable,
)
from clonebox_core.rpc.auth import Authorizer
from clonebox_core.security.identity import CALLER, Identity
from clonebox_core.security.policy import authorize, max_request_bytes
from clonebox_core.telemetry.logging import bind_call
from clonebox_core.telemetry.tracing import start_stream_span

log = logging.getLogger(__name__)

GENERIC_INTERNAL = "internal error; the server log has the details"


#: errors echo parts of requests; capped so the status always fits gRPC's trailer limit (8 KiB)
MAX_MESSAGE_CHARS = 1024
MAX_METADATA_CHARS = 256


def _cap(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def to_status_proto(err: CloneboxError) -> status_pb2.Status:
    """The ``google.rpc.Status`` for an error, with an ErrorInfo detail (sizes capped)."""
    metadata = {_cap(k, 64): _cap(v, MAX_METADATA_CHARS) for k, v in list(err.metadata.items())[:16]}
    info = error_details_pb2.ErrorInfo(reason=_cap(err.reason, 64), domain=DOMAIN, metadata=metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    message = _cap(err.message, MAX_MESSAGE_CHARS)
    return status_pb2.Status(code=code_pb2.Code.Value(err.code), message=message, details=[detail])


def error_from_status_proto(status: status_pb2.Status) -> CloneboxError:
    """The CloneboxError a ``google.rpc.Status`` stands for (reason and metadata from ErrorInfo)."""
    code_name = code_pb2.Code.Name(status.code)
    cls = CLASS_BY_CODE.get(code_name, Internal)
    reason: str | None = None
    metadata: dict[str, str] = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, metadata = info.reason, dict(info.metadata)
    return cls(status.message, reason=reason, metadata=metadata)


def error_from_rpc(exc: grpc.RpcError, *, target: str = "") -> CloneboxError:
    """Map a failed call back to the error class the server raised.

    Calls that never reached a CloneBox server (connection refused, TLS failure, deadline) have no
    ErrorInfo; they map by status code, with ``target`` named in the message so users know what
    was tried.
    """
    status = rpc_status.from_call(exc)
    if status is not None:
        return error_from_status_proto(status)
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    where = f" at {target}" if target else ""
    if code == grpc.StatusCode.UNAVAILABLE:
        return Unavailable(f"cannot reach {target or 'server'}: {details}", reason="UNREACHABLE")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"no answer in time{where}: {details}")
    cls = CLASS_BY_CODE.get(code.name, Internal)
    return cls(f"{details}{where}", reason=code.name)


async def _abort(context: grpc.aio.ServicerContext[Any, Any], err: CloneboxError) -> None:
    await context.abort_with_status(rpc_status.to_status(to_status_proto(err)))


def _internal(method: str, exc: BaseException) -> CloneboxError:
    log.error("unexpected error in %s", method, exc_info=exc)
    return Internal(GENERIC_INTERNAL)


@dataclass(frozen=True)
class CallRecord:
    """What the guard saw of one finished call, handed to every ``CallObserver``.

    ``code`` is the gRPC status code name ("OK" on success); ``request`` is the (first) request
    message, or None for client-streaming calls. ``caller`` is None on plaintext servers and when
    authentication itself failed.
    """

    method: str
    caller: Identity | None
    code: str
    reason: str
    seconds: float
    request: Any


class CallObserver(Protocol):
    """Something that wants to know about every finished call (metrics, the audit log)."""

    async def call_finished(self, record: CallRecord) -> None:
        """Called once per call, after the handler ended and before the status is sent."""


def _failure(method: str, exc: Exception, context: Any) -> CloneboxError:
    """What a handler's exception means for the caller (and for observers: metrics, the audit log)."""
    if isinstance(exc, CloneboxError):
        return exc
    if isinstance(exc, grpc.aio.AbortError):
        # the handler aborted with its own status: report that code, not a made-up one
        code = context.code()
        name = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
        return CLASS_BY_CODE.get(name, Internal)(str(context.details() or ""), reason=name)
    return _internal(method, exc)


class ErrorInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpcio has no stubs
    """Guards every call: authentication, authorization, the caller in ``CALLER``, mapped errors.

    Without an Authorizer (plaintext on loopback) calls are not authenticated. Exceptions become statuses
    with ErrorInfo; never UNKNOWN, never a traceback. Every finished call is reported to the observers.
    """

    def __init__(self, authorizer: Authorizer | None = None, observers: Sequence[CallObserver] = ()) -> None:
        self._guard = _Guard(authorizer, tuple(observers))

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """Wrap the method's behaviour so every exception leaves as a proper status."""
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        guard = self._guard
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                guard.wrap_unary(handler.unary_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                guard.wrap_stream(handler.unary_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                guard.wrap_unary(handler.stream_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                guard.wrap_stream(handler.stream_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


def _check_size(method: str, request: Any) -> None:
    limit = max_request_bytes(method)
    if hasattr(request, "ByteSize") and request.ByteSize() > limit:
        raise InvalidArgument(f"request is larger than {limit} bytes", reason="REQUEST_TOO_LARGE")


class _Guard:
    """The per-call logic of ``ErrorInterceptor``: one place for unary and streaming calls."""

    def __init__(self, auth: Authorizer | None, observers: tuple[CallObserver, ...]) -> None:
        self._auth = auth
        self._observers = observers

    def _admit(self, method: str, request: Any, context: Any) -> Identity | None:
        # log lines of this call (and of the tasks it starts) carry its request id and resource name
        bind_call(method, request)
        # the caller is known (and set) before authorization, so a refused call is still attributed
        if self._auth is None:
            _check_size(method, request)
            return None
        identity = self._auth.authenticate(context)
        CALLER.set(identity)
        authorize(method, identity)
        _check_size(method, request)
        return identity

    async def _report(self, method: str, request: Any, started: float, err: CloneboxError | None) -> None:
        if not self._observers:
            return
        record = CallRecord(
            method=method,
            caller=CALLER.get(),
            code="OK" if err is None else err.code,
            reason="" if err is None else err.reason,
            seconds=time.perf_counter() - started,
            request=request if hasattr(request, "ByteSize") else None,
        )
        for observer in self._observers:
            try:
                await observer.call_finished(record)
            except Exception:  # an observer must never change the outcome of a call
                log.exception("call observer %r failed for %s", observer, method)

    def wrap_unary(self, behavior: Any, method: str) -> Any:
        """The guarded form of a unary-response handler."""

        async def wrapper(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started = time.perf_counter()
            CALLER.set(None)
            failure: CloneboxError | None = None
            try:
                identity = self._admit(method, request, context)
                if identity is None:
                    return await behavior(request, context)
                with self._auth.slot(identity):  # type: ignore[union-attr]  # set when identity is
                    return await behavior(request, context)
            except Exception as exc:
                failure = _failure(method, exc, context)
                if isinstance(exc, grpc.aio.AbortError):
                    raise
            finally:
                await self._report(method, request, started, failure)
            if failure is not None:
                await _abort(context, failure)
            return None

        return wrapper

    def wrap_stream(self, behavior: Any, method: str) -> Any:
        """The guarded form of a streaming-response handler."""

        async def wrapper(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            started = time.perf_counter()
            CALLER.set(None)
            failure: CloneboxError | None = None
            span = start_stream_span(method, context.invocation_metadata() or ())
            try:
                # streams are long-lived (watches, agent sessions): they hold no concurrency slot
                self._admit(method, request, context)
                async for item in behavior(request, context):
                    yield item
            except Exception as exc:
                failure = _failure(method, exc, context)
                if isinstance(exc, grpc.aio.AbortError):
                    raise
            finally:
                await self._report(method, request, started, failure)
                if span is not None:
                    span.end()
            if failure is not None:
                await _abort(context, failure)

        return wrapper
