"""Trust around the merge (issue 14): what ``--overwrite``/``--resume`` may delete, what ``unmerge`` checks,
and the exact status and message of each command-line case.

Every case is a real CLI run (``cli.main`` in a forked child of a pre-imported interpreter, ``zygote.py``)
with its exact exit status and exact stderr/stdout lines, and inputs byte-identical before and after.
The interrupt tests live in ``test_interrupts.py``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from zygote import Zygote

import streammerge
from streammerge import manifest, testing
from streammerge.units import ceil_size, format_size

REFUSE_FOREIGN = "only replaces streammerge's own files: move those away or choose another --out"


@dataclass
class World:
    root: Path
    base: Path
    adapter: Path
    adapter2: Path
    merged: Path  # base + adapter (weight 1)
    weighted: Path  # base + 0.7 adapter - 0.3 adapter2 (cat)
    ties: Path  # base + ties(adapter, adapter2)
    small_adapter: Path  # trained on a smaller model: 28 problems against base


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("world")
    base = testing.make_checkpoint(root / "base", layers=4, hidden=64, intermediate=128, vocab=128, shards=3)
    adapter = testing.make_adapter(root / "adapter", base, targets=testing.LLAMA_LINEAR, r=8, alpha=16)
    adapter2 = testing.make_adapter(root / "adapter2", base, targets=testing.LLAMA_LINEAR, r=4, alpha=8, seed=7)
    small = testing.make_checkpoint(root / "small", layers=4, hidden=32, intermediate=64, vocab=128, shards=1)
    small_adapter = testing.make_adapter(root / "small_adapter", small, targets=testing.LLAMA_LINEAR, r=4)
    w = World(root, base, adapter, adapter2, root / "merged", root / "weighted", root / "ties", small_adapter)
    streammerge.merge(base=base, adapter=adapter, out=w.merged, device="cpu")
    streammerge.merge(base=base, adapters=[adapter, adapter2], weights=[0.7, -0.3], out=w.weighted, device="cpu")
    streammerge.merge(base=base, adapters=[adapter, adapter2], combination="ties", density=0.5, out=w.ties,
                      device="cpu")
    return w


@pytest.fixture(scope="module")
def zygote():
    with Zygote() as z:
        yield z


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@dataclass
class Run:
    code: int
    out: list[str]
    err: list[str]


def _run(zygote: Zygote, tmp: Path, argv: list[str]) -> Run:
    """One CLI run in a forked child (its stdout goes to /dev/null: cases that print use ``main`` in-process)."""
    code, err = zygote.run(argv, stderr=tmp / "stderr.txt")
    return Run(code, [], err.splitlines())


def _merge_argv(w: World, out: Path, *extra: str, adapter: Path | None = None) -> list[str]:
    return ["merge", "--base", str(w.base), "--adapter", str(adapter or w.adapter), "--out", str(out),
            "--device", "cpu", "-q", *extra]


# --------------------------------------------------------------------------------------------------
# the table: each case prepares its directories and returns (argv, exit status, exact stderr lines);
# a line given as ``(prefix,)`` only has to start with that prefix (argparse's usage lines come first).

@dataclass
class Case:
    name: str
    prepare: Callable[[World, Path], tuple[list[str], int, list]]
    untouched: list[str] = field(default_factory=list)  # paths under tmp that must keep their bytes


def _copy_merged(w: World, tmp: Path, what: Path | None = None) -> Path:
    out = tmp / "out"
    shutil.copytree(what or w.merged, out)
    return out


def overwrite_keeps_a_foreign_file(w, tmp):
    out = _copy_merged(w, tmp)
    (out / "notes.txt").write_text("mine")
    (out / "sub").mkdir()
    (out / "sub" / "important.txt").write_text("mine too")
    return _merge_argv(w, out, "--overwrite", adapter=w.adapter2), 2, [
        f"error: {out}: holds files streammerge did not write: notes.txt, sub/; --overwrite {REFUSE_FOREIGN}"]


def overwrite_lists_five_foreign_files(w, tmp):
    out = _copy_merged(w, tmp)
    for i in range(7):
        (out / f"user{i}.txt").write_text("mine")
    shown = ", ".join(f"user{i}.txt" for i in range(5))
    return _merge_argv(w, out, "--overwrite"), 2, [
        f"error: {out}: holds files streammerge did not write: {shown} (and 2 more); --overwrite {REFUSE_FOREIGN}"]


def resume_keeps_a_foreign_file(w, tmp):
    out = _copy_merged(w, tmp)
    (out / "notes.txt").write_text("mine")
    return _merge_argv(w, out, "--resume"), 2, [
        f"error: {out}: holds files streammerge did not write: notes.txt; --resume {REFUSE_FOREIGN}"]


def resume_refuses_a_complete_output_of_other_inputs(w, tmp):
    out = _copy_merged(w, tmp)
    return _merge_argv(w, out, "--resume", adapter=w.adapter2), 2, [
        f"error: {out}: holds a complete streammerge output made from other inputs or options (adapters); --resume "
        "does not replace it: pass --overwrite as well to replace it, or choose another --out"]


def resume_refuses_other_options(w, tmp):
    out = _copy_merged(w, tmp)
    return _merge_argv(w, out, "--resume", "--max-shard-size", "50kB"), 2, [
        f"error: {out}: holds a complete streammerge output made from other inputs or options (option "
        "max_shard_size); --resume does not replace it: pass --overwrite as well to replace it, or choose another "
        "--out"]


def not_empty_with_a_finished_output(w, tmp):
    out = _copy_merged(w, tmp)
    return _merge_argv(w, out), 2, [
        f"error: {out}: directory is not empty: it holds a finished streammerge output; pass --resume to continue it "
        "(kept where it matches), --overwrite to replace it, or choose a new --out"]


def not_empty_with_an_unfinished_output(w, tmp):
    out = _copy_merged(w, tmp)
    (out / manifest.MANIFEST_NAME).rename(out / manifest.PROGRESS_NAME)
    return _merge_argv(w, out), 2, [
        f"error: {out}: directory is not empty: it holds an unfinished streammerge output; pass --resume to continue "
        "it (kept where it matches), --overwrite to replace it, or choose a new --out"]


def not_empty_with_user_files(w, tmp):
    out = tmp / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    return _merge_argv(w, out), 2, [
        f"error: {out}: directory is not empty; choose a new or empty --out (streammerge never deletes files it did "
        "not write)"]


def device_not_a_device(w, tmp):
    return _merge_argv(w, tmp / "out", "--device", "tpu"), 2, [
        ("usage: streammerge merge",),
        "streammerge merge: error: argument --device: 'tpu' is not a device; use auto, cpu, cuda or cuda:N"]


def verify_device_not_a_device(w, tmp):
    return ["verify", "--out", str(w.merged), "--base", str(w.base), "--adapter", str(w.adapter), "--device",
            "cuda:x"], 2, [("usage: streammerge verify",),
                           "streammerge verify: error: argument --device: 'cuda:x' is not a device; use auto, cpu, "
                           "cuda or cuda:N"]


def misspelled_out(w, tmp):
    return ["merge", "--base", str(w.base), "--adapter", str(w.adapter), "--ouput", str(tmp / "o")], 2, [
        ("usage: streammerge merge",),
        "streammerge merge: error: the following arguments are required: --out; did you mean --out (not --ouput)?"]


def misspelled_dry_run(w, tmp):
    return [*_merge_argv(w, tmp / "o"), "--dryrun"], 2, [
        ("usage: streammerge",),
        "streammerge: error: unrecognized arguments: --dryrun; did you mean --dry-run (not --dryrun)?"]


def abbreviated_flag(w, tmp):
    return ["merge", "--base", str(w.base), "--adapt", str(w.adapter), "--out", str(tmp / "o")], 2, [
        ("usage: streammerge",),
        f"streammerge: error: unrecognized arguments: --adapt {w.adapter}; did you mean --adapter (not --adapt)?"]


def max_memory_zero(w, tmp):
    return _merge_argv(w, tmp / "o", "--max-memory", "0MiB"), 2, [
        ("usage: streammerge merge",),
        "streammerge merge: error: argument --max-memory: '0MiB' must be at least one byte"]


def max_memory_below_the_minimum(w, tmp):
    need = streammerge.plan_merge(w.base, w.adapter).min_memory()
    return _merge_argv(w, tmp / "o", "--max-memory", "1KiB"), 2, [
        f"error: --max-memory 1.02 kB is below this plan's minimum working set of {format_size(need)} (its largest "
        "indivisible block: 64 rows of the widest merged tensor, or a whole tensor where the merge needs every row at "
        f"once); pass --max-memory {ceil_size(need)} or more"]


def base_is_an_adapter_directory(w, tmp):
    argv = ["merge", "--base", str(w.adapter2), "--adapter", str(w.adapter), "--out", str(tmp / "o"), "-q"]
    return argv, 2, [
        f"error: {w.adapter2}: is a PEFT adapter directory (adapter_config.json), not a base checkpoint; pass it as "
        "--adapter and the model it was trained on as --base"]


def demo_keep_into_a_used_directory(w, tmp):
    keep = tmp / "demo"
    keep.mkdir()
    (keep / "base").mkdir()
    return ["demo", "--keep", str(keep), "-q"], 2, [
        f"error: {keep}: exists and is not an empty directory; --keep needs a new or empty directory (the demo "
        "never deletes files)"]


def adapter_of_another_model_size(w, tmp):
    return _merge_argv(w, tmp / "o", adapter=w.small_adapter), 2, [
        f"error: 28 problems fitting the adapter(s) {w.small_adapter} (trained on '{w.root / 'small'}') to the base "
        f"{w.base}:", *[("  ",)] * 20, "  … and 8 more (pass -v for all)"]


def unmerge_an_adapter_never_merged(w, tmp):
    return ["unmerge", "--merged", str(w.merged), "--adapter", str(w.adapter2), "--out", str(tmp / "u"), "-q"], 2, [
        f"error: {w.adapter2}: not among the adapters {w.merged / manifest.MANIFEST_NAME} records as merged (compared "
        "by the SHA-256 of adapter_config.json and of the weights); pass the adapter that was merged; or pass --force "
        "to unmerge anyway"]


def unmerge_another_weight(w, tmp):
    return ["unmerge", "--merged", str(w.weighted), "--adapter", str(w.adapter), "--weight", "1", "--out",
            str(tmp / "u"), "-q"], 2, [
        f"error: {w.weighted}: its manifest records {w.adapter} merged with weight 0.7, not 1; leave --weight out to "
        "use the recorded one; or pass --force to unmerge anyway"]


def unmerge_a_ties_merge(w, tmp):
    return ["unmerge", "--merged", str(w.ties), "--adapter", str(w.adapter), "--force", "--out", str(tmp / "u"),
            "-q"], 2, [
        f"error: {w.ties}: was merged with combination 'ties', which prunes and rescales each adapter's delta per "
        "element; it has no inverse, so no adapter can be taken back out: merge again from the base instead"]


def unmerge_merged_is_an_adapter(w, tmp):
    return ["unmerge", "--merged", str(w.adapter), "--adapter", str(w.adapter), "--out", str(tmp / "u"), "-q"], 2, [
        f"error: {w.adapter}: is a PEFT adapter directory (adapter_config.json), not a base checkpoint; pass it as "
        "--adapter and the model it was trained on as --merged"]


CASES = [Case(f.__name__, f) for f in (
    overwrite_keeps_a_foreign_file, overwrite_lists_five_foreign_files, resume_keeps_a_foreign_file,
    resume_refuses_a_complete_output_of_other_inputs, resume_refuses_other_options, not_empty_with_a_finished_output,
    not_empty_with_an_unfinished_output, not_empty_with_user_files, device_not_a_device, verify_device_not_a_device,
    misspelled_out, misspelled_dry_run, abbreviated_flag, max_memory_zero, max_memory_below_the_minimum,
    base_is_an_adapter_directory, demo_keep_into_a_used_directory, adapter_of_another_model_size,
    unmerge_an_adapter_never_merged, unmerge_another_weight, unmerge_a_ties_merge, unmerge_merged_is_an_adapter,
)]


def _matches(got: list[str], want: list) -> bool:
    """``want`` lines in order at the end of ``got``; a 1-tuple line may also absorb argparse's usage lines."""
    i = 0
    for line in want:
        if isinstance(line, tuple):
            if i >= len(got) or not got[i].startswith(line[0]):
                return False
            i += 1
            if line[0].startswith("usage:"):
                while i < len(got) and got[i].startswith(" "):
                    i += 1
            continue
        if i >= len(got) or got[i] != line:
            return False
        i += 1
    return i == len(got)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_cli_case_exit_status_and_message(case, world, zygote, tmp_path):
    before = _digest(world.root)
    argv, code, want = case.prepare(world, tmp_path)
    out = tmp_path / "out"
    out_before = _digest(out) if out.is_dir() else None
    got = _run(zygote, tmp_path, argv)
    assert got.code == code, got.err
    assert _matches(got.err, want), "\n".join(got.err)
    assert not any("Traceback" in line for line in got.err)
    assert _digest(world.root) == before  # every input byte unchanged
    if out_before is not None:
        assert _digest(out) == out_before  # a refused output is left exactly as it was
    assert not (tmp_path / "o").exists() and not (tmp_path / "u").exists()


def test_many_problems_are_all_listed_with_verbose(world, zygote, tmp_path):
    got = _run(zygote, tmp_path, [*_merge_argv(world, tmp_path / "o", adapter=world.small_adapter), "-v"])
    errors = [line for line in got.err if not line.startswith("DEBUG:")]
    assert got.code == 2 and errors[0].startswith("error: 28 problems fitting")
    assert len(errors) == 29 and all(line.startswith("  ") and "… and" not in line for line in errors[1:]), errors


# --------------------------------------------------------------------------------------------------
# what succeeds: exact stdout lines


def test_overwrite_replaces_only_its_own_earlier_output(world, tmp_path, capsys):
    out = _copy_merged(world, tmp_path)
    from streammerge.cli import main

    assert main(_merge_argv(world, out, "--overwrite", adapter=world.adapter2)) == 0
    fresh = tmp_path / "fresh"
    streammerge.merge(base=world.base, adapter=world.adapter2, out=fresh, device="cpu")
    assert _digest(out) == _digest(fresh)


def test_resume_of_a_complete_matching_output_writes_nothing(world, tmp_path, capsys):
    from streammerge.cli import main

    out = _copy_merged(world, tmp_path)
    stamps = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir()}
    assert main(["merge", "--base", str(world.base), "--adapter", str(world.adapter), "--out", str(out), "--resume",
                 "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        f"{out}: already complete; nothing written (28 merged, 0 replaced, 0 added, 11 copied, 0 dropped, 3 shard(s) "
        "checked)",
        "changes: no targeted tensor measured",  # nothing was computed (verify measures the kept shards)
        f"check it with: streammerge verify --out {out}",
    ]
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir()} == stamps


def test_merge_summary_ends_with_the_verify_command_and_it_passes(world, tmp_path, capsys):
    from streammerge.cli import main

    out = tmp_path / "out"
    assert main(_merge_argv(world, out)[:-1]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == f"check it with: streammerge verify --out {out}"
    assert main(lines[-1].split()[4:]) == 0  # the command as printed (no spaces in these paths)
    assert capsys.readouterr().out.startswith(f"OK: {out}: 39 tensors checked")


def test_verbose_lists_the_resolved_base_and_every_target_with_its_scale(world, tmp_path, capsys):
    from streammerge.cli import main

    assert main(["merge", "--adapter", str(world.adapter), "--out", str(tmp_path / "o"), "--dry-run", "-v"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert f"DEBUG: base checkpoint: {world.base.resolve()}" in err
    targets = [line for line in err if line.startswith("DEBUG: merge ")]
    assert len(targets) == 28
    assert ("DEBUG: merge model.layers.0.self_attn.q_proj.weight BF16[64, 64]: linear scale 2 "
            "(model.layers.0.self_attn.q_proj)") in targets


# --------------------------------------------------------------------------------------------------
# unmerge: the recorded weight, --force, no manifest


def test_unmerge_defaults_to_the_recorded_weight(world, tmp_path, capsys):
    from streammerge.cli import main

    assert main(["unmerge", "--merged", str(world.weighted), "--adapter", str(world.adapter2), "--out",
                 str(tmp_path / "u"), "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("28 unmerged, 0 replaced, 0 added, 11 copied, 0 dropped; wrote ")
    assert lines[-1] == f"check it with: streammerge verify --out {tmp_path / 'u'}"
    assert main(lines[-1].split()[4:]) == 0  # verify reads the unmerge's manifest
    assert capsys.readouterr().out.startswith(f"OK: {tmp_path / 'u'}: 39 tensors checked")
    explicit = streammerge.unmerge(world.weighted, world.adapter2, tmp_path / "e", weight=-0.3, device="cpu")
    assert explicit.operation == "unmerge" and not explicit.warnings
    assert _digest(tmp_path / "u") == _digest(tmp_path / "e")
    doc = json.loads((tmp_path / "u" / manifest.MANIFEST_NAME).read_text())
    assert doc["options"]["weight"] == -0.3 and "warnings" not in doc
    forced = streammerge.unmerge(world.weighted, world.adapter2, tmp_path / "f", weight=1.0, force=True, device="cpu")
    assert _digest(tmp_path / "f") != _digest(tmp_path / "e")  # the weight matters: the default was not 1
    want = (f"forced: {world.weighted}: its manifest records {world.adapter2} merged with weight -0.3, not 1; leave "
            "`weight` out to use the recorded one; unmerged with weight 1")
    assert forced.warnings == (want,)
    assert json.loads((tmp_path / "f" / manifest.MANIFEST_NAME).read_text())["warnings"] == [want]


def test_unmerge_force_of_an_adapter_never_merged_records_the_warning(world, tmp_path, capsys):
    from streammerge.cli import main

    assert main(["unmerge", "--merged", str(world.merged), "--adapter", str(world.adapter2), "--force", "--out",
                 str(tmp_path / "u"), "--device", "cpu"]) == 0
    err = capsys.readouterr().err.splitlines()
    reason = (f"{world.adapter2}: not among the adapters {world.merged / manifest.MANIFEST_NAME} records as merged "
              "(compared by the SHA-256 of adapter_config.json and of the weights); pass the adapter that was merged")
    assert f"WARNING: forced: {reason}; unmerged with weight 1" in err
    doc = json.loads((tmp_path / "u" / manifest.MANIFEST_NAME).read_text())
    assert doc["warnings"] == [f"forced: {reason}; unmerged with weight 1"]


def test_unmerge_without_a_manifest_warns_it_cannot_check(world, tmp_path, capsys):
    from streammerge.cli import main

    merged = _copy_merged(world, tmp_path)
    (merged / manifest.MANIFEST_NAME).unlink()
    assert main(["unmerge", "--merged", str(merged), "--adapter", str(world.adapter), "--out", str(tmp_path / "u"),
                 "--device", "cpu"]) == 0
    want = (f"{merged}: no {manifest.MANIFEST_NAME}, so it cannot be checked that {world.adapter} was merged into "
            "it, nor with which weight; unmerging with weight 1")
    assert f"WARNING: {want}" in capsys.readouterr().err.splitlines()
    assert json.loads((tmp_path / "u" / manifest.MANIFEST_NAME).read_text())["warnings"] == [want]
    back, base = testing.load_dir(tmp_path / "u"), testing.load_dir(world.base)
    assert back.keys() == base.keys()


def test_library_errors_name_arguments_in_library_terms(world, tmp_path):
    with pytest.raises(streammerge.BudgetError, match=r"^`max_memory` 1.00 kB is below .* pass `max_memory` "):
        streammerge.merge(base=world.base, adapter=world.adapter, out=tmp_path / "o", max_memory=1000)
    with pytest.raises(streammerge.PlanError, match=r"leave `weight` out to use the recorded one; or pass `force`"):
        streammerge.unmerge(world.weighted, world.adapter, tmp_path / "u", weight=1.0)
    with pytest.raises(streammerge.PlanError) as e:
        streammerge.merge(base=world.base, adapter=world.small_adapter, out=tmp_path / "o")
    assert len(e.value.problems) == 28 and str(e.value).count("\n") == 28
    assert not (tmp_path / "o").exists() and not (tmp_path / "u").exists()
