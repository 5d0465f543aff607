"""The VM spec file loader: formats, one-line errors with line numbers, sizes, round trips."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from clonebox_core.errors import InvalidArgument
from clonebox_core.model import NetworkMode, VmSpec
from clonebox_core.spec import (
    MAX_SPEC_BYTES,
    REASON,
    dump_spec,
    format_size,
    load_spec_file,
    load_spec_text,
    parse_size,
)

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"

TINY = """\
version: 1
name: tiny-a
vcpus: 1
memory: 128MiB
kernel_boot:
  kernel: testguest/vmlinux
  initrd: testguest/initrd.img
  cmdline: console=ttyS0 quiet
disks:
  - name: data
    base_image: testguest/data.qcow2
network: {mode: libvirt, libvirt_network: default}
labels: {app: demo}
"""


def spec_error(text: str, source: str = "tiny.yaml", reason: str = REASON) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        load_spec_text(textwrap.dedent(text), source)
    err = info.value
    assert err.reason == reason
    assert "\n" not in err.message, "errors are one line"
    return err


# ---------------------------------------------------------------------------------------- good specs


def test_full_spec_loads_into_the_core_model() -> None:
    spec = load_spec_text(TINY, "tiny.yaml")
    assert spec.name == "tiny-a"
    assert spec.vcpus == 1
    assert spec.memory_mib == 128
    assert spec.kernel_boot is not None and spec.kernel_boot.cmdline == "console=ttyS0 quiet"
    assert spec.disks[0].base_image == "testguest/data.qcow2" and spec.disks[0].size_mib == 0
    assert spec.network.mode is NetworkMode.LIBVIRT and spec.network.libvirt_network == "default"
    assert spec.labels == (("app", "demo"),)


def test_defaults_for_optional_fields() -> None:
    spec = load_spec_text("version: 1\nname: x\nkernel_boot: {kernel: k}\n")
    assert (spec.vcpus, spec.memory_mib, spec.disks, spec.cloud_init) == (1, 512, (), None)
    assert spec.network.libvirt_network == "default"


def test_empty_sections_mean_none() -> None:
    spec = load_spec_text("version: 1\nname: x\nkernel_boot: {kernel: k}\ndisks:\nlabels:\nshared_folders:\n")
    assert spec.disks == () and spec.labels == () and spec.shared_folders == ()


def test_network_none() -> None:
    spec = load_spec_text("version: 1\nname: x\nkernel_boot: {kernel: k}\nnetwork: {mode: none}\n")
    assert spec.network.mode is NetworkMode.NONE


def test_cloud_init_mapping_becomes_a_cloud_config_document() -> None:
    spec = load_spec_text(
        "version: 1\nname: x\nkernel_boot: {kernel: k}\n"
        "cloud_init:\n  user_data:\n    packages: [nginx]\n  network_config: {version: 2}\n"
    )
    assert spec.cloud_init is not None
    assert spec.cloud_init.user_data.reveal() == "#cloud-config\npackages:\n- nginx\n"
    assert spec.cloud_init.network_config == "version: 2\n"
    assert spec.cloud_init.meta_data == ""


def test_cloud_init_string_is_kept_verbatim() -> None:
    spec = load_spec_text(
        'version: 1\nname: x\nkernel_boot: {kernel: k}\ncloud_init:\n  user_data: "#!/bin/sh\\necho hi\\n"\n'
    )
    assert spec.cloud_init is not None and spec.cloud_init.user_data.reveal() == "#!/bin/sh\necho hi\n"


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_examples_are_valid(path: Path) -> None:
    spec = load_spec_file(path)
    assert spec.name == path.stem or spec.labels


def test_tiny_examples_use_the_test_guest() -> None:
    for name in ("tiny-a", "tiny-b"):
        spec = load_spec_file(EXAMPLES / f"{name}.yaml")
        assert spec.name == name
        assert spec.kernel_boot is not None
        assert (spec.kernel_boot.kernel, spec.kernel_boot.initrd) == (
            "testguest/vmlinux",
            "testguest/initrd.img",
        )
        assert spec.kernel_boot.cmdline == "console=ttyS0 quiet"
        assert spec.disks[0].base_image == "testguest/data.qcow2"
        assert (spec.vcpus, spec.memory_mib) == (1, 128)
        assert spec.labels


def test_load_spec_file_reports_the_path(tmp_path: Path) -> None:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY.replace("128MiB", "0MiB"))
    with pytest.raises(InvalidArgument) as info:
        load_spec_file(path)
    assert info.value.message == f"{path}:4: memory: '0MiB' must be at least 16 MiB"


# ------------------------------------------------------------------------------------ error messages


def test_memory_too_small_names_line_and_limit() -> None:
    err = spec_error(TINY.replace("128MiB", "0MiB"))
    assert err.message == "tiny.yaml:4: memory: '0MiB' must be at least 16 MiB"
    assert err.metadata == {"file": "tiny.yaml", "line": "4", "field": "memory"}


def test_unknown_field_suggests_the_close_match() -> None:
    err = spec_error(TINY.replace("    base_image: testguest/data.qcow2\n", "    base_image: b\n    sise: 1GiB\n"))
    assert err.message == "tiny.yaml:12: disks[0].sise: unknown field (did you mean 'size'?)"


def test_unknown_field_without_a_close_match_lists_the_known_ones() -> None:
    err = spec_error("version: 1\nname: x\nkernel_boot: {kernel: k}\nzzz: 1\n")
    assert err.message.startswith("tiny.yaml:4: zzz: unknown field (known fields: version, name, vcpus")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "version: 1\nname: x\nmemory: -5\nkernel_boot: {kernel: k}\n",
            "tiny.yaml:3: memory: -5 must be at least 16 MiB",
        ),
        (
            "version: 1\nname: x\nmemory: 5TiB\nkernel_boot: {kernel: k}\n",
            "tiny.yaml:3: memory: '5TiB' must be at most 4 TiB",
        ),
        (
            "version: 1\nname: x\nmemory: 10**9\nkernel_boot: {kernel: k}\n",
            "tiny.yaml:3: memory: '10**9' is not a size",
        ),
        (
            "version: 1\nname: x\nmemory: 256MB\nkernel_boot: {kernel: k}\n",
            "tiny.yaml:3: memory: '256MB' is ambiguous",
        ),
        ("version: 1\nname: x\nmemory: 1.2MiB\nkernel_boot: {kernel: k}\n", "is not a whole number of MiB"),
        (
            "version: 1\nname: x\nmemory: true\nkernel_boot: {kernel: k}\n",
            "tiny.yaml:3: memory: true is not a size",
        ),
        (
            "version: 1\nname: x\nmemory: 1.5\nkernel_boot: {kernel: k}\n",
            "tiny.yaml:3: memory: 1.5 is not a size",
        ),
        (
            "version: 1\nname: x\nvcpus: '2'\nkernel_boot: {kernel: k}\n",
            "tiny.yaml:3: vcpus: expected a whole number, got '2'",
        ),
        (
            "version: 1\nname: x\nvcpus: 0\nkernel_boot: {kernel: k}\n",
            "tiny.yaml:3: vcpus: 0 is out of range: use 1..256",
        ),
        (
            "version: 1\nname: Tiny\nkernel_boot: {kernel: k}\n",
            "tiny.yaml:2: name: 'Tiny' is not a DNS label",
        ),
        (
            "version: 1\nname: 12\nkernel_boot: {kernel: k}\n",
            "tiny.yaml:2: name: expected a string, got 12 (put it in quotes)",
        ),
        (
            "version: 1\nvcpus: 1\nkernel_boot: {kernel: k}\n",
            "tiny.yaml:1: name: required but missing: add 'name: ...'",
        ),
        ("version: 1\nname: x\n", "tiny.yaml:1: disks: nothing to boot: give a disk or kernel_boot"),
        (
            "version: 1\nname: x\nkernel_boot:\n  initrd: i\n",
            "tiny.yaml:4: kernel_boot.kernel: required but missing",
        ),
        (
            "version: 1\nname: x\nkernel_boot: vmlinuz\n",
            "tiny.yaml:3: kernel_boot: expected a mapping with kernel, initrd, cmdline",
        ),
        (
            "version: 1\nname: x\nkernel_boot: {kernel: k}\ndisks: {name: d}\n",
            "tiny.yaml:4: disks: expected a list",
        ),
        (
            "version: 1\nname: x\ndisks:\n  - name: a\n    size: 1GiB\n  - name: b\n",
            "tiny.yaml:6: disks[1].size: a blank disk (no base_image) needs a size",
        ),
        (
            "version: 1\nname: x\ndisks:\n  - name: a\n    size: 1GiB\n  - name: a\n    size: 1GiB\n",
            "tiny.yaml:6: disks[1].name: duplicate disk name 'a'",
        ),
        (
            "version: 1\nname: x\ndisks:\n  - name: a\n    size: 0\n",
            "tiny.yaml:5: disks[0].size: 0 must be at least 1 MiB (leave size out",
        ),
        (
            "version: 1\nname: x\ndisks:\n  - name: a\n    base_image: ../etc/shadow\n",
            "tiny.yaml:5: disks[0].base_image: '../etc/shadow' must not contain '..'",
        ),
        (
            "version: 1\nname: x\nkernel_boot: {kernel: k}\nnetwork: {mode: bridge}\n",
            "tiny.yaml:4: network.mode: 'bridge' is not allowed: use 'libvirt', 'none' or 'managed'",
        ),
        (
            "version: 1\nname: x\nkernel_boot: {kernel: k}\nnetwork:\n  mode: none\n  libvirt_network: default\n",
            "tiny.yaml:6: network.libvirt_network: only applies to mode 'libvirt'",
        ),
        (
            "version: 1\nname: x\nkernel_boot: {kernel: k}\nnetwork: {libvirt_network: 'no spaces'}\n",
            "tiny.yaml:4: network.libvirt_network: 'no spaces' is not a libvirt network name",
        ),
        (
            "version: 1\nname: x\nkernel_boot: {kernel: k}\nshared_folders:\n  - host_path: srv\n    tag: t\n",
            "tiny.yaml:5: shared_folders[0].host_path: must be an absolute path",
        ),
        (
            "version: 1\nname: x\nkernel_boot: {kernel: k}\n"
            "shared_folders:\n  - {host_path: /a, tag: t, read_only: 'yes'}\n",
            "tiny.yaml:5: shared_folders[0].read_only: expected true or false, got 'yes'",
        ),
        (
            "version: 1\nname: x\nkernel_boot: {kernel: k}\nlabels:\n  app: demo\n  tier: 1\n",
            "tiny.yaml:6: labels.tier: expected a string, got 1 (put it in quotes)",
        ),
        (
            "version: 1\nname: x\nkernel_boot: {kernel: k}\nlabels:\n  app: 'with space'\n",
            "tiny.yaml:5: labels.app: label value 'with space'",
        ),
        (
            "version: 1\nname: x\nkernel_boot: {kernel: k}\nlabels:\n  App: demo\n",
            "tiny.yaml:5: labels: label key 'App'",
        ),
        (
            "version: 1\nname: x\nkernel_boot: {kernel: k}\ncloud_init:\n  user_data: 5\n",
            # values under cloud_init are never quoted, not even numbers: only their kind
            "tiny.yaml:5: cloud_init.user_data: expected a string, got a number",
        ),
    ],
)
def test_errors_name_file_line_field_and_fix(text: str, expected: str) -> None:
    assert expected in spec_error(text).message
    assert spec_error(text).message.startswith("tiny.yaml:")


def test_several_problems_report_the_first_in_file_order() -> None:
    err = spec_error("version: 1\nname: x\nvcpus: two\nmemory: 0\nkernel_boot: {kernel: k}\n")
    assert err.message.startswith("tiny.yaml:3: vcpus:")
    assert err.message.endswith("(and 1 more problem)")


def test_version_is_required_and_checked_first() -> None:
    assert spec_error("name: x\nbogus: 1\n").message == "tiny.yaml:1: version: required but missing: add 'version: 2'"
    err = spec_error("name: x\nversion: 3\nbogus: 1\n")
    assert err.message == "tiny.yaml:2: version: 3 is not supported: this clonebox reads versions 1 and 2"
    assert "is not supported" in spec_error("version: '1'\nname: x\n").message
    assert "is not supported" in spec_error("version: true\nname: x\n").message


def test_duplicate_keys_are_refused() -> None:
    err = spec_error("version: 1\nname: x\nmemory: 1GiB\nmemory: 2GiB\n")
    assert err.message == "tiny.yaml:4: duplicate key 'memory' (first at line 3): keep one"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "version: 1\n name: x\n",
            "tiny.yaml:2: not valid YAML: mapping values are not allowed here (column 6)",
        ),
        ("version: 1\nname: [x\n", "tiny.yaml:3: not valid YAML:"),
        ("version: 1\n\tname: x\n", "indent with spaces, not tabs"),
        (
            "version: 1\nname: x\nkernel_boot: {kernel: 2001-13-01}\n",
            "tiny.yaml:3: not valid YAML: month must be in 1..12",
        ),
        ("version: 1\nname: *nope\n", "tiny.yaml:2: not valid YAML: found undefined alias"),
        (
            "a: 1\n---\nb: 2\n",
            "tiny.yaml:2: not valid YAML: expected a single document in the stream, but found another document",
        ),
    ],
)
def test_yaml_syntax_errors_are_one_line_with_line_numbers(text: str, expected: str) -> None:
    assert expected in spec_error(text).message


def test_document_shape_errors() -> None:
    assert "the file is empty" in spec_error("").message
    assert "the file is empty" in spec_error("# only a comment\n").message
    assert "expected a mapping of fields" in spec_error("- a\n- b\n").message
    assert "expected a mapping of fields" in spec_error("just text\n").message


def test_a_legacy_project_file_is_recognised() -> None:
    err = spec_error("version: '1'\nvm:\n  name: clone\n  ram_mb: 4096\n")
    assert err.message.startswith("tiny.yaml:2: this looks like a CloneBox v1 project file")
    assert "clonebox config migrate" in err.message


def test_alias_bombs_stop_early() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 8):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    # 70 aliases (under the alias limit) that would expand to 10**7 nodes: refused without expanding
    err = spec_error("\n".join(lines) + "\n", reason="YAML_TOO_MANY_ALIASES")
    assert "too many YAML nodes after expanding aliases" in err.message
    assert err.metadata == {"file": "tiny.yaml", "line": "5"}  # a4: the first anchor past 100000 nodes


def test_recursive_aliases_are_refused() -> None:
    err = spec_error("version: 1\nname: &x [*x]\n", reason="YAML_TOO_MANY_ALIASES")
    assert err.message.startswith("tiny.yaml:2: too many YAML nodes: an alias refers to the node that contains it")


def test_deep_nesting_is_an_invalid_argument() -> None:
    err = spec_error("version: 1\nname: " + "[" * 1000 + "]" * 1000 + "\n", reason="YAML_TOO_DEEP")
    assert err.message == "tiny.yaml:2: YAML nested too deeply (more than 64 levels of lists and mappings)"


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="no such file"):
        load_spec_file(tmp_path / "missing.yaml")
    with pytest.raises(InvalidArgument, match="is a directory"):
        load_spec_file(tmp_path)
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"version: 1\nname: caf\xe9\n")
    with pytest.raises(InvalidArgument, match=r"latin1.yaml:2: not UTF-8 text"):
        load_spec_file(bad)
    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * (MAX_SPEC_BYTES + 1))
    with pytest.raises(InvalidArgument, match="larger than 4 MiB"):
        load_spec_file(big)
    with pytest.raises(InvalidArgument, match="larger than 4 MiB"):
        load_spec_text("#" * (MAX_SPEC_BYTES + 1))


# -------------------------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    ("value", "mib"),
    [
        (512, 512),
        ("512", 512),
        ("256MiB", 256),
        ("256 MiB", 256),
        ("256M", 256),
        ("256Mi", 256),
        ("1GiB", 1024),
        ("1G", 1024),
        ("1g", 1024),
        ("1.5GiB", 1536),
        ("2048KiB", 2),
        ("1TiB", 1024 * 1024),
        (" 3 GiB ", 3072),
    ],
)
def test_parse_size(value: int | str, mib: int) -> None:
    assert parse_size(value) == mib


@pytest.mark.parametrize("value", ["", "MiB", "1 PiB", "1.5", "1KiB", "-1GiB", "1GB", "1 mb", "x", None, 1.5, True, []])
def test_parse_size_rejects(value: object) -> None:
    with pytest.raises(ValueError):
        parse_size(value)


@pytest.mark.parametrize(
    ("mib", "text"), [(1, "1MiB"), (1024, "1GiB"), (1536, "1536MiB"), (3 * 1024**2, "3TiB"), (0, "0MiB")]
)
def test_format_size(mib: int, text: str) -> None:
    assert format_size(mib) == text


# ------------------------------------------------------------------------------------------ dumping


def test_dump_spec_round_trips_the_examples() -> None:
    for path in EXAMPLES.glob("*.yaml"):
        spec = load_spec_file(path)
        assert load_spec_text(dump_spec(spec), "dumped.yaml") == spec


def test_dump_spec_writes_readable_blocks() -> None:
    spec = load_spec_file(EXAMPLES / "with-cloud-init.yaml")
    text = dump_spec(spec)
    assert "user_data: |\n    #cloud-config\n" in text
    assert "size: 8GiB" in text


def test_dump_minimal(tmp_path: Path) -> None:
    spec = VmSpec(name="x", kernel_boot=None, disks=())
    text = dump_spec(spec)
    assert text.startswith("version: 1\nname: x\n")


def test_a_disk_may_attach_an_agent_volume_and_round_trips() -> None:
    text = TINY.replace("data.qcow2\n", "data.qcow2\n  - name: db\n    volume: pgdata\n")
    spec = load_spec_text(text, "vol.yaml")
    assert [(d.name, d.volume, d.base_image, d.size_mib) for d in spec.disks] == [
        ("data", "", "testguest/data.qcow2", 0),
        ("db", "pgdata", "", 0),
    ]
    assert spec.own_disks == spec.disks[:1]
    assert "volume: pgdata" in dump_spec(spec)
    assert load_spec_text(dump_spec(spec), "dumped.yaml") == spec


def test_a_volume_disk_with_a_size_is_refused_naming_the_field_and_line() -> None:
    text = TINY.replace("data.qcow2\n", "data.qcow2\n  - name: db\n    volume: pgdata\n    size: 1GiB\n")
    with pytest.raises(InvalidArgument) as err:
        load_spec_text(text, "vol.yaml")
    assert "disks[1].size" in err.value.message and "vol.yaml:" in err.value.message
    assert "remove it" in err.value.message
