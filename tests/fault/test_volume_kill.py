"""SIGKILL a process in the middle of ``create_volume`` on real libvirt: the half-made volume stays invisible.

A child process runs the libvirt adapter with the agent's fault-injection hook (``CLONEBOX_FAULT_INJECTION``)
set to kill it at ``create_volume:file``: the volume's file exists, its metadata was never written. A new
adapter on the same storage (what the agent has after its restart) must not list it, must refuse to
attach it, must replace it on a retry of the create, and the orphan sweep must never report it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import uuid
from collections.abc import Iterator

import pytest

from clonebox_agent.adapters.libvirt import LibvirtHypervisor
from clonebox_core.errors import NotFound
from clonebox_core.model import DiskSpec, NetworkMode, NetworkSpec, VmSpec

pytestmark = [pytest.mark.e2e, pytest.mark.libvirt]

ROOT = "/var/lib/clonebox"

CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from clonebox_agent.adapters.libvirt import LibvirtHypervisor
    from clonebox_agent.faultinject import hook_from_env

    async def main() -> None:
        storage, owner, pool = sys.argv[1:4]
        hv = LibvirtHypervisor(
            "qemu:///system", storage, [], owner=owner, pool_name=pool, domain_type="qemu", step_hook=hook_from_env()
        )
        await hv.open(lambda _ev: None)
        await hv.create_volume("data", 8)
        print("not killed")

    asyncio.run(main())
    """
)


def _libvirt_unreachable() -> str | None:
    if shutil.which("virsh") is None:
        return "virsh is not installed"
    out = subprocess.run(["virsh", "-c", "qemu:///system", "version"], capture_output=True, text=True, check=False)
    return None if out.returncode == 0 else f"libvirtd not reachable: {out.stderr.strip()}"


@pytest.fixture
def storage() -> Iterator[str]:
    why = _libvirt_unreachable()
    if why:
        pytest.skip(why)
    os.makedirs(ROOT, exist_ok=True)
    path = tempfile.mkdtemp(prefix="volume-kill-", dir=ROOT)
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _run_child(storage: str, owner: str, pool: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CLONEBOX_FAULT_INJECTION": "create_volume:file=kill"}
    return subprocess.run(
        [sys.executable, "-c", CHILD, storage, owner, pool],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_a_kill_between_file_and_metadata_leaves_an_invisible_volume(storage: str) -> None:
    tag = uuid.uuid4().hex[:8]
    owner, pool = f"volume-kill-{tag}", f"clonebox-volume-kill-{tag}"
    child = _run_child(storage, owner, pool)
    assert child.returncode == -signal.SIGKILL, child.stdout + child.stderr
    assert "not killed" not in child.stdout

    hv = LibvirtHypervisor("qemu:///system", storage, [], owner=owner, pool_name=pool, domain_type="qemu")
    await hv.open(lambda _ev: None)
    try:
        inventory = await hv.inventory()
        assert "vol.data.qcow2" in inventory.volumes  # the file was made
        assert inventory.agent_volumes == ()  # its metadata never was
        assert await hv.list_volumes() == []
        assert await hv.orphans() == {}
        spec = VmSpec(
            name=f"vk-{tag}",
            memory_mib=64,
            disks=(DiskSpec("root", size_mib=16), DiskSpec("data", volume="data")),
            network=NetworkSpec(mode=NetworkMode.NONE),
        )
        with pytest.raises(NotFound) as err:
            await hv.create(spec, start=False)
        assert err.value.reason == "VOLUME_NOT_FOUND"
        made = await hv.create_volume("data", 8)
        assert [v.name for v in await hv.list_volumes()] == ["data"] and made.size_mib == 8
        assert [v for v in (await hv.inventory()).volumes if v.startswith("vol.")] == ["vol.data.qcow2"]
        await hv.delete_volume("data")
        assert (await hv.inventory()).is_empty()
    finally:
        for volume in await hv.list_volumes():
            await hv.delete_volume(volume.name)
        await hv.remove_pool()
        await hv.close()
