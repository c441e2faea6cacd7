"""Output digests: the XXH3 piece digest as documented, ``--checksum sha256``, and manifests of older releases.

``data/manifest-f7df494.json`` is the ``streammerge.json`` that main at f7df494 (the release before XXH3,
sha256 everywhere) wrote for ``build_case``; it was made by running this file with that code first on
the path::

    git worktree add /tmp/sm-f7df494 f7df494
    PYTHONPATH=/tmp/sm-f7df494 python tests/test_checksum.py tests/data/manifest-f7df494.json

Its inputs are content-addressed (sizes and hashes of files that ``build_case`` rebuilds byte for byte),
so the record applies to the outputs a merge of today writes for the same inputs: those bytes did not
change (``test_execute``, the parity tests).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
from pathlib import Path

import pytest
import xxhash

import streammerge
from streammerge import identity, manifest, testing
from streammerge.plan import ROW_ALIGN

OLD = Path(__file__).parent / "data" / "manifest-f7df494.json"


def build_case(root: Path) -> tuple[Path, Path]:
    """The inputs of the recorded manifest (fixed seeds; the adapter names its base portably)."""
    base = testing.make_checkpoint(root / "base", layers=2, hidden=64, intermediate=128, vocab=128, shards=3)
    adapter = testing.make_adapter(root / "adapter", base, targets=testing.LLAMA_LINEAR, r=8, alpha=16,
                                   config={"base_model_name_or_path": "base"})
    return base, adapter


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return build_case(tmp_path_factory.mktemp("case"))


@pytest.fixture
def old_doc() -> dict:
    return json.loads(OLD.read_text())


def _as_previous_release(out: Path) -> None:
    """Make ``out`` (shards written today: the same bytes) the directory that release wrote: its manifest and
    its side files (their bytes changed since, e.g. config.json is now copied verbatim)."""
    (out / manifest.MANIFEST_NAME).write_text(OLD.read_text())
    for f in OLD.with_suffix("").iterdir():
        (out / f.name).write_bytes(f.read_bytes())


def _stamps(out: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.safetensors")}


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def _independent_xxh3_rows(path: Path) -> str:
    """The documented ``xxh3_128_rows``, reimplemented from the safetensors format alone."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    start = 8 + n
    digests = [xxhash.xxh3_128_digest(data[:start])]
    for info in sorted((v for k, v in header.items() if k != "__metadata__"), key=lambda v: v["data_offsets"][0]):
        begin, end = (start + o for o in info["data_offsets"])
        rows = info["shape"][0] if info["shape"] else 1
        if end == begin:
            continue
        row_bytes = (end - begin) // rows
        cuts = list(range(0, rows, ROW_ALIGN))
        if len(cuts) > 1 and rows - cuts[-1] < ROW_ALIGN:
            cuts.pop()  # a short tail joins the piece before it
        for r0, r1 in zip(cuts, [*cuts[1:], rows], strict=True):
            digests.append(xxhash.xxh3_128_digest(data[begin + r0 * row_bytes : begin + r1 * row_bytes]))
    return xxhash.xxh3_128_hexdigest(b"".join(digests))


def test_default_digests_are_the_documented_ones(case, tmp_path):
    base, adapter = case
    out = tmp_path / "out"
    streammerge.merge(base=base, adapter=adapter, out=out, device="cpu")
    doc = json.loads((out / manifest.MANIFEST_NAME).read_text())
    assert {tuple(sorted(r)) for r in doc["shards"]} == {("file", "identity", "size", "xxh3_128_rows")}
    for rec in doc["shards"]:
        assert rec["xxh3_128_rows"] == _independent_xxh3_rows(out / rec["file"])
    for rec in doc["files"]:
        assert set(rec) == {"file", "size", "xxh3_128"}
        assert rec["xxh3_128"] == xxhash.xxh3_128_hexdigest((out / rec["file"]).read_bytes())


def test_sha256_mode_writes_what_the_previous_release_wrote(case, tmp_path, old_doc, monkeypatch):
    base, adapter = case
    monkeypatch.setattr(identity, "tool_version", lambda: old_doc["tool"]["version"])
    out = tmp_path / "out"
    streammerge.merge(base=base, adapter=adapter, out=out, device="cpu", checksum="sha256")
    doc = json.loads((out / manifest.MANIFEST_NAME).read_text())
    # the shard records byte for byte (digests and identities); ``sources`` (paths) came later, and the side
    # files' bytes changed since (config.json is copied verbatim now), but not how they are recorded
    assert {k: doc[k] for k in ("format", "tool", "inputs", "options", "shards")} == \
        {k: old_doc[k] for k in ("format", "tool", "inputs", "options", "shards")}
    assert [sorted(r) for r in doc["files"]] == [sorted(r) for r in old_doc["files"]]
    for rec in doc["files"]:
        assert rec["sha256"] == hashlib.sha256((out / rec["file"]).read_bytes()).hexdigest()


def test_a_manifest_of_the_previous_release_verifies_and_catches_a_flip(case, tmp_path, old_doc):
    base, adapter = case
    out = tmp_path / "out"
    streammerge.merge(base=base, adapter=adapter, out=out, device="cpu")
    _as_previous_release(out)
    report = streammerge.verify(out=out, base=base, adapter=adapter, device="cpu")
    assert report.ok, report.problems
    victim = out / old_doc["shards"][1]["file"]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0x01
    victim.write_bytes(bytes(data))
    problems = streammerge.verify(out=out, base=base, adapter=adapter, device="cpu").problems
    assert any(f"{victim}: sha256 differs from the manifest" in p for p in problems), problems


def test_a_manifest_of_the_previous_release_resumes_keeping_every_shard(case, tmp_path, old_doc, monkeypatch):
    base, adapter = case
    monkeypatch.setattr(identity, "tool_version", lambda: old_doc["tool"]["version"])  # same release, old records
    fresh, out = tmp_path / "fresh", tmp_path / "out"
    streammerge.merge(base=base, adapter=adapter, out=fresh, device="cpu")
    streammerge.merge(base=base, adapter=adapter, out=out, device="cpu")
    _as_previous_release(out)
    stamps = _stamps(out)
    streammerge.merge(base=base, adapter=adapter, out=out, device="cpu", resume=True, checksum="xxh3")
    assert _stamps(out) == stamps  # kept, not rewritten
    assert _files(out) == _files(fresh)  # and the new manifest records them with this run's digest


def test_resume_keeps_the_checksum_the_records_use(case, tmp_path, old_doc, monkeypatch):
    base, adapter = case
    monkeypatch.setattr(identity, "tool_version", lambda: old_doc["tool"]["version"])
    out = tmp_path / "out"
    streammerge.merge(base=base, adapter=adapter, out=out, device="cpu")
    _as_previous_release(out)
    stamps = _stamps(out)
    streammerge.merge(base=base, adapter=adapter, out=out, device="cpu", resume=True)  # no checksum named
    assert _stamps(out) == stamps
    doc = json.loads((out / manifest.MANIFEST_NAME).read_text())
    assert doc["shards"] == old_doc["shards"] and all("sha256" in r for r in doc["files"])


def test_a_progress_record_of_the_previous_release_resumes(case, tmp_path, old_doc, monkeypatch):
    """An interrupted run of the previous release: two shards recorded (its records, as it wrote them),
    the third missing. The two are kept (checked by sha256), the third recomputed, all recorded by sha256."""
    base, adapter = case
    monkeypatch.setattr(identity, "tool_version", lambda: old_doc["tool"]["version"])
    fresh, out = tmp_path / "fresh", tmp_path / "out"
    streammerge.merge(base=base, adapter=adapter, out=fresh, device="cpu", checksum="sha256")
    streammerge.merge(base=base, adapter=adapter, out=out, device="cpu")
    for name in os.listdir(out):
        if not name.endswith(".safetensors") or name == old_doc["shards"][2]["file"]:
            (out / name).unlink()
    progress = {"format": manifest.FORMAT, "complete": False, "shards": old_doc["shards"][:2]}
    (out / manifest.PROGRESS_NAME).write_text(json.dumps(progress, indent=2) + "\n")
    stamps = _stamps(out)
    streammerge.merge(base=base, adapter=adapter, out=out, device="cpu", resume=True)
    assert _stamps(out).items() >= stamps.items()
    assert _files(out) == _files(fresh)


def test_resume_checks_a_tampered_old_record_and_recomputes(case, tmp_path, old_doc, monkeypatch):
    base, adapter = case
    monkeypatch.setattr(identity, "tool_version", lambda: old_doc["tool"]["version"])
    fresh, out = tmp_path / "fresh", tmp_path / "out"
    streammerge.merge(base=base, adapter=adapter, out=fresh, device="cpu", checksum="sha256")
    streammerge.merge(base=base, adapter=adapter, out=out, device="cpu", checksum="sha256")
    _as_previous_release(out)
    victim = out / old_doc["shards"][0]["file"]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0x01
    victim.write_bytes(bytes(data))
    streammerge.merge(base=base, adapter=adapter, out=out, device="cpu", resume=True, checksum="sha256")
    assert _files(out) == _files(fresh)


@pytest.mark.parametrize("checksum", ["xxh3", "sha256"])
def test_digest_of_a_file_alone_matches_the_record(case, tmp_path, checksum):
    base, adapter = case
    out = tmp_path / "out"
    streammerge.merge(base=base, adapter=adapter, out=out, device="cpu", checksum=checksum, max_shard_size=30_000)
    from streammerge import digest  # not at the top: the __main__ below runs with the previous release

    doc = json.loads((out / manifest.MANIFEST_NAME).read_text())
    assert len(doc["shards"]) > 3
    for rec in doc["shards"] + doc["files"]:
        key, value = digest.record_digest(rec)
        assert digest.file_digest(out / rec["file"], key) == value, rec["file"]


def test_an_unknown_checksum_is_refused_before_anything_is_written(case, tmp_path):
    base, adapter = case
    with pytest.raises(streammerge.StreamMergeError, match="`checksum` 'md5': use one of xxh3, sha256"):
        streammerge.merge(base=base, adapter=adapter, out=tmp_path / "out", device="cpu", checksum="md5")
    assert not (tmp_path / "out").exists()


if __name__ == "__main__":  # record the manifest and side files with whatever streammerge is first on the path
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        b, a = build_case(Path(tmp))
        streammerge.merge(base=b, adapter=a, out=Path(tmp) / "out", device="cpu")
        dest = Path(sys.argv[1])
        dest.write_text((Path(tmp) / "out" / manifest.MANIFEST_NAME).read_text())
        side = dest.with_suffix("")  # data/manifest-f7df494/: the other small files of that output
        side.mkdir(exist_ok=True)
        for rec in json.loads(dest.read_text())["files"]:
            (side / rec["file"]).write_bytes((Path(tmp) / "out" / rec["file"]).read_bytes())
    print(f"wrote {sys.argv[1]} with {streammerge.__file__}")


@pytest.mark.parametrize("checksum", ["xxh3", "sha256"])
def test_checksum_round_trips_through_verify_and_resume_with_nothing_but_out(case, tmp_path, checksum, capsys):
    from streammerge.cli import main

    base, adapter = case
    out = tmp_path / "out"
    argv = ["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out), "--device", "cpu", "-q"]
    assert main([*argv, "--checksum", checksum]) == 0
    first = _files(out)
    key = "sha256" if checksum == "sha256" else "xxh3_128_rows"
    assert all(key in rec for rec in json.loads(first[manifest.MANIFEST_NAME])["shards"])
    assert main(["verify", "--out", str(out)]) == 0, capsys.readouterr()
    victim = sorted(out.glob("*.safetensors"))[1]
    victim.unlink()
    assert main(["merge", "--out", str(out), "--resume", "--device", "cpu", "-q"]) == 0, capsys.readouterr().err
    assert _files(out) == first  # the same bytes, and the same digests in the same manifest
    assert main(["verify", "--out", str(out)]) == 0
