"""Controller configuration (``clonebox-controller --config FILE``, overrides from ``CLONEBOX_CONTROLLER_*``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ControllerConfig(BaseModel):
    """Everything a controller needs to run."""

    model_config = ConfigDict(extra="forbid")
    #: address the controller's services listen on; port 0 picks a free one
    listen: str = "127.0.0.1:7100"
    #: folder with ca.crt, controller.crt and controller.key (mTLS); see 'clonebox pki'
    tls_dir: str = ""
    #: plaintext gRPC instead of mTLS: refused unless the listen address is loopback
    insecure: bool = False
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
    #: default graceful stop timeout passed to agents
    stop_timeout_seconds: int = Field(60, ge=1, le=3600)
    log_level: str = "INFO"
