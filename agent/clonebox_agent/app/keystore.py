"""
Per-VM SSH key pairs the agent generates when a version-2 spec names no key.

Layout: ``<state_dir>/ssh-keys/`` (0700) holds one ``<vm>.ed25519`` file (0600) per VM: the private key
in OpenSSH format. Only the public half leaves this module during a create (into the rendered
user-data); the private key leaves only through ``GetSshKey`` (over mTLS, to an authorized caller,
audited). A key is removed when its create fails and when its VM is deleted; ``sweep`` removes keys
of VMs that no longer exist (a crash between the two).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path

from clonebox_core.errors import FailedPrecondition, NotFound
from clonebox_core.names import check_dns_label
from clonebox_core.secret import Secret
from clonebox_core.secrets.providers import REASON_NOT_FOUND, read_private_file
from clonebox_core.secrets.sshkeys import generate_ed25519_keypair, write_private_key

SUFFIX = ".ed25519"


class KeyStore:
    """Generated SSH key pairs by VM name."""

    def __init__(self, folder: str | Path) -> None:
        """``folder`` is created 0700 on first use."""
        self.folder = Path(folder)

    def _path(self, vm: str) -> Path:
        # names become file names: never let one climb out of the folder
        check_dns_label("name", vm)
        return self.folder / f"{vm}{SUFFIX}"

    def generate(self, vm: str) -> str:
        """A new key pair for ``vm`` (replacing one a crashed create left); returns the public key line."""
        path = self._path(vm)
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.folder, 0o700)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        private, public = generate_ed25519_keypair(f"clonebox-{vm}")
        write_private_key(path, private)
        return public

    def read(self, vm: str) -> Secret:
        """The private key of ``vm``; NotFound SSH_KEY_NOT_FOUND when the agent generated none."""
        path = self._path(vm)
        try:
            data = read_private_file(path, what="generated SSH key")
        except FailedPrecondition as exc:
            if exc.reason != REASON_NOT_FOUND:
                raise  # there but unreadable or no longer private: say so, not "no key"
            raise NotFound(
                f"VM {vm} has no generated SSH key (its spec named its own keys, or it is not a version 2 VM)",
                reason="SSH_KEY_NOT_FOUND",
                metadata={"vm": vm},
            ) from None
        return Secret(data.decode())

    def has(self, vm: str) -> bool:
        """Whether a generated key exists for ``vm``."""
        return self._path(vm).exists()

    def remove(self, vm: str) -> str:
        """Delete ``vm``'s key; the removed path ('' if there was none)."""
        path = self._path(vm)
        try:
            path.unlink()
        except FileNotFoundError:
            return ""
        return str(path)

    def sweep(self, existing: Iterable[str]) -> list[str]:
        """Remove keys of VMs not in ``existing``; the removed paths."""
        keep = set(existing)
        removed: list[str] = []
        if not self.folder.is_dir():
            return removed
        for entry in self.folder.iterdir():
            if entry.name.endswith(SUFFIX) and entry.name[: -len(SUFFIX)] not in keep:
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
                    removed.append(str(entry))
        return removed
