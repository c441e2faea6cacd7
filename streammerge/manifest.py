"""The completion manifest and the resume records of an output directory.

A merge writes its shards first, then config/tokenizer files and the index, and LAST
``streammerge.json``: the tool version, the identities of its inputs, the options that change
bytes, and every output file's size and digest. A directory without it is visibly incomplete.
Each file record names its digest by its key (``streammerge.digest``): ``xxh3_128_rows`` for
shards and ``xxh3_128`` for other files by default, ``sha256`` with ``--checksum sha256`` and in
every manifest written before XXH3 (those still verify and resume: a record is checked with the
digest it names).

While shards are being written, ``.streammerge-progress.json`` records each committed shard with
its *identity* (``streammerge.identity``: the SHA-256 of everything its bytes depend on).
``--resume`` keeps a shard only when its recorded identity equals the current plan's AND the file
still has the recorded size and digest; everything else is recomputed (a kept shard whose record
names another digest than this run's gets both, from one read).

Crash safety (SIGKILL at any moment): every file is written to a temporary name and renamed; the
progress record is rewritten atomically *after* its shard is renamed, so a record never names a
shard that is not complete (a complete shard without a record is simply recomputed). A resume
first writes the pruned record, then deletes the old manifest and every other file, so at every
instant the directory either has no manifest or a manifest that describes it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from streammerge import digest
from streammerge.errors import OutputError
from streammerge.identity import Identity
from streammerge.ownership import MANIFEST_NAME, PROGRESS_NAME, plain_name, remove_owned
from streammerge.ownership import entries as ownership_entries
from streammerge.plan import Plan, ShardPlan
from streammerge.writer import fsync_dir, is_temporary, output_error, write_atomic

LOG = logging.getLogger(__name__)

#: Records of parts of a merge split across processes (``streammerge.finalize``): ``<prefix><I>-of-<N>.json``.
PART_PREFIX = ".streammerge-part-"
FORMAT = "streammerge-manifest/1"


def read_json_file(path: Path) -> dict | None:
    """A JSON object file, or None when missing or unreadable as one (callers then trust nothing in it)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        LOG.warning("%s: ignored (%s)", path, e)
        return None
    return doc if isinstance(doc, dict) else None


def shard_records(doc: dict | None) -> list[dict]:
    """The well-formed shard records (file, size, sha256, identity) of a progress, part or manifest document."""
    shards = doc.get("shards") if doc else None
    if not isinstance(shards, list):
        return []
    return [r for r in shards if isinstance(r, dict) and all(isinstance(r.get(k), str) for k in ("file", "identity"))
            and isinstance(r.get("size"), int) and digest.record_digest(r) is not None]


class Progress:
    """The resume record of one output directory while a merge writes it."""

    def __init__(self, out: Path, identity: Identity, plan: Plan, kept: Mapping[str, dict],
                 checksum: str = "xxh3") -> None:
        self.out = out
        self.checksum = checksum
        self.identity = identity
        self.plan = plan
        self._ids = {s.filename: identity.shard(s) for s in plan.shards}
        self._done: dict[str, dict] = dict(kept)
        self.kept = frozenset(kept)
        self._files: list[str] = []
        self.complete = False  # set by ``start``: a resume found this merge already finished; nothing to write

    @classmethod
    def start(cls, out: Path, identity: Identity, plan: Plan, *, resume: bool, checksum: str = "xxh3") -> Progress:
        """Record a fresh start, or (``resume``) keep the shards whose identity and content still match.

        Raises:
            OutputError: ``resume`` on a non-empty directory that holds no streammerge record.
        """
        kept: dict[str, dict] = {}
        if resume:
            kept = cls._reusable(out, identity, plan, checksum)
        progress = cls(out, identity, plan, kept, checksum)
        if resume and progress._already_complete():
            return progress
        progress._save()
        if resume:
            progress._remove_others()
        return progress

    def _already_complete(self) -> bool:
        """True when ``out`` is this very merge, finished: every shard kept, every listed file intact."""
        doc = read_json_file(self.out / MANIFEST_NAME)
        if doc is None or (self.out / PROGRESS_NAME).exists() or len(self.kept) != len(self.plan.shards):
            return False
        if not same_recipe(doc, self.identity):
            return False
        mine = digest.SHARD_KEYS[self.checksum]  # records of another `checksum` are rewritten in this one
        if any((digest.record_digest(r) or ("",))[0] != mine for r in shard_records(doc)):
            return False
        files = doc.get("files")
        if not isinstance(files, list):
            return False
        for rec in files:
            name = rec.get("file") if isinstance(rec, dict) else None
            if not plain_name(name) or not (self.out / name).is_file():
                return False
            found = digest.record_digest(rec)
            if found is None or digest.stream_digest(self.out / name, found[0]) != found[1]:
                return False
        self.complete = True
        return True

    @classmethod
    def _reusable(cls, out: Path, identity: Identity, plan: Plan, checksum: str) -> dict[str, dict]:
        names = _entries(out)
        for name in names:
            if is_temporary(name):
                _unlink(out / name)
        names = [n for n in names if not is_temporary(n)]
        progress, manifest = read_json_file(out / PROGRESS_NAME), read_json_file(out / MANIFEST_NAME)
        if names and progress is None and manifest is None and not any(n.startswith(PART_PREFIX) for n in names):
            raise OutputError(
                f"{out}: `resume` found no {PROGRESS_NAME} or {MANIFEST_NAME}, so this is not a streammerge output "
                "to resume; choose a new or empty `out`"
            )
        candidates: dict[str, list[dict]] = {}
        parts = [read_json_file(out / n) for n in names if n.startswith(PART_PREFIX) and n.endswith(".json")]
        for rec in [r for doc in (progress, manifest, *parts) for r in shard_records(doc)]:
            candidates.setdefault(rec["file"], []).append(rec)
        kept = {}
        for shard in plan.shards:
            want = identity.shard(shard)
            size = len(shard.header) + shard.data_size
            recs = [r for r in candidates.get(shard.filename, ()) if r["identity"] == want and r["size"] == size]
            path = out / shard.filename
            if recs and path.is_file() and path.stat().st_size == size:
                got: dict[str, str] = {}
                for rec in recs:  # each record is checked with the digest it names (sha256 before XXH3)
                    key, value = digest.record_digest(rec)  # type: ignore[misc]
                    if key not in got:
                        got[key] = digest.file_digest(path, key, shard)
                    if got[key] == value:
                        mine = digest.SHARD_KEYS[checksum]
                        kept[shard.filename] = {"file": shard.filename, "size": size,
                                                mine: got.get(mine) or digest.file_digest(path, mine, shard),
                                                "identity": want}
                        break
                if shard.filename in kept:
                    continue
            LOG.debug("resume: %s will be recomputed", shard.filename)
        LOG.info("resume: keeping %d of %d shard(s)", len(kept), len(plan.shards))
        return kept

    def _remove_others(self) -> None:
        """Delete what streammerge wrote, but the kept shards and the progress record (a fresh run would not
        have it). The manifest goes first. Files streammerge did not write are never touched (the caller
        refused to start when there were any)."""
        remove_owned(self.out, keep=self.kept | {PROGRESS_NAME})

    def expect_files(self, names: Iterable[str]) -> None:
        """Record the side files about to be written, so that ``--overwrite`` knows them as ours if we stop."""
        self._files = sorted(set(names))
        self._save()

    def record(self, shard: ShardPlan, digests: Mapping[str, str]) -> None:
        """Note ``shard`` as committed (called after its file was renamed into place) with its digest
        (``{key: hex}``, ``streammerge.digest``)."""
        size = len(shard.header) + shard.data_size
        self._done[shard.filename] = {"file": shard.filename, "size": size, **digests,
                                      "identity": self._ids[shard.filename]}
        self._save()

    def _save(self) -> None:
        doc = {"format": FORMAT, "complete": False, "sources": self.identity.sources, "options": self.identity.options,
               "shards": [self._done[s.filename] for s in self.plan.shards if s.filename in self._done],
               "files": [{"file": n} for n in self._files],
               # every name this run may write, so that --overwrite/--resume know them as streammerge's even
               # when a kill came between a shard's rename and its record
               "planned": [{"file": s.filename} for s in self.plan.shards]}
        write_atomic(self.out / PROGRESS_NAME, (json.dumps(doc, indent=2) + "\n").encode("utf-8"))

    def finish(self, files: Iterable[str], warnings: Sequence[str] = ()) -> dict:
        """Write the manifest (last), then drop the progress record. Returns the manifest.

        ``warnings`` (e.g. an unmerge forced past a check) are recorded in it for whoever reads it later."""
        key = digest.FILE_KEYS[self.checksum]
        missing = [s.filename for s in self.plan.shards if s.filename not in self._done]
        if missing:  # an internal invariant: write_shards wrote every shard not kept
            raise AssertionError(f"shards not written: {missing}")
        doc = {
            "format": FORMAT,
            "tool": {"name": "streammerge", "version": self.identity.tool},
            "inputs": self.identity.inputs,
            "sources": self.identity.sources,
            "options": self.identity.options,
            "shards": [self._done[s.filename] for s in self.plan.shards],
            "files": [{"file": n, "size": (self.out / n).stat().st_size,
                       key: digest.stream_digest(self.out / n, key)} for n in files],
        }
        if warnings:
            doc["warnings"] = list(warnings)
        write_atomic(self.out / MANIFEST_NAME, (json.dumps(doc, indent=2) + "\n").encode("utf-8"))
        _unlink(self.out / PROGRESS_NAME)
        fsync_dir(self.out)
        return doc


def same_recipe(doc: Mapping[str, object], identity: Identity) -> bool:
    """True when a manifest ``doc`` records the inputs and options of ``identity`` (the tool version aside)."""
    want = json.loads(json.dumps({"inputs": identity.inputs, "options": identity.options}))
    return {"inputs": doc.get("inputs"), "options": doc.get("options")} == want


def check_resumable(out: Path, identity: Identity, *, overwrite: bool) -> bool:
    """Whether a resume may keep anything in ``out``: False when it holds a complete output of other inputs or
    options and ``overwrite`` allows replacing it. Without ``overwrite`` such an output is refused, untouched.

    Raises:
        OutputError: a complete output of other inputs or options, and no ``overwrite``.
    """
    doc = read_json_file(out / MANIFEST_NAME)
    if doc is None or (out / PROGRESS_NAME).exists() or same_recipe(doc, identity):
        return True
    if overwrite:
        LOG.info("resume: %s holds a complete output of other inputs or options; replacing it (overwrite)", out)
        return False
    raise OutputError(
        f"{out}: holds a complete streammerge output made from other inputs or options "
        f"({recipe_difference(doc, identity)}); `resume` does not replace it: pass `overwrite` as well "
        "to replace it, or choose another `out`"
    )


def recipe_difference(doc: Mapping[str, object], identity: Identity) -> str:
    """What differs between a manifest and ``identity``, in a few words (for an error message)."""
    want = json.loads(json.dumps({"inputs": identity.inputs, "options": identity.options}))
    inputs = doc.get("inputs") if isinstance(doc.get("inputs"), dict) else {}
    what = [k for k in ("base", "adapters") if inputs.get(k) != want["inputs"][k]]
    options = doc.get("options") if isinstance(doc.get("options"), dict) else {}
    what += [f"option {k}" for k in sorted(set(options) | set(want["options"]))
             if options.get(k) != want["options"].get(k)]
    return ", ".join(what) or "the recorded inputs"


def recorded_checksum(out: Path) -> str | None:
    """The ``--checksum`` the records in ``out`` were written with (progress record first), or None."""
    by_key = {key: name for name, key in digest.SHARD_KEYS.items()}
    for name in (PROGRESS_NAME, MANIFEST_NAME):
        for rec in shard_records(read_json_file(out / name)):
            return by_key.get(digest.record_digest(rec)[0])  # type: ignore[index]
    return None


def recorded_run(out: Path) -> tuple[dict, dict] | None:
    """``(sources, options)`` that the progress record (or else the manifest, or a part's record) of ``out``
    recorded, or None."""
    parts = sorted(n for n in _entries(out) if n.startswith(PART_PREFIX) and n.endswith(".json"))
    for name in (PROGRESS_NAME, MANIFEST_NAME, *parts):
        doc = read_json_file(out / name)
        if doc and isinstance(doc.get("sources"), dict) and isinstance(doc.get("options"), dict):
            return doc["sources"], doc["options"]
    return None


def remove_temporaries(out: Path) -> None:
    """Best effort, after a failure: delete temporary files of an interrupted writer (never a final name)."""
    with contextlib.suppress(OSError):
        for name in os.listdir(out):
            if is_temporary(name):
                with contextlib.suppress(OSError):
                    os.unlink(out / name)


def _entries(out: Path) -> list[str]:
    return ownership_entries(out)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as e:
        raise output_error(path, e) from e
