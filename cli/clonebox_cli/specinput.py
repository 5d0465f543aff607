"""
From a spec file to what a create request carries.

Reading: a version 1 or 2 fleet spec, or a CloneBox v1 project file (``.clonebox.yaml``), migrated in
memory with a deprecation warning (``clonebox config migrate`` writes the same migration to a file).

Resolving, on the requester's machine: ``auth.ssh_keys`` become public key lines (files, inline keys,
``github:USER`` / ``gitlab:USER`` fetched and cached); ``auth.password`` (a secret reference) is read
through its provider and turned into a SHA-512-crypt hash at once; a one-time password is generated
here and shown once. A request carries public keys, a hash and the names of the references it used,
never a password: nothing downstream (controller database, agent journal, logs, spans, audit records,
domain XML) can leak what it never received.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from clonebox_core.errors import InvalidArgument
from clonebox_core.model import AuthMethod, VmSpec
from clonebox_core.secret import Secret

if TYPE_CHECKING:
    from clonebox_core.secrets.sshkeys import KeyFetcher

#: CLI settings for key downloads (``CLONEBOX_GITHUB_URL`` / ``CLONEBOX_GITLAB_URL``; tests and private
#: GitLab instances point them elsewhere)
GITHUB_URL_ENV = "CLONEBOX_GITHUB_URL"
GITLAB_URL_ENV = "CLONEBOX_GITLAB_URL"
KEYS_TIMEOUT_ENV = "CLONEBOX_SSH_KEYS_TIMEOUT"


@dataclass(frozen=True)
class LoadedSpec:
    """A spec as read from a file, with what the reader had to say about it."""

    spec: VmSpec
    base_dir: Path | None
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class PreparedSpec:
    """A spec ready to send: resolved keys and hash; ``one_time_password`` to show once, if any."""

    spec: VmSpec
    one_time_password: Secret | None = None
    warnings: tuple[str, ...] = field(default=())


def _read(path: str) -> tuple[bytes, str, Path | None]:
    if path == "-":
        return sys.stdin.buffer.read(), "<stdin>", None
    from clonebox_core.spec import MAX_SPEC_BYTES  # pydantic models cost ~0.15 s: load on use

    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_SPEC_BYTES + 1)
    except FileNotFoundError:
        raise InvalidArgument(
            f"{path}: no such file: give the path of a VM spec (see examples/)", reason="SPEC_INVALID"
        ) from None
    except IsADirectoryError:
        raise InvalidArgument(f"{path}: is a directory, not a spec file", reason="SPEC_INVALID") from None
    except OSError as exc:
        raise InvalidArgument(f"{path}: cannot read: {exc.strerror}", reason="SPEC_INVALID") from None
    return raw, path, Path(path).resolve().parent


def load_for_create(
    path: str, *, image: str | None = None, drop: frozenset[str] = frozenset(), allow_v1: bool = True
) -> LoadedSpec:
    """
    The spec in ``path`` ('-': stdin), validated; a CloneBox v1 file is migrated in memory.

    ``image`` and ``drop`` apply to v1 files only (what cannot be honoured otherwise: see
    ``clonebox_core.v1import``); given for a fleet spec they are an error rather than silently ignored.
    """
    from clonebox_core import v1import
    from clonebox_core.spec import MAX_SPEC_BYTES, REASON, load_spec_text
    from clonebox_core.yamlsafe import YamlDocument, load_yaml_safely

    raw, source, base_dir = _read(path)
    doc = load_yaml_safely(
        raw, source, max_bytes=MAX_SPEC_BYTES, reason=REASON, secret_paths=(("cloud_init",), ("vm",))
    )
    if allow_v1 and v1import.is_v1_document(doc.data):
        # shared folders are on the agent's host: every path is kept here and the agent that gets the
        # VM checks them against its shared_roots (all offenders in one error, nothing created); a
        # --drop of a folder group drops the whole group
        groups = _FOLDER_GROUPS & drop
        data = {k: v for k, v in doc.data.items() if k not in groups}
        warnings = tuple(
            f"{source}: {g}: dropped (--drop {g}): no host folder from it is shared" for g in sorted(groups)
        )
        migration = v1import.migrate_v1(
            YamlDocument(data, doc.root), source, mode="create", image=image, drop=drop - groups, shared_roots=("/",)
        )
        text = v1import.dump_v2_yaml(migration.document)
        spec = load_spec_text(text, f"{source} (migrated from CloneBox v1)")
        # the migration's own warnings end with the deprecation notice
        return LoadedSpec(spec, base_dir, (*warnings, *migration.warnings))
    if image is not None or drop:
        raise InvalidArgument(
            f"{source}: --image and --drop apply to CloneBox v1 files only; edit the spec instead",
            reason="INVALID_FLAG",
        )
    return LoadedSpec(load_spec_text(raw.decode("utf-8", errors="replace"), source), base_dir)


#: v1 keys whose host folders are all dropped by ``--drop KEY``
_FOLDER_GROUPS = frozenset({"paths", "app_data_paths"})


def key_fetcher(environ: Mapping[str, str] | None = None) -> KeyFetcher:
    """The GitHub/GitLab key fetcher, configured from ``environ`` (default: this process's)."""
    env = os.environ if environ is None else environ
    from clonebox_core.secrets.sshkeys import GITHUB_BASE_URL, GITLAB_BASE_URL, KeyFetcher

    timeout = 5.0
    if env.get(KEYS_TIMEOUT_ENV):
        try:
            timeout = float(env[KEYS_TIMEOUT_ENV])
        except ValueError:
            raise InvalidArgument(f"{KEYS_TIMEOUT_ENV}: not a number of seconds", reason="INVALID_FLAG") from None
    return KeyFetcher(
        github_base_url=env.get(GITHUB_URL_ENV) or GITHUB_BASE_URL,
        gitlab_base_url=env.get(GITLAB_URL_ENV) or GITLAB_BASE_URL,
        timeout=timeout,
    )


def prepare(loaded: LoadedSpec, *, environ: Mapping[str, str] | None = None) -> PreparedSpec:
    """Resolve ``loaded.spec``'s key sources and password reference on this machine (see the module doc)."""
    spec = loaded.spec
    if spec.auth is None:
        return PreparedSpec(spec, None, loaded.warnings)
    from clonebox_core.secrets.passwords import one_time_password, sha512_crypt
    from clonebox_core.secrets.providers import SecretRef, default_resolver
    from clonebox_core.secrets.sshkeys import resolve_ssh_keys

    env = os.environ if environ is None else environ
    auth = spec.auth
    warnings = list(loaded.warnings)
    keys: tuple[str, ...] = ()
    if auth.ssh_keys:
        resolved = resolve_ssh_keys(
            auth.ssh_keys, fetcher=key_fetcher(env), base_dir=loaded.base_dir, field="auth.ssh_keys"
        )
        keys = resolved.keys
        warnings.extend(resolved.warnings)
    password_hash = Secret("")
    refs: tuple[str, ...] = ()
    otp: Secret | None = None
    if auth.method in (AuthMethod.PASSWORD, AuthMethod.BOTH):
        resolver = default_resolver(env, base_dir=loaded.base_dir)
        ref = SecretRef.parse(auth.password, field="auth.password")
        password_hash = Secret(sha512_crypt(resolver.resolve(ref, field="auth.password")))
        refs = (str(ref),)
    elif auth.method is AuthMethod.ONE_TIME_PASSWORD:
        otp = one_time_password()
        password_hash = Secret(sha512_crypt(otp))
    resolved_auth = dataclasses.replace(auth, ssh_authorized_keys=keys, password_hash=password_hash, secret_refs=refs)
    return PreparedSpec(dataclasses.replace(spec, auth=resolved_auth), otp, tuple(warnings))
