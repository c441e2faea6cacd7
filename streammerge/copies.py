"""A copy run (``units.Unit.is_copy``): consecutive untouched tensors whose bytes are contiguous in one base
file, moved into their place in an output shard by a copier thread (or, while torch loads, by the copier
process it hands the run to: ``copier_process``), with the digests of their pieces.

Where the shard takes direct I/O, the bytes pass through the copier's aligned buffer (``writer.ShardFile.copy_in``)
and are hashed there (``digest.PieceFeed``); where it does not, they move with ``copy_file_range`` and are
hashed from the base's page cache (``sources.Sources.hash_copied``). So are the runs copied while torch loads
on its own thread: it holds the GIL for its module bodies, and each piece hash (which releases the GIL) waited
up to the switch interval to get it back, so copies ran at ~0.5 GB/s then. Their hashes wait for the load,
on a thread of their own (llama-1b q/v: 0.76-0.96x the time per pair, RESULTS.md).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor

from streammerge import digest, units
from streammerge.sources import Sources
from streammerge.units import Unit
from streammerge.writer import ShardFile

LOG = logging.getLogger(__name__)


def copy_run(unit: Unit, file: ShardFile, digests: list[bytes | None] | None, sources: Sources,
             later: tuple[Future, ThreadPoolExecutor] | None) -> int | Future:
    """Copy ``unit`` into ``file`` and put its pieces' digests into ``digests`` (its shard's list; None: not
    wanted). Returns the bytes copied, or, when the hashes wait for torch (``later``: its load, and the thread
    that hashes after it), the future of that."""
    first = unit.spans[0]
    path = first[0].source.path
    ranges: list[tuple[int, int]] = []  # the pieces' byte ranges in the base file
    if digests is not None:
        for task, r0, r1 in unit.spans:
            j0, j1 = units.pieces_in(task, r0, r1)
            ranges += [(units.src_offset(task, p0), units.src_offset(task, p1))
                       for p0, p1 in digest.task_pieces(task)[j0:j1]]
    feed = digest.PieceFeed([b - a for a, b in ranges]) if ranges else None
    loading = later is not None and not later[0].done()  # once: torch may finish loading meanwhile
    defer = feed is not None and loading  # hashed after the load
    started = time.perf_counter()
    src = units.src_offset(first[0], first[1])
    fd = sources.fd(path)  # opened here in any case: the deferred hashes read through it
    child = sources.copy_process if loading else None
    elsewhere = child is not None and child.copy(file, path, src, unit.offset, unit.nbytes)
    fed = not elsewhere and file.copy_in(fd, src, unit.offset, unit.nbytes,
                                         sources.copy_buffer(file.align) if file.align else None,
                                         None if defer else feed)
    LOG.debug("copy %d bytes%s (%s): %.3f s", unit.nbytes, " in the copier process" if elsewhere else "",
              "hashed after torch loads" if defer else "hashed on the way" if fed else "hashed by range",
              time.perf_counter() - started)
    if feed is None:
        return unit.nbytes
    assert digests is not None
    if defer:
        assert later is not None
        return later[1].submit(hash_copied, unit, digests, sources, ranges, later[0])
    if fed:
        digests[unit.piece0 : unit.piece0 + len(ranges)] = feed.digests()
        return unit.nbytes
    return hash_copied(unit, digests, sources, ranges, None)


def hash_copied(unit: Unit, digests: list[bytes | None], sources: Sources, ranges: list[tuple[int, int]],
                after: Future | None) -> int:
    """The digests of a copied run's pieces, from the base's page cache, once ``after`` is done."""
    if after is not None:
        sources.after(after)  # its error, if any, surfaces in the compute units
    digests[unit.piece0 : unit.piece0 + len(ranges)] = sources.hash_copied(unit.spans[0][0].source.path, ranges)
    return unit.nbytes
