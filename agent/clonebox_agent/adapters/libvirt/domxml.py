"""
Domain XML built from typed models with ElementTree, and the ownership metadata read back.

Nothing here formats user input into XML text: every value goes through ElementTree, which escapes it.
The ``<metadata>`` element ``cb:owner`` marks a domain as ours (``agent`` attribute) and records the
VmSpec as JSON, so ``get``/``list`` return the spec the VM was created from (secret fields as digests).
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from clonebox_agent.adapters import common
from clonebox_core import specjson
from clonebox_core.model import VmSpec

#: XML namespace of CloneBox's domain metadata
NAMESPACE = "https://clonebox.dev/xmlns/agent/1"
NS_PREFIX = "cb"
#: version of the JSON document in ``cb:spec`` (2: secret fields as digests, auth and provision)
SPEC_VERSION = 2

#: seconds between the guest balloon driver's memory statistics updates
BALLOON_STATS_PERIOD = 5

ET.register_namespace(NS_PREFIX, NAMESPACE)


@dataclass(frozen=True)
class Disk:
    """A block device: a qcow2 disk on virtio, or a read-only cdrom (seed ISO)."""

    path: str
    target: str
    format: str = "qcow2"
    cdrom: bool = False
    #: the guest-visible serial (an agent volume's ``vol-NAME``: /dev/disk/by-id/virtio-vol-NAME)
    serial: str = ""
    #: several domains may attach the file at once (a shared volume: raw, ``cache="none"``)
    shareable: bool = False


@dataclass(frozen=True)
class Filesystem:
    """A shared host folder: virtio-9p, or virtiofs (``virtiofs``)."""

    source: str
    tag: str
    read_only: bool = False
    virtiofs: bool = False


@dataclass(frozen=True)
class OwnerMetadata:
    """What ``cb:owner`` records."""

    agent: str
    vm: str
    spec: VmSpec
    created: datetime | None = None


@dataclass(frozen=True)
class DomainConfig:
    """Everything the domain XML says, already resolved to host paths."""

    name: str
    uuid: str
    domain_type: str
    vcpus: int
    memory_mib: int
    owner: OwnerMetadata
    disks: tuple[Disk, ...] = ()
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str = ""
    network: str | None = None
    #: the interface's MAC address (None: libvirt picks one); set for a managed network, whose DHCP host
    #: entry must name it before the domain exists
    mac: str | None = None
    filesystems: tuple[Filesystem, ...] = ()
    console_log: str | None = None


# ---- VmSpec <-> JSON ------------------------------------------------------------------------


def spec_to_json(spec: VmSpec) -> str:
    """
    Stable JSON of a spec for the domain's metadata.

    Anyone with read-only libvirt access can read
    it, so secret fields (user-data, the password hash) are written as digests, never as values.
    """
    data = specjson.spec_to_dict(spec, secrets="digest")
    return json.dumps({"version": SPEC_VERSION, "spec": data}, sort_keys=True, separators=(",", ":"))


def spec_from_json(text: str) -> VmSpec:
    """Inverse of ``spec_to_json`` (secret fields come back as their digests)."""
    doc = json.loads(text)
    # version 1 (before secret fields became digests) has the same shape: domains made then still load
    if doc.get("version") not in (1, SPEC_VERSION):
        raise ValueError(f"unknown spec document version {doc.get('version')!r}")
    return specjson.spec_from_dict(doc["spec"])


# ---- building --------------------------------------------------------------------------------


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrs)
    if text is not None:
        el.text = text
    return el


def owner_element(meta: OwnerMetadata, spec_text: str | None = None) -> ET.Element:
    """Build the ``cb:owner`` element (``spec_text``: the ``cb:spec`` document as it is, else from ``meta.spec``)."""
    el = ET.Element(f"{{{NAMESPACE}}}owner", _owner_attrs(meta))
    _sub(el, f"{{{NAMESPACE}}}spec", spec_to_json(meta.spec) if spec_text is None else spec_text)
    return el


def owner_metadata_xml(meta: OwnerMetadata, spec_text: str) -> str:
    """The ``owner`` element as ``virDomainSetMetadata`` takes it: unprefixed (libvirt puts it in ``NAMESPACE``)."""
    el = ET.Element("owner", _owner_attrs(meta))
    _sub(el, "spec", spec_text)
    return ET.tostring(el, encoding="unicode")


def _owner_attrs(meta: OwnerMetadata) -> dict[str, str]:
    attrs = {"agent": meta.agent, "vm": meta.vm}
    if meta.created is not None:
        attrs["created"] = meta.created.isoformat()
    return attrs


def patch_spec_text(text: str, fields: Mapping[str, Any]) -> str:
    """The ``cb:spec`` document ``text`` with only the updatable fields from ``fields`` (see ``common.patch_fields``).

    Every other field stays byte for byte as it was written (secret digests included): the document is
    written again the way ``spec_to_json`` writes it, and its version is kept.
    """
    doc = json.loads(text)
    doc["spec"] = common.patch_fields(doc["spec"], fields)
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


def resources(xml_text: str) -> tuple[int, int]:
    """(vCPUs, MiB) a domain XML defines (``<vcpu>``, ``<memory>``)."""
    root = ET.fromstring(xml_text)
    vcpu = root.find("vcpu")
    memory = root.find("memory")
    if vcpu is None or memory is None or not vcpu.text or not memory.text:
        raise ValueError("domain XML without <vcpu> or <memory>")
    return int(vcpu.text), _mib(int(memory.text), memory.get("unit", "KiB"))


_UNITS = {"b": 1, "bytes": 1, "k": 1024, "kib": 1024, "m": 1024**2, "mib": 1024**2, "g": 1024**3, "gib": 1024**3}


def _mib(value: int, unit: str) -> int:
    return value * _UNITS.get(unit.lower(), 1024) // (1024 * 1024)


def with_definition(xml_text: str, vcpus: int, memory_mib: int, owner: ET.Element) -> str:
    """A domain XML with other vCPUs, memory (maximum and current) and ``cb:owner``; everything else as it was.

    Meant for the inactive XML of a domain (``VIR_DOMAIN_XML_INACTIVE``): redefining from it keeps its disks,
    interfaces (MAC addresses), NVRAM and what libvirt added itself.
    """
    root = ET.fromstring(xml_text)
    vcpu = root.find("vcpu")
    if vcpu is None:
        vcpu = _sub(root, "vcpu", placement="static")
    vcpu.text = str(vcpus)
    vcpu.attrib.pop("current", None)  # fewer online vCPUs than defined: not something the agent makes
    for tag in ("memory", "currentMemory"):
        el = root.find(tag)
        if el is None:
            el = _sub(root, tag)
        el.text = str(memory_mib * 1024)
        el.set("unit", "KiB")
    md = root.find("metadata")
    if md is None:
        md = _sub(root, "metadata")
    for old in md.findall(f"{{{NAMESPACE}}}owner"):
        md.remove(old)
    md.append(owner)
    return ET.tostring(root, encoding="unicode")


def build_domain(cfg: DomainConfig) -> ET.Element:
    """Build the ``<domain>`` element for ``cfg``."""
    dom = ET.Element("domain", {"type": cfg.domain_type})
    _sub(dom, "name", cfg.name)
    _sub(dom, "uuid", cfg.uuid)
    _sub(dom, "metadata").append(owner_element(cfg.owner))
    _sub(dom, "memory", str(cfg.memory_mib), unit="MiB")
    _sub(dom, "currentMemory", str(cfg.memory_mib), unit="MiB")
    if any(fs.virtiofs for fs in cfg.filesystems):
        # virtiofsd maps guest memory: it must be shared, file-backed memory
        backing = _sub(dom, "memoryBacking")
        _sub(backing, "source", type="memfd")
        _sub(backing, "access", mode="shared")
    _sub(dom, "vcpu", str(cfg.vcpus), placement="static")

    os_el = _sub(dom, "os")
    _sub(os_el, "type", "hvm", arch="x86_64")
    if cfg.kernel is not None:
        _sub(os_el, "kernel", cfg.kernel)
        if cfg.initrd is not None:
            _sub(os_el, "initrd", cfg.initrd)
        if cfg.cmdline:
            _sub(os_el, "cmdline", cfg.cmdline)
    else:
        _sub(os_el, "boot", dev="hd")

    _sub(_sub(dom, "features"), "acpi")
    _sub(dom, "clock", offset="utc")
    # poweroff ends the domain (it stays defined, STOPPED); reboot restarts; a crash stops it so the
    # agent sees STOPPED/crashed rather than a reboot loop
    _sub(dom, "on_poweroff", "destroy")
    _sub(dom, "on_reboot", "restart")
    _sub(dom, "on_crash", "destroy")

    devices = _sub(dom, "devices")
    for disk in cfg.disks:
        _disk(devices, disk)
    if cfg.network is not None:
        iface = _sub(devices, "interface", type="network")
        _sub(iface, "source", network=cfg.network)
        if cfg.mac is not None:
            _sub(iface, "mac", address=cfg.mac)
        _sub(iface, "model", type="virtio")
    for fs in cfg.filesystems:
        if fs.virtiofs:
            # virtiofsd runs per share; libvirt 9.0 has no read-only virtiofs, so the spec check refuses that
            el = _sub(devices, "filesystem", type="mount", accessmode="passthrough")
            _sub(el, "driver", type="virtiofs")
        else:
            # 'mapped' keeps guest-side ownership in xattrs, so QEMU never needs root on the host
            el = _sub(devices, "filesystem", type="mount", accessmode="mapped")
        _sub(el, "source", dir=fs.source)
        _sub(el, "target", dir=fs.tag)
        if fs.read_only and not fs.virtiofs:
            _sub(el, "readonly")
    serial = _sub(devices, "serial", type="pty")
    if cfg.console_log is not None:
        _sub(serial, "log", file=cfg.console_log, append="on")
    _sub(serial, "target", port="0")
    console = _sub(devices, "console", type="pty")
    _sub(console, "target", type="serial", port="0")
    # qemu-ga's channel; libvirt picks the host socket path
    channel = _sub(devices, "channel", type="unix")
    _sub(channel, "target", type="virtio", name="org.qemu.guest_agent.0")
    # guests block at boot waiting for entropy without it
    rng = _sub(devices, "rng", model="virtio")
    _sub(rng, "backend", "/dev/urandom", model="random")
    # the guest's balloon driver reports memory in use only when asked to at a period: resource probes
    # read it (balloon.available/unused) from the bulk statistics call
    balloon = _sub(devices, "memballoon", model="virtio")
    _sub(balloon, "stats", period=str(BALLOON_STATS_PERIOD))
    return dom


def cdrom_xml(path: str | None, target: str) -> str:
    """A cdrom device as ``_disk`` writes it; ``path`` None: the drive without a medium (an eject)."""
    el = ET.Element("disk", {"type": "file", "device": "cdrom"})
    _sub(el, "driver", name="qemu", type="raw")
    if path is not None:
        _sub(el, "source", file=path)
    _sub(el, "target", dev=target, bus="ide")
    _sub(el, "readonly")
    return ET.tostring(el, encoding="unicode")


def _disk(devices: ET.Element, disk: Disk) -> None:
    el = _sub(devices, "disk", type="file", device="cdrom" if disk.cdrom else "disk")
    if disk.shareable:
        # two guests writing one file: no host page cache may hold stale blocks of it
        _sub(el, "driver", name="qemu", type=disk.format, cache="none")
    else:
        _sub(el, "driver", name="qemu", type=disk.format)
    _sub(el, "source", file=disk.path)
    # the default machine type (i440fx) has IDE but no virtio cdrom
    _sub(el, "target", dev=disk.target, bus="ide" if disk.cdrom else "virtio")
    if disk.serial:
        _sub(el, "serial", disk.serial)
    if disk.cdrom:
        _sub(el, "readonly")
    if disk.shareable:
        _sub(el, "shareable")


def domain_xml(cfg: DomainConfig) -> str:
    """Domain XML text for ``cfg``."""
    return ET.tostring(build_domain(cfg), encoding="unicode")


def virtio_target(index: int) -> str:
    """Target device of the index-th virtio disk: vda, vdb, ... vdz, vdaa, ..."""
    letters = ""
    n = index
    while True:
        letters = chr(ord("a") + n % 26) + letters
        n = n // 26 - 1
        if n < 0:
            break
    return "vd" + letters


# ---- parsing ---------------------------------------------------------------------------------


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def spec_text(xml_text: str) -> str | None:
    """The ``cb:spec`` document of a whole domain XML or of the bare ``owner`` element (None: none)."""
    owner = _owner_of(ET.fromstring(xml_text))
    if owner is None:
        return None
    spec_el = next((c for c in owner if _local(c.tag) == "spec"), None)
    return spec_el.text if spec_el is not None and spec_el.text else None


def _owner_of(root: ET.Element) -> ET.Element | None:
    if _local(root.tag) == "owner":
        return root
    md = root.find("metadata")
    return md.find(f"{{{NAMESPACE}}}owner") if md is not None else None


def parse_owner(xml_text: str) -> OwnerMetadata | None:
    """
    Ownership metadata from a whole domain XML or from the bare ``owner`` element.

    libvirt's metadata API returns the element without its namespace declaration, so names are
    matched by their local part once the element is known to be ours.
    """
    owner = _owner_of(ET.fromstring(xml_text))
    if owner is None:
        return None
    spec_el = next((c for c in owner if _local(c.tag) == "spec"), None)
    if spec_el is None or not spec_el.text:
        return None
    created_text = owner.get("created")
    return OwnerMetadata(
        agent=owner.get("agent", ""),
        vm=owner.get("vm", ""),
        spec=spec_from_json(spec_el.text),
        created=datetime.fromisoformat(created_text) if created_text else None,
    )


def disk_sources(xml_text: str) -> list[str]:
    """Source files of every disk (and cdrom) of a domain XML."""
    root = ET.fromstring(xml_text)
    out = []
    for src in root.findall("./devices/disk/source"):
        path = src.get("file")
        if path:
            out.append(path)
    return out


def console_log(xml_text: str) -> str | None:
    """Return the serial console's log file of a domain XML."""
    root = ET.fromstring(xml_text)
    log = root.find("./devices/serial/log")
    return log.get("file") if log is not None else None


def agent_connected(xml_text: str) -> bool:
    """Tell whether the live XML says qemu-ga's channel is connected."""
    root = ET.fromstring(xml_text)
    for target in root.findall("./devices/channel/target"):
        if target.get("name") == "org.qemu.guest_agent.0":
            return target.get("state") == "connected"
    return False
