"""The planner on tuner adapters, headers only (no file, no tensor): which tensors change, how they may be cut,
what they cost, and every shape disagreement named (``plan.tuned`` and each tuner's ``plan``)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from test_planner_pure import FF, H, checkpoint, header, llama_tensors

from streammerge.adapter import Adapter, parse_config
from streammerge.errors import PlanError, UnsupportedAdapterError
from streammerge.plan.assemble import build_plan
from streammerge.plan.unmerge import build_unmerge_plan
from streammerge.tuners import TUNERS

Q0, UP1 = "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"


def tuner_adapter(peft_type: str, tensors: dict[str, tuple[int, ...]], config: dict | None = None,
                  dtype: str = "F32") -> Adapter:
    """``tensors`` maps key stem (module path + suffix) -> shape."""
    cfg = parse_config({"peft_type": peft_type, "target_modules": ["q_proj", "up_proj"], **(config or {})},
                       Path("/nowhere/t/adapter_config.json"))
    entries = [(k if k.startswith("base_model.vera") else f"base_model.model.{k}",
                "I32" if k.endswith("indices") else dtype, shape) for k, shape in tensors.items()]
    return Adapter(Path("/nowhere/t"), "default", cfg, header("/nowhere/t/adapter_model.safetensors", entries))


def plan_of(ad: Adapter, tensors=None):
    return {t.name: t for t in build_plan(checkpoint(tensors), [ad]).tasks()}


def with_bias(tensors):
    return [*tensors, ("model.layers.0.self_attn.q_proj.bias", "BF16", (H,))]


@pytest.mark.parametrize(("peft_type", "tensors", "config", "whole"), [
    ("LOHA", {f"{Q0}.hada_w1_a": (H, 4), f"{Q0}.hada_w1_b": (4, H), f"{Q0}.hada_w2_a": (H, 4),
              f"{Q0}.hada_w2_b": (4, H)}, {"r": 4, "alpha": 8}, False),
    ("LOKR", {f"{Q0}.lokr_w1": (8, 8), f"{Q0}.lokr_w2": (8, 8)}, {"r": 4, "alpha": 8}, True),
    ("VERA", {f"{Q0}.vera_lambda_b": (H,), f"{Q0}.vera_lambda_d": (4,), "base_model.vera_A": (4, FF),
              "base_model.vera_B": (FF, 4)}, {"r": 4}, False),
    ("OFT", {f"{Q0}.oft_R.weight": (8, 28)}, {"r": 0, "oft_block_size": 8}, True),
    ("BOFT", {f"{Q0}.boft_R": (1, 8, 8, 8), f"{Q0}.boft_s": (H, 1)}, {}, True),
    ("FOURIERFT", {f"{Q0}.fourierft_spectrum": (50,)}, {}, True),
    ("HRA", {f"{Q0}.hra_u": (H, 4)}, {"r": 4}, True),
    ("MISS", {f"{Q0}.miss_block": (4, H)}, {"r": 4}, False),
    ("MISS", {f"{Q0}.miss_block": (H // 4, 4, 4)}, {"r": 4, "init_weights": "bat"}, True),
    ("C3A", {f"{Q0}.c3a_kernel": (4, 4, 16)}, {"block_size": 16}, True),
    ("SHIRA", {f"{Q0}.shira_weight": (512,), f"{Q0}.shira_indices": (2, 512)}, {"r": 4}, False),
    ("DELORA", {f"{Q0}.delora_A": (4, H), f"{Q0}.delora_B": (H, 4), f"{Q0}.delora_lambda": (1,),
                f"{Q0}.delora_w_norm": (H,)}, {"r": 4}, True),
])
def test_one_tuner_step_on_its_target_whole_or_row_blocked(peft_type, tensors, config, whole):
    tasks = plan_of(tuner_adapter(peft_type, tensors, config))
    changed = {n: t for n, t in tasks.items() if t.steps}
    assert list(changed) == [f"{Q0}.weight"]
    (step,) = changed[f"{Q0}.weight"].steps
    assert step.rounding == "tuner" and step.terms[0].tuner == peft_type
    assert changed[f"{Q0}.weight"].whole is whole


def test_scratch_of_a_whole_tensor_tuner_counts_against_the_minimum_budget():
    small = build_plan(checkpoint(), [tuner_adapter("HRA", {f"{Q0}.hra_u": (H, 4)}, {"r": 4})])
    # H×H fp32 Householder product, its update and a copy (Update.work_elements = 3·in²) on top of the block
    assert small.min_memory() >= 3 * 4 * H * H + H * H * (2 + 2)


@pytest.mark.parametrize(("peft_type", "tensors", "config"), [
    ("IA3", {f"{Q0}.ia3_l": (H, 1)}, {"feedforward_modules": []}),
    ("ROAD", {f"{Q0}.road_theta": (H // 2,), f"{Q0}.road_alpha": (H // 2,)}, {"group_size": 8}),
])
def test_output_scaling_tuners_also_change_the_bias(peft_type, tensors, config):
    tasks = plan_of(tuner_adapter(peft_type, tensors, config), with_bias(llama_tensors()))
    assert sorted(n for n, t in tasks.items() if t.steps) == [f"{Q0}.bias", f"{Q0}.weight"]


def test_feed_forward_ia3_scales_inputs_and_leaves_the_bias():
    ad = tuner_adapter("IA3", {f"{Q0}.ia3_l": (1, H)}, {"feedforward_modules": ["q_proj"]})
    tasks = plan_of(ad, with_bias(llama_tensors()))
    assert sorted(n for n, t in tasks.items() if t.steps) == [f"{Q0}.weight"]


@pytest.mark.parametrize(("peft_type", "tensors", "config", "message"), [
    ("LOKR", {f"{UP1}.lokr_w1": (8, 8), f"{UP1}.lokr_w2": (8, 8)}, {"r": 4},
     f"module {UP1!r}: LoKr factors (8, 8) ⊗ (8, 8) do not make base weight shape ({FF}, {H})"),
    ("OFT", {f"{Q0}.oft_R.weight": (8, 27)}, {"r": 0, "oft_block_size": 8},
     "oft_R has shape (8, 27), which is no set of b×b skew blocks covering the 64 inputs"),
    ("IA3", {f"{Q0}.ia3_l": (1, H)}, {"feedforward_modules": []},
     "ia3_l has shape (1, 64) but base weight (64, 64) (not feed-forward per feedforward_modules) needs (64, 1)"),
    ("LOHA", {f"{Q0}.hada_w1_a": (H, 4), f"{Q0}.hada_w1_b": (4, H), f"{Q0}.hada_w2_a": (H, 4),
              f"{Q0}.hada_w2_b": (4, H)}, {"r": 8},
     "has rank 4 in its tensors but adapter_config.json gives r=8"),
    ("LOHA", {f"{Q0}.hada_w1_a": (H, 4), f"{Q0}.hada_w1_b": (4, H)}, {"r": 4},
     "but no w2a, w2b tensor; the adapter file is incomplete"),
    ("C3A", {f"{Q0}.c3a_kernel": (4, 4, 8)}, {"block_size": 8}, "c3a_kernel has shape (4, 4, 8)"),
    ("ROAD", {f"{Q0}.road_theta": (H,), f"{Q0}.road_alpha": (H,)}, {"group_size": 8},
     "road_theta (64,) / road_alpha (64,) do not fit 64 outputs with variant 'road_1' (want (32,))"),
    ("VERA", {f"{Q0}.vera_lambda_b": (H,), f"{Q0}.vera_lambda_d": (4,)}, {"r": 4},
     "no base_model.vera_A / base_model.vera_B projections although save_projection is true"),
    ("SHIRA", {f"{Q0}.shira_weight": (10,), f"{Q0}.shira_indices": (2, 9)}, {}, "shira_indices (2, 9)"),
    ("MISS", {f"{Q0}.miss_block": (4, 32)}, {"r": 4}, "miss_block has shape (4, 32)"),
    ("HRA", {f"{Q0}.lora_A.weight": (4, H)}, {},
     f"tensor 'base_model.model.{Q0}.lora_A.weight' is not a HRA tensor"),
])
def test_disagreements_are_named(peft_type, tensors, config, message):
    with pytest.raises(PlanError) as e:
        build_plan(checkpoint(), [tuner_adapter(peft_type, tensors, config)])
    assert message in str(e.value) and "/nowhere/t/adapter_model.safetensors" in str(e.value), str(e.value)


def test_a_tuner_on_an_integer_base_tensor_is_refused():
    tensors = [(n, "I8" if n == f"{Q0}.weight" else d, s) for n, d, s in llama_tensors()]
    with pytest.raises(PlanError, match=f"base tensor '{Q0}.weight' is I8, not a float dtype; a HRA update"):
        build_plan(checkpoint(tensors), [tuner_adapter("HRA", {f"{Q0}.hra_u": (H, 4)})])


def test_unmerge_replays_each_tuners_inverse_and_refuses_a_fraction():
    merged = checkpoint(with_bias(llama_tensors()))
    ad = tuner_adapter("ROAD", {f"{Q0}.road_theta": (H // 2,), f"{Q0}.road_alpha": (H // 2,)}, {"group_size": 8})
    tasks = {t.name: t for t in build_unmerge_plan(merged, ad).tasks() if t.steps}
    assert sorted(tasks) == [f"{Q0}.bias", f"{Q0}.weight"]
    assert all(t.steps[0].rounding == "tuner" and t.steps[0].terms[0].inverse for t in tasks.values())
    with pytest.raises(UnsupportedAdapterError, match=r"cannot unmerge a ROAD adapter with weight 0\.5"):
        build_unmerge_plan(merged, ad, weight=0.5)


def test_a_tuner_without_an_inverse_is_refused_by_name(monkeypatch):
    """The protocol's ``invert=None`` (no tuner of PEFT 0.21 in the registry lacks an unmerge)."""
    monkeypatch.setitem(TUNERS, "HRA", replace(TUNERS["HRA"], invert=None, no_inverse="the reflections were lost"))
    ad = tuner_adapter("HRA", {f"{Q0}.hra_u": (H, 4)}, {"r": 4})
    with pytest.raises(UnsupportedAdapterError) as e:
        build_unmerge_plan(checkpoint(), ad)
    assert str(e.value).startswith("/nowhere/t: cannot unmerge: the reflections were lost; pass --base ORIGINAL")
    original = checkpoint()
    restored = {t.name: t for t in build_unmerge_plan(checkpoint(), ad, base=original).tasks() if t.kind != "copy"}
    assert list(restored) == [f"{Q0}.weight"] and restored[f"{Q0}.weight"].kind == "replace"


def test_grouped_conv_feed_forward_ia3_is_planned_with_its_groups():
    """l (1, in_channels, 1, 1) on a groups=2 Conv2d W (16, 4, 3, 3): PEFT expands it per group; so do we."""
    tensors = [("g.weight", "BF16", (16, 4, 3, 3)), ("g.bias", "BF16", (16,))]
    ad = tuner_adapter("IA3", {"g.ia3_l": (1, 8, 1, 1)}, {"target_modules": ["g"], "feedforward_modules": ["g"]})
    tasks = plan_of(ad, tensors)
    assert [n for n, t in tasks.items() if t.steps] == ["g.weight"]
    bad = tuner_adapter("IA3", {"g.ia3_l": (1, 6, 1, 1)}, {"target_modules": ["g"], "feedforward_modules": ["g"]})
    with pytest.raises(PlanError, match=r"ia3_l has shape \(1, 6, 1, 1\)"):
        plan_of(bad, tensors)
