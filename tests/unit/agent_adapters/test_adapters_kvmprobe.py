"""Choosing KVM or TCG. The real-probe tests boot tiny guests on qemu:///system."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import pytest

from clonebox_agent.adapters.libvirt import LibvirtHypervisor
from clonebox_agent.adapters.libvirt.kvmprobe import (
    PROBE_MARKER,
    boot_sector,
    choose_domain_type,
    cpu_has_virtualization,
    kvm_device_usable,
    run_probe,
)


def test_boot_sector_shape() -> None:
    sector = boot_sector()
    assert len(sector) == 512
    assert sector[-2:] == b"\x55\xaa"
    assert PROBE_MARKER in sector
    assert sector[0] == 0xFA  # cli
    # mov si, imm16 points at the marker where the BIOS loads the sector (0x7c00)
    si = int.from_bytes(sector[7:9], "little")
    assert sector[si - 0x7C00 :].startswith(PROBE_MARKER)


def test_cpu_flags(tmp_path: Path) -> None:
    with_vmx = tmp_path / "a"
    with_vmx.write_text("processor: 0\nflags\t\t: fpu vme vmx sse\n")
    without = tmp_path / "b"
    without.write_text("processor: 0\nflags\t\t: fpu vme sse\n")
    assert cpu_has_virtualization(str(with_vmx))
    assert not cpu_has_virtualization(str(without))
    assert not cpu_has_virtualization(str(tmp_path / "missing"))


def test_kvm_device_missing(tmp_path: Path) -> None:
    ok, why = kvm_device_usable(str(tmp_path / "kvm"))
    assert not ok and "kvm" in why


def test_explicit_types_need_no_probe() -> None:
    assert choose_domain_type(None, "kvm", "/nonexistent")[0] == "kvm"
    assert choose_domain_type(None, "qemu", "/nonexistent")[0] == "qemu"
    with pytest.raises(ValueError):
        choose_domain_type(None, "xen", "/nonexistent")


@pytest.mark.libvirt
async def test_auto_picks_tcg_here_with_a_real_probe(qemu_dir: str, tmp_path: Path) -> None:
    hv = LibvirtHypervisor("qemu:///system", os.path.join(qemu_dir, "s"), [qemu_dir], pool_name="clonebox-unit-probe")
    await hv.open(lambda _ev: None)
    try:
        conn = (await hv._run(hv._conn.get)).unwrapped
        probe_dir = os.path.join(qemu_dir, "probe")

        # the probe itself works: under TCG the boot sector reaches the serial console
        tcg = await asyncio.to_thread(run_probe, conn, "qemu", probe_dir, 5.0)
        assert tcg.ok, tcg

        # auto, as the agent runs it: TCG on this machine, with the reason
        domain_type, reason = hv.domain_type
        assert domain_type == "qemu" and reason.startswith("TCG"), reason
        info = await hv.host_info()
        assert (info.hypervisor.domain_type, info.hypervisor.domain_type_reason) == (domain_type, reason)

        # even when the CPU flags claim vmx (nested virtualization half there), the KVM probe guest
        # does not reach its console here, so auto still picks TCG and says why
        cpuinfo = tmp_path / "cpuinfo"
        cpuinfo.write_text("flags\t: fpu vmx\n")
        if kvm_device_usable()[0]:
            picked, why = await asyncio.to_thread(
                lambda: choose_domain_type(conn, "auto", probe_dir, timeout=5.0, cpuinfo_path=str(cpuinfo))
            )
            assert picked == "qemu", why
            assert "KVM probe guest did not reach its serial console" in why, why
            assert "under TCG it did in" in why, why
        # probe guests and files are gone in all cases
        assert not os.listdir(probe_dir)
        assert not [d for d in await asyncio.to_thread(_virsh_names) if d.startswith("clonebox-probe-")]
    finally:
        await hv.remove_pool()
        await hv.close()


def _virsh_names() -> list[str]:
    out = subprocess.run(
        ["virsh", "-q", "-c", "qemu:///system", "list", "--all", "--name"], capture_output=True, text=True, check=True
    )
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]
