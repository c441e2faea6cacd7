"""``verify``: a good merge passes; one flipped byte anywhere, a stray file or other inputs do not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import streammerge
from streammerge import digest, manifest, testing
from streammerge.cli import main
from streammerge.header import read_header
from streammerge.plan import ROW_ALIGN
from streammerge.verify import sample_blocks

MERGED = "model.layers.0.mlp.gate_proj.weight"  # a LoRA target (r=8 on every linear)
COPIED = "model.layers.0.input_layernorm.weight"  # untouched: raw bytes of the base


@pytest.fixture(params=["xxh3", "sha256"])
def merged(request, tmp_path, llama):
    base, adapter = llama
    out = tmp_path / "out"
    streammerge.merge(base=base, adapter=adapter, out=out, device="cpu", checksum=request.param)
    return base, adapter, out


def _locate(out: Path, tensor: str) -> tuple[Path, int, int]:
    """(shard, absolute byte offset, byte length) of ``tensor`` in the merged directory."""
    index = out / "model.safetensors.index.json"
    shard = out / json.loads(index.read_text())["weight_map"][tensor] if index.exists() else out / "model.safetensors"
    header = read_header(shard)
    info = header.by_name()[tensor]
    return shard, header.data_start + info.begin, info.nbytes


def _flip(out: Path, tensor: str, at: int, *, fix_manifest: bool = False) -> None:
    """Flip one bit of the byte ``at`` of ``tensor``; optionally re-record the shard's digest (a forger)."""
    shard, start, nbytes = _locate(out, tensor)
    assert 0 <= at < nbytes
    data = bytearray(shard.read_bytes())
    data[start + at] ^= 0x01
    shard.write_bytes(bytes(data))
    if fix_manifest:
        doc = json.loads((out / manifest.MANIFEST_NAME).read_text())
        for rec in doc["shards"]:
            if rec["file"] == shard.name:
                key, _ = digest.record_digest(rec)
                rec[key] = digest.file_digest(shard, key)  # xxh3_128_rows: pieces from the file's own header
        (out / manifest.MANIFEST_NAME).write_text(json.dumps(doc))


def _verify(base, adapter, out, **kw):
    return streammerge.verify(out=out, base=base, adapter=adapter, device="cpu", **kw)


@pytest.mark.parametrize("sample", [None, 1])
def test_a_fresh_merge_verifies(merged, sample):
    base, adapter, out = merged
    report = _verify(base, adapter, out, sample=sample)
    assert report.ok, report.problems
    assert report.tensors_checked == 21 and report.tensors_recomputed == 14
    assert report.bytes_hashed == sum(p.stat().st_size for p in out.glob("*.safetensors"))
    if sample is None:
        # every row of the 14 targets: q, k, v, o, gate, up, down per layer (hidden 64, kv 32, intermediate 128)
        assert report.rows_recomputed == 2 * (64 + 32 + 32 + 64 + 128 + 128 + 64)
    else:  # one aligned block each (k and v have only 32 rows)
        assert report.rows_recomputed == 2 * (64 + 32 + 32 + 64 + 64 + 64 + 64)


@pytest.mark.parametrize("fix_manifest", [False, True], ids=["plain", "forged-sha"])
@pytest.mark.parametrize(("tensor", "against"), [(MERGED, "the recomputation"), (COPIED, "its source")])
def test_one_flipped_byte_is_caught_and_named(merged, tensor, against, fix_manifest):
    base, adapter, out = merged
    _, _, nbytes = _locate(out, tensor)
    _flip(out, tensor, nbytes - 3, fix_manifest=fix_manifest)
    report = _verify(base, adapter, out)
    assert not report.ok
    hits = [p for p in report.problems if repr(tensor) in p]
    assert len(hits) == 1 and "1 byte(s) differ from " + against in hits[0], report.problems
    record = json.loads((out / manifest.MANIFEST_NAME).read_text())["shards"][0]
    key = "sha256" if "sha256" in record else "xxh3_128_rows"
    assert any(f"{key} differs" in p for p in report.problems) != fix_manifest


def test_sampling_catches_a_flip_inside_a_sampled_block_and_misses_none_it_covers(tmp_path):
    # 704 rows: not a multiple of 64, so the last sampled block may be a folded 128-row tail.
    base = testing.make_checkpoint(tmp_path / "b", layers=1, hidden=128, intermediate=704, vocab=160)
    adapter = testing.make_adapter(tmp_path / "a", base, targets=("gate_proj",), r=4)
    out = tmp_path / "o"
    streammerge.merge(base=base, adapter=adapter, out=out, device="cpu", max_memory=64 << 20)
    task_rows = 704
    assert _verify(base, adapter, out, sample=100).ok  # 64-row recomputation == the merge's larger blocks
    tensor = "model.layers.0.mlp.gate_proj.weight"
    blocks = sample_blocks(next(t for t in streammerge.plan_merge(base, adapter).tasks() if t.name == tensor), 100)
    assert sum(r1 - r0 for r0, r1 in blocks) >= 100 and all(r0 % ROW_ALIGN == 0 for r0, _ in blocks)
    assert blocks[-1][1] <= task_rows
    r0, r1 = blocks[-1]
    _flip(out, tensor, (r1 - 1) * 128 * 2, fix_manifest=True)  # last row of the last sampled block (bf16)
    report = _verify(base, adapter, out, sample=100)
    assert any(f"{tensor!r} rows {r0}..{r1}" in p for p in report.problems), report.problems


def test_missing_manifest_stray_files_and_other_inputs_are_reported(merged, tmp_path):
    base, adapter, out = merged
    other = testing.make_adapter(tmp_path / "other", base, targets=testing.LLAMA_LINEAR, seed=7)
    report = _verify(base, other, out)
    assert any("records other inputs" in p and "adapter files differ" in p for p in report.problems)
    assert sum("differ from the recomputation" in p for p in report.problems) == 14
    (out / manifest.MANIFEST_NAME).unlink()
    (out / ".model-00001-of-00003.safetensors.abc.tmp").write_bytes(b"x")
    (out / "model-00009-of-00009.safetensors").write_bytes(b"x")
    problems = _verify(base, adapter, out).problems
    assert any("did not complete" in p for p in problems)
    assert any(".tmp: left by an unfinished merge" in p for p in problems)
    assert any("model-00009-of-00009.safetensors: not part of this merge" in p for p in problems)
    assert not any("differ" in p for p in problems)  # the tensors themselves are still right


def test_cli_exit_codes(merged, tmp_path, capsys):
    base, adapter, out = merged
    argv = ["verify", "--base", str(base), "--adapter", str(adapter), "--out", str(out)]
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith("OK: ")
    _flip(out, COPIED, 0)
    assert main([*argv, "--sample", "1"]) == 1  # copies are always checked in full
    text = capsys.readouterr().out
    assert text.startswith("FAILED: ") and COPIED in text
    assert main(["verify", "--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "none: not a directory" in err[0]
