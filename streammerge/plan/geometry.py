"""Row geometry of a tensor task: how rows are cut into blocks and chunks. Pure.

MKL's fp32 GEMM sums an element the same way for the whole matrix and for row blocks only when the
blocks are cut at multiples of ROW_ALIGN with no short tail (measured; tests/test_kernel.py), so
every block and kernel chunk in streammerge is cut here.
"""

from __future__ import annotations

#: Rows per kernel block are a multiple of this. MKL's fp32 GEMM gave different sums for a
#: 2730-row block of a 70B q_proj than for the whole matrix; multiples of 64 matched (design §7).
ROW_ALIGN = 64

#: fp32 elements per cache-sized chunk the CPU kernel works on (``kernel.merge_block``): measured
#: 2-5x faster than one pass over a large block. 2 MiB of fp32 (half an L2 of 1 MiB per core is 1 << 17):
#: with one torch thread per worker, llama-1b all-linear merged in 2.2-2.4 s / 3.2-3.4 CPU-s against
#: 2.8-3.0 s / 4.0-4.3 with 1 << 17 (fewer ops per block: each costs Python and dispatch time under the
#: GIL) and 2.7-3.0 s with 1 << 20 (benchmarks/RESULTS.md).
CHUNK_ELEMENTS = 1 << 19


def chunk_rows(row_numel: int) -> int:
    """Rows per kernel chunk for rows of ``row_numel`` elements: a multiple of ROW_ALIGN."""
    return max(ROW_ALIGN, CHUNK_ELEMENTS // max(row_numel, 1) // ROW_ALIGN * ROW_ALIGN)


def row_blocks(rows: int, step: int) -> tuple[tuple[int, int], ...]:
    """Cut ``rows`` into ``[r0, r1)`` blocks of ``step`` rows (a multiple of ROW_ALIGN).

    A short tail is folded into the block before it, so every block but a lone one has at least
    ROW_ALIGN rows: measured on MKL, a 65-row fp32 product cut 64 + 1 differs from the whole
    (the 1-row product takes another code path), while 64·k + tail cut at multiples of 64 with a
    last block of ≥ 64 rows matched every time (tests/test_kernel.py).
    """
    assert step % ROW_ALIGN == 0 or step >= rows, "blocks must be cut at multiples of ROW_ALIGN"
    starts = list(range(0, max(rows, 1), max(step, 1)))
    if len(starts) > 1 and rows - starts[-1] < ROW_ALIGN:
        starts.pop()
    return tuple(zip(starts, [*starts[1:], max(rows, 1) if rows else 0], strict=True))


