"""Fuzzing what the backup (root, restoring what it receives) parses.

hypothesis generates corrupted, truncated, oversized, reordered and replayed
input for each layer a byte from the network crosses:

* the frame decoder, with bytes from anyone (no key);
* the message decoders, with authentic frames of any content (a peer that
  holds the key but is buggy or compromised);
* the backup's connection state machine, with authentic frames of any type
  in any order;
* the checkpoint store, with the records of real epochs mutated before they
  are staged, committed and applied.

Each may refuse (RemoteProtocolError, or a RemusError from the store); none
may raise anything else, hang, buffer beyond one bounded frame, accept a
frame it did not receive whole and in order, or write outside its store.

REMUS_FUZZ_EXAMPLES sets the examples per test (default 150 in `make test`;
`make fuzz` runs 5000 and prints hypothesis' statistics).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from remus.checkpoint.delta import KIND_FILE, KIND_FILES, KIND_MANIFEST, KIND_PAGES
from remus.checkpoint.delta_encoder import DeltaEncoder
from remus.checkpoint.store import CheckpointStore
from remus.errors import RemusError
from remus.protocol import (
    NEED_DATA,
    BackupConnection,
    ConnectionClosed,
    LocalProtocolError,
    PrimaryConnection,
    RemoteProtocolError,
    decode_message,
    encode_message,
)
from remus.protocol import messages as m
from remus.protocol.frames import (
    HEADER_SIZE,
    TAG_SIZE,
    FrameDecoder,
    derive_session_keys,
    encode_frame,
    kex_public,
    kex_shared,
    new_kex_key,
)
from tests.unit.test_store import evolution

EXAMPLES = int(os.environ.get("REMUS_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
PSK = b"f" * 32
SESSION = b"s" * 32
MAX_PAYLOAD = 4096

# -- building blocks ---------------------------------------------------------------

MESSAGES = st.one_of(
    st.builds(m.Hello, version=st.integers(0, 65535), unit_id=st.text(max_size=20),
              generation=st.integers(-2**63, 2**63 - 1), nonce=st.binary(max_size=40),
              spec=st.dictionaries(st.text(max_size=5), st.integers(), max_size=3)),
    st.builds(m.EpochBegin, generation=st.integers(-2, 20), epoch=st.integers(-2, 20),
              base_epoch=st.integers(-2, 20), full=st.booleans()),
    st.builds(m.Chunk, epoch=st.integers(-2, 20), kind=st.integers(0, 65535),
              name=st.text(max_size=20), meta=st.binary(max_size=64),
              data=st.binary(max_size=256)),
    st.builds(m.EpochEnd, epoch=st.integers(-2, 20), n_chunks=st.integers(0, 2**64 - 1),
              n_bytes=st.integers(0, 2**64 - 1), digest=st.binary(max_size=20)),
    st.builds(m.Heartbeat, generation=st.integers(-2, 20), epoch=st.integers(-2, 20),
              acked=st.integers(-2, 20), sent_ns=st.integers(0, 2**64 - 1),
              lease_ms=st.integers(0, 2**32 - 1)),
    st.builds(m.Handover, generation=st.integers(-2, 20), epoch=st.integers(-2, 20)),
    st.builds(m.Bye, reason=st.text(max_size=30)),
    st.builds(m.Error, reason=st.text(max_size=30)),
    st.builds(m.Ack, generation=st.integers(-2, 20), epoch=st.integers(-2, 20)),
)


def _stream(payloads: list[bytes]) -> tuple[bytes, list[tuple[int, int]]]:
    """A valid stream (seq 0 under the PSK, then the session key) and each
    frame's (start, end) in it."""
    out, spans = b"", []
    for seq, p in enumerate(payloads):
        f = b"".join(encode_frame(PSK if seq == 0 else SESSION, 8, seq, p))
        spans.append((len(out), len(out) + len(f)))
        out += f
    return out, spans


def _drain_decoder(dec: FrameDecoder, data: bytes, step: int) -> tuple[list[bytes], bool]:
    """Feed data in `step`-byte reads; (payloads returned, refused?)."""
    got: list[bytes] = []
    try:
        for off in range(0, len(data), step):
            dec.feed(data[off:off + step])
            # Never more buffered than one bounded frame plus the last read.
            assert dec.buffered <= HEADER_SIZE + MAX_PAYLOAD + 12 + TAG_SIZE + step
            while (f := dec.next_frame()) is not None:
                got.append(f.payload)
        dec.feed(b"")
        while (f := dec.next_frame()) is not None:
            got.append(f.payload)
    except RemoteProtocolError:
        with pytest.raises(LocalProtocolError):
            dec.next_frame()  # refuses further use
        return got, True
    return got, False


# -- the frame decoder --------------------------------------------------------------
@FUZZ
@given(data=st.binary(max_size=2000), step=st.integers(1, 600))
def test_decoder_with_bytes_from_anyone(data: bytes, step: int) -> None:
    dec = FrameDecoder(PSK, max_payload=MAX_PAYLOAD)
    dec.set_session_key(SESSION)
    got, _ = _drain_decoder(dec, data, step)
    assert got == []  # without the key nothing opens


@FUZZ
@given(payloads=st.lists(st.binary(max_size=300), min_size=1, max_size=6),
       edits=st.lists(st.tuples(st.sampled_from(["flip", "cut", "insert", "dup", "swap",
                                                 "length"]),
                                st.integers(0, 10**6), st.integers(0, 255)),
                      min_size=1, max_size=4),
       step=st.integers(1, 700))
def test_decoder_with_a_damaged_stream(payloads: list[bytes], edits: list[Any],
                                       step: int) -> None:
    """A valid stream, damaged: whatever comes out is a prefix of what was sent,
    byte for byte; the damage itself is refused (or, cut at the end, never
    delivered)."""
    stream, spans = _stream(payloads)
    data = bytearray(stream)
    for op, pos, val in edits:
        pos %= max(len(data), 1)
        if not data:
            break
        if op == "flip":
            data[pos] ^= 1 << (val % 8)
        elif op == "cut":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = bytes([val])
        elif op == "dup":  # replay a whole frame right after itself
            a, b = spans[pos % len(spans)]
            data[b:b] = stream[a:b]
        elif op == "swap" and len(spans) > 1:
            i = pos % (len(spans) - 1)
            (a, b), (c, d) = spans[i], spans[i + 1]
            data[a:d] = stream[c:d] + stream[a:b]
        elif op == "length" and len(data) >= HEADER_SIZE:
            struct.pack_into("!I", data, 16, (val << 24) | pos)
    dec = FrameDecoder(PSK, max_payload=MAX_PAYLOAD)
    dec.set_session_key(SESSION)
    got, _ = _drain_decoder(dec, bytes(data), step)
    assert got == payloads[:len(got)]
    if bytes(data) != stream:
        assert len(got) < len(payloads) or bytes(data[:len(stream)]) == stream


@FUZZ
@given(header=st.binary(min_size=HEADER_SIZE, max_size=HEADER_SIZE))
def test_a_huge_length_is_refused_before_its_payload(header: bytes) -> None:
    h = bytearray(header)
    h[:6] = b"RMUS\x02\x06"
    struct.pack_into("!I", h, 16, MAX_PAYLOAD + 13 + (header[0] << 20))
    dec = FrameDecoder(PSK, max_payload=MAX_PAYLOAD)
    dec.feed(bytes(h))
    with pytest.raises(RemoteProtocolError, match="exceeds max_payload"):
        dec.next_frame()


# -- the message decoders -------------------------------------------------------------
@FUZZ
@given(msg_type=st.integers(0, 255), payload=st.binary(max_size=400))
def test_message_decoders_with_any_bytes(msg_type: int, payload: bytes) -> None:
    try:
        msg = decode_message(msg_type, payload)
    except RemoteProtocolError:
        return
    # Exactly one encoding: what decoded re-encodes to the same bytes.
    assert b"".join(encode_message(msg)) == payload


@FUZZ
@given(msg=MESSAGES, cut=st.integers(0, 10**6), flip=st.integers(0, 10**6))
def test_message_decoders_with_damaged_encodings(msg: m.Message, cut: int, flip: int) -> None:
    try:
        good = b"".join(encode_message(msg))
    except LocalProtocolError:
        return  # not encodable (e.g. a NaN in JSON): refused on our side
    assert decode_message(msg.TYPE, good) == msg
    bad = bytearray(good[:cut % (len(good) + 1)])
    if bad:
        bad[flip % len(bad)] ^= 0xFF
    try:
        decode_message(msg.TYPE, bytes(bad))
    except RemoteProtocolError:
        pass


# -- the backup's state machine, fed by a peer holding the key ------------------------------
class KeyedPeer:
    """Completes a real handshake with a BackupConnection, then sends anything."""

    def __init__(self, backup: BackupConnection) -> None:
        kex = new_kex_key()
        self.backup, self.seq = backup, 1
        pub = kex_public(kex)
        hello = m.Hello(version=m.PROTOCOL_VERSION, unit_id="u", generation=5, nonce=pub,
                        spec={})
        backup.receive_data(b"".join(encode_frame(PSK, m.Hello.TYPE, 0, encode_message(hello))))
        assert isinstance(backup.next_event(), m.Hello)
        backup.welcome()
        self.key = derive_session_keys(PSK, kex_shared(kex, backup.our_nonce), pub,
                                       backup.our_nonce)[0]

    def frame(self, msg_type: int, payload: bytes) -> bytes:
        data = b"".join(encode_frame(self.key, msg_type, self.seq, payload))
        self.seq += 1
        return data


@FUZZ
@given(frames=st.lists(st.one_of(MESSAGES, st.tuples(st.integers(0, 255),
                                                     st.binary(max_size=80))),
                       min_size=1, max_size=12))
def test_backup_connection_with_authentic_frames_of_anything(frames: list[Any]) -> None:
    backup = BackupConnection(PSK, committed_generation=5, committed_epoch=3)
    peer = KeyedPeer(backup)
    for item in frames:
        if isinstance(item, tuple):
            data = peer.frame(*item)
        else:
            try:
                data = peer.frame(item.TYPE, b"".join(encode_message(item)))
            except LocalProtocolError:
                continue
        try:
            backup.receive_data(data)
            while (ev := backup.next_event()) is not NEED_DATA:
                if isinstance(ev, ConnectionClosed):
                    return
                if isinstance(ev, m.EpochBegin | m.Chunk):
                    pass
                elif hasattr(ev, "ok"):  # EpochComplete: answer it, as the agent does
                    ans = (m.Ack if ev.ok else m.Nack)
                    kw = {"reason": "x"} if ans is m.Nack else {}
                    backup.send(ans(generation=ev.generation, epoch=ev.epoch, **kw))
        except RemoteProtocolError:
            with pytest.raises(LocalProtocolError):
                backup.receive_data(b"x")
            return
        except LocalProtocolError:
            return  # our own answer refused after the peer closed: no state change


def test_a_session_replayed_in_pieces_to_a_new_backup_is_refused() -> None:
    p = PrimaryConnection(PSK, "u", 1, {})
    b = BackupConnection(PSK)
    hello = p.start()
    b.receive_data(hello)
    b.next_event()
    p.receive_data(b.welcome())
    p.next_event()
    later = p.send(m.EpochBegin(generation=1, epoch=0, base_epoch=-1, full=True))
    fresh = BackupConnection(PSK)
    fresh.receive_data(hello)
    assert isinstance(fresh.next_event(), m.Hello)
    fresh.welcome()
    fresh.receive_data(later)
    with pytest.raises(RemoteProtocolError, match="bad tag on frame 1"):
        fresh.next_event()


# -- the checkpoint store, fed real epochs, mutated ---------------------------------------
@pytest.fixture(scope="module")
def real_epochs(tmp_path_factory: pytest.TempPathFactory) -> list[list[tuple[int, str, bytes,
                                                                              bytes]]]:
    """The records of two real epochs (a full one, then a delta)."""
    root = tmp_path_factory.mktemp("dumps")
    dumps = evolution(root)
    enc = DeltaEncoder()
    out = []
    for i, d in enumerate(dumps[:2]):
        out.append([tuple(c) for c in enc.encode(d, i == 0)])
    return out  # type: ignore[return-value]


def _files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


MUTATIONS = st.lists(st.tuples(st.sampled_from(["meta", "data", "name", "kind", "drop", "dup",
                                                 "truncate"]),
                               st.integers(0, 10**6), st.integers(0, 255)),
                     min_size=1, max_size=3)


@FUZZ
@given(mutations=MUTATIONS, which=st.integers(0, 1))
def test_store_with_mutated_records_of_real_epochs(tmp_path_factory: pytest.TempPathFactory,
                                                   real_epochs: Any, mutations: Any,
                                                   which: int) -> None:
    root = tmp_path_factory.mktemp("fuzzstore")
    work = root / "store"
    store = CheckpointStore(work, verify_pages=True)
    store.recover()
    if which == 1:  # the delta needs its base committed and applied
        staged = store.begin(1, 0, -1, True)
        for c in real_epochs[0]:
            staged.add(*c)
        staged.commit()
        store.apply_pending()
    before = {p.relative_to(work): p.read_bytes() for p in (work / "images").rglob("*")
              if p.is_file()}
    outside = _files_under(root) - _files_under(work)
    records = [list(c) for c in real_epochs[which]]
    for op, pos, val in mutations:
        i = pos % len(records)
        rec = records[i]
        if op in ("meta", "data"):
            field = 2 if op == "meta" else 3
            b = bytearray(rec[field])
            if b:
                b[pos % len(b)] ^= 1 << (val % 8)
            else:
                b.append(val)
            rec[field] = bytes(b)
        elif op == "name":
            rec[1] = ["../../evil", "/etc/passwd", "pages-1.img", "x\0y", ".hidden", "", "a/b",
                      "core-1.img", "pagemap-1.img"][val % 9]
        elif op == "kind":
            rec[0] = [KIND_FILE, KIND_FILES, KIND_MANIFEST, KIND_PAGES, 0, 77, 65535][val % 7]
        elif op == "drop" and len(records) > 1:
            del records[i]
        elif op == "dup":
            records.insert(i, list(rec))
        elif op == "truncate":
            field = 2 + val % 2
            rec[field] = rec[field][:pos % (len(rec[field]) + 1)]
    committed = False
    try:
        staged = store.begin(1, which, which - 1, which == 0)
        for kind, name, meta, data in records:
            staged.add(kind, name, meta, data)
        staged.commit()
        committed = True
        store.apply_pending()
    except RemusError:
        pass
    # Nothing was written outside the store, whatever the records said.
    assert _files_under(root) - _files_under(work) == outside
    if not committed:
        # A refused epoch leaves the applied checkpoint as it was.
        after = {p.relative_to(work): p.read_bytes() for p in (work / "images").rglob("*")
                 if p.is_file()}
        assert after == before
