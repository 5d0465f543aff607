"""What the guard interceptor reports to its observers for each way a call can end."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import grpc.aio
import pytest
from clonebox.controller.v1 import vm_service_pb2

from clonebox_core.errors import NotFound
from clonebox_core.rpc.server import Transport, aio_channel, start_server
from clonebox_core.rpc.status import CallRecord

Req = vm_service_pb2.GetVmRequest


class Recorder:
    def __init__(self) -> None:
        self.records: list[CallRecord] = []

    async def call_finished(self, record: CallRecord) -> None:
        self.records.append(record)


async def behavior(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
    if request.name == "raise":
        raise NotFound("no such thing", reason="THING_NOT_FOUND")
    if request.name == "abort":
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the handler said no")
    if request.name == "bug":
        raise RuntimeError("a bug")
    return Req(name="ok")


def _add(_servicer: None, server: grpc.aio.Server) -> None:
    handler = grpc.unary_unary_rpc_method_handler(
        behavior, request_deserializer=Req.FromString, response_serializer=Req.SerializeToString
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Guard", {"Call": handler}),))


@pytest.mark.parametrize(
    ("name", "code", "reason"),
    [
        ("fine", "OK", ""),
        ("raise", "NOT_FOUND", "THING_NOT_FOUND"),
        ("abort", "FAILED_PRECONDITION", "FAILED_PRECONDITION"),  # the handler's own status, not a made-up one
        ("bug", "INTERNAL", "INTERNAL"),
    ],
)
async def test_observers_hear_the_real_outcome(name: str, code: str, reason: str) -> None:
    recorder = Recorder()
    transport = Transport(None, insecure=True)
    handle = await start_server("127.0.0.1:0", [(_add, None, "test.Guard")], transport, observers=[recorder])
    channel = aio_channel(f"127.0.0.1:{handle.port}", transport)
    try:
        call = channel.unary_unary(
            "/test.Guard/Call", request_serializer=Req.SerializeToString, response_deserializer=Req.FromString
        )
        try:
            await call(Req(name=name))
            got = "OK"
        except grpc.aio.AioRpcError as exc:
            got = exc.code().name
        assert got == code
        # the observer runs when the server side of the call ends, which for an abort can be just
        # after the client already has the status
        for _ in range(500):
            if recorder.records:
                break
            await asyncio.sleep(0.01)
        [record] = recorder.records
        assert (record.method, record.code, record.reason) == ("/test.Guard/Call", code, reason)
    finally:
        await channel.close()
        await handle.stop(0)
