"""Drives generated requests through real gRPC against the in-process fleet and checks the invariants.

Invariants, per request:

- the status is never INTERNAL, UNKNOWN, DATA_LOSS or UNIMPLEMENTED, and no unary call hangs;
- every error carries a ``google.rpc.ErrorInfo`` with a non-empty reason (except the
  DEADLINE_EXCEEDED/CANCELLED this harness causes on streams, and RESOURCE_EXHAUSTED from gRPC's own
  message-size limit for requests above 4 MiB);
- no status message, ErrorInfo metadata or response contains a Python traceback;
- an operation a request started never ends INTERNAL/UNKNOWN (no faults are injected here);
- after a REJECTED mutation nothing changed: the controller's ListVms/ListHosts/ListOperations, its
  join tokens and certificates, each agent's ListVms (and event revision), each fake hypervisor's
  inventory (domains, volumes, files) and the agent journal's record of the request id;
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
from collections import Counter, defaultdict
from collections.abc import Sequence
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
from tests.fuzz.endpoints import TARGET_AGENT, Endpoints
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
WRITE_PAUSE = 0.02
#: gRPC's default receive limit; larger requests may be refused by the transport itself
GRPC_DEFAULT_MAX_MESSAGE = 4 * 1024 * 1024

FORBIDDEN_CODES = frozenset(
    {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS, grpc.StatusCode.UNIMPLEMENTED}
)
#: google.rpc.Code numbers of the same, for operation errors
FORBIDDEN_OP_CODES = frozenset({2, 12, 13, 15})

#: how many of the newest operations a snapshot compares
RECENT_OPERATIONS = 20
#: keep the fleet small: fewer VMs than this after housekeeping ...
MAX_VMS = 12
#: ... and at least this many, so valid-looking requests have targets
MIN_VMS = 3
#: how long a difference after a rejected request may take to go away before it counts
LASTING_SECONDS = 2.0
#: unused join tokens kept for Enroll
MIN_JOIN_TOKENS = 1

#: agents of every fuzz fleet: a roomy one and a small one (so capacity errors happen too)
AGENTS: dict[str, Resources] = {
    "h1": Resources(vcpus=4096, memory_mib=1 << 40, disk_mib=1 << 50),
    "h2": Resources(vcpus=4, memory_mib=4096, disk_mib=100_000),
}
CANARY = "canary"
#: certificates the fuzzer may revoke carry these names; every other one keeps the fleet running
VICTIM_PREFIX = "victim-"


AGENTS_ONLY = frozenset({"agents"})
PKI = frozenset({"pki"})
FLEET = frozenset({"controller", "agents"})
ALL = FLEET | PKI


def scope_of(rpc: Rpc) -> frozenset[str]:
    """What a request to ``rpc`` could change, so what its snapshots compare.

    An agent acts on its own state (the controller only follows its events); the PKI services touch
    certificates and join tokens only; the rest of the controller may reach the agents and creates
    join tokens (certificates are left out there: listing them parses every issued one).
    """
    if rpc.target == "agent":
        return AGENTS_ONLY
    if rpc.service.name.startswith(("Pki", "Enrollment")):
        return PKI
    return FLEET


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


def _vm_key(vm: vm_pb2.Vm, *, observed: bool) -> str:
    """A VM as one line of text, without what changes on its own.

    Always dropped: the observation time and guest addresses. With ``observed`` (the controller's
    copy) also ``state_reason``: the address refresher and late agent events rewrite it in the
    background.
    """
    v = vm_pb2.Vm()
    v.CopyFrom(vm)
    v.ClearField("update_time")
    v.ClearField("addresses")
    if observed:
        v.ClearField("state_reason")
    return text_format.MessageToString(v, as_one_line=True)


@dataclass(frozen=True)
class Snapshot:
    """Everything a request could have changed, normalised for comparison."""

    controller_vms: dict[str, tuple[str, int, str]]  # name -> (host, state, key)
    hosts: dict[str, str]
    operations: dict[str, str]
    agent_vms: dict[str, dict[str, tuple[int, str]]]  # agent -> name -> (state, key)
    agent_revisions: dict[str, tuple[int, int]]
    inventories: dict[str, str]
    #: join token id -> (host, used)
    join_tokens: dict[str, str] = field(default_factory=dict)
    #: certificate serial -> (identity, revoked)
    certificates: dict[str, str] = field(default_factory=dict)

    def parts(self) -> list[tuple[str, dict[str, Any]]]:
        """The comparable parts, named."""
        out: list[tuple[str, dict[str, Any]]] = [
            ("controller VM", self.controller_vms),
            ("host", self.hosts),
            ("operation", self.operations),
            ("agent revision", self.agent_revisions),
            ("inventory", self.inventories),
            ("join token", self.join_tokens),
            ("certificate", self.certificates),
        ]
        return out + [(f"agent {a} VM", vms) for a, vms in sorted(self.agent_vms.items())]

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
        for (what, before), (_same, after) in zip(self.parts(), other.parts(), strict=True):
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
    """Counts and times for the end-of-run summary."""

    codes: Counter[tuple[str, str]] = field(default_factory=Counter)
    modes: Counter[str] = field(default_factory=Counter)
    principals: Counter[str] = field(default_factory=Counter)
    known: Counter[str] = field(default_factory=Counter)
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def summary(self) -> str:
        """One line per RPC with its status codes and time."""
        by_rpc: dict[str, list[str]] = {}
        for (rpc, code), n in sorted(self.codes.items()):
            by_rpc.setdefault(rpc, []).append(f"{code}={n}")
        lines = [f"  {rpc}: {', '.join(parts)} ({self.seconds[rpc]:.1f}s)" for rpc, parts in by_rpc.items()]
        lines.append(f"  modes: {dict(self.modes)}; callers: {dict(self.principals)}")
        if self.known:
            lines.append(f"  known issues (skipped or tolerated): {dict(self.known)}")
        return "\n".join(lines)


class FuzzHarness:
    """A fuzz fleet: two agents on fake hypervisors, seeded VMs, operations and PKI, and the checks."""

    def __init__(self, fleet: Fleet, tmp: Path) -> None:
        self.fleet = fleet
        self.tmp = tmp
        self.pools = Pools()
        self.stats = Stats()
        self.logs = ErrorLogCollector()
        self.endpoints = Endpoints(fleet)
        self.canaries: list[Path] = []
        self._seed_counter = 0

    # ---- set-up ----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Images, canaries, agents, seed VMs, operations and PKI; then settle and fill the pools."""
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
        await self._seed_pki()
        await self.settle()
        await self.refresh(await self.snapshot(ALL))
        self.logs.take()

    async def _seed_pki(self) -> None:
        """Certificates the fuzzer may revoke, join tokens to enrol with, and CSRs."""
        pki = getattr(self.fleet.controller, "pki", None)
        if pki is None or not self.endpoints.secure:
            return
        from cryptography.hazmat.primitives.asymmetric import ec, rsa

        from clonebox_core.security.identity import make_identity
        from clonebox_core.security.pki import make_csr

        # only certificates named victim-* may be revoked (see protected())
        for i in range(3):
            self.fleet.pki.ca.issue(
                make_identity(self.endpoints.trust_domain, "agent", f"{VICTIM_PREFIX}{i}"), seconds=3600
            )
        ec_keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(2)]
        self.pools.csrs = [make_csr(k, f"{VICTIM_PREFIX}csr").decode() for k in ec_keys]
        rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
        self.pools.csrs.append(make_csr(rsa_key, f"{VICTIM_PREFIX}rsa").decode())  # type: ignore[arg-type]
        await self._replenish_join_tokens(set())

    async def _replenish_join_tokens(self, used: set[str]) -> None:
        """Keep MIN_JOIN_TOKENS unused join tokens in the pool, each with its host at the same index
        (with one, a valid-looking Enroll names the token's own host)."""
        from clonebox_core.security.jointoken import JoinToken

        unused = [t for t in self.pools.join_tokens if JoinToken.decode(t).token_id not in used]
        while len(unused) < MIN_JOIN_TOKENS:
            self._seed_counter += 1
            resp = await self.fleet.hosts.CreateJoinToken(
                host_service_pb2.CreateJoinTokenRequest(host=f"{VICTIM_PREFIX}join-{self._seed_counter}"),
                timeout=UNARY_DEADLINE,
            )
            unused.append(resp.token)
        self.pools.join_tokens = unused[:MIN_JOIN_TOKENS]
        self.pools.token_hosts = [JoinToken.decode(t).host for t in self.pools.join_tokens]

    async def close(self) -> None:
        """Close the harness's channels and stop collecting logs."""
        logging.getLogger().removeHandler(self.logs)
        await self.endpoints.close()

    def _plant_canaries(self) -> None:
        for c in self.canaries:
            c.parent.mkdir(parents=True, exist_ok=True)
            c.write_text("must survive\n")

    @staticmethod
    def _spec(name: str, network: int = vm_pb2.NETWORK_MODE_LIBVIRT, network_name: str = "default") -> vm_pb2.VmSpec:
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
        # polls faster than WaitOperation's server-side 100 ms: most operations here take a few ms
        deadline = time.monotonic() + timeout
        while True:
            got = await self.fleet.ops.GetOperation(
                operation_service_pb2.GetOperationRequest(id=op_id), timeout=UNARY_DEADLINE
            )
            if got.operation.done or time.monotonic() > deadline:
                return got.operation  # type: ignore[no-any-return]
            await asyncio.sleep(0.01)

    # ---- guards ----------------------------------------------------------------------------------

    def protected(self, rpc: Rpc, messages: Sequence[Message]) -> bool:
        """True for a request that would revoke a certificate the fleet runs on (only victims may go)."""
        pki = getattr(self.fleet.controller, "pki", None)
        if rpc.method.name != "RevokeCertificate" or pki is None:
            return False
        req: Any = messages[0]
        if req.name and not req.name.startswith(VICTIM_PREFIX):
            return True
        serial = str(req.serial).lower().removeprefix("0x")
        if not serial:
            return False
        return any(
            c.serial == serial and not _cert_name(c.identity).startswith(VICTIM_PREFIX) for c in pki.list_certificates()
        )

    # ---- calls -----------------------------------------------------------------------------------

    async def invoke(self, rpc: Rpc, messages: Sequence[Message], principal: str) -> Outcome:
        """Send ``messages`` (one unless the RPC streams requests) as ``principal``; collect the outcome."""
        ch = self.endpoints.channel(rpc, principal)
        de = rpc.response_class.FromString
        responses: list[Message] = []
        try:
            if rpc.client_streaming:
                return await _client_stream(ch, rpc, messages)
            if not rpc.server_streaming:
                resp = await ch.unary_unary(rpc.path, request_serializer=_serialize, response_deserializer=de)(
                    messages[0], timeout=UNARY_DEADLINE
                )
                return Outcome(grpc.StatusCode.OK, responses=[resp])
            call = ch.unary_stream(rpc.path, request_serializer=_serialize, response_deserializer=de)(
                messages[0], timeout=STREAM_DEADLINE
            )
            return await _read_stream(call, responses, STREAM_MAX_MESSAGES)
        except grpc.aio.AioRpcError as exc:
            ours = rpc.server_streaming and exc.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)
            return Outcome(exc.code(), exc.details() or "", _status_of(exc), responses, ended_by_us=ours)

    # ---- one example -----------------------------------------------------------------------------

    async def exercise(
        self, rpc: Rpc, messages: Sequence[Message], principal: str = "admin", *, tolerate_known: bool = True
    ) -> None:
        """Send one generated request and check every invariant; raise Finding on a violation."""
        started = time.monotonic()
        try:
            await self._exercise(rpc, messages, principal, tolerate_known)
        finally:
            self.stats.seconds[rpc.name] += time.monotonic() - started

    async def _exercise(self, rpc: Rpc, messages: Sequence[Message], principal: str, tolerate_known: bool) -> None:
        request = messages[0]
        self.stats.principals[principal] += 1
        # made before the first snapshot: a new channel may issue a certificate (PKI state)
        self.endpoints.channel(rpc, principal)
        scope = scope_of(rpc)
        before = await self.snapshot(scope) if rpc.mutating else None
        journal_before = self._journal(rpc, request)
        outcome = await self.invoke(rpc, messages, principal)
        self.stats.codes[(rpc.name, outcome.code.name)] += 1
        bug = known_outcome(rpc, outcome.code.name, outcome.details) if tolerate_known else None
        if bug is None and rpc.client_streaming and _grpc_client_write_race(outcome, messages):
            bug = "grpc/grpc#36066 (client side)"
        if bug is not None:
            self.stats.known[bug] += 1
            problems: list[str] = []
        else:
            problems = self._check_outcome(messages, outcome)
        if outcome.ok and rpc.mutating:
            self._harvest(outcome)
            problems += await self._check_operations(outcome)
            if scope == PKI:
                # certificates and tokens change synchronously: nothing to wait for
                snap = await self.snapshot(ALL)
                await self._replenish_join_tokens({t for t, v in snap.join_tokens.items() if v.endswith("used=True")})
                await self.refresh(snap)
            else:
                settled = await self.settle()
                settled = await self.housekeeping(settled)
                await self.refresh(settled)
        elif rpc.mutating and before is not None:
            changes = await self._lasting_changes(before, scope)
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
                f"{rpc.name} as {principal} -> {outcome.code.name} {outcome.details[:300]!r}\n"
                f"request:\n  {sent}\nproblems:\n  - " + "\n  - ".join(problems)
            )

    async def _lasting_changes(self, before: Snapshot, scope: frozenset[str]) -> list[str]:
        """Differences from ``before`` that are still there after a moment.

        "Left behind" is what counts; and on a busy machine a heartbeat can arrive late, so the
        controller marks a live agent's host UNREACHABLE until its next beat a moment later.
        """
        deadline = time.monotonic() + LASTING_SECONDS
        changes = before.diff(await self.snapshot(scope))
        while changes and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            changes = before.diff(await self.snapshot(scope))
        return changes

    def _check_outcome(self, messages: Sequence[Message], outcome: Outcome) -> list[str]:
        problems: list[str] = []
        size = max(m.ByteSize() for m in messages)
        info = error_info(outcome.status)
        transport_limit = (
            outcome.code == grpc.StatusCode.RESOURCE_EXHAUSTED and size > GRPC_DEFAULT_MAX_MESSAGE and info is None
        )
        if outcome.code in FORBIDDEN_CODES:
            problems.append(f"status {outcome.code.name}")
        elif outcome.code == grpc.StatusCode.DEADLINE_EXCEEDED and not outcome.ended_by_us:
            problems.append(f"no answer within {UNARY_DEADLINE:g}s (a hang)")
        elif (
            outcome.code != grpc.StatusCode.OK
            and not outcome.ended_by_us
            and not transport_limit
            and (info is None or not info.reason)
        ):
            problems.append(f"{outcome.code.name} without an ErrorInfo reason")
        texts = [outcome.details]
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

    def _harvest(self, outcome: Outcome) -> None:
        """Use the join token an accepted request produced (CreateJoinToken) for the next Enrolls."""
        from clonebox_core.security.jointoken import JoinToken

        for resp in outcome.responses:
            token = getattr(resp, "token", None)
            if isinstance(token, str) and token:
                self.pools.join_tokens = [token]
                self.pools.token_hosts = [JoinToken.decode(token).host]

    def _journal(self, rpc: Rpc, request: Message) -> object:
        """What the fuzzed agent's journal holds for the request's id (agent RPCs only)."""
        rid = _request_id(request)
        if rpc.target != "agent" or not rid:
            return None
        return self.fleet.agents[TARGET_AGENT].journal.outcome(rid)

    # ---- state -----------------------------------------------------------------------------------

    async def snapshot(self, scope: frozenset[str] = ALL) -> Snapshot:
        """Controller and agent state as the API reports it, plus the fakes' inventories and the PKI."""
        started = time.monotonic()
        try:
            return await self._snapshot(scope)
        finally:
            self.stats.seconds["(snapshots)"] += time.monotonic() - started
            self.stats.codes[("(snapshots)", "taken")] += 1

    async def _snapshot(self, scope: frozenset[str]) -> Snapshot:
        # sequential on purpose: with everything in one process, parallel calls only fight over the GIL
        fleet, t = self.fleet, UNARY_DEADLINE
        vms, hosts, recent = vm_service_pb2.ListVmsResponse(), host_service_pb2.ListHostsResponse(), None
        tokens: dict[str, str] = {}
        certificates: dict[str, str] = {}
        if "pki" in scope:
            tokens, certificates = await asyncio.to_thread(self._pki_state)
        if "controller" in scope:
            vms = await fleet.vms.ListVms(vm_service_pb2.ListVmsRequest(page_size=1000), timeout=t)
            hosts = await fleet.hosts.ListHosts(host_service_pb2.ListHostsRequest(), timeout=t)
            # the newest operations: where a request that should have been rejected would add one
            recent = await fleet.ops.ListOperations(
                operation_service_pb2.ListOperationsRequest(page_size=RECENT_OPERATIONS), timeout=t
            )
            tokens, _ = await asyncio.to_thread(self._pki_state, certificates=False)
        agent_vms: dict[str, dict[str, tuple[int, str]]] = {}
        revisions: dict[str, tuple[int, int]] = {}
        inventories: dict[str, str] = {}
        for name in sorted(self.fleet.agents) if "agents" in scope else []:
            stub = agent_pb2_grpc.AgentServiceStub(self.endpoints.agent(name, "controller"))
            listing = await stub.ListVms(agent_pb2.ListVmsRequest(), timeout=t)
            agent_vms[name] = {v.name: (int(v.state), _vm_key(v, observed=False)) for v in listing.vms}
            revisions[name] = (listing.revision.epoch, listing.revision.sequence)
            inventories[name] = repr(await fleet.fakes[name].inventory())
        host_keys = {}
        for h in hosts.hosts:
            h2 = type(h)()
            h2.CopyFrom(h)
            h2.ClearField("last_heartbeat_time")
            host_keys[h.name] = text_format.MessageToString(h2, as_one_line=True)
        return Snapshot(
            controller_vms={v.name: (v.host, int(v.state), _vm_key(v, observed=True)) for v in vms.vms},
            hosts=host_keys,
            operations={
                o.id: text_format.MessageToString(o, as_one_line=True) for o in (recent.operations if recent else [])
            },
            agent_vms=agent_vms,
            agent_revisions=revisions,
            inventories=inventories,
            join_tokens=tokens,
            certificates=certificates,
        )

    def _pki_state(self, certificates: bool = True) -> tuple[dict[str, str], dict[str, str]]:
        """Join tokens and certificates (issued serials, revoked or not), read where the controller keeps
        them: the API never lists tokens, and listing certificates parses every one (too slow here)."""
        controller = self.fleet.controller
        engine = getattr(getattr(controller, "store", None), "engine", None)
        pki = getattr(controller, "pki", None)
        if engine is None or pki is None:
            return {}, {}
        from sqlalchemy import text

        with engine.connect() as conn:
            rows = conn.execute(text("SELECT id, host, used_time FROM join_tokens")).all()
            revoked = (
                set(conn.execute(text("SELECT serial FROM revoked_certificates")).scalars()) if certificates else set()
            )
        tokens = {str(r[0]): f"{r[1]} used={r[2] is not None}" for r in rows}
        certs: dict[str, str] = {}
        if certificates:
            for path in (Path(pki.ca.folder) / "issued").glob("*.crt"):
                certs[path.stem] = f"revoked={path.stem in revoked}"
            certs |= {serial: "revoked=True (not issued here)" for serial in revoked - set(certs)}
        return tokens, certs

    async def _running_operations(self) -> list[str]:
        running = await self.fleet.ops.ListOperations(
            operation_service_pb2.ListOperationsRequest(only_running=True, page_size=1000), timeout=UNARY_DEADLINE
        )
        return [o.id for o in running.operations]

    async def _page_tokens(self) -> list[str]:
        page = await self.fleet.vms.ListVms(vm_service_pb2.ListVmsRequest(page_size=1), timeout=UNARY_DEADLINE)
        return [page.next_page_token] if page.next_page_token else []

    async def _probe(self) -> tuple[object, ...]:
        """A cheap fingerprint of activity: event revisions of every agent and of the controller, and
        the operations still running. It stops changing when the fleet is quiet."""
        agents = []
        for name in sorted(self.fleet.agents):
            stub = agent_pb2_grpc.AgentServiceStub(self.endpoints.agent(name, "controller"))
            listing = await stub.ListVms(agent_pb2.ListVmsRequest(), timeout=UNARY_DEADLINE)
            agents.append((listing.revision.epoch, listing.revision.sequence))
        store: Any = getattr(self.fleet.controller, "store", None)
        revision = await asyncio.to_thread(store.current_revision) if hasattr(store, "current_revision") else None
        return (tuple(agents), revision, tuple(await self._running_operations()))

    async def settle(self, timeout: float = 15.0) -> Snapshot:
        """Wait until operations are done, nothing moves, and the controller agrees with the agents."""
        deadline = time.monotonic() + timeout
        why: list[str] = []
        while time.monotonic() < deadline:
            first = await self._probe()
            await asyncio.sleep(0.01)
            if await self._probe() != first or first[2]:
                why = [f"still moving: {first}"]
                continue
            snap = await self.snapshot(FLEET)
            why = snap.unconverged()
            if why:
                await asyncio.sleep(0.02)
                continue
            if await self._probe() == first:
                return snap
        raise Finding(f"the fleet did not settle within {timeout:g}s:\n    " + "\n    ".join(why[:20]))

    async def housekeeping(self, snap: Snapshot) -> Snapshot:
        """Keep between MIN_VMS and MAX_VMS VMs (so the fakes never fill up and targets exist) and
        enough unused join tokens."""
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
                stub = agent_pb2_grpc.AgentServiceStub(self.endpoints.agent(agent, "controller"))
                await stub.DeleteVm(agent_pb2.DeleteVmRequest(name=name), timeout=UNARY_DEADLINE)
                changed = True
        if len(snap.controller_vms) - len(surplus) < MIN_VMS:
            await self.fleet.hosts.UncordonHost(host_service_pb2.UncordonHostRequest(name="h1"))
            self._seed_counter += 1
            await self._create(f"seed-{self._seed_counter}", host="h1")
            changed = True
        if self.pools.join_tokens or self.pools.csrs:
            # tokens live apart from VMs and hosts: no need to settle again for a new one
            await self._replenish_join_tokens({t for t, v in snap.join_tokens.items() if v.endswith("used=True")})
        return await self.settle() if changed else snap

    async def refresh(self, snap: Snapshot) -> None:
        """Point the valid-looking strategies at what exists now."""
        p = self.pools
        if snap.agent_vms:
            p.vm_names = sorted(set(snap.controller_vms) | {n for vms in snap.agent_vms.values() for n in vms})
            p.agent_revisions = sorted(set(snap.agent_revisions.values()))
        if snap.hosts:
            p.host_names = sorted(snap.hosts)
            p.operation_ids = sorted(snap.operations)
        p.request_ids = sorted({"seed-stop", "seed-bad", *(f"seed-{n}" for n in p.vm_names)})
        p.page_tokens = await self._page_tokens()
        if snap.certificates:
            victims = {
                s: _cert_name(i) for s, i in snap.certificates.items() if _cert_name(i).startswith(VICTIM_PREFIX)
            }
            p.serials = sorted(victims)
            p.cert_names = sorted(set(victims.values()))
        store = getattr(self.fleet.controller, "store", None)
        if store is not None and hasattr(store, "current_revision"):
            p.fleet_revision = int(await asyncio.to_thread(store.current_revision))


async def _client_stream(ch: grpc.aio.Channel, rpc: Rpc, messages: Sequence[Message]) -> Outcome:
    """Write the messages one by one, pausing after each so a rejection arrives before the next write.

    grpcio's asyncio client reports INTERNAL "Internal error from Core" instead of the server's status
    when it writes after the server has ended the call (grpc/grpc#36066); pacing the writes and
    stopping once the call is done keeps that client-side race from being blamed on the server.
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


def _grpc_client_write_race(outcome: Outcome, messages: Sequence[Message]) -> bool:
    """The client-side symptom of grpc/grpc#36066: it never carries the server's rich status."""
    return (
        outcome.code == grpc.StatusCode.INTERNAL
        and outcome.status is None
        and outcome.details == "Internal error from Core"
        and len(messages) > 1
    )


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
        return rpc_status.from_call(exc)
    except ValueError:
        return None


def _cert_name(identity: str) -> str:
    """``spiffe://td/agent/h1 revoked=False`` -> ``h1``; ``spiffe://td/user/admin/alice`` -> ``alice``."""
    parts = identity.split(maxsplit=1)[0].removeprefix("spiffe://").split("/")
    return parts[-1] if len(parts) > 2 else identity


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


def _request_id(request: Message) -> str:
    fd = request.DESCRIPTOR.fields_by_name.get("request_id")
    return str(getattr(request, "request_id", "")) if fd is not None else ""
