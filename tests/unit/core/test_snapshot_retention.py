"""``decide_retention``: every rule, their combinations, reasons, and the current state's protection."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from clonebox_core.errors import InvalidArgument
from clonebox_core.model import VmState
from clonebox_core.snapshots import (
    PruneDecision,
    Snapshot,
    SnapshotKind,
    SnapshotPolicy,
    check_policy,
    decide_retention,
)

NOW = datetime(2030, 1, 15, 12, 30, tzinfo=UTC)  # a Tuesday


def snap(name: str, ago: timedelta, *, parent: str = "", current: bool = False, size: int = 0) -> Snapshot:
    return Snapshot(
        name=name,
        vm="web",
        kind=SnapshotKind.INTERNAL,
        create_time=NOW - ago,
        vm_state=VmState.RUNNING,
        parent=parent,
        current=current,
        size_bytes=size,
    )


def chain(*ages_hours: float, sizes: int = 0) -> list[Snapshot]:
    """A linear chain s0 (oldest) ... sN (newest, current), ``ages_hours`` oldest first."""
    out = []
    for i, hours in enumerate(ages_hours):
        out.append(snap(f"s{i}", timedelta(hours=hours), parent=f"s{i - 1}" if i else "", size=sizes))
    return out


def flat(*ages_hours: float, size: int = 0) -> list[Snapshot]:
    """Siblings (no current snapshot): nothing is protected."""
    return [snap(f"s{i}", timedelta(hours=h), size=size) for i, h in enumerate(ages_hours)]


def kept(decisions: list[PruneDecision]) -> set[str]:
    return {d.name for d in decisions if d.keep}


def reasons(decisions: list[PruneDecision]) -> dict[str, str]:
    return {d.name: d.reason for d in decisions}


def test_empty_policy_deletes_nothing() -> None:
    out = decide_retention(flat(1, 2, 3000), SnapshotPolicy(), NOW)
    assert kept(out) == {"s0", "s1", "s2"} and set(reasons(out).values()) == {"no retention policy"}


def test_decisions_come_newest_first_one_per_snapshot() -> None:
    out = decide_retention(flat(5, 1, 3), SnapshotPolicy(keep_last=1), NOW)
    assert [d.name for d in out] == ["s1", "s2", "s0"]


def test_keep_last() -> None:
    out = decide_retention(flat(1, 2, 3, 4), SnapshotPolicy(keep_last=2), NOW)
    assert kept(out) == {"s0", "s1"}
    assert reasons(out)["s0"] == "keep_last 2" and reasons(out)["s3"] == "not kept by keep_last 2"


def test_keep_hourly_keeps_newest_of_each_recent_hour() -> None:
    # 12:20, 12:10 (same hour), 11:50, 10:40, 08:00; keep 3 hours -> 12:20, 11:50, 10:40
    snaps = flat(10 / 60, 20 / 60, 40 / 60, 110 / 60, 4.5)
    out = decide_retention(snaps, SnapshotPolicy(keep_hourly=3), NOW)
    assert kept(out) == {"s0", "s2", "s3"}
    assert reasons(out)["s0"] == "keep_hourly 3 (2030-01-15T12)"


def test_keep_daily_counts_days_that_have_snapshots() -> None:
    # a long gap: the 2 most recent days *with* snapshots are kept, not the last 2 calendar days
    snaps = flat(24 * 30, 24 * 30 + 1, 24 * 40, 24 * 50)
    out = decide_retention(snaps, SnapshotPolicy(keep_daily=2), NOW)
    assert kept(out) == {"s0", "s2"}
    assert reasons(out)["s2"].startswith("keep_daily 2 (")


def test_keep_weekly_uses_iso_weeks() -> None:
    # NOW is Tue 2030-01-15 (ISO week 3); Mon 14th is the same week; Sun 13th is week 2
    snaps = flat(1, 24 + 1, 48 + 1, 24 * 7 + 1)
    out = decide_retention(snaps, SnapshotPolicy(keep_weekly=2), NOW)
    assert kept(out) == {"s0", "s2"}
    assert reasons(out)["s0"] == "keep_weekly 2 (2030-W03)" and reasons(out)["s2"] == "keep_weekly 2 (2030-W02)"


def test_rules_combine_as_a_union_first_rule_names_the_reason() -> None:
    snaps = flat(1, 2, 30, 60)
    out = decide_retention(snaps, SnapshotPolicy(keep_last=1, keep_daily=3), NOW)
    assert kept(out) == {"s0", "s2", "s3"}
    assert reasons(out)["s0"] == "keep_last 1" and reasons(out)["s1"] == "not kept by keep_last 1, keep_daily 3"


def test_max_age_alone() -> None:
    out = decide_retention(flat(1, 47, 49), SnapshotPolicy(max_age_seconds=2 * 86400), NOW)
    assert kept(out) == {"s0", "s1"}
    assert reasons(out) == {
        "s0": "younger than max_age 2d",
        "s1": "younger than max_age 2d",
        "s2": "older than max_age 2d",
    }


def test_max_age_spares_what_a_keep_rule_keeps() -> None:
    out = decide_retention(flat(100, 200, 300), SnapshotPolicy(keep_last=1, max_age_seconds=3600), NOW)
    assert kept(out) == {"s0"} and reasons(out)["s1"] == "older than max_age 1h"


def test_max_age_with_keep_rule_keeps_young_ones() -> None:
    out = decide_retention(flat(0.1, 0.2, 0.3, 5), SnapshotPolicy(keep_last=1, max_age_seconds=3600), NOW)
    assert kept(out) == {"s0", "s1", "s2"}


def test_max_total_bytes_deletes_oldest_until_under() -> None:
    out = decide_retention(flat(1, 2, 3, 4, size=10), SnapshotPolicy(max_total_bytes=25), NOW)
    assert kept(out) == {"s0", "s1"}
    assert (
        reasons(out)["s3"].startswith("over max_total_bytes 25") and reasons(out)["s0"] == "within max_total_bytes 25"
    )


def test_max_total_bytes_never_deletes_keep_rule_snapshots() -> None:
    out = decide_retention(
        flat(1, 2, 3, size=10), SnapshotPolicy(keep_last=3, max_total_bytes=5, max_age_seconds=86400), NOW
    )
    assert kept(out) == {"s0", "s1", "s2"}


def test_max_total_bytes_after_max_age() -> None:
    snaps = flat(1, 2, 3, 100, size=10)
    out = decide_retention(snaps, SnapshotPolicy(max_age_seconds=86400, max_total_bytes=20), NOW)
    assert kept(out) == {"s0", "s1"}
    assert reasons(out)["s3"] == "older than max_age 1d" and reasons(out)["s2"].startswith("over max_total_bytes")


def test_current_is_never_deleted_but_its_ancestors_are_not_protected() -> None:
    snaps = chain(500, 400, 300)  # s0 <- s1 <- s2
    snaps = [*snaps[:2], snap("s2", timedelta(hours=300), parent="s1", current=True), snap("x", timedelta(hours=1))]
    policy = SnapshotPolicy(keep_last=1, max_age_seconds=3600, max_total_bytes=1)
    out = decide_retention(snaps, policy, NOW)
    assert kept(out) == {"s2", "x"}
    assert reasons(out)["s2"] == "current state of the VM"
    assert reasons(out)["s0"] == "older than max_age 1h"


def test_keep_last_prunes_a_linear_chain() -> None:
    # the usual shape: each snapshot the child of the one before, the newest current
    snaps = [snap(f"s{i}", timedelta(hours=10 - i), parent=f"s{i - 1}" if i else "", current=i == 9) for i in range(10)]
    out = decide_retention(snaps, SnapshotPolicy(keep_last=3), NOW)
    assert kept(out) == {"s7", "s8", "s9"}


def test_only_the_current_snapshot_is_protected_not_its_branch() -> None:
    snaps = [
        snap("root", timedelta(hours=10)),
        snap("old-branch", timedelta(hours=9), parent="root"),
        snap("cur", timedelta(hours=8), parent="root", current=True),
    ]
    out = decide_retention(snaps, SnapshotPolicy(max_age_seconds=3600), NOW)
    assert kept(out) == {"cur"}


def test_future_snapshots_are_new() -> None:
    out = decide_retention([snap("f", timedelta(hours=-1))], SnapshotPolicy(max_age_seconds=60), NOW)
    assert kept(out) == {"f"}


@pytest.mark.parametrize(
    ("policy", "field"),
    [
        (SnapshotPolicy(keep_last=1001), "policy.keep_last"),
        (SnapshotPolicy(keep_weekly=-1), "policy.keep_weekly"),
        (SnapshotPolicy(max_age_seconds=-5), "policy.max_age_seconds"),
        (SnapshotPolicy(max_total_bytes=-1), "policy.max_total_bytes"),
    ],
)
def test_check_policy_names_the_field(policy: SnapshotPolicy, field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        check_policy(policy)
    assert info.value.metadata["field"] == field


def test_check_policy_accepts_bounds() -> None:
    assert check_policy(SnapshotPolicy(keep_last=1000, max_age_seconds=0)).keep_last == 1000
