"""Which files in an output directory streammerge wrote, and so may delete: nothing else is ever touched.

streammerge's own files are its records (``streammerge.json``; ``.streammerge-*`` such as the progress
record), every file those records list (shards, side files, and the names a run *planned*, so that a run
killed between a rename and its record still knows its shard), and its temporaries (``.<name>.<random>.tmp``).
``--overwrite`` and ``--resume`` delete only these; anything else in ``--out`` (a user's notes, a
sub-directory) makes them refuse, naming it (``output.check_output``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from streammerge.writer import fsync_dir, is_temporary, output_error

MANIFEST_NAME = "streammerge.json"
PROGRESS_NAME = ".streammerge-progress.json"
RECORD_PREFIX = ".streammerge-"  # the progress record, and any other record a run keeps beside its files


def plain_name(name: object) -> bool:
    """A bare file name (no directory part): the only kind a record may list."""
    return isinstance(name, str) and bool(name) and "/" not in name and name not in (".", "..")


def entries(out: Path) -> list[str]:
    """The names in ``out`` (sorted; none when it does not exist)."""
    try:
        return sorted(os.listdir(out))
    except FileNotFoundError:
        return []
    except OSError as e:
        raise output_error(out, e) from e


def _listed(record: Path) -> set[str]:
    try:
        doc = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return set()  # an unreadable record vouches for nothing
    names = set()
    for key in ("shards", "files", "planned"):
        recs = doc.get(key) if isinstance(doc, dict) else None
        for rec in recs if isinstance(recs, list) else ():
            name = rec.get("file") if isinstance(rec, dict) else None
            if plain_name(name):
                names.add(name)
    return names


def _is_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def owned_names(out: Path, listing: Iterable[str] | None = None) -> set[str]:
    """The entries of ``out`` (or of ``listing``, one listing of it) that streammerge wrote. Directories are never
    streammerge's."""
    names = set(entries(out) if listing is None else listing)
    owned = {n for n in names if n == MANIFEST_NAME or n.startswith(RECORD_PREFIX) or is_temporary(n)}
    for record in sorted(n for n in owned if n.endswith(".json")):
        owned |= _listed(out / record)
    return {n for n in owned & names if not _is_dir(out / n)}


def foreign_names(out: Path) -> list[str]:
    """Entries of ``out`` streammerge did not write (sorted; a directory ends with ``/``).

    One listing is judged: another process writing parts into ``out`` creates temporaries at any moment, and a
    second listing would show it one the first (the owned set) never saw."""
    names = entries(out)
    owned = owned_names(out, names)
    return [n + ("/" if _is_dir(out / n) else "") for n in names if n not in owned]


def remove_owned(out: Path, keep: Iterable[str] = ()) -> None:
    """Delete what streammerge wrote in ``out`` except ``keep``: the manifest first, so that the directory
    never holds a manifest that does not describe it. Other files are left alone."""
    doomed = sorted(owned_names(out) - set(keep), key=lambda n: n != MANIFEST_NAME)
    for name in doomed:
        try:
            (out / name).unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            raise output_error(out / name, e) from e
    fsync_dir(out)
