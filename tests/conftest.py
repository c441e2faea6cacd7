"""Shared fixtures: tiny synthetic checkpoints, hypothesis profiles, the cuda marker."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

from streammerge import testing

settings.register_profile("ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=20, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is false)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def llama(tmp_path: Path) -> tuple[Path, Path]:
    """A 3-shard bf16 Llama-shaped base and an r=8 LoRA on every linear projection."""
    base = testing.make_checkpoint(tmp_path / "base", layers=2, hidden=64, intermediate=128, vocab=128, shards=3)
    adapter = testing.make_adapter(tmp_path / "adapter", base, targets=testing.LLAMA_LINEAR, r=8, alpha=16)
    return base, adapter
