"""qemu-ga from the tests' side: commands through ``virsh qemu-agent-command``, as an operator would.

Shared by the end-to-end suites on the tiny guest (they check what the agent did from inside the guest
without going through the agent).
"""

from __future__ import annotations

import base64
import json
import subprocess
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

#: the tiny guest boots under TCG: qemu-ga answers after ~10-20 s (more on a loaded machine)
GUEST_AGENT_SECONDS = 180.0

T = TypeVar("T")


def eventually(probe: Callable[[], T | None], seconds: float, what: str, interval: float = 0.2) -> T:
    """Poll ``probe`` until it returns something truthy, at most ``seconds``; fail naming ``what``."""
    deadline = time.monotonic() + seconds
    while True:
        found = probe()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {seconds:g} s")
        time.sleep(interval)


class GuestAgentError(Exception):
    """qemu-ga refused a command or did not answer."""


def qga(domain: str, command: str, arguments: Mapping[str, Any] | None = None, timeout: int = 10) -> Any:
    """One qemu-ga command through libvirt (``virsh qemu-agent-command``); its ``return`` value."""
    payload: dict[str, Any] = {"execute": command}
    if arguments is not None:
        payload["arguments"] = dict(arguments)
    r = subprocess.run(
        ["virsh", "-c", "qemu:///system", "qemu-agent-command", "--timeout", str(timeout), domain, json.dumps(payload)],
        capture_output=True,
        text=True,
        timeout=timeout + 30,
        check=False,
    )
    if r.returncode != 0:
        raise GuestAgentError(r.stderr.strip())
    return json.loads(r.stdout)["return"]


def wait_guest_agent(domain: str) -> float:
    """Wait until qemu-ga in the guest answers; seconds it took."""
    start = time.monotonic()

    def ping() -> bool:
        try:
            qga(domain, "guest-ping", timeout=5)
        except GuestAgentError:
            return False
        return True

    eventually(ping, GUEST_AGENT_SECONDS, f"qemu-ga of {domain} answering guest-ping", interval=1.0)
    return time.monotonic() - start


def guest_sh(domain: str, script: str, timeout: float = 30.0) -> tuple[int, bytes, bytes]:
    """Run ``/bin/sh -c script`` in the guest (guest-exec, then guest-exec-status until it exits)."""
    pid = qga(domain, "guest-exec", {"path": "/bin/sh", "arg": ["-c", script], "capture-output": True})["pid"]

    def status() -> dict[str, Any] | None:
        answer: dict[str, Any] = qga(domain, "guest-exec-status", {"pid": pid})
        return answer if answer.get("exited") else None

    done = eventually(status, timeout, f"guest command {script!r} in {domain}", interval=0.1)
    return (
        int(done.get("exitcode", -1)),
        base64.b64decode(done.get("out-data", "")),
        base64.b64decode(done.get("err-data", "")),
    )
