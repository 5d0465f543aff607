"""Host registry: agent sessions, heartbeats, reachability, and keeping the fleet view in sync.

Each agent session runs one sync task: re-list and reconcile, then follow the agent's WatchVms from
the listing's revision. A stale revision (agent restarted: new epoch) answers REVISION_EXPIRED and
the task re-lists, so VMs destroyed or undefined behind the fleet's back converge.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Protocol, TypeVar

from clonebox_controller.app.ports import AgentClient, AgentGateway, FleetStore
from clonebox_controller.app.uncancelled import to_thread_uncancelled
from clonebox_core.changes import HOST_KIND, VM_KIND, ChangeFeed
from clonebox_core.errors import CloneboxError, FailedPrecondition, NotFound
from clonebox_core.model import Host, HostEndpoint, HostState, HypervisorInfo, Resources, Revision, Vm, VmState

log = logging.getLogger(__name__)

#: how long a host's VM events may go without their sync position being stored: a restarted controller
#: resumes from a position at most this old and replays the events since, which it applies idempotently
_REVISION_SAVE_SECONDS = 1.0
#: a VM event the fleet cannot place (a VM it does not know) asks for a listing of the host; the events of
#: a burst (a VM deleted while its events were under way, a host making many VMs) share one listing
_RECONCILE_DELAY_SECONDS = 0.5

T = TypeVar("T")

#: how long a host's endpoint (address and state) is used without asking the store again. Agent calls ask
#: for it several times per VM step, and it changes only on registration, heartbeat state and disconnect,
#: which this registry hears of and applies at once; another controller's change is seen this much later.
_ENDPOINT_TTL_SECONDS = 1.0

_ADDRESS_REFRESH_SECONDS = 2.0
_ADDRESS_REFRESH_TRIES = 60


class SessionListener(Protocol):
    """Hears when an agent's session starts and ends (e.g. to follow more of the agent's streams)."""

    def host_connected(self, host: Host) -> None:
        """A session of ``host`` is live (called again for every new session)."""
        ...

    def host_disconnected(self, name: str) -> None:
        """The live session of ``name`` ended."""
        ...


class HostRegistry:
    """Registrations, heartbeats and per-host sync tasks."""

    def __init__(
        self,
        store: FleetStore,
        gateway: AgentGateway,
        changes: ChangeFeed,
        *,
        heartbeat_timeout: float,
        heartbeat_interval: float,
    ) -> None:
        """``changes``: the feed ``store`` announces its commits on; a host's announcement drops its cached endpoint."""
        self._store = store
        self._gateway = gateway
        self.heartbeat_timeout = heartbeat_timeout
        self.heartbeat_interval = heartbeat_interval
        self._sync_tasks: dict[str, asyncio.Task[None]] = {}
        #: the live session of each host; an older session that ends must not tear down a newer one
        self._sessions: dict[str, int] = {}
        self._next_session = 0
        self._refreshers: dict[str, asyncio.Task[None]] = {}
        self._reconcilers: dict[str, asyncio.Task[None]] = {}
        self._sweeper: asyncio.Task[None] | None = None
        #: the VM names each host reported, from its last listing and its events since
        self._reported: dict[str, set[str]] = {}
        self._volume_locks: dict[str, asyncio.Lock] = {}
        self._adopters: dict[str, asyncio.Task[None]] = {}
        self._listeners: list[SessionListener] = []
        #: host name -> (monotonic time read, endpoint); see _ENDPOINT_TTL_SECONDS
        self._endpoints: dict[str, tuple[float, HostEndpoint]] = {}
        self._endpoint_changes = 0
        # every committed write of a host's record is announced, whoever made it in this process, so
        # no writer of host state can leave a stale endpoint behind (other processes: the TTL)
        changes.subscribe(HOST_KIND, lambda key: self._forget_endpoint(key.name))
        #: per VM, the newest agent event that came while an operation owned the VM's state: tried
        #: again when the VM's record next changes (the operation's end), where the store drops it if
        #: the operation's answer covered it
        self._held: dict[str, tuple[str, Vm, bool, Revision | None]] = {}
        #: VMs an operation of this process owns (name -> operations): their events wait for its end
        #: without a read of the store (:meth:`own`)
        self._owned: dict[str, int] = {}
        self._retries: set[asyncio.Task[None]] = set()
        changes.subscribe(VM_KIND, lambda key: self._release_held(key.name))
        # Heartbeats and the sweep get a thread of their own: behind a burst of operations in the shared
        # worker threads (a 50-VM plan), a queued heartbeat is written late and its host is marked
        # unreachable although its agent never stopped sending (seen in CI).
        self._liveness = ThreadPoolExecutor(max_workers=1, thread_name_prefix="liveness")

    def add_listener(self, listener: SessionListener) -> None:
        """Tell ``listener`` about every agent session that starts or ends from now on."""
        self._listeners.append(listener)

    def _connected(self, host: Host) -> None:
        for listener in self._listeners:
            listener.host_connected(host)

    async def start(self) -> None:
        """Start the sweeper that marks silent hosts unreachable."""
        self._sweeper = asyncio.create_task(self._sweep(), name="host-sweeper")

    async def close(self) -> None:
        """Cancel every background task."""
        tasks = [
            *self._sync_tasks.values(),
            *self._refreshers.values(),
            *self._reconcilers.values(),
            *self._adopters.values(),
            *self._retries,
        ]
        if self._sweeper is not None:
            tasks.append(self._sweeper)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._liveness.shutdown(wait=False)

    async def _on_liveness_thread(self, fn: Callable[..., T], *args: object) -> T:
        ctx = contextvars.copy_context()  # keep the caller's trace and actor, as asyncio.to_thread does
        call = functools.partial(ctx.run, fn, *args)
        return await asyncio.get_running_loop().run_in_executor(self._liveness, call)

    async def client(self, name: str) -> AgentClient:
        """A client for host ``name`` if reachable (NotFound HOST_NOT_FOUND, FailedPrecondition HOST_UNREACHABLE)."""
        cached = self._endpoints.get(name)
        if cached is not None and time.monotonic() - cached[0] <= _ENDPOINT_TTL_SECONDS:
            return self.client_for(cached[1])
        read_at, generation = time.monotonic(), self._endpoint_changes
        endpoint = await asyncio.to_thread(self._store.get_host_endpoint, name)
        if generation == self._endpoint_changes:
            # else a change was applied while this read was under way, and the read may predate it
            self._endpoints[name] = (read_at, endpoint)
        return self.client_for(endpoint)

    def _forget_endpoint(self, name: str) -> None:
        """Drop the cached endpoint of ``name`` (its address or reachability has just changed)."""
        self._endpoints.pop(name, None)
        self._endpoint_changes += 1

    def client_for(self, host: Host | HostEndpoint) -> AgentClient:
        """A client for a host that is currently reachable."""
        if host.state == HostState.UNREACHABLE:
            raise FailedPrecondition(
                f"host {host.name} is unreachable (no heartbeat for {self.heartbeat_timeout:g}s)",
                reason="HOST_UNREACHABLE",
            )
        return self._gateway.client(host.name, host.address)

    async def register(
        self,
        name: str,
        address: str,
        capacity: Resources,
        allocatable: Resources,
        hypervisor: HypervisorInfo,
        epoch: int,
    ) -> tuple[Host, int]:
        """Record a (re)connected agent, start syncing its VMs; returns the host and the session id."""
        host = await asyncio.to_thread(
            self._store.upsert_host_registration, name, address, capacity, allocatable, hypervisor, epoch
        )
        # before anything calls the agent of this session (the sync task, the session listeners)
        self._gateway.reconnect(name)
        old = self._sync_tasks.pop(name, None)
        if old is not None:
            old.cancel()
        self._sync_tasks[name] = asyncio.create_task(self._sync(host), name=f"sync-{name}")
        self._next_session += 1
        self._sessions[name] = self._next_session
        self._connected(host)
        log.info("host %s registered at %s (epoch %s)", name, address, epoch)
        return host, self._next_session

    async def heartbeat(self, name: str, serving: bool, reason: str, session: int) -> Host:
        """Record a heartbeat; a live session whose host has no sync task (another session ended) takes over."""
        host = await self._on_liveness_thread(self._store.heartbeat, name, serving, reason)
        if name not in self._sessions:
            self._sessions[name] = session
            self._sync_tasks[name] = asyncio.create_task(self._sync(host), name=f"sync-{name}")
            self._connected(host)
        return host

    async def disconnected(self, name: str, session: int) -> None:
        """Session ``session`` of the agent ended: unless a newer one is live, stop syncing, mark unreachable."""
        if self._sessions.get(name) != session:
            return
        del self._sessions[name]
        task = self._sync_tasks.pop(name, None)
        if task is not None:
            task.cancel()
        for listener in self._listeners:
            listener.host_disconnected(name)
        cancelled = False
        with contextlib.suppress(NotFound):
            # the servicer task that calls this is often cancelled as its stream ends; the write goes on
            # in its thread (its commit drops the cached endpoint, announced by the store)
            _host, cancelled = await to_thread_uncancelled(self._store.set_host_state, name, HostState.UNREACHABLE, "")
        log.warning("host %s disconnected", name)
        if cancelled:
            raise asyncio.CancelledError

    def refresh_addresses(self, vm: Vm) -> None:
        """Poll a running VM's addresses until the guest reports some (qemu-ga or DHCP lease)."""
        if vm.name in self._refreshers or vm.state != VmState.RUNNING or vm.addresses:
            return
        self._refreshers[vm.name] = asyncio.create_task(self._refresh(vm), name=f"addresses-{vm.name}")

    async def _refresh(self, vm: Vm) -> None:
        try:
            for _ in range(_ADDRESS_REFRESH_TRIES):
                await asyncio.sleep(_ADDRESS_REFRESH_SECONDS)
                try:
                    fresh = await (await self.client(vm.host)).get_vm(vm.name)
                except NotFound:
                    return
                except CloneboxError:
                    continue
                if fresh.state != VmState.RUNNING:
                    return
                if fresh.addresses:
                    await asyncio.to_thread(
                        self._store.update_vm_observed, vm.name, fresh.state, fresh.uuid, fresh.addresses, ""
                    )
                    return
        finally:
            self._refreshers.pop(vm.name, None)

    async def _sync(self, host: Host) -> None:
        client = self._gateway.client(host.name, host.address)
        loop = asyncio.get_running_loop()
        while True:
            try:
                listed_at = datetime.now(UTC)
                vms, revision = await client.list_vms()
                self._reported[host.name] = {vm.name for vm in vms}
                changed = await asyncio.to_thread(self._store.reconcile_host, host.name, vms, listed_at)
                await asyncio.to_thread(self._store.set_agent_revision, host.name, revision.epoch, revision.sequence)
                if changed:
                    log.info("host %s reconciled: %s", host.name, ", ".join(changed))
                for vm in vms:
                    self.refresh_addresses(vm)
                if host.name not in self._adopters:
                    # beside the VM sync, not in it: it may wait for a volume delete under way
                    task = asyncio.create_task(self._adopt_volumes(host.name, client), name=f"volumes-{host.name}")
                    self._adopters[host.name] = task
                    task.add_done_callback(functools.partial(self._adopted, host.name))
                saved_at = loop.time()
                async for ev in client.watch_vms(revision):
                    await self._apply(host.name, ev.vm, ev.deleted, ev.revision)
                    if loop.time() - saved_at >= _REVISION_SAVE_SECONDS:
                        await asyncio.to_thread(
                            self._store.set_agent_revision, host.name, ev.revision.epoch, ev.revision.sequence
                        )
                        saved_at = loop.time()
            except FailedPrecondition as exc:
                if exc.reason != "REVISION_EXPIRED":
                    log.warning("sync of host %s: %s", host.name, exc)
                    await asyncio.sleep(1)
            except asyncio.CancelledError:
                raise
            except CloneboxError as exc:
                log.warning("sync of host %s: %s", host.name, exc)
                await asyncio.sleep(1)

    def volume_lock(self, host: str) -> asyncio.Lock:
        """
        The lock a volume's delete (the agent's, then the release) holds against the adoption of ``host``.

        Without it a listing taken just before a delete could re-reserve the deleted volume right after
        its release, holding its room for good. It spans this controller only: another controller's
        delete in that window leaves such a reservation (``docs/operations.md``).
        """
        return self._volume_locks.setdefault(host, asyncio.Lock())

    def _adopted(self, host: str, task: asyncio.Task[None]) -> None:
        if self._adopters.get(host) is task:
            del self._adopters[host]

    async def _adopt_volumes(self, host: str, client: AgentClient) -> None:
        """
        Count the disk of the host's volumes that hold no reservation (``Store.adopt_volumes``).

        Volumes made before reservations existed (migration 0006) or through the agent's own API would
        otherwise leave their room free for placement. A listing that fails is logged and left for the
        next connection: it must not stop the VM sync.
        """
        try:
            async with self.volume_lock(host):
                volumes = await client.list_volumes()
                adopted = await asyncio.to_thread(
                    self._store.adopt_volumes, host, [(v.name, v.size_mib) for v in volumes]
                )
        except CloneboxError as exc:
            log.warning("host %s: its volumes are not counted until it connects again: %s", host, exc)
            return
        if adopted:
            log.info("host %s: counting the disk of volume(s) made without a reservation: %s", host, ", ".join(adopted))

    async def adopt_released(self, name: str, deleted_on: str = "") -> None:
        """
        After the fleet released ``name``, adopt a VM of that name another host reported.

        Names are fleet-unique, so a host's VM whose name the fleet already used elsewhere was left
        out ("left as is"); once that name is free it becomes the fleet's VM on the next listing. Without
        this it would wait for its next lifecycle event, which a stopped VM may never have.

        ``deleted_on``: the host whose agent has just deleted the VM; what it reported of that name
        before is gone, so it is not listed again for it.
        """
        if deleted_on:
            self._reported.get(deleted_on, set()).discard(name)
        for host, names in list(self._reported.items()):
            if name not in names:
                continue
            try:
                await asyncio.to_thread(self._store.reconcile_host, host, *await self._host_listing(host))
            except CloneboxError as exc:
                log.info("adopting %s from host %s: %s (the next listing will)", name, host, exc)

    async def _apply(self, host: str, vm: Vm, deleted: bool, revision: Revision | None = None) -> None:
        """
        Record an agent's event about ``vm`` (at the agent's ``revision``) unless an operation owns the VM.

        The store skips an event its record is newer than (``update_vm_observed``): one an operation's
        answer overtook on the way here.
        """
        reported = self._reported.setdefault(host, set())
        if deleted:
            reported.discard(vm.name)
        else:
            reported.add(vm.name)
        if vm.name in self._owned:
            self._held[vm.name] = (host, vm, deleted, revision)
            return
        try:
            current = await asyncio.to_thread(self._store.get_vm, vm.name)
        except NotFound:
            if not deleted:
                self._reconcile_soon(host)
            return
        if current.host != host:
            return
        if current.state in (VmState.PENDING, VmState.CREATING, VmState.DELETING):
            # the running operation records the outcome; an event must not race it, but one that came
            # after the agent's answer is news the answer does not have
            self._held[vm.name] = (host, vm, deleted, revision)
            return
        if deleted:
            await asyncio.to_thread(
                lambda: self._store.update_vm_observed(
                    vm.name, VmState.FAILED, None, (), "vanished from host", agent_revision=revision
                )
            )
            return
        if vm.observed() != current.observed():
            # most events repeat what the operation behind them has already recorded
            await asyncio.to_thread(
                lambda: self._store.update_vm_observed(vm.name, *vm.observed(), agent_revision=revision)
            )
        self.refresh_addresses(vm)

    def own(self, name: str) -> None:
        """
        An operation of this process now owns ``name``'s state: its agent's events about it wait for :meth:`disown`.

        The same hold as for a record an operation owns (creating, deleting), known here without a read
        of the store. Agents send a change's events just before its answer, so those reads came at the
        moment the operation's end is written, in its way.
        """
        self._owned[name] = self._owned.get(name, 0) + 1

    def disown(self, name: str, recorded: Revision | None) -> None:
        """
        The operation that owned ``name`` has ended (its end stored), recording the agent's revision ``recorded``.

        The event held meanwhile is dropped when ``recorded`` covers it (the answer said it), else recorded
        as any event. ``recorded`` None (no answer, a failure): recorded as any event.
        """
        left = self._owned.get(name, 0) - 1
        if left > 0:
            self._owned[name] = left
            return
        self._owned.pop(name, None)
        held = self._held.get(name)
        if held is not None and held[3] is not None and recorded is not None and recorded.covers(held[3]):
            del self._held[name]
            return
        self._release_held(name)

    def _release_held(self, name: str) -> None:
        if name in self._owned:
            return  # its operation's end releases it (disown)
        held = self._held.pop(name, None)
        if held is None:
            return
        task = asyncio.create_task(self._apply(*held), name=f"held-event-{name}")
        self._retries.add(task)
        task.add_done_callback(self._retries.discard)

    def _reconcile_soon(self, host: str) -> None:
        """List ``host`` and reconcile the store with it shortly (one listing for a burst of asks)."""
        if host not in self._reconcilers:
            self._reconcilers[host] = asyncio.create_task(self._reconcile_later(host), name=f"reconcile-{host}")

    async def _reconcile_later(self, host: str) -> None:
        try:
            await asyncio.sleep(_RECONCILE_DELAY_SECONDS)
            # asks from here on need a listing that starts after them
            self._reconcilers.pop(host, None)
            await asyncio.to_thread(self._store.reconcile_host, host, *await self._host_listing(host))
        except CloneboxError as exc:
            log.info("reconciling host %s after an event about an unknown VM: %s", host, exc)
        finally:
            if self._reconcilers.get(host) is asyncio.current_task():
                del self._reconcilers[host]

    async def _host_listing(self, host: str) -> tuple[list[Vm], datetime]:
        """The host's VMs, and when they were asked for (see ``reconcile_host``'s ``listed_at``)."""
        client = await self.client(host)
        listed_at = datetime.now(UTC)
        vms, _ = await client.list_vms()
        return vms, listed_at

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        pause = max(self.heartbeat_interval / 2, 0.2)
        while True:
            asleep = loop.time()
            await asyncio.sleep(pause)
            late = loop.time() - asleep - pause
            if late > self.heartbeat_timeout / 4:
                # This process was stalled: the heartbeats that came in meanwhile wait behind this very
                # wake-up, unread. A controller must not judge its agents by its own stall; sweep next time.
                log.info("host sweep woke %.2fs late; skipped", late)
                continue
            cutoff = datetime.now(UTC) - timedelta(seconds=self.heartbeat_timeout)
            try:
                for name in await self._on_liveness_thread(self._store.mark_unreachable_older_than, cutoff):
                    log.warning("host %s missed its heartbeats: unreachable", name)
            except CloneboxError as exc:
                log.warning("host sweep failed: %s", exc)
