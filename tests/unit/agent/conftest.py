"""Shared fixtures of the agent unit tests: a health monitor on the fake hypervisor, driven by a manual clock."""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from clonebox_agent.adapters.fake import FakeHypervisor
from clonebox_agent.app.health import HealthMonitor, HealthSettings
from clonebox_agent.app.probes import ScriptPolicy, ScriptRunner
from clonebox_agent.app.service import AgentService
from clonebox_agent.journal.store import Journal
from clonebox_core.health import Probe
from clonebox_core.model import DiskSpec, Resources, Vm, VmSpec


class ManualClock:
    """Time moves only when a test says so; ``sleep`` lets simulated time pass at once."""

    def __init__(self) -> None:
        self.t = 1000.0
        # a minute boundary: tests can reason about minute aggregates
        self.start = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.t

    def now(self) -> datetime:
        return self.start + timedelta(seconds=self.t - 1000.0)

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.t += max(seconds, 0.0)


class ZeroPhase(random.Random):
    """No jitter: every check's first run is at exactly its initial delay."""

    def uniform(self, a: float, b: float) -> float:
        return a


def spec(name: str, *checks: Probe) -> VmSpec:
    """A small VM spec with these health checks."""
    return VmSpec(name=name, vcpus=1, memory_mib=128, disks=(DiskSpec("root", size_mib=16),), health_checks=checks)


@dataclass
class HealthEnv:
    """A service, its fake hypervisor and a health monitor that runs only when the test ticks it."""

    fake: FakeHypervisor
    svc: AgentService
    mon: HealthMonitor
    clock: ManualClock
    journal: Journal
    tmp: Path
    extra: list[HealthMonitor] = field(default_factory=list)

    @staticmethod
    def spec(name: str, *checks: Probe) -> VmSpec:
        return spec(name, *checks)

    async def create(self, name: str, *checks: Probe, start: bool = True) -> Vm:
        vm = await self.svc.create(spec(name, *checks), request_id="", start=start)
        await self.mon.refresh()
        return vm

    async def tick(self, seconds: float) -> int:
        """Let ``seconds`` pass and run what is due (awaiting the runs)."""
        self.clock.t += seconds
        return await self.mon.run_due()


async def _make_env(
    tmp_path: Path,
    *,
    settings: HealthSettings | None = None,
    fake: FakeHypervisor | None = None,
    scripts_dir: Path | None = None,
    probe_user: str = "nobody",
    rng: random.Random | None = None,
    follow: bool = False,
) -> HealthEnv:
    fake = fake or FakeHypervisor(host_name="h", shutdown_delay=0.01)
    journal = Journal(tmp_path / "j.db")
    policy = ScriptPolicy(str(scripts_dir), expected_uid=_uid()) if scripts_dir is not None else None
    svc = AgentService("h", fake, journal, reserve=Resources(0, 0, 0), stop_timeout_seconds=1, scripts=policy)
    await svc.start()
    clock = ManualClock()
    mon = HealthMonitor(
        svc,
        fake,
        settings=settings or HealthSettings(restart_backoff_seconds=0),
        scripts=ScriptRunner(policy, probe_user) if policy is not None else None,
        clock=clock,
        rng=rng or ZeroPhase(),
    )
    # no background loop (the test drives time) and, unless asked, no event follower (the test refreshes)
    await mon.start(autorun=False, follow=follow)
    return HealthEnv(fake, svc, mon, clock, journal, tmp_path)


def _uid() -> int:
    return os.geteuid()


async def close_env(env: HealthEnv) -> None:
    await env.mon.close()
    await env.svc.close()
    env.journal.close()


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[HealthEnv]:
    e = await _make_env(tmp_path)
    yield e
    await close_env(e)


EnvFactory = Callable[..., Awaitable[HealthEnv]]


@pytest.fixture
async def env_factory(tmp_path: Path) -> AsyncIterator[EnvFactory]:
    """``await env_factory(settings=..., fake=..., scripts_dir=...)``: a HealthEnv with other knobs."""
    made: list[HealthEnv] = []

    async def make(**kw: Any) -> HealthEnv:
        folder = tmp_path / f"env{len(made)}"
        folder.mkdir()
        e = await _make_env(folder, **kw)
        made.append(e)
        return e

    yield make
    for e in made:
        await close_env(e)
