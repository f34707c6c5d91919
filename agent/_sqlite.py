"""SQLite files we own, judged before SQLite opens them: damage it would otherwise swallow in silence.

SQLite replays a write-ahead log only up to the first frame whose checksum fails and ignores the
rest without a word. A torn last frame after a crash is normal; committed frames of the same
generation *after* a bad one mean a flipped bit swallowed data that was written. Both the
delegate's outbox and the control plane's database refuse to start on that, naming the file.
Nothing here imports anything else of ours.
"""

from __future__ import annotations

import struct
from pathlib import Path

_WAL_HEADER = 32
_FRAME_HEADER = 24
_WAL_MAGIC = {0x377F0682: "<", 0x377F0683: ">"}


def _checksum(data: bytes, order: str, s0: int, s1: int) -> tuple[int, int]:
    words = struct.unpack(f"{order}{len(data) // 4}I", data)
    for i in range(0, len(words), 2):
        s0 = (s0 + words[i] + s1) & 0xFFFFFFFF
        s1 = (s1 + words[i + 1] + s0) & 0xFFFFFFFF
    return s0, s1


def wal_damage(wal: Path) -> str | None:
    """Why SQLite would silently drop committed frames of this WAL, or None when it would not."""
    try:
        data = wal.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot read {wal.name}: {exc.strerror}"
    if len(data) <= _WAL_HEADER:
        return None
    magic, _version, page_size, _seq, salt1, salt2, c0, c1 = struct.unpack(">8I", data[:_WAL_HEADER])
    order = _WAL_MAGIC.get(magic)
    if order is None or page_size < 512 or page_size & (page_size - 1):
        return f"{wal.name} has no valid header, so SQLite would ignore all of it"
    if _checksum(data[:24], order, 0, 0) != (c0, c1):
        return f"the header of {wal.name} fails its checksum, so SQLite would ignore all of it"
    frame_size = _FRAME_HEADER + page_size
    s = (c0, c1)
    frames = (len(data) - _WAL_HEADER) // frame_size
    bad_at: int | None = None
    lost = 0
    for n in range(frames):
        start = _WAL_HEADER + n * frame_size
        header = data[start : start + _FRAME_HEADER]
        _page, commit, f_salt1, f_salt2, f0, f1 = struct.unpack(">6I", header)
        if (f_salt1, f_salt2) != (salt1, salt2):
            continue  # a frame from an earlier generation: reused space, not data
        if bad_at is None:
            s = _checksum(header[:8] + data[start + _FRAME_HEADER : start + frame_size], order, *s)
            if s != (f0, f1):
                bad_at = n
        elif commit:
            lost += 1
    if bad_at is not None and lost:
        return (
            f"frame {bad_at + 1} of {wal.name} fails its checksum and {lost} committed transaction(s) after it "
            "would be silently dropped"
        )
    return None
