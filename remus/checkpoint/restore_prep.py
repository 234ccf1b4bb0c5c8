"""Prepare a committed image set for the takeover restore.

The restore runs from a scratch copy (small files copied, pages files
symlinked) so the committed store is never modified, and the copy's TCP send
queues are marked *unsent*. Why: data the unit had queued at checkpoint time
was either never released by the dead primary's output buffer or is
unacknowledged; CRIU restores "sent" data in repair mode, after which the
kernel waits for its retransmission timer (1 s on a fresh socket) before
sending it. Marked unsent, CRIU transmits it as soon as it leaves repair mode
(same bytes, same sequence numbers; a client that has them just ACKs again),
so the client's blocked read completes right after the address comes up.
Every restored TCP timestamp clock is also moved forward by the age of its
image, and a bundle of all streams (CRIU patch 0008) is split back into
stock image files (see remus.checkpoint.tcp_stream).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from remus.checkpoint import tcp_stream

log = logging.getLogger(__name__)


def prepare(images: Path, scratch: Path) -> tuple[Path, int]:
    """Copy `images` into `scratch` (pages by symlink); returns (dir, queues changed)."""
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True)
    for p in images.iterdir():
        if p.name.endswith(".log") or p.name == tcp_stream.HELD_BUNDLE:
            continue
        target = p.resolve()
        if p.name.startswith("pages-"):
            os.symlink(target, scratch / p.name)
        else:
            shutil.copyfile(target, scratch / p.name)
    # Images the primary left here while only their clock moved are older than
    # the connection: move every clock on by at least the image's age.
    tcp_stream.advance_timestamps(scratch, ages_from=images)
    held = images / tcp_stream.HELD_BUNDLE
    if held.exists():
        # One file for all streams (CRIU patch 0008): back to stock image files,
        # each clock moved on by its own age.
        tcp_stream.split_bundle(held, scratch)
    changed = 0
    for p in scratch.glob("tcp-stream-*.img"):
        changed += _mark_unsent(p)
    return scratch, changed


def _mark_unsent(path: Path) -> int:
    from pycriu import images

    with open(path, "rb") as f:
        img = images.load(f)
    e = img["entries"][0]
    if not e.get("outq_len") or e.get("unsq_len") == e["outq_len"]:
        return 0
    e["unsq_len"] = e["outq_len"]
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        images.dump(img, f)
    os.replace(tmp, path)
    return 1
