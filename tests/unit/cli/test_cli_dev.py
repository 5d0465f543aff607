"""``clonebox dev up|status|down`` with stand-in daemons (tests/unit/cli/fake_daemon.py).

The real daemons are exercised by the e2e suite; here the stand-ins serve grpc.health.v1 (and a
HostService) over mTLS with the dev PKI, so the process handling is tested for real: pid files,
idempotent restarts, health waits over TLS, SIGTERM then SIGKILL, the dev PKI, and the config files,
which are checked against the daemons' own models.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from cryptography import x509
from grpc_health.v1 import health, health_pb2_grpc
from typer.testing import CliRunner, Result

from clonebox_agent.config import AgentConfig
from clonebox_cli import dev
from clonebox_cli.main import app
from clonebox_controller.config import ControllerConfig
from clonebox_core.rpc.tls import TlsFiles, key_matches
from clonebox_core.security.pki import identity_of

FAKE_DAEMON = Path(__file__).with_name("fake_daemon.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Dev:
    """Runs ``clonebox dev ...`` in a private XDG tree with stand-in daemons."""

    def __init__(self, runner: CliRunner, tmp_path: Path) -> None:
        self.runner = runner
        self.tmp_path = tmp_path
        self.controller_port, self.agent_port = free_port(), free_port()
        while self.agent_port == self.controller_port:
            self.agent_port = free_port()
        self.args = [
            "--controller-port", str(self.controller_port),
            "--agent-port", str(self.agent_port),
            "--image-dir", str(tmp_path / "images"),
            "--hypervisor", "fake",
            "--timeout", "20",
        ]  # fmt: skip

    def __call__(self, *args: str) -> Result:
        return self.runner.invoke(app, ["dev", *args])

    def up(self, *extra: str) -> Result:
        return self("up", *self.args, *extra)

    def status(self) -> dict[str, Any]:
        result = self.runner.invoke(app, ["-o", "json", "dev", "status"])
        assert result.exit_code == 0, result.output
        data: dict[str, Any] = json.loads(result.stdout)
        return data

    def pid(self, kind: str) -> int:
        return int((dev.state_dir() / f"{kind}.pid").read_text())


@pytest.fixture
def devenv(runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Dev]:
    monkeypatch.setattr(
        dev,
        "_daemon_argv",
        lambda module, config: [sys.executable, str(FAKE_DAEMON), module, "--config", str(config)],
    )
    monkeypatch.setattr(dev, "_running_as_root", lambda: False)
    monkeypatch.setattr(dev, "_SILENT_GRACE_SECONDS", 0.5)
    monkeypatch.setattr(dev, "STOP_GRACE_SECONDS", 1.0)
    d = Dev(runner, tmp_path)
    try:
        yield d
    finally:
        monkeypatch.delenv("FAKE_DAEMON_IGNORE_TERM", raising=False)
        d("down")


def wait_gone(pid: int, marker: str) -> None:
    deadline = time.monotonic() + 10
    while dev.pid_running(pid, marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not dev.pid_running(pid, marker)


def test_up_status_down(devenv: Dev, tmp_path: Path) -> None:
    result = devenv.up()
    assert result.exit_code == 0, result.output
    assert "controller: started" in result.stderr and "agent: started" in result.stderr
    assert "host local: READY" in result.stdout

    status = devenv.status()
    for kind, port in (("controller", devenv.controller_port), ("agent", devenv.agent_port)):
        assert status[kind]["health"] == "SERVING"
        assert status[kind]["address"] == f"127.0.0.1:{port}"
        assert status[kind]["pid"] == devenv.pid(kind)
        assert Path(status[kind]["log"]).read_text().startswith("--- ")
    assert status["host"] == {"name": "local", "state": "HOST_STATE_READY"}
    assert status["state_dir"] == str(tmp_path / "state" / "clonebox" / "dev")

    # the CLI now talks to the recorded controller without --controller
    hosts = devenv.runner.invoke(app, ["-o", "json", "host", "list"])
    assert json.loads(hosts.stdout)["hosts"][0]["name"] == "local"

    pids = {kind: devenv.pid(kind) for kind in ("controller", "agent")}
    result = devenv("down")
    assert result.exit_code == 0, result.output
    assert f"stopped agent (pid {pids['agent']})" in result.stdout
    assert f"stopped controller (pid {pids['controller']})" in result.stdout
    assert not (dev.state_dir() / "agent.pid").exists()
    for kind, pid in pids.items():
        assert not dev.pid_running(pid, str(dev.config_dir() / f"{kind}.yaml"))
    status = devenv.status()
    assert status["controller"]["health"] == "DOWN" and status["controller"]["pid"] is None

    again = devenv("down")
    assert again.exit_code == 0 and "nothing was running" in again.stdout


def test_config_files_are_valid_for_the_daemons(devenv: Dev, tmp_path: Path) -> None:
    assert devenv.up("--host-name", "devbox", "--libvirt-uri", "test:///default").exit_code == 0
    agent = AgentConfig.model_validate(yaml.safe_load((dev.config_dir() / "agent.yaml").read_text()))
    controller = ControllerConfig.model_validate(yaml.safe_load((dev.config_dir() / "controller.yaml").read_text()))
    assert controller.listen == f"127.0.0.1:{devenv.controller_port}"
    assert controller.database_url == f"sqlite:///{dev.state_dir() / 'fleet.db'}"
    assert agent.name == "devbox"
    assert agent.listen == f"127.0.0.1:{devenv.agent_port}"
    assert agent.controller == controller.listen
    assert (agent.hypervisor, agent.libvirt_uri, agent.domain_type) == ("fake", "test:///default", "auto")
    # not root here: agent data under the state dir; images where we said
    assert agent.state_dir == str(dev.state_dir() / "agent")
    assert agent.storage_dir == str(dev.state_dir() / "storage")
    assert agent.image_dirs == [str(tmp_path / "images")]
    assert Path(agent.storage_dir).is_dir() and (tmp_path / "images").is_dir()
    assert "host devbox: READY" in devenv.runner.invoke(app, ["dev", "status"]).stdout
    # mTLS with the dev PKI; the enrolment port is the controller's + 1 (+ 2 if that is the agent's)
    pki = dev.state_dir() / "pki" / "ca"
    assert (controller.tls_dir, controller.ca_dir) == (str(dev.state_dir() / "tls" / "controller"), str(pki))
    enroll = devenv.controller_port + (2 if devenv.controller_port + 1 == devenv.agent_port else 1)
    assert controller.enroll_listen == f"127.0.0.1:{enroll}"
    assert agent.tls_dir == str(dev.state_dir() / "tls" / "agent")
    assert not controller.insecure and not agent.insecure


def test_up_makes_a_dev_pki_once_and_the_cli_uses_it(devenv: Dev) -> None:
    result = devenv.up("--host-name", "devbox")
    assert result.exit_code == 0, result.output
    assert "dev PKI: issued ca, controller, agent, user" in result.stderr
    st = dev.state_dir()
    assert (st / "pki" / "ca" / "ca.key").stat().st_mode & 0o777 == 0o600
    expected = {
        "controller": "spiffe://clonebox.local/controller/dev",
        "agent": "spiffe://clonebox.local/agent/devbox",
        "user": f"spiffe://clonebox.local/user/admin/{dev._user_name()}",
    }
    certs = {}
    for kind, spiffe_id in expected.items():
        folder = st / "tls" / kind
        files = {p.name for p in folder.iterdir() if not p.name.startswith(".")}
        assert files == {"ca.crt", f"{kind}.crt", f"{kind}.key"}
        assert folder.stat().st_mode & 0o777 == 0o700
        assert (folder / f"{kind}.key").stat().st_mode & 0o777 == 0o600
        tls = TlsFiles.in_folder(folder, kind)
        assert tls.identity().spiffe_id == spiffe_id
        assert key_matches(tls.cert.read_bytes(), tls.key.read_bytes())
        certs[kind] = tls.cert.read_bytes()
    sans = x509.load_pem_x509_certificate(certs["controller"]).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert "controller.clonebox.local" in sans.value.get_values_for_type(x509.DNSName)
    state = json.loads((st / "dev.json").read_text())
    assert state["tls"]["user"] == str(st / "tls" / "user")

    # later commands use the dev user's certificate without --tls-dir; so does dev status
    hosts = devenv.runner.invoke(app, ["-o", "json", "host", "list"])
    assert hosts.exit_code == 0, hosts.output
    status = devenv.status()
    assert status["controller"]["health"] == "SERVING" and status["agent"]["health"] == "SERVING"
    assert status["tls"] == {
        "insecure": False,
        "ca_dir": str(st / "pki" / "ca"),
        "user": str(st / "tls" / "user"),
        "trust_domain": "clonebox.local",
    }

    # idempotent: the PKI is reused as it is
    again = devenv.up()
    assert again.exit_code == 0, again.output
    assert "dev PKI" not in again.stderr
    for kind, pem in certs.items():
        assert (st / "tls" / kind / f"{kind}.crt").read_bytes() == pem

    # another host name: only the agent's certificate is issued again, for the new name
    assert devenv("down").exit_code == 0
    renamed = devenv.up("--host-name", "other")
    assert renamed.exit_code == 0, renamed.output
    assert "dev PKI: issued agent " in renamed.stderr
    agent = x509.load_pem_x509_certificate((st / "tls" / "agent" / "agent.crt").read_bytes())
    assert identity_of(agent).spiffe_id == "spiffe://clonebox.local/agent/other"
    assert (st / "tls" / "user" / "user.crt").read_bytes() == certs["user"]


def test_an_expired_or_damaged_dev_certificate_is_issued_again(devenv: Dev) -> None:
    assert devenv.up().exit_code == 0
    assert devenv("down").exit_code == 0
    user = dev.state_dir() / "tls" / "user"
    (user / "user.key").write_bytes(b"garbage")
    result = devenv.up()
    assert result.exit_code == 0, result.output
    assert "dev PKI: issued user " in result.stderr
    assert key_matches((user / "user.crt").read_bytes(), (user / "user.key").read_bytes())


def test_up_insecure_keeps_plaintext(devenv: Dev) -> None:
    result = devenv.up("--insecure")
    assert result.exit_code == 0, result.output
    controller = yaml.safe_load((dev.config_dir() / "controller.yaml").read_text())
    agent = yaml.safe_load((dev.config_dir() / "agent.yaml").read_text())
    assert controller["insecure"] is True and "tls_dir" not in controller and "ca_dir" not in controller
    assert agent["insecure"] is True and "tls_dir" not in agent
    assert not (dev.state_dir() / "pki").exists()
    # the CLI follows: plaintext to the recorded controller, no certificate needed
    hosts = devenv.runner.invoke(app, ["-o", "json", "host", "list"])
    assert hosts.exit_code == 0, hosts.output
    assert devenv.status()["tls"] == {"insecure": True}
    # remembered; switching to TLS while it runs is refused like any other change
    assert "agent: running" in devenv.up().stderr
    changed = devenv.up("--tls")
    assert changed.exit_code == 5 and "run 'clonebox dev down' first" in changed.stderr


def test_root_defaults_keep_agent_data_out_of_home(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dev, "_running_as_root", lambda: True)
    settings = dev._resolve({}, None)
    config = dev.agent_config(settings)
    assert config["state_dir"] == "/var/lib/clonebox/dev/agent"
    assert config["storage_dir"] == "/var/lib/clonebox/dev/storage"
    assert config["tls_dir"] == "/var/lib/clonebox/dev/tls"  # next to the agent's state, out of /root
    assert config["image_dirs"] == ["/var/lib/clonebox/images"]
    assert (settings.controller_port, settings.agent_port, settings.host_name) == (7100, 7101, "local")
    assert (settings.libvirt_uri, settings.hypervisor) == ("qemu:///system", "libvirt")


def test_up_is_idempotent_and_restarts_only_what_died(devenv: Dev) -> None:
    assert devenv.up().exit_code == 0
    controller, agent = devenv.pid("controller"), devenv.pid("agent")
    result = devenv.up()
    assert result.exit_code == 0, result.output
    assert "controller: running" in result.stderr and "agent: running" in result.stderr
    assert (devenv.pid("controller"), devenv.pid("agent")) == (controller, agent)

    os.kill(agent, signal.SIGKILL)
    wait_gone(agent, str(dev.config_dir() / "agent.yaml"))
    result = devenv.up()
    assert result.exit_code == 0, result.output
    assert "controller: running" in result.stderr and "agent: started" in result.stderr
    assert devenv.pid("controller") == controller and devenv.pid("agent") != agent


def test_settings_are_remembered_and_changes_refused_while_running(devenv: Dev) -> None:
    assert devenv.up("--host-name", "h1").exit_code == 0
    result = devenv("up")  # no options: the recorded ones
    assert result.exit_code == 0, result.output
    assert "agent: running" in result.stderr
    changed = devenv("up", "--host-name", "h2")
    assert changed.exit_code == 5
    assert "run 'clonebox dev down' first" in changed.stderr
    assert devenv("down").exit_code == 0
    result = devenv("up", "--host-name", "h2")
    assert result.exit_code == 0, result.output
    assert "host h2: READY" in result.stdout


def test_a_daemon_that_exits_is_reported_with_its_log(devenv: Dev, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_DAEMON_FAIL", "agent")
    result = devenv.up()
    assert result.exit_code == 9
    line = result.stderr.strip().splitlines()[-1]
    log = dev.state_dir() / "agent.log"
    expected = "error: agent exited with code 3 while starting: cannot bind 127.0.0.1: address in use"
    assert line == f"{expected} (log: {log})"
    assert devenv.status()["controller"]["health"] == "SERVING"  # what did start keeps running


def test_down_kills_what_ignores_sigterm(devenv: Dev, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_DAEMON_IGNORE_TERM", "1")
    assert devenv.up().exit_code == 0
    result = devenv("down")
    assert result.exit_code == 0
    assert "killed: still running 1 s after SIGTERM" in result.stdout
    assert devenv.status()["agent"]["pid"] is None


def test_a_stale_pid_file_never_signals_a_stranger(devenv: Dev) -> None:
    dev.state_dir().mkdir(parents=True)
    (dev.state_dir() / "controller.pid").write_text(f"{os.getpid()}\n")  # this very test process
    result = devenv("down")
    assert result.exit_code == 0 and "nothing was running" in result.stdout
    assert not (dev.state_dir() / "controller.pid").exists()


def test_something_else_on_the_port_is_refused(devenv: Dev) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{devenv.controller_port}")
    server.start()
    try:
        result = devenv.up()
    finally:
        server.stop(0)
    assert result.exit_code == 5
    assert "something not started by 'clonebox dev up' answers at" in result.stderr
    assert "--controller-port" in result.stderr


def test_status_when_nothing_ever_ran(devenv: Dev) -> None:
    status = devenv.status()
    assert status["controller"]["health"] == "DOWN" and status["agent"]["pid"] is None
    assert status["host"] is None
    table = devenv("status")
    assert table.exit_code == 0 and "DOWN" in table.stdout


def test_enrolment_port_skips_the_agent_port() -> None:
    assert dev.DevSettings().enroll_address == "127.0.0.1:7102"  # 7101 is the agent's
    assert dev.DevSettings(controller_port=7200).enroll_address == "127.0.0.1:7201"
    assert dev.DevSettings(enroll_port=9000).enroll_address == "127.0.0.1:9000"


def test_bad_options_are_usage_errors(devenv: Dev) -> None:
    assert devenv.up("--enroll-port", str(devenv.agent_port)).exit_code == 2
    assert devenv("up", "--hypervisor", "xen").exit_code == 2
    assert devenv("up", "--domain-type", "hvm").exit_code == 2
    assert devenv("up", "--controller-port", "7200", "--agent-port", "7200").exit_code == 2
    bad_name = devenv("up", "--host-name", "Bad_Name")
    assert bad_name.exit_code == 2 and "--host-name" in bad_name.stderr


def test_agent_directories_are_traversable_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        dev._make_dir(tmp_path / "a" / "b", traversable=True)
        dev._make_dir(tmp_path / "private", traversable=False)
    finally:
        os.umask(old)
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "a" / "b").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "private").stat().st_mode & 0o777 == 0o700
