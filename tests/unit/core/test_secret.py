"""``Secret``: the value never shows up by accident, anywhere a value usually leaks."""

from __future__ import annotations

import copy
import io
import json
import logging
import pickle
from collections.abc import Iterator

import pytest
import structlog
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from clonebox_core import specjson
from clonebox_core.errors import InvalidArgument
from clonebox_core.model import CloudInit, VmSpec
from clonebox_core.rpc import convert
from clonebox_core.rpc.status import to_status_proto
from clonebox_core.secret import MASK, Secret, json_default, redacted
from clonebox_core.telemetry.logging import setup_logging
from clonebox_core.telemetry.tracing import client_span

pytestmark = pytest.mark.unit

VALUE = "#cloud-config\npassword: hunter2-s3cr3t\n"
NEEDLE = "hunter2-s3cr3t"


def test_text_forms_show_the_mask() -> None:
    s = Secret(VALUE)
    forms = (repr(s), str(s), f"{s}", f"{s!s}", f"{s!r}", f"{s:>20}", "%s" % s, "%r" % (s,), "{}".format(s))  # noqa: UP031, UP032
    for text in forms:
        assert NEEDLE not in text
    assert str(s) == MASK and f"[{s}]" == f"[{MASK}]"
    assert s.reveal() == VALUE


def test_equality_and_hash_without_the_value() -> None:
    a, b = Secret(VALUE), Secret(VALUE)
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != Secret("other")
    assert a != VALUE  # a Secret is not a str: comparing with one is a bug, not a match
    assert hash(a) != hash(VALUE)
    assert Secret(a) == a  # wrapping a Secret again keeps the value


def test_immutable_and_not_picklable() -> None:
    s = Secret(VALUE)
    with pytest.raises(AttributeError):
        s._value = "x"  # type: ignore[misc]
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        with pytest.raises(TypeError):
            pickle.dumps(s, protocol=protocol)
    with pytest.raises(TypeError):
        pickle.dumps({"spec": CloudInit(user_data=s)})
    assert copy.copy(s) is s and copy.deepcopy(s) is s
    with pytest.raises(TypeError):
        Secret(123)  # type: ignore[arg-type]


def test_json_and_redacted() -> None:
    doc = {"user_data": Secret(VALUE), "nested": [{"k": Secret(VALUE)}, ("t", Secret(VALUE))], "n": 1}
    text = json.dumps(doc, default=json_default)
    assert NEEDLE not in text and json.loads(text)["user_data"] == MASK
    with pytest.raises(TypeError):
        json.dumps({"x": object()}, default=json_default)
    clean = redacted(doc)
    assert NEEDLE not in json.dumps(clean) and clean["nested"][1] == ("t", MASK) and clean["n"] == 1
    assert redacted(CloudInit(user_data=Secret(VALUE), meta_data="m"))["user_data"] == MASK


def test_error_messages_built_from_a_secret() -> None:
    s = Secret(VALUE)
    err = InvalidArgument(f"cloud_init.user_data {s} is not valid YAML", metadata={"field": "cloud_init.user_data"})
    assert NEEDLE not in str(err) and NEEDLE not in repr(err)
    assert NEEDLE not in to_status_proto(err).SerializeToString().decode("utf-8", "replace")


def test_models_hold_user_data_as_a_secret() -> None:
    ci = CloudInit(VALUE, "meta", "")  # type: ignore[arg-type]  # a plain str is wrapped
    assert isinstance(ci.user_data, Secret) and ci.user_data.reveal() == VALUE
    spec = VmSpec(name="web", cloud_init=ci)
    assert NEEDLE not in repr(spec) and NEEDLE not in str(spec)
    # the wire format carries the value (it is the user's request), and reads back into a Secret
    wire = convert.spec_to_proto(spec)
    assert wire.cloud_init.user_data == VALUE
    back = convert.spec_from_proto(wire)
    assert back == spec and isinstance(back.cloud_init.user_data, Secret)  # type: ignore[union-attr]


def test_store_keeps_the_value_and_domain_metadata_only_its_digest() -> None:
    from clonebox_agent.adapters.libvirt import domxml
    from clonebox_agent.adapters.seediso import seed_files
    from clonebox_controller.store import codec

    spec = VmSpec(name="web", cloud_init=CloudInit(Secret(VALUE)))
    stored = json.dumps(codec.spec_to_json(spec))
    assert NEEDLE in stored  # stored as before
    assert codec.spec_from_json(json.loads(stored)) == spec
    metadata = domxml.spec_to_json(spec)
    assert NEEDLE not in metadata  # the domain XML is readable with read-only libvirt access
    assert specjson.matches_at_rest(domxml.spec_from_json(metadata), spec)
    assert seed_files(spec.cloud_init, instance_id="iid-1", hostname="web")["user-data"] == VALUE.encode()  # type: ignore[arg-type]


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    stream = io.StringIO()
    setup_logging("test", "DEBUG", stream=stream, as_json=True)
    try:
        yield stream
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
        structlog.reset_defaults()


def test_structlog_and_stdlib_lines_mask_secrets(log_stream: io.StringIO) -> None:
    s = Secret(VALUE)
    structlog.stdlib.get_logger("t.structlog").info("creating", user_data=s, nested={"pw": s}, items=[s])
    logging.getLogger("t.stdlib").info("user data %s", s, extra={"user_data": s})
    logging.getLogger("t.stdlib").info("repr %r", s)
    lines = [json.loads(line) for line in log_stream.getvalue().splitlines()]
    assert len(lines) == 3
    assert NEEDLE not in log_stream.getvalue()
    assert lines[0]["user_data"] == MASK and lines[0]["nested"] == {"pw": MASK} and lines[0]["items"] == [MASK]
    assert lines[1]["event"] == f"user data {MASK}" and lines[1]["user_data"] == MASK


def test_span_attributes_never_carry_the_value() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    s = Secret(VALUE)
    with tracer.start_as_current_span("direct") as span:
        span.set_attribute("user_data", s)  # type: ignore[arg-type]
        span.set_attributes({"also": s, "fine": "ok"})  # type: ignore[dict-item]
        span.add_event("event", {"user_data": s})  # type: ignore[dict-item]
    with client_span(tracer, "helper", {"user_data": s, "vm": "web"}):
        pass
    spans = exporter.get_finished_spans()
    assert [sp.name for sp in spans] == ["direct", "helper"]
    assert spans[0].attributes is not None and spans[0].attributes.get("fine") == "ok"
    assert spans[1].attributes is not None and spans[1].attributes["user_data"] == MASK
    for sp in spans:
        assert NEEDLE not in repr(dict(sp.attributes or {}))
        assert NEEDLE not in sp.to_json()
    # and not in the bytes that would go to a collector
    assert NEEDLE.encode() not in encode_spans(spans).SerializeToString()
