"""The fleet store suite, run unchanged on SQLite and on PostgreSQL (``store_url`` is parametrized)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from clonebox_controller.store import VANISHED_REASON, Store
from clonebox_controller.store.engine import current_revision
from clonebox_controller.store.tables import Base
from clonebox_core.errors import (
    AlreadyExists,
    CloneboxError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from clonebox_core.model import (
    CloudInit,
    DiskSpec,
    HostState,
    HypervisorInfo,
    IpAddress,
    KernelBoot,
    NetworkMode,
    NetworkSpec,
    Operation,
    Resources,
    Revision,
    SharedFolder,
    Vm,
    VmSpec,
    VmState,
)
from tests.unit.store.conftest import HEAD_REVISION, add_host_row, migrate_to

REPO = Path(__file__).resolve().parents[3]
HYPERVISOR = HypervisorInfo(uri="test:///default", libvirt_version="9.0.0", capabilities=("kvm",))


class FakeClock:
    """A settable aware-UTC clock, so heartbeat timeouts are tested without sleeping."""

    def __init__(self) -> None:
        self.now = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        """Move time forward and return the new now."""
        self.now += timedelta(seconds=seconds)
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    """A fresh FakeClock."""
    return FakeClock()


@pytest.fixture
def store(store_url: str, clock: FakeClock) -> Iterator[Store]:
    """A migrated, empty store on the backend under test."""
    with Store.open(store_url, clock=clock) as s:
        yield s


def register(
    store: Store,
    name: str,
    vcpus: int = 4,
    memory_mib: int = 4096,
    disk_mib: int = 100_000,
    epoch: int = 1,
) -> None:
    """Register a host whose capacity equals its allocatable resources."""
    r = Resources(vcpus, memory_mib, disk_mib)
    store.upsert_host_registration(name, f"{name}.example:7000", r, r, HYPERVISOR, epoch)


def spec(
    name: str, vcpus: int = 1, memory_mib: int = 1024, disk_mib: int = 0, labels: dict[str, str] | None = None
) -> VmSpec:
    """A VmSpec with one disk of ``disk_mib`` (none when 0) and sorted labels."""
    disks = (DiskSpec("root", size_mib=disk_mib),) if disk_mib else ()
    return VmSpec(name, vcpus=vcpus, memory_mib=memory_mib, disks=disks, labels=tuple(sorted((labels or {}).items())))


def create_op(vm: str, request_id: str = "", op_id: str | None = None) -> Operation:
    """A create-VM operation as the app layer builds it."""
    return Operation(id=op_id or f"op-{vm}", kind="vm.create", target=f"vms/{vm}", request_id=request_id)


def reserve(store: Store, s: VmSpec, host: str | None = None, request_id: str = "") -> Vm:
    """Reserve and return the VM (asserting it is new)."""
    _op, vm = store.reserve_vm(s, host, create_op(s.name, request_id))
    assert vm is not None
    return vm


# ---------------------------------------------------------------------------- migrations


def test_migrations_apply_twice_and_match_tables(store_url: str) -> None:
    with Store.open(store_url) as first:
        assert current_revision(first.engine) == HEAD_REVISION
    with Store.open(store_url) as second:  # the second upgrade is a no-op
        assert current_revision(second.engine) == HEAD_REVISION
        names = set(inspect(second.engine).get_table_names())
        assert {"hosts", "vms", "vm_labels", "vm_changes", "operations", "fleet_revision"} <= names
        with second.engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
        assert diff == [], f"tables.py and the migrations disagree: {diff}"
        assert second.current_revision() == 0
    if store_url.startswith("postgresql+psycopg://"):
        # operators write plain postgresql://; the store maps it to psycopg 3, the driver it ships
        with Store.open(store_url.replace("+psycopg", "", 1)) as third:
            assert third.engine.dialect.driver == "psycopg"


def test_concurrent_processes_migrate_once(store_url: str) -> None:
    # separate processes, like several controllers starting together against a fresh database
    code = "import sys; from clonebox_controller.store import Store; Store.open(sys.argv[1]).close()"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO / "core"), str(REPO / "controller"), str(REPO / "proto"), env.get("PYTHONPATH", "")]
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, store_url], env=env, stderr=subprocess.PIPE) for _ in range(3)
    ]
    for proc in procs:
        _out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
    with Store.open(store_url) as s:
        assert current_revision(s.engine) == HEAD_REVISION
        assert s.current_revision() == 0


def test_upgrade_from_0005_keeps_hosts_and_counts_volumes(store_url: str) -> None:
    assert "volume_reservations" not in migrate_to(store_url, "0005")
    add_host_row(store_url, "h1", disk_mib=10_000)  # a 0005 database with a host in it
    with Store.open(store_url) as new:
        assert current_revision(new.engine) == HEAD_REVISION
        assert new.reserve_volume("h1", "data", 4_000)
        assert [(h.name, h.allocated.disk_mib) for h in new.list_hosts()] == [("h1", 4_000)]
    # and back down (the reservations go, the host stays), and up again
    assert "volume_reservations" not in migrate_to(store_url, "0005", down=True)
    with Store.open(store_url) as again:
        assert [(h.name, h.allocated.disk_mib) for h in again.list_hosts()] == [("h1", 0)]


def test_upgrade_from_0006_orders_events_of_vms_made_before(store_url: str) -> None:
    migrate_to(store_url, "0006")
    add_host_row(store_url, "h1")
    with Store.open(store_url) as new:
        assert current_revision(new.engine) == HEAD_REVISION
        new.reserve_vm(spec("web"), "h1", create_op("web"))
        new.finish_operation("op-web", observed=observed("web", "h1"))  # no revision recorded yet
        assert new.update_vm_observed("web", VmState.STOPPED, agent_revision=Revision(1, 5)).state is VmState.STOPPED  # type: ignore[union-attr]
        assert new.update_vm_observed("web", VmState.RUNNING, agent_revision=Revision(1, 4)).state is VmState.STOPPED  # type: ignore[union-attr]
    # down again: the VM stays, without the two columns; up again, with them empty
    migrate_to(store_url, "0006", down=True)
    engine = create_engine(store_url)
    try:
        assert not {"agent_epoch", "agent_sequence"} & {c["name"] for c in inspect(engine).get_columns("vms")}
    finally:
        engine.dispose()
    with Store.open(store_url) as again:
        assert again.get_vm("web").state is VmState.STOPPED
        assert again.update_vm_observed("web", VmState.RUNNING, agent_revision=Revision(1, 4)).state is VmState.RUNNING  # type: ignore[union-attr]


def test_in_memory_sqlite_is_refused() -> None:
    with pytest.raises(ValueError, match="SQLite file"):
        Store.open("sqlite://")


def test_sqlite_state_directory_is_created(tmp_path: Path) -> None:
    with Store.open(f"sqlite:///{tmp_path / 'state' / 'controller' / 'fleet.db'}") as s:
        assert s.list_hosts() == []
        with s.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000


# ---------------------------------------------------------------------------- hosts


def test_registration_and_heartbeat(store: Store, clock: FakeClock) -> None:
    register(store, "h1", epoch=7)
    host = store.get_host("h1")
    assert host.state is HostState.READY
    assert host.address == "h1.example:7000"
    assert host.hypervisor == HYPERVISOR
    assert host.capacity == Resources(4, 4096, 100_000)
    assert host.allocated == Resources()
    assert host.agent_epoch == 7
    assert host.last_heartbeat == clock.now
    assert host.last_heartbeat is not None and host.last_heartbeat.tzinfo is not None

    later = clock.advance(5)
    host = store.heartbeat("h1", serving=False, reason="libvirtd down")
    assert host.state is HostState.NOT_SERVING
    assert host.last_heartbeat == later
    assert store.heartbeat("h1").state is HostState.READY

    with pytest.raises(NotFound) as err:
        store.heartbeat("nope")
    assert err.value.reason == "HOST_NOT_FOUND"
    with pytest.raises(NotFound):
        store.get_host("nope")


def test_reregistration_keeps_cordon_and_resets_sequence_on_new_epoch(store: Store) -> None:
    register(store, "h1", epoch=1)
    store.set_cordoned("h1", True)
    store.set_agent_revision("h1", 1, 42)
    register(store, "h1", vcpus=8, epoch=1)  # same epoch: sequence kept
    assert store.agent_revision("h1") == Revision(1, 42)
    host = store.get_host("h1")
    assert host.cordoned is True
    assert host.allocatable.vcpus == 8
    register(store, "h1", epoch=2)  # agent journal recreated
    assert store.agent_revision("h1") == Revision(2, 0)
    assert store.set_cordoned("h1", False).cordoned is False
    assert [h.name for h in store.list_hosts()] == ["h1"]


def test_unreachable_after_missed_heartbeats(store: Store, clock: FakeClock) -> None:
    register(store, "a")
    register(store, "b")
    clock.advance(30)
    store.heartbeat("b")
    cutoff = clock.now - timedelta(seconds=10)
    assert store.mark_unreachable_older_than(cutoff) == ["a"]
    assert store.mark_unreachable_older_than(cutoff) == []  # already marked
    assert store.get_host("a").state is HostState.UNREACHABLE
    assert store.get_host("b").state is HostState.READY
    assert store.heartbeat("a").state is HostState.READY
    # the agent's session ended: the app marks the host at once, without waiting for the sweep
    assert store.set_host_state("b", HostState.UNREACHABLE, "stream closed").state is HostState.UNREACHABLE
    with pytest.raises(NotFound):
        store.set_host_state("nope", HostState.READY)


def test_remove_host(store: Store) -> None:
    register(store, "a")
    reserve(store, spec("web"))
    with pytest.raises(FailedPrecondition) as err:
        store.remove_host("a")
    assert err.value.reason == "HOST_HAS_VMS"
    store.release_vm("web")
    store.remove_host("a")
    assert store.list_hosts() == []


# ---------------------------------------------------------------------------- placement


def test_placement_picks_most_free_host(store: Store) -> None:
    register(store, "small", vcpus=2, memory_mib=2048)
    register(store, "big", vcpus=8, memory_mib=8192)
    assert reserve(store, spec("v1")).host == "big"
    register(store, "twin-a", vcpus=16, memory_mib=16384)
    register(store, "twin-b", vcpus=16, memory_mib=16384)
    assert reserve(store, spec("v2")).host == "twin-a"  # tie broken by name
    assert reserve(store, spec("v3")).host == "twin-b"  # now the freer one
    hosts = {h.name: h for h in store.list_hosts()}
    assert hosts["big"].allocated == Resources(1, 1024, 0)
    assert hosts["big"].vm_count == 1
    assert hosts["small"].vm_count == 0


def test_placement_skips_cordoned_unreachable_and_not_serving(store: Store, clock: FakeClock) -> None:
    register(store, "a-cordoned", vcpus=64, memory_mib=65536)
    register(store, "b-gone", vcpus=64, memory_mib=65536)
    register(store, "c-sick", vcpus=64, memory_mib=65536)
    register(store, "d-ok", vcpus=2, memory_mib=2048)
    store.set_cordoned("a-cordoned", True)
    clock.advance(60)
    for name in ("a-cordoned", "c-sick", "d-ok"):
        store.heartbeat(name)
    store.heartbeat("c-sick", serving=False, reason="disk full")
    store.mark_unreachable_older_than(clock.now - timedelta(seconds=30))
    assert reserve(store, spec("v1")).host == "d-ok"
    assert reserve(store, spec("v2")).host == "d-ok"
    with pytest.raises(ResourceExhausted) as err:
        reserve(store, spec("v3"))
    assert err.value.reason == "NO_HOST_FITS"
    message = err.value.message
    assert "a-cordoned: cordoned" in message
    assert "b-gone: unreachable" in message
    assert "c-sick: not serving" in message
    assert "d-ok: needs 1 vcpus, 0 free" in message


def test_named_host_errors(store: Store, clock: FakeClock) -> None:
    register(store, "a", vcpus=1, memory_mib=1024)
    register(store, "b")
    register(store, "c")
    store.set_cordoned("b", True)
    clock.advance(60)
    store.heartbeat("a")
    store.heartbeat("b")
    store.mark_unreachable_older_than(clock.now - timedelta(seconds=1))  # c

    cases: list[tuple[str, type[CloneboxError], str]] = [
        ("zzz", NotFound, "HOST_NOT_FOUND"),
        ("b", FailedPrecondition, "HOST_CORDONED"),
        ("c", FailedPrecondition, "HOST_UNREACHABLE"),
        ("a", ResourceExhausted, "HOST_CAPACITY_EXCEEDED"),
    ]
    for host, cls, reason in cases:
        with pytest.raises(cls) as err:
            reserve(store, spec("big", vcpus=2), host=host)
        assert err.value.reason == reason, host
    assert reserve(store, spec("fits"), host="a").host == "a"
    assert store.list_vms()[0] == [store.get_vm("fits")]  # failures left nothing behind


def test_no_hosts_at_all(store: Store) -> None:
    with pytest.raises(ResourceExhausted, match="no hosts are registered"):
        reserve(store, spec("v"))


def test_disk_counts_towards_capacity(store: Store) -> None:
    register(store, "a", disk_mib=10_000)
    reserve(store, spec("v1", disk_mib=6_000))
    with pytest.raises(ResourceExhausted, match="MiB disk"):
        reserve(store, spec("v2", disk_mib=6_000))


def test_volume_reservations_count_towards_disk(store: Store) -> None:
    register(store, "a", disk_mib=10_000)
    register(store, "b", disk_mib=5_000)
    assert store.reserve_volume("a", "stack-data", 6_000)
    assert not store.reserve_volume("a", "stack-data", 6_000)  # a retry: already reserved, once
    # the host shows it as allocated (no VM counted), and placement gives the room to no VM
    a = next(h for h in store.list_hosts() if h.name == "a")
    assert (a.allocated, a.vm_count) == (Resources(0, 0, 6_000), 0)
    with pytest.raises(ResourceExhausted) as full:
        reserve(store, spec("big", disk_mib=6_000), host="a")
    assert full.value.reason == "HOST_CAPACITY_EXCEEDED"
    assert reserve(store, spec("big", disk_mib=4_500)).host == "b"  # "a" has 4,000 MiB left, "b" 5,000
    # a volume that does not fit is refused with the host, the volume and the shortfall, and not kept
    with pytest.raises(ResourceExhausted) as refused:
        store.reserve_volume("a", "stack-logs", 4_001)
    assert refused.value.reason == "HOST_CAPACITY_EXCEEDED"
    assert refused.value.metadata == {"host": "a", "volume": "stack-logs"}
    assert "stack-logs" in refused.value.message and "disk" in refused.value.message
    assert store.reserve_volume("a", "stack-logs", 4_000)
    with pytest.raises(NotFound) as nohost:
        store.reserve_volume("nowhere", "v", 1)
    assert nohost.value.reason == "HOST_NOT_FOUND"
    # releasing frees the room; releasing again is a no-op
    assert store.release_volume("a", "stack-data")
    assert not store.release_volume("a", "stack-data")
    assert reserve(store, spec("fits", disk_mib=6_000), host="a").host == "a"
    # a removed host's reservations go with it
    store.release_vm("fits")
    store.remove_host("a")
    register(store, "a", disk_mib=10_000)
    assert next(h for h in store.list_hosts() if h.name == "a").allocated == Resources()


def with_volumes(name: str, *volumes: str) -> VmSpec:
    """A VM with a 1 MiB disk of its own and a disk attaching each of ``volumes``."""
    own = spec(name, disk_mib=1)
    disks = (*own.disks, *(DiskSpec(f"v{i}", volume=v) for i, v in enumerate(volumes)))
    return dataclasses.replace(own, disks=disks)


def test_a_vm_attaching_volumes_is_placed_on_their_host(store: Store) -> None:
    register(store, "a", disk_mib=10_000)
    register(store, "b", disk_mib=90_000)  # the roomier host: placement alone would choose it
    assert store.reserve_volume("a", "data", 1_000)
    assert store.reserve_volume("a", "logs", 1_000)
    assert store.place(with_volumes("db", "data", "logs"), None) == "a"
    assert reserve(store, with_volumes("db", "data", "logs")).host == "a"
    assert reserve(store, spec("plain", disk_mib=1)).host == "b"
    # a host named by the caller is checked as usual (the agent then refuses a volume it lacks)
    assert reserve(store, with_volumes("other", "data"), host="b").host == "b"


def test_placing_a_vm_whose_volumes_no_one_host_has_names_the_problem(store: Store) -> None:
    register(store, "a")
    register(store, "b")
    assert store.reserve_volume("a", "data", 10)
    assert store.reserve_volume("b", "logs", 10)
    assert store.reserve_volume("a", "twice", 10)
    assert store.reserve_volume("b", "twice", 10)
    with pytest.raises(NotFound) as missing:
        reserve(store, with_volumes("db", "data", "nope"))
    assert missing.value.reason == "VOLUME_NOT_FOUND"
    assert missing.value.metadata == {"volume": "nope", "field": "spec.disks[2].volume"}
    with pytest.raises(FailedPrecondition) as split:
        store.place(with_volumes("db", "data", "logs"), None)
    assert split.value.reason == "VOLUMES_ON_DIFFERENT_HOSTS"
    assert "data on a, logs on b" in split.value.message
    with pytest.raises(InvalidArgument) as ambiguous:
        reserve(store, with_volumes("db", "twice"))
    assert ambiguous.value.metadata["field"] == "host" and "a, b" in ambiguous.value.message
    # nothing was recorded by the refusals
    assert store.list_vms(None, None, {}, 10, "")[0] == []


def test_listed_volumes_without_a_reservation_are_adopted(store: Store) -> None:
    register(store, "a", disk_mib=10_000)
    register(store, "b", disk_mib=10_000)
    assert store.reserve_volume("a", "kept", 1_000)
    # the unreserved ones are counted at their listed size, even beyond the free disk: they exist
    listed = [("kept", 9_999), ("old-logs", 2_000), ("old-data", 8_000)]
    assert store.adopt_volumes("a", listed) == ["old-data", "old-logs"]
    a = next(h for h in store.list_hosts() if h.name == "a")
    assert a.allocated == Resources(0, 0, 1_000 + 2_000 + 8_000)  # "kept" keeps its reserved size
    assert store.adopt_volumes("a", listed) == []  # once
    # a reservation whose volume is not listed stays (its create may be under way); other hosts untouched
    assert store.adopt_volumes("a", []) == []
    assert next(h for h in store.list_hosts() if h.name == "a").allocated == a.allocated
    assert next(h for h in store.list_hosts() if h.name == "b").allocated == Resources()
    with pytest.raises(ResourceExhausted):
        reserve(store, spec("vm", disk_mib=1), host="a")
    assert store.release_volume("a", "old-data")
    assert reserve(store, spec("vm", disk_mib=1), host="a").host == "a"
    with pytest.raises(NotFound) as nohost:
        store.adopt_volumes("nowhere", [("v", 1)])
    assert nohost.value.reason == "HOST_NOT_FOUND"


def test_idempotent_request_id(store: Store) -> None:
    register(store, "a")
    op1, vm1 = store.reserve_vm(spec("web"), None, create_op("web", "req-1", "op-1"))
    op2, vm2 = store.reserve_vm(spec("web"), None, create_op("web", "req-1", "op-2"))
    assert op2.id == "op-1"  # the replay returns the first operation
    assert op1 == op2
    assert vm1 == vm2
    assert len(store.list_operations()) == 1
    assert store.find_operation_by_request_id("req-1") == op1
    assert store.find_operation_by_request_id("req-x") is None

    with pytest.raises(AlreadyExists) as err:
        store.reserve_vm(spec("other"), None, create_op("other", "req-1", "op-3"))
    assert err.value.reason == "REQUEST_ID_REUSED"

    # after the VM is gone, a replay still answers with the operation (and its result, if any)
    store.finish_operation("op-1", observed=vm1)
    store.release_vm("web")
    op3, vm3 = store.reserve_vm(spec("web"), None, create_op("web", "req-1", "op-4"))
    assert op3.id == "op-1" and op3.done
    assert vm3 == vm1


def test_duplicate_vm_name(store: Store) -> None:
    register(store, "a")
    register(store, "b")
    reserve(store, spec("web"), host="a")
    with pytest.raises(AlreadyExists) as err:
        store.reserve_vm(spec("web"), "b", create_op("web", "req-2", "op-2"))
    assert err.value.reason == "VM_ALREADY_EXISTS"
    with pytest.raises(NotFound):
        store.get_operation("op-2")  # nothing recorded for the failed attempt


def test_concurrent_reservations_never_overcommit(store_url: str, store: Store) -> None:
    # two hosts with room for 4 VMs each; 20 separate stores (engines), as if 20 processes
    register(store, "h1", vcpus=4, memory_mib=8192)
    register(store, "h2", vcpus=4, memory_mib=8192)
    stores = [Store.open(store_url) for _ in range(20)]
    barrier = threading.Barrier(len(stores))
    results: list[Vm | BaseException] = [ValueError("not run")] * len(stores)

    def worker(i: int) -> None:
        barrier.wait()
        try:
            _op, vm = stores[i].reserve_vm(spec(f"vm-{i:02d}"), None, create_op(f"vm-{i:02d}"))
            assert vm is not None
            results[i] = vm
        except BaseException as exc:  # collected and asserted on below
            results[i] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(stores))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        for s in stores:
            s.close()

    placed = [r for r in results if isinstance(r, Vm)]
    failed = [r for r in results if not isinstance(r, Vm)]
    assert all(isinstance(f, ResourceExhausted) and f.reason == "NO_HOST_FITS" for f in failed), failed
    assert len(placed) == 8
    assert len(failed) == 12
    for host in store.list_hosts():
        assert host.allocated.fits_in(host.allocatable), host
        assert host.vm_count == 4
    assert sorted(v.name for v in store.list_vms(page_size=100)[0]) == sorted(v.name for v in placed)


def test_concurrent_retries_of_one_request_create_once(store_url: str, store: Store) -> None:
    register(store, "h1")
    stores = [Store.open(store_url) for _ in range(8)]
    barrier = threading.Barrier(len(stores))
    op_ids: list[str] = []
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        barrier.wait()
        try:
            op, _vm = stores[i].reserve_vm(spec("web"), None, create_op("web", "same-req", f"op-{i}"))
            op_ids.append(op.id)
        except BaseException as exc:  # asserted on below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(stores))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        for s in stores:
            s.close()
    assert errors == []
    assert len(set(op_ids)) == 1 and len(op_ids) == len(stores)
    assert len(store.list_operations()) == 1
    assert store.get_host("h1").vm_count == 1


def test_release_frees_capacity(store: Store) -> None:
    register(store, "a", vcpus=2, memory_mib=2048)
    reserve(store, spec("v1"))
    reserve(store, spec("v2"))
    with pytest.raises(ResourceExhausted):
        reserve(store, spec("v3"))
    store.release_vm("v1")
    assert store.get_host("a").allocated == Resources(1, 1024, 0)
    assert reserve(store, spec("v3")).host == "a"
    with pytest.raises(NotFound) as err:
        store.release_vm("v1")
    assert err.value.reason == "VM_NOT_FOUND"
    with pytest.raises(NotFound):
        store.get_vm("v1")


# ---------------------------------------------------------------------------- VMs


def test_list_vms_pagination_and_filters(store: Store) -> None:
    register(store, "a", vcpus=64, memory_mib=65536)
    register(store, "b", vcpus=64, memory_mib=65536)
    for i in range(25):
        labels = {"tier": "web" if i % 2 == 0 else "db", "team": "x" if i < 10 else "y"}
        reserve(store, spec(f"vm-{i:02d}", memory_mib=256, labels=labels), host="a" if i % 3 else "b")
    store.update_vm_observed("vm-04", VmState.RUNNING)
    store.update_vm_observed("vm-07", VmState.RUNNING)

    names: list[str] = []
    token = ""
    pages = 0
    while True:
        page, token = store.list_vms(page_size=10, page_token=token)
        names += [v.name for v in page]
        pages += 1
        if not token:
            break
    assert pages == 3
    assert names == [f"vm-{i:02d}" for i in range(25)]

    on_b, token = store.list_vms(host="b", page_size=100)
    assert token == ""
    assert [v.name for v in on_b] == [f"vm-{i:02d}" for i in range(25) if i % 3 == 0]

    running, _ = store.list_vms(state=VmState.RUNNING)
    assert [v.name for v in running] == ["vm-04", "vm-07"]

    web_x, _ = store.list_vms(labels={"tier": "web", "team": "x"})
    assert [v.name for v in web_x] == ["vm-00", "vm-02", "vm-04", "vm-06", "vm-08"]

    # filters and paging together; a last page that is exactly full carries no token
    expected = [f"vm-{i:02d}" for i in range(25) if i % 3 and i % 2]
    assert len(expected) == 8
    first, token = store.list_vms(host="a", labels={"tier": "db"}, page_size=4)
    assert token != ""
    rest, last = store.list_vms(host="a", labels={"tier": "db"}, page_size=4, page_token=token)
    assert [v.name for v in first + rest] == expected
    assert last == ""

    assert store.list_vms(labels={"tier": "none"}) == ([], "")
    with pytest.raises(InvalidArgument) as err:
        store.list_vms(page_token="%%%")
    assert err.value.reason == "INVALID_PAGE_TOKEN"
    assert [v.name for v in store.vms_on_host("b")] == [v.name for v in on_b]


def test_spec_round_trip_and_observed_update(store: Store, clock: FakeClock) -> None:
    register(store, "a")
    full = VmSpec(
        name="full",
        vcpus=2,
        memory_mib=1536,
        disks=(DiskSpec("root", "debian-12.qcow2", 2048), DiskSpec("data", "", 512)),
        kernel_boot=KernelBoot("/boot/vmlinuz", "/boot/initrd", "console=ttyS0"),
        network=NetworkSpec(NetworkMode.NONE, "isolated"),
        shared_folders=(SharedFolder("/srv/share", "share", True),),
        cloud_init=CloudInit("#cloud-config\n", "instance-id: x\n", ""),
        labels=(("app", "demo"), ("env", "dev")),
    )
    vm = reserve(store, full)
    assert vm.spec == full
    assert vm.state is VmState.PENDING
    assert store.get_host("a").allocated == Resources(2, 1536, 2560)

    clock.advance(3)
    addresses = (IpAddress("eth0", "10.0.0.5", 24, "agent"),)
    updated = store.update_vm_observed("full", VmState.RUNNING, "1234-uuid", addresses, "")
    assert updated is not None
    assert updated.state is VmState.RUNNING
    assert updated.uuid == "1234-uuid"
    assert updated.addresses == addresses
    assert updated.update_time == clock.now
    assert updated.create_time == vm.create_time
    assert store.get_vm("full") == updated
    # None leaves fields alone
    again = store.update_vm_observed("full", VmState.STOPPED)
    assert again is not None
    assert again.uuid == "1234-uuid" and again.addresses == addresses
    assert store.update_vm_observed("nope", VmState.RUNNING) is None  # gone: the observation is moot


def test_changes_since(store: Store) -> None:
    register(store, "a")
    start = store.current_revision()
    reserve(store, spec("v1"))
    reserve(store, spec("v2"))
    assert [(vm.name, deleted) for _rev, vm, deleted in store.changes_since(start)] == [
        ("v1", False),
        ("v2", False),
    ]
    mid = store.current_revision()
    assert mid == start + 2

    store.update_vm_observed("v1", VmState.RUNNING)
    store.update_vm_observed("v1", VmState.RUNNING)  # no change: no new revision
    assert store.current_revision() == mid + 1
    store.release_vm("v2")
    changes = store.changes_since(mid)
    assert [(vm.name, vm.state, deleted) for _rev, vm, deleted in changes] == [
        ("v1", VmState.RUNNING, False),
        ("v2", VmState.PENDING, True),
    ]
    revisions = [rev for rev, _vm, _deleted in changes]
    assert revisions == sorted(revisions) and revisions[-1] == store.current_revision()
    assert store.changes_since(store.current_revision()) == []
    assert len(store.changes_since(start, limit=1)) == 1

    with pytest.raises(FailedPrecondition) as err:
        store.changes_since(store.current_revision() + 10)
    assert err.value.reason == "WATCH_REVISION_AHEAD"


def test_changes_since_compacted(store_url: str, clock: FakeClock) -> None:
    with Store.open(store_url, clock=clock, tombstone_retention=2) as store:
        register(store, "a")
        for i in range(4):
            reserve(store, spec(f"v{i}"))
        for i in range(4):
            store.release_vm(f"v{i}")
        tombstones = store.changes_since(store.current_revision() - 2)
        assert [(vm.name, deleted) for _rev, vm, deleted in tombstones] == [("v2", True), ("v3", True)]
        with pytest.raises(FailedPrecondition) as err:
            store.changes_since(0)
        assert err.value.reason == "WATCH_REVISION_COMPACTED"


# ---------------------------------------------------------------------------- reconcile


def observed(name: str, host: str, state: VmState = VmState.RUNNING, **kw: object) -> Vm:
    """A Vm as an agent would report it."""
    return Vm(name=name, host=host, state=state, spec=spec(name), uuid=f"uuid-{name}", **kw)  # type: ignore[arg-type]


def test_reconcile_host(store: Store) -> None:
    register(store, "a")
    register(store, "b")
    for name in ("keep", "gone", "creating", "deleting"):
        store.reserve_vm(spec(name), "a", create_op(name))
        if name != "creating":
            store.finish_operation(f"op-{name}")
    store.begin_operation(Operation(id="op-del", kind="vm.delete", target="vms/deleting"))
    store.update_vm_observed("deleting", VmState.DELETING)
    reserve(store, spec("on-b"), host="b")

    before = store.current_revision()
    listing = [
        observed("keep", "a"),
        observed("stray", "a", addresses=(IpAddress("eth0", "10.1.1.1", 24, "lease"),)),
        observed("on-b", "a"),  # claimed by another host: left alone
    ]
    changed = store.reconcile_host("a", listing)
    assert changed == ["gone", "keep", "stray"]
    assert store.get_vm("keep").state is VmState.RUNNING
    assert store.get_vm("keep").uuid == "uuid-keep"
    gone = store.get_vm("gone")
    assert gone.state is VmState.FAILED and gone.state_reason == VANISHED_REASON
    # still being created / deleted by an unfinished operation: its outcome decides, not reconcile
    assert store.get_vm("creating").state is VmState.PENDING
    assert store.get_vm("deleting").state is VmState.DELETING
    stray = store.get_vm("stray")
    assert stray.host == "a" and stray.state is VmState.RUNNING
    assert stray.addresses[0].address == "10.1.1.1"
    assert store.get_vm("on-b").host == "b"
    host_a = store.get_host("a")
    assert host_a.vm_count == 5  # keep, gone, creating, deleting, stray (adopted with its reservation)
    assert host_a.allocated == Resources(5, 5120, 0)
    assert {vm.name for _rev, vm, _deleted in store.changes_since(before)} == {"gone", "keep", "stray"}

    # the same listing again changes nothing
    assert store.reconcile_host("a", listing) == []
    # a vanished VM that comes back is recorded as observed again
    assert store.reconcile_host("a", [*listing, observed("gone", "a")]) == ["gone"]
    assert store.get_vm("gone").state is VmState.RUNNING
    assert store.get_vm("gone").state_reason == ""
    with pytest.raises(NotFound):
        store.reconcile_host("nope", [])


def test_reconcile_does_not_adopt_what_was_deleted_after_the_listing(store: Store, clock: FakeClock) -> None:
    # two deletes overlap on one host: the listing for one was taken while the other VM still existed
    register(store, "a")
    for name in ("x", "y"):
        store.reserve_vm(spec(name), "a", create_op(name))
        store.finish_operation(f"op-{name}")
    listed_at = clock.advance(1)
    stale = [observed("x", "a")]  # the agent answered before it deleted x
    clock.advance(1)
    # a delete of a same-named VM on another host does not hide this host's x
    store.begin_operation(Operation(id="op-del-x-b", kind="vm.delete", target="vms/x", params={"host": "b"}))
    store.begin_operation(Operation(id="op-del-x", kind="vm.delete", target="vms/x", params={"host": "a"}))
    store.release_vm("x")
    # the delete is still running, then it has ended after the listing: x is not adopted either way
    assert store.reconcile_host("a", stale, listed_at) == ["y"]
    store.finish_operation("op-del-x")
    assert store.reconcile_host("a", stale, listed_at) == []
    with pytest.raises(NotFound):
        store.get_vm("x")
    # a listing taken after the delete ended (x still there: a new VM of that name) is adopted as before
    store.finish_operation("op-del-x-b")
    assert store.reconcile_host("a", stale, clock.advance(1)) == ["x"]
    assert store.get_vm("x").host == "a"


# ---------------------------------------------------------------------------- operations


def test_operations_lifecycle(store: Store, clock: FakeClock) -> None:
    register(store, "a")
    op, vm = store.reserve_vm(spec("web"), None, create_op("web", "r1", "op-1"))
    assert vm is not None
    assert not op.done and op.create_time == clock.now and op.request_id == "r1"

    clock.advance(1)
    stop, created = store.begin_operation(
        Operation(id="op-2", kind="vm.stop", target="vms/web", params={"timeout_seconds": "30"})
    )
    assert created and stop.params == {"timeout_seconds": "30"}
    with pytest.raises(AlreadyExists):
        store.begin_operation(Operation(id="op-2", kind="vm.stop", target="vms/web"))
    start = Operation(id="op-3", kind="vm.start", target="vms/web", request_id="r2")
    first, created = store.begin_operation(start)
    assert created and first.id == "op-3"
    again, created = store.begin_operation(Operation(id="op-4", kind="vm.start", target="vms/web", request_id="r2"))
    assert not created and again == first
    with pytest.raises(AlreadyExists) as reused:
        store.begin_operation(Operation(id="op-5", kind="vm.stop", target="vms/web", request_id="r2"))
    assert reused.value.reason == "REQUEST_ID_REUSED"

    updated = store.update_operation("op-1", step="define", progress=40)
    assert (updated.step, updated.progress) == ("define", 40)
    assert [o.id for o in store.unfinished_operations()] == ["op-1", "op-2", "op-3"]

    result = store.update_vm_observed("web", VmState.RUNNING)
    done = store.finish_operation("op-1", observed=result)
    assert done.done and done.progress == 100 and done.result_vm == result
    # a second finish (a resumed worker) does not overwrite the first outcome
    assert store.finish_operation("op-1", error=Unavailable("late", reason="X")) == done
    with pytest.raises(FailedPrecondition) as err:
        store.update_operation("op-1", progress=50)
    assert err.value.reason == "OPERATION_DONE"
    with pytest.raises(InvalidArgument):
        store.update_operation("op-2", progress=101)

    failed = store.finish_operation(
        "op-2", error=Unavailable("agent a is down", reason="HOST_UNREACHABLE", metadata={"host": "a"})
    )
    assert (failed.error_code, failed.error_reason, failed.error_message) == (
        "UNAVAILABLE",
        "HOST_UNREACHABLE",
        "agent a is down",
    )
    assert failed.error_metadata == {"host": "a"}
    assert failed.result_vm is None
    assert store.get_operation("op-2") == failed

    assert [o.id for o in store.list_operations()] == ["op-3", "op-2", "op-1"]
    assert [o.id for o in store.list_operations(limit=1)] == ["op-3"]
    assert [o.id for o in store.list_operations(only_running=True)] == ["op-3"]
    assert [o.id for o in store.unfinished_operations()] == ["op-3"]
    with pytest.raises(NotFound) as nf:
        store.get_operation("missing")
    assert nf.value.reason == "OPERATION_NOT_FOUND"

    clock.advance(3600)
    assert store.delete_finished_operations(clock.now - timedelta(minutes=1)) == 2
    assert [o.id for o in store.list_operations()] == ["op-3"]


def test_a_step_and_its_vm_state_commit_together(store: Store, clock: FakeClock) -> None:
    register(store, "a")
    _op, vm = store.reserve_vm(spec("web"), None, create_op("web", "r1", "op-1"))
    assert vm is not None and vm.state is VmState.PENDING
    before = store.current_revision()
    clock.advance(1)
    stepped = store.update_operation("op-1", "creating on host a", 20, vm_state=VmState.CREATING)
    assert (stepped.step, stepped.progress) == ("creating on host a", 20)
    creating = store.get_vm("web")
    assert creating.state is VmState.CREATING and creating.update_time == clock.now
    assert store.current_revision() == before + 1  # watchers see the VM's change

    # refused for a finished operation: the VM is left as it was, not half of the step
    store.finish_operation("op-1")
    with pytest.raises(FailedPrecondition) as done:
        store.update_operation("op-1", "late", 50, vm_state=VmState.STOPPED)
    assert done.value.reason == "OPERATION_DONE"
    assert store.get_vm("web") == creating
    with pytest.raises(NotFound):
        store.update_operation("missing", "x", 10, vm_state=VmState.RUNNING)


def test_a_reservation_with_a_creating_step_records_the_vm_creating_and_the_step_on_the_chosen_host(
    store: Store,
) -> None:
    register(store, "a")
    op, vm = store.reserve_vm(
        spec("web"), None, create_op("web", "r1", "op-1"), creating_step="creating on host {host}"
    )
    assert vm is not None and vm.state is VmState.CREATING and vm.host == "a"
    assert (op.step, op.progress, op.done) == ("creating on host a", 20, False)
    assert store.get_operation("op-1") == op and store.get_vm("web") == vm
    # a retry of the request returns what was recorded, and records nothing more
    again, same = store.reserve_vm(
        spec("web"), None, create_op("web", "r1", "op-2"), creating_step="creating on host {host}"
    )
    assert (again, same) == (op, vm) and [o.id for o in store.list_operations()] == ["op-1"]
    # refused placements record nothing, the step included
    with pytest.raises(AlreadyExists):
        store.reserve_vm(spec("web"), None, create_op("web", "r2", "op-3"), creating_step="creating on host {host}")
    with pytest.raises(NotFound):
        store.reserve_vm(spec("db"), "nohost", create_op("db", "r3", "op-4"), creating_step="creating on host {host}")
    assert [o.id for o in store.list_operations()] == ["op-1"]
    assert [v.name for v in store.list_vms()[0]] == ["web"]


def test_an_event_the_operations_answer_overtook_is_not_applied(store: Store) -> None:
    register(store, "a")
    store.reserve_vm(spec("web"), None, create_op("web", "r1", "op-1"))
    store.update_operation("op-1", "creating on host a", 20, vm_state=VmState.CREATING)
    # the agent answered at its revision 3/10: its events about the create have 3/10 or less
    store.finish_operation("op-1", observed=observed("web", "a"), revision=Revision(3, 10))
    running, fleet = store.get_vm("web"), store.current_revision()
    assert running.state is VmState.RUNNING
    # "defined" (stopped) sent before the answer, arriving after it: older news, nothing changes
    for seq in (9, 10):
        assert store.update_vm_observed("web", VmState.STOPPED, agent_revision=Revision(3, seq)) == running
    gone = store.update_vm_observed(
        "web", VmState.FAILED, None, (), "vanished from host", agent_revision=Revision(3, 7)
    )
    assert gone == running and store.get_vm("web") == running and store.current_revision() == fleet
    # a later event is news, and then the bar is that event's revision
    stopped = store.update_vm_observed("web", VmState.STOPPED, agent_revision=Revision(3, 11))
    assert stopped is not None and stopped.state is VmState.STOPPED and store.current_revision() == fleet + 1
    assert store.update_vm_observed("web", VmState.RUNNING, agent_revision=Revision(3, 10)) == stopped
    # an event repeating the state moves the bar without waking watchers
    assert store.update_vm_observed("web", VmState.STOPPED, agent_revision=Revision(3, 20)) == stopped
    assert store.current_revision() == fleet + 1
    assert store.update_vm_observed("web", VmState.RUNNING, agent_revision=Revision(3, 15)) == stopped
    # a higher epoch (the agent restarted) is news: applied; a report without a
    # revision (an address refresher's) is applied as before
    assert store.update_vm_observed("web", VmState.RUNNING, agent_revision=Revision(4, 1)).state is VmState.RUNNING  # type: ignore[union-attr]
    assert store.update_vm_observed("web", VmState.STOPPED).state is VmState.STOPPED  # type: ignore[union-attr]
    # an operation's answer without a revision (an older agent) leaves the recorded one
    store.begin_operation(Operation(id="op-2", kind="vm.start", target="vms/web"))
    store.finish_operation("op-2", observed=observed("web", "a"))
    assert store.update_vm_observed("web", VmState.STOPPED, agent_revision=Revision(4, 1)).state is VmState.RUNNING  # type: ignore[union-attr]


def test_a_report_from_an_agent_process_that_has_ended_is_not_applied(store: Store) -> None:
    register(store, "a", epoch=1)
    store.reserve_vm(spec("web"), None, create_op("web", "r1", "op-1"))
    store.update_operation("op-1", "creating on host a", 20, vm_state=VmState.CREATING)
    # the agent was killed during the create and restarted (epoch 2); the retried create answered there
    register(store, "a", epoch=2)
    store.finish_operation("op-1", observed=observed("web", "a"), revision=Revision(2, 4))
    answered = store.get_vm("web")
    # an event of the killed agent (epoch 1: its first try's domain), held until now: older news
    late = store.update_vm_observed("web", VmState.STOPPED, "uuid-first-try", agent_revision=Revision(1, 9))
    assert late == answered and store.get_vm("web") == answered
    # the restarted agent's own events are news
    stopped = store.update_vm_observed("web", VmState.STOPPED, agent_revision=Revision(2, 5))
    assert stopped is not None and stopped.state is VmState.STOPPED


def test_an_agent_whose_journal_was_recreated_is_heard_again(store: Store) -> None:
    register(store, "a", epoch=7)
    store.reserve_vm(spec("web"), None, create_op("web", "r1", "op-1"))
    store.finish_operation("op-1", observed=observed("web", "a"), revision=Revision(7, 30))
    # the agent's state folder was wiped: its epochs start over, below the one recorded with the VM
    register(store, "a", epoch=1)
    stopped = store.update_vm_observed("web", VmState.STOPPED, agent_revision=Revision(1, 2))
    assert stopped is not None and stopped.state is VmState.STOPPED
    # and its history is compared again from there
    assert store.update_vm_observed("web", VmState.RUNNING, agent_revision=Revision(1, 1)) == stopped


def test_an_answer_at_the_recorded_revision_still_ends_the_operations_own_state(store: Store) -> None:
    register(store, "a")
    store.reserve_vm(spec("web"), None, create_op("web", "r1", "op-1"))
    store.finish_operation("op-1", observed=observed("web", "a", state=VmState.STOPPED), revision=Revision(2, 6))
    # a stop of the stopped VM: nothing happens on the agent, so its answer has the same revision
    store.begin_operation(Operation(id="op-2", kind="vm.stop", target="vms/web"))
    store.update_operation("op-2", "stopping", 30, vm_state=VmState.STOPPING)
    done = store.finish_operation("op-2", observed=observed("web", "a", state=VmState.STOPPED), revision=Revision(2, 6))
    assert store.get_vm("web").state is VmState.STOPPED and done.result_vm == store.get_vm("web")
    # an answer older than an event already applied does not undo it
    store.begin_operation(Operation(id="op-3", kind="vm.start", target="vms/web"))
    store.update_vm_observed("web", VmState.CRASHED, agent_revision=Revision(2, 9))
    store.finish_operation("op-3", observed=observed("web", "a"), revision=Revision(2, 8))
    assert store.get_vm("web").state is VmState.CRASHED


def test_the_end_of_an_operation_records_the_hosts_report(store: Store, clock: FakeClock) -> None:
    register(store, "a")
    store.reserve_vm(spec("web"), None, create_op("web", "r1", "op-1"))
    store.update_operation("op-1", "creating on host a", 20, vm_state=VmState.CREATING)
    clock.advance(1)
    addresses = (IpAddress("eth0", "10.0.0.5", 24, "agent"),)
    report = observed("web", "a", addresses=addresses, state_reason="booted")
    done = store.finish_operation("op-1", observed=report, step="running")
    stored = store.get_vm("web")
    assert (stored.state, stored.uuid, stored.addresses, stored.state_reason) == (
        VmState.RUNNING,
        "uuid-web",
        addresses,
        "booted",
    )
    # the result is the VM as stored (the record's spec, host and revision), not the report
    assert done.done and done.progress == 100 and done.step == "running"
    assert done.result_vm == stored and store.get_operation("op-1") == done

    # a finished operation keeps its outcome, and a late report through it changes nothing
    late = observed("web", "a", state=VmState.CRASHED)
    assert store.finish_operation("op-1", observed=late, step="crashed") == done
    assert store.get_vm("web") == stored

    # the VM's record is gone (deleted meanwhile): the report itself is the result
    store.begin_operation(Operation(id="op-2", kind="vm.start", target="vms/web"))
    store.release_vm("web")
    gone = store.finish_operation("op-2", observed=report)
    assert gone.result_vm == report
    with pytest.raises(NotFound):
        store.get_vm("web")
