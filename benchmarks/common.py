"""
Shared plumbing of the benchmarks: options, results, statistics, tables, machine details, processes.

Every benchmark returns a ``BenchResult``: tables of figures, ratios against a baseline measured in the
same run (each with its goal), notes, and a JSON-able ``data`` dict. Nothing here asserts on speed.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IMAGES = Path(os.environ.get("CLONEBOX_BENCH_IMAGES", "/var/lib/clonebox/images"))
#: QEMU (user libvirt-qemu) must traverse to overlays and console logs: never under /root or /tmp
RUN_ROOT = Path(os.environ.get("CLONEBOX_BENCH_ROOT", "/var/lib/clonebox"))
QEMU_URI = "qemu:///system"


@dataclass(frozen=True)
class Options:
    """Command-line knobs shared by every benchmark (None: the benchmark's default for the mode)."""

    quick: bool = False
    calls: int | None = None
    domains: int | None = None
    repetitions: int | None = None
    kernel: str = "vmlinuz"
    keep: bool = False
    #: bench_plans: the max_parallel values to measure (None: the mode's own)
    parallels: tuple[int, ...] | None = None
    #: bench_plans: the controller's database, "sqlite" (the default) or "postgresql" (a throwaway cluster)
    store: str = "sqlite"


@dataclass(frozen=True)
class Ratio:
    """A ratio of a CloneBox figure to its same-run baseline, with the goal it is held to."""

    label: str
    value: float
    goal: str  # ">= 0.5", "<= 1.1", ...

    @property
    def met(self) -> bool:
        """Tell whether the ratio meets its goal."""
        op, _, bound = self.goal.partition(" ")
        limit = float(bound)
        return self.value >= limit if op == ">=" else self.value <= limit

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"label": self.label, "value": round(self.value, 4), "goal": self.goal, "met": self.met}


@dataclass
class Table:
    """A plain-text table."""

    title: str
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)

    def render(self) -> str:
        """The table as aligned text (also valid Markdown)."""
        widths = [len(h) for h in self.headers]
        for row in self.rows:
            for i, cell in enumerate(row):
                widths[i] = max(widths[i], len(cell))

        def line(cells: Sequence[str]) -> str:
            return "| " + " | ".join(c.ljust(widths[i]) for i, c in enumerate(cells)) + " |"

        sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
        return "\n".join([f"{self.title}", "", line(self.headers), sep, *(line(r) for r in self.rows)])

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"title": self.title, "headers": self.headers, "rows": self.rows}


@dataclass
class BenchResult:
    """What one benchmark found."""

    name: str
    title: str
    tables: list[Table] = field(default_factory=list)
    ratios: list[Ratio] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    skipped: str = ""
    seconds: float = 0.0

    def render(self) -> str:
        """Human-readable report of this benchmark."""
        out = [f"== {self.name}: {self.title} ({self.seconds:.1f} s)"]
        if self.skipped:
            out.append(f"SKIPPED: {self.skipped}")
            return "\n".join(out)
        for t in self.tables:
            out += ["", t.render()]
        if self.ratios:
            out += ["", "Ratios against the same-run baseline:"]
            for r in self.ratios:
                verdict = "goal met" if r.met else "GOAL MISSED"
                out.append(f"  {r.label}: {r.value:.3f}  (goal {r.goal}: {verdict})")
        for n in self.notes:
            out.append(f"  note: {n}")
        return "\n".join(out)

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "name": self.name,
            "title": self.title,
            "skipped": self.skipped,
            "seconds": round(self.seconds, 2),
            "tables": [t.as_dict() for t in self.tables],
            "ratios": [r.as_dict() for r in self.ratios],
            "notes": self.notes,
            "data": self.data,
        }


# ---- statistics ----------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def median(values: Sequence[float]) -> float:
    """Median, NaN for no values."""
    return statistics.median(values) if values else math.nan


def ms(seconds: float) -> str:
    """Seconds as a millisecond figure for a table."""
    if math.isnan(seconds):
        return "-"
    return f"{seconds * 1000:.3f}" if seconds < 0.01 else f"{seconds * 1000:.1f}"


def secs(seconds: float) -> str:
    """Seconds for a table."""
    return "-" if math.isnan(seconds) else f"{seconds:.2f}"


def spread(values: Sequence[float]) -> str:
    """Min-max of some seconds, for a table."""
    return f"{min(values):.2f}-{max(values):.2f}" if values else "-"


# ---- machine details -----------------------------------------------------------------------------


def _first_line(cmd: Sequence[str]) -> str:
    if shutil.which(cmd[0]) is None:
        return "not installed"
    try:
        out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=20, check=False)
    except subprocess.TimeoutExpired:
        return "no answer"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _memory() -> str:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    return "unknown"


def _libvirt_versions() -> tuple[str, str]:
    """(libvirt library version, QEMU version libvirtd reports)."""
    try:
        import libvirt
    except ImportError:
        return "libvirt-python not installed", "unknown"

    def fmt(n: int) -> str:
        major, rest = divmod(int(n), 1_000_000)
        minor, micro = divmod(rest, 1000)
        return f"{major}.{minor}.{micro}"

    lib = fmt(libvirt.getVersion())
    qemu = _first_line(["qemu-system-x86_64", "--version"]).replace("QEMU emulator version ", "")
    with contextlib.suppress(libvirt.libvirtError):
        libvirt.registerErrorHandler(lambda _c, _e: None, None)
        conn = libvirt.open(QEMU_URI)
        try:
            qemu = f"{fmt(conn.getVersion())} via libvirtd (binary: {qemu})"
        finally:
            conn.close()
    return lib, qemu


def machine_info() -> dict[str, str]:
    """CPU, cores, memory, kernel, libvirt/QEMU, Python, grpcio, KVM usability and current load."""
    import grpc

    lib, qemu = _libvirt_versions()
    kvm = "present" if os.path.exists("/dev/kvm") else "absent"
    return {
        "cpu": _cpu_model(),
        "cores": str(os.cpu_count() or 0),
        "memory": _memory(),
        "kernel": f"{platform.system()} {platform.release()}",
        "os": _os_name(),
        "libvirt": lib,
        "qemu": qemu,
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "accelerator": f"TCG (/dev/kvm {kvm}, not usable for guests here)" if kvm == "present" else "TCG",
        "load average at start": " ".join(Path("/proc/loadavg").read_text().split()[:3])
        if os.path.exists("/proc/loadavg")
        else "unknown",
    }


def _os_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    return platform.platform()


def load_average() -> str:
    """The 1-minute load average now (other work on the machine skews every figure)."""
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except (OSError, IndexError):
        return "unknown"


# ---- processes -----------------------------------------------------------------------------------


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_process(args: Sequence[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start ``args`` in its own session with stdout and stderr going to ``log``."""
    with log.open("wb") as out:
        return subprocess.Popen(
            list(args),
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            start_new_session=True,
        )


def stop_process(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds (only this process, by its pid)."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class BenchPki:
    """A throwaway CA for benchmark fleets: one TLS folder per process, as on separate hosts."""

    TRUST_DOMAIN = "bench.test"

    def __init__(self, root: Path) -> None:
        from clonebox_core.security.pki import CertificateAuthority

        self.root = root
        self.ca = CertificateAuthority.init(root / "ca", self.TRUST_DOMAIN)

    def folder(self, kind: str, name: str, role: str | None = None) -> Path:
        """Issue ``kind``/``name`` into ``root/tls-<kind>`` (ca.crt, <kind>.crt, <kind>.key)."""
        from clonebox_core.security.identity import make_identity
        from clonebox_core.security.pki import cert_pem, key_pem, write_private, write_public

        issued = self.ca.issue(make_identity(self.TRUST_DOMAIN, kind, name, role), seconds=86400)
        assert issued.key is not None
        folder = self.root / f"tls-{kind}"
        write_public(folder / "ca.crt", self.ca.cert_pem)
        write_public(folder / f"{kind}.crt", cert_pem(issued.cert))
        write_private(folder / f"{kind}.key", key_pem(issued.key))
        return folder


def wait_serving(
    address: str,
    proc: subprocess.Popen[bytes],
    log: Path,
    timeout: float = 60.0,
    tls: tuple[Path, str, str] | None = None,
) -> None:
    """Wait until ``address`` answers ``grpc.health.v1`` with SERVING; RuntimeError with the log otherwise.

    ``tls`` is (folder, file name, expected server name) for a server that requires mTLS.
    """
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from clonebox_core.rpc.server import Transport, sync_channel
    from clonebox_core.rpc.tls import TlsFiles

    transport = Transport(TlsFiles.in_folder(tls[0], tls[1])) if tls else Transport(None, insecure=True)
    deadline = time.monotonic() + timeout
    with sync_channel(address, transport, tls[2] if tls else None) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            with contextlib.suppress(grpc.RpcError):
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return
            time.sleep(0.1)
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
    raise RuntimeError(f"{address} not SERVING within {timeout:.0f} s (exit code {proc.poll()}); log:\n{tail}")


@contextlib.contextmanager
def timed(into: list[float]) -> Iterator[None]:
    """Append the elapsed seconds of the ``with`` body to ``into``."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        into.append(time.perf_counter() - t0)


def python_module(module: str) -> list[str]:
    """Command line running ``module`` with this interpreter."""
    return [sys.executable, "-m", module]


def console_script(name: str, fallback_module: str) -> list[str]:
    """The installed console script beside this interpreter, else ``python -m``."""
    path = Path(sys.executable).with_name(name)
    return [str(path)] if path.exists() else python_module(fallback_module)


Runner = Callable[[Options], BenchResult]
