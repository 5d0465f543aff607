"""Conversion between the snapshot models (``clonebox_core.snapshots``) and ``clonebox.type.v1`` messages.

Shared by the agent, the controller and the CLI, so all three read a snapshot, a policy and an export
stream the same way.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

from clonebox.type.v1 import snapshot_pb2

from clonebox_core import model
from clonebox_core.rpc import convert
from clonebox_core.secret import Secret
from clonebox_core.snapshots import (
    ImageChunk,
    ImageDisk,
    ImageHeader,
    ImagePart,
    ImageTrailer,
    PruneDecision,
    Snapshot,
    SnapshotKind,
    SnapshotPolicy,
)

_KIND_TO_PROTO = {
    SnapshotKind.INTERNAL: snapshot_pb2.SNAPSHOT_KIND_INTERNAL,
    SnapshotKind.EXTERNAL: snapshot_pb2.SNAPSHOT_KIND_EXTERNAL,
}


def kind_to_proto(kind: SnapshotKind | None) -> snapshot_pb2.SnapshotKind.ValueType:
    """SnapshotKind -> proto enum (None, "let the agent choose", is UNSPECIFIED)."""
    return snapshot_pb2.SNAPSHOT_KIND_UNSPECIFIED if kind is None else _KIND_TO_PROTO[kind]


def kind_from_proto(value: snapshot_pb2.SnapshotKind.ValueType) -> SnapshotKind | None:
    """Proto enum -> SnapshotKind (None: unspecified, the receiver's default applies)."""
    if value == snapshot_pb2.SNAPSHOT_KIND_INTERNAL:
        return SnapshotKind.INTERNAL
    if value == snapshot_pb2.SNAPSHOT_KIND_EXTERNAL:
        return SnapshotKind.EXTERNAL
    return None


def snapshot_to_proto(s: Snapshot) -> snapshot_pb2.Snapshot:
    """Snapshot -> proto."""
    return snapshot_pb2.Snapshot(
        name=s.name,
        vm=s.vm,
        description=s.description,
        tags=dict(s.tags),
        create_time=convert.ts_to_proto(s.create_time),
        kind=kind_to_proto(s.kind),
        vm_state=s.vm_state.value,  # type: ignore[arg-type]  # the enums share numbers by construction
        has_memory=s.has_memory,
        quiesced=s.quiesced,
        size_bytes=s.size_bytes,
        parent=s.parent,
        children=list(s.children),
        current=s.current,
        creator=s.creator,
        automatic=s.automatic,
        reason=s.reason,
    )


def snapshot_from_proto(m: snapshot_pb2.Snapshot) -> Snapshot:
    """Proto -> Snapshot."""
    created = convert.ts_from_proto(m.create_time, m.HasField("create_time"))
    return Snapshot(
        name=m.name,
        vm=m.vm,
        kind=kind_from_proto(m.kind) or SnapshotKind.INTERNAL,
        create_time=created if created is not None else datetime.fromtimestamp(0, UTC),
        vm_state=convert.vm_state_from_proto(m.vm_state, "snapshot.vm_state"),
        has_memory=m.has_memory,
        quiesced=m.quiesced,
        description=m.description,
        tags=dict(m.tags),
        size_bytes=m.size_bytes,
        parent=m.parent,
        children=tuple(m.children),
        current=m.current,
        creator=m.creator,
        automatic=m.automatic,
        reason=m.reason,
    )


def policy_to_proto(p: SnapshotPolicy) -> snapshot_pb2.SnapshotPolicy:
    """SnapshotPolicy -> proto."""
    return snapshot_pb2.SnapshotPolicy(**dataclasses.asdict(p))


def policy_from_proto(m: snapshot_pb2.SnapshotPolicy) -> SnapshotPolicy:
    """Proto -> SnapshotPolicy."""
    return SnapshotPolicy(
        keep_last=m.keep_last,
        keep_hourly=m.keep_hourly,
        keep_daily=m.keep_daily,
        keep_weekly=m.keep_weekly,
        max_age_seconds=m.max_age_seconds,
        max_total_bytes=m.max_total_bytes,
    )


def decision_to_proto(d: PruneDecision) -> snapshot_pb2.PruneDecision:
    """PruneDecision -> proto."""
    return snapshot_pb2.PruneDecision(name=d.name, keep=d.keep, reason=d.reason)


def decision_from_proto(m: snapshot_pb2.PruneDecision) -> PruneDecision:
    """Proto -> PruneDecision."""
    return PruneDecision(m.name, m.keep, m.reason)


def part_to_proto(part: ImagePart) -> snapshot_pb2.SnapshotImagePart:
    """One export/import stream part -> proto; the header's spec goes out with its secrets redacted."""
    if isinstance(part, ImageChunk):
        return snapshot_pb2.SnapshotImagePart(
            chunk=snapshot_pb2.SnapshotImageChunk(disk=part.disk, offset=part.offset, data=part.data)
        )
    if isinstance(part, ImageTrailer):
        return snapshot_pb2.SnapshotImagePart(trailer=snapshot_pb2.SnapshotImageTrailer(sha256=list(part.sha256)))
    header = snapshot_pb2.SnapshotImageHeader(
        spec=convert.spec_to_proto(part.spec, redact=True),
        disks=[
            snapshot_pb2.SnapshotDisk(name=d.name, virtual_size_bytes=d.virtual_size_bytes, image_bytes=d.image_bytes)
            for d in part.disks
        ],
        request_id=part.request_id,
        host=part.host,
    )
    if part.snapshot is not None:
        header.snapshot.CopyFrom(snapshot_to_proto(part.snapshot))
    return snapshot_pb2.SnapshotImagePart(header=header)


def _unredacted(spec: model.VmSpec) -> model.VmSpec:
    """An imported spec without what export redacted: the disks already hold the configured guest.

    No cloud-init seed travels (the guest ran it on its first boot; running it again would make it a new
    instance), and a redacted password hash is no hash.
    """
    auth = spec.auth
    if auth is not None and auth.password_hash.reveal() == convert.REDACTED:
        auth = dataclasses.replace(auth, password_hash=Secret(""))
    return dataclasses.replace(spec, cloud_init=None, auth=auth)


def part_from_proto(m: snapshot_pb2.SnapshotImagePart) -> ImagePart | None:
    """Proto -> one stream part (None: an empty part, which the receiver refuses)."""
    which = m.WhichOneof("part")
    if which == "chunk":
        return ImageChunk(m.chunk.disk, m.chunk.offset, m.chunk.data)
    if which == "trailer":
        return ImageTrailer(tuple(m.trailer.sha256))
    if which != "header":
        return None
    h = m.header
    return ImageHeader(
        snapshot=snapshot_from_proto(h.snapshot) if h.HasField("snapshot") else None,
        spec=_unredacted(convert.spec_from_proto(h.spec)),
        disks=tuple(ImageDisk(d.name, d.virtual_size_bytes, d.image_bytes) for d in h.disks),
        request_id=h.request_id,
        host=h.host,
    )
