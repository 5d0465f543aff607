"""Image-dir containment: symlinks, '..', prefixes, relative lookup; image format detection."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from clonebox_agent.adapters.images import image_info, resolve_image, resolve_spec, sniff_image
from clonebox_core.errors import FailedPrecondition, InvalidArgument
from clonebox_core.model import DiskSpec, KernelBoot, SharedFolder, VmSpec


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[str, str, str]:
    a = tmp_path / "images"
    b = tmp_path / "more-images"
    out = tmp_path / "outside"
    for d in (a, b, out):
        d.mkdir()
    (a / "base.qcow2").write_bytes(b"x")
    (b / "other.raw").write_bytes(b"y")
    (out / "secret").write_bytes(b"z")
    (a / "escape").symlink_to(out / "secret")
    (a / "alias").symlink_to(a / "base.qcow2")
    (a / "sub").mkdir()
    # a sibling folder whose name starts with the image dir's name
    evil = tmp_path / "images-evil"
    evil.mkdir()
    (evil / "x").write_bytes(b"e")
    return str(a), str(b), str(tmp_path)


def _reason(field: str, path: str, roots: list[str]) -> str:
    # a path outside the image dirs is a bad spec; a missing image is this host's precondition
    with pytest.raises((InvalidArgument, FailedPrecondition)) as err:
        resolve_image(field, path, roots)
    expected = FailedPrecondition if err.value.reason == "IMAGE_NOT_FOUND" else InvalidArgument
    assert isinstance(err.value, expected)
    assert err.value.metadata["field"] == field
    return err.value.reason


def test_inside_paths_resolve(dirs: tuple[str, str, str]) -> None:
    a, b, _ = dirs
    assert resolve_image("f", os.path.join(a, "base.qcow2"), [a, b]) == os.path.join(a, "base.qcow2")
    assert resolve_image("f", "other.raw", [a, b]) == os.path.join(b, "other.raw")  # relative: each dir in turn
    assert resolve_image("f", "alias", [a]) == os.path.join(a, "base.qcow2")  # symlink staying inside


def test_escapes_are_refused(dirs: tuple[str, str, str]) -> None:
    a, b, tmp = dirs
    assert _reason("spec.disks[0].base_image", os.path.join(a, "escape"), [a, b]) == "IMAGE_OUTSIDE_IMAGE_DIRS"
    assert _reason("spec.disks[0].base_image", "escape", [a, b]) == "IMAGE_OUTSIDE_IMAGE_DIRS"
    assert _reason("f", os.path.join(a, "..", "outside", "secret"), [a]) == "IMAGE_OUTSIDE_IMAGE_DIRS"
    assert _reason("f", "../outside/secret", [a]) == "IMAGE_OUTSIDE_IMAGE_DIRS"
    assert _reason("f", os.path.join(tmp, "images-evil", "x"), [a]) == "IMAGE_OUTSIDE_IMAGE_DIRS"
    assert _reason("f", "/etc/passwd", [a]) == "IMAGE_OUTSIDE_IMAGE_DIRS"
    assert _reason("f", os.path.join(a, "base.qcow2"), []) == "IMAGE_OUTSIDE_IMAGE_DIRS"


def test_missing_or_not_a_file(dirs: tuple[str, str, str]) -> None:
    a, b, _ = dirs
    assert _reason("f", os.path.join(a, "nope.qcow2"), [a]) == "IMAGE_NOT_FOUND"
    assert _reason("f", "nope.qcow2", [a, b]) == "IMAGE_NOT_FOUND"
    assert _reason("f", os.path.join(a, "sub"), [a]) == "IMAGE_NOT_FOUND"


def test_resolve_spec_names_the_field(dirs: tuple[str, str, str], tmp_path: Path) -> None:
    a, _, _ = dirs
    ok = VmSpec(
        name="vm",
        disks=(DiskSpec("root", base_image="base.qcow2"), DiskSpec("data", size_mib=8)),
        shared_folders=(SharedFolder(str(tmp_path), "t"),),
    )
    resolved = resolve_spec(ok, [a])
    assert resolved.base_images == (os.path.join(a, "base.qcow2"), None)
    assert resolved.shared_folders == (str(tmp_path),)
    with pytest.raises(InvalidArgument) as err:
        resolve_spec(VmSpec(name="vm", kernel_boot=KernelBoot(kernel="escape")), [a])
    assert err.value.metadata["field"] == "spec.kernel_boot.kernel"
    with pytest.raises(InvalidArgument) as err:
        resolve_spec(
            VmSpec(
                name="vm", disks=(DiskSpec("d", size_mib=1),), shared_folders=(SharedFolder("/nonexistent-dir", "t"),)
            ),
            [a],
        )
    assert (err.value.reason, err.value.metadata["field"]) == (
        "SHARED_FOLDER_NOT_FOUND",
        "spec.shared_folders[0].host_path",
    )


def test_image_format_detection(tmp_path: Path) -> None:
    raw = tmp_path / "a.raw"
    raw.write_bytes(b"\0" * 4096)
    assert (sniff_image(str(raw)).format, sniff_image(str(raw)).virtual_size) == ("raw", 4096)
    qcow = tmp_path / "a.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow), "10M"], check=True)
    assert (sniff_image(str(qcow)).format, sniff_image(str(qcow)).virtual_size) == ("qcow2", 10 * 1024 * 1024)
    assert image_info(str(qcow)).format == "qcow2"
    assert image_info(str(raw)).format == "raw"


def test_shared_folders_must_lie_under_the_shared_roots(tmp_path: Path) -> None:
    root = tmp_path / "shares"
    (root / "project").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (tmp_path / "shares-sibling").mkdir()  # shares its name's prefix with the root, is not under it
    # a symlink inside the root that points out of it is judged by where it points
    (root / "escape").symlink_to(tmp_path / "outside")
    inside = SharedFolder(str(root / "project"), "p")
    spec = VmSpec(name="vm", disks=(DiskSpec("d", size_mib=1),), shared_folders=(inside,))
    assert resolve_spec(spec, [], [str(root)]).shared_folders == (str(root / "project"),)
    assert resolve_spec(spec, [], None).shared_folders == (str(root / "project"),)  # no restriction
    bad = VmSpec(
        name="vm",
        disks=(DiskSpec("d", size_mib=1),),
        shared_folders=(
            inside,
            SharedFolder(str(tmp_path / "outside"), "o"),
            SharedFolder(str(root / "escape"), "e"),
            SharedFolder(str(tmp_path / "shares-sibling"), "s"),
        ),
    )
    with pytest.raises(InvalidArgument) as info:
        resolve_spec(bad, [], [str(root)])
    err = info.value
    assert err.reason == "SHARED_FOLDER_NOT_ALLOWED" and err.metadata["field"] == "spec.shared_folders"
    # every offender in one error, the allowed one not among them
    for i in (1, 2, 3):
        assert f"shared_folders[{i}]" in err.message
    assert "shared_folders[0]" not in err.message
    # no roots configured: nothing may be shared, and the message says so
    with pytest.raises(InvalidArgument, match="none configured"):
        resolve_spec(spec, [], [])
