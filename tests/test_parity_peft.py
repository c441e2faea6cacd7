"""streammerge output == PEFT's ``merge_and_unload().save_pretrained()`` output, tensor for tensor.

Each case (see ``oracle.py``) is built once per session: a tiny bf16 base, a LoRA adapter with
non-zero B, and PEFT's merged reference. streammerge merges the same base and adapter once per case;
the tests below then compare names, dtypes and bits, the index, config.json, the files around the
weights, and finally the logits of the reloaded models.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from oracle import (
    ADAPTER_FILES,
    CASES,
    LOGITS_CASES,
    Case,
    byte_size,
    cached_case,
    diff_checkpoints,
    load_checkpoint,
    load_merged,
    logits,
    shard_files,
    tensor_locations,
)
from transformers import AutoConfig

import streammerge

INDEX = "model.safetensors.index.json"
# config.json keys a merge may legitimately change (spec §3.10); every other base key must survive verbatim.
CONFIG_KEYS_MERGE_MAY_CHANGE = frozenset(
    {"architectures", "tie_word_embeddings", "id2label", "label2id", "num_labels", "transformers_version"}
)
# Config facts compared between our output and PEFT's reference, as transformers reads them.
CONFIG_FACTS = ("model_type", "architectures", "tie_word_embeddings", "num_labels", "vocab_size")
# PEFT's reference merge runs on CPU; bit-exactness is a same-ops-same-device contract (spec §3.1), so
# streammerge computes on CPU here even where CUDA is available (its default device is "auto").
DEVICE = "cpu"
WEIGHT_FILES = ("*.safetensors", INDEX, "config.json")


@dataclass(frozen=True)
class Merged:
    """streammerge's result for one case (merged once per session)."""

    case: Case
    out_dir: Path
    report: Any
    warnings: tuple[str, ...]
    error: str | None  # formatted traceback when streammerge.merge raised

    def require(self) -> Merged:
        if self.error is not None:
            pytest.fail(f"streammerge.merge raised for {self.case.name}:\n{self.error}", pytrace=False)
        return self


@pytest.fixture(scope="session")
def case_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "parity-cases"


@pytest.fixture(scope="session")
def merged_cases(case_root: Path) -> dict[str, Merged]:
    return {}


@pytest.fixture
def merged(request: pytest.FixtureRequest, case_root: Path, merged_cases: dict[str, Merged]) -> Merged:
    """Build the case (cached) and run ``streammerge.merge`` on it (cached)."""
    name = request.param
    if name not in merged_cases:
        case = cached_case(name, case_root)
        out_dir = case.base_dir.parent / "out"
        report, error = None, None
        with warnings.catch_warnings(record=True) as caught:
            # streammerge may warn (e.g. tied lm_head, spec §6.1); record instead of failing on them.
            warnings.simplefilter("always")
            try:
                report = streammerge.merge(base=case.base_dir, adapter=case.adapter_dir, out=out_dir, device=DEVICE)
            except Exception:
                error = traceback.format_exc()
        merged_cases[name] = Merged(
            case=case,
            out_dir=out_dir,
            report=report,
            warnings=tuple(f"{w.category.__name__}: {w.message}" for w in caught),
            error=error,
        )
    return merged_cases[name].require()


def _cases(names: tuple[str, ...]) -> list[Any]:
    return [pytest.param(name, id=name) for name in names]


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------------------------------------
# Tensors


@pytest.mark.parametrize("merged", _cases(CASES), indirect=True)
def test_tensors_bit_identical_to_peft(merged: Merged) -> None:
    ours = load_checkpoint(merged.out_dir)
    ref = load_checkpoint(merged.case.ref_dir)
    assert diff_checkpoints(ours, ref) == []


@pytest.mark.parametrize("merged", _cases(CASES), indirect=True)
def test_expected_tensor_set(merged: Merged) -> None:
    """The named facts of each case (head present/absent, adapter really applied), stated explicitly."""
    case = merged.case
    ours = load_checkpoint(merged.out_dir)
    base = load_checkpoint(case.base_dir)
    assert sorted(case.must_have - set(ours)) == []
    assert sorted(case.must_not_have & set(ours)) == []
    unchanged = sorted(k for k in case.must_change if k in ours and torch.equal(ours[k], base[k]))
    assert unchanged == []
    leaked = sorted(k for k in ours if ".lora_" in k or ".base_layer." in k or "modules_to_save" in k)
    assert leaked == []


# ----------------------------------------------------------------------------------------------------------
# Shards and index


@pytest.mark.parametrize("merged", _cases(CASES), indirect=True)
def test_index_matches_shards(merged: Merged) -> None:
    out = merged.out_dir
    base_has_index = (merged.case.base_dir / INDEX).exists()
    assert (out / INDEX).exists() == base_has_index
    ours = load_checkpoint(out)
    locations = tensor_locations(out)
    if not base_has_index:
        assert [p.name for p in shard_files(out)] == ["model.safetensors"]
        return
    index = _json(out / INDEX)
    weight_map: dict[str, str] = index["weight_map"]
    assert set(weight_map) == set(ours)
    wrong = {k: (f, locations[k]) for k, f in weight_map.items() if locations.get(k) != f}
    assert wrong == {}
    assert index["metadata"]["total_size"] == sum(byte_size(t) for t in ours.values())
    assert set(weight_map.values()) == {p.name for p in shard_files(out)}


@pytest.mark.parametrize("merged", _cases(CASES), indirect=True)
def test_shard_layout_follows_base(merged: Merged) -> None:
    """Same shard file names as the base, and every surviving base tensor stays in its base shard."""
    base_loc = tensor_locations(merged.case.base_dir)
    our_loc = tensor_locations(merged.out_dir)
    assert {p.name for p in shard_files(merged.out_dir)} == {p.name for p in shard_files(merged.case.base_dir)}
    moved = {k: (base_loc[k], f) for k, f in our_loc.items() if k in base_loc and base_loc[k] != f}
    assert moved == {}


def test_multi_shard_case_is_really_sharded(case_root: Path) -> None:
    case = cached_case("llama_all_linear_sharded", case_root)
    assert len(shard_files(case.base_dir)) >= 3
    assert (case.base_dir / INDEX).exists()


# ----------------------------------------------------------------------------------------------------------
# config.json and the files around the weights


@pytest.mark.parametrize("merged", _cases(CASES), indirect=True)
def test_config_facts_match_peft(merged: Merged) -> None:
    case = merged.case
    ours = AutoConfig.from_pretrained(merged.out_dir)
    ref = AutoConfig.from_pretrained(case.ref_dir)
    facts = {a: (getattr(ours, a, None), getattr(ref, a, None)) for a in CONFIG_FACTS}
    assert {a: v for a, v in facts.items() if v[0] != v[1]} == {}
    for key, expected in case.expect_config.items():
        assert getattr(ref, key) == expected, f"oracle: PEFT's {key} is not {expected!r}"
        assert getattr(ours, key) == expected, key


@pytest.mark.parametrize("merged", _cases(CASES), indirect=True)
def test_config_keeps_base_keys(merged: Merged) -> None:
    base = _json(merged.case.base_dir / "config.json")
    ours = _json(merged.out_dir / "config.json")
    changed = {
        k: (v, ours.get(k, "<missing>"))
        for k, v in base.items()
        if k not in CONFIG_KEYS_MERGE_MAY_CHANGE and ours.get(k, "<missing>") != v
    }
    assert changed == {}


@pytest.mark.parametrize("merged", _cases(CASES), indirect=True)
def test_no_adapter_files_in_output(merged: Merged) -> None:
    present = sorted(f for f in ADAPTER_FILES if (merged.out_dir / f).exists())
    assert present == []


@pytest.mark.parametrize("merged", _cases(CASES), indirect=True)
def test_base_side_files_copied(merged: Merged) -> None:
    """Tokenizer and generation files of the base reach the output unchanged."""
    base_dir = merged.case.base_dir
    extras = sorted(
        p.name for p in base_dir.iterdir() if p.is_file() and not any(p.match(pattern) for pattern in WEIGHT_FILES)
    )
    assert "tokenizer.json" in extras  # the oracle writes one
    missing = [n for n in extras if not (merged.out_dir / n).exists()]
    assert missing == []
    differ = [n for n in extras if (merged.out_dir / n).read_bytes() != (base_dir / n).read_bytes()]
    assert differ == []


# ----------------------------------------------------------------------------------------------------------
# Reloaded models


@pytest.mark.parametrize("merged", _cases(LOGITS_CASES), indirect=True)
def test_logits_match_peft(merged: Merged) -> None:
    case = merged.case
    model, info = case.auto_class.from_pretrained(
        merged.out_dir, dtype="auto", attn_implementation="eager", output_loading_info=True
    )
    problems = {k: sorted(v) for k, v in info.items() if v}
    assert problems == {}  # no missing (randomly initialised), unexpected or mismatched tensors
    assert model.dtype == torch.bfloat16

    ours = logits(model, case.input_ids)
    ref_reloaded = logits(load_merged(case.auto_class, case.ref_dir), case.input_ids)
    assert torch.equal(ours, ref_reloaded), f"max abs diff {(ours - ref_reloaded).abs().max()}"
    assert torch.equal(ours, case.ref_logits), "differs from PEFT's in-memory merged model"

    tied = case.expect_config.get("tie_word_embeddings")
    if tied is not None:
        out_emb = model.get_output_embeddings().weight
        same_storage = out_emb.data_ptr() == model.get_input_embeddings().weight.data_ptr()
        assert same_storage == tied


# ----------------------------------------------------------------------------------------------------------
# CLI


def test_cli_merge_matches_peft(case_root: Path, tmp_path: Path) -> None:
    case = cached_case("llama_all_linear_sharded", case_root)
    out = tmp_path / "cli-out"
    cmd = [sys.executable, "-m", "streammerge", "merge", "--base", str(case.base_dir)]
    cmd += ["--adapter", str(case.adapter_dir), "--out", str(out), "--device", DEVICE]
    # the child imports the same streammerge as this process
    env = {**os.environ, "PYTHONPATH": str(Path(streammerge.__file__).resolve().parents[1])}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert diff_checkpoints(load_checkpoint(out), load_checkpoint(case.ref_dir)) == []
    assert not (out / "adapter_config.json").exists()
