"""The planner driven with headers only: no tensor, no file, no torch op (huggingface_hub's style of
testing its sharding planner with sizes standing in for tensors)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streammerge.adapter import Adapter, parse_config
from streammerge.checkpoint import Checkpoint
from streammerge.errors import PlanError
from streammerge.formats.safetensors import SafetensorsHeader, encode_header
from streammerge.plan import CombineOptions, PlanOptions, block_bytes
from streammerge.plan.assemble import build_plan
from streammerge.plan.combined import build_combined_plan

H, FF, V = 64, 128, 96  # hidden, intermediate, vocab


def header(path: str, tensors: list[tuple[str, str, tuple[int, ...]]]) -> SafetensorsHeader:
    raw, infos = encode_header(tensors, {"format": "pt"})
    return SafetensorsHeader(path, raw, infos, (("format", "pt"),))


def llama_tensors(layers: int = 2) -> list[tuple[str, str, tuple[int, ...]]]:
    out = [("model.embed_tokens.weight", "BF16", (V, H)), ("model.norm.weight", "BF16", (H,)),
           ("lm_head.weight", "BF16", (V, H))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", "BF16", (H, H)), (p + "self_attn.v_proj.weight", "BF16", (H, H)),
                (p + "mlp.up_proj.weight", "BF16", (FF, H)), (p + "input_layernorm.weight", "BF16", (H,))]
    return out


def checkpoint(tensors=None, shards: int = 1, config=None) -> Checkpoint:
    tensors = tensors if tensors is not None else llama_tensors()
    per = -(-len(tensors) // shards)
    groups = [tensors[i:i + per] for i in range(0, len(tensors), per)]
    names = tuple(f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups)))
    return Checkpoint(root=Path("/nowhere/base"), shards=tuple(header(f"/nowhere/base/{n}", g)
                                                                for n, g in zip(names, groups, strict=True)),
                      shard_names=names, has_index=shards > 1, index_metadata={},
                      config={"model_type": "llama", "tie_word_embeddings": False, **(config or {})})


def adapter(modules: dict[str, tuple[int, int]], r: int = 4, alpha: float = 8, name: str = "a",
            extra: dict | None = None, keys=None) -> Adapter:
    """A LoRA adapter header: ``modules`` maps module path -> (out, in) of its base weight."""
    tensors = []
    for module, (out_f, in_f) in modules.items():
        key = f"base_model.model.{module}"
        tensors += [(f"{key}.lora_A.weight", "F32", (r, in_f)), (f"{key}.lora_B.weight", "F32", (out_f, r))]
    tensors += list(keys or [])
    cfg = parse_config({"peft_type": "LORA", "r": r, "lora_alpha": alpha,
                        "target_modules": sorted({m.rpartition(".")[2] for m in modules}) or ["q_proj"],
                        **(extra or {})}, Path(f"/nowhere/{name}/adapter_config.json"))
    return Adapter(Path(f"/nowhere/{name}"), "default", cfg, header(f"/nowhere/{name}/adapter_model.safetensors",
                                                                     tensors))


Q0, V1 = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"


def test_each_base_tensor_once_merged_where_targeted_and_header_bytes_reused():
    ckpt = checkpoint(shards=2)
    plan = build_plan(ckpt, [adapter({Q0: (H, H), V1: (H, H)})])
    names = [t.name for t in plan.tasks()]
    assert sorted(names) == sorted(n for n, _, _ in llama_tensors())
    merged = {t.name: t for t in plan.tasks() if t.kind == "merge"}
    assert sorted(merged) == [Q0 + ".weight", V1 + ".weight"]
    (step,) = merged[Q0 + ".weight"].steps
    (term,) = step.terms
    assert (step.rounding, term.layout, term.scale) == ("once", "linear", 8 / 4)
    assert term.a.path == "/nowhere/a/adapter_model.safetensors" and term.a.shape == (4, H)
    # a merge changes no name, shape or dtype: each output header is the base header, byte for byte
    assert [s.header for s in plan.shards] == [h.raw for h in ckpt.shards]
    assert plan.write_index and plan.counts() == {"merge": 2, "replace": 0, "add": 0, "copy": 9, "drop": 0}


def test_plan_twice_is_equal_and_pickles():
    ckpt, a = checkpoint(), adapter({Q0: (H, H)})
    plan = build_plan(ckpt, [a])
    assert plan == build_plan(ckpt, [a])
    assert pickle.loads(pickle.dumps(plan)) == plan


def test_problems_are_all_reported_together_by_name():
    bad = adapter({Q0: (H + 1, H), "model.layers.0.self_attn.x_proj": (H, H)},
                  extra={"target_modules": ["q_proj", "x_proj"]})
    with pytest.raises(PlanError) as e:
        build_plan(checkpoint(), [bad])
    text = str(e.value)
    assert "makes a delta of shape (65, 64) but base tensor 'model.layers.0.self_attn.q_proj.weight'" in text
    assert "(and 1 more problem(s): " in text and "'model.layers.0.self_attn.x_proj.weight'" in text


def test_rank_pattern_and_rslora_scales():
    a = adapter({Q0: (H, H)}, r=4, alpha=8, extra={"use_rslora": True})
    (term,) = next(t for t in build_plan(checkpoint(), [a]).tasks() if t.kind == "merge").steps[0].terms
    assert term.scale == 8 / 2  # alpha / sqrt(r)


def test_lora_on_a_tied_head_lands_on_the_embedding():
    tensors = [t for t in llama_tensors() if t[0] != "lm_head.weight"]
    ckpt = checkpoint(tensors, config={"tie_word_embeddings": True})
    plan = build_plan(ckpt, [adapter({"lm_head": (V, H)})])
    (task,) = [t for t in plan.tasks() if t.kind == "merge"]
    assert task.name == "model.embed_tokens.weight" and "lm_head.weight" not in plan.weight_map()
    assert any("tied" in w for w in plan.warnings)


def test_weighted_combination_is_one_step_per_tensor_with_every_adapter():
    a1, a2 = adapter({Q0: (H, H)}, name="a1"), adapter({Q0: (H, H), V1: (H, H)}, r=2, name="a2")
    plan = build_combined_plan(checkpoint(), [a1, a2], CombineOptions(weights=(0.7, -0.3)))
    q = next(t for t in plan.tasks() if t.name == Q0 + ".weight")
    (step,) = q.steps
    assert [(t.task, t.weight, t.scale) for t in step.terms] == [(0, 0.7, 2.0), (1, -0.3, 4.0)]
    assert step.combination is None and step.rounding == "once"


def test_reshard_respects_the_limit_and_the_base_order():
    ckpt = checkpoint()
    plan = build_plan(ckpt, [adapter({Q0: (H, H)})], PlanOptions(max_shard_size=40_000))
    assert len(plan.shards) > 1 and all(s.data_size <= 40_000 for s in plan.shards)
    assert [t.name for t in plan.tasks()] == [i.name for h in ckpt.shards for i in h.tensors]  # base data order


@given(targets=st.sets(st.sampled_from([Q0, V1, "model.layers.1.mlp.up_proj", "model.layers.0.mlp.up_proj"])),
       shards=st.integers(1, 4), r=st.integers(1, 8))
def test_property_every_tensor_once_and_merged_exactly_where_targeted(targets, shards, r):
    shapes = {n.removesuffix(".weight"): s for n, _, s in llama_tensors()}
    plan = build_plan(checkpoint(shards=shards), [adapter({m: shapes[m] for m in targets}, r=r)])
    names = [t.name for t in plan.tasks()]
    assert len(names) == len(set(names)) == len(llama_tensors())
    assert {t.name for t in plan.tasks() if t.kind == "merge"} == {m + ".weight" for m in targets}
    # the budget's unit: a plan can run in its own minimum, which covers every merge task's smallest block
    assert plan.min_memory() == max((block_bytes(t, t.min_rows) for t in plan.tasks() if t.steps), default=0)
