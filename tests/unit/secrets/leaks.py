"""One check shared by the secrets tests: a value never shows up in what an object prints or carries."""

from __future__ import annotations

from collections.abc import Iterable

from clonebox_core.errors import CloneboxError


def texts_of(thing: object) -> list[str]:
    """What ``thing`` shows: str, repr, an exception's args and cause, an error's metadata and reason."""
    texts = [str(thing), repr(thing)]
    if isinstance(thing, BaseException):
        texts += [repr(a) for a in thing.args]
        chained = thing.__cause__ or thing.__context__
        if chained is not None:
            texts += [str(chained), repr(chained)]
    if isinstance(thing, CloneboxError):
        texts += [repr(thing.metadata), thing.reason]
    return texts


def assert_hidden(markers: Iterable[str], *things: object) -> None:
    """None of ``things`` shows any of ``markers``."""
    wanted = tuple(markers)
    for thing in things:
        for text in texts_of(thing):
            for marker in wanted:
                assert marker not in text, text
