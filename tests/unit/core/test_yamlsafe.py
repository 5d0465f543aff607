"""The one safe YAML reader: limits refused before the work they protect, plain types only, no secrets shown."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from clonebox_agent.config import AgentConfig
from clonebox_controller.config import ControllerConfig
from clonebox_core.config import MAX_CONFIG_BYTES, load_config
from clonebox_core.errors import InvalidArgument
from clonebox_core.yamlsafe import (
    DEFAULT_MAX_ALIASES,
    HIDDEN,
    TOO_DEEP,
    TOO_LARGE,
    TOO_MANY_ALIASES,
    find_node,
    line_of,
    load_yaml_safely,
    scrub,
    token,
)

SECRET = "s3cr3t-TOKEN-123"
KIB = 1024
ONE_LINE = re.compile(r"^doc\.yaml:\d+: [^\n]+$")
REASONS = {"YAML_INVALID", TOO_LARGE, TOO_MANY_ALIASES, TOO_DEEP}


def load(content: str | bytes, **limits: Any) -> Any:
    limits.setdefault("max_bytes", 64 * KIB)
    return load_yaml_safely(content, "doc.yaml", **limits).data


def refusal(content: str | bytes, reason: str = "YAML_INVALID", **limits: Any) -> InvalidArgument:
    limits.setdefault("max_bytes", 64 * KIB)
    with pytest.raises(InvalidArgument) as info:
        load_yaml_safely(content, "doc.yaml", **limits)
    err = info.value
    assert err.reason == reason, err.message
    assert ONE_LINE.match(err.message), err.message
    assert err.metadata["file"] == "doc.yaml"
    assert err.message.startswith(f"doc.yaml:{err.metadata['line']}: ")
    return err


def billion_laughs(levels: int = 9, fan_out: int = 10) -> str:
    lines = ['lol0: &lol0 "lol"']
    for i in range(1, levels + 1):
        lines.append(f"lol{i}: &lol{i} [" + ", ".join([f"*lol{i - 1}"] * fan_out) + "]")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ loading


def test_plain_documents_load_with_their_node_tree() -> None:
    doc = load_yaml_safely("a: 1\nb:\n  - x\n  - {c: true}\n", "doc.yaml", max_bytes=KIB)
    assert doc.data == {"a": 1, "b": ["x", {"c": True}]}
    assert doc.root is not None
    assert line_of(doc.root, ("b", 1, "c")) == 4
    assert line_of(doc.root, ("b",), at_key=True) == 2
    node, key, matched = find_node(doc.root, ("b", 5))  # stops at the deepest part that exists
    assert matched == 1 and isinstance(node, yaml.SequenceNode)
    assert isinstance(key, yaml.ScalarNode) and key.value == "b"
    data, root = doc  # a named tuple: unpacks like one
    assert data == doc.data and root is doc.root


def test_empty_stream_and_bytes() -> None:
    assert load_yaml_safely("", "doc.yaml", max_bytes=KIB) == (None, None)
    assert load_yaml_safely("# nothing\n", "doc.yaml", max_bytes=KIB) == (None, None)
    assert load("name: café\n".encode()) == {"name": "café"}
    assert load("\ufeffa: 1\n".encode()) == {"a": 1}  # a UTF-8 byte order mark is fine


def test_a_few_aliases_and_merge_keys_still_work() -> None:
    text = "base: &b {cpu: 1, mem: 2}\nvm:\n  <<: *b\n  mem: 4\nlist: [*b, *b]\n"
    assert load(text) == {
        "base": {"cpu": 1, "mem": 2},
        "vm": {"cpu": 1, "mem": 4},
        "list": [{"cpu": 1, "mem": 2}, {"cpu": 1, "mem": 2}],
    }


def test_standard_explicit_tags_are_allowed() -> None:
    assert load("a: !!str 1\nb: !!int '7'\nc: !!binary aGk=\nd: !!set {x}\n") == {
        "a": "1",
        "b": 7,
        "c": b"hi",
        "d": {"x"},
    }


# ------------------------------------------------------------------------------------------- limits


def test_oversize_is_refused_before_parsing() -> None:
    err = refusal("a: [" * 2000, TOO_LARGE, max_bytes=KIB)  # not even valid YAML: never parsed
    assert err.message == "doc.yaml:1: file is larger than 1 KiB: make it smaller"
    refusal(b"#" * (KIB + 1), TOO_LARGE, max_bytes=KIB)
    assert load("#" * KIB, max_bytes=KIB) is None  # exactly the limit is fine


def test_size_counts_bytes_not_characters() -> None:
    refusal("a: " + "é" * 600 + "\n", TOO_LARGE, max_bytes=KIB)  # 600 characters, 1200 bytes
    assert "MiB" in refusal("#" * (2 * 1024 * KIB + 1), TOO_LARGE, max_bytes=2 * 1024 * KIB).message


def test_billion_laughs_is_refused_as_too_many_aliases() -> None:
    # 90 aliases, under the alias limit, standing for 10**9 strings: refused on the shared node graph
    err = refusal(billion_laughs(), TOO_MANY_ALIASES)
    assert "after expanding aliases" in err.message


def test_too_many_alias_events_are_refused_while_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    def never(*_: object) -> None:
        raise AssertionError("constructed a document with too many aliases")

    monkeypatch.setattr(yaml.SafeLoader, "construct_document", never)
    # a syntax error *after* the 101st alias: the refusal came while composing events, before the end
    text = "a: &a x\nb: [" + ", ".join(["*a"] * (DEFAULT_MAX_ALIASES + 1)) + "]\nc: [unclosed\n"
    err = refusal(text, TOO_MANY_ALIASES)
    assert err.message.startswith("doc.yaml:2: too many YAML aliases (more than 100")


def test_alias_limit_is_exact() -> None:
    text = "a: &a x\nb: [" + ", ".join(["*a"] * 5) + "]\n"
    assert load(text, max_aliases=5)["b"] == ["x"] * 5
    refusal(text, TOO_MANY_ALIASES, max_aliases=4)
    refusal("a: &a x\nb: *a\n", TOO_MANY_ALIASES, max_aliases=0)


def test_recursive_aliases_are_refused() -> None:
    assert "refers to the node that contains it" in refusal("a: &x [1, *x]\n", TOO_MANY_ALIASES).message
    refusal("a: &x {b: *x}\n", TOO_MANY_ALIASES)
    refusal("a: &x {<<: *x}\n", TOO_MANY_ALIASES)


def test_deep_nesting_is_refused_while_parsing() -> None:
    err = refusal("a: " + "[" * 10_000, TOO_DEEP)  # never closed: refused at level 65, not at the end
    assert err.message == "doc.yaml:1: YAML nested too deeply (more than 64 levels of lists and mappings)"
    block = "".join("  " * i + f"k{i}:\n" for i in range(70))
    assert refusal(block, TOO_DEEP).metadata["line"] == "65"  # the 65th mapping starts there
    assert load("a: " + "[" * 63 + "]" * 63) is not None  # the mapping and 63 lists: 64 levels
    refusal("a: [[[1]]]\n", TOO_DEEP, max_depth=3)


def test_deep_nesting_through_aliases_is_refused() -> None:
    text = "a: &a " + "[" * 40 + "]" * 40 + "\nb: " + "[" * 30 + "*a" + "]" * 30 + "\n"
    assert "after expanding aliases" in refusal(text, TOO_DEEP).message


def test_too_many_nodes_without_aliases() -> None:
    refusal("[" + ", ".join(["1"] * 200) + "]", TOO_LARGE, max_nodes=100)
    assert len(load("[" + ", ".join(["1"] * 99) + "]", max_nodes=100)) == 99


# ------------------------------------------------------------------------------------ other problems


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("a: 1\nb: 2\na: 3\n", 3),
        ("x:\n  y: 1\n  'y': 2\n", 3),
        ("x: {y: 1, z: 2, y: 3}\n", 1),
        ("- {a: 1}\n- a: 1\n  a: 2\n", 3),
    ],
)
def test_duplicate_keys_are_refused(text: str, line: int) -> None:
    err = refusal(text)
    assert err.metadata["line"] == str(line)
    assert "duplicate key" in err.message and err.message.endswith(": keep one")


@pytest.mark.parametrize(
    "text",
    [
        "a: !!python/object/apply:os.system ['echo pwned']\n",
        "a: !!python/name:os.system\n",
        "a: !!python/object:collections.OrderedDict {}\n",
        "!!python/tuple [1, 2]\n",
        "a: !custom x\n",
        "a: !<tag:example.com,2000:thing> x\n",
    ],
)
def test_non_standard_tags_are_refused(text: str) -> None:
    assert "is not allowed: only plain YAML values" in refusal(text).message


def test_not_utf8() -> None:
    err = refusal(b"a: 1\nb: caf\xe9\n")
    assert err.message == "doc.yaml:2: not UTF-8 text: save the file as UTF-8"


def test_bad_values_and_characters() -> None:
    assert "month must be in 1..12" in refusal("a: 2001-13-01\n").message
    assert "not a valid bool" in refusal("a: !!bool maybe\n").message
    assert "not a valid int" in refusal("a: !!int " + "7" * 5000 + "\n").message  # Python's digit limit
    assert refusal("a: 1\nb: \x00\n").message == (
        "doc.yaml:2: not valid YAML: special character U+0000 is not allowed: remove it"
    )


def test_caller_reason_for_everything_but_limits() -> None:
    with pytest.raises(InvalidArgument) as info:
        load_yaml_safely("a: [\n", "doc.yaml", max_bytes=KIB, reason="SPEC_INVALID")
    assert info.value.reason == "SPEC_INVALID"
    with pytest.raises(InvalidArgument) as info:
        load_yaml_safely(billion_laughs(), "doc.yaml", max_bytes=KIB, reason="SPEC_INVALID")
    assert info.value.reason == TOO_MANY_ALIASES


# ------------------------------------------------------------------------------------------ secrets


def test_tokens_are_short() -> None:
    assert token("x" * 100) == "'xxxxxxxxxxxxxxxxxxxxx...'"
    assert token("short") == "'short'"
    assert token(SECRET, hide=True) == HIDDEN
    long = "found undefined alias '" + "a" * 200 + "'"
    assert scrub(long) == "found undefined alias 'aaaaaaaaaaaaaaaaaaaaa...'"
    assert scrub(f"found alias '{SECRET}' and ':'", hide=True) == f"found alias {HIDDEN} and ':'"
    assert scrub("two\nlines") == "two lines"


def test_long_document_tokens_are_truncated() -> None:
    assert len(refusal("a: *" + "n" * 5000 + "\n").message) < 200
    assert len(refusal("a: !" + "t" * 5000 + " x\n").message) < 200
    assert len(refusal("? " + "k" * 5000 + "\n: 1\n? " + "k" * 5000 + "\n: 2\n").message) < 200
    assert len(refusal("a: !!int " + "z" * 5000 + "\n").message) < 200


SECRET_DOCUMENTS = [
    f"user_data: *{SECRET}\n",
    f"user_data: !{SECRET} x\n",
    f"user_data: !{SECRET}!x x\n",
    f"user_data: !!int {SECRET}\n",
    f"user_data: !!float {SECRET}\n",
    f"user_data: !!python/object/apply:os.system ['{SECRET}']\n",
    f"user_data:\n    {SECRET}: 1\n    {SECRET}: 2\n",
    f"user_data: &{SECRET} x\nmeta_data: *{SECRET}\nnetwork_config: &{SECRET} y\n",
    f"user_data: '{SECRET}\n",
    f'user_data: "{SECRET}\\q"\n',
    f"user_data: {{a: [{SECRET}}}\n",
    f"user_data: [{SECRET}, *undefined-{SECRET}]\n",
]


@pytest.mark.parametrize("inner", SECRET_DOCUMENTS)
def test_nothing_from_a_secret_subtree_appears_in_messages(inner: str) -> None:
    text = "name: x\ncloud_init:\n  " + inner.replace("\n", "\n  ").rstrip() + "\n"
    with pytest.raises(InvalidArgument) as info:
        load_yaml_safely(text, "doc.yaml", max_bytes=KIB, secret_paths=[("cloud_init",)])
    message = info.value.message
    assert SECRET not in message and "s3cr3t" not in message and "TOKEN" not in message, message


def test_outside_a_secret_subtree_tokens_are_shown_short() -> None:
    err = refusal(f"cloud_init: x\nother: *{SECRET}\n", secret_paths=[("cloud_init",)])
    assert f"found undefined alias '{SECRET}'" in err.message


def test_field_names_directly_under_a_secret_path_are_shown() -> None:
    err = refusal("cloud_init:\n  user_data: a\n  user_data: b\n", secret_paths=[("cloud_init",)])
    assert "duplicate key 'user_data' (first at line 2)" in err.message


# -------------------------------------------------------------------------------------- properties


def check_only_invalid_argument(content: str | bytes) -> None:
    try:
        load_yaml_safely(content, "doc.yaml", max_bytes=4 * KIB, max_nodes=500, max_aliases=10, max_depth=10)
    except InvalidArgument as exc:
        assert exc.reason in REASONS
        assert ONE_LINE.match(exc.message), exc.message


@settings(max_examples=400)
@given(st.binary(max_size=300))
def test_random_bytes_raise_only_invalid_argument(content: bytes) -> None:
    check_only_invalid_argument(content)


@settings(max_examples=400)
@given(st.text(alphabet="[]{}&*!:-,|>?'\"#%@`<= \n\t\r\x00\ufeffabxy0123é\\/.", max_size=300))
def test_yaml_syntax_soup_raises_only_invalid_argument(text: str) -> None:
    check_only_invalid_argument(text)
    check_only_invalid_argument(text.encode("utf-8", "surrogatepass"))


# ----------------------------------------------------------------------------------- config loader


def write(tmp_path: Path, text: str | bytes, name: str = "agent.yaml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def config_error(path: Path, model: type[Any] = AgentConfig, prefix: str = "CLONEBOX_AGENT_X_") -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        load_config(model, path, prefix)
    assert "\n" not in info.value.message
    return info.value


def test_config_alias_bomb_is_refused(tmp_path: Path) -> None:
    err = config_error(write(tmp_path, billion_laughs()))
    assert err.reason == TOO_MANY_ALIASES


def test_config_too_large_is_refused(tmp_path: Path) -> None:
    err = config_error(write(tmp_path, b"#" * (MAX_CONFIG_BYTES + 1)))
    assert err.reason == TOO_LARGE and "larger than 1 MiB" in err.message


def test_config_yaml_errors_are_one_line_with_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "name: h1\nlisten: [\n")
    err = config_error(path)
    assert err.reason == "CONFIG_INVALID" and err.message.startswith(f"{path}:3: not valid YAML")
    assert config_error(write(tmp_path, "name: a\nname: b\n")).message.endswith(
        "duplicate key 'name' (first at line 1): keep one"
    )
    assert "is not allowed" in config_error(write(tmp_path, "name: !!python/name:os.system\n")).message
    assert "must be a mapping" in config_error(write(tmp_path, "- a\n")).message
    assert "is a directory" in config_error(tmp_path).message


def test_config_schema_errors_name_file_line_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, "name: h1\nreserve:\n  memory_mib: lots\n")
    err = config_error(path)
    assert err.message.startswith(f"{path}:3: reserve.memory_mib: ")
    assert err.metadata["field"] == "reserve.memory_mib"


def test_config_errors_never_show_values(tmp_path: Path) -> None:
    text = f"database_url: postgresql+psycopg://clonebox:{SECRET}@db/clonebox\nheartbeat_timeout_seconds: soon\n"
    err = config_error(write(tmp_path, text, "controller.yaml"), ControllerConfig, "CLONEBOX_CONTROLLER_X_")
    assert SECRET not in err.message and "heartbeat_timeout_seconds" in err.message
    text = f"database_url: postgresql+psycopg://clonebox:{SECRET}@db/clonebox\nlisten: [\n"
    err = config_error(write(tmp_path, text, "controller.yaml"), ControllerConfig, "CLONEBOX_CONTROLLER_X_")
    assert SECRET not in err.message


def test_config_environment_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "name: h1\nreserve: 5\n")
    monkeypatch.setenv("CLONEBOX_AGENT_X_RESERVE__MEMORY_MIB", "64")  # the environment wins over a scalar
    monkeypatch.setenv("CLONEBOX_AGENT_X_LIBVIRT_URI", "*not-an-alias")  # not clean YAML: kept as text
    monkeypatch.setenv("CLONEBOX_AGENT_X_IMAGE_DIRS", "[/a, /b]")
    cfg = load_config(AgentConfig, path, "CLONEBOX_AGENT_X_")
    assert cfg.reserve.memory_mib == 64 and cfg.libvirt_uri == "*not-an-alias" and cfg.image_dirs == ["/a", "/b"]
    monkeypatch.setenv("CLONEBOX_AGENT_X_STOP_TIMEOUT_SECONDS", "soon")
    err = config_error(path)
    assert err.message.startswith("config (environment CLONEBOX_AGENT_X_STOP_TIMEOUT_SECONDS): stop_timeout")
