"""Hot-swap merged weights into a running vLLM engine (the weight update of PPO/GRPO loops).

``reload(llm, base=..., adapter=...)`` runs, inside every vLLM worker,
``worker.reload_weights(weights_iterator=streammerge.iter_merged(base=..., adapter=...))``
through ``llm.collective_rpc``. The merge streams in the worker's own process, so tensors never
cross a process boundary (sent from the main process they arrive as lists) and the engine's own
loader places them (on CPU, vLLM repacks weights for oneDNN, so ``apply_model(lambda m:
m.load_weights(...))`` does not work there). Each worker merges the whole checkpoint and its
loader keeps its tensor-parallel slice; every worker must see the base and adapter paths.

vLLM sends the function to its engine process by pickling it, which it allows only with
``VLLM_ALLOW_INSECURE_SERIALIZATION=1`` set before the ``LLM`` is created (or with the engine in
process, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``); ``reload`` checks this and says so.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

from streammerge.errors import StreamMergeError

INSECURE = "VLLM_ALLOW_INSECURE_SERIALIZATION"
MULTIPROCESSING = "VLLM_ENABLE_V1_MULTIPROCESSING"

PathLike = str | Path


def _check(llm: object) -> None:
    if not hasattr(llm, "collective_rpc"):
        raise StreamMergeError(f"{type(llm).__name__} has no collective_rpc: pass a vllm.LLM")
    if os.environ.get(INSECURE) != "1" and os.environ.get(MULTIPROCESSING) != "0":
        raise StreamMergeError(
            f"vLLM pickles the reload function for its engine process only with {INSECURE}=1: set it in the "
            "environment before creating the LLM (or run the engine in process with "
            f"{MULTIPROCESSING}=0), then call reload again"
        )


def reload(
    llm: object,
    base: PathLike | None = None,
    adapter: PathLike | None = None,
    *,
    adapters: Sequence[PathLike] = (),
    weights: Sequence[float] | None = None,
    adapter_name: str | None = None,
    combination: str | None = None,
    density: float | None = None,
    seed: int = 0,
    heads_from: str | int | None = None,
    pattern_rules: str = "current",
    base_subfolder: str | None = None,
    device: str = "cpu",
    workers: int | None = None,
    max_memory: int | None = None,
    timeout: float | None = None,
) -> list[int]:
    """Replace a running ``vllm.LLM``'s weights with base + adapter(s), merged as :func:`streammerge.merge` would.

    Arguments are those of :func:`streammerge.iter_merged` (``device`` is where each worker merges:
    ``cpu`` leaves the accelerator to the engine). Returns the number of tensors each worker loaded.

    Raises:
        StreamMergeError: ``llm`` is not a vLLM engine, serialization is not allowed, or a merge
            error from a worker (its message, as vLLM reports it).
    """
    _check(llm)
    kwargs = {
        "base": str(Path(base).resolve()) if base is not None else None,
        "adapters": [str(Path(a).resolve()) for a in ([adapter] if adapter is not None else []) + list(adapters)],
        "weights": list(weights) if weights is not None else None, "adapter_name": adapter_name,
        "combination": combination, "density": density, "seed": seed, "heads_from": heads_from,
        "pattern_rules": pattern_rules, "base_subfolder": base_subfolder, "device": device, "workers": workers,
    }
    if max_memory is not None:
        kwargs["max_memory"] = max_memory
    return llm.collective_rpc(reload_in_worker, timeout=timeout, kwargs={"merge_kwargs": kwargs})  # type: ignore[attr-defined]


def reload_in_worker(worker: object, merge_kwargs: dict) -> int:
    """Runs inside a vLLM worker: stream the merge into ``worker.reload_weights``. Returns tensors loaded."""
    import streammerge

    if not hasattr(worker, "reload_weights"):
        raise StreamMergeError(f"{type(worker).__name__} has no reload_weights: this needs a vLLM whose workers have "
                               "reload_weights(weights_iterator=...) (0.32 has)")
    count = 0

    def merged():
        nonlocal count
        with contextlib.closing(streammerge.iter_merged(**merge_kwargs)) as stream:
            for name, tensor in stream:
                count += 1
                yield name, tensor

    # if reload_weights raises or stops early, the merge (its thread pool and maps) is closed here, not by the GC
    with contextlib.closing(merged()) as weights:
        worker.reload_weights(weights_iterator=weights)
    return count
