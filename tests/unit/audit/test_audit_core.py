"""Core audit pieces: events, keys, the chain verifier and the head file."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from clonebox_cli.audit import parse_when
from clonebox_core.audit.chain import (
    GENESIS,
    ChainRecord,
    Head,
    Keyring,
    Witness,
    ensure_key_file,
    read_key_file,
    verify,
)
from clonebox_core.audit.event import AuditEvent, Outcome, new_event, outcome_of_code
from clonebox_core.audit.headfile import HeadFile
from clonebox_core.errors import FailedPrecondition, InvalidArgument

KEYS = Keyring({"old": b"o" * 32, "new": b"n" * 32}, "new")
WHEN = datetime(2026, 11, 26, 12, 0, 0, 123456, tzinfo=UTC)


def ev(n: int) -> AuditEvent:
    return AuditEvent(str(n), WHEN, "spiffe://t/user/admin/a", "vm.start", f"vms/v{n}", Outcome.SUCCEEDED)


def chain(n: int, keyring: Keyring = KEYS) -> list[ChainRecord]:
    out, prev = [], GENESIS
    for i in range(1, n + 1):
        mac = keyring.mac(prev.mac, i, ev(i))
        out.append(ChainRecord(i, keyring.current, prev.mac, mac, ev(i)))
        prev = Head(i, mac)
    return out


def test_event_json_round_trip_and_redaction_of_long_details() -> None:
    event = new_event("vm.create", "vms/a", Outcome.ACCEPTED, details={"x": "y" * 2000, "n": 3}, actor="me")
    back = AuditEvent.from_json(event.to_json())
    assert back == event
    assert len(event.details["x"]) == 512 and event.details["n"] == "3"
    with pytest.raises(ValueError):
        AuditEvent.from_json({"id": "1"})


def test_outcome_of_code() -> None:
    assert outcome_of_code("OK") is Outcome.SUCCEEDED
    assert outcome_of_code("PERMISSION_DENIED") is Outcome.REJECTED
    assert outcome_of_code("INVALID_ARGUMENT") is Outcome.REJECTED
    assert outcome_of_code("INTERNAL") is Outcome.FAILED
    assert outcome_of_code("UNAVAILABLE") is Outcome.FAILED


def test_rotated_keys_verify_old_records_and_sign_new_ones() -> None:
    old = Keyring({"old": b"o" * 32}, "old")
    records = chain(3, old)
    prev = Head(3, records[-1].mac)
    mac4 = KEYS.mac(prev.mac, 4, ev(4))
    records.append(ChainRecord(4, "new", prev.mac, mac4, ev(4)))
    assert verify(records, KEYS).ok
    report = verify(records, Keyring({"new": b"n" * 32}, "new"))
    assert not report.ok and report.bad_seq == 1 and "unknown key" in report.problem


def test_a_different_key_cannot_forge() -> None:
    forged = chain(3, Keyring({"new": b"x" * 32}, "new"))
    report = verify(forged, KEYS)
    assert not report.ok and report.bad_seq == 1


def test_witness_mismatch_and_ahead() -> None:
    records = chain(5)
    assert verify(records, KEYS, witnesses=[Witness("w", Head(3, records[2].mac))]).ok
    bad = verify(records, KEYS, witnesses=[Witness("w", Head(3, b"\0" * 32))])
    assert not bad.ok and bad.bad_seq == 3 and "differs" in bad.problem
    ahead = verify(records, KEYS, witnesses=[Witness("the head file", Head(7, b"\0" * 32))])
    assert not ahead.ok and ahead.bad_seq == 6 and "6..7" in ahead.problem


def test_keyring_rejects_short_and_unknown_keys() -> None:
    with pytest.raises(InvalidArgument, match="at least 32"):
        Keyring({"k": b"short"}, "k")
    with pytest.raises(InvalidArgument, match=r"audit\.current_key"):
        Keyring({"k": b"k" * 32}, "other")
    assert "k" * 32 not in repr(Keyring({"k": b"k" * 32}, "k"))


def test_key_files_must_be_private(tmp_path: Path) -> None:
    path = tmp_path / "audit.key"
    key = ensure_key_file(path)
    assert len(key) == 32 and os.stat(path).st_mode & 0o777 == 0o600
    assert ensure_key_file(path) == key  # created once, then reused
    os.chmod(path, 0o644)
    with pytest.raises(FailedPrecondition, match="chmod 600"):
        read_key_file(path, "audit.keys.k1")
    with pytest.raises(FailedPrecondition, match="does not exist"):
        read_key_file(tmp_path / "missing", "audit.keys.k1")


def test_head_file_keeps_the_highest_head_and_skips_torn_lines(tmp_path: Path) -> None:
    hf = HeadFile(tmp_path / "head.log")
    assert hf.latest() is None
    hf.append(Head(5, b"\x05" * 32))
    hf.append(Head(3, b"\x03" * 32))  # another process may append an older head later
    with open(hf.path, "a") as fh:
        fh.write("9 abc")  # a torn line
    assert hf.latest() == Head(5, b"\x05" * 32)


def test_parse_when() -> None:
    now = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
    assert parse_when("2h", "--since", now) == datetime(2026, 11, 26, 10, 0, tzinfo=UTC)
    assert parse_when("7d", "--since", now).day == 19
    assert parse_when("2026-11-26T10:00:00", "--since") == datetime(2026, 11, 26, 10, 0, tzinfo=UTC)
    with pytest.raises(InvalidArgument, match="--before"):
        parse_when("yesterday", "--before")
