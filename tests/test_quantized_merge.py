"""Merging into FP8 bases (block FP8 and compressed-tensors float-quantized), both output modes.

* ``--dequantize`` is bit-identical to transformers loading the base dequantized (``FineGrainedFP8Config`` /
  ``CompressedTensorsConfig(dequantize=True)``, both run on CPU) + PEFT ``merge_and_unload`` + ``save_pretrained``;
  for block FP8 with partial edge blocks (where transformers reads the block size off the scale grid and is
  wrong, see test_formats_fp8) to compressed-tensors' reference dequantizer + the same PEFT merge.
* keep-format: untouched tensors and scales byte-identical; touched weights re-quantized with fresh scales of
  the base's shapes and dtypes, within half an E4M3 step of the ``--dequantize`` merge per element; the output
  loads with transformers and its logits follow the bf16 merge's.
* block-row streaming within ``--max-memory``; ``verify`` and ``--resume`` with only ``--out``; ``--dry-run``
  counts; malformed quantized bases refused with one line, exit 2, nothing written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import fp8_bases
import pytest
import torch
from oracle import load_checkpoint
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, CompressedTensorsConfig, FineGrainedFP8Config

import streammerge
from streammerge import execute, testing
from streammerge.cli import main
from streammerge.execute import ExecOptions, block_rows
from streammerge.formats import fp8
from streammerge.formats.base import grid
from streammerge.formats.reader import TensorReader
from streammerge.plan import block_bytes

TARGETS = ("q_proj", "v_proj", "up_proj", "down_proj")
IDS = torch.tensor([[1, 5, 9, 3, 77, 12, 100, 4]])


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """bf16 bases (divisible and partial-edge shapes), their FP8 versions and one adapter each."""
    root = tmp_path_factory.mktemp("fp8")
    small = testing.make_checkpoint(root / "small", layers=2, hidden=64, intermediate=128, vocab=128)
    # 320 = 2.5 blocks of 128: partial edge blocks in rows (gate/up) and columns (down); 2 shards
    wide = testing.make_checkpoint(root / "wide", layers=2, hidden=256, intermediate=320, vocab=128, shards=2)
    out = {
        "small": small, "wide": wide,
        "small_adapter": testing.make_adapter(root / "a_small", small, targets=TARGETS),
        "wide_adapter": testing.make_adapter(root / "a_wide", wide, targets=TARGETS),
        "block32": fp8_bases.block_fp8(small, root / "block32", block=(32, 32)),
        "block128": fp8_bases.block_fp8(wide, root / "block128", block=(128, 128)),
    }
    for strategy in ("tensor", "channel", "block"):
        out[f"ct_{strategy}"] = fp8_bases.compressed_fp8(wide, root / f"ct_{strategy}", strategy=strategy)
    return out


def _peft_saved(base: Path, adapter: Path, out: Path, **load) -> dict[str, torch.Tensor]:
    """transformers loads ``base`` (dequantizing as ``load`` says), PEFT merges, save_pretrained writes."""
    model = AutoModelForCausalLM.from_pretrained(base, **load)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(out)
    return load_checkpoint(out)


def _merge(base: Path, adapter: Path, out: Path, *extra: str) -> None:
    assert main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out), "--device", "cpu",
                 "-q", *extra]) == 0


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def _assert_same(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert sorted(ours) == sorted(ref)
    for name in ref:
        assert ours[name].dtype == ref[name].dtype and torch.equal(_bits(ours[name]), _bits(ref[name])), name


# ------------------------------------------------------------------------------------------------ --dequantize

@pytest.mark.parametrize("base,load", [
    ("block32", {"quantization_config": FineGrainedFP8Config(dequantize=True)}),
    ("ct_tensor", {"quantization_config": CompressedTensorsConfig(dequantize=True)}),
    ("ct_channel", {"quantization_config": CompressedTensorsConfig(dequantize=True)}),
    ("ct_block", {"quantization_config": CompressedTensorsConfig(dequantize=True)}),
])
def test_dequantize_is_transformers_dequantized_load_plus_peft_merge(bases, tmp_path, base, load):
    adapter = bases["small_adapter" if base == "block32" else "wide_adapter"]
    _merge(bases[base], adapter, tmp_path / "ours", "--dequantize")
    ref = _peft_saved(bases[base], adapter, tmp_path / "ref", **load)
    _assert_same(load_checkpoint(tmp_path / "ours"), ref)
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert "quantization_config" not in config and config.get("torch_dtype", config.get("dtype")) == "bfloat16"


def _reference_dequantized(fp8_base: Path, ref_base: Path) -> Path:
    """``fp8_base`` rewritten as a plain bf16 checkpoint by compressed-tensors' FP8BlockDequantizer (what
    DeepSeek's weight_dequant computes), scales and quantization_config gone."""
    from compressed_tensors.entrypoints.convert.converters.fp8block_dequantizer import FP8BlockDequantizer

    block = tuple(json.loads((fp8_base / "config.json").read_text())["quantization_config"]["weight_block_size"])
    deq = FP8BlockDequantizer(weight_block_size=block, dtype=torch.bfloat16)
    shutil.copytree(fp8_base, ref_base)
    for shard in sorted(ref_base.glob("*.safetensors")):
        t = load_file(shard)
        out = {n: deq._create_dequantized_weight(v, t[n + "_scale_inv"]).contiguous() if n + "_scale_inv" in t else v
               for n, v in t.items() if not n.endswith("_scale_inv")}
        save_file(out, shard, metadata={"format": "pt"})
    index = json.loads((ref_base / "model.safetensors.index.json").read_text())
    index["weight_map"] = {n: f for n, f in index["weight_map"].items() if not n.endswith("_scale_inv")}
    (ref_base / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((ref_base / "config.json").read_text())
    del config["quantization_config"]
    (ref_base / "config.json").write_text(json.dumps(config))
    return ref_base


def test_dequantize_partial_edge_blocks_is_reference_dequantizer_plus_peft_merge(bases, tmp_path):
    """DeepSeek-shaped 128×128 blocks over 256×320 weights: transformers cannot read partial edge blocks, so the
    reference is the block dequantizer's bf16 base, then PEFT."""
    ref_base = _reference_dequantized(bases["block128"], tmp_path / "ref_base")
    _merge(bases["block128"], bases["wide_adapter"], tmp_path / "ours", "--dequantize")
    ref = _peft_saved(ref_base, bases["wide_adapter"], tmp_path / "ref")
    _assert_same(load_checkpoint(tmp_path / "ours"), ref)


def test_weighted_merge_of_two_adapters_into_fp8_is_the_merge_into_its_dequantized_base(bases, tmp_path):
    """Combinations go through the same decode: --dequantize of a weighted two-adapter merge equals that merge
    into the reference-dequantized bf16 base (whose parity with PEFT the combination tests establish)."""
    second = testing.make_adapter(tmp_path / "a2", bases["wide"], targets=("q_proj", "o_proj"), seed=7)
    ref_base = _reference_dequantized(bases["block128"], tmp_path / "ref_base")
    args = ["--adapter", str(second), "--weights", "0.7,-0.3"]
    _merge(bases["block128"], bases["wide_adapter"], tmp_path / "ours", "--dequantize", *args)
    _merge(ref_base, bases["wide_adapter"], tmp_path / "ref", *args)
    _assert_same(load_checkpoint(tmp_path / "ours"), load_checkpoint(tmp_path / "ref"))


# ------------------------------------------------------------------------------------------------ keep the format

def _stored(ckpt: Path) -> dict[str, tuple[str, torch.Tensor]]:
    """name -> (safetensors dtype, tensor) of every shard."""
    out = {}
    for shard in sorted(ckpt.glob("*.safetensors")):
        header = json.loads(shard.read_bytes()[8 : 8 + int.from_bytes(shard.read_bytes()[:8], "little")])
        with safe_open(shard, "pt") as f:
            for name in f.keys():  # noqa: SIM118
                out[name] = (header[name]["dtype"], f.get_tensor(name))
    return out


@pytest.mark.parametrize("base", ["block128", "ct_tensor", "ct_channel", "ct_block"])
def test_keep_format_requantizes_touched_weights_only_within_half_a_step(bases, tmp_path, base):
    adapter = bases["wide_adapter"]
    _merge(bases[base], adapter, tmp_path / "keep")
    _merge(bases[base], adapter, tmp_path / "deq", "--dequantize")
    src, out, deq = _stored(bases[base]), _stored(tmp_path / "keep"), load_checkpoint(tmp_path / "deq")
    assert sorted(out) == sorted(src)
    assert json.loads((tmp_path / "keep" / "config.json").read_text())["quantization_config"] == \
        json.loads((bases[base] / "config.json").read_text())["quantization_config"]
    suffix = "_scale_inv" if base == "block128" else "_scale"
    touched = {n for n in src if n.endswith(".weight") and n.split(".")[-2] in TARGETS}
    assert len(touched) == 8
    for name, (dtype, t) in src.items():
        got_dtype, got = out[name]
        assert (got_dtype, got.shape) == (dtype, t.shape), name  # shapes and dtypes as the base, scales included
        owner = name.removesuffix(suffix)
        if name not in touched and owner not in touched:
            assert torch.equal(_bits(got), _bits(t)), f"{name} is untouched and must be byte-identical"
    for name in touched:
        q, s = out[name][1], out[name + suffix][1]
        block = {"block128": (128, 128), "ct_block": (128, 128), "ct_channel": (1, q.shape[1]),
                 "ct_tensor": tuple(q.shape)}[base]
        cells = s.reshape(grid(tuple(q.shape), block))
        merged = deq[name]  # the --dequantize merge: the bf16 value the format must hold
        exact = fp8.dequantize(q, cells, block, torch.float64)  # q·s before any rounding to a model dtype
        # half a step, up to the fp32 roundings of merged / s (which may turn a near-tie into a tie) and of q·s
        bound = fp8.half_step(merged, cells, block) * (1 + 2.0**-20) + exact.abs() * 2.0**-23
        assert bool(((exact - merged.double()).abs() <= bound).all()), name
        assert not torch.equal(_bits(q), _bits(src[name][1])), f"{name} was merged, its codes must change"


@pytest.mark.parametrize("base,load", [
    # transformers reads the block off the scale grid, so it cannot load partial edge blocks (the 128-block
    # base either): the loading test uses 32×32 blocks that divide the 64/128 shapes.
    ("block32", {"quantization_config": FineGrainedFP8Config(dequantize=True)}),
    ("ct_channel", {"quantization_config": CompressedTensorsConfig(dequantize=True)}),
    ("ct_block", {"quantization_config": CompressedTensorsConfig(dequantize=True)}),
])
def test_keep_format_loads_with_transformers_and_follows_the_bf16_merge(bases, tmp_path, base, load):
    adapter = bases["small_adapter" if base == "block32" else "wide_adapter"]
    report = streammerge.merge(bases[base], adapter, tmp_path / "keep", device="cpu")
    assert [r[0] for r in report.requantized] == sorted(
        n for n in load_checkpoint(tmp_path / "keep") if n.endswith(".weight") and n.split(".")[-2] in TARGETS)
    assert all(r[2] <= 1 + 2.0**-16 for r in report.requantized), report.requantized  # up to fp32 roundings
    _merge(bases[base], adapter, tmp_path / "deq", "--dequantize")
    with torch.no_grad():
        keep = AutoModelForCausalLM.from_pretrained(tmp_path / "keep", **load)(IDS).logits.float()
        bf16 = AutoModelForCausalLM.from_pretrained(tmp_path / "deq")(IDS).logits.float()
        base_logits = AutoModelForCausalLM.from_pretrained(bases[base], **load)(IDS).logits.float()
    # Re-quantizing the merged weights moves the logits by less than the adapter itself does.
    requant_shift = (keep - bf16).abs().max()
    adapter_shift = (bf16 - base_logits).abs().max()
    assert requant_shift < 0.5 * adapter_shift, (float(requant_shift), float(adapter_shift))


# ------------------------------------------------------------------------------------------------ memory, round trips

def test_fp8_blocks_requantize_block_row_by_block_row_within_the_budget(bases, tmp_path):
    adapter = bases["wide_adapter"]
    plan = streammerge.plan_merge(bases["block128"], adapter)
    task = next(t for t in plan.tasks() if t.name == "model.layers.0.mlp.up_proj.weight")  # 320 rows: 128+128+64
    assert task.quant is not None and task.quant.encode and task.row_align == 128
    one_block = block_bytes(task, 128)
    assert one_block < block_bytes(task, task.rows)
    # the budget for one 128-row block per worker (+1 ahead): the executor cuts the FP8 weight into block rows
    opts = ExecOptions(torch.device("cpu"), 1, 2 * one_block)
    assert block_rows(task, opts) == 128
    with TensorReader() as reader:
        pieces = [(p.r0, p.r1, p.data.clone()) for p in execute.pieces([task], reader, opts)]
    assert [(r0, r1) for r0, r1, _ in pieces] == [(0, 128), (128, 256), (256, 320)]  # the last: a partial block row
    _merge(bases["block128"], adapter, tmp_path / "tight", "--max-memory", str(plan.min_memory()), "--workers", "1")
    _merge(bases["block128"], adapter, tmp_path / "roomy", "--max-memory", "1GiB", "--workers", "3")
    for shard in sorted((tmp_path / "roomy").glob("*.safetensors")):
        assert (tmp_path / "tight" / shard.name).read_bytes() == shard.read_bytes()
    merged = load_checkpoint(tmp_path / "tight")[task.name]
    assert torch.equal(_bits(torch.cat([d for _, _, d in pieces])), _bits(merged))
    assert main(["merge", "--base", str(bases["block128"]), "--adapter", str(adapter), "--out",
                 str(tmp_path / "too_tight"), "--max-memory", str(plan.min_memory() - 1024), "-q"]) == 2


@pytest.mark.parametrize("mode", [(), ("--dequantize",)], ids=["keep", "dequantize"])
@pytest.mark.parametrize("base", ["block128", "ct_tensor"])
def test_verify_and_resume_with_nothing_but_out(bases, tmp_path, capsys, base, mode):
    out = tmp_path / "out"
    _merge(bases[base], bases["wide_adapter"], out, *mode)
    first = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert main(["verify", "--out", str(out)]) == 0, capsys.readouterr()
    assert main(["verify", "--out", str(out), "--sample", "64"]) == 0, capsys.readouterr()
    shard = sorted(out.glob("*.safetensors"))[0]
    shard.unlink()
    assert main(["merge", "--out", str(out), "--resume", "--device", "cpu", "-q"]) == 0, capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == first


def test_dry_run_counts_per_format(bases, tmp_path, capsys):
    args = ["merge", "--base", str(bases["ct_channel"]), "--adapter", str(bases["wide_adapter"]), "--dry-run"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    keep = capsys.readouterr().out
    assert ("quantized base (compressed-fp8, keep the format): 0 tensors dequantized, 16 re-quantized (weights and "
            "fresh scales), 26 copied raw, 0 scales dropped") in keep
    assert main([*args, "--out", str(tmp_path / "b"), "--dequantize"]) == 0
    deq = capsys.readouterr().out
    assert ("quantized base (compressed-fp8, dequantize): 14 tensors dequantized, 0 re-quantized (weights and "
            "fresh scales), 0 copied raw, 28 scales dropped") in deq
    assert "config: quantization_config removed" in deq
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ------------------------------------------------------------------------------------------------ malformed input

def _break_missing_scale(base: Path) -> str:
    name = "model.layers.1.mlp.up_proj.weight"
    _edit(base, name + "_scale_inv", lambda t: t.pop(name + "_scale_inv"))
    return f"FP8 tensor {name!r} has no {name + '_scale_inv'!r} in any shard"


def _break_scale_shape(base: Path) -> str:
    name = "model.layers.0.self_attn.q_proj.weight_scale_inv"
    _edit(base, name, lambda t: t.update({name: torch.ones(1, 1)}))
    return f"scale {name!r} has shape [1, 1], but weight 'model.layers.0.self_attn.q_proj.weight' [256, 256]"


def _break_quant_method(base: Path) -> str:
    cfg = json.loads((base / "config.json").read_text())
    cfg["quantization_config"]["quant_method"] = "fp7"
    (base / "config.json").write_text(json.dumps(cfg))
    return "quantization_config.quant_method='fp7' is not a quantization format streammerge knows"


def _break_mixed(base: Path) -> str:
    name = "model.layers.0.mlp.gate_proj.qweight"
    _edit(base, "model.layers.0.mlp.gate_proj.weight", lambda t: t.update({name: torch.zeros(8, 4, dtype=torch.int32)}))
    return f"tensor {name!r} is GPTQ/AWQ storage, but quantization_config says 'fp8'"


def _edit(base: Path, near: str, change) -> None:
    """Apply ``change`` to the tensors of the shard holding ``near``; keep the index in step."""
    index_path = base / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = base / index["weight_map"][near]
    t = load_file(shard)
    change(t)
    save_file(t, shard, metadata={"format": "pt"})
    kept = {n: f for n, f in index["weight_map"].items() if f != shard.name}
    index["weight_map"] = kept | dict.fromkeys(t, shard.name)
    index_path.write_text(json.dumps(index))


@pytest.mark.parametrize("breaker", [_break_missing_scale, _break_scale_shape, _break_quant_method, _break_mixed])
def test_malformed_fp8_base_exit_2_one_line_nothing_written(bases, tmp_path, capsys, breaker):
    base = tmp_path / "base"
    shutil.copytree(bases["block128"], base)
    fragment = breaker(base)
    before = {p: p.read_bytes() for p in base.iterdir()}
    out = tmp_path / "out"
    code = main(["merge", "--base", str(base), "--adapter", str(bases["wide_adapter"]), "--out", str(out), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {base / 'config.json'}: "), err
    assert fragment in err[0]
    assert not out.exists()
    assert {p: p.read_bytes() for p in base.iterdir()} == before


def test_quantized_plan_is_frozen_picklable_and_repeatable(bases):
    import pickle

    plans = [streammerge.plan_merge(bases["ct_tensor"], bases["wide_adapter"], dequantize=d) for d in (False, True)]
    for plan in plans:
        assert pickle.loads(pickle.dumps(plan)) == plan
    assert streammerge.plan_merge(bases["ct_tensor"], bases["wide_adapter"]) == plans[0]
    assert plans[0] != plans[1]


def test_a_format_that_cannot_reencode_is_refused_without_dequantize():
    """The hook 4-bit formats use: a touched weight whose scheme is not re-encodable needs --dequantize."""
    from dataclasses import replace
    from types import MappingProxyType

    from streammerge.errors import PlanError
    from streammerge.formats.base import QuantIndex, QuantizedWeight, QuantScheme
    from streammerge.plan import LoraTerm, Step, TensorRef, TensorTask
    from streammerge.plan.quantized import apply_quantization

    scheme = QuantScheme("fp8-block", "block", (128, 128), "F32", "F32", 1.0, reencodable=False)
    qw = QuantizedWeight("m.weight", (256, 256), (("weight", "m.weight"), ("scale", "m.weight_scale_inv")), scheme)
    refs = {"m.weight": TensorRef("f", "m.weight", "F8_E4M3", (256, 256), 0),
            "m.weight_scale_inv": TensorRef("f", "m.weight_scale_inv", "F32", (2, 2), 65536)}
    index = QuantIndex("fp8-block", MappingProxyType({"m.weight": qw}), MappingProxyType({"quant_method": "fp8"}))
    lora = LoraTerm("linear", TensorRef("a", "A", "F32", (4, 256), 0), TensorRef("a", "B", "F32", (256, 4), 0), 2.0)
    merged = TensorTask("m.weight", "F8_E4M3", (256, 256), refs["m.weight"], (Step((lora,), "once"),), "merge")
    copied = {n: TensorTask(n, r.dtype, r.shape, r) for n, r in refs.items()}
    with pytest.raises(PlanError, match="cannot write back in its fp8-block format; pass --dequantize"):
        apply_quantization(index, {}, {**copied, "m.weight": merged}, refs, dequantize=False)
    tasks = {**copied, "m.weight": merged}
    drop, updates, removals, _ = apply_quantization(index, {}, tasks, refs, dequantize=True)
    assert drop == {"m.weight_scale_inv"} and removals == ("quantization_config",) and updates == ()
    assert tasks["m.weight"].dtype == "BF16" and not tasks["m.weight"].quant.encode
    untouched = {**copied}
    apply_quantization(replace(index), {}, untouched, refs, dequantize=False)  # nothing touched: plain copies
    assert all(t.is_raw_copy for t in untouched.values())
