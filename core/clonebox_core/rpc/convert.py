"""Conversion between core models and the shared ``clonebox.type.v1`` messages.

Service-specific request/response conversion lives in each side's ``grpc/convert.py``; the shared
types are converted here once so the agent, controller and CLI cannot disagree.
"""

from __future__ import annotations

from datetime import UTC, datetime

from clonebox.type.v1 import health_pb2, host_pb2, operation_pb2, recovery_pb2, resources_pb2, vm_pb2
from google.protobuf import timestamp_pb2
from google.rpc import status_pb2

from clonebox_core import errors, health, model
from clonebox_core.rpc.status import error_from_status_proto, to_status_proto
from clonebox_core.secret import Secret


def ts_to_proto(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    """A datetime as a Timestamp (None stays None)."""
    if value is None:
        return None
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(value.astimezone(UTC))
    return out


def ts_from_proto(msg: timestamp_pb2.Timestamp, present: bool, field: str = "timestamp") -> datetime | None:
    """A Timestamp as an aware UTC datetime, or None when the field was unset.

    A value outside years 1-9999 (or nanos outside 0..999,999,999) is InvalidArgument naming ``field``:
    it came from a client, and must not become an INTERNAL error.
    """
    if not present:
        return None
    try:
        return msg.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        shown = f"{msg.seconds} s + {msg.nanos} ns"
        raise errors.invalid_field(field, f"{shown} is not a valid time (years 1-9999 only)") from None


def resources_to_proto(r: model.Resources) -> resources_pb2.Resources:
    """Resources -> proto."""
    return resources_pb2.Resources(vcpus=r.vcpus, memory_mib=r.memory_mib, disk_mib=r.disk_mib)


def resources_from_proto(m: resources_pb2.Resources) -> model.Resources:
    """Proto -> Resources."""
    return model.Resources(m.vcpus, m.memory_mib, m.disk_mib)


def revision_to_proto(r: model.Revision) -> resources_pb2.Revision:
    """Revision -> proto."""
    return resources_pb2.Revision(epoch=r.epoch, sequence=r.sequence)


def revision_from_proto(m: resources_pb2.Revision) -> model.Revision:
    """Proto -> Revision."""
    return model.Revision(m.epoch, m.sequence)


_NETWORK_MODE_TO_PROTO = {
    model.NetworkMode.LIBVIRT: vm_pb2.NETWORK_MODE_LIBVIRT,
    model.NetworkMode.NONE: vm_pb2.NETWORK_MODE_NONE,
    model.NetworkMode.MANAGED: vm_pb2.NETWORK_MODE_MANAGED,
}
_NETWORK_MODE_FROM_PROTO = {v: k for k, v in _NETWORK_MODE_TO_PROTO.items()}


_SHARE_DRIVER_TO_PROTO = {
    model.ShareDriver.NINE_P: vm_pb2.SHARE_DRIVER_9P,
    model.ShareDriver.VIRTIOFS: vm_pb2.SHARE_DRIVER_VIRTIOFS,
}
_AUTH_METHOD_TO_PROTO = {
    model.AuthMethod.SSH_KEY: vm_pb2.AUTH_METHOD_SSH_KEY,
    model.AuthMethod.PASSWORD: vm_pb2.AUTH_METHOD_PASSWORD,
    model.AuthMethod.BOTH: vm_pb2.AUTH_METHOD_BOTH,
    model.AuthMethod.ONE_TIME_PASSWORD: vm_pb2.AUTH_METHOD_ONE_TIME_PASSWORD,
}
_AUTH_METHOD_FROM_PROTO = {v: k for k, v in _AUTH_METHOD_TO_PROTO.items()}
#: what replaces a secret field in a spec that is only shown (GetVm, ListVms, WatchVms)
REDACTED = "<redacted>"


def _shown(value: Secret, redact: bool) -> str:
    return REDACTED if redact and value else value.reveal()


_CHECK_TYPE_TO_PROTO = {t: health_pb2.HealthCheckType.Value(f"HEALTH_CHECK_TYPE_{t.name}") for t in health.ProbeType}
_CHECK_TYPE_FROM_PROTO = {v: k for k, v in _CHECK_TYPE_TO_PROTO.items()}
_ACTION_TO_PROTO = {
    health.ActionKind.NONE: health_pb2.CHECK_ACTION_KIND_UNSPECIFIED,
    health.ActionKind.RESTART: health_pb2.CHECK_ACTION_KIND_RESTART,
    health.ActionKind.COMMAND: health_pb2.CHECK_ACTION_KIND_COMMAND,
}
_ACTION_FROM_PROTO = {v: k for k, v in _ACTION_TO_PROTO.items()}


def _band_to_proto(b: health.Band | None) -> health_pb2.PercentBand | None:
    return None if b is None else health_pb2.PercentBand(warn=b.warn, critical=b.critical)


def probe_to_proto(p: health.Probe) -> health_pb2.HealthCheck:
    """Probe -> proto."""
    out = health_pb2.HealthCheck(
        name=p.name,
        type=_CHECK_TYPE_TO_PROTO[p.type],
        interval_ms=p.interval_ms,
        timeout_ms=p.timeout_ms,
        initial_delay_ms=p.initial_delay_ms,
        failure_threshold=p.failure_threshold,
        success_threshold=p.success_threshold,
        critical=p.critical,
        on_failure=health_pb2.CheckAction(kind=_ACTION_TO_PROTO[p.on_failure.kind], command=p.on_failure.argv),
        on_recovery=health_pb2.CheckAction(kind=_ACTION_TO_PROTO[p.on_recovery.kind], command=p.on_recovery.argv),
    )
    if p.http is not None:
        h = p.http
        out.http.CopyFrom(
            health_pb2.HttpCheck(
                port=h.port,
                path=h.path,
                scheme=h.scheme,
                method=h.method,
                expect_status=h.expect_status,
                body_regex=h.body_regex,
                headers=dict(h.headers),
                tls_verify=h.tls_verify,
            )
        )
    if p.tcp is not None:
        out.tcp.port = p.tcp.port
    if p.command is not None:
        out.command.CopyFrom(
            health_pb2.CommandCheck(
                argv=p.command.argv, expect_exit=p.command.expect_exit, output_regex=p.command.output_regex
            )
        )
    if p.script is not None:
        out.script.CopyFrom(health_pb2.ScriptCheck(name=p.script.name, args=p.script.args))
    if p.resource is not None:
        r = p.resource
        out.resource.CopyFrom(
            health_pb2.ResourceCheck(
                cpu=_band_to_proto(r.cpu), memory=_band_to_proto(r.memory), disk=_band_to_proto(r.disk)
            )
        )
    if p.file is not None:
        out.file.CopyFrom(health_pb2.FileCheck(path=p.file.path, regex=p.file.regex))
    return out


def _band_from_proto(m: health_pb2.ResourceCheck, name: str) -> health.Band | None:
    if not m.HasField(name):  # type: ignore[arg-type]  # one of the three band fields
        return None
    band: health_pb2.PercentBand = getattr(m, name)
    return health.Band(band.warn, band.critical)


def probe_from_proto(m: health_pb2.HealthCheck, field: str = "health_check") -> health.Probe:
    """Proto -> Probe (InvalidArgument for an unknown type; the rest: ``health.validate_probes``)."""
    kind = _CHECK_TYPE_FROM_PROTO.get(m.type)
    if kind is None:
        raise errors.invalid_field(f"{field}.type", f"{m.type} is not a health check type")
    h = m.http
    return health.Probe(
        name=m.name,
        type=kind,
        interval_ms=m.interval_ms,
        timeout_ms=m.timeout_ms,
        initial_delay_ms=m.initial_delay_ms,
        failure_threshold=m.failure_threshold,
        success_threshold=m.success_threshold,
        critical=m.critical if m.HasField("critical") else True,
        http=(
            health.HttpProbe(
                port=h.port,
                path=h.path,
                scheme=h.scheme,
                method=h.method,
                expect_status=tuple(h.expect_status),
                body_regex=h.body_regex,
                headers=tuple(sorted(h.headers.items())),
                tls_verify=h.tls_verify if h.HasField("tls_verify") else True,
            )
            if m.HasField("http")
            else None
        ),
        tcp=health.TcpProbe(m.tcp.port) if m.HasField("tcp") else None,
        command=(
            health.CommandProbe(tuple(m.command.argv), m.command.expect_exit, m.command.output_regex)
            if m.HasField("command")
            else None
        ),
        script=health.ScriptProbe(m.script.name, tuple(m.script.args)) if m.HasField("script") else None,
        resource=(
            health.ResourceProbe(
                _band_from_proto(m.resource, "cpu"),
                _band_from_proto(m.resource, "memory"),
                _band_from_proto(m.resource, "disk"),
            )
            if m.HasField("resource")
            else None
        ),
        file=health.FileProbe(m.file.path, m.file.regex) if m.HasField("file") else None,
        on_failure=health.Action(
            _ACTION_FROM_PROTO.get(m.on_failure.kind, health.ActionKind.NONE), tuple(m.on_failure.command)
        ),
        on_recovery=health.Action(
            _ACTION_FROM_PROTO.get(m.on_recovery.kind, health.ActionKind.NONE), tuple(m.on_recovery.command)
        ),
    )


def spec_to_proto(s: model.VmSpec, *, redact: bool = False) -> vm_pb2.VmSpec:
    """
    VmSpec -> proto.

    ``redact`` masks user-data and the password hash: a spec sent back to readers (``Vm.spec``) never
    carries them; only the create request that needs them does.
    """
    out = vm_pb2.VmSpec(
        name=s.name,
        vcpus=s.vcpus,
        memory_mib=s.memory_mib,
        disks=[
            vm_pb2.DiskSpec(name=d.name, base_image=d.base_image, size_mib=d.size_mib, volume=d.volume) for d in s.disks
        ],
        network=vm_pb2.NetworkSpec(
            mode=_NETWORK_MODE_TO_PROTO[s.network.mode],
            libvirt_network=s.network.libvirt_network,
            subnet=s.network.subnet,
            address=s.network.address,
            dns_names=list(s.network.dns_names),
        ),
        shared_folders=[
            vm_pb2.SharedFolder(
                host_path=f.host_path,
                tag=f.tag,
                read_only=f.read_only,
                mount=f.mount,
                driver=_SHARE_DRIVER_TO_PROTO[f.driver],
            )
            for f in s.shared_folders
        ],
        labels=dict(s.labels),
        health_checks=[probe_to_proto(p) for p in s.health_checks],
    )
    if s.auth is not None:
        a = s.auth
        out.auth.CopyFrom(
            vm_pb2.Auth(
                user=a.user,
                method=_AUTH_METHOD_TO_PROTO[a.method],
                ssh_keys=a.ssh_keys,
                password=a.password,
                ssh_authorized_keys=a.ssh_authorized_keys,
                password_hash=_shown(a.password_hash, redact),
                secret_refs=a.secret_refs,
            )
        )
    if s.provision is not None:
        p = s.provision
        out.provision.CopyFrom(
            vm_pb2.Provision(
                packages=p.packages,
                snap_packages=p.snap_packages,
                services=p.services,
                post_commands=p.post_commands,
            )
        )
    if s.kernel_boot is not None:
        out.kernel_boot.CopyFrom(
            vm_pb2.KernelBoot(kernel=s.kernel_boot.kernel, initrd=s.kernel_boot.initrd, cmdline=s.kernel_boot.cmdline)
        )
    if s.cloud_init is not None:
        out.cloud_init.CopyFrom(
            vm_pb2.CloudInit(
                user_data=_shown(s.cloud_init.user_data, redact),
                meta_data=s.cloud_init.meta_data,
                network_config=s.cloud_init.network_config,
                detach_seed_after_boot=s.cloud_init.detach_seed_after_boot,
            )
        )
    return out


def spec_from_proto(m: vm_pb2.VmSpec) -> model.VmSpec:
    """Proto -> VmSpec (no validation; see ``clonebox_core.validate``)."""
    # UNSPECIFIED (and a mode this build does not know) is the default: a libvirt network
    mode = _NETWORK_MODE_FROM_PROTO.get(m.network.mode, model.NetworkMode.LIBVIRT)
    return model.VmSpec(
        name=m.name,
        vcpus=m.vcpus,
        memory_mib=m.memory_mib,
        disks=tuple(model.DiskSpec(d.name, d.base_image, d.size_mib, d.volume) for d in m.disks),
        kernel_boot=(
            model.KernelBoot(m.kernel_boot.kernel, m.kernel_boot.initrd, m.kernel_boot.cmdline)
            if m.HasField("kernel_boot")
            else None
        ),
        network=model.NetworkSpec(
            mode,
            m.network.libvirt_network or "default",
            m.network.subnet,
            m.network.address,
            tuple(m.network.dns_names),
        ),
        shared_folders=tuple(
            model.SharedFolder(
                f.host_path,
                f.tag,
                f.read_only,
                f.mount,
                model.ShareDriver.VIRTIOFS if f.driver == vm_pb2.SHARE_DRIVER_VIRTIOFS else model.ShareDriver.NINE_P,
            )
            for f in m.shared_folders
        ),
        cloud_init=(
            model.CloudInit(
                Secret(m.cloud_init.user_data),
                m.cloud_init.meta_data,
                m.cloud_init.network_config,
                m.cloud_init.detach_seed_after_boot,
            )
            if m.HasField("cloud_init")
            else None
        ),
        labels=tuple(sorted(m.labels.items())),
        auth=(
            model.Auth(
                user=m.auth.user or "clonebox",
                method=_AUTH_METHOD_FROM_PROTO.get(m.auth.method, model.AuthMethod.SSH_KEY),
                ssh_keys=tuple(m.auth.ssh_keys),
                password=m.auth.password,
                ssh_authorized_keys=tuple(m.auth.ssh_authorized_keys),
                password_hash=Secret(m.auth.password_hash),
                secret_refs=tuple(m.auth.secret_refs),
            )
            if m.HasField("auth")
            else None
        ),
        provision=(
            model.Provision(
                tuple(m.provision.packages),
                tuple(m.provision.snap_packages),
                tuple(m.provision.services),
                tuple(m.provision.post_commands),
            )
            if m.HasField("provision")
            else None
        ),
        health_checks=tuple(probe_from_proto(p, f"spec.health_checks[{i}]") for i, p in enumerate(m.health_checks)),
    )


def vm_to_proto(v: model.Vm) -> vm_pb2.Vm:
    """Vm -> proto."""
    out = vm_pb2.Vm(
        name=v.name,
        host=v.host,
        state=v.state.value,  # type: ignore[arg-type]  # the enums share numbers by construction
        spec=spec_to_proto(v.spec, redact=True),
        addresses=[
            vm_pb2.IpAddress(interface=a.interface, address=a.address, prefix=a.prefix, source=a.source)
            for a in v.addresses
        ],
        uuid=v.uuid,
        state_reason=v.state_reason,
    )
    if (t := ts_to_proto(v.create_time)) is not None:
        out.create_time.CopyFrom(t)
    if (t := ts_to_proto(v.update_time)) is not None:
        out.update_time.CopyFrom(t)
    return out


def volume_to_proto(v: model.Volume) -> vm_pb2.Volume:
    """Volume -> proto."""
    out = vm_pb2.Volume(name=v.name, size_mib=v.size_mib, shared=v.shared, labels=dict(v.labels), vms=list(v.vms))
    if (t := ts_to_proto(v.create_time)) is not None:
        out.create_time.CopyFrom(t)
    return out


def volume_from_proto(m: vm_pb2.Volume) -> model.Volume:
    """Proto -> Volume."""
    return model.Volume(
        name=m.name,
        size_mib=m.size_mib,
        shared=m.shared,
        labels=tuple(sorted(m.labels.items())),
        vms=tuple(m.vms),
        create_time=ts_from_proto(m.create_time, m.HasField("create_time"), "volume.create_time"),
    )


def vm_state_from_proto(value: int, field: str) -> model.VmState:
    """A ``VmState`` enum value from the wire (InvalidArgument naming ``field`` for a value it does not have)."""
    try:
        return model.VmState(value)
    except ValueError:
        raise errors.invalid_field(field, f"{value} is not a VM state") from None


def vm_from_proto(m: vm_pb2.Vm) -> model.Vm:
    """Proto -> Vm."""
    return model.Vm(
        name=m.name,
        host=m.host,
        state=vm_state_from_proto(m.state, "vm.state"),
        spec=spec_from_proto(m.spec),
        uuid=m.uuid,
        addresses=tuple(model.IpAddress(a.interface, a.address, a.prefix, a.source) for a in m.addresses),
        create_time=ts_from_proto(m.create_time, m.HasField("create_time")),
        update_time=ts_from_proto(m.update_time, m.HasField("update_time")),
        state_reason=m.state_reason,
    )


def hypervisor_to_proto(h: model.HypervisorInfo) -> host_pb2.HypervisorInfo:
    """HypervisorInfo -> proto."""
    return host_pb2.HypervisorInfo(
        uri=h.uri,
        libvirt_version=h.libvirt_version,
        hypervisor_version=h.hypervisor_version,
        domain_type=h.domain_type,
        domain_type_reason=h.domain_type_reason,
        capabilities=list(h.capabilities),
        cpu_model=h.cpu_model,
    )


def hypervisor_from_proto(m: host_pb2.HypervisorInfo) -> model.HypervisorInfo:
    """Proto -> HypervisorInfo."""
    return model.HypervisorInfo(
        uri=m.uri,
        libvirt_version=m.libvirt_version,
        hypervisor_version=m.hypervisor_version,
        domain_type=m.domain_type,
        domain_type_reason=m.domain_type_reason,
        capabilities=tuple(m.capabilities),
        cpu_model=m.cpu_model,
    )


def host_to_proto(h: model.Host) -> host_pb2.Host:
    """Host -> proto."""
    out = host_pb2.Host(
        name=h.name,
        address=h.address,
        capacity=resources_to_proto(h.capacity),
        allocatable=resources_to_proto(h.allocatable),
        allocated=resources_to_proto(h.allocated),
        hypervisor=hypervisor_to_proto(h.hypervisor),
        state=h.state.value,  # type: ignore[arg-type]
        cordoned=h.cordoned,
        vm_count=h.vm_count,
        agent_epoch=h.agent_epoch,
    )
    if (t := ts_to_proto(h.last_heartbeat)) is not None:
        out.last_heartbeat_time.CopyFrom(t)
    return out


def host_from_proto(m: host_pb2.Host) -> model.Host:
    """Proto -> Host."""
    return model.Host(
        name=m.name,
        address=m.address,
        capacity=resources_from_proto(m.capacity),
        allocatable=resources_from_proto(m.allocatable),
        allocated=resources_from_proto(m.allocated),
        hypervisor=hypervisor_from_proto(m.hypervisor),
        state=model.HostState(m.state),
        cordoned=m.cordoned,
        last_heartbeat=ts_from_proto(m.last_heartbeat_time, m.HasField("last_heartbeat_time")),
        vm_count=m.vm_count,
        agent_epoch=m.agent_epoch,
    )


def operation_to_proto(op: model.Operation) -> operation_pb2.Operation:
    """Operation -> proto (error as google.rpc.Status with ErrorInfo)."""
    out = operation_pb2.Operation(
        id=op.id,
        kind=op.kind,
        target=op.target,
        step=op.step,
        progress=op.progress,
        done=op.done,
        request_id=op.request_id,
    )
    if op.error_code:
        cls = errors.CLASS_BY_CODE.get(op.error_code, errors.Internal)
        out.error.CopyFrom(to_status_proto(cls(op.error_message, reason=op.error_reason, metadata=op.error_metadata)))
    if op.result_vm is not None:
        out.result.vm.CopyFrom(vm_to_proto(op.result_vm))
    if (t := ts_to_proto(op.create_time)) is not None:
        out.create_time.CopyFrom(t)
    if (t := ts_to_proto(op.update_time)) is not None:
        out.update_time.CopyFrom(t)
    return out


def operation_error(m: operation_pb2.Operation) -> errors.CloneboxError | None:
    """The error a finished operation carries, as a CloneboxError (None when it succeeded)."""
    if not m.HasField("error"):
        return None
    status = status_pb2.Status()
    status.CopyFrom(m.error)
    return error_from_status_proto(status)


_TXN_STATE_TO_PB = {
    model.TransactionState.OPEN: recovery_pb2.TRANSACTION_STATE_OPEN,
    model.TransactionState.COMMITTED: recovery_pb2.TRANSACTION_STATE_COMMITTED,
    model.TransactionState.ROLLED_BACK: recovery_pb2.TRANSACTION_STATE_ROLLED_BACK,
}
_TXN_STATE_FROM_PB = {v: k for k, v in _TXN_STATE_TO_PB.items()}


def transaction_to_proto(txn: model.Transaction) -> recovery_pb2.Transaction:
    """``Transaction`` -> message."""
    msg = recovery_pb2.Transaction(
        id=txn.id,
        host=txn.host,
        kind=txn.kind,
        target=txn.target,
        request_id=txn.request_id,
        state=_TXN_STATE_TO_PB[txn.state],
        error=txn.error,
        steps=[
            recovery_pb2.TransactionStep(
                n=s.n, name=s.name, state=str(s.state), undo=dict(s.undo), identity=dict(s.identity or {})
            )
            for s in txn.steps
        ],
    )
    for field_name, value in (("create_time", txn.created), ("finish_time", txn.finished)):
        stamp = ts_to_proto(value)
        if stamp is not None:
            getattr(msg, field_name).CopyFrom(stamp)
    return msg


def transaction_from_proto(msg: recovery_pb2.Transaction) -> model.Transaction:
    """Message -> ``Transaction`` (an unknown state reads as open: it needs a look)."""
    return model.Transaction(
        id=msg.id,
        host=msg.host,
        kind=msg.kind,
        target=msg.target,
        request_id=msg.request_id,
        state=_TXN_STATE_FROM_PB.get(msg.state, model.TransactionState.OPEN),
        error=msg.error,
        created=ts_from_proto(msg.create_time, msg.HasField("create_time")),
        finished=ts_from_proto(msg.finish_time, msg.HasField("finish_time")),
        steps=tuple(
            model.TransactionStep(
                s.n,
                s.name,
                dict(s.undo),
                dict(s.identity) or None,
                model.StepState(s.state) if s.state in set(model.StepState) else model.StepState.UNDO_FAILED,
            )
            for s in msg.steps
        ),
    )


def orphan_to_proto(orphan: model.Orphan) -> recovery_pb2.Orphan:
    """``Orphan`` -> message."""
    return recovery_pb2.Orphan(host=orphan.host, vm=orphan.vm, paths=list(orphan.paths), removed=orphan.removed)


def orphan_from_proto(msg: recovery_pb2.Orphan) -> model.Orphan:
    """Message -> ``Orphan``."""
    return model.Orphan(msg.host, msg.vm, tuple(msg.paths), msg.removed)


def plan_to_proto(plan: model.CreatePlan) -> vm_pb2.CreatePlan:
    """``CreatePlan`` -> message."""
    return vm_pb2.CreatePlan(host=plan.host, steps=list(plan.steps), domain_xml=plan.domain_xml)


def plan_from_proto(msg: vm_pb2.CreatePlan) -> model.CreatePlan:
    """Message -> ``CreatePlan``."""
    return model.CreatePlan(tuple(msg.steps), msg.domain_xml, msg.host)
