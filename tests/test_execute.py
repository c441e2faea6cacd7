"""End-to-end merges on synthetic checkpoints: byte-level facts about the output files."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

import streammerge
from streammerge import testing
from streammerge.errors import BudgetError


def _bytes(d):
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.safetensors"))}


def test_zero_adapter_reproduces_every_shard_byte_for_byte(tmp_path, llama):
    base, _ = llama
    zero = testing.make_adapter(tmp_path / "zero", base, targets=testing.LLAMA_LINEAR, zero_b=True)
    streammerge.merge(base=base, adapter=zero, out=tmp_path / "out", device="cpu")
    assert _bytes(tmp_path / "out") == _bytes(base)
    assert len(_bytes(base)) == 3


def test_merge_equals_reference_and_keeps_layout(tmp_path, llama):
    base, adapter = llama
    report = streammerge.merge(base=base, adapter=adapter, out=tmp_path / "out", device="cpu")
    out = tmp_path / "out"
    ours, ref = testing.load_dir(out), testing.reference_merge(base, adapter)
    assert set(ours) == set(ref)
    assert not testing.changed(ours, ref)
    assert report.tensors_merged == 2 * 7 and report.tensors_copied == len(ref) - 14
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(p.name for p in base.glob("*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in ours.values())
    for name, file in index["weight_map"].items():
        assert name in testing.load_dir(out) and (out / file).exists()
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*(p.name for p in base.glob("*.safetensors")), "model.safetensors.index.json", "config.json",
         "generation_config.json", "tokenizer_config.json", "streammerge.json"]
    )


@pytest.mark.parametrize("checksum", ["xxh3", "sha256"])
def test_workers_and_budget_do_not_change_a_single_byte_nor_the_digests(tmp_path, llama, checksum):
    """Workers write blocks at their offsets in any order (``scatter``): shards, digests and the whole
    manifest must not depend on how many there are, nor on the block heights the budget picks."""
    base, adapter = llama
    runs = {}
    for workers in (1, 2, 4):
        for budget in (1 << 20, 512 << 20):
            out = tmp_path / f"w{workers}-{budget}"
            streammerge.merge(base=base, adapter=adapter, out=out, device="cpu", workers=workers, max_memory=budget,
                              checksum=checksum)
            runs[workers, budget] = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    first = next(iter(runs.values()))
    assert "streammerge.json" in first and len(_bytes(base)) == 3
    assert all(files == first for files in runs.values())


def test_copy_runs_are_one_unit_each_and_blocks_land_at_their_offsets(tmp_path, llama):
    """Untouched tensors contiguous in one base file are copied as one run (one copy_file_range), and the
    units of a shard tile its data exactly, in file order."""
    from streammerge.budget import ExecOptions
    from streammerge.units import shard_units

    base, _ = llama
    zero = testing.make_adapter(tmp_path / "zero", base, targets=testing.LLAMA_LINEAR, zero_b=True)
    none = testing.make_adapter(tmp_path / "none", base, targets=("nothing",))
    opts = ExecOptions("cpu", 2, 1 << 20)
    for shard in streammerge.plan_merge(base, none).shards:
        assert len(shard_units(0, shard, opts)) == 1, shard.filename  # all raw: one run per shard
    for shard in streammerge.plan_merge(base, zero).shards:
        units = shard_units(0, shard, opts)
        assert units[0].offset == len(shard.header)
        assert all(a.offset + a.nbytes == b.offset for a, b in itertools.pairwise(units))
        assert units[-1].offset + units[-1].nbytes == len(shard.header) + shard.data_size
        copies = [u for u in units if u.is_copy]
        raw = [t.is_raw_copy for t in shard.tasks]
        runs = sum(1 for i, r in enumerate(raw) if r and (i == 0 or not raw[i - 1]))
        assert len(copies) == runs


def test_max_shard_size_reshards_with_a_correct_index(tmp_path, llama):
    base, adapter = llama
    out = tmp_path / "out"
    streammerge.merge(base=base, adapter=adapter, out=out, device="cpu", max_shard_size=20_000)
    files = sorted(out.glob("*.safetensors"))
    assert len(files) > 3
    assert all(f.name.endswith(f"-of-{len(files):05d}.safetensors") for f in files)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    for f in files:
        held = {n for n, file in index["weight_map"].items() if file == f.name}
        from safetensors import safe_open

        with safe_open(str(f), "pt") as h:
            assert set(h.keys()) == held
    assert not testing.changed(testing.load_dir(out), testing.reference_merge(base, adapter))


def test_tensor_larger_than_budget_merges_bit_identically(tmp_path):
    base = testing.make_checkpoint(tmp_path / "base", layers=1, hidden=256, intermediate=4096, vocab=64)
    adapter = testing.make_adapter(tmp_path / "ad", base, targets=("gate_proj", "down_proj"), r=16)
    # gate_proj is 4096 x 256: 16 MiB of fp32 working set whole; the budget is 6 MiB.
    small = streammerge.merge(base=base, adapter=adapter, out=tmp_path / "small", device="cpu", max_memory=6 << 20)
    streammerge.merge(base=base, adapter=adapter, out=tmp_path / "big", device="cpu", max_memory=4 << 30)
    assert small.tensors_merged == 2
    assert _bytes(tmp_path / "small") == _bytes(tmp_path / "big")


def test_budget_below_plan_minimum_says_what_is_needed(tmp_path, llama):
    base, adapter = llama
    with pytest.raises(BudgetError, match=r"pass `max_memory` [\d.]+[kMG]B or more"):
        streammerge.merge(base=base, adapter=adapter, out=tmp_path / "out", max_memory=1000)
    assert not (tmp_path / "out").exists()


def test_iter_merged_yields_the_written_tensors_in_order(tmp_path, llama):
    base, adapter = llama
    streammerge.merge(base=base, adapter=adapter, out=tmp_path / "out", device="cpu")
    written = testing.load_dir(tmp_path / "out")
    got = list(streammerge.iter_merged(base=base, adapter=adapter, device="cpu", max_memory=1 << 20))
    assert [n for n, _ in got] == [n for n in streammerge.plan_merge(base, adapter).weight_map()]
    assert {n for n, _ in got} == set(written)
    for name, tensor in got:
        assert torch.equal(tensor, written[name]), name


def test_tokenizer_comes_from_the_adapter_when_it_has_one(tmp_path, llama):
    base, adapter = llama
    (adapter / "tokenizer_config.json").write_text('{"source": "adapter"}')
    streammerge.merge(base=base, adapter=adapter, out=tmp_path / "out", device="cpu")
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text()) == {"source": "adapter"}
    assert not list((tmp_path / "out").glob("adapter*"))


def test_lora_on_a_tied_head_lands_on_the_embedding_with_a_warning(tmp_path):
    base = testing.make_checkpoint(tmp_path / "base", tied=True)
    emb = testing.load_dir(base)["model.embed_tokens.weight"]
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(4, emb.shape[1], generator=gen), torch.randn(emb.shape[0], 4, generator=gen)
    adapter = tmp_path / "ad"
    adapter.mkdir()
    from safetensors.torch import save_file

    save_file({"base_model.model.lm_head.lora_A.weight": a, "base_model.model.lm_head.lora_B.weight": b},
              str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                              "target_modules": ["lm_head"]}))
    report = streammerge.merge(base=base, adapter=adapter, out=tmp_path / "out", device="cpu")
    out = testing.load_dir(tmp_path / "out")
    assert "lm_head.weight" not in out
    assert torch.equal(out["model.embed_tokens.weight"], (emb.float() + (b @ a) * 2.0).to(emb.dtype))
    assert any("tied to 'lm_head.weight'" in w for w in report.warnings)


@pytest.mark.cuda
def test_cuda_merge_matches_cpu_within_one_ulp(tmp_path, llama):
    base, adapter = llama
    streammerge.merge(base=base, adapter=adapter, out=tmp_path / "cpu", device="cpu")
    report = streammerge.merge(base=base, adapter=adapter, out=tmp_path / "gpu", device="cuda", max_memory=1 << 20)
    assert report.device.startswith("cuda")
    cpu, gpu = testing.load_dir(tmp_path / "cpu"), testing.load_dir(tmp_path / "gpu")
    assert set(cpu) == set(gpu)
    for name in cpu:
        a, b = cpu[name], gpu[name]
        # cuBLAS and MKL may sum the r products in another order: at most one bf16 ulp apart.
        ulps = (a.view(torch.int16).long() - b.view(torch.int16).long()).abs()
        assert int(ulps.max()) <= 1, name


def test_output_files_get_the_permissions_open_would_give(tmp_path, llama):
    import os
    import stat

    base, adapter = llama
    old = os.umask(0o022)
    try:
        streammerge.merge(base=base, adapter=adapter, out=tmp_path / "out", device="cpu")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").iterdir()}
    assert modes and all(m == 0o644 for m in modes.values()), modes
