"""
Rendering: rich tables for people, stable JSON for programs.

JSON is the protobuf JSON mapping of the API messages with the proto field names (``memory_mib``, not
``memoryMib``), every scalar field present even when zero, 64-bit integers as numbers, enums by name and
keys sorted, so scripts can rely on it. Lists are wrapped in an object named after the collection
(``{"vms": [...], "next_page_token": ""}``) to leave room for more keys later. Tables go to stdout;
progress and errors go to stderr, so ``-o json`` output can be piped safely.
"""

from __future__ import annotations

import enum
import json
import os
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import typer
from clonebox.type.v1 import host_pb2, operation_pb2, vm_pb2
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from rich.console import Console
from rich.table import Table

from clonebox_core import model
from clonebox_core.plan import is_held
from clonebox_core.rpc.convert import host_from_proto, operation_error, vm_from_proto
from clonebox_core.units import format_size


class OutputFormat(enum.StrEnum):
    """The ``--output`` choices."""

    table = "table"
    json = "json"


def message_dict(msg: Message) -> dict[str, Any]:
    """Convert a message to a JSON-ready dict with stable keys."""
    return MessageToDict(
        msg,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
        unquote_int64_if_possible=True,
    )


def emit_json(obj: Any) -> None:
    """Print ``obj`` as indented JSON with sorted keys on stdout."""
    typer.echo(json.dumps(obj, indent=2, sort_keys=True))


#: width for tables written to a pipe or file: wide enough that rows are never folded (rich would
#: otherwise assume 80 columns), while tables still shrink to their content
_PIPE_WIDTH = 1000


def console() -> Console:
    """Return a console on the current stdout (made per call: test runners swap stdout)."""
    out = Console(highlight=False)
    if not out.is_terminal and "COLUMNS" not in os.environ:
        out = Console(highlight=False, width=_PIPE_WIDTH)
    return out


def human_size(mib: int) -> str:
    """Round a size for tables: ``128MiB``, ``1GiB``, ``15.5GiB`` (exact spellings are in JSON)."""
    for unit, factor in (("TiB", 1024 * 1024), ("GiB", 1024)):
        if mib >= factor:
            value = mib / factor
            text = f"{value:.1f}".removesuffix(".0")
            return f"{text}{unit}"
    return f"{mib}MiB"


def _age(when: datetime | None, now: datetime | None = None) -> str:
    if when is None:
        return "-"
    seconds = int(((now or datetime.now(UTC)) - when).total_seconds())
    if seconds < 0:
        return "0s"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _ts(msg: Message, field: str) -> datetime | None:
    if not msg.HasField(field):
        return None
    value: datetime = getattr(msg, field).ToDatetime(tzinfo=UTC)
    return value


def _when(value: datetime | None) -> str:
    if value is None:
        return "-"
    return f"{value.isoformat(timespec='seconds')} ({_age(value)} ago)"


def age(when: datetime | None, now: datetime | None = None) -> str:
    """How long ago ``when`` was, shortest: ``42s``, ``5m``, ``3h``, ``2d`` (``-`` when unset)."""
    return _age(when, now)


def timestamp(msg: Message, field: str) -> datetime | None:
    """The UTC time in a message's Timestamp ``field``, or None when it is unset."""
    return _ts(msg, field)


def when(value: datetime | None) -> str:
    """An ISO time with its age: ``2026-11-26T10:00:00+00:00 (5m ago)`` (``-`` when unset)."""
    return _when(value)


def _state(value: enum.Enum) -> str:
    return value.name.lower().replace("_", "-")


def vm_state_word(state: model.VmState, reason: str) -> str:
    """A VM's state as listings show it: ``running``, ...; ``held``: pending, its room held by a plan run."""
    if state is model.VmState.PENDING and is_held(reason):
        return "held"
    return _state(state)


def _labels(labels: Iterable[tuple[str, str]]) -> str:
    return ",".join(f"{k}={v}" for k, v in labels) or "-"


def _details(rows: Sequence[tuple[str, str]]) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")
    for key, value in rows:
        grid.add_row(key, value)
    return grid


def make_table(*columns: str) -> Table:
    """Return a borderless table with these column headers."""
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in columns:
        table.add_column(col, overflow="fold")
    return table


# ------------------------------------------------------------------------------------------------ VMs


def vm_table(vms: Sequence[vm_pb2.Vm]) -> Table:
    """One row per VM."""
    table = make_table("NAME", "HOST", "STATE", "VCPUS", "MEMORY", "ADDRESSES", "LABELS", "AGE")
    for msg in vms:
        vm = vm_from_proto(msg)
        table.add_row(
            vm.name,
            vm.host or "-",
            vm_state_word(vm.state, vm.state_reason),
            str(vm.spec.vcpus),
            human_size(vm.spec.memory_mib),
            ",".join(a.address for a in vm.addresses) or "-",
            _labels(vm.spec.labels),
            _age(vm.create_time),
        )
    return table


def _disk(d: model.DiskSpec) -> str:
    base = d.base_image or "blank"
    return f"{d.name}: {base}" + (f" ({format_size(d.size_mib)})" if d.size_mib else "")


def _share(f: model.SharedFolder) -> str:
    where = f" at {f.mount}" if f.mount else ""
    driver = " (virtiofs)" if f.driver is model.ShareDriver.VIRTIOFS else ""
    return f"{f.host_path} -> {f.tag}{where}{driver}" + (" (read-only)" if f.read_only else "")


def _login(auth: model.Auth | None) -> str:
    if auth is None:
        return "-"
    method = auth.method.name.lower()
    if auth.method.uses_keys:
        keys = f"{len(auth.ssh_authorized_keys)} key(s)" if auth.ssh_authorized_keys else "generated key (vm ssh-key)"
        method += f", {keys}"
    if auth.password:
        method += f", password from {auth.password}"
    return f"{auth.user} ({method})"


def _provision(prov: model.Provision | None) -> str:
    if prov is None:
        return "-"
    parts = [
        f"{len(items)} {what}"
        for what, items in (
            ("packages", prov.packages),
            ("snaps", prov.snap_packages),
            ("services", prov.services),
            ("commands", prov.post_commands),
        )
        if items
    ]
    return ", ".join(parts) or "-"


def _cloud_init(spec: model.VmSpec) -> str:
    if not spec.has_seed:
        return "no"
    detach = spec.cloud_init is not None and spec.cloud_init.detach_seed_after_boot
    return "seed attached" + (" until cloud-init is done" if detach else "")


def vm_details(msg: vm_pb2.Vm) -> Table:
    """Every field of one VM."""
    vm = vm_from_proto(msg)
    spec = vm.spec
    state = _state(vm.state) + (f" ({vm.state_reason})" if vm.state_reason else "")
    boot = "first disk"
    if spec.kernel_boot is not None:
        kb = spec.kernel_boot
        boot = f"kernel {kb.kernel}" + (f", initrd {kb.initrd}" if kb.initrd else "")
        boot += f", cmdline {kb.cmdline!r}" if kb.cmdline else ""
    network = (
        "none" if spec.network.mode is model.NetworkMode.NONE else f"libvirt network {spec.network.libvirt_network}"
    )
    rows = [
        ("Name", vm.name),
        ("Host", vm.host or "-"),
        ("State", state),
        ("UUID", vm.uuid or "-"),
        ("vCPUs", str(spec.vcpus)),
        ("Memory", format_size(spec.memory_mib)),
        ("Disks", "\n".join(_disk(d) for d in spec.disks) or "-"),
        ("Boot", boot),
        ("Network", network),
        (
            "Shared folders",
            "\n".join(_share(f) for f in spec.shared_folders) or "-",
        ),
        ("Login", _login(spec.auth)),
        ("Provision", _provision(spec.provision)),
        ("Cloud-init", _cloud_init(spec)),
        ("Labels", _labels(spec.labels)),
        (
            "Addresses",
            "\n".join(f"{a.address}/{a.prefix} ({a.interface}, {a.source})" for a in vm.addresses) or "-",
        ),
        ("Created", _when(vm.create_time)),
        ("Updated", _when(vm.update_time)),
    ]
    return _details(rows)


# ---------------------------------------------------------------------------------------------- hosts


def _used(allocated: int, allocatable: int, fmt: Any = str) -> str:
    return f"{fmt(allocated)}/{fmt(allocatable)}"


def _host_state(host: model.Host) -> str:
    return _state(host.state) + (",cordoned" if host.cordoned else "")


def host_table(hosts: Sequence[host_pb2.Host]) -> Table:
    """One row per host; resources are allocated/allocatable."""
    table = make_table("NAME", "STATE", "ADDRESS", "VMS", "VCPUS", "MEMORY", "DISK", "DOMAIN", "HEARTBEAT")
    for msg in hosts:
        h = host_from_proto(msg)
        table.add_row(
            h.name,
            _host_state(h),
            h.address or "-",
            str(h.vm_count),
            _used(h.allocated.vcpus, h.allocatable.vcpus),
            _used(h.allocated.memory_mib, h.allocatable.memory_mib, human_size),
            _used(h.allocated.disk_mib, h.allocatable.disk_mib, human_size),
            h.hypervisor.domain_type or "-",
            _age(h.last_heartbeat) + (" ago" if h.last_heartbeat else ""),
        )
    return table


def host_details(msg: host_pb2.Host) -> Table:
    """Every field of one host."""
    h = host_from_proto(msg)
    hv = h.hypervisor
    rows = [
        ("Name", h.name),
        ("State", _host_state(h)),
        ("Address", h.address or "-"),
        ("VMs", str(h.vm_count)),
        (
            "vCPUs",
            f"{h.allocated.vcpus} allocated / {h.allocatable.vcpus} allocatable / {h.capacity.vcpus} total",
        ),
        (
            "Memory",
            f"{human_size(h.allocated.memory_mib)} allocated / {human_size(h.allocatable.memory_mib)} "
            f"allocatable / {human_size(h.capacity.memory_mib)} total",
        ),
        (
            "Disk",
            f"{human_size(h.allocated.disk_mib)} allocated / {human_size(h.allocatable.disk_mib)} "
            f"allocatable / {human_size(h.capacity.disk_mib)} total",
        ),
        (
            "Hypervisor",
            f"{hv.uri or '-'} (libvirt {hv.libvirt_version or '?'}, {hv.hypervisor_version or '?'})",
        ),
        ("Domain type", hv.domain_type + (f" ({hv.domain_type_reason})" if hv.domain_type_reason else "")),
        ("CPU model", hv.cpu_model or "-"),
        ("Capabilities", ", ".join(hv.capabilities) or "-"),
        ("Last heartbeat", _when(h.last_heartbeat)),
        ("Agent epoch", str(h.agent_epoch)),
    ]
    return _details(rows)


# ----------------------------------------------------------------------------------------- operations


def operation_status(op: operation_pb2.Operation) -> str:
    """Summarise an operation: ``running 40%``, ``done``, or ``failed: NOT_FOUND``."""
    if not op.done:
        return f"running {op.progress}%"
    err = operation_error(op)
    if err is not None:
        return f"failed: {err.code}"
    return "done"


def operation_table(ops: Sequence[operation_pb2.Operation]) -> Table:
    """One row per operation."""
    table = make_table("ID", "KIND", "TARGET", "STATUS", "STEP", "AGE")
    for op in ops:
        table.add_row(op.id, op.kind, op.target, operation_status(op), op.step or "-", _age(_ts(op, "create_time")))
    return table


def operation_details(op: operation_pb2.Operation) -> Table:
    """Every field of one operation."""
    rows = [
        ("ID", op.id),
        ("Kind", op.kind),
        ("Target", op.target),
        ("Status", operation_status(op)),
        ("Step", op.step or "-"),
        ("Progress", f"{op.progress}%"),
        ("Request ID", op.request_id or "-"),
        ("Created", _when(_ts(op, "create_time"))),
        ("Updated", _when(_ts(op, "update_time"))),
    ]
    if op.HasField("error"):
        rows.append(("Error", op.error.message))
    if op.result.HasField("vm"):
        rows.append(("Result", f"vm {op.result.vm.name} on {op.result.vm.host or '-'}"))
    return _details(rows)
