"""
ListVms of 1,000 domains on libvirt's ``test:///default`` driver: the adapter's bulk ``list()`` against
a naive one-call-per-domain loop, in the same run.

The domains are made by ``LibvirtHypervisor.create`` on a dedicated adapter (so they carry exactly the
ownership metadata ``list()`` recognises), half of them started. Timed, on *other* connections:

- ``list()`` cold: a fresh adapter whose per-UUID metadata cache is empty (what an agent pays once
  after it starts: the bulk ``getAllDomainStats`` plus one ``metadata`` call per domain);
- ``list()`` warm: the same adapter again (one ``getAllDomainStats`` call, as in steady state);
- naive: ``listAllDomains`` for the names, then ``lookupByName`` + ``info`` + ``XMLDesc`` per domain,
  with the ownership metadata parsed from each XML (the same records ``list()`` returns).

Nothing leaves the process: the test driver keeps its state in memory and drops it when the last
connection closes, which this benchmark checks at the end.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from common import BenchResult, Options, Ratio, Table, median, ms

URI = "test:///default"
OWNER = "clonebox-bench"


def _naive_list(conn: Any, owner: str, prefix: str) -> int:
    """One round trip (or three) per domain: what the adapter's bulk call replaces."""
    from clonebox_agent.adapters.libvirt import domxml

    found = 0
    for name in [d.name() for d in conn.listAllDomains(0)]:
        if not name.startswith(prefix):
            continue
        dom = conn.lookupByName(name)
        dom.info()
        meta = domxml.parse_owner(dom.XMLDesc(0))
        if meta is not None and meta.agent == owner:
            found += 1
    return found


async def _measure(opts: Options) -> BenchResult:
    import libvirt

    from clonebox_agent.adapters.libvirt import LibvirtHypervisor
    from clonebox_core.model import DiskSpec, NetworkMode, NetworkSpec, VmSpec

    n = opts.domains or 1000
    list_reps = 5 if opts.quick else 20
    naive_reps = 2 if opts.quick else 5
    cold_reps = 2 if opts.quick else 3
    max_seconds = 60.0 if opts.quick else 180.0
    result = BenchResult("listvms", f"adapter list() of {n} owned domains on {URI} vs one call per domain")
    # no file is touched on the test driver; the path only names the (in-memory) storage pool
    storage = "/var/lib/clonebox/bench-listvms"

    def adapter() -> LibvirtHypervisor:
        return LibvirtHypervisor(URI, storage, [], owner=OWNER, domain_type="qemu")

    maker = adapter()
    readers: list[LibvirtHypervisor] = []
    raw: Any = None
    try:
        await maker.open(lambda _event: None)
        deadline = time.perf_counter() + max_seconds
        t0 = time.perf_counter()
        for i in range(n):
            if time.perf_counter() > deadline:
                raise RuntimeError(f"defining {n} domains took over {max_seconds:.0f} s (made {i})")
            spec = VmSpec(
                name=f"bench-{i:05d}",
                memory_mib=128,
                disks=(DiskSpec("data", size_mib=16),),
                network=NetworkSpec(NetworkMode.NONE),
                labels=(("bench", "listvms"),),
            )
            await maker.create(spec, start=i % 2 == 0)
        create_s = time.perf_counter() - t0

        cold: list[float] = []
        cold_calls: dict[str, int] = {}
        for _ in range(cold_reps):
            reader = adapter()
            readers.append(reader)
            await reader.open(lambda _event: None)
            reader.calls.clear()
            t = time.perf_counter()
            got = await reader.list()
            cold.append(time.perf_counter() - t)
            cold_calls = dict(reader.calls)
            if len(got) != n:
                raise RuntimeError(f"list() returned {len(got)} domains, not {n}")
        reader = readers[-1]
        warm: list[float] = []
        reader.calls.clear()
        for _ in range(list_reps):
            t = time.perf_counter()
            got = await reader.list()
            warm.append(time.perf_counter() - t)
        warm_calls = {k: v // list_reps for k, v in reader.calls.items()}

        raw = libvirt.open(URI)
        naive: list[float] = []
        naive_calls = 1 + 3 * n
        for _ in range(naive_reps):
            t = time.perf_counter()
            found = await asyncio.to_thread(_naive_list, raw, OWNER, reader.name_prefix)
            naive.append(time.perf_counter() - t)
            if found != n:
                raise RuntimeError(f"naive loop found {found} domains, not {n}")
    finally:
        if raw is not None:
            raw.close()
        for r in readers:
            await r.close()
        await maker.close()
    leftover = _leftover_domains()

    warm_med, cold_med, naive_med = median(warm), median(cold), median(naive)
    table = Table(
        f"{n} owned domains ({n // 2 + n % 2} running), defined in {create_s:.1f} s via the adapter's create",
        ["method", "libvirt calls per listing", "runs", "median ms", "min ms", "max ms", "naive / this"],
    )

    def row(label: str, calls: str, values: list[float]) -> list[str]:
        return [
            label,
            calls,
            str(len(values)),
            ms(median(values)),
            ms(min(values)),
            ms(max(values)),
            f"{naive_med / median(values):.1f}x",
        ]

    def fmt_calls(c: dict[str, int]) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(c.items(), key=lambda kv: -kv[1]))

    table.rows.append(row("adapter list(), warm cache", fmt_calls(warm_calls), warm))
    table.rows.append(row("adapter list(), fresh adapter (cold)", fmt_calls(_listing_calls(cold_calls)), cold))
    table.rows.append(row("naive loop (baseline)", f"listAllDomains 1, 3 per domain ({naive_calls})", naive))
    result.tables.append(table)
    result.ratios.append(Ratio("naive loop / adapter list() warm (speed-up)", naive_med / warm_med, ">= 1.0"))
    result.ratios.append(Ratio("adapter list() warm (one bulk call), seconds", warm_med, "<= 0.1"))
    result.ratios.append(Ratio("adapter list() cold (first after start), seconds", cold_med, "<= 0.1"))
    result.notes.append(
        "the test driver answers in-process (no libvirtd round trip), so the per-call saving is a floor: "
        "over qemu:///system each naive call is also an RPC to libvirtd"
    )
    if leftover:
        result.notes.append(f"after closing every connection the test driver still showed {leftover} domains")
    result.data = {
        "domains": n,
        "define_seconds": round(create_s, 3),
        "warm_ms": [round(x * 1000, 3) for x in warm],
        "cold_ms": [round(x * 1000, 3) for x in cold],
        "naive_ms": [round(x * 1000, 3) for x in naive],
        "warm_calls": warm_calls,
        "cold_calls": _listing_calls(cold_calls),
        "naive_calls": naive_calls,
        "leftover_domains_after_close": leftover,
    }
    return result


def _listing_calls(calls: dict[str, int]) -> dict[str, int]:
    """Calls made by the listing itself (without the connect-time pool and event set-up)."""
    return {k: v for k, v in calls.items() if k in ("getAllDomainStats", "metadata", "listAllDomains")}


def _leftover_domains() -> int:
    """Domains a brand-new test-driver connection sees besides the driver's own 'test' domain."""
    import libvirt

    conn = libvirt.open(URI)
    try:
        return sum(1 for d in conn.listAllDomains(0) if d.name() != "test")
    finally:
        conn.close()


def run(opts: Options) -> BenchResult:
    """Run the ListVms benchmark."""
    return asyncio.run(_measure(opts))
