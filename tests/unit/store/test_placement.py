"""The placement policy and the store's JSON codec, without a database."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import pytest

from clonebox_controller.store import codec, placement
from clonebox_controller.store.placement import Candidate
from clonebox_controller.store.store import decode_page_token, encode_page_token
from clonebox_core import specjson
from clonebox_core.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from clonebox_core.model import (
    CloudInit,
    DiskSpec,
    HostState,
    HypervisorInfo,
    IpAddress,
    KernelBoot,
    NetworkMode,
    NetworkSpec,
    Resources,
    SharedFolder,
    Vm,
    VmSpec,
    VmState,
)


def cand(
    name: str,
    alloc: Resources = Resources(8, 8192, 10_000),
    reserved: Resources = Resources(),
    state: HostState = HostState.READY,
    cordoned: bool = False,
) -> Candidate:
    """A candidate host."""
    return Candidate(name, state, cordoned, alloc, reserved)


NEED = Resources(1, 1024, 0)


def test_choose_most_free_share_then_name() -> None:
    busy = cand("a", reserved=Resources(6, 6144, 0))
    idle = cand("b")
    assert placement.choose([busy, idle], NEED) == "b"
    assert placement.choose([cand("y"), cand("x")], NEED) == "x"
    # shares, not absolute amounts: a half-used big host loses to an empty small one
    big_half = cand("big", Resources(64, 65536, 0), Resources(32, 32768, 0))
    small_empty = cand("small", Resources(4, 4096, 0))
    assert placement.choose([big_half, small_empty], NEED) == "small"


def test_choose_explains_every_rejection() -> None:
    hosts = [
        cand("a", cordoned=True),
        cand("b", state=HostState.UNREACHABLE),
        cand("c", state=HostState.NOT_SERVING),
        cand("d", Resources(1, 512, 0)),
    ]
    with pytest.raises(ResourceExhausted) as err:
        placement.choose(hosts, NEED)
    assert err.value.reason == "NO_HOST_FITS"
    assert "a: cordoned" in err.value.message
    assert "b: unreachable" in err.value.message
    assert "c: not serving" in err.value.message
    assert "d: needs 1024 MiB memory, 512 free" in err.value.message
    assert err.value.metadata == {"hosts_considered": "4"}


def test_closed_is_about_the_host_not_its_room() -> None:
    # a held VM's own room is already counted on its host: only cordon and state decide
    assert placement.closed(HostState.READY, cordoned=False) is None
    assert placement.closed(HostState.READY, cordoned=True) == "cordoned"
    assert placement.closed(HostState.UNREACHABLE, cordoned=False) == "unreachable"
    assert placement.closed(HostState.NOT_SERVING, cordoned=False) == "not serving"


def test_overcommitted_host_reports_zero_free() -> None:
    # adoption can push reservations past allocatable; the message must not say "-2 free"
    over = cand("a", Resources(2, 2048, 0), Resources(4, 1024, 0))
    assert placement.rejection(over, NEED) == "needs 1 vcpus, 0 free"


def test_check_named() -> None:
    assert placement.check_named(cand("a"), "a", NEED) == "a"
    cases: list[tuple[Candidate | None, type[Exception], str]] = [
        (None, NotFound, "HOST_NOT_FOUND"),
        (cand("a", cordoned=True), FailedPrecondition, "HOST_CORDONED"),
        (cand("a", state=HostState.UNREACHABLE), FailedPrecondition, "HOST_UNREACHABLE"),
        (cand("a", state=HostState.NOT_SERVING), FailedPrecondition, "HOST_NOT_SERVING"),
        (cand("a", Resources(0, 0, 0)), ResourceExhausted, "HOST_CAPACITY_EXCEEDED"),
    ]
    for candidate, cls, reason in cases:
        with pytest.raises(cls) as err:
            placement.check_named(candidate, "a", NEED)
        assert getattr(err.value, "reason", None) == reason


def test_codec_round_trips() -> None:
    spec = VmSpec(
        name="full",
        vcpus=3,
        memory_mib=3072,
        disks=(DiskSpec("root", "base.qcow2", 100), DiskSpec("blank", "", 50)),
        kernel_boot=KernelBoot("k", "i", "c"),
        network=NetworkSpec(NetworkMode.NONE, "n"),
        shared_folders=(SharedFolder("/a", "t", True),),
        cloud_init=CloudInit("u", "m", "n"),
        labels=(("a", "1"), ("b", "2")),
    )
    assert codec.spec_from_json(codec.spec_to_json(spec)) == spec
    minimal = VmSpec("m")
    assert codec.spec_from_json(codec.spec_to_json(minimal)) == minimal
    assert codec.spec_from_json({"name": "old"}) == VmSpec("old")  # missing keys take defaults
    info = HypervisorInfo("qemu:///system", "9.0.0", "7.2", "kvm", "", ("a", "b"), "host")
    assert codec.hypervisor_from_json(codec.hypervisor_to_json(info)) == info
    t = datetime(2030, 1, 1, tzinfo=UTC)
    vm = Vm("full", "h", VmState.RUNNING, spec, "u", (IpAddress("e", "10.0.0.1", 8, "s"),), t, t, "r")
    back = codec.vm_from_json(codec.vm_to_json(vm))
    # operation results and tombstones are read by viewers: secret fields come back as digests
    assert back != vm and specjson.matches_at_rest(back.spec, vm.spec)
    assert dataclasses.replace(back, spec=vm.spec) == vm


def test_page_tokens() -> None:
    for name in ("a", "vm-01", "ünïcode"):
        assert decode_page_token(encode_page_token(name)) == name
    for bad in ("%%%", "====", "YQ=", encode_page_token("a") + "x"):
        with pytest.raises(InvalidArgument):
            decode_page_token(bad)
