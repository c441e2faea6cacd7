"""streammerge: fold PEFT LoRA adapters into safetensors checkpoints, streaming, in bounded memory.

Library use::

    import streammerge
    report = streammerge.merge(base="Llama-3-8B", adapter="my-lora", out="merged")
    for name, tensor in streammerge.iter_merged(base="Llama-3-8B", adapter="my-lora"):
        ...

The names below are imported on first use, so ``python -m streammerge`` can install its signal
handlers (``streammerge.interrupts``) before torch is imported.
"""

from __future__ import annotations

import importlib
import sys
import types

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: start-up stays minimal

_WHERE = {
    "MergeReport": "api", "iter_merged": "api", "merge": "api", "plan_merge": "api", "plan_unmerge": "api",
    "unmerge": "api", "Plan": "plan", "VerifyReport": "verify", "verify": "verify",
    "AdapterError": "errors", "BudgetError": "errors", "CheckpointError": "errors", "NonFiniteError": "errors",
    "OutputError": "errors", "PlanError": "errors", "StreamMergeError": "errors", "UnsupportedAdapterError": "errors",
}

if TYPE_CHECKING:
    from streammerge.api import MergeReport, iter_merged, merge, plan_merge, plan_unmerge, unmerge
    from streammerge.errors import (
        AdapterError,
        BudgetError,
        CheckpointError,
        NonFiniteError,
        OutputError,
        PlanError,
        StreamMergeError,
        UnsupportedAdapterError,
    )
    from streammerge.plan import Plan
    from streammerge.verify import VerifyReport, verify


class _Package(types.ModuleType):
    """Keeps ``streammerge.verify`` the function: importing the submodule ``streammerge.verify`` would
    otherwise replace the package attribute with the module (the eager imports used to shadow it)."""

    def __setattr__(self, name: str, value: object) -> None:
        if name in _WHERE and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> object:
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            value = version("streammerge")
        except PackageNotFoundError:  # running from a source tree that is not installed
            value = "0+unknown"
        globals()[name] = value
        return value
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'streammerge' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"streammerge.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])


__all__ = [
    "AdapterError",
    "BudgetError",
    "CheckpointError",
    "MergeReport",
    "NonFiniteError",
    "OutputError",
    "Plan",
    "PlanError",
    "StreamMergeError",
    "UnsupportedAdapterError",
    "VerifyReport",
    "__version__",
    "iter_merged",
    "merge",
    "plan_merge",
    "plan_unmerge",
    "unmerge",
    "verify",
]
