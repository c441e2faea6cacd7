"""v4-format (per-expert) MoE LoRA adapters under PEFT 0.21 + transformers 5: how PEFT would merge them
differently from streammerge, and why (spec §0.5, §6.4). Pure.

streammerge merges keys on ``…experts.3.w1`` as the plain Linear LoRAs the transformers-4 era PEFT trained
(``streammerge.tuners.lora``, one rounding). PEFT 0.21 under transformers 5 converts them into fused
``target_parameters`` (two roundings; ×√2 with rsLoRA) or, for model types it has no conversion for, drops
them: :func:`v4_warnings` tells the user which, per adapter.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from streammerge.adapter_config import AdapterConfig

#: model_type → the conversion PEFT 0.21 applies to v4-format expert adapters under transformers 5
#: (``peft/utils/transformers_weight_conversion.py``: transformers' ``_MODEL_TO_CONVERSION_PATTERN`` plus "mixtral").
PEFT_CONVERTS: Mapping[str, str] = {
    **dict.fromkeys(("mixtral", "minimax", "minimax_m2"), "mixtral"),
    **dict.fromkeys(
        ("qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "deepseek_v32", "dots1", "ernie4_5_moe", "glm4_moe",
         "glm4_moe_lite", "glm_moe_dsa", "glm4v_moe", "longcat_flash", "solar_open", "mellum", "beam", "qwen3_next",
         "qwen3_omni_moe", "qwen3_omni_moe_thinker", "qwen3_omni_moe_text", "hunyuan_v1_moe", "flex_olmo",
         "exaone_moe", "cohere2_moe", "afmoe"),
        "qwen2_moe",
    ),
}
#: model_types whose experts transformers 5 fuses but PEFT 0.21 does not convert: their v4-format expert LoRA
#: keys match no module and PEFT drops them silently (qwen2_moe verified, the others read in the source; §0.5 b).
PEFT_DROPS = frozenset({"qwen2_moe", "phimoe", "lfm2_moe", "jamba"})

_V4_EXPERT = re.compile(r"\.experts\.\d+\.(w1|w2|w3|gate_proj|up_proj|down_proj)$")
_V4_GATE_UP = re.compile(r"\.experts\.\d+\.(w1|w3|gate_proj|up_proj)$")
_V4_ROUTER = re.compile(r"\.(block_sparse_moe|mlp)\.gate$")


def v4_warnings(where: str, cfg: AdapterConfig, model_type: object, modules: Iterable[str]) -> list[str]:
    """How PEFT 0.21 + transformers 5 would merge this adapter's per-expert (v4-format) LoRA differently, and why.

    streammerge merges each expert as the Linear layer it was trained on: ``rnd(W + s·B@A)`` with the trained
    scale. PEFT 0.21 under transformers 5 instead fuses the keys into ``target_parameters`` (spec §6.4) where it
    rounds twice (``W + rnd(ΔW)``: some elements differ by that extra rounding of ΔW, usually 1 ulp), doubles r
    and α of the fused w1/w3, which under rsLoRA (α/√r) scales their deltas by √2, and for ``qwen2_moe``
    drops the expert keys altogether.
    """
    mods = sorted(set(modules))
    expert = [m for m in mods if _V4_EXPERT.search(m)]
    router = [m for m in mods if _V4_ROUTER.search(m)]
    if not expert and not router:
        return []
    kind = str(model_type)
    if kind in PEFT_DROPS and expert:
        return [
            f"{where}: {len(expert)} per-expert LoRA modules (e.g. {expert[0]!r}) are merged per expert as trained; "
            f"PEFT 0.21 with transformers 5 silently ignores them on model_type {kind!r} (transformers fuses the "
            "experts on load and PEFT has no key conversion for this model type), so its merged experts stay "
            "unchanged: this output differs from PEFT's on those tensors, by design (spec §0.5 b)"
        ]
    if kind not in PEFT_CONVERTS:
        return []
    gate_up = [m for m in expert if _V4_GATE_UP.search(m)]
    sqrt2 = (
        f" With use_rslora, PEFT fuses the gate/up pair ({gate_up[0].rpartition('.')[2]} …) into gate_up_proj with "
        "r and lora_alpha doubled, so its α/√r scale grows by √2 and its gate/up deltas come out ×1.414 (spec "
        "§0.5 a); streammerge keeps the trained α/√r."
        if cfg.use_rslora and gate_up else ""
    )
    example = (expert or router)[0]
    return [
        f"{where}: {len(expert) + len(router)} v4-format expert/router LoRA modules (e.g. {example!r}) are merged "
        "per expert with Linear rounding rnd(W + s·B@A), as the transformers-4 PEFT they were trained with did; "
        "PEFT 0.21 with transformers 5 fuses them into target_parameters and rounds twice (W + rnd(ΔW)), so its "
        "merged expert/router tensors differ on some elements by that extra rounding of ΔW (usually 1 ulp)."
        f"{sqrt2}"
    ]

