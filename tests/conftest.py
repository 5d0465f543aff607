"""Shared test plumbing.

With ``CLONEBOX_REQUIRE_ALL=1`` (set by ``.ci/run``) a skipped test fails the session: CI provides
libvirtd, QEMU and PostgreSQL, so a skip there means a missing component, not an optional test.

``--suite-part`` splits the suite in three parts that together are every test, for ``make test``:

- ``parallel``: the unit, integration and fuzz tests that never touch libvirt (fake hypervisor, SQLite,
  private PostgreSQL clusters, loopback ports picked by the kernel, pytest's tmp_path), safe to spread over
  pytest-xdist workers (``-n 2``);
- ``contract``: the Hypervisor contract suite (tests/contract): real libvirt, but every harness has its own
  owner, pool and names, and no timing assertions, so its modules may run on two workers (``--dist
  loadfile``: a module's cases stay on one worker, in order);
- ``serial``: everything else (e2e, fault, and the ``libvirt``-marked unit tests): fleets of real TCG guests
  on the one libvirtd, CPU-heavy and timing-sensitive, one at a time.

Under xdist every worker is its own process: a session fixture (such as the store tests' PostgreSQL cluster)
exists once per worker. ``CLONEBOX_TEST_PG_URL`` (one shared server) gets a database per worker.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_skipped: list[str] = []

TESTS = Path(__file__).parent
#: the tiers whose tests, but for the ``libvirt``-marked ones, may run in parallel
PARALLEL_TIERS = frozenset({"unit", "integration", "fuzz"})
SUITE_PARTS = ("all", "parallel", "contract", "serial")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--suite-part",
        choices=SUITE_PARTS,
        default="all",
        help="parallel: the unit/integration/fuzz tests that never touch libvirt (safe under pytest-xdist); "
        "contract: the Hypervisor contract suite; serial: every other test; all (default): every test",
    )


def pytest_configure(config: pytest.Config) -> None:
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    url = os.environ.get("CLONEBOX_TEST_PG_URL")
    if worker and url:
        # the store tests reset the public schema of that database: one database per worker
        from tests import pgcluster

        os.environ["CLONEBOX_TEST_PG_URL"] = pgcluster.worker_database(url, worker)


def suite_part(item: pytest.Item) -> str:
    """The ``--suite-part`` a test belongs to (see the module's docstring)."""
    try:
        tier = item.path.resolve().relative_to(TESTS.resolve()).parts[0]
    except ValueError:
        return "serial"
    if tier == "contract":
        return "contract"
    return "parallel" if tier in PARALLEL_TIERS and item.get_closest_marker("libvirt") is None else "serial"


@pytest.hookimpl(trylast=True)  # after the conftests that add markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    part = config.getoption("suite_part")
    if part == "all":
        return
    keep: list[pytest.Item] = []
    drop: list[pytest.Item] = []
    for item in items:
        (keep if suite_part(item) == part else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get("CLONEBOX_REQUIRE_ALL") == "1" and _skipped:
        print(f"\nCLONEBOX_REQUIRE_ALL: {len(_skipped)} test(s) skipped, which CI does not allow:")
        for nodeid in _skipped[:20]:
            print(f"  {nodeid}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def memory_span_exporter() -> object:
    """An in-memory exporter attached to the process's TracerProvider (installed when there is none).

    OpenTelemetry allows one global provider per process, so tests add exporters to it instead of
    replacing it.
    """
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from clonebox_core.telemetry.tracing import init_tracing

    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = init_tracing("clonebox-test")
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    return memory
