"""CloneBox v1 project files (.clonebox.yaml) migrated to v2 VM spec documents."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from clonebox_core.errors import InvalidArgument
from clonebox_core.v1import import (
    DROP_KEYS,
    REASON_INVALID,
    REASON_NOT_HONOURED,
    dump_v2_yaml,
    is_v1_document,
    migrate_v1,
)
from clonebox_core.yamlsafe import load_yaml_safely

DATA = Path(__file__).resolve().parents[1] / "data" / "clonebox-v1"
CANARY = "canary-pw-7f3e9"
KEY_ORDER = [
    "version",
    "name",
    "vcpus",
    "memory",
    "disks",
    "network",
    "auth",
    "provision",
    "shared_folders",
    "labels",
]
PASSWORD_REF = "file:~/.config/clonebox/secrets/clone-clonebox.password"
TAG = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")


def example(name: str) -> str:
    """A test copy of a real v1 file, with the password replaced by a unique canary."""
    text = (DATA / f"{name}.clonebox.yaml").read_text()
    assert text.count("  password: ubuntu\n") == 1
    return text.replace("  password: ubuntu\n", f"  password: {CANARY}\n")


def v1(vm: str = "", top: str = "") -> str:
    """A small v1 file; lines 1-9 are fixed, ``vm`` lines start at line 10, then ``top``."""
    base = textwrap.dedent(
        f"""\
        version: '1'
        vm:
          name: dev
          ram_mb: 2048
          vcpus: 2
          disk_size_gb: 20
          base_image: /images/ubuntu-22.04-cloud.qcow2
          username: ubuntu
          password: {CANARY}
        """
    )
    return base + textwrap.indent(textwrap.dedent(vm), "  ") + textwrap.dedent(top)


def assert_no_canary(*texts: object) -> None:
    for text in texts:
        assert CANARY not in str(text)
        assert CANARY not in repr(text)


def refusal(text: Any, reason: str = REASON_INVALID, *, about_file: bool = True, **kwargs: Any) -> InvalidArgument:
    kwargs.setdefault("mode", "file")
    with pytest.raises(InvalidArgument) as info:
        migrate_v1(text, "old.yaml", **kwargs)
    err = info.value
    assert err.reason == reason, err.message
    assert "\n" not in err.message, "errors are one line"
    assert err.message.startswith("old.yaml") is about_file, err.message
    assert_no_canary(err.message, err.metadata)
    return err


def line_of_text(text: str, prefix: str) -> int:
    """1-based line of the first line of ``text`` starting with ``prefix``."""
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith(prefix):
            return n
    raise AssertionError(f"{prefix!r} not in text")


def check_migration(m: Any) -> None:
    """What holds for every migration: key order, no literal password anywhere, a loadable YAML text."""
    assert list(m.document) == KEY_ORDER
    text = dump_v2_yaml(m.document, source_name="old.yaml")
    assert yaml.safe_load(text) == m.document
    assert_no_canary(m.document, text, m.warnings, m.password_hint, m)


# --------------------------------------------------------------------------------- the real examples


def test_minimal_example_migrates_to_the_exact_v2_document_in_file_mode() -> None:
    m = migrate_v1(example("minimal"), "minimal.clonebox.yaml", mode="file", drop=frozenset({"gui"}))
    assert m.document == {
        "version": 2,
        "name": "clone-clonebox",
        "vcpus": 4,
        "memory": "4096MiB",
        "disks": [{"name": "root", "base_image": "ubuntu-22.04-cloud.qcow2", "size": "20GiB"}],
        "network": {"mode": "libvirt", "libvirt_network": "default"},
        "auth": {"user": "ubuntu", "method": "both", "password": PASSWORD_REF},
        "provision": {
            "packages": ["qemu-guest-agent", "cloud-guest-utils", "net-tools"],
            "snap_packages": [],
            "services": [],
            "post_commands": [],
        },
        "shared_folders": [],
        "labels": {"clonebox.migrated-from": "v1"},
    }
    assert m.password_found
    assert "~/.config/clonebox/secrets/clone-clonebox.password (mode 0600)" in m.password_hint
    assert "env:VAR" in m.password_hint and "vault:" in m.password_hint
    assert any(w.startswith("minimal.clonebox.yaml:8: vm.gui:") and "--drop gui" in w for w in m.warnings)
    assert any(w.startswith("minimal.clonebox.yaml:12: vm.password: not copied") for w in m.warnings)
    check_migration(m)


def test_workstation_example_migrates_in_file_mode_with_every_folder_kept() -> None:
    text = example("workstation")
    v1data = yaml.safe_load(text)
    m = migrate_v1(text, "workstation.clonebox.yaml", mode="file", drop=frozenset({"gui"}))
    doc = m.document
    assert (doc["vcpus"], doc["memory"], doc["disks"][0]["size"]) == (8, "8192MiB", "60GiB")
    assert doc["auth"] == {"user": "ubuntu", "method": "both", "password": PASSWORD_REF}
    assert doc["provision"] == {key: v1data[key] for key in ("packages", "snap_packages", "services", "post_commands")}
    folders = doc["shared_folders"]
    expected = list(v1data["paths"].items()) + list(v1data["app_data_paths"].items())
    assert [(f["host_path"], f["mount"]) for f in folders] == expected
    assert [f["tag"] for f in folders] == [
        "project0",
        "project1",
        "project2",
        "project3",
        "workdir4",
        "downloads",
        "documents",
        "google-chrome",
        "chromium",
        "docker",
        "firefox",
        "firefox-2",
        "jetbrains",
        "jetbrains-2",
        "jetbrains-3",
        "pyenv",
    ]
    assert all(f["read_only"] is False and f["driver"] == "9p" for f in folders)
    assert any("16 host folders kept as written" in w and "agent's host" in w for w in m.warnings)
    check_migration(m)


def test_minimal_example_in_create_mode_drops_the_password_for_a_generated_key() -> None:
    m = migrate_v1(example("minimal"), "minimal.clonebox.yaml", mode="create", drop=frozenset({"gui"}))
    assert m.document["auth"] == {"user": "ubuntu", "method": "ssh_key"}
    assert m.password_found and m.password_hint == ""
    (pw,) = [w for w in m.warnings if "vm.password" in w]
    assert "generated per-VM SSH key" in pw and pw.startswith("minimal.clonebox.yaml:12:")
    (dep,) = [w for w in m.warnings if "deprecated" in w]
    assert "clonebox config migrate minimal.clonebox.yaml" in dep
    check_migration(m)


def test_workstation_in_create_mode_lists_every_unhonourable_item_in_one_error() -> None:
    text = example("workstation")
    v1data = yaml.safe_load(text)
    err = refusal(text, REASON_NOT_HONOURED, mode="create")
    hosts = list(v1data["paths"]) + list(v1data["app_data_paths"])
    assert "17 settings" in err.message
    assert "line 6: vm.gui: true" in err.message
    for host in hosts:
        group = "paths" if host in v1data["paths"] else "app_data_paths"
        n = line_of_text(text, f"  {host}:")
        assert f"line {n}: {group}['{host}']: host folder" in err.message
    assert err.message.count("(--drop paths)") == len(v1data["paths"])
    assert err.message.count("(--drop app_data_paths)") == len(v1data["app_data_paths"])
    assert err.message.endswith("drop them with: --drop gui --drop paths --drop app_data_paths")
    assert err.metadata["field"] == "vm.gui,paths,app_data_paths"
    assert err.metadata["line"] == "6"


def test_workstation_in_create_mode_with_drops_or_shared_roots() -> None:
    text = example("workstation")
    dropped = migrate_v1(text, "ws.yaml", mode="create", drop=frozenset({"gui", "paths", "app_data_paths"}))
    assert dropped.document["shared_folders"] == []
    assert dropped.document["auth"] == {"user": "ubuntu", "method": "ssh_key"}
    assert sum("dropped (--drop paths)" in w for w in dropped.warnings) == 7
    assert sum("dropped (--drop app_data_paths)" in w for w in dropped.warnings) == 9
    check_migration(dropped)

    rooted = migrate_v1(text, "ws.yaml", mode="create", drop=frozenset({"gui"}), shared_roots=["/home/tom"])
    assert len(rooted.document["shared_folders"]) == 16
    assert not any("kept as written" in w for w in rooted.warnings)
    check_migration(rooted)


# ------------------------------------------------------------------------------------- the password


BROKEN_PASSWORDS = [
    pytest.param(f'  password: "{CANARY}\n', id="unterminated-quote"),
    pytest.param(f"  password: {CANARY}: x\n", id="mapping-value"),
    pytest.param(f"  password: !{CANARY} x\n", id="local-tag"),
    pytest.param(f"  password: !!int {CANARY}\n", id="bad-int"),
    pytest.param(f"  password: {{a: {CANARY}}}\n", id="mapping"),
    pytest.param(f"  password: [{CANARY}]\n", id="list"),
    pytest.param(f"  passwd: '{CANARY}\n", id="misspelt-key-syntax-error"),
    pytest.param(f"  passwd: {CANARY}\n", id="misspelt-key"),
]


@pytest.mark.parametrize("line", BROKEN_PASSWORDS)
def test_a_broken_password_line_is_refused_without_quoting_the_password(line: str) -> None:
    text = example("minimal").replace(f"  password: {CANARY}\n", line)
    assert CANARY in text
    err = refusal(text)
    # an unterminated quote runs to the end of the file, where YAML notices it
    assert err.metadata["line"] == ("22" if line.count('"') == 1 or line.count("'") == 1 else "12")


@pytest.mark.parametrize("mode", ["file", "create"])
@pytest.mark.parametrize("name", ["minimal", "workstation"])
def test_the_literal_password_is_in_no_output_and_no_error(name: str, mode: Any) -> None:
    text = example(name)
    assert CANARY in text
    m = migrate_v1(text, f"{name}.yaml", mode=mode, drop=frozenset(DROP_KEYS))
    check_migration(m)
    assert m.password_found
    # every kind of error on the same file
    refusal(text, REASON_NOT_HONOURED, mode=mode)
    refusal(text + "colour: blue\n", mode=mode)
    refusal(text.replace("  vcpus:", "  vcpus: 0\n  old_vcpus:"), mode=mode)
    refusal(text.replace("clone-clonebox", "Clone_Box"), mode=mode)


def test_a_password_variable_becomes_an_env_reference_in_file_mode() -> None:
    text = v1().replace(CANARY, "${VM_PASSWORD}")
    m = migrate_v1(text, "old.yaml", mode="file")
    assert m.document["auth"] == {"user": "ubuntu", "method": "both", "password": "env:VM_PASSWORD"}
    assert m.password_found and "VM_PASSWORD" in m.password_hint
    created = migrate_v1(text, "old.yaml", mode="create")
    assert created.document["auth"] == {"user": "ubuntu", "method": "ssh_key"}


@pytest.mark.parametrize("line", ["", "  password: ''\n", "  password:\n"])
def test_no_password_means_ssh_key_login_and_no_hint(line: str) -> None:
    text = v1().replace(f"  password: {CANARY}\n", line)
    m = migrate_v1(text, "old.yaml", mode="file")
    assert m.document["auth"] == {"user": "ubuntu", "method": "ssh_key"}
    assert not m.password_found and m.password_hint == ""
    assert not any("password" in w for w in m.warnings)
    assert "review auth and shared_folders" in dump_v2_yaml(m.document).splitlines()[0]


# -------------------------------------------------------------------------------- not honoured, --drop

NOT_HONOURED = textwrap.dedent(
    f"""\
    vm:
      name: dev
      gui: true
      network_mode: user
      base_image: /isos/ubuntu.iso
      password: {CANARY}
    paths:
      /home/tom/github: /mnt/github
      /etc: /mnt/etc
    app_data_paths:
      /home/tom/.config/app: /home/ubuntu/.config/app
      /var/lib/app: /home/ubuntu/app
    """
)
ITEMS = {
    "gui": "line 3: vm.gui: true",
    "network_mode": "line 4: vm.network_mode: 'user'",
    "paths": "line 9: paths['/etc']: host folder",
    "app_data_paths": "line 12: app_data_paths['/var/lib/app']: host folder",
}
IMAGE_ITEM = "line 5: vm.base_image: '/isos/ubuntu.iso' does not end in a disk image file name"
ROOTS = ["/home/tom"]


def test_every_unhonourable_item_is_reported_together_with_its_line_and_flag() -> None:
    err = refusal(NOT_HONOURED, REASON_NOT_HONOURED, shared_roots=ROOTS)
    assert "5 settings" in err.message
    gui, network, paths, app_data, image = (err.message.index(item) for item in [*ITEMS.values(), IMAGE_ITEM])
    assert gui < network < image < paths < app_data  # in the order of the file
    for key, item in ITEMS.items():
        assert f"{item}" in err.message and f"(--drop {key})" in err.message
    assert "--image NAME" in err.message
    assert "/home/tom/github" not in err.message and "/home/tom/.config/app" not in err.message
    assert err.metadata["field"] == "vm.gui,vm.network_mode,vm.base_image,paths,app_data_paths"
    assert err.metadata["flags"] == "--drop gui --drop network_mode --image NAME --drop paths --drop app_data_paths"
    assert err.metadata["line"] == "3"


@pytest.mark.parametrize("key", DROP_KEYS)
def test_each_drop_removes_exactly_its_item(key: str) -> None:
    others = frozenset(DROP_KEYS) - {key}
    err = refusal(NOT_HONOURED, REASON_NOT_HONOURED, shared_roots=ROOTS, drop=others, image="ubuntu.qcow2")
    assert "1 setting " in err.message
    assert ITEMS[key] in err.message
    assert err.metadata["flags"] == f"--drop {key}"
    for other in others:
        assert ITEMS[other] not in err.message


def test_with_every_drop_the_rest_is_kept_and_each_dropped_item_warned_once() -> None:
    m = migrate_v1(
        NOT_HONOURED, "old.yaml", mode="file", shared_roots=ROOTS, drop=frozenset(DROP_KEYS), image="ubuntu.qcow2"
    )
    dropped = [w for w in m.warnings if "dropped (--drop " in w]
    assert len(dropped) == 4
    for key, item in ITEMS.items():
        line = item.split(":")[0].removeprefix("line ")
        (warning,) = [w for w in dropped if f"(--drop {key})" in w]
        assert warning.startswith(f"old.yaml:{line}: ")
    assert m.document["network"] == {"mode": "libvirt", "libvirt_network": "default"}
    assert [(f["host_path"], f["mount"]) for f in m.document["shared_folders"]] == [
        ("/home/tom/github", "/mnt/github"),
        ("/home/tom/.config/app", "/home/ubuntu/.config/app"),
    ]
    assert m.document["disks"][0]["base_image"] == "ubuntu.qcow2"
    assert any("replaced by --image 'ubuntu.qcow2'" in w for w in m.warnings)
    check_migration(m)


def test_unknown_drop_values_are_refused_listing_the_valid_ones() -> None:
    err = refusal(v1(), drop=frozenset({"gui", "colour", "sound"}), about_file=False)
    assert "'colour'" in err.message and "'sound'" in err.message
    assert "gui, network_mode, paths, app_data_paths" in err.message
    assert err.metadata["field"] == "drop"


@pytest.mark.parametrize(
    ("line", "shown"),
    [
        ("  base_image: /isos/ubuntu.iso\n", "line 7: vm.base_image: '/isos/ubuntu.iso'"),
        ("  base_image: /images/\n", "line 7: vm.base_image: '/images/'"),
        ("  base_image: /images/.qcow2\n", "line 7: vm.base_image: '/images/.qcow2'"),
        ("  base_image:\n", "line 7: vm.base_image: missing"),
        ("", "line 2: vm.base_image: missing"),
    ],
)
def test_a_base_image_that_is_no_image_file_name_needs_image(line: str, shown: str) -> None:
    text = v1().replace("  base_image: /images/ubuntu-22.04-cloud.qcow2\n", line)
    err = refusal(text, REASON_NOT_HONOURED)
    assert shown in err.message and "(--image NAME names an image)" in err.message
    assert err.metadata["flags"] == "--image NAME"
    m = migrate_v1(text, "old.yaml", mode="file", image="debian/12.qcow2")
    assert m.document["disks"] == [{"name": "root", "base_image": "debian/12.qcow2", "size": "20GiB"}]


@pytest.mark.parametrize("name", ["ubuntu.img", "ubuntu.raw", "Ubuntu-24.04.QCOW2"])
def test_image_file_names_keep_only_the_file_name(name: str) -> None:
    text = v1().replace("/images/ubuntu-22.04-cloud.qcow2", f"/home/tom/vms/{name}")
    m = migrate_v1(text, "old.yaml", mode="file")
    assert m.document["disks"][0]["base_image"] == name
    assert any(f"only the file name '{name}' is kept" in w for w in m.warnings)


@pytest.mark.parametrize("image", ["", "/var/lib/images/x.qcow2", "../x.qcow2", "a/../../x.qcow2", "x\n.qcow2"])
def test_bad_image_arguments_are_refused(image: str) -> None:
    err = refusal(v1(), image=image, about_file=False)
    assert err.metadata["field"] == "image"


@pytest.mark.parametrize(
    ("mode_line", "honoured"), [("", True), ("auto", True), ("default", True), ("user", False), ("bridge", False)]
)
def test_network_modes(mode_line: str, honoured: bool) -> None:
    text = v1(f"network_mode: {mode_line}\n" if mode_line else "")
    if honoured:
        m = migrate_v1(text, "old.yaml", mode="file")
        assert m.document["network"] == {"mode": "libvirt", "libvirt_network": "default"}
    else:
        err = refusal(text, REASON_NOT_HONOURED)
        assert f"line 10: vm.network_mode: '{mode_line}'" in err.message
        assert ("slirp" in err.message) is (mode_line == "user")


# ---------------------------------------------------------------------------------- invalid v1 files


def test_unknown_keys_are_reported_together_with_their_lines() -> None:
    text = v1("vcpu: 2\nssh_key: x\n", "colour: blue\npackages: [git]\n")
    err = refusal(text)
    assert err.message.startswith("old.yaml: 3 problems in this CloneBox v1 file: ")
    assert "line 10: vm.vcpu: unknown key (did you mean 'vcpus'?)" in err.message
    assert "line 11: vm.ssh_key: unknown key" in err.message
    assert "line 12: colour: unknown key (known keys: version, generated, vm," in err.message
    assert err.metadata["line"] == "10"
    assert err.metadata["field"] == "vm.vcpu,vm.ssh_key,colour"


def test_one_problem_is_one_located_error() -> None:
    err = refusal(v1("", "extra: 1\n"))
    assert err.message.startswith("old.yaml:10: extra: unknown key")
    assert err.metadata == {"file": "old.yaml", "line": "10", "field": "extra"}


@pytest.mark.parametrize(
    ("name", "suggestion"),
    [("My_VM", "'my-vm'"), ("dev box", "'dev-box'"), ("-dev-", "'dev'"), ("x" * 64, "'" + "x" * 63 + "'"), ("___", "")],
)
def test_a_name_that_is_no_dns_label_is_refused_with_a_suggestion(name: str, suggestion: str) -> None:
    err = refusal(v1().replace("name: dev", f"name: '{name}'"))
    assert err.message.startswith("old.yaml:3: vm.name: ")
    assert "is not a DNS label" in err.message
    assert err.metadata["field"] == "vm.name"
    if suggestion:
        assert f"(for example {suggestion})" in err.message
    else:
        assert "for example" not in err.message


def test_a_missing_name_is_refused_at_the_vm_section() -> None:
    err = refusal(v1().replace("  name: dev\n", ""))
    assert err.message.startswith("old.yaml:2: vm.name: required but missing")


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("vcpus", "0", "0 is not allowed"),
        ("vcpus", "-2", "-2 is not allowed"),
        ("vcpus", "2.5", "expected a whole number, got 2.5"),
        ("vcpus", "true", "expected a whole number, got true"),
        ("vcpus", "'4'", "expected a whole number, got '4'"),
        ("vcpus", "", "expected a whole number, got null"),
        ("ram_mb", "0", "0 is not allowed"),
        ("disk_size_gb", "-20", "-20 is not allowed"),
        ("disk_size_gb", "[20]", "expected a whole number, got a list"),
    ],
)
def test_invalid_numbers_name_the_v1_field_and_line(field: str, value: str, expected: str) -> None:
    text = re.sub(rf"(?m)^  {field}: .*$", f"  {field}: {value}", v1())
    line = line_of_text(text, f"  {field}:")
    err = refusal(text)
    assert err.message.startswith(f"old.yaml:{line}: vm.{field}: {expected}")
    assert err.metadata["field"] == f"vm.{field}"


def test_numbers_are_copied_as_they_are_and_missing_ones_take_v1_defaults() -> None:
    big = v1().replace("vcpus: 2", "vcpus: 512").replace("ram_mb: 2048", "ram_mb: 3")
    doc = migrate_v1(big, "old.yaml", mode="file").document
    assert (doc["vcpus"], doc["memory"]) == (512, "3MiB")  # admission comes later
    bare = "vm:\n  name: dev\n  base_image: /i/u.qcow2\n"
    m = migrate_v1(bare, "old.yaml", mode="file")
    assert (m.document["vcpus"], m.document["memory"], m.document["disks"][0]["size"]) == (4, "4096MiB", "10GiB")
    assert m.document["auth"] == {"user": "ubuntu", "method": "ssh_key"}


@pytest.mark.parametrize("user", ["root", "Bad User", "'1'", "''"])
def test_a_bad_username_is_refused(user: str) -> None:
    err = refusal(v1().replace("username: ubuntu", f"username: {user}"))
    assert err.message.startswith("old.yaml:8: vm.username: ")


def test_list_items_must_be_strings() -> None:
    err = refusal(v1("", "packages: [git, 3, '']\nservices: docker\n"))
    assert "line 10: packages[1]: expected a string, got 3" in err.message
    assert "line 10: packages[2]: must be a non-empty line" in err.message
    assert "line 11: services: expected a list" in err.message


@pytest.mark.parametrize(
    ("paths", "expected"),
    [
        ("  /home/tom/a: mnt/a\n", "old.yaml:11: paths['/home/tom/a']: the guest path must be an absolute path"),
        ("  home/tom/a: /mnt/a\n", "old.yaml:11: paths['home/tom/a']: the host path must be an absolute path"),
        ("  /home/tom/a: /\n", "old.yaml:11: paths['/home/tom/a']: guest path '/'"),
        ("  /home/tom/a: /mnt/..\n", "old.yaml:11: paths['/home/tom/a']: guest path '/mnt/..'"),
        ("  /home/tom/a: /mnt/my docs\n", "without spaces"),
        ("  /home/tom/a: 5\n", "the guest path must be an absolute path, got 5"),
    ],
)
def test_guest_and_host_paths_must_be_absolute(paths: str, expected: str) -> None:
    err = refusal(v1("", "paths:\n" + paths))
    assert expected in err.message


def test_a_guest_mount_point_used_twice_is_refused() -> None:
    text = v1("", "paths:\n  /home/tom/a: /mnt/a\napp_data_paths:\n  /home/tom/b: /mnt/b/../a/\n")
    err = refusal(text)
    assert err.message.startswith("old.yaml:13: app_data_paths['/home/tom/b']: guest path '/mnt/a' is already")
    assert "paths['/home/tom/a'] (line 11)" in err.message


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("# only a comment\n", id="comment"),
        pytest.param("- vm\n", id="list"),
        pytest.param(f"{CANARY}\n", id="bare-string"),
        pytest.param("vm: small\n", id="vm-not-a-mapping"),
        pytest.param("packages: [git]\n", id="no-vm"),
        pytest.param("version: 2\nvm: {name: dev}\n", id="version-2"),
        pytest.param("version: '3'\nvm: {name: dev}\n", id="version-3"),
        pytest.param("version: true\nvm: {name: dev}\n", id="version-bool"),
    ],
)
def test_files_that_are_no_v1_file_are_refused(text: str) -> None:
    err = refusal(text)
    if text.startswith("version: 2"):
        assert "v2 spec already" in err.message


def test_version_1_as_int_or_string_and_generated_are_accepted_detected_is_ignored() -> None:
    for version in ("1", "'1'"):
        text = v1().replace("version: '1'", f"version: {version}\ngenerated: '2026-01-01T00:00:00'")
        assert migrate_v1(text, "old.yaml", mode="file").document["name"] == "dev"
    m = migrate_v1(v1("", "detected:\n  running_apps: []\n"), "old.yaml", mode="file")
    assert any(w.startswith("old.yaml:10: detected: ignored") for w in m.warnings)
    assert "detected" not in m.document


def test_bad_mode_and_shared_roots_are_refused() -> None:
    assert refusal(v1(), mode="dry-run", about_file=False).metadata["field"] == "mode"
    assert refusal(v1(), shared_roots=["home/tom"], about_file=False).metadata["field"] == "shared_roots"


# ------------------------------------------------------------------------------------ shared folders


@pytest.mark.parametrize(
    ("host", "normalised", "honoured"),
    [
        ("/home/tom/github", "/home/tom/github", True),
        ("/home/tom", "/home/tom", True),
        ("/home/tom/x/../github", "/home/tom/github", True),
        ("//home/tom/github/", "/home/tom/github", True),
        ("/srv/shares/data", "/srv/shares/data", True),
        ("/etc", "/etc", False),
        ("/home/tom/../etc", "/home/etc", False),
        ("/home/tom/../../etc", "/etc", False),
        ("/home/tom/github/../../../etc", "/etc", False),
        ("/home/tomcat/x", "/home/tomcat/x", False),
        ("/home", "/home", False),
    ],
)
@pytest.mark.parametrize("mode", ["file", "create"])
def test_shared_roots_decide_which_host_folders_are_honoured(
    host: str, normalised: str, honoured: bool, mode: Any
) -> None:
    text = v1("", f"paths:\n  '{host}': /mnt/share\n")
    roots = ["/home/tom/", "/srv/shares"]
    if honoured:
        m = migrate_v1(text, "old.yaml", mode=mode, shared_roots=roots)
        assert [f["host_path"] for f in m.document["shared_folders"]] == [normalised]
    else:
        err = refusal(text, REASON_NOT_HONOURED, mode=mode, shared_roots=roots)
        assert f"line 11: paths['{host}']: host folder" in err.message
        assert "outside the shared folder roots" in err.message
        assert "(/home/tom, /srv/shares)" in err.message
        assert (f"(that is '{normalised}')" in err.message) is (normalised != host)


def test_root_slash_honours_everything_and_file_mode_without_roots_keeps_everything() -> None:
    text = v1("", "paths:\n  /etc: /mnt/etc\n")
    assert migrate_v1(text, "old.yaml", mode="create", shared_roots=["/"]).document["shared_folders"]
    m = migrate_v1(text, "old.yaml", mode="file")
    assert m.document["shared_folders"][0]["host_path"] == "/etc"
    assert any("1 host folder kept as written" in w for w in m.warnings)
    err = refusal(text, REASON_NOT_HONOURED, mode="create")
    assert "no shared folder roots are known" in err.message


def test_tags_are_unique_short_and_derived_from_the_guest_path() -> None:
    long = "a-very-long-folder-name-for-the-project-files"
    guests = [f"/mnt/{long}", f"/srv/{long}", f"/opt/{long}", "/a/x", "/b/x", "/c/x-2", "/d/My_Data.v2", "/e/__"]
    paths = "".join(f"  /home/tom/{i}: {g}\n" for i, g in enumerate(guests))
    m = migrate_v1(v1("", "paths:\n" + paths), "old.yaml", mode="file")
    tags = [f["tag"] for f in m.document["shared_folders"]]
    assert len(set(tags)) == len(tags) == len(guests)
    assert all(len(t) <= 31 and TAG.fullmatch(t) for t in tags), tags
    assert tags[0] == long[:31].rstrip("-")
    assert tags[1] == long[:29].rstrip("-") + "-2" and tags[2] == long[:29].rstrip("-") + "-3"
    assert tags[3:] == ["x", "x-2", "x-2-2", "my-data-v2", "share"]


# --------------------------------------------------------------------------------------- YAML output


@pytest.mark.parametrize("name", ["minimal", "workstation"])
def test_yaml_output_round_trips_in_order_with_a_header_and_block_lists(name: str) -> None:
    m = migrate_v1(example(name), f"{name}.clonebox.yaml", mode="file", drop=frozenset({"gui"}))
    text = dump_v2_yaml(m.document, source_name=f"{name}.clonebox.yaml")
    lines = text.splitlines()
    assert lines[0] == (
        f"# migrated from CloneBox v1 file {name}.clonebox.yaml by clonebox config migrate; review auth.password"
    )
    loaded = yaml.safe_load(text)
    assert loaded == m.document
    assert list(loaded) == KEY_ORDER
    assert "  - qemu-guest-agent" in lines or "  - build-essential" in lines
    assert not re.search(r": \[[^\]]", text) and "{" not in text  # block lists (only empty ones are [])
    assert load_yaml_safely(text, "new.yaml", max_bytes=1 << 20).data == m.document


def test_multi_line_commands_are_literal_blocks() -> None:
    text = v1("", "post_commands:\n  - |\n    echo one\n    echo two\n")
    m = migrate_v1(text, "old.yaml", mode="file")
    assert m.document["provision"]["post_commands"] == ["echo one\necho two\n"]
    out = dump_v2_yaml(m.document)
    assert "  - |\n    echo one\n    echo two\n" in out
    assert yaml.safe_load(out) == m.document


@pytest.mark.parametrize("source", ["evil\nname: hacked", "evil\rname: hacked", "evil\u2028name: hacked", "a\x85b: c"])
def test_the_source_name_cannot_break_out_of_the_header_comment(source: str) -> None:
    doc = migrate_v1(v1(), "old.yaml", mode="file").document
    text = dump_v2_yaml(doc, source_name=source)
    assert yaml.safe_load(text) == doc
    assert text.splitlines()[0].startswith("# migrated from CloneBox v1 file evil?name") or "a?b" in text


# ---------------------------------------------------------------------------------- inputs, detection


def test_is_v1_document() -> None:
    for name in ("minimal", "workstation"):
        assert is_v1_document(yaml.safe_load(example(name)))
    assert not is_v1_document({"version": 2, "name": "dev", "vcpus": 1})
    assert not is_v1_document({"name": "dev", "vm": {"name": "dev"}})
    assert not is_v1_document({"vm": "dev"})
    assert not is_v1_document(["vm"])
    assert not is_v1_document(None)


def test_a_loaded_document_or_a_plain_mapping_migrate_like_the_text() -> None:
    text = example("workstation")
    kwargs: dict[str, Any] = {"mode": "file", "drop": frozenset({"gui"})}
    from_text = migrate_v1(text, "ws.yaml", **kwargs)
    loaded = load_yaml_safely(text, "ws.yaml", max_bytes=1 << 20)
    assert migrate_v1(loaded, "ws.yaml", **kwargs) == from_text
    from_data = migrate_v1(yaml.safe_load(text), "ws.yaml", **kwargs)
    assert from_data.document == from_text.document
    # with lines from the node tree, without them from a plain mapping
    assert refusal(loaded, REASON_NOT_HONOURED).message.startswith("old.yaml: 1 setting")
    assert "line 6: vm.gui" in refusal(loaded, REASON_NOT_HONOURED).message
    err = refusal(yaml.safe_load(text.replace("clone-clonebox", "Clone_Box")))
    assert err.message.startswith("old.yaml: vm.name: ") and "line" not in err.metadata
