"""Semantic validation of a VmSpec, shared by the spec file loader, the controller and the agent.

Every check raises InvalidArgument naming the field (``spec.disks[1].size_mib``) and the fix. The
servers validate again because the API can be called without the CLI.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

from clonebox_core.errors import invalid_field
from clonebox_core.health import validate_probes
from clonebox_core.model import AuthMethod, NetworkMode, NetworkSpec, ShareDriver, VmSpec
from clonebox_core.names import check_dns_label

MAX_VCPUS = 256
MIN_MEMORY_MIB = 16
MAX_MEMORY_MIB = 4 * 1024 * 1024  # 4 TiB
MAX_DISK_MIB = 64 * 1024 * 1024  # 64 TiB
MAX_DISKS = 16
MAX_CLOUD_INIT_BYTES = 1024 * 1024
_TAG = re.compile(r"^[A-Za-z0-9_-]{1,31}$")  # 9p mount tags are at most 31 bytes
_LABEL_KEY = re.compile(r"^[a-z0-9]([a-z0-9._/-]{0,61}[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9._-]{0,63}$")
_NET_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
#: a managed network's name: what the agent may create and remove (never "default" or a network it did not make)
MANAGED_NETWORK_PREFIX = "cb-"
#: a managed network's bridge device name is derived from its name and must fit IFNAMSIZ (15)
_MANAGED_NET_NAME = re.compile(r"^cb-[a-z0-9-]{1,60}$")
#: a POSIX user name as useradd accepts it by default on Debian
_USER = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
#: SHA-512-crypt, as cloud-init's chpasswd takes it; anything else (a password pasted by mistake) is refused
PASSWORD_HASH = re.compile(r"^\$6\$(rounds=[0-9]{1,9}\$)?[./0-9A-Za-z]{1,16}\$[./0-9A-Za-z]{86}$")
PUBLIC_KEY = re.compile(
    r"^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)|sk-ssh-ed25519@openssh\.com"
    r"|sk-ecdsa-sha2-nistp256@openssh\.com) [A-Za-z0-9+/]+={0,3}( [^\x00-\x1f\x7f]*)?$"
)
_PACKAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+:=~_-]{0,127}$")
_SNAP = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")
_SERVICE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9@._:-]{0,127}$")
_GUEST_PATH = re.compile(r"^/[^\x00-\x20\x7f]*$")
MAX_PROVISION_ITEMS = 256
MAX_COMMAND_CHARS = 4096


def _check_path(field: str, value: str) -> None:
    if not value:
        raise invalid_field(field, "must not be empty")
    if "\x00" in value or "\n" in value:
        raise invalid_field(field, "must not contain NUL or newline characters")
    parts = value.split("/")
    if ".." in parts:
        raise invalid_field(field, f"{value!r} must not contain '..'")


def validate_spec(spec: VmSpec, prefix: str = "spec") -> VmSpec:
    """Return ``spec`` unchanged or raise InvalidArgument naming the first bad field."""
    check_dns_label(f"{prefix}.name", spec.name)
    if not 1 <= spec.vcpus <= MAX_VCPUS:
        raise invalid_field(f"{prefix}.vcpus", f"{spec.vcpus} is out of range: use 1..{MAX_VCPUS}")
    if not MIN_MEMORY_MIB <= spec.memory_mib <= MAX_MEMORY_MIB:
        raise invalid_field(
            f"{prefix}.memory_mib",
            f"{spec.memory_mib} MiB is out of range: use {MIN_MEMORY_MIB} MiB .. 4 TiB",
        )
    if len(spec.disks) > MAX_DISKS:
        raise invalid_field(f"{prefix}.disks", f"at most {MAX_DISKS} disks")
    seen: set[str] = set()
    volumes: set[str] = set()
    for i, d in enumerate(spec.disks):
        f = f"{prefix}.disks[{i}]"
        check_dns_label(f"{f}.name", d.name)
        if d.name in seen:
            raise invalid_field(f"{f}.name", f"duplicate disk name {d.name!r}")
        seen.add(d.name)
        if d.volume:
            _check_volume_disk(f, d.volume, d.base_image, d.size_mib, volumes)
            continue
        if not 0 <= d.size_mib <= MAX_DISK_MIB:
            raise invalid_field(f"{f}.size_mib", f"{d.size_mib} MiB is out of range: use 1 MiB .. 64 TiB")
        if d.base_image:
            _check_path(f"{f}.base_image", d.base_image)
        elif d.size_mib == 0:
            raise invalid_field(f"{f}.size_mib", "a blank disk (no base_image) needs a size")
    if spec.kernel_boot is not None:
        _check_path(f"{prefix}.kernel_boot.kernel", spec.kernel_boot.kernel)
        if spec.kernel_boot.initrd:
            _check_path(f"{prefix}.kernel_boot.initrd", spec.kernel_boot.initrd)
        if "\n" in spec.kernel_boot.cmdline or len(spec.kernel_boot.cmdline) > 2048:
            raise invalid_field(f"{prefix}.kernel_boot.cmdline", "one line of at most 2048 characters")
    elif not spec.disks:
        raise invalid_field(f"{prefix}.disks", "nothing to boot: give a disk or kernel_boot")
    if not _NET_NAME.fullmatch(spec.network.libvirt_network):
        raise invalid_field(
            f"{prefix}.network.libvirt_network",
            f"{spec.network.libvirt_network!r} is not a libvirt network name",
        )
    _check_network(f"{prefix}.network", spec.network)
    tags: set[str] = set()
    mounts: set[str] = set()
    for i, sf in enumerate(spec.shared_folders):
        f = f"{prefix}.shared_folders[{i}]"
        _check_path(f"{f}.host_path", sf.host_path)
        if not sf.host_path.startswith("/"):
            raise invalid_field(f"{f}.host_path", "must be an absolute path")
        if not _TAG.fullmatch(sf.tag) or sf.tag in tags:
            raise invalid_field(f"{f}.tag", "must be unique, 1-31 of [A-Za-z0-9_-]")
        tags.add(sf.tag)
        if sf.read_only and sf.driver is ShareDriver.VIRTIOFS:
            raise invalid_field(f"{f}.read_only", "virtiofs shares cannot be read-only here (libvirt 9): use driver 9p")
        if sf.mount:
            _check_path(f"{f}.mount", sf.mount)
            if not _GUEST_PATH.fullmatch(sf.mount) or sf.mount == "/":
                raise invalid_field(f"{f}.mount", "must be an absolute guest path without spaces, not '/'")
            if sf.mount in mounts:
                raise invalid_field(f"{f}.mount", f"{sf.mount!r} is already the mount point of another folder")
            mounts.add(sf.mount)
    if spec.cloud_init is not None:
        ci = spec.cloud_init
        texts = {"user_data": ci.user_data.reveal(), "meta_data": ci.meta_data, "network_config": ci.network_config}
        for name, text in texts.items():
            if len(text.encode()) > MAX_CLOUD_INIT_BYTES:
                raise invalid_field(f"{prefix}.cloud_init.{name}", "larger than 1 MiB")
    if spec.auth is not None:
        _validate_auth(spec, f"{prefix}.auth")
    if spec.provision is not None:
        _validate_provision(spec, f"{prefix}.provision")
    validate_probes(spec.health_checks, f"{prefix}.health_checks")
    check_labels(f"{prefix}.labels", spec.labels)
    return spec


def _check_volume_disk(f: str, volume: str, base_image: str, size_mib: int, seen: set[str]) -> None:
    """A disk that attaches agent volume ``volume``: a DNS label, once per VM, nothing to make (no base, no size)."""
    check_dns_label(f"{f}.volume", volume)
    if base_image:
        raise invalid_field(f"{f}.base_image", f"a volume disk (volume {volume!r}) has no base image: remove it")
    if size_mib:
        raise invalid_field(
            f"{f}.size_mib", f"a volume disk (volume {volume!r}) has the volume's size (CreateVolume): remove it"
        )
    if volume in seen:
        raise invalid_field(f"{f}.volume", f"volume {volume!r} is already attached by another disk of this VM")
    seen.add(volume)


def validate_volume(name: str, size_mib: int, labels: Iterable[tuple[str, str]] = ()) -> None:
    """The fields of a new volume (``CreateVolume``): InvalidArgument naming the first bad one."""
    check_dns_label("name", name)
    if not 0 < size_mib <= MAX_DISK_MIB:
        raise invalid_field("size_mib", f"{size_mib} MiB is out of range: use 1 MiB .. 64 TiB")
    check_labels("labels", labels)


def check_labels(f: str, labels: Iterable[tuple[str, str]]) -> None:
    """Label keys and values (the rules of VM labels), InvalidArgument naming ``f`` or ``f.KEY``."""
    for key, value in labels:
        if not _LABEL_KEY.fullmatch(key):
            raise invalid_field(f, f"label key {key!r}: use [a-z0-9._/-], max 63")
        if not _LABEL_VALUE.fullmatch(value):
            raise invalid_field(f"{f}.{key}", f"label value {value!r}: use [A-Za-z0-9._-], max 63")


def _validate_auth(spec: VmSpec, f: str) -> None:
    auth = spec.auth
    assert auth is not None
    if not _USER.fullmatch(auth.user) or auth.user == "root":
        raise invalid_field(f"{f}.user", f"{auth.user!r}: use a POSIX user name ([a-z_][a-z0-9_-]*, not root)")
    if auth.password_hash and not PASSWORD_HASH.fullmatch(auth.password_hash.reveal()):
        # never quote it: a client may have sent a password where the hash belongs
        raise invalid_field(f"{f}.password_hash", "is not a SHA-512-crypt hash ($6$...): send a hash, never a password")
    if auth.password_hash and not auth.method.uses_password:
        raise invalid_field(f"{f}.password", f"method {auth.method.name.lower()} sets no password: remove it")
    if auth.password and not auth.method.uses_password:
        raise invalid_field(
            f"{f}.password", f"method {auth.method.name.lower()} sets no password: remove it or use method: both"
        )
    if auth.method in (AuthMethod.PASSWORD, AuthMethod.BOTH) and not (auth.password or auth.password_hash):
        raise invalid_field(
            f"{f}.password",
            f"method {auth.method.name.lower()} needs a password: give a secret reference such as env:VM_PASSWORD",
        )
    for i, line in enumerate(auth.ssh_authorized_keys):
        if not PUBLIC_KEY.fullmatch(line):
            raise invalid_field(f"{f}.ssh_authorized_keys[{i}]", "is not an OpenSSH public key line")
    if (auth.ssh_keys or auth.ssh_authorized_keys) and not auth.method.uses_keys:
        raise invalid_field(f"{f}.ssh_keys", f"method {auth.method.name.lower()} installs no SSH keys: remove them")
    if len(auth.ssh_keys) > MAX_PROVISION_ITEMS or len(auth.ssh_authorized_keys) > MAX_PROVISION_ITEMS:
        raise invalid_field(f"{f}.ssh_keys", f"at most {MAX_PROVISION_ITEMS} keys")


def _validate_provision(spec: VmSpec, f: str) -> None:
    prov = spec.provision
    assert prov is not None
    checks = (
        ("packages", prov.packages, _PACKAGE, "a package name ([A-Za-z0-9.+:=~_-], optionally pkg=version)"),
        ("snap_packages", prov.snap_packages, _SNAP, "a snap name ([a-z0-9-])"),
        ("services", prov.services, _SERVICE, "a systemd unit name"),
    )
    for name, items, pattern, what in checks:
        if len(items) > MAX_PROVISION_ITEMS:
            raise invalid_field(f"{f}.{name}", f"at most {MAX_PROVISION_ITEMS} entries")
        for i, item in enumerate(items):
            if not pattern.fullmatch(item):
                raise invalid_field(f"{f}.{name}[{i}]", f"{item[:40]!r} is not {what}")
    if len(prov.post_commands) > MAX_PROVISION_ITEMS:
        raise invalid_field(f"{f}.post_commands", f"at most {MAX_PROVISION_ITEMS} commands")
    for i, cmd in enumerate(prov.post_commands):
        if not cmd.strip() or "\x00" in cmd or len(cmd) > MAX_COMMAND_CHARS:
            raise invalid_field(f"{f}.post_commands[{i}]", f"a non-empty command of at most {MAX_COMMAND_CHARS} chars")


def validate_resolved(spec: VmSpec, prefix: str = "spec") -> VmSpec:
    """
    ``validate_spec`` plus what a create request must carry: for the password methods, the hash.

    The spec file names a password *reference*; the client resolves it and sends only the hash, so a
    server receiving a reference without a hash tells the caller to resolve it first.
    """
    validate_spec(spec, prefix)
    auth = spec.auth
    if auth is not None and auth.method.uses_password and not auth.password_hash:
        raise invalid_field(
            f"{prefix}.auth.password_hash",
            f"method {auth.method.name.lower()} needs the password's SHA-512-crypt hash: "
            "clonebox vm create resolves auth.password and sends only the hash",
        )
    return spec


def managed_subnet(field: str, text: str, *, reason: str = "INVALID_FIELD") -> ipaddress.IPv4Network:
    """``text`` as the subnet of a managed network (private, /16 to /29), else InvalidArgument naming ``field``."""
    try:
        subnet = ipaddress.IPv4Network(text)
    except ValueError:
        why = f"{text!r} is not an IPv4 subnet in CIDR form (10.213.7.0/24)"
        raise invalid_field(field, why, reason=reason) from None
    if not 16 <= subnet.prefixlen <= 29 or not subnet.is_private:
        raise invalid_field(field, f"{text}: use a private subnet of /16 to /29", reason=reason)
    return subnet


def guest_range(subnet: ipaddress.IPv4Network) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]:
    """The first and last guest address of a managed subnet: its first address is the host's."""
    return subnet.network_address + 2, subnet.broadcast_address - 1


def _check_network(f: str, net: NetworkSpec) -> None:
    """The fields of a managed network attachment; the other modes must leave them empty."""
    if net.mode is not NetworkMode.MANAGED:
        for field, value in (("subnet", net.subnet), ("address", net.address), ("dns_names", net.dns_names)):
            if value:
                raise invalid_field(f"{f}.{field}", "only for mode MANAGED (a network the agent makes)")
        return
    if not _MANAGED_NET_NAME.fullmatch(net.libvirt_network):
        raise invalid_field(
            f"{f}.libvirt_network",
            f"{net.libvirt_network!r}: a managed network is named {MANAGED_NETWORK_PREFIX}<1-60 of a-z 0-9 ->",
        )
    subnet = managed_subnet(f"{f}.subnet", net.subnet)
    try:
        address = ipaddress.IPv4Address(net.address)
    except ValueError:
        raise invalid_field(f"{f}.address", f"{net.address!r} is not an IPv4 address") from None
    first, last = guest_range(subnet)
    if not first <= address <= last:
        raise invalid_field(
            f"{f}.address",
            f"{address} is not a guest address of {subnet}: use {first} .. {last} (the first is the host's)",
        )
    if len(net.dns_names) > 16:
        raise invalid_field(f"{f}.dns_names", "at most 16 names")
    for i, name in enumerate(net.dns_names):
        check_dns_label(f"{f}.dns_names[{i}]", name)
