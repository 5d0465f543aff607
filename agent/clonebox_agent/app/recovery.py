"""Crash recovery and the orphan sweep.

When the agent starts, every transaction the journal still has open was cut short by a crash: its
steps are undone in reverse order, each only if the artifact is still the one the step made (the
recorded inode, volume key or domain UUID), and the transaction is closed as rolled back. A step that
was only *planned* had not recorded what it made, so nothing is removed for it; whatever it left is
found by the sweep, which lists owned volumes and files of VMs that have no domain and no open
transaction (and managed networks no domain is attached to), and removes them when asked. Every
clean-up writes an audit event into the journal's outbox in the same SQLite transaction that closes
the journal record.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from clonebox_agent.journal.store import Journal, JournalStepLog, TxnState
from clonebox_agent.ports import NETWORK_ORPHAN_PREFIX, Hypervisor
from clonebox_core.audit.event import SYSTEM_ACTOR, Outcome, new_event
from clonebox_core.errors import CloneboxError
from clonebox_core.model import StepState, Transaction

log = logging.getLogger(__name__)

#: the undo kind of a step that marks a transaction's commit point: recovery finishes it, never undoes it
COMMIT_POINT = "retire"

#: the error a transaction cut short by a crash is closed with
INTERRUPTED = "interrupted: the agent stopped during the transaction; rolled back at the next start"


@dataclass(frozen=True)
class Rollback:
    """One transaction rolled back by recovery: what was removed, and which undos failed."""

    txn_id: str
    kind: str
    target: str
    removed: tuple[str, ...]
    failed_steps: tuple[str, ...] = ()
    #: finished (past its commit point) rather than undone
    forward: bool = False


@dataclass(frozen=True)
class SweepReport:
    """Leftovers of VMs without a domain, by VM, and whether they were removed."""

    orphans: dict[str, list[str]] = field(default_factory=dict)
    removed: dict[str, list[str]] = field(default_factory=dict)


class Recovery:
    """Rolls back interrupted transactions and sweeps orphans of one agent."""

    def __init__(self, journal: Journal, hypervisor: Hypervisor, host_name: str) -> None:
        self._journal = journal
        self._hv = hypervisor
        self._host = host_name

    async def roll_back_open(self) -> list[Rollback]:
        """Undo every transaction left open (at start, before anything is served); what each removed."""
        done: list[Rollback] = []
        for txn in await asyncio.to_thread(self._journal.txns, state=TxnState.OPEN, limit=10_000):
            rolled = await self.roll_back(txn.id)
            if rolled is not None:
                done.append(rolled)
        return done

    async def roll_back(self, txn_id: str, error: str = INTERRUPTED) -> Rollback | None:
        """Undo one open transaction's done steps in reverse and close it as rolled back with ``error`` (audited).

        A transaction that reached its commit point (a ``retire`` step) is finished instead: see
        ``roll_forward``.
        """
        txn = await asyncio.to_thread(self._journal.txn, txn_id)
        if txn is None or txn.state != TxnState.OPEN:
            return None
        if any(step.undo.get("kind") == COMMIT_POINT for step in txn.steps):
            return await self._roll_forward(txn, error)
        steps = JournalStepLog(self._journal, txn.id)
        removed: list[str] = []
        failed: list[str] = []
        for step in reversed(txn.steps):
            if step.state == StepState.PLANNED:
                # it never recorded what it made: the sweep finds it if it exists
                await asyncio.to_thread(steps.undone, step.n, True)
                continue
            if step.state != StepState.DONE:
                continue
            try:
                what = await self._hv.undo_step(step.undo, step.identity)
            except CloneboxError as exc:
                log.error("recovery of %s: undo of step %s failed: %s", txn.id, step.name, exc)
                failed.append(step.name)
                await asyncio.to_thread(steps.undone, step.n, False)
                continue
            if what:
                removed.append(what)
            await asyncio.to_thread(steps.undone, step.n, True)
        event = new_event(
            "recovery.rollback",
            f"hosts/{self._host}/vms/{txn.target}",
            Outcome.PARTLY_FAILED if failed else Outcome.SUCCEEDED,
            request_id=txn.request_id,
            reason="UNDO_FAILED" if failed else "",
            actor=SYSTEM_ACTOR,
            origin=f"agent/{self._host}",
            details={
                "transaction": txn.id,
                "kind": txn.kind,
                "removed": ", ".join(removed),
                "failed_steps": ", ".join(failed),
            },
        )
        await asyncio.to_thread(self._journal.finish_txn, txn.id, TxnState.ROLLED_BACK, error, audit=event)
        log.warning("rolled back interrupted %s of %s: removed %s", txn.kind, txn.target, removed or "nothing")
        return Rollback(txn.id, txn.kind, txn.target, tuple(removed), tuple(failed))

    async def _roll_forward(self, txn: Transaction, error: str) -> Rollback:
        """Finish a transaction cut short after its commit point: remove what it superseded, close it committed.

        Its change is in place (a revert's disks are swapped): undoing it would throw away a finished
        result, and the files it superseded are exactly what the ``retire`` step lists.
        """
        removed: list[str] = []
        failed: list[str] = []
        for step in txn.steps:
            if step.undo.get("kind") != COMMIT_POINT:
                continue
            try:
                what = await self._hv.undo_step(step.undo, dict(step.identity or {}))
            except CloneboxError as exc:
                log.error("recovery of %s: finishing step %s failed: %s", txn.id, step.name, exc)
                failed.append(step.name)
                continue
            if what:
                removed.append(what)
        event = new_event(
            "recovery.rollforward",
            f"hosts/{self._host}/vms/{txn.target}",
            Outcome.PARTLY_FAILED if failed else Outcome.SUCCEEDED,
            request_id=txn.request_id,
            reason="FINISH_FAILED" if failed else "",
            actor=SYSTEM_ACTOR,
            origin=f"agent/{self._host}",
            details={
                "transaction": txn.id,
                "kind": txn.kind,
                "removed": ", ".join(removed),
                "failed_steps": ", ".join(failed),
                "cut_short_by": error,
            },
        )
        await asyncio.to_thread(self._journal.finish_txn, txn.id, TxnState.COMMITTED, audit=event)
        log.warning("finished interrupted %s of %s past its commit point: removed %s", txn.kind, txn.target, removed)
        return Rollback(txn.id, txn.kind, txn.target, tuple(removed), tuple(failed), forward=True)

    async def sweep(self, remove: bool) -> SweepReport:
        """List (and with ``remove`` delete) owned leftovers that no domain or open transaction explains."""
        open_targets = {t.target for t in await asyncio.to_thread(self._journal.txns, state=TxnState.OPEN)}
        orphans = await self._hv.orphans(keep=open_targets)
        removed: dict[str, list[str]] = {}
        if remove:
            for vm in sorted(orphans):
                paths = await self._hv.delete(vm)
                removed[vm] = paths
                # a managed network no VM uses any more is a network, not a VM
                network = vm.removeprefix(NETWORK_ORPHAN_PREFIX)
                kind = "networks" if network != vm else "vms"
                event = new_event(
                    "recovery.sweep",
                    f"hosts/{self._host}/{kind}/{network}",
                    Outcome.SUCCEEDED,
                    origin=f"agent/{self._host}",
                    details={"removed": ", ".join(paths)},
                )
                await asyncio.to_thread(self._journal.add_events, [event])
        return SweepReport(orphans, removed)
