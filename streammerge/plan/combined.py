"""Several adapters with weights: one planned Step per tensor, one rounding (``--weights/--combination``). Pure.

``cat``: W ← rnd(W + Σᵢ wᵢ·ΔWᵢ) with ΔWᵢ = sᵢ·Bᵢ@Aᵢ (each adapter's own scale, rank, patterns and layout),
summed in fp32: exact up to that one rounding. The other methods apply a task-vector operator to {ΔWᵢ} per
tensor (``streammerge.combine``). Full tensors (saved heads) are never blended; DoRA adapters are never combined.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

from streammerge import naming
from streammerge.adapter import Adapter
from streammerge.checkpoint import Checkpoint
from streammerge.errors import PlanError, UnsupportedAdapterError
from streammerge.formats.refs import TensorRef
from streammerge.plan.assemble import assemble, plan_adapter
from streammerge.plan.draft import AdapterInput, Draft, PlanContext, Target
from streammerge.plan.steps import COMBINATIONS, Combination, LoraTerm, Step
from streammerge.plan.types import CombineOptions, Plan, PlanOptions
from streammerge.tuners import TUNERS


def plan_each(ctx: PlanContext, adapters: Sequence[Adapter]) -> list[Draft]:
    """One draft per adapter, planned alone (their problems are reported together by ``assemble``)."""
    drafts = []
    for i, adapter in enumerate(adapters):
        draft = Draft()
        plan_adapter(ctx, AdapterInput.of(i, adapter), draft)
        drafts.append(draft)
    return drafts


def _check_combination(adapters: Sequence[Adapter], combine: CombineOptions) -> None:
    if len(combine.weights) != len(adapters):
        raise PlanError(
            f"`weights` has {len(combine.weights)} value(s) for {len(adapters)} adapter(s); give one weight per "
            "adapter, in the same order (e.g. `weights` 0.7,0.3)"
        )
    if combine.method not in COMBINATIONS:
        raise PlanError(f"`combination` {combine.method!r} is not one of {', '.join(COMBINATIONS)}")
    if not all(math.isfinite(w) for w in combine.weights):
        raise PlanError(f"`weights` {combine.weights}: every weight must be a finite number")
    if combine.method != "cat" and not 0 < combine.density <= 1:
        raise PlanError(f"`density` {combine.density}: must be in (0, 1] (the fraction of each task vector kept)")
    if combine.heads_from is not None and not 0 <= combine.heads_from < len(adapters):
        raise PlanError(f"`heads_from` {combine.heads_from}: there are only {len(adapters)} adapters")
    tuned = [a for a in adapters if a.config.peft_type in TUNERS]
    if tuned:
        raise UnsupportedAdapterError(
            f"{tuned[0].root}: a {tuned[0].config.peft_type} adapter cannot be weighted or combined with other "
            "adapters: its merge is not a low-rank delta that scales or sums (PEFT's add_weighted_adapter is "
            "LoRA-only); merge it alone"
        )
    tokens = [a for a in adapters if any(naming.parse_key(k).role == "token_delta" for k in a.weights.names())]
    if tokens and len(adapters) > 1:
        raise UnsupportedAdapterError(
            f"{tokens[0].root}: trainable tokens cannot be combined with other adapters: they replace embedding "
            "rows outright, so there is nothing to weigh; merge that adapter alone"
        )
    dora = [a for a in adapters if a.config.use_dora]
    if dora and len(adapters) > 1:
        raise UnsupportedAdapterError(
            f"{dora[0].root}: a DoRA adapter cannot be combined with other adapters: DoRA rescales each column "
            "to a magnitude learned for its own direction, so a weighted sum of DoRA updates is not any adapter's "
            "result (PEFT's add_weighted_adapter re-initialises the magnitude from the base); merge it alone"
        )


def _label(adapters: Sequence[Adapter], i: int) -> str:
    return f"#{i} {adapters[i].root.name or adapters[i].root}"


def _pick_full(name: str, holders: Sequence[tuple[int, TensorRef]], adapters: Sequence[Adapter],
               heads_from: int | None, problems: list[str]) -> TensorRef | None:
    """Heads are never blended: one adapter's full tensor, chosen by ``heads_from`` when several carry one."""
    if len(holders) <= 1:
        return holders[0][1] if holders else None
    for i, ref in holders:
        if i == heads_from:
            return ref
    who = ", ".join(_label(adapters, i) for i, _ in holders)
    if heads_from is None:
        problems.append(
            f"tensor {name!r} is a full tensor (modules_to_save, a saved head or a saved layer) in adapters {who}; "
            "heads are never blended: pass `heads_from` NAME (adapter directory name or index) to take it from one"
        )
    else:
        problems.append(
            f"`heads_from` {_label(adapters, heads_from)} does not carry tensor {name!r}; adapters {who} do"
        )
    return None


def build_combined_plan(ckpt: Checkpoint, adapters: Sequence[Adapter], combine: CombineOptions,
                        options: PlanOptions | None = None) -> Plan:
    """Plan a weighted combination of ``adapters`` merged into ``ckpt`` with one rounding per tensor.

    Raises:
        PlanError: what ``build_plan`` raises, and full tensors carried by several adapters without
            ``heads_from``.
        UnsupportedAdapterError: DoRA in a combination, and whatever ``build_plan`` refuses.
    """
    _check_combination(adapters, combine)
    ctx = PlanContext.of(ckpt)
    each = plan_each(ctx, adapters)
    out = Draft(problems=[p for one in each for p in one.problems])

    for name in dict.fromkeys(n for one in each for n in one.targets):
        slots = [(i, one.targets[name]) for i, one in enumerate(each) if name in one.targets]
        holders = [(i, s.replacement) for i, s in slots if s.replacement is not None]
        target = Target(replacement=_pick_full(name, holders, adapters, combine.heads_from, out.problems))
        step = _combined_step(name, slots, combine)
        if step is not None:
            target.steps.append(((0, ""), 0, step))
        out.targets[name] = target
    for name in dict.fromkeys(n for one in each for n in one.added):
        holders = [(i, one.added[name]) for i, one in enumerate(each) if name in one.added]
        ref = _pick_full(name, holders, adapters, combine.heads_from, out.problems)
        if ref is not None:
            out.added[name] = ref
    order = sorted(range(len(each)), key=lambda i: i == combine.heads_from)  # the chosen heads' config last
    for i in order:
        out.config_updates |= each[i].config_updates
    out.warnings = [f"{_label(adapters, i)}: {w}" for i, one in enumerate(each) for w in one.warnings]
    out.warnings += _peft_difference_warnings(adapters, combine)
    out.drop = set().union(*(one.drop for one in each))
    return assemble(ctx, out, options or PlanOptions(), adapters)


def _combined_step(name: str, slots: Sequence[tuple[int, Target]], combine: CombineOptions) -> Step | None:
    """All adapters' terms for one tensor in one Step: one rounding, each term tagged with its adapter."""
    cat = combine.method == "cat"
    terms = tuple(
        retag(term, combine.weights[i] if cat else 1.0, i)
        for i, target in slots
        for _, _, step in sorted(target.steps, key=lambda s: s[0])
        for term in step.terms
    )
    if not terms:
        return None
    if cat:
        return Step(terms, "once")
    combination = Combination(combine.method, combine.weights, combine.density, combine.seed, name,
                              combine.majority_sign)
    return Step(terms, "once", combination)


def retag(term: LoraTerm, weight: float, task: int) -> LoraTerm:
    """``term`` scaled by the user's ``weight`` and tagged as belonging to adapter ``task``."""
    return replace(term, weight=term.weight * weight, task=task)


def _peft_difference_warnings(adapters: Sequence[Adapter], combine: CombineOptions) -> list[str]:
    """Where PEFT's ``add_weighted_adapter`` computes something else (spec §4, §0.5(c))."""
    if combine.method == "cat" and adapters and adapters[0].config.use_rslora:
        ranks = sum(max([a.config.r, *(r for _, r in a.config.rank_pattern)]) for a in adapters)
        return [
            f"{adapters[0].root}: use_rslora=true: PEFT 0.21's add_weighted_adapter(combination_type='cat') would "
            f"scale the combined adapter by sqrt(r')={math.sqrt(ranks):.4g} too much (huggingface/peft#3761); "
            "streammerge applies each adapter's own alpha/sqrt(r), the intended result"
        ]
    return []
