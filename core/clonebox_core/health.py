"""
Health checks: the probe model of a VM spec and the rules that turn probe results into states.

A probe runs every ``interval`` (after ``initial_delay``), each run bounded by ``timeout``, and each run
gives one **sample**: ``PASS``, ``WARN`` (a resource probe in its warning band), ``FAIL`` or ``NO_DATA``
(nothing to judge: statistics unavailable). A :class:`ProbeTracker` turns the samples of one probe into
its **state**, with hysteresis:

- ``UNKNOWN`` until the first judgeable sample, and again after ``NO_DATA``;
- ``HEALTHY`` after ``success_threshold`` consecutive ``PASS`` samples (from any state);
- ``UNHEALTHY`` exactly at the ``failure_threshold``-th consecutive ``FAIL`` (``WARN`` samples in a row
  make it ``DEGRADED`` at the same count);
- ``DEGRADED`` while a ``HEALTHY`` probe has failed fewer than ``failure_threshold`` times in a row (an
  early warning that changes nothing yet), or has warned as many times.

A VM's **overall** state (:func:`overall_state`), strongest first:

1. ``UNHEALTHY`` if a ``critical`` probe is unhealthy;
2. ``DEGRADED`` if any probe is degraded, or a non-critical probe is unhealthy;
3. ``UNKNOWN`` if any probe is unknown, or there are no probes;
4. ``HEALTHY`` otherwise (every probe healthy).

Probes are not a way into the host: ``http`` and ``tcp`` probes give a scheme, port and path, never a
host (they reach the VM's own addresses as the agent resolves them); a ``script`` probe names an
executable inside the agent's ``probe_scripts_dir``, never a path. :func:`validate_probes` refuses
anything else with ``InvalidArgument`` naming the field.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from clonebox_core.errors import invalid_field
from clonebox_core.names import check_dns_label

__all__ = [
    "Action",
    "ActionKind",
    "ActionRecord",
    "Aggregate",
    "Band",
    "CheckStatus",
    "CommandProbe",
    "FileProbe",
    "HealthState",
    "HttpProbe",
    "Probe",
    "ProbeResult",
    "ProbeTracker",
    "ProbeType",
    "ResourceProbe",
    "Sample",
    "ScriptProbe",
    "TcpProbe",
    "Transition",
    "VmHealth",
    "overall_state",
    "validate_probes",
]

MAX_PROBES = 32
MIN_INTERVAL_MS = 500
MAX_INTERVAL_MS = 24 * 3600 * 1000
MAX_THRESHOLD = 100
MAX_REGEX_CHARS = 512
_SCRIPT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}$")
_HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "OPTIONS")
#: headers a probe may not set: they would point the request somewhere else or smuggle a second one
_FORBIDDEN_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection", "proxy-authorization"})


class ProbeType(enum.StrEnum):
    """What a probe checks, and where it runs."""

    HTTP = "http"  # from the host, to the VM's own address
    TCP = "tcp"  # from the host, to the VM's own address
    COMMAND = "command"  # inside the guest, through qemu-ga
    GUEST_AGENT = "guest_agent"  # qemu-ga answers a ping
    SCRIPT = "script"  # on the host: an executable in the agent's probe_scripts_dir
    RESOURCE = "resource"  # CPU, memory, disk use from libvirt and qemu-ga statistics
    FILE = "file"  # inside the guest: a file exists (and matches)


class HealthState(enum.StrEnum):
    """State of a probe or of a whole VM."""

    UNKNOWN = "unknown"
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"


class Sample(enum.StrEnum):
    """What one run of a probe found."""

    PASS = "pass"
    WARN = "warn"
    FAIL = "fail"
    NO_DATA = "no_data"


class ActionKind(enum.StrEnum):
    """What the agent does on a probe's transition."""

    NONE = "none"
    RESTART = "restart"  # restart the VM (with back-off and a cap per window)
    COMMAND = "command"  # run a command inside the guest


@dataclass(frozen=True)
class Action:
    """An ``on_failure`` / ``on_recovery`` action."""

    kind: ActionKind = ActionKind.NONE
    argv: tuple[str, ...] = ()


@dataclass(frozen=True)
class HttpProbe:
    """An HTTP(S) request to the VM's address: the status must be one of ``expect_status``."""

    port: int = 80
    path: str = "/"
    scheme: str = "http"
    method: str = "GET"
    expect_status: tuple[int, ...] = (200,)
    body_regex: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    tls_verify: bool = True


@dataclass(frozen=True)
class TcpProbe:
    """A TCP connect to the VM's address."""

    port: int


@dataclass(frozen=True)
class CommandProbe:
    """A program run inside the guest: its exit code must be ``expect_exit`` (and stdout match)."""

    argv: tuple[str, ...]
    expect_exit: int = 0
    output_regex: str = ""


@dataclass(frozen=True)
class ScriptProbe:
    """An executable named ``name`` in the agent's ``probe_scripts_dir``, run on the host: exit 0 passes."""

    name: str
    args: tuple[str, ...] = ()


@dataclass(frozen=True)
class Band:
    """Percent thresholds: at or above ``warn`` the sample is WARN, at or above ``critical`` FAIL."""

    warn: float
    critical: float


@dataclass(frozen=True)
class ResourceProbe:
    """CPU, memory and disk use in percent, each judged by its band (absent: not judged)."""

    cpu: Band | None = None
    memory: Band | None = None
    disk: Band | None = None


@dataclass(frozen=True)
class FileProbe:
    """A file inside the guest: it must exist (and its start match ``regex``)."""

    path: str
    regex: str = ""


@dataclass(frozen=True)
class Probe:
    """One health check of a VM (exactly the field of its ``type`` is set)."""

    name: str
    type: ProbeType
    interval_ms: int = 10_000
    timeout_ms: int = 2_000
    initial_delay_ms: int = 0
    failure_threshold: int = 3
    success_threshold: int = 1
    critical: bool = True
    http: HttpProbe | None = None
    tcp: TcpProbe | None = None
    command: CommandProbe | None = None
    script: ScriptProbe | None = None
    resource: ResourceProbe | None = None
    file: FileProbe | None = None
    on_failure: Action = field(default_factory=Action)
    on_recovery: Action = field(default_factory=Action)


# ------------------------------------------------------------------------------------ what is found


@dataclass(frozen=True)
class ProbeResult:
    """One run of one probe."""

    check: str
    sample: Sample
    detail: str
    time: datetime
    duration_us: int = 0


@dataclass(frozen=True)
class CheckStatus:
    """The current state of one probe of a VM."""

    name: str
    type: ProbeType
    state: HealthState
    critical: bool
    consecutive_failures: int = 0
    consecutive_successes: int = 0
    last: ProbeResult | None = None
    since: datetime | None = None
    #: added by the agent (the default guest_agent probe), not by the spec
    implicit: bool = False


@dataclass(frozen=True)
class VmHealth:
    """The health of one VM: its overall state and each probe's."""

    vm: str
    host: str
    state: HealthState
    checks: tuple[CheckStatus, ...] = ()
    since: datetime | None = None
    updated: datetime | None = None


@dataclass(frozen=True)
class Transition:
    """A change of state of one probe, or of the VM (``check`` empty)."""

    vm: str
    host: str
    check: str
    from_state: HealthState
    to_state: HealthState
    time: datetime
    detail: str = ""
    #: order among the controller's stored transitions (0 before it is stored)
    seq: int = 0


@dataclass(frozen=True)
class Aggregate:
    """One minute of runs of one probe."""

    vm: str
    check: str
    minute: datetime
    passes: int = 0
    warnings: int = 0
    failures: int = 0
    no_data: int = 0
    duration_us_sum: int = 0
    duration_us_max: int = 0

    @property
    def runs(self) -> int:
        """Number of runs in the minute."""
        return self.passes + self.warnings + self.failures + self.no_data


@dataclass(frozen=True)
class ActionRecord:
    """An ``on_failure`` / ``on_recovery`` action the agent took, or held back."""

    vm: str
    check: str
    trigger: str  # "on_failure" | "on_recovery"
    kind: ActionKind
    outcome: str  # "done" | "failed" | "suppressed"
    detail: str
    time: datetime


# --------------------------------------------------------------------------------------- the rules


class ProbeTracker:
    """The state of one probe, from its samples (see the module docstring for the rules)."""

    def __init__(self, failure_threshold: int, success_threshold: int) -> None:
        """Thresholds as in :class:`Probe` (at least 1)."""
        if failure_threshold < 1 or success_threshold < 1:
            raise ValueError("thresholds must be at least 1")
        self.failure_threshold = failure_threshold
        self.success_threshold = success_threshold
        self.state = HealthState.UNKNOWN
        self.successes = 0
        self.failures = 0
        self.warnings = 0

    def observe(self, sample: Sample) -> HealthState:
        """Take one sample; the state after it."""
        if sample is Sample.NO_DATA:
            self.successes = self.failures = self.warnings = 0
            self.state = HealthState.UNKNOWN
        elif sample is Sample.PASS:
            self.successes += 1
            self.failures = self.warnings = 0
            if self.successes >= self.success_threshold:
                self.state = HealthState.HEALTHY
        elif sample is Sample.FAIL:
            self.failures += 1
            self.successes = self.warnings = 0
            if self.failures >= self.failure_threshold:
                self.state = HealthState.UNHEALTHY
            elif self.state is HealthState.HEALTHY:
                self.state = HealthState.DEGRADED
        else:  # WARN
            self.warnings += 1
            self.successes = self.failures = 0
            if self.warnings >= self.failure_threshold or self.state is HealthState.HEALTHY:
                self.state = HealthState.DEGRADED
        return self.state


def overall_state(states: Iterable[tuple[HealthState, bool]]) -> HealthState:
    """A VM's state from its probes' ``(state, critical)`` pairs (see the module docstring)."""
    found = list(states)
    if not found:
        return HealthState.UNKNOWN
    if any(state is HealthState.UNHEALTHY and critical for state, critical in found):
        return HealthState.UNHEALTHY
    if any(state in (HealthState.DEGRADED, HealthState.UNHEALTHY) for state, _ in found):
        return HealthState.DEGRADED
    if any(state is HealthState.UNKNOWN for state, _ in found):
        return HealthState.UNKNOWN
    return HealthState.HEALTHY


def judge_percent(value: float | None, band: Band) -> Sample:
    """The sample a resource reading gives against its band (None: no data)."""
    if value is None:
        return Sample.NO_DATA
    if value >= band.critical:
        return Sample.FAIL
    if value >= band.warn:
        return Sample.WARN
    return Sample.PASS


# ------------------------------------------------------------------------------------- validation


def _check_regex(field_name: str, pattern: str) -> None:
    if len(pattern) > MAX_REGEX_CHARS:
        raise invalid_field(field_name, f"at most {MAX_REGEX_CHARS} characters")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise invalid_field(field_name, f"not a valid regular expression: {exc.msg}") from None


def _check_port(field_name: str, port: int) -> None:
    if not 1 <= port <= 65535:
        raise invalid_field(field_name, f"{port} is not a TCP port (1-65535)")


def _check_http(f: str, p: HttpProbe) -> None:
    _check_port(f"{f}.port", p.port)
    if p.scheme not in ("http", "https"):
        raise invalid_field(f"{f}.scheme", f"{p.scheme!r}: use http or https")
    if not p.path.startswith("/") or any(c in p.path for c in " \t\r\n#") or "://" in p.path or p.path.startswith("//"):
        # a path, never an authority: the probe goes to the VM's own address only
        raise invalid_field(f"{f}.path", "must be an absolute path such as /healthz (the host is always the VM's)")
    if len(p.path) > 1024:
        raise invalid_field(f"{f}.path", "at most 1024 characters")
    if p.method not in _HTTP_METHODS:
        raise invalid_field(f"{f}.method", f"{p.method!r}: use one of {', '.join(_HTTP_METHODS)}")
    if not p.expect_status or any(not 100 <= s <= 599 for s in p.expect_status):
        raise invalid_field(f"{f}.expect_status", "one or more HTTP status codes (100-599)")
    if p.body_regex:
        _check_regex(f"{f}.body_regex", p.body_regex)
    for name, value in p.headers:
        if not _HEADER_NAME.fullmatch(name) or name.lower() in _FORBIDDEN_HEADERS:
            raise invalid_field(f"{f}.headers.{name}", "not a header a probe may set")
        if any(c in value for c in "\r\n\x00") or len(value) > 1024:
            raise invalid_field(f"{f}.headers.{name}", "one line of at most 1024 characters")


def _check_band(f: str, band: Band) -> None:
    if not 0 < band.warn <= band.critical <= 100:
        raise invalid_field(f, "needs 0 < warn <= critical <= 100 (percent)")


def _check_action(f: str, action: Action) -> None:
    if action.kind is ActionKind.COMMAND and not action.argv:
        raise invalid_field(f"{f}.command", "a command action needs the program and its arguments")
    if action.kind is not ActionKind.COMMAND and action.argv:
        raise invalid_field(f"{f}.command", f"only a command action runs a command (this one is {action.kind})")


def _check_probe(f: str, p: Probe) -> None:
    check_dns_label(f"{f}.name", p.name)
    if not MIN_INTERVAL_MS <= p.interval_ms <= MAX_INTERVAL_MS:
        raise invalid_field(f"{f}.interval", "between 500ms and 24h")
    if not 1 <= p.timeout_ms < p.interval_ms:
        raise invalid_field(f"{f}.timeout", "must be shorter than the interval")
    if not 0 <= p.initial_delay_ms <= MAX_INTERVAL_MS:
        raise invalid_field(f"{f}.initial_delay", "between 0s and 24h")
    for name, value in (("failure_threshold", p.failure_threshold), ("success_threshold", p.success_threshold)):
        if not 1 <= value <= MAX_THRESHOLD:
            raise invalid_field(f"{f}.{name}", f"between 1 and {MAX_THRESHOLD}")
    given = {
        ProbeType.HTTP: p.http,
        ProbeType.TCP: p.tcp,
        ProbeType.COMMAND: p.command,
        ProbeType.SCRIPT: p.script,
        ProbeType.RESOURCE: p.resource,
        ProbeType.FILE: p.file,
    }
    for kind, settings in given.items():
        if kind is not p.type and settings is not None:
            raise invalid_field(f"{f}.{kind.value}", f"belongs to a {kind.value} probe, not {p.type.value}")
    # an http probe may take every default (GET / on port 80); a guest_agent probe has no settings
    if p.type not in (ProbeType.GUEST_AGENT, ProbeType.HTTP) and given.get(p.type) is None:
        raise invalid_field(f"{f}.{p.type.value}", f"a {p.type.value} probe needs its '{p.type.value}:' settings")
    if p.type is ProbeType.HTTP:
        _check_http(f"{f}.http", p.http or HttpProbe())
    elif p.type is ProbeType.TCP and p.tcp is not None:
        _check_port(f"{f}.tcp.port", p.tcp.port)
    elif p.type is ProbeType.COMMAND and p.command is not None:
        if not p.command.argv or not p.command.argv[0]:
            raise invalid_field(f"{f}.command.argv", "the program to run and its arguments")
        if p.command.output_regex:
            _check_regex(f"{f}.command.output_regex", p.command.output_regex)
    elif p.type is ProbeType.SCRIPT and p.script is not None:
        if not _SCRIPT_NAME.fullmatch(p.script.name):
            # a name in the agent's probe_scripts_dir, never a path
            raise invalid_field(
                f"{f}.script.name", "the name of an executable in the agent's probe_scripts_dir, not a path"
            )
    elif p.type is ProbeType.RESOURCE and p.resource is not None:
        bands = (("cpu", p.resource.cpu), ("memory", p.resource.memory), ("disk", p.resource.disk))
        if all(band is None for _, band in bands):
            raise invalid_field(f"{f}.resource", "give at least one of cpu, memory, disk")
        for name, band in bands:
            if band is not None:
                _check_band(f"{f}.resource.{name}", band)
    elif p.type is ProbeType.FILE and p.file is not None:
        if not p.file.path.startswith("/") or "\x00" in p.file.path:
            raise invalid_field(f"{f}.file.path", "an absolute path inside the guest")
        if p.file.regex:
            _check_regex(f"{f}.file.regex", p.file.regex)
    _check_action(f"{f}.on_failure", p.on_failure)
    _check_action(f"{f}.on_recovery", p.on_recovery)


def validate_probes(probes: Sequence[Probe], prefix: str = "spec.health_checks") -> None:
    """InvalidArgument naming the first bad field of ``probes``."""
    if len(probes) > MAX_PROBES:
        raise invalid_field(prefix, f"at most {MAX_PROBES} health checks")
    names: set[str] = set()
    for i, probe in enumerate(probes):
        f = f"{prefix}[{i}]"
        _check_probe(f, probe)
        if probe.name in names:
            raise invalid_field(f"{f}.name", f"duplicate health check name {probe.name!r}")
        names.add(probe.name)
