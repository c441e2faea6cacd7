"""rank_pattern / alpha_pattern rules across PEFT versions (spec §1.1, §6.6)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import streammerge
from streammerge import testing
from streammerge.adapter import parse_config

M0, M1 = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"
SPEC_EXAMPLE = {"peft_type": "LORA", "r": 8, "lora_alpha": 8, "rank_pattern": {"q_proj": 16},
                "alpha_pattern": {"layers.0.self_attn.q_proj": 32}}


@pytest.mark.parametrize(("key", "matches"), [
    ("q_proj", True), ("self_attn.q_proj", True), ("layers.0.self_attn.q_proj", True), (".*q_proj", True),
    (r"layers\.0\..*", True), ("layers.[01].self_attn.q_proj", True), ("^model.layers.0.self_attn.q_proj", True),
    ("proj", False), ("_proj", False), ("ayers.0.self_attn.q_proj", False), ("model.layers.0", False),
])
def test_current_rule_table_from_the_spec(key, matches):
    cfg = parse_config({"peft_type": "LORA", "r": 8, "rank_pattern": {key: 4}}, Path("x"))
    assert (cfg.rank_for(M0) == 4) is matches


def test_rules_of_each_peft_version_on_the_spec_example():
    cfg = parse_config(SPEC_EXAMPLE, Path("x"))
    assert cfg.r_alpha_for(M0, "current") == (16, 32)
    assert cfg.r_alpha_for(M0, "0.14") == (16, 32)
    assert cfg.r_alpha_for(M0, "pre-0.14") == (16, 8)  # one key for both: "q_proj" has no alpha entry
    assert cfg.r_alpha_for(M1, "pre-0.14") == cfg.r_alpha_for(M1, "current") == (16, 8)


def test_full_name_keys_matched_only_by_current_rules():
    cfg = parse_config({"peft_type": "LORA", "r": 8, "rank_pattern": {"model.layers.0.self_attn.q_proj": 4}}, Path("x"))
    assert cfg.r_alpha_for(M0, "current")[0] == 4
    assert cfg.r_alpha_for(M0, "0.14")[0] == 8


def test_old_adapter_whose_scale_changed_gets_a_warning(tmp_path):
    base = testing.make_checkpoint(tmp_path / "base", layers=2)
    adapter = testing.make_adapter(tmp_path / "ad", base, targets=("q_proj",), r=16, alpha=8,
                                   config={k: v for k, v in SPEC_EXAMPLE.items() if k.endswith("pattern")})
    plan = streammerge.plan_merge(base, adapter)
    assert any("no peft_version" in w and repr(M0) in w and "`pattern_rules`" in w for w in plan.warnings)
    doc = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**doc, "peft_version": "0.21.2"}))
    assert not any("peft_version" in w for w in streammerge.plan_merge(base, adapter).warnings)


def test_cli_pattern_rules_choose_the_training_time_scale(tmp_path):
    from streammerge.cli import main

    base = testing.make_checkpoint(tmp_path / "base", layers=1)
    adapter = testing.make_adapter(tmp_path / "ad", base, targets=("q_proj",), r=16, alpha=8,
                                   config={k: v for k, v in SPEC_EXAMPLE.items() if k.endswith("pattern")})
    for rules in ("current", "pre-0.14"):
        assert main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / rules),
                     "--device", "cpu", "--pattern-rules", rules, "-q"]) == 0
    w = testing.load_dir(base)[f"{M0}.weight"]
    lora = testing.load_dir(adapter)
    a, b = (lora[f"base_model.model.{M0}.lora_{x}.weight"] for x in "AB")
    for rules, alpha in (("current", 32), ("pre-0.14", 8)):
        got = testing.load_dir(tmp_path / rules)[f"{M0}.weight"]
        assert torch.equal(got, (w.float() + (b @ a) * (alpha / 16)).to(w.dtype)), rules
