"""An in-process fake controller (a real gRPC server on 127.0.0.1:0) for the CLI tests.

The Fake* servicers keep a tiny fleet in memory, record every request, and raise errors the way the
real controller does (status + ErrorInfo via ``clonebox_core.rpc.status``), so the CLI's error mapping
is exercised end to end. Scripted behaviours, chosen by VM name:

* ``fail-*``: the create operation ends with RESOURCE_EXHAUSTED (HOST_CAPACITY_EXCEEDED);
* ``slow-*``: the create operation never finishes (for ``--timeout``);
* ``--host sick``: CreateVm fails at once with FAILED_PRECONDITION (HOST_NOT_SERVING).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from clonebox.controller.v1 import (
    host_service_pb2,
    host_service_pb2_grpc,
    operation_service_pb2,
    operation_service_pb2_grpc,
    vm_service_pb2,
    vm_service_pb2_grpc,
)
from clonebox.type.v1 import host_pb2, operation_pb2, resources_pb2, vm_pb2
from grpc_status import rpc_status
from typer.testing import CliRunner

from clonebox_core.errors import (
    CloneboxError,
    FailedPrecondition,
    NotFound,
    ResourceExhausted,
)
from clonebox_core.rpc.status import to_status_proto

CREATE_STEPS = [("placing", 10), ("creating disks", 40), ("defining domain", 70), ("starting", 90)]


def abort(context: grpc.ServicerContext, err: CloneboxError) -> None:
    """Fail the call the way the real server's error interceptor does."""
    context.abort_with_status(rpc_status.to_status(to_status_proto(err)))


@dataclass
class FakeFleet:
    """State shared by the fake servicers."""

    hosts: dict[str, host_pb2.Host] = field(default_factory=dict)
    vms: dict[str, vm_pb2.Vm] = field(default_factory=dict)
    operations: dict[str, operation_pb2.Operation] = field(default_factory=dict)
    #: operation id -> the states WatchOperation will stream
    scripts: dict[str, list[operation_pb2.Operation]] = field(default_factory=dict)
    by_request_id: dict[str, str] = field(default_factory=dict)
    requests: list[tuple[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    counter: int = 0

    def record(self, method: str, request: Any) -> None:
        with self.lock:
            copy = type(request)()
            copy.CopyFrom(request)
            self.requests.append((method, copy))

    def calls(self, method: str) -> list[Any]:
        return [r for m, r in self.requests if m == method]

    def new_operation(self, kind: str, target: str, request_id: str) -> operation_pb2.Operation:
        with self.lock:
            self.counter += 1
            op = operation_pb2.Operation(id=f"op-{self.counter}", kind=kind, target=target, request_id=request_id)
            op.create_time.GetCurrentTime()
            op.update_time.GetCurrentTime()
            self.operations[op.id] = op
            if request_id:
                self.by_request_id[request_id] = op.id
            return op

    def add_vm(
        self,
        name: str,
        host: str = "local",
        state: int = vm_pb2.VM_STATE_RUNNING,
        labels: dict[str, str] | None = None,
    ) -> vm_pb2.Vm:
        vm = vm_pb2.Vm(
            name=name,
            host=host,
            state=state,  # type: ignore[arg-type]
            spec=vm_pb2.VmSpec(name=name, vcpus=1, memory_mib=128, labels=labels or {}),
            uuid=f"uuid-{name}",
            addresses=[vm_pb2.IpAddress(interface="eth0", address="10.0.0.5", prefix=24, source="agent")],
        )
        vm.create_time.GetCurrentTime()
        self.vms[name] = vm
        return vm


def make_host(name: str, state: int = host_pb2.HOST_STATE_READY) -> host_pb2.Host:
    host = host_pb2.Host(
        name=name,
        address="127.0.0.1:7101",
        capacity=resources_pb2.Resources(vcpus=8, memory_mib=16384, disk_mib=100 * 1024),
        allocatable=resources_pb2.Resources(vcpus=8, memory_mib=15872, disk_mib=99 * 1024),
        allocated=resources_pb2.Resources(vcpus=1, memory_mib=128, disk_mib=1024),
        hypervisor=host_pb2.HypervisorInfo(uri="test:///default", domain_type="qemu", libvirt_version="9.0.0"),
        state=state,  # type: ignore[arg-type]
        vm_count=1,
    )
    host.last_heartbeat_time.GetCurrentTime()
    return host


class FakeHostService(host_service_pb2_grpc.HostServiceServicer):
    """HostService over the fake fleet."""

    def __init__(self, fleet: FakeFleet) -> None:
        self.fleet = fleet

    def _get(self, name: str, context: grpc.ServicerContext) -> host_pb2.Host:
        host = self.fleet.hosts.get(name)
        if host is None:
            abort(context, NotFound(f"host {name} not found", reason="HOST_NOT_FOUND"))
            raise AssertionError  # abort raises
        return host

    def ListHosts(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.fleet.record("ListHosts", request)
        return host_service_pb2.ListHostsResponse(hosts=sorted(self.fleet.hosts.values(), key=lambda h: h.name))

    def GetHost(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.fleet.record("GetHost", request)
        return host_service_pb2.GetHostResponse(host=self._get(request.name, context))

    def CordonHost(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.fleet.record("CordonHost", request)
        host = self._get(request.name, context)
        host.cordoned = True
        return host_service_pb2.CordonHostResponse(host=host)

    def UncordonHost(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.fleet.record("UncordonHost", request)
        host = self._get(request.name, context)
        host.cordoned = False
        return host_service_pb2.UncordonHostResponse(host=host)

    def DrainHost(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.fleet.record("DrainHost", request)
        host = self._get(request.name, context)
        host.cordoned = True
        stopped = []
        for vm in self.fleet.vms.values():
            if vm.host == host.name and vm.state == vm_pb2.VM_STATE_RUNNING:
                vm.state = vm_pb2.VM_STATE_STOPPED
                stopped.append(vm.name)
        return host_service_pb2.DrainHostResponse(host=host, stopped_vms=stopped)


class FakeVmService(vm_service_pb2_grpc.VmServiceServicer):
    """VmService over the fake fleet; mutations return operations scripted for WatchOperation."""

    def __init__(self, fleet: FakeFleet) -> None:
        self.fleet = fleet

    def CreateVm(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.fleet.record("CreateVm", request)
        if request.request_id in self.fleet.by_request_id:  # idempotent retry
            op = self.fleet.operations[self.fleet.by_request_id[request.request_id]]
            return vm_service_pb2.CreateVmResponse(operation=op)
        if request.host == "sick":
            abort(
                context,
                FailedPrecondition("host sick is NOT_SERVING: libvirt does not answer", reason="HOST_NOT_SERVING"),
            )
        name = request.spec.name
        host = request.host or "local"
        op = self.fleet.new_operation("vm.create", f"hosts/{host}/vms/{name}", request.request_id)
        op.step, op.progress = "accepted", 0
        script = []
        for step, pct in CREATE_STEPS:
            state = operation_pb2.Operation()
            state.CopyFrom(op)
            state.step, state.progress = step, pct
            script.append(state)
        final = operation_pb2.Operation()
        final.CopyFrom(op)
        final.done, final.progress, final.step = True, 100, "done"
        if name.startswith("fail-"):
            final.step = "placing"
            final.error.CopyFrom(
                to_status_proto(
                    ResourceExhausted(
                        "no host has room for 1 vCPU, 128 MiB\nbest: local", reason="HOST_CAPACITY_EXCEEDED"
                    )
                )
            )
        elif name.startswith("slow-"):
            final = None  # type: ignore[assignment]
        else:
            vm = vm_pb2.Vm(name=name, host=host, state=vm_pb2.VM_STATE_RUNNING, spec=request.spec, uuid="u-1")
            self.fleet.vms[name] = vm
            final.result.vm.CopyFrom(vm)
        if final is not None:
            script.append(final)
        self.fleet.scripts[op.id] = script
        return vm_service_pb2.CreateVmResponse(operation=op)

    def GetVm(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.fleet.record("GetVm", request)
        vm = self.fleet.vms.get(request.name)
        if vm is None:
            abort(context, NotFound(f"vm {request.name} not found", reason="VM_NOT_FOUND"))
        return vm_service_pb2.GetVmResponse(vm=vm)

    def ListVms(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.fleet.record("ListVms", request)
        vms = [
            vm
            for _, vm in sorted(self.fleet.vms.items())
            if (not request.host or vm.host == request.host)
            and (not request.state or vm.state == request.state)
            and all(vm.spec.labels.get(k) == v for k, v in request.labels.items())
        ]
        start = int(request.page_token or 0)
        size = request.page_size or 100
        page = vms[start : start + size]
        token = str(start + size) if start + size < len(vms) else ""
        return vm_service_pb2.ListVmsResponse(vms=page, next_page_token=token)

    def _power(self, kind: str, request: Any, context: grpc.ServicerContext, state: int) -> operation_pb2.Operation:
        vm = self.fleet.vms.get(request.name)
        if vm is None:
            abort(context, NotFound(f"vm {request.name} not found", reason="VM_NOT_FOUND"))
            raise AssertionError
        op = self.fleet.new_operation(kind, f"hosts/{vm.host}/vms/{vm.name}", request.request_id)
        final = operation_pb2.Operation()
        final.CopyFrom(op)
        final.done, final.progress, final.step = True, 100, "done"
        if state:
            vm.state = state  # type: ignore[assignment]
            final.result.vm.CopyFrom(vm)
        else:
            del self.fleet.vms[vm.name]
        self.fleet.scripts[op.id] = [final]
        return op

    def StartVm(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.fleet.record("StartVm", request)
        return vm_service_pb2.StartVmResponse(
            operation=self._power("vm.start", request, context, vm_pb2.VM_STATE_RUNNING)
        )

    def StopVm(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.fleet.record("StopVm", request)
        return vm_service_pb2.StopVmResponse(
            operation=self._power("vm.stop", request, context, vm_pb2.VM_STATE_STOPPED)
        )

    def DeleteVm(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.fleet.record("DeleteVm", request)
        return vm_service_pb2.DeleteVmResponse(operation=self._power("vm.delete", request, context, 0))


class FakeOperationService(operation_service_pb2_grpc.OperationServiceServicer):
    """OperationService: WatchOperation streams the scripted states and stores each as current."""

    def __init__(self, fleet: FakeFleet) -> None:
        self.fleet = fleet

    def _get(self, op_id: str, context: grpc.ServicerContext) -> operation_pb2.Operation:
        op = self.fleet.operations.get(op_id)
        if op is None:
            abort(context, NotFound(f"operation {op_id} not found", reason="OPERATION_NOT_FOUND"))
            raise AssertionError
        return op

    def GetOperation(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.fleet.record("GetOperation", request)
        return operation_service_pb2.GetOperationResponse(operation=self._get(request.id, context))

    def WaitOperation(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.fleet.record("WaitOperation", request)
        return operation_service_pb2.WaitOperationResponse(operation=self._get(request.id, context))

    def WatchOperation(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        self.fleet.record("WatchOperation", request)
        op = self._get(request.id, context)
        yield operation_service_pb2.WatchOperationResponse(operation=op)
        for state in self.fleet.scripts.pop(request.id, []):
            op.CopyFrom(state)
            yield operation_service_pb2.WatchOperationResponse(operation=op)
        while not op.done and context.is_active():  # a slow operation: keep the stream open
            time.sleep(0.05)

    def ListOperations(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.fleet.record("ListOperations", request)
        ops = sorted(self.fleet.operations.values(), key=lambda o: int(o.id.split("-")[1]), reverse=True)
        if request.only_running:
            ops = [o for o in ops if not o.done]
        return operation_service_pb2.ListOperationsResponse(operations=ops[: request.page_size or 50])


@dataclass
class FakeController:
    """A running fake controller."""

    address: str
    fleet: FakeFleet


@pytest.fixture
def fake_controller() -> Iterator[FakeController]:
    """A fake controller serving on a free loopback port, with host 'local' and VM 'web'."""
    fleet = FakeFleet()
    fleet.hosts["local"] = make_host("local")
    fleet.add_vm("web", labels={"app": "demo"})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    host_service_pb2_grpc.add_HostServiceServicer_to_server(FakeHostService(fleet), server)
    vm_service_pb2_grpc.add_VmServiceServicer_to_server(FakeVmService(fleet), server)
    operation_service_pb2_grpc.add_OperationServiceServicer_to_server(FakeOperationService(fleet), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield FakeController(f"127.0.0.1:{port}", fleet)
    finally:
        server.stop(0)


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> CliRunner:
    """A CliRunner isolated from the user's environment (no CLONEBOX_CONTROLLER, private XDG dirs)."""
    monkeypatch.delenv("CLONEBOX_CONTROLLER", raising=False)
    monkeypatch.delenv("CLONEBOX_DEBUG", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("COLUMNS", "200")
    return CliRunner()
