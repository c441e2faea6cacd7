"""How expensive is each way of getting 2 GB into a new file? No streammerge code: the system calls
``streammerge.diskio`` chooses between, alternating in one process so that slow phases of the machine
hit every way alike.

    python benchmarks/write_paths.py [--gib 1.9] [--rounds 3] [--dir /tmp/smbench/out]

Ways (1.9 GiB = 2.04 GB by default, about llama-1b's first shard; each into a fresh ``fallocate``d file,
8 MiB per call, then ``fsync``):
  pwrite         from a reused user buffer (what the writer did before direct I/O)
  splice         the same buffer lent to a pipe (``vmsplice``) and spliced into the file
  direct         ``O_DIRECT`` writes from a page-aligned buffer (no page-cache copy)
  cfr            ``copy_file_range`` from a base shard (what ``cp`` does), page cache to page cache
  pread+direct   the same bytes read into an aligned buffer, then written direct (streammerge's copies)

Prints per way: wall seconds of the calls, the process CPU seconds they used, fsync seconds, and the
durable total. CPU seconds are the figure to read on a shared machine.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import mmap
import os
import statistics
import time
from pathlib import Path

_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_LIBC.vmsplice.argtypes = [ctypes.c_int, ctypes.POINTER(_IoVec), ctypes.c_size_t, ctypes.c_uint]
_LIBC.vmsplice.restype = ctypes.c_ssize_t
STEP = 8 << 20


def _one(way: str, path: Path, size: int, buf: mmap.mmap, src: int) -> tuple[float, float, float]:
    fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o644)
    _LIBC.fallocate(fd, 0, 0, size)
    view = memoryview(buf)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    cpu, t = time.process_time(), time.perf_counter()
    if way in ("direct", "pread+direct"):
        dfd = os.open(path, os.O_WRONLY | os.O_DIRECT)
        for off in range(0, size, STEP):
            if way == "pread+direct":
                os.preadv(src, [view], off)
            os.pwrite(dfd, view, off)
        os.close(dfd)
    elif way == "pwrite":
        for off in range(0, size, STEP):
            os.pwrite(fd, view, off)
    elif way == "cfr":
        for off in range(0, size, STEP):
            os.copy_file_range(src, fd, STEP, off, off)
    elif way == "splice":
        r, w = os.pipe()
        fcntl.fcntl(w, 1031, 1 << 20)  # F_SETPIPE_SZ
        for off in range(0, size, STEP):
            done = 0
            while done < STEP:
                n = _LIBC.vmsplice(w, ctypes.byref(_IoVec(addr + done, min(1 << 20, STEP - done))), 1, 0)
                k = 0
                while k < n:
                    k += os.splice(r, fd, n - k, offset_dst=off + done + k)
                done += n
        os.close(r)
        os.close(w)
    calls, used = time.perf_counter() - t, time.process_time() - cpu
    t = time.perf_counter()
    os.fsync(fd)
    os.close(fd)
    synced = time.perf_counter() - t
    path.unlink()
    return calls, used, synced


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=1.9)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default="/tmp/smbench/out")
    ap.add_argument("--source", default="/tmp/smbench/llama-1b/base/model-00001-of-00002.safetensors",
                    help="a file of at least --gib GiB for cfr and pread+direct (read once first: warm cache)")
    args = ap.parse_args()
    size = int(args.gib * (1 << 30)) // STEP * STEP
    src = os.open(args.source, os.O_RDONLY)
    if os.fstat(src).st_size < size:
        raise SystemExit(f"{args.source}: smaller than {args.gib} GiB")
    for off in range(0, size, 64 << 20):
        os.pread(src, 1, off + (64 << 20) - 1)  # cheap touch; the bench's cases are read warm anyway
    buf = mmap.mmap(-1, STEP)
    buf.write(os.urandom(STEP))
    ways = ["pwrite", "splice", "direct", "cfr", "pread+direct"]
    got: dict[str, list[tuple[float, float, float]]] = {w: [] for w in ways}
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    for r in range(args.rounds):
        for way in ways if r % 2 == 0 else reversed(ways):
            time.sleep(1)
            got[way].append(_one(way, Path(args.dir) / f"write-paths-{os.getpid()}", size, buf, src))
    print(f"{size / 1e9:.2f} GB per way, {args.rounds} rounds (alternating order); medians [min-max]")
    print("| way | calls wall s | CPU s | fsync s | durable s |")
    print("|---|---|---|---|---|")
    for way in ways:
        cols = list(zip(*got[way], strict=True))
        durable = [a + c for a, _, c in got[way]]

        def fmt(xs) -> str:
            return f"{statistics.median(xs):.2f} [{min(xs):.2f}-{max(xs):.2f}]"

        print(f"| {way} | {fmt(cols[0])} | {fmt(cols[1])} | {fmt(cols[2])} | {fmt(durable)} |")


if __name__ == "__main__":
    main()
