"""Validating a VM spec that sits inside another YAML document (a plan), with errors at that document's lines."""

from __future__ import annotations

from typing import Any

import pytest

from clonebox_core.errors import InvalidArgument
from clonebox_core.spec import REASON, SpecOrigin, SpecProblem, load_spec_text, problem_at, spec_from_data
from clonebox_core.yamlsafe import load_yaml_safely

pytestmark = pytest.mark.unit

OUTER = """\
stacks:
  - vm:
      version: 2
      name: web-1
      kernel_boot: {kernel: testguest/vmlinux}
      memory: 1MiB
      labels: {app: web}
base:
  vcpus: 300
"""


def parsed(text: str = OUTER) -> tuple[Any, Any]:
    data, root = load_yaml_safely(text, "outer.yaml", max_bytes=1 << 20)
    return data, root


def test_a_valid_inner_spec_is_the_same_as_the_file() -> None:
    text = "version: 2\nname: web-1\nkernel_boot: {kernel: testguest/vmlinux}\nlabels: {app: web}\n"
    data, root = load_yaml_safely(
        "outer:\n" + "".join(f"  {line}\n" for line in text.splitlines()), "o", max_bytes=1 << 20
    )
    assert spec_from_data(data["outer"], root, "o", ("outer",)) == load_spec_text(text)


def test_errors_name_the_outer_file_line_and_path() -> None:
    data, root = parsed()
    inner = data["stacks"][0]["vm"]
    with pytest.raises(InvalidArgument) as info:
        spec_from_data(inner, root, "outer.yaml", ("stacks", 0, "vm"), reason="PLAN_INVALID")
    err = info.value
    assert err.reason == "PLAN_INVALID"
    assert err.metadata == {"file": "outer.yaml", "line": "6", "field": "stacks[0].vm.memory"}
    assert err.message == "outer.yaml:6: stacks[0].vm.memory: '1MiB' must be at least 16 MiB"


def test_a_value_from_a_fallback_is_blamed_there() -> None:
    data, root = parsed()
    inner = {**data["stacks"][0]["vm"], "memory": 64, "vcpus": 300}
    with pytest.raises(InvalidArgument) as info:
        spec_from_data(
            inner,
            root,
            "outer.yaml",
            ("stacks", 0, "vm"),
            fallbacks=[SpecOrigin("outer.yaml", root, ("base",))],
        )
    assert info.value.reason == REASON
    assert info.value.metadata == {"file": "outer.yaml", "line": "9", "field": "base.vcpus"}


def test_problem_at_blames_the_first_origin_that_has_the_value() -> None:
    _, root = parsed()
    own = SpecOrigin("outer.yaml", root, ("stacks", 0, "vm"))
    base = SpecOrigin("outer.yaml", root, ("base",))
    assert problem_at([own, base], ("labels", "app"), "bad", at_key=True) == SpecProblem(
        "outer.yaml", 7, "stacks[0].vm.labels.app: bad", "stacks[0].vm.labels.app"
    )
    assert problem_at([own, base], ("vcpus",), "bad") == SpecProblem("outer.yaml", 9, "base.vcpus: bad", "base.vcpus")
    # written nowhere: the first origin, at the deepest part that exists
    assert problem_at([own, base], ("disks", 0, "size"), "bad") == SpecProblem(
        "outer.yaml", 3, "stacks[0].vm.disks[0].size: bad", "stacks[0].vm.disks[0].size"
    )
    # a missing field blames the mapping it belongs in
    assert problem_at([own, base], ("kernel_boot", "initrd"), "missing", parent=True).line == 5
