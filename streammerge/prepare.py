"""What every entry point (merge, unmerge, ``iter_merged``, ``verify``) does before it writes or computes:
read the inputs, turn the API's arguments into recorded options and a plan, and resolve the device.

Reads headers and configs only; torch is imported only to resolve a device other than the CPU.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from streammerge.adapter import Adapter, read_adapter
from streammerge.checkpoint import Checkpoint
from streammerge.errors import StreamMergeError
from streammerge.locate import find_base, read_base
from streammerge.options import MergeOptions
from streammerge.plan import CombineOptions, Plan, PlanOptions
from streammerge.plan.assemble import build_plan
from streammerge.plan.combined import build_combined_plan

if TYPE_CHECKING:
    import torch

LOG = logging.getLogger(__name__)

#: Default working-memory budget for merge blocks (see ``execute``): with the interpreter and
#: torch (~250 MB) a merge stays under 1 GB of RSS whatever the model size.
DEFAULT_MAX_MEMORY = 512 * 10**6

PathLike = str | Path
#: An adapter directory, or ``(directory, weight)`` for a weighted combination.
AdapterSpec = PathLike | tuple[PathLike, float]


#: Device nodes of a GPU driver (NVIDIA, AMD ROCm, WSL): without any, torch cannot see a GPU.
_GPU_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia", "/dev/kfd", "/dev/dxg")


def device_name(device: str | torch.device) -> str:
    """The device a merge runs on, as torch names it (``cpu``, ``cuda``, ``cuda:1``). ``auto`` on a
    machine with no GPU driver is ``cpu`` without importing torch; anything else asks torch."""
    if str(device) == "cpu" or (str(device) == "auto" and not any(os.path.exists(p) for p in _GPU_NODES)):
        return "cpu"
    return str(resolve_device(device))


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` → CUDA when available, else CPU."""
    import torch

    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise StreamMergeError(f"`device` {device}: CUDA is not available here; use `device` cpu or auto")
    return dev



def load_inputs(
    base: PathLike | None, adapters: Sequence[PathLike], adapter_name: str | None, pattern_rules: str = "current",
    base_subfolder: str | None = None,
) -> tuple[Checkpoint, list[Adapter]]:
    if not adapters:
        raise StreamMergeError("no adapter given; pass `adapters` DIR")
    loaded = [read_adapter(a, adapter_name, pattern_rules) for a in adapters]
    base_path = Path(base) if base is not None else find_base(loaded[0])
    LOG.debug("base checkpoint: %s", base_path.resolve())
    return read_base(base_path, "base", base_subfolder), loaded



def adapter_specs(
    adapter: PathLike | None, adapters: Sequence[AdapterSpec], weights: Sequence[float] | None
) -> tuple[list[PathLike], list[float] | None]:
    """Split ``adapters`` (paths or ``(path, weight)``) into paths and weights (None: all plain paths)."""
    specs = ([adapter] if adapter is not None else []) + list(adapters)
    paths = [s[0] if isinstance(s, tuple) else s for s in specs]
    inline = [float(s[1]) if isinstance(s, tuple) else None for s in specs]
    if weights is not None:
        if any(w is not None for w in inline):
            raise StreamMergeError("give adapter weights either as (path, weight) pairs or as weights=, not both")
        return paths, [float(w) for w in weights]
    if all(w is None for w in inline):
        return paths, None
    return paths, [1.0 if w is None else w for w in inline]


def resolve_heads_from(value: str | int | None, adapters: Sequence[Adapter]) -> int | None:
    """``--heads-from`` as an adapter index: an index, a directory name or a path of one of ``adapters``."""
    if value is None:
        return None
    text = str(value)
    if text.isdigit() and int(text) < len(adapters):
        return int(text)
    found = [i for i, a in enumerate(adapters) if text in (a.root.name, str(a.root)) or Path(text) == a.root]
    if len(found) != 1:
        names = ", ".join(f"{i} ({a.root.name})" for i, a in enumerate(adapters))
        what = "names several adapters" if found else "is not one of the adapters"
        raise StreamMergeError(f"`heads_from` {text!r} {what}; use an index or directory name: {names}")
    return found[0]


def merge_options(
    loaded: Sequence[Adapter], weights: Sequence[float] | None = None, combination: str | None = None,
    density: float | None = None, seed: int = 0, heads_from: str | int | None = None, pattern_rules: str = "current",
    adapter_name: str | None = None, max_shard_size: int | None = None, allow_nonfinite: bool = False,
    base_subfolder: str | None = None,
    dequantize: bool = False,
) -> MergeOptions:
    """The recorded options of a merge of ``loaded`` from the API's arguments (``heads_from`` resolved)."""
    return MergeOptions(
        weights=tuple(float(w) for w in weights) if weights is not None else None, combination=combination,
        density=density, seed=int(seed), heads_from=resolve_heads_from(heads_from, loaded),
        pattern_rules=pattern_rules, adapter_name=adapter_name, max_shard_size=max_shard_size,
        allow_nonfinite=allow_nonfinite, base_subfolder=base_subfolder or None, dequantize=dequantize,
    )


def plan_with(ckpt: Checkpoint, loaded: Sequence[Adapter], options: MergeOptions) -> Plan:
    """The plan of a merge with recorded ``options``: one plain adapter is PEFT's own merge (``build_plan``);
    several, weights or a combination: ``build_combined_plan``."""
    plan_options = PlanOptions(max_shard_size=options.max_shard_size, dequantize=options.dequantize)
    weights, combination, density = options.weights, options.combination, options.density
    plain = weights is None or all(w == 1.0 for w in weights)
    if combination is None and len(loaded) == 1 and plain and options.heads_from is None:
        return build_plan(ckpt, loaded, plan_options)
    method = combination or "cat"
    if method != "cat" and density is None:
        raise StreamMergeError(
            f"`combination` {method} needs `density` (the fraction of each adapter's delta kept, e.g. 0.5)"
        )
    combine = CombineOptions(
        weights=tuple(weights) if weights is not None else (1.0,) * len(loaded), method=method,
        density=1.0 if density is None else float(density), seed=options.seed, heads_from=options.heads_from,
    )
    return build_combined_plan(ckpt, loaded, combine, plan_options)
