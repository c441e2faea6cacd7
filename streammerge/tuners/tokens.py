"""Trainable tokens (PEFT ``trainable_token_indices``, spec §3.8): stored rows replace rows of an embedding or head."""

from __future__ import annotations

from streammerge import naming
from streammerge.plan.draft import AdapterInput, Draft, Order, PlanContext
from streammerge.plan.steps import LoraTerm, Step
from streammerge.plan.targeting import resolve_target


def plan_tokens(ctx: PlanContext, src: AdapterInput, draft: Draft, module: str, key: naming.AdapterKey,
                order: Order) -> None:
    """The stored rows (n, d) replace rows ``idx`` of the embedding/head (``kernel.replace_rows``)."""
    indices = src.adapter.config.token_indices_for(module)
    info = src.infos[key.key]
    target = resolve_target(ctx, src, draft, module, "weight", "trainable tokens")
    if target is None or indices is None:
        return
    shape = draft.shape_of(target, ctx.info(target))
    bad = [i for i in indices if not 0 <= i < shape[0]]
    if len(shape) != 2 or info.shape != (len(indices), shape[1]) or bad or len(set(indices)) != len(indices):
        draft.problems.append(
            f"{src.where}: {key.key!r} has shape {info.shape} but trainable_token_indices gives "
            f"{len(indices)} distinct row(s) of {target!r} {shape}"
            + (f" (out of range: {bad[:5]})" if bad else "") + "; the config and weights disagree"
        )
        return
    term = LoraTerm("rows", None, src.ref(info), 1.0, origin=module, indices=indices)
    draft.add_step(target, order, src.index, Step((term,), "rows"))
