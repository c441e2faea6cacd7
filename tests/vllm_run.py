"""Run one vLLM engine for ``test_vllm`` (a process of its own: one engine per process).

    python vllm_run.py RESULT.json fresh MODEL_DIR    # greedy tokens + logprobs of a fresh engine on MODEL_DIR
    python vllm_run.py RESULT.json swap BASE ADAPTER  # the same on BASE, then after reload(base, adapter)

Writes {"before": ..., "after": ..., "loaded": [...], "swap_s": ...} to RESULT.json, then shuts the engine down.
"""

from __future__ import annotations

import json
import os
import sys
import time

PROMPTS = [[1, 5, 9, 200, 17], [1, 42, 43, 44], [1, 300, 3, 77, 78, 79, 80]]


def generate(llm) -> list:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=8, logprobs=3)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [[list(o.outputs[0].token_ids), [{str(k): v.logprob for k, v in d.items()} for d in o.outputs[0].logprobs]]
            for o in outs]


def engine(model: str):
    from vllm import LLM

    return LLM(model=model, skip_tokenizer_init=True, dtype="bfloat16", enforce_eager=True, max_model_len=64, seed=0,
               gpu_memory_utilization=0.1, kv_cache_memory_bytes=64 << 20)


def main() -> None:
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    result_path, mode, *paths = sys.argv[1:]
    result: dict = {}
    if mode == "fresh":
        llm = engine(paths[0])
        result["before"] = generate(llm)
    else:
        from streammerge.integrations.vllm import reload

        llm = engine(paths[0])
        result["before"] = generate(llm)
        t0 = time.monotonic()
        result["loaded"] = reload(llm, base=paths[0], adapter=paths[1])
        result["swap_s"] = time.monotonic() - t0
        result["after"] = generate(llm)
    with open(result_path, "w") as f:
        json.dump(result, f)
    llm.llm_engine.engine_core.shutdown()  # the engine's processes end with this one


if __name__ == "__main__":
    main()
