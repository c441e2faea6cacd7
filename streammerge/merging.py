"""The merge entry points: :func:`plan_merge` and :func:`merge` (one process, one part of several, every part
on Ray, or a ``resume`` from what the output recorded). Each is a straight line: read headers → build the
plan → execute (``streammerge.run``, ``streammerge.split_merge``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from streammerge import finalize as fin
from streammerge import manifest
from streammerge.errors import StreamMergeError
from streammerge.options import MergeOptions
from streammerge.parts import Part, parse_part
from streammerge.plan import Plan
from streammerge.prepare import (
    DEFAULT_MAX_MEMORY,
    AdapterSpec,
    PathLike,
    adapter_specs,
    load_inputs,
    merge_options,
    plan_with,
)
from streammerge.report import MergeReport
from streammerge.run import run_plan
from streammerge.split_merge import Split, run_split
from streammerge.unmerging import unmerge

if TYPE_CHECKING:
    import torch

LOG = logging.getLogger(__name__)


def plan_merge(
    base: PathLike | None = None,
    adapter: PathLike | None = None,
    *,
    adapters: Sequence[AdapterSpec] = (),
    adapter_name: str | None = None,
    max_shard_size: int | None = None,
    weights: Sequence[float] | None = None,
    combination: str | None = None,
    density: float | None = None,
    seed: int = 0,
    heads_from: str | int | None = None,
    pattern_rules: str = "current",
    base_subfolder: str | None = None,
    dequantize: bool = False,
) -> Plan:
    """Read headers and configs and return the frozen plan; reads no tensor and writes nothing."""
    paths, weights = adapter_specs(adapter, adapters, weights)
    ckpt, loaded = load_inputs(base, paths, adapter_name, pattern_rules, base_subfolder)
    options = merge_options(loaded, weights, combination, density, seed, heads_from, pattern_rules, adapter_name,
                            max_shard_size, base_subfolder=base_subfolder, dequantize=dequantize)
    return plan_with(ckpt, loaded, options)


def merge(
    base: PathLike | None = None,
    adapter: PathLike | None = None,
    out: PathLike | None = None,
    *,
    adapters: Sequence[AdapterSpec] = (),
    adapter_name: str | None = None,
    device: str | torch.device = "auto",
    workers: int | None = None,
    max_shard_size: int | None = None,
    max_memory: int = DEFAULT_MAX_MEMORY,
    dry_run: bool = False,
    overwrite: bool = False,
    allow_nonfinite: bool = False,
    on_progress: Callable[[int], None] | None = None,
    on_plan: Callable[[Plan], None] | None = None,
    weights: Sequence[float] | None = None,
    combination: str | None = None,
    density: float | None = None,
    seed: int = 0,
    heads_from: str | int | None = None,
    pattern_rules: str = "current",
    resume: bool = False,
    part: Part | str | None = None,
    executor: str | None = None,
    ray_address: str | None = None,
    parts: int | None = None,
    base_subfolder: str | None = None,
    dequantize: bool = False,
    checksum: str | None = None,
    threads: int | None = None,
    direct_io: bool = True,
) -> MergeReport:
    """Merge the adapter(s) into the base and write a complete checkpoint at ``out``.

    Args:
        base: base checkpoint directory (or one ``.safetensors`` file); None resolves
            ``base_model_name_or_path`` from the adapter config (local directory or HF cache).
        adapter: PEFT adapter directory (``adapters`` may list more: paths, or ``(path, weight)``).
        out: output directory; must not exist or be empty (unless ``overwrite``), and may not
            alias an input.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda[:N]``.
        workers: compute threads (default: up to 4, by core count).
        max_shard_size: re-shard the output to at most this many bytes per file.
        max_memory: working-memory budget in bytes for merge blocks (see ``execute``).
        dry_run: plan only; report what would be written.
        on_progress: called with a byte count as output bytes are produced.
        on_plan: called with the plan once it is built (the CLI prints it for --dry-run).
        weights: one weight per adapter (or give ``(path, weight)`` pairs in ``adapters``).
        combination: ``cat`` (default with several adapters or weights: W + Σ wᵢ·sᵢ·BᵢAᵢ with one
            rounding), ``ties``, ``dare_linear``, ``dare_ties`` or ``magnitude_prune`` (task-vector
            operators on each tensor's full deltas; see ``streammerge.combine``). One adapter of
            weight 1 with no combination is PEFT's own merge, bit for bit.
        density: fraction of each delta the pruning combinations keep (required for them).
        seed: DARE's mask seed (the mask depends only on seed, tensor name, adapter and element).
        heads_from: adapter (index or directory name) whose full tensors (saved heads) are taken
            where several adapters carry one; heads are never blended.
        base_subfolder: the model inside a multi-model repository (``text_encoder``, ``transformer``):
            its weights, config and side files are read from ``base/base_subfolder``; recorded in the manifest.
        resume: continue an interrupted merge into ``out``: keep the shards whose recorded identity
            (inputs, options, header, tasks) and SHA-256 still match, recompute the rest. The end
            result is byte-identical to an uninterrupted merge. See ``streammerge.manifest``.
        part: ``Part(I, N)`` or ``"I/N"``: write only the shards of part I of N into ``out`` (shared
            by the other parts), never the index, config or manifest; :func:`finalize` seals ``out``
            once every part is done. Rerunning a part is safe. See ``streammerge.finalize``. Without
            ``part``, over an ``out`` where parts wrote every shard, ``merge`` finalizes it.
        executor: ``"ray"``: run ``parts`` parts (default: one per task slot of the cluster) as Ray
            tasks (``pip install streammerge[ray]``), retrying a task whose worker died, then finalize.
            Every node must see the inputs and ``out`` at the same paths (shared storage).
        ray_address: ``ray.init(address=...)``: None starts or reuses a local Ray, ``"auto"`` joins a cluster.
        checksum: the manifest's digest of each output file: ``xxh3`` (XXH3-128, per 64-row piece,
            combined; see ``streammerge.digest``) or ``sha256`` (the whole file, as ``sha256sum``).
            None: ``xxh3``, or with ``resume`` the one ``out``'s records were written with.
        threads: torch intra-op threads per worker, set while the merge runs (None: 1 on the CPU, where the
            workers are the parallelism; torch's default elsewhere).
        direct_io: write the shards with direct I/O where the filesystem allows (no page-cache copy of the
            output; ``streammerge.diskio``); False writes through the page cache, which leaves the output
            cached for a load right after. The bytes are the same.
        dequantize: a quantized base (FP8 block, compressed-tensors FP8): write every quantized weight in the
            config's ``torch_dtype`` and drop ``quantization_config``. Default: keep the format (untouched
            weights and scales copied raw; merged weights re-quantized with fresh scales).

    Returns:
        A :class:`MergeReport`.

    Raises:
        StreamMergeError: any bad input or output problem, with a one-line message.
    """
    if out is None:
        raise StreamMergeError("no output directory given; pass `out` DIR")
    started = time.monotonic()
    out = Path(out)
    paths, weights = adapter_specs(adapter, adapters, weights)
    if resume and not paths and base is None:
        return _resume_recorded(out, device=device, workers=workers, max_memory=max_memory, dry_run=dry_run,
                                allow_nonfinite=allow_nonfinite, on_progress=on_progress, on_plan=on_plan,
                                checksum=checksum, threads=threads, direct_io=direct_io)
    ckpt, loaded = load_inputs(base, paths, adapter_name, pattern_rules, base_subfolder)
    options = merge_options(loaded, weights, combination, density, seed, heads_from, pattern_rules, adapter_name,
                            max_shard_size, allow_nonfinite, base_subfolder, dequantize)
    plan = plan_with(ckpt, loaded, options)
    if part is not None or executor is not None or (not (resume or overwrite or dry_run) and fin.record_paths(out)):
        split = Split(parse_part(part) if isinstance(part, str) else part, executor, ray_address, parts)
        return run_split(merge, plan, ckpt, loaded, options, split, out=out, started=started, device=device,
                         workers=workers, max_memory=max_memory, dry_run=dry_run, overwrite=overwrite,
                         on_progress=on_progress, on_plan=on_plan, checksum=checksum, threads=threads,
                         direct_io=direct_io)
    return run_plan(
        plan, ckpt, loaded, [ckpt.root, *(a.root for a in loaded)], [a.root for a in loaded], options,
        out=out, started=started, device=device, workers=workers, max_memory=max_memory, dry_run=dry_run,
        overwrite=overwrite, resume=resume, allow_nonfinite=allow_nonfinite, on_progress=on_progress,
        on_plan=on_plan, checksum=checksum, threads=threads, direct_io=direct_io,
    )


def _resume_recorded(out: Path, **run: object) -> MergeReport:
    """``merge(out=..., resume=True)`` with no inputs named: the inputs and options ``out`` recorded."""
    recorded = manifest.recorded_run(out)
    if recorded is None:
        raise StreamMergeError(
            f"{out}: no streammerge record of inputs to resume from; name the inputs (adapter, and base) again"
        )
    sources, doc = recorded
    o = MergeOptions.from_record(doc)
    adapters = [a for a in sources.get("adapters") or [] if isinstance(a, str)]
    base = sources.get("base") if isinstance(sources.get("base"), str) else None
    if not adapters or base is None:
        raise StreamMergeError(f"{out}: the record names no base or adapter; name the inputs again")
    run["allow_nonfinite"] = bool(run["allow_nonfinite"]) or o.allow_nonfinite
    LOG.info("resume: %s of %s into %s with the recorded options", o.operation, ", ".join(adapters), base)
    if o.operation == "unmerge":
        # the recorded weight was checked against the merged manifest (or forced) when this output was started
        return unmerge(base, adapters[0], out, weight=o.weight, force=True, base=o.original_base,
                       adapter_name=o.adapter_name, max_shard_size=o.max_shard_size, resume=True, **run)
    return merge(base, out=out, adapters=adapters, adapter_name=o.adapter_name, max_shard_size=o.max_shard_size,
                 weights=o.weights, combination=o.combination, density=o.density, seed=o.seed,
                 heads_from=o.heads_from, pattern_rules=o.pattern_rules, base_subfolder=o.base_subfolder,
                 dequantize=o.dequantize, resume=True, **run)
