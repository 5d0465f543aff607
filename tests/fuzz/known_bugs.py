"""Product bugs the fuzzer found and that are not fixed yet.

The fuzz tests do not send requests matching an entry (so one known bug does not hide new ones);
``test_known_bugs.py`` replays each entry's exact request as a strict xfail, so a fix turns it into
an unexpected pass: then delete the entry here and the xfail there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from google.protobuf.message import Message

from tests.fuzz.strategies import Rpc


@dataclass(frozen=True)
class KnownBug:
    """One open bug: which requests trigger it, and why."""

    key: str
    rpc: str
    matches: Callable[[Sequence[Message]], bool]
    reason: str


KNOWN_BUGS: list[KnownBug] = []


def known_bug(rpc: Rpc, messages: Sequence[Message]) -> str | None:
    """The key of the known bug ``messages`` would trigger, if any."""
    for bug in KNOWN_BUGS:
        if bug.rpc == rpc.name and bug.matches(messages):
            return bug.key
    return None
