"""What is the least a merge can cost on this machine? Times the parts of a merge in isolation.

    python benchmarks/floor.py --case llama-1b --adapter all-linear

Independent of streammerge (it only uses torch + safetensors), single process, warm page cache:

* ``read``: read every base byte once (pread into one buffer);
* ``copy``: ``cp``-like copy of every shard with ``copy_file_range`` + fsync (the I/O floor of a merge);
* ``merge_math``: for every LoRA target, ``(W.float() + (B @ A) * s).to(bf16)`` on ~64 MiB row blocks,
  source from an mmap (page cache), result discarded; torch uses its default intra-op threads;
  split into ``delta`` (B @ A * s), ``upcast_add`` and ``downcast``;
* ``isfinite``: ``torch.isfinite(out).sum()`` on every merged block (a NaN/inf check as a tool may do);
* ``tobytes``: viewing the bf16 result as bytes and ``os.write`` to /dev/null-like sink file (no fsync).

A merge that overlaps compute and I/O perfectly costs about max(copy, merge_math); one that does not,
about copy + merge_math.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import synth  # noqa: E402
from bench_merge import _busy_cpu_s, wait_quiet  # noqa: E402

BLOCK_BYTES = 64 << 20


def _read_all(base: Path) -> tuple[float, int]:
    buf = bytearray(16 << 20)
    t0 = time.perf_counter()
    n = 0
    for p in sorted(base.glob("*.safetensors")):
        with open(p, "rb", buffering=0) as f:
            while k := f.readinto(buf):
                n += k
    return time.perf_counter() - t0, n


def _copy_all(base: Path, out: Path) -> tuple[float, int]:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    n = 0
    for p in sorted(base.glob("*.safetensors")):
        size = p.stat().st_size
        with open(p, "rb") as src, open(out / p.name, "wb") as dst:
            off = 0
            while off < size:
                k = os.copy_file_range(src.fileno(), dst.fileno(), size - off, off)
                if k <= 0:
                    break
                off += k
            os.fsync(dst.fileno())
        n += size
    return time.perf_counter() - t0, n


def _targets(base: Path, adapter: Path) -> list[tuple[Path, str, str]]:
    index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(adapter / "adapter_model.safetensors", "pt") as fa:
        keys = [k for k in fa.keys() if k.endswith(".lora_A.weight")]  # noqa: SIM118
    out = []
    for k in sorted(keys):
        stem = k.removesuffix(".lora_A.weight")
        name = stem.removeprefix("base_model.model.") + ".weight"
        out.append((base / index[name], name, stem))
    return out


def merge_math(base: Path, adapter: Path, sink: Path) -> dict[str, float]:
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    s = cfg["lora_alpha"] / cfg["r"]
    t = dict.fromkeys(("delta", "upcast_add", "downcast", "isfinite", "tobytes"), 0.0)
    elems = 0
    fd = os.open(sink, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        with safe_open(adapter / "adapter_model.safetensors", "pt") as fa:
            handles: dict[Path, object] = {}
            for path, name, stem in _targets(base, adapter):
                if path not in handles:
                    handles[path] = safe_open(path, "pt")
                w = handles[path].get_slice(name)
                rows, cols = w.get_shape()
                a = fa.get_tensor(f"{stem}.lora_A.weight").float()
                b = fa.get_tensor(f"{stem}.lora_B.weight").float()
                step = max(64, BLOCK_BYTES // (cols * 4) // 64 * 64)
                for r0 in range(0, rows, step):
                    r1 = min(rows, r0 + step)
                    wb = w[r0:r1]
                    c0 = time.perf_counter()
                    d = (b[r0:r1] @ a) * s
                    c1 = time.perf_counter()
                    f = wb.float() + d
                    c2 = time.perf_counter()
                    o = f.to(torch.bfloat16)
                    c3 = time.perf_counter()
                    int(o.numel() - torch.isfinite(o).sum().item())
                    c4 = time.perf_counter()
                    os.write(fd, memoryview(o.reshape(-1).view(torch.uint8).numpy()))
                    c5 = time.perf_counter()
                    t["delta"] += c1 - c0
                    t["upcast_add"] += c2 - c1
                    t["downcast"] += c3 - c2
                    t["isfinite"] += c4 - c3
                    t["tobytes"] += c5 - c4
                    elems += o.numel()
    finally:
        os.close(fd)
        sink.unlink(missing_ok=True)
    t["merge_math"] = t["delta"] + t["upcast_add"] + t["downcast"]
    t["merged_elems"] = elems
    return t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", default="llama-1b", choices=sorted(synth.SHAPES))
    ap.add_argument("--adapter", default="all-linear", choices=sorted(synth.ADAPTER_TARGETS))
    ap.add_argument("--root", default="/tmp/smbench")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default torch's)")
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    paths = synth.make_case(args.case, args.root)
    base, adapter = paths["base"], paths[args.adapter]
    scratch = Path(args.root) / "out" / "floor"
    _read_all(base)  # warm
    rows = []
    for _ in range(args.reps):
        wait_quiet(120)
        busy0, t0 = _busy_cpu_s(), time.perf_counter()
        cpu0 = time.process_time()
        rt, n = _read_all(base)
        ct, _ = _copy_all(base, scratch)
        for p in scratch.glob("*"):
            p.unlink()
        os.sync()
        m = merge_math(base, adapter, Path(args.root) / "out" / "floor.sink")
        os.sync()
        own = time.process_time() - cpu0
        rows.append({"read_s": rt, "copy_fsync_s": ct, **m,
                     "other_cpu_s": max(0.0, _busy_cpu_s() - busy0 - own), "elapsed_s": time.perf_counter() - t0})
    best = {k: min(r[k] for r in rows) for k in rows[0]}
    print(json.dumps({"case": args.case, "adapter": args.adapter, "bytes": n, "threads": torch.get_num_threads(),
                      "best_of": args.reps, **{k: round(v, 3) for k, v in best.items()}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
