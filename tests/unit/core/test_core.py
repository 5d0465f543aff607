"""Core: error <-> status mapping, names, spec validation, config loading, example configs."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clonebox_agent.config import AgentConfig
from clonebox_controller.config import ControllerConfig
from clonebox_core import errors
from clonebox_core.config import load_config
from clonebox_core.model import DiskSpec, KernelBoot, Revision, SharedFolder, VmSpec
from clonebox_core.names import is_dns_label
from clonebox_core.rpc.server import is_loopback, require_loopback
from clonebox_core.rpc.status import error_from_status_proto, to_status_proto
from clonebox_core.validate import validate_spec

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("cls", errors.ERROR_CLASSES)
def test_every_error_class_round_trips_through_status(cls: type[errors.CloneboxError]) -> None:
    err = cls("boom", reason="SOME_REASON", metadata={"field": "spec.name"})
    back = error_from_status_proto(to_status_proto(err))
    assert type(back) is cls
    assert (back.message, back.reason, back.metadata) == ("boom", "SOME_REASON", {"field": "spec.name"})


@given(st.text(max_size=80))
def test_dns_label_never_accepts_path_or_xml_characters(value: str) -> None:
    if is_dns_label(value):
        assert set(value) <= set("abcdefghijklmnopqrstuvwxyz0123456789-")
        assert 1 <= len(value) <= 63 and not value.startswith("-") and not value.endswith("-")


def test_loopback_only_plaintext() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("10.0.0.1")
    with pytest.raises(errors.InvalidArgument) as err:
        require_loopback("0.0.0.0:7100")
    assert err.value.reason == "PLAINTEXT_NOT_LOOPBACK"


def base() -> VmSpec:
    return VmSpec(name="ok", vcpus=1, memory_mib=128, disks=(DiskSpec("root", size_mib=10),))


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (VmSpec(name="-bad", disks=(DiskSpec("r", size_mib=1),)), "spec.name"),
        (VmSpec(name="a" * 64, disks=(DiskSpec("r", size_mib=1),)), "spec.name"),
        (VmSpec(name="ok", vcpus=0, disks=(DiskSpec("r", size_mib=1),)), "spec.vcpus"),
        (VmSpec(name="ok", vcpus=-1, disks=(DiskSpec("r", size_mib=1),)), "spec.vcpus"),
        (VmSpec(name="ok", memory_mib=8, disks=(DiskSpec("r", size_mib=1),)), "spec.memory_mib"),
        (VmSpec(name="ok", memory_mib=10**9, disks=(DiskSpec("r", size_mib=1),)), "spec.memory_mib"),
        (VmSpec(name="ok", disks=(DiskSpec("r"),)), "spec.disks[0].size_mib"),
        (VmSpec(name="ok", disks=(DiskSpec("r", size_mib=1), DiskSpec("r", size_mib=1))), "spec.disks[1].name"),
        (VmSpec(name="ok", disks=(DiskSpec("r", base_image="a/../../x"),)), "spec.disks[0].base_image"),
        (VmSpec(name="ok"), "spec.disks"),
        (VmSpec(name="ok", kernel_boot=KernelBoot(kernel="")), "spec.kernel_boot.kernel"),
        (
            VmSpec(name="ok", disks=(DiskSpec("r", size_mib=1),), shared_folders=(SharedFolder("rel", "t"),)),
            "spec.shared_folders[0].host_path",
        ),
    ],
)
def test_validate_names_the_bad_field(spec: VmSpec, field: str) -> None:
    with pytest.raises(errors.InvalidArgument) as err:
        validate_spec(spec)
    assert err.value.metadata["field"] == field
    assert field in str(err.value)


def test_validate_accepts_a_good_spec() -> None:
    assert validate_spec(base()) == base()


def test_config_env_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "agent.yaml"
    f.write_text("name: h1\nlisten: 127.0.0.1:1\nreserve: {memory_mib: 1}\n")
    monkeypatch.setenv("CLONEBOX_AGENT_LISTEN", "127.0.0.1:2")
    monkeypatch.setenv("CLONEBOX_AGENT_RESERVE__MEMORY_MIB", "64")
    cfg = load_config(AgentConfig, f, "CLONEBOX_AGENT_")
    assert (cfg.name, cfg.listen, cfg.reserve.memory_mib) == ("h1", "127.0.0.1:2", 64)


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    f = tmp_path / "agent.yaml"
    f.write_text("lisen: 127.0.0.1:1\n")
    with pytest.raises(errors.InvalidArgument) as err:
        load_config(AgentConfig, f, "CLONEBOX_AGENT_X_")
    assert "lisen" in str(err.value) and str(f) in str(err.value)
    with pytest.raises(errors.InvalidArgument, match="does not exist"):
        load_config(AgentConfig, tmp_path / "missing.yaml", "CLONEBOX_AGENT_X_")


def test_annotated_example_configs_load() -> None:
    agent = load_config(AgentConfig, ROOT / "deploy/config/agent.yaml", "CLONEBOX_AGENT_X_")
    controller = load_config(ControllerConfig, ROOT / "deploy/config/controller.yaml", "CLONEBOX_CONTROLLER_X_")
    assert agent.domain_type == "auto" and controller.database_url.startswith("sqlite:")


@pytest.mark.parametrize("where", ["vm", "snapshot"])
def test_a_vm_state_the_enum_does_not_have_is_an_invalid_argument_naming_the_field(where: str) -> None:
    from clonebox.type.v1 import snapshot_pb2, vm_pb2

    from clonebox_core.rpc.convert import vm_from_proto
    from clonebox_core.rpc.convert_snapshot import snapshot_from_proto

    with pytest.raises(errors.InvalidArgument) as err:
        if where == "vm":
            vm_from_proto(vm_pb2.Vm(name="a", state=102068))  # type: ignore[arg-type]
        else:
            snapshot_from_proto(snapshot_pb2.Snapshot(name="s", vm="a", vm_state=-2147483648))  # type: ignore[arg-type]
    assert err.value.metadata["field"] == f"{where}.{'state' if where == 'vm' else 'vm_state'}"
    assert "is not a VM state" in err.value.message


@pytest.mark.parametrize(
    ("event", "covered"),
    [
        (Revision(2, 4), True),  # the recorded point itself
        (Revision(2, 3), True),  # before it
        (Revision(2, 5), False),  # news after it
        (Revision(1, 99), True),  # an agent process that has ended
        (Revision(3, 0), False),  # a newer agent process
    ],
)
def test_a_record_covers_the_events_up_to_its_revision(event: Revision, covered: bool) -> None:
    assert Revision(2, 4).covers(event) is covered
