"""Read a PEFT adapter directory: its config and the header of its weights. No tensor is read.

The facts encoded here come from PEFT 0.21 (``peft/config.py``, ``peft/tuners/lora/layer.py``
``LoraLayer.update_layer``, ``peft/utils/other.py get_pattern_key``); see
``peft-merge-spec.md`` §1 for the field table and §1.1 for the pattern rule.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from streammerge.errors import AdapterError, CheckpointError, UnsupportedAdapterError
from streammerge.formats.jsonfile import read_json
from streammerge.formats.safetensors import SafetensorsHeader, read_header

LOG = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
BIN_WEIGHTS_NAME = "adapter_model.bin"

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


@dataclass(frozen=True, slots=True)
class Adapter:
    """An adapter directory: parsed config plus the validated header of its weights file."""

    root: Path
    name: str  # "default" or the sub-directory name chosen with adapter_name
    config: AdapterConfig
    weights: SafetensorsHeader


def read_adapter(path: str | Path, adapter_name: str | None = None, pattern_rules: str = "current") -> Adapter:
    """Read the adapter directory at ``path`` (or its sub-directory ``adapter_name``).

    Raises:
        AdapterError: missing or invalid files.
        UnsupportedAdapterError: a PEFT feature streammerge refuses, named in the message.
    """
    root = Path(path)
    if not root.is_dir():
        raise AdapterError(f"{root}: adapter directory not found; pass --adapter DIR (with {CONFIG_NAME})")
    root, name = _select(root, adapter_name)
    config = parse_config(read_json(root / CONFIG_NAME, AdapterError), root / CONFIG_NAME)
    if pattern_rules not in PATTERN_RULES:
        raise AdapterError(f"pattern rules {pattern_rules!r} unknown; use one of {', '.join(PATTERN_RULES)}")
    config = dataclasses.replace(config, pattern_rules=pattern_rules)
    try:
        weights = _read_weights(root)
    except CheckpointError as e:  # the header codec speaks of checkpoints; this file is the adapter's
        raise AdapterError(str(e)) from e
    return Adapter(root=root, name=name, config=config, weights=weights)


def _read_weights(root: Path) -> SafetensorsHeader:
    """The adapter's tensor index: ``adapter_model.safetensors``, else a pickled ``adapter_model.bin``
    (PEFT's ``load_peft_weights`` order), indexed with ``torch.load(mmap=True, weights_only=True)``."""
    if (root / WEIGHTS_NAME).is_file():
        return read_header(root / WEIGHTS_NAME)
    if (root / BIN_WEIGHTS_NAME).is_file():
        from streammerge.formats.torchbin import read_pickle_index  # torch is needed only for pickled adapters

        LOG.info("%s: pickled adapter, read with torch.load(weights_only=True, mmap=True)", root / BIN_WEIGHTS_NAME)
        return read_pickle_index(root / BIN_WEIGHTS_NAME)
    raise AdapterError(f"{root / WEIGHTS_NAME}: adapter weights not found; the adapter directory is incomplete")


def _select(root: Path, adapter_name: str | None) -> tuple[Path, str]:
    """PEFT saves the "default" adapter at the top and every other adapter ``X`` in ``root/X/``."""
    names = sorted(p.parent.name for p in root.glob(f"*/{CONFIG_NAME}"))
    if adapter_name not in (None, "default"):
        if adapter_name in names:
            return root / adapter_name, adapter_name
        raise AdapterError(
            f"{root}: no adapter named {adapter_name!r}; available: {', '.join(_available(root, names)) or 'none'}"
        )
    if (root / CONFIG_NAME).is_file():
        return root, "default"
    if names:
        raise AdapterError(
            f"{root}: no {CONFIG_NAME} at the top, but it holds adapters {', '.join(names)}; "
            "choose one with --adapter-name NAME"
        )
    raise AdapterError(f"{root}: {CONFIG_NAME} not found; is this a PEFT adapter directory?")


def _available(root: Path, names: list[str]) -> list[str]:
    return (["default"] if (root / CONFIG_NAME).is_file() else []) + names


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
