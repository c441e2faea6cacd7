"""Byte counts as people read and type them: decimal units (kB, MB, GB, TB: powers of 1000), everywhere.

Hugging Face's ``max_shard_size="5GB"`` means 5·10⁹ bytes, so streammerge prints and defaults in the same
units: summaries, the progress bar, plan and budget messages. Binary units (KiB, MiB, GiB) are still
accepted as input (``512MiB`` = 512·2²⁰ bytes) but never printed.
"""

from __future__ import annotations

import re

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_PRINTED = ((10**12, "TB"), (10**9, "GB"), (10**6, "MB"), (10**3, "kB"))


def parse_size(text: str) -> int:
    """``5GB`` → 5·10⁹ bytes, ``512MiB`` → 512·2²⁰, ``1000`` → 1000.

    Raises:
        ValueError: not a size, or less than one byte (the message says what to write instead).
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", text.upper())
    if not m:
        raise ValueError(f"{text!r} is not a size; use e.g. 5GB, 512MB, 1GiB or a byte count")
    value = float(m.group(1)) * _UNITS[m.group(2) or ""]
    if value < 1:
        raise ValueError(f"{text!r} must be at least one byte")
    return int(value)


def format_size(n: int | float) -> str:
    """``536870912`` → ``'537 MB'``; three significant digits, decimal units; ``'0 B'`` … ``'999 B'`` exact."""
    for scale, unit in _PRINTED:
        if abs(n) >= scale:
            value = n / scale
            digits = 0 if value >= 100 else 1 if value >= 10 else 2
            return f"{value:.{digits}f} {unit}"
    return f"{int(n)} B"


def ceil_size(n: int) -> str:
    """``n`` rounded up to a tenth of the unit ``format_size`` picks (a hundredth below 10 units), written as an
    option value (``81920`` → ``'82kB'``): what to pass when ``n`` bytes are needed."""
    for scale, unit in _PRINTED:
        if n >= scale:
            step = scale // 10 if n >= 10 * scale else scale // 100
            step = max(step, 1)
            return f"{-(-n // step) * step / scale:g}{unit}"
    return f"{n}B"
