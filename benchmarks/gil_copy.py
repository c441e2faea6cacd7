"""How fast a copy loop runs while ``import torch`` holds the GIL: in a thread of the importing process, in a
forked child, or alone (RESULTS.md, fourth session). No streammerge code.

    python3 benchmarks/gil_copy.py SRC DST {thread,fork,alone}

SRC: a large file in the page cache (e.g. a base shard); DST: a scratch path on the disk under test (deleted).
The loop is streammerge's copy: 8 MiB ``preadv`` into an aligned buffer, ``pwrite`` to an ``O_DIRECT`` file.
"""

from __future__ import annotations

import importlib
import mmap
import os
import sys
import threading
import time

BUF = 8 << 20


def copy(src_path: str, dst_path: str) -> list[tuple[float, int]]:
    """(seconds since start, bytes done) after each chunk."""
    t0 = time.perf_counter()
    view = memoryview(mmap.mmap(-1, BUF))  # page-aligned
    src = os.open(src_path, os.O_RDONLY)
    dst = os.open(dst_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    size = os.fstat(src).st_size // 4096 * 4096
    marks, off = [], 0
    while off < size:
        n = min(BUF, size - off)
        os.preadv(src, [view[:n]], off)
        os.pwrite(dst, view[:n], off)
        off += n
        marks.append((time.perf_counter() - t0, off))
    os.close(dst)
    os.close(src)
    return marks


def main(src: str, dst: str, mode: str) -> None:
    t0 = time.perf_counter()
    result: list = []
    imported = 0.0
    if mode == "thread":
        worker = threading.Thread(target=lambda: result.extend(copy(src, dst)))
        worker.start()
        importlib.import_module("torch")
        imported = time.perf_counter() - t0
        worker.join()
    elif mode == "fork":
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            os.write(w, repr(copy(src, dst)).encode())
            os._exit(0)
        os.close(w)
        importlib.import_module("torch")
        imported = time.perf_counter() - t0
        data = b""
        while chunk := os.read(r, 1 << 20):
            data += chunk
        os.waitpid(pid, 0)
        result = eval(data)  # our own child's repr of a list of tuples
    else:
        result = copy(src, dst)
    os.unlink(dst)
    by_then = max([done for t, done in result if t <= imported] or [0])
    print(f"{mode}: import {imported:.2f} s, copied by then {by_then / 1e9:.2f} GB, "
          f"copy done at {result[-1][0]:.2f} s")


if __name__ == "__main__":
    main(*sys.argv[1:4])
