"""The agent's health probe runner: one :class:`HealthMonitor` per agent probes every owned VM.

For each VM it runs the checks of its spec (``spec.health_checks``; with none, and qemu-ga available,
an implicit non-critical ``guest-agent`` check), only while the VM runs. It follows the VM lifecycle
from the service's event history (re-listing periodically, so an adapter without events or a missed
event cannot leave the schedule stale), turns samples into states with core ``ProbeTracker``s, emits
transitions, per-minute aggregates and action records, and runs ``on_failure`` / ``on_recovery`` actions
(restarts with back-off and a cap per window). ``watch()`` streams all of it; ``check_now()`` runs
checks once without counting them.

Scheduling: each check's first run is at ``initial_delay`` plus a random phase in ``[0, interval)`` (so
that a host's probes do not all fire together), then on a fixed grid of ``interval`` (no drift; a tick
missed because the loop was busy or the previous run still runs is skipped, never made up in a burst).
Runs share one ``asyncio.Semaphore`` (``probe_concurrency``) and are each bounded by their timeout.

The clock is injectable: tests drive time with a manual clock and :meth:`HealthMonitor.run_due`
instead of the background loop (``start(autorun=False)``), so nothing depends on wall-clock speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import heapq
import logging
import math
import random
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from clonebox_agent.app.events import VmEventType
from clonebox_agent.app.probes import (
    CpuMeter,
    Finding,
    ProbeFailure,
    ScriptRunner,
    StatsSampler,
    command_probe,
    file_probe,
    guest_agent_probe,
    http_probe,
    resource_probe,
    tcp_probe,
)
from clonebox_agent.app.service import AgentService
from clonebox_agent.ports import Capability, Hypervisor
from clonebox_core.audit.event import SYSTEM_ACTOR
from clonebox_core.errors import CloneboxError, FailedPrecondition, NotFound, Unavailable
from clonebox_core.health import (
    Action,
    ActionKind,
    ActionRecord,
    Aggregate,
    CheckStatus,
    HealthState,
    HttpProbe,
    Probe,
    ProbeResult,
    ProbeTracker,
    ProbeType,
    Sample,
    Transition,
    VmHealth,
    overall_state,
)
from clonebox_core.model import Vm, VmSpec, VmState

log = logging.getLogger(__name__)

#: the check added to a VM whose spec has none, when its guest agent channel exists
IMPLICIT_GUEST_AGENT = Probe(
    name="guest-agent",
    type=ProbeType.GUEST_AGENT,
    interval_ms=10_000,
    timeout_ms=2_000,
    failure_threshold=3,
    critical=False,
)
NOT_RUNNING = "vm not running"
#: timeout of an on_failure / on_recovery command inside the guest
ACTION_COMMAND_TIMEOUT = 30.0
#: how long close() waits for restarts under way
_CLOSE_WAIT = 30.0
#: the background loop wakes at least this often (closes minute aggregates, notices schedule changes)
_MAX_SLEEP = 5.0
#: how often finished minutes of checks that ran no more are looked for (a scan of every check)
_CLOSE_MINUTES_EVERY = 1.0
#: closed minutes per update (a batch of 1000 is ~80 KiB on the wire)
_AGGREGATES_PER_UPDATE = 1000


class Clock(Protocol):
    """Time as the monitor sees it (injectable for tests)."""

    def monotonic(self) -> float:
        """Seconds on a monotonic clock (schedules, back-off, statistics)."""
        ...

    def now(self) -> datetime:
        """Wall-clock time, UTC (result times, minute aggregates)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds``."""
        ...


class SystemClock:
    """The real clock."""

    def monotonic(self) -> float:
        """``time.monotonic()``."""
        return time.monotonic()

    def now(self) -> datetime:
        """``datetime.now(UTC)``."""
        return datetime.now(UTC)

    async def sleep(self, seconds: float) -> None:
        """``asyncio.sleep``."""
        await asyncio.sleep(seconds)


@dataclass(frozen=True)
class HealthSettings:
    """The monitor's knobs (from the agent config)."""

    probe_concurrency: int = 64
    restart_backoff_seconds: float = 10.0
    max_restarts: int = 3
    restart_window_seconds: float = 600.0
    #: the VM list is read again this often even when lifecycle events flow
    resync_seconds: float = 60.0
    #: updates a watcher may fall behind by before its stream ends (it then re-syncs); a host's VMs
    #: starting together send one update each
    watch_queue: int = 10_000


@dataclass(frozen=True)
class HealthUpdate:
    """One message of :meth:`HealthMonitor.watch`.

    The snapshot has one update per VM (``health`` only), then one with ``synced``; later updates carry
    the VM's current health with the transitions and actions since the last update of that VM, or
    ``removed`` when the VM left; closed minute aggregates of any VMs travel in batches of their own
    (``health`` None), at most once a second.
    """

    health: VmHealth | None = None
    transitions: tuple[Transition, ...] = ()
    aggregates: tuple[Aggregate, ...] = ()
    actions: tuple[ActionRecord, ...] = ()
    removed: bool = False
    synced: bool = False


def _minute(t: datetime) -> datetime:
    return t.replace(second=0, microsecond=0)


@dataclass
class _Minute:
    """The open minute aggregate of one check."""

    minute: datetime
    passes: int = 0
    warnings: int = 0
    failures: int = 0
    no_data: int = 0
    duration_us_sum: int = 0
    duration_us_max: int = 0

    def add(self, r: ProbeResult) -> None:
        if r.sample is Sample.PASS:
            self.passes += 1
        elif r.sample is Sample.WARN:
            self.warnings += 1
        elif r.sample is Sample.FAIL:
            self.failures += 1
        else:
            self.no_data += 1
        self.duration_us_sum += r.duration_us
        self.duration_us_max = max(self.duration_us_max, r.duration_us)

    def close(self, vm: str, check: str) -> Aggregate:
        return Aggregate(
            vm,
            check,
            self.minute,
            self.passes,
            self.warnings,
            self.failures,
            self.no_data,
            self.duration_us_sum,
            self.duration_us_max,
        )


@dataclass
class _Check:
    probe: Probe
    implicit: bool
    tracker: ProbeTracker
    last: ProbeResult | None = None
    since: datetime | None = None
    #: monotonic time of the next planned run (None: not scheduled)
    next_due: float | None = None
    task: asyncio.Task[None] | None = None
    minute: _Minute | None = None
    #: reached UNHEALTHY since it was last HEALTHY (on_recovery fires only then)
    was_unhealthy: bool = False
    #: passed at least once since the VM (re)started: only then does an on_failure restart fire (a VM
    #: that is still booting fails its checks; restarting it then would loop, as a liveness probe
    #: without a startup probe does in Kubernetes)
    armed: bool = False
    #: its restart was held back by the cap: tried again at a later failure once the window has room
    restart_held: bool = False

    def status(self) -> CheckStatus:
        return CheckStatus(
            name=self.probe.name,
            type=self.probe.type,
            state=self.tracker.state,
            critical=self.probe.critical,
            consecutive_failures=self.tracker.failures,
            consecutive_successes=self.tracker.successes,
            last=self.last,
            since=self.since,
            implicit=self.implicit,
        )


@dataclass
class _Vm:
    name: str
    probes: tuple[tuple[Probe, bool], ...]
    checks: dict[str, _Check]
    running: bool = False
    state: HealthState = HealthState.UNKNOWN
    since: datetime | None = None
    updated: datetime | None = None
    #: bumped on every stop, start and restart: results of runs started before are dropped
    generation: int = 0
    #: monotonic times of the restarts in the current window
    restarts: deque[float] = field(default_factory=deque)
    restarting: bool = False


class _End(enum.Enum):
    CLOSED = "closed"
    OVERFLOW = "overflow"


@dataclass(eq=False)
class _Watcher:
    queue: asyncio.Queue[HealthUpdate | None]
    end: _End | None = None


class HealthMonitor:
    """Probes every VM the agent owns; see the module docstring."""

    def __init__(
        self,
        service: AgentService,
        hypervisor: Hypervisor,
        *,
        settings: HealthSettings | None = None,
        scripts: ScriptRunner | None = None,
        clock: Clock | None = None,
        rng: random.Random | None = None,
    ) -> None:
        """``scripts`` runs script probes (None: the agent has no probe_scripts_dir and refuses them)."""
        self._svc = service
        self._hv = hypervisor
        self.host = service.host_name
        self.settings = settings or HealthSettings()
        self._scripts = scripts
        self._clock: Clock = clock or SystemClock()
        self._rng = rng or random.Random()
        self._sem = asyncio.Semaphore(self.settings.probe_concurrency)
        self.sampler = StatsSampler(hypervisor.domain_stats, self._clock.monotonic)
        self._cpu = CpuMeter()
        self._vms: dict[str, _Vm] = {}
        self._watchers: set[_Watcher] = set()
        self._wake = asyncio.Event()
        #: planned runs (due, tie-breaker, vm, check); entries go stale instead of being removed
        self._due: list[tuple[float, int, _Vm, _Check]] = []
        self._planned = 0
        self._minutes_closed_at = -math.inf
        #: minute aggregates closed since the last batch was sent
        self._closed: list[Aggregate] = []
        #: interval (ms) -> how many resource probes have it: the sampler's cache age follows the shortest
        self._resource_intervals: Counter[int] = Counter()
        self._tasks: set[asyncio.Task[None]] = set()
        #: restarts past their point of no return (see _restart)
        self._critical: set[asyncio.Task[str]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._follow_task: asyncio.Task[None] | None = None
        self._synced = asyncio.Event()

    # ---- lifecycle -----------------------------------------------------------------------------

    async def start(self, *, autorun: bool = True, follow: bool = True) -> None:
        """Start following the VM lifecycle and running the schedule in the background.

        Tests turn either off: without ``follow`` they call :meth:`refresh` after lifecycle changes, without
        ``autorun`` they call :meth:`run_due` after moving their clock.
        """
        if follow:
            self._follow_task = asyncio.create_task(self._follow(), name="health-follow")
        if autorun:
            self._loop_task = asyncio.create_task(self._run_forever(), name="health-probes")

    async def close(self) -> None:
        """Stop probing and actions (a restart already under way finishes, bounded), and end every watch."""
        for task in (self._loop_task, self._follow_task, *self._tasks):
            if task is not None:
                task.cancel()
        for task in (self._loop_task, self._follow_task, *self._tasks):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._critical:
            await asyncio.wait(set(self._critical), timeout=_CLOSE_WAIT)
        for vm in self._vms.values():
            for check in vm.checks.values():
                if check.task is not None:
                    check.task.cancel()
        for w in list(self._watchers):
            w.end = _End.CLOSED
            with contextlib.suppress(asyncio.QueueFull):
                w.queue.put_nowait(None)
        self._watchers.clear()

    async def wait_actions(self) -> None:
        """Wait until every action started so far has finished (tests; a quiet shutdown)."""
        while pending := [t for t in self._tasks if not t.done()]:
            await asyncio.gather(*pending, return_exceptions=True)

    async def synced(self) -> None:
        """Wait until the first listing of the VMs is applied."""
        await self._synced.wait()

    async def refresh(self) -> None:
        """List the VMs now and bring the schedule in line (added, removed, started, stopped)."""
        vms, _ = await self._svc.list_vms()
        self._reconcile(vms)

    # ---- queries -------------------------------------------------------------------------------

    def vms(self) -> list[str]:
        """Names of the VMs the monitor follows."""
        return sorted(self._vms)

    def health(self, name: str) -> VmHealth:
        """The current health of ``name`` (NotFound when the monitor does not know it)."""
        vm = self._vms.get(name)
        if vm is None:
            raise NotFound(f"VM {name} not found", reason="VM_NOT_FOUND", metadata={"vm": name})
        return self._health(vm)

    async def watch(self) -> AsyncIterator[HealthUpdate]:
        """Every VM's health, then ``synced``, then updates as they happen (see ``HealthUpdate``).

        A watcher that falls ``watch_queue`` updates behind ends with FailedPrecondition
        ``HEALTH_WATCH_OVERFLOW`` (probing never waits for a slow watcher); it watches again to re-sync.
        """
        watcher = _Watcher(asyncio.Queue(maxsize=self.settings.watch_queue))
        # registered and snapshotted in one step: nothing falls between the snapshot and the live updates
        self._watchers.add(watcher)
        snapshot = [self._health(vm) for _, vm in sorted(self._vms.items())]
        try:
            for health in snapshot:
                yield HealthUpdate(health=health)
            yield HealthUpdate(synced=True)
            while True:
                self._check_end(watcher)
                item = await watcher.queue.get()
                self._check_end(watcher)
                if item is None:
                    return
                yield item
        finally:
            self._watchers.discard(watcher)

    @staticmethod
    def _check_end(watcher: _Watcher) -> None:
        if watcher.end is _End.OVERFLOW:
            raise FailedPrecondition(
                "the health watch fell too far behind and was ended: watch again to re-sync",
                reason="HEALTH_WATCH_OVERFLOW",
            )

    async def check_now(self, name: str, check: str = "") -> tuple[list[ProbeResult], VmHealth]:
        """Run ``name``'s checks (or only ``check``) once now; the results do not count toward thresholds."""
        vm = self._vms.get(name)
        if vm is None:
            # perhaps created a moment ago and its event is still on the way
            self._apply_vm(await self._svc.get(name))
            vm = self._vms[name]
        if check and check not in vm.checks:
            raise NotFound(
                f"VM {name} has no health check {check!r}",
                reason="CHECK_NOT_FOUND",
                metadata={"vm": name, "check": check},
            )
        chosen = [vm.checks[check]] if check else list(vm.checks.values())
        if not vm.running:
            now = self._clock.now()
            results = [ProbeResult(c.probe.name, Sample.NO_DATA, NOT_RUNNING, now) for c in chosen]
        else:
            results = list(await asyncio.gather(*(self._run_probe(name, c.probe, live=False) for c in chosen)))
        return results, self._health(vm)

    # ---- the schedule --------------------------------------------------------------------------

    async def run_due(self, *, wait: bool = True) -> int:
        """Start every run that is due now (and close finished minutes); with ``wait`` await them.

        Returns how many runs were started. The background loop calls it with ``wait=False``.
        """
        now = self._clock.monotonic()
        started: list[asyncio.Task[None]] = []
        # a heap of planned runs: each wake-up costs O(due · log n), not a scan of every check of every VM
        # (500 VMs with 3 checks each at 1 s wake the loop ~1500 times a second)
        while self._due and self._due[0][0] <= now:
            due, _n, vm, check = heapq.heappop(self._due)
            if check.next_due != due or not vm.running or self._vms.get(vm.name) is not vm:
                continue  # stale entry: rescheduled, stopped or removed since it was planned
            interval = check.probe.interval_ms / 1000
            # the next tick on the grid after now: missed ticks are skipped, not made up
            self._plan(vm, check, due + (math.floor((now - due) / interval) + 1) * interval)
            if check.task is not None and not check.task.done():
                continue  # the previous run still runs (bounded by its timeout): skip this tick
            task = asyncio.create_task(self._scheduled_run(vm, check, vm.generation), name=f"probe-{vm.name}")
            check.task = task
            started.append(task)
        if now - self._minutes_closed_at >= _CLOSE_MINUTES_EVERY:
            self._minutes_closed_at = now
            self._close_minutes()
        if wait and started:
            await asyncio.gather(*started, return_exceptions=True)
        return len(started)

    def next_due(self) -> float | None:
        """Monotonic time of the next planned run (None when nothing is scheduled)."""
        while self._due:
            due, _n, vm, check = self._due[0]
            if check.next_due == due and vm.running and self._vms.get(vm.name) is vm:
                return due
            heapq.heappop(self._due)  # stale
        return None

    def _plan(self, vm: _Vm, check: _Check, due: float) -> None:
        check.next_due = due
        self._planned += 1
        heapq.heappush(self._due, (due, self._planned, vm, check))

    async def _run_forever(self) -> None:
        while True:
            try:
                await self.run_due(wait=False)
            except Exception:
                log.exception("health schedule: unexpected error")
            nxt = self.next_due()
            delay = _MAX_SLEEP if nxt is None else min(max(nxt - self._clock.monotonic(), 0.0), _MAX_SLEEP)
            self._wake.clear()
            sleeper = asyncio.create_task(self._clock.sleep(delay))
            waker = asyncio.create_task(self._wake.wait())
            try:
                await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                sleeper.cancel()
                waker.cancel()

    def _schedule(self, vm: _Vm) -> None:
        now = self._clock.monotonic()
        for check in vm.checks.values():
            interval = check.probe.interval_ms / 1000
            self._plan(vm, check, now + check.probe.initial_delay_ms / 1000 + self._rng.uniform(0, interval))
        self._wake.set()

    def _track_resources(self, vm: _Vm, delta: int) -> None:
        """Count ``vm``'s resource probe intervals in (+1) or out (-1); O(its checks), not O(every check)."""
        changed = False
        for c in vm.checks.values():
            if c.probe.type is ProbeType.RESOURCE:
                self._resource_intervals[c.probe.interval_ms] += delta
                if self._resource_intervals[c.probe.interval_ms] <= 0:
                    del self._resource_intervals[c.probe.interval_ms]
                changed = True
        if changed:
            # every resource probe still sees a figure at most half its interval old
            shortest = min(self._resource_intervals, default=0)
            self.sampler.min_age = shortest / 2000

    async def _scheduled_run(self, vm: _Vm, check: _Check, generation: int) -> None:
        result = await self._run_probe(vm.name, check.probe, live=True)
        if self._vms.get(vm.name) is not vm or vm.generation != generation or not vm.running:
            return  # the VM stopped, restarted or left while the probe ran: the result is about the past
        self._observe(vm, check, result)

    async def _run_probe(self, name: str, probe: Probe, *, live: bool) -> ProbeResult:
        async with self._sem:
            started = self._clock.monotonic()
            when = self._clock.now()
            try:
                async with asyncio.timeout(probe.timeout_ms / 1000):
                    found = await self._probe(name, probe, live=live)
            except TimeoutError:
                found = Finding(Sample.FAIL, f"timed out after {probe.timeout_ms}ms")
            except ProbeFailure as exc:
                found = Finding(Sample.FAIL, str(exc))
            except Unavailable as exc:
                # the hypervisor is down: nothing can be said about the guest
                found = Finding(Sample.NO_DATA, f"hypervisor unavailable: {exc.message}")
            except CloneboxError as exc:
                found = Finding(Sample.FAIL, exc.message)
            except Exception as exc:
                log.exception("health check %s of %s: unexpected error", probe.name, name)
                found = Finding(Sample.FAIL, f"internal error ({type(exc).__name__})")
            duration = max(int((self._clock.monotonic() - started) * 1e6), 0)
            return ProbeResult(probe.name, found.sample, found.detail, when, duration)

    async def _probe(self, name: str, probe: Probe, *, live: bool) -> Finding:
        timeout = probe.timeout_ms / 1000
        kind = probe.type
        if kind is ProbeType.HTTP:
            return await http_probe(probe.http or HttpProbe(), await self._hv.probe_targets(name))
        if kind is ProbeType.TCP and probe.tcp is not None:
            return await tcp_probe(probe.tcp.port, await self._hv.probe_targets(name))
        if kind is ProbeType.GUEST_AGENT:
            return await guest_agent_probe(self._hv, name)
        if kind is ProbeType.COMMAND and probe.command is not None:
            return await command_probe(self._hv, name, probe.command, timeout)
        if kind is ProbeType.FILE and probe.file is not None:
            return await file_probe(self._hv, name, probe.file)
        if kind is ProbeType.RESOURCE and probe.resource is not None:
            return await resource_probe(self._hv, name, probe.resource, self.sampler, self._cpu, record=live)
        if kind is ProbeType.SCRIPT and probe.script is not None:
            if self._scripts is None:
                return Finding(Sample.FAIL, "script probes are disabled on this agent (no probe_scripts_dir)")
            targets = await self._hv.probe_targets(name)
            return await self._scripts.run(name, probe.script, targets[0].address if targets else "")
        return Finding(Sample.FAIL, f"a {kind.value} check without its settings")

    # ---- states --------------------------------------------------------------------------------

    def _health(self, vm: _Vm) -> VmHealth:
        return VmHealth(
            vm=vm.name,
            host=self.host,
            state=vm.state,
            checks=tuple(c.status() for c in vm.checks.values()),
            since=vm.since,
            updated=vm.updated,
        )

    def _observe(self, vm: _Vm, check: _Check, result: ProbeResult) -> None:
        self._aggregate(vm, check, result)
        before = check.tracker.state
        after = check.tracker.observe(result.sample)
        check.last = result
        vm.updated = result.time
        transitions: list[Transition] = []
        if result.sample is Sample.PASS:
            check.armed = True
        if after is not HealthState.UNHEALTHY:
            check.restart_held = False
        elif before is HealthState.UNHEALTHY and check.restart_held and self._restart_room(vm):
            # a VM that stays unhealthy is not left alone for good once the cap's window has moved on
            check.restart_held = False
            self._act(vm, check, "on_failure", check.probe.on_failure)
        if after is not before:
            check.since = result.time
            transitions.append(
                Transition(vm.name, self.host, check.probe.name, before, after, result.time, result.detail)
            )
            if after is HealthState.UNHEALTHY:
                check.was_unhealthy = True
                if check.armed or check.probe.on_failure.kind is not ActionKind.RESTART:
                    self._act(vm, check, "on_failure", check.probe.on_failure)
            elif after is HealthState.HEALTHY and before in (HealthState.DEGRADED, HealthState.UNHEALTHY):
                if check.was_unhealthy:
                    self._act(vm, check, "on_recovery", check.probe.on_recovery)
                check.was_unhealthy = False
        transitions += self._overall(vm, result.time)
        if transitions:
            self._publish(vm, transitions=transitions)

    def _overall(self, vm: _Vm, when: datetime) -> list[Transition]:
        state = overall_state((c.tracker.state, c.probe.critical) for c in vm.checks.values())
        if state is vm.state:
            return []
        before, vm.state, vm.since = vm.state, state, when
        worst = [c.probe.name for c in vm.checks.values() if c.tracker.state is not HealthState.HEALTHY]
        detail = "every check healthy" if not worst else "checks not healthy: " + ", ".join(worst)
        return [Transition(vm.name, self.host, "", before, state, when, detail)]

    def _aggregate(self, vm: _Vm, check: _Check, result: ProbeResult) -> None:
        minute = _minute(result.time)
        if check.minute is not None and check.minute.minute < minute:
            # sent with the next batch (_close_minutes), not on its own: at a minute's turn every
            # check of every VM closes one, and one update each would flood the stream
            self._closed.append(check.minute.close(vm.name, check.probe.name))
            check.minute = None
        if check.minute is None:
            check.minute = _Minute(minute)
        check.minute.add(result)

    def _close_minutes(self) -> None:
        """Close minute aggregates whose minute is over (each is emitted once), in batched updates."""
        current = _minute(self._clock.now())
        for vm in list(self._vms.values()):
            for check in vm.checks.values():
                # a run in flight still counts in its minute: close that one after it lands
                if (
                    check.minute is not None
                    and check.minute.minute < current
                    and (check.task is None or check.task.done())
                ):
                    self._closed.append(check.minute.close(vm.name, check.probe.name))
                    check.minute = None
        closed, self._closed = self._closed, []
        for i in range(0, len(closed), _AGGREGATES_PER_UPDATE):
            self._publish_aggregates(closed[i : i + _AGGREGATES_PER_UPDATE])

    # ---- lifecycle of VMs ----------------------------------------------------------------------

    def _probes_for(self, spec: VmSpec) -> tuple[tuple[Probe, bool], ...]:
        if spec.health_checks:
            return tuple((p, False) for p in spec.health_checks)
        if Capability.GUEST_AGENT in self._hv.capabilities:
            return ((IMPLICIT_GUEST_AGENT, True),)
        return ()

    def _new_vm(self, name: str, probes: tuple[tuple[Probe, bool], ...]) -> _Vm:
        now = self._clock.now()
        checks = {
            p.name: _Check(
                p,
                implicit,
                ProbeTracker(p.failure_threshold, p.success_threshold),
                last=ProbeResult(p.name, Sample.NO_DATA, NOT_RUNNING, now),
            )
            for p, implicit in probes
        }
        return _Vm(name, probes, checks, since=now, updated=now)

    def _apply_vm(self, v: Vm) -> None:
        """Bring the monitor in line with one VM as the service reports it."""
        probes = self._probes_for(v.spec)
        vm = self._vms.get(v.name)
        if vm is not None and vm.probes != probes:
            self._remove(v.name)  # a new VM of the same name (or new checks): start over
            vm = None
        if vm is None:
            vm = self._new_vm(v.name, probes)
            self._vms[v.name] = vm
            self._track_resources(vm, +1)
            if v.state != VmState.RUNNING:
                # a running one is announced once, by _set_running below: one update per new VM, not two
                self._publish(vm)
        self._set_running(vm, v.state == VmState.RUNNING)

    def _remove(self, name: str) -> None:
        vm = self._vms.pop(name, None)
        if vm is None:
            return
        vm.generation += 1
        for check in vm.checks.values():
            if check.task is not None:
                check.task.cancel()
            if check.minute is not None:
                self._closed.append(check.minute.close(vm.name, check.probe.name))
        self._cpu.forget(name)
        self._track_resources(vm, -1)
        self._publish(vm, removed=True)

    def _reconcile(self, vms: Sequence[Vm]) -> None:
        for v in vms:
            self._apply_vm(v)
        for name in set(self._vms) - {v.name for v in vms}:
            self._remove(name)

    def _set_running(self, vm: _Vm, running: bool) -> None:
        if vm.running == running:
            return
        vm.running = running
        vm.generation += 1
        now = self._clock.now()
        self._cpu.forget(vm.name)  # a new QEMU process counts CPU time from zero
        transitions: list[Transition] = []
        for check in vm.checks.values():
            if check.task is not None:
                check.task.cancel()
                check.task = None
            before = check.tracker.state
            p = check.probe
            check.tracker = ProbeTracker(p.failure_threshold, p.success_threshold)
            check.armed = False
            check.next_due = None
            check.last = None if running else ProbeResult(p.name, Sample.NO_DATA, NOT_RUNNING, now)
            if before is not HealthState.UNKNOWN:
                check.since = now
                transitions.append(
                    Transition(vm.name, self.host, p.name, before, HealthState.UNKNOWN, now, NOT_RUNNING)
                )
        transitions += self._overall(vm, now)
        vm.updated = now
        if running:
            self._schedule(vm)
        self._publish(vm, transitions=transitions)

    async def _follow(self) -> None:
        """Apply the service's VM list, then its lifecycle events; re-list periodically and on errors."""
        backoff = 1.0
        while True:
            try:
                vms, revision = await self._svc.list_vms()
            except CloneboxError as exc:
                log.warning("health: cannot list VMs (%s); retrying", exc.message)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            backoff = 1.0
            self._reconcile(vms)
            self._synced.set()
            try:
                async with asyncio.timeout(self.settings.resync_seconds):
                    async for event in self._svc.watch(revision):
                        if event.type is VmEventType.DELETED:
                            self._remove(event.vm.name)
                        else:
                            self._apply_vm(event.vm)
                return  # the history was closed: the service is stopping
            except TimeoutError:
                continue  # periodic re-list: covers adapters without events and anything missed
            except CloneboxError as exc:
                log.info("health: lifecycle watch ended (%s); re-listing", exc.message)

    # ---- actions -------------------------------------------------------------------------------

    def _act(self, vm: _Vm, check: _Check, trigger: str, action: Action) -> None:
        if action.kind is ActionKind.NONE:
            return
        task = asyncio.create_task(
            self._run_action(vm, check.probe.name, trigger, action), name=f"health-action-{vm.name}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_action(self, vm: _Vm, check: str, trigger: str, action: Action) -> None:
        try:
            if action.kind is ActionKind.RESTART:
                outcome, detail = await self._restart(vm, check)
            else:
                outcome, detail = await self._command(vm, action.argv)
        except Exception as exc:
            log.exception("health action %s of %s/%s failed unexpectedly", action.kind, vm.name, check)
            outcome, detail = "failed", f"internal error ({type(exc).__name__})"
        record = ActionRecord(vm.name, check, trigger, action.kind, outcome, detail, self._clock.now())
        log.info("health action %s %s of %s/%s: %s (%s)", trigger, action.kind, vm.name, check, outcome, detail)
        if self._vms.get(vm.name) is vm:
            self._publish(vm, actions=[record])
        try:
            await self._svc.record_health_action(vm.name, check, trigger, action.kind.value, outcome, detail)
        except Exception:
            log.exception("health action of %s: the audit event could not be written", vm.name)

    async def _command(self, vm: _Vm, argv: tuple[str, ...]) -> tuple[str, str]:
        try:
            result = await self._hv.guest_exec(vm.name, argv, timeout=ACTION_COMMAND_TIMEOUT)
        except CloneboxError as exc:
            return "failed", exc.message
        # the command's output stays out of the record (and the audit log): it may hold anything
        return ("done" if result.exit_code == 0 else "failed"), f"{argv[0]} exited {result.exit_code}"

    async def _restart(self, vm: _Vm, check: str) -> tuple[str, str]:
        s = self.settings
        if vm.restarting:
            return "suppressed", "a restart of this VM is already in progress"
        if not self._restart_room(vm):
            if check in vm.checks:
                vm.checks[check].restart_held = True
            return "suppressed", (
                f"{len(vm.restarts)} restarts in the last {s.restart_window_seconds:g}s "
                f"(health_max_restarts {s.max_restarts})"
            )
        vm.restarting = True
        try:
            if vm.restarts:
                # back-off doubles with each restart in the window: a VM that keeps failing is not hammered
                backoff = s.restart_backoff_seconds * 2 ** (len(vm.restarts) - 1)
                wait = vm.restarts[-1] + backoff - self._clock.monotonic()
                if wait > 0:
                    await self._clock.sleep(wait)
                    state = vm.checks[check].tracker.state if check in vm.checks else None
                    if self._vms.get(vm.name) is not vm or not vm.running or state is not HealthState.UNHEALTHY:
                        return "suppressed", f"check no longer unhealthy after the {backoff:g}s back-off"
            vm.restarts.append(self._clock.monotonic())
            n = len(vm.restarts)
            # once the VM is being destroyed, the restart runs to its end even if the agent stops meanwhile:
            # a cancelled restart would leave the VM off (close() waits for these, bounded)
            inner = asyncio.create_task(self._destroy_and_start(vm), name=f"health-restart-{vm.name}")
            self._critical.add(inner)
            inner.add_done_callback(self._critical.discard)
            error = await asyncio.shield(inner)
            if error:
                return "failed", error
            return (
                "done",
                f"destroyed and started again (restart {n} of {s.max_restarts} per {s.restart_window_seconds:g}s)",
            )
        finally:
            vm.restarting = False

    async def _destroy_and_start(self, vm: _Vm) -> str:
        """Restart ``vm`` through the service (its events, journal and audit stay right); '' or the error."""
        try:
            await self._svc.stop(vm.name, request_id="", force=True, actor=SYSTEM_ACTOR)
            if self._vms.get(vm.name) is vm:
                self._set_running(vm, False)
            started = await self._svc.start_vm(vm.name, request_id="", actor=SYSTEM_ACTOR)
        except CloneboxError as exc:
            return exc.message
        if self._vms.get(vm.name) is vm:
            # trackers start again from UNKNOWN and initial_delay applies as after any boot
            self._set_running(vm, started.state == VmState.RUNNING)
        return ""

    def _restart_room(self, vm: _Vm) -> bool:
        """Whether the cap allows another restart of ``vm`` now."""
        horizon = self._clock.monotonic() - self.settings.restart_window_seconds
        while vm.restarts and vm.restarts[0] <= horizon:
            vm.restarts.popleft()
        return len(vm.restarts) < self.settings.max_restarts

    # ---- fan-out -------------------------------------------------------------------------------

    def _publish(
        self,
        vm: _Vm,
        *,
        transitions: Sequence[Transition] = (),
        aggregates: Sequence[Aggregate] = (),
        actions: Sequence[ActionRecord] = (),
        removed: bool = False,
    ) -> None:
        if not self._watchers:
            return
        self._send(HealthUpdate(self._health(vm), tuple(transitions), tuple(aggregates), tuple(actions), removed))

    def _publish_aggregates(self, aggregates: Sequence[Aggregate]) -> None:
        """Closed minutes of any VMs in one update without a health (nothing a watcher shows changed)."""
        if self._watchers and aggregates:
            self._send(HealthUpdate(aggregates=tuple(aggregates)))

    def _send(self, update: HealthUpdate) -> None:
        for w in list(self._watchers):
            try:
                w.queue.put_nowait(update)
            except asyncio.QueueFull:
                # never wait for a slow watcher: end its stream instead (it re-syncs from a snapshot)
                w.end = _End.OVERFLOW
                self._watchers.discard(w)


__all__ = ["IMPLICIT_GUEST_AGENT", "Clock", "HealthMonitor", "HealthSettings", "HealthUpdate", "SystemClock"]
