"""Does the adapter file agree with its config? Refusals where PEFT would silently do the wrong thing. Pure."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

from streammerge import naming
from streammerge.formats.dtypes import FLOAT_DTYPES
from streammerge.formats.safetensors import TensorInfo
from streammerge.plan.draft import AdapterInput, Draft, PlanContext

_LORA_ROLES = frozenset({"lora_A", "lora_B", "lora_B_bias", "emb_A", "emb_B", "magnitude"})


def check_targeting(ctx: PlanContext, src: AdapterInput, draft: Draft,
                    by_module: Mapping[str, Mapping[str, naming.AdapterKey]]) -> None:
    """Refuse adapter files that disagree with their config, where PEFT would silently do the wrong thing.

    * A LoRA key for a module the config does not target (``AdapterConfig.targets_module``, PEFT's
      ``check_target_module_exists``): PEFT loads with ``strict=False`` and drops it without a word.
    * A trainable-tokens delta for a module ``trainable_token_indices`` does not name: same.
    * With ``init_lora_weights: false`` only, a targeted base module with no keys: PEFT would merge
      the random A and B it initialised. (With the default init B = 0, so a missing module is a no-op
      in PEFT too and is accepted.) Only list-form ``target_modules`` are checked, on 2-D base weights.
    """
    cfg = src.adapter.config
    located, aliases, problems = ctx.located, ctx.aliases, draft.problems
    for module, roles in by_module.items():
        lora = sorted(roles.keys() & _LORA_ROLES)
        if lora and cfg.targets_module(module) is False and not _param_target(cfg, module):
            problems.append(
                f"{src.where}: adapter tensor {roles[lora[0]].key!r} is for module {module!r}, which "
                f"adapter_config.json does not target (target_modules={_show(cfg.target_modules)}); PEFT would "
                "silently ignore it: add the module to target_modules or remove its tensors"
            )
        if "token_delta" in roles and cfg.token_indices_for(module) is None:
            problems.append(
                f"{src.where}: {roles['token_delta'].key!r} is a trainable-tokens delta but "
                "trainable_token_indices does not name this module; PEFT would silently ignore it: fix the config"
            )
    if cfg.raw.get("init_lora_weights", True) is not False or not isinstance(cfg.target_modules, tuple):
        return
    covered = {naming.resolve(m + ".weight", located.keys(), aliases) for m in by_module}
    for name in sorted({*located, *aliases}):
        info = located.get(aliases.get(name, name))
        shape = getattr(info[1], "shape", ()) if isinstance(info, tuple) else ()
        module = name.removesuffix(".weight")
        # Per-expert disk modules (experts.N.gate_proj) are fused parameters in transformers v5, not
        # modules PEFT wraps: a v5 adapter targeting "gate_proj" has no keys for them, correctly.
        if (name.endswith(".weight") and len(shape) >= 2 and cfg.targets_module(module)
                and not _PER_EXPERT.search(module)
                and naming.resolve(name, located.keys(), aliases) not in covered):
            problems.append(
                f"{src.where}: adapter_config.json targets module {module!r} with "
                "init_lora_weights=false, but the adapter has no tensors for it; PEFT would merge its random "
                "initial A and B: the adapter file is incomplete (or target_modules is wrong)"
            )
            return


_PER_EXPERT = re.compile(r"\.experts\.\d+\.")


def _param_target(cfg, module: str) -> bool:
    """The module owns a ``target_parameters`` parameter (MoE experts): not target_modules' business."""
    params = cfg.raw.get("target_parameters") or []
    stem = module.replace(".base_layer", "")
    return any(f"{stem}.".endswith(f".{p.rpartition('.')[0]}.") or stem == p.rpartition(".")[0]
               for p in params if isinstance(p, str))


def _show(targets: object) -> str:
    return json.dumps(list(targets) if isinstance(targets, tuple) else targets)


def check_float(ctx: PlanContext, src: AdapterInput, draft: Draft, target: str, w: TensorInfo) -> None:
    """A delta can only be added to a floating-point base tensor, or to a quantized weight a format decodes."""
    quant = ctx.ckpt.quant
    if w.dtype not in FLOAT_DTYPES and not (quant is not None and target in quant.weights):
        draft.problems.append(
            f"{src.where}: base tensor {target!r} is {w.dtype}, not a float dtype; a LoRA delta cannot "
            "be merged into it (quantized base?): use the full-precision base"
        )


def resolve_target(ctx: PlanContext, src: AdapterInput, draft: Draft, module: str, param: str,
                   what: str) -> str | None:
    """The disk tensor that ``module.param`` is, or None (a problem naming the closest tensors recorded)."""
    name = f"{module}.{param}"
    target = ctx.resolve(name)
    if target is None:
        draft.problems.append(
            f"{src.where}: {what} for module {module!r} targets {name!r}, which is not in the base "
            f"checkpoint{naming.suggest(name, ctx.located.keys(), ctx.aliases)}; is this adapter for a different base "
            "model?"
        )
    return target
