"""
cloud-init NoCloud seed ISO, built in memory with pycdlib (no genisoimage, no temp files).

cloud-init finds the seed by its volume id ``cidata`` and reads ``user-data``, ``meta-data`` and
optionally ``network-config``. ISO 9660 alone would upper-case and shorten those names, so the image
carries Rock Ridge and Joliet names too; Linux mounts it with either.
"""

from __future__ import annotations

import io

import pycdlib

from clonebox_core.cloudinit import render_user_data
from clonebox_core.model import CloudInit, VmSpec

VOLUME_ID = "cidata"

# (ISO 9660 level-1 name, Rock Ridge / Joliet name)
_FILES = (
    ("/USERDATA.;1", "user-data"),
    ("/METADATA.;1", "meta-data"),
    ("/NETWORKC.;1", "network-config"),
)


def default_meta_data(instance_id: str, hostname: str) -> str:
    """meta-data used when the spec gives none. Both values are DNS-label-safe, so no YAML quoting."""
    return f"instance-id: {instance_id}\nlocal-hostname: {hostname}\n"


def seed_cloud_init(spec: VmSpec, *, ssh_public_key: str = "") -> CloudInit:
    """
    The NoCloud inputs of ``spec``'s seed.

    As given for a version-1 spec; for version 2 the user-data is rendered from ``auth`` and
    ``provision`` (``ssh_public_key``: the per-VM generated key, if any).
    """
    given = spec.cloud_init or CloudInit()
    if spec.auth is None:
        return given
    return CloudInit(
        render_user_data(spec, generated_key=ssh_public_key),
        given.meta_data,
        given.network_config,
        given.detach_seed_after_boot,
    )


def seed_files(cloud_init: CloudInit, *, instance_id: str, hostname: str) -> dict[str, bytes]:
    """Return the files of the seed, by their NoCloud names."""
    files = {
        # the one place the agent needs the value: the bytes of the seed the guest reads
        "user-data": cloud_init.user_data.reveal().encode(),
        "meta-data": (cloud_init.meta_data or default_meta_data(instance_id, hostname)).encode(),
    }
    if cloud_init.network_config:
        files["network-config"] = cloud_init.network_config.encode()
    return files


def build_seed_iso(cloud_init: CloudInit, *, instance_id: str, hostname: str) -> bytes:
    """Build the ISO image bytes of a NoCloud seed for ``cloud_init``."""
    files = seed_files(cloud_init, instance_id=instance_id, hostname=hostname)
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, vol_ident=VOLUME_ID, joliet=3, rock_ridge="1.09")
    try:
        for iso_name, name in _FILES:
            data = files.get(name)
            if data is None:
                continue
            iso.add_fp(io.BytesIO(data), len(data), iso_name, rr_name=name, joliet_path=f"/{name}")
        out = io.BytesIO()
        iso.write_fp(out)
        return out.getvalue()
    finally:
        iso.close()


def read_seed_iso(data: bytes) -> dict[str, bytes]:
    """Files of a seed ISO by their Rock Ridge names, plus ``volume_id`` (for checks and debugging)."""
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(data))
    try:
        out: dict[str, bytes] = {"volume_id": iso.pvd.volume_identifier.rstrip(b" ")}
        for _iso_name, name in _FILES:
            buf = io.BytesIO()
            try:
                iso.get_file_from_iso_fp(buf, rr_path=f"/{name}")
            except pycdlib.pycdlibexception.PyCdlibInvalidInput:
                continue
            out[name] = buf.getvalue()
        return out
    finally:
        iso.close()
