"""libvirt domain states and lifecycle events mapped to CloneBox's ``VmState`` and ``EventKind``."""

from __future__ import annotations

import libvirt

from clonebox_agent.ports import EventKind
from clonebox_core.model import VmState

_STATE = {
    libvirt.VIR_DOMAIN_NOSTATE: VmState.UNSPECIFIED,
    libvirt.VIR_DOMAIN_RUNNING: VmState.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: VmState.RUNNING,
    libvirt.VIR_DOMAIN_PAUSED: VmState.PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: VmState.STOPPING,
    libvirt.VIR_DOMAIN_SHUTOFF: VmState.STOPPED,
    libvirt.VIR_DOMAIN_CRASHED: VmState.CRASHED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: VmState.PAUSED,
}

_RUNNING_REASONS = (
    "unknown",
    "booted",
    "migrated",
    "restored",
    "from-snapshot",
    "unpaused",
    "migration-canceled",
    "save-canceled",
    "wakeup",
    "crashed",
    "postcopy",
)
_PAUSED_REASONS = (
    "unknown",
    "paused",
    "migration",
    "save",
    "dump",
    "io-error",
    "watchdog",
    "from-snapshot",
    "shutting-down",
    "snapshot",
    "crashed",
    "starting-up",
    "postcopy",
    "postcopy-failed",
)
_SHUTOFF_REASONS = (
    "unknown",
    "shutdown",
    "destroyed",
    "crashed",
    "saved",
    "failed",
    "from-snapshot",
    "daemon",
)
_REASONS = {
    libvirt.VIR_DOMAIN_RUNNING: _RUNNING_REASONS,
    libvirt.VIR_DOMAIN_PAUSED: _PAUSED_REASONS,
    libvirt.VIR_DOMAIN_SHUTOFF: _SHUTOFF_REASONS,
}
_SHUTOFF_CRASHED = 3


def vm_state(state: int, reason: int) -> tuple[VmState, str]:
    """``VmState`` and a reason word for a libvirt (state, reason) pair."""
    vm = _STATE.get(state, VmState.UNSPECIFIED)
    if state == libvirt.VIR_DOMAIN_SHUTOFF and reason == _SHUTOFF_CRASHED:
        vm = VmState.CRASHED
    names = _REASONS.get(state, ())
    word = names[reason] if 0 <= reason < len(names) else ""
    return vm, word


_DETAILS: dict[int, tuple[str, ...]] = {
    libvirt.VIR_DOMAIN_EVENT_DEFINED: ("added", "updated", "renamed", "from-snapshot"),
    libvirt.VIR_DOMAIN_EVENT_UNDEFINED: ("removed", "renamed"),
    libvirt.VIR_DOMAIN_EVENT_STARTED: ("booted", "migrated", "restored", "from-snapshot", "wakeup"),
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED: (
        "paused",
        "migrated",
        "io-error",
        "watchdog",
        "restored",
        "from-snapshot",
        "api-error",
        "postcopy",
        "postcopy-failed",
    ),
    libvirt.VIR_DOMAIN_EVENT_RESUMED: ("unpaused", "migrated", "from-snapshot", "postcopy"),
    libvirt.VIR_DOMAIN_EVENT_STOPPED: (
        "shutdown",
        "destroyed",
        "crashed",
        "migrated",
        "saved",
        "failed",
        "from-snapshot",
    ),
    libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: ("memory", "disk"),
    libvirt.VIR_DOMAIN_EVENT_CRASHED: ("panicked", "crashloaded"),
}
_DEFINED_UPDATED = 1
_STOPPED_CRASHED = 2


def lifecycle(event: int, detail: int) -> tuple[EventKind, VmState | None, str] | None:
    """
    Map a lifecycle event to (kind, state after, detail word).

    None for events that change no state (a configuration update, the guest starting to shut down).
    """
    names = _DETAILS.get(event, ())
    word = names[detail] if 0 <= detail < len(names) else str(detail)
    if event == libvirt.VIR_DOMAIN_EVENT_DEFINED:
        if detail == _DEFINED_UPDATED:
            return None
        return EventKind.DEFINED, VmState.STOPPED, word
    if event == libvirt.VIR_DOMAIN_EVENT_UNDEFINED:
        return EventKind.UNDEFINED, None, word
    if event == libvirt.VIR_DOMAIN_EVENT_STARTED:
        return EventKind.STARTED, VmState.RUNNING, word
    if event in (libvirt.VIR_DOMAIN_EVENT_SUSPENDED, libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED):
        return EventKind.SUSPENDED, VmState.PAUSED, word
    if event == libvirt.VIR_DOMAIN_EVENT_RESUMED:
        return EventKind.RESUMED, VmState.RUNNING, word
    if event == libvirt.VIR_DOMAIN_EVENT_STOPPED:
        if detail == _STOPPED_CRASHED:
            return EventKind.CRASHED, VmState.CRASHED, word
        return EventKind.STOPPED, VmState.STOPPED, word
    if event == libvirt.VIR_DOMAIN_EVENT_CRASHED:
        return EventKind.CRASHED, VmState.CRASHED, word
    return None
