"""TCP stream images: the timestamp clock, carried images, the takeover's advance."""

from __future__ import annotations

import io
import os
import struct
import time
from pathlib import Path

import pycriu
import pytest

from remus.checkpoint import restore_prep, tcp_stream
from remus.checkpoint.delta import Manifest, files_of
from remus.checkpoint.delta_encoder import DeltaEncoder
from remus.errors import CheckpointError

ENTRY = {"inq_len": 0, "inq_seq": 3273214409, "outq_len": 3, "outq_seq": 46948013,
         "opt_mask": 7, "snd_wscale": 10, "mss_clamp": 1460, "rcv_wscale": 10,
         "timestamp": 1884817518, "unsq_len": 0, "snd_wl1": 3273214409, "snd_wnd": 64512,
         "max_window": 64512, "rcv_wnd": 92160, "rcv_wup": 3273214409}


def image(queues: bytes = b"abc", **fields: int) -> bytes:
    buf = io.BytesIO()
    pycriu.images.dump({"magic": "TCP_STREAM", "entries": [{**ENTRY, **fields}]}, buf)
    return buf.getvalue() + queues  # CRIU writes the queue bytes after the entry


def entry(data: bytes) -> dict[str, int]:
    e = dict(pycriu.images.load(io.BytesIO(data))["entries"][0])
    e.pop("extra", None)  # the queues, as pycriu shows them
    return e


def test_timestamp_is_found_and_rewritten_as_pycriu_reads_it() -> None:
    data = image()
    assert tcp_stream.read_timestamp(data) == ENTRY["timestamp"]
    for value in (ENTRY["timestamp"] + 60_000, 5, 2**32 + 7, 2**28 - 1, 2**28):
        out = tcp_stream.with_timestamp(data, value)  # varint lengths change too
        assert entry(out) == {**ENTRY, "timestamp": value % 2**32}
        assert out.endswith(b"abc")
    no_ts = image(opt_mask=3, timestamp=0)
    no_ts_entry = {k: v for k, v in ENTRY.items() if k != "timestamp"}
    raw = io.BytesIO()
    pycriu.images.dump({"magic": "TCP_STREAM", "entries": [{**no_ts_entry}]}, raw)
    assert tcp_stream.read_timestamp(raw.getvalue()) is None
    assert tcp_stream.with_timestamp(raw.getvalue(), 9) == raw.getvalue()
    assert tcp_stream.read_timestamp(no_ts) == 0
    assert tcp_stream.timestamp_span(b"not an image") is None


def test_only_a_timestamp_change_is_recognised() -> None:
    a = image()
    span = tcp_stream.timestamp_span(a)
    assert span is not None
    assert tcp_stream.timestamp_only_change(a, image(timestamp=ENTRY["timestamp"] + 378), None) == span
    assert tcp_stream.timestamp_only_change(a, image(timestamp=ENTRY["timestamp"] + 1), span) == span
    for other in (image(outq_seq=46948014), image(queues=b"abd"), image(rcv_wnd=92161),
                  image(timestamp=5)):  # a shorter varint: the layout moved
        assert tcp_stream.timestamp_only_change(a, other, span) is None


def dump(root: Path, n: int, streams: dict[str, bytes]) -> Path:
    d = root / f"d{n}"
    d.mkdir()
    (d / "core-1.img").write_bytes(b"core")
    for name, data in streams.items():
        (d / name).write_bytes(data)
    return d


def sent(chunks: list) -> dict[str, bytes]:  # type: ignore[type-arg]
    return dict(f for c in chunks for f in files_of(c))


def test_encoder_leaves_images_whose_clock_only_moved(tmp_path: Path) -> None:
    enc = DeltaEncoder()
    idle, busy = "tcp-stream-a1.img", "tcp-stream-b2.img"
    ts = ENTRY["timestamp"]
    first = {idle: image(timestamp=ts), busy: image(timestamp=ts)}
    got = sent(list(enc.encode(dump(tmp_path, 0, first), full=True)))
    assert set(got) == {"core-1.img", idle, busy}  # a full checkpoint sends all
    backup = dict(got)
    for epoch in range(1, 5):
        now = {idle: image(timestamp=ts + 50 * epoch),
               busy: image(timestamp=ts + 50 * epoch, outq_seq=ENTRY["outq_seq"] + epoch)}
        chunks = list(enc.encode(dump(tmp_path, epoch, now), full=False))
        got = sent(chunks)
        assert set(got) == {busy}, epoch
        backup.update(got)
        assert enc.stats.streams_carried == 1
        manifest = Manifest.from_json(chunks[-1][2])
        # the manifest describes the copy the backup keeps
        for name, data in backup.items():
            assert manifest.files[name].size == len(data)
    # a real change is sent, and so is the next clock-only change after a full
    now = {idle: image(timestamp=ts + 300, inq_len=0, rcv_wnd=1000), busy: image(timestamp=ts)}
    assert idle in sent(list(enc.encode(dump(tmp_path, 5, now), full=False)))
    now = {idle: image(timestamp=ts + 350, rcv_wnd=1000), busy: image(timestamp=ts)}
    assert set(sent(list(enc.encode(dump(tmp_path, 6, now), full=True)))) >= {idle, busy}


def test_takeover_moves_every_clock_forward_by_the_image_age(tmp_path: Path) -> None:
    store, scratch = tmp_path / "store", tmp_path / "scratch"
    store.mkdir()
    scratch.mkdir()
    now = time.time()
    for name, age_s in (("tcp-stream-1.img", 0.0), ("tcp-stream-2.img", 3600.0)):
        (store / name).write_bytes(image())
        os.utime(store / name, (now - age_s, now - age_s))
        (scratch / name).write_bytes(image())
    (scratch / "core-1.img").write_bytes(b"core")
    assert tcp_stream.advance_timestamps(scratch, ages_from=store, now=now) == 2
    fresh = tcp_stream.read_timestamp((scratch / "tcp-stream-1.img").read_bytes())
    old = tcp_stream.read_timestamp((scratch / "tcp-stream-2.img").read_bytes())
    assert fresh == ENTRY["timestamp"] + tcp_stream.ADVANCE_MARGIN_MS
    assert old == pytest.approx(ENTRY["timestamp"] + tcp_stream.ADVANCE_MARGIN_MS + 3_600_000, abs=2)
    assert (scratch / "core-1.img").read_bytes() == b"core"
    assert entry((scratch / "tcp-stream-2.img").read_bytes())["outq_seq"] == ENTRY["outq_seq"]


# -- one file for all streams (CRIU patch 0008) --------------------------------

def raw_bundle(streams: list[tuple[int, bytes]]) -> bytes:
    """What CRIU_REMUS_TCP_BUNDLE=1 writes: u32 inode, u32 length, the image."""
    return b"".join(struct.pack("<II", ino, len(data)) + data for ino, data in streams)


def bundled_dump(root: Path, n: int, streams: list[tuple[int, bytes]], mtime: float) -> Path:
    d = dump(root, n, {})
    if streams:
        path = d / tcp_stream.RAW_BUNDLE
        path.write_bytes(raw_bundle(streams))
        os.utime(path, (mtime, mtime))
    return d


def held_of(got: dict[str, bytes]) -> dict[int, tcp_stream.HeldStream]:
    _, streams = tcp_stream.parse_held(got[tcp_stream.HELD_BUNDLE])
    return {s.ino: s for s in streams}


def test_raw_bundle_parses_and_refuses_damage() -> None:
    recs = [(0xA1, image()), (0xB2, image(queues=b"x" * 5000))]
    assert tcp_stream.parse_raw_bundle(raw_bundle(recs)) == recs
    assert tcp_stream.parse_raw_bundle(b"") == []
    whole = raw_bundle(recs)
    for cut in (3, 20, len(whole) - 1):
        with pytest.raises(CheckpointError):
            tcp_stream.parse_raw_bundle(whole[:cut])
    held = tcp_stream.build_held([tcp_stream.HeldStream(7, image(), 123)], 456)
    assert tcp_stream.parse_held(held) == (456, [tcp_stream.HeldStream(7, image(), 123)])
    for bad in (held[:-1], b"XXXX" + held[4:], held[:10]):
        with pytest.raises(CheckpointError):
            tcp_stream.parse_held(bad)


def test_encoder_keeps_one_held_file_and_carries_idle_streams(tmp_path: Path) -> None:
    enc = DeltaEncoder()
    ts, t0 = ENTRY["timestamp"], 1_700_000_000.0
    idle, busy = 0xA1, 0xB2
    d = bundled_dump(tmp_path, 0, [(idle, image(timestamp=ts)), (busy, image(timestamp=ts))], t0)
    got = sent(list(enc.encode(d, full=True)))
    assert tcp_stream.RAW_BUNDLE not in got and not any(tcp_stream.is_tcp_stream(n) for n in got)
    held = held_of(got)
    assert list(held) == [idle, busy]
    assert held[idle].image == image(timestamp=ts) and held[idle].dumped_ms == int(t0 * 1000)
    for epoch in range(1, 4):
        d = bundled_dump(tmp_path, epoch, [
            (idle, image(timestamp=ts + 50 * epoch)),
            (busy, image(timestamp=ts + 50 * epoch, outq_seq=ENTRY["outq_seq"] + epoch))],
            t0 + epoch)
        chunks = list(enc.encode(d, full=False))
        got = sent(chunks)
        held = held_of(got)
        # the idle stream: the backup's copy, with its first dump time
        assert held[idle].image == image(timestamp=ts)
        assert held[idle].dumped_ms == int(t0 * 1000)
        assert entry(held[busy].image)["outq_seq"] == ENTRY["outq_seq"] + epoch
        assert held[busy].dumped_ms == int((t0 + epoch) * 1000)
        assert enc.stats.streams_carried == 1
        manifest = Manifest.from_json(chunks[-1][2])
        assert manifest.files[tcp_stream.HELD_BUNDLE].size == len(got[tcp_stream.HELD_BUNDLE])
    # only clocks moved: nothing sent, the backup's file stands
    backup_info = manifest.files[tcp_stream.HELD_BUNDLE]
    d = bundled_dump(tmp_path, 4, [
        (idle, image(timestamp=ts + 400)),
        (busy, image(timestamp=ts + 400, outq_seq=ENTRY["outq_seq"] + 3))], t0 + 4)
    chunks = list(enc.encode(d, full=False))
    assert tcp_stream.HELD_BUNDLE not in sent(chunks)
    assert Manifest.from_json(chunks[-1][2]).files[tcp_stream.HELD_BUNDLE] == backup_info
    # a stream that goes away changes the file; with none left it leaves the manifest
    d = bundled_dump(tmp_path, 5, [(idle, image(timestamp=ts + 450))], t0 + 5)
    assert list(held_of(sent(list(enc.encode(d, full=False))))) == [idle]
    d = bundled_dump(tmp_path, 6, [], t0 + 6)
    chunks = list(enc.encode(d, full=False))
    assert tcp_stream.HELD_BUNDLE not in Manifest.from_json(chunks[-1][2]).files
    # a full checkpoint holds every stream anew
    d = bundled_dump(tmp_path, 7, [(idle, image(timestamp=ts + 500))], t0 + 7)
    held = held_of(sent(list(enc.encode(d, full=True))))
    assert held[idle].image == image(timestamp=ts + 500)


def test_an_abandoned_encode_leaves_the_held_streams(tmp_path: Path) -> None:
    enc = DeltaEncoder()
    ts, t0 = ENTRY["timestamp"], 1_700_000_000.0
    d = bundled_dump(tmp_path, 0, [(1, image(timestamp=ts))], t0)
    list(enc.encode(d, full=True))
    d = bundled_dump(tmp_path, 1, [(1, image(timestamp=ts, rcv_wnd=5))], t0 + 1)
    it = enc.encode(d, full=False)
    next(it)  # the held file goes out, then the link dies
    d = bundled_dump(tmp_path, 2, [(1, image(timestamp=ts + 9))], t0 + 2)
    chunks = list(enc.encode(d, full=False))
    # the backup never got epoch 1: its copy is still epoch 0's, and only the clock moved since
    assert tcp_stream.HELD_BUNDLE not in sent(chunks)


def test_split_bundle_writes_stock_images_with_their_own_age(tmp_path: Path) -> None:
    built = 1_700_000_000_000
    held = tmp_path / tcp_stream.HELD_BUNDLE
    held.write_bytes(tcp_stream.build_held([
        tcp_stream.HeldStream(0x1F, image(), built),                # fresh when built
        tcp_stream.HeldStream(0x2E, image(queues=b"q"), built - 3_600_000),  # an hour old
    ], built))
    now = time.time()
    os.utime(held, (now - 10, now - 10))  # written on the backup 10 s ago
    out = tmp_path / "scratch"
    out.mkdir()
    paths = tcp_stream.split_bundle(held, out, now=now)
    assert sorted(p.name for p in paths) == ["tcp-stream-1f.img", "tcp-stream-2e.img"]
    fresh = tcp_stream.read_timestamp((out / "tcp-stream-1f.img").read_bytes())
    old = (out / "tcp-stream-2e.img").read_bytes()
    margin = tcp_stream.ADVANCE_MARGIN_MS
    assert fresh == pytest.approx(ENTRY["timestamp"] + margin + 10_000, abs=2)
    assert tcp_stream.read_timestamp(old) == pytest.approx(
        ENTRY["timestamp"] + margin + 3_610_000, abs=2)
    assert old.endswith(b"q") and entry(old)["outq_seq"] == ENTRY["outq_seq"]


def test_restore_prep_splits_the_held_bundle(tmp_path: Path) -> None:
    store, scratch = tmp_path / "store", tmp_path / "scratch"
    store.mkdir()
    (store / "core-1.img").write_bytes(b"core")
    (store / tcp_stream.HELD_BUNDLE).write_bytes(tcp_stream.build_held(
        [tcp_stream.HeldStream(0xAB, image(outq_len=3, unsq_len=0), 1)], 1))
    d, queues = restore_prep.prepare(store, scratch)
    assert sorted(p.name for p in d.iterdir()) == ["core-1.img", "tcp-stream-ab.img"]
    assert queues == 1  # its send queue is marked unsent, as for a stock image
    assert entry((d / "tcp-stream-ab.img").read_bytes())["unsq_len"] == 3
