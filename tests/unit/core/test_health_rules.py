"""The health rules: probe samples to states (hysteresis), probes to a VM's state, and probe validation."""

from __future__ import annotations

import dataclasses

import pytest

from clonebox_core.errors import InvalidArgument
from clonebox_core.health import (
    Action,
    ActionKind,
    Band,
    CommandProbe,
    FileProbe,
    HealthState,
    HttpProbe,
    Probe,
    ProbeTracker,
    ProbeType,
    ResourceProbe,
    Sample,
    ScriptProbe,
    TcpProbe,
    judge_percent,
    overall_state,
    validate_probes,
)
from clonebox_core.units import format_duration_ms, parse_duration_ms

H, D, U, K = HealthState.HEALTHY, HealthState.DEGRADED, HealthState.UNHEALTHY, HealthState.UNKNOWN
P, W, F, N = Sample.PASS, Sample.WARN, Sample.FAIL, Sample.NO_DATA


def run(samples: list[Sample], failure: int = 3, success: int = 1) -> list[HealthState]:
    tracker = ProbeTracker(failure, success)
    return [tracker.observe(s) for s in samples]


@pytest.mark.parametrize(
    ("samples", "failure", "success", "states"),
    [
        # unknown until the first judgeable sample; healthy at the first pass with success_threshold 1
        ([P], 3, 1, [H]),
        # unhealthy exactly at the 3rd consecutive failure; degraded before it once it had been healthy
        ([P, F, F, F, F], 3, 1, [H, D, D, U, U]),
        # a pass in between restarts the count
        ([P, F, F, P, F, F, F], 3, 1, [H, D, D, H, D, D, U]),
        # never healthy: failures below the threshold leave it unknown, then unhealthy
        ([F, F, F], 3, 1, [K, K, U]),
        # recovery needs success_threshold passes in a row
        ([F, F, P, P, F, P, P, P], 2, 3, [K, U, U, U, U, U, U, H]),
        # warnings degrade at once from healthy, and at the threshold from elsewhere
        ([P, W, W, P], 3, 1, [H, D, D, H]),
        ([W, W, W], 3, 1, [K, K, D]),
        # no data: unknown, and the counts start again
        ([P, F, F, N, F, F], 3, 1, [H, D, D, K, K, K]),
        # threshold 1: one failure is unhealthy
        ([P, F], 1, 1, [H, U]),
    ],
)
def test_samples_to_states(samples: list[Sample], failure: int, success: int, states: list[HealthState]) -> None:
    assert run(samples, failure, success) == states


def test_thresholds_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        ProbeTracker(0, 1)


@pytest.mark.parametrize(
    ("states", "expected"),
    [
        ([], K),
        ([(H, True), (H, False)], H),
        ([(U, True), (D, False)], U),
        ([(U, False), (H, True)], D),  # a non-critical failure degrades, it does not fail the VM
        ([(D, True), (K, True)], D),
        ([(K, True), (H, True)], K),
        ([(K, False), (U, True)], U),
    ],
)
def test_overall_state(states: list[tuple[HealthState, bool]], expected: HealthState) -> None:
    assert overall_state(states) is expected


@pytest.mark.parametrize(
    ("value", "expected"), [(None, N), (10.0, P), (79.9, P), (80.0, W), (94.9, W), (95.0, F), (100.0, F)]
)
def test_judge_percent(value: float | None, expected: Sample) -> None:
    assert judge_percent(value, Band(80, 95)) is expected


def probe(**kw: object) -> Probe:
    base: dict[str, object] = {"name": "web", "type": ProbeType.HTTP}
    base.update(kw)
    return Probe(**base)  # type: ignore[arg-type]


GOOD = [
    probe(http=HttpProbe(port=8080, path="/healthz?deep=1", expect_status=(200, 204), body_regex="ok")),
    probe(name="ssh", type=ProbeType.TCP, tcp=TcpProbe(22)),
    probe(name="db", type=ProbeType.COMMAND, command=CommandProbe(("pg_isready",), 0, "accepting")),
    probe(name="ga", type=ProbeType.GUEST_AGENT),
    probe(name="ext", type=ProbeType.SCRIPT, script=ScriptProbe("check-db.sh", ("--fast",))),
    probe(name="res", type=ProbeType.RESOURCE, resource=ResourceProbe(cpu=Band(80, 95), disk=Band(85, 95))),
    probe(name="ready", type=ProbeType.FILE, file=FileProbe("/run/ready", "^ok")),
    probe(name="plain", type=ProbeType.HTTP),  # every default: GET / on port 80
    probe(
        name="act",
        type=ProbeType.TCP,
        tcp=TcpProbe(80),
        on_failure=Action(ActionKind.COMMAND, ("systemctl", "restart", "nginx")),
        on_recovery=Action(ActionKind.NONE),
    ),
]


def test_good_probes_pass() -> None:
    validate_probes(GOOD)


@pytest.mark.parametrize(
    ("bad", "field", "text"),
    [
        # http and tcp probes never name a host: the path cannot carry an authority either
        (probe(http=HttpProbe(path="http://169.254.169.254/latest")), "http.path", "host is always the VM's"),
        (probe(http=HttpProbe(path="//evil.example/x")), "http.path", "absolute path"),
        (probe(http=HttpProbe(path="healthz")), "http.path", "absolute path"),
        (probe(http=HttpProbe(headers=(("Host", "evil.example"),))), "http.headers.Host", "may set"),
        (probe(http=HttpProbe(headers=(("X-A", "a\r\nX-B: b"),))), "http.headers.X-A", "one line"),
        (probe(http=HttpProbe(port=0)), "http.port", "TCP port"),
        (probe(http=HttpProbe(scheme="file")), "http.scheme", "http or https"),
        (probe(http=HttpProbe(method="DELETE")), "http.method", "use one of"),
        (probe(http=HttpProbe(expect_status=(700,))), "http.expect_status", "status codes"),
        (probe(http=HttpProbe(body_regex="(")), "http.body_regex", "regular expression"),
        (probe(type=ProbeType.TCP), "tcp", "needs its 'tcp:'"),
        (probe(type=ProbeType.TCP, tcp=TcpProbe(70000)), "tcp.port", "TCP port"),
        # a script probe names an executable in probe_scripts_dir, never a path
        (probe(type=ProbeType.SCRIPT, script=ScriptProbe("/usr/bin/id")), "script.name", "not a path"),
        (probe(type=ProbeType.SCRIPT, script=ScriptProbe("../../bin/sh")), "script.name", "not a path"),
        (probe(type=ProbeType.SCRIPT, script=ScriptProbe(".hidden")), "script.name", "not a path"),
        (probe(type=ProbeType.COMMAND, command=CommandProbe(())), "command.argv", "program"),
        (probe(type=ProbeType.RESOURCE, resource=ResourceProbe()), "resource", "at least one"),
        (probe(type=ProbeType.RESOURCE, resource=ResourceProbe(cpu=Band(90, 80))), "resource.cpu", "warn <="),
        (probe(type=ProbeType.FILE, file=FileProbe("relative")), "file.path", "absolute"),
        (probe(tcp=TcpProbe(22)), "tcp", "belongs to a tcp probe"),
        (probe(interval_ms=100), "interval", "500ms"),
        (probe(timeout_ms=10_000, interval_ms=10_000), "timeout", "shorter than the interval"),
        (probe(failure_threshold=0), "failure_threshold", "between 1"),
        (probe(success_threshold=101), "success_threshold", "between 1"),
        (probe(name="Bad_Name"), "name", ""),
        (probe(on_failure=Action(ActionKind.COMMAND)), "on_failure.command", "program"),
        (probe(on_recovery=Action(ActionKind.RESTART, ("x",))), "on_recovery.command", "only a command"),
    ],
)
def test_bad_probes_name_the_field(bad: Probe, field: str, text: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        validate_probes([GOOD[0], bad])
    assert info.value.metadata["field"] == f"spec.health_checks[1].{field}"
    assert text in info.value.message


def test_names_are_unique_and_the_count_is_bounded() -> None:
    with pytest.raises(InvalidArgument, match="duplicate"):
        validate_probes([GOOD[0], dataclasses.replace(GOOD[1], name="web")])
    many = [dataclasses.replace(GOOD[1], name=f"p{i}") for i in range(33)]
    with pytest.raises(InvalidArgument, match="at most 32"):
        validate_probes(many)


@pytest.mark.parametrize(
    ("text", "ms"),
    [("500ms", 500), ("10s", 10_000), ("5m", 300_000), ("2h", 7_200_000), ("1d", 86_400_000), (3, 3000), (0, 0)],
)
def test_durations_parse_and_print_back(text: str | int, ms: int) -> None:
    assert parse_duration_ms(text) == ms
    assert parse_duration_ms(format_duration_ms(ms)) == ms if ms else format_duration_ms(0) == "0ms"


@pytest.mark.parametrize("bad", ["10", "1.5s", "-1s", "10 sec", "", True, None, -1, [1]])
def test_bad_durations_say_how_to_write_one(bad: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration_ms(bad)
