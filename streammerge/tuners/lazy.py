"""``torch`` for the tuner files, imported on first use.

The planner reads the tuners' ``plan`` hooks (headers and configs only) through ``TUNERS``; importing torch
there would cost every merge ~1-2 s before its plan exists, and a bad adapter would wait for it too. The
numeric hooks (``apply``/``invert``) run on the workers, after the writing has started (``scatter``).
"""

from __future__ import annotations

import importlib
from typing import Any


class _Torch:
    """Forwards every attribute to the ``torch`` module, which is imported by the first access."""

    __slots__ = ("_module",)

    def __init__(self) -> None:
        self._module: Any = None

    def __getattr__(self, name: str) -> Any:
        module = self._module
        if module is None:
            module = self._module = importlib.import_module("torch")
        return getattr(module, name)


torch: Any = _Torch()
