"""GPT-OSS: PEFT ``target_parameters`` on experts stored fused on disk, in bf16 and decoded from MXFP4.

* bf16 GPT-OSS stores ``experts.gate_up_proj`` (E, H, 2I) and ``down_proj`` (E, I, H) as in memory; PEFT reads
  them (E, in, out) (``is_transposed`` experts) and merges ``P + rnd(ΔP)`` (``tuners.experts`` fused-on-disk
  path). streammerge's output is compared byte for byte with ``PeftModel.merge_and_unload().save_pretrained``.
* MXFP4 GPT-OSS: the checkpoint decoded by ``formats.mxfp4`` through the format protocol (row block by row
  block, as the executor asks) and then merged is bit-identical to transformers' own route,
  ``Mxfp4Config(dequantize=True)`` + PEFT ``merge_and_unload`` + ``save_pretrained``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import quant_bases as qb
import torch
from safetensors.torch import load_file, save_file
from test_formats_quant_bases import _decode, _detect

import streammerge


@pytest.fixture(scope="module")
def bf16_case(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("gpt_oss_bf16")
    base = qb.make_gpt_oss_bf16(root / "base")
    load = lambda: qb.GptOssForCausalLM.from_pretrained(base, dtype=torch.bfloat16)  # noqa: E731
    torch.manual_seed(qb.SEED + 1)
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                     target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], init_lora_weights=False)
    get_peft_model(load(), cfg).save_pretrained(root / "adapter")
    qb.merge_reference(load(), root / "adapter", root / "ref")
    return base, root / "adapter", root / "ref"


def test_gpt_oss_bf16_target_parameters_bit_identical_to_peft(bf16_case, tmp_path):
    base, adapter, ref = bf16_case
    streammerge.merge(base=base, adapter=adapter, out=tmp_path / "out", device="cpu")
    qb.assert_same_file(tmp_path / "out", ref)
    experts = load_file(base / "model.safetensors")["model.layers.0.mlp.experts.gate_up_proj"]
    assert not torch.equal(load_file(ref / "model.safetensors")["model.layers.0.mlp.experts.gate_up_proj"], experts)


@pytest.fixture(scope="module")
def mxfp4_case(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("gpt_oss_mxfp4")
    base = qb.make_gpt_oss_mxfp4(root / "base")
    adapter = qb.make_gpt_oss_adapter(base, root / "adapter")
    qb.merge_reference(qb.load_gpt_oss_dequantized(base), adapter, root / "ref")
    return base, adapter, root / "ref"


def test_mxfp4_decoded_then_merged_equals_transformers_and_peft(mxfp4_case, tmp_path):
    base, adapter, ref = mxfp4_case
    index = _detect(base)
    sd = load_file(base / "model.safetensors")
    for name, qw in index.weights.items():
        for _, part in qw.parts:
            del sd[part]
        sd[name] = _decode(base, index, qw, torch.bfloat16, blocks=2)
    deq = tmp_path / "dequantized"
    deq.mkdir()
    save_file(sd, deq / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((base / "config.json").read_text())
    del cfg["quantization_config"]
    (deq / "config.json").write_text(json.dumps(cfg))
    streammerge.merge(base=deq, adapter=adapter, out=tmp_path / "out", device="cpu")
    qb.assert_same_file(tmp_path / "out", ref)
    assert "quantization_config" not in json.loads((ref / "config.json").read_text())

