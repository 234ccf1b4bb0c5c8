"""Replication wire protocol, sans-I/O (see docs/protocol.md).

frames: header + sealed payload (AES-256-GCM), session keys; keys: key
files, the key ring, rotation; messages: the message dataclasses
and their field tables; connection: the states, events, transition tables
and the machinery both ends share; primary_connection and backup_connection:
the primary's and the backup's end.
Transports (remus.link) feed bytes in and write the bytes these return.
"""

from remus.protocol import backup_connection, connection, frames, keys, messages, primary_connection
from remus.protocol.backup_connection import BackupConnection
from remus.protocol.connection import (
    NEED_DATA,
    ConnectionClosed,
    EpochComplete,
    Event,
    NeedData,
    State,
)
from remus.protocol.frames import (
    DEFAULT_MAX_PAYLOAD,
    Frame,
    FrameDecoder,
    FrameWriter,
    LocalProtocolError,
    RemoteProtocolError,
    derive_session_keys,
    encode_frame,
)
from remus.protocol.keys import KeyRing, load_key, load_keys
from remus.protocol.messages import (
    PROTOCOL_VERSION,
    Ack,
    Bye,
    Chunk,
    EpochBegin,
    EpochDigest,
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
from remus.protocol.primary_connection import PrimaryConnection

__all__ = [
    "DEFAULT_MAX_PAYLOAD", "NEED_DATA", "PROTOCOL_VERSION",
    "Ack", "BackupConnection", "Bye", "Chunk", "ConnectionClosed", "EpochBegin",
    "EpochComplete", "EpochDigest", "EpochEnd", "Error", "Event", "Frame", "FrameDecoder",
    "FrameWriter", "Handover", "Heartbeat", "Hello", "KeyRing", "LocalProtocolError", "Message",
    "Nack", "NeedData",
    "PrimaryConnection", "RemoteProtocolError", "State", "Welcome",
    "backup_connection", "connection", "decode_message", "derive_session_keys", "encode_frame",
    "encode_message", "frames", "keys", "load_key", "load_keys", "messages", "primary_connection",
]
