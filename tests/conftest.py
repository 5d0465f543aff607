"""Shared test plumbing.

With ``CLONEBOX_REQUIRE_ALL=1`` (set by ``.ci/run``) a skipped test fails the session: CI provides
libvirtd, QEMU and PostgreSQL, so a skip there means a missing component, not an optional test.
"""

from __future__ import annotations

import os

import pytest

_skipped: list[str] = []


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
