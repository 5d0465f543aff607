"""Spec files of version 2: auth, provision, shared folder mounts, extra cloud-config; errors and round trips."""

from __future__ import annotations

import dataclasses
import textwrap

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
    VmSpec,
)
from clonebox_core.secret import Secret
from clonebox_core.secrets.passwords import sha512_crypt
from clonebox_core.spec import REASON, dump_spec, load_spec_text

pytestmark = pytest.mark.unit

#: the smallest bootable version-2 document; tests append sections to it
V2 = "version: 2\nname: web-1\nkernel_boot: {kernel: testguest/vmlinux}\n"

FULL = """\
version: 2
name: web-1
vcpus: 2
memory: 1GiB
disks:
  - name: root
    base_image: debian-12.qcow2
    size: 10GiB
network: {mode: libvirt, libvirt_network: default}
auth:
  user: alice
  method: both
  ssh_keys:
    - ~/.ssh/id_ed25519.pub
    - keys/bob.pub
  password: env:VM_PASSWORD
provision:
  packages: [nginx, curl=7.88.1-10]
  snap_packages: [hello-world]
  services: [nginx.service]
  post_commands:
    - echo ready > /tmp/ready
    - systemctl reload nginx
shared_folders:
  - host_path: /srv/www
    mount: /var/www
    read_only: true
  - host_path: /srv/bulk
    mount: /data
    driver: virtiofs
    tag: bulk
cloud_init:
  user_data:
    runcmd: [echo extra]
  detach_seed_after_boot: true
labels: {app: web}
"""

FULL_MODEL = VmSpec(
    name="web-1",
    vcpus=2,
    memory_mib=1024,
    disks=(DiskSpec("root", "debian-12.qcow2", 10 * 1024),),
    network=NetworkSpec(NetworkMode.LIBVIRT, "default"),
    auth=Auth(
        user="alice",
        method=AuthMethod.BOTH,
        ssh_keys=("~/.ssh/id_ed25519.pub", "keys/bob.pub"),
        password="env:VM_PASSWORD",
    ),
    provision=Provision(
        packages=("nginx", "curl=7.88.1-10"),
        snap_packages=("hello-world",),
        services=("nginx.service",),
        post_commands=("echo ready > /tmp/ready", "systemctl reload nginx"),
    ),
    shared_folders=(
        SharedFolder("/srv/www", "www", True, "/var/www", ShareDriver.NINE_P),
        SharedFolder("/srv/bulk", "bulk", False, "/data", ShareDriver.VIRTIOFS),
    ),
    cloud_init=CloudInit(Secret("#cloud-config\nruncmd:\n- echo extra\n"), detach_seed_after_boot=True),
    labels=(("app", "web"),),
)

#: values standing in for credentials: no error message may contain them
LITERALS = ["hunter2", "my pass", "correct horse battery staple", "P@ssw0rd!"]
SECRET_VALUE = "Sup3r-S3cret-Value"


def spec_error(text: str, source: str = "web.yaml") -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        load_spec_text(text, source)
    err = info.value
    assert err.reason == REASON
    assert "\n" not in err.message, "errors are one line"
    assert err.message.startswith(f"{source}:{err.metadata['line']}: ")
    return err


def line_of(text: str, needle: str, occurrence: int = 1) -> int:
    """1-based number of the line holding the ``occurrence``-th ``needle``."""
    seen = 0
    for n, line in enumerate(text.splitlines(), start=1):
        if needle in line:
            seen += 1
            if seen == occurrence:
                return n
    raise AssertionError(f"{needle!r} not in the text")


def assert_not_leaked(err: InvalidArgument, value: str) -> None:
    assert value not in err.message
    assert value not in str(err) and value not in repr(err)
    assert all(value not in v for v in err.metadata.values())


# ---------------------------------------------------------------------------------------- good specs


def test_full_v2_spec_loads_into_the_core_model() -> None:
    assert load_spec_text(FULL, "web.yaml") == FULL_MODEL


def test_v2_defaults_give_a_key_login_for_user_clonebox() -> None:
    spec = load_spec_text(V2)
    assert spec.auth == Auth()
    assert spec.auth is not None
    assert (spec.auth.user, spec.auth.method) == ("clonebox", AuthMethod.SSH_KEY)
    assert spec.auth.needs_generated_key
    assert spec.provision is None and spec.cloud_init is None and spec.shared_folders == ()
    assert spec.renders_user_data and spec.has_seed


def test_v1_spec_has_no_auth_and_renders_nothing() -> None:
    spec = load_spec_text("version: 1\nname: a\nkernel_boot: {kernel: k}\n")
    assert spec.auth is None and spec.provision is None
    assert not spec.renders_user_data and not spec.has_seed


def test_empty_auth_section_means_the_defaults() -> None:
    assert load_spec_text(V2 + "auth: {}\n").auth == Auth()
    assert load_spec_text(V2 + "auth: {user: bob}\n").auth == Auth(user="bob")


@pytest.mark.parametrize(
    ("section", "method", "password"),
    [
        ("{method: ssh_key, ssh_keys: [id.pub]}", AuthMethod.SSH_KEY, ""),
        ("{method: password, password: 'env:VM_PW'}", AuthMethod.PASSWORD, "env:VM_PW"),
        ("{method: both, password: 'file:/run/pw', ssh_keys: [id.pub]}", AuthMethod.BOTH, "file:/run/pw"),
        ("{method: one_time_password}", AuthMethod.ONE_TIME_PASSWORD, ""),
    ],
    ids=["ssh_key", "password", "both", "one_time_password"],
)
def test_every_auth_method_loads(section: str, method: AuthMethod, password: str) -> None:
    spec = load_spec_text(V2 + f"auth: {section}\n")
    assert spec.auth is not None
    assert spec.auth.method is method
    assert spec.auth.password == password
    assert spec.auth.password_hash == Secret("")  # a file names a reference; the hash is request material
    assert spec.auth.method.uses_password is (method is not AuthMethod.SSH_KEY)


@pytest.mark.parametrize(
    "ref",
    ["env:VM_PASSWORD", "file:/run/secrets/pw", "age:secrets/pw.age", "sops:secrets.yaml#vm", "vault:kv/vm#pw"],
)
def test_password_references_of_every_provider_are_accepted(ref: str) -> None:
    spec = load_spec_text(V2 + f"auth: {{method: password, password: '{ref}'}}\n")
    assert spec.auth is not None and spec.auth.password == ref


def test_unknown_method_is_refused_naming_the_choices() -> None:
    err = spec_error(V2 + "auth: {method: token}\n")
    assert err.metadata["field"] == "auth.method"
    assert "'ssh_key'" in err.message and "'one_time_password'" in err.message


def test_tags_are_derived_from_the_mount_basename_and_deduplicated() -> None:
    spec = load_spec_text(
        V2
        + textwrap.dedent(
            """\
            shared_folders:
              - {host_path: /a/data, mount: /mnt/data}
              - {host_path: /b/data, mount: /srv/data}
              - {host_path: /c/x, mount: /opt/data, driver: virtiofs}
              - {host_path: /srv/logs}
              - {host_path: /d, mount: /mnt/my.files}
            """
        )
    )
    assert [f.tag for f in spec.shared_folders] == ["data", "data-2", "data-3", "logs", "my-files"]
    assert len({f.tag for f in spec.shared_folders}) == len(spec.shared_folders)
    assert spec.shared_folders[3].mount == ""


def test_a_derived_tag_avoids_tags_given_explicitly() -> None:
    spec = load_spec_text(
        V2 + "shared_folders:\n  - {host_path: /a, mount: /mnt/data}\n  - {host_path: /b, tag: data}\n"
    )
    assert [f.tag for f in spec.shared_folders] == ["data-2", "data"]


def test_shared_folder_driver_defaults_to_9p_and_takes_virtiofs() -> None:
    spec = load_spec_text(
        V2 + "shared_folders:\n  - {host_path: /a, mount: /a}\n  - {host_path: /b, mount: /b, driver: virtiofs}\n"
    )
    assert [f.driver for f in spec.shared_folders] == [ShareDriver.NINE_P, ShareDriver.VIRTIOFS]
    assert [f.mount for f in spec.shared_folders] == ["/a", "/b"]
    explicit = load_spec_text(V2 + "shared_folders: [{host_path: /a, driver: 9p}]\n")
    assert explicit.shared_folders[0].driver is ShareDriver.NINE_P


def test_unknown_share_driver_is_refused() -> None:
    err = spec_error(V2 + "shared_folders: [{host_path: /a, mount: /a, driver: nfs}]\n")
    assert err.metadata["field"] == "shared_folders[0].driver"
    assert "'virtiofs'" in err.message


def test_read_only_virtiofs_is_refused() -> None:
    err = spec_error(V2 + "shared_folders: [{host_path: /a, mount: /a, driver: virtiofs, read_only: true}]\n")
    assert err.metadata["field"] == "shared_folders[0].read_only"


def test_provision_and_detach_seed_load() -> None:
    spec = load_spec_text(
        V2 + "provision: {packages: [git]}\ncloud_init: {detach_seed_after_boot: true}\n",
    )
    assert spec.provision == Provision(packages=("git",))
    assert spec.cloud_init is not None and spec.cloud_init.detach_seed_after_boot
    assert spec.cloud_init.user_data == Secret("")


def test_extra_cloud_config_without_passwords_is_accepted() -> None:
    spec = load_spec_text(
        V2 + "cloud_init:\n  user_data:\n    users: [{name: ops, ssh_authorized_keys: [k]}]\n    timezone: UTC\n"
    )
    assert spec.cloud_init is not None
    assert "timezone: UTC" in spec.cloud_init.user_data.reveal()


# ------------------------------------------------------------------------------------- auth problems


@pytest.mark.parametrize("literal", LITERALS)
def test_a_literal_password_is_refused_without_quoting_it(literal: str) -> None:
    text = V2 + f"auth:\n  method: password\n  password: '{literal}'\n"
    err = spec_error(text)
    assert err.metadata["field"] == "auth.password"
    assert "auth.password" in err.message
    assert "secret reference" in err.message
    assert err.metadata["line"] == str(line_of(text, "password: '"))
    assert_not_leaked(err, literal)


def test_a_literal_password_is_refused_whatever_the_method() -> None:
    err = spec_error(V2 + "auth: {method: ssh_key, password: hunter2}\n")
    assert err.metadata["field"] == "auth.password"
    assert_not_leaked(err, "hunter2")


def test_a_numeric_password_is_not_quoted_either() -> None:
    err = spec_error(V2 + "auth: {method: password, password: 73519024}\n")
    assert err.metadata["field"] == "auth.password"
    assert "expected a string" in err.message
    assert_not_leaked(err, "73519024")


def test_password_with_method_ssh_key_is_refused() -> None:
    err = spec_error(V2 + "auth: {method: ssh_key, password: 'env:VM_PW'}\n")
    assert err.metadata["field"] == "auth.password"
    assert "ssh_key" in err.message and "sets no password" in err.message


def test_password_with_the_default_method_is_refused() -> None:
    err = spec_error(V2 + "auth: {password: 'env:VM_PW'}\n")
    assert err.metadata["field"] == "auth.password"


@pytest.mark.parametrize("method", ["password", "both"])
def test_password_methods_without_a_password_are_refused(method: str) -> None:
    err = spec_error(V2 + f"auth: {{method: {method}}}\n")
    assert err.metadata["field"] == "auth.password"
    assert "auth.password" in err.message
    assert f"method {method} needs a password" in err.message


@pytest.mark.parametrize("user", ["root", "Bad", "1st", "has space", "a" * 33, "ops$", ""])
def test_bad_user_names_are_refused(user: str) -> None:
    err = spec_error(V2 + f"auth: {{user: '{user}'}}\n")
    assert err.metadata["field"] == "auth.user"
    assert "POSIX user name" in err.message


@pytest.mark.parametrize("user", ["alice", "_svc", "ops-2", "a" * 32])
def test_good_user_names_are_accepted(user: str) -> None:
    spec = load_spec_text(V2 + f"auth: {{user: '{user}'}}\n")
    assert spec.auth is not None and spec.auth.user == user


# -------------------------------------------------------------------------------- provision problems


@pytest.mark.parametrize(
    ("key", "items"),
    [
        ("packages", "[nginx, 'bad pkg']"),
        ("packages", "[nginx, '-rf']"),
        ("packages", "[nginx, 'a;reboot']"),
        ("snap_packages", "[hello, Hello_World]"),
        ("services", "[nginx, 'a b']"),
        ("services", "[nginx, '../x']"),
    ],
)
def test_bad_provision_names_are_named_by_index(key: str, items: str) -> None:
    err = spec_error(V2 + f"provision: {{{key}: {items}}}\n")
    assert err.metadata["field"] == f"provision.{key}[1]"
    assert f"provision.{key}[1]:" in err.message


@pytest.mark.parametrize("command", ["''", "'   '"])
def test_empty_post_commands_are_refused(command: str) -> None:
    err = spec_error(V2 + f"provision: {{post_commands: ['echo hi', {command}]}}\n")
    assert err.metadata["field"] == "provision.post_commands[1]"
    assert "non-empty command" in err.message


def test_a_post_command_longer_than_4096_characters_is_refused() -> None:
    err = spec_error(V2 + f"provision: {{post_commands: ['echo {'x' * 4096}']}}\n")
    assert err.metadata["field"] == "provision.post_commands[0]"


def test_more_than_256_packages_are_refused() -> None:
    names = ", ".join(f"p{i}" for i in range(257))
    err = spec_error(V2 + f"provision: {{packages: [{names}]}}\n")
    assert err.metadata["field"] == "provision.packages"


# ---------------------------------------------------------------------------- shared folder problems


def test_duplicate_mount_points_are_refused() -> None:
    text = V2 + "shared_folders:\n  - host_path: /a\n    mount: /data\n  - host_path: /b\n    mount: /data\n"
    err = spec_error(text)
    assert err.metadata["field"] == "shared_folders[1].mount"
    assert "already the mount point" in err.message
    assert err.metadata["line"] == str(line_of(text, "mount: /data", occurrence=2))


@pytest.mark.parametrize("mount", ["data", "mnt/data", "/", "/a b", "/a/../etc", "./x"])
def test_mount_must_be_an_absolute_guest_path(mount: str) -> None:
    err = spec_error(V2 + f"shared_folders: [{{host_path: /a, mount: '{mount}'}}]\n")
    assert err.metadata["field"] == "shared_folders[0].mount"


def test_duplicate_explicit_tags_are_refused() -> None:
    err = spec_error(V2 + "shared_folders: [{host_path: /a, tag: t}, {host_path: /b, tag: t}]\n")
    assert err.metadata["field"] == "shared_folders[1].tag"


# ---------------------------------------------------------------------------------------- versions


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ("auth: {user: alice}", "auth"),
        ("provision: {packages: [git]}", "provision"),
    ],
)
def test_v2_sections_in_a_v1_file_say_they_need_version_2(section: str, key: str) -> None:
    text = f"version: 1\nname: a\nkernel_boot: {{kernel: k}}\n{section}\n"
    err = spec_error(text)
    assert err.metadata["field"] == key
    assert "version: 2" in err.message
    assert err.metadata["line"] == "4"


@pytest.mark.parametrize(
    "section",
    [
        "shared_folders: [{host_path: /a, tag: a, mount: /m}]",
        "shared_folders: [{host_path: /a, tag: a, driver: virtiofs}]",
        "cloud_init: {detach_seed_after_boot: true}",
    ],
    ids=["mount", "driver", "detach_seed_after_boot"],
)
def test_nested_v2_fields_in_a_v1_file_say_they_need_version_2(section: str) -> None:
    err = spec_error(f"version: 1\nname: a\nkernel_boot: {{kernel: k}}\n{section}\n")
    assert "version: 2" in err.message


@pytest.mark.parametrize("version", ["3", "0", "'2'", "true"])
def test_unknown_versions_are_refused(version: str) -> None:
    err = spec_error(f"version: {version}\nname: a\nkernel_boot: {{kernel: k}}\n")
    assert err.metadata["field"] == "version"
    assert err.metadata["line"] == "1"
    assert "not supported" in err.message and "1 and 2" in err.message


# ---------------------------------------------------------------------------------- extra user-data


@pytest.mark.parametrize(
    ("user_data", "field"),
    [
        (f"password: {SECRET_VALUE}", "cloud_init.user_data.password"),
        (f"chpasswd: {{list: 'root:{SECRET_VALUE}'}}", "cloud_init.user_data.chpasswd"),
        (f"chpasswd: {{users: [{{name: root, password: {SECRET_VALUE}}}]}}", "cloud_init.user_data.chpasswd"),
        (f"ssh_pwauth: '{SECRET_VALUE}'", "cloud_init.user_data.ssh_pwauth"),
        ("ssh_pwauth: true", "cloud_init.user_data.ssh_pwauth"),
        (f"users: [{{name: eve, passwd: {SECRET_VALUE}}}]", "cloud_init.user_data.users[0].passwd"),
        (f"users: [{{name: eve, hashed_passwd: {SECRET_VALUE}}}]", "cloud_init.user_data.users[0].hashed_passwd"),
        (
            f"users: [{{name: eve, plain_text_passwd: {SECRET_VALUE}}}]",
            "cloud_init.user_data.users[0].plain_text_passwd",
        ),
        (
            f"users: [default, {{name: eve, plain_text_passwd: {SECRET_VALUE}}}]",
            "cloud_init.user_data.users[1].plain_text_passwd",
        ),
    ],
)
@pytest.mark.parametrize("form", ["mapping", "string"])
def test_user_data_that_sets_passwords_is_refused_without_quoting(user_data: str, field: str, form: str) -> None:
    if form == "mapping":
        text = V2 + "cloud_init:\n  user_data:\n    " + user_data + "\n"
    else:
        block = "#cloud-config\n" + user_data + "\n"
        text = V2 + "cloud_init:\n  user_data: |\n" + textwrap.indent(block, "    ")
    err = spec_error(text)
    assert err.metadata["field"] == field
    assert field in err.message
    assert "auth" in err.message  # it says where passwords belong
    assert_not_leaked(err, SECRET_VALUE)
    if form == "mapping":  # the line of the offending key
        key = user_data.split(":", 1)[0]
        assert err.metadata["line"] == str(line_of(text, f"    {key}:"))
    else:  # inside a string there are no nodes: the line of user_data
        assert err.metadata["line"] == str(line_of(text, "user_data:"))


@pytest.mark.parametrize(
    "user_data",
    [
        f"user: {{name: eve, plain_text_passwd: {SECRET_VALUE}, lock_passwd: false}}",
        f"users: {{eve: {{plain_text_passwd: {SECRET_VALUE}}}}}",
    ],
    ids=["user-mapping", "users-as-mapping"],
)
def test_user_data_that_sets_passwords_in_other_user_forms_is_refused(user_data: str) -> None:
    err = spec_error(V2 + "cloud_init:\n  user_data:\n    " + user_data + "\n")
    assert err.metadata["field"].startswith("cloud_init.user_data.user")
    assert_not_leaked(err, SECRET_VALUE)


@pytest.mark.parametrize(
    ("user_data", "problem"),
    [
        (f'"#!/bin/sh\\necho {SECRET_VALUE}\\n"', "#cloud-config"),
        (f'"#cloud-config\\n- {SECRET_VALUE}\\n"', "mapping"),
        (f'"#cloud-config\\nruncmd: [{SECRET_VALUE}\\n"', "not valid YAML"),
        (f"[{SECRET_VALUE}]", "mapping"),
    ],
    ids=["shell-script", "list", "broken-yaml", "yaml-list"],
)
def test_v2_user_data_must_be_a_cloud_config_mapping(user_data: str, problem: str) -> None:
    err = spec_error(V2 + f"cloud_init:\n  user_data: {user_data}\n")
    assert err.metadata["field"] == "cloud_init.user_data"
    assert problem in err.message
    assert_not_leaked(err, SECRET_VALUE)


def test_v1_keeps_raw_user_data() -> None:
    spec = load_spec_text(
        "version: 1\nname: a\nkernel_boot: {kernel: k}\n"
        f'cloud_init:\n  user_data: "#!/bin/sh\\necho root:{SECRET_VALUE} | chpasswd\\n"\n'
    )
    assert spec.cloud_init is not None and SECRET_VALUE in spec.cloud_init.user_data.reveal()


@pytest.mark.parametrize("method", ["password", "one_time_password"])
def test_ssh_keys_with_a_password_only_method_are_refused(method: str) -> None:
    err = spec_error(V2 + f"auth: {{method: {method}, password: 'env:P', ssh_keys: [id.pub]}}\n")
    assert err.metadata["field"] == "auth.ssh_keys"


# ------------------------------------------------------------------------------------ line numbers


LINE_CASES = [
    ("  user: alice", "  user: Bad", "auth.user", "user: Bad"),
    ("  password: env:VM_PASSWORD", "  password: hunter2", "auth.password", "password: hunter2"),
    ("  method: both", "  method: ssh_key", "auth.password", "password: env:VM_PASSWORD"),
    ("    - keys/bob.pub", "    - keys/bob.pub\n  bogus: 1", "auth.bogus", "bogus: 1"),
    ("  snap_packages: [hello-world]", "  snap_packages: [hello-world, BAD]", "provision.snap_packages[1]", "BAD"),
    ("    - systemctl reload nginx", "    - '  '", "provision.post_commands[1]", "- '  '"),
    ("    mount: /data", "    mount: /var/www", "shared_folders[1].mount", "mount: /var/www", 2),
    ("    mount: /data", "    mount: data", "shared_folders[1].mount", "mount: data"),
    ("    runcmd: [echo extra]", "    runcmd: [echo extra]\n    chpasswd: {expire: false}", None, "chpasswd:"),
    ("  detach_seed_after_boot: true", "  detach_seed_after_boot: 'yes'", None, "detach_seed_after_boot"),
]


@pytest.mark.parametrize("case", LINE_CASES, ids=[c[2] or c[3] for c in LINE_CASES])
def test_errors_point_at_the_line_to_edit(case: tuple[str, ...]) -> None:
    old, new, field, needle = case[:4]
    occurrence = int(case[4]) if len(case) > 4 else 1
    assert FULL.count(old) == 1
    text = FULL.replace(old, new)
    err = spec_error(text)
    if field is not None:
        assert err.metadata["field"] == field
    assert err.metadata["line"] == str(line_of(text, needle, occurrence))


def test_a_v2_only_section_in_v1_points_at_its_key() -> None:
    text = FULL.replace("version: 2", "version: 1")
    err = spec_error(text)
    assert err.metadata["field"] == "auth"
    assert err.metadata["line"] == str(line_of(text, "auth:"))
    assert "(and " in err.message  # provision and the folder mounts are problems too


# ------------------------------------------------------------------------------------- round trips


ROUND_TRIP_V2 = {
    "full": FULL,
    "minimal": V2,
    "password": V2 + "auth: {user: ops, method: password, password: 'vault:kv/ops#pw'}\n",
    "one-time": V2 + "auth: {method: one_time_password}\nprovision: {services: [ssh]}\n",
    "empty-provision": V2 + "provision: {}\ncloud_init: {}\n",
    "folders-without-mount": V2 + "shared_folders: [{host_path: /srv/a}, {host_path: /srv/b, read_only: true}]\n",
    "meta-and-network": V2 + "cloud_init:\n  meta_data: {instance-id: i-1}\n  network_config: {version: 2}\n",
}


@pytest.mark.parametrize("text", ROUND_TRIP_V2.values(), ids=ROUND_TRIP_V2.keys())
def test_dump_spec_round_trips_v2(text: str) -> None:
    spec = load_spec_text(text)
    dumped = dump_spec(spec)
    assert dumped.startswith("version: 2\n")
    assert load_spec_text(dumped) == spec
    assert dump_spec(load_spec_text(dumped)) == dumped


V1_TEXT = """\
version: 1
name: tiny-a
memory: 128MiB
kernel_boot: {kernel: testguest/vmlinux, initrd: testguest/initrd.img, cmdline: console=ttyS0 quiet}
disks:
  - {name: data, base_image: testguest/data.qcow2}
  - {name: scratch, size: 1GiB}
network: {mode: none}
shared_folders: [{host_path: /srv/x, tag: x, read_only: true}]
cloud_init:
  user_data: "#!/bin/sh\\necho hi\\n"
  meta_data: {instance-id: tiny-a}
labels: {app: demo, tier: test}
"""


def test_dump_spec_round_trips_v1() -> None:
    spec = load_spec_text(V1_TEXT)
    dumped = dump_spec(spec)
    assert dumped.startswith("version: 1\n")
    assert "auth" not in dumped and "driver" not in dumped and "detach" not in dumped
    assert load_spec_text(dumped) == spec


def test_dump_spec_writes_no_resolved_keys_or_hash() -> None:
    password_hash = sha512_crypt(Secret("my pass"), "roundtripsalt")
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPAJQB9CV+E3rRu+1Xtw210fC0MDNlPTIXvCPWuGnxKl bob@desk"
    spec = load_spec_text(FULL)
    assert spec.auth is not None
    resolved = dataclasses.replace(
        spec,
        auth=dataclasses.replace(spec.auth, password_hash=Secret(password_hash), ssh_authorized_keys=(key,)),
    )
    dumped = dump_spec(resolved)
    assert password_hash not in dumped and "roundtripsalt" not in dumped
    assert "AAAAC3NzaC1lZDI1NTE5AAAAIPAJQB9CV" not in dumped
    assert "env:VM_PASSWORD" in dumped  # the reference is file content
    assert load_spec_text(dumped) == spec


def test_dump_spec_of_a_model_built_in_code_round_trips() -> None:
    spec = VmSpec(
        name="coded",
        kernel_boot=KernelBoot("k"),
        auth=Auth(user="dev", method=AuthMethod.PASSWORD, password="env:PW"),
        provision=Provision(post_commands=("echo 'a: b'", "# not a comment")),
        shared_folders=(SharedFolder("/h", "h", False, "/mnt/h", ShareDriver.VIRTIOFS),),
        cloud_init=CloudInit(Secret("#cloud-config\ntimezone: UTC\n"), detach_seed_after_boot=True),
    )
    assert load_spec_text(dump_spec(spec)) == spec
