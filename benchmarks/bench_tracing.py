"""
GetVm through the controller with tracing exporting, against the same fleet with tracing off, same run.

Three mTLS fleets run side by side, each a ``clonebox-controller`` and one ``clonebox-agent``
(FakeHypervisor) as their own processes on 127.0.0.1, set up as in ``bench_mtls`` (one VM each):

- ``off``: ``OTEL_SDK_DISABLED=true``, no spans at all (the baseline);
- ``default``: the out-of-the-box setting, spans with ids (for log correlation), exported nowhere;
- ``exporting``: ``OTEL_EXPORTER_OTLP_ENDPOINT`` set, spans go through the batch span processor to a
  real OTLP/gRPC receiver (``TraceService/Export``) running in this process, which decodes and counts
  them.

The controller's GetVm refreshes the VM from its agent on every call, so each call makes three spans
(controller server, controller -> agent client, agent server). The client is the same for all fleets
(``aio_channel`` with the user's certificate, raw bytes in and out, no trace context of its own); the
modes take turns in slices, the order rotating every slice, so drift in machine load hits all alike.
Every loop is bounded by a count and a time limit; the daemons and the folder are removed in ``finally``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
from bench_mtls import (
    GETVM_METHOD,
    HOST,
    PAYLOAD,
    TRUST_DOMAIN,
    Fleet,
    Load,
    Pki,
    _create_vm,
    _merge,
    _wait_serving,
    _write_configs,
    load_slice,
)
from common import (
    BenchResult,
    Options,
    Ratio,
    Table,
    median,
    ms,
    percentile,
    python_module,
    start_process,
    stop_process,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from clonebox_core.rpc.server import Transport
from clonebox_core.rpc.tls import TlsFiles

MODES = ("off", "default", "exporting")
CONCURRENCY = (1, 8)
CALL_TIMEOUT = 10.0


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver that counts the spans it is sent."""

    def __init__(self) -> None:
        self.spans = 0
        self.requests = 0
        self._lock = threading.Lock()

    def Export(self, request: Any, context: Any) -> Any:
        count = sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
        with self._lock:
            self.spans += count
            self.requests += 1
        return trace_service_pb2.ExportTraceServiceResponse()


@contextlib.contextmanager
def receiver() -> Iterator[tuple[Receiver, int]]:
    """A receiver on 127.0.0.1:0 (its own thread pool in this process)."""
    collector = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield collector, port
    finally:
        server.stop(0)


def _env(mode: str, port: int) -> dict[str, str]:
    # every OTEL_* that matters is set explicitly, so the caller's environment cannot change a mode
    env = {
        "OTEL_SDK_DISABLED": "true" if mode == "off" else "false",
        "OTEL_TRACES_EXPORTER": "otlp" if mode == "exporting" else "none",
        "OTEL_TRACES_SAMPLER": "parentbased_always_on",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "",
    }
    if mode == "exporting":
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{port}"
        env["OTEL_EXPORTER_OTLP_INSECURE"] = "true"
    return env


@asynccontextmanager
async def fleets(root: Path, port: int) -> AsyncIterator[dict[str, Fleet]]:
    """One mTLS fleet per mode, each with its VM; every daemon stopped afterwards."""
    pki = Pki(root / "pki")
    # the client is a user with the operator role (CreateVm); GetVm needs only viewer
    transport = Transport(TlsFiles.in_folder(pki.folder("user", "bench", "operator"), "user"))
    ctl_name, agent_name = f"controller.{TRUST_DOMAIN}", f"{HOST}.agent.{TRUST_DOMAIN}"
    out: dict[str, Fleet] = {}
    try:
        for mode in MODES:
            folder = root / mode
            folder.mkdir()
            controller, agent = _write_configs(folder, pki)
            fleet = Fleet(mode, controller, transport, ctl_name)
            out[mode] = fleet
            for name, log in (("controller", "c.log"), ("agent", "a.log")):
                cmd = [*python_module(f"clonebox_{name}.main"), "--config", str(folder / f"{name}.yaml")]
                fleet.procs[name] = start_process(cmd, folder / log, _env(mode, port))
                address, server_name = (controller, ctl_name) if name == "controller" else (agent, agent_name)
                await _wait_serving(address, transport, server_name, fleet.procs[name], folder / log)
            await _create_vm(fleet, folder)
        yield out
    finally:
        for fleet in out.values():
            for proc in fleet.procs.values():
                stop_process(proc)


async def load_round(
    fleets_: dict[str, Fleet], concurrency: int, calls: int, slices: int, max_seconds: float, warmup: int, shift: int
) -> dict[str, Load]:
    """One round: ``calls`` per mode in ``slices`` slices, the modes taking turns (order rotating per slice)."""
    parts: dict[str, list[Load]] = {m: [] for m in MODES}
    per_slice = max(1, calls // slices)
    async with contextlib.AsyncExitStack() as stack:
        calls_by_mode: dict[str, Any] = {}
        for mode in MODES:
            channel = await stack.enter_async_context(fleets_[mode].channel())
            call = channel.unary_unary(GETVM_METHOD)  # no serializers: bytes in, bytes out
            for _ in range(warmup):
                await call(PAYLOAD, timeout=CALL_TIMEOUT)
            calls_by_mode[mode] = call
        deadline = time.perf_counter() + 3 * max_seconds
        for i in range(slices):
            if time.perf_counter() > deadline:
                break
            k = (i + shift) % len(MODES)
            for mode in MODES[k:] + MODES[:k]:
                part = await load_slice(fleets_[mode], calls_by_mode[mode], concurrency, per_slice, max_seconds)
                parts[mode].append(part)
    return {m: _merge(parts[m]) for m in MODES}


def _per_rpc_us(loads: list[Load], attr: str) -> float:
    done = sum(ld.completed for ld in loads)
    return sum(getattr(ld, attr) for ld in loads) / done * 1e6 if done else math.nan


async def _measure(opts: Options) -> BenchResult:
    calls = 300 if opts.quick else 2000
    rounds = 1 if opts.quick else 3
    slices = 6 if opts.quick else 12
    max_seconds = 20.0 if opts.quick else 45.0
    warmup = 30 if opts.quick else 100
    result = BenchResult("tracing", "controller GetVm (-> agent) with OTLP export on vs tracing off, mTLS")
    loads: dict[tuple[str, int], list[Load]] = {}
    root = Path(tempfile.mkdtemp(prefix="clonebox-bench-tracing-"))
    try:
        with receiver() as (collector, port):
            async with fleets(root, port) as fl:
                for r in range(rounds):
                    for conc in CONCURRENCY:
                        by_mode = await load_round(fl, conc, calls, slices, max_seconds, warmup, r)
                        for mode, load in by_mode.items():
                            loads.setdefault((mode, conc), []).append(load)
            # the daemons flushed their batches on SIGTERM
            received, exports = collector.spans, collector.requests
    finally:
        shutil.rmtree(root, ignore_errors=True)

    table = Table(
        f"GetVm via the controller over mTLS: {calls} calls per cell and round (modes taking turns in {slices} "
        f"slices), median RPC/s of {rounds} round(s), latency over all rounds",
        [
            "tracing",
            "in flight",
            "calls",
            "RPC/s",
            "p50 ms",
            "p95 ms",
            "controller CPU us/RPC",
            "agent CPU us/RPC",
            "p50 / off",
            "p95 / off",
        ],
    )
    cells: list[dict[str, Any]] = []
    for conc in CONCURRENCY:
        lat = {m: [x for ld in loads[(m, conc)] for x in ld.latencies] for m in MODES}
        p50 = {m: percentile(lat[m], 50) for m in MODES}
        p95 = {m: percentile(lat[m], 95) for m in MODES}
        rps = {m: median([ld.rps for ld in loads[(m, conc)]]) for m in MODES}
        for m in MODES:
            cpu = {k: _per_rpc_us(loads[(m, conc)], f"{k}_cpu") for k in ("controller", "agent")}
            done = sum(ld.completed for ld in loads[(m, conc)])
            base = m == "off"
            table.rows.append(
                [
                    m,
                    str(conc),
                    str(done),
                    f"{rps[m]:.0f}",
                    ms(p50[m]),
                    ms(p95[m]),
                    f"{cpu['controller']:.0f}",
                    f"{cpu['agent']:.0f}",
                    "(baseline)" if base else f"{p50[m] / p50['off']:.2f}",
                    "(baseline)" if base else f"{p95[m] / p95['off']:.2f}",
                ]
            )
            cells.append(
                {
                    "tracing": m,
                    "concurrency": conc,
                    "completed": done,
                    "rps": round(rps[m], 1),
                    "p50_ms": round(p50[m] * 1000, 3),
                    "p95_ms": round(p95[m] * 1000, 3),
                    **{f"{k}_cpu_us_per_rpc": round(v, 1) for k, v in cpu.items()},
                }
            )
        result.ratios.append(
            Ratio(f"exporting/off GetVm p50 latency, {conc} in flight", p50["exporting"] / p50["off"], "<= 1.15")
        )
        result.ratios.append(
            Ratio(f"exporting/off GetVm p95 latency, {conc} in flight", p95["exporting"] / p95["off"], "<= 1.15")
        )
    result.tables.append(table)
    measured = sum(ld.completed for c in CONCURRENCY for ld in loads[("exporting", c)])
    result.notes.append(
        f"the receiver got {received} spans in {exports} export requests for {measured} measured GetVm calls "
        "of the exporting fleet (plus set-up and warm-up calls; 3 spans per GetVm)"
    )
    result.notes.append(
        "the receiver decodes in this (client) process on its own threads; the off/default fleets are "
        "measured while the exporting fleet's batches may still be arriving"
    )
    result.data = {"calls": calls, "rounds": rounds, "slices": slices, "spans_received": received, "cells": cells}
    return result


def run(opts: Options) -> BenchResult:
    """Run the tracing benchmark."""
    return asyncio.run(_measure(opts))
