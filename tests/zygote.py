"""Run ``streammerge.cli.main`` in forked child processes of one pre-imported interpreter.

A fresh ``python -m streammerge`` spends ~2 s importing torch before it looks at its arguments;
tests that start dozens of CLI processes (the kill test, the bad-input corpus) fork them instead
from a "zygote" that imported streammerge once and never ran a torch op (so forking is safe).
Each child is a real process with its own pid, stdin/stdout/stderr, signal handlers and exit
status, running exactly what ``python -m streammerge`` runs (``SystemExit(main(argv))``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import streammerge

_PROGRAM = r"""
import json, os, resource, sys
import torch, tqdm, streammerge.api, streammerge.cli, streammerge.interrupts, streammerge.verify

for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        err = os.open(job["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC) if job["stderr"] else null
        os.dup2(err, 2)
        if job.get("cwd"):
            os.chdir(job["cwd"])
        if job["fsize"] is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (job["fsize"], job["fsize"]))
        code = 1
        streammerge.interrupts.startup()  # as python -m streammerge does before anything else
        try:
            code = streammerge.cli.main(job["argv"])
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print(pid, flush=True)
    _, status = os.waitpid(pid, 0)
    print(status, flush=True)
"""


def cli_env() -> dict[str, str]:
    """Environment for a child interpreter that imports this checkout's streammerge."""
    return {**os.environ, "PYTHONPATH": str(Path(streammerge.__file__).resolve().parents[1])}


class Zygote:
    """``start`` forks one CLI run (returns its pid); ``wait`` returns its exit code (-N: killed by N)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _PROGRAM], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=cli_env())

    def start(self, argv: list[str], *, stderr: Path | None = None, fsize: int | None = None,
              cwd: Path | None = None) -> int:
        job = {"argv": argv, "stderr": str(stderr) if stderr else None, "fsize": fsize, "cwd": str(cwd or "")}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def wait(self) -> int:
        status = int(self.proc.stdout.readline())
        return os.waitstatus_to_exitcode(status)

    def run(self, argv: list[str], *, stderr: Path, fsize: int | None = None) -> tuple[int, str]:
        self.start(argv, stderr=stderr, fsize=fsize)
        code = self.wait()
        return code, stderr.read_text()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self.proc.stdout.close()

    def __enter__(self) -> Zygote:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
