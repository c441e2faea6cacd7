"""A model's own naming rules: which in-memory tensors are tied to which, and the disk name of each in-memory name.

transformers v5 (1) ties parameters the class declares in ``_tied_weights_keys`` (a dict target -> source, per
``PreTrainedModel`` sub-model, switched on by that sub-model's ``config.tie_word_embeddings``) and drops the targets
from the checkpoints it saves; (2) renames tensors between disk and memory with its checkpoint conversion mapping
(``transformers.conversion_mapping``), reverting the renames when it saves. A PEFT adapter names the *in-memory*
modules, the checkpoint keeps the *disk* names; this module tells the planner how to get from one to the other.

Two sources, same answer:

* ``from_transformers(config)``: when transformers is importable, the class of ``config["architectures"][0]`` is
  built on the meta device (no memory, no weights) and asked. Imported lazily, only when a name does not resolve
  directly (``naming.resolve``), so a merge that does not need it never pays for the import.
* ``from_table(config)``: the fallback, ``model_rules_table.TABLE``, generated from transformers by
  ``python -m streammerge.model_rules`` (the same extraction, with index placeholders) for the architectures in
  ``TABLE_ARCHITECTURES``; ``tests/test_model_rules.py`` fails when it drifts from the installed transformers.

The value both return (``ModelRules``) and the table's index templates are ``streammerge.model_rules_types``.
Fused MoE experts (many disk tensors <- one in-memory tensor) are not renames; ``streammerge.tuners.experts``
de-fuses them.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import warnings
from collections.abc import Mapping

from streammerge.model_rules_types import EMPTY, ModelRules, TemplateMap, TemplateRules, template

__all__ = ["EMPTY", "NO_TRANSFORMERS_ENV", "ModelRules", "from_table", "from_transformers", "generate_table",
           "rules_for", "template"]

LOG = logging.getLogger(__name__)

#: Set to 1 to never import transformers (the fallback table answers alone).
NO_TRANSFORMERS_ENV = "STREAMMERGE_NO_TRANSFORMERS"
TIE_FLAG = "tie_word_embeddings"


def rules_for(config: Mapping[str, object]) -> ModelRules:
    """The rules of the checkpoint whose ``config.json`` is ``config`` (transformers if importable, else table)."""
    return _rules_for(json.dumps(_plain(config), sort_keys=True, default=str))


def _plain(value: object) -> object:
    """JSON-able copy of a config (the checkpoint hands out read-only mapping views)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


@functools.lru_cache(maxsize=8)
def _rules_for(config_json: str) -> ModelRules:
    config = json.loads(config_json)
    if os.environ.get(NO_TRANSFORMERS_ENV) != "1":
        try:
            return from_transformers(config)
        except Exception as exc:  # not importable, unknown class, remote code, a config it cannot build
            LOG.debug("transformers cannot give the naming rules (%s: %s); using the table", type(exc).__name__, exc)
    return from_table(config)


# ----------------------------------------------------------------------------------------------------------
# From transformers (lazy import)


def from_transformers(config: Mapping[str, object], *, all_ties: bool = False) -> ModelRules:
    """Build ``config["architectures"][0]`` on the meta device and read its tied keys and reverse renames.

    ``all_ties`` switches every sub-model's tie flag on first (the table records what each flag would tie).
    Raises whatever transformers raises (ImportError, AttributeError for an unknown class, ValueError, ...).
    """
    import transformers

    archs = config.get("architectures") or []
    if not archs:
        raise ValueError("config.json names no architecture")
    cls = getattr(transformers, str(archs[0]))
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # config validation notes are not ours to print
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _read_model(config, cls, all_ties)
    finally:
        transformers.logging.set_verbosity(verbosity)


def _read_model(config: Mapping[str, object], cls: type, all_ties: bool) -> ModelRules:
    import torch
    import transformers
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange, WeightConverter, WeightRenaming, apply_renamings

    cfg = transformers.AutoConfig.for_model(**{k: v for k, v in config.items() if k != "transformers_version"})
    if all_ties:
        for sub in (cfg, *(getattr(cfg, k) for k in cfg.sub_configs if getattr(cfg, k, None) is not None)):
            setattr(sub, TIE_FLAG, True)
    with torch.device("meta"):
        model = cls._from_config(cfg)
    tied = dict(model.get_expanded_tied_weights_keys(all_submodels=True))
    owners = {n.rpartition(".")[0] for pair in tied.items() for n in pair}
    order = tuple(n for n, _ in model.named_modules() if n in owners)
    transposed = tuple(n for n, m in model.named_modules() if getattr(m, "is_transposed", False) is True)
    keep = tuple(sorted(model._keep_in_fp32_modules_strict or ()))
    keep_fp16 = tuple(sorted(model._keep_in_fp32_modules or ()))
    # save_pretrained's order (revert_weight_conversion): sub-models' transforms first, reversed; PrefixChange is
    # dropped for models not loaded from a checkpoint, and so here.
    convs = [c for c in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(c, PrefixChange)]
    reverse = [c.reverse_transform() for c in convs[::-1]]
    renamings = [r for r in reverse if isinstance(r, WeightRenaming)]
    converters = [r for r in reverse if isinstance(r, WeightConverter)]
    renames = {}
    for name in model.state_dict():
        if any(c.rename_source_key(name)[1] is not None for c in converters):
            continue  # fused: many disk tensors, not a rename
        disk = apply_renamings(name, renamings)
        if disk != name:
            renames[name] = disk
    return ModelRules(f"transformers {transformers.__version__} ({cls.__name__})", tied, renames, order, transposed,
                      keep, keep_fp16)


# ----------------------------------------------------------------------------------------------------------
# The fallback table: the same facts with the layer indices abstracted


def table_entry(arch: str, config: Mapping[str, object]) -> dict[str, object]:
    """One architecture's table row: tie templates per flag owner, rename templates (see ``from_table``)."""
    rules = from_transformers({**config, "architectures": [arch]}, all_ties=True)
    order = list(dict.fromkeys(template(m) for m in rules.order))
    transposed = list(dict.fromkeys(template(m) for m in rules.transposed))
    return {"tied": _templates(rules.tied), "renames": _templates(rules.renames), "order": order,
            "transposed": transposed, "keep_fp32": list(rules.keep_fp32), "keep_fp32_fp16": list(rules.keep_fp32_fp16)}


def _templates(pairs: Mapping[str, str]) -> dict[str, str]:
    """Index templates of ``pairs``, keeping only those that give back every concrete pair they cover."""
    out: dict[str, str] = {}
    bad: set[str] = set()
    for k, v in pairs.items():
        tk, tv = template(k), template(v)
        if out.get(tk, tv) != tv or TemplateMap({tk: tv}).get(k) != v:
            bad.add(tk)
        out[tk] = tv
    return {k: v for k, v in sorted(out.items()) if k not in bad}


def from_table(config: Mapping[str, object]) -> ModelRules:
    """The rules the table records for ``config``'s architecture (tie entries only where a tie flag is on)."""
    from streammerge.model_rules_table import TABLE, TRANSFORMERS_VERSION

    archs = config.get("architectures") or []
    entry = TABLE.get(str(archs[0])) if archs else None
    if entry is None:
        return EMPTY
    tie_on = _tie_flag(config)
    return TemplateRules(f"table (transformers {TRANSFORMERS_VERSION})", entry["tied"] if tie_on else {},
                         entry["renames"], tuple(entry["order"]), tuple(entry["transposed"]),
                         tuple(entry["keep_fp32"]), tuple(entry["keep_fp32_fp16"]))


def _tie_flag(config: Mapping[str, object]) -> bool:
    """``tie_word_embeddings`` at the top level or in the text sub-config (PretrainedConfig's default: true)."""
    text = config.get("text_config")
    nested = text.get(TIE_FLAG) if isinstance(text, dict) else None
    return bool(config.get(TIE_FLAG, True if nested is None else nested))


# ----------------------------------------------------------------------------------------------------------
# Regenerating the table: python -m streammerge.model_rules

#: architecture -> model_type whose default config builds it (on the meta device: sizes do not matter).
TABLE_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3", "GemmaForCausalLM": "gemma", "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3_text", "Gemma3ForConditionalGeneration": "gemma3", "Phi3ForCausalLM": "phi3",
    "PhiForCausalLM": "phi", "Olmo2ForCausalLM": "olmo2", "CohereForCausalLM": "cohere",
    "Starcoder2ForCausalLM": "starcoder2", "GPT2LMHeadModel": "gpt2", "GPTBigCodeForCausalLM": "gpt_bigcode",
    "GPTJForCausalLM": "gptj", "GPTNeoXForCausalLM": "gpt_neox", "FalconForCausalLM": "falcon",
    "BloomForCausalLM": "bloom", "OPTForCausalLM": "opt", "T5ForConditionalGeneration": "t5",
    "MT5ForConditionalGeneration": "mt5", "BartForConditionalGeneration": "bart",
    "MBartForConditionalGeneration": "mbart", "WhisperForConditionalGeneration": "whisper",
    "BertForSequenceClassification": "bert", "BertForMaskedLM": "bert", "RobertaForMaskedLM": "roberta",
    "RobertaForSequenceClassification": "roberta", "XLMRobertaForMaskedLM": "xlm-roberta",
    "DistilBertForMaskedLM": "distilbert", "ViTForImageClassification": "vit", "ViTModel": "vit",
    "SwinForImageClassification": "swin", "Dinov2ForImageClassification": "dinov2", "Dinov2Model": "dinov2",
    "CLIPModel": "clip", "SiglipModel": "siglip", "LlavaForConditionalGeneration": "llava",
    "Qwen2VLForConditionalGeneration": "qwen2_vl", "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl",
    "MixtralForCausalLM": "mixtral", "Qwen2MoeForCausalLM": "qwen2_moe", "Qwen3MoeForCausalLM": "qwen3_moe",
    "DeepseekV3ForCausalLM": "deepseek_v3", "GptOssForCausalLM": "gpt_oss",
}


def generate_table() -> dict[str, dict[str, object]]:
    """Every ``TABLE_ARCHITECTURES`` row, from the installed transformers."""
    import transformers

    return {arch: table_entry(arch, transformers.AutoConfig.for_model(model_type).to_dict())
            for arch, model_type in TABLE_ARCHITECTURES.items()}


def main() -> None:
    import pprint
    import sys
    from pathlib import Path

    import transformers

    table = generate_table()
    path = Path(__file__).with_name("model_rules_table.py")
    path.write_text(
        "# ruff: noqa: E501\n"
        '"""Generated by ``python -m streammerge.model_rules`` from transformers; do not edit by hand.\n\n'
        "Per architecture: ``tied`` (in-memory target -> source, as if every tie flag were on) and ``renames``\n"
        '(in-memory -> disk name), with numeric path components written ``*`` (``streammerge.model_rules``).\n"""\n\n'
        f"TRANSFORMERS_VERSION = {transformers.__version__!r}\n\n"
        f"TABLE: dict[str, dict[str, object]] = {pprint.pformat(table, width=118, sort_dicts=True)}\n"
    )
    sys.stdout.write(f"wrote {path}: {len(table)} architectures, transformers {transformers.__version__}\n")


if __name__ == "__main__":
    main()
