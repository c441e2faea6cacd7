"""The README's examples run as written, twice in a row: the "Use" section's shell commands (first run in
bash as printed, second through the CLI's ``main`` in forked children, which is faster), and the Python
blocks of "Use" and "Several adapters" (run twice each)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

from zygote import Zygote, cli_env

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _blocks(section: str, lang: str) -> list[str]:
    body = README.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{lang}\n(.*?)```", body, flags=re.S)


def test_use_section_commands_run_as_written_and_again(tmp_path):
    (script,) = _blocks("Use", "bash")
    lines = [line for line in script.splitlines() if line.strip() and not line.startswith("#")]
    assert all(line.startswith("python ") for line in lines), lines
    bash = script.replace("python ", f"{shlex.quote(sys.executable)} ")
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", bash], cwd=tmp_path, capture_output=True, text=True,
                          env=cli_env(), timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "OK: demo/merged: " in done.stdout and "check it with: streammerge verify --out demo/merged" in done.stdout
    first = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*.safetensors")}
    with Zygote() as zygote:
        for i, line in enumerate(lines[1:]):  # the first line builds the inputs (python -c), rerun below
            argv = shlex.split(line)[3:]  # drop "python -m streammerge"
            zygote.start(argv, stderr=tmp_path / f"again{i}.txt", cwd=tmp_path)
            assert zygote.wait() == 0, (line, (tmp_path / f"again{i}.txt").read_text())
    assert {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*.safetensors")} == first


def test_python_examples_run_as_written_and_again(tmp_path):
    use = _blocks("Use", "python")
    several = _blocks("Several adapters, unmerge, and an iterator", "python")
    assert len(use) == 1 and len(several) == 1
    setup = _blocks("Use", "bash")[0].splitlines()[0].removeprefix("python -c ").strip('"')
    for code in (several[0], setup, use[0], use[0], several[0]):
        done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                              env=cli_env(), timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
