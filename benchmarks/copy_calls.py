"""Why were raw copies slower inside streammerge than in a loop? Per-call timing of ``copy_file_range``.

    python benchmarks/copy_calls.py --case llama-1b [--reps 3]

Copies the untouched tensors of the case's first base shard (all of them: a zero adapter's plan) into a
fresh file in the output directory, each way, alternating, and prints wall / CPU seconds and the per-call
median and max:

* ``per-tensor, growing``: one call per tensor into a file that grows (what streammerge did before scatter
  writes: ``ShardWriter.copy_range`` per tensor, plus a read-back for sha256, timed separately below);
* ``per-tensor, pre-sized``: the same calls into a file ``ftruncate``d to its final size first;
* ``per-run, pre-sized``: one call per contiguous run (the whole shard here), at most 1 GiB each (scatter);
* ``per-run, pre-sized, source mapped``: the same with the source shard mmapped and every page touched in
  this process first (as the old reader's maps could be);
* ``read-back sha256`` / ``map + xxh3``: the cost of hashing the copied range after the copy (old / new).

No streammerge code is involved; the file layout comes from the safetensors header. fsync is timed apart.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import statistics
import struct
import sys
import time
from pathlib import Path

import xxhash

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def tensor_ranges(path: Path) -> list[tuple[int, int]]:
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    start = 8 + n
    return sorted((start + v["data_offsets"][0], v["data_offsets"][1] - v["data_offsets"][0])
                  for k, v in header.items() if k != "__metadata__")


def copy(src: int, dst: int, ranges: list[tuple[int, int]]) -> list[float]:
    per_call = []
    for offset, count in ranges:
        dest = offset
        while count:
            t = time.perf_counter()
            n = os.copy_file_range(src, dst, min(count, 1 << 30), offset, dest)
            per_call.append(time.perf_counter() - t)
            offset, dest, count = offset + n, dest + n, count - n
    return per_call


def hash_sha256_readback(src: int, start: int, end: int) -> None:
    buf = memoryview(bytearray(8 << 20))
    h = hashlib.sha256()
    while start < end:
        n = os.preadv(src, [buf[: min(8 << 20, end - start)]], start)
        h.update(buf[:n])
        start += n


def hash_xxh3_map(src: int, start: int, end: int) -> None:
    mm = mmap.mmap(src, 0, access=mmap.ACCESS_READ)
    view = memoryview(mm)
    for a in range(start, end, 256 << 10):
        xxhash.xxh3_128_digest(view[a : min(end, a + (256 << 10))])
    view.release()
    mm.close()


def one(way: str, src_path: Path, out_dir: Path, ranges: list[tuple[int, int]]) -> dict:
    size = src_path.stat().st_size
    src = os.open(src_path, os.O_RDONLY)
    dst_path = out_dir / "copy_calls.tmp"
    dst_path.unlink(missing_ok=True)
    dst = os.open(dst_path, os.O_RDWR | os.O_CREAT, 0o644)
    mm = None
    try:
        if "pre-sized" in way:
            os.ftruncate(dst, size)
        if "mapped" in way:
            mm = mmap.mmap(src, 0, access=mmap.ACCESS_COPY)
            for a in range(0, size, mmap.PAGESIZE):
                mm[a]
        runs = ranges if "per-tensor" in way else [(ranges[0][0], size - ranges[0][0])]
        t0, c0 = time.perf_counter(), os.times()
        calls = [] if way.startswith(("read-back", "map +")) else copy(src, dst, runs)
        if way.startswith("read-back"):
            hash_sha256_readback(src, ranges[0][0], size)
        elif way.startswith("map +"):
            hash_xxh3_map(src, ranges[0][0], size)
        t1, c1 = time.perf_counter(), os.times()
        os.fsync(dst)
        t2 = time.perf_counter()
    finally:
        if mm is not None:
            mm.close()
        os.close(src)
        os.close(dst)
        dst_path.unlink(missing_ok=True)
    return {"way": way, "wall_s": t1 - t0, "cpu_s": (c1.user - c0.user) + (c1.system - c0.system),
            "fsync_s": t2 - t1, "calls": len(calls), "call_median_ms": statistics.median(calls) * 1e3 if calls else 0,
            "call_max_ms": max(calls) * 1e3 if calls else 0, "bytes": size - ranges[0][0]}


WAYS = ["per-tensor, growing", "per-tensor, pre-sized", "per-run, pre-sized", "per-run, pre-sized, source mapped",
        "read-back sha256 (old hash of copies)", "map + xxh3 (new hash of copies)"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", default="llama-1b")
    ap.add_argument("--root", default="/tmp/smbench")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    import synth

    paths = synth.make_case(args.case, args.root, verbose=False)
    src_path = sorted(Path(paths["base"]).glob("*.safetensors"))[0]
    ranges = tensor_ranges(src_path)
    out_dir = Path(args.root) / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    with src_path.open("rb") as f:  # warm the page cache
        while f.read(16 << 20):
            pass
    rows: dict[str, list[dict]] = {w: [] for w in WAYS}
    for rep in range(args.reps):
        for way in WAYS if rep % 2 == 0 else reversed(WAYS):
            rows[way].append(one(way, src_path, out_dir, ranges))
    print(f"{src_path.name}: {len(ranges)} tensors, {rows[WAYS[0]][0]['bytes'] / 1e9:.2f} GB, {args.reps} reps; "
          f"load {os.getloadavg()[0]:.1f}")
    print("| way | wall s (median) | CPU s | fsync s | calls | per call median / max ms |\n|---|---|---|---|---|---|")
    for way, rs in rows.items():
        med = {k: statistics.median(r[k] for r in rs) for k in ("wall_s", "cpu_s", "fsync_s", "call_median_ms")}
        print(f"| {way} | {med['wall_s']:.2f} | {med['cpu_s']:.2f} | {med['fsync_s']:.2f} | {rs[0]['calls']} | "
              f"{med['call_median_ms']:.1f} / {max(r['call_max_ms'] for r in rs):.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
