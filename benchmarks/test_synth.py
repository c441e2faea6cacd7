"""Self-tests for benchmarks/synth.py (run: ``python -m pytest benchmarks/test_synth.py``).

They check that what synth writes is what safetensors, transformers and PEFT expect, on the tiny shape.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import synth  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("smbench")
    return synth.make_case("tiny", root, verbose=False)


def test_shard_bytes_equal_safetensors_save_file(tmp_path):
    shape = synth.SHAPES["tiny"]
    tensors = synth.tensor_specs(shape)
    synth.write_shard(tmp_path / "ours.safetensors", tensors, torch.bfloat16, seed=0)
    loaded = load_file(tmp_path / "ours.safetensors")
    save_file(loaded, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_data_is_deterministic_and_independent_of_sharding(tmp_path):
    synth.make_base("tiny", tmp_path / "one")
    synth.make_base("tiny", tmp_path / "many", max_shard_bytes=60_000)
    one = load_file(tmp_path / "one" / "model-00001-of-00001.safetensors")
    many = {}
    for f in (tmp_path / "many").glob("model-*.safetensors"):
        many.update(load_file(f))
    assert one.keys() == many.keys()
    for k in one:
        assert torch.equal(one[k], many[k]), k


def test_sharding_and_index(tmp_path):
    info = synth.make_base("tiny", tmp_path, max_shard_bytes=60_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert info["shards"] > 1
    files = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(files) == info["shards"]
    total = 0
    names = set()
    for f in files:
        with safe_open(f, "pt") as h:
            for k in h.keys():  # noqa: SIM118
                t = h.get_tensor(k)
                assert t.dtype == torch.bfloat16
                total += t.numel() * t.element_size()
                assert index["weight_map"][k] == f.name
                names.add(k)
    assert total == index["metadata"]["total_size"] == synth.checkpoint_bytes(synth.SHAPES["tiny"])
    assert names == {n for n, _ in synth.tensor_specs(synth.SHAPES["tiny"])}


def test_sizes_documented():
    assert synth.checkpoint_bytes(synth.SHAPES["llama-1b"]) == 2_208_436_224
    assert synth.checkpoint_bytes(synth.SHAPES["70b-slice-2"]) == 7_625_326_592
    assert synth.checkpoint_bytes(synth.SHAPES["70b-slice-4"]) == 11_047_944_192


@pytest.mark.parametrize("targets", ["all-linear", "qv"])
def test_peft_loads_and_merges_like_the_formula(tiny, targets, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny["base"], dtype="auto")
    assert model.dtype == torch.bfloat16
    assert not model.config.tie_word_embeddings
    # Every base tensor is loaded as written (no missing / randomly initialised weights).
    base = {}
    for f in Path(tiny["base"]).glob("*.safetensors"):
        base.update(load_file(f))
    sd = model.state_dict()
    assert set(sd) == set(base)
    for k, v in base.items():
        assert torch.equal(sd[k], v), k

    pm = peft.PeftModel.from_pretrained(model, tiny[targets])
    lora_cfg = pm.peft_config["default"]
    assert lora_cfg.r == 16 and lora_cfg.lora_alpha == 32
    merged = pm.merge_and_unload().state_dict()

    adapter = load_file(Path(tiny[targets]) / "adapter_model.safetensors")
    scale = 32 / 16
    n_changed = 0
    for k, w in base.items():
        key = "base_model.model." + k.removesuffix(".weight")
        if f"{key}.lora_A.weight" in adapter:
            a, b = adapter[f"{key}.lora_A.weight"], adapter[f"{key}.lora_B.weight"]
            expected = (w.float() + scale * (b @ a)).to(torch.bfloat16)
            # PEFT computes the delta in fp32 and adds in bf16 (two roundings): allow 1 bf16 ulp.
            torch.testing.assert_close(merged[k], expected, atol=0, rtol=2**-7)
            assert not torch.equal(merged[k], w), k
            n_changed += 1
        else:
            assert torch.equal(merged[k], w), k
    assert n_changed == len(adapter) // 2 == 2 * len(synth.ADAPTER_TARGETS[targets])
