"""The spec loader against hostile and careless input: YAML limits, tags, and cloud-init secrets in errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clonebox_core.errors import InvalidArgument
from clonebox_core.spec import MAX_SPEC_BYTES, REASON, load_spec_file, load_spec_text

SECRET = "s3cr3t-TOKEN-123"
HEAD = "version: 1\nname: tiny\nkernel_boot: {kernel: k}\n"


def spec_error(text: str, reason: str = REASON) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        load_spec_text(text, "tiny.yaml")
    assert info.value.reason == reason, info.value.message
    assert "\n" not in info.value.message
    assert info.value.message.startswith("tiny.yaml:")
    return info.value


def assert_no_secret(err: InvalidArgument) -> None:
    for fragment in (SECRET, "s3cr3t", "TOKEN-123"):
        assert fragment not in err.message, err.message
        assert all(fragment not in v for v in err.metadata.values()), err.metadata


# ------------------------------------------------------------------------------------------ limits


def test_billion_laughs_is_refused_as_too_many_aliases() -> None:
    lines = ['lol0: &lol0 "lol"']
    for i in range(1, 10):
        lines.append(f"lol{i}: &lol{i} [" + ", ".join([f"*lol{i - 1}"] * 10) + "]")
    spec_error(HEAD + "\n".join(lines) + "\n", "YAML_TOO_MANY_ALIASES")


def test_many_aliases_are_refused_before_expansion() -> None:
    text = HEAD + "labels: &l {app: x}\nmore: [" + ", ".join(["*l"] * 101) + "]\n"
    err = spec_error(text, "YAML_TOO_MANY_ALIASES")
    assert err.message.startswith("tiny.yaml:5: too many YAML aliases (more than 100")


def test_a_handful_of_aliases_is_fine() -> None:
    spec = load_spec_text("version: 1\nname: &n tiny\nkernel_boot: {kernel: k}\nlabels: {app: *n}\n")
    assert spec.labels == (("app", "tiny"),)


def test_deep_nesting_is_refused() -> None:
    deep = "cloud_init:\n  user_data: " + "[" * 100 + "]" * 100 + "\n"
    assert spec_error(HEAD + deep, "YAML_TOO_DEEP").message.startswith("tiny.yaml:5: YAML nested too deeply")


def test_oversize_is_refused(tmp_path: Path) -> None:
    text = HEAD + "# " + "x" * MAX_SPEC_BYTES + "\n"
    assert "larger than 4 MiB" in spec_error(text, "YAML_TOO_LARGE").message
    path = tmp_path / "big.yaml"
    path.write_text(text)
    with pytest.raises(InvalidArgument) as info:
        load_spec_file(path)
    assert info.value.reason == "YAML_TOO_LARGE"


def test_duplicate_keys_are_refused() -> None:
    err = spec_error(HEAD + "labels:\n  app: a\n  app: b\n")
    assert err.message == "tiny.yaml:6: duplicate key 'app' (first at line 5): keep one"


@pytest.mark.parametrize(
    "value",
    [
        "!!python/object/apply:os.system ['touch /tmp/pwned']",
        "!!python/name:os.system",
        "!!python/object/new:subprocess.Popen [[id]]",
        "!local x",
    ],
)
def test_python_and_local_tags_are_refused(value: str) -> None:
    err = spec_error(HEAD + f"labels:\n  app: {value}\n")
    assert err.message.startswith("tiny.yaml:5: tag ")
    assert "is not allowed: only plain YAML values" in err.message


# ------------------------------------------------------------------------------------------ secrets

SECRET_SPECS = [
    # an error elsewhere, the secret in a valid cloud-init section
    HEAD + f"vcpus: two\ncloud_init:\n  user_data: '#cloud-config\\npassword: {SECRET}\\n'\n",
    HEAD + f"cloud_init:\n  user_data:\n    password: {SECRET}\nmemory: 0\n",
    HEAD + f"cloud_init:\n  user_data: {SECRET}\nname: again\n",
    HEAD + f"cloud_init: {{user_data: {SECRET}}}\nnetwork: {{mode: bridge}}\n",
    HEAD + f"cloud_init:\n  user_data: {SECRET}\nlabels: [\n",
    # errors in cloud_init itself
    HEAD + f"cloud_init: {SECRET}\n",
    HEAD + f"cloud_init: [{SECRET}]\n",
    HEAD + f"cloud_init:\n  user_data: {SECRET}\n  user_dta: {SECRET}\n",
    HEAD + "cloud_init:\n  user_data: 123123\n",
    HEAD + f"cloud_init:\n  meta_data: !!int {SECRET}\n",
    HEAD + f"cloud_init:\n  meta_data: !!float {SECRET}\n",
    HEAD + f"cloud_init:\n  meta_data: !!bool {SECRET}\n",
    HEAD + f"cloud_init:\n  user_data: !{SECRET} x\n",
    HEAD + f"cloud_init:\n  user_data: !!python/object/apply:os.system ['echo {SECRET}']\n",
    HEAD + f"cloud_init:\n  user_data: *{SECRET}\n",
    HEAD + f"cloud_init:\n  user_data:\n    {SECRET}: 1\n    {SECRET}: 2\n",
    HEAD + f"cloud_init:\n  user_data: '{SECRET}\n",
    HEAD + f'cloud_init:\n  user_data: "{SECRET}\\q"\n',
    HEAD + f"cloud_init:\n  user_data: {{users: [{{passwd: {SECRET}}}\n",
    HEAD + f"cloud_init:\n  network_config: {SECRET}\n  network_config: {SECRET}\n",
    HEAD + "cloud_init:\n  user_data: |\n    " + "\n    ".join([f"line {SECRET}"] * 3) + "\n  oops\n",
    # the whole document is a token file given by mistake
    f"{SECRET}\n",
    f"- {SECRET}\n",
]


@pytest.mark.parametrize("text", SECRET_SPECS)
def test_cloud_init_values_never_appear_in_errors(text: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument) as info:
        load_spec_text(text, "tiny.yaml")
    assert_no_secret(info.value)
    path = tmp_path / "tiny.yaml"
    path.write_text(text)
    with pytest.raises(InvalidArgument) as info:
        load_spec_file(path)
    assert_no_secret(info.value)


def test_cloud_init_errors_still_name_the_field_and_line() -> None:
    err = spec_error(HEAD + "cloud_init:\n  user_data: 123123\n")
    assert err.message == "tiny.yaml:5: cloud_init.user_data: expected a string, got a number (put it in quotes)"
    err = spec_error(HEAD + f"cloud_init:\n  user_dta: {SECRET}\n")
    assert err.message == "tiny.yaml:5: cloud_init.user_dta: unknown field (did you mean 'user_data'?)"
    err = spec_error(HEAD + f"cloud_init:\n  user_data: a\n  user_data: {SECRET}\n")
    assert err.message == "tiny.yaml:6: duplicate key 'user_data' (first at line 5): keep one"
    err = spec_error(HEAD + f"cloud_init: {SECRET}\n")
    assert err.message.endswith(
        "cloud_init: expected a mapping with user_data, meta_data, network_config, got a string"
    )


def test_long_values_elsewhere_are_truncated() -> None:
    long = "x" * 5000
    for text in (
        HEAD + f"name: {long}\n",
        HEAD.replace("name: tiny", f"name: {long}"),
        HEAD + f"memory: '{long}'\n",
        HEAD + f"disks: [{{name: d, base_image: '../{long}'}}]\n",
        HEAD + f"network: {{libvirt_network: '{long}'}}\n",
        HEAD + f"labels: {{app: {long}}}\n",
        HEAD + f"x: *{long}\n",
    ):
        with pytest.raises(InvalidArgument) as info:
            load_spec_text(text, "tiny.yaml")
        assert len(info.value.message) < 300, info.value.message


@settings(max_examples=200)
@given(st.binary(max_size=300))
def test_random_bytes_raise_only_invalid_argument(content: bytes) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "junk.yaml"
        path.write_bytes(content)
        try:
            load_spec_file(path)
        except InvalidArgument as exc:
            assert exc.reason == REASON or exc.reason.startswith("YAML_")
            assert exc.message.startswith(f"{path}:") and "\n" not in exc.message
