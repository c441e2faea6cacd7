"""Execute a plan's arithmetic: merge blocks of rows, and stream them in output order.

``compute_rows`` merges rows ``[r0, r1)`` of one tensor task; ``scatter.write_shards`` runs it on
its workers and writes each block at its offset. ``pieces`` cuts every task into row blocks
(``budget.block_rows``), computes them on a thread pool ahead of the consumer and yields them in
output order: ``api.iter_merged`` and ``verify`` consume it.

Memory bound (enforced by the ``in_use`` accounting in ``pieces``): the blocks computed but not yet
consumed never need more than ``max_memory`` bytes of working memory, as estimated by
``plan.block_bytes``. A budget below the plan's minimum (``Plan.min_memory``) is refused up front
(``budget.check_budget``). The interpreter, torch and the page cache are outside this budget:
expect RSS ≈ 250 MB + ``max_memory`` at most.

Threads, not processes: torch kernels and mmap reads release the GIL, threads share the maps,
and CUDA does not survive ``fork``. Results do not depend on the worker count: each block is
computed by the same ops on the same rows whatever thread runs it.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

import torch

from streammerge import kernel, requant
from streammerge.budget import MAX_BLOCK_BYTES, ExecOptions, block_rows, check_budget, default_workers, unit_cost
from streammerge.changes import BlockTally
from streammerge.errors import NonFiniteError
from streammerge.formats.reader import TensorReader
from streammerge.plan import TensorTask, chunk_rows, row_blocks
from streammerge.requant import QuantRun
from streammerge.tuners import TUNERS
from streammerge.tuners.base import LoadedTerm, TunerTerm

LOG = logging.getLogger(__name__)

__all__ = ["MAX_BLOCK_BYTES", "ExecOptions", "Piece", "as_bytes", "block_rows", "check_budget", "compute_rows",
           "default_workers", "pieces", "unit_cost", "whole_tensors"]

#: At most this many pieces are queued ahead of the consumer (copies included).
MAX_AHEAD = 64


@dataclass(frozen=True, slots=True)
class Piece:
    """Rows ``[r0, r1)`` of one output tensor; ``data`` is None when the rows are the source's bytes."""

    task: TensorTask
    r0: int
    r1: int
    data: torch.Tensor | None


def set_intra_op_threads(opts: ExecOptions) -> int | None:
    """Give torch ``opts.threads`` intra-op threads, by default 1 on the CPU (the workers are the
    parallelism); returns the count to restore, None when unchanged. torch's default (every core for
    each op) spends more than it gains on the kernel's L2-sized chunks: on 2 cores, llama-1b
    all-linear took 5.0 CPU-s with 2 workers x 2 threads against 2.9-3.9 with 2 x 1, and 17 CPU-s with
    1 x 2 (benchmarks/RESULTS.md). The bits are the same for any count: the GEMM splits output rows and
    columns, never the rank sum (tests/test_kernel.py)."""
    n = opts.threads if opts.threads is not None else (1 if torch.device(opts.device).type == "cpu" else None)
    before = torch.get_num_threads()
    if n is None or n == before:
        return None
    torch.set_num_threads(n)
    return before


def restore_intra_op_threads(before: int) -> None:
    """Undo ``set_intra_op_threads`` for threads torch starts from now on (a library call leaves the
    process's default as it found it)."""
    torch.set_num_threads(before)


def pieces(tasks: Sequence[TensorTask], reader: TensorReader, opts: ExecOptions) -> Iterator[Piece]:
    """Yield every task's rows in order; merge blocks are computed ahead on ``opts.workers`` threads."""
    if opts.quant_run is None and any(t.quant is not None for t in tasks):
        opts = replace(opts, quant_run=QuantRun())
    units: deque[tuple[TensorTask, int, int, int]] = deque()
    for task in tasks:
        if task.is_raw_copy:
            units.append((task, 0, task.rows, 0))
            continue
        for r0, r1 in row_blocks(task.rows, block_rows(task, opts)):
            units.append((task, r0, r1, unit_cost(task, r0, r1, opts)))
    if not units:
        return
    pending: deque[tuple[tuple[TensorTask, int, int, int], Future[torch.Tensor] | None]] = deque()
    in_use = 0
    threads_before = set_intra_op_threads(opts)
    with ThreadPoolExecutor(max_workers=opts.workers, thread_name_prefix="streammerge") as pool:
        try:
            while units or pending:
                while units and len(pending) < MAX_AHEAD and (not pending or in_use + units[0][3] <= opts.max_memory):
                    unit = units.popleft()
                    task, r0, r1, cost = unit
                    fut = None if task.is_raw_copy else pool.submit(_compute, task, r0, r1, reader, opts)
                    in_use += cost
                    pending.append((unit, fut))
                (task, r0, r1, cost), fut = pending.popleft()
                data = fut.result() if fut is not None else None
                yield Piece(task, r0, r1, data)
                in_use -= cost
        finally:
            for _, fut in pending:
                if fut is not None:
                    fut.cancel()
            if threads_before is not None:
                restore_intra_op_threads(threads_before)


def compute_rows(task: TensorTask, r0: int, r1: int, reader: TensorReader, opts: ExecOptions,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Merge rows ``[r0, r1)`` of ``task``; returns a CPU tensor in the output dtype (``verify --sample``
    and ``scatter`` use it; ``pieces`` too). ``out``: a uint8 CPU buffer of at least the block's bytes to
    compute into (reused between blocks: a fresh one costs a page fault per 4 KiB); None allocates. Not
    used for a quantized task (``requant`` encodes into its own).

    ``r0`` must be a multiple of ROW_ALIGN and ``r1 - r0`` a multiple of it or the tensor's end
    (see ``plan.row_blocks``), or the sums may differ from the whole-tensor merge.
    """
    return _compute(task, r0, r1, reader, opts, out)


def _compute(task: TensorTask, r0: int, r1: int, reader: TensorReader, opts: ExecOptions,
             buf: torch.Tensor | None = None) -> torch.Tensor:
    """Merge rows ``[r0, r1)`` of ``task``; returns a CPU tensor in the output dtype."""
    if task.quant is not None:
        view = task.weight_view()
        work = kernel.TORCH_DTYPES[task.quant.compute_dtype]

        def merge(w: torch.Tensor, a: int, b: int) -> torch.Tensor:
            return _merged(view, w, a, b, reader, opts, work)

        out = requant.compute(task, r0, r1, reader, merge, block_rows(view, opts), opts.quant_run or QuantRun())
    else:
        w = reader.rows(task.source, r0, r1)
        out = _merged(task, w, r0, r1, reader, opts, kernel.TORCH_DTYPES[task.dtype], buf)
        reader.release(task.source, r0, r1)
    for term in (t for s in task.steps for t in s.terms):
        # fp32 factors are used straight from the map: drop their pages too, or they pile up in RSS over a run
        # (safe under other threads: the private, never-written mapping faults them back in from the file).
        for ref in term.refs():
            reader.release(ref, 0, ref.shape[0] if ref.shape else 1)
    return out.reshape((r1 - r0, *task.shape[1:])) if task.shape else out.reshape(())


def _merged(task: TensorTask, w: torch.Tensor, r0: int, r1: int, reader: TensorReader, opts: ExecOptions,
            out_dtype: torch.dtype, buf: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``w`` (rows ``[r0, r1)`` of ``task``'s source, any dtype) merged into ``out_dtype``, finite-checked
    (on the CPU, the NaN/inf filter and the change tally run per kernel chunk while it is in cache)."""
    tally = opts.changes is not None and task.kind == "merge"
    device = torch.device(opts.device)
    if device.type == "cuda":
        out = _compute_cuda(task, w, r0, r1, reader, device, out_dtype)
        suspect = opts.check_finite and kernel.nonfinite_count(out) > 0
    else:
        chunk = chunk_rows(task.row_numel) if task.kernel_chunks else None
        dst = buf[: w.numel() * out_dtype.itemsize].view(out_dtype).view(w.shape) if buf is not None else None
        block = BlockTally() if tally else None
        out, suspect = kernel.merge_checked(w, out_dtype, _steps(task, reader, device), r0, r1, chunk, out=dst,
                                            check_finite=opts.check_finite, tally=block)
        if block is not None:
            opts.changes.add_block(task, r0, block)  # type: ignore[union-attr]
            tally = False
    if suspect:  # the sum filter tripped: count exactly, against what the source already had
        bad = kernel.nonfinite_count(out)
        if bad and bad > kernel.nonfinite_count(w):
            origins = ", ".join(sorted({t.origin for s in task.steps for t in s.terms})) or "a replacement"
            raise NonFiniteError(
                f"merged tensor {task.name!r} has {bad} NaN/inf values in rows {r0}..{r1} (from {origins}); "
                "the adapter or the merge overflowed: check the adapter, or pass `allow_nonfinite` to write it anyway"
            )
    if tally:  # the CUDA path (for a quantized weight: its decoded base rows and merged rows)
        opts.changes.add(task, r0, w, out)  # type: ignore[union-attr]
    return out


def _compute_cuda(task: TensorTask, w: torch.Tensor, r0: int, r1: int, reader: TensorReader,
                  device: torch.device, out_dtype: torch.dtype) -> torch.Tensor:
    """The same merge on a GPU: rows staged through pinned host buffers, copies asynchronous on
    this call's own stream, so blocks of different workers overlap transfer and compute.

    cuBLAS sums fp32 products in another order than MKL, so a merged element can differ from the
    CPU result by one ulp of the stored dtype (spec §3.1); everything after the GEMM is the same ops.
    """
    stream = torch.cuda.Stream(device)
    with torch.cuda.stream(stream):
        staged = torch.empty(w.shape, dtype=w.dtype, pin_memory=True)
        staged.copy_(w)
        w_dev = staged.to(device, non_blocking=True)
        merged = kernel.merge_block(w_dev, out_dtype, _steps(task, reader, device), r0, r1, None)
        out = torch.empty(merged.shape, dtype=merged.dtype, pin_memory=True)
        out.copy_(merged, non_blocking=True)
    stream.synchronize()
    return out


def _steps(task: TensorTask, reader: TensorReader, device: torch.device) -> list[tuple]:
    """``task``'s steps as the kernel takes them: (rounding, factors on ``device``, combination)."""
    return [(step.rounding, [_factors(t, reader, device) for t in step.terms], step.combination)
            for step in task.steps]


def _factors(term, reader: TensorReader, device: torch.device) -> kernel.Factors | LoadedTerm:
    if isinstance(term, TunerTerm):
        # PEFT upcasts float adapter tensors to fp32 at load (cast_adapter_dtype); integer ones stay as stored
        tensors = {}
        for role, ref in term.tensors:
            t = reader.tensor(ref)
            tensors[role] = t.to(device=device, dtype=torch.float32) if t.is_floating_point() else t.to(device)
        tuner = TUNERS[term.tuner]
        return LoadedTerm(tuner.invert if term.inverse else tuner.apply, tensors, dict(term.update.params))
    # PEFT upcasts adapter weights to fp32 at load (autocast_adapter_dtype); so do we.
    a = reader.tensor(term.a).to(device=device, dtype=torch.float32, non_blocking=True) if term.a is not None else None
    b = reader.tensor(term.b).to(device=device, dtype=torch.float32, non_blocking=True)
    m = reader.tensor(term.magnitude).to(device=device, dtype=torch.float32) if term.magnitude is not None else None
    return kernel.Factors(term.layout, a, b, term.scale, term.weight, m, term.indices, term.expert, term.task)


def as_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor. For a contiguous tensor this is a writable view
    of its own storage (no copy); otherwise of a contiguous copy."""
    t = t.contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def whole_tensors(
    tasks: Sequence[TensorTask], reader: TensorReader, opts: ExecOptions
) -> Iterator[tuple[str, torch.Tensor]]:
    """Assemble ``pieces`` into whole tensors (fresh CPU tensors the caller owns), in order."""
    with contextlib.closing(pieces(tasks, reader, opts)) as stream:  # drain the pool before the reader closes
        yield from _assemble(stream, reader)


def _assemble(stream: Iterator[Piece], reader: TensorReader) -> Iterator[tuple[str, torch.Tensor]]:
    out: torch.Tensor | None = None
    for piece in stream:
        task = piece.task
        if piece.data is None:
            # read(2) into the caller's tensor: no mapped pages, so RSS grows by that tensor alone
            out = torch.empty(task.shape, dtype=kernel.TORCH_DTYPES[task.dtype])
            reader.read_into(task.source, as_bytes(out))  # ``out`` is contiguous: the view is its storage
            yield task.name, out
            out = None
            continue
        if not task.shape:
            yield task.name, piece.data
            continue
        if piece.r0 == 0:
            out = torch.empty(task.shape, dtype=kernel.TORCH_DTYPES[task.dtype])
        assert out is not None
        out[piece.r0 : piece.r1] = piece.data
        if piece.r1 >= task.rows:
            yield task.name, out
            out = None
