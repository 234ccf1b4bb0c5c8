"""TCP stream images (``tcp-stream-<inode>.img``) and their timestamp clock.

Facts checked against CRIU 4.2.1 (criu/sk-tcp.c dump_tcp_conn_state,
images/tcp-stream.proto, criu/include/magic.h): the image is IMG_COMMON
magic, TCP_STREAM magic, a u32 size and one ``tcp_stream_entry`` (varint
fields only), then the receive and send queue bytes. Field 9, ``timestamp``,
is the socket's TCP timestamp clock (TSval: milliseconds plus a per-socket
offset) when it was dumped; a restore sets the clock from it.

Why it matters: for an idle connection the timestamp is the only thing that
changes between two dumps, so a server with a thousand idle clients would
send and store a thousand new images every epoch for nothing. The primary
instead leaves an image whose only change is the timestamp where the backup
has it (``timestamp_only_change``), and the takeover moves every restored
clock forward by at least the age of its image (``advance_timestamps``):
the peer must never see a TSval older than one it saw (PAWS, RFC 7323,
drops such segments), and a clock that jumps forward is harmless.

Bundles (CRIU patch 0008, ``CRIU_REMUS_TCP_BUNDLE=1``): the dump writes every
stream to one file, ``remus-tcp-streams.raw`` (RAW_BUNDLE), a record per
connection: u32 inode, u32 length, then the bytes of the stock image file.
The primary turns it into the file the backup keeps, ``remus-tcp-streams.img``
(HELD_BUNDLE): a header (magic, version, the wall time it was built on the
primary, in ms) and per connection its inode, length, the primary's wall
time (ms) when that image was dumped, then the image. A carried image keeps
its old dump time, so the takeover still knows each clock's age: the age of
the held file on the backup plus (built - dumped), two differences on one
clock each. split_bundle() writes stock image files back before a restore.
"""

from __future__ import annotations

import os
import re
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from remus.checkpoint.images import IMG_COMMON_MAGIC
from remus.errors import CheckpointError

TCP_STREAM_MAGIC = 0x51465506
_HEAD = struct.Struct("<III")  # IMG_COMMON magic, TCP_STREAM magic, entry size
_MAGICS = struct.pack("<II", IMG_COMMON_MAGIC, TCP_STREAM_MAGIC)
_NAME_RE = re.compile(r"^tcp-stream-[0-9a-f]+\.img$")
TIMESTAMP_FIELD = 9

#: added to every advance: covers the time between a dump and the write of its
#: image on the backup (an apply backlog), and more
ADVANCE_MARGIN_MS = 60_000
#: TSvals compare modulo 2^32 as signed: a jump must stay below 2^31 ms (24.8
#: days); a connection idle for longer has no PAWS state left on the peer
MAX_ADVANCE_MS = (1 << 31) - 1 - ADVANCE_MARGIN_MS

Span = tuple[int, int]


def is_tcp_stream(name: str) -> bool:
    return _NAME_RE.match(name) is not None


def stream_name(ino: int) -> str:
    """CRIU's name of the image of the stream with socket inode ``ino``."""
    return f"tcp-stream-{ino:x}.img"


RAW_BUNDLE = "remus-tcp-streams.raw"
HELD_BUNDLE = "remus-tcp-streams.img"
_RAW_REC = struct.Struct("<II")  # inode, length
_HELD_HEAD = struct.Struct("<4sIQ")  # magic, version, built (ms)
_HELD_MAGIC = b"RTSB"
_HELD_REC = struct.Struct("<IIQ")  # inode, length, dumped (ms)


@dataclass(frozen=True)
class HeldStream:
    """One stream of a held bundle: its image and when the primary dumped it."""

    ino: int
    image: bytes
    dumped_ms: int


def _walk(data: bytes, pos: int, rec: struct.Struct, what: str) -> Iterator[tuple[tuple[int, ...],
                                                                                  bytes]]:
    """(header fields, body) of each record from ``pos`` on: a ``rec`` header whose
    first two fields are the inode and the body's length, then the body."""
    end = len(data)
    while pos < end:
        if end - pos < rec.size:
            raise CheckpointError(f"{what}: truncated record header at byte {pos}")
        fields = rec.unpack_from(data, pos)
        pos += rec.size
        if fields[1] > end - pos:
            raise CheckpointError(f"{what}: record of inode {fields[0]} runs past the end")
        yield fields, data[pos : pos + fields[1]]
        pos += fields[1]


def parse_raw_bundle(data: bytes) -> list[tuple[int, bytes]]:
    """(inode, image bytes) of every record of a CRIU bundle, in dump order."""
    return [(f[0], body) for f, body in _walk(data, 0, _RAW_REC, RAW_BUNDLE)]


def build_held(streams: list[HeldStream], built_ms: int) -> bytes:
    """The held bundle of ``streams`` (see module doc)."""
    parts = [_HELD_HEAD.pack(_HELD_MAGIC, 1, built_ms)]
    for st in streams:
        parts.append(_HELD_REC.pack(st.ino, len(st.image), st.dumped_ms))
        parts.append(st.image)
    return b"".join(parts)


def parse_held(data: bytes) -> tuple[int, list[HeldStream]]:
    """(built ms, streams) of a held bundle; CheckpointError if damaged."""
    if len(data) < _HELD_HEAD.size:
        raise CheckpointError(f"{HELD_BUNDLE}: {len(data)} bytes, too short")
    magic, version, built = _HELD_HEAD.unpack_from(data)
    if magic != _HELD_MAGIC or version != 1:
        raise CheckpointError(f"{HELD_BUNDLE}: not a held bundle (magic {magic!r}, "
                              f"version {version})")
    return built, [HeldStream(f[0], body, f[2])
                   for f, body in _walk(data, _HELD_HEAD.size, _HELD_REC, HELD_BUNDLE)]


def split_bundle(held: Path, out_dir: Path, now: float | None = None) -> list[Path]:
    """Write each stream of the held bundle ``held`` as a stock image file in
    ``out_dir``, its clock moved on by its age plus ADVANCE_MARGIN_MS (see
    advance_timestamps); the files written.

    The age: how long ago the backup wrote ``held`` (its mtime), plus how old
    the image already was when the primary built the bundle.
    """
    now = time.time() if now is None else now
    built, streams = parse_held(held.read_bytes())
    since_write_ms = max(0.0, now - os.stat(held).st_mtime) * 1000
    written = []
    for st in streams:
        data = st.image
        ts = read_timestamp(data)
        if ts is not None:
            age_ms = since_write_ms + max(0, built - st.dumped_ms)
            data = with_timestamp(data, ts + _jump(age_ms))
        path = out_dir / stream_name(st.ino)
        path.write_bytes(data)
        written.append(path)
    return written


def _jump(age_ms: float) -> int:
    return int(min(age_ms + ADVANCE_MARGIN_MS, MAX_ADVANCE_MS))


def _varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while pos < end and shift < 64:
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7
    raise ValueError("bad varint")


def timestamp_span(data: bytes) -> Span | None:
    """Byte span of the timestamp's varint value in an image; None if the image
    has none (no TCP timestamps on this connection) or is not one we know."""
    if len(data) < _HEAD.size or data[:8] != _MAGICS:
        return None
    end = _HEAD.size + _HEAD.unpack_from(data)[2]
    if end > len(data):
        return None
    pos = _HEAD.size
    try:
        while pos < end:
            key, pos = _varint(data, pos, end)
            if key & 7:
                return None  # not a varint field: not the entry we know
            start = pos
            _, pos = _varint(data, pos, end)
            if key >> 3 == TIMESTAMP_FIELD:
                return start, pos
    except ValueError:
        return None
    return None


def timestamp_only_change(old: bytes, new: bytes, span: Span | None) -> Span | None:
    """If ``new`` differs from ``old`` at most in the timestamp's value, its span
    in ``new`` (equal to old's); else None. ``span``: old's span if known (from
    the last call), saving the parse of ``old``."""
    if len(old) != len(new):
        return None
    if span is None:
        span = timestamp_span(old)
        if span is None:
            return None
    s, e = span
    if old[:s] != new[:s] or old[e:] != new[e:]:
        return None
    # The same bytes around it, and a varint of the same length in new:
    # continuation bits on all but its last byte.
    if new[e - 1] >= 0x80 or any(b < 0x80 for b in new[s : e - 1]):
        return None
    return span


def with_timestamp(data: bytes, value: int) -> bytes:
    """The image with its timestamp set to ``value`` (mod 2^32)."""
    span = timestamp_span(data)
    if span is None:
        return data
    s, e = span
    v = value & 0xFFFFFFFF
    enc = bytearray()
    while v >= 0x80:
        enc.append((v & 0x7F) | 0x80)
        v >>= 7
    enc.append(v)
    size = _HEAD.unpack_from(data)[2] + len(enc) - (e - s)
    return data[:8] + struct.pack("<I", size) + data[_HEAD.size : s] + bytes(enc) + data[e:]


def read_timestamp(data: bytes) -> int | None:
    span = timestamp_span(data)
    return None if span is None else _varint(data, span[0], span[1])[0]


def advance_timestamps(images_dir: Path, ages_from: Path | None = None,
                       now: float | None = None) -> int:
    """Move the clock of every TCP stream image in ``images_dir`` forward by the
    age of its image plus ADVANCE_MARGIN_MS; the number changed.

    The age is taken from the mtime of the same-named file in ``ages_from``
    (the committed store the images were copied from), else in images_dir:
    the time the backup wrote it, no earlier than the dump it came from.
    """
    now = time.time() if now is None else now
    changed = 0
    for p in images_dir.glob("tcp-stream-*.img"):
        src = (ages_from / p.name) if ages_from is not None else p
        try:
            age_ms = max(0.0, now - os.stat(src).st_mtime) * 1000
        except FileNotFoundError:
            age_ms = 0.0
        data = p.read_bytes()
        ts = read_timestamp(data)
        if ts is None:
            continue
        tmp = p.with_suffix(".tmp")
        tmp.write_bytes(with_timestamp(data, ts + _jump(age_ms)))
        os.replace(tmp, p)
        changed += 1
    return changed
