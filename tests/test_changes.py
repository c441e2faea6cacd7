"""Proof that a merge did something: the per-tensor relative change in the merge report and in
``verify``, and ``verify --against-base`` failing when a targeted tensor equals the base bit for bit."""

from __future__ import annotations

import itertools
import math
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import streammerge
from streammerge import testing
from streammerge.changes import ChangeTally
from streammerge.cli import main
from streammerge.formats.refs import TensorRef
from streammerge.plan.types import TensorTask

NOOP = "model.layers.1.self_attn.v_proj"


@pytest.fixture(scope="module")
def merged(tmp_path_factory) -> tuple[Path, Path, Path, Path, Path]:
    """base, a normal adapter and its merge, an adapter whose lora_B is zero for NOOP and its merge."""
    root = tmp_path_factory.mktemp("changes")
    base = testing.make_checkpoint(root / "base", layers=2, hidden=64, intermediate=128, vocab=128, shards=2)
    good = testing.make_adapter(root / "good", base, targets=testing.LLAMA_LINEAR, r=8, alpha=16)
    noop = shutil.copytree(good, root / "noop")
    tensors = load_file(str(noop / "adapter_model.safetensors"))
    key = f"base_model.model.{NOOP}.lora_B.weight"
    tensors[key] = torch.zeros_like(tensors[key])
    save_file(tensors, str(noop / "adapter_model.safetensors"), metadata={"format": "pt"})
    for adapter in (good, noop):
        out = root / f"out-{adapter.name}"
        assert main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out), "--device", "cpu",
                     "-q"]) == 0
    return base, good, root / "out-good", noop, root / "out-noop"


def _verify(base: Path, adapter: Path, out: Path, capsys, *extra: str) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main(["verify", "--out", str(out), "--base", str(base), "--adapter", str(adapter), *extra])
    return code, capsys.readouterr().out.splitlines()


WARNING = (f"{{out}}: tensor '{NOOP}.weight' (adapter module {NOOP}) equals the base bit for bit: the merge changed "
           "nothing there (a zero lora_B or a zero scale?)")


def test_verify_against_base_fails_on_a_module_whose_b_is_zero(merged, capsys):
    base, _, _, noop, out = merged
    code, lines = _verify(base, noop, out, capsys, "--against-base")
    assert code == 1
    assert lines[0].startswith(f"FAILED: {out}: 21 tensors checked")
    assert lines[1] == "problem: " + WARNING.format(out=out)
    assert lines[2].startswith("changes: 14 targeted tensor(s), relative change min ") and lines[2].endswith(
        "; 1 unchanged")
    assert lines[3] == f"  {NOOP}.weight ({NOOP}): relative change UNCHANGED (bit-identical to the base)"
    assert len(lines) == 4


def test_plain_verify_warns_about_it_and_passes(merged, capsys):
    base, _, _, noop, out = merged
    code, lines = _verify(base, noop, out, capsys)
    assert code == 0
    assert lines[0].startswith(f"OK: {out}") and lines[1] == "warning: " + WARNING.format(out=out)


def test_a_normal_merge_passes_verify_against_base(merged, capsys):
    base, good, out, _, _ = merged
    code, lines = _verify(base, good, out, capsys, "--against-base")
    assert code == 0, lines
    assert lines[1].startswith("changes: 14 targeted tensor(s)") and lines[1].endswith("; 0 unchanged")


def test_verify_against_base_fails_on_an_untargeted_tensor_that_changed(merged, tmp_path, capsys):
    base, good, out, _, _ = merged
    copy = shutil.copytree(out, tmp_path / "out")
    shard = copy / "model-00001-of-00002.safetensors"
    tensors = load_file(str(shard))
    name = "model.layers.0.input_layernorm.weight"  # no adapter module targets a norm
    tensors[name] = tensors[name] * 2
    save_file(tensors, str(shard), metadata={"format": "pt"})
    code, lines = _verify(base, good, copy, capsys, "--against-base")
    assert code == 1
    assert any(line.startswith(f"problem: {shard}: tensor {name!r} rows 0..64: ") and "differ from its source" in line
               for line in lines), lines


def test_the_merge_report_measures_what_verify_and_a_reference_measure(merged, tmp_path):
    base, good, _, _, _ = merged
    report = streammerge.merge(base=base, adapter=good, out=tmp_path / "out", device="cpu", max_memory=8 << 20)
    checked = streammerge.verify(tmp_path / "out", base, good)
    before, after = testing.load_dir(base), testing.load_dir(tmp_path / "out")
    assert [c.name for c in report.changes] == [c.name for c in checked.changes] == sorted(
        testing.changed(before, after))
    for mine, theirs in zip(report.changes, checked.changes, strict=True):
        w, m = before[mine.name].double(), after[mine.name].double()
        want = float(torch.linalg.vector_norm(m - w) / torch.linalg.vector_norm(w))
        assert mine.relative == pytest.approx(want, rel=1e-5) and theirs.relative == pytest.approx(want, rel=1e-5)
        assert mine.modules == theirs.modules == (mine.name.removesuffix(".weight"),)
        assert not mine.unchanged and mine.kind == "merge"


def test_the_merge_report_flags_the_noop_module(merged, tmp_path, caplog):
    base, _, _, noop, _ = merged
    report = streammerge.merge(base=base, adapter=noop, out=tmp_path / "out", device="cpu")
    flagged = [c for c in report.changes if c.unchanged]
    assert [c.name for c in flagged] == [f"{NOOP}.weight"] and flagged[0].relative == 0.0
    assert report.warnings == (flagged[0].warning(),)
    assert flagged[0].warning() in caplog.text


def _task(shape: tuple[int, ...]) -> TensorTask:
    ref = TensorRef("/nonexistent", "t", "F32", shape, 0)
    return TensorTask("t", "F32", shape, ref, kind="merge")


@given(rows=st.integers(1, 300), cols=st.integers(1, 40), cuts=st.lists(st.integers(1, 299), max_size=5),
       seed=st.integers(0, 2**16), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_block_tallies_add_up_to_the_whole_tensor_norms(rows, cols, cuts, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen).to(dtype)
    m = (w.float() + torch.randn(rows, cols, generator=gen) * 0.01).to(dtype)
    tally = ChangeTally()
    edges = sorted({0, rows, *(c for c in cuts if c < rows)})
    w_before, m_before = w.clone(), m.clone()
    for r0, r1 in reversed(list(itertools.pairwise(edges))):  # any order, as threads finish
        tally.add(_task((rows, cols)), r0, w[r0:r1], m[r0:r1])
    assert torch.equal(w, w_before) and torch.equal(m, m_before)  # measured, never touched (fp32 views too)
    (change,) = tally.result()
    wd, md = w.double(), m.double()
    assert change.base_norm == pytest.approx(float(wd.norm()), rel=1e-5)
    assert change.delta_norm == pytest.approx(float((md - wd).norm()), rel=1e-4, abs=1e-12)
    assert change.unchanged == torch.equal(w.view(torch.uint8), m.view(torch.uint8))


def test_bit_equality_is_bits_not_values():
    w = torch.tensor([[0.0, 1.0]])
    tally = ChangeTally()
    tally.add(_task((1, 2)), 0, w, torch.tensor([[-0.0, 1.0]]))  # equal values, different bits
    (change,) = tally.result()
    assert not change.unchanged and change.delta_norm == 0.0 and change.relative == 0.0
    tally = ChangeTally()
    tally.add(_task((1, 2)), 0, torch.zeros(1, 2), torch.tensor([[0.0, 3.0]]))
    assert tally.result()[0].relative == math.inf


def test_measuring_an_fp32_merge_leaves_its_bytes_alone(tmp_path):
    """``.float()`` of an fp32 block is the block itself: the tally must not subtract in place."""
    base = testing.make_checkpoint(tmp_path / "base", layers=1, hidden=64, intermediate=128, vocab=64,
                                   dtype=torch.float32)
    adapter = testing.make_adapter(tmp_path / "adapter", base, targets=testing.LLAMA_LINEAR)
    report = streammerge.merge(base=base, adapter=adapter, out=tmp_path / "out", device="cpu")
    assert len(report.changes) == 7 and all(c.relative > 0 for c in report.changes)
    assert not testing.changed(testing.load_dir(tmp_path / "out"), testing.reference_merge(base, adapter))


@pytest.mark.parametrize("trained", [False, True])
def test_verify_measures_saved_modules_too(tmp_path, trained, capsys):
    base = testing.make_checkpoint(tmp_path / "base", layers=1, hidden=64, intermediate=128, vocab=64)
    adapter = testing.make_adapter(tmp_path / "adapter", base, targets=("q_proj",),
                                   config={"modules_to_save": ["lm_head"]})
    sd = load_file(str(adapter / "adapter_model.safetensors"))
    head = testing.load_dir(base)["lm_head.weight"]  # the base's own head: saving it changes nothing
    sd["base_model.model.lm_head.weight"] = head * 1.5 if trained else head
    save_file(sd, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    streammerge.merge(base=base, adapter=adapter, out=tmp_path / "out", device="cpu")
    report = streammerge.verify(tmp_path / "out", base, adapter, against_base=True)
    (saved,) = [c for c in report.changes if c.kind == "replace"]
    assert saved.name == "lm_head.weight" and saved.modules == ()
    if trained:
        assert report.ok and saved.relative == pytest.approx(0.5, rel=1e-3)
    else:
        assert report.problems == (f"{tmp_path / 'out'}: tensor 'lm_head.weight' (the adapter's saved module) equals "
                                   "the base bit for bit: the merge changed nothing there (saved without training?)",)


def test_the_cli_prints_a_digest_and_the_flagged_tensors(merged, tmp_path, capsys):
    base, _, _, noop, _ = merged
    argv = ["merge", "--base", str(base), "--adapter", str(noop), "--device", "cpu"]
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("changes: 14 targeted tensor(s), relative change min ") and lines[1].endswith(
        "; 1 unchanged")
    assert lines[2:] == [f"  {NOOP}.weight ({NOOP}): relative change UNCHANGED (bit-identical to the base)"]
    assert main([*argv, "--out", str(tmp_path / "b"), "-v"]) == 0  # -v: every targeted tensor
    lines = capsys.readouterr().out.splitlines()
    assert len([line for line in lines if line.startswith("  model.layers.")]) == 14


def test_sampled_verify_measures_the_sampled_rows_and_still_flags_the_noop(merged, capsys):
    base, _, _, noop, out = merged
    full = streammerge.verify(out, base, noop)
    sampled = streammerge.verify(out, base, noop, sample=1, against_base=True)
    assert [c.name for c in sampled.changes] == [c.name for c in full.changes]
    assert [c.name for c in sampled.changes if c.unchanged] == [f"{NOOP}.weight"]
    assert sampled.problems == (WARNING.format(out=out),)
    for s, f in zip(sampled.changes, full.changes, strict=True):  # one 64-row block of 64..128-row tensors
        assert s.base_norm <= f.base_norm * (1 + 1e-6)
