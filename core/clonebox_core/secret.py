"""``Secret``: a string that never shows itself by accident.

A Secret prints as ``***`` in ``repr``/``str``/f-strings/``%``-formatting, so error messages, log lines
(structlog and stdlib), span attributes and JSON documents built from it carry the mask, never the value.
The value comes out only through an explicit :meth:`Secret.reveal`, used where it must be (building the
cloud-init seed ISO, writing the wire format, storing it). Equality and hashing work on the value without
exposing it; a Secret refuses to be pickled so that it is never persisted by accident.

Serialising: ``json.dumps(doc, default=json_default)`` or ``json.dumps(redacted(doc))``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from collections.abc import Mapping
from typing import Any, NoReturn, final

#: what a Secret shows instead of its value
MASK = "***"


@final
class Secret:
    """An immutable secret string; the value only through :meth:`reveal`."""

    __slots__ = ("_value",)
    _value: str

    def __init__(self, value: str | Secret) -> None:
        if isinstance(value, Secret):
            value = value._value
        if not isinstance(value, str):
            raise TypeError(f"Secret wraps a str, not {type(value).__name__}")
        object.__setattr__(self, "_value", value)

    def reveal(self) -> str:
        """The value. Call it only where the value must be used, never to log or show it."""
        return self._value

    def __repr__(self) -> str:
        return f"Secret({MASK!r})"

    def __str__(self) -> str:
        return MASK

    def __format__(self, format_spec: str) -> str:
        return format(MASK, format_spec)

    def __bool__(self) -> bool:
        # whether there is a value at all is not the secret (``if spec.cloud_init.user_data:``)
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        # a digest, so hash(secret) says nothing about hash(value) of a guessed plain string
        return hash(("clonebox.Secret", hashlib.sha256(self._value.encode()).digest()))

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError("Secret is immutable")

    def __delattr__(self, name: str) -> NoReturn:
        raise AttributeError("Secret is immutable")

    # immutable: copies are the same object (dataclasses.asdict deep-copies field values)
    def __copy__(self) -> Secret:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Secret:
        return self

    def __reduce_ex__(self, protocol: object) -> NoReturn:
        raise TypeError("a Secret cannot be pickled (persist it explicitly with reveal(), where that is intended)")

    def __reduce__(self) -> NoReturn:
        raise TypeError("a Secret cannot be pickled (persist it explicitly with reveal(), where that is intended)")

    def __getstate__(self) -> NoReturn:
        raise TypeError("a Secret cannot be pickled")


def json_default(value: object) -> Any:
    """``json.dumps(..., default=json_default)``: Secrets become the mask; other unknown types a TypeError."""
    if isinstance(value, Secret):
        return MASK
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def redacted(value: Any) -> Any:
    """A copy of ``value`` (mappings, lists, tuples, sets, dataclasses, nested) with every Secret masked."""
    if isinstance(value, Secret):
        return MASK
    if isinstance(value, str | bytes | int | float | bool | type(None)):
        return value
    if isinstance(value, Mapping):
        return {k: redacted(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(redacted(v) for v in value)
    if isinstance(value, list | set | frozenset):
        return type(value)(redacted(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: redacted(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return value
