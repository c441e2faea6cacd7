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

Bytes are compared, not values, so NaN payloads and signed zeros count too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import mmap
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from streammerge import changes, digest, manifest
from streammerge.adapter import Adapter, read_adapter
from streammerge.budget import ExecOptions, default_workers
from streammerge.checkpoint import INDEX_NAME, Checkpoint
from streammerge.errors import OutputError, StreamMergeError
from streammerge.locate import find_base, read_base
from streammerge.options import MergeOptions
from streammerge.plan import Plan, PlanOptions, ShardPlan, TensorTask, row_blocks
from streammerge.plan.unmerge import build_unmerge_plan
from streammerge.prepare import DEFAULT_MAX_MEMORY, plan_with, resolve_device
from streammerge.sizes import format_size

if TYPE_CHECKING:  # torch and numpy load when a tensor is compared, not at ``import streammerge``
    import torch

    from streammerge.formats.reader import TensorReader
from streammerge.writer import is_temporary

LOG = logging.getLogger(__name__)

PathLike = str | Path
_CHUNK = 64 << 20
_MAX_PROBLEMS = 50  # a report lists at most this many problems (and counts the rest)


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


class _Findings:
    """Problems found so far (bounded list, full count)."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self.count = 0

    def add(self, text: str) -> None:
        self.count += 1
        if len(self.items) < _MAX_PROBLEMS:
            self.items.append(text)

    def result(self) -> tuple[str, ...]:
        more = self.count - len(self.items)
        return (*self.items, f"... and {more} more") if more else tuple(self.items)


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
    found = _Findings()
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
    identity = manifest.identify(ckpt, loaded, options)
    if doc:
        _check_manifest(out, doc, identity, plan, found)
    _check_files(out, doc, plan, found)
    if device is None:
        device = "cuda" if options.get("device") == "cuda" and resolve_device("auto").type == "cuda" else "cpu"
    opts = ExecOptions(resolve_device(device), workers or default_workers(), max_memory, check_finite=False)
    shas = {r.get("file"): digest.record_digest(r) for r in doc.get("shards") or [] if isinstance(r, dict)}
    if on_start is not None:
        on_start(2 * plan.total_bytes)
    counts = _check_tensors(out, plan, opts, sample, shas, found, on_progress or (lambda n: None))
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


def _check_manifest(out: Path, doc: dict, identity: manifest.Identity, plan: Plan, found: _Findings) -> None:
    where = out / manifest.MANIFEST_NAME
    if doc.get("format") != manifest.FORMAT:
        found.add(f"{where}: format {doc.get('format')!r} is not {manifest.FORMAT!r}")
    inputs = doc.get("inputs")
    if inputs != json.loads(json.dumps(identity.inputs)):
        found.add(f"{where}: records other inputs than the base and adapter given ({_input_diff(inputs, identity)}); "
                  "was this directory merged from them?")
    recorded = {r.get("file"): r for r in doc.get("shards") or [] if isinstance(r, dict)}
    if sorted(recorded) != sorted(s.filename for s in plan.shards):
        found.add(f"{where}: lists shards {sorted(map(str, recorded))}, the plan has "
                  f"{sorted(s.filename for s in plan.shards)}")
    same_tool = (doc.get("tool") or {}).get("version") == identity.tool
    for shard in plan.shards:
        rec = recorded.get(shard.filename)
        if rec is not None and same_tool and rec.get("identity") != identity.shard(shard):
            found.add(f"{where}: shard {shard.filename} was recorded for another plan (identity differs)")


def _input_diff(inputs: object, identity: manifest.Identity) -> str:
    if not isinstance(inputs, dict):
        return "no inputs recorded"
    want = json.loads(json.dumps(identity.inputs))
    if inputs.get("adapters") != want["adapters"]:
        return "the adapter files differ"
    return "the base files differ"


def _check_files(out: Path, doc: dict, plan: Plan, found: _Findings) -> None:
    """Stray files, listed side files' checksums, and the index text."""
    expected = {s.filename for s in plan.shards} | {manifest.MANIFEST_NAME}
    for rec in doc.get("files") or []:
        name = rec.get("file") if isinstance(rec, dict) else None
        if not isinstance(name, str) or "/" in name or name.startswith("."):
            found.add(f"{out / manifest.MANIFEST_NAME}: bad file entry {rec!r}")
            continue
        expected.add(name)
        path = out / name
        if not path.is_file():
            found.add(f"{path}: listed in the manifest but missing")
        elif (named := digest.record_digest(rec)) is None:
            found.add(f"{out / manifest.MANIFEST_NAME}: file entry {name!r} has no digest")
        elif digest.stream_digest(path, named[0]) != named[1]:
            found.add(f"{path}: content differs from the manifest's {named[0]} (modified after the merge?)")
    for name in sorted(os.listdir(out)):
        if name == manifest.PROGRESS_NAME or is_temporary(name):
            found.add(f"{out / name}: left by an unfinished merge; rerun the merge with `resume`")
        elif name not in expected and (name.endswith(".safetensors") or name in (INDEX_NAME, plan.index_name)):
            found.add(f"{out / name}: not part of this merge's output")
    index = out / plan.index_name
    if plan.write_index:
        if not index.is_file():
            found.add(f"{index}: missing")
        elif index.read_text(encoding="utf-8", errors="replace") != plan.index_json():
            found.add(f"{index}: differs from the index of this merge (weight_map or total_size)")


def _check_tensors(out: Path, plan: Plan, opts: ExecOptions, sample: int | None, shas: dict,
                   found: _Findings, progress: Callable[[int], None]) -> tuple[int, int, int, int]:
    checked = recomputed = rows = hashed = 0
    from streammerge import execute
    from streammerge.formats.reader import TensorReader

    with TensorReader() as reader, ExitStack() as stack:
        for shard in plan.shards:
            path = out / shard.filename
            mm = _open_shard(path, shard, found, stack)
            if mm is None:
                progress(2 * shard.data_size)
                continue
            hashed += len(mm)
            if shas.get(shard.filename) is not None:
                _check_digest(path, mm, shard, shas[shard.filename], found, progress)
            else:
                progress(shard.data_size)
            if mm[: len(shard.header)] != shard.header:
                found.add(f"{path}: header differs from the plan's header")
            base = len(shard.header)
            offsets = {}
            for task in shard.tasks:
                offsets[task.name] = base
                base += task.nbytes
            for task in shard.tasks:
                if task.is_raw_copy and task.nbytes:
                    _compare_copy(path, mm, offsets[task.name], task, reader, found)
                    progress(task.nbytes)
            merged = [t for t in shard.tasks if not t.is_raw_copy and t.nbytes]
            with contextlib.closing(_recomputed(merged, reader, opts, sample)) as blocks:  # drained before reader
                for task, r0, r1, data in blocks:
                    row_bytes = task.nbytes // task.rows
                    start = offsets[task.name] + r0 * row_bytes
                    _compare(path, task, r0, r1, mm[start : start + (r1 - r0) * row_bytes],
                             execute.as_bytes(data), "the recomputation", found)
                    rows += r1 - r0
            progress(sum(t.nbytes for t in merged))
            checked += len(shard.tasks)
            recomputed += len(merged)
    return checked, recomputed, rows, hashed


def _open_shard(path: Path, shard: ShardPlan, found: _Findings, stack: ExitStack) -> mmap.mmap | None:
    size = len(shard.header) + shard.data_size
    try:
        actual = path.stat().st_size
    except FileNotFoundError:
        found.add(f"{path}: missing")
        return None
    if actual != size:
        found.add(f"{path}: {actual} bytes, the plan needs {size}; the shard is truncated or not from this merge")
        return None
    if size == 0:
        return None
    with path.open("rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    stack.callback(_close, mm)
    return mm


def _close(mm: mmap.mmap) -> None:
    """Close a shard map; a view still held by an interrupted frame (BufferError) leaves it to the GC."""
    with contextlib.suppress(BufferError):
        mm.close()


def _check_digest(path: Path, mm: mmap.mmap, shard: ShardPlan, recorded: tuple[str, str], found: _Findings,
                  progress: Callable[[int], None]) -> None:
    key, value = recorded
    with memoryview(mm) as view:  # released however this ends (an interrupt), so the map can be closed
        if key == digest.SHARD_KEYS["xxh3"]:
            digests = []
            for a, b in digest.shard_pieces(shard):
                with view[a:b] as piece:
                    digests.append(digest.piece_digest(piece))
                progress(b - a)
            got = digest.combine(digests)
        else:
            h = digest.stream_hasher(key)
            for i in range(0, len(mm), _CHUNK):
                with view[i : i + _CHUNK] as piece:
                    h.update(piece)
                progress(min(_CHUNK, len(mm) - i))
            got = h.hexdigest()
    if got != value:
        found.add(f"{path}: {key} differs from the manifest (modified after the merge, or a disk error)")


def _compare_copy(path: Path, mm: mmap.mmap, start: int, task: TensorTask, reader: TensorReader,
                  found: _Findings) -> None:
    from streammerge import execute

    src = reader.tensor(task.source)
    src_bytes = execute.as_bytes(src)
    step = max(1, _CHUNK // max(task.nbytes // task.rows, 1))
    row_bytes = task.nbytes // task.rows
    for r0 in range(0, task.rows, step):
        r1 = min(task.rows, r0 + step)
        a, b = r0 * row_bytes, r1 * row_bytes
        if not _compare(path, task, r0, r1, mm[start + a : start + b], src_bytes[a:b],
                        f"its source in {task.source.path}", found):
            break
    reader.release(task.source, 0, task.rows)


def _compare(path: Path, task: TensorTask, r0: int, r1: int, got: bytes, want: memoryview, against: str,
             found: _Findings) -> bool:
    if got == want:
        return True
    import numpy as np

    diff = np.frombuffer(got, dtype=np.uint8) != np.frombuffer(want, dtype=np.uint8)
    first = int(np.argmax(diff))
    found.add(f"{path}: tensor {task.name!r} rows {r0}..{r1}: {int(diff.sum())} byte(s) differ from {against} "
              f"(first at byte {first} of those rows)")
    return False


def _recomputed(tasks: Sequence[TensorTask], reader: TensorReader, opts: ExecOptions,
                sample: int | None) -> Iterator[tuple[TensorTask, int, int, torch.Tensor]]:
    from streammerge import execute

    """Merged rows of ``tasks``: every piece (the merge's own path), or sampled 64-row blocks."""
    if sample is None:
        with contextlib.closing(execute.pieces(tasks, reader, opts)) as stream:
            for piece in stream:
                assert piece.data is not None, "only computed tasks are recomputed"
                yield piece.task, piece.r0, piece.r1, piece.data
        return
    for task in tasks:
        for r0, r1 in sample_blocks(task, sample):
            yield task, r0, r1, execute.compute_rows(task, r0, r1, reader, opts)


def sample_blocks(task: TensorTask, sample: int) -> list[tuple[int, int]]:
    """At least ``sample`` rows of ``task`` as whole ``task.row_align`` blocks, chosen by a seed from its name.

    A task the merge computes in one piece (``TensorTask.whole``) is recomputed whole.
    """
    if task.whole:
        return [(0, task.rows)]
    blocks = list(row_blocks(task.rows, task.row_align))
    want = min(len(blocks), math.ceil(sample / task.row_align))
    rng = random.Random(task.name)
    return sorted(rng.sample(blocks, want))
