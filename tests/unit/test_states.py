"""Primary/backup state machines, wired in memory through byte pipes."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from remus.protocol import (
    NEED_DATA,
    BackupConnection,
    ConnectionClosed,
    EpochComplete,
    Event,
    LocalProtocolError,
    PrimaryConnection,
    RemoteProtocolError,
    State,
    encode_frame,
    encode_message,
)
from remus.protocol import messages as m
from remus.protocol.frames import derive_session_keys, kex_public, kex_shared, new_kex_key

PSK = b"p" * 32
SPEC = {"vip": "10.9.0.2/24", "state_dirs": ["/srv/unit"]}


def drain(conn: PrimaryConnection | BackupConnection, data: bytes = b"") -> list[Event]:
    """Feed data and return every complete event."""
    if data:
        conn.receive_data(data)
    events = []
    while (ev := conn.next_event()) is not NEED_DATA:
        events.append(ev)
        if isinstance(ev, ConnectionClosed):
            break
    return events


@dataclass
class Pair:
    """A primary and a backup joined by two in-memory byte pipes.

    Bytes each side sends are kept in p2b/b2p (for replay tests) and only
    delivered by to_backup()/to_primary().
    """

    primary: PrimaryConnection
    backup: BackupConnection
    primary_kex: X25519PrivateKey
    p2b: list[bytes] = field(default_factory=list)
    b2p: list[bytes] = field(default_factory=list)

    def p(self, msg: m.Message) -> bytes:
        data = self.primary.send(msg)
        self.p2b.append(data)
        return data

    def b(self, msg: m.Message) -> bytes:
        data = self.backup.send(msg)
        self.b2p.append(data)
        return data

    def to_backup(self, data: bytes) -> list[Event]:
        return drain(self.backup, data)

    def to_primary(self, data: bytes) -> list[Event]:
        return drain(self.primary, data)

    def session_keys(self) -> tuple[bytes, bytes]:
        """(primary->backup, backup->primary), derived as an outsider holding the
        PSK and the primary's private key would."""
        shared = kex_shared(self.primary_kex, self.backup.our_nonce)
        return derive_session_keys(PSK, shared, self.primary.our_nonce, self.backup.our_nonce)


def make_pair(generation: int = 10, backup_gen: int = -1, backup_epoch: int = -1,
              backup_psk: bytes = PSK) -> Pair:
    kex = new_kex_key()
    return Pair(PrimaryConnection(PSK, "unit-a", generation, SPEC, kex_key=kex),
                BackupConnection(backup_psk, committed_generation=backup_gen,
                                 committed_epoch=backup_epoch), kex)


def connected(**kw: Any) -> Pair:
    pair = make_pair(**kw)
    hello = pair.primary.start()
    pair.p2b.append(hello)
    [ev] = pair.to_backup(hello)
    assert isinstance(ev, m.Hello) and ev.unit_id == "unit-a" and ev.spec == SPEC
    welcome = pair.backup.welcome()
    pair.b2p.append(welcome)
    [ev] = pair.to_primary(welcome)
    assert isinstance(ev, m.Welcome)
    assert pair.primary.state is State.READY and pair.backup.state is State.READY
    return pair


def send_epoch(pair: Pair, epoch: int, base: int, chunks: list[m.Chunk] | None = None,
               generation: int | None = None) -> bytes:
    """All frames of one epoch from the primary, concatenated."""
    gen = pair.primary.generation if generation is None else generation
    out = pair.p(m.EpochBegin(generation=gen, epoch=epoch, base_epoch=base, full=base == -1))
    for c in chunks if chunks is not None else [chunk(epoch, b"x" * epoch)]:
        out += pair.p(c)
    end = pair.primary.end_epoch()
    pair.p2b.append(end)
    return out + end


def chunk(epoch: int, data: bytes, kind: int = 1, name: str = "pages") -> m.Chunk:
    return m.Chunk(epoch=epoch, kind=kind, name=name, meta=b"meta", data=data)


def complete(pair: Pair, epoch: int, base: int, **kw: object) -> EpochComplete:
    evs = pair.to_backup(send_epoch(pair, epoch, base, **kw))  # type: ignore[arg-type]
    assert isinstance(evs[-1], EpochComplete)
    return evs[-1]


def ack(pair: Pair, ev: EpochComplete) -> list[Event]:
    return pair.to_primary(pair.b(m.Ack(generation=ev.generation, epoch=ev.epoch)))


# -- full session --------------------------------------------------------------
def test_full_session() -> None:
    pair = connected()
    rng = random.Random(7)
    base = -1
    for epoch in range(5):
        chunks = [chunk(epoch, rng.randbytes(rng.randint(0, 50_000)), kind=k, name=f"f{k}")
                  for k in range(rng.randint(0, 4))]
        evs = pair.to_backup(send_epoch(pair, epoch, base, chunks))
        assert isinstance(evs[0], m.EpochBegin) and evs[0].full == (base == -1)
        assert evs[1:-1] == chunks
        done = evs[-1]
        assert done == EpochComplete(10, epoch, True, "")
        assert pair.backup.completed_epoch == epoch
        hb = m.Heartbeat(generation=10, epoch=epoch, acked=epoch - 1, sent_ns=123, lease_ms=900)
        assert pair.to_backup(pair.p(hb)) == [hb]
        assert ack(pair, done) == [m.Ack(generation=10, epoch=epoch)]
        assert pair.primary.acked == (10, epoch)
        reply = m.Heartbeat(generation=10, epoch=epoch, acked=epoch, sent_ns=124, lease_ms=900)
        assert pair.to_primary(pair.b(reply)) == [reply]
        base = epoch
    assert pair.primary.outstanding == () and pair.backup.unanswered == ()
    assert pair.to_backup(pair.p(m.Bye(reason="done"))) == [m.Bye(reason="done")]
    assert pair.primary.state is State.CLOSED and pair.backup.state is State.CLOSED
    pair.backup.receive_data(b"")
    assert drain(pair.backup) == [ConnectionClosed()]


def test_heartbeat_inside_an_epoch_and_pipelined_acks() -> None:
    pair = connected()
    data = send_epoch(pair, 0, -1)
    data += pair.p(m.Heartbeat(generation=10, epoch=1, acked=-1, sent_ns=1))
    data += send_epoch(pair, 1, 0)
    assert pair.primary.outstanding == ((10, 0), (10, 1))
    evs = pair.to_backup(data)
    done = [e for e in evs if isinstance(e, EpochComplete)]
    assert [d.ok for d in done] == [True, True]
    assert ack(pair, done[0]) and ack(pair, done[1])
    assert pair.primary.acked == (10, 1)


def test_resume_with_a_delta_on_what_the_backup_holds() -> None:
    pair = connected(generation=10, backup_gen=10, backup_epoch=41)
    assert pair.primary.backup_committed_epoch == 41
    assert complete(pair, 42, 41).ok


def test_new_primary_generation_needs_a_full_checkpoint_locally() -> None:
    pair = connected(generation=11, backup_gen=10, backup_epoch=41)
    with pytest.raises(LocalProtocolError):
        pair.p(m.EpochBegin(generation=11, epoch=42, base_epoch=41, full=False))
    assert complete(pair, 0, -1).ok


# -- authentication ----------------------------------------------------------
def test_wrong_psk_rejected_by_backup_at_hello() -> None:
    pair = make_pair(backup_psk=b"q" * 32)
    with pytest.raises(RemoteProtocolError, match="pre-shared key"):
        pair.to_backup(pair.primary.start())
    assert pair.backup.state is State.ERROR


def test_wrong_psk_rejected_by_primary_at_welcome() -> None:
    kex = new_kex_key()
    primary = PrimaryConnection(PSK, "u", 1, {}, kex_key=kex)
    backup = BackupConnection(b"q" * 32)
    # Accept the HELLO regardless, as a backup with a forged/other key would.
    other = PrimaryConnection(b"q" * 32, "u", 1, {}, kex_key=kex)
    primary.start()
    drain(backup, other.start())
    with pytest.raises(RemoteProtocolError, match="pre-shared key"):
        drain(primary, backup.welcome())


@pytest.mark.parametrize("where", ["header", "payload", "tag"])
def test_flipped_bit_in_a_session_frame(where: str) -> None:
    pair = connected()
    frame = bytearray(pair.p(m.Heartbeat(generation=10, epoch=0, acked=-1, sent_ns=5)))
    pos = {"header": 10, "payload": 25, "tag": len(frame) - 1}[where]
    frame[pos] ^= 0x10
    with pytest.raises(RemoteProtocolError):
        pair.to_backup(bytes(frame))
    assert pair.backup.state is State.ERROR


def test_recorded_session_replayed_to_a_new_backup_fails() -> None:
    pair = connected()
    send_epoch(pair, 0, -1)
    recording = b"".join(pair.p2b)
    fresh = BackupConnection(PSK)
    fresh.receive_data(recording)
    assert isinstance(fresh.next_event(), m.Hello)  # HELLO itself is PSK-tagged
    fresh.welcome()  # new nonce, new session key
    with pytest.raises(RemoteProtocolError, match="bad tag on frame 1"):
        fresh.next_event()


def test_reflected_frames_rejected() -> None:
    pair = connected()
    own = pair.p(m.Heartbeat(generation=10, epoch=0, acked=-1, sent_ns=1))  # seq 1, as expected
    with pytest.raises(RemoteProtocolError, match="bad tag"):
        pair.to_primary(own)
    pair = make_pair()
    hello = pair.primary.start()
    with pytest.raises(RemoteProtocolError, match="unexpected Hello"):
        pair.to_primary(hello)


@pytest.mark.parametrize("order", [[0, 0], [1, 0], [0, 2], [0, 1, 1]])
def test_replayed_reordered_duplicated_frames(order: list[int]) -> None:
    pair = connected()
    frames = [pair.p(m.Heartbeat(generation=10, epoch=i, acked=-1, sent_ns=i)) for i in range(3)]
    with pytest.raises(RemoteProtocolError):
        pair.to_backup(b"".join(frames[i] for i in order))


# -- truncation and EOF ----------------------------------------------------------
def test_truncated_frame_needs_data_then_eof_mid_frame_is_an_error() -> None:
    pair = connected()
    frame = pair.p(m.Heartbeat(generation=10, epoch=0, acked=-1, sent_ns=1))
    assert pair.to_backup(frame[:-1]) == []
    assert pair.backup.next_event() is NEED_DATA
    pair.backup.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="inside a frame"):
        pair.backup.next_event()


def test_eof_mid_epoch_at_frame_boundary_is_a_clean_close() -> None:
    pair = connected()
    pair.to_backup(pair.p(m.EpochBegin(generation=10, epoch=0, base_epoch=-1, full=True)))
    pair.backup.receive_data(b"")
    assert pair.backup.next_event() == ConnectionClosed()
    assert pair.backup.next_event() == ConnectionClosed()
    assert pair.backup.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        pair.backup.receive_data(b"late")


# -- lineage checks on the backup (a raw, misbehaving primary) ------------------
class RawPrimary:
    """Speaks valid frames but any message sequence: to test the backup's checks."""

    def __init__(self, backup: BackupConnection, generation: int = 10) -> None:
        kex = new_kex_key()
        self.nonce, self.seq, self.backup = kex_public(kex), 0, backup
        self.key = PSK
        self.send(m.Hello(version=m.PROTOCOL_VERSION, unit_id="u", generation=generation,
                          nonce=self.nonce, spec={}))
        backup.welcome()
        self.key = derive_session_keys(PSK, kex_shared(kex, backup.our_nonce), self.nonce,
                                       backup.our_nonce)[0]

    def send(self, msg: m.Message) -> list[Event]:
        data = b"".join(encode_frame(self.key, msg.TYPE, self.seq, encode_message(msg)))
        self.seq += 1
        return drain(self.backup, data)

    def begin(self, gen: int, epoch: int, base: int) -> list[Event]:
        return self.send(m.EpochBegin(generation=gen, epoch=epoch, base_epoch=base,
                                      full=base == -1))

    def epoch(self, gen: int, epoch: int, base: int) -> EpochComplete:
        self.begin(gen, epoch, base)
        c = chunk(epoch, b"abc")
        self.send(c)
        d = m.EpochDigest()
        d.add(c)
        [ev] = self.send(m.EpochEnd(epoch=epoch, n_chunks=1, n_bytes=3, digest=d.digest()))
        assert isinstance(ev, EpochComplete)
        return ev


def raw(backup_gen: int = -1, backup_epoch: int = -1, generation: int = 10) -> RawPrimary:
    backup = BackupConnection(PSK, committed_generation=backup_gen, committed_epoch=backup_epoch)
    return RawPrimary(backup, generation)


@pytest.mark.parametrize("gen,epoch,base,match", [
    (10, 2, 1, "out of order"),            # delta on an epoch the backup never got
    (10, 0, 0, "epoch 0 after epoch 0"),   # repeat
    (10, -1, -1, "epoch < 0"),
    (11, 5, 0, "begins with a delta"),     # delta on a new generation
    (9, 5, -1, "backwards"),               # generation going backwards
])
def test_bad_epoch_begin_rejected(gen: int, epoch: int, base: int, match: str) -> None:
    p = raw()
    assert p.epoch(10, 0, -1).ok
    with pytest.raises(RemoteProtocolError, match=match):
        p.begin(gen, epoch, base)
    assert p.backup.state is State.ERROR


def test_full_flag_and_base_must_agree() -> None:
    p = raw()
    with pytest.raises(RemoteProtocolError):
        p.send(m.EpochBegin(generation=10, epoch=0, base_epoch=3, full=True))


def test_chunk_for_another_epoch_rejected() -> None:
    p = raw()
    p.begin(10, 0, -1)
    with pytest.raises(RemoteProtocolError, match="CHUNK for epoch 1"):
        p.send(chunk(1, b"x"))


def test_stale_hello_generation_rejected() -> None:
    with pytest.raises(RemoteProtocolError, match="older than the committed"):
        raw(backup_gen=12, backup_epoch=3, generation=11)


def test_delta_on_hello_generation_without_base_rejected() -> None:
    p = raw(backup_gen=5, backup_epoch=3, generation=10)
    with pytest.raises(RemoteProtocolError, match="out of order"):
        p.begin(10, 4, 3)


def test_old_generation_heartbeat_rejected() -> None:
    p = raw()
    with pytest.raises(RemoteProtocolError, match="HEARTBEAT"):
        p.send(m.Heartbeat(generation=9, epoch=0, acked=0, sent_ns=0))


def test_frame_after_peer_bye_rejected() -> None:
    p = raw()
    p.send(m.Bye(reason="bye"))
    with pytest.raises(RemoteProtocolError, match="after the peer"):
        p.send(m.Heartbeat(generation=10, epoch=0, acked=0, sent_ns=0))


# -- failed epochs: NACK and a new generation -------------------------------------
@pytest.mark.parametrize("n_chunks,n_bytes,bad_digest,match", [
    (1, 3, True, "digest mismatch"),
    (2, 3, False, "chunks"),
    (1, 4, False, "bytes"),
])
def test_epoch_end_mismatch_gives_failed_complete(n_chunks: int, n_bytes: int,
                                                  bad_digest: bool, match: str) -> None:
    pair = connected()
    pair.to_backup(pair.p(m.EpochBegin(generation=10, epoch=0, base_epoch=-1, full=True)))
    c = chunk(0, b"abc")
    pair.to_backup(pair.p(c))
    d = m.EpochDigest()
    d.add(c)
    digest = bytes(16) if bad_digest else d.digest()
    [ev] = pair.to_backup(pair.p(m.EpochEnd(epoch=0, n_chunks=n_chunks, n_bytes=n_bytes,
                                            digest=digest)))
    assert isinstance(ev, EpochComplete) and not ev.ok and match in ev.reason
    with pytest.raises(LocalProtocolError):
        pair.b(m.Ack(generation=10, epoch=0))  # a failed epoch cannot be ACKed
    [nack] = pair.to_primary(pair.b(m.Nack(generation=10, epoch=0, reason=ev.reason)))
    assert isinstance(nack, m.Nack)
    # The connection stays usable: the same generation is refused locally,
    # a new generation with a full checkpoint goes through.
    with pytest.raises(LocalProtocolError, match="NACKed"):
        pair.p(m.EpochBegin(generation=10, epoch=1, base_epoch=-1, full=True))
    assert complete(pair, 1, -1, generation=11).ok
    assert pair.backup.completed_generation == 11


def test_pipelined_epochs_after_a_failure_fail_too_and_keep_the_connection() -> None:
    pair = connected()
    assert pair.to_backup(send_epoch(pair, 0, -1))[-1].ok  # type: ignore[union-attr]
    pair.p(m.EpochBegin(generation=10, epoch=1, base_epoch=0, full=False))
    pair.p(chunk(1, b"zz"))
    pair.p(m.EpochEnd(epoch=1, n_chunks=1, n_bytes=2, digest=bytes(16)))  # corrupt sender
    data = b"".join(pair.p2b[-3:]) + send_epoch(pair, 2, 1)
    done = [e for e in pair.to_backup(data) if isinstance(e, EpochComplete)]
    assert [(d.epoch, d.ok) for d in done] == [(1, False), (2, False)]
    assert "broken" in done[1].reason
    assert pair.backup.completed_epoch == 0
    evs = ack(pair, pair.backup.unanswered[0])
    for d in done:
        evs += pair.to_primary(pair.b(m.Nack(generation=10, epoch=d.epoch, reason=d.reason)))
    assert [type(e) for e in evs] == [m.Ack, m.Nack, m.Nack]
    assert complete(pair, 3, -1, generation=11).ok


def test_nacking_an_ok_epoch_breaks_the_generation() -> None:
    pair = connected()
    ev = complete(pair, 0, -1)
    pair.to_primary(pair.b(m.Nack(generation=10, epoch=0, reason="commit failed")))
    with pytest.raises(LocalProtocolError):
        pair.p(m.EpochBegin(generation=10, epoch=1, base_epoch=0, full=False))
    assert ev.ok


# -- primary's checks on what the backup says -------------------------------------
@pytest.mark.parametrize("answer", [
    m.Ack(generation=10, epoch=1),     # not the oldest outstanding
    m.Ack(generation=9, epoch=0),      # wrong generation
    m.Nack(generation=10, epoch=5, reason="?"),
])
def test_primary_rejects_answers_for_unknown_epochs(answer: m.Message) -> None:
    pair = connected()
    send_epoch(pair, 0, -1)
    send_epoch(pair, 1, 0)
    raw_frame = b"".join(encode_frame(
        pair.session_keys()[1],
        answer.TYPE, 1, encode_message(answer)))
    with pytest.raises(RemoteProtocolError):
        pair.to_primary(raw_frame)


def test_primary_rejects_a_welcome_from_a_newer_generation() -> None:
    pair = make_pair(generation=10, backup_gen=10)
    pair.to_backup(pair.primary.start())
    with pytest.raises(LocalProtocolError):
        pair.backup.send(m.Welcome(nonce=pair.backup.our_nonce, generation=11,
                                   committed_epoch=0))
    # Build a WELCOME claiming generation 11 by hand (PSK-tagged, seq 0).
    welcome = m.Welcome(nonce=kex_public(new_kex_key()), generation=11, committed_epoch=0)
    data = b"".join(encode_frame(PSK, welcome.TYPE, 0, encode_message(welcome)))
    with pytest.raises(RemoteProtocolError, match="newer"):
        pair.to_primary(data)


# -- local misuse ---------------------------------------------------------------
def test_local_misuse_raises_and_leaves_state_unchanged() -> None:
    pair = make_pair()
    p, b = pair.primary, pair.backup
    for bad in (m.EpochBegin(generation=10, epoch=0, base_epoch=-1, full=True),
                m.Heartbeat(generation=10, epoch=0, acked=0, sent_ns=0),
                m.Ack(generation=1, epoch=1)):
        with pytest.raises(LocalProtocolError):
            p.send(bad)
    assert p.state is State.IDLE
    with pytest.raises(LocalProtocolError):
        b.welcome()  # no HELLO yet
    drain(b, p.start())
    with pytest.raises(LocalProtocolError):
        p.start()
    with pytest.raises(LocalProtocolError, match="nonce"):
        b.send(m.Welcome(nonce=kex_public(new_kex_key()), generation=-1, committed_epoch=-1))
    drain(p, b.welcome())
    with pytest.raises(LocalProtocolError):
        p.end_epoch()
    with pytest.raises(LocalProtocolError):
        p.send(chunk(0, b"x"))
    with pytest.raises(LocalProtocolError):
        b.send(m.Ack(generation=10, epoch=0))  # nothing completed
    with pytest.raises(LocalProtocolError):
        b.send(m.EpochBegin(generation=10, epoch=0, base_epoch=-1, full=True))
    with pytest.raises(LocalProtocolError):
        p.send(EpochComplete(10, 0, True))  # type: ignore[arg-type]
    p.send(m.EpochBegin(generation=10, epoch=0, base_epoch=-1, full=True))
    with pytest.raises(LocalProtocolError, match="epoch 0 is open"):
        p.send(chunk(1, b"x"))
    p.end_epoch()
    with pytest.raises(LocalProtocolError, match="does not follow"):
        p.send(m.EpochBegin(generation=10, epoch=0, base_epoch=-1, full=True))
    with pytest.raises(LocalProtocolError, match="base"):
        p.send(m.EpochBegin(generation=10, epoch=1, base_epoch=7, full=False))
    with pytest.raises(LocalProtocolError, match="older"):
        p.send(m.EpochBegin(generation=9, epoch=1, base_epoch=-1, full=True))
    p.send(m.Bye(reason="stop"))
    with pytest.raises(LocalProtocolError):
        p.send(m.Heartbeat(generation=10, epoch=0, acked=0, sent_ns=0))


def test_error_state_refuses_everything_but_one_error_message() -> None:
    pair = make_pair(backup_psk=b"q" * 32)
    with pytest.raises(RemoteProtocolError):
        pair.to_backup(pair.primary.start())
    b = pair.backup
    for call in (b.next_event, lambda: b.receive_data(b"x"), b.welcome,
                 lambda: b.send(m.Bye(reason="x"))):
        with pytest.raises(LocalProtocolError, match="ERROR"):
            call()
    assert b.send(m.Error(reason="bad key"))
    with pytest.raises(LocalProtocolError):
        b.send(m.Error(reason="again"))


def test_frames_in_flight_after_we_close_are_drained() -> None:
    pair = connected()
    in_flight = send_epoch(pair, 0, -1) + pair.p(m.Heartbeat(generation=10, epoch=0, acked=-1,
                                                             sent_ns=0))
    err = pair.b(m.Error(reason="disk full"))
    assert pair.to_backup(in_flight)[-1] == m.Heartbeat(generation=10, epoch=0, acked=-1,
                                                        sent_ns=0)
    assert pair.to_primary(err) == [m.Error(reason="disk full")]
    assert pair.primary.state is State.CLOSED


def test_refusal_before_welcome_reaches_the_primary() -> None:
    pair = make_pair()
    drain(pair.backup, pair.primary.start())
    assert pair.to_primary(pair.b(m.Error(reason="busy"))) == [m.Error(reason="busy")]
    assert pair.primary.state is State.CLOSED


# -- property-style: random chunks, random stream splits ---------------------------
def test_random_stream_splits_deliver_exactly_what_was_sent() -> None:
    rng = random.Random(20240601)
    for _trial in range(8):
        pair = connected()
        sent: list[object] = []
        stream = b""
        base = -1
        for epoch in range(rng.randint(1, 6)):
            chunks = [chunk(epoch, rng.randbytes(rng.choice([0, 1, 4096, 70_000, 300_000])),
                            kind=rng.randint(0, 9), name=f"n{rng.randint(0, 99)}")
                      for _ in range(rng.randint(0, 5))]
            stream += send_epoch(pair, epoch, base, chunks)
            sent += [epoch, *chunks]
            base = epoch
        got: list[object] = []
        pos = 0
        while pos < len(stream):
            step = rng.choice([1, 3, 19, 20, 21, 52, 999, 4096, 65536, 1 << 20])
            for ev in pair.to_backup(stream[pos:pos + step]):
                if isinstance(ev, m.EpochBegin):
                    got.append(ev.epoch)
                elif isinstance(ev, m.Chunk):
                    got.append(ev)
                else:
                    assert isinstance(ev, EpochComplete) and ev.ok
            pos += step
        assert got == sent


# -- planned switchover ----------------------------------------------------------
def test_handover_of_the_acked_epoch_closes_both_ends() -> None:
    pair = connected()
    done = complete(pair, 0, -1)
    ack(pair, done)
    done = complete(pair, 1, 0)
    ack(pair, done)
    ho = m.Handover(generation=10, epoch=1)
    assert pair.to_backup(pair.p(ho)) == [ho]
    assert pair.primary.state is State.CLOSED and pair.backup.state is State.CLOSED


@pytest.mark.parametrize("epoch,answered,match", [
    (0, True, "last completed epoch is \\(10, 1\\)"),  # an older checkpoint
    (2, True, "last completed epoch is \\(10, 1\\)"),  # one we do not hold
    (1, False, "before we answered epoch 1"),          # one we may still refuse
])
def test_handover_of_anything_but_the_answered_last_epoch_is_refused(
        epoch: int, answered: bool, match: str) -> None:
    pair = connected()
    ack(pair, complete(pair, 0, -1))
    last = complete(pair, 1, 0)
    if answered:
        ack(pair, last)
    with pytest.raises(RemoteProtocolError, match=match):
        pair.to_backup(pair.p(m.Handover(generation=10, epoch=epoch)))


def test_handover_mid_epoch_is_a_local_error() -> None:
    pair = connected()
    pair.p(m.EpochBegin(generation=10, epoch=0, base_epoch=-1, full=True))
    with pytest.raises(LocalProtocolError):
        pair.primary.send(m.Handover(generation=10, epoch=0))
