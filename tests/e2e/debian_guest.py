"""
The Debian cloud-init guest of ``deploy/testguest/debian`` as seen from a test: specs, qemu-ga, SSH.

Everything here talks to the guest the way an operator would: ``virsh qemu-agent-command`` for
qemu-ga (guest-exec, guest-file-*) and the real OpenSSH client (``sshpass`` for password logins).
Every wait is bounded and says what it waited for when it gives up.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from tests.realfleet import IMAGES, RealFleet

IMAGE_SUBDIR = "debian-guest"
IMAGE_DIR = IMAGES / IMAGE_SUBDIR
IMAGE_FILES = ("root.qcow2", "vmlinuz", "initrd.img")
BUILD_HINT = "run deploy/testguest/debian/build.sh or make test-full"
#: libvirt's default network, where the guests get their addresses
DEFAULT_NET = ipaddress.ip_network("192.168.122.0/24")
#: kernel command line of the image (README.md there): ext4 root without partition table, eth0
CMDLINE = "root=/dev/vda rw console=ttyS0 net.ifnames=0"

T = TypeVar("T")


def image_reason() -> str | None:
    """Why the Debian guest tests cannot run here (image not built, tools missing), or None."""
    for f in IMAGE_FILES:
        if not (IMAGE_DIR / f).exists():
            return f"Debian guest image missing {IMAGE_DIR / f} ({BUILD_HINT})"
    for tool in ("ssh", "ssh-keygen", "sshpass", "virsh"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (apt-get install openssh-client sshpass libvirt-clients)"
    return None


def kernel_file() -> str:
    """``vmlinux`` (PVH entry, faster under TCG) when the build could extract it, else ``vmlinuz``."""
    return f"{IMAGE_SUBDIR}/vmlinux" if (IMAGE_DIR / "vmlinux").exists() else f"{IMAGE_SUBDIR}/vmlinuz"


def write_spec(
    fleet: RealFleet,
    name: str,
    auth: dict[str, Any],
    *,
    network_config: dict[str, Any] | None = None,
    detach_seed: bool = False,
    memory: str = "512MiB",
) -> Path:
    """A version-2 spec file for the Debian guest in the fleet's folder."""
    cloud_init: dict[str, Any] = {"detach_seed_after_boot": detach_seed}
    if network_config is not None:
        cloud_init["network_config"] = network_config
    spec = {
        "version": 2,
        "name": name,
        "vcpus": 1,
        "memory": memory,
        "kernel_boot": {
            "kernel": kernel_file(),
            "initrd": f"{IMAGE_SUBDIR}/initrd.img",
            "cmdline": CMDLINE,
        },
        "disks": [{"name": "root", "base_image": f"{IMAGE_SUBDIR}/root.qcow2"}],
        "auth": auth,
        "cloud_init": cloud_init,
        "labels": {"suite": "e2e-debian"},
    }
    path = fleet.root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def wait_for(what: str, probe: Callable[[], T | None], timeout: float, interval: float = 2.0) -> T:
    """Call ``probe`` until it returns something other than None; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_error = ""
    while True:
        try:
            value = probe()
        except (subprocess.SubprocessError, OSError, ValueError, KeyError) as exc:
            value, last_error = None, f"{type(exc).__name__}: {exc}"
        if value is not None:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {timeout:.0f}s waiting for {what}" + (f" ({last_error})" if last_error else "")
            )
        time.sleep(interval)


def virsh(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["virsh", "-c", "qemu:///system", *args], capture_output=True, text=True, check=check, timeout=timeout
    )


@dataclass(frozen=True)
class ExecResult:
    exitcode: int
    stdout: str
    stderr: str


class GuestAgentError(Exception):
    """qemu-ga did not answer or refused the command."""


@dataclass
class Guest:
    """One VM of the fleet, reached through its libvirt domain's qemu-ga channel."""

    fleet: RealFleet
    name: str

    @property
    def domain(self) -> str:
        return f"cb-{self.name}"

    # ---- qemu-ga --------------------------------------------------------------------------------

    def agent(self, command: str, arguments: dict[str, Any] | None = None, timeout: int = 10) -> Any:
        """One qemu-ga command; its ``return``. GuestAgentError when the agent does not answer."""
        request: dict[str, Any] = {"execute": command}
        if arguments is not None:
            request["arguments"] = arguments
        r = virsh(
            "qemu-agent-command",
            self.domain,
            "--timeout",
            str(timeout),
            json.dumps(request),
            check=False,
            timeout=timeout + 30,
        )
        if r.returncode != 0:
            raise GuestAgentError(f"{command}: {r.stderr.strip()}")
        return json.loads(r.stdout)["return"]

    def agent_answers(self) -> bool | None:
        try:
            self.agent("guest-ping", timeout=5)
        except (GuestAgentError, subprocess.TimeoutExpired):
            return None
        return True

    def exec(self, argv: Sequence[str], timeout: float = 120) -> ExecResult:
        """Run ``argv`` in the guest (guest-exec) and wait for it to exit."""
        pid = self.agent("guest-exec", {"path": argv[0], "arg": list(argv[1:]), "capture-output": True})["pid"]

        def exited() -> dict[str, Any] | None:
            status = self.agent("guest-exec-status", {"pid": pid})
            return status if status.get("exited") else None

        status = wait_for(f"{' '.join(argv)} in {self.name}", exited, timeout, interval=0.5)
        decode = lambda key: base64.b64decode(status.get(key, "")).decode(errors="replace")  # noqa: E731
        return ExecResult(int(status.get("exitcode", -1)), decode("out-data"), decode("err-data"))

    def sh(self, script: str, timeout: float = 120) -> ExecResult:
        return self.exec(["/bin/sh", "-c", script], timeout=timeout)

    def read_file(self, path: str) -> bytes | None:
        """The file's content through guest-file-open/read; None when it does not exist."""
        try:
            handle = self.agent("guest-file-open", {"path": path, "mode": "r"})
        except GuestAgentError as exc:
            if "No such file" in str(exc):
                return None
            raise
        data = b""
        try:
            while True:
                chunk = self.agent("guest-file-read", {"handle": handle, "count": 65536})
                data += base64.b64decode(chunk.get("buf-b64", ""))
                if chunk.get("eof") or not chunk.get("count"):
                    return data
        finally:
            self.agent("guest-file-close", {"handle": handle})

    def cloud_init_result(self) -> dict[str, Any] | None:
        """cloud-init's /run/cloud-init/result.json (written when all stages are done), or None."""
        try:
            raw = self.read_file("/run/cloud-init/result.json")
            return None if raw is None else dict(json.loads(raw)["v1"])
        except (GuestAgentError, subprocess.TimeoutExpired, ValueError, KeyError):
            return None  # agent not up yet, or the file caught half written

    def diagnostics(self) -> str:
        """What to show when a check fails: cloud-init's view and the console log's tail."""
        out = []
        try:
            r = self.sh("cloud-init status --long; tail -n 40 /var/log/cloud-init.log", timeout=60)
            out.append(r.stdout + r.stderr)
        except (AssertionError, GuestAgentError, subprocess.SubprocessError) as exc:
            out.append(f"(guest agent: {exc})")
        log = self.fleet.storage_dir / "vms" / self.domain / "console.log"
        if log.exists():
            out.append("console:\n" + log.read_text(errors="replace")[-3000:])
        return "\n".join(out)

    # ---- addresses and domain XML ---------------------------------------------------------------

    def ipv4(self) -> str | None:
        """The guest's address on the default network as the fleet reports it (qemu-ga first)."""
        vm = self.fleet.cli_json("vm", "show", self.name)
        for source in ("agent", "lease"):
            for a in vm.get("addresses", []):
                if a.get("source") != source:
                    continue
                try:
                    ip = ipaddress.ip_address(a.get("address", ""))
                except ValueError:
                    continue
                if ip in DEFAULT_NET and ip != DEFAULT_NET.network_address + 1:
                    return str(ip)
        return None

    def dumpxml(self, inactive: bool = False) -> str:
        return virsh("dumpxml", self.domain, *(["--inactive"] if inactive else [])).stdout

    def seed_paths(self) -> list[str]:
        """Source files of the domain's cdrom devices (the NoCloud seed ISO)."""
        import xml.etree.ElementTree as ET

        root = ET.fromstring(self.dumpxml())
        return [
            src.get("file", "")
            for disk in root.iter("disk")
            if disk.get("device") == "cdrom"
            for src in disk.iter("source")
            if src.get("file")
        ]


# ---- SSH ---------------------------------------------------------------------------------------

SSH_OPTS = (
    "-o", "StrictHostKeyChecking=no",
    "-o", "UserKnownHostsFile=/dev/null",
    "-o", "LogLevel=ERROR",
    "-o", "ConnectTimeout=10",
    "-o", "IdentitiesOnly=yes",
)  # fmt: skip


def ssh_keygen(folder: Path) -> Path:
    """A new ed25519 key pair in ``folder``; returns the private key's path (``.pub`` beside it)."""
    key = folder / "id_ed25519"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "clonebox-e2e", "-f", str(key)],
        check=True, capture_output=True,
    )  # fmt: skip
    return key


def ssh_key_login(key: Path, user: str, address: str, command: str = "true") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ssh", "-i", str(key), *SSH_OPTS, "-o", "BatchMode=yes", "-o", "PasswordAuthentication=no",
         f"{user}@{address}", command],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def ssh_password_login(
    password: str, user: str, address: str, command: str = "true"
) -> subprocess.CompletedProcess[str]:
    """Password (or keyboard-interactive) authentication only, the password typed by sshpass."""
    env = {**os.environ, "SSHPASS": password}
    return subprocess.run(
        ["sshpass", "-e", "ssh", *SSH_OPTS, "-o", "PubkeyAuthentication=no",
         "-o", "PreferredAuthentications=password,keyboard-interactive", "-o", "NumberOfPasswordPrompts=1",
         f"{user}@{address}", command],
        capture_output=True, text=True, timeout=120, check=False, env=env,
    )  # fmt: skip


def wait_ssh_port(address: str, timeout: float) -> None:
    """Until sshd accepts TCP connections on ``address``:22."""
    import socket

    def probe() -> bool | None:
        try:
            with socket.create_connection((address, 22), timeout=3) as s:
                return True if s.recv(64).startswith(b"SSH-") else None
        except OSError:
            return None

    wait_for(f"sshd on {address}:22", probe, timeout, interval=1.0)
