"""``verify``'s checks of an output directory's files (not their tensor bytes): the manifest records these
inputs and this plan, every file it lists has its recorded digest, no stray shard, temporary file or
progress record is left, and the index is the plan's. Problems are collected in :class:`Findings`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from streammerge import digest, manifest
from streammerge.checkpoint import INDEX_NAME
from streammerge.identity import Identity
from streammerge.plan import Plan
from streammerge.writer import is_temporary

_MAX_PROBLEMS = 50  # a report lists at most this many problems (and counts the rest)


class Findings:
    """Problems ``verify`` found so far (bounded list, full count)."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self.count = 0

    def add(self, text: str) -> None:
        self.count += 1
        if len(self.items) < _MAX_PROBLEMS:
            self.items.append(text)

    def result(self) -> tuple[str, ...]:
        more = self.count - len(self.items)
        return (*self.items, f"... and {more} more") if more else tuple(self.items)


def check_manifest(out: Path, doc: dict, identity: Identity, plan: Plan, found: Findings) -> None:
    """The manifest's format, inputs, shard list and (same tool version) each shard's identity."""
    where = out / manifest.MANIFEST_NAME
    if doc.get("format") != manifest.FORMAT:
        found.add(f"{where}: format {doc.get('format')!r} is not {manifest.FORMAT!r}")
    inputs = doc.get("inputs")
    if inputs != json.loads(json.dumps(identity.inputs)):
        found.add(f"{where}: records other inputs than the base and adapter given ({_input_diff(inputs, identity)}); "
                  "was this directory merged from them?")
    recorded = {r.get("file"): r for r in doc.get("shards") or [] if isinstance(r, dict)}
    if sorted(recorded) != sorted(s.filename for s in plan.shards):
        found.add(f"{where}: lists shards {sorted(map(str, recorded))}, the plan has "
                  f"{sorted(s.filename for s in plan.shards)}")
    same_tool = (doc.get("tool") or {}).get("version") == identity.tool
    for shard in plan.shards:
        rec = recorded.get(shard.filename)
        if rec is not None and same_tool and rec.get("identity") != identity.shard(shard):
            found.add(f"{where}: shard {shard.filename} was recorded for another plan (identity differs)")


def _input_diff(inputs: object, identity: Identity) -> str:
    if not isinstance(inputs, dict):
        return "no inputs recorded"
    want = json.loads(json.dumps(identity.inputs))
    if inputs.get("adapters") != want["adapters"]:
        return "the adapter files differ"
    return "the base files differ"


def check_files(out: Path, doc: dict, plan: Plan, found: Findings) -> None:
    """Stray files, listed side files' checksums, and the index text."""
    expected = {s.filename for s in plan.shards} | {manifest.MANIFEST_NAME}
    for rec in doc.get("files") or []:
        name = rec.get("file") if isinstance(rec, dict) else None
        if not isinstance(name, str) or "/" in name or name.startswith("."):
            found.add(f"{out / manifest.MANIFEST_NAME}: bad file entry {rec!r}")
            continue
        expected.add(name)
        path = out / name
        if not path.is_file():
            found.add(f"{path}: listed in the manifest but missing")
        elif (named := digest.record_digest(rec)) is None:
            found.add(f"{out / manifest.MANIFEST_NAME}: file entry {name!r} has no digest")
        elif digest.stream_digest(path, named[0]) != named[1]:
            found.add(f"{path}: content differs from the manifest's {named[0]} (modified after the merge?)")
    for name in sorted(os.listdir(out)):
        if name == manifest.PROGRESS_NAME or is_temporary(name):
            found.add(f"{out / name}: left by an unfinished merge; rerun the merge with `resume`")
        elif name not in expected and (name.endswith(".safetensors") or name in (INDEX_NAME, plan.index_name)):
            found.add(f"{out / name}: not part of this merge's output")
    index = out / plan.index_name
    if plan.write_index:
        if not index.is_file():
            found.add(f"{index}: missing")
        elif index.read_text(encoding="utf-8", errors="replace") != plan.index_json():
            found.add(f"{index}: differs from the index of this merge (weight_map or total_size)")
