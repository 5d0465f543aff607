"""Semantic validation of a VmSpec, shared by the spec file loader, the controller and the agent.

Every check raises InvalidArgument naming the field (``spec.disks[1].size_mib``) and the fix. The
servers validate again because the API can be called without the CLI.
"""

from __future__ import annotations

import re

from clonebox_core.errors import invalid_field
from clonebox_core.model import VmSpec
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
    for i, d in enumerate(spec.disks):
        f = f"{prefix}.disks[{i}]"
        check_dns_label(f"{f}.name", d.name)
        if d.name in seen:
            raise invalid_field(f"{f}.name", f"duplicate disk name {d.name!r}")
        seen.add(d.name)
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
    tags: set[str] = set()
    for i, sf in enumerate(spec.shared_folders):
        f = f"{prefix}.shared_folders[{i}]"
        _check_path(f"{f}.host_path", sf.host_path)
        if not sf.host_path.startswith("/"):
            raise invalid_field(f"{f}.host_path", "must be an absolute path")
        if not _TAG.fullmatch(sf.tag) or sf.tag in tags:
            raise invalid_field(f"{f}.tag", "must be unique, 1-31 of [A-Za-z0-9_-]")
        tags.add(sf.tag)
    if spec.cloud_init is not None:
        ci = spec.cloud_init
        texts = {"user_data": ci.user_data.reveal(), "meta_data": ci.meta_data, "network_config": ci.network_config}
        for name, text in texts.items():
            if len(text.encode()) > MAX_CLOUD_INIT_BYTES:
                raise invalid_field(f"{prefix}.cloud_init.{name}", "larger than 1 MiB")
    for key, value in spec.labels:
        if not _LABEL_KEY.fullmatch(key):
            raise invalid_field(f"{prefix}.labels", f"label key {key!r}: use [a-z0-9._/-], max 63")
        if not _LABEL_VALUE.fullmatch(value):
            raise invalid_field(f"{prefix}.labels.{key}", f"label value {value!r}: use [A-Za-z0-9._-], max 63")
    return spec
