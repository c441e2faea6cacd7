"""Pages of read-only file maps: dropped from this process once read, so that streaming a file through a
map leaves its resident set bounded by what is in flight, not by the file (the page cache keeps the pages;
the next touch maps them again)."""

from __future__ import annotations

import contextlib
import mmap

#: Bytes read through a map between two drops, where a reader walks a file front to back.
DROP_EVERY = 16 << 20


def drop(mm: mmap.mmap, start: int, end: int) -> None:
    """``MADV_DONTNEED`` on ``[start, end)`` of ``mm`` (from the page below ``start``); a no-op where the
    platform has no ``madvise``, or on a closed map."""
    start -= start % mmap.PAGESIZE
    if end > start and hasattr(mmap, "MADV_DONTNEED"):
        with contextlib.suppress(OSError, ValueError):
            mm.madvise(mmap.MADV_DONTNEED, start, end - start)
