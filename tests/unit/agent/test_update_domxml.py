"""The domain XML and metadata edits of an update (libvirt adapter): only vCPUs, memory and four spec keys change."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import replace
from datetime import UTC, datetime

from clonebox_agent.adapters import common
from clonebox_agent.adapters.libvirt import domxml
from clonebox_core.health import FileProbe, Probe, ProbeType
from clonebox_core.model import Auth, AuthMethod, CloudInit, DiskSpec, VmSpec

HASH = "$6$salt$" + "x" * 86
SPEC = VmSpec(
    name="web",
    vcpus=1,
    memory_mib=128,
    disks=(DiskSpec("root", size_mib=16),),
    cloud_init=CloudInit(user_data="#cloud-config\nhostname: hunter2\n"),
    auth=Auth(user="dev", method=AuthMethod.PASSWORD, password_hash=HASH),  # type: ignore[arg-type]
    labels=(("app", "web"),),
)
CHECK = Probe("ready", ProbeType.FILE, interval_ms=5000, timeout_ms=1000, file=FileProbe("/run/ready"))
META = domxml.OwnerMetadata("agent-a", "web", SPEC, datetime(2030, 1, 1, tzinfo=UTC))

#: what libvirt answers for an inactive domain it completed (trimmed): addresses, a MAC, NVRAM, another app's
#: metadata next to ours
INACTIVE = f"""<domain type='qemu'>
  <name>cb-web</name>
  <uuid>6c1b1f58-7c3f-4f1e-9a55-55f0d0a7b6a1</uuid>
  <metadata>
    <other:app xmlns:other="https://example.org/other"><other:x>1</other:x></other:app>
    {ET.tostring(domxml.owner_element(META), encoding="unicode")}
  </metadata>
  <memory unit='KiB'>131072</memory>
  <currentMemory unit='KiB'>131072</currentMemory>
  <vcpu placement='static' current='1'>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader>
    <nvram>/var/lib/libvirt/qemu/nvram/cb-web_VARS.fd</nvram>
  </os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/srv/pool/cb-web.root.qcow2'/>
      <target dev='vda' bus='virtio'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x04' function='0x0'/>
    </disk>
    <interface type='network'>
      <mac address='52:54:00:12:34:56'/>
      <source network='cb-shop'/>
      <model type='virtio'/>
    </interface>
  </devices>
</domain>"""


def test_with_definition_changes_vcpus_memory_and_our_metadata_only() -> None:
    new_spec = replace(SPEC, vcpus=2, memory_mib=256)
    text = domxml.patch_spec_text(domxml.spec_to_json(SPEC), common.update_fields(new_spec))
    out = domxml.with_definition(INACTIVE, 2, 256, domxml.owner_element(replace(META, spec=new_spec), text))
    root = ET.fromstring(out)
    assert domxml.resources(out) == (2, 256)
    vcpu = root.find("vcpu")
    assert vcpu is not None and vcpu.get("current") is None and vcpu.get("placement") == "static"
    current = root.find("currentMemory")
    assert current is not None and (current.text, current.get("unit")) == ("262144", "KiB")
    # everything else as it was: disks, their addresses, the MAC, NVRAM, another app's metadata
    before = ET.fromstring(INACTIVE)
    for path in ("./devices/disk", "./devices/interface", "./os", "uuid", "name"):
        assert [ET.tostring(e) for e in root.findall(path)] == [ET.tostring(e) for e in before.findall(path)], path
    assert root.find("./metadata/{https://example.org/other}app") is not None
    owners = root.findall(f"./metadata/{{{domxml.NAMESPACE}}}owner")
    assert len(owners) == 1
    parsed = domxml.parse_owner(out)
    assert parsed is not None and (parsed.agent, parsed.vm, parsed.created) == (META.agent, META.vm, META.created)
    assert (parsed.spec.vcpus, parsed.spec.memory_mib) == (2, 256)
    assert domxml.spec_text(out) == text


def test_the_spec_document_changes_in_the_four_keys_only_and_secrets_stay_digests() -> None:
    before = domxml.spec_to_json(SPEC)
    new_spec = replace(SPEC, labels=(("app", "api"),), health_checks=(CHECK,), memory_mib=256)
    after = domxml.patch_spec_text(before, common.update_fields(new_spec))
    doc_before, doc_after = json.loads(before), json.loads(after)
    assert doc_after["version"] == doc_before["version"]
    changed = {k for k in doc_after["spec"] if doc_after["spec"].get(k) != doc_before["spec"].get(k)}
    assert changed == {"labels", "health_checks", "memory_mib"}
    # the stored digests are kept as they are (never a digest of a digest), and no secret appears
    assert doc_after["spec"]["cloud_init"] == doc_before["spec"]["cloud_init"]
    assert doc_after["spec"]["auth"]["password_hash"] == doc_before["spec"]["auth"]["password_hash"]
    assert "hunter2" not in after and HASH not in after
    # written as spec_to_json writes: the same text a create of the updated spec would have stored
    assert after == domxml.spec_to_json(new_spec)
    # no health checks any more: the key goes, as spec_to_json leaves it out
    back = domxml.patch_spec_text(after, common.update_fields(SPEC))
    assert back == before


def test_the_metadata_element_for_set_metadata_reads_back() -> None:
    text = domxml.spec_to_json(SPEC)
    xml = domxml.owner_metadata_xml(META, text)
    assert xml.startswith("<owner ")  # libvirt adds the namespace itself
    parsed = domxml.parse_owner(xml)
    assert parsed is not None and parsed.agent == "agent-a" and domxml.spec_text(xml) == text


def test_resources_read_libvirt_units() -> None:
    assert domxml.resources("<domain><vcpu>3</vcpu><memory unit='MiB'>96</memory></domain>") == (3, 96)
    assert domxml.resources("<domain><vcpu>1</vcpu><memory unit='GiB'>2</memory></domain>") == (1, 2048)
    assert domxml.resources("<domain><vcpu>1</vcpu><memory>65536</memory></domain>") == (1, 64)


def test_with_fields_keeps_everything_but_the_four() -> None:
    new = replace(SPEC, vcpus=4, disks=(), cloud_init=None, health_checks=(CHECK,))
    kept = common.with_fields(SPEC, common.update_fields(new))
    assert kept == replace(SPEC, vcpus=4, health_checks=(CHECK,))
    assert kept.auth is not None and kept.auth.password_hash.reveal() == HASH
