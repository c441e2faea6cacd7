"""Reference merge with transformers + PEFT (the baseline streammerge must beat).

    python benchmarks/peft_merge.py BASE ADAPTER OUT

Loads the whole model, merges with ``merge_and_unload()`` and saves it with ``save_pretrained``. Prints one
JSON line with per-stage seconds on stdout. bench_merge.py runs it as a child process and measures its wall
time and peak RSS from the outside.
"""

from __future__ import annotations

import json
import sys
import time


def main(argv: list[str] | None = None) -> int:
    base, adapter, out = (argv if argv is not None else sys.argv[1:])[:3]
    t0 = time.perf_counter()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    t_import = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    t_load = time.perf_counter()
    model = PeftModel.from_pretrained(model, adapter)
    t_peft = time.perf_counter()
    model = model.merge_and_unload()
    t_merge = time.perf_counter()
    model.save_pretrained(out)
    t_save = time.perf_counter()
    print(json.dumps({
        "import_s": round(t_import - t0, 3),
        "load_s": round(t_load - t_import, 3),
        "peft_load_s": round(t_peft - t_load, 3),
        "merge_s": round(t_merge - t_peft, 3),
        "save_s": round(t_save - t_merge, 3),
        "dtype": str(model.dtype),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
