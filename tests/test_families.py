"""The family sweep: every transformers model class in ``tests/families.py`` merged by streammerge and by PEFT.

For each variant (a tiny random model of one class, a LoRA on all its linear layers, embeddings and tied heads,
task heads in ``modules_to_save``, fused experts through ``target_parameters``), streammerge's output must equal
PEFT's ``merge_and_unload().save_pretrained()`` tensor for tensor and bit for bit, say the same about tied weights
in ``config.json``, and reload (with the family's own class) to the logits of PEFT's merged model.

A variant streammerge does not handle yet is listed in ``GAPS`` with the reason: its tests are strict xfails, so
the day it works the list must shrink. ``PEFT_CANNOT`` lists what PEFT itself cannot build (none today).
"""

from __future__ import annotations

import json
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from families import VARIANT_NAMES, VARIANTS, Built, build, load, outputs
from oracle import diff_checkpoints, load_checkpoint
from safetensors.torch import load_file

import streammerge
from streammerge import model_rules, naming

ALL = frozenset({"tensors", "tie", "logits"})
#: variant -> (why streammerge's merge differs from PEFT's today, the tests that show it). Strict xfails: fixing one
#: fails the suite until its entry is removed.
GAPS: dict[str, tuple[str, frozenset[str]]] = {
}

#: family -> tensor-name suffixes transformers upcasts to fp32 at load (``_keep_in_fp32_modules_strict``:
#: DeepSeek-V3's router), so PEFT's reference saves them in fp32. streammerge merges a targeted one in fp32 and
#: writes fp32 (compared bit for bit); an untargeted one keeps the base's bf16 bytes: the test checks it equals
#: the base and the reference value for value.
KEPT_IN_FP32: dict[str, tuple[str, ...]] = {"deepseek_v3": ("mlp.gate.weight", "mlp.gate.e_score_correction_bias")}

#: variant -> the message PEFT raises when it cannot build or merge that adapter (none today).
PEFT_CANNOT: dict[str, str] = {}


@dataclass(frozen=True)
class Merged:
    built: Built
    out_dir: Path
    error: str | None


_MERGED: dict[str, Merged] = {}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("families")


def _merged(name: str, root: Path) -> Merged:
    """Build the variant and merge it with streammerge, once per session."""
    if name not in _MERGED:
        built = build(name, root)
        out_dir = built.base_dir.parent / "out"
        error = None
        if built.peft_error is None:
            try:
                streammerge.merge(base=built.base_dir, adapter=built.adapter_dir, out=out_dir, device="cpu")
            except Exception:
                error = traceback.format_exc(limit=-3)
        _MERGED[name] = Merged(built, out_dir, error)
    return _MERGED[name]


def _params(names: tuple[str, ...], test: str) -> list[Any]:
    out = []
    for name in names:
        reason, tests = GAPS.get(name, ("", frozenset()))
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if test in tests else []
        out.append(pytest.param(name, id=name, marks=marks))
    return out


def _require(name: str, root: Path) -> Merged:
    m = _merged(name, root)
    if m.built.peft_error is not None:
        expected = PEFT_CANNOT.get(name)
        assert expected is not None, f"PEFT failed on {name}: {m.built.peft_error}"
        assert expected in m.built.peft_error
        pytest.xfail(f"PEFT cannot build {name}: {expected}")
    if m.error is not None:
        pytest.fail(f"streammerge.merge raised for {name}:\n{m.error}", pytrace=False)
    return m


def _tie_flags(config_dir: Path) -> dict[str, Any]:
    """Every tie flag of a config.json, top level and in sub-configs (text_config, decoder, ...)."""
    cfg = json.loads((config_dir / "config.json").read_text())
    flags = {k: cfg[k] for k in ("tie_word_embeddings", "tie_encoder_decoder") if k in cfg}
    for sub, val in cfg.items():
        if isinstance(val, dict):
            flags.update({f"{sub}.{k}": val[k] for k in ("tie_word_embeddings", "tie_encoder_decoder") if k in val})
    return flags


@pytest.mark.parametrize("name", _params(VARIANT_NAMES, "tensors"))
def test_tensors_bit_identical_to_peft(name: str, zoo: Path) -> None:
    m = _require(name, zoo)
    ours, ref, base = load_checkpoint(m.out_dir), load_checkpoint(m.built.ref_dir), load_checkpoint(m.built.base_dir)
    kept = [k for k in ref if k.endswith(KEPT_IN_FP32.get(m.built.variant.family, ()))]
    for key in [k for k in kept if ours[k].dtype != torch.float32]:  # untouched: the base's bytes
        assert ref[key].dtype == torch.float32 and torch.equal(ours[key], base[key])
        assert torch.equal(ref[key], ours[key].float())
        ref[key] = ours[key]
    assert diff_checkpoints(ours, ref) == []


@pytest.mark.parametrize("name", _params(VARIANT_NAMES, "tie"))
def test_tie_flags_match_peft(name: str, zoo: Path) -> None:
    m = _require(name, zoo)
    assert _tie_flags(m.out_dir) == _tie_flags(m.built.ref_dir)


@pytest.mark.parametrize("name", _params(VARIANT_NAMES, "logits"))
def test_logits_equal_peft_merged_model(name: str, zoo: Path) -> None:
    m = _require(name, zoo)
    assert m.built.ref_logits is not None and m.built.base_logits is not None
    assert not torch.equal(m.built.ref_logits, m.built.base_logits), "oracle: the adapter changes nothing"
    ours = outputs(load(m.built.model_class, m.out_dir), m.built.inputs)
    assert torch.equal(ours, m.built.ref_logits)


# ----------------------------------------------------------------------------------------------------------
# Saved heads (modules_to_save) land under their disk names, and the tie flag says what was written


def _saved_full_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """The adapter's full tensors (modules_to_save copies), by the in-memory name they replace (PEFT's key
    grammar: ``naming.parse_key``; a bias="all" save's ``original_module`` copies replace nothing)."""
    sd = load_file(adapter_dir / "adapter_model.safetensors")
    keys = {k: naming.parse_key(k) for k in sd}
    return {p.target: sd[k] for k, p in keys.items() if p.role == "tensor"}


def test_gpt_neox_saved_head_is_written_as_embed_out(zoo: Path) -> None:
    """Regression: modules_to_save on v5's ``lm_head`` (disk ``embed_out``) once wrote an extra lm_head.weight
    and left embed_out.weight as the base had it."""
    m = _require("gpt_neox_mts_embed_out", zoo)
    ours = load_checkpoint(m.out_dir)
    saved = _saved_full_tensors(m.built.adapter_dir)["lm_head.weight"]
    assert "lm_head.weight" not in ours
    assert torch.equal(ours["embed_out.weight"], saved.to(ours["embed_out.weight"].dtype))
    assert not torch.equal(ours["embed_out.weight"], load_checkpoint(m.built.base_dir)["embed_out.weight"])


def test_whisper_saved_tied_proj_out_unties_in_config(zoo: Path) -> None:
    """Regression: modules_to_save on the tied ``proj_out`` once kept ``tie_word_embeddings: true``, so the
    loaded model re-tied the new head to the decoder's embeddings."""
    m = _require("whisper_mts_proj_out", zoo)
    ours, base = load_checkpoint(m.out_dir), load_checkpoint(m.built.base_dir)
    saved = _saved_full_tensors(m.built.adapter_dir)["proj_out.weight"]
    assert "proj_out.weight" not in base
    assert torch.equal(ours["proj_out.weight"], saved.to(ours["proj_out.weight"].dtype))
    assert torch.equal(ours["model.decoder.embed_tokens.weight"], base["model.decoder.embed_tokens.weight"])
    assert json.loads((m.out_dir / "config.json").read_text())["tie_word_embeddings"] is False
    model = load(m.built.model_class, m.out_dir)
    assert torch.equal(model.proj_out.weight, ours["proj_out.weight"])
    assert model.proj_out.weight.data_ptr() != model.model.decoder.embed_tokens.weight.data_ptr()


_SAVES_HEADS = tuple(n for n in VARIANT_NAMES
                     if VARIANTS[n].modules_to_save or VARIANTS[n].lora.get("task_type") == "SEQ_CLS")


@pytest.mark.parametrize("name", _params(_SAVES_HEADS, "tensors"))
def test_every_saved_head_lands_under_its_disk_name(name: str, zoo: Path) -> None:
    """Each modules_to_save tensor is in the output under the name transformers saves it as (the model's own
    rules), with the adapter's values; a saved tied head unties, and the config's tie flag says so."""
    m = _require(name, zoo)
    ours = load_checkpoint(m.out_dir)
    config = json.loads((m.out_dir / "config.json").read_text())
    rules = model_rules.from_transformers(json.loads((m.built.base_dir / "config.json").read_text()))
    heads = {k: v for k, v in _saved_full_tensors(m.built.adapter_dir).items()
             if {*m.built.variant.modules_to_save, "classifier"} & set(k.split(".")[:-1])}
    assert heads, "the variant saves no head"
    for key, saved in heads.items():
        disk = rules.renames.get(key, key)
        assert torch.equal(ours[disk], saved.to(ours[disk].dtype)), disk
        if key != disk:
            assert key not in ours
        if key in rules.tied:
            assert config["tie_word_embeddings"] is False
