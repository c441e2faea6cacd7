"""Tasks for a quantized base (``Checkpoint.quant``): which stored tensors are decoded, re-encoded or copied. Pure.

Two modes (``PlanOptions.dequantize``):

* ``--dequantize``: every quantized weight is decoded to the model dtype (``config.json`` ``torch_dtype``,
  bf16 when unset) and merged there, exactly as a loader that dequantizes and PEFT's merge would do; its
  companions (scales) and static activation scales are dropped and ``quantization_config`` is removed from the
  output config: a plain checkpoint, as transformers' dequantizing load + ``save_pretrained`` writes it.
* keep the format (default): untouched weights and their companions are raw copies (byte-identical). A weight
  the adapter touches is decoded, merged in the model dtype, and encoded back in the base's own scheme with
  fresh scales; each of its companions becomes a ``rescale`` task that walks the same merged row blocks.
  ``quantization_config`` is kept (``BaseFormat.output_config``).
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

from streammerge.errors import PlanError
from streammerge.formats.base import CODES, QuantIndex
from streammerge.formats.refs import TensorRef
from streammerge.plan.types import QuantSource, TensorTask


@dataclass(frozen=True, slots=True)
class QuantSummary:
    """The base's quantization as the plan treats it (for ``--dry-run`` and the report)."""

    format: str  # registry name, e.g. "fp8-block"
    dequantize: bool
    stored: tuple[str, ...]  # every quantized stored tensor of the base (codes, companions, activation scales)

    def counts(self, tasks: tuple[TensorTask, ...]) -> dict[str, int]:
        """Quantized stored tensors dequantized / re-quantized / copied raw / dropped (companions of a decode)."""
        stored = set(self.stored)
        out = dict.fromkeys(("dequantized", "re-quantized", "copied", "dropped"), 0)
        seen = set()
        for t in tasks:
            if t.quant is not None:
                out["re-quantized" if t.quant.encode else "dequantized"] += 1
            elif t.name in stored and t.is_raw_copy:
                out["copied"] += 1
            seen.add(t.name)
        out["dropped"] = len(stored - seen)
        return out

    def line(self, tasks: tuple[TensorTask, ...]) -> str:
        c = self.counts(tasks)
        mode = "dequantize" if self.dequantize else "keep the format"
        return (f"quantized base ({self.format}, {mode}): {c['dequantized']} tensors dequantized, "
                f"{c['re-quantized']} re-quantized (weights and fresh scales), {c['copied']} copied raw, "
                f"{c['dropped']} scales dropped")


_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
QUANT_KEY = "quantization_config"


def compute_dtype(config: Mapping[str, object]) -> str:
    """The dtype quantized weights decode to: config ``torch_dtype`` (or transformers 5's ``dtype``), else bf16."""
    name = config.get("torch_dtype") or config.get("dtype")
    return _DTYPES.get(name, "BF16") if isinstance(name, str) else "BF16"


def apply_quantization(
    quant: QuantIndex,
    config: Mapping[str, object],
    tasks: MutableMapping[str, TensorTask],
    ref: Mapping[str, TensorRef],
    dequantize: bool,
) -> tuple[set[str], tuple[str, ...], QuantSummary]:
    """Rewrite ``tasks`` (by name, in place) for a quantized base.

    ``ref`` maps stored tensor names to their refs. Returns the stored tensors to drop, the config keys to
    remove, and the summary ``--dry-run`` prints.

    Raises:
        PlanError: an adapter replaces a quantized weight with a full tensor (``modules_to_save``).
    """
    dtype = compute_dtype(config)
    drop: set[str] = set()
    stored: list[str] = []
    for qw in quant.weights.values():
        stored += [name for _, name in qw.parts]
        task = tasks[qw.name]
        if task.source.name != qw.part(CODES):
            raise PlanError(
                f"the adapter replaces quantized weight {qw.name!r} with a full tensor; streammerge merges deltas "
                "into quantized weights only: merge into the 16-bit base instead"
            )
        parts = tuple((role, ref[name]) for role, name in qw.parts)
        if dequantize:
            source = QuantSource(qw, parts, dtype, encode=False)
            kind = "merge" if task.steps else "dequantize"
            tasks[qw.name] = TensorTask(qw.name, dtype, qw.shape, task.source, task.steps, kind, source)
            drop.update(qw.companions)
        elif task.steps:
            tasks[qw.name] = TensorTask(qw.name, task.dtype, task.shape, task.source, task.steps, "merge",
                                        QuantSource(qw, parts, dtype, encode=True))
            for role, name in qw.parts:
                if role != CODES:
                    part = ref[name]
                    tasks[name] = TensorTask(name, part.dtype, part.shape, task.source, task.steps, "rescale",
                                             QuantSource(qw, parts, dtype, encode=True, role=role))
    if dequantize:
        drop.update(quant.extras)
    stored += quant.extras
    for name in drop:
        del tasks[name]
    removals = (QUANT_KEY,) if dequantize else ()
    return drop, removals, QuantSummary(quant.format, dequantize, tuple(stored))
