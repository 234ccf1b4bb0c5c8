"""Frame layer of the replication protocol: header, sealed payload, keys.

Pure code: bytes in, frames out (and back). No sockets, no clocks.

Every frame is sealed with AES-256-GCM (an AEAD): the payload is encrypted
and the header is authenticated with it, so the stream is confidential (a
checkpoint carries the service's whole memory) and cannot be forged,
replayed or reordered. Wire layout of one frame (integers big-endian; the
header is the struct built from HEADER_LAYOUT below, ``!4sBBHQI``, 20 bytes)::

    offset  size  field    meaning
    ------  ----  -------  ----------------------------------------------
    0       4     magic    b"RMUS"
    4       1     version  FRAME_VERSION (2)
    5       1     type     message type code (remus.protocol.messages)
    6       2     flags    0 (reserved: anything else is rejected)
    8       8     seq      0, 1, 2, ... counted per direction of a connection
    16      4     length   n, the length of the body
    20      n     body     the sealed payload (seq 0: a 12-byte random nonce first)
    20+n    16    tag      the GCM tag over header (associated data) and body

Keys: the first frame of each direction (seq 0: HELLO, WELCOME, or an ERROR
refusing the connection) is sealed with a key derived from the pre-shared key
(PSK) and a random nonce carried in the frame. The HELLO and the WELCOME carry
each side's ephemeral X25519 public key; every later frame is sealed with a
per-direction session key derived (HKDF-SHA256, salted with the PSK) from the
X25519 shared secret and both public keys, with the frame's seq as its nonce.
So a session key is never used twice across connections (a nonce never
repeats under one key), a recorded session cannot be replayed against a new
connection, a frame reflected back to its sender does not open, and a PSK
stolen later does not open a recorded session (forward secrecy). The key is
chosen by the seq the receiver *expects*, never by the seq an attacker wrote
into the header.

A receiver accepts the first frame under any key of its key ring (a key
rotation: remus.protocol.keys); the connection then lives on the key that
opened it.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from remus.errors import ConfigError, ProtocolError

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
FRAME_VERSION = 2  # 2: AES-256-GCM sealed frames, X25519 session keys (1: HMAC tags)

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
TAG_SIZE = 16                    # the GCM tag
FIRST_NONCE_SIZE = 12            # the random nonce of a seq-0 frame
DEFAULT_MAX_PAYLOAD = 64 * 1024 * 1024
MAX_LENGTH_FIELD = 0xFFFF_FFFF

MIN_KEY_SIZE = 16
NONCE_SIZE = 32                  # a connection's "nonce" is its X25519 public key
FIRST_FRAME_LABEL = b"remus-first-frame-v2"
SESSION_LABEL = b"remus-session-v2"

# Compact the receive buffer only when this much has been consumed, so that
# many small frames do not each pay for a memmove of what follows them.
_COMPACT_AT = 1 << 20


@dataclass(frozen=True, slots=True)
class Frame:
    """One authenticated, in-sequence, opened frame."""

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


def key_list(psk: bytes | Sequence[bytes]) -> tuple[bytes, ...]:
    """One PSK or a ring of them (the first seals, all open) as a checked tuple."""
    keys = (bytes(psk),) if isinstance(psk, bytes | bytearray) else tuple(bytes(k) for k in psk)
    if not keys:
        raise ConfigError("no pre-shared key")
    for k in keys:
        check_key(k)
    return keys


def first_frame_key(psk: bytes) -> bytes:
    """The AES key that seals seq-0 frames under psk."""
    return HKDF(hashes.SHA256(), 32, salt=None, info=FIRST_FRAME_LABEL).derive(psk)


def new_kex_key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def kex_public(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes_raw()


def kex_shared(private: X25519PrivateKey, peer_public: bytes) -> bytes:
    """The X25519 shared secret; RemoteProtocolError for a malformed or
    low-order peer key (which would give an all-zero secret)."""
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(bytes(peer_public)))
    except ValueError as e:
        raise RemoteProtocolError(f"unusable key-exchange value from the peer: {e}") from e


def derive_session_keys(psk: bytes, shared: bytes, public_primary: bytes,
                        public_backup: bytes) -> tuple[bytes, bytes]:
    """(primary->backup key, backup->primary key) for one connection.

    HKDF-SHA256 of the X25519 shared secret, salted with the PSK (only PSK
    holders get the keys: the handshake is authenticated) and bound to both
    public keys; 64 bytes split into the two directions' AES-256 keys.
    """
    okm = HKDF(hashes.SHA256(), 64, salt=psk,
               info=SESSION_LABEL + public_primary + public_backup).derive(shared)
    return okm[:32], okm[32:]


def _seq_nonce(seq: int) -> bytes:
    return b"\0\0\0\0" + seq.to_bytes(8, "big")


# Above this many payload bytes a frame is sealed part by part with GCM's
# incremental interface: joining a large payload first (and allocating its
# copy) cost 6x the cipher itself (bench/protocol_bench.py); below it the
# one-shot AEAD call is cheaper (0.7 vs 6 us).
_STREAM_AT = 16 << 10


class Sealer:
    """AES-256-GCM under one key: one-shot for small payloads, incremental for big."""

    __slots__ = ("_key", "_aead")

    def __init__(self, key: bytes) -> None:
        self._key = bytes(key)
        self._aead = AESGCM(self._key)

    def seal(self, nonce: bytes, parts: Sequence[Buffer], size: int, aad: bytes) -> list[Buffer]:
        """[ciphertext..., tag] of the concatenated parts."""
        if size < _STREAM_AT:
            plain = parts[0] if len(parts) == 1 else b"".join(parts)
            return [self._aead.encrypt(nonce, plain, aad)]
        enc = Cipher(algorithms.AES(self._key), modes.GCM(nonce)).encryptor()
        enc.authenticate_additional_data(aad)
        out: list[Buffer] = [enc.update(p) for p in parts if nbytes(p)]
        enc.finalize()
        out.append(enc.tag)
        return out

    def open(self, nonce: bytes, sealed: Buffer, aad: bytes) -> bytes:
        """The plaintext; InvalidTag if anything was changed."""
        return self._aead.decrypt(nonce, sealed, aad)


def seal_frame(sealer: Sealer, msg_type: int, seq: int, payload: Buffer | Sequence[Buffer],
               flags: int = 0) -> list[Buffer]:
    """Frame and seal a payload given as one buffer or several (concatenated).

    seq 0 gets a random nonce carried in the body; later frames use their seq
    (the caller guarantees one key per direction of one connection). Returns
    [header, (nonce,) ciphertext..., tag]. Raises LocalProtocolError for
    fields out of range.
    """
    parts: list[Buffer] = [payload] if isinstance(payload, bytes | bytearray | memoryview) \
        else list(payload)
    size = sum(nbytes(p) for p in parts)
    first = seq == 0
    try:
        header = HEADER.pack(MAGIC, FRAME_VERSION, msg_type, flags, seq,
                             size + (FIRST_NONCE_SIZE if first else 0))
    except struct.error as e:
        raise LocalProtocolError(f"cannot encode frame header: {e}") from e
    nonce = os.urandom(FIRST_NONCE_SIZE) if first else _seq_nonce(seq)
    sealed = sealer.seal(nonce, parts or [b""], size, header)
    return [header, nonce, *sealed] if first else [header, *sealed]


def encode_frame(key: bytes, msg_type: int, seq: int, payload: Buffer | Sequence[Buffer],
                 flags: int = 0) -> list[Buffer]:
    """seal_frame with a raw key: for seq 0 the PSK, later the direction's
    session key (tests and tools; the writer keeps its sealer)."""
    return seal_frame(Sealer(first_frame_key(key) if seq == 0 else key), msg_type, seq,
                      payload, flags)


class FrameWriter:
    """Numbers and seals the frames of one direction (single writer)."""

    def __init__(self, psk: bytes, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        check_key(psk)
        self.max_payload = max_payload
        self._first = Sealer(first_frame_key(psk))
        self._session: Sealer | None = None
        self.next_seq = 0

    def use_psk(self, psk: bytes) -> None:
        """Seal the first frame with psk instead (the key the peer's first frame used)."""
        check_key(psk)
        self._first = Sealer(first_frame_key(psk))

    def set_session_key(self, key: bytes | None) -> None:
        """Seal every frame after the first with `key` (None: none yet). Only the
        cipher keeps it; it cannot be read back."""
        self._session = None if key is None else Sealer(key)

    def encode(self, msg_type: int, payload: Buffer | Sequence[Buffer]) -> list[Buffer]:
        """Frame the next message; the seq advances only if encoding succeeds."""
        sealer = self._first if self.next_seq == 0 else self._session
        if sealer is None:
            raise LocalProtocolError("no session key yet: only the first frame can be sent "
                                     "before the handshake completes")
        size = nbytes(payload) if isinstance(payload, bytes | bytearray | memoryview) \
            else sum(nbytes(p) for p in payload)
        if size > self.max_payload:
            raise LocalProtocolError(f"payload of {size} bytes exceeds max_payload "
                                     f"{self.max_payload}")
        frame = seal_frame(sealer, msg_type, self.next_seq, payload)
        self.next_seq += 1
        return frame


class FrameDecoder:
    """Splits a byte stream into opened, authenticated, in-sequence frames.

    feed() appends received bytes (b"" means EOF); next_frame() returns the
    next complete frame or None. Header checks (magic, version, length bound)
    happen as soon as the 20 header bytes are there, before any payload is
    buffered, so an oversized frame never makes us allocate. A frame that does
    not open (wrong key, any flipped bit), a seq other than the expected one,
    non-zero flags or EOF inside a frame raise RemoteProtocolError, after
    which the decoder refuses further use. The first frame opens under any
    key of the ring; `matched_psk` is the one that opened it.
    """

    def __init__(self, psk: bytes | Sequence[bytes],
                 max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        self._psks = key_list(psk)
        self._firsts: list[Sealer] | None = None  # built on the first frame
        self.matched_psk: bytes | None = None
        self.max_payload = max_payload
        self._session: Sealer | None = None
        self.expected_seq = 0
        self._buf = bytearray()
        self._pos = 0  # start of unconsumed bytes in _buf
        self._eof = False
        self._failed: str | None = None

    def set_session_key(self, key: bytes | None) -> None:
        """Open every frame after the first with `key` (None: none yet)."""
        self._session = None if key is None else Sealer(key)

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
            raise RemoteProtocolError(
                f"unsupported frame version {version} (this side speaks {FRAME_VERSION}: "
                "run the same remus version on both hosts)")
        first = self.expected_seq == 0
        extra = FIRST_NONCE_SIZE if first else 0
        if length > self.max_payload + extra:
            raise RemoteProtocolError(f"frame payload of {length} bytes exceeds max_payload "
                                      f"{self.max_payload}")
        if length < extra:
            raise RemoteProtocolError(f"first frame of {length} bytes is shorter than its nonce")
        total = HEADER_SIZE + length + TAG_SIZE
        if avail < total:
            self._check_eof(avail)
            return None
        start = self._pos
        with memoryview(self._buf) as mv:
            header = bytes(mv[start:start + HEADER_SIZE])
            body = mv[start + HEADER_SIZE + extra:start + total]
            if first:
                payload = self._open_first(bytes(mv[start + HEADER_SIZE:start + HEADER_SIZE
                                                    + extra]), body, header)
            else:
                payload = self._open(body, header)
            body.release()
        if seq != self.expected_seq:
            raise RemoteProtocolError(f"frame seq {seq}, expected {self.expected_seq} "
                                      "(replayed, reordered or lost frame)")
        if flags:
            raise RemoteProtocolError(f"unknown frame flags {flags:#x}")
        self._consume(total)
        self.expected_seq += 1
        return Frame(msg_type, flags, seq, payload)

    def _open_first(self, nonce: bytes, body: memoryview, header: bytes) -> bytes:
        if self._firsts is None:
            self._firsts = [Sealer(first_frame_key(k)) for k in self._psks]
        for psk, sealer in zip(self._psks, self._firsts, strict=True):
            try:
                payload = sealer.open(nonce, body, header)
            except InvalidTag:
                continue
            self.matched_psk = psk
            return payload
        raise RemoteProtocolError("frame 0 does not open under our key (wrong pre-shared key?)")

    def _open(self, body: memoryview, header: bytes) -> bytes:
        if self._session is None:
            raise RemoteProtocolError(f"frame {self.expected_seq} arrived before the handshake "
                                      "completed")
        try:
            return self._session.open(_seq_nonce(self.expected_seq), body, header)
        except InvalidTag:
            raise RemoteProtocolError(f"bad tag on frame {self.expected_seq} (forged, corrupted "
                                      "or replayed from another connection)") from None

    def _consume(self, n: int) -> None:
        self._pos += n
        if self._pos == len(self._buf) or self._pos >= _COMPACT_AT:
            del self._buf[:self._pos]
            self._pos = 0

    def _check_eof(self, avail: int) -> None:
        if self._eof and avail:
            raise RemoteProtocolError(f"connection closed inside a frame ({avail} bytes of it "
                                      "received)")
