"""One trace per CLI command across three real processes, exported over OTLP/gRPC to a real receiver.

The test runs an OTLP/gRPC trace receiver (``TraceService/Export``) on 127.0.0.1:0, starts the controller
and the agent as processes with ``OTEL_EXPORTER_OTLP_ENDPOINT`` pointing at it, runs
``clonebox --trace -o json vm create --wait`` (also pointed at it) and checks the span tree of the trace
the CLI printed: CLI root -> CLI client -> controller server -> controller client (from the background
operation task) -> agent server -> libvirt calls, one trace id, parents across the processes, each
process under its own service name, and no health-check spans.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from tests.e2e.otlp import CLIENT, SERVER, Receiver, Span, otlp_env, otlp_receiver
from tests.realfleet import RealFleet, running_fleet

pytestmark = [pytest.mark.e2e, pytest.mark.libvirt]

NEEDLE = "e2e-tracing-pass-5f0c"  # a password in the VM's user-data: must never reach a span


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, int]]:
    with otlp_receiver() as found:
        yield found


@pytest.fixture
def traced_fleet(receiver: tuple[Receiver, int]) -> Iterator[RealFleet]:
    _collector, port = receiver
    with running_fleet(otlp_env(port)) as fleet:
        yield fleet


def _trace_id(stderr: str) -> str:
    for line in stderr.splitlines():
        if line.startswith("{") and "trace_id" in line:
            return str(json.loads(line)["trace_id"])
    raise AssertionError(f"no trace id printed on stderr: {stderr!r}")


def _ancestors(span: Span, by_id: dict[str, Span]) -> Iterator[Span]:
    while span.parent_id and span.parent_id in by_id:
        span = by_id[span.parent_id]
        yield span


def test_one_trace_from_cli_through_controller_and_agent_to_libvirt(
    traced_fleet: RealFleet, receiver: tuple[Receiver, int]
) -> None:
    collector, _port = receiver
    fleet = traced_fleet
    name = f"{fleet.host}-t"
    spec = fleet.spec_file(name, cloud_init={"user_data": f"#cloud-config\npassword: {NEEDLE}\n"})
    r = fleet.cli("--trace", "-o", "json", "vm", "create", "-f", str(spec), "--wait")
    assert json.loads(r.stdout)["state"] == "VM_STATE_RUNNING"
    trace_id = _trace_id(r.stderr)
    assert len(trace_id) == 32 and int(trace_id, 16) != 0

    # the CLI flushed before exiting; the daemons export in batches: wait until the agent's libvirt
    # spans of this trace have arrived
    deadline = time.monotonic() + 60
    while True:
        spans = [s for s in collector.spans() if s.trace_id == trace_id]
        if any(s.service == "clonebox-agent" and s.name == "virDomainCreate" for s in spans):
            break
        if time.monotonic() > deadline:
            raise AssertionError(
                f"spans of {trace_id} never all arrived: {sorted({(s.service, s.name) for s in spans})}"
            )
        time.sleep(0.2)
    time.sleep(1.0)  # let the last batches (parents end after their children) arrive
    spans = [s for s in collector.spans() if s.trace_id == trace_id]
    by_id = {s.span_id: s for s in spans}
    assert {s.service for s in spans} == {"clonebox", "clonebox-controller", "clonebox-agent"}

    # CLI: the root span of the command, and its call to the controller
    (root,) = [s for s in spans if not s.parent_id]
    assert (root.service, root.name) == ("clonebox", "clonebox vm create")
    create = "/clonebox.controller.v1.VmService/CreateVm"
    (cli_call,) = [s for s in spans if s.service == "clonebox" and s.name == create]
    assert cli_call.kind == CLIENT and cli_call.parent_id == root.span_id

    # controller: the server span is a child of the CLI's client span (W3C context in the metadata)
    (ctl_server,) = [s for s in spans if s.service == "clonebox-controller" and s.name == create]
    assert ctl_server.kind == SERVER and ctl_server.parent_id == cli_call.span_id
    assert ctl_server.attributes.get("clonebox.resource") == f"vms/{name}"
    assert ctl_server.attributes.get("enduser.id", "").endswith("/user/admin/ops")

    # controller -> agent: made by the background operation task, still in the request's trace
    agent_create = "/clonebox.agent.v1.AgentService/CreateVm"
    (ctl_client,) = [s for s in spans if s.service == "clonebox-controller" and s.name == agent_create]
    assert ctl_client.kind == CLIENT
    assert ctl_server in list(_ancestors(ctl_client, by_id))

    # agent: the server span is a child of the controller's client span
    (agent_server,) = [s for s in spans if s.service == "clonebox-agent" and s.name == agent_create]
    assert agent_server.kind == SERVER and agent_server.parent_id == ctl_client.span_id

    # libvirt calls, named after the C API, under the agent's server span, with the domain name
    libvirt_spans = [s for s in spans if s.service == "clonebox-agent" and s.name.startswith("vir")]
    assert libvirt_spans
    for s in libvirt_spans:
        assert agent_server in list(_ancestors(s, by_id)), s
        assert s.kind == CLIENT
    (define,) = [s for s in libvirt_spans if s.name == "virDomainDefineXML"]
    assert define.attributes.get("libvirt.domain") == f"cb-{name}"
    start = next(s for s in libvirt_spans if s.name == "virDomainCreate")
    assert start.attributes.get("libvirt.domain") == f"cb-{name}"

    # nothing exported anywhere traced a health check, and the user-data password never left
    everything = collector.spans()
    assert not [s for s in everything if "grpc.health" in s.name or "Health/" in s.name]
    assert not [s for s in everything if "ServerReflection" in s.name]
    assert NEEDLE.encode() not in collector.raw()

    fleet.cli("vm", "delete", name, "--wait")
