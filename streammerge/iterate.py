"""``iter_merged``: the merged checkpoint as ``(name, tensor)`` pairs in output order, nothing written.

The same pipeline as ``merge`` (``execute.whole_tensors`` over the plan's tasks) for consumers that take
weights in process: inference engines, RL trainers, export tools.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from streammerge import budget
from streammerge.budget import ExecOptions
from streammerge.parts import Part, parse_part, shards_of
from streammerge.prepare import (
    DEFAULT_MAX_MEMORY,
    AdapterSpec,
    PathLike,
    adapter_specs,
    load_inputs,
    merge_options,
    plan_with,
    resolve_device,
)

if TYPE_CHECKING:
    import torch


def iter_merged(
    base: PathLike | None = None,
    adapter: PathLike | None = None,
    *,
    adapters: Sequence[AdapterSpec] = (),
    adapter_name: str | None = None,
    device: str | torch.device = "auto",
    workers: int | None = None,
    max_memory: int = DEFAULT_MAX_MEMORY,
    allow_nonfinite: bool = False,
    weights: Sequence[float] | None = None,
    combination: str | None = None,
    density: float | None = None,
    seed: int = 0,
    heads_from: str | int | None = None,
    pattern_rules: str = "current",
    part: Part | str | None = None,
    base_subfolder: str | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every tensor of the merged checkpoint, in output order.

    Nothing is written to disk. Each yielded tensor is a fresh CPU tensor the caller owns; apart
    from it, memory stays within ``max_memory`` (the same pipeline as ``merge``). This is the
    in-process path for pushing merged weights into an inference engine, e.g.
    ``llm.load_weights(streammerge.iter_merged(base=..., adapter=...))``. Adapter, weight and
    combination arguments are those of :func:`merge`. ``part`` (``Part(I, N)`` or ``"I/N"``) yields
    only the tensors of the output shards of part I of N (``streammerge.parts``): N consumers, e.g.
    N Ray actors, each get a disjoint slice, and together every tensor once.
    """
    paths, weights = adapter_specs(adapter, adapters, weights)
    ckpt, loaded = load_inputs(base, paths, adapter_name, pattern_rules, base_subfolder)
    plan = plan_with(ckpt, loaded, merge_options(loaded, weights, combination, density, seed, heads_from,
                                                 pattern_rules, adapter_name, base_subfolder=base_subfolder))
    budget.check_budget(plan, max_memory)
    opts = ExecOptions(resolve_device(device), workers or budget.default_workers(), max_memory,
                       check_finite=not allow_nonfinite)
    if isinstance(part, str):
        part = parse_part(part)
    tasks = plan.tasks() if part is None else tuple(t for s in shards_of(plan, part) for t in s.tasks)
    from streammerge import execute
    from streammerge.formats.reader import TensorReader

    # the piece generator (thread pool, views of the reader's maps) is closed before the maps, however the
    # consumer stops: an exception, an early break, or dropping this generator
    with TensorReader() as reader, contextlib.closing(execute.whole_tensors(tasks, reader, opts)) as stream:
        yield from stream
