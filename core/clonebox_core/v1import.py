"""
Import of CloneBox v1 project files (``.clonebox.yaml``): a v1 file in, a v2 VM spec document out.

A v1 file, as CloneBox v1 wrote it::

    version: '1'                   # optional ('1' or 1); ``generated:`` (a timestamp) is ignored
    vm:
      name: clone-clonebox         # must be a DNS label in v2 (no renaming: the error suggests one)
      ram_mb: 4096                 # -> memory: 4096MiB
      vcpus: 4                     # -> vcpus: 4
      disk_size_gb: 20             # -> disks[0].size: 20GiB
      gui: true                    # v2 has no graphical console: cannot be honoured (--drop gui)
      base_image: /home/tom/ubuntu-22.04-cloud.qcow2   # -> its file name only (or --image NAME)
      network_mode: auto           # auto | default -> the libvirt network 'default'; user -> --drop
      username: ubuntu             # -> auth.user
      password: ubuntu             # never copied: a secret reference, or nothing (see below)
    packages: [...]                # -> provision.packages (also snap_packages, services, post_commands)
    paths: {HOST: GUEST}           # -> shared_folders (host folder on the agent's host, guest mount)
    app_data_paths: {HOST: GUEST}  # -> shared_folders as well

Where a v1 key is missing, v1's own default applies (vcpus 4, ram_mb 4096, disk_size_gb 10, username
``ubuntu``); a missing password means no password (v1's default password is not carried over). The
``detected:`` section that v1's generator adds (what it found on the source machine) is ignored with a
warning. Anything else is an unknown key.

:func:`migrate_v1` works in two modes:

- ``"file"`` (``clonebox config migrate OLD -o NEW``): a v1 password becomes ``auth.method: both`` and
  ``auth.password: file:~/.config/clonebox/secrets/NAME.password`` (a ``${VAR}`` password, as newer v1
  generators wrote it, becomes ``env:VAR``); the user puts the password there (``Migration.password_hint``).
- ``"create"`` (``clonebox vm create -f OLD``, migrated in memory): the password is dropped and the VM
  gets a generated per-VM SSH key (``auth.method: ssh_key``); a warning says so and that the v1 format is
  deprecated.

The literal password is never copied into the document, the YAML text, a warning or an error: the YAML is
read with ``vm`` as a secret subtree of :func:`~clonebox_core.yamlsafe.load_yaml_safely` (so a syntax
error there quotes nothing, even under a misspelt ``passwd:`` key), and no message built here quotes a
value of ``vm.password``.

Problems come in two kinds, each reported all at once in a single ``InvalidArgument``:

- ``V1_INVALID``: the file is wrong (unknown keys, wrong types, 0 vCPUs, a name that is not a DNS label,
  a relative or duplicated guest path). Fix the file.
- ``V1_NOT_HONOURED``: the file is fine for v1 but asks for what CloneBox fleet cannot do: ``gui: true``,
  ``network_mode: user``, host folders outside the agent's shared roots, a base image that is not an image
  file name. The message lists every item with its key and line and the flag that drops it
  (``--drop gui|network_mode|paths|app_data_paths``, ``--image NAME``); with the flag, each dropped item
  becomes a warning instead.

Shared folders name folders on the **agent's host**, not on the machine running the CLI. With
``shared_roots`` (the folders the agent allows sharing), a host path is honoured only when it is one of
them or lies below one, compared after :func:`posixpath.normpath` (so ``/home/tom/../etc`` is ``/etc``).
That check is lexical: symlinks cannot be resolved here (the path is on another machine), so the agent
must resolve the real path and check it against its roots again when it attaches the share. Without
``shared_roots``, ``"file"`` mode keeps every folder (with a warning to check them on the agent's host)
and ``"create"`` mode honours none (the VM may be placed on any host).
"""

from __future__ import annotations

import difflib
import posixpath
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, NamedTuple

import yaml

from clonebox_core.errors import InvalidArgument
from clonebox_core.names import is_dns_label
from clonebox_core.yamlsafe import YamlDocument, line_of, load_yaml_safely, located_error, token

__all__ = [
    "DROP_KEYS",
    "MAX_V1_BYTES",
    "REASON_INVALID",
    "REASON_NOT_HONOURED",
    "SECRET_PATHS",
    "Migration",
    "dump_v2_yaml",
    "is_v1_document",
    "migrate_v1",
]

#: reason of every error about the v1 file itself (syntax, unknown keys, bad values)
REASON_INVALID: Final = "V1_INVALID"
#: reason of the one error listing what the v1 file asks for and CloneBox fleet cannot do
REASON_NOT_HONOURED: Final = "V1_NOT_HONOURED"
#: a v1 file is a few KiB; anything near this is not one
MAX_V1_BYTES: Final = 1024 * 1024
#: nothing under ``vm`` is ever quoted by a YAML error (the password, or a password under a misspelt key)
SECRET_PATHS: Final[tuple[tuple[str, ...], ...]] = (("vm",), ("password",))
#: what ``--drop`` accepts
DROP_KEYS: Final = ("gui", "network_mode", "paths", "app_data_paths")
#: the v2 spec format this module writes
V2_VERSION: Final = 2
#: the label every migrated spec carries
MIGRATED_LABEL: Final = ("clonebox.migrated-from", "v1")
#: where ``clonebox config migrate`` tells the user to put the password (NAME is the VM name)
PASSWORD_FILE: Final = "~/.config/clonebox/secrets/{name}.password"

_TOP_KEYS: Final = (
    "version",
    "generated",
    "vm",
    "packages",
    "snap_packages",
    "services",
    "post_commands",
    "paths",
    "app_data_paths",
    "detected",
)
_VM_KEYS: Final = (
    "name",
    "ram_mb",
    "vcpus",
    "disk_size_gb",
    "gui",
    "base_image",
    "network_mode",
    "username",
    "password",
)
_LISTS: Final = ("packages", "snap_packages", "services", "post_commands")
# v1's defaults (clonebox.models.VMSettings) for keys a v1 file may leave out
_V1_DEFAULTS: Final[dict[str, int]] = {"vcpus": 4, "ram_mb": 4096, "disk_size_gb": 10}
_V1_DEFAULT_USER: Final = "ubuntu"
_HONOURED_NETWORK_MODES: Final = ("auto", "default")
_IMAGE_NAME: Final = re.compile(r"[^/\x00-\x1f\x7f]+\.(qcow2|img|raw)", re.IGNORECASE)
_USER: Final = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
_ENV_REF: Final = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")
# YAML also breaks lines at NEL and the Unicode line/paragraph separators
_HEADER_UNSAFE: Final = re.compile("[\x00-\x1f\x7f\x85\u2028\u2029]")
_TAG_MAX: Final = 31
_SHOWN: Final = 80

Loc = tuple[str | int, ...]


@dataclass(frozen=True)
class Migration:
    """What :func:`migrate_v1` made of a v1 file."""

    #: the v2 spec document (plain dicts, lists, strings, ints and bools, in the v2 key order)
    document: dict[str, Any]
    #: one line each: every setting dropped or changed on the way, for the user to read
    warnings: tuple[str, ...]
    #: whether the v1 file held a password (it was not copied: see ``password_hint``)
    password_found: bool
    #: where to put the password, when the document refers to one (``auth.password``); else ""
    password_hint: str


class _Problem(NamedTuple):
    line: int | None
    field: str
    text: str


class _Item(NamedTuple):
    """One v1 setting that cannot be honoured."""

    line: int | None
    field: str
    #: the ``--drop`` key that drops it; None for the base image (``--image NAME`` replaces it)
    drop: str | None
    why: str
    #: the warning when it is dropped
    dropped: str


class _Share(NamedTuple):
    group: str  # paths | app_data_paths
    host_key: str  # as written (for line numbers)
    host: str  # normalised
    guest: str  # normalised
    line: int | None


class _Ctx:
    """Source name, node tree and the problems found so far."""

    def __init__(self, source: str, root: yaml.Node | None) -> None:
        self.source = source
        self.root = root
        self.problems: list[_Problem] = []

    def line(self, loc: Loc, *, at_key: bool = False) -> int | None:
        return line_of(self.root, loc, at_key=at_key) if self.root is not None else None

    def at(self, line: int | None) -> str:
        return f"{self.source}:{line}" if line is not None else self.source

    def missing_line(self, loc: Loc) -> int | None:
        """The line of the key that should hold the missing ``loc`` (the top of the file for a top key)."""
        return self.line(loc[:-1], at_key=True) if len(loc) > 1 else self.line(())

    def problem(self, loc: Loc, text: str, *, at_key: bool = False, missing: bool = False) -> None:
        line = self.missing_line(loc) if missing else self.line(loc, at_key=at_key)
        self.problems.append(_Problem(line, _field(loc), text))


# ---------------------------------------------------------------------------------------------- helpers


def _field(loc: Loc) -> str:
    """``vm.name``, ``packages[2]``, ``paths['/home/tom']``."""
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif i and loc[0] in ("paths", "app_data_paths"):
            out += f"[{token(part, limit=_SHOWN)}]"
        else:
            out += f".{part}" if out else part
    return out or "(top level)"


def _describe(value: object) -> str:
    """A short description of a YAML value for a message (never used for ``vm.password``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return token(value, limit=40)
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list):
        return "a list"
    if isinstance(value, Mapping):
        return "a mapping"
    return f"a {type(value).__name__}"


def _kind(value: object) -> str:
    """Only the kind of a value (for values that may be a secret)."""
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool | int | float) or value is None:
        return "a scalar"
    return _describe(value)


def _normpath(path: str) -> str:
    """Lexically normalised absolute path (POSIX keeps a leading '//': CloneBox does not)."""
    norm = posixpath.normpath(path)
    return "/" + norm.lstrip("/") if norm.startswith("/") else norm


def _under(path: str, root: str) -> bool:
    return root in ("/", path) or path.startswith(root + "/")


def _suggest_name(name: str) -> str:
    """A DNS label close to ``name`` ('My_VM' -> 'my-vm'), or "" when nothing is left."""
    label = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return label[:63].rstrip("-")


def _tag_for(guest: str, used: set[str]) -> str:
    """A 9p tag from the guest path's last part: [a-z0-9-], at most 31 characters, unique (-2, -3, ...)."""
    base = re.sub(r"[^a-z0-9]+", "-", posixpath.basename(guest).lower()).strip("-") or "share"
    base = base[:_TAG_MAX].rstrip("-")
    tag, n = base, 2
    while tag in used:
        suffix = f"-{n}"
        tag = base[: _TAG_MAX - len(suffix)].rstrip("-") + suffix
        n += 1
    used.add(tag)
    return tag


def _unknown_keys(ctx: _Ctx, mapping: Mapping[Any, Any], known: Sequence[str], prefix: Loc) -> None:
    for key in mapping:
        if isinstance(key, str) and key in known:
            continue
        name = str(key)
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(known)}"
        loc = (*prefix, name)
        shown = name if re.fullmatch(r"[A-Za-z0-9_.-]{1,40}", name) else token(name)
        prefix_text = "".join(f"{p}." for p in prefix)
        ctx.problems.append(_Problem(ctx.line(loc, at_key=True), f"{prefix_text}{shown}", f"unknown key ({hint})"))


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _raise_problems(ctx: _Ctx) -> None:
    problems = sorted(ctx.problems, key=lambda p: p.line or 0)
    if not problems:
        return
    first = problems[0]
    fields = ",".join(dict.fromkeys(p.field for p in problems))
    if len(problems) == 1 and first.line is not None:
        raise located_error(ctx.source, first.line, f"{first.field}: {first.text}", reason=REASON_INVALID, field=fields)
    listed = "; ".join((f"line {p.line}: " if p.line is not None else "") + f"{p.field}: {p.text}" for p in problems)
    meta = {"file": ctx.source, "field": fields}
    if first.line is not None:
        meta["line"] = str(first.line)
    head = f"{len(problems)} problems in this CloneBox v1 file: " if len(problems) > 1 else ""
    raise InvalidArgument(
        " ".join(f"{ctx.source}: {head}{listed}".split()),
        reason=REASON_INVALID,
        metadata=meta,
    )


# ------------------------------------------------------------------------------------------- reading


def _load(data_or_text: str | bytes | YamlDocument | Mapping[str, Any], source: str) -> tuple[Any, yaml.Node | None]:
    if isinstance(data_or_text, YamlDocument):
        return data_or_text.data, data_or_text.root
    if isinstance(data_or_text, str | bytes):
        doc = load_yaml_safely(
            data_or_text, source, max_bytes=MAX_V1_BYTES, reason=REASON_INVALID, secret_paths=SECRET_PATHS
        )
        return doc.data, doc.root
    return data_or_text, None


def _positive_int(ctx: _Ctx, vm: Mapping[str, Any], key: str) -> int:
    if key not in vm:
        return _V1_DEFAULTS[key]
    value = vm[key]
    if isinstance(value, bool) or not isinstance(value, int):
        ctx.problem(("vm", key), f"expected a whole number, got {_describe(value)}")
        return 0
    if value < 1:
        ctx.problem(("vm", key), f"{value} is not allowed: use a whole number of at least 1")
        return 0
    return value


def _string_list(ctx: _Ctx, data: Mapping[str, Any], key: str) -> list[str]:
    value = data.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        ctx.problem((key,), f"expected a list ('- item' lines), got {_describe(value)}")
        return []
    out: list[str] = []
    for i, item in enumerate(value):
        if not isinstance(item, str):
            ctx.problem((key, i), f"expected a string, got {_describe(item)}")
        elif not item.strip() or "\x00" in item or (key != "post_commands" and _CONTROL.search(item)):
            ctx.problem((key, i), "must be a non-empty line without control characters")
        else:
            out.append(item)
    return out


def _shares(ctx: _Ctx, data: Mapping[str, Any], group: str) -> list[_Share]:
    value = data.get(group)
    if value is None:
        return []
    if not isinstance(value, Mapping):
        ctx.problem((group,), f"expected a mapping of host path: guest path, got {_describe(value)}")
        return []
    out: list[_Share] = []
    for host, guest in value.items():
        key = str(host)
        loc = (group, key)
        if not isinstance(host, str) or not host.startswith("/") or _CONTROL.search(host):
            ctx.problem(loc, "the host path must be an absolute path without control characters", at_key=True)
            continue
        if not isinstance(guest, str) or not guest.startswith("/"):
            ctx.problem(loc, f"the guest path must be an absolute path, got {_describe(guest)}")
            continue
        mount = _normpath(guest)
        if mount == "/" or re.search(r"[\x00-\x20\x7f]", mount):
            ctx.problem(loc, f"guest path {token(guest, limit=_SHOWN)}: use a folder other than '/', without spaces")
            continue
        out.append(_Share(group, key, _normpath(host), mount, ctx.line(loc, at_key=True)))
    return out


def _check_mounts(ctx: _Ctx, shares: Iterable[_Share]) -> None:
    seen: dict[str, _Share] = {}
    for share in shares:
        other = seen.get(share.guest)
        if other is not None:
            where = f"line {other.line}" if other.line is not None else "above"
            ctx.problems.append(
                _Problem(
                    share.line,
                    _field((share.group, share.host_key)),
                    f"guest path {token(share.guest, limit=_SHOWN)} is already the mount point of "
                    f"{_field((other.group, other.host_key))} ({where}): mount each folder at its own path",
                )
            )
        else:
            seen[share.guest] = share


# ------------------------------------------------------------------------------------------ the API


def is_v1_document(data: object) -> bool:
    """True for a CloneBox v1 project file: a mapping with a ``vm:`` mapping and no top-level ``name``."""
    return isinstance(data, Mapping) and isinstance(data.get("vm"), Mapping) and "name" not in data


def _check_arguments(
    mode: str, image: str | None, drop: Iterable[str], shared_roots: Sequence[str] | None
) -> tuple[frozenset[str], tuple[str, ...] | None]:
    if mode not in ("file", "create"):
        raise InvalidArgument(
            f"mode {mode!r}: use 'file' or 'create'", reason=REASON_INVALID, metadata={"field": "mode"}
        )
    drops = frozenset(drop)
    unknown = sorted(drops - set(DROP_KEYS))
    if unknown:
        raise InvalidArgument(
            f"--drop {', '.join(token(d) for d in unknown)}: unknown; use one or more of {', '.join(DROP_KEYS)}",
            reason=REASON_INVALID,
            metadata={"field": "drop"},
        )
    if image is not None:
        parts = image.split("/")
        if not image or image.startswith("/") or ".." in parts or _CONTROL.search(image):
            raise InvalidArgument(
                f"--image {token(image, limit=_SHOWN)}: give an image name inside the agent's image folders "
                "(a relative path without '..', e.g. ubuntu-22.04-cloud.qcow2)",
                reason=REASON_INVALID,
                metadata={"field": "image"},
            )
    roots: tuple[str, ...] | None = None
    if shared_roots is not None:
        bad = [r for r in shared_roots if not isinstance(r, str) or not r.startswith("/") or _CONTROL.search(r)]
        if bad:
            raise InvalidArgument(
                f"shared roots must be absolute paths: {', '.join(token(str(r), limit=_SHOWN) for r in bad)}",
                reason=REASON_INVALID,
                metadata={"field": "shared_roots"},
            )
        roots = tuple(dict.fromkeys(_normpath(r) for r in shared_roots))
    return drops, roots


def migrate_v1(
    data_or_text: str | bytes | YamlDocument | Mapping[str, Any],
    source_name: str,
    *,
    mode: Literal["file", "create"],
    image: str | None = None,
    drop: frozenset[str] = frozenset(),
    shared_roots: Sequence[str] | None = None,
) -> Migration:
    """
    Turn a CloneBox v1 project file into a v2 VM spec document.

    ``data_or_text`` is the file's text or bytes (read here with the safe YAML reader, so errors carry
    line numbers), a :class:`~clonebox_core.yamlsafe.YamlDocument` already read (lines too), or the plain
    mapping (no line numbers). ``source_name`` names the file in messages. ``mode``, ``image``, ``drop``
    and ``shared_roots`` are described in the module docstring. Raises ``InvalidArgument`` only:
    ``V1_INVALID`` for a wrong file or argument, ``V1_NOT_HONOURED`` listing every setting that needs a
    ``--drop`` or ``--image``.
    """
    drops, roots = _check_arguments(mode, image, drop, shared_roots)
    data, root = _load(data_or_text, source_name)
    ctx = _Ctx(source_name, root)
    if data is None:
        raise located_error(
            source_name, 1, "the file is empty: a CloneBox v1 file has a 'vm:' section", reason=REASON_INVALID
        )
    if not isinstance(data, Mapping):
        raise located_error(
            source_name,
            ctx.line(()) or 1,
            # a whole document that is not a mapping may be a password file given by mistake: never quote it
            f"expected a CloneBox v1 file (a mapping with a 'vm:' section), got {_kind(data)}",
            reason=REASON_INVALID,
        )
    if "version" in data:
        version = data["version"]
        if isinstance(version, bool) or version not in (1, "1"):
            shown = "a string" if isinstance(version, str) and len(version) > 40 else _describe(version)
            hint = ": it is a v2 spec already" if version == 2 else ""
            raise located_error(
                source_name,
                ctx.line(("version",)) or 1,
                f"version: {shown} is not a CloneBox v1 file version (this reads version '1'){hint}",
                reason=REASON_INVALID,
                field="version",
            )

    # -- what is wrong with the file (all problems in one error)
    _unknown_keys(ctx, data, _TOP_KEYS, ())
    vm_raw = data.get("vm")
    vm: Mapping[str, Any] = {}
    if vm_raw is None:
        ctx.problem(("vm",), "required but missing: add the 'vm:' section (name, ram_mb, vcpus, ...)", missing=True)
    elif not isinstance(vm_raw, Mapping):
        ctx.problem(("vm",), f"expected a mapping (name, ram_mb, vcpus, ...), got {_describe(vm_raw)}")
    else:
        vm = vm_raw
        _unknown_keys(ctx, vm, _VM_KEYS, ("vm",))

    name = vm.get("name")
    if vm_raw is not None and isinstance(vm_raw, Mapping):
        if "name" not in vm:
            ctx.problem(("vm", "name"), "required but missing: add 'name: ...' (a DNS label)", missing=True)
        elif not isinstance(name, str):
            ctx.problem(("vm", "name"), f"expected a string, got {_describe(name)}")
        elif not is_dns_label(name):
            suggestion = _suggest_name(name)
            better = f" (for example {suggestion!r})" if suggestion and is_dns_label(suggestion) else ""
            ctx.problem(
                ("vm", "name"),
                f"{_describe(name)} is not a DNS label, which a CloneBox fleet VM name must be: use 1-63 "
                f"lowercase letters, digits and '-', starting and ending with a letter or digit{better}",
            )
    vcpus = _positive_int(ctx, vm, "vcpus")
    ram_mb = _positive_int(ctx, vm, "ram_mb")
    disk_gb = _positive_int(ctx, vm, "disk_size_gb")

    gui = vm.get("gui", False)
    if not isinstance(gui, bool):
        ctx.problem(("vm", "gui"), f"expected true or false, got {_describe(gui)}")
        gui = False

    base_image = vm.get("base_image")
    if base_image is not None and not isinstance(base_image, str):
        ctx.problem(("vm", "base_image"), f"expected a path, got {_describe(base_image)}")
        base_image = None

    network_mode = vm.get("network_mode")
    if network_mode is not None and not isinstance(network_mode, str):
        ctx.problem(("vm", "network_mode"), f"expected auto, default or user, got {_describe(network_mode)}")
        network_mode = None

    user = vm.get("username", _V1_DEFAULT_USER)
    if not isinstance(user, str) or not _USER.fullmatch(user) or user == "root":
        ctx.problem(
            ("vm", "username"),
            f"{_describe(user)} is not a login user name: use [a-z_][a-z0-9_-]* (at most 32, not root)",
        )

    # the value of vm.password is never described, quoted or copied: only whether there is one
    password = vm.get("password")
    if isinstance(password, list | Mapping):
        ctx.problem(("vm", "password"), "expected a string (the value is not shown)")
        password = None
    password_found = password is not None and password != ""
    env_ref = _ENV_REF.fullmatch(password) if isinstance(password, str) else None

    lists = {key: _string_list(ctx, data, key) for key in _LISTS}
    shares = _shares(ctx, data, "paths") + _shares(ctx, data, "app_data_paths")
    _check_mounts(ctx, shares)
    _raise_problems(ctx)
    assert isinstance(name, str)

    # -- what the file asks for and CloneBox fleet cannot do (all in one error, unless dropped)
    items: list[_Item] = []
    if gui:
        items.append(
            _Item(
                ctx.line(("vm", "gui")),
                "vm.gui",
                "gui",
                "true: v2 VMs have no graphical (SPICE) console",
                "true dropped (--drop gui): the VM has no graphical console; reach it with ssh or the serial console",
            )
        )
    if network_mode is not None and network_mode not in _HONOURED_NETWORK_MODES:
        what = (
            "user-mode (slirp) networking is not available"
            if network_mode == "user"
            else "is not a v1 network mode that v2 can follow"
        )
        items.append(
            _Item(
                ctx.line(("vm", "network_mode")),
                "vm.network_mode",
                "network_mode",
                f"{_describe(network_mode)}: {what}; v2 VMs join a libvirt network",
                f"{_describe(network_mode)} dropped (--drop network_mode): the VM joins the libvirt network 'default'",
            )
        )
    unshared: set[int] = set()  # indexes into shares of the folders that cannot be honoured
    for index, share in enumerate(shares):
        if roots is not None and any(_under(share.host, r) for r in roots):
            continue
        if roots is None and mode == "file":
            continue
        why = "no shared folder roots are known" if roots is None else "outside the shared folder roots"
        unshared.add(index)
        normalised = f" (that is {token(share.host, limit=_SHOWN)})" if share.host != share.host_key else ""
        items.append(
            _Item(
                share.line,
                _field((share.group, share.host_key)),
                share.group,
                f"host folder{normalised}: {why}",
                f"-> {token(share.guest, limit=_SHOWN)} dropped (--drop {share.group}): not shared into the VM",
            )
        )
    image_name = posixpath.basename(base_image) if base_image else ""
    if image is None:
        if not base_image:
            items.append(
                _Item(
                    ctx.line(("vm", "base_image")) if "base_image" in vm else ctx.missing_line(("vm", "base_image")),
                    "vm.base_image",
                    None,
                    "missing: v2 needs the name of a base image in the agent's image folders",
                    "",
                )
            )
        elif not _IMAGE_NAME.fullmatch(image_name) or image_name.startswith("."):
            items.append(
                _Item(
                    ctx.line(("vm", "base_image")),
                    "vm.base_image",
                    None,
                    f"{_describe(base_image)} does not end in a disk image file name (.qcow2, .img or .raw)",
                    "",
                )
            )

    warnings: list[str] = []
    blocking: list[_Item] = []
    for item in items:
        if item.drop is not None and item.drop in drops:
            warnings.append(f"{ctx.at(item.line)}: {item.field}: {item.dropped}")
        else:
            blocking.append(item)
    if blocking:
        blocking.sort(key=lambda i: i.line or 0)
        flags = list(dict.fromkeys(f"--drop {i.drop}" if i.drop else "--image NAME" for i in blocking))
        listed = "; ".join(
            (f"line {i.line}: " if i.line is not None else "")
            + f"{i.field}: {i.why} ({f'--drop {i.drop}' if i.drop else '--image NAME names an image'})"
            for i in blocking
        )
        meta = {
            "file": source_name,
            "field": ",".join(dict.fromkeys(i.field.split("[")[0] for i in blocking)),
            "flags": " ".join(flags),
        }
        if blocking[0].line is not None:
            meta["line"] = str(blocking[0].line)
        note = ""
        if any(i.drop in ("paths", "app_data_paths") for i in blocking):
            note = " Shared folders are folders on the host of the agent that runs the VM, not on this machine: " + (
                "no shared folder roots of that host are known here."
                if roots is None
                else f"only folders under its shared folder roots ({', '.join(roots)}) can be shared."
            )
        raise InvalidArgument(
            " ".join(
                f"{source_name}: {_count(len(blocking), 'setting')} of this CloneBox v1 file cannot be honoured "
                f"by CloneBox fleet: {listed}.{note} Change the file, or drop them with: {' '.join(flags)}".split()
            ),
            reason=REASON_NOT_HONOURED,
            metadata=meta,
        )

    # -- the v2 document
    if image is not None:
        disk_image = image
        if base_image and image != image_name:
            warnings.append(
                f"{ctx.at(ctx.line(('vm', 'base_image')))}: vm.base_image: {_describe(base_image)} replaced by "
                f"--image {token(image, limit=_SHOWN)}"
            )
    else:
        disk_image = image_name
        assert base_image is not None
        if base_image != image_name:
            warnings.append(
                f"{ctx.at(ctx.line(('vm', 'base_image')))}: vm.base_image: only the file name "
                f"{token(image_name, limit=_SHOWN)} is kept: the agent looks it up in its image folders "
                f"(copy {token(base_image, limit=_SHOWN)} there)"
            )

    auth: dict[str, Any] = {"user": user}
    hint = ""
    pw_line = ctx.at(ctx.line(("vm", "password")))
    if password_found and mode == "file":
        if env_ref is not None:
            ref = f"env:{env_ref.group(1)}"
            hint = (
                f"set the environment variable {env_ref.group(1)} to the VM password where clonebox vm create "
                "runs (v1 read it from a .env file), or change auth.password to file:PATH / age:FILE / "
                "sops:FILE#KEY / vault:MOUNT/PATH#KEY"
            )
        else:
            path = PASSWORD_FILE.format(name=name)
            ref = f"file:{path}"
            hint = (
                f"write the VM password into {path} (mode 0600), or change auth.password to env:VAR / "
                "age:FILE / sops:FILE#KEY / vault:MOUNT/PATH#KEY"
            )
        auth.update(method="both", password=ref)
        warnings.append(
            f"{pw_line}: vm.password: not copied (a v2 spec holds only a secret reference): "
            f"auth.password is {ref}: {hint}"
        )
    else:
        auth["method"] = "ssh_key"
        if password_found:
            warnings.append(
                f"{pw_line}: vm.password: not used: the VM gets a generated per-VM SSH key (auth.method: "
                f"ssh_key); to keep password login, convert the file with 'clonebox config migrate "
                f"{source_name} -o NEW.yaml' and store the password as a secret"
            )
    if mode == "create":
        warnings.append(
            f"{source_name}: the CloneBox v1 file format is deprecated: convert it once with "
            f"'clonebox config migrate {source_name} -o NEW.yaml' and create VMs from the v2 file"
        )
    if "detected" in data:
        warnings.append(
            f"{ctx.at(ctx.line(('detected',), at_key=True))}: detected: ignored (what CloneBox v1 found on the "
            "source machine is not part of a VM spec)"
        )

    used: set[str] = set()
    folders = [
        {
            "host_path": s.host,
            "mount": s.guest,
            "tag": _tag_for(s.guest, used),
            "read_only": False,
            "driver": "9p",
        }
        for index, s in enumerate(shares)
        if index not in unshared  # not honoured and not raised above: dropped
    ]
    if folders and roots is None:
        warnings.append(
            f"{source_name}: shared_folders: {_count(len(folders), 'host folder')} kept as written: in v2 they are "
            "folders on the agent's host, not on this machine: check that they exist there"
        )

    document: dict[str, Any] = {
        "version": V2_VERSION,
        "name": name,
        "vcpus": vcpus,
        "memory": f"{ram_mb}MiB",
        "disks": [{"name": "root", "base_image": disk_image, "size": f"{disk_gb}GiB"}],
        "network": {"mode": "libvirt", "libvirt_network": "default"},
        "auth": auth,
        "provision": {key: lists[key] for key in _LISTS},
        "shared_folders": folders,
        "labels": {MIGRATED_LABEL[0]: MIGRATED_LABEL[1]},
    }
    return Migration(document, tuple(warnings), password_found, hint)


# ------------------------------------------------------------------------------------------ the writer


class _Dumper(yaml.SafeDumper):
    """Block style; multi-line strings (post_commands) as readable ``|`` blocks."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _represent_str)


def dump_v2_yaml(document: Mapping[str, Any], *, source_name: str | None = None) -> str:
    """
    ``document`` as v2 spec YAML: a header comment, then block style in the document's key order.

    ``source_name`` names the v1 file in the header (its line breaks and control characters become '?', so
    a file name cannot end the comment). ``yaml.safe_load(dump_v2_yaml(d)) == d``.
    """
    source = _HEADER_UNSAFE.sub("?", source_name) if source_name else ""
    auth = document.get("auth")
    review = "auth.password" if isinstance(auth, Mapping) and "password" in auth else "auth and shared_folders"
    header = f"# migrated from CloneBox v1 file {source or '(unnamed)'} by clonebox config migrate; review {review}\n"
    body = yaml.dump(
        dict(document), Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True, width=120
    )
    return header + body
