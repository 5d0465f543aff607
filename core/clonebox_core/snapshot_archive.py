"""Snapshot archive files: what ``clonebox snapshot export -o FILE [--encrypt]`` writes and import reads.

An archive carries the ``SnapshotImagePart`` stream of one export (header, image chunks, trailer) as a
single file: length-delimited messages, compressed as one zstd stream, cut into chunk frames and closed
by a trailer frame holding the SHA-256 and length of the uncompressed message stream. With a passphrase
every frame is sealed on its own with AES-256-GCM (key from scrypt), its index and position bound in the
associated data, because one GCM message cannot safely carry a multi-gigabyte image and a reader must be
able to stream. The layout, byte for byte, is in ``docs/snapshot-archive.md``.

Only the CLI touches these files (the passphrase and key never leave the user's machine); the agent and
controller see plain ``SnapshotImagePart`` messages. Both directions stream: memory stays within a few
chunks whatever the image size.

Every failure to read is an :class:`~clonebox_core.errors.InvalidArgument` on field ``file`` with one of
the ``ARCHIVE_*`` reasons below.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO, Final, cast

import zstandard
from clonebox.type.v1 import snapshot_pb2
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from google.protobuf.message import DecodeError

from clonebox_core.errors import InvalidArgument, invalid_field
from clonebox_core.model import VmSpec
from clonebox_core.rpc.convert import spec_from_proto
from clonebox_core.snapshots import check_image_disks

__all__ = [
    "ARCHIVE_CORRUPT",
    "ARCHIVE_NEEDS_PASSPHRASE",
    "ARCHIVE_NOT_ENCRYPTED",
    "ARCHIVE_NOT_SNAPSHOT",
    "ARCHIVE_PART_TOO_LARGE",
    "ARCHIVE_TRUNCATED",
    "ARCHIVE_WRONG_KEY",
    "CHUNK_SIZE",
    "MAGIC",
    "ArchivePreamble",
    "ArchiveSummary",
    "archive_info",
    "read_archive",
    "write_archive",
]

#: first 8 bytes of every archive; the last two are the layout version of the magic itself
MAGIC: Final = b"CBSNAP\x00\x01"
#: the one format this module writes and reads
FORMAT: Final = 1
#: compressed bytes per frame (the last data frame may be shorter)
CHUNK_SIZE: Final = 1024 * 1024

#: bounds on what a reader accepts from a file (recorded parameters are honoured only within these)
MAX_PREAMBLE: Final = 64 * 1024
MIN_CHUNK_SIZE: Final = 256
MAX_CHUNK_SIZE: Final = 16 * 1024 * 1024
#: a length-delimited message may not exceed this (image chunks are at most 1 MiB of data)
MAX_PART: Final = 2 * 1024 * 1024
#: scrypt cost the writer uses; a reader refuses n above MAX_KDF_N (a crafted file must not cost GiBs)
KDF_N: Final = 2**15
KDF_R: Final = 8
KDF_P: Final = 1
MAX_KDF_N: Final = 2**20
MAX_KDF_R: Final = 32
MAX_KDF_P: Final = 16
#: scrypt memory is 128 * r * n bytes; keep a crafted (n, r) pair below 1 GiB
MAX_KDF_MEMORY: Final = 1024**3
#: zstd window cap for the decoder: level 3 uses at most 2 MiB, a crafted frame may not ask for more than this
MAX_ZSTD_WINDOW: Final = 8 * 1024 * 1024
ZSTD_LEVEL: Final = 3

ARCHIVE_NOT_SNAPSHOT: Final = "ARCHIVE_NOT_SNAPSHOT"
ARCHIVE_TRUNCATED: Final = "ARCHIVE_TRUNCATED"
ARCHIVE_CORRUPT: Final = "ARCHIVE_CORRUPT"
ARCHIVE_WRONG_KEY: Final = "ARCHIVE_WRONG_KEY"
ARCHIVE_NEEDS_PASSPHRASE: Final = "ARCHIVE_NEEDS_PASSPHRASE"
ARCHIVE_NOT_ENCRYPTED: Final = "ARCHIVE_NOT_ENCRYPTED"
ARCHIVE_PART_TOO_LARGE: Final = "ARCHIVE_PART_TOO_LARGE"

_ENC_NONE: Final = "none"
_ENC_GCM: Final = "aes-256-gcm"
_SALT_LEN: Final = 16
_PREFIX_LEN: Final = 4
_CHECK_LEN: Final = 16
_KEY_LEN: Final = 32
_TAG_LEN: Final = 16

#: frame flags; in an encrypted archive the flag is also in the associated data, so it cannot be altered
_FLAG_DATA: Final = 0
_FLAG_LAST: Final = 1
_FLAG_TRAILER: Final = 2

_U32: Final = struct.Struct(">I")
_FRAME_HEADER: Final = struct.Struct(">BI")  # flag, body length
_AAD_TAIL: Final = struct.Struct(">QB")  # chunk index, flag
_COUNTER: Final = struct.Struct(">Q")
_TRAILER: Final = struct.Struct(">32sQ")  # SHA-256 of the plaintext message stream, its length

_FIELD: Final = "file"
_REEXPORT: Final = "export the snapshot again (clonebox snapshot export)"


@dataclass(frozen=True)
class ArchiveSummary:
    """What :func:`write_archive` wrote.

    ``sha256`` is the hex SHA-256 of the whole file as written (what ``sha256sum FILE`` prints), safe to
    show and publish; the plaintext digest stays sealed in the trailer, where it cannot confirm a guess
    about an encrypted image's content.
    """

    #: data frames (the trailer frame not counted)
    chunks: int
    #: bytes of the uncompressed length-delimited message stream
    plaintext_bytes: int
    #: bytes of the file
    file_bytes: int
    #: hex SHA-256 of the file
    sha256: str


@dataclass(frozen=True)
class ArchivePreamble:
    """The cleartext facts of an archive, readable without a passphrase."""

    format: int
    encrypted: bool
    compression: str


@dataclass(frozen=True)
class _Kdf:
    """scrypt parameters as recorded in the preamble."""

    salt: bytes
    n: int
    r: int
    p: int
    check: bytes


@dataclass(frozen=True)
class _Header:
    """A parsed, validated preamble with the exact bytes it was parsed from (they go into every AAD)."""

    raw: bytes
    chunk_size: int
    kdf: _Kdf | None
    nonce_prefix: bytes

    @property
    def encrypted(self) -> bool:
        return self.kdf is not None


# --------------------------------------------------------------------------------------------- errors


def _error(reason: str, message: str) -> InvalidArgument:
    return invalid_field(_FIELD, message, reason=reason)


def _not_snapshot(why: str) -> InvalidArgument:
    return _error(
        ARCHIVE_NOT_SNAPSHOT,
        f"not a clonebox snapshot archive ({why}); give a file written by clonebox snapshot export",
    )


def _truncated(where: str) -> InvalidArgument:
    return _error(
        ARCHIVE_TRUNCATED,
        f"the archive ends {where}: it was cut short while being written or copied; copy it again or {_REEXPORT}",
    )


def _corrupt(why: str) -> InvalidArgument:
    return _error(ARCHIVE_CORRUPT, f"the archive is damaged or was altered ({why}); {_REEXPORT}")


# ------------------------------------------------------------------------------------------ preamble


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _canonical(doc: dict[str, Any]) -> bytes:
    # one encoding per preamble: the reader re-encodes what it parsed and refuses anything else, so the
    # bytes bound into the AAD are exactly the parameters the reader acts on
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _preamble_doc(chunk_size: int, kdf: _Kdf | None, nonce_prefix: bytes) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "format": FORMAT,
        "compression": "zstd",
        "encryption": _ENC_NONE if kdf is None else _ENC_GCM,
        "chunk_size": chunk_size,
    }
    if kdf is not None:
        doc["kdf"] = {
            "name": "scrypt",
            "salt": _b64(kdf.salt),
            "n": kdf.n,
            "r": kdf.r,
            "p": kdf.p,
            "check": _b64(kdf.check),
        }
        doc["nonce_prefix"] = _b64(nonce_prefix)
    return doc


def _int_in(doc: dict[str, Any], key: str, low: int, high: int) -> int:
    value = doc.get(key)
    # bool is an int in Python; JSON true is not a number here
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise _not_snapshot(f"preamble field {key} must be an integer in [{low}, {high}]")
    return value


def _bytes_of(doc: dict[str, Any], key: str, length: int) -> bytes:
    value = doc.get(key)
    if not isinstance(value, str):
        raise _not_snapshot(f"preamble field {key} must be base64")
    try:
        data = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as e:
        raise _not_snapshot(f"preamble field {key} must be base64") from e
    if len(data) != length:
        raise _not_snapshot(f"preamble field {key} must be {length} bytes")
    return data


def _parse_preamble(raw: bytes) -> _Header:
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _not_snapshot("the preamble is not JSON") from e
    if not isinstance(doc, dict):
        raise _not_snapshot("the preamble is not a JSON object")
    fmt = doc.get("format")
    if fmt != FORMAT or isinstance(fmt, bool):
        raise _not_snapshot(f"format {fmt!r}; this clonebox reads format {FORMAT}, a newer one may read it")
    if doc.get("compression") != "zstd":
        raise _not_snapshot("unknown compression")
    encryption = doc.get("encryption")
    if encryption not in (_ENC_NONE, _ENC_GCM):
        raise _not_snapshot("unknown encryption")
    chunk_size = _int_in(doc, "chunk_size", MIN_CHUNK_SIZE, MAX_CHUNK_SIZE)
    kdf: _Kdf | None = None
    prefix = b""
    if encryption == _ENC_GCM:
        kdf_doc = doc.get("kdf")
        if not isinstance(kdf_doc, dict) or kdf_doc.get("name") != "scrypt":
            raise _not_snapshot("the key derivation must be scrypt")
        n = _int_in(kdf_doc, "n", 2, MAX_KDF_N)
        if n & (n - 1):
            raise _not_snapshot("scrypt n must be a power of two")
        r = _int_in(kdf_doc, "r", 1, MAX_KDF_R)
        p = _int_in(kdf_doc, "p", 1, MAX_KDF_P)
        if 128 * r * n > MAX_KDF_MEMORY:
            raise _not_snapshot("scrypt parameters ask for more than 1 GiB of memory")
        kdf = _Kdf(_bytes_of(kdf_doc, "salt", _SALT_LEN), n, r, p, _bytes_of(kdf_doc, "check", _CHECK_LEN))
        prefix = _bytes_of(doc, "nonce_prefix", _PREFIX_LEN)
    # unknown or duplicated keys, other spellings of the same numbers: all fail this comparison
    if _canonical(_preamble_doc(chunk_size, kdf, prefix)) != raw:
        raise _not_snapshot("the preamble is not in canonical form")
    return _Header(raw=raw, chunk_size=chunk_size, kdf=kdf, nonce_prefix=prefix)


class _Input:
    """The archive being read: exact reads (pipes return short reads) and the offset, for messages."""

    def __init__(self, inp: BinaryIO) -> None:
        self._inp = inp
        self.offset = 0

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes; fewer only at the end of the file."""
        pieces: list[bytes] = []
        left = n
        while left > 0:
            piece = self._inp.read(left)
            if not piece:
                break
            pieces.append(piece)
            left -= len(piece)
        data = b"".join(pieces)
        self.offset += len(data)
        return data


def _read_header(src: _Input) -> _Header:
    magic = src.read(len(MAGIC))
    if magic != MAGIC:
        if MAGIC.startswith(magic):  # includes an empty file: an export that died at once
            raise _truncated("inside its magic")
        raise _not_snapshot("bad magic")
    length_bytes = src.read(_U32.size)
    if len(length_bytes) < _U32.size:
        raise _truncated("inside its preamble length")
    (length,) = _U32.unpack(length_bytes)
    if length > MAX_PREAMBLE:
        raise _not_snapshot(f"a preamble of {length} bytes; at most {MAX_PREAMBLE}")
    raw = src.read(length)
    if len(raw) < length:
        raise _truncated("inside its preamble")
    return _parse_preamble(raw)


# ------------------------------------------------------------------------------------------ crypto


def _derive(passphrase: bytes, *, salt: bytes, n: int, r: int, p: int) -> tuple[bytes, bytes]:
    # one scrypt run gives 48 bytes: the AES key, then a 16-byte key check that is stored in the preamble.
    # They are separate PBKDF2 output blocks, so the check reveals nothing about the key; it lets a reader
    # tell a wrong passphrase from a damaged chunk before reading any data. (Testing a guess against it
    # costs the same scrypt run as testing it against the first chunk's tag: no shortcut for an attacker.)
    out = Scrypt(salt=salt, length=_KEY_LEN + _CHECK_LEN, n=n, r=r, p=p).derive(passphrase)
    return out[:_KEY_LEN], out[_KEY_LEN:]


class _Cipher:
    """Seals and opens frames; without a key both are the identity (a plain archive)."""

    def __init__(self, key: bytes | None, header: _Header) -> None:
        self._aead = AESGCM(key) if key is not None else None
        self._prefix = header.nonce_prefix
        # the preamble's digest is in every frame's AAD: change one byte of it and no frame opens
        self._preamble_digest = hashlib.sha256(header.raw).digest()

    @property
    def overhead(self) -> int:
        return _TAG_LEN if self._aead is not None else 0

    def _nonce_aad(self, index: int, flag: int) -> tuple[bytes, bytes]:
        # random per-file prefix + counter: unique for every frame of a file, and the key itself is
        # per-file (random salt), so no (key, nonce) pair is ever used twice
        return self._prefix + _COUNTER.pack(index), self._preamble_digest + _AAD_TAIL.pack(index, flag)

    def seal(self, index: int, flag: int, data: bytes) -> bytes:
        if self._aead is None:
            return data
        nonce, aad = self._nonce_aad(index, flag)
        return self._aead.encrypt(nonce, data, aad)

    def open(self, index: int, flag: int, body: bytes) -> bytes:
        if self._aead is None:
            return body
        nonce, aad = self._nonce_aad(index, flag)
        try:
            return self._aead.decrypt(nonce, body, aad)
        except InvalidTag as e:
            what = "the trailer" if flag == _FLAG_TRAILER else f"chunk {index}"
            raise _corrupt(f"{what} failed authentication: altered, swapped, duplicated or missing frames") from e


def _check_passphrase(passphrase: bytes | None) -> None:
    if passphrase is not None and not passphrase:
        raise invalid_field("passphrase", "must not be empty")


# ------------------------------------------------------------------------------------------ writing


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low = n & 0x7F
        n >>= 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


class _Output:
    """The file being written: counts and hashes what goes out."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self.bytes = 0
        self.sha256 = hashlib.sha256()

    def write(self, data: bytes) -> None:
        # an unbuffered file may take less than asked for; a silently short frame would be a broken archive
        view = memoryview(data)
        while view:
            view = view[self._out.write(view) :]
        self.bytes += len(data)
        self.sha256.update(data)


def write_archive(
    out: BinaryIO,
    parts: Iterable[snapshot_pb2.SnapshotImagePart],
    *,
    passphrase: bytes | None = None,
    _kdf_n: int = KDF_N,
    _chunk_size: int = CHUNK_SIZE,
) -> ArchiveSummary:
    """Write ``parts`` to ``out`` as an archive, encrypted when ``passphrase`` is given; streams.

    ``parts`` may be a generator (the export RPC's response stream): each part is compressed and written as
    it arrives, memory stays within a few chunks. ``out`` is written sequentially and not closed. A part
    whose encoding exceeds 2 MiB is refused (``ARCHIVE_PART_TOO_LARGE``, field ``parts``) so that no
    archive is written that a reader would refuse. An empty passphrase is refused.

    ``_kdf_n`` and ``_chunk_size`` are for tests only (a cheap scrypt, many small frames); the file records
    what was used and readers honour it within bounds.
    """
    _check_passphrase(passphrase)
    if not MIN_CHUNK_SIZE <= _chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"_chunk_size must be in [{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}]")
    if not 2 <= _kdf_n <= MAX_KDF_N or _kdf_n & (_kdf_n - 1):
        raise ValueError(f"_kdf_n must be a power of two in [2, {MAX_KDF_N}]")

    key: bytes | None = None
    kdf: _Kdf | None = None
    prefix = b""
    if passphrase is not None:
        salt = os.urandom(_SALT_LEN)
        key, check = _derive(passphrase, salt=salt, n=_kdf_n, r=KDF_R, p=KDF_P)
        kdf = _Kdf(salt=salt, n=_kdf_n, r=KDF_R, p=KDF_P, check=check)
        prefix = os.urandom(_PREFIX_LEN)
    raw = _canonical(_preamble_doc(_chunk_size, kdf, prefix))
    header = _Header(raw=raw, chunk_size=_chunk_size, kdf=kdf, nonce_prefix=prefix)
    cipher = _Cipher(key, header)

    dst = _Output(out)
    dst.write(MAGIC + _U32.pack(len(raw)) + raw)

    index = 0

    def frame(flag: int, data: bytes) -> None:
        body = cipher.seal(index, flag, data)
        dst.write(_FRAME_HEADER.pack(flag, len(body)))
        dst.write(body)  # not concatenated: that would copy a whole chunk

    plain_hash = hashlib.sha256()
    plain_bytes = 0
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True).compressobj()
    # compressed bytes waiting to fill a chunk; a chunk goes out only once more bytes follow it, because
    # only at the end of the stream is it known which chunk is the last
    pending = bytearray()

    def emit_full() -> None:
        nonlocal index
        while len(pending) > _chunk_size:
            frame(_FLAG_DATA, bytes(pending[:_chunk_size]))
            del pending[:_chunk_size]
            index += 1

    for part in parts:
        message = part.SerializeToString()
        if len(message) > MAX_PART:
            raise invalid_field(
                "parts",
                f"a part of {len(message)} bytes exceeds the {MAX_PART} byte limit; "
                "send image data in chunks of at most 1 MiB",
                reason=ARCHIVE_PART_TOO_LARGE,
            )
        delimited = _varint(len(message)) + message
        plain_hash.update(delimited)
        plain_bytes += len(delimited)
        pending += compressor.compress(delimited)
        emit_full()
    pending += compressor.flush()
    emit_full()
    # flush always writes the zstd frame epilogue, so the last chunk is never empty
    frame(_FLAG_LAST, bytes(pending))
    index += 1
    frame(_FLAG_TRAILER, _TRAILER.pack(plain_hash.digest(), plain_bytes))
    return ArchiveSummary(
        chunks=index, plaintext_bytes=plain_bytes, file_bytes=dst.bytes, sha256=dst.sha256.hexdigest()
    )


# ------------------------------------------------------------------------------------------ reading


#: an archive file being written has this suffix until it is complete
PARTIAL_SUFFIX = ".partial"


def write_archive_file(
    out: Path, parts: Iterable[snapshot_pb2.SnapshotImagePart], *, passphrase: bytes | None = None, mode: int = 0o666
) -> ArchiveSummary:
    """
    Write ``parts`` as the archive file ``out``, all or nothing.

    The file is written as ``out.partial`` (created with ``mode``, less the umask), fsynced, then
    renamed over ``out``; on any error (or an interrupt) the partial file is removed and ``out`` is
    untouched.
    """
    partial = out.with_name(out.name + PARTIAL_SUFFIX)
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            summary = write_archive(f, parts, passphrase=passphrase)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return summary


class _Frames:
    """Reads frames, checks their flags and sizes before reading a body, opens them in order."""

    def __init__(self, src: _Input, header: _Header, cipher: _Cipher) -> None:
        self._src = src
        self._cipher = cipher
        self._full = header.chunk_size + cipher.overhead
        self._trailer_len = _TRAILER.size + cipher.overhead
        self.index = 0
        self.last_seen = False

    def _read(self) -> tuple[int, bytes] | None:
        start = self._src.offset
        head = self._src.read(_FRAME_HEADER.size)
        if not head:
            return None
        if len(head) < _FRAME_HEADER.size:
            raise _truncated(f"inside the header of the frame at byte {start}")
        flag, length = _FRAME_HEADER.unpack(head)
        if flag not in (_FLAG_DATA, _FLAG_LAST, _FLAG_TRAILER):
            raise _corrupt(f"unknown frame flag {flag} at byte {start}")
        if length > self._full:
            raise _corrupt(f"a frame of {length} bytes at byte {start}; at most {self._full}")
        body = self._src.read(length)
        if len(body) < length:
            raise _truncated(f"inside the frame at byte {start}")
        return flag, body

    def next_chunk(self) -> bytes:
        """The next data chunk's compressed bytes, authenticated; the caller stops after the last one."""
        got = self._read()
        if got is None:
            where = f"after chunk {self.index - 1}" if self.index else "before its first chunk"
            raise _truncated(f"{where}, before its last chunk and trailer")
        flag, body = got
        if flag == _FLAG_TRAILER:
            raise _corrupt(f"a trailer where chunk {self.index} belongs: chunks are missing")
        # every chunk but the last is full: one encoding per stream, and a cut-and-spliced file shows
        if (flag == _FLAG_DATA and len(body) != self._full) or (
            flag == _FLAG_LAST and not self._cipher.overhead < len(body) <= self._full
        ):
            raise _corrupt(f"chunk {self.index} has {len(body)} bytes")
        data = self._cipher.open(self.index, flag, body)
        self.index += 1
        self.last_seen = flag == _FLAG_LAST
        return data

    def trailer(self) -> tuple[bytes, int]:
        """The trailer's plaintext digest and length; then checks that nothing follows."""
        got = self._read()
        if got is None:
            raise _truncated("before its trailer")
        flag, body = got
        if flag != _FLAG_TRAILER:
            raise _corrupt(f"a data frame after the last chunk {self.index - 1}")
        if len(body) != self._trailer_len:
            raise _corrupt(f"a trailer of {len(body)} bytes")
        digest, length = _TRAILER.unpack(self._cipher.open(self.index, _FLAG_TRAILER, body))
        if self._src.read(1):
            raise _corrupt(f"data after the trailer at byte {self._src.offset - 1}")
        return digest, length


class _CompressedSource:
    """File-like view of the authenticated compressed bytes, for zstd's pull-based stream reader.

    zstd pulls from here, so a chunk is authenticated before any of its bytes are decompressed, and the
    decompressed output is read in bounded pieces (a 1 MiB chunk may expand to gigabytes).
    """

    def __init__(self, frames: _Frames) -> None:
        self._frames = frames
        self._buf = b""
        self._pos = 0

    def read(self, size: int = -1) -> bytes:
        while self._pos >= len(self._buf):
            if self._frames.last_seen:
                return b""
            self._buf, self._pos = self._frames.next_chunk(), 0
        end = len(self._buf) if size < 0 else self._pos + size
        data = self._buf[self._pos : end]
        self._pos += len(data)
        return data


def _dread(dec: zstandard.ZstdDecompressionReader, n: int) -> bytes:
    """Exactly ``n`` decompressed bytes, fewer only at the end of the stream."""
    pieces: list[bytes] = []
    left = n
    try:
        while left > 0:
            piece = dec.read(left)
            if not piece:
                break
            pieces.append(piece)
            left -= len(piece)
    except zstandard.ZstdError as e:
        raise _corrupt(f"zstd: {e}") from e
    return b"".join(pieces)


def _parts(src: _Input, header: _Header, cipher: _Cipher) -> Iterator[snapshot_pb2.SnapshotImagePart]:
    frames = _Frames(src, header, cipher)
    plain_hash = hashlib.sha256()
    plain_bytes = 0
    dctx = zstandard.ZstdDecompressor(max_window_size=MAX_ZSTD_WINDOW)
    # read_across_frames: bytes after the end of the zstd frame are decoded too, so garbage there fails
    # instead of being ignored
    # zstd only ever calls read() on its source
    source = cast("IO[bytes]", _CompressedSource(frames))
    with dctx.stream_reader(source, read_across_frames=True) as dec:
        while True:
            # the varint length prefix of the next message; a clean end of stream only before its first byte
            length = 0
            prefix = bytearray()
            while True:
                byte = _dread(dec, 1)
                if not byte:
                    if prefix:
                        raise _corrupt("the message stream ends inside a length prefix")
                    break
                prefix += byte
                length |= (byte[0] & 0x7F) << (7 * (len(prefix) - 1))
                if not byte[0] & 0x80:
                    break
                if len(prefix) >= 4:  # a 5th byte means at least 2**28: far over MAX_PART
                    raise _corrupt("a message length prefix is too long")
            if not prefix:
                break
            if length > MAX_PART:
                raise _corrupt(f"a message of {length} bytes; at most {MAX_PART}")
            message = _dread(dec, length)
            if len(message) < length:
                raise _corrupt("the message stream ends inside a message")
            plain_hash.update(prefix)
            plain_hash.update(message)
            plain_bytes += len(prefix) + length
            part = snapshot_pb2.SnapshotImagePart()
            try:
                part.ParseFromString(message)
            except DecodeError as e:
                raise _corrupt("a message is not a SnapshotImagePart") from e
            yield part
    if not frames.last_seen:  # zstd stopped early; should not happen, but the trailer must follow the last chunk
        raise _corrupt("the compressed stream ends before its last chunk")
    digest, length = frames.trailer()
    if length != plain_bytes or not hmac.compare_digest(digest, plain_hash.digest()):
        raise _corrupt("the trailer's digest or length does not match the content")


def read_archive(inp: BinaryIO, *, passphrase: bytes | None = None) -> Iterator[snapshot_pb2.SnapshotImagePart]:
    """Read an archive's parts, yielding each as soon as its bytes are authenticated and decompressed.

    The preamble and the passphrase are checked at once, before this returns (``ARCHIVE_NOT_SNAPSHOT``,
    ``ARCHIVE_TRUNCATED``, ``ARCHIVE_NEEDS_PASSPHRASE``, ``ARCHIVE_NOT_ENCRYPTED`` (a passphrase given for
    a plain archive is refused, so a user who expected encryption notices), ``ARCHIVE_WRONG_KEY``). The
    rest is checked while iterating; the trailer (digest and length of everything) only at the end.

    **The consumer must treat the whole import as failed if the iterator raises at any point**, including
    after the last part: parts already yielded are authentic (encrypted) or zstd-checked (plain), but the
    archive is only proven complete and in order once the iterator is exhausted without an error. Commit
    nothing before that.
    """
    _check_passphrase(passphrase)
    src = _Input(inp)
    header = _read_header(src)
    key: bytes | None = None
    if header.kdf is None:
        if passphrase is not None:
            raise _error(
                ARCHIVE_NOT_ENCRYPTED,
                "the archive is not encrypted but a passphrase was given; it was exported without --encrypt, "
                "import it without a passphrase",
            )
    else:
        if passphrase is None:
            raise _error(ARCHIVE_NEEDS_PASSPHRASE, "the archive is encrypted; give the passphrase it was exported with")
        kdf = header.kdf
        key, check = _derive(passphrase, salt=kdf.salt, n=kdf.n, r=kdf.r, p=kdf.p)
        if not hmac.compare_digest(check, kdf.check):
            raise _error(
                ARCHIVE_WRONG_KEY,
                "the passphrase does not open this archive; give the passphrase it was exported with "
                "(or the archive's key parameters are damaged)",
            )
    return _parts(src, header, _Cipher(key, header))


def archive_info(inp: BinaryIO) -> ArchivePreamble:
    """Read only the preamble: format, compression, whether a passphrase is needed. Reads at most 64 KiB."""
    header = _read_header(_Input(inp))
    return ArchivePreamble(format=FORMAT, encrypted=header.encrypted, compression="zstd")


def archive_vm_spec(first: snapshot_pb2.SnapshotImagePart) -> VmSpec:
    """The VM an archive (or an import stream) makes, from its first part, which must be the header."""
    if first.WhichOneof("part") != "header":
        raise invalid_field("part", "the first part of an archive must be its header")
    if not first.header.HasField("spec") or not first.header.spec.name:
        raise invalid_field("part.header.spec", "the header carries no VM spec")
    spec = spec_from_proto(first.header.spec)
    # checked here too, not only by the agent: an import refused there would have been placed first
    check_image_disks([d.name for d in first.header.disks], spec)
    return spec
