"""One interrupt policy for every command: SIGINT at any moment of ``merge``, ``verify`` and ``unmerge`` (start-up
included) exits 130 with one line and no traceback, and leaves the inputs byte-identical.

The random moments run as forked children of a pre-imported interpreter (``zygote.py``, which installs the
start-up policy first, as ``python -m streammerge`` does): a fork costs milliseconds where a fresh interpreter
costs seconds. The start-up moments (Python and torch importing) need genuine ``python -m streammerge``
processes; a few of those run side by side.
"""

from __future__ import annotations

import contextlib
import hashlib
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
from streammerge import testing

SEED = int(os.environ.get("STREAMMERGE_KILL_SEED", "20240605"))
MOMENTS = 8  # per command
STARTING = "interrupted: stopped while starting; nothing was written"
MESSAGE = {
    "merge": "interrupted: no partial shard was left under a final name; rerun the same command with --resume to "
             "continue",
    "verify": "interrupted: verify stopped before it finished; nothing was changed",
}
MESSAGE["unmerge"] = MESSAGE["merge"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """~17 MB bf16 in 3 shards (each command runs for a fraction of a second), an adapter, and their merge."""
    root = tmp_path_factory.mktemp("interrupts")
    base = testing.make_checkpoint(root / "base", layers=4, hidden=384, intermediate=1024, vocab=2048, shards=3)
    adapter = testing.make_adapter(root / "adapter", base, targets=testing.LLAMA_LINEAR, r=16)
    streammerge.merge(base=base, adapter=adapter, out=root / "merged", device="cpu")
    return root


def _argv(command: str, root: Path, out: Path) -> list[str]:
    if command == "merge":
        return ["merge", "--base", str(root / "base"), "--adapter", str(root / "adapter"), "--out", str(out),
                "--device", "cpu", "-q"]
    if command == "unmerge":
        return ["unmerge", "--merged", str(root / "merged"), "--adapter", str(root / "adapter"), "--out", str(out),
                "--device", "cpu", "-q"]
    return ["verify", "--out", str(root / "merged"), "--device", "cpu", "-q"]


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("command", ["merge", "verify", "unmerge"])
def test_sigint_at_random_moments_exits_130_with_one_line(inputs, tmp_path, command):
    before = _digest(inputs)
    rng = random.Random(f"{SEED}-{command}")
    outcomes = []
    with Zygote() as zygote:
        code, err = zygote.run(_argv(command, inputs, tmp_path / "warm"), stderr=tmp_path / "warm.txt")
        assert code == 0, err  # the first run pays for cold caches and lazy initialisation
        times = []
        for k in range(3):  # the shortest of three runs: a busy machine stretches some runs, not all
            t0 = time.monotonic()
            code, err = zygote.run(_argv(command, inputs, tmp_path / f"timed{k}"), stderr=tmp_path / "timed.txt")
            times.append(time.monotonic() - t0)
            assert code == 0, err
        run_s = min(times)
        for i in range(MOMENTS):
            at = rng.uniform(0, 0.8 * run_s)
            log = tmp_path / f"{i}.txt"
            pid = zygote.start(_argv(command, inputs, tmp_path / f"o{i}"), stderr=log)
            time.sleep(at)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT)
            code = zygote.wait()
            outcomes.append((round(at, 3), code, log.read_text()))
    for at, code, err in outcomes:
        assert code in (0, 130), (at, code, err)
        assert "Traceback" not in err, (at, err)
        if code == 130:
            assert err.splitlines() in ([MESSAGE[command]], [STARTING]), (at, err)
        else:
            assert err == "", (at, err)
    # Most moments must land inside the run (a loaded machine can stretch a run, so not all of them).
    assert sum(code == 130 for _, code, _ in outcomes) >= 3, (run_s, outcomes)
    assert _digest(inputs) == before  # the base, the adapter and the merged input: byte-identical
    for i in range(MOMENTS):  # a merge/unmerge stopped by Ctrl-C leaves no temporary file
        out = tmp_path / f"o{i}"
        assert not out.exists() or not [n for n in os.listdir(out) if n.endswith(".tmp")]


#: ``python -m streammerge`` after the interpreter's own initialisation: the parent reads the first line, then
#: interrupts at a random moment while streammerge starts, imports torch and runs. (A signal during CPython's
#: initialisation, before any program code runs, is CPython's to report: "Fatal Python error: init_import_site".)
_LAUNCH = ("import runpy, sys; print('ready', flush=True); sys.argv[0] = 'streammerge'; "
           "runpy.run_module('streammerge', run_name='__main__', alter_sys=True)")


def test_sigint_during_start_up_exits_130_without_a_traceback(inputs, tmp_path):
    """Genuine interpreters, interrupted while streammerge starts (Python and torch importing) or just after."""
    before = _digest(inputs)
    rng = random.Random(f"{SEED}-start-up")
    jobs = []
    for i, command in enumerate(["merge", "verify", "unmerge"] * 2):
        cmd = [sys.executable, "-c", _LAUNCH, *_argv(command, inputs, tmp_path / f"o{i}")]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
        assert proc.stdout.readline() == "ready\n"
        time.sleep(rng.uniform(0.0, 1.5))
        with contextlib.suppress(ProcessLookupError):  # it may have ended just now
            proc.send_signal(signal.SIGINT)
        jobs.append((command, proc))
    late = 0
    for command, proc in jobs:
        _, err = proc.communicate(timeout=120)
        if proc.returncode in (0, -signal.SIGINT) and not err:
            # On an idle machine a tiny command can finish before the signal lands, or be in the interpreter's
            # own shutdown (which restores the default handler: a death by SIGINT, status 130 to a shell).
            late += 1
            continue
        assert proc.returncode == 130, (command, proc.returncode, err)
        assert err.splitlines() in ([STARTING], [MESSAGE[command]]), (command, err)
    assert late <= len(jobs) // 2, f"{late} of {len(jobs)} commands finished before the signal: the test lost its point"
    assert _digest(inputs) == before


def test_sigterm_exits_143_with_the_command_line(inputs, tmp_path):
    with Zygote() as zygote:
        pid = zygote.start(_argv("verify", inputs, tmp_path), stderr=tmp_path / "err.txt")
        time.sleep(0.05)  # verify of 17 MB takes ~0.3 s on an idle machine
        os.kill(pid, signal.SIGTERM)
        code = zygote.wait()
    err = (tmp_path / "err.txt").read_text().splitlines()
    assert (code, err) in ((143, ["terminated: verify stopped before it finished; nothing was changed"]),
                           (143, ["terminated: stopped while starting; nothing was written"])), (code, err)


#: ``python -m streammerge`` whose kernel import (where torch loads) takes 30 s, as torch's can on a cold cache.
_SLOW_TORCH = """
import importlib.abc, runpy, sys, time
class Slow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "streammerge.execute":
            time.sleep(30)
sys.meta_path.insert(0, Slow())
sys.argv[0] = "streammerge"
runpy.run_module("streammerge", run_name="__main__", alter_sys=True)
"""


def test_sigint_while_torch_still_loads_exits_without_waiting_for_it(inputs, tmp_path):
    """Blocks that wait for torch give up when the run ends: SIGINT during a 30 s import exits 130 at once
    (it used to wait for the import to finish), with the same line and nothing but the progress record left."""
    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_TORCH, *_argv("merge", inputs, out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
    deadline = time.monotonic() + 60
    # a shard's temporary file: writing has begun (the progress record is written before, through its own
    # temporary file); the copies run, the blocks wait for torch
    while not any(".safetensors." in p.name and p.name.endswith(".tmp") for p in out.glob(".*")):
        assert time.monotonic() < deadline and proc.poll() is None, "the merge never started writing"
        time.sleep(0.02)
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    took = time.monotonic() - sent
    assert proc.returncode == 130 and err.splitlines() == [MESSAGE["merge"]], (proc.returncode, err)
    assert took < 10, f"exited {took:.1f} s after the signal: it waited for the import"
    assert [p.name for p in out.iterdir()] == [".streammerge-progress.json"]
