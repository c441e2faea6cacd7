"""Checks of the PEFT oracle itself (no streammerge): the references are non-trivial and mean what we think.

If one of these fails, a parity failure elsewhere says nothing about streammerge.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from oracle import (
    CASES,
    LOGITS_CASES,
    cached_case,
    diff_checkpoints,
    load_checkpoint,
    load_merged,
    logits,
    shard_files,
)
from safetensors.torch import load_file
from transformers import AutoConfig


@pytest.fixture(scope="session")
def case_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "parity-cases"


@pytest.mark.parametrize("name", CASES)
def test_reference_has_case_facts(name: str, case_root: Path) -> None:
    case = cached_case(name, case_root)
    ref = load_checkpoint(case.ref_dir)
    base = load_checkpoint(case.base_dir)
    assert case.must_have <= set(ref)
    assert not case.must_not_have & set(ref)
    assert all(not torch.equal(ref[k], base[k]) for k in case.must_change)
    cfg = AutoConfig.from_pretrained(case.ref_dir)
    assert {k: getattr(cfg, k) for k in case.expect_config} == case.expect_config
    assert all(t.dtype == torch.bfloat16 for t in ref.values())
    assert not torch.equal(case.ref_logits, case.base_logits)


@pytest.mark.parametrize("name", LOGITS_CASES)
def test_reference_roundtrips_through_save(name: str, case_root: Path) -> None:
    """Reloading PEFT's saved merge reproduces the in-memory merged logits exactly."""
    case = cached_case(name, case_root)
    reloaded = logits(load_merged(case.auto_class, case.ref_dir), case.input_ids)
    assert torch.equal(reloaded, case.ref_logits)


def test_alpha_pattern_file_order_changes_the_merge(case_root: Path) -> None:
    """Spec §1.1 trap: same tensors, only the key order of alpha_pattern differs -> layer 0 q_proj differs."""
    unsorted = cached_case("llama_rslora_patterns", case_root)
    sorted_ = cached_case("llama_rslora_patterns_sorted", case_root)
    patterns = [
        json.loads((c.adapter_dir / "adapter_config.json").read_text())["alpha_pattern"] for c in (unsorted, sorted_)
    ]
    assert list(patterns[0]) != sorted(patterns[0])
    assert list(patterns[1]) == sorted(patterns[1])
    a = load_file(unsorted.adapter_dir / "adapter_model.safetensors")
    b = load_file(sorted_.adapter_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    diffs = diff_checkpoints(load_checkpoint(unsorted.ref_dir), load_checkpoint(sorted_.ref_dir))
    assert [d.split(":")[0] for d in diffs] == ["model.layers.0.self_attn.q_proj.weight"]


def test_linear_reference_is_one_rounding(case_root: Path) -> None:
    """Spec §3.2: PEFT's Linear merge is rnd(W + (B@A)*s); the oracle reproduces it for layer 0 q_proj."""
    case = cached_case("llama_all_linear", case_root)
    base, ref = load_checkpoint(case.base_dir), load_checkpoint(case.ref_dir)
    ad = load_file(case.adapter_dir / "adapter_model.safetensors")
    m = "model.layers.0.self_attn.q_proj"
    w = base[f"{m}.weight"].clone()
    w += (ad[f"base_model.model.{m}.lora_B.weight"] @ ad[f"base_model.model.{m}.lora_A.weight"]) * (32 / 16)
    assert torch.equal(w, ref[f"{m}.weight"])


def test_gpt2_adapter_config_says_fan_in_fan_out_false(case_root: Path) -> None:
    case = cached_case("gpt2_conv1d", case_root)
    assert json.loads((case.adapter_dir / "adapter_config.json").read_text())["fan_in_fan_out"] is False


def test_base_layouts(case_root: Path) -> None:
    single = cached_case("llama_all_linear", case_root)
    sharded = cached_case("llama_all_linear_sharded", case_root)
    assert [p.name for p in shard_files(single.base_dir)] == ["model.safetensors"]
    assert len(shard_files(sharded.base_dir)) >= 3
    assert (sharded.base_dir / "model.safetensors.index.json").exists()


def test_seq_cls_adapter_carries_the_head(case_root: Path) -> None:
    case = cached_case("llama_seq_cls", case_root)
    cfg = json.loads((case.adapter_dir / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS"
    assert "score" in cfg["modules_to_save"]
    keys = load_file(case.adapter_dir / "adapter_model.safetensors")
    assert keys["base_model.model.score.weight"].shape[0] == 3
