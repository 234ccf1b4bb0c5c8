"""Frame layer of the replication protocol: header, payload, HMAC tag, keys.

Pure code: bytes in, frames out (and back). No sockets, no clocks.

Wire layout of one frame (integers big-endian; the header is the struct
built from HEADER_LAYOUT below, ``!4sBBHQI``, 20 bytes)::

    offset  size  field    meaning
    ------  ----  -------  ----------------------------------------------
    0       4     magic    b"RMUS"
    4       1     version  FRAME_VERSION (1)
    5       1     type     message type code (remus.protocol.messages)
    6       2     flags    0 (reserved: anything else is rejected)
    8       8     seq      0, 1, 2, ... counted per direction of a connection
    16      4     length   payload length n, at most max_payload
    20      n     payload  message body (remus.protocol.messages)
    20+n    32    tag      HMAC-SHA256(key, header || payload)

Keys: the first frame of each direction (seq 0: HELLO, WELCOME, or an ERROR
refusing the connection) is tagged with the pre-shared key (PSK). Every later
frame is tagged with a per-direction session key derived from the PSK and
both sides' nonces (derive_session_keys), so a recorded session cannot be
replayed against a new connection and a frame reflected back to its sender
does not verify. The key is chosen by the seq the receiver *expects*, never
by the seq an attacker wrote into the header.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import stat
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from remus.errors import ConfigError, ProtocolError

log = logging.getLogger(__name__)

Buffer = bytes | bytearray | memoryview


class LocalProtocolError(ProtocolError):
    """We misused the protocol (e.g. sent a message not allowed in this state).

    Nothing was encoded and the connection's state is unchanged.
    """


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol (bad tag, bad seq, illegal message...).

    The connection that raised it is in state ERROR and refuses further use.
    """


MAGIC = b"RMUS"
FRAME_VERSION = 1

# (field, struct format) in wire order; the header struct is built from it.
HEADER_LAYOUT: tuple[tuple[str, str], ...] = (
    ("magic", "4s"),
    ("version", "B"),
    ("type", "B"),
    ("flags", "H"),
    ("seq", "Q"),
    ("length", "I"),
)
HEADER = struct.Struct("!" + "".join(fmt for _, fmt in HEADER_LAYOUT))
HEADER_SIZE = HEADER.size
TAG_SIZE = hashlib.sha256().digest_size
DEFAULT_MAX_PAYLOAD = 64 * 1024 * 1024
MAX_LENGTH_FIELD = 0xFFFF_FFFF

MIN_KEY_SIZE = 16
NONCE_SIZE = 16
SESSION_LABEL = b"remus-session-v1"
PRIMARY_TO_BACKUP = b"\x01"
BACKUP_TO_PRIMARY = b"\x02"

# Compact the receive buffer only when this much has been consumed, so that
# many small frames do not each pay for a memmove of what follows them.
_COMPACT_AT = 1 << 20


@dataclass(frozen=True, slots=True)
class Frame:
    """One authenticated, in-sequence frame."""

    msg_type: int
    flags: int
    seq: int
    payload: bytes


def nbytes(buf: Buffer) -> int:
    """Size in bytes (len() of a memoryview counts items, not bytes)."""
    return buf.nbytes if isinstance(buf, memoryview) else len(buf)


def check_key(key: bytes) -> None:
    """Raise ConfigError unless key is usable as a PSK."""
    if not isinstance(key, bytes | bytearray) or len(key) < MIN_KEY_SIZE:
        raise ConfigError(f"the pre-shared key must be at least {MIN_KEY_SIZE} bytes")


def load_key(path: str | os.PathLike[str]) -> bytes:
    """Read a PSK file: raw bytes or hex text, surrounding whitespace stripped.

    Content that is entirely an even number of hex digits is decoded as hex;
    anything else is taken as raw bytes. Raises ConfigError if the file cannot
    be read or the key is shorter than MIN_KEY_SIZE bytes. A world-readable
    file only logs a warning.
    """
    p = Path(path)
    try:
        mode = p.stat().st_mode
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read key file {p}: {e.strerror or e}") from e
    if mode & stat.S_IROTH:
        log.warning("key file %s is world-readable; anyone on this host can forge "
                    "checkpoints (chmod 600 it)", p)
    text = raw.strip()
    key = bytes.fromhex(text.decode("ascii")) if re.fullmatch(rb"(?:[0-9a-fA-F]{2})+", text) \
        else text
    if len(key) < MIN_KEY_SIZE:
        raise ConfigError(f"key file {p} holds {len(key)} bytes; at least {MIN_KEY_SIZE} needed")
    return key


def derive_session_keys(psk: bytes, nonce_primary: bytes,
                        nonce_backup: bytes) -> tuple[bytes, bytes]:
    """(primary->backup key, backup->primary key) for one connection.

    session = HMAC-SHA256(psk, SESSION_LABEL + nonce_primary + nonce_backup);
    each direction's key is HMAC-SHA256(session, direction byte).
    """
    session = hmac.new(psk, SESSION_LABEL + nonce_primary + nonce_backup, hashlib.sha256).digest()
    p2b = hmac.new(session, PRIMARY_TO_BACKUP, hashlib.sha256).digest()
    b2p = hmac.new(session, BACKUP_TO_PRIMARY, hashlib.sha256).digest()
    return p2b, b2p


def encode_frame(key: bytes, msg_type: int, seq: int, payload: Buffer | Sequence[Buffer],
                 flags: int = 0) -> list[Buffer]:
    """Frame a payload given as one buffer or several (concatenated on the wire).

    Returns [header, *payload parts, tag]: the payload is not copied, so the
    caller must not modify it until the buffers are written. Raises
    LocalProtocolError for fields out of range.
    """
    parts: list[Buffer] = [payload] if isinstance(payload, bytes | bytearray | memoryview) \
        else list(payload)
    length = sum(nbytes(p) for p in parts)
    try:
        header = HEADER.pack(MAGIC, FRAME_VERSION, msg_type, flags, seq, length)
    except struct.error as e:
        raise LocalProtocolError(f"cannot encode frame header: {e}") from e
    mac = hmac.new(key, header, hashlib.sha256)
    for p in parts:
        mac.update(p)
    return [header, *parts, mac.digest()]


class FrameWriter:
    """Numbers and tags the frames of one direction (single writer)."""

    def __init__(self, psk: bytes, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        check_key(psk)
        self._psk = bytes(psk)
        self.max_payload = max_payload
        self.session_key: bytes | None = None
        self.next_seq = 0

    def encode(self, msg_type: int, payload: Buffer | Sequence[Buffer]) -> list[Buffer]:
        """Frame the next message; the seq advances only if encoding succeeds."""
        key = self._psk if self.next_seq == 0 else self.session_key
        if key is None:
            raise LocalProtocolError("no session key yet: only the first frame can be sent "
                                     "before the handshake completes")
        size = nbytes(payload) if isinstance(payload, bytes | bytearray | memoryview) \
            else sum(nbytes(p) for p in payload)
        if size > self.max_payload:
            raise LocalProtocolError(f"payload of {size} bytes exceeds max_payload "
                                     f"{self.max_payload}")
        frame = encode_frame(key, msg_type, self.next_seq, payload)
        self.next_seq += 1
        return frame


class FrameDecoder:
    """Splits a byte stream into authenticated, in-sequence frames.

    feed() appends received bytes (b"" means EOF); next_frame() returns the
    next complete frame or None. Header checks (magic, version, length bound)
    happen as soon as the 20 header bytes are there, before any payload is
    buffered. A bad tag, a seq other than the expected one, non-zero flags or
    EOF inside a frame raise RemoteProtocolError, after which the decoder
    refuses further use.
    """

    def __init__(self, psk: bytes, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        check_key(psk)
        self._psk = bytes(psk)
        self.max_payload = max_payload
        self.session_key: bytes | None = None
        self.expected_seq = 0
        self._buf = bytearray()
        self._pos = 0  # start of unconsumed bytes in _buf
        self._eof = False
        self._failed: str | None = None

    @property
    def eof(self) -> bool:
        """The peer closed its side (feed(b"") was called)."""
        return self._eof

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return len(self._buf) - self._pos

    def feed(self, data: Buffer) -> None:
        if self._eof:
            raise LocalProtocolError("data received after EOF")
        if not nbytes(data):
            self._eof = True
            return
        if self._pos == len(self._buf):
            # Everything was consumed: restart at the front (no memmove).
            del self._buf[:]
            self._pos = 0
        self._buf += data

    def next_frame(self) -> Frame | None:
        if self._failed is not None:
            raise LocalProtocolError(f"frame decoder failed earlier: {self._failed}")
        try:
            return self._next_frame()
        except RemoteProtocolError as e:
            self._failed = str(e)
            raise

    def _next_frame(self) -> Frame | None:
        avail = len(self._buf) - self._pos
        if avail < HEADER_SIZE:
            self._check_eof(avail)
            return None
        magic, version, msg_type, flags, seq, length = HEADER.unpack_from(self._buf, self._pos)
        if magic != MAGIC:
            raise RemoteProtocolError(f"bad frame magic {magic!r} (not a remus peer?)")
        if version != FRAME_VERSION:
            raise RemoteProtocolError(f"unsupported frame version {version}")
        if length > self.max_payload:
            raise RemoteProtocolError(f"frame payload of {length} bytes exceeds max_payload "
                                      f"{self.max_payload}")
        total = HEADER_SIZE + length + TAG_SIZE
        if avail < total:
            self._check_eof(avail)
            return None
        start, body_end = self._pos, self._pos + HEADER_SIZE + length
        key = self._key()
        with memoryview(self._buf) as mv:
            tag = hmac.new(key, mv[start:body_end], hashlib.sha256).digest()
            good = hmac.compare_digest(tag, bytes(mv[body_end:body_end + TAG_SIZE]))
            payload = bytes(mv[start + HEADER_SIZE:body_end]) if good else b""
        if not good:
            hint = " (wrong pre-shared key?)" if self.expected_seq == 0 else ""
            raise RemoteProtocolError(f"bad tag on frame {self.expected_seq}{hint}")
        if seq != self.expected_seq:
            raise RemoteProtocolError(f"frame seq {seq}, expected {self.expected_seq} "
                                      "(replayed, reordered or lost frame)")
        if flags:
            raise RemoteProtocolError(f"unknown frame flags {flags:#x}")
        self._consume(total)
        self.expected_seq += 1
        return Frame(msg_type, flags, seq, payload)

    def _key(self) -> bytes:
        if self.expected_seq == 0:
            return self._psk
        if self.session_key is None:
            raise RemoteProtocolError(f"frame {self.expected_seq} arrived before the handshake "
                                      "completed")
        return self.session_key

    def _consume(self, n: int) -> None:
        self._pos += n
        if self._pos == len(self._buf) or self._pos >= _COMPACT_AT:
            del self._buf[:self._pos]
            self._pos = 0

    def _check_eof(self, avail: int) -> None:
        if self._eof and avail:
            raise RemoteProtocolError(f"connection closed inside a frame ({avail} bytes of it "
                                      "received)")
