"""Daemon configuration: a YAML file validated by pydantic, then environment overrides.

``CLONEBOX_AGENT_LISTEN=127.0.0.1:7101`` overrides ``listen`` of the agent; nested keys use ``__``
(``CLONEBOX_AGENT_RESERVE__MEMORY_MIB``). Errors name the key and the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from clonebox_core.errors import InvalidArgument

T = TypeVar("T", bound=BaseModel)


def _set_path(data: dict[str, Any], path: list[str], value: str) -> None:
    node = data
    for key in path[:-1]:
        node = node.setdefault(key, {})
    # YAML parsing of the value gives ints, bools and lists their natural types
    node[path[-1]] = yaml.safe_load(value) if value != "" else ""


def load_config(model: type[T], path: str | Path | None, env_prefix: str) -> T:
    """Load ``model`` from ``path`` (optional) and environment variables starting with ``env_prefix``."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise InvalidArgument(f"config file {path} does not exist", reason="CONFIG_NOT_FOUND") from None
        except yaml.YAMLError as exc:
            raise InvalidArgument(f"config file {path}: not valid YAML: {exc}", reason="CONFIG_INVALID") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise InvalidArgument(f"config file {path}: must be a mapping", reason="CONFIG_INVALID")
        data = loaded or {}
    for key, value in os.environ.items():
        if key.startswith(env_prefix):
            _set_path(data, key[len(env_prefix) :].lower().split("__"), value)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise InvalidArgument(
            f"config ({source}): {field}: {first['msg']}", reason="CONFIG_INVALID", metadata={"field": field}
        ) from None
