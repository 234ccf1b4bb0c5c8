"""The backup's end of a replication connection (sans-I/O; see remus.protocol.connection)."""

from __future__ import annotations

import hmac
import logging
from collections import deque

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from remus.protocol.connection import (
    BACKUP_RECV,
    BACKUP_SEND,
    Connection,
    EpochComplete,
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
    Handover,
    Heartbeat,
    Hello,
    Message,
    Nack,
    Welcome,
)

log = logging.getLogger(__name__)


class BackupConnection(Connection):
    """The backup's end: validates the checkpoint stream, answers each epoch.

    Events: Hello, EpochBegin, Chunk, EpochComplete, Heartbeat, Error, Bye,
    ConnectionClosed. committed_generation/committed_epoch describe what the
    backup holds; completed_epoch follows every ok EpochComplete and may be
    set by the owner after a commit or discard.
    """

    SEND = BACKUP_SEND
    RECV = BACKUP_RECV

    def __init__(self, psk: Keys, kex_key: X25519PrivateKey | None = None,
                 committed_generation: int = -1, committed_epoch: int = -1,
                 max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        super().__init__(psk, kex_key, max_payload, State.WAIT_HELLO)
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
        elif isinstance(msg, Handover):
            self._on_handover(msg)
        elif isinstance(msg, Heartbeat) and msg.generation < self.generation:
            raise RemoteProtocolError(f"HEARTBEAT from generation {msg.generation}, older than "
                                      f"{self.generation}")
        return msg

    def _on_hello(self, msg: Hello) -> None:
        if msg.version != PROTOCOL_VERSION:
            raise RemoteProtocolError(f"protocol version {msg.version} not supported "
                                      f"(this backup speaks {PROTOCOL_VERSION})")
        check_nonce(msg.nonce)
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

    def _on_handover(self, msg: Handover) -> None:
        """Only from the epoch we completed last, and answered: the primary hands
        over what we hold, nothing newer and nothing we may still refuse."""
        pos = (msg.generation, msg.epoch)
        if pos != (self.completed_generation, self.completed_epoch) or self._broken:
            raise RemoteProtocolError(f"HANDOVER at {pos}, but the last completed epoch is "
                                      f"({self.completed_generation}, {self.completed_epoch})")
        if self._unanswered:
            raise RemoteProtocolError(f"HANDOVER at {pos} before we answered epoch "
                                      f"{self._unanswered[0].epoch}")

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
