"""The planner: headers and configs in, a frozen :class:`Plan` out. Pure: no torch, no file I/O.

Values (``types``, and a task's steps in ``steps``), row geometry (``geometry``) and the memory model
(``memory``) are re-exported here. The entry points that read adapters live in ``assemble``
(:func:`~streammerge.plan.assemble.build_plan`), ``combined`` (weighted multi-adapter merges) and ``unmerge``;
planning state is in ``draft``, config/key agreement in ``targeting``, full tensors and heads in ``heads``,
output files in ``shards``. Per-tuner planning is :mod:`streammerge.tuners`.
"""

from streammerge.formats.refs import TensorRef
from streammerge.plan.geometry import CHUNK_ELEMENTS, ROW_ALIGN, chunk_rows, row_blocks
from streammerge.plan.memory import block_bytes, combine_bytes_per_element
from streammerge.plan.steps import (
    COMBINATIONS,
    WHOLE_TENSOR_COMBINATIONS,
    Combination,
    ExpertSlice,
    LoraTerm,
    Step,
)
from streammerge.plan.types import CombineOptions, Plan, PlanOptions, ShardPlan, TensorTask

__all__ = [
    "CHUNK_ELEMENTS",
    "COMBINATIONS",
    "ROW_ALIGN",
    "WHOLE_TENSOR_COMBINATIONS",
    "Combination",
    "CombineOptions",
    "ExpertSlice",
    "LoraTerm",
    "Plan",
    "PlanOptions",
    "ShardPlan",
    "Step",
    "TensorRef",
    "TensorTask",
    "block_bytes",
    "chunk_rows",
    "combine_bytes_per_element",
    "row_blocks",
]
