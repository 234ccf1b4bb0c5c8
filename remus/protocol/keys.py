"""Pre-shared keys: key files, the key ring, and rotation without downtime.

A key file holds one key, or several (a rotation in progress):

* one or more lines of hex (an even number of digits each, at least
  MIN_KEY_SIZE bytes); empty lines and lines starting with ``#`` are
  ignored. The first key seals what this host sends first on a connection;
  every key opens what the peer sends first. `remus keygen` writes this form.
* anything else is one raw key: the whole file, surrounding whitespace
  stripped (a passphrase file).

Rotation in three phases, each done on every host before the next (any host
order within a phase works: adjacent phases always share a key both sides
accept):

1. ``remus keygen --stage FILE``: append a new key (accepted, not used yet);
2. ``remus keygen --promote FILE``: move the newest key first (used from now);
3. ``remus keygen --retire FILE``: keep only the first key.

Running agents read the file again (when it changed) for every new
connection, so a rotation needs no restart; connections already open keep
their session keys, which are independent of the PSK once derived.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import stat
from pathlib import Path

from remus.errors import ConfigError
from remus.protocol.frames import MIN_KEY_SIZE
from remus.saying import Once

log = logging.getLogger(__name__)

_HEX_LINE = re.compile(rb"(?:[0-9a-fA-F]{2})+")


def parse_keys(raw: bytes, source: str) -> tuple[bytes, ...]:
    """The keys a key file's content holds (see the module doc); ConfigError if
    there are none or one is shorter than MIN_KEY_SIZE."""
    lines = [ln.strip() for ln in raw.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith(b"#")]
    if lines and all(_HEX_LINE.fullmatch(ln) for ln in lines):
        keys = tuple(bytes.fromhex(ln.decode("ascii")) for ln in lines)
    else:
        keys = (raw.strip(),)
    for i, key in enumerate(keys):
        if len(key) < MIN_KEY_SIZE:
            which = f"key {i + 1} of {source}" if len(keys) > 1 else f"key file {source}"
            raise ConfigError(f"{which} holds {len(key)} bytes; at least {MIN_KEY_SIZE} needed")
    return keys


def _read(path: Path) -> tuple[os.stat_result, bytes]:
    try:
        st = path.stat()
        return st, path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read key file {path}: {e.strerror or e}") from e


def _warn_mode(path: Path, mode: int) -> None:
    if mode & stat.S_IROTH:
        log.warning("key file %s is world-readable; anyone on this host can read the "
                    "replication stream and forge checkpoints (chmod 600 it)", path)


def load_keys(path: str | os.PathLike[str]) -> tuple[bytes, ...]:
    """All keys of a key file, first = the one we seal with."""
    p = Path(path)
    st, raw = _read(p)
    _warn_mode(p, st.st_mode)
    return parse_keys(raw, str(p))


def load_key(path: str | os.PathLike[str]) -> bytes:
    """The key a key file seals with (its first)."""
    return load_keys(path)[0]


class KeyRing:
    """The keys of a key file, read again whenever the file changes.

    `keys()` is called for each new connection: a key rotation reaches running
    agents without a restart. A file that becomes unreadable or invalid keeps
    the last good keys (logged once per change), so a half-edited file never
    cuts replication.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        st, raw = _read(self.path)
        _warn_mode(self.path, st.st_mode)
        self._keys = parse_keys(raw, str(self.path))
        self._sig = self._signature(st)
        self._once = Once(log)  # a bad file is said once per problem

    @staticmethod
    def _signature(st: os.stat_result) -> tuple[int, int, int, int]:
        return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def keys(self) -> tuple[bytes, ...]:
        try:
            st = self.path.stat()
        except OSError as e:
            self._say(f"cannot read key file {self.path}: {e.strerror or e}")
            return self._keys
        if self._signature(st) == self._sig:
            return self._keys
        try:
            st, raw = _read(self.path)
            keys = parse_keys(raw, str(self.path))
        except ConfigError as e:
            self._say(str(e))
            return self._keys
        if keys != self._keys:
            log.info("key file %s changed: %d key(s), sealing with key %s...", self.path,
                     len(keys), fingerprint(keys[0]))
        _warn_mode(self.path, st.st_mode)
        self._keys, self._sig = keys, self._signature(st)
        self._once.forget()
        return self._keys

    def _say(self, problem: str) -> None:
        self._once.say(f"{problem}; keeping the {len(self._keys)} key(s) read before",
                       logging.ERROR, key=problem)


def fingerprint(key: bytes) -> str:
    """A short, non-secret name for a key (first 8 hex digits of its SHA-256)."""
    import hashlib

    return hashlib.sha256(b"remus-key-fingerprint" + key).hexdigest()[:8]


# -- writing key files (remus keygen) ------------------------------------------------
def new_key() -> bytes:
    return secrets.token_bytes(32)


def write_keys(path: str | os.PathLike[str], keys: tuple[bytes, ...]) -> None:
    """Replace the key file atomically (mode 0600), one hex key per line."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write("".join(k.hex() + "\n" for k in keys))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def stage(keys: tuple[bytes, ...]) -> tuple[bytes, ...]:
    """Rotation phase 1: a new key, accepted but not used yet."""
    return (*keys, new_key())


def promote(keys: tuple[bytes, ...]) -> tuple[bytes, ...]:
    """Rotation phase 2: the newest (last) key seals from now on."""
    if len(keys) < 2:
        raise ConfigError("only one key in the file: stage a new key first (--stage)")
    return (keys[-1], *keys[:-1])


def retire(keys: tuple[bytes, ...]) -> tuple[bytes, ...]:
    """Rotation phase 3: only the key in use remains."""
    return keys[:1]
