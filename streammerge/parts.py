"""Cutting one merge into N independent parts (a Slurm array, Ray tasks, N ssh commands).

A part is a set of whole output shards. The plan fixes every shard's name, header and bytes up
front, so part ``I`` of ``N`` can be written by any machine that sees the inputs and the output
directory, with no coordination: each part writes only its own shard files (atomically, as a
one-process merge does) and its own record, and ``finalize`` seals the directory afterwards
(``streammerge.finalize``). The union of the parts is byte-identical to a one-process merge,
because every shard's bytes depend only on the plan, never on which process wrote it.

The assignment is a pure function of the plan and ``N``: shards sorted by their *work* (largest
first, then by name) go one by one to the part with the least work so far (lowest index on ties),
the classic longest-processing-time rule, so parts are balanced by bytes of merge work, not by
shard count. A part may get no shard when there are more parts than shards; it then has nothing
to do and succeeds.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from streammerge.errors import StreamMergeError
from streammerge.plan import Plan, ShardPlan, TensorTask

LOG = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Part:
    """Part ``index`` of ``count`` (0 ≤ index < count, as Slurm array indices count)."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise StreamMergeError(f"part {self.index}/{self.count}: need 0 <= I < N (e.g. `part` 0/8 ... 7/8)")

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_part(text: str) -> Part:
    """``"3/8"`` → Part(3, 8)."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m:
        raise StreamMergeError(f"`part` {text!r}: expected I/N with 0 <= I < N, e.g. `part` 0/8")
    return Part(int(m.group(1)), int(m.group(2)))


def part_from_slurm(environ: Mapping[str, str]) -> Part | None:
    """The part of a Slurm array task, or None outside an array job.

    ``SLURM_ARRAY_TASK_ID`` minus ``SLURM_ARRAY_TASK_MIN`` (divided by ``SLURM_ARRAY_TASK_STEP``
    when set), of ``SLURM_ARRAY_TASK_COUNT`` parts: ``--array=1-8`` gives parts 0/8 … 7/8.
    """
    if "SLURM_ARRAY_TASK_ID" not in environ or "SLURM_ARRAY_TASK_COUNT" not in environ:
        return None
    try:
        task, count = int(environ["SLURM_ARRAY_TASK_ID"]), int(environ["SLURM_ARRAY_TASK_COUNT"])
        low, step = int(environ.get("SLURM_ARRAY_TASK_MIN", "0")), int(environ.get("SLURM_ARRAY_TASK_STEP", "1"))
    except ValueError as e:
        raise StreamMergeError(f"SLURM_ARRAY_TASK_* is not a number ({e}); pass `part` I/N explicitly") from None
    index = (task - low) // max(step, 1)
    if not 0 <= index < count:
        raise StreamMergeError(
            f"SLURM_ARRAY_TASK_ID={task} (MIN {low}, STEP {step}) is not one of {count} array tasks; "
            "pass `part` I/N explicitly"
        )
    return Part(index, count)


def task_work(task: TensorTask) -> int:
    """Bytes of work to produce one tensor: a raw copy moves its bytes once (inside the kernel);
    a computed tensor reads its source and factors, and writes its output."""
    if task.is_raw_copy:
        return task.nbytes
    factors = sum(ref.nbytes for s in task.steps for t in s.terms for ref in (t.a, t.b, t.magnitude)
                  if ref is not None)
    return task.source.nbytes + factors + task.nbytes


def shard_work(shard: ShardPlan) -> int:
    return len(shard.header) + sum(task_work(t) for t in shard.tasks)


def assign(plan: Plan, count: int) -> tuple[tuple[ShardPlan, ...], ...]:
    """The shards of each of ``count`` parts (each in plan order); deterministic, balanced by work."""
    if count < 1:
        raise StreamMergeError(f"{count} parts: need at least one")
    loads = [0] * count
    members: list[set[str]] = [set() for _ in range(count)]
    for shard in sorted(plan.shards, key=lambda s: (-shard_work(s), s.filename)):
        i = min(range(count), key=lambda k: (loads[k], k))
        loads[i] += shard_work(shard)
        members[i].add(shard.filename)
    return tuple(tuple(s for s in plan.shards if s.filename in m) for m in members)


def shards_of(plan: Plan, part: Part) -> tuple[ShardPlan, ...]:
    return assign(plan, part.count)[part.index]


def owner(plan: Plan, count: int) -> dict[str, int]:
    """Shard filename → index of the part that writes it."""
    return {s.filename: i for i, shards in enumerate(assign(plan, count)) for s in shards}


def describe(plan: Plan, count: int) -> Sequence[str]:
    """One line per part: its shards and bytes (for logs and ``--dry-run``)."""
    lines = []
    for i, shards in enumerate(assign(plan, count)):
        size = sum(len(s.header) + s.data_size for s in shards)
        lines.append(f"part {i}/{count}: {len(shards)} shard(s), {size / 1e9:.3f} GB, "
                     f"work {sum(shard_work(s) for s in shards) / 1e9:.3f} GB")
    return lines
