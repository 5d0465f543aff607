"""Unit tests of the hypervisor adapters' building blocks (and the libvirt adapter's own behaviour)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.path).startswith(here) and not item.get_closest_marker("libvirt"):
            item.add_marker(pytest.mark.unit)


def qemu_unreachable() -> str | None:
    """Why qemu:///system cannot be used here, or None."""
    if shutil.which("virsh") is None:
        return "virsh is not installed"
    out = subprocess.run(
        ["virsh", "-c", "qemu:///system", "version"], capture_output=True, text=True, timeout=20, check=False
    )
    if out.returncode != 0:
        return f"libvirtd not reachable at qemu:///system: {out.stderr.strip()}"
    return None


@pytest.fixture
def qemu_dir() -> Iterator[str]:
    """A fresh folder QEMU (libvirt-qemu) can traverse; skips when libvirtd is unreachable."""
    why = qemu_unreachable()
    if why:
        pytest.skip(why)
    os.makedirs("/var/lib/clonebox", mode=0o755, exist_ok=True)
    path = tempfile.mkdtemp(prefix="unit-", dir="/var/lib/clonebox")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)
