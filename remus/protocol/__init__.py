"""Replication wire protocol, sans-I/O (see docs/protocol.md).

frames: header + payload + HMAC tag, keys; messages: the message dataclasses
and their field tables; states: the primary and backup state machines.
Transports (remus.link) feed bytes in and write the bytes these return.
"""

from remus.protocol import frames, messages, states
from remus.protocol.frames import (
    DEFAULT_MAX_PAYLOAD,
    Frame,
    FrameDecoder,
    FrameWriter,
    LocalProtocolError,
    RemoteProtocolError,
    derive_session_keys,
    encode_frame,
    load_key,
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
from remus.protocol.states import (
    NEED_DATA,
    BackupConnection,
    ConnectionClosed,
    EpochComplete,
    Event,
    NeedData,
    PrimaryConnection,
    State,
)

__all__ = [
    "DEFAULT_MAX_PAYLOAD", "NEED_DATA", "PROTOCOL_VERSION",
    "Ack", "BackupConnection", "Bye", "Chunk", "ConnectionClosed", "EpochBegin",
    "EpochComplete", "EpochDigest", "EpochEnd", "Error", "Event", "Frame", "FrameDecoder",
    "FrameWriter", "Heartbeat", "Hello", "LocalProtocolError", "Message", "Nack", "NeedData",
    "PrimaryConnection", "RemoteProtocolError", "State", "Welcome",
    "decode_message", "derive_session_keys", "encode_frame", "encode_message", "frames",
    "load_key", "messages", "states",
]
