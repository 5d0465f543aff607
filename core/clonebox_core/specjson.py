"""
One JSON form of a :class:`~clonebox_core.model.VmSpec`, for everything that keeps specs at rest.

The controller's store keeps the spec it must be able to send again (``secrets="keep"``: user-data
and the password *hash*; a spec never holds a password). A domain's libvirt metadata is readable by
anyone with read-only access to libvirt, so the agent writes ``secrets="digest"``: each secret field
becomes ``sha256:<hex>`` of its value, enough to tell that it changed and nothing more. Decoding is
lenient about missing keys (dataclass defaults), so adding a field needs no data migration.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any, Literal

from clonebox_core import health
from clonebox_core.model import (
    Auth,
    AuthMethod,
    CloudInit,
    DiskSpec,
    KernelBoot,
    NetworkMode,
    NetworkSpec,
    Provision,
    SharedFolder,
    ShareDriver,
    VmSpec,
)
from clonebox_core.secret import Secret

JsonDict = dict[str, Any]
SecretMode = Literal["keep", "digest"]

#: prefix of a secret field written in ``digest`` mode
DIGEST_PREFIX = "sha256:"


def secret_digest(value: Secret) -> str:
    """``sha256:<hex>`` of a secret value ('' for an empty one)."""
    text = value.reveal()
    return DIGEST_PREFIX + hashlib.sha256(text.encode()).hexdigest() if text else ""


def _secret_out(value: Secret, mode: SecretMode) -> str:
    # the one place a spec's secret fields are written at rest
    return value.reveal() if mode == "keep" else secret_digest(value)


def _disk_to_dict(d: DiskSpec) -> JsonDict:
    # "volume" only when set: the at-rest form (and every digest of it) of a spec without volumes is unchanged
    out: JsonDict = {"name": d.name, "base_image": d.base_image, "size_mib": d.size_mib}
    if d.volume:
        out["volume"] = d.volume
    return out


def spec_to_dict(spec: VmSpec, *, secrets: SecretMode) -> JsonDict:
    """Encode ``spec`` as a JSON-able dict; ``secrets`` says how secret fields are written."""
    out: JsonDict = {
        "name": spec.name,
        "vcpus": spec.vcpus,
        "memory_mib": spec.memory_mib,
        "disks": [_disk_to_dict(d) for d in spec.disks],
        "kernel_boot": (
            None
            if spec.kernel_boot is None
            else {
                "kernel": spec.kernel_boot.kernel,
                "initrd": spec.kernel_boot.initrd,
                "cmdline": spec.kernel_boot.cmdline,
            }
        ),
        "network": {
            "mode": spec.network.mode.name,
            "libvirt_network": spec.network.libvirt_network,
            **(
                {
                    "subnet": spec.network.subnet,
                    "address": spec.network.address,
                    "dns_names": list(spec.network.dns_names),
                }
                if spec.network.mode is NetworkMode.MANAGED
                else {}
            ),
        },
        "shared_folders": [
            {
                "host_path": f.host_path,
                "tag": f.tag,
                "read_only": f.read_only,
                "mount": f.mount,
                "driver": f.driver.name,
            }
            for f in spec.shared_folders
        ],
        "cloud_init": (
            None
            if spec.cloud_init is None
            else {
                "user_data": _secret_out(spec.cloud_init.user_data, secrets),
                "meta_data": spec.cloud_init.meta_data,
                "network_config": spec.cloud_init.network_config,
                "detach_seed_after_boot": spec.cloud_init.detach_seed_after_boot,
            }
        ),
        # a list of pairs keeps the order the model defines (sorted) and survives JSON round trips
        "labels": [[k, v] for k, v in spec.labels],
    }
    if spec.auth is not None:
        a = spec.auth
        out["auth"] = {
            "user": a.user,
            "method": a.method.name,
            "ssh_keys": list(a.ssh_keys),
            "password": a.password,
            "ssh_authorized_keys": list(a.ssh_authorized_keys),
            "password_hash": _secret_out(a.password_hash, secrets),
            "secret_refs": list(a.secret_refs),
        }
    if spec.health_checks:
        out["health_checks"] = [_probe_to_dict(p) for p in spec.health_checks]
    if spec.provision is not None:
        p = spec.provision
        out["provision"] = {
            "packages": list(p.packages),
            "snap_packages": list(p.snap_packages),
            "services": list(p.services),
            "post_commands": list(p.post_commands),
        }
    return out


def _probe_to_dict(p: health.Probe) -> JsonDict:
    # dataclasses.asdict keeps the nesting; enums by value, tuples as lists (JSON)
    data = asdict(p)
    data["type"] = p.type.value
    data["on_failure"] = {"kind": p.on_failure.kind.value, "argv": list(p.on_failure.argv)}
    data["on_recovery"] = {"kind": p.on_recovery.kind.value, "argv": list(p.on_recovery.argv)}
    return data


def _probe_from_dict(d: Mapping[str, Any]) -> health.Probe:
    def band(b: Mapping[str, Any] | None) -> health.Band | None:
        return None if b is None else health.Band(float(b["warn"]), float(b["critical"]))

    def action(a: Mapping[str, Any] | None) -> health.Action:
        a = a or {}
        return health.Action(health.ActionKind(str(a.get("kind", "none"))), _strs(a.get("argv")))

    http, tcp, command, script, resource, file = (
        d.get(k) for k in ("http", "tcp", "command", "script", "resource", "file")
    )
    return health.Probe(
        name=str(d["name"]),
        type=health.ProbeType(str(d["type"])),
        interval_ms=int(d.get("interval_ms", 10_000)),
        timeout_ms=int(d.get("timeout_ms", 2_000)),
        initial_delay_ms=int(d.get("initial_delay_ms", 0)),
        failure_threshold=int(d.get("failure_threshold", 3)),
        success_threshold=int(d.get("success_threshold", 1)),
        critical=bool(d.get("critical", True)),
        http=(
            None
            if http is None
            else health.HttpProbe(
                port=int(http["port"]),
                path=str(http["path"]),
                scheme=str(http["scheme"]),
                method=str(http["method"]),
                expect_status=tuple(int(x) for x in http["expect_status"]),
                body_regex=str(http.get("body_regex", "")),
                headers=tuple((str(k), str(v)) for k, v in http.get("headers", ())),
                tls_verify=bool(http.get("tls_verify", True)),
            )
        ),
        tcp=None if tcp is None else health.TcpProbe(int(tcp["port"])),
        command=(
            None
            if command is None
            else health.CommandProbe(
                _strs(command["argv"]), int(command.get("expect_exit", 0)), str(command.get("output_regex", ""))
            )
        ),
        script=None if script is None else health.ScriptProbe(str(script["name"]), _strs(script.get("args"))),
        resource=(
            None
            if resource is None
            else health.ResourceProbe(
                band(resource.get("cpu")), band(resource.get("memory")), band(resource.get("disk"))
            )
        ),
        file=None if file is None else health.FileProbe(str(file["path"]), str(file.get("regex", ""))),
        on_failure=action(d.get("on_failure")),
        on_recovery=action(d.get("on_recovery")),
    )


def _strs(value: Any) -> tuple[str, ...]:
    return tuple(str(x) for x in value or ())


def spec_from_dict(data: Mapping[str, Any]) -> VmSpec:
    """Decode what :func:`spec_to_dict` wrote (secret fields come back as they were written)."""
    kb = data.get("kernel_boot")
    ci = data.get("cloud_init")
    net = data.get("network") or {}
    auth = data.get("auth")
    prov = data.get("provision")
    return VmSpec(
        name=str(data["name"]),
        vcpus=int(data.get("vcpus", 1)),
        memory_mib=int(data.get("memory_mib", 512)),
        disks=tuple(
            DiskSpec(str(d["name"]), str(d.get("base_image", "")), int(d.get("size_mib", 0)), str(d.get("volume", "")))
            for d in data.get("disks", ())
        ),
        kernel_boot=(
            None if kb is None else KernelBoot(str(kb["kernel"]), str(kb.get("initrd", "")), str(kb.get("cmdline", "")))
        ),
        network=NetworkSpec(
            NetworkMode[str(net.get("mode", NetworkMode.LIBVIRT.name))],
            str(net.get("libvirt_network", "default")),
            str(net.get("subnet", "")),
            str(net.get("address", "")),
            tuple(str(n) for n in net.get("dns_names", ())),
        ),
        shared_folders=tuple(
            SharedFolder(
                str(f["host_path"]),
                str(f["tag"]),
                bool(f.get("read_only", False)),
                str(f.get("mount", "")),
                ShareDriver[str(f.get("driver", ShareDriver.NINE_P.name))],
            )
            for f in data.get("shared_folders", ())
        ),
        cloud_init=(
            None
            if ci is None
            else CloudInit(
                Secret(str(ci.get("user_data", ""))),
                str(ci.get("meta_data", "")),
                str(ci.get("network_config", "")),
                bool(ci.get("detach_seed_after_boot", False)),
            )
        ),
        labels=tuple((str(k), str(v)) for k, v in data.get("labels", ())),
        auth=(
            None
            if auth is None
            else Auth(
                user=str(auth.get("user", "clonebox")),
                method=AuthMethod[str(auth.get("method", AuthMethod.SSH_KEY.name))],
                ssh_keys=_strs(auth.get("ssh_keys")),
                password=str(auth.get("password", "")),
                ssh_authorized_keys=_strs(auth.get("ssh_authorized_keys")),
                password_hash=Secret(str(auth.get("password_hash", ""))),
                secret_refs=_strs(auth.get("secret_refs")),
            )
        ),
        provision=(
            None
            if prov is None
            else Provision(
                _strs(prov.get("packages")),
                _strs(prov.get("snap_packages")),
                _strs(prov.get("services")),
                _strs(prov.get("post_commands")),
            )
        ),
        health_checks=tuple(_probe_from_dict(p) for p in data.get("health_checks", ())),
    )


def matches_at_rest(at_rest: VmSpec, spec: VmSpec) -> bool:
    """
    Whether ``at_rest`` (a spec read back from where secret fields are digests, or kept whole) is ``spec``.

    An agent answering a retried create compares the domain's recorded spec with the request's.
    """
    if at_rest == spec:
        return True
    return spec_to_dict(at_rest, secrets="keep") == spec_to_dict(spec, secrets="digest")
