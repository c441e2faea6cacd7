"""Whole merges with direct I/O (the default where the filesystem allows) and with ``--buffered-io``:
the same bytes, direct writes really taken, verify and resume with nothing but ``--out``, and the
process's torch thread count left as it was; and verify, which reads shards through maps, dropping every
page it read. The base is big enough (tensors of 256 KiB to 1 MiB) that
merge blocks and copy runs have aligned middles worth writing direct."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import streammerge
from streammerge import diskio, testing

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="O_DIRECT is a Linux open flag here")


@pytest.fixture(scope="module")
def medium(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("medium")
    base = testing.make_checkpoint(root / "base", layers=2, hidden=256, intermediate=1024, vocab=1024, shards=2)
    adapter = testing.make_adapter(root / "adapter", base, targets=testing.LLAMA_LINEAR, r=8, alpha=16)
    return base, adapter


def _shards(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.safetensors"))}


def _count_direct(monkeypatch) -> list[int]:
    seen: list[int] = []
    real = diskio.write_direct

    def spy(fd, view, off):
        seen.append(len(view))
        real(fd, view, off)

    monkeypatch.setattr(diskio, "write_direct", spy)
    return seen


@linux
def test_direct_and_buffered_writes_give_the_same_shards_for_any_workers_and_budget(tmp_path, medium, monkeypatch):
    base, adapter = medium
    seen = _count_direct(monkeypatch)
    outs = {}
    for direct in (True, False):
        for workers, budget in ((1, 2 << 20), (2, 512 << 20), (4, 3 << 20)):
            seen.clear()
            out = tmp_path / f"{direct}-{workers}-{budget}"
            streammerge.merge(base=base, adapter=adapter, out=out, device="cpu", workers=workers, max_memory=budget,
                              direct_io=direct)
            # direct: at the default budget most bytes bypass the page cache (merged blocks and copy runs; tiny
            # budgets cut blocks too small to be worth it); buffered: none do
            total = sum(p.stat().st_size for p in out.glob("*.safetensors"))
            least = total // 2 if budget == 512 << 20 else 1
            assert (sum(seen) >= least) if direct else seen == [], (direct, workers, budget, sum(seen), total)
            outs[out.name] = _shards(out)
    first = next(iter(outs.values()))
    assert all(o == first for o in outs.values())
    ours, ref = testing.load_dir(tmp_path / f"True-2-{512 << 20}"), testing.reference_merge(base, adapter)
    assert set(ours) == set(ref) and not list(testing.changed(ours, ref))


@linux
def test_a_direct_merge_verifies_and_resumes_with_only_out(tmp_path, medium):
    base, adapter = medium
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(streammerge.__file__).parent.parent)}
    run = [sys.executable, "-m", "streammerge"]
    r = subprocess.run([*run, "merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    before = _shards(out)
    r = subprocess.run([*run, "verify", "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    victim = sorted(out.glob("*.safetensors"))[1]
    victim.unlink()
    r = subprocess.run([*run, "merge", "--resume", "--out", str(out)], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert _shards(out) == before
    r = subprocess.run([*run, "merge", "--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "b"),
                        "--buffered-io"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert _shards(tmp_path / "b") == before


def test_a_merge_leaves_torchs_thread_count_as_it_found_it(tmp_path, medium):
    base, adapter = medium
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        streammerge.merge(base=base, adapter=adapter, out=tmp_path / "out", device="cpu", workers=2)
        assert torch.get_num_threads() == 3
        list(streammerge.iter_merged(base=base, adapter=adapter, device="cpu"))
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("checksum", ["xxh3", "sha256"])
def test_verify_drops_every_output_page_it_reads(tmp_path, medium, monkeypatch, checksum):
    """verify reads each output shard through a map; every byte it read must be dropped from the process
    again (``formats.mapped.drop``), or a 70B verify's resident set grows to the checkpoint's size (it was
    2.3 GB of mapped pages for llama-1b's 2.2 GB)."""
    from streammerge import verify_tensors
    from streammerge.formats import mapped

    base, adapter = medium
    out = tmp_path / "out"
    streammerge.merge(base=base, adapter=adapter, out=out, device="cpu", checksum=checksum)
    opened: dict[int, Path] = {}  # id of each output shard's map -> its path
    dropped: dict[int, list[tuple[int, int]]] = {}
    real_open, real_drop = verify_tensors._open_shard, mapped.drop

    def open_spy(path, *a):
        mm = real_open(path, *a)
        opened[id(mm)] = path
        return mm

    def drop_spy(mm, start, end):
        dropped.setdefault(id(mm), []).append((start, end))
        real_drop(mm, start, end)

    monkeypatch.setattr(verify_tensors, "_open_shard", open_spy)
    monkeypatch.setattr(mapped, "drop", drop_spy)
    report = streammerge.verify(out=out, device="cpu")
    assert report.ok and sorted(opened.values()) == sorted(out.glob("*.safetensors"))
    for key, shard in opened.items():
        size = shard.stat().st_size
        covered = 0
        for start, end in sorted(dropped.get(key, [])):  # the drops cover the map from its first page to its end
            assert start - start % 4096 <= covered, (shard.name, start, covered)
            covered = max(covered, end)
        assert covered >= size, (shard.name, covered, size)


@linux
def test_runs_copied_while_torch_loads_are_hashed_after_it_to_the_same_digests(tmp_path, medium, monkeypatch):
    """While torch loads (held back here for 0.5 s), copy runs are written at once and hashed from the base's
    page cache once it has loaded; their digests, the manifest and the shards are those of a merge whose
    copies are hashed on the way through the buffer."""
    import json
    import threading
    import time

    from streammerge import copies
    from streammerge.sources import Sources

    base, adapter = medium
    streammerge.merge(base=base, adapter=adapter, out=tmp_path / "plain", device="cpu")
    waited: list[bool] = []
    real_hash, real_engine = copies.hash_copied, Sources.engine

    def hash_copied(unit, digests, sources, ranges, after):
        n = real_hash(unit, digests, sources, ranges, after)
        if after is not None:  # a deferred hash (a run copied on a filesystem without direct I/O is hashed
            waited.append(after.done())  # from the map at once, after=None): it ran once torch had loaded
        return n

    def slow_engine(self):
        if threading.current_thread().name.startswith("streammerge-load"):
            time.sleep(0.5)
        return real_engine(self)

    monkeypatch.setattr(copies, "hash_copied", hash_copied)
    monkeypatch.setattr(Sources, "engine", slow_engine)
    streammerge.merge(base=base, adapter=adapter, out=tmp_path / "later", device="cpu")
    assert waited and all(waited)
    assert _shards(tmp_path / "later") == _shards(tmp_path / "plain")
    manifests = [json.loads((tmp_path / d / "streammerge.json").read_text())["shards"] for d in ("plain", "later")]
    assert manifests[0] == manifests[1]
    assert streammerge.verify(tmp_path / "later").ok
