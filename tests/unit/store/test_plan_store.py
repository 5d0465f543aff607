"""Plan storage (revisions, runs, leases), run unchanged on SQLite and on PostgreSQL (``store_url``)."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import pytest
from sqlalchemy import create_engine, inspect

from clonebox_controller.store import Store
from clonebox_controller.store.engine import current_revision
from clonebox_core.audit.chain import AuditFilter
from clonebox_core.audit.event import AuditEvent, Outcome, new_event
from clonebox_core.errors import Aborted, AlreadyExists, FailedPrecondition, NotFound, ResourceExhausted
from clonebox_core.health import HttpProbe, Probe, ProbeType
from clonebox_core.model import CloudInit, DiskSpec, HostState, Resources, VmSpec, VmState
from clonebox_core.plan import (
    ChangeKind,
    Condition,
    Dependency,
    FailurePolicy,
    Plan,
    PlanRun,
    PlanVm,
    RunState,
    UpdatePolicy,
    VmRunState,
    VmStatus,
)
from clonebox_core.secret import Secret
from tests.unit.store.conftest import HEAD_REVISION, add_host_row, migrate_to
from tests.unit.store.test_store import create_op, observed, register

T0 = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
R = TypeVar("R")


class Clock:
    """A settable aware-UTC clock."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(store_url: str, clock: Clock) -> Iterator[Store]:
    with Store.open(store_url, clock=clock) as s:
        yield s


def make_plan(name: str = "shop", vcpus: int = 1, services: tuple[str, ...] = ("db", "web")) -> Plan:
    """A plan whose services each have a VM named ``<plan>-<service>``; later ones depend on the first."""
    vms = tuple(
        PlanVm(
            service=service,
            spec=VmSpec(f"{name}-{service}", vcpus=vcpus, memory_mib=512, disks=(DiskSpec("root", size_mib=1024),)),
            depends_on=() if i == 0 else (Dependency(services[0], Condition.HEALTHY),),
        )
        for i, service in enumerate(services)
    )
    return Plan(
        name=name,
        vms=vms,
        update=UpdatePolicy(max_parallel=2),
        on_failure=FailurePolicy.ROLLBACK,
        source=f"# {name}\n",
    )


def status(plan: str, service: str, state: VmRunState = VmRunState.PENDING, **kw: object) -> VmStatus:
    return VmStatus(service=service, vm=f"{plan}-{service}", state=state, **kw)  # type: ignore[arg-type]


def make_run(
    run_id: str,
    plan: str = "shop",
    revision: int = 1,
    request_id: str = "",
    services: tuple[str, ...] = ("db", "web"),
    action: str = "up",
) -> PlanRun:
    return PlanRun(
        id=run_id,
        plan=plan,
        revision=revision,
        action=action,
        state=RunState.RUNNING,
        vms=tuple(status(plan, s, change=ChangeKind.CREATE) for s in services),
        request_id=request_id,
        options={"allow_replace": True},
    )


def audit_event(action: str, resource: str) -> AuditEvent:
    return new_event(action, resource, Outcome.SUCCEEDED, actor="spiffe://t/user/admin/alice")


def audit_actions(store: Store) -> list[str]:
    return [r.event.action for r in store.list_audit(AuditFilter(limit=1000))]


def in_threads(n: int, fn: Callable[[int], R]) -> list[R]:
    """Run ``fn(0..n-1)`` in n threads started together; their results (re-raising the first error)."""
    barrier = threading.Barrier(n)
    results: list[R | None] = [None] * n
    errors: list[BaseException] = []

    def body(i: int) -> None:
        try:
            barrier.wait()
            results[i] = fn(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    if errors:
        raise errors[0]
    return [r for r in results if r is not None]


# ------------------------------------------------------------------------------------ revisions


def test_revisions_are_numbered_and_an_equal_digest_writes_nothing(store: Store, clock: Clock) -> None:
    first, added = store.save_plan_revision(make_plan(), audit_event("plan.apply", "plans/shop"))
    assert added and first.revision == 1 and first.create_time == T0 and first.digest
    assert first.vms == make_plan().vms and first.source == "# shop\n"

    clock.advance(60)
    same, added = store.save_plan_revision(make_plan(), audit_event("plan.apply", "plans/shop"))
    assert not added
    assert (same.revision, same.digest, same.create_time) == (1, first.digest, T0)
    # a plan read back from the store and saved again is the same plan, whatever revision it carries
    again, added = store.save_plan_revision(store.get_plan("shop"))
    assert not added and again.revision == 1
    assert audit_actions(store) == ["plan.apply"]  # the no-ops wrote no audit record either

    second, added = store.save_plan_revision(make_plan(vcpus=2))
    assert added and second.revision == 2 and second.create_time == clock.now and second.digest != first.digest
    current = store.get_plan("shop")
    assert current.revision == 2 and current.vms[0].spec.vcpus == 2 and current.create_time == clock.now
    old = store.get_plan("shop", 1)
    assert old.revision == 1 and old.vms[0].spec.vcpus == 1 and old.digest == first.digest
    assert old.vms[1].depends_on == (Dependency("db", Condition.HEALTHY),)
    assert old.update == UpdatePolicy(max_parallel=2)
    # going back to revision 1's content is a change too: a new revision, not a rewind
    third, added = store.save_plan_revision(make_plan())
    assert added and third.revision == 3 and third.digest == first.digest


def test_get_of_a_missing_plan_or_revision_is_not_found(store: Store) -> None:
    with pytest.raises(NotFound) as missing:
        store.get_plan("nope")
    assert missing.value.reason == "PLAN_NOT_FOUND" and missing.value.metadata == {"plan": "nope"}
    assert "nope" in missing.value.message
    store.save_plan_revision(make_plan())
    with pytest.raises(NotFound) as no_revision:
        store.get_plan("shop", 7)
    assert no_revision.value.reason == "PLAN_NOT_FOUND"
    assert no_revision.value.metadata == {"plan": "shop", "revision": "7"}
    assert "7" in no_revision.value.message
    with pytest.raises(NotFound):
        store.mark_plan_destroyed("nope")
    with pytest.raises(NotFound):
        store.is_plan_destroyed("nope")


def test_list_plans_shows_current_revisions_by_name(store: Store) -> None:
    assert store.list_plans() == []
    store.save_plan_revision(make_plan("web"))
    store.save_plan_revision(make_plan("api"))
    store.save_plan_revision(make_plan("web", vcpus=3))
    listed = store.list_plans()
    assert [(p.name, p.revision) for p in listed] == [("api", 1), ("web", 2)]
    assert listed[1].vms[0].spec.vcpus == 3


def test_a_destroyed_plan_is_hidden_kept_and_current_again_when_saved(store: Store, clock: Clock) -> None:
    store.save_plan_revision(make_plan("api"))
    store.save_plan_revision(make_plan())
    store.mark_plan_destroyed("shop")
    assert store.is_plan_destroyed("shop")
    assert [p.name for p in store.list_plans()] == ["api"]
    assert [p.name for p in store.list_plans(include_destroyed=True)] == ["api", "shop"]
    # still readable: the engine and `clonebox` show a destroyed plan's history
    assert store.get_plan("shop").revision == 1

    clock.advance(5)
    again, added = store.save_plan_revision(make_plan())  # same content, but it was destroyed
    assert added and again.revision == 2 and again.create_time == clock.now
    assert not store.is_plan_destroyed("shop")
    assert [p.name for p in store.list_plans()] == ["api", "shop"]
    # un-marking is possible too (a destroy that failed half-way leaves the plan current)
    store.mark_plan_destroyed("shop")
    store.mark_plan_destroyed("shop", destroyed=False)
    assert not store.is_plan_destroyed("shop")


def test_concurrent_saves_never_share_or_skip_a_revision(store_url: str, clock: Clock) -> None:
    per_thread = 8
    with Store.open(store_url, clock=clock) as a, Store.open(store_url, clock=clock) as b:
        stores = (a, b)

        def save(i: int) -> list[int]:
            # every save is new content (vcpus differ), and the first one of each thread races to
            # create the plan
            return [
                stores[i].save_plan_revision(make_plan(vcpus=100 * (i + 1) + k))[0].revision for k in range(per_thread)
            ]

        revisions = in_threads(2, save)
        everything = sorted(revisions[0] + revisions[1])
        assert everything == list(range(1, 2 * per_thread + 1))
        assert all(r == sorted(r) for r in revisions)
        assert a.get_plan("shop").revision == 2 * per_thread


# ----------------------------------------------------------------------------------------- runs


def test_create_run_stores_the_run_with_its_vms(store: Store, clock: Clock) -> None:
    store.save_plan_revision(make_plan())
    clock.advance(1)
    run, created = store.create_run(make_run("run-1", request_id="req-1"), audit_event("plan.apply", "plans/shop"))
    assert created and run.version == 1 and run.create_time == run.update_time == clock.now
    assert run.state is RunState.RUNNING and run.options == {"allow_replace": True} and run.request_id == "req-1"
    assert [(v.service, v.vm, v.change, v.update_time) for v in run.vms] == [
        ("db", "shop-db", ChangeKind.CREATE, clock.now),
        ("web", "shop-web", ChangeKind.CREATE, clock.now),
    ]
    assert audit_actions(store) == ["plan.apply"]
    with pytest.raises(NotFound) as missing:
        store.get_run("run-2")
    assert missing.value.reason == "PLAN_RUN_NOT_FOUND" and missing.value.metadata == {"run": "run-2"}
    with pytest.raises(NotFound) as no_plan:
        store.create_run(make_run("run-3", plan="nope"))
    assert no_plan.value.reason == "PLAN_NOT_FOUND"


def test_create_run_is_idempotent_by_request_id(store: Store, clock: Clock) -> None:
    store.save_plan_revision(make_plan())
    store.save_plan_revision(make_plan("other"))
    first, created = store.create_run(make_run("run-1", request_id="req-1"))
    assert created
    clock.advance(1)
    # a retry (new run id, same request id) gets the first run back, even while it runs
    again, created = store.create_run(make_run("run-2", request_id="req-1"))
    assert not created and again == first
    store.update_run("run-1", state=RunState.SUCCEEDED)
    again, created = store.create_run(make_run("run-2", request_id="req-1"))
    assert not created and again.id == "run-1" and again.state is RunState.SUCCEEDED
    # request ids are per plan
    other, created = store.create_run(make_run("run-3", plan="other", request_id="req-1"))
    assert created and other.plan == "other"
    # runs without a request id never match each other
    _, created = store.create_run(make_run("run-4"))
    assert created
    store.update_run("run-4", state=RunState.FAILED)
    _, created = store.create_run(make_run("run-5"))
    assert created
    assert [r.id for r in store.list_runs("shop")] == ["run-5", "run-4", "run-1"]
    store.update_run("run-5", state=RunState.SUCCEEDED)
    with pytest.raises(AlreadyExists) as dup:
        store.create_run(make_run("run-5"))
    assert dup.value.reason == "PLAN_RUN_ALREADY_EXISTS"


@pytest.mark.parametrize("blocking", [RunState.RUNNING, RunState.ROLLING_BACK])
def test_a_second_run_while_one_is_unfinished_is_aborted(store: Store, blocking: RunState) -> None:
    store.save_plan_revision(make_plan())
    store.save_plan_revision(make_plan("other"))
    store.create_run(make_run("run-1"))
    store.update_run("run-1", state=blocking)
    with pytest.raises(Aborted) as busy:
        store.create_run(make_run("run-2", action="down"), audit_event("plan.destroy", "plans/shop"))
    assert busy.value.reason == "PLAN_RUN_IN_PROGRESS"
    assert busy.value.metadata == {"plan": "shop", "run": "run-1"}
    assert "run-1" in busy.value.message and "wait" in busy.value.message and "watch" in busy.value.message
    assert audit_actions(store) == []  # refused: nothing written
    with pytest.raises(NotFound):
        store.get_run("run-2")
    # another plan is not blocked
    assert store.create_run(make_run("run-3", plan="other"))[1]
    for final in (RunState.ROLLED_BACK, RunState.FAILED, RunState.SUCCEEDED):
        store.update_run("run-1", state=final)
        run, created = store.create_run(make_run(f"run-after-{final.value}"))
        assert created
        store.update_run(run.id, state=RunState.SUCCEEDED)


def test_update_run_bumps_the_version_and_upserts_vm_rows_in_order(store: Store, clock: Clock) -> None:
    store.save_plan_revision(make_plan())
    created_at = clock.now
    store.create_run(make_run("run-1", services=("db", "web", "cache")))

    clock.advance(10)
    t1 = clock.now
    version = store.update_run(
        "run-1",
        vms=[
            status("shop", "web", VmRunState.CREATING, step="define", host="h1", change=ChangeKind.CREATE),
        ],
    )
    run = store.get_run("run-1")
    assert version == run.version == 2 and run.update_time == t1 and run.create_time == created_at
    assert run.state is RunState.RUNNING and run.error == ""
    assert [v.service for v in run.vms] == ["db", "web", "cache"]
    web = run.vms[1]
    assert (web.state, web.step, web.host, web.update_time) == (VmRunState.CREATING, "define", "h1", t1)
    assert run.vms[0].update_time == created_at  # rows not given are untouched

    clock.advance(10)
    t2 = clock.now
    version = store.update_run(
        "run-1",
        state=RunState.ROLLING_BACK,
        error="web failed its health check",
        vms=[
            status("shop", "web", VmRunState.FAILED, error="unhealthy", failed_probe="http", host="h1", created=True),
            # a service the run had no row for yet goes after the others
            status("shop", "extra", VmRunState.SKIPPED),
            status("shop", "db", VmRunState.READY, host="h2", change=ChangeKind.NONE),
        ],
        audit=audit_event("plan.rollback", "plans/shop"),
    )
    run = store.get_run("run-1")
    assert version == run.version == 3
    assert run.state is RunState.ROLLING_BACK and run.error == "web failed its health check"
    assert [v.service for v in run.vms] == ["db", "web", "cache", "extra"]
    assert [v.update_time for v in run.vms] == [t2, t2, created_at, t2]
    web = run.vms[1]
    assert (web.state, web.failed_probe, web.error, web.created) == (VmRunState.FAILED, "http", "unhealthy", True)
    assert run.vms[0].change is ChangeKind.NONE and run.vms[0].host == "h2"
    assert store.get_run("run-1") == run
    assert audit_actions(store) == ["plan.rollback"]

    # neither state nor error given: both stay; the version still moves
    clock.advance(1)
    assert store.update_run("run-1") == 4
    run = store.get_run("run-1")
    assert run.version == 4 and run.state is RunState.ROLLING_BACK and run.error == "web failed its health check"
    assert store.update_run("run-1", state=RunState.ROLLED_BACK, error="") == 5
    run = store.get_run("run-1")
    assert run.version == 5 and run.done and run.error == ""
    with pytest.raises(NotFound) as missing:
        store.update_run("nope", state=RunState.FAILED)
    assert missing.value.reason == "PLAN_RUN_NOT_FOUND"


def test_a_failed_update_changes_nothing(store: Store) -> None:
    store.save_plan_revision(make_plan())
    before, _ = store.create_run(make_run("run-1"))
    # the audit append fails after the run's changes were flushed: all of it rolls back
    bad = dataclasses.replace(audit_event("plan.apply", "plans/shop"), actor=None)  # type: ignore[arg-type]
    with pytest.raises(Exception):  # noqa: B017  # the database's or the chain's own error
        store.update_run("run-1", state=RunState.FAILED, vms=[status("shop", "db", VmRunState.FAILED)], audit=bad)
    assert store.get_run("run-1") == before
    assert audit_actions(store) == []


def test_list_runs_is_newest_first_and_limited(store: Store, clock: Clock) -> None:
    store.save_plan_revision(make_plan())
    store.save_plan_revision(make_plan("other"))
    assert store.list_runs("shop") == [] and store.latest_run("shop") is None
    assert store.list_runs("nope") == [] and store.latest_run("nope") is None
    for i in range(5):
        clock.advance(1)
        store.create_run(make_run(f"run-{i}"))
        store.update_run(f"run-{i}", state=RunState.SUCCEEDED)
    store.create_run(make_run("other-run", plan="other"))
    assert [r.id for r in store.list_runs("shop")] == ["run-4", "run-3", "run-2", "run-1", "run-0"]
    limited = store.list_runs("shop", limit=2)
    assert [r.id for r in limited] == ["run-4", "run-3"]
    assert [v.service for v in limited[1].vms] == ["db", "web"]
    assert [r.id for r in store.list_runs("shop", limit=0)] == ["run-4"]
    latest = store.latest_run("shop")
    assert latest is not None and latest.id == "run-4" and latest.state is RunState.SUCCEEDED
    other = store.latest_run("other")
    assert other is not None and other.id == "other-run"


# --------------------------------------------------------------------------------------- leases


def test_claim_lease_expiry_and_release(store: Store, clock: Clock) -> None:
    for name in ("a", "b", "c"):
        store.save_plan_revision(make_plan(name))
    store.create_run(make_run("run-a", plan="a"))
    clock.advance(1)
    store.create_run(make_run("run-b", plan="b"))
    store.create_run(make_run("run-c", plan="c"))
    store.update_run("run-c", state=RunState.SUCCEEDED)  # finished runs are never handed out

    claimed = store.claim_runs("ctl-1", 30)
    assert [r.id for r in claimed] == ["run-a", "run-b"]  # oldest first, with their VMs
    assert [v.service for v in claimed[0].vms] == ["db", "web"]
    assert store.plan_run_lease("run-a") == ("ctl-1", clock.now + timedelta(seconds=30))
    assert store.claim_runs("ctl-2", 30) == []

    clock.advance(20)
    assert store.claim_runs("ctl-2", 30) == []
    # the owner renews its own leases
    assert [r.id for r in store.claim_runs("ctl-1", 30)] == ["run-a", "run-b"]
    assert store.plan_run_lease("run-b") == ("ctl-1", clock.now + timedelta(seconds=30))
    clock.advance(20)
    assert store.claim_runs("ctl-2", 30) == []  # renewed 20 s ago: still ctl-1's

    store.update_run("run-b", state=RunState.ROLLING_BACK)  # rolling back is unfinished: still leased
    clock.advance(11)  # ctl-1 died: its leases expired
    assert [r.id for r in store.claim_runs("ctl-2", 30)] == ["run-a", "run-b"]
    assert store.claim_runs("ctl-1", 30) == []

    store.release_run("run-a", "ctl-1")  # not ctl-1's any more: a no-op
    assert store.plan_run_lease("run-a")[0] == "ctl-2"
    store.release_run("run-a", "ctl-2")
    store.release_run("nope", "ctl-2")  # an unknown run: nothing to give up
    assert store.plan_run_lease("run-a") == ("", None)
    # released: another controller may take it at once, before any expiry
    assert [r.id for r in store.claim_runs("ctl-1", 30)] == ["run-a"]
    store.update_run("run-b", state=RunState.ROLLED_BACK)
    assert [r.id for r in store.claim_runs("ctl-2", 30)] == []
    with pytest.raises(NotFound):
        store.plan_run_lease("nope")
    with pytest.raises(ValueError):
        store.claim_runs("", 30)
    with pytest.raises(ValueError):
        store.claim_runs("ctl-1", 0)


def test_a_run_created_with_an_owner_is_leased_at_once(store: Store, clock: Clock) -> None:
    store.save_plan_revision(make_plan())
    run, _ = store.create_run(make_run("run-1"), owner="ctl-1", lease_seconds=30)
    assert store.plan_run_lease("run-1") == ("ctl-1", clock.now + timedelta(seconds=30))
    assert store.claim_runs("ctl-2", 30) == []
    assert [r.id for r in store.claim_runs("ctl-1", 30)] == [run.id]
    with pytest.raises(ValueError):
        store.create_run(make_run("run-2"), owner="ctl-1")


def test_concurrent_claims_never_hand_a_run_to_two_controllers(store_url: str, clock: Clock) -> None:
    with Store.open(store_url, clock=clock) as a, Store.open(store_url, clock=clock) as b:
        stores = (a, b)
        for round_ in range(4):
            ids = set()
            for p in range(6):
                name = f"p{p}"
                a.save_plan_revision(make_plan(name))
                run, _ = a.create_run(make_run(f"r{round_}-{p}", plan=name))
                ids.add(run.id)
            got = in_threads(2, lambda i: {r.id for r in stores[i].claim_runs(f"ctl-{i}", 30)})
            assert got[0] | got[1] == ids and not got[0] & got[1]
            for run_id in ids:
                a.update_run(run_id, state=RunState.SUCCEEDED)


def test_concurrent_create_run_lets_one_through(store_url: str, clock: Clock) -> None:
    with Store.open(store_url, clock=clock) as a, Store.open(store_url, clock=clock) as b:
        stores = (a, b)
        a.save_plan_revision(make_plan())
        for round_ in range(4):
            # different run ids, no request id: one is created, the other is refused
            def create(i: int, round_: int = round_) -> str:
                try:
                    return "created" if stores[i].create_run(make_run(f"r{round_}-{i}"))[1] else "existing"
                except Aborted:
                    return "aborted"

            assert sorted(in_threads(2, create)) == ["aborted", "created"]
            running = a.latest_run("shop")
            assert running is not None
            a.update_run(running.id, state=RunState.SUCCEEDED)

            # one request id sent twice: one run, returned to both
            def retry(i: int, round_: int = round_) -> tuple[str, bool]:
                run, created = stores[i].create_run(make_run(f"q{round_}-{i}", request_id=f"req-{round_}"))
                return run.id, created

            results = in_threads(2, retry)
            assert results[0][0] == results[1][0] and sorted(c for _, c in results) == [False, True]
            a.update_run(results[0][0], state=RunState.SUCCEEDED)


# ----------------------------------------------------------------------------------- migrations


def test_upgrade_from_0004_keeps_data(store_url: str) -> None:
    assert "plans" not in migrate_to(store_url, "0004")
    add_host_row(store_url, "h1")  # a 0004 database with a host in it
    with Store.open(store_url) as new:
        assert current_revision(new.engine) == HEAD_REVISION
        assert {"plans", "plan_revisions", "plan_runs", "plan_run_vms"} <= set(inspect(new.engine).get_table_names())
        assert [h.name for h in new.list_hosts()] == ["h1"]
        assert new.save_plan_revision(make_plan())[0].revision == 1
        assert new.create_run(make_run("run-1"))[1]
    # and back down, and up again
    assert not {"plans", "plan_revisions", "plan_runs", "plan_run_vms"} & migrate_to(store_url, "0004", down=True)
    with Store.open(store_url) as again:
        assert again.list_plans() == [] and [h.name for h in again.list_hosts()] == ["h1"]


def test_plan_body_round_trips_every_field(store: Store) -> None:
    plan = dataclasses.replace(
        make_plan(services=("db", "web", "worker")),
        update=UpdatePolicy(max_parallel=1, min_healthy_time_ms=500, healthy_deadline_ms=9000, auto_revert=True),
        on_failure=FailurePolicy.LEAVE,
    )
    plan = dataclasses.replace(plan, vms=(*plan.vms[:2], dataclasses.replace(plan.vms[2], host="h7")))
    stored, _ = store.save_plan_revision(plan)
    back = store.get_plan("shop")
    assert back == stored
    assert back.vms == plan.vms and back.update == plan.update and back.on_failure is FailurePolicy.LEAVE


def secret_plan() -> Plan:
    plan = make_plan()
    cloud_init = CloudInit(Secret("#cloud-config\npassword: hunter2\n"))
    db = dataclasses.replace(plan.vms[0], spec=dataclasses.replace(plan.vms[0].spec, cloud_init=cloud_init))
    return dataclasses.replace(plan, vms=(db, plan.vms[1]))


def test_stored_revisions_keep_what_a_resumed_run_needs(store: Store) -> None:
    # like a VM create's operation: the user-data a resumed run boots the VM with (readers get plans redacted)
    stored, _ = store.save_plan_revision(secret_plan())
    back = store.get_plan("shop").vms[0].spec.cloud_init
    assert back is not None and "hunter2" in back.user_data.reveal()
    # the plan file read again is the same plan
    assert store.save_plan_revision(secret_plan()) == (stored, False)


def test_saving_a_read_back_plan_with_secrets_adds_no_revision(store: Store) -> None:
    store.save_plan_revision(secret_plan())
    back = store.get_plan("shop")
    # the stored revision keeps what a resumed run needs to create the VMs
    assert back.vms == secret_plan().vms
    assert store.save_plan_revision(back)[1] is False


# ---- VMs held for a run (create_run's hold) ----------------------------------------------------------


def held_run(store: Store, run_id: str = "run-1", **kw: object) -> tuple[Plan, PlanRun]:
    """Plan ``shop`` (db, web) stored, and a run that holds both VMs."""
    plan = make_plan()
    store.save_plan_revision(plan)
    run, created = store.create_run(
        make_run(run_id),
        hold=[(v.spec, None) for v in plan.vms],
        **kw,  # type: ignore[arg-type]
    )
    assert created
    return plan, run


def test_a_run_holds_the_room_of_the_vms_it_will_create(store: Store) -> None:
    register(store, "h1", vcpus=2, memory_mib=1024)
    plan, _run = held_run(store)
    held = {v.name: v for v in store.list_vms()[0]}
    assert {n: (v.state, v.host) for n, v in held.items()} == {
        "shop-db": (VmState.PENDING, "h1"),
        "shop-web": (VmState.PENDING, "h1"),
    }
    assert {v.state_reason for v in held.values()} == {"held for plan shop (run run-1)"}
    assert store.get_host("h1").allocated == Resources(2, 1024, 2048)
    # a VM made meanwhile cannot take that room
    with pytest.raises(ResourceExhausted):
        store.reserve_vm(VmSpec("other", 1, 512), None, create_op("other", "r-other"))
    # the run's own create starts from the held record: same row and host, now creating, with its operation
    op, vm = store.reserve_vm(plan.vms[0].spec, None, create_op("shop-db", "r-db"), creating_step="on {host}")
    assert vm is not None and (vm.name, vm.host, vm.state, vm.state_reason) == ("shop-db", "h1", VmState.CREATING, "")
    assert (op.step, op.done) == ("on h1", False)
    assert store.get_host("h1").allocated == Resources(2, 1024, 2048)  # not counted twice
    # the same name with another spec is someone else's VM: refused, the hold kept
    other = dataclasses.replace(plan.vms[1].spec, memory_mib=256)
    with pytest.raises(AlreadyExists):
        store.reserve_vm(other, None, create_op("shop-web", "r-web"))
    assert store.get_vm("shop-web").state is VmState.PENDING


def test_a_hold_that_does_not_fit_refuses_the_whole_run(store: Store) -> None:
    register(store, "h1", vcpus=1, memory_mib=1024)
    plan = make_plan()
    store.save_plan_revision(plan)
    with pytest.raises(ResourceExhausted):
        store.create_run(make_run("run-1"), hold=[(v.spec, None) for v in plan.vms])
    assert store.list_vms()[0] == [] and store.list_runs("shop") == []


def test_release_held_frees_only_vms_not_yet_being_created(store: Store) -> None:
    register(store, "h1")
    plan, _run = held_run(store)
    store.reserve_vm(plan.vms[0].spec, None, create_op("shop-db", "r-db"))  # its create began
    assert store.release_held(["shop-db", "shop-web", "nope"]) == ["shop-web"]
    assert [v.name for v in store.list_vms()[0]] == ["shop-db"]
    assert store.release_held(["shop-web"]) == []  # idempotent
    # watchers see the freed VM go
    changes = store.changes_since(0)
    assert [(vm.name, deleted) for _rev, vm, deleted in changes][-1] == ("shop-web", True)


def test_a_held_vm_is_not_missing_from_its_host(store: Store) -> None:
    register(store, "h1")
    held_run(store)
    # the host lists none of them: they are not made yet, so not "vanished"
    assert store.reconcile_host("h1", []) == []
    assert {v.state for v in store.list_vms()[0]} == {VmState.PENDING}


def test_a_held_vm_with_tuples_in_its_spec_is_still_its_runs(store: Store) -> None:
    # JSON keeps lists, not tuples: a health check's expect_status (200,) reads back as [200]
    register(store, "h1")
    probe = Probe("http", ProbeType.HTTP, http=HttpProbe(expect_status=(200, 204)))
    plan = make_plan()
    checked = dataclasses.replace(plan.vms[0].spec, health_checks=(probe,))
    plan = dataclasses.replace(plan, vms=(dataclasses.replace(plan.vms[0], spec=checked), *plan.vms[1:]))
    store.save_plan_revision(plan)
    store.create_run(make_run("run-1"), hold=[(v.spec, None) for v in plan.vms])
    _op, vm = store.reserve_vm(checked, None, create_op("shop-db", "r-db"), creating_step="on {host}")
    assert vm is not None and vm.state is VmState.CREATING and vm.spec == checked


@pytest.mark.parametrize("closed", ["cordoned", "unreachable"])
def test_a_vm_held_on_a_host_that_takes_no_new_vms_is_placed_again(store: Store, closed: str) -> None:
    register(store, "h1", vcpus=2, memory_mib=1024)
    plan, _run = held_run(store)  # both held on h1, the only host then
    register(store, "h2", vcpus=2, memory_mib=1024)
    if closed == "cordoned":
        store.set_cordoned("h1", True)
    else:
        store.set_host_state("h1", HostState.UNREACHABLE)
    db, web = (v.spec for v in plan.vms)
    # pinned to h1, the create gets h1's error, as any create there would; the hold stays for the run to free
    with pytest.raises(FailedPrecondition) as refused:
        store.reserve_vm(web, "h1", create_op("shop-web", "r-web-pinned"))
    assert refused.value.reason == ("HOST_CORDONED" if closed == "cordoned" else "HOST_UNREACHABLE")
    assert (store.get_vm("shop-web").state, store.get_vm("shop-web").host) == (VmState.PENDING, "h1")
    # placement free to choose: the hold's room on h1 is given up and the VM placed on h2, in one commit
    _op, vm = store.reserve_vm(db, None, create_op("shop-db", "r-db"), creating_step="on {host}")
    assert vm is not None and (vm.host, vm.state, vm.state_reason) == ("h2", VmState.CREATING, "")
    assert store.get_host("h1").allocated == Resources(1, 512, 1024)  # web's hold only
    assert store.get_host("h2").allocated == Resources(1, 512, 1024)
    # watchers see the held record go from h1 and the VM come on h2
    moves = [(vm.name, vm.host, deleted) for _rev, vm, deleted in store.changes_since(0) if vm.name == "shop-db"]
    assert moves[-2:] == [("shop-db", "h1", True), ("shop-db", "h2", False)]


# ---- volumes held for a run (create_run's hold_volumes) ----------------------------------------------


def disk_of(store: Store, host: str) -> int:
    return store.get_host(host).allocated.disk_mib


def test_a_run_holds_the_disk_of_the_volumes_it_will_make(store: Store) -> None:
    register(store, "h1", disk_mib=10_000)
    plan = make_plan()
    store.save_plan_revision(plan)
    store.create_run(
        make_run("run-1"),
        hold=[(v.spec, None) for v in plan.vms],
        hold_volumes=[("h1", "shop-data", 4_000), ("h1", "shop-logs", 1_000)],
    )
    assert disk_of(store, "h1") == 2 * 1024 + 5_000  # the two VMs' disks and both volumes
    # the room is the run's: a volume or a VM made meanwhile outside the plan does not get it
    with pytest.raises(ResourceExhausted):
        store.reserve_volume("h1", "other", 4_000)
    with pytest.raises(ResourceExhausted):
        store.reserve_vm(VmSpec("other", 1, 64, disks=(DiskSpec("root", size_mib=4_000),)), None, create_op("x", "r-x"))
    # a create of the same name by anyone else finds it reserved (False: not theirs to free on failure)
    assert store.reserve_volume("h1", "shop-data", 4_000) is False
    assert store.reserve_volume("h1", "shop-data", 4_000, holder="run-2") is False
    # the run's own create takes its hold over: True, so that a failed create frees it
    assert store.reserve_volume("h1", "shop-data", 4_000, holder="run-1") is True
    assert store.reserve_volume("h1", "shop-data", 4_000, holder="run-1") is False  # a retry: it is the volume's now
    assert disk_of(store, "h1") == 2 * 1024 + 5_000  # counted once
    # the run ends: what it never made is freed, the volume it made keeps its reservation
    store.release_held(["shop-db", "shop-web"], "run-1")
    assert disk_of(store, "h1") == 4_000
    store.release_held([], "run-1")  # idempotent
    assert disk_of(store, "h1") == 4_000
    assert store.reserve_volume("h1", "other", 6_000)  # the freed room is anyone's again


def test_a_volume_hold_that_does_not_fit_refuses_the_whole_run(store: Store) -> None:
    register(store, "h1", disk_mib=5_000)
    plan = make_plan()
    store.save_plan_revision(plan)
    with pytest.raises(ResourceExhausted) as refused:
        store.create_run(
            make_run("run-1"),
            hold=[(v.spec, None) for v in plan.vms],
            hold_volumes=[("h1", "shop-data", 3_000), ("h1", "shop-logs", 3_000)],
        )
    assert (refused.value.reason, refused.value.metadata) == (
        "HOST_CAPACITY_EXCEEDED",
        {"host": "h1", "volume": "shop-logs"},
    )
    assert store.list_runs("shop") == [] and store.list_vms()[0] == []
    assert disk_of(store, "h1") == 0  # no volume kept either


def test_a_volume_reserved_already_is_not_held_nor_freed_by_the_run(store: Store) -> None:
    register(store, "h1", disk_mib=10_000)
    assert store.reserve_volume("h1", "shop-data", 4_000)  # made before, e.g. by an earlier run
    store.save_plan_revision(make_plan())
    store.create_run(make_run("run-1"), hold_volumes=[("h1", "shop-data", 4_000)])
    assert disk_of(store, "h1") == 4_000  # not counted twice
    assert store.reserve_volume("h1", "shop-data", 4_000, holder="run-1") is False  # not the run's to free
    store.release_held([], "run-1")
    assert disk_of(store, "h1") == 4_000


def test_upgrade_from_0007_keeps_volume_reservations_and_down_drops_only_holds(store_url: str) -> None:
    migrate_to(store_url, "0007")
    add_host_row(store_url, "h1", disk_mib=10_000)
    with Store.open(store_url) as new:
        assert current_revision(new.engine) == HEAD_REVISION
        assert new.reserve_volume("h1", "kept", 1_000)
        new.save_plan_revision(make_plan())
        new.create_run(make_run("run-1"), hold_volumes=[("h1", "shop-data", 2_000)])
        assert disk_of(new, "h1") == 3_000
    # down: the run's hold goes with the column (a downgraded controller could not tell it from a volume)
    migrate_to(store_url, "0007", down=True)
    engine = create_engine(store_url)
    try:
        assert "held_by" not in {c["name"] for c in inspect(engine).get_columns("volume_reservations")}
        assert "held_for" not in {c["name"] for c in inspect(engine).get_columns("vms")}
    finally:
        engine.dispose()
    with Store.open(store_url) as again:
        assert disk_of(again, "h1") == 1_000
        assert again.reserve_volume("h1", "kept", 1_000) is False  # still reserved, by no run


# ---- the room of a replaced VM's successor (create_run's hold_replaced) -------------------------------


def replaced_db(store: Store, memory_mib: int = 2048, successor_mib: int = 1024) -> tuple[VmSpec, VmSpec]:
    """h1 with ``memory_mib``, plan ``shop``'s db made there (512 MiB), and the spec replacing it."""
    register(store, "h1", vcpus=4, memory_mib=memory_mib)
    plan = make_plan(services=("db",))
    old = plan.vms[0].spec
    op, _vm = store.reserve_vm(old, None, create_op(old.name, "r-old"))
    store.finish_operation(op.id, observed=dataclasses.replace(observed(old.name, "h1"), spec=old))
    store.save_plan_revision(plan)
    return old, dataclasses.replace(old, memory_mib=successor_mib)


def memory_of(store: Store, host: str) -> int:
    return store.get_host(host).allocated.memory_mib


def test_a_run_holds_the_room_of_a_replaced_vms_successor_until_it_is_made(store: Store) -> None:
    _old, new = replaced_db(store)
    store.create_run(make_run("run-1", services=("db",)), hold_replaced=[(new, None)])
    assert memory_of(store, "h1") == 1024  # the old VM's room grown to what its successor needs
    assert store.get_vm("shop-db").state is VmState.RUNNING  # the old VM itself is as it was
    # 1,536 MiB would fit beside the old VM alone; the successor's share of it is the run's
    with pytest.raises(ResourceExhausted):
        store.reserve_vm(VmSpec("other", 1, 1536), None, create_op("other", "r-other"))
    # the run deletes the old VM: its room stays, held for the successor
    store.release_vm("shop-db")
    held = store.get_vm("shop-db")
    assert (held.state, held.host, held.state_reason) == (VmState.PENDING, "h1", "held for plan shop (run run-1)")
    assert memory_of(store, "h1") == 1024
    with pytest.raises(ResourceExhausted):
        store.reserve_vm(VmSpec("other", 1, 1536), None, create_op("other", "r-other-2"))
    # watchers see the old VM go and the held record come
    moves = [(vm.state, deleted) for _rev, vm, deleted in store.changes_since(0) if vm.name == "shop-db"]
    assert moves[-2:] == [(VmState.RUNNING, True), (VmState.PENDING, False)]
    # the successor's create takes it over, with its own spec and room
    _op, vm = store.reserve_vm(new, None, create_op("shop-db", "r-new", "op-new"), creating_step="on {host}")
    assert vm is not None and (vm.host, vm.state, vm.state_reason, vm.spec) == ("h1", VmState.CREATING, "", new)
    assert memory_of(store, "h1") == 1024
    assert store.release_held([], "run-1") == []  # nothing left to free: it is the successor's now
    assert memory_of(store, "h1") == 1024


def test_a_successor_smaller_than_the_held_room_takes_only_what_it_needs(store: Store) -> None:
    _old, new = replaced_db(store, successor_mib=256)
    store.create_run(make_run("run-1", services=("db",)), hold_replaced=[(new, None)])
    assert memory_of(store, "h1") == 512  # nothing to grow: the old VM's room covers it
    store.release_vm("shop-db")
    _op, vm = store.reserve_vm(new, None, create_op("shop-db", "r-new", "op-new"))
    assert vm is not None and vm.host == "h1"
    assert memory_of(store, "h1") == 256


def test_a_run_that_ends_before_its_replace_gives_the_grown_room_back(store: Store) -> None:
    _old, new = replaced_db(store)
    store.create_run(make_run("run-1", services=("db",)), hold_replaced=[(new, None)])
    assert memory_of(store, "h1") == 1024
    store.release_held([], "run-1")  # the old VM stays: its room is its own spec's again
    assert memory_of(store, "h1") == 512
    assert store.get_vm("shop-db").state is VmState.RUNNING
    store.release_vm("shop-db")  # and a later delete deletes it, holding nothing
    assert memory_of(store, "h1") == 0 and store.list_vms()[0] == []


def test_a_run_that_ends_between_delete_and_create_frees_the_held_room(store: Store) -> None:
    _old, new = replaced_db(store)
    store.create_run(make_run("run-1", services=("db",)), hold_replaced=[(new, None)])
    store.release_vm("shop-db")
    assert store.release_held([], "run-1") == ["shop-db"]
    assert memory_of(store, "h1") == 0 and store.list_vms()[0] == []


def test_a_delete_after_its_run_is_done_holds_nothing(store: Store) -> None:
    _old, new = replaced_db(store)
    run, _created = store.create_run(make_run("run-1", services=("db",)), hold_replaced=[(new, None)])
    store.update_run(run.id, state=RunState.FAILED, error="crashed before releasing")
    store.release_vm("shop-db")
    assert store.list_vms()[0] == [] and memory_of(store, "h1") == 0


def test_no_room_is_held_for_a_successor_that_does_not_fit_beside_its_old_vm(store: Store) -> None:
    _old, big = replaced_db(store, memory_mib=1024, successor_mib=1536)  # 1,024 more than db's 512: 512 are free
    _run, created = store.create_run(make_run("run-1", services=("db",)), hold_replaced=[(big, None)])
    assert created  # not an error: the successor is placed when the run makes it, as any new VM
    assert memory_of(store, "h1") == 512
    store.release_vm("shop-db")
    assert store.list_vms()[0] == []  # nothing held for it either


def test_a_successor_pinned_elsewhere_gives_the_held_room_up(store: Store) -> None:
    _old, new = replaced_db(store)
    register(store, "h2", vcpus=4, memory_mib=2048)
    store.create_run(make_run("run-1", services=("db",)), hold_replaced=[(new, None)])
    store.release_vm("shop-db")
    _op, vm = store.reserve_vm(new, "h2", create_op("shop-db", "r-new", "op-new"))
    assert vm is not None and vm.host == "h2"
    assert (memory_of(store, "h1"), memory_of(store, "h2")) == (0, 1024)
