r"""
The VM spec file: a small, versioned YAML document describing one VM.

Format (version 1)::

    version: 1                     # required; only 1 is known
    name: tiny-a                   # required; a DNS label, unique in the fleet
    vcpus: 1                       # optional, default 1
    memory: 256MiB                 # optional, default 512MiB; an int is MiB, a string takes a unit:
                                   #   KiB MiB GiB TiB (or K M G T, binary); 16 MiB .. 4 TiB
    disks:                         # optional list, attach order; the first boots unless kernel_boot
      - name: data                 # a DNS label, unique within the VM
        base_image: testguest/data.qcow2   # relative = inside one of the agent's image dirs
        size: 1GiB                 # optional for an overlay (keeps the base size); required for blank
      - name: db                   # or: an agent volume on the VM's host (clonebox volume create), kept
        volume: pgdata             #   when the VM is deleted; no base_image, no size
    kernel_boot:                   # optional direct kernel boot
      kernel: testguest/vmlinuz
      initrd: testguest/initrd.img
      cmdline: console=ttyS0 quiet
    network: {mode: libvirt, libvirt_network: default}   # or {mode: none}; default libvirt/default
    shared_folders: [{host_path: /srv/x, tag: x, read_only: true}]   # on the agent's host, in shared_roots
    cloud_init:                    # NoCloud inputs; each a string, or a mapping that is dumped as YAML
      user_data: "#cloud-config\\n..."   # a mapping becomes "#cloud-config" + the mapping
      meta_data: ""
      network_config: ""
    labels: {app: demo}

Version 2 has the same fields plus a login user and first-boot provisioning, which the agent renders
into cloud-init user-data (``clonebox_core.cloudinit``)::

    version: 2
    auth:                          # optional; default: user clonebox, ssh_key with a generated key
      user: dev
      method: ssh_key              # ssh_key | password | both | one_time_password
      ssh_keys: [~/.ssh/id_ed25519.pub, github:octocat, "ssh-ed25519 AAAA... me@host"]
      password: env:VM_PASSWORD    # a secret reference (never the password; never quoted in errors)
    provision: {packages: [git], snap_packages: [], services: [docker], post_commands: ["..."]}
    shared_folders: [{host_path: /srv/x, mount: /mnt/x, driver: 9p, read_only: true}]   # tag derived
    cloud_init:
      detach_seed_after_boot: true
      user_data: {timezone: UTC}   # extra cloud-config (a mapping), merged; may not set passwords
      network_config: {version: 2, ethernets: {eth0: {dhcp4: true}}}

``load_spec_file`` / ``load_spec_text`` return a validated ``clonebox_core.model.VmSpec``. Every problem
is an ``InvalidArgument`` with a one-line message naming the file, the line, the field and the fix::

    tiny.yaml:4: memory: '0MiB' must be at least 16 MiB
    tiny.yaml:7: disks[0].sise: unknown field (did you mean 'size'?)

The YAML is read by ``clonebox_core.yamlsafe`` (at most ``MAX_SPEC_BYTES``, few aliases, limited nesting,
no duplicate keys, plain types only); its limits carry their own reasons (``YAML_TOO_LARGE``,
``YAML_TOO_MANY_ALIASES``, ``YAML_TOO_DEEP``), everything else is ``SPEC_INVALID``. Values under
``cloud_init`` may hold credentials: no message ever quotes them (only field names, kinds and lines), and
other values are quoted at most 40 characters long.

Line numbers come from the YAML node tree (composed once, then constructed from the same nodes), so
pydantic's error locations and ``validate_spec``'s ``metadata['field']`` can both be mapped back to the
line the user has to edit.

A spec may also sit inside another document (a VM written inline in a plan file, see
``clonebox_core.planfile``): ``spec_from_data`` / ``spec_problems`` validate an already parsed mapping and
report each problem at the line and path where it was written (``vms.db.memory``), also when the mapping
was assembled from several places (``SpecOrigin``: the VM, its template, the plan's defaults).
"""

from __future__ import annotations

import difflib
import re
import types
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal, NamedTuple, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic_core import ErrorDetails

from clonebox_core import health
from clonebox_core.cloudinit import check_extra_user_data
from clonebox_core.errors import InvalidArgument
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
from clonebox_core.secrets.providers import KNOWN_SCHEMES, SecretRef
from clonebox_core.units import format_duration_ms, format_size, parse_duration_ms, parse_size
from clonebox_core.validate import MAX_DISK_MIB, MAX_MEMORY_MIB, MIN_MEMORY_MIB, validate_spec
from clonebox_core.yamlsafe import find_node, line_of, load_yaml_safely, located_error, node_line, scrub

__all__ = [
    "MAX_SPEC_BYTES",
    "REASON",
    "SECRET_PATHS",
    "SPEC_FIELDS",
    "SPEC_VERSION",
    "Duration",
    "SpecOrigin",
    "SpecProblem",
    "VolumeMiB",
    "document_problem",
    "dump_spec",
    "format_size",
    "load_spec_file",
    "load_spec_text",
    "model_problem",
    "parse_size",
    "problem_at",
    "problem_error",
    "read_spec_bytes",
    "schema_problems",
    "spec_from_data",
    "spec_problems",
]

#: the newest spec format version (1 is still read: raw cloud-init, no auth)
SPEC_VERSION = 2
SPEC_VERSIONS = (1, 2)
#: reason carried by every spec error
REASON = "SPEC_INVALID"
#: three cloud-init documents of at most 1 MiB each, plus the rest of the spec
MAX_SPEC_BYTES = 4 * 1024 * 1024
#: ``cloud_init`` may carry passwords and tokens: no error message quotes anything inside it
SECRET_PATHS: tuple[tuple[str, ...], ...] = (("cloud_init",), ("auth", "password"))
#: characters of a value that an error message may quote
_SHOWN_CHARS = 40

# --------------------------------------------------------------------------------------------- sizes


def _ranged_size(low: int, high: int, low_hint: str = "") -> Any:
    """Build a BeforeValidator that parses a size and checks its range, quoting the user's spelling."""

    def check(value: object) -> int:
        mib = parse_size(value)
        shown = repr(value) if isinstance(value, str) else str(value)
        if mib < low:
            raise ValueError(f"{shown} must be at least {_human(low)}{low_hint}")
        if mib > high:
            raise ValueError(f"{shown} must be at most {_human(high)}")
        return mib

    return BeforeValidator(check)


def _human(mib: int) -> str:
    """``16 MiB``, ``4 TiB``: a size for messages."""
    text = format_size(mib)
    return f"{text[:-3]} {text[-3:]}"


def _cloud_text(header: str) -> Any:
    """Build a BeforeValidator dumping a cloud-init document given as a mapping or list to YAML."""

    def convert(value: object) -> object:
        if isinstance(value, dict | list):
            return header + yaml.safe_dump(value, sort_keys=False, default_flow_style=False)
        return value

    return BeforeValidator(convert)


# ---------------------------------------------------------------------------------------- the schema


class _Strict(BaseModel):
    # strict: YAML already gives ints, bools and strings their types; a quoted "2" for vcpus is a typo
    # worth reporting, not something to coerce silently
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


MemoryMiB = Annotated[int, _ranged_size(MIN_MEMORY_MIB, MAX_MEMORY_MIB)]
DiskMiB = Annotated[int, _ranged_size(1, MAX_DISK_MIB, " (leave size out to keep the base image's size)")]
#: the size of a plan volume (``volumes:`` in a plan file): 1 MiB .. 64 TiB, written as disk sizes are
VolumeMiB = Annotated[int, _ranged_size(1, MAX_DISK_MIB)]
UserData = Annotated[str, _cloud_text("#cloud-config\n")]
CloudText = Annotated[str, _cloud_text("")]


class _Disk(_Strict):
    name: str
    base_image: str = ""
    size: DiskMiB | None = None
    # an agent volume on the VM's host (``clonebox volume create``) instead of a disk of its own
    volume: str = ""


class _KernelBoot(_Strict):
    kernel: str
    initrd: str = ""
    cmdline: str = ""


class _Network(_Strict):
    mode: Literal["libvirt", "none", "managed"] = "libvirt"
    libvirt_network: str | None = None
    # managed only (a network the agent makes; plans set these, validate.py checks them)
    subnet: str = ""
    address: str = ""
    dns_names: list[str] = Field(default_factory=list)


class _SharedFolder(_Strict):
    host_path: str
    tag: str
    read_only: bool = False


class _CloudInit(_Strict):
    user_data: UserData = ""
    meta_data: CloudText = ""
    network_config: CloudText = ""


class _SpecBase(_Strict):
    """The fields both versions share (each version adds its own)."""

    name: str
    vcpus: int = 1
    memory: MemoryMiB = 512
    disks: list[_Disk] | None = None
    kernel_boot: _KernelBoot | None = None
    network: _Network | None = None
    labels: dict[str, str] | None = None


class _SpecV1(_SpecBase):
    version: Literal[1]
    shared_folders: list[_SharedFolder] | None = None
    cloud_init: _CloudInit | None = None


class _Auth(_Strict):
    user: str = "clonebox"
    method: Literal["ssh_key", "password", "both", "one_time_password"] = "ssh_key"
    ssh_keys: list[str] | None = None
    password: str | None = None


class _Provision(_Strict):
    packages: list[str] | None = None
    snap_packages: list[str] | None = None
    services: list[str] | None = None
    post_commands: list[str] | None = None


class _SharedFolderV2(_Strict):
    host_path: str
    mount: str | None = None
    tag: str | None = None
    read_only: bool = False
    driver: Literal["9p", "virtiofs"] = "9p"


class _CloudInitV2(_Strict):
    user_data: UserData = ""
    meta_data: CloudText = ""
    network_config: CloudText = ""
    detach_seed_after_boot: bool = False


Duration = Annotated[int, BeforeValidator(parse_duration_ms)]
Percent = Annotated[float, BeforeValidator(lambda v: float(v) if isinstance(v, int) and not isinstance(v, bool) else v)]


class _HttpCheck(_Strict):
    port: int = 80
    path: str = "/"
    scheme: Literal["http", "https"] = "http"
    method: str = "GET"
    expect_status: int | list[int] = 200
    body_regex: str = ""
    headers: dict[str, str] | None = None
    tls_verify: bool = True


class _TcpCheck(_Strict):
    port: int


class _CommandCheck(_Strict):
    argv: list[str]
    expect_exit: int = 0
    output_regex: str = ""


class _ScriptCheck(_Strict):
    name: str
    args: list[str] | None = None


class _Band(_Strict):
    warn: Percent
    critical: Percent


class _ResourceCheck(_Strict):
    cpu: _Band | None = None
    memory: _Band | None = None
    disk: _Band | None = None


class _FileCheck(_Strict):
    path: str
    regex: str = ""


class _Action(_Strict):
    action: Literal["none", "restart", "command"] = "none"
    command: list[str] | None = None


class _HealthCheck(_Strict):
    name: str
    type: Literal["http", "tcp", "command", "guest_agent", "script", "resource", "file"]
    interval: Duration = 10_000
    timeout: Duration = 2_000
    initial_delay: Duration = 0
    failure_threshold: int = 3
    success_threshold: int = 1
    critical: bool = True
    http: _HttpCheck | None = None
    tcp: _TcpCheck | None = None
    command: _CommandCheck | None = None
    script: _ScriptCheck | None = None
    resource: _ResourceCheck | None = None
    file: _FileCheck | None = None
    on_failure: _Action | None = None
    on_recovery: _Action | None = None


class _SpecV2(_SpecBase):
    version: Literal[2]
    auth: _Auth | None = None
    provision: _Provision | None = None
    shared_folders: list[_SharedFolderV2] | None = None
    cloud_init: _CloudInitV2 | None = None
    health_checks: list[_HealthCheck] | None = None


#: fields a user may try in order to aim a probe somewhere else
_HOST_WORDS = frozenset({"host", "hostname", "address", "ip", "url", "target"})
#: top-level fields in the order of the docs and examples (for "known fields" hints)
_TOP_LEVEL_ORDER = (
    "version",
    "name",
    "vcpus",
    "memory",
    "disks",
    "kernel_boot",
    "network",
    "auth",
    "provision",
    "shared_folders",
    "cloud_init",
    "health_checks",
    "labels",
)
_SCHEMAS: dict[int, type[_SpecV1] | type[_SpecV2]] = {1: _SpecV1, 2: _SpecV2}
#: the top-level fields of a version-2 spec, in the order the docs write them
SPEC_FIELDS: tuple[str, ...] = _TOP_LEVEL_ORDER


# core field names -> spec file field names (validate_spec speaks the model's names)
_MODEL_TO_FILE = {"memory_mib": "memory", "size_mib": "size"}

Loc = tuple[str | int, ...]


class _ProblemError(Exception):
    """A problem found after pydantic, at a known location in the document."""

    def __init__(self, loc: Loc, message: str, *, at_key: bool = False) -> None:
        super().__init__(message)
        self.loc = loc
        self.message = message
        self.at_key = at_key


def _tag_for(folder: _SharedFolderV2, taken: set[str]) -> str:
    """A 9p/virtiofs tag from the folder's guest (or host) path's last part, unique in the spec."""
    base = PurePosixPath(folder.mount or folder.host_path).name or "share"
    tag = re.sub(r"[^A-Za-z0-9_-]+", "-", base).strip("-")[:28] or "share"
    candidate, n = tag, 2
    while candidate in taken:
        candidate, n = f"{tag}-{n}", n + 1
    taken.add(candidate)
    return candidate


def _folders_v2(folders: list[_SharedFolderV2]) -> tuple[SharedFolder, ...]:
    taken = {f.tag for f in folders if f.tag}
    return tuple(
        SharedFolder(
            f.host_path,
            f.tag or _tag_for(f, taken),
            f.read_only,
            f.mount or "",
            ShareDriver.VIRTIOFS if f.driver == "virtiofs" else ShareDriver.NINE_P,
        )
        for f in folders
    )


def _auth_v2(doc: _Auth | None) -> Auth:
    if doc is None:
        return Auth()
    if doc.password is not None:
        # parsed here so a literal password typed where a reference belongs is refused, never quoted
        try:
            ref = SecretRef.parse(doc.password, field="auth.password")
            if ref.scheme not in KNOWN_SCHEMES:
                raise InvalidArgument("unknown scheme")  # 'pass:word' is a password with a colon, not a ref
        except InvalidArgument:
            raise _ProblemError(
                ("auth", "password"),
                "must be a secret reference such as env:VM_PASSWORD, file:PATH, age:FILE, sops:FILE#KEY or "
                "vault:MOUNT/PATH#KEY, never the password itself (the value is not shown)",
            ) from None
    return Auth(
        user=doc.user,
        method=AuthMethod[doc.method.upper()],
        ssh_keys=tuple(doc.ssh_keys or ()),
        password=doc.password or "",
    )


def _band(doc: _Band | None) -> health.Band | None:
    return None if doc is None else health.Band(doc.warn, doc.critical)


def _action(doc: _Action | None) -> health.Action:
    if doc is None:
        return health.Action()
    return health.Action(health.ActionKind(doc.action), tuple(doc.command or ()))


def _probe(doc: _HealthCheck) -> health.Probe:
    http = doc.http
    if http is None and doc.type == "http":
        http = _HttpCheck()
    return health.Probe(
        name=doc.name,
        type=health.ProbeType(doc.type),
        interval_ms=doc.interval,
        timeout_ms=doc.timeout,
        initial_delay_ms=doc.initial_delay,
        failure_threshold=doc.failure_threshold,
        success_threshold=doc.success_threshold,
        critical=doc.critical,
        http=(
            None
            if http is None
            else health.HttpProbe(
                port=http.port,
                path=http.path,
                scheme=http.scheme,
                method=http.method,
                expect_status=tuple(http.expect_status)
                if isinstance(http.expect_status, list)
                else (http.expect_status,),
                body_regex=http.body_regex,
                headers=tuple((http.headers or {}).items()),
                tls_verify=http.tls_verify,
            )
        ),
        tcp=None if doc.tcp is None else health.TcpProbe(doc.tcp.port),
        command=(
            None
            if doc.command is None
            else health.CommandProbe(tuple(doc.command.argv), doc.command.expect_exit, doc.command.output_regex)
        ),
        script=None if doc.script is None else health.ScriptProbe(doc.script.name, tuple(doc.script.args or ())),
        resource=(
            None
            if doc.resource is None
            else health.ResourceProbe(_band(doc.resource.cpu), _band(doc.resource.memory), _band(doc.resource.disk))
        ),
        file=None if doc.file is None else health.FileProbe(doc.file.path, doc.file.regex),
        on_failure=_action(doc.on_failure),
        on_recovery=_action(doc.on_recovery),
    )


def _to_model(doc: _SpecV1 | _SpecV2) -> VmSpec:
    network = NetworkSpec()
    if doc.network is not None:
        if doc.network.mode == "none":
            if doc.network.libvirt_network is not None:
                raise _ProblemError(
                    ("network", "libvirt_network"),
                    "only applies to mode 'libvirt': remove it or set mode: libvirt",
                    at_key=True,
                )
            network = NetworkSpec(mode=NetworkMode.NONE)
        elif doc.network.mode == "managed":
            network = NetworkSpec(
                NetworkMode.MANAGED,
                doc.network.libvirt_network or "",
                doc.network.subnet,
                doc.network.address,
                tuple(doc.network.dns_names),
            )
        else:
            network = NetworkSpec(NetworkMode.LIBVIRT, doc.network.libvirt_network or "default")
    return VmSpec(
        name=doc.name,
        vcpus=doc.vcpus,
        memory_mib=doc.memory,
        disks=tuple(DiskSpec(d.name, d.base_image, d.size or 0, volume=d.volume) for d in doc.disks or ()),
        kernel_boot=(
            KernelBoot(doc.kernel_boot.kernel, doc.kernel_boot.initrd, doc.kernel_boot.cmdline)
            if doc.kernel_boot is not None
            else None
        ),
        network=network,
        shared_folders=(
            _folders_v2(doc.shared_folders or [])
            if isinstance(doc, _SpecV2)
            else tuple(SharedFolder(f.host_path, f.tag, f.read_only) for f in doc.shared_folders or ())
        ),
        cloud_init=(
            CloudInit(
                Secret(doc.cloud_init.user_data),
                doc.cloud_init.meta_data,
                doc.cloud_init.network_config,
                isinstance(doc.cloud_init, _CloudInitV2) and doc.cloud_init.detach_seed_after_boot,
            )
            if doc.cloud_init is not None
            else None
        ),
        labels=tuple(sorted((doc.labels or {}).items())),
        auth=_auth_v2(doc.auth) if isinstance(doc, _SpecV2) else None,
        provision=(
            Provision(
                tuple(doc.provision.packages or ()),
                tuple(doc.provision.snap_packages or ()),
                tuple(doc.provision.services or ()),
                tuple(doc.provision.post_commands or ()),
            )
            if isinstance(doc, _SpecV2) and doc.provision is not None
            else None
        ),
        health_checks=tuple(_probe(c) for c in doc.health_checks or ()) if isinstance(doc, _SpecV2) else (),
    )


# ------------------------------------------------------------------------------- locating in the YAML


def _path_text(loc: Sequence[str | int], root: yaml.Node | None = None) -> str:
    """``disks[0].size``; with the node tree, an int that is a mapping key (``{1: x}``) reads ``.1``."""
    out = ""
    node = root
    for part in loc:
        index = isinstance(part, int) and not isinstance(node, yaml.MappingNode)
        if index:
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
        if node is not None:
            found, _, matched = find_node(node, (part,))
            node = found if matched else None
    return out or "(top level)"


def _describe(value: object, *, secret: bool = False) -> str:
    """Describe a YAML value briefly, for messages; a ``secret`` one only by its kind."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean" if secret else ("true" if value else "false")
    if isinstance(value, str):
        if secret:
            return "a string"
        shown = value if len(value) <= _SHOWN_CHARS else value[: _SHOWN_CHARS - 3] + "..."
        return repr(shown)
    if isinstance(value, int | float):
        return "a number" if secret else str(value)
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


def _is_secret(loc: Sequence[str | int]) -> bool:
    """Whether values at ``loc`` must never be quoted (cloud-init documents may hold credentials)."""
    return any(tuple(loc[: len(p)]) == p for p in SECRET_PATHS)


def _fields_of(loc: Loc, schema: type[BaseModel] = _SpecV2) -> list[str]:
    """Known field names of the schema object at ``loc`` (for 'did you mean')."""
    annotation: Any = schema
    for part in loc:
        annotation = _step(annotation, part)
        if annotation is None:
            return []
    model = _model_in(annotation)
    if model is None:
        return []
    if issubclass(model, _SpecBase):
        # the order a spec file is written in, not the order of the schema classes
        return sorted(model.model_fields, key=_TOP_LEVEL_ORDER.index)
    return list(model.model_fields)


def _step(annotation: Any, part: str | int) -> Any:
    """The annotation of ``part`` inside a value of ``annotation`` (None when there is none)."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        for arg in get_args(annotation):
            found = _step(arg, part)
            if found is not None:
                return found
        return None
    if origin is list and isinstance(part, int):
        return get_args(annotation)[0]
    if origin is dict:
        return get_args(annotation)[1]  # any key: the value's type
    model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    if model is not None and str(part) in model.model_fields:
        return model.model_fields[str(part)].annotation
    return None


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    # through optionals and lists (a list of disks is described by a disk's fields), not into a dict's
    # values: a mapping of names is not the mapping its values are
    if get_origin(annotation) in (Union, types.UnionType, list):
        for arg in get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None


def _unknown_field_hint(loc: Loc, schema: type[BaseModel]) -> str:
    known = _fields_of(loc[:-1], schema)
    close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
    if close:
        return f"unknown field (did you mean '{close[0]}'?)"
    if known:
        return f"unknown field (known fields: {', '.join(known)})"
    return "unknown field"


def _quote_hint(value: object) -> str:
    return " (put it in quotes)" if isinstance(value, int | float | bool) or value is None else ""


def _pydantic_problem(
    err: ErrorDetails, schema: type[BaseModel], is_secret: Callable[[Loc], bool]
) -> tuple[Loc, str, bool, bool]:
    """(location, what is wrong, blame the key, blame the parent) for one pydantic error."""
    loc: Loc = tuple(err["loc"])
    kind, value = err["type"], err.get("input")
    at_key = False
    if loc and loc[-1] == "[key]":  # dict key errors: pydantic appends a marker after the key
        loc, at_key = loc[:-1], True
    secret = is_secret(loc)
    shown = _describe(value, secret=secret)
    if kind == "missing":
        return loc, f"required but missing: add '{loc[-1]}: ...'", False, True
    if kind == "extra_forbidden":
        hint = _unknown_field_hint(loc, schema)
        if loc and loc[0] == "health_checks" and str(loc[-1]) in _HOST_WORDS:
            hint = "probes never name a host: http and tcp probes reach only the VM's own addresses"
        if schema is _SpecV1 and loc and str(loc[-1]) in _fields_of(loc[:-1], _SpecV2):
            hint = f"'{loc[-1]}' needs 'version: 2'"
        return loc, hint, True, False
    if kind == "string_type":
        return loc, f"expected a string, got {shown}{_quote_hint(value)}", at_key, False
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return loc, f"expected a whole number, got {shown}", at_key, False
    if kind == "bool_type":
        return loc, f"expected true or false, got {shown}", at_key, False
    if kind == "literal_error":
        expected = (err.get("ctx") or {}).get("expected", "")
        return loc, f"{shown} is not allowed: use {expected}", at_key, False
    if kind == "list_type":
        return loc, f"expected a list ('- item' lines), got {shown}", False, False
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        fields = _fields_of(loc, schema)
        hint = f" with {', '.join(fields)}" if fields else ""
        return loc, f"expected a mapping{hint}, got {shown}", False, False
    if kind == "value_error":
        problem = str((err.get("ctx") or {}).get("error", err["msg"]))
        return loc, scrub(problem, hide=secret, limit=_SHOWN_CHARS), False, False
    problem = scrub(err["msg"], hide=secret, limit=_SHOWN_CHARS)
    return loc, f"{problem[:1].lower()}{problem[1:]}", at_key, False


# --------------------------------------------------------------------------------------- the loader


class SpecOrigin(NamedTuple):
    """
    Where (part of) a spec mapping was written, so that its errors name that file, line and path.

    ``prefix`` is where the spec mapping sits in ``root``: ``()`` for a spec file, ``("vms", "db")``
    for a VM written inline in a plan file.
    """

    source: str
    root: yaml.Node | None
    prefix: Loc = ()


class SpecProblem(NamedTuple):
    """One problem: the file and line to edit, ``path: what and the fix``, and the path alone."""

    source: str
    line: int
    message: str
    field: str


def _locate(origins: Sequence[SpecOrigin], loc: Loc, *, at_key: bool, parent: bool) -> tuple[str, int, str]:
    """(source, line, path) of the spec value at ``loc``; see :func:`problem_at`."""
    target = loc[:-1] if parent else loc
    best: tuple[int, SpecOrigin] | None = None
    for origin in origins:
        if origin.root is None:
            continue
        full = (*origin.prefix, *target)
        node, key_node, matched = find_node(origin.root, full)
        if matched == len(full):
            line = node_line(key_node) if at_key and key_node is not None else node_line(node)
            return origin.source, line, _path_text((*origin.prefix, *loc), origin.root)
        if matched >= len(origin.prefix) and (best is None or matched - len(origin.prefix) > best[0]):
            best = (matched - len(origin.prefix), origin)
    chosen = best[1] if best is not None else origins[0]
    line = line_of(chosen.root, (*chosen.prefix, *target))
    return chosen.source, line, _path_text((*chosen.prefix, *loc), chosen.root)


def problem_at(
    origins: Sequence[SpecOrigin], loc: Loc, what: str, *, at_key: bool = False, parent: bool = False
) -> SpecProblem:
    """
    A problem with the spec value at ``loc``, reported where it was written: ``path: what``.

    A spec mapping may be assembled from several places (a plan's VM over its template over the plan's
    defaults): ``origins`` lists them, the one that wins first. The first origin that has all of ``loc``
    written is blamed; when none has (a value that is missing, or one the loader made up) the origin
    that has most of it, the first one on a tie. ``at_key`` blames the key instead of the value (unknown
    fields); ``parent`` blames the mapping a missing field belongs in.
    """
    source, line, path = _locate(origins, loc, at_key=at_key, parent=parent)
    return SpecProblem(source, line, f"{path}: {what}", path)


def schema_problems(
    exc: ValidationError,
    schema: type[BaseModel],
    origins: Sequence[SpecOrigin],
    *,
    is_secret: Callable[[Loc], bool] | None = None,
) -> list[SpecProblem]:
    """
    The problems of a pydantic ``ValidationError`` against ``schema``, first in file order.

    ``is_secret`` tells which locations hold values no message may quote (default: the spec's
    ``SECRET_PATHS``). Shared with the plan file loader, so both speak the same words.
    """
    secret = is_secret or _is_secret
    found: list[tuple[int, int, SpecProblem]] = []
    for err in exc.errors():
        loc, what, at_key, parent = _pydantic_problem(err, schema, secret)
        problem = problem_at(origins, loc, what, at_key=at_key, parent=parent)
        rank = next((i for i, o in enumerate(origins) if o.source == problem.source), 0)
        found.append((rank, problem.line, problem))
    found.sort(key=lambda item: (item[0], item[1]))  # the first problem as the files read
    return [problem for _, _, problem in found]


def problem_error(problems: Sequence[SpecProblem], reason: str = REASON) -> InvalidArgument:
    """The first of ``problems`` as one located InvalidArgument, with ``(and N more problems)``."""
    first, rest = problems[0], len(problems) - 1
    more = f" (and {rest} more problem{'s' if rest > 1 else ''})" if rest else ""
    return located_error(first.source, first.line, first.message + more, reason=reason, field=first.field)


def _field_to_loc(field: str) -> Loc:
    """``spec.disks[0].size_mib`` -> ``("disks", 0, "size")``; label keys may contain dots."""
    if field.startswith("spec."):
        field = field[len("spec.") :]
    elif field == "spec":
        return ()
    loc: list[str | int] = []
    parts = field.split(".")
    for i, part in enumerate(parts):
        if not loc or loc[0] != "labels":
            m = re.fullmatch(r"([^\[]*)((?:\[\d+\])*)", part)
            if m is None:
                loc.append(part)
                continue
            if m.group(1):
                loc.append(_MODEL_TO_FILE.get(m.group(1), m.group(1)))
            loc.extend(int(x) for x in re.findall(r"\[(\d+)\]", m.group(2)))
        else:
            loc.append(".".join(parts[i:]))
            break
    return tuple(loc)


def model_problem(exc: InvalidArgument, origins: Sequence[SpecOrigin]) -> SpecProblem:
    """
    Locate a model-level error in the spec's files.

    ``validate_spec`` and ``check_extra_user_data`` name the field as ``spec.disks[0].size_mib``; the
    values they quote are shortened, and none from cloud_init is shown.
    """
    field = exc.metadata.get("field", "")
    message = exc.message
    if field and message.startswith(f"{field}: "):
        message = message[len(field) + 2 :]
    loc = _field_to_loc(field) if field else ()
    # validate_spec quotes whole values ('../etc/shadow'): keep them short, and none from cloud_init
    return problem_at(origins, loc, scrub(message, hide=_is_secret(loc), limit=_SHOWN_CHARS))


def spec_problems(data: Mapping[str, Any], origins: Sequence[SpecOrigin]) -> tuple[VmSpec | None, list[SpecProblem]]:
    """
    Validate an already parsed spec mapping (with ``version`` and ``name``): the spec, or its problems.

    ``origins`` say where the mapping was written (see :func:`problem_at`); the problems are first in file
    order: every schema problem, or else the first semantic one (``validate_spec``).
    """
    if "version" not in data:
        return None, [
            problem_at(origins, ("version",), f"required but missing: add 'version: {SPEC_VERSION}'", parent=True)
        ]
    version = data["version"]
    if isinstance(version, bool) or version not in SPEC_VERSIONS:
        return None, [
            problem_at(
                origins,
                ("version",),
                f"{_describe(version)} is not supported: this clonebox reads versions 1 and {SPEC_VERSION}",
            )
        ]
    schema = _SCHEMAS[int(version)]
    try:
        doc = schema.model_validate(data)
    except ValidationError as exc:
        return None, schema_problems(exc, schema, origins)
    try:
        spec = _to_model(doc)
        validate_spec(spec, prefix="spec")
        if spec.auth is not None:
            check_extra_user_data(spec, prefix="spec")
    except _ProblemError as problem:
        return None, [problem_at(origins, problem.loc, problem.message, at_key=problem.at_key)]
    except InvalidArgument as exc:
        return None, [model_problem(exc, origins)]
    return spec, []


def spec_from_data(
    data: Mapping[str, Any],
    root: yaml.Node | None,
    source_name: str,
    loc_prefix: Loc = (),
    *,
    reason: str = REASON,
    fallbacks: Sequence[SpecOrigin] = (),
) -> VmSpec:
    """
    Validate a spec given as an already parsed mapping whose values were read from ``root``.

    Errors are reported like a spec file's, at ``source_name``'s lines and with paths starting at
    ``loc_prefix`` (``vms.db.memory`` for a VM written inside a plan file); ``fallbacks`` are the other
    places parts of the mapping came from (see :func:`problem_at`). Raises ``InvalidArgument`` (``reason``).
    """
    spec, problems = spec_problems(data, [SpecOrigin(source_name, root, loc_prefix), *fallbacks])
    if problems or spec is None:
        raise problem_error(problems, reason)
    return spec


def document_problem(data: Any, root: yaml.Node | None, source_name: str) -> SpecProblem | None:
    """What makes a parsed document no spec at all (empty, not a mapping, a CloneBox v1 project file)."""
    if data is None:
        return SpecProblem(source_name, 1, "the file is empty: a VM spec starts with 'version: 1' and 'name: ...'", "")
    if not isinstance(data, Mapping):
        return SpecProblem(
            source_name,
            line_of(root, ()),
            # a whole document that is not a mapping may be a token file given by mistake: never quote it
            f"expected a mapping of fields (version, name, ...), got {_describe(data, secret=True)}",
            "",
        )
    if "vm" in data and "name" not in data:
        return SpecProblem(
            source_name,
            line_of(root, ("vm",), at_key=True),
            "this looks like a CloneBox v1 project file (.clonebox.yaml with a 'vm:' section), not a fleet "
            "VM spec: convert it with 'clonebox config migrate FILE -o NEW.yaml'",
            "",
        )
    if "version" not in data:
        return SpecProblem(
            source_name, line_of(root, ()), f"version: required but missing: add 'version: {SPEC_VERSION}'", ""
        )
    return None


def load_spec_text(text: str, source_name: str = "<spec>") -> VmSpec:
    """Parse and validate a spec document; ``source_name`` is used in error messages."""
    return _load(text, source_name)


def _load(content: str | bytes, source_name: str) -> VmSpec:
    # size, UTF-8, aliases, depth, duplicate keys and tags: one safe YAML reader for specs and configs
    data, root = load_yaml_safely(
        content, source_name, max_bytes=MAX_SPEC_BYTES, reason=REASON, secret_paths=SECRET_PATHS
    )
    problem = document_problem(data, root, source_name)
    if problem is not None:
        raise problem_error([problem])
    return spec_from_data(data, root, source_name)


def read_spec_bytes(path: str | Path, *, reason: str = REASON, what: str = "a VM spec (see examples/)") -> bytes:
    """
    The bytes of the file at ``path``, at most one more than ``MAX_SPEC_BYTES`` (enough to refuse it).

    Raises InvalidArgument (``reason``, metadata ``file``) for a missing file, a folder, or a read error.
    """
    source = str(path)
    try:
        with Path(path).open("rb") as f:
            return f.read(MAX_SPEC_BYTES + 1)
    except FileNotFoundError:
        raise InvalidArgument(
            f"{source}: no such file: give the path of {what}", reason=reason, metadata={"file": source}
        ) from None
    except IsADirectoryError:
        raise InvalidArgument(
            f"{source}: is a directory, not a spec file", reason=reason, metadata={"file": source}
        ) from None
    except OSError as exc:
        raise InvalidArgument(
            f"{source}: cannot read: {exc.strerror}", reason=reason, metadata={"file": source}
        ) from None


def load_spec_file(path: str | Path) -> VmSpec:
    """Read and validate the spec file at ``path``."""
    return _load(read_spec_bytes(path), str(path))


# ---------------------------------------------------------------------------------------- the writer


class _Dumper(yaml.SafeDumper):
    """Writes multi-line strings (cloud-init documents) as readable ``|`` blocks."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def _dump_probe(p: health.Probe) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": p.name,
        "type": p.type.value,
        "interval": format_duration_ms(p.interval_ms),
        "timeout": format_duration_ms(p.timeout_ms),
        "initial_delay": format_duration_ms(p.initial_delay_ms),
        "failure_threshold": p.failure_threshold,
        "success_threshold": p.success_threshold,
        "critical": p.critical,
    }
    if p.http is not None:
        h = p.http
        out["http"] = {
            "port": h.port,
            "path": h.path,
            "scheme": h.scheme,
            "method": h.method,
            "expect_status": list(h.expect_status),
            "body_regex": h.body_regex,
            "headers": dict(h.headers),
            "tls_verify": h.tls_verify,
        }
    if p.tcp is not None:
        out["tcp"] = {"port": p.tcp.port}
    if p.command is not None:
        out["command"] = {
            "argv": list(p.command.argv),
            "expect_exit": p.command.expect_exit,
            "output_regex": p.command.output_regex,
        }
    if p.script is not None:
        out["script"] = {"name": p.script.name, "args": list(p.script.args)}
    if p.resource is not None:
        out["resource"] = {
            name: {"warn": band.warn, "critical": band.critical}
            for name, band in (("cpu", p.resource.cpu), ("memory", p.resource.memory), ("disk", p.resource.disk))
            if band is not None
        }
    if p.file is not None:
        out["file"] = {"path": p.file.path, "regex": p.file.regex}
    for key, action in (("on_failure", p.on_failure), ("on_recovery", p.on_recovery)):
        if action.kind is not health.ActionKind.NONE:
            out[key] = {"action": action.kind.value, **({"command": list(action.argv)} if action.argv else {})}
    return out


def dump_spec(spec: VmSpec) -> str:
    """
    Write ``spec`` as a spec file; ``load_spec_text(dump_spec(s)) == s`` for a valid, unresolved ``s``.

    A spec with ``auth`` is written as version 2 (key sources and the password reference; resolved keys
    and hashes are request material, never file content), one without as version 1.
    """
    v2 = spec.auth is not None or bool(spec.health_checks)
    doc: dict[str, Any] = {
        "version": 2 if v2 else 1,
        "name": spec.name,
        "vcpus": spec.vcpus,
        "memory": format_size(spec.memory_mib),
    }
    if spec.disks:
        doc["disks"] = []
        for d in spec.disks:
            disk: dict[str, Any] = {"name": d.name}
            if d.base_image:
                disk["base_image"] = d.base_image
            if d.size_mib:
                disk["size"] = format_size(d.size_mib)
            if d.volume:
                disk["volume"] = d.volume
            doc["disks"].append(disk)
    if spec.kernel_boot is not None:
        boot = {"kernel": spec.kernel_boot.kernel}
        if spec.kernel_boot.initrd:
            boot["initrd"] = spec.kernel_boot.initrd
        if spec.kernel_boot.cmdline:
            boot["cmdline"] = spec.kernel_boot.cmdline
        doc["kernel_boot"] = boot
    if spec.network.mode is NetworkMode.NONE:
        doc["network"] = {"mode": "none"}
    elif spec.network.mode is NetworkMode.MANAGED:
        doc["network"] = {
            "mode": "managed",
            "libvirt_network": spec.network.libvirt_network,
            "subnet": spec.network.subnet,
            "address": spec.network.address,
            "dns_names": list(spec.network.dns_names),
        }
    else:
        doc["network"] = {"mode": "libvirt", "libvirt_network": spec.network.libvirt_network}
    if spec.auth is not None:
        auth: dict[str, Any] = {"user": spec.auth.user, "method": spec.auth.method.name.lower()}
        if spec.auth.ssh_keys:
            auth["ssh_keys"] = list(spec.auth.ssh_keys)
        if spec.auth.password:
            auth["password"] = spec.auth.password
        doc["auth"] = auth
    if spec.provision is not None:
        p = spec.provision
        doc["provision"] = {
            key: list(items)
            for key, items in (
                ("packages", p.packages),
                ("snap_packages", p.snap_packages),
                ("services", p.services),
                ("post_commands", p.post_commands),
            )
        }
    if spec.shared_folders:
        folders = []
        for f in spec.shared_folders:
            entry: dict[str, Any] = {"host_path": f.host_path, "tag": f.tag, "read_only": f.read_only}
            if v2:
                if f.mount:
                    entry["mount"] = f.mount
                entry["driver"] = "virtiofs" if f.driver is ShareDriver.VIRTIOFS else "9p"
            folders.append(entry)
        doc["shared_folders"] = folders
    if spec.cloud_init is not None:
        ci = spec.cloud_init
        cloud: dict[str, Any] = {
            key: text
            for key, text in (
                ("user_data", ci.user_data.reveal()),  # writing the spec file back is a use of the value
                ("meta_data", ci.meta_data),
                ("network_config", ci.network_config),
            )
            if text
        }
        if v2 and ci.detach_seed_after_boot:
            cloud["detach_seed_after_boot"] = True
        doc["cloud_init"] = cloud
    if spec.health_checks:
        doc["health_checks"] = [_dump_probe(p) for p in spec.health_checks]
    if spec.labels:
        doc["labels"] = dict(spec.labels)
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True)
