"""Specs at rest (``specjson``), on the wire (``rpc.convert``) and the checks a create request must pass."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from typing import Any

import pytest

from clonebox_core.errors import InvalidArgument
from clonebox_core.model import (
    Auth,
    AuthMethod,
    CloudInit,
    DiskSpec,
    KernelBoot,
    NetworkMode,
    NetworkSpec,
    Provision,
    SharedFolder,
    ShareDriver,
    Vm,
    VmSpec,
    VmState,
)
from clonebox_core.rpc import convert
from clonebox_core.secret import Secret
from clonebox_core.secrets.passwords import sha512_crypt
from clonebox_core.specjson import DIGEST_PREFIX, matches_at_rest, secret_digest, spec_from_dict, spec_to_dict
from clonebox_core.validate import PASSWORD_HASH, validate_resolved, validate_spec

pytestmark = pytest.mark.unit

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICU6mAp6Qx1PQuxlMEUVXkS3gNgm9tAKK6Cjn5rygM5/ alice@laptop"
KEY2 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPAJQB9CV+E3rRu+1Xtw210fC0MDNlPTIXvCPWuGnxKl bob@desk"
PLAIN = "my pass phrase"
HASH = sha512_crypt(Secret(PLAIN), "jsonSalt")
USER_DATA = "#cloud-config\nwrite_files: [{path: /etc/token, content: tok-3xq9-user-data}]\n"
USER_DATA_NEEDLE = "tok-3xq9-user-data"

PLAIN_SPEC = VmSpec(
    name="plain",
    vcpus=2,
    memory_mib=256,
    disks=(DiskSpec("root", "base.qcow2", 2048), DiskSpec("scratch", size_mib=64)),
    kernel_boot=KernelBoot("vmlinux", "initrd.img", "console=ttyS0"),
    network=NetworkSpec(NetworkMode.NONE),
    labels=(("app", "demo"), ("tier", "test")),
)
V1_CLOUD = dataclasses.replace(
    PLAIN_SPEC,
    name="v1-cloud",
    shared_folders=(SharedFolder("/srv/x", "x", True),),
    cloud_init=CloudInit(Secret("#!/bin/sh\necho " + USER_DATA_NEEDLE + "\n"), "instance-id: a\n", "version: 2\n"),
)
RESOLVED = VmSpec(
    name="web-1",
    memory_mib=512,
    disks=(DiskSpec("root", "debian-12.qcow2"),),
    auth=Auth(
        user="alice",
        method=AuthMethod.BOTH,
        ssh_keys=("~/.ssh/id_ed25519.pub", "github:alice"),
        password="env:VM_PASSWORD",
        ssh_authorized_keys=(KEY, KEY2),
        password_hash=Secret(HASH),
        secret_refs=("env:VM_PASSWORD",),
    ),
    provision=Provision(("nginx",), ("hello-world",), ("nginx.service",), ("echo ready",)),
    shared_folders=(
        SharedFolder("/srv/www", "www", True, "/var/www", ShareDriver.NINE_P),
        SharedFolder("/srv/bulk", "bulk", False, "/bulk", ShareDriver.VIRTIOFS),
    ),
    cloud_init=CloudInit(Secret(USER_DATA), detach_seed_after_boot=True),
    labels=(("app", "web"),),
)
KEYS_ONLY = VmSpec(
    name="keys-only",
    kernel_boot=KernelBoot("vmlinux"),
    auth=Auth(ssh_authorized_keys=(KEY,)),
)
OTP = VmSpec(
    name="otp",
    kernel_boot=KernelBoot("vmlinux"),
    auth=Auth(user="ops", method=AuthMethod.ONE_TIME_PASSWORD, password_hash=Secret(sha512_crypt(Secret("x")))),
    provision=Provision(),
)
DEFAULT_AUTH = VmSpec(name="default-auth", kernel_boot=KernelBoot("vmlinux"), auth=Auth())

SPECS = {
    "plain": PLAIN_SPEC,
    "v1-cloud-init": V1_CLOUD,
    "resolved": RESOLVED,
    "keys-only": KEYS_ONLY,
    "one-time-password": OTP,
    "default-auth": DEFAULT_AUTH,
}


def through_json(data: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(data))
    assert isinstance(out, dict)
    return out


def with_secrets(spec: VmSpec, user_data: Secret | None, password_hash: Secret | None) -> VmSpec:
    """``spec`` with its secret fields replaced (where it has them)."""
    if spec.cloud_init is not None and user_data is not None:
        spec = dataclasses.replace(spec, cloud_init=dataclasses.replace(spec.cloud_init, user_data=user_data))
    if spec.auth is not None and password_hash is not None:
        spec = dataclasses.replace(spec, auth=dataclasses.replace(spec.auth, password_hash=password_hash))
    return spec


def test_the_fixtures_are_valid() -> None:
    for spec in SPECS.values():
        validate_resolved(spec)


# ------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_keep_round_trips_through_json(spec: VmSpec) -> None:
    data = spec_to_dict(spec, secrets="keep")
    assert spec_from_dict(through_json(data)) == spec
    assert spec_to_dict(spec_from_dict(through_json(data)), secrets="keep") == data


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_digest_round_trips_everything_but_the_secrets(spec: VmSpec) -> None:
    back = spec_from_dict(through_json(spec_to_dict(spec, secrets="digest")))
    user_data = secret_digest(spec.cloud_init.user_data) if spec.cloud_init else None
    password_hash = secret_digest(spec.auth.password_hash) if spec.auth else None
    expected = with_secrets(
        spec,
        Secret(user_data) if user_data is not None else None,
        Secret(password_hash) if password_hash is not None else None,
    )
    assert back == expected
    # writing back what was read is stable: digests are not digested again
    assert spec_to_dict(back, secrets="keep") == spec_to_dict(spec, secrets="digest")


def test_keep_writes_the_secrets_whole() -> None:
    data = spec_to_dict(RESOLVED, secrets="keep")
    assert data["cloud_init"]["user_data"] == USER_DATA
    assert data["auth"]["password_hash"] == HASH
    assert data["auth"]["ssh_authorized_keys"] == [KEY, KEY2]
    assert data["shared_folders"][1] == {
        "host_path": "/srv/bulk",
        "tag": "bulk",
        "read_only": False,
        "mount": "/bulk",
        "driver": "VIRTIOFS",
    }


@pytest.mark.parametrize("spec", [RESOLVED, V1_CLOUD, OTP], ids=["resolved", "v1-cloud-init", "otp"])
def test_digest_json_holds_neither_user_data_nor_the_hash(spec: VmSpec) -> None:
    text = json.dumps(spec_to_dict(spec, secrets="digest"))
    if spec.cloud_init is not None:
        assert spec.cloud_init.user_data.reveal() not in text
        assert USER_DATA_NEEDLE not in text
        assert secret_digest(spec.cloud_init.user_data) in text
    if spec.auth is not None:
        hash_value = spec.auth.password_hash.reveal()
        assert hash_value not in text
        assert hash_value.rsplit("$", 1)[1] not in text  # not even the checksum part
        assert secret_digest(spec.auth.password_hash) in text
    assert "$6$" not in text
    assert PLAIN not in text


def test_digest_keeps_the_public_parts() -> None:
    data = spec_to_dict(RESOLVED, secrets="digest")
    assert data["auth"]["ssh_authorized_keys"] == [KEY, KEY2]
    assert data["auth"]["password"] == "env:VM_PASSWORD"  # a reference, not a password
    assert data["auth"]["secret_refs"] == ["env:VM_PASSWORD"]
    assert data["provision"]["post_commands"] == ["echo ready"]


def test_secret_digest() -> None:
    assert secret_digest(Secret("")) == ""
    assert secret_digest(Secret("abc")) == DIGEST_PREFIX + hashlib.sha256(b"abc").hexdigest()
    assert secret_digest(Secret("abc")) != secret_digest(Secret("abd"))


def test_empty_secrets_stay_empty_in_digest_mode() -> None:
    spec = dataclasses.replace(DEFAULT_AUTH, cloud_init=CloudInit(meta_data="instance-id: a\n"))
    data = spec_to_dict(spec, secrets="digest")
    assert data["cloud_init"]["user_data"] == "" and data["auth"]["password_hash"] == ""
    assert spec_from_dict(through_json(data)) == spec


# ---------------------------------------------------------------------------------- matches_at_rest


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_matches_at_rest_for_the_same_spec(spec: VmSpec) -> None:
    digest = spec_from_dict(through_json(spec_to_dict(spec, secrets="digest")))
    keep = spec_from_dict(through_json(spec_to_dict(spec, secrets="keep")))
    assert matches_at_rest(digest, spec)
    assert matches_at_rest(keep, spec)


def _auth(spec: VmSpec, **changes: Any) -> VmSpec:
    assert spec.auth is not None
    return dataclasses.replace(spec, auth=dataclasses.replace(spec.auth, **changes))


CHANGES: dict[str, Callable[[VmSpec], VmSpec]] = {
    "vcpus": lambda s: dataclasses.replace(s, vcpus=s.vcpus + 1),
    "memory": lambda s: dataclasses.replace(s, memory_mib=s.memory_mib * 2),
    "a key": lambda s: _auth(s, ssh_authorized_keys=(KEY,)),
    "the key order": lambda s: _auth(s, ssh_authorized_keys=(KEY2, KEY)),
    "the hash": lambda s: _auth(s, password_hash=Secret(sha512_crypt(Secret(PLAIN), "otherSalt"))),
    "the method": lambda s: _auth(s, method=AuthMethod.PASSWORD),
    "the user": lambda s: _auth(s, user="bob"),
    "the password reference": lambda s: _auth(s, password="env:OTHER"),
    "user_data": lambda s: with_secrets(s, Secret(USER_DATA + "timezone: UTC\n"), None),
    "no cloud_init": lambda s: dataclasses.replace(s, cloud_init=None),
    "detach_seed": lambda s: with_secrets(
        dataclasses.replace(s, cloud_init=CloudInit(Secret(USER_DATA), detach_seed_after_boot=False)), None, None
    ),
    "a package": lambda s: dataclasses.replace(s, provision=Provision(("apache2",), ("hello-world",))),
    "no provision": lambda s: dataclasses.replace(s, provision=None),
    "a mount": lambda s: dataclasses.replace(
        s, shared_folders=(SharedFolder("/srv/www", "www", True, "/srv/www"), s.shared_folders[1])
    ),
    "a driver": lambda s: dataclasses.replace(
        s, shared_folders=(s.shared_folders[0], SharedFolder("/srv/bulk", "bulk", False, "/bulk"))
    ),
    "no auth": lambda s: dataclasses.replace(s, auth=None),
    "labels": lambda s: dataclasses.replace(s, labels=()),
}


@pytest.mark.parametrize("change", CHANGES.values(), ids=CHANGES.keys())
@pytest.mark.parametrize("mode", ["digest", "keep"])
def test_matches_at_rest_is_false_when_anything_differs(change: Callable[[VmSpec], VmSpec], mode: str) -> None:
    other = change(RESOLVED)
    assert other != RESOLVED
    at_rest = spec_from_dict(through_json(spec_to_dict(RESOLVED, secrets="digest" if mode == "digest" else "keep")))
    assert not matches_at_rest(at_rest, other)
    other_at_rest = spec_from_dict(through_json(spec_to_dict(other, secrets="digest" if mode == "digest" else "keep")))
    assert not matches_at_rest(other_at_rest, RESOLVED)


def test_a_digest_is_not_taken_for_the_value() -> None:
    at_rest = spec_from_dict(through_json(spec_to_dict(RESOLVED, secrets="digest")))
    # the recorded spec is the real one; a request carrying the digests as values is not it
    assert not matches_at_rest(RESOLVED, at_rest)


# ------------------------------------------------------------------------------- older stored dicts


OLD_DICT: dict[str, Any] = {
    "name": "old",
    "vcpus": 1,
    "memory_mib": 128,
    "disks": [{"name": "root", "base_image": "base.qcow2", "size_mib": 0}],
    "kernel_boot": None,
    "network": {"mode": "LIBVIRT", "libvirt_network": "default"},
    "shared_folders": [{"host_path": "/srv/x", "tag": "x", "read_only": True}],
    "cloud_init": {"user_data": "#cloud-config\n", "meta_data": "", "network_config": ""},
    "labels": [["app", "old"]],
}


def test_an_older_dict_without_the_new_keys_decodes_with_defaults() -> None:
    spec = spec_from_dict(OLD_DICT)
    assert spec.auth is None and spec.provision is None
    assert spec.shared_folders == (SharedFolder("/srv/x", "x", True, "", ShareDriver.NINE_P),)
    assert spec.cloud_init == CloudInit(Secret("#cloud-config\n"), "", "", False)
    assert spec == VmSpec(
        name="old",
        vcpus=1,
        memory_mib=128,
        disks=(DiskSpec("root", "base.qcow2"),),
        shared_folders=(SharedFolder("/srv/x", "x", True),),
        cloud_init=CloudInit(Secret("#cloud-config\n")),
        labels=(("app", "old"),),
    )


def test_an_auth_dict_with_only_some_keys_decodes_with_defaults() -> None:
    spec = spec_from_dict({**OLD_DICT, "auth": {}, "provision": {"packages": ["git"]}})
    assert spec.auth == Auth()
    assert spec.provision == Provision(packages=("git",))


def test_a_minimal_dict_decodes() -> None:
    spec = spec_from_dict({"name": "bare"})
    assert spec == VmSpec(name="bare")


# ------------------------------------------------------------------------------------ on the wire


def test_spec_to_proto_redact_masks_user_data_and_the_hash() -> None:
    msg = convert.spec_to_proto(RESOLVED, redact=True)
    assert msg.cloud_init.user_data == convert.REDACTED
    assert msg.auth.password_hash == convert.REDACTED
    wire = msg.SerializeToString()
    assert HASH.encode() not in wire and USER_DATA_NEEDLE.encode() not in wire
    # what is not secret is still shown
    assert list(msg.auth.ssh_authorized_keys) == [KEY, KEY2]
    assert msg.auth.password == "env:VM_PASSWORD"
    assert msg.auth.user == "alice"
    assert list(msg.provision.packages) == ["nginx"]
    assert msg.cloud_init.detach_seed_after_boot


def test_spec_to_proto_without_redact_carries_the_secrets() -> None:
    msg = convert.spec_to_proto(RESOLVED)
    assert msg.cloud_init.user_data == USER_DATA
    assert msg.auth.password_hash == HASH


def test_redact_leaves_empty_secrets_empty() -> None:
    msg = convert.spec_to_proto(dataclasses.replace(KEYS_ONLY, cloud_init=CloudInit(meta_data="x: 1\n")), redact=True)
    assert msg.cloud_init.user_data == "" and msg.auth.password_hash == ""


def test_vm_to_proto_redacts_the_spec() -> None:
    vm = Vm(name="web-1", host="h1", state=VmState.RUNNING, spec=RESOLVED, uuid="u-1")
    msg = convert.vm_to_proto(vm)
    assert msg.spec.cloud_init.user_data == convert.REDACTED
    assert msg.spec.auth.password_hash == convert.REDACTED
    wire = msg.SerializeToString()
    assert HASH.encode() not in wire and USER_DATA_NEEDLE.encode() not in wire


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_spec_round_trips_through_proto(spec: VmSpec) -> None:
    back = convert.spec_from_proto(convert.spec_to_proto(spec))
    assert back == spec
    wire = convert.spec_to_proto(spec).SerializeToString()
    assert convert.spec_from_proto(type(convert.spec_to_proto(spec)).FromString(wire)) == spec


@pytest.mark.parametrize("method", list(AuthMethod), ids=lambda m: m.name.lower())
def test_every_auth_method_round_trips_through_proto(method: AuthMethod) -> None:
    spec = _auth(RESOLVED, method=method)
    if not method.uses_keys:
        spec = _auth(spec, ssh_authorized_keys=(), ssh_keys=())
    if not method.uses_password:
        spec = _auth(spec, password="", password_hash=Secret(""), secret_refs=())
    validate_resolved(spec)
    assert convert.spec_from_proto(convert.spec_to_proto(spec)) == spec


# -------------------------------------------------------------------------------- validate_resolved


@pytest.mark.parametrize("method", [AuthMethod.PASSWORD, AuthMethod.BOTH, AuthMethod.ONE_TIME_PASSWORD])
def test_validate_resolved_refuses_a_password_method_without_a_hash(method: AuthMethod) -> None:
    spec = _auth(RESOLVED, method=method, password_hash=Secret(""))
    if not method.uses_keys:
        spec = _auth(spec, ssh_authorized_keys=(), ssh_keys=())
    validate_spec(spec)  # a spec file may name only the reference ...
    with pytest.raises(InvalidArgument) as info:
        validate_resolved(spec)  # ... a create request must carry the hash
    assert info.value.metadata["field"] == "spec.auth.password_hash"
    assert method.name.lower() in info.value.message


@pytest.mark.parametrize(
    "value",
    [
        PLAIN,
        "hunter2",
        "$1$saltsalt$qjXMvbEw8oaL.CzflDugX/",  # MD5-crypt
        "$5$saltstring$5B8vYYiY.CVt1RlTTf8KbXBH3hsxY/GNooZF1B3nfrj",  # SHA-256-crypt
        "$6$salt$short",
        HASH + "x",
        "$6$" + HASH[3:].replace("jsonSalt", "bad salt"),
        HASH + "\n",
        "$y$j9T$abcdefghijklmnopqrstuv$ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmno",  # yescrypt
    ],
)
def test_validate_resolved_refuses_what_is_not_a_sha512_crypt_hash_without_quoting_it(value: str) -> None:
    spec = _auth(RESOLVED, password_hash=Secret(value))
    with pytest.raises(InvalidArgument) as info:
        validate_resolved(spec)
    err = info.value
    assert err.metadata["field"] == "spec.auth.password_hash"
    assert "SHA-512-crypt" in err.message
    assert value.strip() not in err.message and value.strip() not in repr(err)
    assert all(value.strip() not in v for v in err.metadata.values())


@pytest.mark.parametrize(
    "hash_value",
    [
        HASH,
        sha512_crypt(Secret(PLAIN)),
        sha512_crypt(Secret(PLAIN), rounds=5000),
        sha512_crypt(Secret(PLAIN), "a", rounds=1000),
        sha512_crypt(Secret(""), "emptyPassword"),
    ],
)
def test_validate_resolved_accepts_a_real_sha512_crypt_hash(hash_value: str) -> None:
    assert PASSWORD_HASH.fullmatch(hash_value)
    spec = _auth(RESOLVED, password_hash=Secret(hash_value))
    assert validate_resolved(spec) is spec


def test_a_hash_with_method_ssh_key_is_refused() -> None:
    spec = _auth(RESOLVED, method=AuthMethod.SSH_KEY, password="", secret_refs=())
    with pytest.raises(InvalidArgument) as info:
        validate_resolved(spec)
    assert info.value.metadata["field"] == "spec.auth.password"


@pytest.mark.parametrize(
    "line",
    [
        "not a key",
        "-----BEGIN OPENSSH PRIVATE KEY-----",
        "ssh-ed25519",
        "ssh-ed25519 ",
        "ssh-dss AAAAB3NzaC1kc3MAAACBAP1 old@dsa",
        KEY + "\nssh-rsa AAAA injected",
        'command="rm -rf /" ' + KEY,
        "ssh-ed25519 AAAA!notbase64 x",
        "",
    ],
)
def test_validate_resolved_refuses_authorized_keys_that_are_not_key_lines(line: str) -> None:
    spec = _auth(RESOLVED, ssh_authorized_keys=(KEY, line))
    with pytest.raises(InvalidArgument) as info:
        validate_resolved(spec)
    assert info.value.metadata["field"] == "spec.auth.ssh_authorized_keys[1]"
    assert "OpenSSH public key" in info.value.message
    if line.strip():
        assert line not in info.value.message  # a private key pasted here must not be echoed


def test_keys_with_a_password_only_method_are_refused() -> None:
    spec = _auth(RESOLVED, method=AuthMethod.PASSWORD)
    with pytest.raises(InvalidArgument) as info:
        validate_resolved(spec)
    assert info.value.metadata["field"] == "spec.auth.ssh_keys"
