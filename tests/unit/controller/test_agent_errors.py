"""How the controller's agent client names a failed call: the agent's own error, or AGENT_UNREACHABLE."""

from __future__ import annotations

import grpc
import grpc.aio
from grpc_status import rpc_status

from clonebox_controller.agents.pool import GrpcAgentClient
from clonebox_core.errors import NotFound, Unavailable
from clonebox_core.rpc.server import Transport
from clonebox_core.rpc.status import to_status_proto


def _failed(
    code: grpc.StatusCode, details: str, trailing: tuple[tuple[str, str | bytes], ...] = ()
) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing), details)


async def test_a_call_without_an_answer_is_agent_unreachable_naming_the_host() -> None:
    client = GrpcAgentClient("h1", "127.0.0.1:1", Transport(None, insecure=True), "")
    err = client._error(_failed(grpc.StatusCode.UNAVAILABLE, "Socket closed"))
    assert isinstance(err, Unavailable) and err.reason == "AGENT_UNREACHABLE"
    assert (
        err.metadata == {"host": "h1"} and "agent h1 at 127.0.0.1:1" in err.message and "Socket closed" in err.message
    )


async def test_the_agents_own_errors_pass_through() -> None:
    client = GrpcAgentClient("h1", "127.0.0.1:1", Transport(None, insecure=True), "")
    status = rpc_status.to_status(to_status_proto(NotFound("VM web not found", reason="VM_NOT_FOUND")))
    err = client._error(_failed(status.code, status.details, tuple(status.trailing_metadata)))
    assert isinstance(err, NotFound) and err.reason == "VM_NOT_FOUND"
