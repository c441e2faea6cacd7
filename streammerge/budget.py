"""How execution cuts work within the memory budget: the options of an execution, block heights, and
the up-front budget check. No torch here, so a plan can be checked before torch is imported.

Memory bound: a merge block's working set is ``plan.block_bytes`` (its source rows, its output,
one kernel chunk of fp32 scratch and the fp32 factors). Block heights are multiples of
``plan.ROW_ALIGN`` rows chosen so that a block is at most ``max_memory / (2 · workers)``: each
worker holds at most the block it computes plus the other of its two output buffers, whose block
the io thread is writing (``scatter``; that block keeps its budget until written), so workers never
need more than ``max_memory``. Raw copies take no budget: the copier threads move them through one
``sources.COPY_BUFFER`` (8 MiB) each, outside ``max_memory`` like the interpreter and torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from streammerge.errors import BudgetError
from streammerge.plan import ROW_ALIGN, Plan, TensorTask, block_bytes
from streammerge.sizes import ceil_size, format_size

if TYPE_CHECKING:
    from streammerge.changes import ChangeTally
    from streammerge.requant import QuantRun

#: Upper bound on one block's working set: big enough to amortise per-block overhead, small enough
#: that reading, computing and writing overlap.
MAX_BLOCK_BYTES = 64 << 20


@dataclass(frozen=True, slots=True)
class ExecOptions:
    """How to execute a plan. ``device`` is a torch device or its name (``cpu``, ``cuda:0``);
    ``threads``: torch intra-op threads, set when torch is first used (None leaves torch's default)."""

    device: object
    workers: int
    max_memory: int
    check_finite: bool = True
    threads: int | None = None
    changes: ChangeTally | None = None  # fed each merged block with its base rows (``streammerge.changes``)
    quant_run: QuantRun | None = None  # a quantized base's per-run state (``pieces`` makes one when None)
    direct_io: bool = True  # write shards with direct I/O where the filesystem allows (``diskio``)


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def block_rows(task: TensorTask, opts: ExecOptions) -> int:
    """Rows per block for ``task``: a multiple of ``task.row_align`` (ROW_ALIGN, or whole scale cells of a
    quantized source; or the whole tensor) within the budget."""
    align = task.row_align
    if task.rows <= align or task.whole:
        return task.rows
    target = min(MAX_BLOCK_BYTES, opts.max_memory // (2 * opts.workers))
    per_row = block_bytes(task, 1) - block_bytes(task, 0)
    rows = max(align, (target - block_bytes(task, 0)) // max(per_row, 1) // align * align)
    return min(rows, task.rows)


def unit_cost(task: TensorTask, r0: int, r1: int, opts: ExecOptions) -> int:
    """Working memory of one block: its own, or for a fresh-scale task one block of the weight it walks."""
    view = task.weight_view()
    if view is task:
        return block_bytes(task, r1 - r0)
    return block_bytes(view, block_rows(view, opts))


def check_budget(plan: Plan, max_memory: int) -> None:
    need = plan.min_memory()
    if need > max_memory:
        raise BudgetError(
            f"`max_memory` {format_size(max_memory)} is below this plan's minimum working set of "
            f"{format_size(need)} (its largest indivisible block: {ROW_ALIGN} rows of the widest merged "
            "tensor, or a whole tensor where the merge needs every row at once); "
            f"pass `max_memory` {ceil_size(need)} or more"
        )
