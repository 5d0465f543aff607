"""The user-data the agent renders for version-2 specs; every document must pass ``cloud-init schema``."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from clonebox_core.cloudinit import HEADER, check_extra_user_data, render_user_data
from clonebox_core.errors import InvalidArgument
from clonebox_core.model import (
    Auth,
    AuthMethod,
    CloudInit,
    KernelBoot,
    Provision,
    SharedFolder,
    ShareDriver,
    VmSpec,
)
from clonebox_core.secret import Secret
from clonebox_core.secrets.passwords import one_time_password, sha512_crypt
from clonebox_core.validate import MAX_COMMAND_CHARS, MAX_PROVISION_ITEMS, validate_resolved

pytestmark = pytest.mark.unit

CLOUD_INIT = "/usr/bin/cloud-init"
needs_cloud_init = pytest.mark.skipif(
    shutil.which(CLOUD_INIT) is None, reason="cloud-init is not installed (apt-get install cloud-init)"
)

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICU6mAp6Qx1PQuxlMEUVXkS3gNgm9tAKK6Cjn5rygM5/ alice@laptop"
KEY2 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPAJQB9CV+E3rRu+1Xtw210fC0MDNlPTIXvCPWuGnxKl bob@desk"
GENERATED = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGeneratedGeneratedGeneratedGeneratedGen0 clonebox@web-1"
PLAIN = "correct horse battery staple"
HASH = sha512_crypt(Secret(PLAIN), "renderSalt")


def make_spec(
    method: AuthMethod = AuthMethod.SSH_KEY,
    *,
    user: str = "alice",
    keys: tuple[str, ...] = (KEY, KEY2),
    password_hash: str | None = None,
    provision: Provision | None = None,
    folders: tuple[SharedFolder, ...] = (),
    user_data: str = "",
) -> VmSpec:
    """A resolved version-2 spec (keys and hash as a create request carries them)."""
    if password_hash is None:
        password_hash = HASH if method.uses_password else ""
    spec = VmSpec(
        name="web-1",
        memory_mib=256,
        kernel_boot=KernelBoot("testguest/vmlinux"),
        auth=Auth(
            user=user,
            method=method,
            ssh_authorized_keys=keys if method.uses_keys else (),
            password_hash=Secret(password_hash),
        ),
        provision=provision,
        shared_folders=folders,
        cloud_init=CloudInit(Secret(user_data)) if user_data else None,
    )
    return validate_resolved(spec)


def assert_valid_cloud_config(text: str, tmp_path: Path) -> None:
    """``cloud-init schema -c FILE`` accepts ``text``."""
    path = tmp_path / "user-data"
    n = 0
    while path.exists():
        n += 1
        path = tmp_path / f"user-data-{n}"
    path.write_text(text)
    proc = subprocess.run(
        [CLOUD_INIT, "schema", "-c", str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "Valid cloud-config" in output, output


def rendered(spec: VmSpec, tmp_path: Path, **kwargs: Any) -> tuple[str, dict[str, Any]]:
    """The rendered text and its parsed form; the text must pass the schema check."""
    out = render_user_data(spec, **kwargs)
    assert isinstance(out, Secret)
    text = out.reveal()
    assert text.startswith(HEADER)
    doc = yaml.safe_load(text)
    assert isinstance(doc, dict)
    assert_valid_cloud_config(text, tmp_path)
    return text, doc


def the_user(doc: dict[str, Any]) -> dict[str, Any]:
    user = doc["users"][0]
    assert isinstance(user, dict)
    return user


# ------------------------------------------------------------------------------- the schema helper


@needs_cloud_init
@pytest.mark.parametrize(
    "text",
    ["#cloud-config\nusers: 5\n", "#cloud-config\nssh_pwauth: [1]\n", "#cloud-config\nmounts: {a: b}\n"],
)
def test_the_schema_helper_refuses_an_invalid_document(text: str, tmp_path: Path) -> None:
    with pytest.raises(AssertionError):
        assert_valid_cloud_config(text, tmp_path)


# ------------------------------------------------------------------------------------- auth methods


@needs_cloud_init
def test_ssh_key_installs_keys_and_locks_the_password(tmp_path: Path) -> None:
    text, doc = rendered(make_spec(AuthMethod.SSH_KEY), tmp_path)
    user = the_user(doc)
    assert user["name"] == "alice"
    assert user["ssh_authorized_keys"] == [KEY, KEY2]
    assert user["lock_passwd"] is True
    assert user["sudo"] == "ALL=(ALL) NOPASSWD:ALL"
    assert doc["ssh_pwauth"] is False
    assert doc["disable_root"] is True
    assert "chpasswd" not in doc
    assert "$6$" not in text
    assert len(doc["users"]) == 1


@needs_cloud_init
def test_password_sets_the_hash_and_password_login(tmp_path: Path) -> None:
    text, doc = rendered(make_spec(AuthMethod.PASSWORD), tmp_path, generated_key=GENERATED)
    user = the_user(doc)
    assert doc["chpasswd"] == {"expire": False, "users": [{"name": "alice", "password": HASH, "type": "hash"}]}
    assert doc["ssh_pwauth"] is True
    assert user["lock_passwd"] is False
    assert "ssh_authorized_keys" not in user
    assert GENERATED not in text and KEY not in text
    assert HASH in text
    assert PLAIN not in text


@needs_cloud_init
def test_both_installs_keys_and_sets_the_hash(tmp_path: Path) -> None:
    text, doc = rendered(make_spec(AuthMethod.BOTH), tmp_path)
    user = the_user(doc)
    assert user["ssh_authorized_keys"] == [KEY, KEY2]
    assert user["lock_passwd"] is False
    assert doc["chpasswd"]["users"] == [{"name": "alice", "password": HASH, "type": "hash"}]
    assert doc["chpasswd"]["expire"] is False
    assert doc["ssh_pwauth"] is True
    assert PLAIN not in text


@needs_cloud_init
def test_one_time_password_expires_at_first_login(tmp_path: Path) -> None:
    otp = one_time_password()
    otp_hash = sha512_crypt(otp)
    text, doc = rendered(make_spec(AuthMethod.ONE_TIME_PASSWORD, password_hash=otp_hash), tmp_path)
    assert doc["chpasswd"] == {"expire": True, "users": [{"name": "alice", "password": otp_hash, "type": "hash"}]}
    assert doc["ssh_pwauth"] is True
    assert "ssh_authorized_keys" not in the_user(doc)
    assert otp.reveal() not in text
    assert otp_hash in text


@needs_cloud_init
@pytest.mark.parametrize("method", list(AuthMethod), ids=lambda m: m.name.lower())
def test_the_plaintext_password_never_appears(method: AuthMethod, tmp_path: Path) -> None:
    text, _ = rendered(make_spec(method, user="ops"), tmp_path, generated_key=GENERATED)
    assert PLAIN not in text
    assert "horse" not in text
    assert (HASH in text) is method.uses_password


def test_the_rendered_secret_does_not_show_itself() -> None:
    out = render_user_data(make_spec(AuthMethod.PASSWORD))
    assert HASH not in str(out) and HASH not in repr(out) and HASH not in f"{out}"


# ----------------------------------------------------------------------------------- generated key


@needs_cloud_init
@pytest.mark.parametrize("method", [AuthMethod.SSH_KEY, AuthMethod.BOTH], ids=["ssh_key", "both"])
def test_the_generated_key_is_used_when_no_key_is_given(method: AuthMethod, tmp_path: Path) -> None:
    spec = make_spec(method, keys=())
    assert spec.auth is not None and spec.auth.needs_generated_key
    _, doc = rendered(spec, tmp_path, generated_key=GENERATED)
    assert the_user(doc)["ssh_authorized_keys"] == [GENERATED]


@needs_cloud_init
@pytest.mark.parametrize("method", [AuthMethod.SSH_KEY, AuthMethod.BOTH], ids=["ssh_key", "both"])
def test_the_generated_key_is_ignored_when_keys_are_given(method: AuthMethod, tmp_path: Path) -> None:
    text, doc = rendered(make_spec(method), tmp_path, generated_key=GENERATED)
    assert the_user(doc)["ssh_authorized_keys"] == [KEY, KEY2]
    assert GENERATED not in text


@needs_cloud_init
@pytest.mark.parametrize(
    "method", [AuthMethod.PASSWORD, AuthMethod.ONE_TIME_PASSWORD], ids=["password", "one_time_password"]
)
def test_password_methods_install_no_generated_key(method: AuthMethod, tmp_path: Path) -> None:
    text, doc = rendered(make_spec(method), tmp_path, generated_key=GENERATED)
    assert "ssh_authorized_keys" not in the_user(doc)
    assert GENERATED not in text


# ------------------------------------------------------------------------------------- provisioning


PROVISION = Provision(
    packages=("nginx", "curl=7.88.1-10"),
    snap_packages=("hello-world", "jq"),
    services=("nginx.service", "ssh"),
    post_commands=("echo ready > /tmp/ready", "echo 'a: b' >> /tmp/log", "# kept as a command"),
)


@needs_cloud_init
def test_provision_packages_snaps_and_runcmd_order(tmp_path: Path) -> None:
    _, doc = rendered(make_spec(provision=PROVISION), tmp_path)
    assert doc["package_update"] is True
    assert doc["packages"] == ["nginx", "curl=7.88.1-10"]
    assert doc["snap"] == {"commands": [["snap", "install", "hello-world"], ["snap", "install", "jq"]]}
    assert doc["runcmd"] == [
        ["systemctl", "enable", "--now", "nginx.service"],
        ["systemctl", "enable", "--now", "ssh"],
        "echo ready > /tmp/ready",
        "echo 'a: b' >> /tmp/log",
        "# kept as a command",
    ]


@needs_cloud_init
def test_extra_runcmd_runs_after_services_and_post_commands(tmp_path: Path) -> None:
    extra = "#cloud-config\nruncmd:\n- echo extra-1\n- [touch, /tmp/extra-2]\npackages: [git]\n"
    _, doc = rendered(make_spec(provision=PROVISION, user_data=extra), tmp_path)
    assert doc["runcmd"][:2] == [
        ["systemctl", "enable", "--now", "nginx.service"],
        ["systemctl", "enable", "--now", "ssh"],
    ]
    assert doc["runcmd"][2:5] == list(PROVISION.post_commands)
    assert doc["runcmd"][5:] == ["echo extra-1", ["touch", "/tmp/extra-2"]]
    assert doc["packages"] == ["nginx", "curl=7.88.1-10", "git"]


@needs_cloud_init
def test_no_provision_renders_no_package_or_command_keys(tmp_path: Path) -> None:
    _, doc = rendered(make_spec(), tmp_path)
    for key in ("packages", "package_update", "snap", "runcmd", "mounts"):
        assert key not in doc


@needs_cloud_init
def test_only_post_commands_render_only_runcmd(tmp_path: Path) -> None:
    _, doc = rendered(make_spec(provision=Provision(post_commands=("true",))), tmp_path)
    assert doc["runcmd"] == ["true"]
    assert "package_update" not in doc and "packages" not in doc and "snap" not in doc


def test_rendered_user_data_larger_than_1_mib_is_refused_naming_provision() -> None:
    # the most validation allows: 256 commands of 4096 characters
    commands = tuple(f"echo {i:03d} " + "x" * (MAX_COMMAND_CHARS - 9) for i in range(MAX_PROVISION_ITEMS))
    assert {len(c) for c in commands} == {MAX_COMMAND_CHARS}
    spec = make_spec(provision=Provision(post_commands=commands))
    with pytest.raises(InvalidArgument) as info:
        render_user_data(spec)
    assert info.value.metadata["field"] == "spec.provision"
    assert "1 MiB" in info.value.message
    assert info.value.reason == "USER_DATA_INVALID"


def test_rendered_user_data_just_under_the_limit_is_accepted() -> None:
    spec = make_spec(provision=Provision(post_commands=tuple("x" * 1000 for _ in range(200))))
    assert len(render_user_data(spec).reveal().encode()) < 1024 * 1024


# ------------------------------------------------------------------------------------------- mounts


@needs_cloud_init
def test_9p_mounts_read_only_and_read_write(tmp_path: Path) -> None:
    folders = (
        SharedFolder("/srv/www", "www", True, "/var/www"),
        SharedFolder("/srv/data", "data", False, "/data"),
    )
    _, doc = rendered(make_spec(folders=folders), tmp_path)
    ro, rw = doc["mounts"]
    assert ro[:3] == ["www", "/var/www", "9p"] and rw[:3] == ["data", "/data", "9p"]
    for entry, mode in ((ro, "ro"), (rw, "rw")):
        options = entry[3].split(",")
        assert "trans=virtio" in options
        assert mode in options
        assert ({"ro", "rw"} - {mode}).isdisjoint(options)
        assert "nofail" in options  # a missing share must not stop the boot
        assert entry[4:] == ["0", "0"]
        assert all(isinstance(field, str) for field in entry)


@needs_cloud_init
def test_virtiofs_mount(tmp_path: Path) -> None:
    folders = (SharedFolder("/srv/bulk", "bulk", False, "/bulk", ShareDriver.VIRTIOFS),)
    _, doc = rendered(make_spec(folders=folders), tmp_path)
    (entry,) = doc["mounts"]
    assert entry[:3] == ["bulk", "/bulk", "virtiofs"]
    options = entry[3].split(",")
    assert "rw" in options and "nofail" in options
    assert not any(o.startswith("trans=") for o in options)


@needs_cloud_init
def test_folders_without_a_mount_point_are_not_mounted(tmp_path: Path) -> None:
    folders = (SharedFolder("/srv/a", "a"), SharedFolder("/srv/b", "b", False, "/b"))
    _, doc = rendered(make_spec(folders=folders), tmp_path)
    assert [m[0] for m in doc["mounts"]] == ["b"]
    _, none = rendered(make_spec(folders=(SharedFolder("/srv/a", "a"),)), tmp_path)
    assert "mounts" not in none


# ---------------------------------------------------------------------------------- extra user-data


@needs_cloud_init
def test_extra_user_data_keys_are_merged(tmp_path: Path) -> None:
    extra = (
        "#cloud-config\n"
        "timezone: Europe/Berlin\n"
        "write_files: [{path: /etc/motd, content: hello}]\n"
        "users: [{name: ops, shell: /bin/sh}]\n"
        "mounts: [[tmpfs, /scratch, tmpfs, 'size=64m', '0', '0']]\n"
        "disable_root: true\n"  # equal to what is rendered: allowed
    )
    folders = (SharedFolder("/srv/data", "data", False, "/data"),)
    _, doc = rendered(make_spec(folders=folders, user_data=extra), tmp_path)
    assert doc["timezone"] == "Europe/Berlin"
    assert doc["write_files"] == [{"path": "/etc/motd", "content": "hello"}]
    assert [u["name"] for u in doc["users"]] == ["alice", "ops"]
    assert [m[0] for m in doc["mounts"]] == ["data", "tmpfs"]
    assert doc["disable_root"] is True


def test_users_given_as_a_mapping_are_refused() -> None:
    # cloud-init reads a users mapping too (and it can carry passwords): only the list form is merged
    spec = make_spec(user_data="#cloud-config\nusers: {ops: {shell: /bin/sh}}\n")
    with pytest.raises(InvalidArgument) as info:
        render_user_data(spec)
    assert info.value.metadata["field"] == "spec.cloud_init.user_data.users"
    assert "must be a list" in info.value.message


@pytest.mark.parametrize(
    ("extra", "key", "provision"),
    [
        ("disable_root: false", "disable_root", None),
        ("package_update: false", "package_update", PROVISION),
        ("snap: {commands: [[snap, install, vlc]]}", "snap", PROVISION),
    ],
)
def test_extra_user_data_conflicting_with_rendered_keys_is_refused(
    extra: str, key: str, provision: Provision | None
) -> None:
    spec = make_spec(provision=provision, user_data=f"#cloud-config\n{extra}\n")
    with pytest.raises(InvalidArgument) as info:
        render_user_data(spec)
    assert info.value.metadata["field"] == f"spec.cloud_init.user_data.{key}"
    assert "conflicts" in info.value.message
    assert info.value.reason == "USER_DATA_INVALID"


@needs_cloud_init
def test_package_update_in_extra_user_data_is_kept_without_packages(tmp_path: Path) -> None:
    _, doc = rendered(make_spec(user_data="#cloud-config\npackage_update: false\n"), tmp_path)
    assert doc["package_update"] is False


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ("chpasswd: {expire: false}", "spec.cloud_init.user_data.chpasswd"),
        ("password: s3cret-extra", "spec.cloud_init.user_data.password"),
        ("ssh_pwauth: false", "spec.cloud_init.user_data.ssh_pwauth"),
        ("users: [{name: eve, hashed_passwd: s3cret-extra}]", "spec.cloud_init.user_data.users[0].hashed_passwd"),
    ],
)
def test_extra_user_data_setting_passwords_is_refused_when_rendering(extra: str, field: str) -> None:
    spec = make_spec(AuthMethod.PASSWORD, user_data=f"#cloud-config\n{extra}\n")
    for check in (lambda: render_user_data(spec), lambda: check_extra_user_data(spec)):
        with pytest.raises(InvalidArgument) as info:
            check()
        assert info.value.metadata["field"] == field
        assert "s3cret-extra" not in info.value.message


def test_extra_user_data_that_is_not_cloud_config_is_refused() -> None:
    spec = make_spec(user_data="#!/bin/sh\necho hi\n")
    with pytest.raises(InvalidArgument) as info:
        render_user_data(spec)
    assert info.value.metadata["field"] == "spec.cloud_init.user_data"


def test_the_prefix_names_the_request_field() -> None:
    spec = make_spec(user_data="#cloud-config\ndisable_root: false\n")
    with pytest.raises(InvalidArgument) as info:
        render_user_data(spec, prefix="request.spec")
    assert info.value.metadata["field"] == "request.spec.cloud_init.user_data.disable_root"


def test_a_spec_without_auth_is_not_rendered() -> None:
    spec = VmSpec(name="v1", kernel_boot=KernelBoot("k"), cloud_init=CloudInit(Secret("#cloud-config\n")))
    with pytest.raises(ValueError, match="auth"):
        render_user_data(spec)


def test_empty_extra_user_data_renders_like_none() -> None:
    base = make_spec()
    empty = dataclasses.replace(base, cloud_init=CloudInit(Secret("#cloud-config\n")))
    assert render_user_data(empty) == render_user_data(base)


# ------------------------------------------------------------------------ every document is valid


SCHEMA_CASES: dict[str, tuple[VmSpec, str]] = {
    "ssh_key": (make_spec(AuthMethod.SSH_KEY), ""),
    "ssh_key-generated": (make_spec(AuthMethod.SSH_KEY, keys=()), GENERATED),
    "ssh_key-no-key-at-all": (make_spec(AuthMethod.SSH_KEY, keys=()), ""),
    "password": (make_spec(AuthMethod.PASSWORD, user="_svc"), ""),
    "both": (make_spec(AuthMethod.BOTH, keys=()), GENERATED),
    "one_time_password": (make_spec(AuthMethod.ONE_TIME_PASSWORD), ""),
    "rounds-hash": (make_spec(AuthMethod.PASSWORD, password_hash=sha512_crypt(Secret("x"), rounds=10000)), ""),
    "everything": (
        make_spec(
            AuthMethod.BOTH,
            provision=PROVISION,
            folders=(
                SharedFolder("/srv/www", "www", True, "/var/www"),
                SharedFolder("/srv/bulk", "bulk", False, "/bulk", ShareDriver.VIRTIOFS),
                SharedFolder("/srv/nomount", "nomount"),
            ),
            user_data=(
                "#cloud-config\n"
                "runcmd: [echo extra]\n"
                "packages: [git]\n"
                "write_files: [{path: /etc/x, content: y, permissions: '0644'}]\n"
                "users: [default]\n"
                "ssh_authorized_keys: [" + KEY2 + "]\n"
                "final_message: done\n"
            ),
        ),
        "",
    ),
    "special-characters": (
        make_spec(
            provision=Provision(
                post_commands=("echo \"quoted\" 'single' $HOME `date` | tee -a /tmp/x", "- leading dash", "key: value")
            )
        ),
        "",
    ),
}


@needs_cloud_init
@pytest.mark.parametrize(("spec", "generated_key"), SCHEMA_CASES.values(), ids=SCHEMA_CASES.keys())
def test_every_rendered_document_is_valid_cloud_config(spec: VmSpec, generated_key: str, tmp_path: Path) -> None:
    text, doc = rendered(spec, tmp_path, generated_key=generated_key)
    assert the_user(doc)["name"] == (spec.auth.user if spec.auth else "")
    assert PLAIN not in text
    assert yaml.safe_load(text) == doc
