"""Generated per-VM SSH keys: file modes, reads, removal with the VM, and the sweep after a crash."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from clonebox_agent.adapters.fake import FakeHypervisor
from clonebox_agent.app.keystore import KeyStore
from clonebox_agent.app.service import AgentService
from clonebox_agent.journal.store import Journal
from clonebox_core.errors import FailedPrecondition, InvalidArgument, NotFound
from clonebox_core.model import Auth, DiskSpec, Resources, VmSpec


def test_a_generated_key_is_private_and_its_public_half_matches(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys")
    public = store.generate("web")
    path = tmp_path / "keys" / "web.ed25519"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "keys").st_mode) == 0o700
    private = serialization.load_ssh_private_key(store.read("web").reveal().encode(), password=None)
    derived = private.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    assert public.startswith(derived.decode() + " ") and public.endswith("clonebox-web")
    # a create that a crash cut short left a key: the next create replaces it
    assert store.generate("web") != public


def test_read_remove_and_names(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys")
    with pytest.raises(NotFound) as info:
        store.read("nokey")
    assert info.value.reason == "SSH_KEY_NOT_FOUND"
    store.generate("web")
    assert store.has("web")
    assert store.remove("web").endswith("web.ed25519") and not store.has("web")
    assert store.remove("web") == ""
    with pytest.raises(InvalidArgument):
        store.generate("../etc")  # names become file names: never one that climbs out


def test_a_key_file_others_can_read_is_refused(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys")
    store.generate("web")
    (tmp_path / "keys" / "web.ed25519").chmod(0o644)
    with pytest.raises(FailedPrecondition, match="group or others") as info:
        store.read("web")
    assert info.value.reason == "SECRET_FILE_INSECURE"  # not "no key": it is there, and exposed


def test_sweep_removes_only_keys_of_vms_that_do_not_exist(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys")
    assert store.sweep([]) == []  # no folder yet
    for vm in ("a", "b", "c"):
        store.generate(vm)
    (tmp_path / "keys" / "notes.txt").write_text("not a key")
    removed = store.sweep(["b"])
    assert sorted(Path(p).name for p in removed) == ["a.ed25519", "c.ed25519"]
    assert store.has("b") and (tmp_path / "keys" / "notes.txt").exists()


SPEC = VmSpec(name="web", memory_mib=128, disks=(DiskSpec("root", size_mib=16),), auth=Auth(user="dev"))


async def test_the_service_generates_on_create_removes_on_delete_and_sweeps_at_start(tmp_path: Path) -> None:
    keys = KeyStore(tmp_path / "keys")
    keys.generate("ghost")  # a key whose VM a crash took away before its create committed
    fake = FakeHypervisor(host_name="h")
    svc = AgentService("h", fake, Journal(tmp_path / "j.db"), reserve=Resources(), stop_timeout_seconds=1, keys=keys)
    await svc.start()
    try:
        assert not keys.has("ghost")
        await svc.create(SPEC, request_id="r1")
        assert keys.has("web")
        assert (await svc.ssh_key("web", actor="spiffe://t/user/admin/a")).reveal().startswith("-----BEGIN")
        removed = await svc.delete("web", request_id="d1")
        assert any(p.endswith("web.ed25519") for p in removed) and not keys.has("web")
    finally:
        await svc.close()


async def test_a_failed_create_leaves_no_key(tmp_path: Path) -> None:
    keys = KeyStore(tmp_path / "keys")
    fake = FakeHypervisor(host_name="h", fail_on={"create:define": RuntimeError("injected")})
    svc = AgentService("h", fake, Journal(tmp_path / "j.db"), reserve=Resources(), stop_timeout_seconds=1, keys=keys)
    await svc.start()
    try:
        with pytest.raises(RuntimeError, match="injected"):
            await svc.create(SPEC, request_id="r1")
        assert not keys.has("web")
    finally:
        await svc.close()
