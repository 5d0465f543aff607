"""Harness of the Hypervisor contract suite: one fresh adapter per test, of each of three kinds.

- ``fake``: ``FakeHypervisor`` (declares what real QEMU declares);
- ``libvirt-test``: ``LibvirtHypervisor`` on libvirt's in-memory ``test:///default`` driver;
- ``libvirt-qemu``: ``LibvirtHypervisor`` on ``qemu:///system`` with real TCG guests (skipped, with the
  reason, only when libvirtd is not reachable).

A test marked ``@pytest.mark.requires(Capability.X, ...)`` runs for exactly the adapters that declare
those capabilities (never a skip for an undeclared one). Every adapter gets its own owner, storage pool,
storage folder and VM names, so runs by several people on one libvirtd do not see each other; the
teardown deletes what the test left and fails the test if anything owned remains.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from clonebox_agent.adapters.common import QEMU_CAPABILITIES, TEST_DRIVER_CAPABILITIES, Fault
from clonebox_agent.adapters.fake import FakeHypervisor
from clonebox_agent.adapters.libvirt import LibvirtHypervisor
from clonebox_agent.ports import Capability, EventKind, HypervisorEvent
from clonebox_core.errors import FailedPrecondition
from clonebox_core.model import DiskSpec, KernelBoot, NetworkMode, NetworkSpec, VmSpec

ADAPTERS = ("fake", "libvirt-test", "libvirt-qemu")
DECLARED: dict[str, frozenset[Capability]] = {
    "fake": QEMU_CAPABILITIES,
    "libvirt-test": TEST_DRIVER_CAPABILITIES,
    "libvirt-qemu": QEMU_CAPABILITIES,
}
#: must be traversable by libvirt-qemu (never under /root)
RUN_ROOT = "/var/lib/clonebox"
TESTGUEST_DIR = os.environ.get("CLONEBOX_TESTGUEST_DIR", "/var/lib/clonebox/images/testguest")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "contract: the Hypervisor contract suite, run against every adapter")
    config.addinivalue_line("markers", "requires(*capabilities): run only for adapters declaring these")
    config.addinivalue_line(
        "markers",
        "not_on(*adapter_kinds): a case (pytest.param mark) those adapters do not run: deselected, never skipped; "
        "only where that adapter would prove nothing another one does not",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "adapter_kind" not in metafunc.fixturenames:
        return
    need: set[Capability] = set()
    for marker in metafunc.definition.iter_markers("requires"):
        need.update(marker.args)
    kinds = [k for k in ADAPTERS if need <= DECLARED[k]]
    metafunc.parametrize("adapter_kind", kinds)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = os.path.dirname(__file__)
    drop: list[pytest.Item] = []
    for item in items:
        if str(item.path).startswith(here):
            item.add_marker(pytest.mark.contract)
            if "libvirt" in item.name:
                item.add_marker(pytest.mark.libvirt)
            callspec = getattr(item, "callspec", None)
            kind = callspec.params.get("adapter_kind") if callspec is not None else None
            if any(kind in marker.args for marker in item.iter_markers("not_on")):
                drop.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = [item for item in items if item not in drop]


def _qemu_unreachable() -> str | None:
    if shutil.which("virsh") is None:
        return "virsh is not installed (deploy/dev/install-system.sh)"
    try:
        out = subprocess.run(
            ["virsh", "-c", "qemu:///system", "version"], capture_output=True, text=True, timeout=20, check=False
        )
    except subprocess.TimeoutExpired:
        return "libvirtd at qemu:///system does not answer"
    if out.returncode != 0:
        return f"libvirtd not reachable at qemu:///system ({out.stderr.strip()}); run deploy/dev/start-libvirt.sh"
    return None


@dataclass
class RunFiles:
    """Files shared by every test of a run: image dir, a file outside it, a share."""

    root: str
    images: str
    outside: str
    share: str
    token: str


@pytest.fixture(scope="session")
def run_files() -> Iterator[RunFiles]:
    os.makedirs(RUN_ROOT, mode=0o755, exist_ok=True)
    root = tempfile.mkdtemp(prefix="contract-", dir=RUN_ROOT)
    os.chmod(root, 0o755)  # mkdtemp's 0700 would lock QEMU out
    images = os.path.join(root, "images")
    outside = os.path.join(root, "outside")
    share = os.path.join(root, "share")
    for d in (images, outside, share):
        os.makedirs(d, mode=0o755)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", os.path.join(images, "base.qcow2"), "16M"], check=True)
    with open(os.path.join(images, "base.raw"), "wb") as f:
        f.truncate(4 * 1024 * 1024)
    with open(os.path.join(images, "vmlinuz"), "wb") as f:
        f.write(b"not a kernel: for adapters that never boot one\n")
    with open(os.path.join(outside, "secret.img"), "wb") as f:
        f.write(b"outside the image dirs\n")
    os.symlink(os.path.join(outside, "secret.img"), os.path.join(images, "escape.qcow2"))
    yield RunFiles(root, images, outside, share, uuid.uuid4().hex[:6])
    shutil.rmtree(root, ignore_errors=True)


@dataclass
class Harness:
    """One adapter under test, its events, and helpers to make specs for it."""

    kind: str
    hv: Any
    files: RunFiles
    storage_dir: str
    loop: asyncio.AbstractEventLoop
    events: list[HypervisorEvent] = field(default_factory=list)
    sink_errors: list[str] = field(default_factory=list)
    cleanups: list[Callable[[], None]] = field(default_factory=list)
    _n: int = 0

    @property
    def capabilities(self) -> frozenset[Capability]:
        return frozenset(self.hv.capabilities)

    @property
    def real(self) -> bool:
        return self.kind == "libvirt-qemu"

    def name(self) -> str:
        self._n += 1
        return f"ct-{self.files.token}-{self._n}"

    def spec(self, **overrides: Any) -> VmSpec:
        """A small VM: 64 MiB, one 16 MiB blank disk, no network (sits in SeaBIOS on real QEMU)."""
        base = VmSpec(
            name=self.name(),
            vcpus=1,
            memory_mib=64,
            disks=(DiskSpec("root", size_mib=16),),
            network=NetworkSpec(mode=NetworkMode.NONE),
        )
        return replace(base, **overrides)

    def guest_spec(self, **overrides: Any) -> VmSpec:
        """The test guest (kernel + busybox initramfs with qemu-ga) where a real guest must answer."""
        kit = os.path.join(TESTGUEST_DIR, "vmlinux")  # uncompressed: TCG spends seconds inflating vmlinuz
        if self.real and not os.path.exists(kit):
            pytest.skip(f"test guest kit missing at {TESTGUEST_DIR}: run deploy/testguest/build.sh")
        name = self.name()
        if self.real:
            boot = KernelBoot(
                kernel=kit,
                initrd=os.path.join(TESTGUEST_DIR, "initrd.img"),
                cmdline=f"console=ttyS0 quiet clonebox.hostname={name}",
            )
            disks = (DiskSpec("root", base_image=os.path.join(TESTGUEST_DIR, "data.qcow2")),)
        else:
            boot = KernelBoot(kernel="vmlinuz")
            disks = (DiskSpec("root", base_image="base.qcow2"),)
        return replace(VmSpec(name=name, vcpus=1, memory_mib=128, disks=disks, kernel_boot=boot), **overrides)

    def console_log(self, vm: str) -> str:
        return os.path.join(self.storage_dir, "vms", self.hv.domain_name(vm), "console.log")

    def console_says(self, vm: str, marker: bytes) -> bool:
        """Tell whether the VM's serial console log contains ``marker`` (real QEMU only)."""
        try:
            with open(self.console_log(vm), "rb") as f:
                return marker in f.read()
        except FileNotFoundError:
            return False

    async def wait_event(self, vm: str, kind: EventKind, within: float = 10.0) -> HypervisorEvent:
        deadline = self.loop.time() + within
        while self.loop.time() < deadline:
            for ev in self.events:
                if ev.name == vm and ev.kind == kind:
                    return ev
            await asyncio.sleep(0.02)
        raise AssertionError(f"no {kind.value} event for {vm} within {within}s; got {self.events}")

    async def wait_until(self, predicate: Callable[[], Any], within: float, what: str) -> Any:
        deadline = self.loop.time() + within
        while self.loop.time() < deadline:
            result = predicate()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return result
            await asyncio.sleep(0.1)
        raise AssertionError(f"timed out after {within}s waiting for {what}")

    def arrange_start_failure(self, spec: VmSpec) -> VmSpec:
        """``spec`` changed so that starting it fails: a network that exists but is inactive.

        The test driver starts anything, so there the failure libvirt would report is injected instead.
        """
        if self.kind == "libvirt-test":
            err = FailedPrecondition(
                f"VM {spec.name} failed to start: injected", reason="DOMAIN_START_FAILED", metadata={"vm": spec.name}
            )
            self.hv.faults.fail_on["create:start"] = Fault(err)
            self.hv.faults.fail_on["start"] = Fault(err)
            return spec
        net = self.inactive_network()
        return replace(spec, network=NetworkSpec(mode=NetworkMode.LIBVIRT, libvirt_network=net))

    def inactive_network(self) -> str:
        """A libvirt network that exists but is not started: starting a VM on it fails."""
        name = f"clonebox-ct-{self.files.token}-{uuid.uuid4().hex[:4]}"
        if self.kind == "fake":
            self.hv.set_network(name, False)
            return name
        assert self.real, "the test driver never fails a start"
        xml = f"<network><name>{name}</name></network>"
        subprocess.run(
            ["virsh", "-q", "-c", "qemu:///system", "net-define", "/dev/stdin"],
            input=xml,
            text=True,
            check=True,
            capture_output=True,
        )
        self.cleanups.append(
            lambda: subprocess.run(
                ["virsh", "-q", "-c", "qemu:///system", "net-undefine", name], check=False, capture_output=True
            )
        )
        return name


def make_adapter(kind: str, files: RunFiles, storage_dir: str, **kwargs: Any) -> Any:
    """A new, unopened adapter of ``kind`` on its own storage."""
    images = [files.images, TESTGUEST_DIR] if os.path.isdir(TESTGUEST_DIR) else [files.images]
    tag = uuid.uuid4().hex[:8]
    if kind == "fake":
        return FakeHypervisor(storage_dir=storage_dir, image_dirs=images, **kwargs)
    uri = "test:///default" if kind == "libvirt-test" else "qemu:///system"
    return LibvirtHypervisor(
        uri,
        storage_dir,
        images,
        domain_type="qemu" if kind == "libvirt-qemu" else "auto",
        owner=f"contract-{tag}",
        pool_name=f"clonebox-contract-{tag}",
        **kwargs,
    )


@pytest.fixture
def adapter_options() -> dict[str, Any]:
    """Extra constructor arguments (override in a test module or with indirect parametrization)."""
    return {}


@pytest.fixture
async def h(adapter_kind: str, run_files: RunFiles, adapter_options: dict[str, Any]) -> AsyncIterator[Harness]:
    if adapter_kind == "libvirt-qemu":
        why = _qemu_unreachable()
        if why:
            pytest.skip(why)
    storage_dir = tempfile.mkdtemp(prefix=f"{adapter_kind}-", dir=run_files.root)
    os.chmod(storage_dir, 0o755)
    hv = make_adapter(adapter_kind, run_files, storage_dir, **adapter_options)
    loop = asyncio.get_running_loop()
    harness = Harness(adapter_kind, hv, run_files, storage_dir, loop)

    def sink(ev: HypervisorEvent) -> None:
        # the port promises delivery on the event loop that called open()
        try:
            if asyncio.get_running_loop() is not loop:
                harness.sink_errors.append(f"{ev} delivered on another loop")
        except RuntimeError:
            harness.sink_errors.append(f"{ev} delivered outside the event loop")
        harness.events.append(ev)

    await hv.open(sink)
    try:
        yield harness
    finally:
        hv.faults.fail_on.clear()
        hv.faults.delays.clear()
        hv.faults.hook = None
        leftovers = []
        for record in await hv.list():
            await hv.delete(record.name)
            leftovers.append(record.name)
        inventory = await hv.inventory()
        if adapter_kind != "fake":
            await hv.remove_pool()
        await hv.close()
        for cleanup in harness.cleanups:
            cleanup()
        shutil.rmtree(storage_dir, ignore_errors=True)
        assert inventory.is_empty(), f"owned things left after deleting {leftovers}: {inventory}"
        assert not harness.sink_errors, harness.sink_errors
