"""Drives generated requests through real gRPC against the in-process fleet and checks the invariants.

Invariants, per request:

- the status is never INTERNAL, UNKNOWN, DATA_LOSS or UNIMPLEMENTED, and no unary call hangs;
- every error carries a ``google.rpc.ErrorInfo`` with a non-empty reason (except the
  DEADLINE_EXCEEDED/CANCELLED this harness causes on streams, and RESOURCE_EXHAUSTED from gRPC's own
  message-size limit for requests above 4 MiB);
- no status message, ErrorInfo metadata or response contains a Python traceback;
- an operation a request started never ends INTERNAL/UNKNOWN (no faults are injected here);
- after a REJECTED mutation nothing changed: the controller's ListVms/ListHosts/ListOperations, each
  agent's ListVms (and its event revision), each fake hypervisor's inventory (domains, volumes, files)
  and the agent journal's record of the request id are the same as before;
- no file outside the agents' own folders disappears (canaries that path-traversal names would hit);
- no daemon logs an error (a background task that crashed, an unexpected exception).

After an ACCEPTED mutation the harness waits until the fleet settles (operations done, the
controller's view converged with every agent's), keeps the number of VMs bounded, and refreshes the
pools that valid-looking requests draw names from.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from clonebox.agent.v1 import agent_pb2, agent_pb2_grpc
from clonebox.controller.v1 import host_service_pb2, operation_service_pb2, vm_service_pb2
from clonebox.type.v1 import operation_pb2, vm_pb2
from google.protobuf import text_format
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from clonebox_agent.adapters.fake import FakeHypervisor
from clonebox_core.model import Resources
from tests.fuzz.known_bugs import known_outcome
from tests.fuzz.strategies import Pools, Rpc
from tests.integration.conftest import Fleet

#: a unary call that takes longer than this is a hang
UNARY_DEADLINE = 30.0
#: server streams (watches) are read for at most this long ...
STREAM_DEADLINE = 0.25
#: ... or this many messages
STREAM_MAX_MESSAGES = 2
#: the agent session (HostService.Connect) may take longer: registration, then heartbeats
BIDI_DEADLINE = 3.0
BIDI_MAX_MESSAGES = 10
#: pause between the messages of a client stream (see ``_client_stream``)
WRITE_PAUSE = 0.05
#: gRPC's default receive limit; larger requests may be refused by the transport itself
GRPC_DEFAULT_MAX_MESSAGE = 4 * 1024 * 1024

FORBIDDEN_CODES = frozenset(
    {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS, grpc.StatusCode.UNIMPLEMENTED}
)
#: google.rpc.Code numbers of the same, for operation errors
FORBIDDEN_OP_CODES = frozenset({2, 13, 15})

#: keep the fleet small: fewer VMs than this after housekeeping ...
MAX_VMS = 12
#: ... and at least this many, so valid-looking requests have targets
MIN_VMS = 3

#: agents of every fuzz fleet: a roomy one and a small one (so capacity errors happen too)
AGENTS: dict[str, Resources] = {
    "h1": Resources(vcpus=4096, memory_mib=1 << 40, disk_mib=1 << 50),
    "h2": Resources(vcpus=4, memory_mib=4096, disk_mib=100_000),
}
CANARY = "canary"


class Finding(AssertionError):
    """An invariant the fleet broke."""


@dataclass
class Outcome:
    """What one call produced."""

    code: grpc.StatusCode
    details: str = ""
    status: status_pb2.Status | None = None
    responses: list[Message] = field(default_factory=list)
    #: the harness ended the call itself (stream deadline or cancel after enough messages)
    ended_by_us: bool = False

    @property
    def ok(self) -> bool:
        """True when the server accepted the call."""
        return self.code == grpc.StatusCode.OK or (self.ended_by_us and bool(self.responses))


def error_info(status: status_pb2.Status | None) -> error_details_pb2.ErrorInfo | None:
    """The ErrorInfo detail of a rich status, if any."""
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None


def describe(message: Message, limit: int = 3000) -> str:
    """A message as one-line text, long values shortened, for reports."""
    text = text_format.MessageToString(message, as_one_line=True, as_utf8=False)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


# ---------------------------------------------------------------------------------------------------
# Snapshots
# ---------------------------------------------------------------------------------------------------


def _vm_key(vm: vm_pb2.Vm) -> str:
    """A VM as one line of text, without what changes on its own (observed time, guest addresses)."""
    v = vm_pb2.Vm()
    v.CopyFrom(vm)
    v.ClearField("update_time")
    v.ClearField("addresses")
    return text_format.MessageToString(v, as_one_line=True)


@dataclass(frozen=True)
class Snapshot:
    """Everything a request could have changed, normalised for comparison."""

    controller_vms: dict[str, tuple[str, int, str]]  # name -> (host, state, key)
    hosts: dict[str, str]
    operations: dict[str, str]
    running_operations: tuple[str, ...]
    agent_vms: dict[str, dict[str, tuple[int, str]]]  # agent -> name -> (state, key)
    agent_revisions: dict[str, tuple[int, int]]
    inventories: dict[str, str]
    page_token: str = field(default="", compare=False)

    def comparable(self) -> tuple[Any, ...]:
        """The parts that must not change after a rejected request."""
        return (
            self.controller_vms,
            self.hosts,
            self.operations,
            self.agent_vms,
            self.agent_revisions,
            self.inventories,
        )

    def unconverged(self) -> list[str]:
        """Why the controller's view differs from the agents' (empty when it agrees)."""
        problems: list[str] = []
        for agent, vms in self.agent_vms.items():
            on_host = {n: s for n, (h, s, _k) in self.controller_vms.items() if h == agent}
            elsewhere = {n for n, (h, _s, _k) in self.controller_vms.items() if h != agent}
            for name, (state, _key) in vms.items():
                if name in elsewhere:
                    continue  # fleet names are unique: the controller keeps the first placement
                if on_host.get(name) != state:
                    problems.append(f"{agent}/{name}: agent says {state}, controller {on_host.get(name)}")
            for name, state in on_host.items():
                if name not in vms and state != vm_pb2.VM_STATE_FAILED:
                    problems.append(f"{agent}/{name}: controller has it in state {state}, agent does not")
        return problems

    def diff(self, other: Snapshot) -> list[str]:
        """Human-readable differences of the comparable parts."""
        out: list[str] = []
        pairs: list[tuple[str, Any, Any]] = [
            ("controller VM", self.controller_vms, other.controller_vms),
            ("host", self.hosts, other.hosts),
            ("operation", self.operations, other.operations),
            ("agent revision", self.agent_revisions, other.agent_revisions),
            ("inventory", self.inventories, other.inventories),
        ]
        pairs += [(f"agent {a} VM", self.agent_vms.get(a, {}), other.agent_vms.get(a, {})) for a in self.agent_vms]
        for what, before, after in pairs:
            for key in sorted(set(before) | set(after)):
                if key not in after:
                    out.append(f"{what} {key!r} disappeared")
                elif key not in before:
                    out.append(f"{what} {key!r} appeared: {_short(after[key])}")
                elif before[key] != after[key]:
                    out.append(f"{what} {key!r} changed: {_changed(before[key], after[key])}")
        return out


def _changed(before: Any, after: Any) -> str:
    """The words that differ between two one-line texts (or the two reprs)."""
    b, a = str(before).split(), str(after).split()
    i = 0
    while i < min(len(a), len(b)) and a[i] == b[i]:
        i += 1
    j = 0
    while j < min(len(a), len(b)) - i and a[-1 - j] == b[-1 - j]:
        j += 1
    return f"... {_short(' '.join(b[i : len(b) - j]))} -> {_short(' '.join(a[i : len(a) - j]))} ..."


def _short(value: Any, limit: int = 400) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# ---------------------------------------------------------------------------------------------------
# Logs
# ---------------------------------------------------------------------------------------------------


class ErrorLogCollector(logging.Handler):
    """Collects ERROR records: a daemon logging an error means something crashed behind the API."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def take(self) -> list[str]:
        """Formatted records since the last call."""
        out = []
        for r in self.records:
            text = f"{r.name}: {r.getMessage()}"
            if r.exc_info and r.exc_info[1] is not None:
                text += f" [{type(r.exc_info[1]).__name__}: {r.exc_info[1]}]"
            out.append(text)
        self.records.clear()
        return out


# ---------------------------------------------------------------------------------------------------
# The harness
# ---------------------------------------------------------------------------------------------------


@dataclass
class Stats:
    """Counts for the end-of-run summary."""

    codes: Counter[tuple[str, str]] = field(default_factory=Counter)
    modes: Counter[str] = field(default_factory=Counter)
    known: Counter[str] = field(default_factory=Counter)

    def summary(self) -> str:
        """One line per RPC with its status codes."""
        by_rpc: dict[str, list[str]] = {}
        for (rpc, code), n in sorted(self.codes.items()):
            by_rpc.setdefault(rpc, []).append(f"{code}={n}")
        lines = [f"  {rpc}: {', '.join(parts)}" for rpc, parts in by_rpc.items()]
        lines.append(f"  modes: {dict(self.modes)}")
        if self.known:
            lines.append(f"  known bugs (skipped or tolerated): {dict(self.known)}")
        return "\n".join(lines)


class FuzzHarness:
    """A fuzz fleet: two agents on fake hypervisors, seeded VMs and operations, and the checks."""

    def __init__(self, fleet: Fleet, tmp: Path) -> None:
        self.fleet = fleet
        self.tmp = tmp
        self.pools = Pools()
        self.stats = Stats()
        self.logs = ErrorLogCollector()
        self._agent_channels: dict[str, grpc.aio.Channel] = {}
        self._seed_counter = 0
        self.canaries: list[Path] = []

    # ---- set-up ----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Images, canaries, agents, seed VMs; then settle and fill the pools."""
        images = self.tmp / "images"
        (images / "testguest").mkdir(parents=True)
        (images / "testguest" / "data.qcow2").write_bytes(b"QFI\xfb" + b"\x00" * 28)
        (images / "testguest" / "vmlinux").write_bytes(b"kernel")
        (images / "testguest" / "initrd.img").write_bytes(b"initrd")
        share = self.tmp / "share"
        share.mkdir()
        self.pools.shared_dirs = [str(share)]
        for name, capacity in AGENTS.items():
            storage = self.tmp / f"agent-{name}" / "storage"
            fake = FakeHypervisor(host_name=name, capacity=capacity, storage_dir=storage, image_dirs=[images])
            await self.fleet.add_agent(name, capacity, fake=fake)
            self._agent_channels[name] = self.fleet.agent_stub(name)[1]
            # where "<vm>/../canary", "<vm>/../../canary", ... land if a VM name is used as a path
            for folder in (storage / "vms", storage, storage.parent, self.tmp):
                self.canaries.append(folder / CANARY / "keep")
        self._plant_canaries()
        logging.getLogger().addHandler(self.logs)
        await self._create("web-1", host="h1")
        await self._create("db-1", host="h1", network=vm_pb2.NETWORK_MODE_NONE)
        await self._create("cache-1", host="h2")
        await self._wait(await self.fleet.vms.StopVm(vm_service_pb2.StopVmRequest(name="db-1", request_id="seed-stop")))
        # an operation that failed: the network does not exist on the fake
        resp = await self.fleet.vms.CreateVm(
            vm_service_pb2.CreateVmRequest(spec=self._spec("broken-1", network_name="isolated"), request_id="seed-bad")
        )
        await self._wait(resp)
        await self.refresh(await self.settle())
        self.logs.take()

    async def close(self) -> None:
        """Close the harness's channels and stop collecting logs."""
        logging.getLogger().removeHandler(self.logs)
        for ch in self._agent_channels.values():
            await ch.close()

    def _plant_canaries(self) -> None:
        for c in self.canaries:
            c.parent.mkdir(parents=True, exist_ok=True)
            c.write_text("must survive\n")

    @staticmethod
    def _spec(
        name: str, network: int = vm_pb2.NETWORK_MODE_LIBVIRT, network_name: str = "default"
    ) -> vm_pb2.VmSpec:
        return vm_pb2.VmSpec(
            name=name,
            vcpus=1,
            memory_mib=64,
            disks=[
                vm_pb2.DiskSpec(name="root", base_image="testguest/data.qcow2"),
                vm_pb2.DiskSpec(name="data", size_mib=128),
            ],
            kernel_boot=vm_pb2.KernelBoot(
                kernel="testguest/vmlinux", initrd="testguest/initrd.img", cmdline="console=ttyS0"
            ),
            network=vm_pb2.NetworkSpec(mode=network, libvirt_network=network_name),  # type: ignore[arg-type]
            cloud_init=vm_pb2.CloudInit(user_data="#cloud-config\n"),
            labels={"app": "seed"},
        )

    async def _create(self, name: str, host: str = "", network: int = vm_pb2.NETWORK_MODE_LIBVIRT) -> None:
        resp = await self.fleet.vms.CreateVm(
            vm_service_pb2.CreateVmRequest(spec=self._spec(name, network), host=host, request_id=f"seed-{name}")
        )
        op = await self._wait(resp)
        if op.HasField("error"):
            raise RuntimeError(f"seeding {name} failed: {op.error}")

    async def _wait(self, resp: Message, timeout: float = UNARY_DEADLINE) -> operation_pb2.Operation:
        return await self._wait_id(resp.operation.id, timeout)  # type: ignore[attr-defined]

    async def _wait_id(self, op_id: str, timeout: float = UNARY_DEADLINE) -> operation_pb2.Operation:
        waited = await self.fleet.ops.WaitOperation(
            operation_service_pb2.WaitOperationRequest(id=op_id, timeout_seconds=int(timeout)), timeout=timeout + 5
        )
        return waited.operation  # type: ignore[no-any-return]

    # ---- calls -----------------------------------------------------------------------------------

    def channel(self, rpc: Rpc) -> grpc.aio.Channel:
        """The controller's channel, or the first agent's for AgentService."""
        return self.fleet.channel if rpc.target == "controller" else self._agent_channels["h1"]

    async def invoke(self, rpc: Rpc, messages: Sequence[Message]) -> Outcome:
        """Send ``messages`` (one unless the RPC streams requests) and collect the outcome."""
        ch = self.channel(rpc)
        ser = _serialize
        de = rpc.response_class.FromString
        responses: list[Message] = []
        try:
            if not rpc.client_streaming and not rpc.server_streaming:
                resp = await ch.unary_unary(rpc.path, request_serializer=ser, response_deserializer=de)(
                    messages[0], timeout=UNARY_DEADLINE
                )
                return Outcome(grpc.StatusCode.OK, responses=[resp])
            if rpc.client_streaming:
                return await _client_stream(ch, rpc, messages)
            call = ch.unary_stream(rpc.path, request_serializer=ser, response_deserializer=de)(
                messages[0], timeout=STREAM_DEADLINE
            )
            return await _read_stream(call, responses, STREAM_MAX_MESSAGES)
        except grpc.aio.AioRpcError as exc:
            ours = rpc.server_streaming and exc.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)
            return Outcome(exc.code(), exc.details() or "", _status_of(exc), responses, ended_by_us=ours)

    # ---- one example -----------------------------------------------------------------------------

    async def exercise(self, rpc: Rpc, messages: Sequence[Message]) -> None:
        """Send one generated request and check every invariant; raise Finding on a violation."""
        request = messages[0]
        before = await self.snapshot() if rpc.mutating else None
        journal_before = self._journal(rpc, request)
        outcome = await self.invoke(rpc, messages)
        self.stats.codes[(rpc.name, outcome.code.name)] += 1
        bug = known_outcome(rpc, outcome.code.name, outcome.details)
        if bug is not None:
            self.stats.known[bug] += 1
            problems: list[str] = []
        else:
            problems = self._check_outcome(rpc, messages, outcome)
        if outcome.ok and rpc.mutating:
            problems += await self._check_operations(outcome)
            settled = await self.settle()
            settled = await self.housekeeping(settled)
            await self.refresh(settled)
        elif rpc.mutating and before is not None:
            after = await self.snapshot()
            changes = before.diff(after)
            if changes:
                problems.append("a rejected request changed state:\n    " + "\n    ".join(changes[:20]))
            if self._journal(rpc, request) != journal_before:
                problems.append(f"a rejected request left a journal record for request_id {_request_id(request)!r}")
        missing = [str(c) for c in self.canaries if not c.exists()]
        if missing:
            self._plant_canaries()
            problems.append(f"files outside the agents' folders were deleted: {missing}")
        errors = self.logs.take()
        if errors:
            problems.append("errors were logged:\n    " + "\n    ".join(e[:500] for e in errors[:10]))
        if problems:
            sent = "\n  ".join(describe(m) for m in messages)
            raise Finding(
                f"{rpc.name} -> {outcome.code.name} {outcome.details[:300]!r}\n"
                f"request:\n  {sent}\nproblems:\n  - " + "\n  - ".join(problems)
            )

    def _check_outcome(self, rpc: Rpc, messages: Sequence[Message], outcome: Outcome) -> list[str]:
        problems: list[str] = []
        size = max(m.ByteSize() for m in messages)
        transport_limit = (
            outcome.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            and size > GRPC_DEFAULT_MAX_MESSAGE
            and error_info(outcome.status) is None
        )
        if outcome.code in FORBIDDEN_CODES:
            problems.append(f"status {outcome.code.name}")
        elif outcome.code == grpc.StatusCode.DEADLINE_EXCEEDED and not outcome.ended_by_us:
            problems.append(f"no answer within {UNARY_DEADLINE:g}s (a hang)")
        elif outcome.code != grpc.StatusCode.OK and not outcome.ended_by_us and not transport_limit:
            info = error_info(outcome.status)
            if info is None or not info.reason:
                problems.append(f"{outcome.code.name} without an ErrorInfo reason")
        texts = [outcome.details]
        info = error_info(outcome.status)
        if info is not None:
            texts += list(info.metadata.values())
        texts += [text_format.MessageToString(r) for r in outcome.responses]
        if any("Traceback" in t for t in texts):
            problems.append("a traceback went out on the wire")
        return problems

    async def _check_operations(self, outcome: Outcome) -> list[str]:
        """Operations the call started must finish, and never INTERNAL/UNKNOWN."""
        problems: list[str] = []
        for resp in outcome.responses:
            for fd, value in resp.ListFields():
                if fd.message_type is not operation_pb2.Operation.DESCRIPTOR:
                    continue
                try:
                    op = await self._wait_id(value.id)
                except grpc.aio.AioRpcError as exc:
                    problems.append(f"WaitOperation({value.id}) failed: {exc.code().name} {exc.details()}")
                    continue
                if not op.done:
                    problems.append(f"operation {op.id} not done after {UNARY_DEADLINE:g}s: {op.step}")
                elif op.HasField("error"):
                    if op.error.code in FORBIDDEN_OP_CODES:
                        problems.append(f"operation {op.id} ended with code {op.error.code}: {op.error.message}")
                    if error_info(op.error) is None:
                        problems.append(f"operation {op.id} error has no ErrorInfo")
                    if "Traceback" in op.error.message:
                        problems.append(f"operation {op.id} error carries a traceback")
        return problems

    def _journal(self, rpc: Rpc, request: Message) -> object:
        """What the first agent's journal holds for the request's id (agent RPCs only)."""
        rid = _request_id(request)
        if rpc.target != "agent" or not rid:
            return None
        return self.fleet.agents["h1"].journal.outcome(rid)

    # ---- state -----------------------------------------------------------------------------------

    async def snapshot(self) -> Snapshot:
        """Controller and agent state as the API reports it, plus the fakes' inventories."""
        fleet = self.fleet
        vms = (await fleet.vms.ListVms(vm_service_pb2.ListVmsRequest(page_size=1000), timeout=UNARY_DEADLINE)).vms
        page = await fleet.vms.ListVms(vm_service_pb2.ListVmsRequest(page_size=1), timeout=UNARY_DEADLINE)
        hosts = (await fleet.hosts.ListHosts(host_service_pb2.ListHostsRequest(), timeout=UNARY_DEADLINE)).hosts
        ops = (
            await fleet.ops.ListOperations(
                operation_service_pb2.ListOperationsRequest(page_size=1_000_000), timeout=UNARY_DEADLINE
            )
        ).operations
        agent_vms: dict[str, dict[str, tuple[int, str]]] = {}
        revisions: dict[str, tuple[int, int]] = {}
        inventories: dict[str, str] = {}
        for name, ch in self._agent_channels.items():
            listing = await agent_pb2_grpc.AgentServiceStub(ch).ListVms(
                agent_pb2.ListVmsRequest(), timeout=UNARY_DEADLINE
            )
            agent_vms[name] = {v.name: (int(v.state), _vm_key(v)) for v in listing.vms}
            revisions[name] = (listing.revision.epoch, listing.revision.sequence)
            inventories[name] = repr(await fleet.fakes[name].inventory())
        host_keys = {}
        for h in hosts:
            h2 = type(h)()
            h2.CopyFrom(h)
            h2.ClearField("last_heartbeat_time")
            host_keys[h.name] = text_format.MessageToString(h2, as_one_line=True)
        return Snapshot(
            controller_vms={v.name: (v.host, int(v.state), _vm_key(v)) for v in vms},
            hosts=host_keys,
            operations={o.id: text_format.MessageToString(o, as_one_line=True) for o in ops},
            running_operations=tuple(sorted(o.id for o in ops if not o.done)),
            agent_vms=agent_vms,
            agent_revisions=revisions,
            inventories=inventories,
            page_token=page.next_page_token,
        )

    async def settle(self, timeout: float = 15.0) -> Snapshot:
        """Wait until operations are done, the controller agrees with the agents, and nothing moves."""
        deadline = time.monotonic() + timeout
        prev = await self.snapshot()
        while True:
            await asyncio.sleep(0.03)
            cur = await self.snapshot()
            if cur.comparable() == prev.comparable() and not cur.running_operations and not cur.unconverged():
                return cur
            if time.monotonic() > deadline:
                why = prev.diff(cur)[:10] + [f"running: {o}" for o in cur.running_operations][:10]
                why += cur.unconverged()[:10]
                raise Finding(f"the fleet did not settle within {timeout:g}s:\n    " + "\n    ".join(why))
            prev = cur

    async def housekeeping(self, snap: Snapshot) -> Snapshot:
        """Keep between MIN_VMS and MAX_VMS VMs, so the fakes never fill up and targets exist."""
        changed = False
        surplus = sorted(snap.controller_vms)[: max(len(snap.controller_vms) - MAX_VMS, 0)]
        for name in surplus:
            resp = await self.fleet.vms.DeleteVm(vm_service_pb2.DeleteVmRequest(name=name), timeout=UNARY_DEADLINE)
            await self._wait(resp)
            changed = True
        for agent, vms in snap.agent_vms.items():
            # VMs made directly on an agent under a name the fleet has elsewhere are not adopted
            orphans = sorted(n for n in vms if snap.controller_vms.get(n, (agent,))[0] != agent)
            for name in orphans[: max(len(vms) - MAX_VMS, 0) or len(orphans) // 2]:
                stub = agent_pb2_grpc.AgentServiceStub(self._agent_channels[agent])
                await stub.DeleteVm(agent_pb2.DeleteVmRequest(name=name), timeout=UNARY_DEADLINE)
                changed = True
        if len(snap.controller_vms) - len(surplus) < MIN_VMS:
            await self.fleet.hosts.UncordonHost(host_service_pb2.UncordonHostRequest(name="h1"))
            self._seed_counter += 1
            await self._create(f"seed-{self._seed_counter}", host="h1")
            changed = True
        return await self.settle() if changed else snap

    async def refresh(self, snap: Snapshot) -> None:
        """Point the valid-looking strategies at what exists now."""
        p = self.pools
        p.vm_names = sorted(set(snap.controller_vms) | {n for vms in snap.agent_vms.values() for n in vms})
        p.host_names = sorted(snap.hosts)
        p.operation_ids = sorted(snap.operations)
        p.request_ids = sorted({"seed-stop", "seed-bad", *(f"seed-{n}" for n in p.vm_names)})
        p.agent_revisions = sorted(set(snap.agent_revisions.values()))
        p.page_tokens = [snap.page_token] if snap.page_token else []
        store = getattr(self.fleet.controller, "store", None)
        if store is not None and hasattr(store, "current_revision"):
            p.fleet_revision = int(await asyncio.to_thread(store.current_revision))


async def _client_stream(ch: grpc.aio.Channel, rpc: Rpc, messages: Sequence[Message]) -> Outcome:
    """Write the messages one by one, pausing after each so a rejection arrives before the next write.

    grpcio's asyncio client reports INTERNAL "Internal error from Core" instead of the server's status
    when it writes after the server has ended the call (grpc/grpc#36066); pacing the writes and
    stopping once the call is done avoids blaming the server for that client-side race.
    """
    ser, de = _serialize, rpc.response_class.FromString
    responses: list[Message] = []
    if rpc.server_streaming:
        call: Any = ch.stream_stream(rpc.path, request_serializer=ser, response_deserializer=de)(timeout=BIDI_DEADLINE)
    else:
        call = ch.stream_unary(rpc.path, request_serializer=ser, response_deserializer=de)(timeout=UNARY_DEADLINE)
    try:
        for m in messages:
            if call.done():
                break
            await call.write(m)
            await asyncio.sleep(WRITE_PAUSE)
        if not call.done():
            await call.done_writing()
        if not rpc.server_streaming:
            return Outcome(grpc.StatusCode.OK, responses=[await call])
        while len(responses) < BIDI_MAX_MESSAGES:
            resp = await call.read()
            if resp is grpc.aio.EOF:
                return Outcome(grpc.StatusCode.OK, responses=responses)
            responses.append(resp)
        call.cancel()
        return Outcome(grpc.StatusCode.CANCELLED, responses=responses, ended_by_us=True)
    except asyncio.InvalidStateError:
        pass  # the call ended while we wrote: its status tells why
    except grpc.aio.AioRpcError as exc:
        ours = exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        return Outcome(exc.code(), exc.details() or "", _status_of(exc), responses, ended_by_us=ours)
    code = await call.code()
    status = await rpc_status.aio.from_call(call) if code != grpc.StatusCode.OK else None
    return Outcome(code, await call.details() or "", status, responses)


async def _read_stream(call: Any, responses: list[Message], limit: int) -> Outcome:
    async for resp in call:
        responses.append(resp)
        if len(responses) >= limit:
            call.cancel()
            return Outcome(grpc.StatusCode.CANCELLED, responses=responses, ended_by_us=True)
    return Outcome(grpc.StatusCode.OK, responses=responses)


def _status_of(exc: grpc.aio.AioRpcError) -> status_pb2.Status | None:
    """The rich status of a failed call (None when absent, or when it contradicts the status code)."""
    try:
        return rpc_status.from_call(exc)  # type: ignore[no-any-return]
    except ValueError:
        return None


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


def _request_id(request: Message) -> str:
    fd = request.DESCRIPTOR.fields_by_name.get("request_id")
    return str(getattr(request, "request_id", "")) if fd is not None else ""
