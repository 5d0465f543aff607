"""Security over real mTLS (in-process servers): the policy table walked for every RPC and principal,
revocation, identity binding of agents, handshake refusals, enrolment and short certificate lifetimes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest
from clonebox.agent.v1 import agent_pb2
from clonebox.controller.v1 import (
    host_service_pb2,
    host_service_pb2_grpc,
    pki_service_pb2,
    pki_service_pb2_grpc,
    vm_service_pb2,
)
from clonebox.type.v1 import host_pb2, resources_pb2
from google.protobuf import descriptor_pool

from clonebox_agent.config import AgentConfig
from clonebox_agent.main import Agent
from clonebox_core.errors import FailedPrecondition, PermissionDenied
from clonebox_core.rpc.server import Transport, aio_channel
from clonebox_core.rpc.tls import TlsFiles
from clonebox_core.security.policy import AUDIT_ACTIONS, POLICY
from tests.integration.conftest import TRUST_DOMAIN, Fleet, FleetPki, eventually
from tests.integration.test_fleet import SMALL, error_info

pytestmark = pytest.mark.integration

PRINCIPALS = [("controller", None), ("agent", None), ("user", "viewer"), ("user", "operator"), ("user", "admin")]
SERVICES = {
    "agent": ["clonebox.agent.v1.AgentService"],
    "controller": [
        "clonebox.controller.v1.HostService",
        "clonebox.controller.v1.VmService",
        "clonebox.controller.v1.OperationService",
        "clonebox.controller.v1.PkiService",
        "clonebox.controller.v1.AuditService",
        "clonebox.controller.v1.RecoveryService",
        "clonebox.controller.v1.HealthService",
        "clonebox.controller.v1.SnapshotService",
        "clonebox.controller.v1.PlanService",
    ],
}


def all_methods() -> list[tuple[str, str, object]]:
    """(server, /full/Method, method descriptor) for every RPC of every served API service."""
    pool = descriptor_pool.Default()
    out = []
    for server, services in SERVICES.items():
        for name in services:
            svc = pool.FindServiceByName(name)
            out += [(server, f"/{name}/{m.name}", m) for m in svc.methods]
    return out


def test_every_mutating_rpc_has_an_audit_action() -> None:
    # an RPC that takes a request_id changes something: its attempts must be audited
    pool = descriptor_pool.Default()
    enroll = pool.FindServiceByName("clonebox.controller.v1.EnrollmentService")
    methods = [(m, d) for _s, m, d in all_methods()] + [(f"/{enroll.full_name}/{d.name}", d) for d in enroll.methods]
    mutating = [m for m, d in methods if "request_id" in d.input_type.fields_by_name]  # type: ignore[attr-defined]
    assert mutating, "no mutating RPC found: the check itself is broken"
    assert [m for m in mutating if m not in AUDIT_ACTIONS] == []
    # and the table names no RPC that does not exist
    known = {m for m, _d in methods}
    assert [m for m in AUDIT_ACTIONS if m not in known] == []


def test_every_rpc_has_a_policy_row() -> None:
    # a new RPC without a decision in the table fails here
    missing = [m for _s, m, _d in all_methods() if m not in POLICY]
    assert missing == []
    pool = descriptor_pool.Default()
    enroll = pool.FindServiceByName("clonebox.controller.v1.EnrollmentService")
    # enrolment is served on its own port only: on the main port it has no row and is refused
    assert all(f"/{enroll.full_name}/{m.name}" not in POLICY for m in enroll.methods)


async def _call(channel: grpc.aio.Channel, method: str, desc) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    """Call ``method`` with an empty request; the status code (OK counts as allowed)."""
    ser = lambda _m: b""  # noqa: E731 - an empty message of any type
    de = lambda b: b  # noqa: E731
    try:
        if desc.client_streaming:

            async def nothing() -> AsyncIterator[bytes]:
                if False:
                    yield b""

            call = channel.stream_stream(method, request_serializer=ser, response_deserializer=de)(nothing(), timeout=3)
            async for _ in call:
                break
        elif desc.server_streaming:
            call = channel.unary_stream(method, request_serializer=ser, response_deserializer=de)(b"", timeout=1)
            async for _ in call:
                break
            call.cancel()
        else:
            await channel.unary_unary(method, request_serializer=ser, response_deserializer=de)(b"", timeout=3)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_policy_table_walk_every_rpc_every_principal(fleet: Fleet) -> None:
    await fleet.add_agent("h1", SMALL)
    mismatches = []
    for kind, role in PRINCIPALS:
        principal = role or kind
        transport = fleet.pki.transport(kind, f"walk-{principal}", role)
        channels = {
            "controller": aio_channel(fleet.controller.address, transport, f"controller.{TRUST_DOMAIN}"),
            "agent": aio_channel(fleet.agents["h1"].address, transport, f"h1.agent.{TRUST_DOMAIN}"),
        }
        try:
            for server, method, desc in all_methods():
                code = await _call(channels[server], method, desc)
                allowed = principal in POLICY[method]
                denied = code == grpc.StatusCode.PERMISSION_DENIED
                if allowed == denied or code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL):
                    mismatches.append((principal, method, code.name))
        finally:
            for ch in channels.values():
                await ch.close()
    assert mismatches == []


async def test_revoked_user_is_refused_and_agent_learns_within_a_heartbeat(fleet: Fleet) -> None:
    await fleet.add_agent("h1", SMALL)
    viewer = fleet.user_channel("viewer", name="mallory")
    vms = __import__("clonebox.controller.v1.vm_service_pb2_grpc", fromlist=["x"]).VmServiceStub(viewer)
    await vms.ListVms(vm_service_pb2.ListVmsRequest())  # works before
    stub, agent_ch = fleet.agent_stub("h1", as_kind="controller", as_name="rogue-ctl")
    await stub.GetHostInfo(agent_pb2.GetHostInfoRequest())  # works before
    user_stub, user_agent_ch = fleet.agent_stub("h1", as_kind="user", as_name="mallory", role="viewer")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await user_stub.GetHostInfo(agent_pb2.GetHostInfoRequest())
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED  # a user never calls agents

    pki = pki_service_pb2_grpc.PkiServiceStub(fleet.channel)
    revoked = await pki.RevokeCertificate(pki_service_pb2.RevokeCertificateRequest(name="mallory"))
    assert len(revoked.revoked) == 2 and all(c.revoked for c in revoked.revoked)  # both of mallory's certificates
    await pki.RevokeCertificate(pki_service_pb2.RevokeCertificateRequest(name="rogue-ctl"))

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await vms.ListVms(vm_service_pb2.ListVmsRequest())
    assert (err.value.code(), error_info(err.value).reason) == (grpc.StatusCode.UNAUTHENTICATED, "CERT_REVOKED")

    async def agent_refuses() -> bool:
        try:
            await stub.GetHostInfo(agent_pb2.GetHostInfoRequest())
        except grpc.aio.AioRpcError as exc:
            return exc.code() == grpc.StatusCode.UNAUTHENTICATED and error_info(exc).reason == "CERT_REVOKED"
        return False

    start = time.monotonic()
    await eventually(agent_refuses, timeout=5, what="agent refusing the revoked identity")
    # the revoked user, too, is now refused by the agent as unauthenticated, not just unauthorized
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await user_stub.GetHostInfo(agent_pb2.GetHostInfoRequest())
    assert (err.value.code(), error_info(err.value).reason) == (grpc.StatusCode.UNAUTHENTICATED, "CERT_REVOKED")
    await user_agent_ch.close()
    # heartbeat interval is 0.2 s in this fleet: the deny list arrives with the next beat
    assert time.monotonic() - start < 5
    listed = await pki.ListCertificates(pki_service_pb2.ListCertificatesRequest(name="mallory"))
    assert [c.revoked for c in listed.certificates] == [True, True]
    await viewer.close()
    await agent_ch.close()


async def test_agent_may_register_only_as_its_own_host(fleet: Fleet) -> None:
    transport = fleet.pki.transport("agent", "h9")
    async with aio_channel(fleet.controller.address, transport, f"controller.{TRUST_DOMAIN}") as ch:
        stub = host_service_pb2_grpc.HostServiceStub(ch)

        async def register() -> AsyncIterator[host_service_pb2.ConnectRequest]:
            yield host_service_pb2.ConnectRequest(
                registration=host_service_pb2.Registration(
                    name="h1", address="127.0.0.1:1", capacity=resources_pb2.Resources(vcpus=1)
                )
            )
            await asyncio.sleep(1)

        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in stub.Connect(register()):
                pass
    assert (err.value.code(), error_info(err.value).reason) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "AGENT_NAME_MISMATCH",
    )
    hosts = await fleet.hosts.ListHosts(host_service_pb2.ListHostsRequest())
    assert [h.name for h in hosts.hosts] == []


@pytest.mark.parametrize("case", ["no-client-cert", "foreign-ca", "expired"])
async def test_handshake_refusals_are_unavailable(fleet: Fleet, case: str) -> None:
    if case == "no-client-cert":
        creds = grpc.ssl_channel_credentials(root_certificates=fleet.pki.ca.cert_pem)
        ch = grpc.aio.secure_channel(
            fleet.controller.address, creds, options=[("grpc.ssl_target_name_override", f"controller.{TRUST_DOMAIN}")]
        )
    elif case == "foreign-ca":
        other = FleetPki(fleet.tmp / "other")
        files = TlsFiles.in_folder(other.folder("user", "eve", "admin"), "user")
        # trust our controller but present a certificate from another CA
        files.ca.write_bytes(fleet.pki.ca.cert_pem)
        ch = aio_channel(fleet.controller.address, Transport(files), f"controller.{TRUST_DOMAIN}")
    else:
        transport = fleet.pki.transport("user", "late", "admin", seconds=1)
        # not_before has a minute of slack; expiry is what counts
        await asyncio.sleep(2.2)
        ch = aio_channel(fleet.controller.address, transport, f"controller.{TRUST_DOMAIN}")
    async with ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await host_service_pb2_grpc.HostServiceStub(ch).ListHosts(host_service_pb2.ListHostsRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_enrolment_with_a_join_token(fleet: Fleet) -> None:
    token = (await fleet.hosts.CreateJoinToken(host_service_pb2.CreateJoinTokenRequest(host="newbie"))).token
    tls_dir = fleet.tmp / "newbie-tls"
    await fleet.add_agent("newbie", SMALL, tls_dir=tls_dir, join_token=token)
    assert TlsFiles.in_folder(tls_dir, "agent").identity().name == "newbie"
    # the token works once
    again = Agent(
        AgentConfig(
            name="newbie",
            listen="127.0.0.1:0",
            controller=fleet.controller.address,
            hypervisor="fake",
            tls_dir=str(fleet.tmp / "n2"),
            join_token=token,
            state_dir=str(fleet.tmp / "n2-state"),
        )
    )
    with pytest.raises(FailedPrecondition) as err:
        await again.start()
    assert err.value.reason == "JOIN_TOKEN_USED"
    # a token made for one host does not enrol another
    token2 = (await fleet.hosts.CreateJoinToken(host_service_pb2.CreateJoinTokenRequest(host="other"))).token
    thief = Agent(
        AgentConfig(
            name="thief",
            listen="127.0.0.1:0",
            controller=fleet.controller.address,
            hypervisor="fake",
            tls_dir=str(fleet.tmp / "n3"),
            join_token=token2,
            state_dir=str(fleet.tmp / "n3-state"),
        )
    )
    with pytest.raises(PermissionDenied) as denied:
        await thief.start()
    assert denied.value.reason == "JOIN_TOKEN_HOST"


async def test_twenty_second_certificates_keep_the_fleet_working(fleet: Fleet, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # the controller issues 20 s certificates; every daemon renews at two thirds of its lifetime
    fleet.controller.pki.leaf_seconds = 20  # type: ignore[union-attr]
    await fleet.add_agent("h1", SMALL, cert_seconds=20)
    agent_tls = fleet.agents["h1"].transport.tls
    assert agent_tls is not None
    first_serial = agent_tls.certificate().serial_number
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        host = (await fleet.hosts.GetHost(host_service_pb2.GetHostRequest(name="h1"))).host
        assert host.state == host_pb2.HOST_STATE_READY
        await asyncio.sleep(2)
    assert agent_tls.certificate().serial_number != first_serial, "the agent renewed its certificate"
    # and the controller can still reach the agent over a fresh connection
    from tests.integration.test_fleet import create, spec

    vm = await create(fleet, spec("late-vm"))
    assert vm.host == "h1"


async def test_oversized_requests_are_refused_per_rpc(fleet: Fleet) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await fleet.vms.GetVm(vm_service_pb2.GetVmRequest(name="x" * 100_000))
    assert (err.value.code(), error_info(err.value).reason) == (grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_TOO_LARGE")


async def test_agent_refuses_names_that_would_be_paths(fleet: Fleet) -> None:
    # found by the fuzzer: a name like "web-1/../x" once reached a folder removal in the adapter
    await fleet.add_agent("h1", SMALL)
    from tests.integration.test_fleet import create, spec

    await create(fleet, spec("web-1"))
    canary = fleet.fakes["h1"].storage_dir + "/canary"
    __import__("os").makedirs(canary)
    stub, ch = fleet.agent_stub("h1")
    try:
        for req in (
            agent_pb2.DeleteVmRequest(name="web-1/../../canary", request_id="t1"),
            agent_pb2.DeleteVmRequest(name="..", request_id="t2"),
            agent_pb2.StopVmRequest(name="web-1/..", request_id="t3"),
        ):
            call = stub.DeleteVm if isinstance(req, agent_pb2.DeleteVmRequest) else stub.StopVm
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call(req)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert error_info(err.value).reason == "INVALID_NAME"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetVm(agent_pb2.GetVmRequest(name="a/b"))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await ch.close()
    assert __import__("os").path.isdir(canary)


async def test_out_of_range_enum_and_huge_echo_get_clear_errors(fleet: Fleet) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await fleet.vms.ListVms(vm_service_pb2.ListVmsRequest(state=99))  # type: ignore[arg-type]
    assert (err.value.code(), error_info(err.value).metadata["field"]) == (grpc.StatusCode.INVALID_ARGUMENT, "state")
    from clonebox.controller.v1 import operation_service_pb2, operation_service_pb2_grpc

    ops = operation_service_pb2_grpc.OperationServiceStub(fleet.channel)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await ops.GetOperation(operation_service_pb2.GetOperationRequest(id="x" * 20_000))
    # the error survives the trip with its ErrorInfo (messages are capped to fit gRPC's trailers)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert len(err.value.details() or "") <= 1024


async def test_bad_csr_does_not_spend_the_join_token(fleet: Fleet) -> None:
    # found by the fuzzer: the token used to be consumed before the CSR was checked
    token = (await fleet.hosts.CreateJoinToken(host_service_pb2.CreateJoinTokenRequest(host="late"))).token
    from clonebox_core.security.jointoken import JoinToken

    address = JoinToken.decode(token).enroll_address
    async with grpc.aio.secure_channel(
        address,
        grpc.ssl_channel_credentials(root_certificates=fleet.pki.ca.cert_pem),
        options=[("grpc.ssl_target_name_override", f"controller.{TRUST_DOMAIN}")],
    ) as ch:
        stub = pki_service_pb2_grpc.EnrollmentServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Enroll(pki_service_pb2.EnrollRequest(token=token, host="late", csr_pem="not a csr"))
        assert error_info(err.value).reason == "INVALID_CSR"
    await fleet.add_agent("late", SMALL, tls_dir=fleet.tmp / "late-tls", join_token=token)
    assert "late" in fleet.agents


async def test_registration_with_impossible_sizes_is_refused(fleet: Fleet) -> None:
    transport = fleet.pki.transport("agent", "big")
    async with aio_channel(fleet.controller.address, transport, f"controller.{TRUST_DOMAIN}") as ch:
        stub = host_service_pb2_grpc.HostServiceStub(ch)

        async def register() -> AsyncIterator[host_service_pb2.ConnectRequest]:
            yield host_service_pb2.ConnectRequest(
                registration=host_service_pb2.Registration(
                    name="big", address="127.0.0.1:1", capacity=resources_pb2.Resources(disk_mib=1 << 63)
                )
            )

        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in stub.Connect(register()):
                pass
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(err.value).metadata["field"] == "registration.capacity.disk_mib"
