"""VmManager's retries of an agent it cannot reach: each retry asks the hosts for the host's current client."""

from __future__ import annotations

from typing import Any

import pytest

from clonebox_controller.app.vms import VmManager
from clonebox_core.errors import FailedPrecondition, Unavailable


class FakeClient:
    """A fake agent client of host h1: unreachable, or answering ``get_vm`` with the VM's name."""

    host = "h1"

    def __init__(self, reachable: bool) -> None:
        self.reachable = reachable
        self.calls = 0

    async def get_vm(self, name: str) -> str:
        self.calls += 1
        if not self.reachable:
            raise Unavailable("cannot reach agent h1", reason="AGENT_UNREACHABLE")
        return name


class FakeHosts:
    """A fake HostRegistry: hands out ``clients`` in turn; ``None`` in the list: the host is unreachable."""

    def __init__(self, *clients: FakeClient | None) -> None:
        self._clients = list(clients)
        self.asked: list[str] = []

    async def client(self, name: str) -> FakeClient:
        self.asked.append(name)
        given = self._clients.pop(0)
        if given is None:
            raise FailedPrecondition(f"host {name} is unreachable", reason="HOST_UNREACHABLE")
        return given


def manager(hosts: FakeHosts, retry_seconds: float) -> VmManager:
    none: Any = None
    fake: Any = hosts
    return VmManager(none, fake, stop_timeout_seconds=1, agent_retry_seconds=retry_seconds)


async def test_a_retry_calls_the_agent_through_the_hosts_current_client() -> None:
    old, fresh = FakeClient(reachable=False), FakeClient(reachable=True)
    # the agent restarted: its host is unreachable for a moment, then registered with a new channel
    hosts = FakeHosts(None, fresh)
    answer = await manager(hosts, retry_seconds=10)._agent_call(old, lambda c: c.get_vm("web"))
    assert answer == "web"
    # the first retry kept the old client (the host was unreachable), the second took the new one
    assert (old.calls, fresh.calls, hosts.asked) == (2, 1, ["h1", "h1"])


async def test_an_agent_still_unreachable_at_the_deadline_is_the_calls_error() -> None:
    old = FakeClient(reachable=False)
    with pytest.raises(Unavailable):
        await manager(FakeHosts(), retry_seconds=0)._agent_call(old, lambda c: c.get_vm("web"))
    assert old.calls == 1
