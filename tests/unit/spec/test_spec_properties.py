"""Property-based tests of the spec loader: sizes round-trip, specs round-trip, junk never crashes."""

from __future__ import annotations

import re
import string
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clonebox_core.errors import InvalidArgument
from clonebox_core.model import (
    CloudInit,
    DiskSpec,
    KernelBoot,
    NetworkMode,
    NetworkSpec,
    SharedFolder,
    VmSpec,
)
from clonebox_core.spec import dump_spec, format_size, load_spec_text, parse_size
from clonebox_core.validate import MAX_DISK_MIB, MAX_MEMORY_MIB, MIN_MEMORY_MIB

TINY_TEXT = """\
version: 1
name: tiny-a
memory: 128MiB
kernel_boot: {kernel: testguest/vmlinux, initrd: testguest/initrd.img, cmdline: console=ttyS0 quiet}
disks:
  - name: data
    base_image: testguest/data.qcow2
    size: 1GiB
network: {mode: libvirt, libvirt_network: default}
shared_folders: [{host_path: /srv/x, tag: x, read_only: true}]
cloud_init: {user_data: "#cloud-config\\n", meta_data: ""}
labels: {app: demo}
"""

ONE_LINE_WITH_LINE_NUMBER = re.compile(r"^<spec>:\d+: [^\n]+$")

sizes = st.integers(min_value=0, max_value=2**50)
UNITS = {
    "KiB": 1 / 1024,
    "MiB": 1,
    "GiB": 1024,
    "TiB": 1024**2,
    "K": 1 / 1024,
    "M": 1,
    "G": 1024,
    "T": 1024**2,
}


@given(sizes)
def test_format_then_parse_is_identity(mib: int) -> None:
    assert parse_size(format_size(mib)) == mib


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from(sorted(UNITS)), st.sampled_from(["", " "]))
def test_whole_units_parse_to_the_product(n: int, unit: str, space: str) -> None:
    factor = UNITS[unit]
    text = f"{n}{space}{unit}"
    if unit in ("KiB", "K"):
        if n % 1024:
            try:
                parse_size(text)
            except ValueError:
                return
            raise AssertionError(f"{text} is not a whole number of MiB but parsed")
        assert parse_size(text) == n // 1024
    else:
        assert parse_size(text) == int(n * factor)


@given(st.text(max_size=20))
def test_parse_size_raises_only_value_error(text: str) -> None:
    try:
        result = parse_size(text)
    except ValueError as exc:
        assert str(exc)
    else:
        assert isinstance(result, int) and result >= 0


# ------------------------------------------------------------------------------------ valid specs

dns = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?\Z")
path = st.from_regex(r"\A[a-z0-9_]{1,8}(/[a-z0-9_.]{1,8}){0,2}\Z").filter(lambda p: ".." not in p.split("/"))
label_key = st.from_regex(r"\A[a-z0-9]([a-z0-9._/-]{0,8}[a-z0-9])?\Z")
label_value = st.from_regex(r"\A[A-Za-z0-9._-]{0,10}\Z")
doc_text = st.text(alphabet=string.printable, max_size=60)


@st.composite
def specs(draw: st.DrawFn) -> VmSpec:
    names = draw(st.lists(dns, max_size=4, unique=True))
    disks = []
    for name in names:
        base = draw(st.one_of(st.just(""), path))
        size = draw(st.integers(min_value=1 if not base else 0, max_value=MAX_DISK_MIB))
        disks.append(DiskSpec(name, base, size))
    kernel = draw(
        st.one_of(
            st.none(),
            st.builds(KernelBoot, path, st.one_of(st.just(""), path), st.from_regex(r"\A[a-z0-9= ]{0,20}\Z")),
        )
    )
    if kernel is None and not disks:
        kernel = KernelBoot("vmlinuz")
    mode = draw(st.sampled_from(list(NetworkMode)))
    if mode is NetworkMode.MANAGED:
        third = draw(st.integers(min_value=0, max_value=255))
        network = NetworkSpec(
            mode,
            "cb-" + draw(st.from_regex(r"\A[a-z0-9-]{1,10}\Z")),
            f"10.213.{third}.0/24",
            f"10.213.{third}.{draw(st.integers(min_value=2, max_value=254))}",
            tuple(draw(st.lists(dns, max_size=3, unique=True))),
        )
    else:
        network = NetworkSpec(
            mode, "default" if mode is NetworkMode.NONE else draw(st.from_regex(r"\A[a-z0-9_.-]{1,10}\Z"))
        )
    tags = draw(st.lists(st.from_regex(r"\A[A-Za-z0-9_-]{1,10}\Z"), max_size=3, unique=True))
    folders = tuple(SharedFolder("/" + draw(path), tag, draw(st.booleans())) for tag in tags)
    cloud = draw(st.one_of(st.none(), st.builds(CloudInit, doc_text, doc_text, doc_text)))
    labels = draw(st.dictionaries(label_key, label_value, max_size=4))
    return VmSpec(
        name=draw(dns),
        vcpus=draw(st.integers(min_value=1, max_value=256)),
        memory_mib=draw(st.integers(min_value=MIN_MEMORY_MIB, max_value=MAX_MEMORY_MIB)),
        disks=tuple(disks),
        kernel_boot=kernel,
        network=network,
        shared_folders=folders,
        cloud_init=cloud,
        labels=tuple(sorted(labels.items())),
    )


@settings(max_examples=80, suppress_health_check=[HealthCheck.too_slow])
@given(specs())
def test_dump_then_load_is_identity(spec: VmSpec) -> None:
    assert load_spec_text(dump_spec(spec)) == spec


# ------------------------------------------------------------------------------------------- junk

FIELDS = [
    "version",
    "name",
    "vcpus",
    "memory",
    "disks",
    "kernel_boot",
    "network",
    "shared_folders",
    "cloud_init",
    "labels",
    "size",
    "base_image",
    "kernel",
    "mode",
    "tag",
    "host_path",
    "user_data",
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=12),
    st.sampled_from(["1GiB", "0", "-1", "tiny", "libvirt", "none", "/abs", "../x", "16MiB"]),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=6)), children, max_size=5),
    ),
    max_leaves=25,
)


def check_only_invalid_argument(text: str) -> None:
    try:
        result = load_spec_text(text)
    except InvalidArgument as exc:
        assert ONE_LINE_WITH_LINE_NUMBER.match(exc.message), exc.message
        # schema and syntax problems, or one of the YAML limits (aliases, depth, size)
        assert exc.reason in {"SPEC_INVALID", "YAML_TOO_MANY_ALIASES", "YAML_TOO_DEEP", "YAML_TOO_LARGE"}
    else:
        assert isinstance(result, VmSpec)


@settings(max_examples=120, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(FIELDS), values, max_size=8), st.booleans())
def test_random_documents_raise_only_invalid_argument(doc: dict[str, Any], with_version: bool) -> None:
    if with_version:
        doc = {"version": 1, **doc}
    check_only_invalid_argument(yaml.safe_dump(doc))


@settings(max_examples=300)
@given(st.text(max_size=200))
def test_random_text_raises_only_invalid_argument(text: str) -> None:
    check_only_invalid_argument(text)


@settings(max_examples=300)
@given(st.data())
def test_mutated_valid_spec_raises_only_invalid_argument(data: st.DataObject) -> None:
    text = TINY_TEXT
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        pos = data.draw(st.integers(min_value=0, max_value=len(text)))
        action = data.draw(st.sampled_from(["insert", "delete", "replace"]))
        char = data.draw(st.sampled_from([*":-[]{}&*!|>'\"#%@` \t\n0aZ", "\x00", "é"]))
        if action == "insert":
            text = text[:pos] + char + text[pos:]
        elif action == "delete":
            text = text[:pos] + text[pos + 1 :]
        else:
            text = text[:pos] + char + text[pos + 1 :]
    check_only_invalid_argument(text)
