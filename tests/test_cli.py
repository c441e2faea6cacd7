"""The command line: exit codes, one-line errors naming the culprit, nothing written on failure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from streammerge import testing
from streammerge.cli import main


def _edit_json(path: Path, **changes) -> None:
    doc = json.loads(path.read_text())
    doc.update(changes)
    path.write_text(json.dumps(doc))


def _edit_adapter(adapter: Path, fn) -> None:
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    save_file(fn(tensors), str(adapter / "adapter_model.safetensors"))


def _break(case: str, tmp: Path, base: Path, adapter: Path) -> tuple[list[str], str]:
    """Apply a bad-input case; returns extra argv and the expected message fragment."""
    out = ["--out", str(tmp / "out")]
    args = ["--base", str(base), "--adapter", str(adapter)]
    if case == "missing-base":
        return ["--base", str(tmp / "nope"), "--adapter", str(adapter), *out], "base checkpoint not found"
    if case == "missing-adapter":
        return ["--base", str(base), "--adapter", str(tmp / "nope"), *out], "adapter directory not found"
    if case == "out-is-base":
        return [*args, "--out", str(base)], "the output is the input directory"
    if case == "out-inside-adapter":
        return [*args, "--out", str(adapter / "merged")], "lies inside the input directory"
    if case == "out-not-empty":
        (tmp / "out").mkdir()
        (tmp / "out" / "keep.txt").write_text("x")
        return [*args, *out], "directory is not empty"
    if case == "different-base":
        other = testing.make_checkpoint(tmp / "other", layers=2, hidden=32, intermediate=64, vocab=128)
        return ["--base", str(other), "--adapter", str(adapter), *out], "trained on a different base model"
    if case == "unknown-key":
        _edit_adapter(adapter, lambda t: t | {"base_model.model.model.layers.9.foo.weight": t[next(iter(t))].clone()})
        return [*args, *out], "'model.layers.9.foo.weight', which is not in the base"
    if case == "missing-lora-b":
        _edit_adapter(adapter, lambda t: {k: v for k, v in t.items() if "layers.0.self_attn.q_proj.lora_B" not in k})
        return [*args, *out], "no lora_B tensor"
    if case == "rank-mismatch":
        _edit_json(adapter / "adapter_config.json", r=4)
        return [*args, *out], "the config and weights disagree"
    if case == "dora":
        _edit_json(adapter / "adapter_config.json", use_dora=True)
        return [*args, *out], "DoRA"
    if case == "unknown-peft-type":
        _edit_json(adapter / "adapter_config.json", peft_type="FOO")
        return [*args, *out], "peft_type 'FOO' is not supported"
    if case == "pissa":
        _edit_json(adapter / "adapter_config.json", init_lora_weights="pissa")
        return [*args, *out], "init_lora_weights='pissa' changes the base"
    if case == "layer-replication":
        _edit_json(adapter / "adapter_config.json", layer_replication=[[0, 2]])
        return [*args, *out], "layer_replication"
    if case == "bad-json":
        (adapter / "adapter_config.json").write_text("{oops")
        return [*args, *out], "invalid JSON"
    if case == "quantized":
        shard = sorted(base.glob("*.safetensors"))[0]
        t = load_file(str(shard))
        t["model.layers.0.self_attn.q_proj.weight.absmax"] = t[next(iter(t))].float()
        save_file(t, str(shard))
        index = json.loads((base / "model.safetensors.index.json").read_text())
        index["weight_map"]["model.layers.0.self_attn.q_proj.weight.absmax"] = shard.name
        (base / "model.safetensors.index.json").write_text(json.dumps(index))
        return [*args, *out], "bitsandbytes 4-bit quantized base"
    if case == "truncated-shard":
        shard = sorted(base.glob("*.safetensors"))[1]
        shard.write_bytes(shard.read_bytes()[:-10])
        return [*args, *out], "truncated"
    raise AssertionError(case)


BAD = ["missing-base", "missing-adapter", "out-is-base", "out-inside-adapter", "out-not-empty", "different-base",
       "unknown-key", "missing-lora-b", "rank-mismatch", "dora", "unknown-peft-type", "pissa", "layer-replication",
       "bad-json", "quantized", "truncated-shard"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, tmp_path, llama, capsys):
    base, adapter = llama
    argv, fragment = _break(case, tmp_path, base, adapter)
    out = Path(argv[argv.index("--out") + 1])
    existed = out.exists()
    before = sorted(out.iterdir()) if existed else None
    assert main(["merge", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1 and fragment in errors[0], err
    assert "Traceback" not in "\n".join(err)
    if existed:
        assert sorted(out.iterdir()) == before
    else:
        assert not out.exists()


def test_merge_prints_a_summary_and_dry_run_writes_nothing(tmp_path, llama, capsys):
    base, adapter = llama
    argv = ["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "o"), "--device", "cpu"]
    assert main([*argv, "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "plan: 14 tensors to merge" in text and "minimum working memory" in text
    assert not (tmp_path / "o").exists()
    assert main(argv) == 0
    assert "14 merged, 0 replaced, 0 added, 7 copied" in capsys.readouterr().out


def test_base_is_found_from_adapter_config(tmp_path, llama, capsys):
    base, adapter = llama  # make_adapter records base_model_name_or_path = str(base)
    assert main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "o"), "--device", "cpu"]) == 0
    assert not testing.changed(testing.load_dir(tmp_path / "o"), testing.reference_merge(base, adapter))


def _run(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streammerge", *argv], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


def test_base_is_found_in_the_hf_cache_offline(tmp_path, llama):
    base, adapter = llama
    cache = tmp_path / "hub"
    snap = cache / "models--acme--tiny-llama" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    for f in base.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (cache / "models--acme--tiny-llama" / "refs").mkdir()
    (cache / "models--acme--tiny-llama" / "refs" / "main").write_text("a" * 40)
    _edit_json(adapter / "adapter_config.json", base_model_name_or_path="acme/tiny-llama")
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    done = _run("merge", "--adapter", str(adapter), "--out", str(tmp_path / "o"), "--device", "cpu", env=env)
    assert done.returncode == 0, done.stderr
    assert not testing.changed(testing.load_dir(tmp_path / "o"), testing.reference_merge(base, adapter))
    _edit_json(adapter / "adapter_config.json", base_model_name_or_path="acme/absent")
    done = _run("merge", "--adapter", str(adapter), "--out", str(tmp_path / "o2"), env=env)
    assert done.returncode == 2
    assert "'acme/absent'" in done.stderr and str(cache) in done.stderr and "--base" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "o2").exists()


def test_demo_runs_as_a_module():
    done = _run("demo", "-q")
    assert done.returncode == 0, done.stderr
    assert "bit for bit" in done.stdout
