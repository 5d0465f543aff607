"""
Multi-VM plans: a 50-VM plan of dependency depth 5 on the fake hypervisor, against its lower bound.

One ``clonebox-controller`` process and one agent process (the FakeHypervisor with a 200 ms sleep at
the entry of every ``create``; mTLS with a throwaway CA, as in ``bench_health``). The agent is
``clonebox_agent.main.Agent`` run by this file (``--agent CONFIG``), because a fake's delays are not
an agent config key: the process is the agent ``clonebox-agent`` would be, with that one delay set.

**The plan** (``plan_text``): 5 levels of 10 services, ``l<level>-<i>``; each service of level k > 0
depends on ``l<k-1>-<i>`` and ``l<k-1>-<i+1 mod 10>`` with condition ``started``; every VM is 1 vCPU,
16 MiB, a 1 MiB blank disk, no network (the fake's 8 CPUs hold 50 with ``cpu_allocation_ratio: 64``).
It is written as a ``clonebox-compose.yaml`` and goes the CLI's way: ``load_plan_text``, each spec
resolved by ``clonebox_cli.plan.resolve_plan`` (no keys given: the agent generates a key pair per VM,
as it would for ``clonebox up``), ``ApplyPlan`` over gRPC, then ``WatchPlan`` until the run is done.
Total = wall time from just before ``ApplyPlan`` to the arrival of the done run version. Each plan is
then taken down (``DestroyPlan`` + ``WatchPlan``, timed the same way) before the next one.

**The lower bound** for ``max_parallel`` P (``lower_bound_slots``): with the fake, a create is the
only thing that takes time, every create takes the same d = 200 ms, and a ``started`` dependent may
begin as soon as its dependencies' creates are done (the fake's create starts the VM). So applying
the plan is scheduling unit-time jobs with precedence constraints on P identical machines, and the
optimum makespan in slots of d is a lower bound for any engine. For every a, b >= 1, the n(a, b)
jobs that have at least a - 1 ancestors in a chain before them (they cannot start before slot a - 1)
and at least b - 1 descendants in a chain after them (they must be done b - 1 slots before the end)
need ceil(n(a, b) / P) slots in between, so ``T >= (a - 1) + ceil(n(a, b) / P) + (b - 1)``. a = b = 1
gives ceil(50 / P); a = depth, b = 1 gives the depth (5); the maximum over all (a, b) is used. For
this graph it is max(depth, ceil(50 / P)) slots: 13 x 200 ms = 2.6 s for P = 4, 5 x 200 ms = 1.0 s
for P = 10. A highest-level-first list schedule (``list_schedule_slots``) reaches the bound for both,
so the bound is the optimum itself, not just a bound. Goal: total / bound <= 1.2.

**Controller overhead per VM** = (total - bound) / 50: the bound is exactly the time the fake spends
in creates along the best schedule. **Controller CPU per VM**: utime + stime of the controller process
from ``/proc/PID/stat`` over the same window, divided by 50 (the agent's is shown beside it).

**Where the time goes**: every version the watch delivers is stamped on arrival, and each VM's first
version in each state gives its phases: *accept* (row CREATING "creating" until "creating on host":
the engine's row write and the controller's create with its reservation transaction), *create*
(until the row is WAITING: the agent's create, with the fake's 200 ms, and the engine's polling of
the operation every ``plans.poll_seconds``), *gate* (WAITING until READY: the engine reads the VM's
state) and *release* (the last dependency READY until the dependent's row is CREATING). A version
the watch skipped (several changes between two reads) makes a phase look longer, never shorter. The
controller sends at most one version per ``plans.watch_min_interval_seconds`` (default 0.1 s, kept
here: the benchmark measures the default), so phases come in steps of about that interval.

Modes: P in (4, 10) (``--max-parallel 1,2,4,10`` for others), R runs each (default 3, ``--quick``: P =
10 once), with ``plans.poll_seconds`` 0.2 s (the controller's default is 1.0 s; changes this controller
commits wake a run at once, so the interval paces only the fallback re-reads). A full run then starts a
second fleet with ``plans.poll_seconds: 0.05`` and applies each P once more, to show how much of the
overhead is that interval. Down time is reported for every run (the fake's delete has no delay: that
time is the controller's alone). Each up and down is followed by the same-run baseline: the same 50 VMs
created with plain ``CreateVm`` + ``WaitOperation``, P at a time with no dependencies, then deleted the
same way (what the VM path costs without the engine).

``--store postgresql`` gives each fleet's controller a throwaway PostgreSQL cluster (the test suite's
``tests/pgcluster.py``, every commit waiting for its fsync as a server does by default) instead of
its SQLite file: the same plan against the HA store.

Run it alone (``benchmarks/run.py`` does not list it yet)::

    .venv/bin/python benchmarks/bench_plans.py [--quick] [--max-parallel P,..] [--store sqlite|postgresql]
        [--repetitions N] [--json FILE] [--keep]

Every wait is bounded; the daemons and the folder (configs, logs, the fleet database) are removed in
``finally``, also on Ctrl-C or SIGTERM (``--keep`` keeps the folder).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any

import grpc.aio
import yaml
from clonebox.controller.v1 import (
    host_service_pb2,
    host_service_pb2_grpc,
    operation_service_pb2,
    operation_service_pb2_grpc,
    plan_service_pb2,
    plan_service_pb2_grpc,
    vm_service_pb2,
    vm_service_pb2_grpc,
)
from clonebox.type.v1 import host_pb2
from common import (
    BenchPki,
    BenchResult,
    Options,
    Ratio,
    Table,
    free_port,
    load_average,
    machine_info,
    median,
    percentile,
    python_module,
    start_process,
    stop_process,
    wait_serving,
)

from clonebox_core.plan import LABEL_PLAN, Plan, PlanRun, VmRunState
from clonebox_core.rpc.server import Transport, aio_channel
from clonebox_core.rpc.tls import TlsFiles

HOST = "bench-plans"
#: the fake's sleep at the entry of every create
CREATE_DELAY = 0.2
DEPTH = 5
WIDTH = 10
#: the goal: total / lower bound
RATIO_GOAL = 1.2
PARALLELS = (4, 10)
#: ``--store`` values
SQLITE, POSTGRES = "sqlite", "postgresql"
QUICK_PARALLEL = 10
DEFAULT_POLL = 0.2
#: the second fleet of a full run
FAST_POLL = 0.05
#: sample the controller's threads with py-spy into FILE.<poll> (raw format) and report where their time
#: went; cProfile would see only the event loop's thread, not the store's worker threads
SPY_ENV = "CLONEBOX_BENCH_PLANS_PYSPY"
SPY_RATE = 100
#: bounds on each wait (never a speed assertion)
RUN_TIMEOUT = 300.0
CALL_TIMEOUT = 60.0

#: phases of a VM in an up run and in a down run, in order (see the module doc)
UP_PHASES = ("creating", "placed", "created", "ready")
DOWN_PHASES = ("deleting", "deleted")


# ---- the plan and its bound ----------------------------------------------------------------------


def service_name(level: int, i: int) -> str:
    """``l<level>-<i>``."""
    return f"l{level}-{i}"


def graph(depth: int = DEPTH, width: int = WIDTH) -> dict[str, list[str]]:
    """Service -> its dependencies: each service of level k > 0 waits for two of level k - 1."""
    deps: dict[str, list[str]] = {}
    for level in range(depth):
        for i in range(width):
            below = [] if level == 0 else [service_name(level - 1, i), service_name(level - 1, (i + 1) % width)]
            deps[service_name(level, i)] = below
    return deps


def plan_text(name: str, max_parallel: int, deps: Mapping[str, Sequence[str]]) -> str:
    """The plan as a ``clonebox-compose.yaml`` (tiny fake specs, every dependency ``started``)."""
    doc: dict[str, Any] = {
        "version": 1,
        "name": name,
        "defaults": {
            "vcpus": 1,
            "memory": "16MiB",
            "disks": [{"name": "root", "size": "1MiB"}],
            "network": {"mode": "none"},
        },
        "vms": {s: {"depends_on": {d: {"condition": "started"} for d in ds}} if ds else None for s, ds in deps.items()},
        "update": {"max_parallel": max_parallel, "healthy_deadline": "2m"},
        "on_failure": "rollback",
    }
    return yaml.safe_dump(doc, sort_keys=False)


def _chains(deps: Mapping[str, Sequence[str]]) -> tuple[dict[str, int], dict[str, int]]:
    """(depth, height) of each job: the longest chain of jobs ending at it, and starting at it (itself counted)."""
    users: dict[str, list[str]] = {s: [] for s in deps}
    for s, ds in deps.items():
        for d in ds:
            users[d].append(s)
    depth: dict[str, int] = {}
    height: dict[str, int] = {}

    def depth_of(s: str) -> int:
        if s not in depth:
            depth[s] = 1 + max((depth_of(d) for d in deps[s]), default=0)
        return depth[s]

    def height_of(s: str) -> int:
        if s not in height:
            height[s] = 1 + max((height_of(u) for u in users[s]), default=0)
        return height[s]

    for s in deps:
        depth_of(s)
        height_of(s)
    return depth, height


def lower_bound_slots(deps: Mapping[str, Sequence[str]], parallel: int) -> int:
    """
    A lower bound on the makespan, in unit slots, of the jobs ``deps`` on ``parallel`` machines.

    The maximum over a, b >= 1 of (a - 1) + ceil(n(a, b) / parallel) + (b - 1), where n(a, b) counts
    the jobs of depth >= a and height >= b (see the module doc); it covers both the critical path and
    ceil(jobs / parallel).
    """
    depth, height = _chains(deps)
    longest = max(depth.values())
    best = longest
    for a in range(1, longest + 1):
        for b in range(1, longest + 1):
            n = sum(1 for s in deps if depth[s] >= a and height[s] >= b)
            if n:
                best = max(best, (a - 1) + math.ceil(n / parallel) + (b - 1))
    return best


def list_schedule_slots(deps: Mapping[str, Sequence[str]], parallel: int) -> int:
    """Slots a highest-level-first list schedule takes (an upper bound on the optimum)."""
    _depth, height = _chains(deps)
    done: set[str] = set()
    slots = 0
    while len(done) < len(deps):
        ready = [s for s in deps if s not in done and all(d in done for d in deps[s])]
        ready.sort(key=lambda s: -height[s])
        done.update(ready[:parallel])
        slots += 1
    return slots


# ---- the agent process ---------------------------------------------------------------------------


def serve_agent(config_path: str, create_delay: float) -> None:
    """Run ``clonebox_agent.main.Agent`` on a FakeHypervisor whose creates sleep ``create_delay`` s first."""
    from clonebox_agent.adapters.fake import FakeHypervisor
    from clonebox_agent.config import AgentConfig
    from clonebox_agent.main import Agent, build_hypervisor
    from clonebox_core.config import load_config
    from clonebox_core.telemetry.logging import setup_logging

    config = load_config(AgentConfig, config_path, "CLONEBOX_AGENT_")
    setup_logging("clonebox-agent", config.log_level, config.log_levels)
    hv = build_hypervisor(config)
    if not isinstance(hv, FakeHypervisor):
        raise SystemExit("bench_plans --agent needs 'hypervisor: fake'")
    hv.faults.delays["create"] = create_delay

    async def serve() -> None:
        agent = Agent(config, hypervisor=hv)
        await agent.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await agent.stop()

    asyncio.run(serve())


# ---- the fleet -----------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` (all its threads) so far, from ``/proc/PID/stat``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Fleet:
    """A controller and an agent process; :meth:`close` stops them and removes the folder."""

    root: Path
    poll: float
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    controller: str = ""
    server_name: str = ""
    transport: Transport | None = None
    #: the controller's database (empty: a SQLite file in ``root``)
    database_url: str = ""
    #: py-spy recording the controller (``CLONEBOX_BENCH_PLANS_PYSPY``), and the file it writes
    spy: subprocess.Popen[bytes] | None = None
    spy_file: Path | None = None

    def channel(self) -> grpc.aio.Channel:
        """A channel to the controller as the user ``bench`` (operator)."""
        assert self.transport is not None
        return aio_channel(self.controller, self.transport, self.server_name)

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of the controller and the agent."""
        return {k: cpu_seconds(p.pid) for k, p in self.procs.items()}

    def start(self) -> None:
        """Controller, then agent, each a process; returns once both serve."""
        root = self.root
        self.controller = f"127.0.0.1:{free_port()}"
        agent = f"127.0.0.1:{free_port()}"
        pki = BenchPki(root)
        ctl_tls, agent_tls = pki.folder("controller", "ctl"), pki.folder("agent", HOST)
        user_tls = pki.folder("user", "bench", "operator")
        self.server_name = f"controller.{pki.TRUST_DOMAIN}"
        self.transport = Transport(TlsFiles.in_folder(user_tls, "user"))
        (root / "controller.yaml").write_text(
            yaml.safe_dump(
                {
                    "listen": self.controller,
                    "tls_dir": str(ctl_tls),
                    "database_url": self.database_url or f"sqlite:///{root / 'fleet.db'}",
                    # in the fleet's folder also with PostgreSQL (whose default is the working directory)
                    "audit": {"key_file": str(root / "audit.key")},
                    "metrics_listen": "127.0.0.1:0",
                    "log_level": "WARNING",
                    "plans": {"poll_seconds": self.poll},
                }
            )
        )
        (root / "agent.yaml").write_text(
            yaml.safe_dump(
                {
                    "name": HOST,
                    "listen": agent,
                    "controller": self.controller,
                    "tls_dir": str(agent_tls),
                    "hypervisor": "fake",
                    "state_dir": str(root / "agent"),
                    "storage_dir": str(root / "agent" / "storage"),
                    "reserve": {"vcpus": 0, "memory_mib": 0, "disk_mib": 0},
                    # the fake has 8 CPUs: 64 vCPUs per CPU hold 50 one-vCPU VMs and more
                    "cpu_allocation_ratio": 64,
                    "metrics_listen": "127.0.0.1:0",
                    "log_level": "WARNING",
                }
            )
        )
        ctl = start_process(
            [*python_module("clonebox_controller.main"), "--config", str(root / "controller.yaml")], root / "c.log"
        )
        self.procs["controller"] = ctl
        wait_serving(self.controller, ctl, root / "c.log", tls=(user_tls, "user", self.server_name))
        self._record(ctl.pid)
        ag = start_process(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--agent",
                str(root / "agent.yaml"),
                "--create-delay",
                str(CREATE_DELAY),
            ],
            root / "a.log",
        )
        self.procs["agent"] = ag
        wait_serving(
            agent, ag, root / "a.log", timeout=120, tls=(ctl_tls, "controller", f"{HOST}.agent.{pki.TRUST_DOMAIN}")
        )

    def _record(self, pid: int) -> None:
        """Start py-spy on the controller when ``CLONEBOX_BENCH_PLANS_PYSPY`` asks for it."""
        prefix = os.environ.get(SPY_ENV, "")
        if not prefix:
            return
        spy = Path(sys.executable).with_name("py-spy")
        found = str(spy) if spy.exists() else shutil.which("py-spy")
        if found is None:
            raise RuntimeError(f"{SPY_ENV} is set, but py-spy is not installed")
        self.spy_file = Path(f"{prefix}.{self.poll:g}")
        args = ["record", "--pid", str(pid), "--rate", str(SPY_RATE), "--format", "raw", "--nonblocking"]
        self.spy = start_process([found, *args, "--output", str(self.spy_file)], self.root / "py-spy.log")

    def close(self, keep: bool = False) -> None:
        """Stop the agent, then the controller (py-spy writes its file then); remove the folder unless ``keep``."""
        for name in ("agent", "controller"):
            if name in self.procs:
                stop_process(self.procs[name], grace=30)
        if self.spy is not None:
            try:
                self.spy.wait(30)
            except subprocess.TimeoutExpired:
                stop_process(self.spy)
        if keep:
            print(f"kept {self.root}", file=sys.stderr)
        else:
            shutil.rmtree(self.root, ignore_errors=True)


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:] if log.exists() else ""


#: what a sample of the controller was doing, by the first of these frames its stack contains
_SPY_BUCKETS = (
    ("_on_begin", "store threads: BEGIN (IMMEDIATE), i.e. waiting for SQLite's write lock"),
    ("HeadFile.append", "store threads: writing the audit head file"),
    ("do_commit", "store threads: COMMIT"),
    ("do_execute", "store threads: executing SQL"),
)
#: leaf frames of a thread that waits for work (py-spy cannot always tell these from busy ones)
_SPY_IDLE = ("_worker (concurrent/futures/thread.py", ".select (selectors.py", "Thread.run (threading.py", ".wait (")


def spy_summary(path: Path) -> list[tuple[str, float]]:
    """Seconds of controller thread time by what it was doing, from a ``py-spy record -f raw`` file."""
    seconds: dict[str, float] = {}
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if not count.isdigit() or any(key in frames[-1] for key in _SPY_IDLE):
            continue
        if any("Store." in f for f in frames):
            found = (name for key, name in _SPY_BUCKETS if any(key in f for f in frames))
            label = next(found, "store threads: Python (ORM, models)")
        else:
            label = "event loop thread: engine, gRPC, protobuf"
        seconds[label] = seconds.get(label, 0.0) + int(count) / SPY_RATE
    return sorted(seconds.items(), key=lambda kv: -kv[1])


async def _wait_host(fleet: Fleet) -> None:
    async with fleet.channel() as channel:
        hosts = host_service_pb2_grpc.HostServiceStub(channel)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            resp = await hosts.ListHosts(host_service_pb2.ListHostsRequest(), timeout=CALL_TIMEOUT)
            if any(h.name == HOST and h.state == host_pb2.HOST_STATE_READY for h in resp.hosts):
                return
            await asyncio.sleep(0.2)
    raise RuntimeError(f"host {HOST} never became READY; agent log:\n{_tail(fleet.root / 'a.log')}")


# ---- one run -------------------------------------------------------------------------------------


@dataclass
class Trace:
    """One run followed through WatchPlan: when each VM first showed each phase (seconds from the call)."""

    seconds: float = math.nan
    #: the run's own duration as the controller recorded it (update_time - create_time)
    server_seconds: float = math.nan
    versions: int = 0
    phases: dict[str, dict[str, float]] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)
    final: PlanRun | None = None


def _phase_index(state: VmRunState, step: str, down: bool) -> int:
    """How far a VM's row has got, as an index into UP_PHASES / DOWN_PHASES (-1: not started)."""
    if down:
        return {VmRunState.DELETING: 0, VmRunState.DELETED: 1}.get(state, -1)
    if state is VmRunState.CREATING:
        return 1 if step.startswith("creating on host") else 0
    return {VmRunState.WAITING: 2, VmRunState.READY: 3}.get(state, -1)


async def _follow(stub: plan_service_pb2_grpc.PlanServiceStub, run_id: str, t0: float, down: bool) -> Trace:
    """Read WatchPlan until the run is done, stamping each VM's phases as they arrive."""
    from clonebox_core.rpc.convert_plan import run_from_proto

    names = DOWN_PHASES if down else UP_PHASES
    trace = Trace()
    call = stub.WatchPlan(plan_service_pb2.WatchPlanRequest(run_id=run_id), timeout=RUN_TIMEOUT)
    async for resp in call:
        now = time.perf_counter() - t0
        run = run_from_proto(resp.run)
        trace.versions += 1
        for v in run.vms:
            seen = trace.phases.setdefault(v.service, {})
            # a skipped version still proves the earlier phases happened by now
            for i in range(_phase_index(v.state, v.step, down) + 1):
                seen.setdefault(names[i], now)
        if run.done:
            trace.seconds = now
            trace.final = run
            if run.create_time is not None and run.update_time is not None:
                trace.server_seconds = (run.update_time - run.create_time).total_seconds()
            return trace
    raise RuntimeError(f"the watch of run {run_id} ended before the run was done")


async def _plan_vms(channel: grpc.aio.Channel, plan: str) -> list[str]:
    vms = vm_service_pb2_grpc.VmServiceStub(channel)
    resp = await vms.ListVms(
        vm_service_pb2.ListVmsRequest(labels={LABEL_PLAN: plan}, page_size=1000), timeout=CALL_TIMEOUT
    )
    return sorted(v.name for v in resp.vms)


def _load(name: str, max_parallel: int, deps: Mapping[str, Sequence[str]], folder: Path) -> Plan:
    """The plan as ``clonebox up`` reads and resolves it."""
    from clonebox_cli.plan import resolve_plan
    from clonebox_core.planfile import PLAN_FILE, load_plan_text

    path = folder / f"{name}-{PLAN_FILE}"
    path.write_text(plan_text(name, max_parallel, deps))
    plan = load_plan_text(path.read_text(), str(path), folder)
    return resolve_plan(plan, folder).plan


@dataclass
class Plain:
    """The baseline: the plan's VMs created (then deleted) with plain CreateVm / DeleteVm, P at a time."""

    create_seconds: float
    create_cpu: dict[str, float]
    delete_seconds: float
    delete_cpu: dict[str, float]


async def _plain(fleet: Fleet, plan: Plan, parallel: int, prefix: str) -> Plain:
    """
    Create every VM of ``plan`` (renamed ``<prefix>-<service>``, no labels, no dependencies) with CreateVm and
    WaitOperation, ``parallel`` at a time, as ``clonebox vm create --wait`` would; then delete them the same way.
    """
    from clonebox_core.rpc.convert import spec_to_proto

    specs = [dataclasses.replace(v.spec, name=f"{prefix}-{v.service}", labels=()) for v in plan.vms]
    out: list[tuple[float, dict[str, float]]] = []
    async with fleet.channel() as channel:
        vms = vm_service_pb2_grpc.VmServiceStub(channel)
        ops = operation_service_pb2_grpc.OperationServiceStub(channel)
        gate = asyncio.Semaphore(parallel)

        async def one(verb: str, spec: Any) -> None:
            async with gate:
                rid = f"bench-{verb}-{spec.name}"
                if verb == "create":
                    create = vm_service_pb2.CreateVmRequest(spec=spec_to_proto(spec), request_id=rid)
                    op = (await vms.CreateVm(create, timeout=CALL_TIMEOUT)).operation
                else:
                    delete = vm_service_pb2.DeleteVmRequest(name=spec.name, request_id=rid)
                    op = (await vms.DeleteVm(delete, timeout=CALL_TIMEOUT)).operation
                wait = operation_service_pb2.WaitOperationRequest(id=op.id, timeout_seconds=int(CALL_TIMEOUT))
                done = (await ops.WaitOperation(wait, timeout=CALL_TIMEOUT + 10)).operation
                if not done.done or done.error.code:
                    raise RuntimeError(f"{verb} {spec.name}: {done.error.message or 'not done in time'}")

        for verb in ("create", "delete"):
            cpu0 = fleet.cpu()
            t0 = time.perf_counter()
            await asyncio.gather(*(one(verb, spec) for spec in specs))
            seconds = time.perf_counter() - t0
            out.append((seconds, {k: v - cpu0[k] for k, v in fleet.cpu().items()}))
    return Plain(out[0][0], out[0][1], out[1][0], out[1][1])


async def _up_and_down(
    fleet: Fleet, name: str, max_parallel: int, deps: Mapping[str, Sequence[str]]
) -> tuple[list[Trace], Plain]:
    """Apply the plan, follow it to the end, take it down again (the two traces); then the plain baseline."""
    from clonebox_core.plan import RunState
    from clonebox_core.rpc.convert_plan import plan_to_proto

    plan = await asyncio.to_thread(_load, name, max_parallel, deps, fleet.root)
    proto = plan_to_proto(plan)
    out: list[Trace] = []
    async with fleet.channel() as channel:
        stub = plan_service_pb2_grpc.PlanServiceStub(channel)
        for action in ("up", "down"):
            cpu0 = fleet.cpu()
            t0 = time.perf_counter()
            if action == "up":
                request = plan_service_pb2.ApplyPlanRequest(plan=proto, request_id=f"bench-{name}-up")
                run = (await stub.ApplyPlan(request, timeout=CALL_TIMEOUT)).run
            else:
                destroy = plan_service_pb2.DestroyPlanRequest(name=name, request_id=f"bench-{name}-down")
                run = (await stub.DestroyPlan(destroy, timeout=CALL_TIMEOUT)).run
            trace = await _follow(stub, run.id, t0, down=action == "down")
            trace.cpu = {k: v - cpu0[k] for k, v in fleet.cpu().items()}
            final = trace.final
            assert final is not None
            if final.state is not RunState.SUCCEEDED:
                raise RuntimeError(f"{action} of plan {name} ended {final.state.value}: {final.error}")
            out.append(trace)
        left = await _plan_vms(channel, name)
        if left:
            raise RuntimeError(f"plan {name} is down, yet {len(left)} of its VMs are listed: {left[:5]}")
    return out, await _plain(fleet, plan, max_parallel, f"c{name}")


# ---- the report ----------------------------------------------------------------------------------


@dataclass
class Case:
    """The runs of one (max_parallel, poll interval)."""

    parallel: int
    poll: float
    bound_slots: int
    list_slots: int
    ups: list[Trace] = field(default_factory=list)
    downs: list[Trace] = field(default_factory=list)
    plains: list[Plain] = field(default_factory=list)

    @property
    def bound(self) -> float:
        """The lower bound in seconds."""
        return self.bound_slots * CREATE_DELAY

    @property
    def label(self) -> str:
        """``max_parallel 4, poll 0.2 s``."""
        return f"max_parallel {self.parallel}, poll {self.poll:g} s"


def _phase_spans(case: Case, deps: Mapping[str, Sequence[str]]) -> dict[str, list[float]]:
    """Each phase's duration for every VM of every up run (seconds)."""
    spans: dict[str, list[float]] = {"accept": [], "create": [], "gate": [], "release": []}
    for trace in case.ups:
        ph = trace.phases
        for s, ds in deps.items():
            p = ph.get(s, {})
            if {"creating", "placed", "created", "ready"} <= p.keys():
                spans["accept"].append(p["placed"] - p["creating"])
                spans["create"].append(p["created"] - p["placed"])
                spans["gate"].append(p["ready"] - p["created"])
            if ds and "creating" in p and all("ready" in ph.get(d, {}) for d in ds):
                spans["release"].append(p["creating"] - max(ph[d]["ready"] for d in ds))
    return spans


def _ms_cell(values: Sequence[float]) -> str:
    if not values:
        return "-"
    return f"{median(values) * 1000:.0f} / {percentile(values, 90) * 1000:.0f}"


def report(cases: Sequence[Case], deps: Mapping[str, Sequence[str]], result: BenchResult) -> None:
    """Tables, ratios and notes of the runs."""
    n = len(deps)
    main = Table(
        f"{n}-VM plan, depth {DEPTH} ({WIDTH} per level, each on two of the level before, condition started), "
        f"fake create {CREATE_DELAY * 1000:.0f} ms: ApplyPlan -> done run version, medians",
        [
            "max_parallel",
            "plans.poll_seconds",
            "runs",
            "total s",
            "min-max s",
            "controller's own s",
            "lower bound s",
            "total / bound",
            f"goal <= {RATIO_GOAL}",
            "overhead per VM ms",
            "controller CPU per VM ms",
            "agent CPU per VM ms",
        ],
    )
    phases = Table(
        "Where each VM's time goes (ms, median / p90 over every VM of every run; see the module doc)",
        [
            "max_parallel",
            "poll s",
            "accept: row + reservation",
            "create: agent (200 ms fake) + op polling",
            "gate: created -> ready",
            "release: deps ready -> creating (incl. waiting for a free slot)",
        ],
    )
    plain = Table(
        f"Baseline in the same runs: the same {n} VMs with plain CreateVm + WaitOperation, max_parallel at a time "
        "(no plan, no dependencies), then DeleteVm the same way; medians",
        [
            "max_parallel",
            "poll s",
            "creates s",
            "their bound s",
            "creates / bound",
            "controller CPU per VM ms",
            "plan total / creates",
            "deletes s",
            "controller CPU per delete ms",
        ],
    )
    down = Table(
        f"DestroyPlan -> done run version ({n} VMs, reverse dependency order, max_parallel at a time; the fake's "
        "delete has no delay), medians",
        ["after", "runs", "total s", "per VM ms", "controller CPU per VM ms"],
    )
    for case in cases:
        totals = [t.seconds for t in case.ups]
        m = median(totals)
        ratio = m / case.bound
        main.rows.append(
            [
                str(case.parallel),
                f"{case.poll:g}",
                str(len(totals)),
                f"{m:.2f}",
                f"{min(totals):.2f}-{max(totals):.2f}",
                f"{median([t.server_seconds for t in case.ups]):.2f}",
                f"{case.bound:.2f} ({case.bound_slots} x {CREATE_DELAY * 1000:.0f} ms)",
                f"**{ratio:.2f}**",
                "met" if ratio <= RATIO_GOAL else "MISSED",
                f"{(m - case.bound) / n * 1000:.1f}",
                f"{median([t.cpu['controller'] for t in case.ups]) / n * 1000:.1f}",
                f"{median([t.cpu['agent'] for t in case.ups]) / n * 1000:.1f}",
            ]
        )
        if case.poll == DEFAULT_POLL:
            result.ratios.append(Ratio(f"max_parallel {case.parallel}: total / lower bound", ratio, f"<= {RATIO_GOAL}"))
        creates = median([x.create_seconds for x in case.plains])
        own_bound = math.ceil(n / case.parallel) * CREATE_DELAY
        plain.rows.append(
            [
                str(case.parallel),
                f"{case.poll:g}",
                f"{creates:.2f}",
                f"{own_bound:.2f}",
                f"{creates / own_bound:.2f}",
                f"{median([x.create_cpu['controller'] for x in case.plains]) / n * 1000:.1f}",
                f"{m / creates:.2f}",
                f"{median([x.delete_seconds for x in case.plains]):.2f}",
                f"{median([x.delete_cpu['controller'] for x in case.plains]) / n * 1000:.1f}",
            ]
        )
        spans = _phase_spans(case, deps)
        phases.rows.append(
            [
                str(case.parallel),
                f"{case.poll:g}",
                _ms_cell(spans["accept"]),
                _ms_cell(spans["create"]),
                _ms_cell(spans["gate"]),
                _ms_cell(spans["release"]),
            ]
        )
        dt = [t.seconds for t in case.downs]
        down.rows.append(
            [
                case.label,
                str(len(dt)),
                f"{median(dt):.2f}",
                f"{median(dt) / n * 1000:.0f}",
                f"{median([t.cpu['controller'] for t in case.downs]) / n * 1000:.1f}",
            ]
        )
        result.data.setdefault("cases", []).append(
            {
                "max_parallel": case.parallel,
                "poll_seconds": case.poll,
                "bound_seconds": case.bound,
                "bound_slots": case.bound_slots,
                "list_schedule_slots": case.list_slots,
                "up_seconds": totals,
                "up_server_seconds": [t.server_seconds for t in case.ups],
                "up_cpu": [t.cpu for t in case.ups],
                "up_versions": [t.versions for t in case.ups],
                "down_seconds": dt,
                "down_cpu": [t.cpu for t in case.downs],
                "plain": [dataclasses.asdict(x) for x in case.plains],
                "phase_medians_ms": {k: round(median(v) * 1000, 1) for k, v in spans.items() if v},
            }
        )
    result.tables += [main, phases, plain, down]
    for case in cases:
        versions = ", ".join(f"{t.versions}" for t in case.ups)
        result.notes.append(f"{case.label}: the watch delivered {versions} run versions per up")
    for case in cases:
        if case.poll != cases[0].poll:
            continue  # the bound depends on max_parallel only: once is enough
        if case.list_slots == case.bound_slots:
            what = "so the bound is the optimum"
        else:
            what = f"the optimum lies in [{case.bound_slots}, {case.list_slots}] slots"
        result.notes.append(
            f"max_parallel {case.parallel}: lower bound {case.bound_slots} slots; a highest-level-first list "
            f"schedule takes {case.list_slots}, {what}"
        )


async def _measure(opts: Options, result: BenchResult, root: Path) -> list[Case]:
    deps = graph()
    parallels = opts.parallels or ((QUICK_PARALLEL,) if opts.quick else PARALLELS)
    reps = opts.repetitions or (1 if opts.quick else 3)
    polls = [(DEFAULT_POLL, reps)] + ([] if opts.quick else [(FAST_POLL, 1)])
    cases: list[Case] = []
    for poll, runs in polls:
        databases = contextlib.ExitStack()
        url = ""
        if opts.store == POSTGRES:
            # a throwaway cluster per fleet, every commit waiting for its fsync (the server's default)
            url = databases.enter_context(_pgcluster().cluster("clonebox_bench", durable=True))
        fleet = Fleet(root / f"poll-{poll:g}", poll, database_url=url)
        fleet.root.mkdir()
        try:
            await asyncio.to_thread(fleet.start)
            await _wait_host(fleet)
            for p in parallels:
                case = Case(p, poll, lower_bound_slots(deps, p), list_schedule_slots(deps, p))
                for i in range(runs):
                    (up, down), plain = await _up_and_down(fleet, f"p{p}r{i}", p, deps)
                    case.ups.append(up)
                    case.downs.append(down)
                    case.plains.append(plain)
                cases.append(case)
        finally:
            fleet.close(keep=opts.keep)
            databases.close()
        if fleet.spy_file is not None and fleet.spy_file.exists():
            _spy_table(fleet, result)
    result.notes.append(f"load average {load_average()} at the end")
    result.notes.append(f"the controller's database: {opts.store}")
    result.data["store"] = opts.store
    return cases


def _spy_table(fleet: Fleet, result: BenchResult) -> None:
    """The py-spy summary of one fleet's controller, as a table."""
    assert fleet.spy_file is not None
    found = spy_summary(fleet.spy_file)
    total = sum(sec for _label, sec in found)
    table = Table(
        f"Controller thread time by activity, poll {fleet.poll:g} s (py-spy, {SPY_RATE} Hz, the fleet's whole life, "
        f"idle waits left out; a thread sleeping in SQLite's busy handler counts as busy)",
        ["activity", "thread seconds", "share"],
    )
    for label, sec in found:
        table.rows.append([label, f"{sec:.2f}", f"{sec / total:.0%}" if total else "-"])
    result.tables.append(table)
    result.data.setdefault("py_spy", {})[f"{fleet.poll:g}"] = dict(found)


def run(opts: Options) -> BenchResult:
    """Run the plans benchmark; the daemons and the folder are removed, also on Ctrl-C."""
    result = BenchResult(
        "plans", f"{DEPTH * WIDTH}-VM plan of depth {DEPTH}, fake create {CREATE_DELAY * 1000:.0f} ms, vs lower bound"
    )
    result.data["machine"] = machine_info()
    root = Path(tempfile.mkdtemp(prefix="clonebox-bench-plans-"))
    try:
        cases = asyncio.run(_measure(opts, result, root))
    finally:
        if not opts.keep:
            shutil.rmtree(root, ignore_errors=True)
    report(cases, graph(), result)
    return result


# ---- standalone ----------------------------------------------------------------------------------


def _pgcluster() -> ModuleType:
    """The test suite's throwaway PostgreSQL (``tests/pgcluster.py``), importable when this file runs alone."""
    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(1, root)
    return importlib.import_module("tests.pgcluster")


def _on_sigterm(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds through the finally clauses: daemons stopped, folder removed


def _parallels(text: str) -> tuple[int, ...]:
    """``--max-parallel``: a comma-separated list of positive integers."""
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers separated by commas, e.g. 1,2,4,10")
    return values


def main(argv: list[str] | None = None) -> int:
    """``bench_plans.py [--quick] [--max-parallel P,..] [--store S] [--repetitions N] [--json FILE] [--keep]``."""
    p = argparse.ArgumentParser(prog="benchmarks/bench_plans.py", description=__doc__.strip().split("\n")[0])
    p.add_argument("--quick", action="store_true", help="max_parallel 10 only, one run, no second fleet")
    p.add_argument("--repetitions", type=int, help="runs per max_parallel (default 3, quick 1)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--keep", action="store_true", help="keep the run folder (configs, daemon logs, fleet database)")
    p.add_argument(
        "--max-parallel",
        type=_parallels,
        metavar="P[,P...]",
        help=f"the max_parallel values to measure (default {','.join(map(str, PARALLELS))}; quick {QUICK_PARALLEL})",
    )
    p.add_argument(
        "--store",
        choices=(SQLITE, POSTGRES),
        default=SQLITE,
        help="the controller's database: a SQLite file (default) or a throwaway PostgreSQL cluster",
    )
    p.add_argument("--agent", metavar="CONFIG", help=argparse.SUPPRESS)
    p.add_argument("--create-delay", type=float, default=CREATE_DELAY, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.agent:
        serve_agent(args.agent, args.create_delay)
        return 0
    if args.store == POSTGRES and (why := _pgcluster().missing()):
        p.error(f"--store {POSTGRES}: cannot start a PostgreSQL cluster here: {why}")
    signal.signal(signal.SIGTERM, _on_sigterm)
    opts = Options(
        quick=args.quick, repetitions=args.repetitions, keep=args.keep, parallels=args.max_parallel, store=args.store
    )
    started = datetime.now(UTC)
    print(f"CloneBox plans benchmark ({'quick' if opts.quick else 'full'} run, {started:%Y-%m-%d %H:%M} UTC)")
    machine = machine_info()
    width = max(len(k) for k in machine)
    for key, value in machine.items():
        print(f"  {key.ljust(width)}  {value}")
    t0 = time.perf_counter()
    try:
        result = run(opts)
    except KeyboardInterrupt:
        print("interrupted; cleaned up", file=sys.stderr)
        return 130
    result.seconds = time.perf_counter() - t0
    result.data.setdefault("load_average_after", load_average())
    print()
    print(result.render(), flush=True)
    if args.json:
        doc = {"started": started.isoformat(timespec="seconds"), "mode": "quick" if opts.quick else "full"}
        Path(args.json).write_text(json.dumps({**doc, "machine": machine, "results": [result.as_dict()]}, indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
