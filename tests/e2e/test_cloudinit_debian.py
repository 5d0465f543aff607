"""
Real cloud-init, end to end: version-2 specs -> CLI -> controller -> agent -> NoCloud seed -> a real
Debian 12 guest (``deploy/testguest/debian``), checked from outside with qemu-ga and OpenSSH.

Three VMs boot at the same time (one per login method; under TCG a boot to "cloud-init done" takes
1.5-4 minutes, so they share the wait):

- ``key``: ``ssh_key`` with a key made here, a static address from ``network_config``, and
  ``detach_seed_after_boot``;
- ``pw``: ``password`` from an ``env:`` reference, DHCP, the seed left attached; brought up by
  ``clonebox up`` as the one service of a plan that mounts a plan volume (cloud-init's ``fs_setup``
  and ``mounts`` on a real guest);
- ``otp``: ``one_time_password``, DHCP.

Marked ``full``: it needs the Debian image (``deploy/testguest/debian/build.sh``) and takes minutes,
so ``make test-full`` runs it, not ``make test``. Without the image every test skips with the reason.
"""

from __future__ import annotations

import ipaddress
import os
import random
import re
import secrets
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.e2e.debian_guest import (
    DEFAULT_NET,
    Guest,
    image_reason,
    ssh_key_login,
    ssh_keygen,
    ssh_password_login,
    virsh,
    wait_for,
    wait_ssh_port,
    write_spec,
)
from tests.realfleet import RealFleet, running_fleet

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.libvirt,
    pytest.mark.full,
    # the first test also pays for the fleet, the three creates and a whole TCG boot
    pytest.mark.timeout(1500),
]

USER = "dev"
#: the plan volume of "pw" and where the plan mounts it
VOLUME = "data"
VOLUME_MOUNT = "/srv/data"
PASSWORD_ENV = "CLONEBOX_E2E_VM_PASSWORD"
#: boot to "cloud-init done" under TCG, three guests at once on a 2-core host: 1.5-4 min measured
BOOT_TIMEOUT = float(os.environ.get("CLONEBOX_E2E_BOOT_TIMEOUT", "900"))
#: how long the agent may take to detach and delete the seed once cloud-init is done
DETACH_TIMEOUT = 120.0


@dataclass
class Booted:
    """A guest whose cloud-init finished, with what was measured on the way."""

    guest: Guest
    result: dict[str, object]
    agent_seconds: float
    done_seconds: float


@dataclass
class Lab:
    fleet: RealFleet
    key: Path
    password: str
    otp: str
    static_ip: str
    guests: dict[str, Guest]
    created_at: dict[str, float]
    seeds: dict[str, list[str]]
    booted: dict[str, Booted] = field(default_factory=dict)

    def boot(self, *roles: str) -> Booted:
        """
        Wait (once per guest) until qemu-ga answers and cloud-init has written result.json.

        The guests boot at the same time, so they are polled together (each one's timings are its
        own); returns the first role's.
        """
        pending = [r for r in roles if r not in self.booted]
        agent_at: dict[str, float] = {}
        deadline = max(self.created_at[r] for r in roles) + BOOT_TIMEOUT
        while pending:
            for role in list(pending):
                guest = self.guests[role]
                if role not in agent_at:
                    if not guest.agent_answers():
                        continue
                    agent_at[role] = time.monotonic()
                result = guest.cloud_init_result()
                if result is None:
                    continue
                start = self.created_at[role]
                booted = Booted(guest, result, agent_at[role] - start, time.monotonic() - start)
                self.booted[role] = booted
                pending.remove(role)
                print(
                    f"\n[timing] {guest.name}: qemu-ga after {booted.agent_seconds:.0f}s, "
                    f"cloud-init done after {booted.done_seconds:.0f}s"
                )
            if pending and time.monotonic() > deadline:
                late = self.guests[pending[0]]
                what = "cloud-init done" if pending[0] in agent_at else "qemu-ga"
                raise AssertionError(
                    f"timed out after {BOOT_TIMEOUT:.0f}s waiting for {what} in {late.name}\n{late.diagnostics()}"
                )
            if pending:
                time.sleep(2.0)
        return self.booted[roles[0]]

    def address(self, role: str) -> str:
        if role == "key":
            return self.static_ip
        guest = self.guests[role]
        return wait_for(f"an address of {guest.name} on {DEFAULT_NET}", guest.ipv4, 120)


def _free_static_ip() -> str:
    """An address of the default network's upper range that no current DHCP lease holds."""
    leases = virsh("net-dhcp-leases", "default", check=False).stdout
    taken = set(re.findall(r"(192\.168\.122\.\d+)/", leases))
    candidates = [str(DEFAULT_NET.network_address + n) for n in range(200, 253)]
    free = [ip for ip in candidates if ip not in taken]
    random.shuffle(free)
    for ip in free:
        # nobody answers on it right now (a guest with a static address has no lease): an alive host
        # accepts or refuses the connection, a free address times out or is unreachable
        with socket.socket() as s:
            s.settimeout(1.5)
            try:
                s.connect((ip, 22))
            except ConnectionRefusedError:
                continue
            except OSError:
                return ip
    pytest.fail("no free address in 192.168.122.200-252 for the static network-config test")


def plan_text(name: str, spec: Path) -> str:
    """A plan ``name`` of one service ``pw`` (the VM ``<name>-pw`` of ``spec``) with a volume at VOLUME_MOUNT."""
    return (
        f"version: 1\nname: {name}\n"
        f"volumes:\n  {VOLUME}: {{size: 64MiB}}\n"
        # networks: [] keeps the spec's network (libvirt's default), where the tests look for its address
        f"vms:\n  pw:\n    config: {spec.name}\n    networks: []\n    volumes: ['{VOLUME}:{VOLUME_MOUNT}']\n"
    )


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    reason = image_reason()
    if reason:
        pytest.skip(reason)
    with running_fleet() as fleet:
        fleet_t0 = time.monotonic()
        key = ssh_keygen(fleet.root)
        password = secrets.token_urlsafe(18)
        fleet.env[PASSWORD_ENV] = password
        static_ip = _free_static_ip()
        names = {role: f"{fleet.host}-{role}" for role in ("key", "pw", "otp")}
        specs = {
            "key": write_spec(
                fleet,
                names["key"],
                {"user": USER, "method": "ssh_key", "ssh_keys": [key.with_suffix(".pub").read_text().strip()]},
                network_config={
                    "version": 2,
                    "ethernets": {
                        "eth0": {
                            "addresses": [f"{static_ip}/24"],
                            "routes": [{"to": "0.0.0.0/0", "via": "192.168.122.1"}],
                            "nameservers": {"addresses": ["192.168.122.1"]},
                            "mtu": 1400,
                        }
                    },
                },
                detach_seed=True,
            ),
            "pw": write_spec(
                fleet, names["pw"], {"user": USER, "method": "password", "password": f"env:{PASSWORD_ENV}"}
            ),
            "otp": write_spec(fleet, names["otp"], {"user": USER, "method": "one_time_password"}),
        }
        guests = {role: Guest(fleet, name) for role, name in names.items()}
        created_at: dict[str, float] = {}
        seeds: dict[str, list[str]] = {}
        otp = ""
        # "pw" comes up through a one-VM plan (named as the host, so its VM is named as the others) that
        # attaches a plan volume mounted at VOLUME_MOUNT: cloud-init formats and mounts it on a real guest
        plan = fleet.root / "clonebox-compose.yaml"
        plan.write_text(plan_text(fleet.host, specs["pw"]))
        try:
            for role, spec in specs.items():
                if role == "pw":
                    fleet.cli("up", "-f", str(plan), timeout=600)
                    doc = fleet.cli_json("vm", "show", names[role])
                else:
                    doc = fleet.cli_json("vm", "create", "-f", str(spec), "--wait")
                created_at[role] = time.monotonic()
                assert doc["state"] == "VM_STATE_RUNNING", doc
                if role == "otp":
                    otp = doc.get("one_time_password", "")
                    assert otp, f"vm create -o json must print the one-time password once: {sorted(doc)}"
                else:
                    assert "one_time_password" not in doc
                # right after the start the seed is attached: remember where it is
                seeds[role] = guests[role].seed_paths()
            print(f"\n[timing] fleet up and 3 VMs created in {time.monotonic() - fleet_t0:.0f}s")
            yield Lab(fleet, key, password, otp, static_ip, guests, created_at, seeds)
        finally:
            fleet.cli("down", fleet.host, "--volumes", check=False, timeout=600)
            for name in names.values():
                fleet.cli("vm", "delete", name, "--wait", check=False)
            print(f"\n[timing] whole module {time.monotonic() - fleet_t0:.0f}s")


def test_cloud_init_done_without_errors(lab: Lab) -> None:
    lab.boot("key", "pw", "otp")
    for role in ("key", "pw", "otp"):
        booted = lab.boot(role)
        guest = booted.guest
        assert booted.result.get("errors") == [], f"cloud-init reported errors:\n{guest.diagnostics()}"
        assert "NoCloud" in str(booted.result.get("datasource")), booted.result
        status = guest.exec(["cloud-init", "status", "--long"])
        assert "status: done" in status.stdout, status.stdout + status.stderr
        # meta-data's local-hostname is the VM name
        assert guest.exec(["hostname"]).stdout.strip() == guest.name


def test_seed_detached_and_deleted_after_cloud_init_done(lab: Lab) -> None:
    seeds = lab.seeds["key"]
    assert len(seeds) == 1 and seeds[0].endswith(".iso"), f"one seed ISO attached at start: {seeds}"
    seed = seeds[0]
    booted = lab.boot("key")
    guest = booted.guest

    def gone() -> bool | None:
        live, persistent = guest.dumpxml(), guest.dumpxml(inactive=True)
        return True if seed not in live and seed not in persistent and not os.path.exists(seed) else None

    try:
        wait_for(f"{seed} detached from {guest.domain} and deleted", gone, DETACH_TIMEOUT, interval=2.0)
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}: still in live XML={seed in guest.dumpxml()}, persistent XML="
            f"{seed in guest.dumpxml(inactive=True)}, file exists={os.path.exists(seed)}"
        ) from None
    since_done = time.monotonic() - (lab.created_at["key"] + booted.done_seconds)
    print(f"\n[timing] seed of {guest.name} gone at most {since_done:.0f}s after cloud-init done")
    # the guest keeps running and answering after the eject
    assert guest.agent_answers()
    # without detach_seed_after_boot the seed stays
    kept = lab.boot("pw").guest
    assert lab.seeds["pw"] and kept.seed_paths() == lab.seeds["pw"]
    assert os.path.exists(lab.seeds["pw"][0])


def test_ssh_key_login_works_and_password_login_is_refused(lab: Lab) -> None:
    guest = lab.boot("key").guest
    address = lab.address("key")
    wait_ssh_port(address, 120)
    r = ssh_key_login(lab.key, USER, address, "id -un; sudo -n true && echo sudo-ok")
    assert r.returncode == 0, f"ssh -i key {USER}@{address} failed ({r.returncode}): {r.stderr}"
    assert r.stdout.split() == [USER, "sudo-ok"], r.stdout

    # the server does not even offer password authentication
    r = ssh_password_login("any-password-at-all", USER, address)
    assert r.returncode != 0, "password login must be refused for ssh_key"
    assert "Permission denied (publickey)" in r.stderr, r.stderr

    effective = guest.exec(["sshd", "-T"])
    assert effective.exitcode == 0, effective.stderr
    assert "passwordauthentication no" in effective.stdout.splitlines()
    written = guest.sh("grep -rhi '^[[:space:]]*PasswordAuthentication' /etc/ssh/sshd_config /etc/ssh/sshd_config.d/")
    assert written.stdout.split()[:2] == ["PasswordAuthentication", "no"], written.stdout
    # and the account has no usable password
    assert guest.exec(["passwd", "-S", USER]).stdout.split()[1] == "L"


def test_password_login_with_the_referenced_password(lab: Lab) -> None:
    guest = lab.boot("pw").guest
    address = lab.address("pw")
    wait_ssh_port(address, 120)
    r = ssh_password_login(lab.password, USER, address, "id -un")
    assert r.returncode == 0, f"sshpass ssh {USER}@{address} failed ({r.returncode}): {r.stderr}"
    assert r.stdout.strip() == USER
    wrong = ssh_password_login(lab.password + "x", USER, address)
    assert wrong.returncode != 0
    assert "Permission denied" in wrong.stderr, wrong.stderr
    # only a one-time password expires
    chage = guest.exec(["chage", "-l", USER]).stdout
    assert "password must be changed" not in chage, chage


def test_a_plan_volume_is_formatted_and_mounted_where_the_plan_says(lab: Lab) -> None:
    guest = lab.boot("pw").guest
    # the volume's disk, found by the serial the plan renders into cloud-init (vol-<plan>-<volume>)
    device = f"/dev/disk/by-id/virtio-vol-{lab.fleet.host}-{VOLUME}"[: len("/dev/disk/by-id/virtio-") + 20]
    found = guest.sh(f"readlink -f {device} && findmnt -n -o SOURCE,FSTYPE,OPTIONS {VOLUME_MOUNT}")
    assert found.exitcode == 0, f"{found.stdout}{found.stderr}\n{guest.diagnostics()}"
    disk, mount = found.stdout.strip().splitlines()
    source, fstype, options = mount.split()
    assert (source, fstype) == (disk, "ext4"), found.stdout
    assert "rw" in options.split(","), options
    # the agent's volume is that disk, and the guest writes to it
    volume = f"{lab.fleet.host}-{VOLUME}"
    assert volume in guest.dumpxml(), f"the domain attaches no disk of volume {volume}"
    wrote = guest.sh(f"echo kept > {VOLUME_MOUNT}/probe && sync && cat {VOLUME_MOUNT}/probe")
    assert (wrote.exitcode, wrote.stdout.strip()) == (0, "kept"), wrote.stderr
    # fstab has it (nofail), so it is mounted again at the next boot
    fstab = guest.exec(["cat", "/etc/fstab"]).stdout
    assert VOLUME_MOUNT in fstab and "nofail" in fstab, fstab


def test_one_time_password_is_expired(lab: Lab) -> None:
    guest = lab.boot("otp").guest
    chage = guest.exec(["chage", "-l", USER])
    assert chage.exitcode == 0, chage.stderr
    assert re.search(r"^Last password change\s*:\s*password must be changed$", chage.stdout, re.M), chage.stdout

    # the password is accepted once, and the first thing the user must do is change it
    address = lab.address("otp")
    wait_ssh_port(address, 120)
    r = ssh_password_login(lab.otp, USER, address)
    assert "Permission denied" not in r.stderr, f"the one-time password was refused: {r.stderr}"
    assert r.returncode != 0, "a command must not run before the expired password is changed"
    assert re.search(r"expired|change your password|password change required", r.stderr, re.I), r.stderr


def test_network_config_is_applied(lab: Lab) -> None:
    guest = lab.boot("key").guest
    addr = guest.exec(["ip", "-4", "-o", "addr", "show", "dev", "eth0"]).stdout
    assert f"inet {lab.static_ip}/24" in addr, addr
    link = guest.exec(["ip", "-o", "link", "show", "dev", "eth0"]).stdout
    assert " mtu 1400 " in link, link
    route = guest.exec(["ip", "-4", "route", "show", "default"]).stdout
    assert "default via 192.168.122.1 dev eth0" in route, route
    # no DHCP address besides the static one
    assert len(re.findall(r"\binet ", addr)) == 1, addr
    # the fleet sees the address too (from qemu-ga)
    assert ipaddress.ip_address(lab.static_ip) in DEFAULT_NET
    assert wait_for(f"{lab.static_ip} in vm show", lab.guests["key"].ipv4, 60) == lab.static_ip
