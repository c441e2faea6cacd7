"""Write shards in parallel, each byte at the offset the plan gives it ("scatter writes").

The plan knows every tensor's offset in every output file, so no byte has to wait for the bytes
before it. ``write_shards`` cuts the shards into *units* (``streammerge.units``), in file order:

* a merge block: rows ``[r0, r1)`` of a computed tensor (``execute.compute_rows``'s arithmetic). The
  worker that computed it hashes it while it is in cache and hands it to the io thread, which writes
  it at its offset (direct I/O for its aligned middle where the file allows: ``writer.ShardFile``)
  while the worker computes the next block into its other buffer (``sources.Sources.buffer``);
* a copy run: consecutive untouched tensors whose bytes are contiguous in one base file (cut at
  ``COPY_UNIT`` bytes so that several threads share a big run), run by a copier thread (``copies``).

``workers`` threads compute, ``COPIERS`` threads copy, reading through ``sources.Sources``. The main
thread submits units in order (memory-bounded, see ``budget``: a block keeps its budget until it is
written), and once every unit of a shard is in the file, hands the shard to a committer thread, in
plan order: fsync, rename, ``on_shard`` (the progress record). Temporary files are pre-sized
(``writer.ShardFile``), so the result is byte-identical whatever the worker count, the budget or the
way bytes reach the disk, and so are the digests (``digest``: per-piece digests combined in file order).

torch is imported on a thread of its own when the writing starts, not before: nothing before it
(planning, checks) needs torch, so errors found there return at once, and the copiers start the raw
copies while it loads (in the CLI, through a child process the import's hold on the GIL cannot stall:
``copier_process``).
"""

from __future__ import annotations

import logging
import sys
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import replace
from pathlib import Path

from streammerge import copies, digest, process_policy, units
from streammerge.budget import ExecOptions
from streammerge.copier_process import CopyProcess
from streammerge.plan import ShardPlan
from streammerge.sources import COPY_BUFFER, Sources
from streammerge.units import Unit, shard_units
from streammerge.writer import ShardFile

LOG = logging.getLogger(__name__)

#: At most this many units are queued ahead of the workers (copies included).
MAX_AHEAD = 64
#: Threads that run copy units (direct copies block on the disk; more do not make it faster: ~2 GB/s here
#: with 1, 2 or 4 writers in flight).
COPIERS = 2
#: Finished units of at least this many bytes are handed to the disk at once (``ShardFile.start_writeback``):
#: the fsync of a shard then does not start from its whole size.
WRITEBACK_MIN = 4 << 20


class _Shard:
    """A shard being written: its temporary file, its piece digests, and how many units remain."""

    def __init__(self, shard: ShardPlan, path: Path, checksum: str, count: int, direct: bool) -> None:
        self.plan = shard
        self.file = ShardFile(path, len(shard.header) + shard.data_size, direct).__enter__()
        self.remaining = count
        self.digests: list[bytes | None] = [None] * len(digest.shard_pieces(shard))
        self.sha = digest.Sha256Prefix(self.file.fd, path) if checksum == "sha256" else None
        self.units: dict[int, tuple[int, Future]] = {}  # start offset -> (end offset, unit), for sha256
        self.prefix = len(shard.header)  # bytes [0, prefix) are written and fed to sha256
        try:
            self.file.pwrite(0, shard.header)
        except BaseException:
            self.file.close()
            raise
        self.digests[0] = digest.piece_digest(shard.header)

    def advance_sha(self) -> None:
        """Feed sha256 the prefix of the file whose units are done (they finish in any order)."""
        while self.prefix in self.units and _written(self.units[self.prefix][1]):
            self.prefix = self.units.pop(self.prefix)[0]
        if self.sha is not None:
            self.sha.advance(self.prefix)

    def record(self) -> dict[str, str]:
        if self.sha is not None:
            self.sha.advance(self.file.size)
            return {"sha256": self.sha.hexdigest()}
        assert all(d is not None for d in self.digests), "a piece was not hashed"
        return {digest.SHARD_KEYS["xxh3"]: digest.combine(self.digests)}  # type: ignore[arg-type]


def _written(fut: Future) -> bool:
    """A unit's bytes are in the file: its copy or write finished (a finished compute returns its write)."""
    return fut.done() and fut.exception() is None and not isinstance(fut.result(), Future)


def _compute(unit: Unit, shard: _Shard, sources: Sources, opts: ExecOptions, io: ThreadPoolExecutor) -> Future:
    """Compute and hash a merge block; returns its write, queued on ``io`` (the worker goes on computing
    into its other buffer while the disk takes this one: a direct write blocks its caller)."""
    execute, reader = sources.engine()
    task, r0, r1 = unit.spans[0]
    # the CUDA path stages through its own pinned buffers; a quantized task encodes into its own
    own = not str(opts.device).startswith("cuda") and task.quant is None
    slot, buf = sources.buffer(unit.nbytes, unit.offset, shard.file.align) if own else (None, None)
    out = execute.compute_rows(task, r0, r1, reader, opts, out=buf)
    data = execute.as_bytes(out)
    j0, j1 = units.pieces_in(task, r0, r1)
    row_bytes = units.row_bytes(task)
    pieces = digest.task_pieces(task)
    for j in range(j0, j1):
        p0, p1 = pieces[j]
        shard.digests[unit.piece0 + j - j0] = digest.piece_digest(data[(p0 - r0) * row_bytes : (p1 - r0) * row_bytes])
    written = io.submit(_write, shard, unit, data)
    if slot is not None:
        sources.lend(slot, written)
    return written


def _write(shard: _Shard, unit: Unit, data: memoryview) -> int:
    shard.file.pwrite(unit.offset, data)
    return unit.nbytes


def write_shards(
    shards: Sequence[ShardPlan],
    out: Path,
    opts: ExecOptions,
    on_progress: Callable[[int], None] | None = None,
    on_shard: Callable[[ShardPlan, dict[str, str]], None] | None = None,
    checksum: str = "xxh3",
) -> int:
    """Write ``shards`` into ``out`` (atomic per shard). Returns the bytes written.

    ``on_shard(shard, {key: hex digest})`` is called, in plan order, as each shard file is committed
    under its final name (``digest`` documents the keys).
    """
    if opts.quant_run is None and any(t.quant is not None for s in shards for t in s.tasks):
        from streammerge.requant import QuantRun

        opts = replace(opts, quant_run=QuantRun())
    run = _Run(shards, out, opts, on_progress, on_shard, checksum)
    try:
        run.loop()
    finally:
        run.close()
    return run.written


class _Run:
    """The state of one ``write_shards`` call (the main thread's side)."""

    def __init__(self, shards: Sequence[ShardPlan], out: Path, opts: ExecOptions,
                 on_progress: Callable[[int], None] | None,
                 on_shard: Callable[[ShardPlan, dict[str, str]], None] | None, checksum: str) -> None:
        self.shards, self.out, self.opts, self.checksum = shards, out, opts, checksum
        self.on_progress, self.on_shard = on_progress, on_shard
        # Within a shard, copies go first: they need neither budget nor torch, so they run while torch loads
        # (the commit order, one shard at a time, is unchanged).
        self.units = deque(u for i, s in enumerate(shards) for u in sorted(shard_units(i, s, opts),
                                                                           key=lambda u: not u.is_copy))
        self.per_shard = [0] * len(shards)
        for u in self.units:
            self.per_shard[u.shard] += 1
        self.sources = Sources(opts)
        self.open: dict[int, _Shard] = {}  # opened, not yet handed to the committer
        self.handed: list[_Shard] = []
        self.commits: deque[Future] = deque()
        self.next_commit = 0
        self.written = 0
        self.pending: dict[Future, Unit] = {}
        self.in_use = 0
        self.pool = ThreadPoolExecutor(max_workers=opts.workers, thread_name_prefix="streammerge")
        # Copies wait on the disk, computes on the CPU: their own threads, so the merge arithmetic starts as soon
        # as torch is loaded instead of queueing behind a shard's copies (llama-1b q/v: 2.0-2.4 s -> see RESULTS.md).
        self.copier = ThreadPoolExecutor(max_workers=COPIERS, thread_name_prefix="streammerge-copy")
        self.committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streammerge-commit")
        self.io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streammerge-io")  # computed blocks' writes
        # Load torch and the kernel beside the workers, so every worker starts copying at once. Its errors
        # surface in the first compute unit, which calls ``engine`` again.
        self.loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streammerge-load")
        self.hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streammerge-hash")  # after the load
        self.later = None
        if any(not u.is_copy for u in self.units):
            self.later = (self.loader.submit(self.sources.engine), self.hasher)

    def loop(self) -> None:
        # Copies beside torch's import, where it is still to come and the process is streammerge's own. Started
        # here, inside ``write_shards``' try, so that ``close`` ends it whatever happens next.
        if self.later is not None and "torch" not in sys.modules and process_policy.owned() and \
                any(u.is_copy for u in self.units):
            self.sources.copy_process = CopyProcess.start(COPY_BUFFER)
        while True:
            self._submit()
            self._hand_over()
            while self.commits and self.commits[0].done():
                self.commits.popleft().result()
            if not self.pending:
                if self.next_commit >= len(self.shards):
                    break
                continue
            self._collect()
        for fut in self.commits:
            fut.result()

    def _shard(self, i: int) -> _Shard:
        if i not in self.open:
            s = self.shards[i]
            self.open[i] = _Shard(s, self.out / s.filename, self.checksum, self.per_shard[i], self.opts.direct_io)
            self.written += len(s.header)
        return self.open[i]

    def _submit(self) -> None:
        """Queue units in file order while they fit the budget (the first one always does)."""
        while self.units and len(self.pending) < MAX_AHEAD and (
                not self.pending or self.in_use + self.units[0].cost <= self.opts.max_memory):
            unit = self.units.popleft()
            shard = self._shard(unit.shard)
            fut = (self.copier.submit(copies.copy_run, unit, shard.file, shard.digests if shard.sha is None else None,
                                        self.sources, self.later) if unit.is_copy
                   else self.pool.submit(_compute, unit, shard, self.sources, self.opts, self.io))
            if shard.sha is not None and unit.nbytes:
                shard.units[unit.offset] = (unit.offset + unit.nbytes, fut)
            self.pending[fut] = unit
            self.in_use += unit.cost

    def _hand_over(self) -> None:
        """Hand every finished shard to the committer, in plan order."""
        while self.next_commit < len(self.shards):
            if self.per_shard[self.next_commit] == 0:  # nothing but a header
                self._shard(self.next_commit)
            shard = self.open.get(self.next_commit)
            if shard is None or shard.remaining:
                break
            self.handed.append(self.open.pop(self.next_commit))
            self.commits.append(self.committer.submit(_commit, shard, self.on_shard))
            self.next_commit += 1

    def _collect(self) -> None:
        """Wait for a unit to finish; account for every finished one."""
        done, _ = wait(self.pending, return_when=FIRST_COMPLETED)
        for fut in done:
            unit = self.pending.pop(fut)
            n = fut.result()
            if isinstance(n, Future):  # computed: now wait for its write (still holding its budget); or copied,
                # with its hashes still to come
                self.pending[n] = unit
                shard = self.open[unit.shard]
                if unit.offset in shard.units:
                    shard.units[unit.offset] = (shard.units[unit.offset][0], n)
                continue
            self.in_use -= unit.cost
            self.written += n
            shard = self.open[unit.shard]
            shard.remaining -= 1
            if n >= WRITEBACK_MIN:  # on the committer thread: in order with the commit, never on a worker
                self.committer.submit(shard.file.start_writeback, unit.offset, n)
            if self.on_progress is not None:
                self.on_progress(n)
        for shard in self.open.values():  # not yet handed to the committer
            shard.advance_sha()

    def close(self) -> None:
        # Stop every writer before a file is closed (a descriptor number reused mid-write would be corrupted).
        self.sources.stop()  # units still waiting for torch give up; a unit already running finishes
        if self.sources.copy_process is not None:
            self.sources.copy_process.close()  # copiers waiting on it give up too
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.copier.shutdown(wait=True, cancel_futures=True)
        self.io.shutdown(wait=True)  # after the workers, which queue writes; before any file closes
        self.hasher.shutdown(wait=True, cancel_futures=True)  # after the copiers, which queue hashes
        self.committer.shutdown(wait=True, cancel_futures=True)
        self.loader.shutdown(wait=False)  # torch's import cannot be cut short; nothing waits for it now
        for shard in [*self.handed, *self.open.values()]:
            shard.file.close()  # deletes the temporary file unless committed
        self.sources.close()


def _commit(shard: _Shard, on_shard: Callable[[ShardPlan, dict[str, str]], None] | None) -> None:
    record = shard.record()
    shard.file.commit()
    if on_shard is not None:
        on_shard(shard.plan, record)
    LOG.debug("wrote %s", shard.plan.filename)

