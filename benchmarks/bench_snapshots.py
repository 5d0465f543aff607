"""
Snapshot create and restore beside the raw libvirt calls, and export/import beside ``qemu-img convert`` + ``zstd``.

In this process, on ``qemu:///system`` (TCG; storage under ``/var/lib/clonebox/bench-snap-XXXXXX``,
traversable by ``libvirt-qemu``): one ``LibvirtHypervisor`` under the agent's use case layer, an
``AgentService`` with its journal and a ``SnapshotManager``, exactly as ``clonebox-agent`` composes them
(no gRPC, no controller, no CLI process). Two identical VMs are created through it: the tiny test guest
(1 vCPU, 128 MiB, ``vmlinux``, no network) with two disks, ``root`` on ``testguest/data.qcow2`` and
``bulk`` on a 256 MiB qcow2 prepared here (per MiB: 512 KiB random, 256 KiB repeated text, 256 KiB
zeros), so every snapshot and export carries real data. One VM is CloneBox's, the other is driven with
raw libvirt calls on a connection of its own.

1. **Create and restore**, R times each (default 10, ``--quick`` 3) after one untimed warm-up, the two
   VMs interleaved (the order swaps each repetition), for three cases in turn:

   - internal snapshot of the running VM (disks and memory), once both guests' qemu-ga answers;
   - internal snapshot of the stopped VM;
   - external disk-only snapshot of the running VM.

   CloneBox: ``SnapshotManager.create(kind=...)`` (journaled transaction, audit event, metadata) and
   ``SnapshotManager.restore(no_backup=True)`` (the default restore first takes a backup snapshot, that
   is one more create). Raw: ``virDomainSnapshotCreateXML`` with the XML the adapter builds
   (``internal_snapshot_xml`` / ``external_snapshot_xml``; for the external one libvirt makes the
   overlay files itself) and ``virDomainRevertToSnapshot`` with the adapter's flags. libvirt 9.0 cannot
   revert an external snapshot, so the raw restore of one is the adapter's own recipe by hand:
   ``destroy``, ``qemu-img create -b FROZEN`` per disk, ``defineXML`` with the new files, the snapshot
   redefined as current, ``create``, the old overlays unlinked. Internal snapshots are deleted after each
   repetition (untimed); external ones stay (each VM's chain grows alike). Goal: CloneBox median
   <= 1.1 x raw median + 50 ms, reported as (CloneBox - 50 ms) / raw <= 1.1.

2. **Export and import** of an internal snapshot of the stopped CloneBox VM, E times each (default 3,
   ``--quick`` 1), interleaved:

   - CloneBox export: ``SnapshotManager.export`` (``export_disks``: ``qemu-img convert`` of each disk at
     the snapshot into a temporary folder, then 1 MiB chunks with SHA-256) into ``write_archive`` in a
     worker thread (as the CLI consumes the RPC stream), to ``FILE.partial``, fsynced, renamed; plain and
     encrypted (scrypt + AES-256-GCM);
   - baseline: per disk ``qemu-img convert -O qcow2 -l snapshot.name=S SRC tmp.qcow2`` then
     ``zstd -3 -T1 tmp.qcow2 -o out.zst``, fsync, ``rm tmp.qcow2`` (qemu-img cannot write qcow2 to a pipe);
   - CloneBox import: ``read_archive`` in a worker thread into ``SnapshotManager.import_`` (temporary
     file, SHA-256, qcow2 header checks, ``qemu-img info``, adopted into the pool, VM defined), then the
     archive's trailer checked, as the CLI does; the new VM is deleted afterwards (untimed);
   - baseline: per disk ``zstd -d`` then ``qemu-img info`` (no VM is defined).

   Throughput in MiB/s of the disks' virtual size and of their qcow2 data. No goal: reported.

Every domain, volume, pool, file and folder made here is removed in ``finally``, also after Ctrl-C or
SIGTERM. The full CLI -> controller -> agent path is not timed: it needs a second fleet of processes and
a third guest, and the CLI's own start (~0.8 s, see ``create_ready``) would dwarf a stopped snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import math
import os
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import IMAGES, QEMU_URI, RUN_ROOT, BenchResult, Options, Ratio, Table, load_average, median, ms

BULK_MIB = 256
READY_TIMEOUT = 300.0
COMMAND_TIMEOUT = 600.0
PASSPHRASE = b"clonebox snapshot benchmark passphrase"
EXPORT_SNAPSHOT = "bench-export"
#: the goal: CloneBox <= RATIO_GOAL x raw + ALLOWANCE_S (medians)
RATIO_GOAL = 1.1
ALLOWANCE_S = 0.050
MIB = 1024 * 1024


def _unavailable() -> str | None:
    for tool in ("virsh", "qemu-img", "zstd"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (deploy/dev/install-system.sh)"
    if importlib.util.find_spec("libvirt") is None:
        return "libvirt-python is not installed"
    r = subprocess.run(["virsh", "-c", QEMU_URI, "version"], capture_output=True, text=True, timeout=30, check=False)
    if r.returncode != 0:
        return f"libvirtd not reachable at {QEMU_URI}: {r.stderr.strip()} (deploy/dev/start-libvirt.sh)"
    for f in ("vmlinux", "initrd.img", "data.qcow2"):
        if not (IMAGES / "testguest" / f).exists():
            return f"test guest missing {IMAGES / 'testguest' / f} (bash deploy/testguest/build.sh)"
    return None


def _run(args: list[str]) -> str:
    """Run a command; its stdout; RuntimeError with its stderr on failure."""
    done = subprocess.run(
        args, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False, stdin=subprocess.DEVNULL
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:2])} failed: {done.stderr.strip()[-500:]}")
    return done.stdout


def _make_bulk(folder: Path, mib: int) -> Path:
    """A qcow2 of ``mib`` MiB: per MiB, 512 KiB random, 256 KiB repeated text, 256 KiB zeros."""
    raw = folder / "bulk.raw"
    text = (b"2026-11-26T12:00:00Z clonebox bench: the quick brown fox jumps over the lazy dog 0123456789\n" * 3000)[
        : 256 * 1024
    ]
    zeros = bytes(256 * 1024)
    with raw.open("wb") as f:
        for _ in range(mib):
            f.write(os.urandom(512 * 1024))
            f.write(text)
            f.write(zeros)
    out = folder / "bulk.qcow2"
    _run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(out)])
    raw.unlink()
    os.chmod(out, 0o644)
    return out


def _spec(name: str, bulk: Path) -> Any:
    from clonebox_core.model import DiskSpec, KernelBoot, NetworkMode, NetworkSpec, VmSpec

    guest = IMAGES / "testguest"
    return VmSpec(
        name=name,
        vcpus=1,
        memory_mib=128,
        disks=(DiskSpec("root", base_image=str(guest / "data.qcow2")), DiskSpec("bulk", base_image=str(bulk))),
        kernel_boot=KernelBoot(
            kernel=str(guest / "vmlinux"),
            initrd=str(guest / "initrd.img"),
            cmdline=f"console=ttyS0 quiet clonebox.hostname={name}",
        ),
        network=NetworkSpec(mode=NetworkMode.NONE),
    )


async def _wait_ready(hv: Any, vm: str, timeout: float = READY_TIMEOUT) -> float | None:
    """Seconds until qemu-ga answers and /init has mounted the data disk (None: not within ``timeout``)."""
    from clonebox_core.errors import CloneboxError

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        with contextlib.suppress(CloneboxError):
            if await hv.guest_file_exists(vm, "/run/data-settled"):
                return time.monotonic() - t0
        await asyncio.sleep(0.5)
    return None


class RawVm:
    """The second VM, driven with plain libvirt calls on a connection of its own (blocking: worker threads)."""

    def __init__(self, conn: Any, domain: str, folder: Path) -> None:
        self.conn = conn
        self.dom = conn.lookupByName(domain)
        self.folder = folder
        #: external snapshots: the file each disk had when the snapshot froze it, by snapshot and target
        self.frozen: dict[str, dict[str, str]] = {}

    def disks(self) -> list[Any]:
        """The disks a snapshot saves (writable qcow2), from the live or inactive definition."""
        import libvirt

        from clonebox_agent.adapters.libvirt import snapshots

        flags = 0 if self.dom.isActive() else libvirt.VIR_DOMAIN_XML_INACTIVE
        return snapshots.snapshot_disks(snapshots.domain_disks(self.dom.XMLDesc(flags)))

    def internal_xml(self, name: str) -> str:
        """The adapter's ``<domainsnapshot>`` for an internal snapshot (memory when running)."""
        from clonebox_agent.adapters.libvirt import snapshots

        return snapshots.internal_snapshot_xml(name, self.disks(), memory=bool(self.dom.isActive()))

    def external_xml(self, name: str) -> tuple[str, dict[str, str]]:
        """The adapter's ``<domainsnapshot>`` for a disk-only snapshot onto overlays in our folder; frozen files."""
        from clonebox_agent.adapters.libvirt import snapshots

        disks = self.disks()
        overlays = {d.target: str(self.folder / f"{d.target}.{name}.qcow2") for d in disks}
        frozen = {d.target: d.source for d in disks}
        return snapshots.external_snapshot_xml(name, disks, overlays, frozen), frozen

    def create_internal(self, xml: str) -> None:
        """``virDomainSnapshotCreateXML(xml, 0)``."""
        self.dom.snapshotCreateXML(xml, 0)

    def create_external(self, name: str, xml: str, frozen: dict[str, str]) -> None:
        """``virDomainSnapshotCreateXML`` disk-only and atomic (libvirt makes the overlay files)."""
        import libvirt

        self.dom.snapshotCreateXML(
            xml, libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
        )
        self.frozen[name] = frozen

    def revert_internal(self, name: str, running: bool) -> None:
        """``virDomainRevertToSnapshot`` with the flags the adapter uses (RUNNING for a running VM, else 0)."""
        import libvirt

        snap = self.dom.snapshotLookupByName(name, 0)
        self.dom.revertToSnapshot(snap, libvirt.VIR_DOMAIN_SNAPSHOT_REVERT_RUNNING if running else 0)

    def revert_external(self, name: str) -> None:
        """What libvirt >= 9.9 would do: stop, new overlays on the frozen files, swap them in, start."""
        import libvirt

        from clonebox_agent.adapters.libvirt import snapshots

        frozen = self.frozen[name]
        snap = self.dom.snapshotLookupByName(name, 0)
        if self.dom.isActive():
            self.dom.destroy()
        inactive = self.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        old = {d.target: d.source for d in snapshots.domain_disks(inactive) if d.target in frozen}
        new: dict[str, str] = {}
        for target, backing in sorted(frozen.items()):
            overlay = self.folder / f"{target}.{name}-restored-{uuid.uuid4().hex[:6]}.qcow2"
            _run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", backing, str(overlay)])
            new[target] = str(overlay)
        self.conn.defineXML(snapshots.with_disk_sources(inactive, new))
        self.dom.snapshotCreateXML(
            snap.getXMLDesc(0),
            libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_CURRENT,
        )
        self.dom.create()
        keep = {p for f in self.frozen.values() for p in f.values()}
        for source in old.values():
            if source not in keep and Path(source).parent == self.folder:
                Path(source).unlink(missing_ok=True)

    def delete(self, name: str) -> None:
        """Delete an internal snapshot."""
        self.dom.snapshotLookupByName(name, 0).delete(0)

    def drop_metadata(self) -> None:
        """Forget every snapshot (metadata only), before the adapter deletes the VM."""
        import libvirt

        for snap in self.dom.listAllSnapshots(0):
            with contextlib.suppress(libvirt.libvirtError):
                snap.delete(libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY)


@dataclass
class Case:
    """One snapshot case: its samples (seconds) for each side and operation."""

    label: str
    samples: dict[str, list[float]] = field(
        default_factory=lambda: {"cb create": [], "raw create": [], "cb restore": [], "raw restore": []}
    )


async def _timed(work: Awaitable[Any]) -> float:
    """Seconds ``work`` (a coroutine not yet started) takes to run."""
    t0 = time.perf_counter()
    await work
    return time.perf_counter() - t0


async def _snapshot_case(
    mgr: Any, raw: RawVm, cb_vm: str, label: str, kind: Any, running: bool, reps: int, prefix: str
) -> Case:
    """Warm-up, then ``reps`` interleaved create + restore on each VM (see the module doc)."""
    from clonebox_core.snapshots import SnapshotKind

    case = Case(label)
    external = kind == SnapshotKind.EXTERNAL
    for i in range(-1, reps):
        name = f"{prefix}-{i + 1}"
        order = ("cb", "raw") if i % 2 == 0 else ("raw", "cb")
        for who in order:
            if who == "cb":
                seconds = await _timed(mgr.create(cb_vm, name=name, kind=kind))
            elif external:
                xml, frozen = await asyncio.to_thread(raw.external_xml, name)
                seconds = await _timed(asyncio.to_thread(raw.create_external, name, xml, frozen))
            else:
                xml = await asyncio.to_thread(raw.internal_xml, name)
                seconds = await _timed(asyncio.to_thread(raw.create_internal, xml))
            if i >= 0:
                case.samples[f"{who} create"].append(seconds)
        for who in order:
            if who == "cb":
                seconds = await _timed(mgr.restore(cb_vm, name, no_backup=True))
            elif external:
                seconds = await _timed(asyncio.to_thread(raw.revert_external, name))
            else:
                seconds = await _timed(asyncio.to_thread(raw.revert_internal, name, running))
            if i >= 0:
                case.samples[f"{who} restore"].append(seconds)
        if not external:
            await mgr.delete(cb_vm, name)
            await asyncio.to_thread(raw.delete, name)
    return case


# ---- export / import ---------------------------------------------------------------------------


@dataclass
class Transfer:
    """One timed export or import: total seconds, a named part of it, bytes."""

    seconds: float
    part_seconds: float = math.nan
    file_bytes: int = 0
    virtual_bytes: int = 0
    image_bytes: int = 0


async def _cb_export(mgr: Any, vm: str, snapshot: str, out: Path, passphrase: bytes | None) -> Transfer:
    """``SnapshotManager.export`` into ``write_archive`` in a worker thread, as the CLI writes a file."""
    from clonebox_core.rpc.convert_snapshot import part_to_proto
    from clonebox_core.snapshot_archive import write_archive
    from clonebox_core.snapshots import ImageHeader

    loop = asyncio.get_running_loop()
    stream = mgr.export(vm, snapshot)
    t0 = time.perf_counter()
    first: list[float] = []
    header: list[ImageHeader] = []

    async def next_part() -> Any:
        try:
            return await anext(stream)
        except StopAsyncIteration:
            return None

    stop = threading.Event()

    def parts() -> Iterator[Any]:
        asked = time.perf_counter()  # after write_archive's key derivation (encrypted)
        while True:
            if stop.is_set():  # the benchmark was cancelled: no archive of a cut-short stream
                raise RuntimeError("export cancelled")
            part = asyncio.run_coroutine_threadsafe(next_part(), loop).result()
            if part is None:
                return
            if not first:
                first.append(time.perf_counter() - asked)
                header.append(part)
            yield part_to_proto(part)

    partial = out.with_name(out.name + ".partial")

    def write() -> int:
        try:
            with partial.open("wb") as f:
                summary = write_archive(f, parts(), passphrase=passphrase)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, out)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        return summary.file_bytes

    try:
        file_bytes = await asyncio.to_thread(write)
    finally:
        stop.set()
        # after Ctrl-C the writer thread may still be inside the stream: asyncio.run closes it at shutdown
        with contextlib.suppress(RuntimeError):
            await stream.aclose()
    seconds = time.perf_counter() - t0
    disks = header[0].disks
    return Transfer(
        seconds,
        first[0],
        file_bytes,
        sum(d.virtual_size_bytes for d in disks),
        sum(d.image_bytes for d in disks),
    )


async def _cb_import(mgr: Any, archive: Path, name: str, passphrase: bytes | None) -> Transfer:
    """``read_archive`` in a worker thread into ``SnapshotManager.import_`` (as ``--as NAME``); the trailer checked."""
    from clonebox_core.rpc.convert_snapshot import part_from_proto
    from clonebox_core.snapshot_archive import read_archive

    t0 = time.perf_counter()
    with archive.open("rb") as f:
        messages = await asyncio.to_thread(read_archive, f, passphrase=passphrase)  # the key derivation
        reading = [time.perf_counter() - t0]

        def pull() -> Any:
            t = time.perf_counter()
            try:
                return next(messages, None)
            finally:
                reading[0] += time.perf_counter() - t

        async def parts() -> AsyncIterator[Any]:
            while (m := await asyncio.to_thread(pull)) is not None:
                if m.WhichOneof("part") == "header":
                    m.header.spec.name = name
                part = part_from_proto(m)
                if part is None:
                    raise RuntimeError("an empty part in the archive")
                yield part

        await mgr.import_(parts())
        # the agent stops at the stream's trailer part; the CLI's reader goes on to the archive's trailer
        # frame (digest and length of everything), which is where a truncated or altered file fails
        if await asyncio.to_thread(pull) is not None:
            raise RuntimeError("parts after the trailer")
        size = os.fstat(f.fileno()).st_size
    return Transfer(time.perf_counter() - t0, reading[0], size)


def _baseline_export(sources: dict[str, str], snapshot: str, work: Path) -> tuple[Transfer, list[Path]]:
    """Per disk: ``qemu-img convert`` at the snapshot, then ``zstd -3 -T1``, fsync, rm; (times, .zst files)."""
    convert = 0.0
    t0 = time.perf_counter()
    outs: list[Path] = []
    for target, source in sorted(sources.items()):
        tmp = work / f"baseline-{target}.qcow2"
        out = work / f"baseline-{target}.qcow2.zst"
        t = time.perf_counter()
        _run(["qemu-img", "convert", "-q", "-O", "qcow2", "-U", "-l", f"snapshot.name={snapshot}", source, str(tmp)])
        convert += time.perf_counter() - t
        _run(["zstd", "-q", "-f", "-3", "-T1", str(tmp), "-o", str(out)])
        fd = os.open(out, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp.unlink()
        outs.append(out)
    seconds = time.perf_counter() - t0
    return Transfer(seconds, convert, sum(p.stat().st_size for p in outs)), outs


def _baseline_import(archives: list[Path], work: Path) -> Transfer:
    """Per disk: ``zstd -d`` then ``qemu-img info``; the decompressed files removed afterwards (untimed)."""
    decompress = 0.0
    made: list[Path] = []
    t0 = time.perf_counter()
    try:
        for src in archives:
            dest = work / src.name.replace(".qcow2.zst", ".restored.qcow2")
            made.append(dest)
            t = time.perf_counter()
            _run(["zstd", "-q", "-d", "-f", str(src), "-o", str(dest)])
            decompress += time.perf_counter() - t
            _run(["qemu-img", "info", "--output=json", str(dest)])
        seconds = time.perf_counter() - t0
    finally:
        for path in made:
            path.unlink(missing_ok=True)
    return Transfer(seconds, decompress, sum(p.stat().st_size for p in archives))


async def _transfers(
    mgr: Any, svc: Any, conn: Any, domain: str, vm: str, reps: int, work: Path, made: list[str]
) -> dict[str, list[Transfer]]:
    """Export and import ``reps`` times each way (see the module doc); the imported VMs are deleted."""
    import libvirt

    from clonebox_agent.adapters.libvirt import snapshots

    dom = conn.lookupByName(domain)
    sources = {
        d.target: d.source
        for d in snapshots.snapshot_disks(snapshots.domain_disks(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)))
    }
    out: dict[str, list[Transfer]] = {
        k: []
        for k in (
            "export plain",
            "export encrypted",
            "export baseline",
            "import plain",
            "import encrypted",
            "import baseline",
        )
    }
    plain, sealed = work / "export.cbsnap", work / "export-encrypted.cbsnap"
    zsts: list[Path] = []
    for i in range(reps):
        kinds = ["plain", "encrypted", "baseline"]
        if i % 2:
            kinds.reverse()
        for kind in kinds:
            if kind == "baseline":
                t, zsts = await asyncio.to_thread(_baseline_export, sources, EXPORT_SNAPSHOT, work)
            else:
                target = plain if kind == "plain" else sealed
                t = await _cb_export(mgr, vm, EXPORT_SNAPSHOT, target, PASSPHRASE if kind == "encrypted" else None)
            out[f"export {kind}"].append(t)
        for kind in kinds:
            if kind == "baseline":
                t = await asyncio.to_thread(_baseline_import, zsts, work)
            else:
                name = f"{vm}-imp-{kind[0]}{i}"
                made.append(name)
                archive = plain if kind == "plain" else sealed
                t = await _cb_import(mgr, archive, name, PASSPHRASE if kind == "encrypted" else None)
                await svc.delete(name, request_id="")
                made.remove(name)
            out[f"import {kind}"].append(t)
    for path in (plain, sealed, *zsts):
        path.unlink(missing_ok=True)
    return out


# ---- the run -----------------------------------------------------------------------------------


def _ms_range(values: list[float]) -> str:
    return f"{min(values) * 1000:.0f}-{max(values) * 1000:.0f}" if values else "-"


def _report_cases(cases: list[Case], reps: int, result: BenchResult) -> None:
    table = Table(
        f"snapshot create and restore: CloneBox (agent use case layer) vs raw libvirt, {reps} runs each, medians",
        [
            "case",
            "operation",
            "CloneBox ms",
            "raw libvirt ms",
            "CloneBox min-max",
            "raw min-max",
            "CloneBox / raw",
            "CloneBox - raw ms",
            "goal <= 1.1 x raw + 50 ms",
        ],
    )
    for case in cases:
        for op in ("create", "restore"):
            cb, raw = case.samples[f"cb {op}"], case.samples[f"raw {op}"]
            m_cb, m_raw = median(cb), median(raw)
            allowed = (m_cb - ALLOWANCE_S) / m_raw
            table.rows.append(
                [
                    case.label,
                    op,
                    ms(m_cb),
                    ms(m_raw),
                    _ms_range(cb),
                    _ms_range(raw),
                    f"{m_cb / m_raw:.2f}",
                    f"{(m_cb - m_raw) * 1000:+.0f}",
                    "met" if allowed <= RATIO_GOAL else "MISSED",
                ]
            )
            result.ratios.append(Ratio(f"{case.label}, {op}: (CloneBox - 50 ms) / raw", allowed, f"<= {RATIO_GOAL}"))
    result.tables.append(table)


def _report_transfers(runs: dict[str, list[Transfer]], reps: int, result: BenchResult) -> None:
    first = runs["export plain"][0]
    virtual, image = first.virtual_bytes, first.image_bytes
    names = {
        "export": {
            "baseline": "baseline: qemu-img convert + zstd -3 -T1 + fsync",
            "plain": "CloneBox export (export_disks + write_archive)",
            "encrypted": "CloneBox export, encrypted",
        },
        "import": {
            "baseline": "baseline: zstd -d + qemu-img info",
            "plain": "CloneBox import (read_archive + import_)",
            "encrypted": "CloneBox import, encrypted",
        },
    }
    part = {
        "export": "of which qemu-img convert s (CloneBox: export_disks, until the header)",
        "import": "of which zstd -d s (CloneBox: read_archive: key, decrypt, decompress, parse)",
    }
    for way in ("export", "import"):
        table = Table(
            f"snapshot {way}: {virtual / MIB:.0f} MiB virtual, {image / MIB:.0f} MiB of qcow2 data (2 disks), "
            f"{reps} run(s) each, medians",
            ["path", "median s", "MiB/s virtual", "MiB/s qcow2 data", part[way], "file MiB", "time / baseline"],
        )
        base = median([t.seconds for t in runs[f"{way} baseline"]])
        for kind in ("baseline", "plain", "encrypted"):
            ts = runs[f"{way} {kind}"]
            sec = median([t.seconds for t in ts])
            table.rows.append(
                [
                    names[way][kind],
                    f"{sec:.2f}",
                    f"{virtual / MIB / sec:.0f}",
                    f"{image / MIB / sec:.0f}",
                    f"{median([t.part_seconds for t in ts]):.2f}",
                    f"{median([float(t.file_bytes) for t in ts]) / MIB:.1f}",
                    "-" if kind == "baseline" else f"{sec / base:.2f}",
                ]
            )
        result.tables.append(table)


async def _bench(opts: Options, root: Path, tag: str, result: BenchResult) -> None:
    import libvirt

    from clonebox_agent.adapters.libvirt import LibvirtHypervisor
    from clonebox_agent.app.service import AgentService
    from clonebox_agent.app.snapshots import SnapshotManager, SnapshotSettings
    from clonebox_agent.journal.store import Journal
    from clonebox_core.model import Resources
    from clonebox_core.snapshots import SnapshotKind

    reps = opts.repetitions or (3 if opts.quick else 10)
    io_reps = 1 if opts.quick else 3
    images, raw_dir, work = root / "images", root / "raw", root / "work"
    for folder in (images, raw_dir, work):
        folder.mkdir(mode=0o755)
        os.chmod(folder, 0o755)
    t = time.perf_counter()
    bulk = await asyncio.to_thread(_make_bulk, images, BULK_MIB)
    result.notes.append(f"bulk disk: {BULK_MIB} MiB prepared on the host in {time.perf_counter() - t:.1f} s")

    storage = root / "storage"
    hv = LibvirtHypervisor(
        QEMU_URI, storage, [IMAGES, images], domain_type="qemu", owner=tag, pool_name=f"clonebox-{tag}"
    )
    journal = Journal(root / "state" / "journal.db")
    svc = AgentService(tag, hv, journal, reserve=Resources(0, 0, 0), stop_timeout_seconds=5, cpu_allocation_ratio=8.0)
    mgr = SnapshotManager(svc, hv, SnapshotSettings(storage_dir=str(storage)))
    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    conn = libvirt.open(QEMU_URI)
    cb_vm, raw_vm = f"{tag}-cb", f"{tag}-raw"
    made: list[str] = []
    raw: RawVm | None = None
    try:
        await svc.start()
        await mgr.start(scheduler=False)
        for vm in (cb_vm, raw_vm):
            made.append(vm)
            await svc.create(_spec(vm, bulk), request_id="", start=True)
        raw = RawVm(conn, hv.domain_name(raw_vm), raw_dir)
        waits = await asyncio.gather(_wait_ready(hv, cb_vm), _wait_ready(hv, raw_vm))
        if None in waits:
            result.notes.append(
                f"a guest was not ready within {READY_TIMEOUT:.0f} s: its memory snapshots are of a boot"
            )
        else:
            result.notes.append(f"guests ready (qemu-ga, /data mounted) {max(w or 0 for w in waits):.0f} s after start")
        cases = [
            await _snapshot_case(
                mgr, raw, cb_vm, "internal, running (disks + memory)", SnapshotKind.INTERNAL, True, reps, "run"
            )
        ]
        for vm in (cb_vm, raw_vm):
            await hv.destroy(vm)
        cases.append(
            await _snapshot_case(mgr, raw, cb_vm, "internal, stopped", SnapshotKind.INTERNAL, False, reps, "off")
        )
        await mgr.create(cb_vm, name=EXPORT_SNAPSHOT, kind=SnapshotKind.INTERNAL)
        transfers = await _transfers(mgr, svc, conn, hv.domain_name(cb_vm), cb_vm, io_reps, work, made)
        await mgr.delete(cb_vm, EXPORT_SNAPSHOT)
        for vm in (cb_vm, raw_vm):
            await hv.start(vm)
        cases.append(
            await _snapshot_case(
                mgr, raw, cb_vm, "external disk-only, running", SnapshotKind.EXTERNAL, True, reps, "ext"
            )
        )
    finally:
        if raw is not None:
            with contextlib.suppress(libvirt.libvirtError):
                await asyncio.to_thread(raw.drop_metadata)
        for name in reversed(made):
            try:
                await hv.delete(name)
            except Exception as exc:  # keep cleaning up the others
                result.notes.append(f"cleanup of {name} failed: {exc}")
        try:
            await hv.remove_pool()
        finally:
            conn.close()
            await mgr.close()
            await svc.close()
            journal.close()

    _report_cases(cases, reps, result)
    _report_transfers(transfers, io_reps, result)
    result.notes.append(
        "CloneBox = SnapshotManager in this process (journal, audit event, metadata, the VM's lock) over the "
        "libvirt adapter; restore with --no-backup (the default restore first takes a backup: one create more)"
    )
    result.notes.append(
        "raw external restore = what the adapter does by hand (libvirt 9.0 cannot revert external snapshots): "
        "destroy, qemu-img create per disk, defineXML, redefine the snapshot as current, create"
    )
    result.notes.append(
        "external restores cold-boot the guests: later external runs share the 2 cores with 1-2 booting guests"
    )
    result.data.update(
        {
            "repetitions": reps,
            "transfer_repetitions": io_reps,
            "bulk_mib": BULK_MIB,
            "cases": {c.label: c.samples for c in cases},
            "transfers": {
                k: [{"seconds": x.seconds, "part_seconds": x.part_seconds, "file_bytes": x.file_bytes} for x in v]
                for k, v in transfers.items()
            },
            "load_average": load_average(),
        }
    )


def run(opts: Options) -> BenchResult:
    """Run the snapshot benchmark."""
    result = BenchResult("snapshots", "snapshot create/restore vs raw libvirt; export/import vs qemu-img + zstd")
    reason = _unavailable()
    if reason:
        result.skipped = reason
        return result
    tag = f"bench-snap-{uuid.uuid4().hex[:6]}"
    root = RUN_ROOT / tag
    root.mkdir(parents=True)
    os.chmod(root, 0o755)
    try:
        asyncio.run(_bench(opts, root, tag, result))
    finally:
        if not opts.keep:
            shutil.rmtree(root, ignore_errors=True)
    return result
