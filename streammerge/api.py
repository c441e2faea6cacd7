"""The library façade: ``plan_merge``, ``merge`` and ``iter_merged``.

Each is a straight line: read headers → build the plan → execute. Errors are typed
(``streammerge.errors``); nothing here prints.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from streammerge import budget, digest, manifest, scatter
from streammerge import finalize as fin
from streammerge.adapter import Adapter, read_adapter
from streammerge.budget import ExecOptions
from streammerge.changes import ChangeTally, TensorChange
from streammerge.checkpoint import Checkpoint
from streammerge.errors import OutputError, StreamMergeError
from streammerge.locate import find_base, read_base
from streammerge.options import MergeOptions
from streammerge.output import check_output, prepare_output, side_file_names, write_index, write_side_files
from streammerge.parts import Part, parse_part, shards_of
from streammerge.plan import CombineOptions, Plan, PlanOptions
from streammerge.plan.assemble import build_plan
from streammerge.plan.combined import build_combined_plan
from streammerge.plan.unmerge import build_unmerge_plan
from streammerge.provenance import check_unmerge
from streammerge.sizes import format_size

if TYPE_CHECKING:  # torch is imported when the first block is computed, not before (see ``scatter``)
    import torch

LOG = logging.getLogger(__name__)

#: Default working-memory budget for merge blocks (see ``execute``): with the interpreter and
#: torch (~250 MB) a merge stays under 1 GB of RSS whatever the model size.
DEFAULT_MAX_MEMORY = 512 * 10**6

PathLike = str | Path
#: An adapter directory, or ``(directory, weight)`` for a weighted combination.
AdapterSpec = PathLike | tuple[PathLike, float]


@dataclass(frozen=True, slots=True)
class MergeReport:
    """What a merge did. ``dry_run`` reports carry the plan and wrote nothing."""

    out: str
    tensors_merged: int
    tensors_replaced: int
    tensors_added: int
    tensors_copied: int
    tensors_dropped: int
    bytes_written: int
    seconds: float
    device: str
    shards: int
    warnings: tuple[str, ...]
    dry_run: bool = False
    operation: str = "merge"  # or "unmerge": then ``tensors_merged`` counts the tensors unmerged
    bytes_kept: int = 0  # --resume: bytes of finished shards kept from an earlier run (not in bytes_written)
    base: str = ""  # the base (merge) or merged (unmerge) checkpoint read
    adapters: tuple[str, ...] = ()
    already_complete: bool = False  # a resume found this very output finished: nothing was written
    #: per merged tensor, the relative change written (``streammerge.changes``); tensors in shards a
    #: ``--resume`` kept, and saved modules, are measured by ``verify`` instead
    changes: tuple[TensorChange, ...] = ()
    #: re-quantized weights (keep-format merge into a quantized base): (name, max |dequant(out) − merged|,
    #: its max ratio to half a quantization step), the merged value being the --dequantize merge's
    requantized: tuple[tuple[str, float, float], ...] = ()

    def summary(self) -> str:
        verb = "would write" if self.dry_run else "wrote"
        done = "unmerged" if self.operation == "unmerge" else "merged"
        counts = (f"{self.tensors_merged} {done}, {self.tensors_replaced} replaced, {self.tensors_added} added, "
                  f"{self.tensors_copied} copied, {self.tensors_dropped} dropped")
        if self.already_complete:
            return f"{self.out}: already complete; nothing written ({counts}, {self.shards} shard(s) checked)"
        kept = f", kept {format_size(self.bytes_kept)} from the earlier run" if self.bytes_kept else ""
        text = (
            f"{counts}; {verb} {format_size(self.bytes_written)}{kept} "
            f"in {self.shards} shard(s) to {self.out} in {self.seconds:.1f} s on {self.device}"
        )
        if self.requantized:
            worst = max(self.requantized, key=lambda r: r[2])
            text += (f"; re-quantized {len(self.requantized)} weight(s), worst {worst[0]!r}: max error {worst[1]:.3g} "
                     f"= {worst[2]:.3f} of half a quantization step")
        return text


#: Device nodes of a GPU driver (NVIDIA, AMD ROCm, WSL): without any, torch cannot see a GPU.
_GPU_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia", "/dev/kfd", "/dev/dxg")


def device_name(device: str | torch.device) -> str:
    """The device a merge runs on, as torch names it (``cpu``, ``cuda``, ``cuda:1``). ``auto`` on a
    machine with no GPU driver is ``cpu`` without importing torch; anything else asks torch."""
    if str(device) == "cpu" or (str(device) == "auto" and not any(os.path.exists(p) for p in _GPU_NODES)):
        return "cpu"
    return str(resolve_device(device))


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` → CUDA when available, else CPU."""
    import torch

    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise StreamMergeError(f"`device` {device}: CUDA is not available here; use `device` cpu or auto")
    return dev


def _checksum(checksum: str | None, out: Path, resume: bool) -> str:
    """The ``checksum`` to write records with: the one given, else (``resume``) the one ``out``'s records
    use, else ``xxh3``."""
    if checksum is None:
        checksum = (manifest.recorded_checksum(out) if resume else None) or "xxh3"
    if checksum not in digest.CHECKSUMS:
        raise StreamMergeError(f"`checksum` {checksum!r}: use one of {', '.join(digest.CHECKSUMS)}")
    return checksum


def _load(
    base: PathLike | None, adapters: Sequence[PathLike], adapter_name: str | None, pattern_rules: str = "current",
    base_subfolder: str | None = None,
) -> tuple[Checkpoint, list[Adapter]]:
    if not adapters:
        raise StreamMergeError("no adapter given; pass `adapters` DIR")
    loaded = [read_adapter(a, adapter_name, pattern_rules) for a in adapters]
    base_path = Path(base) if base is not None else find_base(loaded[0])
    LOG.debug("base checkpoint: %s", base_path.resolve())
    return read_base(base_path, "base", base_subfolder), loaded


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
    paths, weights = _adapter_specs(adapter, adapters, weights)
    ckpt, loaded = _load(base, paths, adapter_name, pattern_rules, base_subfolder)
    options = merge_options(loaded, weights, combination, density, seed, heads_from, pattern_rules, adapter_name,
                            max_shard_size, base_subfolder=base_subfolder, dequantize=dequantize)
    return plan_with(ckpt, loaded, options)


def _adapter_specs(
    adapter: PathLike | None, adapters: Sequence[AdapterSpec], weights: Sequence[float] | None
) -> tuple[list[PathLike], list[float] | None]:
    """Split ``adapters`` (paths or ``(path, weight)``) into paths and weights (None: all plain paths)."""
    specs = ([adapter] if adapter is not None else []) + list(adapters)
    paths = [s[0] if isinstance(s, tuple) else s for s in specs]
    inline = [float(s[1]) if isinstance(s, tuple) else None for s in specs]
    if weights is not None:
        if any(w is not None for w in inline):
            raise StreamMergeError("give adapter weights either as (path, weight) pairs or as weights=, not both")
        return paths, [float(w) for w in weights]
    if all(w is None for w in inline):
        return paths, None
    return paths, [1.0 if w is None else w for w in inline]


def resolve_heads_from(value: str | int | None, adapters: Sequence[Adapter]) -> int | None:
    """``--heads-from`` as an adapter index: an index, a directory name or a path of one of ``adapters``."""
    if value is None:
        return None
    text = str(value)
    if text.isdigit() and int(text) < len(adapters):
        return int(text)
    found = [i for i, a in enumerate(adapters) if text in (a.root.name, str(a.root)) or Path(text) == a.root]
    if len(found) != 1:
        names = ", ".join(f"{i} ({a.root.name})" for i, a in enumerate(adapters))
        what = "names several adapters" if found else "is not one of the adapters"
        raise StreamMergeError(f"`heads_from` {text!r} {what}; use an index or directory name: {names}")
    return found[0]


def merge_options(
    loaded: Sequence[Adapter], weights: Sequence[float] | None = None, combination: str | None = None,
    density: float | None = None, seed: int = 0, heads_from: str | int | None = None, pattern_rules: str = "current",
    adapter_name: str | None = None, max_shard_size: int | None = None, allow_nonfinite: bool = False,
    base_subfolder: str | None = None,
    dequantize: bool = False,
) -> MergeOptions:
    """The recorded options of a merge of ``loaded`` from the API's arguments (``heads_from`` resolved)."""
    return MergeOptions(
        weights=tuple(float(w) for w in weights) if weights is not None else None, combination=combination,
        density=density, seed=int(seed), heads_from=resolve_heads_from(heads_from, loaded),
        pattern_rules=pattern_rules, adapter_name=adapter_name, max_shard_size=max_shard_size,
        allow_nonfinite=allow_nonfinite, base_subfolder=base_subfolder or None, dequantize=dequantize,
    )


def plan_with(ckpt: Checkpoint, loaded: Sequence[Adapter], options: MergeOptions) -> Plan:
    """The plan of a merge with recorded ``options``: one plain adapter is PEFT's own merge (``build_plan``);
    several, weights or a combination: ``build_combined_plan``."""
    plan_options = PlanOptions(max_shard_size=options.max_shard_size, dequantize=options.dequantize)
    weights, combination, density = options.weights, options.combination, options.density
    plain = weights is None or all(w == 1.0 for w in weights)
    if combination is None and len(loaded) == 1 and plain and options.heads_from is None:
        return build_plan(ckpt, loaded, plan_options)
    method = combination or "cat"
    if method != "cat" and density is None:
        raise StreamMergeError(
            f"`combination` {method} needs `density` (the fraction of each adapter's delta kept, e.g. 0.5)"
        )
    combine = CombineOptions(
        weights=tuple(weights) if weights is not None else (1.0,) * len(loaded), method=method,
        density=1.0 if density is None else float(density), seed=options.seed, heads_from=options.heads_from,
    )
    return build_combined_plan(ckpt, loaded, combine, plan_options)


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
        threads: torch intra-op threads per worker, set when torch is first used (None: torch's default).
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
    paths, weights = _adapter_specs(adapter, adapters, weights)
    if resume and not paths and base is None:
        return _resume_recorded(out, device=device, workers=workers, max_memory=max_memory, dry_run=dry_run,
                                allow_nonfinite=allow_nonfinite, on_progress=on_progress, on_plan=on_plan,
                                checksum=checksum, threads=threads)
    ckpt, loaded = _load(base, paths, adapter_name, pattern_rules, base_subfolder)
    options = merge_options(loaded, weights, combination, density, seed, heads_from, pattern_rules, adapter_name,
                            max_shard_size, allow_nonfinite, base_subfolder, dequantize)
    plan = plan_with(ckpt, loaded, options)
    if part is not None or executor is not None or (not (resume or overwrite or dry_run) and fin.record_paths(out)):
        split = _Split(parse_part(part) if isinstance(part, str) else part, executor, ray_address, parts)
        return _run_split(plan, ckpt, loaded, options, split, out=out, started=started, device=device,
                          workers=workers, max_memory=max_memory, dry_run=dry_run, overwrite=overwrite,
                          on_progress=on_progress, on_plan=on_plan, checksum=checksum, threads=threads)
    return _run_plan(
        plan, ckpt, loaded, [ckpt.root, *(a.root for a in loaded)], [a.root for a in loaded], options,
        out=out, started=started, device=device, workers=workers, max_memory=max_memory, dry_run=dry_run,
        overwrite=overwrite, resume=resume, allow_nonfinite=allow_nonfinite, on_progress=on_progress,
        on_plan=on_plan, checksum=checksum, threads=threads,
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


@dataclass(frozen=True, slots=True)
class _Split:
    part: Part | None
    executor: str | None
    ray_address: str | None
    parts: int | None


def _run_split(plan: Plan, ckpt: Checkpoint, loaded: Sequence[Adapter], options: MergeOptions, split: _Split, *,
               out: Path, started: float, device: str | torch.device, workers: int | None, max_memory: int,
               dry_run: bool, overwrite: bool, on_progress: Callable[[int], None] | None,
               on_plan: Callable[[Plan], None] | None, checksum: str | None = None,
               threads: int | None = None) -> MergeReport:
    """A merge split into parts: one part (``split.part``), all parts on Ray, or sealing what parts wrote."""
    solo = split.part is not None and split.executor is None
    scope = dataclasses.replace(plan, shards=shards_of(plan, split.part)) if solo else plan
    if on_plan is not None:  # a part reports (and --dry-run prints) its own shards
        on_plan(scope)
    dev = device_name(device)
    budget.check_budget(plan, max_memory)
    checksum = _checksum(checksum, out, True)  # parts always resume
    if overwrite:
        raise StreamMergeError("`overwrite` would delete the shards other parts wrote; parts always resume, "
                               "so rerun without it (or remove `out` first)")
    if split.executor not in (None, "ray"):
        raise StreamMergeError(f"executor {split.executor!r}: only 'ray' is supported")
    check_output(out, [ckpt.root, *(a.root for a in loaded)], overwrite=False, resume=True)  # parts always resume
    written, shards = scope.total_bytes, len(scope.shards)
    if not dry_run:
        identity = manifest.identify(ckpt, loaded, options.record(dev.split(":")[0]))
        if solo:
            opts = ExecOptions(dev, workers or budget.default_workers(), max_memory,
                               check_finite=not options.allow_nonfinite, threads=threads)
            written, shards = fin.write_part(out, plan, identity, split.part, opts, on_progress, checksum=checksum)
        else:
            if split.executor == "ray":
                from streammerge.integrations import ray as ray_executor  # optional dependency

                ray_executor.run_parts(merge, plan, identity, out, address=split.ray_address, parts=split.parts,
                                       workers=workers or budget.default_workers(), max_memory=max_memory,
                                       on_progress=on_progress)
            _seal(out, plan, ckpt, loaded, identity, fin.recorded_run(out)[2])
    c = scope.counts()
    return MergeReport(
        out=str(out), tensors_merged=c["merge"], tensors_replaced=c["replace"], tensors_added=c["add"],
        tensors_copied=c["copy"], tensors_dropped=c["drop"], bytes_written=written, seconds=time.monotonic() - started,
        device=str(dev), shards=shards, warnings=plan.warnings, dry_run=dry_run,
    )


def _seal(out: Path, plan: Plan, ckpt: Checkpoint, loaded: Sequence[Adapter], identity: manifest.Identity,
          count: int | None) -> None:
    found = fin.check_complete(out, plan, identity, count)
    fin.seal(out, plan, identity, found, lambda: _finish_files(out, plan, ckpt, [a.root for a in loaded]))


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
    ckpt, loaded = _load(sources["base"], sources["adapters"], o.adapter_name, o.pattern_rules, o.base_subfolder)
    plan = plan_with(ckpt, loaded, o)
    _seal(out, plan, ckpt, loaded, manifest.identify(ckpt, loaded, o.record(str(doc.get("device")))), count)
    c = plan.counts()
    return MergeReport(
        out=str(out), tensors_merged=c["merge"], tensors_replaced=c["replace"], tensors_added=c["add"],
        tensors_copied=c["copy"], tensors_dropped=c["drop"], bytes_written=plan.total_bytes,
        seconds=time.monotonic() - started, device=str(doc.get("device")), shards=len(plan.shards),
        warnings=plan.warnings,
    )


def _run_plan(
    plan: Plan, ckpt: Checkpoint, loaded: Sequence[Adapter], inputs: Sequence[Path], tokenizer_roots: Sequence[Path],
    options: MergeOptions, *, out: Path, started: float, device: str | torch.device, workers: int | None,
    max_memory: int, dry_run: bool, overwrite: bool, resume: bool, allow_nonfinite: bool,
    on_progress: Callable[[int], None] | None, on_plan: Callable[[Plan], None] | None, checksum: str | None,
    threads: int | None, extra_warnings: Sequence[str] = (),
) -> MergeReport:
    """Everything after planning that ``merge`` and ``unmerge`` share: checks, then ``_write``, then the report."""
    if on_plan is not None:
        on_plan(plan)
    checksum = _checksum(checksum, out, resume)
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
                           threads=threads, changes=tally, quant_run=run)
        identity = manifest.identify(ckpt, loaded, options.record(dev.split(":")[0]))
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


def _write(out: Path, plan: Plan, ckpt: Checkpoint, tokenizer_roots: Sequence[Path], identity: manifest.Identity,
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
        progress.finish(_finish_files(out, plan, ckpt, tokenizer_roots), warnings)
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


def _finish_files(out: Path, plan: Plan, ckpt: Checkpoint, tokenizer_roots: Sequence[Path]) -> list[str]:
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


def iter_merged(
    base: PathLike | None = None,
    adapter: PathLike | None = None,
    *,
    adapters: Sequence[AdapterSpec] = (),
    adapter_name: str | None = None,
    device: str | torch.device = "auto",
    workers: int | None = None,
    max_memory: int = DEFAULT_MAX_MEMORY,
    allow_nonfinite: bool = False,
    weights: Sequence[float] | None = None,
    combination: str | None = None,
    density: float | None = None,
    seed: int = 0,
    heads_from: str | int | None = None,
    pattern_rules: str = "current",
    part: Part | str | None = None,
    base_subfolder: str | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every tensor of the merged checkpoint, in output order.

    Nothing is written to disk. Each yielded tensor is a fresh CPU tensor the caller owns; apart
    from it, memory stays within ``max_memory`` (the same pipeline as ``merge``). This is the
    in-process path for pushing merged weights into an inference engine, e.g.
    ``llm.load_weights(streammerge.iter_merged(base=..., adapter=...))``. Adapter, weight and
    combination arguments are those of :func:`merge`. ``part`` (``Part(I, N)`` or ``"I/N"``) yields
    only the tensors of the output shards of part I of N (``streammerge.parts``): N consumers, e.g.
    N Ray actors, each get a disjoint slice, and together every tensor once.
    """
    paths, weights = _adapter_specs(adapter, adapters, weights)
    ckpt, loaded = _load(base, paths, adapter_name, pattern_rules, base_subfolder)
    plan = plan_with(ckpt, loaded, merge_options(loaded, weights, combination, density, seed, heads_from,
                                                 pattern_rules, adapter_name, base_subfolder=base_subfolder))
    budget.check_budget(plan, max_memory)
    opts = ExecOptions(resolve_device(device), workers or budget.default_workers(), max_memory,
                       check_finite=not allow_nonfinite)
    if isinstance(part, str):
        part = parse_part(part)
    tasks = plan.tasks() if part is None else tuple(t for s in shards_of(plan, part) for t in s.tasks)
    from streammerge import execute
    from streammerge.formats.reader import TensorReader

    with TensorReader() as reader:
        yield from execute.whole_tensors(tasks, reader, opts)


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
    return _run_plan(
        plan, ckpt, [loaded], inputs, [], options, out=out, started=started, device=device, workers=workers,
        max_memory=max_memory, dry_run=dry_run, overwrite=overwrite, resume=resume, allow_nonfinite=allow_nonfinite,
        on_progress=on_progress, on_plan=on_plan, checksum=checksum, threads=threads,
        extra_warnings=check.warnings,
    )
