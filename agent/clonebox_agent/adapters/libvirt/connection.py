"""
One libvirt connection per adapter, reopened after libvirtd restarts, with call counting and tracing.

Every libvirt call made through a ``Counted`` object is counted by name and runs inside a CLIENT span
named after the libvirt C API (``virDomainDefineXML``, ``virConnectGetAllDomainStats``...) with the
domain, pool or volume name as attributes. The spans are children of whatever span is current on the
calling thread: the adapter runs its worker functions in a copy of the caller's context.

libvirt delivers events, keepalives and close notifications only through a registered event loop
implementation; it must be registered once per process before the first connection opens, and some
thread must run it. ``ensure_event_loop`` does both exactly once.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import libvirt
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from clonebox_agent.adapters.libvirt.errors import unavailable

log = logging.getLogger(__name__)
tracer = trace.get_tracer("clonebox_agent.adapters.libvirt")

_event_lock = threading.Lock()
# the one libvirt event thread of this process (a list, so no ``global`` statement is needed)
_event_threads: list[threading.Thread] = []


def _ignore_error(_ctx: object, _err: object) -> None:
    # libvirt prints every error to stderr by default; the adapter reports them as exceptions instead
    return None


def ensure_event_loop() -> None:
    """Register libvirt's default event loop and start its thread (once per process)."""
    with _event_lock:
        if _event_threads:
            return
        libvirt.registerErrorHandler(_ignore_error, None)
        libvirt.virEventRegisterDefaultImpl()
        thread = threading.Thread(target=_run_event_loop, name="libvirt-events", daemon=True)
        thread.start()
        _event_threads.append(thread)


def _run_event_loop() -> None:
    while True:
        try:
            libvirt.virEventRunDefaultImpl()
        except Exception:
            log.exception("libvirt event loop iteration failed")


# Methods that read fields of the Python object without a libvirt round trip
_LOCAL_METHODS = frozenset({"name", "UUIDString", "UUID", "ID", "connect", "getName"})
_WRAPPED_TYPES: tuple[type, ...] = tuple(
    t
    for t in (
        getattr(libvirt, n, None) for n in ("virDomain", "virStoragePool", "virStorageVol", "virNetwork", "virStream")
    )
    if isinstance(t, type)
)


# C API names where the binding's method name does not give it by the prefix rule below
_C_NAMES: dict[tuple[str, str], str] = {
    ("virConnect", "lookupByName"): "virDomainLookupByName",
    ("virConnect", "lookupByUUIDString"): "virDomainLookupByUUIDString",
    ("virConnect", "defineXML"): "virDomainDefineXML",
    ("virConnect", "createXML"): "virDomainCreateXML",
    ("virConnect", "storagePoolLookupByName"): "virStoragePoolLookupByName",
    ("virConnect", "storagePoolDefineXML"): "virStoragePoolDefineXML",
    ("virConnect", "networkLookupByName"): "virNetworkLookupByName",
    ("virConnect", "networkDefineXML"): "virNetworkDefineXML",
    ("virConnect", "newStream"): "virStreamNew",
    ("virConnect", "getInfo"): "virNodeGetInfo",
    ("virConnect", "close"): "virConnectClose",
    ("virDomain", "state"): "virDomainGetState",
    ("virDomain", "info"): "virDomainGetInfo",
    ("virDomain", "XMLDesc"): "virDomainGetXMLDesc",
    ("virDomain", "metadata"): "virDomainGetMetadata",
    ("virNetwork", "XMLDesc"): "virNetworkGetXMLDesc",
    ("virStoragePool", "XMLDesc"): "virStoragePoolGetXMLDesc",
    ("virStoragePool", "info"): "virStoragePoolGetInfo",
    ("virStoragePool", "createXML"): "virStorageVolCreateXML",
    ("virStoragePool", "storageVolLookupByName"): "virStorageVolLookupByName",
    ("virStorageVol", "path"): "virStorageVolGetPath",
    ("virStorageVol", "info"): "virStorageVolGetInfo",
}
# span attribute for the name of what a C API function acts on, by its prefix
_NAME_ATTRIBUTE = {
    "virDomain": "libvirt.domain",
    "virStoragePool": "libvirt.pool",
    "virStorageVol": "libvirt.volume",
    "virNetwork": "libvirt.network",
}


def c_api_name(kind: str, method: str) -> str:
    """The libvirt C function behind method ``method`` of binding class ``kind``.

    ``("virConnect", "listAllDomains")`` -> ``virConnectListAllDomains``.
    """
    return _C_NAMES.get((kind, method)) or kind + method[:1].upper() + method[1:]


def _target_attributes(kind: str, obj: Any, api: str, args: tuple[Any, ...]) -> dict[str, str]:
    # only names the binding holds locally or the caller passed: never an extra libvirt round trip
    if kind in _NAME_ATTRIBUTE and kind == api[: len(kind)]:
        return {_NAME_ATTRIBUTE[kind]: str(obj.name())}
    if api.endswith("LookupByName") and args and isinstance(args[0], str):
        for prefix, attribute in _NAME_ATTRIBUTE.items():
            if api.startswith(prefix):
                return {attribute: args[0]}
    if kind == "virStoragePool" and api.startswith("virStorageVol"):
        return {"libvirt.pool": str(obj.name())}
    return {}


def traced_call(kind: str, obj: Any, method: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``fn`` (the binding's ``obj.method``) inside a span named after its C API function."""
    api = c_api_name(kind, method)
    with tracer.start_as_current_span(api, kind=SpanKind.CLIENT) as span:
        recording = span.is_recording()
        named = False
        if recording:
            attributes = _target_attributes(kind, obj, api, args)
            named = bool(attributes)
            span.set_attributes({"rpc.system": "libvirt", **attributes})
        result = fn(*args, **kwargs)
        if recording and not named and type(result).__name__ == "virDomain":
            span.set_attribute("libvirt.domain", str(result.name()))  # defineXML: the name is in the XML
        return result


class Counted:
    """
    A libvirt object whose method calls are counted by name (objects it returns are counted too).

    Tests use the counts to prove ``list`` makes a constant number of calls; operators can export them.
    Attribute access (``_o``) passes through, so a wrapped object can be handed to libvirt methods.
    """

    __slots__ = ("_counter", "_obj")

    def __init__(self, obj: Any, counter: Counter[str]) -> None:
        self._obj = obj
        self._counter = counter

    @property
    def unwrapped(self) -> Any:
        """The libvirt object itself."""
        return self._obj

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._obj, name)
        if name in _LOCAL_METHODS or name.startswith("_") or not callable(attr):
            return attr
        counter = self._counter
        obj = self._obj

        def call(*args: Any, **kwargs: Any) -> Any:
            counter[name] += 1
            return _wrap(traced_call(type(obj).__name__, obj, name, attr, *args, **kwargs), counter)

        return call


def _wrap(value: Any, counter: Counter[str]) -> Any:
    if isinstance(value, _WRAPPED_TYPES):
        return Counted(value, counter)
    if isinstance(value, list):
        return [_wrap(v, counter) for v in value]
    if isinstance(value, tuple):
        return tuple(_wrap(v, counter) for v in value)
    return value


class Connection:
    """
    A lazily (re)opened connection to ``uri``.

    ``get()`` returns the live connection, opening a new one when there is none or libvirt closed it
    (libvirtd restarted); ``on_open`` then re-registers whatever the old connection had (events).
    Blocking: call from worker threads only.
    """

    def __init__(self, uri: str, counter: Counter[str], on_open: Callable[[Any], None]) -> None:
        self.uri = uri
        self._counter = counter
        self._on_open = on_open
        self._lock = threading.RLock()
        self._raw: Any = None
        self._wrapped: Any = None
        #: bumped on each (re)connect, so callers can tell a fresh connection from the old one
        self.generation = 0
        self._closed_generation = -1

    def get(self) -> Any:
        """Return the live connection (a ``Counted`` virConnect); Unavailable when libvirtd is unreachable."""
        with self._lock:
            if self._raw is not None and self._closed_generation != self.generation and self._alive(self._raw):
                return self._wrapped
            self._drop_locked()
            try:
                with tracer.start_as_current_span("virConnectOpen", kind=SpanKind.CLIENT) as span:
                    span.set_attribute("libvirt.uri", self.uri)
                    raw = libvirt.open(self.uri)
            except libvirt.libvirtError as exc:
                raise unavailable(self.uri, exc) from None
            self._raw = raw
            self._wrapped = Counted(raw, self._counter)
            self.generation += 1
            with contextlib.suppress(libvirt.libvirtError):
                # keepalive makes a dead libvirtd show up as a closed connection within ~15 s even when
                # we are idle; the test driver has no keepalive
                raw.setKeepAlive(5, 3)
            with contextlib.suppress(libvirt.libvirtError):
                raw.registerCloseCallback(self._closed, self.generation)
            try:
                self._on_open(self._wrapped)
            except BaseException:
                self._drop_locked()
                raise
            return self._wrapped

    @staticmethod
    def _alive(raw: Any) -> bool:
        try:
            return bool(raw.isAlive())
        except libvirt.libvirtError:
            return False

    def _closed(self, _conn: Any, reason: int, generation: int) -> None:
        # runs on the libvirt event thread when libvirtd goes away
        log.warning("libvirt connection to %s closed (reason %s); will reconnect", self.uri, reason)
        # no lock here: libvirt holds its close-callback lock while calling us, and a worker holding
        # self._lock may be waiting for that lock in unregisterCloseCallback
        self._closed_generation = generation

    def drop(self) -> None:
        """Forget the connection after a connection error; the next ``get`` reconnects."""
        with self._lock:
            self._drop_locked()

    def _drop_locked(self) -> None:
        raw, self._raw, self._wrapped = self._raw, None, None
        if raw is None:
            return
        with contextlib.suppress(libvirt.libvirtError):
            raw.unregisterCloseCallback()
        with contextlib.suppress(libvirt.libvirtError):
            raw.close()

    @property
    def current(self) -> Any:
        """The open connection or None (never connects)."""
        with self._lock:
            return self._wrapped
