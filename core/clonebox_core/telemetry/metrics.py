"""Prometheus metrics of one daemon: its own registry, the RPC observer, state gauges and timings.

Each daemon builds one :class:`Metrics` in its composition root and injects it where something is
measured. Nothing here uses prometheus_client's global default registry, so several daemons can run in
one process (the integration tests do). This module is transport-free (no grpc, no protobuf), so use
cases may record timings through it; serving the registry over HTTPS lives in ``metrics_server.py``.

Every label takes values from a bounded set: RPC methods come from the services a daemon serves
(anything else is ``other``), codes are gRPC status code names, states are enum names, and the free
labels of :meth:`Metrics.observe_operation` / :meth:`Metrics.observe_audit_append` keep at most
``MAX_LABEL_VALUES`` distinct values each (later newcomers are counted as ``other``). The metric
names and labels are listed in docs/metrics.md.
"""

from __future__ import annotations

import enum
import logging
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from clonebox_core.model import HostState, VmState

if TYPE_CHECKING:
    from clonebox_core.rpc.status import CallRecord

log = logging.getLogger(__name__)

#: the label value for anything outside a label's known set
OTHER = "other"

#: gRPC status code names (``grpc.StatusCode``): the only values of the ``code`` label
GRPC_CODES = frozenset(
    {
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    }
)

#: distinct values one free label (operation kind/outcome, audit store) may take before ``other``
MAX_LABEL_VALUES = 32

#: unary calls take milliseconds; streams (watches, agent sessions) are reported when they end
RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
#: operations (create, stop, delete) take seconds to minutes
OPERATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
#: one audit append is one small synchronous write
AUDIT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

_LABEL_VALUE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")

E = TypeVar("E", bound=enum.Enum)


def split_method(path: str) -> tuple[str, str] | None:
    """``"/pkg.Service/Method"`` -> ``("pkg.Service", "Method")``; None when it is not that shape."""
    service, sep, method = path.lstrip("/").rpartition("/")
    if not sep or not service or not method:
        return None
    return service, method


class _BoundedLabel:
    """Keeps one free label's values bounded: well-formed, and at most ``limit`` distinct ones."""

    def __init__(self, limit: int = MAX_LABEL_VALUES) -> None:
        self._limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        if not _LABEL_VALUE.fullmatch(value):
            return OTHER
        with self._lock:
            if value in self._seen:
                return value
            if len(self._seen) >= self._limit:
                return OTHER
            self._seen.add(value)
            return value


class RpcMetrics:
    """A ``CallObserver`` (see ``clonebox_core.rpc.status``): counts and times every finished call.

    Only the methods given at construction get their own labels; any other path is counted as
    service ``other``, method ``other``, so a scraper never sees unbounded label values.
    """

    def __init__(self, requests: Counter, duration: Histogram, methods: Iterable[str]) -> None:
        self._requests = requests
        self._duration = duration
        self._labels: dict[str, tuple[str, str]] = {}
        for path in methods:
            parts = split_method(path)
            if parts is not None:
                self._labels["/" + "/".join(parts)] = parts

    @property
    def methods(self) -> frozenset[str]:
        """The method paths that get their own labels."""
        return frozenset(self._labels)

    def observe(self, method: str, code: str, seconds: float) -> None:
        """Count one finished call of ``method`` (a ``/pkg.Service/Method`` path) that ended with ``code``."""
        service, name = self._labels.get(method, (OTHER, OTHER))
        self._requests.labels(service, name, code if code in GRPC_CODES else "UNKNOWN").inc()
        self._duration.labels(service, name).observe(max(seconds, 0.0))

    async def call_finished(self, record: CallRecord) -> None:
        """The ``CallObserver`` hook: the guard interceptor calls it once per finished call."""
        self.observe(record.method, record.code, record.seconds)


class StateGauge(Collector, Generic[E]):
    """A gauge ``NAME{state}`` computed at scrape time from ``source`` (state -> count).

    Every state of the enum except ``UNSPECIFIED`` is reported, with 0 when absent, so dashboards see
    zeros rather than missing series. When the source fails, the gauge is left out of that scrape
    (the series goes stale) instead of failing the whole scrape.
    """

    def __init__(self, name: str, documentation: str, states: type[E], source: Callable[[], Mapping[E, int]]) -> None:
        self._name = name
        self._documentation = documentation
        self._states = [s for s in states if s.name != "UNSPECIFIED"]
        self._source = source

    def describe(self) -> Iterable[Metric]:
        """The family without samples (lets the registry check names without calling the source)."""
        return [GaugeMetricFamily(self._name, self._documentation, labels=["state"])]

    def collect(self) -> Iterable[Metric]:
        """One sample per state."""
        try:
            counts = dict(self._source())
        except Exception as exc:  # a scrape must not fail because one source did
            log.warning("metrics: cannot compute %s: %s", self._name, exc)
            return []
        family = GaugeMetricFamily(self._name, self._documentation, labels=["state"])
        for state in self._states:
            family.add_metric([state.name], counts.pop(state, 0))
        leftover = sum(counts.values())
        if leftover:
            family.add_metric([OTHER], leftover)
        return [family]


class Metrics:
    """The metrics of one daemon, in its own ``CollectorRegistry``.

    Built once in the composition root; ``registry`` is what the HTTPS endpoint serves.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._rpc_requests = Counter(
            "clonebox_rpc_requests",
            "Finished RPCs served by this daemon, by service, method and gRPC status code.",
            ("service", "method", "code"),
            registry=self.registry,
        )
        self._rpc_duration = Histogram(
            "clonebox_rpc_duration_seconds",
            "Time from a call's arrival to its end (streams: their whole life), by service and method.",
            ("service", "method"),
            buckets=RPC_BUCKETS,
            registry=self.registry,
        )
        self._operation_duration = Histogram(
            "clonebox_operation_duration_seconds",
            "Duration of long-running operations from start to finish, by kind and outcome.",
            ("kind", "outcome"),
            buckets=OPERATION_BUCKETS,
            registry=self.registry,
        )
        self._audit_append = Histogram(
            "clonebox_audit_append_seconds",
            "Time to append one record to the audit log, by store.",
            ("store",),
            buckets=AUDIT_BUCKETS,
            registry=self.registry,
        )
        self._kind_label = _BoundedLabel()
        self._outcome_label = _BoundedLabel()
        self._store_label = _BoundedLabel()

    def rpc_observer(self, methods: Iterable[str]) -> RpcMetrics:
        """A ``CallObserver`` for ``start_server(observers=...)`` labelling exactly ``methods``.

        ``methods`` are ``/pkg.Service/Method`` paths: those of the services the daemon serves
        (``metrics_server.rpc_method_paths`` lists them from the service names).
        """
        return RpcMetrics(self._rpc_requests, self._rpc_duration, methods)

    def observe_operation(self, kind: str, outcome: str, seconds: float) -> None:
        """Record one finished long-running operation in ``clonebox_operation_duration_seconds``.

        ``kind`` is the operation's kind as stored (for example ``vm.create``); ``outcome`` is ``OK``
        for a success or the error's gRPC code name (``FAILED_PRECONDITION``, ``INTERNAL``, ...), the
        same vocabulary as the ``code`` label of the RPC metrics. ``seconds`` runs from the operation's
        start to its end (a resumed operation: from its original start). Values outside
        ``[A-Za-z0-9_.-]{1,64}``, and new values once a label has ``MAX_LABEL_VALUES`` of them, are
        recorded as ``other``. Thread-safe and cheap: call it from any thread or coroutine.
        """
        self._operation_duration.labels(self._kind_label(kind), self._outcome_label(outcome)).observe(max(seconds, 0.0))

    def observe_audit_append(self, store: str, seconds: float) -> None:
        """Record one audit append in ``clonebox_audit_append_seconds``.

        ``store`` names where the record went (for example ``sqlite``, ``postgresql`` or ``file``);
        ``seconds`` is the time of the append including its flush/commit. Same label rules and
        thread-safety as :meth:`observe_operation`.
        """
        self._audit_append.labels(self._store_label(store)).observe(max(seconds, 0.0))

    def track_vms(self, source: Callable[[], Mapping[VmState, int]]) -> None:
        """Publish ``clonebox_vms{state}``, asking ``source`` for the counts at every scrape.

        ``source`` runs on the scrape thread, not the event loop: it must be cheap and thread-safe
        (one grouped SQL query, or a copy of an in-memory view).
        """
        self.registry.register(StateGauge("clonebox_vms", "VMs this daemon knows of, by state.", VmState, source))

    def track_hosts(self, source: Callable[[], Mapping[HostState, int]]) -> None:
        """Publish ``clonebox_hosts{state}`` (the controller), with the same rules as :meth:`track_vms`."""
        self.registry.register(
            StateGauge("clonebox_hosts", "Registered hypervisor hosts, by state.", HostState, source)
        )

    def render(self) -> bytes:
        """The current exposition in Prometheus text format (what a scrape returns)."""
        return generate_latest(self.registry)


def parse_samples(text: str) -> Iterator[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of every sample in a Prometheus text exposition (tests, tools)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            yield sample.name, dict(sample.labels), float(sample.value)
