"""The agent's console log reader on the fake hypervisor's real log files (``ReadConsole`` without gRPC).

Following is driven by a scripted ``sleep``: each poll runs the test's next step instead of waiting, so
nothing here depends on the clock; every wait is bounded by ``asyncio.wait_for``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from clonebox_agent.adapters.common import vm_dir
from clonebox_agent.adapters.fake import FakeHypervisor
from clonebox_agent.app import console as console_module
from clonebox_agent.app.console import CHUNK_BYTES, DEFAULT_TAIL_BYTES, MAX_TAIL_BYTES, ConsoleChunk, ConsoleReader
from clonebox_agent.app.service import AgentService
from clonebox_agent.journal.store import Journal
from clonebox_agent.ports import Capability
from clonebox_core import errors
from clonebox_core.model import DiskSpec, Resources, VmSpec

BOOTED = b"fake console: booted\n"  # what the fake writes when it starts a VM
BOUND = 10.0  # seconds any single wait here may take before the test fails


@dataclass
class Env:
    fake: FakeHypervisor
    svc: AgentService

    def log(self, vm: str) -> Path:
        path = self.fake.console_log_path(vm)
        assert path is not None
        return Path(path)

    def reader(self, **kw: Any) -> ConsoleReader:
        return ConsoleReader(self.fake, **kw)

    async def create(self, name: str, *, start: bool = True) -> None:
        spec = VmSpec(name=name, vcpus=1, memory_mib=128, disks=(DiskSpec("root", size_mib=16),))
        await self.svc.create(spec, request_id="", start=start)


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    fake = FakeHypervisor(host_name="h", storage_dir=tmp_path / "storage", shutdown_delay=0.01)
    journal = Journal(tmp_path / "j.db")
    svc = AgentService("h", fake, journal, reserve=Resources(0, 0, 0), stop_timeout_seconds=1)
    await svc.start()
    yield Env(fake, svc)
    await svc.close()
    journal.close()


class Script:
    """Stands in for the reader's sleep: each poll runs the next step (a callable, maybe async)."""

    def __init__(self, *steps: Callable[[], object]) -> None:
        self.steps = list(steps)
        self.polls = 0

    async def __call__(self, _seconds: float) -> None:
        self.polls += 1
        if self.steps:
            result = self.steps.pop(0)()
            if inspect.isawaitable(result):
                await result
        else:
            await asyncio.sleep(0.01)  # nothing left to do: the test's bound decides


async def collect(chunks: AsyncGenerator[ConsoleChunk, None], count: int | None = None) -> list[ConsoleChunk]:
    """The chunks until ``count`` arrived (or, with None, until the stream ends by itself)."""
    out: list[ConsoleChunk] = []

    async def run() -> None:
        async for chunk in chunks:
            out.append(chunk)
            if count is not None and len(out) == count:
                return

    try:
        await asyncio.wait_for(run(), BOUND)
    finally:
        await chunks.aclose()
    return out


def append(path: Path, data: bytes) -> Callable[[], None]:
    """A step that appends ``data`` to the file, as the guest's console does."""

    def step() -> None:
        with open(path, "ab") as f:
            f.write(data)

    return step


def open_fds_on(path: Path) -> int:
    """How many descriptors of this process have ``path`` open."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor is gone by now
            count += os.readlink(f"/proc/self/fd/{fd}") == str(path)
    return count


# ---- reading ---------------------------------------------------------------------------------------


async def test_the_path_is_the_vm_folder_of_the_adapter_and_the_log_is_what_the_fake_wrote(env: Env) -> None:
    await env.create("web")
    assert env.log("web") == Path(vm_dir(env.fake.storage_dir, env.fake.domain_name("web"))) / "console.log"
    assert await collect(env.reader().read("web")) == [ConsoleChunk(BOOTED, 0)]


async def test_tail_is_cut_into_contiguous_chunks(env: Env) -> None:
    await env.create("web")
    data = bytes(range(256)) * 40  # 10,240 bytes, not text: the reader passes bytes as they are
    env.log("web").write_bytes(data)
    chunks = await collect(env.reader(chunk_bytes=1000).read("web", tail_bytes=2500))
    assert [(c.offset, len(c.data)) for c in chunks] == [(7740, 1000), (8740, 1000), (9740, 500)]
    assert b"".join(c.data for c in chunks) == data[-2500:]
    # more than the file holds: all of it, from 0
    whole = await collect(env.reader().read("web", tail_bytes=len(data) + 1))
    assert whole == [ConsoleChunk(data, 0)]


async def test_history_is_bounded_by_default_and_at_most(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    await env.create("web")
    data = os.urandom(3 * MAX_TAIL_BYTES)
    env.log("web").write_bytes(data)
    asked: list[int] = []
    real_pread = os.pread

    def pread(fd: int, n: int, offset: int) -> bytes:
        asked.append(n)
        return real_pread(fd, n, offset)

    monkeypatch.setattr(console_module.os, "pread", pread)
    default = await collect(env.reader().read("web"))
    assert b"".join(c.data for c in default) == data[-DEFAULT_TAIL_BYTES:]
    at_most = await collect(env.reader().read("web", tail_bytes=5 * MAX_TAIL_BYTES))
    assert b"".join(c.data for c in at_most) == data[-MAX_TAIL_BYTES:]
    assert at_most[0].offset == len(data) - MAX_TAIL_BYTES
    # never more than one chunk is read at a time, whatever the history asked for
    assert all(len(c.data) <= CHUNK_BYTES for c in default + at_most)
    assert asked and max(asked) <= CHUNK_BYTES
    # a larger chunk size than the protocol's is not taken
    big = await collect(env.reader(chunk_bytes=10 * CHUNK_BYTES).read("web", tail_bytes=MAX_TAIL_BYTES))
    assert max(len(c.data) for c in big) == CHUNK_BYTES


async def test_without_follow_the_stream_ends_at_the_size_the_file_had(env: Env) -> None:
    await env.create("web")
    chunks = env.reader(chunk_bytes=4).read("web")
    first = await asyncio.wait_for(anext(chunks), BOUND)
    append(env.log("web"), b"written after the request\n")()
    rest = await collect(chunks)
    assert first.data + b"".join(c.data for c in rest) == BOOTED


async def test_no_log_yet_is_an_empty_stream(env: Env) -> None:
    await env.create("cold", start=False)  # the fake, like virtlogd, makes the log when the VM starts
    assert not env.log("cold").exists()
    assert await collect(env.reader().read("cold")) == []


# ---- refusals ----------------------------------------------------------------------------------------


async def test_unknown_vm_is_not_found(env: Env) -> None:
    with pytest.raises(errors.NotFound) as err:
        await collect(env.reader().read("ghost"))
    assert err.value.reason == "VM_NOT_FOUND"


@pytest.mark.parametrize("name", ["../web", "web/../../etc", "", "Web", "a" * 64])
async def test_a_name_that_is_not_a_vm_name_is_refused_before_any_file_is_touched(env: Env, name: str) -> None:
    await env.create("web")
    gets = env.fake.calls["get"]
    with pytest.raises(errors.InvalidArgument) as err:
        await collect(env.reader().read(name))
    assert err.value.reason == "INVALID_NAME"
    assert env.fake.calls["get"] == gets


async def test_negative_tail_is_refused(env: Env) -> None:
    await env.create("web")
    with pytest.raises(errors.InvalidArgument) as err:
        await collect(env.reader().read("web", tail_bytes=-1))
    assert err.value.metadata["field"] == "tail_bytes"


async def test_a_link_in_place_of_the_log_is_not_followed(env: Env, tmp_path: Path) -> None:
    await env.create("web")
    secret = tmp_path / "secret"
    secret.write_bytes(b"not for the console reader\n")
    env.log("web").unlink()
    env.log("web").symlink_to(secret)
    for follow in (False, True):
        with pytest.raises(errors.FailedPrecondition) as err:
            await collect(env.reader().read("web", follow=follow))
        assert err.value.reason == "CONSOLE_LOG_UNREADABLE"
        assert "symbolic link" in err.value.message


async def test_an_adapter_without_host_files_has_no_console(tmp_path: Path) -> None:
    fake = FakeHypervisor(host_name="h", capabilities=frozenset({Capability.EVENTS}))
    journal = Journal(tmp_path / "j.db")
    svc = AgentService("h", fake, journal, reserve=Resources(0, 0, 0), stop_timeout_seconds=1)
    await svc.start()
    try:
        await svc.create(
            VmSpec(name="web", vcpus=1, memory_mib=128, disks=(DiskSpec("root", size_mib=16),)), request_id=""
        )
        assert fake.console_log_path("web") is None
        with pytest.raises(errors.FailedPrecondition) as err:
            await collect(ConsoleReader(fake).read("web"))
        assert err.value.reason == "CONSOLE_LOG_UNAVAILABLE"
    finally:
        await svc.close()
        journal.close()


# ---- following ---------------------------------------------------------------------------------------


async def test_follow_sends_what_is_appended_and_closes_the_file_when_the_caller_stops(env: Env) -> None:
    await env.create("web")
    log = env.log("web")
    script = Script(append(log, b"second line\n"), lambda: None, append(log, b"third\n"))
    chunks = env.reader(sleep=script).read("web", follow=True)
    got = await collect(chunks, count=3)
    assert got == [ConsoleChunk(BOOTED, 0), ConsoleChunk(b"second line\n", 21), ConsoleChunk(b"third\n", 33)]
    assert open_fds_on(log) == 0


async def test_follow_waits_for_the_log_and_reads_it_from_its_start(env: Env) -> None:
    await env.create("cold", start=False)

    async def start() -> None:
        await env.svc.start_vm("cold", request_id="")

    script = Script(lambda: None, lambda: None, start)
    # history of 4 bytes asked for, but a log that appears later is new: all of it is sent
    got = await collect(env.reader(sleep=script).read("cold", tail_bytes=4, follow=True), count=1)
    assert got == [ConsoleChunk(BOOTED, 0)]
    assert script.polls == 3


async def test_follow_across_a_rotation_sends_the_old_files_last_bytes_then_the_new_file(env: Env) -> None:
    await env.create("web")
    log = env.log("web")

    def rotate() -> None:
        # what virtlogd does at 2 MiB: the last bytes go to the old file, which is renamed, and a new one starts
        append(log, b"last of the old\n")()
        log.rename(log.with_name("console.log.0"))
        log.write_bytes(b"first of the new\n")

    script = Script(rotate, lambda: None, append(log, b"more\n"))
    got = await collect(env.reader(sleep=script).read("web", follow=True), count=4)
    assert got == [
        ConsoleChunk(BOOTED, 0),
        ConsoleChunk(b"last of the old\n", 21),
        ConsoleChunk(b"first of the new\n", 0),
        ConsoleChunk(b"more\n", 17),
    ]


async def test_bytes_written_to_the_old_file_between_the_last_read_and_the_rotation_are_not_lost(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    await env.create("web")
    log = env.log("web")
    real_change = console_module._LogFile.change
    raced: list[bool] = []

    def change(self: Any) -> Any:
        if not raced:
            # the reader has just found the end of the file; the guest writes, virtlogd rotates
            raced.append(True)
            append(log, b"written at the last moment\n")()
            log.rename(log.with_name("console.log.0"))
            log.write_bytes(b"new\n")
        return real_change(self)

    monkeypatch.setattr(console_module._LogFile, "change", change)
    got = await collect(env.reader(sleep=Script()).read("web", follow=True), count=3)
    assert got == [
        ConsoleChunk(BOOTED, 0),
        ConsoleChunk(b"written at the last moment\n", 21),
        ConsoleChunk(b"new\n", 0),
    ]


async def test_follow_after_a_truncation_starts_again_from_zero(env: Env) -> None:
    await env.create("web")
    log = env.log("web")

    def truncate() -> None:
        with open(log, "r+b") as f:
            f.truncate(0)
            f.write(b"again\n")

    got = await collect(env.reader(sleep=Script(truncate)).read("web", follow=True), count=2)
    assert got == [ConsoleChunk(BOOTED, 0), ConsoleChunk(b"again\n", 0)]


async def test_deleting_the_vm_ends_the_follow(env: Env) -> None:
    await env.create("web")

    async def delete() -> None:
        await env.svc.delete("web", request_id="")

    script = Script(delete)
    got = await collect(env.reader(sleep=script).read("web", follow=True))  # ends by itself, or times out
    assert got == [ConsoleChunk(BOOTED, 0)]
    assert script.polls == 1


async def test_a_vm_gone_behind_the_agents_back_with_its_log_left_ends_the_follow(env: Env) -> None:
    await env.create("web")

    def undefine() -> None:
        env.fake.external_destroy("web")
        env.fake.external_undefine("web")

    script = Script(undefine)
    got = await collect(env.reader(sleep=script, exists_every=3).read("web", follow=True))
    assert env.log("web").exists()  # nothing told the reader: it asked the hypervisor
    assert got == [ConsoleChunk(BOOTED, 0)]
    assert script.polls == 2  # the third poll that finds nothing new asks, before it would sleep


async def test_a_new_vm_with_the_same_name_ends_the_follow_of_the_old_one(env: Env) -> None:
    await env.create("web")

    async def remake() -> None:
        await env.svc.delete("web", request_id="")
        await env.create("web")
        append(env.log("web"), b"the new VM's secret\n")()

    got = await collect(env.reader(sleep=Script(remake)).read("web", follow=True))
    assert got == [ConsoleChunk(BOOTED, 0)]


async def test_follow_goes_on_while_the_hypervisor_does_not_answer(env: Env) -> None:
    await env.create("web")
    log = env.log("web")

    def back() -> None:
        env.fake.set_serving(True)
        append(log, b"still here\n")()

    steps = [lambda: env.fake.set_serving(False), *([lambda: None] * 3), back]
    script = Script(*steps)
    got = await collect(env.reader(sleep=script, exists_every=1).read("web", follow=True), count=2)
    assert got == [ConsoleChunk(BOOTED, 0), ConsoleChunk(b"still here\n", 21)]
    assert script.polls == 5


# ---- resuming at an offset (from_offset) -------------------------------------------------------------


async def test_from_offset_in_the_middle_starts_at_exactly_that_byte_whatever_the_tail(env: Env) -> None:
    await env.create("web")
    data = bytes(range(256)) * 10  # 2,560 bytes
    env.log("web").write_bytes(data)
    chunks = await collect(env.reader(chunk_bytes=1000).read("web", tail_bytes=10, from_offset=1234))
    assert [(c.offset, len(c.data)) for c in chunks] == [(1234, 1000), (2234, 326)]
    assert b"".join(c.data for c in chunks) == data[1234:]


async def test_from_offset_is_not_bounded_by_the_history_limit(env: Env) -> None:
    await env.create("web")
    data = os.urandom(MAX_TAIL_BYTES + 4096)
    env.log("web").write_bytes(data)
    # a client that was away while more than MAX_TAIL_BYTES were written gets all of them
    chunks = await collect(env.reader().read("web", from_offset=1))
    assert b"".join(c.data for c in chunks) == data[1:]
    assert chunks[0].offset == 1 and all(len(c.data) <= CHUNK_BYTES for c in chunks)


async def test_from_offset_0_is_the_whole_log(env: Env) -> None:
    await env.create("web")
    assert await collect(env.reader().read("web", from_offset=0)) == [ConsoleChunk(BOOTED, 0)]


async def test_from_offset_at_the_exact_end_sends_nothing_then_follows_from_there(env: Env) -> None:
    await env.create("web")
    log = env.log("web")
    assert await collect(env.reader().read("web", from_offset=len(BOOTED))) == []
    script = Script(append(log, b"after the break\n"))
    got = await collect(env.reader(sleep=script).read("web", follow=True, from_offset=len(BOOTED)), count=1)
    assert got == [ConsoleChunk(b"after the break\n", len(BOOTED))]
    assert script.polls == 1  # nothing before the appended bytes, not even the booted line again


async def test_from_offset_beyond_the_end_starts_at_0(env: Env) -> None:
    await env.create("web")
    log = env.log("web")
    # the log the client was reading was longer: this one was replaced (VM re-made, log truncated)
    assert await collect(env.reader().read("web", from_offset=len(BOOTED) + 1)) == [ConsoleChunk(BOOTED, 0)]
    script = Script(append(log, b"next\n"))
    got = await collect(env.reader(sleep=script).read("web", follow=True, from_offset=10_000), count=2)
    assert got == [ConsoleChunk(BOOTED, 0), ConsoleChunk(b"next\n", len(BOOTED))]


async def test_from_offset_while_there_is_no_log_yet_reads_the_new_log_from_its_start(env: Env) -> None:
    await env.create("cold", start=False)
    assert await collect(env.reader().read("cold", from_offset=5)) == []

    async def start() -> None:
        await env.svc.start_vm("cold", request_id="")

    got = await collect(env.reader(sleep=Script(start)).read("cold", follow=True, from_offset=5), count=1)
    assert got == [ConsoleChunk(BOOTED, 0)]


@pytest.mark.parametrize("follow", [False, True])
async def test_a_negative_from_offset_is_refused_naming_the_field_before_the_vm_is_looked_up(
    env: Env, follow: bool
) -> None:
    await env.create("web")
    gets = env.fake.calls["get"]
    with pytest.raises(errors.InvalidArgument) as err:
        await collect(env.reader().read("web", follow=follow, from_offset=-1))
    assert err.value.metadata["field"] == "from_offset"
    assert "from_offset" in err.value.message
    assert env.fake.calls["get"] == gets
