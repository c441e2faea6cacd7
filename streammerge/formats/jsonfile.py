"""Read the JSON documents of a model or adapter directory, with errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path


def read_json(path: Path, error: type[Exception], *, missing_ok: bool = False) -> dict:
    """Load a JSON object file, raising ``error`` with the file name on any problem."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if missing_ok:
            return {}
        raise error(f"{path}: file not found") from None
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from e
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise error(
            f"{path}: invalid JSON at line {e.lineno} column {e.colno} ({e.msg}); fix or re-create the file"
        ) from e
    if not isinstance(doc, dict):
        raise error(f"{path}: expected a JSON object, found {type(doc).__name__}")
    return doc
