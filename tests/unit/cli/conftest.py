"""An in-process fake controller (a real gRPC server on 127.0.0.1:0, mTLS) for the CLI tests.

The Fake* servicers keep a tiny fleet in memory, record every request, and raise errors the way the
real controller does (status + ErrorInfo via ``clonebox_core.rpc.status``), so the CLI's error mapping
is exercised end to end. The server speaks mTLS with core's credentials (a client certificate from the
test CA is required, as on the real controller); ``test_pki`` makes a throwaway CA in tmp_path and points
``CLONEBOX_TLS_DIR`` at an admin user's folder. FakePkiService signs renewals with that CA. Scripted
behaviours, chosen by VM name:

* ``fail-*``: the create operation ends with RESOURCE_EXHAUSTED (HOST_CAPACITY_EXCEEDED);
* ``slow-*``: the create operation never finishes (for ``--timeout``);
* ``--host sick``: CreateVm fails at once with FAILED_PRECONDITION (HOST_NOT_SERVING).

FakeSnapshotService keeps ``FakeFleet.snapshots`` (VMs named ``shared-*`` refuse memory snapshots),
streams ``export_image`` as one disk, and records every import in ``FakeFleet.imports``.

FakeHealthService answers from ``FakeFleet.health`` (and ``check_results``, ``histories``); its
WatchHealth plays ``FakeFleet.watch_sessions``, one scripted session per call (see ``WatchStep``).

FakePlanService keeps ``FakeFleet.plans`` (revisions) and ``plan_runs``; ApplyPlan and DestroyPlan work out
the whole run at once and WatchPlan plays its versions (``run_scripts``), one VM change per version. Scripted
behaviours: a service named ``fail-*`` fails its health gate (probe ``FAIL_PROBE``), then the run rolls back
what it created (or stops FAILED when the plan says leave); a plan that needs more memory than host
``local`` has free is RESOURCE_EXHAUSTED; ``plan_unreachable`` ApplyPlan/DestroyPlan calls fail as if the
controller had not been reached (after recording the request); ``plan_watch_cuts`` cuts WatchPlan calls.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from clonebox.controller.v1 import (
    health_service_pb2,
    health_service_pb2_grpc,
    host_service_pb2,
    host_service_pb2_grpc,
    operation_service_pb2,
    operation_service_pb2_grpc,
    pki_service_pb2,
    pki_service_pb2_grpc,
    plan_service_pb2,
    plan_service_pb2_grpc,
    snapshot_service_pb2,
    snapshot_service_pb2_grpc,
    vm_service_pb2,
    vm_service_pb2_grpc,
)
from clonebox.type.v1 import health_pb2, host_pb2, operation_pb2, plan_pb2, resources_pb2, snapshot_pb2, vm_pb2
from cryptography import x509
from grpc_status import rpc_status
from typer.testing import CliRunner

from clonebox_core.errors import (
    AlreadyExists,
    CloneboxError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from clonebox_core.plan import ChangeKind, classify, needs_replace_error
from clonebox_core.rpc.convert import spec_from_proto
from clonebox_core.rpc.convert_plan import change_kind_to_proto
from clonebox_core.rpc.status import to_status_proto
from clonebox_core.rpc.tls import TlsFiles, server_credentials
from clonebox_core.security.identity import make_identity
from clonebox_core.security.jointoken import JoinToken
from clonebox_core.security.pki import CertificateAuthority, cert_pem, identity_of, key_pem, write_private, write_public

TRUST_DOMAIN = "clonebox.local"

CREATE_STEPS = [("placing", 10), ("creating disks", 40), ("defining domain", 70), ("starting", 90)]


def abort(context: grpc.ServicerContext, err: CloneboxError) -> None:
    """Fail the call the way the real server's error interceptor does."""
    context.abort_with_status(rpc_status.to_status(to_status_proto(err)))


#: one step of a scripted WatchHealth session: a message to send, an error to end the call with, an
#: event to set (to tell the test where the stream is), or HOLD (keep the stream open until cancelled);
#: a session that runs out of steps ends the stream normally
WatchStep = Any
HOLD = "hold"


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
    #: certificates on the deny list (hex serials)
    revoked: set[str] = field(default_factory=set)
    #: when set, RenewCertificate fails with it
    renew_error: CloneboxError | None = None
    #: health by VM name (FakeHealthService)
    health: dict[str, health_pb2.VmHealth] = field(default_factory=dict)
    #: what CheckHealth reports for a VM
    check_results: dict[str, list[health_pb2.ProbeResult]] = field(default_factory=dict)
    #: what GetHealthHistory returns for a VM
    histories: dict[str, health_service_pb2.GetHealthHistoryResponse] = field(default_factory=dict)
    #: one scripted session per WatchHealth call (see WatchStep); none left: hold the stream open
    watch_sessions: list[list[WatchStep]] = field(default_factory=list)
    #: when set, GetVmHealth fails with it
    health_error: CloneboxError | None = None
    #: GetVmHealth answers UNIMPLEMENTED, like a controller without the HealthService
    health_unimplemented: bool = False
    #: snapshots by VM, oldest first (FakeSnapshotService)
    snapshots: dict[str, list[snapshot_pb2.Snapshot]] = field(default_factory=dict)
    #: retention policy by VM
    policies: dict[str, snapshot_pb2.SnapshotPolicy] = field(default_factory=dict)
    #: disk image bytes an export streams (one disk, "root")
    export_image: bytes = b"clonebox-disk-image " * 4096
    #: when set, ExportSnapshot fails with it after the header and one chunk
    export_error: CloneboxError | None = None
    #: every ImportSnapshot call: the parts received and whether the stream ended with a trailer
    imports: list[FakeImport] = field(default_factory=list)
    #: plan revisions by plan name, oldest first (FakePlanService)
    plans: dict[str, list[plan_pb2.Plan]] = field(default_factory=dict)
    #: every plan run by id, as it stands now, in the order the runs started
    plan_runs: dict[str, plan_pb2.PlanRun] = field(default_factory=dict)
    #: run id -> the versions WatchPlan has still to play, in order
    run_scripts: dict[str, list[plan_pb2.PlanRun]] = field(default_factory=dict)
    #: request id -> run id (ApplyPlan and DestroyPlan are idempotent by request id)
    runs_by_request_id: dict[str, str] = field(default_factory=dict)
    #: this many ApplyPlan/DestroyPlan calls fail with a bare UNAVAILABLE, as a call that never reached the
    #: controller does (the client retries those); each is recorded first, so tests see every attempt
    plan_unreachable: int = 0
    #: one entry per WatchPlan call: that call ends with a bare UNAVAILABLE after sending this many messages
    plan_watch_cuts: list[int] = field(default_factory=list)

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


@dataclass
class FakeImport:
    """What FakeSnapshotService.ImportSnapshot received in one call."""

    parts: list[snapshot_pb2.SnapshotImagePart] = field(default_factory=list)
    saw_trailer: bool = False
    #: the stream ended by cancellation or error rather than a clean half-close
    aborted: bool = False


def make_snapshot(
    vm: str, name: str, parent: str = "", *, current: bool = False, size: int = 3 * 1024 * 1024, **kw: Any
) -> snapshot_pb2.Snapshot:
    """A snapshot as an agent would report it."""
    snap = snapshot_pb2.Snapshot(
        name=name,
        vm=vm,
        kind=kw.pop("kind", snapshot_pb2.SNAPSHOT_KIND_INTERNAL),
        vm_state=vm_pb2.VM_STATE_RUNNING,
        has_memory=kw.pop("has_memory", True),
        size_bytes=size,
        parent=parent,
        current=current,
        creator="spiffe://clonebox.local/user/tester/admin",
        **kw,
    )
    snap.create_time.GetCurrentTime()
    return snap


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

    def CreateJoinToken(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.fleet.record("CreateJoinToken", request)
        token = JoinToken("tid", "s3cret", request.host, "127.0.0.1:7102", self.ca.cert_pem)
        response = host_service_pb2.CreateJoinTokenResponse(token=token.encode())
        response.expire_time.FromDatetime(datetime.now(UTC) + timedelta(seconds=request.ttl_seconds or 3600))
        return response

    ca: CertificateAuthority  # set by the fixture


class FakePkiService(pki_service_pb2_grpc.PkiServiceServicer):
    """PkiService over the test CA: lists what it issued, revokes into the fleet, renews the caller."""

    def __init__(self, fleet: FakeFleet, ca: CertificateAuthority, renew_seconds: int = 3600) -> None:
        self.fleet = fleet
        self.ca = ca
        self.renew_seconds = renew_seconds

    def _certs(self, name: str) -> list[pki_service_pb2.Certificate]:
        out = []
        for cert in self.ca.issued():
            ident = identity_of(cert)
            if name and ident.name != name:
                continue
            serial = f"{cert.serial_number:x}"
            c = pki_service_pb2.Certificate(
                serial=serial, identity=ident.spiffe_id, revoked=serial in self.fleet.revoked
            )
            c.not_before.FromDatetime(cert.not_valid_before_utc)
            c.not_after.FromDatetime(cert.not_valid_after_utc)
            out.append(c)
        return out

    def ListCertificates(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.fleet.record("ListCertificates", request)
        return pki_service_pb2.ListCertificatesResponse(certificates=self._certs(request.name))

    def RevokeCertificate(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.fleet.record("RevokeCertificate", request)
        targets = [c for c in self._certs(request.name) if not request.serial or c.serial == request.serial]
        if not targets:
            abort(context, NotFound(f"no certificate for {request.name or request.serial}", reason="CERT_NOT_FOUND"))
        for c in targets:
            self.fleet.revoked.add(c.serial)
            c.revoked = True
        return pki_service_pb2.RevokeCertificateResponse(revoked=targets)

    def RenewCertificate(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.fleet.record("RenewCertificate", request)
        if self.fleet.renew_error is not None:
            abort(context, self.fleet.renew_error)
        (pem,) = context.auth_context()["x509_pem_cert"]
        caller = identity_of(x509.load_pem_x509_certificate(pem))
        try:
            cert = self.ca.sign_csr(request.csr_pem.encode(), caller, seconds=self.renew_seconds)
        except InvalidArgument as err:
            abort(context, err)
            raise
        return pki_service_pb2.RenewCertificateResponse(
            certificate_pem=cert_pem(cert).decode(), ca_pem=self.ca.cert_pem.decode()
        )


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

    def UpdateVm(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Classifies with the real rule (clonebox_core.plan.classify) against the stored spec."""
        self.fleet.record("UpdateVm", request)
        vm = self.fleet.vms.get(request.spec.name)
        if vm is None:
            abort(context, NotFound(f"vm {request.spec.name} not found", reason="VM_NOT_FOUND"))
            raise AssertionError
        kind, fields = classify(spec_from_proto(vm.spec), spec_from_proto(request.spec))
        if kind is ChangeKind.REPLACE:
            abort(context, needs_replace_error(vm.name, fields))
        resp = vm_service_pb2.UpdateVmResponse(kind=change_kind_to_proto(kind), fields=fields)
        if request.dry_run:
            return resp
        op = self.fleet.new_operation("vm.update", f"vms/{vm.name}", request.request_id)
        vm.spec.memory_mib, vm.spec.vcpus = request.spec.memory_mib, request.spec.vcpus
        final = operation_pb2.Operation()
        final.CopyFrom(op)
        final.done, final.progress, final.step = True, 100, "done"
        final.result.vm.CopyFrom(vm)
        self.fleet.scripts[op.id] = [final]
        resp.operation.CopyFrom(op)
        return resp

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


class FakeHealthService(health_service_pb2_grpc.HealthServiceServicer):
    """HealthService over the fake fleet; WatchHealth plays the fleet's scripted sessions."""

    def __init__(self, fleet: FakeFleet) -> None:
        self.fleet = fleet

    def _known(self, name: str, context: grpc.ServicerContext) -> None:
        if name not in self.fleet.vms and name not in self.fleet.health:
            abort(context, NotFound(f"vm {name} not found", reason="VM_NOT_FOUND"))

    def GetVmHealth(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.fleet.record("GetVmHealth", request)
        if self.fleet.health_unimplemented:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        if self.fleet.health_error is not None:
            abort(context, self.fleet.health_error)
        self._known(request.name, context)
        health = self.fleet.health.get(request.name)
        if health is None:  # no report yet, as on the real controller
            health = health_pb2.VmHealth(vm=request.name, state=health_pb2.HEALTH_STATE_UNKNOWN)
        return health_service_pb2.GetVmHealthResponse(health=health)

    def ListHealth(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.fleet.record("ListHealth", request)
        found = [
            h
            for name, h in sorted(self.fleet.health.items())
            if (not request.names or name in request.names) and (not request.states or h.state in request.states)
        ]
        return health_service_pb2.ListHealthResponse(health=found)

    def CheckHealth(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.fleet.record("CheckHealth", request)
        self._known(request.name, context)
        results = [
            r for r in self.fleet.check_results.get(request.name, []) if not request.check or r.check == request.check
        ]
        if request.check and not results:
            abort(context, NotFound(f"vm {request.name} has no check {request.check}", reason="CHECK_NOT_FOUND"))
        health = self.fleet.health.get(request.name, health_pb2.VmHealth(vm=request.name))
        return health_service_pb2.CheckHealthResponse(results=results, health=health)

    def GetHealthHistory(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.fleet.record("GetHealthHistory", request)
        self._known(request.name, context)
        return self.fleet.histories.get(request.name, health_service_pb2.GetHealthHistoryResponse())

    def WatchHealth(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        self.fleet.record("WatchHealth", request)
        with self.fleet.lock:
            steps = self.fleet.watch_sessions.pop(0) if self.fleet.watch_sessions else [HOLD]
        for step in steps:
            if isinstance(step, CloneboxError):
                abort(context, step)
            elif isinstance(step, threading.Event):
                step.set()
            elif step == HOLD:
                while context.is_active():
                    time.sleep(0.02)
                return
            else:
                yield step


class FakeSnapshotService(snapshot_service_pb2_grpc.SnapshotServiceServicer):
    """SnapshotService over ``FakeFleet.snapshots``; VMs named ``shared-*`` have shared folders."""

    def __init__(self, fleet: FakeFleet) -> None:
        self.fleet = fleet

    def _vm(self, name: str, context: grpc.ServicerContext) -> list[snapshot_pb2.Snapshot]:
        if name not in self.fleet.vms:
            abort(context, NotFound(f"vm {name} not found", reason="VM_NOT_FOUND"))
        return self.fleet.snapshots.setdefault(name, [])

    def _snap(self, vm: str, name: str, context: grpc.ServicerContext) -> snapshot_pb2.Snapshot:
        for snap in self._vm(vm, context):
            if snap.name == name:
                return snap
        abort(context, NotFound(f"vm {vm} has no snapshot {name!r}", reason="SNAPSHOT_NOT_FOUND"))
        raise AssertionError

    def CreateSnapshot(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.fleet.record("CreateSnapshot", request)
        snaps = self._vm(request.vm, context)
        if request.vm.startswith("shared-") and request.kind != snapshot_pb2.SNAPSHOT_KIND_EXTERNAL:
            abort(
                context,
                FailedPrecondition(
                    f"vm {request.vm} has shared folders: QEMU cannot save its memory",
                    reason="SNAPSHOT_BLOCKED_BY_SHARED_FOLDER",
                ),
            )
        name = request.name or f"auto-{len(snaps)}"
        if any(x.name == name for x in snaps):
            abort(context, AlreadyExists(f"snapshot {name} exists", reason="SNAPSHOT_ALREADY_EXISTS"))
        parent = next((x.name for x in snaps if x.current), "")
        for x in snaps:
            x.current = False
        external = request.kind == snapshot_pb2.SNAPSHOT_KIND_EXTERNAL
        snap = make_snapshot(
            request.vm,
            name,
            parent,
            current=True,
            description=request.description,
            tags=dict(request.tags),
            kind=request.kind or snapshot_pb2.SNAPSHOT_KIND_INTERNAL,
            has_memory=not external,
            quiesced=request.quiesce,
        )
        snaps.append(snap)
        return snapshot_service_pb2.CreateSnapshotResponse(snapshot=snap)

    def ListSnapshots(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.fleet.record("ListSnapshots", request)
        snaps = self._vm(request.vm, context)
        policy = self.fleet.policies.get(request.vm, snapshot_pb2.SnapshotPolicy())
        return snapshot_service_pb2.ListSnapshotsResponse(snapshots=snaps, policy=policy)

    def RestoreSnapshot(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.fleet.record("RestoreSnapshot", request)
        target = self._snap(request.vm, request.name, context)
        snaps = self.fleet.snapshots[request.vm]
        out = snapshot_service_pb2.RestoreSnapshotResponse()
        if not request.no_backup:
            backup = make_snapshot(request.vm, f"pre-restore-{len(snaps)}", automatic=True, reason="before restore")
            snaps.append(backup)
            out.backup.CopyFrom(backup)
        for x in snaps:
            x.current = x.name == target.name
        vm = self.fleet.vms[request.vm]
        vm.state = vm_pb2.VM_STATE_STOPPED if request.no_start else vm_pb2.VM_STATE_RUNNING
        out.vm.CopyFrom(vm)
        return out

    def DeleteSnapshot(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.fleet.record("DeleteSnapshot", request)
        target = self._snap(request.vm, request.name, context)
        snaps = self.fleet.snapshots[request.vm]
        gone = {target.name}
        if request.children:
            changed = True
            while changed:
                changed = False
                for x in snaps:
                    if x.parent in gone and x.name not in gone:
                        gone.add(x.name)
                        changed = True
        self.fleet.snapshots[request.vm] = [x for x in snaps if x.name not in gone]
        return snapshot_service_pb2.DeleteSnapshotResponse(deleted=[x.name for x in snaps if x.name in gone])

    def SetSnapshotPolicy(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.fleet.record("SetSnapshotPolicy", request)
        self._vm(request.vm, context)
        self.fleet.policies[request.vm] = request.policy
        return snapshot_service_pb2.SetSnapshotPolicyResponse(policy=request.policy)

    def PruneSnapshots(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.fleet.record("PruneSnapshots", request)
        snaps = self._vm(request.vm, context)
        keep_last = self.fleet.policies.get(request.vm, snapshot_pb2.SnapshotPolicy()).keep_last
        kept = {x.name for x in snaps[-keep_last:]} if keep_last else {x.name for x in snaps}
        decisions = [
            snapshot_pb2.PruneDecision(
                name=x.name,
                keep=x.name in kept or x.current,
                reason=f"keep_last {keep_last}" if x.name in kept else "current" if x.current else "beyond keep_last",
            )
            for x in snaps
        ]
        if not request.dry_run:
            self.fleet.snapshots[request.vm] = [x for x, d in zip(snaps, decisions, strict=True) if d.keep]
        return snapshot_service_pb2.PruneSnapshotsResponse(decisions=decisions)

    def export_parts(self, vm: str, snap: snapshot_pb2.Snapshot) -> list[snapshot_pb2.SnapshotImagePart]:
        """The parts of an export of ``snap``: header, 64 KiB chunks of ``export_image``, trailer."""
        image = self.fleet.export_image
        header = snapshot_pb2.SnapshotImageHeader(
            snapshot=snap,
            spec=self.fleet.vms[vm].spec,
            disks=[snapshot_pb2.SnapshotDisk(name="root", virtual_size_bytes=1 << 30, image_bytes=len(image))],
        )
        parts = [snapshot_pb2.SnapshotImagePart(header=header)]
        step = 64 * 1024
        for offset in range(0, len(image), step):
            chunk = snapshot_pb2.SnapshotImageChunk(disk=0, offset=offset, data=image[offset : offset + step])
            parts.append(snapshot_pb2.SnapshotImagePart(chunk=chunk))
        trailer = snapshot_pb2.SnapshotImageTrailer(sha256=[hashlib.sha256(image).hexdigest()])
        parts.append(snapshot_pb2.SnapshotImagePart(trailer=trailer))
        return parts

    def ExportSnapshot(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        self.fleet.record("ExportSnapshot", request)
        snap = self._snap(request.vm, request.name, context)
        for i, part in enumerate(self.export_parts(request.vm, snap)):
            if i == 2 and self.fleet.export_error is not None:
                abort(context, self.fleet.export_error)
            yield snapshot_service_pb2.ExportSnapshotResponse(part=part)

    def ImportSnapshot(self, request_iterator: Any, context: grpc.ServicerContext) -> Any:
        got = FakeImport()
        try:
            for message in request_iterator:
                got.parts.append(message.part)
                if message.part.WhichOneof("part") == "trailer":
                    got.saw_trailer = True
        except Exception:
            got.aborted = True
            raise
        finally:
            if not got.aborted and not got.saw_trailer:
                # grpc's sync server can end the request iterator cleanly on a client cancel (its
                # pending receive completes empty before the cancel is seen), so a stream without a
                # trailer is judged by the call's state: a cancelled call turns inactive, a half-closed
                # one stays active waiting for our answer
                deadline = time.monotonic() + 5
                while context.is_active() and time.monotonic() < deadline:
                    time.sleep(0.01)
                got.aborted = not context.is_active()
            with self.fleet.lock:
                self.fleet.imports.append(got)
        if not got.saw_trailer:
            abort(context, InvalidArgument("the import stream ended without a trailer", reason="IMPORT_INCOMPLETE"))
        header = got.parts[0].header
        name = header.spec.name
        if name in self.fleet.vms:
            abort(context, AlreadyExists(f"VM {name!r} already exists", reason="VM_ALREADY_EXISTS"))
        vm = self.fleet.add_vm(name, host=header.host or "local", state=vm_pb2.VM_STATE_STOPPED)
        return snapshot_service_pb2.ImportSnapshotResponse(vm=vm)


#: the health check a ``fail-*`` service of a plan fails in FakePlanService's runs, and what it reports
FAIL_PROBE = "ready"
FAIL_ERROR = "GET http://10.0.0.5:8080/ready: connection refused (3 failures in a row)"
#: where each run FakePlanService makes starts (a run's versions are one second apart after it)
RUN_T0 = datetime(2026, 11, 26, 10, 0, tzinfo=UTC)


def plan_levels(plan: plan_pb2.Plan) -> list[list[str]]:
    """The plan's services by dependency level (Kahn), file order inside a level; InvalidArgument on a cycle."""
    deps = {v.service: [d.service for d in v.depends_on] for v in plan.vms}
    out: list[list[str]] = []
    placed: set[str] = set()
    waiting = [v.service for v in plan.vms]
    while waiting:
        level = [s for s in waiting if all(d in placed for d in deps[s])]
        if not level:
            raise InvalidArgument(f"dependency cycle among {', '.join(waiting)}", reason="PLAN_CYCLE")
        out.append(level)
        placed.update(level)
        waiting = [s for s in waiting if s not in placed]
    return out


#: how FakePlanService classifies a changed spec field (anything else is a replace)
_IN_PLACE = {"labels", "health_checks"}
_RESTART = {"vcpus", "memory_mib"}


class FakePlanService(plan_service_pb2_grpc.PlanServiceServicer):
    """PlanService over ``FakeFleet.plans`` and ``plan_runs`` (see the module doc for the scripted behaviours)."""

    def __init__(self, fleet: FakeFleet) -> None:
        self.fleet = fleet

    # ---------------------------------------------------------------------------------------- helpers

    def _unreachable(self, context: grpc.ServicerContext) -> None:
        with self.fleet.lock:
            fail = self.fleet.plan_unreachable > 0
            self.fleet.plan_unreachable -= 1 if fail else 0
        if fail:
            # no CloneBox status, and gRPC's words for a controller that is not listening (yet): to the client
            # this call never reached the controller, so it is retried
            context.abort(
                grpc.StatusCode.UNAVAILABLE,
                "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:7100: "
                "Failed to connect to remote host: Connection refused",
            )

    def _levels(self, plan: plan_pb2.Plan, context: grpc.ServicerContext) -> list[list[str]]:
        try:
            return plan_levels(plan)
        except InvalidArgument as err:
            abort(context, err)
            raise

    def _fits(self, plan: plan_pb2.Plan, context: grpc.ServicerContext) -> None:
        host = self.fleet.hosts["local"]
        free = host.allocatable.memory_mib - host.allocated.memory_mib
        need = sum(v.spec.memory_mib for v in plan.vms if v.spec.name not in self.fleet.vms)
        if need > free:
            abort(
                context,
                ResourceExhausted(
                    f"plan {plan.name} needs {need} MiB of memory more and the fleet has {free} MiB free: "
                    "nothing was created",
                    reason="PLAN_CAPACITY_EXCEEDED",
                ),
            )

    def _current(self, name: str) -> plan_pb2.Plan | None:
        revisions = self.fleet.plans.get(name)
        return revisions[-1] if revisions else None

    def _known(self, name: str, context: grpc.ServicerContext) -> plan_pb2.Plan:
        current = self._current(name)
        if current is None:
            abort(context, NotFound(f"plan {name} not found", reason="PLAN_NOT_FOUND"))
            raise AssertionError
        return current

    def _changes(self, plan: plan_pb2.Plan, context: grpc.ServicerContext) -> list[plan_pb2.VmChange]:
        current = self._current(plan.name)
        before = {v.service: v for v in current.vms} if current is not None else {}
        out = []
        for level in self._levels(plan, context):
            for service in level:
                vm = next(v for v in plan.vms if v.service == service)
                change = plan_pb2.VmChange(service=service, vm=vm.spec.name, kind=plan_pb2.CHANGE_KIND_CREATE)
                old = before.get(service)
                if old is not None and vm.spec.name in self.fleet.vms:
                    fields = sorted(
                        f.name
                        for f in vm_pb2.VmSpec.DESCRIPTOR.fields
                        if getattr(old.spec, f.name) != getattr(vm.spec, f.name)
                    )
                    change.fields.extend(fields)
                    if not fields:
                        change.kind = plan_pb2.CHANGE_KIND_NONE
                    elif set(fields) <= _IN_PLACE:
                        change.kind = plan_pb2.CHANGE_KIND_IN_PLACE
                    elif set(fields) <= _IN_PLACE | _RESTART:
                        change.kind = plan_pb2.CHANGE_KIND_RESTART
                    else:
                        change.kind = plan_pb2.CHANGE_KIND_REPLACE
                out.append(change)
        kept = {v.service for v in plan.vms}
        for service, old in reversed(before.items()):
            if service not in kept and old.spec.name in self.fleet.vms:
                out.append(plan_pb2.VmChange(service=service, vm=old.spec.name, kind=plan_pb2.CHANGE_KIND_REMOVE))
        return out

    def _store(self, plan: plan_pb2.Plan) -> plan_pb2.Plan:
        """The plan as a revision: a new one when it differs from the current one."""
        current = self._current(plan.name)
        if current is not None:
            same = plan_pb2.Plan()
            same.CopyFrom(plan)
            same.revision, same.digest = current.revision, current.digest
            same.create_time.CopyFrom(current.create_time)
            if same == current:
                return current
        stored = plan_pb2.Plan()
        stored.CopyFrom(plan)
        stored.revision = (current.revision if current is not None else 0) + 1
        stored.digest = "sha256:" + hashlib.sha256(plan.SerializeToString(deterministic=True)).hexdigest()
        stored.create_time.FromDatetime(RUN_T0)
        self.fleet.plans.setdefault(plan.name, []).append(stored)
        return stored

    def _start(
        self, plan: plan_pb2.Plan, action: str, request_id: str, statuses: list[plan_pb2.PlanVmStatus]
    ) -> tuple[plan_pb2.PlanRun, Callable[..., plan_pb2.PlanRun]]:
        """A new run at version 1, and ``step(**changes)`` that records each later version in its script."""
        with self.fleet.lock:
            self.fleet.counter += 1
            run_id = f"run-{self.fleet.counter}"
        run = plan_pb2.PlanRun(
            id=run_id,
            plan=plan.name,
            revision=plan.revision,
            action=action,
            state=plan_pb2.PLAN_RUN_STATE_RUNNING,
            vms=statuses,
            request_id=request_id,
            version=1,
        )
        run.create_time.FromDatetime(RUN_T0)
        run.update_time.FromDatetime(RUN_T0)
        self.fleet.plan_runs[run_id] = run
        if request_id:
            self.fleet.runs_by_request_id[request_id] = run_id
        script: list[plan_pb2.PlanRun] = []
        self.fleet.run_scripts[run_id] = script
        latest = run

        def step(vm: str = "", **changes: Any) -> plan_pb2.PlanRun:
            nonlocal latest
            nxt = plan_pb2.PlanRun()
            nxt.CopyFrom(latest)
            nxt.version += 1
            nxt.update_time.FromDatetime(RUN_T0 + timedelta(seconds=nxt.version - 1))
            target: Any = nxt
            if vm:
                target = next(v for v in nxt.vms if v.vm == vm)
            for key, value in changes.items():
                setattr(target, key, value)
            nxt.done = nxt.state in (
                plan_pb2.PLAN_RUN_STATE_SUCCEEDED,
                plan_pb2.PLAN_RUN_STATE_FAILED,
                plan_pb2.PLAN_RUN_STATE_ROLLED_BACK,
            )
            script.append(nxt)
            latest = nxt
            return nxt

        return run, step

    def _add_vm(self, plan: plan_pb2.Plan, vm: plan_pb2.PlanVm) -> None:
        labels = {**vm.spec.labels, "clonebox.plan": plan.name, "clonebox.service": vm.service}
        self.fleet.add_vm(vm.spec.name, host=vm.host or "local", labels=labels)

    # -------------------------------------------------------------------------------------------- rpcs

    def ValidatePlan(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.fleet.record("ValidatePlan", request)
        levels = self._levels(request.plan, context)
        self._fits(request.plan, context)
        return plan_service_pb2.ValidatePlanResponse(
            levels=[plan_service_pb2.PlanLevel(services=level) for level in levels],
            changes=self._changes(request.plan, context),
        )

    def DiffPlan(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.fleet.record("DiffPlan", request)
        current = self._current(request.plan.name)
        return plan_service_pb2.DiffPlanResponse(
            changes=self._changes(request.plan, context), current_revision=current.revision if current else 0
        )

    def ApplyPlan(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.fleet.record("ApplyPlan", request)
        self._unreachable(context)
        if request.request_id in self.fleet.runs_by_request_id:  # idempotent retry
            return plan_service_pb2.ApplyPlanResponse(
                run=self.fleet.plan_runs[self.fleet.runs_by_request_id[request.request_id]]
            )
        self._fits(request.plan, context)
        changes = self._changes(request.plan, context)
        replaced = [c.vm for c in changes if c.kind == plan_pb2.CHANGE_KIND_REPLACE]
        if replaced and not request.allow_replace:
            abort(
                context,
                FailedPrecondition(
                    f"applying plan {request.plan.name} replaces {', '.join(replaced)}: allow it with allow_replace",
                    reason="PLAN_REPLACE_NOT_ALLOWED",
                ),
            )
        plan = self._store(request.plan)
        by_vm = {v.spec.name: v for v in plan.vms}
        statuses = [
            plan_pb2.PlanVmStatus(
                service=c.service, vm=c.vm, state=plan_pb2.PLAN_VM_STATE_PENDING, change=c.kind, step="waiting"
            )
            for c in changes
            if c.kind != plan_pb2.CHANGE_KIND_REMOVE
        ]
        run, step = self._start(plan, "up", request.request_id, statuses)
        made: list[str] = []
        touched: set[str] = set()
        failed = ""
        for level in plan_levels(plan):
            for service in level:
                vm = next(v for v in plan.vms if v.service == service)
                name = vm.spec.name
                touched.add(name)
                kind = next(c.kind for c in changes if c.vm == name)
                if kind == plan_pb2.CHANGE_KIND_NONE:
                    step(name, state=plan_pb2.PLAN_VM_STATE_READY, step="unchanged", host=vm.host or "local")
                    continue
                step(name, state=plan_pb2.PLAN_VM_STATE_CREATING, step="creating", host=vm.host or "local")
                made.append(name)
                step(name, state=plan_pb2.PLAN_VM_STATE_WAITING, step="waiting for health checks", created=True)
                if service.startswith("fail-"):
                    step(name, state=plan_pb2.PLAN_VM_STATE_FAILED, step="", error=FAIL_ERROR, failed_probe=FAIL_PROBE)
                    failed = name
                    break
                step(name, state=plan_pb2.PLAN_VM_STATE_READY, step="")
            if failed:
                break
        if failed:
            # what never started because a VM failed first
            for status in statuses:
                if status.vm not in touched:
                    step(status.vm, state=plan_pb2.PLAN_VM_STATE_SKIPPED, step="")
        if not failed:
            for name in made:
                self._add_vm(plan, by_vm[name])
            step(state=plan_pb2.PLAN_RUN_STATE_SUCCEEDED)
        elif plan.on_failure == plan_pb2.FAILURE_POLICY_LEAVE:
            for name in made:
                self._add_vm(plan, by_vm[name])
            step(state=plan_pb2.PLAN_RUN_STATE_FAILED, error=f"vm {failed} failed")
        else:
            step(state=plan_pb2.PLAN_RUN_STATE_ROLLING_BACK, error=f"vm {failed} failed")
            for name in reversed(made):
                step(name, state=plan_pb2.PLAN_VM_STATE_DELETING, step="rolling back")
                step(name, state=plan_pb2.PLAN_VM_STATE_DELETED, step="")
            step(state=plan_pb2.PLAN_RUN_STATE_ROLLED_BACK)
        return plan_service_pb2.ApplyPlanResponse(run=run)

    def DestroyPlan(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.fleet.record("DestroyPlan", request)
        self._unreachable(context)
        if request.request_id in self.fleet.runs_by_request_id:
            return plan_service_pb2.DestroyPlanResponse(
                run=self.fleet.plan_runs[self.fleet.runs_by_request_id[request.request_id]]
            )
        plan = self._known(request.name, context)
        order = [s for level in plan_levels(plan) for s in level]
        names = {v.service: v.spec.name for v in plan.vms}
        statuses = [
            plan_pb2.PlanVmStatus(service=s, vm=names[s], state=plan_pb2.PLAN_VM_STATE_PENDING, step="waiting")
            for s in reversed(order)
        ]
        run, step = self._start(plan, "down", request.request_id, statuses)
        for status in statuses:
            name = status.vm
            if name not in self.fleet.vms:
                step(name, state=plan_pb2.PLAN_VM_STATE_DELETED, step="already gone")
                continue
            step(name, state=plan_pb2.PLAN_VM_STATE_DELETING, step="deleting")
            snaps = self.fleet.snapshots.get(name, [])
            if snaps and not request.with_snapshots:
                error = f"vm {name} has {len(snaps)} snapshot(s): delete them, or pass with_snapshots"
                step(name, state=plan_pb2.PLAN_VM_STATE_FAILED, step="", error=error)
                step(state=plan_pb2.PLAN_RUN_STATE_FAILED, error=f"vm {name} failed")
                return plan_service_pb2.DestroyPlanResponse(run=run)
            del self.fleet.vms[name]
            self.fleet.snapshots.pop(name, None)
            step(name, state=plan_pb2.PLAN_VM_STATE_DELETED, step="")
        step(state=plan_pb2.PLAN_RUN_STATE_SUCCEEDED)
        return plan_service_pb2.DestroyPlanResponse(run=run)

    def _latest_run(self, plan: str) -> plan_pb2.PlanRun | None:
        runs = [r for r in self.fleet.plan_runs.values() if r.plan == plan]
        return runs[-1] if runs else None

    def _entry(self, plan: plan_pb2.Plan) -> plan_service_pb2.GetPlanResponse:
        return plan_service_pb2.GetPlanResponse(plan=plan, last_run=self._latest_run(plan.name))

    def GetPlan(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.fleet.record("GetPlan", request)
        return self._entry(self._known(request.name, context))

    def ListPlans(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.fleet.record("ListPlans", request)
        return plan_service_pb2.ListPlansResponse(
            plans=[self._entry(revisions[-1]) for _, revisions in sorted(self.fleet.plans.items())]
        )

    def ListPlanRuns(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.fleet.record("ListPlanRuns", request)
        self._known(request.name, context)
        runs = [r for r in reversed(self.fleet.plan_runs.values()) if r.plan == request.name]
        return plan_service_pb2.ListPlanRunsResponse(runs=runs[: request.limit or 50])

    def WatchPlan(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        self.fleet.record("WatchPlan", request)
        run = self.fleet.plan_runs.get(request.run_id) if request.run_id else self._latest_run(request.plan)
        if run is None:
            what = f"run {request.run_id}" if request.run_id else f"plan {request.plan} has no run"
            abort(context, NotFound(f"{what} not found", reason="PLAN_RUN_NOT_FOUND"))
            raise AssertionError
        with self.fleet.lock:
            cut = self.fleet.plan_watch_cuts.pop(0) if self.fleet.plan_watch_cuts else None
        sent = 0
        if run.version > request.after_version:
            yield plan_service_pb2.WatchPlanResponse(run=run)
            sent += 1
        script = self.fleet.run_scripts.get(run.id, [])
        while script:
            if cut is not None and sent >= cut:
                context.abort(grpc.StatusCode.UNAVAILABLE, "Connection reset by peer")
            run.CopyFrom(script.pop(0))
            if run.version > request.after_version:
                yield plan_service_pb2.WatchPlanResponse(run=run)
                sent += 1
        while not run.done and context.is_active():  # a run that never finishes: keep the stream open
            time.sleep(0.05)


@dataclass
class ThrowawayPki:
    """A throwaway CA in tmp_path and TLS folders issued from it (or from another CA)."""

    ca: CertificateAuthority
    root: Path

    def folder(
        self,
        folder: str,
        kind: str = "user",
        name: str = "tester",
        role: str | None = "admin",
        *,
        seconds: int = 3600,
        issuer: CertificateAuthority | None = None,
        trust: CertificateAuthority | None = None,
    ) -> Path:
        """Write ``ca.crt`` (of ``trust``) and ``KIND.crt``/``KIND.key`` (issued by ``issuer``) into a folder."""
        issuer = issuer or self.ca
        issued = issuer.issue(make_identity(issuer.trust_domain, kind, name, role), seconds=seconds)
        assert issued.key is not None
        path = self.root / folder
        path.mkdir(parents=True, exist_ok=True)
        write_public(path / "ca.crt", (trust or self.ca).cert_pem)
        write_public(path / f"{kind}.crt", cert_pem(issued.cert))
        write_private(path / f"{kind}.key", key_pem(issued.key))
        return path

    def other_ca(self, name: str = "other") -> CertificateAuthority:
        """Another CA of the same trust domain (a foreign fleet)."""
        return CertificateAuthority.init(self.root / name, TRUST_DOMAIN)


@pytest.fixture
def test_pki(tmp_path: Path, runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> ThrowawayPki:
    """A test CA with an admin user folder that the CLI uses (``CLONEBOX_TLS_DIR``)."""
    pki = ThrowawayPki(CertificateAuthority.init(tmp_path / "pki" / "ca", TRUST_DOMAIN), tmp_path / "pki")
    monkeypatch.setenv("CLONEBOX_TLS_DIR", str(pki.folder("user")))
    return pki


@dataclass
class FakeController:
    """A running fake controller."""

    address: str
    fleet: FakeFleet
    pki: ThrowawayPki
    #: the CLI's TLS folder (ca.crt, user.crt, user.key of an admin)
    tls_dir: Path


def serve_fake(fleet: FakeFleet, pki: ThrowawayPki, *, tls: bool = True, port: int = 0) -> tuple[grpc.Server, int]:
    """Start the fake controller's services (on ``port``, 0: a free one); mTLS with a certificate from the test CA."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    hosts = FakeHostService(fleet)
    hosts.ca = pki.ca
    host_service_pb2_grpc.add_HostServiceServicer_to_server(hosts, server)
    vm_service_pb2_grpc.add_VmServiceServicer_to_server(FakeVmService(fleet), server)
    operation_service_pb2_grpc.add_OperationServiceServicer_to_server(FakeOperationService(fleet), server)
    pki_service_pb2_grpc.add_PkiServiceServicer_to_server(FakePkiService(fleet, pki.ca), server)
    health_service_pb2_grpc.add_HealthServiceServicer_to_server(FakeHealthService(fleet), server)
    snapshot_service_pb2_grpc.add_SnapshotServiceServicer_to_server(FakeSnapshotService(fleet), server)
    plan_service_pb2_grpc.add_PlanServiceServicer_to_server(FakePlanService(fleet), server)
    if tls:
        folder = pki.root / "controller-tls"
        if not folder.exists():
            pki.folder("controller-tls", "controller", "main", None)
        port = server.add_secure_port(f"127.0.0.1:{port}", server_credentials(TlsFiles.in_folder(folder, "controller")))
    else:
        port = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server, port


@pytest.fixture
def fake_controller(test_pki: ThrowawayPki) -> Iterator[FakeController]:
    """A fake controller serving mTLS on a free loopback port, with host 'local' and VM 'web'."""
    fleet = FakeFleet()
    fleet.hosts["local"] = make_host("local")
    fleet.add_vm("web", labels={"app": "demo"})
    server, port = serve_fake(fleet, test_pki)
    try:
        yield FakeController(f"127.0.0.1:{port}", fleet, test_pki, test_pki.root / "user")
    finally:
        server.stop(0)


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> CliRunner:
    """A CliRunner isolated from the user's environment (no CLONEBOX_* settings, private XDG dirs)."""
    for name in ("CLONEBOX_CONTROLLER", "CLONEBOX_DEBUG", "CLONEBOX_TLS_DIR", "CLONEBOX_INSECURE", "CLONEBOX_CA_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("COLUMNS", "200")
    return CliRunner()
