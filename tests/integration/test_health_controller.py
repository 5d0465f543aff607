"""The controller's HealthService over real gRPC + mTLS, fed by a FAKE agent's WatchHealth stream.

``FakeHealthAgent`` below is a test double, not the real clonebox-agent: a grpc.aio server with an agent
certificate that serves only what the controller needs here (ListVms/WatchVms so the fleet adopts its
VMs, WatchHealth and CheckHealth from states the test sets) and registers over HostService.Connect
like a real agent. It lets these tests script exactly which updates arrive, and when.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import grpc.aio
import pytest
from clonebox.agent.v1 import agent_pb2, agent_pb2_grpc
from clonebox.controller.v1 import health_service_pb2 as hpb
from clonebox.controller.v1 import health_service_pb2_grpc as hgrpc
from clonebox.controller.v1 import host_service_pb2, host_service_pb2_grpc
from clonebox.type.v1 import health_pb2, host_pb2

from clonebox_core.errors import CloneboxError, FailedPrecondition, NotFound
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
from clonebox_core.model import HypervisorInfo, Resources, Revision, Vm, VmSpec, VmState
from clonebox_core.rpc import convert, convert_health
from clonebox_core.rpc.server import ServerHandle, Transport, aio_channel, start_server
from clonebox_core.rpc.status import error_from_rpc
from clonebox_core.rpc.tls import TlsFiles
from tests.integration.conftest import TRUST_DOMAIN, Fleet, eventually
from tests.integration.test_fleet import create, spec

pytestmark = pytest.mark.integration

H = HealthState
#: a bound on each wait, so a bug fails the test instead of hanging it (never a speed assertion)
WAIT = 15.0


def now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def vm_health(vm: str, state: HealthState, host: str = "h1") -> VmHealth:
    """A VM with one critical http check in ``state``."""
    t = now()
    last = ProbeResult("web", Sample.PASS if state is H.HEALTHY else Sample.FAIL, "probe said so", t, 1200)
    return VmHealth(vm, host, state, (CheckStatus("web", ProbeType.HTTP, state, True, last=last, since=t),), t, t)


def change(vm: str, a: HealthState, b: HealthState, detail: str = "") -> list[Transition]:
    """The check-level and the VM-level transition of one change."""
    t = now()
    return [Transition(vm, "h1", "web", a, b, t, detail), Transition(vm, "h1", "", a, b, t, detail)]


class FakeHealthAgent(agent_pb2_grpc.AgentServiceServicer):
    """FAKE agent (a test double, see the module docstring): scripted WatchHealth and CheckHealth."""

    def __init__(self, fleet: Fleet, name: str, vms: Sequence[VmHealth]) -> None:
        self.fleet = fleet
        self.name = name
        self.health = {h.vm: h for h in vms}
        self.streams: list[asyncio.Queue[agent_pb2.WatchHealthResponse]] = []
        self.checks: list[tuple[str, str]] = []
        self.server: ServerHandle | None = None
        self._channel: grpc.aio.Channel | None = None
        self._session: asyncio.Task[None] | None = None

    # ---- the agent API, as far as the controller needs it

    async def ListVms(self, request: agent_pb2.ListVmsRequest, context: Any) -> agent_pb2.ListVmsResponse:
        vms = [Vm(n, self.name, VmState.RUNNING, VmSpec(n, vcpus=1, memory_mib=256)) for n in sorted(self.health)]
        return agent_pb2.ListVmsResponse(
            vms=[convert.vm_to_proto(v) for v in vms], revision=convert.revision_to_proto(Revision(1, 0))
        )

    async def WatchVms(
        self, request: agent_pb2.WatchVmsRequest, context: Any
    ) -> AsyncIterator[agent_pb2.WatchVmsResponse]:
        await asyncio.Event().wait()  # no lifecycle events in these tests
        yield agent_pb2.WatchVmsResponse()

    async def WatchHealth(
        self, request: agent_pb2.WatchHealthRequest, context: Any
    ) -> AsyncIterator[agent_pb2.WatchHealthResponse]:
        queue: asyncio.Queue[agent_pb2.WatchHealthResponse] = asyncio.Queue()
        self.streams.append(queue)
        try:
            for h in list(self.health.values()):
                yield agent_pb2.WatchHealthResponse(health=convert_health.vm_health_to_proto(h))
            yield agent_pb2.WatchHealthResponse(synced=True)
            while True:
                yield await queue.get()
        finally:
            self.streams.remove(queue)

    async def CheckHealth(self, request: agent_pb2.CheckHealthRequest, context: Any) -> agent_pb2.CheckHealthResponse:
        if request.name not in self.health:
            raise NotFound(f"VM {request.name!r} does not exist", reason="VM_NOT_FOUND")
        self.checks.append((request.name, request.check))
        result = ProbeResult(request.check or "web", Sample.PASS, "checked now", now(), 700)
        return agent_pb2.CheckHealthResponse(
            results=[convert_health.result_to_proto(result)],
            health=convert_health.vm_health_to_proto(self.health[request.name]),
        )

    # ---- scripting

    def push(
        self,
        health: VmHealth,
        transitions: Sequence[Transition] = (),
        aggregates: Sequence[Aggregate] = (),
        actions: Sequence[ActionRecord] = (),
        removed: bool = False,
    ) -> None:
        """Send one update on every open WatchHealth stream."""
        if removed:
            self.health.pop(health.vm, None)
        else:
            self.health[health.vm] = health
        msg = agent_pb2.WatchHealthResponse(
            health=convert_health.vm_health_to_proto(health),
            transitions=[convert_health.transition_to_proto(t) for t in transitions],
            aggregates=[convert_health.aggregate_to_proto(a) for a in aggregates],
            actions=[convert_health.action_to_proto(a) for a in actions],
            removed=removed,
        )
        for queue in self.streams:
            queue.put_nowait(msg)

    async def start(self) -> None:
        """Serve, register with the controller and wait until the fleet calls the host READY."""
        transport = Transport(TlsFiles.in_folder(self.fleet.pki.folder("agent", self.name), "agent"))
        self.server = await start_server(
            "127.0.0.1:0",
            [(agent_pb2_grpc.add_AgentServiceServicer_to_server, self, "clonebox.agent.v1.AgentService")],
            transport,
        )
        self._channel = aio_channel(self.fleet.controller.address, transport, f"controller.{TRUST_DOMAIN}")
        self._session = asyncio.create_task(self._connect(self._channel, self.server.port))

        async def ready() -> bool:
            resp = await self.fleet.hosts.ListHosts(host_service_pb2.ListHostsRequest())
            return any(h.name == self.name and h.state == host_pb2.HOST_STATE_READY for h in resp.hosts)

        await eventually(ready, what=f"fake agent {self.name} READY")
        await eventually(self.streaming, what=f"the controller following {self.name}'s health")

    async def streaming(self) -> bool:
        return bool(self.streams)

    async def _connect(self, channel: grpc.aio.Channel, port: int) -> None:
        r = convert.resources_to_proto(Resources(8, 8192, 100_000))

        async def messages() -> AsyncIterator[host_service_pb2.ConnectRequest]:
            yield host_service_pb2.ConnectRequest(
                registration=host_service_pb2.Registration(
                    name=self.name,
                    address=f"127.0.0.1:{port}",
                    capacity=r,
                    allocatable=r,
                    hypervisor=convert.hypervisor_to_proto(HypervisorInfo(uri="fake:///health")),
                    revision=convert.revision_to_proto(Revision(1, 0)),
                )
            )
            while True:
                await asyncio.sleep(0.2)
                yield host_service_pb2.ConnectRequest(heartbeat=host_service_pb2.Heartbeat(serving=True))

        async for _ in host_service_pb2_grpc.HostServiceStub(channel).Connect(messages()):
            pass

    async def stop(self) -> None:
        """Go away as a crashed agent would: the session and the server end."""
        if self._session is not None:
            self._session.cancel()
            await asyncio.gather(self._session, return_exceptions=True)
        if self._channel is not None:
            await self._channel.close()
        if self.server is not None:
            await self.server.stop(0)


class Watch:
    """One WatchHealth call, read message by message."""

    def __init__(self, stub: hgrpc.HealthServiceStub, **request: Any) -> None:
        self.call = stub.WatchHealth(hpb.WatchHealthRequest(**request))

    async def next(self) -> hpb.WatchHealthResponse:
        msg = await asyncio.wait_for(self.call.read(), WAIT)
        assert msg is not grpc.aio.EOF
        return msg  # type: ignore[no-any-return]

    async def until_synced(self) -> list[hpb.WatchHealthResponse]:
        """Messages before ``synced`` (and the synced one last)."""
        out = [await self.next()]
        while not out[-1].synced:
            out.append(await self.next())
        return out

    async def error(self) -> CloneboxError:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            while True:
                await self.next()
        return error_from_rpc(info.value)


def state(msg: hpb.WatchHealthResponse) -> tuple[str, HealthState]:
    return msg.health.vm, convert_health.state_from_proto(msg.health.state)


async def agent(fleet: Fleet, *vms: VmHealth, name: str = "h1") -> FakeHealthAgent:
    fake = FakeHealthAgent(fleet, name, vms)  # type: ignore[abstract]  # serves only what these tests call
    await fake.start()
    return fake


async def stored_state(stub: hgrpc.HealthServiceStub, vm: str, want: HealthState) -> None:
    async def check() -> bool:
        try:
            resp = await stub.GetVmHealth(hpb.GetVmHealthRequest(name=vm))
        except grpc.aio.AioRpcError:
            return False  # not adopted yet
        return convert_health.state_from_proto(resp.health.state) is want

    await eventually(check, what=f"{vm} {want}")


@pytest.fixture
async def fakes() -> AsyncIterator[list[FakeHealthAgent]]:
    started: list[FakeHealthAgent] = []
    yield started
    for fake in started:
        await fake.stop()


async def test_snapshot_then_live_updates_reach_a_watcher(fleet: Fleet, fakes: list[FakeHealthAgent]) -> None:
    fake = await agent(fleet, vm_health("web-1", H.HEALTHY), vm_health("db-1", H.UNHEALTHY))
    fakes.append(fake)
    stub = hgrpc.HealthServiceStub(fleet.channel)
    await stored_state(stub, "web-1", H.HEALTHY)
    await stored_state(stub, "db-1", H.UNHEALTHY)

    watch = Watch(stub)
    first = await watch.until_synced()
    assert sorted(state(m) for m in first[:-1]) == [("db-1", H.UNHEALTHY), ("web-1", H.HEALTHY)]
    assert all(m.health.host == "h1" and not m.transitions for m in first[:-1])
    synced_seq = first[-1].seq
    assert synced_seq >= 2  # each VM's first report is a transition from unknown

    fake.push(vm_health("web-1", H.DEGRADED), change("web-1", H.HEALTHY, H.DEGRADED, "1 failure"))
    live = await watch.next()
    assert state(live) == ("web-1", H.DEGRADED) and not live.synced
    assert [(t.check, t.detail) for t in live.transitions] == [("web", "1 failure"), ("", "1 failure")]
    assert [t.seq for t in live.transitions] == [synced_seq + 1, synced_seq + 2] and live.seq == synced_seq + 2

    got = (await stub.GetVmHealth(hpb.GetVmHealthRequest(name="web-1"))).health
    assert convert_health.state_from_proto(got.state) is H.DEGRADED and got.checks[0].last.detail == "probe said so"
    listed = await stub.ListHealth(hpb.ListHealthRequest(states=[health_pb2.HEALTH_STATE_UNHEALTHY]))
    assert [h.vm for h in listed.health] == ["db-1"]
    everyone = await stub.ListHealth(hpb.ListHealthRequest())
    assert [h.vm for h in everyone.health] == ["db-1", "web-1"]
    watch.call.cancel()


async def test_resume_replays_exactly_the_missed_transitions(fleet: Fleet, fakes: list[FakeHealthAgent]) -> None:
    fake = await agent(fleet, vm_health("web-1", H.HEALTHY), vm_health("db-1", H.HEALTHY))
    fakes.append(fake)
    stub = hgrpc.HealthServiceStub(fleet.channel)
    await stored_state(stub, "db-1", H.HEALTHY)
    watch = Watch(stub, names=["web-1"])
    resume = (await watch.until_synced())[-1].seq
    watch.call.cancel()

    # missed while away: three changes of web-1, one of db-1 (not watched)
    fake.push(vm_health("web-1", H.DEGRADED), change("web-1", H.HEALTHY, H.DEGRADED))
    fake.push(vm_health("db-1", H.DEGRADED), change("db-1", H.HEALTHY, H.DEGRADED))
    fake.push(vm_health("web-1", H.UNHEALTHY), change("web-1", H.DEGRADED, H.UNHEALTHY))
    await stored_state(stub, "web-1", H.UNHEALTHY)

    again = Watch(stub, names=["web-1"], after_seq=resume)
    messages = await again.until_synced()
    replayed = [m for m in messages if not m.HasField("health") and not m.synced]
    assert [(t.vm, t.check, t.to_state) for m in replayed for t in m.transitions] == [
        ("web-1", "web", health_pb2.HEALTH_STATE_DEGRADED),
        ("web-1", "", health_pb2.HEALTH_STATE_DEGRADED),
        ("web-1", "web", health_pb2.HEALTH_STATE_UNHEALTHY),
        ("web-1", "", health_pb2.HEALTH_STATE_UNHEALTHY),
    ]
    seqs = [t.seq for m in replayed for t in m.transitions]
    assert seqs == sorted(seqs) and seqs[0] > resume
    assert [state(m) for m in messages if m.HasField("health")] == [("web-1", H.UNHEALTHY)]
    assert messages[-1].synced and messages[-1].seq == seqs[-1]
    # resuming from the end replays nothing
    tail = await Watch(stub, names=["web-1"], after_seq=seqs[-1]).until_synced()
    assert [m.HasField("health") for m in tail] == [True, False]
    again.call.cancel()


async def test_revision_expired_after_prune(fleet: Fleet, fakes: list[FakeHealthAgent]) -> None:
    fake = await agent(fleet, vm_health("web-1", H.HEALTHY))
    fakes.append(fake)
    stub = hgrpc.HealthServiceStub(fleet.channel)
    await stored_state(stub, "web-1", H.HEALTHY)
    old = (await Watch(stub).until_synced())[-1].seq
    fake.push(vm_health("web-1", H.DEGRADED), change("web-1", H.HEALTHY, H.DEGRADED))
    await stored_state(stub, "web-1", H.DEGRADED)
    removed, _, _ = await fleet.controller.health.prune(datetime.now(UTC) + timedelta(days=365))
    assert removed >= 2  # all but the newest transition

    err = await Watch(stub, after_seq=old).error()
    assert isinstance(err, FailedPrecondition) and err.reason == "REVISION_EXPIRED"
    # a seq this store never issued is no resume point either
    err = await Watch(stub, after_seq=10**9).error()
    assert err.reason == "REVISION_EXPIRED"
    # without after_seq the watch starts from the current health
    assert [state(m) for m in (await Watch(stub).until_synced())[:-1]] == [("web-1", H.DEGRADED)]


async def test_states_filter_matches_before_or_after(fleet: Fleet, fakes: list[FakeHealthAgent]) -> None:
    fake = await agent(fleet, vm_health("web-1", H.HEALTHY), vm_health("web-2", H.HEALTHY))
    fakes.append(fake)
    fake2 = await agent(fleet, vm_health("db-1", H.UNHEALTHY), name="h2")
    fakes.append(fake2)
    stub = hgrpc.HealthServiceStub(fleet.channel)
    for vm, want in (("web-1", H.HEALTHY), ("web-2", H.HEALTHY), ("db-1", H.UNHEALTHY)):
        await stored_state(stub, vm, want)

    watch = Watch(stub, states=[health_pb2.HEALTH_STATE_UNHEALTHY])
    assert [state(m) for m in (await watch.until_synced())[:-1]] == [("db-1", H.UNHEALTHY)]
    fake.push(vm_health("web-2", H.DEGRADED), change("web-2", H.HEALTHY, H.DEGRADED))  # never unhealthy: not sent
    fake.push(vm_health("web-1", H.UNHEALTHY), change("web-1", H.HEALTHY, H.UNHEALTHY))  # after matches
    fake.push(vm_health("web-1", H.HEALTHY), change("web-1", H.UNHEALTHY, H.HEALTHY))  # before matches
    assert state(await watch.next()) == ("web-1", H.UNHEALTHY)
    recovered = await watch.next()
    assert state(recovered) == ("web-1", H.HEALTHY)
    assert [t.from_state for t in recovered.transitions] == [health_pb2.HEALTH_STATE_UNHEALTHY] * 2
    fake2.push(vm_health("db-1", H.UNHEALTHY, host="h2"))  # still unhealthy: sent, and nothing of web-2 before it
    assert state(await watch.next()) == ("db-1", H.UNHEALTHY)
    watch.call.cancel()


async def test_agent_disconnect_makes_health_unknown_until_it_is_back(
    fleet: Fleet, fakes: list[FakeHealthAgent]
) -> None:
    fake = await agent(fleet, vm_health("web-1", H.HEALTHY), vm_health("web-2", H.DEGRADED))
    stub = hgrpc.HealthServiceStub(fleet.channel)
    await stored_state(stub, "web-2", H.DEGRADED)
    watch = Watch(stub)
    await watch.until_synced()

    await fake.stop()
    gone = [await watch.next(), await watch.next()]
    assert sorted(state(m) for m in gone) == [("web-1", H.UNKNOWN), ("web-2", H.UNKNOWN)]
    for m in gone:
        [t] = m.transitions
        assert (t.check, t.to_state, t.detail) == ("", health_pb2.HEALTH_STATE_UNKNOWN, "host unreachable")
        assert all(c.state == health_pb2.HEALTH_STATE_UNKNOWN for c in m.health.checks)
    got = (await stub.GetVmHealth(hpb.GetVmHealthRequest(name="web-1"))).health
    assert got.state == health_pb2.HEALTH_STATE_UNKNOWN
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.CheckHealth(hpb.CheckHealthRequest(name="web-1"))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE

    # back, without web-2: web-1 recovers (a transition), web-2 is removed
    back = await agent(fleet, vm_health("web-1", H.HEALTHY))
    fakes.append(back)
    returned = await watch.next()
    assert state(returned) == ("web-1", H.HEALTHY)
    [t] = returned.transitions
    assert (t.from_state, t.to_state) == (health_pb2.HEALTH_STATE_UNKNOWN, health_pb2.HEALTH_STATE_HEALTHY)
    removed = await watch.next()
    assert removed.removed and removed.health.vm == "web-2"
    watch.call.cancel()


async def test_check_health_is_forwarded_to_the_vms_agent(fleet: Fleet, fakes: list[FakeHealthAgent]) -> None:
    fake = await agent(fleet, vm_health("web-1", H.HEALTHY))
    fakes.append(fake)
    stub = hgrpc.HealthServiceStub(fleet.channel)
    await stored_state(stub, "web-1", H.HEALTHY)
    resp = await stub.CheckHealth(hpb.CheckHealthRequest(name="web-1", check="web"))
    assert [(r.check, r.detail) for r in resp.results] == [("web", "checked now")]
    assert resp.health.vm == "web-1" and resp.health.host == "h1"
    assert fake.checks == [("web-1", "web")]

    for call in (
        stub.CheckHealth(hpb.CheckHealthRequest(name="nope")),
        stub.GetVmHealth(hpb.GetVmHealthRequest(name="nope")),
        stub.GetHealthHistory(hpb.GetHealthHistoryRequest(name="nope")),
        stub.ListHealth(hpb.ListHealthRequest(names=["web-1", "nope"])),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        err = error_from_rpc(info.value)
        assert isinstance(err, NotFound) and err.reason == "VM_NOT_FOUND"
    err = await Watch(stub, names=["nope"]).error()
    assert isinstance(err, NotFound)

    # running probes is for operators; viewers read
    viewer = fleet.user_channel("viewer")
    try:
        vstub = hgrpc.HealthServiceStub(viewer)
        await vstub.GetVmHealth(hpb.GetVmHealthRequest(name="web-1"))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await vstub.CheckHealth(hpb.CheckHealthRequest(name="web-1"))
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await viewer.close()


async def test_history_returns_transitions_aggregates_and_actions(fleet: Fleet, fakes: list[FakeHealthAgent]) -> None:
    fake = await agent(fleet, vm_health("web-1", H.HEALTHY))
    fakes.append(fake)
    stub = hgrpc.HealthServiceStub(fleet.channel)
    await stored_state(stub, "web-1", H.HEALTHY)
    minute = now().replace(second=0) - timedelta(minutes=1)
    aggregate = Aggregate("web-1", "web", minute, passes=5, failures=1, duration_us_sum=6000, duration_us_max=1500)
    act = ActionRecord("web-1", "web", "on_failure", ActionKind.RESTART, "done", "restarted", now())
    fake.push(vm_health("web-1", H.UNHEALTHY), change("web-1", H.HEALTHY, H.UNHEALTHY), [aggregate], [act])
    fake.push(vm_health("web-1", H.UNHEALTHY), aggregates=[dataclasses.replace(aggregate, passes=6)])  # re-sent
    await stored_state(stub, "web-1", H.UNHEALTHY)

    async def complete() -> bool:
        h = await stub.GetHealthHistory(hpb.GetHealthHistoryRequest(name="web-1"))
        return bool(h.aggregates) and h.aggregates[0].passes == 6

    await eventually(complete, what="the re-sent aggregate")
    history = await stub.GetHealthHistory(hpb.GetHealthHistoryRequest(name="web-1"))
    assert [(t.check, t.to_state) for t in history.transitions] == [
        ("", health_pb2.HEALTH_STATE_HEALTHY),  # the first report
        ("web", health_pb2.HEALTH_STATE_UNHEALTHY),
        ("", health_pb2.HEALTH_STATE_UNHEALTHY),
    ]
    assert [(a.check, a.passes, a.failures) for a in history.aggregates] == [("web", 6, 1)]
    assert [(a.trigger, a.outcome, a.detail) for a in history.actions] == [("on_failure", "done", "restarted")]
    only_web = await stub.GetHealthHistory(hpb.GetHealthHistoryRequest(name="web-1", check="web", limit=1))
    assert [t.check for t in only_web.transitions] == ["web"]

    bad: list[tuple[Any, str]] = [
        (stub.GetHealthHistory(hpb.GetHealthHistoryRequest(name="web-1", limit=10_001)), "limit"),
        (stub.GetHealthHistory(hpb.GetHealthHistoryRequest(name="Web_1")), "name"),
        (stub.GetHealthHistory(hpb.GetHealthHistoryRequest(name="web-1", check="no good")), "check"),
        (stub.ListHealth(hpb.ListHealthRequest(names=["web-1", "-x"])), "names[1]"),
        (stub.ListHealth(hpb.ListHealthRequest(states=[health_pb2.HEALTH_STATE_UNSPECIFIED])), "states[0]"),
    ]
    future = hpb.GetHealthHistoryRequest(name="web-1")
    future.since.FromDatetime(datetime.now(UTC) + timedelta(days=1))
    bad.append((stub.GetHealthHistory(future), "since"))
    for call, field in bad:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_from_rpc(info.value).metadata.get("field") == field


async def test_a_watcher_that_falls_behind_ends_alone(fleet: Fleet, fakes: list[FakeHealthAgent]) -> None:
    fake = await agent(fleet, vm_health("web-1", H.HEALTHY))
    fakes.append(fake)
    stub = hgrpc.HealthServiceStub(fleet.channel)
    await stored_state(stub, "web-1", H.HEALTHY)
    hub = fleet.controller.health
    default = hub.settings
    hub.settings = dataclasses.replace(default, watch_queue=3)
    # the servicer iterates exactly this generator; in-process, "not reading" is deterministic
    slow = hub.watch()
    while not (await anext(slow)).synced:
        pass
    hub.settings = default  # the next watcher has room for everything
    fast = Watch(stub)
    await fast.until_synced()

    states = [H.DEGRADED, H.HEALTHY] * 4
    before = H.HEALTHY
    for s in states:
        fake.push(vm_health("web-1", s), change("web-1", before, s))
        before = s
    seen = [state(await fast.next())[1] for _ in states]
    assert seen == states
    with pytest.raises(FailedPrecondition) as info:
        while True:
            await anext(slow)
    assert info.value.reason == "WATCH_OVERFLOW"
    # the fast watcher and the agent stream go on
    fake.push(vm_health("web-1", H.UNHEALTHY), change("web-1", before, H.UNHEALTHY))
    assert state(await fast.next()) == ("web-1", H.UNHEALTHY)
    fast.call.cancel()


async def test_an_update_that_cannot_be_stored_is_skipped(fleet: Fleet, fakes: list[FakeHealthAgent]) -> None:
    fake = await agent(fleet, vm_health("web-1", H.HEALTHY))
    fakes.append(fake)
    stub = hgrpc.HealthServiceStub(fleet.channel)
    await stored_state(stub, "web-1", H.HEALTHY)
    watch = Watch(stub)
    await watch.until_synced()
    fake.push(vm_health("Not_A_Name", H.UNHEALTHY))
    bad_check = dataclasses.replace(change("web-1", H.HEALTHY, H.DEGRADED)[0], check="x" * 64)
    fake.push(vm_health("web-1", H.DEGRADED), [bad_check])
    fake.push(vm_health("web-1", H.UNHEALTHY), change("web-1", H.HEALTHY, H.UNHEALTHY))
    assert state(await watch.next()) == ("web-1", H.UNHEALTHY)  # the stream went on past both
    watch.call.cancel()


async def test_follows_the_real_agents_health_stream(fleet: Fleet) -> None:
    # the real clonebox-agent (FakeHypervisor) rather than the fake above: the wire contract end to end
    await fleet.add_agent("h1", Resources(4, 4096, 100_000))
    await create(fleet, spec("web-1"))
    stub = hgrpc.HealthServiceStub(fleet.channel)

    async def reported() -> bool:
        got = (await stub.GetVmHealth(hpb.GetVmHealthRequest(name="web-1"))).health
        return got.host == "h1" and len(got.checks) > 0

    await eventually(reported, what="the agent's report of web-1")
    snapshot = await Watch(stub, names=["web-1"]).until_synced()
    assert [m.health.vm for m in snapshot if m.HasField("health")] == ["web-1"]
