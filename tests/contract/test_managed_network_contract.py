"""Managed networks (``NetworkMode.MANAGED``) in the Hypervisor contract: the fake, libvirt's test driver and real QEMU.

A plan's VMs share one network the adapter makes with the first of them and removes with the last; each
VM adds a DHCP host entry (its MAC -> its address, named after its first DNS name) and a DNS host entry
(its address -> its DNS names). Every test gets ``h`` (see conftest), whose teardown fails the test when
anything the adapter owns is left, networks included.

Driver differences, stated where they matter: libvirt's test driver checks no host routes when it starts a
network (it has no host network), so a subnet that is in use elsewhere is not refused there.

``test_dns_names_resolve_between_two_real_guests`` boots two tiny guests on real QEMU and resolves one's
DNS names from the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import os
import random
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from clonebox_agent.adapters import common
from clonebox_agent.adapters.common import Fault, MemoryStepLog, NetworkState
from clonebox_agent.app.recovery import Recovery
from clonebox_agent.journal.store import Journal, JournalStepLog, TxnState
from clonebox_agent.ports import NETWORK_ORPHAN_PREFIX, TxnStep
from clonebox_core.errors import FailedPrecondition, Internal, NotFound
from clonebox_core.model import NetworkMode, NetworkSpec, StepState, VmSpec, VmState
from tests.contract.conftest import Harness, make_adapter
from tests.realfleet import libvirt_reason

if TYPE_CHECKING:
    from tests.contract.conftest import RunFiles

#: where test subnets come from: far from the controller's 10.213.0.0/16 plan pool and libvirt's default
TEST_POOL = ipaddress.IPv4Network("172.20.0.0/14")


# ---- helpers ------------------------------------------------------------------------------------


def free_subnet(taken: tuple[ipaddress.IPv4Network, ...] = ()) -> ipaddress.IPv4Network:
    """A /24 of ``TEST_POOL`` that no route of this host and nothing in ``taken`` overlaps."""
    routes = [dest for dest, _iface in common.host_routes() if dest.prefixlen]
    blocks = list(TEST_POOL.subnets(new_prefix=24))
    random.shuffle(blocks)
    for block in blocks:
        if not any(block.overlaps(r) for r in [*routes, *taken]):
            return block
    raise AssertionError(f"no free /24 left in {TEST_POOL}")


def network_name(h: Harness) -> str:
    return f"cb-ct-{h.files.token}-{uuid.uuid4().hex[:4]}"


def attach(network: str, subnet: ipaddress.IPv4Network, host: int, *names: str, address: str = "") -> NetworkSpec:
    return NetworkSpec(NetworkMode.MANAGED, network, str(subnet), address or str(subnet[host]), tuple(names))


async def state_of(h: Harness, network: str) -> NetworkState | None:
    """The network as the adapter reports it (the same accessor on all three)."""
    state: NetworkState | None = await h.hv.network_state(network)
    return state


def entries(state: NetworkState | None) -> tuple[set[tuple[str, str]], set[tuple[str, tuple[str, ...]]]]:
    """(address, DHCP name) of every DHCP host entry, (address, names) of every DNS host entry."""
    assert state is not None
    return {(d.ip, d.name) for d in state.dhcp_hosts}, {(d.ip, d.names) for d in state.dns_hosts}


def step_names(steps: list[TxnStep]) -> list[str]:
    return [s.name for s in steps]


def foreign_network(h: Harness, name: str) -> None:
    """Define a libvirt network ``name`` without CloneBox's mark (inactive: it touches no host network)."""
    if h.kind == "fake":
        h.hv.set_network(name, False)
        return
    import libvirt  # on a connection of our own (the test driver keeps its state while one is open)

    conn = libvirt.open(h.hv.uri)
    conn.networkDefineXML(f"<network><name>{name}</name></network>")

    def remove() -> None:
        with contextlib.suppress(libvirt.libvirtError):
            conn.networkLookupByName(name).undefine()
        conn.close()

    h.cleanups.append(remove)


class CrashingLog:
    """A step log whose process "dies" at a named step: the adapter's own rollback then finds nothing to undo.

    Until ``crash_at`` is reached it writes through to ``inner``; from then on ``steps`` answers [], as a
    killed agent would have undone nothing. ``inner`` keeps what was recorded, for recovery.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.crashed = False

    def planned(self, name: str, undo: Mapping[str, str]) -> int:
        n: int = self.inner.planned(name, undo)
        return n

    def made(self, n: int, identity: Mapping[str, str]) -> None:
        self.inner.made(n, identity)

    def undone(self, n: int, ok: bool) -> None:
        self.inner.undone(n, ok)

    def steps(self) -> list[TxnStep]:
        if self.crashed:
            return []
        found: list[TxnStep] = self.inner.steps()
        return found


class Killed(BaseException):
    """What a SIGKILL at a named step looks like to the code that was running."""


def kill_at(h: Harness, log: CrashingLog, step: str) -> None:
    def hook(seen: str) -> None:
        if seen == step:
            log.crashed = True
            raise Killed(step)

    h.hv.faults.hook = hook


# ---- make, share, remove ------------------------------------------------------------------------


async def test_two_vms_share_one_network_with_an_entry_each_and_the_last_removes_it(h: Harness) -> None:
    net, subnet = network_name(h), free_subnet()
    a = h.spec(network=attach(net, subnet, 10, "db", "database"))
    b = h.spec(network=attach(net, subnet, 11, "api"))
    assert await state_of(h, net) is None
    log_a, log_b = MemoryStepLog(), MemoryStepLog()
    assert (await h.hv.create(a, start=True, steps=log_a)).state == VmState.RUNNING
    assert (await h.hv.create(b, start=True, steps=log_b)).state == VmState.RUNNING
    # the first VM made the network, the second only added its entries; both before their domain
    tail = ("network-define", "network-host", "define", "start")
    assert [n for n in step_names(log_a.steps()) if n in tail] == list(tail)
    assert [n for n in step_names(log_b.steps()) if n in tail] == ["network-host", "define", "start"]
    assert all(s.state == StepState.DONE for s in [*log_a.steps(), *log_b.steps()])

    state = await state_of(h, net)
    assert state is not None and state.active
    assert state.owner is not None and state.subnet == str(subnet)
    assert state.bridge == common.bridge_name(net) and len(state.bridge) <= common.MAX_BRIDGE_NAME
    assert entries(state) == (
        {(str(subnet[10]), "db"), (str(subnet[11]), "api")},
        {(str(subnet[10]), ("db", "database")), (str(subnet[11]), ("api",))},
    )
    macs = [d.mac for d in state.dhcp_hosts]
    assert len(set(macs)) == 2 and all(m.startswith("52:54:00:") for m in macs)
    assert (await h.hv.inventory()).networks == (net,)
    assert await h.hv.orphans() == {}  # both VMs use it

    await h.hv.delete(a.name)
    state = await state_of(h, net)
    assert state is not None and state.active, "the network stays while a VM uses it"
    assert entries(state) == ({(str(subnet[11]), "api")}, {(str(subnet[11]), ("api",))})

    removed = await h.hv.delete(b.name)
    assert any(net in r for r in removed), removed
    assert await state_of(h, net) is None
    assert (await h.hv.inventory()).is_empty()
    # nothing left to get in the way of the same plan coming back
    await h.hv.create(a, start=False)
    assert entries(await state_of(h, net))[0] == {(str(subnet[10]), "db")}


async def test_a_vm_without_dns_names_gets_an_address_entry_only(h: Harness) -> None:
    net, subnet = network_name(h), free_subnet()
    spec = h.spec(network=attach(net, subnet, 20))
    await h.hv.create(spec, start=False)
    assert entries(await state_of(h, net)) == ({(str(subnet[20]), "")}, set())


async def test_delete_is_idempotent_when_it_stops_after_the_network_part(h: Harness) -> None:
    net, subnet = network_name(h), free_subnet()
    spec = h.spec(network=attach(net, subnet, 10, "db"))
    await h.hv.create(spec, start=True)
    h.hv.faults.fail_on["delete:network"] = Fault(Internal("injected", reason="INJECTED"))
    with pytest.raises(Internal):
        await h.hv.delete(spec.name)
    # entries and network went before the failure; the domain is still there for the retry to find
    assert await state_of(h, net) is None
    assert (await h.hv.get(spec.name)).state == VmState.STOPPED
    await h.hv.delete(spec.name)
    with pytest.raises(NotFound):
        await h.hv.get(spec.name)
    assert (await h.hv.inventory()).is_empty()


# ---- refusals -----------------------------------------------------------------------------------


async def test_a_network_not_made_by_clonebox_is_refused_and_nothing_is_made(h: Harness) -> None:
    net = network_name(h)
    foreign_network(h, net)
    before = await h.hv.inventory()
    spec = h.spec(network=attach(net, free_subnet(), 10, "db"))
    for attempt in (h.hv.plan_create(spec, start=True), h.hv.create(spec, start=True)):
        with pytest.raises(FailedPrecondition) as err:
            await attempt
        assert err.value.reason == "NETWORK_NOT_MANAGED"
        assert net in err.value.message and err.value.metadata["network"] == net
    assert await h.hv.inventory() == before
    state = await state_of(h, net)
    assert state is not None and state.owner is None and not state.dhcp_hosts and not state.dns_hosts
    with pytest.raises(NotFound):
        await h.hv.get(spec.name)
    # nor is it ever reported as ours to sweep
    assert common.network_orphan_key(net) not in await h.hv.orphans()


async def test_a_network_with_another_subnet_is_refused_and_nothing_is_made(h: Harness) -> None:
    net, subnet = network_name(h), free_subnet()
    other = free_subnet((subnet,))
    await h.hv.create(h.spec(network=attach(net, subnet, 10, "db")), start=False)
    before, state_before = await h.hv.inventory(), await state_of(h, net)
    spec = h.spec(network=attach(net, other, 11, "api"))
    with pytest.raises(FailedPrecondition) as err:
        await h.hv.create(spec, start=True)
    assert err.value.reason == "NETWORK_SUBNET_CONFLICT"
    assert str(subnet) in err.value.message and str(other) in err.value.message
    assert await h.hv.inventory() == before
    assert await state_of(h, net) == state_before


async def test_an_address_or_name_another_vm_has_is_refused_and_nothing_is_made(h: Harness) -> None:
    net, subnet = network_name(h), free_subnet()
    await h.hv.create(h.spec(network=attach(net, subnet, 10, "db")), start=False)
    before, state_before = await h.hv.inventory(), await state_of(h, net)
    cases = [
        (attach(net, subnet, 10, "api"), "NETWORK_ADDRESS_IN_USE"),
        (attach(net, subnet, 11, "db"), "NETWORK_NAME_IN_USE"),
    ]
    for network, reason in cases:
        with pytest.raises(FailedPrecondition) as err:
            await h.hv.create(h.spec(network=network), start=True)
        assert err.value.reason == reason, err.value
        assert await h.hv.inventory() == before
        assert await state_of(h, net) == state_before


async def test_a_subnet_in_use_on_the_host_is_refused_and_nothing_is_made(h: Harness) -> None:
    subnet = free_subnet()
    first = h.spec(network=attach(network_name(h), subnet, 10, "db"))
    await h.hv.create(first, start=False)  # its bridge routes the subnet now
    before = await h.hv.inventory()
    second_net = network_name(h)
    spec = h.spec(network=attach(second_net, subnet, 11, "api"))
    if h.kind == "libvirt-test":
        # the test driver starts networks without looking at routes (it has no host network): not refused
        await h.hv.create(spec, start=True)
        assert (await state_of(h, second_net)) is not None
        return
    with pytest.raises(FailedPrecondition) as err:
        await h.hv.create(spec, start=False)
    assert err.value.reason == "NETWORK_SUBNET_IN_USE"
    assert str(subnet) in err.value.message and "choose another subnet" in err.value.message
    assert await h.hv.inventory() == before
    assert await state_of(h, second_net) is None


# ---- all or nothing -----------------------------------------------------------------------------


@pytest.mark.parametrize("step", ["create:network", "create:define", "create:start"])
async def test_a_create_failing_after_the_network_step_leaves_no_network_and_no_entry(h: Harness, step: str) -> None:
    net, subnet = network_name(h), free_subnet()
    spec = h.spec(network=attach(net, subnet, 10, "db"))
    h.hv.faults.fail_on[step] = Fault(Internal("injected", reason="INJECTED"))
    log = MemoryStepLog()
    with pytest.raises(Internal):
        await h.hv.create(spec, start=True, steps=log)
    assert {"network-define", "network-host"} <= set(step_names(log.steps()))
    assert all(s.state == StepState.UNDONE for s in log.steps()), log.steps()
    assert await state_of(h, net) is None
    assert (await h.hv.inventory()).is_empty()
    # the retry (the fault fired once) makes it all
    await h.hv.create(spec, start=False)
    assert entries(await state_of(h, net))[0] == {(str(subnet[10]), "db")}


async def test_a_failed_create_on_a_shared_network_removes_only_its_own_entries(h: Harness) -> None:
    net, subnet = network_name(h), free_subnet()
    await h.hv.create(h.spec(network=attach(net, subnet, 10, "db")), start=False)
    state_before = await state_of(h, net)
    h.hv.faults.fail_on["create:start"] = Fault(Internal("injected", reason="INJECTED"))
    with pytest.raises(Internal):
        await h.hv.create(h.spec(network=attach(net, subnet, 11, "api")), start=True)
    assert await state_of(h, net) == state_before


@pytest.mark.parametrize("step", ["create:network", "create:define", "create:start"])
async def test_a_killed_create_is_rolled_back_by_recovery_network_and_entries_included(
    h: Harness, step: str, tmp_path: Path
) -> None:
    net, subnet = network_name(h), free_subnet()
    spec = h.spec(network=attach(net, subnet, 10, "db"))
    journal = Journal(tmp_path / "journal.db")
    journal.begin_txn("t1", "vm.create", spec.name, "r1")
    log = CrashingLog(JournalStepLog(journal, "t1"))
    kill_at(h, log, step)
    with pytest.raises(Killed):
        await h.hv.create(spec, start=True, steps=log)
    h.hv.faults.hook = None
    # what the killed agent left: the network with the entry (and the domain, past create:network)
    assert entries(await state_of(h, net))[0] == {(str(subnet[10]), "db")}
    [rolled] = await Recovery(journal, h.hv, "host").roll_back_open()
    assert rolled.failed_steps == ()
    assert any(net in r for r in rolled.removed), rolled.removed
    assert await state_of(h, net) is None
    assert (await h.hv.inventory()).is_empty()
    txn = journal.txn("t1")
    assert txn is not None and txn.state == TxnState.ROLLED_BACK
    journal.close()


async def test_recovery_keeps_a_network_another_vm_joined_meanwhile(h: Harness, tmp_path: Path) -> None:
    net, subnet = network_name(h), free_subnet()
    first = h.spec(network=attach(net, subnet, 10, "db"))
    journal = Journal(tmp_path / "journal.db")
    journal.begin_txn("t1", "vm.create", first.name, "r1")
    log = CrashingLog(JournalStepLog(journal, "t1"))
    kill_at(h, log, "create:define")
    with pytest.raises(Killed):
        await h.hv.create(first, start=True, steps=log)
    h.hv.faults.hook = None
    # before the restart's recovery, a second VM joins the network the killed create defined
    second = h.spec(network=attach(net, subnet, 11, "api"))
    await h.hv.create(second, start=False)
    await Recovery(journal, h.hv, "host").roll_back_open()
    state = await state_of(h, net)
    assert state is not None and entries(state) == ({(str(subnet[11]), "api")}, {(str(subnet[11]), ("api",))})
    journal.close()


async def test_concurrent_creates_and_deletes_on_one_network_make_and_remove_it_once(h: Harness) -> None:
    net, subnet = network_name(h), free_subnet()
    specs = [h.spec(network=attach(net, subnet, 10 + i, f"svc{i}")) for i in range(3)]
    logs = [MemoryStepLog() for _ in specs]
    await asyncio.gather(*(h.hv.create(s, start=False, steps=log) for s, log in zip(specs, logs, strict=True)))
    assert sum("network-define" in step_names(log.steps()) for log in logs) == 1
    assert entries(await state_of(h, net))[0] == {(str(subnet[10 + i]), f"svc{i}") for i in range(3)}
    # each delete pauses between its network part and its undefine: the last one must still see it is last
    h.hv.faults.delays["delete:network"] = 0.2
    await asyncio.gather(*(h.hv.delete(s.name) for s in specs))
    assert await state_of(h, net) is None


# ---- orphans ------------------------------------------------------------------------------------


async def test_a_network_no_vm_uses_is_an_orphan_and_the_sweep_removes_it(h: Harness, tmp_path: Path) -> None:
    used_net, orphan_net, subnet = network_name(h), network_name(h), free_subnet()
    await h.hv.create(h.spec(network=attach(used_net, free_subnet((subnet,)), 10, "web")), start=False)
    spec = h.spec(network=attach(orphan_net, subnet, 10, "db"))
    log = CrashingLog(MemoryStepLog())
    kill_at(h, log, "create:network")  # killed, and its transaction lost: only the sweep can find it
    with pytest.raises(Killed):
        await h.hv.create(spec, start=True, steps=log)
    h.hv.faults.hook = None
    # the VM's own leftovers (volumes, folder) are orphans by its name, the network by its key
    key = common.network_orphan_key(orphan_net)
    assert key.startswith(NETWORK_ORPHAN_PREFIX)
    found = await h.hv.orphans()
    assert set(found) == {spec.name, key}
    assert found[key] == [f"libvirt network {orphan_net} (bridge {common.bridge_name(orphan_net)}, subnet {subnet})"]
    journal = Journal(tmp_path / "journal.db")
    report = await Recovery(journal, h.hv, "host").sweep(remove=True)
    assert set(report.removed) == {spec.name, key}
    assert await state_of(h, orphan_net) is None
    assert await h.hv.orphans() == {}
    assert (await h.hv.inventory()).networks == (used_net,)
    events = journal.pending_events()
    assert any(e.resource == f"hosts/host/networks/{orphan_net}" for e in events), events
    # sweeping again finds nothing and removing it again is no error
    assert await h.hv.delete(key) == []
    journal.close()


async def test_a_create_in_progress_keeps_its_network_from_the_sweep(h: Harness) -> None:
    """Between its network steps and its domain, a create holds the network's lock: no orphan, no removal."""
    net, subnet = network_name(h), free_subnet()
    spec = h.spec(network=attach(net, subnet, 10, "db"))
    h.hv.faults.delays["create:network"] = 1.0  # after the entries, before the domain
    create = asyncio.create_task(h.hv.create(spec, start=False))

    async def defined() -> bool:
        return await state_of(h, net) is not None

    await h.wait_until(defined, 10, f"network {net} defined by the create")
    key = common.network_orphan_key(net)
    assert key not in await h.hv.orphans()
    assert await h.hv.delete(key) == []  # the sweep's removal: waits for the lock or leaves it alone
    await create
    assert entries(await state_of(h, net))[0] == {(str(subnet[10]), "db")}
    assert await h.hv.orphans() == {}


# ---- dry run ------------------------------------------------------------------------------------


async def test_plan_create_shows_the_network_steps_and_makes_nothing(h: Harness) -> None:
    net, subnet = network_name(h), free_subnet()
    spec = h.spec(network=attach(net, subnet, 10, "db"))
    plan = await h.hv.plan_create(spec, start=True)
    names = [s.split(":", 1)[0] for s in plan.steps]
    assert names[names.index("network-define") :] == ["network-define", "network-host", "define", "start", "commit"]
    if plan.domain_xml:
        assert f'<source network="{net}" />' in plan.domain_xml and "<mac address=" in plan.domain_xml
    assert await state_of(h, net) is None and (await h.hv.inventory()).is_empty()
    await h.hv.create(spec, start=False)
    second = await h.hv.plan_create(h.spec(network=attach(net, subnet, 11, "api")), start=True)
    assert "network-define" not in [s.split(":", 1)[0] for s in second.steps]


# ---- DNS from inside a real guest ---------------------------------------------------------------


@pytest.fixture
async def qemu(run_files: RunFiles) -> AsyncIterator[Harness]:
    """The contract harness on real QEMU only (this test needs guests that run programs)."""
    why = libvirt_reason()
    if why:
        pytest.skip(why)
    storage_dir = tempfile.mkdtemp(prefix="libvirt-qemu-dns-", dir=run_files.root)
    os.chmod(storage_dir, 0o755)
    hv = make_adapter("libvirt-qemu", run_files, storage_dir)
    harness = Harness("libvirt-qemu", hv, run_files, storage_dir, asyncio.get_running_loop())
    await hv.open(harness.events.append)
    try:
        yield harness
    finally:
        for record in await hv.list():
            await hv.delete(record.name)
        inventory = await hv.inventory()
        await hv.remove_pool()
        await hv.close()
        shutil.rmtree(storage_dir, ignore_errors=True)
        assert inventory.is_empty(), f"owned things left: {inventory}"


@pytest.mark.e2e
@pytest.mark.libvirt
async def test_dns_names_resolve_between_two_real_guests(qemu: Harness) -> None:
    """One boot of two tiny guests: A fetches B's web page by B's DNS names, B has its fixed address."""
    h = qemu
    net, subnet = network_name(h), free_subnet()
    # "db" is also B's DHCP host name; "database" only the DNS host entry answers
    b = h.guest_spec(network=attach(net, subnet, 10, "db", "database"))
    a = h.guest_spec(network=attach(net, subnet, 11, "web"))
    await asyncio.gather(h.hv.create(b, start=True), h.hv.create(a, start=True))

    def ready(vm: VmSpec) -> bool:
        return h.console_says(vm.name, b"CLONEBOX-TESTGUEST READY")

    for vm in (a, b):
        await h.wait_until(functools.partial(ready, vm), 180, f"{vm.name} READY on its console")

    async def run(vm: VmSpec, script: str) -> tuple[int, str]:
        result = await h.hv.guest_exec(vm.name, ["/bin/sh", "-c", script], timeout=20)
        return result.exit_code, (result.stdout + result.stderr).decode(errors="replace")

    code, out = await run(b, "cat /run/ip")
    assert (code, out.strip()) == (0, str(subnet[10])), "B has the address of its DHCP host entry"
    for name in ("database", "db"):
        code, out = await run(a, f"nslookup {name}")
        assert code == 0 and f"Address: {subnet[10]}" in out, f"the network's DNS did not answer {name}: {out}"
        # busybox wget's -T makes the static binary crash here: the guest_exec timeout bounds it instead
        code, out = await run(a, f"wget -q -O - http://{name}/")
        assert code == 0, f"A could not fetch http://{name}/: {out}"
        assert f'<span id="hostname">{b.name}</span>' in out, out
