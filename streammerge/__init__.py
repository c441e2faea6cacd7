"""streammerge: fold PEFT LoRA adapters into safetensors checkpoints, streaming, in bounded memory.

Library use::

    import streammerge
    report = streammerge.merge(base="Llama-3-8B", adapter="my-lora", out="merged")
    for name, tensor in streammerge.iter_merged(base="Llama-3-8B", adapter="my-lora"):
        ...
"""

from importlib.metadata import PackageNotFoundError, version

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

try:
    __version__ = version("streammerge")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

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
