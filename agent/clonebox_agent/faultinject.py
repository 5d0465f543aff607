"""The one fault-injection hook of a running agent, for fault tests. Inert unless explicitly enabled.

Set ``CLONEBOX_FAULT_INJECTION`` in the agent's environment to ``STEP=ACTION[,STEP=ACTION…]``, where
STEP is a named step (``create:folder``, ``create:disks``, ``create:seed``, ``create:define``,
``create:start``, ``create:commit``, ``update:stopped``, ``update:redefined``, ``update:started``,
``update:commit``, ``create_volume:file``, …) and ACTION is ``kill`` (the agent SIGKILLs itself when it
reaches the step: a crash at exactly that point) or ``error`` (the step raises INTERNAL
``INJECTED_FAULT``). Unset or empty: no hook is installed at all, and nothing in the agent's code paths
changes. The agent logs a warning at start when a hook is active.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable, Mapping

from clonebox_core.errors import Internal, InvalidArgument

ENV = "CLONEBOX_FAULT_INJECTION"
ACTIONS = ("kill", "error")

log = logging.getLogger(__name__)


def parse(text: str) -> dict[str, str]:
    """``"create:disks=kill,create:seed=error"`` -> {step: action}; InvalidArgument naming the bad part."""
    plan: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        step, sep, action = part.partition("=")
        if not sep or not step or action not in ACTIONS:
            raise InvalidArgument(
                f"{ENV}: {part!r} is not STEP=ACTION with ACTION one of {', '.join(ACTIONS)}",
                reason="INVALID_FAULT_INJECTION",
                metadata={"field": ENV},
            )
        plan[step] = action
    return plan


def hook_from_env(env: Mapping[str, str] = os.environ) -> Callable[[str], None] | None:
    """The step hook ``CLONEBOX_FAULT_INJECTION`` asks for (None when it is unset or empty)."""
    plan = parse(env.get(ENV, ""))
    if not plan:
        return None
    log.warning("fault injection is ACTIVE (%s=%s): for tests only", ENV, env.get(ENV))

    def hook(step: str) -> None:
        action = plan.get(step)
        if action == "kill":
            log.warning("fault injection: SIGKILL at %s", step)
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "error":
            raise Internal(f"injected fault at {step}", reason="INJECTED_FAULT")

    return hook
