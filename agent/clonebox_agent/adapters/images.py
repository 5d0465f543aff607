"""
Checking a VmSpec against the host: image containment, files that must exist, image formats.

Base images, kernels and initrds come from the operator's ``image_dirs`` only: a path is resolved
(symlinks and ``..`` included) and must land inside one of them, so a caller cannot make QEMU read
``/etc/shadow`` through a backing file or a "kernel". Relative paths are looked up in each image dir in
order, so specs can say ``base_image: debian-12.qcow2``.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from clonebox_core.errors import FailedPrecondition, InvalidArgument, invalid_field
from clonebox_core.model import VmSpec
from clonebox_core.validate import validate_spec

_QCOW2_MAGIC = b"QFI\xfb"


@dataclass(frozen=True)
class ResolvedSpec:
    """A validated spec with every host path resolved (None where the spec has none)."""

    spec: VmSpec
    #: resolved base image per disk (same order as ``spec.disks``)
    base_images: tuple[str | None, ...]
    kernel: str | None
    initrd: str | None
    #: resolved host path per shared folder
    shared_folders: tuple[str, ...]


@dataclass(frozen=True)
class ImageInfo:
    """Format and virtual size of an image file."""

    format: str
    virtual_size: int


def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def resolve_image(field: str, path: str, image_dirs: Sequence[str]) -> str:
    """
    Resolve ``path`` inside one of ``image_dirs`` or raise InvalidArgument naming ``field``.

    IMAGE_OUTSIDE_IMAGE_DIRS when the real path (after symlinks and '..') is outside every image dir,
    FailedPrecondition IMAGE_NOT_FOUND when it is inside but is not an existing regular file.
    """
    roots = [os.path.realpath(d) for d in image_dirs]
    if not roots:
        raise invalid_field(field, "no image_dirs are configured on this host", reason="IMAGE_OUTSIDE_IMAGE_DIRS")
    outside = _outside_error(field, path, roots)
    if os.path.isabs(path):
        real = os.path.realpath(path)
        if not any(_inside(real, r) for r in roots):
            raise outside
        if os.path.isfile(real):
            return real
    else:
        escaped = False
        for root in roots:
            candidate = os.path.join(root, path)
            if not os.path.lexists(candidate):
                continue
            real = os.path.realpath(candidate)
            if not _inside(real, root) and not any(_inside(real, r) for r in roots):
                escaped = True  # e.g. a symlink in the image dir pointing elsewhere
            elif os.path.isfile(real):
                return real
        if escaped or not any(_inside(os.path.realpath(os.path.join(r, path)), r) for r in roots):
            raise outside
    # the spec may be right and this host not ready for it (the image is copied later): a precondition
    raise FailedPrecondition(
        f"{field}: {path!r} does not exist or is not a regular file in this host's image_dirs",
        reason="IMAGE_NOT_FOUND",
        metadata={"field": field},
    )


def _outside_error(field: str, path: str, roots: Sequence[str]) -> InvalidArgument:
    return invalid_field(
        field,
        f"{path!r} resolves outside the image dirs {', '.join(roots)}",
        reason="IMAGE_OUTSIDE_IMAGE_DIRS",
    )


def resolve_spec(spec: VmSpec, image_dirs: Sequence[str], shared_roots: Sequence[str] | None = None) -> ResolvedSpec:
    """
    Validate ``spec`` (core rules, then host files) and resolve its paths.

    ``shared_roots`` (None: no restriction): every shared folder must resolve, symlinks followed, to
    a folder inside one of them; all that do not are named in one error.
    """
    validate_spec(spec)
    bases: list[str | None] = []
    for i, disk in enumerate(spec.disks):
        bases.append(
            resolve_image(f"spec.disks[{i}].base_image", disk.base_image, image_dirs) if disk.base_image else None
        )
    kernel = initrd = None
    if spec.kernel_boot is not None:
        kernel = resolve_image("spec.kernel_boot.kernel", spec.kernel_boot.kernel, image_dirs)
        if spec.kernel_boot.initrd:
            initrd = resolve_image("spec.kernel_boot.initrd", spec.kernel_boot.initrd, image_dirs)
    shared: list[str] = []
    for i, sf in enumerate(spec.shared_folders):
        real = os.path.realpath(sf.host_path)
        if not os.path.isdir(real):
            raise invalid_field(
                f"spec.shared_folders[{i}].host_path",
                f"{sf.host_path!r} is not an existing folder",
                reason="SHARED_FOLDER_NOT_FOUND",
            )
        shared.append(real)
    if shared_roots is not None:
        outside = [
            f"shared_folders[{i}].host_path {sf.host_path!r}"
            for i, (sf, real) in enumerate(zip(spec.shared_folders, shared, strict=True))
            if not any(
                os.path.commonpath([real, os.path.realpath(root)]) == os.path.realpath(root) for root in shared_roots
            )
        ]
        if outside:
            roots = ", ".join(shared_roots) if shared_roots else "none configured"
            raise InvalidArgument(
                f"not under this agent's shared_roots ({roots}): {'; '.join(outside)}; "
                "share folders inside a shared root (agent config shared_roots) or drop them",
                reason="SHARED_FOLDER_NOT_ALLOWED",
                metadata={"field": "spec.shared_folders"},
            )
    return ResolvedSpec(spec, tuple(bases), kernel, initrd, tuple(shared))


def image_info(path: str) -> ImageInfo:
    """
    Format and virtual size of ``path``: ``qemu-img info`` when installed, else the file header.

    Blocking (runs a process): call it off the event loop. ``-U`` reads images that running VMs hold
    locked, which base images shared by many overlays always are.
    """
    qemu_img = shutil.which("qemu-img")
    if qemu_img is not None:
        out = subprocess.run(
            [qemu_img, "info", "-U", "--output=json", path],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if out.returncode == 0:
            data = json.loads(out.stdout)
            return ImageInfo(str(data["format"]), int(data["virtual-size"]))
    return sniff_image(path)


def sniff_image(path: str) -> ImageInfo:
    """Tell qcow2 (by its magic; virtual size from the header) from raw (size of the file)."""
    with open(path, "rb") as f:
        header = f.read(32)
        if header[:4] == _QCOW2_MAGIC and len(header) >= 32:
            (size,) = struct.unpack(">Q", header[24:32])
            return ImageInfo("qcow2", size)
        f.seek(0, os.SEEK_END)
        return ImageInfo("raw", f.tell())
