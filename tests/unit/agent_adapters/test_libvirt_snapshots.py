"""Pure helpers of the libvirt adapter's snapshots: snapshot XML built and read, domain disks, qemu-img."""

from __future__ import annotations

import os
import shutil
import subprocess
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from pathlib import Path

import pytest

from clonebox_agent.adapters.libvirt import snapshots
from clonebox_agent.adapters.libvirt.snapshots import DomainDisk, SnapshotInfo
from clonebox_core.errors import Internal
from clonebox_core.model import VmState
from clonebox_core.snapshots import SnapshotKind

ROOT = DomainDisk("vda", "/pool/cb-x.root.qcow2", "qcow2", cdrom=False, readonly=False)
SEED = DomainDisk("hdc", "/pool/cb-x.cidata.iso", "raw", cdrom=True, readonly=True)

DOMAIN = """
<domain type='qemu'><name>cb-x</name><devices>
  <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
    <source file='/pool/cb-x.root.qcow2' index='2'/>
    <backingStore type='file' index='3'><format type='qcow2'/><source file='/images/base.qcow2'/></backingStore>
    <target dev='vda' bus='virtio'/></disk>
  <disk type='file' device='cdrom'><driver name='qemu' type='raw'/><source file='/pool/cb-x.cidata.iso'/>
    <target dev='hdc' bus='ide'/><readonly/></disk>
  <disk type='file' device='cdrom'><target dev='hdd' bus='ide'/><readonly/></disk>
  <filesystem type='mount' accessmode='mapped'><source dir='/srv/share'/><target dir='share0'/></filesystem>
</devices></domain>
"""


def test_internal_xml_saves_qcow2_disks_and_leaves_the_seed_cdrom_out() -> None:
    root = ET.fromstring(snapshots.internal_snapshot_xml("s<1>", [ROOT, SEED], memory=True))
    assert root.findtext("name") == "s<1>"
    memory = root.find("memory")
    assert memory is not None and memory.get("snapshot") == "internal"
    assert [(d.get("name"), d.get("snapshot")) for d in root.findall("./disks/disk")] == [
        ("vda", "internal"),
        ("hdc", "no"),
    ]
    stopped = ET.fromstring(snapshots.internal_snapshot_xml("s", [ROOT], memory=False))
    assert stopped.find("memory").get("snapshot") == "no"  # type: ignore[union-attr]


def test_external_xml_names_the_overlays_and_records_the_frozen_files() -> None:
    text = snapshots.external_snapshot_xml(
        "e1", [ROOT, SEED], {"vda": "/pool/cb-x.root.e1-abc.qcow2"}, {"vda": ROOT.source}
    )
    root = ET.fromstring(text)
    vda, hdc = root.findall("./disks/disk")
    assert (vda.get("snapshot"), vda.get("type")) == ("external", "file")
    assert vda.find("source").get("file") == "/pool/cb-x.root.e1-abc.qcow2"  # type: ignore[union-attr]
    assert vda.find("driver").get("type") == "qcow2"  # type: ignore[union-attr]
    assert hdc.get("snapshot") == "no"
    info = snapshots.parse_snapshot(
        text.replace("</domainsnapshot>", "<creationTime>5</creationTime></domainsnapshot>")
    )
    assert info.kind == SnapshotKind.EXTERNAL
    assert info.frozen == {"vda": ROOT.source}
    assert info.has_memory is False


def test_parse_snapshot_as_libvirt_writes_it() -> None:
    text = """<domainsnapshot><name>s2</name><state>running</state><parent><name>s1</name></parent>
      <creationTime>1795724822</creationTime><memory snapshot='internal'/>
      <disks><disk name='vda' snapshot='internal'/><disk name='hdc' snapshot='no'/></disks>
      <domain type='qemu'><name>cb-x</name></domain></domainsnapshot>"""
    info = snapshots.parse_snapshot(text)
    assert (info.name, info.parent, info.state) == ("s2", "s1", "running")
    assert info.create_time == datetime.fromtimestamp(1795724822, UTC)
    assert info.created_epoch == "1795724822"
    assert (info.kind, info.vm_state, info.has_memory) == (SnapshotKind.INTERNAL, VmState.RUNNING, True)
    assert [(d.target, d.mode) for d in info.disks] == [("vda", "internal"), ("hdc", "no")]


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        ("shutoff", VmState.STOPPED),
        ("disk-snapshot", VmState.RUNNING),
        ("paused", VmState.PAUSED),
        ("?", VmState.UNSPECIFIED),
    ],
)
def test_snapshot_states(state: str, expected: VmState) -> None:
    info = SnapshotInfo("s", state, datetime.now(UTC), False, "")
    assert info.vm_state == expected


def test_a_foreign_description_is_not_a_frozen_record() -> None:
    assert snapshots.parse_frozen("my notes") == {}
    assert snapshots.parse_frozen(snapshots.FROZEN_PREFIX + "[1]") == {}
    assert snapshots.parse_frozen(snapshots.FROZEN_PREFIX + "{bad") == {}
    assert snapshots.parse_frozen(snapshots.frozen_description({"vdb": "/b", "vda": "/a"})) == {
        "vda": "/a",
        "vdb": "/b",
    }


def test_domain_disks_and_shares() -> None:
    disks = snapshots.domain_disks(DOMAIN)
    assert disks == [ROOT, SEED]  # the empty cdrom drive has no file
    assert snapshots.snapshot_disks(disks) == [ROOT]
    assert snapshots.has_filesystem_share(DOMAIN)
    assert not snapshots.has_filesystem_share("<domain><devices/></domain>")


def test_with_disk_sources_replaces_the_file_and_forgets_the_old_chain() -> None:
    changed = ET.fromstring(snapshots.with_disk_sources(DOMAIN, {"vda": "/pool/new.qcow2"}))
    vda = changed.find("./devices/disk")
    assert vda is not None
    assert vda.find("source").attrib == {"file": "/pool/new.qcow2"}  # type: ignore[union-attr]
    assert vda.find("backingStore") is None
    assert snapshots.domain_disks(ET.tostring(changed, encoding="unicode"))[1] == SEED


def test_oldest_first_keeps_parents_before_children_within_a_second() -> None:
    t = datetime(2026, 1, 1, tzinfo=UTC)
    later = datetime(2026, 1, 2, tzinfo=UTC)
    infos = [
        SnapshotInfo("c", "shutoff", t, False, "b"),
        SnapshotInfo("z", "shutoff", later, False, "c"),
        SnapshotInfo("a", "shutoff", t, False, ""),
        SnapshotInfo("b", "shutoff", t, False, "a"),
    ]
    assert [i.name for i in snapshots.order_oldest_first(infos)] == ["a", "b", "c", "z"]


needs_qemu_img = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed")


@needs_qemu_img
def test_convert_flattens_a_chain_and_reads_an_internal_snapshot(tmp_path: Path) -> None:
    base, top, out = tmp_path / "base.qcow2", tmp_path / "top.qcow2", tmp_path / "out.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "1M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(top)], check=True)
    assert snapshots.backing_of(str(top)) == str(base)
    assert snapshots.backing_of(str(base)) == ""
    subprocess.run(["qemu-img", "snapshot", "-c", "s1", str(top)], check=True)
    assert snapshots.internal_snapshot_sizes(str(top)) == {"s1": 0}
    snapshots.convert_flat(str(top), str(out), snapshot="s1")
    info = snapshots.image_json(str(out))
    assert info["format"] == "qcow2" and "backing-filename" not in info
    assert info["virtual-size"] == 1024 * 1024
    assert snapshots.allocated_bytes(str(out)) > 0
    assert snapshots.allocated_bytes(str(tmp_path / "gone")) == 0


@needs_qemu_img
def test_qemu_img_failures_are_internal_errors(tmp_path: Path) -> None:
    with pytest.raises(Internal) as err:
        snapshots.image_json(os.fspath(tmp_path / "missing.qcow2"))
    assert err.value.reason == "QEMU_IMG_FAILED"
