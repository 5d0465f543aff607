"""
Host choice for a new VM: pure functions over a snapshot of host capacity.

The store calls these inside the transaction that holds the host rows locked, so the snapshot
cannot change under the decision. Keeping the policy free of SQL makes it easy to read and test.

Policy: among hosts that are READY, not cordoned and have room in every dimension, take the one that
keeps the largest share of its allocatable capacity free after placing the VM (spreading load, so a
single host failure hurts fewer VMs), averaged over the dimensions the host offers; ties go to the
alphabetically first host so the choice is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

from clonebox_core.errors import FailedPrecondition, NotFound, ResourceExhausted
from clonebox_core.model import HostState, Resources


@dataclass(frozen=True)
class Candidate:
    """What placement needs to know about one host."""

    name: str
    state: HostState
    cordoned: bool
    allocatable: Resources
    reserved: Resources

    @property
    def free(self) -> Resources:
        """Allocatable minus what VMs on the host have reserved (may be negative after adoption)."""
        return self.allocatable - self.reserved


def describe(r: Resources) -> str:
    """``2 vcpus, 1024 MiB memory, 0 MiB disk``."""
    return f"{r.vcpus} vcpus, {r.memory_mib} MiB memory, {r.disk_mib} MiB disk"


def shortfall(need: Resources, free: Resources) -> str:
    """Why ``need`` does not fit in ``free``, dimension by dimension."""
    parts = []
    if need.vcpus > free.vcpus:
        parts.append(f"needs {need.vcpus} vcpus, {max(free.vcpus, 0)} free")
    if need.memory_mib > free.memory_mib:
        parts.append(f"needs {need.memory_mib} MiB memory, {max(free.memory_mib, 0)} free")
    if need.disk_mib > free.disk_mib:
        parts.append(f"needs {need.disk_mib} MiB disk, {max(free.disk_mib, 0)} free")
    return "; ".join(parts)


def closed(state: HostState, cordoned: bool) -> str | None:
    """Why a host in ``state`` takes no new VM whatever its room ("cordoned", "unreachable"), or None."""
    if cordoned:
        return "cordoned"
    if state is not HostState.READY:
        return state.name.lower().replace("_", " ")
    return None


def rejection(candidate: Candidate, need: Resources) -> str | None:
    """Why ``candidate`` cannot take a VM needing ``need``, or None when it can."""
    why = closed(candidate.state, candidate.cordoned)
    if why is not None:
        return why
    if not need.fits_in(candidate.free):
        return shortfall(need, candidate.free)
    return None


def score(candidate: Candidate, need: Resources) -> float:
    """Mean share of allocatable capacity left free after placing ``need`` (higher is better)."""
    after = candidate.free - need
    shares = [
        left / total
        for left, total in (
            (after.vcpus, candidate.allocatable.vcpus),
            (after.memory_mib, candidate.allocatable.memory_mib),
            (after.disk_mib, candidate.allocatable.disk_mib),
        )
        if total > 0
    ]
    return sum(shares) / len(shares) if shares else 0.0


def choose(candidates: list[Candidate], need: Resources) -> str:
    """Pick the best host for ``need``; ResourceExhausted NO_HOST_FITS says why each host was refused."""
    fitting = [c for c in candidates if rejection(c, need) is None]
    if fitting:
        # max score, then min name: sort by (-score, name)
        return min(fitting, key=lambda c: (-score(c, need), c.name)).name
    if not candidates:
        raise ResourceExhausted(
            f"no host can take a VM needing {describe(need)}: no hosts are registered",
            reason="NO_HOST_FITS",
        )
    why = "; ".join(f"{c.name}: {rejection(c, need)}" for c in sorted(candidates, key=lambda c: c.name))
    raise ResourceExhausted(
        f"no host can take a VM needing {describe(need)} ({why})",
        reason="NO_HOST_FITS",
        metadata={"hosts_considered": str(len(candidates))},
    )


def check_named(candidate: Candidate | None, name: str, need: Resources) -> str:
    """Validate an explicitly requested host; return its name or raise the precise error."""
    if candidate is None:
        raise NotFound(f"host {name!r} is not registered", reason="HOST_NOT_FOUND", metadata={"host": name})
    if candidate.cordoned:
        raise FailedPrecondition(
            f"host {name!r} is cordoned: uncordon it or let placement choose",
            reason="HOST_CORDONED",
            metadata={"host": name},
        )
    if candidate.state is HostState.UNREACHABLE:
        raise FailedPrecondition(
            f"host {name!r} is unreachable (no heartbeat)",
            reason="HOST_UNREACHABLE",
            metadata={"host": name},
        )
    if candidate.state is not HostState.READY:
        raise FailedPrecondition(f"host {name!r} is not serving", reason="HOST_NOT_SERVING", metadata={"host": name})
    if not need.fits_in(candidate.free):
        raise ResourceExhausted(
            f"host {name!r} cannot take a VM needing {describe(need)}: {shortfall(need, candidate.free)}",
            reason="HOST_CAPACITY_EXCEEDED",
            metadata={"host": name},
        )
    return name
