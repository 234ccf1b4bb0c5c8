"""TCP stream images: the timestamp clock, carried images, the takeover's advance."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import pycriu
import pytest

from remus.checkpoint import tcp_stream
from remus.checkpoint.delta import Manifest, files_of
from remus.checkpoint.delta_encoder import DeltaEncoder

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
