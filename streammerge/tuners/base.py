"""The ``Tuner`` protocol: what one PEFT tuner (LoHa, IA³, OFT, …) tells the planner and the kernel.

A tuner is one file under ``streammerge/tuners/`` ending in ``TUNER = Tuner(...)`` and one line in the
registry (``TUNERS`` in ``streammerge/tuners/__init__.py``). The planner (``plan.tuned``) and the kernel
(``kernel.merge_block``) never name a tuner; they call these hooks:

* ``peft_type`` and ``suffixes`` (role -> key suffix after the module path, e.g. ``"w1a": ".hada_w1_a"``)
  classify the adapter's keys (``classify``); ``shared`` names keys without a module (VeRA's projections).
* ``plan(view) -> [Update]``: per module, from headers only (shapes, dtypes, the config): which base
  tensors change (``"weight"``, and ``"bias"`` for IA³/RoAd), with what parameters, whether row blocks
  are exact, and how much fp32 scratch a whole-tensor update needs. Problems (shape or config
  disagreements, a layer type PEFT cannot merge for this tuner) go to ``view.problems``: the planner
  reports them all together (``PlanError``, exit 2).
* ``alpha_field``/``ranked``: the view carries r (and α/r) from ``r``/``rank_pattern``/``alpha_pattern``.
* ``apply(w, t, params, r0, r1) -> Tensor``: rows ``[r0, r1)`` of the merged tensor (``w`` holds those
  rows in the output dtype, ``t`` the module's adapter tensors in fp32, as PEFT holds them after
  ``cast_adapter_dtype``; integer tensors as stored). Returns a new tensor in ``w``'s dtype.
* ``invert``: the same for PEFT's ``unmerge`` (None: unmerge refuses by name, giving ``no_inverse``).

Everything numeric lives in the tuner's own functions, which replay PEFT's ops in PEFT's order
(``tests/test_tuner_deltas.py`` checks each against PEFT's layer, ``tests/test_parity_tuners.py`` end to end).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from streammerge.plan.steps import TunerTerm, Update
from streammerge.tuners.lazy import torch

__all__ = ["ApplyFn", "LoadedTerm", "ModuleView", "Shape", "Tuner", "TunerTerm", "Update", "in_features",
           "out_features"]

#: The merged rows: ``apply(w, tensors, params, r0, r1)``.
ApplyFn = Callable[["torch.Tensor", Mapping[str, "torch.Tensor"], Mapping[str, Any], int, int], "torch.Tensor"]


@dataclass(frozen=True, slots=True)
class Shape:
    """A tensor's header facts (no data)."""

    shape: tuple[int, ...]
    dtype: str


@dataclass
class ModuleView:
    """What a tuner's ``plan`` sees of one adapted module (headers and config only)."""

    where: str  # the adapter weights file, for messages
    module: str  # module path, e.g. "model.layers.0.self_attn.q_proj"
    keys: Mapping[str, str]  # role -> adapter key
    tensors: Mapping[str, Shape]  # role -> the adapter tensor's shape/dtype
    weight: Shape  # the base ``<module>.weight``
    bias: Shape | None  # the base ``<module>.bias``, when the checkpoint has one
    config: Mapping[str, Any]  # adapter_config.json
    conv1d: bool  # HF Conv1D (weight stored (in, out)): PEFT forces fan_in_fan_out
    rank: int | None  # r from r/rank_pattern for this module (PEFT's get_pattern_key)
    scale: float | None  # α/r from alpha/alpha_pattern (LoHa, LoKr)
    problems: list[str] = field(default_factory=list)
    extent: tuple[tuple[Shape, bool], ...] = ()  # (base weight, conv1d) of every module the adapter adapts

    def problem(self, text: str) -> None:
        self.problems.append(f"{self.where}: module {self.module!r}: {text}")

    def need(self, *roles: str) -> bool:
        """Record a problem for each missing role; True when all are present."""
        missing = [r for r in roles if r not in self.tensors]
        if missing:
            have = next(iter(self.keys.values()), "?")
            self.problem(f"has {have!r} but no {', '.join(missing)} tensor; the adapter file is incomplete: re-save it")
        return not missing


@dataclass(frozen=True)
class Tuner:
    peft_type: str
    suffixes: Mapping[str, str]  # role -> key suffix after the module path
    plan: Callable[[ModuleView], list[Update]]
    apply: ApplyFn
    invert: ApplyFn | None = None
    shared: Mapping[str, str] = field(default_factory=dict)  # role -> whole key (no module path)
    alpha_field: str | None = None  # config field holding α for rank/alpha patterns (LoHa, LoKr: "alpha")
    ranked: bool = False  # r / rank_pattern apply per module (DeLoRA; implied by alpha_field)
    no_inverse: str = ""  # why ``invert`` is None, for the refusal

    def classify(self, stem: str) -> tuple[str, str] | None:
        """(module, role) of a key stem (``base_model.model.`` removed), or None if not this tuner's."""
        for role, suffix in sorted(self.suffixes.items(), key=lambda kv: -len(kv[1])):
            if stem.endswith(suffix):
                return stem[: -len(suffix)], role
        return None


def in_features(w: Shape, conv1d: bool) -> int:
    """The input width PEFT's layer uses: W (out, in) | HF Conv1D (in, out) | conv (out, in, *k) -> in·∏k."""
    if conv1d:
        return w.shape[0]
    n = 1
    for d in w.shape[1:]:
        n *= d
    return n


def out_features(w: Shape, conv1d: bool) -> int:
    return w.shape[1] if conv1d else w.shape[0]


@dataclass(frozen=True, slots=True)
class LoadedTerm:
    """A ``TunerTerm`` with its tensors read (fp32 floats, integers as stored) on the compute device."""

    fn: ApplyFn
    tensors: Mapping[str, torch.Tensor]
    params: Mapping[str, Any]

    def __call__(self, w: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        return self.fn(w, self.tensors, self.params, r0, r1)
