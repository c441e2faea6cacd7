"""A merge split into parts (``merge(part=...)``, or every part as a Ray task) and :func:`finalize`, which seals
an output directory the parts wrote. The protocol is ``streammerge.finalize``; the assignment ``streammerge.parts``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from streammerge import budget
from streammerge import finalize as fin
from streammerge.adapter import Adapter
from streammerge.budget import ExecOptions
from streammerge.checkpoint import Checkpoint
from streammerge.errors import StreamMergeError
from streammerge.identity import Identity, identify
from streammerge.options import MergeOptions
from streammerge.output import check_output
from streammerge.parts import Part, shards_of
from streammerge.plan import Plan
from streammerge.prepare import PathLike, device_name, load_inputs, plan_with
from streammerge.report import MergeReport
from streammerge.run import choose_checksum, finish_files

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True, slots=True)
class Split:
    """How a merge is split: its own ``part``, or every part on an ``executor`` (``"ray"``)."""

    part: Part | None
    executor: str | None
    ray_address: str | None
    parts: int | None


def run_split(merge: Callable[..., MergeReport], plan: Plan, ckpt: Checkpoint, loaded: Sequence[Adapter],
              options: MergeOptions, split: Split, *, out: Path, started: float, device: str | torch.device,
              workers: int | None, max_memory: int, dry_run: bool, overwrite: bool,
              on_progress: Callable[[int], None] | None, on_plan: Callable[[Plan], None] | None,
              checksum: str | None = None, threads: int | None = None, direct_io: bool = True) -> MergeReport:
    """A merge split into parts: one part (``split.part``), all parts on Ray, or sealing what parts wrote.
    ``merge`` is ``streammerge.merge``, which each Ray task calls for its part."""
    solo = split.part is not None and split.executor is None
    scope = dataclasses.replace(plan, shards=shards_of(plan, split.part)) if solo else plan
    if on_plan is not None:  # a part reports (and --dry-run prints) its own shards
        on_plan(scope)
    dev = device_name(device)
    budget.check_budget(plan, max_memory)
    checksum = choose_checksum(checksum, out, True)  # parts always resume
    if overwrite:
        raise StreamMergeError("`overwrite` would delete the shards other parts wrote; parts always resume, "
                               "so rerun without it (or remove `out` first)")
    if split.executor not in (None, "ray"):
        raise StreamMergeError(f"executor {split.executor!r}: only 'ray' is supported")
    check_output(out, [ckpt.root, *(a.root for a in loaded)], overwrite=False, resume=True)  # parts always resume
    written, shards = scope.total_bytes, len(scope.shards)
    if not dry_run:
        identity = identify(ckpt, loaded, options.record(dev.split(":")[0]))
        if solo:
            opts = ExecOptions(dev, workers or budget.default_workers(), max_memory,
                               check_finite=not options.allow_nonfinite, threads=threads, direct_io=direct_io)
            written, shards = fin.write_part(out, plan, identity, split.part, opts, on_progress, checksum=checksum)
        else:
            if split.executor == "ray":
                from streammerge.integrations import ray as ray_executor  # optional dependency

                ray_executor.run_parts(merge, plan, identity, out, address=split.ray_address, parts=split.parts,
                                       workers=workers or budget.default_workers(), max_memory=max_memory,
                                       on_progress=on_progress, threads=threads, direct_io=direct_io)
            seal(out, plan, ckpt, loaded, identity, fin.recorded_run(out)[2])
    c = scope.counts()
    return MergeReport(
        out=str(out), tensors_merged=c["merge"], tensors_replaced=c["replace"], tensors_added=c["add"],
        tensors_copied=c["copy"], tensors_dropped=c["drop"], bytes_written=written, seconds=time.monotonic() - started,
        device=str(dev), shards=shards, warnings=plan.warnings, dry_run=dry_run,
    )


def seal(out: Path, plan: Plan, ckpt: Checkpoint, loaded: Sequence[Adapter], identity: Identity,
         count: int | None) -> None:
    """Check every shard of ``plan`` is in ``out``, then write side files, index and manifest (``finalize.seal``)."""
    found = fin.check_complete(out, plan, identity, count)
    fin.seal(out, plan, identity, found, lambda: finish_files(out, plan, ckpt, [a.root for a in loaded]))


def finalize(out: PathLike) -> MergeReport:
    """Seal an output directory that parts (``merge(..., part=...)``) wrote: check every shard of the
    plan is there with the identity the plan expects, then write side files, index and manifest
    (the bytes a one-process merge writes). The inputs and options are those the parts recorded.

    Raises:
        streammerge.finalize.IncompleteError: shards missing or stale (named, with the parts to rerun);
            nothing is written.
    """
    started, out = time.monotonic(), Path(out)
    sources, doc, count = fin.recorded_run(out)
    o = MergeOptions.from_record(doc)
    ckpt, loaded = load_inputs(sources["base"], sources["adapters"], o.adapter_name, o.pattern_rules, o.base_subfolder)
    plan = plan_with(ckpt, loaded, o)
    seal(out, plan, ckpt, loaded, identify(ckpt, loaded, o.record(str(doc.get("device")))), count)
    c = plan.counts()
    return MergeReport(
        out=str(out), tensors_merged=c["merge"], tensors_replaced=c["replace"], tensors_added=c["add"],
        tensors_copied=c["copy"], tensors_dropped=c["drop"], bytes_written=plan.total_bytes,
        seconds=time.monotonic() - started, device=str(doc.get("device")), shards=len(plan.shards),
        warnings=plan.warnings,
    )
