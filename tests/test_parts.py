"""A merge split into parts (``--part I/N``) then ``finalize``: byte-identical to one process.

Parts run in-process (library), as concurrent ``python -m streammerge`` processes on one
directory, and killed with SIGKILL then rerun; ``finalize`` refuses (exit 2, naming shards and
parts, writing nothing) when a part is missing or ran on other inputs.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from zygote import cli_env

import streammerge
from streammerge import cli, finalize, manifest, ownership, parts, testing
from streammerge.parts import Part
from streammerge.units import format_size

WEIGHTS = [0.7, -0.3]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A 4-shard base, one adapter, a second one for weighted merges, and the one-process references."""
    root = tmp_path_factory.mktemp("parts")
    base = testing.make_checkpoint(root / "base", layers=3, hidden=64, intermediate=128, vocab=256, shards=4)
    a1 = testing.make_adapter(root / "a1", base, targets=testing.LLAMA_LINEAR, r=8, seed=1)
    a2 = testing.make_adapter(root / "a2", base, targets=("q_proj", "k_proj", "up_proj"), r=4, seed=2)
    refs = {
        "single": streammerge.merge(base, a1, root / "ref-single", device="cpu").out,
        "weighted": streammerge.merge(base, adapters=[a1, a2], weights=WEIGHTS, out=root / "ref-weighted",
                                      device="cpu").out,
    }
    return base, a1, a2, {k: Path(v) for k, v in refs.items()}


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _kwargs(inputs, kind: str) -> dict:
    base, a1, a2, _ = inputs
    if kind == "single":
        return {"base": base, "adapter": a1}
    return {"base": base, "adapters": [a1, a2], "weights": WEIGHTS}


def _argv(inputs, out: Path, *extra: str) -> list[str]:
    base, a1, _, _ = inputs
    return ["merge", "--base", str(base), "--adapter", str(a1), "--out", str(out), "--device", "cpu", "-q", *extra]


@pytest.mark.parametrize("kind", ["single", "weighted"])
@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_union_of_parts_then_finalize_is_byte_identical(inputs, tmp_path, n, kind):
    out = tmp_path / "out"
    for i in reversed(range(n)):  # any order
        report = streammerge.merge(out=out, device="cpu", part=Part(i, n), **_kwargs(inputs, kind))
        assert report.shards == len(parts.shards_of(streammerge.plan_merge(**_kwargs(inputs, kind)), Part(i, n)))
        assert not (out / manifest.MANIFEST_NAME).exists() and not (out / "model.safetensors.index.json").exists()
        assert not (out / "config.json").exists()
    assert len(finalize.record_paths(out)) == n
    assert cli.main(["finalize", "--out", str(out), "-q"]) == 0
    assert _files(out) == _files(inputs[3][kind])  # every file, manifest included; no part record left


def test_assignment_is_deterministic_complete_and_balanced_by_work(inputs):
    base, a1, _, _ = inputs
    plan = streammerge.plan_merge(base, a1, max_shard_size=40_000)  # many shards of uneven work
    work = {s.filename: parts.shard_work(s) for s in plan.shards}
    assert len(plan.shards) > 8 and len(set(work.values())) > 3
    for n in (1, 2, 3, 5, len(plan.shards) + 2):
        split = parts.assign(plan, n)
        assert split == parts.assign(plan, n)
        names = [s.filename for p in split for s in p]
        assert sorted(names) == sorted(work) and len(names) == len(set(names))
        loads = [sum(work[s.filename] for s in p) for p in split]
        assert max(loads) - min(loads) <= max(work.values())  # greedy largest-first: within one shard


@pytest.mark.parametrize(("env", "want"), [
    ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "8"}, Part(3, 8)),
    ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "8", "SLURM_ARRAY_TASK_MIN": "1"}, Part(0, 8)),
    ({"SLURM_ARRAY_TASK_ID": "14", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "8",
      "SLURM_ARRAY_TASK_STEP": "2"}, Part(3, 4)),
    ({"SLURM_JOB_ID": "7"}, None),
])
def test_part_from_slurm_array_environment(env, want):
    assert parts.part_from_slurm(env) == want


def test_slurm_array_task_runs_its_part_and_says_so(inputs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    assert cli.main(_argv(inputs, out)[:-1]) == 0
    err = capsys.readouterr().err
    assert "INFO: part 1/2 from SLURM_ARRAY_TASK_ID=5 (SLURM_ARRAY_TASK_COUNT=2, SLURM_ARRAY_TASK_MIN=4)" in err
    assert [p.name for p in finalize.record_paths(out)] == [".streammerge-part-1-of-2.json"]
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "99")
    assert cli.main(_argv(inputs, out)) == 2
    assert capsys.readouterr().err.startswith("error: SLURM_ARRAY_TASK_ID=99 (MIN 4, STEP 1) is not one of 2 ")
    assert cli.main(_argv(inputs, tmp_path / "whole", "--part", "all")) == 0  # one process inside an array job
    assert _files(tmp_path / "whole") == _files(inputs[3]["single"])


def test_parts_as_concurrent_processes_on_one_directory(inputs, tmp_path):
    out = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, "-m", "streammerge", *_argv(inputs, out, "--part", f"{i}/3")],
                              env=cli_env(), stderr=subprocess.PIPE, text=True) for i in range(3)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errs
    done = subprocess.run([sys.executable, "-m", "streammerge", "finalize", "--out", str(out)], env=cli_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert _files(out) == _files(inputs[3]["single"])


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """~60 MB bf16 in 4 shards: a part takes long enough to be killed in the middle of a shard."""
    root = tmp_path_factory.mktemp("big")
    base = testing.make_checkpoint(root / "base", layers=4, hidden=768, intermediate=2048, vocab=4096, shards=4)
    adapter = testing.make_adapter(root / "adapter", base, targets=testing.LLAMA_LINEAR, r=16)
    ref = streammerge.merge(base, adapter, root / "ref", device="cpu").out
    return base, adapter, Path(ref)


def test_part_killed_mid_shard_then_rerun_gives_the_same_bytes(big, tmp_path):
    base, adapter, ref = big
    out = tmp_path / "out"
    argv = ["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out), "--device", "cpu", "-q",
            "--part", "0/2", "--workers", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "streammerge", *argv], env=cli_env())
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if out.is_dir() and any(n.startswith(".model-") and n.endswith(".tmp") for n in os.listdir(out)):
            os.kill(proc.pid, signal.SIGKILL)  # a shard is being written
            break
        time.sleep(0.001)
    assert proc.wait() == -signal.SIGKILL
    assert any(n.endswith(".tmp") for n in os.listdir(out))  # the dead part left a temporary, no final name
    assert cli.main(argv) == 0  # rerun the same part
    assert not any(n.endswith(".tmp") for n in os.listdir(out))
    assert cli.main([*argv[:-3], "1/2"]) == 0
    assert cli.main(["finalize", "--out", str(out), "-q"]) == 0
    assert _files(out) == _files(ref)


def test_finalize_with_a_part_missing_exits_2_naming_its_shards(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(_argv(inputs, out, "--part", "0/3")) == 0
    assert cli.main(_argv(inputs, out, "--part", "2/3")) == 0
    before = _files(out)
    assert cli.main(["finalize", "--out", str(out)]) == 2
    plan = streammerge.plan_merge(inputs[0], inputs[1])
    missing = [s.filename for s in parts.assign(plan, 3)[1]]
    named = ", ".join(f"{f} (part 1/3)" for f in missing)
    assert capsys.readouterr().err == (
        f"error: {out}: cannot finalize: {len(missing)} shard(s) missing: {named}; rerun --part 1/3 "
        "(or `merge --resume` to write them here), then finalize\n"
    )
    assert _files(out) == before  # no index, config or manifest written; nothing removed
    assert cli.main(_argv(inputs, out)) == 2  # merge without --part over the same --out: the same refusal
    want = f"error: {out}: cannot finalize: {len(missing)} shard(s) missing: {named};"
    assert capsys.readouterr().err.startswith(want)
    assert _files(out) == before
    assert cli.main(_argv(inputs, out, "--part", "1/3")) == 0
    assert cli.main(_argv(inputs, out)) == 0  # now merge without --part seals it
    assert _files(out) == _files(inputs[3]["single"])


@pytest.mark.parametrize("named", [True, False])
def test_merge_resume_over_parts_keeps_their_shards_and_writes_the_rest(inputs, tmp_path, named):
    out = tmp_path / "out"
    assert cli.main(_argv(inputs, out, "--part", "1/2")) == 0
    kept = {n: (out / n).stat().st_ino for n in os.listdir(out) if n.endswith(".safetensors")}
    # with the inputs named again, or with nothing but --out (the part's record names them)
    argv = _argv(inputs, out, "--resume") if named else ["merge", "--out", str(out), "--resume", "--device", "cpu"]
    assert cli.main(argv) == 0
    assert _files(out) == _files(inputs[3]["single"])
    assert {n: (out / n).stat().st_ino for n in kept} == kept  # not rewritten


def test_a_part_run_on_changed_inputs_is_detected_at_finalize(inputs, tmp_path, capsys):
    base = inputs[0]
    adapter = shutil.copytree(inputs[1], tmp_path / "adapter")
    out = tmp_path / "out"
    argv = ["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out), "--device", "cpu", "-q"]
    assert cli.main([*argv, "--part", "0/2"]) == 0
    testing.make_adapter(adapter, base, targets=testing.LLAMA_LINEAR, r=8, seed=99)  # retrained in place
    assert cli.main([*argv, "--part", "1/2"]) == 0
    assert cli.main(["finalize", "--out", str(out)]) == 2
    plan = streammerge.plan_merge(base, adapter)
    stale = ", ".join(f"{s.filename} (part 0/2)" for s in parts.assign(plan, 2)[0])
    err = capsys.readouterr().err
    assert f"shard(s) stale (written for other inputs or options than the plan's): {stale}; rerun --part 0/2" in err
    assert not (out / manifest.MANIFEST_NAME).exists() and not (out / "model.safetensors.index.json").exists()
    assert cli.main([*argv, "--part", "0/2"]) == 0  # rerunning the stale part fixes it
    assert cli.main(["finalize", "--out", str(out), "-q"]) == 0
    fresh = streammerge.merge(base, adapter, tmp_path / "fresh", device="cpu").out
    assert _files(out) == _files(Path(fresh))


def test_rerunning_a_part_after_finalize_changes_nothing(inputs, tmp_path):
    out = tmp_path / "out"
    for i in range(2):
        assert cli.main(_argv(inputs, out, "--part", f"{i}/2")) == 0
    assert cli.main(["finalize", "--out", str(out), "-q"]) == 0
    assert cli.main(_argv(inputs, out, "--part", "1/2")) == 0  # nothing to do: no record, no file touched
    assert _files(out) == _files(inputs[3]["single"])
    report = streammerge.verify(out=out, base=inputs[0], adapters=[inputs[1]])
    assert report.ok, report.summary()


def test_a_part_rerun_on_new_inputs_after_finalize_reopens_the_output(inputs, tmp_path, capsys):
    base = inputs[0]
    adapter = shutil.copytree(inputs[1], tmp_path / "adapter")
    out = tmp_path / "out"
    argv = ["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out), "--device", "cpu", "-q"]
    for i in range(2):
        assert cli.main([*argv, "--part", f"{i}/2"]) == 0
    assert cli.main(["finalize", "--out", str(out), "-q"]) == 0
    testing.make_adapter(adapter, base, targets=testing.LLAMA_LINEAR, r=8, seed=98)
    assert cli.main([*argv, "--part", "0/2"]) == 0
    assert not (out / manifest.MANIFEST_NAME).exists()  # it no longer describes the directory
    assert cli.main(["finalize", "--out", str(out)]) == 2
    plan = streammerge.plan_merge(base, adapter)
    stale = ", ".join(f"{s.filename} (part 1/2)" for s in parts.assign(plan, 2)[1])
    assert f"stale (written for other inputs or options than the plan's): {stale}; rerun --part 1/2" in (
        capsys.readouterr().err)
    assert cli.main([*argv, "--part", "1/2"]) == 0
    assert cli.main(["finalize", "--out", str(out), "-q"]) == 0
    fresh = streammerge.merge(base, adapter, tmp_path / "fresh", device="cpu").out
    assert _files(out) == _files(Path(fresh))


def test_part_refuses_overwrite_and_a_foreign_directory(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert cli.main(_argv(inputs, out, "--part", "0/2")) == 2
    assert capsys.readouterr().err == (
        f"error: {out}: directory is not empty and holds no streammerge record; parts write only into a new or "
        "empty --out, or one that other parts of the same merge are writing\n"
    )
    assert cli.main(_argv(inputs, tmp_path / "o2", "--part", "0/2", "--overwrite")) == 2
    assert "--overwrite would delete the shards other parts wrote" in capsys.readouterr().err
    assert cli.main(_argv(inputs, tmp_path / "o3", "--part", "2/2")) == 2
    assert capsys.readouterr().err == "error: part 2/2: need 0 <= I < N (e.g. --part 0/8 ... 7/8)\n"
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and not (tmp_path / "o2").exists()


def test_finalize_of_a_directory_without_part_records(tmp_path, capsys):
    assert cli.main(["finalize", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"error: {tmp_path}: no part records (.streammerge-part-*.json); run the parts "
        "(`streammerge merge ... --part I/N`) into this --out first\n"
    )


def test_iter_merged_part_by_part_yields_every_tensor_once(inputs):
    base, a1, _, refs = inputs
    want = testing.load_dir(refs["single"])
    got = {}
    for i in range(3):
        for name, tensor in streammerge.iter_merged(base, a1, device="cpu", part=f"{i}/3"):
            assert name not in got
            got[name] = tensor
    assert got.keys() == want.keys()
    assert all(got[k].dtype == want[k].dtype for k in want) and not testing.changed(want, got)


def test_ray_executor_without_ray_says_what_to_install(inputs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if ray were not installed
    with pytest.raises(streammerge.StreamMergeError) as e:
        streammerge.merge(out=tmp_path / "out", device="cpu", executor="ray", **_kwargs(inputs, "single"))
    assert str(e.value) == "`ray` needs Ray: pip install 'streammerge[ray]' (or pip install ray)"
    with pytest.raises(streammerge.StreamMergeError, match=r"^executor 'dask': only 'ray' is supported$"):
        streammerge.merge(out=tmp_path / "out2", device="cpu", executor="dask", **_kwargs(inputs, "single"))
    assert not (tmp_path / "out2").exists()


def test_dry_run_of_a_part_prints_its_own_shards(inputs, tmp_path, capsys):
    assert cli.main(_argv(inputs, tmp_path / "out", "--part", "1/2", "--dry-run")) == 0
    plan = streammerge.plan_merge(inputs[0], inputs[1])
    mine = parts.assign(plan, 2)[1]
    assert f"output: {len(mine)} shard(s), {format_size(sum(s.data_size for s in mine))}" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_conflicting_split_flags_are_refused(inputs, tmp_path, capsys):
    assert cli.main(_argv(inputs, tmp_path / "out", "--part", "0/2", "--ray")) == 2
    assert capsys.readouterr().err == "error: --part and --ray exclude each other: --ray runs every part itself\n"
    assert cli.main(_argv(inputs, tmp_path / "out", "--parts", "2")) == 2
    assert capsys.readouterr().err == "error: --parts goes with --ray; for one part of a split merge use --part I/N\n"
    assert cli.main(_argv(inputs, tmp_path / "out", "--part", "x")) == 2
    assert capsys.readouterr().err == "error: --part 'x': expected I/N with 0 <= I < N, e.g. --part 0/8\n"
    assert not (tmp_path / "out").exists()


def test_temporaries_another_part_creates_meanwhile_are_never_called_foreign(tmp_path):
    """Parts share `--out`: while one checks the directory, the others create and rename temporaries. A check
    that listed the directory twice saw a temporary in its second listing that its owned set had not, and
    refused with "holds files streammerge did not write" (seen in CI)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / ownership.PROGRESS_NAME).write_text("{}")
    stop = threading.Event()

    def churn():
        i = 0
        while not stop.is_set():
            tmp = out / f".model-0000{i % 3}-of-00003.safetensors.x{i}.tmp"
            tmp.write_bytes(b"")
            tmp.unlink()
            i += 1

    worker = threading.Thread(target=churn)
    worker.start()
    try:
        seen = [ownership.foreign_names(out) for _ in range(3000)]
    finally:
        stop.set()
        worker.join()
    assert [f for f in seen if f] == []
