"""gRPC servicers of the controller: HostService, VmService, OperationService."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any, TypeAlias

from clonebox.controller.v1 import (
    host_service_pb2,
    host_service_pb2_grpc,
    operation_service_pb2,
    operation_service_pb2_grpc,
    pki_service_pb2,
    pki_service_pb2_grpc,
    vm_service_pb2,
    vm_service_pb2_grpc,
)

from clonebox_controller.app.audit import AuditLog
from clonebox_controller.app.hosts import HostRegistry
from clonebox_controller.app.operations import OperationQueries
from clonebox_controller.app.pki import CertInfo, PkiManager
from clonebox_controller.app.ports import FleetStore
from clonebox_controller.app.vms import VmManager
from clonebox_core.audit.event import AuditEvent, Outcome, new_event
from clonebox_core.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    invalid_field,
)
from clonebox_core.model import Host, VmState, Volume
from clonebox_core.names import check_dns_label
from clonebox_core.rpc import convert, convert_audit
from clonebox_core.rpc.convert_plan import change_kind_to_proto
from clonebox_core.secret import Secret
from clonebox_core.security.identity import current_caller

#: grpcio ships no type stubs, so the servicer context is untyped
Ctx: TypeAlias = Any
log = logging.getLogger(__name__)

_VM_STATES = frozenset(s.value for s in VmState)
_DEFAULT_PAGE = 100
_MAX_PAGE = 1000


#: most audit events one Connect message may carry
MAX_AUDIT_BATCH = 100


def _agent_events(host: str, batch: host_service_pb2.AuditBatch) -> tuple[list[AuditEvent], list[str]]:
    """The events to append for a forwarded batch, and the ids to acknowledge.

    A malformed event (from a buggy agent) must neither end the session nor come back forever: it is
    replaced by a record saying so (``audit.malformed_event``, with what was wrong) and acknowledged.
    Events past ``MAX_AUDIT_BATCH`` are left unacknowledged; the agent sends them again.
    """
    events: list[AuditEvent] = []
    acks: list[str] = []
    for msg in list(batch.events)[:MAX_AUDIT_BATCH]:
        try:
            event = convert_audit.event_from_pb(msg)
            # the chain's columns are bounded: refuse rather than let the database cut or fail
            if len(event.id) > 64 or len(event.action) > 64 or len(event.trace_id) > 32 or len(event.details) > 32:
                raise ValueError("id and action are at most 64 characters, trace_id 32, details 32 entries")
        except ValueError as exc:
            log.warning("agent %s forwarded a malformed audit event: %s", host, exc)
            event = new_event(
                "audit.malformed_event",
                f"hosts/{host}",
                Outcome.REJECTED,
                reason="INVALID_AUDIT_EVENT",
                actor=f"agent/{host}",
                details={"error": str(exc), "event_id": msg.id[:64]},
            )
        events.append(event)
        acks.append(msg.id)
    return events, acks


class HostServicer(host_service_pb2_grpc.HostServiceServicer):
    """Agent sessions and host administration."""

    def __init__(
        self,
        registry: HostRegistry,
        store: FleetStore,
        vms: VmManager,
        pki: PkiManager | None,
        audit: AuditLog | None = None,
    ) -> None:
        self._registry = registry
        self._store = store
        self._vms = vms
        self._pki = pki
        self._audit = audit

    async def _session_reply(self, host: Host, acked: Sequence[str] = ()) -> host_service_pb2.ConnectResponse:
        # the deny list and the audit head ride on every answer: a revocation reaches agents in one
        # beat, and every agent keeps a recent copy of the head outside the controller's database
        reply = host_service_pb2.ConnectResponse(
            heartbeat_interval_seconds=max(int(self._registry.heartbeat_interval), 1),
            host=convert.host_to_proto(host),
            revoked_serials=sorted(self._pki.revoked) if self._pki else [],
            acked_audit_event_ids=list(acked),
        )
        if self._audit is not None:
            reply.audit_head.CopyFrom(convert_audit.head_to_pb(await self._audit.head()))
        return reply

    async def Connect(
        self, request_iterator: AsyncIterator[host_service_pb2.ConnectRequest], context: Ctx
    ) -> AsyncIterator[host_service_pb2.ConnectResponse]:
        """See the proto."""
        first = await anext(aiter(request_iterator), None)
        if first is None or not first.HasField("registration"):
            raise InvalidArgument("the first message of Connect must be a registration", reason="NOT_REGISTERED")
        reg = first.registration
        check_dns_label("registration.name", reg.name)
        caller = current_caller()
        if caller is not None and caller.name != reg.name:
            # an agent may register only as the host its certificate names
            raise PermissionDenied(
                f"agent {caller.name} may not register as host {reg.name}", reason="AGENT_NAME_MISMATCH"
            )
        _check_registration(reg)
        host, session = await self._registry.register(
            reg.name,
            reg.address,
            convert.resources_from_proto(reg.capacity),
            convert.resources_from_proto(reg.allocatable),
            convert.hypervisor_from_proto(reg.hypervisor),
            reg.revision.epoch,
        )
        if self._audit is not None and reg.HasField("audit_head"):
            witnessed = convert_audit.head_from_pb(reg.audit_head)
            if witnessed is not None and witnessed.seq > 0:
                await self._audit.witness(reg.name, witnessed)
        yield await self._session_reply(host)
        try:
            async for msg in request_iterator:
                if caller is not None and self._pki is not None and self._pki.is_revoked(caller):
                    raise Unauthenticated(f"the certificate of {caller} is revoked", reason="CERT_REVOKED")
                if msg.HasField("heartbeat"):
                    host = await self._registry.heartbeat(
                        reg.name, msg.heartbeat.serving, msg.heartbeat.not_serving_reason, session
                    )
                    yield await self._session_reply(host)
                elif msg.HasField("audit") and self._audit is not None:
                    events, acks = _agent_events(reg.name, msg.audit)
                    await self._audit.from_agent(reg.name, events)
                    yield await self._session_reply(host, acks)
        finally:
            await self._registry.disconnected(reg.name, session)

    async def ListHosts(
        self, request: host_service_pb2.ListHostsRequest, context: Ctx
    ) -> host_service_pb2.ListHostsResponse:
        """See the proto."""
        hosts = await asyncio.to_thread(self._store.list_hosts)
        return host_service_pb2.ListHostsResponse(hosts=[convert.host_to_proto(h) for h in hosts])

    async def GetHost(self, request: host_service_pb2.GetHostRequest, context: Ctx) -> host_service_pb2.GetHostResponse:
        """See the proto."""
        check_dns_label("name", request.name)
        host = await asyncio.to_thread(self._store.get_host, request.name)
        return host_service_pb2.GetHostResponse(host=convert.host_to_proto(host))

    async def CordonHost(
        self, request: host_service_pb2.CordonHostRequest, context: Ctx
    ) -> host_service_pb2.CordonHostResponse:
        """See the proto."""
        check_dns_label("name", request.name)
        event = new_event("host.cordon", f"hosts/{request.name}", Outcome.SUCCEEDED)
        host = await asyncio.to_thread(self._store.set_cordoned, request.name, True, event)
        return host_service_pb2.CordonHostResponse(host=convert.host_to_proto(host))

    async def UncordonHost(
        self, request: host_service_pb2.UncordonHostRequest, context: Ctx
    ) -> host_service_pb2.UncordonHostResponse:
        """See the proto."""
        check_dns_label("name", request.name)
        event = new_event("host.uncordon", f"hosts/{request.name}", Outcome.SUCCEEDED)
        host = await asyncio.to_thread(self._store.set_cordoned, request.name, False, event)
        return host_service_pb2.UncordonHostResponse(host=convert.host_to_proto(host))

    async def DrainHost(
        self, request: host_service_pb2.DrainHostRequest, context: Ctx
    ) -> host_service_pb2.DrainHostResponse:
        """See the proto."""
        stopped = await self._vms.drain(request.name, request.request_id)
        host = await asyncio.to_thread(self._store.get_host, request.name)
        return host_service_pb2.DrainHostResponse(host=convert.host_to_proto(host), stopped_vms=stopped)

    async def CreateJoinToken(
        self, request: host_service_pb2.CreateJoinTokenRequest, context: Ctx
    ) -> host_service_pb2.CreateJoinTokenResponse:
        """See the proto."""
        token, expires = await _pki(self._pki).create_join_token(request.host, request.ttl_seconds)
        resp = host_service_pb2.CreateJoinTokenResponse(token=token)
        resp.expire_time.FromDatetime(expires)
        return resp


#: the store keeps sizes in signed 64-bit columns; 2**53 MiB is far beyond any host and exact in JSON
_MAX_SIZE_MIB = 1 << 53


def _check_registration(reg: host_service_pb2.Registration) -> None:
    for part in ("capacity", "allocatable"):
        res = getattr(reg, part)
        for field in ("memory_mib", "disk_mib"):
            if getattr(res, field) > _MAX_SIZE_MIB:
                raise InvalidArgument(
                    f"registration.{part}.{field}: {getattr(res, field)} is beyond any real host",
                    reason="INVALID_FIELD",
                    metadata={"field": f"registration.{part}.{field}"},
                )
    if reg.revision.epoch >= 1 << 63 or reg.revision.sequence >= 1 << 63:
        raise InvalidArgument(
            "registration.revision: out of range", reason="INVALID_FIELD", metadata={"field": "registration.revision"}
        )
    if len(reg.address) > 255:
        raise InvalidArgument(
            "registration.address: longer than 255 characters",
            reason="INVALID_FIELD",
            metadata={"field": "registration.address"},
        )


def _pki(pki: PkiManager | None) -> PkiManager:
    if pki is None:
        raise FailedPrecondition("this controller runs without a CA (insecure mode)", reason="PKI_DISABLED")
    return pki


def _cert_to_proto(c: CertInfo) -> pki_service_pb2.Certificate:
    out = pki_service_pb2.Certificate(serial=c.serial, identity=c.identity, revoked=c.revoked)
    out.not_before.FromDatetime(c.not_before)
    out.not_after.FromDatetime(c.not_after)
    return out


class PkiServicer(pki_service_pb2_grpc.PkiServiceServicer):
    """Certificates and the deny list."""

    def __init__(self, pki: PkiManager | None) -> None:
        self._pki = pki

    async def ListCertificates(
        self, request: pki_service_pb2.ListCertificatesRequest, context: Ctx
    ) -> pki_service_pb2.ListCertificatesResponse:
        """See the proto."""
        certs = await asyncio.to_thread(_pki(self._pki).list_certificates, request.name)
        return pki_service_pb2.ListCertificatesResponse(certificates=[_cert_to_proto(c) for c in certs])

    async def RevokeCertificate(
        self, request: pki_service_pb2.RevokeCertificateRequest, context: Ctx
    ) -> pki_service_pb2.RevokeCertificateResponse:
        """See the proto."""
        revoked = await _pki(self._pki).revoke(request.name, request.serial)
        return pki_service_pb2.RevokeCertificateResponse(revoked=[_cert_to_proto(c) for c in revoked])

    async def RenewCertificate(
        self, request: pki_service_pb2.RenewCertificateRequest, context: Ctx
    ) -> pki_service_pb2.RenewCertificateResponse:
        """See the proto."""
        caller = current_caller()
        if caller is None:
            raise Unauthenticated("renewal needs a client certificate", reason="NO_CLIENT_CERTIFICATE")
        pki = _pki(self._pki)
        pem = await pki.renew(caller, request.csr_pem.encode())
        return pki_service_pb2.RenewCertificateResponse(certificate_pem=pem.decode(), ca_pem=pki.ca.cert_pem.decode())


class EnrollmentServicer(pki_service_pb2_grpc.EnrollmentServiceServicer):
    """Join-token enrolment, on the port that asks for no client certificate."""

    def __init__(self, pki: PkiManager) -> None:
        self._pki = pki

    async def Enroll(self, request: pki_service_pb2.EnrollRequest, context: Ctx) -> pki_service_pb2.EnrollResponse:
        """See the proto."""
        pem = await self._pki.enroll(request.token, request.host, request.csr_pem.encode())
        return pki_service_pb2.EnrollResponse(certificate_pem=pem.decode(), ca_pem=self._pki.ca.cert_pem.decode())


class VmServicer(vm_service_pb2_grpc.VmServiceServicer):
    """Fleet-wide VM API."""

    def __init__(self, vms: VmManager, store: FleetStore) -> None:
        self._vms = vms
        self._store = store

    async def CreateVm(self, request: vm_service_pb2.CreateVmRequest, context: Ctx) -> vm_service_pb2.CreateVmResponse:
        """See the proto."""
        spec = convert.spec_from_proto(request.spec)
        if request.dry_run:
            plan = await self._vms.plan_create(spec, request.host or None)
            return vm_service_pb2.CreateVmResponse(plan=convert.plan_to_proto(plan))
        op, _vm = await self._vms.create(spec, request.host or None, request.request_id)
        return vm_service_pb2.CreateVmResponse(operation=convert.operation_to_proto(op))

    async def GetVm(self, request: vm_service_pb2.GetVmRequest, context: Ctx) -> vm_service_pb2.GetVmResponse:
        """See the proto."""
        return vm_service_pb2.GetVmResponse(vm=convert.vm_to_proto(await self._vms.get(request.name)))

    async def RotateVmSecret(
        self, request: vm_service_pb2.RotateVmSecretRequest, context: Ctx
    ) -> vm_service_pb2.RotateVmSecretResponse:
        """See the proto."""
        user, changed, host = await self._vms.rotate_secret(
            request.name,
            request.request_id,
            password_hash=Secret(request.password_hash),
            expire=request.expire_password,
            keys=tuple(request.ssh_authorized_keys),
            replace_keys=request.replace_keys,
            secret_refs=tuple(request.secret_refs),
        )
        return vm_service_pb2.RotateVmSecretResponse(user=user, changed=changed, host=host)

    async def GetVmSshKey(
        self, request: vm_service_pb2.GetVmSshKeyRequest, context: Ctx
    ) -> vm_service_pb2.GetVmSshKeyResponse:
        """See the proto."""
        key, user, host = await self._vms.ssh_key(request.name)
        # the one place the key is put on the wire to a user (mTLS; the agent audited the read)
        return vm_service_pb2.GetVmSshKeyResponse(private_key=key.reveal(), user=user, host=host)

    async def ReadVmConsole(
        self, request: vm_service_pb2.ReadVmConsoleRequest, context: Ctx
    ) -> AsyncIterator[vm_service_pb2.ReadVmConsoleResponse]:
        """See the proto: each piece is written before the next is read from the agent."""
        from_offset = request.from_offset if request.HasField("from_offset") else None
        chunks = self._vms.read_console(request.name, request.tail_bytes, request.follow, from_offset)
        try:
            async for chunk in chunks:
                yield vm_service_pb2.ReadVmConsoleResponse(data=chunk.data, offset=chunk.offset)
        finally:
            # a client that stops following must end the agent's stream now, not when this is collected
            await chunks.aclose()

    async def ListVms(self, request: vm_service_pb2.ListVmsRequest, context: Ctx) -> vm_service_pb2.ListVmsResponse:
        """See the proto."""
        if request.page_size > _MAX_PAGE:
            raise InvalidArgument(
                f"page_size: {request.page_size} is above the maximum {_MAX_PAGE}",
                reason="INVALID_FIELD",
                metadata={"field": "page_size"},
            )
        if request.state and request.state not in _VM_STATES:
            raise InvalidArgument(
                f"state: {request.state} is not a VM state", reason="INVALID_FIELD", metadata={"field": "state"}
            )
        if request.host:
            check_dns_label("host", request.host)
        vms, token = await self._vms.list_vms(
            request.host or None,
            VmState(request.state) if request.state else None,
            dict(request.labels),
            request.page_size or _DEFAULT_PAGE,
            request.page_token,
        )
        return vm_service_pb2.ListVmsResponse(vms=[convert.vm_to_proto(v) for v in vms], next_page_token=token)

    async def StartVm(self, request: vm_service_pb2.StartVmRequest, context: Ctx) -> vm_service_pb2.StartVmResponse:
        """See the proto."""
        op = await self._vms.start(request.name, request.request_id)
        return vm_service_pb2.StartVmResponse(operation=convert.operation_to_proto(op))

    async def StopVm(self, request: vm_service_pb2.StopVmRequest, context: Ctx) -> vm_service_pb2.StopVmResponse:
        """See the proto."""
        op = await self._vms.stop(request.name, request.request_id, request.timeout_seconds, request.force)
        return vm_service_pb2.StopVmResponse(operation=convert.operation_to_proto(op))

    async def UpdateVm(self, request: vm_service_pb2.UpdateVmRequest, context: Ctx) -> vm_service_pb2.UpdateVmResponse:
        """See the proto."""
        spec = convert.spec_from_proto(request.spec)
        op, kind, fields = await self._vms.update(
            spec, request.request_id, request.timeout_seconds, dry_run=request.dry_run
        )
        resp = vm_service_pb2.UpdateVmResponse(kind=change_kind_to_proto(kind), fields=fields)
        if op is not None:
            resp.operation.CopyFrom(convert.operation_to_proto(op))
        return resp

    async def DeleteVm(self, request: vm_service_pb2.DeleteVmRequest, context: Ctx) -> vm_service_pb2.DeleteVmResponse:
        """See the proto."""
        op = await self._vms.delete(request.name, request.request_id, request.with_snapshots)
        return vm_service_pb2.DeleteVmResponse(operation=convert.operation_to_proto(op))

    async def ListVolumes(
        self, request: vm_service_pb2.ListVolumesRequest, context: Ctx
    ) -> vm_service_pb2.ListVolumesResponse:
        """See the proto."""
        found, errors = await self._vms.list_fleet_volumes(request.host)
        return vm_service_pb2.ListVolumesResponse(
            volumes=[_volume_on(host, v) for host, v in found], host_errors=errors
        )

    async def CreateVolume(
        self, request: vm_service_pb2.CreateVolumeRequest, context: Ctx
    ) -> vm_service_pb2.CreateVolumeResponse:
        """See the proto."""
        if not request.host:
            raise invalid_field("host", "required: a volume's data lives on one host (see 'clonebox host list')")
        made = await self._vms.create_volume(
            request.host, request.name, request.size_mib, request.shared, dict(request.labels), request.request_id
        )
        return vm_service_pb2.CreateVolumeResponse(volume=_volume_on(request.host, made))

    async def DeleteVolume(
        self, request: vm_service_pb2.DeleteVolumeRequest, context: Ctx
    ) -> vm_service_pb2.DeleteVolumeResponse:
        """See the proto."""
        if not request.host:
            raise invalid_field("host", "required: name the host the volume lives on (see 'clonebox volume list')")
        if not await self._vms.delete_volume(request.host, request.name, request.request_id):
            raise volume_not_found(request.name, request.host)
        return vm_service_pb2.DeleteVolumeResponse()

    async def WatchVms(
        self, request: vm_service_pb2.WatchVmsRequest, context: Ctx
    ) -> AsyncIterator[vm_service_pb2.WatchVmsResponse]:
        """See the proto."""
        revision = request.after_revision or await asyncio.to_thread(self._store.current_revision)
        while True:
            changes = await asyncio.to_thread(self._store.changes_since, revision)
            for rev, vm, deleted in changes:
                revision = rev
                yield vm_service_pb2.WatchVmsResponse(revision=rev, vm=convert.vm_to_proto(vm), deleted=deleted)
            if not changes:
                await asyncio.sleep(0.2)


def _volume_on(host: str, volume: Volume) -> Any:
    """The proto of ``volume`` with the host it lives on."""
    msg = convert.volume_to_proto(volume)
    msg.host = host
    return msg


def volume_not_found(name: str, host: str) -> NotFound:
    """NotFound VOLUME_NOT_FOUND: ``host`` has no volume ``name``."""
    return NotFound(
        f"volume {name} not found on host {host} (see 'clonebox volume list')",
        reason="VOLUME_NOT_FOUND",
        metadata={"volume": name, "host": host},
    )


class OperationServicer(operation_service_pb2_grpc.OperationServiceServicer):
    """Long-running operations."""

    def __init__(self, queries: OperationQueries) -> None:
        self._ops = queries

    async def GetOperation(
        self, request: operation_service_pb2.GetOperationRequest, context: Ctx
    ) -> operation_service_pb2.GetOperationResponse:
        """See the proto."""
        return operation_service_pb2.GetOperationResponse(
            operation=convert.operation_to_proto(await self._ops.get(request.id))
        )

    async def WaitOperation(
        self, request: operation_service_pb2.WaitOperationRequest, context: Ctx
    ) -> operation_service_pb2.WaitOperationResponse:
        """See the proto."""
        op = await self._ops.wait(request.id, float(request.timeout_seconds or 60))
        return operation_service_pb2.WaitOperationResponse(operation=convert.operation_to_proto(op))

    async def WatchOperation(
        self, request: operation_service_pb2.WatchOperationRequest, context: Ctx
    ) -> AsyncIterator[operation_service_pb2.WatchOperationResponse]:
        """See the proto."""
        async for op in self._ops.watch(request.id):
            yield operation_service_pb2.WatchOperationResponse(operation=convert.operation_to_proto(op))

    async def ListOperations(
        self, request: operation_service_pb2.ListOperationsRequest, context: Ctx
    ) -> operation_service_pb2.ListOperationsResponse:
        """See the proto."""
        ops = await self._ops.list(request.page_size or 50, request.only_running)
        return operation_service_pb2.ListOperationsResponse(operations=[convert.operation_to_proto(o) for o in ops])
