"""transformers v5 in-memory names → disk names (``streammerge.renames``), and the Llava parity cases.

transformers ≥ 4.52 loads Llava as ``model.language_model.*`` / ``model.vision_tower.*`` / ``lm_head`` but saves
the original names; a PEFT adapter trained on it names the in-memory modules (spec §2.4 step 4, §6.4).
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch
from oracle import cached_case, diff_checkpoints, load_checkpoint, load_merged, logits
from safetensors.torch import load_file, save_file

import streammerge
from streammerge import naming, renames
from streammerge.cli import main
from streammerge.errors import PlanError

LLAVA_V5_DISK = frozenset({  # what transformers 5.23 writes for a tiny Llava (checked in test_llava_disk_names)
    "language_model.model.layers.0.self_attn.q_proj.weight",
    "language_model.model.embed_tokens.weight",
    "language_model.lm_head.weight",
    "vision_tower.encoder.layers.0.mlp.fc1.weight",
    "multi_modal_projector.linear_1.weight",
})
LLAVA_HUB_DISK = frozenset({  # llava-hf checkpoints saved before transformers 5 keep CLIP's vision_model prefix
    "language_model.model.layers.0.self_attn.q_proj.weight",
    "language_model.model.embed_tokens.weight",
    "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
    "multi_modal_projector.linear_1.weight",
})
MIXTRAL_DISK = frozenset({"model.layers.0.block_sparse_moe.gate.weight", "model.layers.0.self_attn.q_proj.weight"})
BERT_DISK = frozenset({"bert.encoder.layer.0.attention.output.LayerNorm.gamma",
                       "bert.encoder.layer.0.attention.output.LayerNorm.beta"})
TIED_LLAVA = {"language_model.lm_head.weight": "language_model.model.embed_tokens.weight"}

# (id, in-memory name, disk names, tied aliases, expected disk tensor or None, renames the row exercises)
RESOLVE_TABLE = [
    ("llava-text", "model.language_model.layers.0.self_attn.q_proj.weight", LLAVA_V5_DISK, {},
     "language_model.model.layers.0.self_attn.q_proj.weight", {"llava"}),
    ("llava-vision-v5-saved", "model.vision_tower.encoder.layers.0.mlp.fc1.weight", LLAVA_V5_DISK, {},
     "vision_tower.encoder.layers.0.mlp.fc1.weight", {"llava"}),
    ("llava-vision-hub", "model.vision_tower.encoder.layers.0.mlp.fc1.weight", LLAVA_HUB_DISK, {},
     "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight", {"CLIPVisionModel"}),
    ("llava-projector", "model.multi_modal_projector.linear_1.weight", LLAVA_V5_DISK, {},
     "multi_modal_projector.linear_1.weight", {"llava"}),
    ("llava-lm-head", "lm_head.weight", LLAVA_V5_DISK, {}, "language_model.lm_head.weight", {"llava"}),
    ("llava-lm-head-tied", "lm_head.weight", LLAVA_HUB_DISK, TIED_LLAVA,
     "language_model.model.embed_tokens.weight", {"llava"}),
    ("llava-pre-4.52-adapter", "language_model.model.layers.0.self_attn.q_proj.weight", LLAVA_V5_DISK, {},
     "language_model.model.layers.0.self_attn.q_proj.weight", set()),
    ("mixtral-router", "model.layers.0.mlp.gate.weight", MIXTRAL_DISK, {},
     "model.layers.0.block_sparse_moe.gate.weight", {"mixtral"}),
    ("legacy-gamma", "bert.encoder.layer.0.attention.output.LayerNorm.weight", BERT_DISK, {},
     "bert.encoder.layer.0.attention.output.LayerNorm.gamma", {"legacy"}),
    ("legacy-beta-no-prefix", "encoder.layer.0.attention.output.LayerNorm.bias", BERT_DISK, {},
     "bert.encoder.layer.0.attention.output.LayerNorm.beta", {"legacy"}),
    ("unknown", "model.language_model.layers.0.self_attn.qq_proj.weight", LLAVA_V5_DISK, {}, None, set()),
    ("fused-experts-are-not-renames", "model.layers.0.mlp.experts.gate_up_proj", MIXTRAL_DISK, {}, None, set()),
]


@pytest.mark.parametrize(("name", "disk", "aliases", "expected"),
                         [pytest.param(*row[1:5], id=row[0]) for row in RESOLVE_TABLE])
def test_resolve_maps_in_memory_names_to_disk(name: str, disk: frozenset, aliases: dict, expected: str | None) -> None:
    assert naming.resolve(name, disk, aliases) == expected


def test_every_rename_is_exercised_by_the_table() -> None:
    used = set().union(*(row[5] for row in RESOLVE_TABLE))
    assert {r.family for r in renames.RENAMES} <= used


def test_rename_candidates_compose_and_never_return_the_name_itself() -> None:
    cands = renames.disk_candidates("model.vision_tower.encoder.layers.0.LayerNorm.weight")
    assert "vision_tower.encoder.layers.0.LayerNorm.gamma" in cands  # llava + legacy, composed
    assert "model.vision_tower.encoder.layers.0.LayerNorm.weight" not in cands
    assert renames.disk_candidates("model.layers.0.self_attn.q_proj.weight") == ()


# ----------------------------------------------------------------------------------------------------------
# Llava end to end


@pytest.fixture(scope="module")
def llava_cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    root = tmp_path_factory.getbasetemp() / "moe-cases"
    out = {}
    for name in ("llava_v5_names", "llava_pre_452_names"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            case = cached_case(name, root)
        merged = case.base_dir.parent / "out-names"
        if not merged.exists():
            streammerge.merge(base=case.base_dir, adapter=case.adapter_dir, out=merged, device="cpu")
        out[name] = (case, merged)
    return out


def test_llava_disk_names_and_adapter_keys(llava_cases: dict[str, tuple]) -> None:
    """What transformers 5.23 saves for a tiny Llava, and what PEFT 0.21 saves for an adapter on it."""
    case, _ = llava_cases["llava_v5_names"]
    disk = set(load_checkpoint(case.base_dir))
    assert disk >= LLAVA_V5_DISK
    assert not [k for k in disk if k.startswith(("model.", "lm_head"))]  # original layout kept on save
    keys = set(load_file(case.adapter_dir / "adapter_model.safetensors"))
    assert "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.vision_tower.encoder.layers.0.mlp.fc1.lora_A.weight" in keys
    assert "base_model.model.model.multi_modal_projector.linear_1.lora_A.weight" in keys
    assert "base_model.model.lm_head.lora_A.weight" in keys
    assert "base_model.model.lm_head.base_layer.weight" in keys  # the targeted head's copy, in-memory name


def test_llava_v5_adapter_bit_identical_to_peft_with_disk_names(llava_cases: dict[str, tuple]) -> None:
    case, merged = llava_cases["llava_v5_names"]
    ours = load_checkpoint(merged)
    assert diff_checkpoints(ours, load_checkpoint(case.ref_dir)) == []
    assert set(ours) == set(load_checkpoint(case.base_dir))  # the output keeps the disk names
    base = load_checkpoint(case.base_dir)
    assert sorted(k for k in case.must_change if torch.equal(ours[k], base[k])) == []


def test_llava_merged_model_loads_and_matches_peft_logits(llava_cases: dict[str, tuple]) -> None:
    case, merged = llava_cases["llava_v5_names"]
    ours = logits(load_merged(case.auto_class, merged), case.input_ids)
    assert torch.equal(ours, case.ref_logits)
    assert not torch.allclose(ours, case.base_logits, atol=1e-2)


def test_pre_452_adapter_with_disk_names_gives_the_same_checkpoint(llava_cases: dict[str, tuple]) -> None:
    """The same weights saved with pre-4.52 key names (disk names) merge to exactly PEFT's v5 result.

    PEFT 0.21 itself does not: it maps the pre-4.52 language-model keys but not the vision tower, projector
    and lm_head ones, which then keep their random init (init_lora_weights=False) — recorded here as a fact.
    """
    v5_case, _ = llava_cases["llava_v5_names"]
    old_case, merged = llava_cases["llava_pre_452_names"]
    assert diff_checkpoints(load_checkpoint(merged), load_checkpoint(v5_case.ref_dir)) == []
    peft_old, peft_v5 = load_checkpoint(old_case.ref_dir), load_checkpoint(v5_case.ref_dir)
    assert torch.equal(peft_old["language_model.model.layers.0.self_attn.q_proj.weight"],
                       peft_v5["language_model.model.layers.0.self_attn.q_proj.weight"])
    assert not torch.equal(peft_old["multi_modal_projector.linear_1.weight"],
                           peft_v5["multi_modal_projector.linear_1.weight"])


def _break_key(case_adapter: Path, dest: Path) -> Path:
    shutil.copytree(case_adapter, dest)
    path = dest / "adapter_model.safetensors"
    sd = {k.replace("layers.0.self_attn.q_proj", "layers.0.self_attn.qq_proj"): v for k, v in load_file(path).items()}
    save_file(sd, path, metadata={"format": "pt"})
    return dest


def test_a_name_that_maps_nowhere_fails_loudly(llava_cases: dict[str, tuple], tmp_path: Path, capsys) -> None:
    case, _ = llava_cases["llava_v5_names"]
    adapter = _break_key(case.adapter_dir, tmp_path / "adapter")
    with pytest.raises(PlanError, match=r"model\.language_model\.layers\.0\.self_attn\.qq_proj\.weight"):
        streammerge.plan_merge(base=case.base_dir, adapter=adapter)
    out = tmp_path / "out"
    assert main(["merge", "--base", str(case.base_dir), "--adapter", str(adapter), "--out", str(out),
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith(f"error: {len(err) - 1} problems fitting the adapter(s) {adapter} to the base ")
    assert all(line.startswith("  ") for line in err[1:]) and any("qq_proj" in line for line in err[1:])
    assert not out.exists()
