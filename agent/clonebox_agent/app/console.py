"""
A VM's serial console log (``ReadConsole``): its last bytes, then, when following, what the guest writes next.

The hypervisor adapter keeps the log (virtlogd writes it for the libvirt adapter, the fake writes it
itself); the composition root tells the reader where, from the adapter's own naming
(``log_path(vm)``). A request names a VM, never a path, and only a VM the agent owns is read
(NotFound VM_NOT_FOUND otherwise).

Bounded: a request reads at most ``MAX_TAIL_BYTES`` of history, and one piece of at most
``chunk_bytes`` is in memory at a time. Following polls the file every ``poll_seconds``:

- the file may not exist yet (libvirt creates it when the domain first starts): a follower waits and
  reads the new file from its start;
- virtlogd rotates a full log (``console.log`` becomes ``console.log.0`` and a new file starts): what
  was written to the old file before the rename is sent first, then the new file from offset 0; a
  file truncated in place is read again from 0;
- the stream ends when the VM is deleted (its log goes with its folder; also checked every
  ``exists_every`` polls, so a VM re-made under the same name ends it too).

Offsets in the chunks are byte offsets in the file they were read from. A client whose stream broke
resumes with ``from_offset`` (the offset of its last chunk plus its length): the read starts at exactly
that byte instead of ``tail_bytes`` before the end, and is not bounded by ``MAX_TAIL_BYTES`` (the bytes
were written while the client was away, and it asked for all of them; memory stays bounded by the
chunk size). An offset beyond the end means the file is not the one the client was reading (replaced,
truncated, rotated, or the VM re-made under its name): the read starts at 0, and the first chunk's offset
tells the client so. A rotation while the client was away is not seen (offsets name bytes of one file):
what the old file held past ``from_offset`` is in ``console.log.0``, not in the stream.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import os
import stat
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from clonebox_agent.ports import Hypervisor
from clonebox_core.errors import FailedPrecondition, NotFound, Unavailable, invalid_field
from clonebox_core.names import check_dns_label

#: history sent when a request asks for none (``tail_bytes`` 0)
DEFAULT_TAIL_BYTES = 64 * 1024
#: the most history one request gets; a larger ``tail_bytes`` is cut to this
MAX_TAIL_BYTES = 1024 * 1024
#: the largest piece one message carries
CHUNK_BYTES = 64 * 1024
#: how often a follower looks for new bytes
POLL_SECONDS = 0.25
#: a follower asks the hypervisor whether the VM still exists every this many polls with nothing new
EXISTS_EVERY = 4


@dataclass(frozen=True)
class ConsoleChunk:
    """Bytes of the log and the offset of the first one in its file."""

    data: bytes
    offset: int


class _Change(enum.Enum):
    """What happened to the file at the log's path since the reader opened it."""

    SAME = "same"
    TRUNCATED = "truncated"
    REPLACED = "replaced"
    GONE = "gone"


def tail_bytes_of(requested: int) -> int:
    """The history to send for a request's ``tail_bytes`` (0: the default; cut to the maximum)."""
    if requested < 0:
        raise invalid_field("tail_bytes", f"{requested} is negative: give a byte count, or 0 for the default")
    return min(requested or DEFAULT_TAIL_BYTES, MAX_TAIL_BYTES)


def check_from_offset(from_offset: int | None) -> None:
    """Refuse a negative resume offset (INVALID_ARGUMENT naming ``from_offset``); None means no resume."""
    if from_offset is not None and from_offset < 0:
        raise invalid_field(
            "from_offset", f"{from_offset} is negative: give the offset of the next byte to read (0 or more)"
        )


class _LogFile:
    """The log file the reader has open and the offset of the next byte to send. Blocking: call in a thread."""

    def __init__(self, path: str, vm: str) -> None:
        self.path = path
        self.vm = vm
        self.fd: int | None = None
        self.ident: tuple[int, int] = (0, 0)
        self.offset = 0

    def open(self, tail: int | None, at: int | None = None) -> int | None:
        """
        Open the file now at the path, ``tail`` bytes before its end (None: at its start).

        ``at`` (a resume) opens it at exactly that offset instead, or at its start when the file is shorter
        (a file that short is not the one the offset was taken from). Returns the file's size at that
        moment, or None when there is no file (yet, or any more).
        """
        try:
            # never through a link, never blocking on something that is not a file
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError as exc:
            why = "it is a symbolic link" if exc.errno == errno.ELOOP else exc.strerror or str(exc)
            raise self._unreadable(why) from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise self._unreadable("it is not a regular file")
        self.fd, self.ident = fd, (info.st_dev, info.st_ino)
        if at is not None:
            self.offset = at if at <= info.st_size else 0
        else:
            self.offset = 0 if tail is None else max(0, info.st_size - tail)
        return info.st_size

    def read(self, limit: int) -> ConsoleChunk | None:
        """The next at most ``limit`` bytes (None at the end, or with no file open)."""
        if self.fd is None or limit <= 0:
            return None
        data = os.pread(self.fd, limit, self.offset)
        if not data:
            return None
        chunk = ConsoleChunk(data, self.offset)
        self.offset += len(data)
        return chunk

    def change(self) -> _Change:
        """Compare the open file with what the path names now."""
        assert self.fd is not None
        try:
            now = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return _Change.GONE
        if (now.st_dev, now.st_ino) != self.ident:
            return _Change.REPLACED
        if os.fstat(self.fd).st_size < self.offset:
            return _Change.TRUNCATED
        return _Change.SAME

    def close(self) -> None:
        """Close the file (the reader opens the one at the path again on its next poll)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def _unreadable(self, why: str) -> FailedPrecondition:
        return FailedPrecondition(
            f"the console log of VM {self.vm} cannot be read ({self.path}): {why}",
            reason="CONSOLE_LOG_UNREADABLE",
            metadata={"vm": self.vm},
        )


class ConsoleReader:
    """Reads VMs' serial console logs for ``ReadConsole``."""

    def __init__(
        self,
        hypervisor: Hypervisor,
        *,
        poll_seconds: float = POLL_SECONDS,
        chunk_bytes: int = CHUNK_BYTES,
        exists_every: int = EXISTS_EVERY,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """
        The adapter says where it keeps a VM's log (``Hypervisor.console_log_path``).

        ``sleep`` waits between polls (tests pass one that acts instead of waiting).
        """
        self._hv = hypervisor
        self._poll = poll_seconds
        self._chunk = max(1, min(chunk_bytes, CHUNK_BYTES))
        self._exists_every = max(1, exists_every)
        self._sleep = sleep

    async def read(
        self, name: str, *, tail_bytes: int = 0, follow: bool = False, from_offset: int | None = None
    ) -> AsyncGenerator[ConsoleChunk, None]:
        """
        The last ``tail_bytes`` of ``name``'s log in chunks, then with ``follow`` what is written next.

        ``tail_bytes`` 0 means ``DEFAULT_TAIL_BYTES``. ``from_offset`` (a resume) starts at exactly that
        byte instead, or at 0 when it is beyond the end of the file. A follow ends when the VM is deleted or
        the caller stops. Without ``follow`` the stream ends at the end the file had when the request came
        (an empty stream when there is no log yet).
        """
        check_dns_label("name", name)
        tail = tail_bytes_of(tail_bytes)
        check_from_offset(from_offset)
        record = await self._hv.get(name)  # NotFound VM_NOT_FOUND for a VM this agent does not own
        path = self._hv.console_log_path(name)
        if path is None:
            raise FailedPrecondition(
                f"VM {name}: this agent's hypervisor keeps no console logs",
                reason="CONSOLE_LOG_UNAVAILABLE",
                metadata={"vm": name},
            )
        log = _LogFile(path, name)
        try:
            end = await asyncio.to_thread(log.open, tail, from_offset)
            if not follow:
                while end is not None and (chunk := await self._next(log, end - log.offset)) is not None:
                    yield chunk
                return
            async for chunk in self._follow(log, record.uuid):
                yield chunk
        finally:
            log.close()

    async def _next(self, log: _LogFile, limit: int | None = None) -> ConsoleChunk | None:
        size = self._chunk if limit is None else min(self._chunk, limit)
        return await asyncio.to_thread(log.read, size)

    async def _follow(self, log: _LogFile, vm_uuid: str) -> AsyncIterator[ConsoleChunk]:
        polls = 0
        while True:
            check_now = False
            if log.fd is None:
                # no file yet, or the one before it was rotated away: the next one is read from its start
                await asyncio.to_thread(log.open, None)
            if log.fd is not None:
                chunk = await self._next(log)
                if chunk is not None:
                    yield chunk
                    continue
                change = await asyncio.to_thread(log.change)
                if change is _Change.TRUNCATED:
                    log.offset = 0
                    continue
                if change is not _Change.SAME:
                    # the end was reached above; what was written before the rename or unlink comes first
                    while (chunk := await self._next(log)) is not None:
                        yield chunk
                    log.close()
                    check_now = True  # rotated, or the VM's folder went with the VM
            polls += 1
            if (check_now or polls % self._exists_every == 0) and not await self._exists(log.vm, vm_uuid):
                return
            await self._sleep(self._poll)

    async def _exists(self, name: str, vm_uuid: str) -> bool:
        """False once the VM is gone (or a new VM has its name); True while the hypervisor cannot tell."""
        try:
            return (await self._hv.get(name)).uuid == vm_uuid
        except NotFound:
            return False
        except Unavailable:
            return True  # libvirtd restarting: the log is still there to follow
