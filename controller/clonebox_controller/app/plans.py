"""Multi-VM plans: validate, diff, apply and destroy a plan, and run it in the background.

An apply stores the plan as a revision (when it differs), records a *run* with one row per VM in
dependency order, and executes it: every service waits only for its own dependencies' conditions
(``started``, ``healthy``, ``completed``), independent services start in parallel, at most
``update.max_parallel`` VM creates/replaces at once. A failed VM marks its dependents SKIPPED, nothing
new starts, and the run rolls back (deletes exactly the VMs it created, dependents first) or is left
for debugging. A destroy is a run too ("down"): the plan's VMs deleted in reverse dependency order.

Every VM change goes to the store (``PlanStore.update_run``) before anything depends on it, so a
watcher sees it and a controller that dies mid-run can be replaced: runs are leased
(``claim_runs``), and whoever holds the lease resumes a run from its stored rows. Each VM create,
start and delete a run makes carries a request id derived from (run, service, action), so a resumed
run replays what was already sent instead of doing it twice.

VM work goes through ``VmManager`` (operations, reservations, audit) and health through ``HealthHub``:
the engine adds ordering, gates and rollback, nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from clonebox_controller.app.operations import wait_done
from clonebox_controller.app.ports import FleetStore, ImagePart, PlanStore
from clonebox_controller.app.snapshots import ImportHeader, SnapshotManager
from clonebox_controller.app.vms import VmManager
from clonebox_core.audit.event import SYSTEM_ACTOR, AuditEvent, Outcome, current_actor, new_event
from clonebox_core.changes import ChangeFeed, health_key, vm_key
from clonebox_core.errors import (
    Aborted,
    AlreadyExists,
    CloneboxError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    invalid_field,
)
from clonebox_core.health import CheckStatus, HealthState, VmHealth
from clonebox_core.model import Host, HostState, Operation, Resources, Vm, VmSpec, VmState, Volume
from clonebox_core.names import check_dns_label
from clonebox_core.plan import (
    LABEL_PLAN,
    LABEL_SERVICE,
    ChangeKind,
    Condition,
    FailurePolicy,
    Plan,
    PlanRun,
    PlanVm,
    RunState,
    VmChange,
    VmRunState,
    VmStatus,
    VolumeChange,
    VolumeChangeKind,
    attach_volumes,
    check_plan,
    check_subnet_changes,
    levels,
    materialize_networks,
    plan_subnets,
    vm_name,
    volume_name,
    volume_users,
)
from clonebox_core.plan import diff as plan_diff
from clonebox_core.snapshot_archive import ArchiveSummary, archive_vm_spec, read_archive, write_archive_file
from clonebox_core.validate import validate_resolved

log = logging.getLogger(__name__)

#: run actions
UP = "up"
DOWN = "down"
#: run options (``PlanRun.options``)
ALLOW_REPLACE = "allow_replace"
WITH_SNAPSHOTS = "with_snapshots"
#: a destroy that also deletes the plan's volumes (``clonebox down --volumes``)
WITH_VOLUMES = "with_volumes"
#: the label an agent volume carries with its name in the plan (beside ``clonebox.plan``)
LABEL_VOLUME = "clonebox.volume"
#: the run re-applies the revision before a failed one (``auto_revert``); a revert is never reverted
REVERT = "revert"
#: a revert run's request id: this prefix and the failed run it reverts
_REVERT_REQUEST = "auto-revert/"
#: the file name ending of a replace's backup (``<backup_dir>/<plan>/<vm>/<run>.cbsnap``)
BACKUP_SUFFIX = ".cbsnap"
#: runs a request-id lookup looks through before the store's own check answers
_REQUEST_LOOKBACK = 50
#: VMs listed per store call
_PAGE = 1000
#: an execution that crashed on an unexpected error is retried this often before the run fails
_MAX_ATTEMPTS = 3


@dataclass(frozen=True)
class PlanSettings:
    """Engine timing (``ControllerConfig.plans``)."""

    #: how long a claimed run stays this controller's without a renewal; renewed every third of it
    lease_seconds: float = 30.0
    #: how often a run re-reads the state and health of its VMs and the operations it waits for; changes
    #: committed by this process wake it at once (``ChangeFeed``), so this paces only what another
    #: controller sharing the store changes
    poll_seconds: float = 1.0
    #: how often a watch re-reads its run from the store (runs executed by another controller)
    watch_poll_seconds: float = 1.0
    #: a watch sends an unfinished run at most this often (the newest version; the last one at once): every
    #: send is the whole run, and a 50-VM apply changes its run more than a hundred times
    watch_min_interval_seconds: float = 0.1
    #: how long a deletion (rollback, down) keeps retrying while its host is unreachable
    unreachable_retry_seconds: float = 120.0
    #: where a replace keeps the export of the VM it replaces ("" or no snapshot manager: no backup)
    backup_dir: str = ""
    #: backup files kept per VM, newest first
    backup_keep: int = 3


@dataclass(frozen=True)
class PlacementNeed:
    """One VM an apply would create: its name, what it reserves and its host hint ("" for any)."""

    vm: str
    resources: Resources
    host: str = ""


class Placer(Protocol):
    """Placement of many VMs at once over a snapshot of the hosts (the store's placement policy).

    Returns, for each need that does not fit, the VM name and the error placement gave for it. Each
    need that fits reserves its resources for the needs after it, so the answer is all or nothing.
    """

    def __call__(self, hosts: Sequence[Host], needs: Sequence[PlacementNeed]) -> list[tuple[str, CloneboxError]]:
        """The needs that do not fit, with placement's error for each."""
        ...


class HealthReader(Protocol):
    """What the engine reads from ``HealthHub``."""

    async def get(self, name: str) -> VmHealth:
        """One VM's current health (UNKNOWN before any report); NotFound VM_NOT_FOUND."""
        ...


class EngineStore(FleetStore, PlanStore, Protocol):
    """The store as the engine uses it: fleet and plans (one ``Store``)."""


@dataclass(frozen=True)
class Validation:
    """What a plan would do: its dependency levels, each VM's change and the revision compared to."""

    plan: Plan
    levels: list[list[str]]
    changes: list[VmChange]
    current: Plan | None
    #: what the apply would do to each volume a service uses (asked of the volumes' hosts)
    volumes: list[VolumeChange] = dataclasses.field(default_factory=list)


def _private_dirs(folder: Path, top: Path) -> None:
    """Make ``folder`` (under ``top``) with every new folder on the way only the controller's (0700)."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    for d in (folder, *folder.parents):
        if d == top.parent:
            break
        d.chmod(0o700)


async def _write_export(parts: AsyncIterator[ImagePart], path: Path) -> ArchiveSummary:
    """
    Write an export stream as the archive file ``path`` (0600), all or nothing.

    The archive writer is blocking: it runs in a worker thread and pulls each part from the stream
    on the event loop, so the agent's stream is paced by the disk (nothing is buffered here).
    """
    loop = asyncio.get_running_loop()
    stream = aiter(parts)

    async def next_part() -> ImagePart:
        return await anext(stream)

    def pulled() -> Iterator[Any]:  # the parts are the wire's messages, passed on unread
        while True:
            try:
                yield asyncio.run_coroutine_threadsafe(next_part(), loop).result()
            except StopAsyncIteration:
                return

    try:
        return await asyncio.to_thread(write_archive_file, path, pulled(), mode=0o600)
    finally:
        closing = getattr(stream, "aclose", None)
        if closing is not None:
            await closing()


def _prune_backups(folder: Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest backup files in ``folder``; the ones deleted."""
    files = sorted(folder.glob(f"*{BACKUP_SUFFIX}"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
    gone: list[Path] = []
    for old in files[keep:]:
        with contextlib.suppress(FileNotFoundError):
            old.unlink()
            gone.append(old)
    return gone


def _since_after(health: VmHealth, when: datetime) -> bool:
    return health.since is not None and health.since >= when


def run_request_id(run_id: str, service: str, action: str) -> str:
    """The request id of one VM mutation of a run: a resumed run replays it instead of acting twice."""
    return f"plan-run/{run_id}/{service}/{action}"


def _now() -> datetime:
    return datetime.now(UTC)


def _seconds(ms: int) -> str:
    return f"{ms / 1000:g}s"


def with_plan_labels(plan: Plan) -> Plan:
    """``plan`` with the labels every plan VM carries (``clonebox.plan``, ``clonebox.service``) set.

    A spec that sets one of them to something else is refused: the engine tells its VMs from other
    VMs by them.
    """
    vms = []
    for v in plan.vms:
        labels = dict(v.spec.labels)
        for key, value in ((LABEL_PLAN, plan.name), (LABEL_SERVICE, v.service)):
            if labels.get(key, value) != value:
                raise invalid_field(
                    f"vms.{v.service}.spec.labels",
                    f"label {key}={labels[key]!r} is set by clonebox to {value!r}: remove it from the spec",
                    reason="PLAN_INVALID",
                )
            labels[key] = value
        if labels != dict(v.spec.labels):
            vms.append(dataclasses.replace(v, spec=dataclasses.replace(v.spec, labels=tuple(labels.items()))))
        else:
            vms.append(v)
    return dataclasses.replace(plan, vms=tuple(vms))


class PlanEngine:
    """The plan use cases, and the executor of the runs this controller holds the lease of."""

    def __init__(
        self,
        store: EngineStore,
        vms: VmManager,
        health: HealthReader,
        placer: Placer,
        settings: PlanSettings | None = None,
        *,
        owner: str = "",
        snapshots: SnapshotManager | None = None,
        changes: ChangeFeed | None = None,
    ) -> None:
        """
        ``owner``: this process's lease holder id (default: a fresh random one).

        ``changes``: the store's announcements of VM, operation and health changes, which wake a run at
        once; without it a run sees changes at its next poll (``settings.poll_seconds``).

        ``snapshots``: with it and ``settings.backup_dir``, a replace exports the old VM first.
        """
        self._store = store
        self._vms = vms
        self._snapshots = snapshots
        self._health = health
        self._changes = changes or ChangeFeed()
        self._placer = placer
        self.settings = settings or PlanSettings()
        self.owner = owner or f"controller-{uuid.uuid4().hex[:12]}"
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._claim_lock = asyncio.Lock()
        self._claimer: asyncio.Task[None] | None = None
        #: replaced on every run update; watchers wait on the current one
        self._changed = asyncio.Event()
        #: replaced whenever a run executed here ends; a watcher pausing between versions waits on it
        self._ended = asyncio.Event()
        self._closed = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """
        Claim unfinished runs (resuming them) now and every third of the lease from now on.

        Also starts the ``auto_revert`` runs a previous process did not get to (:meth:`revert_missed`).
        """
        await self.claim_once()
        await self.revert_missed()
        self._claimer = asyncio.create_task(self._claim_forever(), name="plan-claims")

    async def revert_missed(self) -> list[str]:
        """
        Start the revert of every plan whose last run is a failed apply that ``auto_revert`` should revert.

        A controller that died between a failed run's end and its revert's start left none; the revert's
        request id is derived from the failed run, so a revert that exists is not made twice (it is then
        the plan's last run, and nothing is done). Returns the plans looked at that got a revert run.
        """
        started: list[str] = []
        for plan in await asyncio.to_thread(self._store.list_plans):
            latest = await asyncio.to_thread(self._store.latest_run, plan.name)
            if latest is None or not latest.done:
                continue
            await self._revert_if_asked(latest.id, await self._plan_of(latest))
            after = await asyncio.to_thread(self._store.latest_run, plan.name)
            if after is not None and after.id != latest.id:
                started.append(plan.name)
        return started

    async def close(self) -> None:
        """Stop executing: cancel run tasks and give up their leases (the runs stay RUNNING, resumable)."""
        self._closed = True
        if self._claimer is not None:
            self._claimer.cancel()
            await asyncio.gather(self._claimer, return_exceptions=True)
        tasks = dict(self._tasks)
        for t in tasks.values():
            t.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        for run_id in tasks:
            try:
                await asyncio.to_thread(self._store.release_run, run_id, self.owner)
            except CloneboxError as err:
                log.warning("could not release plan run %s: %s", run_id, err)
        self._notify()

    async def _claim_forever(self) -> None:
        while True:
            await asyncio.sleep(max(self.settings.lease_seconds / 3, 0.05))
            try:
                await self.claim_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                # the database may be briefly away: the next round renews (the lease outlives two misses)
                log.exception("claiming plan runs failed")

    async def claim_once(self) -> list[str]:
        """Claim (or renew) runs; start the ones not executing here, stop the ones whose lease was lost.

        Returns the ids of the runs this controller holds now.
        """
        async with self._claim_lock:
            if self._closed:
                return []
            # only runs executing before the claim can have lost their lease: one spawned meanwhile (an
            # apply, its run leased at creation) may simply be newer than what the claim read
            before = dict(self._tasks)
            runs = await asyncio.to_thread(self._store.claim_runs, self.owner, self.settings.lease_seconds)
            held = {r.id for r in runs}
            for run_id, task in before.items():
                if run_id not in held and not task.done():
                    # another controller holds it now (our renewals were too late): it executes it
                    log.warning("lost the lease of plan run %s; stopping here", run_id)
                    task.cancel()
            for run in runs:
                self._spawn(run, SYSTEM_ACTOR)
            return sorted(held)

    def _spawn(self, run: PlanRun, actor: str) -> None:
        if run.id in self._tasks or run.done or self._closed:
            return
        task = asyncio.create_task(self._execute(run.id, actor), name=f"plan-run-{run.id}")
        self._tasks[run.id] = task
        task.add_done_callback(lambda _t: self._forget(run.id))

    def _forget(self, run_id: str) -> None:
        self._tasks.pop(run_id, None)

    def running(self) -> list[str]:
        """Ids of the runs executing in this process."""
        return sorted(self._tasks)

    # ------------------------------------------------------------------ validation

    async def validate(self, plan: Plan) -> Validation:
        """
        Check ``plan`` against the fleet; nothing is made.

        Graph and names (``check_plan``), each spec, each host hint, VM names not taken by VMs outside
        this plan (AlreadyExists VM_ALREADY_EXISTS), and room for every VM the apply would create, all
        at once (ResourceExhausted PLAN_CAPACITY_EXCEEDED naming each VM that does not fit), growth of
        VMs restarted with more vCPUs or memory included (on the host they run on).
        """
        plan = with_plan_labels(plan)
        plan_levels = check_plan(plan)
        current = await self._current(plan.name)
        plan = materialize_networks(plan, current, await self._subnets_of_other_plans(plan.name))
        plan = attach_volumes(plan)
        for v in plan.vms:
            validate_resolved(v.spec, prefix=f"vms.{v.service}.spec")
        hosts = await asyncio.to_thread(self._store.list_hosts)
        known = {h.name for h in hosts}
        for v in plan.vms:
            if v.host and v.host not in known:
                raise NotFound(
                    f"vms.{v.service}.host: host {v.host!r} is not registered "
                    f"(hosts: {', '.join(sorted(known)) or 'none'}): fix the hint or remove it",
                    reason="HOST_NOT_FOUND",
                    metadata={"field": f"vms.{v.service}.host", "host": v.host, "service": v.service},
                )
        existing = await self._existing(plan)
        check_subnet_changes(plan, current, existing)
        plan = self._pin_hosts(plan, existing, hosts, await self._volume_hosts(current))
        changes = plan_diff(current, plan, {name: vm.spec for name, vm in existing.items()})
        volumes = await self._volume_changes(plan)
        await self._check_capacity(plan, changes, existing, hosts, volumes)
        return Validation(plan, plan_levels, changes, current, volumes)

    async def _subnets_of_other_plans(self, name: str) -> list[ipaddress.IPv4Network]:
        plans = await asyncio.to_thread(self._store.list_plans)
        return [subnet for p in plans if p.name != name for subnet in plan_subnets(p)]

    async def _volume_hosts(self, current: Plan | None) -> dict[str, str]:
        """
        Where the applied revision's volumes live (volume -> host): their data stays there.

        Empty after a ``down --volumes`` that succeeded (the volumes are gone, they may go anywhere).
        """
        if current is None or not current.volumes:
            return {}
        latest = await asyncio.to_thread(self._store.latest_run, current.name)
        if (
            latest is not None
            and latest.action == DOWN
            and latest.options.get(WITH_VOLUMES)
            and latest.state is RunState.SUCCEEDED
        ):
            return {}
        return {v.name: v.host for v in current.volumes if v.host}

    def _pin_hosts(
        self, plan: Plan, existing: Mapping[str, Vm], hosts: Sequence[Host], volume_hosts: Mapping[str, str]
    ) -> Plan:
        """
        ``plan`` with the VMs that must share a host pinned to one, and each used volume's host recorded.

        A libvirt network lives on one host, and so does a volume: the VMs of one plan network, and the
        VMs attaching one volume (transitively: a group), go to one host. That is the host the group's
        volumes already live on (the applied revision's), else the one a VM of the group runs on, else
        the one a placement hint names, else the first host (most free memory first) where all of the
        group fit. Refused (InvalidArgument PLAN_INVALID) when hints name two hosts, or a host other than
        the one the group's VMs or volumes are on.
        """
        group: dict[str, str] = {v.service: v.service for v in plan.vms}

        def root(s: str) -> str:
            while group[s] != s:
                group[s] = group[group[s]]
                s = group[s]
            return s

        def join(members: Sequence[str]) -> None:
            for other in members[1:]:
                group[root(other)] = root(members[0])

        for net in plan.networks:
            join([v.service for v in plan.vms if v.network == net.name])
        users = volume_users(plan)
        for services in users.values():
            join(services)
        groups: dict[str, list[PlanVm]] = {}
        for v in plan.vms:
            if v.network or v.volumes:
                groups.setdefault(root(v.service), []).append(v)
        pinned: dict[str, str] = {}
        for members in groups.values():
            nets = sorted({v.network for v in members if v.network})
            vols = sorted({n for v in members for n in v.volumes})
            running = sorted({existing[v.spec.name].host for v in members if v.spec.name in existing})
            hinted = sorted({v.host for v in members if v.host})
            kept = sorted({volume_hosts[n] for n in vols if n in volume_hosts})
            what = " and ".join(
                part
                for part in (
                    f"network {', '.join(nets)}" if nets else "",
                    f"volume {', '.join(vols)}" if vols else "",
                )
                if part
            )
            if len(kept) > 1:
                raise invalid_field(
                    f"volumes.{vols[0]}",
                    f"the VMs of {what} live on one host, but their volumes are on {', '.join(kept)}: give the "
                    "services of volumes on different hosts no volume or network in common",
                    reason="PLAN_INVALID",
                )
            base = (kept or running or hinted or [""])[0]
            if len(hinted) > 1 or (base and hinted and hinted != [base]):
                where = next(v.service for v in members if v.host and v.host != (base or hinted[0]))
                held = f" (its volumes are on {kept[0]})" if kept else ""
                raise invalid_field(
                    f"vms.{where}.host",
                    f"the VMs of {what} live on one host{held}, but they are or would be on "
                    f"{', '.join(sorted({*kept, *running, *hinted}))}: give them one placement host (or none)",
                    reason="PLAN_INVALID",
                )
            host = base or self._host_for(members, hosts)
            pinned.update((v.service, host) for v in members)
        if not pinned and not plan.volumes:
            return plan
        # a volume's host is the controller's to say (a request's is ignored): its users', else the recorded one
        volumes = []
        for vol in plan.volumes:
            used_by = users.get(vol.name, [])
            host = pinned.get(used_by[0], "") if used_by else volume_hosts.get(vol.name, "")
            volumes.append(dataclasses.replace(vol, host=host))
        return dataclasses.replace(
            plan,
            vms=tuple(dataclasses.replace(v, host=pinned.get(v.service, v.host)) for v in plan.vms),
            volumes=tuple(volumes),
        )

    async def _volume_changes(self, plan: Plan) -> list[VolumeChange]:
        """What an apply would do to each volume a service uses, asking each volume's host what it has."""
        out: list[VolumeChange] = []
        listed: dict[str, list[Volume] | str] = {}
        for vol, services in volume_users(plan).items():
            if not services:
                continue
            v = next(x for x in plan.volumes if x.name == vol)
            agent = volume_name(plan.name, vol)
            change = VolumeChange(
                vol, agent, v.host, v.size_mib, v.shared, VolumeChangeKind.UNKNOWN, "", tuple(services)
            )
            if not v.host:
                out.append(dataclasses.replace(change, detail="no host: the plan does not fit"))
                continue
            if v.host not in listed:
                try:
                    listed[v.host] = await self._vms.list_volumes(v.host)
                except CloneboxError as err:
                    listed[v.host] = err.message
            found = listed[v.host]
            if isinstance(found, str):
                out.append(dataclasses.replace(change, detail=f"host {v.host} did not answer: {found}"))
                continue
            have = next((x for x in found if x.name == agent), None)
            if have is None:
                out.append(dataclasses.replace(change, kind=VolumeChangeKind.CREATE))
            elif have.size_mib == v.size_mib and have.shared == v.shared:
                out.append(dataclasses.replace(change, kind=VolumeChangeKind.KEEP))
            else:
                detail = f"it has size_mib {have.size_mib}, shared {str(have.shared).lower()}: neither can change"
                out.append(dataclasses.replace(change, kind=VolumeChangeKind.DIFFERENT, detail=detail))
        return out

    def _host_for(self, members: Sequence[PlanVm], hosts: Sequence[Host]) -> str:
        """The first host, most free memory first, with room for all of ``members`` ("" when none has)."""
        by_room = sorted(hosts, key=lambda h: (-(h.allocatable.memory_mib - h.allocated.memory_mib), h.name))
        for h in by_room:
            needs = [PlacementNeed(v.spec.name, v.spec.resources(), h.name) for v in members]
            if not self._placer([h], needs):
                return h.name
        return ""  # the capacity check says which VMs do not fit

    async def _existing(self, plan: Plan) -> dict[str, Vm]:
        """The plan's VMs that exist: by label, and by name (refusing a VM of the same name not of this plan)."""
        found: dict[str, Vm] = {}
        token = ""
        while True:
            page, token = await asyncio.to_thread(
                self._store.list_vms, None, None, {LABEL_PLAN: plan.name}, _PAGE, token
            )
            found.update((vm.name, vm) for vm in page)
            if not token:
                break
        for v in plan.vms:
            name = vm_name(plan.name, v.service)
            if name in found:
                continue
            try:
                other = await asyncio.to_thread(self._store.get_vm, name)
            except NotFound:
                continue
            raise AlreadyExists(
                f"VM {name} (service {v.service}) already exists and is not part of plan {plan.name} (it has no "
                f"label {LABEL_PLAN}={plan.name}): delete or rename that VM, or rename the service",
                reason="VM_ALREADY_EXISTS",
                metadata={"vm": name, "service": v.service, "host": other.host},
            )
        return found

    async def _current(self, name: str) -> Plan | None:
        try:
            return await asyncio.to_thread(self._store.get_plan, name)
        except NotFound:
            return None

    async def _check_capacity(
        self,
        plan: Plan,
        changes: Sequence[VmChange],
        existing: Mapping[str, Vm],
        hosts: Sequence[Host],
        volumes: Sequence[VolumeChange] = (),
    ) -> None:
        freed: dict[str, Resources] = {}
        needs: list[PlacementNeed] = []
        # the disk of each volume the apply would make counts on its host, like a VM's disks (checked here,
        # all or nothing; the run then holds it, ``_held_volumes``)
        for vol in volumes:
            if vol.kind is VolumeChangeKind.CREATE and vol.host:
                needs.append(PlacementNeed(f"volume {vol.volume}", Resources(0, 0, vol.size_mib), vol.host))
        for c in changes:
            if c.kind in (ChangeKind.CREATE, ChangeKind.REPLACE):
                v = plan.vm(c.service)
                needs.append(PlacementNeed(c.vm, v.spec.resources(), v.host))
            if c.kind is ChangeKind.RESTART and c.vm in existing:
                # a restart keeps the VM where it is: only what it grows by must fit there
                had, wants = existing[c.vm].spec.resources(), plan.vm(c.service).spec.resources()
                growth = Resources(max(0, wants.vcpus - had.vcpus), max(0, wants.memory_mib - had.memory_mib), 0)
                if growth != Resources():
                    needs.append(PlacementNeed(c.vm, growth, existing[c.vm].host))
            if c.kind is ChangeKind.REPLACE and c.vm in existing:
                # a replace deletes the old VM before it creates the new one: its room is free again
                old = existing[c.vm]
                freed[old.host] = freed.get(old.host, Resources()) + old.spec.resources()
        if not needs:
            return
        adjusted = [dataclasses.replace(h, allocated=h.allocated - freed.get(h.name, Resources())) for h in hosts]
        problems = self._placer(adjusted, needs)
        if not problems:
            return
        names = [vm for vm, _err in problems]
        detail = "; ".join(f"{vm}: {err.message}" for vm, err in problems)
        if all(isinstance(err, ResourceExhausted) for _vm, err in problems):
            raise ResourceExhausted(
                f"plan {plan.name} does not fit: {len(problems)} of the {len(needs)} VMs and volumes it would create "
                f"have no room ({detail}); nothing was created: free capacity, add hosts or make them smaller",
                reason="PLAN_CAPACITY_EXCEEDED",
                metadata={"plan": plan.name, "vms": ",".join(names)},
            )
        vm, err = next((vm, e) for vm, e in problems if not isinstance(e, ResourceExhausted))
        raise type(err)(f"{vm}: {err.message}; nothing was created", reason=err.reason, metadata=err.metadata)

    # ------------------------------------------------------------------ use cases

    async def diff(self, plan: Plan) -> tuple[list[VmChange], int, list[VolumeChange]]:
        """What applying ``plan`` would change, the revision it is compared to (0: none), and its volumes."""
        v = await self.validate(plan)
        return v.changes, v.current.revision if v.current is not None else 0, v.volumes

    async def apply(self, plan: Plan, allow_replace: bool, request_id: str, *, revert: bool = False) -> PlanRun:
        """
        Store ``plan`` as a revision (when it differs) and start a run that brings it up; the run as it started.

        Idempotent by ``request_id``. In-place and restart changes update their VMs (disks kept; see
        :meth:`VmManager.update`). Refused before anything is done: FailedPrecondition
        PLAN_REPLACE_NOT_ALLOWED (a VM must be re-created and ``allow_replace`` is off); Aborted
        PLAN_RUN_IN_PROGRESS; every error of :meth:`validate`.
        """
        if request_id:
            found = await self._run_by_request(plan.name, request_id, UP)
            if found is not None:
                return found
        v = await self.validate(plan)
        if not allow_replace:
            self._refuse_changes(v)
        await self._refuse_if_running(plan.name)
        stored, _added = await asyncio.to_thread(self._store.save_plan_revision, v.plan)
        rows = [VmStatus(c.service, c.vm, change=c.kind, step="pending") for c in v.changes]
        run = PlanRun(
            id=uuid.uuid4().hex[:16],
            plan=plan.name,
            revision=stored.revision,
            action=UP,
            state=RunState.RUNNING,
            vms=tuple(rows),
            request_id=request_id,
            options={ALLOW_REPLACE: allow_replace, **({REVERT: True} if revert else {})},
        )
        accepted = new_event(
            "plan.apply",
            f"plans/{plan.name}",
            Outcome.ACCEPTED,
            request_id=request_id,
            details={
                "run": run.id,
                "revision": stored.revision,
                "changes": _summary(v.changes),
                "allow_replace": allow_replace,
            },
        )
        # held as the run will create them: from the stored revision, which the run reads back (a re-apply
        # of the same content keeps that revision, whose specs may differ in what the digest leaves out)
        hold: list[tuple[VmSpec, str | None]] = []
        hold_replaced: list[tuple[VmSpec, str | None]] = []
        hold_volumes: list[tuple[str, str, int]] = []
        if not revert:
            stored_plan = await self._plan_of_revision(plan.name, stored.revision)
            hold, hold_replaced = _held_vms(stored_plan, v.changes), _held_successors(stored_plan, v.changes)
            hold_volumes = _held_volumes(v.volumes)
        created_run, created = await asyncio.to_thread(
            lambda: self._store.create_run(
                run,
                accepted,
                owner=self.owner,
                lease_seconds=self.settings.lease_seconds,
                hold=hold,
                hold_volumes=hold_volumes,
                hold_replaced=hold_replaced,
            )
        )
        if created:
            self._notify()
            # leased to us in the same transaction: execute it in the caller's context (audit actor)
            self._spawn(created_run, current_actor())
        return created_run

    def _refuse_changes(self, v: Validation) -> None:
        replace = [c for c in v.changes if c.kind is ChangeKind.REPLACE]
        if replace:
            listed = "; ".join(f"{c.vm} ({', '.join(c.fields)})" for c in replace)
            raise FailedPrecondition(
                f"applying plan {v.plan.name} would delete and re-create {len(replace)} VM(s), losing their disks: "
                f"{listed}; nothing was done: apply with --allow-replace to replace them",
                reason="PLAN_REPLACE_NOT_ALLOWED",
                metadata={"plan": v.plan.name, "vms": ",".join(c.vm for c in replace)},
            )

    async def _refuse_if_running(self, name: str) -> None:
        # checked before a revision is saved, so a refused apply does not leave a revision nobody applied
        # (the store checks again, atomically, when it creates the run)
        latest = await asyncio.to_thread(self._store.latest_run, name)
        if latest is not None and not latest.done:
            raise Aborted(
                f"plan {name} has a run in progress ({latest.action} {latest.id}, {latest.state.value}): wait for "
                "it to finish (clonebox plan show) and try again",
                reason="PLAN_RUN_IN_PROGRESS",
                metadata={"plan": name, "run": latest.id},
            )

    async def _run_by_request(self, plan: str, request_id: str, action: str) -> PlanRun | None:
        for run in await asyncio.to_thread(self._store.list_runs, plan, _REQUEST_LOOKBACK):
            if run.request_id == request_id:
                if run.action != action:
                    raise AlreadyExists(
                        f"request id {request_id!r} was already used for the {run.action} run {run.id} of plan "
                        f"{plan}; use a new request id for a different request",
                        reason="REQUEST_ID_REUSED",
                        metadata={"plan": plan, "run": run.id},
                    )
                return run
        return None

    async def destroy(self, name: str, with_snapshots: bool, request_id: str, with_volumes: bool = False) -> PlanRun:
        """
        Start a run that deletes the plan's VMs in reverse dependency order; the run as it started.

        ``with_volumes``: then the plan's volumes too, once every VM is gone (their data with them);
        without it they are kept for the next ``up``. Idempotent by ``request_id``; a plan with no VM
        left (and no volumes to delete) succeeds at once. NotFound PLAN_NOT_FOUND; Aborted
        PLAN_RUN_IN_PROGRESS.
        """
        check_dns_label("name", name)
        plan = await asyncio.to_thread(self._store.get_plan, name)
        if request_id:
            found = await self._run_by_request(name, request_id, DOWN)
            if found is not None:
                return found
        await self._refuse_if_running(name)
        existing: dict[str, Vm] = {}
        token = ""
        while True:
            page, token = await asyncio.to_thread(self._store.list_vms, None, None, {LABEL_PLAN: name}, _PAGE, token)
            existing.update((vm.name, vm) for vm in page)
            if not token:
                break
        rows: list[VmStatus] = []
        in_plan = {vm_name(name, v.service) for v in plan.vms}
        # VMs labelled for the plan that its current revision no longer names go first (nothing waits for them)
        for vm in sorted(existing.values(), key=lambda x: x.name):
            if vm.name not in in_plan:
                service = vm.spec.label_dict().get(LABEL_SERVICE) or vm.name
                rows.append(VmStatus(service, vm.name, change=ChangeKind.REMOVE, host=vm.host, step="pending"))
        for service in reversed([s for level in levels(plan) for s in level]):
            vm_ = existing.get(vm_name(name, service))
            if vm_ is not None:
                rows.append(VmStatus(service, vm_.name, change=ChangeKind.REMOVE, host=vm_.host, step="pending"))
        run = PlanRun(
            id=uuid.uuid4().hex[:16],
            plan=name,
            revision=plan.revision,
            action=DOWN,
            state=RunState.RUNNING if rows or with_volumes else RunState.SUCCEEDED,
            vms=tuple(rows),
            request_id=request_id,
            options={WITH_SNAPSHOTS: with_snapshots, **({WITH_VOLUMES: True} if with_volumes else {})},
        )
        accepted = new_event(
            "plan.destroy",
            f"plans/{name}",
            Outcome.ACCEPTED,
            request_id=request_id,
            details={
                "run": run.id,
                "revision": plan.revision,
                "vms": len(rows),
                "with_snapshots": with_snapshots,
                "with_volumes": with_volumes,
            },
        )
        created_run, created = await asyncio.to_thread(
            lambda: self._store.create_run(run, accepted, owner=self.owner, lease_seconds=self.settings.lease_seconds)
        )
        if not created:
            return created_run
        if not rows and not with_volumes:
            # nothing left to delete: done at once
            await asyncio.to_thread(self._store.mark_plan_destroyed, name)
            done = new_event(
                "plan.destroy",
                f"plans/{name}",
                Outcome.SUCCEEDED,
                request_id=request_id,
                details={"run": run.id, "vms": 0},
            )
            await asyncio.to_thread(self._store.append_audit, [done])
            await asyncio.to_thread(self._store.release_run, created_run.id, self.owner)
            self._notify()
            return created_run
        self._notify()
        self._spawn(created_run, current_actor())
        return created_run

    # ------------------------------------------------------------------ reads

    async def get(self, name: str) -> tuple[Plan, PlanRun | None]:
        """A plan's current revision and its latest run; NotFound PLAN_NOT_FOUND."""
        check_dns_label("name", name)
        plan = await asyncio.to_thread(self._store.get_plan, name)
        return plan, await asyncio.to_thread(self._store.latest_run, name)

    async def list_plans(self) -> list[tuple[Plan, PlanRun | None]]:
        """Every plan (destroyed ones left out) with its latest run, by name."""
        plans = await asyncio.to_thread(self._store.list_plans)
        return [(p, await asyncio.to_thread(self._store.latest_run, p.name)) for p in plans]

    async def runs(self, name: str, limit: int = 50) -> list[PlanRun]:
        """A plan's runs, newest first; NotFound PLAN_NOT_FOUND for an unknown plan."""
        check_dns_label("name", name)
        await asyncio.to_thread(self._store.get_plan, name)
        return await asyncio.to_thread(self._store.list_runs, name, limit)

    async def watch(self, run_id: str = "", plan: str = "", after_version: int = 0) -> AsyncIterator[PlanRun]:
        """
        The run each time its version grows past ``after_version``, ending after a done run.

        ``run_id`` empty: the latest run of ``plan`` (NotFound PLAN_RUN_NOT_FOUND when it has none).
        Runs executed here wake the watch at once; the store is re-read every ``watch_poll_seconds``
        too, so a run executed by another controller is followed as well.
        """
        if not run_id:
            check_dns_label("plan", plan)
            latest = await asyncio.to_thread(self._store.latest_run, plan)
            if latest is None:
                raise NotFound(
                    f"plan {plan!r} has no runs: apply it first (clonebox up)",
                    reason="PLAN_RUN_NOT_FOUND",
                    metadata={"plan": plan},
                )
            run_id = latest.id
        last = after_version
        loop = asyncio.get_running_loop()
        sent = -math.inf
        while True:
            changed, ended = self._changed, self._ended
            run = await asyncio.to_thread(self._store.get_run, run_id)
            if run.version > last:
                last = run.version
                yield run
                sent = loop.time()
            if run.done:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), timeout=self.settings.watch_poll_seconds)
            # the versions of a burst go out as one, except that the end of a run is not held back
            pause = sent + self.settings.watch_min_interval_seconds - loop.time()
            if pause > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ended.wait(), timeout=pause)

    def _notify(self, ended: bool = False) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        if ended:
            done, self._ended = self._ended, asyncio.Event()
            done.set()

    # ------------------------------------------------------------------ execution

    async def _execute(self, run_id: str, actor: str) -> None:
        for attempt in range(1, _MAX_ATTEMPTS + 1):
            try:
                run = await asyncio.to_thread(self._store.get_run, run_id)
                if run.done:
                    return
                plan = await self._plan_of(run)
                execution = _Execution(self, run, plan, actor)
                await execution.run()
                await self._revert_if_asked(run_id, plan)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("plan run %s crashed (attempt %d of %d)", run_id, attempt, _MAX_ATTEMPTS)
                if attempt == _MAX_ATTEMPTS:
                    await self._crashed(run_id, actor, exc)
                    return
                await asyncio.sleep(self.settings.poll_seconds * 10)

    async def _revert_if_asked(self, run_id: str, plan: Plan) -> None:
        """
        After a failed apply of a plan with ``auto_revert``: apply the revision before it again (Nomad's auto_revert).

        The rollback has removed what the failed run made; the revert run brings back what the earlier
        revision had (replaces allowed: that is what a revert is). Idempotent by a request id derived from
        the failed run. Not for a first revision, a ``down``, or a run that is itself a revert. A
        controller that dies between the two runs leaves it to the next controller's start
        (:meth:`revert_missed`).
        """
        run = await asyncio.to_thread(self._store.get_run, run_id)
        failed = run.state in (RunState.FAILED, RunState.ROLLED_BACK)
        if run.action != UP or not failed or not plan.update.auto_revert or run.options.get(REVERT) or run.revision < 2:
            return
        target = run.revision - 1
        try:
            earlier = await asyncio.to_thread(self._store.get_plan, run.plan, target)
            revert = await self.apply(earlier, True, f"{_REVERT_REQUEST}{run.id}", revert=True)
        except CloneboxError as err:
            log.warning("plan %s: auto_revert to revision %d after run %s failed: %s", run.plan, target, run.id, err)
            return
        log.info("plan %s: run %s failed; revert run %s re-applies revision %d", run.plan, run.id, revert.id, target)

    async def _crashed(self, run_id: str, actor: str, exc: Exception) -> None:
        try:
            run = await asyncio.to_thread(self._store.get_run, run_id)
            await asyncio.to_thread(self._store.release_held, _unmade(run.vms), run.id)
            message = f"the plan run crashed: {exc}" if isinstance(exc, CloneboxError) else "the plan run crashed"
            event = _end_event(run, Outcome.FAILED, message, actor, "INTERNAL")
            await asyncio.to_thread(
                lambda: self._store.update_run(run_id, state=RunState.FAILED, error=message, audit=event)
            )
            self._notify(ended=True)
        except Exception:
            log.exception("could not record the crash of plan run %s", run_id)

    async def _plan_of(self, run: PlanRun) -> Plan:
        return await self._plan_of_revision(run.plan, run.revision)

    async def _plan_of_revision(self, name: str, revision: int) -> Plan:
        # the stored revision keeps secret fields whole: the same plan in every controller process
        return await asyncio.to_thread(self._store.get_plan, name, revision)

    # ---- steps the execution uses (kept here: they talk to the store and the VM use cases)

    async def _wait_operation(self, op: Operation) -> Operation:
        if op.done:
            return op
        finished = await self._vms.finished_here(op.id)
        if finished is not None:
            return finished
        return await wait_done(self._store, self._changes, op.id, poll_seconds=self.settings.poll_seconds)


def _held_vms(plan: Plan, changes: Iterable[VmChange]) -> list[tuple[VmSpec, str | None]]:
    """
    The VMs an apply reserves room for at once, in the run's transaction: every VM it creates new.

    All or nothing then holds up to the last level: a VM created meanwhile outside the plan cannot take
    the room of one the run has not reached yet. A VM that attaches volumes is held on the host its
    group is pinned to (``_pin_hosts``), where the run makes its volumes before it (their disk held
    too, ``_held_volumes``); without a pinned
    host (there is always one once the capacity check passed) it is left out, since placing it would
    look for volumes the run has not made yet. Left out too: a replace (its room is the old VM's,
    ``_held_successors``). A revert run re-makes VMs from backups as it goes and holds none.
    """
    return [
        (pv.spec, pv.host or None)
        for c in changes
        if c.kind is ChangeKind.CREATE
        for pv in [plan.vm(c.service)]
        if pv.host or not pv.volumes
    ]


def _held_successors(plan: Plan, changes: Iterable[VmChange]) -> list[tuple[VmSpec, str | None]]:
    """
    The VMs an apply replaces, as their successors: ``(spec, host or None)``.

    The store grows the old VM's room on its host to what the successor needs too and keeps it, held,
    when the run deletes the old VM, so the successor's create finds its room (``Store.create_run``).
    """
    return [(pv.spec, pv.host or None) for c in changes if c.kind is ChangeKind.REPLACE for pv in [plan.vm(c.service)]]


def _held_volumes(volumes: Iterable[VolumeChange]) -> list[tuple[str, str, int]]:
    """
    The volumes an apply reserves disk for at once, in the run's transaction: every one it will make.

    ``(host, agent volume, size_mib)``; the run's create of each takes its reservation over
    (``create_volume(..., holder=run id)``), and the run frees what it never made when it ends.
    """
    return [(v.host, v.volume, v.size_mib) for v in volumes if v.kind is VolumeChangeKind.CREATE and v.host]


def _unmade(rows: Iterable[VmStatus]) -> list[str]:
    """The VMs a run was to create and has not: the ones it may still hold room for (``_held_vms``)."""
    return [r.vm for r in rows if r.change is ChangeKind.CREATE and not r.created]


def _summary(changes: Iterable[VmChange]) -> str:
    counts: dict[str, int] = {}
    for c in changes:
        counts[c.kind.value] = counts.get(c.kind.value, 0) + 1
    return ",".join(f"{k}={n}" for k, n in sorted(counts.items()))


def _end_event(run: PlanRun, outcome: Outcome, error: str, actor: str, reason: str = "") -> AuditEvent:
    action = "plan.apply" if run.action == UP else "plan.destroy"
    details: dict[str, object] = {"run": run.id, "revision": run.revision}
    if error:
        details["error"] = error
    return new_event(
        action,
        f"plans/{run.plan}",
        outcome,
        request_id=run.request_id,
        reason=reason,
        details=details,
        actor=actor,
    )


def _let_go(early: _Early) -> None:
    """
    The engine stops (closing, or its lease lost) with this create accepted: it goes on without its slot.

    As a restarted controller resumes it, without its gate. The engine that resumes the run finds the
    operation by its request id and waits for it; an operation left waiting would wait for a gate no
    engine opens.
    """
    early.gate.set_result(None)


def _log_unawaited_accept(task: asyncio.Task[tuple[Operation, Vm | None]]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.debug("a create accepted ahead of its slot failed: %s", task.exception())


def _log_failed_flush(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("plan run rows not written yet (the next write takes them): %s", task.exception())


@dataclass(frozen=True)
class _Early:
    """A create accepted while its service waits for a slot: the agent is asked once ``gate`` is done."""

    gate: asyncio.Future[None]
    accepted: asyncio.Task[tuple[Operation, Vm | None]]


class _StepFailed(Exception):
    """One VM of a run failed: why, and the health check that failed it (if one did)."""

    def __init__(self, message: str, probe: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.probe = probe


#: operation failures that mean "the host did not answer", worth another try
_UNREACHABLE = frozenset({"HOST_UNREACHABLE", "AGENT_UNREACHABLE"})


def _op_failed(op: Operation, what: str) -> _StepFailed:
    return _StepFailed(f"{what} failed: {op.error_message or op.error_reason or 'unknown error'}")


_CONDITION_WORDS = {
    Condition.STARTED: "to start",
    Condition.HEALTHY: "to be healthy",
    Condition.COMPLETED: "to complete",
}


class _Execution:
    """One run being executed: the rows in memory, written through to the store on every change."""

    def __init__(self, engine: PlanEngine, run: PlanRun, plan: Plan, actor: str) -> None:
        self.e = engine
        self.store = engine._store
        self.run_ = run
        self.plan = plan
        self.actor = actor
        self.status: dict[str, VmStatus] = {s.service: s for s in run.vms}
        self.order = [s.service for s in run.vms]
        self.specs = {v.service: v for v in plan.vms}
        #: conditions each service reached (dependents waiting for one of them may start)
        self.reached: dict[str, set[Condition]] = {s: set() for s in self.order}
        #: (service, error, probe) of the first VM that failed
        self.failure: tuple[str, str, str] | None = None
        self.sem = asyncio.Semaphore(max(1, plan.update.max_parallel))
        #: creates accepted while they wait for a slot (``_slot``): at most one per slot
        self.ahead = asyncio.Semaphore(max(1, plan.update.max_parallel))
        self.changed = asyncio.Event()
        #: rows changed and not yet written, and the lock that makes writes one at a time
        self.pending: dict[str, VmStatus] = {}
        self.write_lock = asyncio.Lock()
        #: the write started by a save that does not wait for it (``_save(..., wait=False)``)
        self.flusher: asyncio.Task[None] | None = None
        #: deletes have their own slots: a replace deletes while it holds a create slot
        self.delete_sem = asyncio.Semaphore(max(1, plan.update.max_parallel))
        #: the VM as the end of this run's create of it recorded it, for the first look at its conditions
        self.created: dict[str, Vm] = {}
        #: who waits for whom, and how: service -> [(dependent, condition)]
        self.users: dict[str, list[tuple[str, Condition]]] = {}
        for v in plan.vms:
            for d in v.depends_on:
                self.users.setdefault(d.service, []).append((v.service, d.condition))

    # ---- bookkeeping

    def _poke(self) -> None:
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()

    async def _save(self, service: str, wait: bool = True, **changes: object) -> None:
        """
        Change one VM's row; returns once it is stored (so nothing acts on a change a watcher cannot see).

        ``wait=False`` for a row that only reports progress: it is written in the background, with the
        rows changed meanwhile, and every later write (the run's end included) takes it along. A row
        lost to a controller crash before that write is no loss: a resumed run re-makes a PENDING or
        CREATING service through its request ids, which find what the lost write would have said.
        """
        row = dataclasses.replace(self.status[service], update_time=_now(), **changes)  # type: ignore[arg-type]
        self.status[service] = row
        self.pending[service] = row
        if wait:
            await self._write()
        elif self.flusher is None or self.flusher.done():
            self.flusher = asyncio.create_task(self._flush(), name=f"plan-run-{self.run_.id}-rows")
            self.flusher.add_done_callback(_log_failed_flush)

    async def _flush(self) -> None:
        # rows saved while a write is in flight go in the next one, not when some later save comes
        while self.pending:
            await self._write()

    async def _write(
        self, state: RunState | None = None, error: str | None = None, audit: AuditEvent | None = None
    ) -> None:
        # one write at a time per run; rows changed while one is in flight go together in the next, so
        # 50 VMs changing at once cost a few transactions, not 50 (the store is shared with heartbeats)
        async with self.write_lock:
            if not self.pending and state is None:
                return  # an earlier write took this caller's rows
            rows, self.pending = list(self.pending.values()), {}
            try:
                await asyncio.to_thread(
                    lambda: self.store.update_run(self.run_.id, state=state, error=error, vms=rows, audit=audit)
                )
            except BaseException:
                for r in rows:  # not written: the next write takes them, unless a newer row replaced one
                    self.pending.setdefault(r.service, r)
                raise
        self.e._notify(ended=state is not None and state.done)

    async def _finish_run(self, state: RunState, error: str = "") -> None:
        outcome = Outcome.SUCCEEDED if state is RunState.SUCCEEDED else Outcome.FAILED
        event = _end_event(self.run_, outcome, error, self.actor, "" if outcome is Outcome.SUCCEEDED else "PLAN_FAILED")
        await self._write(state, error, event)

    async def _set_state(self, state: RunState, error: str) -> None:
        await self._write(state, error)

    def _needs(self, service: str) -> set[Condition]:
        """The conditions this service must reach: what its dependents wait for, or running (and healthy)."""
        needed = {c for _user, c in self.users.get(service, ())}
        if needed:
            return needed
        spec = self.specs[service].spec
        return {Condition.STARTED, Condition.HEALTHY} if spec.health_checks else {Condition.STARTED}

    def _failure_text(self) -> str:
        if self.failure is None:
            return ""
        service, error, probe = self.failure
        name = self.status[service].vm
        where = f"{name} (health check {probe})" if probe else name
        return f"{where}: {error}"

    # ---- the run

    async def run(self) -> None:
        """Execute (or resume) the run to its end."""
        if self.run_.action == DOWN:
            await self._down()
            return
        if self.run_.state is RunState.ROLLING_BACK:
            await self._rollback()
            return
        up = [s for s in self.order if self.status[s].change is not ChangeKind.REMOVE and s in self.specs]
        removals = [s for s in self.order if self.status[s].change is ChangeKind.REMOVE]
        for s in up:
            row = self.status[s]
            if row.state is VmRunState.READY:
                self.reached[s] = set(Condition)
            elif row.state is VmRunState.FAILED and self.failure is None:
                # failed before a controller restart: the run is failing
                self.failure = (s, row.error, row.failed_probe)
        todo = [s for s in up if self.status[s].state not in (VmRunState.READY, VmRunState.SKIPPED, VmRunState.FAILED)]
        await asyncio.gather(*(self._service(s) for s in todo))
        if self.failure is None:
            # services the plan dropped, one by one in the stored order (reverse dependency order of the
            # revision they came from, whose graph this run does not have)
            for s in removals:
                done = self.status[s].state is VmRunState.DELETED
                if not done and not await self._delete(s, "remove", with_snapshots=False):
                    break
        if self.failure is None:
            await self._release_unmade()  # a volume no service of this run went on to make
            await self._finish_run(RunState.SUCCEEDED)
            return
        if self.plan.on_failure is FailurePolicy.ROLLBACK:
            await self._rollback()
        else:
            await self._release_unmade()
            await self._finish_run(RunState.FAILED, f"{self._failure_text()}; left as it is (on_failure: leave)")

    async def _fail(self, service: str, error: str, probe: str = "") -> None:
        await self._save(service, state=VmRunState.FAILED, error=error, failed_probe=probe, step="failed")
        if self.failure is None:
            self.failure = (service, error, probe)
        self._poke()

    async def _service(self, service: str) -> None:
        try:
            row = self.status[service]
            if row.state is VmRunState.PENDING and not await self._wait_dependencies(service):
                return
            if self.status[service].state in (VmRunState.PENDING, VmRunState.CREATING):
                await self._make(service)
            if self.failure is not None:
                if self.status[service].state is not VmRunState.FAILED:
                    # made, but the run is failing: stop waiting for it (a rollback deletes it anyway)
                    await self._save(service, step=f"not waited for: {self.status[self.failure[0]].vm} failed")
                return
            await self._await_goal(service)
        except _StepFailed as failed:
            await self._fail(service, failed.message, failed.probe)
        except CloneboxError as err:
            await self._fail(service, err.message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("plan run %s: service %s crashed", self.run_.id, service)
            await self._fail(service, f"internal error: {type(exc).__name__}")

    async def _wait_dependencies(self, service: str) -> bool:
        deps = self.specs[service].depends_on
        while True:
            changed = self.changed
            if self.failure is not None:
                failed = self.failure[0]
                if failed in _upstream(self.plan, service):
                    step = f"skipped: depends on {self.status[failed].vm}, which failed"
                else:
                    step = f"not started: {self.status[failed].vm} failed"
                await self._save(service, state=VmRunState.SKIPPED, step=step)
                return False
            unmet = [d for d in deps if d.condition not in self.reached[d.service]]
            if not unmet:
                return True
            step = "waiting for " + ", ".join(f"{d.service} {_CONDITION_WORDS[d.condition]}" for d in unmet)
            if step != self.status[service].step:
                await self._save(service, step=step)
                continue  # the save took a moment: look again before sleeping
            await changed.wait()

    async def _make(self, service: str) -> None:
        """Create, replace or check one VM (creates and replaces bounded by max_parallel)."""
        change = self.status[service].change
        if change is ChangeKind.NONE:
            await self._ensure_running(service)
            return
        early = await self._slot(service)
        try:
            if self.failure is not None and early is not None:
                await self._abort_early(service, early)
                return
            if self.failure is not None and self.status[service].state is VmRunState.PENDING:
                await self._save(service, state=VmRunState.SKIPPED, step=f"not started: {self._failed_vm()} failed")
                return
            if change in (ChangeKind.IN_PLACE, ChangeKind.RESTART):
                await self._update(service)
                return
            if change is ChangeKind.REPLACE:
                await self._back_up(service)
                await self._save(service, state=VmRunState.CREATING, step="deleting the old VM (replace)")
                if not await self._delete_vm(service, "replace-delete", with_snapshots=False):
                    raise _StepFailed("deleting the old VM failed")
            await self._create(service, early)
        finally:
            self.sem.release()
            if early is not None and not early.gate.done():
                _let_go(early)

    async def _slot(self, service: str) -> _Early | None:
        """
        Wait for a create slot (held on return); a new VM's create is accepted meanwhile when it can be.

        Accepting (the reservation's transaction) takes a slot's chain a while; done while an earlier
        VM's create runs, the slot goes straight to the agent call. At most one create per slot waits
        accepted (``ahead``), the next in line: a controller restarted meanwhile resumes those at once,
        so a run may exceed ``max_parallel`` by that many then.
        """
        if not self.sem.locked() or not self._accepts_early(service):
            await self.sem.acquire()
            return None
        slot = asyncio.ensure_future(self.sem.acquire())
        permit = asyncio.ensure_future(self.ahead.acquire())
        early: _Early | None = None
        try:
            await asyncio.wait({slot, permit}, return_when=asyncio.FIRST_COMPLETED)
            # the slot first: accept in it, as any create; a run failing meanwhile: accept nothing more
            if not slot.done() and self.failure is None:
                early = self._accept_early(service)
            await slot
            return early
        except BaseException:
            if slot.done() and not slot.cancelled():
                self.sem.release()
            slot.cancel()
            if early is not None:
                _let_go(early)
            raise
        finally:
            if permit.done() and not permit.cancelled():
                self.ahead.release()
            permit.cancel()

    def _accepts_early(self, service: str) -> bool:
        """A plain new VM: no volumes to make first, no backup to restore, no old VM to delete."""
        pv = self.specs[service]
        return (
            self.status[service].change is ChangeKind.CREATE
            and not pv.volumes
            and self._restore_source(service) is None
        )

    def _accept_early(self, service: str) -> _Early:
        gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        pv = self.specs[service]

        async def accept() -> tuple[Operation, Vm | None]:
            await self._save(service, wait=False, state=VmRunState.CREATING, step="accepted: waiting for a free slot")
            request_id = run_request_id(self.run_.id, service, "create")
            op, vm = await self.e._vms.create(pv.spec, pv.host or None, request_id, gate=gate)
            if vm is not None:
                await self._save(service, wait=False, created=True, host=vm.host)
            return op, vm

        task = asyncio.create_task(accept(), name=f"plan-accept-{self.status[service].vm}")
        # its error is the create's, raised where the slot awaits it; unawaited (the run stopped), it is only logged
        task.add_done_callback(_log_unawaited_accept)
        return _Early(gate, task)

    async def _abort_early(self, service: str, early: _Early) -> None:
        """
        The run is failing: the accepted create ends without asking the agent, and the service is skipped.

        Its operation may be one a stopped engine let go (``_let_go``), or a restarted controller resumed
        without its gate: when that one made the VM, the row says so, and the rollback deletes it.
        """
        step = f"not started: {self._failed_vm()} failed"
        early.gate.set_exception(Aborted(step, reason="PLAN_STOPPED"))
        early.gate.exception()  # taken note of here: the gate of an operation resumed without it has no waiter
        made = False
        with contextlib.suppress(CloneboxError):
            op, _vm = await early.accepted
            made = not (await self.e._wait_operation(op)).error_code
        if made:
            await self._save(service, state=VmRunState.SKIPPED, step=f"made, but {self._failed_vm()} failed")
        else:
            await self._save(service, state=VmRunState.SKIPPED, created=False, host="", step=step)

    def backup_path(self, service: str) -> Path | None:
        """Where this run keeps the export of ``service``'s VM before replacing it (None: no backups)."""
        if self.e._snapshots is None or not self.e.settings.backup_dir:
            return None
        return self._backup_of(service, self.run_.id)

    def _backup_of(self, service: str, run_id: str) -> Path | None:
        if self.e._snapshots is None or not self.e.settings.backup_dir:
            return None
        name = self.status[service].vm
        return Path(self.e.settings.backup_dir) / self.plan.name / name / f"{run_id}{BACKUP_SUFFIX}"

    def _restore_source(self, service: str) -> Path | None:
        """
        In a revert run, the backup the reverted run took of ``service``'s VM before replacing it.

        That file is the VM as the revision being re-applied had it, disks and all: a revert re-makes
        the VM from it rather than from scratch. None: not a revert, or no such backup.
        """
        if not self.run_.options.get(REVERT) or not self.run_.request_id.startswith(_REVERT_REQUEST):
            return None
        path = self._backup_of(service, self.run_.request_id.removeprefix(_REVERT_REQUEST))
        return path if path is not None and path.is_file() else None

    async def _restore(self, service: str, path: Path) -> None:
        """Make ``service``'s VM by importing ``path`` (a revert's backup), then start it."""
        snapshots = self.e._snapshots
        assert snapshots is not None  # _restore_source found a backup, which needs the manager
        pv = self.specs[service]
        name = self.status[service].vm
        await self._save(service, state=VmRunState.CREATING, step=f"restoring from {path}")
        try:
            with await asyncio.to_thread(path.open, "rb") as f:
                parts = await asyncio.to_thread(read_archive, f)
                # next(parts) would raise StopIteration, which an asyncio future cannot carry
                first = await asyncio.to_thread(next, parts, None)
                if first is None:
                    raise InvalidArgument("the archive holds no parts", reason="ARCHIVE_TRUNCATED")
                spec = archive_vm_spec(first)
                if spec.name != name:
                    raise FailedPrecondition(
                        f"the backup holds VM {spec.name}, not {name}", reason="PLAN_BACKUP_MISMATCH"
                    )

                async def rest() -> AsyncIterator[ImagePart]:
                    while (part := await asyncio.to_thread(next, parts, None)) is not None:
                        yield part

                header = ImportHeader(spec, pv.host, run_request_id(self.run_.id, service, "restore"))
                vm = await snapshots.import_(header, first, rest())
        except (CloneboxError, OSError) as err:
            why = err.message if isinstance(err, CloneboxError) else str(err)
            raise _StepFailed(f"restoring {name} from its backup {path} failed ({why}); the file is kept") from None
        await self._save(service, created=True, host=vm.host, step="restored; starting")
        op = await self.e._vms.start(name, run_request_id(self.run_.id, service, "restore-start"))
        done = await self.e._wait_operation(op)
        if done.error_code:
            raise _op_failed(done, f"starting the restored {name}")
        await self._save(service, state=VmRunState.WAITING, step="restored from backup")

    async def _ensure_volumes(self, service: str) -> None:
        """
        Make each volume ``service`` attaches on its host, unless it is there already (its data is kept).

        Idempotent (the agent returns an equal volume as it is; each call has a request id of this run);
        a volume there with another size or sharing fails the step with the agent's reason.
        """
        pv = self.specs[service]
        declared = {v.name: v for v in self.plan.volumes}
        for name in pv.volumes:
            vol = declared[name]
            agent = volume_name(self.plan.name, name)
            host = vol.host or pv.host
            await self._save(service, state=VmRunState.CREATING, step=f"making volume {agent} on host {host}")
            labels = {LABEL_PLAN: self.plan.name, LABEL_VOLUME: name}
            request_id = run_request_id(self.run_.id, service, f"volume-{name}")
            try:
                await self.e._vms.create_volume(
                    host, agent, vol.size_mib, vol.shared, labels, request_id, holder=self.run_.id
                )
            except CloneboxError as err:
                if err.reason == "VOLUME_EXISTS_DIFFERENT":
                    raise _StepFailed(
                        f"volume {agent} on host {host}: {err.message}; changing a volume's size or sharing is not "
                        f"supported: keep volumes.{name} as it was, or remove the volume and its data first "
                        f"('clonebox down {self.plan.name} --volumes', then up)"
                    ) from None
                raise _StepFailed(f"making volume {agent} on host {host} failed: {err.message}") from None

    async def _back_up(self, service: str) -> None:
        """
        Export the VM a replace is about to delete to ``backup_path`` (snapshot, export, drop the snapshot).

        Any failure fails the VM's step with the old VM as it was (its snapshot dropped again). A
        resumed run whose file is there does not take it again. The file holds the disks in clear: it
        is the controller's (0600, in 0700 folders), like its database. Of a VM that attaches volumes it
        holds the VM's own disks (the agent's default snapshot of such a VM is disk-only and leaves the
        volumes out); the volumes keep their data, and the new VM attaches them.
        """
        path = self.backup_path(service)
        snapshots = self.e._snapshots
        if path is None or snapshots is None:
            return
        name = self.status[service].vm
        snap = f"pre-replace-{self.run_.id}"

        async def drop_snapshot() -> None:
            with contextlib.suppress(NotFound):
                await snapshots.delete(
                    name, snap, children=False, request_id=run_request_id(self.run_.id, service, "backup-drop")
                )

        if not path.exists():
            await self._save(service, state=VmRunState.CREATING, step="snapshot before replace")
            try:
                await asyncio.to_thread(_private_dirs, path.parent, Path(self.e.settings.backup_dir))
                await snapshots.create(
                    name,
                    snap,
                    description=f"taken by plan {self.plan.name} run {self.run_.id} before replacing the VM",
                    tags={LABEL_PLAN: self.plan.name},
                    kind=None,
                    quiesce=False,
                    request_id=run_request_id(self.run_.id, service, "backup-snapshot"),
                )
                await self._save(service, step=f"exporting the old VM to {path}")
                summary = await _write_export(snapshots.export(name, snap), path)
            except (CloneboxError, OSError) as err:
                why = err.message if isinstance(err, CloneboxError) else f"{err.strerror or err}: {err.filename}"
                with contextlib.suppress(CloneboxError):
                    await drop_snapshot()
                raise _StepFailed(f"the backup before replacing {name} failed ({why}); the old VM is kept") from None
            event = new_event(
                "plan.backup",
                f"plans/{self.plan.name}",
                Outcome.SUCCEEDED,
                details={"run": self.run_.id, "vm": name, "file": str(path), "bytes": summary.file_bytes},
                actor=self.actor,
            )
            await asyncio.to_thread(self.store.append_audit, [event])
            pruned = await asyncio.to_thread(_prune_backups, path.parent, self.e.settings.backup_keep)
            if pruned:
                log.info("plan %s: deleted older backups of %s: %s", self.plan.name, name, ", ".join(map(str, pruned)))
        # the VM goes now; its snapshot would stop the delete (VM_HAS_SNAPSHOTS), and the file has it all
        await drop_snapshot()

    def _failed_vm(self) -> str:
        return self.status[self.failure[0]].vm if self.failure is not None else ""

    async def _create(self, service: str, early: _Early | None = None) -> None:
        backup = self._restore_source(service)
        if backup is not None:
            await self._restore(service, backup)
            return
        pv = self.specs[service]
        name = self.status[service].vm
        if early is not None:
            early.gate.set_result(None)
            op, vm = await early.accepted
        else:
            await self._ensure_volumes(service)
            await self._save(service, wait=False, state=VmRunState.CREATING, step="creating")
            request_id = run_request_id(self.run_.id, service, "create")
            op, vm = await self.e._vms.create(pv.spec, pv.host or None, request_id)
        # None: a resumed run's create that already failed and released its reservation; the operation says why
        host = vm.host if vm is not None else ""
        step = f"creating on host {host}" if host else "creating"
        await self._save(service, wait=False, created=True, host=host, step=step)
        done = await self.e._wait_operation(op)
        if done.error_code:
            raise _op_failed(done, f"creating {name}")
        if done.result_vm is not None:
            self.created[service] = done.result_vm
        await self._save(service, wait=False, state=VmRunState.WAITING, step="created")

    async def _update(self, service: str) -> None:
        """Change an existing VM without re-creating it (labels, health checks; vCPUs, memory by a restart)."""
        pv = self.specs[service]
        name = self.status[service].vm
        restart = self.status[service].change is ChangeKind.RESTART
        step = "restarting with new resources" if restart else "updating"
        await self._save(service, state=VmRunState.CREATING, step=step)
        op, _kind, _fields = await self.e._vms.update(pv.spec, run_request_id(self.run_.id, service, "update"))
        if op is None:  # only a dry run has none
            raise _StepFailed(f"updating {name}: no operation was recorded")
        host = ""
        with contextlib.suppress(NotFound):
            host = (await asyncio.to_thread(self.store.get_vm, name)).host
        await self._save(service, host=host)
        done = await self.e._wait_operation(op)
        if done.error_code:
            raise _op_failed(done, f"updating {name}")
        await self._save(service, state=VmRunState.WAITING, step="restarted" if restart else "updated")

    async def _restarted_at(self, service: str) -> datetime | None:
        """When this run's restart of ``service`` began (None: the run did not restart it)."""
        if self.status[service].change is not ChangeKind.RESTART:
            return None
        op = await asyncio.to_thread(
            self.store.find_operation_by_request_id, run_request_id(self.run_.id, service, "update")
        )
        return op.create_time if op is not None else None

    async def _ensure_running(self, service: str) -> None:
        name = self.status[service].vm
        try:
            vm = await asyncio.to_thread(self.store.get_vm, name)
        except NotFound:
            raise _StepFailed(f"VM {name} no longer exists: apply the plan again to create it") from None
        needs = self._needs(service)
        stopped = vm.state in (VmState.STOPPED, VmState.CRASHED)
        if stopped and needs != {Condition.COMPLETED}:
            async with self.sem:
                await self._save(service, state=VmRunState.CREATING, step="starting", host=vm.host)
                op = await self.e._vms.start(name, run_request_id(self.run_.id, service, "start"))
                done = await self.e._wait_operation(op)
                if done.error_code:
                    raise _op_failed(done, f"starting {name}")
        await self._save(service, state=VmRunState.WAITING, step="checking", host=vm.host)

    async def _await_goal(self, service: str) -> None:
        """Wait until the VM meets every condition it must (see ``_needs``), or fail it at the deadline."""
        row = self.status[service]
        name = row.vm
        needs = self._needs(service)
        update = self.plan.update
        loop = asyncio.get_running_loop()
        deadline = loop.time() + update.healthy_deadline_ms / 1000
        healthy_since: float | None = None
        # a VM this run did not create may have run and stopped before (a finished one-shot job)
        ran = row.change in (ChangeKind.NONE, ChangeKind.IN_PLACE, ChangeKind.RESTART)
        # after a restart, health reported before it is stale: only a state reached since counts
        restarted_at = await self._restarted_at(service)
        created = self.created.pop(service, None)
        if created is not None and created.state is VmState.RUNNING and needs <= {Condition.STARTED}:
            # the create's own answer already shows it started: no read of the VM on the way to its dependents
            await self._ready(service, {Condition.STARTED}, created.host)
            return
        health: VmHealth | None = None
        while True:
            # watch before reading: a change committed in between still wakes the wait below
            with self.e._changes.watch(vm_key(name), health_key(name)) as change:
                try:
                    vm = await asyncio.to_thread(self.store.get_vm, name)
                except NotFound:
                    raise _StepFailed(f"VM {name} disappeared while the plan waited for it") from None
                reached: set[Condition] = set()
                if vm.state is VmState.RUNNING:
                    ran = True
                    reached.add(Condition.STARTED)
                if ran and vm.state is VmState.STOPPED:
                    reached |= {Condition.STARTED, Condition.COMPLETED}
                step = ""
                if Condition.HEALTHY in needs and Condition.HEALTHY not in self.reached[service]:
                    try:
                        health = await self.e._health.get(name)
                    except NotFound:
                        health = None
                    fresh = restarted_at is None or (health is not None and _since_after(health, restarted_at))
                    healthy = health is not None and health.state is HealthState.HEALTHY
                    if healthy and vm.state is VmState.RUNNING and fresh:
                        healthy_since = healthy_since if healthy_since is not None else time.monotonic()
                        held = (time.monotonic() - healthy_since) * 1000
                        if held >= update.min_healthy_time_ms:
                            reached.add(Condition.HEALTHY)
                        else:
                            step = f"healthy, must stay so for {_seconds(update.min_healthy_time_ms)}"
                    else:
                        healthy_since = None
                        step = _health_step(health, self.specs[service].spec)
                new = reached - self.reached[service]
                if needs <= self.reached[service] | reached:
                    await self._ready(service, reached, vm.host)
                    return
                if new:
                    self.reached[service] |= new
                    self._poke()
                if vm.state is VmState.FAILED:
                    # only FAILED is final: a stopped or crashed VM may be restarted by its health actions
                    why = f": {vm.state_reason}" if vm.state_reason else ""
                    raise _StepFailed(f"VM {name} failed{why}")
                if loop.time() >= deadline:
                    raise self._deadline_error(vm, needs - self.reached[service], health, update.healthy_deadline_ms)
                if not step:
                    missing = needs - self.reached[service]
                    step = "waiting for it " + " and ".join(_CONDITION_WORDS[c] for c in sorted(missing, key=_order))
                if step != self.status[service].step or self.status[service].state is not VmRunState.WAITING:
                    await self._save(service, state=VmRunState.WAITING, step=step, host=vm.host)
                await change.wait(self._pause(deadline, healthy_since, update.min_healthy_time_ms))

    async def _ready(self, service: str, reached: set[Condition], host: str) -> None:
        # READY is stored before dependents are released: a watcher never sees one start early
        await self._save(service, state=VmRunState.READY, step="ready", host=host)
        self.reached[service] |= reached | self._needs(service)
        self._poke()

    def _pause(self, deadline: float, healthy_since: float | None, min_healthy_ms: int) -> float:
        """How long ``_await_goal`` may sleep: a change wakes it sooner; a healthy hold's end, the deadline cut it."""
        pause = self.e.settings.poll_seconds
        if healthy_since is not None:
            pause = min(pause, min_healthy_ms / 1000 - (time.monotonic() - healthy_since))
        pause = min(pause, deadline - asyncio.get_running_loop().time())
        return max(pause, 0.0)

    def _deadline_error(
        self, vm: Vm, missing: set[Condition], health: VmHealth | None, deadline_ms: int
    ) -> _StepFailed:
        within = _seconds(deadline_ms)
        name = vm.name
        if Condition.HEALTHY in missing:
            check = _failing_check(health)
            if check is not None:
                detail = f" ({check.last.detail})" if check.last is not None and check.last.detail else ""
                return _StepFailed(
                    f"{name} did not become healthy within {within}: health check {check.name} is "
                    f"{check.state.value}{detail}",
                    probe=check.name,
                )
            state = health.state.value if health is not None else "unknown"
            return _StepFailed(f"{name} did not become healthy within {within} (health {state}, no check reported)")
        if Condition.COMPLETED in missing:
            return _StepFailed(f"{name} did not complete (run and stop) within {within}; it is {vm.state.name.lower()}")
        return _StepFailed(f"{name} was not running within {within}; it is {vm.state.name.lower()}")

    # ---- deletions

    async def _delete(self, service: str, action: str, *, with_snapshots: bool) -> bool:
        """Delete one VM of the run as its own step (DELETING, then DELETED); False (and FAILED) when it failed."""
        await self._save(service, state=VmRunState.DELETING, step="deleting")
        try:
            ok = await self._delete_vm(service, action, with_snapshots=with_snapshots)
        except _StepFailed as failed:
            await self._fail(service, failed.message)
            return False
        except CloneboxError as err:
            await self._fail(service, err.message)
            return False
        if ok:
            await self._save(service, state=VmRunState.DELETED, step="deleted")
        return ok

    async def _delete_vm(self, service: str, action: str, *, with_snapshots: bool) -> bool:
        """
        Delete the VM of ``service`` and wait; True when it is gone (or was already).

        A host that missed a few heartbeats (a busy controller, a network blip) is not a reason to leave
        a VM behind: the deletion is tried again with back-off for ``unreachable_retry_seconds``. Each try
        has its own request id, numbered, so a resumed run replays the same tries instead of adding some.
        """
        name = self.status[service].vm
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.e.settings.unreachable_retry_seconds
        pause = 0.5
        attempt = 0
        while True:
            request_id = run_request_id(self.run_.id, service, action if attempt == 0 else f"{action}~{attempt}")
            async with self.delete_sem:
                try:
                    op = await self.e._vms.delete(name, request_id, with_snapshots)
                except NotFound:
                    return True  # gone already (deleted by this step before a restart, or never made)
                done = await self.e._wait_operation(op)
            if not done.error_code or done.error_reason == "VM_NOT_FOUND":
                return True
            if done.error_reason not in _UNREACHABLE or loop.time() + pause > give_up:
                raise _op_failed(done, f"deleting {name}")
            attempt += 1
            await self._save(
                service,
                state=VmRunState.DELETING,
                step=f"host unreachable, deleting again in {pause:g}s (try {attempt + 1})",
            )
            await asyncio.sleep(pause)
            pause = min(pause * 2, 10.0)

    async def _delete_in_reverse(self, services: Sequence[str], action: str, *, with_snapshots: bool) -> list[str]:
        """
        Delete the VMs of ``services``, dependents first: each waits until its dependents among them are gone.

        Parallel within ``max_parallel``. A VM whose dependent could not be deleted is kept (SKIPPED).
        Returns the services whose VMs are left.
        """
        targets = set(services)
        users = {s: [u for u, _c in self.users.get(s, ()) if u in targets] for s in services}
        finished = {s: asyncio.Event() for s in services}
        left: list[str] = []

        async def one(service: str) -> None:
            try:
                for user in users[service]:
                    await finished[user].wait()
                kept = [u for u in users[service] if u in left]
                if kept:
                    await self._save(
                        service,
                        state=VmRunState.SKIPPED,
                        step=f"kept: {', '.join(self.status[u].vm for u in kept)} could not be deleted",
                    )
                    left.append(service)
                    return
                async with self.sem:
                    if not await self._delete(service, action, with_snapshots=with_snapshots):
                        left.append(service)
            finally:
                finished[service].set()

        await asyncio.gather(*(one(s) for s in services))
        return [s for s in services if s in left]

    async def _rollback(self) -> None:
        error = self.run_.error if self.run_.state is RunState.ROLLING_BACK else self._failure_text()
        if not error:
            error = self._failure_text() or "a VM failed"
        if self.run_.state is not RunState.ROLLING_BACK:
            await self._set_state(RunState.ROLLING_BACK, error)
        await self._release_unmade()
        created = [s for s in self.order if self.status[s].created and self.status[s].state is not VmRunState.DELETED]
        left = await self._delete_in_reverse(created, "rollback", with_snapshots=False)
        if left:
            names = ", ".join(self.status[s].vm for s in left)
            await self._finish_run(RunState.FAILED, f"{error}; the rollback could not delete {names}")
            return
        await self._finish_run(RunState.ROLLED_BACK, f"{error}; rolled back ({len(created)} VM(s) deleted)")

    async def _release_unmade(self) -> None:
        """Free the room this run holds for what it will not make now (``_held_vms``, ``_held_successors``, ...)."""
        unmade = _unmade(self.status[s] for s in self.order)
        replaces = any(self.status[s].change is ChangeKind.REPLACE for s in self.order)
        if unmade or replaces or self.plan.volumes:
            await asyncio.to_thread(self.store.release_held, unmade, self.run_.id)

    async def _down(self) -> None:
        with_snapshots = bool(self.run_.options.get(WITH_SNAPSHOTS))
        todo = [s for s in self.order if self.status[s].state not in (VmRunState.DELETED,)]
        left = await self._delete_in_reverse(todo, "destroy", with_snapshots=with_snapshots)
        if left:
            failed = [s for s in left if self.status[s].state is VmRunState.FAILED]
            detail = "; ".join(f"{self.status[s].vm}: {self.status[s].error}" for s in failed)
            kept = ", ".join(self.status[s].vm for s in left)
            volumes = "; the volumes were kept" if self.run_.options.get(WITH_VOLUMES) else ""
            await self._finish_run(RunState.FAILED, f"could not delete every VM ({detail}); left: {kept}{volumes}")
            return
        if self.run_.options.get(WITH_VOLUMES):
            problems = await self._delete_volumes()
            if problems:
                await self._finish_run(
                    RunState.FAILED,
                    f"the VMs are deleted, but not every volume: {'; '.join(problems)}; run "
                    f"'clonebox down {self.run_.plan} --volumes' again",
                )
                return
        await asyncio.to_thread(self.store.mark_plan_destroyed, self.run_.plan)
        await self._finish_run(RunState.SUCCEEDED)

    async def _delete_volumes(self) -> list[str]:
        """
        Delete the plan's volumes (after its VMs); what could not be deleted, each with why.

        The current revision's volumes on the host it records, and every volume labelled with the plan
        on a reachable host (ones older revisions made). A volume that is gone already counts as deleted.
        """
        targets: dict[str, str] = {volume_name(self.plan.name, v.name): v.host for v in self.plan.volumes if v.host}
        for host in await asyncio.to_thread(self.store.list_hosts):
            if host.state is HostState.UNREACHABLE:
                continue
            try:
                found = await self.e._vms.list_volumes(host.name)
            except CloneboxError as err:
                log.warning("plan %s: could not list the volumes of host %s: %s", self.plan.name, host.name, err)
                continue
            for vol in found:
                if vol.label_dict().get(LABEL_PLAN) == self.plan.name:
                    targets.setdefault(vol.name, host.name)
        problems: list[str] = []
        for agent, where in sorted(targets.items()):
            try:
                await self.e._vms.delete_volume(where, agent, run_request_id(self.run_.id, agent, "volume-delete"))
            except CloneboxError as err:
                problems.append(f"volume {agent} on host {where}: {err.message}")
        return problems


def _order(c: Condition) -> int:
    return list(Condition).index(c)


def _upstream(plan: Plan, service: str) -> set[str]:
    """Every service ``service`` depends on, directly or through others."""
    found: set[str] = set()
    todo = [d.service for d in plan.vm(service).depends_on]
    while todo:
        s = todo.pop()
        if s not in found:
            found.add(s)
            todo.extend(d.service for d in plan.vm(s).depends_on)
    return found


def _failing_check(health: VmHealth | None) -> CheckStatus | None:
    """The check to blame for a VM not being healthy: a critical one first."""
    if health is None:
        return None
    bad = [c for c in health.checks if c.state is not HealthState.HEALTHY]
    critical = [c for c in bad if c.critical]
    found = critical or bad
    return found[0] if found else None


def _health_step(health: VmHealth | None, spec: VmSpec) -> str:
    check = _failing_check(health)
    if check is None:
        return "waiting for its first health report"
    threshold = next((p.success_threshold for p in spec.health_checks if p.name == check.name), 1)
    return f"waiting for health check {check.name} ({check.consecutive_successes}/{threshold} passing)"
