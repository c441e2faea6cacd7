"""The merge kernel alone, as a worker runs it: ``kernel.merge_checked`` with the NaN/inf filter and the
change tally, on real base rows (a bf16 shard, memory-mapped), two threads, one torch thread each.

    for i in 1 2 3 4 5; do
        PYTHONPATH=/tmp/smbench/sm-<before> python3 benchmarks/kernel_ab.py
        PYTHONPATH=/tmp/smbench/sm-<after>  python3 benchmarks/kernel_ab.py
    done

Prints the process CPU seconds per merged element (and wall). No I/O, no torch import, no scheduling:
alternate two commits' snapshots to compare their arithmetic (per-pair ratios; this VM is noisy). Works
with the kernel API before and after the fused tally (``on_chunk`` / ``tally``).
"""

from __future__ import annotations

import argparse
import mmap
import os
import threading
import time

import torch

from streammerge.changes import BlockTally
from streammerge.kernel import Factors, merge_checked


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shard", default="/tmp/smbench/llama-1b/base/model-00001-of-00002.safetensors",
                    help="a bf16 safetensors file: its bytes are read as rows of --cols bf16 values")
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    fd = os.open(args.shard, os.O_RDONLY)
    size = os.fstat(fd).st_size
    mm = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)  # private: the tensor view may be writable, the file is not
    block = 2048  # rows per block, as a worker's block of a 2048-wide tensor
    rows = (size - 4096) // (args.cols * 2) // block * block
    w = torch.frombuffer(mm, dtype=torch.bfloat16, count=rows * args.cols, offset=4096).view(rows, args.cols)
    gen = torch.Generator().manual_seed(0)
    f = Factors("linear", torch.randn(args.rank, args.cols, generator=gen) / args.cols**0.5,
                torch.randn(rows, args.rank, generator=gen) * 0.02, 2.0)
    fused = "tally" in merge_checked.__code__.co_varnames

    def work(starts: list[int], out: torch.Tensor) -> None:
        for r0 in starts:
            tally = BlockTally()
            kw = {"tally": tally} if fused else {"on_chunk": tally.chunk}
            merge_checked(w[r0 : r0 + block], torch.bfloat16, [("once", [f])], r0, r0 + block, 256, out=out,
                          check_finite=True, **kw)

    starts = list(range(0, rows - block, block))
    per = [starts[i :: args.threads] for i in range(args.threads)]
    outs = [torch.empty(block, args.cols, dtype=torch.bfloat16) for _ in range(args.threads)]
    work(per[0][:1], outs[0])  # warm-up: torch's first calls
    mm.madvise(mmap.MADV_DONTNEED)
    t0, c0 = time.perf_counter(), time.process_time()
    threads = [threading.Thread(target=work, args=(per[i], outs[i])) for i in range(args.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = len(starts) * block * args.cols
    print(f"{'fused' if fused else 'separate'} tally: {n / 1e9:.2f} G elements, wall {wall:.3f} s, "
          f"CPU {cpu:.3f} s, {cpu / n * 1e9:.3f} CPU-ns per element")


if __name__ == "__main__":
    main()
