"""Where does streammerge spend its time? Per-stage wall and CPU seconds of one in-process merge.

    PYTHONPATH=/tmp/smbench/sm-<sha> python benchmarks/profile_sm.py --case llama-1b --adapter all-linear

Wraps (by name, when they exist in the version under test) the library's stage functions with timers
that record wall seconds and the calling thread's CPU seconds (``time.thread_time``). Thread CPU time
holds even when other jobs share the CPUs (wall inflates, CPU time does not), but it misses the work
torch hands to its own intra-op (OpenMP) threads, so for torch ops it is a lower bound; the process
total (``api.merge total`` CPU) counts every thread. Calls nest: a
worker's ``execute._compute`` includes the ``kernel.*`` and ``TensorReader.rows`` calls it makes.
``Future.result`` on the main thread is the time the writer waited for compute.

This is a diagnostic tied to the library's internals (names as of the commit measured); bench_merge.py
is the benchmark.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import shutil
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# (module, attribute path) to time; missing ones are skipped.
TARGETS = [
    ("streammerge.prepare", "read_base"),
    ("streammerge.prepare", "read_adapter"),
    ("streammerge.prepare", "build_plan"),
    ("streammerge.run", "check_output"),
    ("streammerge.run", "prepare_output"),
    ("streammerge.run", "write_side_files"),
    ("streammerge.run", "write_index"),
    ("streammerge.execute", "_compute"),
    ("streammerge.execute", "_factors"),
    ("streammerge.execute", "as_bytes"),
    ("streammerge.kernel", "merge_block"),
    ("streammerge.kernel", "lora_delta"),
    ("streammerge.kernel", "nonfinite_count"),
    ("streammerge.reader", "TensorReader.rows"),
    ("streammerge.reader", "TensorReader.release"),
    ("streammerge.writer", "ShardWriter.write"),
    ("streammerge.writer", "ShardWriter.copy_range"),
    ("streammerge.writer", "ShardWriter._commit"),
    ("streammerge.writer", "ShardWriter._hash_source"),  # sha256 of raw-copied bytes (read back), if present
    ("concurrent.futures", "Future.result"),
    # scatter writes (issue 12): workers compute, pwrite and hash; the main thread waits; one committer thread
    ("streammerge.scatter", "_compute"),
    ("streammerge.scatter", "_copy"),
    ("streammerge.scatter", "_commit"),
    ("streammerge.sources", "Sources.engine"),  # the first call imports torch + the kernel (on a worker)
    ("streammerge.execute", "compute_rows"),
    ("streammerge.kernel", "merge_checked"),
    ("streammerge.writer", "ShardFile.pwrite"),
    ("streammerge.writer", "ShardFile.copy_in"),
    ("streammerge.writer", "ShardFile.commit"),
    ("streammerge.digest", "piece_digest"),
    ("streammerge.digest", "map_digests"),  # copies hashed from the base map
    ("streammerge.scatter", "wait"),  # the main thread waiting for workers
    ("streammerge.changes", "ChangeTally.add"),  # the per-tensor change report (main after f7df494)
    ("streammerge.changes", "BlockTally.chunk"),  # the same, per kernel chunk (a separate pass)
    ("streammerge.changes", "BlockTally.widen"),  # the same, fused into the merge (kernel.merge_checked's ``tally``)
    ("streammerge.changes", "BlockTally.compare"),
]

STATS: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0, 0.0])  # (name, thread) -> calls, wall, cpu
_LOCK = threading.Lock()


def _thread_kind() -> str:
    name = threading.current_thread().name
    return "main" if name == "MainThread" else "committer" if "commit" in name else "worker"


def _timed(label: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        w0, c0 = time.perf_counter(), time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            dw, dc = time.perf_counter() - w0, time.thread_time() - c0
            with _LOCK:
                s = STATS[(label, _thread_kind())]
                s[0] += 1
                s[1] += dw
                s[2] += dc

    return wrapper


def instrument() -> list[str]:
    done = []
    for modname, attr in TARGETS:
        try:
            mod = importlib.import_module(modname)
        except ImportError:
            continue
        owner, _, name = attr.rpartition(".")
        obj = getattr(mod, owner, None) if owner else mod
        fn = getattr(obj, name, None)
        if fn is None:
            continue
        label = f"{modname.removeprefix('streammerge.')}.{attr}"
        setattr(obj, name, _timed(label, fn))
        done.append(label)
    return done


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", default="llama-1b")
    ap.add_argument("--adapter", default="all-linear")
    ap.add_argument("--root", default="/tmp/smbench")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--max-memory", type=int, default=None, help="bytes")
    ap.add_argument("--allow-nonfinite", action="store_true")
    ap.add_argument("--quiet-wait", type=float, default=120.0, help="wait up to this long for an idle CPU first")
    args = ap.parse_args(argv)

    # Imports first (synth imports torch too), so their cost is measured cold-in-process.
    t0, c0 = time.perf_counter(), time.process_time()
    import torch

    t_torch = time.perf_counter()
    import streammerge.api as api

    t_import = time.perf_counter()
    c_import = time.process_time()
    import synth

    paths = synth.make_case(args.case, args.root, verbose=False)
    out = Path(args.root) / "out" / "profile"
    shutil.rmtree(out, ignore_errors=True)
    labels = instrument()
    kwargs = {"device": "cpu", "allow_nonfinite": args.allow_nonfinite}
    if args.workers:
        kwargs["workers"] = args.workers
    if args.max_memory:
        kwargs["max_memory"] = args.max_memory
    from bench_merge import _busy_cpu_s, read_tree, wait_quiet

    read_tree(Path(paths["base"]))  # warm page cache, as the bench does
    wait_quiet(args.quiet_wait)
    b1 = _busy_cpu_s()
    t1, c1 = time.perf_counter(), time.process_time()
    report = api.merge(paths["base"], paths[args.adapter], out, **kwargs)
    t2, c2 = time.perf_counter(), time.process_time()
    other = max(0.0, _busy_cpu_s() - b1 - (c2 - c1))
    shutil.rmtree(out, ignore_errors=True)

    rows = [{"stage": "import torch", "thread": "main", "calls": 1, "wall_s": round(t_torch - t0, 3)},
            {"stage": "import streammerge (after torch)", "thread": "main", "calls": 1,
             "wall_s": round(t_import - t_torch, 3)},
            {"stage": "imports total", "thread": "main", "calls": 1, "wall_s": round(t_import - t0, 3),
             "cpu_s": round(c_import - c0, 3)},
            {"stage": "api.merge total", "thread": "all", "calls": 1, "wall_s": round(t2 - t1, 3),
             "cpu_s": round(c2 - c1, 3)},
            {"stage": "other processes meanwhile (noise)", "thread": "-", "calls": 0, "wall_s": 0.0,
             "cpu_s": round(other, 3)}]
    for (label, kind), (calls, wall, cpu) in sorted(STATS.items(), key=lambda kv: -kv[1][1]):
        rows.append({"stage": label, "thread": kind, "calls": calls, "wall_s": round(wall, 3),
                     "cpu_s": round(cpu, 3)})
    print("| stage | thread | calls | wall s (summed over threads) | thread CPU s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['stage']} | {r['thread']} | {r['calls']} | {r['wall_s']:.2f} | "
              f"{r['cpu_s']:.2f} |" if "cpu_s" in r else
              f"| {r['stage']} | {r['thread']} | {r['calls']} | {r['wall_s']:.2f} | |")
    print(json.dumps({"case": args.case, "adapter": args.adapter, "torch_threads": torch.get_num_threads(),
                      "report": report.summary(), "instrumented": labels, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
