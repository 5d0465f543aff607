"""Real daemons as processes on real libvirt (qemu:///system) with the tiny test guest (e2e and fault suites)."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from clonebox.controller.v1 import host_service_pb2, vm_service_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clonebox_cli.client import ControllerClient
from clonebox_cli.output import message_dict
from clonebox_core.rpc.server import Transport, sync_channel
from clonebox_core.rpc.tls import TlsFiles

IMAGES = Path(os.environ.get("CLONEBOX_TEST_IMAGES", "/var/lib/clonebox/images"))
GUEST = IMAGES / "testguest"


def libvirt_reason() -> str | None:
    """Why real-libvirt tests cannot run here, or None."""
    if shutil.which("virsh") is None:
        return "virsh not installed (run deploy/dev/install-system.sh)"
    r = subprocess.run(["virsh", "-c", "qemu:///system", "version"], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        return f"libvirtd not reachable: {r.stderr.strip()} (run deploy/dev/start-libvirt.sh)"
    for f in ("vmlinux", "initrd.img", "data.qcow2"):
        if not (GUEST / f).exists():
            return f"test guest missing {GUEST / f} (run deploy/testguest/build.sh)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_serving(address: str, log: Path, tls: TlsFiles, server_name: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    with sync_channel(address, Transport(tls), server_name) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise AssertionError(f"{address} not SERVING after {timeout}s; log:\n{log.read_text()[-3000:]}")


@dataclass
class RealFleet:
    """A controller and an agent running as processes."""

    root: Path
    controller: str
    agent: str
    storage_dir: Path
    host: str
    procs: dict[str, subprocess.Popen[bytes]]
    env: dict[str, str]

    def start_agent(self, join_token: str = "", extra_env: Mapping[str, str] | None = None) -> None:
        """Start the agent and wait until it serves; ``extra_env`` goes to this agent process only."""
        args = [sys.executable, "-m", "clonebox_agent.main", "--config", str(self.root / "agent-host" / "agent.yaml")]
        env = {**self.env, **(extra_env or {})}
        if join_token:
            env["CLONEBOX_AGENT_JOIN_TOKEN"] = join_token
        self.procs["agent"] = _start(args, self.root / "agent.log", env, append=True)
        # the agent serves only the controller: check its health as the controller would
        controller_tls = TlsFiles.in_folder(self.root / "controller-host" / "tls", "controller")
        wait_serving(self.agent, self.root / "agent.log", controller_tls, f"{self.host}.agent.e2e.test", timeout=120)

    def restart_controller(self) -> None:
        """SIGKILL the controller and start it again on the same address and database; wait until it serves."""
        proc = self.procs.pop("controller")
        proc.kill()
        proc.wait()
        chost = self.root / "controller-host"
        args = [sys.executable, "-m", "clonebox_controller.main", "--config", str(chost / "controller.yaml")]
        self.procs["controller"] = _start(args, self.root / "controller.log", self.env, append=True)
        user_tls = TlsFiles.in_folder(self.root / "user" / "tls", "user")
        wait_serving(self.controller, self.root / "controller.log", user_tls, "controller.e2e.test")

    def kill_agent(self) -> None:
        """SIGKILL: no cleanup, no goodbye to the controller."""
        proc = self.procs.pop("agent")
        proc.kill()
        proc.wait()

    def api(self) -> ControllerClient:
        """The controller's API in this process, as the admin user: for the tests' own polling of state.

        What ``clonebox -o json host list`` / ``vm list`` print (``message_dict`` of the same replies), without
        starting a CLI process (over a second each) per poll. Commands under test still go through ``cli``.
        """
        return ControllerClient(self.controller, Transport(TlsFiles.in_folder(self.root / "user" / "tls", "user")))

    def host_ready(self) -> bool:
        """The controller lists this fleet's host as READY."""
        client = self.api()
        try:
            reply = client.call(client.hosts.ListHosts, host_service_pb2.ListHostsRequest())
        finally:
            client.close()
        return any(h.name == self.host and message_dict(h).get("state") == "HOST_STATE_READY" for h in reply.hosts)

    def vm_states(self) -> dict[str, str]:
        """name -> state of every VM the controller lists (``vm list``'s ``state``, e.g. ``VM_STATE_RUNNING``)."""
        client = self.api()
        try:
            reply = client.call(client.vms.ListVms, vm_service_pb2.ListVmsRequest(page_size=1000))
        finally:
            client.close()
        return {v["name"]: v.get("state", "") for v in map(message_dict, reply.vms)}

    def cli(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        tls = str(self.root / "user" / "tls")
        cmd = [sys.executable, "-m", "clonebox_cli.main", "--controller", self.controller, "--tls-dir", tls, *args]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, env=self.env)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {r.returncode}: {r.stderr}{r.stdout}")
        return r

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli("-o", "json", *args).stdout)

    def spec_file(self, name: str, **extra: Any) -> Path:
        spec: dict[str, Any] = {
            "version": 1,
            "name": name,
            "vcpus": 1,
            "memory": "128MiB",
            "kernel_boot": {
                "kernel": "testguest/vmlinux",
                "initrd": "testguest/initrd.img",
                "cmdline": "console=ttyS0 quiet",
            },
            "disks": [{"name": "data", "base_image": "testguest/data.qcow2"}],
            "labels": {"suite": "e2e"},
        }
        spec.update(extra)
        path = self.root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(spec))
        return path


def _bootstrap_pki(chost: Path, user: Path, env: dict[str, str]) -> None:
    """What an operator does once: a CA on the controller host, its certificate, an admin user's."""
    cli = [sys.executable, "-m", "clonebox_cli.main"]
    ca = str(chost / "ca")
    for args in (
        ["pki", "init", "--ca-dir", ca, "--trust-domain", "e2e.test"],
        ["pki", "issue", "--ca-dir", ca, "--role", "controller", "--name", "ctl", "--out", str(chost / "tls")],
        [
            "pki",
            "issue",
            "--ca-dir",
            ca,
            "--role",
            "user",
            "--name",
            "ops",
            "--user-role",
            "admin",
            "--out",
            str(user / "tls"),
        ],
    ):
        r = subprocess.run(cli + args, capture_output=True, text=True, env=env, check=False)
        if r.returncode != 0:
            raise AssertionError(f"clonebox {' '.join(args)} exited {r.returncode}: {r.stderr}")


#: the PKI ``_bootstrap_pki`` made once in this process (CA folder, controller and user TLS folders)
_pki_template: list[Path] = []


def _copy_pki(chost: Path, user: Path) -> None:
    """Give a new fleet the session's PKI: made once (by the CLI, as an operator does), then copied.

    Three ``clonebox pki`` processes cost seconds per fleet; every fleet still gets its own copy of the CA
    folder (the controller issues the agent's certificate into it at enrolment), so no fleet sees another's.
    """
    if not _pki_template:
        template = Path("/var/lib/clonebox/test") / f"pki-{uuid.uuid4().hex[:8]}"
        (template / "controller-host").mkdir(parents=True, mode=0o755)
        (template / "user").mkdir(mode=0o755)
        atexit.register(shutil.rmtree, template, ignore_errors=True)
        _bootstrap_pki(template / "controller-host", template / "user", {**os.environ})
        _pki_template.append(template)
    template = _pki_template[0]
    for src, dst in (
        (template / "controller-host" / "ca", chost / "ca"),
        (template / "controller-host" / "tls", chost / "tls"),
        (template / "user" / "tls", user / "tls"),
    ):
        shutil.copytree(src, dst)


def _start(args: list[str], log: Path, env: dict[str, str], append: bool = False) -> subprocess.Popen[bytes]:
    with log.open("ab" if append else "wb") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def running_fleet(
    extra_env: Mapping[str, str] | None = None, agent_extra: Mapping[str, Any] | None = None
) -> Iterator[RealFleet]:
    """A controller and an agent as processes; ``extra_env`` is added to their environment and the CLI's.

    ``agent_extra`` adds (or overrides) keys of the agent's config file.
    """
    reason = libvirt_reason()
    if reason:
        pytest.skip(reason)
    # under /var/lib so that QEMU (user libvirt-qemu) can traverse to the overlays
    root = Path("/var/lib/clonebox/test") / f"e2e-{uuid.uuid4().hex[:8]}"
    root.mkdir(parents=True)
    os.chmod(root, 0o755)
    host = f"e2e-{uuid.uuid4().hex[:6]}"
    cport, aport, eport = free_port(), free_port(), free_port()
    controller, agent = f"127.0.0.1:{cport}", f"127.0.0.1:{aport}"
    # one folder per "machine", as on separate hosts: the controller's (with the CA), the agent's, the user's
    chost, ahost, user = root / "controller-host", root / "agent-host", root / "user"
    for d in (chost, ahost, user):
        d.mkdir(mode=0o755)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    _copy_pki(chost, user)
    (chost / "controller.yaml").write_text(
        yaml.safe_dump(
            {
                "listen": controller,
                "tls_dir": str(chost / "tls"),
                "ca_dir": str(chost / "ca"),
                "enroll_listen": f"127.0.0.1:{eport}",
                "metrics_listen": "127.0.0.1:0",  # never the default port: a dev fleet may hold it
                "database_url": f"sqlite:///{chost / 'fleet.db'}",
                "heartbeat_timeout_seconds": 5,
            }
        )
    )
    storage = ahost / "storage"
    (ahost / "agent.yaml").write_text(
        yaml.safe_dump(
            {
                "name": host,
                "listen": agent,
                "controller": controller,
                "tls_dir": str(ahost / "tls"),
                "metrics_listen": "127.0.0.1:0",
                "libvirt_uri": "qemu:///system",
                "domain_type": "auto",
                "state_dir": str(ahost / "state"),
                "storage_dir": str(storage),
                "image_dirs": [str(IMAGES)],
                "heartbeat_interval_seconds": 1,
                "stop_timeout_seconds": 30,
                **(agent_extra or {}),
            }
        )
    )
    procs: dict[str, subprocess.Popen[bytes]] = {
        "controller": _start(
            [sys.executable, "-m", "clonebox_controller.main", "--config", str(chost / "controller.yaml")],
            root / "controller.log",
            env,
        )
    }
    try:
        wait_serving(
            controller, root / "controller.log", TlsFiles.in_folder(user / "tls", "user"), "controller.e2e.test"
        )
        fleet = RealFleet(root, controller, agent, storage, host, procs, env)
        # the agent enrols with a one-time join token, as a new machine would
        token = fleet.cli_json("host", "add", host)["token"]
        fleet.start_agent(join_token=token)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if fleet.host_ready():
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"agent never registered: {(root / 'agent.log').read_text()[-3000:]}")
        yield fleet
    finally:
        for p in reversed(list(procs.values())):
            _stop(p)
        # anything a failed test left behind on libvirt is removed here, never left running
        leftover = (
            f"V='virsh -c qemu:///system'; for d in $($V list --all --name | grep -e '{host}'); do "
            "$V destroy $d; $V undefine $d --nvram --snapshots-metadata; done; "
            # managed networks this fleet's agent made (its name is the owner in the network's mark)
            "for n in $($V net-list --all --name | grep '^cb-'); do "
            f"if $V net-dumpxml $n | grep -q 'agent=\"{host}\"'; then $V net-destroy $n; $V net-undefine $n; fi; done; "
            "for p in $($V pool-list --all --name | grep '^clonebox-'); do "
            f"if $V pool-dumpxml $p | grep -q '{root}'; then $V pool-destroy $p; $V pool-undefine $p; fi; done"
        )
        subprocess.run(["bash", "-c", leftover], capture_output=True, check=False)
        if os.environ.get("CLONEBOX_KEEP_E2E") != "1":
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def real_fleet() -> Iterator[RealFleet]:
    with running_fleet() as fleet:
        yield fleet
