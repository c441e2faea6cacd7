"""Proof that a merge did something: per targeted tensor, the relative change ‖ΔW‖/‖W‖ actually written.

A merge that silently equals its base (a zero ``lora_B``, a scale of 0, an adapter for other
modules) is invisible in the output's shape and size. So every tensor an adapter targets gets a
:class:`TensorChange`: ``‖M − W‖₂ / ‖W‖₂`` (Frobenius norms over all elements, M the written
tensor, W the base tensor of the same name) and whether M equals W bit for bit.

Measured two ways, with the same arithmetic (:meth:`ChangeTally.add` on row blocks):

* during a merge, from each merged chunk while it is in cache (the kernel feeds a ``BlockTally`` with
  the base rows it read and the rows it stored, into the chunk's spent fp32 buffer): no extra read;
* by ``verify``, from the output file against the base (:func:`measure_output`), which also covers saved
  modules (``modules_to_save`` heads copied from the adapter) and shards a ``--resume`` kept.

Squared norms are summed per chunk in fp32 (BLAS dot) and across chunks and blocks in float64 in row
order, so the figures do not depend on the worker count (the chunking moves their last digits: they are a
report, not a check of bytes).
"""

from __future__ import annotations

import math
import statistics
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from streammerge.checkpoint import Checkpoint
from streammerge.formats.refs import TensorRef
from streammerge.plan.geometry import ROW_ALIGN, row_blocks
from streammerge.plan.types import Plan, TensorTask

if TYPE_CHECKING:  # torch loads when blocks are measured, not to import this (``api`` does, before planning)
    import torch

_CHUNK_ELEMS = 1 << 20  # fp32 scratch per chunk: 4 MiB for each of M and W
_local = threading.local()  # each thread's fp32 scratch for ``BlockTally.widen`` (4 MiB, kept for the thread's life)


@dataclass(frozen=True, slots=True)
class TensorChange:
    """What one targeted output tensor became, relative to the base tensor of the same name."""

    name: str
    modules: tuple[str, ...]  # adapter modules whose terms land here ("" for a saved module)
    kind: str  # merge | replace
    base_norm: float  # ‖W‖₂
    delta_norm: float  # ‖M − W‖₂
    unchanged: bool  # M == W bit for bit

    @property
    def relative(self) -> float:
        """‖M − W‖ / ‖W‖ (inf for a change to an all-zero W; 0 for no change)."""
        if self.delta_norm == 0:
            return 0.0
        return self.delta_norm / self.base_norm if self.base_norm else math.inf

    def line(self) -> str:
        where = ", ".join(self.modules) or "saved module"
        state = "UNCHANGED (bit-identical to the base)" if self.unchanged else f"{self.relative:.3e}"
        return f"{self.name} ({where}): relative change {state}"

    def warning(self) -> str:
        what = f"adapter module {', '.join(self.modules)}" if self.modules else "the adapter's saved module"
        hint = "a zero lora_B or a zero scale?" if self.modules else "saved without training?"
        return f"tensor {self.name!r} ({what}) equals the base bit for bit: the merge changed nothing there ({hint})"


def targeted(task: TensorTask) -> bool:
    """Tasks an adapter targets: merged (LoRA and the like) or replaced (saved modules)."""
    return task.kind in ("merge", "replace")


def modules_of(task: TensorTask) -> tuple[str, ...]:
    return tuple(dict.fromkeys(t.origin for s in task.steps for t in s.terms if t.origin))


class ChangeTally:
    """Squared norms per task, fed row block by row block (thread-safe)."""

    def __init__(self) -> None:
        self._parts: dict[str, dict[int, tuple[float, float, bool]]] = {}
        self._tasks: dict[str, TensorTask] = {}
        self._lock = threading.Lock()

    def add(self, task: TensorTask, r0: int, base: torch.Tensor, written: torch.Tensor) -> None:
        """Rows ``r0…`` of ``task``: ``base`` the base rows (any float dtype), ``written`` the output rows."""
        block = BlockTally()
        w_flat, m_flat = base.reshape(-1), written.reshape(-1)
        for i in range(0, w_flat.numel(), _CHUNK_ELEMS):
            block.chunk(w_flat[i : i + _CHUNK_ELEMS], m_flat[i : i + _CHUNK_ELEMS])
        self.add_block(task, r0, block)

    def add_block(self, task: TensorTask, r0: int, block: BlockTally) -> None:
        """Rows ``r0…`` of ``task``, tallied chunk by chunk by ``block``."""
        with self._lock:
            self._tasks.setdefault(task.name, task)
            self._parts.setdefault(task.name, {})[r0] = (block.wsq, block.dsq, block.same)

    def result(self) -> tuple[TensorChange, ...]:
        """One :class:`TensorChange` per task seen, in the order first seen (sorted by name)."""
        out = []
        for name in sorted(self._parts):
            task, parts = self._tasks[name], self._parts[name]
            blocks = [parts[r] for r in sorted(parts)]
            out.append(TensorChange(
                name, modules_of(task), task.kind, math.sqrt(math.fsum(b[0] for b in blocks)),
                math.sqrt(math.fsum(b[1] for b in blocks)), all(b[2] for b in blocks),
            ))
        return tuple(out)


class BlockTally:
    """One block's squared norms, fed chunk by chunk: by ``ChangeTally.add``, or by the kernel while each
    merged chunk is still in cache (``kernel.merge_checked``'s ``tally``: no second pass over memory)."""

    __slots__ = ("_base", "dsq", "same", "wsq")

    def __init__(self) -> None:
        self.wsq = self.dsq = 0.0
        self.same = True
        self._base: tuple[torch.Tensor, torch.Tensor] | None = None

    def widen(self, base: torch.Tensor) -> torch.Tensor:
        """``base`` (a chunk of W, rows) in fp32, in this thread's scratch, with ‖W‖² added; the kernel adds ΔW
        to it (read only) before ``compare`` reuses the buffer."""
        import torch

        n = base.numel()
        held = getattr(_local, "scratch", None)
        if held is None or held.numel() < n or held.device != base.device:
            _local.scratch = held = torch.empty(max(n, _CHUNK_ELEMS), dtype=torch.float32, device=base.device)
        d = held[:n]
        d.copy_(base.reshape(-1))  # exact: every float W widens to fp32 without rounding
        self.wsq += float(torch.dot(d, d))
        self._base = (base, d)
        return d.view(base.shape)

    def compare(self, written: torch.Tensor) -> bool:
        """Add ‖M − W‖² of the chunk ``widen`` saw (``written``: M, those rows); returns whether that sum is
        finite (it is not where M holds a NaN/inf)."""
        import torch

        assert self._base is not None, "compare without widen"
        base, d = self._base
        self._base = None
        torch.sub(written.reshape(-1), d, out=d)  # M − W in fp32 (M promoted on the fly)
        dsq = float(torch.dot(d, d))
        self.dsq += dsq
        if self.same:
            self.same = dsq == 0 and base.dtype == written.dtype and torch.equal(_bits(base), _bits(written))
        return math.isfinite(dsq)

    def chunk(self, base: torch.Tensor, written: torch.Tensor) -> None:
        """Add (‖W‖², ‖M − W‖²) of one chunk (fp32 BLAS dots) and whether M == W bit for bit."""
        self.widen(base)
        self.compare(written)


def _bits(t: torch.Tensor) -> torch.Tensor:
    import torch

    return t.contiguous().reshape(-1).view(torch.uint8)


def measure_output(out: Path, plan: Plan, ckpt: Checkpoint,
                   blocks: Callable[[TensorTask], Sequence[tuple[int, int]]] | None = None) -> tuple[TensorChange, ...]:
    """The change of every targeted task of ``plan`` as written in ``out``, against the base ``ckpt``.

    ``blocks(task)`` limits the rows read (``verify --sample``: the sampled blocks; the figures are then
    those of the sampled rows); default every row. Shards of another size than the plan's are skipped
    (``verify`` reports them); tasks with no base tensor of the same name and shape (added tensors) are left out.
    """
    placed: dict[str, TensorRef] = {}
    for shard in plan.shards:
        path = out / shard.filename
        if not path.is_file() or path.stat().st_size != len(shard.header) + shard.data_size:
            continue
        offset = len(shard.header)
        for t in shard.tasks:
            placed[t.name] = TensorRef(str(path), t.name, t.dtype, t.shape, offset)
            offset += t.nbytes
    base = {name: TensorRef(ckpt.shards[i].path, name, info.dtype, info.shape, ckpt.shards[i].data_start + info.begin)
            for name, (i, info) in ckpt.locate().items()}
    from streammerge.formats.reader import TensorReader

    tally = ChangeTally()
    with TensorReader() as reader:
        for task in plan.tasks():
            ref, src = placed.get(task.name), base.get(task.name)
            if not targeted(task) or ref is None or src is None or src.shape != task.shape:
                continue
            if task.quant is not None:  # stored codes are not values: measured during the merge only (decoded)
                continue
            step = max(ROW_ALIGN, _CHUNK_ELEMS // max(task.row_numel, 1) // ROW_ALIGN * ROW_ALIGN)
            for r0, r1 in blocks(task) if blocks is not None else row_blocks(task.rows, step):
                tally.add(task, r0, reader.rows(src, r0, r1), reader.rows(ref, r0, r1))
                reader.release(src, r0, r1)
                reader.release(ref, r0, r1)
    return tally.result()


def summary_lines(changes: Sequence[TensorChange], *, every: bool = False) -> list[str]:
    """A one-line digest (count, min/median/max relative change, how many unchanged), then per-tensor
    lines: every tensor when ``every``, else only the unchanged ones."""
    if not changes:
        return ["changes: no targeted tensor measured"]
    rel = [c.relative for c in changes if not c.unchanged]
    stats = (f"relative change min {min(rel):.2e}, median {statistics.median(rel):.2e}, max {max(rel):.2e}"
             if rel else "no tensor changed")
    flagged = sum(c.unchanged for c in changes)
    lines = [f"changes: {len(changes)} targeted tensor(s), {stats}; {flagged} unchanged"]
    lines += [f"  {c.line()}" for c in changes if every or c.unchanged]
    return lines


def unchanged(changes: Iterable[TensorChange]) -> list[TensorChange]:
    return [c for c in changes if c.unchanged]
