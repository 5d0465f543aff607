"""Hypothesis strategies that build protobuf requests from descriptors, and the registry of every RPC.

``message_strategy(descriptor, mode)`` works for any message: scalars (ints with their edges, strings
with NUL, newlines, markup, ``../``, unicode and very long values), enums (valid and out-of-range
numbers), nested messages, repeated fields, maps and oneofs. Two flavours:

- ``"random"``: anything the wire format allows;
- ``"valid"``: biased towards requests a real client would send (DNS labels, names of VMs, hosts and
  operations that exist right now, image paths inside the agent's image dir, sizes in range), with an
  occasional random field mixed in so validation is probed one field at a time.

Valid-looking values come from ``Pools``, which the harness refreshes from the live fleet; the
strategies read it lazily, so a VM created by one example can be targeted by the next.

``RPCS`` lists every RPC of every service in the generated ``clonebox.*`` API, discovered from the
service descriptors, so a new RPC or service is fuzzed without touching this file.
"""

from __future__ import annotations

import base64
import importlib
import itertools
import json
import pkgutil
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Literal, TypeVar

import clonebox
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

Mode = Literal["random", "valid"]
MODES: tuple[Mode, ...] = ("valid", "random")
T = TypeVar("T")

# ---------------------------------------------------------------------------------------------------
# The RPC registry
# ---------------------------------------------------------------------------------------------------

#: which in-process server answers a service, by proto package
TARGET_BY_PACKAGE = {"clonebox.agent.v1": "agent", "clonebox.controller.v1": "controller"}

#: method-name prefixes of RPCs that only read; everything else may change state
_READ_PREFIXES = ("Get", "List", "Watch", "Wait")


@dataclass(frozen=True, repr=False)
class Rpc:
    """One RPC of one service, with what a generic caller needs."""

    service: ServiceDescriptor
    method: MethodDescriptor

    def __repr__(self) -> str:
        return f"Rpc({self.name})"

    @property
    def name(self) -> str:
        """``VmService.CreateVm``."""
        return f"{self.service.name}.{self.method.name}"

    @property
    def path(self) -> str:
        """The gRPC method path, ``/clonebox.controller.v1.VmService/CreateVm``."""
        return f"/{self.service.full_name}/{self.method.name}"

    @property
    def target(self) -> str:
        """``agent`` or ``controller``."""
        return TARGET_BY_PACKAGE[self.service.file.package]

    @property
    def input(self) -> Descriptor:
        """Request message descriptor."""
        return self.method.input_type

    @property
    def request_class(self) -> type[Message]:
        """Request message class."""
        return message_class(self.method.input_type)

    @property
    def response_class(self) -> type[Message]:
        """Response message class."""
        return message_class(self.method.output_type)

    @property
    def client_streaming(self) -> bool:
        """True for ``stream`` requests (``HostService.Connect``)."""
        return bool(self.method.client_streaming)

    @property
    def server_streaming(self) -> bool:
        """True for ``stream`` responses (watches, ``Connect``)."""
        return bool(self.method.server_streaming)

    @property
    def mutating(self) -> bool:
        """True unless the method name says it only reads (Get/List/Watch/Wait)."""
        return not self.method.name.startswith(_READ_PREFIXES)


@cache
def message_class(descriptor: Descriptor) -> type[Message]:
    """The generated class of a message descriptor."""
    return message_factory.GetMessageClass(descriptor)


def discover_services() -> list[ServiceDescriptor]:
    """Every service declared in the generated ``clonebox.*`` API modules, ordered by full name."""
    found: dict[str, ServiceDescriptor] = {}
    for info in pkgutil.walk_packages(clonebox.__path__, "clonebox."):
        if not info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(info.name)
        for service in module.DESCRIPTOR.services_by_name.values():
            found[service.full_name] = service
    return [found[k] for k in sorted(found)]


SERVICES: list[ServiceDescriptor] = discover_services()
RPCS: list[Rpc] = [Rpc(s, m) for s in SERVICES for m in s.methods]
RPCS_BY_SERVICE: dict[str, list[Rpc]] = {s.name: [r for r in RPCS if r.service is s] for s in SERVICES}

# ---------------------------------------------------------------------------------------------------
# Live pools of plausible values
# ---------------------------------------------------------------------------------------------------


@dataclass
class Pools:
    """Names and numbers that exist in the fleet right now (refreshed by the harness)."""

    vm_names: list[str] = field(default_factory=list)
    host_names: list[str] = field(default_factory=list)
    #: names a fuzzed ``Connect`` registers (the first is the identity it connects as)
    connect_names: list[str] = field(default_factory=lambda: ["fuzz-agent-0", "fuzz-agent-1"])
    operation_ids: list[str] = field(default_factory=list)
    request_ids: list[str] = field(default_factory=list)
    page_tokens: list[str] = field(default_factory=list)
    #: image paths relative to the agent's image dir, that exist
    images: list[str] = field(default_factory=lambda: ["testguest/data.qcow2"])
    kernels: list[str] = field(default_factory=lambda: ["testguest/vmlinux"])
    initrds: list[str] = field(default_factory=lambda: ["testguest/initrd.img"])
    #: existing folders for shared_folders.host_path
    shared_dirs: list[str] = field(default_factory=lambda: ["/tmp"])
    #: folders a path-traversal name would reach (canaries the harness watches)
    canary_names: list[str] = field(default_factory=lambda: ["canary"])
    #: (epoch, sequence) of each agent's event history
    agent_revisions: list[tuple[int, int]] = field(default_factory=lambda: [(1, 0)])
    fleet_revision: int = 0
    #: PKI: join tokens (unused ones first), the hosts they were made for, PEM CSRs, victim certificates
    join_tokens: list[str] = field(default_factory=list)
    token_hosts: list[str] = field(default_factory=list)
    csrs: list[str] = field(default_factory=list)
    cert_names: list[str] = field(default_factory=list)
    serials: list[str] = field(default_factory=list)


def live(get: Callable[[], Sequence[T]], fallback: Sequence[T]) -> st.SearchStrategy[T]:
    """One element of ``get()`` as it is when drawn (``fallback`` while it is empty)."""

    def pick(i: int) -> T:
        items = get() or fallback
        return items[i % len(items)]

    return st.integers(min_value=0, max_value=1 << 16).map(pick)


# ---------------------------------------------------------------------------------------------------
# Scalars
# ---------------------------------------------------------------------------------------------------

#: strings that break naive code: NUL, newlines, markup, CDATA ends, traversal, unicode tricks, lengths
SPECIAL_STRINGS: tuple[str, ...] = (
    "",
    " ",
    "\x00",
    "a\x00b",
    "\n",
    "a\nb",
    "\r\n",
    "\t",
    "\x1b[31m",
    "<&>\"'",
    "]]>",
    "<![CDATA[x]]>",
    "<domain type='kvm'/>",
    "../",
    "..",
    ".",
    "/",
    "../../../../etc/passwd",
    "/etc/shadow",
    "testguest/../../../etc/passwd",
    "a/b",
    "\\",
    "-",
    "-a",
    "a-",
    "A",
    "UPPER",
    "web-1",
    "h1",
    "é",
    "\u202eevil",
    "\ufeff",
    "\u200b",
    "\U0001f4a9",
    "日本語",
    "%s%n%x",
    "{}",
    "${jndi:ldap://x}",
    "' OR 1=1 --",
    "0",
    "-1",
    "x" * 63,
    "x" * 64,
    "a" * 255,
    "a" * 256,
    "a" * 1024,
)

#: lengths of long strings: around gRPC's 8 KiB trailer limit, 64 KiB request limit, 1 MiB cloud-init limit
_LONG_LENGTHS = (4096, 8193, 20_000, 70_000, 1024 * 1024 + 1)

_TEXT = st.text(st.characters(codec="utf-8"), max_size=40)


def text_strategy() -> st.SearchStrategy[str]:
    """Any string: random unicode, the specials, combinations of both, and rarely a huge one."""
    # long values are made on demand: a strategy's repr must not carry a megabyte
    long = st.sampled_from(_LONG_LENGTHS).map(lambda n: "L" * n)
    specials = weighted((12, st.sampled_from(SPECIAL_STRINGS)), (1, long))
    return st.one_of(
        _TEXT,
        specials,
        st.tuples(st.sampled_from(SPECIAL_STRINGS), _TEXT, st.sampled_from(SPECIAL_STRINGS[:20])).map("".join),
        st.tuples(_TEXT, st.sampled_from(SPECIAL_STRINGS[:20])).map("".join),
    )


def _int_strategy(bits: int, signed: bool) -> st.SearchStrategy[int]:
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    interesting = {
        lo,
        lo + 1,
        -1,
        0,
        1,
        2,
        15,
        16,
        17,
        63,
        64,
        100,
        255,
        256,
        257,
        1000,
        1001,
        1024,
        4096,
        (1 << 31) - 1,
        1 << 31,
        (1 << 32) - 1,
        1 << 32,
        1 << 53,
        (1 << 63) - 1,
        1 << 63,
        (1 << 64) - 1,
        4 * 1024 * 1024,
        4 * 1024 * 1024 + 1,
        64 * 1024 * 1024,
        64 * 1024 * 1024 + 1,
        hi - 1,
        hi,
    }
    edges = sorted(v for v in interesting if lo <= v <= hi)
    return st.one_of(st.sampled_from(edges), st.integers(lo, hi))


_INT_TYPES: dict[int, tuple[int, bool]] = {
    FieldDescriptor.TYPE_INT32: (32, True),
    FieldDescriptor.TYPE_SINT32: (32, True),
    FieldDescriptor.TYPE_SFIXED32: (32, True),
    FieldDescriptor.TYPE_INT64: (64, True),
    FieldDescriptor.TYPE_SINT64: (64, True),
    FieldDescriptor.TYPE_SFIXED64: (64, True),
    FieldDescriptor.TYPE_UINT32: (32, False),
    FieldDescriptor.TYPE_FIXED32: (32, False),
    FieldDescriptor.TYPE_UINT64: (64, False),
    FieldDescriptor.TYPE_FIXED64: (64, False),
}


def enum_strategy(fd: FieldDescriptor) -> st.SearchStrategy[int]:
    """Declared numbers, and out-of-range ones (proto3 enums are open: any int32 goes on the wire)."""
    assert fd.enum_type is not None
    numbers = [v.number for v in fd.enum_type.values]
    beyond = sorted({max(numbers) + 1, min(numbers) - 1, 99, -(1 << 31), (1 << 31) - 1})
    return st.one_of(st.sampled_from(numbers), st.sampled_from(beyond), st.integers(-(1 << 31), (1 << 31) - 1))


def random_scalar(fd: FieldDescriptor) -> st.SearchStrategy[Any]:
    """Anything the wire format allows for one (non-message) value of ``fd``."""
    t = fd.type
    if t in _INT_TYPES:
        return _int_strategy(*_INT_TYPES[t])
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_STRING:
        return text_strategy()
    if t == FieldDescriptor.TYPE_BYTES:
        return st.one_of(st.binary(max_size=64), st.sampled_from([b"", b"\x00", b"\xff" * 1024]))
    if t == FieldDescriptor.TYPE_ENUM:
        return enum_strategy(fd)
    if t == FieldDescriptor.TYPE_FLOAT:
        return st.floats(width=32, allow_nan=True, allow_infinity=True)
    if t == FieldDescriptor.TYPE_DOUBLE:
        return st.floats(allow_nan=True, allow_infinity=True)
    raise TypeError(f"no scalar strategy for {fd.full_name} (type {t})")


def _is_map(fd: FieldDescriptor) -> bool:
    return fd.message_type is not None and bool(fd.message_type.GetOptions().map_entry)


# ---------------------------------------------------------------------------------------------------
# Valid-looking values, by field
# ---------------------------------------------------------------------------------------------------


def weighted(*choices: tuple[int, st.SearchStrategy[T]]) -> st.SearchStrategy[T]:
    """Draw from one of ``choices`` with probability proportional to its weight.

    (``st.one_of`` picks a branch about uniformly and folds duplicates, so it cannot weight.)
    """
    slots = [i for i, (w, _s) in enumerate(choices) for _ in range(w)]
    return st.sampled_from(slots).flatmap(lambda i: choices[i][1])


_DNS_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"
_fresh = itertools.count(1)


def _fresh_label(prefix: str) -> st.SearchStrategy[str]:
    """A label never drawn before in this process (Hypothesis repeats its simplest values a lot)."""
    return st.builds(lambda: f"{prefix}{next(_fresh)}")


#: new DNS labels: mostly never used before, sometimes short ones that may collide
FRESH_NAMES = weighted(
    (3, _fresh_label("fz-")), (1, st.text(_DNS_CHARS, min_size=1, max_size=8).map(lambda s: f"fz-{s}"))
)
DNS_LABELS = st.one_of(
    FRESH_NAMES,
    st.from_regex(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", fullmatch=True),
    st.sampled_from(["a", "0", "x" * 63, "web-1", "db-1"]),
)


def _traversals(pools: Pools) -> st.SearchStrategy[str]:
    """``web-1/../../canary``: names that escape the agent's per-VM folder if used as a path."""
    return st.tuples(
        live(lambda: pools.vm_names, ["web-1"]), st.integers(1, 5), live(lambda: pools.canary_names, ["canary"])
    ).map(lambda t: f"{t[0]}/{'../' * t[1]}{t[2]}")


def _vm_names(pools: Pools) -> st.SearchStrategy[str]:
    return weighted((6, live(lambda: pools.vm_names, ["web-1"])), (2, DNS_LABELS), (1, _traversals(pools)))


def _host_names(pools: Pools) -> st.SearchStrategy[str]:
    return weighted((4, live(lambda: pools.host_names, ["h1"])), (1, DNS_LABELS))


def _request_ids(pools: Pools) -> st.SearchStrategy[str]:
    fresh = _fresh_label("req-")
    reused = live(lambda: pools.request_ids + pools.operation_ids, ["r1"])
    return weighted((3, fresh), (1, st.just("")), (1, reused))


def _paths(pools_get: Callable[[], Sequence[str]], fallback: str) -> st.SearchStrategy[str]:
    return weighted(
        (4, live(pools_get, [fallback])),
        (
            1,
            st.sampled_from(
                ["testguest/missing.qcow2", "../images/x", "/etc/passwd", "testguest", "testguest/../testguest/vmlinux"]
            ),
        ),
    )


def _revision_field(pools: Pools, part: int) -> st.SearchStrategy[int]:
    current = live(lambda: [r[part] for r in pools.agent_revisions], [0])
    return weighted((3, current), (1, st.tuples(current, st.integers(-2, 2)).map(lambda t: max(t[0] + t[1], 0))))


def _labels(min_size: int = 0) -> st.SearchStrategy[dict[str, str]]:
    return st.dictionaries(
        st.sampled_from(["app", "tier", "env", "team.io/owner"]),
        st.sampled_from(["web", "db", "prod", "", "x" * 63]),
        min_size=min_size,
        max_size=3,
    )


def _crafted_tokens() -> st.SearchStrategy[str]:
    """Join tokens with the right envelope and a fuzzed body (valid prefix, base64, zlib, JSON)."""
    try:
        from clonebox_core.security.jointoken import TOKEN_PREFIX
    except ImportError:
        TOKEN_PREFIX = "cbj1."
    body = st.one_of(
        st.fixed_dictionaries(
            {"i": _TEXT, "s": _TEXT, "h": DNS_LABELS, "a": st.just("127.0.0.1:1")},
            optional={"ca": st.one_of(_TEXT, st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()))},
        ),
        st.lists(_TEXT, max_size=3),
        _TEXT,
        st.integers(),
    )
    packed = body.map(lambda b: zlib.compress(json.dumps(b).encode()))
    return st.one_of(
        packed.map(lambda raw: TOKEN_PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")),
        st.binary(max_size=64).map(lambda raw: TOKEN_PREFIX + base64.urlsafe_b64encode(raw).decode()),
        _TEXT.map(lambda t: TOKEN_PREFIX + t),
    )


def valid_hints(pools: Pools) -> dict[str, st.SearchStrategy[Any]]:
    """Plausible values by ``Message.field`` (more specific) or ``*.field``, for the valid flavour."""
    vm_names = _vm_names(pools)
    host_names = _host_names(pools)
    return {
        # names
        "VmSpec.name": weighted((4, FRESH_NAMES), (1, live(lambda: pools.vm_names, ["web-1"]))),
        "DiskSpec.name": st.sampled_from(["root", "data", "scratch", "logs", "swap"]),
        "Registration.name": weighted(
            (6, live(lambda: pools.connect_names[:1], ["fuzz-agent-0"])),
            (1, live(lambda: pools.connect_names, ["fuzz-agent-0"])),
            (1, host_names),
        ),
        "GetHostRequest.name": host_names,
        "CordonHostRequest.name": host_names,
        "UncordonHostRequest.name": host_names,
        "DrainHostRequest.name": host_names,
        "CreateVmRequest.host": weighted((2, st.just("")), (1, host_names)),
        "ListVmsRequest.host": st.one_of(st.just(""), host_names),
        "*.name": vm_names,
        "*.request_id": _request_ids(pools),
        "*.id": st.one_of(live(lambda: pools.operation_ids, ["0"]), st.just(""), st.uuids().map(lambda u: u.hex[:16])),
        # spec
        "VmSpec.vcpus": st.integers(1, 4),
        "VmSpec.memory_mib": st.integers(16, 1024),
        "VmSpec.disks": st.lists(st.just(None), min_size=1, max_size=2),  # element built from DiskSpec
        "VmSpec.shared_folders": st.lists(st.just(None), max_size=1),
        "VmSpec.labels": _labels(),
        "DiskSpec.base_image": weighted((2, st.just("")), (1, _paths(lambda: pools.images, "x.qcow2"))),
        "DiskSpec.size_mib": weighted((6, st.integers(1, 4096)), (1, st.just(0))),
        "KernelBoot.kernel": _paths(lambda: pools.kernels, "vmlinux"),
        "KernelBoot.initrd": st.one_of(st.just(""), _paths(lambda: pools.initrds, "initrd.img")),
        "KernelBoot.cmdline": st.sampled_from(["console=ttyS0 quiet", "", "root=/dev/vda1 ro"]),
        "NetworkSpec.mode": st.sampled_from([0, 1, 2]),
        "NetworkSpec.libvirt_network": st.sampled_from(["default", "", "default", "isolated"]),
        "SharedFolder.host_path": st.one_of(live(lambda: pools.shared_dirs, ["/tmp"]), st.just("/nonexistent/x")),
        "SharedFolder.tag": st.sampled_from(["share", "data", "x" * 31]),
        "CloudInit.user_data": st.sampled_from(["#cloud-config\n", "#cloud-config\npackages: [curl]\n", ""]),
        "CloudInit.meta_data": st.sampled_from(["", "instance-id: i-1\n"]),
        "CloudInit.network_config": st.sampled_from(["", "version: 2\n"]),
        # list / wait / watch
        "ListVmsRequest.labels": _labels(),
        "ListVmsRequest.state": st.sampled_from([0, 0, 3, 6, 9]),
        "*.page_size": st.one_of(st.integers(0, 5), st.sampled_from([0, 100, 1000])),
        "*.page_token": st.one_of(st.just(""), live(lambda: pools.page_tokens, [""])),
        "*.timeout_seconds": st.integers(0, 2),
        "*.after_revision": st.one_of(
            st.just(0), st.builds(lambda d: max(pools.fleet_revision + d, 0), st.integers(-3, 1))
        ),
        "Revision.epoch": _revision_field(pools, 0),
        "Revision.sequence": _revision_field(pools, 1),
        # agent registration (HostService.Connect)
        "Registration.address": st.sampled_from(["127.0.0.1:1", "[::1]:9", "localhost:1"]),
        "Resources.vcpus": st.integers(0, 64),
        "Resources.memory_mib": st.integers(0, 1 << 20),
        "Resources.disk_mib": st.integers(0, 1 << 24),
        "HypervisorInfo.uri": st.just("fake:///"),
        "HypervisorInfo.capabilities": st.lists(st.sampled_from(["events", "guest-agent"]), max_size=2),
        "Heartbeat.not_serving_reason": st.sampled_from(["", "libvirtd is not running"]),
        # PKI
        "CreateJoinTokenRequest.host": weighted((3, _fresh_label("victim-join-x")), (1, host_names)),
        "*.ttl_seconds": st.sampled_from([0, 0, 60, 59, 3600, 604800, 604801, 1]),
        "EnrollRequest.token": weighted((4, live(lambda: pools.join_tokens, ["cbj1.x"])), (1, _crafted_tokens())),
        "EnrollRequest.host": weighted((4, live(lambda: pools.token_hosts, ["victim-0"])), (1, host_names)),
        "*.csr_pem": live(lambda: pools.csrs, ["-----BEGIN CERTIFICATE REQUEST-----"]),
        "RevokeCertificateRequest.name": weighted((3, live(lambda: pools.cert_names, ["victim-0"])), (2, st.just(""))),
        "RevokeCertificateRequest.serial": weighted(
            (3, st.just("")),
            (2, live(lambda: pools.serials, ["1"])),
            (1, live(lambda: pools.serials, ["1"]).map(lambda s: "0x" + s.upper())),
        ),
        "ListCertificatesRequest.name": weighted(
            (2, st.just("")), (2, live(lambda: pools.cert_names, ["victim-0"])), (1, host_names)
        ),
    }


def _hint(hints: dict[str, st.SearchStrategy[Any]], fd: FieldDescriptor) -> st.SearchStrategy[Any] | None:
    owner = fd.containing_type.name if fd.containing_type is not None else ""
    specific = hints.get(f"{owner}.{fd.name}")
    return specific if specific is not None else hints.get(f"*.{fd.name}")


# ---------------------------------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------------------------------

#: how deep nested messages go before fields are left unset
MAX_DEPTH = 4
#: in the valid flavour, a field gets a random value about once in this many draws
VALID_WEIGHT = 25


def message_strategy(
    descriptor: Descriptor,
    mode: Mode,
    pools: Pools | None = None,
    *,
    depth: int = 0,
) -> st.SearchStrategy[Message]:
    """Messages of type ``descriptor``: random, or valid-looking (from ``pools``) with random fields mixed in."""
    pools = pools if pools is not None else Pools()
    hints = valid_hints(pools) if mode == "valid" else {}
    return _message(descriptor, mode, pools, hints, depth)


def _message(
    descriptor: Descriptor,
    mode: Mode,
    pools: Pools,
    hints: dict[str, st.SearchStrategy[Any]],
    depth: int,
) -> st.SearchStrategy[Message]:
    cls = message_class(descriptor)
    if depth > MAX_DEPTH:
        return st.just(cls())
    required: dict[str, st.SearchStrategy[Any]] = {}
    optional: dict[str, st.SearchStrategy[Any]] = {}
    oneofs: list[st.SearchStrategy[dict[str, Any]]] = []
    for oneof in descriptor.oneofs:
        members = [_field(fd, mode, pools, hints, depth).map(_as_field(fd.name)) for fd in oneof.fields]
        if mode == "valid":
            oneofs.append(st.one_of(*members, st.just({})) if depth > 0 else st.one_of(*members))
        else:
            oneofs.append(st.one_of(st.just({}), *members))
    for fd in descriptor.fields:
        if fd.containing_oneof is not None:
            continue
        strat = _field(fd, mode, pools, hints, depth)
        top_message = depth == 0 and fd.type == FieldDescriptor.TYPE_MESSAGE and not fd.is_repeated
        if mode == "valid" and (_hint(hints, fd) is not None or top_message):
            required[fd.name] = strat
        else:
            optional[fd.name] = strat
    body = st.fixed_dictionaries(required, optional=optional)

    def build(parts: tuple[dict[str, Any], ...]) -> Message:
        kwargs: dict[str, Any] = {}
        for part in parts:
            kwargs.update(part)
        return cls(**kwargs)

    return st.tuples(body, *oneofs).map(build)


def _message_type(fd: FieldDescriptor) -> Descriptor:
    """The message type of a message field."""
    assert fd.message_type is not None, fd.full_name
    return fd.message_type


def _as_field(name: str) -> Callable[[Any], dict[str, Any]]:
    """``v -> {name: v}``."""
    return lambda v: {name: v}


def _field(
    fd: FieldDescriptor,
    mode: Mode,
    pools: Pools,
    hints: dict[str, st.SearchStrategy[Any]],
    depth: int,
) -> st.SearchStrategy[Any]:
    """Strategy for the whole value of ``fd`` (a list for repeated fields, a dict for maps)."""
    rand = _random_field(fd, mode, pools, hints, depth)
    if mode != "valid":
        return rand
    hint = _hint(hints, fd)
    if hint is None:
        return rand
    if fd.is_repeated and fd.type == FieldDescriptor.TYPE_MESSAGE and not _is_map(fd):
        # the hint gives the list length; elements are valid-looking messages
        element = _message(_message_type(fd), mode, pools, hints, depth + 1)
        hint = hint.flatmap(lambda xs: st.lists(element, min_size=len(xs), max_size=len(xs)))
    return weighted((VALID_WEIGHT, hint), (1, rand))


def _random_field(
    fd: FieldDescriptor,
    mode: Mode,
    pools: Pools,
    hints: dict[str, st.SearchStrategy[Any]],
    depth: int,
) -> st.SearchStrategy[Any]:
    if _is_map(fd):
        entry = _message_type(fd)
        key_fd, value_fd = entry.fields_by_name["key"], entry.fields_by_name["value"]
        value = (
            _message(_message_type(value_fd), mode, pools, hints, depth + 1)
            if value_fd.type == FieldDescriptor.TYPE_MESSAGE
            else random_scalar(value_fd)
        )
        return st.dictionaries(random_scalar(key_fd), value, max_size=4)
    if fd.type == FieldDescriptor.TYPE_MESSAGE:
        element: st.SearchStrategy[Any] = st.deferred(
            lambda: _message(_message_type(fd), mode, pools, hints, depth + 1)
        )
    else:
        element = random_scalar(fd)
    if not fd.is_repeated:
        return element
    if depth <= 1:
        # include lists just past typical limits (MAX_DISKS is 16)
        return st.one_of(st.lists(element, max_size=3), st.lists(element, min_size=16, max_size=18))
    return st.lists(element, max_size=3)


def request_strategy(rpc: Rpc, pools: Pools) -> st.SearchStrategy[tuple[Mode, Message]]:
    """A (mode, request) pair for ``rpc``: valid-looking and random requests, mixed."""
    valid = message_strategy(rpc.input, "valid", pools)
    rand = message_strategy(rpc.input, "random", pools)
    return st.one_of(valid.map(lambda m: ("valid", m)), rand.map(lambda m: ("random", m)))
