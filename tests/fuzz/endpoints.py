"""Channels to the fleet's servers, as each kind of caller.

With mTLS every call carries an identity, and the policy table decides per RPC which principals
(``admin``, ``operator``, ``viewer``, ``controller``, ``agent``) may call it. The fuzzer mostly calls
as a principal that is allowed (to reach the code behind the guard) and sometimes as any other (to
fuzz the guard). ``EnrollmentService`` lives on the controller's enrolment port, reached without a
client certificate. A fleet without ``pki`` (plaintext on loopback) gets its plain channels.
"""

from __future__ import annotations

from typing import Any

import grpc.aio
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.fuzz.strategies import Rpc
from tests.integration import conftest as fleet_conftest
from tests.integration.conftest import Fleet

PRINCIPALS: tuple[str, ...] = ("admin", "operator", "viewer", "controller", "agent")
#: the agent identity fuzzed ``HostService.Connect`` sessions present
FUZZ_AGENT = "fuzz-agent-0"
#: what a call without a certificate (the enrolment port, a plaintext fleet) is recorded as
ANONYMOUS = "anonymous"
#: the agent fuzzed directly (AgentService)
TARGET_AGENT = "h1"


def allowed_principals(rpc: Rpc) -> list[str]:
    """Principals the policy table lets call ``rpc``, most powerful first ([] without a table)."""
    try:
        from clonebox_core.security.policy import POLICY
    except ImportError:
        return []
    return [p for p in PRINCIPALS if p in POLICY.get(rpc.path, frozenset())]


class Endpoints:
    """Cached channels by (server, principal)."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.pki: Any = getattr(fleet, "pki", None)
        self.trust_domain: str = getattr(fleet_conftest, "TRUST_DOMAIN", "")
        self._channels: dict[tuple[str, str], grpc.aio.Channel] = {}
        #: service full name -> "main" or "enrol"
        self._where: dict[str, str] = {}

    @property
    def secure(self) -> bool:
        """True when the fleet runs over mTLS."""
        return self.pki is not None

    def principals(self, rpc: Rpc) -> list[str]:
        """Who the fuzzer may call ``rpc`` as: allowed ones first, then the rest."""
        if not self.secure or self._where.get(rpc.service.full_name) == "enrol":
            return [ANONYMOUS]
        allowed = allowed_principals(rpc)
        return allowed + [p for p in PRINCIPALS if p not in allowed]

    def channel(self, rpc: Rpc, principal: str) -> grpc.aio.Channel:
        """A channel to the server of ``rpc`` as ``principal``."""
        if rpc.target == "agent":
            return self.agent(TARGET_AGENT, principal)
        if self._where.get(rpc.service.full_name) == "enrol":
            return self.enrolment()
        return self.controller(principal)

    def controller(self, principal: str) -> grpc.aio.Channel:
        """The controller's main port."""
        fleet = self.fleet
        if not self.secure or principal in ("admin", ANONYMOUS):
            return fleet.channel
        key = ("controller", principal)
        if key not in self._channels:
            if principal in ("operator", "viewer"):
                self._channels[key] = fleet.user_channel(principal, name=f"fuzz-{principal}")
            else:
                from clonebox_core.rpc.server import aio_channel

                name = FUZZ_AGENT if principal == "agent" else "fuzz-ctl"
                transport = self.pki.transport(principal, name)
                self._channels[key] = aio_channel(
                    fleet.controller.address, transport, f"controller.{self.trust_domain}"
                )
        return self._channels[key]

    def agent(self, name: str, principal: str) -> grpc.aio.Channel:
        """Agent ``name``'s port."""
        key = (f"agent:{name}", principal)
        if key not in self._channels:
            if not self.secure or principal in ("controller", ANONYMOUS):
                self._channels[key] = self.fleet.agent_stub(name)[1]
            elif principal == "agent":
                # a peer agent
                self._channels[key] = self.fleet.agent_stub(name, as_kind="agent", as_name="h2")[1]
            else:
                user = f"fuzz-{principal}"
                self._channels[key] = self.fleet.agent_stub(name, as_kind="user", as_name=user, role=principal)[1]
        return self._channels[key]

    def enrolment(self) -> grpc.aio.Channel:
        """The controller's enrolment port (TLS, no client certificate)."""
        key = ("enrol", ANONYMOUS)
        if key not in self._channels:
            from clonebox_core.rpc.server import bootstrap_channel

            server = self.fleet.controller.enroll_server
            assert server is not None
            port = server.port
            self._channels[key] = bootstrap_channel(
                f"127.0.0.1:{port}", self.pki.ca.cert_pem, f"controller.{self.trust_domain}"
            )
        return self._channels[key]

    async def locate(self, rpc: Rpc) -> bool:
        """Find the port that serves ``rpc``'s service (through reflection); False when none does."""
        name = rpc.service.full_name
        if rpc.target == "agent":
            return name in await _served(self.agent(TARGET_AGENT, "controller"))
        if name in await _served(self.controller("admin")):
            self._where[name] = "main"
            return True
        enrol = self.secure and getattr(self.fleet.controller, "enroll_server", None) is not None
        if enrol and name in await _served(self.enrolment()):
            self._where[name] = "enrol"
            return True
        return False

    async def close(self) -> None:
        """Close the channels made here (not the fleet's own)."""
        for ch in self._channels.values():
            if ch is not self.fleet.channel:
                await ch.close()
        self._channels.clear()


async def _served(channel: grpc.aio.Channel) -> set[str]:
    async def ask() -> Any:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    names: set[str] = set()
    async for resp in reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(ask(), timeout=10):
        names |= {s.name for s in resp.list_services_response.service}
    return names
