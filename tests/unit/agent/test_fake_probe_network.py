"""``fake_probe_network``: the fake gives each running VM a loopback probe address; the config refuses misuse."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from clonebox_agent.adapters.fake import FakeHypervisor
from clonebox_agent.config import AgentConfig
from clonebox_agent.main import build_hypervisor
from clonebox_agent.ports import HypervisorEvent, ProbeTarget
from clonebox_core import errors
from clonebox_core.config import load_config
from clonebox_core.model import DiskSpec, VmSpec


def _spec(name: str) -> VmSpec:
    return VmSpec(name=name, vcpus=1, memory_mib=16, disks=(DiskSpec("root", size_mib=1),))


@pytest.fixture
async def fake(tmp_path: Path) -> AsyncIterator[FakeHypervisor]:
    hv = FakeHypervisor(storage_dir=tmp_path / "storage", probe_network="127.77.0.0/16")

    def sink(_event: HypervisorEvent) -> None:
        pass

    await hv.open(sink)
    try:
        yield hv
    finally:
        await hv.close()


async def test_each_running_vm_probes_at_its_own_address(fake: FakeHypervisor) -> None:
    for name in ("a", "b"):
        await fake.create(_spec(name), start=True)
    await fake.create(_spec("c"), start=False)
    # the fake's index counts creates and boots: a is created as 1 and booted as 2 (network[3]), b 3 and 4
    assert await fake.probe_targets("a") == (ProbeTarget("127.77.0.3", interface=""),)
    assert await fake.probe_targets("b") == (ProbeTarget("127.77.0.5", interface=""),)
    assert await fake.probe_targets("c") == ()  # not running: no address

    await fake.destroy("a")
    assert await fake.probe_targets("a") == ()
    await fake.start("a")  # a new boot, a new index (6 after c's create): never the address of another VM
    assert await fake.probe_targets("a") == (ProbeTarget("127.77.0.7", interface=""),)


async def test_explicit_probe_addresses_win(fake: FakeHypervisor) -> None:
    await fake.create(_spec("a"), start=True)
    fake.probe_addresses["a"] = ("127.0.0.1",)
    assert await fake.probe_targets("a") == (ProbeTarget("127.0.0.1", interface=""),)


async def test_past_the_end_of_the_network_there_is_no_address(tmp_path: Path) -> None:
    hv = FakeHypervisor(storage_dir=tmp_path / "s", probe_network="127.77.0.0/29")  # hosts .1 to .6

    def sink(_event: HypervisorEvent) -> None:
        pass

    await hv.open(sink)
    try:
        for name in ("a", "b", "c"):
            await hv.create(_spec(name), start=True)
        assert await hv.probe_targets("a") == (ProbeTarget("127.77.0.3", interface=""),)
        assert await hv.probe_targets("b") == (ProbeTarget("127.77.0.5", interface=""),)
        assert await hv.probe_targets("c") == ()  # index 6: .7 is the broadcast address
    finally:
        await hv.close()


def test_without_a_network_the_fake_has_no_probe_addresses(tmp_path: Path) -> None:
    assert FakeHypervisor(storage_dir=tmp_path).probe_network is None
    with pytest.raises(ValueError, match="loopback"):
        FakeHypervisor(storage_dir=tmp_path, probe_network="10.0.0.0/8")


def test_the_config_reaches_the_fake(tmp_path: Path) -> None:
    config = AgentConfig(hypervisor="fake", fake_probe_network="127.77.0.0/16", storage_dir=str(tmp_path))
    hv = build_hypervisor(config)
    assert isinstance(hv, FakeHypervisor) and str(hv.probe_network) == "127.77.0.0/16"
    assert AgentConfig().fake_probe_network == ""


@pytest.mark.parametrize(
    ("lines", "words"),
    [
        ("fake_probe_network: 127.77.0.0/16\n", "only with hypervisor: fake"),
        ("hypervisor: libvirt\nfake_probe_network: 127.77.0.0/16\n", "only with hypervisor: fake"),
        ("hypervisor: fake\nfake_probe_network: 10.77.0.0/16\n", "loopback network"),
        ("hypervisor: fake\nfake_probe_network: 127.77.0.1/16\n", "IPv4 network"),
        ("hypervisor: fake\nfake_probe_network: 'fd00::/64'\n", "IPv4 network"),
        ("hypervisor: fake\nfake_probe_network: nonsense\n", "IPv4 network"),
        ("hypervisor: fake\nfake_probe_network: 127.77.0.1/32\n", "/30 or shorter"),
    ],
)
def test_bad_values_name_the_field(tmp_path: Path, lines: str, words: str) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(lines)
    with pytest.raises(errors.InvalidArgument) as err:
        load_config(AgentConfig, path, "CLONEBOX_TEST_AGENT_")
    assert err.value.metadata["field"] == "fake_probe_network"
    assert words in err.value.message
    assert f"{path}:{lines.count(chr(10))}:" in err.value.message  # the line of the setting


def test_a_good_value(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("hypervisor: fake\nfake_probe_network: 127.77.0.0/16\n")
    assert load_config(AgentConfig, path, "CLONEBOX_TEST_AGENT_").fake_probe_network == "127.77.0.0/16"
