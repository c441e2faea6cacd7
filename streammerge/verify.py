"""Check a merged directory against its inputs: ``streammerge verify --out DIR --base DIR --adapter DIR``.

Rebuilds the plan from the base and adapter(s) with the options recorded in ``streammerge.json``
and checks, without trusting anything in the output directory:

* the manifest exists and records the same inputs (by content identity) and options;
* every file the manifest lists has its recorded size and digest (the one its record names), and no
  stray shard, temporary file or progress record is left;
* each shard's header is the plan's header byte for byte, and the index is the plan's index;
* every tensor: untouched ones byte-identical to their source (the base, or the adapter for a
  saved module); computed ones byte-identical to a recomputation through the same plan and
  kernel (``execute.pieces`` for all rows, or ``sample`` rows per tensor in whole 64-row blocks
  via ``execute.compute_rows``);
* every targeted tensor's change against the base (``changes.measure_output``): one equal to the base
  bit for bit is a warning, a problem under ``against_base``.

Bytes are compared, not values, so NaN payloads and signed zeros count too. This module rebuilds the plan
and reports; the checks are ``verify_files`` (manifest, listed files, strays, index) and ``verify_tensors``
(headers, digests, tensor bytes).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from streammerge import changes, digest, manifest
from streammerge.adapter import Adapter, read_adapter
from streammerge.budget import ExecOptions, default_workers
from streammerge.checkpoint import Checkpoint
from streammerge.errors import OutputError, StreamMergeError
from streammerge.identity import identify
from streammerge.locate import find_base, read_base
from streammerge.options import MergeOptions
from streammerge.plan import PlanOptions
from streammerge.plan.unmerge import build_unmerge_plan
from streammerge.prepare import DEFAULT_MAX_MEMORY, plan_with, resolve_device
from streammerge.sizes import format_size
from streammerge.verify_files import Findings, check_files, check_manifest
from streammerge.verify_tensors import check_tensors, sample_blocks

if TYPE_CHECKING:  # torch loads when a tensor is compared, not at ``import streammerge``
    import torch

__all__ = ["VerifyReport", "sample_blocks", "verify"]

LOG = logging.getLogger(__name__)

PathLike = str | Path


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """What ``verify`` found. ``ok`` is True when there is no problem."""

    out: str
    problems: tuple[str, ...]
    tensors_checked: int
    tensors_recomputed: int
    rows_recomputed: int
    bytes_hashed: int
    seconds: float
    sample: int | None
    #: per targeted tensor, the relative change of the output against the base (``streammerge.changes``;
    #: over the sampled rows when ``sample`` is set)
    changes: tuple[changes.TensorChange, ...] = ()
    warnings: tuple[str, ...] = ()  # targeted tensors equal to the base (problems under ``against_base``)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        rows = "all rows" if self.sample is None else f"{self.sample} sampled row(s) per tensor"
        head = (f"{'OK' if self.ok else 'FAILED'}: {self.out}: {self.tensors_checked} tensors checked "
                f"({self.tensors_recomputed} recomputed, {rows}: {self.rows_recomputed} rows), "
                f"{format_size(self.bytes_hashed)} hashed in {self.seconds:.1f} s")
        return "\n".join([head, *(f"problem: {p}" for p in self.problems), *(f"warning: {w}" for w in self.warnings)])


def verify(
    out: PathLike,
    base: PathLike | None = None,
    adapter: PathLike | None = None,
    *,
    adapters: Sequence[PathLike] = (),
    adapter_name: str | None = None,
    sample: int | None = None,
    device: str | torch.device | None = None,
    workers: int | None = None,
    max_memory: int = DEFAULT_MAX_MEMORY,
    on_progress: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    base_subfolder: str | None = None,
    against_base: bool = False,
) -> VerifyReport:
    """Check the merged directory ``out`` against its inputs; see the module docstring.

    The plan is rebuilt from the inputs and options ``streammerge.json`` records (weights, combination,
    density, seed, pattern rules, adapter name, heads, shard size, unmerge weight). ``base``/``adapter(s)``/
    ``adapter_name`` override the recorded inputs (a different number of adapters, or another adapter name,
    is refused). ``device`` defaults to the recorded device class when it is available here, else the CPU.

    Every targeted tensor's change against the base is measured (``VerifyReport.changes``); one equal
    to the base bit for bit is a warning, or a problem when ``against_base``. An untargeted tensor that
    differs from the base is always a problem (its bytes must be the base's).

    ``on_start`` is called once with the number of bytes the checks will go through (twice the planned
    shards' size: hashed, then compared), ``on_progress`` with each byte count done (for a progress bar).

    Raises:
        StreamMergeError: unusable input (missing directories, a corrupt base or adapter).
    """
    started = time.monotonic()
    out = Path(out)
    if not out.is_dir():
        raise OutputError(f"{out}: not a directory; pass `out` DIR with a merged checkpoint")
    if sample is not None and sample < 1:
        raise StreamMergeError(f"`sample` {sample}: must be at least 1 row")
    found = Findings()
    doc = manifest.read_json_file(out / manifest.MANIFEST_NAME)
    if doc is None:
        found.add(f"{out / manifest.MANIFEST_NAME}: missing or unreadable: the merge did not complete "
                  "(rerun it with `resume`)")
        doc = {}
    options = doc.get("options") if isinstance(doc.get("options"), dict) else {}
    recorded = MergeOptions.from_record(options)
    paths = ([adapter] if adapter is not None else []) + list(adapters)
    ckpt, loaded, original = _inputs(out, doc, recorded, base, paths, adapter_name, base_subfolder)
    if recorded.operation == "unmerge":
        plan = build_unmerge_plan(ckpt, loaded[0], recorded.weight if recorded.weight is not None else 1.0, original,
                                  PlanOptions(max_shard_size=recorded.max_shard_size))
    else:
        plan = plan_with(ckpt, loaded, recorded)
    identity = identify(ckpt, loaded, options)
    if doc:
        check_manifest(out, doc, identity, plan, found)
    check_files(out, doc, plan, found)
    if device is None:
        device = "cuda" if options.get("device") == "cuda" and resolve_device("auto").type == "cuda" else "cpu"
    opts = ExecOptions(resolve_device(device), workers or default_workers(), max_memory, check_finite=False)
    shas = {r.get("file"): digest.record_digest(r) for r in doc.get("shards") or [] if isinstance(r, dict)}
    if on_start is not None:
        on_start(2 * plan.total_bytes)
    counts = check_tensors(out, plan, opts, sample, shas, found, on_progress or (lambda n: None))
    measured = changes.measure_output(out, plan, ckpt, None if sample is None else lambda t: sample_blocks(t, sample))
    noops = [f"{out}: {c.warning()}" for c in measured if c.unchanged]
    for text in noops if against_base else ():
        found.add(text)
    return VerifyReport(
        out=str(out), problems=found.result(), tensors_checked=counts[0], tensors_recomputed=counts[1],
        rows_recomputed=counts[2], bytes_hashed=counts[3], seconds=time.monotonic() - started, sample=sample,
        changes=measured, warnings=() if against_base else tuple(noops),
    )


def _inputs(out: Path, doc: dict, recorded: MergeOptions, base: PathLike | None, paths: Sequence[PathLike],
            adapter_name: str | None, subfolder: str | None) -> tuple[Checkpoint, list[Adapter], Checkpoint | None]:
    """The base and adapters to check against: those given, else those the manifest records."""
    sources = doc.get("sources") if isinstance(doc.get("sources"), dict) else {}
    recorded_adapters = [a for a in sources.get("adapters") or [] if isinstance(a, str)]
    if not paths:
        if not recorded_adapters:
            raise StreamMergeError(
                f"{out}: no adapter given and no streammerge.json recording the inputs; pass the adapter(s) that "
                "were merged (and the base)"
            )
        paths = recorded_adapters
    elif recorded_adapters and len(paths) != len(recorded_adapters):
        raise StreamMergeError(
            f"{out}: {len(paths)} adapter(s) given but streammerge.json records {len(recorded_adapters)} "
            f"({', '.join(recorded_adapters)}); pass the same adapters in the same order, or none to use the "
            "recorded ones"
        )
    if adapter_name is not None and recorded.adapter_name not in (None, adapter_name):
        raise StreamMergeError(
            f"{out}: adapter name {adapter_name!r} given but streammerge.json records {recorded.adapter_name!r}; "
            "pass the recorded name or none"
        )
    name = adapter_name if adapter_name is not None else recorded.adapter_name
    loaded = [read_adapter(a, name, recorded.pattern_rules) for a in paths]
    if base is None and isinstance(sources.get("base"), str):
        base = sources["base"]
    subfolder = subfolder if subfolder is not None else recorded.base_subfolder
    ckpt = read_base(Path(base) if base is not None else find_base(loaded[0]), "base", subfolder)
    original = read_base(Path(recorded.original_base), "base") if recorded.original_base else None
    return ckpt, loaded, original
