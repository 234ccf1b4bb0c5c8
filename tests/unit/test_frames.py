"""Frame layer: layout, sealing (AES-256-GCM), seq, limits, buffering, session keys."""

from __future__ import annotations

import os
import random
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from remus.errors import ConfigError
from remus.protocol.frames import (
    FIRST_NONCE_SIZE,
    HEADER_SIZE,
    TAG_SIZE,
    FrameDecoder,
    FrameWriter,
    LocalProtocolError,
    RemoteProtocolError,
    derive_session_keys,
    encode_frame,
    kex_public,
    kex_shared,
    new_kex_key,
)

PSK = b"k" * 32
SESSION = b"s" * 32


def frame_bytes(payload: bytes, seq: int = 0, key: bytes = PSK, msg_type: int = 6) -> bytes:
    return b"".join(encode_frame(key, msg_type, seq, payload))


def decode_all(data: bytes, session_key: bytes | None = SESSION, **kw: int) -> list[bytes]:
    dec = FrameDecoder(PSK, **kw)
    dec.set_session_key(session_key)
    dec.feed(data)
    out = []
    while (f := dec.next_frame()) is not None:
        out.append(f.payload)
    return out


def test_header_layout_matches_the_declared_table() -> None:
    first = frame_bytes(b"xyz", seq=0, msg_type=9)
    assert HEADER_SIZE == 20 and TAG_SIZE == 16
    assert first[:4] == b"RMUS"
    # seq 0: the body starts with the frame's random nonce.
    assert struct.unpack("!BBHQI", first[4:20]) == (2, 9, 0, 0, FIRST_NONCE_SIZE + 3)
    assert len(first) == 20 + FIRST_NONCE_SIZE + 3 + TAG_SIZE
    later = frame_bytes(b"xyz", seq=1, key=SESSION, msg_type=9)
    assert struct.unpack("!BBHQI", later[4:20]) == (2, 9, 0, 1, 3)
    assert len(later) == 20 + 3 + TAG_SIZE


def test_session_frame_is_aes_gcm_with_the_seq_as_nonce() -> None:
    # Built by hand from the primitive: a change of layout, nonce or
    # associated data breaks compatibility and this test.
    header = bytes.fromhex("524d5553" "02" "06" "0000" "0000000000000007" "00000003")
    nonce = bytes(4) + (7).to_bytes(8, "big")
    by_hand = header + AESGCM(SESSION).encrypt(nonce, b"abc", header)
    assert frame_bytes(b"abc", seq=7, key=SESSION) == by_hand
    dec = FrameDecoder(PSK)
    dec.expected_seq = 7
    dec.set_session_key(SESSION)
    dec.feed(by_hand)
    frame = dec.next_frame()
    assert frame is not None and frame.payload == b"abc"


def test_the_payload_is_not_on_the_wire() -> None:
    secret = b"password=hunter2 " * 100
    for seq, key in ((0, PSK), (1, SESSION)):
        data = frame_bytes(secret, seq=seq, key=key)
        assert b"hunter2" not in data
    # seq 0 has a random nonce: the same frame never repeats on the wire.
    assert frame_bytes(secret) != frame_bytes(secret)
    assert decode_all(frame_bytes(secret)) == [secret]


def test_round_trip_several_frames_in_one_feed() -> None:
    payloads = [b"", b"a", b"b" * 1000, os.urandom(70_000)]
    data = b"".join(frame_bytes(p, seq=i, key=PSK if i == 0 else SESSION)
                    for i, p in enumerate(payloads))
    assert decode_all(data) == payloads


def test_payload_in_several_parts() -> None:
    big = bytearray(os.urandom(1 << 20))
    parts = encode_frame(PSK, 4, 0, [b"head", memoryview(big)])
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
    # seq 1 sealed with the PSK must not open once the session key is in use.
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


@pytest.mark.parametrize("offset,value,says", [(0, b"XMUS", "magic"),
                                               (4, b"\x01", "same remus version")])
def test_bad_magic_or_version_rejected(offset: int, value: bytes, says: str) -> None:
    data = bytearray(frame_bytes(b"z"))
    data[offset:offset + len(value)] = value
    with pytest.raises(RemoteProtocolError, match=says):
        decode_all(bytes(data))


def test_first_frame_shorter_than_its_nonce_rejected() -> None:
    data = bytearray(frame_bytes(b""))
    struct.pack_into("!I", data, 16, FIRST_NONCE_SIZE - 1)
    with pytest.raises(RemoteProtocolError, match="shorter than its nonce"):
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
        dec.set_session_key(SESSION)
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
    w.set_session_key(SESSION)
    second = b"".join(w.encode(3, b"b"))
    assert decode_all(first + second) == [b"a", b"b"]


def test_writer_refuses_oversize_payload() -> None:
    w = FrameWriter(PSK, max_payload=10)
    with pytest.raises(LocalProtocolError):
        w.encode(4, [b"123456", b"78901"])


def test_short_psk_refused() -> None:
    with pytest.raises(ConfigError):
        FrameDecoder(b"short")


def test_session_keys_depend_on_the_exchange_the_psk_and_direction() -> None:
    a, b = new_kex_key(), new_kex_key()
    pa, pb = kex_public(a), kex_public(b)
    shared = kex_shared(a, pb)
    assert kex_shared(b, pa) == shared  # both ends agree
    p2b, b2p = derive_session_keys(PSK, shared, pa, pb)
    assert p2b != b2p and len(p2b) == 32
    assert derive_session_keys(PSK, shared, pa, pb) == (p2b, b2p)
    assert derive_session_keys(PSK, kex_shared(a, kex_public(new_kex_key())), pa, pb)[0] != p2b
    assert derive_session_keys(PSK, shared, pb, pa)[0] != p2b
    assert derive_session_keys(b"x" * 32, shared, pa, pb)[0] != p2b


def test_a_low_order_peer_key_is_refused() -> None:
    with pytest.raises(RemoteProtocolError, match="key-exchange"):
        kex_shared(new_kex_key(), bytes(32))  # all-zero shared secret


# -- key rings -----------------------------------------------------------------
def test_first_frame_opens_under_any_key_of_the_ring() -> None:
    old, new = b"o" * 32, b"n" * 32
    for sender in (old, new):
        dec = FrameDecoder([new, old])
        dec.feed(frame_bytes(b"hi", key=sender))
        frame = dec.next_frame()
        assert frame is not None and frame.payload == b"hi"
        assert dec.matched_psk == sender
    dec = FrameDecoder([new, old])
    dec.feed(frame_bytes(b"hi", key=b"x" * 32))
    with pytest.raises(RemoteProtocolError, match="pre-shared key"):
        dec.next_frame()


def test_empty_ring_refused() -> None:
    with pytest.raises(ConfigError, match="no pre-shared key"):
        FrameDecoder([])
