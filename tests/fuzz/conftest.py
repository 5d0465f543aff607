"""Fuzz-suite plumbing: the ``fuzz`` marker and the same in-process fleet the integration tests use."""

from __future__ import annotations

import pytest

# the fixture lives with the integration tests; re-exported here so the fuzz tests get the same fleet
from tests.integration.conftest import fleet

__all__ = ["fleet"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "fuzz: protocol fuzzing of every RPC (CLONEBOX_FUZZ_EXAMPLES per service, default 500)"
    )
