"""Product bugs the fuzzer found that are not fixed yet.

Each entry says which requests trigger it (those are not sent, so one known bug cannot hide new
ones, and a destructive one cannot wreck the fleet mid-run) or which outcome it produces (tolerated
and counted). ``test_known_bugs.py`` replays each entry's exact ``repro`` request as a strict xfail:
once the bug is fixed that test passes unexpectedly and fails the run, which is the cue to delete the
entry here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from google.protobuf.message import Message

from tests.fuzz.strategies import Pools, Rpc


@dataclass(frozen=True)
class KnownBug:
    """One open bug."""

    key: str
    #: ``Service.Method`` it was found on
    rpc: str
    #: where it comes from and what a fix looks like
    reason: str
    #: one request that triggers it (replayed by test_known_bugs.py), or how to make one from the pools
    repro: Message | Callable[[Pools], Message]
    #: requests that trigger it: not sent during fuzzing
    skip: Callable[[Sequence[Message]], bool] | None = None
    #: outcomes it produces, by (status code name, details): tolerated during fuzzing
    tolerate: Callable[[str, str], bool] | None = None
    #: applies to every RPC, not only ``rpc``
    any_rpc: bool = False


# Fixed (regression tests in tests/integration/test_security.py and test_known_bugs.py; README.md lists
# them): LIST_VMS_STATE_OUT_OF_RANGE, AGENT_VM_NAME_PATH_TRAVERSAL, ERROR_TRAILERS_TOO_LARGE,
# REGISTRATION_UINT64_OVERFLOW, ENROLL_BURNS_TOKEN_ON_BAD_CSR, and the ended-duplicate-session bug.
KNOWN_BUGS: list[KnownBug] = []


def known_skip(rpc: Rpc, messages: Sequence[Message]) -> str | None:
    """The key of the known bug that makes ``messages`` not worth sending, if any."""
    for bug in KNOWN_BUGS:
        if bug.skip is not None and bug.rpc == rpc.name and bug.skip(messages):
            return bug.key
    return None


def known_outcome(rpc: Rpc, code: str, details: str) -> str | None:
    """The key of the known bug an outcome is a symptom of, if any."""
    for bug in KNOWN_BUGS:
        if bug.tolerate is not None and (bug.any_rpc or bug.rpc == rpc.name) and bug.tolerate(code, details):
            return bug.key
    return None
