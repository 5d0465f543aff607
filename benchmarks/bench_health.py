"""
Health probes at scale: the agent's CPU for probing 500 VMs, and the delay from a change to ``health watch``.

One ``clonebox-controller`` and one ``clonebox-agent`` (FakeHypervisor, mTLS as in production, each a
process of its own) and ``benchmarks/health_target.py``, a separate process that plays the VMs'
services: the agent's ``fake_probe_network: 127.77.0.0/16`` gives each running VM a loopback address of
its own, and the target listens on every such address with an HTTP port and a TCP port.

Each of the N VMs (default 500; 1 vCPU, 16 MiB, a 1 MiB blank disk: the fake's 8 CPUs and 16 GiB hold
them with ``cpu_allocation_ratio: 64``) has three version-2 checks, every 1 s with a 500 ms timeout,
failure and success threshold 1: ``web`` (http GET / expecting 200), ``port`` (tcp) and ``agent``
(guest_agent). They are created through the controller (CreateVm + WaitOperation, 16 at a time).

1. **Agent CPU.** The baseline first: the same agent with the same N VMs stopped (StopVm, so none is
   probed), utime + stime of the agent process from ``/proc/PID/stat`` over a window of W seconds
   (default 30, ``--quick`` 10). Then every VM is started, and once every VM is healthy the same
   window again: cores = CPU seconds / wall seconds. The probing cost is the difference (goal ≤ 0.3
   core). Probe runs per second come from the target's counters (http and tcp, exact) and from the
   agent's minute aggregates as the controller stores them (every check, when a whole minute of
   steady probing was recorded).
2. **Change → watch.** ``clonebox -o json health watch`` runs as a subprocess; a reader thread stamps
   each line with ``time.monotonic()`` as it arrives. K VMs (default 50, ``--quick`` 20, spread over
   the fleet) have their HTTP listener closed one at a time, spread evenly over one minute (at least
   0.3 s apart), each brought back 3 s later; the target answers with the ``time.monotonic()`` right
   after the change (CLOCK_MONOTONIC is shared by the processes of one machine). The delay is the
   arrival of the ``web`` transition (→ unhealthy, then → healthy) minus that time. Each delay splits
   into the wait for the check's next run (the transition's time, which is when that run started,
   minus the change; by design uniform in [0, interval)) and what follows (the run itself, then
   agent → controller → CLI). Goal: p99 ≤ interval + 100 ms = 1.1 s.

Every wait is bounded; the daemons, the target, the watch and the folder are removed in ``finally``,
also on Ctrl-C (``--keep`` keeps the folder, with the daemons' logs). With
``CLONEBOX_BENCH_HEALTH_PROFILE=FILE`` the agent runs under cProfile and writes its statistics to FILE
(a separate run: the profiler's own cost inflates every figure).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import grpc
import grpc.aio
import yaml
from clonebox.controller.v1 import (
    health_service_pb2,
    health_service_pb2_grpc,
    host_service_pb2,
    host_service_pb2_grpc,
    operation_service_pb2,
    operation_service_pb2_grpc,
    vm_service_pb2,
    vm_service_pb2_grpc,
)
from clonebox.type.v1 import health_pb2, host_pb2
from common import (
    BenchPki,
    BenchResult,
    Options,
    Ratio,
    Table,
    console_script,
    free_port,
    load_average,
    machine_info,
    ms,
    percentile,
    python_module,
    start_process,
    stop_process,
    wait_serving,
)

from clonebox_core.health import HttpProbe, Probe, ProbeType, TcpProbe
from clonebox_core.model import DiskSpec, VmSpec
from clonebox_core.rpc.convert import spec_to_proto
from clonebox_core.rpc.server import Transport, aio_channel
from clonebox_core.rpc.tls import TlsFiles

HOST = "bench-health"
NETWORK = "127.77.0.0/16"
INTERVAL_MS = 1000
TIMEOUT_MS = 500
#: the goal: a change reaches the watch within one interval plus this
GOAL_SLACK = 0.1
GOAL_CORES = 0.3
CREATE_CONCURRENCY = 16
#: changes are spread evenly over this long (see _measure), at least MIN_SPACING apart
FLIP_SPAN = 60.0
MIN_SPACING = 0.3
#: a listener taken down comes back this much later: after its failing run (interval + timeout)
UP_AFTER = 3.0
#: how long after the last change its transition may take to show before it counts as not seen
SEEN_WAIT = 30.0
CALL_TIMEOUT = 30.0
#: the fake counts every create and every boot; a VM here is created (1), booted (2), stopped, started (3)
INDEXES_PER_VM = 3
#: spare target addresses for a create or start that had to be retried
SPARE_ADDRESSES = 64
TARGET = Path(__file__).resolve().parent / "health_target.py"
HEALTHY = health_pb2.HEALTH_STATE_HEALTHY
UNHEALTHY_NAME = "HEALTH_STATE_UNHEALTHY"
HEALTHY_NAME = "HEALTH_STATE_HEALTHY"


# ---- the target process --------------------------------------------------------------------------


class TargetProcess:
    """``health_target.py`` as a child process, driven through its stdin and stdout."""

    def __init__(self, count: int, log: Path) -> None:
        """Start it listening on ``count`` addresses from ``network[2]`` and wait for ``ready``."""
        self._log = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(TARGET), "--network", NETWORK, "--first", "2", "--count", str(count)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            bufsize=1,
            start_new_session=True,  # Ctrl-C reaches the benchmark only; it stops the target itself
        )
        words = self._read(timeout=120).split()
        if words[:1] != ["ready"]:
            raise RuntimeError(f"health target did not start: {' '.join(words)}")
        self.http_port, self.tcp_port = int(words[1]), int(words[2])

    def _read(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        # a bounded wait: the target answers each command at once, or has died
        box: queue.Queue[str] = queue.Queue()
        reader = threading.Thread(target=lambda: box.put(self.proc.stdout.readline() if self.proc.stdout else ""))
        reader.daemon = True
        reader.start()
        try:
            line = box.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"health target: no answer within {timeout:.0f} s") from None
        if not line:
            raise RuntimeError(f"health target exited ({self.proc.poll()})")
        return line.strip()

    def command(self, text: str) -> list[str]:
        """Send one command and return the words of its answer (RuntimeError for ``error ...``)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        words = self._read(timeout=30).split()
        if words[:1] == ["error"]:
            raise RuntimeError(f"health target: {' '.join(words[1:])}")
        return words

    def flip(self, verb: str, address: str) -> tuple[float, float]:
        """``down`` or ``up`` ``address``'s HTTP listener: (monotonic, wall) time the change took effect."""
        words = self.command(f"{verb} {address}")
        return float(words[2]), float(words[3])

    def stats(self) -> tuple[int, int]:
        """(HTTP requests, TCP connections) served so far."""
        words = self.command("stats")
        return int(words[1]), int(words[2])

    def close(self) -> None:
        """Ask it to quit, then SIGTERM/SIGKILL (this process only)."""
        if self.proc.poll() is None and self.proc.stdin is not None:
            with contextlib.suppress(OSError, ValueError):
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                stop_process(self.proc)  # type: ignore[arg-type]
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        self._log.close()


# ---- the watch -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arrival:
    """A transition of a ``web`` check as the watch printed it."""

    vm: str
    to_state: str
    #: when the line arrived here: monotonic and wall-clock seconds
    mono: float
    wall: float
    #: the transition's own time: when the run that caused it started (wall-clock seconds)
    run_start: float


def _timestamp(text: str) -> float:
    """RFC 3339 from the protobuf JSON mapping (up to 9 fractional digits) -> epoch seconds."""
    head, _, frac = text.rstrip("Z").partition(".")
    base = datetime.fromisoformat(head).replace(tzinfo=UTC).timestamp()
    return base + (float("0." + frac) if frac else 0.0)


class Watch:
    """``clonebox -o json health watch`` as a subprocess; a thread stamps each line as it arrives."""

    def __init__(self, cmd: Sequence[str], log: Path, check: str) -> None:
        """Start the watch; transitions of ``check`` are collected."""
        self._log = log.open("wb")
        self.check = check
        self.proc = subprocess.Popen(
            list(cmd), stdout=subprocess.PIPE, stderr=self._log, start_new_session=True, bufsize=0
        )
        self.synced = threading.Event()
        self.arrivals: queue.Queue[Arrival] = queue.Queue()
        self.lines = 0
        self._thread = threading.Thread(target=self._read, name="health-watch-reader", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        stream: IO[bytes] = self.proc.stdout
        for raw in iter(stream.readline, b""):
            # stamped before parsing: the parse is this process's cost, not the pipeline's
            mono, wall = time.monotonic(), time.time()
            self.lines += 1
            try:
                msg = json.loads(raw)
            except ValueError:
                continue
            if msg.get("synced"):
                self.synced.set()
            for t in msg.get("transitions") or ():
                if t.get("check") == self.check and t.get("to_state") in (UNHEALTHY_NAME, HEALTHY_NAME):
                    self.arrivals.put(Arrival(t["vm"], t["to_state"], mono, wall, _timestamp(t["time"])))

    def close(self) -> None:
        """Stop the watch process and its reader."""
        stop_process(self.proc)
        self._thread.join(5)
        if self.proc.stdout is not None:
            with contextlib.suppress(OSError):
                self.proc.stdout.close()
        self._log.close()


# ---- the fleet -----------------------------------------------------------------------------------


@dataclass
class Fleet:
    """Every process and folder of the benchmark, stopped and removed by :meth:`close`."""

    root: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    target: TargetProcess | None = None
    watch: Watch | None = None
    controller: str = ""
    server_name: str = ""
    transport: Transport | None = None

    def channel(self) -> grpc.aio.Channel:
        """A channel to the controller as the user ``bench`` (operator)."""
        assert self.transport is not None
        return aio_channel(self.controller, self.transport, self.server_name)

    def cli(self) -> list[str]:
        """``clonebox --controller ADDR --tls-dir USER``."""
        return [
            *console_script("clonebox", "clonebox_cli.main"),
            "--controller",
            self.controller,
            "--tls-dir",
            str(self.root / "tls-user"),
        ]

    def close(self, keep: bool = False) -> None:
        """Stop the watch, the daemons (agent first, so the controller sees it go) and the target.

        The folder (configs, logs, the fleet database) is removed unless ``keep``.
        """
        if self.watch is not None:
            self.watch.close()
        for name in ("agent", "controller"):
            if name in self.procs:
                stop_process(self.procs[name], grace=30)
        if self.target is not None:
            self.target.close()
        if keep:
            print(f"kept {self.root}", file=sys.stderr)
        else:
            shutil.rmtree(self.root, ignore_errors=True)


def _start(fleet: Fleet, vms: int) -> None:
    """Target, controller and agent, each a process; returns once the agent's host is registered."""
    root = fleet.root
    fleet.target = TargetProcess(INDEXES_PER_VM * vms + SPARE_ADDRESSES, root / "target.log")
    fleet.controller = f"127.0.0.1:{free_port()}"
    agent = f"127.0.0.1:{free_port()}"
    pki = BenchPki(root)
    ctl_tls, agent_tls = pki.folder("controller", "ctl"), pki.folder("agent", HOST)
    user_tls = pki.folder("user", "bench", "operator")
    fleet.server_name = f"controller.{pki.TRUST_DOMAIN}"
    fleet.transport = Transport(TlsFiles.in_folder(user_tls, "user"))
    (root / "images").mkdir()
    (root / "controller.yaml").write_text(
        yaml.safe_dump(
            {
                "listen": fleet.controller,
                "tls_dir": str(ctl_tls),
                "database_url": f"sqlite:///{root / 'fleet.db'}",
                "metrics_listen": "127.0.0.1:0",
                "log_level": "WARNING",
            }
        )
    )
    (root / "agent.yaml").write_text(
        yaml.safe_dump(
            {
                "name": HOST,
                "listen": agent,
                "controller": fleet.controller,
                "tls_dir": str(agent_tls),
                "hypervisor": "fake",
                "fake_probe_network": NETWORK,
                "state_dir": str(root / "agent"),
                "storage_dir": str(root / "agent" / "storage"),
                "image_dirs": [str(root / "images")],
                "reserve": {"vcpus": 0, "memory_mib": 0, "disk_mib": 0},
                # the fake has 8 CPUs: 64 vCPUs per CPU hold 500 one-vCPU VMs (16 GiB hold 500 x 16 MiB)
                "cpu_allocation_ratio": 64,
                "metrics_listen": "127.0.0.1:0",
                "log_level": "WARNING",
            }
        )
    )
    ctl = start_process(
        [*python_module("clonebox_controller.main"), "--config", str(root / "controller.yaml")], root / "c.log"
    )
    fleet.procs["controller"] = ctl
    wait_serving(fleet.controller, ctl, root / "c.log", tls=(user_tls, "user", fleet.server_name))
    profile = os.environ.get("CLONEBOX_BENCH_HEALTH_PROFILE", "")
    runner = [sys.executable, "-m", "cProfile", "-o", profile] if profile else [sys.executable]
    ag = start_process([*runner, "-m", "clonebox_agent.main", "--config", str(root / "agent.yaml")], root / "a.log")
    fleet.procs["agent"] = ag
    wait_serving(
        agent, ag, root / "a.log", timeout=120, tls=(ctl_tls, "controller", f"{HOST}.agent.{pki.TRUST_DOMAIN}")
    )


def _count(log: Path, text: str) -> int:
    """Lines of ``log`` containing ``text`` (0 when there is no log)."""
    return sum(text in line for line in log.read_text(errors="replace").splitlines()) if log.exists() else 0


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:] if log.exists() else ""


def spec(name: str, http_port: int, tcp_port: int) -> VmSpec:
    """A VM as small as the fake allows, with the three checks."""
    common: dict[str, Any] = {
        "interval_ms": INTERVAL_MS,
        "timeout_ms": TIMEOUT_MS,
        "failure_threshold": 1,
        "success_threshold": 1,
    }
    checks = (
        Probe("web", ProbeType.HTTP, http=HttpProbe(port=http_port, path="/", expect_status=(200,)), **common),
        Probe("port", ProbeType.TCP, tcp=TcpProbe(port=tcp_port), **common),
        Probe("agent", ProbeType.GUEST_AGENT, **common),
    )
    return VmSpec(name=name, vcpus=1, memory_mib=16, disks=(DiskSpec("root", size_mib=1),), health_checks=checks)


async def _wait_ready(fleet: Fleet) -> None:
    async with fleet.channel() as channel:
        hosts = host_service_pb2_grpc.HostServiceStub(channel)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            resp = await hosts.ListHosts(host_service_pb2.ListHostsRequest(), timeout=CALL_TIMEOUT)
            if any(h.name == HOST and h.state == host_pb2.HOST_STATE_READY for h in resp.hosts):
                return
            await asyncio.sleep(0.2)
    raise RuntimeError(f"host {HOST} never became READY; agent log:\n{_tail(fleet.root / 'a.log')}")


async def _each(fleet: Fleet, names: Sequence[str], verb: str, http_port: int = 0, tcp_port: int = 0) -> float:
    """Create, stop or start every VM through the controller, CREATE_CONCURRENCY at a time; seconds taken."""
    async with fleet.channel() as channel:
        vms = vm_service_pb2_grpc.VmServiceStub(channel)
        ops = operation_service_pb2_grpc.OperationServiceStub(channel)
        gate = asyncio.Semaphore(CREATE_CONCURRENCY)

        async def one(name: str) -> None:
            async with gate:
                rid = f"bench-{verb}-{name}"
                if verb == "create":
                    req = vm_service_pb2.CreateVmRequest(
                        spec=spec_to_proto(spec(name, http_port, tcp_port)), request_id=rid
                    )
                    op = (await vms.CreateVm(req, timeout=CALL_TIMEOUT)).operation
                elif verb == "stop":
                    stop = vm_service_pb2.StopVmRequest(name=name, request_id=rid, force=True)
                    op = (await vms.StopVm(stop, timeout=CALL_TIMEOUT)).operation
                else:
                    start = vm_service_pb2.StartVmRequest(name=name, request_id=rid)
                    op = (await vms.StartVm(start, timeout=CALL_TIMEOUT)).operation
                waited = await ops.WaitOperation(
                    operation_service_pb2.WaitOperationRequest(id=op.id, timeout_seconds=120), timeout=130
                )
                done = waited.operation
                if not done.done or done.error.code:
                    raise RuntimeError(f"{verb} {name}: operation ended {done.error.message or 'not done'}")

        t0 = time.monotonic()
        await asyncio.gather(*(one(n) for n in names))
        return time.monotonic() - t0


async def _list_health(
    fleet: Fleet, states: Sequence[health_pb2.HealthState.ValueType] = ()
) -> list[health_pb2.VmHealth]:
    async with fleet.channel() as channel:
        stub = health_service_pb2_grpc.HealthServiceStub(channel)
        resp = await stub.ListHealth(health_service_pb2.ListHealthRequest(states=states), timeout=CALL_TIMEOUT)
        return list(resp.health)


async def _wait_healthy(fleet: Fleet, names: Sequence[str], timeout: float) -> dict[str, str]:
    """Wait until every VM is healthy; each VM's probe address (from its web check's last detail)."""
    deadline = time.monotonic() + timeout
    # only the VMs not healthy yet are listed while waiting: a full listing of 500 VMs every second
    # would itself keep the controller busy
    others = [health_pb2.HEALTH_STATE_UNKNOWN, health_pb2.HEALTH_STATE_DEGRADED, health_pb2.HEALTH_STATE_UNHEALTHY]
    wanted = set(names)
    while time.monotonic() < deadline:
        pending = [h for h in await _list_health(fleet, others) if h.vm in wanted]
        if not pending:
            break
        await asyncio.sleep(1.0)
    else:
        raise RuntimeError(f"{len(pending)} of {len(names)} VMs still not healthy after {timeout:.0f} s")
    addresses: dict[str, str] = {}
    for h in await _list_health(fleet):
        if h.vm in wanted:
            web = next(c for c in h.checks if c.name == "web")
            # "127.77.1.9: status 200": the address that passed
            addresses[h.vm] = web.last.detail.split(":", 1)[0]
    if len(addresses) != len(names):
        raise RuntimeError(f"the controller lists {len(addresses)} of {len(names)} VMs")
    return addresses


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of process ``pid`` and its threads so far, from ``/proc/PID/stat``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


@dataclass
class CpuWindow:
    """CPU seconds of the agent (and, for context, the controller and the target) over a wall window."""

    label: str
    wall: float
    agent: float
    agent_system: float
    controller: float
    target: float
    http: int
    tcp: int

    def cores(self, who: str = "agent") -> float:
        """CPU seconds per wall second of ``who``."""
        return float(getattr(self, who)) / self.wall if self.wall > 0 else math.nan


def _pids(fleet: Fleet) -> dict[str, int]:
    assert fleet.target is not None
    return {k: p.pid for k, p in fleet.procs.items()} | {"target": fleet.target.proc.pid}


async def _cpu_window(fleet: Fleet, label: str, seconds: float) -> CpuWindow:
    assert fleet.target is not None
    pids = _pids(fleet)
    http0, tcp0 = fleet.target.stats()
    cpu0 = {k: cpu_split(pid) for k, pid in pids.items()}
    t0 = time.monotonic()
    await asyncio.sleep(seconds)
    cpu1 = {k: cpu_split(pid) for k, pid in pids.items()}
    t1 = time.monotonic()
    http1, tcp1 = fleet.target.stats()
    d = {k: sum(cpu1[k]) - sum(cpu0[k]) for k in pids}
    system = cpu1["agent"][1] - cpu0["agent"][1]
    return CpuWindow(label, t1 - t0, d["agent"], system, d["controller"], d["target"], http1 - http0, tcp1 - tcp0)


async def _settle(fleet: Fleet, limit: float = 90.0) -> float:
    """Wait (at most ``limit`` s) until the controller is done with a burst (under 0.15 core for 2 s in a row).

    After 500 starts or stops the controller stores the agent's health updates for a while; a window
    opened before would measure that, not the steady state. Returns the seconds waited.
    """
    pid = fleet.procs["controller"].pid
    t0 = time.monotonic()
    quiet = 0
    while time.monotonic() - t0 < limit and quiet < 2:
        before = sum(cpu_split(pid))
        await asyncio.sleep(1.0)
        quiet = quiet + 1 if sum(cpu_split(pid)) - before < 0.15 else 0
    return time.monotonic() - t0


@dataclass(frozen=True)
class Delay:
    """One measured change: total delay, the wait for the next run, and the rest (seconds)."""

    vm: str
    total: float
    schedule: float
    pipeline: float
    #: seconds past the minute of the change (minute aggregates close at the turn of a minute)
    second: float


def _flip_all(
    fleet: Fleet, addresses: dict[str, str], chosen: Sequence[str], spacing: float, wait: float
) -> tuple[list[Delay], list[Delay]]:
    """Take each chosen VM's HTTP listener down, ``spacing`` s apart, and back up ``UP_AFTER`` s later.

    Returns the delays of the ``web`` transitions to unhealthy and back to healthy, each matched to the
    first such transition of that VM printed after its change.
    """
    assert fleet.target is not None and fleet.watch is not None
    plan = sorted(
        [(i * spacing, "down", vm) for i, vm in enumerate(chosen)]
        + [(i * spacing + UP_AFTER, "up", vm) for i, vm in enumerate(chosen)]
    )
    changes: dict[tuple[str, str], tuple[float, float]] = {}
    arrivals: list[Arrival] = []
    t0 = time.monotonic()
    for at, verb, vm in plan:
        while (pause := t0 + at - time.monotonic()) > 0:
            with contextlib.suppress(queue.Empty):
                arrivals.append(fleet.watch.arrivals.get(timeout=pause))
        changes[(vm, UNHEALTHY_NAME if verb == "down" else HEALTHY_NAME)] = fleet.target.flip(verb, addresses[vm])
    found: dict[tuple[str, str], Arrival] = {}
    deadline = time.monotonic() + wait
    while True:
        for a in arrivals:
            key = (a.vm, a.to_state)
            if key in changes and key not in found and a.mono >= changes[key][0]:
                found[key] = a
        arrivals.clear()
        if len(found) == len(changes) or time.monotonic() > deadline:
            break
        with contextlib.suppress(queue.Empty):
            arrivals.append(fleet.watch.arrivals.get(timeout=0.2))
    out: dict[str, list[Delay]] = {UNHEALTHY_NAME: [], HEALTHY_NAME: []}
    for (vm, state), a in found.items():
        mono, wall = changes[(vm, state)]
        out[state].append(Delay(vm, a.mono - mono, a.run_start - wall, a.wall - a.run_start, wall % 60))
    return out[UNHEALTHY_NAME], out[HEALTHY_NAME]


async def _runs_per_second(fleet: Fleet, names: Sequence[str], start: float, end: float) -> dict[str, float]:
    """Probe runs per second per check from the stored minute aggregates of whole minutes in [start, end]."""
    first = datetime.fromtimestamp(math.ceil(start / 60) * 60, UTC)
    last = datetime.fromtimestamp(math.floor(end / 60) * 60, UTC)  # exclusive: that minute is not over
    if last <= first:
        return {}
    runs: dict[str, int] = {}
    async with fleet.channel() as channel:
        stub = health_service_pb2_grpc.HealthServiceStub(channel)
        gate = asyncio.Semaphore(8)

        async def one(name: str) -> None:
            async with gate:
                req = health_service_pb2.GetHealthHistoryRequest(name=name, limit=1)
                req.since.FromDatetime(first - timedelta(minutes=1))
                resp = await stub.GetHealthHistory(req, timeout=CALL_TIMEOUT)
                for a in resp.aggregates:
                    if first <= a.minute.ToDatetime(tzinfo=UTC) < last:
                        runs[a.check] = runs.get(a.check, 0) + a.passes + a.warnings + a.failures + a.no_data

        await asyncio.gather(*(one(n) for n in names))
    seconds = (last - first).total_seconds()
    return {check: n / seconds for check, n in sorted(runs.items())}


def _delay_row(label: str, delays: Sequence[Delay], expected: int, goal: float) -> list[str]:
    totals = [d.total for d in delays]
    return [
        label,
        f"{len(delays)}/{expected}",
        ms(percentile(totals, 50)),
        ms(percentile(totals, 95)),
        ms(percentile(totals, 99)),
        ms(max(totals)) if totals else "-",
        ms(percentile([d.schedule for d in delays], 50)),
        ms(max(d.schedule for d in delays)) if delays else "-",
        ms(percentile([d.pipeline for d in delays], 50)),
        ms(percentile([d.pipeline for d in delays], 99)),
        f"{percentile(totals, 99) / goal:.2f}" if totals else "-",
    ]


async def _measure(fleet: Fleet, opts: Options) -> BenchResult:
    vms = opts.domains or 500
    window = 10.0 if opts.quick else 30.0
    flips = min(opts.calls or (20 if opts.quick else 50), vms)
    goal = INTERVAL_MS / 1000 + GOAL_SLACK
    result = BenchResult("health", f"{vms} VMs x 3 probes every 1 s: agent CPU, and change -> health watch delay")
    result.data["machine"] = machine_info()
    names = [f"h{i:04d}" for i in range(vms)]

    await asyncio.to_thread(_start, fleet, vms)
    assert fleet.target is not None
    await _wait_ready(fleet)
    created = await _each(fleet, names, "create", fleet.target.http_port, fleet.target.tcp_port)
    stopped = await _each(fleet, names, "stop")
    settled = [await _settle(fleet)]
    baseline = await _cpu_window(fleet, "baseline: same VMs stopped (nothing to probe)", window)
    started = await _each(fleet, names, "start")
    t_started = time.time()
    addresses = await _wait_healthy(fleet, names, timeout=120)
    healthy_after = time.time() - t_started
    settled.append(await _settle(fleet))
    probing = await _cpu_window(fleet, "probing: 3 checks per VM, all healthy", window)
    load = load_average()

    fleet.watch = Watch([*fleet.cli(), "-o", "json", "health", "watch"], fleet.root / "watch.log", "web")
    if not await asyncio.to_thread(fleet.watch.synced.wait, 120):
        raise RuntimeError(f"health watch never synced:\n{_tail(fleet.root / 'watch.log')}")
    await asyncio.sleep(1)
    chosen = [names[i * vms // flips] for i in range(flips)]
    # Spread over a whole minute, not 0.3 s apart: once a minute every check's minute aggregate closes
    # at once, and a burst of K changes 0.3 s apart would include that turn of the minute in some runs
    # and not in others. Evenly spread, the share of changes near the turn is what it is in the long run.
    spacing = max(MIN_SPACING, FLIP_SPAN / flips)
    down, up = await asyncio.to_thread(_flip_all, fleet, addresses, chosen, spacing, SEEN_WAIT)
    t_end = time.time()
    lines = fleet.watch.lines
    rates = await _runs_per_second(fleet, names, t_started + healthy_after + 2, t_end)

    # ---- report ----------------------------------------------------------------------------------
    extra = probing.cores() - baseline.cores()
    cpu = Table(
        f"Agent CPU with {vms} VMs (utime + stime from /proc, {window:.0f} s windows)",
        [
            "window",
            "agent cores",
            "of which kernel",
            "controller cores",
            "target cores",
            "http req/s",
            "tcp conn/s",
        ],
    )
    for w in (baseline, probing):
        cpu.rows.append(
            [
                w.label,
                f"{w.cores():.3f}",
                f"{w.cores('agent_system'):.3f}",
                f"{w.cores('controller'):.3f}",
                f"{w.cores('target'):.3f}",
                f"{w.http / w.wall:.0f}",
                f"{w.tcp / w.wall:.0f}",
            ]
        )
    # http and tcp runs are counted by the target; guest_agent runs on the same schedule
    probes_per_s = (probing.http + probing.tcp) / probing.wall * 3 / 2
    per_run_us = extra / probes_per_s * 1e6 if probes_per_s else math.nan
    cpu.rows.append(
        [
            "probing - baseline",
            f"**{extra:.3f}**",
            f"{probing.cores('agent_system') - baseline.cores('agent_system'):.3f}",
            f"{probing.cores('controller') - baseline.cores('controller'):.3f}",
            "",
            "",
            "",
        ]
    )
    result.tables.append(cpu)
    lat = Table(
        f"Change -> `clonebox -o json health watch` line, {flips} VMs taken down {spacing:.1f} s apart, "
        f"each back {UP_AFTER:.0f} s later "
        f"(interval {INTERVAL_MS} ms; goal p99 <= {goal * 1000:.0f} ms)",
        [
            "change",
            "seen",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "max ms",
            "wait for run p50",
            "wait max",
            "after run p50",
            "after run p99",
            "p99 / goal",
        ],
    )
    lat.rows.append(_delay_row("listener closed -> web unhealthy", down, flips, goal))
    lat.rows.append(_delay_row("listener back -> web healthy", up, flips, goal))
    result.tables.append(lat)
    result.ratios.append(Ratio("agent cores for probing (probing - baseline)", extra, f"<= {GOAL_CORES}"))
    both = [d.total for d in (*down, *up)]
    if both:
        result.ratios.append(Ratio("p99 change -> watch / (interval + 100 ms)", percentile(both, 99) / goal, "<= 1.0"))
    result.notes.append(
        f"created {vms} VMs in {created:.1f} s, stopped them in {stopped:.1f} s, started them in {started:.1f} s; "
        f"all healthy {healthy_after:.1f} s after the last start; load average {load} after the probing window"
    )
    result.notes.append(
        f"probe runs/s during the window: {probing.http / probing.wall:.0f} http"
        f" + {probing.tcp / probing.wall:.0f} tcp "
        f"(target counters), about {probes_per_s:.0f} with guest_agent (expected {3 * vms}): "
        f"{per_run_us:.0f} us of agent CPU per probe run"
    )
    result.notes.append(f"waited {settled[0]:.0f} s and {settled[1]:.0f} s for the controller to settle")
    if rates:
        shown = ", ".join(f"{k} {v:.0f}" for k, v in rates.items())
        result.notes.append(
            f"runs/s per check from the stored minute aggregates: {shown} (total {sum(rates.values()):.0f})"
        )
    if len(down) < flips or len(up) < flips:
        result.notes.append(
            f"transitions not seen within {SEEN_WAIT:.0f} s of the last change: "
            f"{flips - len(down)} down, {flips - len(up)} up"
        )
    result.notes.append(f"the watch printed {lines} lines")
    # the agent ends a controller's health stream that falls 1,000 updates behind; the controller then
    # re-syncs from a snapshot, and what changed in between reaches neither the store nor any watcher
    overflows = _count(fleet.root / "c.log", "fell too far behind")
    reconnects = _count(fleet.root / "watch.log", "reconnecting")
    if overflows or reconnects:
        result.notes.append(
            f"during the run (starts included) the agent ended the controller's health stream {overflows} time(s) "
            f"for falling behind (HEALTH_WATCH_OVERFLOW: updates in between are lost); the CLI watch reconnected "
            f"{reconnects} time(s)"
        )
    late = sorted((d for d in (*down, *up) if d.total > goal), key=lambda d: -d.total)
    if late:
        shown = ", ".join(f"{d.total * 1000:.0f} ms at :{d.second:04.1f}" for d in late[:8])
        result.notes.append(f"over the goal (delay at seconds past the minute): {shown}")
    result.data.update(
        {
            "vms": vms,
            "window_seconds": window,
            "flips": flips,
            "flip_spacing_seconds": spacing,
            "cpu": [w.__dict__ for w in (baseline, probing)],
            "agent_cores_probing_minus_baseline": round(extra, 4),
            "runs_per_second_from_aggregates": {k: round(v, 1) for k, v in rates.items()},
            "delays_down": [d.__dict__ for d in down],
            "delays_up": [d.__dict__ for d in up],
            "create_seconds": round(created, 2),
            "agent_stream_overflows": overflows,
            "watch_reconnects": reconnects,
            "agent_cpu_us_per_probe_run": round(per_run_us, 1),
        }
    )
    return result


def run(opts: Options) -> BenchResult:
    """Run the health benchmark; every process and the folder are removed, also on Ctrl-C."""
    fleet = Fleet(Path(tempfile.mkdtemp(prefix="clonebox-bench-health-")))
    try:
        return asyncio.run(_measure(fleet, opts))
    finally:
        fleet.close(keep=opts.keep)
