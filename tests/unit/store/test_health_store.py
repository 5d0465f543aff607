"""Health storage, run unchanged on SQLite and on PostgreSQL (``store_url`` is parametrized)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import inspect
from sqlalchemy.exc import IntegrityError

from clonebox_controller.store import Store
from clonebox_controller.store.engine import current_revision
from clonebox_core.health import (
    ActionKind,
    ActionRecord,
    Aggregate,
    CheckStatus,
    HealthState,
    ProbeResult,
    ProbeType,
    Sample,
    Transition,
    VmHealth,
)
from tests.unit.store.conftest import HEAD_REVISION, add_host_row, migrate_to
from tests.unit.store.test_store import register, reserve, spec

H = HealthState
T0 = datetime(2030, 1, 2, 3, 4, 0, tzinfo=UTC)


class Clock:
    """A settable aware-UTC clock."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(store_url: str, clock: Clock) -> Iterator[Store]:
    with Store.open(store_url, clock=clock) as s:
        yield s


def health(vm: str, state: HealthState, host: str = "h1", check_state: HealthState | None = None) -> VmHealth:
    """A VmHealth with one http check in ``check_state`` (default: the VM's state)."""
    last = ProbeResult("web", Sample.PASS, "200 OK", T0, duration_us=1500)
    check = CheckStatus("web", ProbeType.HTTP, check_state or state, True, consecutive_successes=2, last=last, since=T0)
    return VmHealth(vm, host, state, (check,), since=T0, updated=T0)


def tr(vm: str, check: str, a: HealthState, b: HealthState, minutes: int = 0, detail: str = "") -> Transition:
    return Transition(vm, "claimed-by-agent", check, a, b, T0 + timedelta(minutes=minutes), detail)


def agg(vm: str, minute: int, passes: int, check: str = "web") -> Aggregate:
    return Aggregate(
        vm, check, T0 + timedelta(minutes=minute), passes=passes, failures=1, duration_us_sum=9, duration_us_max=5
    )


def action(vm: str, minutes: int = 0, outcome: str = "done") -> ActionRecord:
    return ActionRecord(
        vm, "web", "on_failure", ActionKind.RESTART, outcome, "restarted", T0 + timedelta(minutes=minutes)
    )


def test_apply_stores_current_transitions_minutes_and_actions(store: Store) -> None:
    doc = health("web-1", H.HEALTHY)
    stored = store.apply_health_update(
        "h1",
        doc,
        [tr("web-1", "web", H.UNKNOWN, H.HEALTHY), tr("web-1", "", H.UNKNOWN, H.HEALTHY)],
        [agg("web-1", 0, 6)],
        [action("web-1")],
    )
    assert [t.check for t in stored] == ["web", ""]
    assert stored[0].seq > 0 and stored[1].seq == stored[0].seq + 1
    assert all(t.host == "h1" for t in stored)  # the session's host, not what the agent claimed
    assert store.get_health("web-1") == doc
    assert store.get_health("nope") is None
    transitions, minutes, actions = store.health_history("web-1", T0 - timedelta(hours=1))
    assert transitions == stored
    assert minutes == [agg("web-1", 0, 6)]
    assert actions == [action("web-1")]
    more = store.apply_health_update("h1", None, [tr("web-1", "web", H.HEALTHY, H.DEGRADED, 1)])
    assert more[0].seq > stored[1].seq
    assert (
        store.health_seq_range()
        == (stored[0].seq, more[0].seq)
        == (store.health_min_retained_seq(), store.health_max_seq())
    )


def test_apply_is_one_transaction(store: Store) -> None:
    broken = dataclasses.replace(agg("web-1", 0, 1), passes=None)  # type: ignore[arg-type]  # NOT NULL
    with pytest.raises(IntegrityError):
        store.apply_health_update(
            "h1", health("web-1", H.HEALTHY), [tr("web-1", "web", H.UNKNOWN, H.HEALTHY)], [broken]
        )
    assert store.get_health("web-1") is None
    assert store.health_max_seq() == 0
    assert store.health_history("web-1", T0 - timedelta(days=1)) == ([], [], [])


def test_a_state_change_without_a_vm_transition_gets_one(store: Store) -> None:
    [first] = store.apply_health_update("h1", health("web-1", H.HEALTHY))
    assert (first.check, first.from_state, first.to_state, first.detail) == ("", H.UNKNOWN, H.HEALTHY, "first report")
    assert store.apply_health_update("h1", health("web-1", H.HEALTHY)) == []  # unchanged: nothing
    # the agent's own VM-level transition is not doubled
    [own] = store.apply_health_update("h1", health("web-1", H.DEGRADED), [tr("web-1", "", H.HEALTHY, H.DEGRADED)])
    assert own.detail == ""
    # a snapshot after a reconnect carries no transitions: the change becomes one
    [resync] = store.apply_health_update("h1", health("web-1", H.UNHEALTHY))
    assert (resync.from_state, resync.to_state, resync.detail) == (H.DEGRADED, H.UNHEALTHY, "as reported by host h1")


def test_an_update_about_a_vm_placed_on_another_host_stores_nothing(store: Store) -> None:
    for name in ("h1", "h2"):
        register(store, name)
    reserve(store, spec("web-1"), host="h2")
    late = [tr("web-1", "web", H.UNKNOWN, H.HEALTHY)]
    assert store.apply_health_update("h1", health("web-1", H.HEALTHY), late, placed_on_host="web-1") is None
    assert store.get_health("web-1") is None
    assert store.health_max_seq() == 0
    # from the VM's own host it is stored; so is one about a VM the fleet does not know (yet)
    stored = store.apply_health_update("h2", health("web-1", H.HEALTHY, host="h2"), late, placed_on_host="web-1")
    assert stored is not None and [t.check for t in stored] == ["web", ""]
    adopted = store.apply_health_update("h1", health("new-1", H.HEALTHY), placed_on_host="new-1")
    assert adopted is not None and [t.vm for t in adopted] == ["new-1"]
    assert store.get_health("new-1") == health("new-1", H.HEALTHY)


def test_aggregates_replace_and_actions_deduplicate(store: Store) -> None:
    store.apply_health_update(
        "h1", None, aggregates=[agg("web-1", 0, 3), agg("web-1", 1, 3)], actions=[action("web-1")]
    )
    # the agent reconnects and sends the same minute (and action) again, with fuller counts
    store.apply_health_update("h1", None, aggregates=[agg("web-1", 0, 6)], actions=[action("web-1")])
    store.apply_health_update("h1", None, aggregates=[agg("web-1", 0, 6)])
    _, minutes, actions = store.health_history("web-1", T0)
    assert [(a.minute, a.passes) for a in minutes] == [(T0, 6), (T0 + timedelta(minutes=1), 3)]
    assert len(actions) == 1


def test_transitions_after_filters(store: Store) -> None:
    store.apply_health_update("h1", None, [tr("web-1", "web", H.UNKNOWN, H.HEALTHY)])
    store.apply_health_update("h2", None, [tr("db-1", "pg", H.UNKNOWN, H.UNHEALTHY)])
    store.apply_health_update("h1", None, [tr("web-1", "web", H.HEALTHY, H.DEGRADED)])
    every = store.health_transitions_after(0)
    assert [(t.vm, t.to_state) for t in every] == [("web-1", H.HEALTHY), ("db-1", H.UNHEALTHY), ("web-1", H.DEGRADED)]
    assert store.health_transitions_after(every[0].seq) == every[1:]
    assert store.health_transitions_after(0, names=["web-1"]) == [every[0], every[2]]
    assert store.health_transitions_after(0, names=[]) == []
    # a state filter matches the state before or after
    assert store.health_transitions_after(0, states=[H.HEALTHY]) == [every[0], every[2]]
    assert store.health_transitions_after(0, limit=2) == every[:2]


def test_history_filters_and_keeps_the_newest(store: Store) -> None:
    states = [H.HEALTHY, H.DEGRADED]
    for i in range(10):
        store.apply_health_update("h1", None, [tr("web-1", "web", states[i % 2], states[(i + 1) % 2], minutes=i)])
    store.apply_health_update("h1", None, [tr("web-1", "ssh", H.UNKNOWN, H.HEALTHY, minutes=3)])
    store.apply_health_update("h1", None, [tr("other", "web", H.UNKNOWN, H.HEALTHY, minutes=3)])
    store.apply_health_update(
        "h1", None, aggregates=[agg("web-1", 0, 1), agg("web-1", 5, 1), agg("web-1", 5, 1, "ssh")]
    )
    store.apply_health_update("h1", None, actions=[action("web-1", 1), action("web-1", 7)])
    transitions, minutes, actions = store.health_history("web-1", T0, "web", limit=3)
    assert [t.time for t in transitions] == [T0 + timedelta(minutes=m) for m in (7, 8, 9)]  # newest kept, oldest first
    assert [(m.minute, m.check) for m in minutes] == [(T0, "web"), (T0 + timedelta(minutes=5), "web")]
    assert [a.time for a in actions] == [T0 + timedelta(minutes=1), T0 + timedelta(minutes=7)]
    since = T0 + timedelta(minutes=3)
    transitions, minutes, actions = store.health_history("web-1", since)
    assert {t.check for t in transitions} == {"web", "ssh"} and all(t.time >= since for t in transitions)
    assert {m.check for m in minutes} == {"web", "ssh"} and all(m.minute >= since for m in minutes)
    assert [a.time for a in actions] == [T0 + timedelta(minutes=7)]
    assert store.health_history("nobody", T0) == ([], [], [])


def test_list_and_remove_current(store: Store) -> None:
    store.apply_health_update("h1", health("web-1", H.HEALTHY))
    store.apply_health_update("h1", health("web-2", H.UNHEALTHY))
    store.apply_health_update("h2", health("db-1", H.HEALTHY))
    assert [h.vm for h in store.list_health()] == ["db-1", "web-1", "web-2"]
    assert [h.vm for h in store.list_health(states=[H.HEALTHY])] == ["db-1", "web-1"]
    assert [h.vm for h in store.list_health(names=["web-2", "zzz"])] == ["web-2"]
    assert [h.vm for h in store.list_health(host="h1")] == ["web-1", "web-2"]
    # a host that no longer runs a VM cannot drop the health its new host reports
    store.apply_health_update("h2", None, removed=["web-1"])
    assert store.get_health("web-1") is not None
    store.apply_health_update("h1", None, removed=["web-1"])
    assert store.get_health("web-1") is None
    assert len(store.health_history("web-1", T0 - timedelta(days=1))[0]) == 1  # history stays


def test_mark_unknown(store: Store, clock: Clock) -> None:
    store.apply_health_update("h1", health("web-1", H.HEALTHY))
    store.apply_health_update("h1", health("web-2", H.UNKNOWN, check_state=H.HEALTHY))
    store.apply_health_update("h2", health("db-1", H.HEALTHY))
    clock.now = T0 + timedelta(minutes=5)
    changed = store.mark_health_unknown("h1", "host unreachable")
    assert [(h.vm, h.state, [c.state for c in h.checks]) for h, _ in changed] == [
        ("web-1", H.UNKNOWN, [H.UNKNOWN]),
        ("web-2", H.UNKNOWN, [H.UNKNOWN]),
    ]
    web1, web2 = (t for _, t in changed)
    assert web2 is None  # it was UNKNOWN already: only its check changed
    assert web1 is not None and (web1.from_state, web1.to_state, web1.detail) == (
        H.HEALTHY,
        H.UNKNOWN,
        "host unreachable",
    )
    assert web1.seq == store.health_max_seq() and web1.time == clock.now
    assert store.get_health("web-1") == changed[0][0]
    assert store.mark_health_unknown("h1", "host unreachable") == []  # nothing left to change
    assert store.get_health("db-1") == health("db-1", H.HEALTHY, host="h2")


def test_prune_keeps_the_newest_transition_and_seq_never_restarts(store: Store) -> None:
    for i in range(3):
        store.apply_health_update("h1", None, [tr("web-1", "web", H.HEALTHY, H.DEGRADED, minutes=i)])
    store.apply_health_update("h1", None, aggregates=[agg("web-1", 0, 1), agg("web-1", 10, 1)])
    store.apply_health_update("h1", None, actions=[action("web-1", 0), action("web-1", 10)])
    low, high = store.health_seq_range()
    cut = T0 + timedelta(minutes=1, seconds=30)
    assert store.prune_health(cut, T0 + timedelta(minutes=5), T0 + timedelta(minutes=5)) == (2, 1, 1)
    assert store.health_seq_range() == (high, high)
    _, minutes, actions = store.health_history("web-1", T0 - timedelta(days=1))
    assert [m.minute for m in minutes] == [T0 + timedelta(minutes=10)]
    assert [a.time for a in actions] == [T0 + timedelta(minutes=10)]
    # everything is old now, but the newest transition stays: seq continues from it
    assert store.prune_health(T0 + timedelta(days=1), T0, T0) == (0, 0, 0)
    [after] = store.apply_health_update("h1", None, [tr("web-1", "web", H.DEGRADED, H.HEALTHY, minutes=2)])
    assert after.seq == high + 1 > low
    assert store.prune_health(T0 + timedelta(days=1), T0, T0)[0] == 1
    assert store.health_seq_range() == (after.seq, after.seq)


def test_upgrade_from_0003_keeps_data(store_url: str) -> None:
    assert "health_current" not in migrate_to(store_url, "0003")
    add_host_row(store_url, "h1")  # a 0003 database with a host in it
    with Store.open(store_url) as new:
        assert current_revision(new.engine) == HEAD_REVISION
        assert {"health_current", "health_transitions", "health_minutes", "health_actions"} <= set(
            inspect(new.engine).get_table_names()
        )
        assert [h.name for h in new.list_hosts()] == ["h1"]
        [first] = new.apply_health_update("h1", health("web-1", H.HEALTHY))
        assert first.seq == 1
    # and back down, and up again
    assert "health_transitions" not in migrate_to(store_url, "0003", down=True)
    with Store.open(store_url) as again:
        assert again.health_max_seq() == 0 and [h.name for h in again.list_hosts()] == ["h1"]
