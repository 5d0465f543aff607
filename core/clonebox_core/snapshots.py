"""Snapshots of VMs: the model shared by agent, controller and CLI.

A snapshot is a point a VM can return to. **Internal** snapshots live inside the VM's qcow2 disks (with
the guest's memory when the VM runs, so a restore returns to that instant); QEMU cannot save the memory
of a VM with a 9p or virtiofs share, so those VMs take **external** disk-only snapshots (the disks'
current files become read-only images under new overlays), optionally with the guest's filesystems
frozen through qemu-ga (``quiesce``). Data in shared folders is never part of a snapshot.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from clonebox_core.errors import invalid_field
from clonebox_core.model import VmSpec, VmState

__all__ = [
    "ImageChunk",
    "ImageDisk",
    "ImageHeader",
    "ImagePart",
    "ImageTrailer",
    "PruneDecision",
    "Snapshot",
    "SnapshotKind",
    "SnapshotPolicy",
    "check_policy",
    "decide_retention",
]


class SnapshotKind(enum.StrEnum):
    """Where a snapshot's data lives."""

    INTERNAL = "internal"
    EXTERNAL = "external"


@dataclass(frozen=True)
class Snapshot:
    """One snapshot of one VM, with its place in the VM's snapshot tree."""

    name: str
    vm: str
    kind: SnapshotKind
    create_time: datetime
    vm_state: VmState
    has_memory: bool = False
    quiesced: bool = False
    description: str = ""
    tags: Mapping[str, str] = field(default_factory=dict)
    size_bytes: int = 0
    parent: str = ""
    children: tuple[str, ...] = ()
    current: bool = False
    creator: str = ""
    automatic: bool = False
    reason: str = ""


@dataclass(frozen=True)
class SnapshotPolicy:
    """A VM's retention policy (0: that rule is off; all 0: keep everything)."""

    keep_last: int = 0
    keep_hourly: int = 0
    keep_daily: int = 0
    keep_weekly: int = 0
    max_age_seconds: int = 0
    max_total_bytes: int = 0

    @property
    def empty(self) -> bool:
        """No rule is set: retention deletes nothing."""
        return not any(
            (
                self.keep_last,
                self.keep_hourly,
                self.keep_daily,
                self.keep_weekly,
                self.max_age_seconds,
                self.max_total_bytes,
            )
        )


@dataclass(frozen=True)
class PruneDecision:
    """What retention does with one snapshot, and the rule that decided."""

    name: str
    keep: bool
    reason: str


# ---- export and import streams -----------------------------------------------------------------------

#: bytes of image in one chunk of an export or import stream, at most
CHUNK_BYTES = 1024 * 1024


@dataclass(frozen=True)
class ImageDisk:
    """One disk as an export stream carries it: a flattened qcow2 of ``image_bytes``."""

    name: str
    virtual_size_bytes: int
    image_bytes: int


@dataclass(frozen=True)
class ImageHeader:
    """First part of a stream: the snapshot, the VM's spec (secrets redacted), the disks in chunk order."""

    snapshot: Snapshot | None
    spec: VmSpec
    disks: tuple[ImageDisk, ...]
    request_id: str = ""
    host: str = ""


@dataclass(frozen=True)
class ImageChunk:
    """A piece of disk ``disk`` (index into the header's disks) at byte ``offset``."""

    disk: int
    offset: int
    data: bytes


@dataclass(frozen=True)
class ImageTrailer:
    """Last part of a stream: SHA-256 (hex) of each disk's bytes, in header order."""

    sha256: tuple[str, ...]


#: one message of an export or import stream
ImagePart = ImageHeader | ImageChunk | ImageTrailer


# ---- retention ---------------------------------------------------------------------------------------

#: at most this many of each keep rule (and of tags on one snapshot, see ``MAX_TAGS``)
MAX_KEEP = 1000
#: tags of one snapshot, and characters of each key and value
MAX_TAGS = 32
MAX_TAG_CHARS = 256


def check_image_disks(disks: Sequence[str], spec: VmSpec) -> None:
    """InvalidArgument naming ``disks`` unless an export's disk names are the spec's own disks, in its order.

    A disk that names an agent volume is not the VM's: an export leaves it out, an import attaches the volume.
    """
    if list(disks) != [d.name for d in spec.own_disks]:
        raise invalid_field("disks", "must list the spec's own disks (not its volumes), in the spec's order")


def check_policy(policy: SnapshotPolicy) -> SnapshotPolicy:
    """Return ``policy`` or raise InvalidArgument naming the field (counts 0..1000, sizes and ages ≥ 0)."""
    for name in ("keep_last", "keep_hourly", "keep_daily", "keep_weekly"):
        value = getattr(policy, name)
        if not 0 <= value <= MAX_KEEP:
            raise invalid_field(f"policy.{name}", f"must be between 0 and {MAX_KEEP} (got {value})")
    for name in ("max_age_seconds", "max_total_bytes"):
        value = getattr(policy, name)
        if value < 0:
            raise invalid_field(f"policy.{name}", f"must be 0 (off) or more (got {value})")
    return policy


def _age(seconds: int) -> str:
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _hour(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H")


def _day(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%d")


def _week(t: datetime) -> str:
    year, week, _ = t.astimezone(UTC).isocalendar()
    return f"{year}-W{week:02d}"


def _periodic(newest_first: Sequence[Snapshot], count: int, bucket: Callable[[datetime], str]) -> dict[str, str]:
    """The newest snapshot of each of the ``count`` most recent periods that hold one: name -> period."""
    kept: dict[str, str] = {}
    seen: set[str] = set()
    for snap in newest_first:
        if len(seen) >= count:
            break
        period = bucket(snap.create_time)
        if period not in seen:
            seen.add(period)
            kept[snap.name] = period
    return kept


def decide_retention(snapshots: Sequence[Snapshot], policy: SnapshotPolicy, now: datetime) -> list[PruneDecision]:
    """What retention does with each of one VM's snapshots (a pure function: same input, same answer).

    The rules, in order (the first that decides gives the reason):

    1. **Never deleted**: the current snapshot (the one the VM's disks descend from now). Its ancestors
       are not protected: in the usual linear chain every older snapshot is one, and retention would
       never delete anything; deleting an internal snapshot frees only its own clusters, and deleting
       an external one merges its overlay, so the VM's current data never depends on keeping them.
    2. An **empty policy** keeps everything.
    3. **Keep rules** keep: ``keep_last`` the N newest; ``keep_hourly``/``keep_daily``/``keep_weekly``
       the newest snapshot of each of the N most recent UTC hours / days / ISO weeks *that have one*
       (as restic and borg count: a VM that was off for a month keeps its last N days of snapshots, not
       nothing). Every snapshot counts toward the rules, protected or not.
    4. **Age**: with ``max_age_seconds``, a snapshot no keep rule kept is deleted when older than that
       and kept otherwise. Without it, a snapshot no keep rule kept is deleted when any keep rule is
       set (``keep_last 3`` alone means "only 3"), and kept otherwise (only a size rule is set).
    5. **Size**: while all snapshots that are still kept hold more than ``max_total_bytes``, the oldest
       one kept only by step 4 is deleted; protected and keep-rule snapshots are never deleted for size.

    Decisions come newest first; a snapshot whose time is after ``now`` is treated as new.
    """
    newest_first = sorted(snapshots, key=lambda s: (s.create_time, s.name), reverse=True)
    if policy.empty:
        return [PruneDecision(s.name, True, "no retention policy") for s in newest_first]
    reasons: dict[str, str] = {}
    current = next((s for s in snapshots if s.current), None)
    if current is not None:
        reasons[current.name] = "current state of the VM"
    if policy.keep_last:
        for snap in newest_first[: policy.keep_last]:
            reasons.setdefault(snap.name, f"keep_last {policy.keep_last}")
    for count, bucket, label in (
        (policy.keep_hourly, _hour, "keep_hourly"),
        (policy.keep_daily, _day, "keep_daily"),
        (policy.keep_weekly, _week, "keep_weekly"),
    ):
        if count:
            for name, period in _periodic(newest_first, count, bucket).items():
                reasons.setdefault(name, f"{label} {count} ({period})")
    ruled = set(reasons)
    rules = [
        f"{label} {value}"
        for label, value in (
            ("keep_last", policy.keep_last),
            ("keep_hourly", policy.keep_hourly),
            ("keep_daily", policy.keep_daily),
            ("keep_weekly", policy.keep_weekly),
        )
        if value
    ]
    keep: dict[str, bool] = {name: True for name in ruled}
    for snap in newest_first:
        if snap.name in ruled:
            continue
        if policy.max_age_seconds:
            old = (now - snap.create_time).total_seconds() > policy.max_age_seconds
            keep[snap.name] = not old
            age = _age(policy.max_age_seconds)
            reasons[snap.name] = f"older than max_age {age}" if old else f"younger than max_age {age}"
        elif rules:
            keep[snap.name] = False
            reasons[snap.name] = "not kept by " + ", ".join(rules)
        else:
            keep[snap.name] = True
            reasons[snap.name] = f"within max_total_bytes {policy.max_total_bytes}"
    if policy.max_total_bytes:
        total = sum(s.size_bytes for s in snapshots if keep[s.name])
        for snap in reversed(newest_first):  # oldest first
            if total <= policy.max_total_bytes:
                break
            if keep[snap.name] and snap.name not in ruled:
                keep[snap.name] = False
                total -= snap.size_bytes
                reasons[snap.name] = f"over max_total_bytes {policy.max_total_bytes} (oldest first)"
    return [PruneDecision(s.name, keep[s.name], reasons[s.name]) for s in newest_first]
