"""The keyed hash chain that makes the audit log tamper-evident.

Record ``n`` carries ``mac_n = HMAC-SHA256(key[key_id_n], mac_{n-1} || canonical(n))``, where
``canonical`` covers the sequence number, the key id and every field of the event. Someone who can
write the database but does not hold the key cannot produce a valid record, so any change, deletion,
reordering or insertion breaks the chain at the first record it touches. Dropping the tail leaves a
valid but shorter chain: that is caught by comparing with *head witnesses* kept elsewhere (the head
file beside the controller, the copies agents hold). Each record names its key id so keys rotate
without re-signing history.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from clonebox_core.audit.event import AuditEvent
from clonebox_core.errors import InvalidArgument
from clonebox_core.secrets.providers import read_private_file

#: the MAC before the first record (and the version tag of the canonical form)
GENESIS_MAC = bytes(32)
_FORMAT = "cbaudit1"
MIN_KEY_BYTES = 32


def canonical(seq: int, key_id: str, event: AuditEvent) -> bytes:
    """The exact bytes a record's MAC covers (stable across processes, backends and versions)."""
    body = event.to_json()
    return json.dumps(
        [
            _FORMAT,
            seq,
            key_id,
            body["id"],
            body["time"],
            body["actor"],
            body["action"],
            body["resource"],
            body["outcome"],
            body["request_id"],
            body["trace_id"],
            body["reason"],
            body["origin"],
            body["details"],
        ],
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode()


def anchor_mac(key: bytes, seq: int, mac: bytes) -> bytes:
    """The MAC that seals an archive anchor (so a forged anchor cannot hide removed records)."""
    return hmac.new(key, b"anchor|" + str(seq).encode() + b"|" + mac, hashlib.sha256).digest()


class Keyring:
    """Audit MAC keys by id; ``current`` signs new records, all of them verify old ones."""

    def __init__(self, keys: Mapping[str, bytes], current: str) -> None:
        if current not in keys:
            raise InvalidArgument(
                f"audit.current_key: {current!r} is not one of the configured keys {sorted(keys)}",
                reason="AUDIT_KEY_UNKNOWN",
                metadata={"field": "audit.current_key"},
            )
        for key_id, key in keys.items():
            if len(key) < MIN_KEY_BYTES:
                raise InvalidArgument(
                    f"audit key {key_id!r} has {len(key)} bytes; use at least {MIN_KEY_BYTES} random bytes",
                    reason="AUDIT_KEY_TOO_SHORT",
                    metadata={"field": "audit.keys"},
                )
        self._keys = dict(keys)
        self.current = current

    def __repr__(self) -> str:
        return f"Keyring(ids={sorted(self._keys)}, current={self.current!r})"

    def key(self, key_id: str) -> bytes | None:
        """The key with ``key_id`` (None when unknown)."""
        return self._keys.get(key_id)

    def mac(self, prev_mac: bytes, seq: int, event: AuditEvent, key_id: str | None = None) -> bytes:
        """The MAC of ``event`` at ``seq`` after ``prev_mac``, with ``key_id`` (default: current)."""
        kid = key_id or self.current
        key = self._keys[kid]
        return hmac.new(key, prev_mac + canonical(seq, kid, event), hashlib.sha256).digest()

    @classmethod
    def from_key_files(cls, files: Mapping[str, str], current: str) -> Keyring:
        """Load keys from files that only their owner may read (hex or raw bytes)."""
        keys: dict[str, bytes] = {}
        for key_id, path in files.items():
            keys[key_id] = read_key_file(Path(path), f"audit.keys.{key_id}")
        return cls(keys, current)


def read_key_file(path: Path, field: str) -> bytes:
    """A key from ``path`` (hex or raw); refuses files that group or others can access."""
    raw = read_private_file(path, what=f"{field}: key file").strip()
    try:
        return bytes.fromhex(raw.decode())
    except (UnicodeDecodeError, ValueError):
        return raw


def ensure_key_file(path: Path) -> bytes:
    """The key in ``path``, created (32 random bytes, hex, mode 0600) when the file does not exist."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(os.urandom(32).hex() + "\n")
            fh.flush()
            os.fsync(fh.fileno())
    return read_key_file(path, "audit.key_file")


@dataclass(frozen=True)
class ChainRecord:
    """An event at its place in the chain."""

    seq: int
    key_id: str
    prev_mac: bytes
    mac: bytes
    event: AuditEvent

    def to_json(self) -> dict[str, object]:
        """The event's JSON plus its chain fields (MACs in hex)."""
        return {
            "seq": self.seq,
            **self.event.to_json(),
            "key_id": self.key_id,
            "prev_mac": self.prev_mac.hex(),
            "mac": self.mac.hex(),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> ChainRecord:
        """The record ``to_json`` produced (ValueError on malformed input)."""
        try:
            return cls(
                seq=int(str(data["seq"])),
                key_id=str(data["key_id"]),
                prev_mac=bytes.fromhex(str(data["prev_mac"])),
                mac=bytes.fromhex(str(data["mac"])),
                event=AuditEvent.from_json(data),
            )
        except KeyError as exc:
            raise ValueError(f"malformed audit record: missing {exc}") from exc


@dataclass(frozen=True)
class Head:
    """A position in the chain: the last sequence number and its MAC (seq 0 = empty chain)."""

    seq: int
    mac: bytes


GENESIS = Head(0, GENESIS_MAC)


@dataclass(frozen=True)
class Witness:
    """A head someone kept outside the database (``source`` says who: the head file, an agent)."""

    source: str
    head: Head


@dataclass(frozen=True)
class VerifyReport:
    """The result of checking a chain: ``ok``, or the first bad record and what is wrong with it."""

    ok: bool
    checked: int
    first_seq: int
    last_seq: int
    bad_seq: int = 0
    bad_id: str = ""
    problem: str = ""


def verify(
    records: Iterable[ChainRecord],
    keyring: Keyring,
    *,
    start: Head = GENESIS,
    stored_head: Head | None = None,
    witnesses: Iterable[Witness] = (),
) -> VerifyReport:
    """Check ``records`` (ordered by seq) from ``start``; stop at the first bad record.

    ``stored_head`` is the head row kept in the same database; ``witnesses`` are heads kept
    elsewhere. A chain shorter than either, or disagreeing with a witness at its seq, is reported.
    """
    wanted = {w.head.seq: w for w in witnesses}
    prev = start
    checked = 0
    seen_macs: dict[int, bytes] = {}

    def bad(seq: int, problem: str, event_id: str = "") -> VerifyReport:
        return VerifyReport(False, checked, start.seq + 1, prev.seq, seq, event_id, problem)

    for rec in records:
        expected = prev.seq + 1
        if rec.seq != expected:
            if rec.seq > expected:
                return bad(expected, f"record {expected} is missing (the chain jumps from {prev.seq} to {rec.seq})")
            return bad(rec.seq, f"record {rec.seq} is out of order (expected {expected})", rec.event.id)
        if rec.prev_mac != prev.mac:
            return bad(rec.seq, f"record {rec.seq} does not link to record {prev.seq}", rec.event.id)
        if keyring.key(rec.key_id) is None:
            return bad(rec.seq, f"record {rec.seq} names unknown key {rec.key_id!r}", rec.event.id)
        if not hmac.compare_digest(keyring.mac(prev.mac, rec.seq, rec.event, rec.key_id), rec.mac):
            return bad(rec.seq, f"record {rec.seq} does not match its MAC (modified, inserted or moved)", rec.event.id)
        if rec.seq in wanted:
            seen_macs[rec.seq] = rec.mac
        prev = Head(rec.seq, rec.mac)
        checked += 1
    last = prev
    heads = ([Witness("the database head row", stored_head)] if stored_head is not None else []) + list(wanted.values())
    for witness in sorted(heads, key=lambda w: w.head.seq):
        seq = witness.head.seq
        if seq > last.seq:
            return bad(
                last.seq + 1,
                f"the chain ends at record {last.seq} but {witness.source} records a head at {seq}: "
                f"records {last.seq + 1}..{seq} were removed",
            )
        known = last.mac if seq == last.seq else seen_macs.get(seq)
        if seq > start.seq and known is not None and not hmac.compare_digest(known, witness.head.mac):
            return bad(seq, f"record {seq} differs from the head {witness.source} recorded")
    return VerifyReport(True, checked, start.seq + 1, last.seq)


@dataclass(frozen=True)
class AuditFilter:
    """Which records ``list_records`` returns (empty fields match everything)."""

    since: datetime | None = None
    until: datetime | None = None
    actor: str = ""
    action: str = ""
    resource: str = ""
    outcome: str = ""
    after_seq: int = 0
    limit: int = 100
    newest_first: bool = False


@dataclass(frozen=True)
class ChainState:
    """Everything verification needs besides the records: the anchor, the head row, the witnesses."""

    anchor: Head
    anchor_key_id: str
    anchor_seal: bytes
    head: Head
    witnesses: tuple[Witness, ...]
