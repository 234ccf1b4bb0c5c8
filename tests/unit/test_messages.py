"""Message codecs: round trips, strict decoding, local encode errors, digest."""

from __future__ import annotations

import dataclasses
import os
import struct

import pytest

from remus.protocol import messages as m
from remus.protocol.frames import LocalProtocolError, RemoteProtocolError

SAMPLES: list[m.Message] = [
    m.Hello(version=1, unit_id="web-1 ✓", generation=1_700_000_000_000, nonce=os.urandom(16),
            spec={"ip": "10.0.0.2/24", "mac": "02:00:00:00:00:01", "dirs": ["/srv/a"], "n": 3}),
    m.Hello(version=1, unit_id="", generation=0, nonce=b"", spec={}),
    m.Welcome(nonce=os.urandom(16), generation=-1, committed_epoch=-1),
    m.Welcome(nonce=b"n" * 16, generation=5, committed_epoch=2**62),
    m.EpochBegin(generation=3, epoch=10, base_epoch=9, full=False),
    m.EpochBegin(generation=3, epoch=0, base_epoch=-1, full=True),
    m.Chunk(epoch=7, kind=2, name="pages-1.img", meta=b"\x00\x01", data=os.urandom(100_000)),
    m.Chunk(epoch=0, kind=65535, name="", meta=b"", data=b""),
    m.EpochEnd(epoch=7, n_chunks=3, n_bytes=2**40, digest=os.urandom(16)),
    m.Ack(generation=3, epoch=7),
    m.Nack(generation=3, epoch=7, reason="digest mismatch"),
    m.Heartbeat(generation=3, epoch=8, acked=7, sent_ns=2**63, lease_ms=1500),
    m.Heartbeat(generation=-1, epoch=-1, acked=-1, sent_ns=0),
    m.Error(reason="disk full: ünïcödé"),
    m.Bye(reason="primary stopping"),
    m.Handover(generation=1_700_000_000_000, epoch=812),
]


def encode(msg: m.Message) -> bytes:
    return m.encode_message_bytes(msg)


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda x: type(x).__name__)
def test_round_trip(msg: m.Message) -> None:
    assert m.decode_message(msg.TYPE, encode(msg)) == msg


def test_every_message_type_is_covered_and_codes_are_unique() -> None:
    assert {type(s) for s in SAMPLES} == set(m.MESSAGE_TYPES.values())
    assert len(m.MESSAGE_TYPES) == 11


@pytest.mark.parametrize("cls", list(m.MESSAGE_TYPES.values()), ids=lambda c: c.__name__)
def test_field_tables_match_dataclass_fields(cls: type[m.Message]) -> None:
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    assert names == [name for name, _ in cls.FIELDS]


def test_messages_are_frozen() -> None:
    ack = m.Ack(generation=1, epoch=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ack.epoch = 3  # type: ignore[misc]


def test_recorded_ack_bytes() -> None:
    assert encode(m.Ack(generation=1, epoch=-1)) == struct.pack("!qq", 1, -1)
    assert m.decode_message(6, bytes.fromhex("0000000000000002" "0000000000000005")) == \
        m.Ack(generation=2, epoch=5)


def test_large_chunk_data_is_not_copied() -> None:
    data = os.urandom(1 << 20)
    parts = m.encode_message(m.Chunk(epoch=1, kind=1, name="x", meta=b"", data=data))
    assert any(p is data for p in parts)
    assert len(parts) == 2  # small fields merged into one buffer, then the data


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda x: type(x).__name__)
def test_every_truncation_and_trailing_byte_rejected(msg: m.Message) -> None:
    data = encode(msg)
    step = max(1, len(data) // 200)
    for cut in range(0, len(data), step):
        with pytest.raises(RemoteProtocolError):
            m.decode_message(msg.TYPE, data[:cut])
    with pytest.raises(RemoteProtocolError, match="trailing"):
        m.decode_message(msg.TYPE, data + b"\x00")


def test_unknown_type_rejected() -> None:
    with pytest.raises(RemoteProtocolError, match="unknown message type"):
        m.decode_message(200, b"")


def test_bad_bool_byte_rejected() -> None:
    data = bytearray(encode(m.EpochBegin(generation=1, epoch=1, base_epoch=-1, full=True)))
    data[-1] = 2
    with pytest.raises(RemoteProtocolError, match="boolean"):
        m.decode_message(m.EpochBegin.TYPE, bytes(data))


def test_bad_utf8_rejected() -> None:
    with pytest.raises(RemoteProtocolError, match="UTF-8"):
        m.decode_message(m.Bye.TYPE, struct.pack("!I", 2) + b"\xff\xfe")


@pytest.mark.parametrize("raw", [b"[1, 2]", b"{not json", b"\"str\""])
def test_bad_spec_json_rejected(raw: bytes) -> None:
    hello = encode(m.Hello(version=1, unit_id="u", generation=1, nonce=b"", spec={}))
    bad = hello[:-6] + struct.pack("!I", len(raw)) + raw  # replace the trailing "{}" field
    with pytest.raises(RemoteProtocolError, match="JSON"):
        m.decode_message(m.Hello.TYPE, bad)


@pytest.mark.parametrize("msg", [
    m.Ack(generation="1", epoch=2),  # type: ignore[arg-type]
    m.Ack(generation=True, epoch=2),
    m.Ack(generation=2**63, epoch=2),
    m.Chunk(epoch=1, kind=70_000, name="x", meta=b"", data=b""),
    m.Chunk(epoch=1, kind=1, name=b"x", meta=b"", data=b""),  # type: ignore[arg-type]
    m.Chunk(epoch=1, kind=1, name="x", meta="m", data=b""),  # type: ignore[arg-type]
    m.EpochBegin(generation=1, epoch=1, base_epoch=-1, full=1),  # type: ignore[arg-type]
    m.Heartbeat(generation=1, epoch=1, acked=1, sent_ns=-1),
    m.Hello(version=1, unit_id="u", generation=1, nonce=b"", spec={"x": object()}),
    m.Hello(version=1, unit_id="u", generation=1, nonce=b"", spec=[]),  # type: ignore[arg-type]
    m.Bye(reason="\ud800"),
], ids=str)
def test_unencodable_values_are_local_errors(msg: m.Message) -> None:
    with pytest.raises(LocalProtocolError):
        m.encode_message(msg)


def test_non_messages_cannot_be_encoded() -> None:
    class Fake(m.Message):
        TYPE = 6
        FIELDS = ()

    with pytest.raises(LocalProtocolError):
        m.encode_message(Fake())


def _digest(chunks: list[m.Chunk]) -> bytes:
    d = m.EpochDigest()
    for c in chunks:
        d.add(c)
    return d.digest()


def test_digest_counts_and_sensitivity() -> None:
    a = m.Chunk(epoch=1, kind=1, name="a", meta=b"m", data=b"data-a")
    b = m.Chunk(epoch=1, kind=1, name="b", meta=b"", data=b"data-bb")
    d = m.EpochDigest()
    d.add(a)
    d.add(b)
    assert (d.n_chunks, d.n_bytes, len(d.digest())) == (2, 13, 16)
    assert d.digest() == _digest([a, b])
    assert _digest([b, a]) != d.digest()  # order matters
    # Field boundaries matter: moving a byte from name to meta changes the digest.
    x = m.Chunk(epoch=1, kind=1, name="ab", meta=b"", data=b"")
    y = m.Chunk(epoch=1, kind=1, name="a", meta=b"b", data=b"")
    assert _digest([x]) != _digest([y])
    assert _digest([dataclasses.replace(a, kind=2)]) != _digest([a])
