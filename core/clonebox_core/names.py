"""Validation of names that end up in paths, XML and resource names."""

from __future__ import annotations

import re

from clonebox_core.errors import invalid_field

_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def is_dns_label(value: str) -> bool:
    """True when ``value`` is an RFC 1123 DNS label: 1-63 of ``[a-z0-9-]``, no leading/trailing '-'."""
    return bool(_DNS_LABEL.fullmatch(value))


def check_dns_label(field: str, value: str) -> str:
    """Return ``value`` or raise InvalidArgument naming ``field`` and the fix."""
    if not is_dns_label(value):
        raise invalid_field(
            field,
            f"{value!r} is not a DNS label: use 1-63 lowercase letters, digits and '-', "
            "starting and ending with a letter or digit",
            reason="INVALID_NAME",
        )
    return value


def vm_resource_name(host: str, vm: str) -> str:
    """Canonical resource name of a VM."""
    return f"hosts/{host}/vms/{vm}"
