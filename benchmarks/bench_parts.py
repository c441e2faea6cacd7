"""A merge split into parts on one machine: wall time and bytes per part, then ``finalize``.

For each N in ``--parts`` (default 1,2) it runs ``python -m streammerge merge --part I/N`` for every
I at once (separate processes on one output directory, as N machines of a Slurm array would),
then ``streammerge finalize``, and checks that the result is byte-identical to the N=1 run (the
manifests' SHA-256 of every file). On one 2-core machine the parts share the cores and the disk,
so this measures the overhead of splitting, not the speed-up N machines on a parallel
filesystem would get (README, "Several machines").

    python benchmarks/bench_parts.py --case 70b-slice-2 --parts 1,2 --json bench-out/parts.jsonl

Builds the case under ``--root`` (``synth.py``) when missing; outputs go to ``--root/parts-out`` and are
removed afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import synth  # noqa: E402

REPO = HERE.parent


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}


def _sm(*argv: str) -> list[str]:
    return [sys.executable, "-m", "streammerge", *argv]


def run_parts(base: Path, adapter: Path, out: Path, n: int, extra: list[str]) -> dict:
    """All N parts at once, then finalize. Returns timings and bytes per part."""
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.monotonic()
    procs = []
    for i in range(n):
        cmd = _sm("merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out), "--part", f"{i}/{n}",
                  "-q", *extra)
        procs.append((i, time.monotonic(), subprocess.Popen(cmd, env=_env())))
    ended: dict[int, float] = {}
    while len(ended) < n:
        for i, _, proc in procs:
            if i not in ended and proc.poll() is not None:
                ended[i] = time.monotonic()
                if proc.returncode != 0:
                    raise SystemExit(f"part {i}/{n} failed with exit status {proc.returncode}")
        time.sleep(0.05)
    parts = [{"part": i, "wall_s": round(ended[i] - started, 2)} for i, started, _ in procs]
    parts_wall = max(ended.values()) - t0
    for rec in parts:
        doc = json.loads((out / f".streammerge-part-{rec['part']}-of-{n}.json").read_text())
        rec["shards"] = len(doc["shards"])
        rec["bytes"] = sum(s["size"] for s in doc["shards"])
    t1 = time.monotonic()
    subprocess.run(_sm("finalize", "--out", str(out), "-q"), env=_env(), check=True)
    finalize_s = time.monotonic() - t1
    manifest = json.loads((out / "streammerge.json").read_text())
    digests = {r["file"]: r["sha256"] for r in manifest["shards"] + manifest["files"]}
    return {"parts": n, "wall_s": round(parts_wall + finalize_s, 2), "parts_wall_s": round(parts_wall, 2),
            "finalize_s": round(finalize_s, 2), "per_part": parts, "digests": digests}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", default="70b-slice-2", choices=sorted(synth.SHAPES))
    ap.add_argument("--adapter", default="all-linear", choices=sorted(synth.ADAPTER_TARGETS))
    ap.add_argument("--root", default="/tmp/smbench")
    ap.add_argument("--parts", default="1,2", help="comma-separated part counts (default 1,2)")
    ap.add_argument("--sm-args", default="--device cpu", help="extra merge arguments for every part")
    ap.add_argument("--json", help="append one JSON line per N here")
    ap.add_argument("--keep", action="store_true", help="keep the outputs")
    args = ap.parse_args(argv)
    paths = synth.make_case(args.case, args.root)
    base, adapter = paths["base"], paths[args.adapter]
    results = []
    for n in (int(x) for x in args.parts.split(",")):
        out = Path(args.root) / "parts-out" / f"{args.case}-{n}"
        res = run_parts(base, adapter, out, n, args.sm_args.split())
        res |= {"case": args.case, "adapter": args.adapter, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        results.append(res)
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
        print(f"N={n}: {res['wall_s']} s wall ({res['parts_wall_s']} s parts + {res['finalize_s']} s finalize); "
              + "; ".join(f"part {p['part']}: {p['shards']} shard(s), {p['bytes'] / 1e9:.2f} GB, {p['wall_s']} s"
                          for p in res["per_part"]), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps({k: v for k, v in res.items() if k != "digests"}) + "\n")
    same = all(r["digests"] == results[0]["digests"] for r in results)
    print(f"byte-identical across N: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
