"""
Entry point of ``make bench``: run the benchmarks and print figures with same-run baselines.

    .venv/bin/python benchmarks/run.py                    # all of them, full counts
    .venv/bin/python benchmarks/run.py --quick            # smoke run, small counts (a few minutes at most)
    .venv/bin/python benchmarks/run.py --only getvm       # one of: getvm, listvms, create_ready, mtls, tracing,
                                                          # audit, journal, health, snapshots
    .venv/bin/python benchmarks/run.py --json out.json    # also write every figure as JSON

Nothing here fails on a slow figure: a missed goal is printed, and the exit code is 0 unless a
benchmark could not run at all (1). Results and their machine go in docs/benchmarks.md by hand.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

# the benchmark modules import each other as top-level modules
sys.path.insert(0, str(Path(__file__).resolve().parent))
# the repository root too: benchmarks share test helpers (tests/pgcluster.py)
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

import bench_audit
import bench_create_ready
import bench_getvm
import bench_health
import bench_journal
import bench_listvms
import bench_mtls
import bench_plans
import bench_snapshots
import bench_tracing
from common import BenchResult, Options, Runner, load_average, machine_info

BENCHMARKS: dict[str, tuple[str, Runner]] = {
    "getvm": ("agent GetVm over gRPC vs a bare echo server", bench_getvm.run),
    "listvms": ("ListVms of 1,000 domains on test:///default vs one call per domain", bench_listvms.run),
    "create_ready": ("create -> guest agent ready via the CLI vs plain virsh create", bench_create_ready.run),
    "mtls": ("controller GetVm over mTLS vs plaintext, and the cost of a new connection", bench_mtls.run),
    "audit": ("audit appends per second on SQLite and PostgreSQL vs plain inserts", bench_audit.run),
    "tracing": ("controller GetVm with OTLP trace export vs tracing off, over mTLS", bench_tracing.run),
    "journal": ("VM create with the agent's journal vs without it, on real libvirt", bench_journal.run),
    "health": ("agent CPU for 500 VMs x 3 probes at 1 s, and change -> health watch delay", bench_health.run),
    "snapshots": (
        "snapshot create/restore vs raw libvirt calls, export/import vs qemu-img convert + zstd",
        bench_snapshots.run,
    ),
    "plans": (
        "a 50-VM plan of depth 5 (200 ms creates) vs its lower bound, and controller cost per VM",
        bench_plans.run,
    ),
}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks/run.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=sorted(BENCHMARKS), action="append", help="run only this one (repeatable)")
    p.add_argument("--quick", action="store_true", help="smoke run with small counts")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument(
        "--calls", type=int, help="getvm: calls per cell (default 5000, quick 500); health: VMs flipped (50, quick 20)"
    )
    p.add_argument("--domains", type=int, help="listvms: domains to define (default 1000); health: VMs (default 500)")
    p.add_argument(
        "--repetitions",
        type=int,
        help="create_ready: timed runs of each kind (default 5, quick 1); snapshots: create/restore runs (10, quick 3)",
    )
    p.add_argument(
        "--kernel",
        default="vmlinuz",
        choices=["vmlinuz", "vmlinux"],
        help="create_ready: test guest kernel (vmlinux skips the bzImage's own decompression under TCG)",
    )
    p.add_argument(
        "--keep", action="store_true", help="create_ready, health, snapshots: keep the run folder (logs) afterwards"
    )
    return p.parse_args(argv)


def _on_sigterm(_signum: int, _frame: FrameType | None) -> None:
    # unwinds through every benchmark's finally: domains, overlays, folders and daemons are removed
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Run the selected benchmarks; 1 if any raised."""
    args = _parse(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    opts = Options(
        quick=args.quick,
        calls=args.calls,
        domains=args.domains,
        repetitions=args.repetitions,
        kernel=args.kernel,
        keep=args.keep,
    )
    names = args.only or list(BENCHMARKS)
    machine = machine_info()
    started = datetime.now(UTC)
    print(f"CloneBox benchmarks ({'quick' if args.quick else 'full'} run, {started:%Y-%m-%d %H:%M} UTC)")
    width = max(len(k) for k in machine)
    for key, value in machine.items():
        print(f"  {key.ljust(width)}  {value}")
    results: list[BenchResult] = []
    failed = False
    for name in names:
        title, runner = BENCHMARKS[name]
        print(f"\n-- running {name}: {title} (load average {load_average()}) ...", flush=True)
        t0 = time.perf_counter()
        try:
            result = runner(opts)
        except KeyboardInterrupt:
            print("interrupted; cleaned up", file=sys.stderr)
            return 130
        except Exception as exc:
            traceback.print_exc()
            result = BenchResult(name, title, skipped=f"failed: {type(exc).__name__}: {exc}")
            failed = True
        result.seconds = time.perf_counter() - t0
        result.data.setdefault("load_average_after", load_average())
        results.append(result)
        print()
        print(result.render(), flush=True)
    if args.json:
        doc: dict[str, Any] = {
            "started": started.isoformat(timespec="seconds"),
            "mode": "quick" if args.quick else "full",
            "machine": machine,
            "results": [r.as_dict() for r in results],
        }
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
