"""The one authorization table: every RPC and which principals may call it. Deny by default.

Principals are ``controller``, ``agent`` and the user roles ``viewer`` < ``operator`` < ``admin``.
A method without a row is refused, and a test walks every RPC of every service against this table,
so a new RPC cannot ship without a decision here.
"""

from __future__ import annotations

from collections.abc import Mapping

from clonebox_core.errors import PermissionDenied
from clonebox_core.security.identity import Identity

VIEWERS = frozenset({"viewer", "operator", "admin"})
OPERATORS = frozenset({"operator", "admin"})
ADMINS = frozenset({"admin"})
CONTROLLER = frozenset({"controller"})
AGENTS = frozenset({"agent"})
EVERYONE = frozenset({"controller", "agent", "viewer", "operator", "admin"})

_AGENT = "/clonebox.agent.v1.AgentService/"
_HOST = "/clonebox.controller.v1.HostService/"
_VM = "/clonebox.controller.v1.VmService/"
_OP = "/clonebox.controller.v1.OperationService/"
_PKI = "/clonebox.controller.v1.PkiService/"
_AUDIT = "/clonebox.controller.v1.AuditService/"
_RECOVERY = "/clonebox.controller.v1.RecoveryService/"
_HEALTH = "/clonebox.controller.v1.HealthService/"
_SNAPSHOT = "/clonebox.controller.v1.SnapshotService/"
_PLAN = "/clonebox.controller.v1.PlanService/"

POLICY: Mapping[str, frozenset[str]] = {
    # agents accept only the controller (peer agents arrive with transfers)
    **{
        _AGENT + m: CONTROLLER
        for m in (
            "GetHostInfo",
            "CreateVm",
            "GetVm",
            "GetSshKey",
            "ReadConsole",
            "RotateSecret",
            "ListVms",
            "StartVm",
            "StopVm",
            "UpdateVm",
            "DeleteVm",
            "WatchVms",
            "ListTransactions",
            "Recover",
            "WatchHealth",
            "CheckHealth",
            "CreateSnapshot",
            "ListSnapshots",
            "RestoreSnapshot",
            "DeleteSnapshot",
            "SetSnapshotPolicy",
            "PruneSnapshots",
            "ExportSnapshot",
            "ImportSnapshot",
            "CreateVolume",
            "DeleteVolume",
            "ListVolumes",
        )
    },
    # the controller accepts agents only on the agent-facing session
    _HOST + "Connect": AGENTS,
    _HOST + "ListHosts": VIEWERS,
    _HOST + "GetHost": VIEWERS,
    _HOST + "CordonHost": ADMINS,
    _HOST + "UncordonHost": ADMINS,
    _HOST + "DrainHost": ADMINS,
    _HOST + "CreateJoinToken": ADMINS,
    _VM + "GetVm": VIEWERS,
    _VM + "ListVms": VIEWERS,
    _VM + "WatchVms": VIEWERS,
    _VM + "CreateVm": OPERATORS,
    # a private key is a login: operators only, and every read is a secret.access audit event
    _VM + "GetVmSshKey": OPERATORS,
    # a guest's console can show what it prints of its secrets: operators only, every read a
    # vm.console_read audit event
    _VM + "ReadVmConsole": OPERATORS,
    _VM + "RotateVmSecret": OPERATORS,
    _VM + "StartVm": OPERATORS,
    _VM + "StopVm": OPERATORS,
    _VM + "UpdateVm": OPERATORS,
    _VM + "DeleteVm": OPERATORS,
    # volumes: viewers list them; making and deleting them (and their data) is for operators
    _VM + "ListVolumes": VIEWERS,
    _VM + "CreateVolume": OPERATORS,
    _VM + "DeleteVolume": OPERATORS,
    _OP + "GetOperation": VIEWERS,
    _OP + "WaitOperation": VIEWERS,
    _OP + "WatchOperation": VIEWERS,
    _OP + "ListOperations": VIEWERS,
    _PKI + "ListCertificates": ADMINS,
    _PKI + "RevokeCertificate": ADMINS,
    # every identity renews its own certificate (the CA re-issues the same identity only)
    _PKI + "RenewCertificate": EVERYONE,
    # the audit log: viewers read it (it names who did what, never secret values); admins archive
    _AUDIT + "ListAuditEvents": VIEWERS,
    _AUDIT + "GetAuditEvent": VIEWERS,
    _AUDIT + "WatchAudit": VIEWERS,
    _AUDIT + "VerifyAudit": VIEWERS,
    _AUDIT + "ExportAudit": ADMINS,
    _AUDIT + "ArchiveAudit": ADMINS,
    # recovery: viewers see journaled transactions; rolling back and sweeping is for admins
    _RECOVERY + "ListRecoveries": VIEWERS,
    _RECOVERY + "GetRecovery": VIEWERS,
    _RECOVERY + "RunRecovery": ADMINS,
    # health: viewers see states and history; running a VM's probes now (commands in the guest) is for operators
    _HEALTH + "GetVmHealth": VIEWERS,
    _HEALTH + "ListHealth": VIEWERS,
    _HEALTH + "WatchHealth": VIEWERS,
    _HEALTH + "GetHealthHistory": VIEWERS,
    _HEALTH + "CheckHealth": OPERATORS,
    # snapshots: viewers list them; changing them, and reading or writing disk contents, is for operators
    _SNAPSHOT + "ListSnapshots": VIEWERS,
    _SNAPSHOT + "CreateSnapshot": OPERATORS,
    _SNAPSHOT + "RestoreSnapshot": OPERATORS,
    _SNAPSHOT + "DeleteSnapshot": OPERATORS,
    _SNAPSHOT + "SetSnapshotPolicy": OPERATORS,
    _SNAPSHOT + "PruneSnapshots": OPERATORS,
    _SNAPSHOT + "ExportSnapshot": OPERATORS,
    _SNAPSHOT + "ImportSnapshot": OPERATORS,
    # plans: viewers read plans, diffs and runs (specs redacted); applying and destroying creates and
    # deletes VMs, so it is for the role that may do that
    _PLAN + "ValidatePlan": VIEWERS,
    _PLAN + "DiffPlan": VIEWERS,
    _PLAN + "GetPlan": VIEWERS,
    _PLAN + "ListPlans": VIEWERS,
    _PLAN + "ListPlanRuns": VIEWERS,
    _PLAN + "WatchPlan": VIEWERS,
    _PLAN + "ApplyPlan": OPERATORS,
    _PLAN + "DestroyPlan": OPERATORS,
    # standard services: any authenticated peer may ask for health and reflection
    "/grpc.health.v1.Health/Check": EVERYONE,
    "/grpc.health.v1.Health/Watch": EVERYONE,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": EVERYONE,
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": EVERYONE,
}


#: every RPC that changes something, and the audit action its attempts are recorded under; a test
#: checks that every RPC taking a ``request_id`` (the mark of a mutation) has a row
AUDIT_ACTIONS: Mapping[str, str] = {
    _HOST + "CordonHost": "host.cordon",
    _HOST + "UncordonHost": "host.uncordon",
    _HOST + "DrainHost": "host.drain",
    _HOST + "CreateJoinToken": "host.join_token.create",
    _VM + "CreateVm": "vm.create",
    _VM + "StartVm": "vm.start",
    _VM + "StopVm": "vm.stop",
    _VM + "UpdateVm": "vm.update",
    _VM + "DeleteVm": "vm.delete",
    _VM + "RotateVmSecret": "vm.rotate_secret",
    _VM + "CreateVolume": "volume.create",
    _VM + "DeleteVolume": "volume.delete",
    _PKI + "RevokeCertificate": "certificate.revoke",
    _PKI + "RenewCertificate": "certificate.renew",
    "/clonebox.controller.v1.EnrollmentService/Enroll": "host.enroll",
    _AUDIT + "ArchiveAudit": "audit.archive",
    _AGENT + "CreateVm": "vm.create",
    _AGENT + "StartVm": "vm.start",
    _AGENT + "StopVm": "vm.stop",
    _AGENT + "UpdateVm": "vm.update",
    _AGENT + "DeleteVm": "vm.delete",
    _AGENT + "RotateSecret": "vm.rotate_secret",
    _AGENT + "Recover": "recovery.run",
    _AGENT + "CreateVolume": "volume.create",
    _AGENT + "DeleteVolume": "volume.delete",
    _RECOVERY + "RunRecovery": "recovery.run",
    _SNAPSHOT + "CreateSnapshot": "snapshot.create",
    _SNAPSHOT + "RestoreSnapshot": "snapshot.restore",
    _SNAPSHOT + "DeleteSnapshot": "snapshot.delete",
    _SNAPSHOT + "SetSnapshotPolicy": "snapshot.policy",
    _SNAPSHOT + "PruneSnapshots": "snapshot.prune",
    _SNAPSHOT + "ExportSnapshot": "snapshot.export",
    _SNAPSHOT + "ImportSnapshot": "snapshot.import",
    _AGENT + "CreateSnapshot": "snapshot.create",
    _AGENT + "RestoreSnapshot": "snapshot.restore",
    _AGENT + "DeleteSnapshot": "snapshot.delete",
    _AGENT + "SetSnapshotPolicy": "snapshot.policy",
    _AGENT + "PruneSnapshots": "snapshot.prune",
    _AGENT + "ExportSnapshot": "snapshot.export",
    _AGENT + "ImportSnapshot": "snapshot.import",
    _PLAN + "ApplyPlan": "plan.apply",
    _PLAN + "DestroyPlan": "plan.destroy",
}


def audit_action(method: str) -> str | None:
    """The audit action of a mutating RPC (None for reads)."""
    return AUDIT_ACTIONS.get(method)


#: largest request each RPC accepts; the default fits every request that carries no cloud-init documents
DEFAULT_MAX_REQUEST_BYTES = 64 * 1024
MAX_REQUEST_BYTES: Mapping[str, int] = {
    # three cloud-init documents of up to 1 MiB each, plus the rest of the spec
    _AGENT + "CreateVm": 4 * 1024 * 1024,
    _VM + "CreateVm": 4 * 1024 * 1024,
    # each message of an import stream carries up to 1 MiB of image
    _AGENT + "ImportSnapshot": 2 * 1024 * 1024,
    _SNAPSHOT + "ImportSnapshot": 2 * 1024 * 1024,
    # a whole plan: up to 500 VM specs (the gRPC message limit, 8 MiB, bounds it further)
    _PLAN + "ValidatePlan": 8 * 1024 * 1024,
    _PLAN + "DiffPlan": 8 * 1024 * 1024,
    _PLAN + "ApplyPlan": 8 * 1024 * 1024,
}


def max_request_bytes(method: str) -> int:
    """The request size limit of ``method``."""
    return MAX_REQUEST_BYTES.get(method, DEFAULT_MAX_REQUEST_BYTES)


def allowed(method: str, identity: Identity) -> bool:
    """True when the table lets ``identity`` call ``method``."""
    return identity.principal in POLICY.get(method, frozenset())


def authorize(method: str, identity: Identity) -> None:
    """Raise PermissionDenied unless the table lets ``identity`` call ``method``."""
    if method not in POLICY:
        raise PermissionDenied(f"{method} has no authorization rule", reason="NO_POLICY")
    if not allowed(method, identity):
        raise PermissionDenied(
            f"{identity.principal} {identity.name} may not call {method.rsplit('/', 1)[-1]}",
            reason="ROLE_NOT_ALLOWED",
            metadata={"principal": identity.principal},
        )
