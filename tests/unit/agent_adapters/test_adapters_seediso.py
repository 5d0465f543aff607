"""The NoCloud seed ISO, read back with pycdlib."""

from __future__ import annotations

import io

import pycdlib

from clonebox_agent.adapters.seediso import build_seed_iso, read_seed_iso
from clonebox_core.model import CloudInit


def test_seed_has_cidata_and_files_with_their_names() -> None:
    ci = CloudInit(user_data="#cloud-config\nusers: []\n", meta_data="instance-id: x\n", network_config="version: 2\n")
    data = build_seed_iso(ci, instance_id="iid-1", hostname="web")
    files = read_seed_iso(data)
    assert files == {
        "volume_id": b"cidata",
        "user-data": b"#cloud-config\nusers: []\n",
        "meta-data": b"instance-id: x\n",
        "network-config": b"version: 2\n",
    }
    # Joliet keeps the lower-case, dashed names too (Windows-style readers)
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(data))
    try:
        names = {c.file_identifier().decode("utf-16-be") for c in iso.list_children(joliet_path="/")}
        assert {"user-data", "meta-data", "network-config"} <= names
    finally:
        iso.close()


def test_default_meta_data_and_no_network_config() -> None:
    files = read_seed_iso(build_seed_iso(CloudInit(user_data="#cloud-config\n"), instance_id="iid-7", hostname="db"))
    assert files["meta-data"] == b"instance-id: iid-7\nlocal-hostname: db\n"
    assert "network-config" not in files


def test_seed_is_deterministic_in_content() -> None:
    ci = CloudInit(user_data="x")
    a = read_seed_iso(build_seed_iso(ci, instance_id="i", hostname="h"))
    b = read_seed_iso(build_seed_iso(ci, instance_id="i", hostname="h"))
    assert a == b
