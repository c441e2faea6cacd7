"""Parts writing one shared output directory, and the step that seals it (``finalize``).

Protocol (no locks, no collectives; see ``streammerge.parts`` for the assignment):

* A part writes only its own shards, each through the atomic path of ``writer`` (a temporary
  name, then ``rename``), and its own record ``.streammerge-part-<I>-of-<N>.json``, rewritten
  atomically after every committed shard with that shard's size, digest (``streammerge.digest``) and *identity*
  (``identity.Identity.shard``: tool version, inputs, byte-changing options, header, tasks). The
  record also holds the inputs' paths and the recorded options (``sources``, ``options``: what a
  progress record holds), from which ``finalize`` rebuilds the plan. A part never writes the
  index, config, tokenizer files or the manifest, and never deletes a file of another part (only
  the temporaries of its own shards).
* Rerunning a part is always safe: the ``--resume`` rules keep each of its shards whose recorded
  identity and size match and whose file still hashes to the recorded SHA-256; the rest are
  rewritten.
* ``finalize`` rebuilds the plan from the recorded inputs and options, then checks that every shard of the
  plan is present, with the size and identity the plan expects, in some record. A shard that is
  absent is *missing*; one present under another identity (its part ran with other inputs or
  options, or the inputs changed since) is *stale*. Either way it names the shards and the parts
  to rerun and writes nothing. When all are there it writes config/tokenizer files, the index and,
  last, the manifest — the same bytes a one-process merge writes — then deletes the part records.
  It trusts the SHA-256 each part computed as it wrote (``verify`` re-reads everything).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from streammerge import budget, digest, manifest, parts, scatter
from streammerge.errors import OutputError
from streammerge.identity import Identity
from streammerge.manifest import MANIFEST_NAME, PART_PREFIX, PROGRESS_NAME
from streammerge.parts import Part
from streammerge.plan import Plan, ShardPlan
from streammerge.writer import fsync_dir, is_temporary, write_atomic

LOG = logging.getLogger(__name__)

PART_FORMAT = "streammerge-part/1"
#: The record a part leaves when it reopens a finalized directory (it keeps the manifest's shard records).
SEALED_NAME = f"{PART_PREFIX}sealed.json"


class IncompleteError(OutputError):
    """``finalize`` found shards missing or stale; ``missing``/``stale`` name them."""

    def __init__(self, message: str, missing: Sequence[str], stale: Sequence[str]) -> None:
        super().__init__(message)
        self.missing = tuple(missing)
        self.stale = tuple(stale)


def record_name(part: Part) -> str:
    return f"{PART_PREFIX}{part.index}-of-{part.count}.json"


def record_paths(out: Path) -> list[Path]:
    """The part records in ``out`` (sorted by name); none when ``out`` is not a directory."""
    try:
        names = sorted(os.listdir(out))
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as e:
        raise OutputError(f"{out}: cannot list the output directory ({e.strerror or e})") from e
    return [out / n for n in names if n.startswith(PART_PREFIX) and n.endswith(".json") and not is_temporary(n)]


def read_records(out: Path) -> list[dict]:
    """The part records of ``out`` that are readable JSON objects (others are ignored with a warning)."""
    docs = [manifest.read_json_file(p) for p in record_paths(out)]
    return [d for d in docs if d is not None and d.get("format") == PART_FORMAT]


def _shard_records(out: Path) -> dict[str, list[dict]]:
    """Every shard record in ``out`` (part records, the one-process progress record, the manifest), by file."""
    docs = [*read_records(out), *(manifest.read_json_file(out / n) for n in (PROGRESS_NAME, MANIFEST_NAME))]
    found: dict[str, list[dict]] = {}
    for doc in docs:
        for rec in manifest.shard_records(doc):
            found.setdefault(rec["file"], []).append(rec)
    return found


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


def _match(out: Path, shard: ShardPlan, want: str, records: Mapping[str, list[dict]], *, rehash: bool) -> dict | None:
    """The record under which ``shard``'s file in ``out`` is the plan's shard, or None."""
    size = len(shard.header) + shard.data_size
    recs = [r for r in records.get(shard.filename, ()) if r["identity"] == want and r["size"] == size]
    if not recs or _size(out / shard.filename) != size:
        return None
    if not rehash:
        return dict(recs[0])
    got: dict[str, str] = {}
    for rec in recs:  # each record is checked with the digest it names (``streammerge.digest``)
        key, value = digest.record_digest(rec)  # type: ignore[misc]
        if key not in got:
            got[key] = digest.file_digest(out / shard.filename, key, shard)
        if got[key] == value:
            return dict(rec)
    return None


def check_part_output(out: Path) -> None:
    """A part may write into a missing or empty directory, or one that holds streammerge records."""
    try:
        names = [n for n in os.listdir(out) if not is_temporary(n)]
    except FileNotFoundError:
        return
    except OSError as e:
        raise OutputError(f"{out}: cannot list the output directory ({e.strerror or e})") from e
    ours = any(n.startswith(PART_PREFIX) or n in (PROGRESS_NAME, MANIFEST_NAME) for n in names)
    if names and not ours:
        raise OutputError(f"{out}: directory is not empty and holds no streammerge record; parts write only into a "
                          "new or empty `out`, or one that other parts of the same merge are writing")


@dataclass
class PartRecord:
    """The record of one part while it writes (see the module docstring)."""

    out: Path
    part: Part
    identity: Identity
    shards: tuple[ShardPlan, ...]
    done: dict[str, dict]

    def save(self, *, complete: bool = False) -> None:
        doc = {"format": PART_FORMAT, "part": self.part.index, "parts": self.part.count, "complete": complete,
               "sources": dict(self.identity.sources), "options": dict(self.identity.options),
               "assigned": [s.filename for s in self.shards],
               # listed before any is written, so a concurrent part (or --overwrite) knows them as streammerge's
               "planned": [{"file": s.filename} for s in self.shards],
               "shards": [self.done[s.filename] for s in self.shards if s.filename in self.done]}
        write_atomic(self.out / record_name(self.part), (json.dumps(doc, indent=2) + "\n").encode("utf-8"))

    def record(self, shard: ShardPlan, digests: Mapping[str, str]) -> None:
        """``scatter.write_shards``'s ``on_shard``: note ``shard`` as committed with its digest (``{key: hex}``)."""
        self.done[shard.filename] = {"file": shard.filename, "size": len(shard.header) + shard.data_size,
                                     **digests, "identity": self.identity.shard(shard)}
        self.save()


def start_part(out: Path, plan: Plan, identity: Identity, part: Part) -> PartRecord | None:
    """Prepare ``out`` for ``part``: keep its shards that still match (resume rules), record the rest as to do.
    None: ``out`` is finalized and every shard of the part still matches (nothing to do, nothing written)."""
    check_part_output(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{out}: cannot create the output directory ({e.strerror or e}); choose another `out`") from e
    shards = parts.shards_of(plan, part)
    _remove_temporaries(out, shards)
    records = _shard_records(out)
    kept = {}
    for shard in shards:
        rec = _match(out, shard, identity.shard(shard), records, rehash=True)
        if rec is not None:
            kept[shard.filename] = rec
    LOG.info("part %s: %d shard(s) assigned, %d kept from an earlier run", part, len(shards), len(kept))
    if (out / MANIFEST_NAME).exists():
        if len(kept) == len(shards):
            LOG.info("part %s: %s is finalized and this part's shards still match; nothing to do", part, out)
            return None
        _unseal(out, identity)
    rec = PartRecord(out, part, identity, tuple(shards), kept)
    rec.save()
    return rec


def write_part(out: Path, plan: Plan, identity: Identity, part: Part, opts: budget.ExecOptions,
               on_progress: Callable[[int], None] | None, checksum: str = "xxh3") -> tuple[int, int]:
    """Write the shards of ``part`` not already there. Returns (bytes of its shards, number of shards)."""
    rec = start_part(out, plan, identity, part)
    if rec is None:
        mine = parts.shards_of(plan, part)
        size = sum(len(s.header) + s.data_size for s in mine)
        if on_progress is not None and size:
            on_progress(size)
        return size, len(mine)
    todo = [s for s in rec.shards if s.filename not in rec.done]
    kept_bytes = sum(r["size"] for r in rec.done.values())
    if on_progress is not None and kept_bytes:
        on_progress(kept_bytes)
    try:
        written = scatter.write_shards(todo, out, opts, on_progress, on_shard=rec.record, checksum=checksum)
    except BaseException:
        _remove_temporaries(out, rec.shards)
        raise
    rec.save(complete=True)
    LOG.info("part %s: done (%d shard(s) written, %d kept); run `streammerge finalize --out %s` once every part is",
             part, len(todo), len(rec.done) - len(todo), out)
    return written + kept_bytes, len(rec.shards)


def _remove_temporaries(out: Path, shards: Sequence[ShardPlan]) -> None:
    """Delete temporaries an interrupted run of this part left (never another part's)."""
    prefixes = tuple(f".{s.filename}." for s in shards)
    with contextlib.suppress(OSError):
        for name in os.listdir(out):
            if is_temporary(name) and name.startswith(prefixes):
                with contextlib.suppress(OSError):
                    os.unlink(out / name)


def _unseal(out: Path, identity: Identity) -> None:
    """A part is about to change a finalized directory: carry the manifest's shard records into a
    record of their own, then delete the manifest (it would no longer describe the directory)."""
    doc = manifest.read_json_file(out / MANIFEST_NAME)
    sealed = {"format": PART_FORMAT, "part": None, "parts": None, "complete": True,
              "sources": dict(identity.sources), "options": dict(identity.options), "assigned": [],
              "shards": manifest.shard_records(doc),
              # the side files the manifest listed stay streammerge's (``ownership``) until finalize rewrites them
              "files": [r for r in (doc or {}).get("files") or [] if isinstance(r, dict)]}
    write_atomic(out / SEALED_NAME, (json.dumps(sealed, indent=2) + "\n").encode("utf-8"))
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    fsync_dir(out)
    LOG.info("%s: reopened a finalized output (its manifest is removed until finalize)", out)


def check_complete(out: Path, plan: Plan, identity: Identity, count: int | None) -> dict[str, dict]:
    """The record of every shard of ``plan`` in ``out``; raises :class:`IncompleteError` naming
    missing and stale shards (and, given ``count``, the parts that write them)."""
    records = _shard_records(out)
    found, missing, stale = {}, [], []
    for shard in plan.shards:
        want = identity.shard(shard)
        rec = _match(out, shard, want, records, rehash=False)
        if rec is not None:
            found[shard.filename] = rec
        elif records.get(shard.filename) and all(r["identity"] != want for r in records[shard.filename]):
            stale.append(shard.filename)  # written, but for other inputs or options
        else:
            missing.append(shard.filename)  # never written, not recorded, or gone since
    if missing or stale:
        raise IncompleteError(_incomplete(out, plan, count, missing, stale), missing, stale)
    return found


def _incomplete(out: Path, plan: Plan, count: int | None, missing: Sequence[str], stale: Sequence[str]) -> str:
    owners = parts.owner(plan, count) if count else {}

    def named(files: Sequence[str]) -> str:
        return ", ".join(f"{f} (part {owners[f]}/{count})" if f in owners else f for f in files)

    bits = []
    if missing:
        bits.append(f"{len(missing)} shard(s) missing: {named(missing)}")
    if stale:
        bits.append(f"{len(stale)} shard(s) stale (written for other inputs or options than the plan's): "
                    f"{named(stale)}")
    todo = sorted({owners[f] for f in (*missing, *stale) if f in owners})
    rerun = f"rerun --part {', '.join(f'{i}/{count}' for i in todo)}" if todo else "rerun the parts that write them"
    return f"{out}: cannot finalize: {'; '.join(bits)}; {rerun} (or `merge --resume` to write them here), then finalize"


def seal(out: Path, plan: Plan, identity: Identity, found: Mapping[str, dict],
         write_files: Callable[[], list[str]]) -> dict:
    """Write side files and index (``write_files``), then the manifest last; drop the part records."""
    files = write_files()
    # the manifest digests the side files as the parts digested their shards (sha256 only when all did)
    keys = {digest.record_digest(r)[0] for r in found.values()}  # type: ignore[index]
    checksum = "sha256" if keys == {"sha256"} else "xxh3"
    progress = manifest.Progress(out, identity, plan, found, checksum)
    doc = progress.finish(files)
    for path in record_paths(out):
        path.unlink(missing_ok=True)
    fsync_dir(out)
    return doc


def recorded_run(out: Path) -> tuple[dict, dict, int | None]:
    """``(sources, options, N)`` the part records of ``out`` hold (N None when they disagree on it)."""
    docs = read_records(out)
    if not docs:
        if (out / MANIFEST_NAME).is_file():
            raise OutputError(f"{out}: already finalized ({MANIFEST_NAME} is there and no part records are left)")
        raise OutputError(f"{out}: no part records (.streammerge-part-*.json); run the parts "
                          "(`streammerge merge ... --part I/N`) into this `out` first")
    counts = {d.get("parts") for d in docs if d.get("parts") is not None}
    usable = [d for d in docs if isinstance(d.get("sources"), dict) and isinstance(d.get("options"), dict)
              and isinstance(d["sources"].get("base"), str) and isinstance(d["sources"].get("adapters"), list)]
    if not usable:
        raise OutputError(f"{out}: the part records name no inputs; rerun one part, then finalize")
    doc = next((d for d in usable if d.get("part") is not None), usable[0])
    return doc["sources"], doc["options"], counts.pop() if len(counts) == 1 else None
