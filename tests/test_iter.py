"""``iter_merged``: the same tensors as the written shards, and memory within the budget.

How memory is measured (tracemalloc cannot see torch's allocations): a child process runs the
iterator and reads its own resident set from ``/proc/self/status``. After a warm-up (imports,
thread pools, the first GEMM's scratch), it resets the high-water mark (``/proc/self/clear_refs``
← ``5``), records VmRSS, iterates while dropping each tensor before asking for the next, and
reads VmHWM. ``VmHWM − VmRSS₀`` is the peak growth: every page that was resident at once, anonymous
(torch) or file-backed (mapped shards). glibc is told to serve every allocation over 64 KiB with
mmap and never raise that threshold (``MALLOC_MMAP_THRESHOLD_``), so freed blocks go back to the
kernel and the high-water mark is the peak of live memory, not of a heap that never shrinks.
A control run that keeps every tensor shows the probe sees torch's allocations.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import streammerge
from streammerge import testing

PROBE = r"""
import gc, json, sys
import torch
import streammerge

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)

torch.set_num_threads(1)
base, adapters, budget = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
keep, kwargs = sys.argv[4] == "keep", json.loads(sys.argv[5])
warm = [t for _, t in streammerge.iter_merged(base=base, adapters=adapters, device="cpu", workers=2,
                                                max_memory=budget, **kwargs)][:1]
del warm
gc.collect()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
start = status("VmRSS")
kept, largest, total = [], 0, 0
for name, tensor in streammerge.iter_merged(base=base, adapters=adapters, device="cpu", workers=2,
                                            max_memory=budget, **kwargs):
    largest = max(largest, tensor.nbytes)
    total += tensor.nbytes
    if keep:
        kept.append(tensor)
    del tensor
print(json.dumps({"growth": status("VmHWM") - start, "largest": largest, "total": total}))
"""

#: What the process may add beyond the budget and the tensor handed out: Python objects, thread
#: stacks, the futures queue and allocator rounding (measured ≈ 2–4 MiB here).
SLACK = 12 << 20


def _probe(base: Path, adapters: list[str], budget: int, keep: bool = False, **kwargs: object) -> dict:
    path = os.pathsep.join([str(Path(streammerge.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=path)
    out = subprocess.run([sys.executable, "-c", PROBE, str(base), json.dumps(adapters), str(budget),
                          "keep" if keep else "drop", json.dumps(kwargs)],
                         env=env, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Two layers, a 32 MiB bf16 lm_head (16384 x 1024, merged) and embedding (copied); ~120 MB in all."""
    root = tmp_path_factory.mktemp("big")
    base = testing.make_checkpoint(root / "base", layers=2, hidden=1024, intermediate=4096, vocab=16384, shards=2)
    a1 = testing.make_adapter(root / "a1", base, targets=("lm_head", "up_proj", "q_proj"), r=16, seed=1)
    a2 = testing.make_adapter(root / "a2", base, targets=("lm_head", "down_proj"), r=8, seed=2)
    return base, a1, a2


@pytest.mark.parametrize(("budget", "kwargs"), [
    pytest.param(8 << 20, {}, id="one-adapter"),
    pytest.param(8 << 20, {"weights": [0.7, -0.3]}, id="cat"),
    pytest.param(24 << 20, {"weights": [0.5, 0.5], "combination": "dare_ties", "density": 0.5}, id="dare_ties"),
])
def test_iterator_memory_stays_within_budget_plus_the_tensor_handed_out(big, budget, kwargs):
    base, a1, a2 = big
    adapters = [str(a1)] if not kwargs else [str(a1), str(a2)]
    got = _probe(base, adapters, budget, **kwargs)
    assert got["largest"] > budget, "the test needs a tensor bigger than the budget"
    assert got["total"] > budget + got["largest"] + SLACK, "the test needs a checkpoint bigger than the bound"
    assert got["growth"] <= budget + got["largest"] + SLACK, got


def test_probe_sees_torch_allocations(big):
    """Control: keeping every tensor makes the measured growth at least the checkpoint's size."""
    base, a1, _ = big
    got = _probe(base, [str(a1)], 8 << 20, keep=True)
    assert got["growth"] >= 0.95 * got["total"], got


def test_whole_tensor_combination_runs_within_its_stated_minimum(tmp_path):
    """ties ranks over whole tensors: the plan's minimum budget covers one whole tensor, and the
    measured peak stays within that minimum plus the tensor handed out (here every tensor is small
    next to that working set, so the measurement checks ``plan.COMBINE_BYTES_*`` themselves)."""
    base = testing.make_checkpoint(tmp_path / "base", layers=1, hidden=2048, intermediate=64, vocab=64)
    a1 = testing.make_adapter(tmp_path / "t1", base, targets=("q_proj", "o_proj"), r=16, seed=3)
    a2 = testing.make_adapter(tmp_path / "t2", base, targets=("q_proj",), r=8, seed=4)
    kwargs = {"combination": "ties", "density": 0.5, "weights": [0.6, 0.4]}
    plan = streammerge.plan_merge(base, adapters=[a1, a2], **kwargs)
    need = plan.min_memory()
    widest = max(t.rows * t.row_numel for t in plan.tasks() if t.whole)
    assert need >= 16 * widest  # at least the fp32 working set of the whole widest tensor
    with pytest.raises(streammerge.BudgetError):
        list(streammerge.iter_merged(base=base, adapters=[a1, a2], max_memory=need - 1, device="cpu", **kwargs))
    got = _probe(base, [str(a1), str(a2)], need, **kwargs)
    assert got["growth"] <= need + got["largest"] + SLACK, (got, need)


def _written(tmp: Path, base: Path, **kwargs) -> dict[str, torch.Tensor]:
    streammerge.merge(base=base, out=tmp, device="cpu", **kwargs)
    return testing.load_dir(tmp)


@pytest.mark.parametrize("kwargs", [
    pytest.param({"weights": [1.0, 1.0]}, id="cat"),
    pytest.param({"weights": [0.8, -0.2], "combination": "ties", "density": 0.4}, id="ties"),
    pytest.param({"weights": [0.5, 0.5], "combination": "dare_linear", "density": 0.7, "seed": 3}, id="dare"),
])
def test_iterator_yields_the_written_tensors_for_combinations(tmp_path, llama, kwargs):
    base, a1 = llama
    a2 = testing.make_adapter(tmp_path / "a2", base, targets=("q_proj", "down_proj"), r=4, seed=9)
    written = _written(tmp_path / "out", base, adapters=[a1, a2], **kwargs)
    got = list(streammerge.iter_merged(base=base, adapters=[a1, a2], device="cpu", max_memory=1 << 20, **kwargs))
    assert [n for n, _ in got] == list(streammerge.plan_merge(base, adapters=[a1, a2], **kwargs).weight_map())
    assert {n for n, _ in got} == set(written)
    for name, tensor in got:
        assert torch.equal(tensor, written[name]), name


def test_iterator_tensors_are_owned_by_the_caller(tmp_path, llama):
    """Unmerged tensors are read into fresh memory, not views of a map that closes with the iterator."""
    base, adapter = llama
    got = dict(streammerge.iter_merged(base=base, adapter=adapter, device="cpu"))
    ref = testing.reference_merge(base, adapter)
    for name, tensor in got.items():
        tensor.add_(0)  # writable
        assert torch.equal(tensor, ref[name]), name


def test_a_consumer_that_fails_midway_leaves_no_worker_running(tmp_path, llama):
    """An exception in the consumer closes the piece generator (and joins its pool) before the maps close."""
    base, adapter = llama

    def consume() -> None:
        for _name, _tensor in streammerge.iter_merged(base=base, adapter=adapter, device="cpu", workers=2,
                                                       max_memory=1 << 20):
            raise RuntimeError("consumer failed")

    with pytest.raises(RuntimeError, match="consumer failed"):
        consume()
    assert not [t.name for t in threading.enumerate() if t.name.startswith("streammerge")]
