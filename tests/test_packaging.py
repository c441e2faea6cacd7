"""The source distribution carries what its tests need: build it (``python -m build --sdist``, without build
isolation so that no package index is needed), unpack it, and collect its test suite from the unpacked tree."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _collected(tree: Path) -> list[str]:
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
                          cwd=tree, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(tree)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return sorted(line for line in done.stdout.splitlines() if "::" in line)


def test_the_sdist_holds_the_license_changelog_and_a_collectable_test_suite(tmp_path):
    built = subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(tmp_path)],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (archive,) = tmp_path.glob("streammerge-*.tar.gz")
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    (tree,) = (tmp_path / "unpacked").iterdir()
    for name in ("LICENSE", "CHANGELOG.md", "README.md", "pyproject.toml", "tests/conftest.py", "tests/oracle.py",
                 "tests/zygote.py", "streammerge/py.typed"):
        assert (tree / name).is_file(), name
    assert "Apache License" in (tree / "LICENSE").read_text()
    pkg_info = (tree / "PKG-INFO").read_text()
    assert "License-Expression: Apache-2.0" in pkg_info and "License-File: LICENSE" in pkg_info
    shipped = {p.relative_to(tree / "tests") for p in (tree / "tests").rglob("*.py")}
    assert shipped == {p.relative_to(ROOT / "tests") for p in (ROOT / "tests").rglob("*.py")}
    # The unpacked suite collects without error, tests from every test module of this checkout.
    collected = _collected(tree)
    modules = {f"tests/{p.name}" for p in (ROOT / "tests").glob("test_*.py")}
    assert {line.split("::")[0] for line in collected} == modules
    assert any("test_the_sdist_holds_the_license" in line for line in collected)
