"""The health monitor on libvirt's test driver: no statistics there, so resource checks are UNKNOWN.

The test driver (``test:///default``) answers ``getAllDomainStats`` with state figures only; the
adapter reports no statistics and a resource check must say so (``no_data`` "statistics unavailable",
state UNKNOWN), never invent figures or fail the VM. Real figures are checked on real QEMU in
``tests/e2e/test_health_real.py`` and on the fake in ``tests/unit/agent/test_health_probes.py``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from clonebox_agent.app.health import HealthMonitor, HealthSettings
from clonebox_agent.app.service import AgentService
from clonebox_agent.journal.store import Journal
from clonebox_agent.ports import Capability
from clonebox_core.health import Band, HealthState, Probe, ProbeType, ResourceProbe, Sample
from clonebox_core.model import DiskSpec, NetworkMode, NetworkSpec, Resources, VmSpec
from tests.contract.conftest import RunFiles, make_adapter
from tests.unit.agent.conftest import ManualClock, ZeroPhase


async def test_resource_check_on_the_test_driver_is_unknown_statistics_unavailable(
    run_files: RunFiles, tmp_path: Path
) -> None:
    storage = tempfile.mkdtemp(prefix="health-test-", dir=run_files.root)
    os.chmod(storage, 0o755)
    hv = make_adapter("libvirt-test", run_files, storage)
    assert Capability.REAL_STATS not in hv.capabilities
    journal = Journal(tmp_path / "journal.db")
    svc = AgentService("h", hv, journal, reserve=Resources(0, 0, 0), stop_timeout_seconds=1)
    await svc.start()
    clock = ManualClock()
    mon = HealthMonitor(svc, hv, settings=HealthSettings(), clock=clock, rng=ZeroPhase())
    await mon.start(autorun=False, follow=False)
    probe = Probe(
        "load", ProbeType.RESOURCE, interval_ms=1000, timeout_ms=500, resource=ResourceProbe(cpu=Band(80, 95))
    )
    name = f"ht-{run_files.token}"
    spec = VmSpec(
        name=name,
        vcpus=1,
        memory_mib=64,
        disks=(DiskSpec("root", size_mib=16),),
        network=NetworkSpec(mode=NetworkMode.NONE),
        health_checks=(probe,),
    )
    try:
        await svc.create(spec, request_id="", start=True)
        await mon.refresh()
        for _ in range(3):  # a CPU figure needs two samples: three runs leave no excuse
            clock.t += 1
            await mon.run_due()
        (load,) = mon.health(name).checks
        assert load.state is HealthState.UNKNOWN, load
        assert load.last is not None and load.last.sample is Sample.NO_DATA
        assert load.last.detail.startswith("statistics unavailable"), load.last.detail
        assert mon.health(name).state is HealthState.UNKNOWN
    finally:
        await mon.close()
        await hv.delete(name)
        await hv.remove_pool()
        await svc.close()
        journal.close()
        shutil.rmtree(storage, ignore_errors=True)
