"""Product bugs the fuzzer found that are not fixed yet.

Each entry says which requests trigger it (those are not sent, so one known bug cannot hide new
ones, and a destructive one cannot wreck the fleet mid-run) or which outcome it produces (tolerated
and counted). ``test_known_bugs.py`` replays each entry's exact ``repro`` request as a strict xfail:
once the bug is fixed that test passes unexpectedly and fails the run, which is the cue to delete the
entry here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from clonebox.agent.v1 import agent_pb2
from clonebox.controller.v1 import operation_service_pb2, vm_service_pb2
from clonebox.type.v1 import vm_pb2
from google.protobuf.message import Message

from tests.fuzz.strategies import Rpc


@dataclass(frozen=True)
class KnownBug:
    """One open bug."""

    key: str
    #: ``Service.Method`` it was found on
    rpc: str
    #: where it comes from and what a fix looks like
    reason: str
    #: one request that triggers it (replayed by test_known_bugs.py)
    repro: Message
    #: requests that trigger it: not sent during fuzzing
    skip: Callable[[Sequence[Message]], bool] | None = None
    #: outcomes it produces, by (status code name, details): tolerated during fuzzing
    tolerate: Callable[[str, str], bool] | None = None
    #: applies to every RPC, not only ``rpc``
    any_rpc: bool = False


_VM_STATES = frozenset(vm_pb2.VmState.values())

KNOWN_BUGS: list[KnownBug] = [
    KnownBug(
        key="LIST_VMS_STATE_OUT_OF_RANGE",
        rpc="VmService.ListVms",
        reason=(
            "controller/clonebox_controller/grpc/servicers.py VmServicer.ListVms calls VmState(request.state) "
            "on the raw enum number; proto3 enums are open, so e.g. state=99 raises ValueError -> INTERNAL. "
            "Fix: reject numbers outside VmState with INVALID_ARGUMENT (field 'state')."
        ),
        repro=vm_service_pb2.ListVmsRequest(state=99),  # type: ignore[arg-type]
        skip=lambda msgs: msgs[0].state not in _VM_STATES,  # type: ignore[attr-defined]
    ),
    KnownBug(
        key="AGENT_VM_NAME_PATH_TRAVERSAL",
        rpc="AgentService.DeleteVm",
        reason=(
            "AgentService Get/Start/Stop/DeleteVm never check that `name` is a DNS label "
            "(agent/clonebox_agent/app/service.py); the adapters build paths from it "
            "(common.vm_dir(storage_dir, 'cb-' + name)), so DeleteVm(name='<existing-vm>/../../x') "
            "answers OK and shutil.rmtree()s <storage>/x - any folder the agent can write, once one VM "
            "exists (the libvirt adapter's _delete_folder does the same: an unmarked folder passes its "
            "owner check). Fix: check_dns_label('name', name) at the top of every agent use case taking "
            "a name (and, defensively, refuse a vm_dir that does not resolve inside storage_dir/vms)."
        ),
        repro=agent_pb2.DeleteVmRequest(name="web-1/../canary", request_id="known-bug-traversal"),
        skip=lambda msgs: "/" in msgs[0].name,  # type: ignore[attr-defined]
    ),
    KnownBug(
        key="ERROR_TRAILERS_TOO_LARGE",
        rpc="OperationService.GetOperation",
        any_rpc=True,
        reason=(
            "Error messages and ErrorInfo metadata echo request values without a length limit "
            "(check_dns_label's \"'{value}' is not a DNS label\", NotFound's 'operation {id!r} does not "
            "exist' + metadata {'operation': id}, ...). The message goes out twice (grpc-message and "
            "inside grpc-status-details-bin), so a few KiB of input exceed gRPC's 8 KiB metadata soft "
            "limit and the client gets RESOURCE_EXHAUSTED 'Stream removed (received metadata size "
            "exceeds ...)' with no ErrorInfo: the real error is lost. Fix: cap echoed values (e.g. "
            "128 chars with an ellipsis) in clonebox_core.errors / rpc.status.to_status_proto."
        ),
        repro=operation_service_pb2.GetOperationRequest(id="x" * 20_000),
        tolerate=lambda code, details: (
            code == "RESOURCE_EXHAUSTED" and "received metadata size exceeds" in details
        ),
    ),
]


def known_skip(rpc: Rpc, messages: Sequence[Message]) -> str | None:
    """The key of the known bug that makes ``messages`` not worth sending, if any."""
    for bug in KNOWN_BUGS:
        if bug.skip is not None and bug.rpc == rpc.name and bug.skip(messages):
            return bug.key
    return None


def known_outcome(rpc: Rpc, code: str, details: str) -> str | None:
    """The key of the known bug an outcome is a symptom of, if any."""
    for bug in KNOWN_BUGS:
        if bug.tolerate is not None and (bug.any_rpc or bug.rpc == rpc.name) and bug.tolerate(code, details):
            return bug.key
    return None
