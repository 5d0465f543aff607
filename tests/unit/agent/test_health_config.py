"""Health settings of the agent config: defaults and clear errors naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from clonebox_agent.config import AgentConfig
from clonebox_core import errors
from clonebox_core.config import load_config


def test_defaults() -> None:
    c = AgentConfig()
    assert (c.probe_scripts_dir, c.probe_user, c.probe_concurrency) == ("", "nobody", 64)
    assert (c.health_restart_backoff_seconds, c.health_max_restarts, c.health_restart_window_seconds) == (10, 3, 600)


@pytest.mark.parametrize(
    ("line", "field", "words"),
    [
        ("probe_scripts_dir: probes", "probe_scripts_dir", "absolute path"),
        ("probe_user: root", "probe_user", "never run as root"),
        ("probe_user: 'a b'", "probe_user", "user name"),
        ("probe_concurrency: 0", "probe_concurrency", "greater than or equal to 1"),
        ("health_max_restarts: -1", "health_max_restarts", "greater than or equal to 0"),
        ("health_restart_window_seconds: 0", "health_restart_window_seconds", "greater than 0"),
    ],
)
def test_bad_values_name_the_field(tmp_path: Path, line: str, field: str, words: str) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(line + "\n")
    with pytest.raises(errors.InvalidArgument) as err:
        load_config(AgentConfig, path, "CLONEBOX_TEST_AGENT_")
    assert err.value.metadata["field"] == field and words in err.value.message
