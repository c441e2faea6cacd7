"""The kernel's memory model: working bytes of one row block of a task (the unit of ``--max-memory``). Pure."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from streammerge.formats.dtypes import DTYPE_SIZES
from streammerge.formats.refs import TensorRef
from streammerge.plan.geometry import chunk_rows

if TYPE_CHECKING:
    from streammerge.plan.steps import Step
    from streammerge.plan.types import TensorTask

#: the transposed copy the norm of an embedding or HF Conv1D reduces over (``kernel.dora_block``).
DORA_EXTRA_BYTES_PER_ELEMENT = 12


def _fp32_bytes(ref: TensorRef | None) -> int:
    return math.prod(ref.shape) * 4 if ref is not None else 0


def block_bytes(task: TensorTask, rows: int) -> int:
    """Working memory to merge ``rows`` rows of ``task`` (the budget's unit; see ``execute``).

    The block's output (out dtype) and its source rows (mapped pages, released after use), the
    fp32 scratch of one kernel chunk (ΔW, its sum with W, and a second term's delta: 3 × 4 bytes
    per element, with a short tail folded in: at most 2 × chunk rows), the terms' fp32 factors, and a tuner's
    declared scratch.
    """
    row = task.row_numel
    block = rows * row * (DTYPE_SIZES[task.dtype] + DTYPE_SIZES[task.source.dtype])
    # A whole-tensor task (``TensorTask.whole``) is one kernel chunk; DoRA adds its norm scratch.
    per_element = 12 + (DORA_EXTRA_BYTES_PER_ELEMENT if any(s.rounding == "dora" for s in task.steps) else 0)
    # A combination is computed on the whole block, unchunked (``kernel.merge_block``).
    combined = any(s.combination is not None for s in task.steps)
    per_element += max((combine_bytes_per_element(s) for s in task.steps), default=0)
    scratch_rows = rows if task.whole or combined else min(rows, 2 * chunk_rows(row))
    chunk = scratch_rows * row * per_element if task.steps else 0
    factors = sum(_fp32_bytes(ref) for step in task.steps for term in step.terms for ref in term.refs())
    # a tuner's own scratch for a whole-tensor update (rotation matrices, FFTs): ``tuners.base.Update.work_elements``
    tuned = sum(4 * term.update.work_elements for step in task.steps if step.rounding == "tuner"
                for term in step.terms)
    return block + chunk + factors + tuned + rows * row * quant_bytes_per_element(task)


#: Per element of a block whose source is quantized, over the whole block (not chunked): the fp32
#: product of decoding, and when re-encoding the fp32 quotient, the padded |w| of the amax, and the error
#: check (the block decoded again, its fp32 difference with the merged rows, the fp32 half steps: 4 × 4).
DECODE_BYTES_PER_ELEMENT = 4
ENCODE_BYTES_PER_ELEMENT = 24


def quant_bytes_per_element(task: TensorTask) -> int:
    """Extra working bytes per element to decode (and maybe re-encode) a quantized source block."""
    q = task.quant
    if q is None:
        return 0
    # the decoded rows and the merged rows, both in the compute dtype
    return DECODE_BYTES_PER_ELEMENT + 2 * DTYPE_SIZES[q.compute_dtype] + (ENCODE_BYTES_PER_ELEMENT if q.encode else 0)


#: Working bytes per element of a combined block, per adapter: its fp32 task vector in the stack,
#: the sign-agreement mask and the product that ``disjoint_merge`` sums (``combine``).
COMBINE_BYTES_PER_TASK = 9
#: ... and once per block: building one task vector (B@A, its scaled copy), magnitude pruning
#: (|ΔW|, the comparison mask, the 0/1 float mask), the elected sign, the sums and counts; DARE
#: hashes the element counters in int64 (see ``combine.dare_keep``).
COMBINE_BYTES_SHARED = {"ties": 24, "magnitude_prune": 24, "dare_linear": 24, "dare_ties": 24}


def combine_bytes_per_element(step: Step) -> int:
    """Extra working bytes per element that a step's combination needs beyond WORK_BYTES_PER_ELEMENT."""
    c = step.combination
    if c is None:
        return 0
    tasks = len({t.task for t in step.terms})
    return tasks * COMBINE_BYTES_PER_TASK + COMBINE_BYTES_SHARED[c.method]

