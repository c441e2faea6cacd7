"""Executing a plan into an output directory, the part ``merge`` and ``unmerge`` share: the checks (budget,
output directory, checksum), the shards (``scatter``, kept ones on ``--resume``), side files and index, the
manifest last, and the :class:`~streammerge.report.MergeReport`.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from streammerge import budget, digest, manifest, scatter
from streammerge.adapter import Adapter
from streammerge.budget import ExecOptions
from streammerge.changes import ChangeTally
from streammerge.checkpoint import Checkpoint
from streammerge.errors import OutputError, StreamMergeError
from streammerge.identity import Identity, identify
from streammerge.options import MergeOptions
from streammerge.output import check_output, prepare_output, side_file_names, write_index, write_side_files
from streammerge.plan import Plan
from streammerge.prepare import device_name
from streammerge.report import MergeReport

if TYPE_CHECKING:  # torch is imported when the first block is computed, not before (see ``scatter``)
    import torch

LOG = logging.getLogger(__name__)


def choose_checksum(checksum: str | None, out: Path, resume: bool) -> str:
    """The ``checksum`` to write records with: the one given, else (``resume``) the one ``out``'s records
    use, else ``xxh3``."""
    if checksum is None:
        checksum = (manifest.recorded_checksum(out) if resume else None) or "xxh3"
    if checksum not in digest.CHECKSUMS:
        raise StreamMergeError(f"`checksum` {checksum!r}: use one of {', '.join(digest.CHECKSUMS)}")
    return checksum


def run_plan(
    plan: Plan, ckpt: Checkpoint, loaded: Sequence[Adapter], inputs: Sequence[Path], tokenizer_roots: Sequence[Path],
    options: MergeOptions, *, out: Path, started: float, device: str | torch.device, workers: int | None,
    max_memory: int, dry_run: bool, overwrite: bool, resume: bool, allow_nonfinite: bool,
    on_progress: Callable[[int], None] | None, on_plan: Callable[[Plan], None] | None, checksum: str | None,
    threads: int | None, direct_io: bool = True, extra_warnings: Sequence[str] = (),
) -> MergeReport:
    """Everything after planning that ``merge`` and ``unmerge`` share: checks, then ``_write``, then the report."""
    if on_plan is not None:
        on_plan(plan)
    checksum = choose_checksum(checksum, out, resume)
    dev = device_name(device)
    budget.check_budget(plan, max_memory)
    check_output(out, inputs, overwrite=overwrite, resume=resume)
    for warning in (*plan.warnings, *extra_warnings):
        LOG.warning("%s", warning)
    written = kept = 0
    complete = False
    tally = ChangeTally()
    run = None
    if any(t.quant is not None for t in plan.tasks()):
        from streammerge.requant import QuantRun  # torch: only a quantized base needs it this early

        run = QuantRun()
    if not dry_run:
        opts = ExecOptions(dev, workers or budget.default_workers(), max_memory, check_finite=not allow_nonfinite,
                           threads=threads, changes=tally, quant_run=run, direct_io=direct_io)
        identity = identify(ckpt, loaded, options.record(dev.split(":")[0]))
        if resume:
            resume = manifest.check_resumable(out, identity, overwrite=overwrite)
        written, kept, complete = _write(out, plan, ckpt, tokenizer_roots, identity, opts, overwrite=overwrite,
                                         resume=resume, on_progress=on_progress, checksum=checksum,
                                         warnings=(*plan.warnings, *extra_warnings))
    c = plan.counts()
    changes = tally.result()
    noops = tuple(ch.warning() for ch in changes if ch.unchanged)
    for warning in noops:
        LOG.warning("%s", warning)
    return MergeReport(
        out=str(out), tensors_merged=c["merge"], tensors_replaced=c["replace"], tensors_added=c["add"],
        tensors_copied=c["copy"], tensors_dropped=c["drop"], bytes_written=plan.total_bytes if dry_run else written,
        seconds=time.monotonic() - started, device=str(dev), shards=len(plan.shards),
        warnings=(*ckpt.notes, *plan.warnings, *extra_warnings, *noops), dry_run=dry_run, changes=changes,
        requantized=tuple((name, *err) for name, err in sorted(run.errors.items())) if run is not None else (),
        operation=options.operation, bytes_kept=kept, base=str(ckpt.root), adapters=tuple(str(a.root) for a in loaded),
        already_complete=complete,
    )


def _write(out: Path, plan: Plan, ckpt: Checkpoint, tokenizer_roots: Sequence[Path], identity: Identity,
           opts: ExecOptions, *, overwrite: bool, resume: bool, on_progress: Callable[[int], None] | None,
           checksum: str, warnings: Sequence[str] = ()) -> tuple[int, int, bool]:
    """Write shards (skipping those ``--resume`` may keep), side files, index, and the manifest last.
    Returns (bytes written, bytes of shards kept, whether a resume found the output already complete).

    On an interrupt (Ctrl-C, SIGTERM) or an output fault (disk full, unwritable), the committed
    shards and their progress record stay, for ``--resume``; temporary files are removed. On an
    input problem found while executing (a non-finite result, a base file that changed) a
    directory this run created is removed.
    """
    created = prepare_output(out, overwrite=overwrite and not resume)
    try:
        progress = manifest.Progress.start(out, identity, plan, resume=resume, checksum=checksum)
        kept_bytes = sum(len(s.header) + s.data_size for s in plan.shards if s.filename in progress.kept)
        if on_progress is not None and kept_bytes:
            on_progress(kept_bytes)
        if progress.complete:
            LOG.info("resume: %s is already complete; nothing written", out)
            return 0, kept_bytes, True
        todo = [s for s in plan.shards if s.filename not in progress.kept]
        written = scatter.write_shards(todo, out, opts, on_progress, on_shard=progress.record, checksum=checksum)
        progress.expect_files([*side_file_names(ckpt.root, tokenizer_roots, ckpt.config),
                               *([plan.index_name] if plan.write_index else [])])
        progress.finish(finish_files(out, plan, ckpt, tokenizer_roots), warnings)
    except StreamMergeError as e:
        if isinstance(e, OutputError):  # disk full, unwritable: what is done stays for --resume
            manifest.remove_temporaries(out)
        else:
            _cleanup(out, created)
        raise
    except BaseException:  # Ctrl-C, SIGTERM (the CLI raises on it), or a bug: a resumable state stays
        manifest.remove_temporaries(out)
        raise
    return written, kept_bytes, False


def finish_files(out: Path, plan: Plan, ckpt: Checkpoint, tokenizer_roots: Sequence[Path]) -> list[str]:
    """Config, generation and tokenizer files, then the index. Returns the names written."""
    files = write_side_files(out, ckpt.root, tokenizer_roots, ckpt.config, plan.config_updates,
                             plan.config_removals)
    if plan.write_index:
        write_index(out, plan.index_json(), plan.index_name)
        files.append(plan.index_name)
    return files


def _cleanup(out: Path, created: bool) -> None:
    """After an input problem, leave nothing behind in a directory this run created."""
    if created:
        shutil.rmtree(out, ignore_errors=True)
