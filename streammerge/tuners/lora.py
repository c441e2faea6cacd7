"""LoRA (and DoRA) on Linear, HF Conv1D, Conv1d/2d/3d and Embedding layers, and ``lora_bias``: per-module planning.

Each function turns one module's adapter keys into a :class:`~streammerge.plan.types.Step` on the base tensor it
changes, or records a problem. The arithmetic is ``streammerge.kernel`` (PEFT ``lora/layer.py``, op for op).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from streammerge import naming
from streammerge.errors import UnsupportedAdapterError
from streammerge.formats.dtypes import FLOAT_DTYPES
from streammerge.formats.refs import TensorRef
from streammerge.plan.draft import AdapterInput, Draft, Order, PlanContext
from streammerge.plan.steps import LoraTerm, Step
from streammerge.plan.targeting import check_float, resolve_target

Roles = Mapping[str, naming.AdapterKey]


def plan_module(ctx: PlanContext, src: AdapterInput, draft: Draft, module: str, roles: Roles) -> None:
    """Plan every LoRA role of ``module`` (factors, embedding factors, bias, DoRA magnitude)."""
    order = naming.module_order(module)
    if "lora_A" in roles or "lora_B" in roles:
        plan_linear(ctx, src, draft, module, roles, order)
    if "emb_A" in roles or "emb_B" in roles:
        plan_embedding(ctx, src, draft, module, roles, order)
    if "lora_B_bias" in roles:
        plan_bias(ctx, src, draft, module, roles["lora_B_bias"], order)
    if "magnitude" in roles and not ({"lora_A", "lora_B", "emb_A", "emb_B"} & roles.keys()):
        draft.problems.append(
            f"{src.where}: {roles['magnitude'].key!r} is a DoRA magnitude without LoRA factors for "
            f"module {module!r}; the adapter file is incomplete: re-save it"
        )


def _pair(src: AdapterInput, draft: Draft, module: str, roles: Roles, a_role: str,
          b_role: str) -> tuple[naming.AdapterKey, naming.AdapterKey] | None:
    if a_role not in roles or b_role not in roles:
        have, missing = (a_role, b_role) if a_role in roles else (b_role, a_role)
        draft.problems.append(
            f"{src.where}: module {module!r} has {roles[have].key!r} but no {missing} tensor; "
            "the adapter file is incomplete: re-save it"
        )
        return None
    return roles[a_role], roles[b_role]


def _check_rank(src: AdapterInput, draft: Draft, module: str, r: int) -> bool:
    want = src.adapter.config.rank_for(module)
    if r != want:
        draft.problems.append(
            f"{src.where}: module {module!r} has rank {r} in its tensors but adapter_config.json "
            f"gives r={want} (r / rank_pattern); the config and weights disagree"
        )
        return False
    return True


def _pair_target(ctx, src, draft, module, roles, a_role, b_role, what):
    """The A/B pair of ``module`` and the base tensor it changes, or None (problems recorded)."""
    pair = _pair(src, draft, module, roles, a_role, b_role)
    if pair is None:
        return None
    target = resolve_target(ctx, src, draft, module, "weight", what)
    if target is None:
        return None
    return pair, src.infos[pair[0].key], src.infos[pair[1].key], target


def plan_linear(ctx: PlanContext, src: AdapterInput, draft: Draft, module: str, roles: Roles, order: Order) -> None:
    found = _pair_target(ctx, src, draft, module, roles, "lora_A", "lora_B", "LoRA")
    if found is None:
        return
    pair, a, b, target = found
    w = ctx.info(target)
    shape = draft.shape_of(target, w)
    conv_want = _conv_delta_shape(src, pair[0].key, a.shape, b.shape, shape) if len(a.shape) != 2 else None
    r = a.shape[0] if a.shape else 0
    if len(b.shape) < 2 or b.shape[1] != r:
        draft.problems.append(
            f"{src.where}: {pair[0].key!r} has rank {r} but {pair[1].key!r} has shape {b.shape}; "
            "lora_A and lora_B disagree: the adapter file is corrupt"
        )
        return
    if not _check_rank(src, draft, module, r):
        return
    if conv_want is None:
        layout = "linear_t" if naming.is_conv1d(module, ctx.model_type) else "linear"
        want = (b.shape[0], a.shape[1]) if layout == "linear" else (a.shape[1], b.shape[0])
    else:
        layout, want = "conv", conv_want
    if want != shape:
        draft.problems.append(
            f"{src.where}: LoRA for {module!r} makes a delta of shape {want} but base tensor {target!r} "
            f"has shape {shape}; the adapter was trained on a different base model"
        )
        return
    magnitude = _magnitude(src, draft, module, roles, b.shape[0])
    term = LoraTerm(layout, src.ref(a), src.ref(b), src.adapter.config.scale_for(module), origin=module,
                    magnitude=magnitude)
    check_float(ctx, src, draft, target, w)
    draft.add_step(target, order, src.index, Step((term,), "dora" if magnitude else "once"))


def _conv_delta_shape(src: AdapterInput, key: str, a: tuple[int, ...], b: tuple[int, ...],
                      w: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of a Conv1d/2d/3d LoRA delta, refusing what PEFT cannot merge (spec §3.5, §0.5 f)."""
    if len(a) not in (3, 4, 5) or len(b) != len(a):
        raise UnsupportedAdapterError(
            f"{src.where}: {key!r} has shape {a}: not a Linear, Embedding or Conv1d/2d/3d LoRA "
            "factor; merge this adapter with PEFT"
        )
    if len(w) == len(a) and w[1] != a[1]:
        raise UnsupportedAdapterError(
            f"{src.where}: {key!r} is LoRA on a grouped convolution (groups={a[1] // max(w[1], 1)}); "
            "PEFT cannot merge convolutions with groups > 1 either: keep the adapter unmerged"
        )
    if len(a) == 5 and a[2:4] == (1, 1):
        raise UnsupportedAdapterError(
            f"{src.where}: {key!r} is LoRA on a Conv3d with kernel {a[2:]}: PEFT 0.21 takes its 1x1 "
            "path for this kernel and crashes on merge, so there is no reference result; keep it unmerged"
        )
    return (b[0], a[1], *a[2:])


def _magnitude(src: AdapterInput, draft: Draft, module: str, roles: Roles, out: int) -> TensorRef | None:
    """DoRA's magnitude (``lora_magnitude_vector``) for ``module``: required iff ``use_dora``."""
    key = roles.get("magnitude")
    cfg = src.adapter.config
    if key is None:
        if cfg.use_dora:
            draft.problems.append(
                f"{src.where}: use_dora is true but module {module!r} has no DoRA lora_magnitude_vector; "
                "PEFT would merge a magnitude recomputed from random weights: re-save the adapter"
            )
        return None
    info = src.infos[key.key]
    if not cfg.use_dora:
        draft.problems.append(
            f"{src.where}: {key.key!r} is a DoRA magnitude but use_dora is false in adapter_config.json; "
            "PEFT would ignore it: fix the config (use_dora: true) or remove the tensor"
        )
        return None
    if math.prod(info.shape) != out or info.dtype not in FLOAT_DTYPES:
        draft.problems.append(
            f"{src.where}: {key.key!r} has shape {info.shape} ({info.dtype}); DoRA needs {out} float "
            "magnitudes, one per output: the adapter file is corrupt"
        )
        return None
    return src.ref(info)


def plan_embedding(ctx: PlanContext, src: AdapterInput, draft: Draft, module: str, roles: Roles,
                   order: Order) -> None:
    found = _pair_target(ctx, src, draft, module, roles, "emb_A", "emb_B", "embedding LoRA")
    if found is None:
        return
    pair, a, b, target = found
    r = a.shape[0] if a.shape else 0
    if len(a.shape) != 2 or len(b.shape) != 2 or b.shape[1] != r:
        draft.problems.append(
            f"{src.where}: embedding LoRA {pair[0].key!r} {a.shape} and {pair[1].key!r} {b.shape} "
            "do not form a rank-r pair; the adapter file is corrupt"
        )
        return
    if not _check_rank(src, draft, module, r):
        return
    w = ctx.info(target)
    shape = draft.shape_of(target, w)
    if shape != (a.shape[1], b.shape[0]):
        draft.problems.append(
            f"{src.where}: embedding LoRA for {module!r} makes a delta of shape {(a.shape[1], b.shape[0])} "
            f"but base tensor {target!r} has shape {shape}; the adapter was trained on a different base "
            "(or a resized vocabulary: then the adapter must carry the resized embed_tokens/lm_head)"
        )
        return
    magnitude = _magnitude(src, draft, module, roles, b.shape[0])
    term = LoraTerm("embedding", src.ref(a), src.ref(b), src.adapter.config.scale_for(module), origin=module,
                    magnitude=magnitude)
    check_float(ctx, src, draft, target, w)
    draft.add_step(target, order, src.index, Step((term,), "dora" if magnitude else "delta_first"))


def plan_bias(ctx: PlanContext, src: AdapterInput, draft: Draft, module: str, key: naming.AdapterKey,
              order: Order) -> None:
    target = resolve_target(ctx, src, draft, module, "bias", "lora_B.bias")
    if target is None:
        return
    b, base = src.infos[key.key], ctx.info(target)
    if b.shape != base.shape:
        draft.problems.append(f"{src.where}: {key.key!r} has shape {b.shape} but base bias {target!r} has {base.shape}")
        return
    term = LoraTerm("bias", None, src.ref(b), src.adapter.config.scale_for(module), origin=module)
    draft.add_step(target, order, src.index, Step((term,), "once"))
