"""Structured logs: one pipeline for structlog and stdlib, trace/span ids, call fields, levels, rendering."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import structlog
from clonebox.agent.v1 import agent_pb2
from clonebox.controller.v1 import host_service_pb2, vm_service_pb2
from clonebox.type.v1 import vm_pb2
from opentelemetry.sdk.trace import TracerProvider

from clonebox_core.errors import InvalidArgument
from clonebox_core.security.identity import CALLER, Identity, Kind, UserRole
from clonebox_core.telemetry.logging import CALL_FIELDS, bind_call, call_fields, setup_logging

pytestmark = pytest.mark.unit


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def configure() -> Iterator[Callable[..., io.StringIO]]:
    """setup_logging into a fresh stream; the root logger and structlog are put back afterwards."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    touched: list[str] = []

    def run(*, level: str = "INFO", levels: dict[str, str] | None = None, stream: io.StringIO | None = None) -> Any:
        out = stream if stream is not None else io.StringIO()
        setup_logging("svc", level, levels, stream=out)
        touched.extend(levels or {})
        return out

    try:
        yield run
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        for name in touched:
            logging.getLogger(name).setLevel(logging.NOTSET)
        structlog.reset_defaults()


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_standard_keys_on_stdlib_and_structlog_lines(configure: Callable[..., io.StringIO]) -> None:
    out = configure()
    logging.getLogger("clonebox_agent.x").warning("disk %s is full", "vda", extra={"vm": "web"})
    structlog.stdlib.get_logger("clonebox_controller.y").info("vm placed", vm="web", host="h1")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("clonebox_core.z").exception("handler failed")
    a, b, c = _lines(out)
    for line in (a, b, c):
        assert {"time", "level", "event", "logger", "service"} <= line.keys()
        assert line["service"] == "svc" and line["time"].endswith("Z")
        assert "trace_id" not in line and "span_id" not in line  # outside any span
    assert (a["level"], a["event"], a["logger"], a["vm"]) == ("warning", "disk vda is full", "clonebox_agent.x", "web")
    assert (b["level"], b["event"], b["host"]) == ("info", "vm placed", "h1")
    assert c["level"] == "error" and "RuntimeError: boom" in c["exception"]


def test_trace_and_span_ids_inside_a_span_only(configure: Callable[..., io.StringIO]) -> None:
    out = configure()
    tracer = TracerProvider().get_tracer("test")
    log = logging.getLogger("t")
    log.info("before")
    with tracer.start_as_current_span("outer") as outer:
        log.info("in outer")
        with tracer.start_as_current_span("inner") as inner:
            structlog.stdlib.get_logger("t").info("in inner")
    log.info("after")
    before, in_outer, in_inner, after = _lines(out)
    assert "trace_id" not in before and "trace_id" not in after
    octx, ictx = outer.get_span_context(), inner.get_span_context()
    assert in_outer["trace_id"] == format(octx.trace_id, "032x") and in_outer["span_id"] == format(octx.span_id, "016x")
    assert in_inner["trace_id"] == in_outer["trace_id"] and in_inner["span_id"] == format(ictx.span_id, "016x")


def test_call_fields_and_actor(configure: Callable[..., io.StringIO]) -> None:
    out = configure()
    alice = Identity("clonebox.test", Kind.USER, "alice", UserRole.OPERATOR)
    CALL_FIELDS.set(None)
    token = CALLER.set(alice)
    try:
        request = vm_service_pb2.StartVmRequest(name="web", request_id="r-1")
        bind_call("/clonebox.controller.v1.VmService/StartVm", request)
        logging.getLogger("t").info("starting")
    finally:
        CALLER.reset(token)
        CALL_FIELDS.set(None)
    (line,) = _lines(out)
    assert line["request_id"] == "r-1" and line["resource"] == "vms/web"
    assert line["actor"] == "spiffe://clonebox.test/user/operator/alice"


@pytest.mark.parametrize(
    ("method", "message", "expected"),
    [
        ("/clonebox.controller.v1.VmService/GetVm", vm_service_pb2.GetVmRequest(name="web"), {"resource": "vms/web"}),
        (
            "/clonebox.controller.v1.VmService/CreateVm",
            vm_service_pb2.CreateVmRequest(spec=vm_pb2.VmSpec(name="web"), host="h1", request_id="r"),
            {"request_id": "r", "resource": "vms/web"},
        ),
        (
            "/clonebox.controller.v1.HostService/CordonHost",
            host_service_pb2.CordonHostRequest(name="h1"),
            {"resource": "hosts/h1"},
        ),
        (
            "/clonebox.controller.v1.HostService/CreateJoinToken",
            host_service_pb2.CreateJoinTokenRequest(host="h2"),
            {"resource": "hosts/h2"},
        ),
        ("/clonebox.agent.v1.AgentService/ListVms", agent_pb2.ListVmsRequest(), {}),
        ("/clonebox.agent.v1.AgentService/Connect", None, {}),  # client streaming: no request message
    ],
)
def test_call_fields_read_whatever_fields_exist(method: str, message: Any, expected: dict[str, str]) -> None:
    assert call_fields(method, message) == expected


def test_per_logger_levels(configure: Callable[..., io.StringIO]) -> None:
    out = configure(level="INFO", levels={"noisy": "warning", "chatty.sub": "DEBUG"})
    logging.getLogger("noisy").info("dropped")
    logging.getLogger("noisy.child").info("dropped too")  # children inherit
    logging.getLogger("noisy").warning("kept 1")
    logging.getLogger("chatty.sub").debug("kept 2")
    logging.getLogger("chatty").debug("dropped 3")
    structlog.stdlib.get_logger("noisy").info("dropped 4")
    structlog.stdlib.get_logger("chatty.sub").debug("kept 3")
    assert [line["event"] for line in _lines(out)] == ["kept 1", "kept 2", "kept 3"]


def test_bad_levels_are_config_errors(configure: Callable[..., io.StringIO]) -> None:
    with pytest.raises(InvalidArgument, match="log level 'LOUD'"):
        configure(levels={"x": "LOUD"})


def test_config_models_check_levels() -> None:
    from pydantic import ValidationError

    from clonebox_agent.config import AgentConfig
    from clonebox_controller.config import ControllerConfig

    assert AgentConfig(log_levels={"a": "debug"}).log_levels == {"a": "DEBUG"}
    assert ControllerConfig(tracing={"otlp_endpoint": "http://c:4317"}).tracing.otlp_endpoint == "http://c:4317"
    with pytest.raises(ValidationError):
        ControllerConfig(log_levels={"a": "LOUD"})


def test_json_for_files_and_pipes_console_for_terminals(configure: Callable[..., io.StringIO]) -> None:
    piped = configure()
    logging.getLogger("t").info("hello", extra={"vm": "web"})
    assert json.loads(piped.getvalue())["event"] == "hello"
    tty = configure(stream=_Tty())
    logging.getLogger("t").info("hello", extra={"vm": "web"})
    text = tty.getvalue()
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    assert "hello" in text and "vm=web" in text and "[info" in text
