"""Issue 3 parity: every adapter feature beyond plain LoRA, against PEFT's ``merge_and_unload``.

Cases (``oracle.ADAPTER_SPECS``): DoRA on Linear/Embedding/tied lm_head/GPT-2 Conv1D, trainable tokens
(list and dict, tied and untied), a resized vocabulary, a hybrid adapter with full trained tensors,
a multi-adapter directory and a pickled ``adapter_model.bin``. Conv1d/2d/3d LoRA and DoRA use a
custom ``nn.Module`` (not an HF class): its checkpoint is written with safetensors and the reference
is PEFT on that module loaded back from the file. Every comparison is ``torch.equal`` (spec §3.1:
PEFT is exact for all of these on CPU).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from oracle import (
    ADAPTER_CASES,
    SEED,
    Case,
    cached_case,
    diff_checkpoints,
    load_checkpoint,
    load_merged,
    logits,
)
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

import streammerge
from streammerge.cli import main
from streammerge.kernel import Factors, merge_block
from streammerge.plan import row_blocks

LOGITS = ("llama_dora", "gpt2_dora_conv1d", "llama_tokens_dict_tied", "llama_resized_vocab",
          "llama_hybrid_full_tensors")


@dataclass(frozen=True)
class Merged:
    case: Case
    out_dir: Path


@pytest.fixture(scope="session")
def adapter_cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Merged]:
    return {}


@pytest.fixture
def merged(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
           adapter_cases: dict[str, Merged]) -> Merged:
    name = request.param
    if name not in adapter_cases:
        case = cached_case(name, tmp_path_factory.getbasetemp() / "adapter-cases")
        out = case.base_dir.parent / "out"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            streammerge.merge(base=case.base_dir, adapter=case.adapter_dir, out=out, adapter_name=case.adapter_name)
        adapter_cases[name] = Merged(case, out)
    return adapter_cases[name]


def _params(names: tuple[str, ...]) -> list:
    return [pytest.param(n, id=n) for n in names]


@pytest.mark.parametrize("merged", _params(ADAPTER_CASES), indirect=True)
def test_tensors_bit_identical_to_peft(merged: Merged) -> None:
    assert diff_checkpoints(load_checkpoint(merged.out_dir), load_checkpoint(merged.case.ref_dir)) == []


@pytest.mark.parametrize("merged", _params(ADAPTER_CASES), indirect=True)
def test_named_facts(merged: Merged) -> None:
    """The adapter really changed what it should, heads/ties are as PEFT writes them, config agrees."""
    case = merged.case
    ours, base = load_checkpoint(merged.out_dir), load_checkpoint(case.base_dir)
    assert sorted(case.must_not_have & set(ours)) == []
    assert sorted(k for k in case.must_change if torch.equal(ours[k], base[k])) == []
    cfg = json.loads((merged.out_dir / "config.json").read_text())
    ref_cfg = json.loads((case.ref_dir / "config.json").read_text())
    for key in ("vocab_size", "tie_word_embeddings"):
        assert cfg.get(key) == ref_cfg.get(key), key
    for key, value in case.expect_config.items():
        assert cfg[key] == value == ref_cfg[key], key


@pytest.mark.parametrize("merged", _params(LOGITS), indirect=True)
def test_logits_match_peft(merged: Merged) -> None:
    case = merged.case
    model, info = case.auto_class.from_pretrained(
        merged.out_dir, dtype="auto", attn_implementation="eager", output_loading_info=True
    )
    assert {k: v for k, v in info.items() if v} == {}
    ours = logits(model, case.input_ids)
    assert torch.equal(ours, case.ref_logits)
    assert not torch.equal(ours, case.base_logits) or case.name == "llama_tokens_dict_tied"


def test_tokens_are_replaced_not_added(tmp_path_factory: pytest.TempPathFactory,
                                       adapter_cases: dict[str, Merged]) -> None:
    """Tied dict form: both row sets land in embed_tokens, each row equal to its stored delta (rounded)."""
    case = cached_case("llama_tokens_dict_tied", tmp_path_factory.getbasetemp() / "adapter-cases")
    ad = load_file(case.adapter_dir / "adapter_model.safetensors")
    ref = load_checkpoint(case.ref_dir)["model.embed_tokens.weight"]
    emb = ad["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    head = ad["base_model.model.lm_head.token_adapter.trainable_tokens_delta"]
    assert torch.equal(ref[[3, 5]], emb.to(ref.dtype))
    assert torch.equal(ref[[9, 100]], head.to(ref.dtype))


def test_multi_adapter_dir_unknown_name_lists_available(tmp_path_factory: pytest.TempPathFactory,
                                                        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    case = cached_case("llama_multi_adapter_dir", tmp_path_factory.getbasetemp() / "adapter-cases")
    assert (case.adapter_dir / "second" / "adapter_config.json").is_file()  # PEFT's layout
    out = tmp_path / "out"
    argv = ["merge", "--base", str(case.base_dir), "--adapter", str(case.adapter_dir), "--out", str(out)]
    assert main([*argv, "--adapter-name", "third", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "'third'" in err and "available: default, second" in err
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------------
# DoRA row blocks


@given(st.integers(1, 3), st.integers(0, 63), st.integers(1, 96), st.integers(1, 8), st.integers(0, 2**31 - 1))
def test_dora_linear_row_blocks_equal_whole_tensor(k: int, tail: int, cols: int, r: int, seed: int) -> None:
    """Linear DoRA is cut into row blocks: each row's norm depends on that row only, bit for bit."""
    rows = 64 * k + tail
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen).to(torch.bfloat16)
    f = Factors("linear", torch.randn(r, cols, generator=gen), torch.randn(rows, r, generator=gen) * 0.1, 0.5,
                magnitude=torch.rand(rows, generator=gen) + 0.5)
    steps = [("dora", [f])]
    whole = merge_block(w, torch.bfloat16, steps, 0, rows)
    parts = [merge_block(w[r0:r1], torch.bfloat16, steps, r0, r1) for r0, r1 in row_blocks(rows, 64)]
    assert torch.equal(torch.cat(parts), whole)


# ----------------------------------------------------------------------------------------------------------
# Conv1d / Conv2d / Conv3d (a custom module: not an HF class)


class ConvNet(nn.Module):
    def __init__(self, groups: int = 1, conv3d_kernel: tuple[int, int, int] = (3, 3, 3)) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(4, 6, 3)
        self.c2 = nn.Conv2d(4, 6, (3, 3))
        self.p2 = nn.Conv2d(4, 6, 1)  # the 1x1 (matmul) branch
        self.c3 = nn.Conv3d(4, 6, conv3d_kernel)
        self.g2 = nn.Conv2d(4, 6, 3, groups=groups)
        self.fc = nn.Linear(8, 6)


CONV_TARGETS = ["c1", "c2", "p2", "c3", "fc"]


def _conv_case(root: Path, dora: bool, **net_kwargs) -> tuple[Path, Path, dict[str, torch.Tensor], list[str]]:
    """Write base (safetensors, bf16), PEFT adapter, and PEFT's merged state dict for a ConvNet."""
    torch.manual_seed(SEED)
    base_dir, adapter_dir = root / "base", root / "adapter"
    base_dir.mkdir(parents=True)
    net = ConvNet(**net_kwargs).to(torch.bfloat16)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, base_dir / "model.safetensors",
              metadata={"format": "pt"})
    targets = CONV_TARGETS + (["g2"] if net_kwargs.get("groups", 1) > 1 else [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(net, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                                            use_dora=dora))
        if dora:
            with torch.no_grad():
                for n, p in pm.named_parameters():
                    if "lora_magnitude_vector" in n:
                        p.add_(torch.randn_like(p) * 0.2)
        pm.save_pretrained(adapter_dir)
    if net_kwargs:
        return base_dir, adapter_dir, {}, targets
    fresh = ConvNet()
    fresh.load_state_dict(load_file(base_dir / "model.safetensors"))
    fresh = fresh.to(torch.bfloat16)
    fresh.load_state_dict(load_file(base_dir / "model.safetensors"))
    ref = PeftModel.from_pretrained(fresh, adapter_dir).merge_and_unload().state_dict()
    return base_dir, adapter_dir, ref, targets


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_conv_lora_bit_identical_to_peft(tmp_path: Path, dora: bool) -> None:
    base_dir, adapter_dir, ref, _ = _conv_case(tmp_path, dora)
    out = tmp_path / "out"
    streammerge.merge(base=base_dir, adapter=adapter_dir, out=out)
    ours, base = load_file(out / "model.safetensors"), load_file(base_dir / "model.safetensors")
    assert diff_checkpoints(ours, ref) == []
    convs = ("c1.weight", "c2.weight", "p2.weight", "c3.weight")
    assert sorted(k for k in convs if torch.equal(ours[k], base[k])) == []
    if dora:
        mag = load_file(adapter_dir / "adapter_model.safetensors")["base_model.model.c2.lora_magnitude_vector"]
        assert mag.shape == (1, 6, 1, 1)  # spec §2.3: (1, out, 1, …)


@pytest.mark.parametrize(
    ("net_kwargs", "fragment"),
    [
        pytest.param({"groups": 2}, "groups=2", id="groups"),
        pytest.param({"conv3d_kernel": (1, 1, 3)}, "Conv3d with kernel (1, 1, 3)", id="conv3d-11k"),
    ],
)
def test_conv_shapes_peft_cannot_merge_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                   net_kwargs: dict, fragment: str) -> None:
    base_dir, adapter_dir, _, _ = _conv_case(tmp_path, False, **net_kwargs)
    out = tmp_path / "out"
    assert main(["merge", "--base", str(base_dir), "--adapter", str(adapter_dir), "--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert fragment in err and ("g2.lora_A" in err or "c3.lora_A" in err), err
    assert not out.exists()


def test_conv3d_11k_really_crashes_peft(tmp_path: Path) -> None:
    """Why we refuse it: PEFT 0.21 takes its 1x1 branch for a (1, 1, k) Conv3d and fails to merge."""
    base_dir, adapter_dir, _, _ = _conv_case(tmp_path, False, conv3d_kernel=(1, 1, 3))
    net = ConvNet(conv3d_kernel=(1, 1, 3)).to(torch.bfloat16)
    net.load_state_dict(load_file(base_dir / "model.safetensors"))
    with pytest.raises(RuntimeError):
        PeftModel.from_pretrained(net, adapter_dir).merge_and_unload()


def test_llama_dora_loads_with_transformers(tmp_path_factory: pytest.TempPathFactory,
                                            adapter_cases: dict[str, Merged]) -> None:
    case = cached_case("llama_dora", tmp_path_factory.getbasetemp() / "adapter-cases")
    assert load_merged(case.auto_class, case.ref_dir).dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------------------
# A pickled base (pytorch_model*.bin): read with torch.load(mmap=True, weights_only=True), written as safetensors


def _to_bin_base(src: Path, dst: Path, shards: int) -> None:
    """The same base as ``src`` (safetensors) saved as torch pickles, single file or sharded with an index."""
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "model.safetensors.index.json"))
    tensors = load_checkpoint(src)
    names = sorted(tensors)
    if shards == 1:
        torch.save(tensors, dst / "pytorch_model.bin")
        return
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        fname = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {n: tensors[n] for n in names[i * per : (i + 1) * per]}
        torch.save(part, dst / fname)
        weight_map |= dict.fromkeys(part, fname)
    doc = {"metadata": {"total_size": 1}, "weight_map": weight_map}
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps(doc))


@pytest.mark.parametrize("shards", [1, 2], ids=["single", "sharded"])
def test_bin_base_bit_identical_to_peft(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory,
                                        shards: int) -> None:
    case = cached_case("llama_dora", tmp_path_factory.getbasetemp() / "adapter-cases")
    base = tmp_path / "bin-base"
    _to_bin_base(case.base_dir, base, shards)
    out = tmp_path / "out"
    streammerge.merge(base=base, adapter=case.adapter_dir, out=out)
    names = sorted(p.name for p in out.iterdir() if p.suffix in (".safetensors", ".bin", ".json"))
    if shards == 1:
        assert [n for n in names if n not in ("config.json", "generation_config.json", "streammerge.json")
                and not n.startswith("tokenizer")] == ["model.safetensors"]
    else:
        assert "model-00001-of-00002.safetensors" in names and "model.safetensors.index.json" in names
        assert not any(n.endswith(".bin") or n.startswith("pytorch_model") for n in names)
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"].values()) == {"model-00001-of-00002.safetensors",
                                                     "model-00002-of-00002.safetensors"}
    assert diff_checkpoints(load_checkpoint(out), load_checkpoint(case.ref_dir)) == []
