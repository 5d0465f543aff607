"""gRPC implementation of the agent gateway: one channel per agent address, errors mapped back."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc
import grpc.aio
from clonebox.agent.v1 import agent_pb2, agent_pb2_grpc
from clonebox.type.v1 import snapshot_pb2

from clonebox_core.errors import CloneboxError, Unavailable
from clonebox_core.health import ActionRecord, Aggregate, ProbeResult, Transition, VmHealth
from clonebox_core.model import CreatePlan, Orphan, Revision, Transaction, Vm, VmSpec, Volume
from clonebox_core.plan import UpdateResult
from clonebox_core.rpc import convert, convert_health
from clonebox_core.rpc.convert_plan import change_kind_from_proto
from clonebox_core.rpc.convert_snapshot import (
    decision_from_proto,
    kind_to_proto,
    policy_from_proto,
    policy_to_proto,
    snapshot_from_proto,
)
from clonebox_core.rpc.server import Transport, aio_channel
from clonebox_core.rpc.status import error_from_rpc
from clonebox_core.secret import Secret
from clonebox_core.snapshots import PruneDecision, Snapshot, SnapshotKind, SnapshotPolicy

T = TypeVar("T")
log = logging.getLogger(__name__)

#: unary calls to an agent; CreateVm and StopVm may take minutes (image copy, graceful stop)
#: how often the gateway looks for renewed certificate files
_STAMP_CHECK_SECONDS = 1.0
_SHORT_TIMEOUT = 30.0
_LONG_TIMEOUT = 3700.0
#: CheckHealth runs probes now; a probe's timeout is shorter than its interval, usually seconds
_CHECK_TIMEOUT = 120.0


@dataclass(frozen=True)
class WatchEvent:
    """One agent event as the controller consumes it."""

    revision: Revision
    deleted: bool
    vm: Vm


@dataclass(frozen=True)
class ConsoleChunk:
    """One piece of a VM's serial console log as the controller passes it on."""

    data: bytes
    offset: int


@dataclass(frozen=True)
class HealthUpdate:
    """One message of an agent's WatchHealth stream as the controller consumes it."""

    health: VmHealth | None
    transitions: tuple[Transition, ...] = ()
    aggregates: tuple[Aggregate, ...] = ()
    actions: tuple[ActionRecord, ...] = ()
    removed: bool = False
    synced: bool = False


def health_update_from_proto(m: agent_pb2.WatchHealthResponse) -> HealthUpdate:
    """Proto -> HealthUpdate (ValueError for a timestamp out of range)."""
    try:
        return HealthUpdate(
            health=convert_health.vm_health_from_proto(m.health) if m.HasField("health") else None,
            transitions=tuple(convert_health.transition_from_proto(t) for t in m.transitions),
            aggregates=tuple(convert_health.aggregate_from_proto(a) for a in m.aggregates),
            actions=tuple(convert_health.action_from_proto(a) for a in m.actions),
            removed=m.removed,
            synced=m.synced,
        )
    except (OverflowError, OSError) as exc:
        raise ValueError(f"bad timestamp: {exc}") from None


_Answer = agent_pb2.CreateVmResponse | agent_pb2.StartVmResponse | agent_pb2.StopVmResponse | agent_pb2.UpdateVmResponse


def _answered(resp: _Answer) -> Revision | None:
    """The agent's event revision in an answer about a change (None from an agent that does not send it)."""
    return convert.revision_from_proto(resp.revision) if resp.HasField("revision") else None


class GrpcAgentClient:
    """Client for one agent."""

    def __init__(
        self, host: str, address: str, transport: Transport, trust_domain: str, stamp: tuple[int, ...] = ()
    ) -> None:
        self.host = host
        self.address = address
        # the agent must present the certificate of exactly this host
        server_name = f"{host}.agent.{trust_domain}" if trust_domain else None
        self._channel = aio_channel(address, transport, server_name)
        #: the gateway's view of the certificate files when this channel was built
        self.stamp = stamp
        self._stub = agent_pb2_grpc.AgentServiceStub(self._channel)

    def _error(self, exc: grpc.aio.AioRpcError) -> CloneboxError:
        """The agent's own error, or AGENT_UNREACHABLE naming the host when the call never got an answer.

        Passed on to a client as is, a bare UNREACHABLE would read as the client's own connection failing.
        """
        err = error_from_rpc(exc, target=f"agent {self.host} at {self.address}")
        if isinstance(err, Unavailable) and err.reason == "UNREACHABLE":
            return Unavailable(err.message, reason="AGENT_UNREACHABLE", metadata={"host": self.host})
        return err

    async def _call(self, fn: Callable[[], Awaitable[T]]) -> T:
        try:
            return await fn()
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from None

    async def create_vm(self, spec: VmSpec, request_id: str) -> tuple[Vm, Revision | None]:
        """CreateVm (and start): the VM and the agent's event revision when it answered."""
        req = agent_pb2.CreateVmRequest(spec=convert.spec_to_proto(spec), request_id=request_id, start=True)
        resp = await self._call(lambda: self._stub.CreateVm(req, timeout=_LONG_TIMEOUT))
        return convert.vm_from_proto(resp.vm), _answered(resp)

    async def plan_create(self, spec: VmSpec) -> CreatePlan:
        """CreateVm with dry_run: the agent's steps and domain XML."""
        req = agent_pb2.CreateVmRequest(spec=convert.spec_to_proto(spec), start=True, dry_run=True)
        resp = await self._call(lambda: self._stub.CreateVm(req, timeout=_SHORT_TIMEOUT))
        return convert.plan_from_proto(resp.plan)

    async def get_vm(self, name: str) -> Vm:
        """GetVm."""
        resp = await self._call(lambda: self._stub.GetVm(agent_pb2.GetVmRequest(name=name), timeout=_SHORT_TIMEOUT))
        return convert.vm_from_proto(resp.vm)

    async def get_ssh_key(self, name: str, actor: str) -> tuple[Secret, str]:
        """GetSshKey: the VM's generated private key and its guest user."""
        req = agent_pb2.GetSshKeyRequest(name=name, actor=actor)
        resp = await self._call(lambda: self._stub.GetSshKey(req, timeout=_SHORT_TIMEOUT))
        return Secret(resp.private_key), resp.user

    async def read_console(
        self, name: str, tail_bytes: int, follow: bool, from_offset: int | None = None
    ) -> AsyncIterator[ConsoleChunk]:
        """ReadConsole: the log's pieces as the agent sends them (a follow has no deadline); from_offset resumes."""
        req = agent_pb2.ReadConsoleRequest(name=name, tail_bytes=tail_bytes, follow=follow, from_offset=from_offset)
        call = self._stub.ReadConsole(req, timeout=None if follow else _SHORT_TIMEOUT)
        try:
            async for msg in call:
                yield ConsoleChunk(msg.data, msg.offset)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from None
        finally:
            call.cancel()

    async def rotate_secret(
        self, name: str, request_id: str, password_hash: Secret, expire: bool, keys: tuple[str, ...], replace_keys: bool
    ) -> tuple[str, list[str]]:
        """RotateSecret (guest commands can take a while: the long deadline)."""
        req = agent_pb2.RotateSecretRequest(
            name=name,
            request_id=request_id,
            password_hash=password_hash.reveal(),  # a hash, to the agent that sets it, over mTLS
            expire_password=expire,
            ssh_authorized_keys=keys,
            replace_keys=replace_keys,
        )
        resp = await self._call(lambda: self._stub.RotateSecret(req, timeout=_LONG_TIMEOUT))
        return resp.user, list(resp.changed)

    async def list_vms(self) -> tuple[list[Vm], Revision]:
        """ListVms."""
        resp = await self._call(lambda: self._stub.ListVms(agent_pb2.ListVmsRequest(), timeout=_SHORT_TIMEOUT))
        return [convert.vm_from_proto(v) for v in resp.vms], convert.revision_from_proto(resp.revision)

    async def start_vm(self, name: str, request_id: str) -> tuple[Vm, Revision | None]:
        """StartVm: the VM and the agent's event revision when it answered."""
        req = agent_pb2.StartVmRequest(name=name, request_id=request_id)
        resp = await self._call(lambda: self._stub.StartVm(req, timeout=_SHORT_TIMEOUT))
        return convert.vm_from_proto(resp.vm), _answered(resp)

    async def stop_vm(
        self, name: str, request_id: str, timeout_seconds: int, force: bool
    ) -> tuple[Vm, Revision | None]:
        """StopVm: the VM and the agent's event revision when it answered."""
        req = agent_pb2.StopVmRequest(name=name, request_id=request_id, timeout_seconds=timeout_seconds, force=force)
        resp = await self._call(lambda: self._stub.StopVm(req, timeout=_LONG_TIMEOUT))
        return convert.vm_from_proto(resp.vm), _answered(resp)

    async def update_vm(self, spec: VmSpec, request_id: str, timeout_seconds: int) -> UpdateResult:
        """UpdateVm (a restart's graceful shutdown can take minutes: the long deadline)."""
        req = agent_pb2.UpdateVmRequest(
            spec=convert.spec_to_proto(spec), request_id=request_id, timeout_seconds=timeout_seconds
        )
        resp = await self._call(lambda: self._stub.UpdateVm(req, timeout=_LONG_TIMEOUT))
        return UpdateResult(
            vm=convert.vm_from_proto(resp.vm),
            kind=change_kind_from_proto(resp.kind),
            fields=tuple(resp.fields),
            restarted=resp.restarted,
            forced=resp.forced,
            revision=_answered(resp),
        )

    async def delete_vm(self, name: str, request_id: str, with_snapshots: bool = False) -> list[str]:
        """DeleteVm (the agent refuses a VM with snapshots unless ``with_snapshots``)."""
        req = agent_pb2.DeleteVmRequest(name=name, request_id=request_id, with_snapshots=with_snapshots)
        resp = await self._call(lambda: self._stub.DeleteVm(req, timeout=_LONG_TIMEOUT))
        return list(resp.removed_paths)

    async def list_transactions(self, include_committed: bool, limit: int) -> list[Transaction]:
        """ListTransactions."""
        req = agent_pb2.ListTransactionsRequest(include_committed=include_committed, page_size=limit)
        resp = await self._call(lambda: self._stub.ListTransactions(req, timeout=_SHORT_TIMEOUT))
        return [convert.transaction_from_proto(t) for t in resp.transactions]

    async def recover(self, sweep: bool, request_id: str) -> tuple[list[Transaction], list[Orphan]]:
        """Recover."""
        req = agent_pb2.RecoverRequest(sweep=sweep, request_id=request_id)
        resp = await self._call(lambda: self._stub.Recover(req, timeout=_LONG_TIMEOUT))
        return (
            [convert.transaction_from_proto(t) for t in resp.rolled_back],
            [convert.orphan_from_proto(o) for o in resp.orphans],
        )

    async def watch_vms(self, after: Revision | None) -> AsyncIterator[WatchEvent]:
        """WatchVms; raises FailedPrecondition(REVISION_EXPIRED) when the agent wants a re-list."""
        req = agent_pb2.WatchVmsRequest()
        if after is not None:
            req.after.CopyFrom(convert.revision_to_proto(after))
        call = self._stub.WatchVms(req)
        try:
            async for ev in call:
                yield WatchEvent(
                    convert.revision_from_proto(ev.revision),
                    ev.type == agent_pb2.VM_EVENT_TYPE_DELETED,
                    convert.vm_from_proto(ev.vm),
                )
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from None
        finally:
            call.cancel()

    async def watch_health(self) -> AsyncIterator[HealthUpdate]:
        """WatchHealth: a snapshot of every VM's health, ``synced``, then updates (errors mapped back)."""
        call = self._stub.WatchHealth(agent_pb2.WatchHealthRequest())
        try:
            async for msg in call:
                try:
                    update = health_update_from_proto(msg)
                except ValueError as exc:
                    # one bad message from a buggy agent must not end the stream (it would come back
                    # with every snapshot): leave it out
                    log.warning("agent %s sent a health update that cannot be read (%s); skipped", self.host, exc)
                    continue
                yield update
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from None
        finally:
            call.cancel()

    async def check_health(self, name: str, check: str) -> tuple[list[ProbeResult], VmHealth | None]:
        """CheckHealth: run a VM's checks now (each probe may use its whole timeout)."""
        req = agent_pb2.CheckHealthRequest(name=name, check=check)
        resp = await self._call(lambda: self._stub.CheckHealth(req, timeout=_CHECK_TIMEOUT))
        health = convert_health.vm_health_from_proto(resp.health) if resp.HasField("health") else None
        return [convert_health.result_from_proto(r) for r in resp.results], health

    # ---- snapshots ----------------------------------------------------------------------------

    async def create_snapshot(
        self,
        vm: str,
        name: str,
        *,
        description: str,
        tags: dict[str, str],
        kind: SnapshotKind | None,
        quiesce: bool,
        request_id: str,
        creator: str,
    ) -> Snapshot:
        """CreateSnapshot (a memory snapshot of a big guest takes a while: the long deadline)."""
        req = agent_pb2.CreateSnapshotRequest(
            vm=vm,
            name=name,
            description=description,
            tags=tags,
            kind=kind_to_proto(kind),
            quiesce=quiesce,
            request_id=request_id,
            creator=creator,
        )
        resp = await self._call(lambda: self._stub.CreateSnapshot(req, timeout=_LONG_TIMEOUT))
        return snapshot_from_proto(resp.snapshot)

    async def list_snapshots(self, vm: str) -> tuple[list[Snapshot], SnapshotPolicy]:
        """ListSnapshots."""
        req = agent_pb2.ListSnapshotsRequest(vm=vm)
        resp = await self._call(lambda: self._stub.ListSnapshots(req, timeout=_SHORT_TIMEOUT))
        return [snapshot_from_proto(s) for s in resp.snapshots], policy_from_proto(resp.policy)

    async def restore_snapshot(
        self, vm: str, name: str, *, no_start: bool, no_backup: bool, request_id: str, creator: str
    ) -> tuple[Vm, Snapshot | None]:
        """RestoreSnapshot."""
        req = agent_pb2.RestoreSnapshotRequest(
            vm=vm, name=name, no_start=no_start, no_backup=no_backup, request_id=request_id, creator=creator
        )
        resp = await self._call(lambda: self._stub.RestoreSnapshot(req, timeout=_LONG_TIMEOUT))
        backup = snapshot_from_proto(resp.backup) if resp.HasField("backup") else None
        return convert.vm_from_proto(resp.vm), backup

    async def delete_snapshot(self, vm: str, name: str, *, children: bool, request_id: str) -> list[str]:
        """DeleteSnapshot (merging an external snapshot's overlay can take a while)."""
        req = agent_pb2.DeleteSnapshotRequest(vm=vm, name=name, children=children, request_id=request_id)
        resp = await self._call(lambda: self._stub.DeleteSnapshot(req, timeout=_LONG_TIMEOUT))
        return list(resp.deleted)

    async def set_snapshot_policy(self, vm: str, policy: SnapshotPolicy, request_id: str) -> SnapshotPolicy:
        """SetSnapshotPolicy."""
        req = agent_pb2.SetSnapshotPolicyRequest(vm=vm, policy=policy_to_proto(policy), request_id=request_id)
        resp = await self._call(lambda: self._stub.SetSnapshotPolicy(req, timeout=_SHORT_TIMEOUT))
        return policy_from_proto(resp.policy)

    async def prune_snapshots(self, vm: str, *, dry_run: bool, request_id: str) -> list[PruneDecision]:
        """PruneSnapshots."""
        req = agent_pb2.PruneSnapshotsRequest(vm=vm, dry_run=dry_run, request_id=request_id)
        resp = await self._call(lambda: self._stub.PruneSnapshots(req, timeout=_LONG_TIMEOUT))
        return [decision_from_proto(d) for d in resp.decisions]

    async def export_snapshot(self, vm: str, name: str) -> AsyncIterator[snapshot_pb2.SnapshotImagePart]:
        """ExportSnapshot: the parts as the agent sends them, one at a time (gRPC flow control paces it)."""
        # no deadline: an export of a large disk over a slow link may take hours; the caller's
        # cancellation (its client went away) ends the call through ``finally``
        call = self._stub.ExportSnapshot(agent_pb2.ExportSnapshotRequest(vm=vm, name=name))
        try:
            async for msg in call:
                yield msg.part
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from None
        finally:
            call.cancel()

    async def import_snapshot(self, header: object, request_id: str, rest: AsyncIterator[object]) -> Vm:
        """ImportSnapshot: the header (request id replaced, host cleared), then ``rest``, pumped as read."""
        if not isinstance(header, snapshot_pb2.SnapshotImagePart):
            raise TypeError(f"import header is a {type(header).__name__}, not a SnapshotImagePart")
        first = snapshot_pb2.SnapshotImagePart()
        first.CopyFrom(header)
        first.header.request_id = request_id
        first.header.host = ""  # the placement is made; the agent is the place
        failure: list[BaseException] = []

        async def requests() -> AsyncIterator[agent_pb2.ImportSnapshotRequest]:
            yield agent_pb2.ImportSnapshotRequest(part=first)
            try:
                async for part in rest:
                    if not isinstance(part, snapshot_pb2.SnapshotImagePart):
                        raise TypeError(f"import part is a {type(part).__name__}, not a SnapshotImagePart")
                    yield agent_pb2.ImportSnapshotRequest(part=part)
            except Exception as exc:
                # the sender failed: cancel, never half-close, so the agent discards what it received
                # instead of judging a stream that merely ended early
                failure.append(exc)
                call.cancel()

        call = self._stub.ImportSnapshot(requests())
        try:
            resp = await call
        except grpc.aio.AioRpcError as exc:
            if failure:
                raise failure[0] from None
            raise self._error(exc) from None
        except asyncio.CancelledError:
            if failure:
                raise failure[0] from None
            raise
        finally:
            if not call.done():
                call.cancel()
        return convert.vm_from_proto(resp.vm)

    # ---- volumes ------------------------------------------------------------------------------

    async def create_volume(
        self, name: str, size_mib: int, shared: bool, labels: dict[str, str], request_id: str
    ) -> Volume:
        """CreateVolume (a large file is allocated: the long deadline)."""
        req = agent_pb2.CreateVolumeRequest(
            name=name, size_mib=size_mib, shared=shared, labels=labels, request_id=request_id
        )
        resp = await self._call(lambda: self._stub.CreateVolume(req, timeout=_LONG_TIMEOUT))
        return convert.volume_from_proto(resp.volume)

    async def delete_volume(self, name: str, request_id: str) -> None:
        """DeleteVolume."""
        req = agent_pb2.DeleteVolumeRequest(name=name, request_id=request_id)
        await self._call(lambda: self._stub.DeleteVolume(req, timeout=_LONG_TIMEOUT))

    async def list_volumes(self) -> list[Volume]:
        """ListVolumes."""
        resp = await self._call(lambda: self._stub.ListVolumes(agent_pb2.ListVolumesRequest(), timeout=_SHORT_TIMEOUT))
        return [convert.volume_from_proto(v) for v in resp.volumes]

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close()


class GrpcAgentGateway:
    """Caches one client per (host, address)."""

    def __init__(self, transport: Transport, trust_domain: str) -> None:
        self._transport = transport
        self._trust_domain = trust_domain
        self._clients: dict[str, GrpcAgentClient] = {}
        #: clients replaced by a newer one. Not closed before the gateway is: an operation may hold one across
        #: its retries, and a channel without calls goes idle and drops its connection by itself (30 min)
        self._retired: list[GrpcAgentClient] = []
        self._stamp: tuple[int, ...] = ()
        self._stamp_checked = float("-inf")

    def _tls_stamp(self) -> tuple[int, ...]:
        # every agent call asks for a client: look at the certificate files at most once a second
        if self._transport.tls is None:
            return ()
        now = time.monotonic()
        if now - self._stamp_checked >= _STAMP_CHECK_SECONDS:
            self._stamp, self._stamp_checked = self._transport.tls.stamp(), now
        return self._stamp

    def client(self, host: str, address: str) -> GrpcAgentClient:
        """The client for ``host`` at ``address``; rebuilt when the address or our certificate changed."""
        current = self._clients.get(host)
        stamp = self._tls_stamp()
        if current is None or current.address != address or current.stamp != stamp:
            if current is not None:
                self._retired.append(current)
            current = GrpcAgentClient(host, address, self._transport, self._trust_domain, stamp)
            self._clients[host] = current
        return current

    def reconnect(self, host: str) -> None:
        """Dial ``host`` afresh on its next call: its agent has just (re)connected its session.

        A channel whose agent was gone sits in gRPC's connect back-off (up to two minutes after a long
        outage) and fails every call at once until its next attempt, although the agent serves again.
        """
        current = self._clients.pop(host, None)
        if current is not None:
            self._retired.append(current)

    async def close(self) -> None:
        """Close every channel."""
        for c in [*self._clients.values(), *self._retired]:
            await c.close()
        self._clients.clear()
        self._retired.clear()
