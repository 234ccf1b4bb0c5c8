"""The replication protocol's connection machinery (sans-I/O, like h11).

A connection object turns messages into bytes (send) and bytes into events
(receive_data + next_event); it never touches a socket or a clock. Each
role's legal moves are its SEND/RECV tables below; anything else raises
LocalProtocolError (our misuse: nothing encoded, state unchanged) or
RemoteProtocolError (the peer broke the protocol: state ERROR, after which
every call raises LocalProtocolError except sending one Error to say why).
The session, the lineage rules (generation, epoch, base) and why a failed
epoch breaks its generation are described in docs/protocol.md.

Here: the states, the events, the four transition tables and `Connection`,
the machinery both ends share. The ends: remus.protocol.primary_connection
and remus.protocol.backup_connection.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from remus.protocol.frames import (
    NONCE_SIZE,
    Buffer,
    FrameDecoder,
    FrameWriter,
    LocalProtocolError,
    RemoteProtocolError,
    derive_session_keys,
    kex_public,
    kex_shared,
    key_list,
    new_kex_key,
)
from remus.protocol.keys import KeyRing
from remus.protocol.messages import (
    Ack,
    Bye,
    Chunk,
    EpochBegin,
    EpochEnd,
    Error,
    Handover,
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

# One PSK, a ring of them (the first seals, all open), or a key file's ring.
Keys = bytes | Sequence[bytes] | KeyRing

S = State
_LIVE = (S.READY, S.IN_EPOCH)

PRIMARY_SEND: Transitions = {
    (S.IDLE, Hello): S.SENT_HELLO,
    (S.READY, EpochBegin): S.IN_EPOCH,
    (S.IN_EPOCH, Chunk): S.IN_EPOCH,
    (S.IN_EPOCH, EpochEnd): S.READY,
    **{(s, Heartbeat): s for s in _LIVE},
    **{(s, m): S.CLOSED for s in _LIVE for m in (Error, Bye)},
    (S.READY, Handover): S.CLOSED,
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
    (S.READY, Handover): S.CLOSED,
}


class Connection:
    """Shared machinery: framing, keys, table lookup, ERROR handling."""

    SEND: ClassVar[Transitions]
    RECV: ClassVar[Transitions]

    def __init__(self, psk: Keys, kex_key: X25519PrivateKey | None, max_payload: int,
                 initial: State) -> None:
        keys = key_list(psk.keys() if isinstance(psk, KeyRing) else psk)
        self._kex = new_kex_key() if kex_key is None else kex_key
        # Our "nonce" is our ephemeral X25519 public key: fresh per connection.
        self.our_nonce = kex_public(self._kex)
        self.peer_nonce: bytes | None = None
        self._psk = keys[0]
        self._writer = FrameWriter(keys[0], max_payload)
        self._reader = FrameDecoder(keys, max_payload)
        self._state = initial
        self._peer_closed = False
        self._closed_event: ConnectionClosed | None = None
        self._error: str | None = None
        self._error_sent = False

    @property
    def state(self) -> State:
        return self._state

    @property
    def closed(self) -> bool:
        """The conversation is over (BYE/ERROR sent or received, or EOF)."""
        return self._state is State.CLOSED

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
        """Derive both directions' keys from the X25519 exchange. The PSK is the
        one the HELLO was sealed with: ours on the primary, the one that
        opened it on the backup (which then also seals its WELCOME with it)."""
        psk = self._psk
        if not primary and self._reader.matched_psk is not None:
            psk = self._reader.matched_psk
            self._writer.use_psk(psk)
        shared = kex_shared(self._kex, nonce_backup if primary else nonce_primary)
        p2b, b2p = derive_session_keys(psk, shared, nonce_primary, nonce_backup)
        ours, theirs = (p2b, b2p) if primary else (b2p, p2b)
        self._writer.set_session_key(ours)
        self._reader.set_session_key(theirs)

    @property
    def sealed_with(self) -> bytes:
        """The PSK this connection's first frames were sealed with."""
        return self._reader.matched_psk or self._psk

    # -- role hooks ----------------------------------------------------------
    def _on_receive(self, msg: Message) -> Event:
        """Validate a received message (RemoteProtocolError) and return its event."""
        return msg

    def _check_send(self, msg: Message) -> None:
        """Validate an outgoing message (LocalProtocolError); no side effects."""

    def _did_send(self, msg: Message) -> None:
        """Bookkeeping after msg was encoded."""


def check_nonce(nonce: bytes) -> None:
    if len(nonce) != NONCE_SIZE:
        raise RemoteProtocolError(f"nonce of {len(nonce)} bytes, expected {NONCE_SIZE}")
