"""Sizes in MiB as people write them (``512``, ``"256MiB"``, ``"1.5GiB"``), parsed and printed exactly.

Kept apart from the spec loader so that printing a size never imports pydantic (CLI start-up time).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation


def _brief(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:37] + "...")
    if isinstance(value, int | float):
        return str(value)
    return f"a {type(value).__name__}"


_KIB_PER_UNIT = {"K": 1, "M": 1024, "G": 1024**2, "T": 1024**3}
# a decimal number, then an optional binary unit (K, Ki, KiB; case-insensitive prefix letter)
_SIZE = re.compile(r"^\s*(\d{1,16}(?:\.\d{1,9})?)\s*(?:([KMGTkmgt])(i?[Bb]?|I[Bb]?)?)?\s*$")
_AMBIGUOUS = re.compile(r"^\s*\d+(?:\.\d+)?\s*[KMGTkmgt][Bb]\s*$")


def parse_size(value: object) -> int:
    """
    Parse a size in whole MiB from a YAML value: an int (MiB) or a string with a binary unit.

    Accepts ``512``, ``"512"``, ``"256MiB"``, ``"1GiB"``, ``"1.5G"``, ``"2048KiB"``, ``"1TiB"``. Raises
    ``ValueError`` with a message that quotes the input and says how to fix it.
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"{_brief(value)} is not a size: use a whole number of MiB or a string like '512MiB'")
    if isinstance(value, int):
        return value
    if _AMBIGUOUS.match(value):
        raise ValueError(
            f"{value!r} is ambiguous (decimal or binary?): write the binary unit, e.g. "
            f"'{value.strip()[:-1].rstrip()}iB'"
        )
    m = _SIZE.match(value)
    if m is None:
        raise ValueError(
            f"{value!r} is not a size: use a whole number of MiB or a number with a unit "
            "(KiB, MiB, GiB, TiB), e.g. '512MiB'"
        )
    number, unit = m.group(1), m.group(2)
    try:
        kib = Decimal(number) * _KIB_PER_UNIT[(unit or "M").upper()]
    except InvalidOperation:  # pragma: no cover - the regex admits only plain decimals
        raise ValueError(f"{value!r} is not a size") from None
    mib, rest = divmod(kib, 1024)
    if rest:
        raise ValueError(f"{value!r} is not a whole number of MiB: round it, e.g. to '{int(mib) + 1}MiB'")
    return int(mib)


def format_size(mib: int) -> str:
    """Spell ``mib`` exactly and shortest: ``1GiB``, ``1536MiB``, ``2TiB``; ``parse_size`` reverses it."""
    for unit, factor in (("TiB", 1024 * 1024), ("GiB", 1024)):
        if mib and mib % factor == 0:
            return f"{mib // factor}{unit}"
    return f"{mib}MiB"


_MS_PER_UNIT = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 7 * 86_400_000}
_DURATION = re.compile(r"^\s*(\d{1,9})\s*(ms|s|m|h|d|w)\s*$")


def parse_duration_ms(value: object) -> int:
    """
    Parse a duration in whole milliseconds.

    Accepts ``"500ms"``, ``"10s"``, ``"5m"``, ``"2h"``, ``"7d"``, ``"1w"``, or an int (seconds). Raises
    ``ValueError`` quoting the input and saying how to fix it.
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"{_brief(value)} is not a duration: use a number with a unit, e.g. '10s' or '500ms'")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{value} is negative: a duration is 0 or more")
        return value * 1000
    m = _DURATION.match(value)
    if m is None:
        raise ValueError(f"{_brief(value)} is not a duration: use a whole number with ms, s, m, h, d or w, e.g. '10s'")
    return int(m.group(1)) * _MS_PER_UNIT[m.group(2)]


def format_duration_ms(ms: int) -> str:
    """Spell ``ms`` exactly and shortest: ``500ms``, ``10s``, ``5m``; ``parse_duration_ms`` reverses it."""
    for unit in ("w", "d", "h", "m", "s"):
        factor = _MS_PER_UNIT[unit]
        if ms and ms % factor == 0:
            return f"{ms // factor}{unit}"
    return f"{ms}ms"
