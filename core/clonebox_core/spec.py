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
    kernel_boot:                   # optional direct kernel boot
      kernel: testguest/vmlinuz
      initrd: testguest/initrd.img
      cmdline: console=ttyS0 quiet
    network: {mode: libvirt, libvirt_network: default}   # or {mode: none}; default libvirt/default
    shared_folders: [{host_path: /srv/x, tag: x, read_only: true}]
    cloud_init:                    # NoCloud inputs; each a string, or a mapping that is dumped as YAML
      user_data: "#cloud-config\\n..."   # a mapping becomes "#cloud-config" + the mapping
      meta_data: ""
      network_config: ""
    labels: {app: demo}

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
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError
from pydantic_core import ErrorDetails

from clonebox_core.errors import InvalidArgument
from clonebox_core.model import (
    CloudInit,
    DiskSpec,
    KernelBoot,
    NetworkMode,
    NetworkSpec,
    SharedFolder,
    VmSpec,
)
from clonebox_core.secret import Secret
from clonebox_core.units import format_size, parse_size
from clonebox_core.validate import MAX_DISK_MIB, MAX_MEMORY_MIB, MIN_MEMORY_MIB, validate_spec
from clonebox_core.yamlsafe import find_node, line_of, load_yaml_safely, located_error, scrub

__all__ = [
    "MAX_SPEC_BYTES",
    "REASON",
    "SECRET_PATHS",
    "SPEC_VERSION",
    "dump_spec",
    "format_size",
    "load_spec_file",
    "load_spec_text",
    "parse_size",
]

#: the only spec format version this code reads
SPEC_VERSION = 1
#: reason carried by every spec error
REASON = "SPEC_INVALID"
#: three cloud-init documents of at most 1 MiB each, plus the rest of the spec
MAX_SPEC_BYTES = 4 * 1024 * 1024
#: ``cloud_init`` may carry passwords and tokens: no error message quotes anything inside it
SECRET_PATHS: tuple[tuple[str, ...], ...] = (("cloud_init",),)
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
UserData = Annotated[str, _cloud_text("#cloud-config\n")]
CloudText = Annotated[str, _cloud_text("")]


class _Disk(_Strict):
    name: str
    base_image: str = ""
    size: DiskMiB | None = None


class _KernelBoot(_Strict):
    kernel: str
    initrd: str = ""
    cmdline: str = ""


class _Network(_Strict):
    mode: Literal["libvirt", "none"] = "libvirt"
    libvirt_network: str | None = None


class _SharedFolder(_Strict):
    host_path: str
    tag: str
    read_only: bool = False


class _CloudInit(_Strict):
    user_data: UserData = ""
    meta_data: CloudText = ""
    network_config: CloudText = ""


class _SpecV1(_Strict):
    version: Literal[1]
    name: str
    vcpus: int = 1
    memory: MemoryMiB = 512
    disks: list[_Disk] | None = None
    kernel_boot: _KernelBoot | None = None
    network: _Network | None = None
    shared_folders: list[_SharedFolder] | None = None
    cloud_init: _CloudInit | None = None
    labels: dict[str, str] | None = None


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


def _to_model(doc: _SpecV1) -> VmSpec:
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
        else:
            network = NetworkSpec(NetworkMode.LIBVIRT, doc.network.libvirt_network or "default")
    return VmSpec(
        name=doc.name,
        vcpus=doc.vcpus,
        memory_mib=doc.memory,
        disks=tuple(DiskSpec(d.name, d.base_image, d.size or 0) for d in doc.disks or ()),
        kernel_boot=(
            KernelBoot(doc.kernel_boot.kernel, doc.kernel_boot.initrd, doc.kernel_boot.cmdline)
            if doc.kernel_boot is not None
            else None
        ),
        network=network,
        shared_folders=tuple(SharedFolder(f.host_path, f.tag, f.read_only) for f in doc.shared_folders or ()),
        cloud_init=(
            CloudInit(Secret(doc.cloud_init.user_data), doc.cloud_init.meta_data, doc.cloud_init.network_config)
            if doc.cloud_init is not None
            else None
        ),
        labels=tuple(sorted((doc.labels or {}).items())),
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


def _fields_of(loc: Loc) -> list[str]:
    """Known field names of the schema object at ``loc`` (for 'did you mean')."""
    model: type[BaseModel] = _SpecV1
    for part in loc:
        if isinstance(part, int):
            continue
        annotation = model.model_fields[str(part)].annotation if str(part) in model.model_fields else None
        inner = _model_in(annotation)
        if inner is None:
            return []
        model = inner
    return list(model.model_fields)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _unknown_field_hint(loc: Loc) -> str:
    known = _fields_of(loc[:-1])
    close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
    if close:
        return f"unknown field (did you mean '{close[0]}'?)"
    if known:
        return f"unknown field (known fields: {', '.join(known)})"
    return "unknown field"


def _quote_hint(value: object) -> str:
    return " (put it in quotes)" if isinstance(value, int | float | bool) or value is None else ""


def _pydantic_problem(err: ErrorDetails, root: yaml.Node | None) -> tuple[Loc, str, bool, bool]:
    """(location, message, blame the key, blame the parent) for one pydantic error."""
    loc: Loc = tuple(err["loc"])
    kind, value = err["type"], err.get("input")
    at_key = False
    if loc and loc[-1] == "[key]":  # dict key errors: pydantic appends a marker after the key
        loc, at_key = loc[:-1], True
    path = _path_text(loc, root)
    secret = _is_secret(loc)
    shown = _describe(value, secret=secret)
    if kind == "missing":
        return loc, f"{path}: required but missing: add '{loc[-1]}: ...'", False, True
    if kind == "extra_forbidden":
        return loc, f"{path}: {_unknown_field_hint(loc)}", True, False
    if kind == "string_type":
        return loc, f"{path}: expected a string, got {shown}{_quote_hint(value)}", at_key, False
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return loc, f"{path}: expected a whole number, got {shown}", at_key, False
    if kind == "bool_type":
        return loc, f"{path}: expected true or false, got {shown}", at_key, False
    if kind == "literal_error":
        expected = (err.get("ctx") or {}).get("expected", "")
        return loc, f"{path}: {shown} is not allowed: use {expected}", at_key, False
    if kind == "list_type":
        return loc, f"{path}: expected a list ('- item' lines), got {shown}", False, False
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        fields = _fields_of(loc)
        hint = f" with {', '.join(fields)}" if fields else ""
        return loc, f"{path}: expected a mapping{hint}, got {shown}", False, False
    if kind == "value_error":
        problem = str((err.get("ctx") or {}).get("error", err["msg"]))
        return loc, f"{path}: {scrub(problem, hide=secret, limit=_SHOWN_CHARS)}", False, False
    problem = scrub(err["msg"], hide=secret, limit=_SHOWN_CHARS)
    return loc, f"{path}: {problem[:1].lower()}{problem[1:]}", at_key, False


# --------------------------------------------------------------------------------------- the loader


def _fail(source: str, line: int, message: str, field: str = "") -> InvalidArgument:
    return located_error(source, line, message, reason=REASON, field=field)


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


def load_spec_text(text: str, source_name: str = "<spec>") -> VmSpec:
    """Parse and validate a spec document; ``source_name`` is used in error messages."""
    return _load(text, source_name)


def _load(content: str | bytes, source_name: str) -> VmSpec:
    # size, UTF-8, aliases, depth, duplicate keys and tags: one safe YAML reader for specs and configs
    data, root = load_yaml_safely(
        content, source_name, max_bytes=MAX_SPEC_BYTES, reason=REASON, secret_paths=SECRET_PATHS
    )
    if data is None:
        raise _fail(source_name, 1, "the file is empty: a VM spec starts with 'version: 1' and 'name: ...'")
    if not isinstance(data, Mapping):
        raise _fail(
            source_name,
            line_of(root, ()),
            # a whole document that is not a mapping may be a token file given by mistake: never quote it
            f"expected a mapping of fields (version, name, ...), got {_describe(data, secret=True)}",
        )
    if "vm" in data and "name" not in data:
        raise _fail(
            source_name,
            line_of(root, ("vm",), at_key=True),
            "this looks like a CloneBox project file (.clonebox.yaml with a 'vm:' section), not a fleet "
            f"VM spec: write 'version: {SPEC_VERSION}', 'name:', 'vcpus:', 'memory:' at the top level",
        )
    if "version" not in data:
        raise _fail(source_name, line_of(root, ()), f"version: required but missing: add 'version: {SPEC_VERSION}'")
    version = data["version"]
    if isinstance(version, bool) or version != SPEC_VERSION:
        raise _fail(
            source_name,
            line_of(root, ("version",)),
            f"version: {_describe(version)} is not supported: this clonebox reads version {SPEC_VERSION}",
            "version",
        )
    try:
        doc = _SpecV1.model_validate(data)
    except ValidationError as exc:
        found = []
        for err in exc.errors():
            loc, message, at_key, parent = _pydantic_problem(err, root)
            found.append((line_of(root, loc, at_key=at_key, parent=parent), message, _path_text(loc, root)))
        found.sort(key=lambda item: item[0])  # report the first problem as the file reads
        line, message, field = found[0]
        more = f" (and {len(found) - 1} more problem{'s' if len(found) > 2 else ''})" if len(found) > 1 else ""
        raise _fail(source_name, line, message + more, field) from None
    try:
        spec = _to_model(doc)
        return validate_spec(spec, prefix="spec")
    except _ProblemError as problem:
        raise _fail(
            source_name,
            line_of(root, problem.loc, at_key=problem.at_key),
            f"{_path_text(problem.loc)}: {problem.message}",
            _path_text(problem.loc),
        ) from None
    except InvalidArgument as exc:
        field = exc.metadata.get("field", "")
        message = exc.message
        if field and message.startswith(f"{field}: "):
            message = message[len(field) + 2 :]
        loc = _field_to_loc(field) if field else ()
        path = _path_text(loc)
        # validate_spec quotes whole values ('../etc/shadow'): keep them short, and none from cloud_init
        message = scrub(message, hide=_is_secret(loc), limit=_SHOWN_CHARS)
        raise _fail(source_name, line_of(root, loc), f"{path}: {message}", path) from None


def load_spec_file(path: str | Path) -> VmSpec:
    """Read and validate the spec file at ``path``."""
    source = str(path)
    try:
        with Path(path).open("rb") as f:
            raw = f.read(MAX_SPEC_BYTES + 1)  # one byte more than allowed is enough to refuse it
    except FileNotFoundError:
        raise InvalidArgument(
            f"{source}: no such file: give the path of a VM spec (see examples/)",
            reason=REASON,
            metadata={"file": source},
        ) from None
    except IsADirectoryError:
        raise InvalidArgument(
            f"{source}: is a directory, not a spec file", reason=REASON, metadata={"file": source}
        ) from None
    except OSError as exc:
        raise InvalidArgument(
            f"{source}: cannot read: {exc.strerror}", reason=REASON, metadata={"file": source}
        ) from None
    return _load(raw, source)


# ---------------------------------------------------------------------------------------- the writer


class _Dumper(yaml.SafeDumper):
    """Writes multi-line strings (cloud-init documents) as readable ``|`` blocks."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def dump_spec(spec: VmSpec) -> str:
    """Write ``spec`` as a spec file (version 1); ``load_spec_text(dump_spec(s)) == s`` for a valid ``s``."""
    doc: dict[str, Any] = {
        "version": SPEC_VERSION,
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
    else:
        doc["network"] = {"mode": "libvirt", "libvirt_network": spec.network.libvirt_network}
    if spec.shared_folders:
        doc["shared_folders"] = [
            {"host_path": f.host_path, "tag": f.tag, "read_only": f.read_only} for f in spec.shared_folders
        ]
    if spec.cloud_init is not None:
        ci = spec.cloud_init
        doc["cloud_init"] = {
            key: text
            for key, text in (
                ("user_data", ci.user_data.reveal()),  # writing the spec file back is a use of the value
                ("meta_data", ci.meta_data),
                ("network_config", ci.network_config),
            )
            if text
        }
    if spec.labels:
        doc["labels"] = dict(spec.labels)
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True)
