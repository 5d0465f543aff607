"""Multi-VM plans: the model a plan file becomes, its dependency graph, and what applying it changes.

A plan is a stack of VMs (``PlanVm``: a service name, the VM's full spec, what it waits for). The CLI
reads ``clonebox-compose.yaml`` (``clonebox_core.planfile``) into a ``Plan`` whose specs are resolved;
the controller stores it as a revision and runs it (``clonebox_controller.app.plans``).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import ipaddress
import itertools
import json
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from clonebox_core.errors import FailedPrecondition, InvalidArgument
from clonebox_core.model import DiskSpec, NetworkMode, NetworkSpec, Revision, Vm, VmSpec
from clonebox_core.names import check_dns_label
from clonebox_core.secret import Secret
from clonebox_core.specjson import DIGEST_PREFIX, SecretMode, secret_digest, spec_from_dict, spec_to_dict
from clonebox_core.units import format_duration_ms
from clonebox_core.validate import MAX_DISK_MIB, guest_range, managed_subnet

#: at most this many VMs in one plan
MAX_PLAN_VMS = 500
#: VMs created at once when the plan's update policy does not say
DEFAULT_MAX_PARALLEL = 4
#: how long a VM may take to become healthy (or complete) when the policy does not say
DEFAULT_HEALTHY_DEADLINE_MS = 5 * 60 * 1000
#: state reason of a VM a plan run holds room for and has not started to create ("... shop (run r1)")
HELD_REASON_PREFIX = "held for plan "


def held_reason(plan: str, run_id: str) -> str:
    """The state reason of a VM that run ``run_id`` of ``plan`` holds room for (see :func:`is_held`)."""
    return f"{HELD_REASON_PREFIX}{plan} (run {run_id})"


def is_held(state_reason: str) -> bool:
    """Whether a PENDING VM's state reason says a plan run holds its room (not made yet)."""
    return state_reason.startswith(HELD_REASON_PREFIX)


class Condition(enum.Enum):
    """When a dependent VM may start."""

    STARTED = "started"
    HEALTHY = "healthy"
    COMPLETED = "completed"


class FailurePolicy(enum.Enum):
    """What an apply does when one of its VMs fails."""

    ROLLBACK = "rollback"
    LEAVE = "leave"


class ChangeKind(enum.Enum):
    """What an apply does to one VM."""

    NONE = "none"
    CREATE = "create"
    IN_PLACE = "in_place"
    RESTART = "restart"
    REPLACE = "replace"
    REMOVE = "remove"


@dataclass(frozen=True)
class Dependency:
    """One edge: the dependent waits until ``service`` meets ``condition``."""

    service: str
    condition: Condition = Condition.STARTED


@dataclass(frozen=True)
class UpdatePolicy:
    """How an apply creates and replaces VMs (after Nomad's update block)."""

    max_parallel: int = DEFAULT_MAX_PARALLEL
    min_healthy_time_ms: int = 0
    healthy_deadline_ms: int = DEFAULT_HEALTHY_DEADLINE_MS
    auto_revert: bool = False


@dataclass(frozen=True)
class PlanVm:
    """One service of a plan: its VM (named ``<plan>-<service>``) and what it waits for."""

    service: str
    spec: VmSpec
    depends_on: tuple[Dependency, ...] = ()
    #: placement hint: the host to place it on ("" lets the scheduler decide)
    host: str = ""
    #: the plan network it is attached to (a name in ``Plan.networks``); "" keeps its own spec's network
    network: str = ""
    #: the plan volumes (names in ``Plan.volumes``) its VM attaches, in the order written
    volumes: tuple[str, ...] = ()


@dataclass(frozen=True)
class PlanVolume:
    """
    A volume the plan keeps: a disk on one host that outlives the VMs attaching it (``docs/plans.md``).

    The agent volume is named ``<plan>-<name>``; each service using it gets a disk attaching it.
    """

    name: str
    size_mib: int
    #: several services may attach it at once (the guests must coordinate their writes)
    shared: bool = False
    #: the host it lives on; "" until the controller places it (kept on every re-apply)
    host: str = ""


@dataclass(frozen=True)
class PlanNetwork:
    """A network the plan makes (the agent creates it with its first VM and removes it with its last)."""

    name: str
    #: IPv4 subnet in CIDR form; "" until the controller picks one (a free /24 in ``PLAN_SUBNET_POOL``)
    subnet: str = ""


@dataclass(frozen=True)
class Plan:
    """A whole stack. ``revision``, ``digest`` and ``create_time`` are set by the controller's store."""

    name: str
    vms: tuple[PlanVm, ...]
    update: UpdatePolicy = UpdatePolicy()
    on_failure: FailurePolicy = FailurePolicy.ROLLBACK
    source: str = ""
    revision: int = 0
    digest: str = ""
    create_time: datetime | None = None
    networks: tuple[PlanNetwork, ...] = ()
    volumes: tuple[PlanVolume, ...] = ()

    def vm(self, service: str) -> PlanVm:
        """The service named ``service`` (KeyError when the plan has none)."""
        for v in self.vms:
            if v.service == service:
                return v
        raise KeyError(service)


@dataclass(frozen=True)
class VmChange:
    """What an apply would do (or did) to one VM; ``fields`` are the spec fields that differ."""

    service: str
    vm: str
    kind: ChangeKind
    fields: tuple[str, ...] = ()


class VolumeChangeKind(enum.Enum):
    """What an apply does to one plan volume."""

    CREATE = "create"
    KEEP = "keep"
    DIFFERENT = "different"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class VolumeChange:
    """What an apply would do to one plan volume (``volume`` is the agent volume, ``<plan>-<name>``)."""

    name: str
    volume: str
    host: str
    size_mib: int
    shared: bool
    kind: VolumeChangeKind
    #: for DIFFERENT: what the volume has; for UNKNOWN: why its host could not tell
    detail: str = ""
    services: tuple[str, ...] = ()


class RunState(enum.Enum):
    """Where a run (an apply or a destroy) stands."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"

    @property
    def done(self) -> bool:
        """True for the three final states."""
        return self in (RunState.SUCCEEDED, RunState.FAILED, RunState.ROLLED_BACK)


class VmRunState(enum.Enum):
    """Where one VM of a run stands."""

    PENDING = "pending"
    CREATING = "creating"
    WAITING = "waiting"
    READY = "ready"
    FAILED = "failed"
    SKIPPED = "skipped"
    DELETING = "deleting"
    DELETED = "deleted"


@dataclass(frozen=True)
class VmStatus:
    """One VM's progress in a run. ``created``: this run created it (a rollback removes exactly these)."""

    service: str
    vm: str
    state: VmRunState = VmRunState.PENDING
    step: str = ""
    error: str = ""
    failed_probe: str = ""
    host: str = ""
    change: ChangeKind = ChangeKind.NONE
    created: bool = False
    update_time: datetime | None = None


@dataclass(frozen=True)
class PlanRun:
    """One apply (``action`` "up") or destroy ("down") of a plan; ``version`` grows with every change."""

    id: str
    plan: str
    revision: int
    action: str
    state: RunState
    vms: tuple[VmStatus, ...] = ()
    error: str = ""
    request_id: str = ""
    create_time: datetime | None = None
    update_time: datetime | None = None
    version: int = 0
    #: allow_replace of the apply, and with_snapshots of the destroy
    options: dict[str, bool] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        """True once the run is finished."""
        return self.state.done


# ------------------------------------------------------------------------------------------ reasons

#: reason of every plan problem that has no more specific one
PLAN_INVALID = "PLAN_INVALID"
#: a service depends on a service the plan does not have
PLAN_UNKNOWN_DEPENDENCY = "PLAN_UNKNOWN_DEPENDENCY"
#: the dependencies go round in a circle
PLAN_CYCLE = "PLAN_CYCLE"
#: a service waits for another to be healthy, and that one has no health check to tell
PLAN_NO_HEALTH_CHECK = "PLAN_NO_HEALTH_CHECK"
#: a service is attached to a network the plan does not declare
PLAN_UNKNOWN_NETWORK = "PLAN_UNKNOWN_NETWORK"
#: no free subnet or address is left for a plan network
PLAN_NETWORK_FULL = "PLAN_NETWORK_FULL"
#: a network whose VMs exist would get another subnet (the live libvirt network keeps its own)
PLAN_NETWORK_SUBNET_CHANGE = "PLAN_NETWORK_SUBNET_CHANGE"
#: a service attaches a volume the plan does not declare
PLAN_UNKNOWN_VOLUME = "PLAN_UNKNOWN_VOLUME"
#: a volume that is not shared is attached by more than one service
PLAN_VOLUME_NOT_SHARED = "PLAN_VOLUME_NOT_SHARED"

#: the plan network every plan has unless its file names others
DEFAULT_NETWORK = "default"
#: where the controller picks plan subnets (one /24 each) when the plan file gives none
PLAN_SUBNET_POOL = ipaddress.IPv4Network("10.213.0.0/16")

#: bounds of the update policy
MAX_PARALLEL_LIMIT = 64
MIN_HEALTHY_DEADLINE_MS = 1000
MAX_HEALTHY_DEADLINE_MS = 24 * 60 * 60 * 1000
#: the longest VM name (a DNS label)
MAX_VM_NAME = 63
#: labels every VM of a plan carries, so the fleet can tell which plan and service it belongs to
LABEL_PLAN = "clonebox.plan"
LABEL_SERVICE = "clonebox.service"


def _invalid(where: str, message: str, reason: str = PLAN_INVALID) -> InvalidArgument:
    return InvalidArgument(f"{where}: {message}", reason=reason, metadata={"field": where})


# -------------------------------------------------------------------------------------------- graph


def vm_name(plan: str, service: str) -> str:
    """The name of the VM of ``service`` in ``plan``: ``<plan>-<service>``."""
    return f"{plan}-{service}"


def levels(plan: Plan) -> list[list[str]]:
    """
    The services by dependency level (Kahn's algorithm): level 0 depends on nothing, level n only on lower levels.

    Inside a level the services keep the plan's (file) order, so the result is deterministic. Raises
    InvalidArgument: ``PLAN_UNKNOWN_DEPENDENCY`` for a dependency the plan does not have, ``PLAN_CYCLE``
    for a cycle (a self-dependency included; the message shows it as a path), ``PLAN_INVALID`` for a
    service that lists one dependency twice.
    """
    order = [v.service for v in plan.vms]
    known = set(order)
    deps: dict[str, list[str]] = {}
    for v in plan.vms:
        where = f"vms.{v.service}.depends_on"
        names = [d.service for d in v.depends_on]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise _invalid(where, f"{twice[0]!r} is listed more than once: keep one")
        for name in names:
            if name not in known:
                raise _invalid(
                    where,
                    f"{v.service} depends on {name!r}, which is not a service of this plan "
                    f"(services: {', '.join(order)})",
                    PLAN_UNKNOWN_DEPENDENCY,
                )
        deps[v.service] = names
    out: list[list[str]] = []
    placed: set[str] = set()
    waiting = list(order)
    while waiting:
        # a service is ready once everything it waits for sits in an earlier level (not this one)
        level = [s for s in waiting if all(d in placed for d in deps[s])]
        if not level:
            cycle = _find_cycle(waiting, deps)
            raise _invalid(
                f"vms.{cycle[0]}.depends_on",
                f"dependency cycle: {' -> '.join(cycle)}: remove one of these dependencies",
                PLAN_CYCLE,
            )
        out.append(level)
        placed.update(level)
        waiting = [s for s in waiting if s not in placed]
    return out


def _find_cycle(waiting: list[str], deps: Mapping[str, Sequence[str]]) -> list[str]:
    """A cycle among ``waiting`` (every one of which waits for another one of them), as a closed path."""
    left = set(waiting)
    path: list[str] = []
    seen: dict[str, int] = {}
    node = waiting[0]
    # every waiting service has a dependency that is also waiting, so this walk must come back on itself
    while node not in seen:
        seen[node] = len(path)
        path.append(node)
        node = next(d for d in deps[node] if d in left)
    return [*path[seen[node] :], node]


def dependents(plan: Plan, service: str) -> set[str]:
    """Every service that depends on ``service``, directly or through others (empty for an unknown one)."""
    users: dict[str, list[str]] = {}
    for v in plan.vms:
        for d in v.depends_on:
            users.setdefault(d.service, []).append(v.service)
    found: set[str] = set()
    todo = list(users.get(service, ()))
    while todo:
        s = todo.pop()
        if s not in found:
            found.add(s)
            todo.extend(users.get(s, ()))
    found.discard(service)  # a self-dependency is a cycle, not a dependent
    return found


# ------------------------------------------------------------------------------------------- checks


def _dns_label(where: str, value: str) -> None:
    try:
        check_dns_label(where, value)
    except InvalidArgument as exc:
        # the same words as every other name check, under the plan's reason
        raise InvalidArgument(exc.message, reason=PLAN_INVALID, metadata=exc.metadata) from None


def check_names(plan: str, services: Sequence[str]) -> None:
    """
    The naming rules of :func:`check_plan` on their own, for loaders that check names before specs exist.

    The plan name and every service are DNS labels, services are unique, and every VM name
    ``<plan>-<service>`` fits in a DNS label (63 characters).
    """
    _dns_label("name", plan)
    seen: set[str] = set()
    for service in services:
        where = f"vms.{service}"
        _dns_label(where, service)
        if service in seen:
            raise _invalid(where, f"service {service!r} is defined twice: keep one")
        seen.add(service)
        name = vm_name(plan, service)
        if len(name) > MAX_VM_NAME:
            over = len(name) - MAX_VM_NAME
            raise _invalid(
                where,
                f"the VM name {name!r} is {len(name)} characters, {over} more than a DNS label allows "
                f"({MAX_VM_NAME}): shorten the service name (or the plan name) by {over}",
            )


def check_update(update: UpdatePolicy) -> None:
    """The bounds of an update policy (InvalidArgument ``PLAN_INVALID`` naming ``update.<field>``)."""
    if not 1 <= update.max_parallel <= MAX_PARALLEL_LIMIT:
        raise _invalid("update.max_parallel", f"{update.max_parallel} is out of range: use 1..{MAX_PARALLEL_LIMIT}")
    if not MIN_HEALTHY_DEADLINE_MS <= update.healthy_deadline_ms <= MAX_HEALTHY_DEADLINE_MS:
        raise _invalid(
            "update.healthy_deadline_ms",
            f"{format_duration_ms(update.healthy_deadline_ms)} is out of range: use 1s .. 24h",
        )
    if update.min_healthy_time_ms < 0:
        raise _invalid("update.min_healthy_time_ms", "must not be negative")
    if update.min_healthy_time_ms >= update.healthy_deadline_ms:
        raise _invalid(
            "update.min_healthy_time_ms",
            f"{format_duration_ms(update.min_healthy_time_ms)} must be shorter than healthy_deadline "
            f"({format_duration_ms(update.healthy_deadline_ms)}): a VM could never count as healthy in time",
        )


def check_plan(plan: Plan) -> list[list[str]]:
    """
    Check everything about ``plan`` that needs no fleet, then return :func:`levels`.

    Names (:func:`check_names`), 1..``MAX_PLAN_VMS`` VMs, every spec named ``<plan>-<service>``, the
    update policy (:func:`check_update`), the graph, and that a service waited for with condition
    ``healthy`` has health checks. The VM specs themselves are validated where they are read and by
    the servers (``clonebox_core.validate``). Raises InvalidArgument (``PLAN_INVALID`` unless another
    reason is more precise) with ``metadata['field']`` a dotted path such as ``vms.api.depends_on``.
    """
    check_names(plan.name, [v.service for v in plan.vms])
    if not plan.vms:
        raise _invalid("vms", "a plan needs at least one VM")
    if len(plan.vms) > MAX_PLAN_VMS:
        raise _invalid("vms", f"{len(plan.vms)} VMs: a plan has at most {MAX_PLAN_VMS}; split it into several plans")
    for v in plan.vms:
        expected = vm_name(plan.name, v.service)
        if v.spec.name != expected:
            raise _invalid(
                f"vms.{v.service}.spec.name",
                f"{v.spec.name!r} must be {expected!r}: a plan's VMs are named <plan>-<service>",
            )
        if v.host:
            _dns_label(f"vms.{v.service}.host", v.host)
    check_update(plan.update)
    _check_networks(plan)
    check_volumes(plan)
    result = levels(plan)
    for v in plan.vms:
        for d in v.depends_on:
            if d.condition is Condition.HEALTHY and not plan.vm(d.service).spec.health_checks:
                raise _invalid(
                    f"vms.{v.service}.depends_on",
                    f"{v.service} waits for {d.service} to be healthy, but {d.service} has no health_checks: "
                    "add one, or use condition: started",
                    PLAN_NO_HEALTH_CHECK,
                )
    return result


# ----------------------------------------------------------------------------------------- networks


def network_name(plan: str, network: str) -> str:
    """The libvirt name of ``network`` of ``plan``: ``cb-<plan>`` for the default one, else ``cb-<plan>-<network>``."""
    return f"cb-{plan}" if network == DEFAULT_NETWORK else f"cb-{plan}-{network}"


def _check_networks(plan: Plan) -> None:
    seen: dict[str, ipaddress.IPv4Network | None] = {}
    for i, n in enumerate(plan.networks):
        where = f"networks.{n.name}" if n.name else f"networks[{i}]"
        _dns_label(where, n.name)
        if n.name in seen:
            raise _invalid(where, f"network {n.name} is declared twice")
        if len(network_name(plan.name, n.name)) > 63:
            raise _invalid(where, f"{network_name(plan.name, n.name)!r} is too long: shorten the plan or network name")
        subnet = None
        if n.subnet:
            subnet = managed_subnet(f"{where}.subnet", n.subnet, reason=PLAN_INVALID)
            for other, theirs in seen.items():
                if theirs is not None and subnet.overlaps(theirs):
                    raise _invalid(f"{where}.subnet", f"{subnet} overlaps {theirs} of network {other}")
        seen[n.name] = subnet
    for v in plan.vms:
        if v.network and v.network not in seen:
            raise _invalid(
                f"vms.{v.service}.networks",
                f"{v.service} is attached to network {v.network!r}, which the plan does not declare "
                f"(networks: {', '.join(seen) or 'none'})",
                PLAN_UNKNOWN_NETWORK,
            )
        if v.network and v.spec.network.mode is NetworkMode.NONE:
            raise _invalid(f"vms.{v.service}.spec.network", "a VM on a plan network needs a network interface")


def _guest_addresses(subnet: ipaddress.IPv4Network) -> Iterator[ipaddress.IPv4Address]:
    """The addresses a guest may have, lowest first."""
    first, last = guest_range(subnet)
    return (ipaddress.IPv4Address(a) for a in range(int(first), int(last) + 1))


def _pick_subnet(plan: str, network: str, taken: Sequence[ipaddress.IPv4Network]) -> ipaddress.IPv4Network:
    """A free /24 of ``PLAN_SUBNET_POOL``, starting at one derived from the names (stable for a plan)."""
    blocks = list(PLAN_SUBNET_POOL.subnets(new_prefix=24))
    start = int.from_bytes(hashlib.sha256(f"{plan}/{network}".encode()).digest()[:4], "big") % len(blocks)
    for i in range(len(blocks)):
        block = blocks[(start + i) % len(blocks)]
        if not any(block.overlaps(t) for t in taken):
            return block
    raise InvalidArgument(
        f"networks.{network}: every /24 of {PLAN_SUBNET_POOL} is taken by other plans: give this network a subnet",
        reason=PLAN_NETWORK_FULL,
        metadata={"field": f"networks.{network}"},
    )


def materialize_networks(plan: Plan, current: Plan | None, taken: Sequence[ipaddress.IPv4Network]) -> Plan:
    """
    ``plan`` with a subnet for each of its networks and, for each VM on one, its managed network attachment.

    What ``current`` (the applied revision) had is kept: a network keeps its subnet when the file gives
    none, a service keeps its address, so re-applying the same file changes nothing. Otherwise a
    network gets a free /24 (none overlapping ``taken``: other plans' subnets) and a VM the lowest
    free guest address. The DNS of the network answers a VM's service name and its VM name.
    """
    if not plan.networks:
        return plan
    before = {n.name: n.subnet for n in current.networks} if current is not None else {}
    old_vms = {v.service: v for v in current.vms} if current is not None else {}
    claimed = list(taken)
    subnets: dict[str, ipaddress.IPv4Network] = {}
    for n in plan.networks:  # given subnets first: a picked one must not take them
        if n.subnet:
            subnets[n.name] = ipaddress.IPv4Network(n.subnet)
            claimed.append(subnets[n.name])
    for n in plan.networks:
        if n.name in subnets:
            continue
        had = before.get(n.name, "")
        subnets[n.name] = ipaddress.IPv4Network(had) if had else _pick_subnet(plan.name, n.name, claimed)
        claimed.append(subnets[n.name])
    addresses: dict[str, ipaddress.IPv4Address] = {}
    used: dict[str, set[ipaddress.IPv4Address]] = {n: set() for n in subnets}
    for v in plan.vms:  # addresses the applied revision gave, where still valid
        old = old_vms.get(v.service)
        if not v.network or old is None or old.network != v.network or not old.spec.network.address:
            continue
        prior = ipaddress.IPv4Address(old.spec.network.address)
        if prior in subnets[v.network] and prior not in used[v.network]:
            addresses[v.service] = prior
            used[v.network].add(prior)
    vms: list[PlanVm] = []
    for v in plan.vms:
        if not v.network:
            vms.append(v)
            continue
        kept = addresses.get(v.service)
        if kept is not None:
            address = kept
        else:
            free = (a for a in _guest_addresses(subnets[v.network]) if a not in used[v.network])
            picked = next(free, None)
            if picked is None:
                raise _invalid(
                    f"networks.{v.network}.subnet",
                    f"{subnets[v.network]} has no address left for {v.service}: use a larger subnet",
                    PLAN_NETWORK_FULL,
                )
            used[v.network].add(picked)
            address = picked
        attachment = NetworkSpec(
            NetworkMode.MANAGED,
            network_name(plan.name, v.network),
            str(subnets[v.network]),
            str(address),
            (v.service, vm_name(plan.name, v.service)),
        )
        vms.append(dataclasses.replace(v, spec=dataclasses.replace(v.spec, network=attachment)))
    networks = tuple(dataclasses.replace(n, subnet=str(subnets[n.name])) for n in plan.networks)
    return dataclasses.replace(plan, vms=tuple(vms), networks=networks)


# ------------------------------------------------------------------------------------------ volumes

#: the disk that attaches plan volume ``data`` to a VM is named ``vol-data``
VOLUME_DISK_PREFIX = "vol-"


def volume_name(plan: str, volume: str) -> str:
    """The agent volume of plan volume ``volume``: ``<plan>-<volume>``."""
    return f"{plan}-{volume}"


def volume_disk_name(volume: str) -> str:
    """The name of the disk attaching plan volume ``volume`` in each VM using it: ``vol-<volume>`` (a DNS label)."""
    return (VOLUME_DISK_PREFIX + volume)[:MAX_VM_NAME].rstrip("-")


def _volume_error(service: str, index: int, message: str, reason: str = PLAN_INVALID) -> InvalidArgument:
    where = f"vms.{service}.volumes"
    return InvalidArgument(f"{where}: {message}", reason=reason, metadata={"field": where, "index": str(index)})


#: a virtio guest sees this many characters of a disk serial (QEMU passes no more)
VIRTIO_SERIAL_CHARS = 20


def volume_device(plan: str, volume: str) -> str:
    """
    Where the guest finds plan volume ``volume``: ``/dev/disk/by-id/virtio-`` and its serial's first 20 characters.

    The agent gives a volume disk the serial ``vol-<agent volume>`` (``docs/operations.md``).
    """
    return "/dev/disk/by-id/virtio-" + (VOLUME_DISK_PREFIX + volume_name(plan, volume))[:VIRTIO_SERIAL_CHARS]


def check_volumes(plan: Plan) -> None:
    """
    The plan's volumes and the services' use of them (part of :func:`check_plan`).

    Each volume: a DNS label, declared once, ``<plan>-<volume>`` a DNS label too, 1 MiB .. 64 TiB. Each
    service: only declared volumes (PLAN_UNKNOWN_VOLUME), each once, a volume disk in its spec only for
    one of them, and no disk of its own named like a volume's disk. A volume that is not ``shared`` is
    used by one service at most (PLAN_VOLUME_NOT_SHARED, naming the services). InvalidArgument with
    ``metadata['field']`` (and ``index``, the position in the service's list, for a service's entry).
    """
    declared: dict[str, PlanVolume] = {}
    for i, v in enumerate(plan.volumes):
        where = f"volumes.{v.name}" if v.name else f"volumes[{i}]"
        _dns_label(where, v.name)
        if v.name in declared:
            raise _invalid(where, f"volume {v.name} is declared twice")
        agent = volume_name(plan.name, v.name)
        if len(agent) > MAX_VM_NAME:
            over = len(agent) - MAX_VM_NAME
            raise _invalid(
                where,
                f"the agent volume {agent!r} (<plan>-<volume>) is {len(agent)} characters, {over} more than a DNS "
                f"label allows ({MAX_VM_NAME}): shorten the volume name (or the plan name) by {over}",
            )
        if not 0 < v.size_mib <= MAX_DISK_MIB:
            raise _invalid(f"{where}.size_mib", f"{v.size_mib} MiB is out of range: use 1 MiB .. 64 TiB")
        if v.host:
            _dns_label(f"{where}.host", v.host)
        declared[v.name] = v
    users: dict[str, list[str]] = {}
    for pv in plan.vms:
        wanted: set[str] = set()
        own_disks = {d.name for d in pv.spec.disks if not d.volume}
        for i, name in enumerate(pv.volumes):
            if name in wanted:
                raise _volume_error(pv.service, i, f"volume {name!r} is listed more than once: keep one")
            if name not in declared:
                raise _volume_error(
                    pv.service,
                    i,
                    f"{pv.service} attaches volume {name!r}, which the plan does not declare "
                    f"(volumes: {', '.join(declared) or 'none'}): add it under the top-level volumes:",
                    PLAN_UNKNOWN_VOLUME,
                )
            if volume_disk_name(name) in own_disks:
                raise _volume_error(
                    pv.service,
                    i,
                    f"the disk attaching volume {name!r} is named {volume_disk_name(name)!r}, and the VM has a disk "
                    "of that name already: rename that disk",
                )
            wanted.add(name)
            users.setdefault(name, []).append(pv.service)
        agents = {volume_name(plan.name, n) for n in wanted}
        for i, d in enumerate(pv.spec.disks):
            if d.volume and d.volume not in agents:
                raise _invalid(
                    f"vms.{pv.service}.spec.disks[{i}].volume",
                    f"a plan's VM attaches the plan's own volumes only (volumes: of the plan and of the service); "
                    f"{d.volume!r} is not one of {pv.service}'s",
                )
    for name, services in users.items():
        if len(services) > 1 and not declared[name].shared:
            second = plan.vm(services[1])
            raise _volume_error(
                second.service,
                second.volumes.index(name),
                f"volume {name} is used by {', '.join(services)}, but it is not shared: a volume has one writer "
                f"unless it says 'shared: true' (volumes.{name}; the guests must then coordinate their writes), "
                "or give each service a volume of its own",
                PLAN_VOLUME_NOT_SHARED,
            )


def attach_volumes(plan: Plan) -> Plan:
    """
    ``plan`` with, in each service's VM spec, a disk attaching each of its volumes (after its own disks).

    The disk of volume ``data`` is ``DiskSpec("vol-data", volume="<plan>-data")``. This is the one place
    that turns a service's ``volumes`` into disks (the controller calls it with the network
    attachments); a disk already there is kept, so a stored revision goes through unchanged.
    """
    if not plan.volumes:
        return plan
    vms: list[PlanVm] = []
    for pv in plan.vms:
        have = {d.volume for d in pv.spec.disks if d.volume}
        extra = tuple(
            DiskSpec(volume_disk_name(n), volume=volume_name(plan.name, n))
            for n in pv.volumes
            if volume_name(plan.name, n) not in have
        )
        vms.append(
            dataclasses.replace(pv, spec=dataclasses.replace(pv.spec, disks=(*pv.spec.disks, *extra))) if extra else pv
        )
    return dataclasses.replace(plan, vms=tuple(vms))


def volume_users(plan: Plan) -> dict[str, list[str]]:
    """Plan volume -> the services attaching it, in plan order (volumes nobody uses map to [])."""
    out: dict[str, list[str]] = {v.name: [] for v in plan.volumes}
    for pv in plan.vms:
        for n in pv.volumes:
            out.setdefault(n, []).append(pv.service)
    return out


def check_subnet_changes(plan: Plan, current: Plan | None, existing: Collection[str]) -> None:
    """
    Refuse a materialized ``plan`` that moves a live network to another subnet.

    A network of ``current`` (the applied revision) whose VMs still exist (their names in
    ``existing``) is a live libvirt network with that subnet; giving it another one would make each of
    its VMs a replace that the agent then refuses mid-run. FailedPrecondition
    PLAN_NETWORK_SUBNET_CHANGE, before anything is done, says to take the plan down first.
    """
    if current is None:
        return
    before = {n.name: n.subnet for n in current.networks if n.subnet}
    now = {n.name: n.subnet for n in plan.networks}
    for name, old in sorted(before.items()):
        new = now.get(name, "")
        if not new or new == old:
            continue
        live = sorted(vm_name(current.name, v.service) for v in current.vms if v.network == name)
        live = [n for n in live if n in existing]
        if live:
            raise FailedPrecondition(
                f"networks.{name}.subnet: network {network_name(current.name, name)} is live on {old} with "
                f"{', '.join(live)}; moving it to {new} needs the plan down first (clonebox down "
                f"{current.name}, then up), or keep subnet {old}",
                reason=PLAN_NETWORK_SUBNET_CHANGE,
                metadata={"field": f"networks.{name}.subnet", "plan": current.name, "vms": ",".join(live)},
            )


def plan_subnets(plan: Plan) -> list[ipaddress.IPv4Network]:
    """The subnets ``plan``'s networks have (those not picked yet are left out)."""
    return [ipaddress.IPv4Network(n.subnet) for n in plan.networks if n.subnet]


# -------------------------------------------------------------------------------------------- diffs

#: changed without touching the guest
_IN_PLACE_FIELDS = frozenset({"labels", "health_checks"})
#: changed by a stop and a start; the disks stay
_RESTART_FIELDS = frozenset({"vcpus", "memory_mib"})
_STRENGTH = (ChangeKind.NONE, ChangeKind.IN_PLACE, ChangeKind.RESTART, ChangeKind.REPLACE)
#: the parts of ``auth`` a comparison looks at: everything but the password hash
_AUTH_COMPARED = ("user", "method", "ssh_keys", "password", "ssh_authorized_keys", "secret_refs")


def _field_forms(spec: VmSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    """The spec's fields as JSON values, with secret fields kept and as digests."""
    keep, digest = spec_to_dict(spec, secrets="keep"), spec_to_dict(spec, secrets="digest")
    for form in (keep, digest):
        auth = form.get("auth")
        if auth is not None:
            form["auth"] = {k: auth[k] for k in _AUTH_COMPARED}
    return keep, digest


def _kind_of(name: str) -> ChangeKind:
    if name in _IN_PLACE_FIELDS:
        return ChangeKind.IN_PLACE
    if name in _RESTART_FIELDS:
        return ChangeKind.RESTART
    return ChangeKind.REPLACE


def classify(current: VmSpec, new: VmSpec) -> tuple[ChangeKind, tuple[str, ...]]:
    """
    What changing a VM from ``current`` to ``new`` takes, and which spec fields differ (sorted model names).

    - nothing differs: ``NONE``;
    - only ``labels`` and/or ``health_checks``: ``IN_PLACE`` (the guest is not touched);
    - ``vcpus`` and/or ``memory_mib`` (with or without the above): ``RESTART`` (stop, redefine, start;
      the disks stay);
    - anything else (disks, kernel_boot, network, shared_folders, cloud_init, provision, auth, ...):
      ``REPLACE`` (delete and create again). The strongest kind wins.

    ``current`` is the spec as the fleet keeps it, where secret fields may be ``sha256:`` digests
    (``clonebox_core.specjson``): a secret field is the same when the values are equal or one is the
    digest of the other. ``auth`` is compared on its public parts only: user, method, key sources and
    resolved public keys, the password *reference* and the names of the resolved references, never
    the password hash. Each resolution of a password hashes it with a new random salt, so comparing
    hashes would turn every re-apply of an unchanged plan into a replace; changing the password behind
    an unchanged reference is therefore no change (rotate it with ``clonebox secret rotate``).
    """
    cur_keep, cur_digest = _field_forms(current)
    new_keep, new_digest = _field_forms(new)
    differ: list[str] = []
    for f in dataclasses.fields(VmSpec):
        a, b = cur_keep.get(f.name), new_keep.get(f.name)
        if a == b or a == new_digest.get(f.name) or cur_digest.get(f.name) == b:
            continue
        differ.append(f.name)
    if not differ:
        return ChangeKind.NONE, ()
    kind = max((_kind_of(f) for f in differ), key=_STRENGTH.index)
    return kind, tuple(sorted(differ))


#: the spec fields an update changes without re-creating the VM (none of them holds a secret)
UPDATABLE_FIELDS = _IN_PLACE_FIELDS | _RESTART_FIELDS


def updated_spec(current: VmSpec, new: VmSpec) -> VmSpec:
    """
    The spec a VM keeps after an in-place or restart update from ``current`` to ``new``.

    Only the fields such an update changes (labels, health checks, vCPUs, memory) come from ``new``;
    everything else stays as ``current`` has it, secret fields and their digests included.
    """
    return dataclasses.replace(current, **{f: getattr(new, f) for f in sorted(UPDATABLE_FIELDS)})


def needs_replace_error(name: str, fields: Sequence[str]) -> FailedPrecondition:
    """
    The refusal of an update (VM_UPDATE_NEEDS_REPLACE) some of whose fields only a re-create changes.

    ``fields`` are all the fields that differ; the message and metadata name the ones at fault.
    """
    fields = [f for f in fields if _kind_of(f) is ChangeKind.REPLACE]
    return FailedPrecondition(
        f"VM {name}: {', '.join(fields)} cannot change without re-creating the VM (only labels, health_checks, "
        "vcpus and memory_mib can); delete and create it again, or re-apply its plan with --allow-replace",
        reason="VM_UPDATE_NEEDS_REPLACE",
        metadata={"vm": name, "fields": ",".join(fields)},
    )


@dataclass(frozen=True)
class UpdateResult:
    """What an update of one VM took."""

    vm: Vm
    #: NONE, IN_PLACE or RESTART
    kind: ChangeKind
    #: the spec fields that differed (sorted model names)
    fields: tuple[str, ...] = ()
    #: the VM ran and was restarted to take the change
    restarted: bool = False
    #: that restart's graceful shutdown timed out and the VM was forced off
    forced: bool = False
    #: the agent's event revision when it answered (``UpdateVmResponse.revision``; None: not told)
    revision: Revision | None = None


def diff(current: Plan | None, new: Plan, existing: Mapping[str, VmSpec]) -> list[VmChange]:
    """
    What applying ``new`` changes, VM by VM.

    ``current`` is the plan applied before (None: none yet); ``existing`` maps the name of each VM that
    exists in the fleet now to its spec. Every VM of ``new`` comes first, in level order: ``CREATE``
    when it does not exist, else what :func:`classify` says. Then each service of ``current`` that
    ``new`` no longer has and whose VM exists: ``REMOVE``, in reverse level order (dependents first).
    """
    out: list[VmChange] = []
    for service in itertools.chain.from_iterable(levels(new)):
        vm = new.vm(service)
        name = vm_name(new.name, service)
        if name not in existing:
            out.append(VmChange(service, name, ChangeKind.CREATE))
            continue
        kind, fields = classify(existing[name], vm.spec)
        out.append(VmChange(service, name, kind, fields))
    if current is not None:
        kept = {v.service for v in new.vms}
        for service in reversed(list(itertools.chain.from_iterable(levels(current)))):
            name = vm_name(current.name, service)
            if service not in kept and name in existing:
                out.append(VmChange(service, name, ChangeKind.REMOVE))
    return out


# ---------------------------------------------------------------------------------------- JSON form


def _time_to_json(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _time_from_json(value: Any) -> datetime | None:
    return None if not value else datetime.fromisoformat(str(value))


def plan_to_dict(plan: Plan, *, secrets: SecretMode = "digest") -> dict[str, Any]:
    """
    Encode ``plan`` as a JSON-able dict (the form the controller stores).

    Specs go through ``clonebox_core.specjson``; by default their secret fields are ``sha256:``
    digests (a stored revision is readable by every viewer of the plan). Enums are written by member
    name, as everywhere in the store.
    """
    return {
        "name": plan.name,
        "vms": [
            {
                "service": v.service,
                "spec": spec_to_dict(v.spec, secrets=secrets),
                "depends_on": [{"service": d.service, "condition": d.condition.name} for d in v.depends_on],
                "host": v.host,
                "network": v.network,
                # only when set: the stored form (and digest) of a plan without volumes is unchanged
                **({"volumes": list(v.volumes)} if v.volumes else {}),
            }
            for v in plan.vms
        ],
        "networks": [{"name": n.name, "subnet": n.subnet} for n in plan.networks],
        **(
            {
                "volumes": [
                    {"name": v.name, "size_mib": v.size_mib, "shared": v.shared, "host": v.host} for v in plan.volumes
                ]
            }
            if plan.volumes
            else {}
        ),
        "update": {
            "max_parallel": plan.update.max_parallel,
            "min_healthy_time_ms": plan.update.min_healthy_time_ms,
            "healthy_deadline_ms": plan.update.healthy_deadline_ms,
            "auto_revert": plan.update.auto_revert,
        },
        "on_failure": plan.on_failure.name,
        "source": plan.source,
        "revision": plan.revision,
        "digest": plan.digest,
        "create_time": _time_to_json(plan.create_time),
    }


def plan_from_dict(d: Mapping[str, Any]) -> Plan:
    """Decode what :func:`plan_to_dict` wrote (missing keys take the model's defaults)."""
    update = d.get("update") or {}
    return Plan(
        name=str(d["name"]),
        vms=tuple(
            PlanVm(
                service=str(v["service"]),
                spec=spec_from_dict(v["spec"]),
                depends_on=tuple(
                    Dependency(str(x["service"]), Condition[str(x.get("condition", Condition.STARTED.name))])
                    for x in v.get("depends_on", ())
                ),
                host=str(v.get("host", "")),
                network=str(v.get("network", "")),
                volumes=tuple(str(x) for x in v.get("volumes", ())),
            )
            for v in d.get("vms", ())
        ),
        networks=tuple(PlanNetwork(str(n["name"]), str(n.get("subnet", ""))) for n in d.get("networks", ())),
        volumes=tuple(
            PlanVolume(str(v["name"]), int(v["size_mib"]), bool(v.get("shared", False)), str(v.get("host", "")))
            for v in d.get("volumes", ())
        ),
        update=UpdatePolicy(
            max_parallel=int(update.get("max_parallel", DEFAULT_MAX_PARALLEL)),
            min_healthy_time_ms=int(update.get("min_healthy_time_ms", 0)),
            healthy_deadline_ms=int(update.get("healthy_deadline_ms", DEFAULT_HEALTHY_DEADLINE_MS)),
            auto_revert=bool(update.get("auto_revert", False)),
        ),
        on_failure=FailurePolicy[str(d.get("on_failure", FailurePolicy.ROLLBACK.name))],
        source=str(d.get("source", "")),
        revision=int(d.get("revision", 0)),
        digest=str(d.get("digest", "")),
        create_time=_time_from_json(d.get("create_time")),
    )


def plan_digest(plan: Plan) -> str:
    """
    Hex SHA-256 of the plan's canonical JSON: equal for plans that apply the same way.

    ``revision``, ``digest``, ``create_time`` and ``source`` are left out (they say where and when, not
    what), and specs are in their ``secrets="digest"`` form. A value that already is a digest (a plan
    read back from the store) stays as it is, so a stored plan has the digest of the plan it came
    from. For the reason :func:`classify` gives, the password hash is left out: a plan read again (a
    new random salt) is still the same plan.
    """
    data = plan_to_dict(plan, secrets="keep")
    for key in ("revision", "digest", "create_time", "source"):
        del data[key]
    for v in data["vms"]:
        spec = v["spec"]
        if spec.get("auth") is not None:
            del spec["auth"]["password_hash"]
        cloud = spec.get("cloud_init")
        if cloud is not None and not cloud["user_data"].startswith(DIGEST_PREFIX):
            cloud["user_data"] = secret_digest(Secret(cloud["user_data"]))
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()
