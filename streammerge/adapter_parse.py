"""Parse and validate ``adapter_config.json`` into an :class:`~streammerge.adapter_config.AdapterConfig`: LoRA
fields, the configs of the other tuners (``streammerge.tuners``), and the PEFT features streammerge refuses,
each with the reason a user reads. See ``peft-merge-spec.md`` §1 for the field table.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

from streammerge.adapter_config import AdapterConfig
from streammerge.errors import AdapterError, UnsupportedAdapterError

#: ``init_lora_weights`` values whose saved A/B are the whole story (the base is not changed at load).
PLAIN_INITS = frozenset({True, False, "gaussian", "eva", "orthogonal"})

# Config fields that change the base or the math in ways streammerge does not reproduce, with
# the reason a user reads. A field counts as "set" when it is truthy.
_REFUSED_FIELDS: tuple[tuple[str, str], ...] = (
    ("layer_replication", "replicated layers share base weights, so no single merged checkpoint exists"),
    ("alora_invocation_tokens", "aLoRA adapters activate per token and cannot be merged (PEFT refuses too)"),
    ("arrow_config", "Arrow routing chooses adapters per token and cannot be merged (PEFT refuses too)"),
    ("use_qalora", "QALoRA merges only into GPTQ weights, which PEFT refuses to merge"),
    ("kasa_config", "KaSA SVD-truncates the base at load time; that base cannot be reproduced offline"),
    ("use_bdlora", "block-diagonal LoRA (BD-LoRA) is not supported yet"),
    ("megatron_config", "Megatron parallel layers are out of scope"),
)


def parse_config(doc: Mapping[str, object], where: Path) -> AdapterConfig:
    """Validate ``adapter_config.json`` and keep the fields that affect the merge."""
    peft_type = doc.get("peft_type")
    if peft_type is None:
        raise AdapterError(f"{where}: missing required field 'peft_type'; is this a PEFT adapter config?")
    if peft_type != "LORA":
        return _tuner_config(doc, where, peft_type)
    for field, reason in _REFUSED_FIELDS:
        if doc.get(field):
            raise UnsupportedAdapterError(f"{where}: {field} is set: {reason}")
    init = doc.get("init_lora_weights", True)
    if init not in PLAIN_INITS:
        raise UnsupportedAdapterError(
            f"{where}: init_lora_weights={init!r} changes the base weights when PEFT loads the adapter, so "
            "W + s·B@A would be wrong; convert the adapter to plain LoRA first (PEFT save_pretrained with "
            "path_initial_model_for_weight_conversion)"
        )
    r = _number(doc, "r", 8, where, int)
    alpha = _number(doc, "lora_alpha", 8, where, float)
    return AdapterConfig(
        peft_type="LORA",
        r=int(r),
        lora_alpha=alpha,
        use_rslora=bool(doc.get("use_rslora", False)),
        rank_pattern=_pattern(doc, "rank_pattern", where, int),
        alpha_pattern=_pattern(doc, "alpha_pattern", where, float),
        target_modules=_targets(doc.get("target_modules"), where),
        modules_to_save=tuple(doc.get("modules_to_save") or ()),
        bias=str(doc.get("bias", "none")),
        lora_bias=bool(doc.get("lora_bias", False)),
        use_dora=bool(doc.get("use_dora", False)),
        task_type=doc.get("task_type") if isinstance(doc.get("task_type"), str) else None,
        base_model_name_or_path=_opt_str(doc.get("base_model_name_or_path")),
        revision=_opt_str(doc.get("revision")),
        raw=MappingProxyType(dict(doc)),
    )


def _tuner_config(doc: Mapping[str, object], where: Path, peft_type: object) -> AdapterConfig:
    """The config of a tuner from ``streammerge.tuners`` (or the refusal, by name, with the reason).

    ``r``/``alpha`` and their patterns matter to LoHa/LoKr (``alpha``) and DeLoRA; every tuner reads its
    own fields from ``raw`` (``Tuner.plan``). Targeting and ``modules_to_save`` work as for LoRA.
    """
    from streammerge.tuners import TUNERS, UNMERGEABLE, supported

    if peft_type in UNMERGEABLE:
        raise UnsupportedAdapterError(f"{where}: peft_type {peft_type!r} {UNMERGEABLE[str(peft_type)]}")
    tuner = TUNERS.get(str(peft_type))
    if tuner is None:
        hint = (" (PEFT replaced Bone with MiSS: convert the adapter with PEFT's scripts/convert-bone-to-miss.py)"
                if peft_type == "BONE" else "")
        raise UnsupportedAdapterError(
            f"{where}: peft_type {peft_type!r} is not supported (streammerge merges {supported()}){hint}; "
            "use PEFT's merge_and_unload for this adapter type"
        )
    ranked = tuner.alpha_field is not None or tuner.ranked
    r = _number(doc, "r", 8, where, int) if ranked else 0
    alpha = _number(doc, tuner.alpha_field, 8, where, float) if tuner.alpha_field else float(r)
    return AdapterConfig(
        peft_type=tuner.peft_type,
        r=int(r),
        lora_alpha=alpha,
        use_rslora=False,
        rank_pattern=_pattern(doc, "rank_pattern", where, int) if ranked else (),
        alpha_pattern=_pattern(doc, "alpha_pattern", where, float) if tuner.alpha_field else (),
        target_modules=_targets(doc.get("target_modules"), where),
        modules_to_save=tuple(doc.get("modules_to_save") or ()),
        bias="none",
        lora_bias=False,
        use_dora=False,
        task_type=doc.get("task_type") if isinstance(doc.get("task_type"), str) else None,
        base_model_name_or_path=_opt_str(doc.get("base_model_name_or_path")),
        revision=_opt_str(doc.get("revision")),
        raw=MappingProxyType(dict(doc)),
    )


def _number(doc: Mapping[str, object], key: str, default: float, where: Path, kind: type) -> float:
    value = doc.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise AdapterError(f"{where}: field {key!r} must be a positive number, found {value!r}")
    if kind is int and value != int(value):
        raise AdapterError(f"{where}: field {key!r} must be an integer, found {value!r}")
    return value


def _pattern(doc: Mapping[str, object], key: str, where: Path, kind: type) -> tuple[tuple[str, float], ...]:
    pattern = doc.get(key) or {}
    if not isinstance(pattern, dict):
        raise AdapterError(f"{where}: field {key!r} must be an object mapping module patterns to numbers")
    out = []
    for k, v in pattern.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise AdapterError(f"{where}: {key}[{k!r}] must be a positive number, found {v!r}")
        try:
            re.compile(k)
        except re.error as e:
            raise AdapterError(f"{where}: {key} key {k!r} is not a valid regular expression ({e})") from e
        out.append((k, kind(v)))
    return tuple(out)


def _targets(value: object, where: Path) -> tuple[str, ...] | str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise AdapterError(f"{where}: target_modules must be a string or a list of strings, found {value!r}")


def _opt_str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None
