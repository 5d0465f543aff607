"""The one error hierarchy of CloneBox.

Every error carries a stable machine-readable ``reason`` (``VM_NOT_FOUND``), a human message, and
optional string ``metadata`` (for example the field that was wrong). The RPC layer maps each class to
one gRPC status code and a ``google.rpc.ErrorInfo``; clients map back; the CLI maps each class to one
exit code. Nothing else in the code base decides codes.
"""

from __future__ import annotations

from collections.abc import Mapping

DOMAIN = "clonebox.dev"


class CloneboxError(Exception):
    """Base of every error CloneBox raises on purpose."""

    #: gRPC status code name (``grpc.StatusCode`` member name); the RPC layer resolves it.
    code: str = "INTERNAL"
    #: default reason when the raiser gives none
    default_reason: str = "INTERNAL"

    def __init__(self, message: str, *, reason: str | None = None, metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata: dict[str, str] = dict(metadata or {})

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, reason={self.reason!r})"


class NotFound(CloneboxError):
    """The named resource does not exist."""

    code = "NOT_FOUND"
    default_reason = "NOT_FOUND"


class AlreadyExists(CloneboxError):
    """A resource with that name exists already (with a different spec or request)."""

    code = "ALREADY_EXISTS"
    default_reason = "ALREADY_EXISTS"


class InvalidArgument(CloneboxError):
    """The request itself is wrong; ``metadata['field']`` names the field when known."""

    code = "INVALID_ARGUMENT"
    default_reason = "INVALID_ARGUMENT"


class FailedPrecondition(CloneboxError):
    """The system is not in a state where the request can run (e.g. a stale watch revision)."""

    code = "FAILED_PRECONDITION"
    default_reason = "FAILED_PRECONDITION"


class ResourceExhausted(CloneboxError):
    """No host or quota has room."""

    code = "RESOURCE_EXHAUSTED"
    default_reason = "RESOURCE_EXHAUSTED"


class PermissionDenied(CloneboxError):
    """The caller is known but not allowed."""

    code = "PERMISSION_DENIED"
    default_reason = "PERMISSION_DENIED"


class Unauthenticated(CloneboxError):
    """The caller could not be identified."""

    code = "UNAUTHENTICATED"
    default_reason = "UNAUTHENTICATED"


class Unavailable(CloneboxError):
    """A dependency (agent, libvirt, controller) cannot be reached right now; retrying may help."""

    code = "UNAVAILABLE"
    default_reason = "UNAVAILABLE"


class Aborted(CloneboxError):
    """A concurrent change won; retry the whole read-modify-write."""

    code = "ABORTED"
    default_reason = "ABORTED"


class DeadlineExceeded(CloneboxError):
    """The work did not finish in time."""

    code = "DEADLINE_EXCEEDED"
    default_reason = "DEADLINE_EXCEEDED"


class Internal(CloneboxError):
    """A bug or an unexpected failure; the message on the wire is generic."""

    code = "INTERNAL"
    default_reason = "INTERNAL"


ERROR_CLASSES: tuple[type[CloneboxError], ...] = (
    NotFound,
    AlreadyExists,
    InvalidArgument,
    FailedPrecondition,
    ResourceExhausted,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
    Aborted,
    DeadlineExceeded,
    Internal,
)

#: gRPC code name -> error class, used by clients to map a status back
CLASS_BY_CODE: dict[str, type[CloneboxError]] = {c.code: c for c in ERROR_CLASSES}


def invalid_field(field: str, message: str, *, reason: str = "INVALID_FIELD") -> InvalidArgument:
    """An InvalidArgument that names the offending field (``spec.memory_mib: must be ...``)."""
    return InvalidArgument(f"{field}: {message}", reason=reason, metadata={"field": field})
