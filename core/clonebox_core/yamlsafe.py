"""
The one way CloneBox reads YAML: size, alias, depth and node limits, plain types only, no secrets in errors.

Both the VM spec loader (``clonebox_core.spec``) and the daemon config loader (``clonebox_core.config``)
read YAML through :func:`load_yaml_safely`. It returns the constructed value *and* the composed node tree,
so that callers can map a schema error back to the line the user has to edit.

Every limit is checked before the work it protects:

1. ``max_bytes``: before decoding or parsing anything (reason ``YAML_TOO_LARGE``);
2. UTF-8: bytes are decoded strictly, before parsing;
3. while events are composed into nodes, one event at a time: alias events are counted and the document is
   refused as soon as there are more than ``max_aliases`` (``YAML_TOO_MANY_ALIASES``), before anything is
   expanded or constructed; collections nested deeper than ``max_depth`` are refused
   (``YAML_TOO_DEEP``), and so are more than ``max_nodes`` nodes (``YAML_TOO_LARGE``), explicit tags
   outside the safe set (``!!python/...``, ``!custom``) and duplicate mapping keys;
4. after composing, before constructing: what the aliases *would* expand to is computed on the shared node
   graph, without expanding it. More than ``max_nodes`` nodes or an alias inside its own anchor is
   ``YAML_TOO_MANY_ALIASES``; a nesting deeper than ``max_depth`` is ``YAML_TOO_DEEP``. A "billion
   laughs" document with few aliases is refused here;
5. construction with PyYAML's ``SafeConstructor`` (str, int, float, bool, null, timestamp, binary, list,
   mapping, set, omap, pairs).

Every problem is an ``InvalidArgument`` whose message is one line, ``SOURCE:LINE: what and the fix``, with
``metadata`` ``{"file": SOURCE, "line": LINE}``. Limits carry their ``YAML_*`` reason; every other problem
(syntax, duplicate keys, tags, bad values) carries the caller's ``reason``. Messages never echo the
document beyond a short, truncated token (an alias name, a key), and nothing at all from inside the
``secret_paths`` subtrees (cloud-init user data may hold passwords and tokens): there, tokens are replaced
by ``<hidden>``; field names directly under a secret path (``cloud_init.user_data``) are still shown.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from typing import Any, Final, NamedTuple

import yaml
from yaml.events import AliasEvent, CollectionStartEvent, MappingEndEvent, ScalarEvent, SequenceEndEvent
from yaml.nodes import CollectionNode, MappingNode, Node, ScalarNode, SequenceNode

from clonebox_core.errors import InvalidArgument

__all__ = [
    "DEFAULT_MAX_ALIASES",
    "DEFAULT_MAX_DEPTH",
    "DEFAULT_MAX_NODES",
    "HIDDEN",
    "INVALID",
    "TOO_DEEP",
    "TOO_LARGE",
    "TOO_MANY_ALIASES",
    "Loc",
    "YamlDocument",
    "find_node",
    "line_of",
    "load_yaml_safely",
    "located_error",
    "node_line",
    "scrub",
    "token",
]

#: the document is larger than ``max_bytes``, or has more than ``max_nodes`` nodes before any alias
TOO_LARGE: Final = "YAML_TOO_LARGE"
#: more than ``max_aliases`` alias events, or aliases that would expand to more than ``max_nodes`` nodes
TOO_MANY_ALIASES: Final = "YAML_TOO_MANY_ALIASES"
#: collections nested deeper than ``max_depth`` (counting what aliases expand to)
TOO_DEEP: Final = "YAML_TOO_DEEP"
#: default reason for every other problem (callers usually pass their own, e.g. ``SPEC_INVALID``)
INVALID: Final = "YAML_INVALID"

#: a real spec or config has no alias or a handful
DEFAULT_MAX_ALIASES: Final = 100
#: nested lists and mappings; a cloud-config document rarely goes past 6
DEFAULT_MAX_DEPTH: Final = 64
#: nodes (every scalar, list and mapping; keys count), also after expanding aliases
DEFAULT_MAX_NODES: Final = 100_000

#: what a token from a secret subtree is shown as
HIDDEN: Final = "<hidden>"
#: characters of a document token (key, alias name, value) that a message may quote
TOKEN_CHARS: Final = 24

Loc = tuple[str | int, ...]

# explicit tags the SafeConstructor builds; anything else (python/..., local !tags) is refused
_SAFE_TAGS: Final = frozenset(tag for tag in yaml.SafeLoader.yaml_constructors if tag is not None)
_STD_PREFIX: Final = "tag:yaml.org,2002:"
# a quoted token in a message (Python reprs, as PyYAML and our own messages write them)
_QUOTED: Final = re.compile(r"'(?:[^'\\\n]|\\.)*'|\"(?:[^\"\\\n]|\\.)*\"")
# a quoted token this short is a character or two of syntax (':', '\t', '\x00'), never a secret
_SHORT_QUOTED: Final = 6


class YamlDocument(NamedTuple):
    """A loaded document: the constructed value and the composed node tree it came from."""

    #: plain Python data (dict, list, str, int, float, bool, None, datetime, bytes, set); None when empty
    data: Any
    #: the node tree for line numbers (aliases are shared nodes); None for an empty stream
    root: Node | None


# -------------------------------------------------------------------------------------------- helpers


def token(text: str, *, hide: bool = False, limit: int = TOKEN_CHARS) -> str:
    """Quote a piece of the document for a message: truncated to ``limit`` characters, or hidden."""
    if hide:
        return HIDDEN
    return repr(text if len(text) <= limit else text[: max(1, limit - 3)] + "...")


def scrub(message: str, *, hide: bool = False, limit: int = TOKEN_CHARS) -> str:
    """
    Make ``message`` one line and shorten every quoted token in it to ``limit`` characters.

    With ``hide``, every quoted token longer than a character or two of syntax becomes ``<hidden>``.
    """

    def one(match: re.Match[str]) -> str:
        quoted = match.group(0)
        if len(quoted) <= _SHORT_QUOTED:
            return quoted
        if hide:
            return HIDDEN
        if len(quoted) - 2 <= limit:
            return quoted
        return quoted[: max(2, limit - 2)] + "..." + quoted[0]

    return " ".join(_QUOTED.sub(one, message).split())


def located_error(source: str, line: int, message: str, *, reason: str = INVALID, field: str = "") -> InvalidArgument:
    """``SOURCE:LINE: message`` as one line, with ``file``, ``line`` (and ``field``) metadata."""
    text = " ".join(f"{source}:{line}: {message}".split())
    meta = {"file": source, "line": str(line)}
    if field:
        meta["field"] = field
    return InvalidArgument(text, reason=reason, metadata=meta)


def node_line(node: Node) -> int:
    """1-based line where ``node`` starts."""
    return int(node.start_mark.line) + 1


def find_node(root: Node, loc: Sequence[str | int]) -> tuple[Node, Node | None, int]:
    """Walk ``loc`` down the node tree: (deepest node reached, its key node if any, parts matched)."""
    node: Node = root
    key_node: Node | None = None
    matched = 0
    for part in loc:
        if isinstance(node, MappingNode):
            found: tuple[Node, Node] | None = None
            for k, v in node.value:
                if isinstance(k, ScalarNode) and k.value == str(part):
                    found = (k, v)  # the last one wins, as in the constructed mapping
            if found is None:
                break
            key_node, node = found
        elif isinstance(node, SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            key_node, node = None, node.value[part]
        else:
            break
        matched += 1
    return node, key_node, matched


def line_of(root: Node | None, loc: Sequence[str | int], *, at_key: bool = False, parent: bool = False) -> int:
    """Return the line to blame for ``loc``: the key for unknown fields, the parent for missing ones, else the value."""
    if root is None:
        return 1
    if parent:
        loc = loc[:-1]
    node, key_node, matched = find_node(root, loc)
    if at_key and key_node is not None and matched == len(loc):
        return node_line(key_node)
    return node_line(node)


def _size_text(n: int) -> str:
    if n >= 1024 * 1024 and n % (1024 * 1024) == 0:
        return f"{n // (1024 * 1024)} MiB"
    if n >= 1024 and n % 1024 == 0:
        return f"{n // 1024} KiB"
    return f"{n} bytes"


def _tag_text(tag: str) -> str:
    return "!!" + tag[len(_STD_PREFIX) :] if tag.startswith(_STD_PREFIX) else tag


class _KeySlot:
    """Marks, in the composer's path, a mapping key being composed (not yet known)."""

    def __repr__(self) -> str:
        return "<key>"


_KEY: Final = _KeySlot()
_PathPart = str | int | _KeySlot


# ------------------------------------------------------------------------------------------ the loader


class _Loader(yaml.SafeLoader):
    """SafeLoader that counts and limits while composing, and remembers where it is for error messages."""

    def __init__(
        self,
        text: str,
        source: str,
        *,
        reason: str,
        max_aliases: int,
        max_depth: int,
        max_nodes: int,
        secret_paths: Collection[Loc],
    ) -> None:
        super().__init__(text)
        self.source = source
        self.reason = reason
        self.max_aliases = max_aliases
        self.max_depth = max_depth
        self.max_nodes = max_nodes
        self.secret_paths = tuple(tuple(p) for p in secret_paths)
        self.aliases = 0
        self.nodes = 0
        self.depth = 0
        #: where the composer is; not unwound on errors, so that it still tells where an error happened
        self.path: list[_PathPart] = []
        #: ids of nodes composed inside a secret subtree
        self.hidden_ids: set[int] = set()
        #: the innermost node whose construction failed
        self.failed: Node | None = None

    # -- where are we

    def hidden_here(self) -> bool:
        """Whether the composer is inside a secret subtree (keys directly under a secret path are not)."""
        path = self.path
        for secret in self.secret_paths:
            n = len(secret)
            if len(path) >= n and tuple(path[:n]) == secret:
                if len(path) == n + 1 and path[-1] is _KEY:
                    continue  # a field name of the secret mapping
                return True
        return False

    def error(self, reason: str, mark: Any, message: str) -> InvalidArgument:
        line = int(mark.line) + 1 if mark is not None else 1
        return located_error(self.source, line, message, reason=reason)

    # -- composing, with limits (the stubs leave PyYAML's event methods untyped)

    def _peek(self) -> Any:
        return self.peek_event()  # type: ignore[no-untyped-call]

    def _next(self) -> Any:
        return self.get_event()  # type: ignore[no-untyped-call]

    def _resolve(self, kind: type[Node], implicit: Any) -> str:
        return str(self.resolve(kind, None, implicit))  # type: ignore[no-untyped-call]

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        event = self._peek()
        if isinstance(event, AliasEvent):
            self.aliases += 1
            if self.aliases > self.max_aliases:
                raise self.error(
                    TOO_MANY_ALIASES,
                    event.start_mark,
                    f"too many YAML aliases (more than {self.max_aliases} '*name' references): "
                    "write the values out instead",
                )
            return super().compose_node(parent, index)
        self.nodes += 1
        if self.nodes > self.max_nodes:
            raise self.error(
                TOO_LARGE, event.start_mark, f"too many YAML nodes (more than {self.max_nodes}): make the file smaller"
            )
        hidden = self.hidden_here()
        tag = event.tag if isinstance(event, ScalarEvent | CollectionStartEvent) else None
        if tag is not None and tag != "!" and tag not in _SAFE_TAGS:
            raise self.error(
                self.reason,
                event.start_mark,
                f"tag {token(_tag_text(tag), hide=hidden)} is not allowed: only plain YAML values "
                "(strings, numbers, booleans, lists, mappings); remove the tag or quote the value",
            )
        collection = isinstance(event, CollectionStartEvent)
        if collection:
            self.depth += 1
            if self.depth > self.max_depth:
                raise self.error(
                    TOO_DEEP,
                    event.start_mark,
                    f"YAML nested too deeply (more than {self.max_depth} levels of lists and mappings)",
                )
        node = super().compose_node(parent, index)
        if collection:
            self.depth -= 1
        if hidden and node is not None:
            self.hidden_ids.add(id(node))
        return node

    def compose_sequence_node(self, anchor: Any) -> SequenceNode:
        start = self._next()
        tag = start.tag
        if tag is None or tag == "!":
            tag = self._resolve(SequenceNode, start.implicit)
        node = SequenceNode(tag, [], start.start_mark, None, flow_style=start.flow_style)
        if anchor is not None:
            self.anchors[anchor] = node
        index = 0
        while not self.check_event(SequenceEndEvent):
            self.path.append(index)
            node.value.append(self.compose_node(node, index))
            self.path.pop()
            index += 1
        node.end_mark = self._next().end_mark
        return node

    def compose_mapping_node(self, anchor: Any) -> MappingNode:
        start = self._next()
        tag = start.tag
        if tag is None or tag == "!":
            tag = self._resolve(MappingNode, start.implicit)
        node = MappingNode(tag, [], start.start_mark, None, flow_style=start.flow_style)
        if anchor is not None:
            self.anchors[anchor] = node
        seen: dict[str, int] = {}
        while not self.check_event(MappingEndEvent):
            self.path.append(_KEY)
            key_hidden = self.hidden_here()
            key = self.compose_node(node, None)
            if isinstance(key, ScalarNode):
                if key.value in seen and key.value != "<<":  # YAML would keep the last one silently
                    raise self.error(
                        self.reason,
                        key.start_mark,
                        f"duplicate key {token(key.value, hide=key_hidden)} "
                        f"(first at line {seen[key.value]}): keep one",
                    )
                seen[key.value] = node_line(key)
                self.path[-1] = key.value
            else:
                self.path[-1] = "?"
            value = self.compose_node(node, key)
            self.path.pop()
            node.value.append((key, value))
        node.end_mark = self._next().end_mark
        return node

    # -- constructing, remembering what failed

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except Exception:
            if self.failed is None:
                self.failed = node
            raise


def _children(node: Node) -> list[Node]:
    if isinstance(node, MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, SequenceNode):
        return list(node.value)
    return []


def _check_expansion(loader: _Loader, root: Node) -> None:
    """
    Refuse what the aliases would expand to, computed on the shared node graph without expanding it.

    Each distinct node is visited once (sizes and depths are memoised), so this costs no more than the
    document itself, however many nodes the aliases stand for.
    """
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    visiting: set[int] = set()
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        kids = _children(node)
        if finished:
            visiting.discard(key)
            total = 1 + sum(size[id(k)] for k in kids)
            levels = 1 + max((depth[id(k)] for k in kids), default=0) if isinstance(node, CollectionNode) else 0
            if total > loader.max_nodes:
                raise loader.error(
                    TOO_MANY_ALIASES,
                    node.start_mark,
                    f"too many YAML nodes after expanding aliases (more than {loader.max_nodes}): "
                    "use fewer '*name' references",
                )
            if levels > loader.max_depth:
                raise loader.error(
                    TOO_DEEP,
                    node.start_mark,
                    f"YAML nested too deeply after expanding aliases (more than {loader.max_depth} levels)",
                )
            size[key], depth[key] = total, levels
            continue
        if key in size:
            continue
        if key in visiting:  # reached again below itself: an alias inside its own anchor
            raise loader.error(
                TOO_MANY_ALIASES,
                node.start_mark,
                "too many YAML nodes: an alias refers to the node that contains it (endless expansion)",
            )
        visiting.add(key)
        stack.append((node, True))
        stack.extend((k, False) for k in kids)


def _yaml_problem(exc: yaml.MarkedYAMLError) -> str:
    problem, context = exc.problem or "", exc.context or ""
    if context and problem:
        return f"{context}, {problem}" if problem.startswith("but ") else f"{context}: {problem}"
    return problem or context or "syntax error"


def _syntax_error(loader: _Loader, exc: yaml.MarkedYAMLError, *, hide: bool) -> InvalidArgument:
    mark = exc.problem_mark or exc.context_mark
    problem = _yaml_problem(exc)
    hint = "indent with spaces, not tabs" if "\\t" in problem or "\t" in problem else "check indentation and quoting"
    col = f" (column {int(mark.column) + 1})" if mark is not None else ""
    return loader.error(loader.reason, mark, f"not valid YAML: {scrub(problem, hide=hide)}{col}: {hint}")


def _value_error(loader: _Loader, root: Node, exc: Exception) -> InvalidArgument:
    node = loader.failed or root
    hide = id(node) in loader.hidden_ids
    if isinstance(exc, ValueError) and node.tag == _STD_PREFIX + "timestamp":
        detail = scrub(str(exc), hide=hide)  # 'month must be in 1..12' says what to fix
    else:  # int() and float() quote the whole value (Python cuts it at 200 characters, unquoted)
        detail = f"not a valid {_tag_text(node.tag).lstrip('!')}"
    return loader.error(loader.reason, node.start_mark, f"not valid YAML: {detail}: put the value in quotes")


# -------------------------------------------------------------------------------------------- the API


def load_yaml_safely(
    content: str | bytes,
    source: str,
    *,
    max_bytes: int,
    max_aliases: int = DEFAULT_MAX_ALIASES,
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_nodes: int = DEFAULT_MAX_NODES,
    reason: str = INVALID,
    secret_paths: Collection[Loc] = (),
) -> YamlDocument:
    """
    Parse one YAML document from ``content`` (bytes must be UTF-8) within the given limits.

    ``source`` names the document in messages (a file name, ``<stdin>``). ``reason`` is the reason of
    every error that is not a limit (syntax, duplicate key, tag, bad value). ``secret_paths`` are
    locations (``("cloud_init",)``) whose values must never appear in a message. Raises
    ``InvalidArgument`` and nothing else. An empty stream gives ``YamlDocument(None, None)``.
    """
    if isinstance(content, bytes) or len(content) * 4 <= max_bytes:
        size = len(content)
    else:
        size = len(content.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise located_error(
            source, 1, f"file is larger than {_size_text(max_bytes)}: make it smaller", reason=TOO_LARGE
        )
    if isinstance(content, bytes):
        try:
            text = content.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = content[: exc.start].count(b"\n") + 1
            raise located_error(source, line, "not UTF-8 text: save the file as UTF-8", reason=reason) from None
    else:
        text = content
    try:
        loader = _Loader(
            text,
            source,
            reason=reason,
            max_aliases=max_aliases,
            max_depth=max_depth,
            max_nodes=max_nodes,
            secret_paths=secret_paths,
        )
    except yaml.reader.ReaderError as exc:  # the reader checks every character up front
        line = text[: max(0, exc.position)].count("\n") + 1
        raise located_error(
            source,
            line,
            f"not valid YAML: special character U+{int(exc.character):04X} is not allowed: remove it",
            reason=reason,
        ) from None
    constructing = False
    root: Node | None = None
    try:
        root = loader.get_single_node()
        if root is None:
            return YamlDocument(None, None)
        if loader.aliases:
            _check_expansion(loader, root)  # without aliases the composer's own counts are exact
        constructing = True
        return YamlDocument(loader.construct_document(root), root)
    except InvalidArgument:
        raise
    except yaml.MarkedYAMLError as exc:
        # while composing, the loader's path says where we are; constructor errors quote no values
        raise _syntax_error(loader, exc, hide=constructing or loader.hidden_here()) from None
    except RecursionError:  # pragma: no cover - depth limits come first
        raise loader.error(TOO_DEEP, None, "YAML nested too deeply") from None
    except Exception as exc:  # a scalar that does not fit its tag (2001-13-01, !!int x)
        if root is None or not constructing:  # pragma: no cover - composing raises only YAML errors
            raise loader.error(reason, None, "not valid YAML") from None
        raise _value_error(loader, root, exc) from None
    finally:
        loader.dispose()
