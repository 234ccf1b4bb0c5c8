"""Key files, the key ring that follows them, and rotation without downtime."""

from __future__ import annotations

import itertools
import logging
import os
from pathlib import Path

import pytest

from remus.errors import ConfigError
from remus.protocol import BackupConnection, PrimaryConnection, RemoteProtocolError, State
from remus.protocol import messages as m
from remus.protocol.keys import (
    KeyRing,
    fingerprint,
    load_key,
    load_keys,
    parse_keys,
    promote,
    retire,
    stage,
    write_keys,
)


def _key_file(tmp_path: Path, content: bytes, mode: int = 0o600) -> Path:
    p = tmp_path / "key"
    p.write_bytes(content)
    p.chmod(mode)
    return p


# -- key files ---------------------------------------------------------------
def test_load_key_hex_and_raw(tmp_path: Path) -> None:
    key = os.urandom(32)
    assert load_key(_key_file(tmp_path, key.hex().encode() + b"\n")) == key
    assert load_key(_key_file(tmp_path, b"  a raw passphrase key \n")) == b"a raw passphrase key"


def test_several_hex_lines_are_a_ring_comments_ignored() -> None:
    a, b = os.urandom(32), os.urandom(16)
    text = f"# rotation 2026-11\n{a.hex()}\n\n  {b.hex().upper()}  \n".encode()
    assert parse_keys(text, "f") == (a, b)


def test_a_short_key_in_a_ring_is_named() -> None:
    text = f"{os.urandom(32).hex()}\n{os.urandom(15).hex()}\n".encode()
    with pytest.raises(ConfigError, match="key 2 of f holds 15 bytes"):
        parse_keys(text, "f")


def test_load_key_too_short(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="at least 16"):
        load_key(_key_file(tmp_path, os.urandom(15).hex().encode()))  # 30 hex chars = 15 bytes


def test_load_key_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_key(tmp_path / "missing")


def test_load_key_world_readable_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="remus.protocol.keys"):
        assert load_key(_key_file(tmp_path, b"k" * 20, mode=0o644)) == b"k" * 20
    assert "world-readable" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="remus.protocol.keys"):
        load_key(_key_file(tmp_path, b"k" * 20, mode=0o600))
    assert "world-readable" not in caplog.text


def test_write_keys_is_private_and_round_trips(tmp_path: Path) -> None:
    keys = (os.urandom(32), os.urandom(32))
    path = tmp_path / "etc" / "key"
    write_keys(path, keys)
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_keys(path) == keys
    assert [p.name for p in path.parent.iterdir()] == ["key"]  # no temporary left


def test_fingerprint_is_short_stable_and_not_the_key() -> None:
    key = os.urandom(32)
    assert fingerprint(key) == fingerprint(key) != fingerprint(os.urandom(32))
    assert len(fingerprint(key)) == 8 and fingerprint(key) not in key.hex()


# -- the ring follows the file -----------------------------------------------------
def test_ring_reads_the_file_again_when_it_changes(tmp_path: Path) -> None:
    a, b = os.urandom(32), os.urandom(32)
    path = tmp_path / "key"
    write_keys(path, (a,))
    ring = KeyRing(path)
    assert ring.keys() == (a,)
    write_keys(path, (b, a))
    assert ring.keys() == (b, a)


def test_ring_keeps_the_last_good_keys(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    a = os.urandom(32)
    path = tmp_path / "key"
    write_keys(path, (a,))
    ring = KeyRing(path)
    path.write_text("abcd\n")  # 2 bytes: invalid
    with caplog.at_level(logging.ERROR, logger="remus.protocol.keys"):
        assert ring.keys() == (a,)
        assert ring.keys() == (a,)
        path.unlink()
        assert ring.keys() == (a,)
    assert caplog.text.count("keeping the 1 key(s)") == 2  # once per problem, not per call


def test_ring_refuses_a_bad_file_at_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        KeyRing(_key_file(tmp_path, b"short"))


# -- rotation --------------------------------------------------------------------
def _handshake(primary_keys: tuple[bytes, ...], backup_keys: tuple[bytes, ...]) -> bool:
    """A HELLO/WELCOME and one heartbeat each way between two key rings."""
    p = PrimaryConnection(primary_keys, "u", 1, {})
    b = BackupConnection(backup_keys)
    try:
        b.receive_data(p.start())
        assert isinstance(b.next_event(), m.Hello)
        p.receive_data(b.welcome())
        assert isinstance(p.next_event(), m.Welcome)
    except RemoteProtocolError:
        return False
    hb = m.Heartbeat(generation=1, epoch=0, acked=-1, sent_ns=1)
    b.receive_data(p.send(hb))
    p.receive_data(b.send(hb))
    assert b.next_event() == hb and p.next_event() == hb
    assert p.state is b.state is State.READY
    return True


def test_rotation_phases_keep_every_mix_of_hosts_connected() -> None:
    old = (os.urandom(32),)
    staged = stage(old)
    promoted = promote(staged)
    retired = retire(promoted)
    assert staged[0] == old[0] and promoted[0] == staged[-1] and retired == promoted[:1]
    phases = [old, staged, promoted, retired]
    # Within a phase, and between a host done with a phase and one not yet:
    for before, after in itertools.pairwise(phases):
        for x, y in ((before, before), (before, after), (after, before), (after, after)):
            assert _handshake(x, y), (phases.index(x), phases.index(y))
    # Skipping a phase on one host breaks it: the order matters.
    assert not _handshake(promoted, old)
    assert not _handshake(retired, old) and not _handshake(old, retired)


def test_promote_needs_a_staged_key() -> None:
    with pytest.raises(ConfigError, match="stage"):
        promote((os.urandom(32),))


def test_connection_lives_on_the_key_that_opened_it() -> None:
    old, new = os.urandom(32), os.urandom(32)
    p = PrimaryConnection([old], "u", 1, {})
    b = BackupConnection([new, old])
    b.receive_data(p.start())
    b.next_event()
    p.receive_data(b.welcome())  # sealed with old: the primary knows no other
    assert isinstance(p.next_event(), m.Welcome)
    assert b.sealed_with == old and p.sealed_with == old
