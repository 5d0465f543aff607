"""The agent's health probe runner on the fake hypervisor: schedule, states, transitions, actions, watch.

Time is a manual clock (``conftest.ManualClock``) and runs happen when a test ticks it, so nothing here
depends on how fast the machine is.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest

from clonebox_agent.app.health import HealthMonitor, HealthSettings, HealthUpdate
from clonebox_agent.ports import Capability, GuestExecResult
from clonebox_core import errors
from clonebox_core.health import (
    Action,
    ActionKind,
    FileProbe,
    HealthState,
    HttpProbe,
    Probe,
    ProbeType,
    Sample,
)
from clonebox_core.model import VmState

H = HealthState


class Collector:
    """Consumes one watch in the background; ``settle()`` lets it catch up."""

    def __init__(self, mon: HealthMonitor) -> None:
        self.updates: list[HealthUpdate] = []
        self.error: BaseException | None = None
        self.task = asyncio.create_task(self._run(mon))

    async def _run(self, mon: HealthMonitor) -> None:
        try:
            async for u in mon.watch():
                self.updates.append(u)
        except Exception as exc:
            self.error = exc

    @staticmethod
    async def settle() -> None:
        for _ in range(20):
            await asyncio.sleep(0)

    def transitions(self, check: str | None = None) -> list[tuple[str, H, H]]:
        return [
            (t.check, t.from_state, t.to_state)
            for u in self.updates
            for t in u.transitions
            if check is None or t.check == check
        ]

    def actions(self) -> list[tuple[str, str, str]]:
        return [(a.trigger, a.kind.value, a.outcome) for u in self.updates for a in u.actions]

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


@pytest.fixture
async def watch(env: Any) -> AsyncIterator[Collector]:
    c = Collector(env.mon)
    await c.settle()
    yield c
    await c.close()


class Web:
    """A tiny HTTP server on 127.0.0.1 whose answer the test sets."""

    def __init__(self) -> None:
        self.status = 200
        self.body = b"all ok"
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            self.requests.append(await reader.readuntil(b"\r\n\r\n"))
            writer.write(b"HTTP/1.0 %d X\r\nContent-Type: text/plain\r\n\r\n" % self.status + self.body)
            await writer.drain()
        finally:
            writer.close()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


@pytest.fixture
async def web() -> AsyncIterator[Web]:
    w = Web()
    await w.start()
    yield w
    if w.server is not None and w.server.is_serving():
        await w.stop()


def http(port: int, **kw: Any) -> Probe:
    return Probe(
        "web", ProbeType.HTTP, interval_ms=1000, timeout_ms=900, http=HttpProbe(port=port, path="/healthz", **kw)
    )


def ga(**kw: Any) -> Probe:
    return Probe("ga", ProbeType.GUEST_AGENT, **{"interval_ms": 1000, "timeout_ms": 500, **kw})


def state(env: Any, vm: str = "web", check: str | None = None) -> H:
    health = env.mon.health(vm)
    if check is None:
        return health.state  # type: ignore[no-any-return]
    return next(c.state for c in health.checks if c.name == check)  # type: ignore[no-any-return]


def last(env: Any, vm: str = "web", check: str = "web") -> Any:
    return next(c.last for c in env.mon.health(vm).checks if c.name == check)


# ---------------------------------------------------------------------------------- http end to end


async def test_http_probe_turns_healthy_then_unhealthy_at_threshold_then_healthy(
    env: Any, web: Web, watch: Collector
) -> None:
    env.fake.probe_addresses["web"] = ("127.0.0.1",)
    await env.create("web", http(web.port))
    assert await env.tick(0) == 1
    assert state(env, check="web") is H.HEALTHY and last(env).sample is Sample.PASS
    req = web.requests[-1].decode()
    assert req.startswith("GET /healthz HTTP/1.0\r\n") and f"Host: 127.0.0.1:{web.port}\r\n" in req
    assert "Connection: close\r\n" in req

    await web.stop()
    seen = []
    for _ in range(3):
        await env.tick(1)
        seen.append((last(env).sample, state(env, check="web")))
    assert seen == [(Sample.FAIL, H.DEGRADED), (Sample.FAIL, H.DEGRADED), (Sample.FAIL, H.UNHEALTHY)]
    assert "connection refused" in last(env).detail

    await web.start()  # the same port again
    await env.tick(1)
    assert state(env, check="web") is H.HEALTHY and state(env) is H.HEALTHY
    await watch.settle()
    assert watch.transitions("web") == [
        ("web", H.UNKNOWN, H.HEALTHY),
        ("web", H.HEALTHY, H.DEGRADED),
        ("web", H.DEGRADED, H.UNHEALTHY),
        ("web", H.UNHEALTHY, H.HEALTHY),
    ]
    # the VM's own state follows (critical check): one transition per change
    assert watch.transitions("") == [
        ("", H.UNKNOWN, H.HEALTHY),
        ("", H.HEALTHY, H.DEGRADED),
        ("", H.DEGRADED, H.UNHEALTHY),
        ("", H.UNHEALTHY, H.HEALTHY),
    ]


async def test_http_expect_status_and_body_regex_mismatch_fail(env: Any, web: Web) -> None:
    env.fake.probe_addresses["web"] = ("127.0.0.1",)
    await env.create("web", http(web.port, body_regex="^all ok$"))
    await env.tick(0)
    assert last(env).sample is Sample.PASS
    web.body = b"degraded"
    await env.tick(1)
    assert last(env).sample is Sample.FAIL and "body does not match" in last(env).detail
    web.status, web.body = 503, b"all ok"
    await env.tick(1)
    assert last(env).sample is Sample.FAIL and last(env).detail.endswith("status 503, expected 200")


async def test_http_without_address_fails(env: Any) -> None:
    await env.create("web", http(80))
    await env.tick(0)
    assert last(env).detail == "no address on an up libvirt bridge"


# --------------------------------------------------------------------------------------- schedule


async def test_first_run_after_initial_delay_plus_phase_then_fixed_grid_skipping_missed_ticks(env_factory: Any) -> None:
    e = await env_factory(rng=random.Random(7))
    t0 = e.clock.t
    await e.create("web", ga(initial_delay_ms=2000))
    first = e.mon.next_due()
    assert first is not None and t0 + 2.0 <= first < t0 + 3.0
    e.clock.t = first - 0.001
    assert await e.mon.run_due() == 0
    e.clock.t = first
    assert await e.mon.run_due() == 1
    assert e.mon.next_due() == pytest.approx(first + 1.0)
    e.clock.t = first + 3.5  # the loop was busy: three ticks missed
    assert await e.mon.run_due() == 1  # one run, not a burst of three
    assert e.mon.next_due() == pytest.approx(first + 4.0)  # still on the grid: no drift


async def test_timeout_fails_with_its_duration(env_factory: Any) -> None:
    from clonebox_agent.adapters.fake import FakeHypervisor

    e = await env_factory(fake=FakeHypervisor(host_name="h", delays={"guest_ping": 30}))
    await e.create("web", ga(timeout_ms=500))
    await e.tick(0)
    assert last(e, check="ga").detail == "timed out after 500ms"


# --------------------------------------------------------------------------- lifecycle of the VMs


async def test_stopped_vm_is_unknown_not_running_and_its_stop_is_a_transition(env: Any, watch: Collector) -> None:
    await env.create("web", ga())
    await env.create("idle", ga(), start=False)
    assert state(env, "idle", "ga") is H.UNKNOWN and last(env, "idle", "ga").detail == "vm not running"
    await env.tick(0)
    assert state(env, check="ga") is H.HEALTHY
    assert env.fake.calls["guest_ping"] == 1  # the stopped VM was not probed

    await env.svc.stop("web", request_id="", force=True)
    await env.mon.refresh()
    assert state(env, check="ga") is H.UNKNOWN and last(env, check="ga").detail == "vm not running"
    await env.tick(5)
    assert env.fake.calls["guest_ping"] == 1
    await watch.settle()
    assert watch.transitions("ga")[-1] == ("ga", H.HEALTHY, H.UNKNOWN)
    assert [t for u in watch.updates for t in u.transitions if t.check == "ga"][-1].detail == "vm not running"


async def test_a_new_vm_is_announced_in_one_update_running_or_not(env: Any, watch: Collector) -> None:
    await watch.settle()
    before = len(watch.updates)
    await env.create("web", ga())
    await env.create("idle", ga(), start=False)
    await watch.settle()
    news = [u for u in watch.updates[before:] if u.health is not None]
    # one update per VM: the controller stores each, so a second one for the same news costs a write
    assert sorted(u.health.vm for u in news if u.health) == ["idle", "web"]


async def test_implicit_guest_agent_check_only_without_checks_and_with_qemu_ga(env_factory: Any) -> None:
    from clonebox_agent.adapters.common import QEMU_CAPABILITIES
    from clonebox_agent.adapters.fake import FakeHypervisor

    e = await env_factory()
    await e.create("web")
    (check,) = e.mon.health("web").checks
    assert (check.name, check.type, check.implicit, check.critical) == (
        "guest-agent",
        ProbeType.GUEST_AGENT,
        True,
        False,
    )
    await e.tick(0)
    assert state(e, check="guest-agent") is H.HEALTHY
    await e.create("own", ga())
    assert [(c.name, c.implicit) for c in e.mon.health("own").checks] == [("ga", False)]

    no_ga = await env_factory(
        fake=FakeHypervisor(host_name="h", capabilities=QEMU_CAPABILITIES - {Capability.GUEST_AGENT})
    )
    await no_ga.create("web")
    assert no_ga.mon.health("web").checks == ()


async def test_follows_lifecycle_events_without_refresh(env_factory: Any) -> None:
    e = await env_factory(follow=True)
    await e.mon.synced()
    await e.svc.create(e.spec("web", ga()), request_id="")

    async def until(cond: Any) -> None:
        for _ in range(500):
            if cond():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the monitor did not follow")

    await until(lambda: "web" in e.mon.vms() and e.mon._vms["web"].running)
    await e.svc.stop("web", request_id="", force=True)
    await until(lambda: not e.mon._vms["web"].running)
    await e.svc.delete("web", request_id="")
    await until(lambda: "web" not in e.mon.vms())


# --------------------------------------------------------------------------------------- aggregates


async def test_minute_aggregates_close_once_when_the_minute_rolls_over(env: Any, watch: Collector) -> None:
    await env.create("web", Probe("ga", ProbeType.GUEST_AGENT, interval_ms=20_000))
    await env.tick(0)  # 12:00:00
    await env.tick(20)  # 12:00:20
    env.fake.guest_agent_down.add("web")
    await env.tick(20)  # 12:00:40
    await env.tick(20)  # 12:01:00: closes 12:00
    await env.tick(10)
    await env.svc.stop("web", request_id="", force=True)
    await env.mon.refresh()
    await env.tick(60)  # 12:02:10, nothing runs: the sweep closes 12:01
    await env.tick(60)
    await watch.settle()
    aggs = [a for u in watch.updates for a in u.aggregates]
    assert [(a.minute.minute, a.passes, a.failures, a.runs) for a in aggs] == [(0, 2, 1, 3), (1, 0, 1, 1)]
    # closed minutes travel in batches of their own, never with a VM's health
    assert all(u.health is None for u in watch.updates if u.aggregates)


async def test_closed_minutes_of_many_vms_are_one_update(env: Any, watch: Collector) -> None:
    for n in range(20):
        await env.create(f"vm{n}", ga(), Probe("ga2", ProbeType.GUEST_AGENT, interval_ms=1000, timeout_ms=500))
    await env.tick(0)  # 12:00:00, every check runs once
    await watch.settle()
    before = len(watch.updates)
    await env.tick(60)  # 12:01:00: 40 minutes close at once ...
    await env.tick(1)  # ... and go out with the next batch (at most one a second)
    await watch.settle()
    batches = [u for u in watch.updates[before:] if u.aggregates]
    assert len(batches) == 1 and len(batches[0].aggregates) == 40, [len(u.aggregates) for u in batches]
    assert {a.vm for a in batches[0].aggregates} == {f"vm{n}" for n in range(20)}


# ------------------------------------------------------------------------------------------ actions


def failing(**kw: Any) -> Probe:
    return ga(failure_threshold=2, on_failure=Action(ActionKind.RESTART), **kw)


async def fail_until_unhealthy(e: Any) -> None:
    """Pass once (that arms on_failure: a VM still booting is not restarted), then fail until unhealthy."""
    e.fake.guest_agent_down.discard("web")
    await e.tick(0)
    e.fake.guest_agent_down.add("web")
    await e.tick(1)
    await e.tick(1)
    assert state(e, check="ga") is H.UNHEALTHY
    await e.mon.wait_actions()


async def test_failures_before_the_first_pass_since_start_fire_no_action(env_factory: Any) -> None:
    e = await env_factory(settings=HealthSettings(restart_backoff_seconds=0))
    c = Collector(e.mon)
    await c.settle()
    await e.create("web", failing())
    e.fake.guest_agent_down.add("web")
    for _ in range(5):
        await e.tick(1)
    await e.mon.wait_actions()
    assert state(e, check="ga") is H.UNHEALTHY  # reported as it is ...
    assert e.fake.calls["destroy"] == 0  # ... but a VM that never came up is not restarted in a loop
    await c.settle()
    assert c.actions() == []
    await c.close()


async def test_restart_action_goes_through_the_service_is_audited_and_capped(env_factory: Any) -> None:
    e = await env_factory(settings=HealthSettings(restart_backoff_seconds=0, max_restarts=2))
    c = Collector(e.mon)
    await c.settle()
    await e.create("web", failing())
    e.fake.guest_agent_down.add("web")
    for _ in range(500):  # the create's own events (defined, started) reach the history first
        if e.svc.events.revision.sequence >= 2:
            break
        await asyncio.sleep(0.01)
    before = e.svc.events.revision
    await fail_until_unhealthy(e)
    assert (e.fake.calls["destroy"], e.fake.calls["start"]) == (1, 1)
    # the trackers started over: UNKNOWN, scheduled again after initial_delay
    assert state(e, check="ga") is H.UNKNOWN and e.mon._vms["web"].running

    kinds = []
    async for ev in e.svc.watch(before):
        kinds.append((ev.vm.state, ev.reason))
        if len(kinds) == 2:
            break
    assert kinds == [(VmState.STOPPED, "destroyed"), (VmState.RUNNING, "booted")]

    await fail_until_unhealthy(e)
    await fail_until_unhealthy(e)
    assert e.fake.calls["destroy"] == 2  # the third was held back
    await c.settle()
    assert c.actions() == [
        ("on_failure", "restart", "done"),
        ("on_failure", "restart", "done"),
        ("on_failure", "restart", "suppressed"),
    ]
    suppressed = [a for u in c.updates for a in u.actions][-1]
    assert "health_max_restarts 2" in suppressed.detail

    events = [ev for ev in e.journal.pending_events(1000) if ev.action == "vm.health_action"]
    assert [
        (ev.details["check"], ev.details["trigger"], ev.details["kind"], ev.details["outcome"]) for ev in events
    ] == [
        ("ga", "on_failure", "restart", "done"),
        ("ga", "on_failure", "restart", "done"),
        ("ga", "on_failure", "restart", "suppressed"),
    ]
    assert {ev.resource for ev in events} == {"hosts/h/vms/web"} and {ev.actor for ev in events} == {"system"}
    assert [ev.outcome.value for ev in events] == ["succeeded", "succeeded", "rejected"]
    stops = [ev for ev in e.journal.pending_events(1000) if ev.action == "vm.stop"]
    assert len(stops) == 2 and {ev.actor for ev in stops} == {"system"}
    await c.close()


async def test_restart_back_off_doubles_within_the_window(env_factory: Any) -> None:
    e = await env_factory(settings=HealthSettings(restart_backoff_seconds=10, max_restarts=3))
    await e.create("web", failing())
    e.fake.guest_agent_down.add("web")
    for _ in range(3):
        await fail_until_unhealthy(e)
    assert e.fake.calls["destroy"] == 3
    # simulated waits: 10s after the first restart (less the 2s the check took), then 20s
    assert e.clock.sleeps == [pytest.approx(8.0), pytest.approx(18.0)]


async def test_restart_window_expires(env_factory: Any) -> None:
    e = await env_factory(settings=HealthSettings(restart_backoff_seconds=0, max_restarts=1, restart_window_seconds=60))
    await e.create("web", failing())
    e.fake.guest_agent_down.add("web")
    await fail_until_unhealthy(e)
    await fail_until_unhealthy(e)
    assert e.fake.calls["destroy"] == 1
    e.clock.t += 61
    # still unhealthy when the window has room again: the held-back restart is tried at the next failure
    await e.tick(1)
    await e.mon.wait_actions()
    assert e.fake.calls["destroy"] == 2


async def test_close_lets_a_restart_under_way_finish(env_factory: Any) -> None:
    from clonebox_agent.adapters.fake import FakeHypervisor

    fake = FakeHypervisor(host_name="h", delays={"start": 0.2})
    e = await env_factory(fake=fake)
    await e.create("web", failing())
    fake.guest_agent_down.add("web")
    await e.tick(0)
    await e.tick(1)
    for _ in range(500):  # the restart has destroyed the VM and is starting it
        if fake.calls["start"]:
            break
        await asyncio.sleep(0.01)
    await e.mon.close()
    assert (await e.svc.get("web")).state is VmState.RUNNING


async def test_command_actions_on_failure_and_on_recovery(env: Any, watch: Collector) -> None:
    probe = Probe(
        "ready",
        ProbeType.FILE,
        failure_threshold=1,
        file=FileProbe("/run/ready"),
        on_failure=Action(ActionKind.COMMAND, ("systemctl", "restart", "app")),
        on_recovery=Action(ActionKind.COMMAND, ("logger", "recovered")),
    )
    await env.create("web", probe)
    env.fake.guest_exec_handler = lambda vm, argv, stdin: GuestExecResult(0 if argv[0] == "systemctl" else 1)
    await env.tick(0)
    await env.mon.wait_actions()
    env.fake.guest_files["web"] = {"/run/ready"}
    await env.tick(10)
    await env.mon.wait_actions()
    assert [argv for _, argv, _ in env.fake.guest_execs] == [("systemctl", "restart", "app"), ("logger", "recovered")]
    await watch.settle()
    assert watch.actions() == [("on_failure", "command", "done"), ("on_recovery", "command", "failed")]
    assert [a for u in watch.updates for a in u.actions][-1].detail == "logger exited 1"


async def test_degraded_blip_does_not_fire_recovery(env: Any) -> None:
    probe = ga(on_recovery=Action(ActionKind.COMMAND, ("true",)))
    await env.create("web", probe)
    await env.tick(0)
    env.fake.guest_agent_down.add("web")
    await env.tick(1)
    assert state(env, check="ga") is H.DEGRADED
    env.fake.guest_agent_down.clear()
    await env.tick(1)
    await env.mon.wait_actions()
    assert state(env, check="ga") is H.HEALTHY and env.fake.guest_execs == []


# -------------------------------------------------------------------------------------------- watch


async def test_watch_snapshot_synced_then_live_and_removed(env: Any) -> None:
    await env.create("b", ga())
    await env.create("a", ga())
    stream = env.mon.watch()
    first = [await anext(stream) for _ in range(3)]
    assert [u.health.vm if u.health else None for u in first] == ["a", "b", None]
    assert first[2].synced and not first[0].transitions
    await env.tick(0)
    live = await anext(stream)
    assert live.health is not None and live.health.state is H.HEALTHY
    assert [(t.check, t.to_state) for t in live.transitions] == [("ga", H.HEALTHY), ("", H.HEALTHY)]
    await anext(stream)  # the other VM's
    await env.svc.delete("a", request_id="")
    await env.mon.refresh()
    gone = await anext(stream)
    assert gone.removed and gone.health is not None and gone.health.vm == "a"
    await stream.aclose()


async def test_slow_watcher_overflow_ends_only_that_watch(env_factory: Any) -> None:
    e = await env_factory(settings=HealthSettings(watch_queue=6))
    slow = e.mon.watch()
    assert (await anext(slow)).synced
    fast = Collector(e.mon)
    await fast.settle()
    for i in range(4):
        await e.create(f"vm{i}", ga())
        await fast.settle()
    await e.tick(0)
    with pytest.raises(errors.FailedPrecondition) as err:
        await anext(slow)
    assert err.value.reason == "HEALTH_WATCH_OVERFLOW"
    await fast.settle()
    assert fast.error is None and {u.health.vm for u in fast.updates if u.health} == {f"vm{i}" for i in range(4)}
    assert all(state(e, f"vm{i}") is H.HEALTHY for i in range(4))  # probing went on
    await fast.close()


async def test_close_ends_watches(env: Any) -> None:
    stream = env.mon.watch()
    assert (await anext(stream)).synced
    await env.mon.close()
    with pytest.raises(StopAsyncIteration):
        await anext(stream)


# ---------------------------------------------------------------------------------------- check_now


async def test_check_now_runs_without_feeding_the_trackers(env: Any) -> None:
    await env.create("web", ga(), Probe("ready", ProbeType.FILE, file=FileProbe("/x")))
    results, health = await env.mon.check_now("web")
    assert [(r.check, r.sample) for r in results] == [("ga", Sample.PASS), ("ready", Sample.FAIL)]
    assert all(c.state is H.UNKNOWN and c.consecutive_successes == 0 for c in health.checks)
    (only,), _ = await env.mon.check_now("web", "ready")
    assert only.detail == "no such file: /x"
    with pytest.raises(errors.NotFound) as err:
        await env.mon.check_now("web", "nope")
    assert err.value.reason == "CHECK_NOT_FOUND" and "nope" in err.value.message
    with pytest.raises(errors.NotFound) as err:
        await env.mon.check_now("ghost")
    assert err.value.reason == "VM_NOT_FOUND"
    await env.create("off", ga(), start=False)
    (r,), _ = await env.mon.check_now("off")
    assert (r.sample, r.detail) == (Sample.NO_DATA, "vm not running")
