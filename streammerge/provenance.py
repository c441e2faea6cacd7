"""What a merged output's manifest says about how it was made: ``unmerge``'s checks before it plans.

``streammerge.json`` records every merged adapter by content (SHA-256 of ``adapter_config.json`` and of its
weights file), the weights and the combination. ``unmerge`` takes one adapter back out, which is only sound
when that adapter was merged, with the weight it is taken out with, by a linear combination:

* the default weight is the recorded one (``weights[i]``, or 1 when none was given);
* an adapter that is not among the recorded inputs, or a weight other than the recorded one, is refused
  (``force`` turns both into warnings, which the output's manifest records);
* ``ties``, ``dare_*`` and ``magnitude_prune`` prune and rescale per element: no inverse, always refused.

Without a manifest nothing can be checked: a warning says so (and is recorded too). The caller logs the
warnings; nothing here prints.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from streammerge import manifest
from streammerge.adapter import CONFIG_NAME, Adapter
from streammerge.errors import PlanError
from streammerge.identity import file_sha256

#: Combinations whose result has no inverse: each adapter's delta was pruned/rescaled per element.
NON_INVERTIBLE = ("ties", "dare_linear", "dare_ties", "magnitude_prune")


@dataclass(frozen=True, slots=True)
class UnmergeCheck:
    """The weight to unmerge with and the warnings to record (``force``d checks, or nothing to check)."""

    weight: float
    warnings: tuple[str, ...]


def check_unmerge(merged: Path, adapter: Adapter, weight: float | None, *, force: bool = False) -> UnmergeCheck:
    """Check ``adapter`` (and ``weight``; None: the recorded one) against ``merged``'s manifest.

    Raises:
        PlanError: the combination has no inverse; or, unless ``force``, the adapter is not among the
            recorded inputs or ``weight`` is not the recorded weight.
    """
    doc = manifest.read_json_file(merged / manifest.MANIFEST_NAME)
    if doc is None:
        used = 1.0 if weight is None else float(weight)
        return UnmergeCheck(used, (
            f"{merged}: no {manifest.MANIFEST_NAME}, so it cannot be checked that {adapter.root} was merged into it, "
            f"nor with which weight; unmerging with weight {used:g}",))
    options = doc.get("options") if isinstance(doc.get("options"), dict) else {}
    combination = options.get("combination")
    if combination in NON_INVERTIBLE:
        raise PlanError(
            f"{merged}: was merged with combination {combination!r}, which prunes and rescales each adapter's delta "
            "per element; it has no inverse, so no adapter can be taken back out: merge again from the base instead"
        )
    if options.get("operation", "merge") != "merge":
        return _refuse_or_warn(force, weight, (
            f"{merged}: its manifest records an {options.get('operation')}, not a merge, so {adapter.root} was not "
            "merged into it"))
    index = _recorded_index(doc, adapter)
    if index is None:
        return _refuse_or_warn(force, weight, (
            f"{adapter.root}: not among the adapters {merged / manifest.MANIFEST_NAME} records as merged (compared by "
            "the SHA-256 of adapter_config.json and of the weights); pass the adapter that was merged"))
    weights = options.get("weights") or []
    recorded = float(weights[index]) if index < len(weights) else 1.0
    if weight is None or float(weight) == recorded:
        return UnmergeCheck(recorded, ())
    return _refuse_or_warn(force, weight, (
        f"{merged}: its manifest records {adapter.root} merged with weight {recorded:g}, not {float(weight):g}; "
        "leave `weight` out to use the recorded one"))


def _recorded_index(doc: dict, adapter: Adapter) -> int | None:
    inputs = doc.get("inputs") if isinstance(doc.get("inputs"), dict) else {}
    recorded = inputs.get("adapters") if isinstance(inputs.get("adapters"), list) else []
    config = file_sha256(adapter.root / CONFIG_NAME)
    weights = file_sha256(Path(adapter.weights.path))
    for i, rec in enumerate(recorded):
        if isinstance(rec, dict) and rec.get("config_sha256") == config and rec.get("weights_sha256") == weights:
            return i
    return None


def _refuse_or_warn(force: bool, weight: float | None, reason: str) -> UnmergeCheck:
    if not force:
        raise PlanError(f"{reason}; or pass `force` to unmerge anyway")
    used = 1.0 if weight is None else float(weight)
    return UnmergeCheck(used, (f"forced: {reason}; unmerged with weight {used:g}",))
