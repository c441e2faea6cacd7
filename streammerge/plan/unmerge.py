"""Take an adapter back out of a merged checkpoint: W ← rnd(M − w·ΔW), or the original tensor from a base. Pure."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace

from streammerge import naming
from streammerge.adapter import Adapter
from streammerge.checkpoint import Checkpoint
from streammerge.errors import PlanError, UnsupportedAdapterError
from streammerge.formats.refs import tensor_ref
from streammerge.plan.assemble import assemble
from streammerge.plan.combined import plan_each, retag
from streammerge.plan.draft import Draft, PlanContext, Target
from streammerge.plan.steps import Step
from streammerge.plan.types import Plan, PlanOptions
from streammerge.tuners import TUNERS


def _touched(adapter: Adapter, ctx: PlanContext) -> list[str]:
    """Base tensors any key of ``adapter`` changes (for restoring them from an original base)."""
    if adapter.config.peft_type in TUNERS:  # the tuner's own plan knows (a bias too, for IA³ and RoAd)
        (one,) = plan_each(ctx, [adapter])
        return [n for n, t in one.targets.items() if t.steps or t.replacement is not None]
    out = []
    for key in adapter.weights.names():
        k = naming.parse_key(key)
        if k.role == "original_module":
            continue
        name = k.target if k.role == "tensor" else f"{k.module}.{'bias' if k.role == 'lora_B_bias' else 'weight'}"
        target = ctx.resolve(name)
        if target is not None and target not in out:
            out.append(target)
    return out


def _no_inverse(adapter: Adapter) -> str | None:
    """Why merging ``adapter`` as a whole cannot be undone by subtraction, or None when it can."""
    tuner = TUNERS.get(adapter.config.peft_type)
    if tuner is not None:
        return None if tuner.invert is not None else tuner.no_inverse
    roles = {naming.parse_key(k).role for k in adapter.weights.names()}
    if adapter.config.use_dora or "magnitude" in roles:
        return "DoRA rescales each column by a norm of the merged weight, so W cannot be solved back exactly"
    if "token_delta" in roles:
        return "trainable tokens replace embedding rows, and the old rows are not in the merged checkpoint"
    return None


def build_unmerge_plan(merged: Checkpoint, adapter: Adapter, weight: float = 1.0, base: Checkpoint | None = None,
                       options: PlanOptions | None = None) -> Plan:
    """Plan W ← rnd(M − w·ΔW) for every tensor ``adapter`` changed in the merged checkpoint ``merged``.

    One rounding of the fp32 difference per tensor (whatever the layer type), so every element of
    the result is within ½ ulp(M) + ½ ulp(W) of the original base value W (README, "Unmerge").
    Tensors with no exact inverse (full-tensor replacements such as saved heads and
    ``base_layer`` copies; every tensor of a DoRA or trainable-token adapter) are taken from
    ``base`` when it is given, and refused otherwise.

    Raises:
        UnsupportedAdapterError: a tensor with no inverse and no ``base``; an adapter that changed
            the model's layout (added or dropped tensors).
        PlanError: what ``build_plan`` raises; base tensors whose shape or dtype differ.
    """
    options = options or PlanOptions()
    if not math.isfinite(weight):
        raise PlanError(f"`weight` {weight}: must be a finite number")
    ctx = PlanContext.of(merged)
    reason = _no_inverse(adapter)
    if adapter.config.peft_type in TUNERS and weight != 1.0:
        raise UnsupportedAdapterError(
            f"{adapter.root}: cannot unmerge a {adapter.config.peft_type} adapter with weight {weight}: PEFT's unmerge "
            "undoes the whole adapter, and a fraction of it is not defined for this tuner; use weight 1"
        )
    if reason is not None:
        if base is None:
            raise UnsupportedAdapterError(
                f"{adapter.root}: cannot unmerge: {reason}; pass `base` ORIGINAL to take the tensors it changed "
                "from the original base checkpoint"
            )
        out = Draft()
        out.targets.update(_restore_from(base, dict.fromkeys(_touched(adapter, ctx)), ctx, out.problems))
        return assemble(ctx, out, options, [adapter])

    (one,) = plan_each(ctx, [adapter])
    if one.added or one.drop:
        raise UnsupportedAdapterError(
            f"{adapter.root}: cannot unmerge: this adapter changed the model's layout (added "
            f"{sorted(one.added) or 'nothing'}, dropped {sorted(one.drop) or 'nothing'}: a task head or an untied "
            "head); use the original base checkpoint instead"
        )
    full = [n for n, t in one.targets.items() if t.replacement is not None]
    if full and base is None:
        raise UnsupportedAdapterError(
            f"{adapter.root}: cannot unmerge {full[0]!r}"
            + (f" (and {len(full) - 1} more)" if len(full) > 1 else "")
            + ": the adapter replaced it with a full tensor (modules_to_save, a saved head or layer), so the original "
            "is not in the merged checkpoint; pass `base` ORIGINAL to take such tensors from the original base"
        )
    out = Draft(problems=one.problems, warnings=list(one.warnings))
    if full:
        out.targets.update(_restore_from(base, dict.fromkeys(full), ctx, out.problems))
    for name, t in one.targets.items():
        if name in out.targets:
            continue
        out.targets[name] = Target(steps=_inverse_steps(t, weight))
    return assemble(ctx, out, options, [adapter])


def _inverse_steps(t: Target, weight: float) -> list:
    """The steps that take ``t``'s merge back out: rnd(M − w·ΣΔ) for LoRA terms (one rounding), or each tuner's
    own inverse (PEFT's unmerge), the last merged first."""
    ordered = sorted(t.steps, key=lambda s: s[0])
    if any(step.rounding == "tuner" for _, _, step in ordered):
        return [((0, ""), 0, Step((replace(step.terms[0], inverse=True),), "tuner"))
                for _, _, step in reversed(ordered)]
    terms = tuple(retag(term, -weight, 0) for _, _, step in ordered for term in step.terms)
    return [((0, ""), 0, Step(terms, "once"))] if terms else []


def _restore_from(base: Checkpoint | None, names: Mapping[str, None], ctx: PlanContext,
                  problems: list[str]) -> dict[str, Target]:
    """Targets whose output is the original base tensor, unchanged."""
    assert base is not None
    originals = base.locate()
    out = {}
    for name in names:
        if name not in originals:
            problems.append(f"{base.root}: `base` has no tensor {name!r} to restore; is it the original base?")
            continue
        shard_no, info = originals[name]
        have = ctx.info(name)
        if (info.shape, info.dtype) != (have.shape, have.dtype):
            problems.append(
                f"{base.root}: tensor {name!r} is {info.dtype}{list(info.shape)} in `base` but "
                f"{have.dtype}{list(have.shape)} in the merged checkpoint; is it the original base?"
            )
            continue
        out[name] = Target(replacement=tensor_ref(base.shards[shard_no], info))
    return out
