"""The agent's guard observer: refused and failed mutations go to the journal's audit outbox."""

from __future__ import annotations

import asyncio
from typing import Any

from clonebox_agent.journal.store import Journal
from clonebox_core.audit.event import failed_call_event
from clonebox_core.rpc.status import CallRecord
from clonebox_core.security.policy import audit_action


def _vm_name(request: Any) -> str:
    # snapshot requests name their VM in ``vm`` (their ``name`` is the snapshot's)
    name = str(getattr(request, "vm", "") or getattr(request, "name", "") or "")
    if (
        not name
        and request is not None
        and hasattr(request, "HasField")
        and "spec" in request.DESCRIPTOR.fields_by_name
    ):
        name = request.spec.name if request.HasField("spec") else ""
    return name[:128]


class AgentAuditObserver:
    """Writes an outbox event for every mutation the guard saw end with an error.

    Successful mutations write theirs with the journal record of their outcome (AgentService).
    """

    def __init__(self, journal: Journal, host_name: str) -> None:
        self._journal = journal
        self._host = host_name

    async def call_finished(self, record: CallRecord) -> None:
        """See ``clonebox_core.rpc.status.CallObserver``."""
        action = audit_action(record.method)
        if action is None or record.code == "OK":
            return
        name = _vm_name(record.request)
        # a volume's requests name the volume (``volume.*``), every other mutation's a VM
        kind = "volumes" if action.startswith("volume.") else "vms"
        resource = f"hosts/{self._host}/{kind}/{name}" if name else f"hosts/{self._host}"
        origin = f"agent/{self._host}"
        event = failed_call_event(action, resource, record.code, record.reason, record.request, origin)
        await asyncio.to_thread(self._journal.add_events, [event])
