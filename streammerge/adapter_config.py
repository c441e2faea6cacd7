"""``AdapterConfig``: the fields of ``adapter_config.json`` that affect the merged weights, and PEFT's rules for
what they mean per module: (r, α) from ``rank_pattern``/``alpha_pattern`` under each PEFT release's pattern
rules, the scale, which modules are targeted, and trainable-token rows. Pure.

The facts encoded here come from PEFT 0.21 (``LoraLayer.update_layer``, ``peft/utils/other.py get_pattern_key``,
``check_target_module_exists``); see ``peft-merge-spec.md`` §1.1 and §6.6. Parsing and validating the file is
``streammerge.adapter_parse``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class AdapterConfig:
    """The fields of ``adapter_config.json`` that affect the merged weights."""

    peft_type: str
    r: int
    lora_alpha: float
    use_rslora: bool
    rank_pattern: tuple[tuple[str, int], ...]  # file order (PEFT iterates it in that order)
    alpha_pattern: tuple[tuple[str, float], ...]
    target_modules: tuple[str, ...] | str | None
    modules_to_save: tuple[str, ...]
    bias: str
    lora_bias: bool
    use_dora: bool
    task_type: str | None
    base_model_name_or_path: str | None
    revision: str | None
    raw: Mapping[str, object]
    pattern_rules: str = "current"  # one of PATTERN_RULES: how rank/alpha_pattern keys are matched

    def rank_for(self, module: str) -> int:
        return int(self.r_alpha_for(module)[0])

    def r_alpha_for(self, module: str, rules: str | None = None) -> tuple[int, float]:
        r"""(r, α) of ``module`` under ``rules`` (default: this config's ``pattern_rules``), spec §6.6:

        * ``current`` (PEFT ≥ 0.15, what PEFT 0.21 applies to every adapter it loads): r and α
          resolved independently, each by the first key in file order with ``(.*\.)?(key)$`` matching;
        * ``0.14``: independently, with ``.*\.key$`` (no full-name match);
        * ``pre-0.14``: ONE key, the first match of ``.*\.key$`` over rank_pattern then alpha_pattern,
          looked up in both (a key only in rank_pattern leaves α at its default).
        """
        rules = rules or self.pattern_rules
        if rules == "current":
            return (int(_pattern_value(self.rank_pattern, module, self.r, _CURRENT)),
                    _pattern_value(self.alpha_pattern, module, self.lora_alpha, _CURRENT))
        if rules == "0.14":
            return (int(_pattern_value(self.rank_pattern, module, self.r, _LEGACY)),
                    _pattern_value(self.alpha_pattern, module, self.lora_alpha, _LEGACY))
        keys = [k for k, _ in (*self.rank_pattern, *self.alpha_pattern)]
        key = next((k for k in keys if re.match(_LEGACY.format(key=k), module)), None)
        return int(dict(self.rank_pattern).get(key, self.r)), dict(self.alpha_pattern).get(key, self.lora_alpha)

    def scale_for(self, module: str) -> float:
        """PEFT's ``scaling``: ``α/r``, or ``α/√r`` with rsLoRA (``LoraLayer.update_layer``).

        The arithmetic is PEFT's (Python floats), so the scale is bit-identical to PEFT's.
        """
        r, alpha = self.r_alpha_for(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def legacy_pattern_drift(self, modules: Iterable[str]) -> str | None:
        """For an adapter saved before PEFT 0.18 (no ``peft_version``), the first module whose (r, α)
        under the pattern rules of older PEFT differs from what PEFT applies now, described; else None."""
        if "peft_version" in self.raw or not (self.rank_pattern or self.alpha_pattern):
            return None
        for module in modules:
            now = self.r_alpha_for(module, "current")
            for rules in ("0.14", "pre-0.14"):
                then = self.r_alpha_for(module, rules)
                if then != now:
                    return (f"module {module!r} gets (r, alpha) = {now} under PEFT >= 0.15 pattern rules but {then} "
                            f"under PEFT {rules} rules")
        return None

    def targets_module(self, module: str) -> bool | None:
        """Would PEFT put a LoRA layer on ``module``? PEFT 0.21 ``check_target_module_exists``.

        ``exclude_modules`` first (string: ``re.fullmatch``; list: exact or ``.endswith("." + t)``), then
        modules under ``modules_to_save`` are excluded, then ``target_modules`` (string: ``re.fullmatch``;
        ``"all-linear"``: every module but the output layer; list: exact or ``.endswith("." + t)``,
        filtered by ``layers_to_transform``/``layers_pattern``). None when the config names no
        ``target_modules`` (``target_parameters`` adapters): the question is not PEFT's to answer.
        """
        raw = self.raw
        if _listed(raw.get("exclude_modules"), module):
            return False
        if any(re.match(rf"(^|.*\.){m}($|\..*)", module) for m in self.modules_to_save):
            return False
        targets = self.target_modules
        if targets is None:
            return None
        if targets == "all-linear":
            return module.rpartition(".")[2] not in _OUTPUT_LAYERS
        if isinstance(targets, str):
            return re.fullmatch(targets, module) is not None
        if module in targets:
            return True
        return _listed(targets, module) and _in_layers(raw, module)

    def token_indices_for(self, module: str) -> tuple[int, ...] | None:
        """The rows ``trainable_token_indices`` makes trainable in ``module`` (spec §3.8), or None.

        A list means the input embedding (the only module PEFT then saves a delta for); a dict maps
        module names (exact or a ``.``-suffix) to lists.
        """
        value = self.raw.get("trainable_token_indices")
        if isinstance(value, list):
            return tuple(int(i) for i in value)
        if isinstance(value, dict):
            for name, indices in value.items():
                if module == name or module.endswith("." + name):
                    return tuple(int(i) for i in indices)
        return None


#: Module names ``"all-linear"`` leaves out (PEFT skips the output layer).
_OUTPUT_LAYERS = frozenset({"lm_head", "score", "classifier", "qa_outputs", "embed_out", "output"})


def _listed(names: object, module: str) -> bool:
    """PEFT's list rule (exact or ``.``-suffix); a string is a ``re.fullmatch`` pattern."""
    if isinstance(names, str):
        return re.fullmatch(names, module) is not None
    if isinstance(names, (list, tuple)):
        return module in names or any(module.endswith("." + n) for n in names)
    return False


def _in_layers(raw: Mapping[str, object], module: str) -> bool:
    """``layers_to_transform``: the first ``.<pattern>.<idx>.`` of the name (lazy match) must be listed."""
    layers = raw.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    pattern = raw.get("layers_pattern")
    patterns = [pattern] if isinstance(pattern, str) else list(pattern or [])
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
        match = next((m for p in patterns if (m := re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", module))), None)
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == layers if isinstance(layers, int) else index in layers


#: ``rank_pattern``/``alpha_pattern`` key rules: PEFT ≥ 0.15 ``get_pattern_key``, and PEFT < 0.15.
_CURRENT = r"(.*\.)?({key})$"
_LEGACY = r".*\.{key}$"
PATTERN_RULES = ("current", "0.14", "pre-0.14")


def _pattern_value(pattern: tuple[tuple[str, float], ...], module: str, default: float, rule: str) -> float:
    """The value of the first key (file order) whose ``rule`` regex matches ``module``."""
    for key, value in pattern:
        if re.match(rule.format(key=key), module):
            return value
    return default
