"""
Snapshot XML and disk-image helpers of the libvirt adapter (pure functions and ``qemu-img`` calls).

Internal snapshots live in the qcow2 files (libvirt + QEMU do all the work). External disk-only snapshots
freeze each disk's current file and put a new overlay on top of it; libvirt 9.0 cannot revert or
reliably merge them, so the adapter does both itself and needs to know, for each external snapshot,
which file it froze. libvirt's snapshot XML records only the overlay made at that moment (which a
later revert may remove), so the adapter writes the frozen files into the snapshot's ``<description>``
as JSON (``FROZEN_PREFIX``): the agent keeps the user's description in its journal, never here.

Nothing here formats user input into XML text: every value goes through ElementTree.
"""

from __future__ import annotations

import json
import os
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from clonebox_core.errors import Internal
from clonebox_core.model import VmState
from clonebox_core.snapshots import SnapshotKind

#: start of the ``<description>`` of an external snapshot made by the adapter (JSON follows)
FROZEN_PREFIX = "clonebox-frozen:"

#: seconds one ``qemu-img`` run may take (convert of a big disk is the slow one)
QEMU_IMG_TIMEOUT = 3600.0

# libvirt's snapshot <state> words (virDomainSnapshotState) to the VM's state when it was taken; a
# disk-only snapshot of a running domain says "disk-snapshot"
_STATES = {
    "running": VmState.RUNNING,
    "blocked": VmState.RUNNING,
    "disk-snapshot": VmState.RUNNING,
    "paused": VmState.PAUSED,
    "pmsuspended": VmState.PAUSED,
    "shutdown": VmState.STOPPED,
    "shutoff": VmState.STOPPED,
    "nostate": VmState.STOPPED,
    "crashed": VmState.CRASHED,
}


@dataclass(frozen=True)
class SnapshotDisk:
    """One disk of a snapshot: how it is saved, and (external) the overlay made when it was taken."""

    target: str
    mode: str
    source: str = ""


@dataclass(frozen=True)
class SnapshotInfo:
    """What a snapshot's XML (``virDomainSnapshotGetXMLDesc``) says."""

    name: str
    state: str
    create_time: datetime
    has_memory: bool
    parent: str
    disks: tuple[SnapshotDisk, ...] = ()
    #: external: the file each disk (by target) had when the snapshot froze it
    frozen: Mapping[str, str] = field(default_factory=dict)

    @property
    def kind(self) -> SnapshotKind:
        """EXTERNAL when any disk went to an overlay, else INTERNAL."""
        if any(d.mode == "external" for d in self.disks) or self.frozen:
            return SnapshotKind.EXTERNAL
        return SnapshotKind.INTERNAL

    @property
    def vm_state(self) -> VmState:
        """The VM's state when the snapshot was taken."""
        return _STATES.get(self.state, VmState.UNSPECIFIED)

    @property
    def created_epoch(self) -> str:
        """The creation time as libvirt records it (whole seconds): part of a snapshot's identity."""
        return str(int(self.create_time.timestamp()))


@dataclass(frozen=True)
class DomainDisk:
    """A disk of a domain definition (cdroms included, flagged)."""

    target: str
    source: str
    format: str
    cdrom: bool
    readonly: bool


# ---- building ------------------------------------------------------------------------------------


def internal_snapshot_xml(name: str, disks: Sequence[DomainDisk], *, memory: bool) -> str:
    """``<domainsnapshot>`` for an internal snapshot: every writable qcow2 disk inside its file.

    Read-only disks (the cloud-init seed cdrom, raw) are named with ``snapshot='no'``: a raw image cannot
    hold a snapshot, and libvirt 9.0 would otherwise pick the default for them itself.
    """
    root = ET.Element("domainsnapshot")
    ET.SubElement(root, "name").text = name
    ET.SubElement(root, "memory", {"snapshot": "internal" if memory else "no"})
    disks_el = ET.SubElement(root, "disks")
    for disk in disks:
        mode = "internal" if _snapshottable(disk) else "no"
        ET.SubElement(disks_el, "disk", {"name": disk.target, "snapshot": mode})
    return ET.tostring(root, encoding="unicode")


def external_snapshot_xml(
    name: str, disks: Sequence[DomainDisk], overlays: Mapping[str, str], frozen: Mapping[str, str]
) -> str:
    """``<domainsnapshot>`` for a disk-only external snapshot onto the pre-made ``overlays`` (by target).

    ``frozen`` (target: the file that becomes read-only) goes into the description (see the module doc).
    """
    root = ET.Element("domainsnapshot")
    ET.SubElement(root, "name").text = name
    ET.SubElement(root, "description").text = frozen_description(frozen)
    ET.SubElement(root, "memory", {"snapshot": "no"})
    disks_el = ET.SubElement(root, "disks")
    for disk in disks:
        if disk.target in overlays:
            el = ET.SubElement(disks_el, "disk", {"name": disk.target, "snapshot": "external", "type": "file"})
            ET.SubElement(el, "driver", {"type": "qcow2"})
            ET.SubElement(el, "source", {"file": overlays[disk.target]})
        else:
            ET.SubElement(disks_el, "disk", {"name": disk.target, "snapshot": "no"})
    return ET.tostring(root, encoding="unicode")


def frozen_description(frozen: Mapping[str, str]) -> str:
    """The description text recording the frozen file of each disk."""
    return FROZEN_PREFIX + json.dumps(dict(sorted(frozen.items())), separators=(",", ":"))


def _snapshottable(disk: DomainDisk) -> bool:
    return not disk.cdrom and not disk.readonly and disk.format == "qcow2"


def snapshot_disks(disks: Sequence[DomainDisk]) -> list[DomainDisk]:
    """The disks a snapshot saves: writable qcow2 disks (never the read-only seed cdrom)."""
    return [d for d in disks if _snapshottable(d)]


# ---- parsing -------------------------------------------------------------------------------------


def parse_snapshot(xml_text: str) -> SnapshotInfo:
    """Read a snapshot's XML."""
    root = ET.fromstring(xml_text)
    created = root.findtext("creationTime") or "0"
    memory = root.find("memory")
    state = root.findtext("state") or ""
    has_memory = memory.get("snapshot") == "internal" if memory is not None else state in ("running", "paused")
    disks = tuple(
        SnapshotDisk(
            el.get("name", ""),
            el.get("snapshot", ""),
            (el.find("source").get("file", "") if el.find("source") is not None else ""),  # type: ignore[union-attr]
        )
        for el in root.findall("./disks/disk")
    )
    return SnapshotInfo(
        name=root.findtext("name") or "",
        state=state,
        create_time=datetime.fromtimestamp(int(created), UTC),
        has_memory=has_memory,
        parent=root.findtext("./parent/name") or "",
        disks=disks,
        frozen=parse_frozen(root.findtext("description") or ""),
    )


def parse_frozen(description: str) -> dict[str, str]:
    """The frozen files recorded by ``frozen_description`` ({} for any other description)."""
    if not description.startswith(FROZEN_PREFIX):
        return {}
    try:
        data = json.loads(description[len(FROZEN_PREFIX) :])
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(k): str(v) for k, v in data.items()}


def domain_disks(xml_text: str) -> list[DomainDisk]:
    """File-backed disks and cdroms of a domain XML, in document order (cdroms without a medium skipped)."""
    root = ET.fromstring(xml_text)
    out = []
    for el in root.findall("./devices/disk"):
        src = el.find("source")
        target = el.find("target")
        if src is None or target is None or not src.get("file"):
            continue
        driver = el.find("driver")
        out.append(
            DomainDisk(
                target=target.get("dev", ""),
                source=src.get("file", ""),
                format=driver.get("type", "raw") if driver is not None else "raw",
                cdrom=el.get("device") == "cdrom",
                readonly=el.find("readonly") is not None,
            )
        )
    return out


def has_filesystem_share(xml_text: str) -> bool:
    """Tell whether a domain XML has a 9p or virtiofs ``<filesystem>``: QEMU cannot save its memory."""
    return ET.fromstring(xml_text).find("./devices/filesystem") is not None


def with_disk_sources(xml_text: str, sources: Mapping[str, str]) -> str:
    """The domain XML with the source file of each disk in ``sources`` (by target) replaced.

    The disk's recorded ``<backingStore>`` is dropped, so libvirt reads the new file's chain from its
    header (a stale chain would hand QEMU the wrong backing files).
    """
    root = ET.fromstring(xml_text)
    for el in root.findall("./devices/disk"):
        target = el.find("target")
        src = el.find("source")
        if target is None or src is None or target.get("dev") not in sources:
            continue
        src.set("file", sources[target.get("dev", "")])
        for attr in ("index",):
            src.attrib.pop(attr, None)
        for store in el.findall("backingStore"):
            el.remove(store)
    return ET.tostring(root, encoding="unicode")


def order_oldest_first(infos: Sequence[SnapshotInfo]) -> list[SnapshotInfo]:
    """Sort by creation time; within one second a parent still comes before its children."""
    by_name = {i.name: i for i in infos}

    def depth(info: SnapshotInfo) -> int:
        n, seen, parent = 0, {info.name}, info.parent
        while parent in by_name and parent not in seen:
            seen.add(parent)
            n += 1
            parent = by_name[parent].parent
        return n

    return sorted(infos, key=lambda i: (i.create_time, depth(i), i.name))


# ---- qemu-img ------------------------------------------------------------------------------------


def qemu_img(*args: str, timeout: float = QEMU_IMG_TIMEOUT) -> str:
    """Run ``qemu-img`` (blocking: worker threads only) and return its stdout; Internal on failure."""
    try:
        done = subprocess.run(
            ["qemu-img", *args], capture_output=True, text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Internal(f"qemu-img {args[0]} failed: {exc}", reason="QEMU_IMG_FAILED") from None
    if done.returncode != 0:
        raise Internal(
            f"qemu-img {args[0]} failed: {done.stderr.strip()[-500:]}",
            reason="QEMU_IMG_FAILED",
        )
    return done.stdout


def image_json(path: str, *, force_share: bool = True) -> dict[str, Any]:
    """``qemu-img info --output json`` of one image (``-U``: it may be open in a running QEMU)."""
    args = ["info", "--output", "json"]
    if force_share:
        args.append("-U")
    data = json.loads(qemu_img(*args, path))
    if not isinstance(data, dict):
        raise Internal(f"qemu-img info of {path}: unexpected answer", reason="QEMU_IMG_FAILED")
    return data


def backing_of(path: str) -> str:
    """The backing file of an image, as an absolute path ("" when it has none)."""
    info = image_json(path)
    backing = str(info.get("full-backing-filename") or info.get("backing-filename") or "")
    if backing and not os.path.isabs(backing):
        backing = os.path.join(os.path.dirname(path), backing)
    return os.path.normpath(backing) if backing else ""


def internal_snapshot_sizes(path: str) -> dict[str, int]:
    """Saved memory size (bytes) of each internal snapshot in a qcow2 file, by snapshot name."""
    info = image_json(path)
    return {str(s.get("name", "")): int(s.get("vm-state-size", 0)) for s in info.get("snapshots") or ()}


def allocated_bytes(path: str) -> int:
    """Bytes a file takes on disk (0 when it is gone)."""
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


def convert_flat(source: str, dest: str, *, snapshot: str = "", force_share: bool = True) -> None:
    """Write ``dest``: a standalone qcow2 of ``source`` (its backing chain flattened; ``source`` is only read).

    ``snapshot``: read that internal snapshot of ``source`` instead of its current state.
    """
    args = ["convert", "-q", "-O", "qcow2"]
    if force_share:
        args.append("-U")
    if snapshot:
        args += ["-l", f"snapshot.name={snapshot}"]
    qemu_img(*args, source, dest)
