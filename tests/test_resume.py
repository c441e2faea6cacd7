"""``--resume``: a merge killed at any moment, then resumed, ends byte-identical to an uninterrupted one.

The kill test forks each merge from a pre-imported interpreter (``zygote.py``): a fork costs
milliseconds where a fresh interpreter costs ~2 s of imports, which is what lets 20+ SIGKILLs fit
in the time budget. Each child runs ``streammerge.cli.main(["merge", ...])`` as
``python -m streammerge merge`` does; the SIGTERM/Ctrl-C test uses ``python -m streammerge`` itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from zygote import Zygote, cli_env

import streammerge
from streammerge import manifest, testing

KILLS = 20
SEED = int(os.environ.get("STREAMMERGE_KILL_SEED", "20240605"))


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """~120 MB bf16, 6 shards: a merge takes about a second."""
    root = tmp_path_factory.mktemp("big")
    base = testing.make_checkpoint(root / "base", layers=8, hidden=768, intermediate=2048, vocab=4096, shards=6)
    adapter = testing.make_adapter(root / "adapter", base, targets=testing.LLAMA_LINEAR, r=16)
    return base, adapter


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _merge_argv(base: Path, adapter: Path, out: Path) -> list[str]:
    return ["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out), "--device", "cpu", "-q"]


def _shards_done(out: Path) -> int:
    doc = manifest.read_json_file(out / manifest.PROGRESS_NAME)
    return len(doc["shards"]) if doc else 0


def test_sigkill_at_random_moments_then_resume_is_byte_identical(big, tmp_path):
    base, adapter = big
    zygote = Zygote()
    try:
        zygote.start(_merge_argv(base, adapter, tmp_path / "warm"))  # first run: cold caches, lazy inits
        assert zygote.wait() == 0
        ref = tmp_path / "ref"
        t0 = time.monotonic()
        zygote.start(_merge_argv(base, adapter, ref))
        assert zygote.wait() == 0
        run_s = time.monotonic() - t0
        want = _files(ref)
        assert _files(tmp_path / "warm") == want
        assert manifest.MANIFEST_NAME in want and sum(n.endswith(".safetensors") for n in want) == 6
        rng = random.Random(SEED)
        states = []
        for i in range(KILLS):
            out = tmp_path / f"k{i}"
            at = rng.uniform(0, run_s)  # uniform over an uninterrupted run, from fork to exit
            pid = zygote.start(_merge_argv(base, adapter, out))
            time.sleep(at)
            with contextlib.suppress(ProcessLookupError):  # it may have finished already
                os.kill(pid, signal.SIGKILL)
            code = zygote.wait()
            states.append((round(at, 3), _state(out), code))
            streammerge.merge(base=base, adapter=adapter, out=out, device="cpu", resume=True)
            got = _files(out)
            assert got.keys() == want.keys(), (SEED, i, at, states[-1])
            assert all(got[n] == want[n] for n in want), (SEED, i, at, states[-1])
    finally:
        zygote.close()
    killed = [s for s in states if s[2] == -signal.SIGKILL]
    partial = [s for s in killed if s[1] not in ("absent", "empty")]
    # The moments must have hit the merge itself, not only the interpreter's start or the end.
    assert len(killed) >= KILLS // 2 and len(partial) >= 3, (run_s, states)
    print(f"run {run_s:.2f} s; kill moments and states: {states}")


def _state(out: Path) -> str:
    if not out.exists():
        return "absent"
    names = os.listdir(out)
    if manifest.MANIFEST_NAME in names:
        return "complete"
    return f"{_shards_done(out)} shard(s)" if names else "empty"


def _kill_after_first_shard(base: Path, adapter: Path, out: Path, sig: int = signal.SIGKILL) -> tuple[int, str]:
    """Run a merge as ``python -m streammerge``, send ``sig`` once a shard is done; (exit status, stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "streammerge", *_merge_argv(base, adapter, out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
    deadline = time.monotonic() + 60
    while _shards_done(out) < 1:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.002)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


def test_a_changed_adapter_between_kill_and_resume_is_recomputed(big, tmp_path):
    base, adapter = big
    mine = tmp_path / "adapter"
    mine.mkdir()
    for f in adapter.iterdir():
        (mine / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "out"
    _kill_after_first_shard(base, mine, out)
    assert _shards_done(out) >= 1 and not (out / manifest.MANIFEST_NAME).exists()
    stale = {p.name: p.read_bytes() for p in out.glob("*.safetensors")}
    testing.make_adapter(mine, base, targets=testing.LLAMA_LINEAR, r=16, seed=99)  # same names, new weights
    streammerge.merge(base=base, adapter=mine, out=out, device="cpu", resume=True)
    fresh = tmp_path / "fresh"
    streammerge.merge(base=base, adapter=mine, out=fresh, device="cpu")
    assert _files(out) == _files(fresh)
    # Reusing any shard finished before the change would have broken that equality:
    assert all(stale[n] != (fresh / n).read_bytes() for n in stale)


def test_sigterm_and_ctrl_c_leave_a_resumable_state(big, tmp_path):
    base, adapter = big
    ref = tmp_path / "ref"
    streammerge.merge(base=base, adapter=adapter, out=ref, device="cpu")
    for sig, code, word in ((signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")):
        out = tmp_path / f"out{code}"
        status, err = _kill_after_first_shard(base, adapter, out, sig)
        err = err.strip().splitlines()
        assert status == code, err
        assert err == [f"{word}: no partial shard was left under a final name; rerun the same command with "
                       "--resume to continue"]
        names = os.listdir(out)
        assert manifest.PROGRESS_NAME in names and manifest.MANIFEST_NAME not in names
        assert not [n for n in names if n.endswith(".tmp")], names
        done = {r["file"] for r in json.loads((out / manifest.PROGRESS_NAME).read_text())["shards"]}
        assert done and done <= set(names)
        streammerge.merge(base=base, adapter=adapter, out=out, device="cpu", resume=True)
        assert _files(out) == _files(ref)


def test_resume_keeps_matching_shards_and_recomputes_tampered_or_reconfigured_ones(tmp_path, llama):
    base, adapter = llama
    out = tmp_path / "out"
    streammerge.merge(base=base, adapter=adapter, out=out, device="cpu")
    want = _files(out)
    stamps = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.safetensors")}
    streammerge.merge(base=base, adapter=adapter, out=out, device="cpu", resume=True)  # complete: all kept
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.safetensors")} == stamps
    assert _files(out) == want
    victim = out / "model-00002-of-00003.safetensors"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF  # same size, same name, different content: must not be reused
    victim.write_bytes(bytes(data))
    streammerge.merge(base=base, adapter=adapter, out=out, device="cpu", resume=True)
    assert _files(out) == want
    # A complete output of other options is not replaced by --resume alone, and is left untouched ...
    with pytest.raises(streammerge.OutputError, match=r"complete streammerge output made from other inputs or "
                       r"options \(option max_shard_size\); `resume` does not replace it: pass `overwrite`"):
        streammerge.merge(base=base, adapter=adapter, out=out, device="cpu", resume=True, max_shard_size=60_000)
    assert _files(out) == want
    # ... with overwrite it is: the old shard layout is invalid, stale names vanish.
    streammerge.merge(base=base, adapter=adapter, out=out, device="cpu", resume=True, overwrite=True,
                      max_shard_size=60_000)
    resharded = tmp_path / "resharded"
    streammerge.merge(base=base, adapter=adapter, out=resharded, device="cpu", max_shard_size=60_000)
    assert _files(out) == _files(resharded)


def test_resume_refuses_a_directory_that_is_not_a_streammerge_output(tmp_path, llama):
    base, adapter = llama
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(streammerge.OutputError, match="not a streammerge output to resume"):
        streammerge.merge(base=base, adapter=adapter, out=out, device="cpu", resume=True)
    assert os.listdir(out) == ["notes.txt"]
    with pytest.raises(streammerge.OutputError, match=r"holds files streammerge did not write: notes.txt; "):
        streammerge.merge(base=base, adapter=adapter, out=out, device="cpu", resume=True, overwrite=True)
    assert os.listdir(out) == ["notes.txt"]
    fresh = tmp_path / "fresh"  # --resume on nothing is a plain merge
    streammerge.merge(base=base, adapter=adapter, out=fresh, device="cpu", resume=True)
    assert (fresh / manifest.MANIFEST_NAME).exists()
