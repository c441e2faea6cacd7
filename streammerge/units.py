"""Cutting output shards into units of work, in file order (for ``scatter``).

A unit is either a merge block (rows ``[r0, r1)`` of one computed tensor, cut by ``budget.block_rows``)
or a copy run (consecutive untouched tensors whose bytes are contiguous in one base file, moved with
one ``copy_file_range`` per run and cut at ``COPY_UNIT`` bytes so that several workers share a big
run). Every unit is a whole number of digest pieces (``digest.task_pieces``: 64-row cuts), so the
thread that runs it can hash what it wrote.

Byte counts as printed and typed (``format_size``, ``parse_size``, ``ceil_size``: decimal units) live in
``streammerge.sizes`` (``plan`` and ``budget`` need them, and this module needs those) and are re-exported here.
"""

from __future__ import annotations

from dataclasses import dataclass

from streammerge import digest
from streammerge.budget import ExecOptions, block_rows, unit_cost
from streammerge.plan import ROW_ALIGN, ShardPlan, TensorTask, row_blocks
from streammerge.sizes import ceil_size, format_size, parse_size  # byte counts, kept importable from here

#: A copy run is cut into units of at most this many bytes (at piece boundaries), so workers share it.
COPY_UNIT = 256 << 20

__all__ = ["COPY_UNIT", "Unit", "ceil_size", "format_size", "parse_size", "pieces_in", "row_bytes",
           "shard_units", "src_offset"]

@dataclass(frozen=True, slots=True)
class Unit:
    """One piece of work on shard ``shard``: compute ``spans[0]`` (``task.is_raw_copy`` False) or copy
    ``spans`` (consecutive raw tasks, contiguous in ``src``), landing at byte ``offset`` of the file."""

    shard: int
    spans: tuple[tuple[TensorTask, int, int], ...]  # (task, r0, r1)
    offset: int
    nbytes: int
    piece0: int  # index of its first piece in the shard's piece list
    cost: int  # working memory while it runs (``plan.block_bytes``); 0 for copies

    @property
    def is_copy(self) -> bool:
        return self.spans[0][0].is_raw_copy


def row_bytes(task: TensorTask) -> int:
    return task.nbytes // task.rows if task.rows else 0


def pieces_in(task: TensorTask, r0: int, r1: int) -> tuple[int, int]:
    """Indices ``[j0, j1)`` of ``task``'s pieces (``digest.task_pieces``) inside rows ``[r0, r1)``."""
    n = len(digest.task_pieces(task))
    return min(r0 // ROW_ALIGN, n), (n if r1 >= task.rows else r1 // ROW_ALIGN)


def shard_units(index: int, shard: ShardPlan, opts: ExecOptions) -> list[Unit]:
    """``shard``'s units in file order."""
    units: list[Unit] = []
    offset, piece = len(shard.header), 1  # piece 0 is the header
    run: list[tuple[TensorTask, int, int]] = []
    run_start = run_piece = run_bytes = 0

    def flush() -> None:
        nonlocal run
        if run:
            units.append(Unit(index, tuple(run), run_start, run_bytes, run_piece, 0))
        run = []

    for task in shard.tasks:
        nrow = row_bytes(task)
        if task.is_raw_copy:
            step = max(ROW_ALIGN, COPY_UNIT // max(nrow, 1) // ROW_ALIGN * ROW_ALIGN)
            for r0, r1 in row_blocks(task.rows, step) if task.nbytes else ():
                nbytes = (r1 - r0) * nrow
                prev = run[-1] if run else None
                contiguous = prev is not None and prev[0].source.path == task.source.path and (
                    src_offset(prev[0], prev[2]) == src_offset(task, r0))
                if not contiguous or run_bytes + nbytes > COPY_UNIT:
                    flush()
                    run_start, run_piece, run_bytes = offset + r0 * nrow, piece + pieces_in(task, r0, r1)[0], 0
                run.append((task, r0, r1))
                run_bytes += nbytes
        else:
            flush()
            for r0, r1 in row_blocks(task.rows, block_rows(task, opts)):
                units.append(Unit(index, ((task, r0, r1),), offset + r0 * nrow, (r1 - r0) * nrow,
                                  piece + pieces_in(task, r0, r1)[0], unit_cost(task, r0, r1, opts)))
        offset += task.nbytes
        piece += len(digest.task_pieces(task))
    flush()
    return units


def src_offset(task: TensorTask, row: int) -> int:
    """Byte offset of row ``row`` of ``task``'s source in its file."""
    return task.source.offset + row * row_bytes(task)
