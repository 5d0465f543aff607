"""Recovery across the fleet: agents' journaled transactions, rollback of interrupted ones, the orphan sweep."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from clonebox_controller.app.hosts import HostRegistry
from clonebox_controller.app.ports import FleetStore
from clonebox_core.audit.event import Outcome, new_event
from clonebox_core.errors import CloneboxError, NotFound
from clonebox_core.model import Host, HostState, Orphan, Transaction
from clonebox_core.names import check_dns_label


@dataclass(frozen=True)
class RecoveryRun:
    """What one recovery run did on each host it reached."""

    rolled_back: list[Transaction] = field(default_factory=list)
    orphans: list[Orphan] = field(default_factory=list)
    unreachable: dict[str, str] = field(default_factory=dict)


class RecoveryManager:
    """Asks agents for their transactions, and to roll back and sweep; every run is audited."""

    def __init__(self, store: FleetStore, hosts: HostRegistry) -> None:
        self._store = store
        self._hosts = hosts

    async def _targets(self, host: str) -> list[Host]:
        if host:
            check_dns_label("host", host)
            return [await asyncio.to_thread(self._store.get_host, host)]
        return [h for h in await asyncio.to_thread(self._store.list_hosts) if h.state != HostState.UNREACHABLE]

    async def list(self, host: str, include_committed: bool, limit: int) -> tuple[list[Transaction], dict[str, str]]:
        """Transactions of one host or every reachable host, newest first per host; unreachable hosts named."""
        found: list[Transaction] = []
        unreachable: dict[str, str] = {}
        for h in await self._targets(host):
            try:
                found += await self._hosts.client_for(h).list_transactions(include_committed, limit)
            except CloneboxError as exc:
                unreachable[h.name] = exc.message
        return found, unreachable

    async def get(self, host: str, txn_id: str) -> Transaction:
        """One transaction with its steps (NotFound TRANSACTION_NOT_FOUND)."""
        check_dns_label("host", host)
        found, unreachable = await self.list(host, True, 1000)
        for txn in found:
            if txn.id == txn_id:
                return txn
        why = f" ({unreachable[host]})" if host in unreachable else ""
        raise NotFound(
            f"transaction {txn_id!r} not found on host {host}{why}",
            reason="TRANSACTION_NOT_FOUND",
            metadata={"host": host, "id": txn_id},
        )

    async def run(self, host: str, sweep: bool, request_id: str) -> RecoveryRun:
        """Roll back interrupted transactions and report (or sweep) orphans on one or every reachable host."""
        result = RecoveryRun()
        for h in await self._targets(host):
            try:
                rolled, orphans = await self._hosts.client_for(h).recover(sweep, request_id)
            except CloneboxError as exc:
                result.unreachable[h.name] = exc.message
                continue
            result.rolled_back.extend(rolled)
            result.orphans.extend(orphans)
        event = new_event(
            "recovery.run",
            f"hosts/{host}" if host else "hosts",
            Outcome.PARTLY_FAILED if result.unreachable else Outcome.SUCCEEDED,
            request_id=request_id,
            reason="HOST_UNREACHABLE" if result.unreachable else "",
            details={
                "sweep": sweep,
                "rolled_back": len(result.rolled_back),
                "orphans": len(result.orphans),
                "removed": sum(1 for o in result.orphans if o.removed),
                "unreachable": ", ".join(sorted(result.unreachable)),
            },
        )
        await asyncio.to_thread(self._store.append_audit, [event])
        return result
