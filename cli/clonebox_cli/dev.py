"""
``clonebox dev``: run a local controller and agent on this machine, in the background.

``dev up`` writes a config file for each daemon, starts what is not already running
(``python -m clonebox_controller.main --config FILE``, likewise the agent; each in its own session,
output appended to a log file), and waits until both answer ``grpc.health.v1`` with SERVING and the
host is READY in the controller. It is idempotent: a daemon whose pid is alive and whose address
answers the health check is left alone. ``dev status`` reports both; ``dev down`` stops them (SIGTERM,
then SIGKILL after 10 s).

Security: unless ``--insecure``, ``dev up`` makes (once, then reuses) a development PKI: a CA of trust
domain ``clonebox.local``, a controller certificate, an agent certificate for the host, and an admin
user certificate for this CLI, which later commands use by default (no ``--tls-dir`` needed). Leaves
that are missing, expired, past two thirds of their lifetime or for another name are issued again.
The controller gets ``tls_dir``, ``ca_dir`` and an enrolment port (``enroll_listen``, the controller
port + 1, or + 2 when the agent has that one), so ``clonebox host add`` works on the local fleet. The
health checks speak mTLS too (server names ``controller.clonebox.local`` and
``HOST.agent.clonebox.local``). ``dev up --insecure`` runs both daemons in loopback plaintext instead.

Files:

* ``$XDG_STATE_HOME/clonebox/dev`` (default ``~/.local/state/clonebox/dev``): ``controller.pid``,
  ``agent.pid``, ``controller.log``, ``agent.log``, ``dev.json`` (addresses and settings; the CLI's
  default ``--controller`` and ``--tls-dir`` come from here) and the controller database ``fleet.db``;
  the dev PKI: ``pki/ca`` (the CA), ``tls/controller``, ``tls/agent`` and ``tls/user`` (0700 folders
  with ``ca.crt``, ``NAME.crt``, ``NAME.key``). As root the agent's folder is ``DATA_DIR/tls``
  (``/var/lib/clonebox/dev/tls``), next to its state.
* ``$XDG_CONFIG_HOME/clonebox/dev`` (default ``~/.config/clonebox/dev``): ``controller.yaml``,
  ``agent.yaml``.
* Agent data: QEMU runs as ``libvirt-qemu`` and must traverse to overlays and seed ISOs, which it
  cannot do under ``/root`` (0700). As root the agent therefore keeps its state in
  ``/var/lib/clonebox/dev/agent`` and its storage in ``/var/lib/clonebox/dev/storage``; other users
  get both under the state directory (use ``qemu:///session`` or ``--data-dir`` on a traversable
  path). Images, kernels and initrds come from ``/var/lib/clonebox/images`` unless ``--image-dir``.

Settings given to ``dev up`` are remembered: a later ``dev up`` without options reuses them, and asking
for different settings while a daemon runs is refused (run ``dev down`` first) rather than silently
ignored.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import grpc
import typer
import yaml
from clonebox.controller.v1 import host_service_pb2 as hosts_pb2
from clonebox.type.v1 import host_pb2
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clonebox_cli import credentials, output
from clonebox_cli.client import ControllerClient
from clonebox_cli.context import settings
from clonebox_core.errors import CloneboxError, DeadlineExceeded, FailedPrecondition, NotFound, Unavailable
from clonebox_core.names import check_dns_label
from clonebox_core.rpc.server import Transport, sync_channel
from clonebox_core.rpc.tls import TlsFiles, key_matches
from clonebox_core.security.identity import Identity, make_identity
from clonebox_core.security.pki import (
    DEFAULT_DAYS,
    CertificateAuthority,
    cert_pem,
    identity_of,
    key_pem,
    server_name,
    write_public,
)

app = typer.Typer(help="Run a local controller and agent for one machine.", no_args_is_help=True)

CONTROLLER_MODULE = "clonebox_controller.main"
AGENT_MODULE = "clonebox_agent.main"
STATE_FILE = "dev.json"
#: SIGTERM, then this long before SIGKILL
STOP_GRACE_SECONDS = 10.0
#: a live pid whose address stays silent this long is considered hung and restarted
_SILENT_GRACE_SECONDS = 5.0
ROOT_DATA_DIR = "/var/lib/clonebox/dev"
#: trust domain of the development PKI
DEV_TRUST_DOMAIN = "clonebox.local"
#: name of the dev controller's identity (spiffe://clonebox.local/controller/dev)
DEV_CONTROLLER_NAME = "dev"
#: lifetime of the dev leaves; the daemons and the CLI renew at two thirds of it
DEV_CERT_SECONDS = DEFAULT_DAYS * 86400
DEFAULT_IMAGE_DIR = "/var/lib/clonebox/images"
_LIBVIRT_SCRIPT = "deploy/dev/start-libvirt.sh"


# ------------------------------------------------------------------------------------------ locations


def _xdg(variable: str, fallback: str) -> Path:
    value = os.environ.get(variable, "")
    # the XDG spec says relative values are invalid and must be ignored
    return Path(value) if value and os.path.isabs(value) else Path.home() / fallback


def state_dir() -> Path:
    """``$XDG_STATE_HOME/clonebox/dev``: pid files, logs, dev.json, the controller database."""
    return _xdg("XDG_STATE_HOME", ".local/state") / "clonebox" / "dev"


def config_dir() -> Path:
    """``$XDG_CONFIG_HOME/clonebox/dev``: the daemons' config files."""
    return _xdg("XDG_CONFIG_HOME", ".config") / "clonebox" / "dev"


def _running_as_root() -> bool:
    return os.geteuid() == 0


def default_data_dir() -> Path:
    """Where the agent keeps its state and storage when ``--data-dir`` is not given."""
    return Path(ROOT_DATA_DIR) if _running_as_root() else state_dir()


def _load_state() -> dict[str, Any]:
    try:
        data = json.loads((state_dir() / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _save_state(data: dict[str, Any]) -> None:
    path = state_dir() / STATE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file


def recorded_controller() -> str | None:
    """Return the controller address the last ``dev up`` recorded, or None."""
    address = _load_state().get("controller", {})
    address = address.get("address") if isinstance(address, dict) else None
    return address if isinstance(address, str) and address else None


def recorded_tls_dir() -> str | None:
    """The CLI's TLS folder of the dev PKI, when ``dev up`` made one and it is still there."""
    tls = _load_state().get("tls", {})
    folder = tls.get("user") if isinstance(tls, dict) else None
    return folder if isinstance(folder, str) and folder and Path(folder).is_dir() else None


def recorded_insecure() -> bool:
    """True when the last ``dev up`` ran the daemons in loopback plaintext (``--insecure``)."""
    recorded = _load_state().get("settings", {})
    return isinstance(recorded, dict) and recorded.get("insecure") is True


# ------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class DevSettings:
    """What ``dev up`` was asked for (remembered in dev.json)."""

    controller_port: int = 7100
    agent_port: int = 7101
    host_name: str = "local"
    hypervisor: str = "libvirt"
    libvirt_uri: str = "qemu:///system"
    domain_type: str = "auto"
    data_dir: str = ""
    image_dirs: tuple[str, ...] = ()
    #: the controller's enrolment port; 0: the controller port + 1 (+ 2 when that is the agent's)
    enroll_port: int = 0
    #: loopback plaintext instead of mTLS
    insecure: bool = False

    @property
    def controller_address(self) -> str:
        """Where the controller listens."""
        return f"127.0.0.1:{self.controller_port}"

    @property
    def enroll_address(self) -> str:
        """Where the controller lets new hosts enrol with a join token."""
        port = self.enroll_port
        if not port:
            port = self.controller_port + 1
            if port == self.agent_port:
                port += 1
        return f"127.0.0.1:{port}"

    @property
    def agent_address(self) -> str:
        """Where the agent listens."""
        return f"127.0.0.1:{self.agent_port}"


def _resolve(given: dict[str, Any], recorded: Any) -> DevSettings:
    """Explicit options win, then the recorded settings, then the defaults."""
    base = DevSettings(data_dir=str(default_data_dir()), image_dirs=(DEFAULT_IMAGE_DIR,))
    values = asdict(base)
    if isinstance(recorded, dict):
        values.update({k: v for k, v in recorded.items() if k in values and v not in (None, "", [])})
    values.update({k: v for k, v in given.items() if v not in (None, [], ())})
    values["image_dirs"] = tuple(values["image_dirs"])
    return DevSettings(**values)


def controller_config(s: DevSettings) -> dict[str, Any]:
    """Return the controller's config file content."""
    config: dict[str, Any] = {
        "listen": s.controller_address,
        "database_url": f"sqlite:///{state_dir() / 'fleet.db'}",
        "heartbeat_timeout_seconds": 10.0,
    }
    if s.insecure:
        config["insecure"] = True
    else:
        config.update(tls_dir=str(tls_dir("controller", s)), ca_dir=str(ca_dir()), enroll_listen=s.enroll_address)
    return config


def agent_config(s: DevSettings) -> dict[str, Any]:
    """Return the agent's config file content."""
    data = Path(s.data_dir)
    config: dict[str, Any] = {
        "name": s.host_name,
        "listen": s.agent_address,
        "controller": s.controller_address,
        "hypervisor": s.hypervisor,
        "libvirt_uri": s.libvirt_uri,
        "domain_type": s.domain_type,
        "state_dir": str(data / "agent"),
        "storage_dir": str(data / "storage"),
        "image_dirs": list(s.image_dirs),
    }
    if s.insecure:
        config["insecure"] = True
    else:
        config["tls_dir"] = str(tls_dir("agent", s))
    return config


def _config_text(data: dict[str, Any]) -> str:
    return "# written by 'clonebox dev up'; it is rewritten on every start\n" + yaml.safe_dump(data, sort_keys=False)


# ------------------------------------------------------------------------------------------------ pki


def ca_dir() -> Path:
    """The dev CA's folder."""
    return state_dir() / "pki" / "ca"


def tls_dir(kind: str, s: DevSettings) -> Path:
    """The TLS folder of ``kind`` (controller, agent, user)."""
    if kind == "agent" and _running_as_root():
        return Path(s.data_dir) / "tls"  # next to the agent's state, out of /root
    return state_dir() / "tls" / kind


def _user_name() -> str:
    """The login of the user running dev up, as a DNS label (the name in the dev admin certificate)."""
    try:
        login = getpass.getuser()
    except (KeyError, OSError):  # pragma: no cover - no passwd entry
        login = ""
    label = re.sub(r"[^a-z0-9-]+", "-", login.lower()).strip("-")[:63].strip("-")
    return label or "dev"


def dev_identities(s: DevSettings, trust_domain: str = DEV_TRUST_DOMAIN) -> dict[str, Identity]:
    """File name -> identity of the three dev leaves."""
    return {
        "controller": make_identity(trust_domain, "controller", DEV_CONTROLLER_NAME),
        "agent": make_identity(trust_domain, "agent", s.host_name),
        "user": make_identity(trust_domain, "user", _user_name(), "admin"),
    }


def _leaf_is_usable(ca: CertificateAuthority, tls: TlsFiles, identity: Identity) -> bool:
    """Issued by this CA for this identity, with its key, and not yet due for renewal."""
    if not tls.exists():
        return False
    try:
        ca_pem, pem, key = tls.load()
        cert = x509.load_pem_x509_certificate(pem)
        cert.verify_directly_issued_by(ca.cert)
        same = identity_of(cert).spiffe_id == identity.spiffe_id
    except (CloneboxError, OSError, ValueError, TypeError, InvalidSignature):
        return False
    now = datetime.now(UTC)
    return same and ca_pem == ca.cert_pem and key_matches(pem, key) and now < tls.renew_at()


def ensure_pki(s: DevSettings) -> list[str]:
    """Make the dev PKI, or complete and refresh it; returns what was created (``ca``, ``agent``...)."""
    made: list[str] = []
    try:
        ca = CertificateAuthority.load(ca_dir())
    except NotFound:
        ca = CertificateAuthority.init(ca_dir(), DEV_TRUST_DOMAIN)
        made.append("ca")
    for kind, identity in dev_identities(s, ca.trust_domain).items():
        folder = tls_dir(kind, s)
        tls = TlsFiles.in_folder(folder, kind)
        if _leaf_is_usable(ca, tls, identity):
            continue
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o700)
        issued = ca.issue(identity, seconds=DEV_CERT_SECONDS)
        assert issued.key is not None
        write_public(tls.ca, ca.cert_pem)
        credentials.install(tls, key_pem(issued.key), cert_pem(issued.cert))
        made.append(kind)
    return made


def client_transport(s: DevSettings) -> Transport:
    """How ``dev`` itself talks to its daemons: as the dev admin user, or plaintext."""
    if s.insecure:
        return Transport(None, insecure=True)
    return Transport(TlsFiles.in_folder(tls_dir("user", s), "user"))


# -------------------------------------------------------------------------------------------- daemons


@dataclass(frozen=True)
class Daemon:
    """One of the two background processes and its files."""

    kind: str
    module: str
    address: str
    config: Path
    log: Path
    pid_file: Path
    #: how dev talks to it (health checks) and the name its certificate carries
    transport: Transport
    server_name: str | None = None


def daemons(s: DevSettings) -> list[Daemon]:
    """Return the controller and the agent, in start order."""
    st, cfg = state_dir(), config_dir()
    transport = client_transport(s)
    names = {k: None if s.insecure else server_name(i) for k, i in dev_identities(s).items() if k != "user"}
    return [
        Daemon(
            kind, module, address, cfg / f"{kind}.yaml", st / f"{kind}.log", st / f"{kind}.pid", transport, names[kind]
        )
        for kind, module, address in (
            ("controller", CONTROLLER_MODULE, s.controller_address),
            ("agent", AGENT_MODULE, s.agent_address),
        )
    ]


def _daemon_argv(module: str, config: Path) -> list[str]:
    return [sys.executable, "-m", module, "--config", str(config)]


def _read_pid(path: Path) -> int | None:
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid > 0 else None


def pid_running(pid: int, marker: str) -> bool:
    """
    Tell whether ``pid`` is a live process whose command line contains ``marker`` (our config).

    The marker guards against pid reuse: a stale pid file must never make us signal someone else's
    process. Zombies count as gone.
    """
    proc = Path("/proc") / str(pid)
    if Path("/proc/self").exists():
        try:
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            return False
        fields = stat.rsplit(")", 1)[-1].split()
        if fields and fields[0] in ("Z", "X"):
            return False
        return marker.encode() in cmdline
    try:  # pragma: no cover - no /proc (not Linux): trust the pid
        os.kill(pid, 0)
    except ProcessLookupError:  # pragma: no cover
        return False
    except PermissionError:  # pragma: no cover
        return True
    return True  # pragma: no cover


#: what check_health reports when a server answers but the TLS handshake fails
TLS_ERROR = "TLS_ERROR"


def check_health(address: str, transport: Transport, server_name: str | None = None, timeout: float = 1.0) -> str:
    """
    ``grpc.health.v1`` status of the whole server at ``address``, over ``transport``.

    ``DOWN`` when nothing answers (or our TLS files are missing), ``TLS_ERROR`` when something answers
    but the handshake fails (another PKI, plaintext against TLS or the reverse).
    """
    try:
        channel = sync_channel(address, transport, server_name)
    except CloneboxError:
        return "DOWN"
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            peer = credentials.Peer(address, transport.tls, server_name or "", transport.tls is None)
            if credentials.handshake_failure(exc.details() or "", peer) is not None:
                return TLS_ERROR
        return "DOWN"
    finally:
        channel.close()


@dataclass
class DaemonStatus:
    """What ``dev status`` reports about one daemon."""

    kind: str
    address: str
    pid: int | None
    health: str
    log: str
    config: str

    @property
    def alive(self) -> bool:
        """Our process is running (whatever it answers)."""
        return self.pid is not None


def daemon_status(d: Daemon) -> DaemonStatus:
    """Pid (only when it is really our process), health of its address, files."""
    pid = _read_pid(d.pid_file)
    if pid is not None and not pid_running(pid, str(d.config)):
        pid = None
    health = check_health(d.address, d.transport, d.server_name)
    return DaemonStatus(d.kind, d.address, pid, health, str(d.log), str(d.config))


def _signal(pid: int, sig: int) -> None:
    try:
        # each daemon leads its own session (start_new_session): signal the group so helpers it spawned
        # (qemu-img, ...) go with it
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _wait_gone(pid: int, marker: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while pid_running(pid, marker):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def terminate(pid: int, marker: str, grace: float = STOP_GRACE_SECONDS) -> bool:
    """SIGTERM, then SIGKILL after ``grace`` seconds; True when SIGKILL was needed."""
    _signal(pid, signal.SIGTERM)
    if _wait_gone(pid, marker, grace):
        return False
    _signal(pid, signal.SIGKILL)
    _wait_gone(pid, marker, 5.0)
    return True


def _last_log_line(path: Path) -> str:
    """Return the last meaningful log line (a JSON record's message), for one-line errors."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            lines = [ln.strip() for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    lines = [ln for ln in lines if not ln.startswith("--- ")]
    if not lines:
        return ""
    line = lines[-1]
    try:
        record = json.loads(line)
        if isinstance(record, dict) and "msg" in record:
            line = str(record["msg"]) + (f": {record['error']}" if record.get("error") else "")
    except ValueError:
        pass
    return line if len(line) <= 200 else line[:197] + "..."


def _spawn(d: Daemon) -> subprocess.Popen[bytes]:
    argv = _daemon_argv(d.module, d.config)
    with d.log.open("ab") as log:
        log.write(f"--- {datetime.now(UTC).isoformat()} clonebox dev up: {shlex.join(argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # survives the CLI and its terminal; stopped as a group
            close_fds=True,
            cwd=str(state_dir()),
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    d.pid_file.write_text(f"{proc.pid}\n")
    return proc


def _disown(proc: subprocess.Popen[bytes]) -> None:
    """Stop tracking a daemon that is meant to outlive the CLI."""
    if proc.poll() is None:
        # Popen warns (ResourceWarning) when an object whose child still runs is collected; for a
        # daemon that is the point. The CLI exits right after, and init reaps the daemon eventually.
        proc.returncode = 0


def _wait_serving(d: Daemon, proc: subprocess.Popen[bytes] | None, deadline: float, hint: str = "") -> None:
    health = "DOWN"
    while True:
        if proc is not None and (code := proc.poll()) is not None:
            last = _last_log_line(d.log)
            raise Unavailable(
                f"{d.kind} exited with code {code} while starting" + (f": {last}" if last else "") + f" (log: {d.log})",
                reason="DEV_DAEMON_EXITED",
                metadata={"log": str(d.log)},
            )
        health = check_health(d.address, d.transport, d.server_name)
        if health == "SERVING":
            return
        if time.monotonic() >= deadline:
            extra = f"; {hint}" if hint and health == "NOT_SERVING" else ""
            if health == TLS_ERROR:
                extra = (
                    f"; the TLS handshake fails: it does not use the dev PKI in {ca_dir().parent} "
                    "(run 'clonebox dev down', then 'clonebox dev up')"
                )
            raise DeadlineExceeded(
                f"{d.kind} at {d.address} is {health}, not SERVING, after waiting{extra} (log: {d.log})",
                reason="DEV_DAEMON_NOT_SERVING",
                metadata={"log": str(d.log)},
            )
        time.sleep(0.2)


def _wait_host_ready(s: DevSettings, agent_log: Path, deadline: float) -> host_pb2.Host:
    client = ControllerClient(s.controller_address, client_transport(s), timeout=2.0, attempts=1)
    last = "not registered yet"
    try:
        while True:
            try:
                response: hosts_pb2.ListHostsResponse = client.call(
                    client.hosts.ListHosts, hosts_pb2.ListHostsRequest()
                )
                for host in response.hosts:
                    if host.name == s.host_name:
                        if host.state == host_pb2.HOST_STATE_READY:
                            return host
                        last = host_pb2.HostState.Name(host.state)
            except CloneboxError as err:
                last = err.message
            if time.monotonic() >= deadline:
                hint = ""
                if last == "HOST_STATE_NOT_SERVING":
                    hint = f"; libvirt at {s.libvirt_uri} does not answer: start it ({_LIBVIRT_SCRIPT})"
                raise DeadlineExceeded(
                    f"host {s.host_name} is not READY in the controller ({last}){hint} (agent log: {agent_log})",
                    reason="DEV_HOST_NOT_READY",
                    metadata={"log": str(agent_log)},
                )
            time.sleep(0.3)
    finally:
        client.close()


def _make_dir(path: Path, *, traversable: bool) -> None:
    missing = [p for p in (path, *path.parents) if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    if traversable:
        # QEMU runs as libvirt-qemu and must traverse to overlays, seed ISOs and images; mkdir's mode is
        # cut by the umask, so set it explicitly on what we created (existing directories are left alone)
        for created in missing:
            created.chmod(0o755)


def _prepare_dirs(s: DevSettings) -> None:
    data = Path(s.data_dir)
    private = [state_dir(), config_dir()]
    shared = [data / "agent", data / "storage", *map(Path, s.image_dirs)]
    for path in [*private, *shared]:
        try:
            _make_dir(path, traversable=path in shared)
        except OSError as exc:
            raise FailedPrecondition(
                f"cannot create {path}: {exc.strerror} (choose another place with --data-dir/--image-dir)",
                reason="DEV_DIR",
            ) from None


def _ensure_pki_or_fail(s: DevSettings) -> list[str]:
    try:
        return ensure_pki(s)
    except OSError as exc:
        raise FailedPrecondition(
            f"cannot write the dev PKI under {state_dir()}: {exc.strerror or exc}", reason="DEV_PKI"
        ) from None


def _ensure_running(d: Daemon, text: str, deadline: float, hint: str) -> str:
    """Start ``d`` unless it already runs with this config; returns what was done."""
    status = daemon_status(d)
    action = "started"
    if status.alive:
        assert status.pid is not None
        if status.health == "DOWN":
            # alive but silent: it may be starting right now (another dev up); give it a moment
            silent_until = time.monotonic() + _SILENT_GRACE_SECONDS
            while status.health == "DOWN" and time.monotonic() < silent_until:
                time.sleep(0.2)
                status.health = check_health(d.address, d.transport, d.server_name)
        if status.health != "DOWN":
            try:
                current = d.config.read_text()
            except OSError:
                current = ""
            if current != text:
                raise FailedPrecondition(
                    f"the {d.kind} is running (pid {status.pid}) with other settings than asked for; "
                    "run 'clonebox dev down' first to change them",
                    reason="DEV_SETTINGS_CHANGED",
                )
            _wait_serving(d, None, deadline, hint)
            return "running"
        terminate(status.pid, str(d.config))
        action = "restarted (it did not answer)"
    elif status.health != "DOWN":
        raise FailedPrecondition(
            f"something not started by 'clonebox dev up' answers at {d.address}: stop it, or choose "
            f"another port with --{d.kind}-port",
            reason="DEV_PORT_IN_USE",
        )
    d.config.write_text(text)
    proc = _spawn(d)
    try:
        _wait_serving(d, proc, deadline, hint)
    finally:
        _disown(proc)
    return action


def _status_report(ds: list[Daemon], s: DevSettings | None) -> dict[str, Any]:
    report: dict[str, Any] = {"state_dir": str(state_dir()), "config_dir": str(config_dir())}
    for d in ds:
        st = daemon_status(d)
        report[d.kind] = {
            "address": st.address,
            "pid": st.pid,
            "health": st.health,
            "log": st.log,
            "config": st.config,
        }
    host: dict[str, str] | None = None
    if s is not None and report["controller"]["health"] == "SERVING":
        client = ControllerClient(s.controller_address, client_transport(s), timeout=2.0, attempts=1)
        try:
            for h in client.call(client.hosts.ListHosts, hosts_pb2.ListHostsRequest()).hosts:
                if h.name == s.host_name:
                    host = {"name": h.name, "state": host_pb2.HostState.Name(h.state)}
        except CloneboxError:
            pass
        finally:
            client.close()
        if host is None:
            host = {"name": s.host_name, "state": "NOT_REGISTERED"}
    report["host"] = host
    if s is not None:
        report["tls"] = (
            {"insecure": True}
            if s.insecure
            else {
                "insecure": False,
                "ca_dir": str(ca_dir()),
                "user": str(tls_dir("user", s)),
                "trust_domain": DEV_TRUST_DOMAIN,
            }
        )
    return report


def _print_report(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        output.emit_json(report)
        return
    table = output.make_table("DAEMON", "ADDRESS", "PID", "HEALTH", "LOG")
    for kind in ("controller", "agent"):
        d = report[kind]
        table.add_row(kind, d["address"], str(d["pid"] or "-"), d["health"], d["log"])
    # log paths are for copying: never fold them, even on a narrow terminal
    table.columns[-1].overflow = "ignore"
    table.columns[-1].no_wrap = True
    output.console().print(table, crop=False)
    if report.get("host"):
        host = report["host"]
        typer.echo(f"host {host['name']}: {host['state'].removeprefix('HOST_STATE_')}")


# ------------------------------------------------------------------------------------------- commands


@app.command("up")
def up(
    ctx: typer.Context,
    *,
    libvirt_uri: Annotated[
        str | None, typer.Option("--libvirt-uri", help="libvirt connection URI \\[default: qemu:///system]")
    ] = None,
    hypervisor: Annotated[
        str | None, typer.Option("--hypervisor", help="libvirt or fake (in-memory) \\[default: libvirt]")
    ] = None,
    controller_port: Annotated[
        int | None, typer.Option("--controller-port", min=1, max=65535, help="\\[default: 7100]")
    ] = None,
    agent_port: Annotated[int | None, typer.Option("--agent-port", min=1, max=65535, help="\\[default: 7101]")] = None,
    host_name: Annotated[str | None, typer.Option("--host-name", help="The host's name \\[default: local]")] = None,
    domain_type: Annotated[
        str | None, typer.Option("--domain-type", help="auto, kvm or qemu (TCG) \\[default: auto]")
    ] = None,
    data_dir: Annotated[
        str | None,
        typer.Option(
            "--data-dir", help=f"Agent state and storage \\[default: {ROOT_DATA_DIR} as root, else state dir]"
        ),
    ] = None,
    image_dir: Annotated[
        list[str] | None,
        typer.Option(
            "--image-dir",
            help=f"Where images, kernels, initrds live (repeatable) \\[default: {DEFAULT_IMAGE_DIR}]",
        ),
    ] = None,
    enroll_port: Annotated[
        int | None,
        typer.Option(
            "--enroll-port",
            min=1,
            max=65535,
            help="The controller's join-token enrolment port \\[default: controller port + 1, skipping the agent's]",
        ),
    ] = None,
    insecure: Annotated[
        bool | None,
        typer.Option(
            "--insecure/--tls",
            help="Loopback plaintext instead of mTLS with the dev PKI \\[default: --tls, or what the last dev up used]",
            show_default=False,
        ),
    ] = None,
    timeout: Annotated[
        float, typer.Option("--timeout", min=1, help="Seconds to wait for everything to be ready.")
    ] = 60,
) -> None:
    """
    Start (or keep) a local controller and agent with a development PKI; wait until the host is READY.

    The first run makes a CA and certificates for the controller, the agent and you (admin) under the
    state directory; later runs reuse them, and CLI commands use your certificate by default.
    """
    out = settings(ctx)
    if insecure is None and out.insecure:
        insecure = True  # 'clonebox --insecure dev up' (or CLONEBOX_INSECURE=1)
    if hypervisor is not None and hypervisor not in ("libvirt", "fake"):
        raise typer.BadParameter("use libvirt or fake", param_hint="--hypervisor")
    if domain_type is not None and domain_type not in ("auto", "kvm", "qemu"):
        raise typer.BadParameter("use auto, kvm or qemu", param_hint="--domain-type")
    if data_dir is not None:
        data_dir = str(Path(data_dir).absolute())
    image_dirs = [str(Path(p).absolute()) for p in image_dir] if image_dir else None
    state = _load_state()
    s = _resolve(
        {
            "libvirt_uri": libvirt_uri,
            "hypervisor": hypervisor,
            "controller_port": controller_port,
            "agent_port": agent_port,
            "host_name": host_name,
            "domain_type": domain_type,
            "data_dir": data_dir,
            "image_dirs": image_dirs,
            "enroll_port": enroll_port,
            "insecure": insecure,
        },
        state.get("settings"),
    )
    check_dns_label("--host-name", s.host_name)
    if s.controller_port == s.agent_port:
        raise typer.BadParameter("the controller and the agent need different ports", param_hint="--agent-port")
    enroll = int(s.enroll_address.rpartition(":")[2])
    if not s.insecure and (enroll in (s.controller_port, s.agent_port) or enroll > 65535):
        raise typer.BadParameter(
            f"the enrolment port ({enroll}) must differ from the controller's and the agent's and be at most 65535",
            param_hint="--enroll-port",
        )
    _prepare_dirs(s)
    if not s.insecure:
        made = _ensure_pki_or_fail(s)
        if made and not out.json:
            typer.echo(f"dev PKI: issued {', '.join(made)} (in {ca_dir().parent.parent})", err=True)
        state = {
            **state,
            "tls": {"user": str(tls_dir("user", s)), "ca_dir": str(ca_dir()), "trust_domain": DEV_TRUST_DOMAIN},
        }
    else:
        state = {k: v for k, v in state.items() if k != "tls"}
    ds = daemons(s)
    texts = {"controller": _config_text(controller_config(s)), "agent": _config_text(agent_config(s))}
    deadline = time.monotonic() + timeout
    hints = {
        "controller": "",
        "agent": f"libvirt at {s.libvirt_uri} may be down (deploy/dev/start-libvirt.sh)",
    }
    actions: dict[str, str] = {}
    for d in ds:
        actions[d.kind] = _ensure_running(d, texts[d.kind], deadline, hints[d.kind])
        # record as we go, so that 'dev down' finds whatever a failure further on leaves running
        state = {
            **state,
            "settings": {**asdict(s), "image_dirs": list(s.image_dirs)},
            d.kind: {
                "address": d.address,
                "pid": _read_pid(d.pid_file),
                "log": str(d.log),
                "config": str(d.config),
            },
        }
        _save_state(state)
    _wait_host_ready(s, ds[1].log, deadline)
    report = _status_report(ds, s)
    if out.json:
        output.emit_json({**report, "actions": actions})
        return
    for kind, action in actions.items():
        typer.echo(f"{kind}: {action}", err=True)
    _print_report(report, False)


@app.command("status")
def status(ctx: typer.Context) -> None:
    """Show both daemons: address, pid, health (SERVING, NOT_SERVING, DOWN), log file."""
    out = settings(ctx)
    recorded = _load_state().get("settings")
    s = _resolve({}, recorded) if isinstance(recorded, dict) else None
    _print_report(_status_report(daemons(s or _resolve({}, None)), s), out.json)


@app.command("down")
def down(ctx: typer.Context) -> None:
    """Stop both daemons (SIGTERM, SIGKILL after 10 s); succeeds when nothing runs."""
    out = settings(ctx)
    state = _load_state()
    s = _resolve({}, state.get("settings"))
    stopped: list[dict[str, Any]] = []
    for d in reversed(daemons(s)):  # the agent first: it would only log the controller going away
        pid = _read_pid(d.pid_file)
        if pid is not None and pid_running(pid, str(d.config)):
            forced = terminate(pid, str(d.config), STOP_GRACE_SECONDS)
            stopped.append({"daemon": d.kind, "pid": pid, "forced": forced})
        d.pid_file.unlink(missing_ok=True)
        if isinstance(state.get(d.kind), dict):
            state[d.kind]["pid"] = None
    if state:
        _save_state(state)
    if out.json:
        output.emit_json({"stopped": stopped})
        return
    if not stopped:
        typer.echo("nothing was running")
    for item in stopped:
        how = f" (killed: still running {STOP_GRACE_SECONDS:g} s after SIGTERM)" if item["forced"] else ""
        typer.echo(f"stopped {item['daemon']} (pid {item['pid']}){how}")
