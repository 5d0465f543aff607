"""``health_checks`` in version-2 spec files: loading, errors with lines, and every round trip."""

from __future__ import annotations

import json

import pytest
from clonebox.type.v1 import health_pb2, vm_pb2

from clonebox_core import specjson
from clonebox_core.errors import InvalidArgument
from clonebox_core.health import ActionKind, Band, ProbeType
from clonebox_core.rpc import convert
from clonebox_core.spec import dump_spec, load_spec_text

HEAD = "version: 2\nname: web\nkernel_boot: {kernel: k}\nhealth_checks:\n"
FULL = HEAD + (
    "  - {name: http, type: http, http: {port: 8080, path: /healthz, expect_status: [200, 204],"
    " headers: {X-Probe: clonebox}, body_regex: ok}, failure_threshold: 2}\n"
    "  - {name: ssh, type: tcp, tcp: {port: 22}, interval: 5s, timeout: 500ms, critical: false}\n"
    "  - {name: ga, type: guest_agent, initial_delay: 1m}\n"
    "  - {name: res, type: resource, resource: {cpu: {warn: 80, critical: 95.5}, disk: {warn: 85, critical: 95}},"
    " on_failure: {action: restart}}\n"
    "  - {name: ready, type: file, file: {path: /run/ready, regex: '^ok'},"
    " on_failure: {action: command, command: [systemctl, restart, app]}, on_recovery: {action: none}}\n"
    "  - {name: db, type: command, command: {argv: [pg_isready], output_regex: accepting}}\n"
    "  - {name: ext, type: script, script: {name: check-db, args: [--fast]}}\n"
    "  - {name: plain, type: http}\n"
)


def test_every_probe_type_loads() -> None:
    spec = load_spec_text(FULL)
    by_name = {p.name: p for p in spec.health_checks}
    assert [p.name for p in spec.health_checks] == ["http", "ssh", "ga", "res", "ready", "db", "ext", "plain"]
    http = by_name["http"]
    assert http.type is ProbeType.HTTP and http.http is not None
    assert (http.http.port, http.http.path, http.http.expect_status) == (8080, "/healthz", (200, 204))
    assert http.http.headers == (("X-Probe", "clonebox"),) and http.failure_threshold == 2
    ssh = by_name["ssh"]
    assert (ssh.interval_ms, ssh.timeout_ms, ssh.critical) == (5000, 500, False)
    assert by_name["ga"].initial_delay_ms == 60_000
    res = by_name["res"]
    assert res.resource is not None and res.resource.cpu == Band(80.0, 95.5) and res.resource.memory is None
    assert res.on_failure.kind is ActionKind.RESTART
    ready = by_name["ready"]
    assert ready.on_failure.kind is ActionKind.COMMAND and ready.on_failure.argv == ("systemctl", "restart", "app")
    # an http check with no settings is GET / on port 80, expecting 200
    plain = by_name["plain"].http
    assert plain is not None and (plain.port, plain.path, plain.method, plain.expect_status) == (80, "/", "GET", (200,))


def test_round_trips_through_the_file_the_store_and_the_wire() -> None:
    spec = load_spec_text(FULL)
    assert load_spec_text(dump_spec(spec)) == spec
    assert specjson.spec_from_dict(json.loads(json.dumps(specjson.spec_to_dict(spec, secrets="keep")))) == spec
    assert convert.spec_from_proto(convert.spec_to_proto(spec)) == spec


@pytest.mark.parametrize(
    ("check", "field", "text"),
    [
        ("{name: x, type: tcp, tcp: {port: 22, host: 10.0.0.1}}", "health_checks[0].tcp.host", "never name a host"),
        ("{name: x, type: http, url: 'http://10.0.0.1/'}", "health_checks[0].url", "never name a host"),
        ("{name: x, type: http, http: {path: 'http://10.0.0.1/'}}", "health_checks[0].http.path", "VM's"),
        ("{name: x, type: script, script: {name: /bin/sh}}", "health_checks[0].script.name", "not a path"),
        ("{name: x, type: tcp, tcp: {port: 22}, interval: 10sec}", "health_checks[0].interval", "not a duration"),
        ("{name: x, type: tcp, tcp: {port: 22}, timeout: 1m}", "health_checks[0].timeout", "shorter"),
        ("{name: x, type: ping}", "health_checks[0].type", "is not allowed"),
        ("{name: x, type: tcp}", "health_checks[0].tcp", "needs its 'tcp:'"),
    ],
)
def test_bad_checks_name_field_and_line(check: str, field: str, text: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        load_spec_text(HEAD + f"  - {{name: ok, type: guest_agent}}\n  - {check}\n".replace("[0]", "[1]"))
    err = info.value
    assert err.metadata["field"] == field.replace("[0]", "[1]"), err.message
    assert text in err.message and err.metadata["line"] == "6"


def test_health_checks_need_version_2() -> None:
    with pytest.raises(InvalidArgument) as info:
        load_spec_text("version: 1\nname: web\nkernel_boot: {kernel: k}\nhealth_checks: []\n")
    assert "needs 'version: 2'" in info.value.message


def test_an_unknown_type_on_the_wire_is_refused_with_its_field() -> None:
    msg = vm_pb2.VmSpec(name="web", health_checks=[health_pb2.HealthCheck(name="x", type=99)])
    with pytest.raises(InvalidArgument) as info:
        convert.spec_from_proto(msg)
    assert info.value.metadata["field"] == "spec.health_checks[0].type"
    # unset optional booleans mean true
    msg = vm_pb2.VmSpec(
        name="web",
        health_checks=[
            health_pb2.HealthCheck(
                name="x", type=health_pb2.HEALTH_CHECK_TYPE_HTTP, http=health_pb2.HttpCheck(port=80, path="/")
            )
        ],
    )
    probe = convert.spec_from_proto(msg).health_checks[0]
    assert probe.critical is True and probe.http is not None and probe.http.tls_verify is True
