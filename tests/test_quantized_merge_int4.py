"""Merging into MXFP4 (GPT-OSS), bitsandbytes, GPTQ and AWQ bases, end to end through the CLI.

* ``--dequantize`` is bit-identical to transformers' own dequantizing load + PEFT ``merge_and_unload`` +
  ``save_pretrained`` (MXFP4: ``Mxfp4Config(dequantize=True)``; bitsandbytes: ``model.dequantize()`` on CPU),
  and for GPTQ/AWQ (no CPU loader) to the reference unpack + PEFT's merge.
* keep-format on MXFP4: untouched MXFP4 tensors are copied byte for byte; a touched experts module is written in
  bf16 (gate_up_proj and down_proj together) and added to ``modules_to_not_convert``: transformers loads it and
  its weights equal the dequantized merge. bitsandbytes/GPTQ/AWQ refuse keep-format in one line (exit 2).
* ``verify`` and ``--resume`` with only ``--out``; ``--max-memory``; malformed inputs exit 2 naming the tensor.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import quant_bases as qb
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

import streammerge
from streammerge.cli import main


def _merge(base: Path, adapter: Path, out: Path, *extra: str) -> None:
    assert main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out), "--device", "cpu",
                 "-q", *extra]) == 0


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def _config(out: Path) -> dict:
    return json.loads((out / "config.json").read_text())


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gpt_oss_e2e")
    base = qb.make_gpt_oss_mxfp4(root / "base")
    experts = qb.make_gpt_oss_adapter(base, root / "experts")  # experts + attention
    down = qb.make_gpt_oss_adapter(base, root / "down", parameters=("mlp.experts.down_proj",), modules=("k_proj",))
    attn = qb.make_gpt_oss_adapter(base, root / "attn", parameters=(), modules=("q_proj", "o_proj"))
    for name in ("experts", "down", "attn"):
        qb.merge_reference(qb.load_gpt_oss_dequantized(base), root / name, root / f"ref_{name}")
    return {"base": base, "experts": experts, "down": down, "attn": attn, "root": root}


def test_mxfp4_dequantize_is_transformers_dequantized_load_plus_peft_merge(gpt_oss, tmp_path):
    _merge(gpt_oss["base"], gpt_oss["experts"], tmp_path / "out", "--dequantize")
    qb.assert_same_file(tmp_path / "out", gpt_oss["root"] / "ref_experts")
    assert "quantization_config" not in _config(tmp_path / "out")


def test_mxfp4_keep_format_copies_untouched_experts_raw(gpt_oss, tmp_path):
    out = tmp_path / "out"
    _merge(gpt_oss["base"], gpt_oss["attn"], out)
    ours, base = load_file(out / "model.safetensors"), load_file(gpt_oss["base"] / "model.safetensors")
    assert sorted(ours) == sorted(base)
    for name in base:
        if name.endswith(("_blocks", "_scales")):
            assert torch.equal(ours[name], base[name]), name
    assert _config(out)["quantization_config"] == _config(gpt_oss["base"])["quantization_config"]
    # and what transformers loads from it is the reference merge (attention only)
    loaded = qb.load_gpt_oss_dequantized(out).state_dict()
    for name, t in load_file(gpt_oss["root"] / "ref_attn" / "model.safetensors").items():
        assert torch.equal(_bits(loaded[name]), _bits(t)), name


def test_mxfp4_keep_format_writes_touched_experts_bf16_and_declares_them(gpt_oss, tmp_path):
    out = tmp_path / "out"
    _merge(gpt_oss["base"], gpt_oss["down"], out)
    ours = load_file(out / "model.safetensors")
    for layer in (0, 1):
        stem = f"model.layers.{layer}.mlp.experts."
        assert stem + "down_proj_blocks" not in ours and ours[stem + "down_proj"].dtype == torch.bfloat16
        # gate_up_proj is untouched but shares the module's modules_to_not_convert entry: written bf16 too
        assert stem + "gate_up_proj_blocks" not in ours and ours[stem + "gate_up_proj"].dtype == torch.bfloat16
    qc = _config(out)["quantization_config"]
    assert qc["modules_to_not_convert"][-2:] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    loaded = qb.load_gpt_oss_dequantized(out).state_dict()
    for name, t in load_file(gpt_oss["root"] / "ref_down" / "model.safetensors").items():
        assert torch.equal(_bits(loaded[name]), _bits(t)), name


@pytest.mark.parametrize("mode", [(), ("--dequantize",)], ids=["keep", "dequantize"])
def test_mxfp4_verify_and_resume_with_nothing_but_out(gpt_oss, tmp_path, capsys, mode):
    out = tmp_path / "out"
    _merge(gpt_oss["base"], gpt_oss["experts"], out, *mode)
    first = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert main(["verify", "--out", str(out)]) == 0, capsys.readouterr()
    (out / "model.safetensors").unlink()
    assert main(["merge", "--out", str(out), "--resume", "--device", "cpu", "-q"]) == 0, capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == first


def test_mxfp4_within_max_memory(gpt_oss, tmp_path):
    plan = streammerge.plan_merge(gpt_oss["base"], gpt_oss["experts"], dequantize=True)
    _merge(gpt_oss["base"], gpt_oss["experts"], tmp_path / "tight", "--dequantize", "--max-memory",
           str(plan.min_memory()), "--workers", "1")
    qb.assert_same_file(tmp_path / "tight", gpt_oss["root"] / "ref_experts")
    assert main(["merge", "--base", str(gpt_oss["base"]), "--adapter", str(gpt_oss["experts"]), "--out",
                 str(tmp_path / "too_tight"), "--dequantize", "--max-memory", str(plan.min_memory() - 1024),
                 "-q"]) == 2


def test_mxfp4_missing_scales_exit_2_one_line_nothing_written(gpt_oss, tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(gpt_oss["base"], base)
    sd = load_file(base / "model.safetensors")
    del sd["model.layers.1.mlp.experts.down_proj_scales"]
    save_file(sd, base / "model.safetensors", metadata={"format": "pt"})
    code = main(["merge", "--base", str(base), "--adapter", str(gpt_oss["experts"]), "--out", str(tmp_path / "o"),
                 "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0] == (f"error: {base / 'config.json'}: MXFP4 tensor 'model.layers.1.mlp.experts.down_proj_blocks' has "
                      "no 'model.layers.1.mlp.experts.down_proj_scales' in any shard; without its scales it cannot "
                      "be dequantized: the checkpoint is incomplete, re-download it")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- bitsandbytes, GPTQ, AWQ (Llama)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llama_q")
    torch.manual_seed(qb.SEED)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(root / "bf16")
    torch.manual_seed(qb.SEED + 2)
    lc = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    get_peft_model(LlamaForCausalLM.from_pretrained(root / "bf16"), lc).save_pretrained(root / "adapter")
    return {"bf16": root / "bf16", "adapter": root / "adapter", "root": root}


@pytest.mark.parametrize("kind", ["nf4-dq", "int8"])
def test_bnb_dequantize_is_transformers_dequantize_plus_peft_merge(llama, tmp_path, kind):
    base = qb.make_bnb(llama["bf16"], tmp_path / kind, kind)
    qb.merge_reference(qb.load_bnb_dequantized(base), llama["adapter"], tmp_path / "ref")
    _merge(base, llama["adapter"], tmp_path / "out", "--dequantize")
    qb.assert_same_file(tmp_path / "out", tmp_path / "ref")
    assert "quantization_config" not in _config(tmp_path / "out")
    plan = streammerge.plan_merge(base, llama["adapter"], dequantize=True)
    assert any("merging into that is better: pass its directory as `base`" in w for w in plan.warnings)


def test_bnb_verify_and_resume_with_nothing_but_out(llama, tmp_path, capsys):
    base = qb.make_bnb(llama["bf16"], tmp_path / "nf4", "nf4")
    out = tmp_path / "out"
    _merge(base, llama["adapter"], out, "--dequantize")
    first = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert main(["verify", "--out", str(out)]) == 0, capsys.readouterr()
    (out / "model.safetensors").unlink()
    assert main(["merge", "--out", str(out), "--resume", "--device", "cpu", "-q"]) == 0, capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == first


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_int4_dequantize_is_reference_unpack_plus_peft_merge(llama, tmp_path, method):
    base, ref_sd = qb.make_int4(llama["bf16"], tmp_path / method, method)
    model = LlamaForCausalLM.from_pretrained(llama["bf16"], dtype=torch.bfloat16)
    model.load_state_dict(ref_sd)
    PeftModel.from_pretrained(model, llama["adapter"]).merge_and_unload().save_pretrained(tmp_path / "ref")
    _merge(base, llama["adapter"], tmp_path / "out", "--dequantize")
    qb.assert_same_file(tmp_path / "out", tmp_path / "ref")
    assert "quantization_config" not in _config(tmp_path / "out")


@pytest.mark.parametrize("kind", ["nf4", "gptq", "awq"])
def test_keep_format_refused_one_line_pointing_at_dequantize(llama, tmp_path, capsys, kind):
    base = (qb.make_bnb(llama["bf16"], tmp_path / kind, kind) if kind == "nf4"
            else qb.make_int4(llama["bf16"], tmp_path / kind, kind)[0])
    out = tmp_path / "out"
    capsys.readouterr()  # the base's own building noise
    code = main(["merge", "--base", str(base), "--adapter", str(llama["adapter"]), "--out", str(out), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    label = {"nf4": "bitsandbytes", "gptq": "GPTQ", "awq": "AWQ"}[kind]
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: a {label} base cannot keep its format after a merge"), err
    assert "pass --dequantize" in err[0] and "original 16-bit model" in err[0]
    assert not out.exists()


def test_gptq_decodes_column_slabs_within_max_memory(llama, tmp_path):
    """A GPTQ layer is decoded a row block at a time (its column slab of every part), not whole."""
    from streammerge.execute import ExecOptions, block_rows
    from streammerge.plan import block_bytes

    base, _ = qb.make_int4(llama["bf16"], tmp_path / "gptq", "gptq")
    plan = streammerge.plan_merge(base, llama["adapter"], dequantize=True)
    task = next(t for t in plan.tasks() if t.name == "model.layers.0.mlp.up_proj.weight")  # (192, 64)
    assert task.quant is not None and block_bytes(task, 16) < block_bytes(task, task.rows)
    opts = ExecOptions(torch.device("cpu"), 1, 2 * block_bytes(task, 16))
    assert block_rows(task, opts) < task.rows
    _merge(base, llama["adapter"], tmp_path / "tight", "--dequantize", "--max-memory", str(plan.min_memory()),
           "--workers", "1")
    _merge(base, llama["adapter"], tmp_path / "roomy", "--dequantize", "--workers", "3")
    assert (tmp_path / "tight" / "model.safetensors").read_bytes() == (tmp_path / "roomy" /
                                                                      "model.safetensors").read_bytes()
