"""The primary's end of a replication connection (sans-I/O; see remus.protocol.connection)."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from remus.protocol.connection import (
    PRIMARY_RECV,
    PRIMARY_SEND,
    Connection,
    Event,
    Keys,
    State,
    check_nonce,
)
from remus.protocol.frames import DEFAULT_MAX_PAYLOAD, LocalProtocolError, RemoteProtocolError
from remus.protocol.messages import (
    PROTOCOL_VERSION,
    Ack,
    Chunk,
    EpochBegin,
    EpochDigest,
    EpochEnd,
    Hello,
    Message,
    Nack,
    Welcome,
)


class PrimaryConnection(Connection):
    """The primary's end: sends checkpoints, receives ACK/NACK/HEARTBEAT.

    Events: Welcome, Ack, Nack, Heartbeat, Error, Bye, ConnectionClosed.
    Acks and Nacks must answer ended epochs one by one in order; `acked` is
    the last acknowledged (generation, epoch). After a NACK the generation
    is broken: the next EPOCH_BEGIN must open a higher generation, full.
    """

    SEND = PRIMARY_SEND
    RECV = PRIMARY_RECV

    def __init__(self, psk: Keys, unit_id: str, generation: int, spec: Mapping[str, Any],
                 kex_key: X25519PrivateKey | None = None,
                 max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        super().__init__(psk, kex_key, max_payload, State.IDLE)
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
        check_nonce(msg.nonce)
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
