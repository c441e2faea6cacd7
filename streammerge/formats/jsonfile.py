"""Read the JSON documents of a model or adapter directory, with errors that name the file."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


def read_json(path: Path, error: type[Exception], *, missing_ok: bool = False,
              object_pairs_hook: Callable[[list[tuple[str, object]]], dict] | None = None) -> dict:
    """Load a JSON object file, raising ``error`` with the file name on any problem.

    ``object_pairs_hook`` is ``json.loads``'s (e.g. to refuse a key given twice); it may raise ``error`` itself.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if missing_ok:
            return {}
        raise error(f"{path}: file not found") from None
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from e
    try:
        doc = json.loads(text, object_pairs_hook=object_pairs_hook)
    except json.JSONDecodeError as e:
        raise error(
            f"{path}: invalid JSON at line {e.lineno} column {e.colno} ({e.msg}); fix or re-create the file"
        ) from e
    if not isinstance(doc, dict):
        raise error(f"{path}: expected a JSON object, found {type(doc).__name__}")
    return doc
