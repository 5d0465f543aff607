"""Structured logs of the daemons: one structlog pipeline for structlog and stdlib ``logging`` alike.

Every line is a JSON object on stderr (a readable console rendering when stderr is a terminal) with
``time``, ``level``, ``event``, ``logger`` and ``service``; inside a span also ``trace_id`` and
``span_id``; inside an RPC the ``request_id`` and ``resource`` the request names (bound by the guard
interceptor through :func:`bind_call`) and the ``actor`` (the caller's SPIFFE ID, ``CALLER``).
``extra=`` fields of stdlib calls and keyword arguments of structlog calls become keys. Secrets are
masked. Levels: one root level plus ``{logger: LEVEL}`` overrides.

Existing ``logging.getLogger(__name__)`` calls need no change: ``ProcessorFormatter`` runs the same
processors on stdlib records.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping
from contextvars import ContextVar
from typing import IO, Annotated, Any

import structlog
from opentelemetry import trace
from pydantic import AfterValidator
from structlog.typing import EventDict, Processor, WrappedLogger

from clonebox_core.errors import InvalidArgument
from clonebox_core.secret import MASK, Secret, json_default
from clonebox_core.security.identity import CALLER

#: request id and resource name of the RPC being served (set per call, so per asyncio task)
CALL_FIELDS: ContextVar[Mapping[str, str] | None] = ContextVar("clonebox_call_fields", default=None)

_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG", "NOTSET")


# ------------------------------------------------------------------------------------------ the call


def call_fields(method: str, request: Any) -> dict[str, str]:
    """``request_id`` and ``resource`` of a request message, from whichever of its fields exist.

    Generic and cheap: ``request_id``; the resource from ``vm``/``host`` fields, else ``name`` (or
    ``spec.name``), prefixed ``vms/`` or ``hosts/`` when the method says which.
    """
    out: dict[str, str] = {}
    request_id = getattr(request, "request_id", None)
    if isinstance(request_id, str) and request_id:
        out["request_id"] = request_id
    host, vm = getattr(request, "host", None), getattr(request, "vm", None)
    name = getattr(request, "name", None)
    if not (isinstance(name, str) and name):
        name = getattr(getattr(request, "spec", None), "name", None)
    verb = method.rpartition("/")[2]
    if isinstance(vm, str) and vm:
        resource = f"hosts/{host}/vms/{vm}" if isinstance(host, str) and host else f"vms/{vm}"
    elif isinstance(name, str) and name:
        if verb.endswith(("Vm", "Vms")):
            resource = f"vms/{name}"
        elif verb.endswith(("Host", "Hosts")):
            resource = f"hosts/{name}"
        else:
            resource = name
    elif isinstance(host, str) and host:
        resource = f"hosts/{host}"
    else:
        resource = ""
    if resource:
        out["resource"] = resource
    return out


def bind_call(method: str, request: Any) -> None:
    """Put the request's id and resource into this call's log context and onto the current span."""
    fields = call_fields(method, request)
    CALL_FIELDS.set(fields or None)
    if fields:
        span = trace.get_current_span()
        if span.is_recording():
            span.set_attributes({f"clonebox.{k}": v for k, v in fields.items()})


# ------------------------------------------------------------------------------------- processors


def add_trace_ids(_logger: WrappedLogger, _method: str, event: EventDict) -> EventDict:
    """``trace_id``/``span_id`` of the current span (none outside a span)."""
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        event.setdefault("trace_id", format(ctx.trace_id, "032x"))
        event.setdefault("span_id", format(ctx.span_id, "016x"))
    return event


def add_call(_logger: WrappedLogger, _method: str, event: EventDict) -> EventDict:
    """``request_id``, ``resource`` and ``actor`` of the RPC being served."""
    fields = CALL_FIELDS.get()
    if fields:
        for key, value in fields.items():
            event.setdefault(key, value)
    caller = CALLER.get()
    if caller is not None:
        event.setdefault("actor", caller.spiffe_id)
    return event


def mask_secrets(_logger: WrappedLogger, _method: str, event: EventDict) -> EventDict:
    """Every Secret value (top level, or inside a dict/list/tuple value) becomes the mask."""
    for key, value in event.items():
        if isinstance(value, Secret):
            event[key] = MASK
        elif isinstance(value, dict | list | tuple):
            event[key] = _mask(value)
    return event


def _mask(value: Any) -> Any:
    if isinstance(value, Secret):
        return MASK
    if isinstance(value, dict):
        return {k: _mask(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_mask(v) for v in value]
    return value


class _Service:
    def __init__(self, service: str) -> None:
        self.service = service

    def __call__(self, _logger: WrappedLogger, _method: str, event: EventDict) -> EventDict:
        event.setdefault("service", self.service)
        return event


def _json_default(value: object) -> Any:
    if isinstance(value, Secret):
        return json_default(value)
    return str(value)


def _dumps(obj: Any, **kwargs: Any) -> str:
    return json.dumps(obj, default=_json_default, ensure_ascii=False)


def shared_processors(service: str) -> list[Processor]:
    """What every line gets, whether it came from structlog or stdlib ``logging``."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="time"),
        _Service(service),
        add_trace_ids,
        add_call,
        mask_secrets,
    ]


def make_formatter(service: str, *, as_json: bool) -> structlog.stdlib.ProcessorFormatter:
    """The formatter of the daemons' handler: JSON lines, or console rendering for a terminal."""
    renderer: Processor
    if as_json:
        renderer = structlog.processors.JSONRenderer(serializer=_dumps)
        final: list[Processor] = [structlog.processors.format_exc_info, renderer]
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
        final = [renderer]
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.ExtraAdder(), *shared_processors(service)],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *final],
    )


def setup_logging(
    service: str,
    level: str = "INFO",
    levels: Mapping[str, str] | None = None,
    *,
    stream: IO[str] | None = None,
    as_json: bool | None = None,
) -> logging.Handler:
    """Send every log record (structlog or stdlib) through one pipeline to ``stream`` (stderr).

    ``level`` is the root level; ``levels`` sets single loggers (``{"clonebox_agent.adapters": "DEBUG"}``).
    JSON unless ``stream`` is a terminal (``as_json`` forces either). Returns the handler it installed.
    """
    out = stream if stream is not None else sys.stderr
    if as_json is None:
        as_json = not _isatty(out)
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared_processors(service),
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(make_formatter(service, as_json=as_json))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    try:
        root.setLevel(check_level(level))
        for name, value in (levels or {}).items():
            logging.getLogger(name).setLevel(check_level(value))
    except ValueError as exc:
        raise InvalidArgument(f"config: {exc}", reason="CONFIG_INVALID") from None
    return handler


def check_level(level: str) -> str:
    """``level`` upper-cased; ValueError naming the choices when it is not a logging level."""
    upper = str(level).strip().upper()
    if upper == "WARN":
        upper = "WARNING"
    if upper not in _LEVELS:
        raise ValueError(f"log level {level!r}: use one of {', '.join(_LEVELS[:-1])}")
    return upper


#: a logging level in a config model (``INFO``, ``debug``, ``warn``...), stored upper-case
LogLevel = Annotated[str, AfterValidator(check_level)]


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def get_logger(name: str) -> Any:
    """A structlog logger named ``name`` (``log.info("vm created", vm=name)``)."""
    return structlog.stdlib.get_logger(name)


__all__ = [
    "CALL_FIELDS",
    "LogLevel",
    "bind_call",
    "call_fields",
    "check_level",
    "get_logger",
    "make_formatter",
    "setup_logging",
]
