r"""
The plan file (``clonebox-compose.yaml``): a stack of VMs, read into a checked :class:`~clonebox_core.plan.Plan`.

Format (version 1)::

    version: 1                  # required; only 1 is known
    name: stack                 # a DNS label; default: the plan file's folder name, when that is one
    defaults:                   # VM spec (version 2) fields merged under every inline or template VM:
      vcpus: 1                  #   mappings merged deeply, lists replaced, the VM's own value wins
      memory: 128MiB
    vms:                        # service -> definition, in the order they should be listed
      db:
        # the VM: exactly one source
        #   - inline VM spec v2 fields (vcpus, memory, disks, kernel_boot, network, auth, provision,
        #     shared_folders, cloud_init, health_checks, labels), or
        #   - config: PATH     a VM spec file (version 1 or 2), relative to the plan file's folder, used as
        #                      it is (defaults are not merged into it; its name is replaced), or
        #   - template: NAME   NAME.yaml from $CLONEBOX_TEMPLATE_PATH (folders separated by ':'), then
        #                      ~/.config/clonebox/templates: VM spec v2 fields without name; defaults are
        #                      merged under it and inline fields next to it override it
        kernel_boot: {kernel: testguest/vmlinux}
        health_checks: [{name: port, type: tcp, tcp: {port: 5432}}]
      api:
        template: small
        depends_on: {db: {condition: healthy}}   # or a list [db]; condition started (default),
                                                 # healthy or completed
        environment: {DB_HOST: stack-db}         # written to the guest's /etc/environment
        placement: {host: h1}                    # optional: the host to place it on
        volumes: ["data:/var/lib/db", cache]     # plan volumes it attaches (NAME or NAME:/mount/path)
    volumes:                    # disks that outlive the VMs: <plan>-<name> on the host of their VMs
      data: {size: 1GiB}        # one service at most ...
      cache: {size: 256MiB, shared: true}        # ... unless shared (the guests coordinate their writes)
    update: {max_parallel: 4, min_healthy_time: 10s, healthy_deadline: 5m, auto_revert: false}
    on_failure: rollback        # or leave

Each service's VM is named ``<plan>-<service>`` and labelled ``clonebox.plan: <plan>`` and
``clonebox.service: <service>``; a VM may set neither its name nor those labels. ``environment``
becomes a cloud-init ``write_files`` entry appending ``KEY="value"`` lines to ``/etc/environment``
(0644; ``\``, ``"``, ``$`` and backquotes escaped, so a shell or a systemd ``EnvironmentFile`` reads the
value back as written), merged into the VM's ``cloud_init.user_data``. ``networks:`` become libvirt
networks made by the agent (one per plan at least) and ``volumes:`` agent volumes (docs/plans.md).

Every problem is one ``InvalidArgument`` line ``FILE:LINE: path: what and the fix`` (reason
``PLAN_INVALID``, or ``PLAN_UNKNOWN_DEPENDENCY``, ``PLAN_CYCLE``, ``PLAN_NO_HEALTH_CHECK`` from
:func:`clonebox_core.plan.check_plan`, or a ``YAML_*`` limit), with ``file``, ``line`` and ``field``
metadata. A problem inside a VM is reported where it was written: the plan file's line with the path
``vms.<service>.<field>`` (``defaults.<field>`` for a value that came from ``defaults``), or the
config or template file's own line. The first problem as the file reads is reported, with
``(and N more problems)``. Problems are looked for in rounds (the file's structure, then the VM specs,
then the plan as a whole), so the count covers the round that found the first one. Values that may
hold credentials (cloud-init, ``auth.password``, environment values) are never quoted.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, NamedTuple, NoReturn

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from clonebox_core.cloudinit import HEADER
from clonebox_core.errors import InvalidArgument
from clonebox_core.model import CloudInit, VmSpec
from clonebox_core.names import is_dns_label
from clonebox_core.plan import (
    DEFAULT_HEALTHY_DEADLINE_MS,
    DEFAULT_MAX_PARALLEL,
    DEFAULT_NETWORK,
    LABEL_PLAN,
    LABEL_SERVICE,
    PLAN_INVALID,
    PLAN_NO_HEALTH_CHECK,
    PLAN_UNKNOWN_DEPENDENCY,
    Condition,
    Dependency,
    FailurePolicy,
    Plan,
    PlanNetwork,
    PlanVm,
    PlanVolume,
    UpdatePolicy,
    check_names,
    check_plan,
    check_update,
    levels,
    vm_name,
    volume_device,
)
from clonebox_core.secret import Secret
from clonebox_core.spec import (
    MAX_SPEC_BYTES,
    SECRET_PATHS,
    SPEC_FIELDS,
    Duration,
    SpecOrigin,
    SpecProblem,
    VolumeMiB,
    document_problem,
    problem_at,
    schema_problems,
    spec_problems,
)
from clonebox_core.validate import MAX_CLOUD_INIT_BYTES
from clonebox_core.yamlsafe import Loc, line_of, load_yaml_safely, located_error

__all__ = [
    "ENVIRONMENT_FILE",
    "MAX_PLAN_BYTES",
    "PLAN_FILE",
    "PLAN_VERSION",
    "TEMPLATE_PATH_ENV",
    "load_plan_file",
    "load_plan_text",
    "template_dirs",
]

#: the file ``clonebox up`` reads when given a folder
PLAN_FILE = "clonebox-compose.yaml"
#: the only plan file version
PLAN_VERSION = 1
#: a plan of 500 VMs with inline cloud-init stays well below this
MAX_PLAN_BYTES = 8 * 1024 * 1024
#: folders (separated by ':') searched for ``template: NAME`` before ~/.config/clonebox/templates
TEMPLATE_PATH_ENV = "CLONEBOX_TEMPLATE_PATH"
#: where the guest reads the variables of ``environment`` from
ENVIRONMENT_FILE = "/etc/environment"

#: the plan keys of a service (everything else in it is a VM spec field)
_PLAN_KEYS = ("config", "template", "depends_on", "environment", "placement", "networks", "volumes")
#: the VM spec fields a service (or ``defaults``) may give: the plan sets version and name
_VM_FIELDS = tuple(f for f in SPEC_FIELDS if f not in ("version", "name"))
_RESERVED_LABELS = (LABEL_PLAN, LABEL_SERVICE)
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: a guest path a volume is mounted at: absolute, printable, no blanks
_GUEST_MOUNT = re.compile(r"/[^\x00-\x20\x7f]{0,4095}")
#: how a mounted volume is formatted (only when it has no file system) and its fstab options: a missing
#: volume must not stop the guest from booting
VOLUME_FS = "ext4"
VOLUME_MOUNT_OPTIONS = "defaults,nofail,x-systemd.device-timeout=30s"
_TEMPLATE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
#: keys a plan file may not use yet -> "key: why and what to do instead" (none at the moment)
_NOT_YET: dict[str, str] = {}
_CONDITIONS = {c.value: c for c in Condition}
# libyaml when PyYAML has it: a plan of hundreds of VMs with environment re-writes as many user-data documents
_YamlLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # both build plain types only
_YamlDumper: Any = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
# where a plan model field lives in the file (check_plan speaks the model's names)
_MODEL_TO_FILE = {"min_healthy_time_ms": "min_healthy_time", "healthy_deadline_ms": "healthy_deadline"}


class _AnyService(str):
    """
    Stands for every service name in a secret path given to ``load_yaml_safely``.

    The reader compares its current location with each secret path using ``==``; this string equals
    every string, so ``("vms", ANY, "cloud_init")`` hides the cloud-init of each service, whatever its
    name, even in a syntax error found before the service names are known.
    """

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str)

    def __ne__(self, other: object) -> bool:
        return not isinstance(other, str)

    def __hash__(self) -> int:
        return 0


_ANY = _AnyService("*")
_SECRET_IN_VM = (("cloud_init",), ("auth", "password"), ("environment",))
_PLAN_SECRET_PATHS: tuple[Loc, ...] = (
    *(("vms", _ANY, *p) for p in _SECRET_IN_VM),
    *(("defaults", *p) for p in SECRET_PATHS),
)


def _is_secret(loc: Loc) -> bool:
    """Whether a value at ``loc`` in the plan file may hold a credential (never quoted)."""
    inside: Loc = loc[2:] if loc[:1] == ("vms",) else loc[1:] if loc[:1] == ("defaults",) else ()
    return any(tuple(inside[: len(p)]) == p for p in _SECRET_IN_VM)


# ---------------------------------------------------------------------------------------- the schema


class _Strict(BaseModel):
    # strict, as the VM spec: a quoted "4" for max_parallel is a typo worth reporting
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class _Update(_Strict):
    max_parallel: int = DEFAULT_MAX_PARALLEL
    min_healthy_time: Duration = 0
    healthy_deadline: Duration = DEFAULT_HEALTHY_DEADLINE_MS
    auto_revert: bool = False


class _Placement(_Strict):
    host: str


class _Network(_Strict):
    subnet: str = ""


class _Volume(_Strict):
    size: VolumeMiB
    shared: bool = False


class _Wait(_Strict):
    condition: Literal["started", "healthy", "completed"] = "started"


class _Service(_Strict):
    """One service: its plan keys, and the VM spec fields (checked by the spec loader, hence ``Any``)."""

    config: str | None = None
    template: str | None = None
    depends_on: Any = None
    environment: dict[str, str] | None = None
    placement: _Placement | None = None
    networks: list[str] | None = None
    volumes: list[str] | None = None
    vcpus: Any = None
    memory: Any = None
    disks: Any = None
    kernel_boot: Any = None
    network: Any = None
    auth: Any = None
    provision: Any = None
    shared_folders: Any = None
    cloud_init: Any = None
    health_checks: Any = None
    labels: Any = None


class _PlanDoc(_Strict):
    version: Literal[1]
    name: str | None = None
    defaults: dict[str, Any] | None = None
    vms: dict[str, _Service | None]
    update: _Update | None = None
    on_failure: Literal["rollback", "leave"] = "rollback"
    networks: dict[str, _Network | None] | None = None
    volumes: dict[str, _Volume | None] | None = None


# --------------------------------------------------------------------------------------- the loader


class _Problem(NamedTuple):
    """A problem and where it sorts: the plan file's line, then the line inside a config or template file."""

    order: tuple[int, int]
    problem: SpecProblem
    reason: str


class _EnvironmentError(Exception):
    """``environment`` cannot be merged into the VM's user-data; the message says why and the fix."""


@dataclasses.dataclass
class _Draft:
    """What the structure round learnt about one service."""

    name: str
    raw: Mapping[str, Any]
    doc: _Service
    deps: list[tuple[Dependency, Loc, bool]]


class _File(NamedTuple):
    """A config or template file, read."""

    source: str
    data: Any
    root: yaml.Node | None


def template_dirs() -> list[Path]:
    """Folders searched for ``template: NAME``: ``$CLONEBOX_TEMPLATE_PATH``, then ~/.config/clonebox/templates."""
    dirs = [Path(p) for p in os.environ.get(TEMPLATE_PATH_ENV, "").split(":") if p]
    return [*dirs, Path("~/.config/clonebox/templates").expanduser()]


class _Loader:
    """Reads one plan document; ``problems`` collects the current round's findings."""

    def __init__(self, source: str, base_dir: Path) -> None:
        self.source = source
        self.base_dir = base_dir
        self.root: yaml.Node | None = None
        self.data: Any = None
        self.origin = SpecOrigin(source, None)
        self.problems: list[_Problem] = []
        self.files: dict[Path, _File | _Problem] = {}

    # -- problems

    def here(self, loc: Loc, what: str, *, at_key: bool = False, reason: str = PLAN_INVALID) -> None:
        """Record a problem at ``loc`` of the plan file."""
        self.add(problem_at([self.origin], loc, what, at_key=at_key), reason)

    def add(self, problem: SpecProblem, reason: str = PLAN_INVALID, anchor: int = 0) -> None:
        """Record ``problem``; one in another file sorts at ``anchor``, the plan file's line naming that file."""
        order = (problem.line, 0) if problem.source == self.source else (anchor, problem.line)
        self.problems.append(_Problem(order, problem, reason))

    def check(self) -> None:
        """Raise the round's first problem, if it found any."""
        if self.problems:
            self.fail()

    def fail(self) -> NoReturn:
        """Raise the first problem as the files read, counting the others."""
        found = sorted(self.problems, key=lambda p: p.order)
        first, rest = found[0], len(found) - 1
        more = f" (and {rest} more problem{'s' if rest > 1 else ''})" if rest else ""
        p = first.problem
        raise located_error(p.source, p.line, p.message + more, reason=first.reason, field=p.field)

    def line(self, loc: Loc, *, at_key: bool = False) -> int:
        """The plan file's line of ``loc``."""
        return line_of(self.root, loc, at_key=at_key)

    # -- the document

    def load(self, content: str | bytes) -> Plan:
        self.data, self.root = load_yaml_safely(
            content, self.source, max_bytes=MAX_PLAN_BYTES, reason=PLAN_INVALID, secret_paths=_PLAN_SECRET_PATHS
        )
        self.origin = SpecOrigin(self.source, self.root)
        doc = self.structure(self.data)
        name = self.plan_name(doc)
        services = self.services(doc, name)
        update = UpdatePolicy() if doc.update is None else self.update(doc.update)
        for volume, given in (doc.volumes or {}).items():
            if given is None:
                self.here(("volumes", volume), f"a volume needs a size: {volume}: {{size: 1GiB}}", at_key=True)
        self.check()
        defaults = doc.defaults or {}
        vms = [self.vm(name, s, defaults) for s in services]
        self.check()
        declared = [PlanNetwork(n, (v or _Network()).subnet) for n, v in (doc.networks or {}).items()]
        if any(v is not None and v.network == DEFAULT_NETWORK for v in vms) and DEFAULT_NETWORK not in {
            n.name for n in declared
        }:
            declared.insert(0, PlanNetwork(DEFAULT_NETWORK))  # as in compose: implied when a service uses it
        plan = Plan(
            name=name,
            vms=tuple(v for v in vms if v is not None),
            update=update,
            on_failure=FailurePolicy(doc.on_failure),
            source=self.source,
            networks=tuple(declared),
            volumes=tuple(PlanVolume(n, v.size, v.shared) for n, v in (doc.volumes or {}).items() if v is not None),
        )
        try:
            check_plan(plan)
        except InvalidArgument as exc:
            self.plan_problem(exc, plan)
            self.fail()
        return plan

    def structure(self, data: Any) -> _PlanDoc:
        """The document's shape: version first, then the schema; hand-made hints for what people try."""
        if data is None:
            raise located_error(
                self.source,
                1,
                "the file is empty: a plan starts with 'version: 1' and 'vms:'",
                reason=PLAN_INVALID,
            )
        if not isinstance(data, Mapping):
            raise located_error(
                self.source,
                self.line(()),
                # a whole document that is not a mapping may be a token file given by mistake: never quote it
                "expected a mapping of fields (version, name, defaults, vms, update, on_failure), got "
                + ("a list" if isinstance(data, list) else "a single value"),
                reason=PLAN_INVALID,
            )
        if "version" not in data:
            raise located_error(
                self.source,
                self.line(()),
                f"version: required but missing: add 'version: {PLAN_VERSION}'",
                reason=PLAN_INVALID,
                field="version",
            )
        version = data["version"]
        if isinstance(version, bool) or version != PLAN_VERSION:
            shown = repr(version)[:24] if isinstance(version, str | int | float) else "a " + type(version).__name__
            raise located_error(
                self.source,
                self.line(("version",)),
                f"version: {shown} is not supported: this clonebox reads plan files of version {PLAN_VERSION}",
                reason=PLAN_INVALID,
                field="version",
            )
        data = dict(data)
        if "services" in data and "vms" not in data:
            # the word compose files use: say so once, and read on as if it were vms
            self.here(("services",), "a plan calls its services vms: rename services: to vms:", at_key=True)
            data["vms"] = data.pop("services")
        for key in _NOT_YET:
            if key in data:
                self.here((key,), _NOT_YET[key].split(": ", 1)[1], at_key=True)
                del data[key]
        defaults = data.get("defaults")
        if isinstance(defaults, Mapping):
            data["defaults"] = self.defaults(defaults)
        vms = data.get("vms")
        if isinstance(vms, Mapping):
            data["vms"] = {k: self.strip_service(k, v) if isinstance(v, Mapping) else v for k, v in vms.items()}
        try:
            doc = _PlanDoc.model_validate(data)
        except ValidationError as exc:
            for problem in schema_problems(exc, _PlanDoc, [self.origin], is_secret=_is_secret):
                self.add(problem)
            self.fail()
        self.check()
        return doc

    def defaults(self, defaults: Mapping[str, Any]) -> dict[str, Any]:
        """``defaults`` without the keys that cannot be there (each one a problem)."""
        kept: dict[str, Any] = {}
        for key, value in defaults.items():
            loc: Loc = ("defaults", key)
            if key in _NOT_YET:
                self.here(loc, _NOT_YET[key].split(": ", 1)[1], at_key=True)
            elif key in ("name", "version"):
                self.here(
                    loc, f"a plan sets each VM's {key} itself (VMs are named <plan>-<service>): remove it", at_key=True
                )
            elif key in _PLAN_KEYS:
                self.here(loc, f"'{key}' belongs to a service under vms:, not to defaults", at_key=True)
            elif key not in _VM_FIELDS:
                self.here(loc, f"unknown field (VM spec fields: {', '.join(_VM_FIELDS)})", at_key=True)
            else:
                kept[key] = value
        self.reserved_labels(defaults.get("labels"), ("defaults",), self.origin)
        return kept

    def strip_service(self, service: Any, vm: Mapping[str, Any]) -> dict[str, Any]:
        """A service's mapping without the keys that get their own message."""
        kept = dict(vm)
        for key in ("name", "version", *_NOT_YET):
            if key not in kept:
                continue
            loc: Loc = ("vms", str(service), key)
            if key == "name":
                self.here(loc, f"a plan names its VMs itself ('<plan>-{service}'): remove it", at_key=True)
            elif key == "version":
                self.here(loc, "a plan's inline VMs are version 2 specs: remove it", at_key=True)
            else:
                self.here(loc, _NOT_YET[key].split(": ", 1)[1], at_key=True)
            del kept[key]
        return kept

    def plan_name(self, doc: _PlanDoc) -> str:
        if doc.name is not None:
            try:
                check_names(doc.name, [])
            except InvalidArgument as exc:
                self.here(("name",), exc.message.split(": ", 1)[1])
            return doc.name
        folder = Path(os.path.abspath(self.base_dir)).name
        if not is_dns_label(folder):
            self.add(
                SpecProblem(
                    self.source,
                    self.line(()),
                    f"name: not given, and the plan file's folder name {folder[:40]!r} is not a DNS label: "
                    "add 'name: ...' (1-63 lowercase letters, digits and '-')",
                    "name",
                )
            )
        return folder

    def services(self, doc: _PlanDoc, name: str) -> list[_Draft]:
        """Each service's names, sources, dependencies and environment; then the graph."""
        raw_vms = self.raw(("vms",))
        out: list[_Draft] = []
        for service, parsed in doc.vms.items():
            sdoc = parsed or _Service()
            raw = raw_vms.get(service) if isinstance(raw_vms, Mapping) else None
            raw = raw if isinstance(raw, Mapping) else {}
            at: Loc = ("vms", service)
            if is_dns_label(name):
                try:
                    check_names(name, [service])
                except InvalidArgument as exc:
                    self.here(at, exc.message.split(": ", 1)[1], at_key=True)
            self.sources(service, sdoc, raw)
            self.environment(service, sdoc)
            self.volume_uses(service, sdoc, doc.volumes or {}, name)
            self.reserved_labels(raw.get("labels"), at, self.origin)
            out.append(_Draft(service, raw, sdoc, self.dependencies(service, sdoc.depends_on)))
        if not self.problems and out:
            self.graph(name, out)
        return out

    def raw(self, loc: Loc) -> Any:
        """The parsed value at ``loc`` of the document as written (None when absent)."""
        value = self.data
        for part in loc:
            if not isinstance(value, Mapping) or part not in value:
                return None
            value = value[part]
        return value

    def sources(self, service: str, doc: _Service, raw: Mapping[str, Any]) -> None:
        at: Loc = ("vms", service)
        inline = [k for k in raw if k in _VM_FIELDS]
        if doc.config is not None and doc.template is not None:
            self.here((*at, "template"), "config and template are exclusive: give one", at_key=True)
        if doc.config is not None and inline:
            self.here(
                (*at, inline[0]),
                "not allowed next to config: (the config file is used as it is): move it into that file, "
                "or use template: to start from a file and change fields",
                at_key=True,
            )
        for key in ("config", "template"):
            value = getattr(doc, key)
            if value is not None and not value.strip():
                self.here((*at, key), f"must name a {'file' if key == 'config' else 'template'}")
        if doc.template and not _TEMPLATE_NAME.fullmatch(doc.template):
            self.here(
                (*at, "template"),
                f"{doc.template[:40]!r} is not a template name: letters, digits, '.', '_' and '-' "
                "(no folders: put the file in a template folder, or use config: PATH)",
            )

    def environment(self, service: str, doc: _Service) -> None:
        for key, value in (doc.environment or {}).items():
            loc: Loc = ("vms", service, "environment", key)
            if not _ENV_KEY.fullmatch(key):
                self.here(
                    loc,
                    f"{key[:40]!r} is not a variable name: use letters, digits and '_', not starting with a digit",
                    at_key=True,
                )
            elif any(c in value for c in "\n\r\x00"):
                # the value is not shown: environment values may be credentials
                self.here(loc, "the value has a line break or NUL: /etc/environment takes one line per variable")

    def volume_uses(self, service: str, doc: _Service, declared: Mapping[str, _Volume | None], plan: str) -> None:
        """
        A service's ``volumes:`` entries: ``NAME`` or ``NAME:/path`` (formatted when blank and mounted there).

        A mount needs an absolute guest path (not ``/``, no blanks), each path once, a volume that is not
        shared (ext4 is not a cluster file system), and volume devices the guest can tell apart (the first
        20 characters of the serials differ). The names themselves are checked with the plan.
        """
        paths: dict[str, int] = {}
        devices: dict[str, str] = {}
        for i, entry in enumerate(doc.volumes or ()):
            name, colon, path = entry.partition(":")
            if not colon:
                continue
            loc: Loc = ("vms", service, "volumes", i)
            if not _GUEST_MOUNT.fullmatch(path) or path == "/" or "/../" in f"{path}/":
                self.here(
                    loc, f"{entry[:80]!r}: the mount path must be an absolute guest path, not '/', without blanks"
                )
                continue
            if path in paths:
                self.here(loc, f"{path[:60]!r} is already the mount path of another volume of {service}")
                continue
            paths[path] = i
            given = declared.get(name)
            if given is not None and given.shared:
                self.here(
                    loc,
                    f"volume {name} is shared, and a mount formats it with ext4, which two guests cannot mount at "
                    f"once: write {name!r} alone and mount it in the guest with a cluster file system",
                )
                continue
            if is_dns_label(plan) and is_dns_label(name):
                device = volume_device(plan, name)
                if device in devices and devices[device] != name:
                    self.here(
                        loc,
                        f"volumes {devices[device]} and {name} both appear as {device} in the guest (it sees the first "
                        "20 characters of a disk serial): rename one so that they differ sooner",
                    )
                devices[device] = name

    def reserved_labels(self, labels: Any, at: Loc, origin: SpecOrigin, anchor: int = 0) -> None:
        if not isinstance(labels, Mapping):
            return
        for key in _RESERVED_LABELS:
            if key in labels:
                what = "set by the plan for each of its VMs: remove it"
                self.add(problem_at([origin], (*at, "labels", key), what, at_key=True), anchor=anchor)

    def dependencies(self, service: str, raw: Any) -> list[tuple[Dependency, Loc, bool]]:
        """The service's dependencies, each with where it is written (and whether to blame its key)."""
        at: Loc = ("vms", service, "depends_on")
        out: list[tuple[Dependency, Loc, bool]] = []
        if raw is None:
            return out
        if isinstance(raw, list):
            for i, item in enumerate(raw):
                if not isinstance(item, str):
                    self.here((*at, i), f"expected a service name, got {_brief(item)}")
                    continue
                out.append((Dependency(item), (*at, i), False))
        elif isinstance(raw, Mapping):
            for key, value in raw.items():
                loc: Loc = (*at, str(key))
                if not isinstance(key, str):
                    self.here(loc, f"expected a service name, got {_brief(key)}", at_key=True)
                    continue
                if value is None:
                    out.append((Dependency(key), loc, True))
                    continue
                if not isinstance(value, Mapping):
                    self.here(loc, f"expected a mapping like {{condition: healthy}}, got {_brief(value)}")
                    continue
                try:
                    wait = _Wait.model_validate(value)
                except ValidationError as exc:
                    for problem in schema_problems(exc, _Wait, [SpecOrigin(self.source, self.root, loc)]):
                        self.add(problem)
                    continue
                out.append((Dependency(key, _CONDITIONS[wait.condition]), loc, True))
        else:
            self.here(
                at,
                f"expected a list of services ([db, cache]) or a mapping (db: {{condition: healthy}}), "
                f"got {_brief(raw)}",
            )
            return out
        seen: set[str] = set()
        for dep, loc, at_key in out:
            if dep.service in seen:
                self.here(loc, f"{dep.service!r} is listed twice: keep one", at_key=at_key)
            seen.add(dep.service)
        return out

    def graph(self, name: str, services: list[_Draft]) -> None:
        """Unknown dependencies and cycles, found on the plan's bare graph (before any spec is read)."""
        bare = Plan(
            name,
            tuple(PlanVm(s.name, VmSpec(vm_name(name, s.name)), tuple(d for d, _, _ in s.deps)) for s in services),
        )
        try:
            levels(bare)
        except InvalidArgument as exc:
            service = exc.metadata["field"].split(".")[1]
            where: Loc = ("vms", service, "depends_on")  # a cycle: blame the 'depends_on:' of its first service
            at_key = True
            if exc.reason == PLAN_UNKNOWN_DEPENDENCY:
                known = {s.name for s in services}
                draft = next(s for s in services if s.name == service)
                where, at_key = next((loc, k) for d, loc, k in draft.deps if d.service not in known)
            self.here(where, exc.message.split(": ", 1)[1], at_key=at_key, reason=exc.reason)

    def update(self, doc: _Update) -> UpdatePolicy:
        policy = UpdatePolicy(doc.max_parallel, doc.min_healthy_time, doc.healthy_deadline, doc.auto_revert)
        try:
            check_update(policy)
        except InvalidArgument as exc:
            field = exc.metadata["field"].split(".")[1]
            self.here(("update", _MODEL_TO_FILE.get(field, field)), exc.message.split(": ", 1)[1])
        return policy

    # -- the VMs

    def vm(self, plan: str, s: _Draft, defaults: Mapping[str, Any]) -> PlanVm | None:
        """The service's VM, or None after recording its problem."""
        at: Loc = ("vms", s.name)
        name = vm_name(plan, s.name)
        inline = {k: v for k, v in s.raw.items() if k in _VM_FIELDS}
        own = SpecOrigin(self.source, self.root, at)
        from_defaults = SpecOrigin(self.source, self.root, ("defaults",))
        anchor = 0
        if s.doc.config:
            anchor = self.line((*at, "config"))
            found = self.config_file(s.doc.config, (*at, "config"))
            if found is None:
                return None
            data: dict[str, Any] = {**found.data, "name": name}
            origins = [SpecOrigin(found.source, found.root)]
        elif s.doc.template:
            anchor = self.line((*at, "template"))
            found = self.template_file(s.doc.template, (*at, "template"))
            if found is None:
                return None
            base = {k: v for k, v in found.data.items() if k != "version"}
            data = {"version": 2, "name": name, **_merged(_merged(defaults, base), inline)}
            origins = [own, SpecOrigin(found.source, found.root), from_defaults]
        else:
            data = {"version": 2, "name": name, **_merged(defaults, inline)}
            origins = [own, from_defaults]
        spec, problems = spec_problems(data, origins)
        for problem in problems:
            self.add(problem, anchor=anchor)
        if spec is None:
            return None
        labels = {**spec.label_dict(), LABEL_PLAN: plan, LABEL_SERVICE: s.name}
        spec = dataclasses.replace(spec, labels=tuple(sorted(labels.items())))
        if s.doc.environment:
            try:
                spec = _with_environment(spec, s.doc.environment)
            except _EnvironmentError as exc:
                self.here((*at, "environment"), str(exc), at_key=True)
                return None
        mounts = [entry.partition(":")[::2] for entry in s.doc.volumes or () if ":" in entry]
        if mounts:
            try:
                spec = _with_volume_mounts(spec, [(volume_device(plan, n), path) for n, path in mounts])
            except _EnvironmentError as exc:
                self.here((*at, "volumes"), str(exc).replace("the variables", "the volume mounts"), at_key=True)
                return None
        host = s.doc.placement.host if s.doc.placement is not None else ""
        network = self.network_of(s, "network" in data)
        names = tuple(entry.partition(":")[0] for entry in s.doc.volumes or ())
        return PlanVm(s.name, spec, tuple(d for d, _, _ in s.deps), host, network, names)

    def network_of(self, s: _Draft, own_network: bool) -> str:
        """
        The plan network of service ``s``.

        The one its ``networks:`` names, none for ``networks: []``, else the plan's default network
        unless its VM spec sets a network of its own.
        """
        if s.doc.networks is None:
            return "" if own_network else DEFAULT_NETWORK
        if len(s.doc.networks) > 1:
            self.here(
                ("vms", s.name, "networks"),
                f"{len(s.doc.networks)} networks: a VM is on one plan network for now (it has one interface)",
            )
            return ""
        return s.doc.networks[0] if s.doc.networks else ""

    def config_file(self, given: str, at: Loc) -> _File | None:
        path = Path(given) if Path(given).is_absolute() else self.base_dir / given
        found = self.read(
            path, str(path), at, f"no such file {_tail(str(path))!r}: config: is relative to the plan file's folder"
        )
        if found is None:
            return None
        anchor = self.line(at)
        problem = document_problem(found.data, found.root, found.source)
        if problem is not None:
            self.add(problem, anchor=anchor)
            return None
        self.reserved_labels(found.data.get("labels"), (), SpecOrigin(found.source, found.root), anchor)
        return found

    def template_file(self, name: str, at: Loc) -> _File | None:
        dirs = template_dirs()
        path = next((d / f"{name}.yaml" for d in dirs if (d / f"{name}.yaml").is_file()), None)
        if path is None:
            looked = ", ".join(str(d) for d in dirs)
            self.here(
                at,
                f"template {name!r} not found: looked for {name}.yaml in {looked}; "
                f"put it in one of them or add its folder to ${TEMPLATE_PATH_ENV}",
            )
            return None
        found = self.read(path, str(path), at, "cannot be read")
        if found is None:
            return None
        anchor = self.line(at)
        origin = SpecOrigin(found.source, found.root)
        data = found.data
        if not isinstance(data, Mapping):
            self.add(
                SpecProblem(
                    found.source,
                    line_of(found.root, ()),
                    f"a template is a mapping of VM spec fields ({', '.join(_VM_FIELDS)})",
                    "",
                ),
                anchor=anchor,
            )
            return None
        if "name" in data:
            what = "a template names no VM (the plan names each one <plan>-<service>): remove it"
            self.add(problem_at([origin], ("name",), what, at_key=True), anchor=anchor)
        version = data.get("version", 2)
        if isinstance(version, bool) or version != 2:
            what = "a template holds VM spec version 2 fields: use 'version: 2' or leave it out"
            self.add(problem_at([origin], ("version",), what), anchor=anchor)
        self.reserved_labels(data.get("labels"), (), origin, anchor)
        if any(p.problem.source == found.source for p in self.problems):
            return None
        return found

    def read(self, path: Path, source: str, at: Loc, missing: str) -> _File | None:
        """The parsed file at ``path`` (each read once per plan), or None after recording why not."""
        key = Path(os.path.abspath(path))
        cached = self.files.get(key)
        if isinstance(cached, _File):
            return cached
        if cached is not None:  # the same broken file again: its problem, sorted at this service too
            self.add(cached.problem, cached.reason, anchor=self.line(at))
            return None
        try:
            with path.open("rb") as f:
                raw = f.read(MAX_SPEC_BYTES + 1)  # one byte more than allowed is enough to refuse it
        except FileNotFoundError:
            self.here(at, missing)
            return None
        except IsADirectoryError:
            self.here(at, f"{source[:80]!r} is a folder, not a VM spec file")
            return None
        except OSError as exc:
            self.here(at, f"cannot read {source[:80]!r}: {exc.strerror}")
            return None
        try:
            data, root = load_yaml_safely(
                raw, source, max_bytes=MAX_SPEC_BYTES, reason=PLAN_INVALID, secret_paths=SECRET_PATHS
            )
        except InvalidArgument as exc:  # the YAML reader's own, already located in that file
            line = int(exc.metadata.get("line", "1"))
            text = exc.message.removeprefix(f"{source}:{line}: ")
            problem = _Problem((0, 0), SpecProblem(source, line, text, ""), exc.reason)
            self.files[key] = problem
            self.add(problem.problem, problem.reason, anchor=self.line(at))
            return None
        found = _File(source, data, root)
        self.files[key] = found
        return found

    # -- the plan as a whole

    def plan_problem(self, exc: InvalidArgument, plan: Plan) -> None:
        """Record a ``check_plan`` error at the line its field was written."""
        field = exc.metadata.get("field", "")
        what = exc.message.removeprefix(f"{field}: ")
        parts = field.split(".") if field else []
        loc: Loc = tuple(parts)
        at_key = False
        if parts[:1] == ["vms"] and len(parts) == 2:
            at_key = True
        elif parts[:1] == ["vms"] and parts[2:] == ["host"]:
            loc = ("vms", parts[1], "placement", "host")
        elif parts[:1] == ["update"] and len(parts) == 2:
            loc = ("update", _MODEL_TO_FILE.get(parts[1], parts[1]))
        elif parts[:1] == ["vms"] and parts[2:] == ["volumes"] and "index" in exc.metadata:
            loc = ("vms", parts[1], "volumes", int(exc.metadata["index"]))
        elif parts[:1] == ["volumes"] and len(parts) == 2:
            at_key = True
        elif parts[:1] == ["volumes"] and parts[2:] == ["size_mib"]:
            loc = ("volumes", parts[1], "size")
        if exc.reason == PLAN_NO_HEALTH_CHECK and len(parts) == 3:
            # blame the condition that asks for health (only the mapping form of depends_on has one)
            bad = next(
                d.service
                for d in plan.vm(parts[1]).depends_on
                if d.condition is Condition.HEALTHY and not plan.vm(d.service).spec.health_checks
            )
            loc = ("vms", parts[1], "depends_on", bad, "condition")
        self.here(loc, what, at_key=at_key, reason=exc.reason)


def _brief(value: object) -> str:
    """A short description of a YAML value (plan keys hold no secrets: short values are quoted)."""
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:37] + "...")
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, int | float):
        return str(value)
    return "a list" if isinstance(value, list) else "a mapping" if isinstance(value, Mapping) else "a value"


def _merged(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``: mappings merged deeply, anything else (lists too) replaced."""
    out = dict(base)
    for key, value in over.items():
        below = out.get(key)
        out[key] = _merged(below, value) if isinstance(value, Mapping) and isinstance(below, Mapping) else value
    return out


def _env_value(value: str) -> str:
    # double quotes, with what a shell or systemd would expand or end the string on escaped
    for ch in ("\\", '"', "$", "`"):
        value = value.replace(ch, "\\" + ch)
    return f'"{value}"'


def _with_volume_mounts(spec: VmSpec, mounts: list[tuple[str, str]]) -> VmSpec:
    """
    ``spec`` with cloud-init formatting each volume device when it is blank and mounting it at its path.

    ``fs_setup`` with ``overwrite: false`` makes an ext4 file system on the whole device only when it has
    none (the data of an earlier VM stays); ``mounts`` adds the fstab entry (``nofail``) and mounts it.
    Raises _EnvironmentError as :func:`_with_environment` does for a user-data it cannot extend.
    """
    cfg = _user_config(spec)
    for key in ("fs_setup", "mounts"):
        if not isinstance(cfg.get(key, []), list):
            raise _EnvironmentError(f"the VM's cloud_init.user_data has a {key} that is not a list")
    setup = [
        {"device": device, "filesystem": VOLUME_FS, "partition": "none", "overwrite": False} for device, _ in mounts
    ]
    fstab = [[device, path, VOLUME_FS, VOLUME_MOUNT_OPTIONS, "0", "2"] for device, path in mounts]
    cfg["fs_setup"] = [*cfg.get("fs_setup", []), *setup]
    cfg["mounts"] = [*cfg.get("mounts", []), *fstab]
    return _set_user_config(spec, cfg, "the volume mounts")


def _user_config(spec: VmSpec) -> dict[str, Any]:
    """The VM's user-data as a cloud-config mapping ({} for none); _EnvironmentError when it is not one."""
    text = spec.cloud_init.user_data.reveal() if spec.cloud_init is not None else ""
    if not text.strip():
        return {}
    if not text.startswith(HEADER.strip()):
        raise _EnvironmentError(
            "the VM's cloud_init.user_data is not #cloud-config (a script?), so the variables cannot be "
            "added to it: write them in the user-data yourself, or make it cloud-config"
        )
    try:
        parsed = yaml.load(text, Loader=_YamlLoader)
    except yaml.YAMLError:
        # the user-data may hold credentials: say where, never what
        raise _EnvironmentError("the VM's cloud_init.user_data is not valid YAML") from None
    if parsed is not None and not isinstance(parsed, dict):
        raise _EnvironmentError("the VM's cloud_init.user_data is not a mapping of cloud-config keys")
    return dict(parsed or {})


def _set_user_config(spec: VmSpec, cfg: Mapping[str, Any], what: str) -> VmSpec:
    """``spec`` with ``cfg`` as its user-data (_EnvironmentError past the 1 MiB cloud-init limit)."""
    rendered = HEADER + yaml.dump(dict(cfg), Dumper=_YamlDumper, sort_keys=False, default_flow_style=False, width=4096)
    if len(rendered.encode()) > MAX_CLOUD_INIT_BYTES:
        raise _EnvironmentError(f"with {what} added, cloud_init.user_data is larger than 1 MiB")
    cloud = spec.cloud_init if spec.cloud_init is not None else CloudInit()
    return dataclasses.replace(spec, cloud_init=dataclasses.replace(cloud, user_data=Secret(rendered)))


def _with_environment(spec: VmSpec, env: Mapping[str, str]) -> VmSpec:
    """
    ``spec`` with ``env`` appended to the guest's /etc/environment through its cloud-init user-data.

    The entry appends (``append: true``) so that what the image keeps there (Ubuntu's PATH line)
    stays. Raises _EnvironmentError when the user-data is no cloud-config mapping, writes the file
    itself, or grows past the 1 MiB cloud-init limit. ``spec`` has passed the spec checks already
    (its user-data sets no password), and a ``write_files`` entry adds none.
    """
    content = "".join(f"{key}={_env_value(value)}\n" for key, value in env.items())
    entry = {"path": ENVIRONMENT_FILE, "permissions": "0644", "owner": "root:root", "append": True, "content": content}
    cfg = _user_config(spec)
    files = cfg.get("write_files", [])
    if not isinstance(files, list):
        raise _EnvironmentError("the VM's cloud_init.user_data has a write_files that is not a list")
    if any(isinstance(f, Mapping) and f.get("path") == ENVIRONMENT_FILE for f in files):
        raise _EnvironmentError(
            f"the VM's cloud_init.user_data writes {ENVIRONMENT_FILE} itself: put the variables there, or drop that "
            "write_files entry"
        )
    cfg["write_files"] = [*files, entry]
    return _set_user_config(spec, cfg, "the variables")


# ------------------------------------------------------------------------------------------ the API


def load_plan_text(text: str, source_name: str, base_dir: Path) -> Plan:
    """
    Parse and check a plan document; ``source_name`` names it in messages and becomes ``Plan.source``.

    ``base_dir`` is the folder ``config:`` paths are relative to, whose name is the plan's name when
    the document gives none. The result has passed :func:`clonebox_core.plan.check_plan`.
    """
    return _Loader(source_name, base_dir).load(text)


def load_plan_file(path: str | Path) -> Plan:
    """Read and check the plan file at ``path`` (a folder means its ``clonebox-compose.yaml``)."""
    file = Path(path)
    if file.is_dir():
        file = file / PLAN_FILE
    source = str(path) if file == Path(path) else str(file)
    try:
        with file.open("rb") as f:
            raw = f.read(MAX_PLAN_BYTES + 1)  # one byte more than allowed is enough to refuse it
    except FileNotFoundError:
        raise InvalidArgument(
            f"{source}: no such file: give the path of a plan file ({PLAN_FILE})",
            reason=PLAN_INVALID,
            metadata={"file": source},
        ) from None
    except OSError as exc:
        raise InvalidArgument(
            f"{source}: cannot read: {exc.strerror}", reason=PLAN_INVALID, metadata={"file": source}
        ) from None
    return _Loader(source, file.parent).load(raw)


def _tail(path: str, limit: int = 240) -> str:
    """``path`` for a message: whole, or its last ``limit`` characters after an ellipsis (the file name stays)."""
    return path if len(path) <= limit else "..." + path[-limit:]
