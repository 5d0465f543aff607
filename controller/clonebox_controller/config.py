"""Controller configuration (``clonebox-controller --config FILE``, overrides from ``CLONEBOX_CONTROLLER_*``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from clonebox_core.telemetry.logging import LogLevel
from clonebox_core.telemetry.tracing import TracingConfig


class AuditConfig(BaseModel):
    """Where the audit chain's HMAC keys and its outside-the-database head witness live."""

    model_config = ConfigDict(extra="forbid")

    #: key id -> key file (hex or raw, mode 0600); more than one when keys were rotated
    keys: dict[str, str] = Field(default_factory=dict)
    #: id of the key that signs new records (must be in ``keys``)
    current_key: str = ""
    #: with no ``keys``: this file is created with a random key on first start (mode 0600);
    #: "" = ``audit.key`` beside the database (SQLite) or in the working directory
    key_file: str = ""
    #: append-only file holding the chain head outside the database ("" = ``audit-head.log`` beside the key)
    head_file: str = ""


class HealthConfig(BaseModel):
    """How long health history is kept, and how far a watcher may fall behind."""

    model_config = ConfigDict(extra="forbid")

    #: state changes of checks and VMs (watchers resume within this window)
    transition_retention_days: float = Field(30.0, gt=0, le=3660)
    #: per-minute sums of probe runs
    minute_retention_days: float = Field(7.0, gt=0, le=3660)
    #: actions agents took (restarts, commands)
    action_retention_days: float = Field(30.0, gt=0, le=3660)
    #: how often old history is pruned
    prune_interval_seconds: float = Field(3600.0, gt=0, le=7 * 86400)
    #: live updates a health watcher may fall behind by before its stream ends (it then resumes)
    watch_queue: int = Field(1000, ge=1, le=1_000_000)


class PlansConfig(BaseModel):
    """How the plan engine leases and follows runs."""

    model_config = ConfigDict(extra="forbid")

    #: a run this controller executes stays leased to it this long without a renewal (renewed every third of
    #: it); when the controller dies, another one resumes the run after at most this long
    lease_seconds: float = Field(30.0, ge=1, le=3600)
    #: how often a run re-reads the state and health of the VMs and the operations it waits for; changes this
    #: controller commits wake it at once, so this paces only changes made by another controller
    poll_seconds: float = Field(1.0, ge=0.01, le=60)
    #: how often a plan watch re-reads its run (runs executed by another controller sharing the store)
    watch_poll_seconds: float = Field(1.0, ge=0.05, le=60)
    #: a plan watch sends at most one version of an unfinished run per this interval (the newest); the
    #: version that ends the run is sent at once
    watch_min_interval_seconds: float = Field(0.1, ge=0, le=10)
    #: a deletion by a rollback or a down keeps retrying this long while its host is unreachable
    unreachable_retry_seconds: float = Field(120.0, ge=0, le=86400)
    #: export a VM to an archive file before a replace deletes it (the file is restorable with
    #: 'clonebox snapshot import')
    backup_before_replace: bool = True
    #: where those files go, as <dir>/<plan>/<vm>/<run>.cbsnap; "" = a plan-backups folder beside
    #: the SQLite database, else /var/lib/clonebox/controller/plan-backups
    backup_dir: str = ""
    #: how many backup files to keep per VM, newest first (older ones are deleted after a new one is written)
    backup_keep: int = Field(3, ge=1, le=1000)


class ControllerConfig(BaseModel):
    """Everything a controller needs to run."""

    model_config = ConfigDict(extra="forbid")
    #: address the controller's services listen on; port 0 picks a free one
    listen: str = "127.0.0.1:7100"
    #: folder with ca.crt, controller.crt and controller.key (mTLS); see 'clonebox pki'
    tls_dir: str = ""
    #: plaintext gRPC instead of mTLS: refused unless the listen address is loopback
    insecure: bool = False
    #: Prometheus endpoint (HTTPS, client certificates from the fleet CA; plain HTTP on loopback when
    #: insecure); port 0 picks a free one, "" disables it
    metrics_listen: str = "127.0.0.1:9464"
    #: the issuing CA ('clonebox pki init'); needed for enrolment, renewal, revocation
    ca_dir: str = ""
    #: TLS port without client certificates where new hosts enrol with a join token ("" disables)
    enroll_listen: str = ""
    #: address new hosts dial for enrolment, written into join tokens (default: the bound enroll_listen)
    enroll_advertise: str = ""
    #: lifetime of certificates the controller issues (renewals, enrolments)
    certificate_seconds: int = Field(30 * 86400, ge=10, le=366 * 86400)
    #: SQLAlchemy URL: sqlite:///PATH (default) or postgresql+psycopg://...
    database_url: str = "sqlite:////var/lib/clonebox/controller/fleet.db"
    #: a host that sends no heartbeat for this long becomes UNREACHABLE
    heartbeat_timeout_seconds: float = Field(10.0, gt=0)
    #: heartbeat interval asked of agents
    heartbeat_interval_seconds: float = Field(2.0, gt=0)
    #: how long an operation keeps retrying an agent it cannot reach (a crashed agent restarting)
    agent_retry_seconds: float = Field(60.0, ge=0, le=3600)
    #: default graceful stop timeout passed to agents
    stop_timeout_seconds: int = Field(60, ge=1, le=3600)
    log_level: str = "INFO"
    #: per-logger levels over log_level, e.g. {"clonebox_agent.adapters.libvirt": "DEBUG", "sqlalchemy": "WARNING"}
    log_levels: dict[str, LogLevel] = Field(default_factory=dict)
    #: the audit log's keys and head witness
    audit: AuditConfig = AuditConfig()
    #: health history retention and watch settings
    health: HealthConfig = HealthConfig()
    #: multi-VM plan runs: leases and polling
    plans: PlansConfig = PlansConfig()
    #: OpenTelemetry export (OTEL_* environment variables apply too; nothing is exported unless configured)
    tracing: TracingConfig = TracingConfig()


def plan_backup_dir(config: ControllerConfig) -> str:
    """Where replaces keep their backups ("" when ``plans.backup_before_replace`` is off)."""
    plans = config.plans
    if not plans.backup_before_replace:
        return ""
    if plans.backup_dir:
        return plans.backup_dir
    prefix = "sqlite:///"
    if config.database_url.startswith(prefix) and len(config.database_url) > len(prefix):
        return str(Path(config.database_url.removeprefix(prefix)).parent / "plan-backups")
    return "/var/lib/clonebox/controller/plan-backups"
