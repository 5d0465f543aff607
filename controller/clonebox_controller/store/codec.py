"""
JSON encoding of the core models the store keeps in JSON columns.

The store owns this format (it is what sits in the database), so it lives here rather than in the
protobuf converters: a change to the wire API must not silently change what is on disk. Decoders are
lenient about missing keys (they fall back to the dataclass defaults) so that adding a field to a
model does not need a data migration.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from clonebox_core import specjson
from clonebox_core.health import CheckStatus, HealthState, ProbeResult, ProbeType, Sample, VmHealth
from clonebox_core.model import HypervisorInfo, IpAddress, Vm, VmSpec, VmState

JsonDict = dict[str, Any]


def spec_to_json(spec: VmSpec) -> JsonDict:
    """Encode a VmSpec for the store's spec column: the store keeps what it must send again."""
    return specjson.spec_to_dict(spec, secrets="keep")


def spec_from_json(data: Mapping[str, Any]) -> VmSpec:
    """Decode what :func:`spec_to_json` (or :func:`vm_to_json`) wrote."""
    return specjson.spec_from_dict(data)


def addresses_to_json(addresses: Sequence[IpAddress]) -> list[JsonDict]:
    """Encode guest addresses as JSON-able dicts."""
    return [{"interface": a.interface, "address": a.address, "prefix": a.prefix, "source": a.source} for a in addresses]


def addresses_from_json(data: Sequence[Mapping[str, Any]] | None) -> tuple[IpAddress, ...]:
    """Decode what :func:`addresses_to_json` wrote."""
    return tuple(
        IpAddress(
            str(a.get("interface", "")),
            str(a["address"]),
            int(a.get("prefix", 0)),
            str(a.get("source", "")),
        )
        for a in data or ()
    )


def hypervisor_to_json(info: HypervisorInfo) -> JsonDict:
    """Encode HypervisorInfo as a JSON-able dict."""
    return {
        "uri": info.uri,
        "libvirt_version": info.libvirt_version,
        "hypervisor_version": info.hypervisor_version,
        "domain_type": info.domain_type,
        "domain_type_reason": info.domain_type_reason,
        "capabilities": list(info.capabilities),
        "cpu_model": info.cpu_model,
    }


def hypervisor_from_json(data: Mapping[str, Any]) -> HypervisorInfo:
    """Decode what :func:`hypervisor_to_json` wrote."""
    return HypervisorInfo(
        uri=str(data.get("uri", "")),
        libvirt_version=str(data.get("libvirt_version", "")),
        hypervisor_version=str(data.get("hypervisor_version", "")),
        domain_type=str(data.get("domain_type", "qemu")),
        domain_type_reason=str(data.get("domain_type_reason", "")),
        capabilities=tuple(str(c) for c in data.get("capabilities", ())),
        cpu_model=str(data.get("cpu_model", "")),
    )


def _time_to_json(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _time_from_json(value: Any) -> datetime | None:
    return None if not value else datetime.fromisoformat(str(value))


def vm_to_json(vm: Vm) -> JsonDict:
    """Encode a whole Vm (for operation results and watch tombstones)."""
    return {
        "name": vm.name,
        "host": vm.host,
        "state": vm.state.name,
        # operation results and tombstones are read back by any viewer: secret fields as digests only
        "spec": specjson.spec_to_dict(vm.spec, secrets="digest"),
        "uuid": vm.uuid,
        "addresses": addresses_to_json(vm.addresses),
        "create_time": _time_to_json(vm.create_time),
        "update_time": _time_to_json(vm.update_time),
        "state_reason": vm.state_reason,
    }


def vm_from_json(data: Mapping[str, Any]) -> Vm:
    """Decode what :func:`vm_to_json` wrote."""
    return Vm(
        name=str(data["name"]),
        host=str(data.get("host", "")),
        state=VmState[str(data.get("state", VmState.UNSPECIFIED.name))],
        spec=spec_from_json(data["spec"]),
        uuid=str(data.get("uuid", "")),
        addresses=addresses_from_json(data.get("addresses")),
        create_time=_time_from_json(data.get("create_time")),
        update_time=_time_from_json(data.get("update_time")),
        state_reason=str(data.get("state_reason", "")),
    )


# ------------------------------------------------------------------------------------------ health
# enums by member name, as in every other column of the store


def _result_to_json(r: ProbeResult) -> JsonDict:
    return {
        "check": r.check,
        "sample": r.sample.name,
        "detail": r.detail,
        "time": _time_to_json(r.time),
        "duration_us": r.duration_us,
    }


def _result_from_json(data: Mapping[str, Any], when: datetime) -> ProbeResult:
    return ProbeResult(
        check=str(data.get("check", "")),
        sample=Sample[str(data.get("sample", Sample.NO_DATA.name))],
        detail=str(data.get("detail", "")),
        time=_time_from_json(data.get("time")) or when,
        duration_us=int(data.get("duration_us", 0)),
    )


def _check_to_json(c: CheckStatus) -> JsonDict:
    return {
        "name": c.name,
        "type": c.type.name,
        "state": c.state.name,
        "critical": c.critical,
        "consecutive_failures": c.consecutive_failures,
        "consecutive_successes": c.consecutive_successes,
        "last": None if c.last is None else _result_to_json(c.last),
        "since": _time_to_json(c.since),
        "implicit": c.implicit,
    }


def _check_from_json(data: Mapping[str, Any], when: datetime) -> CheckStatus:
    last = data.get("last")
    return CheckStatus(
        name=str(data["name"]),
        type=ProbeType[str(data.get("type", ProbeType.GUEST_AGENT.name))],
        state=HealthState[str(data.get("state", HealthState.UNKNOWN.name))],
        critical=bool(data.get("critical", True)),
        consecutive_failures=int(data.get("consecutive_failures", 0)),
        consecutive_successes=int(data.get("consecutive_successes", 0)),
        last=None if not last else _result_from_json(last, when),
        since=_time_from_json(data.get("since")),
        implicit=bool(data.get("implicit", False)),
    )


def vm_health_to_json(h: VmHealth) -> JsonDict:
    """Encode a VmHealth for the ``health_current.document`` column."""
    return {
        "vm": h.vm,
        "host": h.host,
        "state": h.state.name,
        "checks": [_check_to_json(c) for c in h.checks],
        "since": _time_to_json(h.since),
        "updated": _time_to_json(h.updated),
    }


def vm_health_from_json(data: Mapping[str, Any], when: datetime) -> VmHealth:
    """Decode what :func:`vm_health_to_json` wrote (``when`` stands in for a probe result's missing time)."""
    return VmHealth(
        vm=str(data["vm"]),
        host=str(data.get("host", "")),
        state=HealthState[str(data.get("state", HealthState.UNKNOWN.name))],
        checks=tuple(_check_from_json(c, when) for c in data.get("checks", ())),
        since=_time_from_json(data.get("since")),
        updated=_time_from_json(data.get("updated")),
    )
