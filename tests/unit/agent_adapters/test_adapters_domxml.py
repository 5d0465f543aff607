"""Domain XML built from typed models, and the ownership metadata read back."""

from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET
from dataclasses import replace
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clonebox_agent.adapters.libvirt import domxml
from clonebox_core import specjson
from clonebox_core.model import (
    CloudInit,
    DiskSpec,
    KernelBoot,
    NetworkMode,
    NetworkSpec,
    SharedFolder,
    VmSpec,
)

NS = {"cb": domxml.NAMESPACE}

SPEC = VmSpec(
    name="web-1",
    vcpus=2,
    memory_mib=128,
    disks=(DiskSpec("root", base_image="debian.qcow2"), DiskSpec("data", size_mib=64)),
    kernel_boot=KernelBoot("/img/vmlinuz", "/img/initrd.img", 'console=ttyS0 x="<&>\'" ]]>'),
    network=NetworkSpec(NetworkMode.LIBVIRT, "default"),
    shared_folders=(SharedFolder("/srv/share", "share0", read_only=True),),
    cloud_init=CloudInit(user_data="#cloud-config\npassword: '</cb:spec><evil/>'\n", meta_data="", network_config="x"),
    labels=(("app", "web"),),
)


def _config(**overrides: object) -> domxml.DomainConfig:
    base: dict[str, object] = {
        "name": "cb-web-1",
        "uuid": "8d4a3f1e-0000-4000-8000-000000000001",
        "domain_type": "qemu",
        "vcpus": 2,
        "memory_mib": 128,
        "owner": domxml.OwnerMetadata("agent-a", "web-1", SPEC, datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)),
        "disks": (
            domxml.Disk("/s/pool/cb-web-1.root.qcow2", "vda"),
            domxml.Disk("/s/pool/cb-web-1.data.qcow2", "vdb"),
            domxml.Disk("/s/pool/cb-web-1.cidata.iso", "hdc", format="raw", cdrom=True),
        ),
        "kernel": "/img/vmlinuz",
        "initrd": "/img/initrd.img",
        "cmdline": SPEC.kernel_boot.cmdline,  # type: ignore[union-attr]
        "network": "default",
        "filesystems": (domxml.Filesystem("/srv/share", "share0", True),),
        "console_log": "/s/vms/cb-web-1/console.log",
    }
    base.update(overrides)
    return domxml.DomainConfig(**base)  # type: ignore[arg-type]


def test_domain_structure() -> None:
    root = ET.fromstring(domxml.domain_xml(_config()))
    assert root.tag == "domain" and root.get("type") == "qemu"
    assert root.findtext("name") == "cb-web-1"
    assert root.find("memory").get("unit") == "MiB" and root.findtext("memory") == "128"  # type: ignore[union-attr]
    assert root.findtext("vcpu") == "2"
    assert root.find("features/acpi") is not None
    assert root.findtext("on_poweroff") == "destroy"
    assert root.findtext("os/kernel") == "/img/vmlinuz"
    assert root.findtext("os/initrd") == "/img/initrd.img"
    disks = root.findall("devices/disk")
    assert [(d.get("device"), d.find("driver").get("type"), d.find("target").get("bus")) for d in disks] == [  # type: ignore[union-attr]
        ("disk", "qcow2", "virtio"),
        ("disk", "qcow2", "virtio"),
        ("cdrom", "raw", "ide"),
    ]
    assert disks[2].find("readonly") is not None
    iface = root.find("devices/interface")
    assert iface is not None and iface.get("type") == "network"
    assert iface.find("source").get("network") == "default"  # type: ignore[union-attr]
    assert iface.find("model").get("type") == "virtio"  # type: ignore[union-attr]
    fs = root.find("devices/filesystem")
    assert fs is not None and (fs.get("type"), fs.get("accessmode")) == ("mount", "mapped")
    assert fs.find("target").get("dir") == "share0" and fs.find("readonly") is not None  # type: ignore[union-attr]
    channel = root.find("devices/channel/target")
    assert channel is not None and channel.get("name") == "org.qemu.guest_agent.0"
    serial = root.find("devices/serial")
    assert serial is not None and serial.get("type") == "pty"
    assert serial.find("log").get("file") == "/s/vms/cb-web-1/console.log"  # type: ignore[union-attr]
    assert root.find("metadata/cb:owner", NS) is not None


def test_hostile_text_is_escaped_not_interpreted() -> None:
    text = domxml.domain_xml(_config())
    root = ET.fromstring(text)
    # the cmdline comes back verbatim and added no elements
    assert root.findtext("os/cmdline") == SPEC.kernel_boot.cmdline  # type: ignore[union-attr]
    assert root.find(".//evil") is None
    assert len(root.findall("os/*")) == 4


def test_no_interface_without_network_and_boot_from_disk_without_kernel() -> None:
    root = ET.fromstring(domxml.domain_xml(_config(network=None, kernel=None, initrd=None, cmdline="")))
    assert root.find("devices/interface") is None
    assert root.find("os/kernel") is None
    assert root.find("os/boot").get("dev") == "hd"  # type: ignore[union-attr]


@pytest.mark.parametrize("domain_type", ["qemu", "kvm"])
def test_domain_type_from_config(domain_type: str) -> None:
    assert ET.fromstring(domxml.domain_xml(_config(domain_type=domain_type))).get("type") == domain_type


def test_metadata_keeps_the_spec_with_secret_fields_as_digests() -> None:
    text = domxml.domain_xml(_config())
    meta = domxml.parse_owner(text)
    assert meta is not None
    assert SPEC.cloud_init is not None and SPEC.cloud_init.user_data
    # anyone with read-only libvirt access reads the XML: the user-data is there only as its digest
    assert SPEC.cloud_init.user_data.reveal() not in text
    assert meta.spec != SPEC
    assert meta.spec.cloud_init is not None
    assert meta.spec.cloud_init.user_data.reveal() == specjson.secret_digest(SPEC.cloud_init.user_data)
    assert specjson.matches_at_rest(meta.spec, SPEC)
    assert not specjson.matches_at_rest(meta.spec, dataclasses.replace(SPEC, vcpus=SPEC.vcpus + 1))
    assert (meta.agent, meta.vm) == ("agent-a", "web-1")
    assert meta.created == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def test_metadata_element_as_libvirt_returns_it() -> None:
    # virDomainGetMetadata returns the element without its namespace declaration
    element = ET.tostring(domxml.owner_element(_config().owner), encoding="unicode")
    bare = element.replace(f' xmlns:cb="{domxml.NAMESPACE}"', "").replace("<cb:", "<").replace("</cb:", "</")
    meta = domxml.parse_owner(bare)
    assert meta is not None and specjson.matches_at_rest(meta.spec, SPEC)


def test_domain_without_our_metadata_is_not_ours() -> None:
    assert domxml.parse_owner("<domain><name>x</name></domain>") is None
    assert domxml.parse_owner("<domain><metadata><other xmlns='urn:x'/></metadata></domain>") is None


def test_spec_json_round_trip_minimal_and_full() -> None:
    assert domxml.spec_from_json(domxml.spec_to_json(VmSpec(name="a"))) == VmSpec(name="a")
    # a spec with secret fields comes back with digests in their place
    assert specjson.matches_at_rest(domxml.spec_from_json(domxml.spec_to_json(SPEC)), SPEC)
    with pytest.raises(ValueError, match="version"):
        domxml.spec_from_json('{"version": 99, "spec": {}}')


def test_virtio_targets() -> None:
    assert [domxml.virtio_target(i) for i in (0, 1, 25, 26, 27)] == ["vda", "vdb", "vdz", "vdaa", "vdab"]


def test_readers() -> None:
    text = domxml.domain_xml(_config())
    assert domxml.disk_sources(text)[0] == "/s/pool/cb-web-1.root.qcow2"
    assert domxml.console_log(text) == "/s/vms/cb-web-1/console.log"
    assert not domxml.agent_connected(text)
    live = text.replace('name="org.qemu.guest_agent.0"', 'name="org.qemu.guest_agent.0" state="connected"')
    assert domxml.agent_connected(live)


HOSTILE = st.text(alphabet=st.sampled_from(list("<>&\"']]\n\r\t abc/=;-")), min_size=1, max_size=40)
# the command line is one line (validation refuses CR/LF; XML would normalise a bare CR to LF anyway)
ONE_LINE = st.text(alphabet=st.sampled_from(list("<>&\"']]\t abc/=;-")), min_size=1, max_size=40)


@settings(max_examples=200, deadline=None)
@given(key=HOSTILE, value=HOSTILE, cmdline=ONE_LINE)
def test_hostile_labels_and_cmdline_never_change_the_xml_structure(key: str, value: str, cmdline: str) -> None:
    # validation refuses such labels; the XML builder must be safe even if one got past it
    spec = replace(SPEC, labels=((key, value),), kernel_boot=KernelBoot("/img/vmlinuz", "", cmdline))
    owner = domxml.OwnerMetadata("agent-a", "web-1", spec, datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
    text = domxml.domain_xml(_config(owner=owner, cmdline=cmdline))
    root = ET.fromstring(text)
    assert [child.tag for child in root] == [child.tag for child in ET.fromstring(domxml.domain_xml(_config()))]
    assert root.findtext("os/cmdline") == cmdline
    meta = domxml.parse_owner(text)
    assert meta is not None and meta.spec.labels == ((key, value),)


@pytest.mark.parametrize("label", [("a<b", "x"), ("app", "]]>"), ("app", "a\nb"), ("app", "\"'&")])
def test_validation_refuses_markup_in_labels(label: tuple[str, str]) -> None:
    from clonebox_core.errors import InvalidArgument
    from clonebox_core.validate import validate_spec

    with pytest.raises(InvalidArgument):
        validate_spec(replace(SPEC, labels=(label,), kernel_boot=None))
