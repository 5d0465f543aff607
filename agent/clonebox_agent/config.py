"""Agent configuration (``clonebox-agent --config FILE``, overrides from ``CLONEBOX_AGENT_*``)."""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from clonebox_core.telemetry.logging import LogLevel
from clonebox_core.telemetry.tracing import TracingConfig

#: a POSIX portable user name (what useradd accepts)
_USER_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}$")


def _short_hostname() -> str:
    return socket.gethostname().split(".")[0].lower()


class ReserveConfig(BaseModel):
    """Resources held back for the host itself."""

    model_config = ConfigDict(extra="forbid")
    vcpus: int = Field(0, ge=0)
    memory_mib: int = Field(512, ge=0)
    disk_mib: int = Field(1024, ge=0)


class AgentConfig(BaseModel):
    """Everything an agent needs to run."""

    model_config = ConfigDict(extra="forbid")
    #: host name in the fleet (a DNS label)
    name: str = Field(default_factory=_short_hostname)
    #: address the AgentService listens on; port 0 picks a free one
    listen: str = "127.0.0.1:7101"
    #: address the controller can dial back; defaults to the bound listen address
    advertise: str = ""
    #: controller to register with; empty runs the agent standalone
    controller: str = "127.0.0.1:7100"
    #: folder with ca.crt, agent.crt and agent.key (mTLS); see 'clonebox pki'
    tls_dir: str = ""
    #: plaintext gRPC instead of mTLS: refused unless every address is loopback
    insecure: bool = False
    #: Prometheus endpoint (HTTPS, client certificates from the fleet CA; plain HTTP on loopback when
    #: insecure); port 0 picks a free one, "" disables it. Distinct from the controller's 9464 default
    metrics_listen: str = "127.0.0.1:9465"
    #: one-time token from 'clonebox host add': used to obtain the first certificate when tls_dir is empty
    join_token: str = ""
    #: which adapter: libvirt (real or test driver, by uri) or the in-memory fake
    hypervisor: Literal["libvirt", "fake"] = "libvirt"
    libvirt_uri: str = "qemu:///system"
    #: kvm, qemu (TCG), or auto (KVM only when a probe guest actually runs under it)
    domain_type: Literal["auto", "kvm", "qemu"] = "auto"
    #: agent journal and epoch live here
    state_dir: str = "/var/lib/clonebox/agent"
    #: the agent's storage pool (overlays, seed ISOs); must be traversable by libvirt-qemu
    storage_dir: str = "/var/lib/clonebox/agent/storage"
    #: base images, kernels and initrds must lie inside one of these
    image_dirs: list[str] = Field(default_factory=lambda: ["/var/lib/clonebox/images"])
    #: shared folders (host paths of this host) must lie inside one of these; empty: no sharing at all
    shared_roots: list[str] = Field(default_factory=list)
    #: how often the agent asks guests with ``detach_seed_after_boot`` whether cloud-init is done
    seed_poll_seconds: float = Field(5.0, gt=0, le=3600)
    reserve: ReserveConfig = ReserveConfig()
    #: vCPUs offered per host CPU: guests rarely keep every vCPU busy, so CPU is overcommitted (memory never is)
    cpu_allocation_ratio: float = Field(4.0, ge=1.0, le=64.0)
    #: graceful stop timeout before forcing off
    stop_timeout_seconds: int = Field(60, ge=1, le=3600)
    #: events kept for resuming watches
    event_history: int = Field(10_000, ge=100)
    heartbeat_interval_seconds: float = Field(2.0, gt=0)
    log_level: str = "INFO"
    #: per-logger levels over log_level, e.g. {"clonebox_agent.adapters.libvirt": "DEBUG", "sqlalchemy": "WARNING"}
    log_levels: dict[str, LogLevel] = Field(default_factory=dict)
    #: OpenTelemetry export (OTEL_* environment variables apply too; nothing is exported unless configured)
    tracing: TracingConfig = TracingConfig()
    #: folder of host executables that ``script`` health checks may name (root-owned, writable by root
    #: only); empty: script checks are refused
    probe_scripts_dir: str = ""
    #: the user (and its primary group) script checks run as, when the agent runs as root
    probe_user: str = "nobody"
    #: health probe runs at the same time, at most (over every VM)
    probe_concurrency: int = Field(64, ge=1, le=4096)
    #: wait before a health restart of a VM that was restarted before in the window, doubling each time
    health_restart_backoff_seconds: float = Field(10.0, ge=0, le=3600)
    #: health restarts of one VM per window, at most (0: health checks never restart VMs)
    health_max_restarts: int = Field(3, ge=0, le=100)
    #: the window health_max_restarts counts in
    health_restart_window_seconds: float = Field(600.0, gt=0, le=7 * 86400)
    #: how often the agent applies each VM's snapshot retention policy (deletions audited as snapshot.prune)
    snapshot_prune_interval_seconds: float = Field(3600.0, ge=1, le=7 * 86400)
    #: largest virtual disk size an imported snapshot may have, bytes (default 1 TiB); a qcow2 of a huge
    #: virtual size is tiny on the wire but may fill the pool as the guest writes
    max_import_virtual_bytes: int = Field(1 << 40, ge=1 << 20, le=1 << 50)
    #: hypervisor: fake only (benchmarks, demos): a loopback IPv4 network such as 127.77.0.0/16; each running
    #: VM's http/tcp health probes then go to address index + 1 of it, where a test server can answer
    #: (index: the fake's counter of creates and boots, so each boot has its own address, not consecutive
    #: ones). Empty: the fake's VMs have no probe address
    fake_probe_network: str = ""

    @field_validator("probe_scripts_dir")
    @classmethod
    def _scripts_dir_absolute(cls, value: str) -> str:
        if value and not os.path.isabs(value):
            raise ValueError(f"must be an absolute path (got {value!r}); empty disables script checks")
        return os.path.normpath(value) if value else value

    @field_validator("fake_probe_network")
    @classmethod
    def _fake_probe_network(cls, value: str, info: ValidationInfo) -> str:
        if not value:
            return value
        # hypervisor is declared earlier, so it is validated (and in info.data) by now
        if info.data.get("hypervisor") != "fake":
            raise ValueError("only with hypervisor: fake (a real hypervisor reports its VMs' addresses itself)")
        try:
            network = ipaddress.IPv4Network(value)
        except ValueError:
            raise ValueError("must be an IPv4 network such as 127.77.0.0/16 (no host bits set)") from None
        if not network.is_loopback:
            raise ValueError("must be a loopback network inside 127.0.0.0/8: fake probes never leave this machine")
        if network.prefixlen > 30:
            raise ValueError("must have room for VM addresses: a prefix of /30 or shorter")
        return str(network)

    @field_validator("probe_user")
    @classmethod
    def _probe_user_name(cls, value: str) -> str:
        if not _USER_NAME.fullmatch(value):
            raise ValueError("must be a user name such as nobody")
        if value == "root":
            raise ValueError("script checks never run as root: name an unprivileged user")
        return value
