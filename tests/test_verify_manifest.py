"""``verify --out`` alone replays the recorded inputs and options, and ``merge --resume --out`` alone
continues with them: every option that changes bytes round-trips through the manifest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import streammerge
from streammerge import manifest, testing
from streammerge.cli import main
from streammerge.header import read_header

PATTERNS = {"rank_pattern": {"q_proj": 16}, "alpha_pattern": {"layers.0.self_attn.q_proj": 32}}
Q0 = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    base = testing.make_checkpoint(root / "base", layers=2, hidden=64, intermediate=128, vocab=128, shards=2)
    a1 = testing.make_adapter(root / "a1", base, targets=testing.LLAMA_LINEAR, r=8, seed=1)
    a2 = testing.make_adapter(root / "a2", base, targets=("q_proj", "k_proj"), r=4, seed=2)
    old = testing.make_adapter(root / "old", base, targets=("q_proj",), r=16, alpha=8, config=PATTERNS)
    multi = root / "multi"
    testing.make_adapter(multi / "first", base, targets=("q_proj",), r=4, seed=3)
    testing.make_adapter(multi / "second", base, targets=("v_proj",), r=4, seed=4)
    return {"base": base, "a1": a1, "a2": a2, "old": old, "multi": multi}


def _merge_argv(inputs: dict[str, Path], case: str) -> list[str]:
    b, a1, a2 = str(inputs["base"]), str(inputs["a1"]), str(inputs["a2"])
    return {
        "weighted": ["--base", b, "--adapter", a1, "--adapter", a2, "--weights", "0.7,-0.3"],
        "dare_ties": ["--base", b, "--adapter", a1, "--adapter", a2, "--weights", "0.5,0.5",
                      "--combination", "dare_ties", "--density", "0.5", "--seed", "3"],
        "pattern_rules": ["--base", b, "--adapter", str(inputs["old"]), "--pattern-rules", "pre-0.14"],
        "adapter_name": ["--base", b, "--adapter", str(inputs["multi"]), "--adapter-name", "second"],
        "max_shard_size": ["--base", b, "--adapter", a1, "--max-shard-size", "40KB"],
    }[case]


CASES = ("weighted", "dare_ties", "pattern_rules", "adapter_name", "max_shard_size")


def _merged_tensor(out: Path, case: str) -> tuple[Path, int]:
    """(shard, byte offset) of a tensor the merge computed (not copied) in ``case``."""
    doc = json.loads((out / manifest.MANIFEST_NAME).read_text())
    suffix = "v_proj.weight" if case == "adapter_name" else "q_proj.weight"
    for rec in doc["shards"]:
        header = read_header(out / rec["file"])
        for info in header.tensors:
            if info.name.endswith(suffix):
                return out / rec["file"], header.data_start + info.begin
    raise AssertionError("no merged tensor")


@pytest.mark.parametrize("case", CASES)
def test_verify_and_resume_with_nothing_but_out(inputs, tmp_path, case, capsys):
    out = tmp_path / "out"
    assert main(["merge", *_merge_argv(inputs, case), "--out", str(out), "--device", "cpu", "-q"]) == 0
    reference = {p.name: p.read_bytes() for p in out.iterdir() if p.name != manifest.MANIFEST_NAME}

    # verify with only --out: the recorded options rebuild the same plan.
    assert main(["verify", "--out", str(out)]) == 0, capsys.readouterr()
    assert capsys.readouterr().out.startswith("OK: ")

    # resume with only --out, after losing a shard: same bytes as the first run.
    victim = sorted(out.glob("*.safetensors"))[-1]
    victim.unlink()
    assert main(["merge", "--out", str(out), "--resume", "--device", "cpu", "-q"]) == 0, capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != manifest.MANIFEST_NAME} == reference
    assert streammerge.verify(out=out).ok

    # one flipped byte of a merged tensor is still caught by verify --out alone.
    shard, offset = _merged_tensor(out, case)
    data = bytearray(shard.read_bytes())
    data[offset + 1] ^= 0x01
    shard.write_bytes(bytes(data))
    assert main(["verify", "--out", str(out)]) == 1
    text = capsys.readouterr().out
    assert "differ from the recomputation" in text


def test_the_recorded_options_matter(inputs, tmp_path):
    """Recomputing with default options would disagree: the replay is what makes these verify."""
    out = tmp_path / "out"
    assert main(["merge", *_merge_argv(inputs, "weighted"), "--out", str(out), "--device", "cpu", "-q"]) == 0
    doc = json.loads((out / manifest.MANIFEST_NAME).read_text())
    assert doc["options"]["weights"] == [0.7, -0.3]
    assert doc["sources"] == {"base": str(inputs["base"].absolute()),
                              "adapters": [str(inputs["a1"].absolute()), str(inputs["a2"].absolute())]}
    doc["options"]["weights"] = [1.0, 1.0]
    (out / manifest.MANIFEST_NAME).write_text(json.dumps(doc))
    report = streammerge.verify(out=out)
    assert not report.ok and any("differ from the recomputation" in p for p in report.problems)


def test_explicit_inputs_that_contradict_the_manifest(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["merge", *_merge_argv(inputs, "weighted"), "--out", str(out), "--device", "cpu", "-q"]) == 0
    # the same inputs, named explicitly: fine
    assert main(["verify", "--out", str(out), "--base", str(inputs["base"]), "--adapter", str(inputs["a1"]),
                 "--adapter", str(inputs["a2"])]) == 0
    capsys.readouterr()
    # one adapter where two were merged: refused with the recorded ones named
    assert main(["verify", "--out", str(out), "--adapter", str(inputs["a1"])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 adapter(s) given but streammerge.json records 2" in err[0], err
    # other adapters of the same count: reported as other inputs (exit 1)
    assert main(["verify", "--out", str(out), "--adapter", str(inputs["a2"]), "--adapter", str(inputs["a1"])]) == 1
    assert "records other inputs" in capsys.readouterr().out


def test_moved_inputs_can_be_named_again(inputs, tmp_path):
    """The manifest records where the inputs were; after a move, name them and verify still passes."""
    base = shutil.copytree(inputs["base"], tmp_path / "base")
    out = tmp_path / "out"
    streammerge.merge(base=base, adapter=inputs["a1"], out=out, device="cpu")
    moved = tmp_path / "moved"
    base.rename(moved)
    with pytest.raises(streammerge.StreamMergeError, match="base"):
        streammerge.verify(out=out)
    assert streammerge.verify(out=out, base=moved).ok


def test_unmerge_output_verifies_with_nothing_but_out(inputs, tmp_path):
    merged, out = tmp_path / "merged", tmp_path / "unmerged"
    streammerge.merge(base=inputs["base"], adapters=[(inputs["a1"], 0.7), (inputs["a2"], -0.3)], out=merged,
                      device="cpu")
    streammerge.unmerge(merged, inputs["a2"], out, weight=-0.3, device="cpu")
    assert streammerge.verify(out=out).ok
    assert json.loads((out / manifest.MANIFEST_NAME).read_text())["options"]["weight"] == -0.3
