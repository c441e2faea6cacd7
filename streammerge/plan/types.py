"""The planner's values: frozen, picklable, comparable. What to do, never how.

A :class:`Plan` is a tuple of :class:`ShardPlan` (one output file each, header bytes precomputed), each a
tuple of :class:`TensorTask` (one output tensor: a source, then :class:`Step` s of :class:`LoraTerm` s; the
step values are ``streammerge.plan.steps``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from streammerge.checkpoint import INDEX_NAME
from streammerge.formats.base import CODES, QuantizedWeight
from streammerge.formats.dtypes import DTYPE_SIZES
from streammerge.formats.refs import TensorRef
from streammerge.plan.geometry import ROW_ALIGN, row_blocks
from streammerge.plan.memory import block_bytes
from streammerge.plan.steps import (
    COMBINATIONS,
    WHOLE_TENSOR_COMBINATIONS,
    Combination,
    ExpertSlice,
    LoraTerm,
    Step,
    TunerTerm,
    Update,
)
from streammerge.sizes import format_size

if TYPE_CHECKING:
    from streammerge.plan.quantized import QuantSummary

#: The step values (``streammerge.plan.steps``) are re-exported: a plan's modules import them from here too.
__all__ = [
    "COMBINATIONS", "WHOLE_TENSOR_COMBINATIONS", "Combination", "CombineOptions", "ExpertSlice", "LoraTerm", "Plan",
    "PlanOptions", "QuantSource", "ShardPlan", "Step", "TensorTask", "TunerTerm", "Update",
]


@dataclass(frozen=True, slots=True)
class QuantSource:
    """The task's source is a quantized weight (``formats.base``): its row blocks are decoded to
    ``compute_dtype`` (the model's dtype: what a dequantizing loader gives), merged there, and written
    either as they are (``encode`` False, ``--dequantize``) or encoded back in the base's scheme.

    ``role`` is the stored part the task writes: the codes (``CODES``; ``TensorTask.source`` is the
    codes' ref and rows are the weight's rows) or a companion such as a fresh scale (the task walks the
    weight's merged row blocks and writes the whole part in one piece).
    """

    weight: QuantizedWeight
    parts: tuple[tuple[str, TensorRef], ...]  # role -> stored ref, CODES first
    compute_dtype: str
    encode: bool
    role: str = CODES

    def ref(self, role: str) -> TensorRef:
        return dict(self.parts)[role]


@dataclass(frozen=True, slots=True)
class TensorTask:
    """How to produce one output tensor: start from ``source`` (cast to ``dtype``), apply ``steps``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    source: TensorRef
    steps: tuple[Step, ...] = ()
    kind: str = "copy"  # copy | merge | replace | add | dequantize | rescale  (for reporting)
    quant: QuantSource | None = None  # set when the source is quantized and must be decoded

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]

    @property
    def is_raw_copy(self) -> bool:
        """True when the output bytes are the source bytes: no arithmetic and no cast."""
        return (not self.steps and self.quant is None and self.source.dtype == self.dtype
                and self.source.shape == self.shape)

    @property
    def row_align(self) -> int:
        """Blocks start at multiples of this: ROW_ALIGN, and whole scale cells of a quantized source."""
        return math.lcm(ROW_ALIGN, self.quant.weight.scheme.row_align) if self.quant is not None else ROW_ALIGN

    def weight_view(self) -> TensorTask:
        """For a companion task (a fresh scale), the weight task whose merged rows it walks; else itself."""
        q = self.quant
        if q is None or q.role == CODES:
            return self
        codes = q.ref(CODES)
        return TensorTask(q.weight.name, codes.dtype, codes.shape, codes, self.steps, "merge",
                          QuantSource(q.weight, q.parts, q.compute_dtype, q.encode, CODES))

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_numel(self) -> int:
        return math.prod(self.shape[1:]) if self.shape else 1

    @property
    def whole(self) -> bool:
        """True when the task must not be cut into row blocks (nor the kernel into chunks):

        * a convolution delta, or a DoRA norm taken across rows (embedding columns, HF Conv1D
          outputs): the step needs every row at once;
        * a transposed layout (HF Conv1D, embedding, transposed experts) whose rows are narrower than
          ROW_ALIGN: blocks slice A's columns, and MKL's fp32 sums then differ from the whole product for
          widths up to 11 (measured over 1944 shapes; the linear layout never differed). Such tensors are small;
        * a combination that ranks elements over the whole tensor (ties, magnitude_prune);
        * a tuner update whose rows are not independent (``Update.row_blocks``: rotations, FFTs, Kronecker);
        * a quantized companion (a fresh scale): one piece, computed by walking the weight's row blocks.
        """
        if self.quant is not None and self.quant.role != CODES:
            return True
        return any(
            (step.rounding == "tuner" and not term.row_blocks)
            or term.layout == "conv"
            or (step.rounding == "dora" and term.layout != "linear")
            or (term.layout in ("linear_t", "embedding", "expert_t") and self.row_numel < ROW_ALIGN)
            for step in self.steps
            for term in step.terms
        ) or any(s.combination is not None and s.combination.whole_tensor for s in self.steps)

    @property
    def kernel_chunks(self) -> bool:
        """May the CPU kernel walk a block in cache-sized chunks? Not a whole task, nor a combination
        step (its operators work on the block they are given)."""
        return not self.whole and all(s.combination is None for s in self.steps)

    @property
    def min_rows(self) -> int:
        """The fewest rows one block of this task can have."""
        return self.rows if self.whole else min(
            self.rows, max(r1 - r0 for r0, r1 in row_blocks(self.rows, self.row_align))
        )


@dataclass(frozen=True, slots=True)
class ShardPlan:
    """One output file: its name, its exact header bytes, and its tensors in data order."""

    filename: str
    header: bytes
    tasks: tuple[TensorTask, ...]

    @property
    def data_size(self) -> int:
        return sum(t.nbytes for t in self.tasks)


@dataclass(frozen=True, slots=True)
class PlanOptions:
    """Options that change the plan (not how it is executed)."""

    max_shard_size: int | None = None  # bytes; None keeps the base's shard layout
    dequantize: bool = False  # a quantized base: write every quantized weight in the model dtype


@dataclass(frozen=True, slots=True)
class Plan:
    shards: tuple[ShardPlan, ...]
    write_index: bool
    index_metadata: tuple[tuple[str, object], ...]
    config_updates: tuple[tuple[str, object], ...]
    warnings: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()
    config_removals: tuple[str, ...] = ()  # config.json keys the output drops (quantization_config, --dequantize)
    quantization: QuantSummary | None = None
    index_name: str = INDEX_NAME  # the base's kind of index (``Checkpoint.index_name``)

    def tasks(self) -> tuple[TensorTask, ...]:
        return tuple(t for s in self.shards for t in s.tasks)

    def counts(self) -> dict[str, int]:
        """Tasks by kind (merge, replace, add, copy; and dequantize, rescale for a quantized base), and drops."""
        kinds = ("merge", "replace", "add", "copy") + (("dequantize", "rescale") if self.quantization else ())
        out = dict.fromkeys(kinds, 0)
        for t in self.tasks():
            out[t.kind] += 1
        out["drop"] = len(self.dropped)
        return out

    @property
    def total_bytes(self) -> int:
        return sum(s.data_size for s in self.shards)

    def weight_map(self) -> dict[str, str]:
        return {t.name: s.filename for s in self.shards for t in s.tasks}

    def index_json(self) -> str:
        """``model.safetensors.index.json`` text: base metadata kept, ``total_size`` recomputed in bytes."""
        meta = dict(self.index_metadata)
        meta["total_size"] = self.total_bytes
        doc = {"metadata": meta, "weight_map": dict(sorted(self.weight_map().items()))}
        return json.dumps(doc, indent=2) + "\n"

    def min_memory(self) -> int:
        """The smallest working-memory budget that can execute this plan (one minimal block)."""
        return max((block_bytes(t.weight_view(), t.weight_view().min_rows) for t in self.tasks() if not t.is_raw_copy),
                   default=0)

    def summary(self) -> str:
        c = self.counts()
        quant = (f", {c['dequantize']} to dequantize, {c['rescale']} fresh scales"
                 if self.quantization is not None else "")
        lines = [
            f"plan: {c['merge']} tensors to merge, {c['replace']} to replace, {c['add']} to add, "
            f"{c['copy']} to copy, {c['drop']} to drop{quant}",
            f"output: {len(self.shards)} shard(s), {format_size(self.total_bytes)}"
            + (f", index {self.index_name}" if self.write_index else ""),
            f"minimum working memory: {format_size(self.min_memory())}",
        ]
        if self.quantization is not None:
            lines.append(self.quantization.line(self.tasks()))
        lines += [f"config: {k} = {json.dumps(v)}" for k, v in self.config_updates]
        lines += [f"config: {k} removed" for k in self.config_removals]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class CombineOptions:
    """How several adapters become one merge (``--weights/--combination/--density/--seed/--heads-from``)."""

    weights: tuple[float, ...]  # one per adapter, in adapter order
    method: str = "cat"
    density: float = 1.0  # fraction of each task vector kept by the pruning operators
    seed: int = 0  # DARE's mask seed
    heads_from: int | None = None  # index of the adapter whose full tensors win where several carry one
    majority_sign: str = "total"  # TIES sign election (PEFT's default)

