"""The unmerge entry points: :func:`plan_unmerge` and :func:`unmerge` take an adapter back out of a merged
checkpoint, after the provenance checks of ``streammerge.provenance``; writing is ``streammerge.run``'s.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from streammerge.adapter import read_adapter
from streammerge.locate import read_base
from streammerge.options import MergeOptions
from streammerge.plan import Plan, PlanOptions
from streammerge.plan.unmerge import build_unmerge_plan
from streammerge.prepare import DEFAULT_MAX_MEMORY, PathLike
from streammerge.provenance import check_unmerge
from streammerge.report import MergeReport
from streammerge.run import run_plan

if TYPE_CHECKING:
    import torch


def plan_unmerge(
    merged: PathLike, adapter: PathLike, *, weight: float | None = None, base: PathLike | None = None,
    adapter_name: str | None = None, max_shard_size: int | None = None, force: bool = False,
) -> Plan:
    """The frozen plan of :func:`unmerge` (after its manifest checks); reads no tensor and writes nothing."""
    loaded = read_adapter(adapter, adapter_name)
    check = check_unmerge(Path(merged), loaded, weight, force=force)
    original = read_base(Path(base), "base") if base is not None else None
    return build_unmerge_plan(read_base(Path(merged), "merged"), loaded, check.weight, original,
                              PlanOptions(max_shard_size=max_shard_size))


def unmerge(
    merged: PathLike,
    adapter: PathLike,
    out: PathLike,
    *,
    weight: float | None = None,
    force: bool = False,
    base: PathLike | None = None,
    adapter_name: str | None = None,
    device: str | torch.device = "auto",
    workers: int | None = None,
    max_shard_size: int | None = None,
    max_memory: int = DEFAULT_MAX_MEMORY,
    dry_run: bool = False,
    overwrite: bool = False,
    resume: bool = False,
    allow_nonfinite: bool = False,
    on_progress: Callable[[int], None] | None = None,
    on_plan: Callable[[Plan], None] | None = None,
    checksum: str | None = None,
    threads: int | None = None,
    direct_io: bool = True,
) -> MergeReport:
    """Take ``weight`` × the adapter back out of a merged checkpoint: W ← rnd(M − w·s·B@A), one rounding.

    When ``merged`` has a ``streammerge.json`` it is checked first (``streammerge.provenance``): ``weight``
    defaults to the recorded weight; an adapter that was not merged into it, or another weight, is refused
    unless ``force`` (then the output's manifest records a warning); a pruning combination is always refused.

    The merged checkpoint was rounded once, so the result is the base only up to that rounding:
    every element U lies within ½ ulp(M) + ½ ulp(U) of the original W (README, "Unmerge").
    Tensors with no exact inverse (saved heads and other full tensors, DoRA, trainable tokens)
    are refused unless ``base`` (the original checkpoint) is given; they are then copied from it.
    Other arguments are those of :func:`merge`; config and tokenizer files come from ``merged``.

    Raises:
        StreamMergeError: bad input, no inverse, or an output problem, with a one-line message.
    """
    started = time.monotonic()
    out = Path(out)
    ckpt = read_base(Path(merged), "merged")
    loaded = read_adapter(adapter, adapter_name)
    check = check_unmerge(Path(merged), loaded, weight, force=force)
    original = read_base(Path(base), "base") if base is not None else None
    plan = build_unmerge_plan(ckpt, loaded, check.weight, original, PlanOptions(max_shard_size=max_shard_size))
    inputs = [ckpt.root, loaded.root, *([original.root] if original is not None else [])]
    options = MergeOptions(operation="unmerge", weight=check.weight, max_shard_size=max_shard_size,
                           original_base=str(original.root) if original is not None else None,
                           adapter_name=adapter_name, allow_nonfinite=allow_nonfinite)
    return run_plan(
        plan, ckpt, [loaded], inputs, [], options, out=out, started=started, device=device, workers=workers,
        max_memory=max_memory, dry_run=dry_run, overwrite=overwrite, resume=resume, allow_nonfinite=allow_nonfinite,
        on_progress=on_progress, on_plan=on_plan, checksum=checksum, threads=threads, direct_io=direct_io,
        extra_warnings=check.warnings,
    )
