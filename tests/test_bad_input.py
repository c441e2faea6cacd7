"""The bad-input corpus: every case is a real ``python -m streammerge merge`` subprocess that must

* exit 2 with exactly ONE line on stderr (``-q``: no progress logs), ``error: …``, naming the file
  or tensor at fault;
* print no traceback;
* leave every input file unchanged (SHA-256 of every file before == after);
* leave nothing at the output path (or a pre-existing output untouched), except, after an
  output fault such as a full disk, the completed shards and the progress record ``--resume`` needs.

Every case runs as a forked child of a pre-imported interpreter (``zygote.py``: the same
``cli.main`` that ``python -m streammerge`` runs, without paying ~2 s of torch import 50 times),
and the cases in ``REAL`` run a second time as a genuine ``python -m streammerge merge`` (under
``ulimit -f`` from bash for the full disk), to show the entry point behaves the same.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from zygote import Zygote, cli_env

import streammerge
from streammerge import manifest, testing

INDEX = "model.safetensors.index.json"
SHARD1, SHARD2 = "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors"
Q0 = "model.layers.0.self_attn.q_proj"


@dataclass
class Case:
    root: Path
    base: Path
    adapter: Path
    out: Path
    base_arg: Path | None = None
    adapter_arg: Path | None = None
    extra: list[str] = field(default_factory=list)
    fsize_kib: int | None = None  # RLIMIT_FSIZE in KiB (``ulimit -f`` units)

    def args(self) -> list[str]:
        return ["merge", "--base", str(self.base_arg or self.base), "--adapter", str(self.adapter_arg or self.adapter),
                "--out", str(self.out), "--device", "cpu", "-q", *self.extra]

    def command(self) -> list[str]:
        """The same run as a fresh ``python -m streammerge`` process."""
        cmd = [sys.executable, "-m", "streammerge", *self.args()]
        if self.fsize_kib is not None:
            return ["bash", "-c", f'ulimit -f {self.fsize_kib} && exec "$@"', "bash", *cmd]
        return cmd


# --------------------------------------------------------------------------------------------
# file surgery


def _header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write_header(path: Path, doc: dict, data: bytes) -> None:
    body = json.dumps(doc, separators=(",", ":")).encode()
    body += b" " * (-(8 + len(body)) % 8)
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)


def _edit_header(path: Path, fn: Callable[[dict], None]) -> None:
    doc, data = _header(path)
    fn(doc)
    _write_header(path, doc, data)


def _first_tensor(doc: dict) -> str:
    return min((k for k in doc if k != "__metadata__"), key=lambda k: doc[k]["data_offsets"][0])


def _second_tensor(doc: dict) -> str:
    return sorted((k for k in doc if k != "__metadata__"), key=lambda k: doc[k]["data_offsets"][0])[1]


def _edit_json(path: Path, **changes) -> None:
    doc = json.loads(path.read_text())
    doc.update(changes)
    path.write_text(json.dumps(doc))


def _edit_index(c: Case, fn: Callable[[dict], None]) -> None:
    doc = json.loads((c.base / INDEX).read_text())
    fn(doc["weight_map"])
    (c.base / INDEX).write_text(json.dumps(doc))


def _edit_adapter(c: Case, fn: Callable[[dict], dict]) -> Path:
    path = c.adapter / "adapter_model.safetensors"
    save_file(fn(load_file(str(path))), str(path))
    return path


# --------------------------------------------------------------------------------------------
# the cases: each breaks its own copy and returns the fragments the error line must contain


def truncated_shard(c):
    p = c.base / SHARD2
    p.write_bytes(p.read_bytes()[:-10])
    return [str(p), "truncated"]


def empty_shard(c):
    (c.base / SHARD2).write_bytes(b"")
    return [str(c.base / SHARD2), "too short"]


def corrupt_header_json(c):
    p = c.base / SHARD1
    raw = bytearray(p.read_bytes())
    raw[8:12] = b"{{{{"
    p.write_bytes(bytes(raw))
    return [str(p), "not valid JSON"]


def header_not_an_object(c):
    _, data = _header(c.base / SHARD1)
    _write_header(c.base / SHARD1, [], data)  # type: ignore[arg-type]
    return [str(c.base / SHARD1), "not a JSON object"]


def oversized_header(c):
    p = c.base / SHARD1
    p.write_bytes(struct.pack("<Q", 2**40) + p.read_bytes()[8:])
    return [str(p), "header length 1099511627776 is impossible"]


def _shift(c: Case, pick: Callable[[dict], str], by: int) -> str:
    """Move one tensor's data_offsets of shard 1 by ``by`` bytes; returns its name."""
    doc, data = _header(c.base / SHARD1)
    name = pick(doc)
    doc[name]["data_offsets"] = [o + by for o in doc[name]["data_offsets"]]
    _write_header(c.base / SHARD1, doc, data)
    return name


def offsets_out_of_range(c):
    name = _shift(c, _first_tensor, 2**40)
    return [str(c.base / SHARD1), repr(name)]


def overlapping_offsets(c):
    name = _shift(c, _second_tensor, -2)
    return [str(c.base / SHARD1), repr(name), "overlaps the previous tensor"]


def unknown_dtype(c):
    def f4(doc):
        doc[_first_tensor(doc)]["dtype"] = "F4"
    _edit_header(c.base / SHARD1, f4)
    return [str(c.base / SHARD1), "dtype 'F4'", "quantized checkpoint"]


def shape_disagrees_with_bytes(c):
    def grow(doc):
        doc[_first_tensor(doc)]["shape"][0] *= 2
    _edit_header(c.base / SHARD1, grow)
    return [str(c.base / SHARD1), "needs", "span"]


def negative_shape(c):
    def neg(doc):
        doc[_first_tensor(doc)]["shape"][0] = -1
    _edit_header(c.base / SHARD1, neg)
    return [str(c.base / SHARD1), "invalid shape"]


def index_names_missing_shard(c):
    _edit_index(c, lambda wm: wm.update({k: "model-00009-of-00009.safetensors" for k in list(wm)[:1]}))
    return [str(c.base / "model-00009-of-00009.safetensors"), "cannot read"]


def index_tensor_in_wrong_shard(c):
    wm = json.loads((c.base / INDEX).read_text())["weight_map"]
    name = next(k for k, v in wm.items() if v == SHARD1)
    _edit_index(c, lambda m: m.update({name: SHARD2}))
    return [str(c.base), repr(name), f"indexed in {SHARD2} but is in {SHARD1}"]


def index_path_traversal(c):
    _edit_index(c, lambda wm: wm.update({next(iter(wm)): "../secrets.safetensors"}))
    return [str(c.base / INDEX), "'../secrets.safetensors'", "refusing to read outside"]


def index_absolute_path(c):
    _edit_index(c, lambda wm: wm.update({next(iter(wm)): "/etc/passwd.safetensors"}))
    return [str(c.base / INDEX), "'/etc/passwd.safetensors'", "refusing to read outside"]


def index_not_json(c):
    (c.base / INDEX).write_text('{"weight_map": ')
    return [str(c.base / INDEX), "invalid JSON"]


def index_without_weight_map(c):
    (c.base / INDEX).write_text(json.dumps({"metadata": {}}))
    return [str(c.base / INDEX), "no 'weight_map'"]


def index_misses_a_tensor(c):
    wm = json.loads((c.base / INDEX).read_text())["weight_map"]
    name = next(k for k, v in wm.items() if v == SHARD2)
    _edit_index(c, lambda m: m.pop(name))
    return [str(c.base / INDEX), repr(name), "missing from the index"]


def tensor_in_two_shards(c):
    t1 = load_file(str(c.base / SHARD1))
    t2 = load_file(str(c.base / SHARD2))
    name = next(iter(t1))
    save_file({**t2, name: t1[name]}, str(c.base / SHARD2), metadata={"format": "pt"})
    return [repr(name), "is in both"]


def base_config_bad_json(c):
    (c.base / "config.json").write_text("{nope")
    return [str(c.base / "config.json"), "invalid JSON"]


def quantized_base(c):
    _edit_json(c.base / "config.json", quantization_config={"quant_method": "gptq"})
    return [str(c.base / "config.json"), "quant_method='gptq'"]


def quantized_tensor(c):
    t = load_file(str(c.base / SHARD1))
    name = "model.layers.0.self_attn.q_proj.weight.absmax"
    save_file(t | {name: next(iter(t.values())).float()}, str(c.base / SHARD1), metadata={"format": "pt"})
    _edit_index(c, lambda wm: wm.update({name: SHARD1}))
    return [str(c.base / SHARD1), repr(name), "bitsandbytes 4-bit quantized base"]


def missing_base(c):
    c.base_arg = c.root / "nope"
    return [str(c.root / "nope"), "base checkpoint not found"]


def missing_adapter(c):
    c.adapter_arg = c.root / "nope"
    return [str(c.root / "nope"), "adapter directory not found"]


def different_base(c):
    c.base_arg = testing.make_checkpoint(c.root / "other", layers=2, hidden=32, intermediate=64, vocab=128, shards=3)
    return [str(c.adapter / "adapter_model.safetensors"), "trained on a different base model"]


def missing_lora_b(c):
    p = _edit_adapter(c, lambda t: {k: v for k, v in t.items() if f"{Q0}.lora_B" not in k})
    return [str(p), f"'{Q0}'", "no lora_B tensor"]


def lora_a_b_rank_mismatch(c):
    key = f"base_model.model.{Q0}.lora_B.weight"
    p = _edit_adapter(c, lambda t: t | {key: t[key][:, :4].contiguous()})
    return [str(p), repr(key), "lora_A and lora_B disagree"]


def config_rank_disagrees(c):
    _edit_json(c.adapter / "adapter_config.json", r=4)
    return [str(c.adapter / "adapter_model.safetensors"), "the config and weights disagree"]


def unknown_adapter_key(c):
    p = _edit_adapter(c, lambda t: t | {"base_model.model.model.layers.9.foo.weight": t[next(iter(t))].clone()})
    return [str(p), "'model.layers.9.foo.weight', which is not in the base"]


def adapter_config_bad_json(c):
    (c.adapter / "adapter_config.json").write_text("{oops")
    return [str(c.adapter / "adapter_config.json"), "invalid JSON"]


def adapter_config_not_object(c):
    (c.adapter / "adapter_config.json").write_text("[1, 2]")
    return [str(c.adapter / "adapter_config.json"), "expected a JSON object"]


def missing_peft_type(c):
    doc = json.loads((c.adapter / "adapter_config.json").read_text())
    del doc["peft_type"]
    (c.adapter / "adapter_config.json").write_text(json.dumps(doc))
    return [str(c.adapter / "adapter_config.json"), "missing required field 'peft_type'"]


def unknown_peft_type(c):
    _edit_json(c.adapter / "adapter_config.json", peft_type="FOO")
    return [str(c.adapter / "adapter_config.json"), "peft_type 'FOO' is not supported"]


def rank_not_a_number(c):
    _edit_json(c.adapter / "adapter_config.json", r="eight")
    return [str(c.adapter / "adapter_config.json"), "'r' must be a positive number"]


def target_modules_wrong_type(c):
    _edit_json(c.adapter / "adapter_config.json", target_modules=5)
    return [str(c.adapter / "adapter_config.json"), "target_modules must be a string or a list"]


def dora(c):
    _edit_json(c.adapter / "adapter_config.json", use_dora=True)
    return [str(c.adapter / "adapter_model.safetensors"), "DoRA"]


def pissa(c):
    _edit_json(c.adapter / "adapter_config.json", init_lora_weights="pissa")
    return [str(c.adapter / "adapter_config.json"), "init_lora_weights='pissa' changes the base"]


def layer_replication(c):
    _edit_json(c.adapter / "adapter_config.json", layer_replication=[[0, 2]])
    return [str(c.adapter / "adapter_config.json"), "layer_replication"]


def adapter_weights_missing(c):
    (c.adapter / "adapter_model.safetensors").unlink()
    return [str(c.adapter / "adapter_model.safetensors"), "adapter weights not found"]


def adapter_pickle_not_a_zip(c):
    (c.adapter / "adapter_model.safetensors").rename(c.adapter / "adapter_model.bin")
    return [str(c.adapter / "adapter_model.bin"), "cannot read as a torch zip checkpoint with weights_only=True"]


def adapter_header_corrupt(c):
    p = c.adapter / "adapter_model.safetensors"
    raw = bytearray(p.read_bytes())
    raw[8:10] = b"\xff\xfe"
    p.write_bytes(bytes(raw))
    return [str(p), "not valid JSON"]


def adapter_truncated(c):
    p = c.adapter / "adapter_model.safetensors"
    p.write_bytes(p.read_bytes()[:-100])
    return [str(p), "truncated"]


def nan_in_lora_b(c):
    key = f"base_model.model.{Q0}.lora_B.weight"

    def poison(t):
        b = t[key].clone()
        b[3, 1] = float("nan")
        return t | {key: b}
    _edit_adapter(c, poison)
    return ["'model.layers.0.self_attn.q_proj.weight'", "NaN/inf", "--allow-nonfinite"]


def inf_in_lora_a(c):
    key = f"base_model.model.{Q0}.lora_A.weight"
    _edit_adapter(c, lambda t: t | {key: torch.full_like(t[key], float("inf"))})
    return ["'model.layers.0.self_attn.q_proj.weight'", "NaN/inf"]


def out_is_base(c):
    c.out = c.base
    return [str(c.base), "the output is the input directory"]


def out_inside_adapter(c):
    c.out = c.adapter / "merged"
    return [str(c.adapter / "merged"), "lies inside the input directory"]


def out_contains_base(c):
    c.out = c.root
    return [str(c.root), "contains the input directory"]


def out_not_empty(c):
    c.out.mkdir()
    (c.out / "keep.txt").write_text("x")
    return [str(c.out), "directory is not empty"]


def out_is_a_file(c):
    c.out.write_text("x")
    return [str(c.out), "exists and is not a directory"]


def out_parent_is_a_file(c):
    (c.root / "file").write_text("x")
    c.out = c.root / "file" / "out"
    return [str(c.out), "cannot create the output directory"]


def out_not_writable(c):
    if os.geteuid() == 0:  # root ignores permission bits; /sys refuses new entries to everyone
        c.out = Path("/sys/streammerge-test-out")
        return [str(c.out), "cannot create the output directory"]
    c.out.mkdir()
    c.out.chmod(0o500)
    return [str(c.out), "not writable"]


def disk_full(c):
    c.fsize_kib = 60  # the first shard is 74 KB: it dies with EFBIG part-way
    return [str(c.out / SHARD1), "file size limit exceeded", "--resume"]


def memory_budget_too_small(c):
    c.extra = ["--max-memory", "1KiB"]
    return ["--max-memory", "minimum working set"]


def negative_workers(c):
    c.extra = ["--workers", "-1"]
    return ["--workers -1: must be at least 1"]


CASES = {f.__name__: f for f in (
    truncated_shard, empty_shard, corrupt_header_json, header_not_an_object, oversized_header, offsets_out_of_range,
    overlapping_offsets, unknown_dtype, shape_disagrees_with_bytes, negative_shape, index_names_missing_shard,
    index_tensor_in_wrong_shard, index_path_traversal, index_absolute_path, index_not_json, index_without_weight_map,
    index_misses_a_tensor, tensor_in_two_shards, base_config_bad_json, quantized_base, quantized_tensor,
    missing_base, missing_adapter,
    different_base, missing_lora_b, lora_a_b_rank_mismatch, config_rank_disagrees, unknown_adapter_key,
    adapter_config_bad_json, adapter_config_not_object, missing_peft_type, unknown_peft_type, rank_not_a_number,
    target_modules_wrong_type, dora, pissa, layer_replication, adapter_weights_missing, adapter_pickle_not_a_zip,
    adapter_header_corrupt, adapter_truncated, nan_in_lora_b, inf_in_lora_a, out_is_base, out_inside_adapter,
    out_contains_base, out_not_empty, out_is_a_file, out_parent_is_a_file, out_not_writable, disk_full,
    memory_budget_too_small, negative_workers,
)}
#: Many problems (how many): a summary line naming the adapter, what it was trained on and the base, then one
#: line per problem, each holding every fragment.
MULTI = {"different_base": 14, "config_rank_disagrees": 14, "dora": 14}
#: After these, the output may hold what --resume needs (the progress record and finished shards).
RESUMABLE = {"disk_full"}
#: Also run as a genuine ``python -m streammerge`` process.
REAL = ("truncated_shard", "index_path_traversal", "missing_lora_b", "nan_in_lora_b", "out_is_base", "disk_full")


def _snapshot(root: Path, skip: Path | None) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            if skip is not None and p.is_relative_to(skip):
                continue
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@dataclass
class Outcome:
    case: Case
    fragments: list[str]
    code: int
    stderr: str
    before: dict[str, str]
    after: dict[str, str]
    out_before: list[str] | None
    out_after: list[str] | None


def _listing(p: Path) -> list[str] | None:
    if p.is_dir():
        return sorted(os.listdir(p))
    return ["<file>"] if p.exists() else None


def _prepare(template: Path, root: Path, name: str) -> tuple[Case, list[str], dict[str, str], list[str] | None]:
    shutil.copytree(template / "base", root / "base")
    shutil.copytree(template / "adapter", root / "adapter")
    case = Case(root, root / "base", root / "adapter", root / "out")
    fragments = CASES[name](case)
    return case, fragments, _snapshot(root, case.out if name in RESUMABLE else None), _listing(case.out)


def _outcome(name: str, prepared, code: int, stderr: str) -> Outcome:
    case, fragments, before, out_before = prepared
    after = _snapshot(case.root, case.out if name in RESUMABLE else None)
    return Outcome(case, fragments, code, stderr, before, after, out_before, _listing(case.out))


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, Outcome]:
    template = tmp_path_factory.mktemp("template")
    base = testing.make_checkpoint(template / "base", layers=2, hidden=64, intermediate=128, vocab=128, shards=3)
    testing.make_adapter(template / "adapter", base, targets=testing.LLAMA_LINEAR, r=8, alpha=16)
    done = {}
    logs = tmp_path_factory.mktemp("stderr")
    with Zygote() as zygote:
        for name in CASES:
            prepared = _prepare(template, tmp_path_factory.mktemp(name), name)
            case = prepared[0]
            fsize = case.fsize_kib * 1024 if case.fsize_kib is not None else None
            code, err = zygote.run(case.args(), stderr=logs / f"{name}.txt", fsize=fsize)
            done[name] = _outcome(name, prepared, code, err)

    def real(name: str) -> tuple[str, Outcome]:
        prepared = _prepare(template, tmp_path_factory.mktemp(f"real-{name}"), name)
        proc = subprocess.run(prepared[0].command(), capture_output=True, text=True, env=cli_env(), timeout=300)
        return f"{name}[python -m]", _outcome(name, prepared, proc.returncode, proc.stderr)

    with ThreadPoolExecutor(max_workers=2) as pool:
        done |= dict(pool.map(real, REAL))
    yield done
    for o in done.values():  # let pytest remove the temporary trees
        if o.case.out.is_dir() and not os.access(o.case.out, os.W_OK):
            o.case.out.chmod(0o700)


def test_the_corpus_is_big_enough():
    assert len(CASES) >= 30


@pytest.mark.parametrize("name", [*sorted(CASES), *(f"{n}[python -m]" for n in REAL)])
def test_bad_input_exits_2_with_named_lines_and_changes_nothing(outcomes, name):
    o = outcomes[name]
    lines = o.stderr.strip().splitlines()
    assert o.code == 2, o.stderr
    many = MULTI.get(name.removesuffix("[python -m]"), 0)
    assert len(lines) == 1 + many and lines[0].startswith("error: "), lines
    assert all(line.startswith("  ") for line in lines[1:]), lines
    assert "Traceback" not in o.stderr
    if many:
        trained_on = json.loads((o.case.adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
        assert lines[0] == (f"error: {many} problems fitting the adapter(s) {o.case.adapter} (trained on "
                            f"{trained_on!r}) to the base {o.case.base_arg or o.case.base}:")
        assert all(all(f in line for f in o.fragments) for line in lines[1:]), lines
    else:
        assert all(fragment in lines[0] for fragment in o.fragments), (o.fragments, lines[0])
    assert o.after == o.before  # every input byte unchanged
    if name.removesuffix("[python -m]") in RESUMABLE:
        return
    assert o.out_after == o.out_before  # nothing created, a pre-existing output untouched


def test_disk_full_leaves_only_what_resume_needs_and_resume_finishes(outcomes, tmp_path):
    o = outcomes["disk_full"]
    c = o.case
    progress = json.loads((c.out / manifest.PROGRESS_NAME).read_text())
    finished = {r["file"] for r in progress["shards"]}
    assert set(o.out_after) == {manifest.PROGRESS_NAME} | finished  # no temporary, no manifest
    streammerge.merge(base=c.base, adapter=c.adapter, out=c.out, device="cpu", resume=True)
    fresh = tmp_path / "fresh"
    streammerge.merge(base=c.base, adapter=c.adapter, out=fresh, device="cpu")
    assert {p.name: p.read_bytes() for p in c.out.iterdir()} == {p.name: p.read_bytes() for p in fresh.iterdir()}
