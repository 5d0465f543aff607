"""The CLI side of secrets: what a create request carries, one-time passwords, v1 files, config migrate."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import typer
import yaml
from typer.testing import CliRunner

from clonebox_cli.specinput import LoadedSpec, load_for_create, prepare
from clonebox_core.errors import InvalidArgument
from clonebox_core.model import AuthMethod
from clonebox_core.secret import Secret
from clonebox_core.secrets.passwords import sha512_crypt
from clonebox_core.secrets.sshkeys import generate_ed25519_keypair
from clonebox_core.spec import load_spec_text
from clonebox_core.validate import PASSWORD_HASH
from tests.unit.cli.test_cli_commands import as_json, cli

if TYPE_CHECKING:
    from tests.unit.cli.conftest import FakeController

CANARY = "canary-cli-pw-0b7e21"
V1_EXAMPLES = Path(__file__).resolve().parents[2] / "data" / "clonebox-v1"
HEAD = "version: 2\nname: dev-1\nmemory: 256MiB\nkernel_boot: {kernel: testguest/vmlinux}\n"


def write_spec(tmp_path: Path, auth: str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(HEAD + auth)
    return path


def salt_of(hash_text: str) -> str:
    return hash_text.split("$")[2]


def test_a_password_reference_is_sent_as_a_hash_only(
    runner: CliRunner, fake_controller: FakeController, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CB_VM_PW", CANARY)
    spec = write_spec(tmp_path, "auth: {user: dev, method: password, password: env:CB_VM_PW}\n")
    result = cli(runner, fake_controller, "-o", "json", "vm", "create", "-f", str(spec))
    assert result.exit_code == 0, result.output
    (request,) = fake_controller.fleet.calls("CreateVm")
    auth = request.spec.auth
    assert PASSWORD_HASH.fullmatch(auth.password_hash)
    assert auth.password_hash == sha512_crypt(Secret(CANARY), salt_of(auth.password_hash))
    assert (auth.password, list(auth.secret_refs)) == ("env:CB_VM_PW", ["env:CB_VM_PW"])
    # the value is nowhere in what went over the wire, nor in what the CLI printed
    assert CANARY.encode() not in request.SerializeToString()
    assert CANARY not in result.output


def test_a_one_time_password_is_shown_once_and_only_its_hash_is_sent(
    runner: CliRunner, fake_controller: FakeController, tmp_path: Path
) -> None:
    spec = write_spec(tmp_path, "auth: {user: dev, method: one_time_password}\n")
    result = cli(runner, fake_controller, "vm", "create", "-f", str(spec))
    assert result.exit_code == 0, result.output
    found = re.search(r"one-time password for dev@dev-1: (\S+)", result.stderr)
    assert found, result.stderr
    otp = found.group(1)
    (request,) = fake_controller.fleet.calls("CreateVm")
    assert request.spec.auth.password_hash == sha512_crypt(Secret(otp), salt_of(request.spec.auth.password_hash))
    assert otp.encode() not in request.SerializeToString()
    assert result.output.count(otp) == 1  # shown once
    # with -o json it is a field of the one JSON document on stdout
    spec2 = write_spec(tmp_path, "auth: {user: dev, method: one_time_password}\n", "two.yaml")
    doc = as_json(cli(runner, fake_controller, "-o", "json", "vm", "create", "-f", str(spec2)))
    assert len(doc["one_time_password"]) >= 16 and doc["name"] == "dev-1"
    # --no-wait: still one JSON document, the operation with the password
    spec3 = write_spec(tmp_path, "auth: {user: dev, method: one_time_password}\n", "three.yaml")
    doc = as_json(cli(runner, fake_controller, "-o", "json", "vm", "create", "-f", str(spec3), "--no-wait"))
    assert doc["kind"] == "vm.create" and len(doc["one_time_password"]) >= 16


def test_key_files_are_relative_to_the_spec_and_sent_as_public_lines(
    runner: CliRunner, fake_controller: FakeController, tmp_path: Path
) -> None:
    _private, public = generate_ed25519_keypair("me@laptop")
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "me.pub").write_text(f"# my laptop\n{public}\n")
    spec = write_spec(tmp_path, "auth: {ssh_keys: [./keys/me.pub]}\n")
    other = tmp_path / "elsewhere"
    other.mkdir()
    cwd = os.getcwd()
    os.chdir(other)  # the spec's folder counts, not the working directory
    try:
        result = cli(runner, fake_controller, "vm", "create", "-f", str(spec))
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, result.output
    (request,) = fake_controller.fleet.calls("CreateVm")
    assert list(request.spec.auth.ssh_authorized_keys) == [public]
    assert request.spec.auth.password_hash == ""


def test_a_literal_password_and_an_unreadable_reference_fail_before_any_rpc(
    runner: CliRunner, fake_controller: FakeController, tmp_path: Path
) -> None:
    literal = write_spec(tmp_path, f"auth: {{method: password, password: '{CANARY}'}}\n", "lit.yaml")
    result = cli(runner, fake_controller, "vm", "create", "-f", str(literal))
    assert result.exit_code == 2 and "auth.password" in result.stderr and CANARY not in result.output
    secret_file = tmp_path / "pw"
    secret_file.write_text(CANARY)
    secret_file.chmod(0o644)
    loose = write_spec(tmp_path, "auth: {method: both, password: 'file:pw'}\n", "loose.yaml")
    result = cli(runner, fake_controller, "vm", "create", "-f", str(loose))
    assert result.exit_code == 5 and "auth.password" in result.stderr and CANARY not in result.output
    assert not fake_controller.fleet.calls("CreateVm")


def test_a_v1_file_lists_what_it_cannot_honour_then_creates_with_the_drops(
    runner: CliRunner, fake_controller: FakeController
) -> None:
    workstation = str(V1_EXAMPLES / "workstation.clonebox.yaml")
    result = cli(runner, fake_controller, "vm", "create", "-f", workstation)
    assert result.exit_code == 2
    assert "--drop gui" in result.stderr and "vm.gui" in result.stderr
    assert not fake_controller.fleet.calls("CreateVm")
    args = ["--drop", "gui", "--image", "testguest/data.qcow2"]
    result = cli(runner, fake_controller, "vm", "create", "-f", workstation, *args)
    assert result.exit_code == 0, result.output
    assert "deprecated" in result.stderr and "generated" in result.stderr
    (request,) = fake_controller.fleet.calls("CreateVm")
    spec = request.spec
    assert (spec.name, spec.vcpus, spec.memory_mib) == ("clone-clonebox", 8, 8192)
    assert spec.disks[0].base_image == "testguest/data.qcow2"
    assert spec.auth.user == "ubuntu" and spec.auth.password_hash == ""
    assert "firefox" in spec.provision.packages and "chromium" in spec.provision.snap_packages
    # v1's literal password ("ubuntu") becomes no password at all: key login with a generated key
    assert spec.auth.method == 1 and not spec.auth.ssh_authorized_keys
    # the shared paths go to the agent, which checks them against its shared_roots
    mounts = {f.host_path: f.mount for f in spec.shared_folders}
    assert mounts["/home/tom/github"] == "/mnt/project1" and len(mounts) == 16
    # --drop paths --drop app_data_paths leaves them out
    result = cli(
        runner, fake_controller, "vm", "create", "-f", workstation, *args, "--drop", "paths", "--drop", "app_data_paths"
    )
    assert result.exit_code == 0, result.output
    assert not fake_controller.fleet.calls("CreateVm")[-1].spec.shared_folders


def test_image_and_drop_are_for_v1_files_only(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, "")
    with pytest.raises(InvalidArgument, match="CloneBox v1 files only"):
        load_for_create(str(spec), image="x.qcow2")


def test_prepare_leaves_a_version_1_spec_alone() -> None:
    text = "version: 1\nname: a\nkernel_boot: {kernel: k}\ncloud_init: {user_data: '#cloud-config'}\n"
    loaded = LoadedSpec(load_spec_text(text), None)
    assert prepare(loaded, environ={}).spec == loaded.spec


def test_config_migrate_writes_a_v2_file_without_the_password(runner: CliRunner, tmp_path: Path) -> None:
    old = tmp_path / "old.clonebox.yaml"
    old.write_text(
        (V1_EXAMPLES / "minimal.clonebox.yaml").read_text().replace("password: ubuntu", f"password: {CANARY}")
    )
    new = tmp_path / "new.yaml"
    result = runner.invoke(_app(), ["config", "migrate", str(old), "-o", str(new)])
    assert result.exit_code == 0, result.output
    text = new.read_text()
    assert CANARY not in text and CANARY not in result.output
    spec = load_spec_text(text)
    assert spec.auth is not None and spec.auth.method is AuthMethod.BOTH
    assert spec.auth.password.startswith("file:~/")
    assert "write the VM password into" in result.stderr
    doc = yaml.safe_load(text)
    assert doc["provision"]["packages"] == ["qemu-guest-agent", "cloud-guest-utils", "net-tools"]
    # an existing file is not overwritten without --force
    again = runner.invoke(_app(), ["config", "migrate", str(old), "-o", str(new)])
    assert again.exit_code == 2 and "--force" in again.stderr
    assert runner.invoke(_app(), ["config", "migrate", str(old), "-o", str(new), "--force"]).exit_code == 0


def _app() -> typer.Typer:
    from clonebox_cli.main import app

    return app
