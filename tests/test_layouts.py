"""Repository layouts people bring: an index beside unrelated weights, a corrupt index, shards without
an index, pickled shards with an index, and models in a sub-folder of a multi-model repository.

Each case is either handled (the output is byte for byte the merge of the clean base) or refused with
one exact line (exit 2) that names the files involved.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import streammerge
from streammerge import manifest, testing
from streammerge.cli import main

INDEX = "model.safetensors.index.json"
SHARDS = tuple(f"model-{k:05d}-of-00003.safetensors" for k in (1, 2, 3))


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A 3-shard base, an adapter on every linear layer, and the merge of the two (the reference output)."""
    root = tmp_path_factory.mktemp("layouts")
    base = testing.make_checkpoint(root / "base", layers=2, hidden=64, intermediate=128, vocab=128, shards=3)
    testing.make_adapter(root / "adapter", base, targets=testing.LLAMA_LINEAR, r=8, alpha=16)
    streammerge.merge(base=base, adapter=root / "adapter", out=root / "ref", device="cpu")
    return root


@pytest.fixture
def case(template, tmp_path) -> Path:
    shutil.copytree(template / "base", tmp_path / "base")
    return tmp_path


def _weights(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix == ".safetensors" or p.name == INDEX}


def _merge_cli(template: Path, base: Path, out: Path, *extra: str) -> int:
    return main(["merge", "--base", str(base), "--adapter", str(template / "adapter"), "--out", str(out),
                 "--device", "cpu", "-q", *extra])


def _refused(template: Path, base: Path, out: Path, capsys, *extra: str) -> str:
    capsys.readouterr()
    assert _merge_cli(template, base, out, *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert not out.exists()
    return err[0]


def _edit_index(base: Path, edit) -> None:
    doc = json.loads((base / INDEX).read_text())
    edit(doc["weight_map"])
    (base / INDEX).write_text(json.dumps(doc, indent=2))


def test_the_index_is_followed_and_weights_beside_it_are_never_read(template, case):
    base = case / "base"
    bogus = {n: t + 1 for n, t in load_file(str(base / SHARDS[0])).items()}  # same names, other values
    save_file(bogus, str(base / "consolidated.safetensors"))  # Mistral: the original-format file beside
    (base / "original").mkdir()  # GPT-OSS: the original checkpoint in a sub-folder
    save_file(bogus, str(base / "original" / "model.safetensors"))
    (base / "original" / "config.json").write_text("{}")
    report = streammerge.merge(base=base, adapter=template / "adapter", out=case / "out", device="cpu")
    assert report.warnings == ()
    assert _weights(case / "out") == _weights(template / "ref")


def test_an_index_spelling_a_shard_with_dot_slash_is_the_same_shard(template, case):
    base = case / "base"
    _edit_index(base, lambda wm: wm.update({k: f"./{v}" for k, v in list(wm.items())[:3]}))
    streammerge.merge(base=base, adapter=template / "adapter", out=case / "out", device="cpu")
    assert _weights(case / "out") == _weights(template / "ref")


def test_an_index_listing_a_tensor_in_two_shards_is_refused_naming_both(template, case, capsys):
    base = case / "base"
    doc = json.loads((base / INDEX).read_text())
    name = next(k for k, v in doc["weight_map"].items() if v == SHARDS[0])
    text = json.dumps(doc, indent=2)  # a duplicate key: json.loads alone would silently keep the last
    text = text.replace(f'"{name}": "{SHARDS[0]}"', f'"{name}": "{SHARDS[0]}",\n    "{name}": "{SHARDS[1]}"')
    (base / INDEX).write_text(text)
    line = _refused(template, base, case / "out", capsys)
    assert line == (f"error: {base / INDEX}: tensor {name!r} is listed twice, in {SHARDS[0]} and in {SHARDS[1]}; "
                    "the index is corrupt: re-download it")


def test_an_index_naming_one_shard_file_twice_is_refused_naming_both(template, case, capsys):
    base = case / "base"
    os.symlink(SHARDS[0], base / "alias.safetensors")  # a second name for the same file (as in an HF cache)
    _edit_index(base, lambda wm: wm.update({next(k for k, v in wm.items() if v == SHARDS[0]): "alias.safetensors"}))
    line = _refused(template, base, case / "out", capsys)
    assert line == (f"error: {base / INDEX}: shards alias.safetensors and {SHARDS[0]} are the same file; the index "
                    "lists one shard twice: fix the index (or re-download the checkpoint)")


def test_shards_without_an_index_are_reconstructed_and_said_so(template, case):
    base = case / "base"
    (base / INDEX).unlink()
    save_file({"junk": torch.zeros(2)}, str(base / "consolidated.safetensors"))
    report = streammerge.merge(base=base, adapter=template / "adapter", out=case / "out", device="cpu")
    assert report.warnings == (
        f"{base}: no {INDEX}: the index was reconstructed from the 3 shards {SHARDS[0]} .. {SHARDS[2]}; "
        "ignored consolidated.safetensors beside them",
    )
    assert _weights(case / "out") == _weights(template / "ref")  # the same shards and the same index
    assert streammerge.verify(case / "out", base, template / "adapter").ok


def test_shards_without_an_index_are_refused_when_one_is_missing(template, case, capsys):
    base = case / "base"
    (base / INDEX).unlink()
    (base / SHARDS[1]).unlink()
    line = _refused(template, base, case / "out", capsys)
    assert line == (f"error: {base}: no {INDEX}, and the shards model-*-of-00003.safetensors are incomplete "
                    f"({SHARDS[1]} missing); download the missing shard(s) or restore the index file")


def test_shards_without_an_index_holding_one_tensor_twice_are_refused(template, case, capsys):
    base = case / "base"
    (base / INDEX).unlink()
    first = load_file(str(base / SHARDS[0]))
    name = next(iter(first))
    save_file({**load_file(str(base / SHARDS[1])), name: first[name]}, str(base / SHARDS[1]))
    line = _refused(template, base, case / "out", capsys)
    assert line == f"error: {base}: tensor {name!r} is in both {SHARDS[0]} and {SHARDS[1]}; fix the checkpoint"


def test_two_sets_of_shards_without_an_index_are_refused(template, case, capsys):
    base = case / "base"
    (base / INDEX).unlink()
    shutil.copy(base / SHARDS[0], base / "model-00001-of-00001.safetensors")
    line = _refused(template, base, case / "out", capsys)
    assert line == (f"error: {base}: no {INDEX} and several sets of shards (model-*-of-00001.safetensors, "
                    "model-*-of-00003.safetensors); restore the index file that says which set is the model")


def test_a_pickled_index_is_followed_past_a_stray_safetensors_file(template, case):
    base = case / "base"
    weight_map = {}
    for k, shard in enumerate(SHARDS, 1):
        tensors = load_file(str(base / shard))
        name = f"pytorch_model-{k:05d}-of-00003.bin"
        torch.save(tensors, base / name)
        weight_map |= dict.fromkeys(tensors, name)
        (base / shard).unlink()
    (base / INDEX).unlink()
    (base / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    save_file({"junk": torch.zeros(2)}, str(base / "consolidated.safetensors"))
    streammerge.merge(base=base, adapter=template / "adapter", out=case / "out", device="cpu")
    assert _weights(case / "out") == _weights(template / "ref")


# ------------------------------------------------------------------------------------------------
# A model in a sub-folder of a multi-model repository (diffusers pipelines: text_encoder/, transformer/)


@pytest.fixture
def repo(template, tmp_path) -> tuple[Path, Path]:
    """A pipeline repository whose text_encoder/ is the template's base, and an adapter naming the repo."""
    root = tmp_path / "pipeline"
    shutil.copytree(template / "base", root / "text_encoder")
    testing.make_checkpoint(root / "unet", layers=1, hidden=32, intermediate=64, vocab=64, seed=7)
    (root / "model_index.json").write_text('{"_class_name": "SomePipeline"}')
    adapter = tmp_path / "adapter"
    shutil.copytree(template / "adapter", adapter)
    doc = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**doc, "base_model_name_or_path": str(root)}))
    return root, adapter


def test_base_subfolder_round_trip_merge_verify_resume(template, repo, tmp_path, capsys):
    _root, adapter = repo
    out = tmp_path / "out"
    argv = ["merge", "--adapter", str(adapter), "--base-subfolder", "text_encoder", "--out", str(out),
            "--device", "cpu", "-q"]
    assert main(argv) == 0  # the base is found from the adapter (the repository), then its sub-folder
    assert _weights(out) == _weights(template / "ref")
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "tokenizer_config.json", "generation_config.json"} <= files
    assert "model_index.json" not in files
    assert json.loads((out / manifest.MANIFEST_NAME).read_text())["options"]["base_subfolder"] == "text_encoder"
    capsys.readouterr()
    assert main(["verify", "--out", str(out)]) == 0, capsys.readouterr().out  # the recorded inputs and sub-folder
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / SHARDS[1]).unlink()  # a lost shard: --resume keeps the others (their records match) and redoes it
    kept = (out / SHARDS[0]).stat().st_ino
    assert main(["merge", "--out", str(out), "--resume", "--device", "cpu", "-q"]) == 0
    assert (out / SHARDS[0]).stat().st_ino == kept  # kept, not rewritten: the recorded sub-folder matched
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert main([*argv, "--resume"]) == 0  # naming the inputs again: the same identity, nothing rewritten
    assert (out / SHARDS[0]).stat().st_ino == kept
    assert main(["verify", "--out", str(out), "--against-base"]) == 0
    capsys.readouterr()
    assert main(["verify", "--out", str(out), "--base-subfolder", "unet"]) == 2  # another model: refused
    assert "the adapter was trained on a different base model" in capsys.readouterr().err


@pytest.mark.parametrize("sub, message", [
    ("../elsewhere", "error: base sub-folder '../elsewhere': must be a folder name inside the base directory "
                     "(like text_encoder)"),
    ("/etc", "error: base sub-folder '/etc': must be a folder name inside the base directory (like text_encoder)"),
    ("vae", "error: {root}/vae: no such sub-folder of the base; the base has sub-folders text_encoder, unet"),
])
def test_bad_base_subfolder_is_refused(template, repo, tmp_path, capsys, sub, message):
    root, _ = repo
    line = _refused(template, root, tmp_path / "out", capsys, "--base-subfolder", sub)
    assert line == message.format(root=root)


def test_a_multi_model_repository_without_subfolder_points_at_the_option(template, repo, tmp_path, capsys):
    root, _ = repo
    line = _refused(template, root, tmp_path / "out", capsys)
    assert line == (f"error: {root}: no *.safetensors checkpoint here; its sub-folders text_encoder, unet hold "
                    "weights: pass --base-subfolder NAME; pass --base DIR with the base model")


def test_a_diffusers_sharded_model_keeps_its_file_and_index_names(template, tmp_path, capsys):
    sub = tmp_path / "pipeline" / "transformer"
    shutil.copytree(template / "base", sub)
    rename = {s: s.replace("model-", "diffusion_pytorch_model-") for s in SHARDS}
    for old, new in rename.items():
        (sub / old).rename(sub / new)
    doc = json.loads((sub / INDEX).read_text())
    doc["weight_map"] = {k: rename[v] for k, v in doc["weight_map"].items()}
    (sub / INDEX).unlink()
    (sub / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(doc))
    save_file({"junk": torch.zeros(2)}, str(sub / "model.safetensors.bak.safetensors"))  # never globbed
    out = tmp_path / "out"
    assert _merge_cli(template, tmp_path / "pipeline", out, "--base-subfolder", "transformer") == 0
    ref = _weights(template / "ref")
    want = {rename.get(n, n): data for n, data in ref.items() if n != INDEX}
    want["diffusion_pytorch_model.safetensors.index.json"] = ref[INDEX].decode().replace(
        '"model-', '"diffusion_pytorch_model-').encode()
    got = {p.name: p.read_bytes() for p in out.iterdir() if p.name.startswith("diffusion_pytorch_model")}
    assert got == want and not (out / INDEX).exists()
    assert main(["verify", "--out", str(out)]) == 0, capsys.readouterr().out


def test_diffusers_shards_without_their_index_are_reconstructed_under_diffusers_names(template, case):
    base = case / "base"
    (base / INDEX).unlink()
    for s in SHARDS:
        (base / s).rename(base / s.replace("model-", "diffusion_pytorch_model-"))
    report = streammerge.merge(base=base, adapter=template / "adapter", out=case / "out", device="cpu")
    assert report.warnings[0].startswith(f"{base}: no diffusion_pytorch_model.safetensors.index.json: the index "
                                         "was reconstructed from the 3 shards")
    assert (case / "out" / "diffusion_pytorch_model.safetensors.index.json").is_file()


def test_pickled_shards_without_their_index_are_reconstructed(template, case):
    base = case / "base"
    for k, shard in enumerate(SHARDS, 1):
        torch.save(load_file(str(base / shard)), base / f"pytorch_model-{k:05d}-of-00003.bin")
        (base / shard).unlink()
    (base / INDEX).unlink()
    report = streammerge.merge(base=base, adapter=template / "adapter", out=case / "out", device="cpu")
    assert report.warnings == (
        f"{base}: no pytorch_model.bin.index.json: the index was reconstructed from the 3 shards "
        "pytorch_model-00001-of-00003.bin .. pytorch_model-00003-of-00003.bin",
    )
    assert _weights(case / "out") == _weights(template / "ref")  # safetensors shards and index, as from the original
