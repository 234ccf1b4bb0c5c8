"""Per-role state machines of the replication protocol (sans-I/O, like h11).

A connection object turns messages into bytes (send) and bytes into events
(receive_data + next_event); it never touches a socket or a clock. Each
role's legal moves are its SEND/RECV tables below; anything else raises
LocalProtocolError (our misuse: nothing encoded, state unchanged) or
RemoteProtocolError (the peer broke the protocol: state ERROR, after which
every call raises LocalProtocolError except sending one Error to say why).
The session, the lineage rules (generation, epoch, base) and why a failed
epoch breaks its generation are described in docs/protocol.md.
"""

from __future__ import annotations

import enum
import hmac
import logging
import os
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from remus.errors import ConfigError
from remus.protocol.frames import (
    DEFAULT_MAX_PAYLOAD,
    NONCE_SIZE,
    Buffer,
    FrameDecoder,
    FrameWriter,
    LocalProtocolError,
    RemoteProtocolError,
    check_key,
    derive_session_keys,
)
from remus.protocol.messages import (
    PROTOCOL_VERSION,
    Ack,
    Bye,
    Chunk,
    EpochBegin,
    EpochDigest,
    EpochEnd,
    Error,
    Heartbeat,
    Hello,
    Message,
    Nack,
    Welcome,
    decode_message,
    encode_message,
)

log = logging.getLogger(__name__)


class State(enum.Enum):
    IDLE = "IDLE"                      # primary: start() not called yet
    SENT_HELLO = "SENT_HELLO"          # primary: waiting for WELCOME
    WAIT_HELLO = "WAIT_HELLO"          # backup: waiting for HELLO
    HELLO_RECEIVED = "HELLO_RECEIVED"  # backup: must send WELCOME (or ERROR)
    READY = "READY"                    # between epochs
    IN_EPOCH = "IN_EPOCH"              # between EPOCH_BEGIN and EPOCH_END
    CLOSED = "CLOSED"                  # a BYE/ERROR was sent or received, or EOF
    ERROR = "ERROR"                    # the peer broke the protocol


class NeedData(enum.Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA = NeedData.NEED_DATA
"""next_event() result when no complete event is buffered (like h11)."""


@dataclass(frozen=True, slots=True)
class EpochComplete:
    """Backup event replacing EPOCH_END: the epoch was received whole.

    ok is False if the counts or digest differ, or the generation is broken;
    the backup must then NACK it (and may NACK an ok epoch it fails to commit).
    """

    generation: int
    epoch: int
    ok: bool
    reason: str = ""


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed the transport at a frame boundary (receive_data(b"")).

    Not a BYE: a primary that vanishes without BYE may have crashed. An epoch
    open at that moment is incomplete and must be discarded.
    """

    reason: str = "peer closed the connection"


Event = Message | EpochComplete | ConnectionClosed

# (state, message class) -> next state. In receive tables, None means "read,
# authenticated and dropped": frames the peer had in flight after we closed.
Transitions = Mapping[tuple[State, type[Message]], State | None]

S = State
_LIVE = (S.READY, S.IN_EPOCH)

PRIMARY_SEND: Transitions = {
    (S.IDLE, Hello): S.SENT_HELLO,
    (S.READY, EpochBegin): S.IN_EPOCH,
    (S.IN_EPOCH, Chunk): S.IN_EPOCH,
    (S.IN_EPOCH, EpochEnd): S.READY,
    **{(s, Heartbeat): s for s in _LIVE},
    **{(s, m): S.CLOSED for s in _LIVE for m in (Error, Bye)},
}
PRIMARY_RECV: Transitions = {
    (S.SENT_HELLO, Welcome): S.READY,
    (S.SENT_HELLO, Error): S.CLOSED,
    **{(s, m): s for s in (*_LIVE, S.CLOSED) for m in (Ack, Nack, Heartbeat)},
    **{(s, m): S.CLOSED for s in (*_LIVE, S.CLOSED) for m in (Error, Bye)},
}
BACKUP_SEND: Transitions = {
    (S.WAIT_HELLO, Error): S.CLOSED,
    (S.HELLO_RECEIVED, Welcome): S.READY,
    (S.HELLO_RECEIVED, Error): S.CLOSED,
    **{(s, m): s for s in _LIVE for m in (Ack, Nack, Heartbeat)},
    **{(s, m): S.CLOSED for s in _LIVE for m in (Error, Bye)},
}
BACKUP_RECV: Transitions = {
    (S.WAIT_HELLO, Hello): S.HELLO_RECEIVED,
    (S.READY, EpochBegin): S.IN_EPOCH,
    (S.IN_EPOCH, Chunk): S.IN_EPOCH,
    (S.IN_EPOCH, EpochEnd): S.READY,
    **{(s, Heartbeat): s for s in (*_LIVE, S.CLOSED)},
    **{(s, m): S.CLOSED for s in (*_LIVE, S.CLOSED) for m in (Error, Bye)},
    **{(S.CLOSED, m): None for m in (EpochBegin, Chunk, EpochEnd)},
}


class _Connection:
    """Shared machinery: framing, keys, table lookup, ERROR handling."""

    SEND: ClassVar[Transitions]
    RECV: ClassVar[Transitions]

    def __init__(self, psk: bytes, nonce: bytes | None, max_payload: int, initial: State) -> None:
        check_key(psk)
        self.our_nonce = os.urandom(NONCE_SIZE) if nonce is None else bytes(nonce)
        if len(self.our_nonce) != NONCE_SIZE:
            raise ConfigError(f"nonce must be {NONCE_SIZE} bytes")
        self.peer_nonce: bytes | None = None
        self._psk = bytes(psk)
        self._writer = FrameWriter(psk, max_payload)
        self._reader = FrameDecoder(psk, max_payload)
        self._state = initial
        self._peer_closed = False
        self._closed_event: ConnectionClosed | None = None
        self._error: str | None = None
        self._error_sent = False

    @property
    def state(self) -> State:
        return self._state

    # -- receiving -----------------------------------------------------------
    def receive_data(self, data: Buffer) -> None:
        """Buffer bytes from the peer; b"" means the peer closed (EOF)."""
        self._refuse_if_error()
        self._reader.feed(data)

    def next_event(self) -> Event | NeedData:
        """The next event, NEED_DATA, or ConnectionClosed (repeated) after EOF.

        Raises RemoteProtocolError (connection goes to ERROR) if the peer
        broke the protocol, including EOF in the middle of a frame.
        """
        self._refuse_if_error()
        if self._closed_event is not None:
            return self._closed_event
        try:
            while True:
                frame = self._reader.next_frame()
                if frame is None:
                    if not self._reader.eof:
                        return NEED_DATA
                    self._closed_event = ConnectionClosed()
                    self._state = State.CLOSED
                    return self._closed_event
                event = self._receive(decode_message(frame.msg_type, frame.payload))
                if event is not None:
                    return event
        except RemoteProtocolError as e:
            self._state, self._error = State.ERROR, str(e)
            log.debug("%s: peer broke the protocol: %s", type(self).__name__, e)
            raise

    def _receive(self, msg: Message) -> Event | None:
        name = type(msg).__name__
        if self._peer_closed:
            raise RemoteProtocolError(f"{name} after the peer's BYE/ERROR")
        key = (self._state, type(msg))
        if key not in self.RECV:
            raise RemoteProtocolError(f"unexpected {name} in state {self._state.value}")
        target = self.RECV[key]
        if target is None:
            log.debug("dropped %s received after we closed", name)
            return None
        event = self._on_receive(msg)
        self._state = target
        if isinstance(msg, Error | Bye):
            self._peer_closed = True
        return event

    # -- sending -------------------------------------------------------------
    def send(self, msg: Message) -> bytes:
        """The frame carrying msg, as one bytes object."""
        return b"".join(self.send_buffers(msg))

    def send_buffers(self, msg: Message) -> list[Buffer]:
        """Like send(), as [header, payload parts..., tag] without copying
        large payloads (for sendmsg/writelines). Don't modify them until sent."""
        if self._state is State.ERROR:
            return self._send_error_after_error(msg)
        target = self.SEND.get((self._state, type(msg)))
        if target is None:
            raise LocalProtocolError(f"cannot send {type(msg).__name__} in state "
                                     f"{self._state.value}")
        self._check_send(msg)
        bufs = self._writer.encode(msg.TYPE, encode_message(msg))
        self._did_send(msg)
        self._state = target
        return bufs

    def _send_error_after_error(self, msg: Message) -> list[Buffer]:
        if not isinstance(msg, Error) or self._error_sent:
            self._refuse_if_error()
        bufs = self._writer.encode(Error.TYPE, encode_message(msg))
        self._error_sent = True
        return bufs

    def _refuse_if_error(self) -> None:
        if self._state is State.ERROR:
            raise LocalProtocolError(f"connection is in state ERROR: {self._error}")

    def _set_session_keys(self, nonce_primary: bytes, nonce_backup: bytes, primary: bool) -> None:
        p2b, b2p = derive_session_keys(self._psk, nonce_primary, nonce_backup)
        self._writer.session_key, self._reader.session_key = (p2b, b2p) if primary else (b2p, p2b)

    # -- role hooks ----------------------------------------------------------
    def _on_receive(self, msg: Message) -> Event:
        """Validate a received message (RemoteProtocolError) and return its event."""
        return msg

    def _check_send(self, msg: Message) -> None:
        """Validate an outgoing message (LocalProtocolError); no side effects."""

    def _did_send(self, msg: Message) -> None:
        """Bookkeeping after msg was encoded."""


def _check_nonce(nonce: bytes) -> None:
    if len(nonce) != NONCE_SIZE:
        raise RemoteProtocolError(f"nonce of {len(nonce)} bytes, expected {NONCE_SIZE}")


class PrimaryConnection(_Connection):
    """The primary's end: sends checkpoints, receives ACK/NACK/HEARTBEAT.

    Events: Welcome, Ack, Nack, Heartbeat, Error, Bye, ConnectionClosed.
    Acks and Nacks must answer ended epochs one by one in order; `acked` is
    the last acknowledged (generation, epoch). After a NACK the generation
    is broken: the next EPOCH_BEGIN must open a higher generation, full.
    """

    SEND = PRIMARY_SEND
    RECV = PRIMARY_RECV

    def __init__(self, psk: bytes, unit_id: str, generation: int, spec: Mapping[str, Any],
                 nonce: bytes | None = None, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        super().__init__(psk, nonce, max_payload, State.IDLE)
        self.unit_id, self.spec, self.generation = unit_id, spec, generation
        self.last_epoch = -1               # newest epoch begun in self.generation
        self._base: int | None = None      # newest epoch a delta may apply on
        self.open_epoch: int | None = None
        self._digest = EpochDigest()
        self._outstanding: deque[tuple[int, int]] = deque()
        self._nacked: set[int] = set()
        self.acked: tuple[int, int] | None = None
        self.backup_generation = -1
        self.backup_committed_epoch = -1

    @property
    def outstanding(self) -> tuple[tuple[int, int], ...]:
        """Ended epochs (generation, epoch) not yet ACKed or NACKed, oldest first."""
        return tuple(self._outstanding)

    def start(self) -> bytes:
        """The HELLO frame that opens the connection."""
        return self.send(Hello(PROTOCOL_VERSION, self.unit_id, self.generation,
                               self.our_nonce, dict(self.spec)))

    def end_epoch(self) -> bytes:
        """EPOCH_END for the open epoch with the counts and digest of what was sent."""
        if self.open_epoch is None:
            raise LocalProtocolError("no epoch is open")
        d = self._digest
        return self.send(EpochEnd(self.open_epoch, d.n_chunks, d.n_bytes, d.digest()))

    def _check_send(self, msg: Message) -> None:
        if isinstance(msg, Hello) and msg.nonce != self.our_nonce:
            raise LocalProtocolError("HELLO must carry this connection's nonce (our_nonce)")
        if isinstance(msg, EpochBegin):
            self._check_begin(msg)
        elif isinstance(msg, Chunk | EpochEnd) and msg.epoch != self.open_epoch:
            raise LocalProtocolError(f"{type(msg).__name__} for epoch {msg.epoch}, but epoch "
                                     f"{self.open_epoch} is open")

    def _check_begin(self, msg: EpochBegin) -> None:
        g, e = msg.generation, msg.epoch
        if e < 0 or msg.full != (msg.base_epoch == -1):
            raise LocalProtocolError("epoch must be >= 0, base_epoch -1 exactly for a full "
                                     f"checkpoint (got {msg})")
        if g < self.generation:
            raise LocalProtocolError(f"generation {g} is older than current {self.generation}")
        if g > self.generation:
            if not msg.full:
                raise LocalProtocolError(f"new generation {g} must begin with a full checkpoint")
            return
        if g in self._nacked:
            raise LocalProtocolError(f"generation {g} was NACKed; begin a higher generation "
                                     "with a full checkpoint")
        if e <= self.last_epoch:
            raise LocalProtocolError(f"epoch {e} does not follow epoch {self.last_epoch}")
        if not msg.full and msg.base_epoch != self._base:
            raise LocalProtocolError(f"delta on epoch {msg.base_epoch}, but the backup's base "
                                     f"will be {self._base}")

    def _did_send(self, msg: Message) -> None:
        if isinstance(msg, Hello):
            self.generation = msg.generation
        elif isinstance(msg, EpochBegin):
            if msg.generation != self.generation:
                self.generation, self._base = msg.generation, None
            self.last_epoch = self.open_epoch = msg.epoch
            self._digest = EpochDigest()
        elif isinstance(msg, Chunk):
            self._digest.add(msg)
        elif isinstance(msg, EpochEnd):
            self._outstanding.append((self.generation, msg.epoch))
            self._base, self.open_epoch = msg.epoch, None

    def _on_receive(self, msg: Message) -> Event:
        if isinstance(msg, Welcome):
            self._on_welcome(msg)
        elif isinstance(msg, Ack | Nack):
            self._answer(msg)
        return msg

    def _on_welcome(self, msg: Welcome) -> None:
        _check_nonce(msg.nonce)
        if msg.generation > self.generation:
            raise RemoteProtocolError(f"backup holds generation {msg.generation}, newer than "
                                      f"ours ({self.generation}), yet welcomed us")
        self.peer_nonce = msg.nonce
        self._set_session_keys(self.our_nonce, msg.nonce, primary=True)
        self.backup_generation, self.backup_committed_epoch = msg.generation, msg.committed_epoch
        if msg.generation == self.generation and msg.committed_epoch >= 0:
            self._base = self.last_epoch = msg.committed_epoch

    def _answer(self, msg: Ack | Nack) -> None:
        pos = (msg.generation, msg.epoch)
        name = type(msg).__name__.upper()
        if not self._outstanding or self._outstanding[0] != pos:
            oldest = self._outstanding[0] if self._outstanding else "none"
            raise RemoteProtocolError(f"{name} for {pos}, but the oldest unanswered epoch is "
                                      f"{oldest}")
        if isinstance(msg, Ack) and msg.generation in self._nacked:
            raise RemoteProtocolError(f"ACK for {pos} after a NACK in generation {msg.generation}")
        self._outstanding.popleft()
        if isinstance(msg, Ack):
            self.acked = pos
        else:
            self._nacked.add(msg.generation)


class BackupConnection(_Connection):
    """The backup's end: validates the checkpoint stream, answers each epoch.

    Events: Hello, EpochBegin, Chunk, EpochComplete, Heartbeat, Error, Bye,
    ConnectionClosed. committed_generation/committed_epoch describe what the
    backup holds; completed_epoch follows every ok EpochComplete and may be
    set by the owner after a commit or discard.
    """

    SEND = BACKUP_SEND
    RECV = BACKUP_RECV

    def __init__(self, psk: bytes, nonce: bytes | None = None, committed_generation: int = -1,
                 committed_epoch: int = -1, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        super().__init__(psk, nonce, max_payload, State.WAIT_HELLO)
        self.completed_generation = committed_generation
        self.completed_epoch = committed_epoch
        self.generation = committed_generation  # generation of the incoming stream
        self.last_epoch = committed_epoch       # newest epoch begun in self.generation
        self.hello: Hello | None = None
        self.open_epoch: int | None = None
        self._digest = EpochDigest()
        self._broken = False                    # self.generation had a failed epoch
        self._unanswered: deque[EpochComplete] = deque()
        self._nacked: set[int] = set()

    @property
    def unanswered(self) -> tuple[EpochComplete, ...]:
        """EpochComplete events still waiting for our ACK/NACK, oldest first."""
        return tuple(self._unanswered)

    def welcome(self) -> bytes:
        """The WELCOME frame announcing what this backup holds."""
        return self.send(Welcome(self.our_nonce, self.completed_generation, self.completed_epoch))

    # -- receive -------------------------------------------------------------
    def _on_receive(self, msg: Message) -> Event:
        if isinstance(msg, Hello):
            self._on_hello(msg)
        elif isinstance(msg, EpochBegin):
            self._on_begin(msg)
        elif isinstance(msg, Chunk):
            self._in_open_epoch(msg.epoch, "CHUNK")
            self._digest.add(msg)
        elif isinstance(msg, EpochEnd):
            return self._on_end(msg)
        elif isinstance(msg, Heartbeat) and msg.generation < self.generation:
            raise RemoteProtocolError(f"HEARTBEAT from generation {msg.generation}, older than "
                                      f"{self.generation}")
        return msg

    def _on_hello(self, msg: Hello) -> None:
        if msg.version != PROTOCOL_VERSION:
            raise RemoteProtocolError(f"protocol version {msg.version} not supported "
                                      f"(this backup speaks {PROTOCOL_VERSION})")
        _check_nonce(msg.nonce)
        if msg.generation < 0:
            raise RemoteProtocolError(f"HELLO with negative generation {msg.generation}")
        if msg.generation < self.completed_generation:
            raise RemoteProtocolError(f"HELLO from generation {msg.generation}, older than the "
                                      f"committed generation {self.completed_generation}")
        self.hello, self.peer_nonce = msg, msg.nonce
        self._set_session_keys(msg.nonce, self.our_nonce, primary=False)
        if msg.generation != self.generation:
            self.generation, self.last_epoch = msg.generation, -1

    def _on_begin(self, msg: EpochBegin) -> None:
        g, e = msg.generation, msg.epoch
        if e < 0 or msg.full != (msg.base_epoch == -1):
            raise RemoteProtocolError(f"bad EPOCH_BEGIN {msg}: epoch < 0 or base_epoch not -1 "
                                      "exactly for a full checkpoint")
        if g < self.generation:
            raise RemoteProtocolError(f"generation went backwards: {g} after {self.generation}")
        if g > self.generation:
            if not msg.full:
                raise RemoteProtocolError(f"new generation {g} begins with a delta, not a full "
                                          "checkpoint")
            self.generation, self.last_epoch, self._broken = g, -1, False
        elif e <= self.last_epoch:
            raise RemoteProtocolError(f"epoch {e} after epoch {self.last_epoch} in generation {g}")
        if not msg.full and not self._broken and \
                (self.completed_generation, self.completed_epoch) != (g, msg.base_epoch):
            raise RemoteProtocolError(
                f"epoch {e} out of order: delta on ({g}, {msg.base_epoch}) but the last completed "
                f"epoch is ({self.completed_generation}, {self.completed_epoch})")
        self.last_epoch = self.open_epoch = e
        self._digest = EpochDigest()

    def _in_open_epoch(self, epoch: int, what: str) -> None:
        if epoch != self.open_epoch:
            raise RemoteProtocolError(f"{what} for epoch {epoch}, but epoch {self.open_epoch} "
                                      "is open")

    def _on_end(self, msg: EpochEnd) -> EpochComplete:
        self._in_open_epoch(msg.epoch, "EPOCH_END")
        d, problems = self._digest, []
        if msg.n_chunks != d.n_chunks:
            problems.append(f"{d.n_chunks} chunks received, {msg.n_chunks} announced")
        if msg.n_bytes != d.n_bytes:
            problems.append(f"{d.n_bytes} bytes received, {msg.n_bytes} announced")
        if not hmac.compare_digest(msg.digest, d.digest()):
            problems.append("digest mismatch")
        if self._broken:
            problems.append(f"generation {self.generation} is broken by an earlier failed epoch")
        ok = not problems
        ev = EpochComplete(self.generation, msg.epoch, ok, "; ".join(problems))
        if ok:
            self.completed_generation, self.completed_epoch = self.generation, msg.epoch
        else:
            self._broken = True
            log.warning("epoch (%d, %d) failed verification: %s", ev.generation, ev.epoch,
                        ev.reason)
        self.open_epoch = None
        self._unanswered.append(ev)
        return ev

    # -- send ----------------------------------------------------------------
    def _check_send(self, msg: Message) -> None:
        if isinstance(msg, Welcome):
            if msg.nonce != self.our_nonce:
                raise LocalProtocolError("WELCOME must carry this connection's nonce (our_nonce)")
            if self.hello is not None and msg.generation > self.hello.generation:
                raise LocalProtocolError(f"WELCOME claims generation {msg.generation}, newer than "
                                         f"the primary's {self.hello.generation}: send ERROR")
        elif isinstance(msg, Ack | Nack):
            self._check_answer(msg)

    def _check_answer(self, msg: Ack | Nack) -> None:
        pos = (msg.generation, msg.epoch)
        head = self._unanswered[0] if self._unanswered else None
        if head is None or (head.generation, head.epoch) != pos:
            oldest = (head.generation, head.epoch) if head else "none"
            raise LocalProtocolError(f"{type(msg).__name__.upper()} for {pos}, but the oldest "
                                     f"unanswered epoch is {oldest}")
        if isinstance(msg, Ack) and (not head.ok or msg.generation in self._nacked):
            raise LocalProtocolError(f"cannot ACK {pos}: it failed verification or its "
                                     "generation was NACKed")

    def _did_send(self, msg: Message) -> None:
        if isinstance(msg, Welcome):
            # What we announce is what deltas must build on.
            self.completed_generation, self.completed_epoch = msg.generation, msg.committed_epoch
            self.last_epoch = msg.committed_epoch if msg.generation == self.generation else -1
        elif isinstance(msg, Ack):
            self._unanswered.popleft()
        elif isinstance(msg, Nack):
            self._unanswered.popleft()
            self._nacked.add(msg.generation)
            if msg.generation == self.generation:
                self._broken = True
