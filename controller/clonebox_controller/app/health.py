"""Fleet health: follow every agent's WatchHealth, store what matters, fan out to watchers.

For each live agent session :class:`HealthHub` runs one follower task that consumes the agent's
``WatchHealth`` stream (a snapshot of every VM's health, ``synced``, then updates) and applies each
message to the store in one transaction. On every (re)sync, VMs of that host that the snapshot no
longer lists are removed. When the session ends, or the stream fails because the agent cannot be
reached, the host's VMs become UNKNOWN with a VM-level transition "host unreachable"; the snapshot
after the reconnect turns them back (the store adds the transitions).

Watchers get, in order: stored transitions after their resume point, the current health of each VM
they asked for, ``synced``, then live updates. Live updates reach watchers through in-memory
bounded queues; a watcher that falls behind has its stream ended with FAILED_PRECONDITION
(``WATCH_OVERFLOW``) and resumes with ``after_seq``, so one slow client never holds up the others or
the agents. Every message carries ``seq``: the highest transition seq up to which that stream is
complete, so resuming after it never skips a transition.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from clonebox_controller.app.hosts import HostRegistry
from clonebox_controller.app.ports import AgentHealthUpdate, FleetStore, HealthStore
from clonebox_core.errors import CloneboxError, DeadlineExceeded, FailedPrecondition, Unavailable
from clonebox_core.health import ActionRecord, Aggregate, HealthState, ProbeResult, Transition, VmHealth
from clonebox_core.model import Host, HostState
from clonebox_core.names import is_dns_label

log = logging.getLogger(__name__)

T = TypeVar("T")

#: detail of the transition a VM gets when its host's agent cannot be reached
HOST_UNREACHABLE = "host unreachable"
#: transitions read per store call while replaying
_REPLAY_CHUNK = 1000
#: VMs listed per store call when every VM of the fleet is asked for
_FLEET_PAGE = 1000
#: back-off between attempts to follow an agent's health stream
_MIN_BACKOFF = 0.5
_MAX_BACKOFF = 30.0
#: what the store's short string columns hold
_MAX_SHORT = 16


@dataclass(frozen=True)
class HealthSettings:
    """Retention and fan-out settings (see ``HealthConfig``)."""

    transition_retention: timedelta = timedelta(days=30)
    minute_retention: timedelta = timedelta(days=7)
    action_retention: timedelta = timedelta(days=30)
    prune_interval_seconds: float = 3600.0
    #: how often hosts the store calls unreachable (a controller restart, missed heartbeats) are looked at
    unreachable_check_seconds: float = 10.0
    #: live updates a watcher may fall behind by before its stream ends
    watch_queue: int = 1000


@dataclass(frozen=True)
class HealthEvent:
    """One message of a health watch.

    ``health`` is None for a replayed transition and for ``synced``; ``before`` is the VM's state
    before a live update (the states filter matches it as well as the state after).
    """

    vm: str = ""
    health: VmHealth | None = None
    transitions: tuple[Transition, ...] = ()
    removed: bool = False
    synced: bool = False
    seq: int = 0
    before: HealthState | None = None


class _Watcher:
    """One watch's filters and bounded queue."""

    def __init__(self, names: frozenset[str] | None, states: frozenset[HealthState] | None, size: int) -> None:
        self.names = names
        self.states = states
        self.queue: asyncio.Queue[HealthEvent] = asyncio.Queue(maxsize=size)
        self.overflowed = False

    def wants(self, event: HealthEvent) -> bool:
        if self.names is not None and event.vm not in self.names:
            return False
        if self.states is None:
            return True
        seen = {event.before} if event.before is not None else set()
        if event.health is not None:
            seen.add(event.health.state)
        seen.update(s for t in event.transitions if not t.check for s in (t.from_state, t.to_state))
        return not self.states.isdisjoint(seen)


def _valid(update: AgentHealthUpdate) -> str:
    """Why an agent's update cannot be stored ("" when it can): the store's columns are bounded."""
    names = [t.vm for t in update.transitions] + [a.vm for a in update.aggregates] + [a.vm for a in update.actions]
    if update.health is not None:
        names.append(update.health.vm)
    if not names:
        return "nothing in it"
    if any(not is_dns_label(n) for n in names):
        return "VM names must be DNS labels"
    if update.health is not None and any(n != update.health.vm for n in names):
        return "one update is about one VM"
    checks = [t.check for t in update.transitions if t.check] + [a.check for a in update.aggregates]
    checks += [a.check for a in update.actions]
    if any(not is_dns_label(c) for c in checks):
        return "check names must be DNS labels"
    if any(len(a.trigger) > _MAX_SHORT or len(a.outcome) > _MAX_SHORT for a in update.actions):
        return f"action trigger and outcome are at most {_MAX_SHORT} characters"
    return ""


class HealthHub:
    """Follows agents' health streams into the store and serves health reads and watches."""

    def __init__(
        self,
        fleet: FleetStore,
        store: HealthStore,
        hosts: HostRegistry,
        settings: HealthSettings | None = None,
    ) -> None:
        """``fleet`` and ``store`` are usually the same Store; ``hosts`` tells about agent sessions."""
        self._fleet = fleet
        self._store = store
        self._hosts = hosts
        self.settings = settings or HealthSettings()
        #: per host: its latest task (a follower, or the "unreachable" marking after a session ended) and
        #: whether it is a follower; a new task waits for the one before, so a quick reconnect cannot be
        #: overtaken by the marking of the session before it
        self._tasks: dict[str, tuple[asyncio.Task[None], bool]] = {}
        self._watchers: set[_Watcher] = set()
        #: stored transitions are published in seq order: store-then-publish is one step per update
        self._publish_lock = asyncio.Lock()
        self._background: list[asyncio.Task[None]] = []
        #: store-then-publish steps in flight (they finish even when their follower is cancelled)
        self._writes: set[asyncio.Task[object]] = set()
        #: after close, sessions that end (the server stopping) must not mark their VMs unreachable
        self._closed = False
        hosts.add_listener(self)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start pruning old history and watching for hosts that went silent."""
        self._background = [
            asyncio.create_task(self._prune_forever(), name="health-prune"),
            asyncio.create_task(self._unreachable_forever(), name="health-unreachable"),
        ]

    async def close(self) -> None:
        """Stop every follower and background task.

        Called before the server stops: a controller shutting down says nothing about its agents, so
        the sessions it ends then do not make their VMs UNKNOWN.
        """
        self._closed = True
        tasks = [t for t, _ in self._tasks.values()] + self._background
        self._tasks.clear()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, *self._writes, return_exceptions=True)

    async def _store_and_publish(self, write: Callable[[], T], events: Callable[[T], Iterable[HealthEvent]]) -> T:
        """Run ``write`` on the store, then publish its events, as one step no cancellation splits.

        A follower is cancelled when its session ends; if that happened between the commit and the
        publish, watchers would never hear of a stored change. The lock keeps publish order = seq order.
        """

        async def step() -> T:
            async with self._publish_lock:
                result = await asyncio.to_thread(write)
                for event in events(result):
                    self._publish(event)
                return result

        task: asyncio.Task[T] = asyncio.create_task(step())
        self._writes.add(task)  # awaited on close
        task.add_done_callback(self._writes.discard)
        return await asyncio.shield(task)

    def host_connected(self, host: Host) -> None:
        """See ``SessionListener``: follow the new session's health stream."""
        if self._closed:
            return
        previous = self._replace(host.name)
        self._tasks[host.name] = (
            asyncio.create_task(self._follow(host, previous), name=f"health-{host.name}"),
            True,
        )

    def host_disconnected(self, name: str) -> None:
        """See ``SessionListener``: stop following; the host's VMs become UNKNOWN."""
        if self._closed:
            return
        previous = self._replace(name)
        self._tasks[name] = (
            asyncio.create_task(self._after_session(name, previous), name=f"health-gone-{name}"),
            False,
        )

    def _replace(self, name: str) -> asyncio.Task[None] | None:
        entry = self._tasks.pop(name, None)
        if entry is None:
            return None
        task, follower = entry
        if follower:
            task.cancel()
        return task

    # ------------------------------------------------------------------ following agents

    async def _follow(self, host: Host, previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            await asyncio.gather(previous, return_exceptions=True)
        backoff = _MIN_BACKOFF
        while True:
            synced = False
            try:
                client = self._hosts.client_for(host)
                seen: set[str] = set()
                async for update in client.watch_health():
                    if update.synced:
                        await self._resync(host.name, seen)
                        synced = True
                        continue
                    if not synced and update.health is not None:
                        seen.add(update.health.vm)
                    await self._apply(host.name, update)
                log.info("health stream of host %s ended; following it again", host.name)
            except asyncio.CancelledError:
                raise
            except (Unavailable, DeadlineExceeded) as exc:
                log.warning("health stream of host %s: %s", host.name, exc)
                await self._mark_unreachable(host.name)
            except CloneboxError as exc:
                # e.g. an agent without health checks: try again later, more and more rarely
                log.warning("health stream of host %s: %s", host.name, exc)
            except Exception:
                # the store failing (database down) must not end the follower for good
                log.exception("following the health of host %s failed", host.name)
            if synced:
                backoff = _MIN_BACKOFF
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF)

    async def _after_session(self, name: str, previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            await asyncio.gather(previous, return_exceptions=True)
        await self._mark_unreachable(name)

    async def _apply(self, host: str, update: AgentHealthUpdate) -> None:
        problem = _valid(update)
        if problem:
            log.warning("host %s sent a health update that cannot be stored (%s); skipped", host, problem)
            return
        vm = update.health.vm if update.health is not None else update.transitions[0].vm if update.transitions else ""
        health = dataclasses.replace(update.health, host=host) if update.health is not None else None

        def events(stored: list[Transition] | None) -> list[HealthEvent]:
            if stored is None:
                log.debug("host %s reports health of VM %s, which the fleet places elsewhere; ignored", host, vm)
                return []
            if health is None and not stored:
                return []  # aggregates or actions only: nothing a watcher sees
            own = [t for t in stored if not t.check and t.vm == vm]
            after = health.state if health is not None else None
            before = own[0].from_state if own else after
            return [HealthEvent(vm, health, tuple(stored), removed=update.removed, before=before)]

        await self._store_and_publish(
            lambda: self._store.apply_health_update(
                host,
                None if update.removed else health,
                update.transitions,
                update.aggregates,
                update.actions,
                [vm] if update.removed and vm else [],
                placed_on_host=vm,
            ),
            events,
        )

    async def _resync(self, host: str, seen: Collection[str]) -> None:
        """After a snapshot: the host's VMs it did not list are gone."""
        current = await asyncio.to_thread(self._store.list_health, None, None, host)
        gone = [h for h in current if h.vm not in seen]
        if not gone:
            return
        await self._store_and_publish(
            lambda: self._store.apply_health_update(host, None, removed=[h.vm for h in gone]),
            lambda _stored: [HealthEvent(h.vm, h, removed=True, before=h.state) for h in gone],
        )
        log.info("host %s no longer reports health of %s", host, ", ".join(h.vm for h in gone))

    async def _mark_unreachable(self, host: str) -> None:
        def events(changed: list[tuple[VmHealth, Transition | None]]) -> list[HealthEvent]:
            return [
                HealthEvent(
                    health.vm,
                    health,
                    (transition,) if transition is not None else (),
                    before=transition.from_state if transition is not None else HealthState.UNKNOWN,
                )
                for health, transition in changed
            ]

        try:
            changed = await self._store_and_publish(
                lambda: self._store.mark_health_unknown(host, HOST_UNREACHABLE), events
            )
        except Exception:
            log.exception("cannot mark the VMs of host %s unknown", host)
            return
        if changed:
            log.warning("host %s unreachable: health of %d VM(s) unknown", host, len(changed))

    def _publish(self, event: HealthEvent) -> None:
        for watcher in list(self._watchers):
            if not watcher.wants(event):
                continue
            try:
                watcher.queue.put_nowait(event)
            except asyncio.QueueFull:
                # never wait for a slow watcher: end its stream; it resumes with after_seq
                watcher.overflowed = True
                self._watchers.discard(watcher)

    # ------------------------------------------------------------------ background

    async def prune(self, now: datetime | None = None) -> tuple[int, int, int]:
        """Drop history older than the retention settings; how many transitions, minutes, actions."""
        now = now or datetime.now(UTC)
        s = self.settings
        return await asyncio.to_thread(
            self._store.prune_health, now - s.transition_retention, now - s.minute_retention, now - s.action_retention
        )

    async def _prune_forever(self) -> None:
        while True:
            try:
                removed = await self.prune()
                if any(removed):
                    log.info("pruned health history: %d transitions, %d minutes, %d actions", *removed)
            except Exception:
                log.exception("pruning health history failed")
            await asyncio.sleep(self.settings.prune_interval_seconds)

    async def _unreachable_forever(self) -> None:
        # hosts that are gone without a session ending here: a controller restart, missed heartbeats
        known = [HealthState.HEALTHY, HealthState.DEGRADED, HealthState.UNHEALTHY]
        while True:
            try:
                for host in await asyncio.to_thread(self._fleet.list_hosts):
                    if host.state != HostState.UNREACHABLE or host.name in self._tasks:
                        continue
                    if await asyncio.to_thread(self._store.list_health, None, known, host.name):
                        await self._mark_unreachable(host.name)
            except Exception:
                log.exception("looking for unreachable hosts failed")
            await asyncio.sleep(self.settings.unreachable_check_seconds)

    # ------------------------------------------------------------------ reads

    async def _require_vms(self, names: Sequence[str]) -> dict[str, str]:
        """VM name -> host for each name (NotFound VM_NOT_FOUND for a VM the fleet does not have)."""
        out: dict[str, str] = {}
        for name in names:
            out[name] = (await asyncio.to_thread(self._fleet.get_vm, name)).host
        return out

    async def _fleet_vms(self) -> dict[str, str]:
        out: dict[str, str] = {}
        token = ""
        while True:
            vms, token = await asyncio.to_thread(self._fleet.list_vms, None, None, None, _FLEET_PAGE, token)
            out.update((vm.name, vm.host) for vm in vms)
            if not token:
                return out

    async def get(self, name: str) -> VmHealth:
        """One VM's current health (UNKNOWN with no checks before any report); NotFound VM_NOT_FOUND."""
        host = (await self._require_vms([name]))[name]
        found = await asyncio.to_thread(self._store.get_health, name)
        return found if found is not None else VmHealth(name, host, HealthState.UNKNOWN)

    async def list_health(self, names: Sequence[str] = (), states: Collection[HealthState] = ()) -> list[VmHealth]:
        """Current health of the named VMs (all of the fleet's when none), by name, filtered by state."""
        placed = await self._require_vms(names) if names else await self._fleet_vms()
        found = {h.vm: h for h in await asyncio.to_thread(self._store.list_health, list(placed), None, None)}
        out = [found.get(name) or VmHealth(name, host, HealthState.UNKNOWN) for name, host in sorted(placed.items())]
        return [h for h in out if not states or h.state in states]

    async def history(
        self, name: str, since: datetime, check: str = "", limit: int = 1000
    ) -> tuple[list[Transition], list[Aggregate], list[ActionRecord]]:
        """A VM's stored transitions (the newest ``limit``), minute aggregates and actions since ``since``."""
        await self._require_vms([name])
        return await asyncio.to_thread(self._store.health_history, name, since, check, limit)

    async def check(self, name: str, check: str = "") -> tuple[list[ProbeResult], VmHealth]:
        """Run a VM's checks now on its agent; Unavailable when the agent cannot be reached."""
        host_name = (await self._require_vms([name]))[name]
        if not host_name:
            raise FailedPrecondition(f"VM {name} is not on a host yet", reason="VM_NOT_PLACED", metadata={"vm": name})
        host = await asyncio.to_thread(self._fleet.get_host_endpoint, host_name)
        if host.state == HostState.UNREACHABLE:
            raise Unavailable(
                f"host {host_name} of VM {name} is unreachable", reason="HOST_UNREACHABLE", metadata={"host": host_name}
            )
        results, health = await self._hosts.client_for(host).check_health(name, check)
        if health is None:
            health = await self.get(name)
        return results, dataclasses.replace(health, host=host_name)

    # ------------------------------------------------------------------ watch

    async def watch(
        self, names: Sequence[str] = (), states: Collection[HealthState] = (), after_seq: int = 0
    ) -> AsyncIterator[HealthEvent]:
        """Replay after ``after_seq``, current health, ``synced``, then live updates (see the module doc).

        NotFound for a VM the fleet does not have; FailedPrecondition REVISION_EXPIRED when transitions
        after ``after_seq`` were pruned (or it is beyond any stored seq), WATCH_OVERFLOW when this
        watcher fell behind.
        """
        await self._require_vms(names)
        name_filter = list(dict.fromkeys(names)) or None
        state_filter = sorted(set(states), key=list(HealthState).index) or None
        watcher = _Watcher(
            frozenset(name_filter) if name_filter else None,
            frozenset(state_filter) if state_filter else None,
            self.settings.watch_queue,
        )
        # subscribe before reading the store: an update stored meanwhile is both read and queued (the
        # seq check below drops the copy), never neither
        self._watchers.add(watcher)
        try:
            if after_seq > 0:
                low, high = await asyncio.to_thread(self._store.health_seq_range)
                if after_seq > high or after_seq < low - 1:
                    raise FailedPrecondition(
                        f"after_seq {after_seq} is not in the stored health history (seq {low}..{high}): "
                        "watch again without after_seq",
                        reason="REVISION_EXPIRED",
                        metadata={"oldest": str(low), "newest": str(high)},
                    )
            sent = after_seq
            while after_seq > 0:
                page = await asyncio.to_thread(
                    self._store.health_transitions_after, sent, name_filter, state_filter, _REPLAY_CHUNK
                )
                for t in page:
                    sent = t.seq
                    yield HealthEvent(t.vm, None, (t,), seq=t.seq)
                if len(page) < _REPLAY_CHUNK:
                    break
            current, newest = await asyncio.to_thread(self._store.health_snapshot, name_filter, state_filter)
            if after_seq == 0:
                sent = newest  # the current health reflects every transition up to it
            for h in current:
                yield HealthEvent(h.vm, h, seq=sent)
            yield HealthEvent(synced=True, seq=sent)
            while True:
                if watcher.overflowed:
                    raise FailedPrecondition(
                        "this watch fell behind the fleet's health updates: watch again with after_seq",
                        reason="WATCH_OVERFLOW",
                        metadata={"after_seq": str(sent)},
                    )
                event = await watcher.queue.get()
                fresh = tuple(t for t in event.transitions if t.seq > sent)
                if event.health is None and not fresh and not event.removed:
                    continue
                sent = max([sent, *(t.seq for t in fresh)])
                yield dataclasses.replace(event, transitions=fresh, seq=sent)
        finally:
            self._watchers.discard(watcher)


__all__ = ["HOST_UNREACHABLE", "HealthEvent", "HealthHub", "HealthSettings"]
