"""The options that change a merge's bytes, recorded once and replayed once.

:class:`MergeOptions` is what the API builds from its keyword arguments, what the CLI's flags become, what
the manifest records (``streammerge.json`` ``"options"``, part of every shard's identity) and what ``verify``
and ``--resume`` read back to rebuild the exact plan. Execution settings that do not change bytes
(workers, memory budget) are not here; the device class is recorded beside them because CPU and CUDA
arithmetic may round differently.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

#: Options added after the first release: recorded only when set, so that a manifest written by an
#: older release (which never had them) still describes the same plan, and its shards still resume.
_RECORDED_WHEN_SET = ("adapter_name", "heads_from", "base_subfolder")


@dataclass(frozen=True, slots=True)
class MergeOptions:
    """Everything besides the inputs themselves that a merge's (or unmerge's) bytes depend on."""

    operation: str = "merge"  # merge | unmerge
    weights: tuple[float, ...] | None = None  # one per adapter; None: plain (PEFT's own merge for one adapter)
    combination: str | None = None  # cat | ties | dare_linear | dare_ties | magnitude_prune
    density: float | None = None
    seed: int = 0
    heads_from: int | None = None  # resolved adapter index whose saved heads win
    pattern_rules: str = "current"  # current | 0.14 | pre-0.14
    adapter_name: str | None = None  # sub-adapter of a multi-adapter directory
    max_shard_size: int | None = None
    allow_nonfinite: bool = False
    weight: float | None = None  # unmerge only: the weight the adapter was merged with
    original_base: str | None = None  # unmerge only: the original base that full tensors come from
    base_subfolder: str | None = None
    dequantize: bool = False  # a quantized base: write it dequantized (else keep its format)

    def record(self, device_type: str) -> dict[str, object]:
        """The JSON value the manifest stores (and shard identities hash), keyed as earlier releases keyed it."""
        if self.operation == "unmerge":
            doc: dict[str, object] = {"operation": "unmerge", "weight": self.weight,
                                      "max_shard_size": self.max_shard_size, "original_base": self.original_base}
        else:
            doc = {"operation": "merge", "max_shard_size": self.max_shard_size,
                   "weights": list(self.weights or []), "combination": self.combination,
                   "density": self.density, "seed": self.seed, "pattern_rules": self.pattern_rules}
        for name in _RECORDED_WHEN_SET:
            value = getattr(self, name)
            if value is not None:
                doc[name] = value
        if self.dequantize:  # recorded only when set: older manifests describe the same plans
            doc["dequantize"] = True
        doc["allow_nonfinite"] = self.allow_nonfinite
        doc["device"] = device_type
        return doc

    @classmethod
    def from_record(cls, doc: Mapping[str, object]) -> MergeOptions:
        """The options a manifest recorded; a missing or mistyped value takes its default."""
        values: dict[str, object] = {}
        for name, kinds in _TYPES.items():
            value = doc.get(name)
            if isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds):
                values[name] = value
        weights = doc.get("weights")
        if isinstance(weights, list) and weights and all(isinstance(w, (int, float)) for w in weights):
            values["weights"] = tuple(float(w) for w in weights)
        return cls(**values)  # type: ignore[arg-type]


_TYPES: dict[str, tuple[type, ...]] = {
    "operation": (str,), "combination": (str,), "density": (int, float), "seed": (int,), "heads_from": (int,),
    "pattern_rules": (str,), "adapter_name": (str,), "max_shard_size": (int,), "allow_nonfinite": (bool,),
    "weight": (int, float), "original_base": (str,), "base_subfolder": (str,),
    "dequantize": (bool,),
}
