"""Mapping between ``clonebox_core.errors`` and gRPC status with ``google.rpc.ErrorInfo``.

One server interceptor (``ErrorInterceptor``) turns every CloneboxError into its status code plus an
ErrorInfo detail, and every unexpected exception into INTERNAL with a generic message (the traceback is
logged, never sent). Clients turn an RPC error back into the same class with ``error_from_rpc``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

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
from clonebox_core.security.identity import CALLER
from clonebox_core.security.policy import max_request_bytes

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


class ErrorInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpcio has no stubs
    """Guards every call: authentication, authorization, the caller in ``CALLER``, mapped errors.

    Without an Authorizer (plaintext on loopback) calls are not authenticated. Exceptions become statuses
    with ErrorInfo; never UNKNOWN, never a traceback.
    """

    def __init__(self, authorizer: Authorizer | None = None) -> None:
        self._authorizer = authorizer

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
        auth = self._authorizer
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, method, auth),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, method, auth),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _wrap_unary(handler.stream_unary, method, auth),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                _wrap_stream(handler.stream_stream, method, auth),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


def _check_size(method: str, request: Any) -> None:
    limit = max_request_bytes(method)
    if hasattr(request, "ByteSize") and request.ByteSize() > limit:
        raise InvalidArgument(f"request is larger than {limit} bytes", reason="REQUEST_TOO_LARGE")


def _wrap_unary(behavior: Any, method: str, auth: Authorizer | None) -> Any:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            _check_size(method, request)
            if auth is None:
                return await behavior(request, context)
            identity = auth.check(method, context)
            CALLER.set(identity)
            with auth.slot(identity):
                return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except CloneboxError as err:
            await _abort(context, err)
        except Exception as exc:
            await _abort(context, _internal(method, exc))

    return wrapper


def _wrap_stream(behavior: Any, method: str, auth: Authorizer | None) -> Any:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        try:
            _check_size(method, request)
            if auth is not None:
                # streams are long-lived (watches, agent sessions): they hold no concurrency slot
                CALLER.set(auth.check(method, context))
            async for item in behavior(request, context):
                yield item
        except grpc.aio.AbortError:
            raise
        except CloneboxError as err:
            await _abort(context, err)
        except Exception as exc:
            await _abort(context, _internal(method, exc))

    return wrapper
