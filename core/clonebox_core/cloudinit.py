"""
The user-data the agent renders for a version-2 spec (``auth``, ``provision``, shared folder mounts).

What it writes is public material only: SSH public keys and a SHA-512-crypt hash (both arrive
resolved; see :class:`clonebox_core.model.Auth`). The rules:

- one login user (``auth.user``) with passwordless sudo, root login disabled;
- ``ssh_key``: keys installed, the account's password locked, ``ssh_pwauth: false``;
- ``password`` / ``both``: the hash set through ``chpasswd.users`` (``type: hash``), ``ssh_pwauth: true``;
- ``one_time_password``: the same, plus ``chpasswd.expire: true``: cloud-init runs ``passwd --expire``,
  so the first login must choose a new password;
- packages (``package_update`` when there are any), snaps (``snap.commands``), services enabled and
  started, then ``post_commands`` in order (``runcmd``); shared folders mounted through ``mounts``.

Extra cloud-config from ``cloud_init.user_data`` (a mapping) is merged in: lists are appended, new keys
added; it may not set passwords or password login (that is what ``auth`` is for), and it may not
replace a key CloneBox renders with a different value.
"""

from __future__ import annotations

from typing import Any

import yaml

from clonebox_core.errors import invalid_field
from clonebox_core.model import AuthMethod, ShareDriver, VmSpec
from clonebox_core.secret import Secret
from clonebox_core.validate import MAX_CLOUD_INIT_BYTES

__all__ = ["HEADER", "check_extra_user_data", "render_user_data"]

HEADER = "#cloud-config\n"
REASON = "USER_DATA_INVALID"
#: keys of extra user-data that would set a password or password login behind ``auth``'s back
_PASSWORD_KEYS = ("password", "chpasswd", "ssh_pwauth")
_USER_PASSWORD_KEYS = ("passwd", "hashed_passwd", "plain_text_passwd")


def _extra(spec: VmSpec, field: str) -> dict[str, Any]:
    """The extra cloud-config mapping of a version-2 spec ({} when none)."""
    if spec.cloud_init is None or not spec.cloud_init.user_data:
        return {}
    text = spec.cloud_init.user_data.reveal()
    if not text.startswith(HEADER.strip()):
        raise invalid_field(field, "must be #cloud-config (a mapping) in a version 2 spec", reason=REASON)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        # the text may hold credentials: say where, never what
        raise invalid_field(field, "is not valid YAML", reason=REASON) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise invalid_field(field, "must be a mapping of cloud-config keys", reason=REASON)
    return data


def check_extra_user_data(spec: VmSpec, prefix: str = "spec") -> None:
    """InvalidArgument when a version-2 spec's extra user-data sets passwords or is not cloud-config."""
    field = f"{prefix}.cloud_init.user_data"
    data = _extra(spec, field)
    for key in _PASSWORD_KEYS:
        if key in data:
            raise invalid_field(
                f"{field}.{key}",
                "passwords and password login are set by auth (method and a secret reference), not user-data",
                reason=REASON,
            )
    if "user" in data:
        # cloud-init's legacy single-user key: it can carry a password and replaces the default user
        raise invalid_field(
            f"{field}.user", "set the login user with auth.user (and its password with auth.password)", reason=REASON
        )
    users = data.get("users")
    if users is not None and not isinstance(users, list):
        raise invalid_field(f"{field}.users", "must be a list of users (the login user is auth.user)", reason=REASON)
    for i, user in enumerate(users or ()):
        found = [k for k in _USER_PASSWORD_KEYS if isinstance(user, dict) and k in user]
        if found:
            raise invalid_field(
                f"{field}.users[{i}].{found[0]}",
                "sets a password: use auth.password (a secret reference) instead",
                reason=REASON,
            )


def _mount_entry(tag: str, mount: str, driver: ShareDriver, read_only: bool) -> list[str]:
    mode = "ro" if read_only else "rw"
    if driver is ShareDriver.VIRTIOFS:
        return [tag, mount, "virtiofs", f"{mode},nofail", "0", "0"]
    # msize: 9p's default 8 KiB makes large reads crawl; nofail: a missing share must not stop boot
    return [tag, mount, "9p", f"trans=virtio,version=9p2000.L,msize=262144,{mode},nofail", "0", "0"]


def render_user_data(spec: VmSpec, *, generated_key: str = "", prefix: str = "spec") -> Secret:
    """
    The ``#cloud-config`` user-data for ``spec`` (which must have ``auth``).

    ``generated_key`` is the public half of the per-VM key pair the agent made when the spec names
    no key. The result is a :class:`Secret` (it holds the password hash), at most 1 MiB.
    """
    auth = spec.auth
    if auth is None:
        raise ValueError("render_user_data needs a spec with auth (version 2)")
    check_extra_user_data(spec, prefix)
    keys = list(auth.ssh_authorized_keys) or ([generated_key] if generated_key else [])
    user: dict[str, Any] = {
        "name": auth.user,
        "shell": "/bin/bash",
        "sudo": "ALL=(ALL) NOPASSWD:ALL",
        "lock_passwd": not auth.method.uses_password,
    }
    if auth.method.uses_keys and keys:
        user["ssh_authorized_keys"] = keys
    cfg: dict[str, Any] = {
        "users": [user],
        "disable_root": True,
        "ssh_pwauth": auth.method.uses_password,
    }
    if auth.method.uses_password:
        cfg["chpasswd"] = {
            "expire": auth.method is AuthMethod.ONE_TIME_PASSWORD,
            "users": [{"name": auth.user, "password": auth.password_hash.reveal(), "type": "hash"}],
        }
    prov = spec.provision
    runcmd: list[Any] = []
    if prov is not None:
        if prov.packages:
            cfg["package_update"] = True
            cfg["packages"] = list(prov.packages)
        if prov.snap_packages:
            cfg["snap"] = {"commands": [["snap", "install", name] for name in prov.snap_packages]}
        runcmd += [["systemctl", "enable", "--now", name] for name in prov.services]
        runcmd += list(prov.post_commands)
    mounts = [_mount_entry(f.tag, f.mount, f.driver, f.read_only) for f in spec.shared_folders if f.mount]
    if mounts:
        cfg["mounts"] = mounts
    if runcmd:
        cfg["runcmd"] = runcmd
    for key, value in _extra(spec, f"{prefix}.cloud_init.user_data").items():
        if key not in cfg:
            cfg[key] = value
        elif isinstance(cfg[key], list) and isinstance(value, list):
            cfg[key] = cfg[key] + value
        elif cfg[key] != value:
            raise invalid_field(
                f"{prefix}.cloud_init.user_data.{key}",
                "conflicts with what auth/provision/shared_folders render: set it there",
                reason=REASON,
            )
    text = HEADER + yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False, width=4096)
    if len(text.encode()) > MAX_CLOUD_INIT_BYTES:
        raise invalid_field(f"{prefix}.provision", "the rendered user-data is larger than 1 MiB", reason=REASON)
    return Secret(text)
