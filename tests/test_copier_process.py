"""Copies made while torch loads run in a child process (``streammerge.copier_process``): the same bytes as
copies on threads, a child that cannot start or dies leaves them to the threads, its write errors are the
same one line, and an interrupt ends it with the run.

The CLI runs below import torch (``streammerge.execute``) only after a delay, as a cold cache does, so that
the copies certainly run while it loads; the library tests have torch already (no child is started there).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from zygote import cli_env

import streammerge
from streammerge import testing
from streammerge.copier_process import CopyProcess
from streammerge.errors import OutputError
from streammerge.sources import COPY_BUFFER, Stopped
from streammerge.writer import ShardFile

#: ``python -m streammerge`` whose kernel import (where torch loads) waits ``DELAY`` s first; ``EXECUTABLE``
#: replaces ``sys.executable``, which the copier process is started with.
_SLOW_TORCH = """
import importlib.abc, os, runpy, sys, time
class Slow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "streammerge.execute":
            time.sleep(float(os.environ["DELAY"]))
sys.meta_path.insert(0, Slow())
sys.executable = os.environ.get("EXECUTABLE", sys.executable)
sys.argv[0] = "streammerge"
runpy.run_module("streammerge", run_name="__main__", alter_sys=True)
"""
FROM_CHILD = "in the copier process"
GONE = "the copier process ended"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """~17 MB bf16 in 3 shards with a q/v adapter (mostly copies), and the merge made in this process."""
    root = tmp_path_factory.mktemp("copier")
    base = testing.make_checkpoint(root / "base", layers=4, hidden=384, intermediate=1024, vocab=2048, shards=3)
    testing.make_adapter(root / "adapter", base, r=16)
    streammerge.merge(base=base, adapter=root / "adapter", out=root / "threads", device="cpu")
    return root


def _slow_merge(root: Path, out: Path, delay: float, **env: str) -> subprocess.Popen:
    argv = ["merge", "--base", str(root / "base"), "--adapter", str(root / "adapter"), "--out", str(out),
            "--device", "cpu", "-v"]
    return subprocess.Popen([sys.executable, "-c", _SLOW_TORCH, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**cli_env(), "DELAY": str(delay), **env})


def _same_checkpoint(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir() if p.name != "streammerge.json")
    assert names == sorted(p.name for p in b.iterdir() if p.name != "streammerge.json")
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def _verify(out: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "streammerge", "verify", "--out", str(out)], env=cli_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_copies_made_while_torch_loads_run_in_the_child_and_give_the_same_bytes(inputs, tmp_path):
    proc = _slow_merge(inputs, tmp_path / "out", 1.0)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert FROM_CHILD in err and GONE not in err, err
    _same_checkpoint(tmp_path / "out", inputs / "threads")
    _verify(tmp_path / "out")


@pytest.mark.parametrize("executable", ["/bin/false", "/nonexistent/python"], ids=["child-dies", "no-child"])
def test_without_a_child_the_threads_copy(inputs, tmp_path, executable):
    proc = _slow_merge(inputs, tmp_path / "out", 1.0, EXECUTABLE=executable)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert FROM_CHILD not in err, err
    assert ("hashed after torch loads" in err) and (GONE in err) == (executable == "/bin/false"), err
    _same_checkpoint(tmp_path / "out", inputs / "threads")
    _verify(tmp_path / "out")


def test_a_library_callers_process_gets_no_child(inputs, tmp_path):
    """Only the CLI owns its process (``process_policy``): a library merge, torch not yet imported, copies on
    threads while torch loads."""
    code = ("import logging, sys, streammerge; logging.basicConfig(level=logging.DEBUG); "
            "streammerge.merge(base=sys.argv[1], adapter=sys.argv[2], out=sys.argv[3], device='cpu'); "
            "assert 'torch' in sys.modules")
    done = subprocess.run([sys.executable, "-c", code, str(inputs / "base"), str(inputs / "adapter"),
                           str(tmp_path / "out")], env=cli_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "hashed after torch loads" in done.stderr and FROM_CHILD not in done.stderr, done.stderr
    _same_checkpoint(tmp_path / "out", inputs / "threads")


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"streammerge.copier_process" in cmdline:
                found.append(int(entry.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the child through /proc (Linux)")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["interrupt", "kill"])
def test_the_child_ends_with_the_run(inputs, tmp_path, sig):
    """SIGINT: ``close`` kills and reaps it (should the signal land between its start and its handing over to the
    run, it ends on its own when its stdin closes with the parent). SIGKILL leaves no handler: it ends that way."""
    proc = _slow_merge(inputs, tmp_path / "out", 30)
    deadline = time.monotonic() + 60
    while not (children := _children(proc.pid)):
        assert time.monotonic() < deadline and proc.poll() is None, "no copier process started"
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == (130 if sig == signal.SIGINT else -signal.SIGKILL), err
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() and _state(pid) != "Z" for pid in children):  # a zombie is gone
        assert time.monotonic() < deadline, "the copier process outlived the run"
        time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def _source(tmp_path: Path, size: int) -> tuple[Path, bytes]:
    data = os.urandom(size)
    path = tmp_path / "base.bin"
    path.write_bytes(data)
    return path, data


@pytest.mark.parametrize("direct", [True, False])
def test_the_child_writes_and_the_parent_counts(tmp_path, direct):
    src, data = _source(tmp_path, 3 * COPY_BUFFER + 12345)
    child = CopyProcess.start(COPY_BUFFER)
    assert child is not None
    try:
        with ShardFile(tmp_path / "out.bin", len(data), direct) as f:
            # two runs at odd offsets, the second ragged at both ends
            assert child.copy(f, str(src), 0, 0, 5000)
            assert child.copy(f, str(src), 5000, 5000, len(data) - 5000)
            f.commit()  # checks that every byte was counted
    finally:
        child.close()
    assert (tmp_path / "out.bin").read_bytes() == data
    with pytest.raises(Stopped):
        child.copy(f, str(src), 0, 0, 1)


def test_the_childs_error_is_the_threads_line(tmp_path):
    """A base file that ends before a run does (changed since the plan read its header)."""
    src, _ = _source(tmp_path, 4 * COPY_BUFFER)
    child = CopyProcess.start(COPY_BUFFER)
    assert child is not None
    fd = os.open(src, os.O_RDONLY)
    try:
        with ShardFile(tmp_path / "out.bin", 5 * COPY_BUFFER, direct=True) as f:
            with pytest.raises(OutputError) as there:
                child.copy(f, str(src), 0, 0, 5 * COPY_BUFFER)
            with pytest.raises(OutputError) as here:
                f.copy_in(fd, 0, 0, 5 * COPY_BUFFER)  # what a copier thread does
    finally:
        os.close(fd)
        child.close()
    assert str(there.value) == str(here.value) == (f"{tmp_path}/out.bin: source ended early while copying; is the "
                                                   "base file truncated?")


def test_a_missing_source_is_named(tmp_path):
    child = CopyProcess.start(COPY_BUFFER)
    assert child is not None
    try:
        with ShardFile(tmp_path / "out.bin", 10) as f, \
                pytest.raises(OutputError, match=rf"^{tmp_path}/missing: cannot read \(No such file or directory\)$"):
            child.copy(f, str(tmp_path / "missing"), 0, 0, 10)
    finally:
        child.close()


@pytest.mark.parametrize("script", [
    "pass",
    "import sys; sys.stdin.readline()",
    "import sys; sys.stdin.readline(); print('something else', flush=True); sys.stdin.read()",
], ids=["gone", "dies-mid-copy", "answers-nonsense"])
def test_a_dead_child_copies_nothing_and_says_so(tmp_path, script):
    src, data = _source(tmp_path, 100)
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    child = CopyProcess(proc)
    try:
        with ShardFile(tmp_path / "out.bin", len(data)) as f:
            if script == "pass":  # gone before the request; else gone with it unanswered
                proc.wait()
            assert child.copy(f, str(src), 0, 0, len(data)) is False
            fd = os.open(src, os.O_RDONLY)
            try:
                f.copy_in(fd, 0, 0, len(data))  # what copies.copy_run then does
            finally:
                os.close(fd)
            f.commit()  # nothing was counted twice
    finally:
        child.close()
    assert (tmp_path / "out.bin").read_bytes() == data
