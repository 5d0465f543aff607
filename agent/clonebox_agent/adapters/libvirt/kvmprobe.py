"""
Choosing the domain type: KVM only when a KVM guest provably runs, TCG otherwise.

Some hosts expose ``/dev/kvm`` and libvirt lists the ``kvm`` domain type, yet KVM guests hang (nested
virtualization that is half there). So ``auto`` boots a probe guest: a 512-byte boot sector, generated
here, that writes a marker to the first serial port and halts. It boots under TCG first, which shows
the probe itself works and how long an emulated boot takes; then under KVM, which must reach the
console about as fast (working KVM is several times faster than TCG). Otherwise the agent uses TCG
(``type='qemu'``) and says why.
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any

import libvirt

from clonebox_agent.adapters.libvirt.errors import message_of

log = logging.getLogger(__name__)

PROBE_MARKER = b"CLONEBOX-PROBE-OK"
PROBE_NAME_PREFIX = "clonebox-probe-"
_COM1 = 0x3F8
_LOAD_ADDRESS = 0x7C00


def boot_sector(marker: bytes = PROBE_MARKER) -> bytes:
    """
    Assemble a real-mode x86 boot sector that writes ``marker`` + newline to COM1 and halts.

    The BIOS loads it at 0000:7C00; it sets DS=0 and prints with ``lodsb``/``out`` until a NUL.
    """
    text = marker + b"\r\n\x00"
    head = (
        b"\xfa"  # cli
        b"\xfc"  # cld: lodsb counts upwards
        b"\x31\xc0"  # xor ax, ax
        b"\x8e\xd8"  # mov ds, ax
    )
    # mov si, <address of text> (patched below once the code length is known)
    mov_si = b"\xbe\x00\x00"
    mov_dx = b"\xba" + struct.pack("<H", _COM1)  # mov dx, 0x3f8
    loop = (
        b"\xac"  # loop: lodsb
        b"\x84\xc0"  # test al, al
        b"\x74\x03"  # jz done (skip out + jmp)
        b"\xee"  # out dx, al
        b"\xeb\xf8"  # jmp loop (-8)
    )
    done = (
        b"\xfa"  # done: cli
        b"\xf4"  # hlt
        b"\xeb\xfc"  # jmp done (-4): halt again after an NMI
    )
    code_len = len(head) + len(mov_si) + len(mov_dx) + len(loop) + len(done)
    mov_si = b"\xbe" + struct.pack("<H", _LOAD_ADDRESS + code_len)
    sector = head + mov_si + mov_dx + loop + done + text
    if len(sector) > 510:
        raise ValueError("probe marker too long for a boot sector")
    return sector.ljust(510, b"\x00") + b"\x55\xaa"


def cpu_has_virtualization(cpuinfo_path: str = "/proc/cpuinfo") -> bool:
    """Tell whether the CPU flags include vmx (Intel) or svm (AMD)."""
    try:
        with open(cpuinfo_path) as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    if flags & {"vmx", "svm"}:
                        return True
    except OSError:
        return False
    return False


def kvm_device_usable(path: str = "/dev/kvm") -> tuple[bool, str]:
    """Whether ``path`` is a character device this process can open read-write."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return False, f"{path}: {exc.strerror}"
    os.close(fd)
    return True, ""


def libvirt_offers_kvm(conn: Any) -> bool:
    """Tell whether libvirt's capabilities list the kvm domain type for x86_64 guests."""
    caps = ET.fromstring(conn.getCapabilities())
    for guest in caps.findall("guest"):
        arch = guest.find("arch")
        if arch is None or arch.get("name") != "x86_64":
            continue
        if any(d.get("type") == "kvm" for d in arch.findall("domain")):
            return True
    return False


@dataclass(frozen=True)
class ProbeResult:
    """Outcome of one probe boot."""

    domain_type: str
    ok: bool
    seconds: float
    detail: str = ""


def _probe_xml(name: str, domain_type: str, disk: str, serial: str) -> str:
    dom = ET.Element("domain", {"type": domain_type})
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "memory", {"unit": "MiB"}).text = "32"
    ET.SubElement(dom, "vcpu").text = "1"
    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type", {"arch": "x86_64"}).text = "hvm"
    ET.SubElement(os_el, "boot", {"dev": "hd"})
    ET.SubElement(dom, "on_poweroff").text = "destroy"
    ET.SubElement(dom, "on_crash").text = "destroy"
    devices = ET.SubElement(dom, "devices")
    d = ET.SubElement(devices, "disk", {"type": "file", "device": "disk"})
    ET.SubElement(d, "driver", {"name": "qemu", "type": "raw"})
    ET.SubElement(d, "source", {"file": disk})
    ET.SubElement(d, "target", {"dev": "hda", "bus": "ide"})
    s = ET.SubElement(devices, "serial", {"type": "file"})
    ET.SubElement(s, "source", {"path": serial})
    ET.SubElement(s, "target", {"port": "0"})
    return ET.tostring(dom, encoding="unicode")


def run_probe(conn: Any, domain_type: str, work_dir: str, timeout: float = 5.0) -> ProbeResult:
    """
    Boot the probe guest as ``domain_type`` and wait up to ``timeout`` s for its marker.

    Blocking. The guest is transient (gone once destroyed) and its folder is removed in all cases.
    ``work_dir`` must be traversable by the QEMU user (never under /root).
    """
    os.makedirs(work_dir, mode=0o755, exist_ok=True)
    folder = tempfile.mkdtemp(prefix="probe-", dir=work_dir)
    name = f"{PROBE_NAME_PREFIX}{domain_type}-{uuid.uuid4().hex[:8]}"
    dom: Any = None
    started = time.monotonic()
    try:
        os.chmod(folder, 0o755)  # mkdtemp makes it 0700; QEMU runs as another user
        disk = os.path.join(folder, "boot.img")
        serial = os.path.join(folder, "serial.log")
        with open(disk, "wb") as f:
            # a whole 64 KiB so every BIOS is happy with the disk geometry
            f.write(boot_sector().ljust(64 * 1024, b"\x00"))
        os.chmod(disk, 0o644)
        try:
            dom = conn.createXML(_probe_xml(name, domain_type, disk, serial), 0)
        except libvirt.libvirtError as exc:
            return ProbeResult(domain_type, False, time.monotonic() - started, f"start failed: {message_of(exc)}")
        deadline = started + timeout
        while time.monotonic() < deadline:
            try:
                with open(serial, "rb") as f:
                    if PROBE_MARKER in f.read():
                        return ProbeResult(domain_type, True, time.monotonic() - started)
            except FileNotFoundError:
                pass
            time.sleep(0.05)
        return ProbeResult(domain_type, False, time.monotonic() - started, f"no serial output within {timeout:g}s")
    finally:
        if dom is not None:
            try:
                dom.destroy()
            except libvirt.libvirtError as exc:
                log.warning("could not destroy probe domain %s: %s", name, message_of(exc))
        shutil.rmtree(folder, ignore_errors=True)


def choose_domain_type(
    conn: Any,
    requested: str,
    work_dir: str,
    *,
    timeout: float = 5.0,
    cpuinfo_path: str = "/proc/cpuinfo",
    kvm_path: str = "/dev/kvm",
) -> tuple[str, str]:
    """(domain type, reason) for ``requested`` = "auto", "kvm" or "qemu". Blocking (may boot probes)."""
    if requested in ("kvm", "qemu"):
        return requested, f"configured domain_type={requested}"
    if requested != "auto":
        raise ValueError(f"domain_type must be auto, kvm or qemu, not {requested!r}")
    if not cpu_has_virtualization(cpuinfo_path):
        return "qemu", f"TCG: no vmx/svm flag in {cpuinfo_path} (hardware virtualization not exposed)"
    usable, why = kvm_device_usable(kvm_path)
    if not usable:
        return "qemu", f"TCG: {why}"
    if not libvirt_offers_kvm(conn):
        return "qemu", "TCG: libvirt offers no kvm domain type for x86_64"
    # TCG first: it shows the probe itself works, and how long an emulated boot takes here. KVM that
    # is present but unusable (nested virtualization half there) is not always stuck: on some hosts it
    # crawls, reaching the console after 5-7 s where TCG needs 0.8 s, while real guests hang. So KVM
    # must do at least about as well as TCG, not merely finish.
    tcg = run_probe(conn, "qemu", work_dir, timeout)
    if not tcg.ok:
        kvm = run_probe(conn, "kvm", work_dir, timeout)
        if kvm.ok:
            return "kvm", f"KVM: probe guest reached its serial console in {kvm.seconds:.2f}s (TCG: {tcg.detail})"
        return "qemu", f"TCG: the probe failed under KVM ({kvm.detail}) and under TCG ({tcg.detail})"
    kvm_timeout = min(timeout, max(1.0, 1.5 * tcg.seconds))
    kvm = run_probe(conn, "kvm", work_dir, kvm_timeout)
    if kvm.ok:
        return "kvm", f"KVM: probe guest reached its serial console in {kvm.seconds:.2f}s (TCG: {tcg.seconds:.2f}s)"
    return "qemu", (
        f"TCG: KVM probe guest did not reach its serial console within {kvm_timeout:.1f}s "
        f"({kvm.detail}), while under TCG it did in {tcg.seconds:.2f}s: KVM is present but unusable"
    )
