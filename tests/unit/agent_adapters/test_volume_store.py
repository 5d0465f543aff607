"""The metadata files of agent volumes (``common.VolumeStore``) and the naming rules that keep volumes apart."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from clonebox_agent.adapters import common
from clonebox_core.errors import InvalidArgument

WHEN = datetime(2026, 11, 27, 9, 30, tzinfo=UTC)


def test_write_read_list_remove(tmp_path: Path) -> None:
    store = common.VolumeStore(str(tmp_path / "volumes"))
    assert store.names() == [] and store.read("db") is None  # the folder is made on first write
    meta = common.VolumeMeta("db", 8, False, (("app", "db"),), WHEN)
    store.write(meta)
    store.write(common.VolumeMeta("logs", 4, True, (), WHEN))
    assert store.read("db") == meta
    assert [m.name for m in store.all()] == ["db", "logs"]
    # a rewrite replaces the whole file, atomically: no temporary file is left beside it
    store.write(common.VolumeMeta("db", 8, False, (), WHEN))
    assert store.read("db") == common.VolumeMeta("db", 8, False, (), WHEN)
    assert sorted(os.listdir(tmp_path / "volumes")) == ["db.json", "logs.json"]
    assert store.remove("db") and not store.remove("db")
    assert store.names() == ["logs"]


def test_unreadable_and_temporary_files_are_no_volumes(tmp_path: Path) -> None:
    folder = tmp_path / "volumes"
    store = common.VolumeStore(str(folder))
    store.write(common.VolumeMeta("db", 8, False, (), WHEN))
    (folder / "broken.json").write_text("{not json")
    (folder / ".db.1234abcd.tmp").write_text("{}")  # what a crash during a write leaves
    assert store.read("broken") is None
    assert [m.name for m in store.all()] == ["db"]


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden"])
def test_names_that_are_no_file_names_are_refused(tmp_path: Path, name: str) -> None:
    store = common.VolumeStore(str(tmp_path))
    with pytest.raises(InvalidArgument):
        store.read(name)


def test_volume_files_never_look_like_a_vms_disks() -> None:
    assert common.agent_volume_file("db", False) == "vol.db.qcow2"
    assert common.agent_volume_file("db", True) == "vol.db.raw"
    assert common.volume_serial("db") == "vol-db"
    inventory = common.Inventory(volumes=("vol.db.qcow2", "cb-web.root.qcow2"), agent_volumes=("db",))
    # a VM named like the volume file's prefix still never owns it
    assert inventory.for_vm("vol", "cb-vol").volumes == ()
    assert inventory.orphans("cb-") == {"web": ["cb-web.root.qcow2"]}
    assert not inventory.is_empty() and not common.Inventory(agent_volumes=("db",)).is_empty()


@pytest.mark.parametrize("prefix", ["", "v", "vol", "vol.", "vol.x"])
def test_a_domain_prefix_overlapping_volume_files_is_refused(prefix: str) -> None:
    with pytest.raises(ValueError, match="name_prefix"):
        common.check_name_prefix(prefix)


def test_the_default_domain_prefix_is_fine() -> None:
    common.check_name_prefix("cb-")
