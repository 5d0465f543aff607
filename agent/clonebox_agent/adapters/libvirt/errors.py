"""
The one place that turns ``libvirtError`` into CloneBox errors.

Callers pass what they were doing (``vm``, ``action``) so the message and reason fit; every other module
of the adapter raises what ``to_clonebox`` returns and never inspects libvirt error codes itself.
"""

from __future__ import annotations

from typing import Any

import libvirt

from clonebox_core.errors import (
    AlreadyExists,
    CloneboxError,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)


def _const(name: str) -> int:
    # constants missing from an older binding map to a code libvirt never uses
    value = getattr(libvirt, name, -1)
    return int(value)


_CONNECTION_CODES = {
    _const("VIR_ERR_NO_CONNECT"),
    _const("VIR_ERR_INVALID_CONN"),
    _const("VIR_ERR_RPC"),
    _const("VIR_ERR_AUTH_FAILED"),
}
_CONNECTION_DOMAINS = {_const("VIR_FROM_RPC"), _const("VIR_FROM_REMOTE")}
_NOT_FOUND = {
    _const("VIR_ERR_NO_DOMAIN"): "VM_NOT_FOUND",
    _const("VIR_ERR_NO_DOMAIN_METADATA"): "VM_NOT_FOUND",
    _const("VIR_ERR_NO_STORAGE_VOL"): "VOLUME_NOT_FOUND",
    _const("VIR_ERR_NO_STORAGE_POOL"): "STORAGE_POOL_NOT_FOUND",
    _const("VIR_ERR_NO_NETWORK"): "NETWORK_NOT_FOUND",
    _const("VIR_ERR_NO_DOMAIN_SNAPSHOT"): "SNAPSHOT_NOT_FOUND",
}
_ALREADY_EXISTS = {
    _const("VIR_ERR_DOM_EXIST"): "VM_ALREADY_EXISTS",
    _const("VIR_ERR_STORAGE_VOL_EXIST"): "VOLUME_ALREADY_EXISTS",
}
_INVALID = {
    _const("VIR_ERR_XML_ERROR"),
    _const("VIR_ERR_XML_DETAIL"),
    _const("VIR_ERR_CONFIG_UNSUPPORTED"),
    _const("VIR_ERR_INVALID_ARG"),
}
_UNSUPPORTED = {
    _const("VIR_ERR_NO_SUPPORT"),
    _const("VIR_ERR_ARGUMENT_UNSUPPORTED"),
    _const("VIR_ERR_OPERATION_UNSUPPORTED"),
}
_AGENT = {_const("VIR_ERR_AGENT_UNRESPONSIVE"), _const("VIR_ERR_AGENT_UNSYNCED")}
_DENIED = {_const("VIR_ERR_OPERATION_DENIED"), _const("VIR_ERR_AUTH_CANCELLED")}

#: the exception type the rest of the adapter catches
LibvirtError: type[Exception] = libvirt.libvirtError


def code_of(err: BaseException) -> int | None:
    """Libvirt error code of ``err`` (None for other exceptions)."""
    if isinstance(err, libvirt.libvirtError):
        code: Any = err.get_error_code()
        return int(code) if code is not None else None
    return None


def is_code(err: BaseException, name: str) -> bool:
    """Tell whether ``err`` is a libvirtError with the code named ``name`` (``"VIR_ERR_NO_DOMAIN"``)."""
    return code_of(err) == _const(name)


def is_unsupported(err: BaseException) -> bool:
    """Tell whether ``err`` says the driver does not implement the call (or one of its flags)."""
    return code_of(err) in _UNSUPPORTED


def is_connection_error(err: BaseException) -> bool:
    """Tell whether ``err`` says the connection to libvirtd is broken (reconnect, retry later)."""
    if not isinstance(err, libvirt.libvirtError):
        return False
    code = err.get_error_code()
    domain = err.get_error_domain()
    return code in _CONNECTION_CODES or domain in _CONNECTION_DOMAINS


def message_of(err: BaseException) -> str:
    """Libvirt's own message."""
    if isinstance(err, libvirt.libvirtError):
        msg: Any = err.get_error_message()
        return str(msg or err)
    return str(err)


def unavailable(uri: str, err: BaseException) -> Unavailable:
    """Build the error for a hypervisor that cannot be reached."""
    return Unavailable(
        f"libvirt at {uri} is unavailable: {message_of(err)}",
        reason="HYPERVISOR_UNAVAILABLE",
        metadata={"uri": uri},
    )


def to_clonebox(err: BaseException, *, uri: str, vm: str | None = None, action: str = "") -> CloneboxError:
    """Map a libvirt failure while doing ``action`` on ``vm`` to the CloneBox error."""
    if isinstance(err, CloneboxError):
        return err
    meta = {"vm": vm} if vm else {}
    what = f"{action} {vm}: " if action and vm else (f"{action}: " if action else "")
    msg = f"{what}{message_of(err)}"
    if is_connection_error(err):
        return unavailable(uri, err)
    code = code_of(err)
    if code is None:
        return Internal(msg, metadata=meta)
    if code in _NOT_FOUND:
        reason = _NOT_FOUND[code]
        if reason == "VM_NOT_FOUND" and vm:
            msg = f"VM {vm} not found"
        return NotFound(msg, reason=reason, metadata=meta)
    if code in _ALREADY_EXISTS:
        return AlreadyExists(msg, reason=_ALREADY_EXISTS[code], metadata=meta)
    if code in _INVALID:
        return InvalidArgument(msg, reason="HYPERVISOR_REJECTED_CONFIG", metadata=meta)
    if code in _UNSUPPORTED:
        return FailedPrecondition(msg, reason="HYPERVISOR_UNSUPPORTED", metadata=meta)
    if code in _AGENT:
        return Unavailable(msg, reason="GUEST_AGENT_UNAVAILABLE", metadata=meta)
    if code in _DENIED:
        return PermissionDenied(msg, reason="HYPERVISOR_DENIED", metadata=meta)
    if code == _const("VIR_ERR_OPERATION_TIMEOUT"):
        return DeadlineExceeded(msg, reason="HYPERVISOR_TIMEOUT", metadata=meta)
    if code == _const("VIR_ERR_OPERATION_INVALID"):
        return FailedPrecondition(msg, reason="INVALID_VM_STATE", metadata=meta)
    return Internal(msg, reason="HYPERVISOR_ERROR", metadata=meta)


def start_failed(err: BaseException, *, uri: str, vm: str) -> CloneboxError:
    """Map a failed domain start to DOMAIN_START_FAILED carrying libvirt's (QEMU's) message."""
    if isinstance(err, CloneboxError):
        return err
    if is_connection_error(err):
        return unavailable(uri, err)
    return FailedPrecondition(
        f"VM {vm} failed to start: {message_of(err)}",
        reason="DOMAIN_START_FAILED",
        metadata={"vm": vm},
    )
