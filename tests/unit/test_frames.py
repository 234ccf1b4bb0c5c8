"""Frame layer: layout, tags, seq, limits, buffering, key files."""

from __future__ import annotations

import logging
import os
import random
import struct
from pathlib import Path

import pytest

from remus.errors import ConfigError
from remus.protocol.frames import (
    HEADER_SIZE,
    TAG_SIZE,
    FrameDecoder,
    FrameWriter,
    LocalProtocolError,
    RemoteProtocolError,
    derive_session_keys,
    encode_frame,
    load_key,
)

PSK = b"k" * 32
SESSION = b"s" * 32


def frame_bytes(payload: bytes, seq: int = 0, key: bytes = PSK, msg_type: int = 6) -> bytes:
    return b"".join(encode_frame(key, msg_type, seq, payload))


def decode_all(data: bytes, session_key: bytes | None = SESSION, **kw: int) -> list[bytes]:
    dec = FrameDecoder(PSK, **kw)
    dec.session_key = session_key
    dec.feed(data)
    out = []
    while (f := dec.next_frame()) is not None:
        out.append(f.payload)
    return out


def test_header_layout_matches_the_declared_table() -> None:
    data = frame_bytes(b"xyz", seq=0, msg_type=9)
    assert HEADER_SIZE == 20
    assert data[:4] == b"RMUS"
    assert struct.unpack("!BBHQI", data[4:20]) == (1, 9, 0, 0, 3)
    assert data[20:23] == b"xyz"
    assert len(data) == 20 + 3 + TAG_SIZE


def test_recorded_frame_still_decodes() -> None:
    # Golden bytes: a change of layout, key use or tag breaks compatibility.
    recorded = bytes.fromhex(
        "524d5553" "01" "06" "0000" "0000000000000000" "00000003" "616263"
        "ad4ca0b2caae690d8dea61792a9147e49a46de6a2581af9df5d60e59325764c3"
    )
    produced = frame_bytes(b"abc")
    assert produced == recorded
    assert decode_all(produced) == [b"abc"]


def test_round_trip_several_frames_in_one_feed() -> None:
    payloads = [b"", b"a", b"b" * 1000, os.urandom(70_000)]
    data = b"".join(frame_bytes(p, seq=i, key=PSK if i == 0 else SESSION)
                    for i, p in enumerate(payloads))
    assert decode_all(data) == payloads


def test_encode_does_not_copy_the_payload() -> None:
    big = bytearray(os.urandom(1 << 20))
    parts = encode_frame(PSK, 4, 0, [b"head", big])
    assert parts[2] is big
    assert decode_all(b"".join(parts)) == [b"head" + bytes(big)]


def test_every_flipped_bit_is_rejected() -> None:
    data = frame_bytes(b"payload!", seq=0)
    for i in range(len(data) * 8):
        bad = bytearray(data)
        bad[i // 8] ^= 1 << (i % 8)
        dec = FrameDecoder(PSK)
        dec.feed(bytes(bad))
        with pytest.raises(RemoteProtocolError):
            # A longer length field waits for bytes that never come: EOF.
            if dec.next_frame() is None:
                dec.feed(b"")
                dec.next_frame()


def test_wrong_key_rejected_with_hint() -> None:
    dec = FrameDecoder(b"w" * 32)
    dec.feed(frame_bytes(b"hello"))
    with pytest.raises(RemoteProtocolError, match="pre-shared key"):
        dec.next_frame()


def test_first_frame_uses_psk_later_frames_session_key() -> None:
    # seq 1 tagged with the PSK must not verify once the session key is in use.
    data = frame_bytes(b"a", seq=0) + frame_bytes(b"b", seq=1, key=PSK)
    with pytest.raises(RemoteProtocolError, match="bad tag on frame 1"):
        decode_all(data)


def test_frame_before_session_key_rejected() -> None:
    data = frame_bytes(b"a", seq=0) + frame_bytes(b"b", seq=1, key=SESSION)
    with pytest.raises(RemoteProtocolError, match="before the handshake"):
        decode_all(data, session_key=None)


@pytest.mark.parametrize("seqs", [[0, 1, 1], [0, 2], [0, 1, 3], [1], [0, 0], [0, 2, 1]])
def test_bad_sequence_rejected(seqs: list[int]) -> None:
    data = b"".join(frame_bytes(b"x", seq=s, key=PSK if i == 0 else SESSION)
                    for i, s in enumerate(seqs))
    with pytest.raises(RemoteProtocolError):
        decode_all(data)


def test_oversize_length_rejected_from_the_header_alone() -> None:
    dec = FrameDecoder(PSK, max_payload=1000)
    header = frame_bytes(b"y" * 1001)[:HEADER_SIZE]
    dec.feed(header)  # no payload byte has arrived
    with pytest.raises(RemoteProtocolError, match="exceeds max_payload"):
        dec.next_frame()
    assert decode_all(frame_bytes(b"y" * 1000), max_payload=1000) == [b"y" * 1000]


@pytest.mark.parametrize("offset,value", [(0, b"XMUS"), (4, b"\x02")])
def test_bad_magic_or_version_rejected(offset: int, value: bytes) -> None:
    data = bytearray(frame_bytes(b"z"))
    data[offset:offset + len(value)] = value
    with pytest.raises(RemoteProtocolError):
        decode_all(bytes(data))


def test_nonzero_flags_rejected_even_with_a_valid_tag() -> None:
    with pytest.raises(RemoteProtocolError, match="flags"):
        decode_all(b"".join(encode_frame(PSK, 1, 0, b"", flags=1)))


def test_truncated_frame_waits_then_eof_is_an_error() -> None:
    data = frame_bytes(b"abcdef")
    for cut in range(1, len(data)):
        dec = FrameDecoder(PSK)
        dec.feed(data[:cut])
        assert dec.next_frame() is None
        dec.feed(b"")
        with pytest.raises(RemoteProtocolError, match="inside a frame"):
            dec.next_frame()


def test_eof_at_a_frame_boundary_is_clean() -> None:
    dec = FrameDecoder(PSK)
    dec.feed(frame_bytes(b"q"))
    dec.feed(b"")
    frame = dec.next_frame()
    assert frame is not None and frame.payload == b"q"
    assert dec.next_frame() is None and dec.eof
    with pytest.raises(LocalProtocolError):
        dec.feed(b"more")


def test_decoder_refuses_use_after_an_error() -> None:
    dec = FrameDecoder(PSK)
    dec.feed(b"garbage that is long enough")
    with pytest.raises(RemoteProtocolError):
        dec.next_frame()
    with pytest.raises(LocalProtocolError):
        dec.next_frame()


def test_random_splits_give_the_same_frames() -> None:
    rng = random.Random(1234)
    payloads = [rng.randbytes(rng.choice([0, 1, 19, 20, 53, 4096, 100_000]))
                for _ in range(60)]
    stream = b"".join(frame_bytes(p, seq=i, key=PSK if i == 0 else SESSION)
                      for i, p in enumerate(payloads))
    for _ in range(20):
        dec = FrameDecoder(PSK)
        dec.session_key = SESSION
        got, pos = [], 0
        while pos < len(stream):
            step = rng.choice([1, 7, 20, 33, 1000, 65536, 300_000])
            dec.feed(stream[pos:pos + step])
            pos += step
            while (f := dec.next_frame()) is not None:
                got.append(f.payload)
        assert got == payloads
        assert dec.buffered == 0


def test_writer_numbers_frames_and_switches_keys() -> None:
    w = FrameWriter(PSK)
    first = b"".join(w.encode(1, b"a"))
    with pytest.raises(LocalProtocolError, match="session key"):
        w.encode(3, b"b")
    assert w.next_seq == 1  # a refused frame does not consume a seq
    w.session_key = SESSION
    second = b"".join(w.encode(3, b"b"))
    assert decode_all(first + second) == [b"a", b"b"]


def test_writer_refuses_oversize_payload() -> None:
    w = FrameWriter(PSK, max_payload=10)
    with pytest.raises(LocalProtocolError):
        w.encode(4, [b"123456", b"78901"])


def test_short_psk_refused() -> None:
    with pytest.raises(ConfigError):
        FrameDecoder(b"short")


def test_session_keys_depend_on_nonces_and_direction() -> None:
    a, b = os.urandom(16), os.urandom(16)
    p2b, b2p = derive_session_keys(PSK, a, b)
    assert p2b != b2p and len(p2b) == 32
    assert derive_session_keys(PSK, a, b) == (p2b, b2p)
    assert derive_session_keys(PSK, a, os.urandom(16))[0] != p2b
    assert derive_session_keys(PSK, b, a)[0] != p2b
    assert derive_session_keys(b"x" * 32, a, b)[0] != p2b


# -- key files ---------------------------------------------------------------
def _key_file(tmp_path: Path, content: bytes, mode: int = 0o600) -> Path:
    p = tmp_path / "key"
    p.write_bytes(content)
    p.chmod(mode)
    return p


def test_load_key_hex_and_raw(tmp_path: Path) -> None:
    key = os.urandom(32)
    assert load_key(_key_file(tmp_path, key.hex().encode() + b"\n")) == key
    assert load_key(_key_file(tmp_path, b"  a raw passphrase key \n")) == b"a raw passphrase key"


def test_load_key_too_short(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="at least 16"):
        load_key(_key_file(tmp_path, os.urandom(15).hex().encode()))  # 30 hex chars = 15 bytes


def test_load_key_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_key(tmp_path / "missing")


def test_load_key_world_readable_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="remus.protocol.frames"):
        assert load_key(_key_file(tmp_path, b"k" * 20, mode=0o644)) == b"k" * 20
    assert "world-readable" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="remus.protocol.frames"):
        load_key(_key_file(tmp_path, b"k" * 20, mode=0o600))
    assert "world-readable" not in caplog.text
