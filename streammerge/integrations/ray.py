"""Run the parts of a merge as Ray tasks (``merge(..., executor="ray")``, CLI ``--ray [ADDRESS]``).

One task per part (``streammerge.parts``), each running ``merge(..., part=Part(i, N))`` on
whatever node Ray picks, with ``num_cpus=workers``, ``memory`` = ``max_memory`` plus the
interpreter's overhead (``TASK_OVERHEAD``), and one GPU when the merge runs on CUDA. A task whose
worker process dies (OOM killer, node lost, SIGKILL) is retried up to ``MAX_RETRIES`` times by
Ray; a retried part resumes, keeping the shards the dead attempt committed. A task that fails on
bad input is not retried: its error is raised as it is. Progress comes back through a small actor
to the caller's ``on_progress``.

Every node must see the base, the adapters and the output directory at the same paths (shared
storage: NFS, Lustre, CPFS, a FUSE-mounted bucket); a task checks this first and says so.

``iter_merged`` inside a Ray actor needs nothing from this module: it is a plain generator
(see README, "Ray").
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from streammerge.errors import OutputError, StreamMergeError
from streammerge.identity import Identity
from streammerge.plan import Plan

LOG = logging.getLogger(__name__)

#: Retries of a task whose worker died (Ray's ``max_retries``; bad-input errors are never retried).
MAX_RETRIES = 3
#: Memory a task needs beyond ``max_memory``: the interpreter, torch and Ray's worker (~250 MB measured + margin).
TASK_OVERHEAD = 768 << 20
#: Progress is sent to the driver at most this often from each task.
_REPORT_EVERY_S = 0.5


def _ray():
    try:
        import ray
    except ImportError:
        raise StreamMergeError("`ray` needs Ray: pip install 'streammerge[ray]' (or pip install ray)") from None
    return ray


def check_visible(sources: Mapping[str, object], out: str) -> None:
    """Raise a clear error when this process cannot see an input (``sources``: base, adapters) or ``out``."""
    paths = [p for p in (sources.get("base"), *sources.get("adapters", ())) if p is not None] + [out]
    for path in paths:
        if not Path(str(path)).exists():
            raise OutputError(
                f"ray worker on {socket.gethostname()} cannot see {path}: `ray` needs the base, the adapters and "
                "`out` on storage every node mounts at the same path"
            )


class _Tracker:
    """Bytes done per part; a retried part starts again from zero."""

    def __init__(self) -> None:
        self.done: dict[int, int] = {}

    def start(self, index: int) -> None:
        self.done[index] = 0

    def add(self, index: int, n: int) -> None:
        self.done[index] = self.done.get(index, 0) + n

    def total(self) -> int:
        return sum(self.done.values())


def _run_part(merge: Callable, sources: dict, recorded: dict, out: str, index: int, count: int, workers: int,
              max_memory: int, tracker, threads: int | None = None, direct_io: bool = True) -> int:
    """The body of one Ray task: ``merge`` (``streammerge.merge``, passed by reference) part ``index`` of
    ``count`` of the merge of ``sources`` with the ``recorded`` options (``MergeOptions.record``).
    Returns bytes of its shards."""
    import ray

    from streammerge.options import MergeOptions
    from streammerge.parts import Part

    check_visible(sources, out)
    o = MergeOptions.from_record(recorded)
    ray.get(tracker.start.remote(index))
    pending, last = 0, time.monotonic()

    def on_progress(n: int) -> None:
        nonlocal pending, last
        pending += n
        if time.monotonic() - last >= _REPORT_EVERY_S:
            tracker.add.remote(index, pending)
            pending, last = 0, time.monotonic()

    report = merge(
        base=sources["base"], adapters=sources["adapters"], out=out, adapter_name=o.adapter_name, weights=o.weights,
        combination=o.combination, density=o.density, seed=o.seed, heads_from=o.heads_from,
        pattern_rules=o.pattern_rules, max_shard_size=o.max_shard_size, allow_nonfinite=o.allow_nonfinite,
        base_subfolder=o.base_subfolder, dequantize=o.dequantize,
        device=str(recorded["device"]), workers=workers, max_memory=max_memory, part=Part(index, count),
        on_progress=on_progress, threads=threads, direct_io=direct_io,
    )
    ray.get(tracker.add.remote(index, pending))
    return report.bytes_written


def default_parts(plan: Plan, workers: int, resources: Mapping[str, float]) -> int:
    """One part per task slot of the cluster (its CPUs / ``workers``), at most one per shard."""
    slots = int(resources.get("CPU", 1)) // max(workers, 1)
    return max(1, min(len(plan.shards), slots))


def run_parts(merge: Callable, plan: Plan, identity: Identity, out: Path, *, address: str | None,
              parts: int | None, workers: int, max_memory: int, on_progress: Callable[[int], None] | None,
              threads: int | None = None, direct_io: bool = True) -> int:
    """Run every part of the merge ``identity`` describes as a Ray task calling ``merge(..., part=...)``
    (``streammerge.merge``) and wait for all. Returns the number of parts.

    Uses the Ray runtime already initialised in this process, else ``ray.init(address=address)``
    (and shuts it down afterwards).
    """
    ray = _ray()
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, logging_level=logging.WARNING)
    try:
        count = parts or default_parts(plan, workers, ray.cluster_resources())
        if count < 1:
            raise StreamMergeError(f"`parts` {count}: need at least one part")
        out.mkdir(parents=True, exist_ok=True)  # so that tasks can tell whether they see it
        LOG.info("ray: %d part(s) of %d shard(s), %d CPU(s) and %.1f GiB per task", count, len(plan.shards), workers,
                 (max_memory + TASK_OVERHEAD) / 2**30)
        tracker = ray.remote(num_cpus=0)(_Tracker).remote()
        gpus = 1 if identity.options.get("device") == "cuda" else 0  # Ray hides GPUs from tasks that ask for none
        task = ray.remote(_run_part).options(num_cpus=workers, num_gpus=gpus, memory=max_memory + TASK_OVERHEAD,
                                             max_retries=MAX_RETRIES, retry_exceptions=False)
        args = (merge, dict(identity.sources), dict(identity.options), str(out))
        refs = {task.remote(*args, i, count, workers, max_memory, tracker, threads, direct_io): i for i in range(count)}
        _wait(ray, refs, tracker, on_progress)
        return count
    finally:
        if started:
            ray.shutdown()


def _wait(ray, refs: Mapping[object, int], tracker, on_progress: Callable[[int], None] | None) -> None:
    pending, shown = list(refs), 0
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=_REPORT_EVERY_S)
            for ref in done:
                _result(ray, ref, refs[ref], len(refs))
            if on_progress is not None:
                total = ray.get(tracker.total.remote())
                on_progress(total - shown)
                shown = total
    except BaseException:
        for ref in pending:
            ray.cancel(ref)
        raise


def _result(ray, ref: object, index: int, count: int) -> None:
    try:
        ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, StreamMergeError):
            raise cause from None
        raise
    except ray.exceptions.RayError as e:  # the worker died more than MAX_RETRIES times, or the node is gone
        raise StreamMergeError(
            f"ray: part {index}/{count} failed {MAX_RETRIES + 1} times ({type(e).__name__}); the shards it "
            "committed are kept: rerun the same command to continue"
        ) from None
