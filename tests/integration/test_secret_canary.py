"""A secret passed through a create never shows up in logs, spans, metrics, audit records or errors."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from typing import cast

import grpc
import grpc.aio
import pytest
from clonebox.controller.v1 import audit_service_pb2, audit_service_pb2_grpc, vm_service_pb2
from clonebox.type.v1 import vm_pb2
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import generate_latest

from clonebox_core.model import Resources
from clonebox_core.telemetry.logging import make_formatter
from tests.conftest import memory_span_exporter
from tests.integration.conftest import Fleet
from tests.integration.test_fleet import create

pytestmark = pytest.mark.integration

CANARY = "canary-pw-7d1e0c3b9a"
SMALL = Resources(vcpus=4, memory_mib=4096, disk_mib=100_000)


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    memory = cast(InMemorySpanExporter, memory_span_exporter())
    yield memory
    memory.shutdown()


@pytest.fixture
def logs() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(make_formatter("test", as_json=True))
    root, level = logging.getLogger(), logging.getLogger().level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)  # the most a daemon ever logs
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def secret_spec(name: str, **kw: object) -> vm_pb2.VmSpec:
    return vm_pb2.VmSpec(
        name=name,
        vcpus=1,
        memory_mib=kw.pop("memory_mib", 256),  # type: ignore[arg-type]
        disks=[vm_pb2.DiskSpec(name="root", size_mib=512)],
        cloud_init=vm_pb2.CloudInit(user_data=f"#cloud-config\npassword: {CANARY}\nchpasswd: {{expire: false}}\n"),
    )


def _span_text(exporter: InMemorySpanExporter) -> str:
    parts = []
    for span in exporter.get_finished_spans():
        parts.append(span.name)
        parts += [f"{k}={v}" for k, v in (span.attributes or {}).items()]
        parts += [f"{e.name} {dict(e.attributes or {})}" for e in span.events]
        parts.append(str(span.status.description))
    return "\n".join(parts)


async def test_a_canary_in_user_data_appears_only_where_it_must(
    fleet: Fleet, spans: InMemorySpanExporter, logs: io.StringIO
) -> None:
    await fleet.add_agent("h1", SMALL)
    await create(fleet, secret_spec("secret-1"), request_id="canary-create")

    # the value did travel: the agent handed it to the hypervisor (it goes into the seed ISO)
    created = await fleet.fakes["h1"].get("secret-1")
    assert created.spec.cloud_init is not None and CANARY in created.spec.cloud_init.user_data.reveal()

    errors: list[str] = []
    for request in (
        vm_service_pb2.CreateVmRequest(spec=secret_spec("secret-1"), request_id="dup"),  # already exists
        vm_service_pb2.CreateVmRequest(spec=secret_spec("secret-2", memory_mib=0), request_id="bad"),  # invalid
        vm_service_pb2.CreateVmRequest(spec=secret_spec("secret-3"), host="nowhere", request_id="nohost"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await fleet.vms.CreateVm(request)
        errors.append(f"{err.value.details()} {err.value.trailing_metadata()} {err.value.debug_error_string()}")
    assert len(errors) == 3 and all(errors)

    await fleet.vms.GetVm(vm_service_pb2.GetVmRequest(name="secret-1"))
    audit = audit_service_pb2_grpc.AuditServiceStub(fleet.channel)
    records = (await audit.ListAuditEvents(audit_service_pb2.ListAuditEventsRequest(page_size=1000))).records
    assert any(r.event.request_id == "canary-create" for r in records)  # the create was audited...
    assert any(r.event.request_id == "bad" for r in records)  # ...and so was the rejected one
    exported = [r async for r in audit.ExportAudit(audit_service_pb2.ExportAuditRequest())]

    metrics = (
        generate_latest(fleet.controller.metrics.registry).decode()
        + generate_latest(fleet.agents["h1"].metrics.registry).decode()
    )

    places = {
        "logs": logs.getvalue(),
        "spans": _span_text(spans),
        "metrics": metrics,
        "audit records": "\n".join(str(r) for r in records) + "\n".join(str(r) for r in exported),
        "errors": "\n".join(errors),
    }
    assert places["spans"] and places["logs"] and places["metrics"]  # each place was really looked at
    leaked = [where for where, text in places.items() if CANARY in text]
    assert leaked == []
