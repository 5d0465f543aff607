"""Snapshot archive files: round trips, streaming, and every way a file can be cut, altered or misused.

``_decode_by_spec`` is an independent reader written from docs/snapshot-archive.md alone, so the
document and the module cannot drift apart unnoticed.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import random
import struct
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard
from clonebox.type.v1 import snapshot_pb2 as pb
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clonebox_core import snapshot_archive as sa
from clonebox_core.errors import InvalidArgument

pytestmark = pytest.mark.unit

PW = b"correct horse battery staple"
FAST_N = 2**4  # the _kdf_n test hook: a cheap scrypt; readers honour the recorded n
DATA_LEN = 3 * 1024 * 1024 + 512 * 1024  # 3.5 MiB: four chunks once compressed (random data does not shrink)
PIECE = 200 * 1024

ALL_REASONS = {
    sa.ARCHIVE_NOT_SNAPSHOT,
    sa.ARCHIVE_TRUNCATED,
    sa.ARCHIVE_CORRUPT,
    sa.ARCHIVE_WRONG_KEY,
}


# ----------------------------------------------------------------------------------------- helpers


def make_parts(data: bytes, piece: int = PIECE) -> Iterator[pb.SnapshotImagePart]:
    header = pb.SnapshotImagePart()
    header.header.snapshot.name = "before-upgrade"
    header.header.snapshot.vm = "web-1"
    header.header.disks.add(name="root", virtual_size_bytes=10 * 1024**3, image_bytes=len(data))
    yield header
    for offset in range(0, len(data), piece):
        part = pb.SnapshotImagePart()
        part.chunk.disk = 0
        part.chunk.offset = offset
        part.chunk.data = data[offset : offset + piece]
        yield part
    trailer = pb.SnapshotImagePart()
    trailer.trailer.sha256.append(hashlib.sha256(data).hexdigest())
    yield trailer


def write(parts: Any, passphrase: bytes | None = None, **hooks: int) -> tuple[bytes, sa.ArchiveSummary]:
    buf = io.BytesIO()
    hooks.setdefault("_kdf_n", FAST_N)
    summary = sa.write_archive(buf, parts, passphrase=passphrase, **hooks)
    return buf.getvalue(), summary


def read(blob: bytes, passphrase: bytes | None = None) -> list[pb.SnapshotImagePart]:
    return list(sa.read_archive(io.BytesIO(blob), passphrase=passphrase))


def reason_of(blob: bytes, passphrase: bytes | None = None) -> str:
    with pytest.raises(InvalidArgument) as info:
        read(blob, passphrase)
    assert info.value.metadata == {"field": "file"}
    return info.value.reason


def layout(blob: bytes) -> tuple[int, list[tuple[int, int, int]]]:
    """End of the preamble, and (start, flag, body length) of each frame."""
    (n,) = struct.unpack(">I", blob[8:12])
    pos = end = 12 + n
    frames = []
    while pos < len(blob):
        flag, length = struct.unpack(">BI", blob[pos : pos + 5])
        frames.append((pos, flag, length))
        pos += 5 + length
    return end, frames


def frame_bytes(blob: bytes, frame: tuple[int, int, int]) -> bytes:
    start, _, length = frame
    return blob[start : start + 5 + length]


def splice(blob: bytes, order: list[int]) -> bytes:
    """The archive with its frames rearranged (indexes into the original frames, repeats allowed)."""
    end, frames = layout(blob)
    return blob[:end] + b"".join(frame_bytes(blob, frames[i]) for i in order)


def flip(blob: bytes, at: int, mask: int = 0x01) -> bytes:
    out = bytearray(blob)
    out[at] ^= mask
    return bytes(out)


def preamble_of(blob: bytes) -> tuple[int, bytes]:
    (n,) = struct.unpack(">I", blob[8:12])
    return 12, blob[12 : 12 + n]


def replace_b64_char(blob: bytes, key: str) -> bytes:
    """Change the first character of a base64 value in the preamble (still valid base64, other bytes)."""
    start, raw = preamble_of(blob)
    at = raw.index(f'"{key}":"'.encode()) + len(key) + 4
    new = b"B" if raw[at : at + 1] == b"A" else b"A"
    return blob[: start + at] + new + blob[start + at + 1 :]


def plain_archive_by_hand(plaintext: bytes, chunk_size: int = 4096, extra: bytes = b"") -> bytes:
    """A plain archive built from the documented layout, around any plaintext (for crafted content)."""
    pre = json.dumps(
        {"chunk_size": chunk_size, "compression": "zstd", "encryption": "none", "format": 1},
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    compressed = zstandard.ZstdCompressor(level=3, write_checksum=True).compress(plaintext) + extra
    chunks = [compressed[i : i + chunk_size] for i in range(0, len(compressed), chunk_size)]
    out = sa.MAGIC + struct.pack(">I", len(pre)) + pre
    for i, chunk in enumerate(chunks):
        out += struct.pack(">BI", 1 if i == len(chunks) - 1 else 0, len(chunk)) + chunk
    trailer = hashlib.sha256(plaintext).digest() + struct.pack(">Q", len(plaintext))
    return out + struct.pack(">BI", 2, len(trailer)) + trailer


def varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _decode_by_spec(blob: bytes, passphrase: bytes | None = None) -> list[pb.SnapshotImagePart]:
    """Decode an archive following docs/snapshot-archive.md only (everything loaded; fine for tests)."""
    assert blob[:8] == b"CBSNAP\x00\x01"
    (n,) = struct.unpack(">I", blob[8:12])
    pre = blob[12 : 12 + n]
    doc = json.loads(pre)
    assert pre == json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    assert doc["format"] == 1 and doc["compression"] == "zstd"
    frames = []
    pos = 12 + n
    while pos < len(blob):
        flag, length = struct.unpack(">BI", blob[pos : pos + 5])
        frames.append((flag, blob[pos + 5 : pos + 5 + length]))
        pos += 5 + length
    if doc["encryption"] == "aes-256-gcm":
        kdf = doc["kdf"]
        assert kdf["name"] == "scrypt"
        assert passphrase is not None
        out = Scrypt(salt=base64.b64decode(kdf["salt"]), length=48, n=kdf["n"], r=kdf["r"], p=kdf["p"]).derive(
            passphrase
        )
        assert out[32:] == base64.b64decode(kdf["check"])
        aead = AESGCM(out[:32])
        prefix = base64.b64decode(doc["nonce_prefix"])
        assert len(prefix) == 4
        digest = hashlib.sha256(pre).digest()
        frames = [
            (flag, aead.decrypt(prefix + struct.pack(">Q", i), body, digest + struct.pack(">QB", i, flag)))
            for i, (flag, body) in enumerate(frames)
        ]
    else:
        assert doc["encryption"] == "none"
    flags = [flag for flag, _ in frames]
    assert flags == [0] * (len(frames) - 2) + [1, 2]
    assert all(len(body) == doc["chunk_size"] for _, body in frames[:-2])
    plaintext = zstandard.ZstdDecompressor().decompressobj().decompress(b"".join(b for _, b in frames[:-1]))
    digest, length = struct.unpack(">32sQ", frames[-1][1])
    assert digest == hashlib.sha256(plaintext).digest() and length == len(plaintext)
    parts, pos = [], 0
    while pos < len(plaintext):
        size, shift = 0, 0
        while True:
            byte = plaintext[pos]
            pos += 1
            size |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        parts.append(pb.SnapshotImagePart.FromString(plaintext[pos : pos + size]))
        pos += size
    return parts


@pytest.fixture(scope="module")
def data() -> bytes:
    return random.Random(7).randbytes(DATA_LEN)


@pytest.fixture(scope="module")
def plain(data: bytes) -> bytes:
    return write(make_parts(data))[0]


@pytest.fixture(scope="module")
def sealed(data: bytes) -> bytes:
    return write(make_parts(data), PW)[0]


@pytest.fixture(params=["plain", "sealed"])
def archive(request: pytest.FixtureRequest) -> tuple[bytes, bytes | None]:
    """Each archive with the passphrase that opens it."""
    blob: bytes = request.getfixturevalue(request.param)
    return blob, (PW if request.param == "sealed" else None)


# ----------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("passphrase", [None, PW], ids=["plain", "encrypted"])
def test_round_trip_multi_chunk(data: bytes, passphrase: bytes | None) -> None:
    blob, summary = write(make_parts(data), passphrase)
    expected = list(make_parts(data))
    assert len(expected) > 15
    assert read(blob, passphrase) == expected
    assert _decode_by_spec(blob, passphrase) == expected

    _, frames = layout(blob)
    assert [flag for _, flag, _ in frames] == [0, 0, 0, 1, 2]
    full = sa.CHUNK_SIZE + (16 if passphrase else 0)
    assert [length for _, _, length in frames[:3]] == [full] * 3
    assert summary.chunks == 4
    assert summary.file_bytes == len(blob)
    assert summary.sha256 == hashlib.sha256(blob).hexdigest()
    assert summary.plaintext_bytes == sum(len(varint(p.ByteSize())) + p.ByteSize() for p in expected)
    info = sa.archive_info(io.BytesIO(blob))
    assert info == sa.ArchivePreamble(format=1, encrypted=passphrase is not None, compression="zstd")
    if passphrase:
        assert data[:4096] not in blob  # sealed: no image bytes in the clear


@pytest.mark.parametrize("passphrase", [None, PW], ids=["plain", "encrypted"])
def test_empty_and_compressible_streams(passphrase: bytes | None) -> None:
    blob, summary = write(iter([]), passphrase)
    assert read(blob, passphrase) == [] and summary.chunks == 1 and summary.plaintext_bytes == 0
    zeros = bytes(8 * 1024 * 1024)
    blob, summary = write(make_parts(zeros, 1024 * 1024), passphrase)
    assert summary.chunks == 1 and len(blob) < 64 * 1024
    assert read(blob, passphrase) == list(make_parts(zeros, 1024 * 1024))


def test_default_kdf_cost_is_recorded_and_honoured() -> None:
    blob, _ = write(make_parts(b"x" * 1000), PW, _kdf_n=sa.KDF_N)
    _, raw = preamble_of(blob)
    assert json.loads(raw)["kdf"] == json.loads(raw)["kdf"] | {"n": 2**15, "r": 8, "p": 1, "name": "scrypt"}
    assert read(blob, PW) == list(make_parts(b"x" * 1000))


def test_short_writes_and_short_reads_are_fine() -> None:
    class Trickle(io.RawIOBase):
        def __init__(self, blob: bytes) -> None:
            self._inner = io.BytesIO(blob)

        def read(self, size: int = -1) -> bytes:
            return self._inner.read(min(size, 7) if size >= 0 else 7)

    class Dribble(io.RawIOBase):
        def __init__(self) -> None:
            self.got = bytearray()

        def writable(self) -> bool:
            return True

        def write(self, data: Any) -> int:
            taken = bytes(data[:1000])
            self.got += taken
            return len(taken)

    sink = Dribble()
    sa.write_archive(sink, make_parts(random.Random(1).randbytes(20_000), 3000), passphrase=PW, _kdf_n=FAST_N)  # type: ignore[arg-type]
    blob = bytes(sink.got)
    parts = list(sa.read_archive(Trickle(blob), passphrase=PW))  # type: ignore[arg-type]
    assert parts == list(make_parts(random.Random(1).randbytes(20_000), 3000))


@pytest.mark.parametrize("passphrase", [None, PW], ids=["plain", "encrypted"])
def test_streams_with_bounded_memory(tmp_path: Path, passphrase: bytes | None) -> None:
    total = 24 * 1024 * 1024
    piece = 256 * 1024
    source_hash = hashlib.sha256()

    def generated() -> Iterator[pb.SnapshotImagePart]:
        rnd = random.Random(3)
        header = pb.SnapshotImagePart()
        header.header.disks.add(name="root", image_bytes=total)
        yield header
        for offset in range(0, total, piece):
            chunk = rnd.randbytes(piece)
            source_hash.update(chunk)
            part = pb.SnapshotImagePart()
            part.chunk.offset = offset
            part.chunk.data = chunk
            yield part

    path = tmp_path / "snap.cbsnap"
    tracemalloc.start()
    try:
        with path.open("wb") as out:
            summary = sa.write_archive(out, generated(), passphrase=passphrase, _kdf_n=FAST_N)
        _, write_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        read_hash = hashlib.sha256()
        count = 0
        with path.open("rb") as inp:
            for part in sa.read_archive(inp, passphrase=passphrase):
                read_hash.update(part.chunk.data)
                count += 1
        _, read_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert summary.chunks == 25 and count == total // piece + 1
    assert read_hash.digest() == source_hash.digest()
    # a few chunks at most, against 24 MiB of data
    assert write_peak < 8 * 1024 * 1024, write_peak
    assert read_peak < 8 * 1024 * 1024, read_peak


def test_parts_are_yielded_before_the_end_and_the_end_still_decides(sealed: bytes) -> None:
    _, frames = layout(sealed)
    bad = flip(sealed, frames[-1][0] + 10)  # inside the trailer's sealed body
    inp = io.BytesIO(bad)
    it = sa.read_archive(inp, passphrase=PW)
    first = next(it)
    assert first.HasField("header")
    assert inp.tell() < len(bad) // 2  # streaming: yielded long before the file was read
    got = [first]
    with pytest.raises(InvalidArgument) as info:
        for part in it:
            got.append(part)
    assert info.value.reason == sa.ARCHIVE_CORRUPT
    assert len(got) == len(list(make_parts(bytes(DATA_LEN))))  # every part came out, then the trailer failed


# ----------------------------------------------------------------------------------------- truncation


def _cut_points(blob: bytes) -> dict[str, int]:
    end, frames = layout(blob)
    trailer = frames[-1][0]
    return {
        "empty file": 0,
        "inside magic": 5,
        "inside preamble length": 10,
        "inside preamble": 20,
        "inside first frame header": end + 3,
        "inside first frame": end + 5 + 1000,
        "at a frame boundary": frames[2][0],
        "inside the last data frame": frames[3][0] + 20,
        "right before the trailer": trailer,
        "inside the trailer header": trailer + 2,
        "trailer cut": trailer + 5 + 10,
        "last byte missing": len(blob) - 1,
    }


CUT_POINTS = [
    "empty file",
    "inside magic",
    "inside preamble length",
    "inside preamble",
    "inside first frame header",
    "inside first frame",
    "at a frame boundary",
    "inside the last data frame",
    "right before the trailer",
    "inside the trailer header",
    "trailer cut",
    "last byte missing",
]


@pytest.mark.parametrize("where", CUT_POINTS)
def test_truncated_anywhere(archive: tuple[bytes, bytes | None], where: str) -> None:
    blob, passphrase = archive
    cut = _cut_points(blob)[where]
    assert reason_of(blob[:cut], passphrase) == sa.ARCHIVE_TRUNCATED


def test_truncated_preamble_is_reported_by_archive_info(sealed: bytes) -> None:
    with pytest.raises(InvalidArgument) as info:
        sa.archive_info(io.BytesIO(sealed[:30]))
    assert info.value.reason == sa.ARCHIVE_TRUNCATED


# ----------------------------------------------------------------------------------------- rearranged frames


@pytest.mark.parametrize(
    "order",
    [
        [0, 2, 1, 3, 4],  # two middle chunks swapped
        [1, 0, 2, 3, 4],  # first two swapped (the key is right: corrupt, not wrong key)
        [0, 1, 1, 2, 3, 4],  # a chunk duplicated
        [0, 2, 3, 4],  # a chunk missing
        [0, 1, 2, 3, 3, 4],  # the last chunk duplicated
        [0, 1, 2, 4],  # the last chunk missing: the trailer follows a middle chunk
        [0, 1, 2, 3, 4, 4],  # the trailer duplicated
        [0, 1, 2, 3, 4, 0],  # a chunk after the trailer
    ],
    ids=["swap", "swap-first", "dup", "drop", "dup-last", "drop-last", "dup-trailer", "after-trailer"],
)
def test_rearranged_frames_are_corrupt(archive: tuple[bytes, bytes | None], order: list[int]) -> None:
    blob, passphrase = archive
    assert reason_of(splice(blob, order), passphrase) == sa.ARCHIVE_CORRUPT


def test_data_after_the_trailer_is_corrupt(archive: tuple[bytes, bytes | None]) -> None:
    blob, passphrase = archive
    assert reason_of(blob + b"\x00", passphrase) == sa.ARCHIVE_CORRUPT


def test_trailer_from_another_archive_is_corrupt(data: bytes) -> None:
    a, _ = write(make_parts(data))
    b, _ = write(make_parts(data[:-1] + b"!"))
    _, frames_a = layout(a)
    _, frames_b = layout(b)
    mixed = a[: frames_a[-1][0]] + frame_bytes(b, frames_b[-1])
    assert reason_of(mixed) == sa.ARCHIVE_CORRUPT


# ----------------------------------------------------------------------------------------- flipped bytes


def test_flipped_bytes_in_an_encrypted_archive(sealed: bytes) -> None:
    _, frames = layout(sealed)
    first, middle, trailer = frames[0], frames[2], frames[-1]
    cases = {
        "first chunk body": first[0] + 5 + 100,
        "middle chunk body": middle[0] + 5 + 500_000,
        "last byte of a tag": middle[0] + 5 + middle[2] - 1,
        "frame flag": middle[0],
        "frame length": middle[0] + 4,
        "trailer body": trailer[0] + 5 + 3,
    }
    for name, at in cases.items():
        assert reason_of(flip(sealed, at), PW) == sa.ARCHIVE_CORRUPT, name


def test_flipped_preamble_of_an_encrypted_archive(sealed: bytes) -> None:
    # the preamble's bytes are in every frame's AAD: a changed nonce prefix opens no frame
    assert reason_of(replace_b64_char(sealed, "nonce_prefix"), PW) == sa.ARCHIVE_CORRUPT
    # salt and key check feed the key check itself: indistinguishable from a wrong passphrase
    assert reason_of(replace_b64_char(sealed, "salt"), PW) == sa.ARCHIVE_WRONG_KEY
    assert reason_of(replace_b64_char(sealed, "check"), PW) == sa.ARCHIVE_WRONG_KEY
    start, raw = preamble_of(sealed)
    # a changed chunk size is a valid-looking preamble whose frames then fail
    at = raw.index(b"1048576") + 6
    assert reason_of(sealed[: start + at] + b"7" + sealed[start + at + 1 :], PW) == sa.ARCHIVE_CORRUPT
    # structure and unknown values: not an archive at all
    assert reason_of(flip(sealed, start), PW) == sa.ARCHIVE_NOT_SNAPSHOT
    at = raw.index(b"aes-256-gcm")
    assert reason_of(sealed[: start + at] + b"b" + sealed[start + at + 1 :], PW) == sa.ARCHIVE_NOT_SNAPSHOT


def test_flipped_bytes_in_a_plain_archive(plain: bytes) -> None:
    _, frames = layout(plain)
    assert reason_of(flip(plain, frames[1][0] + 5 + 300_000)) == sa.ARCHIVE_CORRUPT  # compressed data
    assert reason_of(flip(plain, frames[-1][0] + 5 + 3)) == sa.ARCHIVE_CORRUPT  # trailer digest
    assert reason_of(flip(plain, frames[-1][0] + 5 + 39)) == sa.ARCHIVE_CORRUPT  # trailer length
    start, raw = preamble_of(plain)
    at = raw.index(b"zstd")
    assert reason_of(plain[: start + at] + b"Z" + plain[start + at + 1 :]) == sa.ARCHIVE_NOT_SNAPSHOT


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_single_byte_change_in_an_encrypted_archive_is_detected(data: st.DataObject) -> None:
    blob = _small_sealed()
    at = data.draw(st.integers(0, len(blob) - 1), label="offset")
    mask = data.draw(st.integers(1, 255), label="xor")
    with pytest.raises(InvalidArgument) as info:
        read(flip(blob, at, mask), PW)
    assert info.value.reason in ALL_REASONS
    assert info.value.metadata == {"field": "file"}


_SMALL: list[bytes] = []


def _small_sealed() -> bytes:
    # many small frames (the _chunk_size hook) so that every structure is a sizeable share of the bytes
    if not _SMALL:
        payload = random.Random(5).randbytes(2000)
        _SMALL.append(write(make_parts(payload, 300), PW, _chunk_size=256)[0])
        assert read(_SMALL[0], PW) == list(make_parts(payload, 300))
        assert len(layout(_SMALL[0])[1]) > 8
    return _SMALL[0]


# ----------------------------------------------------------------------------------------- passphrases


def test_wrong_passphrase(sealed: bytes) -> None:
    assert reason_of(sealed, b"correct horse battery stapler") == sa.ARCHIVE_WRONG_KEY


def test_passphrase_problems_are_reported_before_iterating(sealed: bytes, plain: bytes) -> None:
    # checked when read_archive is called, so the CLI can ask again before it starts an import
    with pytest.raises(InvalidArgument) as info:
        sa.read_archive(io.BytesIO(sealed))
    assert info.value.reason == sa.ARCHIVE_NEEDS_PASSPHRASE
    assert "passphrase" in info.value.message
    with pytest.raises(InvalidArgument) as info:
        sa.read_archive(io.BytesIO(plain), passphrase=PW)
    assert info.value.reason == sa.ARCHIVE_NOT_ENCRYPTED
    with pytest.raises(InvalidArgument) as info:
        sa.read_archive(io.BytesIO(sealed), passphrase=b"nope")
    assert info.value.reason == sa.ARCHIVE_WRONG_KEY
    with pytest.raises(InvalidArgument) as info:
        sa.read_archive(io.BytesIO(sealed), passphrase=b"")
    assert info.value.metadata == {"field": "passphrase"}
    with pytest.raises(InvalidArgument):
        write(iter([]), b"")


def test_nonces_never_repeat(monkeypatch: pytest.MonkeyPatch) -> None:
    used: list[tuple[bytes, bytes]] = []

    class Recording:
        def __init__(self, key: bytes) -> None:
            self._aead = AESGCM(key)
            self.key = key

        def encrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes:
            used.append((self.key, nonce))
            return self._aead.encrypt(nonce, data, associated_data)

    monkeypatch.setattr(sa, "AESGCM", Recording)
    payload = random.Random(9).randbytes(50_000)
    first, s1 = write(make_parts(payload, 5000), PW, _chunk_size=4096)
    n1 = len(used)
    second, _ = write(make_parts(payload, 5000), PW, _chunk_size=4096)
    a, b = used[:n1], used[n1:]
    assert n1 == s1.chunks + 1 > 10
    for frames in (a, b):
        nonces = [nonce for _, nonce in frames]
        assert len(set(nonces)) == len(nonces) and all(len(n) == 12 for n in nonces)
        assert len({n[:4] for n in nonces}) == 1  # one random prefix per file, then the counter
        assert [int.from_bytes(n[4:]) for n in nonces] == list(range(len(nonces)))
    assert not {n for _, n in a} & {n for _, n in b}  # same input, same passphrase: other nonces
    assert a[0][0] != b[0][0]  # and another key (fresh salt)
    assert first != second
    monkeypatch.undo()
    assert read(first, PW) == read(second, PW) == list(make_parts(payload, 5000))


# ----------------------------------------------------------------------------------------- not an archive, limits


def _raw_preamble(raw: bytes) -> bytes:
    return sa.MAGIC + struct.pack(">I", len(raw)) + raw


def _with_preamble(doc: dict[str, Any], rest: bytes = b"") -> bytes:
    return _raw_preamble(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()) + rest


@pytest.mark.parametrize(
    "blob",
    [
        b"QFI\xfb\x00\x00\x00\x03" + bytes(100),  # a qcow2 image
        b"hello, this is a text file\n",
        b'{"format": 1}',
        sa.MAGIC + struct.pack(">I", 64 * 1024 + 1) + bytes(64 * 1024 + 1),  # preamble over the limit
        sa.MAGIC + struct.pack(">I", 4) + b"\xff\xfe{}",
        sa.MAGIC + struct.pack(">I", 2) + b"[]",
        _with_preamble({"chunk_size": 1048576, "compression": "zstd", "encryption": "none", "format": 2}),
        _with_preamble({"chunk_size": 1048576, "compression": "gzip", "encryption": "none", "format": 1}),
        _with_preamble({"chunk_size": 10, "compression": "zstd", "encryption": "none", "format": 1}),
        _with_preamble({"chunk_size": 1048576, "compression": "zstd", "encryption": "none", "format": True}),
        _with_preamble({"chunk_size": 1048576, "compression": "zstd", "encryption": "none", "format": 1, "x": 1}),
        _raw_preamble(b'{"chunk_size": 1048576,"compression":"zstd","encryption":"none","format":1}'),
    ],
    ids=["qcow2", "text", "json", "huge-preamble", "not-utf8", "not-object", "format-2", "gzip", "tiny-chunks",
         "bool-format", "unknown-key", "not-canonical"],
)  # fmt: skip
def test_not_an_archive(blob: bytes) -> None:
    assert reason_of(blob) == sa.ARCHIVE_NOT_SNAPSHOT
    with pytest.raises(InvalidArgument):
        sa.archive_info(io.BytesIO(blob))


@pytest.mark.parametrize(
    ("n", "r"),
    [(2**21, 8), (2**20, 16), (3000, 8), (1, 8), (2**14, 0)],
    ids=["n-too-big", "mem", "not-pow2", "n-1", "r-0"],
)
def test_kdf_bounds_refuse_costly_or_bogus_parameters(sealed: bytes, n: int, r: int) -> None:
    # a crafted preamble must not make the reader spend GiBs of memory: refused before scrypt runs
    _, raw = preamble_of(sealed)
    doc = json.loads(raw)
    doc["kdf"]["n"] = n
    doc["kdf"]["r"] = r
    assert reason_of(_with_preamble(doc), PW) == sa.ARCHIVE_NOT_SNAPSHOT


def test_frame_lengths_are_checked_before_reading(plain: bytes) -> None:
    end, _ = layout(plain)
    huge = plain[:end] + struct.pack(">BI", 0, 2**31)  # no body follows: refused on the header alone
    assert reason_of(huge) == sa.ARCHIVE_CORRUPT
    unknown_flag = plain[:end] + struct.pack(">BI", 7, 10) + bytes(10)
    assert reason_of(unknown_flag) == sa.ARCHIVE_CORRUPT


def test_crafted_plaintext_is_checked() -> None:
    good = pb.SnapshotImagePart()
    good.chunk.data = b"abc"
    msg = good.SerializeToString()
    assert read(plain_archive_by_hand(varint(len(msg)) + msg)) == [good]
    too_long = sa.MAX_PART + 1
    assert reason_of(plain_archive_by_hand(varint(too_long) + bytes(too_long))) == sa.ARCHIVE_CORRUPT
    assert reason_of(plain_archive_by_hand(varint(5) + b"\xff\xff\xff\xff\xff")) == sa.ARCHIVE_CORRUPT
    assert reason_of(plain_archive_by_hand(varint(10) + b"short")) == sa.ARCHIVE_CORRUPT
    assert reason_of(plain_archive_by_hand(b"\xff\xff\xff\xff\xff\x01")) == sa.ARCHIVE_CORRUPT
    # compressed bytes after the end of the zstd frame are decoded, not ignored
    assert reason_of(plain_archive_by_hand(varint(len(msg)) + msg, extra=b"garbage!")) == sa.ARCHIVE_CORRUPT


def test_writer_refuses_a_part_the_reader_would_refuse() -> None:
    big = pb.SnapshotImagePart()
    big.chunk.data = bytes(sa.MAX_PART)
    with pytest.raises(InvalidArgument) as info:
        write(iter([big]))
    assert info.value.reason == sa.ARCHIVE_PART_TOO_LARGE


def test_archive_info_reads_only_the_preamble(sealed: bytes) -> None:
    inp = io.BytesIO(sealed)
    info = sa.archive_info(inp)
    assert info.encrypted and info.format == 1 and info.compression == "zstd"
    _, raw = preamble_of(sealed)
    assert inp.tell() == 12 + len(raw)
