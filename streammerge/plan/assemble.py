"""The planner's entry point: headers and configs in, a frozen :class:`~streammerge.plan.types.Plan` out.

Pure: no torch, no file I/O. Every adapter key is accounted for: it becomes part of a
:class:`~streammerge.plan.types.LoraTerm` or :class:`~streammerge.plan.types.TunerTerm`, a replacement
source, or an error. Every base tensor appears in the output exactly once (or is dropped for a stated reason,
like ``lm_head`` under a sequence-classification head). All problems found are reported together.

Ordering (PEFT ``merge_and_unload``, spec §3): saved tensors (``base_layer`` copies, biases,
``modules_to_save``) replace base values first (PEFT's ``load_state_dict``), then deltas are added module
by module in ``named_modules`` order, one rounding per :class:`~streammerge.plan.types.Step`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from streammerge import naming
from streammerge.adapter import Adapter
from streammerge.checkpoint import Checkpoint
from streammerge.errors import PlanError, UnsupportedAdapterError
from streammerge.formats.dtypes import FLOAT_DTYPES
from streammerge.formats.refs import TensorRef, tensor_ref
from streammerge.plan.draft import AdapterInput, Draft, PlanContext, Target
from streammerge.plan.heads import check_resized, plan_replacement
from streammerge.plan.quantized import advice, apply_quantization
from streammerge.plan.shards import layout
from streammerge.plan.targeting import check_targeting
from streammerge.plan.tuned import plan_tuned
from streammerge.plan.types import Plan, PlanOptions, TensorTask
from streammerge.tuners import TUNERS, experts, experts_v4, lora, tokens


def build_plan(ckpt: Checkpoint, adapters: Sequence[Adapter], options: PlanOptions | None = None) -> Plan:
    """Plan merging ``adapters`` (applied in order) into ``ckpt``.

    Raises:
        PlanError: every mismatch found (unknown keys, shapes, ranks), all in one message.
        UnsupportedAdapterError: a key or feature streammerge refuses, by name.
    """
    ctx = PlanContext.of(ckpt)
    draft = Draft()
    for index, adapter in enumerate(adapters):
        plan_adapter(ctx, AdapterInput.of(index, adapter), draft)
    return assemble(ctx, draft, options or PlanOptions(), adapters)


def plan_adapter(ctx: PlanContext, src: AdapterInput, draft: Draft) -> None:
    """Plan every key of one adapter into ``draft``."""
    cfg = src.adapter.config
    if cfg.peft_type in TUNERS:
        plan_tuned(ctx, src, draft)
        return
    keys = [k for k in map(naming.parse_key, src.adapter.weights.names()) if k.role != "original_module"]
    by_module: dict[str, dict[str, naming.AdapterKey]] = defaultdict(dict)

    refused = [k for k in keys if k.role == "other_lora"]
    if refused:
        raise UnsupportedAdapterError(
            f"{src.where}: this LoRA variant is not supported yet (tensor {refused[0].key!r}); "
            "merge this adapter with PEFT's merge_and_unload for now"
        )

    for k in keys:
        if k.role == "tensor":
            plan_replacement(ctx, src, draft, k)
        else:
            by_module[k.module][k.role] = k
    check_targeting(ctx, src, draft, by_module)
    drift = cfg.legacy_pattern_drift(sorted(m for m, roles in by_module.items() if roles.keys() & {"lora_A", "emb_A"}))
    if drift and cfg.pattern_rules == "current":
        draft.warnings.append(
            f"{src.where}: saved before PEFT 0.18 (no peft_version) with rank/alpha patterns, and {drift}; the merge "
            "follows PEFT >= 0.15 as PEFT 0.21 does; pass `pattern_rules` 0.14 or pre-0.14 to use the rules "
            "of the PEFT version that trained it"
        )

    if cfg.raw.get("target_parameters"):
        experts.plan_param_wrappers(ctx, src, draft, by_module)
    draft.warnings.extend(experts_v4.v4_warnings(src.where, cfg, ctx.model_type, by_module))
    for module, roles in sorted(by_module.items(), key=lambda kv: naming.module_order(kv[0])):
        lora.plan_module(ctx, src, draft, module, roles)
        if "token_delta" in roles:
            tokens.plan_tokens(ctx, src, draft, module, roles["token_delta"], naming.module_order(module))


def misfit_summary(ctx: PlanContext, adapters: Sequence[Adapter], count: int) -> str:
    """First line of a many-problem error: which adapters, what they were trained on, which base."""
    who = ", ".join(f"{a.root} (trained on {a.config.base_model_name_or_path!r})" if a.config.base_model_name_or_path
                    else str(a.root) for a in adapters) or "(none)"
    return f"{count} problems fitting the adapter(s) {who} to the base {ctx.ckpt.root}:"


def assemble(ctx: PlanContext, draft: Draft, options: PlanOptions, adapters: Sequence[Adapter] = ()) -> Plan:
    """Turn the per-tensor accumulators into the frozen plan (or raise every problem found: one, or a summary
    naming ``adapters`` and the problems one per line)."""
    targets = draft.targets
    warnings = list(draft.warnings)
    tied = draft.config_updates.get("tie_word_embeddings", True)
    faces: dict[str, list[str]] = {}
    for name, stored in ctx.aliases.items():
        faces.setdefault(stored, []).append(name)
    for stored, names in faces.items():
        if targets.get(stored) is not None and targets[stored].steps and tied:
            warnings.append(
                f"{stored!r} is tied to {', '.join(map(repr, names))} (tie_word_embeddings): its LoRA delta "
                "changes them all together, exactly as PEFT's merge does"
            )
    check_resized(ctx, draft)
    problems = draft.problems
    if len(problems) == 1:
        raise PlanError(problems[0])
    if problems:
        raise PlanError(misfit_summary(ctx, adapters, len(problems)), problems)

    tasks_by_name = {}
    for name in ctx.located:
        if name in draft.drop:
            continue
        tasks_by_name[name] = _task(name, ctx.ref(name), targets.get(name), ctx.aliases)
    for name, ref in draft.added.items():
        tasks_by_name[name] = TensorTask(name, _added_dtype(ctx.ckpt, ref), ref.shape, ref, kind="add")
    dropped, removals, quantization = set(draft.drop), (), None
    if ctx.ckpt.quant is not None:
        stored = {name: tensor_ref(ctx.ckpt.shards[i], info) for name, (i, info) in ctx.ckpt.locate().items()}
        gone, updates, removals, quantization = apply_quantization(ctx.ckpt.quant, ctx.ckpt.config, tasks_by_name,
                                                                   stored, options.dequantize)
        dropped |= gone
        draft.config_updates.update(updates)
        warnings.extend(advice(ctx.ckpt.quant, options.dequantize))

    shards = layout(ctx.ckpt, tasks_by_name, draft.added, dropped, options)
    return Plan(
        shards=shards,
        write_index=ctx.ckpt.has_index or len(shards) > 1,
        index_metadata=tuple((k, v) for k, v in ctx.ckpt.index_metadata.items() if k != "total_size"),
        config_updates=tuple(draft.config_updates.items()),
        warnings=tuple(warnings),
        dropped=tuple(sorted(dropped)),
        index_name=ctx.ckpt.index_name,
        config_removals=removals,
        quantization=quantization,
    )


def _task(name: str, base: TensorRef, target: Target | None, aliases: naming.Aliases) -> TensorTask:
    if target is None:
        return TensorTask(name, base.dtype, base.shape, base)
    source = target.replacement or base
    # adapters in order; within one, modules in PEFT's merge order (faces of a tie: named_modules order)
    steps = tuple(step for _, _, step in sorted(target.steps, key=lambda s: (s[1], aliases.face_order(s[0]))))
    kind = "merge" if steps else "replace"
    # a tensor transformers keeps in fp32 (DeepSeek-V3's router) is merged and written in fp32, as PEFT does
    dtype = "F32" if steps and aliases.kept_in_fp32(name, base.dtype) else base.dtype
    return TensorTask(name, dtype, source.shape, source, steps, kind)


def _added_dtype(ckpt: Checkpoint, ref: TensorRef) -> str:
    """New tensors (heads) take the checkpoint's floating dtype, as PEFT's save does."""
    dtypes = [t.dtype for s in ckpt.shards for t in s.tensors if t.dtype in FLOAT_DTYPES]
    return max(set(dtypes), key=dtypes.count) if dtypes else ref.dtype

