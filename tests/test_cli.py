"""The command line: summary, dry run, base discovery, the demo. The bad-input cases (exit 2, one
line naming the culprit, inputs unchanged, nothing written) live in ``test_bad_input.py``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from streammerge import testing
from streammerge.cli import main


def _edit_json(path: Path, **changes) -> None:
    doc = json.loads(path.read_text())
    doc.update(changes)
    path.write_text(json.dumps(doc))


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


_PLAN_ONLY = """
import sys, time
t0 = time.perf_counter()
from streammerge.cli import main
code = main(sys.argv[1:])
print(code, "torch" in sys.modules, round(time.perf_counter() - t0, 3))
"""


def test_errors_found_while_planning_return_without_importing_torch(tmp_path, llama):
    """torch costs ~1-2 s to import; the CLI imports it only once blocks are computed (``scatter``), so a
    bad adapter, base, budget or output directory is reported at once (RESULTS.md has the timings)."""
    base, adapter = llama
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{not json")
    full = tmp_path / "full"
    full.mkdir()
    (full / "mine.txt").write_text("x")
    cases = {
        "bad adapter": ["--base", str(base), "--adapter", str(bad), "--out", str(tmp_path / "o1")],
        "missing base": ["--base", str(tmp_path / "nope"), "--adapter", str(adapter), "--out", str(tmp_path / "o2")],
        "budget": ["--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "o3"),
                   "--max-memory", "1KB"],
        "output": ["--base", str(base), "--adapter", str(adapter), "--out", str(full)],
    }
    for what, argv in cases.items():
        done = subprocess.run([sys.executable, "-c", _PLAN_ONLY, "merge", *argv], capture_output=True, text=True,
                              timeout=120)
        code, imported, _ = done.stdout.split()
        assert (code, imported) == ("2", "False"), (what, done.stdout, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1 and done.stderr.startswith("error: "), (what, done.stderr)
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 2, 3))
    assert os.listdir(full) == ["mine.txt"]


def test_a_reader_that_leaves_early_ends_the_command_quietly(tmp_path, llama):
    """``streammerge verify --out X | head -1``: stdout's reader is gone before the report is printed. The
    command ends as a C tool does on SIGPIPE (exit 141), with no traceback."""
    base, adapter = llama
    assert main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "o"), "-q"]) == 0
    read, write = os.pipe()
    os.close(read)  # the reader has left: the first write to stdout fails with EPIPE
    try:
        r = subprocess.run([sys.executable, "-m", "streammerge", "verify", "--out", str(tmp_path / "o")],
                           stdout=write, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert r.returncode == 141 and r.stderr == "", r.stderr
