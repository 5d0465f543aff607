"""Daemon configuration: a YAML file validated by pydantic, then environment overrides.

``CLONEBOX_AGENT_LISTEN=127.0.0.1:7101`` overrides ``listen`` of the agent; nested keys use ``__``
(``CLONEBOX_AGENT_RESERVE__MEMORY_MIB``). Errors name the key and where it came from (``FILE:LINE`` or
the environment variable), never its value: a config may hold a database password.

The file is read with ``clonebox_core.yamlsafe`` (at most ``MAX_CONFIG_BYTES``, few aliases, no deep
nesting, no duplicate keys, plain YAML types only).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from yaml.nodes import Node

from clonebox_core.errors import InvalidArgument
from clonebox_core.yamlsafe import line_of, load_yaml_safely, located_error, scrub

__all__ = ["MAX_CONFIG_BYTES", "REASON", "load_config"]

T = TypeVar("T", bound=BaseModel)

#: a daemon config is a page of settings
MAX_CONFIG_BYTES = 1024 * 1024
#: an environment value is one setting
_MAX_ENV_BYTES = 64 * 1024
#: reason of every config problem except the YAML limits (``YAML_TOO_LARGE`` ...)
REASON = "CONFIG_INVALID"


def _env_value(value: str) -> object:
    """YAML gives ints, bools and lists their natural types; anything that is not clean YAML stays a string."""
    if value == "":
        return ""
    try:
        return load_yaml_safely(value, "env", max_bytes=_MAX_ENV_BYTES, max_aliases=0, max_depth=8).data
    except InvalidArgument:  # '*secret', 'a: b: c': the operator meant the text itself
        return value


def _set_path(data: dict[str, Any], path: list[str], value: str) -> None:
    node = data
    for key in path[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):  # the environment wins over a scalar in the file
            child = node[key] = {}
        node = child
    node[path[-1]] = _env_value(value)


def _read(path: str | Path) -> bytes:
    source = str(path)
    try:
        with Path(path).open("rb") as f:
            return f.read(MAX_CONFIG_BYTES + 1)  # one byte more than allowed is enough to refuse it
    except FileNotFoundError:
        raise InvalidArgument(
            f"config file {source} does not exist", reason="CONFIG_NOT_FOUND", metadata={"file": source}
        ) from None
    except IsADirectoryError:
        raise InvalidArgument(
            f"config file {source} is a directory, not a file", reason=REASON, metadata={"file": source}
        ) from None
    except OSError as exc:
        raise InvalidArgument(
            f"config file {source}: cannot read: {exc.strerror}", reason=REASON, metadata={"file": source}
        ) from None


def load_config(model: type[T], path: str | Path | None, env_prefix: str) -> T:
    """Load ``model`` from ``path`` (optional) and environment variables starting with ``env_prefix``."""
    data: dict[str, Any] = {}
    source = "defaults"
    root: Node | None = None
    if path is not None:
        source = str(path)
        loaded, root = load_yaml_safely(_read(path), source, max_bytes=MAX_CONFIG_BYTES, reason=REASON)
        if loaded is not None and not isinstance(loaded, dict):
            raise located_error(
                source, line_of(root, ()), "must be a mapping of settings (key: value lines)", reason=REASON
            )
        data = loaded or {}
    from_env: dict[tuple[str, ...], str] = {}
    for key, value in os.environ.items():
        if key.startswith(env_prefix):
            parts = key[len(env_prefix) :].lower().split("__")
            _set_path(data, parts, value)
            from_env[tuple(parts)] = key
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        raw_loc = tuple(first["loc"])
        loc = tuple(str(p) for p in raw_loc)
        field = ".".join(loc)
        # pydantic's messages do not quote the input; a custom validator's might: keep tokens short
        message = f"{field}: {scrub(first['msg'])}"
        env_key = next((k for p, k in from_env.items() if loc[: len(p)] == p), None)
        if env_key is not None:
            text = f"config (environment {env_key}): {message}"
        elif root is not None:
            missing = first["type"] == "missing"
            line = line_of(root, raw_loc, at_key=first["type"] == "extra_forbidden", parent=missing)
            text = f"{source}:{line}: {message}"
        else:
            text = f"config ({source}): {message}"
        raise InvalidArgument(text, reason=REASON, metadata={"field": field, "file": source}) from None
