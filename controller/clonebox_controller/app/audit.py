"""The controller's audit log use cases: record, query, watch, verify, export and archive the chain."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from clonebox_core.audit.chain import (
    AuditFilter,
    ChainRecord,
    Head,
    Keyring,
    VerifyReport,
    Witness,
    anchor_mac,
    verify,
)
from clonebox_core.audit.event import AuditEvent, Outcome, new_event
from clonebox_core.errors import FailedPrecondition, InvalidArgument

from .ports import FleetStore

#: records read per store call while verifying or exporting
_CHUNK = 1000
#: how often a watch looks for records other controller processes appended
WATCH_POLL_SECONDS = 0.5
#: how old a head handed to agents as their witness copy may be
HEAD_MAX_AGE_SECONDS = 1.0


@dataclass(frozen=True)
class Verification:
    """A verification report plus the witnesses it compared."""

    report: VerifyReport
    witnesses: tuple[str, ...]


class AuditLog:
    """Writes and reads the audit chain through the store; verification needs the keyring.

    ``head_witness`` reads the head kept outside the database (the head file), if any.
    """

    def __init__(
        self, store: FleetStore, keyring: Keyring, head_witness: Callable[[], Head | None] = lambda: None
    ) -> None:
        self._store = store
        self._keyring = keyring
        self._head_witness = head_witness
        self._appended = asyncio.Event()
        #: (loop time, head): every agent's heartbeat reply carries the head; one read a second serves them all
        self._head: tuple[float, Head] | None = None

    # ------------------------------------------------------------------ writing

    async def record(self, events: Sequence[AuditEvent]) -> Head:
        """Append events in their own transaction (raises when they cannot be written)."""
        head = await asyncio.to_thread(self._store.append_audit, list(events))
        self._appended.set()
        self._head = (asyncio.get_running_loop().time(), head)
        return head

    async def from_agent(self, host: str, events: Sequence[AuditEvent]) -> Head:
        """Append events an agent forwarded (durably, before they are acknowledged); the new head.

        The origin is set from the authenticated session, so an agent cannot speak for another.
        """
        return await self.record([e.with_origin(f"agent/{host}") for e in events])

    async def head(self, *, fresh: bool = False) -> Head:
        """The chain head as the database records it.

        Unless ``fresh``, it may be up to ``HEAD_MAX_AGE_SECONDS`` old (enough for agents' witness
        copies: mutations append in their own transactions, and other controllers append too).
        """
        now = asyncio.get_running_loop().time()
        if not fresh and self._head is not None and now - self._head[0] < HEAD_MAX_AGE_SECONDS:
            return self._head[1]
        state = await asyncio.to_thread(self._store.audit_chain_state)
        self._head = (now, state.head)
        return state.head

    async def witness(self, host: str, head: Head) -> None:
        """Keep the head an agent reported holding (its copy outside this database)."""
        await asyncio.to_thread(self._store.record_audit_witness, host, head)

    def notify(self) -> None:
        """Wake watchers early (after a transaction that appended audit records)."""
        self._appended.set()

    # ------------------------------------------------------------------ reading

    async def query(self, query: AuditFilter) -> list[ChainRecord]:
        """Records matching ``query``."""
        return await asyncio.to_thread(self._store.list_audit, query)

    async def get(self, event_id: str) -> ChainRecord:
        """One record by event id."""
        return await asyncio.to_thread(self._store.get_audit, event_id)

    async def watch(self, query: AuditFilter, after_seq: int) -> AsyncIterator[ChainRecord]:
        """Records appended after ``after_seq`` (0 = from the current head on), as they arrive."""
        last = after_seq or (await self.head(fresh=True)).seq
        while True:
            self._appended.clear()
            batch = await self.query(replace(query, after_seq=last, limit=_CHUNK, newest_first=False))
            for record in batch:
                last = record.seq
                yield record
            if len(batch) == _CHUNK:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._appended.wait(), WATCH_POLL_SECONDS)

    # ------------------------------------------------------------------ verification, export, archive

    def _records_from(
        self, after_seq: int, stop: Callable[[ChainRecord], bool] = lambda _r: False
    ) -> Iterator[ChainRecord]:
        last = after_seq
        while True:
            batch = self._store.list_audit(AuditFilter(after_seq=last, limit=_CHUNK))
            for record in batch:
                if stop(record):
                    return
                yield record
                last = record.seq
            if len(batch) < _CHUNK:
                return

    def _start(self) -> tuple[Head, VerifyReport | None]:
        """The anchor the chain starts from, or a failed report when the anchor's seal is wrong."""
        state = self._store.audit_chain_state()
        anchor = state.anchor
        if anchor.seq == 0:
            return anchor, None
        key = self._keyring.key(state.anchor_key_id)
        if key is None or not hmac.compare_digest(anchor_mac(key, anchor.seq, anchor.mac), state.anchor_seal):
            return anchor, VerifyReport(
                False,
                0,
                anchor.seq + 1,
                anchor.seq,
                anchor.seq,
                "",
                f"the archive anchor at {anchor.seq} is not sealed",
            )
        return anchor, None

    def _verify(self) -> Verification:
        state = self._store.audit_chain_state()
        start, failure = self._start()
        witnesses = list(state.witnesses)
        outside = self._head_witness()
        if outside is not None:
            witnesses.append(Witness("the head file", outside))
        names = tuple(w.source for w in witnesses)
        if failure is not None:
            return Verification(failure, names)
        report = verify(
            self._records_from(start.seq),
            self._keyring,
            start=start,
            stored_head=state.head,
            witnesses=witnesses,
        )
        return Verification(report, names)

    async def verify(self) -> Verification:
        """Check the whole chain: every MAC, the anchor's seal, the head row and every witness."""
        return await asyncio.to_thread(self._verify)

    def _export(self, before: datetime | None, through_seq: int = 0) -> tuple[Head, list[ChainRecord]]:
        start, failure = self._start()
        if failure is not None:
            raise FailedPrecondition(failure.problem, reason="AUDIT_CHAIN_BROKEN")

        def stop(record: ChainRecord) -> bool:
            return (before is not None and record.event.time >= before) or (0 < through_seq < record.seq)

        records = list(self._records_from(start.seq, stop=stop))
        report = verify(records, self._keyring, start=start)
        if not report.ok:
            raise FailedPrecondition(
                f"the chain is broken at record {report.bad_seq}: {report.problem}; run 'clonebox audit verify'",
                reason="AUDIT_CHAIN_BROKEN",
                metadata={"seq": str(report.bad_seq)},
            )
        return start, records

    async def export(self, before: datetime | None = None) -> tuple[Head, list[ChainRecord]]:
        """The chain's start and its records (before ``before``), verified; FailedPrecondition when broken."""
        return await asyncio.to_thread(self._export, before)

    async def archive(self, through: Head, request_id: str = "") -> int:
        """Remove records up to ``through`` (verified first) and anchor the chain there; audited."""
        if through.seq <= 0:
            raise InvalidArgument("through.seq: name the last exported record", reason="INVALID_ARCHIVE_POINT")
        start, _segment = await asyncio.to_thread(lambda: self._export(None, through.seq))
        if through.seq <= start.seq:
            raise FailedPrecondition(f"records up to {start.seq} are archived already", reason="AUDIT_ALREADY_ARCHIVED")
        event = new_event(
            "audit.archive",
            "audit",
            Outcome.SUCCEEDED,
            request_id=request_id,
            details={"through_seq": through.seq, "previous_anchor_seq": start.seq},
        )
        removed = await asyncio.to_thread(self._store.archive_audit, through, event)
        self._appended.set()
        return removed
