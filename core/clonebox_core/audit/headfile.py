"""The append-only file beside the controller that witnesses the chain head outside the database."""

from __future__ import annotations

import os
from pathlib import Path

from clonebox_core.audit.chain import Head


class HeadFile:
    """Lines of ``SEQ MAC_HEX``, appended after every commit that extends the chain.

    Several controller processes may share the file: each line is one ``O_APPEND`` write, which the
    kernel keeps whole. Readers take the highest sequence number, so lines may arrive out of order.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, head: Head) -> None:
        """Record ``head`` (durably: the file is fsynced)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, f"{head.seq} {head.mac.hex()}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def latest(self) -> Head | None:
        """The highest head recorded (None when the file is missing or empty); torn lines are skipped."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        best: Head | None = None
        for line in text.splitlines():
            parts = line.split()
            if len(parts) != 2 or not parts[0].isdigit():
                continue
            try:
                head = Head(int(parts[0]), bytes.fromhex(parts[1]))
            except ValueError:
                continue
            if len(head.mac) == 32 and (best is None or head.seq > best.seq):
                best = head
        return best
