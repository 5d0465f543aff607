"""Protocol fuzzing: generated requests for every RPC of every service, through real gRPC, against the
in-process fleet (controller + two agents on fake hypervisors, over mTLS). See README.md here.

``CLONEBOX_FUZZ_EXAMPLES`` sets the examples per service (default 500; ``make fuzz`` runs 10,000);
``CLONEBOX_FUZZ_SEED`` pins Hypothesis' seed to replay a run.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

# Hypothesis imports its random strategy lazily, inside the worker thread that draws, and pytest
# rewrites that import (hypothesis is a pytest plugin). CPython 3.11.7's ast.parse is not thread-safe
# (gh-106905: "AST constructor recursion depth mismatch" when another thread parses at the same time),
# so the import happens here, once, on the main thread.
import hypothesis.strategies._internal.random  # noqa: F401
import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from tests.fuzz.harness import FuzzHarness
from tests.fuzz.known_bugs import KNOWN_BUGS, known_skip
from tests.fuzz.strategies import (
    MODES,
    RPCS,
    RPCS_BY_SERVICE,
    TARGET_BY_PACKAGE,
    Pools,
    message_strategy,
    request_strategy,
    weighted,
)
from tests.integration.conftest import Fleet

EXAMPLES = int(os.environ.get("CLONEBOX_FUZZ_EXAMPLES", "500"))
SEED = os.environ.get("CLONEBOX_FUZZ_SEED")
#: seconds allowed for one example, hooks included (a hang fails the run instead of stalling it)
EXAMPLE_TIMEOUT = 120.0

pytestmark = [
    pytest.mark.fuzz,
    # pytest-timeout: generous per example, so a 10,000-example run is not cut short
    pytest.mark.timeout(max(300, EXAMPLES // 5 + 120)),
]


@pytest.mark.parametrize("service", sorted(RPCS_BY_SERVICE))
async def test_fuzz_service(fleet: Fleet, tmp_path: Path, service: str) -> None:
    rpcs = RPCS_BY_SERVICE[service]
    harness = FuzzHarness(fleet, tmp_path)
    await harness.start()
    try:
        if not await harness.endpoints.locate(rpcs[0]):
            pytest.fail(f"no in-process server lists {rpcs[0].service.full_name} through reflection")
        loop = asyncio.get_running_loop()
        by_name = {r.name: r for r in rpcs}
        requests = {r.name: request_strategy(r, harness.pools) for r in rpcs}
        # later messages of a client stream (HostService.Connect: heartbeats, repeated registrations)
        more = {
            r.name: st.lists(st.one_of(*(message_strategy(r.input, m, harness.pools) for m in MODES)), max_size=2)
            for r in rpcs
            if r.client_streaming
        }
        # mostly a caller the policy allows (to get past the guard), sometimes anyone
        callers = {
            r.name: weighted(
                (8, st.just(harness.endpoints.principals(r)[0])),
                (2, st.sampled_from(harness.endpoints.principals(r))),
            )
            for r in rpcs
        }

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            print_blob=True,
            phases=[Phase.explicit, Phase.generate, Phase.shrink],
            suppress_health_check=list(HealthCheck),
        )
        @given(data=st.data())
        def fuzz(data: st.DataObject) -> None:
            rpc = by_name[data.draw(st.sampled_from(sorted(by_name)), label="rpc")]
            mode, request = data.draw(requests[rpc.name], label="request")
            messages = [request]
            if rpc.client_streaming:
                messages += data.draw(more[rpc.name], label="more messages")
            principal = data.draw(callers[rpc.name], label="caller")
            skip = known_skip(rpc, messages) or ("protected certificate" if harness.protected(rpc, messages) else None)
            if skip is not None:
                harness.stats.known[skip] += 1
                return
            harness.stats.modes[mode] += 1
            asyncio.run_coroutine_threadsafe(harness.exercise(rpc, messages, principal), loop).result(EXAMPLE_TIMEOUT)

        if SEED is not None:
            fuzz = seed(int(SEED))(fuzz)
        # Hypothesis runs in a worker thread; every call runs on this loop, where the fleet lives
        await asyncio.to_thread(fuzz)
        print(f"\n{service}: {EXAMPLES} examples\n{harness.stats.summary()}")
    finally:
        await harness.close()


def test_registry_covers_every_rpc() -> None:
    """Every service is discovered and has a known server; known bugs name real RPCs."""
    assert {"AgentService", "HostService", "VmService", "OperationService"} <= set(RPCS_BY_SERVICE)
    for rpc in RPCS:
        assert rpc.service.file.package in TARGET_BY_PACKAGE, rpc.name
    assert [b.rpc for b in KNOWN_BUGS if b.rpc not in {r.name for r in RPCS}] == []


@pytest.mark.filterwarnings("ignore::hypothesis.errors.NonInteractiveExampleWarning")
@settings(max_examples=50, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_strategies_build_serializable_requests(data: st.DataObject) -> None:
    """Both flavours of every request serialize and parse back (the wire accepts them)."""
    rpc = data.draw(st.sampled_from(RPCS))
    mode, msg = data.draw(request_strategy(rpc, Pools()))
    assert mode in MODES
    assert rpc.request_class.FromString(msg.SerializeToString()) == msg
