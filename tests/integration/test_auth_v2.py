"""
Version-2 auth through the real controller and agent (fake hypervisor, real gRPC over mTLS).

The CLI's resolution (``clonebox_cli.specinput``) runs here as the CLI runs it: the password comes from
a provider, only its hash is sent; the seed holds the hash; the stores hold no password; every
resolved reference is a ``secret.access`` audit record; a generated per-VM key is readable only by
operators and goes away with its VM.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import grpc
import grpc.aio
import pytest
import yaml
from clonebox.controller.v1 import (
    audit_service_pb2,
    audit_service_pb2_grpc,
    operation_service_pb2,
    vm_service_pb2,
    vm_service_pb2_grpc,
)
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from clonebox_agent.adapters.common import seed_volume_name
from clonebox_agent.adapters.seediso import read_seed_iso
from clonebox_agent.app.service import CLOUD_INIT_DONE
from clonebox_agent.ports import GuestExecResult
from clonebox_cli.specinput import LoadedSpec, prepare
from clonebox_core.model import Resources
from clonebox_core.rpc.convert import REDACTED, spec_to_proto
from clonebox_core.secret import Secret
from clonebox_core.secrets.passwords import sha512_crypt
from clonebox_core.secrets.sshkeys import generate_ed25519_keypair
from clonebox_core.spec import load_spec_text
from clonebox_core.validate import PASSWORD_HASH
from tests.integration.conftest import TRUST_DOMAIN, Fleet, eventually
from tests.integration.test_fleet import create, error_info
from tests.integration.test_fleet import spec as spec_pb

pytestmark = pytest.mark.integration

CANARY = "canary-v2-pw-51f0a9c2"
SMALL = Resources(vcpus=4, memory_mib=4096, disk_mib=100_000)
ADMIN = f"spiffe://{TRUST_DOMAIN}/user/admin/admin"


def v2(name: str, auth: str) -> str:
    return f"version: 2\nname: {name}\nmemory: 256MiB\ndisks: [{{name: root, size: 512MiB}}]\n{auth}"


def seed_user_data(fleet: Fleet, host: str, vm: str) -> str:
    fake = fleet.fakes[host]
    path = fake._volumes[seed_volume_name(fake.name_prefix + vm)]  # the fake keeps volumes as files
    return read_seed_iso(Path(path).read_bytes())["user-data"].decode()


async def audit_records(fleet: Fleet, action: str) -> list[object]:
    stub = audit_service_pb2_grpc.AuditServiceStub(fleet.channel)
    request = audit_service_pb2.ListAuditEventsRequest(
        filter=audit_service_pb2.AuditFilter(action=action), page_size=100
    )
    resp = await stub.ListAuditEvents(request)
    return list(resp.records)


def files_under(*roots: Path) -> list[Path]:
    return [Path(d) / f for root in roots for d, _, names in os.walk(root) for f in names]


async def test_a_password_reaches_the_guest_only_as_a_hash(fleet: Fleet) -> None:
    await fleet.add_agent("h1", SMALL)
    loaded = LoadedSpec(
        load_spec_text(v2("pw-1", "auth: {user: dev, method: password, password: env:CB_TEST_PW}\n")), None
    )
    prepared = prepare(loaded, environ={"CB_TEST_PW": CANARY})
    assert prepared.spec.auth is not None and PASSWORD_HASH.fullmatch(prepared.spec.auth.password_hash.reveal())
    vm = await create(fleet, spec_to_proto(prepared.spec), request_id="pw-1")
    # readers see the spec without the hash
    assert vm.spec.auth.password_hash == REDACTED
    got = (await fleet.vms.GetVm(vm_service_pb2.GetVmRequest(name="pw-1"))).vm
    assert got.spec.auth.password_hash == REDACTED and got.spec.auth.password == "env:CB_TEST_PW"

    user_data = yaml.safe_load(seed_user_data(fleet, "h1", "pw-1"))
    assert user_data["ssh_pwauth"] is True
    assert user_data["chpasswd"]["users"] == [
        {"name": "dev", "password": prepared.spec.auth.password_hash.reveal(), "type": "hash"}
    ]
    # the value itself is in no file the controller or the agent wrote (database, journal, seed, keys)
    for path in files_under(fleet.tmp):
        assert CANARY.encode() not in path.read_bytes(), path

    async def audited() -> bool:
        return bool(await audit_records(fleet, "secret.access"))

    await eventually(audited, what="the secret.access record")
    [record] = await audit_records(fleet, "secret.access")
    event = record.event  # type: ignore[attr-defined]
    assert event.actor == ADMIN and event.resource == "vms/pw-1" and event.request_id == "pw-1"
    assert event.details["ref"] == "env:CB_TEST_PW" and event.details["resolved_by"] == "client"


async def test_a_password_sent_where_the_hash_belongs_is_refused_unquoted(fleet: Fleet) -> None:
    await fleet.add_agent("h1", SMALL)
    spec = load_spec_text(v2("pw-2", "auth: {method: password, password: env:X}\n"))
    proto = spec_to_proto(spec)
    proto.auth.password_hash = CANARY  # a client that skipped the hashing
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await fleet.vms.CreateVm(vm_service_pb2.CreateVmRequest(spec=proto, request_id="pw-2"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert CANARY not in (caught.value.details() or "")
    assert error_info(caught.value).metadata["field"] == "spec.auth.password_hash"
    # and a reference without its hash: the server says the client must resolve it
    proto.auth.password_hash = ""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await fleet.vms.CreateVm(vm_service_pb2.CreateVmRequest(spec=proto, request_id="pw-3"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "resolves auth.password" in (caught.value.details() or "")


async def test_a_generated_key_is_for_operators_audited_and_removed_with_its_vm(fleet: Fleet) -> None:
    await fleet.add_agent("h1", SMALL)
    prepared = prepare(LoadedSpec(load_spec_text(v2("key-1", "auth: {user: ops}\n")), None), environ={})
    await create(fleet, spec_to_proto(prepared.spec), request_id="key-1")
    key_file = fleet.tmp / "agent-h1" / "ssh-keys" / "key-1.ed25519"
    assert key_file.stat().st_mode & 0o777 == 0o600

    resp = await fleet.vms.GetVmSshKey(vm_service_pb2.GetVmSshKeyRequest(name="key-1"))
    assert (resp.user, resp.host) == ("ops", "h1")
    private = serialization.load_ssh_private_key(resp.private_key.encode(), password=None)
    assert isinstance(private, Ed25519PrivateKey)
    public = private.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    user_data = yaml.safe_load(seed_user_data(fleet, "h1", "key-1"))
    [user] = user_data["users"]
    assert [k.rsplit(" ", 1)[0] for k in user["ssh_authorized_keys"]] == [public.decode()]
    assert user["lock_passwd"] is True and user_data["ssh_pwauth"] is False and "chpasswd" not in user_data

    viewer = vm_service_pb2_grpc.VmServiceStub(fleet.user_channel("viewer", "vic"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await viewer.GetVmSshKey(vm_service_pb2.GetVmSshKeyRequest(name="key-1"))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED

    async def audited() -> bool:
        return any(
            r.event.origin == "agent/h1" and r.event.actor == ADMIN  # type: ignore[attr-defined]
            for r in await audit_records(fleet, "secret.access")
        )

    await eventually(audited, what="the agent's secret.access record for the key read")

    op = (await fleet.vms.DeleteVm(vm_service_pb2.DeleteVmRequest(name="key-1", request_id="del-key-1"))).operation
    done = (await fleet.ops.WaitOperation(operation_service_pb2.WaitOperationRequest(id=op.id))).operation
    assert done.done and not done.HasField("error"), done
    assert not key_file.exists()


async def test_a_vm_without_a_generated_key_says_so(fleet: Fleet) -> None:
    await fleet.add_agent("h1", SMALL)
    _private, inline = generate_ed25519_keypair("me@laptop")
    text = v2("key-2", f"auth:\n  ssh_keys: ['{inline}']\n")
    prepared = prepare(LoadedSpec(load_spec_text(text), None), environ={})
    assert prepared.spec.auth is not None and prepared.spec.auth.ssh_authorized_keys == (inline,)
    await create(fleet, spec_to_proto(prepared.spec), request_id="key-2")
    assert not (fleet.tmp / "agent-h1" / "ssh-keys" / "key-2.ed25519").exists()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await fleet.vms.GetVmSshKey(vm_service_pb2.GetVmSshKeyRequest(name="key-2"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(caught.value).reason == "SSH_KEY_NOT_FOUND"


async def test_rotation_sets_the_new_hash_and_keys_in_the_guest_and_records_them(fleet: Fleet) -> None:
    await fleet.add_agent("h1", SMALL)
    text = v2("rot-1", "auth: {user: dev, method: both, password: env:CB_PW}\n")
    prepared = prepare(LoadedSpec(load_spec_text(text), None), environ={"CB_PW": CANARY})
    await create(fleet, spec_to_proto(prepared.spec), request_id="rot-1")
    fake = fleet.fakes["h1"]
    new_hash = sha512_crypt(Secret("rotated-" + CANARY))
    _private, new_key = generate_ed25519_keypair("new@laptop")
    request = vm_service_pb2.RotateVmSecretRequest(
        name="rot-1",
        request_id="rot-1-a",
        password_hash=new_hash,
        ssh_authorized_keys=[new_key],
        replace_keys=True,
        secret_refs=["env:CB_PW_NEW"],
    )
    resp = await fleet.vms.RotateVmSecret(request)
    assert (resp.user, list(resp.changed), resp.host) == ("dev", ["password", "keys"], "h1")
    assert fake.guest_execs[0] == ("rot-1", ("chpasswd", "-e"), f"dev:{new_hash}\n".encode())
    _vm, argv, stdin = fake.guest_execs[1]
    assert argv[:2] == ("/bin/sh", "-c") and argv[-1] == "dev" and stdin == f"{new_key}\n".encode()
    # the hash is on stdin, never on a command line other guest processes can read
    assert all(new_hash not in arg for _, argv_, _ in fake.guest_execs for arg in argv_)
    stored = fleet.controller.store.get_vm("rot-1").spec.auth
    assert stored is not None
    assert stored.password_hash.reveal() == new_hash and stored.ssh_authorized_keys == (new_key,)

    # a retry with the same request id does not run anything in the guest again
    again = await fleet.vms.RotateVmSecret(request)
    assert list(again.changed) == ["password", "keys"] and len(fake.guest_execs) == 2
    actions = [r.event.action for r in await audit_records(fleet, "vm.rotate_secret")]  # type: ignore[attr-defined]
    assert "vm.rotate_secret" in actions
    refs = [r.event.details["ref"] for r in await audit_records(fleet, "secret.access")]  # type: ignore[attr-defined]
    assert "env:CB_PW_NEW" in refs


async def test_a_failed_guest_command_changes_no_record(fleet: Fleet) -> None:
    await fleet.add_agent("h1", SMALL)
    text = v2("rot-2", "auth: {user: dev, method: password, password: env:CB_PW}\n")
    prepared = prepare(LoadedSpec(load_spec_text(text), None), environ={"CB_PW": CANARY})
    await create(fleet, spec_to_proto(prepared.spec), request_id="rot-2")
    before = fleet.controller.store.get_vm("rot-2").spec.auth
    fleet.fakes["h1"].guest_exec_handler = lambda vm, argv, stdin: GuestExecResult(1, b"", b"chpasswd: no such user\n")
    new_hash = sha512_crypt(Secret("another"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await fleet.vms.RotateVmSecret(
            vm_service_pb2.RotateVmSecretRequest(
                name="rot-2", request_id="rot-2-a", password_hash=new_hash, secret_refs=["env:CB_PW_FAIL"]
            )
        )
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(caught.value).reason == "GUEST_COMMAND_FAILED"
    assert new_hash not in (caught.value.details() or "")
    assert fleet.controller.store.get_vm("rot-2").spec.auth == before
    # the client read the secret even though the guest refused it: that access is on record
    refs = [r.event.details["ref"] for r in await audit_records(fleet, "secret.access")]  # type: ignore[attr-defined]
    assert "env:CB_PW_FAIL" in refs
    # and a plain password where the hash belongs never reaches the guest
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await fleet.vms.RotateVmSecret(
            vm_service_pb2.RotateVmSecretRequest(name="rot-2", request_id="rot-2-b", password_hash=CANARY)
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and CANARY not in (caught.value.details() or "")
    assert len(fleet.fakes["h1"].guest_execs) == 1


async def test_a_version_1_vm_has_nothing_to_rotate(fleet: Fleet) -> None:
    await fleet.add_agent("h1", SMALL)
    await create(fleet, spec_pb("old-1"), request_id="old-1")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await fleet.vms.RotateVmSecret(
            vm_service_pb2.RotateVmSecretRequest(name="old-1", request_id="old-1-r", replace_keys=True)
        )
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(caught.value).reason == "NO_MANAGED_LOGIN"


async def test_the_seed_is_detached_once_the_guest_reports_cloud_init_done(fleet: Fleet) -> None:
    await fleet.add_agent("h1", SMALL, seed_poll_seconds=0.1)
    text = v2("seed-1", "cloud_init: {detach_seed_after_boot: true}\n")
    prepared = prepare(LoadedSpec(load_spec_text(text), None), environ={})
    await create(fleet, spec_to_proto(prepared.spec), request_id="seed-1")
    fake = fleet.fakes["h1"]
    seed = seed_volume_name(fake.name_prefix + "seed-1")
    path = fake._volumes[seed]
    assert await asyncio.to_thread(os.path.exists, path)
    # several polls while cloud-init is "running": the seed stays
    await eventually(lambda: _calls_at_least(fake, 3), what="the agent asking the guest a few times")
    assert await asyncio.to_thread(os.path.exists, path)
    # cloud-init is done, but marking its instance as kept fails: the seed stays (a reboot without it
    # would otherwise make cloud-init treat the VM as a new instance)
    fake.guest_exec_handler = lambda vm, argv, stdin: GuestExecResult(1)
    fake.guest_files.setdefault("seed-1", set()).add(CLOUD_INIT_DONE)
    await eventually(lambda: _execs_at_least(fake, 2), what="two attempts to mark the instance")
    assert await asyncio.to_thread(os.path.exists, path)
    fake.guest_exec_handler = None
    await eventually(lambda: _gone(path), what="the seed detached and deleted")
    assert seed not in fake._volumes
    _vm, argv, _stdin = fake.guest_execs[-1]
    assert argv[:2] == ("/bin/sh", "-c") and "manual-clean" in argv[2]

    async def audited() -> bool:
        return bool(await audit_records(fleet, "vm.seed_detach"))

    await eventually(audited, what="the agent's vm.seed_detach record")


async def _calls_at_least(fake: object, n: int) -> bool:
    return bool(fake.calls["guest_file_exists"] >= n)  # type: ignore[attr-defined]


async def _execs_at_least(fake: object, n: int) -> bool:
    return len(fake.guest_execs) >= n  # type: ignore[attr-defined]


async def _gone(path: str) -> bool:
    return not await asyncio.to_thread(os.path.exists, path)
